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
