// The shared download state: events and answers applied, speed measured, a finished download
// reloading the installed models. Against a stand-in fetch (the real server: tests/browser/models).
import { afterEach, beforeEach, describe, expect, it, vi } from 'vitest';
import type { DownloadInfo } from './api';

const MB = 1024 * 1024;
let calls: string[];
let listed: DownloadInfo[];

function info(over: Partial<DownloadInfo> = {}): DownloadInfo {
  return { id: 'sd-turbo', name: 'SD Turbo', state: 'downloading', progress: null, error: null, ...over };
}
function at(bytes: number) {
  return { file: 'unet/w.safetensors', files_done: 1, files_total: 3, bytes_done: bytes, bytes_total: 100 * MB };
}

beforeEach(() => {
  vi.resetModules();
  calls = [];
  listed = [];
  vi.stubGlobal(
    'fetch',
    vi.fn(async (url: string, init?: RequestInit) => {
      calls.push(`${init?.method} ${url}`);
      if (url === '/api/v1/downloads' && init?.method === 'GET') return new Response(JSON.stringify(listed));
      if (url === '/api/v1/downloads') return new Response(JSON.stringify(info()), { status: 202 });
      if (url.endsWith('/cancel')) return new Response(JSON.stringify({ code: 'not_found', message: 'There is no such download.' }), { status: 404 });
      if (url === '/api/v1/models') return new Response(JSON.stringify({ models: [{ name: 'sd-turbo', catalog_id: 'sd-turbo' }], default: null }));
      return new Response('{}');
    }),
  );
});
afterEach(() => vi.unstubAllGlobals());

describe('downloads', () => {
  it('measures the speed from the progress events', async () => {
    const { downloads } = await import('./downloads.svelte');
    let now = 0;
    downloads.now = () => now;
    downloads.apply(info({ progress: at(0) }));
    expect(downloads.speeds['sd-turbo']).toBeNull();
    now = 1000;
    downloads.apply(info({ progress: at(4 * MB) }));
    expect(downloads.speeds['sd-turbo']).toBe(4 * MB);
    expect(downloads.active.map((d) => d.id)).toEqual(['sd-turbo']);
    downloads.apply(info({ state: 'cancelled', progress: at(4 * MB) }));
    expect(downloads.speeds['sd-turbo']).toBeNull();
    expect(downloads.active).toEqual([]);
    expect(downloads.get('sd-turbo')?.state).toBe('cancelled');
    expect(downloads.get('other')).toBeNull();
  });

  it('reloads the installed models and tells listeners once when one finishes', async () => {
    const { downloads } = await import('./downloads.svelte');
    const { catalog } = await import('./catalog.svelte');
    const finished: string[] = [];
    const stop = downloads.onFinished((d) => finished.push(d.id));
    downloads.apply(info({ progress: at(MB) }));
    downloads.apply(info({ state: 'done', progress: at(100 * MB) }));
    downloads.apply(info({ state: 'done', progress: at(100 * MB) }));
    expect(finished).toEqual(['sd-turbo']);
    await vi.waitFor(() => expect(catalog.models.map((m) => m.name)).toEqual(['sd-turbo']));
    // One that was done before the page loaded is old news.
    downloads.apply(info({ id: 'sd-1.5', state: 'done' }));
    expect(finished).toEqual(['sd-turbo']);
    stop();
    downloads.apply(info({ id: 'sd-xl', progress: at(MB) }));
    downloads.apply(info({ id: 'sd-xl', state: 'done' }));
    expect(finished).toEqual(['sd-turbo']);
  });

  it('starts, keeps newer event news, and catches up when a cancel finds nothing', async () => {
    const { downloads } = await import('./downloads.svelte');
    await downloads.start('sd-turbo');
    expect(downloads.get('sd-turbo')?.state).toBe('downloading');
    // An event (it failed at once) overtakes the answer: the answer does not replace it.
    const started = downloads.start('sd-turbo');
    downloads.apply(info({ state: 'failed', error: 'the server answered 503' }));
    await started;
    expect(downloads.get('sd-turbo')?.state).toBe('failed');
    listed = [info({ state: 'done' })];
    await downloads.cancel('sd-turbo');
    expect(calls).toEqual(['POST /api/v1/downloads', 'POST /api/v1/downloads', 'POST /api/v1/downloads/sd-turbo/cancel', 'GET /api/v1/downloads', 'GET /api/v1/models']);
    expect(downloads.get('sd-turbo')?.state).toBe('done');
  });
});
