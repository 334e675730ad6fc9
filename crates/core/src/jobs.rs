//! The generation queue: a bounded list of jobs and one worker thread that owns the loaded model
//! and runs the engine. Everything that draws (the UI, the A1111 and OpenAI APIs, the CLI's server
//! mode) goes through here, so progress, previews, cancel and the gallery work the same for all.
//!
//! Jobs report through two channels: a `watch` per job (its latest [`JobInfo`], what a caller
//! waiting for its own job reads) and one `broadcast` of [`JobEvent`]s for every listener (the
//! UI's event stream). Neither needs an async runtime to send, so the worker is a plain thread.

use crate::compose::ComposedJob;
use crate::gallery::{Gallery, ImageRecord, NewImage};
use crate::infotext::Infotext;
use base64::Engine as _;
use candle_core::DType;
use ld_engine::pipeline::{GenerateRequest, LoadOptions, Observer, Pipeline, Progress};
use ld_engine::rng::SeedSource;
use ld_engine::sampler::Control;
use ld_engine::EngineError;
use serde::Serialize;
use std::collections::VecDeque;
use std::num::NonZeroUsize;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};
use tokio::sync::{broadcast, watch};

/// How many finished jobs are kept for `GET /jobs` and late pollers.
const KEEP_FINISHED: usize = 100;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum JobState {
    Queued,
    Running,
    Done,
    Failed,
    Cancelled,
}

impl JobState {
    pub fn is_finished(self) -> bool {
        matches!(
            self,
            JobState::Done | JobState::Failed | JobState::Cancelled
        )
    }
}

/// What the worker is doing for a running job.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Stage {
    Waiting,
    LoadingModel,
    Sampling,
    Decoding,
    Saving,
    Finished,
}

/// Why a job failed, in words for the user. `code` is one of the API's error codes.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct JobError {
    pub code: &'static str,
    pub message: String,
    pub hint: String,
}

/// A job as callers see it.
#[derive(Debug, Clone, Serialize)]
pub struct JobInfo {
    pub id: String,
    pub state: JobState,
    pub stage: Stage,
    /// While queued: 1 + how many jobs are ahead of it, the running one included.
    pub position: Option<usize>,
    pub prompt: String,
    pub negative_prompt: String,
    pub model: String,
    pub width: usize,
    pub height: usize,
    pub steps: usize,
    pub cfg_scale: f64,
    pub sampler: String,
    pub schedule: String,
    pub seed: u64,
    pub batch: usize,
    /// 0-based image of the batch being drawn.
    pub image: usize,
    /// Steps done of the current image.
    pub step: usize,
    /// 0..1 over the whole job.
    pub progress: f64,
    pub eta_ms: Option<u64>,
    pub images: Vec<ImageRecord>,
    pub error: Option<JobError>,
    /// Unix milliseconds.
    pub created_at: i64,
    pub started_at: Option<i64>,
    pub finished_at: Option<i64>,
}

/// What every listener hears.
#[derive(Debug, Clone, Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum JobEvent {
    Queued {
        job: String,
        position: usize,
    },
    Started {
        job: String,
    },
    Progress {
        job: String,
        stage: Stage,
        image: usize,
        batch: usize,
        step: usize,
        steps: usize,
        progress: f64,
        eta_ms: Option<u64>,
    },
    /// A cheap picture of the image so far, as a `data:image/png;base64,` URL.
    Preview {
        job: String,
        image: String,
    },
    Done {
        job: String,
        images: Vec<i64>,
    },
    Failed {
        job: String,
        error: JobError,
    },
    Cancelled {
        job: String,
    },
}

#[derive(Debug, thiserror::Error)]
pub enum SubmitError {
    #[error("the queue is full ({capacity} jobs are waiting)")]
    QueueFull {
        capacity: usize,
        retry_after: Duration,
    },
}

/// How the worker loads models.
#[derive(Debug, Clone)]
pub struct ServiceConfig {
    /// Jobs that may wait behind the running one.
    pub capacity: usize,
    pub load: LoadOptions,
}

impl Default for ServiceConfig {
    fn default() -> Self {
        Self {
            capacity: 16,
            load: LoadOptions::default(),
        }
    }
}

pub struct Job {
    id: String,
    spec: ComposedJob,
    cancel: AtomicBool,
    skip: AtomicBool,
    info: watch::Sender<JobInfo>,
    preview: Mutex<Option<Arc<Vec<u8>>>>,
}

impl Job {
    fn snapshot(&self) -> JobInfo {
        self.info.borrow().clone()
    }
}

