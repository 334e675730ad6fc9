//! SDXL conditioning and sampling: the two text encoders (CLIP-L and OpenCLIP-bigG, penultimate
//! hidden states side by side), the pooled text embedding through `text_projection`, the size and
//! crop micro-conditioning (`add_time_ids`) the UNet's `add_embedding` takes, and an SDXL VAE
//! decode that never returns a black image. The refiner stage is in [`crate::refiner`].
//!
//! Reference: diffusers `StableDiffusionXLPipeline` (`encode_prompt`, `_get_add_time_ids`,
//! the `force_upcast` decode), proven on tests/fixtures/refs/sdxl.safetensors.

use std::path::PathBuf;
use std::sync::Arc;

use candle_core::{DType, Device, Tensor};

use crate::clip::{ClipConfig, ClipTextModel, HiddenLayer, TextEncoder};
use crate::config::{ModelFolder, ModelIndex};
use crate::denoiser::{cfg_scale_for, Conditioning, Denoiser, NoisePredictor};
use crate::hires::HiresFix;
use crate::lora::{LoraSet, LoraTarget};
use crate::pipeline::{
    GenerateRequest, LoadOptions, Observer, Pipeline, Preview, Progress, SdSampling,
};
use crate::refiner::{Refiner, RefinerOptions};
use crate::rng::NoiseSource;
use crate::sampler::{SampleContext, StepInfo};
use crate::tokenizer::ClipTokenizer;
use crate::unet::{AddedConditions, UNet2DConditionModel, UNetConfig};
use crate::vae::{AutoencoderKL, VaeConfig};
use crate::weights::Weights;
use crate::{EngineError, Result};

/// The `_class_name` of an SDXL base model's `model_index.json`.
pub const SDXL_PIPELINE: &str = "StableDiffusionXLPipeline";

/// Size and crop micro-conditioning (SDXL paper, section 2.2). `None` sizes mean the generated
/// image's own size, diffusers' default; the crop defaults to (0, 0), "not cropped".
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct SizeConditioning {
    /// (height, width) the training image "originally" had; larger looks sharper.
    pub original: Option<(usize, usize)>,
    /// (top, left) of the crop.
    pub crop_top_left: (usize, usize),
    /// (height, width) of the intended result.
    pub target: Option<(usize, usize)>,
}

impl SizeConditioning {
    /// diffusers' `add_time_ids`: `[orig_h, orig_w, crop_top, crop_left, target_h, target_w]` for
    /// an image of `height` x `width`.
    pub fn time_ids(&self, height: usize, width: usize) -> [f32; 6] {
        let (oh, ow) = self.original.unwrap_or((height, width));
        let (ct, cl) = self.crop_top_left;
        let (th, tw) = self.target.unwrap_or((height, width));
        [oh, ow, ct, cl, th, tw].map(|v| v as f32)
    }

    /// The refiner's ids: `[orig_h, orig_w, crop_top, crop_left, aesthetic_score]` (diffusers
    /// `StableDiffusionXLImg2ImgPipeline._get_add_time_ids` with `requires_aesthetics_score`).
    pub fn aesthetic_time_ids(&self, height: usize, width: usize, score: f64) -> [f32; 5] {
        let (oh, ow) = self.original.unwrap_or((height, width));
        let (ct, cl) = self.crop_top_left;
        [oh as f32, ow as f32, ct as f32, cl as f32, score as f32]
    }
}

/// SDXL settings that are not part of [`GenerateRequest`] (kept on the pipeline, so that the
/// request type, built field by field in other crates, stays as it is). `Default` is diffusers'
/// behaviour: sizes from the request, no crop, the refiner (when loaded) from 80 %.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct SdxlOptions {
    pub size: SizeConditioning,
    pub refiner: RefinerOptions,
}

/// What an SDXL base pipeline holds beyond an SD1/SD2 one.
#[derive(Debug)]
pub struct SdxlParts {
    /// OpenCLIP bigG (`text_encoder_2` / `tokenizer_2`), whose pooled output is projected.
    pub(crate) encoder_2: TextEncoder,
    /// `model_index.json`: an empty negative prompt means zero conditioning.
    pub(crate) force_zeros_for_empty_prompt: bool,
    pub(crate) options: SdxlOptions,
    pub(crate) refiner: Option<Arc<Refiner>>,
    /// The VAE's files and config, to decode again in f32 if an f16 decode overflows.
    vae_files: Vec<PathBuf>,
    vae_config: VaeConfig,
}

