//! Attention for the UNet and the VAE: memory-bounded scaled dot-product attention, diffusers'
//! `Attention` / `FeedForward` (GEGLU) / `BasicTransformerBlock` / `Transformer2DModel`, and the
//! VAE's single-head spatial self-attention.
//!
//! The attention kernel never materialises the whole `[heads, queries, keys]` score tensor unless
//! it is small: queries are processed in chunks sized so one block of scores stays under
//! [`AttentionOptions::max_scores`] elements. Softmax is taken per query row, so chunking the
//! queries gives exactly the same numbers as full attention. At 512x512 SD1.5 the full score tensor
//! is `2 x 8 x 4096 x 4096` f32 = 1 GiB; chunked it is 16 MiB.
//!
//! On the CPU in f32 the default is `fused_attention` instead: tiles with an online softmax, one
//! 128 x 256 score tile per thread and no transposed copies (see [`AttentionOptions::fused`]).

use candle_core::{DType, Module, Result, Tensor};
use candle_nn::{LayerNorm, VarBuilder};

use crate::kernels;
use crate::linear::Linear;
use crate::profile;
use crate::resnet::GroupNorm;

/// Initialisation hint for weights we fetch by hand. Real checkpoints ignore it; random-weight
/// models (tests, the benchmark) would otherwise get all-zero layers (the default hint).
const WEIGHT_INIT: candle_nn::Init = candle_nn::init::DEFAULT_KAIMING_NORMAL;

/// How attention trades memory for speed. Set by the pipeline (low-VRAM mode), not by the model.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AttentionOptions {
    /// Most attention scores (elements of `[heads, query chunk, keys]`) held at once. The query
    /// chunk is derived from it; values at or above `heads * queries * keys` give plain attention.
    pub max_scores: usize,
    /// Sliced attention: process this many heads at a time (`None`: all heads together). With
    /// `Some(1)` the query chunk grows by the head count for the same `max_scores`.
    pub head_slice: Option<usize>,
    /// On the CPU in f32: tiled attention with an online softmax (`fused_attention`), which
    /// never holds more than one small score tile per thread, so it also meets any
    /// `max_scores`/`head_slice` bound. Off: the chunked matrix products below.
    pub fused: bool,
}

impl AttentionOptions {
    /// 4 Mi scores (16 MiB in f32) per block: small enough to stay in a desktop CPU's last-level
    /// cache, large enough that each matrix product is still efficient.
    pub const DEFAULT_MAX_SCORES: usize = 1 << 22;
    /// What the default becomes on a GPU: 64 Mi scores (128 MiB in f16). At the CPU's block size
    /// an SD1.5 self-attention layer at 512x512 is 64 blocks of five kernel launches each, and
    /// the GPU waits on launches; at this size it is 4 blocks, and a block's scores still fit
    /// beside the model on a 4 GB card.
    pub const GPU_DEFAULT_MAX_SCORES: usize = 1 << 26;

    /// The score budget actually used on `dev`: the GPU one where the CPU default was left.
    pub fn max_scores_on(&self, dev: &candle_core::Device) -> usize {
        self.max_scores_for(!dev.is_cpu())
    }

    /// [`AttentionOptions::max_scores_on`] for a GPU (`gpu`) or the CPU, without a device (for
    /// memory plans made before one is opened).
    pub fn max_scores_for(&self, gpu: bool) -> usize {
        if gpu && self.max_scores == Self::DEFAULT_MAX_SCORES {
            Self::GPU_DEFAULT_MAX_SCORES
        } else {
            self.max_scores
        }
    }

    /// Plain attention: the whole score tensor at once (for tests and comparisons).
    pub fn plain() -> Self {
        Self {
            max_scores: usize::MAX,
            head_slice: None,
            fused: false,
        }
    }

    /// Low-memory attention: one head at a time, with score blocks of at most `max_scores`.
    pub fn sliced(max_scores: usize) -> Self {
        Self {
            max_scores,
            head_slice: Some(1),
            fused: true,
        }
    }
}

impl Default for AttentionOptions {
    fn default() -> Self {
        Self {
            max_scores: Self::DEFAULT_MAX_SCORES,
            head_slice: None,
            fused: true,
        }
    }
}

