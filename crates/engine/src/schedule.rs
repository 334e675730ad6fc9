//! The model's training noise schedule in sigma space (k-diffusion's formulation) and the sigma
//! sequences samplers walk: A1111's schedule types (Uniform, Karras, Exponential, Polyexponential,
//! SGM Uniform, KL Optimal, Align Your Steps, Simple, Normal, DDIM, Beta), diffusers'
//! "leading"/"trailing" timestep spacings, and the discrete timesteps of diffusers' DDIM.
//! The Beta schedule's quantiles come from our own incomplete beta function (below).
//!
//! Precision: the training schedule is built exactly as diffusers builds it in float32 (betas
//! from a float32 `linspace`, `alphas = 1 - betas` in float32, `cumprod` accumulated in double and
//! stored as float32), because that is what the reference pipelines use and the smallest sigmas
//! are sensitive to it (`1 - alphas_cumprod[0]` loses four digits). From those stored values on,
//! everything is f64, so our sigmas sit within about 1e-7 (relative) of k-diffusion's float32 ones.

use crate::config::{BetaSchedule, SchedulerConfig, TimestepSpacing};
use crate::{EngineError, Result};

/// Which sigma sequence to sample along. Sampler and schedule are separate choices (A1111 1.9,
/// ComfyUI). The formulas are A1111's `modules/sd_schedulers.py` and k-diffusion's
/// `get_sigmas_*`. ComfyUI's `comfy/samplers.py` agrees with them except for its `beta` and
/// `kl_optimal`, which differ from A1111's Beta and KL Optimal (see those); ComfyUI pictures'
/// metadata naming them is read as A1111's, the nearest we have.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
#[non_exhaustive]
pub enum ScheduleKind {
    /// The sampler's own default, as A1111 resolves it (`SamplerKind::default_schedule`): Karras
    /// for DPM++ 2M and friends, Exponential for DPM++ 2M/3M SDE, and otherwise the model's own
    /// discrete sigmas ([`ScheduleKind::Uniform`]; DDIM, UniPC and LCM walk their timesteps).
    #[default]
    Automatic,
    /// t evenly spaced from `num_train_timesteps - 1` down to 0, interpolated in log sigma, then 0
    /// (k-diffusion `DiscreteSchedule.get_sigmas(n)`; A1111 "Uniform").
    Uniform,
    /// Karras et al. 2022 (rho 7) between the model's sigma_min and sigma_max, then 0
    /// (k-diffusion `get_sigmas_karras`).
    Karras,
    /// Evenly spaced in log sigma from sigma_max to sigma_min, then 0 (`get_sigmas_exponential`).
    Exponential,
    /// k-diffusion's `get_sigmas_polyexponential` with A1111's rho 1: the ramp `linspace(1, 0,
    /// n)^rho` in log sigma between sigma_min and sigma_max, then 0 (at rho 1 the same sequence
    /// as Exponential, computed A1111's way).
    Polyexponential,
    /// Like Uniform but `n + 1` timesteps with the last (t = 0) dropped, then 0 (A1111
    /// `sgm_uniform`, ComfyUI `sgm_uniform`).
    SgmUniform,
    /// A1111's "KL Optimal" (Sabour et al. 2024, "Align Your Steps", the KL-optimal schedule):
    /// `tan` of `n + 1` points evenly spaced between `atan(sigma_max)` and `atan(sigma_min)`.
    /// As in A1111 it ends at sigma_min, not 0 (ComfyUI's `kl_optimal` ends at 0).
    KlOptimal,
    /// NVIDIA's "Align Your Steps" sigmas (Sabour et al. 2024) for 10 steps, SD 1.x/2.x or SDXL
    /// ([`NoiseSchedule::for_sdxl`]), interpolated log-linearly to `n`, then 0 (A1111
    /// `align_your_steps`). The table's ends are fixed numbers, not the model's sigma range.
    AlignYourSteps,
    /// Every `N / n`-th training sigma counted from the top, then 0 (ComfyUI `simple`).
    Simple,
    /// `linspace(t(sigma_max), t(sigma_min), n)` in timestep, then 0 (A1111/ComfyUI `normal`).
    /// For the discrete SD schedules this is the same sequence as Uniform.
    Normal,
    /// The training sigmas at t = 1, 1 + N/n, 1 + 2N/n, ... (below N), descending, then 0
    /// (A1111 "DDIM", ComfyUI `ddim_uniform`). Gives more steps than asked when n does not divide
    /// N (8 for 7, 167 for 150), as both do.
    DdimUniform,
    /// A1111's "Beta" (Lee et al. 2024, "Beta Sampling is All You Need"): the quantiles of a
    /// Beta(0.6, 0.6) distribution (A1111's default alpha and beta) at `1 - linspace(0, 1, n)`,
    /// mapped linearly onto sigma_min..sigma_max, then 0. (ComfyUI's `beta` maps them onto
    /// timesteps instead, a different sequence.)
    Beta,
    /// diffusers "leading" spacing: t = i * (N / n) + steps_offset, then 0.
    Leading,
    /// diffusers "trailing" spacing: t = round(N - i * N / n) - 1, then 0.
    Trailing,
}

