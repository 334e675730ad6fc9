import { describe, expect, it } from 'vitest';
import type { Settings } from './api';
import { BUILT_IN_WRITER_INSTRUCTIONS, CHAT_WRITER_DEFAULTS, chatApps, chatWriterProblem, cleanChatWriter, DEFAULT_CLIP_SKIP, editable, parseLines, settingsClipSkip, vaeOptions, withEdits } from './settings';

const writer = { enabled: true, url: 'http://127.0.0.1:11434/v1', model: 'llama3.2', api_key: '', system_prompt: '', timeout_seconds: 20 };

describe('editable', () => {
  it('keeps what PUT takes and drops read-only facts', () => {
    const s: Settings = {
      default_model: 'tiny',
      prompt_prefix: 'a',
      prompt_suffix: 'b',
      negative_prompt: 'c',
      precision: 'fp16',
      low_vram: 'on',
      allowed_origins: ['http://localhost:8000'],
      models_dirs: ['/models'],
      chat_writer: writer,
      clip_skip: 2,
      vae: 'anime.safetensors',
      cpu_bf16: true,
      data_dir: '/data',
      warning: null,
    };
    const e = editable(s);
    expect(e).toEqual({
      default_model: 'tiny',
      prompt_prefix: 'a',
      prompt_suffix: 'b',
      negative_prompt: 'c',
      precision: 'fp16',
      low_vram: 'on',
      allowed_origins: ['http://localhost:8000'],
      models_dirs: ['/models'],
      chat_writer: writer,
      clip_skip: 2,
      vae: 'anime.safetensors',
      cpu_bf16: true,
    });
    expect('data_dir' in e).toBe(false);
    // A copy: editing the form does not change what was loaded.
    e.models_dirs.push('/other');
    expect(s.models_dirs).toEqual(['/models']);
    e.chat_writer.url = 'changed';
    expect(s.chat_writer.url).toBe('http://127.0.0.1:11434/v1');
  });

  it('gives a server from before the prompt writer a writer that is off', () => {
    const old = { default_model: null, prompt_prefix: '', prompt_suffix: '', negative_prompt: '', precision: 'auto', low_vram: 'auto', allowed_origins: [], models_dirs: [], data_dir: '/d' };
    expect(editable(old as unknown as Settings).chat_writer).toEqual(CHAT_WRITER_DEFAULTS);
    expect(CHAT_WRITER_DEFAULTS.enabled).toBe(false);
    expect(editable(old as unknown as Settings).clip_skip).toBe(DEFAULT_CLIP_SKIP);
    // Nor a VAE setting: the model's own, as before.
    expect(editable(old as unknown as Settings).vae).toBe('Automatic');
    // Nor the bf16 switch: off, as it drew before.
    expect(editable(old as unknown as Settings).cpu_bf16).toBe(false);
  });

  it('keeps clip skip a whole number from 1 to 12', () => {
    expect(DEFAULT_CLIP_SKIP).toBe(1);
    expect(settingsClipSkip(2)).toBe(2);
    expect(settingsClipSkip(null)).toBe(1);
    expect(settingsClipSkip('')).toBe(1);
    expect(settingsClipSkip(99)).toBe(12);
    expect(settingsClipSkip(2.4)).toBe(2);
  });
});

describe('withEdits', () => {
  const loaded = editable({
    default_model: 'tiny', prompt_prefix: '', prompt_suffix: '', negative_prompt: '', precision: 'auto', low_vram: 'auto',
    allowed_origins: [], models_dirs: ['/models'], chat_writer: writer, clip_skip: 1, vae: 'Automatic', cpu_bf16: false, data_dir: '/d', warning: null,
  });

  it('keeps what a chat app changed meanwhile and saves only what the user changed', () => {
    // SillyTavern switched the model and the VAE through A1111's options after the page loaded.
    const latest = { ...loaded, default_model: 'sd2', vae: 'anime.safetensors' };
    const edited = { ...loaded, prompt_prefix: 'masterpiece', models_dirs: ['/models', '/more'] };
    expect(withEdits(latest, loaded, edited)).toEqual({ ...latest, prompt_prefix: 'masterpiece', models_dirs: ['/models', '/more'] });
  });

  it("lets the user's own change of a field win over the server's", () => {
    const latest = { ...loaded, default_model: 'sd2' };
    const edited = { ...loaded, default_model: 'sdxl' };
    expect(withEdits(latest, loaded, edited).default_model).toBe('sdxl');
    // A nested field counts as changed when any part of it is.
    const writerEdited = { ...loaded, chat_writer: { ...writer, model: 'qwen' } };
    expect(withEdits(latest, loaded, writerEdited).chat_writer.model).toBe('qwen');
    expect(withEdits(latest, loaded, writerEdited).default_model).toBe('sd2');
  });
});

