//! `local-diffusers generate "prompt" --model DIR ...`: one image from the command line, with a
//! progress bar, saved as a PNG that carries its A1111 `parameters` text.

use anyhow::{bail, Context};
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
use ld_core::datadir::DataDir;
use ld_engine::memory::MemoryOptions;
use ld_engine::pipeline::staged::StagedPipeline;
use ld_engine::pipeline::{GenerateRequest, LoadOptions, Pipeline, Progress};
use ld_engine::rng::SeedSource;
use ld_engine::sampler::{parse_sampler, Control, SamplerKind};
use ld_engine::schedule::{parse_schedule, ScheduleKind};
use std::path::PathBuf;
use std::time::Instant;

#[derive(Args, Debug)]
pub struct GenerateArgs {
    /// What to draw.
    pub prompt: String,
    /// A diffusers model folder, a .safetensors checkpoint, or the name of an installed model
    /// (see `models list`).
    #[arg(long, value_name = "DIR_OR_NAME")]
    pub model: PathBuf,
    /// Another folder of models to look in by name; repeatable.
    #[arg(long = "models-dir", value_name = "DIR")]
    pub models_dirs: Vec<PathBuf>,
    /// What to keep out of the picture.
    #[arg(long, default_value = "")]
    pub negative: String,
    #[arg(long, default_value_t = 20)]
    pub steps: usize,
    /// How closely to follow the prompt (classifier-free guidance scale).
    #[arg(long, default_value_t = 7.0)]
    pub cfg: f64,
    /// -1 picks a random seed; the one used is printed and saved in the image.
    #[arg(long, default_value_t = -1, allow_hyphen_values = true)]
    pub seed: i64,
    #[arg(long, default_value_t = 512)]
    pub width: usize,
    #[arg(long, default_value_t = 512)]
    pub height: usize,
    /// Sampler, by A1111 or ComfyUI name ("DPM++ 2M", "Euler a", "dpmpp_2m"); old fused names
    /// such as "DPM++ 2M Karras" also set the schedule. Default: DPM++ 2M.
    #[arg(long, value_name = "NAME")]
    pub sampler: Option<String>,
    /// Schedule type: Automatic, Uniform, Karras, Exponential, Polyexponential, SGM Uniform,
    /// KL Optimal, Align Your Steps, Simple, Normal, DDIM, Beta, Leading, Trailing. Default:
    /// Karras with the default sampler, otherwise the one a fused --sampler name gives,
    /// otherwise Automatic (the sampler's own default, as in A1111).
    #[arg(long, value_name = "NAME")]
    pub schedule: Option<String>,
    /// Where the noise comes from: cpu (PyTorch's CPU generator: A1111 "CPU", ComfyUI,
    /// diffusers) or nv (A1111's "NV": what an NVIDIA GPU draws for the seed).
    #[arg(long, value_name = "cpu|nv", default_value = "cpu")]
    pub seed_source: String,
    /// A1111 "Clip skip": 1 uses the text encoder's last layer, 2 the one before.
    #[arg(long, default_value_t = 1)]
    pub clip_skip: usize,
    /// auto, fp16 or fp32.
    #[arg(long, default_value = "auto")]
    pub precision: String,
    /// Where to save the PNG (default: the gallery folder in the data folder).
    #[arg(long, value_name = "FILE")]
    pub out: Option<PathBuf>,
    /// Low-memory mode: on the CPU (fp32) keep the models' weights in half precision, widened
    /// layer by layer as they run, and run the guidance batch's halves one after the other (SD
    /// 1.5 at 512x512 in about 2 GB; images differ from full-precision weights only by the
    /// weights' rounding). SD1/SD2/SDXL base models, folders and .safetensors checkpoints alike,
    /// are always drawn one model at a time.
    #[arg(long)]
    pub low_memory: bool,
    /// Experimental, CPUs with AVX-512 BF16 only (AMD Zen 4, Intel Sapphire Rapids): the
    /// matrix products in bfloat16, about 1.5x faster; pictures differ from f32 ones by rounding.
    #[arg(long)]
    pub bf16: bool,
    /// For a .safetensors checkpoint: a diffusers model folder whose configs and tokenizers
    /// describe its architecture (as diffusers' `from_single_file(config=...)`), for models
    /// whose shapes differ from SD 1.5 / SD 2.1 / SDXL 1.0, which are assumed otherwise.
    #[arg(long, value_name = "DIR")]
    pub config: Option<PathBuf>,
    /// A separate VAE file (.safetensors, LDM or diffusers names) to decode with instead of the
    /// model's own, as A1111's "SD VAE" setting: for checkpoints shipped without one, or a
    /// sharper or fixed VAE.
    #[arg(long, value_name = "FILE")]
    pub vae: Option<PathBuf>,
    /// An SDXL refiner (a diffusers folder, a .safetensors checkpoint or an installed model's
    /// name) that finishes the picture of an SDXL base model from --refiner-switch on. It is
    /// loaded after the base model is freed, so the two are never in memory together.
    #[arg(long, value_name = "DIR_FILE_OR_NAME")]
    pub refiner: Option<PathBuf>,
    /// The fraction of the denoising the base model does before the refiner takes over (A1111's
    /// "Switch at"); 1 leaves the refiner out.
    #[arg(long, value_name = "0..1", default_value_t = 0.8)]
    pub refiner_switch: f64,
    /// Hires fix: draw at --width x --height, enlarge by this factor (1..4) and draw over the
    /// larger picture (A1111's "Upscale by").
    #[arg(long, value_name = "FACTOR")]
    pub hires_scale: Option<f64>,
    /// Steps of the hires pass; 0: as many as --steps.
    #[arg(long, default_value_t = 0)]
    pub hires_steps: usize,
    /// How much the hires pass redraws, above 0 up to 1 (A1111's "Denoising strength").
    #[arg(long, value_name = "0..1", default_value_t = ld_core::compose::HIRES_DENOISE)]
    pub hires_denoise: f64,
    /// The hires upscaler: Latent, "Latent (nearest)", "Latent (nearest-exact)" or Lanczos.
    #[arg(long, default_value = "Latent")]
    pub hires_upscaler: String,
}

