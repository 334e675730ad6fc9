//! Text to image: load a diffusers folder, then prompt -> text embeddings -> seeded noise ->
//! sampler (with CFG) -> VAE decode -> RGB8 pixels, reporting progress (and cheap previews) to an
//! [`Observer`] that can cancel.

use std::num::NonZeroUsize;
use std::path::Path;
use std::sync::Arc;

use candle_core::{DType, Device, Tensor};

use crate::clip::{ClipConfig, ClipTextModel, PromptPlan, TextEncoder};
use crate::config::{ModelFolder, PredictionType};
use crate::denoiser::{cfg_scale_for, Conditioning, Denoiser, NoisePredictor};
use crate::hires::HiresFix;
use crate::lora::{LoraSet, LoraSpec, LoraTarget, LoraWarning};
use crate::memory::MemoryOptions;
use crate::rng::SeedSource;
use crate::sampler::{Control, SampleContext, SamplerKind, StepInfo};
use crate::schedule::{NoiseSchedule, ScheduleKind};
use crate::textual_inversion::{self, Embedding, EmbeddingWarning};
use crate::tokenizer::ClipTokenizer;
use crate::unet::{UNet2DConditionModel, UNetConfig};
use crate::vae::{AutoencoderKL, VaeConfig};
use crate::weights::{LoadPatch, Weights};
use crate::{EngineError, Result};

pub mod staged;

/// Where and in what precision the model runs.
#[derive(Debug, Clone)]
pub struct LoadOptions {
    pub device: Device,
    /// Weights and activations of the text encoder, UNet and VAE. Noise, sampler state and the
    /// output are always f32.
    pub dtype: DType,
    /// On the CPU in f32: whether the UNet's convolution and linear weights are kept in f16 and
    /// widened to f32 layer by layer as they run. Halves their memory (1.7 GB for SD 1.5,
    /// 5 GB for SDXL); the step time stayed within noise. Ignored on GPUs and in f16.
    pub half_weights: HalfWeights,
}

/// See [`LoadOptions::half_weights`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum HalfWeights {
    /// Weights in the pipeline's dtype.
    Off,
    /// When the UNet's file stores f16 already (most published checkpoints): the same values,
    /// so the images are identical, in half the memory.
    #[default]
    WhenLossless,
    /// Always (low-memory mode): f32 files' weights are rounded to f16, which changes images
    /// by that rounding only (the maths stays f32). The VAE's and the text encoders' weights
    /// are stored in f16 too (`LoadOptions::load_vae`, `LoadOptions::load_text_encoder`).
    On,
}

impl Default for LoadOptions {
    fn default() -> Self {
        Self {
            device: Device::Cpu,
            dtype: DType::F32,
            half_weights: HalfWeights::default(),
        }
    }
}

impl LoadOptions {
    /// Whether a UNet whose file stores only f16 (`f16_file`) gets f16 weight storage.
    pub fn stores_half(&self, f16_file: bool) -> bool {
        self.stores_half_on(f16_file, self.dtype, &self.device)
    }

    /// Whether the UNet of the model at `path` (a diffusers folder or a single `.safetensors`
    /// checkpoint) gets f16 storage under these options ([`LoadOptions::stores_half`]), with
    /// `loras` (taken as merged into it, which makes f16 storage lossy). Reads headers only: for
    /// memory estimates before a load.
    pub fn unet_stores_half(&self, path: &Path, loras: bool) -> Result<bool> {
        let weights = if path.is_dir() {
            Weights::open_all(&ModelFolder::open(path)?.weight_files("unet")?)?
        } else {
            Weights::open(path)?
        };
        Ok(self.stores_half(weights.unet_all_f16() && !loras))
    }

    /// [`LoadOptions::stores_half`] for a model placed in `dtype` on `device` (the VAE may run
    /// elsewhere than the UNet): only on the CPU in f32.
    fn stores_half_on(&self, f16_file: bool, dtype: DType, device: &Device) -> bool {
        let wanted = match self.half_weights {
            HalfWeights::Off => false,
            HalfWeights::WhenLossless => f16_file,
            HalfWeights::On => true,
        };
        wanted && device.is_cpu() && dtype == DType::F32
    }

    /// Loads the UNet of `weights` with `load`, in f16 storage when [`LoadOptions::stores_half`];
    /// `merged`: LoRAs are merged into it (their sums are no f16 values, so not lossless).
    pub(crate) fn load_unet<T>(
        &self,
        weights: &crate::weights::Weights,
        merged: bool,
        load: impl FnOnce() -> T,
    ) -> T {
        let lossless = weights.unet_all_f16() && !merged;
        crate::weights::with_half_storage(self.stores_half(lossless), load)
    }

    /// Loads a text encoder with `load`, its layers' projection weights in f16 storage in
    /// low-memory mode ([`HalfWeights::On`]) on the CPU in f32: 0.25 GB less for SD 1.5's CLIP,
    /// 0.7 GB for SDXL's second encoder. Only in low-memory mode, as for the VAE.
    pub(crate) fn load_text_encoder<T>(&self, load: impl FnOnce() -> T) -> T {
        crate::weights::with_half_storage(self.stores_half(false), load)
    }

    /// Loads a VAE with `load`, its convolution and linear weights in f16 storage in low-memory
    /// mode ([`HalfWeights::On`]) when it runs on the CPU in f32 (`dtype` and `device` are the
    /// VAE's own placement). 0.17 GB less for SD's VAE; only in low-memory mode, since an f16
    /// file's VAE is small enough that the lossless default is not worth a second rule.
    pub(crate) fn load_vae<T>(&self, dtype: DType, device: &Device, load: impl FnOnce() -> T) -> T {
        crate::weights::with_half_storage(self.stores_half_on(false, dtype, device), load)
    }
}

