import { describe, expect, it } from 'vitest';
import type { ImageRecord, Inspected, ModelInfo, Preset } from './api';
import { applyPreset, cleanClipSkip, DEFAULT_DRAFT, drawBase, followModel, hasParameters, hiresFromParameters, nativeSize, outputSize, parametersText, parseDraft, presetFromDraft, recall, recallImage, recallInspected, toJobRequest, type Draft } from './params';

const draft = (over: Partial<Draft> = {}): Draft => ({ ...DEFAULT_DRAFT, prompt: 'a cat', ...over });

const image: ImageRecord = {
  id: 7,
  prompt: 'a lighthouse',
  negative_prompt: 'blurry',
  model: 'tiny-sd1',
  sampler: 'Euler a',
  schedule: 'Karras',
  steps: 12,
  cfg_scale: 6.5,
  seed: 42,
  width: 64,
  height: 96,
  created_at: 0,
  favourite: false,
  trashed: false,
};

describe('toJobRequest', () => {
  it('leaves blank choices out so the server defaults apply', () => {
    const req = toJobRequest(draft());
    expect(req).toEqual({ prompt: 'a cat', width: 512, height: 512, steps: 20, cfg_scale: 7, seed: -1, batch_size: 1 });
    expect('negative_prompt' in req).toBe(false);
    expect('model' in req).toBe(false);
  });

  it('sends what was chosen, trimmed and within limits', () => {
    const req = toJobRequest(
      draft({ prompt: '  a dog ', negative_prompt: ' text ', preset: 'portrait', model: 'm', sampler: 'Euler', schedule: 'Karras', seed: 5, steps: 500, batch_size: 0, cfg_scale: Number.NaN }),
    );
    expect(req).toMatchObject({ prompt: 'a dog', negative_prompt: 'text', preset: 'portrait', model: 'm', sampler: 'Euler', schedule: 'Karras', seed: 5, steps: 150, batch_size: 1, cfg_scale: 7 });
  });

  it('turns an empty or broken seed field into random', () => {
    expect(toJobRequest(draft({ seed: null as unknown as number })).seed).toBe(-1);
    expect(toJobRequest(draft({ seed: 1.5 })).seed).toBe(-1);
  });

  it('sends clip skip only when set, as a whole number from 1 to 12', () => {
    expect('clip_skip' in toJobRequest(draft())).toBe(false);
    expect('clip_skip' in toJobRequest(draft({ clip_skip: Number.NaN }))).toBe(false);
    expect(toJobRequest(draft({ clip_skip: 2 })).clip_skip).toBe(2);
    expect(toJobRequest(draft({ clip_skip: 30 })).clip_skip).toBe(12);
    expect(toJobRequest(draft({ clip_skip: 0 })).clip_skip).toBe(1);
    expect(cleanClipSkip('')).toBeNull();
    expect(cleanClipSkip(undefined)).toBeNull();
    expect(cleanClipSkip('3')).toBe(3);
  });

  it('sends the refiner and where it takes over only when one is chosen', () => {
    const none = toJobRequest(draft({ refiner_switch: 0.6 }));
    expect('refiner' in none).toBe(false);
    expect('refiner_switch' in none).toBe(false);
    expect(toJobRequest(draft({ refiner: 'sdxl-refiner' }))).toMatchObject({ refiner: 'sdxl-refiner', refiner_switch: 0.8 });
    expect(toJobRequest(draft({ refiner: 'r', refiner_switch: 0.7 })).refiner_switch).toBe(0.7);
    expect(toJobRequest(draft({ refiner: 'r', refiner_switch: 0.1 })).refiner_switch).toBe(0.5);
    expect(toJobRequest(draft({ refiner: 'r', refiner_switch: Number.NaN })).refiner_switch).toBe(0.8);
  });

  it('sends the hires fix only when it is on, clamped, and without the refiner', () => {
    expect('hires' in toJobRequest(draft({ hires_scale: 3 }))).toBe(false);
    expect(toJobRequest(draft({ hires: true }))).toMatchObject({ hires: { scale: 2, denoise: 0.7, steps: 0, upscaler: 'Latent' } });
    const wild = toJobRequest(draft({ hires: true, hires_scale: 9, hires_denoise: 0, hires_steps: 12.4, hires_upscaler: 'ESRGAN' }));
    expect(wild.hires).toEqual({ scale: 4, denoise: 0.05, steps: 12, upscaler: 'Latent' });
    const both = toJobRequest(draft({ hires: true, refiner: 'sdxl-refiner' }));
    expect('refiner' in both).toBe(false);
    expect('refiner_switch' in both).toBe(false);
  });

  it('gives the final size the server will draw', () => {
    expect(outputSize(draft({ width: 512, height: 768 }))).toEqual({ width: 512, height: 768 });
    expect(outputSize(draft({ hires: true, width: 512, height: 768 }))).toEqual({ width: 1024, height: 1536 });
    // 1.3 x 512 = 665.6 -> 665 -> 664, as A1111 floors the latents.
    expect(outputSize(draft({ hires: true, hires_scale: 1.3, width: 512, height: 512 }))).toEqual({ width: 664, height: 664 });
  });
});