/// Whether `index` describes an SDXL base pipeline.
pub fn is_sdxl(index: &ModelIndex) -> bool {
    index.class_name == SDXL_PIPELINE
}

/// The dtype the VAE should be loaded in: f32 when the model runs in f16 and the VAE's config
/// says `force_upcast` (SDXL's VAE overflows to inf/NaN in f16, which gives black images;
/// diffusers upcasts the same way). The "fp16-fix" VAE (madebyollin/sdxl-vae-fp16-fix) says
/// `"force_upcast": false` and stays in f16. Only SDXL pipelines do this, as in diffusers.
pub fn vae_dtype(sdxl: bool, cfg: &VaeConfig, dtype: DType) -> DType {
    if sdxl && cfg.force_upcast && dtype == DType::F16 {
        DType::F32
    } else {
        dtype
    }
}

/// Loads `text_encoder_2` / `tokenizer_2`, with the LoRAs' modules for it merged.
pub(crate) fn load_encoder_2(
    folder: &ModelFolder,
    opts: &LoadOptions,
    loras: &mut LoraSet,
) -> Result<TextEncoder> {
    let cfg = ClipConfig::from_file(folder.config_file("text_encoder_2")?)?;
    let weights = Weights::open_all(&folder.weight_files("text_encoder_2")?)?;
    let vb = match loras.patch_for(LoraTarget::TextEncoder2, &weights)? {
        Some(p) => weights.var_builder_patched(opts.dtype, &opts.device, p)?,
        None => weights.var_builder(opts.dtype, &opts.device)?,
    };
    let model = opts.load_text_encoder(|| ClipTextModel::load(vb, &cfg))?;
    if !model.has_projection() {
        return Err(EngineError::Config {
            path: folder.config_file("text_encoder_2")?,
            message: "SDXL's second text encoder needs text_projection.weight \
                      (CLIPTextModelWithProjection)"
                .into(),
        });
    }
    let tokenizer = ClipTokenizer::from_dir(folder.component_dir("tokenizer_2")?)?;
    TextEncoder::new(tokenizer, model)
}

/// Refuses an SDXL base folder whose `model_index.json` lacks the second text encoder or its
/// tokenizer (the components beyond [`crate::pipeline`]'s SD1/SD2 check).
pub(crate) fn check_components(folder: &ModelFolder, index: &ModelIndex) -> Result<()> {
    for component in ["text_encoder_2", "tokenizer_2"] {
        if !index.has_component(component) {
            return Err(EngineError::Config {
                path: folder.root().join("model_index.json"),
                message: format!("an SDXL pipeline needs {component}"),
            });
        }
    }
    Ok(())
}

/// Whether an SDXL base model conditions an empty negative prompt on zeros: the index's
/// `force_zeros_for_empty_prompt`, else diffusers' SDXL default (its `__init__` argument).
pub(crate) fn zeros_for_empty_prompt(index: &ModelIndex) -> bool {
    index.force_zeros_for_empty_prompt.unwrap_or(true)
}

impl SdxlParts {
    /// The SDXL extras of `folder` when its index says `StableDiffusionXLPipeline`, else `None`.
    pub(crate) fn load(
        folder: &ModelFolder,
        index: &ModelIndex,
        opts: &LoadOptions,
        loras: &mut LoraSet,
    ) -> Result<Option<Self>> {
        if !is_sdxl(index) {
            return Ok(None);
        }
        check_components(folder, index)?;
        Ok(Some(Self {
            encoder_2: load_encoder_2(folder, opts, loras)?,
            force_zeros_for_empty_prompt: zeros_for_empty_prompt(index),
            options: SdxlOptions::default(),
            refiner: None,
            vae_files: folder.weight_files("vae")?,
            vae_config: VaeConfig::from_file(&folder.config_file("vae")?)?,
        }))
    }

