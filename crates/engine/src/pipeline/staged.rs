//! One generation that holds one model at a time, for one-shot runs in little memory
//! (`generate --low-memory`, issue 12: SD 1.5 at 512x512 on the CPU within 2.1 GB). The text
//! encoder is loaded, run and freed before the UNet loads, and the UNet is freed before the VAE
//! loads, so the peak is the largest model plus its working memory rather than all three models
//! plus the largest working memory. Every run reads each model again, so a server that draws
//! many pictures keeps a [`Pipeline`](super::Pipeline) instead.
//!
//! Each stage owns the model it loads, so a model that was freed cannot be used by mistake: the
//! UNet stage is consumed by sampling, and the text encoder and VAE live only inside the call
//! that runs them.

use std::path::{Path, PathBuf};

use candle_core::Tensor;

use super::{
    load_folder_text_encoder, load_folder_unet, load_folder_vae, sd_conditioning, to_rgb8,
    validate_for_model, GenerateRequest, GeneratedImage, LoadOptions, Observer, SdSampling,
};
use crate::clip::ClipConfig;
use crate::config::{ModelFolder, PredictionType};
use crate::denoiser::Conditioning;
use crate::lora::LoraSet;
use crate::memory::MemoryOptions;
use crate::schedule::NoiseSchedule;
use crate::unet::{UNet2DConditionModel, UNetConfig};
use crate::vae::VaeConfig;
use crate::{EngineError, Result};

/// An SD1/SD2 diffusers folder, opened (configs read, nothing loaded) for staged runs.
#[derive(Debug)]
pub struct StagedPipeline {
    folder: ModelFolder,
    opts: LoadOptions,
    text_layers: usize,
    unet_cfg: UNetConfig,
    vae_cfg: VaeConfig,
    vae_files: Vec<PathBuf>,
    schedule: NoiseSchedule,
    prediction: PredictionType,
    memory: MemoryOptions,
}

impl StagedPipeline {
    /// Whether `path` is a model a staged run can draw with: an SD1/SD2 diffusers folder. SDXL
    /// folders and single files load whole, through [`Pipeline`](super::Pipeline).
    pub fn supports(path: &Path) -> Result<bool> {
        if !path.is_dir() {
            return Ok(false);
        }
        let index = ModelFolder::open(path)?.model_index()?;
        Ok(!crate::sdxl::is_sdxl(&index))
    }

    /// Reads the folder's configs and checks it is complete; loads no weights.
    pub fn open(dir: &Path, opts: &LoadOptions) -> Result<Self> {
        let folder = ModelFolder::open(dir)?;
        let index = folder.model_index()?;
        super::check_components(&folder, &index)?;
        let unet_cfg = UNetConfig::from_file(&folder.config_file("unet")?)?;
        if crate::sdxl::is_sdxl(&index) || unet_cfg.needs_added_conditions() {
            return Err(super::needs_sdxl_pipeline(&folder)?);
        }
        let scheduler = folder.scheduler_config()?;
        let vae_files = folder.weight_files("vae")?;
        // The VAE loads only after sampling: a damaged file is reported now (its header is read,
        // no weights), not after the user has waited for every step.
        drop(crate::weights::Weights::open_all(&vae_files)?);
        Ok(Self {
            text_layers: ClipConfig::from_file(folder.config_file("text_encoder")?)?
                .num_hidden_layers,
            vae_cfg: VaeConfig::from_file(&folder.config_file("vae")?)?,
            vae_files,
            schedule: NoiseSchedule::from_config(&scheduler)?,
            prediction: scheduler.prediction_type,
            unet_cfg,
            folder,
            opts: opts.clone(),
            memory: MemoryOptions::default(),
        })
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
        [1, self.unet_cfg.in_channels, req.height / f, req.width / f]
    }

    /// Stage 1: validates `req`, loads the text encoder, encodes the prompt (and the negative
    /// prompt when guidance is on) and frees the encoder.
    pub fn encode(&self, req: &GenerateRequest) -> Result<Conditioning> {
        self.validate(req)?;
        let text_encoder =
            load_folder_text_encoder(&self.folder, &self.opts, &mut LoraSet::open(&[])?)?;
        let conditioning = sd_conditioning(&text_encoder, &self.unet_cfg, req)?;
        drop(text_encoder);
        crate::memory::release_freed_memory();
        log_memory("prompt encoded, text encoder freed");
        Ok(conditioning)
    }

    /// Stage 2: loads the UNet, which [`UnetStage::sample`] uses and frees.
    pub fn load_unet(&self) -> Result<UnetStage<'_>> {
        let mut unet = load_folder_unet(
            &self.folder,
            &self.unet_cfg,
            &self.opts,
            &mut LoraSet::open(&[])?,
        )?;
        unet.set_attention_options(self.memory.attention());
        unet.set_max_batch(self.memory.split_batch.then_some(1));
        log_memory("UNet loaded");
        Ok(UnetStage { staged: self, unet })
    }

    /// Stage 3: loads the VAE, decodes `latents` (diffusers scale, from [`UnetStage::sample`])
    /// into `req`'s picture and frees the VAE.
    pub fn decode(&self, req: &GenerateRequest, latents: &Tensor) -> Result<GeneratedImage> {
        let mut vae = load_folder_vae(&self.vae_files, &self.vae_cfg, self.opts.dtype, &self.opts)?;
        vae.set_attention_options(self.memory.attention());
        log_memory("VAE loaded");
        let image = super::decode_with(&vae, self.memory.vae_tiling, latents)?;
        drop(vae);
        crate::memory::release_freed_memory();
        log_memory("decoded, VAE freed");
        Ok(GeneratedImage {
            width: req.width,
            height: req.height,
            pixels: to_rgb8(&image)?,
            seed: req.seed,
        })
    }

    /// The three stages in a row: the picture [`Pipeline::generate`](super::Pipeline::generate)
    /// draws for `req`, with one model in memory at a time.
    pub fn generate(
        &self,
        req: &GenerateRequest,
        observer: &mut dyn Observer,
    ) -> Result<GeneratedImage> {
        let conditioning = self.encode(req)?;
        let latents = self.load_unet()?.sample(req, &conditioning, observer)?;
        self.decode(req, &latents)
    }
}

