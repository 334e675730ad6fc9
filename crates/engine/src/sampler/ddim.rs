//! DDIM with eta 0, matching diffusers' `DDIMScheduler` on the model's own timesteps.
//!
//! With eta 0 a DDIM step is `x0 + sigma_prev * eps` in k-diffusion space, which is exactly an
//! Euler step between the two timesteps' sigmas; what makes it DDIM is where it walks: the
//! config's inference timesteps ("leading" + `steps_offset` for SD1/SD2: 751, 501, 251, 1 for
//! 4 steps) and a last step to `final_alpha_cumprod` (alphas_cumprod[0] unless
//! `set_alpha_to_one`), so the final sigma is not 0. It also starts like diffusers: unit noise in
//! diffusers' latent space, i.e. `sqrt(1 + sigma_max^2)` here.

use candle_core::Tensor;

use super::{Euler, SampleContext, Sampler, SamplerKind};
use crate::schedule::{NoiseSchedule, ScheduleKind};
use crate::Result;

#[derive(Debug, Clone, Copy, Default)]
pub struct Ddim;

impl Sampler for Ddim {
    fn kind(&self) -> SamplerKind {
        SamplerKind::Ddim
    }

    fn sigmas(&self, schedule: &NoiseSchedule, kind: ScheduleKind, steps: usize) -> Vec<f64> {
        match kind {
            ScheduleKind::Automatic => schedule.ddim_sigmas(steps),
            other => schedule.sigmas(other, steps),
        }
    }

    fn final_latents(&self, x: &Tensor, last_sigma: f64) -> Result<Tensor> {
        super::to_diffusers_latents(x, last_sigma)
    }

    fn initial_noise_scale(&self, sigmas: &[f64]) -> f64 {
        (1.0 + sigmas[0] * sigmas[0]).sqrt()
    }

    fn sample(&self, x: Tensor, sigmas: &[f64], ctx: &mut SampleContext<'_>) -> Result<Tensor> {
        // Same update as Euler; see the module documentation.
        Euler.sample(x, sigmas, ctx)
    }
}
