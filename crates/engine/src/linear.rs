//! Linear layers (torch `nn.Linear`) for the UNet's transformers and the VAE's attention. On the
//! CPU in f32 the forward pass is one matrix product over all rows of the batch, written into an
//! output that already holds the bias (candle's `Linear` runs a product per batch item, then a
//! second pass over a second output adds the bias), and the transformer projections read
//! `[b, c, h, w]` channels as tokens, and write tokens back as channels, inside the product
//! instead of through transposing copies (serial in candle). A residual to add (the
//! transformer's skip connections) is copied into the output before the product, not added by
//! a pass of its own. Other devices and dtypes use
//! candle's `Linear`, except on NVIDIA GPUs: one cuBLASLt product with the bias in its epilogue
//! (`gpu_linear`). Under half-precision storage (`LoadOptions::half_weights`) the weight is
//! kept in f16 and widened to f32 each time the layer runs on f32 input.

use candle_core::{CpuStorage, CustomOp2, CustomOp3, Layout, Module, Result, Shape, Tensor};
use candle_nn::VarBuilder;

use crate::kernels::{self, contiguous_f32, cpu_f32, gemm_on_threads, weight_for, MatMut, MatRef};

/// `y = x Wᵀ + b` with `W`: `[out, in]`.
#[derive(Debug, Clone)]
pub struct Linear {
    weight: Tensor,
    bias: Option<Tensor>,
}

impl Linear {
    /// Stores `weight` in f16 if half-precision storage is on while it is built (CPU f32 only).
    pub fn new(weight: Tensor, bias: Option<Tensor>) -> Self {
        // Stays as given if it cannot be converted (f16 storage is only a memory saving).
        let weight = crate::kernels::stored_weight(weight.clone()).unwrap_or(weight);
        Self { weight, bias }
    }

    /// `weight` `[out, in]` and `bias` `[out]` under `vb`, as `candle_nn::linear` loads them
    /// (with its initialisation hints for random-weight models: tests and the benchmark).
    pub fn load(vb: VarBuilder, in_dim: usize, out_dim: usize) -> Result<Self> {
        let l = candle_nn::linear(in_dim, out_dim, vb)?;
        Ok(Self::new(l.weight().clone(), l.bias().cloned()))
    }

    /// [`Linear::load`] without a bias.
    pub fn load_no_bias(vb: VarBuilder, in_dim: usize, out_dim: usize) -> Result<Self> {
        let l = candle_nn::linear_no_bias(in_dim, out_dim, vb)?;
        Ok(Self::new(l.weight().clone(), None))
    }
}

impl Linear {
    /// Output features (the weight's rows), for `LD_LAYER_TIMES=shapes`.
    fn out_dim(&self) -> usize {
        self.weight.dims().first().copied().unwrap_or(0)
    }

    /// `x` `[b, c, h, w]` read as tokens `[b, h*w, c]` and passed through this layer:
    /// `[b, h*w, out]`. On the CPU in f32 the matrix product reads `x` transposed in place, so
    /// the transposing copy (serial in candle, 10-40 MB per transformer at 512x512) is skipped.
    pub fn forward_channels_to_tokens(&self, x: &Tensor) -> Result<Tensor> {
        crate::profile::scope_shaped("linear", x.dims(), self.out_dim(), x.device(), || {
            self.channels_to_tokens(x)
        })
    }

    fn channels_to_tokens(&self, x: &Tensor) -> Result<Tensor> {
        let (b, c, h, w) = x.dims4()?;
        let weight = weight_for(&self.weight, x)?;
        if cpu_f32(x) && cpu_f32(&weight) {
            let bias = self.bias_values()?;
            return x.apply_op2_no_bwd(&weight, &ChannelsToTokens { bias });
        }
        let tokens = x.reshape((b, c, h * w))?.transpose(1, 2)?.contiguous()?;
        self.plain(&tokens, None)
    }

    /// `residual + layer(t)` with tokens `t` `[b, h*w, in]` written back as channels: the
    /// result has `residual`'s shape `[b, c, h, w]`. On the CPU in f32 the product writes its
    /// transposed result straight into a copy of the residual that already holds the bias.
    pub fn forward_tokens_to_channels_add(&self, t: &Tensor, residual: &Tensor) -> Result<Tensor> {
        crate::profile::scope_shaped("linear", t.dims(), self.out_dim(), t.device(), || {
            self.tokens_to_channels_add(t, residual)
        })
    }

