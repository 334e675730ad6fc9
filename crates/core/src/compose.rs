//! Turning what a caller asked for into what the engine runs, in one place for every entry point
//! (our UI, the A1111 and OpenAI APIs, chat illustration): the preset first, then the caller's
//! fields, then the prompt prefix, suffix and default negative prompt from the settings.

use crate::models::{self, Family, ModelInfo};
use crate::presets::Preset;
use crate::settings::Settings;
use ld_engine::hires::{HiresFix, HiresUpscaler};
use ld_engine::lora::LoraSpec;
use ld_engine::pipeline::GenerateRequest;
use ld_engine::rng::SeedSource;
use ld_engine::sampler::{parse_sampler, SamplerKind};
use ld_engine::schedule::{parse_schedule, ScheduleKind};
use serde::Deserialize;

/// Longest prompt we take (characters). Far above what the text encoder reads even with chunking;
/// the cap keeps a runaway client from filling memory and the gallery index.
pub const MAX_PROMPT_CHARS: usize = 10_000;
/// Most images one job may ask for.
pub const MAX_BATCH: usize = 8;

/// A generation as any entry point asks for it; every field but the prompt may be left out.
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct GenerationInput {
    pub prompt: String,
    /// `None`: the settings' default negative prompt.
    pub negative_prompt: Option<String>,
    /// A preset id ("portrait", or a user preset's id).
    pub preset: Option<String>,
    /// A model name from the library; `None`: the default model.
    pub model: Option<String>,
    pub width: Option<usize>,
    pub height: Option<usize>,
    pub steps: Option<usize>,
    pub cfg_scale: Option<f64>,
    /// A1111, fused ("DPM++ 2M Karras") or ComfyUI sampler name.
    pub sampler: Option<String>,
    pub schedule: Option<String>,
    /// -1 or absent: random.
    pub seed: Option<i64>,
    /// "cpu" (default) or "nv" (A1111's GPU-compatible noise).
    pub seed_source: Option<String>,
    pub batch_size: Option<usize>,
    pub clip_skip: Option<usize>,
    /// Leave out the settings' and the preset's prompt prefix and suffix (Voxta's
    /// `IgnoreAffixes`): for callers that write the whole prompt themselves.
    pub ignore_affixes: bool,
    /// An SDXL refiner model (by name) that finishes the last part of the steps.
    pub refiner: Option<String>,
    /// Fraction of the denoising the base model does before the refiner takes over (0.8).
    pub refiner_switch: Option<f64>,
    /// A second pass at a larger size (A1111's "Hires. fix"); absent: one pass.
    pub hires: Option<HiresInput>,
    /// This job's VAE, as the settings' "SD VAE" takes it ("Automatic", "None" or a VAE file's
    /// name); absent: the settings' choice. A1111 clients send it in `override_settings`.
    pub vae: Option<String>,
}

/// The hires fix of a request, in A1111's terms; every field may be left out.
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct HiresInput {
    /// How much larger the final picture is (A1111 `hr_scale`, 2 by default).
    pub scale: Option<f64>,
    /// A final width and/or height instead of the scale (A1111 `hr_resize_x`/`hr_resize_y`;
    /// 0 or absent: from the scale). One alone keeps the picture's shape; both of another shape
    /// enlarge it to cover that size and cut the middle out, as A1111 does.
    pub width: Option<usize>,
    pub height: Option<usize>,
    /// Steps of the second pass (A1111 `hr_second_pass_steps`; 0 or absent: as many as the
    /// first pass).
    pub steps: Option<usize>,
    /// How much the second pass redraws, 0.01 up to 1 (A1111 `denoising_strength`; 0.7 by
    /// default, as in its UI; its API's 0.75 is filled in by the A1111 handler).
    pub denoise: Option<f64>,
    /// A1111's `hr_upscaler` name ("Latent" by default); see [`HiresUpscaler::from_name`].
    pub upscaler: Option<String>,
}

/// A1111's default hires enlargement and denoising strength.
pub const HIRES_SCALE: f64 = 2.0;
pub const HIRES_DENOISE: f64 = 0.7;

/// A job note when a request's hires upscaler is one we stand in for (a model upscaler such as
/// ESRGAN, a bicubic latent mode): which one drew instead.
pub fn hires_note(input: &GenerationInput) -> Option<String> {
    let name = input.hires.as_ref()?.upscaler.as_deref()?.trim();
    match HiresUpscaler::from_name(name) {
        (_, true) => None,
        (used, false) => Some(format!(
            "The hires upscaler '{name}' is not available here, so '{}' enlarged the picture.",
            used.name()
        )),
    }
}