impl ScheduleKind {
    pub const ALL: &'static [ScheduleKind] = &[
        ScheduleKind::Automatic,
        ScheduleKind::Uniform,
        ScheduleKind::Karras,
        ScheduleKind::Exponential,
        ScheduleKind::Polyexponential,
        ScheduleKind::SgmUniform,
        ScheduleKind::KlOptimal,
        ScheduleKind::AlignYourSteps,
        ScheduleKind::Simple,
        ScheduleKind::Normal,
        ScheduleKind::DdimUniform,
        ScheduleKind::Beta,
        ScheduleKind::Leading,
        ScheduleKind::Trailing,
    ];

    /// The A1111 label ("Karras", "SGM Uniform"), which infotexts write after "Schedule type: ".
    /// Leading and Trailing are diffusers options A1111 lacks; they are named for the UI.
    pub fn name(self) -> &'static str {
        match self {
            ScheduleKind::Automatic => "Automatic",
            ScheduleKind::Uniform => "Uniform",
            ScheduleKind::Karras => "Karras",
            ScheduleKind::Exponential => "Exponential",
            ScheduleKind::Polyexponential => "Polyexponential",
            ScheduleKind::SgmUniform => "SGM Uniform",
            ScheduleKind::KlOptimal => "KL Optimal",
            ScheduleKind::AlignYourSteps => "Align Your Steps",
            ScheduleKind::Beta => "Beta",
            ScheduleKind::Simple => "Simple",
            ScheduleKind::Normal => "Normal",
            ScheduleKind::DdimUniform => "DDIM",
            ScheduleKind::Leading => "Leading",
            ScheduleKind::Trailing => "Trailing",
        }
    }

    /// The ComfyUI scheduler name, where ComfyUI has this schedule.
    pub fn comfy_name(self) -> Option<&'static str> {
        match self {
            ScheduleKind::Karras => Some("karras"),
            ScheduleKind::Exponential => Some("exponential"),
            ScheduleKind::SgmUniform => Some("sgm_uniform"),
            ScheduleKind::Simple => Some("simple"),
            ScheduleKind::Normal => Some("normal"),
            ScheduleKind::DdimUniform => Some("ddim_uniform"),
            _ => None,
        }
    }

    /// Other accepted spellings: A1111's internal names (`sgm_uniform`, `ddim`) and aliases
    /// ("SGMUniform"), diffusers' spacing names.
    pub fn aliases(self) -> &'static [&'static str] {
        match self {
            ScheduleKind::Automatic => &["automatic", "auto"],
            ScheduleKind::SgmUniform => &["SGMUniform"],
            ScheduleKind::DdimUniform => &["ddim_uniform", "DDIM uniform"],
            ScheduleKind::KlOptimal => &["kl_optimal"],
            ScheduleKind::AlignYourSteps => &["align_your_steps", "AYS"],
            _ => &[],
        }
    }

    /// Parses an A1111 label or internal name, a ComfyUI name or an alias, ignoring case.
    pub fn from_name(name: &str) -> Option<Self> {
        let name = name.trim();
        Self::ALL.iter().copied().find(|k| {
            k.name().eq_ignore_ascii_case(name)
                || k.comfy_name().is_some_and(|c| c.eq_ignore_ascii_case(name))
                || k.aliases().iter().any(|a| a.eq_ignore_ascii_case(name))
        })
    }
}

/// The ways `name` reads as "<something> <schedule label>" (A1111's names before 1.9 fused the
/// schedule into the sampler's: "DPM++ 2M Karras"), each as the part before the label (in lower
/// case) and the schedule, in [`ScheduleKind::ALL`]'s order. Automatic is never a suffix.
pub fn fused_schedules(name: &str) -> impl Iterator<Item = (String, ScheduleKind)> + '_ {
    let lower = name.trim().to_ascii_lowercase();
    ScheduleKind::ALL
        .iter()
        .copied()
        .filter(|k| *k != ScheduleKind::Automatic)
        .filter_map(move |k| {
            let base = lower.strip_suffix(&k.name().to_ascii_lowercase())?;
            Some((base.strip_suffix(' ')?.to_owned(), k))
        })
}

/// [`ScheduleKind::from_name`], or [`EngineError::InvalidRequest`] listing the valid names.
pub fn parse_schedule(name: &str) -> Result<ScheduleKind> {
    ScheduleKind::from_name(name).ok_or_else(|| {
        let names: Vec<&str> = ScheduleKind::ALL.iter().map(|k| k.name()).collect();
        EngineError::InvalidRequest(format!(
            "unknown schedule '{}'; choose one of: {}",
            name.trim(),
            names.join(", ")
        ))
    })
}

/// The discrete training schedule of a model: `alphas_cumprod[t]` for t in `0..num_train_timesteps`
/// and the matching sigmas, `sigma_t = sqrt((1 - alphas_cumprod[t]) / alphas_cumprod[t])`.
#[derive(Debug, Clone)]
pub struct NoiseSchedule {
    alphas_cumprod: Vec<f64>,
    /// Ascending in t; k-diffusion's `DiscreteSchedule.sigmas`.
    sigmas: Vec<f64>,
    log_sigmas: Vec<f64>,
    spacing: TimestepSpacing,
    steps_offset: usize,
    /// alphas_cumprod of the step "after" t = 0 (diffusers `final_alpha_cumprod`).
    final_alpha_cumprod: f64,
    /// Whether the model is an SDXL one, which has its own Align Your Steps table.
    sdxl: bool,
}

