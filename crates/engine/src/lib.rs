//! ld-engine: Stable Diffusion inference on candle — text encoders, UNet, VAE, noise, samplers and
//! the text-to-image pipeline. Plain synchronous Rust: no async runtime, no HTTP, no SQL.

pub mod attention;
mod avx512_gemm;
pub mod bench;
pub mod bf16_gemm;
pub mod checkpoint;
pub mod clip;
pub mod config;
#[cfg(feature = "cuda")]
mod cuda_graph;
pub mod denoiser;
pub mod embeddings;
pub mod error;
mod fused_attention;
#[cfg(feature = "cuda")]
mod gpu_attention;
#[cfg(feature = "cudnn")]
mod gpu_conv;
#[cfg(feature = "cuda")]
mod gpu_linear;
#[cfg(feature = "cuda")]
mod gpu_norm;
pub mod hires;
pub mod inpaint;
mod kernels;
pub mod ldm_names;
pub mod linear;
pub mod lora;
pub mod memory;
pub mod model_defaults;
pub mod pickle;
pub mod pipeline;
pub mod profile;
pub mod prompt;
pub mod refiner;
pub mod resnet;
pub mod rng;
pub mod sampler;
pub mod schedule;
pub mod sdxl;
pub mod single_file;
pub mod textual_inversion;
pub mod tokenizer;
pub mod unet;
pub mod vae;
pub mod weights;
mod winograd;

pub use error::{EngineError, Result};

/// Whether this build can drive NVIDIA GPUs (the `cuda` cargo feature).
pub const BUILD_CUDA: bool = cfg!(feature = "cuda");
/// Whether this build can drive Apple GPUs (the `metal` cargo feature).
pub const BUILD_METAL: bool = cfg!(feature = "metal");

/// The kernels that run the CPU's matrix products of f32 tensors now, in words (benchmarks
/// print it beside their figures).
pub fn cpu_products() -> &'static str {
    use avx512_gemm::Format;
    match kernels::Products::current() {
        kernels::Products::Crate => "the gemm crate (f32)",
        kernels::Products::Avx512(Format::F32) => "ours (f32, AVX-512)",
        kernels::Products::Avx512(Format::Bf16) => "ours (bf16, AVX-512 BF16)",
    }
}

/// Opens NVIDIA GPU `ordinal` for the engine: candle's device, without cudarc's per-buffer
/// event tracking. That tracking exists for work spread over several streams; the engine issues
/// all of a device's work on one stream per thread, so its two events per buffer were created
/// and destroyed around every operation (host time in launch-bound steps) and never waited for.
/// Without the `cuda` feature this is candle's error saying so.
pub fn cuda_device(ordinal: usize) -> candle_core::Result<candle_core::Device> {
    let device = candle_core::Device::new_cuda(ordinal)?;
    #[cfg(feature = "cuda")]
    if let candle_core::Device::Cuda(d) = &device {
        // SAFETY: the caller's obligation is to synchronise any second stream by hand; the engine
        // creates none (candle, cuBLAS(Lt) and cuDNN all run on the device's own stream).
        unsafe { d.disable_event_tracking() };
    }
    Ok(device)
}
