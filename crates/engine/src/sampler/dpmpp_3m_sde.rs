//! DPM++ 3M SDE: k-diffusion `sample_dpmpp_3m_sde` (eta 1): the third-order multistep
//! stochastic DPM-Solver++, one model call and one noise draw per step. A1111 "DPM++ 3M SDE"
//! (Exponential schedule and the next-to-last sigma dropped by default), ComfyUI "dpmpp_3m_sde".
//!
//! Noise: independent draws from the seeded source where A1111 uses a torchsde Brownian tree;
//! see the DPM++ SDE module (`dpmpp_sde.rs`).

use candle_core::Tensor;

use super::{lincomb, run_steps, SampleContext, Sampler, SamplerKind};
use crate::Result;

#[derive(Debug, Clone, Copy, Default)]
pub struct DpmPp3MSde;

impl Sampler for DpmPp3MSde {
    fn kind(&self) -> SamplerKind {
        SamplerKind::DpmPp3MSde
    }

    fn sample(&self, x: Tensor, sigmas: &[f64], ctx: &mut SampleContext<'_>) -> Result<Tensor> {
        // The last two (denoised, h) pairs, newest first.
        let mut history: Vec<(Tensor, f64)> = Vec::with_capacity(2);
        run_steps(x, sigmas, ctx, |ctx, x, _, sigma, sigma_next| {
            let denoised = ctx.denoiser.denoise(x, sigma)?;
            if sigma_next == 0.0 {
                return Ok((denoised.clone(), denoised));
            }
            let h = (sigma / sigma_next).ln();
            // eta 1: h_eta = 2h.
            let h_eta = 2.0 * h;
            let mut next = lincomb(&[((-h_eta).exp(), x), (-(-h_eta).exp_m1(), &denoised)])?;
            let phi_2 = (-h_eta).exp_m1() / h_eta + 1.0;
            match history.as_slice() {
                [(d1, h1), (d2, h2)] => {
                    let (r0, r1) = (h1 / h, h2 / h);
                    let d1_0 = ((&denoised - d1)? / r0)?;
                    let d1_1 = ((d1 - d2)? / r1)?;
                    let diff = (&d1_0 - &d1_1)?;
                    let phi_3 = phi_2 / h_eta - 0.5;
                    // x += phi_2 (d1_0 + diff r0 / (r0 + r1)) - phi_3 diff / (r0 + r1)
                    next = lincomb(&[
                        (1.0, &next),
                        (phi_2, &d1_0),
                        ((phi_2 * r0 - phi_3) / (r0 + r1), &diff),
                    ])?;
                }
                [(d1, h1)] => {
                    let r = h1 / h;
                    next = lincomb(&[(1.0, &next), (phi_2 / r, &(&denoised - d1)?)])?;
                }
                _ => {}
            }
            let scale = sigma_next * (-(-2.0 * h).exp_m1()).sqrt();
            next = (&next + (ctx.noise_like(&next)? * scale)?)?;
            history.insert(0, (denoised.clone(), h));
            history.truncate(2);
            Ok((next, denoised))
        })
    }
}
