//! DPM++ 2M: k-diffusion `sample_dpmpp_2m` (Lu et al. 2022, DPM-Solver++(2M)): a second-order
//! multistep solver in log sigma using the previous step's denoised estimate, one model call per
//! step. A1111 "DPM++ 2M", ComfyUI "dpmpp_2m"; the app's default with the Karras schedule.

use candle_core::Tensor;

use super::{lincomb, run_steps, SampleContext, Sampler, SamplerKind};
use crate::Result;

#[derive(Debug, Clone, Copy, Default)]
pub struct DpmPp2M;

impl Sampler for DpmPp2M {
    fn kind(&self) -> SamplerKind {
        SamplerKind::DpmPp2M
    }

    fn sample(&self, x: Tensor, sigmas: &[f64], ctx: &mut SampleContext<'_>) -> Result<Tensor> {
        let mut old_denoised: Option<Tensor> = None;
        run_steps(x, sigmas, ctx, |ctx, x, i, sigma, sigma_next| {
            let denoised = ctx.denoiser.denoise(x, sigma)?;
            let x = if sigma_next == 0.0 {
                // t_next = inf: the update collapses to the denoised estimate, which k-diffusion
                // reaches through exp(-inf) = 0 (first order on the last step).
                denoised.clone()
            } else {
                // h = t_next - t with t = -ln(sigma).
                let h = (sigma / sigma_next).ln();
                let ratio = sigma_next / sigma;
                let weight = -(-h).exp_m1();
                match &old_denoised {
                    None => lincomb(&[(ratio, x), (weight, &denoised)])?,
                    Some(old) => {
                        let h_last = (sigmas[i - 1] / sigma).ln();
                        let r = h_last / h;
                        let c = 1.0 / (2.0 * r);
                        // denoised_d = (1 + c) denoised - c old
                        lincomb(&[
                            (ratio, x),
                            (weight * (1.0 + c), &denoised),
                            (-weight * c, old),
                        ])?
                    }
                }
            };
            old_denoised = Some(denoised.clone());
            Ok((x, denoised))
        })
    }
}
