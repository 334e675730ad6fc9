//! Loading single-file checkpoints (original LDM names: SD1, SD2, SDXL base and refiner) and
//! separate VAE files into our model code: the architecture comes from embedded SD 1.5 / SD 2.1 /
//! SDXL 1.0 configs (or a diffusers folder's configs, like diffusers'
//! `from_single_file(config=...)`), the weights through [`crate::ldm_names`]'s renaming
//! `VarBuilder` over the memory-mapped file, with LoRAs merged as they load. A file is opened
//! first (`SdCheckpoint`, `SdxlCheckpoint`: checked, configs read, no weights) and its
//! models are then loaded one by one: all at once for a [`Pipeline`](crate::pipeline::Pipeline)
//! ([`load`], [`load_sdxl`]), one at a time for a staged run ([`crate::pipeline::staged`]).

use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_nn::VarBuilder;

use crate::checkpoint::{
    self, CheckpointInfo, CheckpointKind, ModelFamily, Prediction, VaeLayout, LDM_CLIP_PREFIX,
    LDM_OPEN_CLIP_PREFIX, LDM_UNET_PREFIX, SDXL_EMBEDDER_0, SDXL_EMBEDDER_1, SGM_CLIP_PREFIX,
    SGM_OPEN_CLIP_PREFIX,
};
use crate::clip::{ClipConfig, ClipTextModel, TextEncoder};
use crate::config::{ModelFolder, PredictionType, SchedulerConfig};
use crate::ldm_names::{self, ClipNames, MappedNames, NameMap, OpenClipNames, UnetNames, VaeNames};
use crate::lora::{LoraSet, LoraTarget};
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
const SDXL_UNET: &str = include_str!("../assets/sdxl-base/unet.json");
const SDXL_VAE: &str = include_str!("../assets/sdxl-base/vae.json");
const SDXL_TEXT: &str = include_str!("../assets/sdxl-base/text_encoder.json");
const SDXL_TEXT_2: &str = include_str!("../assets/sdxl-base/text_encoder_2.json");
const SDXL_SCHEDULER: &str = include_str!("../assets/sdxl-base/scheduler.json");
const SDXL_TOKENIZER: &str = include_str!("../assets/sdxl-base/tokenizer_config.json");
const SDXL_TOKENIZER_2: &str = include_str!("../assets/sdxl-base/tokenizer_2_config.json");
/// The refiner's own UNet; its VAE, OpenCLIP-bigG, tokenizer and scheduler configs are the
/// base's (the same values in stabilityai/stable-diffusion-xl-refiner-1.0).
const SDXL_REFINER_UNET: &str = include_str!("../assets/sdxl-refiner/unet.json");
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

    /// [`Self::new`] with the VAE file A1111 uses beside a checkpoint, when there is one
    /// ([`sibling_vae`]): how users give a checkpoint without a VAE inside its VAE, and how they
    /// pick another VAE for one model.
    pub fn with_sibling_vae(path: impl Into<PathBuf>) -> Self {
        let path = path.into();
        Self {
            vae: sibling_vae(&path),
            path,
            ..Self::default()
        }
    }
}

/// The name [`sibling_vae`] looks for beside `path`.
pub fn sibling_vae_name(path: &Path) -> String {
    let stem = path.file_stem().map(|s| s.to_string_lossy().into_owned());
    format!(
        "{}.vae.safetensors",
        stem.unwrap_or_else(|| "<name>".into())
    )
}

/// `<name>.vae.safetensors` beside the checkpoint file `<name>.safetensors`, if it exists:
/// A1111's convention ("Automatic" VAE), which ComfyUI users know too. Never a pickle (`.vae.pt`):
/// those are not opened.
pub fn sibling_vae(path: &Path) -> Option<PathBuf> {
    if !path.is_file() {
        return None;
    }
    let stem = path.file_stem()?.to_str()?;
    let vae = path.with_file_name(format!("{stem}.vae.safetensors"));
    vae.is_file().then_some(vae)
}

/// The embedded configs of a family.
#[derive(Debug, Clone)]
pub struct FamilyConfigs {
    pub unet: UNetConfig,
    pub vae: VaeConfig,
    pub text_encoder: ClipConfig,
    pub scheduler: SchedulerConfig,
}

/// SD 1.5's or SD 2.1's diffusers configs (embedded); SDXL's are [`sdxl_configs`].
pub fn family_configs(family: ModelFamily) -> Result<FamilyConfigs> {
    let (unet, vae, text, scheduler) = match family {
        ModelFamily::Sd1 => (SD15_UNET, SD15_VAE, SD15_TEXT, SD15_SCHEDULER),
        ModelFamily::Sd2 => (SD21_UNET, SD21_VAE, SD21_TEXT, SD21_SCHEDULER),
        other => {
            return Err(EngineError::InvalidRequest(format!(
                "{other:?} checkpoints have two text encoders; see sdxl_configs"
            )))
        }
    };
    let bad = embedded_error(family);
    Ok(FamilyConfigs {
        unet: UNetConfig::from_json(unet).map_err(|e| bad("unet", e.to_string()))?,
        vae: VaeConfig::from_json(vae).map_err(|e| bad("vae", e.to_string()))?,
        text_encoder: serde_json::from_str(text).map_err(|e| bad("text_encoder", e.to_string()))?,
        scheduler: serde_json::from_str(scheduler).map_err(|e| bad("scheduler", e.to_string()))?,
    })
}

