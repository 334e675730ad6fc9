//! Which device and precision the generation worker loads models with, and how it manages memory,
//! from what this binary was built with, what the machine has and the user's settings.

use candle_core::{DType, Device};
use ld_core::hardware::{low_vram_options, GpuProbe, GPU_RESERVE};
use ld_core::jobs::MemoryPolicy;
use ld_core::settings::{LowVram, Precision, Settings};
use ld_engine::pipeline::{HalfWeights, LoadOptions};
use std::sync::Arc;

/// A GPU when this build has one, it answers and `gpu_advised` (the hardware advice,
/// [`gpu_advised`]: not with a driver too old or a card too small for any model), else the CPU. Precision "Auto": half on a GPU,
/// f32 on the CPU (half precision on the CPU is slower, not faster); fp16/fp32 as the user chose.
/// On the CPU, low-memory mode ("Low-VRAM mode" On) keeps the UNet's and VAE's weights in f16
/// even for f32 files (`HalfWeights::On`: 1.9 GB less for SD 1.5; images differ by the weights'
/// rounding only), else only where lossless (f16 files). Read at start, as precision is.
pub fn load_options_with(
    precision: Precision,
    low_vram: LowVram,
    gpu_advised: bool,
) -> LoadOptions {
    let pick = |gpu: bool| match precision {
        Precision::Fp16 => DType::F16,
        Precision::Fp32 => DType::F32,
        Precision::Auto if gpu => DType::F16,
        Precision::Auto => DType::F32,
    };
    // A CPU-only build has no card to follow the advice for.
    #[cfg(not(any(feature = "cuda", feature = "metal")))]
    let _ = gpu_advised;
    #[cfg(feature = "cuda")]
    if gpu_advised {
        match ld_engine::cuda_device(0) {
            Ok(device) => {
                return LoadOptions {
                    device,
                    dtype: pick(true),
                    ..Default::default()
                }
            }
            Err(e) => tracing::warn!("no usable CUDA GPU, drawing on the CPU: {e}"),
        }
    }
    #[cfg(feature = "metal")]
    if gpu_advised {
        match Device::new_metal(0) {
            Ok(device) => {
                return LoadOptions {
                    device,
                    dtype: pick(true),
                    ..Default::default()
                }
            }
            Err(e) => tracing::warn!("no usable Metal GPU, drawing on the CPU: {e}"),
        }
    }
    LoadOptions {
        device: Device::Cpu,
        dtype: pick(false),
        half_weights: cpu_half_weights(low_vram),
    }
}

/// Whether the hardware advice ([`ld_core::hardware::recommend`]) draws on a graphics card here:
/// the worker follows it, so a card the advice passes over (a driver too old for this build's
/// CUDA, 2 GB of memory that hold no model) does not fail every job (found by review).
///
/// Only a card the advice positively passes over counts: when the probe sees no card at all
/// (NVML missing in a container where CUDA works) the worker still tries the GPU, as before.
pub fn gpu_advised(probe: &dyn GpuProbe) -> bool {
    use ld_core::hardware::{recommend, system_report, DeviceKind};
    let report = system_report(probe, crate::BUILD);
    report.gpus.is_empty() || recommend(&report).device.value != DeviceKind::Cpu
}

/// The CPU's weight storage under the "Low-VRAM mode" setting (see [`load_options_with`]). Auto
/// stays lossless: it decides by VRAM, which the CPU has none of.
fn cpu_half_weights(low_vram: LowVram) -> HalfWeights {
    match low_vram {
        LowVram::On => HalfWeights::On,
        LowVram::Auto | LowVram::Off => HalfWeights::WhenLossless,
    }
}

/// How the worker manages memory under `settings`. On an NVIDIA GPU each job is estimated against
/// the free VRAM (asked through `gpu` before the job, less a reserve); on the CPU no job is
/// refused before it starts (system memory can swap: slow, not fatal), but "Auto" draws one
/// model at a time when the available RAM is short, and then tiles the decode and splits the
/// guidance pair where even one model's work would not fit (`jobs::plan_cpu_stages`).
pub fn memory_policy(settings: &Settings, gpu: Arc<dyn GpuProbe>) -> MemoryPolicy {
    // The worker draws on the GPU when this is a CUDA build and the advice uses the card (as
    // `load_options_with` was told): a card passed over must not plan CPU jobs against its VRAM
    // (found by review: a 2 GB card's 1 GB refused every job drawn on the processor).
    let on_gpu = crate::BUILD.cuda && gpu_advised(&*gpu);
    let first = if on_gpu {
        gpu.probe().0.into_iter().next()
    } else {
        None
    };
    let vram = first.as_ref().map(|g| g.vram_total_bytes);
    let gpu_major =
        first.and_then(|g| ld_core::hardware::compute_major(g.compute_capability.as_deref()));
    let free: Option<ld_core::jobs::FreeMemory> = vram.map(|_| {
        Arc::new(move || {
            gpu.probe()
                .0
                .first()
                .map(|g| g.vram_free_bytes.saturating_sub(GPU_RESERVE))
        }) as ld_core::jobs::FreeMemory
    });
    // On the CPU, "Auto" draws one model at a time when a picture would not fit in RAM whole.
    let ram_free: Option<ld_core::jobs::FreeMemory> =
        (!on_gpu).then(|| Arc::new(ld_core::hardware::available_ram) as _);
    // And refuses a job that would not fit in RAM and swap together.
    let swap_free: Option<ld_core::jobs::FreeMemory> =
        (!on_gpu).then(|| Arc::new(ld_core::hardware::free_swap) as _);
    MemoryPolicy {
        low_vram: settings.low_vram,
        low_options: low_vram_options(vram.unwrap_or(u64::MAX)),
        free,
        ram_free,
        swap_free,
        gpu_major,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn low_memory_mode_stores_half_weights_on_the_cpu() {
        // Issue 12: the app's low-memory setting turns on what `generate --low-memory` does.
        assert_eq!(cpu_half_weights(LowVram::On), HalfWeights::On);
        assert_eq!(cpu_half_weights(LowVram::Off), HalfWeights::WhenLossless);
        assert_eq!(cpu_half_weights(LowVram::Auto), HalfWeights::WhenLossless);
        #[cfg(not(any(feature = "cuda", feature = "metal")))]
        assert_eq!(
            load_options_with(Precision::Auto, LowVram::On, true).half_weights,
            HalfWeights::On
        );
    }
}