describe('recall', () => {
  it('takes every setting of a gallery picture, with a custom size and the same seed', () => {
    const d = recall(draft({ preset: 'portrait' }), image);
    expect(d).toMatchObject({ prompt: 'a lighthouse', negative_prompt: 'blurry', model: 'tiny-sd1', sampler: 'Euler a', schedule: 'Karras', steps: 12, cfg_scale: 6.5, seed: 42, width: 64, height: 96, aspect: 'custom', preset: '' });
  });

  it('keeps the current model or sampler when this app has no such one', () => {
    const d = recall(draft({ model: 'mine', sampler: 'Euler' }), image, { models: ['mine'], samplers: ['Euler', 'EULER A'] });
    expect(d.model).toBe('mine');
    expect(d.sampler).toBe('EULER A');
  });

  // Found by review: pictures from A1111 before 1.9 say "Sampler: DPM++ 2M Karras", which no
  // sampler list has, so sampler and schedule were silently dropped.
  it('splits an old fused sampler name into sampler and schedule, as A1111 1.9 does', () => {
    const known = { samplers: ['DPM++ 2M', 'DPM++ 2M SDE', 'Euler a'], schedules: ['Automatic', 'Karras', 'Exponential', 'SGM Uniform'] };
    expect(recall(draft(), { ...image, sampler: 'DPM++ 2M Karras', schedule: null }, known)).toMatchObject({ sampler: 'DPM++ 2M', schedule: 'Karras' });
    expect(recall(draft(), { ...image, sampler: 'DPM++ 2M SDE Exponential', schedule: null }, known)).toMatchObject({ sampler: 'DPM++ 2M SDE', schedule: 'Exponential' });
    expect(recall(draft(), { ...image, sampler: 'dpm++ 2m sgm uniform', schedule: null }, known)).toMatchObject({ sampler: 'DPM++ 2M', schedule: 'SGM Uniform' });
    // A schedule the picture names on its own wins; an unknown sampler still keeps the current one.
    expect(recall(draft(), { ...image, sampler: 'DPM++ 2M Karras', schedule: 'Exponential' }, known)).toMatchObject({ sampler: 'DPM++ 2M', schedule: 'Exponential' });
    expect(recall(draft({ sampler: 'Euler a', schedule: '' }), { ...image, sampler: 'Restart Karras', schedule: null }, known)).toMatchObject({ sampler: 'Euler a', schedule: '' });
  });

  // Found by review: a PNG dropped on the window lost its hires fix (and a one-pass picture
  // dropped while the fix was on was enlarged again).
  it("takes a dropped A1111 picture's hires fix as the Gallery does", () => {
    const text = 'a castle\nSteps: 12, Sampler: Euler a, CFG scale: 7, Seed: 42, Size: 64x96, Denoising strength: 0.55, Hires upscale: 1.5, Hires steps: 3, Hires upscaler: Latent';
    const found: Inspected = { source: 'a1111', prompt: 'a castle', negative_prompt: '', steps: 12, cfg_scale: 7, seed: 42, width: 96, height: 144, sampler: 'Euler a', schedule: null, model: null, raw: [['parameters', text]] };
    expect(recallInspected(draft({ hires: false }), found)).toMatchObject({ width: 64, height: 96, hires: true, hires_scale: 1.5, hires_steps: 3, hires_denoise: 0.55 });
    const plain = { ...found, width: 64, height: 96, raw: [['parameters', 'a castle\nSteps: 12, Seed: 42, Size: 64x96']] };
    expect(recallInspected(draft({ hires: true }), plain)).toMatchObject({ width: 64, height: 96, hires: false });
  });

  it('leaves alone what a PNG did not say', () => {
    const found: Inspected = { source: 'comfyui', prompt: 'x', negative_prompt: null, steps: null, cfg_scale: null, seed: null, width: null, height: null, sampler: null, schedule: null, model: null };
    const d = recallInspected(draft({ negative_prompt: 'keep', steps: 30 }), found);
    expect(d).toMatchObject({ prompt: 'x', negative_prompt: 'keep', steps: 30, seed: -1, aspect: '1:1' });
    expect(hasParameters(found)).toBe(true);
    expect(hasParameters({ ...found, source: 'none' })).toBe(false);
  });
});