struct Queue {
    pending: VecDeque<Arc<Job>>,
    running: Option<Arc<Job>>,
    finished: VecDeque<Arc<Job>>,
    next_id: u64,
    shutdown: bool,
}

struct Shared {
    queue: Mutex<Queue>,
    wake: Condvar,
    events: broadcast::Sender<JobEvent>,
    gallery: Arc<Gallery>,
    config: ServiceConfig,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Queue> {
        self.queue.lock().unwrap_or_else(|p| p.into_inner())
    }
    fn emit(&self, e: JobEvent) {
        // No listeners is normal (nobody has the UI open).
        let _ = self.events.send(e);
    }
}

/// The queue and its worker. Dropping the last handle stops the worker after its current job.
pub struct JobService {
    shared: Arc<Shared>,
}

impl JobService {
    pub fn new(gallery: Arc<Gallery>, config: ServiceConfig) -> Self {
        let (events, _) = broadcast::channel(256);
        let shared = Arc::new(Shared {
            queue: Mutex::new(Queue {
                pending: VecDeque::new(),
                running: None,
                finished: VecDeque::new(),
                next_id: 1,
                shutdown: false,
            }),
            wake: Condvar::new(),
            events,
            gallery,
            config,
        });
        let worker = shared.clone();
        std::thread::Builder::new()
            .name("ld-worker".into())
            .stack_size(16 * 1024 * 1024)
            .spawn(move || worker_loop(worker))
            .expect("the generation worker thread could not start");
        Self { shared }
    }

    pub fn gallery(&self) -> &Arc<Gallery> {
        &self.shared.gallery
    }

    /// Queues a job; refuses when `capacity` jobs already wait.
    pub fn submit(&self, spec: ComposedJob) -> Result<JobInfo, SubmitError> {
        let mut q = self.shared.lock();
        if q.pending.len() >= self.shared.config.capacity {
            let retry_after = q
                .running
                .as_ref()
                .and_then(|j| j.snapshot().eta_ms)
                .map(Duration::from_millis)
                .unwrap_or(Duration::from_secs(10))
                .max(Duration::from_secs(1));
            return Err(SubmitError::QueueFull {
                capacity: self.shared.config.capacity,
                retry_after,
            });
        }
        let id = format!("job-{}", q.next_id);
        q.next_id += 1;
        let position = q.pending.len() + usize::from(q.running.is_some()) + 1;
        let first = &spec.images[0];
        let info = JobInfo {
            id: id.clone(),
            state: JobState::Queued,
            stage: Stage::Waiting,
            position: Some(position),
            prompt: first.prompt.clone(),
            negative_prompt: first.negative_prompt.clone(),
            model: spec.model.name.clone(),
            width: first.width,
            height: first.height,
            steps: first.steps,
            cfg_scale: first.cfg_scale,
            sampler: first.sampler.name().to_owned(),
            schedule: first
                .sampler
                .resolve_schedule(first.schedule)
                .name()
                .to_owned(),
            seed: first.seed,
            batch: spec.images.len(),
            image: 0,
            step: 0,
            progress: 0.0,
            eta_ms: None,
            images: Vec::new(),
            error: None,
            created_at: now_ms(),
            started_at: None,
            finished_at: None,
        };
        let job = Arc::new(Job {
            id: id.clone(),
            spec,
            cancel: AtomicBool::new(false),
            skip: AtomicBool::new(false),
            info: watch::channel(info.clone()).0,
            preview: Mutex::new(None),
        });
        q.pending.push_back(job);
        drop(q);
        self.shared.emit(JobEvent::Queued { job: id, position });
        self.shared.wake.notify_all();
        Ok(info)
    }

    pub fn get(&self, id: &str) -> Option<JobInfo> {
        self.find(id).map(|j| j.snapshot())
    }

    /// Running first, then the queue in order, then finished jobs newest first.
    pub fn list(&self) -> Vec<JobInfo> {
        let q = self.shared.lock();
        q.running
            .iter()
            .chain(q.pending.iter())
            .chain(q.finished.iter().rev())
            .map(|j| j.snapshot())
            .collect()
    }

    /// The running job, if any (what A1111's `/progress` reports).
    pub fn current(&self) -> Option<JobInfo> {
        self.shared.lock().running.as_ref().map(|j| j.snapshot())
    }

    /// Jobs waiting or running.
    pub fn active_count(&self) -> usize {
        let q = self.shared.lock();
        q.pending.len() + usize::from(q.running.is_some())
    }

