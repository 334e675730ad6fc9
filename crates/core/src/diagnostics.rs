//! Diagnostics: one report of what someone helping the user needs (hardware, drivers, build, the
//! recommendation, models, free disk, recent failures mapped to a plain cause and fix) and a
//! self-test that runs the whole pipeline on the built-in tiny model. The report never holds
//! prompts or images, so it can be pasted anywhere.

use crate::hardware::{Recommendation, SystemReport};
use crate::jobs::{JobInfo, JobState};
use ld_engine::pipeline::{GenerateRequest, LoadOptions, Observer, Pipeline, Progress};
use ld_engine::sampler::Control;
use serde::Serialize;
use std::path::{Path, PathBuf};
use std::time::Instant;

/// One entry of the troubleshooting list (the seed's: out of memory, slow generation, poor
/// quality, won't start), plus the failures the app itself detects.
#[derive(Debug, Clone, Copy, Serialize, PartialEq, Eq)]
pub struct Topic {
    pub id: &'static str,
    pub title: &'static str,
    pub cause: &'static str,
    pub fix: &'static str,
}

pub const TROUBLESHOOTING: [Topic; 6] = [
    Topic {
        id: "out_of_memory",
        title: "Out of memory",
        cause: "The picture needed more graphics memory (or system memory) than was free.",
        fix: "Set \"Low graphics-memory mode\" to On in Settings, choose a smaller size or fewer pictures at once, use an SD 1.5 model, or close other programs that use the graphics card.",
    },
    Topic {
        id: "slow_generation",
        title: "Slow generation",
        cause: "Pictures are drawn on the processor (no usable graphics card), or the graphics card ran out of memory and spilled into system memory.",
        fix: "Use fewer steps (20 is plenty with DPM++ 2M) and 512×512; on an NVIDIA card, install its driver and the CUDA version of the app, and set \"Low graphics-memory mode\" to On if memory is short.",
    },
    Topic {
        id: "poor_quality",
        title: "Poor quality or black pictures",
        cause: "A size far from the model's usual one, too few steps, or the VAE overflowing in half precision (black pictures).",
        fix: "Use the model's usual size (512 for SD 1.5, 768 for SD 2, 1024 for SDXL) and 20-30 steps; black pictures are decoded again in full precision by themselves.",
    },
    Topic {
        id: "wont_start",
        title: "Won't start or the model won't load",
        cause: "A model download is incomplete or broken, or a graphics driver is missing or too old.",
        fix: "Run the self-test below. Install the model again from Models; update the NVIDIA driver (525 or newer) if the GPU is not used.",
    },
    Topic {
        id: "disk_full",
        title: "Disk full",
        cause: "There is no room left for pictures or models in the data folder.",
        fix: "Empty the gallery's trash, delete models you do not use, or move the data folder to a larger disk.",
    },
    Topic {
        id: "other",
        title: "Something else",
        cause: "An unexpected error inside the app.",
        fix: "Try again. If it keeps happening, copy this report and ask for help.",
    },
];

fn topic(id: &str) -> &'static Topic {
    TROUBLESHOOTING
        .iter()
        .find(|t| t.id == id)
        .unwrap_or(&TROUBLESHOOTING[TROUBLESHOOTING.len() - 1])
}

/// A recent failure (or warning sign) with its plain cause and fix. No prompt: the report is
/// shared.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Problem {
    pub job: String,
    /// Unix milliseconds.
    pub at: i64,
    /// One of [`TROUBLESHOOTING`]'s ids.
    pub topic: &'static str,
    pub title: &'static str,
    /// What happened, from the job.
    pub message: String,
    pub cause: &'static str,
    pub fix: String,
}

/// Seconds per step above which a finished job counts as slow (a mid-range GPU takes well under
/// one; a desktop CPU 3-10 at 512×512).
const SLOW_STEP_MS: u64 = 15_000;

