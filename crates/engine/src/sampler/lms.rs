//! LMS: k-diffusion `sample_lms` (order 4), a linear multistep method on the ODE slopes
//! `d = (x - denoised) / sigma`, one model call per step. A1111 "LMS", ComfyUI "lms".

use candle_core::Tensor;

use super::{run_steps, SampleContext, Sampler, SamplerKind};
use crate::Result;

/// How many past slopes LMS combines (k-diffusion's default `order`).
const ORDER: usize = 4;

#[derive(Debug, Clone, Copy, Default)]
pub struct Lms;

/// The weight of the slope at `sigmas[i - j]` in step `i`: the integral over
/// `[sigmas[i], sigmas[i + 1]]` of its Lagrange basis polynomial through `sigmas[i - k]`,
/// `k < order` (k-diffusion `linear_multistep_coeff`). k-diffusion integrates numerically with
/// scipy's `quad`; the polynomial has degree at most 3, so 3-point Gauss-Legendre is exact.
fn coefficient(order: usize, sigmas: &[f64], i: usize, j: usize) -> f64 {
    let basis = |tau: f64| {
        (0..order)
            .filter(|&k| k != j)
            .map(|k| (tau - sigmas[i - k]) / (sigmas[i - j] - sigmas[i - k]))
            .product::<f64>()
    };
    let (a, b) = (sigmas[i], sigmas[i + 1]);
    let (half, mid) = ((b - a) / 2.0, (a + b) / 2.0);
    let node = (3.0f64 / 5.0).sqrt();
    half * (5.0 / 9.0 * basis(mid - half * node)
        + 8.0 / 9.0 * basis(mid)
        + 5.0 / 9.0 * basis(mid + half * node))
}

impl Sampler for Lms {
    fn kind(&self) -> SamplerKind {
        SamplerKind::Lms
    }

    fn sample(&self, x: Tensor, sigmas: &[f64], ctx: &mut SampleContext<'_>) -> Result<Tensor> {
        // Newest slope last.
        let mut slopes: Vec<Tensor> = Vec::with_capacity(ORDER);
        run_steps(x, sigmas, ctx, |ctx, x, i, sigma, _| {
            let denoised = ctx.denoiser.denoise(x, sigma)?;
            if slopes.len() == ORDER {
                slopes.remove(0);
            }
            slopes.push(((x - &denoised)? / sigma)?);
            let order = slopes.len();
            let mut next = x.clone();
            for (j, d) in slopes.iter().rev().enumerate() {
                next = (next + (d * coefficient(order, sigmas, i, j))?)?;
            }
            Ok((next, denoised))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_order_coefficient_is_the_step() {
        // Order 1 is Euler: the weight is sigma_next - sigma.
        let s = [10.0, 4.0, 1.0, 0.0];
        assert!((coefficient(1, &s, 0, 0) + 6.0).abs() < 1e-12);
        // Weights of any order sum to the step length (the basis sums to 1).
        for order in 1..=3 {
            let i = order - 1;
            let sum: f64 = (0..order).map(|j| coefficient(order, &s, i, j)).sum();
            assert!(
                (sum - (s[i + 1] - s[i])).abs() < 1e-12,
                "order {order}: {sum}"
            );
        }
    }
}
