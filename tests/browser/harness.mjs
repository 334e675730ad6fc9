// Shared set-up of the browser tests: the server (LD_URL, or the mock over ui/dist when unset),
// Chromium via playwright-core, and a watch on everything that goes wrong inside the page
// (console errors, CSP violations, failed requests, HTTP errors), asserted empty by each test.

import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { existsSync } from 'node:fs';
import { mkdir, mkdtemp, rm } from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { chromium } from 'playwright-core';

const HERE = path.dirname(fileURLToPath(import.meta.url));
export const OUT_DIR = path.resolve(HERE, '../out');
const CHROMIUM = process.env.CHROMIUM || '/usr/bin/chromium';
const CHROMIUM_ARGS = [
  '--headless',
  '--no-sandbox',
  '--disable-gpu',
  '--disable-background-networking',
  '--disable-component-update',
  '--no-first-run',
  '--disable-quic',
  '--disable-sync',
];
export const TIMEOUT_MS = 20_000;

/**
 * Starts everything; returns the harness. `baseUrl`: a server the test started itself (else
 * LD_URL, else the mock). 4xx answers a test provokes on purpose are let through with
 * `expectHttpErrors`.
 */
export async function openApp({ baseUrl: ownUrl } = {}) {
  let baseUrl;
  let mock = null;
  if (ownUrl) {
    baseUrl = ownUrl.replace(/\/+$/, '');
  } else if (process.env.LD_URL) {
    baseUrl = process.env.LD_URL.replace(/\/+$/, '');
  } else {
    const { startMockServer } = await import('./mock-server.mjs');
    mock = await startMockServer();
    baseUrl = mock.url;
    console.log(`# LD_URL not set: testing against the mock server at ${baseUrl}`);
  }
  await mkdir(OUT_DIR, { recursive: true });

  const browser = await chromium.launch({ executablePath: CHROMIUM, args: CHROMIUM_ARGS });
  const context = await browser.newContext({
    viewport: { width: 1280, height: 900 },
    colorScheme: 'light',
    reducedMotion: 'reduce',
    acceptDownloads: true,
  });
  await context.grantPermissions(['clipboard-read', 'clipboard-write'], { origin: baseUrl });
  await context.addInitScript(() => {
    window.__cspViolations = [];
    document.addEventListener('securitypolicyviolation', (e) => {
      window.__cspViolations.push(`${e.violatedDirective} blocked ${e.blockedURI || 'inline'} (${e.sourceFile}:${e.lineNumber})`);
    });
  });

  const page = await context.newPage();
  page.setDefaultTimeout(TIMEOUT_MS);
  let problems = [];
  const expected = [];
  page.on('console', (msg) => {
    if (msg.type() === 'error' || /Content[- ]Security[- ]Policy/i.test(msg.text())) {
      // Chromium logs every failed request as a console error too; those are judged below.
      if (/Failed to load resource/.test(msg.text()) && expected.some((re) => re.test(msg.location()?.url ?? ''))) return;
      const where = msg.location()?.url ? ` (${msg.location().url})` : '';
      problems.push(`console ${msg.type()}: ${msg.text()}${where}`);
    }
  });
  page.on('pageerror', (err) => problems.push(`uncaught error: ${err.message}`));
  page.on('requestfailed', (req) => {
    const error = req.failure()?.errorText ?? '';
    // The event stream is cut when a page is left or reloaded; that is not a failure.
    if (req.url().endsWith('/api/v1/events') || /ERR_ABORTED/.test(error)) return;
    problems.push(`request failed: ${req.url()} ${error}`);
  });
  page.on('response', (res) => {
    if (res.status() >= 400 && !expected.some((re) => re.test(res.url()))) problems.push(`HTTP ${res.status()} for ${res.url()}`);
  });

  const h = {
    baseUrl,
    browser,
    context,
    page,
    /** Lets 4xx answers for URLs matching `re` pass (a test provoking a refusal). */
    expectHttpErrors(re) {
      expected.push(re);
    },
    async checkNoProblems() {
      const csp = await page.evaluate(() => window.__cspViolations.splice(0)).catch(() => []);
      const found = [...csp.map((v) => `CSP violation: ${v}`), ...problems];
      problems = [];
      assert.deepEqual(found, [], `the page reported problems:\n${found.join('\n')}`);
    },
    async screenshot(name) {
      await page.evaluate(() => window.scrollTo(0, 0));
      await page.screenshot({ path: path.join(OUT_DIR, `${name}.png`), fullPage: true });
    },
    /** Screenshots in light and dark colours. */
    async screenshots(name) {
      await h.screenshot(name);
      await page.emulateMedia({ colorScheme: 'dark' });
      await h.screenshot(`${name}-dark`);
      await page.emulateMedia({ colorScheme: 'light' });
    },
    async goto(hash) {
      // A change of the hash alone is no page load; reload so every test starts fresh.
      const res = (await page.goto(`${baseUrl}/${hash}`)) ?? (await page.reload());
      assert.equal(res?.status(), 200);
      await page.getByTestId('page-heading').waitFor();
      return res;
    },
    /** The session token the server put into its page (for API calls from the test itself). */
    async token() {
      const html = await (await fetch(`${baseUrl}/`)).text();
      return /<meta name="ld-session" content="([^"]+)"/.exec(html)?.[1] ?? '';
    },
    async api(method, urlPath, body, headers = {}) {
      const res = await fetch(baseUrl + urlPath, {
        method,
        headers: { Accept: 'application/json', ...(body !== undefined ? { 'Content-Type': 'application/json' } : {}), ...headers },
        body: body !== undefined ? JSON.stringify(body) : undefined,
      });
      const text = await res.text();
      let json = null;
      try {
        json = JSON.parse(text);
      } catch {
        // Left null.
      }
      return { status: res.status, body: json, text };
    },
    /** Queues a job through the API and waits until it is finished; returns the JobInfo. */
    async generate(request, timeoutMs = 60_000) {
      const created = await h.api('POST', '/api/v1/jobs', request);
      assert.equal(created.status, 202, `POST /api/v1/jobs answered ${created.status}: ${created.text}`);
      const deadline = Date.now() + timeoutMs;
      for (;;) {
        const { body } = await h.api('GET', `/api/v1/jobs/${created.body.id}`);
        if (['done', 'failed', 'cancelled'].includes(body.state)) return body;
        assert.ok(Date.now() < deadline, `job ${created.body.id} did not finish in time: ${JSON.stringify(body)}`);
        await new Promise((r) => setTimeout(r, 100));
      }
    },
    async close() {
      await browser.close();
      await mock?.close();
    },
  };
  return h;
}

