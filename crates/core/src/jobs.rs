//! The generation queue: a bounded list of jobs and one worker thread that owns the loaded model
//! and runs the engine. Everything that draws (the UI, the A1111 and OpenAI APIs, the CLI's server
//! mode) goes through here, so progress, previews, cancel and the gallery work the same for all.
//!
//! Jobs report through two channels: a `watch` per job (its latest [`JobInfo`], what a caller
//! waiting for its own job reads) and one `broadcast` of [`JobEvent`]s for every listener (the
//! UI's event stream). Neither needs an async runtime to send, so the worker is a plain thread.
//!
//! Memory: before a job runs, its memory is estimated ([`ld_engine::memory`]) against what is
//! free, and low-VRAM strategies are turned on until it fits (or the job fails saying why). An
//! out-of-memory error while drawing walks the recovery chain (tiled VAE, sliced attention, VAE on
//! the CPU, batch split); a NaN or black picture is decoded again in fp32. What was changed is in
//! the job's `notes` and the image's parameters text. With "Low-VRAM mode" On on the CPU a job
//! loads one model at a time instead of keeping the whole pipeline ([`StagedPipeline`]).

use crate::compose::ComposedJob;
use crate::gallery::{Gallery, ImageRecord, NewImage};
use crate::infotext::Infotext;
use base64::Engine as _;
use candle_core::{DType, Tensor};
use ld_engine::lora::{LoraSet, LoraSpec};
use ld_engine::memory::{MemoryOptions, ModelShape, RefinerParams, Target};
use ld_engine::pipeline::staged::StagedPipeline;
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
    /// CLIP layers skipped from the end (1: none), A1111's "Clip skip".
    pub clip_skip: usize,
    pub batch: usize,
    /// 0-based image of the batch being drawn.
    pub image: usize,
    /// Steps done of the current image.
    pub step: usize,
    /// Steps of one image's whole run: `steps`, plus a hires fix's second pass (what `step`
    /// counts up to).
    pub total_steps: usize,
    /// 0..1 over the whole job.
    pub progress: f64,
    pub eta_ms: Option<u64>,
    pub images: Vec<ImageRecord>,
    pub error: Option<JobError>,
    /// What the app changed to make the picture fit or look right ("Out of memory: retried with
    /// tiled VAE"), in words for the user.
    pub notes: Vec<String>,
    /// The VAE file the pictures are decoded with (the one chosen in Settings, or the one beside
    /// the model), by file name as A1111's `sd_vae_name`; `None`: the model's own VAE. Known once
    /// the job runs.
    pub vae: Option<String>,
    /// Unix milliseconds.
    pub created_at: i64,
    pub started_at: Option<i64>,
    pub finished_at: Option<i64>,
    /// Milliseconds per sampling step, measured between steps (so without loading, decoding and
    /// saving); `None` until two steps in a row were drawn.
    #[serde(default)]
    pub step_ms: Option<u64>,
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
    /// Where file hashes are cached (for the infotext's model, LoRA and embedding hashes);
    /// `None` keeps them in memory only.
    pub hash_cache: Option<PathBuf>,
}

impl Default for ServiceConfig {
    fn default() -> Self {
        Self {
            capacity: 16,
            load: LoadOptions::default(),
            hash_cache: None,
        }
    }
}

/// Where the worker may fail on purpose (tests): before sampling or before decoding.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FaultPoint {
    Sampling,
    Decoding,
}

/// A test hook the worker asks before each stage. Compiled always so the recovery code that tests
/// exercise is the code that ships; only tests install one ([`JobService::set_fault_injector`]).
pub trait FaultInjector: Send + Sync {
    /// An error to raise at `point` instead of running it, given the strategies now in use.
    fn fail(&self, point: FaultPoint, memory: &MemoryOptions) -> Option<EngineError>;
    /// Whether to treat the decoded picture as broken (NaN), as an fp16 VAE overflow gives.
    fn corrupt_output(&self, _memory: &MemoryOptions) -> bool {
        false
    }
}

/// Free memory in bytes, asked before each job (VRAM of the GPU drawing, or the system's
/// available RAM).
pub type FreeMemory = Arc<dyn Fn() -> Option<u64> + Send + Sync>;

/// How the worker manages memory; from the settings' "Low-VRAM mode" and the hardware.
#[derive(Clone)]
pub struct MemoryPolicy {
    pub low_vram: crate::settings::LowVram,
    /// The strategies "On" uses (see [`crate::hardware::low_vram_options`]).
    pub low_options: MemoryOptions,
    /// The GPU's free memory. `None`: unknown, so no estimate is made before the job.
    pub free: Option<FreeMemory>,
    /// The system's available memory, asked before each job drawn on the CPU: in "Auto", a job
    /// whose models and working memory would not fit in it together is drawn one model at a
    /// time. `None`: unknown, so never.
    pub ram_free: Option<FreeMemory>,
    /// The system's free swap, asked with `ram_free` before each job drawn on the CPU: a job
    /// whose planned memory would not fit in the available memory and the free swap together is
    /// refused before it starts. Swapping is slow but not fatal; running out of both ends in the
    /// system stopping the app, which no job can report. `None`: unknown, counted as none.
    pub swap_free: Option<FreeMemory>,
    /// The major compute capability of the NVIDIA GPU drawn on (8 for an RTX 3060), which
    /// says whether its attention holds score blocks (`ld_engine::memory::Target::nvidia`).
    /// `None`: unknown, planned as a GPU that holds them.
    pub gpu_major: Option<u32>,
}

