//! UNet and VAE: config parsing of real diffusers configs, full-architecture forwards on random
//! weights (shapes, input validation, sliced == plain attention), and parity with diffusers on
//! the tiny fixture models (tests/fixtures/README.md says how the references were made).

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use crate::support::{self, max_abs, max_abs_diff};
use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use ld_engine::attention::AttentionOptions;
use ld_engine::unet::{AddedConditions, OneOrMany, UNet2DConditionModel, UNetConfig};
use ld_engine::vae::{AutoencoderKL, VaeConfig};

// runwayml/stable-diffusion-v1-5 unet/config.json (diffusers 0.6 era, keys as published).
const SD15_UNET: &str = r#"{
  "_class_name": "UNet2DConditionModel", "_diffusers_version": "0.6.0",
  "act_fn": "silu", "attention_head_dim": 8,
  "block_out_channels": [320, 640, 1280, 1280], "center_input_sample": false,
  "cross_attention_dim": 768,
  "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
  "downsample_padding": 1, "flip_sin_to_cos": true, "freq_shift": 0, "in_channels": 4,
  "layers_per_block": 2, "mid_block_scale_factor": 1, "norm_eps": 1e-05, "norm_num_groups": 32,
  "out_channels": 4, "sample_size": 64,
  "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"]
}"#;

// stabilityai/stable-diffusion-2-1 unet/config.json.
const SD21_UNET: &str = r#"{
  "_class_name": "UNet2DConditionModel", "_diffusers_version": "0.10.0.dev0",
  "act_fn": "silu", "attention_head_dim": [5, 10, 20, 20],
  "block_out_channels": [320, 640, 1280, 1280], "center_input_sample": false,
  "cross_attention_dim": 1024,
  "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
  "downsample_padding": 1, "dual_cross_attention": false, "flip_sin_to_cos": true, "freq_shift": 0,
  "in_channels": 4, "layers_per_block": 2, "mid_block_scale_factor": 1, "norm_eps": 1e-05,
  "norm_num_groups": 32, "num_class_embeds": null, "only_cross_attention": false, "out_channels": 4,
  "sample_size": 96,
  "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
  "upcast_attention": true, "use_linear_projection": true
}"#;

// stabilityai/stable-diffusion-xl-base-1.0 unet/config.json (the keys that matter).
const SDXL_UNET: &str = r#"{
  "_class_name": "UNet2DConditionModel", "act_fn": "silu",
  "addition_embed_type": "text_time", "addition_embed_type_num_heads": 64,
  "addition_time_embed_dim": 256, "attention_head_dim": [5, 10, 20],
  "block_out_channels": [320, 640, 1280], "center_input_sample": false,
  "class_embed_type": null, "class_embeddings_concat": false, "conv_in_kernel": 3,
  "conv_out_kernel": 3, "cross_attention_dim": 2048, "cross_attention_norm": null,
  "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
  "downsample_padding": 1, "dual_cross_attention": false, "encoder_hid_dim": null,
  "encoder_hid_dim_type": null, "flip_sin_to_cos": true, "freq_shift": 0, "in_channels": 4,
  "layers_per_block": 2, "mid_block_only_cross_attention": null, "mid_block_scale_factor": 1,
  "mid_block_type": "UNetMidBlock2DCrossAttn", "norm_eps": 1e-05, "norm_num_groups": 32,
  "num_attention_heads": null, "num_class_embeds": null, "only_cross_attention": false,
  "out_channels": 4, "projection_class_embeddings_input_dim": 2816,
  "resnet_out_scale_factor": 1.0, "resnet_skip_time_act": false,
  "resnet_time_scale_shift": "default", "sample_size": 128, "time_cond_proj_dim": null,
  "time_embedding_act_fn": null, "time_embedding_dim": null, "time_embedding_type": "positional",
  "timestep_post_act": null, "transformer_layers_per_block": [1, 2, 10],
  "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
  "upcast_attention": null, "use_linear_projection": true
}"#;

// runwayml/stable-diffusion-v1-5 vae/config.json.
const SD15_VAE: &str = r#"{
  "_class_name": "AutoencoderKL", "_diffusers_version": "0.6.0", "act_fn": "silu",
  "block_out_channels": [128, 256, 512, 512],
  "down_block_types": ["DownEncoderBlock2D", "DownEncoderBlock2D", "DownEncoderBlock2D", "DownEncoderBlock2D"],
  "in_channels": 3, "latent_channels": 4, "layers_per_block": 2, "norm_num_groups": 32,
  "out_channels": 3, "sample_size": 512,
  "up_block_types": ["UpDecoderBlock2D", "UpDecoderBlock2D", "UpDecoderBlock2D", "UpDecoderBlock2D"]
}"#;