// The assets are ours and covered by tests; a parse failure here is a build defect.
fn embedded_error(family: ModelFamily) -> impl Fn(&str, String) -> EngineError {
    move |what: &str, e: String| EngineError::Config {
        path: PathBuf::from(format!("<embedded {family:?} {what} config>")),
        message: e,
    }
}

/// The configs of an SDXL base or refiner (`StableDiffusionXLPipeline` /
/// `StableDiffusionXLImg2ImgPipeline`), embedded or from a diffusers folder.
#[derive(Debug, Clone)]
pub struct SdxlConfigs {
    pub unet: UNetConfig,
    pub vae: VaeConfig,
    /// CLIP-L; `None` for a refiner, which has only the second encoder.
    pub text_encoder: Option<ClipConfig>,
    /// OpenCLIP-bigG with its projection.
    pub text_encoder_2: ClipConfig,
    pub scheduler: SchedulerConfig,
    /// `model_index.json`: an empty negative prompt is zero conditioning (base: true).
    pub force_zeros_for_empty_prompt: bool,
    /// `model_index.json` `requires_aesthetics_score` (refiner: true): time ids carry an
    /// aesthetic score instead of the target size.
    pub requires_aesthetics_score: bool,
}

/// stabilityai/stable-diffusion-xl-base-1.0's configs, or -refiner-1.0's (`refiner`).
pub fn sdxl_configs(refiner: bool) -> Result<SdxlConfigs> {
    let family = if refiner {
        ModelFamily::SdxlRefiner
    } else {
        ModelFamily::SdxlBase
    };
    let bad = embedded_error(family);
    let unet = if refiner {
        SDXL_REFINER_UNET
    } else {
        SDXL_UNET
    };
    Ok(SdxlConfigs {
        unet: UNetConfig::from_json(unet).map_err(|e| bad("unet", e.to_string()))?,
        vae: VaeConfig::from_json(SDXL_VAE).map_err(|e| bad("vae", e.to_string()))?,
        text_encoder: if refiner {
            None
        } else {
            Some(serde_json::from_str(SDXL_TEXT).map_err(|e| bad("text_encoder", e.to_string()))?)
        },
        text_encoder_2: serde_json::from_str(SDXL_TEXT_2)
            .map_err(|e| bad("text_encoder_2", e.to_string()))?,
        scheduler: serde_json::from_str(SDXL_SCHEDULER)
            .map_err(|e| bad("scheduler", e.to_string()))?,
        // model_index.json of the two repositories.
        force_zeros_for_empty_prompt: !refiner,
        requires_aesthetics_score: refiner,
    })
}

/// [`SdxlConfigs`] from a diffusers folder (`from_single_file(config=...)`).
fn sdxl_folder_configs(dir: &Path, refiner: bool) -> Result<(SdxlConfigs, SdxlTokenizers)> {
    let folder = ModelFolder::open(dir)?;
    let index = folder.model_index()?;
    let index_path = dir.join("model_index.json");
    let raw: serde_json::Value = crate::config::read_json(&index_path)?;
    let aesthetic = raw
        .get("requires_aesthetics_score")
        .and_then(|v| v.as_bool())
        .unwrap_or(false);
    let te = |c: &str| ClipConfig::from_file(folder.config_file(c)?);
    let configs = SdxlConfigs {
        unet: UNetConfig::from_file(&folder.config_file("unet")?)?,
        // The refiner folder's VAE is SDXL's; a folder without one gets the embedded config.
        vae: match folder.config_file("vae") {
            Ok(p) => VaeConfig::from_file(&p)?,
            Err(_) => sdxl_configs(refiner)?.vae,
        },
        text_encoder: if refiner {
            None
        } else {
            Some(te("text_encoder")?)
        },
        text_encoder_2: te("text_encoder_2")?,
        scheduler: folder.scheduler_config()?,
        force_zeros_for_empty_prompt: index.force_zeros_for_empty_prompt.unwrap_or(!refiner),
        requires_aesthetics_score: aesthetic,
    };
    let tokenizers = SdxlTokenizers {
        first: if refiner {
            None
        } else {
            Some(ClipTokenizer::from_dir(folder.component_dir("tokenizer")?)?)
        },
        second: ClipTokenizer::from_dir(folder.component_dir("tokenizer_2")?)?,
    };
    Ok((configs, tokenizers))
}

