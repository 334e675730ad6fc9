//! Euler a: k-diffusion `sample_euler_ancestral` (eta 1): an Euler step down to `sigma_down`, then
//! fresh noise up to `sigma_next`. A1111 "Euler a", ComfyUI "euler_ancestral".

use candle_core::Tensor;

use super::{ancestral_step, euler_step, run_steps, SampleContext, Sampler, SamplerKind};
use crate::Result;

#[derive(Debug, Clone, Copy, Default)]
pub struct EulerAncestral;

impl Sampler for EulerAncestral {
    fn kind(&self) -> SamplerKind {
        SamplerKind::EulerA
    }

    fn sample(&self, x: Tensor, sigmas: &[f64], ctx: &mut SampleContext<'_>) -> Result<Tensor> {
        run_steps(x, sigmas, ctx, |ctx, x, _, sigma, sigma_next| {
            let denoised = ctx.denoiser.denoise(x, sigma)?;
            let (down, up) = ancestral_step(sigma, sigma_next);
            let mut x = euler_step(x, &denoised, sigma, down)?;
            // k-diffusion draws no noise for the last step to 0, so neither do we: the stream
            // position matters for anything drawn later.
            if sigma_next > 0.0 {
                x = (&x + (ctx.noise_like(&x)? * up)?)?;
            }
            Ok((x, denoised))
        })
    }
}
