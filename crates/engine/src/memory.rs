//! Memory: the low-memory strategies a pipeline can use ([`MemoryOptions`]) and a rough estimate
//! of what one generation needs ([`estimate`]), so the app can pick strategies before a job runs
//! instead of finding out from an out-of-memory error.
//!
//! # The estimate
//!
//! `device bytes = weights + max(UNet working set, VAE working set)`, where
//!
//! - weights = parameters x bytes per element (2 for f16, 4 for f32) of the text encoder(s), UNet
//!   and VAE. Parameter counts come from the safetensors headers of the model
//!   ([`ModelShape::from_folder`]) or, before a model is installed, from the published sizes of
//!   each family ([`ModelShape::SD1`], ...).
//! - UNet working set = `UNET_ACTIVATIONS x c0 x h x w x batch x bytes` + one block of attention
//!   scores. `c0` is the UNet's first width (320 for SD), `h x w` the latent size (image / 8),
//!   batch 2 with classifier-free guidance (1 when the halves run one at a time). Factor 20: the
//!   skip connections kept for the up path are about 5.4 `c0 x h x w` (3 at full latent size, 3 x
//!   2c0 at 1/4 of it, 3 x 4c0 at 1/16, ...), and the transformer at full latent size holds about
//!   14 more (q, k, v, the GEGLU's 8 `c0`-wide halves, norms and residuals).
//!   The score block is `heads x tokens x tokens` for plain attention and is capped by the
//!   attention options otherwise (see [`crate::attention::AttentionOptions`]); the fused GPU
//!   kernel holds none ([`Target::GpuFusedAttention`]).
//! - VAE working set = `VAE_ACTIVATIONS x c_vae x H x W x bytes` for an `H x W` image (or one tile),
//!   with `c_vae` its first width (128 for SD). Factor 10: calibrated on the candle decode of a
//!   512x512 SD1.5 VAE that peaked 1.3 GB above its weights (docs REFERENCE.md, "Performance
//!   figures": 1.8 GB peak RSS with 0.33 GB of weights).
//!
//! Check against the one full-size measurement we have (REFERENCE.md: SD1.5 UNet, 512x512,
//! batch 2, f32, plain attention, 5.6-5.8 GB peak RSS): weights 4.26 GB + UNet 0.2 GB + scores
//! 1 GiB = 5.5 GB. It is a planning figure, not a promise: allocator caching and the CUDA context
//! come on top (the caller keeps a reserve).

use std::path::Path;

use candle_core::DType;
use serde::Serialize;

use crate::attention::AttentionOptions;
use crate::config::ModelFolder;
use crate::weights::Weights;
use crate::Result;

/// Low-memory strategies of a loaded pipeline, cheapest in speed first. `Default` is none.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize)]
pub struct MemoryOptions {
    /// Sliced attention: one head at a time with at most this many scores per block (`None`: the
    /// default chunked attention, see [`AttentionOptions::default`]).
    pub attention_slice: Option<usize>,
    /// Decode the latents in overlapping tiles (see [`crate::vae::TileOptions`]).
    pub vae_tiling: bool,
    /// Keep the VAE on the CPU in f32: frees its weights and its decode from the GPU.
    pub vae_on_cpu: bool,
    /// Decode in f32 even when the pipeline runs in f16 (what fixes black or NaN images: SD's VAE
    /// overflows in f16, see diffusers' `force_upcast`).
    pub vae_f32: bool,
    /// Run the two halves of the guidance batch (negative and positive prompt) through the UNet
    /// one after the other: half the UNet's working memory, a little slower.
    pub split_batch: bool,
    /// Keep the text encoder(s) on the CPU in f32: they run once per prompt, so this costs a
    /// second or two per job and frees their weights from the GPU (0.25 GB for SD 1.5 in fp16,
    /// 1.6 GB for SDXL's two, which is what lets SDXL fit on an 8 GB card).
    pub text_encoder_on_cpu: bool,
}

impl MemoryOptions {
    /// The sliced-attention block used by low-VRAM mode: 1 Mi scores (4 MiB in f32).
    pub const SLICED_SCORES: usize = 1 << 20;

    /// The attention options these memory options give.
    pub fn attention(&self) -> AttentionOptions {
        match self.attention_slice {
            Some(n) => AttentionOptions::sliced(n.max(1)),
            None => AttentionOptions::default(),
        }
    }

    /// Every strategy on: the least memory this engine can draw with.
    pub fn lowest() -> Self {
        Self {
            attention_slice: Some(Self::SLICED_SCORES),
            vae_tiling: true,
            vae_on_cpu: true,
            vae_f32: false,
            split_batch: true,
            text_encoder_on_cpu: true,
        }
    }

    /// The strategies in use, in words ("tiled VAE", ...), for job info and image metadata.
    pub fn describe(&self) -> Vec<&'static str> {
        let mut v = Vec::new();
        if self.vae_tiling {
            v.push("tiled VAE");
        }
        if self.attention_slice.is_some() {
            v.push("sliced attention");
        }
        if self.vae_on_cpu {
            v.push("VAE on CPU");
        }
        if self.split_batch {
            v.push("batch split");
        }
        if self.text_encoder_on_cpu {
            v.push("text encoder on CPU");
        }
        if self.vae_f32 {
            v.push("VAE in fp32");
        }
        v
    }
}

/// Where the text encoder(s) run under `memory` in a pipeline on `device` in `dtype`: the CPU in
/// f32 when `text_encoder_on_cpu` (as for the VAE, half precision on the CPU only costs speed).
pub fn text_encoder_placement(
    memory: &MemoryOptions,
    device: &candle_core::Device,
    dtype: DType,
) -> (candle_core::Device, DType) {
    if memory.text_encoder_on_cpu {
        (candle_core::Device::Cpu, DType::F32)
    } else {
        (device.clone(), dtype)
    }
}