/// An SDXL file's tokenizers: CLIP-L's (none for a refiner) and OpenCLIP-bigG's.
#[derive(Debug)]
struct SdxlTokenizers {
    first: Option<ClipTokenizer>,
    second: ClipTokenizer,
}

/// What [`load_sdxl`] builds for `Pipeline::load_source`. (A refiner file loads through
/// [`crate::refiner`], one model at a time.)
#[derive(Debug)]
pub struct SdxlLoadedParts {
    /// CLIP-L.
    pub text_encoder: TextEncoder,
    /// OpenCLIP-bigG, with `text_projection`.
    pub encoder_2: TextEncoder,
    pub unet: UNet2DConditionModel,
    pub vae: AutoencoderKL,
    pub vae_files: Vec<PathBuf>,
    pub vae_config: VaeConfig,
    pub schedule: NoiseSchedule,
    pub prediction: PredictionType,
    pub force_zeros_for_empty_prompt: bool,
}

/// Loads an SDXL base single-file checkpoint, with `loras` merged into the UNet and text
/// encoders. `config` is an optional diffusers folder describing it; `vae` an optional separate
/// VAE file. A refiner file is refused before anything loads, with what to do instead.
pub fn load_sdxl(
    path: &Path,
    config: Option<&Path>,
    vae: Option<&Path>,
    opts: &LoadOptions,
    loras: &mut LoraSet,
) -> Result<SdxlLoadedParts> {
    let file = SdxlCheckpoint::open(path, config, vae)?;
    if file.refiner {
        return Err(refiner_cannot_draw(path));
    }
    let weights = file.file.weights()?;
    let text_encoder = file.load_text_encoder(&weights, opts, loras)?;
    let encoder_2 = file.load_encoder_2(&weights, opts, loras)?;
    let unet = file.load_unet(&weights, opts, loras)?;
    let vae = file.load_vae(opts)?;
    Ok(SdxlLoadedParts {
        text_encoder,
        encoder_2,
        unet,
        vae,
        vae_files: file.file.vae_files,
        prediction: file.configs.scheduler.prediction_type,
        force_zeros_for_empty_prompt: file.configs.force_zeros_for_empty_prompt,
        vae_config: file.configs.vae,
        schedule: file.file.schedule,
    })
}

/// What an opened checkpoint of either kind ([`SdCheckpoint`], [`SdxlCheckpoint`]) knows of
/// the file beyond its configs.
#[derive(Debug)]
pub(crate) struct CheckpointFile {
    path: PathBuf,
    schedule: NoiseSchedule,
    /// The VAE's file: the separate one, else the checkpoint itself.
    vae_files: Vec<PathBuf>,
}

impl CheckpointFile {
    fn new(path: &Path, vae: Option<&Path>, scheduler: &SchedulerConfig) -> Result<Self> {
        Ok(Self {
            path: path.to_path_buf(),
            schedule: NoiseSchedule::from_config(scheduler)?,
            vae_files: vec![vae.unwrap_or(path).to_path_buf()],
        })
    }

    /// The noise schedule of the configs' scheduler, with the file's prediction type.
    pub(crate) fn schedule(&self) -> &NoiseSchedule {
        &self.schedule
    }

    pub(crate) fn vae_files(&self) -> &[PathBuf] {
        &self.vae_files
    }

    /// The memory-mapped file, for the model loaders (no weights are read yet).
    pub(crate) fn weights(&self) -> Result<Weights> {
        Weights::open(&self.path)
    }
}

/// An SDXL base or refiner single-file checkpoint, opened: the file checked, its configs and
/// tokenizers read, the file's prediction type applied; no weights loaded. [`load_sdxl`] loads
/// all its models at once; the staged pipeline ([`crate::pipeline::staged`]) loads them one at
/// a time through the same loaders, so both draw with the same models.
#[derive(Debug)]
pub(crate) struct SdxlCheckpoint {
    file: CheckpointFile,
    /// A refiner file (`conditioner.embedders.0` is OpenCLIP-bigG).
    refiner: bool,
    /// `scheduler.prediction_type` is the one the model is sampled with.
    configs: SdxlConfigs,
    tokenizers: SdxlTokenizers,
}

