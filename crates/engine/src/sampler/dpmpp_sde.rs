//! DPM++ SDE: k-diffusion `sample_dpmpp_sde` (eta 1, r 1/2): a stochastic single-step
//! DPM-Solver++ with two model calls and two noise draws per step, Euler for the last step to 0.
//! A1111 "DPM++ SDE", ComfyUI "dpmpp_sde".
//!
//! Noise: k-diffusion (and A1111, ComfyUI) draw these from a torchsde Brownian tree seeded with
//! the image seed, so the two draws of a step are increments of one Brownian path. We draw
//! independent standard normals from the seeded source instead ([`SampleContext::noise_like`]):
//! deterministic for a seed and the same in distribution for each draw, but not the same numbers
//! as A1111, whose values come from torchsde's own generator. The references feed k-diffusion the
//! same draws (tests/fixtures/make_sampling_refs.py).

use candle_core::Tensor;

use super::{ancestral_step, euler_step, lincomb, run_steps, SampleContext, Sampler, SamplerKind};
use crate::Result;

#[derive(Debug, Clone, Copy, Default)]
pub struct DpmPpSde;

/// A first-order DPM-Solver++ step from `sigma` towards `target` using `denoised`, with
/// ancestral noise: deterministic part down to `sigma_down`, then noise up to `target`.
fn sde_substep(
    ctx: &mut SampleContext<'_>,
    x: &Tensor,
    denoised: &Tensor,
    sigma: f64,
    target: f64,
) -> Result<Tensor> {
    let (down, up) = ancestral_step(sigma, target);
    // (sigma_down / sigma) x - expm1(ln(sigma_down / sigma)) denoised
    let x = lincomb(&[(down / sigma, x), (-(down / sigma).ln().exp_m1(), denoised)])?;
    Ok((&x + (ctx.noise_like(&x)? * up)?)?)
}

impl Sampler for DpmPpSde {
    fn kind(&self) -> SamplerKind {
        SamplerKind::DpmPpSde
    }

    fn sample(&self, x: Tensor, sigmas: &[f64], ctx: &mut SampleContext<'_>) -> Result<Tensor> {
        run_steps(x, sigmas, ctx, |ctx, x, _, sigma, sigma_next| {
            let denoised = ctx.denoiser.denoise(x, sigma)?;
            if sigma_next == 0.0 {
                return Ok((euler_step(x, &denoised, sigma, sigma_next)?, denoised));
            }
            // r = 1/2: the intermediate point is the geometric midpoint, and the final update
            // uses the midpoint's estimate alone (fac = 1 / (2r) = 1).
            let sigma_s = (sigma * sigma_next).sqrt();
            let x2 = sde_substep(ctx, x, &denoised, sigma, sigma_s)?;
            let denoised2 = ctx.denoiser.denoise(&x2, sigma_s)?;
            let x = sde_substep(ctx, x, &denoised2, sigma, sigma_next)?;
            Ok((x, denoised))
        })
    }
}
