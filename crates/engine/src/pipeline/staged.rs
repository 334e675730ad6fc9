//! One generation that holds one model at a time, for one-shot runs in little memory
//! (`generate --low-memory`, issue 12: SD 1.5 at 512x512 on the CPU within 2.1 GB). The text
//! encoder is loaded, run and freed before the UNet loads, and the UNet is freed before the VAE
//! loads, so the peak is the largest model plus its working memory rather than all three models
//! plus the largest working memory. Every run reads each model again, so a server that draws
//! many pictures keeps a [`Pipeline`](super::Pipeline) instead.
//!
//! SDXL base models run the same way. Their two text encoders (CLIP-L and OpenCLIP-bigG, 3.3 GB
//! in f32) share the first stage: together they are a third of the UNet (10.3 GB), so loading
//! them one after the other would not lower the peak. The UNet stage adds the pooled text and
//! the size time ids ([`crate::sdxl`]).
//!
//! An SDXL refiner ([`StagedPipeline::set_refiner`]) adds two stages: its own text encoder
//! (OpenCLIP-bigG again, 2.8 GB in f32) after the base's are freed, and its UNet between the
//! base's and the VAE: the base UNet samples up to the switch point and is freed, then the
//! refiner's UNet (9.1 GB in f32) loads and takes the run ([`SdxlRun`]: latents, noise
//! generator, steps done) to the end. The whole pipeline keeps all of them, both UNets alone
//! 19.4 GB in f32, where the stages need the largest model alone.
//!
//! Models come as diffusers folders or as single-file checkpoints (SD1, SD2, SDXL base; with an
//! optional config folder and separate VAE file, see [`crate::single_file`]). A single file is
//! memory-mapped again by each stage, which takes only the tensors of its own model; the
//! models are built by the same loaders [`Pipeline::load_source`](super::Pipeline::load_source)
//! uses, so the pictures are the same.
//!
//! Each stage ([`TextStage`], [`RefinerTextStage`], [`UnetStage`], [`RefinerStage`],
//! [`VaeStage`]) owns the model it loads, so a model
//! that was freed cannot be used by mistake; one stage serves any number of pictures (the app
//! encodes a whole batch's prompts, then samples them all, then decodes them all), and dropping
//! it frees its model. LoRAs merge into the text encoders and the UNet as they load, and
//! textual-inversion embeddings are set on the loaded text encoder, as in a whole pipeline.

use std::path::{Path, PathBuf};

use candle_core::{DType, Tensor};

use super::{
    load_folder_text_encoder, load_folder_unet, load_folder_vae, load_vae_from, sd_conditioning,
    to_rgb8, validate_for_model, GenerateRequest, GeneratedImage, LoadOptions, Observer,
    SdSampling,
};
use crate::checkpoint::ModelFamily;
use crate::clip::{ClipConfig, PromptPlan, TextEncoder};
use crate::config::{ModelFolder, PredictionType};
use crate::denoiser::Conditioning;
use crate::hires::HiresFix;
use crate::lora::LoraSet;
use crate::memory::MemoryOptions;
use crate::refiner::{OpenedRefiner, RefinerOptions};
use crate::schedule::NoiseSchedule;
use crate::sdxl::{SdxlConditioning, SdxlOptions, SdxlRun, SizeConditioning};
use crate::single_file::{self, ModelSource, SdCheckpoint, SdxlCheckpoint};
use crate::textual_inversion::{Embedding, EmbeddingWarning};
use crate::unet::{UNet2DConditionModel, UNetConfig};
use crate::vae::{AutoencoderKL, VaeConfig};
use crate::{EngineError, Result};

/// An SD1/SD2 or SDXL base model (diffusers folder or single file), opened (configs read,
/// nothing loaded) for staged runs.
#[derive(Debug)]
pub struct StagedPipeline {
    source: Source,
    opts: LoadOptions,
    text_layers: usize,
    unet_cfg: UNetConfig,
    vae_cfg: VaeConfig,
    vae_files: Vec<PathBuf>,
    /// The VAE's own dtype: SDXL's decodes in f32 under an f16 model ([`crate::sdxl::vae_dtype`]).
    vae_dtype: DType,
    schedule: NoiseSchedule,
    prediction: PredictionType,
    memory: MemoryOptions,
    /// `None` for SD1/SD2.
    sdxl: Option<SdxlBase>,
    /// An SDXL refiner for the steps after its switch point ([`Self::set_refiner`]).
    refiner: Option<StagedRefiner>,
    /// An inpainting UNet's mask and grey-picture latents, by size: the VAE is loaded for them
    /// once, not for every picture.
    whole_picture: crate::inpaint::WholePictureCache,
}

/// A refiner opened for a staged run, and when it takes over.
#[derive(Debug)]
struct StagedRefiner {
    opened: OpenedRefiner,
    /// The size conditioning is the default (the picture's own size, no crop), as for the base.
    options: SdxlOptions,
}

/// Where the stages load their models from. The configs the stages share are copied into
/// [`StagedPipeline`]'s fields when it opens, from the folder or the opened file alike.
#[derive(Debug)]
enum Source {
    /// A diffusers folder. `separate_vae`: the VAE comes from a file given beside it (in LDM or
    /// diffusers names, so it loads through the single-file VAE mapping), not from `vae/`.
    Folder {
        folder: ModelFolder,
        separate_vae: bool,
    },
    /// An SD1/SD2 single file (boxed: its configs and tokenizer are kilobytes).
    Sd(Box<SdCheckpoint>),
    /// An SDXL base single file (boxed, as `Sd`).
    Sdxl(Box<SdxlCheckpoint>),
}

/// What an SDXL base model's stages need beyond an SD1/SD2 one's.
#[derive(Debug)]
struct SdxlBase {
    /// `model_index.json` (a file: its configs, [`single_file::SdxlConfigs`]): an empty
    /// negative prompt means zero conditioning.
    force_zeros_for_empty_prompt: bool,
}

/// A prompt encoded by [`StagedPipeline::encode`], for [`UnetStage::sample`] of the same request.
#[derive(Debug, Clone)]
pub enum EncodedPrompt {
    /// SD1/SD2: the text embeddings the UNet attends to.
    Sd(Conditioning),
    /// SDXL: both encoders' embeddings and the pooled projection. The time ids and the guidance
    /// embedding are added by the UNet stage, which has the model they are for. `refiner`: the
    /// refiner's encoder's, when the request reaches the refiner's switch point.
    Sdxl {
        base: SdxlConditioning,
        refiner: Option<SdxlConditioning>,
    },
}

impl EncodedPrompt {
    /// Whether the negative prompt was encoded too, as classifier-free guidance needs.
    pub fn guided(&self) -> bool {
        match self {
            Self::Sd(c) => c.uncond.is_some(),
            Self::Sdxl { base, .. } => base.uncond.is_some(),
        }
    }
}

/// What the UNet stage leaves of one picture.
#[derive(Debug)]
pub enum Sampled {
    /// The final latents in diffusers' scale, for [`VaeStage::decode`].
    Latents(Tensor),
    /// An SDXL run stopped at the refiner's switch point, for [`RefinerStage::refine`].
    ToRefine(Box<SdxlRun>),
}

