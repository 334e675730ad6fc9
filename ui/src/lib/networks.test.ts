import { describe, expect, it } from 'vitest';
import { addNetwork, formatWeight, hasNetwork, hasNetworks, loraTag, networkValue, parseNetworkValue } from './networks';

describe('LoRA tags', () => {
  it('write the weight with at most two decimals', () => {
    expect(loraTag('detail')).toBe('<lora:detail:0.8>');
    expect(loraTag('detail', 1)).toBe('<lora:detail:1>');
    expect(loraTag('detail', 0.755)).toBe('<lora:detail:0.76>');
    expect(formatWeight(0.5)).toBe('0.5');
    expect(formatWeight(Number.NaN)).toBe('0.8');
  });
});

describe('addNetwork', () => {
  it('appends a LoRA after a space', () => {
    expect(addNetwork('a cat', 'lora', 'detail')).toBe('a cat <lora:detail:0.8>');
    expect(addNetwork('a cat,  ', 'lora', 'detail')).toBe('a cat, <lora:detail:0.8>');
    expect(addNetwork('', 'lora', 'detail')).toBe('<lora:detail:0.8>');
    expect(addNetwork('   ', 'lora', 'detail')).toBe('<lora:detail:0.8>');
  });

  it('appends an embedding as a new comma-separated phrase', () => {
    expect(addNetwork('a cat', 'embedding', 'EasyNegative')).toBe('a cat, EasyNegative');
    expect(addNetwork('a cat, ', 'embedding', 'EasyNegative')).toBe('a cat, EasyNegative');
    expect(addNetwork('', 'embedding', 'EasyNegative')).toBe('EasyNegative');
  });

  it('does not add what is already there', () => {
    expect(addNetwork('a cat <lora:detail:0.5>', 'lora', 'detail')).toBe('a cat <lora:detail:0.5>');
    expect(addNetwork('a cat, easynegative', 'embedding', 'EasyNegative')).toBe('a cat, easynegative');
    // A longer name that starts the same is another network.
    expect(addNetwork('a cat <lora:detail-xl:1>', 'lora', 'detail')).toBe('a cat <lora:detail-xl:1> <lora:detail:0.8>');
    expect(addNetwork('a cat, EasyNegativeV2', 'embedding', 'EasyNegative')).toBe('a cat, EasyNegativeV2, EasyNegative');
  });

  it('treats names with special characters literally', () => {
    expect(hasNetwork('x <lora:a.b:1>', 'lora', 'a.b')).toBe(true);
    expect(hasNetwork('x <lora:aXb:1>', 'lora', 'a.b')).toBe(false);
    expect(addNetwork('x', 'lora', '')).toBe('x');
  });
});

describe('network lists and select values', () => {
  it('say whether there is anything to offer', () => {
    expect(hasNetworks(null)).toBe(false);
    expect(hasNetworks({ loras: [], embeddings: [] })).toBe(false);
    expect(hasNetworks({ loras: [], embeddings: [{ name: 'e', path: '/e', size_bytes: 1 }] })).toBe(true);
  });

  it('round-trip a select value, names with colons included', () => {
    expect(parseNetworkValue(networkValue('lora', 'a:b'))).toEqual({ kind: 'lora', name: 'a:b' });
    expect(parseNetworkValue(networkValue('embedding', 'neg'))).toEqual({ kind: 'embedding', name: 'neg' });
    expect(parseNetworkValue('')).toBeNull();
    expect(parseNetworkValue('other:x')).toBeNull();
    expect(parseNetworkValue('lora:')).toBeNull();
  });
});
