//! Timings of the full-size SD1.5 or SDXL UNet and VAE on random weights, for the `bench`
//! command: how long one denoising step and one decode take on this machine, without downloading
//! a model.
//!
//! Compute cost does not depend on weight values, so the weights are a cheap repeating pattern
//! of normal samples scaled like a real initialisation (no zeros or denormals to skew timings).

use std::time::{Duration, Instant};

use candle_core::{DType, Device, Shape, Tensor};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::{Init, VarBuilder};

use crate::attention::AttentionOptions;
use crate::unet::{UNet2DConditionModel, UNetConfig};
use crate::vae::{AutoencoderKL, VaeConfig};

/// runwayml/stable-diffusion-v1-5 `unet/config.json` (the keys it sets).
pub const SD15_UNET_CONFIG: &str = r#"{
  "act_fn": "silu", "attention_head_dim": 8,
  "block_out_channels": [320, 640, 1280, 1280], "center_input_sample": false,
  "cross_attention_dim": 768,
  "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
  "downsample_padding": 1, "flip_sin_to_cos": true, "freq_shift": 0, "in_channels": 4,
  "layers_per_block": 2, "mid_block_scale_factor": 1, "norm_eps": 1e-05, "norm_num_groups": 32,
  "out_channels": 4, "sample_size": 64,
  "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"]
}"#;

/// runwayml/stable-diffusion-v1-5 `vae/config.json`.
pub const SD15_VAE_CONFIG: &str = r#"{
  "act_fn": "silu", "block_out_channels": [128, 256, 512, 512],
  "down_block_types": ["DownEncoderBlock2D", "DownEncoderBlock2D", "DownEncoderBlock2D", "DownEncoderBlock2D"],
  "in_channels": 3, "latent_channels": 4, "layers_per_block": 2, "norm_num_groups": 32,
  "out_channels": 3, "sample_size": 512,
  "up_block_types": ["UpDecoderBlock2D", "UpDecoderBlock2D", "UpDecoderBlock2D", "UpDecoderBlock2D"]
}"#;

/// stabilityai/stable-diffusion-xl-base-1.0 `unet/config.json` (the keys that shape the compute):
/// no attention in the first block, 1/2/10 transformer layers, linear proj_in, 2048-wide context
/// (CLIP-L 768 + OpenCLIP-bigG 1280), "text_time" added embedding (1280 pooled + 6 x 256).
pub const SDXL_UNET_CONFIG: &str = r#"{
  "act_fn": "silu", "addition_embed_type": "text_time", "addition_time_embed_dim": 256,
  "attention_head_dim": [5, 10, 20], "block_out_channels": [320, 640, 1280],
  "cross_attention_dim": 2048,
  "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
  "in_channels": 4, "layers_per_block": 2, "norm_num_groups": 32, "out_channels": 4,
  "projection_class_embeddings_input_dim": 2816, "sample_size": 128,
  "transformer_layers_per_block": [1, 2, 10],
  "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
  "use_linear_projection": true
}"#;

/// stabilityai/stable-diffusion-xl-base-1.0 `vae/config.json`: SD1.5's VAE shape, other scale.
pub const SDXL_VAE_CONFIG: &str = r#"{
  "act_fn": "silu", "block_out_channels": [128, 256, 512, 512],
  "down_block_types": ["DownEncoderBlock2D", "DownEncoderBlock2D", "DownEncoderBlock2D", "DownEncoderBlock2D"],
  "force_upcast": true, "in_channels": 3, "latent_channels": 4, "layers_per_block": 2,
  "norm_num_groups": 32, "out_channels": 3, "sample_size": 1024, "scaling_factor": 0.13025,
  "up_block_types": ["UpDecoderBlock2D", "UpDecoderBlock2D", "UpDecoderBlock2D", "UpDecoderBlock2D"]
}"#;

/// 2048: SDXL's context width; 1280: its pooled text embedding (OpenCLIP-bigG projection).
const SDXL_CONTEXT_DIM: usize = 2048;
const SDXL_POOLED_DIM: usize = 1280;

/// Which model's shapes to time.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum BenchFamily {
    /// SD1.5 UNet and VAE (512x512 is its native size).
    #[default]
    Sd15,
    /// SDXL base UNet (with its added conditions) and VAE (1024x1024 native).
    Sdxl,
}

