//! The SDXL refiner: a second UNet that finishes the last part of the denoising (diffusers'
//! "ensemble of expert denoisers": base with `denoising_end`, refiner with `denoising_start`).
//! It reads the prompt with `text_encoder_2` only and is conditioned on an aesthetic score
//! instead of the target size.

use std::path::Path;
use std::sync::Arc;

use crate::clip::{ClipConfig, TextEncoder};
use crate::config::{ModelFolder, PredictionType};
use crate::lora::LoraSet;
use crate::pipeline::{GenerateRequest, LoadOptions, Pipeline};
use crate::schedule::NoiseSchedule;
use crate::sdxl::{
    encode_pair, load_encoder_2, sdxl_layer, time_ids_tensor, SdxlConditioning, SdxlOptions, Stage,
};
use crate::single_file::{ModelSource, SdxlCheckpoint};
use crate::unet::{UNet2DConditionModel, UNetConfig};
use crate::weights::Weights;
use crate::{EngineError, Result};

/// When and how the refiner takes over. `Default`: switch at 80 % (diffusers' documented
/// `high_noise_frac` 0.8, A1111's refiner default "Switch at 0.8"), aesthetic scores 6 and 2.5
/// (diffusers `StableDiffusionXLImg2ImgPipeline` defaults, from the SDXL report).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RefinerOptions {
    /// Fraction of the denoising (by training timestep, as diffusers' `denoising_end`) the base
    /// model does; 1 leaves the refiner out.
    pub switch_at: f64,
    pub aesthetic_score: f64,
    pub negative_aesthetic_score: f64,
}

impl Default for RefinerOptions {
    fn default() -> Self {
        Self {
            switch_at: 0.8,
            aesthetic_score: 6.0,
            negative_aesthetic_score: 2.5,
        }
    }
}

impl RefinerOptions {
    pub fn validate(&self) -> Result<()> {
        if !(0.0..=1.0).contains(&self.switch_at) {
            return Err(EngineError::InvalidRequest(format!(
                "refiner switch point must be between 0 and 1, got {}",
                self.switch_at
            )));
        }
        for (name, v) in [
            ("aesthetic_score", self.aesthetic_score),
            ("negative_aesthetic_score", self.negative_aesthetic_score),
        ] {
            if !v.is_finite() {
                return Err(EngineError::InvalidRequest(format!(
                    "refiner {name} must be a finite number, got {v}"
                )));
            }
        }
        Ok(())
    }
}

/// A loaded SDXL refiner (`StableDiffusionXLImg2ImgPipeline` folder).
#[derive(Debug)]
pub struct Refiner {
    encoder_2: TextEncoder,
    /// The pipeline sets its memory strategies (`Pipeline::set_memory_options`).
    pub(crate) unet: UNet2DConditionModel,
    schedule: NoiseSchedule,
    prediction: PredictionType,
    /// Ids are (size, crop, aesthetic score) rather than (size, crop, target size).
    aesthetic: bool,
    force_zeros_for_empty_prompt: bool,
}

/// A refiner opened but not loaded: its configs read and checked, its weight files' headers
/// read. [`Refiner::load_source`] loads both models at once; a staged run
/// ([`crate::pipeline::staged`]) loads the text encoder and the UNet at different times,
/// through the same loaders, so both draw with the same models.
#[derive(Debug)]
pub(crate) struct OpenedRefiner {
    files: RefinerFiles,
    pub(crate) unet_cfg: UNetConfig,
    pub(crate) schedule: NoiseSchedule,
    pub(crate) prediction: PredictionType,
    pub(crate) aesthetic: bool,
    pub(crate) force_zeros_for_empty_prompt: bool,
}

#[derive(Debug)]
enum RefinerFiles {
    Folder(ModelFolder),
    /// Boxed: its configs and tokenizer are kilobytes.
    File(Box<SdxlCheckpoint>),
}