impl SdxlCheckpoint {
    /// Checks the file (an SDXL checkpoint, with a VAE inside or beside it for a base) and reads
    /// the configs and tokenizers: `config`'s, else the embedded SDXL 1.0 ones.
    pub(crate) fn open(path: &Path, config: Option<&Path>, vae: Option<&Path>) -> Result<Self> {
        let info = check_checkpoint(path)?;
        let refiner = match info.family {
            Some(ModelFamily::SdxlBase) => false,
            Some(ModelFamily::SdxlRefiner) => true,
            other => {
                return Err(EngineError::InvalidRequest(format!(
                    "{} is not an SDXL checkpoint ({other:?})",
                    path.display()
                )))
            }
        };
        if !refiner && !info.has_vae && vae.is_none() {
            return Err(no_vae(path));
        }
        let (mut configs, tokenizers) = match config {
            Some(dir) => sdxl_folder_configs(dir, refiner)?,
            None => (
                sdxl_configs(refiner)?,
                SdxlTokenizers {
                    first: if refiner {
                        None
                    } else {
                        Some(embedded_tokenizer(ModelFamily::SdxlBase)?)
                    },
                    second: embedded_tokenizer(ModelFamily::SdxlRefiner)?,
                },
            ),
        };
        if !configs.unet.needs_added_conditions() {
            return Err(EngineError::InvalidRequest(
                "the config describes an SD1/SD2-type UNet, not SDXL's".into(),
            ));
        }
        // v-prediction SDXL fine-tunes say so in the file.
        apply_file_prediction(&mut configs.scheduler, &info, config.is_some());
        Ok(Self {
            file: CheckpointFile::new(path, vae, &configs.scheduler)?,
            refiner,
            configs,
            tokenizers,
        })
    }

    pub(crate) fn configs(&self) -> &SdxlConfigs {
        &self.configs
    }

    /// A refiner file (`conditioner.embedders.0` is OpenCLIP-bigG).
    pub(crate) fn is_refiner(&self) -> bool {
        self.refiner
    }

    /// The file itself: its schedule, VAE files and weights for the loaders below.
    pub(crate) fn file(&self) -> &CheckpointFile {
        &self.file
    }

    /// CLIP-L (`conditioner.embedders.0`) with its tokenizer and the LoRAs' `TextEncoder`
    /// modules merged; a refiner has none.
    pub(crate) fn load_text_encoder(
        &self,
        weights: &Weights,
        opts: &LoadOptions,
        loras: &mut LoraSet,
    ) -> Result<TextEncoder> {
        let (Some(clip_cfg), Some(tokenizer)) =
            (&self.configs.text_encoder, &self.tokenizers.first)
        else {
            return Err(EngineError::InvalidRequest(format!(
                "{} is an SDXL refiner: it has no CLIP-L text encoder",
                self.file.path.display()
            )));
        };
        let prefix = format!("{SDXL_EMBEDDER_0}transformer.");
        let names: Arc<dyn NameMap> = Arc::new(ClipNames::new(&prefix));
        let model = load_clip(
            weights,
            names,
            &prefix,
            clip_cfg,
            LoraTarget::TextEncoder,
            opts,
            loras,
        )?;
        TextEncoder::new(tokenizer.clone(), model)
    }

    /// OpenCLIP-bigG with its projection (the pooled text), its tokenizer and the LoRAs'
    /// `TextEncoder2` modules merged: the base's second embedder, the refiner's only one.
    pub(crate) fn load_encoder_2(
        &self,
        weights: &Weights,
        opts: &LoadOptions,
        loras: &mut LoraSet,
    ) -> Result<TextEncoder> {
        let embedder = if self.refiner {
            SDXL_EMBEDDER_0
        } else {
            SDXL_EMBEDDER_1
        };
        let prefix = format!("{embedder}model.");
        let linear = weights.contains(&format!("{prefix}text_projection.weight"));
        let names: Arc<dyn NameMap> =
            Arc::new(OpenClipNames::new(&prefix, true).projection_stored_as_linear(linear));
        let model = load_clip(
            weights,
            names,
            &prefix,
            &self.configs.text_encoder_2,
            LoraTarget::TextEncoder2,
            opts,
            loras,
        )?;
        if !model.has_projection() {
            return Err(EngineError::Weights {
                path: self.file.path.clone(),
                message: format!(
                    "tensor `{prefix}text_projection` is missing; SDXL's second text encoder needs it"
                ),
            });
        }
        TextEncoder::new(self.tokenizers.second.clone(), model)
    }

    /// The UNet with the LoRAs' UNet modules merged.
    pub(crate) fn load_unet(
        &self,
        weights: &Weights,
        opts: &LoadOptions,
        loras: &mut LoraSet,
    ) -> Result<UNet2DConditionModel> {
        load_unet(weights, &self.configs.unet, opts, loras)
    }

    /// The precision the VAE runs in: f32 under an f16 model unless its config says it need
    /// not (`force_upcast`, see [`crate::sdxl::vae_dtype`]).
    pub(crate) fn vae_dtype(&self, opts: &LoadOptions) -> candle_core::DType {
        crate::sdxl::vae_dtype(true, &self.configs.vae, opts.dtype)
    }

    /// The VAE (the checkpoint's `first_stage_model.*` or the separate file) in
    /// [`Self::vae_dtype`].
    pub(crate) fn load_vae(&self, opts: &LoadOptions) -> Result<AutoencoderKL> {
        crate::pipeline::load_vae_from(
            &self.file.vae_files,
            &self.configs.vae,
            self.vae_dtype(opts),
            opts,
        )
    }
}

