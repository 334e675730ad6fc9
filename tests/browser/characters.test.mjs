// Browser test of the Characters page and its chat playground against a running server (LD_URL)
// with the tiny test model (issue 10): create a character with the form, make a portrait and use
// it as the avatar, export it, import a SillyTavern card PNG built here, and in the chat playground
// see "Send me a selfie!" make a picture with the prompt shown, "How are you?" make none (with the
// reason), and a broken chat server fall back to the built-in writer with a note.
//
//   LD_URL=http://127.0.0.1:7860 node --test tests/browser/characters.test.mjs
//
// Pictures stay tiny: the character's style is a preset of 64x64 and 2 steps made here first.
// Screenshots: tests/out/characters.png, characters-chat.png (and -dark).

import assert from 'node:assert/strict';
import { readFile } from 'node:fs/promises';
import { deflateSync } from 'node:zlib';
import { after, before, describe, test } from 'node:test';
import { openApp, uniqueWord } from './harness.mjs';

let h;
let page;
let session;
let presetId;
let characterId;
// A word no other run used: the gallery search for the character's portraits finds only ours.
const name = uniqueWord('Mira');
const appearance = 'young woman, short red hair, green eyes, freckles';

// ---- A character-card PNG, as SillyTavern writes one: a tEXt chunk 'chara' of base64 JSON ----

const CRC_TABLE = Array.from({ length: 256 }, (_, n) => {
  let c = n;
  for (let k = 0; k < 8; k++) c = c & 1 ? 0xedb88320 ^ (c >>> 1) : c >>> 1;
  return c >>> 0;
});

/** CRC-32 of the PNG spec (ISO 3309), over the chunk type and data. */
function crc32(buf) {
  let c = 0xffffffff;
  for (const byte of buf) c = CRC_TABLE[(c ^ byte) & 0xff] ^ (c >>> 8);
  return (c ^ 0xffffffff) >>> 0;
}

function chunk(type, data) {
  const len = Buffer.alloc(4);
  len.writeUInt32BE(data.length);
  const body = Buffer.concat([Buffer.from(type, 'latin1'), data]);
  const crc = Buffer.alloc(4);
  crc.writeUInt32BE(crc32(body));
  return Buffer.concat([len, body, crc]);
}

/** A 2x2 grey PNG carrying `card` the way TavernAI/SillyTavern cards do. */
function cardPng(card) {
  const ihdr = Buffer.alloc(13);
  ihdr.writeUInt32BE(2, 0);
  ihdr.writeUInt32BE(2, 4);
  ihdr[8] = 8; // bit depth
  ihdr[9] = 2; // RGB
  const row = Buffer.from([0, 128, 128, 128, 128, 128, 128]); // filter byte + 2 pixels
  const text = Buffer.from(`chara\0${Buffer.from(JSON.stringify(card)).toString('base64')}`, 'latin1');
  return Buffer.concat([
    Buffer.from([137, 80, 78, 71, 13, 10, 26, 10]),
    chunk('IHDR', ihdr),
    chunk('tEXt', text),
    chunk('IDAT', deflateSync(Buffer.concat([row, row]))),
    chunk('IEND', Buffer.alloc(0)),
  ]);
}

/** API call with the page's session token (for what only the app's window may do). */
function ui(method, path, body) {
  return h.api(method, path, body, { 'X-LD-Session': session });
}

async function imageLoaded(testid) {
  await page.waitForFunction((id) => {
    const el = document.querySelector(`[data-testid="${id}"]`);
    return el instanceof HTMLImageElement && el.complete && el.naturalWidth > 0;
  }, testid);
}

before(async () => {
  h = await openApp();
  page = h.page;
  session = await h.token();
  const created = await ui('POST', '/api/v1/presets', {
    name: `Tiny portrait ${uniqueWord('t')}`,
    description: 'For the browser test',
    width: 64,
    height: 64,
    steps: 2,
    cfg_scale: null,
    sampler: null,
    schedule: null,
    prompt_prefix: '',
    prompt_suffix: '',
    negative_prompt: '',
  });
  assert.equal(created.status, 200, created.text);
  presetId = created.body.id;
});

after(async () => {
  if (h && characterId) await ui('DELETE', `/api/v1/characters/${characterId}`).catch(() => {});
  if (h && presetId) await ui('DELETE', `/api/v1/presets/${presetId}`).catch(() => {});
  await h?.close();
});

