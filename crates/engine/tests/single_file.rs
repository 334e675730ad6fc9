//! Single-file checkpoints (issue 7, "Formats"): validation, detection, loading SD1/SD2 LDM
//! checkpoints and separate VAE files, and the pickle reader. Fixtures from
//! tests/fixtures/make_single_file_refs.py (see tests/fixtures/README.md): the whole checkpoints
//! are rebuilt here from `refs/single_file_recipe.json` and the tiny diffusers folders, and must
//! hash to what the script built and diffusers' `from_single_file` read back exactly.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use crate::support::{self, max_abs, max_abs_diff};
use candle_core::{DType, Device, Tensor};
use ld_engine::checkpoint::{
    self, CheckpointKind, ModelFamily, Prediction, VaeLayout, WeightDtype,
};
use ld_engine::config::{weight_files_in, PredictionType};
use ld_engine::pickle;
use ld_engine::pipeline::staged::StagedPipeline;
use ld_engine::pipeline::{
    GenerateRequest, GeneratedImage, HalfWeights, LoadOptions, NoObserver, Pipeline,
};
use ld_engine::single_file::ModelSource;
use ld_engine::weights::Weights;
use ld_engine::EngineError;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn refs() -> PathBuf {
    root().join("tests/fixtures/refs")
}

fn tiny(model: &str) -> PathBuf {
    root().join("models/tiny").join(model)
}

/// f32 on the test device ([`support::device`]).
fn opts() -> LoadOptions {
    LoadOptions {
        device: support::device(),
        dtype: DType::F32,
        ..Default::default()
    }
}

fn fnv1a64(bytes: &[u8]) -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in bytes {
        h ^= b as u64;
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    format!("{h:016x}")
}

/// Rebuilds the LDM checkpoint of `model` (`sd1`/`sd2` in `fp32`/`fp16`, `sdxl`/`sdxl_refiner`
/// in `fp16`) from the recipe, leaving out names for which `keep` is false, and checks it is
/// byte-identical to the file the fixture script validated with diffusers (when nothing is left
/// out).
fn build(model: &str, tag: &str, dir: &Path, keep: impl Fn(&str) -> bool) -> PathBuf {
    build_from(model, &tiny(&model.replace('_', "-")), tag, dir, keep)
}

/// [`build`] with the weights of `folder`, a model of `model`'s architecture whose tensors may
/// differ in value and shape (the inpainting UNet's 9 input channels); the file is checked
/// against the script's only when `folder` is `model`'s own.
pub(crate) fn build_from(
    model: &str,
    folder: &Path,
    tag: &str,
    dir: &Path,
    keep: impl Fn(&str) -> bool,
) -> PathBuf {
    let recipe: serde_json::Value =
        serde_json::from_slice(&std::fs::read(refs().join("single_file_recipe.json")).unwrap())
            .unwrap();
    let entry = &recipe[model];
    let dtype = if tag == "fp16" {
        DType::F16
    } else {
        DType::F32
    };
    let own = folder == tiny(&model.replace('_', "-"));
    let comps: HashMap<&str, Weights> = ["unet", "vae", "text_encoder", "text_encoder_2"]
        .into_iter()
        .filter(|c| folder.join(c).is_dir())
        .map(|c| {
            let files = weight_files_in(&folder.join(c)).unwrap();
            (c, Weights::open_all(&files).unwrap())
        })
        .collect();
    let mut out = HashMap::new();
    let mut complete = true;
    for e in entry["entries"].as_array().unwrap() {
        let name = e[0].as_str().unwrap();
        if !keep(name) {
            complete = false;
            continue;
        }
        let w = &comps[e[1].as_str().unwrap()];
        let src: Vec<Tensor> = e[2]
            .as_array()
            .unwrap()
            .iter()
            .map(|k| {
                w.load(k.as_str().unwrap(), DType::F32, &Device::Cpu)
                    .unwrap()
            })
            .collect();
        let op = e[3].as_str().unwrap();
        let t = match op {
            "copy" => src[0].clone(),
            "conv1x1" => {
                let (o, i) = src[0].dims2().unwrap();
                src[0].reshape((o, i, 1, 1)).unwrap()
            }
            "cat" => Tensor::cat(&src, 0).unwrap(),
            // OpenCLIP's `x @ P` matrix is the Linear weight transposed.
            "transpose" => src[0].t().unwrap().contiguous().unwrap(),
            z if z.starts_with("zeros:") => {
                let dims: Vec<usize> = z[6..].split(',').map(|d| d.parse().unwrap()).collect();
                Tensor::zeros(dims, DType::F32, &Device::Cpu).unwrap()
            }
            other => panic!("unknown op {other}"),
        };
        out.insert(name.to_string(), t.to_dtype(dtype).unwrap());
    }
    let name = match own {
        true => model.to_string(),
        false => folder.file_name().unwrap().to_string_lossy().into_owned(),
    };
    let path = dir.join(format!("{name}_{tag}.safetensors"));
    candle_core::safetensors::save(&out, &path).unwrap();
    if complete && own {
        let bytes = std::fs::read(&path).unwrap();
        assert_eq!(bytes.len() as u64, entry[tag]["bytes"].as_u64().unwrap());
        assert_eq!(fnv1a64(&bytes), entry[tag]["fnv1a64"].as_str().unwrap());
    }
    path
}

/// A deterministic, non-trivial input.
fn ramp(shape: &[usize], scale: f64) -> Tensor {
    let n: usize = shape.iter().product();
    (Tensor::arange(0f32, n as f32, &Device::Cpu)
        .unwrap()
        .affine(0.37, 0.1)
        .unwrap()
        .sin()
        .unwrap()
        * scale)
        .unwrap()
        .reshape(shape)
        .unwrap()
}

/// [`ramp`] on the test device: an input for the models.
fn ramp_on_device(shape: &[usize], scale: f64) -> Tensor {
    ramp(shape, scale).to_device(&support::device()).unwrap()
}

struct Outputs {
    text: Tensor,
    unet: Tensor,
    image: Tensor,
    pixels: Vec<u8>,
}

fn outputs(p: &Pipeline) -> Outputs {
    let text = p
        .text_encoder()
        .encode_prompt("a photo of a cat", 1)
        .unwrap()
        .hidden;
    let x = ramp_on_device(&[1, 4, 8, 8], 1.0);
    let unet = p.unet().forward(&x, 500.0, &text).unwrap();
    let image = p.decode(&ramp_on_device(&[1, 4, 8, 8], 2.0)).unwrap();
    let req = GenerateRequest {
        prompt: "a photo of a cat".into(),
        negative_prompt: "blurry".into(),
        steps: 3,
        width: 64,
        height: 64,
        seed: 42,
        ..GenerateRequest::default()
    };
    let pixels = p.generate(&req, &mut NoObserver).unwrap().pixels;
    Outputs {
        text,
        unet,
        image,
        pixels,
    }
}

/// The same weights through the same code: everything must be bit-identical (tolerance 0).
fn assert_same(a: &Outputs, b: &Outputs) {
    assert_eq!(max_abs_diff(&a.text, &b.text), 0.0);
    assert_eq!(max_abs_diff(&a.unet, &b.unet), 0.0);
    assert_eq!(max_abs_diff(&a.image, &b.image), 0.0);
    assert_eq!(a.pixels, b.pixels);
}

