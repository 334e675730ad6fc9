//! UniPC (Zhao et al. 2023): a multistep predictor-corrector solver on the denoised estimates,
//! one model call per step, as diffusers' `UniPCMultistepScheduler` computes it with
//! `solver_type="bh1"`, `solver_order=3`, `predict_x0=True`, `lower_order_final=True` (the
//! variant and order A1111 and ComfyUI use by default). A1111 "UniPC", ComfyUI "uni_pc".
//!
//! diffusers works on VP latents with `alpha_t`, `sigma_t`; in k-diffusion space
//! (`x = x_vp / alpha_t`) the same update loses its alpha factors:
//! `x_t = (sigma_t / sigma_s) x_s - expm1(-h) m_s - B(h) sum(rho_k D_k)` with
//! `h = ln(sigma_s / sigma_t)` and `m` the denoised estimates. "Automatic" walks diffusers'
//! default timesteps ("linspace" spacing, what `from_config` of an SD 1.x scheduler config
//! gives) down to 0, and the start is unit noise in VP space.

use candle_core::Tensor;

use super::{lincomb, run_steps, SampleContext, Sampler, SamplerKind};
use crate::schedule::{NoiseSchedule, ScheduleKind};
use crate::Result;

/// The solver order (diffusers `solver_order`; A1111's `uni_pc_order` default).
const ORDER: usize = 3;

#[derive(Debug, Clone, Copy, Default)]
pub struct UniPc;

/// diffusers' "linspace" timesteps: `round(linspace(0, N-1, steps + 1))` reversed without the
/// last (0), as sigmas, then 0.
pub(crate) fn linspace_sigmas(schedule: &NoiseSchedule, steps: usize) -> Vec<f64> {
    let n = schedule.num_train_timesteps();
    let steps = steps.clamp(1, n - 1);
    let train = schedule.train_sigmas();
    let mut sigmas: Vec<f64> = (1..=steps)
        .rev()
        .map(|i| {
            let t = (i as f64 * (n - 1) as f64 / steps as f64).round_ties_even() as usize;
            train[t]
        })
        .collect();
    sigmas.push(0.0);
    sigmas
}

/// The coefficients rho of a UniPC update of `order` with the ratios `rks` (the last one 1):
/// `R rho = b` with `R[i][k] = rks[k]^i` and `b` from the phi functions of `hh = -h`
/// (diffusers `multistep_uni_{p,c}_bh_update`, B(h) = hh for bh1). `full`: solve the whole
/// system (corrector); otherwise drop the last row and column (predictor).
fn rhos(rks: &[f64], hh: f64, full: bool) -> Vec<f64> {
    let order = rks.len();
    let b_h = hh;
    let mut h_phi_k = hh.exp_m1() / hh - 1.0;
    let mut factorial = 1.0;
    let mut b = Vec::with_capacity(order);
    for i in 1..=order {
        b.push(h_phi_k * factorial / b_h);
        factorial *= (i + 1) as f64;
        h_phi_k = h_phi_k / hh - 1.0 / factorial;
    }
    let n = if full { order } else { order - 1 };
    if !full && order == 2 {
        // diffusers fixes the second-order predictor's weight at 1/2 rather than solving.
        return vec![0.5];
    }
    if full && order == 1 {
        return vec![0.5];
    }
    let mut a: Vec<Vec<f64>> = (0..n)
        .map(|i| {
            let mut row: Vec<f64> = rks[..n].iter().map(|r| r.powi(i as i32)).collect();
            row.push(b[i]);
            row
        })
        .collect();
    solve(&mut a)
}