impl Sampled {
    /// Whether the refiner has steps left to do.
    pub fn needs_refiner(&self) -> bool {
        matches!(self, Self::ToRefine(_))
    }

    /// The final latents; an error while the refiner's steps are left.
    pub fn into_latents(self) -> Result<Tensor> {
        match self {
            Self::Latents(t) => Ok(t),
            Self::ToRefine(run) => Err(run.unfinished()),
        }
    }
}

impl StagedPipeline {
    /// Whether `path` is a model a staged run can draw with: an SD1/SD2 or SDXL base diffusers
    /// folder or single-file checkpoint. An SDXL refiner, which draws nothing on its own (it
    /// joins a base model's run through [`Self::set_refiner`]), and a file that is no usable
    /// checkpoint (a pickle, a VAE or LoRA, a damaged file) are left to
    /// [`Pipeline`](super::Pipeline), whose load says what is wrong with them.
    pub fn supports(path: &Path) -> Result<bool> {
        if !path.is_dir() {
            let family = single_file::check_checkpoint(path).map(|info| info.family);
            return Ok(matches!(
                family,
                Ok(Some(
                    ModelFamily::Sd1 | ModelFamily::Sd2 | ModelFamily::SdxlBase
                ))
            ));
        }
        let folder = ModelFolder::open(path)?;
        let unet_cfg = UNetConfig::from_file(&folder.config_file("unet")?)?;
        if crate::sdxl::is_sdxl(&folder.model_index()?) {
            // SDXL inpainting folders too are left to the whole pipeline, which refuses them.
            return Ok(!crate::inpaint::is_inpainting(&unet_cfg));
        }
        Ok(!unet_cfg.needs_added_conditions())
    }

    /// Reads the folder's configs and checks it is complete; loads no weights.
    pub fn open(dir: &Path, opts: &LoadOptions) -> Result<Self> {
        let folder = ModelFolder::open(dir)?;
        let index = folder.model_index()?;
        super::check_components(&folder, &index)?;
        let unet_cfg = UNetConfig::from_file(&folder.config_file("unet")?)?;
        let sdxl = if crate::sdxl::is_sdxl(&index) {
            crate::sdxl::check_components(&folder, &index)?;
            Some(SdxlBase {
                force_zeros_for_empty_prompt: crate::sdxl::zeros_for_empty_prompt(&index),
            })
        } else if unet_cfg.needs_added_conditions() {
            return Err(super::needs_sdxl_pipeline(&folder)?);
        } else {
            None
        };
        let scheduler = folder.scheduler_config()?;
        let vae_cfg = VaeConfig::from_file(&folder.config_file("vae")?)?;
        Self::checked(Self {
            text_layers: ClipConfig::from_file(folder.config_file("text_encoder")?)?
                .num_hidden_layers,
            vae_dtype: crate::sdxl::vae_dtype(sdxl.is_some(), &vae_cfg, opts.dtype),
            vae_cfg,
            vae_files: folder.weight_files("vae")?,
            schedule: NoiseSchedule::from_config(&scheduler)?.for_sdxl(sdxl.is_some()),
            prediction: scheduler.prediction_type,
            unet_cfg,
            source: Source::Folder {
                folder,
                separate_vae: false,
            },
            opts: opts.clone(),
            memory: MemoryOptions::default(),
            sdxl,
            refiner: None,
            whole_picture: Default::default(),
        })
    }

    /// [`Self::open`] for what [`Pipeline::load_source`](super::Pipeline::load_source) takes: a
    /// diffusers folder, or a single-file checkpoint (SD1/SD2/SDXL base) read with `source`'s
    /// config folder (else the embedded configs); either with `source`'s separate VAE file.
    /// Checks the file and reads its configs; loads no weights. An SDXL refiner file is refused
    /// as the whole pipeline refuses it.
    pub fn open_source(source: &ModelSource, opts: &LoadOptions) -> Result<Self> {
        let path = &source.path;
        if path.is_dir() {
            let mut staged = Self::open(path, opts)?;
            if let Some(vae) = &source.vae {
                // The folder's own config describes the VAE, as in `Pipeline::load_source`.
                single_file::check_vae_file(vae)?;
                staged.vae_files = vec![vae.clone()];
                if let Source::Folder { separate_vae, .. } = &mut staged.source {
                    *separate_vae = true;
                }
                staged = Self::checked(staged)?;
            }
            return Ok(staged);
        }
        let (config, vae) = (source.config.as_deref(), source.vae.as_deref());
        let staged = if single_file::is_sdxl_file(path)? {
            let file = SdxlCheckpoint::open(path, config, vae)?;
            let configs = file.configs();
            // Only a refiner lacks CLIP-L; it finishes a base model's pictures.
            let Some(clip_cfg) = &configs.text_encoder else {
                return Err(single_file::refiner_cannot_draw(path));
            };
            Self {
                text_layers: clip_cfg.num_hidden_layers,
                unet_cfg: configs.unet.clone(),
                vae_cfg: configs.vae.clone(),
                vae_files: file.file().vae_files().to_vec(),
                vae_dtype: file.vae_dtype(opts),
                schedule: file.file().schedule().clone().for_sdxl(true),
                prediction: configs.scheduler.prediction_type,
                sdxl: Some(SdxlBase {
                    force_zeros_for_empty_prompt: configs.force_zeros_for_empty_prompt,
                }),
                source: Source::Sdxl(Box::new(file)),
                opts: opts.clone(),
                memory: MemoryOptions::default(),
                refiner: None,
                whole_picture: Default::default(),
            }
        } else {
            let file = SdCheckpoint::open(path, config, vae)?;
            let configs = file.configs();
            Self {
                text_layers: configs.text_encoder.num_hidden_layers,
                unet_cfg: configs.unet.clone(),
                vae_cfg: configs.vae.clone(),
                vae_files: file.file().vae_files().to_vec(),
                vae_dtype: file.vae_dtype(opts),
                schedule: file.file().schedule().clone(),
                prediction: configs.scheduler.prediction_type,
                sdxl: None,
                source: Source::Sd(Box::new(file)),
                opts: opts.clone(),
                memory: MemoryOptions::default(),
                refiner: None,
                whole_picture: Default::default(),
            }
        };
        Self::checked(staged)
    }

    /// `staged` once its VAE files' headers read: the VAE loads only after sampling, so a
    /// damaged file is reported now (no weights are read), not after the user has waited for
    /// every step.
    fn checked(staged: Self) -> Result<Self> {
        drop(crate::weights::Weights::open_all(&staged.vae_files)?);
        Ok(staged)
    }

    /// Adds an SDXL refiner (folder or single file) for the steps after `options.switch_at`, as
    /// [`Pipeline::load_refiner`](super::Pipeline::load_refiner) does for a whole pipeline: its
    /// text encoder joins [`Self::load_text_encoders`], and its UNet is
    /// [`Self::load_refiner`]'s. Reads its configs and file headers; loads no weights. Only for
    /// SDXL base models.
    pub fn set_refiner(&mut self, source: &ModelSource, options: RefinerOptions) -> Result<()> {
        if self.sdxl.is_none() {
            return Err(EngineError::InvalidRequest(
                "a refiner needs an SDXL base model".into(),
            ));
        }
        options.validate()?;
        self.refiner = Some(StagedRefiner {
            opened: OpenedRefiner::open(source)?,
            options: SdxlOptions {
                size: SizeConditioning::default(),
                refiner: options,
            },
        });
        Ok(())
    }

