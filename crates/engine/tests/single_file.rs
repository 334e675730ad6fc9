//! Single-file checkpoints (issue 7, "Formats"): validation, detection, loading SD1/SD2 LDM
//! checkpoints and separate VAE files, and the pickle reader. Fixtures from
//! tests/fixtures/make_single_file_refs.py (see tests/fixtures/README.md): the whole checkpoints
//! are rebuilt here from `refs/single_file_recipe.json` and the tiny diffusers folders, and must
//! hash to what the script built and diffusers' `from_single_file` read back exactly.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use ld_engine::checkpoint::{
    self, CheckpointKind, ModelFamily, Prediction, VaeLayout, WeightDtype,
};
use ld_engine::config::{weight_files_in, PredictionType};
use ld_engine::pickle;
use ld_engine::pipeline::{GenerateRequest, LoadOptions, NoObserver, Pipeline};
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

fn opts() -> LoadOptions {
    LoadOptions {
        device: Device::Cpu,
        dtype: DType::F32,
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

/// Rebuilds the LDM checkpoint of `model` (`sd1`/`sd2`) in `tag` (`fp32`/`fp16`) from the
/// recipe, leaving out names for which `keep` is false, and checks it is byte-identical to the
/// file the fixture script validated with diffusers (when nothing is left out).
fn build(model: &str, tag: &str, dir: &Path, keep: impl Fn(&str) -> bool) -> PathBuf {
    let recipe: serde_json::Value =
        serde_json::from_slice(&std::fs::read(refs().join("single_file_recipe.json")).unwrap())
            .unwrap();
    let entry = &recipe[model];
    let dtype = if tag == "fp16" {
        DType::F16
    } else {
        DType::F32
    };
    let comps: HashMap<&str, Weights> = ["unet", "vae", "text_encoder"]
        .into_iter()
        .map(|c| {
            let files = weight_files_in(&tiny(model).join(c)).unwrap();
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
            z if z.starts_with("zeros:") => {
                let dims: Vec<usize> = z[6..].split(',').map(|d| d.parse().unwrap()).collect();
                Tensor::zeros(dims, DType::F32, &Device::Cpu).unwrap()
            }
            other => panic!("unknown op {other}"),
        };
        out.insert(name.to_string(), t.to_dtype(dtype).unwrap());
    }
    let path = dir.join(format!("{model}_{tag}.safetensors"));
    candle_core::safetensors::save(&out, &path).unwrap();
    if complete {
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

fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
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
    let x = ramp(&[1, 4, 8, 8], 1.0);
    let unet = p.unet().forward(&x, 500.0, &text).unwrap();
    let image = p.decode(&ramp(&[1, 4, 8, 8], 2.0)).unwrap();
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
    assert_eq!(max_diff(&a.text, &b.text), 0.0);
    assert_eq!(max_diff(&a.unet, &b.unet), 0.0);
    assert_eq!(max_diff(&a.image, &b.image), 0.0);
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
    assert!(max_diff(&folder.text, &half.text) < 2e-2);
    assert!(max_diff(&folder.unet, &half.unet) < 2e-2);
    assert!(max_diff(&folder.image, &half.image) < 2e-2);
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
    let z = ramp(&[1, 4, 8, 8], 2.0);
    let want = folder.decode(&z).unwrap();

    // A checkpoint without its VAE: refused with advice, then loaded with an LDM-layout VAE file.
    let no_vae = build("sd1", "fp32", dir.path(), |n| {
        !n.starts_with("first_stage_model.")
    });
    let err = Pipeline::load_single_file(&no_vae, &opts(), Some(&tiny("sd1"))).unwrap_err();
    assert!(err.to_string().contains("separate VAE"), "{err}");
    let source = ModelSource {
        path: no_vae,
        config: Some(tiny("sd1")),
        vae: Some(refs().join("sd1_vae_ldm.safetensors")),
    };
    let p = Pipeline::load_source(&source, &opts()).unwrap();
    assert_eq!(max_diff(&p.decode(&z).unwrap(), &want), 0.0);

    // A diffusers folder with an LDM VAE file, and a single file with a diffusers-layout VAE.
    let source = ModelSource {
        path: tiny("sd1"),
        config: None,
        vae: Some(refs().join("sd1_vae_ldm.safetensors")),
    };
    let p = Pipeline::load_source(&source, &opts()).unwrap();
    assert_eq!(max_diff(&p.decode(&z).unwrap(), &want), 0.0);
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
    assert_eq!(max_diff(&p.decode(&z).unwrap(), &want), 0.0);

    let source = ModelSource {
        path: build("sd1", "fp16", dir.path(), |n| {
            !n.starts_with("first_stage_model.")
        }),
        config: Some(tiny("sd1")),
        vae: Some(tiny("sd1").join("vae/diffusion_pytorch_model.safetensors")),
    };
    let p = Pipeline::load_source(&source, &opts()).unwrap();
    assert_eq!(max_diff(&p.decode(&z).unwrap(), &want), 0.0);

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
    let z = ramp(&[1, 4, 8, 8], 2.0);
    // fp16-rounded VAE weights: see the fp16 tolerance note above.
    assert!(max_diff(&p.decode(&z).unwrap(), &folder.decode(&z).unwrap()) < 2e-2);
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