/// Without a config folder, what the file says about its prediction type and schedule (marker
/// tensors or SAI model-spec metadata) beats the family default in `scheduler`; a config folder
/// is the user's word.
fn apply_file_prediction(scheduler: &mut SchedulerConfig, info: &CheckpointInfo, folder: bool) {
    if folder {
        return;
    }
    if let Some(p) = info.prediction {
        scheduler.prediction_type = prediction_type(p);
    }
    if info.zero_terminal_snr {
        scheduler.rescale_betas_zero_snr = true;
    }
}

/// The scheduler's name for what a checkpoint says it predicts.
fn prediction_type(p: Prediction) -> PredictionType {
    match p {
        Prediction::Epsilon => PredictionType::Epsilon,
        Prediction::VPrediction => PredictionType::VPrediction,
    }
}

/// The error for an SDXL refiner file given as the model to draw with.
pub(crate) fn refiner_cannot_draw(path: &Path) -> EngineError {
    EngineError::InvalidRequest(format!(
        "{} is an SDXL refiner: it finishes pictures of an SDXL base model and cannot draw on \
         its own; choose it as the refiner",
        path.display()
    ))
}

/// A text encoder of a single file under `prefix`, with the LoRA modules for `target` merged.
fn load_clip(
    weights: &Weights,
    names: Arc<dyn NameMap>,
    prefix: &str,
    cfg: &ClipConfig,
    target: LoraTarget,
    opts: &LoadOptions,
    loras: &mut LoraSet,
) -> Result<ClipTextModel> {
    let patch = if loras.is_empty() {
        None
    } else {
        loras.patch_for(target, &MappedNames::new(weights, names.clone(), prefix))?
    };
    let vb = ldm_names::var_builder_patched(weights, names, opts.dtype, &opts.device, patch)?;
    opts.load_text_encoder(|| ClipTextModel::load(vb, cfg))
}

/// The UNet of a single file (`model.diffusion_model.*`) with the LoRAs' UNet modules merged.
fn load_unet(
    weights: &Weights,
    cfg: &UNetConfig,
    opts: &LoadOptions,
    loras: &mut LoraSet,
) -> Result<UNet2DConditionModel> {
    let names: Arc<dyn NameMap> = Arc::new(UnetNames::new(cfg, LDM_UNET_PREFIX));
    let patch = if loras.is_empty() {
        None
    } else {
        loras.patch_for(
            LoraTarget::Unet,
            &MappedNames::new(weights, names.clone(), LDM_UNET_PREFIX),
        )?
    };
    // The whole file must be f16 for f16 storage to be lossless (conservative for files whose
    // VAE or text encoder alone is f32).
    let merged = patch.is_some();
    let vb = ldm_names::var_builder_patched(weights, names, opts.dtype, &opts.device, patch)?;
    Ok(opts.load_unet(weights, merged, || UNet2DConditionModel::load(vb, cfg))?)
}

