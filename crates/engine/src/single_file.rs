//! Loading SD1/SD2 single-file checkpoints (original LDM names) and separate VAE files into our
//! model code: the architecture comes from embedded SD 1.5 / SD 2.1 configs (or a diffusers
//! folder's configs, like diffusers' `from_single_file(config=...)`), the weights through
//! [`crate::ldm_names`]'s renaming `VarBuilder` over the memory-mapped file.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_nn::VarBuilder;

use crate::checkpoint::{
    self, CheckpointKind, ModelFamily, Prediction, VaeLayout, LDM_CLIP_PREFIX,
    LDM_OPEN_CLIP_PREFIX, LDM_UNET_PREFIX,
};
use crate::clip::{ClipConfig, ClipTextModel, TextEncoder};
use crate::config::{ModelFolder, PredictionType, SchedulerConfig};
use crate::ldm_names::{self, ClipNames, OpenClipNames, UnetNames, VaeNames};
use crate::pipeline::LoadOptions;
use crate::schedule::NoiseSchedule;
use crate::tokenizer::ClipTokenizer;
use crate::unet::{UNet2DConditionModel, UNetConfig};
use crate::vae::{AutoencoderKL, VaeConfig};
use crate::weights::Weights;
use crate::{EngineError, Result};

pub(crate) const SD15_UNET: &str = include_str!("../assets/sd15/unet.json");
const SD15_VAE: &str = include_str!("../assets/sd15/vae.json");
const SD15_TEXT: &str = include_str!("../assets/sd15/text_encoder.json");
const SD15_SCHEDULER: &str = include_str!("../assets/sd15/scheduler.json");
const SD15_TOKENIZER: &str = include_str!("../assets/sd15/tokenizer_config.json");
const SD21_UNET: &str = include_str!("../assets/sd21/unet.json");
const SD21_VAE: &str = include_str!("../assets/sd21/vae.json");
const SD21_TEXT: &str = include_str!("../assets/sd21/text_encoder.json");
const SD21_SCHEDULER: &str = include_str!("../assets/sd21/scheduler.json");
const SD21_TOKENIZER: &str = include_str!("../assets/sd21/tokenizer_config.json");
/// The CLIP BPE files (gzip; see `assets/README.md` for where they come from).
const CLIP_VOCAB_GZ: &[u8] = include_bytes!("../assets/clip/vocab.json.gz");
const CLIP_MERGES_GZ: &[u8] = include_bytes!("../assets/clip/merges.txt.gz");

/// A model to load: a diffusers folder or a single checkpoint file, with optional overrides.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ModelSource {
    /// A diffusers folder (with `model_index.json`) or a `.safetensors` checkpoint.
    pub path: PathBuf,
    /// For a single file: a diffusers folder whose configs (and tokenizer) describe the
    /// architecture, instead of the embedded SD 1.5 / SD 2.1 ones.
    pub config: Option<PathBuf>,
    /// A separate VAE `.safetensors` file (LDM or diffusers names) used instead of the model's.
    pub vae: Option<PathBuf>,
}

impl ModelSource {
    pub fn new(path: impl Into<PathBuf>) -> Self {
        Self {
            path: path.into(),
            ..Self::default()
        }
    }
}

/// The embedded configs of a family.
#[derive(Debug, Clone)]
pub struct FamilyConfigs {
    pub unet: UNetConfig,
    pub vae: VaeConfig,
    pub text_encoder: ClipConfig,
    pub scheduler: SchedulerConfig,
}