impl OpenedRefiner {
    /// Opens a refiner folder (`model_index.json`, `scheduler/`, `text_encoder_2/`,
    /// `tokenizer_2/`, `unet/`; its `vae/` is SDXL's, the base's is used) or a single-file
    /// refiner checkpoint (original LDM names, `conditioner.embedders.0.model.*` =
    /// OpenCLIP-bigG) described by the embedded stable-diffusion-xl-refiner-1.0 configs or by
    /// `source.config`. Loads no weights.
    pub(crate) fn open(source: &ModelSource) -> Result<Self> {
        if !source.path.is_dir() {
            return Self::open_file(source);
        }
        let dir = &source.path;
        let folder = ModelFolder::open(dir)?;
        let index = folder.model_index()?;
        let index_path = dir.join("model_index.json");
        for component in ["scheduler", "text_encoder_2", "tokenizer_2", "unet"] {
            if !index.has_component(component) {
                return Err(EngineError::Config {
                    path: index_path.clone(),
                    message: format!("an SDXL refiner needs {component}"),
                });
            }
        }
        // `requires_aesthetics_score` is not in the typed index; read it from the raw JSON.
        let raw: serde_json::Value = crate::config::read_json(&index_path)?;
        let aesthetic = raw
            .get("requires_aesthetics_score")
            .and_then(|v| v.as_bool())
            .unwrap_or(false);
        let scheduler = folder.scheduler_config()?;
        let text_cfg = ClipConfig::from_file(folder.config_file("text_encoder_2")?)?;
        let unet_path = folder.config_file("unet")?;
        let unet_cfg = UNetConfig::from_file(&unet_path)?;
        check_unet(&unet_cfg, &text_cfg, aesthetic, &unet_path)?;
        // A damaged file is reported now, not after the base model's steps.
        for component in ["text_encoder_2", "unet"] {
            drop(Weights::open_all(&folder.weight_files(component)?)?);
        }
        Ok(Self {
            schedule: NoiseSchedule::from_config(&scheduler)?.for_sdxl(true),
            prediction: scheduler.prediction_type,
            unet_cfg,
            aesthetic,
            force_zeros_for_empty_prompt: index.force_zeros_for_empty_prompt.unwrap_or(false),
            files: RefinerFiles::Folder(folder),
        })
    }

    fn open_file(source: &ModelSource) -> Result<Self> {
        let path = &source.path;
        let file = SdxlCheckpoint::open(path, source.config.as_deref(), None)?;
        if !file.is_refiner() {
            return Err(EngineError::InvalidRequest(format!(
                "{} is an SDXL base model, not a refiner",
                path.display()
            )));
        }
        let configs = file.configs();
        let aesthetic = configs.requires_aesthetics_score;
        check_unet(&configs.unet, &configs.text_encoder_2, aesthetic, path)?;
        Ok(Self {
            unet_cfg: configs.unet.clone(),
            schedule: file.file().schedule().clone(),
            prediction: configs.scheduler.prediction_type,
            aesthetic,
            force_zeros_for_empty_prompt: configs.force_zeros_for_empty_prompt,
            files: RefinerFiles::File(Box::new(file)),
        })
    }

    /// The refiner's text encoder: OpenCLIP-bigG with its projection (no LoRAs: they are made
    /// for the base model).
    pub(crate) fn load_encoder_2(&self, opts: &LoadOptions) -> Result<TextEncoder> {
        let mut no_loras = LoraSet::open(&[])?;
        let encoder_2 = match &self.files {
            RefinerFiles::Folder(folder) => load_encoder_2(folder, opts, &mut no_loras)?,
            RefinerFiles::File(file) => {
                file.load_encoder_2(&file.file().weights()?, opts, &mut no_loras)?
            }
        };
        no_loras.finish()?;
        Ok(encoder_2)
    }

    /// The refiner's UNet.
    pub(crate) fn load_unet(&self, opts: &LoadOptions) -> Result<UNet2DConditionModel> {
        let mut no_loras = LoraSet::open(&[])?;
        let unet = match &self.files {
            RefinerFiles::Folder(folder) => {
                let weights = Weights::open_all(&folder.weight_files("unet")?)?;
                let vb = weights.var_builder(opts.dtype, &opts.device)?;
                opts.load_unet(&weights, false, || {
                    UNet2DConditionModel::load(vb, &self.unet_cfg)
                })?
            }
            RefinerFiles::File(file) => {
                file.load_unet(&file.file().weights()?, opts, &mut no_loras)?
            }
        };
        no_loras.finish()?;
        Ok(unet)
    }

    /// [`text_conditioning`] with this refiner's settings.
    pub(crate) fn text_conditioning(
        &self,
        encoder_2: &TextEncoder,
        req: &GenerateRequest,
    ) -> Result<SdxlConditioning> {
        text_conditioning(
            encoder_2,
            self.force_zeros_for_empty_prompt,
            &self.unet_cfg,
            req,
        )
    }
}

