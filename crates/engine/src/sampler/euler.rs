//! Euler: k-diffusion `sample_euler` with s_churn 0 (A1111 "Euler"), one model call per step.

use candle_core::Tensor;

use super::{euler_step, SampleContext, Sampler, SamplerKind, StepInfo};
use crate::Result;

/// First-order deterministic sampler of the probability-flow ODE.
#[derive(Debug, Clone, Copy, Default)]
pub struct Euler;

impl Sampler for Euler {
    fn kind(&self) -> SamplerKind {
        SamplerKind::Euler
    }

    fn sample(&self, mut x: Tensor, sigmas: &[f64], ctx: &mut SampleContext<'_>) -> Result<Tensor> {
        let total = sigmas.len().saturating_sub(1);
        for (step, pair) in sigmas.windows(2).enumerate() {
            let (sigma, sigma_next) = (pair[0], pair[1]);
            let denoised = ctx.denoiser.denoise(&x, sigma)?;
            x = euler_step(&x, &denoised, sigma, sigma_next)?;
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
}

#[cfg(test)]
mod tests {
    use super::super::testutil::*;
    use super::super::Control;
    use super::*;

    #[test]
    fn lands_on_the_point_mass() {
        // x = c + sigma * n at every sigma when the denoiser is exact, so after the last step
        // (sigma 0) x is c everywhere.
        let mut steps = Vec::new();
        let mut observer = |info: &StepInfo<'_>| {
            steps.push((info.step, info.total, info.sigma_next));
            Control::Continue
        };
        let mut ctx = SampleContext {
            denoiser: &PointMass(0.25),
            noise: &mut NoNoise,
            observer: &mut observer,
        };
        let x = (ones(&[1, 4, 2, 2]) * 14.6).unwrap();
        let out = Euler.sample(x, &[14.6, 3.0, 0.5, 0.0], &mut ctx).unwrap();
        for v in values(&out) {
            assert!((v - 0.25).abs() < 1e-6, "{v}");
        }
        assert_eq!(steps, [(0, 3, 3.0), (1, 3, 0.5), (2, 3, 0.0)]);
    }
}
