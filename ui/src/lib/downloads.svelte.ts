// Catalog downloads as this window sees them: GET /api/v1/downloads, kept current by the
// `download` events of the one event stream (generation.svelte.ts opens it and hands them here),
// with a speed estimate per download. Shared by the Models page and the guided setup, and alive
// while the user looks at other pages. When a download finishes, the installed models are
// reloaded so the pickers offer it at once.

import { api, toApiError, type DownloadInfo } from './api';
import { catalog } from './catalog.svelte';
import { addSample, bytesPerSecond, type Sample } from './downloads';

class Downloads {
  items = $state<Record<string, DownloadInfo>>({});
  /** Bytes per second per download; null until known. */
  speeds = $state<Record<string, number | null>>({});
  #samples: Record<string, Sample[]> = {};
  /** Changes seen per download, so an answer that arrives after newer events is not applied over them. */
  #seen: Record<string, number> = {};
  #finished = new Set<(info: DownloadInfo) => void>();
  /** Injected in tests. */
  now: () => number = () => Date.now();

  get(id: string): DownloadInfo | null {
    return this.items[id] ?? null;
  }

  get active(): DownloadInfo[] {
    return Object.values(this.items).filter((d) => d.state === 'downloading');
  }

  /** Calls `fn` whenever a download finishes well; returns a function that stops it. */
  onFinished(fn: (info: DownloadInfo) => void): () => void {
    this.#finished.add(fn);
    return () => this.#finished.delete(fn);
  }

  /** Catches up with the server (on start and whenever the event stream reconnects). */
  async refresh(): Promise<void> {
    try {
      for (const d of await api().downloads()) this.apply(d);
    } catch {
      // The header's status light already says when the app is unreachable.
    }
  }

  /** One download's new state, from an event or an answer. */
  apply(info: DownloadInfo) {
    const before = this.items[info.id];
    this.#seen[info.id] = (this.#seen[info.id] ?? 0) + 1;
    this.items = { ...this.items, [info.id]: info };
    if (info.state === 'downloading' && info.progress) {
      this.#samples[info.id] = addSample(this.#samples[info.id] ?? [], { at: this.now(), bytes: info.progress.bytes_done });
      this.speeds = { ...this.speeds, [info.id]: bytesPerSecond(this.#samples[info.id] ?? []) };
    } else if (info.state !== 'downloading') {
      delete this.#samples[info.id];
      this.speeds = { ...this.speeds, [info.id]: null };
    }
    // Only a finish seen happening: a download that was done before this page loaded is old news.
    if (info.state === 'done' && before !== undefined && before.state !== 'done') {
      void catalog.reloadModels().catch(() => {});
      for (const fn of this.#finished) fn(info);
    }
  }

  /** Starts (or resumes) a catalog download; throws an ApiError the page shows. */
  async start(id: string): Promise<DownloadInfo> {
    delete this.#samples[id];
    const seen = this.#seen[id] ?? 0;
    const info = await api().startDownload(id);
    // Events may have overtaken the answer (progress, or a failure at once): they are newer.
    if ((this.#seen[id] ?? 0) === seen) this.apply(info);
    return info;
  }

  async cancel(id: string): Promise<void> {
    try {
      await api().cancelDownload(id);
    } catch (err) {
      // Already finished or gone: the list catches up.
      if (toApiError(err).code !== 'not_found') throw err;
      await this.refresh();
    }
  }
}

export const downloads = new Downloads();