#[test]
fn sd1_single_file_matches_the_diffusers_folder() {
    let dir = tempfile::tempdir().unwrap();
    let folder = outputs(&Pipeline::load(&tiny("sd1"), &opts()).unwrap());
    let path = build("sd1", "fp32", dir.path(), |_| true);
    let single = Pipeline::load_single_file(&path, &opts(), Some(&tiny("sd1"))).unwrap();
    assert_eq!(single.prediction(), PredictionType::Epsilon);
    assert_same(&folder, &outputs(&single));

    // fp16 file into an f32 model: the weights are the folder's rounded to f16 (relative error
    // 2^-11), which moves these outputs (|x| <~ 3) by about 1e-3; 2e-2 leaves room and is still
    // far below a wrong mapping (outputs change by O(1)).
    let path = build("sd1", "fp16", dir.path(), |_| true);
    let half = outputs(&Pipeline::load_single_file(&path, &opts(), Some(&tiny("sd1"))).unwrap());
    assert!(max_abs_diff(&folder.text, &half.text) < 2e-2);
    assert!(max_abs_diff(&folder.unet, &half.unet) < 2e-2);
    assert!(max_abs_diff(&folder.image, &half.image) < 2e-2);
}

#[test]
fn sd2_single_files_match_the_diffusers_folder() {
    // The sd2 folder holds fp16 weights, so both the fp32 and fp16 LDM files carry exactly the
    // same values: tolerance 0. This exercises OpenCLIP's fused in_proj split, the ignored
    // text_projection, linear proj_in/out and the per-block head counts.
    let dir = tempfile::tempdir().unwrap();
    let folder = outputs(&Pipeline::load(&tiny("sd2"), &opts()).unwrap());
    for tag in ["fp32", "fp16"] {
        let path = build("sd2", tag, dir.path(), |_| true);
        let single = Pipeline::load_single_file(&path, &opts(), Some(&tiny("sd2"))).unwrap();
        assert_eq!(single.prediction(), PredictionType::VPrediction);
        assert_same(&folder, &outputs(&single));
    }
}

/// SD1/SD2 files saved with Stability's generative-models names keep the text encoder under
/// `conditioner.embedders.0.`: they are that family, not an SDXL refiner, and draw as the LDM
/// file does (found by review: they were offered as refiners).
#[test]
fn sd1_and_sd2_files_in_sgm_names_load_as_their_family() {
    let dir = tempfile::tempdir().unwrap();
    for (model, family) in [("sd1", ModelFamily::Sd1), ("sd2", ModelFamily::Sd2)] {
        let ldm = build(model, "fp16", dir.path(), |_| true);
        let tensors = candle_core::safetensors::load(&ldm, &Device::Cpu).unwrap();
        let renamed: HashMap<String, Tensor> = tensors
            .into_iter()
            .map(|(name, t)| match name.strip_prefix("cond_stage_model.") {
                Some(rest) => (format!("conditioner.embedders.0.{rest}"), t),
                None => (name, t),
            })
            .collect();
        let sgm = dir.path().join(format!("{model}_sgm.safetensors"));
        candle_core::safetensors::save(&renamed, &sgm).unwrap();
        let info = checkpoint::inspect(&sgm).unwrap();
        assert_eq!(
            (info.family, info.loadable),
            (Some(family), true),
            "{info:?}"
        );
        let want = outputs(&Pipeline::load_single_file(&ldm, &opts(), Some(&tiny(model))).unwrap());
        let got = outputs(&Pipeline::load_single_file(&sgm, &opts(), Some(&tiny(model))).unwrap());
        assert_same(&want, &got);
    }
}

/// ComfyUI's marker tensors: `ztsnr` is seen (the schedule it asks for is
/// `single_file::tests::zero_terminal_snr_marker_sets_the_schedule`); EDM markers (Playground
/// v2.5, CosXL) are listed as unusable with the reason instead of drawing noise.
#[test]
fn marker_tensors_are_read_and_edm_models_refused() {
    let dir = tempfile::tempdir().unwrap();
    let ldm = build("sd1", "fp16", dir.path(), |_| true);
    let with = |markers: &[&str], name: &str| {
        let mut tensors = candle_core::safetensors::load(&ldm, &Device::Cpu).unwrap();
        for m in markers {
            tensors.insert(m.to_string(), Tensor::new(1f32, &Device::Cpu).unwrap());
        }
        let path = dir.path().join(name);
        candle_core::safetensors::save(&tensors, &path).unwrap();
        path
    };
    let info = checkpoint::inspect(with(&["v_pred", "ztsnr"], "zsnr.safetensors")).unwrap();
    assert!(info.zero_terminal_snr && info.loadable);
    assert_eq!(info.prediction, Some(Prediction::VPrediction));
    assert!(!checkpoint::inspect(&ldm).unwrap().zero_terminal_snr);
    for (markers, name) in [
        (&["edm_mean", "edm_std"][..], "playground.safetensors"),
        (&["edm_vpred.sigma_max"][..], "cosxl.safetensors"),
    ] {
        let info = checkpoint::inspect(with(markers, name)).unwrap();
        assert!(!info.loadable, "{name}");
        assert!(info.note.unwrap().contains("EDM"), "{name}");
    }
}

#[test]
fn detection_on_each_fixture() {
    let dir = tempfile::tempdir().unwrap();
    let i = checkpoint::inspect(build("sd1", "fp32", dir.path(), |_| true)).unwrap();
    assert_eq!(
        (
            i.kind,
            i.family,
            i.dtype,
            i.has_unet,
            i.has_text_encoder,
            i.has_vae
        ),
        (
            CheckpointKind::Checkpoint,
            Some(ModelFamily::Sd1),
            WeightDtype::F32,
            true,
            true,
            true
        )
    );
    assert_eq!(
        (i.vae_layout, i.prediction, i.loadable),
        (Some(VaeLayout::Ldm), Some(Prediction::Epsilon), true)
    );
    // The tiny UNet's attn2.to_k is 32 wide, so the family comes from the text-encoder prefix.
    let i = checkpoint::inspect(build("sd2", "fp16", dir.path(), |_| true)).unwrap();
    assert_eq!(
        (i.family, i.dtype),
        (Some(ModelFamily::Sd2), WeightDtype::F16)
    );
    assert_eq!(i.prediction, Some(Prediction::VPrediction));
    assert!(i.note.as_deref().unwrap().contains("v-prediction"));
    // JSON for the model library.
    let json = serde_json::to_value(&i).unwrap();
    assert_eq!(json["kind"], "checkpoint");
    assert_eq!(json["family"], "sd2");

    let no_vae = build("sd1", "fp16", dir.path(), |n| {
        !n.starts_with("first_stage_model.")
    });
    let i = checkpoint::inspect(&no_vae).unwrap();
    assert!(!i.has_vae && !i.loadable, "{i:?}");
    assert!(i.note.unwrap().contains("VAE"));

    for (file, layout, dtype) in [
        ("sd1_vae_ldm.safetensors", VaeLayout::Ldm, WeightDtype::F32),
        (
            "sd2_vae_ldm.fp16.safetensors",
            VaeLayout::Ldm,
            WeightDtype::F16,
        ),
    ] {
        let i = checkpoint::inspect(refs().join(file)).unwrap();
        assert_eq!(
            (i.kind, i.vae_layout, i.dtype),
            (CheckpointKind::Vae, Some(layout), dtype)
        );
    }
    let i =
        checkpoint::inspect(tiny("sd1").join("vae/diffusion_pytorch_model.safetensors")).unwrap();
    assert_eq!(
        (i.kind, i.vae_layout),
        (CheckpointKind::Vae, Some(VaeLayout::Diffusers))
    );
    for lora in ["lora_kohya.safetensors", "lora_peft.safetensors"] {
        assert_eq!(
            checkpoint::inspect(refs().join(lora)).unwrap().kind,
            CheckpointKind::Lora
        );
    }
    let i = checkpoint::inspect(refs().join("tinyemb.safetensors")).unwrap();
    assert_eq!(i.kind, CheckpointKind::TextualInversion);

    // bf16, and the diffusers UNet file alone (not a single-file model).
    let bf = dir.path().join("bf16.safetensors");
    let t = ramp(&[4, 8], 1.0).to_dtype(DType::BF16).unwrap();
    candle_core::safetensors::save(
        &HashMap::from([
            ("model.diffusion_model.out.2.weight".to_string(), t.clone()),
            (
                "cond_stage_model.transformer.text_model.final_layer_norm.weight".to_string(),
                t,
            ),
        ]),
        &bf,
    )
    .unwrap();
    assert_eq!(checkpoint::inspect(&bf).unwrap().dtype, WeightDtype::Bf16);
    let unet = tiny("sd1").join("unet/diffusion_pytorch_model.safetensors");
    assert_eq!(
        checkpoint::inspect(unet).unwrap().kind,
        CheckpointKind::Unknown
    );
}

