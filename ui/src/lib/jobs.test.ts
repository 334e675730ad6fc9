import { describe, expect, it } from 'vitest';
import type { JobInfo } from './api';
import { applyEvent, describeProgress, isActive, sortJobs } from './jobs';

function job(over: Partial<JobInfo> = {}): JobInfo {
  return {
    id: 'job-1',
    state: 'queued',
    stage: 'waiting',
    position: 2,
    prompt: 'a cat',
    negative_prompt: '',
    model: 'tiny',
    width: 64,
    height: 64,
    steps: 20,
    cfg_scale: 7,
    sampler: 'Euler',
    schedule: 'Karras',
    seed: 1,
    batch: 1,
    image: 0,
    step: 0,
    progress: 0,
    eta_ms: null,
    images: [],
    error: null,
    created_at: 1,
    started_at: null,
    finished_at: null,
    ...over,
  };
}

describe('applyEvent', () => {
  it('follows a job from the queue to done', () => {
    let j = job();
    j = applyEvent(j, { type: 'started', job: 'job-1' });
    expect(j).toMatchObject({ state: 'running', position: null, stage: 'loading_model' });
    j = applyEvent(j, { type: 'progress', job: 'job-1', stage: 'sampling', image: 0, batch: 1, step: 5, steps: 20, progress: 0.25, eta_ms: 3000 });
    expect(j).toMatchObject({ stage: 'sampling', step: 5, progress: 0.25, eta_ms: 3000 });
    expect(describeProgress(j)).toBe('Drawing step 5 of 20');
    // A hires fix's second pass counts on: the event's total, not the first pass's steps.
    j = applyEvent(j, { type: 'progress', job: 'job-1', stage: 'sampling', image: 0, batch: 1, step: 25, steps: 30, progress: 0.8, eta_ms: 500 });
    expect(describeProgress(j)).toBe('Drawing step 25 of 30');
    expect(describeProgress(job({ state: 'running', stage: 'sampling', step: 3, steps: 20, total_steps: 30 }))).toBe('Drawing step 3 of 30');
    j = applyEvent(j, { type: 'done', job: 'job-1', images: [3] });
    expect(j).toMatchObject({ state: 'done', progress: 1 });
    expect(isActive(j)).toBe(false);
  });

  it('records failure with its reason, and cancellation', () => {
    const error = { code: 'out_of_memory', message: 'Not enough memory.', hint: 'Try a smaller size.' };
    expect(applyEvent(job({ state: 'running' }), { type: 'failed', job: 'job-1', error })).toMatchObject({ state: 'failed', error });
    expect(applyEvent(job(), { type: 'cancelled', job: 'job-1' }).state).toBe('cancelled');
  });

  it('ignores events of other jobs', () => {
    const j = job();
    expect(applyEvent(j, { type: 'started', job: 'job-2' })).toBe(j);
  });
});

describe('describeProgress', () => {
  it('says where a queued job waits and which picture of a batch is drawn', () => {
    expect(describeProgress(job({ position: 3 }))).toBe('Waiting, 2 ahead in the queue');
    expect(describeProgress(job({ position: 1 }))).toBe('Waiting to start');
    expect(describeProgress(job({ state: 'running', stage: 'sampling', batch: 4, image: 1, step: 2 }))).toBe('Drawing picture 2 of 4, step 2 of 20');
    expect(describeProgress(job({ state: 'running', stage: 'loading_model' }))).toBe('Loading the model');
  });
});

describe('sortJobs', () => {
  it('puts the running job first, then the queue in order, then the newest finished', () => {
    const list = [
      job({ id: 'old', state: 'done', finished_at: 10 }),
      job({ id: 'q2', state: 'queued', position: 2 }),
      job({ id: 'new', state: 'failed', finished_at: 20 }),
      job({ id: 'run', state: 'running', position: null }),
      job({ id: 'q1', state: 'queued', position: 1 }),
    ];
    expect(sortJobs(list).map((j) => j.id)).toEqual(['run', 'q1', 'q2', 'new', 'old']);
  });
});
