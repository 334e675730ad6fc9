//! Per-model generation defaults: the family's native size, and for distilled fast models (SD-Turbo
//! / SDXL-Turbo, LCM, SDXL-Lightning, Hyper-SD, and community merges of them) the few steps, low or no guidance and the sampler and
//! timesteps they were distilled for. Read from the model's own configs and name, so the service
//! can fill a request before the user overrides any field. A full LCM (a UNet with
//! `time_cond_proj_dim`) is told by its UNet config alone: its guidance scale is a model input.

use std::path::Path;

use crate::config::{ModelFolder, ModelIndex, PredictionType, SchedulerConfig, TimestepSpacing};
use crate::pipeline::{GenerateRequest, Pipeline};
use crate::sampler::SamplerKind;
use crate::schedule::ScheduleKind;
use crate::unet::UNetConfig;
use crate::vae::VaeConfig;
use crate::Result;

/// Which architecture a model folder holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ModelFamily {
    Sd1,
    Sd2,
    Sdxl,
    /// An SDXL refiner folder (not generated from on its own).
    SdxlRefiner,
}

/// How the model was distilled, which decides its sampling settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Distillation {
    /// A regular model: 20-30 steps with guidance.
    None,
    /// Adversarial diffusion distillation (SD-Turbo, SDXL-Turbo): 1-4 steps, no guidance.
    Turbo,
    /// Latent consistency model (or an LCM-LoRA merge): 2-8 steps with the LCM sampler. A full
    /// LCM whose UNet embeds the guidance scale (`time_cond_proj_dim`, see
    /// [`UNetConfig::guidance_embedded`]) takes guidance ~8 as an input, without CFG.
    Lcm,
    /// SDXL-Lightning: 2-8 steps, Euler on trailing timesteps, no guidance.
    Lightning,
    /// Hyper-SD: 1-8 steps on trailing timesteps, no guidance.
    Hyper,
}

/// Settings a request for this model should start from; every field may be overridden.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ModelDefaults {
    pub family: ModelFamily,
    pub distillation: Distillation,
    pub steps: usize,
    pub cfg_scale: f64,
    pub sampler: SamplerKind,
    pub schedule: ScheduleKind,
    pub width: usize,
    pub height: usize,
}

impl ModelDefaults {
    /// Reads a diffusers folder's configs (no weights) and decides. The folder name counts too
    /// ("sdxl-turbo", "lcm-...", "...lightning-4step"); for a Hugging Face cache path
    /// (`models--org--name/snapshots/<hash>`) the repository name is used.
    pub fn detect(dir: &Path) -> Result<Self> {
        let folder = ModelFolder::open(dir)?;
        let index = folder.model_index()?;
        let scheduler = folder.scheduler_config()?;
        let unet = UNetConfig::from_file(&folder.config_file("unet")?)?;
        let vae = match folder.config_file("vae") {
            Ok(p) => VaeConfig::from_file(&p)?,
            // Every SD-family VAE downsamples by 8, as this one does.
            Err(_) => sd_vae(),
        };
        Ok(Self::from_configs(
            &model_name(dir),
            &index,
            &scheduler,
            &unet,
            &vae,
        ))
    }

    /// The decision from parsed configs and a model name (case ignored).
    pub fn from_configs(
        name: &str,
        index: &ModelIndex,
        scheduler: &SchedulerConfig,
        unet: &UNetConfig,
        vae: &VaeConfig,
    ) -> Self {
        Self::decide(name, family(index, unet), scheduler, unet, vae)
    }

    /// For a model without `model_index.json` or scheduler config (a single-file checkpoint):
    /// the family from the UNet, fast variants from the name only.
    pub fn for_unet(
        name: &str,
        unet: &UNetConfig,
        prediction: PredictionType,
        vae: &VaeConfig,
    ) -> Self {
        let scheduler = SchedulerConfig {
            prediction_type: prediction,
            ..SchedulerConfig::default()
        };
        Self::decide(name, family_of_unet(unet), &scheduler, unet, vae)
    }