impl NoiseSchedule {
    /// The schedule described by a diffusers `scheduler_config.json`.
    pub fn from_config(config: &SchedulerConfig) -> Result<Self> {
        let bad = |message: String| EngineError::Config {
            path: "scheduler/scheduler_config.json".into(),
            message,
        };
        let betas = match &config.trained_betas {
            Some(b) => b.iter().map(|&b| b as f32).collect(),
            None => betas(
                config.beta_schedule,
                config.beta_start,
                config.beta_end,
                config.num_train_timesteps,
            ),
        };
        if betas.len() < 2 || betas.iter().any(|b| !(*b > 0.0 && *b < 1.0)) {
            return Err(bad(format!(
                "the training schedule needs at least 2 betas, each in (0, 1); got {} betas",
                betas.len()
            )));
        }
        let mut schedule = if config.rescale_betas_zero_snr {
            Self::zero_terminal_snr(&betas)
        } else {
            Self::from_betas(&betas)
        };
        schedule.spacing = config.timestep_spacing;
        schedule.steps_offset = config.steps_offset;
        if config.set_alpha_to_one {
            schedule.final_alpha_cumprod = 1.0;
        }
        Ok(schedule)
    }

    /// The schedule of float32 betas, with diffusers' defaults for the DDIM timestep options
    /// ("leading" spacing, no offset, final alpha = alphas_cumprod[0]).
    pub fn from_betas(betas: &[f32]) -> Self {
        // torch.cumprod on the CPU accumulates float32 in double and stores each prefix as f32.
        let mut acc = 1.0f64;
        let alphas_cumprod: Vec<f64> = betas
            .iter()
            .map(|&b| {
                acc *= f64::from(1.0f32 - b);
                f64::from(acc as f32)
            })
            .collect();
        let sigmas: Vec<f64> = alphas_cumprod
            .iter()
            .map(|&a| sigma_from_alpha(a))
            .collect();
        let log_sigmas = sigmas.iter().map(|s| s.ln()).collect();
        Self {
            final_alpha_cumprod: alphas_cumprod[0],
            alphas_cumprod,
            sigmas,
            log_sigmas,
            spacing: TimestepSpacing::Leading,
            steps_offset: 0,
            sdxl: false,
        }
    }

    /// This schedule for an SDXL model (`true`), whose Align Your Steps sigmas differ from
    /// SD 1.x/2.x's; the training schedule itself is the same.
    pub fn for_sdxl(mut self, sdxl: bool) -> Self {
        self.sdxl = sdxl;
        self
    }

    /// `betas` rescaled so the last step is pure noise ("zero terminal SNR", Lin et al. 2023,
    /// "Common Diffusion Noise Schedules and Sample Steps are Flawed", algorithm 1: shift and
    /// scale `sqrt(alphas_cumprod)` to end at 0 and keep its start), as models trained so ask
    /// (NoobAI-XL v-pred and other "ztsnr" checkpoints, `rescale_betas_zero_snr` configs). The
    /// last `alphas_cumprod` becomes 2^-24 instead of 0, as diffusers sets it, so sampling
    /// starts from a finite sigma (4096) rather than an infinite one. In f32 like diffusers.
    fn zero_terminal_snr(betas: &[f32]) -> Self {
        // torch's f32 cumprod, as in `from_betas`.
        let mut acc = 1.0f64;
        let sqrt_bar: Vec<f32> = betas
            .iter()
            .map(|&b| {
                acc *= f64::from(1.0f32 - b);
                (acc as f32).sqrt()
            })
            .collect();
        let (first, last) = (sqrt_bar[0], sqrt_bar[sqrt_bar.len() - 1]);
        let scale = first / (first - last);
        let bar: Vec<f32> = sqrt_bar
            .iter()
            .map(|&a| ((a - last) * scale).powi(2))
            .collect();
        let rescaled: Vec<f32> = std::iter::once(1.0 - bar[0])
            .chain(bar.windows(2).map(|w| 1.0 - w[1] / w[0]))
            .collect();
        let mut schedule = Self::from_betas(&rescaled);
        let n = schedule.alphas_cumprod.len();
        schedule.alphas_cumprod[n - 1] = 2f64.powi(-24);
        schedule.sigmas[n - 1] = sigma_from_alpha(schedule.alphas_cumprod[n - 1]);
        schedule.log_sigmas[n - 1] = schedule.sigmas[n - 1].ln();
        schedule
    }

    pub fn num_train_timesteps(&self) -> usize {
        self.sigmas.len()
    }

    pub fn alphas_cumprod(&self) -> &[f64] {
        &self.alphas_cumprod
    }

    /// The discrete sigmas, ascending in t (index = training timestep).
    pub fn train_sigmas(&self) -> &[f64] {
        &self.sigmas
    }

    pub fn sigma_min(&self) -> f64 {
        self.sigmas[0]
    }