/// Recent failures and warning signs from the job list (newest first), at most `limit`.
pub fn problems_from_jobs(jobs: &[JobInfo], limit: usize) -> Vec<Problem> {
    let mut out = Vec::new();
    for j in jobs {
        let at = j.finished_at.unwrap_or(j.created_at);
        let entry = |id: &str, message: String, fix: Option<String>| {
            let t = topic(id);
            Problem {
                job: j.id.clone(),
                at,
                topic: t.id,
                title: t.title,
                message,
                cause: t.cause,
                fix: fix.unwrap_or_else(|| t.fix.to_owned()),
            }
        };
        match (&j.state, &j.error) {
            (JobState::Failed, Some(e)) => {
                let id = match e.code {
                    "out_of_memory" => "out_of_memory",
                    "model_broken" | "model_missing" => "wont_start",
                    _ if e.message.to_lowercase().contains("disk")
                        || e.hint.to_lowercase().contains("disk is not full") =>
                    {
                        "disk_full"
                    }
                    _ => "other",
                };
                out.push(entry(id, e.message.clone(), Some(e.hint.clone())));
            }
            (JobState::Done, _) => {
                if j.notes.iter().any(|n| n.contains("black")) {
                    out.push(entry(
                        "poor_quality",
                        "A picture came out black and was decoded again in full precision.".into(),
                        None,
                    ));
                } else if j.notes.iter().any(|n| n.contains("Ran out of memory")) {
                    out.push(entry(
                        "out_of_memory",
                        "A picture ran out of memory and was drawn with memory savings.".into(),
                        None,
                    ));
                }
                // Sampling time alone: loading and decoding made a one-step Turbo picture on a
                // laptop look like 25 s per step (found by review).
                if let Some(per_step) = j.step_ms {
                    if per_step > SLOW_STEP_MS {
                        out.push(entry(
                            "slow_generation",
                            format!("A picture took {:.0} s per step.", per_step as f64 / 1000.0),
                            None,
                        ));
                    }
                }
            }
            _ => {}
        }
        if out.len() >= limit {
            break;
        }
    }
    out.truncate(limit);
    out
}

/// Space on the disk holding the data folder.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct DiskInfo {
    pub path: String,
    pub free_bytes: Option<u64>,
    pub total_bytes: Option<u64>,
}

/// The disk whose mount point is the longest prefix of `path` (sysinfo's disk list).
pub fn disk_for(path: &Path) -> DiskInfo {
    let full = path.canonicalize().unwrap_or_else(|_| path.to_path_buf());
    let best = sysinfo::Disks::new_with_refreshed_list()
        .ok()
        .and_then(|disks| {
            disks
                .iter()
                .filter(|d| full.starts_with(d.mount_point()))
                .max_by_key(|d| d.mount_point().as_os_str().len())
                .map(|d| (d.available_space(), d.total_space()))
        });
    DiskInfo {
        path: path.display().to_string(),
        free_bytes: best.map(|b| b.0),
        total_bytes: best.map(|b| b.1),
    }
}

/// Installed models in short: how many and how much disk they take.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct ModelsSummary {
    pub count: usize,
    pub total_bytes: u64,
    /// Families present, e.g. ["SD1", "SDXL"].
    pub families: Vec<&'static str>,
}

pub fn summarize_models(models: &[crate::models::ModelInfo]) -> ModelsSummary {
    let mut families: Vec<&'static str> = models.iter().map(|m| m.family.label()).collect();
    families.sort_unstable();
    families.dedup();
    ModelsSummary {
        count: models.len(),
        total_bytes: models.iter().map(|m| m.size_bytes).sum(),
        families,
    }
}

/// The whole report.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub version: &'static str,
    pub system: SystemReport,
    pub recommendation: Recommendation,
    pub models: ModelsSummary,
    pub disk: DiskInfo,
    pub problems: Vec<Problem>,
    pub troubleshooting: &'static [Topic],
    /// Everything but the hardware as plain text (the UI puts it under its own hardware part).
    pub details_text: String,
    /// The whole report as plain text (what `doctor` prints).
    pub text: String,
}

