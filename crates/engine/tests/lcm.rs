//! Full LCMs: UNets with `time_cond_proj_dim` (LCM_Dreamshaper_v7, lcm-sdxl) on the tiny
//! models/tiny/sd1-lcm (float32) and models/tiny/sdxl-lcm (fp16 files run in f32) against
//! diffusers' LatentConsistencyModelPipeline / StableDiffusionXLPipeline with LCMScheduler
//! (tests/fixtures/refs/lcm.safetensors, made by tests/fixtures/make_lcm_refs.py): the guidance
//! embedding, the first noise prediction, every step's latents and the image, with CFG off and the
//! requested scale embedded; the model defaults; the load errors.
//!
//! Tolerances, as tests/pipeline.rs and tests/sdxl.rs: the guidance embedding 1e-5 (the same f32
//! ops as torch; only sin/cos/exp implementations differ, by an ulp or so), the noise prediction
//! 1e-4, latents 2e-4 * max(1, max |ref|), the image 1e-3. A wrong embedding is far outside them:
//! guidance 8 vs 1, or no embedding at all, moves the first prediction by 0.15 to 0.21.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use crate::support::{self, max_abs, max_abs_diff, values};
use candle_core::{DType, Device, Tensor};
use ld_engine::model_defaults::{Distillation, ModelDefaults, ModelFamily};
use ld_engine::pipeline::{to_rgb8, GenerateRequest, LoadOptions, NoObserver, Pipeline};
use ld_engine::rng::{NoiseSource, TorchRng};
use ld_engine::sampler::{to_diffusers_latents, SamplerKind};
use ld_engine::schedule::ScheduleKind;
use ld_engine::unet::UNetConfig;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn tiny(name: &str) -> PathBuf {
    root().join("models/tiny").join(name)
}

fn opts() -> LoadOptions {
    LoadOptions {
        device: support::device(),
        dtype: DType::F32,
        ..Default::default()
    }
}

fn load(name: &str) -> Pipeline {
    Pipeline::load(&tiny(name), &opts()).expect("tiny LCM loads")
}

fn refs() -> HashMap<String, Tensor> {
    let p = root().join("tests/fixtures/refs/lcm.safetensors");
    candle_core::safetensors::load(&p, &Device::Cpu).expect("reference file loads")
}

/// The fixture's run (refs/lcm.json): 4 LCM steps, guidance 8, 64x64, seed 42. The negative
/// prompt is there to show it is ignored: diffusers runs these models without CFG.
fn request() -> GenerateRequest {
    GenerateRequest {
        prompt: "a photo of a cat".into(),
        negative_prompt: "blurry, lowres".into(),
        steps: 4,
        cfg_scale: 8.0,
        width: 64,
        height: 64,
        seed: 42,
        sampler: SamplerKind::Lcm,
        schedule: ScheduleKind::Automatic,
        ..GenerateRequest::default()
    }
}

fn assert_close(what: &str, got: &Tensor, want: &Tensor, tol: f32) {
    let diff = max_abs_diff(got, want);
    eprintln!("{what}: max abs diff {diff:.3e} (tolerance {tol:.1e})");
    assert!(diff <= tol, "{what}: max abs diff {diff} > {tol}");
}

fn latent_tol(want: &Tensor) -> f32 {
    2e-4 * max_abs(want).max(1.0)
}

#[test]
fn guidance_embedding_matches_diffusers() {
    let r = refs();
    for (model, prefix) in [("sd1-lcm", "sd1"), ("sdxl-lcm", "sdxl")] {
        let p = load(model);
        let unet = p.unet();
        assert!(unet.config().guidance_embedded());
        // w = guidance - 1: 7 for the default 8, 0 for "guidance 1".
        let w8 = unet.guidance_embedding(8.0).unwrap().unwrap();
        let w1 = unet.guidance_embedding(1.0).unwrap().unwrap();
        let want = &r[&format!("{prefix}/w_embedding")];
        assert_close(&format!("{prefix} w_embedding"), &w8, want, 1e-5);
        let want1 = &r[&format!("{prefix}/w_embedding_g1")];
        assert_close(&format!("{prefix} w_embedding_g1"), &w1, want1, 1e-6);
        // The embedding of the scale itself (no "- 1") would be far off.
        let wrong = unet.guidance_embedding(9.0).unwrap().unwrap();
        assert!(max_abs_diff(&wrong, want) > 0.1);
    }
    // Regular UNets have none.
    assert!(load_sd1().unet().guidance_embedding(8.0).unwrap().is_none());
}

fn load_sd1() -> Pipeline {
    load("sd1")
}