#[test]
fn sd15_unet_config_parses_with_diffusers_defaults() {
    let cfg = UNetConfig::from_json(SD15_UNET).unwrap();
    cfg.validate().unwrap();
    assert_eq!(cfg.block_out_channels, [320, 640, 1280, 1280]);
    assert_eq!(cfg.attention_head_dim, Some(OneOrMany::One(8)));
    assert_eq!(cfg.context_dim(), 768);
    assert!(!cfg.use_linear_projection && !cfg.upcast_attention);
    // Keys absent from the old config take diffusers' defaults.
    assert_eq!(
        cfg.transformer_layers_per_block,
        OneOrMany::One(OneOrMany::One(1))
    );
    assert_eq!(
        cfg.mid_block_type.as_deref(),
        Some("UNetMidBlock2DCrossAttn")
    );
    assert_eq!(cfg.downsampling_factor(), 8);
    assert!(!cfg.needs_added_conditions());
}

#[test]
fn sd21_and_sdxl_unet_configs_parse() {
    let sd2 = UNetConfig::from_json(SD21_UNET).unwrap();
    sd2.validate().unwrap();
    // SD2's `attention_head_dim` list is the number of heads per block (diffusers quirk).
    assert_eq!(
        sd2.attention_head_dim,
        Some(OneOrMany::Many(vec![5, 10, 20, 20]))
    );
    assert!(sd2.use_linear_projection && sd2.upcast_attention);
    assert_eq!(sd2.context_dim(), 1024);

    let xl = UNetConfig::from_json(SDXL_UNET).unwrap();
    xl.validate().unwrap();
    assert_eq!(
        xl.transformer_layers_per_block,
        OneOrMany::Many(vec![
            OneOrMany::One(1),
            OneOrMany::One(2),
            OneOrMany::One(10)
        ])
    );
    assert!(xl.needs_added_conditions());
    assert_eq!(xl.downsampling_factor(), 4);
}

#[test]
fn unsupported_unet_configs_are_rejected_with_the_field_name() {
    let mut cfg = UNetConfig::from_json(SD15_UNET).unwrap();
    cfg.class_embed_type = Some("timestep".into());
    let msg = cfg.validate().unwrap_err().to_string();
    assert!(msg.contains("class_embed_type"), "{msg}");

    let mut cfg = UNetConfig::from_json(SD15_UNET).unwrap();
    cfg.attention_head_dim = Some(OneOrMany::Many(vec![8, 8]));
    let msg = cfg.validate().unwrap_err().to_string();
    assert!(msg.contains("num_attention_heads"), "{msg}");

    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("config.json");
    std::fs::write(&p, r#"{"block_out_channels": "wide"}"#).unwrap();
    let err = UNetConfig::from_file(&p).unwrap_err();
    assert!(
        matches!(err, ld_engine::EngineError::Config { .. }),
        "{err}"
    );
    let err = UNetConfig::from_file(&dir.path().join("missing.json")).unwrap_err();
    assert!(
        matches!(err, ld_engine::EngineError::MissingFile { .. }),
        "{err}"
    );
}

#[test]
fn sd15_vae_config_parses() {
    let cfg = VaeConfig::from_json(SD15_VAE).unwrap();
    cfg.validate().unwrap();
    assert_eq!(cfg.scaling_factor, 0.18215);
    assert_eq!(cfg.downsampling_factor(), 8);
    assert!(cfg.use_quant_conv && cfg.mid_block_add_attention);
}

/// A tiny UNet with the structure of `base` (block types, projections, heads as a list).
fn tiny_unet_config(base: &str, extra: &str) -> UNetConfig {
    let mut v: serde_json::Value = serde_json::from_str(base).unwrap();
    let patch: serde_json::Value = serde_json::from_str(extra).unwrap();
    for (k, x) in patch.as_object().unwrap() {
        v[k] = x.clone();
    }
    UNetConfig::from_json(&v.to_string()).unwrap()
}

/// Seeded random weights: candle's `VarMap` draws from an unseeded generator, so a bound that
/// holds for one run's model could fail for the next.
fn random_unet(cfg: &UNetConfig) -> UNet2DConditionModel {
    let vb = ld_engine::bench::seeded_weights(DType::F32, &Device::Cpu);
    UNet2DConditionModel::load(vb, cfg).unwrap()
}

/// Seeded normal values ([`ld_engine::rng::seeded_normal`]).
fn randn(seed: u64, shape: &[usize]) -> Tensor {
    ld_engine::rng::seeded_normal(seed, 0., 1., shape).unwrap()
}

#[test]
fn random_sd1_and_sd2_shaped_unets_run_and_sliced_matches_plain() {
    let sd1 = tiny_unet_config(
        SD15_UNET,
        r#"{"block_out_channels": [32, 64, 64], "norm_num_groups": 8, "cross_attention_dim": 16,
            "attention_head_dim": 4, "layers_per_block": 1,
            "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
            "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"]}"#,
    );
    let sd2 = tiny_unet_config(
        SD21_UNET,
        r#"{"block_out_channels": [32, 64, 64], "norm_num_groups": 8, "cross_attention_dim": 24,
            "attention_head_dim": [2, 4, 8], "layers_per_block": 1,
            "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
            "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"]}"#,
    );
    for cfg in [sd1, sd2] {
        let mut unet = random_unet(&cfg);
        let x = randn(1, &[2, 4, 16, 12]);
        let ctx = randn(2, &[2, 7, cfg.context_dim()]);
        unet.set_attention_options(AttentionOptions::plain());
        let plain = unet.forward(&x, 981.0, &ctx).unwrap();
        assert_eq!(plain.dims(), &[2, 4, 16, 12]);
        assert!(max_abs(&plain).is_finite());
        // One head at a time with tiny score blocks: many chunks, same numbers.
        unet.set_attention_options(AttentionOptions::sliced(64));
        let sliced = unet.forward(&x, 981.0, &ctx).unwrap();
        let d = max_abs_diff(&plain, &sliced);
        // Only the summation order inside the products changes: rounding-level differences.
        assert!(d < 1e-5, "sliced vs plain: {d}");
    }
}