/// `softmax(q k^T * scale) v` over `heads` heads.
///
/// `q`: `[batch, queries, heads * dim]`, `k` and `v`: `[batch, keys, heads * dim]`; returns
/// `[batch, queries, heads * dim]`. With `upcast`, half-precision scores and softmax are computed
/// in f32 (diffusers' `upcast_attention` / `upcast_softmax`).
///
/// On the CPU the heads are taken as strided views of the projections (no transposed copies of
/// q, k, v): the matrix-multiply kernel packs its operands anyway, so the strides cost nothing.
pub fn scaled_dot_product_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    heads: usize,
    scale: f64,
    upcast: bool,
    opts: &AttentionOptions,
) -> Result<Tensor> {
    // Timed as one layer kind for LD_LAYER_TIMES (the early returns leave the closure).
    profile::scope("attention core", q.device(), || {
        let (b, sq, inner) = q.dims3()?;
        let (bk, sk, inner_k) = k.dims3()?;
        let (bv, sv, inner_v) = v.dims3()?;
        if bk != b || bv != b || sv != sk || inner_k != inner || inner_v != inner {
            candle_core::bail!(
                "attention: q {:?}, k {:?} and v {:?} do not fit together",
                q.dims(),
                k.dims(),
                v.dims()
            );
        }
        if heads == 0 || !inner.is_multiple_of(heads) {
            candle_core::bail!("attention: width {inner} is not divisible into {heads} heads");
        }
        if sq == 0 || sk == 0 || b == 0 {
            candle_core::bail!("attention: empty input q {:?}, k {:?}", q.dims(), k.dims());
        }
        // On NVIDIA GPUs in half precision: the fused kernel, which computes scores and softmax
        // in f32 (so `upcast` holds) and meets any memory bound (no score blocks exist).
        #[cfg(feature = "cuda")]
        if let Some(out) = crate::gpu_attention::attention(q, k, v, heads, scale) {
            return out;
        }
        #[cfg(feature = "cuda")]
        if q.device().is_cuda() {
            crate::cuda_graph::unrecordable("attention runs through candle's cuBLAS products");
        }
        if opts.fused {
            if let Some(out) = crate::fused_attention::attention(q, k, v, heads, scale) {
                return out;
            }
        }
        let d = inner / heads;
        let slice = opts.head_slice.map_or(heads, |n| n.clamp(1, heads));
        let chunk = (opts.max_scores_on(q.device()) / slice.saturating_mul(sk)).clamp(1, sq);

        // [b, s, heads*d] -> [b, heads, s, d] as a view. CUDA/Metal matmuls want tightly packed
        // operands, so only there the view is copied.
        let split = |t: &Tensor, s: usize| -> Result<Tensor> {
            let t = t.reshape((b, s, heads, d))?.transpose(1, 2)?;
            if t.device().is_cpu() {
                Ok(t)
            } else {
                t.contiguous()
            }
        };
        // Scaling q (queries x width) is cheaper than scaling the scores (queries x keys).
        let q = split(&q.affine(scale, 0.0)?, sq)?;
        let k = split(k, sk)?;
        let v = split(v, sk)?;

        let mut rows = Vec::with_capacity(b * sq.div_ceil(chunk));
        for bi in 0..b {
            let (qb, kb, vb) = (q.get(bi)?, k.get(bi)?, v.get(bi)?);
            for start in (0..sq).step_by(chunk) {
                let qc = qb.narrow(1, start, chunk.min(sq - start))?;
                let mut parts = Vec::with_capacity(heads.div_ceil(slice));
                for h0 in (0..heads).step_by(slice) {
                    let n = slice.min(heads - h0);
                    let o = attend(
                        &qc.narrow(0, h0, n)?,
                        &kb.narrow(0, h0, n)?,
                        &vb.narrow(0, h0, n)?,
                        upcast,
                    )?;
                    // [n, rows, d] -> [rows, n, d], so rows concatenate into [.., heads, d].
                    parts.push(o.transpose(0, 1)?);
                }
                rows.push(if parts.len() == 1 {
                    parts.swap_remove(0)
                } else {
                    Tensor::cat(&parts, 1)?
                });
            }
        }
        // One copy assembles all chunks in [b * queries, heads, d] order.
        Tensor::cat(&rows, 0)?.reshape((b, sq, inner))
    })
}