describe('Characters', { timeout: 180_000 }, () => {
  test('a character is created with the form', async () => {
    await h.goto('#/characters');
    await page.getByTestId('new-character').click();
    await page.getByTestId('character-dialog').waitFor();
    await page.getByTestId('character-name').fill(name);
    await page.getByTestId('character-appearance').fill(appearance);
    // The style picker lists the presets, ours among them.
    await page.locator(`[data-testid="character-style"] option[value="${presetId}"]`).waitFor({ state: 'attached' });
    await page.getByTestId('character-style').selectOption(presetId);
    await page.getByTestId('character-seed').fill('1234');
    await page.getByTestId('character-eagerness').selectOption('high');

    // A seed that is not a number is explained, not sent.
    await page.getByTestId('character-seed').fill('soon');
    await page.getByTestId('character-save').click();
    await page.getByTestId('character-dialog').getByTestId('error').filter({ hasText: 'whole number' }).waitFor();
    await page.getByTestId('character-seed').fill('1234');
    await page.getByTestId('character-save').click();
    await page.getByTestId('character-dialog').waitFor({ state: 'hidden' });

    const item = page.getByTestId('character-item').filter({ hasText: name });
    await item.waitFor();
    characterId = await item.getAttribute('data-character-id');
    const { body } = await h.api('GET', `/api/v1/characters/${characterId}`);
    assert.deepEqual(
      { name: body.name, appearance: body.appearance, style: body.style, seed: body.seed, eagerness: body.eagerness, avatar: body.avatar },
      { name, appearance, style: presetId, seed: 1234, eagerness: 'high', avatar: null },
    );
    // The new one is selected and shown.
    await page.locator(`[data-testid="character-detail"][data-character-id="${characterId}"]`).waitFor();
    assert.equal(await page.getByTestId('character-appearance-text').textContent(), appearance);
    await page.getByTestId('no-portraits').filter({ hasText: 'None yet' }).waitFor();
    await h.checkNoProblems();
  });

  test('“Portrait” makes a portrait with progress, which becomes the avatar', async () => {
    await page.getByTestId('make-portrait').click();
    await page.getByTestId('portrait-progress').waitFor();
    await page.locator('[data-testid="portrait-progress"][data-state="done"]').waitFor({ timeout: 60_000 });
    await imageLoaded('portrait-image');
    const imageId = Number(await page.getByTestId('portrait-image').getAttribute('data-image-id'));

    const { body: image } = await h.api('GET', `/api/v1/images/${imageId}`);
    assert.equal(image.width, 64, 'the style preset’s size');
    assert.equal(image.steps, 2);
    assert.equal(image.seed, 1234, 'the locked seed');
    assert.ok(image.prompt.includes(name) && image.prompt.includes('short red hair'), `the prompt has name and look: ${image.prompt}`);

    // The portraits (found in the gallery by name) list it; it becomes the avatar.
    const portrait = page.locator(`[data-testid="portrait-item"][data-image-id="${imageId}"]`);
    await portrait.waitFor();
    await portrait.getByTestId('use-as-avatar').click();
    await portrait.getByTestId('is-avatar').waitFor();
    const { body } = await h.api('GET', `/api/v1/characters/${characterId}`);
    assert.equal(body.avatar, imageId);
    const listed = page.getByTestId('character-item').filter({ hasText: name }).getByTestId('character-avatar');
    assert.equal(await listed.getAttribute('data-image-id'), String(imageId));
    await page.waitForFunction(() =>
      [...document.querySelectorAll('[data-testid="character-avatar"]')].every((el) => el instanceof HTMLImageElement && el.complete && el.naturalWidth > 0),
    );
    await h.screenshots('characters');
    await h.checkNoProblems();
  });

  test('a character is exported, and a SillyTavern card PNG is imported and deleted', async () => {
    const [download] = await Promise.all([page.waitForEvent('download'), page.getByTestId('export-character').click()]);
    const exported = JSON.parse(await readFile(await download.path(), 'utf8'));
    assert.equal(exported.name, name);
    assert.equal(exported.appearance, appearance);

    const cardName = uniqueWord('Kael');
    const png = cardPng({
      spec: 'chara_card_v2',
      spec_version: '2.0',
      data: { name: cardName, description: `${cardName} is a tall knight with short black hair and blue eyes, in silver armor. He is brave.` },
    });
    await page.getByTestId('character-import-file').setInputFiles({ name: 'kael.png', mimeType: 'image/png', buffer: png });
    await page.getByTestId('toast').filter({ hasText: `“${cardName}” imported` }).waitFor();
    const detail = page.getByTestId('character-detail');
    await detail.getByRole('heading', { name: cardName }).waitFor();
    assert.match((await page.getByTestId('character-appearance-text').textContent()) ?? '', /short black hair/);

    page.once('dialog', (d) => d.accept());
    await page.getByTestId('delete-character').click();
    await page.getByTestId('character-item').filter({ hasText: cardName }).waitFor({ state: 'detached' });
    const { body } = await h.api('GET', '/api/v1/characters');
    assert.ok(!body.some((c) => c.name === cardName), 'the card’s character is gone on the server');
    assert.ok(body.some((c) => c.id === characterId), 'ours is still there');
    await h.checkNoProblems();
  });
});

