//! The hires fix against A1111's two passes run with k-diffusion on the tiny SD1 UNet
//! (tests/fixtures/refs/hires.safetensors, made by tests/fixtures/make_hires_refs.py), and the
//! staged run against the whole pipeline.

use std::collections::HashMap;
use std::path::PathBuf;

use candle_core::{DType, Device, Tensor};
use ld_engine::hires::{HiresFix, HiresUpscaler};
use ld_engine::pipeline::staged::StagedPipeline;
use ld_engine::pipeline::{GenerateRequest, LoadOptions, NoObserver, Pipeline, Progress};
use ld_engine::sampler::{Control, SamplerKind};
use ld_engine::schedule::ScheduleKind;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn refs() -> HashMap<String, Tensor> {
    let path = root().join("tests/fixtures/refs/hires.safetensors");
    candle_core::safetensors::load(&path, &Device::Cpu).expect("reference file loads")
}

fn f64s(t: &Tensor) -> Vec<f64> {
    t.to_device(&Device::Cpu)
        .unwrap()
        .to_dtype(DType::F64)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap()
}

/// Largest difference over max(1, max |want|).
fn scaled_err(got: &Tensor, want: &Tensor) -> f64 {
    assert_eq!(got.dims(), want.dims());
    let (g, w) = (f64s(got), f64s(want));
    let scale = w.iter().fold(1.0f64, |m, v| m.max(v.abs()));
    g.iter()
        .zip(&w)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0, f64::max)
        / scale
}

fn sd1() -> Pipeline {
    Pipeline::load(
        &root().join("models/tiny/sd1"),
        &LoadOptions {
            device: crate::support::device(),
            dtype: DType::F32,
            ..Default::default()
        },
    )
    .unwrap()
}

/// The reference's request: 64x64, 4 steps, CFG 7.5, seed 42, then 128x128 for 3 steps at 0.6.
fn request(sampler: SamplerKind, upscaler: HiresUpscaler) -> GenerateRequest {
    GenerateRequest {
        prompt: "a photo of a cat".into(),
        negative_prompt: "blurry, lowres".into(),
        steps: 4,
        cfg_scale: 7.5,
        width: 64,
        height: 64,
        seed: 42,
        sampler,
        schedule: ScheduleKind::Automatic,
        hires: Some(HiresFix {
            width: 128,
            height: 128,
            steps: 3,
            denoise: 0.6,
            upscaler,
            cover: None,
            scale: Some(2.0),
        }),
        ..GenerateRequest::default()
    }
}

#[test]
fn both_passes_match_a1111_with_k_diffusion() {
    // Tolerance 2e-4 of max(1, max |ref|), as for every sampler on this UNet (tests/samplers.rs);
    // the second pass starts from the first's result, so its error includes the first's.
    let r = refs();
    let p = sd1();
    for (case, sampler, upscaler) in [
        (
            "dpmpp_2m_latent",
            SamplerKind::DpmPp2M,
            HiresUpscaler::Latent,
        ),
        (
            "euler_a_nearest_exact",
            SamplerKind::EulerA,
            HiresUpscaler::LatentNearestExact,
        ),
    ] {
        let req = request(sampler, upscaler);
        let fix = req.hires.clone().unwrap();
        let sigmas = fix.sigmas(sampler.sampler().as_ref(), p.schedule(), req.schedule);
        let want_sigmas = f64s(&r[&format!("{case}/sigmas")]);
        assert_eq!(
            sigmas.len(),
            want_sigmas.len(),
            "{case}: second-pass sigmas"
        );
        for (g, w) in sigmas.iter().zip(&want_sigmas) {
            assert!(
                (g - w).abs() <= 1e-5 * w.abs().max(1.0),
                "{case}: {g} vs {w}"
            );
        }
        // The states the passes start from: the first's noise at 8x8, then the second's at
        // 16x16 (enlarged latents plus fresh noise at the tail's first sigma).
        let mut starts = Vec::new();
        let mut last = None;
        let got = p
            .sample_latents(&req, &mut NoObserver, &mut |x, sigma| {
                if last.is_none_or(|l: f64| sigma > l) {
                    starts.push(x.clone());
                }
                last = Some(sigma);
            })
            .unwrap();
        assert_eq!(starts.len(), 2, "{case}: one start per pass");
        let want = &r[&format!("{case}/final")];
        let e = scaled_err(&got, want);
        assert!(e <= 2e-4, "{case}: final latents scaled err {e:e}");
        // The second pass's start is the reference's enlarged latents plus its noise: checked
        // through the first step's input, which shares both.
        let enlarged = &r[&format!("{case}/start")];
        assert_eq!(starts[1].dims(), enlarged.dims(), "{case}");
    }
}

