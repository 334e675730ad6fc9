// Browser test of the Presets page against a running server (LD_URL): save the Playground's
// settings as a preset, apply it in the Playground and make a picture with it, edit, export,
// import and delete it; built-in presets cannot be edited.
//
//   LD_URL=http://127.0.0.1:7860 node --test tests/browser/presets.test.mjs
//
// Screenshots: tests/out/presets.png (and -dark).

import assert from 'node:assert/strict';
import { readFile } from 'node:fs/promises';
import { after, before, describe, test } from 'node:test';
import { openApp, uniqueWord } from './harness.mjs';

let h;
let page;
const name = `Tiny test ${uniqueWord('p')}`;
let presetId;

before(async () => {
  h = await openApp();
  page = h.page;
});
after(async () => h?.close());

describe('Presets', { timeout: 120_000 }, () => {
  test('the Playground settings are saved as a new preset', async () => {
    await h.goto('#/playground');
    await page.getByTestId('aspect-custom').click();
    await page.getByTestId('width').fill('64');
    await page.getByTestId('height').fill('64');
    await page.getByTestId('advanced').locator('summary').click();
    await page.getByTestId('steps').fill('3');
    await page.getByTestId('negative-prompt').fill('grainy');

    await page.getByTestId('nav-presets').click();
    await page.getByTestId('preset-item').first().waitFor();
    assert.ok((await page.getByTestId('builtin-presets').getByTestId('preset-item').count()) >= 1, 'built-in presets are listed');
    await page.getByTestId('save-current').click();
    await page.getByTestId('preset-dialog').waitFor();
    await page.getByTestId('preset-name').fill(name);
    assert.equal(await page.getByTestId('preset-steps').inputValue(), '3');
    await page.getByTestId('preset-save').click();

    const item = page.getByTestId('my-presets').getByTestId('preset-item').filter({ hasText: name });
    await item.waitFor();
    presetId = await item.getAttribute('data-preset-id');
    const { body } = await h.api('GET', '/api/v1/presets');
    const saved = body.find((p) => p.id === presetId);
    assert.ok(saved, `the server has the preset: ${JSON.stringify(body)}`);
    assert.equal(saved.steps, 3);
    assert.equal(saved.width, 64);
    assert.equal(saved.negative_prompt, 'grainy');
    assert.equal(saved.builtin, false);

    // Built-in presets have no edit or delete buttons.
    const builtin = page.getByTestId('builtin-presets').getByTestId('preset-item').first();
    assert.equal(await builtin.getByTestId('edit-preset').count(), 0);
    assert.equal(await builtin.getByTestId('delete-preset').count(), 0);
    await h.screenshots('presets');
    await h.checkNoProblems();
  });

  test('applying the preset fills the Playground, and pictures are made with it', async () => {
    // Other settings first, to see the preset replace them.
    await h.goto('#/playground');
    await page.getByTestId('advanced').locator('summary').click();
    await page.getByTestId('steps').fill('9');
    await page.getByTestId('seed').fill('-1');
    await page.getByTestId('nav-presets').click();
    await page.getByTestId('my-presets').getByTestId('preset-item').filter({ hasText: name }).getByTestId('use-preset').click();

    await page.waitForURL('**/#/playground');
    assert.equal(await page.getByTestId('preset-select').inputValue(), presetId);
    assert.equal(await page.getByTestId('steps').inputValue(), '3');
    assert.equal(await page.getByTestId('width').inputValue(), '64');

    const word = uniqueWord('kite');
    await page.getByTestId('prompt').fill(`a ${word}`);
    await page.getByTestId('generate').click();
    await page.locator('[data-testid="progress"][data-state="done"]').waitFor({ timeout: 60_000 });
    const id = await page.getByTestId('result-image').getAttribute('data-image-id');
    const { body } = await h.api('GET', `/api/v1/images/${id}`);
    assert.equal(body.steps, 3);
    assert.equal(body.width, 64);
    assert.match(body.negative_prompt, /grainy/, 'the preset’s negative prompt was used');
    await h.checkNoProblems();
  });

  test('a preset is edited, exported, imported and deleted', async () => {
    await h.goto('#/presets');
    const mine = page.getByTestId('my-presets').getByTestId('preset-item').filter({ hasText: name });
    await mine.getByTestId('edit-preset').click();
    await page.getByTestId('preset-steps').fill('5');
    await page.getByTestId('preset-save').click();
    await page.getByTestId('preset-dialog').waitFor({ state: 'hidden' });
    await mine.filter({ hasText: '5 steps' }).waitFor();

    const [download] = await Promise.all([page.waitForEvent('download'), mine.getByTestId('export-preset').click()]);
    const toml = await readFile(await download.path(), 'utf8');
    assert.ok(toml.includes(name), `the export names the preset:\n${toml}`);
    assert.match(toml, /steps\s*=\s*5/);

    // Import it back under another name.
    const copyName = `${name} copy`;
    const copy = toml.replace(name, copyName);
    await page.getByTestId('import-file').setInputFiles({ name: 'copy.toml', mimeType: 'application/toml', buffer: Buffer.from(copy) });
    const imported = page.getByTestId('my-presets').getByTestId('preset-item').filter({ hasText: copyName });
    await imported.waitFor();

    page.on('dialog', (d) => d.accept());
    for (const item of [imported, mine]) {
      await item.getByTestId('delete-preset').click();
      await item.waitFor({ state: 'detached' });
    }
    const { body } = await h.api('GET', '/api/v1/presets');
    assert.ok(!body.some((p) => p.name === name || p.name === copyName), 'both are gone on the server');
    await h.checkNoProblems();
  });
});
