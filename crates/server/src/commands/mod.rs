//! The heavier subcommands of `local-diffusers`, one file each.

pub mod bench;
pub mod generate;
pub mod models;

use candle_core::{DType, Device};

/// The device this build should run on: the first NVIDIA GPU in a `cuda` build, the Apple GPU in
/// a `metal` build, else the CPU.
pub fn pick_device() -> anyhow::Result<Device> {
    #[cfg(feature = "cuda")]
    {
        return Ok(ld_engine::cuda_device(0)?);
    }
    #[cfg(all(feature = "metal", not(feature = "cuda")))]
    {
        return Ok(Device::new_metal(0)?);
    }
    #[allow(unreachable_code)]
    Ok(Device::Cpu)
}

/// `fp16` / `fp32` / `auto` (f16 on a GPU, f32 on the CPU, where f16 is not faster).
pub fn pick_dtype(precision: &str, device: &Device) -> anyhow::Result<DType> {
    match precision.to_ascii_lowercase().as_str() {
        "auto" => Ok(if device.is_cpu() {
            DType::F32
        } else {
            DType::F16
        }),
        "fp16" | "f16" => Ok(DType::F16),
        "fp32" | "f32" => Ok(DType::F32),
        other => anyhow::bail!("unknown precision '{other}': use auto, fp16 or fp32"),
    }
}
