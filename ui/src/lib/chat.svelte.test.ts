// The chat playground's state: typing a conversation, picking who is in the scene, and sending it
// to POST /api/v1/chat/illustrate (against a stand-in fetch; the browser test uses the real one).
import { afterEach, beforeEach, describe, expect, it, vi } from 'vitest';
import type { Character } from './api';

const mira: Character = { id: 'mira', name: 'Mira', appearance: 'red hair', style: null, negative_prompt: '', seed: null, model: null, avatar: null, eagerness: 'normal' };
const kai: Character = { ...mira, id: 'kai', name: 'Kai' };
let answer: { status: number; body: unknown };

beforeEach(() => {
  vi.resetModules();
  vi.stubGlobal('EventSource', class {
    addEventListener() {}
    close() {}
  });
  vi.stubGlobal(
    'fetch',
    vi.fn(async () => new Response(JSON.stringify(answer.body), { status: answer.status })),
  );
});
afterEach(() => vi.unstubAllGlobals());

describe('chat playground', () => {
  it('keeps the typed conversation and who is in the scene', async () => {
    const { chat } = await import('./chat.svelte');
    chat.add('  ');
    chat.add(' Hello ');
    chat.role = 'character';
    chat.add('*waves*');
    expect(chat.messages).toEqual([
      { role: 'user', text: 'Hello' },
      { role: 'character', text: '*waves*' },
    ]);
    chat.remove(0);
    expect(chat.messages).toEqual([{ role: 'character', text: '*waves*' }]);

    chat.toggle('mira');
    chat.toggle('kai');
    chat.toggle('mira');
    expect(chat.picked).toEqual(['kai']);
    chat.keepOnly([mira]);
    expect(chat.picked).toEqual([]);

    chat.clear();
    expect(chat.messages).toEqual([]);
  });

  it('sends the conversation, follows the job, and keeps the answer or the error', async () => {
    const { chat } = await import('./chat.svelte');
    const { generation } = await import('./generation.svelte');
    chat.picked = ['kai', 'gone', 'mira'];
    chat.add('Send me a selfie!');
    const job = { id: 'job-7', state: 'queued', images: [], created_at: 1, position: 1 };
    answer = { status: 202, body: { picture: true, mode: 'portrait', reason: 'Asked.', prompt: 'Kai, red hair', negative_prompt: '', writer: 'built_in', note: null, job } };
    await chat.illustrate([mira, kai]);

    const [url, init] = vi.mocked(fetch).mock.calls[0]!;
    expect(url).toBe('/api/v1/chat/illustrate');
    expect(JSON.parse(String(init?.body))).toEqual({
      messages: [{ role: 'user', text: 'Send me a selfie!' }],
      characters: ['kai', 'mira'],
      mode: 'auto',
    });
    expect(chat.result?.prompt).toBe('Kai, red hair');
    expect(generation.job('job-7')?.state).toBe('queued');
    expect(generation.currentId).toBeNull();
    expect(chat.busy).toBe(false);

    answer = { status: 404, body: { code: 'not_found', message: 'There is no character called x.', hint: null } };
    await chat.illustrate([mira]);
    expect(chat.result).toBeNull();
    expect(chat.error?.code).toBe('not_found');
  });
});