describe('prompt writer', () => {
  it('is only checked when it is turned on', () => {
    expect(chatWriterProblem({ ...CHAT_WRITER_DEFAULTS })).toBeNull();
    expect(chatWriterProblem(writer)).toBeNull();
    expect(chatWriterProblem({ ...writer, url: '  ' })).toMatch(/address/);
    expect(chatWriterProblem({ ...writer, url: '127.0.0.1:11434' })).toMatch(/http:\/\//);
    expect(chatWriterProblem({ ...writer, timeout_seconds: 0 })).toMatch(/seconds/);
    expect(chatWriterProblem({ ...writer, timeout_seconds: null as unknown as number })).toMatch(/seconds/);
  });

  it('is trimmed for saving, with a usable wait when the field is empty', () => {
    expect(cleanChatWriter({ ...writer, url: ' http://x/v1 ', model: ' m ', timeout_seconds: null as unknown as number })).toEqual({
      ...writer,
      url: 'http://x/v1',
      model: 'm',
      timeout_seconds: 30,
    });
    // The system prompt is the user's text, kept as typed.
    expect(cleanChatWriter({ ...writer, system_prompt: ' Be brief.\n' }).system_prompt).toBe(' Be brief.\n');
  });

  it('shows the built-in instructions the server uses', () => {
    expect(BUILT_IN_WRITER_INSTRUCTIONS).toMatch(/^You write prompts for an image generator/);
    expect(BUILT_IN_WRITER_INSTRUCTIONS).toMatch(/No dialogue/);
  });
});

describe('parseLines', () => {
  it('trims, drops blanks and repeats', () => {
    expect(parseLines(' a \n\nb\r\na\n')).toEqual(['a', 'b']);
  });
});

describe('chatApps', () => {
  it('puts the address into every app’s steps', () => {
    const apps = chatApps('http://127.0.0.1:7860');
    expect(apps.map((a) => a.name)).toEqual(['SillyTavern', 'Open WebUI', 'Voxta']);
    for (const app of apps) expect(app.steps.join('\n')).toContain('http://127.0.0.1:7860');
    expect(apps[0]!.steps.join(' ')).toContain('AUTOMATIC1111');
  });
});

describe('vaeOptions', () => {
  const files = [
    { name: 'anime.safetensors', path: '/a/anime.safetensors', size_bytes: 1, family: null },
    { name: 'sdxl_vae.safetensors', path: '/a/sdxl_vae.safetensors', size_bytes: 1, family: 'SDXL' as const },
  ];

  it('offers Automatic and None (the values A1111 sends) before the files', () => {
    const options = vaeOptions(files, 'Automatic');
    expect(options.map((o) => o.value)).toEqual(['Automatic', 'None', 'anime.safetensors', 'sdxl_vae.safetensors']);
    expect(options[0].label).toContain('.vae.safetensors beside it');
    expect(options[1].label).toBe('None (the model’s own)');
    expect(options[3].label).toBe('sdxl_vae.safetensors · for SDXL');
  });

  it('keeps a chosen file that is gone, saying so, instead of showing another', () => {
    const options = vaeOptions(files, 'gone.safetensors');
    expect(options.at(-1)).toEqual({ value: 'gone.safetensors', label: 'gone.safetensors (not found: Automatic is used)' });
    expect(vaeOptions([], 'None').map((o) => o.value)).toEqual(['Automatic', 'None']);
  });
});
