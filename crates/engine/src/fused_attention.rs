//! Tiled CPU attention with an online softmax ("flash attention" on the CPU): for each batch,
//! head and block of queries it walks the keys in blocks, keeping a running row maximum and sum,
//! so the `[queries, keys]` score matrix is never materialised. Only one score tile per thread
//! exists at a time, small enough to stay in L2 cache, and the output is written straight into
//! `[batch, queries, heads * dim]` order: no transposed copies of q, k, v or the result.
//!
//! The tile products go through the `gemm` crate (the kernel candle's own CPU matmul uses, with
//! runtime AVX2/FMA dispatch), single-threaded per tile: the parallelism here is over
//! (batch, head, query block) units, which keeps each thread's working set private.

use candle_core::{CpuStorage, CustomOp3, Layout, Result, Shape, Tensor};

use crate::kernels::{self, SendPtr};

/// Queries per tile. 128 rows keep one tile's scores (128 x 256 f32 = 128 KiB) and its output
/// rows in L2 while giving the products enough rows to run at full speed.
const Q_BLOCK: usize = 128;
/// Keys per tile.
const K_BLOCK: usize = 256;

struct FusedAttention {
    heads: usize,
    scale: f32,
}

impl CustomOp3 for FusedAttention {
    fn name(&self) -> &'static str {
        "ld-fused-attention"
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
        let q = kernels::contiguous_f32(s1, l1, self.name())?;
        let k = kernels::contiguous_f32(s2, l2, self.name())?;
        let v = kernels::contiguous_f32(s3, l3, self.name())?;
        let (b, sq, inner) = l1.shape().dims3()?;
        let (bk, sk, inner_k) = l2.shape().dims3()?;
        if l3.shape().dims() != l2.shape().dims() || bk != b || inner_k != inner {
            candle_core::bail!("{}: q, k, v shapes do not fit", self.name());
        }
        if self.heads == 0 || !inner.is_multiple_of(self.heads) || sk == 0 {
            candle_core::bail!("{}: bad head count or no keys", self.name());
        }
        let d = inner / self.heads;
        let mut out = vec![0f32; b * sq * inner];
        let q_blocks = sq.div_ceil(Q_BLOCK);
        let units = b * self.heads * q_blocks;
        let threads = candle_core::utils::get_num_threads().clamp(1, units);
        let shape = Dims { sq, sk, inner, d };
        let out_ptr = SendPtr(out.as_mut_ptr());
        let run = |first: usize, last: usize| {
            let mut scratch = Scratch::new(d);
            for unit in first..last {
                let bh = unit / q_blocks;
                let q0 = (unit % q_blocks) * Q_BLOCK;
                let (bi, h) = (bh / self.heads, bh % self.heads);
                // SAFETY: each unit writes only its own rows x head columns of `out`, and units
                // are disjoint, so no two threads write the same element.
                unsafe {
                    attend_tile(
                        &shape,
                        self.scale,
                        q,
                        k,
                        v,
                        out_ptr,
                        bi,
                        h,
                        q0,
                        &mut scratch,
                    );
                }
            }
        };
        if threads == 1 {
            run(0, units);
        } else {
            let per = units.div_ceil(threads);
            std::thread::scope(|s| {
                for t in 0..threads {
                    let (first, last) = (t * per, ((t + 1) * per).min(units));
                    let run = &run;
                    s.spawn(move || run(first, last));
                }
            });
        }
        Ok((CpuStorage::F32(out), Shape::from((b, sq, inner))))
    }
}

/// Sizes one attention call shares.
struct Dims {
    sq: usize,
    sk: usize,
    inner: usize,
    d: usize,
}

/// Per-thread buffers, reused across units.
struct Scratch {
    /// Scaled queries of the tile, `[Q_BLOCK, d]` packed.
    q: Vec<f32>,
    /// Scores, then probabilities, `[Q_BLOCK, K_BLOCK]`.
    s: Vec<f32>,
    /// Output accumulator `[Q_BLOCK, d]`.
    o: Vec<f32>,
    /// Running row maximum and sum of exponentials.
    max: Vec<f32>,
    sum: Vec<f32>,
    /// Per row, the factor the last tile rescaled the accumulator by.
    alpha: Vec<f32>,
}

impl Scratch {
    fn new(d: usize) -> Self {
        Self {
            q: vec![0.0; Q_BLOCK * d],
            s: vec![0.0; Q_BLOCK * K_BLOCK],
            o: vec![0.0; Q_BLOCK * d],
            max: vec![0.0; Q_BLOCK],
            sum: vec![0.0; Q_BLOCK],
            alpha: vec![1.0; Q_BLOCK],
        }
    }
}