impl BenchFamily {
    fn configs(self) -> (&'static str, &'static str, usize) {
        match self {
            BenchFamily::Sd15 => (SD15_UNET_CONFIG, SD15_VAE_CONFIG, SD15_CONTEXT_DIM),
            BenchFamily::Sdxl => (SDXL_UNET_CONFIG, SDXL_VAE_CONFIG, SDXL_CONTEXT_DIM),
        }
    }
}

/// 768: CLIP ViT-L/14 hidden size, SD1's `cross_attention_dim`.
const SD15_CONTEXT_DIM: usize = 768;
/// 77: CLIP's context length.
const CONTEXT_TOKENS: usize = 77;

/// What to time.
#[derive(Debug, Clone)]
pub struct BenchOptions {
    pub device: Device,
    pub dtype: DType,
    /// Image size in pixels (multiples of 64).
    pub width: usize,
    pub height: usize,
    /// UNet batch: 2 is one classifier-free-guidance step for one image.
    pub batch: usize,
    pub unet: bool,
    pub vae: bool,
    pub attention: AttentionOptions,
    pub family: BenchFamily,
}

impl Default for BenchOptions {
    fn default() -> Self {
        Self {
            device: Device::Cpu,
            dtype: DType::F32,
            width: 512,
            height: 512,
            batch: 2,
            unet: true,
            vae: true,
            attention: AttentionOptions::default(),
            family: BenchFamily::default(),
        }
    }
}

/// Wall-clock timings; `None` where that part was not asked for.
#[derive(Debug, Clone, PartialEq)]
pub struct BenchReport {
    /// Building the UNet from random weights (allocation and conversion, no disk).
    pub unet_build: Option<Duration>,
    /// One UNet forward at `batch` x 4 x h/8 x w/8 with a 77-token context.
    pub unet_forward: Option<Duration>,
    pub vae_build: Option<Duration>,
    /// One VAE decode of a single 4 x h/8 x w/8 latent.
    pub vae_decode: Option<Duration>,
}

/// Runs the benchmark. Takes about a minute per timed part on a 2-core CPU at 512x512.
pub fn run(opts: &BenchOptions) -> crate::Result<BenchReport> {
    if opts.width == 0
        || opts.height == 0
        || !opts.width.is_multiple_of(64)
        || !opts.height.is_multiple_of(64)
    {
        return Err(crate::EngineError::InvalidRequest(format!(
            "benchmark size {}x{} must be positive multiples of 64",
            opts.width, opts.height
        )));
    }
    if opts.batch == 0 {
        return Err(crate::EngineError::InvalidRequest(
            "benchmark batch must be at least 1".into(),
        ));
    }
    let (lh, lw) = (opts.height / 8, opts.width / 8);
    let dev = &opts.device;
    let mut report = BenchReport {
        unet_build: None,
        unet_forward: None,
        vae_build: None,
        vae_decode: None,
    };
    let (unet_config, vae_config, context_dim) = opts.family.configs();
    if opts.unet {
        let cfg = UNetConfig::from_json(unet_config)
            .map_err(|e| crate::EngineError::InvalidRequest(e.to_string()))?;
        let t = Instant::now();
        let mut unet = UNet2DConditionModel::load(random_weights(opts), &cfg)?;
        unet.set_attention_options(opts.attention);
        report.unet_build = Some(t.elapsed());
        let x = input(&[opts.batch, 4, lh, lw], opts)?;
        let ctx = input(&[opts.batch, CONTEXT_TOKENS, context_dim], opts)?;
        // SDXL: pooled text and the (1024, 1024, 0, 0, 1024, 1024) size ids.
        let added = match opts.family {
            BenchFamily::Sd15 => None,
            BenchFamily::Sdxl => Some(crate::unet::AddedConditions {
                text_embeds: input(&[opts.batch, SDXL_POOLED_DIM], opts)?,
                time_ids: Tensor::new(&[1024f32, 1024., 0., 0., 1024., 1024.], dev)?
                    .unsqueeze(0)?
                    .repeat((opts.batch, 1))?,
            }),
        };
        let t = Instant::now();
        let out = unet.forward_with(&x, 999.0, &ctx, added.as_ref())?;
        dev.synchronize()?;
        report.unet_forward = Some(t.elapsed());
        drop(out);
    }
    if opts.vae {
        let cfg = VaeConfig::from_json(vae_config)
            .map_err(|e| crate::EngineError::InvalidRequest(e.to_string()))?;
        let t = Instant::now();
        let mut vae = AutoencoderKL::load(random_weights(opts), &cfg)?;
        vae.set_attention_options(opts.attention);
        report.vae_build = Some(t.elapsed());
        let z = input(&[1, 4, lh, lw], opts)?;
        let t = Instant::now();
        let img = vae.decode(&z)?;
        dev.synchronize()?;
        report.vae_decode = Some(t.elapsed());
        drop(img);
    }
    Ok(report)
}

