//! Samplers in the k-diffusion formulation: they walk a decreasing list of sigmas, asking a
//! [`Denoise`] for the clean-latent estimate at each one. One file per sampler under `sampler/`.
//!
//! The trait is shaped for the whole A1111 set: ancestral and SDE samplers draw extra noise from
//! the [`NoiseSource`] in [`SampleContext`] (so the image stays a function of the seed),
//! multistep ones (LMS, DPM++ 2M/3M, UniPC) keep their history inside `sample`, and samplers that
//! are defined on the training timesteps (DDIM, LCM) pick their own sigmas in
//! [`Sampler::sigmas`] when the schedule is [`ScheduleKind::Automatic`].
//!
//! Latent convention: the state `x` is `x0 + sigma * noise` ("k-diffusion space"). diffusers'
//! latents are `x / sqrt(1 + sigma^2)`; [`to_diffusers_latents`] converts, which matters when the
//! last sigma is not 0 (DDIM ends at alphas_cumprod[0]).

mod ddim;
mod euler;

pub use ddim::Ddim;
pub use euler::Euler;

use candle_core::Tensor;

use crate::denoiser::Denoise;
use crate::rng::NoiseSource;
use crate::schedule::{NoiseSchedule, ScheduleKind};
use crate::{EngineError, Result};

/// The samplers the engine knows, by A1111 name. New samplers are new variants.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
#[non_exhaustive]
pub enum SamplerKind {
    /// k-diffusion `sample_euler` (s_churn 0): A1111 "Euler", ComfyUI "euler".
    #[default]
    Euler,
    /// diffusers `DDIMScheduler` with eta 0: A1111 "DDIM", ComfyUI "ddim".
    Ddim,
}

impl SamplerKind {
    pub const ALL: &'static [SamplerKind] = &[SamplerKind::Euler, SamplerKind::Ddim];

    /// The A1111 display name ("Euler", "DDIM"), also what infotexts write.
    pub fn name(self) -> &'static str {
        match self {
            SamplerKind::Euler => "Euler",
            SamplerKind::Ddim => "DDIM",
        }
    }

    /// Parses an A1111 name or a ComfyUI name, ignoring case ("Euler", "euler", "DDIM", "ddim").
    pub fn from_name(name: &str) -> Option<Self> {
        let name = name.trim();
        Self::ALL.iter().copied().find(|k| {
            k.name().eq_ignore_ascii_case(name) || k.comfy_name().eq_ignore_ascii_case(name)
        })
    }

    /// The ComfyUI name ("euler", "ddim").
    pub fn comfy_name(self) -> &'static str {
        match self {
            SamplerKind::Euler => "euler",
            SamplerKind::Ddim => "ddim",
        }
    }

    /// The sampler itself.
    pub fn sampler(self) -> Box<dyn Sampler> {
        match self {
            SamplerKind::Euler => Box::new(Euler),
            SamplerKind::Ddim => Box::new(Ddim),
        }
    }
}

/// What a sampler reports after each step.
pub struct StepInfo<'a> {
    /// 0-based index of the step just done.
    pub step: usize,
    /// Number of steps in this run (`sigmas.len() - 1`).
    pub total: usize,
    /// The sigma the step started from and the one it went to.
    pub sigma: f64,
    pub sigma_next: f64,
    /// The state after the step.
    pub x: &'a Tensor,
    /// The model's clean-latent estimate made during the step (what previews show).
    pub denoised: &'a Tensor,
}

/// Whether to go on after a step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Control {
    Continue,
    Cancel,
}

/// Called by a sampler after every step; [`Control::Cancel`] stops it with
/// [`EngineError::Cancelled`].
pub trait StepObserver {
    fn on_step(&mut self, info: &StepInfo<'_>) -> Control;
}

impl<F: FnMut(&StepInfo<'_>) -> Control> StepObserver for F {
    fn on_step(&mut self, info: &StepInfo<'_>) -> Control {
        self(info)
    }
}

/// Everything a sampler uses besides its state and sigmas.
pub struct SampleContext<'a> {
    pub denoiser: &'a dyn Denoise,
    /// Extra noise for ancestral/SDE samplers, drawn after the initial latent.
    pub noise: &'a mut dyn NoiseSource,
    pub observer: &'a mut dyn StepObserver,
}

impl SampleContext<'_> {
    /// Tells the observer about a finished step; a cancel becomes [`EngineError::Cancelled`].
    pub fn report(&mut self, info: &StepInfo<'_>) -> Result<()> {
        match self.observer.on_step(info) {
            Control::Continue => Ok(()),
            Control::Cancel => Err(EngineError::Cancelled),
        }
    }
}

pub trait Sampler: Send + Sync {
    fn kind(&self) -> SamplerKind;