/// One text-to-image request. `Default` gives A1111's API defaults (20 steps, CFG 7, 512x512,
/// clip skip 1, CPU noise) with seed 0, except the sampler: DPM++ 2M (the app's default) rather
/// than the API's Euler. Its "Automatic" schedule is Karras, as in A1111 1.9+.
#[derive(Debug, Clone, PartialEq)]
pub struct GenerateRequest {
    pub prompt: String,
    pub negative_prompt: String,
    /// 1..=150.
    pub steps: usize,
    /// Classifier-free guidance scale; 1 skips the negative prompt (and half the UNet work).
    pub cfg_scale: f64,
    /// Pixels; multiples of 8 in 64..=2048 (see [`Pipeline::size_multiple`]).
    pub width: usize,
    pub height: usize,
    /// Seed of the noise generator picked by `seed_source`.
    pub seed: u64,
    /// Which generator turns the seed into noise: PyTorch's CPU generator (A1111 "CPU",
    /// ComfyUI, diffusers) or A1111's "NV" Philox source (images made on NVIDIA GPUs). The
    /// initial latent and the extra noise of ancestral/SDE samplers both come from it.
    pub seed_source: SeedSource,
    pub sampler: SamplerKind,
    pub schedule: ScheduleKind,
    /// A1111 "Clip skip": 1 = the text encoder's last layer, 2 = the one before, ...
    pub clip_skip: usize,
    /// A second pass at a larger size (A1111's "Hires. fix"); `None`: one pass.
    pub hires: Option<HiresFix>,
}

impl Default for GenerateRequest {
    fn default() -> Self {
        Self {
            prompt: String::new(),
            negative_prompt: String::new(),
            steps: 20,
            cfg_scale: 7.0,
            width: 512,
            height: 512,
            seed: 0,
            seed_source: SeedSource::Cpu,
            sampler: SamplerKind::DpmPp2M,
            schedule: ScheduleKind::Automatic,
            clip_skip: 1,
            hires: None,
        }
    }
}

/// Limits every model shares; the model-specific ones are checked in [`Pipeline::validate`].
pub const MIN_SIZE: usize = 64;
pub const MAX_SIZE: usize = 2048;
pub const MAX_STEPS: usize = 150;

impl GenerateRequest {
    /// Checks what needs no model: size, steps, CFG, clip skip >= 1. The error names the field.
    pub fn validate(&self) -> Result<()> {
        for (field, v) in [("width", self.width), ("height", self.height)] {
            if !(MIN_SIZE..=MAX_SIZE).contains(&v) || !v.is_multiple_of(8) {
                return Err(EngineError::InvalidRequest(format!(
                    "{field} must be a multiple of 8 between {MIN_SIZE} and {MAX_SIZE}, got {v}"
                )));
            }
        }
        if !(1..=MAX_STEPS).contains(&self.steps) {
            return Err(EngineError::InvalidRequest(format!(
                "steps must be between 1 and {MAX_STEPS}, got {}",
                self.steps
            )));
        }
        if !self.cfg_scale.is_finite() {
            return Err(EngineError::InvalidRequest(format!(
                "cfg_scale must be a finite number, got {}",
                self.cfg_scale
            )));
        }
        if self.clip_skip == 0 {
            return Err(EngineError::InvalidRequest(
                "clip_skip must be at least 1 (1 = the last layer)".into(),
            ));
        }
        if let Some(fix) = &self.hires {
            fix.validate()?;
        }
        Ok(())
    }

    /// The finished picture's width and height: the hires pass's when there is one.
    pub fn output_size(&self) -> (usize, usize) {
        match &self.hires {
            Some(fix) => (fix.width, fix.height),
            None => (self.width, self.height),
        }
    }
}

/// The finished picture.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GeneratedImage {
    pub width: usize,
    pub height: usize,
    /// Row-major RGB8, `width * height * 3` bytes.
    pub pixels: Vec<u8>,
    pub seed: u64,
}

/// A small, rough picture of the current estimate: one pixel per latent (1/8 of the size).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Preview {
    pub width: usize,
    pub height: usize,
    /// Row-major RGB8.
    pub pixels: Vec<u8>,
}

/// Progress of one generation, after each sampler step.
#[derive(Debug)]
pub struct Progress<'a> {
    /// Steps done, 1..=total.
    pub step: usize,
    pub total: usize,
    /// Present on the steps the observer asked for (see [`Observer::preview_every`]).
    pub preview: Option<&'a Preview>,
}

/// Receives progress; returning [`Control::Cancel`] stops the generation with
/// [`EngineError::Cancelled`] after the current step.
pub trait Observer {
    fn on_progress(&mut self, progress: &Progress<'_>) -> Control;

    /// Wanted preview interval in steps (a preview every N steps and at the last one); `None`
    /// (the default) skips them.
    fn preview_every(&self) -> Option<NonZeroUsize> {
        None
    }
}

impl<F: FnMut(&Progress<'_>) -> Control> Observer for F {
    fn on_progress(&mut self, progress: &Progress<'_>) -> Control {
        self(progress)
    }
}

/// An observer that never cancels and wants no previews.
#[derive(Debug, Default, Clone, Copy)]
pub struct NoObserver;

impl Observer for NoObserver {
    fn on_progress(&mut self, _: &Progress<'_>) -> Control {
        Control::Continue
    }
}

/// A loaded Stable Diffusion model (SD1.x / SD2.x / SDXL), from a diffusers folder or a single
/// file.
#[derive(Debug)]
pub struct Pipeline {
    text_encoder: TextEncoder,
    unet: UNet2DConditionModel,
    vae: AutoencoderKL,
    schedule: NoiseSchedule,
    prediction: PredictionType,
    device: Device,
    dtype: DType,
    /// The LoRAs merged into the weights, and what of them was not.
    loras: Vec<LoraSpec>,
    lora_warnings: Vec<LoraWarning>,
    /// Low-memory strategies in use, and the VAE's files (to reload it on the CPU or in f32).
    memory: MemoryOptions,
    vae_files: Vec<std::path::PathBuf>,
    /// SDXL's second text encoder, options and refiner (`None` for SD1/SD2; see [`crate::sdxl`]).
    pub(crate) sdxl: Option<crate::sdxl::SdxlParts>,
    /// Steps, CFG, sampler and size this model wants by default ([`crate::model_defaults`]).
    pub(crate) defaults: crate::model_defaults::ModelDefaults,
    /// An inpainting UNet's mask and grey-picture latents, by size.
    whole_picture: crate::inpaint::WholePictureCache,
}

impl Pipeline {
    /// Loads a diffusers folder: `model_index.json`, `scheduler/`, `text_encoder/`,
    /// `tokenizer/`, `unet/`, `vae/` (fp16 variant files are used when they are the only ones).
    pub fn load(dir: &Path, opts: &LoadOptions) -> Result<Self> {
        Self::load_with_loras(dir, opts, &[])
    }

