// Helpers of the Settings page: the editable part of the settings, and the connection steps for
// chat apps, which speak the AUTOMATIC1111 API that Local Diffusers also serves.

import type { EditableSettings, Settings } from './api';

/** The part of GET /api/v1/settings that PUT takes back (read-only facts left out). */
export function editable(s: Settings): EditableSettings {
  return {
    default_model: s.default_model ?? null,
    prompt_prefix: s.prompt_prefix ?? '',
    prompt_suffix: s.prompt_suffix ?? '',
    negative_prompt: s.negative_prompt ?? '',
    precision: s.precision ?? 'auto',
    low_vram: s.low_vram ?? 'auto',
    allowed_origins: [...(s.allowed_origins ?? [])],
    models_dirs: [...(s.models_dirs ?? [])],
  };
}

/** Non-empty trimmed lines, without repeats. */
export function parseLines(text: string): string[] {
  return [...new Set(text.split(/\r?\n/).map((l) => l.trim()).filter((l) => l !== ''))];
}

export interface ChatApp {
  id: string;
  name: string;
  steps: string[];
}

/** Step-by-step connection instructions, with this app's address filled in. */
export function chatApps(address: string): ChatApp[] {
  return [
    {
      id: 'sillytavern',
      name: 'SillyTavern',
      steps: [
        'Open the Extensions menu (the stacked blocks icon) and unfold “Image Generation”.',
        'Set Source to “Stable Diffusion WebUI (AUTOMATIC1111)”.',
        `Set “SD Web UI URL” to ${address}`,
        'Press Connect. The model list fills in when it works.',
      ],
    },
    {
      id: 'open-webui',
      name: 'Open WebUI',
      steps: [
        'Open Admin Panel > Settings > Images.',
        'Set “Image Generation Engine” to “Automatic1111”.',
        `Set “AUTOMATIC1111 Base URL” to ${address}`,
        'Turn on “Image Generation”, pick a model, and press Save.',
      ],
    },
    {
      id: 'voxta',
      name: 'Voxta',
      steps: [
        'Open Manage Modules and add the “Stable Diffusion WebUI (A1111)” image generation module.',
        `Set its URL to ${address}`,
        'Save, enable the module, and restart the chat.',
      ],
    },
  ];
}
