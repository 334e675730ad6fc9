//! Convolutional building blocks shared by the UNet and the VAE: diffusers' `ResnetBlock2D`,
//! `Downsample2D` and `Upsample2D`, loaded by their diffusers key names.

use candle_core::{Module, Result, Tensor};
use candle_nn::{Conv2dConfig, Init, Linear, VarBuilder};

use crate::{kernels, winograd};

/// Group normalisation with affine parameters (torch `nn.GroupNorm`), run by the fused CPU
/// kernel where it applies; the SiLU that follows almost every norm in SD is fused in too.
#[derive(Debug, Clone)]
pub struct GroupNorm {
    weight: Tensor,
    bias: Tensor,
    groups: usize,
    eps: f64,
    /// On CUDA devices: `[weight; bias]` in f32, for `gpu_norm`'s kernels.
    #[cfg(feature = "cuda")]
    affine: Option<Tensor>,
}

impl GroupNorm {
    /// Loads `weight` and `bias` (`[channels]`) under `vb`.
    pub fn load(vb: VarBuilder, groups: usize, channels: usize, eps: f64) -> Result<Self> {
        if groups == 0 || !channels.is_multiple_of(groups) {
            candle_core::bail!("group norm: {channels} channels do not split into {groups} groups");
        }
        let weight = vb.get_with_hints(channels, "weight", Init::Const(1.0))?;
        let bias = vb.get_with_hints(channels, "bias", Init::Const(0.0))?;
        #[cfg(feature = "cuda")]
        let affine = if weight.device().is_cuda() {
            Some(Tensor::cat(&[&weight, &bias], 0)?.to_dtype(candle_core::DType::F32)?)
        } else {
            None
        };
        Ok(Self {
            weight,
            bias,
            groups,
            eps,
            #[cfg(feature = "cuda")]
            affine,
        })
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.run(x, None, false)
    }

    fn run(&self, x: &Tensor, shift: Option<&Tensor>, silu: bool) -> Result<Tensor> {
        crate::profile::scope("group norm", x.device(), || {
            #[cfg(feature = "cuda")]
            if let Some(affine) = &self.affine {
                if x.device().is_cuda() && crate::gpu_norm::enabled() {
                    return crate::gpu_norm::group_norm(
                        x,
                        affine,
                        self.groups,
                        self.eps,
                        shift,
                        silu,
                    );
                }
            }
            kernels::group_norm(
                x,
                &self.weight,
                &self.bias,
                self.groups,
                self.eps,
                shift,
                silu,
            )
        })
    }

    /// `silu(norm(x))`.
    pub fn forward_silu(&self, x: &Tensor) -> Result<Tensor> {
        self.run(x, None, true)
    }

    /// `silu(norm(x + shift))` with `shift` `[batch or 1, channels]` added per channel.
    pub fn forward_shifted_silu(&self, x: &Tensor, shift: &Tensor) -> Result<Tensor> {
        self.run(x, Some(shift), true)
    }
}

/// A 2-D convolution with bias (torch `nn.Conv2d` with `dilation=1`, `groups=1`).
///
/// On the CPU in f32, 3x3/stride-1/padding-1 convolutions (nearly all of SD's compute outside
/// attention) run as one large matrix product over a channel-major im2col matrix, with the bias
/// folded in as an extra weight column; 1x1 convolutions run as a plain matrix product. candle
/// 0.11's own CPU convolution transposes the input on one thread and scatters its output, which
/// made it reach about half the throughput of its matrix product here.
///
/// The 3x3 path writes each im2col block's product straight into the output (which starts as the
/// bias) through `kernels::conv3x3`; `LD_CONV=blocks` keeps the older product-per-block-then-
/// concatenate path, for comparisons.
#[derive(Debug, Clone)]
pub struct Conv2d {
    kind: ConvKind,
    out_channels: usize,
    /// The kind of layer, for `LD_LAYER_TIMES`'s table.
    label: &'static str,
}