    /// For a single-file checkpoint, from what its header tells ([`crate::checkpoint::inspect`]:
    /// family, prediction type) and the embedded configs of its family, fast variants from the
    /// name. `None` when the family is unknown.
    pub fn for_checkpoint(name: &str, info: &crate::checkpoint::CheckpointInfo) -> Option<Self> {
        use crate::checkpoint::{ModelFamily as F, Prediction};
        let prediction = match info.prediction {
            Some(Prediction::VPrediction) => PredictionType::VPrediction,
            _ => PredictionType::Epsilon,
        };
        let family = info.family?;
        let (unet, vae) = match family {
            F::Sd1 | F::Sd2 => {
                let mut c = crate::single_file::family_configs(family).ok()?;
                // The embedded SD2 config is 2.1's 768-v; SD 2.x base (epsilon) draws at 512.
                if family == F::Sd2 && prediction == PredictionType::Epsilon {
                    c.unet.sample_size = Some(64);
                }
                (c.unet, c.vae)
            }
            F::SdxlBase | F::SdxlRefiner => {
                let c = crate::single_file::sdxl_configs(family == F::SdxlRefiner).ok()?;
                (c.unet, c.vae)
            }
        };
        let mut d = Self::for_unet(name, &unet, prediction, &vae);
        // The refiner's UNet has added conditions like the base's; the header tells them apart.
        if family == F::SdxlRefiner {
            d.family = ModelFamily::SdxlRefiner;
        }
        Some(d)
    }

    fn decide(
        name: &str,
        family: ModelFamily,
        scheduler: &SchedulerConfig,
        unet: &UNetConfig,
        vae: &VaeConfig,
    ) -> Self {
        // A UNet that takes the guidance scale as an input was distilled for LCM, whatever its
        // name and scheduler say (LCM_Dreamshaper_v7, lcm-sdxl).
        let distillation = if unet.guidance_embedded() {
            Distillation::Lcm
        } else {
            distillation(name, scheduler)
        };
        let native = unet
            .sample_size
            .map(|s| s * vae.downsampling_factor())
            .unwrap_or(match family {
                ModelFamily::Sd1 => 512,
                ModelFamily::Sd2 if scheduler.prediction_type == PredictionType::VPrediction => 768,
                ModelFamily::Sd2 => 512,
                ModelFamily::Sdxl | ModelFamily::SdxlRefiner => 1024,
            });
        let native = native.clamp(crate::pipeline::MIN_SIZE, crate::pipeline::MAX_SIZE);
        // A community "Turbo", "Lightning" or "Hyper" merge (DreamShaper XL Turbo, RealVisXL
        // Lightning, Juggernaut Hyper) is a full model with some distillation merged in, at its
        // base's size: their makers ask for 4-8 steps at CFG 1-2 with DPM++ SDE Karras.
        // SDXL-Turbo's own 1 step at 512 blurs and shrinks them; the 30 steps at CFG 5 of a
        // regular model burn them (found by review).
        let merge = is_community_merge(distillation, name, scheduler);
        // SDXL-Turbo and SD-Turbo were distilled at 512x512 (model cards).
        let size = if distillation == Distillation::Turbo && !merge {
            native.min(512)
        } else {
            native
        };
        let (steps, cfg_scale, sampler, schedule) = match distillation {
            _ if merge => (6, 2.0, SamplerKind::DpmPpSde, ScheduleKind::Karras),
            // Model cards: "a single step", guidance_scale 0.0 (off, our 1); diffusers ships
            // them with EulerAncestralDiscreteScheduler on trailing timesteps.
            Distillation::Turbo => (1, 1.0, SamplerKind::EulerA, ScheduleKind::Trailing),
            // Full LCMs: the LCM_Dreamshaper_v7 and lcm-sdxl cards' 4 steps at guidance 8 (the
            // embedded guidance; CFG stays off). LCM-LoRA merges: the diffusers LCM-LoRA docs'
            // 4 steps, guidance 1 (off). Both on LCM's own timesteps.
            Distillation::Lcm => (
                4,
                if unet.guidance_embedded() { 8.0 } else { 1.0 },
                SamplerKind::Lcm,
                ScheduleKind::Automatic,
            ),
            // ByteDance/SDXL-Lightning card: Euler, "trailing" timesteps, guidance 0.
            Distillation::Lightning => (
                lightning_steps(name).unwrap_or(4),
                1.0,
                SamplerKind::Euler,
                ScheduleKind::Trailing,
            ),
            // ByteDance/Hyper-SD card: its N-step models on trailing timesteps (DDIM, which
            // Euler equals without noise), guidance 0; the name tells N.
            Distillation::Hyper => (
                lightning_steps(name).unwrap_or(8),
                1.0,
                SamplerKind::Euler,
                ScheduleKind::Trailing,
            ),
            // SDXL: diffusers' guidance 5.0 default; 30 steps of DPM++ 2M Karras is the usual
            // community setting (diffusers' 50 is slow on a CPU). SD1/SD2: A1111's 20 x CFG 7.
            Distillation::None => match family {
                ModelFamily::Sdxl | ModelFamily::SdxlRefiner => {
                    (30, 5.0, SamplerKind::DpmPp2M, ScheduleKind::Automatic)
                }
                _ => (20, 7.0, SamplerKind::DpmPp2M, ScheduleKind::Automatic),
            },
        };
        Self {
            family,
            distillation,
            steps,
            cfg_scale,
            sampler,
            schedule,
            width: size,
            height: size,
        }
    }

