// Helpers of the Settings page: the editable part of the settings, and the connection steps for
// chat apps, which speak the AUTOMATIC1111 API that Local Diffusers also serves.

import type { ChatWriterSettings, EditableSettings, Settings, VaeFile } from './api';
import { cleanClipSkip } from './params';

/** The app's clip skip when nothing was set: no layers skipped. */
export const DEFAULT_CLIP_SKIP = 1;

/** The clip skip as PUT takes it: a whole number 1..12; an empty or broken field is the default. */
export function settingsClipSkip(v: unknown): number {
  return cleanClipSkip(v) ?? DEFAULT_CLIP_SKIP;
}

/** The prompt writer as the server starts: off, nothing filled in. */
export const CHAT_WRITER_DEFAULTS: ChatWriterSettings = {
  enabled: false,
  url: '',
  model: '',
  api_key: '',
  system_prompt: '',
  timeout_seconds: 30,
};

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
    // A server from before the prompt writer has none: keep it off.
    chat_writer: { ...CHAT_WRITER_DEFAULTS, ...(s.chat_writer ?? {}) },
    // A server from before clip skip has none: 1 skips nothing.
    clip_skip: settingsClipSkip(s.clip_skip),
    // A server from before the VAE setting decodes with the model's own: "Automatic".
    vae: s.vae || VAE_AUTOMATIC,
    // A server from before the setting draws in f32 on the processor: off.
    cpu_bf16: s.cpu_bf16 ?? false,
  };
}

/**
 * What to save: `latest` (the settings as they are now on the server) with the fields the user
 * changed from `base` (what the form was loaded with) taken from `edited`. A chat app may have
 * changed others meanwhile (A1111's options set the model and the VAE): sending the whole form
 * back would undo that (found by review).
 */
export function withEdits(latest: EditableSettings, base: EditableSettings, edited: EditableSettings): EditableSettings {
  const out: Record<string, unknown> = { ...latest };
  for (const key of Object.keys(edited) as (keyof EditableSettings)[]) {
    if (JSON.stringify(edited[key]) !== JSON.stringify(base[key])) out[key] = edited[key];
  }
  return out as unknown as EditableSettings;
}

/** The "vae" setting's two special values, as A1111 names them. */
export const VAE_AUTOMATIC = 'Automatic';
export const VAE_NONE = 'None';

export interface VaeOption {
  value: string;
  label: string;
}

/**
 * The choices of the Settings page's VAE select: Automatic, None, then the VAE files. A chosen
 * file that is no longer there stays selectable under a label saying so (the server uses
 * Automatic meanwhile), so the select never shows a blank or silently picks another.
 */
export function vaeOptions(files: VaeFile[], current: string): VaeOption[] {
  const options: VaeOption[] = [
    { value: VAE_AUTOMATIC, label: 'Automatic (the model’s own, or <name>.vae.safetensors beside it)' },
    { value: VAE_NONE, label: 'None (the model’s own)' },
    ...files.map((f) => ({ value: f.name, label: f.family ? `${f.name} · for ${f.family}` : f.name })),
  ];
  if (current && !options.some((o) => o.value === current)) {
    options.push({ value: current, label: `${current} (not found: Automatic is used)` });
  }
  return options;
}

/**
 * The instructions the server gives a chat server when the user leaves them empty; shown as the
 * placeholder of the system-prompt field. Keep in step with DEFAULT_SYSTEM_PROMPT in
 * crates/core/src/chat.rs.
 */
export const BUILT_IN_WRITER_INSTRUCTIONS =
  'You write prompts for an image generator (Stable Diffusion). From the conversation and the characters given, ' +
  'describe the picture asked for as one line of short comma-separated phrases: who is in it and how they look, ' +
  'clothing, pose, place, lighting, mood. Only what can be seen. No dialogue, no story, no explanations, no quotes.';

/**
 * What is wrong with the prompt-writer settings, in words for the form; null when they can be
 * saved. Only checked when it is turned on: a half-filled form that is off is fine.
 */
export function chatWriterProblem(w: ChatWriterSettings): string | null {
  if (!w.enabled) return null;
  const url = w.url.trim();
  if (url === '') return 'Enter the chat server’s address, e.g. http://127.0.0.1:11434/v1.';
  if (!/^https?:\/\/[^\s/]+/i.test(url)) return 'The address starts with http:// or https://, e.g. http://127.0.0.1:11434/v1.';
  if (!Number.isInteger(w.timeout_seconds) || w.timeout_seconds < 1 || w.timeout_seconds > 300) {
    return 'Wait between 1 and 300 seconds for an answer.';
  }
  return null;
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

/** The prompt writer as PUT takes it: trimmed, and a usable wait when the field was left empty. */
export function cleanChatWriter(w: ChatWriterSettings): ChatWriterSettings {
  const t = Number(w.timeout_seconds);
  return {
    enabled: Boolean(w.enabled),
    url: (w.url ?? '').trim(),
    model: (w.model ?? '').trim(),
    api_key: (w.api_key ?? '').trim(),
    system_prompt: w.system_prompt ?? '',
    timeout_seconds: Number.isInteger(t) && t >= 1 && t <= 300 ? t : CHAT_WRITER_DEFAULTS.timeout_seconds,
  };
}
