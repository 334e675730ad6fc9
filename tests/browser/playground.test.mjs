// Browser test of the Playground against a running server (LD_URL) with the tiny test model:
// make a small picture and see it arrive with progress, cancel a long one mid-way, and use the
// result's actions (favourite, reuse seed, copy parameters, open in the Gallery).
//
//   LD_URL=http://127.0.0.1:7860 node --test tests/browser/playground.test.mjs
//
// Screenshots: tests/out/playground.png (and -dark).

import assert from 'node:assert/strict';
import { after, before, describe, test } from 'node:test';
import { openApp, uniqueWord } from './harness.mjs';

let h;
let page;

before(async () => {
  h = await openApp();
  page = h.page;
});
after(async () => h?.close());

/** Fills the form: prompt, a custom size, steps and batch under "Advanced". */
async function fillForm({ prompt, width = 64, height = 64, steps = 4, batch = 1, seed = -1 }) {
  await page.getByTestId('prompt').fill(prompt);
  await page.getByTestId('aspect-custom').click();
  await page.getByTestId('width').fill(String(width));
  await page.getByTestId('height').fill(String(height));
  const advanced = page.getByTestId('advanced');
  if (!(await advanced.evaluate((el) => el.open))) await advanced.locator('summary').click();
  await page.getByTestId('steps').fill(String(steps));
  await page.getByTestId('batch').fill(String(batch));
  await page.getByTestId('seed').fill(String(seed));
}

/**
 * Clicks Generate and waits until a picture other than the one shown before has loaded: the
 * previous job's picture, notes and "done" state stay on screen until the new job replaces them.
 */
async function clickForNewPicture() {
  const before = await page.evaluate(() => {
    const el = document.querySelector('[data-testid="result-image"]');
    return el instanceof HTMLImageElement ? el.src : null;
  });
  await page.getByTestId('generate').click();
  await page.waitForFunction(
    (old) => {
      const el = document.querySelector('[data-testid="result-image"]');
      return el instanceof HTMLImageElement && el.src !== old && el.complete && el.naturalWidth > 0;
    },
    before,
    { timeout: 60_000 },
  );
}