    /// The parts of an SDXL base single file (see [`crate::single_file::load_sdxl`]).
    pub(crate) fn new(
        encoder_2: TextEncoder,
        force_zeros_for_empty_prompt: bool,
        vae_files: Vec<PathBuf>,
        vae_config: VaeConfig,
    ) -> Self {
        Self {
            encoder_2,
            force_zeros_for_empty_prompt,
            options: SdxlOptions::default(),
            refiner: None,
            vae_files,
            vae_config,
        }
    }

    /// The VAE was replaced by a separate file: the f32 retry must decode with that one.
    pub(crate) fn set_vae_files(&mut self, files: Vec<PathBuf>) {
        self.vae_files = files;
    }

    pub fn encoder_2(&self) -> &TextEncoder {
        &self.encoder_2
    }
}

/// A prompt pair encoded for SDXL's UNet.
#[derive(Debug, Clone)]
pub struct SdxlConditioning {
    /// `[1, 77 * chunks, context_dim]`.
    pub cond: Tensor,
    /// Negative prompt's embeddings, when guidance is on.
    pub uncond: Option<Tensor>,
    /// `[1, pooled_dim]`.
    pub pooled: Tensor,
    pub uncond_pooled: Option<Tensor>,
}

/// The HiddenLayer SDXL conditions on for A1111 clip skip `clip_skip`: 1 (no skip) is
/// `hidden_states[-2]`, as diffusers' `clip_skip=None`; each further skip goes one layer back
/// (diffusers' `clip_skip=n` is `hidden_states[-(n + 2)]`, i.e. our `n + 1`).
pub fn sdxl_layer(clip_skip: usize) -> HiddenLayer {
    HiddenLayer::Raw(clip_skip.max(1) + 1)
}

/// One prompt through every encoder, hidden states concatenated along the feature axis, the last
/// encoder's projected pooled output. Chunk counts are evened out with encoded empty prompts
/// (they differ when an embedding is known to one encoder only).
fn encode_one(
    encoders: &[&TextEncoder],
    prompt: &str,
    layer: HiddenLayer,
) -> Result<(Tensor, Tensor)> {
    let mut hidden = Vec::with_capacity(encoders.len());
    let mut pooled = None;
    for enc in encoders {
        let (e, p) = enc.encode_prompt_pooled(prompt, layer)?;
        hidden.push(e.hidden);
        pooled = Some(p);
    }
    let tokens = hidden
        .iter()
        .map(|h| h.dim(1))
        .collect::<candle_core::Result<Vec<_>>>()?;
    let max = tokens.iter().copied().max().unwrap_or(0);
    for (i, enc) in encoders.iter().enumerate() {
        if tokens[i] < max {
            hidden[i] = pad_with_empty(enc, &hidden[i], max, layer)?;
        }
    }
    let pooled = pooled.ok_or_else(|| EngineError::InvalidRequest("no text encoder".into()))?;
    Ok((Tensor::cat(&hidden, 2)?, pooled))
}

/// `hidden` `[1, t, d]` extended to `[1, tokens, d]` with encoded empty chunks (A1111's
/// `pad_cond_uncond`).
fn pad_with_empty(
    enc: &TextEncoder,
    hidden: &Tensor,
    tokens: usize,
    layer: HiddenLayer,
) -> Result<Tensor> {
    let (empty, _) = enc.encode_prompt_pooled("", layer)?;
    let mut parts = vec![hidden.clone()];
    let mut have = hidden.dim(1)?;
    while have < tokens {
        parts.push(empty.hidden.clone());
        have += empty.hidden.dim(1)?;
    }
    Ok(Tensor::cat(&parts, 1)?.narrow(1, 0, tokens)?)
}