/// Whether [`scaled_dot_product_attention`] runs these inputs through the fused GPU kernel
/// (`gpu_attention`: CUDA, f16/bf16, Ampere or newer, head sizes 40-160); false in builds
/// without the `cuda` feature. For tests that must know which path they checked.
pub fn uses_gpu_kernel(q: &Tensor, k: &Tensor, v: &Tensor, heads: usize) -> bool {
    #[cfg(feature = "cuda")]
    {
        crate::gpu_attention::handles(q, k, v, heads)
    }
    #[cfg(not(feature = "cuda"))]
    {
        let _ = (q, k, v, heads);
        false
    }
}

/// One block of attention: `q` `[n, rows, d]`, `k`/`v` `[n, keys, d]` -> `[n, rows, d]`.
fn attend(q: &Tensor, k: &Tensor, v: &Tensor, upcast: bool) -> Result<Tensor> {
    let half = upcast && matches!(q.dtype(), DType::F16 | DType::BF16);
    if half {
        let scores = q
            .to_dtype(DType::F32)?
            .matmul(&k.to_dtype(DType::F32)?.t()?)?;
        let probs = kernels::softmax_last_dim(scores)?.to_dtype(v.dtype())?;
        probs.matmul(v)
    } else {
        let scores = q.matmul(&k.t()?)?;
        kernels::softmax_last_dim(scores)?.matmul(v)
    }
}

/// diffusers `Attention` as used inside transformer blocks: q/k/v projections without bias,
/// `to_out.0` with bias. Self-attention when no context is given.
#[derive(Debug, Clone)]
pub struct CrossAttention {
    to_q: Linear,
    to_k: Linear,
    to_v: Linear,
    to_out: Linear,
    heads: usize,
    scale: f64,
    upcast: bool,
}

impl CrossAttention {
    /// `context_dim`: width of the key/value source (`None`: same as `query_dim`).
    pub fn load(
        vb: VarBuilder,
        query_dim: usize,
        context_dim: Option<usize>,
        heads: usize,
        dim_head: usize,
        upcast: bool,
    ) -> Result<Self> {
        let inner = heads * dim_head;
        let ctx = context_dim.unwrap_or(query_dim);
        Ok(Self {
            to_q: Linear::load_no_bias(vb.pp("to_q"), query_dim, inner)?,
            to_k: Linear::load_no_bias(vb.pp("to_k"), ctx, inner)?,
            to_v: Linear::load_no_bias(vb.pp("to_v"), ctx, inner)?,
            to_out: Linear::load(vb.pp("to_out.0"), inner, query_dim)?,
            heads,
            scale: 1.0 / (dim_head as f64).sqrt(),
            upcast,
        })
    }

    /// `x`: `[batch, tokens, query_dim]`; `context`: `[batch, ctx_tokens, context_dim]`.
    pub fn forward(
        &self,
        x: &Tensor,
        context: Option<&Tensor>,
        opts: &AttentionOptions,
    ) -> Result<Tensor> {
        self.to_out.forward(&self.attend(x, context, opts)?)
    }

    /// `residual + self(x, context)`, the sum written by the output projection.
    pub fn forward_add(
        &self,
        x: &Tensor,
        context: Option<&Tensor>,
        opts: &AttentionOptions,
        residual: &Tensor,
    ) -> Result<Tensor> {
        self.to_out
            .forward_add(&self.attend(x, context, opts)?, residual)
    }

    /// The attention before the output projection.
    fn attend(
        &self,
        x: &Tensor,
        context: Option<&Tensor>,
        opts: &AttentionOptions,
    ) -> Result<Tensor> {
        let ctx = context.unwrap_or(x);
        let q = self.to_q.forward(x)?;
        let k = self.to_k.forward(ctx)?;
        let v = self.to_v.forward(ctx)?;
        scaled_dot_product_attention(&q, &k, &v, self.heads, self.scale, self.upcast, opts)
    }
}

/// diffusers `FeedForward` with `activation_fn="geglu"`: `net.0.proj` (to twice the inner width),
/// `hidden * gelu(gate)` with the *exact* (erf) GELU as torch's default, then `net.2`.
#[derive(Debug, Clone)]
pub struct FeedForward {
    hidden: Linear,
    gate: Linear,
    out: Linear,
}

