// The Playground's settings ("draft") and the conversions around it: to a job request, from a
// gallery picture, from a dropped PNG's parameters, from a preset, and to the A1111-style text
// behind "Copy parameters". Pure functions, so they are unit tested without a browser.

import type { ImageRecord, Inspected, JobInfo, JobRequest, ModelInfo, Preset, PresetInput } from './api';
import { aspectOf, baseSize, sizeFor } from './sizes';

export interface Draft {
  prompt: string;
  /** '' means "the default from Settings". */
  negative_prompt: string;
  /** Preset id; '' for none. */
  preset: string;
  /** Model name; '' for the default model. */
  model: string;
  /** An aspect id from sizes.ts, or 'custom'. */
  aspect: string;
  width: number;
  height: number;
  steps: number;
  cfg_scale: number;
  /** '' for the app's default. */
  sampler: string;
  schedule: string;
  /** -1: a new random seed for every picture. */
  seed: number;
  batch_size: number;
  /** CLIP layers to skip, 1..12; null for the app's setting. */
  clip_skip: number | null;
  /** SDXL refiner model's name; '' for none. */
  refiner: string;
  /** Where the refiner takes over, as a share of the steps. */
  refiner_switch: number;
  /** Hires fix: draw, enlarge by `hires_scale`, then draw over the larger picture. */
  hires: boolean;
  hires_scale: number;
  /** How much the second pass redraws (A1111 "Denoising strength"). */
  hires_denoise: number;
  /** Second-pass steps; 0: as many as the first pass. */
  hires_steps: number;
  /** An upscaler name from HIRES_UPSCALERS. */
  hires_upscaler: string;
}

/** The hires fix's upscalers, as the server names them (A1111's names). */
export const HIRES_UPSCALERS = ['Latent', 'Latent (nearest)', 'Latent (nearest-exact)', 'Lanczos'] as const;

export const DEFAULT_DRAFT: Draft = {
  prompt: '',
  negative_prompt: '',
  preset: '',
  model: '',
  aspect: '1:1',
  width: 512,
  height: 512,
  steps: 20,
  cfg_scale: 7,
  sampler: '',
  schedule: '',
  seed: -1,
  batch_size: 1,
  clip_skip: null,
  refiner: '',
  refiner_switch: 0.8,
  hires: false,
  hires_scale: 2,
  hires_denoise: 0.7,
  hires_steps: 0,
  hires_upscaler: 'Latent',
};

export const LIMITS = {
  steps: { min: 1, max: 150 },
  cfg_scale: { min: 1, max: 30 },
  batch_size: { min: 1, max: 8 },
  side: { min: 64, max: 2048 },
  clip_skip: { min: 1, max: 12 },
  refiner_switch: { min: 0.5, max: 1 },
  hires_scale: { min: 1, max: 4 },
  hires_denoise: { min: 0.05, max: 1 },
  hires_steps: { min: 0, max: 150 },
} as const;

/** The hires factor as sent: clamped and rounded to hundredths. */
function hiresScale(d: Draft): number {
  return Math.round(clamp(d.hires_scale, LIMITS.hires_scale.min, LIMITS.hires_scale.max, DEFAULT_DRAFT.hires_scale) * 100) / 100;
}

/** The picture's final size: the first pass's, or the hires fix's (floored to multiples of 8, as the server does). */
export function outputSize(d: Draft): { width: number; height: number } {
  if (!d.hires) return { width: d.width, height: d.height };
  const scale = hiresScale(d);
  const floor8 = (v: number) => Math.floor(Math.floor(v * scale) / 8) * 8;
  return { width: floor8(d.width), height: floor8(d.height) };
}

/** A usable clip skip (a whole number 1..12), or null for "the app's setting". */
export function cleanClipSkip(v: unknown): number | null {
  const n = typeof v === 'string' && v.trim() !== '' ? Number(v) : v;
  if (typeof n !== 'number' || !Number.isFinite(n)) return null;
  return Math.round(clamp(n, LIMITS.clip_skip.min, LIMITS.clip_skip.max, 1));
}

