import { describe, expect, it } from 'vitest';
import { barState } from './progress';

describe('barState', () => {
  it('is done only for finished work', () => {
    expect(barState('done')).toBe('done');
  });
  it('greys out failed and cancelled work', () => {
    expect(barState('failed')).toBe('stopped');
    expect(barState('cancelled')).toBe('stopped');
  });
  it('treats every other state as still running', () => {
    for (const s of ['queued', 'running', 'downloading', 'verifying']) expect(barState(s)).toBe('running');
  });
});
