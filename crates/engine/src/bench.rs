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
    /// Timed runs of each part. Above 1, an untimed warm-up run goes first (a GPU's first call
    /// loads its kernels and picks convolution algorithms) and the median run is reported.
    pub repeats: usize,
    /// The UNet's weights in f16 storage, widened per layer (`LoadOptions::half_weights`).
    pub half_weights: bool,
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
            repeats: 1,
            half_weights: false,
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
    /// With `LD_LAYER_TIMES=1`: time per layer kind in one UNet forward / one decode (the mean of
    /// the timed runs) and how many times each ran; empty otherwise.
    pub unet_profile: Vec<ProfileRow>,
    pub vae_profile: Vec<ProfileRow>,
}

/// A layer kind, its time in one run and its count in one run.
pub type ProfileRow = (&'static str, Duration, u64);

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
        unet_profile: Vec::new(),
        vae_profile: Vec::new(),
    };
    let (unet_config, vae_config, context_dim) = opts.family.configs();
    if opts.unet {
        let cfg = UNetConfig::from_json(unet_config)
            .map_err(|e| crate::EngineError::InvalidRequest(e.to_string()))?;
        let t = Instant::now();
        let half = opts.half_weights && opts.device.is_cpu() && opts.dtype == DType::F32;
        let mut unet = crate::weights::with_half_storage(half, || {
            UNet2DConditionModel::load(random_weights(opts), &cfg)
        })?;
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
        let (t, profile) = timed(opts, || unet.forward_with(&x, 999.0, &ctx, added.as_ref()))?;
        (report.unet_forward, report.unet_profile) = (Some(t), profile);
        if !dev.is_cpu() {
            match unet.graph_failure() {
                Some(why) => {
                    eprintln!("UNet steps ran eagerly: recording a CUDA graph failed ({why})")
                }
                None => eprintln!(
                    "UNet steps replayed as a CUDA graph: {}",
                    unet.graph_replays()
                ),
            }
        }
    }
    if opts.vae {
        let cfg = VaeConfig::from_json(vae_config)
            .map_err(|e| crate::EngineError::InvalidRequest(e.to_string()))?;
        let t = Instant::now();
        let mut vae = AutoencoderKL::load(random_weights(opts), &cfg)?;
        vae.set_attention_options(opts.attention);
        report.vae_build = Some(t.elapsed());
        let z = input(&[1, 4, lh, lw], opts)?;
        let (t, profile) = timed(opts, || vae.decode(&z))?;
        (report.vae_decode, report.vae_profile) = (Some(t), profile);
    }
    Ok(report)
}

/// The median of `opts.repeats` timed runs of `f` (after one warm-up when there are several),
/// each waiting for the device to finish: GPU work is queued, so a clock read without waiting
/// would time only the queueing.
/// Also returns the `LD_LAYER_TIMES` table of the timed runs, per run.
fn timed(
    opts: &BenchOptions,
    mut f: impl FnMut() -> candle_core::Result<Tensor>,
) -> crate::Result<(Duration, Vec<ProfileRow>)> {
    let repeats = opts.repeats.max(1);
    if repeats > 1 {
        drop(f()?);
        opts.device.synchronize()?;
    }
    crate::profile::take();
    let mut times = Vec::with_capacity(repeats);
    let mut queued = Vec::with_capacity(repeats);
    for _ in 0..repeats {
        let t = Instant::now();
        let out = f()?;
        queued.push(t.elapsed());
        opts.device.synchronize()?;
        times.push(t.elapsed());
        drop(out);
    }
    times.sort();
    queued.sort();
    if !opts.device.is_cpu() {
        // Where the host's queueing takes most of the time, the GPU waits on launches: fewer,
        // larger kernels help there, faster kernels do not.
        eprintln!(
            "host queueing: {:.1} ms of {:.1} ms (medians)",
            queued[queued.len() / 2].as_secs_f64() * 1e3,
            times[times.len() / 2].as_secs_f64() * 1e3
        );
    }
    let n = repeats as u32;
    let profile = crate::profile::take()
        .into_iter()
        .map(|(name, d, count)| (name, d / n, count / u64::from(n)))
        .collect();
    Ok((times[times.len() / 2], profile))
}

/// One timed operation of [`run_ops`]: a name shared with `scripts/bench_ops_pytorch.py` and
/// the closure that runs it once on prepared inputs.
pub struct OpCase {
    pub name: &'static str,
    run: Box<dyn Fn() -> candle_core::Result<Tensor>>,
}