#[test]
fn separate_vae_files_in_both_layouts() {
    let dir = tempfile::tempdir().unwrap();
    let folder = Pipeline::load(&tiny("sd1"), &opts()).unwrap();
    let z = ramp_on_device(&[1, 4, 8, 8], 2.0);
    let want = folder.decode(&z).unwrap();

    // A checkpoint without its VAE: refused with advice, then loaded with an LDM-layout VAE file.
    let no_vae = build("sd1", "fp32", dir.path(), |n| {
        !n.starts_with("first_stage_model.")
    });
    let err = Pipeline::load_single_file(&no_vae, &opts(), Some(&tiny("sd1"))).unwrap_err();
    assert!(err.to_string().contains("put its VAE beside it"), "{err}");
    let source = ModelSource {
        path: no_vae,
        config: Some(tiny("sd1")),
        vae: Some(refs().join("sd1_vae_ldm.safetensors")),
    };
    let p = Pipeline::load_source(&source, &opts()).unwrap();
    assert_eq!(max_abs_diff(&p.decode(&z).unwrap(), &want), 0.0);

    // A diffusers folder with an LDM VAE file, and a single file with a diffusers-layout VAE.
    let source = ModelSource {
        path: tiny("sd1"),
        config: None,
        vae: Some(refs().join("sd1_vae_ldm.safetensors")),
    };
    let p = Pipeline::load_source(&source, &opts()).unwrap();
    assert_eq!(max_abs_diff(&p.decode(&z).unwrap(), &want), 0.0);
    // Reloading the VAE in another precision (memory options) goes through the same mapping:
    // an f16 pipeline whose VAE is switched to f32 decodes exactly like the f32 folder.
    let half = LoadOptions {
        dtype: DType::F16,
        ..opts()
    };
    let mut p = Pipeline::load_source(&source, &half).unwrap();
    let mut mem = p.memory_options();
    mem.vae_f32 = true;
    p.set_memory_options(mem).unwrap();
    assert_eq!(max_abs_diff(&p.decode(&z).unwrap(), &want), 0.0);

    let source = ModelSource {
        path: build("sd1", "fp16", dir.path(), |n| {
            !n.starts_with("first_stage_model.")
        }),
        config: Some(tiny("sd1")),
        vae: Some(tiny("sd1").join("vae/diffusion_pytorch_model.safetensors")),
    };
    let p = Pipeline::load_source(&source, &opts()).unwrap();
    assert_eq!(max_abs_diff(&p.decode(&z).unwrap(), &want), 0.0);

    // Not a VAE.
    let source = ModelSource {
        path: tiny("sd1"),
        config: None,
        vae: Some(refs().join("tinyemb.safetensors")),
    };
    let err = Pipeline::load_source(&source, &opts()).unwrap_err();
    assert!(err.to_string().contains("not a VAE"), "{err}");
}

#[test]
fn wrong_files_get_a_message_naming_file_problem_and_remedy() {
    let dir = tempfile::tempdir().unwrap();
    let good = std::fs::read(refs().join("sd2_vae_ldm.fp16.safetensors")).unwrap();
    let check = |name: &str, bytes: &[u8], what: &[&str]| {
        let path = dir.path().join(name);
        std::fs::write(&path, bytes).unwrap();
        let err = checkpoint::inspect(&path).unwrap_err();
        let text = err.to_string();
        assert!(
            matches!(&err, EngineError::Weights { path: p, .. } if p == &path),
            "{err:?}"
        );
        assert!(text.contains(name), "{text}");
        assert!(text.contains("download"), "{text}");
        for w in what {
            assert!(text.contains(w), "{name}: {text} lacks {w}");
        }
        // The loader refuses it the same way.
        let err = Pipeline::load_single_file(&path, &opts(), None).unwrap_err();
        assert!(err.to_string().contains(name), "{err}");
    };
    check(
        "truncated.safetensors",
        &good[..good.len() - 100],
        &["truncated"],
    );
    check("header_cut.safetensors", &good[..200], &["truncated"]);
    check("tiny.safetensors", &good[..5], &["5 bytes"]);
    let mut garbled = good.clone();
    garbled[8] = b'[';
    check("garbled.safetensors", &garbled, &["JSON"]);
    let mut huge = good.clone();
    huge[..8].copy_from_slice(&(1u64 << 40).to_le_bytes());
    check(
        "oversized.safetensors",
        &huge,
        &["header claims 1099511627776 bytes"],
    );
    let mut utf = good.clone();
    utf[20] = 0xff;
    check("utf8.safetensors", &utf, &["UTF-8"]);

    // Not a model: a LoRA given as the model.
    let err = Pipeline::load_single_file(&refs().join("lora_kohya.safetensors"), &opts(), None)
        .unwrap_err();
    assert!(err.to_string().contains("LoRA"), "{err}");
    // Pickles are never opened as models.
    let err = Pipeline::load_single_file(&refs().join("pickles/sd1_vae_ldm.ckpt"), &opts(), None)
        .unwrap_err();
    assert!(matches!(err, EngineError::PickleRefused { .. }), "{err}");
}

#[test]
fn pickle_tensors_convert_exactly() {
    let dir = tempfile::tempdir().unwrap();
    let dst = dir.path().join("tensors.safetensors");
    let done = pickle::convert_to_safetensors(&refs().join("pickles/tensors.pt"), &dst).unwrap();
    assert_eq!(done.tensors, 10);
    let got = candle_core::safetensors::load(&dst, &Device::Cpu).unwrap();
    let want = candle_core::safetensors::load(
        refs().join("pickles/tensors_expected.safetensors"),
        &Device::Cpu,
    )
    .unwrap();
    assert_eq!(
        {
            let mut k: Vec<_> = got.keys().collect();
            k.sort();
            k
        },
        {
            let mut k: Vec<_> = want.keys().collect();
            k.sort();
            k
        }
    );
    for (name, w) in &want {
        let g = &got[name];
        assert_eq!((g.dtype(), g.dims()), (w.dtype(), w.dims()), "{name}");
        let f = |t: &Tensor| {
            t.to_dtype(DType::F64)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<f64>()
                .unwrap()
        };
        assert_eq!(f(g), f(w), "{name}");
    }
    // No leftovers beside the output.
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
}