fn gb(b: u64) -> String {
    format!("{:.1} GB", b as f64 / (1u64 << 30) as f64)
}

impl Report {
    pub fn new(
        system: SystemReport,
        models: ModelsSummary,
        disk: DiskInfo,
        problems: Vec<Problem>,
    ) -> Self {
        let recommendation = crate::hardware::recommend(&system);
        let mut d = String::new();
        d.push_str("\nRecommended settings\n");
        d.push_str(&recommendation.to_text());
        d.push_str(&format!(
            "\nModels:  {} installed ({}){}\n",
            models.count,
            gb(models.total_bytes),
            if models.families.is_empty() {
                String::new()
            } else {
                format!(", {}", models.families.join(", "))
            }
        ));
        d.push_str(&format!(
            "Disk:    {} free of {} for the data folder\n",
            disk.free_bytes.map_or("unknown".into(), gb),
            disk.total_bytes.map_or("unknown".into(), gb)
        ));
        if problems.is_empty() {
            d.push_str("Recent problems: none\n");
        } else {
            d.push_str("Recent problems:\n");
            for p in &problems {
                d.push_str(&format!("- {}: {} Fix: {}\n", p.title, p.message, p.fix));
            }
        }
        let text = format!(
            "Local Diffusers {} diagnostics\n{}Data:    {}\n{d}",
            env!("CARGO_PKG_VERSION"),
            system.to_text(),
            disk.path
        );
        Self {
            version: env!("CARGO_PKG_VERSION"),
            system,
            recommendation,
            models,
            disk,
            problems,
            troubleshooting: &TROUBLESHOOTING,
            details_text: d,
            text,
        }
    }
}

/// Where the built-in tiny model is looked for, in order: `<data>/models/tiny/sd1`; beside the
/// executable and in each folder above it (`<dir>/models/tiny/sd1`: an unpacked release, or
/// `target/debug/..` up to the repository); `<dir>/../share/local-diffusers/models/tiny/sd1`
/// (Linux packages); and the repository this binary was built from (development builds).
pub fn tiny_model_candidates(data_dir: &Path) -> Vec<PathBuf> {
    let rel = Path::new("models").join("tiny").join("sd1");
    let mut out = vec![data_dir.join(&rel)];
    if let Ok(exe) = std::env::current_exe() {
        for dir in exe.ancestors().skip(1) {
            out.push(dir.join(&rel));
            out.push(dir.join("share/local-diffusers").join(&rel));
        }
    }
    out.push(
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../..")
            .join(&rel),
    );
    out
}

/// The first candidate that is a model folder.
pub fn find_tiny_model(data_dir: &Path) -> Option<PathBuf> {
    tiny_model_candidates(data_dir)
        .into_iter()
        .find(|p| p.join("model_index.json").is_file())
}

/// What the self-test found. Holds no prompt and no picture.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct SelfTest {
    pub ok: bool,
    pub model: String,
    pub device: String,
    pub load_ms: u64,
    pub steps: usize,
    /// Each sampling step's time.
    pub step_ms: Vec<u64>,
    pub ms_per_step: f64,
    pub decode_ms: u64,
    pub total_ms: u64,
    /// Why it failed, in words, with what to do.
    pub error: Option<crate::jobs::JobError>,
}

impl SelfTest {
    pub fn to_text(&self) -> String {
        if self.ok {
            format!(
                "Self-test: passed on {} — load {} ms, {} steps at {:.0} ms per step, decode {} ms, {} ms in all\n",
                self.device, self.load_ms, self.steps, self.ms_per_step, self.decode_ms, self.total_ms
            )
        } else {
            let e = self.error.as_ref();
            format!(
                "Self-test: FAILED on {} — {} {}\n",
                self.device,
                e.map_or("", |e| e.message.as_str()),
                e.map_or("", |e| e.hint.as_str())
            )
        }
    }
}