function clamp(n: number, min: number, max: number, fallback: number): number {
  if (!Number.isFinite(n)) return fallback;
  return Math.min(max, Math.max(min, n));
}

/** The POST /api/v1/jobs body for a draft. Blank choices are left out so the server's defaults apply. */
export function toJobRequest(d: Draft): JobRequest {
  const req: JobRequest = {
    prompt: d.prompt.trim(),
    width: d.width,
    height: d.height,
    steps: Math.round(clamp(d.steps, LIMITS.steps.min, LIMITS.steps.max, DEFAULT_DRAFT.steps)),
    cfg_scale: clamp(d.cfg_scale, LIMITS.cfg_scale.min, LIMITS.cfg_scale.max, DEFAULT_DRAFT.cfg_scale),
    seed: Number.isInteger(d.seed) && d.seed >= 0 ? d.seed : -1,
    batch_size: Math.round(clamp(d.batch_size, LIMITS.batch_size.min, LIMITS.batch_size.max, 1)),
  };
  if (d.negative_prompt.trim() !== '') req.negative_prompt = d.negative_prompt.trim();
  if (d.preset) req.preset = d.preset;
  if (d.model) req.model = d.model;
  if (d.sampler) req.sampler = d.sampler;
  if (d.schedule) req.schedule = d.schedule;
  const clipSkip = cleanClipSkip(d.clip_skip);
  if (clipSkip !== null) req.clip_skip = clipSkip;
  if (d.refiner) {
    req.refiner = d.refiner;
    const sw = clamp(d.refiner_switch, LIMITS.refiner_switch.min, LIMITS.refiner_switch.max, DEFAULT_DRAFT.refiner_switch);
    req.refiner_switch = Math.round(sw * 100) / 100;
  }
  if (d.hires) {
    const upscaler = (HIRES_UPSCALERS as readonly string[]).includes(d.hires_upscaler) ? d.hires_upscaler : 'Latent';
    req.hires = {
      scale: hiresScale(d),
      denoise: Math.round(clamp(d.hires_denoise, LIMITS.hires_denoise.min, LIMITS.hires_denoise.max, DEFAULT_DRAFT.hires_denoise) * 100) / 100,
      steps: Math.round(clamp(d.hires_steps, LIMITS.hires_steps.min, LIMITS.hires_steps.max, 0)),
      upscaler,
    };
    // The server does not take both yet; the hires fix wins (the Playground says so).
    delete req.refiner;
    delete req.refiner_switch;
  }
  return req;
}

/** Settings some source can give back; anything missing or null is left as it is. */
export interface Recalled {
  prompt?: string | null;
  negative_prompt?: string | null;
  model?: string | null;
  width?: number | null;
  height?: number | null;
  steps?: number | null;
  cfg_scale?: number | null;
  sampler?: string | null;
  schedule?: string | null;
  seed?: number | null;
}

/**
 * The draft after taking over a picture's settings. The preset is cleared (the picture's prompt
 * already has its words in it), the seed is kept so the same picture can be made again, and a
 * model or sampler this app does not have is left at the current choice.
 */