#[test]
fn random_sdxl_shaped_unet_runs_with_added_conditions() {
    let cfg = tiny_unet_config(
        SDXL_UNET,
        r#"{"block_out_channels": [32, 64], "norm_num_groups": 8, "cross_attention_dim": 16,
            "attention_head_dim": [2, 4], "layers_per_block": 1,
            "transformer_layers_per_block": [1, 2], "addition_time_embed_dim": 8,
            "projection_class_embeddings_input_dim": 60,
            "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D"],
            "up_block_types": ["CrossAttnUpBlock2D", "UpBlock2D"]}"#,
    );
    let unet = random_unet(&cfg);
    let x = randn(1, &[2, 4, 8, 8]);
    let ctx = randn(2, &[2, 5, 16]);
    // Without text_embeds/time_ids the model cannot run: a clear error, not a panic.
    let err = unet.forward(&x, 10.0, &ctx).unwrap_err().to_string();
    assert!(err.contains("text_embeds"), "{err}");
    // 60 = 12 (pooled text) + 6 ids * 8.
    let ids = Tensor::new(
        &[[64f32, 64., 0., 0., 64., 64.], [32., 32., 0., 0., 64., 64.]],
        &Device::Cpu,
    )
    .unwrap();
    let added = AddedConditions {
        text_embeds: randn(3, &[2, 12]),
        time_ids: ids,
    };
    let out = unet.forward_with(&x, 10.0, &ctx, Some(&added)).unwrap();
    assert_eq!(out.dims(), &[2, 4, 8, 8]);
}