#[test]
fn pickle_checkpoint_converts_to_a_usable_vae() {
    let dir = tempfile::tempdir().unwrap();
    let dst = dir.path().join("vae.safetensors");
    pickle::convert_to_safetensors(&refs().join("pickles/sd1_vae_ldm.ckpt"), &dst).unwrap();
    let i = checkpoint::inspect(&dst).unwrap();
    assert_eq!(
        (i.kind, i.vae_layout, i.dtype),
        (CheckpointKind::Vae, Some(VaeLayout::Ldm), WeightDtype::F16)
    );
    assert_eq!(
        Weights::open(&dst).unwrap().metadata()["global_step"],
        "875000"
    );
    let folder = Pipeline::load(&tiny("sd1"), &opts()).unwrap();
    let p = Pipeline::load_source(
        &ModelSource {
            path: tiny("sd1"),
            config: None,
            vae: Some(dst),
        },
        &opts(),
    )
    .unwrap();
    let z = ramp_on_device(&[1, 4, 8, 8], 2.0);
    // fp16-rounded VAE weights: see the fp16 tolerance note above.
    assert!(max_abs_diff(&p.decode(&z).unwrap(), &folder.decode(&z).unwrap()) < 2e-2);
}

#[test]
fn malicious_pickles_are_refused_without_running_anything() {
    let marker = Path::new("/tmp/ld-engine-pickle-pwned");
    let _ = std::fs::remove_file(marker);
    let dir = tempfile::tempdir().unwrap();
    for (file, global) in [
        // os.system pickles as `posix.system` on Linux, where the fixtures were made, and
        // protocol 2 (torch.save's) writes builtins as Python 2's `__builtin__`.
        ("malicious_system.ckpt", "posix.system"),
        ("malicious_eval.pt", "__builtin__.eval"),
        ("malicious_bare.pkl.bin", "posix.system"),
    ] {
        let src = refs().join("pickles").join(file);
        let dst = dir.path().join("out.safetensors");
        let err = pickle::convert_to_safetensors(&src, &dst).unwrap_err();
        let text = err.to_string();
        assert!(
            text.contains(file) && text.contains(global) && text.contains("run"),
            "{text}"
        );
        assert!(!dst.exists());
        let bytes = std::fs::read(&src).unwrap();
        assert_eq!(
            pickle::inspect_bytes(&bytes),
            Err(pickle::PickleError::Forbidden(global.into()))
        );
    }
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
    assert!(!marker.exists());
}

/// Mutation fuzzing on stable Rust (cargo-fuzz needs nightly and its crates, which this machine
/// cannot download): seeded byte flips, truncations, insertions and header-length edits of the
/// seed corpus, fed to the safetensors validator/classifier and the pickle reader. A panic fails
/// the test. `fuzz_long` (ignored) runs many more: `LD_FUZZ_ITERS=200000 cargo test ... -- --ignored`.
mod fuzz {
    use super::*;

    struct XorShift(u64);
    impl XorShift {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }
        fn below(&mut self, n: usize) -> usize {
            (self.next() % n.max(1) as u64) as usize
        }
    }

    fn seeds() -> (Vec<Vec<u8>>, Vec<Vec<u8>>) {
        let dir = root().join("fuzz/corpus");
        let read = |sub: &str| -> Vec<Vec<u8>> {
            let mut v: Vec<_> = std::fs::read_dir(dir.join(sub))
                .unwrap()
                .map(|e| e.unwrap().path())
                .collect();
            v.sort();
            v.iter().map(|p| std::fs::read(p).unwrap()).collect()
        };
        (read("inspect"), read("pickle"))
    }

    fn mutate(rng: &mut XorShift, seed: &[u8]) -> Vec<u8> {
        let mut b = seed.to_vec();
        for _ in 0..1 + rng.below(4) {
            match rng.below(7) {
                0 if !b.is_empty() => {
                    let i = rng.below(b.len());
                    b[i] ^= 1 << rng.below(8);
                }
                1 if !b.is_empty() => {
                    let i = rng.below(b.len());
                    b[i] = rng.next() as u8;
                }
                2 => {
                    let keep = rng.below(b.len() + 1);
                    b.truncate(keep);
                }
                3 => {
                    let i = rng.below(b.len() + 1);
                    let byte =
                        [b'"', b'{', b'}', b'[', b',', b'0', 0x80, 0x2e, b'(', 0xff][rng.below(10)];
                    b.insert(i, byte);
                }
                4 if b.len() >= 8 => {
                    // The safetensors length field, and torch zip sizes/offsets, are little-endian
                    // integers: push them around.
                    let i = rng.below(b.len() - 7);
                    let v = u64::from_le_bytes(b[i..i + 8].try_into().unwrap());
                    let v = match rng.below(4) {
                        0 => v.wrapping_add(1),
                        1 => v.wrapping_sub(1),
                        2 => u64::MAX - rng.below(16) as u64,
                        _ => rng.next() >> rng.below(64),
                    };
                    b[i..i + 8].copy_from_slice(&v.to_le_bytes());
                }
                5 if b.len() > 2 => {
                    let i = rng.below(b.len() - 1);
                    let n = rng.below((b.len() - i).min(64));
                    let chunk = b[i..i + n].to_vec();
                    let at = rng.below(b.len() + 1);
                    b.splice(at..at, chunk);
                }
                _ => {
                    if !b.is_empty() {
                        let i = rng.below(b.len());
                        b.remove(i);
                    }
                }
            }
        }
        b
    }

    pub(super) fn run(iterations: usize, seed: u64) -> (usize, usize) {
        let (inspect_seeds, pickle_seeds) = seeds();
        assert!(!inspect_seeds.is_empty() && !pickle_seeds.is_empty());
        let mut rng = XorShift(seed);
        let (mut ok_a, mut ok_b) = (0, 0);
        for _ in 0..iterations {
            let s = &inspect_seeds[rng.below(inspect_seeds.len())];
            let input = mutate(&mut rng, s);
            ok_a += usize::from(checkpoint::inspect_bytes(&input).is_ok());
            let s = &pickle_seeds[rng.below(pickle_seeds.len())];
            let input = mutate(&mut rng, s);
            ok_b += usize::from(pickle::tensor_bytes_total(&input).is_ok());
            ok_b += usize::from(pickle::parse(&input).is_ok());
        }
        (ok_a, ok_b)
    }

    #[test]
    fn fuzz_short() {
        // Every seed is valid as is.
        let (a, b) = seeds();
        for s in &a {
            checkpoint::inspect_bytes(s).unwrap();
        }
        assert!(b.iter().any(|s| pickle::inspect_bytes(s).is_ok()));
        let (ok_a, ok_b) = run(3000, 0x5eed);
        // Some mutants must still parse, or the loop only exercises the first check.
        assert!(ok_a > 0 && ok_b > 0, "{ok_a} {ok_b}");
    }

    #[test]
    #[ignore]
    fn fuzz_long() {
        let n = std::env::var("LD_FUZZ_ITERS")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(200_000);
        let seed = std::env::var("LD_FUZZ_SEED")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(1);
        let (a, b) = run(n, seed);
        eprintln!(
            "fuzz_long: {n} iterations, seed {seed}: {a} valid safetensors, {b} valid pickles"
        );
    }
}

// ---- SDXL base and refiner single files (tests/fixtures/refs/single_file_recipe.json "sdxl",
// "sdxl_refiner"; diffusers' StableDiffusionXL(Img2Img)Pipeline.from_single_file read them back
// exactly). The tiny folders hold f16 weights and so do the files: the single file and the
// folder run the same numbers (tolerance 0), and both match diffusers' references with
// tests/sdxl.rs's tolerances (text 1e-4, latents 2e-4 x max(1, |ref|), image 1e-3).

fn sdxl_refs() -> HashMap<String, Tensor> {
    candle_core::safetensors::load(refs().join("sdxl.safetensors"), &Device::Cpu).unwrap()
}