impl Default for MemoryPolicy {
    fn default() -> Self {
        Self {
            low_vram: crate::settings::LowVram::Auto,
            low_options: MemoryOptions::lowest(),
            free: None,
            ram_free: None,
            swap_free: None,
            gpu_major: None,
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
    /// A job for `spec`, waiting at `position` in the queue (1: next), and what callers see of it.
    fn queued(id: String, spec: ComposedJob, position: usize) -> (Self, JobInfo) {
        let first = &spec.images[0];
        let info = JobInfo {
            id: id.clone(),
            state: JobState::Queued,
            stage: Stage::Waiting,
            position: Some(position),
            prompt: first.prompt.clone(),
            negative_prompt: first.negative_prompt.clone(),
            model: spec.model.name.clone(),
            // The first pass's size, as A1111's info gives it; the pictures have their own.
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
            clip_skip: first.clip_skip,
            batch: spec.images.len(),
            image: 0,
            step: 0,
            total_steps: first.steps + first.hires.as_ref().map_or(0, |f| f.steps),
            progress: 0.0,
            eta_ms: None,
            images: Vec::new(),
            error: None,
            notes: Vec::new(),
            vae: None,
            created_at: now_ms(),
            started_at: None,
            finished_at: None,
            step_ms: None,
        };
        let job = Job {
            id: id.clone(),
            spec,
            cancel: AtomicBool::new(false),
            skip: AtomicBool::new(false),
            info: watch::channel(info.clone()).0,
            preview: Mutex::new(None),
        };
        (job, info)
    }

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
    policy: Mutex<MemoryPolicy>,
    faults: Mutex<Option<Arc<dyn FaultInjector>>>,
    hashes: crate::hashes::HashCache,
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
            hashes: match &config.hash_cache {
                Some(file) => crate::hashes::HashCache::open(file),
                None => crate::hashes::HashCache::in_memory(),
            },
            config,
            policy: Mutex::new(MemoryPolicy::default()),
            faults: Mutex::new(None),
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

    /// Sets how the next jobs manage memory (the server calls it at start and when settings change).
    pub fn set_memory_policy(&self, policy: MemoryPolicy) {
        *self.shared.policy.lock().unwrap_or_else(|p| p.into_inner()) = policy;
    }

    /// Installs a fault injector (tests only; see [`FaultInjector`]).
    pub fn set_fault_injector(&self, faults: Option<Arc<dyn FaultInjector>>) {
        *self.shared.faults.lock().unwrap_or_else(|p| p.into_inner()) = faults;
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
        let (job, info) = Job::queued(id.clone(), spec, position);
        let job = Arc::new(job);
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

    /// The hashes of files the worker has met (models, LoRAs, embeddings), shared with the
    /// library so it can show a checkpoint's hash without reading it again.
    pub fn hashes(&self) -> &crate::hashes::HashCache {
        &self.shared.hashes
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

    /// Adds a note to job `id` (what the app changed or could not do, in words for the user), as
    /// the worker's own notes; `false` when there is no such job.
    pub fn add_note(&self, id: &str, text: &str) -> bool {
        self.find(id).map(|job| push_note(&job, text)).is_some()
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

/// The model the worker holds, so back-to-back jobs on one model skip the load. Keyed by the
/// LoRA set too: LoRAs are merged into the weights at load.
struct Loaded {
    path: PathBuf,
    dtype: DType,
    loras: Vec<LoraSpec>,
    embedding_dirs: Vec<PathBuf>,
    refiner: Option<PathBuf>,
    /// [`files_stamp`] of everything the pipeline was built from.
    stamp: u64,
    pipeline: Pipeline,
}

/// A fingerprint of the files `spec`'s pipeline is built from (the model, its VAE file, its
/// LoRAs, the embedding folders' files, the refiner): their names, sizes and modification times.
/// Another VAE chosen in Settings changes it too, so the switch takes effect on the next job. A model
/// replaced on disk, or an embedding dropped into its folder, changes it, so the next job loads
/// afresh instead of drawing with what was read before (and saving parameters that name files
/// it did not use). Folders are read a few levels deep, hidden entries skipped: stats only, a
/// few dozen per job.
fn files_stamp(spec: &ComposedJob) -> u64 {
    use std::hash::{Hash, Hasher};
    fn visit(path: &std::path::Path, depth: usize, h: &mut impl Hasher) {
        let Ok(meta) = std::fs::metadata(path) else {
            path.hash(h);
            return;
        };
        if meta.is_dir() {
            if depth == 0 {
                return;
            }
            let Ok(entries) = std::fs::read_dir(path) else {
                return;
            };
            let mut names: Vec<PathBuf> = entries
                .filter_map(|e| e.ok())
                .filter(|e| !e.file_name().to_string_lossy().starts_with('.'))
                .map(|e| e.path())
                .collect();
            names.sort();
            for p in names {
                visit(&p, depth - 1, h);
            }
        } else {
            path.hash(h);
            meta.len().hash(h);
            meta.modified().ok().hash(h);
        }
    }
    let mut h = std::collections::hash_map::DefaultHasher::new();
    visit(&spec.model.path, 3, &mut h);
    match crate::vae::resolve(&spec.vae, &spec.model).path {
        Some(vae) => visit(&vae, 0, &mut h),
        // Told apart from a VAE file that has since gone.
        None => "own VAE".hash(&mut h),
    }
    for lora in &spec.loras {
        visit(&lora.path, 0, &mut h);
    }
    for dir in &spec.embedding_dirs {
        visit(dir, 2, &mut h);
    }
    if let Some(r) = &spec.refiner {
        visit(&r.path, 3, &mut h);
    }
    h.finish()
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
    let vae = crate::vae::resolve(&job.spec.vae, model);
    if let Some(note) = &vae.note {
        tracing::warn!(job = %job.id, "{note}");
        push_note(job, note);
    }
    job.info.send_modify(|i| i.vae = vae.name());
    let stamp = files_stamp(&job.spec);
    let hit = matches!(cache, Some(l) if l.path == model.path && l.dtype == dtype
        && l.loras == job.spec.loras && l.embedding_dirs == job.spec.embedding_dirs
        && l.refiner == job.spec.refiner.as_ref().map(|r| r.path.clone())
        && l.stamp == stamp);
    if !hit {
        set_stage(shared, job, Stage::LoadingModel);
        // Free the old model before loading the new one: two at once may not fit. Returned to
        // the system, so the free memory measured next counts it.
        *cache = None;
        ld_engine::memory::release_freed_memory();
    }
    let policy = shared
        .policy
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .clone();
    let faults = shared
        .faults
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .clone();
    let on_cpu = shared.config.load.device.is_cpu();
    if let Some(note) = staging(shared, job, &policy, dtype, hit, on_cpu) {
        // A whole model kept for the next job would hold the memory staging is for.
        *cache = None;
        // Each stage holds one model, and the base's estimate covers the largest.
        let memory = plan_memory(job, &policy, dtype, false, 0).and_then(|memory| {
            if on_cpu {
                plan_cpu_stages(shared, job, &policy, dtype, memory)
            } else {
                Ok(memory)
            }
        });
        return match memory {
            Ok(memory) => run_staged(shared, job, &vae, memory, &note, faults.as_deref()),
            Err(e) => Outcome::Failed(e),
        };
    }
    let refiner = if hit {
        0
    } else {
        refiner_weights(shared, job, dtype, on_cpu)
    };
    let mut memory = match plan_memory(job, &policy, dtype, hit, refiner) {
        Ok(m) => m,
        Err(e) => return Outcome::Failed(e),
    };
    if let Some(ram) = policy
        .ram_free
        .as_ref()
        .filter(|_| on_cpu)
        .and_then(|f| f())
    {
        if let Some(need) = cpu_whole_need(shared, job, dtype, hit, &memory, ram) {
            if let Err(e) = cpu_fits(&policy, need, ram, false) {
                return Outcome::Failed(e);
            }
        }
    }
    if !hit {
        match load_pipeline(shared, job, &vae) {
            Ok(pipeline) => {
                *cache = Some(Loaded {
                    path: model.path.clone(),
                    dtype,
                    loras: job.spec.loras.clone(),
                    embedding_dirs: job.spec.embedding_dirs.clone(),
                    refiner: job.spec.refiner.as_ref().map(|r| r.path.clone()),
                    stamp,
                    pipeline,
                })
            }
            Err(e) => return Outcome::Failed(explain_load(&e, &model.name, &vae)),
        }
    }
    let pipeline = &mut cache.as_mut().expect("loaded above").pipeline;
    // The switch point may change from job to job without reloading the refiner.
    if let Some(r) = &job.spec.refiner {
        let mut options = pipeline.sdxl_options().unwrap_or_default();
        options.refiner.switch_at = r.switch_at;
        if let Err(e) = pipeline.set_sdxl_options(options) {
            return Outcome::Failed(explain(&e, &model.name));
        }
    }
    if let Err(e) = pipeline.set_memory_options(memory) {
        return Outcome::Failed(explain(&e, &model.name));
    }
    // Recovery is the app's "Auto"; "Off" means the user wants plain runs and plain errors.
    let recover = policy.low_vram != crate::settings::LowVram::Off;
    let batch = job.spec.images.len();
    let started = Instant::now();
    let mut any_done = false;
    for (index, req) in job.spec.images.iter().enumerate() {
        if job.cancel.load(Ordering::SeqCst) {
            return Outcome::Cancelled;
        }
        start_image(job, index);
        let mut recovered: Vec<String> = Vec::new();
        let mut tried: Vec<&'static str> = Vec::new();
        let latents = loop {
            let mut observer = JobObserver {
                shared,
                job,
                index,
                batch,
                started,
                base_steps: None,
                timing: StepTiming::default(),
            };
            let result = match faults
                .as_ref()
                .and_then(|f| f.fail(FaultPoint::Sampling, &memory))
            {
                Some(e) => Err(e),
                None => pipeline.sample_latents(req, &mut observer, &mut |_, _| {}),
            };
            match result {
                Ok(l) => break Some(l),
                // Skipped by the user (A1111 "Skip"): go on with the next image.
                Err(EngineError::Cancelled) if job.skip.load(Ordering::SeqCst) => break None,
                Err(EngineError::Cancelled) => return Outcome::Cancelled,
                Err(e) if recover && is_oom(&e) => {
                    match escalate(&mut memory, FaultPoint::Sampling) {
                        Some(step) => {
                            tried.push(step);
                            note(shared, job, &mut recovered, step, "drawing");
                            free_held(job);
                            if let Err(e) = pipeline.set_memory_options(memory) {
                                return Outcome::Failed(explain(&e, &model.name));
                            }
                        }
                        None => return Outcome::Failed(out_of_memory_after(&tried)),
                    }
                }
                Err(e) => return Outcome::Failed(explain(&e, &model.name)),
            }
        };
        let Some(latents) = latents else {
            continue;
        };
        // Kept in host memory while the VAE (re)tries, so a failed decode cannot cost the steps.
        let latents = match latents.to_device(&candle_core::Device::Cpu) {
            Ok(l) => l,
            Err(e) => return Outcome::Failed(explain(&e.into(), &model.name)),
        };
        let mut upcast_tried = false;
        let image = loop {
            set_stage(shared, job, Stage::Decoding);
            let result = match faults
                .as_ref()
                .and_then(|f| f.fail(FaultPoint::Decoding, &memory))
            {
                Some(e) => Err(e),
                None => pipeline.decode(&latents),
            };
            let broken = faults.as_ref().is_some_and(|f| f.corrupt_output(&memory));
            match result {
                Ok(img) if !upcast_tried && (broken || is_broken_image(&img)) => {
                    // SD's VAE overflows in fp16 (NaN, then a black picture): diffusers'
                    // `force_upcast` and A1111's "--no-half-vae" decode in fp32 instead.
                    upcast_tried = true;
                    memory.vae_f32 = true;
                    recovered.push("black image: VAE in fp32".into());
                    push_note(job, BLACK_IMAGE_NOTE);
                    if let Err(e) = pipeline.set_memory_options(memory) {
                        return Outcome::Failed(explain(&e, &model.name));
                    }
                }
                Ok(img) => break img,
                Err(e) if recover && is_oom(&e) => {
                    match escalate(&mut memory, FaultPoint::Decoding) {
                        Some(step) => {
                            tried.push(step);
                            note(
                                shared,
                                job,
                                &mut recovered,
                                step,
                                "turning the picture into pixels",
                            );
                            free_held(job);
                            if let Err(e) = pipeline.set_memory_options(memory) {
                                return Outcome::Failed(explain(&e, &model.name));
                            }
                        }
                        None => return Outcome::Failed(out_of_memory_after(&tried)),
                    }
                }
                Err(e) => return Outcome::Failed(explain(&e, &model.name)),
            }
        };
        let ti = ti_hashes(shared, pipeline.embeddings(), &req.prompt, |p| {
            pipeline.plan_prompt(p)
        });
        let memory = pipeline.memory_options();
        if let Err(outcome) = save_picture(shared, job, req, &image, ti, &vae, &memory, &recovered)
        {
            return outcome;
        }
        any_done = true;
    }
    if !any_done && job.cancel.load(Ordering::SeqCst) {
        return Outcome::Cancelled;
    }
    Outcome::Done
}

/// Whether `job` draws with one model in memory at a time ([`StagedPipeline`]), and the note
/// that says why: a model the stages take (an SD1/SD2/SDXL base folder or single file, with or
/// without a refiner), "Low-VRAM mode" not Off, and
/// - on the CPU (`on_cpu`): "On", or "Auto" when the whole pipeline would not fit in the
///   available memory (`loaded`: its weights are already in). The whole pipeline keeps all
///   three models resident, so SD 1.5 at 512x512 peaks at 3.6 GB even with f16 weights; staged,
///   2.1 GB. Reading the models again costs seconds per job against minutes of sampling.
/// - on a GPU, only jobs with an SDXL refiner: the recovery chain's placements (VAE and text
///   encoders on the CPU) already keep a single UNet alone in VRAM, but a refiner is a second
///   UNet (4.5 GB in f16 beside the base's 5.1 GB), which no placement moves. "On" stages them;
///   "Auto" when the whole pipeline would not fit in the free VRAM even with every strategy
///   on, since staging reads both UNets again for every job while the strategies cost a few
///   percent of speed.
fn staging(
    shared: &Shared,
    job: &Job,
    policy: &MemoryPolicy,
    dtype: DType,
    loaded: bool,
    on_cpu: bool,
) -> Option<String> {
    use crate::settings::LowVram;
    let refiner = job.spec.refiner.is_some();
    let sdxl = job.spec.model.family == crate::models::Family::Sdxl;
    if policy.low_vram == LowVram::Off || (!on_cpu && !refiner) {
        return None;
    }
    let note = if policy.low_vram == LowVram::On {
        staged_note(sdxl, refiner)
    } else if !on_cpu {
        if loaded {
            // It fitted when it loaded; its weights are out of the free figure.
            return None;
        }
        let shape = model_shape(&job.spec.model)?;
        let free = policy.free.as_ref()?()?;
        let memory = MemoryOptions::lowest();
        let need = job_need(
            &job.spec,
            &shape,
            dtype,
            gpu_target(policy, dtype),
            &memory,
            false,
        ) + refiner_weights(shared, job, dtype, false);
        if need <= free {
            return None;
        }
        format!(
            "With both drawing models on the graphics card this picture needs about {} even with every memory saving on, and {} is free, so {} were loaded one at a time.",
            gib(need),
            gib(free),
            staged_models(true, true)
        )
    } else {
        let free = policy.ram_free.as_ref()?()?;
        let need = cpu_whole_need(shared, job, dtype, loaded, &MemoryOptions::default(), free)?;
        if need <= free {
            return None;
        }
        format!(
            "With all its models loaded this picture needs about {} of memory and {} is free, so {} were loaded one at a time.",
            gib(need),
            gib(free),
            staged_models(sdxl, refiner)
        )
    };
    // Last: it reads the model's headers.
    StagedPipeline::supports(&job.spec.model.path)
        .unwrap_or(false)
        .then_some(note)
}

/// What `job` needs drawn by the whole pipeline on the CPU with `memory`: the model's estimate
/// (its working memory alone when `loaded`), with a refiner's weights. `None` when the model's
/// shape is unknown. The estimate counts the UNet's weights in `dtype`; on the CPU a model whose
/// UNet file is f16 keeps them in f16 (`LoadOptions::half_weights`), half of that; only read
/// (from the file headers) when the figure is above `free` and could change an answer.
fn cpu_whole_need(
    shared: &Shared,
    job: &Job,
    dtype: DType,
    loaded: bool,
    memory: &MemoryOptions,
    free: u64,
) -> Option<u64> {
    let shape = model_shape(&job.spec.model)?;
    let need = job_need(&job.spec, &shape, dtype, Target::Cpu, memory, loaded);
    if loaded {
        return Some(need);
    }
    // The whole pipeline keeps a refiner's text encoder and UNet as well.
    let need = need + refiner_weights(shared, job, dtype, true);
    Some(if need > free && unet_kept_half(shared, job, dtype) {
        need.saturating_sub(shape.unet_params * 2)
    } else {
        need
    })
}

/// On the CPU: refuses a job whose planned memory (`need`, the largest stage's for a staged
/// job) is more than the available memory (`ram`, as the plan read it) and the free swap
/// together (see [`MemoryPolicy::swap_free`]).
fn cpu_fits(policy: &MemoryPolicy, need: u64, ram: u64, staged: bool) -> Result<(), JobError> {
    use crate::settings::LowVram;
    let swap = policy.swap_free.as_ref().and_then(|f| f()).unwrap_or(0);
    if need <= ram.saturating_add(swap) {
        return Ok(());
    }
    let free = if swap > 0 {
        format!(
            "{} is free, counting {} of swap",
            gib(ram + swap),
            gib(swap)
        )
    } else {
        format!("{} is free", gib(ram))
    };
    let hint = if staged || policy.low_vram != LowVram::Off {
        "Choose a smaller size or a smaller model (SD 1.5), or close other programs."
    } else {
        "Set Low-VRAM mode to Auto in Settings, so that it is drawn one model at a time, or choose a smaller size."
    };
    Err(JobError {
        code: "out_of_memory",
        message: format!(
            "This picture needs about {} of memory on this computer, and only {free}.",
            gib(need)
        ),
        hint: hint.into(),
    })
}

/// The weights `job`'s SDXL refiner adds to a whole pipeline (its text encoder and UNet, which
/// stay on the pipeline's device whatever the placements); 0 without one. On the CPU a UNet whose
/// file is f16 keeps f16 weights under an f32 pipeline, as the base's. Unreadable here means its
/// load will fail with its own message; nothing is counted for it.
fn refiner_weights(shared: &Shared, job: &Job, dtype: DType, on_cpu: bool) -> u64 {
    let Some(r) = &job.spec.refiner else {
        return 0;
    };
    let p = RefinerParams::read(&r.path).unwrap_or_default();
    let bytes = dtype.size_in_bytes() as u64;
    let half = on_cpu
        && dtype == DType::F32
        && shared
            .config
            .load
            .unet_stores_half(&r.path, false)
            .unwrap_or(false);
    p.text * bytes + p.unet * if half { 2 } else { bytes }
}

/// The memory target of the GPU `policy` describes, drawing in `dtype`.
fn gpu_target(policy: &MemoryPolicy, dtype: DType) -> Target {
    policy
        .gpu_major
        .map_or(Target::Gpu, |major| Target::nvidia(major, dtype))
}

/// The size and guidance memory is planned for: `spec`'s first picture, at the size of a hires
/// fix's second pass, which is the larger (Lanczos encodes its enlarged picture before the cut).
fn planned_picture(spec: &ComposedJob, shape: &ModelShape) -> (usize, usize, bool) {
    let req = &spec.images[0];
    let (width, height) = req
        .hires
        .as_ref()
        .map_or((req.width, req.height), |f| f.enlarged_size());
    (
        width,
        height,
        req.cfg_scale != 1.0 && !shape.guidance_embedded,
    )
}

/// Whether `job`'s UNet keeps f16 weights under `dtype` (an fp16 file drawn in f32 on the CPU,
/// `LoadOptions::stores_half`), read from the file headers; unreadable counts as not.
fn unet_kept_half(shared: &Shared, job: &Job, dtype: DType) -> bool {
    dtype == DType::F32
        && shared
            .config
            .load
            .unet_stores_half(&job.spec.model.path, !job.spec.loras.is_empty())
            .unwrap_or(false)
}

/// The estimated peak memory of `spec`'s first picture with `memory`'s strategies on `target`;
/// without the weights when the model is already `loaded` (they are out of the free figure).
fn job_need(
    spec: &ComposedJob,
    shape: &ModelShape,
    dtype: DType,
    target: Target,
    memory: &MemoryOptions,
    loaded: bool,
) -> u64 {
    let (width, height, guided) = planned_picture(spec, shape);
    let e = ld_engine::memory::estimate(shape, width, height, guided, dtype, target, memory);
    if loaded {
        e.peak - e.weights
    } else {
        e.peak
    }
}

/// [`run_job`] one model at a time: the text encoder(s) encode every prompt of the batch, then
/// the UNet samples every picture (with a refiner, up to its switch point, and then the
/// refiner's UNet finishes every picture), then the VAE decodes them, each model freed before
/// the next loads. Pictures, notes and parameters text are those of the whole pipeline (the stages build
/// the same models with the same LoRAs and embeddings).
fn run_staged(
    shared: &Shared,
    job: &Job,
    vae_file: &crate::vae::VaeUse,
    memory: MemoryOptions,
    staged_why: &str,
    faults: Option<&dyn FaultInjector>,
) -> Outcome {
    let spec = &job.spec;
    let model = &spec.model;
    let failed = |e: EngineError| Outcome::Failed(explain_load(&e, &model.name, vae_file));
    // Errors of the refiner's stages name the refiner.
    let refiner_name = spec
        .refiner
        .as_ref()
        .map_or("the refiner", |r| r.name.as_str());
    let refiner_failed = |e: EngineError| Outcome::Failed(explain(&e, refiner_name));
    let cancelled = || job.cancel.load(Ordering::SeqCst);
    // Grows as running out of memory turns strategies on (the GPU; a staged run never has the
    // whole pipeline's "Off").
    let mut memory = memory;
    set_stage(shared, job, Stage::LoadingModel);
    push_note(job, staged_why);
    let source = ld_engine::single_file::ModelSource {
        path: model.path.clone(),
        config: None,
        vae: vae_file.path.clone(),
    };
    let mut staged = match StagedPipeline::open_source(&source, &shared.config.load) {
        Ok(s) => s,
        Err(e) => return failed(e),
    };
    staged.set_memory_options(memory);
    if let Some(r) = &spec.refiner {
        let options = ld_engine::refiner::RefinerOptions {
            switch_at: r.switch_at,
            ..Default::default()
        };
        let source = ld_engine::single_file::ModelSource::new(r.path.clone());
        if let Err(e) = staged.set_refiner(&source, options) {
            return refiner_failed(e);
        }
    }
    let mut loras = match LoraSet::open(&spec.loras) {
        Ok(l) => l,
        Err(e) => return failed(e),
    };

    // Stage 1: the text encoder(s), with the LoRAs' text layers and the embeddings.
    let mut text = match staged.load_text_encoders(&mut loras) {
        Ok(t) => t,
        Err(e) => return failed(e),
    };
    let dirs: Vec<&std::path::Path> = spec.embedding_dirs.iter().map(PathBuf::as_path).collect();
    let mut notes: Vec<String> = match text.load_embeddings_dirs(&dirs) {
        Ok(w) => w.iter().map(ToString::to_string).collect(),
        Err(e) => return failed(e),
    };
    let mut prompts = Vec::with_capacity(spec.images.len());
    for req in &spec.images {
        if cancelled() {
            return Outcome::Cancelled;
        }
        match text.encode(req) {
            Ok(p) => prompts.push(p),
            Err(e) => return failed(e),
        }
    }
    let ti: Vec<Option<String>> = spec
        .images
        .iter()
        .map(|req| {
            ti_hashes(shared, text.embeddings(), &req.prompt, |p| {
                text.plan_prompt(p)
            })
        })
        .collect();
    drop(text);

    // Stage 1b: the refiner's text encoder, once the base's are freed, for the pictures that
    // reach its switch point.
    if spec
        .images
        .iter()
        .any(|req| staged.refiner_switch_step(req).is_some())
    {
        let text = match staged.load_refiner_text_encoder() {
            Ok(t) => t,
            Err(e) => return refiner_failed(e),
        };
        for (req, prompt) in spec.images.iter().zip(&mut prompts) {
            if cancelled() {
                return Outcome::Cancelled;
            }
            if let Err(e) = text.encode_into(req, prompt) {
                return refiner_failed(e);
            }
        }
    }

    // Stage 2: the UNet, with the LoRAs' UNet layers; every picture's latents.
    let mut unet = match staged.load_unet_with(&mut loras) {
        Ok(u) => u,
        Err(e) => return failed(e),
    };
    match loras.finish() {
        Ok(w) => notes.extend(w.iter().map(ToString::to_string)),
        Err(e) => return failed(e),
    }
    if !notes.is_empty() {
        for n in &notes {
            tracing::warn!(job = %job.id, "{n}");
        }
        job.info.send_modify(|i| i.notes.extend(notes));
    }
    let batch = spec.images.len();
    let started = Instant::now();
    // Progress of picture `index`, for the base's steps and the refiner's alike. (The switch
    // steps are read first: the stages change `staged`'s memory options in between.)
    let switch_steps: Vec<Option<usize>> = spec
        .images
        .iter()
        .map(|req| staged.refiner_switch_step(req))
        .collect();
    let observer = |index: usize| JobObserver {
        shared,
        job,
        index,
        batch,
        started,
        base_steps: switch_steps[index],
        timing: StepTiming::default(),
    };
    // Per picture: what it was recovered from, for its parameters text.
    let mut recovered: Vec<Vec<String>> = vec![Vec::new(); batch];
    let mut tried: Vec<&'static str> = Vec::new();
    let mut sampled = Vec::with_capacity(batch);
    for (index, (req, prompt)) in spec.images.iter().zip(&prompts).enumerate() {
        if cancelled() {
            return Outcome::Cancelled;
        }
        start_image(job, index);
        loop {
            let result = match faults.and_then(|f| f.fail(FaultPoint::Sampling, &memory)) {
                Some(e) => Err(e),
                None => unet.sample(req, prompt, &mut observer(index)),
            };
            match result {
                Ok(s) => sampled.push((index, s)),
                // Skipped by the user (A1111 "Skip"): go on with the next image.
                Err(EngineError::Cancelled) if job.skip.load(Ordering::SeqCst) => {}
                Err(EngineError::Cancelled) => return Outcome::Cancelled,
                // As in `run_job`, with the strategies that help a model alone; the picture
                // starts again.
                Err(e) if is_oom(&e) => match escalate_alone(&mut memory, FaultPoint::Sampling) {
                    Some(step) => {
                        tried.push(step);
                        note(shared, job, &mut recovered[index], step, "drawing");
                        unet.set_memory_options(&memory);
                        continue;
                    }
                    None => return Outcome::Failed(out_of_memory_after(&tried)),
                },
                Err(e) => return failed(e),
            }
            break;
        }
    }
    drop(unet);
    // The refiner and the VAE load with what sampling needed.
    staged.set_memory_options(memory);

    // Stage 2b: the refiner's UNet finishes what the base left at the switch point.
    let sampled = if sampled.iter().any(|(_, s)| s.needs_refiner()) {
        set_stage(shared, job, Stage::LoadingModel);
        let mut refiner = match staged.load_refiner() {
            Ok(r) => r,
            Err(e) => return refiner_failed(e),
        };
        let mut refined = Vec::with_capacity(sampled.len());
        for (index, mut s) in sampled {
            if cancelled() {
                return Outcome::Cancelled;
            }
            let req = &spec.images[index];
            if s.needs_refiner() {
                start_image(job, index);
                let mut skipped = false;
                loop {
                    let result = match faults.and_then(|f| f.fail(FaultPoint::Sampling, &memory)) {
                        Some(e) => Err(e),
                        None => refiner.refine(req, &prompts[index], &mut s, &mut observer(index)),
                    };
                    match result {
                        Ok(()) => {}
                        Err(EngineError::Cancelled) if job.skip.load(Ordering::SeqCst) => {
                            skipped = true;
                        }
                        Err(EngineError::Cancelled) => return Outcome::Cancelled,
                        // The run keeps the steps done; the refiner goes on from there.
                        Err(e) if is_oom(&e) => {
                            match escalate_alone(&mut memory, FaultPoint::Sampling) {
                                Some(step) => {
                                    tried.push(step);
                                    note(shared, job, &mut recovered[index], step, "refining");
                                    refiner.set_memory_options(&memory);
                                    continue;
                                }
                                None => return Outcome::Failed(out_of_memory_after(&tried)),
                            }
                        }
                        Err(e) => return refiner_failed(e),
                    }
                    break;
                }
                if skipped {
                    continue;
                }
            }
            refined.push((index, s));
        }
        refined
    } else {
        sampled
    };
    staged.set_memory_options(memory);

    // Stage 3: the VAE; each picture saved as soon as it is decoded.
    let mut vae = None;
    for (index, latents) in sampled {
        if cancelled() {
            return Outcome::Cancelled;
        }
        let latents = match latents.into_latents() {
            Ok(l) => l,
            Err(e) => return failed(e),
        };
        let req = &spec.images[index];
        job.info.send_modify(|i| i.image = index);
        let mut recovered = std::mem::take(&mut recovered[index]);
        let image = loop {
            set_stage(shared, job, Stage::Decoding);
            let loaded = match &vae {
                Some(v) => v,
                None => match staged.load_vae() {
                    Ok(v) => &*vae.insert(v),
                    Err(e) => return failed(e),
                },
            };
            let broken = faults.is_some_and(|f| f.corrupt_output(&memory));
            let result = match faults.and_then(|f| f.fail(FaultPoint::Decoding, &memory)) {
                Some(e) => Err(e),
                None => loaded.decode_pixels(&latents),
            };
            match result {
                Ok(img) if !memory.vae_f32 && (broken || is_broken_image(&img)) => {
                    // As in `run_job`: an fp16 VAE that overflowed decodes again in fp32.
                    memory.vae_f32 = true;
                    recovered.push("black image: VAE in fp32".into());
                    push_note(job, BLACK_IMAGE_NOTE);
                    vae = None;
                    staged.set_memory_options(memory);
                }
                Ok(img) => break img,
                Err(e) if is_oom(&e) => match escalate_alone(&mut memory, FaultPoint::Decoding) {
                    Some(step) => {
                        tried.push(step);
                        note(
                            shared,
                            job,
                            &mut recovered,
                            step,
                            "turning the picture into pixels",
                        );
                        // Loaded again where and how the strategies say.
                        vae = None;
                        staged.set_memory_options(memory);
                    }
                    None => return Outcome::Failed(out_of_memory_after(&tried)),
                },
                Err(e) => return failed(e),
            }
        };
        if let Err(outcome) = save_picture(
            shared,
            job,
            req,
            &image,
            ti[index].clone(),
            vae_file,
            &memory,
            &recovered,
        ) {
            return outcome;
        }
    }
    Outcome::Done
}

/// Saves one decoded picture (`image`, pixels in [-1, 1]) to the gallery with its parameters
/// text: the request, the hashes Civitai reads (`ti`: "TI hashes"), the VAE file, the refiner,
/// the memory strategies that may change pixels and what was recovered from. On failure, the
/// job's end.
#[allow(clippy::too_many_arguments)] // One call per pipeline kind; a struct would only rename them.
fn save_picture(
    shared: &Shared,
    job: &Job,
    req: &GenerateRequest,
    image: &Tensor,
    ti: Option<String>,
    vae: &crate::vae::VaeUse,
    memory: &MemoryOptions,
    recovered: &[String],
) -> Result<(), Outcome> {
    let model = &job.spec.model;
    let pixels = ld_engine::pipeline::to_rgb8(image)
        .map_err(|e| Outcome::Failed(explain(&e, &model.name)))?;
    set_stage(shared, job, Stage::Saving);
    let mut infotext = infotext_for(req, &model.name);
    add_hashes(shared, job, ti, &mut infotext);
    if let (Some(path), Some(name)) = (&vae.path, vae.name()) {
        // A1111 writes "VAE hash" (AutoV2) and "VAE" (the file name) when a VAE file was used.
        if let Ok(h) = shared.hashes.sha256(path) {
            infotext
                .extra
                .push(("VAE hash".into(), crate::hashes::autov2(&h)));
        }
        infotext.extra.push(("VAE".into(), name));
    }
    if ld_engine::bf16_gemm::active() && shared.config.load.device.is_cpu() {
        // Recorded because bf16 products change the picture a little.
        infotext.extra.push(("CPU precision".into(), "bf16".into()));
    }
    if let Some(r) = &job.spec.refiner {
        infotext.extra.push(("Refiner".into(), r.name.clone()));
        infotext
            .extra
            .push(("Refiner switch at".into(), r.switch_at.to_string()));
    }
    // Recorded so a picture can be told apart (and reproduced) when a strategy changed it:
    // tiled decoding is close to, not identical with, the plain decode.
    let used: Vec<&str> = memory
        .describe()
        .into_iter()
        .filter(|d| *d != "VAE in fp32")
        .collect();
    if !used.is_empty() {
        infotext.extra.push(("Low VRAM".into(), used.join(" + ")));
    }
    if memory.vae_f32 {
        infotext.extra.push(("VAE precision".into(), "fp32".into()));
    }
    if !recovered.is_empty() {
        infotext
            .extra
            .push(("Recovered".into(), recovered.join(" + ")));
    }
    let (width, height) = req.output_size();
    let new = NewImage {
        rgb: pixels,
        width: width as u32,
        height: height as u32,
        infotext,
    };
    match shared.gallery.save(new) {
        Ok(record) => {
            job.info.send_modify(|i| i.images.push(record));
            Ok(())
        }
        Err(e) => Err(Outcome::Failed(JobError {
            code: "internal",
            message: format!("The picture could not be saved: {e}"),
            hint: "Check that the disk is not full and the data folder is writable.".into(),
        })),
    }
}

/// The sizes the memory estimate of `model` works from; `None` when unknown.
fn model_shape(model: &crate::models::ModelInfo) -> Option<ModelShape> {
    if model.path.is_file() {
        // A single-file checkpoint: the published sizes of its family (checkpoints of a family
        // share the architecture; only their weights differ).
        match model.family {
            crate::models::Family::Sd1 => Some(ModelShape::SD1),
            crate::models::Family::Sd2 => Some(ModelShape::SD2),
            crate::models::Family::Sdxl => Some(ModelShape::SDXL),
            crate::models::Family::Unknown => None,
        }
    } else {
        // Unreadable here means the load will fail with its own, better message.
        ModelShape::from_folder(&model.path).ok()
    }
}

/// The strategies a job starts with: the policy's, then (in "Auto" with a known budget) more of
/// the recovery chain until the estimate fits. Fails when even every strategy is not enough.
/// `extra`: weights the model's estimate leaves out (a whole pipeline's refiner), which no
/// strategy moves.
fn plan_memory(
    job: &Job,
    policy: &MemoryPolicy,
    dtype: DType,
    loaded: bool,
    extra: u64,
) -> Result<MemoryOptions, JobError> {
    use crate::settings::LowVram;
    let mut memory = match policy.low_vram {
        LowVram::On => policy.low_options,
        _ => MemoryOptions::default(),
    };
    let free = match (&policy.free, policy.low_vram) {
        (Some(f), LowVram::Auto | LowVram::On) => f(),
        _ => None,
    };
    let Some(free) = free else {
        return Ok(memory);
    };
    let Some(shape) = model_shape(&job.spec.model) else {
        return Ok(memory);
    };
    // Planned only against a GPU's free memory (`policy.free` is `None` on the CPU).
    let target = gpu_target(policy, dtype);
    let need = |m: &MemoryOptions| job_need(&job.spec, &shape, dtype, target, m, loaded) + extra;
    let first = need(&memory);
    let mut turned_on = Vec::new();
    while need(&memory) > free {
        match escalate(&mut memory, FaultPoint::Sampling)
            .or_else(|| escalate(&mut memory, FaultPoint::Decoding))
        {
            Some(step) => turned_on.push(step),
            None => {
                return Err(JobError {
                    code: "out_of_memory",
                    message: format!(
                        "This picture needs about {} of memory even with every memory saving on, but only {} is free.",
                        gib(need(&memory)),
                        gib(free)
                    ),
                    hint: "Choose a smaller size or a smaller model (SD 1.5), or close other programs that use the graphics card.".into(),
                })
            }
        }
    }
    if !turned_on.is_empty() {
        push_note(
            job,
            &format!(
                "Turned on {} before starting: the picture needs about {} and {} is free.",
                turned_on.join(", "),
                gib(first),
                gib(free)
            ),
        );
    }
    Ok(memory)
}

/// The strategies a staged job on the CPU starts with: where its largest stage would not fit in
/// the available memory, the ones that shrink a model's working memory there (tiled VAE, then
/// the guidance pair one at a time), as far as needed. A 2048x2048 SD 1.5 picture's decode needs
/// about 20 GB untiled and 1.3 GB tiled. Running out of memory on the CPU is not an error a job
/// can recover from, so this is planned, not left to the recovery chain; a job is refused only
/// where even all of these would not fit in the available memory and swap ([`cpu_fits`]).
fn plan_cpu_stages(
    shared: &Shared,
    job: &Job,
    policy: &MemoryPolicy,
    dtype: DType,
    mut memory: MemoryOptions,
) -> Result<MemoryOptions, JobError> {
    let (Some(free), Some(shape)) = (
        policy.ram_free.as_ref().and_then(|f| f()),
        model_shape(&job.spec.model),
    ) else {
        return Ok(memory);
    };
    let half = unet_kept_half(shared, job, dtype);
    let (width, height, guided) = planned_picture(&job.spec, &shape);
    let need = |m: &MemoryOptions| {
        ld_engine::memory::estimate_staged(
            &shape,
            width,
            height,
            guided,
            dtype,
            Target::Cpu,
            m,
            half,
        )
        .peak
    };
    let first = need(&memory);
    let mut turned_on = Vec::new();
    for step in CHAIN.iter().filter(|s| s.on_cpu) {
        if need(&memory) <= free {
            break;
        }
        if !(step.is_on)(&memory) {
            (step.turn_on)(&mut memory);
            turned_on.push(step.name);
        }
    }
    cpu_fits(policy, need(&memory), free, true)?;
    if !turned_on.is_empty() {
        push_note(
            job,
            &format!(
                "Turned on {} before starting: the largest model with its work needs about {} and {} of memory is free.",
                turned_on.join(", "),
                gib(first),
                gib(free)
            ),
        );
    }
    Ok(memory)
}

fn gib(b: u64) -> String {
    format!("{:.1} GB", b as f64 / (1u64 << 30) as f64)
}

/// One strategy of the recovery chain.
struct Step {
    name: &'static str,
    is_on: fn(&MemoryOptions) -> bool,
    turn_on: fn(&mut MemoryOptions),
    /// Whether it helps sampling / decoding in a whole pipeline.
    sampling: bool,
    decoding: bool,
    /// The same where each model is alone in memory (a staged run): moving the other models
    /// off the GPU frees nothing there.
    alone: (bool, bool),
    /// Whether it shrinks a model's working memory on the CPU ([`plan_cpu_stages`]): moving
    /// models to the CPU does nothing there, and the CPU's fused attention holds no score
    /// matrix for slicing to shrink.
    on_cpu: bool,
}

/// The recovery chain, cheapest first, as the issue orders it.
const CHAIN: [Step; 5] = [
    Step {
        name: "tiled VAE",
        is_on: |m| m.vae_tiling,
        turn_on: |m| m.vae_tiling = true,
        sampling: false,
        decoding: true,
        alone: (false, true),
        on_cpu: true,
    },
    Step {
        name: "sliced attention",
        is_on: |m| m.attention_slice.is_some(),
        turn_on: |m| m.attention_slice = Some(MemoryOptions::SLICED_SCORES),
        sampling: true,
        decoding: true,
        alone: (true, true),
        on_cpu: false,
    },
    // Frees the VAE's weights from the GPU, so it helps sampling too; alone, it moves the
    // decode itself to the CPU.
    Step {
        name: "VAE on CPU",
        is_on: |m| m.vae_on_cpu,
        turn_on: |m| m.vae_on_cpu = true,
        sampling: true,
        decoding: true,
        alone: (false, true),
        on_cpu: false,
    },
    // The same for the text encoder(s), which run once per picture, so it costs a second or two.
    Step {
        name: "text encoder on CPU",
        is_on: |m| m.text_encoder_on_cpu,
        turn_on: |m| m.text_encoder_on_cpu = true,
        sampling: true,
        decoding: true,
        alone: (false, false),
        on_cpu: false,
    },
    // The guidance pair one sample at a time: our "smaller batch" (jobs already draw their
    // images one by one).
    Step {
        name: "smaller batch",
        is_on: |m| m.split_batch,
        turn_on: |m| m.split_batch = true,
        sampling: true,
        decoding: false,
        alone: (true, false),
        on_cpu: true,
    },
];

/// Turns on the next strategy of the chain that helps `at`; `None` when all are on.
fn escalate(memory: &mut MemoryOptions, at: FaultPoint) -> Option<&'static str> {
    escalate_where(memory, at, false)
}

/// [`escalate`] for a staged run, where only the running model is in memory.
fn escalate_alone(memory: &mut MemoryOptions, at: FaultPoint) -> Option<&'static str> {
    escalate_where(memory, at, true)
}

fn escalate_where(memory: &mut MemoryOptions, at: FaultPoint, alone: bool) -> Option<&'static str> {
    let step = CHAIN.iter().find(|step| {
        let (sampling, decoding) = if alone {
            step.alone
        } else {
            (step.sampling, step.decoding)
        };
        !(step.is_on)(memory)
            && match at {
                FaultPoint::Sampling => sampling,
                FaultPoint::Decoding => decoding,
            }
    })?;
    (step.turn_on)(memory);
    Some(step.name)
}

fn note(_shared: &Shared, job: &Job, recovered: &mut Vec<String>, step: &str, stage: &str) {
    tracing::warn!(job = %job.id, step, "out of memory while {stage}; retrying");
    recovered.push(format!("out of memory: {step}"));
    push_note(
        job,
        &format!("Ran out of memory while {stage}; retried with {step}."),
    );
}

/// The note of a job Low-VRAM mode On draws one model at a time.
fn staged_note(sdxl: bool, refiner: bool) -> String {
    format!(
        "Low graphics-memory mode: {} were loaded one at a time, which needs about half the memory and adds a few seconds of loading.",
        staged_models(sdxl, refiner)
    )
}

/// The models a staged job loads one after the other, as the notes name them (SDXL has two
/// text encoders).
fn staged_models(sdxl: bool, refiner: bool) -> &'static str {
    match (sdxl, refiner) {
        (_, true) => "the text encoders, the drawing model, the refiner and the VAE",
        (true, false) => "the text encoders, the drawing model and the VAE",
        (false, false) => "the text encoder, the drawing model and the VAE",
    }
}

const BLACK_IMAGE_NOTE: &str = "The picture came out black (the VAE overflowed in half precision), so it was decoded again in full precision (fp32).";

/// Marks image `index` of the batch as being sampled; a skip was meant for the one before.
fn start_image(job: &Job, index: usize) {
    job.skip.store(false, Ordering::SeqCst);
    job.info.send_modify(|i| {
        i.image = index;
        i.step = 0;
        i.stage = Stage::Sampling;
    });
}

fn push_note(job: &Job, text: &str) {
    job.info.send_modify(|i| i.notes.push(text.to_owned()));
}

/// Drops what the job holds besides the model: the preview picture. (The failed attempt's
/// tensors were freed when its error returned; the latents wait in host memory.)
fn free_held(job: &Job) {
    *job.preview.lock().unwrap_or_else(|p| p.into_inner()) = None;
}

fn out_of_memory_after(tried: &[&str]) -> JobError {
    JobError {
        code: "out_of_memory",
        message: if tried.is_empty() {
            "There was not enough memory to draw this picture.".into()
        } else {
            format!(
                "There was not enough memory to draw this picture, even after retrying with {}.",
                tried.join(", ")
            )
        },
        hint: "Choose a smaller size or a smaller model (SD 1.5), or close other programs that use the graphics card.".into(),
    }
}

fn is_oom(e: &EngineError) -> bool {
    matches!(e, EngineError::Candle(inner) if is_out_of_memory(&inner.to_string()))
}

/// NaN/inf anywhere, or every pixel black: what an overflowing fp16 VAE gives.
fn is_broken_image(img: &Tensor) -> bool {
    let stats = || -> candle_core::Result<(f32, f32)> {
        let flat = img.flatten_all()?.to_dtype(DType::F32)?;
        let sum: f32 = flat.sum_all()?.to_scalar()?;
        let max: f32 = flat.max(0)?.to_scalar()?;
        Ok((sum, max))
    };
    match stats() {
        // -1 is black; a picture whose brightest pixel rounds to 0 of 255 is all black.
        Ok((sum, max)) => !sum.is_finite() || max <= -0.996,
        Err(_) => false,
    }
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
        steps: i.total_steps,
        progress: i.progress,
        eta_ms: i.eta_ms,
    });
}