/// Prompt and (when `guided`) negative prompt for SDXL-type encoders. With
/// `zero_empty_negative`, an empty negative prompt is all-zero embeddings and pooled output, as
/// diffusers' `force_zeros_for_empty_prompt` and A1111's SDXL conditioning do.
pub fn encode_pair(
    encoders: &[&TextEncoder],
    prompt: &str,
    negative: &str,
    guided: bool,
    zero_empty_negative: bool,
    layer: HiddenLayer,
) -> Result<SdxlConditioning> {
    let (mut cond, pooled) = encode_one(encoders, prompt, layer)?;
    if !guided {
        return Ok(SdxlConditioning {
            cond,
            uncond: None,
            pooled,
            uncond_pooled: None,
        });
    }
    let (mut uncond, uncond_pooled) = if zero_empty_negative && negative.trim().is_empty() {
        (cond.zeros_like()?, pooled.zeros_like()?)
    } else {
        encode_one(encoders, negative, layer)?
    };
    // CFG batches the pair, so both need the same number of tokens.
    let (tc, tu) = (cond.dim(1)?, uncond.dim(1)?);
    if tc != tu {
        let zero = zero_empty_negative && negative.trim().is_empty();
        let short = if tc < tu { &mut cond } else { &mut uncond };
        *short = if zero {
            Tensor::zeros(
                (1, tc.max(tu), short.dim(2)?),
                short.dtype(),
                short.device(),
            )?
        } else {
            pad_pair(encoders, short, tc.max(tu), layer)?
        };
    }
    Ok(SdxlConditioning {
        cond,
        uncond: Some(uncond),
        pooled,
        uncond_pooled: Some(uncond_pooled),
    })
}

fn pad_pair(
    encoders: &[&TextEncoder],
    short: &Tensor,
    tokens: usize,
    layer: HiddenLayer,
) -> Result<Tensor> {
    let (empty, _) = encode_one(encoders, "", layer)?;
    let mut parts = vec![short.clone()];
    let mut have = short.dim(1)?;
    while have < tokens {
        parts.push(empty.clone());
        have += empty.dim(1)?;
    }
    Ok(Tensor::cat(&parts, 1)?.narrow(1, 0, tokens)?)
}

/// `[1, n]` f32 tensor of time ids.
pub fn time_ids_tensor(ids: &[f32], device: &Device) -> Result<Tensor> {
    Ok(Tensor::from_slice(ids, (1, ids.len()), device)?)
}

/// One UNet with its SDXL conditioning, ready for the sampler: the added conditions are batched
/// like the text (`[uncond; cond]` when guided).
pub(crate) struct Stage {
    pub conditioning: Conditioning,
    pub added: AddedConditions,
    /// The guidance embedding of a guidance-embedded UNet (lcm-sdxl), else `None`.
    pub timestep_cond: Option<Tensor>,
}

/// Whether a stage for a UNet of config `unet` at the requested scale runs classifier-free
/// guidance (and so needs the negative prompt encoded). Takes the config, not the model, so a
/// staged run ([`crate::pipeline::staged`]) can encode before its UNet loads.
pub(crate) fn stage_guided(unet: &UNetConfig, guidance_scale: f64) -> bool {
    cfg_scale_for(guidance_scale, unet.guidance_embedded()) != 1.0
}

/// The text half of an SDXL base stage for a UNet of config `unet`: `req`'s prompt (and negative
/// prompt when guided) through both encoders (CLIP-L, then OpenCLIP-bigG with its pooled
/// projection). [`base_stage`] adds the time ids once the UNet is loaded.
pub(crate) fn text_conditioning(
    encoders: [&TextEncoder; 2],
    zero_empty_negative: bool,
    unet: &UNetConfig,
    req: &GenerateRequest,
) -> Result<SdxlConditioning> {
    encode_pair(
        &encoders,
        &req.prompt,
        &req.negative_prompt,
        stage_guided(unet, req.cfg_scale),
        zero_empty_negative,
        sdxl_layer(req.clip_skip),
    )
}

/// The base model's stage for `req` from its encoded prompt `c` ([`text_conditioning`]): the
/// size and crop time ids (the same for the negative prompt), batched like the text.
pub(crate) fn base_stage(
    c: SdxlConditioning,
    size: &SizeConditioning,
    req: &GenerateRequest,
    unet: &UNet2DConditionModel,
) -> Result<Stage> {
    let ids = time_ids_tensor(&size.time_ids(req.height, req.width), unet.device())?;
    Stage::new(c, req.cfg_scale, &ids, &ids, unet)
}

