// Browser test of the Models and Settings pages against a running server (LD_URL): the installed
// models are listed, settings (also the optional prompt writer) are saved and kept, and the
// chat-app connection steps show this server's address. Screenshots: tests/out/models.png, settings.png (and -dark).
//
//   LD_URL=http://127.0.0.1:7860 node --test tests/browser/pages.test.mjs

import assert from 'node:assert/strict';
import { after, before, describe, test } from 'node:test';
import { openApp } from './harness.mjs';

let h;
let page;

before(async () => {
  h = await openApp();
  page = h.page;
});
after(async () => h?.close());

describe('Models', { timeout: 60_000 }, () => {
  test('lists the models the server has, with family and size', async () => {
    const { body } = await h.api('GET', '/api/v1/models');
    assert.ok(body.models.length >= 1, `the server has a model: ${JSON.stringify(body)}`);
    await h.goto('#/models');
    await page.getByTestId('model-item').first().waitFor();
    assert.equal(await page.getByTestId('model-item').count(), body.models.length);
    const text = (await page.getByTestId('model-list').textContent()) ?? '';
    for (const m of body.models) {
      assert.ok(text.includes(m.name), `${m.name} is listed`);
      assert.ok(text.includes(m.family), `${m.family} is shown`);
    }
    await page.getByTestId('model-folders').waitFor();
    await page.getByTestId('new-models-dir').waitFor();
    await h.screenshots('models');
    await h.checkNoProblems();
  });
});

describe('Settings', { timeout: 60_000 }, () => {
  test('saves the defaults and keeps them', async () => {
    await h.goto('#/settings');
    const negative = page.getByTestId('default-negative');
    await negative.waitFor();
    const before = await negative.inputValue();
    await negative.fill('lowres, test-negative');
    await page.getByTestId('save-settings').click();
    await page.getByTestId('toast').filter({ hasText: 'Settings saved' }).waitFor();

    await h.goto('#/settings');
    await page.getByTestId('default-negative').waitFor();
    assert.equal(await page.getByTestId('default-negative').inputValue(), 'lowres, test-negative');

    // The Playground offers it as the default.
    await page.getByTestId('nav-playground').click();
    await page.waitForFunction(() =>
      document.querySelector('[data-testid="negative-prompt"]')?.getAttribute('placeholder')?.includes('test-negative'),
    );

    // Put it back for the other tests.
    await page.getByTestId('nav-settings').click();
    await page.getByTestId('default-negative').fill(before);
    await page.getByTestId('save-settings').click();
    await page.getByTestId('toast').filter({ hasText: 'Settings saved' }).first().waitFor();
    await h.checkNoProblems();
  });

  test('shows this server’s address and the steps for chat apps', async () => {
    await h.goto('#/settings');
    assert.equal(await page.getByTestId('api-address').textContent(), h.baseUrl);
    for (const app of ['sillytavern', 'open-webui', 'voxta']) {
      const block = page.getByTestId(`chat-app-${app}`);
      await block.locator('summary').click();
      assert.ok(((await block.textContent()) ?? '').includes(h.baseUrl), `${app} steps name the address`);
    }
    await page.getByTestId('copy-address').click();
    assert.equal(await page.evaluate(() => navigator.clipboard.readText()), h.baseUrl);
    await page.getByTestId('settings-data-dir').filter({ hasNotText: 'Loading' }).waitFor();
    await h.screenshots('settings');
    await h.checkNoProblems();
  });

  test('the optional prompt writer is off by default, checked, saved and turned off again', async () => {
    await h.goto('#/settings');
    const enabled = page.getByTestId('chat-writer-enabled');
    await enabled.waitFor();
    assert.equal(await enabled.isChecked(), false, 'off by default');
    const system = page.getByTestId('chat-writer-system-prompt');
    assert.match((await system.getAttribute('placeholder')) ?? '', /You write prompts for an image generator/, 'the built-in instructions');

    // Turned on without an address: explained, not saved.
    await enabled.check();
    await page.getByTestId('chat-writer-url').fill('');
    await page.getByTestId('save-chat-writer').click();
    await page.getByTestId('chat-writer-problem').filter({ hasText: 'address' }).waitFor();

    await page.getByTestId('chat-writer-url').fill('http://127.0.0.1:11434/v1');
    await page.getByTestId('chat-writer-model').fill('llama3.2');
    await system.fill('Write short prompts.');
    await page.getByTestId('save-chat-writer').click();
    await page.getByTestId('toast').filter({ hasText: 'Settings saved' }).waitFor();
    const token = await h.token();
    const { body } = await h.api('GET', '/api/v1/settings', undefined, { 'X-LD-Session': token });
    assert.deepEqual(
      { ...body.chat_writer },
      { enabled: true, url: 'http://127.0.0.1:11434/v1', model: 'llama3.2', api_key: '', system_prompt: 'Write short prompts.', timeout_seconds: 30 },
    );

    // Kept across a reload; then off again, for the other tests.
    await h.goto('#/settings');
    assert.equal(await page.getByTestId('chat-writer-enabled').isChecked(), true);
    assert.equal(await page.getByTestId('chat-writer-url').inputValue(), 'http://127.0.0.1:11434/v1');
    await page.getByTestId('chat-writer-enabled').uncheck();
    await page.getByTestId('chat-writer-system-prompt').fill('');
    await page.getByTestId('save-chat-writer').click();
    await page.getByTestId('toast').filter({ hasText: 'Settings saved' }).first().waitFor();
    const after = await h.api('GET', '/api/v1/settings', undefined, { 'X-LD-Session': token });
    assert.equal(after.body.chat_writer.enabled, false);
    await h.checkNoProblems();
  });

  test('the colour choice switches between light and dark', async () => {
    await page.getByTestId('theme-dark').click();
    assert.equal(await page.evaluate(() => document.documentElement.dataset.theme), 'dark');
    const dark = await page.evaluate(() => getComputedStyle(document.body).backgroundColor);
    await page.getByTestId('theme-light').click();
    const light = await page.evaluate(() => getComputedStyle(document.body).backgroundColor);
    assert.notEqual(dark, light);
    await page.getByTestId('theme-system').click();
    assert.equal(await page.evaluate(() => document.documentElement.dataset.theme), undefined);
    await h.checkNoProblems();
  });
});