/// Where the VAE runs under `memory` in a pipeline on `device` in `dtype`: the CPU in f32 when
/// `vae_on_cpu` (half precision on the CPU is slower, not faster), f32 when `vae_f32`.
pub fn vae_placement(
    memory: &MemoryOptions,
    device: &candle_core::Device,
    dtype: DType,
) -> (candle_core::Device, DType) {
    if memory.vae_on_cpu {
        (candle_core::Device::Cpu, DType::F32)
    } else if memory.vae_f32 {
        (device.clone(), DType::F32)
    } else {
        (device.clone(), dtype)
    }
}

/// UNet feature-map factor (see the module docs for its derivation).
pub const UNET_ACTIVATIONS: u64 = 20;
/// VAE feature-map factor, calibrated on a measured candle decode (module docs).
pub const VAE_ACTIVATIONS: u64 = 10;

/// What the estimate needs to know about a model.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct ModelShape {
    pub text_params: u64,
    pub unet_params: u64,
    pub vae_params: u64,
    /// The UNet's first width (`block_out_channels[0]`).
    pub unet_channels: u64,
    /// Heads of the first (largest) attention level and its downscale from the latent (1 when
    /// the first block has attention, 2 for SDXL whose first block has none).
    pub attention_heads: u64,
    pub attention_downscale: u64,
    /// The VAE's first width (`block_out_channels[0]`) and its size factor (8).
    pub vae_channels: u64,
    pub vae_factor: u64,
    /// The UNet takes the guidance scale as an input (`time_cond_proj_dim`: full LCMs), so one
    /// image is one UNet pass per step however high the CFG scale, never a guidance pair.
    pub guidance_embedded: bool,
}

impl ModelShape {
    /// SD 1.x: CLIP ViT-L 123 M, UNet 860 M, VAE 83.7 M parameters (the runwayml/
    /// stable-diffusion-v1-5 safetensors); 8 heads at the first level.
    pub const SD1: Self = Self {
        text_params: 123_060_480,
        unet_params: 859_520_964,
        vae_params: 83_653_863,
        unet_channels: 320,
        attention_heads: 8,
        attention_downscale: 1,
        vae_channels: 128,
        vae_factor: 8,
        guidance_embedded: false,
    };
    /// SD 2.x: OpenCLIP ViT-H text tower 340 M, UNet 866 M, the same VAE; head width 64 (5 heads).
    pub const SD2: Self = Self {
        text_params: 340_387_840,
        unet_params: 865_910_724,
        vae_params: 83_653_863,
        unet_channels: 320,
        attention_heads: 5,
        attention_downscale: 1,
        vae_channels: 128,
        vae_factor: 8,
        guidance_embedded: false,
    };
    /// SDXL base: CLIP-L 123 M + OpenCLIP bigG 695 M, UNet 2.57 G, VAE 83.7 M; its first
    /// attention level is the second block (640 channels, 10 heads, latent / 2).
    pub const SDXL: Self = Self {
        text_params: 817_844_480,
        unet_params: 2_567_463_684,
        vae_params: 83_653_863,
        unet_channels: 320,
        attention_heads: 10,
        attention_downscale: 2,
        vae_channels: 128,
        vae_factor: 8,
        guidance_embedded: false,
    };

    /// Reads the parameter counts from the weight headers and the widths from the configs of a
    /// diffusers folder. Cheap: no tensor data is read.
    pub fn from_folder(dir: &Path) -> Result<Self> {
        let folder = ModelFolder::open(dir)?;
        let params = |component: &str| params_in(&folder.weight_files(component)?, |_| true);
        let mut text_params = params("text_encoder")?;
        if folder.root().join("text_encoder_2").is_dir() {
            text_params += params("text_encoder_2")?;
        }
        let unet_params = params("unet")?;
        let vae_params = params("vae")?;
        let unet: serde_json::Value = folder.component_config("unet")?;
        let vae: serde_json::Value = folder.component_config("vae")?;
        let first = |v: &serde_json::Value, key: &str, default: u64| {
            v.get(key)
                .and_then(|x| {
                    x.as_array()
                        .and_then(|a| a.first())
                        .and_then(|x| x.as_u64())
                })
                .unwrap_or(default)
        };
        let unet_channels = first(&unet, "block_out_channels", 320);
        let types: Vec<String> = unet
            .get("down_block_types")
            .and_then(|t| serde_json::from_value(t.clone()).ok())
            .unwrap_or_default();
        let level = types
            .iter()
            .position(|t| t.starts_with("CrossAttn"))
            .unwrap_or(0);
        // diffusers' naming quirk: `attention_head_dim` holds the head count when
        // `num_attention_heads` is absent (SD1, SD2, SDXL configs).
        let heads_at = |key: &str| -> Option<u64> {
            match unet.get(key)? {
                serde_json::Value::Number(n) => n.as_u64(),
                serde_json::Value::Array(a) => a.get(level).and_then(|x| x.as_u64()),
                _ => None,
            }
        };
        let attention_heads = heads_at("num_attention_heads")
            .or_else(|| heads_at("attention_head_dim"))
            .unwrap_or(8)
            .max(1);
        let vae_blocks = vae
            .get("block_out_channels")
            .and_then(|b| b.as_array())
            .map_or(4, |a| a.len());
        Ok(Self {
            text_params,
            unet_params,
            vae_params,
            unet_channels,
            attention_heads,
            attention_downscale: 1 << level,
            vae_channels: first(&vae, "block_out_channels", 128),
            vae_factor: 1 << vae_blocks.saturating_sub(1),
            guidance_embedded: unet.get("time_cond_proj_dim").is_some_and(|v| !v.is_null()),
        })
    }
}

