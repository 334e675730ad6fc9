//! Schedules, the denoiser and the samplers against k-diffusion and diffusers, from
//! tests/fixtures/refs/sampling.safetensors (made by tests/fixtures/make_sampling_refs.py).
//! The network is a closed-form stand-in, so these tests check the sampling arithmetic alone;
//! tests/pipeline.rs runs the real tiny UNet.

use std::collections::HashMap;
use std::path::PathBuf;

use candle_core::{DType, Device, Tensor};
use ld_engine::config::{PredictionType, SchedulerConfig};
use ld_engine::denoiser::{Conditioning, Denoiser};
use ld_engine::rng::{NoiseSource, TorchRng};
use ld_engine::sampler::{to_diffusers_latents, Control, SampleContext, SamplerKind, StepInfo};
use ld_engine::schedule::{NoiseSchedule, ScheduleKind};
use ld_engine::Result;

fn refs() -> HashMap<String, Tensor> {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures/refs/sampling.safetensors");
    candle_core::safetensors::load(&path, &Device::Cpu).expect("sampling.safetensors loads")
}

fn f64s(t: &Tensor) -> Vec<f64> {
    t.to_dtype(DType::F64)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap()
}

fn sd_config() -> SchedulerConfig {
    serde_json::from_str(
        r#"{"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
            "clip_sample": false, "set_alpha_to_one": false, "steps_offset": 1,
            "num_train_timesteps": 1000}"#,
    )
    .unwrap()
}

/// Largest |got - want| / |want| over nonzero references; zeros must match exactly.
fn max_rel(got: &[f64], want: &[f64]) -> f64 {
    assert_eq!(got.len(), want.len());
    got.iter()
        .zip(want)
        .map(|(g, w)| {
            if *w == 0.0 {
                assert_eq!(*g, 0.0);
                0.0
            } else {
                ((g - w) / w).abs()
            }
        })
        .fold(0.0, f64::max)
}

#[test]
fn training_schedule_matches_diffusers_and_k_diffusion() {
    let r = refs();
    let s = NoiseSchedule::from_config(&sd_config()).unwrap();
    // alphas_cumprod: built like diffusers in float32; torch's vectorised linspace rounds a few
    // betas differently by one ulp, which may move a stored alpha by one float32 ulp (6e-8).
    let ac = max_rel(s.alphas_cumprod(), &f64s(&r["sd/alphas_cumprod"]));
    assert!(ac <= 2e-7, "alphas_cumprod rel err {ac:e}");
    // sigmas: k-diffusion computes them in float32; ours are f64 from the same alphas.
    let sig = max_rel(s.train_sigmas(), &f64s(&r["sd/sigmas"]));
    eprintln!("alphas_cumprod max rel err {ac:e}, sigmas {sig:e}");
    assert!(sig <= 1e-6, "sigmas rel err {sig:e}");

    let linear: SchedulerConfig = serde_json::from_str(
        r#"{"beta_schedule": "linear", "beta_start": 0.0001, "beta_end": 0.02}"#,
    )
    .unwrap();
    let lin = NoiseSchedule::from_config(&linear).unwrap();
    let e = max_rel(lin.alphas_cumprod(), &f64s(&r["linear/alphas_cumprod"]));
    assert!(e <= 1e-6, "linear alphas_cumprod rel err {e:e}");
    eprintln!("linear alphas_cumprod max rel err {e:e}");
}

#[test]
fn sigma_sequences_match_k_diffusion() {
    // Tolerance 1e-6 relative: k-diffusion interpolates and exponentiates in float32.
    let r = refs();
    let s = NoiseSchedule::from_config(&sd_config()).unwrap();
    for n in [1usize, 2, 4, 10, 20, 50] {
        let u = max_rel(
            &s.sigmas(ScheduleKind::Uniform, n),
            &f64s(&r[&format!("sd/uniform_{n}")]),
        );
        assert!(u <= 1e-6, "uniform {n}: {u:e}");
        assert_eq!(
            s.sigmas(ScheduleKind::Automatic, n),
            s.sigmas(ScheduleKind::Uniform, n)
        );
        let k = max_rel(
            &s.sigmas(ScheduleKind::Karras, n),
            &f64s(&r[&format!("sd/karras_{n}")]),
        );
        assert!(k <= 1e-6, "karras {n}: {k:e}");
        eprintln!("{n} steps: uniform max rel err {u:e}, karras {k:e}");
        let want: Vec<i64> = r[&format!("sd/ddim_timesteps_{n}")].to_vec1().unwrap();
        let got: Vec<i64> = s
            .discrete_timesteps(n)
            .into_iter()
            .map(|t| t as i64)
            .collect();
        assert_eq!(got, want, "ddim timesteps {n}");
    }
}

#[test]
fn sigma_to_t_matches_k_diffusion() {
    // Absolute 1e-4 in t: float32 log sigmas differ from ours by ~1e-7, and the log-sigma step
    // between neighbouring timesteps is ~1e-3..3e-2.
    let r = refs();
    let s = NoiseSchedule::from_config(&sd_config()).unwrap();
    let want = f64s(&r["sd/sigma_to_t_out"]);
    for (sigma, want) in f64s(&r["sd/sigma_to_t_in"]).into_iter().zip(want) {
        let got = s.sigma_to_t(sigma);
        assert!(
            (got - want).abs() <= 1e-4,
            "sigma {sigma}: t {got} vs {want}"
        );
        eprintln!("sigma_to_t({sigma}): abs err {:e}", (got - want).abs());
    }
}

