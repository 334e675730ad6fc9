import { describe, expect, it, vi } from 'vitest';
import { ApiError, createApiClient, parseDownloadEvent, parseEvent, queryString, readSessionToken, SESSION_HEADER, toApiError } from './api';

type FetchArgs = Parameters<typeof fetch>;

function jsonResponse(status: number, body: unknown): Response {
  return new Response(JSON.stringify(body), {
    status,
    headers: { 'Content-Type': 'application/json' },
  });
}

/** A fetch stand-in that records calls and answers with `respond`. */
function fakeFetch(respond: (...args: FetchArgs) => Response | Promise<Response>) {
  return vi.fn<typeof fetch>(async (...args: FetchArgs) => respond(...args));
}

function headersOf(mock: ReturnType<typeof fakeFetch>, call = 0): Headers {
  return new Headers(mock.mock.calls[call]?.[1]?.headers);
}

async function caught(promise: Promise<unknown>): Promise<ApiError> {
  try {
    await promise;
  } catch (err) {
    expect(err).toBeInstanceOf(ApiError);
    return err as ApiError;
  }
  throw new Error('expected the request to fail');
}

describe('session token', () => {
  it('is sent as X-LD-Session on every request', async () => {
    const fetch = fakeFetch(() => jsonResponse(200, { status: 'ok', version: '0.1.0' }));
    const client = createApiClient({ token: 'tok-123', fetch });

    await client.health();
    await client.system();
    await client.settings();

    expect(fetch).toHaveBeenCalledTimes(3);
    for (let i = 0; i < 3; i++) expect(headersOf(fetch, i).get(SESSION_HEADER)).toBe('tok-123');
    expect(fetch.mock.calls.map((c) => c[0])).toEqual(['/api/v1/health', '/api/v1/system', '/api/v1/settings']);
  });

  it('is left out when the page has none', async () => {
    const fetch = fakeFetch(() => jsonResponse(200, {}));
    await createApiClient({ token: null, fetch }).health();
    expect(headersOf(fetch).has(SESSION_HEADER)).toBe(false);
  });

  it('is fetched again once when the server (restarted) refuses it', async () => {
    // Found by review: a tab opened before the server restarted kept the old token, and every
    // change failed with "Only the Local Diffusers window may do this".
    const fetch = fakeFetch((_, init) =>
      new Headers(init?.headers).get(SESSION_HEADER) === 'new'
        ? jsonResponse(200, { ok: true })
        : jsonResponse(401, { code: 'unauthorized', message: 'Only the Local Diffusers window may do this.', hint: '' }),
    );
    const refreshToken = vi.fn(async () => 'new');
    const client = createApiClient({ token: 'old', fetch, refreshToken });
    await client.settings();
    expect(fetch).toHaveBeenCalledTimes(2);
    expect(headersOf(fetch, 1).get(SESSION_HEADER)).toBe('new');
    // The new token stays in use.
    await client.settings();
    expect(refreshToken).toHaveBeenCalledTimes(1);
    expect(headersOf(fetch, 2).get(SESSION_HEADER)).toBe('new');
  });

  it('is not retried when the fetched token is the same one', async () => {
    const fetch = fakeFetch(() => jsonResponse(401, { code: 'unauthorized', message: 'no', hint: '' }));
    const client = createApiClient({ token: 'same', fetch, refreshToken: async () => 'same' });
    expect((await caught(client.settings())).code).toBe('unauthorized');
    expect(fetch).toHaveBeenCalledTimes(1);
  });

  it('is read from the meta tag the server injects', () => {
    const doc = {
      querySelector: (selector: string) =>
        selector === 'meta[name="ld-session"]' ? ({ content: ' abc ' } as HTMLMetaElement) : null,
    } as Pick<Document, 'querySelector'>;
    expect(readSessionToken(doc)).toBe('abc');
    expect(readSessionToken({ querySelector: () => null } as Pick<Document, 'querySelector'>)).toBeNull();
    expect(readSessionToken(undefined)).toBeNull();
  });
});

