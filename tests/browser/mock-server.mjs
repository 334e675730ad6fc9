// A stand-in for `local-diffusers serve`, for working on the UI and its browser tests without the
// Rust server. It serves ui/dist the way ld-server does (session token injected into index.html,
// the same strict Content Security Policy) and answers the few API routes the UI uses so far with
// this machine's real facts, plus an in-memory stand-in for generation (jobs that "draw" a
// plain-coloured PNG with A1111-style parameters in a few steps), the gallery, presets, models,
// settings, characters (with card import) and pictures from a chat (a crude trigger and prompt
// writer), so every page can be worked on. The real server is what the tests prove.
//
// Run:  node tests/browser/mock-server.mjs [--port 7861] [--gpu]
//   --gpu (or MOCK_GPU=1) pretends an NVIDIA card is present, to see that side of the UI.
//   LD_SESSION sets the session token (random otherwise); use the same one for `npm run dev`.
// The browser test starts it by itself when LD_URL is not set.

import { randomBytes } from 'node:crypto';
import { deflateSync, crc32 } from 'node:zlib';
import { readFileSync } from 'node:fs';
import { readFile } from 'node:fs/promises';
import { createServer } from 'node:http';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';

const HERE = path.dirname(fileURLToPath(import.meta.url));
export const DEFAULT_DIST = path.resolve(HERE, '../../ui/dist');

// The policy ld-server sends with the UI. Keep the two in step.
export const CSP = [
  "default-src 'self'",
  "script-src 'self'",
  "style-src 'self'",
  "img-src 'self' data: blob:",
  "connect-src 'self'",
  "font-src 'self'",
  "object-src 'none'",
  "base-uri 'none'",
  "form-action 'self'",
  "frame-ancestors 'none'",
].join('; ');

const TYPES = {
  '.html': 'text/html; charset=utf-8',
  '.js': 'text/javascript; charset=utf-8',
  '.css': 'text/css; charset=utf-8',
  '.svg': 'image/svg+xml',
  '.png': 'image/png',
  '.ico': 'image/x-icon',
  '.json': 'application/json',
  '.woff2': 'font/woff2',
};

const GB = 1024 ** 3;

function firstMatch(text, re) {
  const m = text.match(re);
  return m ? m[1].trim() : null;
}

function tryRead(file) {
  try {
    return readFileSync(file, 'utf8');
  } catch {
    return '';
  }
}

/** A small GET /api/v1/diagnostics answer for a machine without a GPU (issue 8). */
function mockDiagnostics(system) {
  const { data_dir: dataDir, ...hardware } = system;
  const reason = 'No graphics card this app can use was found.';
  return {
    version: '0.1.0',
    system: hardware,
    recommendation: {
      device: { value: 'cpu', reason },
      precision: { value: 'fp32', reason: 'Processors draw full precision fastest.' },
      low_vram: { value: false, reason: 'Not needed on the processor.' },
      strategies: [],
      budget_bytes: 8 * 1024 ** 3,
      families: [{ family: 'SD1', max_size: 1024, native_size: 512, needed_bytes: 5 * 1024 ** 3, reason: 'Fits.' }],
      notes: [],
    },
    models: { count: 0, total_bytes: 0, families: [] },
    disk: { path: dataDir, free_bytes: 10 * 1024 ** 3, total_bytes: 100 * 1024 ** 3 },
    problems: [],
    troubleshooting: [],
    details_text: '\nRecommended settings\nDevice:    processor\n',
    text: 'Local Diffusers diagnostics\n',
  };
}

/** This machine's facts in the shape of GET /api/v1/system. */
export function systemInfo({ gpu = false, dataDir = path.resolve('tmp') } = {}) {
  const cpuinfo = tryRead('/proc/cpuinfo');
  const osRelease = tryRead('/etc/os-release');
  const cpus = os.cpus();
  const flags = (firstMatch(cpuinfo, /^flags\s*:(.*)$/m) ?? '').split(/\s+/);
  const interesting = ['sse4_1', 'sse4_2', 'avx', 'avx2', 'fma', 'f16c', 'avx512f', 'avx512bw', 'avx512_vnni', 'avx512_bf16', 'amx_bf16'];
  const coresPerSocket = Number(firstMatch(cpuinfo, /^cpu cores\s*:(.*)$/m));
  const sockets = new Set([...cpuinfo.matchAll(/^physical id\s*:(.*)$/gm)].map((m) => m[1].trim())).size || 1;

  return {
    os: {
      name: firstMatch(osRelease, /^NAME="?([^"\n]*)"?$/m) ?? os.type(),
      version: firstMatch(osRelease, /^VERSION_ID="?([^"\n]*)"?$/m) ?? '',
      kernel: os.release(),
      arch: os.machine(),
    },
    cpu: {
      name: firstMatch(cpuinfo, /^model name\s*:(.*)$/m) ?? cpus[0]?.model.trim() ?? 'Unknown processor',
      physical_cores: Number.isFinite(coresPerSocket) && coresPerSocket > 0 ? coresPerSocket * sockets : null,
      logical_cores: cpus.length,
      features: interesting.filter((f) => flags.includes(f)),
    },
    memory: { total_bytes: os.totalmem(), available_bytes: os.freemem() },
    gpus: gpu
      ? [
          {
            name: 'NVIDIA GeForce RTX 4070 (mock)',
            vram_total_bytes: 12 * GB,
            vram_free_bytes: 10.8 * GB,
            driver_version: '550.54.14',
            cuda_version: '12.4',
            compute_capability: '8.9',
          },
        ]
      : [],
    gpu_status: gpu
      ? { available: true, reason: null }
      : {
          available: false,
          reason: 'No NVIDIA driver library (libnvidia-ml.so.1) was found, so there is no NVIDIA graphics card to use.',
        },
    build: { cuda: gpu, metal: false },
    data_dir: dataDir,
  };
}

