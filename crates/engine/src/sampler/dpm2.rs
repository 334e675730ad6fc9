//! DPM2: k-diffusion `sample_dpm_2` (s_churn 0): a midpoint step, the midpoint taken in log
//! sigma, Euler for the last step to 0. A1111 "DPM2" (which also drops the next-to-last sigma,
//! see `SamplerKind::discards_penultimate_sigma`), ComfyUI "dpm_2".

use candle_core::Tensor;

use super::{euler_step, run_steps, SampleContext, Sampler, SamplerKind};
use crate::Result;

#[derive(Debug, Clone, Copy, Default)]
pub struct Dpm2;

/// `exp(lerp(ln a, ln b, 1/2))`: the geometric midpoint, as k-diffusion computes it.
pub(super) fn log_midpoint(a: f64, b: f64) -> f64 {
    ((a.ln() + b.ln()) / 2.0).exp()
}

/// One DPM-Solver-2 step from `sigma` to `target` given the denoised estimate at `sigma`.
pub(super) fn dpm2_step(
    ctx: &mut SampleContext<'_>,
    x: &Tensor,
    denoised: &Tensor,
    sigma: f64,
    target: f64,
) -> Result<Tensor> {
    let mid = log_midpoint(sigma, target);
    let x_mid = euler_step(x, denoised, sigma, mid)?;
    let denoised_mid = ctx.denoiser.denoise(&x_mid, mid)?;
    // x + d_mid * (target - sigma), d_mid the slope at the midpoint.
    let d_mid = ((&x_mid - &denoised_mid)? / mid)?;
    Ok((x + (d_mid * (target - sigma))?)?)
}

impl Sampler for Dpm2 {
    fn kind(&self) -> SamplerKind {
        SamplerKind::Dpm2
    }

    fn sample(&self, x: Tensor, sigmas: &[f64], ctx: &mut SampleContext<'_>) -> Result<Tensor> {
        run_steps(x, sigmas, ctx, |ctx, x, _, sigma, sigma_next| {
            let denoised = ctx.denoiser.denoise(x, sigma)?;
            let x = if sigma_next == 0.0 {
                euler_step(x, &denoised, sigma, sigma_next)?
            } else {
                dpm2_step(ctx, x, &denoised, sigma, sigma_next)?
            };
            Ok((x, denoised))
        })
    }
}
