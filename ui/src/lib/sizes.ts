// Picture sizes offered as shapes ("2:3 portrait") with the exact pixels shown. Models draw best
// near the size they were trained at, so the choices depend on the model's family: SD1 and SD2
// around 512 pixels, SDXL around 1024 (about one megapixel).

import type { ModelFamily } from './api';

export interface Aspect {
  id: string;
  label: string;
  /** Width : height. */
  w: number;
  h: number;
}

export const ASPECTS: readonly Aspect[] = [
  { id: '1:1', label: 'Square', w: 1, h: 1 },
  { id: '2:3', label: 'Portrait', w: 2, h: 3 },
  { id: '3:2', label: 'Landscape', w: 3, h: 2 },
  { id: '3:4', label: 'Portrait', w: 3, h: 4 },
  { id: '4:3', label: 'Landscape', w: 4, h: 3 },
  { id: '9:16', label: 'Tall', w: 9, h: 16 },
  { id: '16:9', label: 'Wide', w: 16, h: 9 },
];

export interface Size {
  width: number;
  height: number;
}

/** The size a model family was trained at (the short side of its pictures). */
export function baseSize(family: ModelFamily | null | undefined): number {
  return family === 'SDXL' ? 1024 : 512;
}

// SDXL's own training buckets (Stability AI, SDXL paper appendix), about 1024x1024 pixels each.
const SDXL: Record<string, Size> = {
  '1:1': { width: 1024, height: 1024 },
  '2:3': { width: 832, height: 1216 },
  '3:4': { width: 896, height: 1152 },
  '9:16': { width: 768, height: 1344 },
};

function round64(n: number): number {
  return Math.max(64, Math.round(n / 64) * 64);
}

/**
 * Pixels for a shape. SD1/SD2: the short side is the base size and the long side grows, up to
 * 1.5x the base (beyond that these models start repeating things), then the short side shrinks;
 * every side a multiple of 64. SDXL: its training buckets.
 */
export function sizeFor(aspect: Aspect, base: number): Size {
  const landscape = aspect.w > aspect.h;
  const short = Math.min(aspect.w, aspect.h);
  const long = Math.max(aspect.w, aspect.h);
  const key = `${short}:${long}`;
  let size: Size;
  if (base >= 1024 && SDXL[key]) {
    size = { ...SDXL[key] };
  } else {
    const cap = base * 1.5;
    let longSide = round64((base * long) / short);
    let shortSide = base;
    if (longSide > cap) {
      longSide = round64(cap);
      shortSide = round64((longSide * short) / long);
    }
    size = { width: shortSide, height: longSide };
  }
  return landscape ? { width: size.height, height: size.width } : size;
}

/** The shape whose pixels are exactly this size at this base, if any. */
export function aspectOf(size: Size, base: number): Aspect | null {
  return ASPECTS.find((a) => {
    const s = sizeFor(a, base);
    return s.width === size.width && s.height === size.height;
  }) ?? null;
}

/** Sizes must be multiples of 8 from 64 to 2048 (the server's limit). */
export function clampSide(n: number): number {
  if (!Number.isFinite(n)) return 512;
  return Math.min(2048, Math.max(64, Math.round(n / 8) * 8));
}
