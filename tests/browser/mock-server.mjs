// A stand-in for `local-diffusers serve`, for working on the UI and its browser tests without the
// Rust server. It serves ui/dist the way ld-server does (session token injected into index.html,
// the same strict Content Security Policy) and answers the few API routes the UI uses so far with
// this machine's real facts.
//
// Run:  node tests/browser/mock-server.mjs [--port 7861] [--gpu]
//   --gpu (or MOCK_GPU=1) pretends an NVIDIA card is present, to see that side of the UI.
//   LD_SESSION sets the session token (random otherwise); use the same one for `npm run dev`.
// The browser test starts it by itself when LD_URL is not set.

import { randomBytes } from 'node:crypto';
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

/**
 * Starts the mock on 127.0.0.1. Resolves to { url, token, close() }.
 * port 0 picks a free port.
 */
export async function startMockServer({ port = 0, gpu = false, token, dist = DEFAULT_DIST, dataDir } = {}) {
  const session = token || randomBytes(24).toString('base64url');
  const system = () => systemInfo({ gpu, dataDir });

  const server = createServer(async (req, res) => {
    const url = new URL(req.url ?? '/', 'http://localhost');
    const { pathname } = url;

    if (pathname.startsWith('/api/')) {
      if (req.method !== 'GET') return apiError(res, 405, 'invalid_request', 'Only GET is mocked.', null);
      switch (pathname) {
        case '/api/v1/health':
          return sendJson(res, 200, { status: 'ok', version: '0.1.0' });
        case '/api/v1/system':
          return sendJson(res, 200, system());
        case '/api/v1/settings':
          if (req.headers['x-ld-session'] !== session) {
            return apiError(
              res,
              401,
              'unauthorized',
              'Only the Local Diffusers window can see or change settings.',
              'Open Local Diffusers from its own window or address, then try again.',
            );
          }
          return sendJson(res, 200, { data_dir: system().data_dir });
        default:
          return apiError(res, 404, 'not_found', 'There is nothing at this address.', null);
      }
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
