import { describe, expect, it } from 'vitest';
import type { Character } from './api';
import {
  blankForm,
  EAGERNESS,
  eagernessWord,
  formOf,
  illustrateRequest,
  importType,
  initial,
  inputOf,
  MODES,
  modeLabel,
  namesCharacter,
  withAvatar,
  writerLabel,
} from './characters';

const mira: Character = {
  id: 'mira',
  name: 'Mira',
  appearance: 'young woman, red hair',
  style: 'portrait',
  negative_prompt: 'hat',
  seed: 42,
  model: 'tiny-sd1',
  avatar: 7,
  eagerness: 'high',
};

describe('the character form', () => {
  it('round-trips a character, keeping its avatar', () => {
    const form = formOf(mira);
    expect(form.seed).toBe('42');
    const { id: _id, ...rest } = mira;
    expect(inputOf(form, mira.avatar)).toEqual({ input: rest });
  });

  it('sends empty choices as null (the server’s defaults) and trims the text', () => {
    const form = { ...blankForm(), name: '  Kai ', appearance: ' tall man\n' };
    expect(inputOf(form)).toEqual({
      input: { name: 'Kai', appearance: 'tall man', style: null, negative_prompt: '', seed: null, model: null, avatar: null, eagerness: 'normal' },
    });
  });

  it('refuses a missing name and a seed that is not a whole number', () => {
    expect(inputOf(blankForm())).toEqual({ problem: 'Give the character a name.' });
    for (const seed of ['-1', '1.5', 'abc', '1e3', '99999999999999999999']) {
      expect(inputOf({ ...blankForm(), name: 'A', seed }), seed).toHaveProperty('problem');
    }
    expect(inputOf({ ...blankForm(), name: 'A', seed: ' 0 ' })).toMatchObject({ input: { seed: 0 } });
    // A number input can hand over a number rather than text.
    expect(inputOf({ ...blankForm(), name: 'A', seed: 12 as unknown as string })).toMatchObject({ input: { seed: 12 } });
  });

  it('sets the avatar without the id', () => {
    expect(withAvatar(mira, 9)).toEqual({ ...mira, id: undefined, avatar: 9 });
    expect('id' in withAvatar(mira, 9)).toBe(false);
  });
});

describe('portraits of a character', () => {
  it('are pictures whose prompt names the character as a whole word', () => {
    expect(namesCharacter('Eve, young woman, red hair, portrait', 'Eve')).toBe(true);
    expect(namesCharacter('portrait of eve in the rain', 'Eve')).toBe(true);
    expect(namesCharacter('a quiet evening by the sea', 'Eve')).toBe(false);
    expect(namesCharacter('never again', 'Eve')).toBe(false);
    expect(namesCharacter('(Eve:1.2) smiling', 'Eve')).toBe(true);
    expect(namesCharacter('Zoë, silver hair', 'Zoë')).toBe(true);
    expect(namesCharacter('Zoëlle', 'Zoë')).toBe(false);
    // Names with signs a pattern would read otherwise.
    expect(namesCharacter('R2-D2 (droid), blue', 'R2-D2 (droid)')).toBe(true);
    expect(namesCharacter('anything', '  ')).toBe(false);
  });
});

describe('labels', () => {
  it('name every eagerness and mode the server knows, in plain words', () => {
    expect(EAGERNESS.map((e) => e.id)).toEqual(['off', 'low', 'normal', 'high']);
    for (const e of EAGERNESS) expect(eagernessWord(e.id)).not.toBe('');
    expect(MODES.map((m) => m.id)).toEqual(['auto', 'portrait', 'user', 'scene', 'last_message', 'background']);
    expect(modeLabel('scene')).toBe('The whole scene');
    expect(modeLabel(null)).toBe('None');
  });

  it('say who wrote the prompt, and when the chat server failed', () => {
    expect(writerLabel({ writer: 'chat_server', note: null })).toBe('Your chat server');
    expect(writerLabel({ writer: 'built_in', note: null })).toBe('The built-in writer');
    expect(writerLabel({ writer: 'built_in', note: 'timed out' })).toMatch(/chat server failed/);
    expect(writerLabel({ writer: null, note: null })).toBe('—');
  });

  it('give a letter for a character without an avatar', () => {
    expect(initial(' mira')).toBe('M');
    expect(initial('')).toBe('?');
    expect(initial('émile')).toBe('É');
  });
});

describe('importType', () => {
  it('tells cards (PNG) from character files (JSON) by type or name', () => {
    expect(importType({ name: 'card.PNG', type: '' })).toBe('image/png');
    expect(importType({ name: 'x', type: 'image/png' })).toBe('image/png');
    expect(importType({ name: 'mira.json', type: '' })).toBe('application/json');
    expect(importType({ name: 'notes.txt', type: 'text/plain' })).toBeNull();
  });
});

describe('illustrateRequest', () => {
  it('names the speakers as a chat app would and lists the characters by id', () => {
    const kai = { ...mira, id: 'kai', name: 'Kai' };
    const req = illustrateRequest(
      [
        { role: 'user', text: ' Send me a selfie! ' },
        { role: 'character', text: '*smiles*' },
        { role: 'user', text: '   ' },
      ],
      [mira, kai],
      'auto',
      ' Sam ',
    );
    expect(req).toEqual({
      messages: [
        { role: 'user', name: 'Sam', text: 'Send me a selfie!' },
        { role: 'character', name: 'Mira', text: '*smiles*' },
      ],
      characters: ['mira', 'kai'],
      mode: 'auto',
      user: 'Sam',
    });
  });

  it('leaves names out when nobody is named', () => {
    const req = illustrateRequest([{ role: 'user', text: 'hi' }, { role: 'character', text: 'hello' }], [], 'scene');
    expect(req).toEqual({ messages: [{ role: 'user', text: 'hi' }, { role: 'character', text: 'hello' }], characters: [], mode: 'scene' });
  });
});