/// Bytes per element of a dtype as the estimate counts it.
fn bytes_of(dtype: DType) -> u64 {
    dtype.size_in_bytes() as u64
}

/// One generation's memory, in bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct MemoryEstimate {
    /// Weights that live on the device (the VAE's or the text encoders' are left out when they
    /// run on the CPU).
    pub weights: u64,
    /// The UNet's working set during a step.
    pub unet: u64,
    /// The VAE's working set during the decode (on the CPU when `vae_on_cpu`).
    pub vae: u64,
    /// On the device at the worst moment: weights plus the larger working set there.
    pub peak: u64,
    /// On the host beyond that (the VAE or the text encoders on the CPU), 0 otherwise.
    pub host: u64,
}

/// The size of one decode tile in image pixels when tiling is on (see [`crate::vae::TileOptions`]).
fn vae_pixels(width: u64, height: u64, shape: &ModelShape, tiled: bool) -> u64 {
    if !tiled {
        return width * height;
    }
    let t = crate::vae::TileOptions::default();
    let side = t.tile as u64 * shape.vae_factor;
    width.min(side) * height.min(side)
}

/// What an estimate plans for: where the UNet's attention scores live differs by device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target {
    /// The CPU, with its score block size.
    Cpu,
    /// A GPU whose attention goes through blocks of scores, larger than the CPU's
    /// ([`AttentionOptions::GPU_DEFAULT_MAX_SCORES`]).
    Gpu,
    /// An NVIDIA GPU whose UNet attention is the fused kernel (`gpu_attention`): scores stay in
    /// registers, so no score block exists at all. For SDXL at 1024x1024 in f16 that is 512 MiB
    /// less than [`Target::Gpu`].
    GpuFusedAttention,
}

impl Target {
    /// The target for an NVIDIA GPU of compute capability `major.x` drawing in `dtype`: the
    /// fused kernel runs on compute capability 8.0 (Ampere) or newer in f16/bf16, and covers
    /// the head sizes of SD1 (40-160), SD2 and SDXL (64).
    pub fn nvidia(major: u32, dtype: DType) -> Self {
        if major >= 8 && matches!(dtype, DType::F16 | DType::BF16) {
            Self::GpuFusedAttention
        } else {
            Self::Gpu
        }
    }

    /// Whether this is a GPU.
    pub fn is_gpu(self) -> bool {
        self != Self::Cpu
    }
}

/// The parameters in `files`' headers (no tensor data is read) whose names `count` takes.
fn params_in(files: &[std::path::PathBuf], count: impl Fn(&str) -> bool) -> Result<u64> {
    let mut total = 0u64;
    for file in files {
        let w = Weights::open(file)?;
        let names: Vec<String> = w.names().filter(|n| count(n)).map(str::to_owned).collect();
        for n in names {
            let c: usize = w.shape(&n).map_or(0, |s| s.iter().product());
            total += c as u64;
        }
    }
    Ok(total)
}

/// What an SDXL refiner adds to a whole pipeline, from its folder's or single file's headers:
/// the parameters of its text encoder and of its UNet (a single file's VAE, never loaded, is
/// left out). The memory estimates, made for one model, do not include them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct RefinerParams {
    pub text: u64,
    pub unet: u64,
}

impl RefinerParams {
    pub fn read(path: &Path) -> Result<Self> {
        if !path.is_dir() {
            // LDM names: `conditioner.embedders.0.model.*` and `model.diffusion_model.*`.
            let file = [path.to_path_buf()];
            return Ok(Self {
                text: params_in(&file, |n| n.starts_with("conditioner."))?,
                unet: params_in(&file, |n| n.starts_with("model.diffusion_model."))?,
            });
        }
        let folder = ModelFolder::open(path)?;
        Ok(Self {
            text: params_in(&folder.weight_files("text_encoder_2")?, |_| true)?,
            unet: params_in(&folder.weight_files("unet")?, |_| true)?,
        })
    }
}

/// Estimates one image of `width x height` with guidance (`guided`: batch 2 through the UNet),
/// weights and activations in `dtype`, on `target`, and `opts`. See the module docs for the
/// formula.
pub fn estimate(
    shape: &ModelShape,
    width: usize,
    height: usize,
    guided: bool,
    dtype: DType,
    target: Target,
    opts: &MemoryOptions,
) -> MemoryEstimate {
    let mut attn = opts.attention();
    attn.max_scores = attn.max_scores_for(target.is_gpu());
    let scores = (target != Target::GpuFusedAttention).then_some(&attn);
    estimate_with_attention(shape, width, height, guided, dtype, opts, scores)
}

/// [`estimate`] with the attention options given explicitly (e.g. plain attention), their score
/// block taken as it is; `None`: no score blocks are held (the fused GPU kernel).
pub fn estimate_with_attention(
    shape: &ModelShape,
    width: usize,
    height: usize,
    guided: bool,
    dtype: DType,
    opts: &MemoryOptions,
    attn: Option<&AttentionOptions>,
) -> MemoryEstimate {
    let b = bytes_of(dtype);
    let (w, h) = (width as u64, height as u64);
    let latent = (w / shape.vae_factor.max(1)) * (h / shape.vae_factor.max(1));
    let batch = if guided && !opts.split_batch { 2 } else { 1 };
    let features = UNET_ACTIVATIONS * shape.unet_channels * latent * batch * b;
    let tokens = latent / (shape.attention_downscale * shape.attention_downscale).max(1);
    let full_scores = shape.attention_heads * tokens * tokens;
    let block = attn.map_or(0, |attn| {
        let heads_at_once = attn
            .head_slice
            .map_or(shape.attention_heads, |s| s as u64)
            .min(shape.attention_heads);
        let per_query_row = heads_at_once * tokens;
        let rows = ((attn.max_scores as u64) / per_query_row.max(1)).clamp(1, tokens.max(1));
        (rows * per_query_row).min(full_scores)
    });
    // Scores and their softmax exist together; attention upcasts to f32 in half precision.
    let scores = 2 * block * 4;
    let unet = features + scores;

    let vae_dtype = if opts.vae_on_cpu || opts.vae_f32 {
        DType::F32
    } else {
        dtype
    };
    let vae = VAE_ACTIVATIONS
        * shape.vae_channels
        * vae_pixels(w, h, shape, opts.vae_tiling)
        * bytes_of(vae_dtype);
    let vae_weights = shape.vae_params * bytes_of(vae_dtype);
    // The text encoders run before the UNet, so only their weights count at the peak.
    let (text_weights, text_host) = if opts.text_encoder_on_cpu {
        (0, shape.text_params * bytes_of(DType::F32))
    } else {
        (shape.text_params * b, 0)
    };
    let other_weights = text_weights + shape.unet_params * b;
    let (weights, peak, host) = if opts.vae_on_cpu {
        (
            other_weights,
            other_weights + unet,
            vae + vae_weights + text_host,
        )
    } else {
        let weights = other_weights + vae_weights;
        (weights, weights + unet.max(vae), text_host)
    };
    MemoryEstimate {
        weights,
        unet,
        vae,
        peak,
        host,
    }
}