/// refs/sdxl.json's run (see tests/sdxl.rs `request`).
fn sdxl_request() -> GenerateRequest {
    GenerateRequest {
        prompt: "a photo of a cat".into(),
        negative_prompt: "blurry, lowres".into(),
        steps: 4,
        cfg_scale: 5.0,
        width: 64,
        height: 64,
        seed: 42,
        sampler: ld_engine::sampler::SamplerKind::Euler,
        schedule: ld_engine::schedule::ScheduleKind::Leading,
        ..GenerateRequest::default()
    }
}

/// Checks `got` against `want` within `tol`, returning the measured difference.
fn close(what: &str, got: &Tensor, want: &Tensor, tol: f32) -> f32 {
    assert_eq!(got.dims(), want.dims(), "{what}: shape");
    let d = max_abs_diff(&got.to_dtype(DType::F32).unwrap(), want);
    assert!(d <= tol, "{what}: max abs diff {d} > {tol}");
    d
}

fn sdxl_source(model: &str, path: PathBuf) -> ModelSource {
    ModelSource {
        path,
        config: Some(tiny(model)),
        vae: None,
    }
}

#[test]
fn sdxl_single_file_matches_the_folder_and_diffusers() {
    let dir = tempfile::tempdir().unwrap();
    let path = build("sdxl", "fp16", dir.path(), |_| true);
    let single = Pipeline::load_source(&sdxl_source("sdxl", path), &opts()).unwrap();
    let folder = Pipeline::load(&tiny("sdxl"), &opts()).unwrap();
    assert!(single.is_sdxl());
    let r = sdxl_refs();
    let req = sdxl_request();

    let (cond, added) = single.sdxl_conditioning(&req).unwrap();
    let (fcond, fadded) = folder.sdxl_conditioning(&req).unwrap();
    assert_eq!(max_abs_diff(&cond.cond, &fcond.cond), 0.0);
    assert_eq!(max_abs_diff(&added.text_embeds, &fadded.text_embeds), 0.0);
    let mut report = vec![];
    report.push(close(
        "prompt_embeds",
        &cond.cond,
        &r["prompt_embeds"],
        1e-4,
    ));
    report.push(close(
        "negative prompt_embeds",
        cond.uncond.as_ref().unwrap(),
        &r["neg_prompt_embeds"],
        1e-4,
    ));
    let pooled = Tensor::cat(&[&r["neg_pooled"], &r["pooled"]], 0).unwrap();
    report.push(close("pooled", &added.text_embeds, &pooled, 1e-4));

    // The first noise prediction, as tests/sdxl.rs computes it.
    let sigmas = single
        .schedule()
        .sigmas(ld_engine::schedule::ScheduleKind::Leading, req.steps);
    let s = sigmas[0];
    let x = (&r["noise"] * (s / (s * s + 1.0).sqrt())).unwrap();
    let x = Tensor::cat(&[&x, &x], 0)
        .unwrap()
        .to_device(&support::device())
        .unwrap();
    let ctx = Tensor::cat(&[cond.uncond.as_ref().unwrap(), &cond.cond], 0).unwrap();
    let t = single.schedule().sigma_to_t(s);
    let eps = single
        .unet()
        .forward_with(&x, t, &ctx, Some(&added))
        .unwrap();
    let feps = folder
        .unet()
        .forward_with(&x, t, &ctx, Some(&fadded))
        .unwrap();
    assert_eq!(max_abs_diff(&eps, &feps), 0.0);
    report.push(close("first eps", &eps, &r["first_eps"], 1e-4));

    let mut states = Vec::new();
    let latents = single
        .sample_latents(&req, &mut NoObserver, &mut |x, _| states.push(x.clone()))
        .unwrap();
    assert_eq!(states.len(), 5);
    for (i, st) in states.iter().enumerate() {
        let w = r["latents"].get(i).unwrap();
        let tol = 2e-4 * max_abs(&w).max(1.0);
        report.push(close(&format!("latents {i}"), st, &w, tol));
    }
    let image = single.decode(&latents).unwrap();
    report.push(close("image", &image, &r["image"], 1e-3));
    assert_eq!(
        single.generate(&req, &mut NoObserver).unwrap().pixels,
        folder.generate(&req, &mut NoObserver).unwrap().pixels
    );
    eprintln!("sdxl single file vs diffusers, max abs diffs: {report:?}");
}

#[test]
fn sdxl_refiner_single_file_finishes_like_diffusers() {
    let dir = tempfile::tempdir().unwrap();
    let base = build("sdxl", "fp16", dir.path(), |_| true);
    let refiner = build("sdxl_refiner", "fp16", dir.path(), |_| true);
    let mut p = Pipeline::load_source(&sdxl_source("sdxl", base.clone()), &opts()).unwrap();
    p.load_refiner_source(&sdxl_source("sdxl-refiner", refiner.clone()), &opts())
        .unwrap();
    let options = ld_engine::sdxl::SdxlOptions {
        refiner: ld_engine::refiner::RefinerOptions {
            switch_at: 0.5,
            ..Default::default()
        },
        ..Default::default()
    };
    p.set_sdxl_options(options).unwrap();
    let r = sdxl_refs();
    let req = sdxl_request();
    let (cond, added) = p.refiner().unwrap().conditioning(&req, &options).unwrap();
    let mut report = vec![close(
        "refiner prompt_embeds",
        &cond.cond,
        &r["refiner/prompt_embeds"],
        1e-4,
    )];
    let pooled = Tensor::cat(&[&r["refiner/neg_pooled"], &r["refiner/pooled"]], 0).unwrap();
    report.push(close("refiner pooled", &added.text_embeds, &pooled, 1e-4));
    // Aesthetic score ids: the file's index-less refiner gets requires_aesthetics_score from the
    // config folder here, and from the embedded refiner configs without one.
    assert_eq!(
        max_abs_diff(&added.time_ids, &r["refiner/add_time_ids"]),
        0.0
    );
    let mut states = Vec::new();
    let latents = p
        .sample_latents(&req, &mut NoObserver, &mut |x, _| states.push(x.clone()))
        .unwrap();
    for i in 1..3 {
        let w = r["refiner/refiner_latents"].get(i).unwrap();
        let tol = 2e-4 * max_abs(&w).max(1.0);
        report.push(close(
            &format!("refiner latents {i}"),
            &states[2 + i],
            &w,
            tol,
        ));
    }
    let image = p.decode(&latents).unwrap();
    report.push(close("refined image", &image, &r["refiner/image"], 1e-3));
    eprintln!("sdxl refiner single file vs diffusers, max abs diffs: {report:?}");

    // A refiner file is not a model to draw with, nor a base file a refiner.
    let err = Pipeline::load_source(&sdxl_source("sdxl-refiner", refiner), &opts()).unwrap_err();
    assert!(err.to_string().contains("refiner"), "{err}");
    let err = p
        .load_refiner_source(&sdxl_source("sdxl", base), &opts())
        .unwrap_err();
    assert!(err.to_string().contains("not a refiner"), "{err}");
}

