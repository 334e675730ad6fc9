//! Text to image: load a diffusers folder, then prompt -> text embeddings -> seeded noise ->
//! sampler (with CFG) -> VAE decode -> RGB8 pixels, reporting progress (and cheap previews) to an
//! [`Observer`] that can cancel.

use std::num::NonZeroUsize;
use std::path::Path;

use candle_core::{DType, Device, Tensor};

use crate::clip::TextEncoder;
use crate::config::{ModelFolder, PredictionType};
use crate::denoiser::{Conditioning, Denoiser, NoisePredictor};
use crate::rng::SeedSource;
use crate::sampler::{self, Control, SampleContext, SamplerKind, StepInfo};
use crate::schedule::{NoiseSchedule, ScheduleKind};
use crate::unet::{UNet2DConditionModel, UNetConfig};
use crate::vae::{AutoencoderKL, VaeConfig};
use crate::weights::Weights;
use crate::{EngineError, Result};

/// Where and in what precision the model runs.
#[derive(Debug, Clone)]
pub struct LoadOptions {
    pub device: Device,
    /// Weights and activations of the text encoder, UNet and VAE. Noise, sampler state and the
    /// output are always f32.
    pub dtype: DType,
}

impl Default for LoadOptions {
    fn default() -> Self {
        Self {
            device: Device::Cpu,
            dtype: DType::F32,
        }
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
        Ok(())
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

/// A loaded Stable Diffusion (SD1.x / SD2.x) diffusers model.
#[derive(Debug)]
pub struct Pipeline {
    text_encoder: TextEncoder,
    unet: UNet2DConditionModel,
    vae: AutoencoderKL,
    schedule: NoiseSchedule,
    prediction: PredictionType,
    device: Device,
    dtype: DType,
}

impl Pipeline {
    /// Loads a diffusers folder: `model_index.json`, `scheduler/`, `text_encoder/`,
    /// `tokenizer/`, `unet/`, `vae/` (fp16 variant files are used when they are the only ones).
    pub fn load(dir: &Path, opts: &LoadOptions) -> Result<Self> {
        let folder = ModelFolder::open(dir)?;
        let index = folder.model_index()?;
        for component in ["scheduler", "text_encoder", "tokenizer", "unet", "vae"] {
            if !index.has_component(component) {
                return Err(EngineError::Config {
                    path: dir.join("model_index.json"),
                    message: format!("no {component} component listed"),
                });
            }
        }
        let scheduler = folder.scheduler_config()?;
        let schedule = NoiseSchedule::from_config(&scheduler)?;
        let text_encoder = TextEncoder::load(&folder, opts.dtype, &opts.device)?;

        let unet_cfg = UNetConfig::from_file(&folder.config_file("unet")?)?;
        if unet_cfg.needs_added_conditions() {
            return Err(EngineError::Config {
                path: folder.config_file("unet")?,
                message: "SDXL-type UNets (added text/time conditions) need the SDXL pipeline"
                    .into(),
            });
        }
        let weights = Weights::open_all(&folder.weight_files("unet")?)?;
        let unet =
            UNet2DConditionModel::load(weights.var_builder(opts.dtype, &opts.device)?, &unet_cfg)?;

        let vae_cfg = VaeConfig::from_file(&folder.config_file("vae")?)?;
        let weights = Weights::open_all(&folder.weight_files("vae")?)?;
        let vae = AutoencoderKL::load(weights.var_builder(opts.dtype, &opts.device)?, &vae_cfg)?;

        Ok(Self {
            text_encoder,
            unet,
            vae,
            schedule,
            prediction: scheduler.prediction_type,
            device: opts.device.clone(),
            dtype: opts.dtype,
        })
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
        req.validate()?;
        let m = self.size_multiple();
        for (field, v) in [("width", req.width), ("height", req.height)] {
            if !v.is_multiple_of(m) {
                return Err(EngineError::InvalidRequest(format!(
                    "{field} must be a multiple of {m} for this model, got {v}"
                )));
            }
        }
        let layers = self.text_encoder.model().config().num_hidden_layers;
        if req.clip_skip > layers {
            return Err(EngineError::InvalidRequest(format!(
                "clip_skip must be between 1 and {layers} for this model, got {}",
                req.clip_skip
            )));
        }
        Ok(())
    }

    /// Shape of the latent for `req`: `[1, C, height / 8, width / 8]`. The starting noise is
    /// `req.seed_source.generator(req.seed).randn(&shape)` times the sampler's initial scale.
    pub fn latent_shape(&self, req: &GenerateRequest) -> [usize; 4] {
        let f = self.vae.config().downsampling_factor();
        [
            1,
            self.unet.config().in_channels,
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
        let image = self.decode(&latents)?;
        Ok(GeneratedImage {
            width: req.width,
            height: req.height,
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
        let guided = req.cfg_scale != 1.0;
        let conditioning = Conditioning {
            cond: self.text_encoder.encode(&req.prompt, req.clip_skip)?,
            uncond: if guided {
                Some(
                    self.text_encoder
                        .encode(&req.negative_prompt, req.clip_skip)?,
                )
            } else {
                None
            },
            cfg_scale: req.cfg_scale,
        };
        let unet = UNetPredictor(&self.unet);
        let denoiser = Denoiser::new(
            &unet,
            &self.schedule,
            self.prediction,
            &conditioning,
            self.dtype,
        )?;

        let sampler = req.sampler.sampler();
        let sigmas = sampler.sigmas(&self.schedule, req.schedule, req.steps);
        // One generator for the whole run: the sampler's extra noise continues the stream after
        // the initial latent, as A1111 does (`ImageRNG.next`).
        let mut rng = req.seed_source.generator(req.seed);
        let noise = rng.randn_tensor(&self.latent_shape(req), &self.device)?;
        let x = (noise * sampler.initial_noise_scale(&sigmas))?;
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
        let x = sampler.sample(x, &sigmas, &mut ctx)?;
        sampler::to_diffusers_latents(&x, sigmas[sigmas.len() - 1])
    }

    /// Latents (diffusers scale) -> image `[1, 3, H, W]`, f32, roughly in [-1, 1].
    pub fn decode(&self, latents: &Tensor) -> Result<Tensor> {
        let image = self.vae.decode_scaled(&latents.to_dtype(self.dtype)?)?;
        Ok(image.to_dtype(DType::F32)?)
    }
}

/// The UNet as the denoiser's network.
struct UNetPredictor<'a>(&'a UNet2DConditionModel);

impl NoisePredictor for UNetPredictor<'_> {
    fn predict(&self, x_in: &Tensor, timestep: f64, context: &Tensor) -> Result<Tensor> {
        Ok(self.0.forward(x_in, timestep, context)?)
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

/// A cheap preview of a clean-latent estimate `[1, 4, h, w]`: a 4x3 linear map per latent pixel,
/// so h x w pixels; `None` for latent spaces the map does not fit (channels other than 4).
pub fn latent_preview(denoised: &Tensor) -> Result<Option<Preview>> {
    let (c, h, w) = match denoised.dims() {
        &[1, c, h, w] => (c, h, w),
        _ => return Ok(None),
    };
    if c != LATENT_RGB.len() {
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
        for (ch, row) in LATENT_RGB.iter().enumerate() {
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
