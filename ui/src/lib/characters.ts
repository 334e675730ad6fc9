// Helpers of the Characters page and its chat playground: the character form (to and from what
// the server takes), plain-language labels for eagerness and picture modes, the file types an
// import accepts, and the chat request built from the typed conversation. Plain functions, unit
// tested; the page holds the state.

import type {
  Character,
  CharacterInput,
  ChatMessage,
  Eagerness,
  IllustrateMode,
  IllustrateRequest,
  Illustrated,
} from './api';

/** Eagerness choices, in the order of the select, with what each means in a chat. */
export const EAGERNESS: { id: Eagerness; label: string }[] = [
  { id: 'off', label: 'Never on its own' },
  { id: 'low', label: 'Only when asked for one' },
  { id: 'normal', label: 'When asked, or at visual moments' },
  { id: 'high', label: 'Often, at descriptive moments too' },
];

/** Short words for a chip on the character's card. */
export function eagernessWord(e: Eagerness): string {
  switch (e) {
    case 'off':
      return 'Draws only when asked for a portrait';
    case 'low':
      return 'Draws when asked';
    case 'normal':
      return 'Draws when asked or at visual moments';
    case 'high':
      return 'Draws often';
  }
}

/** Picture modes of the chat playground, named as chat users know them (SillyTavern's menu). */
export const MODES: { id: IllustrateMode; label: string }[] = [
  { id: 'auto', label: 'Automatic: when the chat calls for one' },
  { id: 'portrait', label: 'The character (“yourself”)' },
  { id: 'user', label: 'You (“me”)' },
  { id: 'scene', label: 'The whole scene' },
  { id: 'last_message', label: 'The last message' },
  { id: 'background', label: 'The place, without people' },
];

export function modeLabel(mode: IllustrateMode | null): string {
  return MODES.find((m) => m.id === mode)?.label ?? 'None';
}

/** The form's fields; the seed is text so it can be empty. */
export interface CharacterForm {
  name: string;
  appearance: string;
  /** '' : the default style (Portrait for portraits, Scene for scenes). */
  style: string;
  negative_prompt: string;
  /** '' : a new face each time. */
  seed: string;
  /** '' : the default model. */
  model: string;
  eagerness: Eagerness;
}

export function blankForm(): CharacterForm {
  return { name: '', appearance: '', style: '', negative_prompt: '', seed: '', model: '', eagerness: 'normal' };
}

export function formOf(c: Character): CharacterForm {
  return {
    name: c.name,
    appearance: c.appearance,
    style: c.style ?? '',
    negative_prompt: c.negative_prompt,
    seed: c.seed === null ? '' : String(c.seed),
    model: c.model ?? '',
    eagerness: c.eagerness,
  };
}

/** Largest seed the server keeps (u64 in Rust, but a JS number is exact only up to 2^53). */
const MAX_SEED = Number.MAX_SAFE_INTEGER;

/**
 * The character to send, or the problem with the form in plain words. The avatar is carried over
 * from the character being edited (the form does not change it).
 */
export function inputOf(form: CharacterForm, avatar: number | null = null): { input: CharacterInput } | { problem: string } {
  const name = form.name.trim();
  if (name === '') return { problem: 'Give the character a name.' };
  const seedText = String(form.seed ?? '').trim();
  let seed: number | null = null;
  if (seedText !== '') {
    const n = Number(seedText);
    if (!/^\d+$/.test(seedText) || !Number.isSafeInteger(n) || n > MAX_SEED) {
      return { problem: 'The seed is a whole number of 0 or more; leave it empty for a new face each time.' };
    }
    seed = n;
  }
  return {
    input: {
      name,
      appearance: form.appearance.trim(),
      style: form.style || null,
      negative_prompt: form.negative_prompt.trim(),
      seed,
      model: form.model || null,
      avatar,
      eagerness: form.eagerness,
    },
  };
}

/** The character with a new avatar, as PUT takes it. */
export function withAvatar(c: Character, avatar: number | null): CharacterInput {
  const { id: _id, ...rest } = c;
  return { ...rest, avatar };
}

/** What the import file picker offers. */
export const IMPORT_ACCEPT = '.png,.json,image/png,application/json';

/** The content type to send an imported file with; null when it is neither PNG nor JSON. */
export function importType(file: Pick<File, 'name' | 'type'>): string | null {
  const name = file.name.toLowerCase();
  if (file.type === 'image/png' || name.endsWith('.png')) return 'image/png';
  if (file.type === 'application/json' || name.endsWith('.json')) return 'application/json';
  return null;
}

/**
 * Whether `prompt` names `name` as a whole word (any case): the gallery's search matches any part
 * of a word, so "Eve" also found "evening" and "never" (found by review).
 */
export function namesCharacter(prompt: string, name: string): boolean {
  const wanted = name.trim();
  if (wanted === '') return false;
  const escaped = wanted.replace(/[.*+?^${}()|[\]\\]/g, '\\$&');
  return new RegExp(`(^|[^\\p{L}\\p{N}_])${escaped}($|[^\\p{L}\\p{N}_])`, 'iu').test(prompt);
}

/** "Mira" -> "M": the placeholder of a character without an avatar. */
export function initial(name: string): string {
  const first = [...name.trim()][0];
  return first ? first.toUpperCase() : '?';
}

/** One typed line of the playground's conversation. */
export interface PlaygroundMessage {
  role: 'user' | 'character';
  text: string;
}

/**
 * The chat request for the playground's conversation: the character's messages carry the first
 * picked character's name (as a chat app would send them); "You" messages carry the user's name
 * when one is given.
 */
export function illustrateRequest(
  messages: PlaygroundMessage[],
  characters: Character[],
  mode: IllustrateMode,
  userName = '',
): IllustrateRequest {
  const speaker = characters[0]?.name;
  const you = userName.trim();
  const sent: ChatMessage[] = messages
    .filter((m) => m.text.trim() !== '')
    .map((m) => {
      const name = m.role === 'character' ? speaker : you || undefined;
      return name ? { role: m.role, name, text: m.text.trim() } : { role: m.role, text: m.text.trim() };
    });
  const req: IllustrateRequest = { messages: sent, characters: characters.map((c) => c.id), mode };
  if (you) req.user = you;
  return req;
}

/** Who wrote the prompt, in words. */
export function writerLabel(r: Pick<Illustrated, 'writer' | 'note'>): string {
  if (r.writer === 'chat_server') return 'Your chat server';
  if (r.writer === 'built_in') return r.note ? 'The built-in writer (the chat server failed)' : 'The built-in writer';
  return '—';
}