export function recall(d: Draft, from: Recalled, known: { models?: string[]; samplers?: string[]; schedules?: string[] } = {}): Draft {
  const next: Draft = { ...d, preset: '' };
  const has = <T,>(v: T | null | undefined): v is T => v !== null && v !== undefined;
  if (has(from.prompt)) next.prompt = from.prompt;
  if (has(from.negative_prompt)) next.negative_prompt = from.negative_prompt;
  if (has(from.width) && has(from.height) && from.width > 0 && from.height > 0) {
    next.width = from.width;
    next.height = from.height;
    next.aspect = 'custom';
  }
  if (has(from.steps) && from.steps > 0) next.steps = from.steps;
  if (has(from.cfg_scale) && from.cfg_scale > 0) next.cfg_scale = from.cfg_scale;
  if (has(from.seed) && from.seed >= 0) next.seed = from.seed;
  const pick = (value: string | null | undefined, list: string[] | undefined) => {
    if (!has(value) || value === '') return null;
    if (!list) return value;
    return list.find((x) => x.toLowerCase() === value.toLowerCase()) ?? null;
  };
  const model = pick(from.model, known.models);
  if (model !== null) next.model = model;
  let sampler = pick(from.sampler, known.samplers);
  let schedule = pick(from.schedule, known.schedules);
  // Before A1111 1.9 the schedule was part of the sampler's name ("DPM++ 2M Karras"), as most
  // pictures on the web still say: split as A1111 1.9 does, the longest schedule name first.
  if (sampler === null && has(from.sampler) && known.samplers && known.schedules) {
    const name = from.sampler.trim().toLowerCase();
    const byLength = [...known.schedules].sort((a, b) => b.length - a.length);
    for (const s of byLength) {
      if (!name.endsWith(` ${s.toLowerCase()}`)) continue;
      const base = pick(name.slice(0, -(s.length + 1)), known.samplers);
      if (base === null) continue;
      sampler = base;
      schedule ??= s;
      break;
    }
  }
  if (sampler !== null) next.sampler = sampler;
  if (schedule !== null) next.schedule = schedule;
  return next;
}

export function recallImage(d: Draft, image: ImageRecord, known?: Parameters<typeof recall>[2]): Draft {
  // A hires picture's file is the enlarged one; its first-pass size and hires settings are in
  // its parameters text. A picture without them turns the hires fix off, else its size would
  // be enlarged again.
  const hires = hiresFromParameters(image.parameters);
  if (!hires) return { ...recall(d, image, known), hires: false };
  const { width, height, ...settings } = hires;
  return { ...recall(d, { ...image, width, height }, known), ...settings };
}

/** The `Key: value` pairs of an A1111 parameters text's last line (values unquoted). */
function settingsLine(text: string): Map<string, string> {
  const last = text.trim().split('\n').pop() ?? '';
  const pairs = new Map<string, string>();
  const re = /\s*([\w][\w \-()/.]*?):\s*("(?:[^"\\]|\\.)*"|[^,]*)(?:,|$)/g;
  for (const m of last.matchAll(re)) {
    let value = m[2].trim();
    if (value.startsWith('"')) {
      try {
        value = JSON.parse(value) as string;
      } catch {
        /* kept as written */
      }
    }
    pairs.set(m[1].trim(), value);
  }
  return pairs;
}

/** A hires picture's first-pass size and hires settings from its parameters text; null for a picture drawn in one pass. */
export function hiresFromParameters(text: string | null | undefined): (Pick<Draft, 'hires' | 'hires_scale' | 'hires_denoise' | 'hires_steps' | 'hires_upscaler'> & { width: number; height: number }) | null {
  if (!text) return null;
  const p = settingsLine(text);
  const size = /^(\d+)x(\d+)$/.exec(p.get('Size') ?? '');
  if (!size || (!p.has('Hires upscale') && !p.has('Hires resize'))) return null;
  const [width, height] = [Number(size[1]), Number(size[2])];
  const resize = /^(\d+)x(\d+)$/.exec(p.get('Hires resize') ?? '');
  const scale = p.has('Hires upscale') ? Number(p.get('Hires upscale')) : resize && width > 0 ? Number(resize[1]) / width : DEFAULT_DRAFT.hires_scale;
  const number = (key: string, fallback: number) => {
    const n = Number(p.get(key));
    return p.has(key) && Number.isFinite(n) ? n : fallback;
  };
  const upscaler = p.get('Hires upscaler') ?? 'Latent';
  return {
    width,
    height,
    hires: true,
    hires_scale: Number.isFinite(scale) ? Math.round(scale * 100) / 100 : DEFAULT_DRAFT.hires_scale,
    hires_denoise: number('Denoising strength', DEFAULT_DRAFT.hires_denoise),
    hires_steps: number('Hires steps', 0),
    hires_upscaler: (HIRES_UPSCALERS as readonly string[]).includes(upscaler) ? upscaler : 'Latent',
  };
}