/// Loads the job's model with its LoRAs merged and the embeddings its prompt may use. LoRA and
/// embedding problems that do not stop the picture (a layer the LoRA names that the model lacks,
/// an embedding of another model family) become notes on the job.
fn load_pipeline(
    shared: &Shared,
    job: &Job,
    vae: &crate::vae::VaeUse,
) -> ld_engine::Result<Pipeline> {
    let spec = &job.spec;
    let load = &shared.config.load;
    // A folder or a single file (SD1, SD2 or SDXL, original LDM names); LoRAs merge into either,
    // with the VAE file the settings (or the file beside it) give.
    let source = ld_engine::single_file::ModelSource {
        path: spec.model.path.clone(),
        config: None,
        vae: vae.path.clone(),
    };
    let mut pipeline = Pipeline::load_source_with_loras(&source, load, &spec.loras)?;
    if let Some(r) = &spec.refiner {
        // A refiner folder or a single-file refiner checkpoint.
        pipeline.load_refiner(&r.path, load)?;
    }
    let mut notes: Vec<String> = pipeline
        .lora_warnings()
        .iter()
        .map(|w| w.to_string())
        .collect();
    // All folders at once: setting them one by one would keep only the last one's.
    let dirs: Vec<&std::path::Path> = spec.embedding_dirs.iter().map(PathBuf::as_path).collect();
    notes.extend(
        pipeline
            .load_embeddings_dirs(&dirs)?
            .iter()
            .map(|w| w.to_string()),
    );
    if !notes.is_empty() {
        for n in &notes {
            tracing::warn!(job = %job.id, "{n}");
        }
        job.info.send_modify(|i| i.notes.extend(notes));
    }
    Ok(pipeline)
}

