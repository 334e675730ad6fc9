//! Which device and precision the generation worker loads models with, from what this binary was
//! built with and what the machine has.

use candle_core::{DType, Device};
use ld_engine::pipeline::LoadOptions;

/// A GPU in half precision when this build has one and it answers; else the CPU in f32 (half
/// precision on the CPU is slower, not faster).
pub fn load_options() -> LoadOptions {
    #[cfg(feature = "cuda")]
    {
        match Device::new_cuda(0) {
            Ok(device) => {
                return LoadOptions {
                    device,
                    dtype: DType::F16,
                }
            }
            Err(e) => tracing::warn!("no usable CUDA GPU, drawing on the CPU: {e}"),
        }
    }
    #[cfg(feature = "metal")]
    {
        match Device::new_metal(0) {
            Ok(device) => {
                return LoadOptions {
                    device,
                    dtype: DType::F16,
                }
            }
            Err(e) => tracing::warn!("no usable Metal GPU, drawing on the CPU: {e}"),
        }
    }
    LoadOptions {
        device: Device::Cpu,
        dtype: DType::F32,
    }
}
