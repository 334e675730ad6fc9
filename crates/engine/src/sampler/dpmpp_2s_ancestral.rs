//! DPM++ 2S a: k-diffusion `sample_dpmpp_2s_ancestral` (eta 1): a single-step second-order
//! DPM-Solver++ step down to `sigma_down` (two model calls), then fresh noise up to
//! `sigma_next`. A1111 "DPM++ 2S a", ComfyUI "dpmpp_2s_ancestral".

use candle_core::Tensor;

use super::{ancestral_step, euler_step, lincomb, run_steps, SampleContext, Sampler, SamplerKind};
use crate::Result;

#[derive(Debug, Clone, Copy, Default)]
pub struct DpmPp2SAncestral;

impl Sampler for DpmPp2SAncestral {
    fn kind(&self) -> SamplerKind {
        SamplerKind::DpmPp2SA
    }

    fn sample(&self, x: Tensor, sigmas: &[f64], ctx: &mut SampleContext<'_>) -> Result<Tensor> {
        run_steps(x, sigmas, ctx, |ctx, x, _, sigma, sigma_next| {
            let denoised = ctx.denoiser.denoise(x, sigma)?;
            let (down, up) = ancestral_step(sigma, sigma_next);
            let mut x = if down == 0.0 {
                euler_step(x, &denoised, sigma, down)?
            } else {
                // In t = -ln(sigma): h = t(down) - t(sigma), midpoint s = t + h / 2.
                let h = (sigma / down).ln();
                let sigma_s = (sigma * down).sqrt();
                let x2 = lincomb(&[(sigma_s / sigma, x), (-(-h / 2.0).exp_m1(), &denoised)])?;
                let denoised2 = ctx.denoiser.denoise(&x2, sigma_s)?;
                lincomb(&[(down / sigma, x), (-(-h).exp_m1(), &denoised2)])?
            };
            if sigma_next > 0.0 {
                x = (&x + (ctx.noise_like(&x)? * up)?)?;
            }
            Ok((x, denoised))
        })
    }
}