const model = (name: string, fast: boolean, over: Partial<ModelInfo> = {}): ModelInfo => ({
  name,
  path: `/models/${name}`,
  family: 'SDXL',
  size_bytes: 1,
  format: 'diffusers',
  managed: true,
  refiner: false,
  fast,
  defaults: fast ? { steps: 1, cfg_scale: 1, sampler: 'Euler a', schedule: 'Trailing', width: 512, height: 512 } : null,
  ...over,
});
const turbo = model('sdxl-turbo', true);
const usual = model('juggernaut', false);

describe('following the chosen model', () => {
  // Found by review: the UI sent 20 steps at CFG 7 to SD Turbo, which draws in 1 to 4.
  it('a fast model brings its own steps and CFG and leaves it the sampler', () => {
    const d = followModel(draft({ sampler: 'DPM++ 2M', schedule: 'Karras' }), usual, turbo);
    expect(d).toMatchObject({ steps: 1, cfg_scale: 1, sampler: '', schedule: '' });
    expect(toJobRequest(d)).toMatchObject({ steps: 1, cfg_scale: 1 });
    expect(toJobRequest(d).sampler).toBeUndefined();
  });

  it('going back to a usual model restores the usual settings', () => {
    expect(followModel(draft({ steps: 2, cfg_scale: 1.5 }), turbo, usual)).toMatchObject({ steps: 20, cfg_scale: 7, sampler: '' });
  });

  it('between usual models, and for the same model, nothing changes', () => {
    const d = draft({ steps: 33, cfg_scale: 5, sampler: 'Euler' });
    expect(followModel(d, usual, model('other', false))).toBe(d);
    expect(followModel(d, turbo, turbo)).toBe(d);
  });

  it('when the page opens, only a form left at the usual defaults follows a fast model', () => {
    expect(followModel(draft(), undefined, turbo)).toMatchObject({ steps: 1, cfg_scale: 1 });
    const changed = draft({ steps: 2, cfg_scale: 1 });
    expect(followModel(changed, undefined, turbo)).toBe(changed);
    expect(followModel(draft(), undefined, usual)).toMatchObject({ steps: 20, cfg_scale: 7 });
  });

  it('a fast model draws at its own size', () => {
    expect(nativeSize(turbo)).toBe(512);
    expect(nativeSize(usual)).toBeNull();
    expect(nativeSize(model('fast-unknown', true, { defaults: null }))).toBeNull();
  });
});

describe('presets', () => {
  const preset: Preset = {
    id: 'quick',
    name: 'Quick',
    description: '',
    builtin: true,
    width: null,
    height: null,
    steps: 8,
    cfg_scale: null,
    sampler: 'Euler a',
    schedule: null,
    prompt_prefix: '',
    prompt_suffix: '',
    negative_prompt: '',
  };

  it('applying one sets what it has and keeps the rest', () => {
    const d = applyPreset(draft({ cfg_scale: 9, schedule: 'Exponential' }), preset);
    expect(d).toMatchObject({ preset: 'quick', steps: 8, sampler: 'Euler a', cfg_scale: 9, schedule: 'Exponential', width: 512, aspect: '1:1' });
    expect(applyPreset(d, null).preset).toBe('');
  });

  it('leaves a fast model its own steps, CFG and sampler', () => {
    const d = applyPreset(draft({ steps: 1, cfg_scale: 1 }), { ...preset, width: 512, height: 768 }, turbo);
    expect(d).toMatchObject({ preset: 'quick', steps: 1, cfg_scale: 1, sampler: '', width: 512, height: 768 });
  });

  it('draws a preset\'s shape at the model\'s own size (found by review: SDXL got 512x768)', () => {
    const portrait = { ...preset, width: 512, height: 768 };
    const sdxl = model('xl', false, { family: 'SDXL' });
    expect(applyPreset(draft(), portrait, sdxl)).toMatchObject({ aspect: '2:3', width: 832, height: 1216 });
    expect(applyPreset(draft(), portrait)).toMatchObject({ aspect: '2:3', width: 512, height: 768 });
    // A model's own size wins over its family's (SD 2.x 768-v draws at 768; found by review).
    const v768 = model('sd21', false, { family: 'SD2', defaults: { steps: 20, cfg_scale: 7, sampler: 'DPM++ 2M', schedule: 'Karras', width: 768, height: 768 } });
    expect(drawBase(v768)).toBe(768);
    expect(applyPreset(draft(), { ...preset, width: 512, height: 512 }, v768)).toMatchObject({ aspect: '1:1', width: 768, height: 768 });
    // A size that is no family's shape (a user's own 64x64) stays as it is.
    expect(applyPreset(draft(), { ...preset, width: 64, height: 64 }, sdxl)).toMatchObject({ aspect: 'custom', width: 64, height: 64 });
    expect(applyPreset(draft(), { ...preset, width: 600, height: 520 }, sdxl)).toMatchObject({ aspect: 'custom', width: 600, height: 520 });
  });

  it('a preset made from the draft carries its size and quality settings', () => {
    const p = presetFromDraft(draft({ width: 64, height: 64, steps: 3, sampler: '', negative_prompt: ' grainy ' }), ' Mine ');
    expect(p).toMatchObject({ name: 'Mine', width: 64, height: 64, steps: 3, sampler: null, negative_prompt: 'grainy' });
  });
});

