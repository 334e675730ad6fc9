// What the page knows about jobs, updated from the server's events. Pure functions over JobInfo,
// so the order of events and their effect are unit tested without a server.

import type { JobEvent, JobInfo } from './api';

/** The job after an event about it; events for other jobs leave it as it is. */
export function applyEvent(job: JobInfo, event: JobEvent): JobInfo {
  if (event.job !== job.id) return job;
  switch (event.type) {
    case 'queued':
      return { ...job, state: 'queued', position: event.position };
    case 'started':
      return { ...job, state: 'running', position: null, stage: job.stage === 'waiting' ? 'loading_model' : job.stage };
    case 'progress':
      return {
        ...job,
        state: job.state === 'queued' ? 'running' : job.state,
        position: null,
        stage: event.stage,
        image: event.image,
        batch: event.batch,
        step: event.step,
        total_steps: event.steps,
        progress: event.progress,
        eta_ms: event.eta_ms,
      };
    case 'preview':
      return job;
    case 'done':
      return { ...job, state: 'done', stage: 'finished', progress: 1, eta_ms: 0, position: null };
    case 'failed':
      return { ...job, state: 'failed', stage: 'finished', error: event.error, position: null };
    case 'cancelled':
      return { ...job, state: 'cancelled', stage: 'finished', position: null };
  }
}

export function isActive(job: Pick<JobInfo, 'state'>): boolean {
  return job.state === 'queued' || job.state === 'running';
}

/** Running first, then the queue in order, then finished jobs newest first. */
export function sortJobs(jobs: JobInfo[]): JobInfo[] {
  const rank = (j: JobInfo) => (j.state === 'running' ? 0 : j.state === 'queued' ? 1 : 2);
  return [...jobs].sort((a, b) => {
    const r = rank(a) - rank(b);
    if (r !== 0) return r;
    if (a.state === 'queued') return (a.position ?? 0) - (b.position ?? 0);
    if (rank(a) === 2) return (b.finished_at ?? b.created_at) - (a.finished_at ?? a.created_at);
    return a.created_at - b.created_at;
  });
}

const STAGE_WORDS: Record<JobInfo['stage'], string> = {
  waiting: 'Waiting',
  loading_model: 'Loading the model',
  sampling: 'Drawing',
  decoding: 'Finishing the picture',
  saving: 'Saving',
  finished: 'Finished',
};

/** One line for the progress bar: "Drawing picture 2 of 4, step 12 of 20". */
export function describeProgress(job: JobInfo): string {
  switch (job.state) {
    case 'queued':
      return job.position && job.position > 1 ? `Waiting, ${job.position - 1} ahead in the queue` : 'Waiting to start';
    case 'done':
      return job.images.length === 1 || job.batch === 1 ? 'Done' : `Done: ${job.images.length || job.batch} pictures`;
    case 'failed':
      return 'Could not finish';
    case 'cancelled':
      return 'Cancelled';
    case 'running': {
      const picture = job.batch > 1 ? ` picture ${job.image + 1} of ${job.batch},` : '';
      if (job.stage === 'sampling') return `Drawing${picture} step ${job.step} of ${job.total_steps ?? job.steps}`;
      return STAGE_WORDS[job.stage] + (picture ? ` (${picture.trim().replace(/,$/, '')})` : '');
    }
  }
}