#[derive(Debug, Clone)]
enum ConvKind {
    /// `[c_out, 9 * c_in + 1]`: torch's `[c_out, c_in, 3, 3]` flattened, then the bias.
    Packed3x3(Tensor),
    /// `[c_out, 9 * c_in]` weights (torch's layout flattened: no copy at load), the bias and the
    /// stride (1, or 2 for downsampling), for `kernels::conv3x3`, which writes each block's
    /// product straight into the output.
    Direct3x3(Tensor, Vec<f32>, usize),
    /// 1x1: `[c_out, c_in]` weight and the bias, for `kernels::conv1x1` (the output starts as
    /// the bias, so no second pass adds it).
    Pointwise(Tensor, Vec<f32>),
    /// On CUDA devices: weight, bias, stride and padding for `gpu_conv::conv2d` (cuDNN with
    /// cached descriptors, implicit-precomp GEMM and f32 accumulation).
    #[cfg(feature = "cudnn")]
    Cudnn(Tensor, Tensor, usize, usize),
    /// Anything else: candle's convolution.
    General(candle_nn::Conv2d),
}

/// Largest im2col block built at once, in elements (16 MiB in f32, so it stays in a desktop
/// CPU's last-level cache while the matrix product reads it). A VAE convolution at 512x512 would
/// otherwise need a 1.2 GiB matrix; blocks of output rows keep it bounded. Measured here: 4 Mi to
/// 16 Mi elements perform alike.
const IM2COL_BLOCK: usize = 1 << 22;

impl Conv2d {
    /// Loads `weight` `[out, in, k, k]` and `bias` `[out]` under `vb`.
    pub fn load(
        vb: VarBuilder,
        in_channels: usize,
        out_channels: usize,
        kernel: usize,
        stride: usize,
        padding: usize,
    ) -> Result<Self> {
        Self::load_with(
            vb,
            in_channels,
            out_channels,
            kernel,
            stride,
            padding,
            direct_conv(),
        )
    }

    /// [`Conv2d::load`] with the 3x3 path chosen by `direct` (see [`direct_conv`]).
    fn load_with(
        vb: VarBuilder,
        in_channels: usize,
        out_channels: usize,
        kernel: usize,
        stride: usize,
        padding: usize,
        direct: bool,
    ) -> Result<Self> {
        let w = vb.get_with_hints(
            (out_channels, in_channels, kernel, kernel),
            "weight",
            candle_nn::init::DEFAULT_KAIMING_NORMAL,
        )?;
        let b = vb.get_with_hints(out_channels, "bias", Init::Const(0.0))?;
        let cpu_f32 = vb.device().is_cpu() && vb.dtype() == candle_core::DType::F32;
        #[cfg(feature = "cudnn")]
        if w.device().is_cuda() && crate::gpu_conv::enabled() {
            return Ok(Self {
                kind: ConvKind::Cudnn(w, b, stride, padding),
                out_channels,
                label: conv_label(kernel, stride),
            });
        }
        let kind = match (kernel, stride, padding) {
            (3, 1, 1) if cpu_f32 => {
                // Flattened as stored (a view): the im2col rows and Winograd's filter transform
                // both read taps in torch's (c_in, kh, kw) order, so no reordering copy.
                let w = w.reshape((out_channels, 9 * in_channels))?;
                if direct {
                    ConvKind::Direct3x3(stored(w)?, b.to_vec1::<f32>()?, 1)
                } else {
                    ConvKind::Packed3x3(Tensor::cat(&[&w, &b.reshape((out_channels, 1))?], 1)?)
                }
            }
            // The UNet's downsampling convolutions: candle's generic CPU convolution was ~2x
            // slower than the same im2col product (7% of a step at 128x128).
            (3, 2, 1) if cpu_f32 => ConvKind::Direct3x3(
                stored(w.reshape((out_channels, 9 * in_channels))?)?,
                b.to_vec1::<f32>()?,
                2,
            ),
            (1, 1, 0) if cpu_f32 => ConvKind::Pointwise(
                stored(w.reshape((out_channels, in_channels))?)?,
                b.to_vec1::<f32>()?,
            ),
            _ => {
                let cfg = Conv2dConfig {
                    padding,
                    stride,
                    ..Default::default()
                };
                ConvKind::General(candle_nn::Conv2d::new(w, Some(b), cfg))
            }
        };
        Ok(Self {
            kind,
            out_channels,
            label: conv_label(kernel, stride),
        })
    }
}

/// A CPU f32 weight as the layer keeps it: contiguous, and in f16 under half-precision storage
/// (widened again by `kernels::weight_for` each time the layer runs).
fn stored(w: Tensor) -> Result<Tensor> {
    kernels::stored_weight(w.contiguous()?)
}