describe('successful answers', () => {
  it('are parsed as JSON', async () => {
    const fetch = fakeFetch(() => jsonResponse(200, { status: 'ok', version: '0.1.0' }));
    await expect(createApiClient({ fetch }).health()).resolves.toEqual({ status: 'ok', version: '0.1.0' });
  });

  it('that are not JSON become bad_response', async () => {
    const fetch = fakeFetch(() => new Response('<html>proxy</html>', { status: 200 }));
    const err = await caught(createApiClient({ fetch }).health());
    expect(err.code).toBe('bad_response');
    expect(err.status).toBe(200);
  });

  it('send a JSON body with its content type', async () => {
    const fetch = fakeFetch(() => new Response(null, { status: 204 }));
    await createApiClient({ fetch }).request('POST', '/api/v1/x', { body: { a: 1 } });
    expect(fetch.mock.calls[0]?.[1]?.body).toBe('{"a":1}');
    expect(headersOf(fetch).get('Content-Type')).toBe('application/json');
  });
});

describe('error answers', () => {
  it('are parsed into ApiError with code, message, hint and status', async () => {
    const fetch = fakeFetch(() =>
      jsonResponse(401, {
        code: 'unauthorized',
        message: 'This page is not allowed to change settings.',
        hint: 'Reload the page.',
      }),
    );
    const err = await caught(createApiClient({ fetch }).settings());
    expect(err.code).toBe('unauthorized');
    expect(err.message).toBe('This page is not allowed to change settings.');
    expect(err.hint).toBe('Reload the page.');
    expect(err.status).toBe(401);
  });

  it('keep every code of the server enum', async () => {
    for (const code of ['model_missing', 'out_of_memory', 'busy', 'cancelled', 'invalid_request'] as const) {
      const fetch = fakeFetch(() => jsonResponse(409, { code, message: 'm', hint: 'h' }));
      expect((await caught(createApiClient({ fetch }).health())).code).toBe(code);
    }
  });

  it('without a hint have hint null', async () => {
    const fetch = fakeFetch(() => jsonResponse(500, { code: 'internal', message: 'Oops.' }));
    const err = await caught(createApiClient({ fetch }).health());
    expect(err.hint).toBeNull();
  });

  it('with a code this UI does not know fall back to the HTTP status', async () => {
    const fetch = fakeFetch(() => jsonResponse(429, { code: 'something_new', message: 'Slow down.', hint: null }));
    const err = await caught(createApiClient({ fetch }).health());
    expect(err.code).toBe('busy');
    expect(err.message).toBe('Slow down.');
  });

  it('that are not JSON still give a friendly error by status', async () => {
    const fetch = fakeFetch(() => new Response('Not Found', { status: 404 }));
    const err = await caught(createApiClient({ fetch }).system());
    expect(err.code).toBe('not_found');
    expect(err.message).toContain('404');
    expect(err.hint).not.toBeNull();
  });
});

describe('network failures', () => {
  it('become a friendly network error', async () => {
    const fetch = fakeFetch(() => {
      throw new TypeError('Failed to fetch');
    });
    const err = await caught(createApiClient({ fetch }).health());
    expect(err.code).toBe('network');
    expect(err.status).toBeNull();
    expect(err.message).toBe('Can’t reach Local Diffusers.');
    expect(err.message).not.toContain('Failed to fetch');
    expect(err.hint).toMatch(/running/);
  });

  it('caused by aborting become cancelled', async () => {
    const fetch = fakeFetch(() => {
      throw new DOMException('The operation was aborted.', 'AbortError');
    });
    expect((await caught(createApiClient({ fetch }).health())).code).toBe('cancelled');
  });
});

describe('toApiError', () => {
  it('passes ApiError through and wraps anything else', () => {
    const original = new ApiError('busy', 'm', null, 429);
    expect(toApiError(original)).toBe(original);
    const wrapped = toApiError(new Error('boom'));
    expect(wrapped.code).toBe('internal');
    expect(wrapped.message).not.toContain('boom');
  });
});