/// SD 1.5's or SD 2.1's diffusers configs (embedded). SDXL has none here yet.
pub fn family_configs(family: ModelFamily) -> Result<FamilyConfigs> {
    let (unet, vae, text, scheduler) = match family {
        ModelFamily::Sd1 => (SD15_UNET, SD15_VAE, SD15_TEXT, SD15_SCHEDULER),
        ModelFamily::Sd2 => (SD21_UNET, SD21_VAE, SD21_TEXT, SD21_SCHEDULER),
        other => {
            return Err(EngineError::InvalidRequest(format!(
                "{other:?} checkpoints cannot be loaded yet"
            )))
        }
    };
    // The assets are ours and covered by tests; a parse failure here is a build defect.
    let bad = |what: &str, e: String| EngineError::Config {
        path: PathBuf::from(format!("<embedded {family:?} {what} config>")),
        message: e,
    };
    Ok(FamilyConfigs {
        unet: UNetConfig::from_json(unet).map_err(|e| bad("unet", e.to_string()))?,
        vae: VaeConfig::from_json(vae).map_err(|e| bad("vae", e.to_string()))?,
        text_encoder: serde_json::from_str(text).map_err(|e| bad("text_encoder", e.to_string()))?,
        scheduler: serde_json::from_str(scheduler).map_err(|e| bad("scheduler", e.to_string()))?,
    })
}

/// What [`load`] builds; `Pipeline::load_source` puts it together.
#[derive(Debug)]
pub struct LoadedParts {
    pub text_encoder: TextEncoder,
    pub unet: UNet2DConditionModel,
    pub vae: AutoencoderKL,
    pub schedule: NoiseSchedule,
    pub prediction: PredictionType,
    /// The files the VAE came from (to reload it elsewhere, see [`vae_var_builder`]).
    pub vae_files: Vec<PathBuf>,
}

/// Loads an SD1/SD2 single-file checkpoint. `config` is an optional diffusers folder whose
/// configs and tokenizer describe the architecture; `vae` an optional separate VAE file.
pub fn load(
    path: &Path,
    config: Option<&Path>,
    vae: Option<&Path>,
    opts: &LoadOptions,
) -> Result<LoadedParts> {
    if crate::pickle::is_pickle_path(path) {
        return Err(EngineError::PickleRefused {
            path: path.to_path_buf(),
        });
    }
    let info = checkpoint::inspect(path)?;
    let refuse = |message: String| EngineError::Weights {
        path: path.to_path_buf(),
        message,
    };
    match info.kind {
        CheckpointKind::Checkpoint => {}
        CheckpointKind::Vae => {
            return Err(refuse(
                "this is a VAE file, not a whole model; choose it as the model's VAE".into(),
            ))
        }
        CheckpointKind::Lora => {
            return Err(refuse(
                "this is a LoRA, not a whole model; add it to a prompt as <lora:name:1>".into(),
            ))
        }
        CheckpointKind::TextualInversion => {
            return Err(refuse(
                "this is a textual-inversion embedding, not a whole model; put it in the embeddings folder".into(),
            ))
        }
        CheckpointKind::Unknown => {
            return Err(refuse(
                "no Stable Diffusion model found in it (no `model.diffusion_model.*` tensors)"
                    .into(),
            ))
        }
    }
    let family = match info.family {
        Some(f @ (ModelFamily::Sd1 | ModelFamily::Sd2)) => f,
        _ => {
            return Err(refuse(info.note.clone().unwrap_or_else(|| {
                "this checkpoint's model family is not supported".into()
            })))
        }
    };
    if info.inpainting || !info.has_unet || !info.has_text_encoder {
        return Err(refuse(info.note.clone().unwrap_or_default()));
    }
    if !info.has_vae && vae.is_none() {
        return Err(refuse(
            "the checkpoint has no VAE inside (`first_stage_model.*`); choose a separate VAE file"
                .into(),
        ));
    }

    let (unet_cfg, vae_cfg, clip_cfg, mut scheduler, tokenizer) = match config {
        Some(dir) => {
            let folder = ModelFolder::open(dir)?;
            (
                UNetConfig::from_file(&folder.config_file("unet")?)?,
                VaeConfig::from_file(&folder.config_file("vae")?)?,
                ClipConfig::from_file(folder.config_file("text_encoder")?)?,
                folder.scheduler_config()?,
                ClipTokenizer::from_dir(folder.component_dir("tokenizer")?)?,
            )
        }
        None => {
            let c = family_configs(family)?;
            (
                c.unet,
                c.vae,
                c.text_encoder,
                c.scheduler,
                embedded_tokenizer(family)?,
            )
        }
    };
    if unet_cfg.needs_added_conditions() {
        return Err(EngineError::InvalidRequest(
            "the config describes an SDXL-type UNet; SDXL needs the SDXL pipeline".into(),
        ));
    }
    // Without a config folder, what the file says about its prediction type (a marker tensor or
    // SAI model-spec metadata) beats the family default; a config folder is the user's word.
    if config.is_none() {
        match info.prediction {
            Some(Prediction::Epsilon) => scheduler.prediction_type = PredictionType::Epsilon,
            Some(Prediction::VPrediction) => {
                scheduler.prediction_type = PredictionType::VPrediction
            }
            None => {}
        }
    }
    let schedule = NoiseSchedule::from_config(&scheduler)?;
    let weights = Weights::open(path)?;

    let text_names: Arc<dyn ldm_names::NameMap> = match family {
        ModelFamily::Sd1 => Arc::new(ClipNames::new(LDM_CLIP_PREFIX)),
        _ => Arc::new(OpenClipNames::new(LDM_OPEN_CLIP_PREFIX, false)),
    };
    let model = ClipTextModel::load(
        ldm_names::var_builder(&weights, text_names, opts.dtype, &opts.device)?,
        &clip_cfg,
    )?;
    let text_encoder = TextEncoder::new(tokenizer, model)?;

    let unet_names = Arc::new(UnetNames::new(&unet_cfg, LDM_UNET_PREFIX));
    let unet = UNet2DConditionModel::load(
        ldm_names::var_builder(&weights, unet_names, opts.dtype, &opts.device)?,
        &unet_cfg,
    )?;

    let vae_files = vec![vae.unwrap_or(path).to_path_buf()];
    let vae = AutoencoderKL::load(
        vae_var_builder(&vae_files, &vae_cfg, opts.dtype, &opts.device)?,
        &vae_cfg,
    )?;
    Ok(LoadedParts {
        text_encoder,
        unet,
        vae,
        schedule,
        prediction: scheduler.prediction_type,
        vae_files,
    })
}

