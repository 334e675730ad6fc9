// The chat playground of the Characters page: the typed conversation, who is in it, the picture
// mode, and the last answer of POST /api/v1/chat/illustrate with the job it queued. Kept here
// rather than in the page so the conversation survives a visit to another page.

import { api, toApiError, type ApiError, type Character, type IllustrateMode, type Illustrated } from './api';
import { illustrateRequest, type PlaygroundMessage } from './characters';
import { generation } from './generation.svelte';

class ChatPlayground {
  messages = $state<PlaygroundMessage[]>([]);
  /** Ids of the characters in the scene; the first is the one who speaks and is drawn. */
  picked = $state<string[]>([]);
  /** Who the next typed message is from. */
  role = $state<PlaygroundMessage['role']>('user');
  mode = $state<IllustrateMode>('auto');
  userName = $state('');
  result = $state<Illustrated | null>(null);
  error = $state<ApiError | null>(null);
  busy = $state(false);

  add(text: string) {
    const t = text.trim();
    if (t === '') return;
    this.messages = [...this.messages, { role: this.role, text: t }];
  }

  remove(index: number) {
    this.messages = this.messages.filter((_, i) => i !== index);
  }

  clear() {
    this.messages = [];
    this.result = null;
    this.error = null;
  }

  toggle(id: string) {
    this.picked = this.picked.includes(id) ? this.picked.filter((p) => p !== id) : [...this.picked, id];
  }

  /** Drops picks of characters that no longer exist. */
  keepOnly(characters: Character[]) {
    const ids = new Set(characters.map((c) => c.id));
    if (this.picked.some((id) => !ids.has(id))) this.picked = this.picked.filter((id) => ids.has(id));
  }

  /** Sends the conversation; the answer (and its job, followed by `generation`) lands in `result`. */
  async illustrate(characters: Character[]) {
    const inScene = this.picked
      .map((id) => characters.find((c) => c.id === id))
      .filter((c): c is Character => c !== undefined);
    this.busy = true;
    this.error = null;
    try {
      const r = await api().illustrate(illustrateRequest(this.messages, inScene, this.mode, this.userName));
      if (r.job) generation.track(r.job);
      this.result = r;
    } catch (err) {
      this.result = null;
      this.error = toApiError(err);
    } finally {
      this.busy = false;
    }
  }
}

export const chat = new ChatPlayground();