describe('native API methods', () => {
  it('build image queries from the set filters only', () => {
    expect(queryString({})).toBe('');
    expect(queryString({ search: 'a cat', favourites: true, trash: false, model: '', offset: 0, limit: 60 })).toBe(
      '?search=a+cat&favourites=true&offset=0&limit=60',
    );
  });

  it('send PNG bytes and TOML text as they are, with their content type', async () => {
    const fetch = fakeFetch(() => jsonResponse(200, { source: 'none' }));
    const client = createApiClient({ token: 't', fetch });
    const png = new Uint8Array([137, 80, 78, 71]).buffer;
    await client.inspect(png);
    expect(fetch.mock.calls[0]?.[0]).toBe('/api/v1/images/inspect');
    expect(fetch.mock.calls[0]?.[1]?.body).toBe(png);
    expect(headersOf(fetch).get('Content-Type')).toBe('image/png');
    await client.importPreset('name = "x"');
    expect(fetch.mock.calls[1]?.[1]?.body).toBe('name = "x"');
    expect(headersOf(fetch, 1).get('Content-Type')).toBe('application/toml');
    expect(headersOf(fetch, 1).get(SESSION_HEADER)).toBe('t');
  });

  it('use the right method and path for each action', async () => {
    const fetch = fakeFetch(() => jsonResponse(200, {}));
    const c = createApiClient({ fetch });
    await c.createJob({ prompt: 'x' });
    await c.cancelJob('job 1');
    await c.setFavourite(3, true);
    await c.trashImage(3);
    await c.restoreImage(3);
    await c.emptyTrash();
    await c.updatePreset('mine', { name: 'n' } as never);
    await c.deletePreset('mine');
    await c.saveSettings({} as never);
    expect(fetch.mock.calls.map((call) => `${call[1]?.method} ${call[0]}`)).toEqual([
      'POST /api/v1/jobs',
      'POST /api/v1/jobs/job%201/cancel',
      'PUT /api/v1/images/3/favourite',
      'DELETE /api/v1/images/3',
      'POST /api/v1/images/3/restore',
      'DELETE /api/v1/trash',
      'PUT /api/v1/presets/mine',
      'DELETE /api/v1/presets/mine',
      'PUT /api/v1/settings',
    ]);
    expect(fetch.mock.calls[2]?.[1]?.body).toBe('{"favourite":true}');
  });

  it('call the character and chat routes', async () => {
    const fetch = fakeFetch(() => jsonResponse(200, {}));
    const c = createApiClient({ token: 't', fetch });
    const mira = { name: 'Mira', appearance: 'red hair', style: null, negative_prompt: '', seed: null, model: null, avatar: null, eagerness: 'normal' as const };
    await c.characters();
    await c.character('mira');
    await c.createCharacter(mira);
    await c.updateCharacter('mi ra', { ...mira, avatar: 4 });
    await c.deleteCharacter('mira');
    await c.portrait('mira', { width: 64, height: 64, steps: 2 });
    await c.portrait('mira');
    await c.illustrate({ messages: [{ role: 'user', text: 'Send me a selfie!' }], characters: ['mira'], mode: 'auto' });
    expect(fetch.mock.calls.map((call) => `${call[1]?.method} ${call[0]}`)).toEqual([
      'GET /api/v1/characters',
      'GET /api/v1/characters/mira',
      'POST /api/v1/characters',
      'PUT /api/v1/characters/mi%20ra',
      'DELETE /api/v1/characters/mira',
      'POST /api/v1/characters/mira/portrait',
      'POST /api/v1/characters/mira/portrait',
      'POST /api/v1/chat/illustrate',
    ]);
    expect(JSON.parse(String(fetch.mock.calls[3]?.[1]?.body))).toMatchObject({ name: 'Mira', avatar: 4 });
    expect(fetch.mock.calls[5]?.[1]?.body).toBe('{"width":64,"height":64,"steps":2}');
    expect(fetch.mock.calls[6]?.[1]?.body).toBe('{}');
    expect(JSON.parse(String(fetch.mock.calls[7]?.[1]?.body))).toEqual({
      messages: [{ role: 'user', text: 'Send me a selfie!' }],
      characters: ['mira'],
      mode: 'auto',
    });
    for (let i = 0; i < 8; i++) expect(headersOf(fetch, i).get(SESSION_HEADER)).toBe('t');
    expect(c.characterExportUrl('mi ra')).toBe('/api/v1/characters/mi%20ra/export');
  });

  it('import a character card as the bytes given, with their type', async () => {
    const fetch = fakeFetch(() => jsonResponse(200, { id: 'seraphina', name: 'Seraphina' }));
    const c = createApiClient({ token: 't', fetch });
    const png = new Uint8Array([137, 80, 78, 71]).buffer;
    expect(await c.importCharacter(png, 'image/png')).toMatchObject({ id: 'seraphina' });
    expect(fetch.mock.calls[0]?.[0]).toBe('/api/v1/characters/import');
    expect(fetch.mock.calls[0]?.[1]?.method).toBe('POST');
    expect(fetch.mock.calls[0]?.[1]?.body).toBe(png);
    expect(headersOf(fetch).get('Content-Type')).toBe('image/png');
  });

  it('take both answers of illustrate: a queued picture (202) and "no picture" (200)', async () => {
    const none = { picture: false, mode: null, reason: 'Nobody asked for a picture.', prompt: null, negative_prompt: null, writer: null, note: null, job: null };
    const fetch = fakeFetch(() => jsonResponse(200, none));
    expect(await createApiClient({ fetch }).illustrate({ messages: [{ role: 'user', text: 'How are you?' }] })).toEqual(none);
    const queued = { ...none, picture: true, mode: 'portrait', reason: 'Asked for.', prompt: 'portrait, Mira', writer: 'built_in', job: { id: 'job-1' } };
    const fetch2 = fakeFetch(() => jsonResponse(202, queued));
    expect((await createApiClient({ fetch: fetch2 }).illustrate({ messages: [] })).job?.id).toBe('job-1');
  });

  it('rename the sampler and schedule lists to one shape', async () => {
    const fetch = fakeFetch((url) =>
      jsonResponse(200, String(url).endsWith('samplers') ? { samplers: ['Euler'], default: 'Euler' } : { schedules: ['Karras'], default: 'Karras' }),
    );
    const c = createApiClient({ fetch });
    expect(await c.samplers()).toEqual({ names: ['Euler'], default: 'Euler' });
    expect(await c.schedules()).toEqual({ names: ['Karras'], default: 'Karras' });
  });
});

