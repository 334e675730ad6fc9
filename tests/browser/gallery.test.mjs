// Browser test of the Gallery against a running server (LD_URL) with the tiny test model: find a
// picture by searching its prompt, see every parameter, take its settings to the Playground,
// delete it to the trash and restore it; and drop a PNG on the window to recall its settings.
//
//   LD_URL=http://127.0.0.1:7860 node --test tests/browser/gallery.test.mjs
//
// Screenshots: tests/out/gallery.png, gallery-detail.png, gallery-trash.png (and -dark).

import assert from 'node:assert/strict';
import { after, before, describe, test } from 'node:test';
import { openApp, uniqueWord } from './harness.mjs';

let h;
let page;
let word;
let job;

before(async () => {
  h = await openApp();
  page = h.page;
  word = uniqueWord('zebra');
  // Made through the API (what a chat app does); the gallery must show it like any other.
  job = await h.generate({
    prompt: `a ${word} in the snow`,
    negative_prompt: 'blurry',
    width: 64,
    height: 64,
    steps: 3,
    cfg_scale: 6.5,
    seed: 4242,
  });
  assert.equal(job.state, 'done', `the job finished: ${JSON.stringify(job.error)}`);
  assert.equal(job.images.length, 1);
  // A second picture, so the search has something to leave out.
  await h.generate({ prompt: `an ${uniqueWord('otter')} on a rock`, width: 64, height: 64, steps: 2 });
});
after(async () => h?.close());