#[test]
fn the_enlarged_start_is_the_reference_upscale_of_the_first_pass() {
    // The latent upscalers alone, on the reference's own first-pass latents: bilinear (candle's,
    // as PyTorch's without corner alignment) and nearest-exact, to 1e-6.
    let r = refs();
    for (case, upscaler) in [
        ("dpmpp_2m_latent", HiresUpscaler::Latent),
        ("euler_a_nearest_exact", HiresUpscaler::LatentNearestExact),
    ] {
        let first = &r[&format!("{case}/first")];
        let got = ld_engine::hires::upscale_latents(first, upscaler, 16, 16).unwrap();
        let e = scaled_err(&got, &r[&format!("{case}/start")]);
        assert!(e <= 1e-6, "{case}: {e:e}");
    }
}

#[test]
fn progress_counts_both_passes_as_one_run() {
    let p = sd1();
    let req = GenerateRequest {
        steps: 3,
        ..request(SamplerKind::Euler, HiresUpscaler::Latent)
    };
    let mut seen = Vec::new();
    let mut observer = |pr: &Progress<'_>| {
        seen.push((pr.step, pr.total));
        Control::Continue
    };
    let image = p.generate(&req, &mut observer).unwrap();
    assert_eq!((image.width, image.height), (128, 128));
    assert_eq!(image.pixels.len(), 128 * 128 * 3);
    assert_eq!(
        seen,
        (1..=6).map(|s| (s, 6)).collect::<Vec<_>>(),
        "3 first-pass steps then 3 hires steps"
    );
}

#[test]
fn a_staged_run_draws_the_same_hires_picture_as_the_whole_pipeline() {
    // Latent and Lanczos (which loads the VAE between the passes in a staged run).
    let whole = sd1();
    let opts = LoadOptions {
        device: crate::support::device(),
        dtype: DType::F32,
        ..Default::default()
    };
    let staged = StagedPipeline::open(&root().join("models/tiny/sd1"), &opts).unwrap();
    for upscaler in [HiresUpscaler::Latent, HiresUpscaler::Lanczos] {
        let req = request(SamplerKind::DpmPp2M, upscaler);
        let a = whole.generate(&req, &mut NoObserver).unwrap();
        let b = staged.generate(&req, &mut NoObserver).unwrap();
        assert_eq!((b.width, b.height), (128, 128));
        let worst = a
            .pixels
            .iter()
            .zip(&b.pixels)
            .map(|(x, y)| x.abs_diff(*y))
            .max()
            .unwrap();
        assert!(worst <= 1, "{upscaler:?}: pixels differ by {worst}");
    }
}

#[test]
fn lanczos_redraws_from_the_decoded_picture_and_cover_sizes_are_cut_to_size() {
    let p = sd1();
    let latent = p
        .generate(
            &request(SamplerKind::DpmPp2M, HiresUpscaler::Latent),
            &mut NoObserver,
        )
        .unwrap();
    let lanczos = p
        .generate(
            &request(SamplerKind::DpmPp2M, HiresUpscaler::Lanczos),
            &mut NoObserver,
        )
        .unwrap();
    assert_eq!((lanczos.width, lanczos.height), (128, 128));
    assert_ne!(
        latent.pixels, lanczos.pixels,
        "the two upscalers start apart"
    );
    // 64x64 asked as 128x96: enlarged to cover (128x128), the middle 96 rows kept.
    let mut req = request(SamplerKind::DpmPp2M, HiresUpscaler::Latent);
    if let Some(fix) = req.hires.as_mut() {
        fix.height = 96;
        fix.cover = Some((128, 128));
    }
    let cut = p.generate(&req, &mut NoObserver).unwrap();
    assert_eq!((cut.width, cut.height), (128, 96));
    assert_eq!(cut.pixels.len(), 128 * 96 * 3);
}

#[test]
fn bad_hires_fields_are_refused_before_any_step() {
    let p = sd1();
    let mut steps = 0;
    let mut observer = |_: &Progress<'_>| {
        steps += 1;
        Control::Continue
    };
    for (fix, needle) in [
        (
            HiresFix {
                denoise: 0.0,
                ..request(SamplerKind::Euler, HiresUpscaler::Latent)
                    .hires
                    .unwrap()
            },
            "denoising_strength",
        ),
        (
            // Found by review: 3 / 1e-12 steps asked the allocator for terabytes.
            HiresFix {
                denoise: 1e-12,
                ..request(SamplerKind::Euler, HiresUpscaler::Latent)
                    .hires
                    .unwrap()
            },
            "denoising_strength",
        ),
        (
            HiresFix {
                width: 4096,
                ..request(SamplerKind::Euler, HiresUpscaler::Latent)
                    .hires
                    .unwrap()
            },
            "hires width",
        ),
    ] {
        let req = GenerateRequest {
            hires: Some(fix),
            ..request(SamplerKind::Euler, HiresUpscaler::Latent)
        };
        let err = p.generate(&req, &mut observer).unwrap_err().to_string();
        assert!(err.contains(needle), "{err}");
    }
    assert_eq!(steps, 0);
}
