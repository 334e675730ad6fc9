//! Tiled CPU attention with an online softmax ("flash attention" on the CPU): for each batch,
//! head and block of queries it walks the keys in blocks, keeping a running row maximum and sum,
//! so the `[queries, keys]` score matrix is never materialised. Only one score tile per thread
//! exists at a time, small enough to stay in L2 cache, and the output is written straight into
//! `[batch, queries, heads * dim]` order: no transposed copy of q or of the result.
//!
//! Parallelism is over (batch, head, query block) units, which keeps each thread's working set
//! private. The two tile products run in one of three ways:
//! - On x86-64 with AVX-512, through the 16-lane micro-kernels in [`avx512`] (any head size;
//!   1.8-2x the AVX2 loop on a Zen 5, whose vector units are 512 bits wide).
//! - On x86-64 with AVX2 and FMA, when the head size is a multiple of 8 (every Stable Diffusion
//!   model: 40, 64, 80, 160, and the VAE's 512), through the register-blocked micro-kernels in
//!   [`micro`], written by hand: the keys and values are packed once per call (keys in 16-key
//!   panels for the score kernel, values in 16-column runs for the value kernel), each kernel
//!   keeps a 6-row block of its output in registers, the softmax runs in vector registers too,
//!   and the value kernel folds in the softmax's rescaling of the accumulator. The head sizes
//!   are small (40 in SD 1.5's largest layers), where a general matrix-product routine spends
//!   much of each small tile product on packing its operands again and on its set-up.
//! - Elsewhere through the `gemm` crate (the kernel candle's own CPU matmul uses), one
//!   single-threaded product per tile.

use candle_core::{CpuStorage, CustomOp3, Layout, Result, Shape, Tensor};

use crate::kernels::{self, SendPtr};

#[cfg(target_arch = "x86_64")]
mod avx512;

/// Queries per tile. 128 rows keep one tile's scores (128 x 256 f32 = 128 KiB) and its output
/// rows in L2 while giving the products enough rows to run at full speed.
const Q_BLOCK: usize = 128;
/// Keys per tile (a whole number of [`micro::PANEL`]s).
const K_BLOCK: usize = 256;

struct FusedAttention {
    heads: usize,
    scale: f32,
    /// The tile loop to run; `None`: the fastest one this CPU has for the head size (tests
    /// force each in turn to compare them).
    path: Option<Path>,
    /// The AVX-512 loop's products in bf16; `None`: where the bf16 switch is on
    /// ([`crate::bf16_gemm::active`]).
    bf16: Option<bool>,
}

/// The tile loops.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Path {
    /// `gemm` tile products: any CPU, any head size.
    Gemm,
    /// The AVX2 micro-kernels ([`micro`]).
    Avx2,
    /// The AVX-512 micro-kernels ([`avx512`]).
    Avx512,
}

impl Path {
    /// Whether this loop runs here for heads of `d` values.
    fn fits(self, d: usize) -> bool {
        match self {
            Path::Gemm => true,
            #[cfg(target_arch = "x86_64")]
            Path::Avx2 => micro::fits(d),
            #[cfg(target_arch = "x86_64")]
            Path::Avx512 => avx512::fits(d),
            #[cfg(not(target_arch = "x86_64"))]
            _ => false,
        }
    }

    /// The fastest loop that runs here for heads of `d` values.
    fn best(d: usize) -> Self {
        [Path::Avx512, Path::Avx2]
            .into_iter()
            .find(|p| p.fits(d))
            .unwrap_or(Path::Gemm)
    }
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
        let mut out = crate::kernels::zeros::<f32>(b * sq * inner);
        let shape = Dims {
            batch: b,
            sq,
            sk,
            inner,
            d,
            heads: self.heads,
        };
        let out_ptr = SendPtr(out.as_mut_ptr());
        let path = match self.path {
            Some(p) if p.fits(d) => p,
            Some(p) => candle_core::bail!("{}: {p:?} does not run here for d = {d}", self.name()),
            None => Path::best(d),
        };
        match path {
            #[cfg(target_arch = "x86_64")]
            Path::Avx512 => {
                // Packed once here rather than per tile: every query block of a head reuses
                // them.
                let bf16 = self.bf16.unwrap_or_else(crate::bf16_gemm::active);
                if bf16 && !avx512::bf16_fits() {
                    candle_core::bail!("{}: {}", self.name(), crate::bf16_gemm::UNSUPPORTED);
                }
                let packed = avx512::Packed::new(k, v, &shape, bf16);
                let o_width = avx512::padded(d);
                for_each_tile(&shape, avx512::Q_BLOCK, o_width, |t, scratch| {
                    // SAFETY: units are disjoint (see `for_each_tile`), `packed` was packed for
                    // these shapes, the scratch sized for this loop, and `fits` checked the
                    // CPU's features.
                    unsafe {
                        avx512::attend_tile(&shape, self.scale, q, &packed, out_ptr, t, scratch)
                    }
                });
            }
            #[cfg(target_arch = "x86_64")]
            Path::Avx2 => {
                let packed = micro::Packed {
                    keys: micro::pack_keys(k, &shape),
                    values: micro::pack_values(v, &shape),
                };
                for_each_tile(&shape, Q_BLOCK, d, |t, scratch| {
                    // SAFETY: as above.
                    unsafe {
                        micro::attend_tile(&shape, self.scale, q, &packed, out_ptr, t, scratch)
                    }
                });
            }
            _ => for_each_tile(&shape, Q_BLOCK, d, |t, scratch| {
                // SAFETY: units are disjoint (see `for_each_tile`).
                unsafe { attend_tile(&shape, self.scale, q, k, v, out_ptr, t, scratch) }
            }),
        }
        Ok((CpuStorage::F32(out), Shape::from((b, sq, inner))))
    }
}