    pub fn sigma_max(&self) -> f64 {
        self.sigmas[self.sigmas.len() - 1]
    }

    /// Continuous timestep of `sigma`: linear interpolation of log sigma between the two
    /// neighbouring training sigmas, clamped to [0, N-1] (k-diffusion
    /// `DiscreteSchedule.sigma_to_t`, quantize=False). A training sigma maps to its exact integer t.
    pub fn sigma_to_t(&self, sigma: f64) -> f64 {
        let log_sigma = sigma.ln();
        let n = self.log_sigmas.len();
        // Last index whose log sigma is <= ours (0 when none is), at most N-2 so that there is a
        // high neighbour.
        let low = self
            .log_sigmas
            .partition_point(|&l| l <= log_sigma)
            .saturating_sub(1)
            .min(n - 2);
        let (lo, hi) = (self.log_sigmas[low], self.log_sigmas[low + 1]);
        let w = ((lo - log_sigma) / (lo - hi)).clamp(0.0, 1.0);
        (1.0 - w) * low as f64 + w * (low + 1) as f64
    }

    /// Sigma at continuous timestep `t` in [0, N-1], interpolated in log sigma (k-diffusion
    /// `DiscreteSchedule.t_to_sigma`).
    pub fn t_to_sigma(&self, t: f64) -> f64 {
        let t = t.clamp(0.0, (self.log_sigmas.len() - 1) as f64);
        let (low, high) = (t.floor() as usize, t.ceil() as usize);
        let w = t - t.floor();
        ((1.0 - w) * self.log_sigmas[low] + w * self.log_sigmas[high]).exp()
    }

    /// The sigmas of `kind` for `steps` steps, descending, ending at 0: `steps + 1` values, except
    /// that [`ScheduleKind::DdimUniform`] may give more steps, as A1111 and ComfyUI do, and
    /// [`ScheduleKind::KlOptimal`] ends at sigma_min, as A1111's does.
    /// [`ScheduleKind::Automatic`] means [`ScheduleKind::Uniform`] here; samplers resolve it first
    /// (`Sampler::sigmas`).
    pub fn sigmas(&self, kind: ScheduleKind, steps: usize) -> Vec<f64> {
        let steps = steps.max(1);
        let mut sigmas = match kind {
            ScheduleKind::Automatic | ScheduleKind::Uniform | ScheduleKind::Normal => {
                // Normal is linspace(t(sigma_max), t(sigma_min), n) = linspace(N-1, 0, n): the
                // training sigmas' ends map to their exact timesteps.
                return self.uniform_sigmas(steps);
            }
            ScheduleKind::Karras => {
                return karras_sigmas(steps, self.sigma_min(), self.sigma_max(), 7.0)
            }
            ScheduleKind::Exponential => {
                return exponential_sigmas(steps, self.sigma_min(), self.sigma_max())
            }
            ScheduleKind::Polyexponential => {
                let (lo, hi) = (self.sigma_min().ln(), self.sigma_max().ln());
                linspace(1.0, 0.0, steps)
                    .into_iter()
                    .map(|ramp| (ramp * (hi - lo) + lo).exp())
                    .collect()
            }
            ScheduleKind::KlOptimal => {
                let (lo, hi) = (self.sigma_min().atan(), self.sigma_max().atan());
                let n = steps as f64;
                return (0..=steps)
                    .map(|i| {
                        let f = i as f64 / n;
                        (f * lo + (1.0 - f) * hi).tan()
                    })
                    .collect();
            }
            ScheduleKind::AlignYourSteps => {
                let table = if self.sdxl { &AYS_SDXL } else { &AYS_SD };
                log_linear_resample(table, steps)
            }
            ScheduleKind::Beta => {
                let (lo, hi) = (self.sigma_min(), self.sigma_max());
                linspace(0.0, 1.0, steps)
                    .into_iter()
                    .map(|x| lo + beta_quantile(1.0 - x, BETA_ALPHA, BETA_BETA) * (hi - lo))
                    .collect()
            }
            ScheduleKind::SgmUniform => {
                let t_max = (self.num_train_timesteps() - 1) as f64;
                let mut t = linspace(t_max, 0.0, steps + 1);
                t.pop();
                t.into_iter()
                    .map(|t| self.t_to_sigma(t))
                    .collect::<Vec<_>>()
            }
            ScheduleKind::Simple => {
                let n = self.num_train_timesteps();
                let stride = n as f64 / steps as f64;
                (0..steps)
                    // Python's int() truncates; x * stride < n, so the index stays in range.
                    .map(|x| self.sigmas[n - 1 - (x as f64 * stride) as usize])
                    .collect()
            }
            ScheduleKind::DdimUniform => {
                let n = self.num_train_timesteps();
                let stride = (n / steps).max(1);
                let mut s: Vec<f64> = (1..n).step_by(stride).map(|t| self.sigmas[t]).collect();
                s.reverse();
                s
            }
            ScheduleKind::Leading => self.spaced_sigmas(TimestepSpacing::Leading, steps),
            ScheduleKind::Trailing => self.spaced_sigmas(TimestepSpacing::Trailing, steps),
        };
        sigmas.push(0.0);
        sigmas
    }