    /// The step at which the refiner takes over `req` (the base model's steps), when one is set
    /// and its switch point comes before the last step; `None` when the base does every step.
    pub fn refiner_switch_step(&self, req: &GenerateRequest) -> Option<usize> {
        let r = self.refiner.as_ref()?;
        let sigmas = self.sigmas(req);
        let switch = crate::refiner::switch_index(&self.schedule, &sigmas, &r.options.refiner);
        (switch + 1 < sigmas.len()).then_some(switch)
    }

    /// The sigmas `req`'s sampler walks on this model's schedule.
    fn sigmas(&self, req: &GenerateRequest) -> Vec<f64> {
        req.sampler
            .sampler()
            .sigmas(&self.schedule, req.schedule, req.steps)
    }

    /// The refiner [`Self::set_refiner`] set, for its stages.
    fn refiner(&self) -> Result<&StagedRefiner> {
        self.refiner
            .as_ref()
            .ok_or_else(|| EngineError::InvalidRequest("no refiner was set".into()))
    }

    /// The low-memory strategies the stages use: attention slicing, batch splitting and VAE
    /// tiling (placement options do not apply: each model is alone in memory anyway).
    pub fn set_memory_options(&mut self, memory: MemoryOptions) {
        self.memory = memory;
    }

    /// [`GenerateRequest::validate`] plus this model's limits (size multiple, clip skip).
    pub fn validate(&self, req: &GenerateRequest) -> Result<()> {
        validate_for_model(req, self.vae_cfg.downsampling_factor(), self.text_layers)
    }

    /// As [`Pipeline::latent_shape`](super::Pipeline::latent_shape).
    pub fn latent_shape(&self, req: &GenerateRequest) -> [usize; 4] {
        let f = self.vae_cfg.downsampling_factor();
        [1, self.unet_cfg.out_channels, req.height / f, req.width / f]
    }

    /// Stage 1 in one call: validates `req`, loads the text encoder (SDXL: both), encodes the
    /// prompt (and the negative prompt when guidance is on) and frees the encoders; then, when
    /// `req` reaches a refiner's switch point, the same with the refiner's text encoder.
    pub fn encode(&self, req: &GenerateRequest) -> Result<EncodedPrompt> {
        self.validate(req)?;
        let mut prompt = self
            .load_text_encoders(&mut LoraSet::open(&[])?)?
            .encode(req)?;
        if self.refiner_switch_step(req).is_some() {
            self.load_refiner_text_encoder()?
                .encode_into(req, &mut prompt)?;
        }
        Ok(prompt)
    }

    /// Stage 1b: loads the refiner's text encoder (see [`Self::set_refiner`]) for
    /// [`RefinerTextStage::encode_into`]; dropping the stage frees it. Load it after the base's
    /// [`TextStage`] is dropped: with the base's two encoders (3.3 GB in f32) it would make the
    /// text stage larger than an f16 UNet.
    pub fn load_refiner_text_encoder(&self) -> Result<RefinerTextStage<'_>> {
        let r = self.refiner()?;
        let encoder = r.opened.load_encoder_2(&self.opts)?;
        log_memory("refiner text encoder loaded");
        Ok(RefinerTextStage {
            staged: self,
            refiner: r,
            encoder,
            _freed: Freed("refiner prompts encoded, refiner text encoder freed"),
        })
    }

    /// Stage 1: loads the text encoder (SDXL: both) with `loras`' text-encoder layers merged,
    /// for [`TextStage::encode`]; dropping the stage frees them. `loras` goes on to
    /// [`Self::load_unet_with`], then [`LoraSet::finish`] says what was not merged.
    pub fn load_text_encoders(&self, loras: &mut LoraSet) -> Result<TextStage<'_>> {
        let opts = &self.opts;
        let encoders = match &self.source {
            Source::Folder { folder, .. } => {
                let text_encoder = load_folder_text_encoder(folder, opts, loras)?;
                match &self.sdxl {
                    None => Encoders::Sd(text_encoder),
                    Some(_) => Encoders::Sdxl(
                        text_encoder,
                        Box::new(crate::sdxl::load_encoder_2(folder, opts, loras)?),
                    ),
                }
            }
            Source::Sd(file) => {
                Encoders::Sd(file.load_text_encoder(&file.file().weights()?, opts, loras)?)
            }
            Source::Sdxl(file) => {
                let weights = file.file().weights()?;
                Encoders::Sdxl(
                    file.load_text_encoder(&weights, opts, loras)?,
                    Box::new(file.load_encoder_2(&weights, opts, loras)?),
                )
            }
        };
        log_memory("text encoders loaded");
        Ok(TextStage {
            staged: self,
            encoders,
            _freed: Freed("prompts encoded, text encoders freed"),
        })
    }

    /// Stage 2: loads the UNet, which [`UnetStage::sample`] uses; dropping the stage frees it.
    pub fn load_unet(&self) -> Result<UnetStage<'_>> {
        self.load_unet_with(&mut LoraSet::open(&[])?)
    }

    /// [`Self::load_unet`] with `loras`' UNet layers merged.
    pub fn load_unet_with(&self, loras: &mut LoraSet) -> Result<UnetStage<'_>> {
        let opts = &self.opts;
        let mut unet = match &self.source {
            Source::Folder { folder, .. } => load_folder_unet(folder, &self.unet_cfg, opts, loras)?,
            Source::Sd(file) => file.load_unet(&file.file().weights()?, opts, loras)?,
            Source::Sdxl(file) => file.load_unet(&file.file().weights()?, opts, loras)?,
        };
        unet.set_memory_options(&self.memory);
        log_memory("UNet loaded");
        Ok(UnetStage {
            staged: self,
            unet,
            _freed: Freed("sampled, UNet freed"),
        })
    }

    /// Stage 2b: loads the refiner's UNet (see [`Self::set_refiner`]), which
    /// [`RefinerStage::refine`] uses; dropping the stage frees it. Load it after the base's
    /// [`UnetStage`] is dropped: that is the memory this saves.
    pub fn load_refiner(&self) -> Result<RefinerStage<'_>> {
        let r = self.refiner()?;
        let mut unet = r.opened.load_unet(&self.opts)?;
        unet.set_memory_options(&self.memory);
        log_memory("refiner loaded");
        Ok(RefinerStage {
            staged: self,
            refiner: r,
            unet,
            _freed: Freed("refined, refiner freed"),
        })
    }

    /// Stage 3: loads the VAE (in f32 when the memory options ask for it, as a whole pipeline's
    /// fp32 retry does) for [`VaeStage::decode`]; dropping the stage frees it.
    pub fn load_vae(&self) -> Result<VaeStage<'_>> {
        let (files, cfg) = (&self.vae_files, &self.vae_cfg);
        let (device, dtype) =
            crate::memory::vae_placement(&self.memory, &self.opts.device, self.vae_dtype);
        let opts = LoadOptions {
            device,
            ..self.opts.clone()
        };
        let mut vae = match &self.source {
            Source::Folder {
                separate_vae: false,
                ..
            } => load_folder_vae(files, cfg, dtype, &opts)?,
            // A VAE file or a checkpoint's VAE may be in LDM names; as `Pipeline::load_source`
            // loads it.
            _ => load_vae_from(files, cfg, dtype, &opts)?,
        };
        vae.set_attention_options(self.memory.attention());
        log_memory("VAE loaded");
        Ok(VaeStage {
            staged: self,
            vae,
            _freed: Freed("decoded, VAE freed"),
        })
    }

    /// Stage 3 in one call: loads the VAE, decodes `latents` (diffusers scale, from
    /// [`Sampled::into_latents`]) into `req`'s picture and frees the VAE.
    pub fn decode(&self, req: &GenerateRequest, latents: &Tensor) -> Result<GeneratedImage> {
        self.load_vae()?.decode(req, latents)
    }

    /// The stages in a row: the picture [`Pipeline::generate`](super::Pipeline::generate)
    /// draws for `req`, with one model in memory at a time.
    pub fn generate(
        &self,
        req: &GenerateRequest,
        observer: &mut dyn Observer,
    ) -> Result<GeneratedImage> {
        let prompt = self.encode(req)?;
        let mut sampled = self.load_unet()?.sample(req, &prompt, observer)?;
        if sampled.needs_refiner() {
            self.load_refiner()?
                .refine(req, &prompt, &mut sampled, observer)?;
        }
        self.decode(req, &sampled.into_latents()?)
    }
}