/// A `VarBuilder` for a VAE stored in `files`: a diffusers component (one or more shards), a
/// VAE-only file in LDM or diffusers names, or a whole checkpoint's `first_stage_model.*`.
pub fn vae_var_builder(
    files: &[PathBuf],
    cfg: &VaeConfig,
    dtype: candle_core::DType,
    device: &candle_core::Device,
) -> Result<VarBuilder<'static>> {
    for f in files {
        if crate::pickle::is_pickle_path(f) {
            return Err(EngineError::PickleRefused { path: f.clone() });
        }
    }
    let weights = Weights::open_all(files)?;
    if files.len() > 1 {
        // Shards only come from diffusers folders.
        return weights.var_builder(dtype, device);
    }
    match checkpoint::vae_layout(|n| weights.contains(n)) {
        Some(("", VaeLayout::Diffusers)) => weights.var_builder(dtype, device),
        Some((prefix, VaeLayout::Diffusers)) => Ok(weights
            .var_builder(dtype, device)?
            .pp(prefix.trim_end_matches('.'))),
        Some((prefix, VaeLayout::Ldm)) => ldm_names::var_builder(
            &weights,
            Arc::new(VaeNames::new(cfg.block_out_channels.len(), prefix)),
            dtype,
            device,
        ),
        None => Err(EngineError::Weights {
            path: files[0].clone(),
            message: "no VAE found in this file (neither LDM `encoder.down.*`/`decoder.up.*` \
                      nor diffusers `encoder.down_blocks.*` names); choose a VAE file"
                .into(),
        }),
    }
}

/// Loads a separate VAE file for a model whose VAE config is `cfg`.
pub fn load_vae_file(
    path: &Path,
    cfg: &VaeConfig,
    opts: &LoadOptions,
) -> Result<(AutoencoderKL, Vec<PathBuf>)> {
    let info = checkpoint::inspect(path)?;
    if !info.has_vae {
        return Err(EngineError::Weights {
            path: path.to_path_buf(),
            message: format!(
                "this is not a VAE file (it looks like a {:?} file)",
                info.kind
            ),
        });
    }
    let files = vec![path.to_path_buf()];
    let vae = AutoencoderKL::load(vae_var_builder(&files, cfg, opts.dtype, &opts.device)?, cfg)?;
    Ok((vae, files))
}

