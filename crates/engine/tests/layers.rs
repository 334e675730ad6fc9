//! The convolution, group-norm, linear and attention layers on the test device (their CPU kernels, or on
//! a GPU the cuDNN call and the NVRTC group-norm and attention kernels) against candle's plain
//! ops run on the CPU in f32 from the same inputs.

use std::collections::HashMap;

use candle_core::{DType, Device, Module, Tensor};
use candle_nn::VarBuilder;
use ld_engine::attention::{
    scaled_dot_product_attention, uses_gpu_kernel, AttentionOptions, FeedForward,
};
use ld_engine::linear::Linear;
use ld_engine::resnet::{Conv2d, GroupNorm};

use crate::support::{device, max_abs, max_abs_diff, on_gpu};

/// Weights named as the layers load them, on `dev` in `dtype`.
fn vars(tensors: &[(&str, &Tensor)], dtype: DType, dev: &Device) -> VarBuilder<'static> {
    let map: HashMap<String, Tensor> = tensors
        .iter()
        .map(|(k, t)| (k.to_string(), (*t).clone()))
        .collect();
    VarBuilder::from_tensors(map, dtype, dev)
}

/// Seeded normal values ([`ld_engine::rng::seeded_normal`]).
fn randn(seed: u64, mean: f64, std: f64, shape: &[usize]) -> Tensor {
    ld_engine::rng::seeded_normal(seed, mean, std, shape).unwrap()
}

/// `t` rounded through `dtype` (so a reference sees exactly the inputs the layer saw).
fn rounded(t: &Tensor, dtype: DType) -> Tensor {
    t.to_dtype(dtype).unwrap().to_dtype(DType::F32).unwrap()
}

#[test]
fn convolutions_match_candles_on_the_cpu() {
    let dev = device();
    let cpu = Device::Cpu;
    // (c_in, c_out, kernel, stride, padding, batch, h, w): the UNet's 3x3, its stride-2
    // downsampler and its 1x1 shortcut, at odd sizes. 64 input channels make 576 products per
    // output: f16 accumulation would miss the f16 bound below by several times.
    for &(cin, cout, k, stride, pad, n, h, w) in &[
        (64, 32, 3, 1, 1, 2, 13, 9),
        (64, 64, 3, 2, 1, 1, 12, 7),
        (64, 48, 1, 1, 0, 2, 5, 6),
    ] {
        let x = randn(1, 0., 1., &[n, cin, h, w]);
        let wt = randn(2, 0., 0.1, &[cout, cin, k, k]);
        let b = randn(3, 0., 1., &[cout]);
        // f16 only on a GPU: on the CPU, half-precision convolutions are candle's own.
        let dtypes: &[DType] = if on_gpu() {
            &[DType::F32, DType::F16]
        } else {
            &[DType::F32]
        };
        for &dtype in dtypes {
            let (xr, wr, br) = (rounded(&x, dtype), rounded(&wt, dtype), rounded(&b, dtype));
            let want = xr
                .conv2d(&wr, pad, stride, 1, 1)
                .unwrap()
                .broadcast_add(&br.reshape((1, cout, 1, 1)).unwrap())
                .unwrap();
            let vb = vars(&[("weight", &wt), ("bias", &b)], dtype, &dev);
            let conv = Conv2d::load(vb, cin, cout, k, stride, pad).unwrap();
            let got = conv
                .forward(&x.to_dtype(dtype).unwrap().to_device(&dev).unwrap())
                .unwrap();
            let diff = max_abs_diff(&got.to_device(&cpu).unwrap(), &want);
            // f32: summation order only. f16: the output's own rounding (2^-11 relative) plus
            // f32 accumulation; f16 accumulation measured several times this.
            let bound = match dtype {
                DType::F32 => 1e-4 * max_abs(&want).max(1.0),
                _ => 1.5e-3 * max_abs(&want),
            };
            assert!(
                diff <= bound,
                "{k}x{k} stride {stride} conv, {dtype:?}: differs by {diff} (bound {bound})"
            );
        }
    }
}