    /// [`Self::load`] with LoRAs merged into the UNet and text encoder weights as they load
    /// (Kohya and diffusers/PEFT files, see [`crate::lora`]). A LoRA none of whose modules fit
    /// the model is an error naming its file; modules that match nothing, or cannot be merged,
    /// are in [`Self::lora_warnings`] (and logged). Changing the LoRA set means loading again:
    /// callers cache pipelines keyed by (model, LoRA set).
    pub fn load_with_loras(dir: &Path, opts: &LoadOptions, loras: &[LoraSpec]) -> Result<Self> {
        let folder = ModelFolder::open(dir)?;
        let index = folder.model_index()?;
        check_components(&folder, &index)?;
        let scheduler = folder.scheduler_config()?;
        let schedule = NoiseSchedule::from_config(&scheduler)?;
        let mut lora_set = LoraSet::open(loras)?;
        let text_encoder = load_folder_text_encoder(&folder, opts, &mut lora_set)?;
        let sdxl = crate::sdxl::SdxlParts::load(&folder, &index, opts, &mut lora_set)?;

        let unet_cfg = UNetConfig::from_file(&folder.config_file("unet")?)?;
        if unet_cfg.needs_added_conditions() && sdxl.is_none() {
            return Err(needs_sdxl_pipeline(&folder)?);
        }
        if sdxl.is_some() && crate::inpaint::is_inpainting(&unet_cfg) {
            return Err(EngineError::Config {
                path: folder.config_file("unet")?,
                message: "SDXL inpainting models are not supported yet; use an SDXL model that \
                          is not for inpainting"
                    .into(),
            });
        }
        let unet = load_folder_unet(&folder, &unet_cfg, opts, &mut lora_set)?;
        let lora_warnings = lora_set.finish()?;
        let schedule = schedule.for_sdxl(sdxl.is_some());

        let vae_cfg = VaeConfig::from_file(&folder.config_file("vae")?)?;
        let vae_files = folder.weight_files("vae")?;
        // SDXL's VAE decodes in f32 under an f16 model unless it is the fp16-fix one.
        let vae_dtype = crate::sdxl::vae_dtype(sdxl.is_some(), &vae_cfg, opts.dtype);
        let vae = load_folder_vae(&vae_files, &vae_cfg, vae_dtype, opts)?;
        let defaults = crate::model_defaults::ModelDefaults::from_configs(
            &crate::model_defaults::model_name(dir),
            &index,
            &scheduler,
            &unet_cfg,
            &vae_cfg,
        );

        Ok(Self {
            text_encoder,
            unet,
            vae,
            schedule,
            prediction: scheduler.prediction_type,
            device: opts.device.clone(),
            dtype: opts.dtype,
            loras: loras.to_vec(),
            lora_warnings,
            memory: MemoryOptions::default(),
            vae_files,
            sdxl,
            defaults,
            whole_picture: Default::default(),
        })
    }

    /// Loads a diffusers folder or a single-file checkpoint (`.safetensors`, original LDM names:
    /// SD1, SD2 or SDXL base), with an optional config folder and separate VAE file; see
    /// [`crate::single_file`].
    pub fn load_source(
        source: &crate::single_file::ModelSource,
        opts: &LoadOptions,
    ) -> Result<Self> {
        Self::load_source_with_loras(source, opts, &[])
    }

    /// [`Self::load_source`] with LoRAs merged as in [`Self::load_with_loras`]: a single file's
    /// layers get the same updates as the diffusers folder's (matched through the LDM renaming).
    pub fn load_source_with_loras(
        source: &crate::single_file::ModelSource,
        opts: &LoadOptions,
        loras: &[LoraSpec],
    ) -> Result<Self> {
        use crate::single_file;
        let mut pipeline = if source.path.is_dir() {
            Self::load_with_loras(&source.path, opts, loras)?
        } else if single_file::is_sdxl_file(&source.path)? {
            return Self::load_sdxl_file(source, opts, loras);
        } else {
            let mut lora_set = LoraSet::open(loras)?;
            let p = single_file::load(
                &source.path,
                source.config.as_deref(),
                source.vae.as_deref(),
                opts,
                &mut lora_set,
            )?;
            let lora_warnings = lora_set.finish()?;
            return Ok(Self {
                // Before the fields below move out of `p`.
                defaults: crate::model_defaults::ModelDefaults::for_unet(
                    &crate::model_defaults::model_name(&source.path),
                    p.unet.config(),
                    p.prediction,
                    p.vae.config(),
                ),
                sdxl: None,
                text_encoder: p.text_encoder,
                unet: p.unet,
                vae: p.vae,
                schedule: p.schedule,
                prediction: p.prediction,
                device: opts.device.clone(),
                dtype: opts.dtype,
                loras: loras.to_vec(),
                lora_warnings,
                memory: MemoryOptions::default(),
                vae_files: p.vae_files,
                whole_picture: Default::default(),
            });
        };
        if let Some(vae) = &source.vae {
            let cfg = pipeline.vae.config().clone();
            let dtype = match &pipeline.sdxl {
                Some(_) => crate::sdxl::vae_dtype(true, &cfg, opts.dtype),
                None => opts.dtype,
            };
            let vae_opts = LoadOptions {
                dtype,
                ..opts.clone()
            };
            let (model, files) = crate::single_file::load_vae_file(vae, &cfg, &vae_opts)?;
            if let Some(s) = &mut pipeline.sdxl {
                s.set_vae_files(files.clone());
            }
            pipeline.vae = model;
            pipeline.vae_files = files;
        }
        Ok(pipeline)
    }