#[test]
fn unet_rejects_bad_inputs_with_errors() {
    let cfg = tiny_unet_config(
        SD15_UNET,
        r#"{"block_out_channels": [32, 32, 32], "norm_num_groups": 8, "cross_attention_dim": 16,
            "attention_head_dim": 2, "layers_per_block": 1,
            "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
            "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"]}"#,
    );
    let unet = random_unet(&cfg);
    let ctx = randn(1, &[1, 3, 16]);
    // A side that is not a multiple of the downsampling factor is fine (diffusers resizes the
    // up blocks to their skips); the output keeps the input's size.
    let odd = unet.forward(&randn(2, &[1, 4, 10, 7]), 1.0, &ctx).unwrap();
    assert_eq!(odd.dims(), &[1, 4, 10, 7]);
    let cases: [(Tensor, Tensor, &str); 6] = [
        (randn(3, &[1, 3, 8, 8]), ctx.clone(), "channels"),
        (randn(4, &[1, 4, 0, 8]), ctx.clone(), "must not be empty"),
        (randn(5, &[1, 4, 8]), ctx.clone(), "[batch, channels"),
        (randn(6, &[1, 4, 8, 8]), randn(7, &[1, 3, 12]), "12 wide"),
        (randn(8, &[2, 4, 8, 8]), ctx.clone(), "batch of 2"),
        (
            randn(9, &[1, 4, 8, 8]).to_dtype(DType::F16).unwrap(),
            ctx.clone(),
            "F16",
        ),
    ];
    for (x, c, want) in cases {
        let err = unet.forward(&x, 1.0, &c).unwrap_err().to_string();
        assert!(err.contains(want), "{err:?} should mention {want:?}");
    }
    assert!(unet
        .forward(&randn(10, &[1, 4, 8, 8]), f64::NAN, &ctx)
        .is_err());
}

#[test]
fn random_vae_round_trip_shapes_and_sliced_attention() {
    let cfg = VaeConfig::from_json(
        r#"{"block_out_channels": [8, 16, 16], "norm_num_groups": 4, "layers_per_block": 1,
            "down_block_types": ["DownEncoderBlock2D", "DownEncoderBlock2D", "DownEncoderBlock2D"],
            "up_block_types": ["UpDecoderBlock2D", "UpDecoderBlock2D", "UpDecoderBlock2D"]}"#,
    )
    .unwrap();
    let mut vae = AutoencoderKL::load(
        ld_engine::bench::seeded_weights(DType::F32, &Device::Cpu),
        &cfg,
    )
    .unwrap();
    let img = randn(1, &[1, 3, 32, 24]);
    let dist = vae.encode(&img).unwrap();
    assert_eq!(dist.mean.dims(), &[1, 4, 8, 6]);
    assert_eq!(dist.logvar.dims(), &[1, 4, 8, 6]);
    let z = vae.encode_scaled(&img, None).unwrap();
    vae.set_attention_options(AttentionOptions::plain());
    let plain = vae.decode_scaled(&z).unwrap();
    assert_eq!(plain.dims(), &[1, 3, 32, 24]);
    vae.set_attention_options(AttentionOptions::sliced(20));
    let sliced = vae.decode_scaled(&z).unwrap();
    let d = max_abs_diff(&plain, &sliced);
    assert!(d < 1e-5, "sliced vs plain VAE: {d}");
    // An image that the encoder cannot downsample evenly, or latents with 3 channels.
    assert!(vae.encode(&randn(2, &[1, 3, 30, 24])).is_err());
    let err = vae
        .decode(&randn(3, &[1, 3, 8, 8]))
        .unwrap_err()
        .to_string();
    assert!(err.contains("channels"), "{err}");
}

// --- parity with diffusers on the tiny fixture models ---

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// `<dir>/diffusion_pytorch_model.safetensors`, or the `.fp16` variant the SD2 fixture uses.
fn weights_file(dir: &Path) -> PathBuf {
    for name in [
        "diffusion_pytorch_model.safetensors",
        "diffusion_pytorch_model.fp16.safetensors",
    ] {
        let p = dir.join(name);
        if p.exists() {
            return p;
        }
    }
    panic!("no weights in {}", dir.display());
}

/// f32 VarBuilder over a component folder on the test device ([`support::device`]); fp16 files
/// are upcast on load, as the pipeline's f32 mode does.
fn f32_weights(dir: &Path) -> VarBuilder<'static> {
    let file = weights_file(dir);
    let dev = support::device();
    // SAFETY: the fixture files are not modified while the tests run.
    unsafe { VarBuilder::from_mmaped_safetensors(&[file], DType::F32, &dev).unwrap() }
}

/// `t` (a reference input, loaded on the CPU) on the test device.
fn on_device(t: &Tensor) -> Tensor {
    t.to_device(&support::device()).unwrap()
}

fn refs(model: &str) -> HashMap<String, Tensor> {
    let p = repo_root().join(format!("tests/fixtures/refs/{model}.safetensors"));
    candle_core::safetensors::load(&p, &Device::Cpu)
        .unwrap_or_else(|e| panic!("reference file {}: {e}", p.display()))
}