    /// Whether this is a few-step model (the "Quick" preset's choice when installed).
    pub fn is_fast(&self) -> bool {
        self.distillation != Distillation::None
    }

    /// A request with these defaults and [`GenerateRequest::default`]'s other fields; override
    /// what the user set with struct update syntax.
    pub fn request(&self) -> GenerateRequest {
        GenerateRequest {
            steps: self.steps,
            cfg_scale: self.cfg_scale,
            sampler: self.sampler,
            schedule: self.schedule,
            width: self.width,
            height: self.height,
            ..GenerateRequest::default()
        }
    }
}

/// SD1.5's VAE config (factor 8), for folders without one.
fn sd_vae() -> VaeConfig {
    VaeConfig::from_json(crate::bench::SD15_VAE_CONFIG).expect("embedded config parses")
}

fn family(index: &ModelIndex, unet: &UNetConfig) -> ModelFamily {
    match index.class_name.as_str() {
        "StableDiffusionXLPipeline" => return ModelFamily::Sdxl,
        "StableDiffusionXLImg2ImgPipeline" if !index.has_component("text_encoder") => {
            return ModelFamily::SdxlRefiner
        }
        "StableDiffusionXLImg2ImgPipeline" => return ModelFamily::Sdxl,
        _ => {}
    }
    family_of_unet(unet)
}

fn family_of_unet(unet: &UNetConfig) -> ModelFamily {
    if unet.needs_added_conditions() {
        ModelFamily::Sdxl
    } else if unet.context_dim() == 1024 {
        // 1024: OpenCLIP ViT-H, SD2's text encoder width.
        ModelFamily::Sd2
    } else {
        ModelFamily::Sd1
    }
}

fn distillation(name: &str, scheduler: &SchedulerConfig) -> Distillation {
    let name = name.to_ascii_lowercase();
    let class = scheduler.class_name.as_deref().unwrap_or("");
    if class == "LCMScheduler" || has_word(&name, "lcm") {
        Distillation::Lcm
    } else if name.contains("lightning") {
        Distillation::Lightning
    } else if has_hyper(&name) {
        Distillation::Hyper
    } else if name.contains("turbo")
        // stabilityai/sd-turbo and sdxl-turbo ship exactly this scheduler config.
        || (class == "EulerAncestralDiscreteScheduler"
            && scheduler.timestep_spacing == TimestepSpacing::Trailing)
    {
        Distillation::Turbo
    } else {
        Distillation::None
    }
}

/// Whether a model taken for Turbo, Lightning or Hyper by its name is a community merge rather
/// than the original: Stability AI's SD-Turbo and SDXL-Turbo ("sd-turbo", "sdxl-turbo",
/// "sd_xl_turbo_1.0_fp16", or their scheduler config: trailing Euler ancestral, which a single
/// file does not carry) and ByteDance's SDXL-Lightning and Hyper-SD name the model exactly.
fn is_community_merge(distillation: Distillation, name: &str, scheduler: &SchedulerConfig) -> bool {
    let squeezed: String = name
        .to_ascii_lowercase()
        .chars()
        .filter(|c| c.is_ascii_alphanumeric())
        .collect();
    match distillation {
        Distillation::Turbo => {
            let official_config = scheduler.class_name.as_deref()
                == Some("EulerAncestralDiscreteScheduler")
                && scheduler.timestep_spacing == TimestepSpacing::Trailing;
            let official_name = squeezed.contains("sdxlturbo") || squeezed.contains("sdturbo");
            !official_config && !official_name
        }
        // ByteDance's files: "sdxl_lightning_4step_unet", "ByteDance/SDXL-Lightning".
        Distillation::Lightning => {
            !squeezed.contains("sdxllightning") && !squeezed.contains("bytedance")
        }
        // "Hyper-SDXL-1step-Unet", "ByteDance/Hyper-SD".
        Distillation::Hyper => !squeezed.contains("hypersd") && !squeezed.contains("bytedance"),
        Distillation::None | Distillation::Lcm => false,
    }
}

