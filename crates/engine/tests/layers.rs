//! The convolution and group-norm layers on the test device (their CPU kernels, or on a GPU the
//! cuDNN call and the NVRTC group-norm kernels) against candle's plain ops run on the CPU in f32
//! from the same inputs.

use std::collections::HashMap;

use candle_core::{DType, Device, Module, Tensor};
use candle_nn::VarBuilder;
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
        let x = Tensor::randn(0f32, 1., (n, cin, h, w), &cpu).unwrap();
        let wt = Tensor::randn(0f32, 0.1, (cout, cin, k, k), &cpu).unwrap();
        let b = Tensor::randn(0f32, 1., cout, &cpu).unwrap();
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
        let x = (Tensor::randn(0f32, 1., (n, c, h, w), &cpu).unwrap() + 30.0).unwrap();
        let wt = Tensor::randn(1f32, 0.3, c, &cpu).unwrap();
        let b = Tensor::randn(0f32, 0.3, c, &cpu).unwrap();
        let shift = Tensor::randn(0f32, 2., (n, c), &cpu).unwrap();
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