/// The kind of convolution, for `LD_LAYER_TIMES`'s table.
fn conv_label(kernel: usize, stride: usize) -> &'static str {
    match (kernel, stride) {
        (3, 1) => "conv 3x3",
        (1, 1) => "conv 1x1",
        (3, 2) => "conv 3x3 stride 2",
        _ => "conv other",
    }
}

impl Module for Conv2d {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        crate::profile::scope_shaped(self.label, x.dims(), self.out_channels, x.device(), || {
            self.run(x, None)
        })
    }
}

impl Conv2d {
    /// `self(x) + residual`, `residual` of the output's shape. The CPU f32 kernels start their
    /// output as the bias plus the residual (or add it as each value is written), so the
    /// resnet's skip connection costs no pass over memory of its own: with the transformers'
    /// adds, candle's took 38 ms of a two-thread UNet step (1%), more than on one thread.
    pub fn forward_add(&self, x: &Tensor, residual: &Tensor) -> Result<Tensor> {
        crate::profile::scope_shaped(self.label, x.dims(), self.out_channels, x.device(), || {
            if kernels::cpu_f32(residual) {
                self.run(x, Some(residual))
            } else {
                self.run(x, None)? + residual
            }
        })
    }

    /// The convolution, plus `residual` (a contiguous f32 CPU tensor) when given.
    fn run(&self, x: &Tensor, residual: Option<&Tensor>) -> Result<Tensor> {
        let add = |out: Tensor| match residual {
            Some(r) => out + r,
            None => Ok(out),
        };
        match &self.kind {
            ConvKind::Packed3x3(w) if kernels::cpu_f32(x) => {
                let (batch, c, h, width) = x.dims4()?;
                if w.dim(1)? != 9 * c + 1 {
                    candle_core::bail!(
                        "conv2d: input has {c} channels, weights expect {}",
                        (w.dim(1)? - 1) / 9
                    );
                }
                let rows = (IM2COL_BLOCK / ((9 * c + 1) * width).max(1)).clamp(1, h.max(1));
                let mut images = Vec::with_capacity(batch);
                for b in 0..batch {
                    let mut blocks = Vec::with_capacity(h.div_ceil(rows));
                    for y0 in (0..h).step_by(rows) {
                        let col = kernels::im2col_3x3(x, b, y0, (y0 + rows).min(h))?;
                        blocks.push(w.matmul(&col)?);
                    }
                    let out = if blocks.len() == 1 {
                        blocks.swap_remove(0)
                    } else {
                        Tensor::cat(&blocks, 1)?
                    };
                    images.push(out.reshape((1, self.out_channels, h, width))?);
                }
                add(if images.len() == 1 {
                    images.swap_remove(0)
                } else {
                    Tensor::cat(&images, 0)?
                })
            }
            ConvKind::Direct3x3(w, bias, stride) if kernels::cpu_f32(x) => {
                let wide = kernels::weight_for(w, x)?;
                let w: &Tensor = &wide;
                let (batch, _, h, width) = x.dims4()?;
                if *stride != 1 {
                    return kernels::conv3x3_strided(x, w, bias, IM2COL_BLOCK, *stride, residual);
                }
                match conv_path() {
                    ConvPath::Winograd(tile) if winograd::worth_it(batch, h, width) => {
                        winograd::conv3x3(x, w, bias, tile, residual)
                    }
                    _ => kernels::conv3x3(x, w, bias, IM2COL_BLOCK, residual),
                }
            }
            ConvKind::Pointwise(w, bias) if kernels::cpu_f32(x) => {
                kernels::conv1x1(x, &*kernels::weight_for(w, x)?, bias, residual)
            }
            ConvKind::Packed3x3(_) | ConvKind::Direct3x3(..) | ConvKind::Pointwise(..) => {
                // Loaded for the CPU fast path but given another input (non-contiguous, say):
                candle_core::bail!("conv2d: expects a contiguous f32 CPU input")
            }
            #[cfg(feature = "cudnn")]
            ConvKind::Cudnn(w, b, stride, padding) => {
                add(crate::gpu_conv::conv2d(x, w, b, *stride, *padding)?)
            }
            ConvKind::General(c) => {
                #[cfg(feature = "cuda")]
                if x.device().is_cuda() {
                    crate::cuda_graph::unrecordable("convolutions run through candle's");
                }
                add(c.forward(x)?)
            }
        }
    }
}