/// The text half of the refiner's conditioning: `req`'s prompt (and negative prompt when its
/// UNet, of config `unet`, is guided) through text_encoder_2 alone, penultimate states and
/// pooled output.
fn text_conditioning(
    encoder_2: &TextEncoder,
    force_zeros_for_empty_prompt: bool,
    unet: &UNetConfig,
    req: &GenerateRequest,
) -> Result<SdxlConditioning> {
    encode_pair(
        &[encoder_2],
        &req.prompt,
        &req.negative_prompt,
        crate::sdxl::stage_guided(unet, req.cfg_scale),
        force_zeros_for_empty_prompt,
        sdxl_layer(req.clip_skip),
    )
}

/// The refiner's stage for `req` from its encoded prompt `c`: time ids
/// `[h, w, crop_top, crop_left, aesthetic score]` (negative score for the negative prompt) when
/// the refiner is `aesthetic`, else the size ids of `options.size`.
pub(crate) fn refiner_stage(
    c: SdxlConditioning,
    aesthetic: bool,
    req: &GenerateRequest,
    options: &SdxlOptions,
    unet: &UNet2DConditionModel,
) -> Result<Stage> {
    let device = unet.device();
    let size = &options.size;
    let (ids, neg) = if aesthetic {
        let r = &options.refiner;
        (
            time_ids_tensor(
                &size.aesthetic_time_ids(req.height, req.width, r.aesthetic_score),
                device,
            )?,
            time_ids_tensor(
                &size.aesthetic_time_ids(req.height, req.width, r.negative_aesthetic_score),
                device,
            )?,
        )
    } else {
        let ids = time_ids_tensor(&size.time_ids(req.height, req.width), device)?;
        (ids.clone(), ids)
    };
    Stage::new(c, req.cfg_scale, &ids, &neg, unet)
}

/// How many of the steps along `sigmas` the base model does: those whose training timestep
/// is at or above `round(N * (1 - switch_at))`, diffusers' `denoising_end` /
/// `denoising_start` rule (the base keeps `t >= cutoff`, the refiner takes `t < cutoff`).
/// `schedule` is the base model's.
pub(crate) fn switch_index(
    schedule: &NoiseSchedule,
    sigmas: &[f64],
    options: &RefinerOptions,
) -> usize {
    let n = schedule.num_train_timesteps() as f64;
    let cutoff = (n - options.switch_at * n).round();
    let steps = sigmas.len().saturating_sub(1);
    sigmas[..steps]
        .iter()
        .take_while(|&&s| schedule.sigma_to_t(s).round() >= cutoff)
        .count()
}

impl Refiner {
    /// Loads a refiner folder (see [`Refiner::load_source`]).
    pub fn load(dir: &Path, opts: &LoadOptions) -> Result<Self> {
        Self::load_source(&ModelSource::new(dir), opts)
    }

    /// Loads a refiner folder: `model_index.json`, `scheduler/`, `text_encoder_2/`,
    /// `tokenizer_2/`, `unet/` (its `vae/` is SDXL's, the base's is used); or a single-file
    /// refiner checkpoint (original LDM names, `conditioner.embedders.0.model.*` =
    /// OpenCLIP-bigG) described by the embedded stable-diffusion-xl-refiner-1.0 configs or by
    /// `source.config`.
    pub fn load_source(source: &ModelSource, opts: &LoadOptions) -> Result<Self> {
        let opened = OpenedRefiner::open(source)?;
        Ok(Self {
            encoder_2: opened.load_encoder_2(opts)?,
            unet: opened.load_unet(opts)?,
            schedule: opened.schedule,
            prediction: opened.prediction,
            aesthetic: opened.aesthetic,
            force_zeros_for_empty_prompt: opened.force_zeros_for_empty_prompt,
        })
    }

    pub fn unet(&self) -> &UNet2DConditionModel {
        &self.unet
    }

    pub fn schedule(&self) -> &NoiseSchedule {
        &self.schedule
    }

    pub fn prediction(&self) -> PredictionType {
        self.prediction
    }

    pub fn encoder_2(&self) -> &TextEncoder {
        &self.encoder_2
    }

    /// [`switch_index`]: how many of the steps along `sigmas` the base model (of noise
    /// `schedule`) does before this refiner takes over.
    pub fn switch_index(
        &self,
        schedule: &NoiseSchedule,
        sigmas: &[f64],
        options: &RefinerOptions,
    ) -> usize {
        switch_index(schedule, sigmas, options)
    }