/** The server binary the tests start themselves (LD_BIN to change). */
export const SERVER_BIN = process.env.LD_BIN || path.resolve(HERE, '../../target/debug/local-diffusers');
export const hasServerBin = () => existsSync(SERVER_BIN);

/**
 * Starts `local-diffusers serve` on a free port with a fresh data folder (for tests that need a
 * server of their own: no models, a fake hub through HF_ENDPOINT). Resolves to
 * { url, dataDir, log(), close() }.
 */
export async function startServer({ args = [], env = {} } = {}) {
  const dataDir = await mkdtemp(path.join(os.tmpdir(), 'ld-browser-'));
  const child = spawn(SERVER_BIN, ['serve', '--port', '0', '--data-dir', dataDir, ...args], {
    env: { ...process.env, ...env },
    stdio: ['ignore', 'pipe', 'pipe'],
  });
  let out = '';
  child.stdout.on('data', (d) => (out += d));
  child.stderr.on('data', (d) => (out += d));
  const url = await new Promise((resolve, reject) => {
    const timer = setTimeout(() => reject(new Error(`the server did not start:\n${out}`)), 20_000);
    const look = () => {
      const m = /Local Diffusers is running at (\S+)/.exec(out);
      if (m) {
        clearTimeout(timer);
        resolve(m[1].replace(/\/+$/, ''));
      }
    };
    child.stdout.on('data', look);
    child.once('exit', (code) => {
      clearTimeout(timer);
      reject(new Error(`the server stopped (${code}):\n${out}`));
    });
  });
  return {
    url,
    dataDir,
    log: () => out,
    async close() {
      if (child.exitCode === null) {
        const gone = new Promise((resolve) => child.once('exit', resolve));
        child.kill('SIGTERM');
        await gone;
      }
      await rm(dataDir, { recursive: true, force: true });
    },
  };
}

/** A word no other test run has used, for finding exactly our pictures. */
export function uniqueWord(prefix) {
  return `${prefix}${Date.now().toString(36)}${Math.floor(Math.random() * 1e6).toString(36)}`;
}