impl Stage {
    /// Builds the stage for `unet` from encoded prompts, the requested guidance scale and the
    /// cond/uncond time ids. Guidance-embedded UNets get the scale as `timestep_cond` and no CFG.
    pub fn new(
        c: SdxlConditioning,
        guidance_scale: f64,
        time_ids: &Tensor,
        uncond_time_ids: &Tensor,
        unet: &UNet2DConditionModel,
    ) -> Result<Self> {
        let dtype = unet.dtype();
        let cfg_scale = cfg_scale_for(guidance_scale, unet.config().guidance_embedded());
        let guided = cfg_scale != 1.0;
        let added = match (&c.uncond_pooled, guided) {
            (Some(up), true) => AddedConditions {
                text_embeds: Tensor::cat(&[up, &c.pooled], 0)?.to_dtype(dtype)?,
                time_ids: Tensor::cat(&[uncond_time_ids, time_ids], 0)?,
            },
            _ => AddedConditions {
                text_embeds: c.pooled.to_dtype(dtype)?,
                time_ids: time_ids.clone(),
            },
        };
        Ok(Self {
            conditioning: Conditioning {
                cond: c.cond,
                uncond: c.uncond,
                cfg_scale,
            },
            added,
            timestep_cond: unet.guidance_embedding(guidance_scale)?,
        })
    }
}

/// The UNet with fixed added conditions (and guidance embedding), as the denoiser's network.
pub(crate) struct SdxlPredictor<'a> {
    pub unet: &'a UNet2DConditionModel,
    pub added: &'a AddedConditions,
    pub timestep_cond: Option<&'a Tensor>,
}

impl<'a> SdxlPredictor<'a> {
    pub fn new(unet: &'a UNet2DConditionModel, stage: &'a Stage) -> Self {
        Self {
            unet,
            added: &stage.added,
            timestep_cond: stage.timestep_cond.as_ref(),
        }
    }
}

impl NoisePredictor for SdxlPredictor<'_> {
    fn predict(&self, x_in: &Tensor, timestep: f64, context: &Tensor) -> Result<Tensor> {
        Ok(self.unet.forward_cond(
            x_in,
            timestep,
            context,
            Some(self.added),
            self.timestep_cond,
        )?)
    }
}

/// SDXL latent -> RGB linear map for the cheap preview, one row per latent channel (A1111
/// `sd_vae_approx.cheap_approximation`, the SDXL coefficients).
const SDXL_LATENT_RGB: [[f32; 3]; 4] = [
    [0.3651, 0.4232, 0.4341],
    [-0.2533, -0.0042, 0.1068],
    [0.1076, 0.1111, -0.0362],
    [-0.3165, -0.2492, -0.2188],
];

/// A cheap preview of an SDXL clean-latent estimate `[1, 4, h, w]`, one pixel per latent.
pub fn latent_preview(denoised: &Tensor) -> Result<Option<Preview>> {
    crate::pipeline::latent_preview_with(denoised, &SDXL_LATENT_RGB)
}

impl Pipeline {
    /// The SDXL parts, when this is an SDXL base model.
    pub fn sdxl(&self) -> Option<&SdxlParts> {
        self.sdxl.as_ref()
    }

    /// Whether this is an SDXL base model (two text encoders, added conditions).
    pub fn is_sdxl(&self) -> bool {
        self.sdxl.is_some()
    }

    /// SDXL micro-conditioning and refiner settings; `None` for SD1/SD2.
    pub fn sdxl_options(&self) -> Option<SdxlOptions> {
        self.sdxl.as_ref().map(|s| s.options)
    }

    /// Sets the SDXL options used by the next generations. An error on SD1/SD2 models or for a
    /// switch point outside [0, 1].
    pub fn set_sdxl_options(&mut self, options: SdxlOptions) -> Result<()> {
        options.refiner.validate()?;
        match &mut self.sdxl {
            Some(s) => {
                s.options = options;
                Ok(())
            }
            None => Err(EngineError::InvalidRequest(
                "SDXL options need an SDXL model".into(),
            )),
        }
    }

    /// The SDXL encoders, the request's conditioning, the base stage.
    fn sdxl_stage(&self, s: &SdxlParts, req: &GenerateRequest) -> Result<Stage> {
        let c = text_conditioning(
            [self.text_encoder(), &s.encoder_2],
            s.force_zeros_for_empty_prompt,
            self.unet().config(),
            req,
        )?;
        base_stage(c, &s.options.size, req, self.unet())
    }

