//! `local-diffusers generate "prompt" --model DIR ...`: one image from the command line, with a
//! progress bar, saved as a PNG that carries its A1111 `parameters` text.

use anyhow::{bail, Context};
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
use ld_core::datadir::DataDir;
use ld_core::infotext::Infotext;
use ld_engine::pipeline::{GenerateRequest, LoadOptions, Pipeline, Progress};
use ld_engine::sampler::{Control, SamplerKind};
use ld_engine::schedule::ScheduleKind;
use std::path::PathBuf;
use std::time::Instant;

#[derive(Args, Debug)]
pub struct GenerateArgs {
    /// What to draw.
    pub prompt: String,
    /// A diffusers model folder (with model_index.json, unet/, vae/, text_encoder/, tokenizer/).
    #[arg(long, value_name = "DIR")]
    pub model: PathBuf,
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
    /// Sampler: Euler or DDIM (A1111 or ComfyUI names).
    #[arg(long, default_value = "Euler")]
    pub sampler: String,
    /// A1111 "Clip skip": 1 uses the text encoder's last layer, 2 the one before.
    #[arg(long, default_value_t = 1)]
    pub clip_skip: usize,
    /// auto, fp16 or fp32.
    #[arg(long, default_value = "auto")]
    pub precision: String,
    /// Where to save the PNG (default: the gallery folder in the data folder).
    #[arg(long, value_name = "FILE")]
    pub out: Option<PathBuf>,
}

pub fn run(args: GenerateArgs, data: &DataDir) -> anyhow::Result<()> {
    let sampler = SamplerKind::from_name(&args.sampler).with_context(|| {
        let names: Vec<_> = SamplerKind::ALL.iter().map(|k| k.name()).collect();
        format!(
            "unknown sampler '{}'; choose one of: {}",
            args.sampler,
            names.join(", ")
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
        sampler,
        schedule: ScheduleKind::Automatic,
        clip_skip: args.clip_skip,
    };
    // Cheap checks before the slow model load.
    req.validate()?;
    if !args.model.is_dir() {
        bail!(
            "{} is not a folder; --model needs a diffusers model folder",
            args.model.display()
        );
    }
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
    eprintln!("Loading {} ...", args.model.display());
    let pipeline = Pipeline::load(&args.model, &LoadOptions { device, dtype })
        .with_context(|| format!("could not load the model in {}", args.model.display()))?;
    pipeline.validate(&req)?;
    eprintln!("Loaded in {:.1}s. Seed {seed}.", t0.elapsed().as_secs_f64());

    let bar = ProgressBar::new(req.steps as u64);
    bar.set_style(
        ProgressStyle::with_template("{bar:40} step {pos}/{len}  {elapsed} elapsed, {eta} left")
            .expect("valid template"),
    );
    let mut observer = |p: &Progress<'_>| {
        bar.set_position(p.step as u64);
        Control::Continue
    };
    let image = pipeline.generate(&req, &mut observer)?;
    bar.finish_and_clear();

    let model_name = args
        .model
        .file_name()
        .map(|n| n.to_string_lossy().into_owned());
    let info = Infotext {
        prompt: req.prompt.clone(),
        negative_prompt: req.negative_prompt.clone(),
        steps: req.steps as u32,
        sampler: sampler.name().to_owned(),
        schedule: Some("Automatic".to_owned()),
        cfg_scale: req.cfg_scale,
        seed,
        width: req.width as u32,
        height: req.height as u32,
        model_hash: None,
        model: model_name,
        clip_skip: req.clip_skip as u32,
    };
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