/// The hires pass the flags ask for, sized as the app sizes a request's (A1111's rules).
fn hires_fix(args: &GenerateArgs, scale: f64) -> anyhow::Result<ld_engine::hires::HiresFix> {
    use ld_engine::hires::HiresUpscaler;
    // The app draws a stand-in for an upscaler it lacks; on the command line it is a typo.
    if !HiresUpscaler::from_name(&args.hires_upscaler).1 {
        let names: Vec<&str> = HiresUpscaler::ALL.iter().map(|u| u.name()).collect();
        bail!(
            "unknown --hires-upscaler '{}'; choose one of: {}",
            args.hires_upscaler,
            names.join(", ")
        );
    }
    let input = ld_core::compose::HiresInput {
        scale: Some(scale),
        steps: Some(args.hires_steps),
        denoise: Some(args.hires_denoise),
        upscaler: Some(args.hires_upscaler.clone()),
        ..Default::default()
    };
    ld_core::compose::hires_fix(&input, args.width, args.height, args.steps)
        .map_err(|e| anyhow::anyhow!("{} {}", e.message, e.hint))
}

pub fn run(args: GenerateArgs, data: &DataDir) -> anyhow::Result<()> {
    if args.bf16 {
        ld_engine::bf16_gemm::enable().map_err(|e| anyhow::anyhow!("--bf16: {e}"))?;
    }
    if args.low_memory {
        // Before any compute thread starts.
        ld_engine::memory::share_one_arena();
    }
    let (sampler, schedule) =
        sampler_and_schedule(args.sampler.as_deref(), args.schedule.as_deref())?;
    let seed_source = SeedSource::from_name(&args.seed_source).with_context(|| {
        format!(
            "unknown seed source '{}'; choose cpu or nv",
            args.seed_source
        )
    })?;
    let seed = match args.seed {
        -1 => rand::random::<u32>() as u64,
        s if s < 0 => bail!("seed must be -1 (random) or a number from 0 up, got {s}"),
        s => s as u64,
    };
    let req = GenerateRequest {
        prompt: args.prompt.clone(),
        negative_prompt: args.negative.clone(),
        steps: args.steps,
        cfg_scale: args.cfg,
        width: args.width,
        height: args.height,
        seed,
        seed_source,
        sampler,
        schedule,
        clip_skip: args.clip_skip,
        hires: match args.hires_scale {
            None => None,
            Some(scale) => Some(hires_fix(&args, scale)?),
        },
    };
    // Cheap checks before the slow model load.
    req.validate()?;
    let model_dir = resolve_model(&args.model, &args.models_dirs, data)?;
    // Named here: the loaders would report a missing path as an incomplete model folder.
    if let Some(vae) = args.vae.as_deref().filter(|v| !v.is_file()) {
        bail!(
            "--vae {} is not a file; give the path of a VAE .safetensors file",
            vae.display()
        );
    }
    if let Some(config) = args.config.as_deref().filter(|c| !c.is_dir()) {
        bail!(
            "--config {} is not a folder; give a diffusers model folder (with model_index.json)",
            config.display()
        );
    }
    if args.config.is_some() && model_dir.is_dir() {
        // A folder has its own configs; one given beside it would be ignored.
        bail!(
            "--config is for .safetensors checkpoints; {} is a model folder with its own configs",
            model_dir.display()
        );
    }
    let refiner = match &args.refiner {
        Some(r) => Some(
            resolve_model(r, &args.models_dirs, data)
                .with_context(|| format!("--refiner {}", r.display()))?,
        ),
        None => None,
    };
    let refiner_options = ld_engine::refiner::RefinerOptions {
        switch_at: args.refiner_switch,
        ..Default::default()
    };
    refiner_options.validate()?;
    let out = match &args.out {
        Some(p) => p.clone(),
        None => data.gallery().join(format!(
            "{}-{seed}.png",
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0)
        )),
    };
    if out
        .extension()
        .and_then(|e| e.to_str())
        .map(|e| e.to_ascii_lowercase())
        != Some("png".into())
    {
        bail!("--out must name a .png file, got {}", out.display());
    }

    let device = super::pick_device()?;
    let dtype = super::pick_dtype(&args.precision, &device)?;
    let t0 = Instant::now();
    eprintln!("Loading {} ...", model_dir.display());
    let opts = LoadOptions {
        device,
        dtype,
        half_weights: if args.low_memory {
            ld_engine::pipeline::HalfWeights::On
        } else {
            ld_engine::pipeline::HalfWeights::WhenLossless
        },
    };
    // Some schedules (DDIM uniform) walk a step more than asked; the bar follows the sampler.
    let bar = ProgressBar::new(req.steps as u64);
    bar.set_style(
        ProgressStyle::with_template("{bar:40} step {pos}/{len}  {elapsed} elapsed, {eta} left")
            .expect("valid template"),
    );
    let mut observer = |p: &Progress<'_>| {
        bar.set_length(p.total as u64);
        bar.set_position(p.step as u64);
        Control::Continue
    };
    let loaded = |bar: &ProgressBar| {
        eprintln!("Loaded in {:.1}s. Seed {seed}.", t0.elapsed().as_secs_f64());
        // Elapsed time and ETA count from the first step, not from the start of loading.
        bar.reset();
    };
    // One picture, then the process ends: an SD1/SD2/SDXL base model, diffusers folder or
    // single .safetensors file, is drawn one model at a time (text encoders, UNet, VAE), so only
    // the largest is ever in memory. Each model is read once either way, so this costs nothing
    // here; the server keeps them all for the next job. What the staged run does not take (an
    // SDXL refiner, a file that is no usable checkpoint) goes to the whole pipeline, whose load
    // says what is wrong.
    let source = ld_engine::single_file::ModelSource {
        path: model_dir.clone(),
        config: args.config.clone(),
        vae: args.vae.clone(),
    };
    let one_model_at_a_time = StagedPipeline::supports(&model_dir)
        .with_context(|| format!("could not open the model in {}", model_dir.display()))?;
    let image = if one_model_at_a_time {
        let mut staged = StagedPipeline::open_source(&source, &opts)
            .with_context(|| format!("could not open the model in {}", model_dir.display()))?;
        if args.low_memory {
            staged.set_memory_options(low_memory_options());
        }
        if let Some(r) = &refiner {
            let source = ld_engine::single_file::ModelSource::new(r.clone());
            staged
                .set_refiner(&source, refiner_options)
                .with_context(|| format!("could not open the refiner in {}", r.display()))?;
        }
        staged.validate(&req)?;
        let prompt = staged.encode(&req)?;
        let sampled = {
            let unet = staged
                .load_unet()
                .with_context(|| format!("could not load the UNet in {}", model_dir.display()))?;
            loaded(&bar);
            unet.sample(&req, &prompt, &mut observer)?
            // The UNet is freed here, before the refiner or the VAE loads.
        };
        let mut sampled = sampled;
        if let (true, Some(r)) = (sampled.needs_refiner(), &refiner) {
            staged
                .load_refiner()
                .with_context(|| format!("could not load the refiner in {}", r.display()))?
                .refine(&req, &prompt, &mut sampled, &mut observer)?;
        }
        let latents = sampled.into_latents()?;
        staged.decode(&req, &latents)?
    } else {
        let mut pipeline = Pipeline::load_source(&source, &opts)
            .with_context(|| format!("could not load the model in {}", model_dir.display()))?;
        if args.low_memory {
            pipeline.set_memory_options(low_memory_options())?;
        }
        if let Some(r) = &refiner {
            pipeline
                .load_refiner(r, &opts)
                .with_context(|| format!("could not load the refiner in {}", r.display()))?;
            let mut options = pipeline.sdxl_options().unwrap_or_default();
            options.refiner = refiner_options;
            pipeline.set_sdxl_options(options)?;
        }
        pipeline.validate(&req)?;
        loaded(&bar);
        pipeline.generate(&req, &mut observer)?
    };
    bar.finish_and_clear();

    // Named as the app names them, so the parameters read the same.
    let model_name = ld_core::models::display_name(&model_dir);
    let mut info = ld_core::jobs::infotext_for(&req, &model_name);
    if let Some(r) = &refiner {
        // A1111's fields, as the app writes them.
        info.extra
            .push(("Refiner".into(), ld_core::models::display_name(r)));
        info.extra
            .push(("Refiner switch at".into(), args.refiner_switch.to_string()));
    }
    let png = ld_core::image_file::encode_png(
        &image.pixels,
        image.width as u32,
        image.height as u32,
        &info.to_text(),
    )?;
    ld_core::image_file::save_png(&out, &png)?;
    println!("{}", out.display());
    eprintln!(
        "Saved {}x{} image (seed {seed}) in {:.1}s.",
        image.width,
        image.height,
        t0.elapsed().as_secs_f64()
    );
    Ok(())
}

