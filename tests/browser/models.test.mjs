// Browser test of the guided setup and the Models page's catalog, downloads and library (issue
// #7), against a real `local-diffusers serve` this file starts itself: a fresh data folder with
// no model (the first start), and a fake Hugging Face hub (fake-hub.mjs, serving models/tiny/sd1
// for every repository) through HF_ENDPOINT. So it needs neither LD_URL nor the internet, only
// the binary (target/debug/local-diffusers, or LD_BIN).
// Screenshots: tests/out/setup*.png, models-*.png (and -dark).
//
//   node --test tests/browser/models.test.mjs

import assert from 'node:assert/strict';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { after, before, describe, test } from 'node:test';
import { startFakeHub } from './fake-hub.mjs';
import { hasServerBin, openApp, SERVER_BIN, startServer } from './harness.mjs';

const HERE = path.dirname(fileURLToPath(import.meta.url));
const TINY = path.resolve(HERE, '../../models/tiny');
const MB = 1024 * 1024;
const skip = hasServerBin() ? false : `needs the server binary ${SERVER_BIN} (cargo build -p ld-server)`;

let hub;
let server;
let h;
let page;
let token;

before(async () => {
  if (skip) return;
  hub = await startFakeHub();
  server = await startServer({ env: { HF_ENDPOINT: hub.url, HF_TOKEN: '', HUGGING_FACE_HUB_TOKEN: '' } });
  h = await openApp({ baseUrl: server.url });
  page = h.page;
  token = await h.token();
  // A server without the self-test answers 404; the guide then leaves that step out.
  h.expectHttpErrors(/\/api\/v1\/diagnostics\/self-test$/);
});
after(async () => {
  await h?.close();
  await server?.close();
  await hub?.close();
});

/** The download card's progress bar value, 0-100. */
async function percentOf(scope) {
  return Number(await scope.getByRole('progressbar').getAttribute('aria-valuenow'));
}

/** Waits until the bar inside `scope` shows more than `above` percent and less than 100. */
async function seeProgress(scope, above = 0) {
  const deadline = Date.now() + 30_000;
  for (;;) {
    const p = await percentOf(scope).catch(() => 0);
    if (p > above && p < 100) return p;
    assert.ok(Date.now() < deadline, `no progress above ${above}% seen`);
    await page.waitForTimeout(50);
  }
}

describe('Guided setup on the first start', { skip, timeout: 180_000 }, () => {
  test('suggests a model, downloads it with progress, then makes the first picture with it', async () => {
    const { body: setup } = await h.api('GET', '/api/v1/setup');
    assert.equal(setup.has_model, false, 'a fresh data folder has no model');
    const suggested = setup.suggested;

    await h.goto('#/playground');
    const guide = page.getByTestId('setup');
    await guide.waitFor();
    assert.equal(await page.getByTestId('playground-form').count(), 0, 'the guide takes the Playground’s place');
    const pick = page.getByTestId('setup-suggestion');
    assert.equal(await pick.getAttribute('data-id'), suggested.id);
    const text = (await pick.textContent()) ?? '';
    assert.ok(text.includes(suggested.name), text);
    assert.ok(text.includes(`${suggested.size_gb} GB`), `the size is shown: ${text}`);
    assert.match(await page.getByTestId('setup-why').textContent(), /graphics card|processor/);
    await page.getByTestId('setup-computer').getByText('memory').first().waitFor();

    // Offline? The folders of A1111, ComfyUI or a diffusers model, explained.
    await page.getByTestId('setup-have-model').click();
    const help = (await page.getByTestId('folder-help').textContent()) ?? '';
    for (const where of ['models\\Stable-diffusion', 'models\\checkpoints', 'model_index.json']) assert.ok(help.includes(where), `${where}: ${help}`);
    await page.getByTestId('new-models-dir').waitFor();
    await h.screenshots('setup');
    await page.getByTestId('setup-have-model').click();

    // One button; the progress is visible while it runs (the hub sends ~2 MB/s).
    hub.setRate(2 * MB);
    await page.getByTestId('setup-download').click();
    const download = guide.getByTestId('download');
    await download.waitFor();
    await seeProgress(guide, 5);
    assert.match(await guide.getByTestId('download-progress').textContent(), /B of [\d.]+ MB · \d+%/);
    assert.match((await guide.getByTestId('download-file').textContent()) ?? '', /^File \d+ of \d+: /);
    await h.screenshot('setup-downloading');

    await page.getByTestId('setup-installed').waitFor({ timeout: 60_000 });
    const first = page.getByTestId('setup-first-picture');
    await first.waitFor();
    await page.waitForFunction(() => !document.querySelector('[data-testid="setup-first-picture"]')?.hasAttribute('disabled'));
    const selfTest = await page.getByTestId('self-test').getAttribute('data-state').catch(() => null);
    assert.ok(selfTest === null || selfTest === 'passed', `the self-test, where there is one, passes: ${selfTest}`);
    await h.screenshots('setup-done');
    const { body: models } = await h.api('GET', '/api/v1/models');
    const installed = models.models.find((m) => m.catalog_id === suggested.id);
    assert.ok(installed?.managed, `installed as ours: ${JSON.stringify(models)}`);

    // The first picture, with it, at 64×64.
    await first.click();
    await page.getByTestId('playground-form').waitFor();
    assert.equal(await page.getByTestId('setup').count(), 0);
    assert.equal(await page.getByTestId('model-select').inputValue(), installed.name);
    await page.getByTestId('prompt').fill('a lighthouse at dusk');
    await page.getByTestId('aspect-custom').click();
    await page.getByTestId('width').fill('64');
    await page.getByTestId('height').fill('64');
    const advanced = page.getByTestId('advanced');
    if (!(await advanced.evaluate((el) => el.open))) await advanced.locator('summary').click();
    await page.getByTestId('steps').fill('2');
    await page.getByTestId('generate').click();
    await page.locator('[data-testid="progress"][data-state="done"]').waitFor({ timeout: 60_000 });
    await page.waitForFunction(() => {
      const el = document.querySelector('[data-testid="result-image"]');
      return el instanceof HTMLImageElement && el.complete && el.naturalWidth === 64 && el.naturalHeight === 64;
    });

    // A reload no longer shows the guide: the app has a model now.
    await h.goto('#/playground');
    await page.getByTestId('playground-form').waitFor();
    assert.equal(await page.getByTestId('setup').count(), 0);
    await h.checkNoProblems();
  });
});