/// Returns freed memory to the system and logs the process's memory when a stage is dropped. A
/// stage's last field, so it runs after the stage's model was freed (fields drop in order).
#[derive(Debug)]
struct Freed(&'static str);

impl Drop for Freed {
    fn drop(&mut self) {
        crate::memory::release_freed_memory();
        log_memory(self.0);
    }
}

/// The loaded text encoder(s) of a staged run: CLIP-L, and SDXL's OpenCLIP-bigG second.
#[derive(Debug)]
pub struct TextStage<'a> {
    staged: &'a StagedPipeline,
    encoders: Encoders,
    _freed: Freed,
}

#[derive(Debug)]
enum Encoders {
    Sd(TextEncoder),
    /// CLIP-L, then OpenCLIP-bigG.
    Sdxl(TextEncoder, Box<TextEncoder>),
}

impl TextStage<'_> {
    /// CLIP-L: the encoder that holds the embeddings and reads the prompt's syntax, as in a
    /// whole pipeline.
    fn clip_l(&self) -> &TextEncoder {
        match &self.encoders {
            Encoders::Sd(e) | Encoders::Sdxl(e, _) => e,
        }
    }

    /// Sets the textual-inversion embeddings under `dirs` as
    /// [`Pipeline::load_embeddings_dirs`](super::Pipeline::load_embeddings_dirs) does; returns
    /// what was skipped.
    pub fn load_embeddings_dirs(&mut self, dirs: &[&Path]) -> Result<Vec<EmbeddingWarning>> {
        let (Encoders::Sd(e) | Encoders::Sdxl(e, _)) = &mut self.encoders;
        super::set_embeddings_from(e, dirs)
    }

    /// The embeddings prompts can use.
    pub fn embeddings(&self) -> &[Embedding] {
        self.clip_l().embeddings()
    }

    /// How a prompt will be read (its chunks, the embeddings it uses, ...), as
    /// [`Pipeline::plan_prompt`](super::Pipeline::plan_prompt).
    pub fn plan_prompt(&self, prompt: &str) -> Result<PromptPlan> {
        self.clip_l().plan_prompt(prompt)
    }

    /// Validates `req` and encodes its prompt (and the negative prompt when guidance is on).
    pub fn encode(&self, req: &GenerateRequest) -> Result<EncodedPrompt> {
        let s = self.staged;
        s.validate(req)?;
        Ok(match &self.encoders {
            Encoders::Sd(text_encoder) => {
                EncodedPrompt::Sd(sd_conditioning(text_encoder, &s.unet_cfg, req)?)
            }
            Encoders::Sdxl(text_encoder, encoder_2) => EncodedPrompt::Sdxl {
                base: crate::sdxl::text_conditioning(
                    [text_encoder, encoder_2.as_ref()],
                    s.sdxl
                        .as_ref()
                        .is_some_and(|b| b.force_zeros_for_empty_prompt),
                    &s.unet_cfg,
                    req,
                )?,
                // Added by the refiner's own text stage, once these encoders are freed.
                refiner: None,
            },
        })
    }
}

/// The loaded text encoder of an SDXL refiner (OpenCLIP-bigG, as the base's second).
#[derive(Debug)]
pub struct RefinerTextStage<'a> {
    staged: &'a StagedPipeline,
    refiner: &'a StagedRefiner,
    encoder: TextEncoder,
    _freed: Freed,
}

impl RefinerTextStage<'_> {
    /// Adds the refiner's conditioning of `req` to `prompt` (from [`TextStage::encode`] for the
    /// same request) when `req` reaches the refiner's switch point; otherwise leaves it as it is.
    pub fn encode_into(&self, req: &GenerateRequest, prompt: &mut EncodedPrompt) -> Result<()> {
        let EncodedPrompt::Sdxl { refiner, .. } = prompt else {
            return Err(EngineError::InvalidRequest(
                "the prompt was encoded for another kind of model; encode it with this one".into(),
            ));
        };
        if self.staged.refiner_switch_step(req).is_some() {
            *refiner = Some(self.refiner.opened.text_conditioning(&self.encoder, req)?);
        }
        Ok(())
    }
}

/// The loaded UNet of a staged run.
#[derive(Debug)]
pub struct UnetStage<'a> {
    staged: &'a StagedPipeline,
    unet: UNet2DConditionModel,
    _freed: Freed,
}