/// Gaussian elimination with partial pivoting on an augmented n x (n + 1) matrix (n <= 3 here).
fn solve(a: &mut [Vec<f64>]) -> Vec<f64> {
    let n = a.len();
    for col in 0..n {
        let pivot = (col..n)
            .max_by(|&i, &j| a[i][col].abs().total_cmp(&a[j][col].abs()))
            .unwrap_or(col);
        a.swap(col, pivot);
        let (top, rest) = a.split_at_mut(col + 1);
        let pivot_row = &top[col];
        for row in rest {
            let f = row[col] / pivot_row[col];
            for (v, p) in row[col..].iter_mut().zip(&pivot_row[col..]) {
                *v -= f * p;
            }
        }
    }
    let mut x = vec![0.0; n];
    for row in (0..n).rev() {
        let s: f64 = (row + 1..n).map(|k| a[row][k] * x[k]).sum();
        x[row] = (a[row][n] - s) / a[row][row];
    }
    x
}

/// One step of history: the denoised estimate at `sigma`.
struct Point {
    sigma: f64,
    denoised: Tensor,
}

/// The UniPC update from `x` at `hist[0].sigma` to `sigma_t` with `order` history points
/// (`hist[0]` newest). `corrector`: the new estimate at `sigma_t` joins the combination.
fn update(
    x: &Tensor,
    hist: &[Point],
    order: usize,
    sigma_t: f64,
    corrector: Option<&Tensor>,
) -> Result<Tensor> {
    let s0 = &hist[0];
    let h = (s0.sigma / sigma_t).ln();
    let hh = -h;
    let mut rks = Vec::with_capacity(order);
    let mut diffs = Vec::with_capacity(order);
    for p in &hist[1..order] {
        // rk = (lambda_k - lambda_0) / h with lambda = -ln(sigma): negative for older points.
        let rk = (s0.sigma / p.sigma).ln() / h;
        rks.push(rk);
        diffs.push(((&p.denoised - &s0.denoised)? / rk)?);
    }
    rks.push(1.0);
    let rho = rhos(&rks, hh, corrector.is_some());
    let b_h = hh;
    let mut terms: Vec<(f64, &Tensor)> =
        vec![(sigma_t / s0.sigma, x), (-hh.exp_m1(), &s0.denoised)];
    for (r, d) in rho.iter().zip(&diffs) {
        terms.push((-b_h * r, d));
    }
    let d_t;
    if let Some(model_t) = corrector {
        d_t = (model_t - &s0.denoised)?;
        terms.push((-b_h * rho[rho.len() - 1], &d_t));
    }
    lincomb(&terms)
}

impl Sampler for UniPc {
    fn kind(&self) -> SamplerKind {
        SamplerKind::UniPc
    }

    fn sigmas(&self, schedule: &NoiseSchedule, kind: ScheduleKind, steps: usize) -> Vec<f64> {
        match kind {
            ScheduleKind::Automatic => linspace_sigmas(schedule, steps),
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
        let total = sigmas.len() - 1;
        // Newest first; at most ORDER points.
        let mut hist: Vec<Point> = Vec::with_capacity(ORDER);
        // The state before the last predictor step and that step's order (the corrector redoes
        // that step with the same order, using the new estimate).
        let mut last: Option<(Tensor, usize)> = None;
        run_steps(x, sigmas, ctx, |ctx, x, i, sigma, sigma_next| {
            let denoised = ctx.denoiser.denoise(x, sigma)?;
            let x = match &last {
                Some((last_x, order)) => update(last_x, &hist, *order, sigma, Some(&denoised))?,
                None => x.clone(),
            };
            hist.insert(
                0,
                Point {
                    sigma,
                    denoised: denoised.clone(),
                },
            );
            hist.truncate(ORDER);
            // Warm-up (at most i + 1 points) and lower order towards the end.
            let order = ORDER.min(total - i).min(hist.len());
            let next = if sigma_next == 0.0 {
                // h is infinite: the first-order update (forced on the last step) is the estimate.
                denoised.clone()
            } else {
                update(&x, &hist, order, sigma_next, None)?
            };
            last = Some((x, order));
            Ok((next, denoised))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn solve_small_systems() {
        let mut a = vec![vec![2.0, 1.0, 5.0], vec![1.0, 3.0, 10.0]];
        let x = solve(&mut a);
        assert!(
            (x[0] - 1.0).abs() < 1e-12 && (x[1] - 3.0).abs() < 1e-12,
            "{x:?}"
        );
    }
}