    /// The latest preview PNG of a running job.
    pub fn preview(&self, id: &str) -> Option<Arc<Vec<u8>>> {
        self.find(id)?
            .preview
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Cancels a queued job at once, a running one after its current step. `None`: no such job.
    pub fn cancel(&self, id: &str) -> Option<JobInfo> {
        let mut q = self.shared.lock();
        if let Some(i) = q.pending.iter().position(|j| j.id == id) {
            let job = q.pending.remove(i).expect("index from position");
            job.cancel.store(true, Ordering::SeqCst);
            finish(&job, JobState::Cancelled, None);
            push_finished(&mut q, job.clone());
            renumber(&self.shared, &q);
            drop(q);
            self.shared.emit(JobEvent::Cancelled { job: id.to_owned() });
            return Some(job.snapshot());
        }
        drop(q);
        let job = self.find(id)?;
        job.cancel.store(true, Ordering::SeqCst);
        Some(job.snapshot())
    }

    /// Stops the running job (A1111 "Interrupt"). Returns whether one was running.
    pub fn interrupt(&self) -> bool {
        match &self.shared.lock().running {
            Some(j) => {
                j.cancel.store(true, Ordering::SeqCst);
                true
            }
            None => false,
        }
    }

    /// Skips the image being drawn; the job goes on with the next of its batch (A1111 "Skip").
    pub fn skip(&self) -> bool {
        match &self.shared.lock().running {
            Some(j) => {
                j.skip.store(true, Ordering::SeqCst);
                true
            }
            None => false,
        }
    }

    pub fn subscribe(&self) -> broadcast::Receiver<JobEvent> {
        self.shared.events.subscribe()
    }

    /// Waits until the job has finished and returns it; `None`: no such job.
    pub async fn wait(&self, id: &str) -> Option<JobInfo> {
        let mut rx = self.find(id)?.info.subscribe();
        let done = rx.wait_for(|i| i.state.is_finished()).await.ok()?.clone();
        Some(done)
    }

    fn find(&self, id: &str) -> Option<Arc<Job>> {
        let q = self.shared.lock();
        q.running
            .iter()
            .chain(q.pending.iter())
            .chain(q.finished.iter())
            .find(|j| j.id == id)
            .cloned()
    }
}

impl Drop for JobService {
    fn drop(&mut self) {
        let mut q = self.shared.lock();
        q.shutdown = true;
        if let Some(j) = &q.running {
            j.cancel.store(true, Ordering::SeqCst);
        }
        drop(q);
        self.shared.wake.notify_all();
    }
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

fn push_finished(q: &mut Queue, job: Arc<Job>) {
    q.finished.push_back(job);
    while q.finished.len() > KEEP_FINISHED {
        q.finished.pop_front();
    }
}

/// After the queue changed, tells each waiting job its new place.
fn renumber(shared: &Shared, q: &Queue) {
    let ahead = usize::from(q.running.is_some());
    for (i, job) in q.pending.iter().enumerate() {
        let position = ahead + i + 1;
        let changed = job.info.send_if_modified(|info| {
            let old = info.position;
            info.position = Some(position);
            old != Some(position)
        });
        if changed {
            shared.emit(JobEvent::Queued {
                job: job.id.clone(),
                position,
            });
        }
    }
}

fn finish(job: &Job, state: JobState, error: Option<JobError>) {
    job.info.send_modify(|i| {
        i.state = state;
        i.stage = Stage::Finished;
        i.position = None;
        i.eta_ms = None;
        if state == JobState::Done {
            i.progress = 1.0;
        }
        i.error = error;
        i.finished_at = Some(now_ms());
    });
}

/// The model the worker holds, so back-to-back jobs on one model skip the load.
struct Loaded {
    path: PathBuf,
    dtype: DType,
    pipeline: Pipeline,
}

fn worker_loop(shared: Arc<Shared>) {
    let mut cache: Option<Loaded> = None;
    loop {
        let job = {
            let mut q = shared.lock();
            loop {
                if q.shutdown {
                    return;
                }
                if let Some(job) = q.pending.pop_front() {
                    q.running = Some(job.clone());
                    renumber(&shared, &q);
                    break job;
                }
                q = shared.wake.wait(q).unwrap_or_else(|p| p.into_inner());
            }
        };
        job.info.send_modify(|i| {
            i.state = JobState::Running;
            i.position = None;
            i.started_at = Some(now_ms());
        });
        shared.emit(JobEvent::Started {
            job: job.id.clone(),
        });

        let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            run_job(&shared, &job, &mut cache)
        }))
        .unwrap_or_else(|panic| {
            // The engine must not panic, but if it does the app keeps running: drop the model
            // (its state is unknown) and fail just this job.
            cache = None;
            let detail = panic
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_default();
            tracing::error!(job = %job.id, %detail, "generation panicked");
            Outcome::Failed(JobError {
                code: "internal",
                message: "Something went wrong inside Local Diffusers while drawing.".into(),
                hint: "Try again. If it keeps happening, open Diagnostics and copy the report."
                    .into(),
            })
        });