/// The second pass for a `width` x `height` first pass (already checked): final size and, for a
/// final size of another shape, the size the picture is enlarged to before the cut, by A1111's
/// `hr_upscale_to_x` and `truncate_x` rules on the values as sent; the latents it works on make
/// every size a multiple of 8. `generate --hires-*` uses it too.
pub fn hires_fix(
    input: &HiresInput,
    width: usize,
    height: usize,
    steps: usize,
) -> Result<HiresFix, ComposeError> {
    let floor8 = |v: usize| v / 8 * 8;
    let scale = input.scale.unwrap_or(HIRES_SCALE);
    if !(scale.is_finite() && (1.0..=4.0).contains(&scale)) {
        return Err(invalid(
            format!("The hires scale must be between 1 and 4, got {scale}."),
            "2 doubles the width and height (A1111's default).",
        ));
    }
    let (rx, ry) = (input.width.unwrap_or(0), input.height.unwrap_or(0));
    let limit = ld_engine::pipeline::MAX_SIZE;
    if rx > limit || ry > limit {
        return Err(invalid(
            format!("The hires width and height must be at most {limit}, got {rx}x{ry}."),
            "Ask for a smaller final size, or a scale instead.",
        ));
    }
    let (up_x, up_y, target) = match (rx, ry) {
        (0, 0) => {
            let (x, y) = (
                (width as f64 * scale) as usize,
                (height as f64 * scale) as usize,
            );
            (x, y, None)
        }
        (x, 0) => (x, x * height / width, None),
        (0, y) => (y * width / height, y, None),
        (x, y) => {
            if (width as f64 / height as f64) < (x as f64 / y as f64) {
                (x, x * height / width, Some((x, y)))
            } else {
                (y * width / height, y, Some((x, y)))
            }
        }
    };
    // A1111 cuts (up - target) // 8 latent pixels off the enlarged latents (up // 8 of them).
    let (final_x, final_y) = match target {
        None => (floor8(up_x), floor8(up_y)),
        Some((x, y)) => (
            floor8(up_x) - floor8(up_x - x.min(up_x)),
            floor8(up_y) - floor8(up_y - y.min(up_y)),
        ),
    };
    let (up_x, up_y) = (floor8(up_x), floor8(up_y));
    let denoise = input.denoise.unwrap_or(HIRES_DENOISE);
    let upscaler = input
        .upscaler
        .as_deref()
        .map_or(HiresUpscaler::Latent, |n| HiresUpscaler::from_name(n).0);
    Ok(HiresFix {
        width: final_x,
        height: final_y,
        steps: input.steps.filter(|&s| s > 0).unwrap_or(steps),
        denoise,
        upscaler,
        cover: (final_x, final_y).ne(&(up_x, up_y)).then_some((up_x, up_y)),
        scale: (rx, ry).eq(&(0, 0)).then_some(scale),
    })
}

/// The LoRA and embedding files a prompt may name, and the VAE files the settings' "SD VAE" may.
#[derive(Debug, Clone, Default)]
pub struct Networks {
    pub loras: Vec<crate::models::NetworkFile>,
    pub embedding_dirs: Vec<std::path::PathBuf>,
    pub vaes: Vec<crate::vae::VaeFile>,
}