/// Steps of the self-test: enough to time a step, few enough to take about a second on a CPU.
const SELF_TEST_STEPS: usize = 4;

/// Loads the tiny model at `model_dir` with `load`, draws one 64×64 picture and checks that it
/// is finite and not blank. Blocking: run it off the async runtime.
pub fn self_test(model_dir: &Path, load: &LoadOptions) -> SelfTest {
    // The back end's plain name ("cuda"), not candle's Debug text ("cuda { gpu_id: 0 }"), which
    // the UI showed as it is (found by review).
    let device = match load.device.location() {
        candle_core::DeviceLocation::Cpu => "cpu",
        candle_core::DeviceLocation::Cuda { .. } => "cuda",
        candle_core::DeviceLocation::Metal { .. } => "metal",
    }
    .to_string();
    let start = Instant::now();
    let mut result = SelfTest {
        ok: false,
        model: model_dir
            .file_name()
            .map(|n| format!("tiny/{}", n.to_string_lossy()))
            .unwrap_or_default(),
        device,
        load_ms: 0,
        steps: SELF_TEST_STEPS,
        step_ms: Vec::new(),
        ms_per_step: 0.0,
        decode_ms: 0,
        total_ms: 0,
        error: None,
    };
    let fail = |mut r: SelfTest, e: &ld_engine::EngineError| {
        r.error = Some(crate::jobs::explain(e, "tiny self-test"));
        r.total_ms = start.elapsed().as_millis() as u64;
        r
    };
    let pipeline = match Pipeline::load(model_dir, load) {
        Ok(p) => p,
        Err(e) => return fail(result, &e),
    };
    result.load_ms = start.elapsed().as_millis() as u64;
    let req = GenerateRequest {
        prompt: "self test".into(),
        steps: SELF_TEST_STEPS,
        width: 64,
        height: 64,
        seed: 1,
        ..Default::default()
    };
    struct Timer {
        last: Instant,
        steps: Vec<u64>,
    }
    impl Observer for Timer {
        fn on_progress(&mut self, _: &Progress<'_>) -> Control {
            self.steps.push(self.last.elapsed().as_millis() as u64);
            self.last = Instant::now();
            Control::Continue
        }
    }
    let mut timer = Timer {
        last: Instant::now(),
        steps: Vec::new(),
    };
    let latents = match pipeline.sample_latents(&req, &mut timer, &mut |_, _| {}) {
        Ok(l) => l,
        Err(e) => return fail(result, &e),
    };
    result.ms_per_step = timer.steps.iter().sum::<u64>() as f64 / timer.steps.len().max(1) as f64;
    result.step_ms = timer.steps;
    let decode_start = Instant::now();
    let image = match pipeline.decode(&latents) {
        Ok(i) => i,
        Err(e) => return fail(result, &e),
    };
    result.decode_ms = decode_start.elapsed().as_millis() as u64;
    let finite = image
        .flatten_all()
        .and_then(|t| t.sum_all())
        .and_then(|t| t.to_scalar::<f32>())
        .map(f32::is_finite)
        .unwrap_or(false);
    if !finite {
        return fail(
            result,
            &ld_engine::EngineError::InvalidRequest(
                "the self-test picture came out broken (NaN)".into(),
            ),
        );
    }
    result.ok = true;
    result.total_ms = start.elapsed().as_millis() as u64;
    result
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::jobs::JobError;

    fn tiny() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../../models/tiny/sd1")
    }

    #[test]
    fn self_test_runs_the_tiny_model_and_times_each_step() {
        let r = self_test(&tiny(), &LoadOptions::default());
        assert!(r.ok, "{r:?}");
        assert_eq!(r.step_ms.len(), SELF_TEST_STEPS);
        assert_eq!(r.device, "cpu");
        assert!(
            r.to_text().starts_with("Self-test: passed on cpu"),
            "{}",
            r.to_text()
        );
    }

    #[test]
    fn self_test_of_a_missing_model_says_why() {
        let dir = tempfile::tempdir().unwrap();
        let r = self_test(dir.path(), &LoadOptions::default());
        assert!(!r.ok);
        assert_eq!(r.error.as_ref().unwrap().code, "model_broken");
        assert!(r.to_text().contains("FAILED"));
    }

    #[test]
    fn the_tiny_model_is_found_from_a_dev_build() {
        let dir = tempfile::tempdir().unwrap();
        let found = find_tiny_model(dir.path()).unwrap();
        assert!(found.join("model_index.json").is_file());
        // The data folder wins when it has one.
        assert!(tiny_model_candidates(dir.path())[0].starts_with(dir.path()));
    }

    fn job(id: &str, state: JobState, error: Option<JobError>, notes: &[&str]) -> JobInfo {
        JobInfo {
            id: id.into(),
            state,
            stage: crate::jobs::Stage::Finished,
            position: None,
            prompt: "secret prompt".into(),
            negative_prompt: String::new(),
            model: "m".into(),
            width: 512,
            height: 512,
            steps: 20,
            cfg_scale: 7.0,
            sampler: "Euler".into(),
            schedule: "Karras".into(),
            seed: 1,
            clip_skip: 1,
            batch: 1,
            image: 0,
            step: 20,
            total_steps: 20,
            progress: 1.0,
            eta_ms: None,
            images: vec![],
            error,
            notes: notes.iter().map(|s| s.to_string()).collect(),
            vae: None,
            created_at: 1,
            started_at: Some(0),
            finished_at: Some(400_000),
            step_ms: Some(20_000),
        }
    }

    #[test]
    fn failures_map_to_the_troubleshooting_list_without_prompts() {
        let err = |code: &'static str, message: &str| JobError {
            code,
            message: message.into(),
            hint: "h".into(),
        };
        let jobs = vec![
            job(
                "job-1",
                JobState::Failed,
                Some(err("out_of_memory", "not enough memory")),
                &[],
            ),
            job(
                "job-2",
                JobState::Failed,
                Some(err("model_broken", "could not be loaded")),
                &[],
            ),
            job(
                "job-3",
                JobState::Done,
                None,
                &["The picture came out black ..."],
            ),
            job("job-4", JobState::Cancelled, None, &[]),
        ];
        let p = problems_from_jobs(&jobs, 10);
        let topics: Vec<_> = p.iter().map(|x| x.topic).collect();
        // job-3 is also slow: 20 s per step.
        assert_eq!(
            topics,
            [
                "out_of_memory",
                "wont_start",
                "poor_quality",
                "slow_generation"
            ]
        );
        assert_eq!(p[0].fix, "h");
        // The time of a whole job is not a step's: a one-step picture that took 25 s to load and
        // decode, with 100 ms steps, is not slow (found by review).
        let mut quick = job("job-5", JobState::Done, None, &[]);
        (quick.steps, quick.finished_at, quick.step_ms) = (1, Some(25_000), Some(100));
        assert!(problems_from_jobs(&[quick], 10).is_empty());
        assert_eq!(problems_from_jobs(&jobs, 1).len(), 1);
        let r = Report::new(
            crate::hardware::system_report(
                &crate::hardware::NvmlProbe::default(),
                Default::default(),
            ),
            ModelsSummary {
                count: 2,
                total_bytes: 3 << 30,
                families: vec!["SD1"],
            },
            disk_for(Path::new(".")),
            p,
        );
        assert!(!r.text.contains("secret prompt"), "{}", r.text);
        assert!(
            r.text.contains("CPU:") && r.text.contains("Models:  2 installed (3.0 GB), SD1"),
            "{}",
            r.text
        );
        assert!(
            r.text.contains("Out of memory: not enough memory"),
            "{}",
            r.text
        );
        assert!(r.disk.free_bytes.is_some(), "{:?}", r.disk);
    }
}
