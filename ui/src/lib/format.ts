// Turns raw numbers from the API into short words people read: sizes, core counts, yes/no.

const UNITS = ['KB', 'MB', 'GB', 'TB', 'PB'] as const;

/**
 * Byte count as "15.6 GB". Uses 1024-based units with the familiar labels, the way Windows and
 * most task managers show memory, so a "16 GB" computer reads close to 16 GB and not 17.2.
 * One decimal below 100, whole numbers from 100 up ("128 GB").
 */
export function formatBytes(bytes: number | null | undefined): string {
  if (bytes === null || bytes === undefined || !Number.isFinite(bytes) || bytes < 0) {
    return 'Unknown';
  }
  if (bytes < 1024) return bytes === 1 ? '1 byte' : `${Math.round(bytes)} bytes`;
  let value = bytes;
  let unit = -1;
  do {
    value /= 1024;
    unit++;
  } while (value >= 1024 && unit < UNITS.length - 1);
  // Round first, then pick the format, so 99.96 becomes "100 GB" and not "100.0 GB".
  const rounded = Math.round(value * 10) / 10;
  const text = rounded >= 100 ? Math.round(value).toString() : rounded.toFixed(1);
  return `${text} ${UNITS[unit]}`;
}

function plural(n: number, one: string, many: string): string {
  return `${n} ${n === 1 ? one : many}`;
}

/** "8 cores, 16 threads"; "2 threads" when the number of physical cores is unknown. */
export function formatCores(physical: number | null | undefined, logical: number): string {
  const threads = plural(logical, 'thread', 'threads');
  if (physical === null || physical === undefined) return threads;
  return `${plural(physical, 'core', 'cores')}, ${threads}`;
}

export function yesNo(value: boolean): string {
  return value ? 'Yes' : 'No';
}

/** Share of `part` in `total` as a whole percentage 0-100; 0 when total is not positive. */
export function percent(part: number, total: number): number {
  if (!(total > 0) || !Number.isFinite(part)) return 0;
  return Math.min(100, Math.max(0, Math.round((part / total) * 100)));
}

/** Time left as people say it: "a few seconds", "about 40 seconds", "about 2 minutes". */
export function formatTimeLeft(ms: number | null | undefined): string {
  if (ms === null || ms === undefined || !Number.isFinite(ms) || ms < 0) return '';
  const s = Math.round(ms / 1000);
  if (s < 5) return 'a few seconds left';
  if (s < 60) return `about ${Math.max(5, Math.round(s / 5) * 5)} seconds left`;
  const m = Math.round(s / 60);
  return m === 1 ? 'about a minute left' : `about ${m} minutes left`;
}

/** A date and time in the user's own style, e.g. "12 Mar 2025, 14:05". */
export function formatDateTime(unixMs: number, locale?: string): string {
  if (!Number.isFinite(unixMs)) return 'Unknown';
  return new Date(unixMs).toLocaleString(locale, { dateStyle: 'medium', timeStyle: 'short' });
}

/** Local midnight of a yyyy-mm-dd date input as unix ms; null when empty or not a date. */
export function dayStart(value: string): number | null {
  const m = /^(\d{4})-(\d{2})-(\d{2})$/.exec(value);
  if (!m) return null;
  return new Date(Number(m[1]), Number(m[2]) - 1, Number(m[3])).getTime();
}

/** Format a number of things: "1 picture", "3 pictures". */
export function count(n: number, one: string, many: string): string {
  return `${n.toLocaleString()} ${n === 1 ? one : many}`;
}