/// Whether 3x3 convolutions load for `kernels::conv3x3` (the default) or for the older
/// im2col-blocks-then-concatenate path; `LD_CONV=blocks` picks the latter, for comparisons.
fn direct_conv() -> bool {
    std::env::var("LD_CONV").map_or(true, |v| v != "blocks")
}

/// How large 3x3 convolutions run on the CPU.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ConvPath {
    /// `winograd::conv3x3` where [`winograd::worth_it`], else im2col (the default: F(4x4, 3x3)).
    Winograd(winograd::Tile),
    /// Always the im2col product.
    Im2col,
}

/// `LD_CONV=direct` (or `blocks`) keeps every 3x3 convolution on the im2col path and
/// `LD_CONV=winograd2` picks F(2x2, 3x3), for comparisons; read once.
fn conv_path() -> ConvPath {
    static PATH: std::sync::OnceLock<ConvPath> = std::sync::OnceLock::new();
    *PATH.get_or_init(|| match std::env::var("LD_CONV").as_deref() {
        Ok("direct" | "blocks") => ConvPath::Im2col,
        Ok("winograd2") => ConvPath::Winograd(winograd::Tile::Two),
        _ => ConvPath::Winograd(winograd::Tile::Four),
    })
}

pub(crate) fn conv2d(
    vb: VarBuilder,
    in_channels: usize,
    out_channels: usize,
    kernel: usize,
    stride: usize,
    padding: usize,
) -> Result<Conv2d> {
    Conv2d::load(vb, in_channels, out_channels, kernel, stride, padding)
}

/// Shape of one `ResnetBlock2D`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ResnetConfig {
    pub in_channels: usize,
    pub out_channels: usize,
    /// Width of the timestep embedding; `None` in the VAE, which has no `time_emb_proj`.
    pub temb_channels: Option<usize>,
    pub groups: usize,
    pub eps: f64,
    /// diffusers divides the block's output by this (`output_scale_factor`, 1.0 for SD).
    pub output_scale_factor: f64,
}

/// diffusers `ResnetBlock2D` with `time_embedding_norm = "default"` and SiLU, as SD uses it.
#[derive(Debug, Clone)]
pub struct ResnetBlock2D {
    norm1: GroupNorm,
    conv1: Conv2d,
    time_emb_proj: Option<Linear>,
    norm2: GroupNorm,
    conv2: Conv2d,
    conv_shortcut: Option<Conv2d>,
    output_scale_factor: f64,
}

impl ResnetBlock2D {
    pub fn load(vb: VarBuilder, cfg: &ResnetConfig) -> Result<Self> {
        let (cin, cout) = (cfg.in_channels, cfg.out_channels);
        let time_emb_proj = match cfg.temb_channels {
            Some(t) => Some(candle_nn::linear(t, cout, vb.pp("time_emb_proj"))?),
            None => None,
        };
        // diffusers adds a 1x1 shortcut exactly when the channel count changes.
        let conv_shortcut = if cin != cout {
            Some(conv2d(vb.pp("conv_shortcut"), cin, cout, 1, 1, 0)?)
        } else {
            None
        };
        Ok(Self {
            norm1: GroupNorm::load(vb.pp("norm1"), cfg.groups, cin, cfg.eps)?,
            conv1: conv2d(vb.pp("conv1"), cin, cout, 3, 1, 1)?,
            time_emb_proj,
            norm2: GroupNorm::load(vb.pp("norm2"), cfg.groups, cout, cfg.eps)?,
            conv2: conv2d(vb.pp("conv2"), cout, cout, 3, 1, 1)?,
            conv_shortcut,
            output_scale_factor: cfg.output_scale_factor,
        })
    }

    /// `temb_act` is the timestep embedding *after* SiLU: diffusers applies the SiLU inside every
    /// block, but it is the same tensor for all of them, so the UNet computes it once.
    pub fn forward(&self, x: &Tensor, temb_act: Option<&Tensor>) -> Result<Tensor> {
        let h = self.conv1.forward(&self.norm1.forward_silu(x)?)?;
        // The timestep projection is a per-channel shift, folded into norm2's kernel.
        let h = match (&self.time_emb_proj, temb_act) {
            (Some(proj), Some(temb)) => {
                self.norm2.forward_shifted_silu(&h, &proj.forward(temb)?)?
            }
            _ => self.norm2.forward_silu(&h)?,
        };
        // The skip connection is added by the last convolution as it writes its output.
        let out = match &self.conv_shortcut {
            Some(c) => c.forward_add(x, &self.conv2.forward(&h)?)?,
            None => self.conv2.forward_add(&h, x)?,
        };
        if self.output_scale_factor == 1.0 {
            Ok(out)
        } else {
            out / self.output_scale_factor
        }
    }
}