describe('Chat playground', { timeout: 180_000 }, () => {
  /** Opens the playground with only our character in the scene and an empty conversation. */
  async function openPlayground() {
    await h.goto('#/characters/chat');
    await page.getByTestId('chat-playground').waitFor();
    const boxes = page.getByTestId('chat-character');
    await boxes.first().waitFor();
    for (const box of await boxes.all()) {
      const ours = (await box.getAttribute('data-character-id')) === characterId;
      if ((await box.isChecked()) !== ours) await box.click();
    }
    // A page load starts an empty conversation; clear it anyway if one is shown.
    if (await page.getByTestId('chat-clear').isEnabled()) await page.getByTestId('chat-clear').click();
  }

  async function say(role, text) {
    await page.getByTestId(`chat-role-${role}`).click();
    await page.getByTestId('chat-text').fill(text);
    await page.getByTestId('chat-add').click();
  }

  test('“Send me a selfie!” makes a picture and shows why and the prompt', async () => {
    await openPlayground();
    // Quoted text is speech (what chat apps write); the writer leaves it out.
    await say('character', '*waves from the balcony* "Good morning, sleepyhead!"');
    await say('user', 'Send me a selfie!');
    assert.equal(await page.getByTestId('chat-message').count(), 2);
    assert.equal(await page.getByTestId('chat-mode').inputValue(), 'auto');
    await page.getByTestId('illustrate').click();

    const result = page.locator('[data-testid="chat-result"][data-picture="true"]');
    await result.waitFor();
    assert.match((await page.getByTestId('chat-reason').textContent()) ?? '', /selfie/i);
    const prompt = (await page.getByTestId('chat-prompt').textContent()) ?? '';
    assert.ok(prompt.includes('short red hair'), `the prompt has the character’s look: ${prompt}`);
    assert.ok(!/good morning|sleepyhead/i.test(prompt), `no dialogue in the prompt: ${prompt}`);
    assert.equal(await page.getByTestId('chat-writer').getAttribute('data-writer'), 'built_in');
    assert.equal(await page.getByTestId('chat-note').count(), 0);

    await page.locator('[data-testid="chat-progress"][data-state="done"]').waitFor({ timeout: 60_000 });
    await imageLoaded('chat-image');
    const id = await page.getByTestId('chat-image').getAttribute('data-image-id');
    const { body } = await h.api('GET', `/api/v1/images/${id}`);
    assert.equal(body.prompt, prompt, 'the gallery recorded the prompt shown');
    assert.equal(body.width, 64, 'the character’s style was used');
    await h.screenshots('characters-chat');
    await h.checkNoProblems();
  });

  test('“How are you?” makes no picture, and says why', async () => {
    await openPlayground();
    await say('user', 'How are you?');
    await page.getByTestId('illustrate').click();
    await page.locator('[data-testid="chat-result"][data-picture="false"]').waitFor();
    assert.equal(await page.getByTestId('chat-verdict').textContent().then((t) => t?.trim()), 'No picture');
    assert.ok(((await page.getByTestId('chat-reason').textContent()) ?? '').trim().length > 10, 'a reason is given');
    assert.equal(await page.getByTestId('chat-prompt').count(), 0);
    assert.equal(await page.getByTestId('chat-image').count(), 0);
    await h.checkNoProblems();
  });

  test('a chat server that cannot be reached falls back to the built-in writer, with a note', async () => {
    const { body: saved } = await ui('GET', '/api/v1/settings');
    // Port 9 (discard) on this machine: nothing listens, the connection is refused at once.
    const broken = { ...saved, chat_writer: { ...saved.chat_writer, enabled: true, url: 'http://127.0.0.1:9/v1', model: 'none', timeout_seconds: 5 } };
    assert.equal((await ui('PUT', '/api/v1/settings', broken)).status, 200);
    try {
      await openPlayground();
      await say('user', 'Show me the harbour at night.');
      await page.getByTestId('chat-mode').selectOption('portrait');
      await page.getByTestId('illustrate').click();
      await page.locator('[data-testid="chat-result"][data-picture="true"]').waitFor({ timeout: 30_000 });
      assert.equal(await page.getByTestId('chat-writer').getAttribute('data-writer'), 'built_in');
      assert.match((await page.getByTestId('chat-note').textContent()) ?? '', /built-in writer/);
      await page.locator('[data-testid="chat-progress"][data-state="done"]').waitFor({ timeout: 60_000 });
    } finally {
      await ui('PUT', '/api/v1/settings', saved);
    }
    await h.checkNoProblems();
  });

  test('the character is deleted from its page', async () => {
    await h.goto('#/characters');
    await page.getByTestId('character-item').filter({ hasText: name }).click();
    page.once('dialog', (d) => d.accept());
    await page.getByTestId('delete-character').click();
    await page.getByTestId('character-item').filter({ hasText: name }).waitFor({ state: 'detached' });
    assert.equal((await h.api('GET', `/api/v1/characters/${characterId}`)).status, 404);
    characterId = null;
    await h.checkNoProblems();
  });
});
