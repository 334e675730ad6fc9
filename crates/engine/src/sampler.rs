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
mod dpm2;
mod dpm2_ancestral;
mod dpmpp_2m;
mod dpmpp_2m_sde;
mod dpmpp_2s_ancestral;
mod dpmpp_3m_sde;
mod dpmpp_sde;
mod euler;
mod euler_ancestral;
mod heun;
mod lcm;
mod lms;
mod unipc;

pub use ddim::Ddim;
pub use dpm2::Dpm2;
pub use dpm2_ancestral::Dpm2Ancestral;
pub use dpmpp_2m::DpmPp2M;
pub use dpmpp_2m_sde::DpmPp2MSde;
pub use dpmpp_2s_ancestral::DpmPp2SAncestral;
pub use dpmpp_3m_sde::DpmPp3MSde;
pub use dpmpp_sde::DpmPpSde;
pub use euler::Euler;
pub use euler_ancestral::EulerAncestral;
pub use heun::Heun;
pub use lcm::Lcm;
pub use lms::Lms;
pub use unipc::UniPc;

use candle_core::Tensor;

use crate::denoiser::Denoise;
use crate::rng::NoiseSource;
use crate::schedule::{NoiseSchedule, ScheduleKind};
use crate::{EngineError, Result};

/// The samplers the engine knows, by A1111 name. New samplers are new variants.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
#[non_exhaustive]
pub enum SamplerKind {
    /// k-diffusion `sample_euler` (s_churn 0).
    Euler,
    /// k-diffusion `sample_euler_ancestral` (eta 1).
    EulerA,
    /// k-diffusion `sample_heun` (s_churn 0).
    Heun,
    /// k-diffusion `sample_dpm_2` (s_churn 0).
    Dpm2,
    /// k-diffusion `sample_dpm_2_ancestral` (eta 1).
    Dpm2A,
    /// k-diffusion `sample_lms` (order 4).
    Lms,
    /// k-diffusion `sample_dpmpp_2m`; the app's default.
    #[default]
    DpmPp2M,
    /// k-diffusion `sample_dpmpp_2s_ancestral` (eta 1).
    DpmPp2SA,
    /// k-diffusion `sample_dpmpp_sde` (eta 1, r 1/2).
    DpmPpSde,
    /// k-diffusion `sample_dpmpp_2m_sde` (eta 1, midpoint).
    DpmPp2MSde,
    /// k-diffusion `sample_dpmpp_3m_sde` (eta 1).
    DpmPp3MSde,
    /// diffusers `DDIMScheduler` with eta 0.
    Ddim,
    /// diffusers `UniPCMultistepScheduler` (B(h) 1, order 3: A1111's and ComfyUI's defaults).
    UniPc,
    /// diffusers `LCMScheduler`.
    Lcm,
}