export function recallInspected(d: Draft, found: Inspected, known?: Parameters<typeof recall>[2]): Draft {
  // An A1111 picture's hires fix, as "Use these settings" in the Gallery takes it: the file is
  // the enlarged picture, so without this it would be drawn at that size and enlarged again.
  const hires = found.source === 'a1111' ? hiresFromParameters(parametersChunk(found.raw)) : null;
  if (!hires) return { ...recall(d, found, known), hires: false };
  const { width, height, ...settings } = hires;
  return { ...recall(d, { ...found, width, height }, known), ...settings };
}

/** The `parameters` text among a PNG's chunks as inspect lists them (`[key, text]` pairs). */
function parametersChunk(raw: unknown): string | null {
  if (!Array.isArray(raw)) return null;
  const pair = raw.find((p): p is [string, string] => Array.isArray(p) && p[0] === 'parameters' && typeof p[1] === 'string');
  return pair ? pair[1] : null;
}

/** Whether a PNG's parameters had anything worth recalling. */
export function hasParameters(found: Inspected): boolean {
  return found.source !== 'none' && (found.prompt ?? '') !== '';
}

/** A fast model's own settings; null for other models (and fast ones whose settings are unknown). */
function fastDefaults(m: ModelInfo | null | undefined) {
  return m?.fast && m.defaults ? m.defaults : null;
}

/**
 * The draft after the chosen model changed from `from` to `to` (`from` undefined: the page just
 * opened with `to`). A fast model (Turbo, LCM) draws in a few steps at a low CFG with its own
 * sampler, and 20 steps at CFG 7 spoil its pictures, so choosing one fills steps and CFG with
 * its own and leaves the sampler and schedule to it; going back to a usual model restores the
 * usual settings. Settings the user changed for the current model are kept when the page opens.
 */
export function followModel(d: Draft, from: ModelInfo | null | undefined, to: ModelInfo | null): Draft {
  const fastTo = fastDefaults(to);
  const fastFrom = fastDefaults(from);
  if (from === undefined) {
    const untouched = d.steps === DEFAULT_DRAFT.steps && d.cfg_scale === DEFAULT_DRAFT.cfg_scale && d.sampler === '' && d.schedule === '';
    return fastTo && untouched ? { ...d, steps: fastTo.steps, cfg_scale: fastTo.cfg_scale } : d;
  }
  if (from?.name === to?.name) return d;
  if (fastTo) return { ...d, steps: fastTo.steps, cfg_scale: fastTo.cfg_scale, sampler: '', schedule: '' };
  if (fastFrom) {
    return { ...d, steps: DEFAULT_DRAFT.steps, cfg_scale: DEFAULT_DRAFT.cfg_scale, sampler: '', schedule: '' };
  }
  return d;
}

/**
 * The short side the shape buttons draw a model's pictures at: a fast model's own
 * ([`nativeSize`]), else the size the server found for the model (SD 2.x 768-v: 768, SD 2.x
 * base: 512), else its family's.
 */
export function drawBase(m: ModelInfo | null | undefined): number {
  const own = m?.defaults ? Math.min(m.defaults.width, m.defaults.height) : null;
  return nativeSize(m) ?? own ?? baseSize(m?.family);
}

/** The size a model draws best at: a fast model's own (SDXL Turbo: 512), else its family's. */
export function nativeSize(m: ModelInfo | null | undefined): number | null {
  const fast = fastDefaults(m);
  return fast ? Math.min(fast.width, fast.height) : null;
}

/**
 * The draft after picking a preset: its size and quality settings fill the form. With a fast
 * model chosen (`model`), the model keeps its own steps, CFG and sampler, as the server does for
 * a preset named in a request.
 */