/// The single layers that make up an SD1.5 UNet step at 512x512 batch 2 and a VAE decode, each
/// run through the same code the models use, so a per-op comparison with PyTorch shows which
/// ones lose. Keep names and shapes in step with `scripts/bench_ops_pytorch.py`.
///
/// `attention` picks the attention path (fused or chunked) the attention cases use.
pub fn op_cases(filter: &str, attention: AttentionOptions) -> crate::Result<Vec<OpCase>> {
    type Make = fn(AttentionOptions) -> OpFn;
    let table: [(&'static str, Make); 23] = [
        ("unet conv3x3 320->320 64x64 b2", |_| {
            conv_case(320, 320, 3, 64, 2)
        }),
        ("unet conv3x3 960->320 64x64 b2", |_| {
            conv_case(960, 320, 3, 64, 2)
        }),
        ("unet conv3x3 640->640 32x32 b2", |_| {
            conv_case(640, 640, 3, 32, 2)
        }),
        // The upsampler's convolution: the largest transformed filters of any SD1.5 layer.
        ("unet conv3x3 1280->1280 32x32 b2", |_| {
            conv_case(1280, 1280, 3, 32, 2)
        }),
        ("unet conv3x3 1280->1280 16x16 b2", |_| {
            conv_case(1280, 1280, 3, 16, 2)
        }),
        ("unet conv3x3 2560->1280 8x8 b2", |_| {
            conv_case(2560, 1280, 3, 8, 2)
        }),
        ("unet conv1x1 960->320 64x64 b2", |_| {
            conv_case(960, 320, 1, 64, 2)
        }),
        ("unet conv3x3 stride 2 320->320 64x64 b2", |_| {
            strided_conv_case(320, 64, 2)
        }),
        ("unet self-attn 4096 tok 8x40 b2", |o| {
            attn_case(4096, 4096, 8, 40, 2, o)
        }),
        ("unet cross-attn 4096x77 8x40 b2", |o| {
            attn_case(4096, 77, 8, 40, 2, o)
        }),
        ("unet self-attn 1024 tok 8x80 b2", |o| {
            attn_case(1024, 1024, 8, 80, 2, o)
        }),
        // SDXL at 1024x1024: its largest attention layers (640 channels, 64-wide heads).
        ("sdxl self-attn 4096 tok 10x64 b2", |o| {
            attn_case(4096, 4096, 10, 64, 2, o)
        }),
        ("unet linear 320->320 4096 tok b2", |_| {
            linear_case(4096, 320, 320, 2)
        }),
        ("unet linear 320->2560 4096 tok b2", |_| {
            linear_case(4096, 320, 2560, 2)
        }),
        ("unet linear 1280->320 4096 tok b2", |_| {
            linear_case(4096, 1280, 320, 2)
        }),
        ("unet groupnorm+silu 320 64x64 b2", |_| {
            group_norm_case(320, 64, 2)
        }),
        ("unet layernorm 320 4096 tok b2", |_| {
            layer_norm_case(4096, 320, 2)
        }),
        ("unet geglu 1280 4096 tok b2", |_| geglu_case(4096, 1280, 2)),
        ("vae conv3x3 512->512 64x64", |_| {
            conv_case(512, 512, 3, 64, 1)
        }),
        ("vae conv3x3 512->512 128x128", |_| {
            conv_case(512, 512, 3, 128, 1)
        }),
        ("vae conv3x3 256->256 256x256", |_| {
            conv_case(256, 256, 3, 256, 1)
        }),
        ("vae conv3x3 128->128 512x512", |_| {
            conv_case(128, 128, 3, 512, 1)
        }),
        ("vae self-attn 4096 tok 1x512", |o| {
            attn_case(4096, 4096, 1, 512, 1, o)
        }),
    ];
    let mut cases = Vec::new();
    for (name, make) in table {
        if name.contains(filter) {
            cases.push(OpCase {
                name,
                run: make(attention)?,
            });
        }
    }
    Ok(cases)
}

/// Runs each case once to warm up, then `repeats` times; returns each case's median.
pub fn run_ops(cases: &[OpCase], repeats: usize) -> crate::Result<Vec<(&'static str, Duration)>> {
    let mut out = Vec::with_capacity(cases.len());
    for case in cases {
        drop((case.run)()?);
        let mut times = Vec::with_capacity(repeats.max(1));
        for _ in 0..repeats.max(1) {
            let t = Instant::now();
            drop((case.run)()?);
            times.push(t.elapsed());
        }
        times.sort();
        out.push((case.name, times[times.len() / 2]));
    }
    Ok(out)
}

type OpFn = candle_core::Result<Box<dyn Fn() -> candle_core::Result<Tensor>>>;

fn cpu_weights() -> VarBuilder<'static> {
    VarBuilder::from_backend(Box::new(RandomWeights::new()), DType::F32, Device::Cpu)
}

fn randn(shape: &[usize]) -> candle_core::Result<Tensor> {
    Tensor::randn(0f32, 1.0, shape, &Device::Cpu)
}