impl UnetStage<'_> {
    /// Applies `memory`'s attention and batch strategies to the loaded UNet, for the pictures
    /// sampled next (the app's recovery after running out of memory).
    pub fn set_memory_options(&mut self, memory: &MemoryOptions) {
        self.unet.set_memory_options(memory);
    }

    /// Samples `req` under `prompt` (from [`TextStage::encode`] for the same request): the final
    /// latents in diffusers' scale, or with a refiner whose switch point the request reaches,
    /// the run stopped there for [`RefinerStage::refine`]. When the observer cancels
    /// ([`crate::sampler::Control::Cancel`]) returns [`EngineError::Cancelled`].
    pub fn sample(
        &self,
        req: &GenerateRequest,
        prompt: &EncodedPrompt,
        observer: &mut dyn Observer,
    ) -> Result<Sampled> {
        let s = self.staged;
        if !prompt.guided()
            && crate::denoiser::cfg_scale_for(req.cfg_scale, s.unet_cfg.guidance_embedded()) != 1.0
        {
            // A prompt encoded for another request (no negative prompt) cannot guide this one.
            return Err(EngineError::InvalidRequest(
                "the conditioning was encoded without guidance; encode this request first".into(),
            ));
        }
        if req.hires.is_some() {
            if s.refiner
                .as_ref()
                .is_some_and(|r| r.options.refiner.switch_at < 1.0)
            {
                return Err(crate::sdxl::hires_with_refiner());
            }
            let latents = crate::hires::two_pass(
                req,
                &s.schedule,
                observer,
                &mut |latents, fix| self.enlarge(latents, fix),
                &mut |r, init, observer| match self.sample_pass(r, prompt, init, observer)? {
                    Sampled::Latents(l) => Ok(l),
                    Sampled::ToRefine(run) => Err(run.unfinished()),
                },
            )?;
            return Ok(Sampled::Latents(latents));
        }
        self.sample_pass(req, prompt, None, observer)
    }

    /// One pass of [`Self::sample`]: from noise, or (`init`) a hires fix's second pass.
    fn sample_pass(
        &self,
        req: &GenerateRequest,
        prompt: &EncodedPrompt,
        init: Option<(&Tensor, &HiresFix)>,
        observer: &mut dyn Observer,
    ) -> Result<Sampled> {
        let s = self.staged;
        // An inpainting UNet needs the grey picture's latents: the VAE is loaded for that one
        // encoding and freed again before sampling.
        let image = if crate::inpaint::is_inpainting(&s.unet_cfg) {
            Some(s.whole_picture.get(req.height, req.width, || {
                let vae = s.load_vae()?;
                crate::inpaint::whole_picture(
                    &vae.vae,
                    req.height,
                    req.width,
                    s.opts.dtype,
                    &s.opts.device,
                )
            })?)
        } else {
            None
        };
        let sampling = SdSampling {
            unet: &self.unet,
            schedule: &s.schedule,
            prediction: s.prediction,
            dtype: s.opts.dtype,
            device: &s.opts.device,
            image,
        };
        let shape = s.latent_shape(req);
        let on_state = &mut |_: &Tensor, _: f64| {};
        match (prompt, &s.sdxl) {
            (EncodedPrompt::Sd(c), None) => Ok(Sampled::Latents(
                sampling.run(req, shape, c, init, observer, on_state)?,
            )),
            (EncodedPrompt::Sdxl { base, refiner }, Some(_)) => {
                let switch_at = s.refiner.as_ref().map(|r| &r.options.refiner);
                let mut run = sampling.begin_sdxl(req, shape, switch_at, init, on_state)?;
                if run.base_steps() < run.total() && refiner.is_none() {
                    // Found before the base's steps, not after them.
                    return Err(EngineError::InvalidRequest(
                        "the prompt was encoded without the refiner; encode it with the \
                         refiner set"
                            .into(),
                    ));
                }
                // diffusers' micro-conditioning, the picture's own size and no crop: what a
                // `Pipeline` uses unless `set_sdxl_options` says otherwise.
                let size = SizeConditioning::default();
                let sized = crate::hires::conditioned(req, init);
                let stage = crate::sdxl::base_stage(base.clone(), &size, &sized, &self.unet)?;
                let to = run.base_steps();
                sampling.advance_sdxl(&mut run, to, &stage, req, observer, on_state)?;
                Ok(if run.needs_refiner() {
                    Sampled::ToRefine(Box::new(run))
                } else {
                    Sampled::Latents(run.finish(&s.opts.device)?)
                })
            }
            _ => Err(EngineError::InvalidRequest(
                "the prompt was encoded for another kind of model; encode it with this one".into(),
            )),
        }
    }

    /// [`Pipeline::enlarge`](super::Pipeline::enlarge) for a staged run: latent upscalers need
    /// nothing more; Lanczos loads the VAE beside the UNet for one decode and encode.
    fn enlarge(&self, latents: &Tensor, fix: &HiresFix) -> Result<Tensor> {
        let s = self.staged;
        let f = s.vae_cfg.downsampling_factor();
        crate::hires::enlarge(latents, fix, f, || {
            let vae = s.load_vae()?;
            let image = vae.decode_pixels(latents)?;
            let to = (s.opts.dtype, &s.opts.device);
            crate::hires::enlarge_decoded(&vae.vae, &image, latents, fix, f, to)
        })
    }
}

/// The loaded UNet of an SDXL refiner in a staged run.
#[derive(Debug)]
pub struct RefinerStage<'a> {
    staged: &'a StagedPipeline,
    refiner: &'a StagedRefiner,
    unet: UNet2DConditionModel,
    _freed: Freed,
}

impl RefinerStage<'_> {
    /// As [`UnetStage::set_memory_options`], for the refiner's UNet.
    pub fn set_memory_options(&mut self, memory: &MemoryOptions) {
        self.unet.set_memory_options(memory);
    }

    /// Takes `sampled` (from [`UnetStage::sample`] of the same request and prompt) through the
    /// refiner's steps, leaving the final latents in diffusers' scale in it
    /// ([`Sampled::Latents`]); latents that need no refiner stay as they are. Progress continues
    /// the base's step count. On an error (a prompt encoded without the refiner, a cancel) the
    /// base's work is still in `sampled`.
    pub fn refine(
        &self,
        req: &GenerateRequest,
        prompt: &EncodedPrompt,
        sampled: &mut Sampled,
        observer: &mut dyn Observer,
    ) -> Result<()> {
        let Sampled::ToRefine(run) = sampled else {
            return Ok(());
        };
        let EncodedPrompt::Sdxl {
            refiner: Some(c), ..
        } = prompt
        else {
            return Err(EngineError::InvalidRequest(
                "the prompt was encoded without the refiner; encode it with the refiner set".into(),
            ));
        };
        if run.total() + 1 != self.staged.sigmas(req).len() {
            return Err(EngineError::InvalidRequest(
                "these latents were sampled for a request with other steps".into(),
            ));
        }
        let r = self.refiner;
        let stage = crate::refiner::refiner_stage(
            c.clone(),
            r.opened.aesthetic,
            req,
            &r.options,
            &self.unet,
        )?;
        let sampling = SdSampling {
            unet: &self.unet,
            schedule: &r.opened.schedule,
            prediction: r.opened.prediction,
            dtype: self.unet.dtype(),
            device: self.unet.device(),
            image: None,
        };
        let total = run.total();
        sampling.advance_sdxl(run, total, &stage, req, observer, &mut |_, _| {})?;
        let latents = run.finish(&self.staged.opts.device)?;
        *sampled = Sampled::Latents(latents);
        Ok(())
    }
}

/// The loaded VAE of a staged run.
#[derive(Debug)]
pub struct VaeStage<'a> {
    staged: &'a StagedPipeline,
    vae: AutoencoderKL,
    _freed: Freed,
}

impl VaeStage<'_> {
    /// Decodes `latents` (diffusers scale, from [`Sampled::into_latents`]) into pixels in [-1, 1],
    /// f32, as [`Pipeline::decode`](super::Pipeline::decode). SDXL decodes as the whole
    /// pipeline does: again from an f32 copy when a half-precision decode overflows.
    pub fn decode_pixels(&self, latents: &Tensor) -> Result<Tensor> {
        let s = self.staged;
        let image = super::decode_with(&self.vae, s.memory.vae_tiling, latents)?;
        if s.sdxl.is_none() {
            return Ok(image);
        }
        crate::sdxl::redecode_if_overflowed(
            image,
            latents,
            &s.vae_files,
            &s.vae_cfg,
            &s.opts.device,
        )
    }

    /// [`Self::decode_pixels`] as `req`'s picture.
    pub fn decode(&self, req: &GenerateRequest, latents: &Tensor) -> Result<GeneratedImage> {
        let (width, height) = req.output_size();
        Ok(GeneratedImage {
            width,
            height,
            pixels: to_rgb8(&self.decode_pixels(latents)?)?,
            seed: req.seed,
        })
    }
}

