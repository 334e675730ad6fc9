//! DPM2 a: k-diffusion `sample_dpm_2_ancestral` (eta 1): a DPM2 step down to `sigma_down`, then
//! fresh noise up to `sigma_next`. A1111 "DPM2 a", ComfyUI "dpm_2_ancestral".

use candle_core::Tensor;

use super::dpm2::dpm2_step;
use super::{ancestral_step, euler_step, run_steps, SampleContext, Sampler, SamplerKind};
use crate::Result;

#[derive(Debug, Clone, Copy, Default)]
pub struct Dpm2Ancestral;

impl Sampler for Dpm2Ancestral {
    fn kind(&self) -> SamplerKind {
        SamplerKind::Dpm2A
    }

    fn sample(&self, x: Tensor, sigmas: &[f64], ctx: &mut SampleContext<'_>) -> Result<Tensor> {
        run_steps(x, sigmas, ctx, |ctx, x, _, sigma, sigma_next| {
            let denoised = ctx.denoiser.denoise(x, sigma)?;
            let (down, up) = ancestral_step(sigma, sigma_next);
            let x = if down == 0.0 {
                // k-diffusion adds no noise in this branch (sigma_up is 0 there anyway).
                euler_step(x, &denoised, sigma, down)?
            } else {
                let x = dpm2_step(ctx, x, &denoised, sigma, down)?;
                (&x + (ctx.noise_like(&x)? * up)?)?
            };
            Ok((x, denoised))
        })
    }
}