#[test]
fn first_noise_prediction_matches_diffusers() {
    let p = load("sd1-lcm");
    let r = refs();
    let unet = p.unet();
    let ctx = p
        .text_encoder()
        .encode_prompt("a photo of a cat", 1)
        .unwrap()
        .hidden;
    let sigmas = SamplerKind::Lcm
        .sampler()
        .sigmas(p.schedule(), ScheduleKind::Automatic, 4);
    let ts: Vec<f64> = sigmas[..4]
        .iter()
        .map(|&s| p.schedule().sigma_to_t(s))
        .collect();
    let want_ts = values(&r["sd1/timesteps"]);
    for (t, w) in ts.iter().zip(&want_ts) {
        assert!(
            (t - *w as f64).abs() < 1e-3,
            "timesteps {ts:?} vs {want_ts:?}"
        );
    }
    // LCMScheduler's scale_model_input is the identity: the UNet sees the noise itself.
    let x = &r["sd1/noise"].to_device(&support::device()).unwrap();
    for (g, key) in [
        (Some(8.0), "first_eps"),
        (Some(1.0), "first_eps_g1"),
        (None, "first_eps_no_cond"),
    ] {
        let cond = g.map(|g| unet.guidance_embedding(g).unwrap().unwrap());
        let eps = unet
            .forward_cond(x, ts[0], &ctx, None, cond.as_ref())
            .unwrap();
        assert_close(&format!("sd1 {key}"), &eps, &r[&format!("sd1/{key}")], 1e-4);
    }
    // The references differ enough for the checks to catch a wrong embedding.
    assert!(max_abs_diff(&r["sd1/first_eps"], &r["sd1/first_eps_g1"]) > 0.1);
    assert!(max_abs_diff(&r["sd1/first_eps"], &r["sd1/first_eps_no_cond"]) > 0.1);
}

/// Runs `req` and compares the initial noise, every step's latents (in diffusers' scale) and
/// the image with the references under `prefix`.
fn check_run(p: &Pipeline, prefix: &str, req: &GenerateRequest) {
    let r = refs();
    let noise = TorchRng::new(req.seed).randn(&p.latent_shape(req));
    assert_eq!(noise, values(&r[&format!("{prefix}/noise")]));
    let mut states = Vec::new();
    let latents = p
        .sample_latents(req, &mut NoObserver, &mut |x, sigma| {
            states.push(to_diffusers_latents(x, sigma).unwrap())
        })
        .unwrap();
    let want = &r[&format!("{prefix}/latents")];
    assert_eq!(states.len(), 5);
    for (i, s) in states.iter().enumerate() {
        let w = want.get(i).unwrap();
        assert_close(&format!("{prefix} latents {i}"), s, &w, latent_tol(&w));
    }
    let last = want.get(4).unwrap();
    assert_close(
        &format!("{prefix} final latents"),
        &latents,
        &last,
        latent_tol(&last),
    );
    let image = p.decode(&latents).unwrap();
    assert_close(
        &format!("{prefix} image"),
        &image,
        &r[&format!("{prefix}/image")],
        1e-3,
    );
    let img = p.generate(req, &mut NoObserver).unwrap();
    assert_eq!(img.pixels, to_rgb8(&image).unwrap());
}

#[test]
fn sd1_lcm_run_matches_diffusers() {
    let p = load("sd1-lcm");
    check_run(&p, "sd1", &request());
    // No CFG: the negative prompt changes nothing (diffusers' LCM pipeline takes none).
    let req = request();
    let without = GenerateRequest {
        negative_prompt: String::new(),
        ..req.clone()
    };
    assert_eq!(
        p.generate(&req, &mut NoObserver).unwrap().pixels,
        p.generate(&without, &mut NoObserver).unwrap().pixels
    );
    // The requested scale reaches the model: guidance 1 is another image.
    let g1 = GenerateRequest {
        cfg_scale: 1.0,
        ..req.clone()
    };
    let (a, b) = (
        p.sample_latents(&req, &mut NoObserver, &mut |_, _| {})
            .unwrap(),
        p.sample_latents(&g1, &mut NoObserver, &mut |_, _| {})
            .unwrap(),
    );
    assert!(max_abs_diff(&a, &b) > 0.1);
}

#[test]
fn sdxl_lcm_run_matches_diffusers() {
    let p = load("sdxl-lcm");
    let r = refs();
    let req = request();
    // CFG off: the prompt alone, its pooled output and one row of time ids.
    let (cond, added) = p.sdxl_conditioning(&req).unwrap();
    assert!(cond.uncond.is_none());
    assert_eq!(cond.cfg_scale, 1.0);
    assert_eq!(added.text_embeds.dim(0).unwrap(), 1);
    let w = p.unet().guidance_embedding(8.0).unwrap().unwrap();
    let eps = p
        .unet()
        .forward_cond(
            &r["sdxl/noise"].to_device(&support::device()).unwrap(),
            999.0,
            &cond.cond,
            Some(&added),
            Some(&w),
        )
        .unwrap();
    assert_close("sdxl first_eps", &eps, &r["sdxl/first_eps"], 1e-4);
    check_run(&p, "sdxl", &req);
}