    /// The SDXL conditioning of `req` (encoders, pooled output, time ids), as the UNet gets it.
    pub fn sdxl_conditioning(
        &self,
        req: &GenerateRequest,
    ) -> Result<(Conditioning, AddedConditions)> {
        let s = self.sdxl.as_ref().ok_or_else(not_sdxl)?;
        let stage = self.sdxl_stage(s, req)?;
        Ok((stage.conditioning, stage.added))
    }

    /// [`Pipeline::sample_latents`] for SDXL: the base model, then the refiner (when loaded and
    /// its switch point is below 1) for the steps after the switch.
    pub(crate) fn sample_sdxl(
        &self,
        s: &SdxlParts,
        req: &GenerateRequest,
        observer: &mut dyn Observer,
        on_state: &mut dyn FnMut(&Tensor, f64),
    ) -> Result<Tensor> {
        let refiner = s.refiner.as_deref().map(|r| (r, &s.options));
        if req.hires.is_none() {
            let base = self.sdxl_stage(s, req)?;
            return self.sampling().run_sdxl(
                req,
                self.latent_shape(req),
                &base,
                refiner,
                observer,
                on_state,
            );
        }
        if refiner.is_some_and(|(_, o)| o.refiner.switch_at < 1.0) {
            return Err(hires_with_refiner());
        }
        // The prompt is encoded once; each pass gets the time ids of its own size (A1111's
        // hires conditioning carries the enlarged size).
        let c = text_conditioning(
            [self.text_encoder(), &s.encoder_2],
            s.force_zeros_for_empty_prompt,
            self.unet().config(),
            req,
        )?;
        crate::hires::two_pass(
            req,
            self.schedule(),
            observer,
            &mut |latents, fix| self.enlarge(latents, fix),
            &mut |r, init, observer| {
                // The base model alone: a hires run has no refiner steps.
                let sized = crate::hires::conditioned(r, init);
                let base = base_stage(c.clone(), &s.options.size, &sized, self.unet())?;
                let sampling = self.sampling();
                let mut run = sampling.begin_sdxl(r, self.latent_shape(r), None, init, on_state)?;
                let to = run.total();
                sampling.advance_sdxl(&mut run, to, &base, r, observer, on_state)?;
                run.finish(self.device())
            },
        )
    }

    /// [`Pipeline::decode`] that never returns a black image for SDXL (see
    /// [`redecode_if_overflowed`]).
    pub(crate) fn decode_sdxl(&self, s: &SdxlParts, latents: &Tensor) -> Result<Tensor> {
        let image = self.decode(latents)?;
        redecode_if_overflowed(image, latents, &s.vae_files, &s.vae_config, self.device())
    }
}

/// An SDXL sampling run between models: the latents so far (k-diffusion scale), the noise
/// generator where it stopped, the sigmas and how many steps are done. The whole pipeline runs
/// the base model and the refiner on one run in one go; a staged run hands it from the base
/// model's UNet stage to the refiner's, with the base UNet freed in between. The samplers keep
/// no state from one part to the next (each part starts its multistep history afresh, as
/// diffusers' refiner pipeline does), so the latents, the generator and the step count are all
/// that carry over.
pub struct SdxlRun {
    x: Tensor,
    rng: Box<dyn NoiseSource>,
    sigmas: Vec<f64>,
    /// Steps the base model does; the refiner does the rest.
    switch: usize,
    done: usize,
    /// The run's sampler, which says how its last state becomes latents.
    sampler: crate::sampler::SamplerKind,
}

impl std::fmt::Debug for SdxlRun {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SdxlRun")
            .field("steps", &self.total())
            .field("switch", &self.switch)
            .field("done", &self.done)
            .finish_non_exhaustive()
    }
}

impl SdxlRun {
    /// All steps, base and refiner.
    pub fn total(&self) -> usize {
        self.sigmas.len() - 1
    }

    /// Steps the base model does before the refiner takes over.
    pub fn base_steps(&self) -> usize {
        self.switch
    }

    /// Whether steps are left for the refiner.
    pub fn needs_refiner(&self) -> bool {
        self.done < self.total()
    }