    /// The refiner's conditioning for `req`: text_encoder_2's penultimate states and pooled
    /// output, and its time ids ([`refiner_stage`]).
    pub(crate) fn stage(&self, req: &GenerateRequest, options: &SdxlOptions) -> Result<Stage> {
        let c = text_conditioning(
            &self.encoder_2,
            self.force_zeros_for_empty_prompt,
            self.unet.config(),
            req,
        )?;
        refiner_stage(c, self.aesthetic, req, options, &self.unet)
    }

    /// The refiner's conditioning as its UNet gets it (for tests and tools).
    pub fn conditioning(
        &self,
        req: &GenerateRequest,
        options: &SdxlOptions,
    ) -> Result<(crate::denoiser::Conditioning, crate::unet::AddedConditions)> {
        let s = self.stage(req, options)?;
        Ok((s.conditioning, s.added))
    }
}

/// Checks that `unet_cfg` is a refiner UNet fitting text_encoder_2 (of config `encoder_2`) and
/// the time ids (`aesthetic`).
fn check_unet(
    unet_cfg: &UNetConfig,
    encoder_2: &ClipConfig,
    aesthetic: bool,
    path: &Path,
) -> Result<()> {
    let ids = if aesthetic { 5 } else { 6 };
    let pooled = encoder_2.projection_dim.unwrap_or(0);
    // The add_embedding's input is pooled text plus one sinusoid per id; a mismatch means
    // the index's `requires_aesthetics_score` does not fit this UNet.
    let expected = unet_cfg.addition_time_embed_dim.map(|t| pooled + ids * t);
    if !unet_cfg.needs_added_conditions()
        || expected != unet_cfg.projection_class_embeddings_input_dim
    {
        return Err(EngineError::Config {
            path: path.to_path_buf(),
            message: format!(
                "not an SDXL refiner UNet: expected added conditions of {} inputs \
                 ({pooled} pooled + {ids} ids), config says {:?}",
                expected.unwrap_or(0),
                unet_cfg.projection_class_embeddings_input_dim
            ),
        });
    }
    if unet_cfg.context_dim() != encoder_2.hidden_size {
        return Err(EngineError::Config {
            path: path.to_path_buf(),
            message: format!(
                "the refiner UNet's cross_attention_dim {} differs from text_encoder_2's \
                 width {}",
                unet_cfg.context_dim(),
                encoder_2.hidden_size
            ),
        });
    }
    Ok(())
}

impl Pipeline {
    /// Loads an SDXL refiner and uses it for the following generations (from
    /// [`RefinerOptions::switch_at`], see [`Pipeline::set_sdxl_options`]). Only for SDXL base
    /// models.
    /// `path` is a refiner folder or a single-file refiner checkpoint (embedded configs).
    pub fn load_refiner(&mut self, path: &Path, opts: &LoadOptions) -> Result<()> {
        self.load_refiner_source(&ModelSource::new(path), opts)
    }

    /// [`Self::load_refiner`] from a [`ModelSource`] (a single file with a config folder).
    pub fn load_refiner_source(&mut self, source: &ModelSource, opts: &LoadOptions) -> Result<()> {
        if self.sdxl.is_none() {
            return Err(EngineError::InvalidRequest(
                "a refiner needs an SDXL base model".into(),
            ));
        }
        let refiner = Arc::new(Refiner::load_source(source, opts)?);
        self.set_refiner(Some(refiner))
    }

    /// Uses `refiner` (shared between pipelines, it is read-only) or none.
    pub fn set_refiner(&mut self, refiner: Option<Arc<Refiner>>) -> Result<()> {
        match &mut self.sdxl {
            Some(s) => {
                s.refiner = refiner;
                self.apply_memory_to_refiner();
                Ok(())
            }
            None if refiner.is_none() => Ok(()),
            None => Err(EngineError::InvalidRequest(
                "a refiner needs an SDXL base model".into(),
            )),
        }
    }

    /// The refiner in use.
    pub fn refiner(&self) -> Option<&Arc<Refiner>> {
        self.sdxl.as_ref().and_then(|s| s.refiner.as_ref())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn options_are_checked() {
        RefinerOptions::default().validate().unwrap();
        let bad = RefinerOptions {
            switch_at: 1.5,
            ..RefinerOptions::default()
        };
        assert!(bad.validate().is_err());
        let bad = RefinerOptions {
            aesthetic_score: f64::NAN,
            ..RefinerOptions::default()
        };
        assert!(bad.validate().is_err());
    }
}