#[test]
fn full_lcm_defaults_come_from_the_unet_config() {
    for (model, family) in [
        ("sd1-lcm", ModelFamily::Sd1),
        ("sdxl-lcm", ModelFamily::Sdxl),
    ] {
        let d = ModelDefaults::detect(&tiny(model)).unwrap();
        assert_eq!(d.family, family, "{model}");
        assert_eq!(d.distillation, Distillation::Lcm, "{model}");
        // LCM_Dreamshaper_v7 / lcm-sdxl cards: 4 steps, guidance 8 (embedded, CFG off).
        assert_eq!(
            (d.steps, d.cfg_scale, d.sampler, d.schedule),
            (4, 8.0, SamplerKind::Lcm, ScheduleKind::Automatic),
            "{model}"
        );
        assert_eq!((d.width, d.height), (64, 64));
        assert!(d.is_fast());
        assert_eq!(load(model).defaults(), &d);
    }
}

#[test]
fn time_cond_proj_dim_is_accepted_and_checked() {
    // runwayml-style SD1.5 config plus LCM_Dreamshaper_v7's time_cond_proj_dim: no longer refused.
    let cfg = UNetConfig::from_json(r#"{"cross_attention_dim": 768, "time_cond_proj_dim": 256}"#)
        .unwrap();
    cfg.validate().unwrap();
    assert!(cfg.guidance_embedded());
    let bad = UNetConfig::from_json(r#"{"time_cond_proj_dim": 2}"#).unwrap();
    let msg = bad.validate().unwrap_err().to_string();
    assert!(msg.contains("time_cond_proj_dim"), "{msg}");
}

/// A copy of models/tiny/sd1 whose UNet config claims `time_cond_proj_dim` (weights without
/// `cond_proj`): everything but the config is a symlink.
fn sd1_claiming_lcm(dir: &Path) -> PathBuf {
    let src = std::fs::canonicalize(tiny("sd1")).unwrap();
    let dst = dir.join("sd1-claims-lcm");
    std::fs::create_dir_all(dst.join("unet")).unwrap();
    for entry in [
        "model_index.json",
        "scheduler",
        "text_encoder",
        "tokenizer",
        "vae",
    ] {
        symlink(&src.join(entry), &dst.join(entry));
    }
    symlink(
        &src.join("unet/diffusion_pytorch_model.safetensors"),
        &dst.join("unet/diffusion_pytorch_model.safetensors"),
    );
    let mut cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(src.join("unet/config.json")).unwrap())
            .unwrap();
    cfg["time_cond_proj_dim"] = 12.into();
    std::fs::write(dst.join("unet/config.json"), cfg.to_string()).unwrap();
    dst
}

#[cfg(unix)]
fn symlink(src: &Path, dst: &Path) {
    std::os::unix::fs::symlink(src, dst).unwrap();
}

#[cfg(not(unix))]
fn symlink(src: &Path, dst: &Path) {
    if src.is_dir() {
        std::fs::create_dir_all(dst).unwrap();
        for e in std::fs::read_dir(src).unwrap() {
            let e = e.unwrap();
            symlink(&e.path(), &dst.join(e.file_name()));
        }
    } else {
        std::fs::copy(src, dst).unwrap();
    }
}

#[test]
fn missing_cond_proj_weights_are_named() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = sd1_claiming_lcm(tmp.path());
    let err = Pipeline::load(&dir, &opts()).unwrap_err().to_string();
    assert!(err.contains("time_embedding.cond_proj.weight"), "{err}");
}

#[test]
fn timestep_cond_is_checked() {
    let lcm = load("sd1-lcm");
    // On the model's device, so that the errors are the checks' and not a device mismatch.
    let dev = support::device();
    let x = Tensor::zeros((1, 4, 8, 8), DType::F32, &dev).unwrap();
    let ctx = Tensor::zeros((1, 77, 32), DType::F32, &dev).unwrap();
    let wrong = Tensor::zeros((1, 7), DType::F32, &dev).unwrap();
    let msg = lcm
        .unet()
        .forward_cond(&x, 999.0, &ctx, None, Some(&wrong))
        .unwrap_err()
        .to_string();
    assert!(msg.contains("timestep_cond"), "{msg}");
    // A regular UNet has nothing to take it with.
    let sd1 = load_sd1();
    let w = lcm.unet().guidance_embedding(8.0).unwrap().unwrap();
    let msg = sd1
        .unet()
        .forward_cond(&x, 999.0, &ctx, None, Some(&w))
        .unwrap_err()
        .to_string();
    assert!(msg.contains("time_cond_proj_dim"), "{msg}");
}