fn conv_case(cin: usize, cout: usize, k: usize, hw: usize, batch: usize) -> OpFn {
    let conv = crate::resnet::Conv2d::load(cpu_weights(), cin, cout, k, 1, k / 2)?;
    let x = randn(&[batch, cin, hw, hw])?;
    Ok(Box::new(move || candle_core::Module::forward(&conv, &x)))
}

/// The UNet's first downsampling convolution: 3x3, stride 2, padding 1.
fn strided_conv_case(c: usize, hw: usize, batch: usize) -> OpFn {
    let conv = crate::resnet::Conv2d::load(cpu_weights(), c, c, 3, 2, 1)?;
    let x = randn(&[batch, c, hw, hw])?;
    Ok(Box::new(move || candle_core::Module::forward(&conv, &x)))
}

fn attn_case(
    tokens: usize,
    keys: usize,
    heads: usize,
    dim: usize,
    batch: usize,
    opts: AttentionOptions,
) -> OpFn {
    let q = randn(&[batch, tokens, heads * dim])?;
    let k = randn(&[batch, keys, heads * dim])?;
    let v = randn(&[batch, keys, heads * dim])?;
    let scale = 1.0 / (dim as f64).sqrt();
    Ok(Box::new(move || {
        crate::attention::scaled_dot_product_attention(&q, &k, &v, heads, scale, false, &opts)
    }))
}

fn linear_case(rows: usize, cin: usize, cout: usize, batch: usize) -> OpFn {
    let lin = crate::linear::Linear::load(cpu_weights(), cin, cout)?;
    let x = randn(&[batch, rows, cin])?;
    Ok(Box::new(move || candle_core::Module::forward(&lin, &x)))
}

fn group_norm_case(c: usize, hw: usize, batch: usize) -> OpFn {
    let norm = crate::resnet::GroupNorm::load(cpu_weights(), 32, c, 1e-5)?;
    let x = randn(&[batch, c, hw, hw])?;
    Ok(Box::new(move || norm.forward_silu(&x)))
}

fn layer_norm_case(rows: usize, c: usize, batch: usize) -> OpFn {
    let norm = candle_nn::layer_norm(c, 1e-5, cpu_weights())?;
    let x = randn(&[batch, rows, c])?;
    Ok(Box::new(move || candle_core::Module::forward(&norm, &x)))
}

fn geglu_case(rows: usize, c: usize, batch: usize) -> OpFn {
    let h = randn(&[batch, rows, c])?;
    let g = randn(&[batch, rows, c])?;
    // The fused kernel works in place, so each run starts from a fresh copy of `h`, as the
    // model's fresh projection output would be (the copy is timed too; torch's chunk is free).
    Ok(Box::new(move || crate::kernels::mul_gelu(h.copy()?, &g)))
}

fn input(shape: &[usize], opts: &BenchOptions) -> crate::Result<Tensor> {
    let t = Tensor::randn(0f32, 1.0, shape, &Device::Cpu)?;
    Ok(t.to_dtype(opts.dtype)?.to_device(&opts.device)?)
}

fn random_weights(opts: &BenchOptions) -> VarBuilder<'static> {
    seeded_weights(opts.dtype, &opts.device)
}

/// Weights of any requested shape, the same on every run and every machine: norm scales 1 and
/// shifts 0, biases small, other tensors scaled by their fan-in. For timings, and for tests that
/// need a real-shaped model whose output does not change from run to run (candle's `VarMap`
/// draws from an unseeded generator, so bounds measured on one run can fail on the next).
pub fn seeded_weights(dtype: DType, device: &Device) -> VarBuilder<'static> {
    VarBuilder::from_backend(Box::new(RandomWeights::new()), dtype, device.clone())
}

/// Hands out weights of any requested shape on demand.
struct RandomWeights {
    /// 1 Mi standard normal samples; tensors cycle through them, each from an offset taken from
    /// its name, so layers of one shape do not all get the same values.
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
        name: &str,
        h: Init,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        let n = s.elem_count();
        // FNV-1a of the name: a stable offset (std's hasher is seeded per process).
        let start = name.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
            (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
        }) as usize
            % self.pool.len();
        let values = || {
            self.pool[start..]
                .iter()
                .chain(self.pool.iter().cycle())
                .take(n)
        };
        let data: Vec<f32> = match h {
            // Norm scales (1) and shifts (0) keep their usual values.
            Init::Const(c) => vec![c as f32; n],
            // Biases: small, like a trained model's.
            _ if s.rank() == 1 => values().map(|v| v * 0.02).collect(),
            _ => {
                // Scale like a fan-in initialisation so activations stay O(1) through the net.
                let fan_in: usize = s.dims().iter().skip(1).product::<usize>().max(1);
                let std = (1.0 / fan_in as f64).sqrt() as f32;
                values().map(|v| v * std).collect()
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