describe('Playground', { timeout: 120_000 }, () => {
  test('makes a picture, showing progress, and shows the result', async () => {
    await h.goto('#/playground');
    // The pickers fill from the server.
    await page.locator('[data-testid="model-select"] option').nth(1).waitFor({ state: 'attached' });
    const word = uniqueWord('lighthouse');
    await fillForm({ prompt: `a ${word} at dusk`, steps: 4, seed: 1234 });

    await page.getByTestId('generate').click();
    await page.getByTestId('progress').waitFor();
    await page.locator('[data-testid="progress"][data-state="done"]').waitFor({ timeout: 60_000 });
    const img = page.getByTestId('result-image');
    await img.waitFor();
    await page.waitForFunction(() => {
      const el = document.querySelector('[data-testid="result-image"]');
      return el instanceof HTMLImageElement && el.complete && el.naturalWidth > 0;
    });
    const size = await img.evaluate((el) => [el.naturalWidth, el.naturalHeight]);
    assert.deepEqual(size, [64, 64], 'the picture has the size asked for');
    assert.equal(await page.getByTestId('progress-text').textContent(), 'Done');
    assert.equal(await page.getByRole('progressbar').getAttribute('aria-valuenow'), '100');

    // The queue lists it as done.
    await page.locator('[data-testid="queue-item"][data-state="done"]').first().waitFor();

    await h.screenshots('playground');
    await h.checkNoProblems();
  });

  test('the result can be favourited, its seed reused and its parameters copied', async () => {
    const fav = page.getByTestId('favourite');
    assert.equal(await fav.getAttribute('aria-pressed'), 'false');
    await fav.click();
    await page.locator('[data-testid="favourite"][aria-pressed="true"]').waitFor();
    const id = await page.getByTestId('result-image').getAttribute('data-image-id');
    const { body } = await h.api('GET', `/api/v1/images/${id}`);
    assert.equal(body.favourite, true, 'the server kept the favourite');

    await page.getByTestId('seed').fill('-1');
    await page.getByTestId('reuse-seed').click();
    assert.equal(await page.getByTestId('seed').inputValue(), '1234');
    assert.equal(await page.getByTestId('seed-lock').getAttribute('aria-pressed'), 'true');

    await page.getByTestId('copy-parameters').click();
    await page.getByTestId('toast').filter({ hasText: 'Parameters copied' }).waitFor();
    const copied = await page.evaluate(() => navigator.clipboard.readText());
    assert.match(copied, /Steps: 4/);
    assert.match(copied, /Seed: 1234/);
    assert.match(copied, /Size: 64x64/);

    await page.getByTestId('open-in-gallery').click();
    await page.waitForURL(`**/#/gallery/${id}`);
    await page.getByTestId('image-detail').waitFor();
    assert.equal(await page.getByTestId('detail-seed').textContent(), '1234');
    await page.getByTestId('detail-close').click();
    await h.checkNoProblems();
  });

  test('a long job shows its steps and can be cancelled', async () => {
    await h.goto('#/playground');
    await fillForm({ prompt: `a ${uniqueWord('cancelme')} castle`, width: 128, height: 128, steps: 50, batch: 4 });
    await page.getByTestId('generate').click();
    // Running, with a step count and time left.
    await page.getByTestId('progress-text').filter({ hasText: /step [1-9]\d* of 50/ }).waitFor({ timeout: 60_000 });
    await page.getByTestId('time-left').waitFor();
    const cancel = page.getByTestId('cancel');
    assert.equal(await cancel.isEnabled(), true);
    await cancel.click();
    await page.locator('[data-testid="progress"][data-state="cancelled"]').waitFor({ timeout: 30_000 });
    assert.equal(await page.getByTestId('progress-text').textContent(), 'Cancelled');
    assert.equal(await cancel.isEnabled(), false, 'nothing left to cancel');
    await h.checkNoProblems();
  });

  test('what the app changed for a picture is listed under it', async () => {
    // Low graphics-memory mode On, drawing on the processor (as here): each model loads on its
    // own, and the job says so.
    const session = await h.token();
    const ui = (method, path, body) => h.api(method, path, body, { 'X-LD-Session': session });
    const { body: saved } = await ui('GET', '/api/v1/settings');
    assert.equal((await ui('PUT', '/api/v1/settings', { ...saved, low_vram: 'on' })).status, 200);
    try {
      await h.goto('#/playground');
      await page.locator('[data-testid="model-select"] option').nth(1).waitFor({ state: 'attached' });
      await fillForm({ prompt: `a ${uniqueWord('lowmem')} harbour`, steps: 2 });
      await page.getByTestId('generate').click();
      await page.locator('[data-testid="progress"][data-state="done"]').waitFor({ timeout: 60_000 });
      const notes = page.getByTestId('job-notes');
      await notes.waitFor();
      assert.match((await notes.textContent()) ?? '', /loaded one at a time/);
    } finally {
      await ui('PUT', '/api/v1/settings', saved);
    }
    // An ordinary picture has nothing to list. The low-memory picture and its notes are still
    // shown when this job starts (seen once in CI), so wait for a picture other than that one.
    await fillForm({ prompt: `a ${uniqueWord('plain')} harbour`, steps: 2 });
    await clickForNewPicture();
    await page.locator('[data-testid="progress"][data-state="done"]').waitFor({ timeout: 60_000 });
    assert.equal(await page.getByTestId('job-notes').count(), 0);
    await h.checkNoProblems();
  });

  test('the hires fix draws the picture larger and says how large before it starts', async () => {
    await h.goto('#/playground');
    await page.locator('[data-testid="model-select"] option').nth(1).waitFor({ state: 'attached' });
    await fillForm({ prompt: `a ${uniqueWord('hires')} castle`, steps: 2, width: 64, height: 96 });
    await page.getByTestId('hires-toggle').check();
    await page.getByTestId('hires-scale').fill('1.5');
    await page.getByTestId('hires-steps').fill('2');
    await page.getByTestId('hires-upscaler').selectOption('Lanczos');
    assert.equal(await page.getByTestId('hires-size').textContent(), 'Final picture: 96 × 144');
    // The previous test's picture and "done" state are still shown when this job starts, so
    // wait for a picture other than that one.
    await clickForNewPicture();
    await page.locator('[data-testid="progress"][data-state="done"]').waitFor({ timeout: 60_000 });
    const size = await page.getByTestId('result-image').evaluate((el) => [el.naturalWidth, el.naturalHeight]);
    assert.deepEqual(size, [96, 144], 'drawn at the hires size');
    // Off again for the tests after this one (the draft is kept across reloads).
    await page.getByTestId('hires-toggle').uncheck();
    assert.equal(await page.getByTestId('hires-size').count(), 0);
    await h.checkNoProblems();
  });

  test('an empty prompt is explained instead of sent', async () => {
    await page.getByTestId('prompt').fill('');
    await page.getByTestId('generate').click();
    const error = page.getByTestId('error');
    await error.waitFor();
    assert.match((await error.textContent()) ?? '', /Describe the picture first/);
    await h.checkNoProblems();
  });
});
