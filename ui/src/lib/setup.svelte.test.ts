// The first-start guide's state: shown only without a model, the self-test's answer in words, and
// a server without a self-test treated as "nothing to run".
import { afterEach, beforeEach, describe, expect, it, vi } from 'vitest';
import { ApiError } from './api';
import { readSelfTest } from './setup.svelte';

describe('readSelfTest', () => {
  it('passes, with how long the test picture took where it says', () => {
    expect(readSelfTest({ ok: true })).toEqual({ state: 'passed', message: 'Everything works.', hint: null });
    expect(readSelfTest({ ok: true, device: 'cpu', total_ms: 2400, steps: 2, ms_per_step: 300 }).message).toBe(
      'Everything works. A test picture took 2.4 seconds on the processor.',
    );
    expect(readSelfTest({ ok: true, device: 'cuda(0)', total_ms: 120 }).message).toBe('Everything works. A test picture took 120 ms on the graphics card.');
    expect(readSelfTest({ ok: true, total_ms: 850 }).message).toBe('Everything works. A test picture took 850 ms.');
  });

  it('fails on ok false, with the server’s words, or on an error answer', () => {
    expect(readSelfTest({ ok: false, error: { code: 'model_broken', message: 'the VAE failed', hint: 'Reinstall.' } })).toEqual({
      state: 'failed',
      message: 'The VAE failed.',
      hint: 'Reinstall.',
    });
    expect(readSelfTest({ ok: false })).toMatchObject({ state: 'failed', message: 'The self-test found a problem.', hint: null });
    expect(readSelfTest(null, new ApiError('internal', 'Boom.', 'Try again.', 500))).toEqual({ state: 'failed', message: 'Boom.', hint: 'Try again.' });
    expect(readSelfTest(null, new ApiError('busy', 'A self-test is already running.', null, 503)).state).toBe('failed');
  });

  it('is unavailable on a server without one', () => {
    expect(readSelfTest(null, new ApiError('not_found', 'There is nothing at this address.', null, 404)).state).toBe('unavailable');
    expect(readSelfTest(null, new ApiError('internal', 'x', null, 405)).state).toBe('unavailable');
    expect(readSelfTest(null, new ApiError('model_missing', 'The built-in test model was not found.', null, 404)).state).toBe('unavailable');
  });
});

describe('setup', () => {
  let setupBody: unknown;
  let selfTest: Response;
  beforeEach(() => {
    vi.resetModules();
    vi.stubGlobal(
      'fetch',
      vi.fn(async (url: string) => {
        if (url === '/api/v1/setup') return new Response(JSON.stringify(setupBody));
        if (url === '/api/v1/diagnostics/self-test') return selfTest;
        return new Response('{}');
      }),
    );
  });
  afterEach(() => vi.unstubAllGlobals());

  const suggested = { id: 'sd-turbo', name: 'SD Turbo' };

  it('shows the guide without a model, with downloads under way, until finished', async () => {
    setupBody = { has_model: false, suggested, downloads: [{ id: 'sd-turbo', name: 'SD Turbo', state: 'downloading', progress: null, error: null }], offline_hint: 'x' };
    const { setup } = await import('./setup.svelte');
    const { downloads } = await import('./downloads.svelte');
    await setup.check();
    expect(setup.active).toBe(true);
    expect(downloads.get('sd-turbo')?.state).toBe('downloading');
    setup.finish();
    expect(setup.active).toBe(false);
    await setup.check(); // once per page load
    expect(setup.active).toBe(false);
  });

  it('stays away when a model is installed', async () => {
    setupBody = { has_model: true, suggested, downloads: [], offline_hint: 'x' };
    const { setup } = await import('./setup.svelte');
    await setup.check();
    expect(setup.active).toBe(false);
  });

  it('runs the self-test, or notes that there is none', async () => {
    selfTest = new Response(JSON.stringify({ code: 'not_found', message: 'There is nothing at this address.', hint: null }), { status: 404 });
    const { setup } = await import('./setup.svelte');
    await setup.runSelfTest();
    expect(setup.selfTest).toBe('unavailable');
    selfTest = new Response(JSON.stringify({ ok: true, device: 'cpu', total_ms: 300 }));
    setup.selfTest = 'idle';
    await setup.runSelfTest();
    expect(setup.selfTest).toBe('passed');
    expect(setup.selfTestResult?.message).toBe('Everything works. A test picture took 300 ms on the processor.');
  });
});