/// A request ready for the queue: the model and one engine request per image.
#[derive(Debug, Clone)]
pub struct ComposedJob {
    pub model: ModelInfo,
    /// The `<lora:...>` tags of the prompt, resolved to files (the worker merges them at load).
    pub loras: Vec<LoraSpec>,
    /// Folders of textual-inversion embeddings the prompt may use by name.
    pub embedding_dirs: Vec<std::path::PathBuf>,
    /// The SDXL refiner and where it takes over.
    pub refiner: Option<Refiner>,
    /// The settings' "SD VAE"; the worker resolves it against the model when the job runs
    /// ([`crate::vae::resolve`]), so a file removed meanwhile falls back with a note.
    pub vae: crate::vae::VaeChoice,
    /// One per image of the batch; seeds count up from the first, as in A1111.
    pub images: Vec<GenerateRequest>,
    pub preset: Option<String>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Refiner {
    pub name: String,
    pub path: std::path::PathBuf,
    /// 0..1: the fraction of the denoising the base model does.
    pub switch_at: f64,
}

/// Why a request cannot run; `message` and `hint` are for the user.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{message}")]
pub struct ComposeError {
    pub kind: ComposeErrorKind,
    pub message: String,
    pub hint: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ComposeErrorKind {
    Invalid,
    NoModel,
    UnknownModel,
    UnknownPreset,
}

fn invalid(message: impl Into<String>, hint: impl Into<String>) -> ComposeError {
    ComposeError {
        kind: ComposeErrorKind::Invalid,
        message: message.into(),
        hint: hint.into(),
    }
}

/// Builds the job. `presets` is every preset the user can pick (built-in and their own).
pub fn compose(
    input: &GenerationInput,
    settings: &Settings,
    presets: &[Preset],
    library: &[ModelInfo],
    networks: &Networks,
) -> Result<ComposedJob, ComposeError> {
    let preset = match input
        .preset
        .as_deref()
        .map(str::trim)
        .filter(|p| !p.is_empty())
    {
        None => None,
        Some(id) => Some(
            presets
                .iter()
                .find(|p| p.id.eq_ignore_ascii_case(id) || p.name.eq_ignore_ascii_case(id))
                .ok_or_else(|| ComposeError {
                    kind: ComposeErrorKind::UnknownPreset,
                    message: format!("There is no preset called '{id}'."),
                    hint: format!(
                        "Choose one of: {}.",
                        presets
                            .iter()
                            .map(|p| p.id.as_str())
                            .collect::<Vec<_>>()
                            .join(", ")
                    ),
                })?,
        ),
    };
    // "Quick" with no model named draws with an installed few-step model when there is one.
    let quick_model = (input.model.as_deref().is_none_or(|m| m.trim().is_empty())
        && preset.is_some_and(|p| p.id == "quick"))
    .then(|| library.iter().find(|m| m.fast && m.problem.is_none()))
    .flatten();
    let model = match quick_model {
        Some(m) => m,
        None => choose_model(input.model.as_deref(), settings, library)?,
    };
    // The caller's steps, CFG and sampler were meant for the model they would have drawn with
    // (the UI always sends its form's); the few-step model put in its place keeps its own
    // (found by review: 8 steps at CFG 5 with DPM++ 2M burned an LCM's pictures).
    let swapped;
    let input = if quick_model.is_some() {
        swapped = GenerationInput {
            steps: None,
            cfg_scale: None,
            sampler: None,
            schedule: None,
            ..input.clone()
        };
        &swapped
    } else {
        input
    };
    // A Turbo/LCM model needs its own few steps and low CFG: a preset's "30 steps, CFG 7" would
    // spoil its pictures, so for these only the caller's own values override the model's.
    let sampling_preset = preset.filter(|_| !model.fast);

    if input.prompt.chars().count() > MAX_PROMPT_CHARS {
        return Err(invalid(
            format!("The prompt is longer than {MAX_PROMPT_CHARS} characters."),
            "Shorten the prompt; the model only reads a few hundred words anyway.",
        ));
    }
    if let Some(n) = &input.negative_prompt {
        if n.chars().count() > MAX_PROMPT_CHARS {
            return Err(invalid(
                format!("The negative prompt is longer than {MAX_PROMPT_CHARS} characters."),
                "Shorten the negative prompt.",
            ));
        }
    }

    let defaults = model.defaults;
    let default_size = match model.family {
        Family::Sdxl => 1024,
        _ => 512,
    };
    let native = defaults.map_or(default_size, |d| d.width.min(d.height));
    let preset_size = preset
        .and_then(|p| p.width.zip(p.height))
        .map(|(w, h)| fit_to_model(w, h, native));
    let width = input
        .width
        .or(preset_size.map(|s| s.0))
        .or(defaults.map(|d| d.width))
        .unwrap_or(default_size);
    let height = input
        .height
        .or(preset_size.map(|s| s.1))
        .or(defaults.map(|d| d.height))
        .unwrap_or(default_size);
    let steps = input
        .steps
        .or(sampling_preset.and_then(|p| p.steps))
        .or(defaults.map(|d| d.steps))
        .unwrap_or(20);
    let cfg_scale = input
        .cfg_scale
        .or(sampling_preset.and_then(|p| p.cfg_scale))
        .or(defaults.map(|d| d.cfg_scale))
        .unwrap_or(7.0);

    // A sampler the caller names wins together with the schedule its fused name implies; the
    // preset's schedule only applies to the preset's own sampler.
    let model_sampler = match defaults {
        Some(d) if model.fast => (d.sampler, Some(d.schedule)),
        _ => (SamplerKind::DpmPp2M, Some(ScheduleKind::Karras)),
    };
    let (sampler, fused_schedule) = match input.sampler.as_deref().filter(|s| !s.trim().is_empty())
    {
        Some(name) => sampler_of(name)?,
        None => match sampling_preset.and_then(|p| p.sampler.as_deref()) {
            Some(name) => sampler_of(name)?,
            None => model_sampler,
        },
    };
    // As A1111 (`get_sampler_and_scheduler`): a schedule in the caller's sampler name ("DPM++ 2M
    // Karras") wins over the schedule field, which SillyTavern always sends ("normal" unless
    // changed) beside a sampler name it saved from an older A1111.
    let named_schedule = input
        .sampler
        .as_deref()
        .filter(|s| !s.trim().is_empty())
        .and(fused_schedule);
    let schedule = match (
        named_schedule,
        input.schedule.as_deref().filter(|s| !s.trim().is_empty()),
    ) {
        (Some(s), _) => s,
        (None, Some(name)) => schedule_of(name)?,
        (None, None) => match (
            fused_schedule,
            input.sampler.is_some(),
            sampling_preset.and_then(|p| p.schedule.as_deref()),
        ) {
            (Some(s), _, _) => s,
            (None, false, Some(name)) => schedule_of(name)?,
            (None, _, _) => ScheduleKind::Automatic,
        },
    };
    let seed_source = match input.seed_source.as_deref().filter(|s| !s.trim().is_empty()) {
        None => SeedSource::default(),
        Some(name) => SeedSource::from_name(name).ok_or_else(|| {
            invalid(
                format!("Unknown seed source '{name}'."),
                "Use 'cpu' (the default, as ComfyUI and diffusers) or 'nv' (as A1111 on NVIDIA GPUs).",
            )
        })?,
    };
    let batch = input.batch_size.unwrap_or(1);
    if !(1..=MAX_BATCH).contains(&batch) {
        return Err(invalid(
            format!("batch_size must be between 1 and {MAX_BATCH}, got {batch}."),
            "Ask for fewer images at a time.",
        ));
    }
    let first_seed = match input.seed {
        None | Some(-1) => rand::random::<u32>() as u64,
        Some(s) if s < 0 => {
            return Err(invalid(
                format!("seed must be -1 (random) or a number from 0 up, got {s}."),
                "Use -1 for a new random picture each time.",
            ))
        }
        Some(s) => s as u64,
    };

    let affixes = !input.ignore_affixes;
    let prompt = join_parts([
        if affixes {
            settings.prompt_prefix.as_str()
        } else {
            ""
        },
        if affixes {
            preset.map_or("", |p| p.prompt_prefix.as_str())
        } else {
            ""
        },
        input.prompt.as_str(),
        if affixes {
            preset.map_or("", |p| p.prompt_suffix.as_str())
        } else {
            ""
        },
        if affixes {
            settings.prompt_suffix.as_str()
        } else {
            ""
        },
    ]);
    let negative = join_terms(
        input
            .negative_prompt
            .as_deref()
            .unwrap_or(settings.negative_prompt.as_str()),
        preset.map_or("", |p| p.negative_prompt.as_str()),
    );

    let base = GenerateRequest {
        prompt,
        negative_prompt: negative,
        steps,
        cfg_scale,
        width,
        height,
        seed: first_seed,
        sampler,
        schedule,
        clip_skip: input.clip_skip.unwrap_or(settings.clip_skip.max(1)),
        seed_source,
        hires: None,
    };
    let checked = |r: ld_engine::Result<()>| {
        r.map_err(|e| {
            invalid(
                e.to_string()
                    .trim_start_matches("invalid request: ")
                    .to_owned()
                    + ".",
                "Change the value and try again.",
            )
        })
    };
    // The first pass's own fields first: the hires sizes divide by its width and height.
    checked(base.validate())?;
    let hires = match &input.hires {
        Some(h) => Some(hires_fix(h, width, height, steps)?),
        None => None,
    };
    if let Some(fix) = &hires {
        checked(fix.validate())?;
    }
    let base = GenerateRequest { hires, ..base };
    let loras = resolve_loras(&base.prompt, &networks.loras)?;
    let refiner = match input
        .refiner
        .as_deref()
        .map(str::trim)
        .filter(|r| !r.is_empty())
    {
        None => None,
        Some(name) => Some(resolve_refiner(name, input.refiner_switch, model, library)?),
    };
    if base.hires.is_some() && refiner.as_ref().is_some_and(|r| r.switch_at < 1.0) {
        return Err(invalid(
            "The hires fix and a refiner cannot be used together yet.",
            "Turn off the hires fix or the refiner.",
        ));
    }
    let images = (0..batch as u64)
        .map(|i| GenerateRequest {
            seed: first_seed.wrapping_add(i),
            ..base.clone()
        })
        .collect();
    Ok(ComposedJob {
        model: model.clone(),
        loras,
        embedding_dirs: networks.embedding_dirs.clone(),
        refiner,
        vae: crate::vae::choose(
            input
                .vae
                .as_deref()
                .filter(|v| !v.trim().is_empty())
                .unwrap_or(&settings.vae),
            &networks.vaes,
        ),
        images,
        preset: preset.map(|p| p.id.clone()),
    })
}

/// The refiner a request names: an SDXL refiner folder or single file, for an SDXL base model.
fn resolve_refiner(
    name: &str,
    switch: Option<f64>,
    model: &ModelInfo,
    library: &[ModelInfo],
) -> Result<Refiner, ComposeError> {
    use ld_engine::model_defaults::ModelFamily as F;
    // Folders and single files alike (`refiner` is set from the header for a file).
    let is_refiner =
        |m: &ModelInfo| m.refiner || m.defaults.is_some_and(|d| d.family == F::SdxlRefiner);
    let found = models::find(library, name).filter(|m| is_refiner(m));
    let Some(found) = found else {
        let refiners: Vec<&str> = library
            .iter()
            .filter(|m| is_refiner(m))
            .map(|m| m.name.as_str())
            .collect();
        return Err(invalid(
            format!("There is no SDXL refiner called '{name}'."),
            if refiners.is_empty() {
                "No refiner is installed; leave the refiner empty.".to_owned()
            } else {
                format!("Installed refiners: {}.", refiners.join(", "))
            },
        ));
    };
    if model.family != Family::Sdxl {
        return Err(invalid(
            format!(
                "A refiner works with SDXL models; '{}' is not one.",
                model.name
            ),
            "Choose an SDXL model, or leave the refiner empty.",
        ));
    }
    let switch_at = switch.unwrap_or(0.8);
    if !(0.0..=1.0).contains(&switch_at) {
        return Err(invalid(
            format!("refiner_switch must be between 0 and 1, got {switch_at}."),
            "0.8 lets the base model do 80% of the work, as A1111 does by default.",
        ));
    }
    Ok(Refiner {
        name: found.name.clone(),
        path: found.path.clone(),
        switch_at,
    })
}

/// The files behind the prompt's `<lora:NAME:w>` tags. An unknown name is an error that lists
/// the installed LoRAs: a LoRA silently left out gives a picture that looks wrong for no reason.
fn resolve_loras(
    prompt: &str,
    installed: &[crate::models::NetworkFile],
) -> Result<Vec<LoraSpec>, ComposeError> {
    let (tags, warnings) = ld_engine::prompt::extract_networks(prompt).loras();
    if let Some(w) = warnings.first() {
        return Err(invalid(
            format!("A LoRA tag in the prompt is not valid: {w}."),
            "Write LoRA tags as <lora:NAME:0.8>.",
        ));
    }
    let mut specs: Vec<LoraSpec> = Vec::new();
    for tag in tags {
        let file = installed
            .iter()
            .find(|f| f.name.eq_ignore_ascii_case(&tag.name))
            .ok_or_else(|| {
                invalid(
                    format!("There is no LoRA called '{}'.", tag.name),
                    if installed.is_empty() {
                        "No LoRAs are installed: put .safetensors LoRA files in the data folder's \
                         loras folder, or add your A1111/ComfyUI folder on the Models page."
                            .to_owned()
                    } else {
                        format!(
                            "Installed LoRAs: {}.",
                            installed
                                .iter()
                                .map(|f| f.name.as_str())
                                .collect::<Vec<_>>()
                                .join(", ")
                        )
                    },
                )
            })?;
        specs.push(LoraSpec {
            path: file.path.clone(),
            unet_weight: tag.unet_weight,
            text_encoder_weight: tag.text_encoder_weight,
        });
    }
    Ok(specs)
}

/// The model a request names, else the default from settings, else the first installed one.
pub fn choose_model<'a>(
    wanted: Option<&str>,
    settings: &Settings,
    library: &'a [ModelInfo],
) -> Result<&'a ModelInfo, ComposeError> {
    if library.is_empty() {
        return Err(ComposeError {
            kind: ComposeErrorKind::NoModel,
            message: "No model is installed yet.".into(),
            hint: "Open Models and install one, or add a folder that holds your models.".into(),
        });
    }
    let explicit = wanted.map(str::trim).filter(|w| !w.is_empty());
    if let Some(name) = explicit {
        let found = models::find(library, name);
        if let Some(problem) = found.and_then(|m| m.problem.as_ref()) {
            return Err(ComposeError {
                kind: ComposeErrorKind::Invalid,
                message: format!("The model '{name}' cannot draw: {problem}"),
                hint: "Choose another model in the model picker.".into(),
            });
        }
        return found.ok_or_else(|| ComposeError {
            kind: ComposeErrorKind::UnknownModel,
            message: format!("There is no model called '{name}'."),
            hint: format!(
                "Installed models: {}.",
                library
                    .iter()
                    .map(|m| m.name.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        });
    }
    // Only models that can draw are picked without being asked for.
    let usable = |m: &&ModelInfo| m.problem.is_none();
    settings
        .default_model
        .as_deref()
        .and_then(|d| models::find(library, d))
        .filter(usable)
        .or_else(|| library.iter().find(usable))
        .ok_or_else(|| ComposeError {
            kind: ComposeErrorKind::NoModel,
            message: "None of the installed models can draw.".into(),
            hint: "Open Models to see what is wrong with each, or install one from the catalog."
                .into(),
        })
}

fn sampler_of(name: &str) -> Result<(SamplerKind, Option<ScheduleKind>), ComposeError> {
    parse_sampler(name).map_err(|e| invalid(plain(e), "Pick a sampler from the list."))
}

fn schedule_of(name: &str) -> Result<ScheduleKind, ComposeError> {
    parse_schedule(name).map_err(|e| invalid(plain(e), "Pick a schedule from the list."))
}

fn plain(e: ld_engine::EngineError) -> String {
    e.to_string()
        .trim_start_matches("invalid request: ")
        .to_owned()
}

/// Joins the non-empty parts with ", ", the way A1111 users write prompt fragments.
/// A preset's size for a model that draws best at `native` pixels a side: kept when its area is
/// within 2.5x of the model's either way (a tall 512x1024 on SD 1.5 is a choice), else scaled
/// to the model's area with its shape kept, sides multiples of 8. The built-in presets are sized for SD 1.5 (Portrait 512x768), which SDXL
/// draws badly; a preset saved with an SDXL model would give SD 1.5 a 1024x1024 it repeats
/// things in (found by review).
fn fit_to_model(width: usize, height: usize, native: usize) -> (usize, usize) {
    let area = (width * height) as f64;
    let target = (native * native) as f64;
    if area <= 0.0 || (area / target).max(target / area) <= 2.5 {
        return (width, height);
    }
    let scale = (target / area).sqrt();
    let side = |n: usize| {
        let scaled = ((n as f64 * scale) / 8.0).round() as usize * 8;
        scaled.clamp(ld_engine::pipeline::MIN_SIZE, ld_engine::pipeline::MAX_SIZE)
    };
    (side(width), side(height))
}

/// [`join_parts`] for a negative prompt and a preset's, which often name the same terms (the
/// settings' default "lowres, blurry" and the preset's "lowres, blurry, deformed"): the first
/// is kept as written, and only the preset's terms it lacks are added. A preset part with
/// brackets or `BREAK` is added whole, since taking terms out of it would unbalance its weights.
fn join_terms(first: &str, preset: &str) -> String {
    let first = first.trim().trim_matches(',').trim();
    let seen: std::collections::HashSet<String> =
        first.split(',').map(|t| t.trim().to_lowercase()).collect();
    let preset = preset.trim().trim_matches(',').trim();
    let weighted = preset.contains(['(', ')', '[', ']']) || preset.contains("BREAK");
    let added = if weighted {
        preset.to_owned()
    } else {
        let mut own = std::collections::HashSet::new();
        preset
            .split(',')
            .map(str::trim)
            .filter(|t| !t.is_empty() && !seen.contains(&t.to_lowercase()))
            .filter(|t| own.insert(t.to_lowercase()))
            .collect::<Vec<_>>()
            .join(", ")
    };
    join_parts([first, added.as_str()])
}

fn join_parts<'a>(parts: impl IntoIterator<Item = &'a str>) -> String {
    parts
        .into_iter()
        .map(|p| p.trim().trim_matches(',').trim())
        .filter(|p| !p.is_empty())
        .collect::<Vec<_>>()
        .join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    fn library() -> Vec<ModelInfo> {
        ["alpha", "beta"]
            .iter()
            .map(|n| ModelInfo {
                name: (*n).to_owned(),
                family: Family::Sd1,
                path: PathBuf::from(n),
                size_bytes: 1,
                format: "diffusers",
                problem: None,
                managed: true,
                catalog_id: None,
                fast: false,
                refiner: false,
                sha256: None,
                short_hash: None,
                defaults: None,
                needs_vae: false,
            })
            .collect()
    }

    fn preset() -> Preset {
        Preset {
            id: "portrait".into(),
            name: "Portrait".into(),
            description: String::new(),
            builtin: true,
            width: Some(512),
            height: Some(768),
            steps: Some(30),
            cfg_scale: Some(6.0),
            sampler: Some("Euler a".into()),
            schedule: Some("Karras".into()),
            prompt_prefix: "portrait photo".into(),
            prompt_suffix: "soft light".into(),
            negative_prompt: "extra fingers".into(),
        }
    }

    fn settings() -> Settings {
        Settings {
            prompt_prefix: "masterpiece,".into(),
            prompt_suffix: "".into(),
            negative_prompt: "lowres".into(),
            ..Settings::default()
        }
    }

    fn input(prompt: &str) -> GenerationInput {
        GenerationInput {
            prompt: prompt.into(),
            seed: Some(7),
            ..Default::default()
        }
    }

    #[test]
    fn defaults_are_dpmpp_2m_karras_on_the_first_model() {
        let job = compose(
            &input("a cat"),
            &Settings::default(),
            &[],
            &library(),
            &Networks::default(),
        )
        .unwrap();
        let r = &job.images[0];
        assert_eq!(
            (r.sampler, r.schedule),
            (SamplerKind::DpmPp2M, ScheduleKind::Karras)
        );
        assert_eq!(
            (r.width, r.height, r.steps, r.cfg_scale),
            (512, 512, 20, 7.0)
        );
        assert_eq!(job.model.name, "alpha");
        assert_eq!(r.negative_prompt, Settings::default().negative_prompt);
    }

    #[test]
    fn preset_then_fields_then_affixes() {
        let mut i = input("a knight");
        i.preset = Some("Portrait".into());
        i.steps = Some(12);
        i.negative_prompt = Some("blurry".into());
        let job = compose(
            &i,
            &settings(),
            &[preset()],
            &library(),
            &Networks::default(),
        )
        .unwrap();
        let r = &job.images[0];
        assert_eq!(
            (r.width, r.height, r.steps, r.cfg_scale),
            (512, 768, 12, 6.0)
        );
        assert_eq!(
            r.prompt,
            "masterpiece, portrait photo, a knight, soft light"
        );
        assert_eq!(r.negative_prompt, "blurry, extra fingers");
        assert_eq!(r.sampler, SamplerKind::EulerA);
        assert_eq!(r.schedule, ScheduleKind::Karras);
        assert_eq!(job.preset.as_deref(), Some("portrait"));

        i.ignore_affixes = true;
        let job = compose(
            &i,
            &settings(),
            &[preset()],
            &library(),
            &Networks::default(),
        )
        .unwrap();
        assert_eq!(job.images[0].prompt, "a knight");
    }

    /// Found by review: the built-in presets' SD 1.5 sizes were used as they are on SDXL, and
    /// the negative prompt named the settings' and the preset's shared terms twice.
    #[test]
    fn preset_sizes_fit_the_model_and_negative_terms_come_once() {
        let mut lib = library();
        lib[0].family = Family::Sdxl;
        let mut i = input("a knight");
        i.preset = Some("portrait".into());
        let job = compose(&i, &settings(), &[preset()], &lib, &Networks::default()).unwrap();
        let r = &job.images[0];
        // 512x768 scaled to SDXL's megapixel, upright, sides multiples of 8.
        assert_eq!((r.width, r.height), (840, 1256));
        // A size the caller gives is theirs; near the model's area a preset's stays as it is.
        i.width = Some(512);
        let job = compose(&i, &settings(), &[preset()], &lib, &Networks::default()).unwrap();
        assert_eq!((job.images[0].width, job.images[0].height), (512, 1256));
        assert_eq!(fit_to_model(896, 1152, 1024), (896, 1152));
        assert_eq!(fit_to_model(1024, 1024, 512), (512, 512));

        let mut settings = settings();
        settings.negative_prompt = "lowres, Blurry, watermark".into();
        i.negative_prompt = None;
        let mut p = preset();
        p.negative_prompt = "blurry, extra fingers, watermark, text".into();
        let job = compose(&i, &settings, &[p], &lib, &Networks::default()).unwrap();
        assert_eq!(
            job.images[0].negative_prompt,
            "lowres, Blurry, watermark, extra fingers, text"
        );
        // The caller's own text stays as written, repeats and brackets included.
        let own = "(bad hands, missing fingers), (bad feet, missing fingers), text";
        assert_eq!(
            join_terms(own, "text, watermark"),
            format!("{own}, watermark")
        );
        assert_eq!(join_terms("", "(worst quality:1.4)"), "(worst quality:1.4)");
    }

    #[test]
    fn a_fused_sampler_name_brings_its_schedule_and_an_explicit_schedule_wins_over_a_bare_name() {
        let mut i = input("x");
        i.sampler = Some("DPM++ 2M Karras".into());
        let r = &compose(&i, &settings(), &[], &library(), &Networks::default())
            .unwrap()
            .images[0];
        assert_eq!(
            (r.sampler, r.schedule),
            (SamplerKind::DpmPp2M, ScheduleKind::Karras)
        );
        i.sampler = Some("Euler".into());
        let r = &compose(
            &i,
            &settings(),
            &[preset()],
            &library(),
            &Networks::default(),
        )
        .unwrap()
        .images[0];
        assert_eq!(
            r.schedule,
            ScheduleKind::Automatic,
            "a bare sampler means its own schedule"
        );
        i.schedule = Some("exponential".into());
        let r = &compose(&i, &settings(), &[], &library(), &Networks::default())
            .unwrap()
            .images[0];
        assert_eq!(r.schedule, ScheduleKind::Exponential);
        // The schedule in a fused name wins over the field, as in A1111: SillyTavern sends
        // "normal" beside a saved "DPM++ 2M Karras" (found by review).
        i.sampler = Some("DPM++ 2M Karras".into());
        i.schedule = Some("normal".into());
        let r = &compose(&i, &settings(), &[], &library(), &Networks::default())
            .unwrap()
            .images[0];
        assert_eq!(
            (r.sampler, r.schedule),
            (SamplerKind::DpmPp2M, ScheduleKind::Karras)
        );
    }

    fn turbo() -> ModelInfo {
        use ld_engine::model_defaults::{Distillation, ModelDefaults, ModelFamily};
        ModelInfo {
            name: "turbo".into(),
            fast: true,
            defaults: Some(ModelDefaults {
                family: ModelFamily::Sd2,
                distillation: Distillation::Turbo,
                steps: 1,
                cfg_scale: 1.0,
                sampler: SamplerKind::EulerA,
                schedule: ScheduleKind::Trailing,
                width: 512,
                height: 512,
            }),
            ..library()[0].clone()
        }
    }

    #[test]
    fn fast_models_keep_their_own_steps_cfg_and_sampler_unless_the_caller_sets_them() {
        let mut lib = library();
        lib.push(turbo());
        let mut i = input("a fox");
        i.model = Some("turbo".into());
        i.preset = Some("portrait".into());
        let r = &compose(&i, &settings(), &[preset()], &lib, &Networks::default())
            .unwrap()
            .images[0];
        assert_eq!(
            (r.steps, r.cfg_scale),
            (1, 1.0),
            "not the preset's 30 steps"
        );
        assert_eq!(
            (r.sampler, r.schedule),
            (SamplerKind::EulerA, ScheduleKind::Trailing)
        );
        assert_eq!(
            (r.width, r.height),
            (512, 768),
            "the preset's size still applies"
        );
        i.steps = Some(4);
        let r = &compose(&i, &settings(), &[preset()], &lib, &Networks::default())
            .unwrap()
            .images[0];
        assert_eq!(r.steps, 4);
    }

    #[test]
    fn the_quick_preset_picks_an_installed_fast_model() {
        let quick = Preset {
            id: "quick".into(),
            name: "Quick".into(),
            ..preset()
        };
        let mut lib = library();
        let mut i = input("x");
        i.preset = Some("quick".into());
        let job = compose(
            &i,
            &settings(),
            std::slice::from_ref(&quick),
            &lib,
            &Networks::default(),
        )
        .unwrap();
        assert_eq!(job.model.name, "alpha", "no fast model: the usual one");
        lib.push(turbo());
        let job = compose(
            &i,
            &settings(),
            std::slice::from_ref(&quick),
            &lib,
            &Networks::default(),
        )
        .unwrap();
        assert_eq!(job.model.name, "turbo");
        // The form's steps, CFG and sampler were for the usual model: the fast one keeps its
        // own (found by review).
        let mut form = i.clone();
        form.steps = Some(30);
        form.cfg_scale = Some(7.0);
        form.sampler = Some("DPM++ 2M".into());
        form.schedule = Some("Karras".into());
        let job = compose(
            &form,
            &settings(),
            std::slice::from_ref(&quick),
            &lib,
            &Networks::default(),
        )
        .unwrap();
        let (r, d) = (&job.images[0], turbo().defaults.unwrap());
        assert_eq!(job.model.name, "turbo");
        assert_eq!(
            (r.steps, r.cfg_scale, r.sampler),
            (d.steps, d.cfg_scale, d.sampler)
        );
        i.model = Some("beta".into());
        let job = compose(&i, &settings(), &[quick], &lib, &Networks::default()).unwrap();
        assert_eq!(job.model.name, "beta", "a named model wins");
    }

    #[test]
    fn models_with_a_problem_are_not_picked_and_explain_themselves() {
        let mut lib = library();
        lib[0].problem = Some("it is a refiner".into());
        let job = compose(&input("x"), &settings(), &[], &lib, &Networks::default()).unwrap();
        assert_eq!(job.model.name, "beta");
        let mut i = input("x");
        i.model = Some("alpha".into());
        let e = compose(&i, &settings(), &[], &lib, &Networks::default()).unwrap_err();
        assert!(e.message.contains("refiner"), "{e:?}");
    }

    #[test]
    fn clip_skip_comes_from_the_request_else_the_settings() {
        let mut s = settings();
        s.clip_skip = 2;
        let r = &compose(&input("x"), &s, &[], &library(), &Networks::default())
            .unwrap()
            .images[0];
        assert_eq!(r.clip_skip, 2);
        let i = GenerationInput {
            clip_skip: Some(1),
            ..input("x")
        };
        let r = &compose(&i, &s, &[], &library(), &Networks::default())
            .unwrap()
            .images[0];
        assert_eq!(r.clip_skip, 1);
    }

    #[test]
    fn the_hires_fix_follows_a1111s_sizes_and_defaults() {
        let hires = |h: HiresInput, w: usize, ht: usize| {
            let i = GenerationInput {
                width: Some(w),
                height: Some(ht),
                steps: Some(12),
                hires: Some(h),
                ..input("x")
            };
            compose(&i, &settings(), &[], &library(), &Networks::default())
                .map(|j| j.images[0].hires.clone().unwrap())
        };
        // Defaults: twice the size, as many steps, 0.7, Latent.
        let f = hires(HiresInput::default(), 512, 768).unwrap();
        assert_eq!((f.width, f.height, f.steps), (1024, 1536, 12));
        assert_eq!(
            (f.denoise, f.upscaler, f.cover),
            (0.7, HiresUpscaler::Latent, None)
        );
        // A scale that does not land on multiples of 8 is floored: int(512 * 1.3) = 665 -> 664.
        let f = hires(
            HiresInput {
                scale: Some(1.3),
                steps: Some(5),
                denoise: Some(0.4),
                upscaler: Some("Lanczos".into()),
                ..Default::default()
            },
            512,
            512,
        )
        .unwrap();
        assert_eq!((f.width, f.height, f.steps, f.denoise), (664, 664, 5, 0.4));
        assert_eq!(f.upscaler, HiresUpscaler::Lanczos);
        // One side given keeps the shape; both of another shape cover, then cut.
        let f = hires(
            HiresInput {
                width: Some(1000),
                ..Default::default()
            },
            512,
            768,
        )
        .unwrap();
        assert_eq!((f.width, f.height, f.cover), (1000, 1496, None));
        let f = hires(
            HiresInput {
                width: Some(1024),
                height: Some(1024),
                ..Default::default()
            },
            512,
            768,
        )
        .unwrap();
        assert_eq!(
            (f.width, f.height, f.cover),
            (1024, 1024, Some((1024, 1536)))
        );
        // A1111 cuts whole latent pixels off the enlarged picture: (1024 - 1004) // 8 = 2 of 128,
        // so 1008 wide, not 1004 floored to 1000.
        let f = hires(
            HiresInput {
                width: Some(1004),
                height: Some(1024),
                ..Default::default()
            },
            512,
            512,
        )
        .unwrap();
        assert_eq!(
            (f.width, f.height, f.cover),
            (1008, 1024, Some((1024, 1024)))
        );
        assert_eq!(
            f.scale, None,
            "a size, not a factor, for the parameters text"
        );
        // A first-pass size of 0 is its own error, before any hires arithmetic.
        let e = hires(
            HiresInput {
                width: Some(128),
                ..Default::default()
            },
            0,
            64,
        )
        .unwrap_err();
        assert!(e.message.contains("width must be"), "{}", e.message);
        // Out of range: a clear error naming the field.
        for bad in [
            HiresInput {
                scale: Some(8.0),
                ..Default::default()
            },
            HiresInput {
                denoise: Some(1.5),
                ..Default::default()
            },
            HiresInput {
                denoise: Some(1e-12),
                ..Default::default()
            },
            HiresInput {
                width: Some(usize::MAX / 2),
                height: Some(3),
                ..Default::default()
            },
        ] {
            let e = hires(bad, 512, 512).unwrap_err();
            assert_eq!(e.kind, ComposeErrorKind::Invalid, "{e}");
        }
        let e = hires(HiresInput::default(), 1536, 1536).unwrap_err();
        assert!(e.message.contains("hires width"), "{}", e.message);
    }

    #[test]
    fn stand_in_upscalers_are_named_in_a_note() {
        let with = |name: &str| GenerationInput {
            hires: Some(HiresInput {
                upscaler: Some(name.into()),
                ..Default::default()
            }),
            ..input("x")
        };
        assert_eq!(hires_note(&with("Latent (nearest-exact)")), None);
        assert_eq!(hires_note(&input("x")), None);
        let note = hires_note(&with("R-ESRGAN 4x+")).unwrap();
        assert!(
            note.contains("'R-ESRGAN 4x+'") && note.contains("'Lanczos'"),
            "{note}"
        );
    }

    #[test]
    fn batches_count_seeds_up_and_random_seeds_are_u32() {
        let mut i = input("x");
        i.batch_size = Some(3);
        let seeds: Vec<u64> = compose(&i, &settings(), &[], &library(), &Networks::default())
            .unwrap()
            .images
            .iter()
            .map(|r| r.seed)
            .collect();
        assert_eq!(seeds, [7, 8, 9]);
        i.seed = Some(-1);
        let r = &compose(&i, &settings(), &[], &library(), &Networks::default())
            .unwrap()
            .images[0];
        assert!(r.seed <= u32::MAX as u64);
    }

    #[test]
    fn models_are_chosen_by_name_default_or_first_and_errors_list_them() {
        let mut s = settings();
        s.default_model = Some("beta".into());
        assert_eq!(
            compose(&input("x"), &s, &[], &library(), &Networks::default())
                .unwrap()
                .model
                .name,
            "beta"
        );
        let mut i = input("x");
        i.model = Some("ALPHA".into());
        assert_eq!(
            compose(&i, &s, &[], &library(), &Networks::default())
                .unwrap()
                .model
                .name,
            "alpha"
        );
        i.model = Some("gamma".into());
        let e = compose(&i, &s, &[], &library(), &Networks::default()).unwrap_err();
        assert_eq!(e.kind, ComposeErrorKind::UnknownModel);
        assert!(e.hint.contains("alpha, beta"), "{}", e.hint);
        let e = compose(&input("x"), &s, &[], &[], &Networks::default()).unwrap_err();
        assert_eq!(e.kind, ComposeErrorKind::NoModel);
    }

    #[test]
    fn limits() {
        let bad = [
            GenerationInput {
                batch_size: Some(0),
                ..input("x")
            },
            GenerationInput {
                batch_size: Some(9),
                ..input("x")
            },
            GenerationInput {
                width: Some(513),
                ..input("x")
            },
            GenerationInput {
                steps: Some(151),
                ..input("x")
            },
            GenerationInput {
                seed: Some(-2),
                ..input("x")
            },
            GenerationInput {
                seed_source: Some("gpu".into()),
                ..input("x")
            },
            input(&"x".repeat(MAX_PROMPT_CHARS + 1)),
        ];
        for i in bad {
            let e = compose(&i, &settings(), &[], &library(), &Networks::default()).unwrap_err();
            assert_eq!(e.kind, ComposeErrorKind::Invalid, "{i:?}");
            assert!(!e.message.is_empty() && !e.hint.is_empty());
        }
        let e = compose(
            &GenerationInput {
                preset: Some("nope".into()),
                ..input("x")
            },
            &settings(),
            &[preset()],
            &library(),
            &Networks::default(),
        )
        .unwrap_err();
        assert_eq!(e.kind, ComposeErrorKind::UnknownPreset);
        assert!(e.hint.contains("portrait"));
    }

    #[test]
    fn the_settings_vae_goes_with_every_job() {
        use crate::vae::{VaeChoice, VaeFile};
        let file = VaeFile {
            name: "kl-f8-anime2.safetensors".into(),
            path: PathBuf::from("/vae/kl-f8-anime2.safetensors"),
            size_bytes: 1,
            family: None,
        };
        let nets = Networks {
            vaes: vec![file.clone()],
            ..Networks::default()
        };
        let vae_of = |setting: &str| {
            let s = Settings {
                vae: setting.into(),
                ..settings()
            };
            compose(&input("x"), &s, &[], &library(), &nets)
                .unwrap()
                .vae
        };
        assert_eq!(vae_of("Automatic"), VaeChoice::Automatic);
        assert_eq!(vae_of("None"), VaeChoice::ModelOwn);
        assert_eq!(vae_of("kl-f8-anime2.safetensors"), VaeChoice::File(file));
        // A file gone since it was chosen: the job still runs (the worker falls back and notes it).
        assert_eq!(
            vae_of("gone.safetensors"),
            VaeChoice::Missing("gone.safetensors".into())
        );
    }

    #[test]
    fn lora_tags_resolve_to_files_and_unknown_names_are_errors() {
        let nets = Networks {
            loras: vec![crate::models::NetworkFile {
                name: "Pastel".into(),
                path: PathBuf::from("/loras/Pastel.safetensors"),
                size_bytes: 1,
            }],
            embedding_dirs: vec![PathBuf::from("/emb")],
            vaes: Vec::new(),
        };
        let job = compose(
            &input("a cat <lora:pastel:0.6> <lora:Pastel:0.5:0.9>"),
            &settings(),
            &[],
            &library(),
            &nets,
        )
        .unwrap();
        let got: Vec<_> = job
            .loras
            .iter()
            .map(|l| (l.path.clone(), l.text_encoder_weight, l.unet_weight))
            .collect();
        let p = PathBuf::from("/loras/Pastel.safetensors");
        assert_eq!(got, [(p.clone(), 0.6, 0.6), (p, 0.5, 0.9)]);
        assert_eq!(job.embedding_dirs, [PathBuf::from("/emb")]);
        let e = compose(
            &input("<lora:missing:1>"),
            &settings(),
            &[],
            &library(),
            &nets,
        )
        .unwrap_err();
        assert_eq!(e.kind, ComposeErrorKind::Invalid);
        assert!(
            e.message.contains("missing") && e.hint.contains("Pastel"),
            "{e:?}"
        );
        let e = compose(
            &input("<lora:missing:1>"),
            &settings(),
            &[],
            &library(),
            &Networks::default(),
        )
        .unwrap_err();
        assert!(e.hint.contains("loras folder"), "{}", e.hint);
    }
}