describe('Gallery', { timeout: 120_000 }, () => {
  // Found by review: pictures finished while the Gallery was open did not appear.
  test('shows a picture finished while it is open', async () => {
    await h.goto('#/gallery');
    await page.getByTestId('gallery-item').first().waitFor();
    const fresh = uniqueWord('heron');
    const made = await h.generate({ prompt: `a ${fresh} by a pond`, width: 64, height: 64, steps: 2 });
    assert.equal(made.state, 'done');
    await page.locator(`[data-testid="gallery-item"][data-image-id="${made.images[0].id}"]`).waitFor();
  });

  test('finds a picture by searching its prompt', async () => {
    await h.goto('#/gallery');
    await page.getByTestId('gallery-item').first().waitFor();
    assert.ok((await page.getByTestId('gallery-item').count()) >= 2);
    await h.screenshots('gallery');

    await page.getByTestId('gallery-search').fill(word);
    await page.getByTestId('gallery-count').filter({ hasText: /^1 picture found$/ }).waitFor();
    const items = page.getByTestId('gallery-item');
    assert.equal(await items.count(), 1);
    assert.equal(await items.first().getAttribute('data-image-id'), String(job.images[0].id));

    // Nothing matches a word nobody used.
    await page.getByTestId('gallery-search').fill(uniqueWord('nothing'));
    await page.getByTestId('gallery-empty').waitFor();
    await page.getByTestId('gallery-search').fill(word);
    await page.getByTestId('gallery-count').filter({ hasText: /^1 picture found$/ }).waitFor();
    await h.checkNoProblems();
  });

  test('the detail view shows every parameter, and "use these settings" fills the Playground', async () => {
    await page.getByTestId('gallery-item').first().click();
    const detail = page.getByTestId('image-detail');
    await detail.waitFor();
    assert.match((await page.getByTestId('detail-prompt').textContent()) ?? '', new RegExp(word));
    const params = (await page.getByTestId('detail-parameters').textContent()) ?? '';
    for (const expected of ['64×64', '4242', '6.5']) assert.ok(params.includes(expected), `${expected} in: ${params}`);
    await page.waitForURL(`**/#/gallery/${job.images[0].id}`);
    await h.screenshots('gallery-detail');

    await page.getByTestId('use-settings').click();
    await page.waitForURL('**/#/playground');
    assert.match(await page.getByTestId('prompt').inputValue(), new RegExp(word));
    assert.equal(await page.getByTestId('negative-prompt').inputValue(), job.images[0].negative_prompt);
    assert.equal(await page.getByTestId('seed').inputValue(), '4242');
    await h.checkNoProblems();
  });

  test('a favourite is found with the favourites filter', async () => {
    const id = String(job.images[0].id);
    await h.goto(`#/gallery/${id}`);
    await page.getByTestId('image-detail').waitFor();
    await page.getByTestId('detail-favourite').click();
    await page.locator('[data-testid="detail-favourite"][aria-pressed="true"]').waitFor();
    await page.getByTestId('detail-close').click();
    await page.getByTestId('filter-favourites').check();
    await page.getByTestId('gallery-count').filter({ hasText: 'found' }).waitFor();
    const ids = await page.getByTestId('gallery-item').evaluateAll((els) => els.map((e) => e.getAttribute('data-image-id')));
    assert.ok(ids.includes(id), `the favourite is listed: ${ids}`);
    const { body } = await h.api('GET', '/api/v1/images?favourites=true&limit=500');
    assert.equal(ids.length, body.total, 'exactly the favourites are listed');
    await h.checkNoProblems();
  });

  test('delete moves a picture to the trash, and restore brings it back', async () => {
    const id = String(job.images[0].id);
    await h.goto(`#/gallery/${id}`);
    await page.getByTestId('image-detail').waitFor();
    await page.getByTestId('delete').click();
    await page.getByTestId('toast').filter({ hasText: 'trash' }).first().waitFor();
    // The detail view moves on to the next picture, if any; close it.
    if (await page.getByTestId('image-detail').isVisible()) await page.getByTestId('detail-close').click();
    await page.getByTestId('gallery-search').fill(word);
    await page.getByTestId('gallery-empty').waitFor();

    await page.getByTestId('trash-view').click();
    await page.locator(`[data-testid="gallery-item"][data-image-id="${id}"]`).waitFor();
    await h.screenshot('gallery-trash');
    await page.locator(`[data-testid="gallery-item"][data-image-id="${id}"]`).click();
    await page.getByTestId('restore').click();
    await page.getByTestId('toast').filter({ hasText: 'Restored' }).waitFor();
    // It was the trash's only picture: with its tile gone, focus goes to the page's heading
    // rather than nowhere (found by review).
    await page.getByTestId('gallery-empty').waitFor();
    await page.waitForFunction(() => document.activeElement?.getAttribute('data-testid') === 'page-heading', null, { timeout: 5000 });

    await page.getByTestId('gallery-back').click();
    await page.getByTestId('gallery-search').fill(word);
    await page.locator(`[data-testid="gallery-item"][data-image-id="${id}"]`).waitFor();
    await h.checkNoProblems();
  });

  test('dropping a PNG on the window recalls its settings into the Playground', async () => {
    // Start somewhere else, with other settings, to see both change.
    await h.goto('#/gallery');
    await page.evaluate(() => localStorage.removeItem('ld.playground.draft'));
    const res = await fetch(`${h.baseUrl}/api/v1/images/${job.images[0].id}/file`);
    assert.equal(res.status, 200);
    const bytes = [...new Uint8Array(await res.arrayBuffer())];

    await page.evaluate((data) => {
      const file = new File([new Uint8Array(data)], 'from-elsewhere.png', { type: 'image/png' });
      const dt = new DataTransfer();
      dt.items.add(file);
      for (const type of ['dragenter', 'dragover', 'drop']) {
        document.body.dispatchEvent(new DragEvent(type, { dataTransfer: dt, bubbles: true, cancelable: true }));
      }
    }, bytes);

    await page.waitForURL('**/#/playground');
    await page.getByTestId('toast').filter({ hasText: 'from-elsewhere.png' }).waitFor();
    assert.match(await page.getByTestId('prompt').inputValue(), new RegExp(word));
    assert.equal(await page.getByTestId('seed').inputValue(), '4242');
    assert.equal(await page.getByTestId('width').inputValue(), '64');
    assert.equal(await page.getByTestId('height').inputValue(), '64');
    assert.equal(await page.getByTestId('steps').inputValue(), '3');
    assert.equal(await page.getByTestId('cfg').inputValue(), '6.5');
    await h.checkNoProblems();
  });

  test('a PNG without settings is explained, not recalled', async () => {
    await h.goto('#/playground');
    const before = await page.getByTestId('prompt').inputValue();
    // A 1x1 PNG with no parameters chunk.
    const plain = 'iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAIAAACQd1PeAAAADElEQVR4nGP4z8AAAAMBAQDJ/pLvAAAAAElFTkSuQmCC';
    await page.evaluate((b64) => {
      const bin = atob(b64);
      const file = new File([Uint8Array.from(bin, (c) => c.charCodeAt(0))], 'plain.png', { type: 'image/png' });
      const dt = new DataTransfer();
      dt.items.add(file);
      document.body.dispatchEvent(new DragEvent('drop', { dataTransfer: dt, bubbles: true, cancelable: true }));
    }, plain);
    await page.locator('[data-testid="toast"][data-kind="error"]').filter({ hasText: 'no settings' }).waitFor();
    assert.equal(await page.getByTestId('prompt').inputValue(), before);
    await h.checkNoProblems();
  });
});