describe('parametersText', () => {
  it('uses the PNG’s own text when there is one', () => {
    expect(parametersText({ ...image, parameters: 'stored text' })).toBe('stored text');
  });

  it('writes A1111-style text otherwise', () => {
    expect(parametersText(image)).toBe(
      'a lighthouse\nNegative prompt: blurry\nSteps: 12, Sampler: Euler a, Schedule type: Karras, CFG scale: 6.5, Seed: 42, Size: 64x96, Model: tiny-sd1',
    );
  });

  // Found by review: a picture added from the images folder without settings copied as
  // "Steps: null, ... Seed: null".
  it('leaves out what a picture does not know', () => {
    const bare = { ...image, negative_prompt: '', model: null, sampler: null, schedule: null, steps: null, cfg_scale: null, seed: null, parameters: '' };
    expect(parametersText(bare)).toBe('a lighthouse\nSize: 64x96');
  });
});

describe('recalling a hires picture', () => {
  const hiresText =
    'a castle\nSteps: 12, Sampler: Euler a, CFG scale: 7, Seed: 42, Size: 64x96, Model: tiny-sd1, RNG: CPU, Denoising strength: 0.55, Hires upscale: 1.5, Hires steps: 3, Hires upscaler: "Latent (nearest-exact)"';

  it('reads the first-pass size and the hires settings from the parameters text', () => {
    expect(hiresFromParameters(hiresText)).toEqual({ width: 64, height: 96, hires: true, hires_scale: 1.5, hires_denoise: 0.55, hires_steps: 3, hires_upscaler: 'Latent (nearest-exact)' });
    expect(hiresFromParameters('a cat\nSteps: 4, Sampler: Euler, Seed: 1, Size: 64x64')).toBeNull();
    // A size instead of a factor: the factor it comes to.
    expect(hiresFromParameters('a\nSteps: 4, Seed: 1, Size: 512x512, Hires resize: 768x768')?.hires_scale).toBe(1.5);
  });

  // Found by review: the file's (enlarged) size was recalled, so the next picture was enlarged twice.
  it('takes the first-pass size, not the file size, and turns the hires fix off for one-pass pictures', () => {
    const d = recallImage(draft({ hires: false }), { ...image, width: 96, height: 144, parameters: hiresText });
    expect(d).toMatchObject({ width: 64, height: 96, hires: true, hires_scale: 1.5, hires_steps: 3 });
    expect(outputSize(d)).toEqual({ width: 96, height: 144 });
    const plain = recallImage(draft({ hires: true }), { ...image, parameters: 'a\nSteps: 4, Seed: 1, Size: 64x96' });
    expect(plain).toMatchObject({ width: 64, height: 96, hires: false });
  });

  it('shows the size the rounded factor gives', () => {
    // 1.506 is sent as 1.51: 1024 * 1.51 = 1546.24 -> 1544.
    expect(outputSize(draft({ hires: true, hires_scale: 1.506, width: 1024, height: 1024 }))).toEqual({ width: 1544, height: 1544 });
  });
});

describe('parseDraft', () => {
  it('falls back to defaults for missing, damaged or wrongly typed values', () => {
    expect(parseDraft(null)).toEqual(DEFAULT_DRAFT);
    expect(parseDraft('{not json')).toEqual(DEFAULT_DRAFT);
    expect(parseDraft(JSON.stringify({ prompt: 'x', steps: 'many' }))).toEqual({ ...DEFAULT_DRAFT, prompt: 'x' });
  });

  it('keeps clip skip and the refiner, and reads a draft from before them', () => {
    expect(DEFAULT_DRAFT).toMatchObject({ clip_skip: null, refiner: '', refiner_switch: 0.8 });
    expect(parseDraft(JSON.stringify({ prompt: 'x' }))).toMatchObject({ clip_skip: null, refiner: '', refiner_switch: 0.8 });
    expect(parseDraft(JSON.stringify({ clip_skip: 2, refiner: 'r', refiner_switch: 0.65 }))).toMatchObject({ clip_skip: 2, refiner: 'r', refiner_switch: 0.65 });
    expect(parseDraft(JSON.stringify({ clip_skip: 'two' })).clip_skip).toBeNull();
    expect(parseDraft(JSON.stringify({ clip_skip: {} })).clip_skip).toBeNull();
  });
});
