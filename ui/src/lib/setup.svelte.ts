// The first-start guide: shown on the Playground while the app has no model (GET /api/v1/setup),
// and kept until the user makes the first picture or skips it, so that a download finishing
// (which makes a model appear) does not pull the page away mid-way. Also runs the self-test
// after the download, where the server has one.

import { api, toApiError, type ApiError, type SelfTestResult, type SetupInfo } from './api';
import { downloads } from './downloads.svelte';
import { sentence } from './downloads';

export type SelfTestState = 'idle' | 'running' | 'passed' | 'failed' | 'unavailable';

export interface SelfTestOutcome {
  state: Exclude<SelfTestState, 'idle' | 'running'>;
  message: string;
  hint: string | null;
}

/** What a self-test answer (or its error) means for the guide. A server without one is no failure. */
export function readSelfTest(result: SelfTestResult | null, error: ApiError | null = null): SelfTestOutcome {
  if (error) {
    // No route (an older server), or no built-in test model to run: nothing to check here; the
    // Diagnostics page says more.
    if (error.code === 'not_found' || error.code === 'model_missing' || error.status === 404 || error.status === 405) {
      return { state: 'unavailable', message: '', hint: null };
    }
    return { state: 'failed', message: error.message, hint: error.hint };
  }
  if (!result || result.ok !== true) {
    const message = result?.error?.message?.trim();
    return {
      state: 'failed',
      message: message ? sentence(message) : 'The self-test found a problem.',
      hint: result?.error?.hint ?? null,
    };
  }
  const took = typeof result.total_ms === 'number' ? ` A test picture took ${formatMs(result.total_ms)}` : '';
  const device = result.device?.toLowerCase() === 'cpu' ? 'the processor' : result.device === 'cuda' || result.device?.startsWith('cuda') || result.device === 'metal' ? 'the graphics card' : result.device;
  const where = took && device ? ` on ${device}` : '';
  return { state: 'passed', message: `Everything works.${took}${where}${took ? '.' : ''}`, hint: null };
}

/** "850 ms", "2.4 seconds". */
function formatMs(ms: number): string {
  return ms < 1000 ? `${Math.round(ms)} ms` : `${(ms / 1000).toFixed(1)} seconds`;
}

class Setup {
  info = $state<SetupInfo | null>(null);
  error = $state<ApiError | null>(null);
  /** Showing the guide. */
  active = $state(false);
  selfTest = $state<SelfTestState>('idle');
  selfTestResult = $state<SelfTestOutcome | null>(null);
  #checked = false;

  /** Asks the server once per page load whether the app has a model yet. */
  async check(force = false): Promise<void> {
    if (this.#checked && !force) return;
    this.#checked = true;
    try {
      const info = await api().setup();
      this.info = info;
      this.error = null;
      if (!info.has_model) this.active = true;
      for (const d of info.downloads) downloads.apply(d);
    } catch (err) {
      this.#checked = false;
      this.error = toApiError(err);
    }
  }

  async runSelfTest(): Promise<void> {
    if (this.selfTest === 'running') return;
    this.selfTest = 'running';
    let outcome: SelfTestOutcome;
    try {
      outcome = readSelfTest(await api().selfTest());
    } catch (err) {
      outcome = readSelfTest(null, toApiError(err));
    }
    this.selfTestResult = outcome;
    this.selfTest = outcome.state;
  }

  finish() {
    this.active = false;
  }
}

export const setup = new Setup();