    /// The training sigmas at diffusers' inference timesteps for `spacing` (no final 0).
    fn spaced_sigmas(&self, spacing: TimestepSpacing, steps: usize) -> Vec<f64> {
        self.timesteps_with(spacing, steps)
            .into_iter()
            .map(|t| self.sigmas[t])
            .collect()
    }

    /// k-diffusion `get_sigmas(n)`: `t = linspace(N-1, 0, n)`, `t_to_sigma`, append 0.
    fn uniform_sigmas(&self, steps: usize) -> Vec<f64> {
        let t_max = (self.num_train_timesteps() - 1) as f64;
        let mut sigmas: Vec<f64> = linspace(t_max, 0.0, steps)
            .into_iter()
            .map(|t| self.t_to_sigma(t))
            .collect();
        sigmas.push(0.0);
        sigmas
    }

    /// diffusers' inference timesteps for `steps` steps with the config's `timestep_spacing` and
    /// `steps_offset`, descending (`DDIMScheduler.set_timesteps`).
    pub fn discrete_timesteps(&self, steps: usize) -> Vec<usize> {
        self.timesteps_with(self.spacing, steps)
    }

    /// diffusers' inference timesteps for `spacing` (with this config's `steps_offset` for
    /// "leading"), descending.
    pub fn timesteps_with(&self, spacing: TimestepSpacing, steps: usize) -> Vec<usize> {
        let n = self.num_train_timesteps();
        let steps = steps.clamp(1, n);
        let mut t: Vec<usize> = match spacing {
            TimestepSpacing::Leading => {
                let ratio = n / steps;
                (0..steps).map(|i| i * ratio + self.steps_offset).collect()
            }
            TimestepSpacing::Linspace => linspace(0.0, (n - 1) as f64, steps)
                .into_iter()
                .map(|x| x.round_ties_even() as usize)
                .collect(),
            TimestepSpacing::Trailing => {
                // np.round(np.arange(N, 0, -N / steps)) - 1, ascending here.
                let ratio = n as f64 / steps as f64;
                (0..steps)
                    .map(|i| (n as f64 - i as f64 * ratio).round_ties_even() as usize - 1)
                    .rev()
                    .collect()
            }
        };
        t.reverse();
        for v in &mut t {
            *v = (*v).min(n - 1);
        }
        t
    }

    /// The sigmas diffusers' DDIM (eta 0) walks, as sigmas: one per inference timestep, then the
    /// sigma of `final_alpha_cumprod` (not 0 unless `set_alpha_to_one`). DDIM with eta 0 is Euler
    /// on these with `x_k = x_diffusers * sqrt(1 + sigma^2)`.
    pub fn ddim_sigmas(&self, steps: usize) -> Vec<f64> {
        let mut sigmas: Vec<f64> = self
            .discrete_timesteps(steps)
            .into_iter()
            .map(|t| self.sigmas[t])
            .collect();
        sigmas.push(sigma_from_alpha(self.final_alpha_cumprod));
        sigmas
    }
}

/// `sqrt((1 - a) / a)`: the sigma whose noise level matches alphas_cumprod `a`.
fn sigma_from_alpha(a: f64) -> f64 {
    ((1.0 - a) / a).sqrt()
}

/// Training betas as diffusers makes them: float32 `torch.linspace`, squared in float32 for
/// "scaled_linear"; the cosine schedule in f64 rounded to f32.
fn betas(kind: BetaSchedule, start: f64, end: f64, n: usize) -> Vec<f32> {
    match kind {
        BetaSchedule::Linear => linspace_f32(start as f32, end as f32, n),
        BetaSchedule::ScaledLinear => linspace_f32(start.sqrt() as f32, end.sqrt() as f32, n)
            .into_iter()
            .map(|b| b * b)
            .collect(),
        BetaSchedule::SquaredcosCapV2 => {
            // diffusers betas_for_alpha_bar(n, max_beta=0.999, "cosine").
            let alpha_bar = |t: f64| {
                ((t + 0.008) / 1.008 * std::f64::consts::PI / 2.0)
                    .cos()
                    .powi(2)
            };
            (0..n)
                .map(|i| {
                    let (t1, t2) = (i as f64 / n as f64, (i + 1) as f64 / n as f64);
                    (1.0 - alpha_bar(t2) / alpha_bar(t1)).min(0.999) as f32
                })
                .collect()
        }
    }
}

/// torch's CPU float32 `linspace` (scalar form): `start + step * i` for the first half,
/// `end - step * (n - 1 - i)` for the second, `step = (end - start) / (n - 1)` in float32.
/// torch's vectorised loop rounds some values differently by one ulp; at the betas' size that
/// moves alphas_cumprod by far less than its float32 rounding.
fn linspace_f32(start: f32, end: f32, n: usize) -> Vec<f32> {
    if n == 1 {
        return vec![start];
    }
    let step = (end - start) / (n - 1) as f32;
    let half = n / 2;
    (0..n)
        .map(|i| {
            if i < half {
                start + step * i as f32
            } else {
                end - step * (n - 1 - i) as f32
            }
        })
        .collect()
}