/// The stand-in network of make_sampling_refs.py: 0.9 tanh(0.7 x_in + t/1000 + mean(context_b)).
fn fake(x: &Tensor, t: f64, context: &Tensor) -> Result<Tensor> {
    let b = x.dim(0)?;
    let m = context
        .flatten_from(1)?
        .mean_keepdim(1)?
        .reshape((b, 1, 1, 1))?;
    Ok((x.affine(0.7, t / 1000.0)?.broadcast_add(&m)?.tanh()? * 0.9)?)
}

fn conditioning(cfg: f64) -> Conditioning {
    let dev = Device::Cpu;
    Conditioning {
        cond: Tensor::full(0.4f32, (1, 2, 3), &dev).unwrap(),
        uncond: Some(Tensor::full(-0.3f32, (1, 2, 3), &dev).unwrap()),
        cfg_scale: cfg,
    }
}

struct Run {
    /// x before the first step, then after each step, in the sampler's space.
    states: Vec<Tensor>,
    denoised: Vec<Tensor>,
    sigmas: Vec<f64>,
}

fn run(kind: SamplerKind, prediction: PredictionType, cfg: f64) -> Run {
    let schedule = NoiseSchedule::from_config(&sd_config()).unwrap();
    let model = fake;
    let cond = conditioning(cfg);
    let denoiser = Denoiser::new(&model, &schedule, prediction, &cond, DType::F32).unwrap();
    let sampler = kind.sampler();
    let sigmas = sampler.sigmas(&schedule, ScheduleKind::Automatic, 4);
    let mut rng = TorchRng::new(42);
    let noise = rng.randn_tensor(&[1, 4, 8, 8], &Device::Cpu).unwrap();
    let x = (noise * sampler.initial_noise_scale(&sigmas)).unwrap();
    let mut states = vec![x.clone()];
    let mut denoised = Vec::new();
    let mut observer = |info: &StepInfo<'_>| {
        states.push(info.x.clone());
        denoised.push(info.denoised.clone());
        Control::Continue
    };
    let mut ctx = SampleContext {
        denoiser: &denoiser,
        noise: &mut rng,
        observer: &mut observer,
    };
    let out = sampler.sample(x, &sigmas, &mut ctx).unwrap();
    assert_eq!(f64s(&out), f64s(states.last().unwrap()));
    Run {
        states,
        denoised,
        sigmas,
    }
}

/// max |got - want| / max(1, max |want|): errors relative to the tensor's scale.
fn scaled_err(got: &Tensor, want: &Tensor) -> f64 {
    let g = f64s(got);
    let w = f64s(want);
    assert_eq!(g.len(), w.len());
    let scale = w.iter().fold(1.0f64, |m, v| m.max(v.abs()));
    g.iter()
        .zip(&w)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0, f64::max)
        / scale
}

#[test]
fn euler_matches_k_diffusion_sample_euler() {
    // Tolerance 2e-6 of the tensor's scale: the same float32 operations in a different order
    // (candle multiplies by 1/sigma where torch divides), amplified by CFG 7.5 over four steps.
    let r = refs();
    for (name, prediction) in [
        ("eps", PredictionType::Epsilon),
        ("v", PredictionType::VPrediction),
    ] {
        for (key, cfg) in [("euler", 7.5), ("euler_cfg1", 1.0)] {
            let run = run(SamplerKind::Euler, prediction, cfg);
            let want = &r[&format!("{name}/{key}_latents")];
            assert_eq!(run.states.len(), 5);
            for (i, state) in run.states.iter().enumerate() {
                let e = scaled_err(state, &want.get(i).unwrap());
                assert!(e <= 2e-6, "{name} {key} state {i}: {e:e}");
                eprintln!("{name} {key} state {i}: scaled err {e:e}");
            }
            if cfg != 1.0 {
                let want = &r[&format!("{name}/euler_denoised")];
                for (i, d) in run.denoised.iter().enumerate() {
                    let e = scaled_err(d, &want.get(i).unwrap());
                    assert!(e <= 2e-6, "{name} denoised {i}: {e:e}");
                }
            }
        }
    }
}

#[test]
fn ddim_matches_diffusers_ddim_scheduler() {
    // diffusers works on x / sqrt(1 + sigma^2) with alphas directly; we step in sigma space and
    // convert. Same tolerance and reasons as for Euler.
    let r = refs();
    for (name, prediction) in [
        ("eps", PredictionType::Epsilon),
        ("v", PredictionType::VPrediction),
    ] {
        let run = run(SamplerKind::Ddim, prediction, 7.5);
        assert_ne!(
            *run.sigmas.last().unwrap(),
            0.0,
            "DDIM ends at alphas_cumprod[0]"
        );
        let want = &r[&format!("{name}/ddim_latents")];
        for (i, (state, sigma)) in run.states.iter().zip(&run.sigmas).enumerate() {
            let latents = to_diffusers_latents(state, *sigma).unwrap();
            let e = scaled_err(&latents, &want.get(i).unwrap());
            assert!(e <= 2e-6, "{name} ddim state {i}: {e:e}");
            eprintln!("{name} ddim state {i}: scaled err {e:e}");
        }
    }
}

#[test]
fn initial_noise_is_the_seeded_torch_noise() {
    let r = refs();
    let noise = TorchRng::new(42).randn(&[1, 4, 8, 8]);
    let want: Vec<f32> = r["eps/noise"].flatten_all().unwrap().to_vec1().unwrap();
    assert!(noise
        .iter()
        .zip(&want)
        .all(|(a, b)| a.to_bits() == b.to_bits()));
}