/// The strategies `--low-memory` adds: the guidance batch's two halves through the UNet one
/// after the other, which halves the UNet's working memory (0.22 GB for SD 1.5 at 512x512, the
/// peak of a low-memory run) and changes no numbers for SD1/SD2 (each sample is computed on its
/// own). SDXL's time embedding is per sample (its added conditions), so its products then have
/// one row instead of two and may round differently: 2 of the tiny SDXL's 12,288 bytes differ
/// by one level.
fn low_memory_options() -> MemoryOptions {
    MemoryOptions {
        split_batch: true,
        ..MemoryOptions::default()
    }
}

/// The sampler and schedule from `--sampler` and `--schedule`: an explicit `--schedule` wins over
/// one a fused sampler name implies; with neither flag the app default is DPM++ 2M + Karras.
fn sampler_and_schedule(
    sampler: Option<&str>,
    schedule: Option<&str>,
) -> anyhow::Result<(SamplerKind, ScheduleKind)> {
    let (kind, fused) = match sampler {
        Some(name) => parse_sampler(name)?,
        None => (SamplerKind::DpmPp2M, Some(ScheduleKind::Karras)),
    };
    let schedule = match schedule {
        Some(name) => parse_schedule(name)?,
        None => fused.unwrap_or(ScheduleKind::Automatic),
    };
    Ok((kind, schedule))
}