export function applyPreset(d: Draft, preset: Preset | null, model?: ModelInfo | null): Draft {
  if (!preset) return { ...d, preset: '' };
  const next: Draft = { ...d, preset: preset.id };
  if (preset.width && preset.height) {
    // A preset's size at one of the families' own sizes is a shape: the built-in ones are
    // written for SD 1.5 (Portrait 512x768), which SDXL draws badly, so it is drawn at the chosen
    // model's size, as the shape buttons do, and keeps following the model; any other size is
    // the user's own and is kept as it is.
    const size = { width: preset.width, height: preset.height };
    const aspect = [512, 768, 1024].map((b) => aspectOf(size, b)).find((a) => a !== null) ?? null;
    if (aspect) {
      const fitted = sizeFor(aspect, drawBase(model));
      next.width = fitted.width;
      next.height = fitted.height;
      next.aspect = aspect.id;
    } else {
      next.width = preset.width;
      next.height = preset.height;
      next.aspect = 'custom';
    }
  }
  if (fastDefaults(model)) return next;
  if (preset.steps) next.steps = preset.steps;
  if (preset.cfg_scale) next.cfg_scale = preset.cfg_scale;
  if (preset.sampler) next.sampler = preset.sampler;
  if (preset.schedule) next.schedule = preset.schedule;
  return next;
}

/** A new preset from the Playground's current settings. */
export function presetFromDraft(d: Draft, name: string, description = ''): PresetInput {
  return {
    name: name.trim(),
    description: description.trim(),
    width: d.width,
    height: d.height,
    steps: d.steps,
    cfg_scale: d.cfg_scale,
    sampler: d.sampler || null,
    schedule: d.schedule || null,
    prompt_prefix: '',
    prompt_suffix: '',
    negative_prompt: d.negative_prompt.trim(),
  };
}

function formatNumber(n: number): string {
  return Number.isInteger(n) ? String(n) : String(Math.round(n * 100) / 100);
}

/** A1111-style parameters text, as in the PNG ("Steps: 20, Sampler: Euler, ..."). */
export function parametersText(p: ImageRecord | JobInfo): string {
  if ('parameters' in p && p.parameters) return p.parameters;
  const lines = [p.prompt];
  if (p.negative_prompt) lines.push(`Negative prompt: ${p.negative_prompt}`);
  // A picture added from the images folder may lack any of these: left out, never "null".
  const fields: [string, string][] = [];
  if (p.steps !== null) fields.push(['Steps', String(p.steps)]);
  if (p.sampler) fields.push(['Sampler', p.sampler]);
  if (p.schedule) fields.push(['Schedule type', p.schedule]);
  if (p.cfg_scale !== null) fields.push(['CFG scale', formatNumber(p.cfg_scale)]);
  if (p.seed !== null) fields.push(['Seed', String(p.seed)]);
  fields.push(['Size', `${p.width}x${p.height}`]);
  if (p.model) fields.push(['Model', p.model]);
  lines.push(fields.map(([k, v]) => `${k}: ${v}`).join(', '));
  return lines.join('\n');
}

/** Reads a stored draft (localStorage); anything unreadable falls back to the defaults. */
export function parseDraft(text: string | null): Draft {
  if (!text) return { ...DEFAULT_DRAFT };
  try {
    const raw = JSON.parse(text) as Partial<Record<keyof Draft, unknown>>;
    const out: Draft = { ...DEFAULT_DRAFT };
    for (const key of Object.keys(DEFAULT_DRAFT) as (keyof Draft)[]) {
      const value = raw[key];
      if (typeof value === typeof DEFAULT_DRAFT[key]) (out as unknown as Record<string, unknown>)[key] = value;
    }
    // The one field that may be null: anything but a usable number means "the app's setting".
    out.clip_skip = cleanClipSkip(raw.clip_skip);
    return out;
  } catch {
    return { ...DEFAULT_DRAFT };
  }
}
