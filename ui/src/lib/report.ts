// The plain-text diagnostics report behind "Copy report": what someone helping the user needs,
// in a form that pastes cleanly into a chat, an e-mail or a GitHub issue.

import type { Health, SystemInfo } from './api';
import { formatBytes, formatCores, yesNo } from './format';

export function buildReport(system: SystemInfo, health: Health | null, now: Date = new Date()): string {
  const { os, cpu, memory, gpus, gpu_status: gpuStatus, build } = system;
  const lines: string[] = [
    'Local Diffusers diagnostics report',
    `App version: ${health?.version ?? 'unknown'}`,
    `Created: ${now.toISOString()}`,
    '',
    `Operating system: ${os.name} ${os.version} (${os.arch}, kernel ${os.kernel})`,
    `Processor: ${cpu.name} (${formatCores(cpu.physical_cores, cpu.logical_cores)})`,
    `Processor features: ${cpu.features.length > 0 ? cpu.features.join(', ') : 'none reported'}`,
    `Memory: ${formatBytes(memory.total_bytes)} total, ${formatBytes(memory.available_bytes)} available`,
  ];

  if (gpus.length === 0) {
    lines.push(`Graphics card: none found${gpuStatus.reason ? ` (${gpuStatus.reason})` : ''}`);
  } else {
    gpus.forEach((gpu, i) => {
      const details = [
        `${formatBytes(gpu.vram_total_bytes)} memory, ${formatBytes(gpu.vram_free_bytes)} free`,
        `driver ${gpu.driver_version}`,
        `CUDA ${gpu.cuda_version ?? 'unknown'}`,
        `compute capability ${gpu.compute_capability ?? 'unknown'}`,
      ];
      lines.push(`Graphics card ${i + 1}: ${gpu.name} (${details.join(', ')})`);
    });
    if (!gpuStatus.available && gpuStatus.reason) {
      lines.push(`Graphics card not used: ${gpuStatus.reason}`);
    }
  }

  lines.push(
    `Built with CUDA: ${yesNo(build.cuda)}`,
    `Built with Metal: ${yesNo(build.metal)}`,
    `Data folder: ${system.data_dir}`,
  );
  return lines.join('\n') + '\n';
}
