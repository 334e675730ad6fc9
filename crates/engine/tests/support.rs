//! What the engine's integration tests share: tensors read back as numbers, and the two figures
//! every reference comparison uses (largest magnitude, largest difference).

use candle_core::{DType, Tensor};

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
