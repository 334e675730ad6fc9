// Jobs as this window sees them: the queue and recent results from GET /api/v1/jobs, kept up to
// date by the event stream (progress, live previews), plus submitting and cancelling. Shared by
// the Playground and the header, and alive while the user looks at other pages.

import { api, toApiError, type JobEvent, type JobInfo, type JobRequest } from './api';
import { downloads } from './downloads.svelte';
import { applyEvent, isActive, sortJobs } from './jobs';

class Generation {
  jobs = $state<JobInfo[]>([]);
  /** Latest live preview per job (a data: URL). */
  previews = $state<Record<string, string>>({});
  /** The job whose result the Playground shows: the last one started from this window. */
  currentId = $state<string | null>(null);
  connected = $state(false);
  /** Counts the jobs seen finishing with pictures, so the Gallery can show them. */
  finished = $state(0);

  #close: (() => void) | null = null;
  #refreshTimer: ReturnType<typeof setTimeout> | null = null;

  get current(): JobInfo | null {
    return this.jobs.find((j) => j.id === this.currentId) ?? null;
  }

  get active(): JobInfo[] {
    return this.jobs.filter(isActive);
  }

  /**
   * Opens the event stream (once per page load) and loads the job list. The same stream carries
   * the catalog downloads' progress, handed to downloads.svelte.ts: one connection for both.
   */
  start() {
    if (this.#close) return;
    this.#close = api().events({
      onEvent: (e) => this.#onEvent(e),
      onDownload: (d) => downloads.apply(d),
      onOpen: () => {
        this.connected = true;
        void this.refresh();
        void downloads.refresh();
      },
      onError: () => (this.connected = false),
    });
    void this.refresh();
  }

  async refresh() {
    try {
      const list = await api().jobs();
      // Keep what events told us if it is newer than the list (a progress event can overtake it).
      this.jobs = sortJobs(list);
      if (this.currentId === null) {
        const running = this.jobs.find(isActive);
        if (running) this.currentId = running.id;
      }
    } catch {
      // The header's status light already says when the app is unreachable.
    }
  }

  #refreshSoon() {
    if (this.#refreshTimer) return;
    this.#refreshTimer = setTimeout(() => {
      this.#refreshTimer = null;
      void this.refresh();
    }, 150);
  }

  async #onEvent(event: JobEvent) {
    if (event.type === 'preview') {
      this.previews = { ...this.previews, [event.job]: event.image };
      return;
    }
    const known = this.jobs.some((j) => j.id === event.job);
    if (known) this.jobs = sortJobs(this.jobs.map((j) => applyEvent(j, event)));
    if (event.type === 'done' || event.type === 'failed' || event.type === 'cancelled') {
      // The finished job's pictures (and its final state) come with the full record.
      try {
        const full = await api().job(event.job);
        this.#upsert(full);
      } catch {
        this.#refreshSoon();
      }
      if (event.type === 'done') this.finished += 1;
      if (event.type !== 'done') {
        const { [event.job]: _dropped, ...rest } = this.previews;
        this.previews = rest;
      }
    }
    if (!known || event.type === 'queued' || event.type === 'started' || event.type === 'done') this.#refreshSoon();
  }

  #upsert(job: JobInfo) {
    const others = this.jobs.filter((j) => j.id !== job.id);
    this.jobs = sortJobs([...others, job]);
  }

  /** Queues a job; throws an ApiError the page shows. */
  async submit(req: JobRequest): Promise<JobInfo> {
    const job = await api().createJob(req);
    this.#upsert(job);
    this.currentId = job.id;
    return job;
  }

  /**
   * Follows a job queued elsewhere (a character's portrait, a chat picture) without making it the
   * Playground's current one; its progress and pictures then arrive like any other job's.
   */
  track(job: JobInfo) {
    this.#upsert(job);
  }

  job(id: string | null): JobInfo | null {
    return id === null ? null : (this.jobs.find((j) => j.id === id) ?? null);
  }

  async cancel(id: string) {
    try {
      const job = await api().cancelJob(id);
      this.#upsert(job);
    } catch (err) {
      // Already finished: the list catches up.
      if (toApiError(err).code !== 'not_found') throw err;
      this.#refreshSoon();
    }
  }

  /** Replaces an image record in the jobs (after favouriting). */
  updateImage(image: JobInfo['images'][number]) {
    this.jobs = this.jobs.map((j) =>
      j.images.some((i) => i.id === image.id)
        ? { ...j, images: j.images.map((i) => (i.id === image.id ? image : i)) }
        : j,
    );
  }
}

export const generation = new Generation();