describe('models, catalog and downloads', () => {
  it('use the right method, path and body', async () => {
    const fetch = fakeFetch(() => jsonResponse(200, {}));
    const c = createApiClient({ token: 't', fetch });
    await c.catalog();
    await c.setup();
    await c.downloads();
    await c.startDownload('sd-1.5');
    await c.cancelDownload('sd 1.5');
    await c.deleteModel('my model/x');
    await c.selfTest();
    await c.convertModel('old one');
    await c.hashModel('mini');
    expect(fetch.mock.calls.map((call) => `${call[1]?.method} ${call[0]}`)).toEqual([
      'GET /api/v1/catalog',
      'GET /api/v1/setup',
      'GET /api/v1/downloads',
      'POST /api/v1/downloads',
      'POST /api/v1/downloads/sd%201.5/cancel',
      'DELETE /api/v1/models/my%20model%2Fx',
      'POST /api/v1/diagnostics/self-test',
      'POST /api/v1/models/convert',
      'POST /api/v1/models/hash',
    ]);
    expect(fetch.mock.calls[3]?.[1]?.body).toBe('{"id":"sd-1.5"}');
    expect(fetch.mock.calls[7]?.[1]?.body).toBe('{"name":"old one"}');
    expect(headersOf(fetch, 7).get(SESSION_HEADER)).toBe('t');
    for (let i = 3; i < 7; i++) expect(headersOf(fetch, i).get(SESSION_HEADER)).toBe('t');
  });

  it('list the LoRAs and embeddings', async () => {
    const list = { loras: [{ name: 'detail', path: '/m/loras/detail.safetensors', size_bytes: 10 }], embeddings: [] };
    const fetch = fakeFetch(() => jsonResponse(200, list));
    expect(await createApiClient({ token: 't', fetch }).networks()).toEqual(list);
    expect(fetch.mock.calls[0]?.[0]).toBe('/api/v1/networks');
    expect(fetch.mock.calls[0]?.[1]?.method).toBe('GET');
    expect(headersOf(fetch).get(SESSION_HEADER)).toBe('t');
  });

  it('a refused delete of the user’s own model keeps the server’s words', async () => {
    const message = "'mine' is in a folder you added (/m); Local Diffusers only deletes models it downloaded.";
    const fetch = fakeFetch(() => jsonResponse(403, { code: 'forbidden', message, hint: 'Delete it with your file manager.' }));
    const err = await caught(createApiClient({ fetch }).deleteModel('mine'));
    expect([err.code, err.status, err.message, err.hint]).toEqual(['forbidden', 403, message, 'Delete it with your file manager.']);
  });

  it('a server without the self-test answers not_found', async () => {
    const fetch = fakeFetch(() => jsonResponse(404, { code: 'not_found', message: 'There is nothing at this address.', hint: null }));
    const err = await caught(createApiClient({ fetch }).selfTest());
    expect(err.code).toBe('not_found');
  });
});