#[test]
fn group_norms_match_candles_on_the_cpu() {
    let dev = device();
    let cpu = Device::Cpu;
    // (batch, channels, groups, h, w): SD's 32 groups of 2 channels, and one large enough
    // (6400 values per channel) for the GPU kernels to split a channel between blocks.
    for &(n, c, groups, h, w) in &[(2, 64, 32, 6, 5), (1, 8, 2, 80, 80)] {
        // A mean far from zero: a one-pass variance in f32 would lose most of its digits.
        let x = (randn(4, 0., 1., &[n, c, h, w]) + 30.0).unwrap();
        let wt = randn(5, 1., 0.3, &[c]);
        let b = randn(6, 0., 0.3, &[c]);
        let shift = randn(7, 0., 2., &[n, c]);
        let dtypes: &[DType] = if on_gpu() {
            &[DType::F32, DType::F16]
        } else {
            &[DType::F32]
        };
        for &dtype in dtypes {
            let (xr, wr, br, sr) = (
                rounded(&x, dtype),
                rounded(&wt, dtype),
                rounded(&b, dtype),
                rounded(&shift, dtype),
            );
            let norm = candle_nn::GroupNorm::new(wr, br, c, groups, 1e-5).unwrap();
            let plain = norm.forward(&xr).unwrap();
            let shifted = norm
                .forward(
                    &xr.broadcast_add(&sr.reshape((n, c, 1, 1)).unwrap())
                        .unwrap(),
                )
                .unwrap()
                .silu()
                .unwrap();
            let vb = vars(&[("weight", &wt), ("bias", &b)], dtype, &dev);
            let layer = GroupNorm::load(vb, groups, c, 1e-5).unwrap();
            let xd = x.to_dtype(dtype).unwrap().to_device(&dev).unwrap();
            let sd = shift.to_dtype(dtype).unwrap().to_device(&dev).unwrap();
            let got_plain = layer.forward(&xd).unwrap().to_device(&cpu).unwrap();
            let got_shifted = layer
                .forward_shifted_silu(&xd, &sd)
                .unwrap()
                .to_device(&cpu)
                .unwrap();
            // Normalised outputs are O(1); f16: the output's own rounding (values up to ~4,
            // so up to 2e-3) over the f32 computation.
            let bound = if dtype == DType::F32 { 1e-4 } else { 6e-3 };
            for (what, got, want) in [
                ("plain", &got_plain, &plain),
                ("shifted + SiLU", &got_shifted, &shifted),
            ] {
                let diff = max_abs_diff(got, want);
                assert!(
                    diff <= bound,
                    "group norm {what}, {c} channels in {groups} groups at {h}x{w}, {dtype:?}: \
                     differs by {diff} (bound {bound})"
                );
            }
        }
    }
}

#[test]
fn attention_matches_textbook_attention_on_the_cpu() {
    let dev = device();
    let cpu = Device::Cpu;
    // (batch, queries, keys, heads, head size): SD 1.x's 40/80/160-wide heads and SD 2.x /
    // SDXL's 64, a cross-attention over 77 prompt tokens, and query and key counts that do not
    // fill the GPU kernel's 64-row tiles.
    for &(b, sq, sk, heads, d) in &[
        (2, 100, 77, 2, 40),
        (1, 200, 200, 3, 64),
        (1, 70, 130, 1, 160),
        (2, 64, 64, 2, 80),
    ] {
        // Queries three times larger than unit scores: peaked rows, where a softmax that does
        // not subtract its running maximum correctly goes wrong.
        let q = randn(8, 0., 3., &[b, sq, heads * d]);
        let k = randn(9, 0., 1., &[b, sk, heads * d]);
        let v = randn(10, 0., 1., &[b, sk, heads * d]);
        let scale = 1.0 / (d as f64).sqrt();
        // Half precision only on a GPU: there it is the fused kernel's (Ampere or newer).
        let dtypes: &[DType] = if on_gpu() {
            &[DType::F32, DType::F16, DType::BF16]
        } else {
            &[DType::F32]
        };
        for &dtype in dtypes {
            let (qr, kr, vr) = (rounded(&q, dtype), rounded(&k, dtype), rounded(&v, dtype));
            let want = scaled_dot_product_attention(
                &qr,
                &kr,
                &vr,
                heads,
                scale,
                false,
                &AttentionOptions::plain(),
            )
            .unwrap();
            let on = |t: &Tensor| t.to_dtype(dtype).unwrap().to_device(&dev).unwrap();
            let (qd, kd, vd) = (on(&q), on(&k), on(&v));
            if dtype != DType::F32 && std::env::var_os("LD_GPU_ATTN").is_none() {
                assert!(
                    uses_gpu_kernel(&qd, &kd, &vd, heads),
                    "{dtype:?} attention with {d}-wide heads should take the fused GPU kernel"
                );
            }
            let got = scaled_dot_product_attention(
                &qd,
                &kd,
                &vd,
                heads,
                scale,
                false,
                &AttentionOptions::default(),
            )
            .unwrap()
            .to_device(&cpu)
            .unwrap();
            // Outputs are averages of values of size ~1-4. f16: the probabilities' and the
            // output's rounding (2^-11 relative); bf16 the same at 2^-8.
            let bound = match dtype {
                DType::F32 => 1e-4,
                DType::F16 => 4e-3,
                _ => 3e-2,
            };
            let diff = max_abs_diff(&got, &want);
            assert!(
                diff <= bound,
                "attention {b}x{sq} queries, {sk} keys, {heads} heads of {d}, {dtype:?}: \
                 differs by {diff} (bound {bound})"
            );
        }
    }
}