/// The CLIP tokenizer for a family, from the embedded files. `ClipTokenizer` reads only from a
/// folder, so they are written to a fresh private temporary folder (created with `create_dir`,
/// which fails rather than reuse a folder someone else made) and removed after reading.
pub fn embedded_tokenizer(family: ModelFamily) -> Result<ClipTokenizer> {
    let config = match family {
        ModelFamily::Sd2 => SD21_TOKENIZER,
        _ => SD15_TOKENIZER,
    };
    let dir = private_temp_dir()?;
    let result = (|| {
        let write = |name: &str, bytes: &[u8]| {
            let path = dir.join(name);
            std::fs::write(&path, bytes).map_err(|e| EngineError::Io { path, source: e })
        };
        write("vocab.json", &gunzip(CLIP_VOCAB_GZ)?)?;
        write("merges.txt", &gunzip(CLIP_MERGES_GZ)?)?;
        write("tokenizer_config.json", config.as_bytes())?;
        ClipTokenizer::from_dir(&dir)
    })();
    let _ = std::fs::remove_dir_all(&dir);
    result
}

fn gunzip(bytes: &[u8]) -> Result<Vec<u8>> {
    let mut out = Vec::new();
    flate2::read::GzDecoder::new(bytes)
        .read_to_end(&mut out)
        .map_err(|e| EngineError::Tokenizer(format!("embedded tokenizer files: {e}")))?;
    Ok(out)
}

fn private_temp_dir() -> Result<PathBuf> {
    use std::sync::atomic::{AtomicU64, Ordering};
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let base = std::env::temp_dir();
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    for _ in 0..16 {
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let dir = base.join(format!(
            "ld-engine-tokenizer-{}-{nanos}-{n}",
            std::process::id()
        ));
        match std::fs::create_dir(&dir) {
            Ok(()) => return Ok(dir),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
            Err(e) => {
                return Err(EngineError::Io {
                    path: dir,
                    source: e,
                })
            }
        }
    }
    Err(EngineError::Io {
        path: base,
        source: std::io::Error::other("could not create a private temporary folder"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn embedded_configs_parse_and_validate() {
        for family in [ModelFamily::Sd1, ModelFamily::Sd2] {
            let c = family_configs(family).unwrap();
            c.unet.validate().unwrap();
            c.vae.validate().unwrap();
            c.text_encoder.validate().unwrap();
            NoiseSchedule::from_config(&c.scheduler).unwrap();
        }
        let sd1 = family_configs(ModelFamily::Sd1).unwrap();
        assert_eq!(sd1.text_encoder, ClipConfig::clip_vit_l_14());
        assert_eq!(sd1.unet.context_dim(), 768);
        assert_eq!(sd1.scheduler.prediction_type, PredictionType::Epsilon);
        let sd2 = family_configs(ModelFamily::Sd2).unwrap();
        assert_eq!(sd2.text_encoder, ClipConfig::open_clip_vit_h_14());
        assert_eq!(sd2.unet.context_dim(), 1024);
        assert_eq!(sd2.scheduler.prediction_type, PredictionType::VPrediction);
        assert!(family_configs(ModelFamily::SdxlBase).is_err());
    }

    #[test]
    fn embedded_tokenizer_is_clip() {
        let t = embedded_tokenizer(ModelFamily::Sd1).unwrap();
        // tests/fixtures/README.md: "a photo of a cat" -> [49406, 320, 1125, 539, 320, 2368, 49407].
        assert_eq!(
            t.encode("a photo of a cat").unwrap()[..7],
            [49406, 320, 1125, 539, 320, 2368, 49407]
        );
        assert_eq!(t.pad_id(), 49407);
        assert_eq!(embedded_tokenizer(ModelFamily::Sd2).unwrap().pad_id(), 0);
    }
}