#[test]
fn staged_sdxl_file_with_a_refiner_file_draws_like_the_pipeline() {
    // Issue 12: a refiner in a low-memory run loads after the base UNet is freed; the picture is
    // the whole pipeline's, with both models from single files.
    let dir = tempfile::tempdir().unwrap();
    let base = sdxl_source("sdxl", build("sdxl", "fp16", dir.path(), |_| true));
    let refiner = sdxl_source(
        "sdxl-refiner",
        build("sdxl_refiner", "fp16", dir.path(), |_| true),
    );
    let options = ld_engine::refiner::RefinerOptions {
        switch_at: 0.5,
        ..Default::default()
    };
    let mut whole = Pipeline::load_source(&base, &opts()).unwrap();
    whole.load_refiner_source(&refiner, &opts()).unwrap();
    whole
        .set_sdxl_options(ld_engine::sdxl::SdxlOptions {
            refiner: options,
            ..Default::default()
        })
        .unwrap();
    let mut staged = StagedPipeline::open_source(&base, &opts()).unwrap();
    staged.set_refiner(&refiner, options).unwrap();
    let req = sdxl_request();
    assert!(staged.refiner_switch_step(&req).is_some());
    let refined = staged.generate(&req, &mut NoObserver).unwrap();
    assert_eq!(refined, whole.generate(&req, &mut NoObserver).unwrap());
    // The refiner changed the picture: without it the staged run draws something else.
    let alone = StagedPipeline::open_source(&base, &opts()).unwrap();
    assert_ne!(alone.generate(&req, &mut NoObserver).unwrap(), refined);
    // A base file is no refiner, in a staged run as in the pipeline.
    let err = staged.set_refiner(&base, options).unwrap_err();
    assert!(err.to_string().contains("not a refiner"), "{err}");
}

#[test]
fn sdxl_files_are_detected_and_bad_tensors_named() {
    let dir = tempfile::tempdir().unwrap();
    let base = build("sdxl", "fp16", dir.path(), |_| true);
    let i = checkpoint::inspect(&base).unwrap();
    assert_eq!(
        (i.family, i.loadable, i.has_vae),
        (Some(ModelFamily::SdxlBase), true, true)
    );
    let refiner = build("sdxl_refiner", "fp16", dir.path(), |_| true);
    let i = checkpoint::inspect(&refiner).unwrap();
    assert_eq!(
        (i.family, i.loadable),
        (Some(ModelFamily::SdxlRefiner), true)
    );

    // The embedded configs describe the real SDXL: the tiny file's first tensor does not fit,
    // and the message names it in the file's own (LDM) spelling.
    let err = Pipeline::load_single_file(&base, &opts(), None).unwrap_err();
    let text = err.to_string();
    assert!(
        text.contains("conditioner.embedders.0.transformer.text_model.embeddings"),
        "{text}"
    );
    assert!(text.contains("shape"), "{text}");

    for (gone, asked) in [
        (
            "model.diffusion_model.label_emb.0.2.weight",
            "add_embedding.linear_2.weight",
        ),
        (
            "model.diffusion_model.input_blocks.8.1.transformer_blocks.1.attn2.to_k.weight",
            "down_blocks.2.attentions.1.transformer_blocks.1.attn2.to_k.weight",
        ),
        (
            "conditioner.embedders.1.model.transformer.resblocks.2.attn.in_proj_weight",
            "text_model.encoder.layers.2.self_attn.q_proj.weight",
        ),
    ] {
        let path = build("sdxl", "fp16", dir.path(), |n| n != gone);
        let err = Pipeline::load_source(&sdxl_source("sdxl", path), &opts()).unwrap_err();
        let text = err.to_string();
        assert!(
            text.contains(gone) && text.contains(asked) && text.contains("missing"),
            "{text}"
        );
    }
    // Without its VAE: refused with advice, then loaded with the folder's VAE file (diffusers
    // names), which decodes exactly like the folder.
    let no_vae = build("sdxl", "fp16", dir.path(), |n| {
        !n.starts_with("first_stage_model.")
    });
    let err = Pipeline::load_source(&sdxl_source("sdxl", no_vae.clone()), &opts()).unwrap_err();
    assert!(err.to_string().contains("put its VAE beside it"), "{err}");
    let source = ModelSource {
        vae: Some(tiny("sdxl").join("vae/diffusion_pytorch_model.safetensors")),
        ..sdxl_source("sdxl", no_vae)
    };
    let p = Pipeline::load_source(&source, &opts()).unwrap();
    let folder = Pipeline::load(&tiny("sdxl"), &opts()).unwrap();
    let z = ramp_on_device(&[1, 4, 8, 8], 2.0);
    assert_eq!(
        max_abs_diff(&p.decode(&z).unwrap(), &folder.decode(&z).unwrap()),
        0.0
    );

    // Without OpenCLIP's projection there is no pooled output.
    let path = build("sdxl", "fp16", dir.path(), |n| {
        n != "conditioner.embedders.1.model.text_projection"
    });
    let err = Pipeline::load_source(&sdxl_source("sdxl", path), &opts()).unwrap_err();
    assert!(err.to_string().contains("text_projection"), "{err}");
}

/// Some SDXL saves keep OpenCLIP's projection as a Linear weight (`text_projection.weight`,
/// transposed); it pools the text exactly as the usual `text_projection` does (found by review:
/// such files were refused).
#[test]
fn sdxl_files_with_the_projection_as_a_linear_weight_load() {
    let dir = tempfile::tempdir().unwrap();
    let path = build("sdxl", "fp16", dir.path(), |_| true);
    let mut tensors = candle_core::safetensors::load(&path, &Device::Cpu).unwrap();
    let proj = tensors
        .remove("conditioner.embedders.1.model.text_projection")
        .unwrap();
    tensors.insert(
        "conditioner.embedders.1.model.text_projection.weight".into(),
        proj.t().unwrap().contiguous().unwrap(),
    );
    let linear = dir.path().join("linear_projection.safetensors");
    candle_core::safetensors::save(&tensors, &linear).unwrap();
    let info = checkpoint::inspect(&linear).unwrap();
    assert!(info.loadable, "{info:?}");
    let usual = Pipeline::load_source(&sdxl_source("sdxl", path), &opts()).unwrap();
    let file = Pipeline::load_source(&sdxl_source("sdxl", linear), &opts()).unwrap();
    let req = sdxl_request();
    let (_, want) = usual.sdxl_conditioning(&req).unwrap();
    let (_, got) = file.sdxl_conditioning(&req).unwrap();
    assert_eq!(max_abs_diff(&got.text_embeds, &want.text_embeds), 0.0);
}

// ---- Staged runs of single files (`generate`, one model at a time): the models come from the
// same loaders as `Pipeline::load_source`'s and are run by the same code, so the pictures are the
// pipeline's to the byte (tolerance 0).

/// A short guided run: 3 steps of the default sampler (DPM++ 2M) at 64x64.
fn staged_request() -> GenerateRequest {
    GenerateRequest {
        prompt: "a photo of a cat".into(),
        negative_prompt: "blurry".into(),
        steps: 3,
        width: 64,
        height: 64,
        seed: 42,
        ..GenerateRequest::default()
    }
}

/// The staged picture of `req` from `source` under `opts`, checked to be the whole pipeline's.
fn assert_staged_draws_like_whole(
    source: &ModelSource,
    opts: &LoadOptions,
    req: &GenerateRequest,
) -> GeneratedImage {
    let whole = Pipeline::load_source(source, opts)
        .unwrap()
        .generate(req, &mut NoObserver)
        .unwrap();
    let staged = StagedPipeline::open_source(source, opts)
        .unwrap()
        .generate(req, &mut NoObserver)
        .unwrap();
    // Not assert_eq: a failure would print 2 x 12,288 bytes.
    let differing = staged
        .pixels
        .iter()
        .zip(&whole.pixels)
        .filter(|(a, b)| a != b)
        .count();
    assert!(
        staged == whole,
        "{source:?} {:?} {:?} {:?}: {differing} bytes differ",
        opts.dtype,
        opts.half_weights,
        req.negative_prompt
    );
    whole
}