/// A folder given by path, else an installed model by name (data folder, `--models-dir`s and the
/// folders in the settings).
fn resolve_model(
    wanted: &std::path::Path,
    extra: &[PathBuf],
    data: &DataDir,
) -> anyhow::Result<PathBuf> {
    let is_checkpoint = wanted
        .extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("safetensors"));
    if wanted.is_dir() || (wanted.is_file() && is_checkpoint) {
        return Ok(wanted.to_path_buf());
    }
    if wanted.is_file() && ld_engine::pickle::is_pickle_path(wanted) {
        bail!(
            "{} is a pickle file, which can run code when opened, so it is never loaded; convert \
             it first with `local-diffusers models convert {}`",
            wanted.display(),
            wanted.display()
        );
    }
    let mut dirs = extra.to_vec();
    dirs.extend(
        ld_core::settings::load(&data.settings_file())
            .settings
            .models_dirs,
    );
    let models = ld_core::models::scan(&data.models(), &dirs);
    match ld_core::models::find(&models, &wanted.to_string_lossy()) {
        Some(m) => Ok(m.path.clone()),
        None if wanted.exists() => bail!(
            "{} is not a model folder, .safetensors checkpoint or installed model's name",
            wanted.display()
        ),
        None => bail!(
            "there is no model folder or installed model called '{}'; installed: {}",
            wanted.display(),
            if models.is_empty() {
                "none (download one with `local-diffusers models download sd-turbo`)".to_owned()
            } else {
                models
                    .iter()
                    .map(|m| m.name.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            }
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sampler_and_schedule_defaults_and_precedence() {
        let pick = |a, b| sampler_and_schedule(a, b).unwrap();
        assert_eq!(
            pick(None, None),
            (SamplerKind::DpmPp2M, ScheduleKind::Karras)
        );
        assert_eq!(
            pick(Some("Euler a"), None),
            (SamplerKind::EulerA, ScheduleKind::Automatic)
        );
        assert_eq!(
            pick(Some("DPM++ 2M SDE Karras"), None),
            (SamplerKind::DpmPp2MSde, ScheduleKind::Karras)
        );
        assert_eq!(
            pick(Some("dpmpp_2m"), Some("sgm_uniform")),
            (SamplerKind::DpmPp2M, ScheduleKind::SgmUniform)
        );
        assert_eq!(
            pick(Some("DPM++ 2M Karras"), Some("Exponential")),
            (SamplerKind::DpmPp2M, ScheduleKind::Exponential)
        );
        assert!(sampler_and_schedule(None, Some("Nope")).is_err());
    }
}
