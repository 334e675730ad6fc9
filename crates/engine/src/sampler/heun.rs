//! Heun: k-diffusion `sample_heun` (s_churn 0): Euler predictor, trapezoidal corrector with a
//! second model call, Euler for the last step to 0. A1111 "Heun", ComfyUI "heun".

use candle_core::Tensor;

use super::{euler_step, lincomb, run_steps, SampleContext, Sampler, SamplerKind};
use crate::Result;

#[derive(Debug, Clone, Copy, Default)]
pub struct Heun;

impl Sampler for Heun {
    fn kind(&self) -> SamplerKind {
        SamplerKind::Heun
    }

    fn sample(&self, x: Tensor, sigmas: &[f64], ctx: &mut SampleContext<'_>) -> Result<Tensor> {
        run_steps(x, sigmas, ctx, |ctx, x, _, sigma, sigma_next| {
            let denoised = ctx.denoiser.denoise(x, sigma)?;
            if sigma_next == 0.0 {
                return Ok((euler_step(x, &denoised, sigma, sigma_next)?, denoised));
            }
            let dt = sigma_next - sigma;
            let d = ((x - &denoised)? / sigma)?;
            let x2 = lincomb(&[(1.0, x), (dt, &d)])?;
            let denoised2 = ctx.denoiser.denoise(&x2, sigma_next)?;
            let d2 = ((&x2 - &denoised2)? / sigma_next)?;
            let x = lincomb(&[(1.0, x), (dt / 2.0, &d), (dt / 2.0, &d2)])?;
            Ok((x, denoised))
        })
    }
}
