import { describe, expect, it, vi } from 'vitest';
import { createApiClient } from './api';
import { adviceFor, describeDisk, describeSelfTest, loadDiagnostics, runSelfTest, type Recommendation, type SelfTest } from './advice';

const GB = 1024 ** 3;
const rec: Recommendation = {
  device: { value: 'cuda', reason: 'RTX is faster.' },
  precision: { value: 'fp16', reason: 'Half the memory.' },
  low_vram: { value: true, reason: 'Only 6.0 GB.' },
  strategies: ['tiled VAE', 'sliced attention'],
  budget_bytes: 5 * GB,
  families: [
    { family: 'SD1', max_size: 1024, native_size: 512, needed_bytes: 2 * GB, reason: 'fits' },
    { family: 'SDXL', max_size: null, native_size: 1024, needed_bytes: 7 * GB, reason: 'too big' },
  ],
  notes: ['Update the driver.'],
};

describe('adviceFor', () => {
  it('shows the server recommendation, its strategies and family limits', () => {
    const a = adviceFor(rec);
    expect(a[0]).toEqual({ topic: 'Where pictures are made', value: 'Graphics card (NVIDIA)', why: 'RTX is faster.' });
    expect(a.find((x) => x.topic === 'Precision')?.value).toBe('Half (fp16)');
    expect(a.find((x) => x.topic === 'Low graphics-memory mode')?.value).toBe('On: tiled VAE, sliced attention');
    expect(a.find((x) => x.topic === 'SD 1.5 models')?.value).toBe('Up to 1024×1024');
    expect(a.find((x) => x.topic === 'SDXL models')).toMatchObject({ value: 'Does not fit', why: 'too big' });
    expect(a.at(-1)?.why).toBe('Update the driver.');
  });

  it('on the processor says so in full precision', () => {
    const cpu = adviceFor({ ...rec, device: { value: 'cpu', reason: 'none' }, precision: { value: 'fp32', reason: 'r' }, low_vram: { value: false, reason: 'n' }, notes: [] });
    expect(cpu[0]?.value).toBe('Processor');
    expect(cpu[1]?.value).toBe('Full (fp32)');
    expect(cpu[2]?.value).toMatch(/^Off/);
  });
});

describe('diagnostics client', () => {
  it('asks the server for the report and runs the self-test with POST', async () => {
    const fetch = vi.fn(async (_input: RequestInfo | URL, _init?: RequestInit) => new Response('{"ok":true}', { status: 200 }));
    const client = createApiClient({ fetch });
    await loadDiagnostics(undefined, client);
    await runSelfTest(client);
    expect(fetch.mock.calls.map((c) => [c[1]?.method, c[0]])).toEqual([
      ['GET', '/api/v1/diagnostics'],
      ['POST', '/api/v1/diagnostics/self-test'],
    ]);
  });

  it('describes a self-test and the disk in one line', () => {
    const t: SelfTest = { ok: true, model: 'tiny/sd1', device: 'cpu', load_ms: 50, steps: 4, step_ms: [10, 12, 11, 11], ms_per_step: 11, decode_ms: 20, total_ms: 120, error: null };
    expect(describeSelfTest(t)).toBe('Self-test passed on the processor: 4 steps at 11 ms per step, decoding 20 ms, 120 ms in all.');
    expect(describeSelfTest({ ...t, device: 'cuda' })).toContain('passed on the graphics card:');
    expect(describeSelfTest({ ...t, ok: false, error: { code: 'model_broken', message: 'Broken.', hint: 'Reinstall.' } })).toBe('Self-test failed: Broken. Reinstall.');
    expect(describeDisk({ path: '/d', free_bytes: null, total_bytes: null })).toBe('unknown');
    expect(describeDisk({ path: '/d', free_bytes: 2 * GB, total_bytes: 4 * GB })).toBe('2.0 GB free of 4.0 GB');
  });
});