describe('Guided setup without the internet', { skip, timeout: 120_000 }, () => {
  test('a failed download says why, and “I already have a model” adds a folder instead', async () => {
    // Nothing listens on port 9: every request to the hub is refused, as when offline.
    const offline = await startServer({ env: { HF_ENDPOINT: 'http://127.0.0.1:9' } });
    const o = await openApp({ baseUrl: offline.url });
    try {
      o.expectHttpErrors(/\/api\/v1\/diagnostics\/self-test$/);
      await o.goto('#/playground');
      await o.page.getByTestId('setup-download').click();
      // The downloader retries with backoff before it gives up (a few seconds).
      const error = o.page.getByTestId('setup').getByTestId('download-error');
      await error.waitFor({ timeout: 60_000 });
      assert.match((await error.textContent()) ?? '', /could not be reached.*internet/);
      await o.page.getByTestId('setup-offline').waitFor();
      await o.page.getByTestId('resume-download').waitFor();

      await o.page.getByTestId('setup-have-model').click();
      await o.page.getByTestId('new-models-dir').fill(TINY);
      await o.page.getByTestId('add-models-dir').click();
      await o.page.getByTestId('toast').filter({ hasText: /Folder added: \d+ models found/ }).waitFor();
      await o.page.getByTestId('setup-found').filter({ hasText: /Found \d+ models in your folders/ }).waitFor();
      const first = o.page.getByTestId('setup-first-picture');
      await first.waitFor();
      await o.page.waitForFunction(() => !document.querySelector('[data-testid="setup-first-picture"]')?.hasAttribute('disabled'));
      await o.screenshots('setup-offline');
      await first.click();
      await o.page.getByTestId('playground-form').waitFor();
      const { body: models } = await o.api('GET', '/api/v1/models');
      assert.equal(await o.page.getByTestId('model-select').inputValue(), models.models[0].name);
      await o.checkNoProblems();
    } finally {
      await o.close();
      await offline.close();
    }
  });
});