    /// The sigmas to walk for `steps` steps: `steps + 1` values, decreasing. The default is the
    /// schedule's; samplers defined on discrete timesteps resolve [`ScheduleKind::Automatic`]
    /// to their own.
    fn sigmas(&self, schedule: &NoiseSchedule, kind: ScheduleKind, steps: usize) -> Vec<f64> {
        schedule.sigmas(kind, steps)
    }

    /// What unit noise is multiplied by to give the starting state at `sigmas[0]`: sigma itself
    /// in k-diffusion (A1111, ComfyUI); diffusers schedulers start from `sqrt(1 + sigma^2)`.
    fn initial_noise_scale(&self, sigmas: &[f64]) -> f64 {
        sigmas[0]
    }

    /// Runs the sampler from `x` at `sigmas[0]` to `sigmas[last]`, reporting every step.
    fn sample(&self, x: Tensor, sigmas: &[f64], ctx: &mut SampleContext<'_>) -> Result<Tensor>;
}

/// diffusers' latent for a k-diffusion state at `sigma`: `x / sqrt(1 + sigma^2)` (the identity at
/// sigma 0). The VAE decodes this.
pub fn to_diffusers_latents(x: &Tensor, sigma: f64) -> Result<Tensor> {
    if sigma == 0.0 {
        return Ok(x.clone());
    }
    Ok((x / (1.0 + sigma * sigma).sqrt())?)
}

/// One Euler step of the probability-flow ODE from `sigma` to `sigma_next`:
/// `x + (x - denoised) / sigma * (sigma_next - sigma)` (k-diffusion `to_d` and the update).
pub(crate) fn euler_step(
    x: &Tensor,
    denoised: &Tensor,
    sigma: f64,
    sigma_next: f64,
) -> Result<Tensor> {
    let d = ((x - denoised)? / sigma)?;
    Ok((x + (d * (sigma_next - sigma))?)?)
}

#[cfg(test)]
pub(crate) mod testutil {
    //! A fake model with a closed-form answer, for sampler tests.
    use super::*;
    use candle_core::{DType, Device};

    /// The exact denoiser for data concentrated at `x0 = c`: every step of a deterministic
    /// sampler lands on `c + sigma_next * noise`, whatever the sigmas.
    pub struct PointMass(pub f32);

    impl Denoise for PointMass {
        fn denoise(&self, x: &Tensor, _sigma: f64) -> Result<Tensor> {
            Ok(Tensor::full(self.0, x.shape(), x.device())?.to_dtype(x.dtype())?)
        }
    }

    pub struct NoNoise;
    impl NoiseSource for NoNoise {
        fn randn(&mut self, shape: &[usize]) -> Vec<f32> {
            panic!("deterministic sampler drew noise for {shape:?}")
        }
    }

    pub fn ones(shape: &[usize]) -> Tensor {
        Tensor::ones(shape, DType::F32, &Device::Cpu).unwrap()
    }

    pub fn values(t: &Tensor) -> Vec<f32> {
        t.flatten_all().unwrap().to_vec1().unwrap()
    }
}

#[cfg(test)]
mod tests {
    use super::testutil::*;
    use super::*;

    #[test]
    fn names_round_trip() {
        for &k in SamplerKind::ALL {
            assert_eq!(SamplerKind::from_name(k.name()), Some(k));
            assert_eq!(SamplerKind::from_name(k.comfy_name()), Some(k));
            assert_eq!(k.sampler().kind(), k);
        }
        assert_eq!(SamplerKind::from_name(" ddim "), Some(SamplerKind::Ddim));
        assert_eq!(SamplerKind::from_name("Euler a"), None);
    }

    #[test]
    fn cancel_stops_after_the_step_that_asked() {
        let mut seen = 0;
        let mut observer = |info: &StepInfo<'_>| {
            seen += 1;
            if info.step == 1 {
                Control::Cancel
            } else {
                Control::Continue
            }
        };
        let mut ctx = SampleContext {
            denoiser: &PointMass(0.5),
            noise: &mut NoNoise,
            observer: &mut observer,
        };
        let err = Euler
            .sample(ones(&[1, 1, 2, 2]), &[3.0, 2.0, 1.0, 0.5, 0.0], &mut ctx)
            .unwrap_err();
        assert!(matches!(err, EngineError::Cancelled));
        assert_eq!(seen, 2);
    }

    #[test]
    fn diffusers_latents_scale() {
        let x = ones(&[1, 1, 1, 1]);
        assert_eq!(values(&to_diffusers_latents(&x, 0.0).unwrap()), [1.0]);
        let v = values(&to_diffusers_latents(&x, 3.0).unwrap())[0];
        assert!((v - 1.0 / 10f32.sqrt()).abs() < 1e-7);
    }
}