        let event = match outcome {
            Outcome::Done => {
                let ids = job.snapshot().images.iter().map(|r| r.id).collect();
                finish(&job, JobState::Done, None);
                JobEvent::Done {
                    job: job.id.clone(),
                    images: ids,
                }
            }
            Outcome::Cancelled => {
                finish(&job, JobState::Cancelled, None);
                JobEvent::Cancelled {
                    job: job.id.clone(),
                }
            }
            Outcome::Failed(error) => {
                tracing::warn!(job = %job.id, message = %error.message, "job failed");
                finish(&job, JobState::Failed, Some(error.clone()));
                JobEvent::Failed {
                    job: job.id.clone(),
                    error,
                }
            }
        };
        {
            let mut q = shared.lock();
            q.running = None;
            push_finished(&mut q, job.clone());
        }
        shared.emit(event);
    }
}

enum Outcome {
    Done,
    Cancelled,
    Failed(JobError),
}

fn run_job(shared: &Shared, job: &Job, cache: &mut Option<Loaded>) -> Outcome {
    let model = &job.spec.model;
    let dtype = shared.config.load.dtype;
    let hit = matches!(cache, Some(l) if l.path == model.path && l.dtype == dtype);
    if !hit {
        set_stage(shared, job, Stage::LoadingModel);
        // Free the old model before loading the new one: two at once may not fit.
        *cache = None;
        match Pipeline::load(&model.path, &shared.config.load) {
            Ok(pipeline) => {
                *cache = Some(Loaded {
                    path: model.path.clone(),
                    dtype,
                    pipeline,
                })
            }
            Err(e) => return Outcome::Failed(explain(&e, &model.name)),
        }
    }
    let pipeline = &cache.as_ref().expect("loaded above").pipeline;
    let batch = job.spec.images.len();
    let started = Instant::now();
    let mut any_done = false;
    for (index, req) in job.spec.images.iter().enumerate() {
        if job.cancel.load(Ordering::SeqCst) {
            return Outcome::Cancelled;
        }
        job.skip.store(false, Ordering::SeqCst);
        job.info.send_modify(|i| {
            i.image = index;
            i.step = 0;
            i.stage = Stage::Sampling;
        });
        let mut observer = JobObserver {
            shared,
            job,
            index,
            batch,
            started,
        };
        let image = match pipeline.generate(req, &mut observer) {
            Ok(image) => image,
            Err(EngineError::Cancelled) if job.skip.load(Ordering::SeqCst) => continue,
            Err(EngineError::Cancelled) => return Outcome::Cancelled,
            Err(e) => return Outcome::Failed(explain(&e, &model.name)),
        };
        set_stage(shared, job, Stage::Saving);
        let new = NewImage {
            rgb: image.pixels,
            width: image.width as u32,
            height: image.height as u32,
            infotext: infotext_for(req, &model.name),
        };
        match shared.gallery.save(new) {
            Ok(record) => {
                any_done = true;
                job.info.send_modify(|i| i.images.push(record));
            }
            Err(e) => {
                return Outcome::Failed(JobError {
                    code: "internal",
                    message: format!("The picture could not be saved: {e}"),
                    hint: "Check that the disk is not full and the data folder is writable.".into(),
                })
            }
        }
    }
    if !any_done && job.cancel.load(Ordering::SeqCst) {
        return Outcome::Cancelled;
    }
    Outcome::Done
}

fn set_stage(shared: &Shared, job: &Job, stage: Stage) {
    job.info.send_modify(|i| i.stage = stage);
    let i = job.snapshot();
    shared.emit(JobEvent::Progress {
        job: job.id.clone(),
        stage,
        image: i.image,
        batch: i.batch,
        step: i.step,
        steps: i.steps,
        progress: i.progress,
        eta_ms: i.eta_ms,
    });
}

/// The A1111 parameters text saved in the PNG.
pub fn infotext_for(req: &GenerateRequest, model: &str) -> Infotext {
    // A1111's default noise is the GPU's; it marks other sources ("RNG: CPU", "RNG: NV"), so an
    // A1111 user pasting our parameters gets our noise.
    let rng = match req.seed_source {
        SeedSource::Nv => "NV",
        _ => "CPU",
    };
    let extra = vec![("RNG".to_owned(), rng.to_owned())];
    Infotext {
        prompt: req.prompt.clone(),
        negative_prompt: req.negative_prompt.clone(),
        steps: req.steps as u32,
        sampler: req.sampler.name().to_owned(),
        // A1111 1.9+ writes the schedule "Automatic" resolved to ("Schedule type: Karras").
        schedule: Some(req.sampler.resolve_schedule(req.schedule).name().to_owned()),
        cfg_scale: req.cfg_scale,
        seed: req.seed,
        width: req.width as u32,
        height: req.height as u32,
        model_hash: None,
        model: Some(model.to_owned()),
        clip_skip: req.clip_skip as u32,
        extra,
    }
}

