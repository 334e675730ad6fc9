// How a job's or a download's state shows on the shared progress bar (components/ProgressBar).

/** Running fills with the accent colour, done turns green, stopped (failed, cancelled) grey. */
export type BarState = 'running' | 'done' | 'stopped';

/** The bar's look for a job or download state ("queued", "downloading", "failed", ...). */
export function barState(state: string): BarState {
  if (state === 'done') return 'done';
  if (state === 'failed' || state === 'cancelled') return 'stopped';
  return 'running';
}
