// Adding a LoRA or an embedding (GET /api/v1/networks) to a prompt. LoRAs are written as
// A1111-style tags, `<lora:NAME:0.8>`; an embedding is used by writing its name.

import type { NetworkList } from './api';

export type NetworkKind = 'lora' | 'embedding';

/** The weight a new LoRA tag gets. */
export const DEFAULT_LORA_WEIGHT = 0.8;

/** A weight as the tag writes it: at most two decimals, no trailing zeros ("0.8", "1", "0.75"). */
export function formatWeight(w: number): string {
  const n = Number.isFinite(w) ? Math.round(w * 100) / 100 : DEFAULT_LORA_WEIGHT;
  return String(n);
}

export function loraTag(name: string, weight = DEFAULT_LORA_WEIGHT): string {
  return `<lora:${name}:${formatWeight(weight)}>`;
}

function escapeRegExp(s: string): string {
  return s.replace(/[.*+?^${}()|[\]\\]/g, '\\$&');
}

/** Whether the prompt already uses this LoRA (at any weight) or this embedding (as a whole word). */
export function hasNetwork(prompt: string, kind: NetworkKind, name: string): boolean {
  const n = escapeRegExp(name);
  const re = kind === 'lora' ? new RegExp(`<lora:${n}(:[^>]*)?>`, 'i') : new RegExp(`(^|[^\\w-])${n}($|[^\\w-])`, 'i');
  return re.test(prompt);
}

/**
 * The prompt with a LoRA tag or an embedding's name added at the end: a LoRA after a space, an
 * embedding after a comma (prompts are comma-separated phrases). Unchanged when it is already there.
 */
export function addNetwork(prompt: string, kind: NetworkKind, name: string, weight = DEFAULT_LORA_WEIGHT): string {
  if (name.trim() === '' || hasNetwork(prompt, kind, name)) return prompt;
  const token = kind === 'lora' ? loraTag(name, weight) : name;
  const text = prompt.trimEnd();
  if (text === '') return token;
  if (kind === 'lora' || text.endsWith(',')) return `${text} ${token}`;
  return `${text}, ${token}`;
}

/** Whether there is anything to offer. */
export function hasNetworks(list: NetworkList | null): boolean {
  return !!list && (list.loras.length > 0 || list.embeddings.length > 0);
}

/** A select's value for a network ("lora:NAME"), and back. */
export function networkValue(kind: NetworkKind, name: string): string {
  return `${kind}:${name}`;
}

export function parseNetworkValue(value: string): { kind: NetworkKind; name: string } | null {
  const i = value.indexOf(':');
  if (i < 0) return null;
  const kind = value.slice(0, i);
  const name = value.slice(i + 1);
  if ((kind !== 'lora' && kind !== 'embedding') || name === '') return null;
  return { kind, name };
}
