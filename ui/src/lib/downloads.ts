// Catalog downloads and recommended models in words: progress, speed and time left (computed
// here from the byte counts the events bring), what a model needs, and why the guided setup
// suggests the one it does. Plain functions, unit tested; the live state is downloads.svelte.ts.

import type { CatalogEntry, DownloadInfo, DownloadProgress } from './api';
import { formatBytes, formatTimeLeft, percent } from './format';

/** Bytes on disk at a moment, for the speed estimate. */
export interface Sample {
  /** Milliseconds (any clock, the same for every sample). */
  at: number;
  bytes: number;
}

/** How far back the speed looks: long enough to smooth bursts, short enough to follow changes. */
export const SPEED_WINDOW_MS = 8_000;
/** Below this much history a speed would be noise. */
const MIN_SPAN_MS = 700;

/** Share of the bytes done, 0-100. */
export function downloadPercent(progress: DownloadProgress | null | undefined): number {
  if (!progress) return 0;
  return percent(progress.bytes_done, progress.bytes_total);
}

/**
 * Adds a sample, keeping the ones inside `windowMs` of it. A count that went down (a file that
 * started over, a resumed download counting afresh) starts a new history.
 */
export function addSample(samples: readonly Sample[], sample: Sample, windowMs = SPEED_WINDOW_MS): Sample[] {
  const last = samples[samples.length - 1];
  if (last && (sample.bytes < last.bytes || sample.at < last.at)) return [sample];
  const kept = samples.filter((s) => s.at >= sample.at - windowMs);
  return [...kept, sample];
}

/** Bytes per second over the samples; null until there is enough history or when nothing moved. */
export function bytesPerSecond(samples: readonly Sample[]): number | null {
  if (samples.length < 2) return null;
  const first = samples[0] as Sample;
  const last = samples[samples.length - 1] as Sample;
  const span = last.at - first.at;
  if (span < MIN_SPAN_MS) return null;
  const rate = ((last.bytes - first.bytes) * 1000) / span;
  return rate > 0 ? rate : null;
}

/** Milliseconds until done at `speed` bytes per second; null when unknown. */
export function timeLeftMs(progress: DownloadProgress | null | undefined, speed: number | null): number | null {
  if (!progress || speed === null || !(speed > 0)) return null;
  const left = Math.max(0, progress.bytes_total - progress.bytes_done);
  return (left / speed) * 1000;
}

/** "3.2 MB/s"; '' when unknown. */
export function formatSpeed(speed: number | null): string {
  return speed !== null && speed > 0 ? `${formatBytes(speed)}/s` : '';
}

/** "2.6 GB" for the catalog's decimal sizes. */
export function formatGb(gb: number): string {
  if (!Number.isFinite(gb) || gb < 0) return 'Unknown';
  return `${gb >= 10 ? Math.round(gb) : Math.round(gb * 10) / 10} GB`;
}

/** The last part of a file path: "unet/diffusion_pytorch_model.safetensors" -> "diffusion_pytorch_model.safetensors". */
export function fileName(path: string): string {
  return path.split('/').filter(Boolean).pop() ?? path;
}

/** A server message ("the download was cancelled; …") as a sentence: capital first, full stop last. */
export function sentence(text: string): string {
  const t = text.trim();
  if (t === '') return t;
  const first = t.charAt(0).toLocaleUpperCase() + t.slice(1);
  return /[.!?]$/.test(first) ? first : `${first}.`;
}

/** A download that stopped and can be started again (it continues where it stopped). */
export function canResume(info: DownloadInfo | null | undefined): boolean {
  return info?.state === 'failed' || info?.state === 'cancelled';
}

export function isDownloading(info: DownloadInfo | null | undefined): boolean {
  return info?.state === 'downloading';
}

/** The progress line: "12.5 MB of 2.6 GB · 48% · 3.2 MB/s · about 2 minutes left". */
export function progressLine(progress: DownloadProgress | null | undefined, speed: number | null): string {
  if (!progress || progress.bytes_total <= 0) return 'Getting the list of files…';
  const parts = [
    `${formatBytes(progress.bytes_done)} of ${formatBytes(progress.bytes_total)}`,
    `${downloadPercent(progress)}%`,
  ];
  const s = formatSpeed(speed);
  if (s) parts.push(s);
  const left = formatTimeLeft(timeLeftMs(progress, speed));
  if (left) parts.push(left);
  return parts.join(' · ');
}

/** Which file: "File 3 of 12: diffusion_pytorch_model.safetensors"; '' when none. */
export function fileLine(progress: DownloadProgress | null | undefined): string {
  if (!progress || progress.file === '' || progress.files_total === 0) return '';
  const n = Math.min(progress.files_done + 1, progress.files_total);
  return `File ${n} of ${progress.files_total}: ${fileName(progress.file)}`;
}

/** The state in a few words. */
export function stateWords(info: DownloadInfo): string {
  switch (info.state) {
    case 'downloading':
      return 'Downloading';
    case 'done':
      return 'Downloaded';
    case 'cancelled':
      return 'Paused. Download again to continue where it stopped.';
    case 'failed':
      return info.error ? sentence(info.error) : 'The download stopped.';
  }
}

/** What a catalog model needs to run well: "Works without a graphics card" / "Needs 8 GB graphics memory". */
export function needsWords(entry: Pick<CatalogEntry, 'cpu_ok' | 'min_vram_gb'>): string {
  return entry.cpu_ok ? 'Works without a graphics card' : `Needs ${formatGb(entry.min_vram_gb)} graphics memory`;
}

/** The computer as the catalog sees it: "a graphics card with 8 GB" / "no graphics card the app can use". */
export function computerWords(vramGb: number | null): string {
  return vramGb === null
    ? 'This computer has no graphics card Local Diffusers can use, so the processor draws the pictures.'
    : `This computer has a graphics card with ${formatGb(vramGb)} of memory.`;
}

/** Why the guided setup suggests `entry` for a computer with `vramGb` (null: no usable graphics card). */
export function whySuggested(entry: CatalogEntry, vramGb: number | null): string {
  if (vramGb === null) {
    return entry.fast
      ? `${entry.name} needs only a few steps per picture, so it is the quickest start without a graphics card.`
      : `${entry.name} works without a graphics card.`;
  }
  if (vramGb >= entry.min_vram_gb) {
    return `${entry.name} fits your graphics card (it needs ${formatGb(entry.min_vram_gb)}) and makes ${entry.native_size}×${entry.native_size} pictures.`;
  }
  return `${entry.name} is the lightest model here; your graphics card is small for it, so the app saves memory as it draws.`;
}

/** Rough speed to expect, in words; honest ranges rather than a number we cannot know. */
export function speedWords(entry: CatalogEntry, vramGb: number | null): string {
  if (vramGb !== null && vramGb >= entry.min_vram_gb) {
    return entry.fast ? 'About a second per picture on your graphics card.' : 'A few seconds per picture on your graphics card.';
  }
  return entry.fast
    ? 'Usually under a minute per picture on the processor (1 to 4 steps).'
    : 'Several minutes per picture on the processor.';
}