struct JobObserver<'a> {
    shared: &'a Shared,
    job: &'a Job,
    index: usize,
    batch: usize,
    started: Instant,
}

impl Observer for JobObserver<'_> {
    fn on_progress(&mut self, p: &Progress<'_>) -> Control {
        let total_steps = (p.total * self.batch).max(1);
        let done = self.index * p.total + p.step;
        let elapsed = self.started.elapsed();
        let eta_ms = (done > 0)
            .then(|| (elapsed.as_millis() as u64 * (total_steps - done) as u64) / done as u64);
        let progress = done as f64 / total_steps as f64;
        self.job.info.send_modify(|i| {
            i.step = p.step;
            i.progress = progress;
            i.eta_ms = eta_ms;
            i.stage = if p.step == p.total {
                Stage::Decoding
            } else {
                Stage::Sampling
            };
        });
        self.shared.emit(JobEvent::Progress {
            job: self.job.id.clone(),
            stage: Stage::Sampling,
            image: self.index,
            batch: self.batch,
            step: p.step,
            steps: p.total,
            progress,
            eta_ms,
        });
        if let Some(preview) = p.preview {
            if let Ok(png) = preview_png(&preview.pixels, preview.width, preview.height) {
                let url = format!(
                    "data:image/png;base64,{}",
                    base64::engine::general_purpose::STANDARD.encode(&png)
                );
                *self.job.preview.lock().unwrap_or_else(|p| p.into_inner()) = Some(Arc::new(png));
                self.shared.emit(JobEvent::Preview {
                    job: self.job.id.clone(),
                    image: url,
                });
            }
        }
        if self.job.cancel.load(Ordering::SeqCst) || self.job.skip.load(Ordering::SeqCst) {
            Control::Cancel
        } else {
            Control::Continue
        }
    }

    fn preview_every(&self) -> Option<NonZeroUsize> {
        // About five previews per image: enough to watch it form, cheap next to a UNet step.
        let steps = self.job.spec.images[0].steps;
        NonZeroUsize::new((steps / 5).max(1))
    }
}

fn preview_png(rgb: &[u8], width: usize, height: usize) -> Result<Vec<u8>, png::EncodingError> {
    let mut out = Vec::new();
    let mut enc = png::Encoder::new(&mut out, width as u32, height as u32);
    enc.set_color(png::ColorType::Rgb);
    enc.set_depth(png::BitDepth::Eight);
    let mut w = enc.write_header()?;
    w.write_image_data(rgb)?;
    w.finish()?;
    Ok(out)
}

/// An engine failure in words for the user, with what to do about it.
pub fn explain(e: &EngineError, model: &str) -> JobError {
    match e {
        EngineError::MissingFile { .. }
        | EngineError::Config { .. }
        | EngineError::Weights { .. }
        | EngineError::PickleRefused { .. }
        | EngineError::Tokenizer(_) => JobError {
            code: "model_broken",
            message: format!("The model '{model}' could not be loaded: {e}."),
            hint: "Install the model again, or choose another one in Models.".into(),
        },
        EngineError::InvalidRequest(m) => JobError {
            code: "invalid_request",
            message: format!("{m}."),
            hint: "Change the setting and try again.".into(),
        },
        EngineError::Io { .. } => JobError {
            code: "internal",
            message: format!("A model file could not be read: {e}."),
            hint: "Check that the disk or folder holding the model is still there and readable."
                .into(),
        },
        EngineError::Candle(inner) if is_out_of_memory(&inner.to_string()) => JobError {
            code: "out_of_memory",
            message: "There was not enough memory to draw this picture.".into(),
            hint: "Choose a smaller size or fewer images at once, or turn on low-VRAM mode in \
                   Settings."
                .into(),
        },
        _ => JobError {
            code: "internal",
            message: format!("Drawing failed: {e}."),
            hint: "Try again. If it keeps happening, open Diagnostics and copy the report.".into(),
        },
    }
}

fn is_out_of_memory(text: &str) -> bool {
    let t = text.to_ascii_lowercase();
    t.contains("out of memory") || t.contains("cuda_error_out_of_memory") || t.contains("alloc")
}