/// One (batch, head, query block) unit.
///
/// # Safety
/// `out` must point to `b * sq * inner` f32s, and no other thread may write this unit's elements.
#[allow(clippy::too_many_arguments)]
unsafe fn attend_tile(
    sh: &Dims,
    scale: f32,
    q: &[f32],
    k: &[f32],
    v: &[f32],
    out: SendPtr,
    bi: usize,
    h: usize,
    q0: usize,
    sc: &mut Scratch,
) {
    let (sq, sk, inner, d) = (sh.sq, sh.sk, sh.inner, sh.d);
    let rows = Q_BLOCK.min(sq - q0);
    let col = h * d;
    // Scaling q (rows x d) is cheaper than scaling every score (rows x keys).
    for r in 0..rows {
        let src = &q[(bi * sq + q0 + r) * inner + col..][..d];
        for (dst, &x) in sc.q[r * d..(r + 1) * d].iter_mut().zip(src) {
            *dst = x * scale;
        }
    }
    sc.max[..rows].fill(f32::NEG_INFINITY);
    sc.sum[..rows].fill(0.0);
    sc.o[..rows * d].fill(0.0);
    let kbase = bi * sk * inner + col;
    for k0 in (0..sk).step_by(K_BLOCK) {
        let keys = K_BLOCK.min(sk - k0);
        // scores[rows, keys] = q_tile[rows, d] @ k_tile^T: rhs element (i, j) is k[k0 + j][i].
        gemm::gemm(
            rows,
            keys,
            d,
            sc.s.as_mut_ptr(),
            1,
            keys as isize,
            false,
            sc.q.as_ptr(),
            1,
            d as isize,
            k.as_ptr().add(kbase + k0 * inner),
            inner as isize,
            1,
            0.0,
            1.0,
            false,
            false,
            false,
            gemm::Parallelism::None,
        );
        let rescale = kernels::online_softmax_tile(
            &mut sc.s[..rows * keys],
            keys,
            &mut sc.max[..rows],
            &mut sc.sum[..rows],
            &mut sc.alpha[..rows],
        );
        if rescale {
            // A row's maximum grew: its accumulated output was weighted against the old one.
            for (o, &a) in sc.o[..rows * d].chunks_exact_mut(d).zip(&sc.alpha) {
                if a != 1.0 {
                    o.iter_mut().for_each(|x| *x *= a);
                }
            }
        }
        // o[rows, d] += p[rows, keys] @ v_tile[keys, d].
        gemm::gemm(
            rows,
            d,
            keys,
            sc.o.as_mut_ptr(),
            1,
            d as isize,
            true,
            sc.s.as_ptr(),
            1,
            keys as isize,
            v.as_ptr().add(kbase + k0 * inner),
            1,
            inner as isize,
            1.0,
            1.0,
            false,
            false,
            false,
            gemm::Parallelism::None,
        );
    }
    for r in 0..rows {
        let inv = 1.0 / sc.sum[r];
        let dst = out.0.add((bi * sq + q0 + r) * inner + col);
        for (i, &x) in sc.o[r * d..(r + 1) * d].iter().enumerate() {
            *dst.add(i) = x * inv;
        }
    }
}

/// Attention `softmax(q k^T * scale) v` on CPU f32 contiguous `[batch, tokens, heads * dim]`
/// tensors, without materialising the scores. Returns `None` when the inputs do not fit this path
/// (other device, dtype or layout); the caller then uses the plain path.
pub(crate) fn attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    heads: usize,
    scale: f64,
) -> Option<Result<Tensor>> {
    if !(kernels::cpu_f32(q) && kernels::cpu_f32(k) && kernels::cpu_f32(v)) {
        return None;
    }
    let op = FusedAttention {
        heads,
        scale: scale as f32,
    };
    Some(q.apply_op3_no_bwd(k, v, &op))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::attention::{scaled_dot_product_attention, AttentionOptions};
    use candle_core::Device;

    fn max_abs(a: &Tensor, b: &Tensor) -> f32 {
        let d = (a - b).unwrap().abs().unwrap().flatten_all().unwrap();
        d.max(0).unwrap().to_scalar().unwrap()
    }

    /// Seeded normal values ([`crate::rng::seeded_normal`]).
    fn randn(seed: u64, std: f64, shape: &[usize]) -> Tensor {
        crate::rng::seeded_normal(seed, 0., std, shape).unwrap()
    }

    /// Against the plain path (whole score matrix, candle matmuls and softmax), with shapes that
    /// give partial query and key tiles, several key tiles (so the running maximum and the
    /// accumulator rescaling are exercised) and several units per thread.
    #[test]
    fn fused_attention_matches_plain_attention() {
        for (b, sq, sk, heads, d, spread) in [
            (2, 300, 600, 3, 8, 3.0),
            (1, 130, 77, 2, 40, 1.0),
            (1, 5, 1, 1, 4, 1.0),
            // Large scores: later tiles raise the running maximum by a lot.
            (1, 64, 700, 1, 16, 8.0),
        ] {
            let q = randn(1, spread, &[b, sq, heads * d]);
            let k = randn(2, 1., &[b, sk, heads * d]);
            let v = randn(3, 1., &[b, sk, heads * d]);
            let scale = 1.0 / (d as f64).sqrt();
            let plain = AttentionOptions::plain();
            let want =
                scaled_dot_product_attention(&q, &k, &v, heads, scale, false, &plain).unwrap();
            let got = attention(&q, &k, &v, heads, scale).unwrap().unwrap();
            assert_eq!(got.dims(), want.dims());
            // Outputs are convex combinations of N(0, 1) values: f32 rounding in a different
            // summation order stays well under 1e-5.
            let diff = max_abs(&got, &want);
            assert!(diff < 1e-5, "b{b} sq{sq} sk{sk} h{heads} d{d}: {diff}");
        }
    }

    #[test]
    fn other_dtypes_are_left_to_the_plain_path() {
        let dev = Device::Cpu;
        let q = Tensor::zeros((1, 4, 8), candle_core::DType::F16, &dev).unwrap();
        assert!(attention(&q, &q, &q, 2, 1.0).is_none());
    }
}