/// "Hyper" as a marker of Hyper-SD ("Hyper-SDXL-8steps", "juggernautXL_juggXIByRundiffusionHyper",
/// "RealVisXL_V5.0_Hyper"), not the start of "HyperRealism" or "hyperdetailed", which name
/// regular models.
fn has_hyper(lower: &str) -> bool {
    lower.match_indices("hyper").any(|(at, _)| {
        let rest: String = lower[at + 5..]
            .chars()
            .take_while(char::is_ascii_alphabetic)
            .collect();
        !["real", "detail", "ion", "net"]
            .iter()
            .any(|w| rest.starts_with(w))
    })
}

/// `lcm` as its own word ("lcm-lora-sdxl", "LCM_Dreamshaper"), not inside another one.
fn has_word(name: &str, word: &str) -> bool {
    name.split(|c: char| !c.is_ascii_alphanumeric())
        .any(|w| w == word)
}

/// "sdxl_lightning_4step" -> 4.
fn lightning_steps(name: &str) -> Option<usize> {
    let name = name.to_ascii_lowercase();
    let at = name.find("step")?;
    let digits: String = name[..at]
        .chars()
        .rev()
        .take_while(|c| c.is_ascii_digit())
        .collect::<Vec<_>>()
        .into_iter()
        .rev()
        .collect();
    digits.parse().ok().filter(|n| (1..=8).contains(n))
}

/// The name a model folder is known by: its own name, or for a Hugging Face cache snapshot the
/// repository's (`models--stabilityai--sdxl-turbo`).
pub fn model_name(dir: &Path) -> String {
    let parts: Vec<String> = dir
        .components()
        .map(|c| c.as_os_str().to_string_lossy().into_owned())
        .collect();
    if let Some(i) = parts.iter().rposition(|p| p == "snapshots") {
        if i > 0 {
            return parts[i - 1].clone();
        }
    }
    parts.last().cloned().unwrap_or_default()
}