/// Runs `f` on every (batch, head, block of `q_block` queries) unit, in one contiguous run of
/// units per compute thread, each thread with its own scratch buffers (output rows
/// `o_width` wide). Each unit writes only its own query rows x head columns of the output, so
/// no two threads write the same element.
fn for_each_tile<F>(sh: &Dims, q_block: usize, o_width: usize, f: F)
where
    F: Fn(&Tile, &mut Scratch) + Sync,
{
    let q_blocks = sh.sq.div_ceil(q_block);
    let units = sh.batch * sh.heads * q_blocks;
    let threads = candle_core::utils::get_num_threads().clamp(1, units.max(1));
    let run = |first: usize, last: usize| {
        let mut scratch = Scratch::new(q_block, sh.d, o_width);
        for unit in first..last {
            let bh = unit / q_blocks;
            let tile = Tile {
                bi: bh / sh.heads,
                h: bh % sh.heads,
                q0: (unit % q_blocks) * q_block,
            };
            f(&tile, &mut scratch);
        }
    };
    if threads == 1 {
        run(0, units);
    } else {
        let per = units.div_ceil(threads);
        rayon::scope(|s| {
            for t in 0..threads {
                let (first, last) = (t * per, ((t + 1) * per).min(units));
                let run = &run;
                s.spawn(move |_| run(first, last));
            }
        });
    }
}

/// Which (batch, head, query block) a unit is.
struct Tile {
    bi: usize,
    h: usize,
    q0: usize,
}

/// Sizes one attention call shares.
struct Dims {
    batch: usize,
    sq: usize,
    sk: usize,
    inner: usize,
    d: usize,
    heads: usize,
}

/// Per-thread buffers, reused across units.
struct Scratch {
    /// Queries per tile.
    q_block: usize,
    /// Scaled queries of the tile, `[q_block, d]` packed.
    q: Vec<f32>,
    /// Scores, then probabilities, `[q_block, K_BLOCK]`.
    s: Vec<f32>,
    /// Output accumulator, `q_block` rows (`d` wide, or as wide as the loop pads them).
    o: Vec<f32>,
    /// The AVX-512 loop's bf16 pairs (as f32 bits) of the queries and of one key tile's
    /// probabilities; empty until it runs with bf16 products.
    qb: Vec<f32>,
    pb: Vec<f32>,
    /// Running row maximum and sum of exponentials.
    max: Vec<f32>,
    sum: Vec<f32>,
    /// Per row, the factor the last tile rescaled the accumulator by.
    alpha: Vec<f32>,
}

