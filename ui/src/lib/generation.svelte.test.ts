// The shared job state: submitting, following the event stream, catching up from the server.
// Runs against a stand-in fetch and EventSource (the real ones are covered by the browser tests).
import { afterEach, beforeEach, describe, expect, it, vi } from 'vitest';
import type { JobInfo } from './api';

class FakeEventSource {
  static last: FakeEventSource | null = null;
  listeners = new Map<string, (e: MessageEvent) => void>();
  onopen: ((e: Event) => void) | null = null;
  onerror: ((e: Event) => void) | null = null;
  constructor(public url: string) {
    FakeEventSource.last = this;
  }
  addEventListener(type: string, fn: (e: MessageEvent) => void) {
    this.listeners.set(type, fn);
  }
  close() {}
  emit(data: Record<string, unknown>) {
    this.listeners.get(String(data.type))?.({ data: JSON.stringify(data) } as MessageEvent);
  }
}

function info(over: Partial<JobInfo> = {}): JobInfo {
  return {
    id: 'job-1', state: 'queued', stage: 'waiting', position: 1, prompt: 'a cat', negative_prompt: '', model: 'tiny',
    width: 64, height: 64, steps: 4, cfg_scale: 7, sampler: 'Euler', schedule: 'Karras', seed: 9, batch: 1, image: 0,
    step: 0, progress: 0, eta_ms: null, images: [], error: null, created_at: 1, started_at: null, finished_at: null, ...over,
  };
}

const image = { id: 5, prompt: 'a cat', negative_prompt: '', model: 'tiny', sampler: 'Euler', schedule: 'Karras', steps: 4, cfg_scale: 7, seed: 9, width: 64, height: 64, created_at: 2, favourite: false, trashed: false };
let server: JobInfo;

beforeEach(() => {
  vi.resetModules();
  vi.useFakeTimers();
  server = info();
  vi.stubGlobal('EventSource', FakeEventSource);
  vi.stubGlobal(
    'fetch',
    vi.fn(async (url: string, init?: RequestInit) => {
      const body = url === '/api/v1/jobs' && init?.method === 'GET' ? [server] : server;
      return new Response(JSON.stringify(body), { status: url === '/api/v1/jobs' && init?.method === 'POST' ? 202 : 200 });
    }),
  );
});
afterEach(() => {
  vi.useRealTimers();
  vi.unstubAllGlobals();
});

describe('generation', () => {
  it('follows a submitted job through progress, preview and done', async () => {
    const { generation } = await import('./generation.svelte');
    generation.start();
    expect(FakeEventSource.last?.url).toBe('/api/v1/events');

    await generation.submit({ prompt: 'a cat' });
    expect(generation.currentId).toBe('job-1');
    expect(generation.current?.state).toBe('queued');

    const es = FakeEventSource.last!;
    es.emit({ type: 'progress', job: 'job-1', stage: 'sampling', image: 0, batch: 1, step: 2, steps: 4, progress: 0.5, eta_ms: 800 });
    expect(generation.current).toMatchObject({ state: 'running', step: 2, progress: 0.5 });
    es.emit({ type: 'preview', job: 'job-1', image: 'data:image/png;base64,AAAA' });
    expect(generation.previews['job-1']).toBe('data:image/png;base64,AAAA');
    expect(generation.active.map((j) => j.id)).toEqual(['job-1']);

    server = info({ state: 'done', stage: 'finished', progress: 1, images: [image] });
    es.emit({ type: 'done', job: 'job-1', images: [5] });
    await vi.waitFor(() => expect(generation.current?.images.map((i) => i.id)).toEqual([5]));
    expect(generation.current?.state).toBe('done');
    expect(generation.active).toEqual([]);

    generation.updateImage({ ...image, favourite: true });
    expect(generation.current?.images[0]?.favourite).toBe(true);
  });

  it('a job cancelled elsewhere (another window, a chat app) shows as cancelled', async () => {
    const { generation } = await import('./generation.svelte');
    generation.start();
    await generation.submit({ prompt: 'a cat' });
    server = info({ state: 'cancelled', stage: 'finished' });
    FakeEventSource.last!.emit({ type: 'cancelled', job: 'job-1' });
    expect(generation.current?.state).toBe('cancelled');
    await vi.waitFor(() => expect(generation.active).toEqual([]));
  });

  it('follows a tracked job (a portrait) without making it the Playground’s', async () => {
    const { generation } = await import('./generation.svelte');
    generation.start();
    await generation.submit({ prompt: 'a cat' });
    const portrait = info({ id: 'job-2', prompt: 'portrait, Mira' });
    generation.track(portrait);
    expect(generation.currentId).toBe('job-1');
    expect(generation.job('job-2')?.state).toBe('queued');
    expect(generation.job(null)).toBeNull();

    FakeEventSource.last!.emit({ type: 'progress', job: 'job-2', stage: 'sampling', image: 0, batch: 1, step: 1, steps: 2, progress: 0.5, eta_ms: 10 });
    expect(generation.job('job-2')).toMatchObject({ state: 'running', step: 1 });
    server = info({ id: 'job-2', state: 'done', stage: 'finished', progress: 1, images: [image] });
    FakeEventSource.last!.emit({ type: 'done', job: 'job-2', images: [5] });
    await vi.waitFor(() => expect(generation.job('job-2')?.images.map((i) => i.id)).toEqual([5]));
    expect(generation.currentId).toBe('job-1');
  });
});