fn unet_matches_diffusers(model: &str) -> f32 {
    let dir = repo_root().join("models/tiny").join(model).join("unet");
    let cfg = UNetConfig::from_file(&dir.join("config.json")).unwrap();
    let unet = UNet2DConditionModel::load(f32_weights(&dir), &cfg).unwrap();
    let r = refs(model);
    let t: Vec<f32> = r["euler_t0"].to_vec1().unwrap();
    let ctx = on_device(&Tensor::cat(&[&r["text_neg"], &r["text_pos"]], 0).unwrap());
    let out = unet
        .forward(&on_device(&r["euler_unet_in"]), t[0] as f64, &ctx)
        .unwrap();
    let d = max_abs_diff(&out, &r["euler_unet_out"]);
    eprintln!(
        "{model} unet: max abs error {d:e} (output max abs {})",
        max_abs(&r["euler_unet_out"])
    );
    d
}

/// On a GPU: UNet steps replayed as a CUDA graph (a warm-up, the recording, then replays, each
/// step with new latents, timestep and text) give the eager steps' numbers. The fixture models
/// (f32 and f16) mostly take candle's attention, which is never recorded; random SD1- and
/// SDXL-shaped models with SD's head size of 64 run the fused kernel in f16 and must replay.
/// On the CPU no graph is used.
#[test]
fn unet_steps_replayed_as_cuda_graphs_match_eager_steps() {
    let dev = support::device();
    let fixture = |model: &str, dtype: DType| {
        let dir = repo_root().join("models/tiny").join(model).join("unet");
        let cfg = UNetConfig::from_file(&dir.join("config.json")).unwrap();
        // SAFETY: the fixture files are not modified while the tests run.
        let vb = unsafe {
            VarBuilder::from_mmaped_safetensors(&[weights_file(&dir)], dtype, &dev).unwrap()
        };
        (format!("{model} {dtype:?}"), cfg, vb, dtype, false)
    };
    // Head size 64 (1 and 2 heads on 64 and 128 channels), as SD's own.
    let sd1 = tiny_unet_config(
        SD15_UNET,
        r#"{"block_out_channels": [64, 128], "norm_num_groups": 32, "cross_attention_dim": 64,
            "attention_head_dim": [1, 2], "layers_per_block": 1,
            "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"],
            "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"]}"#,
    );
    let sdxl = tiny_unet_config(
        SDXL_UNET,
        r#"{"block_out_channels": [64, 128], "norm_num_groups": 32, "cross_attention_dim": 64,
            "attention_head_dim": [1, 2], "layers_per_block": 1,
            "transformer_layers_per_block": [1, 2], "addition_time_embed_dim": 8,
            "projection_class_embeddings_input_dim": 60,
            "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D"],
            "up_block_types": ["CrossAttnUpBlock2D", "UpBlock2D"]}"#,
    );
    let mut cases = vec![fixture("sd1", DType::F32), fixture("sdxl", DType::F32)];
    if !dev.is_cpu() {
        cases.extend([fixture("sd1", DType::F16), fixture("sdxl", DType::F16)]);
        for (name, cfg) in [("random SD1-shaped", sd1), ("random SDXL-shaped", sdxl)] {
            let vb = ld_engine::bench::seeded_weights(DType::F16, &dev);
            cases.push((name.to_string(), cfg, vb, DType::F16, true));
        }
    }
    for (name, cfg, vb, dtype, must_replay) in cases {
        let graphed = UNet2DConditionModel::load(vb, &cfg).unwrap();
        let mut eager = graphed.clone();
        eager.set_cuda_graphs(false);
        let input = |seed: u64, shape: &[usize]| {
            randn(seed, shape)
                .to_dtype(dtype)
                .unwrap()
                .to_device(&dev)
                .unwrap()
        };
        for step in 0..4u64 {
            let x = input(10 + step, &[2, cfg.in_channels, 8, 8]);
            let ctx = input(20 + step, &[2, 7, cfg.context_dim()]);
            let added = match (
                cfg.projection_class_embeddings_input_dim,
                cfg.addition_time_embed_dim,
            ) {
                (Some(p), Some(t)) if cfg.needs_added_conditions() => Some(AddedConditions {
                    text_embeds: input(30 + step, &[2, p - 6 * t]),
                    time_ids: Tensor::new(&[[64f32, 64., 0., 0., 64., 64.]; 2], &dev).unwrap(),
                }),
                _ => None,
            };
            let t = 999.0 - 250.0 * step as f64;
            let got = graphed.forward_with(&x, t, &ctx, added.as_ref()).unwrap();
            let want = eager.forward_with(&x, t, &ctx, added.as_ref()).unwrap();
            let (d, m) = (max_abs_diff(&got, &want), max_abs(&want));
            assert!(
                m.is_finite(),
                "{name} step {step}: the eager output is not finite"
            );
            // The same kernels on the same inputs: equal up to a last-bit difference at most.
            let tol = if dtype == DType::F16 { 1e-3 } else { 1e-5 } * m.max(1.0);
            eprintln!("{name} step {step}: graph vs eager max abs diff {d:e} (max {m})");
            assert!(d <= tol, "{name} step {step}: {d:e} > {tol:e}");
        }
        let (replays, failure) = (graphed.graph_replays(), graphed.graph_failure());
        eprintln!("{name}: {replays} replays ({failure:?})");
        if dev.is_cpu() || dtype == DType::F32 {
            assert_eq!(replays, 0, "{name}");
        } else if must_replay && std::env::var("LD_CUDA_GRAPHS").as_deref() != Ok("0") {
            // Step 0 warms up, step 1 records and replays, steps 2 and 3 replay.
            assert_eq!(replays, 3, "{name}: the graph did not run ({failure:?})");
        }
    }
}

