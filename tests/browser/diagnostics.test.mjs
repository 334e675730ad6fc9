// Browser test of the web UI against a running server, in Debian's Chromium via playwright-core.
//
//   LD_URL=http://127.0.0.1:7860 node --test tests/browser/diagnostics.test.mjs
//
// LD_URL is the address of `local-diffusers serve`. Without it, the test starts
// tests/browser/mock-server.mjs over ui/dist (build the UI first), which is handy while working on
// the UI but proves nothing about the Rust server. CHROMIUM overrides the browser path.
//
// It checks that the Diagnostics page shows the processor the server reports, that the page runs
// under the strict CSP without a single console error, that "Copy report" works, and that every
// page opens. A screenshot goes to tests/out/diagnostics.png (and a dark one beside it).

import assert from 'node:assert/strict';
import { mkdir } from 'node:fs/promises';
import path from 'node:path';
import { after, before, describe, test } from 'node:test';
import { fileURLToPath } from 'node:url';
import { chromium } from 'playwright-core';

const HERE = path.dirname(fileURLToPath(import.meta.url));
const OUT_DIR = path.resolve(HERE, '../out');
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
const TIMEOUT_MS = 20_000;

// Every page of the app and the heading it must show. Kept here on purpose (not imported from
// ui/src): the test looks at the app from outside, the way a user does.
const PAGES = [
  ['playground', 'Playground'],
  ['gallery', 'Gallery'],
  ['models', 'Models'],
  ['presets', 'Presets'],
  ['characters', 'Characters'],
  ['diagnostics', 'Diagnostics'],
  ['settings', 'Settings'],
];

let baseUrl;
let mock = null;
let browser;
let context;
let page;
/** Everything that went wrong inside the page; asserted empty at the end of each test. */
let problems = [];

/** Asserts that the page has logged no errors and broken no CSP rule since the last check. */
async function checkNoProblems() {
  const csp = await page.evaluate(() => window.__cspViolations.splice(0)).catch(() => []);
  const found = [...csp.map((v) => `CSP violation: ${v}`), ...problems];
  problems = [];
  assert.deepEqual(found, [], `the page reported problems:\n${found.join('\n')}`);
}

async function getJson(urlPath, headers = {}) {
  // Node's fetch sends no Origin header on a GET, like a chat app or curl would.
  const res = await fetch(baseUrl + urlPath, { headers: { Accept: 'application/json', ...headers } });
  const text = await res.text();
  let body = null;
  try {
    body = JSON.parse(text);
  } catch {
    // Left null; callers assert on it.
  }
  return { status: res.status, body, text };
}

before(async () => {
  if (process.env.LD_URL) {
    baseUrl = process.env.LD_URL.replace(/\/+$/, '');
  } else {
    const { startMockServer } = await import('./mock-server.mjs');
    mock = await startMockServer();
    baseUrl = mock.url;
    console.log(`# LD_URL not set: testing against the mock server at ${baseUrl}`);
  }
  await mkdir(OUT_DIR, { recursive: true });

  browser = await chromium.launch({ executablePath: CHROMIUM, args: CHROMIUM_ARGS });
  context = await browser.newContext({
    viewport: { width: 1280, height: 900 },
    colorScheme: 'light',
    reducedMotion: 'reduce',
  });
  await context.grantPermissions(['clipboard-read', 'clipboard-write'], { origin: baseUrl });

  // CSP violations also show up as console errors, but this catches them even when Chromium
  // words the message differently. Init scripts are not subject to the page's CSP.
  await context.addInitScript(() => {
    window.__cspViolations = [];
    document.addEventListener('securitypolicyviolation', (e) => {
      window.__cspViolations.push(`${e.violatedDirective} blocked ${e.blockedURI || 'inline'} (${e.sourceFile}:${e.lineNumber})`);
    });
  });

  page = await context.newPage();
  page.setDefaultTimeout(TIMEOUT_MS);
  page.on('console', (msg) => {
    if (msg.type() === 'error' || /Content[- ]Security[- ]Policy/i.test(msg.text())) {
      const where = msg.location()?.url ? ` (${msg.location().url})` : '';
      problems.push(`console ${msg.type()}: ${msg.text()}${where}`);
    }
  });
  page.on('pageerror', (err) => problems.push(`uncaught error: ${err.message}`));
  page.on('requestfailed', (req) => problems.push(`request failed: ${req.url()} ${req.failure()?.errorText ?? ''}`));
  page.on('response', (res) => {
    if (res.status() >= 400) problems.push(`HTTP ${res.status()} for ${res.url()}`);
  });
});

after(async () => {
  await browser?.close();
  await mock?.close();
});