/// A1111's hashes in the infotext, so Civitai links the picture to its model, LoRAs and
/// embeddings: "Model hash" (AutoV2) for single-file checkpoints, "Lora hashes", "TI hashes".
fn add_hashes(shared: &Shared, job: &Job, ti: Option<String>, infotext: &mut Infotext) {
    let hashes = &shared.hashes;
    if job.spec.model.path.is_file() {
        if let Ok(h) = hashes.sha256(&job.spec.model.path) {
            infotext.model_hash = Some(crate::hashes::autov2(&h));
        }
    }
    let loras: Vec<String> = job
        .spec
        .loras
        .iter()
        .filter_map(|l| {
            let h = hashes.addnet(&l.path).ok()?;
            Some(format!(
                "{}: {}",
                file_stem(&l.path),
                crate::hashes::short(&h)
            ))
        })
        .collect();
    if !loras.is_empty() {
        infotext
            .extra
            .push(("Lora hashes".into(), loras.join(", ")));
    }
    if let Some(tis) = ti {
        infotext.extra.push(("TI hashes".into(), tis));
    }
}

fn file_stem(p: &std::path::Path) -> String {
    p.file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default()
}

/// The infotext's "TI hashes" for `prompt`: the embeddings it uses (by `plan`, the loaded text
/// encoder's prompt reading) among `embeddings`, with their short hashes; `None` when it uses
/// none.
fn ti_hashes(
    shared: &Shared,
    embeddings: &[ld_engine::textual_inversion::Embedding],
    prompt: &str,
    plan: impl FnOnce(&str) -> ld_engine::Result<ld_engine::clip::PromptPlan>,
) -> Option<String> {
    let used = plan(prompt).map(|p| p.embeddings).unwrap_or_default();
    let tis: Vec<String> = embeddings
        .iter()
        .filter(|e| used.iter().any(|u| u.eq_ignore_ascii_case(e.name())))
        .filter_map(|e| {
            let h = shared.hashes.sha256(e.path()).ok()?;
            Some(format!("{}: {}", e.name(), crate::hashes::short(&h)))
        })
        .collect();
    (!tis.is_empty()).then(|| tis.join(", "))
}