    /// An SDXL base single file (a refiner file is refused with what to do instead).
    fn load_sdxl_file(
        source: &crate::single_file::ModelSource,
        opts: &LoadOptions,
        loras: &[LoraSpec],
    ) -> Result<Self> {
        let mut lora_set = LoraSet::open(loras)?;
        let p = crate::single_file::load_sdxl(
            &source.path,
            source.config.as_deref(),
            source.vae.as_deref(),
            opts,
            &mut lora_set,
        )?;
        let lora_warnings = lora_set.finish()?;
        let defaults = crate::model_defaults::ModelDefaults::for_unet(
            &crate::model_defaults::model_name(&source.path),
            p.unet.config(),
            p.prediction,
            p.vae.config(),
        );
        let sdxl = crate::sdxl::SdxlParts::new(
            p.encoder_2,
            p.force_zeros_for_empty_prompt,
            p.vae_files.clone(),
            p.vae_config,
        );
        Ok(Self {
            text_encoder: p.text_encoder,
            unet: p.unet,
            vae: p.vae,
            schedule: p.schedule.for_sdxl(true),
            prediction: p.prediction,
            device: opts.device.clone(),
            dtype: opts.dtype,
            loras: loras.to_vec(),
            lora_warnings,
            memory: MemoryOptions::default(),
            vae_files: p.vae_files,
            sdxl: Some(sdxl),
            defaults,
            whole_picture: Default::default(),
        })
    }

    /// A single-file checkpoint; `config` is a diffusers folder describing its architecture
    /// (diffusers' `from_single_file(config=...)`), else the embedded SD 1.5 / SD 2.1 / SDXL 1.0
    /// configs.
    pub fn load_single_file(
        path: &Path,
        opts: &LoadOptions,
        config: Option<&Path>,
    ) -> Result<Self> {
        Self::load_source(
            &crate::single_file::ModelSource {
                path: path.to_path_buf(),
                config: config.map(Path::to_path_buf),
                vae: None,
            },
            opts,
        )
    }

    /// The low-memory strategies in use.
    pub fn memory_options(&self) -> MemoryOptions {
        self.memory
    }

    /// Switches low-memory strategies (see [`crate::memory`]). Attention and batch splitting take
    /// effect at once; moving the VAE to the CPU or to f32 reloads only the VAE's weights, and
    /// moving the text encoders copies theirs. An SDXL refiner keeps its encoder where it is.
    pub fn set_memory_options(&mut self, memory: MemoryOptions) -> Result<()> {
        let vae_dtype = match &self.sdxl {
            Some(_) => crate::sdxl::vae_dtype(true, self.vae.config(), self.dtype),
            None => self.dtype,
        };
        let (device, dtype) = crate::memory::vae_placement(&memory, &self.device, vae_dtype);
        if !self.vae.device().same_device(&device) || self.vae.dtype() != dtype {
            let cfg = self.vae.config().clone();
            // The VAE may come from a single file in LDM names (see `crate::single_file`).
            let vb = crate::single_file::vae_var_builder(&self.vae_files, &cfg, dtype, &device)?;
            self.vae = AutoencoderKL::load(vb, &cfg)?;
        }
        // The text encoders move as a whole (their weights are copied, not read from disk again,
        // so LoRA merges and single-file renaming carry over); the conditioning comes back to
        // the UNet's device and dtype.
        let (device, dtype) =
            crate::memory::text_encoder_placement(&memory, &self.device, self.dtype);
        self.text_encoder
            .place(&device, dtype, &self.device, self.dtype)?;
        if let Some(s) = &mut self.sdxl {
            s.encoder_2
                .place(&device, dtype, &self.device, self.dtype)?;
        }
        self.unet.set_memory_options(&memory);
        self.vae.set_attention_options(memory.attention());
        self.memory = memory;
        self.apply_memory_to_refiner();
        Ok(())
    }

    /// The attention and batch strategies of [`Self::set_memory_options`] on the refiner's UNet
    /// too, as a staged run sets them. A refiner shared with another pipeline is left as it is:
    /// it is read-only there.
    pub(crate) fn apply_memory_to_refiner(&mut self) {
        let memory = self.memory;
        let refiner = self.sdxl.as_mut().and_then(|s| s.refiner.as_mut());
        if let Some(r) = refiner.and_then(std::sync::Arc::get_mut) {
            r.unet.set_memory_options(&memory);
        }
    }

    /// The LoRAs merged at load.
    pub fn loras(&self) -> &[LoraSpec] {
        &self.loras
    }

    /// What of the merged LoRAs was not applied (unknown layers, unsupported module kinds, ...).
    pub fn lora_warnings(&self) -> &[LoraWarning] {
        &self.lora_warnings
    }

    /// Replaces the textual-inversion embeddings prompts can use by name. Embeddings that do not
    /// fit this model (another width, too many vectors, a name already taken) are skipped and
    /// returned as warnings.
    pub fn set_embeddings(&mut self, embeddings: Vec<Embedding>) -> Vec<EmbeddingWarning> {
        self.text_encoder.set_embeddings(embeddings)
    }