describe('Diagnostics page', { timeout: 60_000 }, () => {
  test('shows the processor the server reports, with no errors', async () => {
    const system = await getJson('/api/v1/system');
    assert.equal(system.status, 200, `GET /api/v1/system answered ${system.status}: ${system.text}`);
    const cpuName = system.body?.cpu?.name;
    assert.equal(typeof cpuName, 'string', 'cpu.name is a string');
    assert.ok(cpuName.trim().length > 0, 'cpu.name is not empty');

    const response = await page.goto(`${baseUrl}/#/diagnostics`);
    assert.equal(response?.status(), 200);
    const csp = response.headers()['content-security-policy'] ?? '';
    assert.match(csp, /script-src 'self'/, 'the UI is served with a strict CSP');

    const cpu = page.getByTestId('cpu-name');
    await cpu.waitFor({ state: 'visible' });
    assert.equal((await cpu.textContent())?.trim(), cpuName.trim());

    await assert.doesNotReject(
      page.getByTestId('page-heading').filter({ hasText: 'Diagnostics' }).waitFor(),
      'the Diagnostics heading is shown',
    );
    // Either a list of graphics cards or the calm "none found" note, never an error box.
    const gpus = system.body.gpus ?? [];
    if (gpus.length === 0) {
      await page.getByTestId('gpu-none').waitFor();
    } else {
      assert.equal(await page.getByTestId('gpu-item').count(), gpus.length);
    }
    assert.equal(await page.getByTestId('error').count(), 0, 'no error box on the page');

    // The header's status light turns to "ready" once /api/v1/health answers.
    await page.locator('[data-testid="app-status"][data-state="ok"]').waitFor();

    await page.screenshot({ path: path.join(OUT_DIR, 'diagnostics.png'), fullPage: true });
    await page.emulateMedia({ colorScheme: 'dark' });
    await page.screenshot({ path: path.join(OUT_DIR, 'diagnostics-dark.png'), fullPage: true });
    await page.emulateMedia({ colorScheme: 'light' });

    await checkNoProblems();
  });

  test('"Copy report" puts a plain-text report with the processor on the clipboard', async () => {
    const { body } = await getJson('/api/v1/system');
    await page.getByTestId('copy-report').click();
    await page.getByTestId('copy-status').filter({ hasText: 'copied' }).waitFor();
    const copied = await page.evaluate(() => navigator.clipboard.readText());
    assert.match(copied, /^Local Diffusers diagnostics report\n/);
    assert.ok(copied.includes(`Processor: ${body.cpu.name}`), `report names the processor:\n${copied}`);
    await checkNoProblems();
  });

  test('shows the server recommendation and runs the self-test (issue 8)', async () => {
    const { status, body } = await getJson('/api/v1/diagnostics');
    assert.equal(status, 200);
    await page.goto(`${baseUrl}/#/diagnostics`);
    const rec = page.getByTestId('recommendation');
    await rec.waitFor();
    const device = { cpu: 'Processor', cuda: 'Graphics card (NVIDIA)', metal: 'Graphics (Apple)' }[body.recommendation.device.value];
    assert.ok((await rec.textContent()).includes(device), 'the recommended device is shown');
    await page.getByTestId('self-test').click();
    const result = page.getByTestId('self-test-result');
    await result.waitFor({ timeout: 60_000 });
    assert.equal(await result.getAttribute('data-ok'), 'true', await result.textContent());
    assert.match(await result.textContent(), /ms per step/);
    await page.getByTestId('copy-report').click();
    await page.getByTestId('copy-status').filter({ hasText: 'copied' }).waitFor();
    const copied = await page.evaluate(() => navigator.clipboard.readText());
    assert.match(copied, /Recommended settings/);
    assert.match(copied, /Self-test passed/);
    await checkNoProblems();
  });
});

describe('Navigation', { timeout: 60_000 }, () => {
  test('every page opens from the sidebar and shows its heading', async () => {
    await page.goto(`${baseUrl}/#/playground`);
    for (const [id, heading] of PAGES) {
      await page.getByTestId(`nav-${id}`).click();
      await page.waitForURL(`**/#/${id}`);
      const h1 = page.getByTestId('page-heading');
      await h1.filter({ hasText: heading }).waitFor();
      assert.equal((await h1.textContent())?.trim(), heading);
      assert.equal(await page.getByTestId(`nav-${id}`).getAttribute('aria-current'), 'page');
    }
    await checkNoProblems();
  });

  test('Settings loads with the session token the server put into the page', async () => {
    await page.goto(`${baseUrl}/#/settings`);
    const dataDir = page.getByTestId('settings-data-dir');
    await dataDir.filter({ hasNotText: 'Loading' }).waitFor();
    assert.ok(((await dataDir.textContent()) ?? '').trim().length > 0, 'the data folder is shown');
    assert.equal(await page.getByTestId('error').count(), 0);
    await checkNoProblems();
  });

  test('an unknown address shows "Page not found"', async () => {
    await page.goto(`${baseUrl}/#/no-such-page`);
    await page.getByTestId('page-heading').filter({ hasText: 'Page not found' }).waitFor();
    await checkNoProblems();
  });
});

describe('API as seen from outside the page', () => {
  test('settings need the session token', async () => {
    const { status, body, text } = await getJson('/api/v1/settings');
    assert.ok(status === 401 || status === 403, `expected 401 or 403, got ${status}: ${text}`);
    assert.ok(['unauthorized', 'forbidden'].includes(body?.code), `error code, got: ${text}`);
    assert.equal(typeof body.message, 'string');
  });
});