describe('event stream', () => {
  function fakeSource() {
    const listeners = new Map<string, (e: MessageEvent) => void>();
    const source = {
      url: '',
      closed: false,
      onerror: null as ((e: Event) => void) | null,
      onopen: null as ((e: Event) => void) | null,
      addEventListener: (type: string, fn: (e: MessageEvent) => void) => listeners.set(type, fn),
      close() {
        source.closed = true;
      },
      emit: (type: string, data: string) => listeners.get(type)?.({ data } as MessageEvent),
    };
    return source;
  }

  it('delivers typed events, reports (re)connection, and closes', () => {
    const source = fakeSource();
    const events: unknown[] = [];
    let opened = 0;
    const close = createApiClient({
      eventSource: (url) => {
        source.url = url;
        return source;
      },
    }).events({ onEvent: (e) => events.push(e), onOpen: () => opened++ });
    expect(source.url).toBe('/api/v1/events');
    source.onopen?.(new Event('open'));
    source.emit('progress', JSON.stringify({ type: 'progress', job: 'job-1', step: 3 }));
    source.emit('done', '{"job":"job-1","images":[4]}');
    source.emit('done', 'not json');
    expect(events).toEqual([
      { type: 'progress', job: 'job-1', step: 3 },
      { type: 'done', job: 'job-1', images: [4] },
    ]);
    expect(opened).toBe(1);
    close();
    expect(source.closed).toBe(true);
  });

  it('hands download events to onDownload, not to onEvent', () => {
    const source = fakeSource();
    const events: unknown[] = [];
    const downloads: unknown[] = [];
    createApiClient({ eventSource: () => source }).events({ onEvent: (e) => events.push(e), onDownload: (d) => downloads.push(d) });
    // What ld-server sends: the DownloadInfo plus "type": "download".
    const progress = { file: 'unet/x.safetensors', files_done: 1, files_total: 4, bytes_done: 10, bytes_total: 40 };
    source.emit('download', JSON.stringify({ id: 'sd-turbo', name: 'SD Turbo', state: 'downloading', progress, error: null, type: 'download' }));
    source.emit('download', '{"id":"sd-1.5","state":"failed","error":"the server answered 500"}');
    source.emit('download', '{"state":"done"}');
    expect(events).toEqual([]);
    expect(downloads).toEqual([
      { id: 'sd-turbo', name: 'SD Turbo', state: 'downloading', progress, error: null },
      { id: 'sd-1.5', name: 'sd-1.5', state: 'failed', progress: null, error: 'the server answered 500' },
    ]);
  });

  it('parseDownloadEvent refuses anything without an id and a state', () => {
    expect(parseDownloadEvent('{"state":"done"}')).toBeNull();
    expect(parseDownloadEvent('{"id":"x"}')).toBeNull();
    expect(parseDownloadEvent('nope')).toBeNull();
    expect(parseDownloadEvent(null)).toBeNull();
  });

  it('parseEvent refuses anything without a job id', () => {
    expect(parseEvent('done', '{"images":[]}')).toBeNull();
    expect(parseEvent('done', 42)).toBeNull();
  });
});