    /// The error for latents asked of a run with the refiner's steps left.
    pub(crate) fn unfinished(&self) -> EngineError {
        EngineError::InvalidRequest(format!(
            "the refiner's last {} of {} steps have not run; refine the picture first",
            self.total() - self.done,
            self.total()
        ))
    }

    /// The final latents in diffusers' scale, on `device`, once every step is done.
    pub(crate) fn finish(&self, device: &Device) -> Result<Tensor> {
        if self.needs_refiner() {
            return Err(self.unfinished());
        }
        let x = self.x.to_device(device)?;
        self.sampler
            .sampler()
            .final_latents(&x, self.sigmas[self.total()])
    }
}

impl SdSampling<'_> {
    /// The SDXL sampling loop: seeded noise of `shape`, this UNet (the base model) under `base`,
    /// then `refiner` with its options for the steps after its switch point; the final latents
    /// in diffusers' scale. `on_state` as in [`Pipeline::sample_latents`].
    pub(crate) fn run_sdxl(
        &self,
        req: &GenerateRequest,
        shape: [usize; 4],
        base: &Stage,
        refiner: Option<(&Refiner, &SdxlOptions)>,
        observer: &mut dyn Observer,
        on_state: &mut dyn FnMut(&Tensor, f64),
    ) -> Result<Tensor> {
        let switch_at = refiner.map(|(_, options)| &options.refiner);
        let mut run = self.begin_sdxl(req, shape, switch_at, None, on_state)?;
        let base_steps = run.base_steps();
        self.advance_sdxl(&mut run, base_steps, base, req, observer, on_state)?;
        if let Some((r, options)) = refiner.filter(|_| run.needs_refiner()) {
            let stage = r.stage(req, options)?;
            // The refiner may live on another device or dtype than the base.
            let sampling = SdSampling {
                unet: r.unet(),
                schedule: r.schedule(),
                prediction: r.prediction(),
                dtype: r.unet().dtype(),
                device: r.unet().device(),
                image: None,
            };
            let total = run.total();
            sampling.advance_sdxl(&mut run, total, &stage, req, observer, on_state)?;
        }
        run.finish(self.device)
    }

    /// Starts an SDXL run for `req` with this (the base model's) noise schedule: its sigmas,
    /// the seeded noise of `shape`, and where a refiner switching at `switch_at` takes over
    /// (`None`: the base model does every step). With `init`, a hires fix's second pass from
    /// the enlarged latents (see [`SdSampling::run`]).
    pub(crate) fn begin_sdxl(
        &self,
        req: &GenerateRequest,
        shape: [usize; 4],
        switch_at: Option<&RefinerOptions>,
        init: Option<(&Tensor, &HiresFix)>,
        on_state: &mut dyn FnMut(&Tensor, f64),
    ) -> Result<SdxlRun> {
        let sampler = req.sampler.sampler();
        let sigmas = crate::hires::pass_sigmas(sampler.as_ref(), self.schedule, req, init);
        let switch = match switch_at {
            Some(options) => crate::refiner::switch_index(self.schedule, &sigmas, options),
            None => sigmas.len() - 1,
        };
        let mut rng = req.seed_source.generator(req.seed);
        let noise = rng.randn_tensor(&shape, self.device)?;
        let x = crate::hires::starting_state(sampler.as_ref(), &sigmas, noise, init)?;
        on_state(&x, sigmas[0]);
        Ok(SdxlRun {
            x,
            rng,
            sigmas,
            switch,
            done: 0,
            sampler: req.sampler,
        })
    }

    /// Runs this UNet under `stage` over `run`'s next steps, up to step `to`, on this UNet's
    /// device. Progress counts the run's steps, so a refiner's first step follows the base's
    /// last.
    pub(crate) fn advance_sdxl(
        &self,
        run: &mut SdxlRun,
        to: usize,
        stage: &Stage,
        req: &GenerateRequest,
        observer: &mut dyn Observer,
        on_state: &mut dyn FnMut(&Tensor, f64),
    ) -> Result<()> {
        let (from, total) = (run.done, run.total());
        if to <= from {
            return Ok(());
        }
        let unet = SdxlPredictor::new(self.unet, stage);
        let denoiser = Denoiser::new(
            &unet,
            self.schedule,
            self.prediction,
            &stage.conditioning,
            self.unet.dtype(),
        )?;
        let every = observer.preview_every();
        let mut step_observer = |info: &StepInfo<'_>| {
            on_state(info.x, info.sigma_next);
            let done = from + info.step + 1;
            let preview = match every {
                Some(n) if done.is_multiple_of(n.get()) || done == total => {
                    // A failed preview must not fail the image.
                    latent_preview(info.denoised).ok().flatten()
                }
                _ => None,
            };
            observer.on_progress(&Progress {
                step: done,
                total,
                preview: preview.as_ref(),
            })
        };
        let mut ctx = SampleContext {
            denoiser: &denoiser,
            noise: run.rng.as_mut(),
            observer: &mut step_observer,
        };
        let x = run.x.to_device(self.device)?;
        let sampled = req
            .sampler
            .sampler()
            .sample(x, &run.sigmas[from..=to], &mut ctx);
        // A recorded step graph holds its intermediates' device memory, which the refiner or
        // the VAE needs next.
        self.unet.release_graphs();
        run.x = sampled?;
        run.done = to;
        Ok(())
    }
}

