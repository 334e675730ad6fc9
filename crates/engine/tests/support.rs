//! What the engine's integration tests share: the device the reference comparisons run on,
//! tensors read back as numbers, and the two figures every reference comparison uses (largest
//! magnitude, largest difference).

use candle_core::{DType, Device, Tensor};

/// The variable that picks the device of the model and pipeline reference comparisons: unset or
/// `cpu` (the default), or `cuda` (GPU 0; the test binary must be built with `--features cuda`,
/// and run with `NVIDIA_TF32_OVERRIDE=0`; `scripts/gpu_check.sh` does both).
const DEVICE_VAR: &str = "LD_TEST_DEVICE";

thread_local! {
    /// One CUDA device per test thread. Every `Device::new_cuda` call makes a device with its own
    /// id (tensors of two of them cannot be mixed) and its own cuBLAS handle; one per thread keeps
    /// a test's pipelines and inputs on the same device without sharing a handle between tests
    /// that run in parallel.
    static CUDA: Device = {
        // cuDNN runs f32 convolutions in TF32 on Ampere and later GPUs (as PyTorch does by
        // default): about 1e-3 relative, seen as 5e-4..1e-3 UNet/VAE differences on an H100,
        // while the references are f32. The variable must be set before CUDA starts.
        if std::env::var("NVIDIA_TF32_OVERRIDE").as_deref() != Ok("0") {
            panic!(
                "{DEVICE_VAR}=cuda needs NVIDIA_TF32_OVERRIDE=0 in the environment, so that \
                 cuDNN and cuBLAS compute f32 in f32 like the references"
            );
        }
        ld_engine::cuda_device(0).unwrap_or_else(|e| {
            panic!(
                "{DEVICE_VAR}=cuda, but CUDA device 0 cannot be opened ({e}): build the tests \
                 with `--features cuda` (cargo test -p ld-engine --features cuda) and run them on \
                 a machine with an NVIDIA GPU and driver, or unset {DEVICE_VAR} to test on the CPU"
            )
        })
    };
}

/// The device the model and pipeline reference comparisons run on: the CPU unless
/// `LD_TEST_DEVICE=cuda`. Always the same device within a test, so its tensors can be mixed.
pub fn device() -> Device {
    match std::env::var(DEVICE_VAR) {
        Err(std::env::VarError::NotPresent) => Device::Cpu,
        Ok(v) if v.is_empty() || v.eq_ignore_ascii_case("cpu") => Device::Cpu,
        Ok(v) if v.eq_ignore_ascii_case("cuda") => CUDA.with(Device::clone),
        Ok(v) => panic!("{DEVICE_VAR}={v:?}: expected `cpu` (the default) or `cuda`"),
        Err(e) => panic!("{DEVICE_VAR}: {e}"),
    }
}

/// Whether [`device`] is a GPU: for tolerances that must differ there (say why where used; at
/// most 10x the CPU one). No test needs one yet.
#[allow(dead_code)]
pub fn on_gpu() -> bool {
    !device().is_cpu()
}

/// All values of `t` as f32, in row-major order (any dtype, any device).
pub fn values(t: &Tensor) -> Vec<f32> {
    t.to_dtype(DType::F32)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap()
}

/// The largest `|x|` in `t`.
pub fn max_abs(t: &Tensor) -> f32 {
    values(t).into_iter().fold(0.0, |m, v| m.max(v.abs()))
}

/// The largest `|a - b|`, compared in f32; the shapes must agree.
pub fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    assert_eq!(a.dims(), b.dims(), "shapes differ");
    values(a)
        .iter()
        .zip(&values(b))
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}
