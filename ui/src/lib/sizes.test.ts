import { describe, expect, it } from 'vitest';
import { ASPECTS, aspectOf, baseSize, clampSide, sizeFor } from './sizes';

const byId = (id: string) => ASPECTS.find((a) => a.id === id)!;
const px = (id: string, base: number) => {
  const s = sizeFor(byId(id), base);
  return `${s.width}x${s.height}`;
};

describe('sizeFor', () => {
  it('gives the usual SD1 sizes around 512', () => {
    expect(px('1:1', 512)).toBe('512x512');
    expect(px('2:3', 512)).toBe('512x768');
    expect(px('3:2', 512)).toBe('768x512');
    expect(px('3:4', 512)).toBe('512x704');
    expect(px('4:3', 512)).toBe('704x512');
    expect(px('9:16', 512)).toBe('448x768');
    expect(px('16:9', 512)).toBe('768x448');
  });

  it('gives the SDXL training buckets around 1024', () => {
    expect(px('1:1', 1024)).toBe('1024x1024');
    expect(px('2:3', 1024)).toBe('832x1216');
    expect(px('3:2', 1024)).toBe('1216x832');
    expect(px('16:9', 1024)).toBe('1344x768');
  });

  it('always gives multiples of 64', () => {
    for (const base of [512, 768, 1024]) {
      for (const a of ASPECTS) {
        const s = sizeFor(a, base);
        expect(s.width % 64).toBe(0);
        expect(s.height % 64).toBe(0);
      }
    }
  });
});

describe('helpers', () => {
  it('baseSize follows the model family', () => {
    expect(baseSize('SDXL')).toBe(1024);
    expect(baseSize('SD1')).toBe(512);
    expect(baseSize(null)).toBe(512);
  });

  it('aspectOf finds the shape of a size, or none', () => {
    expect(aspectOf({ width: 768, height: 512 }, 512)?.id).toBe('3:2');
    expect(aspectOf({ width: 64, height: 64 }, 512)).toBeNull();
  });

  it('clampSide keeps sizes to multiples of 8 within 64..2048', () => {
    expect(clampSide(70)).toBe(72);
    expect(clampSide(10)).toBe(64);
    expect(clampSide(5000)).toBe(2048);
    expect(clampSide(Number.NaN)).toBe(512);
  });
});