/// `image`, decoded from `latents`, unless it is not finite where the latents are: SDXL's VAE
/// overflows to inf/NaN in f16 (a black image) unless it is the fp16-fix one, so then `latents`
/// are decoded again with an f32 copy of the VAE in `files` (`cfg`) on `device`.
pub(crate) fn redecode_if_overflowed(
    image: Tensor,
    latents: &Tensor,
    files: &[PathBuf],
    cfg: &VaeConfig,
    device: &Device,
) -> Result<Tensor> {
    if all_finite(&image)? || !all_finite(latents)? {
        return Ok(image);
    }
    tracing::warn!("the VAE overflowed in half precision; decoding again in f32");
    // The VAE may be a folder's, a single file's `first_stage_model.*` or a VAE file.
    let vb = crate::single_file::vae_var_builder(files, cfg, DType::F32, device)?;
    let vae = AutoencoderKL::load(vb, cfg)?;
    let z = latents.to_device(device)?.to_dtype(DType::F32)?;
    Ok(vae.decode_scaled(&z)?)
}

/// A hires fix asked of a run whose refiner takes over part of the steps.
pub(crate) fn hires_with_refiner() -> EngineError {
    EngineError::InvalidRequest(
        "the hires fix and a refiner cannot be used together yet; turn one of them off".into(),
    )
}

fn not_sdxl() -> EngineError {
    EngineError::InvalidRequest("this needs an SDXL model".into())
}

/// Whether every value of `t` is finite.
pub fn all_finite(t: &Tensor) -> Result<bool> {
    let v = t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
    Ok(v.iter().all(|x| x.is_finite()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn time_ids_default_to_the_image_size() {
        // diffusers: list(original_size + crops_coords_top_left + target_size).
        let s = SizeConditioning::default();
        assert_eq!(s.time_ids(768, 1024), [768., 1024., 0., 0., 768., 1024.]);
        let s = SizeConditioning {
            original: Some((2048, 2048)),
            crop_top_left: (16, 32),
            target: None,
        };
        assert_eq!(s.time_ids(512, 640), [2048., 2048., 16., 32., 512., 640.]);
        assert_eq!(
            s.aesthetic_time_ids(512, 640, 6.0),
            [2048., 2048., 16., 32., 6.0]
        );
    }

    #[test]
    fn clip_skip_maps_to_diffusers_layers() {
        assert_eq!(sdxl_layer(1), HiddenLayer::Raw(2));
        assert_eq!(sdxl_layer(2), HiddenLayer::Raw(3));
    }

    #[test]
    fn vae_upcasts_only_sdxl_in_f16() {
        let mut cfg = VaeConfig::default();
        assert_eq!(vae_dtype(true, &cfg, DType::F16), DType::F32);
        assert_eq!(vae_dtype(false, &cfg, DType::F16), DType::F16);
        assert_eq!(vae_dtype(true, &cfg, DType::BF16), DType::BF16);
        cfg.force_upcast = false; // the fp16-fix VAE
        assert_eq!(vae_dtype(true, &cfg, DType::F16), DType::F16);
    }
}