#[test]
fn linear_layers_match_candles_on_the_cpu() {
    let dev = device();
    let cpu = Device::Cpu;
    // (batch, tokens, in, out, bias): a transformer projection with and without a bias, and a
    // 2-D input; 320 inputs per output make f16 accumulation miss the f16 bound.
    for &(b, n, cin, cout, bias) in &[
        (2, 37, 320, 64, true),
        (2, 37, 320, 48, false),
        (0, 9, 320, 40, true),
    ] {
        let shape: Vec<usize> = if b == 0 {
            vec![n, cin]
        } else {
            vec![b, n, cin]
        };
        let x = randn(11, 0., 1., &shape);
        let wt = randn(12, 0., 0.1, &[cout, cin]);
        let bv = randn(13, 0., 1., &[cout]);
        let dtypes: &[DType] = if on_gpu() {
            &[DType::F32, DType::F16, DType::BF16]
        } else {
            &[DType::F32]
        };
        for &dtype in dtypes {
            let (xr, wr, br) = (rounded(&x, dtype), rounded(&wt, dtype), rounded(&bv, dtype));
            let want = xr.broadcast_matmul(&wr.t().unwrap()).unwrap();
            let want = if bias {
                want.broadcast_add(&br).unwrap()
            } else {
                want
            };
            let on = |t: &Tensor| t.to_dtype(dtype).unwrap().to_device(&dev).unwrap();
            let layer = Linear::new(on(&wt), bias.then(|| on(&bv)));
            let got = layer.forward(&on(&x)).unwrap().to_device(&cpu).unwrap();
            assert_eq!(got.dims(), want.dims());
            let bound = match dtype {
                DType::F32 => 1e-4 * max_abs(&want).max(1.0),
                DType::F16 => 1.5e-3 * max_abs(&want),
                _ => 1e-2 * max_abs(&want),
            };
            let diff = max_abs_diff(&got, &want);
            assert!(
                diff <= bound,
                "linear {cin}->{cout} (bias {bias}), {dtype:?}: differs by {diff} (bound {bound})"
            );
        }
    }
}

#[test]
fn geglu_feed_forward_matches_candles_on_the_cpu() {
    let dev = device();
    let cpu = Device::Cpu;
    let (b, n, dim, inner) = (2, 33, 64, 256);
    let x = randn(14, 0., 1., &[b, n, dim]);
    let w1 = randn(15, 0., 0.15, &[2 * inner, dim]);
    let b1 = randn(16, 0., 0.5, &[2 * inner]);
    let w2 = randn(17, 0., 0.1, &[dim, inner]);
    let b2 = randn(18, 0., 0.5, &[dim]);
    let dtypes: &[DType] = if on_gpu() {
        &[DType::F32, DType::F16]
    } else {
        &[DType::F32]
    };
    for &dtype in dtypes {
        let r = |t: &Tensor| rounded(t, dtype);
        // candle's ops: the projection, its halves, the exact GELU, the output projection.
        let h = r(&x)
            .broadcast_matmul(&r(&w1).t().unwrap())
            .unwrap()
            .broadcast_add(&r(&b1))
            .unwrap();
        let (hidden, gate) = (
            h.narrow(2, 0, inner).unwrap(),
            h.narrow(2, inner, inner).unwrap(),
        );
        let want = (hidden * gate.gelu_erf().unwrap())
            .unwrap()
            .broadcast_matmul(&r(&w2).t().unwrap())
            .unwrap()
            .broadcast_add(&r(&b2))
            .unwrap();
        let vb = vars(
            &[
                ("net.0.proj.weight", &w1),
                ("net.0.proj.bias", &b1),
                ("net.2.weight", &w2),
                ("net.2.bias", &b2),
            ],
            dtype,
            &dev,
        );
        let ff = FeedForward::load(vb, dim, inner / dim).unwrap();
        let got = ff
            .forward(&x.to_dtype(dtype).unwrap().to_device(&dev).unwrap())
            .unwrap()
            .to_device(&cpu)
            .unwrap();
        // f16: the rounding of the two projections' outputs and of the gated values (2^-11
        // relative each) carried through the second product.
        let bound = match dtype {
            DType::F32 => 1e-4 * max_abs(&want).max(1.0),
            _ => 4e-3 * max_abs(&want),
        };
        let diff = max_abs_diff(&got, &want);
        assert!(
            diff <= bound,
            "GEGLU feed-forward, {dtype:?}: differs by {diff} (bound {bound})"
        );
    }
}