function sendJson(res, status, body) {
  const text = JSON.stringify(body);
  res.writeHead(status, {
    'Content-Type': 'application/json',
    'Content-Length': Buffer.byteLength(text),
    'Cache-Control': 'no-store',
    'X-Content-Type-Options': 'nosniff',
  });
  res.end(text);
}

function apiError(res, status, code, message, hint) {
  sendJson(res, status, { code, message, hint });
}

// ---- PNG with a parameters chunk (what the real gallery writes) ----

function chunk(type, data) {
  const len = Buffer.alloc(4);
  len.writeUInt32BE(data.length);
  const body = Buffer.concat([Buffer.from(type, 'latin1'), data]);
  const crc = Buffer.alloc(4);
  crc.writeUInt32BE(crc32(body) >>> 0);
  return Buffer.concat([len, body, crc]);
}

export function makePng(width, height, rgb, parameters) {
  const ihdr = Buffer.alloc(13);
  ihdr.writeUInt32BE(width, 0);
  ihdr.writeUInt32BE(height, 4);
  ihdr[8] = 8; // bit depth
  ihdr[9] = 2; // RGB
  const row = Buffer.alloc(1 + width * 3);
  for (let x = 0; x < width; x++) row.set(rgb, 1 + x * 3);
  const raw = Buffer.concat(Array.from({ length: height }, () => row));
  const parts = [Buffer.from([137, 80, 78, 71, 13, 10, 26, 10]), chunk('IHDR', ihdr)];
  if (parameters) parts.push(chunk('tEXt', Buffer.from(`parameters\0${parameters}`, 'latin1')));
  parts.push(chunk('IDAT', deflateSync(raw)), chunk('IEND', Buffer.alloc(0)));
  return Buffer.concat(parts);
}

function pngText(buf, key = 'parameters') {
  if (buf.length < 8 || buf.readUInt32BE(0) !== 0x89504e47) return null;
  let at = 8;
  while (at + 8 <= buf.length) {
    const len = buf.readUInt32BE(at);
    const type = buf.toString('latin1', at + 4, at + 8);
    if (type === 'tEXt') {
      const data = buf.subarray(at + 8, at + 8 + len).toString('latin1');
      const nul = data.indexOf('\0');
      if (data.slice(0, nul) === key) return data.slice(nul + 1);
    }
    at += 12 + len;
  }
  return null;
}