/// `n` evenly spaced values from `start` to `end` inclusive, in f64 (`[start]` when n is 1).
fn linspace(start: f64, end: f64, n: usize) -> Vec<f64> {
    match n {
        0 => Vec::new(),
        1 => vec![start],
        _ => (0..n)
            .map(|i| start + (end - start) * i as f64 / (n - 1) as f64)
            .collect(),
    }
}

/// NVIDIA's published 10-step Align Your Steps sigmas (11 values, descending) for SD 1.5, which
/// A1111 uses for SD 1.x and 2.x.
const AYS_SD: [f64; 11] = [
    14.615, 6.475, 3.861, 2.697, 1.886, 1.396, 0.963, 0.652, 0.399, 0.152, 0.029,
];
/// The same for SDXL.
const AYS_SDXL: [f64; 11] = [
    14.615, 6.315, 3.771, 2.181, 1.342, 0.862, 0.555, 0.380, 0.234, 0.113, 0.029,
];

/// `n` values spread over the descending `table` by straight-line interpolation of its logs at
/// `n` evenly spaced positions from its first value to its last (numpy's `interp`, as A1111's
/// `loglinear_interp`). `n` equal to the table's length gives the table; 1 gives its last value.
fn log_linear_resample(table: &[f64], n: usize) -> Vec<f64> {
    if n == table.len() {
        return table.to_vec();
    }
    // A1111 interpolates the ascending (reversed) logs from 0 to 1 and reverses the result.
    let ys: Vec<f64> = table.iter().rev().map(|v| v.ln()).collect();
    let last = (ys.len() - 1) as f64;
    let mut out: Vec<f64> = linspace(0.0, 1.0, n)
        .into_iter()
        .map(|x| {
            let pos = x * last;
            let i = (pos.floor() as usize).min(ys.len() - 2);
            let f = pos - i as f64;
            (ys[i] + f * (ys[i + 1] - ys[i])).exp()
        })
        .collect();
    out.reverse();
    out
}

/// A1111's default shape of the Beta schedule (its `beta_dist_alpha` and `beta_dist_beta`).
const BETA_ALPHA: f64 = 0.6;
const BETA_BETA: f64 = 0.6;

/// The quantile function (inverse CDF) of the Beta(a, b) distribution at `p` in [0, 1], as
/// scipy's `stats.beta.ppf`, found by bisection on [`regularized_beta`] to full f64 precision.
/// Written here because none of the crates we use has it and a statistics crate for one
/// function would weigh more than these few lines.
fn beta_quantile(p: f64, a: f64, b: f64) -> f64 {
    if p <= 0.0 {
        return 0.0;
    }
    if p >= 1.0 {
        return 1.0;
    }
    let (mut lo, mut hi) = (0.0f64, 1.0f64);
    // 60 halvings take [0, 1] below f64's resolution near 1; the CDF is increasing.
    for _ in 0..64 {
        let mid = 0.5 * (lo + hi);
        if regularized_beta(mid, a, b) < p {
            lo = mid;
        } else {
            hi = mid;
        }
    }
    0.5 * (lo + hi)
}

/// The regularized incomplete beta function I_x(a, b), the CDF of Beta(a, b) at `x`: the
/// continued fraction of Abramowitz & Stegun 26.5.8, evaluated by the modified Lentz method, on
/// the side of the symmetry `I_x(a, b) = 1 - I_{1-x}(b, a)` where it converges fast.
fn regularized_beta(x: f64, a: f64, b: f64) -> f64 {
    if x <= 0.0 {
        return 0.0;
    }
    if x >= 1.0 {
        return 1.0;
    }
    if x > (a + 1.0) / (a + b + 2.0) {
        return 1.0 - regularized_beta(1.0 - x, b, a);
    }
    let ln_front = a * x.ln() + b * (1.0 - x).ln() - ln_beta(a, b);
    ln_front.exp() * beta_fraction(x, a, b) / a
}

/// The continued fraction `1 / (1 + d1 / (1 + d2 / (1 + ...)))` of I_x(a, b), with
/// `d(2m+1) = -(a+m)(a+b+m) x / ((a+2m)(a+2m+1))` and `d(2m) = m(b-m) x / ((a+2m-1)(a+2m))`.
fn beta_fraction(x: f64, a: f64, b: f64) -> f64 {
    const TINY: f64 = 1e-300;
    let guard = |v: f64| if v.abs() < TINY { TINY } else { v };
    let mut c = 1.0;
    let mut d = 1.0 / guard(1.0 - (a + b) * x / (a + 1.0));
    let mut f = d;
    for m in 1..500 {
        let m = m as f64;
        for num in [
            m * (b - m) * x / ((a + 2.0 * m - 1.0) * (a + 2.0 * m)),
            -(a + m) * (a + b + m) * x / ((a + 2.0 * m) * (a + 2.0 * m + 1.0)),
        ] {
            d = 1.0 / guard(1.0 + num * d);
            c = guard(1.0 + num / c);
            f *= c * d;
        }
        if (c * d - 1.0).abs() < 1e-16 {
            break;
        }
    }
    f
}

/// ln B(a, b) = ln Γ(a) + ln Γ(b) - ln Γ(a + b).
fn ln_beta(a: f64, b: f64) -> f64 {
    ln_gamma(a) + ln_gamma(b) - ln_gamma(a + b)
}