impl Scratch {
    fn new(q_block: usize, d: usize, o_width: usize) -> Self {
        Self {
            q_block,
            q: vec![0.0; q_block * d],
            s: vec![0.0; q_block * K_BLOCK],
            o: vec![0.0; q_block * o_width],
            qb: Vec::new(),
            pb: Vec::new(),
            max: vec![0.0; q_block],
            sum: vec![0.0; q_block],
            alpha: vec![1.0; q_block],
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
    t: &Tile,
    sc: &mut Scratch,
) {
    let (sk, inner, d) = (sh.sk, sh.inner, sh.d);
    let rows = load_queries(sh, scale, q, t, sc);
    sc.o[..rows * d].fill(0.0);
    let kbase = t.bi * sk * inner + t.h * d;
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
    store_rows(sh, out, t, rows, sc);
}

/// Copies the tile's queries, scaled, into `sc.q` (`[rows, d]`), resets the running maximum
/// and sum, and returns the number of rows.
fn load_queries(sh: &Dims, scale: f32, q: &[f32], t: &Tile, sc: &mut Scratch) -> usize {
    let (sq, inner, d) = (sh.sq, sh.inner, sh.d);
    let rows = sc.q_block.min(sq - t.q0);
    let col = t.h * d;
    // Scaling q (rows x d) is cheaper than scaling every score (rows x keys).
    for r in 0..rows {
        let src = &q[(t.bi * sq + t.q0 + r) * inner + col..][..d];
        for (dst, &x) in sc.q[r * d..(r + 1) * d].iter_mut().zip(src) {
            *dst = x * scale;
        }
    }
    sc.max[..rows].fill(f32::NEG_INFINITY);
    sc.sum[..rows].fill(0.0);
    rows
}

/// Writes the tile's accumulated rows, divided by their softmax sums, into `out`.
///
/// # Safety
/// As for [`attend_tile`].
unsafe fn store_rows(sh: &Dims, out: SendPtr, t: &Tile, rows: usize, sc: &Scratch) {
    let d = sh.d;
    for r in 0..rows {
        let inv = 1.0 / sc.sum[r];
        let dst = out.0.add((t.bi * sh.sq + t.q0 + r) * sh.inner + t.h * d);
        for (i, &x) in sc.o[r * d..(r + 1) * d].iter().enumerate() {
            *dst.add(i) = x * inv;
        }
    }
}

/// The AVX2/FMA tile loop: register-blocked micro-kernels for the two tile products, written
/// by hand with `std::arch` intrinsics (no crate offers small fused attention tiles on the CPU).
#[cfg(target_arch = "x86_64")]
mod micro {
    use std::arch::x86_64::*;

    use super::{load_queries, store_rows, Dims, Scratch, Tile, K_BLOCK};
    use crate::kernels::{self, SendPtr};

    /// The keys and values of every (batch, head), laid out for the kernels.
    pub(super) struct Packed {
        pub(super) keys: Lines,
        pub(super) values: Lines,
    }

    /// One 64-byte cache line of f32s.
    #[derive(Clone, Copy)]
    #[repr(C, align(64))]
    struct Line([f32; 16]);

    /// A zeroed f32 buffer that starts on a cache line, so each 16-key row of a key panel and
    /// each row of a 16-column value run is one whole line, and no vector load straddles two.
    pub(super) struct Lines {
        lines: Vec<Line>,
        len: usize,
    }

    impl Lines {
        pub(super) fn zeroed(len: usize) -> Self {
            Self {
                lines: vec![Line([0.0; 16]); len.div_ceil(16)],
                len,
            }
        }

        pub(super) fn as_slice(&self) -> &[f32] {
            // SAFETY: `Line` is `repr(C)` around `[f32; 16]` (no padding), so the lines are
            // `16 * lines.len() >= len` contiguous, initialised f32s.
            unsafe { std::slice::from_raw_parts(self.lines.as_ptr().cast(), self.len) }
        }

        pub(super) fn as_mut_slice(&mut self) -> &mut [f32] {
            // SAFETY: as in `as_slice`, borrowed mutably.
            unsafe { std::slice::from_raw_parts_mut(self.lines.as_mut_ptr().cast(), self.len) }
        }
    }

    /// Keys per packed panel: the score kernel's width, two 8-lane vectors.
    pub(super) const PANEL: usize = 16;
    /// Query rows per score micro-tile: 6 rows x 2 vectors = 12 accumulators, which leaves
    /// registers for the two key vectors and the broadcast query value (16 in all).
    const SCORE_ROWS: usize = 6;
    /// The value micro-tiles: 6 rows x 2 vectors or 8 rows x 1 vector of the output, so at most
    /// 12 accumulators, the value vectors and a broadcast probability live in the 16 registers.
    /// (4 rows x 3 vectors also makes 12 accumulators, but with its three value vectors it
    /// needs all 16, and the compiler then keeps an accumulator on the stack: measured 1.7x
    /// slower per multiply-add than the score kernel.)
    const VALUE_ROWS_2: usize = 6;
    const VALUE_ROWS_1: usize = 8;

    /// Whether the micro-kernels run here for heads of `d` values.
    pub(super) fn fits(d: usize) -> bool {
        d > 0
            && d.is_multiple_of(8)
            && std::arch::is_x86_feature_detected!("avx2")
            && std::arch::is_x86_feature_detected!("fma")
    }

    /// `k` (`[batch, keys, heads * d]`) as, per (batch, head), `ceil(keys / 16)` panels of
    /// `[d][16]`: key `j` of a panel in lane `j`, the missing keys of the last panel zero. The
    /// score kernel then reads each of its steps' 16 keys as two aligned-in-order vectors.
    pub(super) fn pack_keys(k: &[f32], sh: &Dims) -> Lines {
        let (batch, sk, inner, d, heads) = (sh.batch, sh.sk, sh.inner, sh.d, sh.heads);
        let per_head = sk.div_ceil(PANEL) * d * PANEL;
        let mut out = Lines::zeroed(batch * heads * per_head);
        kernels::par_units(out.as_mut_slice(), None, per_head, |part, _, first| {
            for (n, dst) in part.chunks_exact_mut(per_head).enumerate() {
                let (bi, h) = ((first + n) / heads, (first + n) % heads);
                for j in 0..sk {
                    let src = &k[(bi * sk + j) * inner + h * d..][..d];
                    let panel = &mut dst[(j / PANEL) * d * PANEL + j % PANEL..];
                    for (i, &x) in src.iter().enumerate() {
                        panel[i * PANEL] = x;
                    }
                }
            }
        });
        out
    }

    /// `v` (`[batch, keys, heads * d]`) as, per (batch, head), the head's columns in runs of
    /// 16 (the last run 8 when `d` is not a multiple of 16), each run `[keys][16]`. The value
    /// kernel then reads one cache line per key, in order, and a key tile's run (16 KiB) stays
    /// in L1 while every query row block of the tile uses it. Read in place (rows 1280 bytes
    /// apart in SD 1.5's 4096-token layers), it was fetched from L2 for every row block.
    pub(super) fn pack_values(v: &[f32], sh: &Dims) -> Lines {
        let (batch, sk, inner, d, heads) = (sh.batch, sh.sk, sh.inner, sh.d, sh.heads);
        let per_head = sk * d;
        let mut out = Lines::zeroed(batch * heads * per_head);
        kernels::par_units(out.as_mut_slice(), None, per_head, |part, _, first| {
            for (n, dst) in part.chunks_exact_mut(per_head).enumerate() {
                let (bi, h) = ((first + n) / heads, (first + n) % heads);
                let mut c = 0;
                while c < d {
                    let w = value_run(d - c);
                    let run = &mut dst[c * sk..][..sk * w];
                    for (j, row) in run.chunks_exact_mut(w).enumerate() {
                        row.copy_from_slice(&v[(bi * sk + j) * inner + h * d + c..][..w]);
                    }
                    c += w;
                }
            }
        });
        out
    }

    /// Width of the value run that starts where `left` columns of the head remain.
    fn value_run(left: usize) -> usize {
        left.min(16)
    }

    /// One (batch, head, query block) unit, as [`super::attend_tile`] computes it.
    ///
    /// # Safety
    /// As for [`super::attend_tile`]; `packed` holds [`pack_keys`]' and [`pack_values`]' output
    /// for these shapes, and [`fits`] holds for `sh.d`.
    #[allow(clippy::too_many_arguments)]
    pub(super) unsafe fn attend_tile(
        sh: &Dims,
        scale: f32,
        q: &[f32],
        packed: &Packed,
        out: SendPtr,
        t: &Tile,
        sc: &mut Scratch,
    ) {
        let (sk, d) = (sh.sk, sh.d);
        let rows = load_queries(sh, scale, q, t, sc);
        let per_head = sk.div_ceil(PANEL) * d * PANEL;
        let bh = t.bi * sh.heads + t.h;
        let keys_of_head = &packed.keys.as_slice()[bh * per_head..][..per_head];
        let values_of_head = &packed.values.as_slice()[bh * sk * d..][..sk * d];
        for k0 in (0..sk).step_by(K_BLOCK) {
            let keys = K_BLOCK.min(sk - k0);
            // Panel k0 / 16 starts at (k0 / 16) * d * 16 = k0 * d.
            scores(
                &sc.q[..rows * d],
                d,
                &keys_of_head[k0 * d..],
                keys.div_ceil(PANEL),
                &mut sc.s,
                K_BLOCK,
            );
            softmax_tile(
                &mut sc.s[..rows * K_BLOCK],
                K_BLOCK,
                keys,
                &mut sc.max[..rows],
                &mut sc.sum[..rows],
                &mut sc.alpha[..rows],
            );
            values(
                &sc.s,
                K_BLOCK,
                rows,
                keys,
                values_of_head,
                k0,
                &sc.alpha,
                k0 == 0,
                &mut sc.o,
                d,
            );
        }
        store_rows(sh, out, t, rows, sc);
    }

    /// One key tile of the online softmax, as [`kernels::online_softmax_tile`] computes it, in
    /// registers: the portable version's exponential needs more constants and temporaries than
    /// there are vector registers, and the compiler kept its running sum on the stack, which
    /// made each step wait on a store and a load (a quarter of the tile's time in a profile).
    #[target_feature(enable = "avx2,fma")]
    fn softmax_tile(
        s: &mut [f32],
        stride: usize,
        keys: usize,
        max: &mut [f32],
        sum: &mut [f32],
        alpha: &mut [f32],
    ) {
        let whole = keys / 8 * 8;
        for (((row, m), l), a) in s.chunks_mut(stride).zip(max).zip(sum).zip(alpha) {
            let row = &mut row[..keys];
            let (body, tail) = row.split_at_mut(whole);
            let mut top = _mm256_set1_ps(*m);
            for c in body.chunks_exact(8) {
                // SAFETY: `c` holds 8 values.
                top = _mm256_max_ps(top, unsafe { _mm256_loadu_ps(c.as_ptr()) });
            }
            let mut m_new = lanes(top).into_iter().fold(*m, f32::max);
            for &x in tail.iter() {
                m_new = m_new.max(x);
            }
            let shift = _mm256_set1_ps(m_new);
            let mut total = _mm256_setzero_ps();
            for c in body.chunks_exact_mut(8) {
                // SAFETY: `c` holds 8 values.
                unsafe {
                    let e = exp(_mm256_sub_ps(_mm256_loadu_ps(c.as_ptr()), shift));
                    _mm256_storeu_ps(c.as_mut_ptr(), e);
                    total = _mm256_add_ps(total, e);
                }
            }
            if !tail.is_empty() {
                // The partial vector goes through a padded copy; exp(-inf) is 0.
                let mut buf = [f32::NEG_INFINITY; 8];
                buf[..tail.len()].copy_from_slice(tail);
                // SAFETY: `buf` holds 8 values.
                unsafe {
                    let e = exp(_mm256_sub_ps(_mm256_loadu_ps(buf.as_ptr()), shift));
                    _mm256_storeu_ps(buf.as_mut_ptr(), e);
                    total = _mm256_add_ps(total, e);
                }
                tail.copy_from_slice(&buf[..tail.len()]);
            }
            // exp(-inf) = 0 for the first tile: the empty accumulator needs no weight.
            *a = _mm256_cvtss_f32(exp(_mm256_set1_ps(*m - m_new)));
            *l = (*l).mul_add(*a, lanes(total).iter().sum::<f32>());
            *m = m_new;
        }
    }

    /// The 8 lanes of `x`, to fold once per row.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    fn lanes(x: __m256) -> [f32; 8] {
        let mut out = [0f32; 8];
        // SAFETY: `out` holds 8 values.
        unsafe { _mm256_storeu_ps(out.as_mut_ptr(), x) };
        out
    }

    /// `exp(x)` for 8 lanes: the same operations as `kernels::exp_f32` (Cephes' polynomial, with
    /// fused multiply-adds), so both paths give the same bits. Inputs below -87.33 give 0, NaN
    /// stays NaN; the inputs here are scores minus their row maximum, never above 0, so the
    /// upper clamp of the scalar version is left out.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    pub(super) fn exp(x: __m256) -> __m256 {
        const ROUND: f32 = 12_582_912.0;
        let lo = _mm256_set1_ps(-87.33);
        let round = _mm256_set1_ps(ROUND);
        // max(lo, x) returns x when x is NaN.
        let xc = _mm256_max_ps(lo, x);
        let t = _mm256_fmadd_ps(xc, _mm256_set1_ps(std::f32::consts::LOG2_E), round);
        let n = _mm256_sub_ps(t, round);
        let r = _mm256_fmadd_ps(n, _mm256_set1_ps(-0.693_359_4), xc);
        let r = _mm256_fmadd_ps(n, _mm256_set1_ps(2.121_944_4e-4), r);
        let ni = _mm256_sub_epi32(_mm256_castps_si256(t), _mm256_castps_si256(round));
        let scale = _mm256_castsi256_ps(_mm256_slli_epi32(
            _mm256_add_epi32(ni, _mm256_set1_epi32(127)),
            23,
        ));
        let mut p = _mm256_set1_ps(1.987_569_1e-4);
        for c in [
            1.398_199_9e-3,
            8.333_452e-3,
            4.166_579_6e-2,
            1.666_666_5e-1,
            0.5,
        ] {
            p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(c));
        }
        let one = _mm256_set1_ps(1.0);
        let y = _mm256_mul_ps(
            _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), _mm256_add_ps(r, one)),
            scale,
        );
        // Zero where x < lo; "not less than" is true for NaN, which passes through.
        _mm256_and_ps(y, _mm256_cmp_ps::<_CMP_NLT_UQ>(x, lo))
    }

    /// `s[r][j] = q[r] . key j` for every row of `q` (`[rows, d]`) and every key of `panels`
    /// panels, into rows `stride` apart (the keys of a partial last panel get scores of 0).
    #[target_feature(enable = "avx2,fma")]
    fn scores(q: &[f32], d: usize, kt: &[f32], panels: usize, s: &mut [f32], stride: usize) {
        let rows = q.len() / d;
        assert!(kt.len() >= panels * d * PANEL && panels * PANEL <= stride);
        assert!(rows == 0 || s.len() >= (rows - 1) * stride + panels * PANEL);
        let (q, s) = (q.as_ptr(), s.as_mut_ptr());
        for p in 0..panels {
            // SAFETY: the asserts above bound every pointer the blocks read and write.
            unsafe {
                let kp = kt.as_ptr().add(p * d * PANEL);
                let sp = s.add(p * PANEL);
                let mut r = 0;
                while r + SCORE_ROWS <= rows {
                    score_block::<SCORE_ROWS>(q.add(r * d), d, kp, sp.add(r * stride), stride);
                    r += SCORE_ROWS;
                }
                let (q, sp) = (q.add(r * d), sp.add(r * stride));
                match rows - r {
                    0 => {}
                    1 => score_block::<1>(q, d, kp, sp, stride),
                    2 => score_block::<2>(q, d, kp, sp, stride),
                    3 => score_block::<3>(q, d, kp, sp, stride),
                    4 => score_block::<4>(q, d, kp, sp, stride),
                    _ => score_block::<5>(q, d, kp, sp, stride),
                }
            }
        }
    }

    /// Scores of `MR` query rows against one 16-key panel, held in registers over the whole
    /// head dimension.
    ///
    /// # Safety
    /// `q` has `MR * d` values, `kp` `d * 16`, and `s` rows `0..MR` of 16 values `stride` apart.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn score_block<const MR: usize>(
        q: *const f32,
        d: usize,
        kp: *const f32,
        s: *mut f32,
        stride: usize,
    ) {
        let mut acc = [[_mm256_setzero_ps(); 2]; MR];
        for i in 0..d {
            let k0 = _mm256_loadu_ps(kp.add(i * PANEL));
            let k1 = _mm256_loadu_ps(kp.add(i * PANEL + 8));
            for (r, a) in acc.iter_mut().enumerate() {
                let x = _mm256_set1_ps(*q.add(r * d + i));
                a[0] = _mm256_fmadd_ps(x, k0, a[0]);
                a[1] = _mm256_fmadd_ps(x, k1, a[1]);
            }
        }
        for (r, a) in acc.iter().enumerate() {
            _mm256_storeu_ps(s.add(r * stride), a[0]);
            _mm256_storeu_ps(s.add(r * stride + 8), a[1]);
        }
    }

    /// `o[r] = o[r] * alpha[r] + sum over j < keys of p[r][j] * value k0 + j` for `rows` rows
    /// (`first`: `o` holds nothing yet and is overwritten). `p` rows are `p_stride` apart, `vh`
    /// is the head's values as [`pack_values`] lays them out, `o` rows are `d` apart.
    #[allow(clippy::too_many_arguments)]
    #[target_feature(enable = "avx2,fma")]
    fn values(
        p: &[f32],
        p_stride: usize,
        rows: usize,
        keys: usize,
        vh: &[f32],
        k0: usize,
        alpha: &[f32],
        first: bool,
        o: &mut [f32],
        d: usize,
    ) {
        if rows == 0 || keys == 0 {
            return;
        }
        let sk = vh.len() / d;
        assert!(keys <= p_stride && p.len() >= (rows - 1) * p_stride + keys);
        assert!(k0 + keys <= sk && alpha.len() >= rows);
        assert!(o.len() >= rows * d && d.is_multiple_of(8));
        let (p, a, o) = (p.as_ptr(), alpha.as_ptr(), o.as_mut_ptr());
        let mut c = 0;
        while c < d {
            let w = value_run(d - c);
            let nv = w / 8;
            // This run's values for keys k0.., `w` apart.
            let v = vh[c * sk + k0 * w..].as_ptr();
            let step = if nv == 2 { VALUE_ROWS_2 } else { VALUE_ROWS_1 };
            let mut r = 0;
            while r < rows {
                let mr = (rows - r).min(step);
                // SAFETY: the asserts above bound every pointer the blocks read and write.
                unsafe {
                    let (p, a, o) = (p.add(r * p_stride), a.add(r), o.add(r * d + c));
                    macro_rules! block {
                        ($mr:literal, $nv:literal) => {
                            value_block::<$mr, $nv>(p, p_stride, keys, v, w, a, first, o, d)
                        };
                    }
                    match (nv, mr) {
                        (2, 6) => block!(6, 2),
                        (2, 5) => block!(5, 2),
                        (2, 4) => block!(4, 2),
                        (2, 3) => block!(3, 2),
                        (2, 2) => block!(2, 2),
                        (2, _) => block!(1, 2),
                        (_, 8) => block!(8, 1),
                        (_, 7) => block!(7, 1),
                        (_, 6) => block!(6, 1),
                        (_, 5) => block!(5, 1),
                        (_, 4) => block!(4, 1),
                        (_, 3) => block!(3, 1),
                        (_, 2) => block!(2, 1),
                        _ => block!(1, 1),
                    }
                }
                r += mr;
            }
            c += w;
        }
    }

    /// `MR` rows x `NV` vectors of the output, held in registers over all the keys.
    ///
    /// # Safety
    /// `p` has `MR` rows of `keys` values `p_stride` apart, `v` `keys` rows of `NV * 8` values
    /// `v_stride` apart, `alpha` `MR` values and `o` `MR` rows of `NV * 8` values `d` apart.
    #[allow(clippy::too_many_arguments)]
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn value_block<const MR: usize, const NV: usize>(
        p: *const f32,
        p_stride: usize,
        keys: usize,
        v: *const f32,
        v_stride: usize,
        alpha: *const f32,
        first: bool,
        o: *mut f32,
        d: usize,
    ) {
        let mut acc = [[_mm256_setzero_ps(); NV]; MR];
        if !first {
            // The softmax's rescaling of what earlier key tiles accumulated (see
            // `online_softmax_tile`), folded into loading it.
            for (r, row) in acc.iter_mut().enumerate() {
                let scale = _mm256_set1_ps(*alpha.add(r));
                for (c, x) in row.iter_mut().enumerate() {
                    *x = _mm256_mul_ps(_mm256_loadu_ps(o.add(r * d + c * 8)), scale);
                }
            }
        }
        for j in 0..keys {
            let vj = v.add(j * v_stride);
            let mut vs = [_mm256_setzero_ps(); NV];
            for (c, x) in vs.iter_mut().enumerate() {
                *x = _mm256_loadu_ps(vj.add(c * 8));
            }
            for (r, row) in acc.iter_mut().enumerate() {
                let w = _mm256_set1_ps(*p.add(r * p_stride + j));
                for (x, &vc) in row.iter_mut().zip(&vs) {
                    *x = _mm256_fmadd_ps(w, vc, *x);
                }
            }
        }
        for (r, row) in acc.iter().enumerate() {
            for (c, &x) in row.iter().enumerate() {
                _mm256_storeu_ps(o.add(r * d + c * 8), x);
            }
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
        path: None,
        bf16: None,
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

    /// The op on one path (`None`: the one it picks).
    fn fused(
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        heads: usize,
        scale: f64,
        path: Option<Path>,
    ) -> Tensor {
        fused_in(q, k, v, heads, scale, path, false)
    }

    /// [`fused`], with the AVX-512 loop's products in bf16 or not.
    fn fused_in(
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        heads: usize,
        scale: f64,
        path: Option<Path>,
        bf16: bool,
    ) -> Tensor {
        let op = FusedAttention {
            heads,
            scale: scale as f32,
            path,
            bf16: Some(bf16),
        };
        q.apply_op3_no_bwd(k, v, &op).unwrap()
    }

    /// The AVX-512 loop with bf16 products against the plain path, on the shapes of the test
    /// above whose scores stay moderate (the queries' spread at most 1): within bf16 rounding
    /// of convex combinations of N(0, 1) values, and not equal to the f32 loop's result (so
    /// the bf16 products did run). Odd key counts and head sizes check the zero partners.
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn bf16_products_stay_near_plain_attention() {
        if !(avx512::fits(8) && avx512::bf16_fits()) {
            eprintln!("skipped: no AVX-512 BF16 here");
            return;
        }
        for (b, sq, sk, heads, d) in [
            (2, 300, 600, 3, 8),
            (1, 130, 77, 2, 40),
            (1, 5, 1, 1, 4),
            (1, 7, 33, 2, 24),
            (1, 9, 301, 2, 80),
            (1, 11, 257, 1, 15),
            (2, 250, 100, 2, 64),
            (1, 40, 270, 1, 512),
        ] {
            let q = randn(1, 1.0, &[b, sq, heads * d]);
            let k = randn(2, 1., &[b, sk, heads * d]);
            let v = randn(3, 1., &[b, sk, heads * d]);
            let scale = 1.0 / (d as f64).sqrt();
            let plain = AttentionOptions::plain();
            let want =
                scaled_dot_product_attention(&q, &k, &v, heads, scale, false, &plain).unwrap();
            let got = fused_in(&q, &k, &v, heads, scale, Some(Path::Avx512), true);
            let f32_loop = fused_in(&q, &k, &v, heads, scale, Some(Path::Avx512), false);
            let diff = max_abs(&got, &want);
            // Scores from 8-bit-mantissa operands (relative 2^-8 of |q||k|), weights and
            // values rounded likewise: measured up to 0.008 here.
            assert!(diff < 2e-2, "b{b} sq{sq} sk{sk} h{heads} d{d}: {diff}");
            if sk > 1 {
                assert!(
                    max_abs(&got, &f32_loop) > 1e-5,
                    "b{b} sq{sq} sk{sk} d{d}: bf16 did not run"
                );
            }
        }
    }

    /// Every tile path this CPU runs against the plain path (whole score matrix, candle matmuls
    /// and softmax), with shapes that give partial query and key tiles, a partial last key
    /// panel and an odd panel count, every remainder of the AVX2 micro-tiles' rows (6 for
    /// scores, 6 or 8 for values), value columns of one to five vectors of either width
    /// (heads of 4 to 512, padded ones included), several key tiles (so the running maximum
    /// and the accumulator rescaling are exercised) and several units per thread.
    #[test]
    fn fused_attention_matches_plain_attention() {
        for (b, sq, sk, heads, d, spread) in [
            (2, 300, 600, 3, 8, 3.0),
            (1, 130, 77, 2, 40, 1.0),
            (1, 5, 1, 1, 4, 1.0),
            (1, 7, 33, 2, 24, 1.0),
            (1, 9, 300, 2, 80, 1.0),
            (1, 11, 257, 1, 16, 1.0),
            (1, 14, 40, 1, 8, 1.0),
            (2, 250, 100, 2, 64, 1.0),
            (1, 40, 270, 1, 512, 0.3),
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
            for path in [Path::Gemm, Path::Avx2, Path::Avx512] {
                if !path.fits(d) {
                    eprintln!("{path:?} does not run here for d = {d}: not checked");
                    continue;
                }
                let got = fused(&q, &k, &v, heads, scale, Some(path));
                assert_eq!(got.dims(), want.dims());
                // Outputs are convex combinations of N(0, 1) values: f32 rounding in a
                // different summation order stays well under 1e-5.
                let diff = max_abs(&got, &want);
                assert!(
                    diff < 1e-5,
                    "b{b} sq{sq} sk{sk} h{heads} d{d} {path:?}: {diff}"
                );
            }
        }
    }

    /// The public entry point takes the micro-kernels where they fit.
    #[test]
    fn the_entry_point_matches_the_op() {
        let (q, k, v) = (
            randn(4, 1., &[1, 20, 80]),
            randn(5, 1., &[1, 30, 80]),
            randn(6, 1., &[1, 30, 80]),
        );
        let got = attention(&q, &k, &v, 2, 0.15).unwrap().unwrap();
        let best = fused(&q, &k, &v, 2, 0.15, Some(Path::best(40)));
        assert_eq!(max_abs(&got, &best), 0.0);
    }

    /// The vector exponential of the micro-kernels' softmax: about 1 ulp over the range its
    /// inputs take (scores minus their maximum), 0 below it and for -inf, NaN kept.
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn the_vector_exponential_is_accurate_where_softmax_uses_it() {
        if !micro::fits(8) {
            return;
        }
        let exp8 = |x: [f32; 8]| -> [f32; 8] {
            let mut out = [0f32; 8];
            // SAFETY: `fits` checked AVX2 and FMA; both arrays hold 8 values.
            unsafe {
                use std::arch::x86_64::*;
                let e = micro::exp(_mm256_loadu_ps(x.as_ptr()));
                _mm256_storeu_ps(out.as_mut_ptr(), e);
            }
            out
        };
        let mut worst = 0f64;
        for i in 0..80_000 {
            let x = -87.0 * i as f32 / 80_000.0;
            let got = exp8([x; 8])[3];
            let want = f64::from(x).exp();
            worst = worst.max((f64::from(got) - want).abs() / want);
        }
        assert!(worst < 2.5e-7, "relative error {worst}");
        let odd = exp8([
            f32::NEG_INFINITY,
            -90.0,
            f32::NAN,
            0.0,
            -1.0,
            -87.4,
            -1e-30,
            -50.0,
        ]);
        assert_eq!(&odd[..2], &[0.0, 0.0]);
        assert!(odd[2].is_nan());
        assert_eq!(odd[3], 1.0);
        assert!((odd[4] - (-1f32).exp()).abs() < 1e-7);
        assert_eq!(odd[5], 0.0);
        assert_eq!(odd[6], 1.0);
    }

    /// The AVX-512 exponential gives the AVX2 one's bits (the same operations, twice as wide).
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn the_wide_exponential_matches_the_avx2_one() {
        if !(micro::fits(8) && avx512::fits(8)) {
            eprintln!("no AVX-512 here: not checked");
            return;
        }
        let mut xs: Vec<f32> = (0..160_000).map(|i| -90.0 * i as f32 / 160_000.0).collect();
        xs.extend([f32::NEG_INFINITY, f32::NAN, -87.33, -87.34, -1e-30, 0.0]);
        xs.resize(xs.len().next_multiple_of(16), 0.0);
        for chunk in xs.chunks_exact(16) {
            let (mut narrow, mut wide) = ([0f32; 16], [0f32; 16]);
            // SAFETY: both loops' features were checked above; every array holds 16 values.
            unsafe {
                use std::arch::x86_64::*;
                for half in 0..2 {
                    let e = micro::exp(_mm256_loadu_ps(chunk.as_ptr().add(8 * half)));
                    _mm256_storeu_ps(narrow.as_mut_ptr().add(8 * half), e);
                }
                _mm512_storeu_ps(
                    wide.as_mut_ptr(),
                    avx512::exp(_mm512_loadu_ps(chunk.as_ptr())),
                );
            }
            for ((a, b), x) in narrow.iter().zip(&wide).zip(chunk) {
                assert_eq!(a.to_bits(), b.to_bits(), "exp({x})");
            }
        }
    }

    #[test]
    fn other_dtypes_are_left_to_the_plain_path() {
        let dev = Device::Cpu;
        let q = Tensor::zeros((1, 4, 8), candle_core::DType::F16, &dev).unwrap();
        assert!(attention(&q, &q, &q, 2, 1.0).is_none());
    }
}