impl SamplerKind {
    pub const ALL: &'static [SamplerKind] = &[
        SamplerKind::DpmPp2M,
        SamplerKind::DpmPpSde,
        SamplerKind::DpmPp2MSde,
        SamplerKind::DpmPp2SA,
        SamplerKind::DpmPp3MSde,
        SamplerKind::EulerA,
        SamplerKind::Euler,
        SamplerKind::Lms,
        SamplerKind::Heun,
        SamplerKind::Dpm2,
        SamplerKind::Dpm2A,
        SamplerKind::Ddim,
        SamplerKind::UniPc,
        SamplerKind::Lcm,
    ];

    /// The A1111 display name ("DPM++ 2M", "Euler a"), also what infotexts write.
    pub fn name(self) -> &'static str {
        match self {
            SamplerKind::Euler => "Euler",
            SamplerKind::EulerA => "Euler a",
            SamplerKind::Heun => "Heun",
            SamplerKind::Dpm2 => "DPM2",
            SamplerKind::Dpm2A => "DPM2 a",
            SamplerKind::Lms => "LMS",
            SamplerKind::DpmPp2M => "DPM++ 2M",
            SamplerKind::DpmPp2SA => "DPM++ 2S a",
            SamplerKind::DpmPpSde => "DPM++ SDE",
            SamplerKind::DpmPp2MSde => "DPM++ 2M SDE",
            SamplerKind::DpmPp3MSde => "DPM++ 3M SDE",
            SamplerKind::Ddim => "DDIM",
            SamplerKind::UniPc => "UniPC",
            SamplerKind::Lcm => "LCM",
        }
    }

    /// The ComfyUI name ("dpmpp_2m", "euler_ancestral").
    pub fn comfy_name(self) -> &'static str {
        match self {
            SamplerKind::Euler => "euler",
            SamplerKind::EulerA => "euler_ancestral",
            SamplerKind::Heun => "heun",
            SamplerKind::Dpm2 => "dpm_2",
            SamplerKind::Dpm2A => "dpm_2_ancestral",
            SamplerKind::Lms => "lms",
            SamplerKind::DpmPp2M => "dpmpp_2m",
            SamplerKind::DpmPp2SA => "dpmpp_2s_ancestral",
            SamplerKind::DpmPpSde => "dpmpp_sde",
            SamplerKind::DpmPp2MSde => "dpmpp_2m_sde",
            SamplerKind::DpmPp3MSde => "dpmpp_3m_sde",
            SamplerKind::Ddim => "ddim",
            SamplerKind::UniPc => "uni_pc",
            SamplerKind::Lcm => "lcm",
        }
    }

    /// Other accepted names: A1111's internal aliases (`modules/sd_samplers_*.py`: "k_dpmpp_2m",
    /// "k_euler_a") and the ComfyUI name.
    pub fn aliases(self) -> &'static [&'static str] {
        match self {
            SamplerKind::Euler => &["k_euler", "euler"],
            SamplerKind::EulerA => &["k_euler_a", "k_euler_ancestral", "euler_ancestral"],
            SamplerKind::Heun => &["k_heun", "heun"],
            SamplerKind::Dpm2 => &["k_dpm_2", "dpm_2"],
            SamplerKind::Dpm2A => &["k_dpm_2_a", "dpm_2_ancestral"],
            SamplerKind::Lms => &["k_lms", "lms"],
            SamplerKind::DpmPp2M => &["k_dpmpp_2m", "dpmpp_2m"],
            SamplerKind::DpmPp2SA => &["k_dpmpp_2s_a", "dpmpp_2s_ancestral"],
            SamplerKind::DpmPpSde => &["k_dpmpp_sde", "dpmpp_sde"],
            SamplerKind::DpmPp2MSde => &["k_dpmpp_2m_sde", "dpmpp_2m_sde"],
            SamplerKind::DpmPp3MSde => &["k_dpmpp_3m_sde", "dpmpp_3m_sde"],
            SamplerKind::Ddim => &["ddim"],
            SamplerKind::UniPc => &["unipc", "uni_pc"],
            SamplerKind::Lcm => &["k_lcm", "lcm"],
        }
    }

    /// Parses an A1111 name, alias or ComfyUI name, ignoring case ("DPM++ 2M", "dpmpp_2m").
    /// Fused names with a schedule ("DPM++ 2M Karras") are [`parse_sampler`]'s job.
    pub fn from_name(name: &str) -> Option<Self> {
        let name = name.trim();
        Self::ALL.iter().copied().find(|k| {
            k.name().eq_ignore_ascii_case(name)
                || k.aliases().iter().any(|a| a.eq_ignore_ascii_case(name))
        })
    }

    /// What "Automatic" means for this sampler in A1111 1.9+ (the `scheduler` option of
    /// `samplers_k_diffusion` in `modules/sd_samplers_kdiffusion.py`); `None`: the model's own
    /// sigmas (Uniform), or for DDIM/UniPC/LCM their own timesteps.
    pub fn default_schedule(self) -> Option<ScheduleKind> {
        match self {
            SamplerKind::DpmPp2M
            | SamplerKind::DpmPpSde
            | SamplerKind::DpmPp2SA
            | SamplerKind::Dpm2
            | SamplerKind::Dpm2A => Some(ScheduleKind::Karras),
            SamplerKind::DpmPp2MSde | SamplerKind::DpmPp3MSde => Some(ScheduleKind::Exponential),
            _ => None,
        }
    }

    /// The schedule actually walked for `schedule`: Automatic becomes [`Self::default_schedule`]
    /// where there is one. This is what A1111 writes as "Schedule type" in the infotext.
    pub fn resolve_schedule(self, schedule: ScheduleKind) -> ScheduleKind {
        match schedule {
            ScheduleKind::Automatic => self.default_schedule().unwrap_or(schedule),
            other => other,
        }
    }

    /// A1111's `discard_next_to_last_sigma` option: the schedule is made for one step more and
    /// its next-to-last sigma dropped (DPM2, DPM2 a, DPM++ 3M SDE), whatever the schedule.
    pub fn discards_penultimate_sigma(self) -> bool {
        matches!(
            self,
            SamplerKind::Dpm2 | SamplerKind::Dpm2A | SamplerKind::DpmPp3MSde
        )
    }

    /// Whether the sampler draws noise after the initial latent (ancestral, SDE, LCM).
    pub fn is_stochastic(self) -> bool {
        matches!(
            self,
            SamplerKind::EulerA
                | SamplerKind::Dpm2A
                | SamplerKind::DpmPp2SA
                | SamplerKind::DpmPpSde
                | SamplerKind::DpmPp2MSde
                | SamplerKind::DpmPp3MSde
                | SamplerKind::Lcm
        )
    }

    /// The sampler itself.
    pub fn sampler(self) -> Box<dyn Sampler> {
        match self {
            SamplerKind::Euler => Box::new(Euler),
            SamplerKind::EulerA => Box::new(EulerAncestral),
            SamplerKind::Heun => Box::new(Heun),
            SamplerKind::Dpm2 => Box::new(Dpm2),
            SamplerKind::Dpm2A => Box::new(Dpm2Ancestral),
            SamplerKind::Lms => Box::new(Lms),
            SamplerKind::DpmPp2M => Box::new(DpmPp2M),
            SamplerKind::DpmPp2SA => Box::new(DpmPp2SAncestral),
            SamplerKind::DpmPpSde => Box::new(DpmPpSde),
            SamplerKind::DpmPp2MSde => Box::new(DpmPp2MSde),
            SamplerKind::DpmPp3MSde => Box::new(DpmPp3MSde),
            SamplerKind::Ddim => Box::new(Ddim),
            SamplerKind::UniPc => Box::new(UniPc),
            SamplerKind::Lcm => Box::new(Lcm),
        }
    }
}