impl Pipeline {
    /// This model's generation defaults (see [`ModelDefaults`]).
    pub fn defaults(&self) -> &ModelDefaults {
        &self.defaults
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn index(class: &str) -> ModelIndex {
        serde_json::from_str(&format!(
            r#"{{"_class_name": "{class}", "text_encoder": ["transformers", "CLIPTextModel"]}}"#
        ))
        .unwrap()
    }

    #[test]
    fn words_and_steps_from_names() {
        assert!(has_word("lcm-lora-sdxl", "lcm"));
        assert!(!has_word("alcmodel", "lcm"));
        assert_eq!(lightning_steps("sdxl_lightning_2step_unet"), Some(2));
        assert_eq!(lightning_steps("sdxl-lightning"), None);
        assert_eq!(
            model_name(Path::new(
                "/c/models--stabilityai--sdxl-turbo/snapshots/abc"
            )),
            "models--stabilityai--sdxl-turbo"
        );
    }

    #[test]
    fn community_fast_merges_keep_their_size_and_take_a_few_steps() {
        // Found by review: "DreamShaper XL Turbo" was given SDXL-Turbo's 1 step at 512.
        let unet = UNetConfig::from_json(
            r#"{"sample_size": 128, "cross_attention_dim": 2048, "addition_embed_type": "text_time"}"#,
        )
        .unwrap();
        let d = |name: &str| {
            ModelDefaults::from_configs(
                name,
                &index("StableDiffusionXLPipeline"),
                &SchedulerConfig::default(),
                &unet,
                &sd_vae(),
            )
        };
        for merge in ["dreamshaperXL_v21TurboDPMSDE", "RealVisXL_V4.0_Turbo"] {
            let m = d(merge);
            assert_eq!(m.distillation, Distillation::Turbo, "{merge}");
            assert!(m.is_fast());
            assert_eq!(
                (m.steps, m.cfg_scale, m.sampler, m.schedule, m.width),
                (6, 2.0, SamplerKind::DpmPpSde, ScheduleKind::Karras, 1024),
                "{merge}"
            );
        }
        // Lightning and Hyper merges alike; ByteDance's own models keep their few unguided steps.
        for merge in [
            "juggernautXL_v9Rdphoto2Lightning",
            "RealVisXL_V4.0_Lightning",
            "juggernautXL_juggXIByRundiffusionHyper",
            "RealVisXL_V5.0_Hyper",
        ] {
            let m = d(merge);
            assert!(m.is_fast(), "{merge}");
            assert_eq!(
                (m.steps, m.cfg_scale, m.sampler, m.schedule, m.width),
                (6, 2.0, SamplerKind::DpmPpSde, ScheduleKind::Karras, 1024),
                "{merge}"
            );
        }
        for (official, steps) in [("sdxl_lightning_4step_unet", 4), ("Hyper-SDXL-8steps", 8)] {
            let o = d(official);
            assert_eq!(
                (o.steps, o.cfg_scale, o.sampler, o.schedule, o.width),
                (steps, 1.0, SamplerKind::Euler, ScheduleKind::Trailing, 1024),
                "{official}"
            );
        }
        // Regular models whose names start with "hyper".
        for regular in ["hyperRealism_v30", "HyperDetailedXL", "epicHyperrealistic"] {
            assert_eq!(d(regular).distillation, Distillation::None, "{regular}");
        }
        for official in [
            "sd_xl_turbo_1.0_fp16",
            "models--stabilityai--sdxl-turbo",
            "sd-turbo",
        ] {
            let o = d(official);
            assert_eq!(
                (o.steps, o.cfg_scale, o.sampler, o.width),
                (1, 1.0, SamplerKind::EulerA, 512),
                "{official}"
            );
        }
    }

    #[test]
    fn sd15_gets_a1111_defaults() {
        let d = ModelDefaults::from_configs(
            "v1-5",
            &index("StableDiffusionPipeline"),
            &SchedulerConfig::default(),
            &UNetConfig::from_json(r#"{"sample_size": 64, "cross_attention_dim": 768}"#).unwrap(),
            &sd_vae(),
        );
        assert_eq!(d.family, ModelFamily::Sd1);
        assert_eq!((d.steps, d.cfg_scale, d.width), (20, 7.0, 512));
        assert!(!d.is_fast());
    }

    #[test]
    fn guidance_embedded_unet_is_a_full_lcm_whatever_the_name() {
        // SimianLuo/LCM_Dreamshaper_v7's unet config has time_cond_proj_dim 256; a neutral
        // name and a PNDM scheduler config must not hide it.
        let unet = UNetConfig::from_json(
            r#"{"sample_size": 96, "cross_attention_dim": 768, "time_cond_proj_dim": 256}"#,
        )
        .unwrap();
        let d = ModelDefaults::from_configs(
            "dreamshaper",
            &index("StableDiffusionPipeline"),
            &SchedulerConfig::default(),
            &unet,
            &sd_vae(),
        );
        assert_eq!(d.family, ModelFamily::Sd1);
        assert_eq!(d.distillation, Distillation::Lcm);
        assert_eq!(
            (d.steps, d.cfg_scale, d.sampler, d.schedule, d.width),
            (4, 8.0, SamplerKind::Lcm, ScheduleKind::Automatic, 768)
        );
        // Same for a single-file checkpoint whose config folder says so.
        let d = ModelDefaults::for_unet("x", &unet, PredictionType::Epsilon, &sd_vae());
        assert_eq!((d.distillation, d.cfg_scale), (Distillation::Lcm, 8.0));
        // An LCM-LoRA merge (plain UNet, LCMScheduler) keeps guidance 1.
        let lora = ModelDefaults::from_configs(
            "merged",
            &index("StableDiffusionPipeline"),
            &serde_json::from_str(r#"{"_class_name": "LCMScheduler"}"#).unwrap(),
            &UNetConfig::from_json(r#"{"cross_attention_dim": 768}"#).unwrap(),
            &sd_vae(),
        );
        assert_eq!(
            (lora.distillation, lora.cfg_scale),
            (Distillation::Lcm, 1.0)
        );
    }
}