    /// [`Self::set_embeddings`] with every `.safetensors` file under `dir` (subfolders too), named
    /// by file stem. Unusable files are skipped with warnings; an unreadable `dir` is an error.
    pub fn load_embeddings_dir(&mut self, dir: &Path) -> Result<Vec<EmbeddingWarning>> {
        self.load_embeddings_dirs(&[dir])
    }

    /// [`Self::load_embeddings_dir`] for several folders at once (the app's own and A1111's):
    /// their embeddings together, the first folder's winning a name both use.
    pub fn load_embeddings_dirs(&mut self, dirs: &[&Path]) -> Result<Vec<EmbeddingWarning>> {
        set_embeddings_from(&mut self.text_encoder, dirs)
    }

    /// The embeddings prompts can use.
    pub fn embeddings(&self) -> &[Embedding] {
        self.text_encoder.embeddings()
    }

    /// How a prompt will be read, without running a model: its chunks and token count, the
    /// embeddings it uses (for the infotext's "TI hashes"), its `<lora:...>` tags and syntax
    /// warnings.
    pub fn plan_prompt(&self, prompt: &str) -> Result<PromptPlan> {
        self.text_encoder.plan_prompt(prompt)
    }

    pub fn text_encoder(&self) -> &TextEncoder {
        &self.text_encoder
    }

    pub fn vae(&self) -> &AutoencoderKL {
        &self.vae
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

    pub fn device(&self) -> &Device {
        &self.device
    }

    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// Width and height must be multiples of this: the VAE's factor (8). The UNet takes any
    /// latent size (its up blocks resize to their skip connections, as diffusers' do).
    pub fn size_multiple(&self) -> usize {
        self.vae.config().downsampling_factor()
    }

    /// [`GenerateRequest::validate`] plus the limits of this model (size multiple, clip skip).
    pub fn validate(&self, req: &GenerateRequest) -> Result<()> {
        validate_for_model(
            req,
            self.size_multiple(),
            self.text_encoder.model().config().num_hidden_layers,
        )
    }

    /// Shape of the latent for `req`: `[1, C, height / 8, width / 8]`. The starting noise is
    /// `req.seed_source.generator(req.seed).randn(&shape)` times the sampler's initial scale.
    pub fn latent_shape(&self, req: &GenerateRequest) -> [usize; 4] {
        let f = self.vae.config().downsampling_factor();
        // The UNet's output channels: an inpainting UNet takes 5 more than it denoises.
        [
            1,
            self.unet.config().out_channels,
            req.height / f,
            req.width / f,
        ]
    }

    /// Runs one generation. Validates first; on [`Control::Cancel`] returns
    /// [`EngineError::Cancelled`].
    pub fn generate(
        &self,
        req: &GenerateRequest,
        observer: &mut dyn Observer,
    ) -> Result<GeneratedImage> {
        let latents = self.sample_latents(req, observer, &mut |_, _| {})?;
        let image = match &self.sdxl {
            Some(s) => self.decode_sdxl(s, &latents)?,
            None => self.decode(&latents)?,
        };
        let (width, height) = req.output_size();
        Ok(GeneratedImage {
            width,
            height,
            pixels: to_rgb8(&image)?,
            seed: req.seed,
        })
    }

    /// The sampling part of [`Pipeline::generate`]: returns the final latents in diffusers' scale
    /// (what the VAE decodes, before `1 / scaling_factor`). `on_state` sees the sampler state
    /// (k-diffusion space) before the first step (index 0) and after each step, with its sigma;
    /// tests use it to compare every step with the references.
    pub fn sample_latents(
        &self,
        req: &GenerateRequest,
        observer: &mut dyn Observer,
        on_state: &mut dyn FnMut(&Tensor, f64),
    ) -> Result<Tensor> {
        self.validate(req)?;
        if let Some(s) = &self.sdxl {
            return self.sample_sdxl(s, req, observer, on_state);
        }
        let conditioning = sd_conditioning(&self.text_encoder, self.unet.config(), req)?;
        crate::hires::two_pass(
            req,
            &self.schedule,
            observer,
            &mut |latents, fix| self.enlarge(latents, fix),
            &mut |r, init, observer| {
                let mut sampling = self.sampling();
                if crate::inpaint::is_inpainting(self.unet.config()) {
                    sampling.image = Some(self.whole_picture.get(r.height, r.width, || {
                        crate::inpaint::whole_picture(
                            &self.vae,
                            r.height,
                            r.width,
                            self.dtype,
                            &self.device,
                        )
                    })?);
                }
                sampling.run(
                    r,
                    self.latent_shape(r),
                    &conditioning,
                    init,
                    observer,
                    on_state,
                )
            },
        )
    }

    /// A first pass's latents (diffusers scale) enlarged for `fix`'s second pass: resized as
    /// latents, or decoded, resized as pixels and encoded again.
    pub(crate) fn enlarge(&self, latents: &Tensor, fix: &HiresFix) -> Result<Tensor> {
        let f = self.size_multiple();
        crate::hires::enlarge(latents, fix, f, || {
            let image = match &self.sdxl {
                Some(s) => self.decode_sdxl(s, latents)?,
                None => self.decode(latents)?,
            };
            let to = (self.dtype, &self.device);
            crate::hires::enlarge_decoded(&self.vae, &image, latents, fix, f, to)
        })
    }

    /// The sampling loops' view of this pipeline (SD1/SD2, and SDXL in [`crate::sdxl`]).
    pub(crate) fn sampling(&self) -> SdSampling<'_> {
        SdSampling {
            unet: &self.unet,
            schedule: &self.schedule,
            prediction: self.prediction,
            dtype: self.dtype,
            device: &self.device,
            image: None,
        }
    }