/// The A1111 parameters text saved in the PNG.
pub fn infotext_for(req: &GenerateRequest, model: &str) -> Infotext {
    // A1111's default noise is the GPU's; it marks other sources ("RNG: CPU", "RNG: NV"), so an
    // A1111 user pasting our parameters gets our noise.
    let rng = match req.seed_source {
        SeedSource::Nv => "NV",
        _ => "CPU",
    };
    let mut extra = vec![("RNG".to_owned(), rng.to_owned())];
    if let Some(fix) = &req.hires {
        // A1111's keys: "Size" stays the first pass's; the upscale is a factor when the final
        // size is one, else "Hires resize".
        extra.push((
            "Denoising strength".to_owned(),
            crate::infotext::format_number(fix.denoise),
        ));
        match fix.scale {
            Some(scale) => extra.push((
                "Hires upscale".to_owned(),
                crate::infotext::format_number(scale),
            )),
            None => extra.push((
                "Hires resize".to_owned(),
                format!("{}x{}", fix.width, fix.height),
            )),
        }
        extra.push(("Hires steps".to_owned(), fix.steps.to_string()));
        extra.push(("Hires upscaler".to_owned(), fix.upscaler.name().to_owned()));
    }
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
    /// A staged run with a refiner: the base model's steps per picture. The base model samples
    /// every picture of the batch before the refiner finishes any, so the job's progress counts
    /// all base steps first (`None`: each picture's steps in a row).
    base_steps: Option<usize>,
    timing: StepTiming,
}

/// When the last step ended, and the time and steps measured between steps since.
#[derive(Default)]
struct StepTiming {
    last: Option<Instant>,
    total: std::time::Duration,
    steps: u32,
}

impl StepTiming {
    /// Marks a step's end; the mean milliseconds per step so far, once there is one.
    fn step(&mut self) -> Option<u64> {
        let now = Instant::now();
        if let Some(last) = self.last.replace(now) {
            self.total += now - last;
            self.steps += 1;
        }
        (self.steps > 0).then(|| (self.total.as_millis() / u128::from(self.steps)) as u64)
    }
}

impl JobObserver<'_> {
    /// Steps of the whole job done once this picture is at `step` of `total`.
    fn job_steps_done(&self, step: usize, total: usize) -> usize {
        match self.base_steps {
            Some(base) if step <= base => self.index * base + step,
            Some(base) => self.batch * base + self.index * (total - base) + (step - base),
            None => self.index * total + step,
        }
    }
}