impl FeedForward {
    /// `mult` is diffusers' width multiplier (4).
    pub fn load(vb: VarBuilder, dim: usize, mult: usize) -> Result<Self> {
        let inner = dim * mult;
        let proj = vb.pp("net.0.proj");
        let w = proj.get_with_hints((2 * inner, dim), "weight", WEIGHT_INIT)?;
        let bias = proj.get(2 * inner, "bias")?;
        // Split `net.0.proj` into its hidden and gate halves (row views, no copy): two products
        // give contiguous outputs, so the GELU and the product run on packed memory.
        let half = |t: &Tensor, i: usize| t.narrow(0, i * inner, inner);
        Ok(Self {
            hidden: Linear::new(half(&w, 0)?, Some(half(&bias, 0)?)),
            gate: Linear::new(half(&w, 1)?, Some(half(&bias, 1)?)),
            out: Linear::load(vb.pp("net.2"), inner, dim)?,
        })
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.out.forward(&self.gated(x)?)
    }

    /// `residual + self(x)`, the sum written by the output layer.
    pub fn forward_add(&self, x: &Tensor, residual: &Tensor) -> Result<Tensor> {
        self.out.forward_add(&self.gated(x)?, residual)
    }

    /// `hidden * gelu(gate)`, the input of the output layer.
    fn gated(&self, x: &Tensor) -> Result<Tensor> {
        let (hidden, gate) = (self.hidden.forward(x)?, self.gate.forward(x)?);
        profile::scope("geglu", x.device(), || kernels::mul_gelu(hidden, &gate))
    }
}

/// diffusers `BasicTransformerBlock` (layer-norm variant): self-attention, cross-attention,
/// GEGLU feed-forward, each pre-normed and residual.
#[derive(Debug, Clone)]
pub struct BasicTransformerBlock {
    norm1: LayerNorm,
    attn1: CrossAttention,
    norm2: LayerNorm,
    attn2: CrossAttention,
    norm3: LayerNorm,
    ff: FeedForward,
    only_cross_attention: bool,
}

/// 1e-5: `norm_eps` default of diffusers' `BasicTransformerBlock`.
const TRANSFORMER_LAYER_NORM_EPS: f64 = 1e-5;

impl BasicTransformerBlock {
    pub fn load(vb: VarBuilder, cfg: &SpatialTransformerConfig) -> Result<Self> {
        let dim = cfg.heads * cfg.dim_head;
        let ln = |name: &str| candle_nn::layer_norm(dim, TRANSFORMER_LAYER_NORM_EPS, vb.pp(name));
        let attn1_ctx = cfg.only_cross_attention.then_some(cfg.context_dim);
        Ok(Self {
            norm1: ln("norm1")?,
            attn1: CrossAttention::load(
                vb.pp("attn1"),
                dim,
                attn1_ctx,
                cfg.heads,
                cfg.dim_head,
                cfg.upcast_attention,
            )?,
            norm2: ln("norm2")?,
            attn2: CrossAttention::load(
                vb.pp("attn2"),
                dim,
                Some(cfg.context_dim),
                cfg.heads,
                cfg.dim_head,
                cfg.upcast_attention,
            )?,
            norm3: ln("norm3")?,
            ff: FeedForward::load(vb.pp("ff"), dim, 4)?,
            only_cross_attention: cfg.only_cross_attention,
        })
    }

    pub fn forward(&self, x: &Tensor, context: &Tensor, opts: &AttentionOptions) -> Result<Tensor> {
        let ctx1 = self.only_cross_attention.then_some(context);
        let ln = |n: &LayerNorm, x: &Tensor| {
            profile::scope("layer norm", x.device(), || kernels::layer_norm(x, n))
        };
        // Each skip connection is added by the sublayer's last product as it writes.
        let x = self
            .attn1
            .forward_add(&ln(&self.norm1, x)?, ctx1, opts, x)?;
        let x = self
            .attn2
            .forward_add(&ln(&self.norm2, &x)?, Some(context), opts, &x)?;
        self.ff.forward_add(&ln(&self.norm3, &x)?, &x)
    }
}