fn no_vae(path: &Path) -> EngineError {
    EngineError::Weights {
        path: path.to_path_buf(),
        message: format!(
            "the checkpoint has no VAE inside (`first_stage_model.*`); put its VAE beside it as \
             {}",
            sibling_vae_name(path)
        ),
    }
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

/// Whether the file at `path` is an SDXL single-file checkpoint (base or refiner), from its
/// header; `Pipeline::load_source` picks the SDXL path with it.
pub fn is_sdxl_file(path: &Path) -> Result<bool> {
    if crate::pickle::is_pickle_path(path) {
        return Ok(false);
    }
    Ok(matches!(
        checkpoint::inspect(path)?.family,
        Some(ModelFamily::SdxlBase | ModelFamily::SdxlRefiner)
    ))
}

/// Refuses what is not a whole, usable checkpoint (pickles, VAEs, LoRAs, embeddings, SDXL
/// inpainting models, files without UNet or text encoder), each with what to do instead.
pub(crate) fn check_checkpoint(path: &Path) -> Result<CheckpointInfo> {
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
    if info.family.is_none() {
        return Err(refuse(info.note.clone().unwrap_or_else(|| {
            "this checkpoint's model family is not supported".into()
        })));
    }
    // SD1/SD2 inpainting models draw (`crate::inpaint`); SDXL's are refused with the reason.
    let refused_inpainting = info.inpainting && !(info.loadable || info.needs_vae);
    if refused_inpainting || !info.has_unet || !info.has_text_encoder {
        return Err(refuse(info.note.clone().unwrap_or_else(|| {
            "the checkpoint lacks its UNet or text encoder".into()
        })));
    }
    Ok(info)
}

/// Loads an SD1/SD2 single-file checkpoint with `loras` merged into its UNet and text encoder.
/// `config` is an optional diffusers folder whose configs and tokenizer describe the
/// architecture; `vae` an optional separate VAE file.
pub fn load(
    path: &Path,
    config: Option<&Path>,
    vae: Option<&Path>,
    opts: &LoadOptions,
    loras: &mut LoraSet,
) -> Result<LoadedParts> {
    let file = SdCheckpoint::open(path, config, vae)?;
    let weights = file.file.weights()?;
    let text_encoder = file.load_text_encoder(&weights, opts, loras)?;
    let unet = file.load_unet(&weights, opts, loras)?;
    let vae = file.load_vae(opts)?;
    Ok(LoadedParts {
        text_encoder,
        unet,
        vae,
        schedule: file.file.schedule,
        prediction: file.configs.scheduler.prediction_type,
        vae_files: file.file.vae_files,
    })
}

/// An SD1/SD2 single-file checkpoint, opened: the file checked, its configs and tokenizer read,
/// the file's prediction type applied; no weights loaded. [`load`] loads all its models at once;
/// the staged pipeline ([`crate::pipeline::staged`]) loads them one at a time through the same
/// loaders, so both draw with the same models.
#[derive(Debug)]
pub(crate) struct SdCheckpoint {
    file: CheckpointFile,
    family: ModelFamily,
    /// `scheduler.prediction_type` is the one the model is sampled with.
    configs: FamilyConfigs,
    tokenizer: ClipTokenizer,
}

impl SdCheckpoint {
    /// Checks the file (an SD1/SD2 checkpoint, with a VAE inside or beside it) and reads the
    /// configs and tokenizer: `config`'s, else the embedded SD 1.5 / SD 2.1 ones.
    pub(crate) fn open(path: &Path, config: Option<&Path>, vae: Option<&Path>) -> Result<Self> {
        let info = check_checkpoint(path)?;
        let family = match info.family {
            Some(f @ (ModelFamily::Sd1 | ModelFamily::Sd2)) => f,
            other => {
                return Err(EngineError::InvalidRequest(format!(
                    "{} is an {other:?} checkpoint; SDXL files load through load_sdxl",
                    path.display()
                )))
            }
        };
        if !info.has_vae && vae.is_none() {
            return Err(no_vae(path));
        }
        let (mut configs, tokenizer) = match config {
            Some(dir) => {
                let folder = ModelFolder::open(dir)?;
                (
                    FamilyConfigs {
                        unet: UNetConfig::from_file(&folder.config_file("unet")?)?,
                        vae: VaeConfig::from_file(&folder.config_file("vae")?)?,
                        text_encoder: ClipConfig::from_file(folder.config_file("text_encoder")?)?,
                        scheduler: folder.scheduler_config()?,
                    },
                    ClipTokenizer::from_dir(folder.component_dir("tokenizer")?)?,
                )
            }
            None => (family_configs(family)?, embedded_tokenizer(family)?),
        };
        if configs.unet.needs_added_conditions() {
            return Err(EngineError::InvalidRequest(
                "the config describes an SDXL-type UNet; SDXL needs the SDXL pipeline".into(),
            ));
        }
        if info.inpainting {
            // The embedded configs are the plain models'; the file's UNet takes the mask and
            // the masked picture too (`crate::inpaint`).
            configs.unet.in_channels = crate::inpaint::INPAINT_CHANNELS;
        }
        apply_file_prediction(&mut configs.scheduler, &info, config.is_some());
        Ok(Self {
            file: CheckpointFile::new(path, vae, &configs.scheduler)?,
            family,
            configs,
            tokenizer,
        })
    }

    pub(crate) fn configs(&self) -> &FamilyConfigs {
        &self.configs
    }

    /// The file itself: its schedule, VAE files and weights for the loaders below.
    pub(crate) fn file(&self) -> &CheckpointFile {
        &self.file
    }

    /// The text encoder (SD1: CLIP-L under `cond_stage_model.transformer.`, SD2: OpenCLIP-H
    /// under `cond_stage_model.model.`, or both under `conditioner.embedders.0.` in SGM names)
    /// with its tokenizer and the LoRAs' modules merged.
    pub(crate) fn load_text_encoder(
        &self,
        weights: &Weights,
        opts: &LoadOptions,
        loras: &mut LoraSet,
    ) -> Result<TextEncoder> {
        let sgm = weights.names().any(|n| n.starts_with(SDXL_EMBEDDER_0));
        let (names, prefix): (Arc<dyn NameMap>, &str) = match (self.family, sgm) {
            (ModelFamily::Sd1, false) => {
                (Arc::new(ClipNames::new(LDM_CLIP_PREFIX)), LDM_CLIP_PREFIX)
            }
            (ModelFamily::Sd1, true) => {
                (Arc::new(ClipNames::new(SGM_CLIP_PREFIX)), SGM_CLIP_PREFIX)
            }
            (_, false) => (
                Arc::new(OpenClipNames::new(LDM_OPEN_CLIP_PREFIX, false)),
                LDM_OPEN_CLIP_PREFIX,
            ),
            (_, true) => (
                Arc::new(OpenClipNames::new(SGM_OPEN_CLIP_PREFIX, false)),
                SGM_OPEN_CLIP_PREFIX,
            ),
        };
        let model = load_clip(
            weights,
            names,
            prefix,
            &self.configs.text_encoder,
            LoraTarget::TextEncoder,
            opts,
            loras,
        )?;
        TextEncoder::new(self.tokenizer.clone(), model)
    }

    /// The UNet with the LoRAs' UNet modules merged.
    pub(crate) fn load_unet(
        &self,
        weights: &Weights,
        opts: &LoadOptions,
        loras: &mut LoraSet,
    ) -> Result<UNet2DConditionModel> {
        load_unet(weights, &self.configs.unet, opts, loras)
    }

    /// The precision the VAE runs in: the model's (SD1/SD2 pipelines do not upcast it).
    pub(crate) fn vae_dtype(&self, opts: &LoadOptions) -> candle_core::DType {
        opts.dtype
    }

    /// The VAE (the checkpoint's `first_stage_model.*` or the separate file) in
    /// [`Self::vae_dtype`].
    pub(crate) fn load_vae(&self, opts: &LoadOptions) -> Result<AutoencoderKL> {
        crate::pipeline::load_vae_from(
            &self.file.vae_files,
            &self.configs.vae,
            self.vae_dtype(opts),
            opts,
        )
    }
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
    check_vae_file(path)?;
    let files = vec![path.to_path_buf()];
    let vae = crate::pipeline::load_vae_from(&files, cfg, opts.dtype, opts)?;
    Ok((vae, files))
}

/// Refuses a separate VAE file that holds no VAE (from its header; no weights are read).
pub(crate) fn check_vae_file(path: &Path) -> Result<()> {
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
    Ok(())
}

/// The CLIP tokenizer for a family, from the embedded files: SD1 and SDXL's first encoder pad
/// with `<|endoftext|>`, SD2 and SDXL's OpenCLIP-bigG (`SdxlRefiner` here: the refiner has only
/// that one) with `"!"`. `ClipTokenizer` reads only from a folder, so they are written to a
/// fresh private temporary folder (created with `create_dir`, which fails rather than reuse a
/// folder someone else made) and removed after reading.
pub fn embedded_tokenizer(family: ModelFamily) -> Result<ClipTokenizer> {
    let config = match family {
        ModelFamily::Sd1 => SD15_TOKENIZER,
        ModelFamily::Sd2 => SD21_TOKENIZER,
        ModelFamily::SdxlBase => SDXL_TOKENIZER,
        ModelFamily::SdxlRefiner => SDXL_TOKENIZER_2,
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

    /// An SD1/SD2 inpainting file read with the embedded configs gets a 9-channel UNet config.
    #[test]
    fn inpainting_files_get_a_nine_channel_unet_config() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("inpainting.safetensors");
        let f = crate::checkpoint::tests::file(&[
            (
                "model.diffusion_model.input_blocks.0.0.weight",
                &[320, 9, 3, 3],
            ),
            (
                "cond_stage_model.transformer.text_model.final_layer_norm.weight",
                &[768],
            ),
            ("first_stage_model.decoder.conv_in.weight", &[512, 4, 3, 3]),
            (
                "first_stage_model.decoder.up.0.block.0.conv1.weight",
                &[128, 256, 3, 3],
            ),
        ]);
        std::fs::write(&path, f).unwrap();
        let opened = SdCheckpoint::open(&path, None, None).unwrap();
        assert_eq!(opened.configs.unet.in_channels, 9);
        assert_eq!(opened.configs.unet.out_channels, 4);
    }

    /// A `ztsnr` checkpoint samples from the zero-terminal-SNR schedule (sigma 4096 at the
    /// start, `schedule::tests::zero_terminal_snr_matches_diffusers`); a config folder given
    /// with the file keeps its own scheduler.
    #[test]
    fn zero_terminal_snr_marker_sets_the_schedule() {
        let f = crate::checkpoint::tests::file(&[
            ("model.diffusion_model.out.2.bias", &[4]),
            (
                "cond_stage_model.transformer.text_model.final_layer_norm.weight",
                &[768],
            ),
            ("v_pred", &[]),
            ("ztsnr", &[]),
        ]);
        let info = crate::checkpoint::inspect_bytes(&f).unwrap();
        let embedded = family_configs(ModelFamily::Sd1).unwrap().scheduler;
        let mut scheduler = embedded.clone();
        apply_file_prediction(&mut scheduler, &info, false);
        assert_eq!(scheduler.prediction_type, PredictionType::VPrediction);
        let s = NoiseSchedule::from_config(&scheduler).unwrap();
        assert!((s.sigma_max() - 4096.0).abs() < 1e-3, "{}", s.sigma_max());
        let mut from_folder = embedded.clone();
        apply_file_prediction(&mut from_folder, &info, true);
        assert_eq!(from_folder, embedded);
    }

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
    fn embedded_sdxl_configs_describe_the_real_models() {
        let base = sdxl_configs(false).unwrap();
        // The same architecture the benchmark builds (bench.rs, from the same repository).
        let bench = UNetConfig::from_json(crate::bench::SDXL_UNET_CONFIG).unwrap();
        assert_eq!(base.unet.block_out_channels, bench.block_out_channels);
        assert_eq!(base.unet.down_block_types, bench.down_block_types);
        assert_eq!(base.unet.up_block_types, bench.up_block_types);
        assert_eq!(
            base.unet.transformer_layers_per_block,
            bench.transformer_layers_per_block
        );
        assert_eq!(base.unet.attention_head_dim, bench.attention_head_dim);
        assert_eq!(
            base.unet.projection_class_embeddings_input_dim,
            bench.projection_class_embeddings_input_dim
        );
        assert_eq!(
            base.vae,
            VaeConfig::from_json(crate::bench::SDXL_VAE_CONFIG).unwrap()
        );
        let te1 = base.text_encoder.clone().unwrap();
        assert_eq!(te1, ClipConfig::clip_vit_l_14());
        assert_eq!(base.text_encoder_2, ClipConfig::open_clip_vit_bigg_14());
        // Context = CLIP-L 768 + bigG 1280; add_embedding input = pooled 1280 + 6 ids x 256.
        assert_eq!(base.unet.context_dim(), 768 + 1280);
        assert_eq!(
            base.unet.projection_class_embeddings_input_dim,
            Some(1280 + 6 * 256)
        );
        assert!(base.unet.needs_added_conditions() && base.unet.use_linear_projection);
        assert_eq!(base.unet.sample_size, Some(128));
        assert!(base.force_zeros_for_empty_prompt && !base.requires_aesthetics_score);
        assert_eq!(base.scheduler.prediction_type, PredictionType::Epsilon);
        NoiseSchedule::from_config(&base.scheduler).unwrap();
        base.unet.validate().unwrap();
        base.vae.validate().unwrap();

        let refiner = sdxl_configs(true).unwrap();
        assert!(refiner.text_encoder.is_none());
        assert_eq!(refiner.unet.block_out_channels, [384, 768, 1536, 1536]);
        // bigG only: context 1280; pooled 1280 + 5 ids (size, crop, aesthetic score) x 256.
        assert_eq!(refiner.unet.context_dim(), 1280);
        assert_eq!(
            refiner.unet.projection_class_embeddings_input_dim,
            Some(1280 + 5 * 256)
        );
        assert!(!refiner.force_zeros_for_empty_prompt && refiner.requires_aesthetics_score);
        refiner.unet.validate().unwrap();

        // Real SDXL files' tensor names (as in sd_xl_base_1.0.safetensors) from these configs:
        // down block 2's 10-deep transformer at input_blocks.7/8, upsamplers after attention.
        let names = UnetNames::new(&base.unet, LDM_UNET_PREFIX);
        for (d, l) in [
            (
                "down_blocks.2.attentions.1.transformer_blocks.9.attn2.to_k.weight",
                "input_blocks.8.1.transformer_blocks.9.attn2.to_k.weight",
            ),
            (
                "down_blocks.1.downsamplers.0.conv.weight",
                "input_blocks.6.0.op.weight",
            ),
            (
                "up_blocks.0.upsamplers.0.conv.weight",
                "output_blocks.2.2.conv.weight",
            ),
            (
                "up_blocks.2.resnets.2.conv2.bias",
                "output_blocks.8.0.out_layers.3.bias",
            ),
            ("add_embedding.linear_1.weight", "label_emb.0.0.weight"),
        ] {
            assert_eq!(
                names.source(d),
                Some(ldm_names::Source::Copy(format!("{LDM_UNET_PREFIX}{l}"))),
                "{d}"
            );
        }
        let names = UnetNames::new(&refiner.unet, LDM_UNET_PREFIX);
        assert_eq!(
            names.source("up_blocks.2.upsamplers.0.conv.weight"),
            Some(ldm_names::Source::Copy(format!(
                "{LDM_UNET_PREFIX}output_blocks.8.2.conv.weight"
            )))
        );
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
        // SDXL: CLIP-L pads with <|endoftext|>, OpenCLIP-bigG with "!" (id 0), as the tiny
        // fixtures' tokenizer (../sd1/tokenizer) and tokenizer_2 (../sd2/tokenizer).
        assert_eq!(
            embedded_tokenizer(ModelFamily::SdxlBase).unwrap().pad_id(),
            49407
        );
        assert_eq!(
            embedded_tokenizer(ModelFamily::SdxlRefiner)
                .unwrap()
                .pad_id(),
            0
        );
    }
}