impl Observer for JobObserver<'_> {
    fn on_progress(&mut self, p: &Progress<'_>) -> Control {
        let total_steps = (p.total * self.batch).max(1);
        let done = self.job_steps_done(p.step, p.total);
        let elapsed = self.started.elapsed();
        let eta_ms = (done > 0)
            .then(|| (elapsed.as_millis() as u64 * (total_steps - done) as u64) / done as u64);
        let progress = done as f64 / total_steps as f64;
        let step_ms = self.timing.step();
        self.job.info.send_modify(|i| {
            i.step = p.step;
            i.total_steps = p.total;
            i.step_ms = step_ms.or(i.step_ms);
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

/// [`explain`] for a failure to load `model` with `vae`: when a VAE file chosen in Settings is
/// in use and the failure is about a VAE (a file of another architecture, tensors of other
/// shapes), it says which file and to choose another, not to reinstall the model.
fn explain_load(e: &EngineError, model: &str, vae: &crate::vae::VaeUse) -> JobError {
    let general = explain(e, model);
    let (Some(path), Some(name), true) = (&vae.path, vae.name(), vae.chosen) else {
        return general;
    };
    let text = e.to_string();
    let about_vae = match e {
        EngineError::Weights { path: p, .. }
        | EngineError::MissingFile { path: p }
        | EngineError::Io { path: p, .. } => p == path,
        EngineError::Candle(_) => text.contains(&*path.to_string_lossy()),
        _ => false,
    };
    if !about_vae || general.code == "out_of_memory" {
        return general;
    }
    JobError {
        code: "model_broken",
        message: format!(
            "The VAE '{name}' chosen in Settings does not fit the model '{model}': {text}."
        ),
        hint: "Choose a VAE made for this kind of model in Settings (SD VAE), or set it to \
               \"Automatic\"."
            .into(),
    }
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
            hint: "Choose a smaller size or fewer images at once, or set \"Low graphics-memory \
                   mode\" to On in Settings."
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::settings::LowVram;
    use std::collections::HashMap;
    use std::sync::atomic::AtomicUsize;

    fn tiny_model() -> crate::models::ModelInfo {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../models/tiny/sd1");
        crate::models::scan(&dir, &[]).remove(0)
    }

    fn service(dir: &tempfile::TempDir) -> JobService {
        let (gallery, _) = Gallery::open(&dir.path().join("g"), &dir.path().join("g.db")).unwrap();
        JobService::new(Arc::new(gallery), ServiceConfig::default())
    }

    fn run(svc: &JobService) -> JobInfo {
        run_with(svc, tiny_model(), Vec::new())
    }

    fn run_with(
        svc: &JobService,
        model: crate::models::ModelInfo,
        loras: Vec<LoraSpec>,
    ) -> JobInfo {
        run_refined(svc, model, loras, None)
    }

    fn run_refined(
        svc: &JobService,
        model: crate::models::ModelInfo,
        loras: Vec<LoraSpec>,
        refiner: Option<crate::compose::Refiner>,
    ) -> JobInfo {
        let spec = ComposedJob {
            model,
            loras,
            embedding_dirs: Vec::new(),
            refiner,
            images: vec![GenerateRequest {
                prompt: "a red fox".into(),
                steps: 2,
                width: 64,
                height: 64,
                ..Default::default()
            }],
            preset: None,
            vae: Default::default(),
        };
        finished(svc, svc.submit(spec).unwrap().id)
    }

    /// Job `id` once it has finished (within a minute).
    fn finished(svc: &JobService, id: String) -> JobInfo {
        for _ in 0..1200 {
            let info = svc.get(&id).unwrap();
            if info.state.is_finished() {
                return info;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("job did not finish");
    }

    fn oom() -> EngineError {
        // The text candle's CUDA backend gives (cudarc's DriverError).
        EngineError::Candle(candle_core::Error::Msg(
            "DriverError(CUDA_ERROR_OUT_OF_MEMORY, \"out of memory\")".into(),
        ))
    }

    /// Out of memory while sampling until the guidance batch is split, and while decoding until
    /// the VAE is tiled; counts the calls.
    struct Tight(AtomicUsize);
    impl FaultInjector for Tight {
        fn fail(&self, point: FaultPoint, m: &MemoryOptions) -> Option<EngineError> {
            self.0.fetch_add(1, Ordering::SeqCst);
            let short = match point {
                FaultPoint::Sampling => !m.split_batch,
                FaultPoint::Decoding => !m.vae_tiling,
            };
            short.then(oom)
        }
    }

    #[test]
    fn staged_notes_name_sdxls_two_text_encoders() {
        assert!(staged_note(false, false).contains("the text encoder, the drawing model"));
        assert!(staged_note(true, false).contains("the text encoders, the drawing model and"));
        assert!(staged_note(false, true).contains("the refiner and the VAE"));
    }

    #[test]
    fn out_of_memory_walks_the_chain_and_says_what_changed() {
        let dir = tempfile::tempdir().unwrap();
        let svc = service(&dir);
        let tight = Arc::new(Tight(AtomicUsize::new(0)));
        svc.set_fault_injector(Some(tight.clone()));
        let info = run(&svc);
        assert_eq!(info.state, JobState::Done, "{:?}", info.error);
        // Sampling: sliced attention, VAE on CPU, text encoder on CPU, smaller batch (tiled VAE
        // does not help it); decoding: tiled VAE. 5 sampling calls + 2 decoding calls.
        assert_eq!(
            info.notes,
            [
                "Ran out of memory while drawing; retried with sliced attention.",
                "Ran out of memory while drawing; retried with VAE on CPU.",
                "Ran out of memory while drawing; retried with text encoder on CPU.",
                "Ran out of memory while drawing; retried with smaller batch.",
                "Ran out of memory while turning the picture into pixels; retried with tiled VAE.",
            ]
        );
        assert_eq!(tight.0.load(Ordering::SeqCst), 7);
        let params = &info.images[0].parameters;
        assert!(
            params.contains("Low VRAM: tiled VAE + sliced attention + VAE on CPU + batch split + text encoder on CPU"),
            "{params}"
        );
        assert!(
            params.contains("Recovered: \"out of memory: sliced attention + out of memory: VAE on CPU + out of memory: text encoder on CPU + out of memory: smaller batch + out of memory: tiled VAE\""),
            "{params}"
        );
    }

    #[test]
    fn files_changed_on_disk_are_read_again_by_the_next_job() {
        // Found by review: the loaded pipeline was kept while its files changed on disk, so an
        // embedding dropped into its folder was ignored until the app restarted.
        let dir = tempfile::tempdir().unwrap();
        let refs =
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/refs");
        let emb = dir.path().join("embeddings");
        std::fs::create_dir_all(&emb).unwrap();
        let svc = service(&dir);
        let job = || ComposedJob {
            model: tiny_model(),
            loras: Vec::new(),
            embedding_dirs: vec![emb.clone()],
            refiner: None,
            images: vec![GenerateRequest {
                prompt: "a red fox, tinyemb".into(),
                steps: 1,
                width: 64,
                height: 64,
                seed: 1,
                ..Default::default()
            }],
            preset: None,
            vae: Default::default(),
        };
        let before = finished(&svc, svc.submit(job()).unwrap().id);
        let stamp = files_stamp(&job());
        assert_eq!(files_stamp(&job()), stamp, "the same files, the same stamp");
        std::fs::copy(
            refs.join("tinyemb.safetensors"),
            emb.join("tinyemb.safetensors"),
        )
        .unwrap();
        assert_ne!(files_stamp(&job()), stamp);
        let after = finished(&svc, svc.submit(job()).unwrap().id);
        for info in [&before, &after] {
            assert_eq!(info.state, JobState::Done, "{:?}", info.error);
        }
        assert!(!before.images[0].parameters.contains("TI hashes"));
        let params = &after.images[0].parameters;
        assert!(params.contains("TI hashes: \"tinyemb: "), "{params}");
        // A model file rewritten in place counts too (size and time).
        let model = tempfile::tempdir().unwrap();
        let weights = model
            .path()
            .join("unet/diffusion_pytorch_model.safetensors");
        std::fs::create_dir_all(weights.parent().unwrap()).unwrap();
        std::fs::write(&weights, b"one").unwrap();
        let spec = || ComposedJob {
            model: crate::models::ModelInfo {
                path: model.path().to_path_buf(),
                ..tiny_model()
            },
            ..job()
        };
        let stamp = files_stamp(&spec());
        std::fs::write(&weights, b"other").unwrap();
        assert_ne!(files_stamp(&spec()), stamp);
    }

    #[test]
    fn staged_runs_recover_from_running_out_of_memory_with_what_helps_a_model_alone() {
        // Issue 12: refiner jobs now stage on a GPU, where memory can run out. A staged run
        // walks the recovery chain too, but only with what helps the one model in memory:
        // moving the text encoder off the GPU frees nothing there, nor does moving the VAE while
        // the UNet samples.
        let dir = tempfile::tempdir().unwrap();
        let svc = service(&dir);
        svc.set_memory_policy(MemoryPolicy {
            low_vram: LowVram::On,
            low_options: MemoryOptions::default(),
            ..Default::default()
        });
        let tight = Arc::new(Tight(AtomicUsize::new(0)));
        svc.set_fault_injector(Some(tight.clone()));
        let info = run(&svc);
        assert_eq!(info.state, JobState::Done, "{:?}", info.error);
        assert!(info.notes[0].contains("one at a time"), "{:?}", info.notes);
        assert_eq!(
            info.notes[1..],
            [
                "Ran out of memory while drawing; retried with sliced attention.",
                "Ran out of memory while drawing; retried with smaller batch.",
                "Ran out of memory while turning the picture into pixels; retried with tiled VAE.",
            ]
        );
        // 3 sampling calls (2 short), 2 decoding calls (1 short).
        assert_eq!(tight.0.load(Ordering::SeqCst), 5);
        let params = &info.images[0].parameters;
        assert!(
            params.contains("Recovered: \"out of memory: sliced attention + out of memory: smaller batch + out of memory: tiled VAE\""),
            "{params}"
        );
        // With nothing left to try, the failure names what was tried.
        svc.set_fault_injector(Some(Arc::new(Always)));
        let info = run(&svc);
        assert_eq!(info.state, JobState::Failed);
        let e = info.error.unwrap();
        assert_eq!(e.code, "out_of_memory");
        assert_eq!(
            e.message,
            "There was not enough memory to draw this picture, even after retrying with sliced attention, smaller batch."
        );
    }

    /// Out of memory from the `from`-th sampling call on (1-based) until attention is sliced.
    struct ShortFrom {
        from: usize,
        calls: AtomicUsize,
    }
    impl FaultInjector for ShortFrom {
        fn fail(&self, point: FaultPoint, m: &MemoryOptions) -> Option<EngineError> {
            if point != FaultPoint::Sampling {
                return None;
            }
            let call = self.calls.fetch_add(1, Ordering::SeqCst) + 1;
            (call >= self.from && m.attention_slice.is_none()).then(oom)
        }
    }

    #[test]
    fn a_staged_refiner_that_runs_out_of_memory_goes_on_with_sliced_attention() {
        // The base samples its steps (call 1); the refiner's first try runs out (call 2) and
        // goes on with sliced attention (call 3), and the picture is saved.
        let tiny = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../models/tiny");
        let dir = tempfile::tempdir().unwrap();
        let svc = service(&dir);
        svc.set_memory_policy(MemoryPolicy {
            low_vram: LowVram::On,
            low_options: MemoryOptions::default(),
            ..Default::default()
        });
        let faults = Arc::new(ShortFrom {
            from: 2,
            calls: AtomicUsize::new(0),
        });
        svc.set_fault_injector(Some(faults.clone()));
        let info = run_refined(
            &svc,
            crate::models::scan(&tiny.join("sdxl"), &[]).remove(0),
            Vec::new(),
            Some(crate::compose::Refiner {
                name: "sdxl-refiner".into(),
                path: tiny.join("sdxl-refiner"),
                switch_at: 0.5,
            }),
        );
        assert_eq!(info.state, JobState::Done, "{:?}", info.error);
        assert_eq!(faults.calls.load(Ordering::SeqCst), 3);
        assert_eq!(
            info.notes[1..],
            ["Ran out of memory while refining; retried with sliced attention."]
        );
        let params = &info.images[0].parameters;
        assert!(params.contains("Refiner: sdxl-refiner"), "{params}");
        assert!(
            params.contains("Recovered: \"out of memory: sliced attention\""),
            "{params}"
        );
    }

    /// tests/fixtures/refs/single_file_recipe.json's SD1 checkpoint (LDM names), rebuilt from
    /// models/tiny/sd1 (ld-engine's tests/single_file.rs checks it is the file diffusers read).
    fn sd1_single_file(dir: &std::path::Path) -> PathBuf {
        use candle_core::{DType, Device};
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
        let recipe: serde_json::Value = serde_json::from_slice(
            &std::fs::read(root.join("tests/fixtures/refs/single_file_recipe.json")).unwrap(),
        )
        .unwrap();
        let comp = |c: &str| {
            let files =
                ld_engine::config::weight_files_in(&root.join("models/tiny/sd1").join(c)).unwrap();
            ld_engine::weights::Weights::open_all(&files).unwrap()
        };
        let comps: HashMap<&str, _> = ["unet", "vae", "text_encoder"]
            .into_iter()
            .map(|c| (c, comp(c)))
            .collect();
        let mut out = HashMap::new();
        for e in recipe["sd1"]["entries"].as_array().unwrap() {
            let src = e[2][0].as_str().unwrap();
            let t = comps[e[1].as_str().unwrap()]
                .load(src, DType::F32, &Device::Cpu)
                .unwrap();
            let t = match e[3].as_str().unwrap() {
                "copy" => t,
                "conv1x1" => {
                    let (o, i) = t.dims2().unwrap();
                    t.reshape((o, i, 1, 1)).unwrap()
                }
                other => panic!("sd1 recipe op {other}"),
            };
            out.insert(e[0].as_str().unwrap().to_string(), t);
        }
        let path = dir.join("tiny-sd1.safetensors");
        candle_core::safetensors::save(&out, &path).unwrap();
        path
    }

    #[test]
    fn the_refiner_is_loaded_and_used() {
        // The job names a refiner; the worker must load it (it did not before), so a broken
        // refiner path fails the job and a real one runs and is in the infotext.
        let tiny = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../models/tiny");
        let base = crate::models::scan(&tiny.join("sdxl"), &[]).remove(0);
        let dir = tempfile::tempdir().unwrap();
        let svc = service(&dir);
        let refiner = |path: PathBuf| crate::compose::Refiner {
            name: "sdxl-refiner".into(),
            path,
            switch_at: 0.5,
        };
        let info = run_refined(
            &svc,
            base.clone(),
            Vec::new(),
            Some(refiner(dir.path().join("missing"))),
        );
        assert_eq!(info.state, JobState::Failed);
        let info = run_refined(
            &svc,
            base,
            Vec::new(),
            Some(refiner(tiny.join("sdxl-refiner"))),
        );
        assert_eq!(info.state, JobState::Done, "{:?}", info.error);
        assert!(info.images[0].parameters.contains("Refiner: sdxl-refiner"));
    }

    #[test]
    fn single_file_models_with_loras_go_to_the_engine() {
        // Single-file models used to refuse LoRAs here; the engine now merges them through the
        // LDM renaming (ld-engine tests/single_file.rs: the same image as the folder with the
        // LoRA, SD1 and SDXL). The service loads single files with the embedded real-size
        // configs, which the tiny file does not fit: the job reaches the engine's single-file
        // loader with its LoRA and fails there, naming the file's own tensor.
        let dir = tempfile::tempdir().unwrap();
        let models = dir.path().join("models");
        std::fs::create_dir_all(&models).unwrap();
        sd1_single_file(&models);
        let model = crate::models::scan(&models, &[]).remove(0);
        assert_eq!(
            (model.format, model.problem.as_deref()),
            ("safetensors", None)
        );
        let lora = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../../tests/fixtures/refs/lora_kohya.safetensors");
        let svc = service(&dir);
        let info = run_with(&svc, model, vec![LoraSpec::new(lora, 0.7)]);
        assert_eq!(info.state, JobState::Failed);
        let message = info.error.unwrap().message;
        assert!(!message.contains("LoRA"), "{message}");
        assert!(
            message.contains("cond_stage_model.transformer.text_model.embeddings"),
            "{message}"
        );
    }

    #[test]
    fn a_checkpoint_without_a_vae_uses_the_one_beside_it() {
        // Found by review: a checkpoint without a VAE inside could not be used in the app at all
        // (only the CLI takes a VAE file). As in A1111, `<name>.vae.safetensors` beside it is its
        // VAE; without one, the list says so.
        let dir = tempfile::tempdir().unwrap();
        let models = dir.path().join("models");
        std::fs::create_dir_all(&models).unwrap();
        let whole = sd1_single_file(&models);
        let tensors = candle_core::safetensors::load(&whole, &candle_core::Device::Cpu).unwrap();
        let (vae, rest): (HashMap<String, Tensor>, HashMap<String, Tensor>) = tensors
            .into_iter()
            .partition(|(k, _)| k.starts_with("first_stage_model."));
        assert!(!vae.is_empty());
        candle_core::safetensors::save(&rest, &whole).unwrap();
        let listed = || crate::models::scan(&models, &[]).remove(0);
        let problem = listed().problem.unwrap();
        assert!(problem.contains(".vae.safetensors"), "{problem}");
        let svc = service(&dir);
        let failed = |svc: &JobService| {
            let info = run_with(svc, listed(), Vec::new());
            assert_eq!(info.state, JobState::Failed);
            info.error.unwrap().message
        };
        let message = failed(&svc);
        assert!(message.contains("tiny-sd1.vae.safetensors"), "{message}");
        // A1111's VAE files carry no `first_stage_model.` prefix.
        let vae: HashMap<String, Tensor> = vae
            .into_iter()
            .map(|(k, t)| (k["first_stage_model.".len()..].to_string(), t))
            .collect();
        candle_core::safetensors::save(&vae, models.join("tiny-sd1.vae.safetensors")).unwrap();
        assert_eq!(listed().problem, None);
        assert_eq!(
            crate::models::scan(&models, &[]).len(),
            1,
            "the VAE file is no model"
        );
        // The VAE is found; the tiny file then fails where every tiny single file does in the
        // service (its real-size configs), past the VAE check.
        let message = failed(&svc);
        assert!(!message.contains("VAE"), "{message}");
        assert!(
            message.contains("cond_stage_model.transformer.text_model.embeddings"),
            "{message}"
        );
    }

    /// The tiny SD1 folder's own VAE, saved as a VAE file in `dir` under `name` with `change`
    /// applied to its tensors.
    fn vae_file(
        dir: &std::path::Path,
        name: &str,
        change: impl FnOnce(&mut HashMap<String, Tensor>),
    ) -> PathBuf {
        let own = tiny_model()
            .path
            .join("vae/diffusion_pytorch_model.safetensors");
        let mut tensors = candle_core::safetensors::load(own, &candle_core::Device::Cpu).unwrap();
        change(&mut tensors);
        std::fs::create_dir_all(dir).unwrap();
        let path = dir.join(name);
        candle_core::safetensors::save(&tensors, &path).unwrap();
        path
    }

    #[test]
    fn the_vae_chosen_in_settings_decodes_the_next_job_and_a_gone_file_falls_back() {
        // A1111's "SD VAE" setting: a VAE file replaces the model's own, for a diffusers folder
        // as for a single file; a switch takes effect on the next job without a restart (the
        // cached pipeline's key changes); a file removed since it was chosen gives the model's
        // own VAE and a note, not a failure.
        let dir = tempfile::tempdir().unwrap();
        let vaes = dir.path().join("vae");
        // A brighter decoder: the same drawing comes out with other pixels.
        vae_file(&vaes, "bright.safetensors", |t| {
            let b = t["decoder.conv_out.bias"].affine(1.0, 0.5).unwrap();
            t.insert("decoder.conv_out.bias".into(), b);
        });
        let files = crate::vae::vae_files(&[(vaes.clone(), 1)]);
        let svc = service(&dir);
        let job = |setting: &str| ComposedJob {
            model: tiny_model(),
            loras: Vec::new(),
            embedding_dirs: Vec::new(),
            refiner: None,
            images: vec![GenerateRequest {
                prompt: "a red fox".into(),
                steps: 1,
                width: 64,
                height: 64,
                seed: 5,
                ..Default::default()
            }],
            preset: None,
            vae: crate::vae::choose(setting, &files),
        };
        let run = |setting: &str| {
            let info = finished(&svc, svc.submit(job(setting)).unwrap().id);
            assert_eq!(info.state, JobState::Done, "{setting}: {:?}", info.error);
            let (pixels, text) = saved(&svc, &info).remove(0);
            (info, pixels, text)
        };
        assert_ne!(
            files_stamp(&job("bright.safetensors")),
            files_stamp(&job("Automatic")),
            "another VAE, another pipeline"
        );
        let (own, own_pixels, own_text) = run("Automatic");
        let (chosen, chosen_pixels, chosen_text) = run("bright.safetensors");
        assert_eq!(own.vae, None);
        assert!(!own_text.contains("VAE"), "{own_text}");
        assert_eq!(chosen.vae.as_deref(), Some("bright.safetensors"));
        assert!(chosen_pixels != own_pixels, "the chosen VAE was not used");
        let mean = |p: &[u8]| p.iter().map(|&v| v as f64).sum::<f64>() / p.len() as f64;
        assert!(mean(&chosen_pixels) > mean(&own_pixels));
        assert!(
            chosen_text.contains("VAE hash: ") && chosen_text.contains("VAE: bright.safetensors"),
            "{chosen_text}"
        );
        // Back to the model's own, and "None" (the same for a folder): the pictures of before.
        for setting in ["Automatic", "None"] {
            let (info, pixels, _) = run(setting);
            assert!(pixels == own_pixels, "{setting} drew with the chosen VAE");
            assert!(info.notes.is_empty(), "{:?}", info.notes);
        }
        // Removed after it was chosen: the model's own, said in the notes.
        std::fs::remove_file(vaes.join("bright.safetensors")).unwrap();
        let (gone, pixels, _) = run("bright.safetensors");
        assert!(pixels == own_pixels);
        assert_eq!(gone.vae, None);
        assert!(
            gone.notes.iter().any(|n| n.contains("'bright.safetensors'")
                && n.contains("\"Automatic\" was used")),
            "{:?}",
            gone.notes
        );
        // Chosen while it was there, gone by the time the job is composed: the same.
        let missing = crate::vae::VaeChoice::Missing("bright.safetensors".into());
        let info = finished(
            &svc,
            svc.submit(ComposedJob {
                vae: missing,
                ..job("Automatic")
            })
            .unwrap()
            .id,
        );
        assert_eq!(info.state, JobState::Done, "{:?}", info.error);
        assert!(
            info.notes.iter().any(|n| n.contains("not found")),
            "{:?}",
            info.notes
        );
    }

    #[test]
    fn a_chosen_vae_that_does_not_fit_the_model_says_so_whole_or_staged() {
        // "Tell families apart only if the file tells": a VAE of another shape (here a decoder
        // with more output channels) is tried and its error names the file and the setting, not
        // "install the model again". One model at a time (Low-VRAM mode On) loads the VAE last;
        // the same message.
        let dir = tempfile::tempdir().unwrap();
        let vaes = dir.path().join("vae");
        vae_file(&vaes, "odd.safetensors", |t| {
            let w = &t["decoder.conv_out.weight"];
            let (o, i, h, k) = w.dims4().unwrap();
            let wider = Tensor::zeros((o + 1, i, h, k), w.dtype(), w.device()).unwrap();
            t.insert("decoder.conv_out.weight".into(), wider);
        });
        let files = crate::vae::vae_files(&[(vaes.clone(), 1)]);
        let svc = service(&dir);
        let job = || ComposedJob {
            model: tiny_model(),
            loras: Vec::new(),
            embedding_dirs: Vec::new(),
            refiner: None,
            images: vec![GenerateRequest {
                prompt: "a red fox".into(),
                steps: 1,
                width: 64,
                height: 64,
                ..Default::default()
            }],
            preset: None,
            vae: crate::vae::choose("odd.safetensors", &files),
        };
        for low_vram in [LowVram::Auto, LowVram::On] {
            svc.set_memory_policy(MemoryPolicy {
                low_vram,
                ..Default::default()
            });
            let info = finished(&svc, svc.submit(job()).unwrap().id);
            assert_eq!(info.state, JobState::Failed, "{low_vram:?}");
            let e = info.error.unwrap();
            assert!(
                e.message
                    .contains("The VAE 'odd.safetensors' chosen in Settings")
                    && e.hint.contains("Automatic"),
                "{low_vram:?}: {e:?}"
            );
        }
    }

    /// Pixels and parameters text of each picture `info` saved.
    /// The saved pictures of the jobs `[whole, staged, short]` (the same batch of two seeds, drawn
    /// with all models loaded, one at a time, and one at a time for short memory): two different
    /// pictures, the same in all three to the byte, with the same parameters text, which
    /// `expected` accepts.
    fn same_two_pictures(svc: &JobService, jobs: [&JobInfo; 3], expected: impl Fn(&str) -> bool) {
        let [whole, staged, short] = jobs.map(|info| saved(svc, info));
        assert_eq!(staged.len(), 2);
        assert_ne!(staged[0].0, staged[1].0, "two seeds, two pictures");
        assert_eq!(short, staged);
        for ((wp, wt), (sp, st)) in whole.iter().zip(&staged) {
            assert!(wp == sp, "staged pixels differ from the whole pipeline's");
            assert_eq!(wt, st);
            assert!(expected(st), "{st}");
        }
    }

    fn saved(svc: &JobService, info: &JobInfo) -> Vec<(Vec<u8>, String)> {
        info.images
            .iter()
            .map(|rec| {
                let bytes = std::fs::read(svc.gallery().file_path(rec)).unwrap();
                let mut reader = png::Decoder::new(std::io::Cursor::new(&bytes))
                    .read_info()
                    .unwrap();
                let mut pixels = vec![0; reader.output_buffer_size().unwrap()];
                reader.next_frame(&mut pixels).unwrap();
                let text = crate::image_file::read_parameters(&bytes).unwrap();
                (pixels, text)
            })
            .collect()
    }

    #[test]
    fn low_vram_on_or_short_memory_on_the_cpu_draws_one_model_at_a_time_and_the_same_pictures() {
        // Issue 12: with Low-VRAM mode On on the CPU the worker loads the text encoder, the
        // UNet and the VAE one after the other (2.0 instead of 3.6 GB for SD 1.5 at 512x512).
        // A batch of two with a LoRA and an embedding gives the pictures and parameters text
        // (LoRA and TI hashes) of the whole pipeline, which "Auto" keeps loaded.
        let dir = tempfile::tempdir().unwrap();
        let refs =
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/refs");
        let emb = dir.path().join("embeddings");
        std::fs::create_dir_all(&emb).unwrap();
        std::fs::copy(
            refs.join("tinyemb.safetensors"),
            emb.join("tinyemb.safetensors"),
        )
        .unwrap();
        let svc = service(&dir);
        let request = |seed: u64| GenerateRequest {
            prompt: "a red fox, tinyemb".into(),
            steps: 2,
            width: 64,
            height: 64,
            seed,
            ..Default::default()
        };
        let job = || ComposedJob {
            model: tiny_model(),
            loras: vec![LoraSpec::new(refs.join("lora_kohya.safetensors"), 0.7)],
            embedding_dirs: vec![emb.clone()],
            refiner: None,
            images: vec![request(3), request(4)],
            preset: None,
            vae: Default::default(),
        };
        let wait = |id| finished(&svc, id);
        // The same strategies both ways, so only the staging differs.
        let policy = |low_vram| MemoryPolicy {
            low_vram,
            low_options: MemoryOptions::default(),
            ..Default::default()
        };
        svc.set_memory_policy(policy(LowVram::Auto));
        let whole = wait(svc.submit(job()).unwrap().id);
        // "Auto" stages a job only when the system's available memory is short for the whole
        // pipeline (the tiny model needs a few megabytes).
        let with_ram = |free: u64| MemoryPolicy {
            ram_free: Some(Arc::new(move || Some(free))),
            ..policy(LowVram::Auto)
        };
        svc.set_memory_policy(with_ram(u64::MAX));
        let roomy = wait(svc.submit(job()).unwrap().id);
        // (A staged job frees the whole pipeline kept loaded, so the next one loads afresh.)
        svc.set_memory_policy(policy(LowVram::On));
        let staged = wait(svc.submit(job()).unwrap().id);
        // Short for the whole pipeline, not for its largest model alone (whose shortage turns
        // strategies on, `plan_cpu_stages`, which would change the picture's rounding).
        let shape = model_shape(&tiny_model()).unwrap();
        let whole_need = job_need(
            &job(),
            &shape,
            DType::F32,
            Target::Cpu,
            &MemoryOptions::default(),
            false,
        );
        svc.set_memory_policy(with_ram(whole_need - 1));
        let short = wait(svc.submit(job()).unwrap().id);
        for info in [&whole, &staged, &roomy, &short] {
            assert_eq!(info.state, JobState::Done, "{:?}", info.error);
        }
        let one_at_a_time = |info: &JobInfo| info.notes.iter().any(|n| n.contains("one at a time"));
        assert!(
            !one_at_a_time(&whole) && !one_at_a_time(&roomy),
            "{:?}",
            roomy.notes
        );
        assert!(one_at_a_time(&staged), "{:?}", staged.notes);
        assert!(
            short.notes.iter().any(|n| n.contains("0.0 GB is free, so")),
            "{:?}",
            short.notes
        );
        same_two_pictures(&svc, [&whole, &staged, &short], |text| {
            text.contains("Lora hashes: \"lora_kohya: ") && text.contains("TI hashes: \"tinyemb: ")
        });
    }

    #[test]
    fn cpu_jobs_that_would_not_fit_with_swap_are_refused_before_they_start() {
        // Low-VRAM mode Off draws with the whole pipeline whatever the memory: where it would
        // not fit in the available memory and swap together, the system would stop the app.
        let dir = tempfile::tempdir().unwrap();
        let svc = service(&dir);
        let job = ComposedJob {
            model: tiny_model(),
            loras: Vec::new(),
            embedding_dirs: Vec::new(),
            refiner: None,
            images: vec![GenerateRequest {
                prompt: "a red fox".into(),
                steps: 2,
                width: 64,
                height: 64,
                seed: 1,
                ..Default::default()
            }],
            preset: None,
            vae: Default::default(),
        };
        let shape = model_shape(&tiny_model()).unwrap();
        let need = job_need(
            &job,
            &shape,
            DType::F32,
            Target::Cpu,
            &MemoryOptions::default(),
            false,
        );
        let policy = |ram: u64, swap: u64| MemoryPolicy {
            low_vram: LowVram::Off,
            ram_free: Some(Arc::new(move || Some(ram))),
            swap_free: Some(Arc::new(move || Some(swap))),
            ..Default::default()
        };
        svc.set_memory_policy(policy(need - 1, 0));
        let refused = finished(&svc, svc.submit(job.clone()).unwrap().id);
        assert_eq!(refused.state, JobState::Failed);
        let e = refused.error.expect("an error");
        assert_eq!(e.code, "out_of_memory");
        assert!(e.message.contains("needs about"), "{}", e.message);
        assert!(e.hint.contains("Low-VRAM mode to Auto"), "{}", e.hint);
        // Swap makes up the difference: slow, not fatal, so it runs.
        svc.set_memory_policy(policy(need - 1, 1 << 30));
        let swapped = finished(&svc, svc.submit(job.clone()).unwrap().id);
        assert_eq!(swapped.state, JobState::Done, "{:?}", swapped.error);
        // Loaded now: only its working memory is counted, so a little is enough.
        let weights = need
            - job_need(
                &job,
                &shape,
                DType::F32,
                Target::Cpu,
                &MemoryOptions::default(),
                true,
            );
        svc.set_memory_policy(policy(need - weights + 1, 0));
        let again = finished(&svc, svc.submit(job).unwrap().id);
        assert_eq!(again.state, JobState::Done, "{:?}", again.error);
    }

    #[test]
    fn staged_cpu_jobs_plan_a_tiled_decode_and_single_samples_only_when_memory_is_short() {
        // A 2048x2048 picture of the tiny SD1 model: its untiled decode needs gigabytes (the
        // VAE's activations grow with the pixels), its UNet little.
        let dir = tempfile::tempdir().unwrap();
        let svc = service(&dir);
        let spec = ComposedJob {
            model: tiny_model(),
            loras: Vec::new(),
            embedding_dirs: Vec::new(),
            refiner: None,
            images: vec![GenerateRequest {
                prompt: "a cat".into(),
                width: 2048,
                height: 2048,
                ..Default::default()
            }],
            preset: None,
            vae: Default::default(),
        };
        let plan = |free: u64, swap: Option<u64>| {
            let (job, _) = Job::queued("j".into(), spec.clone(), 1);
            let policy = MemoryPolicy {
                ram_free: Some(Arc::new(move || Some(free))),
                swap_free: Some(Arc::new(move || swap)),
                ..Default::default()
            };
            let m = plan_cpu_stages(
                &svc.shared,
                &job,
                &policy,
                DType::F32,
                MemoryOptions::default(),
            );
            let notes = job.info.borrow().notes.clone();
            (m, notes)
        };
        let (roomy, notes) = plan(u64::MAX, None);
        assert_eq!(roomy.unwrap(), MemoryOptions::default());
        assert!(notes.is_empty(), "{notes:?}");
        let (tiled, notes) = plan(1 << 30, None);
        let tiled = tiled.unwrap();
        assert!(tiled.vae_tiling && !tiled.split_batch, "{tiled:?}");
        assert!(
            notes
                .iter()
                .any(|n| n.contains("Turned on tiled VAE before starting")),
            "{notes:?}"
        );
        // Nothing is enough for 1 MB: the CPU's strategies are all on, the placements stay,
        // and with swap to spare the job runs.
        let (all, notes) = plan(1 << 20, Some(64 << 30));
        let all = all.unwrap();
        assert!(all.vae_tiling && all.split_batch, "{all:?}");
        assert!(!all.vae_on_cpu && !all.text_encoder_on_cpu && all.attention_slice.is_none());
        assert!(
            notes.iter().any(|n| n.contains("tiled VAE, smaller batch")),
            "{notes:?}"
        );
        // Without swap (or with swap unknown) it is refused before it starts, with the sizes,
        // and no note says a strategy was turned on for it.
        for swap in [Some(0), None] {
            let (refused, notes) = plan(1 << 20, swap);
            let e = refused.unwrap_err();
            assert_eq!(e.code, "out_of_memory");
            assert!(
                e.message.contains("needs about") && e.message.contains("only 0.0 GB is free"),
                "{}",
                e.message
            );
            assert!(e.hint.contains("smaller size"), "{}", e.hint);
            assert!(notes.is_empty(), "{notes:?}");
        }
    }

    #[test]
    fn on_a_gpu_only_refiner_jobs_stage_when_both_unets_would_not_fit() {
        // Issue 12: on a graphics card the placements (text encoders and VAE on the CPU) keep a
        // single UNet alone in VRAM, but an SDXL refiner is a second UNet that none of them
        // moves. "On" stages refiner jobs; "Auto" when the whole pipeline would not fit even
        // with every strategy on; jobs without a refiner never stage there. The whole
        // pipeline's plan counts the refiner's weights.
        let tiny = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../models/tiny");
        let dir = tempfile::tempdir().unwrap();
        let svc = service(&dir);
        let spec = |refined: bool| ComposedJob {
            model: crate::models::scan(&tiny.join("sdxl"), &[]).remove(0),
            loras: Vec::new(),
            embedding_dirs: Vec::new(),
            refiner: refined.then(|| crate::compose::Refiner {
                name: "sdxl-refiner".into(),
                path: tiny.join("sdxl-refiner"),
                switch_at: 0.8,
            }),
            images: vec![GenerateRequest {
                prompt: "a red fox".into(),
                width: 64,
                height: 64,
                ..Default::default()
            }],
            preset: None,
            vae: Default::default(),
        };
        let (with, _) = Job::queued("with".into(), spec(true), 1);
        let (without, _) = Job::queued("without".into(), spec(false), 1);
        let dtype = DType::F16;
        let shape = model_shape(&with.spec.model).unwrap();
        let need = |m: &MemoryOptions| job_need(&with.spec, &shape, dtype, Target::Gpu, m, false);
        let lowest = need(&MemoryOptions::lowest());
        // Both of the refiner's models stay on the GPU, in the pipeline's dtype.
        let refiner = refiner_weights(&svc.shared, &with, dtype, false);
        let p = RefinerParams::read(&tiny.join("sdxl-refiner")).unwrap();
        assert!(p.text > 0 && p.unet > 0, "{p:?}");
        assert_eq!(refiner, (p.text + p.unet) * 2);
        assert_eq!(refiner_weights(&svc.shared, &without, dtype, false), 0);

        let policy = |low_vram, free: Option<u64>| MemoryPolicy {
            low_vram,
            low_options: MemoryOptions::lowest(),
            free: Some(Arc::new(move || free)),
            ram_free: None,
            swap_free: None,
            gpu_major: None,
        };
        let stages = |job: &Job, policy: MemoryPolicy, loaded: bool| {
            staging(&svc.shared, job, &policy, dtype, loaded, false)
        };
        // Room for the base with every strategy, not for the refiner beside it.
        let short = Some(lowest + refiner - 1);
        let note = stages(&with, policy(LowVram::Auto, short), false).expect("staged");
        assert!(
            note.contains("graphics card")
                && note.contains("the refiner and the VAE were loaded one at a time"),
            "{note}"
        );
        assert_eq!(
            stages(&with, policy(LowVram::Auto, Some(lowest + refiner)), false),
            None
        );
        // Already loaded: it fitted; unknown free memory: no estimate.
        assert_eq!(stages(&with, policy(LowVram::Auto, short), true), None);
        assert_eq!(stages(&with, policy(LowVram::Auto, None), false), None);
        assert_eq!(stages(&with, policy(LowVram::Off, Some(0)), false), None);
        assert!(stages(&with, policy(LowVram::On, Some(u64::MAX)), false).is_some());
        for low_vram in [LowVram::On, LowVram::Auto] {
            assert_eq!(stages(&without, policy(low_vram, Some(0)), false), None);
        }
        // The same job on the CPU stages by the system's memory, as before.
        let cpu = MemoryPolicy {
            ram_free: Some(Arc::new(|| Some(1 << 20))),
            ..policy(LowVram::Auto, None)
        };
        assert!(staging(&svc.shared, &without, &cpu, DType::F32, false, true).is_some());

        // The whole pipeline's plan: what fits the base alone with every strategy is short
        // once the refiner is counted, and the job fails before loading anything.
        let plan = |extra| plan_memory(&with, &policy(LowVram::Auto, short), dtype, false, extra);
        assert!(plan(0).is_ok());
        let refused = plan(refiner).unwrap_err();
        assert_eq!(refused.code, "out_of_memory");
        // Room for both with the strategies: some are turned on for the refiner's sake.
        let both = Some(need(&MemoryOptions::default()) + refiner - 1);
        let planned =
            plan_memory(&with, &policy(LowVram::Auto, both), dtype, false, refiner).unwrap();
        assert_ne!(planned, MemoryOptions::default());
        let alone = plan_memory(&with, &policy(LowVram::Auto, both), dtype, false, 0).unwrap();
        assert_eq!(alone, MemoryOptions::default());
    }

    #[test]
    fn refiner_jobs_are_staged_too_with_the_same_pictures_and_forward_progress() {
        // Issue 12: a job with an SDXL refiner under Low-VRAM On loads the base UNet, frees it,
        // then loads the refiner's (the whole pipeline holds both). The base samples both
        // pictures before the refiner finishes either, and the job's progress still only moves
        // forward. "Auto" counts the refiner's weights against the free memory.
        let tiny = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../models/tiny");
        let dir = tempfile::tempdir().unwrap();
        let svc = service(&dir);
        let request = |seed: u64| GenerateRequest {
            prompt: "a red fox".into(),
            steps: 4,
            width: 64,
            height: 64,
            seed,
            ..Default::default()
        };
        let job = || ComposedJob {
            model: crate::models::scan(&tiny.join("sdxl"), &[]).remove(0),
            loras: Vec::new(),
            embedding_dirs: Vec::new(),
            refiner: Some(crate::compose::Refiner {
                name: "sdxl-refiner".into(),
                path: tiny.join("sdxl-refiner"),
                switch_at: 0.5,
            }),
            images: vec![request(3), request(4)],
            preset: None,
            vae: Default::default(),
        };
        let policy = |low_vram| MemoryPolicy {
            low_vram,
            low_options: MemoryOptions::default(),
            ..Default::default()
        };
        svc.set_memory_policy(policy(LowVram::Auto));
        let whole = finished(&svc, svc.submit(job()).unwrap().id);
        svc.set_memory_policy(policy(LowVram::On));
        let mut events = svc.subscribe();
        let staged = finished(&svc, svc.submit(job()).unwrap().id);
        let mut progress = Vec::new();
        while let Ok(event) = events.try_recv() {
            if let JobEvent::Progress {
                progress: p,
                image,
                step,
                stage,
                ..
            } = event
            {
                progress.push((p, image, step, stage == Stage::Sampling));
            }
        }
        // Free memory between the whole pipeline's need without the refiner and with it.
        let spec = job();
        let shape = model_shape(&spec.model).unwrap();
        let base_need = job_need(
            &spec,
            &shape,
            DType::F32,
            Target::Cpu,
            &MemoryOptions::default(),
            false,
        );
        let p = RefinerParams::read(&tiny.join("sdxl-refiner")).unwrap();
        let refiner_bytes = p.text * 4 + p.unet * 2;
        assert!(refiner_bytes > 0);
        let free = base_need + refiner_bytes / 2;
        svc.set_memory_policy(MemoryPolicy {
            ram_free: Some(Arc::new(move || Some(free))),
            ..policy(LowVram::Auto)
        });
        let short = finished(&svc, svc.submit(job()).unwrap().id);
        for info in [&whole, &staged, &short] {
            assert_eq!(info.state, JobState::Done, "{:?}", info.error);
        }
        let one_at_a_time = |info: &JobInfo| {
            info.notes
                .iter()
                .any(|n| n.contains("the refiner and the VAE were loaded one at a time"))
        };
        assert!(!one_at_a_time(&whole), "{:?}", whole.notes);
        assert!(one_at_a_time(&staged), "{:?}", staged.notes);
        assert!(one_at_a_time(&short), "{:?}", short.notes);
        same_two_pictures(&svc, [&whole, &staged, &short], |text| {
            text.contains("Refiner: sdxl-refiner")
        });
        // Base steps 1-2 of both pictures, then the refiner's steps 3-4 of both: 8 steps in
        // all, the job's fraction rising at each.
        // (Stage changes repeat the last figures; only steps report `Sampling`.)
        let steps: Vec<(f64, usize, usize)> = progress
            .iter()
            .filter(|e| e.3)
            .map(|&(p, i, s, _)| (p, i, s))
            .collect();
        let order: Vec<(usize, usize)> = steps.iter().map(|&(_, i, s)| (i, s)).collect();
        assert_eq!(
            order,
            [
                (0, 1),
                (0, 2),
                (1, 1),
                (1, 2),
                (0, 3),
                (0, 4),
                (1, 3),
                (1, 4)
            ]
        );
        for (k, &(p, _, _)) in steps.iter().enumerate() {
            assert!((p - (k + 1) as f64 / 8.0).abs() < 1e-9, "{steps:?}");
        }
        assert!(
            progress.windows(2).all(|w| w[0].0 <= w[1].0),
            "{progress:?}"
        );
    }

    #[test]
    fn auto_counts_an_f16_unet_at_half_its_size_on_the_cpu() {
        // Issue 12: on the CPU a UNet stored in f16 keeps its weights in f16 (lossless), so
        // "Auto" must not load the models one at a time for memory that an f32 UNet would need
        // and this one does not. With LoRAs merged in, f16 storage would be lossy: f32 again.
        let dir = tempfile::tempdir().unwrap();
        let f16_dir = dir.path().join("sd1-f16");
        let src = tiny_model().path;
        for entry in walk(&src) {
            let to = f16_dir.join(entry.strip_prefix(&src).unwrap());
            std::fs::create_dir_all(to.parent().unwrap()).unwrap();
            std::fs::copy(&entry, &to).unwrap();
        }
        let unet = f16_dir.join("unet/diffusion_pytorch_model.safetensors");
        let tensors = candle_core::safetensors::load(&unet, &candle_core::Device::Cpu).unwrap();
        let f16: std::collections::HashMap<String, Tensor> = tensors
            .into_iter()
            .map(|(k, t)| (k, t.to_dtype(DType::F16).unwrap()))
            .collect();
        candle_core::safetensors::save(&f16, &unet).unwrap();
        let f16_model = crate::models::scan(&f16_dir, &[]).remove(0);

        let svc = service(&dir);
        let refs =
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/refs");
        let job = |model: crate::models::ModelInfo, loras: Vec<LoraSpec>| ComposedJob {
            model,
            loras,
            embedding_dirs: Vec::new(),
            refiner: None,
            images: vec![GenerateRequest {
                prompt: "a red fox".into(),
                steps: 1,
                width: 64,
                height: 64,
                seed: 1,
                ..Default::default()
            }],
            preset: None,
            vae: Default::default(),
        };
        // Just short of what the whole pipeline needs with an f32 UNet.
        let shape = model_shape(&tiny_model()).unwrap();
        let f32_need = job_need(
            &job(tiny_model(), Vec::new()),
            &shape,
            DType::F32,
            Target::Cpu,
            &MemoryOptions::default(),
            false,
        );
        let free = f32_need - 1;
        // The f16 UNet's estimate is below that: it fits.
        assert!(f32_need - shape.unet_params * 2 <= free);
        svc.set_memory_policy(MemoryPolicy {
            low_vram: LowVram::Auto,
            low_options: MemoryOptions::default(),
            ram_free: Some(Arc::new(move || Some(free))),
            ..Default::default()
        });
        let one_at_a_time = |model, loras| {
            let info = finished(&svc, svc.submit(job(model, loras)).unwrap().id);
            assert_eq!(info.state, JobState::Done, "{:?}", info.error);
            info.notes.iter().any(|n| n.contains("one at a time"))
        };
        let lora = || vec![LoraSpec::new(refs.join("lora_kohya.safetensors"), 0.7)];
        assert!(one_at_a_time(tiny_model(), Vec::new()), "f32 UNet: short");
        assert!(
            !one_at_a_time(f16_model.clone(), Vec::new()),
            "f16 UNet: fits"
        );
        assert!(
            one_at_a_time(f16_model, lora()),
            "f16 UNet with a LoRA: f32"
        );
    }

    /// Every file under `dir`.
    fn walk(dir: &std::path::Path) -> Vec<PathBuf> {
        let mut out = Vec::new();
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                out.extend(walk(&path));
            } else {
                out.push(path);
            }
        }
        out
    }

    struct Always;
    impl FaultInjector for Always {
        fn fail(&self, _: FaultPoint, _: &MemoryOptions) -> Option<EngineError> {
            Some(oom())
        }
    }

    #[test]
    fn out_of_memory_after_every_strategy_fails_naming_them() {
        let dir = tempfile::tempdir().unwrap();
        let svc = service(&dir);
        svc.set_fault_injector(Some(Arc::new(Always)));
        let info = run(&svc);
        assert_eq!(info.state, JobState::Failed);
        let e = info.error.unwrap();
        assert_eq!(e.code, "out_of_memory");
        assert_eq!(
            e.message,
            "There was not enough memory to draw this picture, even after retrying with sliced attention, VAE on CPU, text encoder on CPU, smaller batch."
        );
        assert!(e.hint.contains("smaller size"), "{}", e.hint);
    }

    #[test]
    fn low_vram_off_means_no_retry() {
        let dir = tempfile::tempdir().unwrap();
        let svc = service(&dir);
        svc.set_memory_policy(MemoryPolicy {
            low_vram: LowVram::Off,
            ..Default::default()
        });
        let tight = Arc::new(Tight(AtomicUsize::new(0)));
        svc.set_fault_injector(Some(tight.clone()));
        let info = run(&svc);
        assert_eq!(info.error.unwrap().code, "out_of_memory");
        assert_eq!(tight.0.load(Ordering::SeqCst), 1);
        assert!(info.notes.is_empty());
    }

    struct Black;
    impl FaultInjector for Black {
        fn fail(&self, _: FaultPoint, _: &MemoryOptions) -> Option<EngineError> {
            None
        }
        fn corrupt_output(&self, m: &MemoryOptions) -> bool {
            !m.vae_f32
        }
    }

    #[test]
    fn a_black_picture_is_decoded_again_in_fp32() {
        let dir = tempfile::tempdir().unwrap();
        let svc = service(&dir);
        svc.set_fault_injector(Some(Arc::new(Black)));
        // Whole, then one model at a time (Low-VRAM mode On on the CPU).
        for low_vram in [LowVram::Auto, LowVram::On] {
            svc.set_memory_policy(MemoryPolicy {
                low_vram,
                ..Default::default()
            });
            let info = run(&svc);
            assert_eq!(info.state, JobState::Done, "{:?}", info.error);
            assert!(
                info.notes
                    .iter()
                    .any(|n| n.contains("decoded again in full precision (fp32)")),
                "{low_vram:?}: {:?}",
                info.notes
            );
            let params = &info.images[0].parameters;
            assert!(params.contains("VAE precision: fp32"), "{params}");
            assert!(
                params.contains("Recovered: \"black image: VAE in fp32\""),
                "{params}"
            );
        }
    }

    #[test]
    fn the_estimate_turns_strategies_on_or_refuses_before_starting() {
        let dir = tempfile::tempdir().unwrap();
        let svc = service(&dir);
        let model = tiny_model();
        let shape = ModelShape::from_folder(&model.path).unwrap();
        let need = |m: &MemoryOptions| {
            ld_engine::memory::estimate(&shape, 64, 64, true, DType::F32, Target::Gpu, m).peak
        };
        // Just less than the plain run needs, enough for every strategy.
        let free = need(&MemoryOptions::default()) - 1;
        assert!(need(&MemoryOptions::lowest()) < free);
        svc.set_memory_policy(MemoryPolicy {
            free: Some(Arc::new(move || Some(free))),
            ..Default::default()
        });
        let info = run(&svc);
        assert_eq!(info.state, JobState::Done, "{:?}", info.error);
        assert!(
            info.notes[0].starts_with("Turned on sliced attention"),
            "{:?}",
            info.notes
        );

        svc.set_memory_policy(MemoryPolicy {
            free: Some(Arc::new(|| Some(1024))),
            ..Default::default()
        });
        let info = run(&svc);
        let e = info.error.unwrap();
        assert_eq!(e.code, "out_of_memory");
        assert!(
            e.message
                .contains("even with every memory saving on, but only 0.0 GB is free"),
            "{}",
            e.message
        );
    }

    #[test]
    fn single_files_are_planned_from_their_familys_sizes() {
        // A single file has no folder to read sizes from: the planner takes its family's
        // published sizes (full SD 1.5, GBs), not the tiny file's (well under 0.1 GB). With
        // too little free memory it refuses before loading, quoting the full-size figure.
        let dir = tempfile::tempdir().unwrap();
        let models = dir.path().join("models");
        std::fs::create_dir_all(&models).unwrap();
        sd1_single_file(&models);
        let model = crate::models::scan(&models, &[]).remove(0);
        assert_eq!(model.family, crate::models::Family::Sd1);
        let svc = service(&dir);
        svc.set_memory_policy(MemoryPolicy {
            free: Some(Arc::new(|| Some(1 << 30))),
            ..Default::default()
        });
        let info = run_with(&svc, model, Vec::new());
        let e = info.error.unwrap();
        assert_eq!(e.code, "out_of_memory", "{}", e.message);
        let full = ld_engine::memory::estimate(
            &ModelShape::SD1,
            64,
            64,
            true,
            DType::F32,
            Target::Gpu,
            &MemoryOptions::lowest(),
        );
        assert!(full.peak > 1 << 30);
        assert!(
            e.message
                .contains(&format!("needs about {}", gib(full.peak))),
            "{}",
            e.message
        );
    }

    #[test]
    fn broken_images_are_told_apart() {
        let dev = candle_core::Device::Cpu;
        let black = Tensor::full(-1f32, (1, 3, 4, 4), &dev).unwrap();
        let nan = Tensor::new(&[0f32, f32::NAN], &dev).unwrap();
        let fine = Tensor::new(&[-1f32, 0.2], &dev).unwrap();
        assert!(is_broken_image(&black) && is_broken_image(&nan));
        assert!(!is_broken_image(&fine));
    }
}