    /// Latents (diffusers scale) -> image `[1, 3, H, W]`, f32, roughly in [-1, 1].
    pub fn decode(&self, latents: &Tensor) -> Result<Tensor> {
        decode_with(&self.vae, self.memory.vae_tiling, latents)
    }
}

/// [`GenerateRequest::validate`] plus a model's limits: sizes a multiple of `size_multiple` (the
/// VAE's factor), clip skip up to `text_layers` (the text encoder's depth).
fn validate_for_model(
    req: &GenerateRequest,
    size_multiple: usize,
    text_layers: usize,
) -> Result<()> {
    req.validate()?;
    let m = size_multiple;
    let hires = req
        .hires
        .iter()
        .flat_map(|f| [("the hires width", f.width), ("the hires height", f.height)]);
    for (field, v) in [("width", req.width), ("height", req.height)]
        .into_iter()
        .chain(hires)
    {
        if !v.is_multiple_of(m) {
            return Err(EngineError::InvalidRequest(format!(
                "{field} must be a multiple of {m} for this model, got {v}"
            )));
        }
    }
    if req.clip_skip > text_layers {
        return Err(EngineError::InvalidRequest(format!(
            "clip_skip must be between 1 and {text_layers} for this model, got {}",
            req.clip_skip
        )));
    }
    Ok(())
}

/// Latents (diffusers scale) -> image `[1, 3, H, W]` in f32 through `vae`, in tiles when `tiled`.
fn decode_with(vae: &AutoencoderKL, tiled: bool, latents: &Tensor) -> Result<Tensor> {
    // The VAE may live elsewhere than the UNet (low-memory mode, fp32 retry).
    let z = latents.to_device(vae.device())?.to_dtype(vae.dtype())?;
    let image = if tiled {
        vae.decode_scaled_tiled(&z, &crate::vae::TileOptions::default())?
    } else {
        vae.decode_scaled(&z)?
    };
    Ok(image.to_dtype(DType::F32)?)
}

/// Sets `encoder`'s embeddings to those under `dirs` in one go (setting replaces, so folders
/// given one by one would keep only the last one's); logs and returns what was skipped.
pub(crate) fn set_embeddings_from(
    encoder: &mut TextEncoder,
    dirs: &[&Path],
) -> Result<Vec<EmbeddingWarning>> {
    let mut embeddings = Vec::new();
    let mut warnings = Vec::new();
    for dir in dirs {
        let (found, skipped) = textual_inversion::load_dir(dir)?;
        embeddings.extend(found);
        warnings.extend(skipped);
    }
    warnings.extend(encoder.set_embeddings(embeddings));
    for w in &warnings {
        tracing::warn!("embedding skipped: {w}");
    }
    Ok(warnings)
}

/// The text conditioning of an SD1/SD2 request: the prompt's embeddings, and the negative
/// prompt's when guidance is on. `unet` is the config of the UNet it is for (guidance-embedded
/// models take the scale as an input instead of CFG).
fn sd_conditioning(
    text_encoder: &TextEncoder,
    unet: &UNetConfig,
    req: &GenerateRequest,
) -> Result<Conditioning> {
    let cfg_scale = cfg_scale_for(req.cfg_scale, unet.guidance_embedded());
    // A1111 prompt syntax, long prompts in 75-token chunks, embeddings; `<lora:...>` tags are
    // taken out here (the caller loads the LoRAs they name, see `Pipeline::load_with_loras`).
    let (cond, uncond) = if cfg_scale != 1.0 {
        let (c, u) = text_encoder.encode_pair(&req.prompt, &req.negative_prompt, req.clip_skip)?;
        (c.hidden, Some(u.hidden))
    } else {
        (
            text_encoder
                .encode_prompt(&req.prompt, req.clip_skip)?
                .hidden,
            None,
        )
    };
    Ok(Conditioning {
        cond,
        uncond,
        cfg_scale,
    })
}

/// What the sampling loops need besides the conditioning, borrowed from a [`Pipeline`] or from a
/// staged run's UNet stage ([`staged`]), so both draw through the same code: SD1/SD2's
/// [`SdSampling::run`] here, SDXL's `run_sdxl` in [`crate::sdxl`].
pub(crate) struct SdSampling<'a> {
    pub(crate) unet: &'a UNet2DConditionModel,
    pub(crate) schedule: &'a NoiseSchedule,
    pub(crate) prediction: PredictionType,
    pub(crate) dtype: DType,
    pub(crate) device: &'a Device,
    /// An inpainting UNet's mask and masked-picture latents ([`crate::inpaint::whole_picture`]).
    pub(crate) image: Option<Tensor>,
}

impl SdSampling<'_> {
    /// Seeded noise of `shape`, sampled under `conditioning`; the final latents in diffusers'
    /// scale. With `init`, a hires fix's second pass: the enlarged latents plus that noise, from
    /// part-way down the schedule ([`HiresFix::sigmas`]). `on_state` as in
    /// [`Pipeline::sample_latents`].
    pub(crate) fn run(
        &self,
        req: &GenerateRequest,
        shape: [usize; 4],
        conditioning: &Conditioning,
        init: Option<(&Tensor, &HiresFix)>,
        observer: &mut dyn Observer,
        on_state: &mut dyn FnMut(&Tensor, f64),
    ) -> Result<Tensor> {
        let unet = UNetPredictor {
            unet: self.unet,
            timestep_cond: self.unet.guidance_embedding(req.cfg_scale)?,
            image: self.image.as_ref(),
        };
        let denoiser = Denoiser::new(
            &unet,
            self.schedule,
            self.prediction,
            conditioning,
            self.dtype,
        )?;

        let sampler = req.sampler.sampler();
        let sigmas = crate::hires::pass_sigmas(sampler.as_ref(), self.schedule, req, init);
        // One generator for the whole run: the sampler's extra noise continues the stream after
        // the initial latent, as A1111 does (`ImageRNG.next`).
        let mut rng = req.seed_source.generator(req.seed);
        let noise = rng.randn_tensor(&shape, self.device)?;
        let x = crate::hires::starting_state(sampler.as_ref(), &sigmas, noise, init)?;
        on_state(&x, sigmas[0]);

        let every = observer.preview_every();
        let mut step_observer = |info: &StepInfo<'_>| {
            on_state(info.x, info.sigma_next);
            let done = info.step + 1;
            let preview = match every {
                Some(n) if done.is_multiple_of(n.get()) || done == info.total => {
                    // A failed preview must not fail the image; it is only a picture of progress.
                    latent_preview(info.denoised).ok().flatten()
                }
                _ => None,
            };
            observer.on_progress(&Progress {
                step: done,
                total: info.total,
                preview: preview.as_ref(),
            })
        };
        let mut ctx = SampleContext {
            denoiser: &denoiser,
            noise: rng.as_mut(),
            observer: &mut step_observer,
        };
        let x = sampler.sample(x, &sigmas, &mut ctx);
        // A recorded step graph holds its intermediates' device memory, which the VAE needs next.
        self.unet.release_graphs();
        sampler.final_latents(&x?, sigmas[sigmas.len() - 1])
    }
}