function parseParameters(text) {
  const lines = text.split('\n');
  const last = lines.pop() ?? '';
  const fields = Object.fromEntries([...last.matchAll(/([A-Za-z][A-Za-z0-9 ]*): ("[^"]*"|[^,]*)(?:,|$)/g)].map((m) => [m[1].trim(), m[2].trim()]));
  const neg = lines.findIndex((l) => l.startsWith('Negative prompt:'));
  const prompt = (neg >= 0 ? lines.slice(0, neg) : lines).join('\n');
  const negative = neg >= 0 ? lines.slice(neg).join('\n').replace(/^Negative prompt:\s*/, '') : '';
  const [w, h] = (fields.Size ?? '').split('x').map(Number);
  const n = (v) => (v === undefined ? null : Number(v));
  return {
    source: 'a1111',
    prompt,
    negative_prompt: negative,
    steps: n(fields.Steps),
    cfg_scale: n(fields['CFG scale']),
    seed: n(fields.Seed),
    width: w || null,
    height: h || null,
    sampler: fields.Sampler ?? null,
    schedule: fields['Schedule type'] ?? null,
    model: fields.Model ?? null,
    raw: text,
  };
}

function parametersOf(r) {
  const lines = [r.prompt];
  if (r.negative_prompt) lines.push(`Negative prompt: ${r.negative_prompt}`);
  lines.push(
    `Steps: ${r.steps}, Sampler: ${r.sampler}, Schedule type: ${r.schedule}, CFG scale: ${r.cfg_scale}, Seed: ${r.seed}, Size: ${r.width}x${r.height}, Model: ${r.model}, Version: mock`,
  );
  return lines.join('\n');
}

const BUILTIN_PRESETS = [
  { id: 'portrait', name: 'Portrait', description: 'A person, upright picture.', width: 512, height: 768, steps: 25, cfg_scale: 7, sampler: 'DPM++ 2M', schedule: 'Karras', prompt_prefix: 'portrait photo', prompt_suffix: 'soft light', negative_prompt: 'deformed' },
  { id: 'scene', name: 'Scene', description: 'A wide landscape or room.', width: 768, height: 512, steps: 25, cfg_scale: 7, sampler: 'DPM++ 2M', schedule: 'Karras', prompt_prefix: '', prompt_suffix: 'wide shot', negative_prompt: '' },
  { id: 'quick', name: 'Quick', description: 'Fast drafts.', width: null, height: null, steps: 12, cfg_scale: 6, sampler: 'Euler a', schedule: null, prompt_prefix: '', prompt_suffix: '', negative_prompt: '' },
  { id: 'quality', name: 'Quality', description: 'Slow and detailed.', width: null, height: null, steps: 40, cfg_scale: 7, sampler: 'DPM++ 2M', schedule: 'Karras', prompt_prefix: '', prompt_suffix: 'highly detailed', negative_prompt: 'blurry' },
].map((p) => ({ ...p, builtin: true }));

function presetToml(p) {
  const q = (v) => JSON.stringify(v);
  const lines = [`name = ${q(p.name)}`, `description = ${q(p.description)}`];
  for (const k of ['width', 'height', 'steps', 'cfg_scale']) if (p[k] !== null) lines.push(`${k} = ${p[k]}`);
  for (const k of ['sampler', 'schedule']) if (p[k]) lines.push(`${k} = ${q(p[k])}`);
  for (const k of ['prompt_prefix', 'prompt_suffix', 'negative_prompt']) lines.push(`${k} = ${q(p[k])}`);
  return lines.join('\n') + '\n';
}

function parseToml(text) {
  const out = {};
  for (const line of text.split('\n')) {
    const m = /^\s*([a-z_]+)\s*=\s*(.+?)\s*$/.exec(line);
    if (m) out[m[1]] = JSON.parse(m[2]);
  }
  return out;
}

function readBody(req) {
  return new Promise((resolve, reject) => {
    const parts = [];
    req.on('data', (c) => parts.push(c));
    req.on('end', () => resolve(Buffer.concat(parts)));
    req.on('error', reject);
  });
}

// A few entries of models/catalog.toml (the real server builds the whole file in).
const CATALOG = [
  { id: 'sd-turbo', name: 'SD Turbo', repo: 'stabilityai/sd-turbo', revision: 'main', family: 'SD2', variant: 'fp16', size_gb: 2.6, min_vram_gb: 4, native_size: 512, cpu_ok: true, fast: true, style: ['general'], licence: 'Stability AI Non-Commercial Research Community License', description: 'Fast: a picture in 1 to 4 steps. The best start on a computer without a graphics card.' },
  { id: 'sd-1.5', name: 'Stable Diffusion 1.5', repo: 'stable-diffusion-v1-5/stable-diffusion-v1-5', revision: 'main', family: 'SD1', variant: 'fp16', size_gb: 2.6, min_vram_gb: 4, native_size: 512, cpu_ok: true, fast: false, style: ['general'], licence: 'CreativeML Open RAIL-M', description: 'The classic all-rounder; most community styles and LoRAs are made for it.' },
  { id: 'sdxl-base', name: 'Stable Diffusion XL 1.0', repo: 'stabilityai/stable-diffusion-xl-base-1.0', revision: 'main', family: 'SDXL', variant: 'fp16', size_gb: 6.9, min_vram_gb: 8, native_size: 1024, cpu_ok: false, fast: false, style: ['general', 'realistic'], licence: 'CreativeML Open RAIL++-M', description: 'High-quality 1024×1024 pictures; needs a graphics card with 8 GB or more.' },
];

/** The in-memory app behind the mock's API. */
function createApp({ dataDir }) {
  const app = {
    settings: {
      default_model: null,
      prompt_prefix: '',
      prompt_suffix: '',
      negative_prompt: '',
      precision: 'auto',
      low_vram: 'auto',
      allowed_origins: [],
      models_dirs: [],
      clip_skip: 1,
      chat_writer: { enabled: false, url: '', model: '', api_key: '', system_prompt: '', timeout_seconds: 30 },
    },
    characters: [],
    models: [
      { name: 'tiny-sd1', family: 'SD1', path: path.resolve('models/tiny/sd1'), size_bytes: 3_200_000, format: 'diffusers', managed: false },
      { name: 'tiny-sd2', family: 'SD2', path: path.resolve('models/tiny/sd2'), size_bytes: 3_400_000, format: 'diffusers', managed: false },
    ],
    presets: [...BUILTIN_PRESETS],
    images: [],
    files: new Map(),
    jobs: [],
    nextJob: 1,
    nextImage: 1,
    clients: new Set(),
    downloads: new Map(),
    dataDir,
  };

  app.emit = (event) => {
    const text = `event: ${event.type}\ndata: ${JSON.stringify(event)}\n\n`;
    for (const res of app.clients) res.write(text);
  };

  app.queued = () => app.jobs.filter((j) => j.state === 'queued');

  /** A pretend catalog download: 40 MB in 20 steps of 100 ms, then the model is "installed". */
  app.download = (entry) => {
    const known = app.downloads.get(entry.id);
    if (known?.state === 'downloading') return known;
    const total = 40 * 1024 * 1024;
    const d = { id: entry.id, name: entry.name, state: 'downloading', progress: known?.progress ?? null, error: null, cancel: false };
    app.downloads.set(entry.id, d);
    const send = () => app.emit({ type: 'download', ...publicDownload(d) });
    send();
    const tick = () => {
      if (d.cancel) {
        d.state = 'cancelled';
        return send();
      }
      const done = Math.min(total, (d.progress?.bytes_done ?? 0) + total / 20);
      d.progress = { file: done < total / 2 ? 'text_encoder/model.safetensors' : 'unet/diffusion_pytorch_model.safetensors', files_done: done < total / 2 ? 3 : 6, files_total: 12, bytes_done: done, bytes_total: total };
      if (done >= total) {
        d.state = 'done';
        d.progress = { ...d.progress, file: '', files_done: 12 };
        app.models.push({ name: entry.id, family: entry.family, path: path.join(app.dataDir, 'models', entry.id), size_bytes: total, format: 'diffusers', managed: true, catalog_id: entry.id });
        return send();
      }
      send();
      setTimeout(tick, 100);
    };
    setTimeout(tick, 100);
    return d;
  };

  app.pump = () => {
    if (app.jobs.some((j) => j.state === 'running')) return;
    const job = app.queued()[0];
    if (!job) return;
    job.state = 'running';
    job.position = null;
    job.started_at = Date.now();
    job.stage = 'sampling';
    app.emit({ type: 'started', job: job.id });
    app.queued().forEach((j, i) => (j.position = i + 1));
    const tick = () => {
      if (job.state !== 'running') return;
      if (job.cancel) {
        job.state = 'cancelled';
        job.stage = 'finished';
        job.finished_at = Date.now();
        app.emit({ type: 'cancelled', job: job.id });
        return app.pump();
      }
      job.step++;
      if (job.step > job.steps) {
        // Finish this picture of the batch.
        const seed = job.seed + job.image;
        const rgb = [seed % 256, (seed >> 8) % 256, (seed * 7) % 256];
        const record = {
          id: app.nextImage++,
          file: `mock-${seed}.png`,
          prompt: job.prompt,
          negative_prompt: job.negative_prompt,
          model: job.model,
          sampler: job.sampler,
          schedule: job.schedule,
          steps: job.steps,
          cfg_scale: job.cfg_scale,
          seed,
          width: job.width,
          height: job.height,
          created_at: Date.now(),
          favourite: false,
          trashed: false,
        };
        record.parameters = parametersOf(record);
        app.files.set(record.id, makePng(Math.min(job.width, 256), Math.min(job.height, 256), rgb, record.parameters));
        app.images.unshift(record);
        job.images.push(record);
        job.image++;
        job.step = 0;
        if (job.image >= job.batch) {
          job.image = job.batch - 1;
          job.state = 'done';
          job.stage = 'finished';
          job.progress = 1;
          job.eta_ms = 0;
          job.finished_at = Date.now();
          app.emit({ type: 'done', job: job.id, images: job.images.map((i) => i.id) });
          return app.pump();
        }
      }
      job.progress = (job.image * job.steps + job.step) / (job.batch * job.steps);
      job.eta_ms = Math.round((1 - job.progress) * job.batch * job.steps * app.stepMs);
      app.emit({ type: 'progress', job: job.id, stage: 'sampling', image: job.image, batch: job.batch, step: job.step, steps: job.steps, progress: job.progress, eta_ms: job.eta_ms });
      if (job.step % 4 === 1) {
        const png = makePng(8, 8, [job.step * 10 % 256, 80, 160], null);
        app.emit({ type: 'preview', job: job.id, image: `data:image/png;base64,${png.toString('base64')}` });
      }
      setTimeout(tick, app.stepMs);
    };
    setTimeout(tick, app.stepMs);
  };
  app.stepMs = 30;

  app.submit = (body) => {
    const preset = body.preset ? app.presets.find((p) => p.id === body.preset) : null;
    if (body.preset && !preset) return { error: [404, 'not_found', `There is no preset called '${body.preset}'.`, 'Choose one from the list.'] };
    const model = body.model ? app.models.find((m) => m.name === body.model) : app.models.find((m) => m.name === app.settings.default_model) ?? app.models[0];
    if (!model) return { error: [404, 'model_missing', `There is no model called '${body.model}'.`, 'Pick one from the list.'] };
    const batch = body.batch_size ?? 1;
    if (batch < 1 || batch > 8) return { error: [400, 'invalid_request', `batch_size must be between 1 and 8, got ${batch}.`, 'Ask for fewer images at a time.'] };
    const join = (...parts) => parts.map((p) => (p ?? '').trim()).filter(Boolean).join(', ');
    const job = {
      id: `job-${app.nextJob++}`,
      state: 'queued',
      stage: 'waiting',
      position: app.queued().length + 1,
      prompt: body.ignore_affixes ? body.prompt : join(app.settings.prompt_prefix, preset?.prompt_prefix, body.prompt, preset?.prompt_suffix, app.settings.prompt_suffix),
      negative_prompt: join(body.negative_prompt ?? app.settings.negative_prompt, preset?.negative_prompt),
      model: model.name,
      width: body.width ?? preset?.width ?? 512,
      height: body.height ?? preset?.height ?? 512,
      steps: body.steps ?? preset?.steps ?? 20,
      cfg_scale: body.cfg_scale ?? preset?.cfg_scale ?? 7,
      sampler: body.sampler ?? preset?.sampler ?? 'DPM++ 2M',
      schedule: body.schedule ?? preset?.schedule ?? 'Karras',
      seed: body.seed === undefined || body.seed === -1 ? Math.floor(Math.random() * 2 ** 32) : body.seed,
      batch,
      image: 0,
      step: 0,
      progress: 0,
      eta_ms: null,
      images: [],
      error: null,
      created_at: Date.now(),
      started_at: null,
      finished_at: null,
    };
    app.jobs.push(job);
    app.emit({ type: 'queued', job: job.id, position: job.position });
    setTimeout(app.pump, 0);
    return { job };
  };

  return app;
}

function publicDownload(d) {
  const { cancel: _cancel, ...rest } = d;
  return rest;
}

function publicJob(job) {
  const { cancel: _cancel, ...rest } = job;
  return rest;
}

/** Answers /api/v1/* from the in-memory app; returns false for routes it does not know. */
async function handleApi(app, req, res, url, session) {
  const { pathname, searchParams } = url;
  const method = req.method ?? 'GET';
  const authed = req.headers['x-ld-session'] === session;
  const needSession = () => {
    if (authed) return false;
    apiError(res, 401, 'unauthorized', 'Only the Local Diffusers window can do this.', 'Open Local Diffusers from its own window or address, then try again.');
    return true;
  };
  const json = async () => {
    const body = await readBody(req);
    try {
      return JSON.parse(body.toString('utf8') || 'null');
    } catch {
      return undefined;
    }
  };
  const seg = pathname.split('/').slice(3); // after /api/v1

  if (pathname === '/api/v1/settings') {
    if (needSession()) return true;
    if (method === 'PUT') {
      const body = await json();
      if (!body || typeof body !== 'object') return apiError(res, 400, 'invalid_request', 'These settings could not be read.', 'Send the settings object as JSON.'), true;
      app.settings = { ...app.settings, ...body };
    }
    return sendJson(res, 200, { ...app.settings, data_dir: app.dataDir, warning: null }), true;
  }
  if (pathname === '/api/v1/models') return sendJson(res, 200, { models: app.models, default: app.settings.default_model ?? app.models[0]?.name ?? null }), true;
  if (pathname === '/api/v1/catalog') {
    const models = CATALOG.map((e) => ({ ...e, fits: e.cpu_ok, installed: app.models.some((m) => m.catalog_id === e.id) }));
    return sendJson(res, 200, { models, suggested: 'sd-turbo', vram_gb: null }), true;
  }
  if (pathname === '/api/v1/setup') {
    return sendJson(res, 200, {
      has_model: app.models.length > 0,
      suggested: CATALOG[0],
      downloads: [...app.downloads.values()].map(publicDownload),
      offline_hint: 'No internet? Choose "I already have a model" below to use a folder with models you already have.',
    }), true;
  }
  if (seg[0] === 'downloads') {
    if (seg.length === 1 && method === 'GET') return sendJson(res, 200, [...app.downloads.values()].map(publicDownload)), true;
    if (needSession()) return true;
    if (seg.length === 1 && method === 'POST') {
      const body = await json();
      const entry = CATALOG.find((e) => e.id === body?.id);
      if (!entry) return apiError(res, 404, 'not_found', `There is no catalog model '${body?.id}'.`, `Choose one of: ${CATALOG.map((e) => e.id).join(', ')}.`), true;
      return sendJson(res, 202, publicDownload(app.download(entry))), true;
    }
    const d = app.downloads.get(seg[1]);
    if (!d || seg[2] !== 'cancel' || method !== 'POST') return apiError(res, 404, 'not_found', 'There is no such download.', 'Refresh the Models page.'), true;
    d.cancel = true;
    return sendJson(res, 200, publicDownload(d)), true;
  }
  if (seg[0] === 'models' && seg.length === 2 && method === 'DELETE') {
    if (needSession()) return true;
    const name = decodeURIComponent(seg[1]);
    const model = app.models.find((m) => m.name === name);
    if (!model) return apiError(res, 404, 'not_found', 'There is no such model.', 'Refresh the Models page.'), true;
    if (!model.managed) {
      return apiError(res, 403, 'forbidden', `'${name}' is in a folder you added (${model.path}); Local Diffusers only deletes models it downloaded.`, 'Delete it with your file manager if you no longer want it, or remove its folder from Settings.'), true;
    }
    app.models = app.models.filter((m) => m !== model);
    app.downloads.delete(model.catalog_id);
    return sendJson(res, 200, { deleted: name }), true;
  }
  if (pathname === '/api/v1/samplers') return sendJson(res, 200, { samplers: ['Euler', 'Euler a', 'DPM++ 2M', 'DPM++ SDE', 'DDIM', 'UniPC'], default: 'DPM++ 2M' }), true;
  if (pathname === '/api/v1/schedules') return sendJson(res, 200, { schedules: ['Automatic', 'Uniform', 'Karras', 'Exponential'], default: 'Karras' }), true;
  if (pathname === '/api/v1/networks') return sendJson(res, 200, { loras: [], embeddings: [] }), true;

  if (pathname === '/api/v1/events') {
    res.writeHead(200, { 'Content-Type': 'text/event-stream', 'Cache-Control': 'no-store', Connection: 'keep-alive' });
    res.write(': hello\n\n');
    app.clients.add(res);
    req.on('close', () => app.clients.delete(res));
    return true;
  }

  if (seg[0] === 'jobs') {
    if (seg.length === 1 && method === 'POST') {
      const body = await json();
      if (!body || typeof body.prompt !== 'string') return apiError(res, 400, 'invalid_request', 'Send JSON like {"prompt": "a lighthouse"}.', null), true;
      const { job, error } = app.submit(body);
      if (error) return apiError(res, ...error), true;
      return sendJson(res, 202, publicJob(job)), true;
    }
    if (seg.length === 1) {
      const list = [...app.jobs].reverse().slice(0, 50).map(publicJob);
      return sendJson(res, 200, list), true;
    }
    const job = app.jobs.find((j) => j.id === seg[1]);
    if (!job) return apiError(res, 404, 'not_found', `There is no job '${seg[1]}'.`, null), true;
    if (seg[2] === 'cancel' && method === 'POST') {
      if (job.state === 'queued') {
        job.state = 'cancelled';
        job.stage = 'finished';
        job.finished_at = Date.now();
        app.emit({ type: 'cancelled', job: job.id });
        app.queued().forEach((j, i) => (j.position = i + 1));
      } else if (job.state === 'running') {
        job.cancel = true;
      }
      return sendJson(res, 200, publicJob(job)), true;
    }
    return sendJson(res, 200, publicJob(job)), true;
  }

  if (pathname === '/api/v1/trash' && method === 'DELETE') {
    if (needSession()) return true;
    const gone = app.images.filter((i) => i.trashed);
    app.images = app.images.filter((i) => !i.trashed);
    return sendJson(res, 200, { deleted: gone.length }), true;
  }

  if (seg[0] === 'images') {
    if (seg[1] === 'inspect' && method === 'POST') {
      const body = await readBody(req);
      if (body.readUInt32BE(0) !== 0x89504e47) return apiError(res, 400, 'invalid_request', 'This is not a PNG file.', 'Drop a PNG made by Local Diffusers, A1111, ComfyUI or InvokeAI.'), true;
      const text = pngText(body);
      if (!text) return sendJson(res, 200, { source: 'none', prompt: null, negative_prompt: null, steps: null, cfg_scale: null, seed: null, width: null, height: null, sampler: null, schedule: null, model: null, raw: null }), true;
      return sendJson(res, 200, parseParameters(text)), true;
    }
    if (seg.length === 1) {
      const q = (k) => searchParams.get(k);
      let list = app.images.filter((i) => i.trashed === (q('trash') === 'true'));
      if (q('search')) list = list.filter((i) => i.prompt.toLowerCase().includes(q('search').toLowerCase()));
      if (q('model')) list = list.filter((i) => i.model === q('model'));
      if (q('favourites') === 'true') list = list.filter((i) => i.favourite);
      if (q('since')) list = list.filter((i) => i.created_at >= Number(q('since')));
      if (q('until')) list = list.filter((i) => i.created_at < Number(q('until')));
      const offset = Number(q('offset') ?? 0);
      const limit = Number(q('limit') ?? 50);
      return sendJson(res, 200, { items: list.slice(offset, offset + limit), total: list.length }), true;
    }
    const image = app.images.find((i) => String(i.id) === seg[1]);
    if (!image) return apiError(res, 404, 'not_found', 'There is no such image.', 'It may have been deleted. Refresh the gallery.'), true;
    if ((seg[2] === 'file' || seg[2] === 'thumbnail') && method === 'GET') {
      const png = app.files.get(image.id);
      res.writeHead(200, { 'Content-Type': 'image/png', 'Content-Length': png.length, 'X-Content-Type-Options': 'nosniff' });
      res.end(png);
      return true;
    }
    if (seg[2] === 'favourite' && method === 'PUT') {
      if (needSession()) return true;
      const body = await json();
      image.favourite = Boolean(body?.favourite);
      return sendJson(res, 200, image), true;
    }
    if (seg[2] === 'restore' && method === 'POST') {
      if (needSession()) return true;
      image.trashed = false;
      return sendJson(res, 200, image), true;
    }
    if (seg.length === 2 && method === 'DELETE') {
      if (needSession()) return true;
      image.trashed = true;
      return sendJson(res, 200, { trashed: image.id }), true;
    }
    return sendJson(res, 200, image), true;
  }

  if (seg[0] === 'characters') return handleCharacters(app, req, res, seg, method, needSession, json);
  if (pathname === '/api/v1/chat/illustrate' && method === 'POST') return illustrate(app, res, await json());

  if (seg[0] === 'presets') {
    const slug = (name) => name.toLowerCase().replace(/[^a-z0-9]+/g, '-').replace(/^-|-$/g, '') || 'preset';
    const fields = (b) => ({
      name: String(b.name ?? '').trim(),
      description: b.description ?? '',
      width: b.width ?? null,
      height: b.height ?? null,
      steps: b.steps ?? null,
      cfg_scale: b.cfg_scale ?? null,
      sampler: b.sampler ?? null,
      schedule: b.schedule ?? null,
      prompt_prefix: b.prompt_prefix ?? '',
      prompt_suffix: b.prompt_suffix ?? '',
      negative_prompt: b.negative_prompt ?? '',
    });
    const create = (b) => {
      const f = fields(b);
      if (!f.name) return apiError(res, 400, 'invalid_request', 'A preset needs a name.', 'Give it a name.'), true;
      let id = slug(f.name);
      while (app.presets.some((p) => p.id === id)) id += '-2';
      const preset = { id, ...f, builtin: false };
      app.presets.push(preset);
      return sendJson(res, 200, preset), true;
    };
    if (seg.length === 1 && method === 'POST') return needSession() || create(await json());
    if (seg.length === 1) return sendJson(res, 200, app.presets), true;
    if (seg[1] === 'import' && method === 'POST') {
      if (needSession()) return true;
      try {
        return create(parseToml((await readBody(req)).toString('utf8')));
      } catch {
        return apiError(res, 400, 'invalid_request', 'This preset file could not be read.', 'Choose a .toml file exported from Local Diffusers.'), true;
      }
    }
    const preset = app.presets.find((p) => p.id === seg[1]);
    if (!preset) return apiError(res, 404, 'not_found', `There is no preset '${seg[1]}'.`, 'Refresh the list of presets.'), true;
    if (seg[2] === 'export') {
      res.writeHead(200, { 'Content-Type': 'application/toml; charset=utf-8', 'Content-Disposition': `attachment; filename="${preset.id}.toml"` });
      res.end(presetToml(preset));
      return true;
    }
    if (method === 'PUT' || method === 'DELETE') {
      if (needSession()) return true;
      if (preset.builtin) return apiError(res, 400, 'invalid_request', 'Built-in presets cannot be changed.', 'Save a copy under a new name instead.'), true;
      if (method === 'DELETE') {
        app.presets = app.presets.filter((p) => p !== preset);
        return sendJson(res, 200, { deleted: preset.id }), true;
      }
      Object.assign(preset, fields(await json()));
      return sendJson(res, 200, preset), true;
    }
    return sendJson(res, 200, preset), true;
  }
  return false;
}

// ---- Characters and pictures from a chat (a rough stand-in for ld-core's characters and chat) ----

const EAGERNESS = ['off', 'low', 'normal', 'high'];

function characterFields(b) {
  return {
    name: String(b?.name ?? '').trim(),
    appearance: String(b?.appearance ?? '').trim(),
    style: b?.style ?? null,
    negative_prompt: b?.negative_prompt ?? '',
    seed: b?.seed ?? null,
    model: b?.model ?? null,
    avatar: b?.avatar ?? null,
    eagerness: EAGERNESS.includes(b?.eagerness) ? b.eagerness : 'normal',
  };
}

/** Name and look from a TavernAI/SillyTavern card: V1 at the top, V2/V3 under `data`. */
function fromCard(card) {
  const d = card?.data && typeof card.data === 'object' ? card.data : card;
  return { name: d?.name, appearance: String(d?.description ?? '').replaceAll('{{char}}', d?.name ?? '').slice(0, 2000) };
}

async function handleCharacters(app, req, res, seg, method, needSession, json) {
  const slug = (name) => name.toLowerCase().replace(/[^a-z0-9]+/g, '-').replace(/^-|-$/g, '') || 'character';
  const create = (b) => {
    const f = characterFields(b);
    if (!f.name) return apiError(res, 400, 'invalid_request', 'the character\'s name is not valid: it is empty', 'Correct the character and try again.'), true;
    if (f.avatar !== null && !app.images.some((i) => i.id === f.avatar)) return apiError(res, 400, 'invalid_request', 'The avatar is not an image in the gallery.', 'Choose the avatar from the character\'s portraits.'), true;
    let id = slug(f.name);
    for (let n = 2; app.characters.some((c) => c.id === id); n++) id = `${slug(f.name)}-${n}`;
    const c = { id, ...f };
    app.characters.push(c);
    app.characters.sort((a, b) => a.name.toLowerCase().localeCompare(b.name.toLowerCase()));
    return sendJson(res, 200, c), true;
  };
  if (seg.length === 1 && method === 'POST') return needSession() || create(await json());
  if (seg.length === 1) return sendJson(res, 200, app.characters), true;
  if (seg[1] === 'import' && method === 'POST') {
    if (needSession()) return true;
    const body = await readBody(req);
    const refuse = () => apiError(res, 400, 'invalid_request', 'this PNG has no character card in it (no \'chara\' or \'ccv3\' text)', 'Import a character exported from Local Diffusers, or a SillyTavern/TavernAI card (PNG or JSON).');
    try {
      if (body.length >= 8 && body.readUInt32BE(0) === 0x89504e47) {
        const text = pngText(body, 'ccv3') ?? pngText(body, 'chara');
        if (!text) return refuse(), true;
        return create(fromCard(JSON.parse(Buffer.from(text, 'base64').toString('utf8'))));
      }
      const v = JSON.parse(body.toString('utf8'));
      return create(v.spec || v.data || v.description !== undefined ? { ...characterFields(v), ...fromCard(v) } : v);
    } catch {
      return refuse(), true;
    }
  }
  const c = app.characters.find((x) => x.id === seg[1]);
  if (!c) return apiError(res, 404, 'not_found', `there is no character "${seg[1]}"`, 'Refresh the list of characters.'), true;
  if (seg[2] === 'export') {
    res.writeHead(200, { 'Content-Type': 'application/json', 'Content-Disposition': `attachment; filename="${c.id}.json"` });
    res.end(JSON.stringify(c, null, 2));
    return true;
  }
  if (seg[2] === 'portrait' && method === 'POST') {
    const opts = (await json()) ?? {};
    const { job, error } = app.submit({
      prompt: `portrait, ${c.name}, ${c.appearance}, looking at viewer`,
      negative_prompt: c.negative_prompt || undefined,
      preset: c.style ?? 'portrait',
      model: opts.model ?? c.model ?? undefined,
      seed: opts.seed ?? c.seed ?? undefined,
      steps: opts.steps,
      width: opts.width,
      height: opts.height,
    });
    if (error) return apiError(res, ...error), true;
    return sendJson(res, 202, { picture: true, mode: 'portrait', reason: `A portrait of ${c.name}.`, prompt: job.prompt, negative_prompt: job.negative_prompt, writer: 'built_in', note: null, job: publicJob(job) }), true;
  }
  if (method === 'PUT') {
    if (needSession()) return true;
    const f = characterFields(await json());
    if (!f.name) return apiError(res, 400, 'invalid_request', 'the character\'s name is not valid: it is empty', 'Correct the character and try again.'), true;
    if (f.avatar !== null && !app.images.some((i) => i.id === f.avatar)) return apiError(res, 400, 'invalid_request', 'The avatar is not an image in the gallery.', 'Choose the avatar from the character\'s portraits.'), true;
    Object.assign(c, f);
    return sendJson(res, 200, c), true;
  }
  if (method === 'DELETE') {
    if (needSession()) return true;
    app.characters = app.characters.filter((x) => x !== c);
    return sendJson(res, 200, { deleted: c.id }), true;
  }
  return sendJson(res, 200, c), true;
}

async function illustrate(app, res, body) {
  if (!body || !Array.isArray(body.messages)) return apiError(res, 400, 'invalid_request', 'Send {"messages": [...]}.', null), true;
  const mode = body.mode ?? 'auto';
  if (body.messages.length === 0 && mode !== 'portrait' && mode !== 'user') return apiError(res, 400, 'invalid_request', 'There are no messages to draw from.', 'Send the recent messages of the conversation.'), true;
  const cast = [];
  for (const r of body.characters ?? []) {
    const name = typeof r === 'string' ? r : r.name;
    const ours = app.characters.find((c) => c.id === name || c.name.toLowerCase() === String(name).toLowerCase());
    if (!ours && typeof r === 'string') return apiError(res, 404, 'not_found', `There is no character called '${r}'.`, 'Create the character on the Characters page.'), true;
    cast.push(ours ?? { name, appearance: r.appearance ?? '', style: null, eagerness: 'normal' });
  }
  const main = cast[0];
  const last = body.messages.at(-1)?.text ?? '';
  let used = mode;
  let reason = 'Asked for.';
  if (mode === 'auto') {
    const asked = /send me a (picture|photo|selfie)|selfie|show me|\/imagine/i.exec(last);
    if (!asked || main?.eagerness === 'off') {
      return sendJson(res, 200, { picture: false, mode: null, reason: 'Nobody asked for a picture, and the last message describes little to see.', prompt: null, negative_prompt: null, writer: null, note: null, job: null }), true;
    }
    used = 'portrait';
    reason = `The user asked for a picture ("${asked[0].toLowerCase()}").`;
  }
  const words = used === 'background' ? [last.replace(/"[^"]*"/g, '')] : [...cast.map((c) => `${c.name}, ${c.appearance}`), used === 'portrait' ? 'looking at viewer' : last.replace(/"[^"]*"/g, '')];
  const w = app.settings.chat_writer;
  const note = w.enabled ? `The chat server could not write the prompt (could not reach ${w.url}); the built-in writer was used.` : null;
  const { job, error } = app.submit({
    prompt: words.filter(Boolean).join(', '),
    preset: body.preset ?? main?.style ?? (used === 'portrait' || used === 'user' ? 'portrait' : 'scene'),
    model: body.model ?? main?.model ?? undefined,
    width: body.width,
    height: body.height,
    steps: body.steps,
    seed: body.seed ?? (used === 'portrait' ? main?.seed ?? undefined : undefined),
  });
  if (error) return apiError(res, ...error), true;
  return sendJson(res, 202, { picture: true, mode: used, reason, prompt: job.prompt, negative_prompt: job.negative_prompt, writer: 'built_in', note, job: publicJob(job) }), true;
}

/**
 * Starts the mock on 127.0.0.1. Resolves to { url, token, close() }.
 * port 0 picks a free port.
 */
export async function startMockServer({ port = 0, gpu = false, token, dist = DEFAULT_DIST, dataDir } = {}) {
  const session = token || randomBytes(24).toString('base64url');
  const system = () => systemInfo({ gpu, dataDir });
  const app = createApp({ dataDir: system().data_dir });

  const server = createServer(async (req, res) => {
    const url = new URL(req.url ?? '/', 'http://localhost');
    const { pathname } = url;

    if (pathname.startsWith('/api/')) {
      switch (pathname) {
        case '/api/v1/health':
          return sendJson(res, 200, { status: 'ok', version: '0.1.0' });
        case '/api/v1/system':
          return sendJson(res, 200, system());
        case '/api/v1/diagnostics':
          return sendJson(res, 200, mockDiagnostics(system()));
        case '/api/v1/diagnostics/self-test':
          return sendJson(res, 200, { ok: true, model: 'tiny/sd1', device: 'cpu', load_ms: 40, steps: 4, step_ms: [9, 9, 9, 9], ms_per_step: 9, decode_ms: 12, total_ms: 90, error: null });
      }
      try {
        if (await handleApi(app, req, res, url, session)) return;
      } catch (err) {
        return apiError(res, 500, 'internal', `The mock failed: ${err.message}`, null);
      }
      return apiError(res, 404, 'not_found', 'There is nothing at this address.', null);
    }

    // Static files from dist; anything that is not a file gets index.html (hash routing needs
    // only "/", but this is what ld-server does too).
    let decoded;
    try {
      decoded = decodeURIComponent(pathname);
    } catch {
      decoded = '/';
    }
    const rel = path.normalize(decoded).replace(/^([/\\])+/, '');
    let file = path.join(dist, rel);
    if (!file.startsWith(dist + path.sep) || rel === '' || rel === '.') file = path.join(dist, 'index.html');

    let body;
    try {
      body = await readFile(file);
    } catch {
      file = path.join(dist, 'index.html');
      try {
        body = await readFile(file);
      } catch {
        res.writeHead(500, { 'Content-Type': 'text/plain' });
        return res.end(`No UI build in ${dist}. Run: npm run --prefix ui build\n`);
      }
    }

    const ext = path.extname(file);
    const headers = {
      'Content-Type': TYPES[ext] ?? 'application/octet-stream',
      'X-Content-Type-Options': 'nosniff',
      'Referrer-Policy': 'no-referrer',
    };
    if (ext === '.html') {
      body = Buffer.from(
        body.toString('utf8').replace('</head>', `  <meta name="ld-session" content="${session}">\n  </head>`),
      );
      headers['Content-Security-Policy'] = CSP;
      headers['Cache-Control'] = 'no-store';
    }
    res.writeHead(200, headers);
    res.end(body);
  });

  await new Promise((resolve, reject) => {
    server.once('error', reject);
    server.listen(port, '127.0.0.1', resolve);
  });
  const address = server.address();
  const url = `http://127.0.0.1:${address.port}`;
  return {
    url,
    token: session,
    close: () =>
      new Promise((resolve) => {
        for (const client of app.clients) client.end();
        server.close(() => resolve());
        server.closeAllConnections();
      }),
  };
}

// Run as a program.
if (process.argv[1] && path.resolve(process.argv[1]) === fileURLToPath(import.meta.url)) {
  const args = process.argv.slice(2);
  const portArg = args.indexOf('--port');
  const port = portArg >= 0 ? Number(args[portArg + 1]) : Number(process.env.PORT ?? 7861);
  const gpu = args.includes('--gpu') || process.env.MOCK_GPU === '1';
  const mock = await startMockServer({ port, gpu, token: process.env.LD_SESSION });
  console.log(`Mock Local Diffusers at ${mock.url}  (session token ${mock.token})`);
  console.log(`UI dev: LD_URL=${mock.url} LD_SESSION=${mock.token} npm run --prefix ui dev`);
}