/// The loaded UNet of a staged run.
#[derive(Debug)]
pub struct UnetStage<'a> {
    staged: &'a StagedPipeline,
    unet: UNet2DConditionModel,
}

impl UnetStage<'_> {
    /// Samples `req` under `conditioning` (from [`StagedPipeline::encode`] for the same request)
    /// and frees the UNet: the final latents in diffusers' scale. When the observer cancels
    /// ([`crate::sampler::Control::Cancel`]) returns [`EngineError::Cancelled`].
    pub fn sample(
        self,
        req: &GenerateRequest,
        conditioning: &Conditioning,
        observer: &mut dyn Observer,
    ) -> Result<Tensor> {
        let s = self.staged;
        if conditioning.uncond.is_none()
            && crate::denoiser::cfg_scale_for(req.cfg_scale, s.unet_cfg.guidance_embedded()) != 1.0
        {
            // A conditioning encoded for another request (no negative prompt) cannot guide this one.
            return Err(EngineError::InvalidRequest(
                "the conditioning was encoded without guidance; encode this request first".into(),
            ));
        }
        let sampling = SdSampling {
            unet: &self.unet,
            schedule: &s.schedule,
            prediction: s.prediction,
            dtype: s.opts.dtype,
            device: &s.opts.device,
        };
        let latents = sampling.run(
            req,
            s.latent_shape(req),
            conditioning,
            observer,
            &mut |_, _| {},
        )?;
        drop(self.unet);
        crate::memory::release_freed_memory();
        log_memory("sampled, UNet freed");
        Ok(latents)
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

    #[test]
    fn draws_exactly_what_the_pipeline_draws() {
        // Issue 12: staging changes when models are in memory, not what is computed: the same
        // seed gives the same pixels as a whole pipeline, in f32 and in f16 weight storage, and
        // with the guidance halves run one at a time (batch splitting is per-sample exact).
        let dir = tiny("sd1");
        let req = request();
        for half_weights in [HalfWeights::Off, HalfWeights::On] {
            let opts = LoadOptions {
                half_weights,
                ..Default::default()
            };
            let whole = Pipeline::load(&dir, &opts)
                .unwrap()
                .generate(&req, &mut NoObserver)
                .unwrap();
            let mut staged = StagedPipeline::open(&dir, &opts).unwrap();
            assert_eq!(staged.generate(&req, &mut NoObserver).unwrap(), whole);
            staged.set_memory_options(MemoryOptions {
                split_batch: true,
                ..Default::default()
            });
            assert_eq!(
                staged.generate(&req, &mut NoObserver).unwrap(),
                whole,
                "{half_weights:?}, batch split"
            );
        }
    }

    #[test]
    fn stages_compose_like_generate() {
        let dir = tiny("sd1");
        let req = request();
        let staged = StagedPipeline::open(&dir, &LoadOptions::default()).unwrap();
        let conditioning = staged.encode(&req).unwrap();
        let latents = staged
            .load_unet()
            .unwrap()
            .sample(&req, &conditioning, &mut NoObserver)
            .unwrap();
        assert_eq!(latents.dims(), staged.latent_shape(&req));
        assert_eq!(
            staged.decode(&req, &latents).unwrap(),
            staged.generate(&req, &mut NoObserver).unwrap()
        );
    }

    #[test]
    fn unguided_conditioning_is_refused_for_a_guided_request() {
        let staged = StagedPipeline::open(&tiny("sd1"), &LoadOptions::default()).unwrap();
        let unguided = GenerateRequest {
            cfg_scale: 1.0,
            ..request()
        };
        let conditioning = staged.encode(&unguided).unwrap();
        assert!(conditioning.uncond.is_none());
        let err = staged
            .load_unet()
            .unwrap()
            .sample(&request(), &conditioning, &mut NoObserver)
            .unwrap_err();
        assert!(
            matches!(&err, EngineError::InvalidRequest(m) if m.contains("without guidance")),
            "{err}"
        );
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
    fn only_sd1_and_sd2_folders_are_staged() {
        assert!(StagedPipeline::supports(&tiny("sd1")).unwrap());
        assert!(StagedPipeline::supports(&tiny("sd2")).unwrap());
        // SDXL (two text encoders, added conditions) and single files load whole.
        assert!(!StagedPipeline::supports(&tiny("sdxl")).unwrap());
        let file = tiny("sd1").join("unet/diffusion_pytorch_model.safetensors");
        assert!(!StagedPipeline::supports(&file).unwrap());
        let err = StagedPipeline::open(&tiny("sdxl"), &LoadOptions::default()).unwrap_err();
        assert!(err.to_string().contains("SDXL"), "{err}");
    }
}
