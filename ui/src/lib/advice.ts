// What to expect on this computer and which settings suit it, with the reason in plain words,
// from the facts of GET /api/v1/system. A rule of thumb for the Diagnostics page until the
// server reports its own recommendation (ld-core's hardware module decides what is actually used).

import type { SystemInfo } from './api';
import { formatBytes } from './format';

export interface Advice {
  /** Short label, e.g. "Model size". */
  topic: string;
  /** The recommendation. */
  value: string;
  /** Why, in one sentence. */
  why: string;
}

const GB = 1024 ** 3;

export function adviceFor(system: SystemInfo): Advice[] {
  const gpu = system.gpu_status.available ? system.gpus[0] : undefined;
  if (gpu) {
    const vram = gpu.vram_total_bytes;
    const name = `${gpu.name} has ${formatBytes(vram)} of graphics memory`;
    return [
      { topic: 'Where pictures are made', value: 'Graphics card', why: `${gpu.name} is many times faster than the processor.` },
      {
        topic: 'Models',
        value: vram >= 10 * GB ? 'SD 1.5, SD 2 and SDXL' : vram >= 6 * GB ? 'SD 1.5 and SD 2; SDXL with low-memory mode' : 'SD 1.5',
        why: `${name}; SDXL needs about 8 GB, SD 1.5 about 4 GB.`,
      },
      { topic: 'Precision', value: 'Automatic (half precision)', why: 'Half precision needs half the memory and is faster on NVIDIA cards.' },
      {
        topic: 'Low graphics-memory mode',
        value: vram < 6 * GB ? 'On' : 'Automatic',
        why: vram < 6 * GB ? `${name}, so it has to save memory at some cost in speed.` : `${name}, enough for normal sizes.`,
      },
    ];
  }
  const ram = system.memory.total_bytes;
  return [
    { topic: 'Where pictures are made', value: 'Processor', why: 'No graphics card Local Diffusers can use was found. It works, only slower: expect a minute or more per picture.' },
    {
      topic: 'Models',
      value: ram >= 16 * GB ? 'SD 1.5 and SD 2; SDXL is very slow' : 'SD 1.5',
      why: `This computer has ${formatBytes(ram)} of memory; SD 1.5 needs about 4 GB, SDXL about 10 GB.`,
    },
    { topic: 'Size', value: '512×512, 20 steps or fewer', why: 'Time grows with pixels and steps; the “Quick” preset is a good start.' },
    { topic: 'Precision', value: 'Automatic (full precision)', why: 'Processors compute full precision fastest.' },
  ];
}
