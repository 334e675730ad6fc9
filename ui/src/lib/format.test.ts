import { describe, expect, it } from 'vitest';
import { dayStart, formatBytes, formatCores, formatTimeLeft, percent, yesNo } from './format';

describe('formatBytes', () => {
  it('shows memory sizes the way task managers do', () => {
    expect(formatBytes(16_750_000_000)).toBe('15.6 GB');
    expect(formatBytes(16 * 1024 ** 3)).toBe('16.0 GB');
    expect(formatBytes(128 * 1024 ** 3)).toBe('128 GB');
    expect(formatBytes(1.5 * 1024 ** 4)).toBe('1.5 TB');
    expect(formatBytes(512 * 1024 ** 2)).toBe('512 MB');
    expect(formatBytes(1536)).toBe('1.5 KB');
  });

  it('does not print "100.0" when rounding crosses 100', () => {
    expect(formatBytes(99.96 * 1024 ** 3)).toBe('100 GB');
  });

  it('counts small sizes in bytes', () => {
    expect(formatBytes(0)).toBe('0 bytes');
    expect(formatBytes(1)).toBe('1 byte');
    expect(formatBytes(1023)).toBe('1023 bytes');
  });

  it('says Unknown for missing or broken values', () => {
    expect(formatBytes(null)).toBe('Unknown');
    expect(formatBytes(undefined)).toBe('Unknown');
    expect(formatBytes(-1)).toBe('Unknown');
    expect(formatBytes(Number.NaN)).toBe('Unknown');
  });
});

describe('formatCores', () => {
  it('shows cores and threads', () => {
    expect(formatCores(8, 16)).toBe('8 cores, 16 threads');
    expect(formatCores(1, 1)).toBe('1 core, 1 thread');
  });

  it('shows only threads when physical cores are unknown', () => {
    expect(formatCores(null, 2)).toBe('2 threads');
  });
});

describe('small helpers', () => {
  it('yesNo', () => {
    expect(yesNo(true)).toBe('Yes');
    expect(yesNo(false)).toBe('No');
  });

  it('percent', () => {
    expect(percent(1, 4)).toBe(25);
    expect(percent(5, 0)).toBe(0);
    expect(percent(10, 5)).toBe(100);
  });
});

describe('formatTimeLeft', () => {
  it('says time left the way people do', () => {
    expect(formatTimeLeft(null)).toBe('');
    expect(formatTimeLeft(1200)).toBe('a few seconds left');
    expect(formatTimeLeft(23_000)).toBe('about 25 seconds left');
    expect(formatTimeLeft(80_000)).toBe('about a minute left');
    expect(formatTimeLeft(300_000)).toBe('about 5 minutes left');
  });
});

describe('dayStart', () => {
  it('reads a date input as local midnight', () => {
    expect(dayStart('2025-03-12')).toBe(new Date(2025, 2, 12).getTime());
    expect(dayStart('')).toBeNull();
    expect(dayStart('12/03/2025')).toBeNull();
  });
});