/// [`estimate`] for a staged job ([`crate::pipeline::staged`]) where every model shares one
/// memory (the CPU): one model at a time, so the peak is the largest of the text encoders alone,
/// the UNet with its working set, and the VAE with its decode. `unet_half`: the UNet keeps f16
/// storage (an fp16 file on the CPU, or low-memory mode "On"). The text encoders and the VAE
/// are counted in their placement's dtype, which over-counts them under "On" (f16 storage
/// there too): neither is the largest stage for the families we draw.
#[allow(clippy::too_many_arguments)]
pub fn estimate_staged(
    shape: &ModelShape,
    width: usize,
    height: usize,
    guided: bool,
    dtype: DType,
    target: Target,
    opts: &MemoryOptions,
    unet_half: bool,
) -> MemoryEstimate {
    let whole = estimate(shape, width, height, guided, dtype, target, opts);
    let b = bytes_of(dtype);
    let text = shape.text_params
        * if opts.text_encoder_on_cpu {
            bytes_of(DType::F32)
        } else {
            b
        };
    let unet = shape.unet_params * if unet_half { 2 } else { b };
    let vae = shape.vae_params
        * if opts.vae_on_cpu || opts.vae_f32 {
            bytes_of(DType::F32)
        } else {
            b
        };
    let (weights, work) = [(text, 0), (unet, whole.unet), (vae, whole.vae)]
        .into_iter()
        .max_by_key(|(w, x)| w + x)
        .unwrap_or_default();
    MemoryEstimate {
        weights,
        unet: whole.unet,
        vae: whole.vae,
        peak: weights + work,
        host: 0,
    }
}

/// Asks the C allocator to keep large freed buffers for reuse instead of unmapping each one.
///
/// A denoising step allocates and frees hundreds of tensors of 10-100 MB. glibc serves
/// allocations above its mmap threshold (at most 32 MB by default) with fresh mappings, so
/// every such tensor paid a page fault and a kernel page clear per 4 KiB on first write: at
/// 512x512 that made a 320->2560 feed-forward product 1.6x slower (0.158 vs 0.097 s, measured
/// with `bench --ops`). With a 1 GiB threshold they come from the heap, where freed blocks are
/// reused. Peak RSS stays about the same (the same buffers are live at the peak); memory freed
/// after a generation stays with the process, which keeps its model loaded anyway. Call once,
/// first thing in `main`, before other threads start. Other platforms' allocators: no-op.
/// `LD_KEEP_FREED=0` leaves glibc's defaults, for comparisons.
pub fn keep_freed_buffers() {
    if std::env::var_os("LD_KEEP_FREED").is_some_and(|v| v == "0") {
        return;
    }
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        const ONE_GIB: libc::c_int = 1 << 30;
        // SAFETY: mallopt only sets allocator parameters; called before other threads start.
        unsafe {
            libc::mallopt(libc::M_MMAP_THRESHOLD, ONE_GIB);
            libc::mallopt(libc::M_TRIM_THRESHOLD, ONE_GIB);
        }
    }
}

/// Makes every thread allocate from one glibc arena (`M_ARENA_MAX` 1), for the low-memory modes.
/// By default each thread that allocates gets an arena of its own, and [`release_freed_memory`]
/// cannot shrink the top of a thread's arena: after a staged SD 1.5 job on the CPU about 140 MB
/// of freed working memory stayed resident in three arenas, so every later job peaked at 2.20 GB
/// instead of 2.10; with one arena a job ends at 6 MB and two jobs peak at 1.94 GB. Threads then
/// share one allocator lock, which cost a few percent of a UNet step, so it is not the default.
/// Call before other threads start. Other platforms' allocators: no-op.
pub fn share_one_arena() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only sets an allocator parameter; called before other threads start.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 1);
    }
}