    fn tokens_to_channels_add(&self, t: &Tensor, residual: &Tensor) -> Result<Tensor> {
        let (b, c, h, w) = residual.dims4()?;
        let weight = weight_for(&self.weight, t)?;
        if cpu_f32(t) && cpu_f32(&weight) && cpu_f32(residual) {
            let bias = self.bias_values()?;
            return t.apply_op3_no_bwd(&weight, residual, &TokensToChannelsAdd { bias });
        }
        let y = self.plain(t, None)?.transpose(1, 2)?;
        (residual.reshape((b, c, h * w))? + y)?.reshape((b, c, h, w))
    }

    fn bias_values(&self) -> Result<Option<Vec<f32>>> {
        self.bias.as_ref().map(|b| b.to_vec1::<f32>()).transpose()
    }
}

/// `[b, c, hw]` channels (read transposed) times `Wᵀ`, plus the bias: `[b, hw, out]`.
struct ChannelsToTokens {
    bias: Option<Vec<f32>>,
}

impl CustomOp2 for ChannelsToTokens {
    fn name(&self) -> &'static str {
        "ld-linear-from-channels"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let xs = contiguous_f32(s1, l1, self.name())?;
        let ws = contiguous_f32(s2, l2, self.name())?;
        let (b, c, h, w) = l1.shape().dims4()?;
        let (out_dim, in_dim) = l2.shape().dims2()?;
        let hw = h * w;
        if in_dim != c || self.bias.as_ref().is_some_and(|v| v.len() != out_dim) {
            candle_core::bail!(
                "{}: {c} channels do not fit weight {:?}",
                self.name(),
                l2.dims()
            );
        }
        let mut out = kernels::rows_start(b * hw, out_dim, self.bias.as_deref(), None);
        for i in 0..b {
            // SAFETY: dst is image i's `hw x out` row-major block of `out`; lhs is image i's
            // `[c, hw]` plane set read as `hw x c` (row stride 1, column stride hw); rhs is Wᵀ.
            unsafe {
                gemm_on_threads(
                    hw,
                    out_dim,
                    c,
                    MatMut::row_major(out.as_mut_ptr().add(i * hw * out_dim), out_dim),
                    self.bias.is_some(),
                    MatRef::transposed(xs.as_ptr().add(i * c * hw), hw),
                    MatRef::transposed(ws.as_ptr(), in_dim),
                );
            }
        }
        Ok((CpuStorage::F32(out), Shape::from((b, hw, out_dim))))
    }
}

/// `residual + (t Wᵀ + bias)ᵀ`: tokens `[b, hw, in]` back to channels `[b, out, h, w]`.
struct TokensToChannelsAdd {
    bias: Option<Vec<f32>>,
}

impl CustomOp3 for TokensToChannelsAdd {
    fn name(&self) -> &'static str {
        "ld-linear-to-channels"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let ts = contiguous_f32(s1, l1, self.name())?;
        let ws = contiguous_f32(s2, l2, self.name())?;
        let rs = contiguous_f32(s3, l3, self.name())?;
        let (b, hw, in_dim) = l1.shape().dims3()?;
        let (out_dim, in_w) = l2.shape().dims2()?;
        let (rb, rc, h, w) = l3.shape().dims4()?;
        if in_w != in_dim
            || (rb, rc, h * w) != (b, out_dim, hw)
            || self.bias.as_ref().is_some_and(|v| v.len() != out_dim)
        {
            candle_core::bail!(
                "{}: tokens {:?}, weight {:?} and residual {:?} do not fit",
                self.name(),
                l1.dims(),
                l2.dims(),
                l3.dims()
            );
        }
        // The residual plus the bias, copied on all compute threads (a serial copy was a
        // fixed part of every transformer's time).
        let mut out = kernels::planes_start(b * out_dim, hw, self.bias.as_deref(), Some(rs));
        for i in 0..b {
            // SAFETY: dst is image i's `[out, hw]` block of `out`, written as its transpose
            // (`hw x out`, row stride 1, column stride hw); lhs is image i's `hw x in` tokens,
            // row-major; rhs is Wᵀ.
            unsafe {
                gemm_on_threads(
                    hw,
                    out_dim,
                    in_dim,
                    MatMut::transposed(out.as_mut_ptr().add(i * out_dim * hw), hw),
                    true,
                    MatRef::row_major(ts.as_ptr().add(i * hw * in_dim), in_dim),
                    MatRef::transposed(ws.as_ptr(), in_dim),
                );
            }
        }
        Ok((CpuStorage::F32(out), Shape::from((b, out_dim, h, w))))
    }
}