/// Shape of one `Transformer2DModel` (the UNet's spatial transformer).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SpatialTransformerConfig {
    /// Channels of the feature map it is applied to.
    pub channels: usize,
    pub heads: usize,
    pub dim_head: usize,
    /// Number of `BasicTransformerBlock`s (`transformer_layers_per_block`).
    pub depth: usize,
    /// Width of the text embeddings (`cross_attention_dim`).
    pub context_dim: usize,
    pub groups: usize,
    /// SD2/SDXL: linear `proj_in`/`proj_out`; SD1: 1x1 convolutions.
    pub use_linear_projection: bool,
    pub only_cross_attention: bool,
    pub upcast_attention: bool,
}

/// 1e-6: the group norm eps diffusers hard-codes in `Transformer2DModel`.
const SPATIAL_TRANSFORMER_NORM_EPS: f64 = 1e-6;

/// diffusers `Transformer2DModel` with continuous input.
#[derive(Debug, Clone)]
pub struct SpatialTransformer {
    norm: GroupNorm,
    proj_in: Linear,
    blocks: Vec<BasicTransformerBlock>,
    proj_out: Linear,
}

impl SpatialTransformer {
    pub fn load(vb: VarBuilder, cfg: &SpatialTransformerConfig) -> Result<Self> {
        let c = cfg.channels;
        let inner = cfg.heads * cfg.dim_head;
        // A 1x1 convolution is a per-pixel linear map, so SD1's conv projections load as linear
        // layers acting on tokens; both variants then share one code path.
        let proj = |name: &str, i: usize, o: usize| -> Result<Linear> {
            if cfg.use_linear_projection {
                Linear::load(vb.pp(name), i, o)
            } else {
                let p = vb.pp(name);
                let w = p.get_with_hints((o, i, 1, 1), "weight", WEIGHT_INIT)?;
                let w = w.reshape((o, i))?;
                Ok(Linear::new(w, Some(p.get(o, "bias")?)))
            }
        };
        let blocks = (0..cfg.depth)
            .map(|i| BasicTransformerBlock::load(vb.pp(format!("transformer_blocks.{i}")), cfg))
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            norm: GroupNorm::load(vb.pp("norm"), cfg.groups, c, SPATIAL_TRANSFORMER_NORM_EPS)?,
            proj_in: proj("proj_in", c, inner)?,
            blocks,
            proj_out: proj("proj_out", inner, c)?,
        })
    }

    /// `x`: `[batch, channels, h, w]`; `context`: `[batch, tokens, context_dim]`.
    pub fn forward(&self, x: &Tensor, context: &Tensor, opts: &AttentionOptions) -> Result<Tensor> {
        // Channels to tokens and back happen inside the projections' products (no transposing
        // copies on the CPU): `[b, c, h, w]` -> `[b, h*w, inner]` -> `x + [b, c, h, w]`.
        let mut t = self
            .proj_in
            .forward_channels_to_tokens(&self.norm.forward(x)?)?;
        for block in &self.blocks {
            t = block.forward(&t, context, opts)?;
        }
        self.proj_out.forward_tokens_to_channels_add(&t, x)
    }
}

/// The VAE mid-block attention (diffusers `Attention` with `group_norm`, residual connection,
/// biased projections and upcast softmax; one head for SD's VAE).
#[derive(Debug, Clone)]
pub struct SpatialSelfAttention {
    group_norm: GroupNorm,
    to_q: Linear,
    to_k: Linear,
    to_v: Linear,
    to_out: Linear,
    heads: usize,
    scale: f64,
}

impl SpatialSelfAttention {
    /// `head_dim` is diffusers' `attention_head_dim` (the VAE passes its channel count: 1 head).
    pub fn load(
        vb: VarBuilder,
        channels: usize,
        head_dim: usize,
        groups: usize,
        eps: f64,
    ) -> Result<Self> {
        if head_dim == 0 || !channels.is_multiple_of(head_dim) {
            candle_core::bail!("VAE attention: {channels} channels, head dim {head_dim}");
        }
        // Files written by diffusers before 0.14 use query/key/value/proj_attn; diffusers still
        // renames them on load, so we accept both.
        let old = vb.contains_tensor("query.weight");
        let name = |new: &'static str, legacy: &'static str| if old { legacy } else { new };
        let lin = |n: &str| Linear::load(vb.pp(n), channels, channels);
        Ok(Self {
            group_norm: GroupNorm::load(vb.pp("group_norm"), groups, channels, eps)?,
            to_q: lin(name("to_q", "query"))?,
            to_k: lin(name("to_k", "key"))?,
            to_v: lin(name("to_v", "value"))?,
            to_out: lin(name("to_out.0", "proj_attn"))?,
            heads: channels / head_dim,
            scale: 1.0 / (head_dim as f64).sqrt(),
        })
    }