/// A `VarBuilder` over `weights`, with a LoRA patch when there is one.
fn patched_var_builder(
    weights: &Weights,
    patch: Option<Arc<dyn LoadPatch>>,
    opts: &LoadOptions,
) -> Result<candle_nn::VarBuilder<'static>> {
    match patch {
        Some(p) => weights.var_builder_patched(opts.dtype, &opts.device, p),
        None => weights.var_builder(opts.dtype, &opts.device),
    }
}

/// Refuses a diffusers folder whose `model_index.json` lacks a component a pipeline needs.
fn check_components(folder: &ModelFolder, index: &crate::config::ModelIndex) -> Result<()> {
    for component in ["scheduler", "text_encoder", "tokenizer", "unet", "vae"] {
        if !index.has_component(component) {
            return Err(EngineError::Config {
                path: folder.root().join("model_index.json"),
                message: format!("no {component} component listed"),
            });
        }
    }
    Ok(())
}

/// The error for an SDXL-type UNet config met where an SD1/SD2 pipeline loads.
fn needs_sdxl_pipeline(folder: &ModelFolder) -> Result<EngineError> {
    Ok(EngineError::Config {
        path: folder.config_file("unet")?,
        message: "SDXL-type UNets (added text/time conditions) need the SDXL pipeline".into(),
    })
}

/// A diffusers folder's `text_encoder` and `tokenizer`, with the LoRAs' modules for it merged.
fn load_folder_text_encoder(
    folder: &ModelFolder,
    opts: &LoadOptions,
    lora_set: &mut LoraSet,
) -> Result<TextEncoder> {
    let cfg = ClipConfig::from_file(folder.config_file("text_encoder")?)?;
    let weights = Weights::open_all(&folder.weight_files("text_encoder")?)?;
    let vb = patched_var_builder(
        &weights,
        lora_set.patch_for(LoraTarget::TextEncoder, &weights)?,
        opts,
    )?;
    let model = opts.load_text_encoder(|| ClipTextModel::load(vb, &cfg))?;
    let tokenizer = ClipTokenizer::from_dir(folder.component_dir("tokenizer")?)?;
    TextEncoder::new(tokenizer, model)
}

/// A diffusers folder's `unet` (config `cfg`), with the LoRAs' modules for it merged.
fn load_folder_unet(
    folder: &ModelFolder,
    cfg: &UNetConfig,
    opts: &LoadOptions,
    lora_set: &mut LoraSet,
) -> Result<UNet2DConditionModel> {
    let weights = Weights::open_all(&folder.weight_files("unet")?)?;
    let patch = lora_set.patch_for(
        LoraTarget::Unet,
        &crate::ldm_names::FolderUnetNames::new(&weights, cfg),
    )?;
    let merged = patch.is_some();
    let vb = patched_var_builder(&weights, patch, opts)?;
    Ok(opts.load_unet(&weights, merged, || UNet2DConditionModel::load(vb, cfg))?)
}

/// A diffusers folder's `vae` (its weight `files`), in `dtype`; its weights in f16 storage in
/// low-memory mode ([`LoadOptions::load_vae`]).
fn load_folder_vae(
    files: &[std::path::PathBuf],
    cfg: &VaeConfig,
    dtype: DType,
    opts: &LoadOptions,
) -> Result<AutoencoderKL> {
    let vb = Weights::open_all(files)?.var_builder(dtype, &opts.device)?;
    Ok(opts.load_vae(dtype, &opts.device, || AutoencoderKL::load(vb, cfg))?)
}

/// The VAE in `files` (a diffusers component, a VAE file or a whole checkpoint's), in `dtype`;
/// its weights in f16 storage in low-memory mode ([`LoadOptions::load_vae`]).
pub(crate) fn load_vae_from(
    files: &[std::path::PathBuf],
    cfg: &VaeConfig,
    dtype: DType,
    opts: &LoadOptions,
) -> Result<AutoencoderKL> {
    let vb = crate::single_file::vae_var_builder(files, cfg, dtype, &opts.device)?;
    Ok(opts.load_vae(dtype, &opts.device, || AutoencoderKL::load(vb, cfg))?)
}

/// The UNet as the denoiser's network, with the guidance embedding of guidance-embedded models
/// (the same on every call, so the samplers never see it).
struct UNetPredictor<'a> {
    unet: &'a UNet2DConditionModel,
    timestep_cond: Option<Tensor>,
    /// `[1, 5, h, w]` appended to every sample's channels for an inpainting UNet.
    image: Option<&'a Tensor>,
}