describe('Models: catalog, downloads and the library', { skip, timeout: 180_000 }, () => {
  test('the catalog shows what each model needs, and what is installed', async () => {
    const { body: catalog } = await h.api('GET', '/api/v1/catalog');
    await h.goto('#/models');
    const cards = page.getByTestId('catalog-item');
    await cards.first().waitFor();
    assert.equal(await cards.count(), catalog.models.length);
    for (const entry of catalog.models) {
      const card = page.locator(`[data-testid="catalog-item"][data-id="${entry.id}"]`);
      const text = (await card.textContent()) ?? '';
      assert.ok(text.includes(entry.name) && text.includes(entry.licence) && text.includes(entry.description), text);
      assert.ok(text.includes(`${entry.size_gb} GB`), `${entry.id} size: ${text}`);
      const needs = await card.getByTestId('catalog-needs').textContent();
      assert.equal(needs, entry.cpu_ok ? 'Works without a graphics card' : `Needs ${entry.min_vram_gb} GB graphics memory`);
      assert.equal(await card.getByTestId('badge-fits').count(), entry.fits ? 1 : 0, `${entry.id} fits`);
      assert.equal(await card.getByTestId('badge-installed').count(), entry.installed ? 1 : 0, `${entry.id} installed`);
      assert.equal(await card.getByTestId('download-model').count(), entry.installed ? 0 : 1, `${entry.id} download button`);
    }
    assert.ok(catalog.models.some((m) => m.installed), 'the guided setup installed one');
    await h.checkNoProblems();
  });

  test('a download shows why it failed, then continues, can be cancelled and resumed', async () => {
    const { body: catalog } = await h.api('GET', '/api/v1/catalog');
    const entry = catalog.models.find((m) => !m.installed && m.id !== catalog.suggested);
    await h.goto('#/models');
    const card = page.locator(`[data-testid="catalog-item"][data-id="${entry.id}"]`);

    // The hub is down: the server's words, in a sentence, and a way to try again.
    hub.setFailure(503);
    await card.getByTestId('download-model').click();
    const error = card.getByTestId('download-error');
    await error.waitFor();
    assert.match((await error.textContent()) ?? '', /^\s*The server answered 503/);
    assert.equal(await card.locator('[data-testid="download"]').getAttribute('data-state'), 'failed');
    await h.screenshot('models-download-failed');

    // Back up, but slow: the bar moves, with bytes, percent and speed.
    hub.setFailure(null);
    hub.setRate(1 * MB);
    await card.getByTestId('resume-download').click();
    await card.locator('[data-testid="download"][data-state="downloading"]').waitFor();
    const before = await seeProgress(card, 3);
    await page.waitForFunction(
      (id) => /[KM]B\/s/.test(document.querySelector(`[data-testid="catalog-item"][data-id="${id}"] [data-testid="download-progress"]`)?.textContent ?? ''),
      entry.id,
    );
    await h.screenshots('models-downloading');

    // Cancel: it stops, keeps what it has, and says so.
    await card.getByTestId('cancel-download').click();
    await card.locator('[data-testid="download"][data-state="cancelled"]').waitFor();
    assert.match((await card.getByTestId('download-error').textContent()) ?? '', /continue where it stopped/);
    const stoppedAt = await percentOf(card);
    assert.ok(stoppedAt >= before, `${stoppedAt} >= ${before}`);

    // Resume: it asks the hub only for the rest (Range), and finishes.
    const asked = hub.requests.length;
    hub.setRate(null);
    await card.getByTestId('resume-download').click();
    await card.getByTestId('badge-installed').waitFor({ timeout: 60_000 });
    await card.getByTestId('use-catalog-model').waitFor();
    assert.ok(
      hub.requests.slice(asked).some((r) => r.range !== null),
      `a resumed file is asked for with Range: ${JSON.stringify(hub.requests.slice(asked))}`,
    );
    const { body: models } = await h.api('GET', '/api/v1/models');
    const installed = models.models.find((m) => m.catalog_id === entry.id);
    assert.ok(installed, JSON.stringify(models));
    const item = page.locator(`[data-testid="model-item"][data-name="${installed.name}"]`);
    await item.waitFor();
    assert.equal(await item.getByTestId('model-origin').textContent(), 'Downloaded by Local Diffusers');
    await h.checkNoProblems();
  });

  test('a model of a folder the user added is listed as theirs, with no delete', async () => {
    await h.goto('#/models');
    await page.getByTestId('new-models-dir').fill(TINY);
    await page.getByTestId('add-models-dir').click();
    await page.getByTestId('toast').filter({ hasText: 'Folder added' }).waitFor();
    const theirs = page.locator('[data-testid="model-item"][data-managed="false"]');
    await theirs.first().waitFor();
    assert.ok((await theirs.count()) >= 2, 'both tiny models');
    for (const item of await theirs.all()) {
      assert.equal(await item.getByTestId('model-origin').textContent(), 'In your folder');
      assert.equal(await item.getByTestId('delete-model').count(), 0, 'no delete for the user’s own files');
    }
    await page.getByTestId('models-dir').filter({ hasText: TINY }).waitFor();
    await h.screenshots('models-library');

    // The server refuses too, in words that say why.
    const name = await theirs.first().getAttribute('data-name');
    const refused = await h.api('DELETE', `/api/v1/models/${encodeURIComponent(name)}`, undefined, { 'X-LD-Session': token });
    assert.equal(refused.status, 403);
    assert.match(refused.body.message, /only deletes models it downloaded/);
    await h.checkNoProblems();
  });

  test('deletes a model it downloaded, after asking', async () => {
    const { body: before } = await h.api('GET', '/api/v1/models');
    const ours = before.models.filter((m) => m.managed);
    assert.ok(ours.length >= 2, JSON.stringify(before));
    const victim = ours[ours.length - 1];
    await h.goto('#/models');
    const item = page.locator(`[data-testid="model-item"][data-name="${victim.name}"]`);
    await item.waitFor();

    // Said no: nothing happens.
    page.once('dialog', (d) => d.dismiss());
    await item.getByTestId('delete-model').click();
    await page.waitForTimeout(200);
    assert.equal(await item.count(), 1);

    page.once('dialog', (d) => {
      assert.match(d.message(), new RegExp(`Delete “${victim.name}”`));
      void d.accept();
    });
    await item.getByTestId('delete-model').click();
    await page.getByTestId('toast').filter({ hasText: 'was deleted' }).waitFor();
    await item.waitFor({ state: 'detached' });
    const { body: after } = await h.api('GET', '/api/v1/models');
    assert.ok(!after.models.some((m) => m.name === victim.name), JSON.stringify(after));
    // Its catalog card offers the download again.
    await page.locator(`[data-testid="catalog-item"][data-id="${victim.catalog_id}"] [data-testid="download-model"]`).waitFor();
    await h.checkNoProblems();
  });
});