#[test]
fn staged_single_files_draw_exactly_what_the_pipeline_draws() {
    // Issue 12 for the format most users download: SD1 from an fp32 file, SD2 and SDXL base from
    // fp16 files, in f32 weights and in low-memory mode's f16 storage. SDXL also with an empty
    // negative prompt, which its configs say is zero conditioning (`force_zeros_for_empty_prompt`;
    // the file's value must reach the staged encoder, or the guidance half differs).
    let dir = tempfile::tempdir().unwrap();
    let empty_negative = GenerateRequest {
        negative_prompt: String::new(),
        ..staged_request()
    };
    for (model, tag) in [("sd1", "fp32"), ("sd2", "fp16"), ("sdxl", "fp16")] {
        let path = build(model, tag, dir.path(), |_| true);
        assert!(StagedPipeline::supports(&path).unwrap(), "{model}");
        let source = ModelSource {
            path,
            config: Some(tiny(model)),
            vae: None,
        };
        for half_weights in [HalfWeights::Off, HalfWeights::On] {
            let opts = LoadOptions {
                half_weights,
                ..opts()
            };
            assert_staged_draws_like_whole(&source, &opts, &staged_request());
            if model == "sdxl" {
                assert_staged_draws_like_whole(&source, &opts, &empty_negative);
            }
        }
    }
}

#[test]
fn staged_sdxl_file_in_f16_decodes_like_the_pipeline() {
    // The tiny SDXL's VAE says `force_upcast`: under an f16 model both runs decode in f32
    // (`sdxl::vae_dtype`); an f16 VAE would give other pixels.
    let dir = tempfile::tempdir().unwrap();
    let source = sdxl_source("sdxl", build("sdxl", "fp16", dir.path(), |_| true));
    let half = LoadOptions {
        dtype: DType::F16,
        ..opts()
    };
    assert_staged_draws_like_whole(&source, &half, &staged_request());
}

#[test]
fn staged_runs_take_a_separate_vae_file() {
    let dir = tempfile::tempdir().unwrap();
    let req = staged_request();
    // SD1 without its VAE: refused with the pipeline's advice, then drawn with an LDM-layout VAE
    // file; SDXL base without its VAE, with the folder's diffusers-layout file.
    let no_vae = |n: &str| !n.starts_with("first_stage_model.");
    let sd1 = ModelSource {
        path: build("sd1", "fp32", dir.path(), no_vae),
        config: Some(tiny("sd1")),
        vae: None,
    };
    let err = StagedPipeline::open_source(&sd1, &opts()).unwrap_err();
    assert!(err.to_string().contains("put its VAE beside it"), "{err}");
    let sd1 = ModelSource {
        vae: Some(refs().join("sd1_vae_ldm.safetensors")),
        ..sd1
    };
    assert_staged_draws_like_whole(&sd1, &opts(), &req);
    let sdxl = ModelSource {
        vae: Some(tiny("sdxl").join("vae/diffusion_pytorch_model.safetensors")),
        ..sdxl_source("sdxl", build("sdxl", "fp16", dir.path(), no_vae))
    };
    assert_staged_draws_like_whole(&sdxl, &opts(), &req);

    // A diffusers folder with another VAE file (the tiny SD2's, LDM names, same config): drawn
    // with that VAE, as the pipeline does, not with the folder's own.
    let folder = ModelSource {
        path: tiny("sd1"),
        config: None,
        vae: Some(refs().join("sd2_vae_ldm.fp16.safetensors")),
    };
    let other_vae = assert_staged_draws_like_whole(&folder, &opts(), &req);
    let own_vae = StagedPipeline::open(&tiny("sd1"), &opts())
        .unwrap()
        .generate(&req, &mut NoObserver)
        .unwrap();
    assert_ne!(other_vae.pixels, own_vae.pixels);
    let not_a_vae = ModelSource {
        vae: Some(refs().join("tinyemb.safetensors")),
        ..folder
    };
    let err = StagedPipeline::open_source(&not_a_vae, &opts()).unwrap_err();
    assert!(err.to_string().contains("not a VAE"), "{err}");
}

#[test]
fn only_base_checkpoints_are_staged() {
    let dir = tempfile::tempdir().unwrap();
    // An SDXL refiner file draws nothing on its own: left to the pipeline, and refused with the
    // pipeline's words when opened anyway.
    let refiner = build("sdxl_refiner", "fp16", dir.path(), |_| true);
    assert!(!StagedPipeline::supports(&refiner).unwrap());
    let source = sdxl_source("sdxl-refiner", refiner);
    let staged = StagedPipeline::open_source(&source, &opts()).unwrap_err();
    let whole = Pipeline::load_source(&source, &opts()).unwrap_err();
    assert!(staged.to_string().contains("SDXL refiner"), "{staged}");
    assert_eq!(staged.to_string(), whole.to_string());
    assert!(StagedPipeline::supports(&build("sdxl", "fp16", dir.path(), |_| true)).unwrap());
    // Files that are no whole model (`check_checkpoint` refuses them): the pipeline's load
    // explains, so `supports` sends them there.
    for file in [
        refs().join("pickles/sd1_vae_ldm.ckpt"),
        refs().join("sd1_vae_ldm.safetensors"),
        refs().join("lora_kohya.safetensors"),
        refs().join("tinyemb.safetensors"),
    ] {
        assert!(!StagedPipeline::supports(&file).unwrap(), "{file:?}");
    }
}

// ---- LoRAs on single-file models: the same layers get the same updates as in the folder.

#[test]
fn loras_merge_into_a_single_file_like_into_the_folder() {
    use ld_engine::lora::LoraSpec;
    let dir = tempfile::tempdir().unwrap();
    let path = build("sd1", "fp32", dir.path(), |_| true);
    let source = ModelSource {
        path,
        config: Some(tiny("sd1")),
        vae: None,
    };
    let plain = outputs(&Pipeline::load_source(&source, &opts()).unwrap());
    // diffusers/PEFT names (`unet.down_blocks...lora_A`) and Kohya names (`lora_unet_down_...`)
    // of the same adapters (tests/fixtures/make_prompt_refs.py).
    for file in ["lora_peft.safetensors", "lora_kohya.safetensors"] {
        let spec = vec![LoraSpec::new(refs().join(file), 0.7)];
        let folder = Pipeline::load_with_loras(&tiny("sd1"), &opts(), &spec).unwrap();
        let single = Pipeline::load_source_with_loras(&source, &opts(), &spec).unwrap();
        assert!(
            single.lora_warnings().is_empty(),
            "{:?}",
            single.lora_warnings()
        );
        assert_eq!(single.loras(), &spec[..]);
        let (f, s) = (outputs(&folder), outputs(&single));
        // Same weights, same f32 merge: bit-identical.
        assert_same(&f, &s);
        // And the LoRA did something (UNet and text encoder alike).
        assert!(max_abs_diff(&s.unet, &plain.unet) > 1e-2, "{file}");
        assert!(max_abs_diff(&s.text, &plain.text) > 1e-2, "{file}");
    }
}