impl NoisePredictor for UNetPredictor<'_> {
    fn predict(&self, x_in: &Tensor, timestep: f64, context: &Tensor) -> Result<Tensor> {
        let cond = self.timestep_cond.as_ref();
        let joined;
        let x_in = match self.image {
            Some(image) => {
                let batch = x_in.dim(0)?;
                let image = image.to_dtype(x_in.dtype())?.repeat((batch, 1, 1, 1))?;
                joined = Tensor::cat(&[x_in, &image], 1)?;
                &joined
            }
            None => x_in,
        };
        Ok(self
            .unet
            .forward_cond(x_in, timestep, context, None, cond)?)
    }
}

/// `[1, 3, H, W]` in [-1, 1] -> row-major RGB8: `round(clamp(x / 2 + 0.5, 0, 1) * 255)` with
/// ties to even, as numpy/torch round in diffusers' and A1111's image conversion.
pub fn to_rgb8(image: &Tensor) -> Result<Vec<u8>> {
    let hwc = image
        .squeeze(0)?
        .permute((1, 2, 0))?
        .to_device(&Device::Cpu)?
        .to_dtype(DType::F32)?
        .flatten_all()?
        .to_vec1::<f32>()?;
    Ok(hwc
        .into_iter()
        // NaN (a broken fp16 run) becomes 0 rather than garbage.
        .map(|v| ((v / 2.0 + 0.5).clamp(0.0, 1.0) * 255.0).round_ties_even() as u8)
        .collect())
}

/// SD1/SD2 latent -> RGB linear map, one row per latent channel (keturn, "Decoding latents to
/// RGB without upscaling", discuss.huggingface.co/t/23204; A1111's "Approx cheap" preview).
const LATENT_RGB: [[f32; 3]; 4] = [
    [0.298, 0.207, 0.208],
    [0.187, 0.286, 0.173],
    [-0.158, 0.189, 0.264],
    [-0.184, -0.271, -0.473],
];

/// A cheap preview of an SD1/SD2 clean-latent estimate `[1, 4, h, w]`: a 4x3 linear map per
/// latent pixel, so h x w pixels; `None` for latent spaces the map does not fit.
pub fn latent_preview(denoised: &Tensor) -> Result<Option<Preview>> {
    latent_preview_with(denoised, &LATENT_RGB)
}

/// The preview with a model family's latent -> RGB map, one row per latent channel; `None`
/// when the latent's channels do not match the map.
pub fn latent_preview_with(denoised: &Tensor, map: &[[f32; 3]]) -> Result<Option<Preview>> {
    let (c, h, w) = match denoised.dims() {
        &[1, c, h, w] => (c, h, w),
        _ => return Ok(None),
    };
    if c != map.len() {
        return Ok(None);
    }
    let v = denoised
        .to_device(&Device::Cpu)?
        .to_dtype(DType::F32)?
        .flatten_all()?
        .to_vec1::<f32>()?;
    let plane = h * w;
    let mut pixels = Vec::with_capacity(plane * 3);
    for i in 0..plane {
        let mut rgb = [0f32; 3];
        for (ch, row) in map.iter().enumerate() {
            let z = v[ch * plane + i];
            for (acc, coef) in rgb.iter_mut().zip(row) {
                *acc += z * coef;
            }
        }
        pixels.extend(rgb.map(|x| ((x / 2.0 + 0.5).clamp(0.0, 1.0) * 255.0).round() as u8));
    }
    Ok(Some(Preview {
        width: w,
        height: h,
        pixels,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_validation_names_the_field() {
        let ok = GenerateRequest::default();
        ok.validate().unwrap();
        let cases: Vec<(GenerateRequest, &str)> = vec![
            (
                GenerateRequest {
                    width: 500,
                    ..ok.clone()
                },
                "width",
            ),
            (
                GenerateRequest {
                    width: 56,
                    ..ok.clone()
                },
                "width",
            ),
            (
                GenerateRequest {
                    height: 2056,
                    ..ok.clone()
                },
                "height",
            ),
            (
                GenerateRequest {
                    steps: 0,
                    ..ok.clone()
                },
                "steps",
            ),
            (
                GenerateRequest {
                    steps: 151,
                    ..ok.clone()
                },
                "steps",
            ),
            (
                GenerateRequest {
                    cfg_scale: f64::NAN,
                    ..ok.clone()
                },
                "cfg_scale",
            ),
            (
                GenerateRequest {
                    cfg_scale: f64::INFINITY,
                    ..ok.clone()
                },
                "cfg_scale",
            ),
            (
                GenerateRequest {
                    clip_skip: 0,
                    ..ok.clone()
                },
                "clip_skip",
            ),
        ];
        for (req, field) in cases {
            match req.validate() {
                Err(EngineError::InvalidRequest(m)) => assert!(m.starts_with(field), "{m}"),
                other => panic!("{field}: {other:?}"),
            }
        }
    }

    #[test]
    fn rgb8_rounds_and_clamps() {
        let t = Tensor::new(&[-2f32, -1.0, 0.0, 0.5, 1.0, 3.0, f32::NAN], &Device::Cpu)
            .unwrap()
            .reshape((1, 1, 1, 7))
            .unwrap();
        assert_eq!(to_rgb8(&t).unwrap(), [0, 0, 128, 191, 255, 255, 0]);
    }

    #[test]
    fn preview_is_one_pixel_per_latent() {
        let z = Tensor::zeros((1, 4, 3, 5), DType::F32, &Device::Cpu).unwrap();
        let p = latent_preview(&z).unwrap().unwrap();
        assert_eq!((p.width, p.height, p.pixels.len()), (5, 3, 45));
        assert!(p.pixels.iter().all(|&v| v == 128));
        let z = Tensor::zeros((1, 16, 3, 5), DType::F32, &Device::Cpu).unwrap();
        assert!(latent_preview(&z).unwrap().is_none());
    }
}
