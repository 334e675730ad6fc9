import { describe, expect, it } from 'vitest';
import type { Settings } from './api';
import { chatApps, editable, parseLines } from './settings';

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
    });
    expect('data_dir' in e).toBe(false);
    // A copy: editing the form does not change what was loaded.
    e.models_dirs.push('/other');
    expect(s.models_dirs).toEqual(['/models']);
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
