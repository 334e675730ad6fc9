//! Timestep embeddings for the UNet: diffusers' sinusoidal `Timesteps` projection and the
//! two-layer `TimestepEmbedding` MLP that turns it into the vector every resnet block receives.

use candle_core::{DType, Device, Module, Result, Tensor};
use candle_nn::{Linear, VarBuilder};

/// 10000: `max_period` of diffusers' `get_timestep_embedding` (embeddings.py), the same constant
/// as the transformer position encoding it was taken from.
const MAX_PERIOD: f64 = 10_000.0;

/// Sinusoidal embedding of `timesteps`, shape `[timesteps.len(), dim]`, dtype f32.
///
/// Mirrors diffusers' `get_timestep_embedding` step by step *in f32*, because that is what torch
/// computes: at t = 999 one f32 ulp of the angle is 6e-5, so computing the angles in f64 would
/// move the embedding (and everything downstream) further from the reference than rounding does.
pub fn sinusoidal_embedding(
    timesteps: &[f64],
    dim: usize,
    flip_sin_to_cos: bool,
    downscale_freq_shift: f64,
    device: &Device,
) -> Result<Tensor> {
    let half = dim / 2;
    if half == 0 {
        candle_core::bail!("timestep embedding dimension must be at least 2, got {dim}");
    }
    let denom = half as f64 - downscale_freq_shift;
    if denom == 0.0 {
        // diffusers would divide by zero here too; a config like that is broken.
        candle_core::bail!(
            "timestep embedding: half dim {half} equals freq_shift {downscale_freq_shift}"
        );
    }
    // torch: exponent = -log(max_period) * arange(half, f32); exponent / (half - shift); exp.
    let neg_log = -(MAX_PERIOD.ln()) as f32;
    let denom = denom as f32;
    let freqs: Vec<f32> = (0..half)
        .map(|i| ((neg_log * i as f32) / denom).exp())
        .collect();
    let mut data = Vec::with_capacity(timesteps.len() * dim);
    for &t in timesteps {
        let t = t as f32;
        let angles = freqs.iter().map(|f| t * f);
        let (sin, cos): (Vec<f32>, Vec<f32>) = angles.map(|a| (a.sin(), a.cos())).unzip();
        // diffusers concatenates [sin, cos] and swaps the halves when flip_sin_to_cos is set.
        if flip_sin_to_cos {
            data.extend_from_slice(&cos);
            data.extend_from_slice(&sin);
        } else {
            data.extend_from_slice(&sin);
            data.extend_from_slice(&cos);
        }
        if dim % 2 == 1 {
            data.push(0.0);
        }
    }
    Tensor::from_vec(data, (timesteps.len(), dim), device)
}

/// diffusers `TimestepEmbedding` with its defaults for SD: linear, SiLU, linear.
#[derive(Debug, Clone)]
pub struct TimestepEmbedding {
    linear_1: Linear,
    linear_2: Linear,
}

impl TimestepEmbedding {
    /// Loads `linear_1` (`in_dim -> out_dim`) and `linear_2` (`out_dim -> out_dim`) under `vb`.
    pub fn load(vb: VarBuilder, in_dim: usize, out_dim: usize) -> Result<Self> {
        Ok(Self {
            linear_1: candle_nn::linear(in_dim, out_dim, vb.pp("linear_1"))?,
            linear_2: candle_nn::linear(out_dim, out_dim, vb.pp("linear_2"))?,
        })
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.linear_2.forward(&self.linear_1.forward(x)?.silu()?)
    }
}

/// The timestep projection settings of a UNet (`Timesteps` in diffusers).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct TimestepProjection {
    pub dim: usize,
    pub flip_sin_to_cos: bool,
    pub downscale_freq_shift: f64,
}

impl TimestepProjection {
    /// `[timesteps.len(), dim]` embedding in `dtype` on `device`.
    pub fn embed(&self, timesteps: &[f64], device: &Device, dtype: DType) -> Result<Tensor> {
        sinusoidal_embedding(
            timesteps,
            self.dim,
            self.flip_sin_to_cos,
            self.downscale_freq_shift,
            device,
        )?
        .to_dtype(dtype)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn embedding_matches_hand_computed_values() {
        // dim 4, shift 0: freqs = exp(-ln(1e4) * [0, 1] / 2) = [1, 0.01].
        let e = sinusoidal_embedding(&[2.0], 4, false, 0.0, &Device::Cpu).unwrap();
        let v: Vec<f32> = e.flatten_all().unwrap().to_vec1().unwrap();
        let want = [2f32.sin(), 0.02f32.sin(), 2f32.cos(), 0.02f32.cos()];
        for (a, b) in v.iter().zip(want) {
            assert!((a - b).abs() < 1e-6, "{v:?} vs {want:?}");
        }
        // flip_sin_to_cos puts the cosines first (SD's UNet config sets it).
        let f = sinusoidal_embedding(&[2.0], 4, true, 0.0, &Device::Cpu).unwrap();
        let v: Vec<f32> = f.flatten_all().unwrap().to_vec1().unwrap();
        assert!((v[0] - 2f32.cos()).abs() < 1e-6 && (v[2] - 2f32.sin()).abs() < 1e-6);
    }

    #[test]
    fn odd_dimension_is_zero_padded() {
        let e = sinusoidal_embedding(&[1.0, 5.0], 5, true, 1.0, &Device::Cpu).unwrap();
        assert_eq!(e.dims(), &[2, 5]);
        let v: Vec<Vec<f32>> = e.to_vec2().unwrap();
        assert_eq!(v[0][4], 0.0);
        assert_eq!(v[1][4], 0.0);
    }
}
