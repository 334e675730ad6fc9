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

/// Sinusoidal embedding of a guidance scale `w`, `[1, dim]` f32: diffusers'
/// `get_guidance_scale_embedding` (from VDM), which guidance-distilled UNets (LCM, through
/// `time_cond_proj_dim`) take as `timestep_cond`. It is not [`sinusoidal_embedding`]: the
/// frequencies divide by `half - 1`, sines come first, and w is scaled by 1000.
///
/// The ops follow torch's f32 order (`emb = ln(1e4) / (half - 1)`, `exp(arange * -emb)`,
/// `(w * 1000) * freq`): at w * 1000 = 7000 one ulp of an angle is 5e-4, so a different
/// rounding order would show in the embedding.
pub fn guidance_embedding(w: f64, dim: usize, device: &Device) -> Result<Tensor> {
    let half = dim / 2;
    if half < 2 {
        // diffusers divides by half - 1: zero for a width under 4.
        candle_core::bail!("guidance embedding width must be at least 4, got {dim}");
    }
    let step = (MAX_PERIOD.ln() as f32) / (half - 1) as f32;
    let w = (w as f32) * 1000.0;
    let angles: Vec<f32> = (0..half).map(|i| w * (i as f32 * -step).exp()).collect();
    let mut data: Vec<f32> = angles.iter().map(|a| a.sin()).collect();
    data.extend(angles.iter().map(|a| a.cos()));
    if dim % 2 == 1 {
        data.push(0.0);
    }
    Tensor::from_vec(data, (1, dim), device)
}

/// diffusers `TimestepEmbedding` with its defaults for SD: linear, SiLU, linear; with
/// `cond_proj` (guidance-distilled UNets), a condition projected onto the input is added first.
#[derive(Debug, Clone)]
pub struct TimestepEmbedding {
    linear_1: Linear,
    linear_2: Linear,
    /// `cond_dim -> in_dim`, no bias (diffusers `cond_proj`).
    cond_proj: Option<Linear>,
}

impl TimestepEmbedding {
    /// Loads `linear_1` (`in_dim -> out_dim`) and `linear_2` (`out_dim -> out_dim`) under `vb`.
    pub fn load(vb: VarBuilder, in_dim: usize, out_dim: usize) -> Result<Self> {
        Self::load_with_cond(vb, in_dim, out_dim, None)
    }

    /// [`Self::load`] plus `cond_proj.weight` `[in_dim, cond_dim]` when `cond_dim` is given.
    pub fn load_with_cond(
        vb: VarBuilder,
        in_dim: usize,
        out_dim: usize,
        cond_dim: Option<usize>,
    ) -> Result<Self> {
        Ok(Self {
            linear_1: candle_nn::linear(in_dim, out_dim, vb.pp("linear_1"))?,
            linear_2: candle_nn::linear(out_dim, out_dim, vb.pp("linear_2"))?,
            cond_proj: cond_dim
                .map(|c| candle_nn::linear_no_bias(c, in_dim, vb.pp("cond_proj")))
                .transpose()?,
        })
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.forward_cond(x, None)
    }

    /// `linear_2(silu(linear_1(x + cond_proj(condition))))`; `condition` `[1 or batch, cond_dim]`
    /// broadcasts over `x`'s batch. Without a condition `cond_proj` is skipped, as in diffusers;
    /// a condition without `cond_proj` is an error (diffusers would crash on it).
    pub fn forward_cond(&self, x: &Tensor, condition: Option<&Tensor>) -> Result<Tensor> {
        let x = match (&self.cond_proj, condition) {
            (Some(proj), Some(c)) => x.broadcast_add(&proj.forward(&c.to_dtype(x.dtype())?)?)?,
            (_, None) => x.clone(),
            (None, Some(_)) => candle_core::bail!(
                "timestep_cond given, but this UNet has no time_embedding.cond_proj \
                 (time_cond_proj_dim is not set)"
            ),
        };
        self.linear_2.forward(&self.linear_1.forward(&x)?.silu()?)
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
    fn guidance_embedding_is_vdm_style() {
        // w = 0.002 -> angle scale 2; dim 6: freqs exp(-ln(1e4) * i / (3 - 1)) = [1, 1e-2, 1e-4],
        // sines first (unlike the timestep embedding's flip).
        let e = guidance_embedding(0.002, 6, &Device::Cpu).unwrap();
        assert_eq!(e.dims(), &[1, 6]);
        let v: Vec<f32> = e.flatten_all().unwrap().to_vec1().unwrap();
        let want = [
            2f32.sin(),
            0.02f32.sin(),
            0.0002f32.sin(),
            2f32.cos(),
            0.02f32.cos(),
            0.0002f32.cos(),
        ];
        for (a, b) in v.iter().zip(want) {
            assert!((a - b).abs() < 1e-6, "{v:?} vs {want:?}");
        }
        let odd = guidance_embedding(7.0, 5, &Device::Cpu).unwrap();
        assert_eq!(odd.to_vec2::<f32>().unwrap()[0][4], 0.0);
        assert!(guidance_embedding(7.0, 3, &Device::Cpu).is_err());
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
