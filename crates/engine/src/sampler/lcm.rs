//! LCM: the latent consistency model sampler, as diffusers' `LCMScheduler` steps it: take the
//! model's denoised estimate, then (except on the last step) noise it to the next sigma with a
//! fresh draw from the seeded source, `x = denoised + sigma_next * noise` in k-diffusion space.
//! A1111 "LCM", ComfyUI "lcm" (whose `sample_lcm` is the same update).
//!
//! Not modelled: diffusers' boundary-condition scalings `c_skip`/`c_out`, which differ from
//! (0, 1) by less than 1e-5 at the timesteps LCM walks (timestep_scaling 10; ComfyUI and A1111
//! leave them out too).

use candle_core::Tensor;

use super::{run_steps, SampleContext, Sampler, SamplerKind};
use crate::schedule::{NoiseSchedule, ScheduleKind};
use crate::Result;

/// diffusers `original_inference_steps`: the distillation schedule LCM was trained on.
const ORIGINAL_STEPS: usize = 50;

#[derive(Debug, Clone, Copy, Default)]
pub struct Lcm;

/// diffusers `LCMScheduler.set_timesteps(steps)`: the distillation timesteps
/// `k * j - 1` (`k = N / 50`, j = 1..=50), descending, at indices `floor(i * 50 / steps)`; as
/// sigmas, then 0. More than 50 steps (diffusers refuses) uses `steps` distillation steps.
pub(crate) fn lcm_sigmas(schedule: &NoiseSchedule, steps: usize) -> Vec<f64> {
    let n = schedule.num_train_timesteps();
    let original = ORIGINAL_STEPS.max(steps).min(n);
    let steps = steps.clamp(1, original);
    let k = n / original;
    let train = schedule.train_sigmas();
    let mut sigmas: Vec<f64> = (0..steps)
        .map(|i| {
            let index = i * original / steps; // floor(linspace(0, original, steps, endpoint=False))
            let j = original - index; // descending order
            train[k * j - 1]
        })
        .collect();
    sigmas.push(0.0);
    sigmas
}

impl Sampler for Lcm {
    fn kind(&self) -> SamplerKind {
        SamplerKind::Lcm
    }

    fn sigmas(&self, schedule: &NoiseSchedule, kind: ScheduleKind, steps: usize) -> Vec<f64> {
        match kind {
            ScheduleKind::Automatic => lcm_sigmas(schedule, steps),
            other => schedule.sigmas(other, steps),
        }
    }

    fn final_latents(&self, x: &Tensor, last_sigma: f64) -> Result<Tensor> {
        super::to_diffusers_latents(x, last_sigma)
    }

    fn initial_noise_scale(&self, sigmas: &[f64]) -> f64 {
        // diffusers starts from unit noise in its (VP) latent space.
        (1.0 + sigmas[0] * sigmas[0]).sqrt()
    }

    fn sample(&self, x: Tensor, sigmas: &[f64], ctx: &mut SampleContext<'_>) -> Result<Tensor> {
        run_steps(x, sigmas, ctx, |ctx, x, _, sigma, sigma_next| {
            let denoised = ctx.denoiser.denoise(x, sigma)?;
            let next = if sigma_next > 0.0 {
                (&denoised + (ctx.noise_like(&denoised)? * sigma_next)?)?
            } else {
                denoised.clone()
            };
            Ok((next, denoised))
        })
    }
}