/// Parses a sampler name as users paste it: A1111 names and aliases, ComfyUI names, and the
/// pre-1.9 fused names that carry a schedule ("DPM++ 2M Karras", "k_dpmpp_2m_ka",
/// "DPM++ 2M SDE Exponential"), all ignoring case. The second value is the schedule a fused name
/// implies. An unknown name is [`EngineError::InvalidRequest`] listing the valid ones.
pub fn parse_sampler(name: &str) -> Result<(SamplerKind, Option<ScheduleKind>)> {
    let trimmed = name.trim();
    if let Some(kind) = SamplerKind::from_name(trimmed) {
        return Ok((kind, None));
    }
    // A1111's old fused aliases: k_<sampler>_ka is Karras ("k_dpmpp_2m_ka"); "_exp" is taken
    // the same way for Exponential.
    let lower = trimmed.to_ascii_lowercase();
    for (suffix, schedule) in [
        ("_ka", ScheduleKind::Karras),
        ("_exp", ScheduleKind::Exponential),
    ] {
        if let Some(base) = lower.strip_suffix(suffix) {
            if let Some(kind) = SamplerKind::from_name(base) {
                return Ok((kind, Some(schedule)));
            }
        }
    }
    // "<sampler> <schedule label>", as A1111 1.9 splits old infotexts; the longest schedule
    // label that leaves a known sampler wins ("DPM++ 2M SDE Karras" is 2M SDE + Karras).
    if let Some(found) = crate::schedule::fused_schedules(trimmed)
        .find_map(|(base, schedule)| Some((SamplerKind::from_name(&base)?, Some(schedule))))
    {
        return Ok(found);
    }
    let names: Vec<&str> = SamplerKind::ALL.iter().map(|k| k.name()).collect();
    Err(EngineError::InvalidRequest(format!(
        "unknown sampler '{trimmed}'; choose one of: {} (a schedule may follow, e.g. \"DPM++ 2M Karras\")",
        names.join(", ")
    )))
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
    /// Fresh standard-normal noise shaped like `x`, from the seeded source.
    pub fn noise_like(&mut self, x: &Tensor) -> Result<Tensor> {
        self.noise.randn_tensor(x.dims(), x.device())
    }

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

    /// The sigmas to walk for `steps` steps, decreasing (usually `steps + 1` values). The default
    /// is A1111's k-diffusion behaviour ([`k_diffusion_sigmas`]); samplers defined on discrete
    /// timesteps resolve [`ScheduleKind::Automatic`] to their own.
    fn sigmas(&self, schedule: &NoiseSchedule, kind: ScheduleKind, steps: usize) -> Vec<f64> {
        k_diffusion_sigmas(self.kind(), schedule, kind, steps)
    }

    /// What unit noise is multiplied by to give the starting state at `sigmas[0]`: sigma itself
    /// in k-diffusion (A1111, ComfyUI); diffusers schedulers start from `sqrt(1 + sigma^2)`.
    fn initial_noise_scale(&self, sigmas: &[f64]) -> f64 {
        sigmas[0]
    }

    /// Runs the sampler from `x` at `sigmas[0]` to `sigmas[last]`, reporting every step.
    fn sample(&self, x: Tensor, sigmas: &[f64], ctx: &mut SampleContext<'_>) -> Result<Tensor>;

    /// The latents a finished run hands to the VAE (or to a hires pass), from its last state
    /// `x` at `last_sigma`. k-diffusion samplers hand `x` over as it is, as A1111 decodes it,
    /// also where a schedule stops above 0 (KL Optimal stops at sigma_min); the samplers that
    /// follow diffusers' schedulers give diffusers' scale ([`to_diffusers_latents`]), which
    /// differs where their own schedule stops above 0 (DDIM's last step).
    fn final_latents(&self, x: &Tensor, _last_sigma: f64) -> Result<Tensor> {
        Ok(x.clone())
    }
}

/// The sigmas A1111 gives a k-diffusion sampler (`KDiffusionSampler.get_sigmas`): Automatic
/// resolved to the sampler's default schedule, and for DPM2, DPM2 a and DPM++ 3M SDE one step
/// more with the next-to-last sigma dropped.
pub fn k_diffusion_sigmas(
    sampler: SamplerKind,
    schedule: &NoiseSchedule,
    kind: ScheduleKind,
    steps: usize,
) -> Vec<f64> {
    let kind = sampler.resolve_schedule(kind);
    if !sampler.discards_penultimate_sigma() {
        return schedule.sigmas(kind, steps);
    }
    let mut sigmas = schedule.sigmas(kind, steps + 1);
    if sigmas.len() >= 3 {
        sigmas.remove(sigmas.len() - 2);
    }
    sigmas
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

/// `sum(coef * tensor)`: the linear combinations every solver step is made of. Coefficients are
/// f64 (computed from f64 sigmas); the tensors stay f32.
pub(crate) fn lincomb(terms: &[(f64, &Tensor)]) -> Result<Tensor> {
    let mut iter = terms.iter();
    let (c, t) = iter.next().expect("at least one term");
    let mut acc = (*t * *c)?;
    for (c, t) in iter {
        acc = (acc + (*t * *c)?)?;
    }
    Ok(acc)
}

/// k-diffusion `get_ancestral_step` with eta 1: the sigma to step down to deterministically and
/// the noise to add so that the marginal at `sigma_to` is right, `(sigma_down, sigma_up)`.
pub(crate) fn ancestral_step(sigma_from: f64, sigma_to: f64) -> (f64, f64) {
    let up = (sigma_to * sigma_to * (sigma_from * sigma_from - sigma_to * sigma_to)
        / (sigma_from * sigma_from))
        .sqrt()
        .min(sigma_to);
    let down = (sigma_to * sigma_to - up * up).sqrt();
    (down, up)
}

/// Runs `body` for every step `(index, sigma, sigma_next)` and reports the state it returns with
/// the denoised estimate it made: the loop every sampler shares.
pub(crate) fn run_steps(
    mut x: Tensor,
    sigmas: &[f64],
    ctx: &mut SampleContext<'_>,
    mut body: impl FnMut(&mut SampleContext<'_>, &Tensor, usize, f64, f64) -> Result<(Tensor, Tensor)>,
) -> Result<Tensor> {
    let total = sigmas.len().saturating_sub(1);
    for (step, pair) in sigmas.windows(2).enumerate() {
        let (sigma, sigma_next) = (pair[0], pair[1]);
        let (next, denoised) = body(ctx, &x, step, sigma, sigma_next)?;
        x = next;
        ctx.report(&StepInfo {
            step,
            total,
            sigma,
            sigma_next,
            x: &x,
            denoised: &denoised,
        })?;
    }
    Ok(x)
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
            assert_eq!(SamplerKind::from_name(&k.name().to_uppercase()), Some(k));
            for alias in k.aliases() {
                assert_eq!(SamplerKind::from_name(alias), Some(k), "{alias}");
            }
            assert_eq!(k.sampler().kind(), k);
            assert_eq!(parse_sampler(k.name()).unwrap(), (k, None));
        }
        assert_eq!(SamplerKind::ALL.len(), 14);
        assert_eq!(SamplerKind::from_name(" ddim "), Some(SamplerKind::Ddim));
        assert_eq!(SamplerKind::from_name("Euler a"), Some(SamplerKind::EulerA));
        assert_eq!(SamplerKind::default(), SamplerKind::DpmPp2M);
        assert_eq!(SamplerKind::default().name(), "DPM++ 2M");
    }

    #[test]
    fn fused_and_foreign_names_parse() {
        use ScheduleKind::*;
        let cases = [
            ("DPM++ 2M Karras", SamplerKind::DpmPp2M, Some(Karras)),
            ("dpm++ 2m karras", SamplerKind::DpmPp2M, Some(Karras)),
            ("DPM++ 2M SDE Karras", SamplerKind::DpmPp2MSde, Some(Karras)),
            (
                "DPM++ 2M SDE Exponential",
                SamplerKind::DpmPp2MSde,
                Some(Exponential),
            ),
            ("DPM++ 3M SDE", SamplerKind::DpmPp3MSde, None),
            ("DPM2 a Karras", SamplerKind::Dpm2A, Some(Karras)),
            ("LMS Karras", SamplerKind::Lms, Some(Karras)),
            ("Euler a", SamplerKind::EulerA, None),
            ("k_euler_a", SamplerKind::EulerA, None),
            ("k_dpmpp_2m_ka", SamplerKind::DpmPp2M, Some(Karras)),
            ("k_dpm_2_a_ka", SamplerKind::Dpm2A, Some(Karras)),
            ("dpmpp_2m", SamplerKind::DpmPp2M, None),
            ("euler_ancestral", SamplerKind::EulerA, None),
            ("uni_pc", SamplerKind::UniPc, None),
            ("Euler SGM Uniform", SamplerKind::Euler, Some(SgmUniform)),
        ];
        for (name, kind, schedule) in cases {
            assert_eq!(parse_sampler(name).unwrap(), (kind, schedule), "{name}");
        }
        for bad in ["Nope", "DPM++ 2M Nope", "", "Karras"] {
            match parse_sampler(bad) {
                Err(EngineError::InvalidRequest(m)) => {
                    assert!(m.contains("DPM++ 2M, DPM++ SDE"), "{m}");
                    assert!(m.contains("UniPC, LCM"), "{m}");
                }
                other => panic!("{bad}: {other:?}"),
            }
        }
    }

    #[test]
    fn automatic_follows_a1111_defaults() {
        // modules/sd_samplers_kdiffusion.py (A1111 1.9+): DPM++ 2M -> karras, DPM++ 2M SDE ->
        // exponential, Euler -> none (the model's own sigmas).
        use ScheduleKind::*;
        assert_eq!(SamplerKind::DpmPp2M.resolve_schedule(Automatic), Karras);
        assert_eq!(
            SamplerKind::DpmPp2MSde.resolve_schedule(Automatic),
            Exponential
        );
        assert_eq!(SamplerKind::Euler.resolve_schedule(Automatic), Automatic);
        assert_eq!(SamplerKind::DpmPp2M.resolve_schedule(Uniform), Uniform);
        let s = NoiseSchedule::from_betas(&[0.01; 1000]);
        let dpm2 = SamplerKind::Dpm2.sampler().sigmas(&s, Karras, 5);
        let karras6 = s.sigmas(Karras, 6);
        assert_eq!(dpm2.len(), 6);
        // The 6-step schedule without its next-to-last sigma.
        assert_eq!(dpm2[..5], karras6[..5]);
        assert_eq!(dpm2[5], 0.0);
        assert_ne!(karras6[5], 0.0);
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

    #[test]
    fn a_run_stopping_above_zero_hands_over_latents_as_its_sampler_family_does() {
        // KL Optimal stops at sigma_min: A1111 decodes a k-diffusion sampler's state as it is;
        // the diffusers-style samplers give diffusers' scale.
        let x = ones(&[1, 1, 1, 1]);
        for kind in SamplerKind::ALL {
            let v = values(&kind.sampler().final_latents(&x, 3.0).unwrap())[0];
            let diffusers_style = matches!(
                kind,
                SamplerKind::Ddim | SamplerKind::UniPc | SamplerKind::Lcm
            );
            let want = if diffusers_style {
                1.0 / 10f32.sqrt()
            } else {
                1.0
            };
            assert!((v - want).abs() < 1e-7, "{kind:?}: {v}");
        }
    }
}