    pub fn forward(&self, x: &Tensor, opts: &AttentionOptions) -> Result<Tensor> {
        // Each projection reads the normed channels as tokens in place (see `Linear`).
        let n = self.group_norm.forward(x)?;
        let q = self.to_q.forward_channels_to_tokens(&n)?;
        let k = self.to_k.forward_channels_to_tokens(&n)?;
        let v = self.to_v.forward_channels_to_tokens(&n)?;
        let o = scaled_dot_product_attention(&q, &k, &v, self.heads, self.scale, true, opts)?;
        self.to_out.forward_tokens_to_channels_add(&o, x)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, D};

    fn reference(q: &Tensor, k: &Tensor, v: &Tensor, heads: usize, scale: f64) -> Tensor {
        // Textbook attention with explicit contiguous copies, as an independent check.
        let (b, sq, inner) = q.dims3().unwrap();
        let sk = k.dim(1).unwrap();
        let d = inner / heads;
        let sp = |t: &Tensor, s| {
            t.reshape((b, s, heads, d))
                .unwrap()
                .transpose(1, 2)
                .unwrap()
                .contiguous()
                .unwrap()
        };
        let (q, k, v) = (sp(q, sq), sp(k, sk), sp(v, sk));
        let s = (q.matmul(&k.t().unwrap().contiguous().unwrap()).unwrap() * scale).unwrap();
        let p = candle_nn::ops::softmax(&s, D::Minus1).unwrap();
        p.matmul(&v)
            .unwrap()
            .transpose(1, 2)
            .unwrap()
            .reshape((b, sq, inner))
            .unwrap()
    }

    fn max_abs(a: &Tensor, b: &Tensor) -> f32 {
        (a - b)
            .unwrap()
            .abs()
            .unwrap()
            .flatten_all()
            .unwrap()
            .max(0)
            .unwrap()
            .to_scalar()
            .unwrap()
    }

    /// Seeded normal values ([`crate::rng::seeded_normal`]).
    fn randn(seed: u64, shape: &[usize]) -> Tensor {
        crate::rng::seeded_normal(seed, 0., 1., shape).unwrap()
    }

    #[test]
    fn chunked_and_sliced_match_textbook_attention() {
        let q = randn(1, &[2, 37, 24]);
        let k = randn(2, &[2, 11, 24]);
        let v = randn(3, &[2, 11, 24]);
        let want = reference(&q, &k, &v, 3, 0.35);
        for opts in [
            AttentionOptions::plain(),
            AttentionOptions::default(),
            // 50 scores / (3 heads * 11 keys) = 1 query per chunk.
            AttentionOptions {
                max_scores: 50,
                head_slice: None,
                fused: false,
            },
            AttentionOptions::sliced(100),
            AttentionOptions {
                max_scores: 200,
                head_slice: Some(2),
                fused: false,
            },
        ] {
            let got = scaled_dot_product_attention(&q, &k, &v, 3, 0.35, false, &opts).unwrap();
            assert_eq!(got.dims(), &[2, 37, 24]);
            // f32 products of 8-wide rows: differences are rounding only.
            assert!(max_abs(&got, &want) < 1e-5, "{opts:?}");
        }
    }

    #[test]
    fn mismatched_shapes_are_errors_not_panics() {
        let dev = Device::Cpu;
        let q = Tensor::zeros((1, 4, 8), DType::F32, &dev).unwrap();
        let k = Tensor::zeros((1, 3, 6), DType::F32, &dev).unwrap();
        let opts = AttentionOptions::default();
        assert!(scaled_dot_product_attention(&q, &k, &k, 2, 1.0, false, &opts).is_err());
        assert!(scaled_dot_product_attention(&q, &q, &q, 3, 1.0, false, &opts).is_err());
    }
}
