//! TorchRng against PyTorch: `torch.manual_seed(s); torch.randn(shape)` from
//! tests/fixtures/refs/noise.safetensors, and PhiloxRng against A1111's "NV" source
//! (`modules/rng_philox.py`) from refs/philox.safetensors (both made by
//! tests/fixtures/make_noise_refs.py).
//!
//! Tolerance: none. Every value must have the same f32 bit pattern as the reference, because the
//! point of the generators is that a seed copied from another app gives the same image.

use std::collections::HashMap;
use std::path::PathBuf;

use candle_core::{Device, Tensor};
use ld_engine::rng::{NoiseSource, PhiloxRng, SeedSource, TorchRng};

fn refs() -> HashMap<String, Tensor> {
    load("noise.safetensors")
}

fn load(name: &str) -> HashMap<String, Tensor> {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures/refs")
        .join(name);
    candle_core::safetensors::load(&path, &Device::Cpu).expect("reference file loads")
}

fn parse_shape(s: &str) -> Vec<usize> {
    s.split('x').map(|d| d.parse().unwrap()).collect()
}

/// One generator's calls: (call index, shape, expected values).
type Calls<'a> = Vec<(usize, Vec<usize>, &'a Tensor)>;

/// Compares bit patterns and reports the first mismatch with its index.
fn assert_bitwise(name: &str, got: &[f32], want: &Tensor) {
    let want: Vec<f32> = want.flatten_all().unwrap().to_vec1().unwrap();
    assert_eq!(got.len(), want.len(), "{name}: length");
    let mismatches: Vec<usize> = (0..got.len())
        .filter(|&i| got[i].to_bits() != want[i].to_bits())
        .collect();
    if let Some(&i) = mismatches.first() {
        panic!(
            "{name}: {} of {} values differ; first at {i}: got {:e}, torch {:e}",
            mismatches.len(),
            got.len(),
            got[i],
            want[i]
        );
    }
}

#[test]
fn single_calls_match_torch_bitwise() {
    let refs = refs();
    let mut checked = 0;
    for (name, want) in &refs {
        let Some(rest) = name.strip_prefix("randn/s") else {
            continue;
        };
        let (seed, shape) = rest.split_once('/').unwrap();
        let shape = parse_shape(shape);
        assert_eq!(want.dims(), shape.as_slice(), "{name}: stored shape");
        let got = TorchRng::new(seed.parse().unwrap()).randn(&shape);
        assert_bitwise(name, &got, want);
        checked += 1;
    }
    assert_eq!(checked, 88, "reference tensors found");
}

#[test]
fn call_sequences_match_torch_bitwise() {
    let refs = refs();
    let mut sequences: HashMap<u64, Calls> = HashMap::new();
    for (name, want) in &refs {
        let Some(rest) = name.strip_prefix("seq/s") else {
            continue;
        };
        let parts: Vec<&str> = rest.split('/').collect();
        sequences
            .entry(parts[0].parse().unwrap())
            .or_default()
            .push((parts[1].parse().unwrap(), parse_shape(parts[2]), want));
    }
    assert_eq!(sequences.len(), 3);
    for (seed, mut calls) in sequences {
        calls.sort_by_key(|c| c.0);
        let mut rng = TorchRng::new(seed);
        for (i, shape, want) in calls {
            let got = rng.randn(&shape);
            assert_bitwise(&format!("seed {seed} call {i} {shape:?}"), &got, want);
        }
    }
}

#[test]
fn randn_tensor_has_the_shape_and_values() {
    let t = TorchRng::new(42)
        .randn_tensor(&[1, 4, 8, 8], &Device::Cpu)
        .unwrap();
    assert_eq!(t.dims(), &[1, 4, 8, 8]);
    let flat: Vec<f32> = t.flatten_all().unwrap().to_vec1().unwrap();
    assert_eq!(flat, TorchRng::new(42).randn(&[1, 4, 8, 8]));
}

#[test]
fn philox_matches_a1111_nv_source_bitwise() {
    let refs = load("philox.safetensors");
    let mut single = 0;
    let mut sequences: HashMap<u64, Calls> = HashMap::new();
    for (name, want) in &refs {
        if let Some(rest) = name.strip_prefix("philox/s") {
            let (seed, shape) = rest.split_once('/').unwrap();
            let shape = parse_shape(shape);
            let got = PhiloxRng::new(seed.parse().unwrap()).randn(&shape);
            assert_bitwise(name, &got, want);
            single += 1;
        } else if let Some(rest) = name.strip_prefix("philoxseq/s") {
            let parts: Vec<&str> = rest.split('/').collect();
            sequences
                .entry(parts[0].parse().unwrap())
                .or_default()
                .push((parts[1].parse().unwrap(), parse_shape(parts[2]), want));
        }
    }
    assert_eq!(single, 42, "reference tensors found");
    assert_eq!(sequences.len(), 2);
    for (seed, mut calls) in sequences {
        calls.sort_by_key(|c| c.0);
        // Through SeedSource, as the pipeline makes it.
        let mut rng = SeedSource::Nv.generator(seed);
        for (i, shape, want) in calls {
            let got = rng.randn(&shape);
            assert_bitwise(
                &format!("philox seed {seed} call {i} {shape:?}"),
                &got,
                want,
            );
        }
    }
}
