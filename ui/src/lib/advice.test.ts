import { describe, expect, it } from 'vitest';
import type { SystemInfo } from './api';
import { adviceFor } from './advice';

const GB = 1024 ** 3;
const base: SystemInfo = {
  os: { name: 'Debian', version: '13', kernel: '6', arch: 'x86_64' },
  cpu: { name: 'CPU', physical_cores: 4, logical_cores: 8, features: [] },
  memory: { total_bytes: 8 * GB, available_bytes: 4 * GB },
  gpus: [],
  gpu_status: { available: false, reason: 'none' },
  build: { cuda: false, metal: false },
  data_dir: '/d',
};
const gpu = (vram: number) => ({ name: 'RTX', vram_total_bytes: vram * GB, vram_free_bytes: vram * GB, driver_version: '1', cuda_version: '12', compute_capability: '8.9' });

describe('adviceFor', () => {
  it('without a usable graphics card, advises the processor and small pictures', () => {
    const a = adviceFor(base);
    expect(a[0]).toMatchObject({ value: 'Processor' });
    expect(a.find((x) => x.topic === 'Models')?.value).toBe('SD 1.5');
  });

  it('a card that is found but cannot be used counts as none', () => {
    expect(adviceFor({ ...base, gpus: [gpu(12)] })[0]?.value).toBe('Processor');
  });

  it('follows the graphics memory', () => {
    const big = adviceFor({ ...base, gpus: [gpu(12)], gpu_status: { available: true } });
    expect(big.find((x) => x.topic === 'Models')?.value).toBe('SD 1.5, SD 2 and SDXL');
    const small = adviceFor({ ...base, gpus: [gpu(4)], gpu_status: { available: true } });
    expect(small.find((x) => x.topic === 'Low graphics-memory mode')?.value).toBe('On');
    expect(small.find((x) => x.topic === 'Models')?.why).toContain('4.0 GB');
  });
});