/// diffusers `Downsample2D` with `use_conv=True`: a stride-2 3x3 convolution.
#[derive(Debug, Clone)]
pub struct Downsample2D {
    conv: Conv2d,
    /// The VAE uses `padding=0` with an asymmetric (right/bottom) zero pad, kept from the original
    /// LDM code; the UNet uses the ordinary `padding=1`.
    asymmetric_pad: bool,
}

impl Downsample2D {
    /// Loads `conv` under `vb`; `padding` is diffusers' `downsample_padding` (1 UNet, 0 VAE).
    pub fn load(vb: VarBuilder, channels: usize, padding: usize) -> Result<Self> {
        Ok(Self {
            conv: conv2d(vb.pp("conv"), channels, channels, 3, 2, padding)?,
            asymmetric_pad: padding == 0,
        })
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        if self.asymmetric_pad {
            let x = x.pad_with_zeros(3, 0, 1)?.pad_with_zeros(2, 0, 1)?;
            self.conv.forward(&x)
        } else {
            self.conv.forward(x)
        }
    }
}

/// diffusers `Upsample2D` with `use_conv=True`: nearest 2x upsampling, then a 3x3 convolution.
#[derive(Debug, Clone)]
pub struct Upsample2D {
    conv: Conv2d,
}

impl Upsample2D {
    pub fn load(vb: VarBuilder, channels: usize) -> Result<Self> {
        Ok(Self {
            conv: conv2d(vb.pp("conv"), channels, channels, 3, 1, 1)?,
        })
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (_, _, h, w) = x.dims4()?;
        self.forward_to(x, 2 * h, 2 * w)
    }

    /// Nearest upsampling to an exact size, then the convolution. The UNet uses it when a
    /// latent side is not a multiple of its downsampling factor: the strided convolutions on the
    /// way down round up, so each up block must land on its skip connection's size (diffusers'
    /// `forward_upsample_size`).
    pub fn forward_to(&self, x: &Tensor, h: usize, w: usize) -> Result<Tensor> {
        let up = crate::profile::scope("upsample", x.device(), || {
            kernels::upsample_nearest(x, h, w)
        })?;
        self.conv.forward(&up)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device};
    use std::collections::HashMap;

    fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
        let d = (a - b).unwrap().abs().unwrap().flatten_all().unwrap();
        d.max(0).unwrap().to_scalar().unwrap()
    }

    /// Seeded normal values ([`crate::rng::seeded_normal`]).
    fn randn(seed: u64, std: f64, shape: &[usize]) -> Tensor {
        crate::rng::seeded_normal(seed, 0., std, shape).unwrap()
    }

    /// Our convolution paths against candle's reference convolution.
    fn check(cin: usize, cout: usize, k: usize, stride: usize, pad: usize, x: &[usize]) {
        let dev = Device::Cpu;
        let w = randn(1, 0.1, &[cout, cin, k, k]);
        let b = randn(2, 1., &[cout]);
        let vb = VarBuilder::from_tensors(
            HashMap::from([
                ("weight".to_string(), w.clone()),
                ("bias".to_string(), b.clone()),
            ]),
            DType::F32,
            &dev,
        );
        let direct = Conv2d::load_with(vb.clone(), cin, cout, k, stride, pad, true).unwrap();
        let blocks = Conv2d::load_with(vb, cin, cout, k, stride, pad, false).unwrap();
        let x = randn(3, 1., x);
        let want = x
            .conv2d(&w, pad, stride, 1, 1)
            .unwrap()
            .broadcast_add(&b.reshape((1, cout, 1, 1)).unwrap())
            .unwrap();
        for (path, ours) in [("direct", &direct), ("blocks", &blocks)] {
            let got = ours.forward(&x).unwrap();
            assert_eq!(got.dims(), want.dims());
            // f32 sums of up to 9 * 64 products in another order, or (3x3 on the direct path
            // at sizes that pay) Winograd F(4x4, 3x3), whose transforms round at about 1e-5 of
            // the outputs' size: measured 8.8e-5 at |out| 12 seeded, up to 1.2e-4 over 200
            // random draws (a fixed 1e-4 failed 6.5% of them). A wrong tap or tile moves
            // outputs by tenths.
            let scale = want
                .abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap();
            let d = max_abs_diff(&got, &want);
            assert!(
                d < 3e-5 * scale.max(1.0),
                "{path} conv {cin}->{cout} k{k}: {d} (|out| {scale})"
            );
            // With a residual added by the kernel (the resnet's skip connection).
            let residual = randn(4, 1., want.dims());
            let got = ours.forward_add(&x, &residual).unwrap();
            let d = max_abs_diff(&got, &(&want + &residual).unwrap());
            assert!(
                d < 3e-5 * (scale + 5.0),
                "{path} conv {cin}->{cout} k{k} with a residual: {d} (|out| {scale})"
            );
        }
    }

    #[test]
    fn direct_3x3_kernel_with_one_row_blocks_matches_candle() {
        // A block smaller than one im2col row still makes progress one output row at a time,
        // and every block lands at its own rows of the output.
        let (cin, cout) = (6, 5);
        let w = randn(4, 0.2, &[cout, cin, 3, 3]);
        let b = randn(5, 1., &[cout]);
        let x = randn(6, 1., &[2, cin, 7, 11]);
        let packed = w.reshape((cout, 9 * cin)).unwrap();
        let bias = b.to_vec1::<f32>().unwrap();
        let want = x
            .conv2d(&w, 1, 1, 1, 1)
            .unwrap()
            .broadcast_add(&b.reshape((1, cout, 1, 1)).unwrap())
            .unwrap();
        for block in [1, 9 * cin * 11 * 3, 1 << 20] {
            let got = kernels::conv3x3(&x, &packed, &bias, block, None).unwrap();
            let d = max_abs_diff(&got, &want);
            assert!(d < 1e-5, "block {block}: {d}");
        }
    }

    #[test]
    fn packed_3x3_convolution_matches_candle() {
        check(5, 7, 3, 1, 1, &[2, 5, 9, 6]);
        check(3, 4, 3, 1, 1, &[1, 3, 1, 1]);
        // 577 * 512 elements per output row: the im2col matrix is built in three row blocks.
        check(64, 8, 3, 1, 1, &[1, 64, 128, 512]);
    }

    #[test]
    fn pointwise_and_strided_convolutions_match_candle() {
        check(6, 3, 1, 1, 0, &[2, 6, 5, 4]);
        check(4, 4, 3, 2, 1, &[1, 4, 8, 6]);
        check(4, 4, 3, 2, 0, &[1, 4, 9, 9]);
        // Stride 2 on our im2col path: odd and even sizes (the last output column/row reads
        // the padding only when the size is even), a single pixel, and batches.
        check(5, 7, 3, 2, 1, &[2, 5, 9, 7]);
        check(3, 2, 3, 2, 1, &[1, 3, 1, 1]);
        check(3, 2, 3, 2, 1, &[3, 3, 2, 5]);
        // 577 * 256 elements per output row: several row blocks.
        check(64, 8, 3, 2, 1, &[1, 64, 64, 512]);
    }

    #[test]
    fn strided_3x3_kernel_with_one_row_blocks_matches_candle() {
        let (cin, cout) = (4, 3);
        let w = randn(7, 0.2, &[cout, cin, 3, 3]);
        let b = randn(8, 1., &[cout]);
        let x = randn(9, 1., &[2, cin, 9, 10]);
        let want = x
            .conv2d(&w, 1, 2, 1, 1)
            .unwrap()
            .broadcast_add(&b.reshape((1, cout, 1, 1)).unwrap())
            .unwrap();
        let packed = w.reshape((cout, 9 * cin)).unwrap();
        let bias = b.to_vec1::<f32>().unwrap();
        for block in [1, 9 * cin * 5 * 2, 1 << 20] {
            let got = kernels::conv3x3_strided(&x, &packed, &bias, block, 2, None).unwrap();
            assert_eq!(got.dims(), want.dims());
            let d = max_abs_diff(&got, &want);
            assert!(d < 1e-5, "block {block}: {d}");
        }
    }
}