impl Module for Linear {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        crate::profile::scope_shaped("linear", x.dims(), self.out_dim(), x.device(), || {
            self.plain(x, None)
        })
    }
}

impl Linear {
    /// `self(x) + residual`, `residual` of the output's shape: on the CPU in f32 the product
    /// is added into a copy of the residual that already holds the bias, so the transformer's
    /// skip connections cost no pass over memory of their own.
    pub fn forward_add(&self, x: &Tensor, residual: &Tensor) -> Result<Tensor> {
        crate::profile::scope_shaped("linear", x.dims(), self.out_dim(), x.device(), || {
            self.plain(x, Some(residual))
        })
    }

    fn plain(&self, x: &Tensor, residual: Option<&Tensor>) -> Result<Tensor> {
        let weight = weight_for(&self.weight, x)?;
        let add = |y: Tensor| match residual {
            Some(r) => y + r,
            None => Ok(y),
        };
        if cpu_f32(x) && cpu_f32(&weight) && self.bias.as_ref().is_none_or(cpu_f32) {
            let op = LinearOp {
                bias: self.bias_values()?,
            };
            // A residual the kernel cannot read in place (a strided view) is added after.
            return match residual {
                Some(r) if !cpu_f32(r) => add(x.apply_op2_no_bwd(&weight, &op)?),
                _ => kernels::with_residual(x, &weight, residual, &op),
            };
        }
        #[cfg(feature = "cuda")]
        if x.device().is_cuda() && crate::gpu_linear::enabled() {
            return add(crate::gpu_linear::linear(x, &weight, self.bias.as_ref())?);
        }
        #[cfg(feature = "cuda")]
        if x.device().is_cuda() {
            crate::cuda_graph::unrecordable("linear layers run through candle's cuBLAS products");
        }
        add(candle_nn::Linear::new(weight.into_owned(), self.bias.clone()).forward(x)?)
    }
}

/// `x Wᵀ + bias`, plus a residual of the output's shape when one is given (the third operand).
struct LinearOp {
    bias: Option<Vec<f32>>,
}

impl LinearOp {
    fn run(
        &self,
        x: (&CpuStorage, &Layout),
        w: (&CpuStorage, &Layout),
        residual: Option<(&CpuStorage, &Layout)>,
    ) -> Result<(CpuStorage, Shape)> {
        let name = "ld-linear";
        let xs = contiguous_f32(x.0, x.1, name)?;
        let ws = contiguous_f32(w.0, w.1, name)?;
        let (out_dim, in_dim) = w.1.shape().dims2()?;
        let dims = x.1.shape().dims();
        if dims.last() != Some(&in_dim) || in_dim == 0 {
            candle_core::bail!("{name}: input {dims:?} does not end in {in_dim} features");
        }
        let bias = self.bias.as_deref();
        if let Some(b) = bias.filter(|b| b.len() != out_dim) {
            candle_core::bail!("{name}: bias has {} values, not {out_dim}", b.len());
        }
        let rows = xs.len() / in_dim;
        let mut shape = dims.to_vec();
        if let Some(last) = shape.last_mut() {
            *last = out_dim;
        }
        let residual = kernels::residual_of(residual, &shape, name)?;
        let mut out = kernels::rows_start(rows, out_dim, bias, residual);
        if rows > 0 && out_dim > 0 {
            // SAFETY: dst is `rows x out_dim` row-major in `out`; lhs `rows x in_dim` row-major
            // in `xs`; rhs is Wᵀ (`in_dim x out_dim`), read from `ws` (`[out, in]` row-major)
            // with row stride 1 and column stride `in_dim`.
            unsafe {
                gemm_on_threads(
                    rows,
                    out_dim,
                    in_dim,
                    MatMut::row_major(out.as_mut_ptr(), out_dim),
                    bias.is_some() || residual.is_some(),
                    MatRef::row_major(xs.as_ptr(), in_dim),
                    MatRef::transposed(ws.as_ptr(), in_dim),
                );
            }
        }
        Ok((CpuStorage::F32(out), Shape::from(shape)))
    }
}

