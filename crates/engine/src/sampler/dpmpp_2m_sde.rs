//! DPM++ 2M SDE: k-diffusion `sample_dpmpp_2m_sde` (eta 1, midpoint solver type): the
//! stochastic DPM-Solver++(2M), one model call and one noise draw per step. A1111
//! "DPM++ 2M SDE" (Exponential schedule by default), ComfyUI "dpmpp_2m_sde".
//!
//! Noise: independent draws from the seeded source where A1111 uses a torchsde Brownian tree;
//! see the DPM++ SDE module (`dpmpp_sde.rs`) for what that means for reproducing A1111 images.

use candle_core::Tensor;

use super::{lincomb, run_steps, SampleContext, Sampler, SamplerKind};
use crate::Result;

#[derive(Debug, Clone, Copy, Default)]
pub struct DpmPp2MSde;

impl Sampler for DpmPp2MSde {
    fn kind(&self) -> SamplerKind {
        SamplerKind::DpmPp2MSde
    }

    fn sample(&self, x: Tensor, sigmas: &[f64], ctx: &mut SampleContext<'_>) -> Result<Tensor> {
        let mut old: Option<(Tensor, f64)> = None;
        run_steps(x, sigmas, ctx, |ctx, x, _, sigma, sigma_next| {
            let denoised = ctx.denoiser.denoise(x, sigma)?;
            if sigma_next == 0.0 {
                return Ok((denoised.clone(), denoised));
            }
            let h = (sigma / sigma_next).ln();
            // eta 1: eta_h = h, so the decay is (sigma_next / sigma) e^-h and the data weight
            // 1 - e^-2h.
            let weight = -(-2.0 * h).exp_m1();
            let mut terms = vec![((sigma_next / sigma) * (-h).exp(), x), (weight, &denoised)];
            let correction;
            if let Some((old_denoised, h_last)) = &old {
                let r = h_last / h;
                correction = (&denoised - old_denoised)?;
                terms.push((0.5 * weight / r, &correction));
            }
            let mut next = lincomb(&terms)?;
            next = (&next + (ctx.noise_like(&next)? * (sigma_next * weight.sqrt()))?)?;
            old = Some((denoised.clone(), h));
            Ok((next, denoised))
        })
    }
}