/// ln Γ(x) for x > 0 by the Lanczos approximation (g = 7, nine coefficients: relative error
/// about 1e-15), with the reflection formula below 0.5.
fn ln_gamma(x: f64) -> f64 {
    const G: f64 = 7.0;
    const COEF: [f64; 9] = [
        0.999_999_999_999_809_9,
        676.520_368_121_885_1,
        -1_259.139_216_722_402_8,
        771.323_428_777_653_1,
        -176.615_029_162_140_6,
        12.507_343_278_686_905,
        -0.138_571_095_265_720_12,
        9.984_369_578_019_572e-6,
        1.505_632_735_149_311_6e-7,
    ];
    if x < 0.5 {
        // Γ(x) Γ(1 - x) = π / sin(πx).
        let pi = std::f64::consts::PI;
        return (pi / (pi * x).sin()).ln() - ln_gamma(1.0 - x);
    }
    let x = x - 1.0;
    let t = x + G + 0.5;
    let sum = COEF[1..]
        .iter()
        .enumerate()
        .fold(COEF[0], |acc, (i, c)| acc + c / (x + i as f64 + 1.0));
    0.5 * (2.0 * std::f64::consts::PI).ln() + (x + 0.5) * t.ln() - t + sum.ln()
}

/// k-diffusion `get_sigmas_exponential`: evenly spaced in log sigma from max to min, then 0.
pub fn exponential_sigmas(steps: usize, sigma_min: f64, sigma_max: f64) -> Vec<f64> {
    let mut sigmas: Vec<f64> = linspace(sigma_max.ln(), sigma_min.ln(), steps)
        .into_iter()
        .map(f64::exp)
        .collect();
    sigmas.push(0.0);
    sigmas
}