kernels::layer_op!(LinearOp, "ld-linear");

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Tensor};

    /// Seeded normal values ([`crate::rng::seeded_normal`]).
    fn randn(seed: u64, shape: &[usize]) -> Tensor {
        crate::rng::seeded_normal(seed, 0., 1., shape).unwrap()
    }

    fn close(a: &Tensor, b: &Tensor) -> f32 {
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

    #[test]
    fn matches_candle_linear_with_and_without_bias() {
        let w = randn(1, &[7, 5]);
        let b = randn(2, &[7]);
        for shape in [vec![3, 5], vec![2, 4, 5], vec![1, 1, 5]] {
            let x = randn(3, &shape);
            for bias in [Some(b.clone()), None] {
                let ours = Linear::new(w.clone(), bias.clone()).forward(&x).unwrap();
                let want = candle_nn::Linear::new(w.clone(), bias.clone())
                    .forward(&x)
                    .unwrap();
                assert_eq!(ours.dims(), want.dims());
                assert!(close(&ours, &want) < 1e-5, "{shape:?}");
                // With a residual added by the product (the transformer's skip connections),
                // and one the product cannot take in place (a transposed view), added after.
                let lin = Linear::new(w.clone(), bias);
                let residual = randn(12, want.dims());
                let ours = lin.forward_add(&x, &residual).unwrap();
                let sum = (&want + &residual).unwrap();
                assert!(close(&ours, &sum) < 1e-5, "{shape:?}");
                let rank = want.rank();
                let flipped = residual
                    .transpose(rank - 2, rank - 1)
                    .unwrap()
                    .contiguous()
                    .unwrap()
                    .transpose(rank - 2, rank - 1)
                    .unwrap();
                let ours = lin.forward_add(&x, &flipped).unwrap();
                assert!(close(&ours, &sum) < 1e-5, "{shape:?} strided");
                // A residual of another shape is an error, not a panic.
                let wrong = randn(13, &[want.elem_count() + 1]);
                assert!(lin.forward_add(&x, &wrong).is_err(), "{shape:?}");
            }
        }
    }

    #[test]
    fn row_views_of_a_weight_work_as_weights() {
        // The feed-forward splits one [2n, in] weight into two row views.
        let w = randn(4, &[8, 6]);
        let b = randn(5, &[8]);
        let x = randn(6, &[2, 3, 6]);
        let half = Linear::new(w.narrow(0, 4, 4).unwrap(), Some(b.narrow(0, 4, 4).unwrap()));
        let whole = Linear::new(w, Some(b)).forward(&x).unwrap();
        let got = half.forward(&x).unwrap();
        assert!(close(&got, &whole.narrow(2, 4, 4).unwrap()) < 1e-5);
    }

    /// Small planes, and planes large enough (over 32k values) that the bias and residual
    /// copies are split between threads (one image, so a thread's part starts inside it).
    #[test]
    fn channel_layouts_match_transposing_copies() {
        for (b, c, h, w) in [(2, 6, 3, 5), (1, 7, 70, 70)] {
            channel_layouts_match(b, c, h, w);
        }
    }

    fn channel_layouts_match(b: usize, c: usize, h: usize, w: usize) {
        let x = randn(7, &[b, c, h, w]);
        let w_in = randn(8, &[4, c]);
        let w_out = randn(9, &[c, 4]);
        let b_in = randn(10, &[4]);
        let b_out = randn(11, &[c]);
        let tokens = x.reshape((b, c, h * w)).unwrap().transpose(1, 2).unwrap();
        for (bi, bo) in [(Some(b_in), Some(b_out)), (None, None)] {
            let lin_in = Linear::new(w_in.clone(), bi.clone());
            let lin_out = Linear::new(w_out.clone(), bo.clone());
            let t = lin_in.forward_channels_to_tokens(&x).unwrap();
            let want_t = candle_nn::Linear::new(w_in.clone(), bi)
                .forward(&tokens.contiguous().unwrap())
                .unwrap();
            assert_eq!(t.dims(), &[b, h * w, 4]);
            assert!(close(&t, &want_t) < 1e-5);
            let y = lin_out.forward_tokens_to_channels_add(&t, &x).unwrap();
            let back = candle_nn::Linear::new(w_out.clone(), bo)
                .forward(&t)
                .unwrap();
            let want_y =
                (back.transpose(1, 2).unwrap().reshape((b, c, h, w)).unwrap() + &x).unwrap();
            assert_eq!(y.dims(), x.dims());
            assert!(close(&y, &want_y) < 1e-5);
        }
    }

    #[test]
    fn wrong_input_width_is_an_error() {
        let dev = Device::Cpu;
        let lin = Linear::new(
            Tensor::zeros((4, 3), candle_core::DType::F32, &dev).unwrap(),
            None,
        );
        let x = Tensor::zeros((2, 5), candle_core::DType::F32, &dev).unwrap();
        assert!(lin.forward(&x).is_err());
    }
}