fn input(shape: &[usize], opts: &BenchOptions) -> crate::Result<Tensor> {
    let t = Tensor::randn(0f32, 1.0, shape, &Device::Cpu)?;
    Ok(t.to_dtype(opts.dtype)?.to_device(&opts.device)?)
}

fn random_weights(opts: &BenchOptions) -> VarBuilder<'static> {
    VarBuilder::from_backend(
        Box::new(RandomWeights::new()),
        opts.dtype,
        opts.device.clone(),
    )
}

/// Hands out weights of any requested shape on demand.
struct RandomWeights {
    /// 1 Mi standard normal samples; tensors cycle through them.
    pool: Vec<f32>,
}

impl RandomWeights {
    fn new() -> Self {
        // A small xorshift + Box-Muller: the values only need to look like weights.
        let mut state = 0x9E37_79B9_7F4A_7C15u64;
        let mut uniform = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            ((state >> 11) as f64 + 0.5) / (1u64 << 53) as f64
        };
        let pool = (0..1 << 20)
            .map(|_| {
                let (u, v) = (uniform(), uniform());
                ((-2.0 * u.ln()).sqrt() * (std::f64::consts::TAU * v).cos()) as f32
            })
            .collect();
        Self { pool }
    }
}

impl SimpleBackend for RandomWeights {
    fn get(
        &self,
        s: Shape,
        _name: &str,
        h: Init,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        let n = s.elem_count();
        let data: Vec<f32> = match h {
            // Norm scales (1) and shifts (0) keep their usual values.
            Init::Const(c) => vec![c as f32; n],
            // Biases: small, like a trained model's.
            _ if s.rank() == 1 => self.pool.iter().cycle().take(n).map(|v| v * 0.02).collect(),
            _ => {
                // Scale like a fan-in initialisation so activations stay O(1) through the net.
                let fan_in: usize = s.dims().iter().skip(1).product::<usize>().max(1);
                let std = (1.0 / fan_in as f64).sqrt() as f32;
                self.pool.iter().cycle().take(n).map(|v| v * std).collect()
            }
        };
        Tensor::from_vec(data, s, &Device::Cpu)?
            .to_dtype(dtype)?
            .to_device(dev)
    }

    fn get_unchecked(
        &self,
        name: &str,
        _dtype: DType,
        _dev: &Device,
    ) -> candle_core::Result<Tensor> {
        candle_core::bail!("random weights: {name} needs a shape")
    }

    fn contains_tensor(&self, _name: &str) -> bool {
        // Only asked for legacy VAE names; the random model uses the current ones.
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn embedded_configs_are_valid() {
        UNetConfig::from_json(SD15_UNET_CONFIG)
            .unwrap()
            .validate()
            .unwrap();
        VaeConfig::from_json(SD15_VAE_CONFIG)
            .unwrap()
            .validate()
            .unwrap();
        let sdxl = UNetConfig::from_json(SDXL_UNET_CONFIG).unwrap();
        sdxl.validate().unwrap();
        assert!(sdxl.needs_added_conditions());
        VaeConfig::from_json(SDXL_VAE_CONFIG)
            .unwrap()
            .validate()
            .unwrap();
    }

    #[test]
    fn bad_sizes_are_refused() {
        let opts = BenchOptions {
            width: 500,
            ..Default::default()
        };
        assert!(run(&opts).is_err());
    }
}