/// A rank-2 LoRA for the tiny SDXL, written twice: diffusers/PEFT names, and Kohya names as
/// sd-scripts writes SDXL LoRAs (UNet layers by their original LDM path, both text encoders by
/// transformers path). The LDM paths are spelled out here by hand from the SDXL layout (tiny:
/// 2 layers per block, so down block 1 starts at input_blocks.4; up block 0 is output_blocks
/// 0-2; the mid attention is middle_block.1), not derived from the engine's map.
fn sdxl_loras(dir: &Path) -> (PathBuf, PathBuf) {
    let modules = [
        // (component, diffusers layer, kohya name)
        (
            "unet",
            "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q",
            "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q",
        ),
        (
            "unet",
            "up_blocks.0.resnets.1.conv1",
            "lora_unet_output_blocks_1_0_in_layers_2",
        ),
        (
            "unet",
            "mid_block.attentions.0.proj_in",
            "lora_unet_middle_block_1_proj_in",
        ),
        ("unet", "add_embedding.linear_1", "lora_unet_label_emb_0_0"),
        (
            "text_encoder",
            "text_model.encoder.layers.0.self_attn.q_proj",
            "lora_te1_text_model_encoder_layers_0_self_attn_q_proj",
        ),
        (
            "text_encoder_2",
            "text_model.encoder.layers.1.self_attn.k_proj",
            "lora_te2_text_model_encoder_layers_1_self_attn_k_proj",
        ),
    ];
    let mut dotted = HashMap::new();
    let mut kohya = HashMap::new();
    for (k, (comp, layer, kname)) in modules.iter().enumerate() {
        let w = Weights::open_all(&weight_files_in(&tiny("sdxl").join(comp)).unwrap()).unwrap();
        let stored = layer
            .strip_prefix("text_model.")
            .filter(|_| *comp == "text_encoder");
        let shape = w
            .shape(&format!("{}.weight", stored.unwrap_or(layer)))
            .unwrap_or_else(|| panic!("{comp} {layer}"))
            .to_vec();
        let rest: usize = shape[1..].iter().product();
        let mut down_shape = vec![2];
        down_shape.extend_from_slice(&shape[1..]);
        let mut up_shape = vec![shape[0], 2];
        up_shape.extend(std::iter::repeat_n(1, shape.len() - 2));
        let down = ramp(&[2, rest], 0.4 + 0.1 * k as f64)
            .reshape(down_shape)
            .unwrap();
        let up = ramp(&[shape[0], 2], 0.5).reshape(up_shape).unwrap();
        dotted.insert(format!("{comp}.{layer}.lora_A.weight"), down.clone());
        dotted.insert(format!("{comp}.{layer}.lora_B.weight"), up.clone());
        kohya.insert(format!("{kname}.lora_down.weight"), down);
        kohya.insert(format!("{kname}.lora_up.weight"), up);
        // alpha = rank: scale 1, what diffusers assumes for the alpha-less dotted file.
        kohya.insert(
            format!("{kname}.alpha"),
            Tensor::new(2f32, &Device::Cpu).unwrap(),
        );
    }
    let (a, b) = (
        dir.join("xl_peft.safetensors"),
        dir.join("xl_kohya.safetensors"),
    );
    candle_core::safetensors::save(&dotted, &a).unwrap();
    candle_core::safetensors::save(&kohya, &b).unwrap();
    (a, b)
}

#[test]
fn sdxl_loras_in_both_namings_merge_into_folder_and_file_alike() {
    use ld_engine::lora::LoraSpec;
    let dir = tempfile::tempdir().unwrap();
    let file = build("sdxl", "fp16", dir.path(), |_| true);
    let source = sdxl_source("sdxl", file);
    let (peft, kohya) = sdxl_loras(dir.path());
    let req = sdxl_request();
    let probe = |p: &Pipeline| {
        let (c, a) = p.sdxl_conditioning(&req).unwrap();
        let x = ramp_on_device(&[2, 4, 8, 8], 1.0);
        let ctx = Tensor::cat(&[c.uncond.as_ref().unwrap(), &c.cond], 0).unwrap();
        let eps = p.unet().forward_with(&x, 500.0, &ctx, Some(&a)).unwrap();
        (c.cond, a.text_embeds, eps)
    };
    let plain = probe(&Pipeline::load_source(&source, &opts()).unwrap());
    let mut runs = Vec::new();
    for lora in [&peft, &kohya] {
        let spec = vec![LoraSpec::new(lora, 1.0)];
        let folder = Pipeline::load_with_loras(&tiny("sdxl"), &opts(), &spec).unwrap();
        let single = Pipeline::load_source_with_loras(&source, &opts(), &spec).unwrap();
        for p in [&folder, &single] {
            assert!(
                p.lora_warnings().is_empty(),
                "{lora:?}: {:?}",
                p.lora_warnings()
            );
        }
        runs.push(probe(&folder));
        runs.push(probe(&single));
    }
    for r in &runs[1..] {
        assert_eq!(max_abs_diff(&r.0, &runs[0].0), 0.0);
        assert_eq!(max_abs_diff(&r.1, &runs[0].1), 0.0);
        assert_eq!(max_abs_diff(&r.2, &runs[0].2), 0.0);
    }
    // Every encoder and the UNet changed: te1 and te2 states, the pooled output (te2), eps.
    let (c, pooled, eps) = &runs[0];
    assert!(
        max_abs_diff(
            &c.narrow(2, 0, 8).unwrap(),
            &plain.0.narrow(2, 0, 8).unwrap()
        ) > 1e-3
    );
    assert!(
        max_abs_diff(
            &c.narrow(2, 8, 12).unwrap(),
            &plain.0.narrow(2, 8, 12).unwrap()
        ) > 1e-3
    );
    assert!(max_abs_diff(pooled, &plain.1) > 1e-3);
    assert!(max_abs_diff(eps, &plain.2) > 1e-3);
}

#[test]
fn mapped_names_of_a_single_file_are_the_folder_names() {
    // LoRA matching sees a single file through the inverse of the LDM renaming; it must give
    // exactly the diffusers folder's tensor names and shapes, or LoRA modules would be dropped.
    use ld_engine::ldm_names::{ClipNames, MappedNames, NameMap, OpenClipNames, UnetNames};
    use ld_engine::lora::LayerIndex;
    use std::sync::Arc;
    let dir = tempfile::tempdir().unwrap();
    let cases: [(&str, &str, &str); 2] = [
        ("sdxl", "sdxl", "conditioner.embedders.1.model."),
        (
            "sdxl_refiner",
            "sdxl-refiner",
            "conditioner.embedders.0.model.",
        ),
    ];
    for (model, folder, bigg) in cases {
        let file = Weights::open(build(model, "fp16", dir.path(), |_| true)).unwrap();
        let cfg =
            ld_engine::unet::UNetConfig::from_file(&tiny(folder).join("unet/config.json")).unwrap();
        let prefix = "model.diffusion_model.";
        let mut maps: Vec<(&str, Arc<dyn NameMap>, String)> = vec![
            (
                "unet",
                Arc::new(UnetNames::new(&cfg, prefix)),
                prefix.into(),
            ),
            (
                "text_encoder_2",
                Arc::new(OpenClipNames::new(bigg, true)),
                bigg.into(),
            ),
        ];
        if model == "sdxl" {
            let p = "conditioner.embedders.0.transformer.";
            maps.push(("text_encoder", Arc::new(ClipNames::new(p)), p.into()));
        }
        for (comp, names, prefix) in maps {
            let index = MappedNames::new(&file, names, &prefix);
            let want =
                Weights::open_all(&weight_files_in(&tiny(folder).join(comp)).unwrap()).unwrap();
            // transformers 5 saved the tiny CLIP-L without `text_model.`; LDM files have it.
            let norm = |n: &str| n.strip_prefix("text_model.").unwrap_or(n).to_string();
            let mut got: Vec<(String, Vec<usize>)> = index
                .layer_names()
                .into_iter()
                .map(|n| (norm(&n), index.layer_shape(&n).unwrap()))
                .collect();
            let mut expected: Vec<(String, Vec<usize>)> = want
                .names()
                .map(|n| (norm(n), want.shape(n).unwrap().to_vec()))
                .collect();
            got.sort();
            expected.sort();
            assert_eq!(got, expected, "{model} {comp}");
        }
    }
}