/// Logs this process's resident memory and its peak so far at a stage boundary (`RUST_LOG=debug`),
/// from `/proc/self/status`; nothing where that file is missing.
fn log_memory(stage: &str) {
    if !tracing::enabled!(tracing::Level::DEBUG) {
        return;
    }
    let Ok(status) = std::fs::read_to_string("/proc/self/status") else {
        return;
    };
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .map(|v| v.trim().to_string())
            .unwrap_or_default()
    };
    tracing::debug!(
        "{stage}: resident {}, peak {}",
        field("VmRSS:"),
        field("VmHWM:")
    );
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pipeline::{HalfWeights, NoObserver, Pipeline};
    use crate::sampler::SamplerKind;

    fn tiny(name: &str) -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../../models/tiny")
            .join(name)
    }

    /// "a cat" at 64x64, guided, in 3 steps: long enough that the sampler's history matters.
    fn request() -> GenerateRequest {
        GenerateRequest {
            prompt: "a cat".into(),
            negative_prompt: "blurry".into(),
            steps: 3,
            width: 64,
            height: 64,
            seed: 7,
            ..Default::default()
        }
    }

    /// The staged picture of `req` from `dir` under `opts`, with and without batch splitting, is
    /// the whole pipeline's under the same options, to the byte. Returns the unsplit picture.
    fn assert_staged_draws_like_whole(
        dir: &Path,
        opts: &LoadOptions,
        req: &GenerateRequest,
    ) -> GeneratedImage {
        let mut whole = Pipeline::load(dir, opts).unwrap();
        let mut staged = StagedPipeline::open(dir, opts).unwrap();
        let what = format!("{} {:?} {:?}", dir.display(), opts.half_weights, opts.dtype);
        let unsplit = whole.generate(req, &mut NoObserver).unwrap();
        assert_eq!(
            staged.generate(req, &mut NoObserver).unwrap(),
            unsplit,
            "{what}"
        );
        let split = MemoryOptions {
            split_batch: true,
            ..Default::default()
        };
        whole.set_memory_options(split).unwrap();
        staged.set_memory_options(split);
        assert_eq!(
            staged.generate(req, &mut NoObserver).unwrap(),
            whole.generate(req, &mut NoObserver).unwrap(),
            "{what}, batch split"
        );
        unsplit
    }

    #[test]
    fn draws_exactly_what_the_pipeline_draws() {
        // Issue 12: staging changes when models are in memory, not what is computed: the same
        // seed gives the same pixels as a whole pipeline, in f32 and in f16 weight storage, and
        // with the guidance halves run one at a time (batch splitting is per-sample exact).
        for half_weights in [HalfWeights::Off, HalfWeights::On] {
            let opts = LoadOptions {
                half_weights,
                ..Default::default()
            };
            let whole = assert_staged_draws_like_whole(&tiny("sd1"), &opts, &request());
            let mut staged = StagedPipeline::open(&tiny("sd1"), &opts).unwrap();
            staged.set_memory_options(MemoryOptions {
                split_batch: true,
                ..Default::default()
            });
            assert_eq!(
                staged.generate(&request(), &mut NoObserver).unwrap(),
                whole,
                "{half_weights:?}, batch split against the unsplit pipeline"
            );
        }
    }

    #[test]
    fn loras_and_embeddings_apply_as_in_the_pipeline() {
        // The app's staged jobs: one text stage encodes every prompt of a batch with the LoRA's
        // text-encoder layers and the embeddings of two folders, one UNet stage samples them all
        // with the LoRA's UNet layers, then the VAE decodes; pixel for pixel the whole
        // pipeline's. Two folders: setting them one by one would keep only the last one's.
        let refs = tiny("../../tests/fixtures/refs");
        let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let emb = refs.join("tinyemb.safetensors");
        std::fs::copy(&emb, a.path().join("otheremb.safetensors")).unwrap();
        std::fs::copy(&emb, b.path().join("tinyemb.safetensors")).unwrap();
        let dirs = [a.path(), b.path()];
        let loras = [crate::lora::LoraSpec::new(
            refs.join("lora_kohya.safetensors"),
            0.7,
        )];
        let opts = LoadOptions::default();
        let mut whole = Pipeline::load_with_loras(&tiny("sd1"), &opts, &loras).unwrap();
        assert!(whole.load_embeddings_dirs(&dirs).unwrap().is_empty());
        let staged = StagedPipeline::open(&tiny("sd1"), &opts).unwrap();
        let requests: Vec<GenerateRequest> = [(7, "a cat, tinyemb"), (8, "otheremb, a dog")]
            .into_iter()
            .map(|(seed, prompt)| GenerateRequest {
                seed,
                prompt: prompt.into(),
                ..request()
            })
            .collect();

        let mut set = LoraSet::open(&loras).unwrap();
        let mut text = staged.load_text_encoders(&mut set).unwrap();
        assert!(text.load_embeddings_dirs(&dirs).unwrap().is_empty());
        let names: Vec<&str> = text.embeddings().iter().map(|e| e.name()).collect();
        assert_eq!(names, ["otheremb", "tinyemb"]);
        assert_eq!(
            text.plan_prompt("otheremb, a dog").unwrap().embeddings,
            ["otheremb"]
        );
        let prompts: Vec<EncodedPrompt> =
            requests.iter().map(|r| text.encode(r).unwrap()).collect();
        drop(text);
        let unet = staged.load_unet_with(&mut set).unwrap();
        let latents: Vec<Tensor> = requests
            .iter()
            .zip(&prompts)
            .map(|(r, p)| {
                let sampled = unet.sample(r, p, &mut NoObserver).unwrap();
                sampled.into_latents().unwrap()
            })
            .collect();
        drop(unet);
        assert!(set.finish().unwrap().is_empty());
        let vae = staged.load_vae().unwrap();
        for (req, latents) in requests.iter().zip(&latents) {
            let image = vae.decode(req, latents).unwrap();
            assert_eq!(
                image,
                whole.generate(req, &mut NoObserver).unwrap(),
                "{req:?}"
            );
            // Able to fail: without the LoRA the picture differs.
            assert_ne!(image, staged.generate(req, &mut NoObserver).unwrap());
        }
    }

    #[test]
    fn sdxl_draws_exactly_what_the_pipeline_draws() {
        // As for SD1, through SDXL's conditioning: both encoders, the pooled projection and the
        // time ids; the negative prompt encoded, or zeros for an empty one
        // (`force_zeros_for_empty_prompt`); the guidance-embedded lcm-sdxl, whose UNet gets the
        // scale as `timestep_cond` and no negative prompt. With batch splitting the whole
        // pipeline splits too: SDXL's time embedding is per sample, and a one-row product may
        // round differently from a two-row one (2 of 12,288 bytes, one level, in this model).
        let empty_negative = GenerateRequest {
            negative_prompt: String::new(),
            ..request()
        };
        for half_weights in [HalfWeights::Off, HalfWeights::On] {
            let opts = LoadOptions {
                half_weights,
                ..Default::default()
            };
            assert_staged_draws_like_whole(&tiny("sdxl"), &opts, &request());
            assert_staged_draws_like_whole(&tiny("sdxl"), &opts, &empty_negative);
            assert_staged_draws_like_whole(&tiny("sdxl-lcm"), &opts, &request());
        }
    }

    #[test]
    fn sdxl_in_f16_decodes_with_an_f32_vae_as_the_pipeline_does() {
        // The tiny SDXL's VAE says `force_upcast`: under an f16 model it loads in f32
        // (`sdxl::vae_dtype`); an f16 VAE would give other pixels.
        let opts = LoadOptions {
            dtype: DType::F16,
            ..Default::default()
        };
        let staged = StagedPipeline::open(&tiny("sdxl"), &opts).unwrap();
        assert_eq!(staged.vae_dtype, DType::F32);
        assert_staged_draws_like_whole(&tiny("sdxl"), &opts, &request());
    }

    #[test]
    fn stages_compose_like_generate() {
        for family in ["sd1", "sdxl"] {
            let req = request();
            let staged = StagedPipeline::open(&tiny(family), &LoadOptions::default()).unwrap();
            let prompt = staged.encode(&req).unwrap();
            let latents = staged
                .load_unet()
                .unwrap()
                .sample(&req, &prompt, &mut NoObserver)
                .unwrap()
                .into_latents()
                .unwrap();
            assert_eq!(latents.dims(), staged.latent_shape(&req), "{family}");
            assert_eq!(
                staged.decode(&req, &latents).unwrap(),
                staged.generate(&req, &mut NoObserver).unwrap(),
                "{family}"
            );
        }
    }

    #[test]
    fn unguided_conditioning_is_refused_for_a_guided_request() {
        for family in ["sd1", "sdxl"] {
            let staged = StagedPipeline::open(&tiny(family), &LoadOptions::default()).unwrap();
            let unguided = GenerateRequest {
                cfg_scale: 1.0,
                ..request()
            };
            let prompt = staged.encode(&unguided).unwrap();
            assert!(!prompt.guided(), "{family}");
            let err = staged
                .load_unet()
                .unwrap()
                .sample(&request(), &prompt, &mut NoObserver)
                .unwrap_err();
            assert!(
                matches!(&err, EngineError::InvalidRequest(m) if m.contains("without guidance")),
                "{family}: {err}"
            );
        }
    }

    #[test]
    fn a_prompt_encoded_for_another_kind_of_model_is_refused() {
        // An SD1 prompt has no pooled embedding for SDXL's added conditions, and an SDXL prompt
        // is twice as wide as SD1's cross-attention.
        let req = request();
        let sd1 = StagedPipeline::open(&tiny("sd1"), &LoadOptions::default()).unwrap();
        let sdxl = StagedPipeline::open(&tiny("sdxl"), &LoadOptions::default()).unwrap();
        for (encoder, unet) in [(&sd1, &sdxl), (&sdxl, &sd1)] {
            let prompt = encoder.encode(&req).unwrap();
            let err = unet
                .load_unet()
                .unwrap()
                .sample(&req, &prompt, &mut NoObserver)
                .unwrap_err();
            assert!(
                matches!(&err, EngineError::InvalidRequest(m) if m.contains("another kind")),
                "{err}"
            );
        }
    }

    #[test]
    fn requests_are_checked_against_the_model_before_loading() {
        let staged = StagedPipeline::open(&tiny("sd1"), &LoadOptions::default()).unwrap();
        for (req, field) in [
            (
                GenerateRequest {
                    width: 60,
                    ..request()
                },
                "width",
            ),
            (
                GenerateRequest {
                    clip_skip: 99,
                    ..request()
                },
                "clip_skip",
            ),
        ] {
            match staged.encode(&req) {
                Err(EngineError::InvalidRequest(m)) => assert!(m.starts_with(field), "{m}"),
                other => panic!("{field}: {other:?}"),
            }
        }
    }

    #[test]
    fn a_damaged_vae_is_reported_before_any_model_loads() {
        // The VAE loads last, after every step: its file must be checked when the run opens.
        let tmp = tempfile::tempdir().unwrap();
        let copy = tmp.path().join("sd1");
        crate::memory::tests::copy_dir(&tiny("sd1"), &copy);
        let vae = copy.join("vae/diffusion_pytorch_model.safetensors");
        let bytes = std::fs::read(&vae).unwrap();
        std::fs::write(&vae, &bytes[..bytes.len() / 2]).unwrap();
        let err = StagedPipeline::open(&copy, &LoadOptions::default()).unwrap_err();
        assert!(err.to_string().contains("vae"), "{err}");
    }

    #[test]
    fn an_sdxl_folder_without_its_second_encoder_is_refused_when_opened() {
        // The index and the UNet's config are all `open` reads before it refuses.
        let tmp = tempfile::tempdir().unwrap();
        let src = tiny("sdxl");
        std::fs::create_dir(tmp.path().join("unet")).unwrap();
        std::fs::copy(
            src.join("unet/config.json"),
            tmp.path().join("unet/config.json"),
        )
        .unwrap();
        let mut index: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(src.join("model_index.json")).unwrap())
                .unwrap();
        index["text_encoder_2"] = serde_json::json!([null, null]);
        std::fs::write(tmp.path().join("model_index.json"), index.to_string()).unwrap();
        let err = StagedPipeline::open(tmp.path(), &LoadOptions::default()).unwrap_err();
        assert!(err.to_string().contains("text_encoder_2"), "{err}");
    }

    #[test]
    fn base_folders_are_staged_refiners_and_non_checkpoints_not() {
        for family in ["sd1", "sd2", "sdxl", "sdxl-lcm"] {
            assert!(StagedPipeline::supports(&tiny(family)).unwrap(), "{family}");
        }
        // A refiner draws nothing on its own; files that are no whole checkpoint (a diffusers
        // component, a pickle, a missing file) go to `Pipeline`, whose load explains. Single
        // checkpoints that are staged: tests/single_file.rs, which builds them.
        assert!(!StagedPipeline::supports(&tiny("sdxl-refiner")).unwrap());
        let refs = tiny("../../tests/fixtures/refs");
        for file in [
            tiny("sd1").join("unet/diffusion_pytorch_model.safetensors"),
            refs.join("pickles/sd1_vae_ldm.ckpt"),
            refs.join("no-such-model.safetensors"),
        ] {
            assert!(!StagedPipeline::supports(&file).unwrap(), "{file:?}");
        }
        assert!(StagedPipeline::open(&tiny("sdxl-refiner"), &LoadOptions::default()).is_err());
    }

    /// A whole SDXL pipeline with the tiny refiner switching at `switch_at`.
    fn whole_with_refiner(switch_at: f64) -> Pipeline {
        let mut whole = Pipeline::load(&tiny("sdxl"), &LoadOptions::default()).unwrap();
        whole
            .load_refiner(&tiny("sdxl-refiner"), &LoadOptions::default())
            .unwrap();
        whole
            .set_sdxl_options(SdxlOptions {
                refiner: RefinerOptions {
                    switch_at,
                    ..Default::default()
                },
                ..Default::default()
            })
            .unwrap();
        whole
    }

    #[test]
    fn a_refiner_finishes_the_run_as_in_the_pipeline() {
        // Issue 12: the refiner's UNet loads once the base's is freed and takes the run from the
        // switch point; the pixels are the whole pipeline's (which holds both), and the progress
        // counts on from the base's steps. 4 steps of DPM++ 2M Karras: 0.5 splits them, 0 gives
        // the refiner all of them, 1 leaves it out; and Euler a split at 0.5.
        let folder = ModelSource::new(tiny("sdxl-refiner"));
        let req = GenerateRequest {
            steps: 4,
            ..request()
        };
        let mut base_only = None;
        for (switch_at, sampler) in [
            (0.5, SamplerKind::DpmPp2M),
            (0.0, SamplerKind::DpmPp2M),
            (1.0, SamplerKind::DpmPp2M),
            // Ancestral: the refiner's steps draw on from the base's noise generator.
            (0.5, SamplerKind::EulerA),
        ] {
            let req = GenerateRequest {
                sampler,
                ..req.clone()
            };
            let options = RefinerOptions {
                switch_at,
                ..Default::default()
            };
            let mut staged = StagedPipeline::open(&tiny("sdxl"), &LoadOptions::default()).unwrap();
            staged.set_refiner(&folder, options).unwrap();
            let switch = [(0.5, Some(2)), (0.0, Some(0)), (1.0, None)];
            let expected = switch.iter().find(|s| s.0 == switch_at).unwrap().1;
            let at = staged.refiner_switch_step(&req);
            if sampler == SamplerKind::DpmPp2M {
                assert_eq!(at, expected, "{switch_at}");
            } else {
                assert!(matches!(at, Some(1..=3)), "{at:?}");
            }
            let prompt = staged.encode(&req).unwrap();
            let mut steps = Vec::new();
            let mut observer = |p: &crate::pipeline::Progress<'_>| {
                steps.push((p.step, p.total));
                crate::sampler::Control::Continue
            };
            let unet = staged.load_unet().unwrap();
            let mut sampled = unet.sample(&req, &prompt, &mut observer).unwrap();
            if switch_at < 1.0 {
                let again = unet.sample(&req, &prompt, &mut NoObserver).unwrap();
                assert!(
                    again.into_latents().is_err(),
                    "latents before the refiner ran"
                );
            }
            drop(unet);
            assert_eq!(sampled.needs_refiner(), switch_at < 1.0, "{switch_at}");
            if sampled.needs_refiner() {
                let refiner = staged.load_refiner().unwrap();
                // A prompt without the refiner's conditioning is refused, the base's work kept.
                let EncodedPrompt::Sdxl { base, .. } = &prompt else {
                    unreachable!("an SDXL prompt")
                };
                let base_only = EncodedPrompt::Sdxl {
                    base: base.clone(),
                    refiner: None,
                };
                assert!(refiner
                    .refine(&req, &base_only, &mut sampled, &mut NoObserver)
                    .is_err());
                assert!(sampled.needs_refiner());
                refiner
                    .refine(&req, &prompt, &mut sampled, &mut observer)
                    .unwrap();
            }
            let latents = sampled.into_latents().unwrap();
            let expected: Vec<_> = (1..=4).map(|s| (s, 4)).collect();
            assert_eq!(steps, expected, "{switch_at}");
            let picture = staged.decode(&req, &latents).unwrap();
            assert_eq!(
                picture,
                whole_with_refiner(switch_at)
                    .generate(&req, &mut NoObserver)
                    .unwrap(),
                "{switch_at}"
            );
            assert_eq!(
                staged.generate(&req, &mut NoObserver).unwrap(),
                picture,
                "{switch_at}: generate"
            );
            if switch_at == 1.0 {
                base_only = Some(picture);
            } else if sampler == SamplerKind::DpmPp2M {
                assert_ne!(Some(&picture), base_only.as_ref(), "{switch_at}");
            }
        }
        let plain = StagedPipeline::open(&tiny("sdxl"), &LoadOptions::default()).unwrap();
        assert_eq!(
            plain.generate(&req, &mut NoObserver).unwrap(),
            base_only.unwrap(),
            "switch at 1 is the base alone"
        );
    }

    #[test]
    fn a_whole_pipelines_refiner_takes_its_memory_strategies() {
        // As a staged run's refiner does: the OOM recovery's batch splitting and attention
        // slicing must reach the refiner's steps too, whether the refiner comes before or after
        // the options.
        let split = MemoryOptions {
            split_batch: true,
            attention_slice: Some(4096),
            ..Default::default()
        };
        let refiner_unet = |p: &Pipeline| {
            let u = p.refiner().unwrap().unet();
            (u.max_batch(), u.attention_options())
        };
        let mut whole = whole_with_refiner(0.5);
        assert_eq!(refiner_unet(&whole).0, None);
        whole.set_memory_options(split).unwrap();
        assert_eq!(refiner_unet(&whole), (Some(1), split.attention()));
        let mut late = Pipeline::load(&tiny("sdxl"), &LoadOptions::default()).unwrap();
        late.set_memory_options(split).unwrap();
        late.load_refiner(&tiny("sdxl-refiner"), &LoadOptions::default())
            .unwrap();
        assert_eq!(refiner_unet(&late), (Some(1), split.attention()));
    }

    #[test]
    fn refiner_misuse_is_refused_before_any_step() {
        let folder = ModelSource::new(tiny("sdxl-refiner"));
        let options = RefinerOptions {
            switch_at: 0.5,
            ..Default::default()
        };
        let opts = LoadOptions::default();
        // Only an SDXL base takes a refiner, and only a valid switch point.
        let mut sd1 = StagedPipeline::open(&tiny("sd1"), &opts).unwrap();
        let err = sd1.set_refiner(&folder, options).unwrap_err();
        assert!(err.to_string().contains("SDXL base"), "{err}");
        let mut staged = StagedPipeline::open(&tiny("sdxl"), &opts).unwrap();
        let bad = RefinerOptions {
            switch_at: 1.5,
            ..options
        };
        assert!(staged.set_refiner(&folder, bad).is_err());
        assert!(staged.load_refiner().is_err(), "no refiner set");
        // A prompt encoded before the refiner was set has no refiner conditioning: refused
        // before the base model's steps are spent.
        let req = request();
        let prompt = staged.encode(&req).unwrap();
        staged.set_refiner(&folder, options).unwrap();
        let mut calls = 0;
        let mut observer = |_: &crate::pipeline::Progress<'_>| {
            calls += 1;
            crate::sampler::Control::Continue
        };
        let err = staged
            .load_unet()
            .unwrap()
            .sample(&req, &prompt, &mut observer)
            .unwrap_err();
        assert!(err.to_string().contains("without the refiner"), "{err}");
        assert_eq!(calls, 0);
        // A missing refiner folder is named when it is set, not after sampling.
        let missing = ModelSource::new(tiny("no-such-refiner"));
        assert!(staged.set_refiner(&missing, options).is_err());
    }
}
