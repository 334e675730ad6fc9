// The server's diagnostics (GET /api/v1/diagnostics) and self-test (POST
// /api/v1/diagnostics/self-test), and the recommendation turned into rows for the Diagnostics
// page. The recommendation is decided by ld-core (the same rules pick the settings "Auto" uses),
// so the page shows what will actually happen instead of guessing.

import { api, type ApiClient, type SystemInfo } from './api';
import { formatBytes } from './format';

export interface Choice<T> {
  value: T;
  reason: string;
}

export interface FamilyLimit {
  family: 'SD1' | 'SD2' | 'SDXL';
  /** Side of the largest safe square size; null when the family does not fit. */
  max_size: number | null;
  native_size: number;
  needed_bytes: number;
  reason: string;
}

export interface Recommendation {
  device: Choice<'cpu' | 'cuda' | 'metal'>;
  precision: Choice<'auto' | 'fp16' | 'fp32'>;
  low_vram: Choice<boolean>;
  strategies: string[];
  budget_bytes: number;
  families: FamilyLimit[];
  notes: string[];
}

export interface Problem {
  job: string;
  at: number;
  topic: string;
  title: string;
  message: string;
  cause: string;
  fix: string;
}

export interface Diagnostics {
  version: string;
  system: Omit<SystemInfo, 'data_dir'>;
  recommendation: Recommendation;
  models: { count: number; total_bytes: number; families: string[] };
  disk: { path: string; free_bytes: number | null; total_bytes: number | null };
  problems: Problem[];
  troubleshooting: { id: string; title: string; cause: string; fix: string }[];
  /** The report without the hardware part, as plain text. */
  details_text: string;
  text: string;
}

export interface SelfTest {
  ok: boolean;
  model: string;
  device: string;
  load_ms: number;
  steps: number;
  step_ms: number[];
  ms_per_step: number;
  decode_ms: number;
  total_ms: number;
  error: { code: string; message: string; hint: string } | null;
}

export function loadDiagnostics(signal?: AbortSignal, client: ApiClient = api()): Promise<Diagnostics> {
  return client.request<Diagnostics>('GET', '/api/v1/diagnostics', { signal });
}

export function runSelfTest(client: ApiClient = api()): Promise<SelfTest> {
  return client.request<SelfTest>('POST', '/api/v1/diagnostics/self-test');
}

export interface Advice {
  /** Short label, e.g. "Model size". */
  topic: string;
  /** The recommendation. */
  value: string;
  /** Why, in one sentence. */
  why: string;
}

const DEVICE: Record<Recommendation['device']['value'], string> = {
  cpu: 'Processor',
  cuda: 'Graphics card (NVIDIA)',
  metal: 'Graphics (Apple)',
};

const FAMILY: Record<FamilyLimit['family'], string> = { SD1: 'SD 1.5', SD2: 'SD 2', SDXL: 'SDXL' };

/** The server's recommendation as rows: device, precision, low-memory mode, one per model family. */
export function adviceFor(rec: Recommendation): Advice[] {
  const rows: Advice[] = [
    { topic: 'Where pictures are made', value: DEVICE[rec.device.value], why: rec.device.reason },
    {
      topic: 'Precision',
      value: rec.precision.value === 'fp16' ? 'Half (fp16)' : 'Full (fp32)',
      why: rec.precision.reason,
    },
    {
      topic: 'Low graphics-memory mode',
      value: rec.low_vram.value ? `On: ${rec.strategies.join(', ')}` : 'Off (turns on by itself when needed)',
      why: rec.low_vram.reason,
    },
  ];
  for (const f of rec.families) {
    rows.push({
      topic: `${FAMILY[f.family]} models`,
      value: f.max_size === null ? 'Does not fit' : `Up to ${f.max_size}×${f.max_size}`,
      why: f.reason,
    });
  }
  for (const [i, note] of rec.notes.entries()) {
    rows.push({ topic: i === 0 ? 'Worth knowing' : '', value: '', why: note });
  }
  return rows;
}

/** The self-test result in one line, for the page and the copied report. */
export function describeSelfTest(t: SelfTest): string {
  if (!t.ok) return `Self-test failed: ${t.error?.message ?? 'unknown error'} ${t.error?.hint ?? ''}`.trim();
  const where = t.device === 'cpu' ? 'processor' : t.device === 'cuda' || t.device === 'metal' ? 'graphics card' : t.device;
  return `Self-test passed on the ${where}: ${t.steps} steps at ${Math.round(t.ms_per_step)} ms per step, decoding ${t.decode_ms} ms, ${t.total_ms} ms in all.`;
}

/** "12.0 GB free of 500.0 GB", or "unknown". */
export function describeDisk(d: Diagnostics['disk']): string {
  if (d.free_bytes === null) return 'unknown';
  return d.total_bytes === null ? `${formatBytes(d.free_bytes)} free` : `${formatBytes(d.free_bytes)} free of ${formatBytes(d.total_bytes)}`;
}
