// The Playground's settings, shared with the pages that fill them in ("use these settings" in the
// Gallery, a PNG dropped on the window, a preset) and kept across reloads in localStorage.

import { DEFAULT_DRAFT, parseDraft, type Draft } from './params';

const STORAGE_KEY = 'ld.playground.draft';

function storage(): Storage | null {
  try {
    return globalThis.localStorage ?? null;
  } catch {
    return null;
  }
}

class Playground {
  draft = $state<Draft>(parseDraft(storage()?.getItem(STORAGE_KEY) ?? null));
  /** Bumped whenever the draft is replaced from outside, so the page can say so. */
  recalledFrom = $state<string | null>(null);
  /** Whether "Advanced" is unfolded; kept while the user visits other pages. */
  advancedOpen = $state(false);
  /** Counts the drafts set from outside: their model comes with its settings, which the
   * Playground must not then replace with the model's own defaults. */
  replaced = $state(0);

  set(next: Draft, from: string | null = null) {
    this.draft = next;
    this.recalledFrom = from;
    this.replaced += 1;
    this.save();
  }

  save() {
    try {
      storage()?.setItem(STORAGE_KEY, JSON.stringify(this.draft));
    } catch {
      // Private mode or full storage: the settings simply are not remembered.
    }
  }

  reset() {
    this.set({ ...DEFAULT_DRAFT, model: this.draft.model });
  }
}

export const playground = new Playground();
