import { describe, expect, it } from 'vitest';
import type { SystemInfo } from './api';
import { buildReport } from './report';

const GB = 1024 ** 3;

function system(overrides: Partial<SystemInfo> = {}): SystemInfo {
  return {
    os: { name: 'Debian GNU/Linux', version: '12', kernel: '6.1.0-18-amd64', arch: 'x86_64' },
    cpu: { name: 'AMD EPYC 7B13', physical_cores: null, logical_cores: 2, features: ['avx2', 'fma'] },
    memory: { total_bytes: 16 * GB, available_bytes: 12 * GB },
    gpus: [],
    gpu_status: { available: false, reason: 'No NVIDIA driver library (libnvidia-ml.so.1) was found.' },
    build: { cuda: false, metal: false },
    data_dir: '/home/me/.local/share/local-diffusers',
    ...overrides,
  };
}

describe('buildReport', () => {
  const now = new Date('2025-01-02T03:04:05Z');

  it('lists the hardware in plain text', () => {
    const text = buildReport(system(), { status: 'ok', version: '0.1.0' }, now);
    expect(text).toBe(
      [
        'Local Diffusers diagnostics report',
        'App version: 0.1.0',
        'Created: 2025-01-02T03:04:05.000Z',
        '',
        'Operating system: Debian GNU/Linux 12 (x86_64, kernel 6.1.0-18-amd64)',
        'Processor: AMD EPYC 7B13 (2 threads)',
        'Processor features: avx2, fma',
        'Memory: 16.0 GB total, 12.0 GB available',
        'Graphics card: none found (No NVIDIA driver library (libnvidia-ml.so.1) was found.)',
        'Built with CUDA: No',
        'Built with Metal: No',
        'Data folder: /home/me/.local/share/local-diffusers',
        '',
      ].join('\n'),
    );
  });

  it('lists every graphics card with its details', () => {
    const text = buildReport(
      system({
        gpus: [
          {
            name: 'NVIDIA GeForce RTX 4090',
            vram_total_bytes: 24 * GB,
            vram_free_bytes: 20 * GB,
            driver_version: '550.54',
            cuda_version: '12.4',
            compute_capability: '8.9',
          },
        ],
        gpu_status: { available: true, reason: null },
        build: { cuda: true, metal: false },
      }),
      null,
      now,
    );
    expect(text).toContain('App version: unknown');
    expect(text).toContain(
      'Graphics card 1: NVIDIA GeForce RTX 4090 (24.0 GB memory, 20.0 GB free, driver 550.54, CUDA 12.4, compute capability 8.9)',
    );
    expect(text).toContain('Built with CUDA: Yes');
    expect(text).not.toContain('not used');
  });
});