fn vae_matches_diffusers(model: &str) -> (f32, f32) {
    let dir = repo_root().join("models/tiny").join(model).join("vae");
    let cfg = VaeConfig::from_file(&dir.join("config.json")).unwrap();
    let vae = AutoencoderKL::load(f32_weights(&dir), &cfg).unwrap();
    let r = refs(model);
    let mean = vae.encode(&on_device(&r["vae_enc_in"])).unwrap().mean;
    let enc = max_abs_diff(&mean, &r["vae_enc_mean"]);
    let img = vae.decode(&on_device(&r["vae_dec_in"])).unwrap();
    let dec = max_abs_diff(&img, &r["vae_dec_out"]);
    eprintln!("{model} vae: encoder mean max abs error {enc:e}, decoder {dec:e}");
    (enc, dec)
}

// Tolerance 1e-4: diffusers ran in f32 on the CPU; only summation order and transcendental
// rounding differ, which stays around 1e-6..1e-5 through these few layers.
const PARITY_TOL: f32 = 1e-4;

#[test]
fn sd1_unet_matches_diffusers() {
    assert!(unet_matches_diffusers("sd1") < PARITY_TOL);
}

#[test]
fn sd2_unet_matches_diffusers() {
    // fp16 weights upcast to f32 on both sides; linear projections, per-block head counts.
    assert!(unet_matches_diffusers("sd2") < PARITY_TOL);
}

#[test]
fn sd1_vae_matches_diffusers() {
    let (enc, dec) = vae_matches_diffusers("sd1");
    assert!(enc < PARITY_TOL && dec < PARITY_TOL);
}

#[test]
fn sd2_vae_matches_diffusers() {
    let (enc, dec) = vae_matches_diffusers("sd2");
    assert!(enc < PARITY_TOL && dec < PARITY_TOL);
}

/// Latents whose sides do not divide by the UNet's downsampling (images that are multiples of 8
/// but not of 64): diffusers' `forward_upsample_size` path, from refs/unet_odd.safetensors
/// (tests/fixtures/make_odd_size_refs.py). Same 1e-4 tolerance as the other UNet checks.
#[test]
fn odd_latent_sizes_match_diffusers() {
    let odd = candle_core::safetensors::load(
        repo_root().join("tests/fixtures/refs/unet_odd.safetensors"),
        &Device::Cpu,
    )
    .unwrap();
    for model in ["sd1", "sd2"] {
        let dir = repo_root().join("models/tiny").join(model).join("unet");
        let cfg = UNetConfig::from_file(&dir.join("config.json")).unwrap();
        let unet = UNet2DConditionModel::load(f32_weights(&dir), &cfg).unwrap();
        let ctx = on_device(&refs(model)["text_pos"]);
        let out = unet
            .forward(&on_device(&odd[&format!("{model}_in")]), 500.0, &ctx)
            .unwrap();
        let err = max_abs_diff(&out, &odd[&format!("{model}_out")]);
        assert!(err < PARITY_TOL, "{model}: max abs error {err}");
    }
}
