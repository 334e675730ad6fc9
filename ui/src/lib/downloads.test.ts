import { describe, expect, it } from 'vitest';
import type { CatalogEntry, DownloadInfo, DownloadProgress } from './api';
import {
  addSample,
  bytesPerSecond,
  canResume,
  computerWords,
  downloadPercent,
  fileLine,
  fileName,
  formatGb,
  formatSpeed,
  needsWords,
  progressLine,
  sentence,
  speedWords,
  stateWords,
  timeLeftMs,
  whySuggested,
} from './downloads';

const MB = 1024 * 1024;

function progress(over: Partial<DownloadProgress> = {}): DownloadProgress {
  return { file: 'unet/diffusion_pytorch_model.safetensors', files_done: 2, files_total: 12, bytes_done: 50 * MB, bytes_total: 200 * MB, ...over };
}

function entry(over: Partial<CatalogEntry> = {}): CatalogEntry {
  return {
    id: 'sd-turbo', name: 'SD Turbo', repo: 'stabilityai/sd-turbo', revision: 'main', family: 'SD2', variant: 'fp16', size_gb: 2.6,
    min_vram_gb: 4, native_size: 512, cpu_ok: true, fast: true, style: ['general'], licence: 'L', description: 'd', ...over,
  };
}

function info(over: Partial<DownloadInfo> = {}): DownloadInfo {
  return { id: 'sd-turbo', name: 'SD Turbo', state: 'downloading', progress: progress(), error: null, ...over };
}

describe('progress', () => {
  it('is the share of bytes, 0 without numbers', () => {
    expect(downloadPercent(progress())).toBe(25);
    expect(downloadPercent(progress({ bytes_done: 200 * MB }))).toBe(100);
    expect(downloadPercent(progress({ bytes_total: 0 }))).toBe(0);
    expect(downloadPercent(null)).toBe(0);
  });

  it('names the file being fetched, counted from 1', () => {
    expect(fileLine(progress())).toBe('File 3 of 12: diffusion_pytorch_model.safetensors');
    expect(fileLine(progress({ files_done: 12, file: 'vae/config.json' }))).toBe('File 12 of 12: config.json');
    expect(fileLine(progress({ file: '' }))).toBe('');
    expect(fileLine(null)).toBe('');
    expect(fileName('a/b/c.json')).toBe('c.json');
    expect(fileName('model_index.json')).toBe('model_index.json');
  });

  it('reads as bytes, percent, speed and time left', () => {
    expect(progressLine(progress(), 10 * MB)).toBe('50.0 MB of 200 MB · 25% · 10.0 MB/s · about 15 seconds left');
    expect(progressLine(progress(), null)).toBe('50.0 MB of 200 MB · 25%');
    expect(progressLine(null, null)).toBe('Getting the list of files…');
  });
});

describe('speed', () => {
  it('is measured over the recent samples', () => {
    let s = addSample([], { at: 0, bytes: 0 });
    expect(bytesPerSecond(s)).toBeNull();
    s = addSample(s, { at: 500, bytes: MB });
    expect(bytesPerSecond(s)).toBeNull(); // under 0.7 s of history: noise
    s = addSample(s, { at: 1000, bytes: 2 * MB });
    expect(bytesPerSecond(s)).toBe(2 * MB);
  });

  it('forgets samples older than the window', () => {
    let s = addSample([], { at: 0, bytes: 0 }, 2000);
    s = addSample(s, { at: 1000, bytes: 100 * MB }, 2000); // a burst
    s = addSample(s, { at: 3000, bytes: 102 * MB }, 2000);
    expect(s.map((x) => x.at)).toEqual([1000, 3000]);
    expect(bytesPerSecond(s)).toBe(MB);
  });

  it('starts over when the count goes down (a file that restarted)', () => {
    const s = addSample([{ at: 0, bytes: 0 }, { at: 1000, bytes: 5 * MB }], { at: 2000, bytes: MB });
    expect(s).toEqual([{ at: 2000, bytes: MB }]);
  });

  it('is unknown when nothing moved', () => {
    expect(bytesPerSecond([{ at: 0, bytes: 5 }, { at: 5000, bytes: 5 }])).toBeNull();
  });

  it('gives the time left and reads as MB/s', () => {
    expect(timeLeftMs(progress(), 10 * MB)).toBe(15_000);
    expect(timeLeftMs(progress(), null)).toBeNull();
    expect(timeLeftMs(null, 5)).toBeNull();
    expect(timeLeftMs(progress({ bytes_done: 300 * MB }), MB)).toBe(0);
    expect(formatSpeed(1.5 * MB)).toBe('1.5 MB/s');
    expect(formatSpeed(null)).toBe('');
    expect(formatSpeed(0)).toBe('');
  });
});

describe('states in words', () => {
  it('says why it stopped, as a sentence, and whether it can continue', () => {
    expect(stateWords(info({ state: 'failed', error: 'the server answered 500 for unet/x' }))).toBe('The server answered 500 for unet/x.');
    expect(stateWords(info({ state: 'failed', error: null }))).toBe('The download stopped.');
    expect(stateWords(info({ state: 'cancelled' }))).toMatch(/continue where it stopped/);
    expect(stateWords(info({ state: 'done' }))).toBe('Downloaded');
    expect(canResume(info({ state: 'failed' }))).toBe(true);
    expect(canResume(info({ state: 'cancelled' }))).toBe(true);
    expect(canResume(info())).toBe(false);
    expect(canResume(null)).toBe(false);
    expect(sentence('  ok!  ')).toBe('Ok!');
    expect(sentence('')).toBe('');
  });
});

describe('catalog words', () => {
  it('sizes in GB as the catalog gives them', () => {
    expect(formatGb(2.6)).toBe('2.6 GB');
    expect(formatGb(6.94)).toBe('6.9 GB');
    expect(formatGb(12.4)).toBe('12 GB');
    expect(formatGb(4)).toBe('4 GB');
    expect(formatGb(Number.NaN)).toBe('Unknown');
  });

  it('says what a model needs', () => {
    expect(needsWords(entry())).toBe('Works without a graphics card');
    expect(needsWords(entry({ cpu_ok: false, min_vram_gb: 8 }))).toBe('Needs 8 GB graphics memory');
  });

  it('explains the suggestion for this computer', () => {
    expect(computerWords(null)).toMatch(/no graphics card/);
    expect(computerWords(12)).toBe('This computer has a graphics card with 12 GB of memory.');
    expect(whySuggested(entry(), null)).toMatch(/quickest start without a graphics card/);
    expect(whySuggested(entry({ fast: false, name: 'SD 1.5' }), null)).toBe('SD 1.5 works without a graphics card.');
    const xl = entry({ name: 'SDXL', min_vram_gb: 8, native_size: 1024, cpu_ok: false, fast: false });
    expect(whySuggested(xl, 24)).toBe('SDXL fits your graphics card (it needs 8 GB) and makes 1024×1024 pictures.');
    expect(whySuggested(xl, 6)).toMatch(/small for it/);
    expect(speedWords(entry(), null)).toMatch(/under a minute/);
    expect(speedWords(xl, 24)).toMatch(/seconds per picture on your graphics card/);
    expect(speedWords(xl, null)).toMatch(/minutes per picture/);
  });
});