/// Gives the heap's free pages back to the system (glibc's `malloc_trim`). [`keep_freed_buffers`]
/// keeps freed buffers for the next step's tensors; a staged run that has just freed a whole
/// model (`crate::pipeline::staged`) wants its pages back instead, so that the next stage's
/// resident memory is its own model and working set, not the last model's leftovers (SD 1.5:
/// 1.1 GB of the UNet's 1.7 GB stayed resident through the VAE decode without it). Other
/// platforms' allocators: no-op.
pub fn release_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only returns free heap memory to the kernel; it touches no live block.
    unsafe {
        libc::malloc_trim(0);
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    const GIB: u64 = 1 << 30;

    /// "a cat" at 64x64 in `steps` steps, for the tiny models.
    fn small_request(steps: usize) -> crate::pipeline::GenerateRequest {
        crate::pipeline::GenerateRequest {
            prompt: "a cat".into(),
            steps,
            width: 64,
            height: 64,
            ..Default::default()
        }
    }

    #[test]
    fn matches_the_measured_sd15_run_within_ten_percent() {
        // REFERENCE.md: full-size SD1.5 at 512x512, batch 2, f32, plain attention: 5.6-5.8 GB
        // peak RSS in PyTorch and candle. Plain attention = a score block as large as it gets.
        let e = estimate_with_attention(
            &ModelShape::SD1,
            512,
            512,
            true,
            DType::F32,
            &MemoryOptions::default(),
            Some(&AttentionOptions::plain()),
        );
        let measured = 5.7e9;
        let ratio = e.peak as f64 / measured;
        assert!((0.9..1.1).contains(&ratio), "{e:?} vs {measured}");
    }

    #[test]
    fn a_staged_job_peaks_at_its_largest_model_alone() {
        let est = |shape: &ModelShape, size, half| {
            let o = MemoryOptions::default();
            let whole = estimate(shape, size, size, true, DType::F32, Target::Cpu, &o);
            let staged =
                estimate_staged(shape, size, size, true, DType::F32, Target::Cpu, &o, half);
            (whole, staged)
        };
        // SD 1.5 at 512x512 on the CPU, UNet in f16: measured 1.94-2.1 GB of peak RSS for the
        // whole staged job (the process itself included); the UNet stage is the largest.
        let (whole, staged) = est(&ModelShape::SD1, 512, true);
        assert_eq!(
            staged.peak,
            ModelShape::SD1.unet_params * 2 + whole.unet,
            "{staged:?}"
        );
        assert!((1.6e9..2.1e9).contains(&(staged.peak as f64)), "{staged:?}");
        assert!(staged.peak < whole.peak / 2, "{staged:?} {whole:?}");
        // An f32 UNet file: twice the UNet's weights.
        let (_, f32_unet) = est(&ModelShape::SD1, 512, false);
        assert!(
            (3.3e9..3.9e9).contains(&(f32_unet.peak as f64)),
            "{f32_unet:?}"
        );
        // Every stage's figure is at most the whole pipeline's, for every family and size.
        for shape in [ModelShape::SD1, ModelShape::SD2, ModelShape::SDXL] {
            for size in [512, 768, 1024, 2048] {
                let (whole, staged) = est(&shape, size, false);
                assert!(staged.peak <= whole.peak, "{size}: {staged:?} {whole:?}");
                let stages = [
                    shape.text_params * 4,
                    shape.unet_params * 4 + whole.unet,
                    shape.vae_params * 4 + whole.vae,
                ];
                assert_eq!(Some(staged.peak), stages.into_iter().max());
            }
        }
    }

    #[test]
    fn strategies_lower_the_estimate() {
        let base = estimate(
            &ModelShape::SD1,
            1024,
            1024,
            true,
            DType::F16,
            Target::Gpu,
            &Default::default(),
        );
        let tiled = estimate(
            &ModelShape::SD1,
            1024,
            1024,
            true,
            DType::F16,
            Target::Gpu,
            &MemoryOptions {
                vae_tiling: true,
                ..Default::default()
            },
        );
        assert!(tiled.vae < base.vae / 3, "{tiled:?} {base:?}");
        let lowest = estimate(
            &ModelShape::SD1,
            1024,
            1024,
            true,
            DType::F16,
            Target::Gpu,
            &MemoryOptions::lowest(),
        );
        assert!(lowest.peak < base.peak, "{lowest:?} {base:?}");
        assert!(lowest.host > 0 && lowest.weights < base.weights);
        // fp16 weights of SD1.5 are about 2.1 GB.
        assert!((1.9e9..2.3e9).contains(&(base.weights as f64)), "{base:?}");
        // SDXL's weights alone are about 7 GB in fp16.
        let xl = estimate(
            &ModelShape::SDXL,
            1024,
            1024,
            true,
            DType::F16,
            Target::Gpu,
            &Default::default(),
        );
        assert!(xl.weights > 6 * GIB && xl.weights < 8 * GIB, "{xl:?}");
        // With its two text encoders (818 M parameters) on the CPU, 1.5 GiB of fp16 weights
        // leave the card and come back as 3 GiB of f32 on the host.
        let xl_cpu_text = estimate(
            &ModelShape::SDXL,
            1024,
            1024,
            true,
            DType::F16,
            Target::Gpu,
            &MemoryOptions {
                text_encoder_on_cpu: true,
                ..Default::default()
            },
        );
        assert_eq!(xl.weights - xl_cpu_text.weights, 817_844_480 * 2);
        assert_eq!(xl_cpu_text.host, 817_844_480 * 4);
        assert_eq!(xl.peak - xl_cpu_text.peak, 817_844_480 * 2);
    }

    #[test]
    fn gpu_attention_blocks_are_counted_larger_in_any_dtype() {
        // The GPU's default score block is 16x the CPU's; fp32 on a GPU counts it too.
        let at = |dtype, gpu| {
            estimate(
                &ModelShape::SDXL,
                1024,
                1024,
                true,
                dtype,
                gpu,
                &Default::default(),
            )
            .unet
        };
        assert!(at(DType::F32, Target::Gpu) > at(DType::F32, Target::Cpu));
        assert!(at(DType::F16, Target::Gpu) > at(DType::F16, Target::Cpu));
        // An explicit (sliced) block is used as given on either.
        let sliced = MemoryOptions::lowest();
        let with = |gpu| {
            estimate(
                &ModelShape::SDXL,
                1024,
                1024,
                true,
                DType::F32,
                gpu,
                &sliced,
            )
        };
        assert_eq!(with(Target::Gpu).unet, with(Target::Cpu).unet);
    }

    #[test]
    fn the_fused_gpu_kernel_holds_no_score_blocks() {
        assert_eq!(Target::nvidia(8, DType::F16), Target::GpuFusedAttention);
        assert_eq!(Target::nvidia(9, DType::BF16), Target::GpuFusedAttention);
        // Turing and older, or f32: score blocks, as before.
        assert_eq!(Target::nvidia(7, DType::F16), Target::Gpu);
        assert_eq!(Target::nvidia(8, DType::F32), Target::Gpu);
        for opts in [MemoryOptions::default(), MemoryOptions::lowest()] {
            let at = |target| {
                estimate(
                    &ModelShape::SDXL,
                    1024,
                    1024,
                    true,
                    DType::F16,
                    target,
                    &opts,
                )
            };
            let (blocks, fused) = (at(Target::Gpu), at(Target::GpuFusedAttention));
            // Only the scores differ: the default GPU block is up to 64 Mi scores, kept with
            // their softmax in f32 (512 MiB); the sliced block of the lowest options 1 Mi (8
            // MiB). Blocks are whole query rows, so a little under the budget.
            let scores = blocks.unet - fused.unet;
            let budget = 2 * 4 * opts.attention().max_scores_for(true) as u64;
            assert!(
                scores <= budget && scores >= budget / 100 * 99,
                "{opts:?}: {scores}"
            );
            assert_eq!(blocks.weights, fused.weights);
            // The peak drops by the scores where the UNet sets it (the lowest options decode
            // on the CPU), by at most that where the VAE's decode does.
            let drop = blocks.peak - fused.peak;
            assert!(drop <= scores, "{opts:?}");
            if opts.vae_on_cpu {
                assert_eq!(drop, scores);
            }
        }
    }

    #[test]
    fn reads_the_tiny_model() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../models/tiny/sd1");
        let s = ModelShape::from_folder(&dir).unwrap();
        assert_eq!((s.unet_channels, s.vae_channels, s.vae_factor), (32, 8, 8));
        assert_eq!((s.attention_heads, s.attention_downscale), (8, 1));
        assert!(s.unet_params > 10_000 && s.unet_params < 2_000_000, "{s:?}");
        assert!(s.text_params > 0 && s.vae_params > 0);
        assert!(!s.guidance_embedded);
        // The full-LCM fixture: its UNet embeds the guidance scale, so no guidance pair.
        let lcm = ModelShape::from_folder(&dir.with_file_name("sd1-lcm")).unwrap();
        assert!(lcm.guidance_embedded, "{lcm:?}");
    }

    fn max_abs_diff(a: &candle_core::Tensor, b: &candle_core::Tensor) -> f32 {
        let a = a.to_dtype(DType::F32).unwrap();
        let b = b.to_dtype(DType::F32).unwrap();
        (&a - &b)
            .unwrap()
            .abs()
            .unwrap()
            .flatten_all()
            .unwrap()
            .max(0)
            .unwrap()
            .to_scalar()
            .unwrap()
    }

    #[test]
    fn text_encoders_move_to_f32_on_the_cpu_and_back() {
        use crate::pipeline::{LoadOptions, NoObserver, Pipeline};
        let tiny = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../models/tiny");
        let f16 = LoadOptions {
            dtype: DType::F16,
            ..Default::default()
        };
        // The reference: the same folder loaded in f32 from the start.
        let reference = Pipeline::load(&tiny.join("sdxl"), &LoadOptions::default()).unwrap();
        let mut p = Pipeline::load(&tiny.join("sdxl"), &f16).unwrap();
        let encoders = |p: &Pipeline| {
            let s = p.sdxl.as_ref().expect("an SDXL pipeline");
            [
                p.text_encoder().model().dtype(),
                s.encoder_2.model().dtype(),
            ]
        };
        assert_eq!(encoders(&p), [DType::F16; 2]);
        let on = MemoryOptions {
            text_encoder_on_cpu: true,
            ..Default::default()
        };
        p.set_memory_options(on).unwrap();
        assert_eq!(encoders(&p), [DType::F32; 2]);
        assert!(p
            .memory_options()
            .describe()
            .contains(&"text encoder on CPU"));
        for (enc, reference) in [
            (p.text_encoder(), reference.text_encoder()),
            (
                &p.sdxl.as_ref().unwrap().encoder_2,
                &reference.sdxl.as_ref().unwrap().encoder_2,
            ),
        ] {
            let layer = crate::clip::HiddenLayer::Raw(2);
            let (moved, pooled) = enc.encode_prompt_pooled("a cat on a sofa", layer).unwrap();
            // Handed over in the UNet's dtype, as before the move.
            assert_eq!(
                (moved.hidden.dtype(), pooled.dtype()),
                (DType::F16, DType::F16)
            );
            let (want, want_pooled) = reference
                .encode_prompt_pooled("a cat on a sofa", layer)
                .unwrap();
            // The moved encoder computes in f32 on weights that were rounded to f16 at load:
            // measured 1.9e-3 (hidden) and 4.2e-4 (pooled) on activations of size ~1-4, then
            // rounded to f16 again; a rebuild with a wrong or missing tensor is off by O(1).
            let d = max_abs_diff(&moved.hidden, &want.hidden);
            let dp = max_abs_diff(&pooled, &want_pooled);
            assert!(d < 2e-2 && dp < 2e-2, "hidden {d}, pooled {dp}");
        }
        let req = small_request(2);
        p.generate(&req, &mut NoObserver).unwrap();
        p.set_memory_options(MemoryOptions::default()).unwrap();
        assert_eq!(encoders(&p), [DType::F16; 2]);
    }

    #[test]
    fn low_memory_pipeline_samples_the_same_latents() {
        use crate::pipeline::{LoadOptions, NoObserver, Pipeline};
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../models/tiny/sd1");
        let mut p = Pipeline::load(&dir, &LoadOptions::default()).unwrap();
        let req = small_request(3);
        let plain = p
            .sample_latents(&req, &mut NoObserver, &mut |_, _| {})
            .unwrap();
        let low = MemoryOptions {
            attention_slice: Some(64),
            split_batch: true,
            vae_tiling: true,
            ..Default::default()
        };
        p.set_memory_options(low).unwrap();
        assert_eq!(p.memory_options(), low);
        let sliced = p
            .sample_latents(&req, &mut NoObserver, &mut |_, _| {})
            .unwrap();
        // Slicing and splitting change only the shapes of the matrix products, so the order of
        // f32 sums: measured 1.6e-4 after 3 steps on latents of magnitude ~1; 1e-3 leaves margin
        // and still fails on any real difference (a wrong head or batch half is O(1)).
        let max = max_abs_diff(&plain, &sliced);
        assert!(max < 1e-3, "max {max}");
        // 64x64 pixels fit one tile: the tiled decode is the plain one.
        let a = p.decode(&sliced).unwrap();
        // Same attention, tiling off: the only difference left is the tiling.
        p.set_memory_options(MemoryOptions {
            vae_tiling: false,
            ..low
        })
        .unwrap();
        let b = p.decode(&sliced).unwrap();
        assert_eq!(max_abs_diff(&a, &b), 0.0);
    }

    #[test]
    fn half_weight_storage_equals_weights_rounded_to_f16() {
        use crate::pipeline::{HalfWeights, LoadOptions, NoObserver, Pipeline};
        let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../models/tiny/sd1");
        // A copy whose UNet file holds the weights half storage keeps in f16 rounded to f16:
        // convolution kernels and the transformers' linear layers, not the biases, norms or
        // time-embedding layers (small, and kept in f32).
        let tmp = tempfile::tempdir().unwrap();
        let copy = tmp.path().join("sd1");
        copy_dir(&src, &copy);
        round_to_f16(
            &copy.join("unet/diffusion_pytorch_model.safetensors"),
            |k, t| {
                k.ends_with(".weight")
                    && (t.rank() == 4
                        || t.rank() == 2
                            && !k.starts_with("time_embedding")
                            && !k.contains("time_emb_proj"))
            },
        );
        // Low-memory mode stores the text encoder's layers in f16 too (see the test below).
        round_to_f16(
            &copy.join("text_encoder/model.safetensors"),
            text_layer_matrix,
        );

        let req = small_request(3);
        let latents_with = |dir: &Path, half_weights: HalfWeights| {
            let opts = LoadOptions {
                half_weights,
                ..Default::default()
            };
            Pipeline::load(dir, &opts)
                .unwrap()
                .sample_latents(&req, &mut NoObserver, &mut |_, _| {})
                .unwrap()
        };
        let latents = |dir: &Path, on: bool| {
            latents_with(
                dir,
                if on {
                    HalfWeights::On
                } else {
                    HalfWeights::Off
                },
            )
        };
        let full = latents(&src, false);
        let half = latents(&src, true);
        let rounded = latents(&copy, false);
        // Stored in f16 and widened per layer = computing in f32 with f16-rounded weights,
        // exactly (same kernels, same values).
        assert_eq!(max_abs_diff(&half, &rounded), 0.0);
        // And the rounding is real (the tiny model's weights are not f16 values) but small:
        // measured 0.06 on latents up to 47 after 3 steps at CFG 7 (1.3e-3 of their scale).
        let d = max_abs_diff(&full, &half);
        let scale = full
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(
            d > 0.0 && d < 1e-2 * scale,
            "f32 vs f16-stored weights: {d} (latents up to {scale})"
        );

        // A UNet file stored in f16: the default (f16 storage when lossless) takes it and
        // draws exactly what full f32 weights of the same values draw.
        let f16_copy = tmp.path().join("sd1-f16");
        copy_dir(&src, &f16_copy);
        let file = f16_copy.join("unet/diffusion_pytorch_model.safetensors");
        let tensors = candle_core::safetensors::load(&file, &candle_core::Device::Cpu).unwrap();
        let f16: std::collections::HashMap<String, candle_core::Tensor> = tensors
            .into_iter()
            .map(|(k, t)| (k, t.to_dtype(DType::F16).unwrap()))
            .collect();
        candle_core::safetensors::save(&f16, &file).unwrap();
        assert!(crate::weights::Weights::open(&file).unwrap().all_f16());
        // What the job service's memory estimate asks before a load.
        let stores = |dir: &Path, half_weights: HalfWeights, loras: bool| {
            let opts = LoadOptions {
                half_weights,
                ..Default::default()
            };
            opts.unet_stores_half(dir, loras).unwrap()
        };
        assert!(stores(&f16_copy, HalfWeights::WhenLossless, false));
        assert!(!stores(&f16_copy, HalfWeights::WhenLossless, true));
        assert!(!stores(&f16_copy, HalfWeights::Off, false));
        assert!(!stores(&src, HalfWeights::WhenLossless, false));
        assert!(stores(&src, HalfWeights::On, true));
        assert!(stores(&file, HalfWeights::WhenLossless, false));
        assert_eq!(
            max_abs_diff(
                &latents_with(&f16_copy, HalfWeights::WhenLossless),
                &latents_with(&f16_copy, HalfWeights::Off)
            ),
            0.0
        );
    }

    #[test]
    fn vae_half_storage_equals_weights_rounded_to_f16() {
        // Issue 12: low-memory mode keeps the VAE's convolution and linear weights in f16 too
        // (the maths stays f32); that must decode exactly what f32 weights rounded to f16 do.
        use crate::pipeline::{HalfWeights, LoadOptions, Pipeline};
        use crate::rng::NoiseSource;
        let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../models/tiny/sd1");
        let tmp = tempfile::tempdir().unwrap();
        let copy = tmp.path().join("sd1");
        copy_dir(&src, &copy);
        // Kernels and the attention's projections; biases and norms stay f32.
        let narrowed = round_to_f16(
            &copy.join("vae/diffusion_pytorch_model.safetensors"),
            |k, t| k.ends_with(".weight") && matches!(t.rank(), 2 | 4),
        );
        assert!(narrowed > 10, "{narrowed} VAE weights");

        // Seeded (candle's `Tensor::randn` is not): the same latents on every run.
        let latents = crate::rng::TorchRng::new(1)
            .randn_tensor(&[1, 4, 8, 8], &candle_core::Device::Cpu)
            .unwrap();
        let decode = |dir: &Path, half_weights| {
            let opts = LoadOptions {
                half_weights,
                ..Default::default()
            };
            Pipeline::load(dir, &opts)
                .unwrap()
                .decode(&latents)
                .unwrap()
        };
        let half = decode(&src, HalfWeights::On);
        // Exactly: the same kernels on the same values.
        assert_eq!(max_abs_diff(&half, &decode(&copy, HalfWeights::Off)), 0.0);
        // The rounding is real (the tiny VAE's weights are not f16 values).
        assert!(max_abs_diff(&half, &decode(&src, HalfWeights::Off)) > 0.0);
        // The lossless default leaves an f32 VAE file in f32.
        assert_eq!(
            max_abs_diff(
                &decode(&src, HalfWeights::WhenLossless),
                &decode(&src, HalfWeights::Off)
            ),
            0.0
        );
    }

    #[test]
    fn text_encoder_half_storage_equals_weights_rounded_to_f16() {
        // Issue 12: low-memory mode keeps the text encoder's layer projections in f16 as well;
        // the prompt's embeddings must be exactly those of f32 weights rounded to f16.
        use crate::pipeline::{HalfWeights, LoadOptions, Pipeline};
        let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../models/tiny/sd1");
        let tmp = tempfile::tempdir().unwrap();
        let copy = tmp.path().join("sd1");
        copy_dir(&src, &copy);
        let narrowed = round_to_f16(
            &copy.join("text_encoder/model.safetensors"),
            text_layer_matrix,
        );
        assert!(narrowed >= 6, "{narrowed} layer matrices");

        let encode = |dir: &Path, half_weights| {
            let opts = LoadOptions {
                half_weights,
                ..Default::default()
            };
            let p = Pipeline::load(dir, &opts).unwrap();
            p.text_encoder().encode_prompt("a cat", 1).unwrap().hidden
        };
        let half = encode(&src, HalfWeights::On);
        assert_eq!(max_abs_diff(&half, &encode(&copy, HalfWeights::Off)), 0.0);
        assert!(max_abs_diff(&half, &encode(&src, HalfWeights::Off)) > 0.0);
        assert_eq!(
            max_abs_diff(
                &encode(&src, HalfWeights::WhenLossless),
                &encode(&src, HalfWeights::Off)
            ),
            0.0
        );
    }

    #[test]
    fn half_storage_only_where_asked_on_the_cpu_in_f32() {
        use crate::pipeline::{HalfWeights, LoadOptions};
        let with = |half_weights, dtype| LoadOptions {
            half_weights,
            dtype,
            ..Default::default()
        };
        for (h, f16_file, want) in [
            (HalfWeights::Off, true, false),
            (HalfWeights::WhenLossless, false, false),
            (HalfWeights::WhenLossless, true, true),
            (HalfWeights::On, false, true),
        ] {
            assert_eq!(
                with(h, DType::F32).stores_half(f16_file),
                want,
                "{h:?} {f16_file}"
            );
            // A half-precision pipeline has f16 weights already.
            assert!(!with(h, DType::F16).stores_half(f16_file));
        }
        // The tiny model's UNet file is f32.
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../models/tiny/sd1/unet");
        let w = crate::weights::Weights::open(dir.join("diffusion_pytorch_model.safetensors"));
        assert!(!w.unwrap().all_f16());
    }

    /// Rewrites the safetensors `file` with the tensors `stored` picks rounded to f16 values (kept
    /// f32): what f16 weight storage holds. Returns how many were rounded.
    fn round_to_f16(file: &Path, stored: impl Fn(&str, &candle_core::Tensor) -> bool) -> usize {
        let tensors = candle_core::safetensors::load(file, &candle_core::Device::Cpu).unwrap();
        let mut n = 0;
        let rounded: std::collections::HashMap<String, candle_core::Tensor> = tensors
            .into_iter()
            .map(|(k, t)| {
                if !stored(&k, &t) {
                    return (k, t);
                }
                n += 1;
                let r = t
                    .to_dtype(DType::F16)
                    .unwrap()
                    .to_dtype(DType::F32)
                    .unwrap();
                (k, r)
            })
            .collect();
        candle_core::safetensors::save(&rounded, file).unwrap();
        n
    }

    /// The text encoder's weights f16 storage keeps in f16: its layers' q/k/v/out and MLP
    /// matrices (embeddings and norms stay f32).
    fn text_layer_matrix(name: &str, t: &candle_core::Tensor) -> bool {
        name.contains("encoder.layers.") && name.ends_with(".weight") && t.rank() == 2
    }

    /// Copies a tiny model folder, for tests that rewrite or damage its files.
    pub(crate) fn copy_dir(from: &Path, to: &Path) {
        std::fs::create_dir_all(to).unwrap();
        for e in std::fs::read_dir(from).unwrap() {
            let e = e.unwrap();
            let dest = to.join(e.file_name());
            if e.file_type().unwrap().is_dir() {
                copy_dir(&e.path(), &dest);
            } else {
                std::fs::copy(e.path(), dest).unwrap();
            }
        }
    }
}
