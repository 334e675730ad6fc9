// A tiny stand-in for the Hugging Face hub, for the browser tests of downloads: every repository
// is models/tiny/sd1, served in the hub's layout, as ld-core's downloader reads it
// (crates/core/src/download.rs):
//   GET /api/models/{org}/{repo}/tree/{rev}?recursive=true -> [{type, path, size, lfs?}]
//       (.safetensors files with their LFS sha256, which the downloader checks)
//   GET /{org}/{repo}/resolve/{rev}/{path} -> the bytes, with an ETag; Range + If-Range resume (206)
// The speed can be limited (to watch progress and cancel) and the hub can be made to fail.
// The real server is pointed at it with HF_ENDPOINT.

import { createHash } from 'node:crypto';
import { readdirSync, readFileSync, statSync } from 'node:fs';
import { createServer } from 'node:http';
import path from 'node:path';
import { fileURLToPath } from 'node:url';

const HERE = path.dirname(fileURLToPath(import.meta.url));
export const TINY_SD1 = path.resolve(HERE, '../../models/tiny/sd1');

function walk(root, dir = root, out = []) {
  for (const name of readdirSync(dir).sort()) {
    const full = path.join(dir, name);
    if (statSync(full).isDirectory()) {
      out.push({ type: 'directory', path: path.relative(root, full).split(path.sep).join('/') });
      walk(root, full, out);
    } else {
      const bytes = readFileSync(full);
      const rel = path.relative(root, full).split(path.sep).join('/');
      const sha = createHash('sha256').update(bytes).digest('hex');
      out.push({ type: 'file', path: rel, size: bytes.length, bytes, sha });
    }
  }
  return out;
}

/**
 * Starts the hub on 127.0.0.1. Resolves to { url, requests, setRate(bytesPerSecond|null),
 * setFailure(status|null), close() }.
 */
export async function startFakeHub({ root = TINY_SD1 } = {}) {
  const entries = walk(root);
  const files = new Map(entries.filter((e) => e.type === 'file').map((e) => [e.path, e]));
  let rate = null;
  let failure = null;
  const requests = [];
  const open = new Set();

  const server = createServer((req, res) => {
    const url = new URL(req.url ?? '/', 'http://localhost');
    requests.push({ method: req.method, path: url.pathname, range: req.headers.range ?? null });
    const tree = /^\/api\/models\/[^/]+\/[^/]+\/tree\/[^/]+$/.exec(url.pathname);
    if (tree) {
      if (failure) {
        res.writeHead(failure, { 'Content-Type': 'application/json' });
        return res.end('{"error":"the fake hub was told to fail"}');
      }
      const list = entries.map((e) =>
        e.type === 'directory'
          ? { type: 'directory', oid: '0', path: e.path, size: 0 }
          : { type: 'file', oid: e.sha.slice(0, 40), path: e.path, size: e.size, ...(e.path.endsWith('.safetensors') ? { lfs: { oid: e.sha, size: e.size, pointerSize: 134 } } : {}) },
      );
      res.writeHead(200, { 'Content-Type': 'application/json' });
      return res.end(JSON.stringify(list));
    }
    const resolve = /^\/[^/]+\/[^/]+\/resolve\/[^/]+\/(.+)$/.exec(url.pathname);
    const file = resolve ? files.get(decodeURIComponent(resolve[1])) : undefined;
    if (!file) {
      res.writeHead(404, { 'Content-Type': 'text/plain' });
      return res.end('Entry not found');
    }
    if (failure) {
      res.writeHead(failure, { 'Content-Type': 'text/plain' });
      return res.end('the fake hub was told to fail');
    }
    const etag = `"${file.sha}"`;
    let start = 0;
    const range = /^bytes=(\d+)-$/.exec(req.headers.range ?? '');
    const ifRange = req.headers['if-range'];
    if (range && (!ifRange || ifRange === etag) && Number(range[1]) < file.size) start = Number(range[1]);
    const headers = { 'Content-Type': 'application/octet-stream', ETag: etag, 'Accept-Ranges': 'bytes', 'Content-Length': String(file.size - start) };
    if (start > 0) {
      res.writeHead(206, { ...headers, 'Content-Range': `bytes ${start}-${file.size - 1}/${file.size}` });
    } else {
      res.writeHead(200, headers);
    }
    const body = file.bytes.subarray(start);
    if (rate === null) return res.end(body);
    // Slowed down: a slice every 50 ms.
    let at = 0;
    let timer = null;
    res.once('close', () => clearTimeout(timer));
    const send = () => {
      open.delete(timer);
      if (res.destroyed) return;
      const step = Math.max(1024, Math.floor((rate ?? 1e9) / 20));
      const chunk = body.subarray(at, at + step);
      at += chunk.length;
      if (at >= body.length) return res.end(chunk);
      res.write(chunk);
      timer = setTimeout(send, 50);
      open.add(timer);
    };
    send();
  });

  await new Promise((resolve, reject) => {
    server.once('error', reject);
    server.listen(0, '127.0.0.1', resolve);
  });
  return {
    url: `http://127.0.0.1:${server.address().port}`,
    requests,
    totalBytes: [...files.values()].reduce((n, f) => n + f.size, 0),
    /** Bytes per second; null: as fast as it goes. */
    setRate(bytesPerSecond) {
      rate = bytesPerSecond;
    },
    /** Answer every request with this HTTP status; null: work again. */
    setFailure(status) {
      failure = status;
    },
    close: () =>
      new Promise((resolve) => {
        for (const t of open) clearTimeout(t);
        server.close(() => resolve());
        server.closeAllConnections();
      }),
  };
}