/// Karras et al. 2022, eq. 5: `(max^(1/rho) + i/(n-1) (min^(1/rho) - max^(1/rho)))^rho`, then 0.
pub fn karras_sigmas(steps: usize, sigma_min: f64, sigma_max: f64, rho: f64) -> Vec<f64> {
    let (min_inv, max_inv) = (sigma_min.powf(1.0 / rho), sigma_max.powf(1.0 / rho));
    let mut sigmas: Vec<f64> = linspace(0.0, 1.0, steps)
        .into_iter()
        .map(|ramp| (max_inv + ramp * (min_inv - max_inv)).powf(rho))
        .collect();
    sigmas.push(0.0);
    sigmas
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sd() -> NoiseSchedule {
        let config: SchedulerConfig = serde_json::from_str(
            r#"{"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
                "steps_offset": 1, "set_alpha_to_one": false}"#,
        )
        .unwrap();
        NoiseSchedule::from_config(&config).unwrap()
    }

    /// diffusers' `rescale_betas_zero_snr` schedule (`tests/fixtures/make_zsnr_refs.py`):
    /// `alphas_cumprod` within 1e-5 relative (measured 3.8e-6: f32 rounding, largest near the end
    /// where `sqrt(alphas_cumprod)` minus its last value cancels), 10 trailing sigmas within 1e-5.
    #[test]
    fn zero_terminal_snr_matches_diffusers() {
        const TOL: f64 = 1e-5;
        let refs: serde_json::Value = serde_json::from_slice(
            &std::fs::read(
                std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
                    .join("../../tests/fixtures/refs/zsnr.json"),
            )
            .unwrap(),
        )
        .unwrap();
        let floats = |key: &str| -> Vec<f64> {
            refs[key]
                .as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_f64().unwrap())
                .collect()
        };
        let config: SchedulerConfig = serde_json::from_str(
            r#"{"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
                "rescale_betas_zero_snr": true, "timestep_spacing": "trailing",
                "prediction_type": "v_prediction"}"#,
        )
        .unwrap();
        let s = NoiseSchedule::from_config(&config).unwrap();
        let want = floats("alphas_cumprod");
        assert_eq!(s.alphas_cumprod().len(), want.len());
        let worst = s
            .alphas_cumprod()
            .iter()
            .zip(&want)
            .map(|(got, want)| (got - want).abs() / want)
            .fold(0.0, f64::max);
        eprintln!("worst relative alphas_cumprod difference: {worst:e}");
        assert!(worst <= TOL, "{worst}");
        let want = floats("trailing_10");
        let got = s.sigmas(ScheduleKind::Trailing, 10);
        assert_eq!(got.len(), want.len());
        for (got, want) in got.iter().zip(&want) {
            assert!(
                (got - want).abs() <= 1e-5 * want.max(1.0),
                "{got} vs {want}"
            );
        }
        // Every schedule starts from the finite terminal sigma, 4096.
        assert!((s.sigma_max() - 4096.0).abs() < 1e-3, "{}", s.sigma_max());
        assert!((s.sigmas(ScheduleKind::Karras, 10)[0] - 4096.0).abs() < 1e-3);
    }

    #[test]
    fn sd_sigma_range_is_the_well_known_one() {
        // SD1.x: sigma_min 0.0292, sigma_max 14.6146 (A1111 and ComfyUI print these).
        let s = sd();
        assert!(
            (s.sigma_min() - 0.029_167_5).abs() < 1e-6,
            "{}",
            s.sigma_min()
        );
        assert!(
            (s.sigma_max() - 14.614_641_9).abs() < 1e-5,
            "{}",
            s.sigma_max()
        );
    }

    #[test]
    fn sigma_to_t_inverts_t_to_sigma() {
        let s = sd();
        for t in [0.0, 0.5, 1.0, 250.25, 998.9, 999.0] {
            assert!((s.sigma_to_t(s.t_to_sigma(t)) - t).abs() < 1e-9, "t {t}");
        }
        // Training sigmas map to their exact integer timestep (DDIM relies on it).
        for t in [0usize, 1, 251, 999] {
            assert_eq!(s.sigma_to_t(s.train_sigmas()[t]), t as f64);
        }
        // Out of range clamps, as in k-diffusion.
        assert_eq!(s.sigma_to_t(1e-6), 0.0);
        assert_eq!(s.sigma_to_t(1e6), 999.0);
    }

    #[test]
    fn leading_timesteps_match_diffusers() {
        // DDIMScheduler(steps_offset=1).set_timesteps(4).timesteps == [751, 501, 251, 1]
        assert_eq!(sd().discrete_timesteps(4), vec![751, 501, 251, 1]);
        assert_eq!(sd().discrete_timesteps(3), vec![667, 334, 1]);
        let ddim = sd().ddim_sigmas(4);
        assert_eq!(ddim.len(), 5);
        assert_eq!(ddim[4], sd().sigma_min());
    }

    #[test]
    fn schedules_end_at_zero_and_descend() {
        let s = sd();
        for &kind in ScheduleKind::ALL {
            for steps in [1, 2, 3, 7, 20, 150] {
                let sig = s.sigmas(kind, steps);
                // DDIM uniform takes every (1000 / steps)-th timestep from 1, which is more steps
                // than asked when steps does not divide 1000 (167 for 150), as A1111 and
                // ComfyUI do; every other schedule gives exactly steps.
                if kind == ScheduleKind::DdimUniform {
                    assert_eq!(sig.len(), 999usize.div_ceil(1000 / steps) + 1, "{steps}");
                } else {
                    assert_eq!(sig.len(), steps + 1, "{kind:?} {steps}");
                }
                // A1111's KL Optimal stops at sigma_min.
                let end = if kind == ScheduleKind::KlOptimal {
                    s.sigma_min()
                } else {
                    0.0
                };
                assert!(
                    (*sig.last().unwrap() - end).abs() < 1e-12,
                    "{kind:?} {sig:?}"
                );
                assert!(sig.windows(2).all(|w| w[0] > w[1]), "{kind:?} {sig:?}");
                // Align Your Steps starts at its table's 14.615, a hair above SD's sigma_max.
                let top = if kind == ScheduleKind::AlignYourSteps {
                    14.615
                } else {
                    s.sigma_max()
                };
                assert!(sig[0] <= top * (1.0 + 1e-12), "{kind:?}");
            }
        }
    }

    #[test]
    fn names_round_trip_and_errors_list_the_choices() {
        for &k in ScheduleKind::ALL {
            assert_eq!(ScheduleKind::from_name(k.name()), Some(k));
            assert_eq!(parse_schedule(&k.name().to_lowercase()).unwrap(), k);
            if let Some(c) = k.comfy_name() {
                assert_eq!(ScheduleKind::from_name(c), Some(k));
            }
        }
        // A1111's label and internal name, ComfyUI's name.
        assert_eq!(ScheduleKind::SgmUniform.name(), "SGM Uniform");
        assert_eq!(
            parse_schedule("SGMUniform").unwrap(),
            ScheduleKind::SgmUniform
        );
        assert_eq!(
            parse_schedule("sgm_uniform").unwrap(),
            ScheduleKind::SgmUniform
        );
        assert_eq!(
            parse_schedule("ddim_uniform").unwrap(),
            ScheduleKind::DdimUniform
        );
        assert_eq!(parse_schedule(" KARRAS ").unwrap(), ScheduleKind::Karras);
        assert_eq!(ScheduleKind::default(), ScheduleKind::Automatic);
        assert_eq!(
            parse_schedule("align_your_steps").unwrap(),
            ScheduleKind::AlignYourSteps
        );
        assert_eq!(
            parse_schedule("kl_optimal").unwrap(),
            ScheduleKind::KlOptimal
        );
        match parse_schedule("beta57") {
            Err(EngineError::InvalidRequest(m)) => {
                assert!(
                    m.contains("Automatic, Uniform, Karras, Exponential, Polyexponential"),
                    "{m}"
                )
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn normal_is_uniform_and_simple_counts_from_the_top() {
        let s = sd();
        assert_eq!(
            s.sigmas(ScheduleKind::Normal, 9),
            s.sigmas(ScheduleKind::Uniform, 9)
        );
        let simple = s.sigmas(ScheduleKind::Simple, 4);
        let t = s.train_sigmas();
        assert_eq!(simple, vec![t[999], t[749], t[499], t[249], 0.0]);
        let ddim = s.sigmas(ScheduleKind::DdimUniform, 4);
        assert_eq!(ddim, vec![t[751], t[501], t[251], t[1], 0.0]);
    }
}
