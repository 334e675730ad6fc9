//! The AVX-512 tile loop of the fused CPU attention: the scheme of the AVX2 loop ([`super::micro`]:
//! keys in 16-key panels, values in 16-column runs, the softmax in vector registers) with
//! 16-lane vectors and 32 registers, so each micro-tile holds twice the accumulators. Where the
//! vector units are 512 bits wide (AMD Zen 5 EPYC, Intel Xeon since Skylake-SP) a multiply-add
//! here does twice the work of an AVX2 one: measured on a Zen 5 core, 257 against 128 GFLOP/s
//! in register-only loops. Where they are 256 bits wide (Zen 4) it still saves instructions.
//!
//! Two choices keep the kernels free of remainder code: a tile's query rows are rounded up to a
//! multiple of [`ROW_STEP`] (the extra rows are zero queries whose results are never stored),
//! and each head's values are padded with zero columns to a multiple of 16, so every output
//! vector is whole (SD 1.5's 40-wide heads compute 48 columns, 83% of them used).
//!
//! With bf16 products on ([`crate::bf16_gemm`], AVX-512 BF16 CPUs) the two tile products take
//! `vdpbf16ps` instead, two depth indices per lane and instruction: queries and keys in pairs
//! along the head, probabilities and values in pairs of keys. The softmax stays in f32.
//!
//! Written by hand with `std::arch` for the reasons given in [`super`].

use std::arch::x86_64::*;

use super::micro::{Lines, PANEL};
use super::{Dims, Scratch, Tile, K_BLOCK};
use crate::kernels::{self, SendPtr};

/// Queries per tile: a multiple of [`ROW_STEP`], near the AVX2 loop's 128.
pub(super) const Q_BLOCK: usize = 120;
/// Every micro-tile height (12 for scores; 6, 8 or 12 for values) divides this.
const ROW_STEP: usize = 24;
/// f32 lanes per vector.
const LANES: usize = 16;
/// Query rows per score micro-tile, over two key panels: 24 accumulators, two key vectors and
/// a broadcast query value, of 32 registers.
const SCORE_ROWS: usize = 12;

/// The keys and values of every (batch, head), laid out for the kernels.
pub(super) struct Packed {
    /// As [`super::micro::pack_keys`] lays them out (bf16: [`pack_keys_bf16`]).
    pub(super) keys: Lines,
    /// As [`pack_values`] lays them out (bf16: [`pack_values_bf16`]).
    pub(super) values: Lines,
    /// Products in bf16.
    pub(super) bf16: bool,
}

impl Packed {
    /// `k` and `v` packed for the f32 products, or with `bf16` for the bf16 ones.
    pub(super) fn new(k: &[f32], v: &[f32], sh: &Dims, bf16: bool) -> Self {
        if bf16 {
            Self {
                keys: pack_keys_bf16(k, sh),
                values: pack_values_bf16(v, sh),
                bf16,
            }
        } else {
            Self {
                keys: super::micro::pack_keys(k, sh),
                values: pack_values(v, sh),
                bf16,
            }
        }
    }
}

/// Whether the bf16 products run here.
pub(super) fn bf16_fits() -> bool {
    crate::bf16_gemm::supported()
}

/// Two f32 values rounded to bf16 and paired, as `vdpbf16ps` reads them (`even` low).
fn pair(even: f32, odd: f32) -> f32 {
    f32::from_bits(crate::avx512_gemm::pair(even, odd))
}

/// `k` as, per (batch, head), `ceil(keys / 16)` panels of `[ceil(d / 2)][16]` bf16 pairs: key
/// `j` of a panel in lane `j`, the head's values `2i` and `2i + 1` in pair `i` (zero past `d`
/// and past the keys).
fn pack_keys_bf16(k: &[f32], sh: &Dims) -> Lines {
    let (batch, sk, inner, d, heads) = (sh.batch, sh.sk, sh.inner, sh.d, sh.heads);
    let dp = d.div_ceil(2);
    let per_head = sk.div_ceil(PANEL) * dp * PANEL;
    let mut out = Lines::zeroed(batch * heads * per_head);
    kernels::par_units(out.as_mut_slice(), None, per_head, |part, _, first| {
        for (n, dst) in part.chunks_exact_mut(per_head).enumerate() {
            let (bi, h) = ((first + n) / heads, (first + n) % heads);
            for j in 0..sk {
                let src = &k[(bi * sk + j) * inner + h * d..][..d];
                let panel = &mut dst[(j / PANEL) * dp * PANEL + j % PANEL..];
                for i in 0..dp {
                    let odd = src.get(2 * i + 1).copied().unwrap_or(0.0);
                    panel[i * PANEL] = pair(src[2 * i], odd);
                }
            }
        }
    });
    out
}

/// `v` as, per (batch, head), [`padded`]`(d) / 16` runs of 16 columns, each run
/// `[ceil(keys / 2)][16]` bf16 pairs of consecutive keys (zero past `d` and past the keys).
fn pack_values_bf16(v: &[f32], sh: &Dims) -> Lines {
    let (batch, sk, inner, d, heads) = (sh.batch, sh.sk, sh.inner, sh.d, sh.heads);
    let skp = sk.div_ceil(2);
    let per_head = skp * padded(d);
    let mut out = Lines::zeroed(batch * heads * per_head);
    kernels::par_units(out.as_mut_slice(), None, per_head, |part, _, first| {
        for (n, dst) in part.chunks_exact_mut(per_head).enumerate() {
            let (bi, h) = ((first + n) / heads, (first + n) % heads);
            let row = |j: usize| &v[(bi * sk + j) * inner + h * d..][..d];
            for (run, block) in dst.chunks_exact_mut(skp * LANES).enumerate() {
                let c = run * LANES;
                let w = LANES.min(d - c);
                for (jp, line) in block.chunks_exact_mut(LANES).enumerate() {
                    let even = &row(2 * jp)[c..c + w];
                    for (i, x) in line[..w].iter_mut().enumerate() {
                        let odd = if 2 * jp + 1 < sk {
                            row(2 * jp + 1)[c + i]
                        } else {
                            0.0
                        };
                        *x = pair(even[i], odd);
                    }
                }
            }
        }
    });
    out
}

/// Whether this loop runs here (any head size: the values are padded).
pub(super) fn fits(d: usize) -> bool {
    d > 0 && std::arch::is_x86_feature_detected!("avx512f")
}

/// A head's width rounded up to whole vectors: the accumulator's row width.
pub(super) fn padded(d: usize) -> usize {
    d.next_multiple_of(LANES)
}

/// `v` (`[batch, keys, heads * d]`) as, per (batch, head), [`padded`]`(d) / 16` runs of 16
/// columns, each run `[keys][16]`, the columns past `d` zero. The value kernel reads one cache
/// line per key and run, in order.
pub(super) fn pack_values(v: &[f32], sh: &Dims) -> Lines {
    let (batch, sk, inner, d, heads) = (sh.batch, sh.sk, sh.inner, sh.d, sh.heads);
    let per_head = sk * padded(d);
    let mut out = Lines::zeroed(batch * heads * per_head);
    kernels::par_units(out.as_mut_slice(), None, per_head, |part, _, first| {
        for (n, dst) in part.chunks_exact_mut(per_head).enumerate() {
            let (bi, h) = ((first + n) / heads, (first + n) % heads);
            for (run, block) in dst.chunks_exact_mut(sk * LANES).enumerate() {
                let c = run * LANES;
                let w = LANES.min(d - c);
                for (j, row) in block.chunks_exact_mut(LANES).enumerate() {
                    row[..w].copy_from_slice(&v[(bi * sk + j) * inner + h * d + c..][..w]);
                }
            }
        }
    });
    out
}

/// One (batch, head, query block) unit.
///
/// # Safety
/// As for [`super::attend_tile`]; `packed` holds this module's packing for these shapes, `sc`
/// was made for `Q_BLOCK` rows `padded(d)` wide, and [`fits`] holds for `sh.d`.
pub(super) unsafe fn attend_tile(
    sh: &Dims,
    scale: f32,
    q: &[f32],
    packed: &Packed,
    out: SendPtr,
    t: &Tile,
    sc: &mut Scratch,
) {
    let d = sh.d;
    let width = padded(d);
    let rows = super::load_queries(sh, scale, q, t, sc);
    // The rows past the last query: zero queries, whose results are dropped.
    let all = rows.next_multiple_of(ROW_STEP);
    sc.q[rows * d..all * d].fill(0.0);
    sc.max[rows..all].fill(f32::NEG_INFINITY);
    sc.sum[rows..all].fill(0.0);
    // SAFETY: `fits` checked AVX-512 F, and `Packed::new` is only asked for bf16 where
    // `bf16_fits` holds.
    unsafe {
        if packed.bf16 {
            attend_bf16(sh, packed, t, sc, all);
        } else {
            attend_f32(sh, packed, t, sc, all);
        }
    }
    for r in 0..rows {
        let inv = 1.0 / sc.sum[r];
        let dst = out.0.add((t.bi * sh.sq + t.q0 + r) * sh.inner + t.h * d);
        for (i, &x) in sc.o[r * width..][..d].iter().enumerate() {
            *dst.add(i) = x * inv;
        }
    }
}

/// The key tiles of one unit with f32 products, over the first `all` rows of the scratch.
#[target_feature(enable = "avx512f")]
fn attend_f32(sh: &Dims, packed: &Packed, t: &Tile, sc: &mut Scratch, all: usize) {
    let (sk, d) = (sh.sk, sh.d);
    let width = padded(d);
    let per_head = sk.div_ceil(PANEL) * d * PANEL;
    let bh = t.bi * sh.heads + t.h;
    let keys_of_head = &packed.keys.as_slice()[bh * per_head..][..per_head];
    let values_of_head = &packed.values.as_slice()[bh * sk * width..][..sk * width];
    for k0 in (0..sk).step_by(K_BLOCK) {
        let keys = K_BLOCK.min(sk - k0);
        // Panel k0 / 16 starts at (k0 / 16) * d * 16 = k0 * d.
        // SAFETY: f32 products: this function has AVX-512 F, all they need.
        unsafe {
            scores(
                false,
                &sc.q[..all * d],
                d,
                &keys_of_head[k0 * d..],
                keys.div_ceil(PANEL),
                &mut sc.s,
                K_BLOCK,
            );
        }
        softmax_tile(
            &mut sc.s[..all * K_BLOCK],
            K_BLOCK,
            keys,
            &mut sc.max[..all],
            &mut sc.sum[..all],
            &mut sc.alpha[..all],
        );
        // SAFETY: as for `scores` above.
        unsafe {
            values(
                false,
                &sc.s[..all * K_BLOCK],
                K_BLOCK,
                keys,
                values_of_head,
                k0,
                &sc.alpha[..all],
                k0 == 0,
                &mut sc.o[..all * width],
                width,
            );
        }
    }
}

/// The key tiles of one unit with bf16 products, over the first `all` rows of the scratch:
/// the queries rounded to pairs once, each tile's probabilities after its softmax.
#[target_feature(enable = "avx512f,avx512bf16")]
fn attend_bf16(sh: &Dims, packed: &Packed, t: &Tile, sc: &mut Scratch, all: usize) {
    let (sk, d) = (sh.sk, sh.d);
    let (dp, skp, width) = (d.div_ceil(2), sk.div_ceil(2), padded(d));
    let per_head = sk.div_ceil(PANEL) * dp * PANEL;
    let bh = t.bi * sh.heads + t.h;
    let keys_of_head = &packed.keys.as_slice()[bh * per_head..][..per_head];
    let values_of_head = &packed.values.as_slice()[bh * skp * width..][..skp * width];
    let mut qb = std::mem::take(&mut sc.qb);
    let mut pb = std::mem::take(&mut sc.pb);
    qb.resize(sc.q_block * dp, 0.0);
    pb.resize(sc.q_block * K_BLOCK / 2, 0.0);
    for (row, out) in sc.q[..all * d].chunks_exact(d).zip(qb.chunks_exact_mut(dp)) {
        for (i, x) in out.iter_mut().enumerate() {
            *x = pair(row[2 * i], row.get(2 * i + 1).copied().unwrap_or(0.0));
        }
    }
    for k0 in (0..sk).step_by(K_BLOCK) {
        let keys = K_BLOCK.min(sk - k0);
        // Panel k0 / 16 starts at (k0 / 16) * dp * 16 = k0 * dp.
        // SAFETY: this function runs only where the CPU has AVX-512 BF16.
        unsafe {
            scores(
                true,
                &qb[..all * dp],
                dp,
                &keys_of_head[k0 * dp..],
                keys.div_ceil(PANEL),
                &mut sc.s,
                K_BLOCK,
            );
        }
        softmax_tile(
            &mut sc.s[..all * K_BLOCK],
            K_BLOCK,
            keys,
            &mut sc.max[..all],
            &mut sc.sum[..all],
            &mut sc.alpha[..all],
        );
        probability_pairs(&sc.s[..all * K_BLOCK], keys, &mut pb[..all * K_BLOCK / 2]);
        // k0 is a multiple of K_BLOCK, so its pair is k0 / 2.
        // SAFETY: as for `scores` above.
        unsafe {
            values(
                true,
                &pb[..all * K_BLOCK / 2],
                K_BLOCK / 2,
                keys.div_ceil(2),
                values_of_head,
                k0 / 2,
                &sc.alpha[..all],
                k0 == 0,
                &mut sc.o[..all * width],
                width,
            );
        }
    }
    sc.qb = qb;
    sc.pb = pb;
}

/// Each row's first `keys` probabilities (rows `K_BLOCK` apart) as bf16 pairs of consecutive
/// keys into `pb` (rows `K_BLOCK / 2` apart), the odd partner past `keys` zero: 32 at a time
/// with `vcvtne2ps2bf16`.
#[target_feature(enable = "avx512f,avx512bf16")]
fn probability_pairs(s: &[f32], keys: usize, pb: &mut [f32]) {
    let half = K_BLOCK / 2;
    assert!(keys <= K_BLOCK && s.len() / K_BLOCK == pb.len() / half);
    for (row, out) in s.chunks_exact(K_BLOCK).zip(pb.chunks_exact_mut(half)) {
        for c in (0..keys).step_by(32) {
            let n = (keys - c).min(32);
            let lo_mask = ((1u64 << n.min(16)) - 1) as __mmask16;
            let hi_mask = ((1u64 << n.saturating_sub(16)) - 1) as __mmask16;
            // SAFETY: the masks keep the loads to `row[c..c + n]`, and the store writes
            // `out[c / 2..c / 2 + 16]`, inside the row (c <= K_BLOCK - 32).
            unsafe {
                let lo = _mm512_maskz_loadu_ps(lo_mask, row.as_ptr().add(c));
                let hi = _mm512_maskz_loadu_ps(hi_mask, row.as_ptr().add(c + 16));
                let pairs: __m512 = std::mem::transmute(_mm512_cvtne2ps_pbh(hi, lo));
                _mm512_storeu_ps(out.as_mut_ptr().add(c / 2), pairs);
            }
        }
    }
}

/// [`score_block`] with bf16 pairs (`dp` of them per row).
///
/// # Safety
/// `q` has `MR * dp` pairs, `kp` `NP * dp * 16`, and `s` rows `0..MR` of `NP * 16` values
/// `stride` apart.
#[inline]
#[target_feature(enable = "avx512f,avx512bf16")]
unsafe fn score_block_bf16<const MR: usize, const NP: usize>(
    q: *const f32,
    dp: usize,
    kp: *const f32,
    s: *mut f32,
    stride: usize,
) {
    let mut acc = [[_mm512_setzero_ps(); NP]; MR];
    for i in 0..dp {
        let mut k = [_mm512_setzero_ps(); NP];
        for (p, x) in k.iter_mut().enumerate() {
            *x = _mm512_loadu_ps(kp.add((p * dp + i) * PANEL));
        }
        for (r, a) in acc.iter_mut().enumerate() {
            let x: __m512bh = std::mem::transmute(_mm512_set1_ps(*q.add(r * dp + i)));
            for (a, &k) in a.iter_mut().zip(&k) {
                *a = _mm512_dpbf16_ps(*a, x, std::mem::transmute::<__m512, __m512bh>(k));
            }
        }
    }
    for (r, a) in acc.iter().enumerate() {
        for (p, &x) in a.iter().enumerate() {
            _mm512_storeu_ps(s.add(r * stride + p * PANEL), x);
        }
    }
}

/// [`value_block`] with bf16 pairs of keys.
///
/// # Safety
/// As [`value_block`], with `pairs` pairs in place of keys.
#[allow(clippy::too_many_arguments)]
#[inline]
#[target_feature(enable = "avx512f,avx512bf16")]
unsafe fn value_block_bf16<const MR: usize, const NV: usize>(
    p: *const f32,
    p_stride: usize,
    pairs: usize,
    v: *const f32,
    run_len: usize,
    alpha: *const f32,
    first: bool,
    o: *mut f32,
    width: usize,
) {
    let mut acc = [[_mm512_setzero_ps(); NV]; MR];
    if !first {
        for (r, row) in acc.iter_mut().enumerate() {
            let scale = _mm512_set1_ps(*alpha.add(r));
            for (c, x) in row.iter_mut().enumerate() {
                *x = _mm512_mul_ps(_mm512_loadu_ps(o.add(r * width + c * LANES)), scale);
            }
        }
    }
    for j in 0..pairs {
        let mut vs = [_mm512_setzero_ps(); NV];
        for (c, x) in vs.iter_mut().enumerate() {
            *x = _mm512_loadu_ps(v.add(c * run_len + j * LANES));
        }
        for (r, row) in acc.iter_mut().enumerate() {
            let w: __m512bh = std::mem::transmute(_mm512_set1_ps(*p.add(r * p_stride + j)));
            for (x, &vc) in row.iter_mut().zip(&vs) {
                *x = _mm512_dpbf16_ps(*x, w, std::mem::transmute::<__m512, __m512bh>(vc));
            }
        }
    }
    for (r, row) in acc.iter().enumerate() {
        for (c, &x) in row.iter().enumerate() {
            _mm512_storeu_ps(o.add(r * width + c * LANES), x);
        }
    }
}

/// `exp(x)` for 16 lanes: the operations of the AVX2 loop's `exp` (and so of
/// `kernels::exp_f32`), giving the same bits. Inputs below -87.33 give 0, NaN stays NaN; the
/// inputs are scores minus their row maximum, never above 0.
#[inline]
#[target_feature(enable = "avx512f")]
pub(super) fn exp(x: __m512) -> __m512 {
    const ROUND: f32 = 12_582_912.0;
    let lo = _mm512_set1_ps(-87.33);
    let round = _mm512_set1_ps(ROUND);
    // max(lo, x) returns x when x is NaN.
    let xc = _mm512_max_ps(lo, x);
    let t = _mm512_fmadd_ps(xc, _mm512_set1_ps(std::f32::consts::LOG2_E), round);
    let n = _mm512_sub_ps(t, round);
    let r = _mm512_fmadd_ps(n, _mm512_set1_ps(-0.693_359_4), xc);
    let r = _mm512_fmadd_ps(n, _mm512_set1_ps(2.121_944_4e-4), r);
    let ni = _mm512_sub_epi32(_mm512_castps_si512(t), _mm512_castps_si512(round));
    let scale = _mm512_castsi512_ps(_mm512_slli_epi32::<23>(_mm512_add_epi32(
        ni,
        _mm512_set1_epi32(127),
    )));
    let mut p = _mm512_set1_ps(1.987_569_1e-4);
    for c in [
        1.398_199_9e-3,
        8.333_452e-3,
        4.166_579_6e-2,
        1.666_666_5e-1,
        0.5,
    ] {
        p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(c));
    }
    let one = _mm512_set1_ps(1.0);
    let y = _mm512_mul_ps(
        _mm512_fmadd_ps(p, _mm512_mul_ps(r, r), _mm512_add_ps(r, one)),
        scale,
    );
    // Zero where x < lo; "not less than" is true for NaN, which passes through.
    _mm512_maskz_mov_ps(_mm512_cmp_ps_mask::<_CMP_NLT_UQ>(x, lo), y)
}

/// One key tile of the online softmax over the first `keys` scores of each row, as
/// `kernels::online_softmax_tile` computes it, in registers.
#[target_feature(enable = "avx512f")]
fn softmax_tile(
    s: &mut [f32],
    stride: usize,
    keys: usize,
    max: &mut [f32],
    sum: &mut [f32],
    alpha: &mut [f32],
) {
    let whole = keys / LANES;
    let tail = keys % LANES;
    let tail_mask: __mmask16 = ((1u32 << tail) - 1) as __mmask16;
    let neg_inf = _mm512_set1_ps(f32::NEG_INFINITY);
    for (((row, m), l), a) in s.chunks_mut(stride).zip(max).zip(sum).zip(alpha) {
        assert!(row.len() >= keys);
        let p = row.as_mut_ptr();
        // SAFETY (every load and store below): lanes below `keys` of `row`, checked above.
        unsafe {
            let mut top = _mm512_set1_ps(*m);
            for c in 0..whole {
                top = _mm512_max_ps(top, _mm512_loadu_ps(p.add(c * LANES)));
            }
            if tail > 0 {
                let x = _mm512_mask_loadu_ps(neg_inf, tail_mask, p.add(whole * LANES));
                top = _mm512_max_ps(top, x);
            }
            let m_new = _mm512_reduce_max_ps(top);
            let shift = _mm512_set1_ps(m_new);
            let mut total = _mm512_setzero_ps();
            for c in 0..whole {
                let e = exp(_mm512_sub_ps(_mm512_loadu_ps(p.add(c * LANES)), shift));
                _mm512_storeu_ps(p.add(c * LANES), e);
                total = _mm512_add_ps(total, e);
            }
            if tail > 0 {
                // exp(-inf) is 0 in the lanes past `keys`.
                let x = _mm512_mask_loadu_ps(neg_inf, tail_mask, p.add(whole * LANES));
                let e = exp(_mm512_sub_ps(x, shift));
                _mm512_mask_storeu_ps(p.add(whole * LANES), tail_mask, e);
                total = _mm512_add_ps(total, e);
            }
            // exp(-inf) = 0 for the first tile: the empty accumulator needs no weight.
            *a = _mm512_cvtss_f32(exp(_mm512_set1_ps(*m - m_new)));
            *l = (*l).mul_add(*a, _mm512_reduce_add_ps(total));
            *m = m_new;
        }
    }
}

/// `s[r][j] = q[r] . key j` for every row of `q` (`[rows, d]`, `rows` a multiple of
/// [`SCORE_ROWS`]) and every key of `panels` panels, into rows `stride` apart (the keys of a
/// partial last panel get scores of 0). With `bf16`, `d` counts pairs: `q` holds the rows'
/// bf16 pairs and `kt` is [`pack_keys_bf16`]'s.
///
/// # Safety
/// With `bf16`, the CPU must have AVX-512 BF16 ([`bf16_fits`]).
#[target_feature(enable = "avx512f")]
unsafe fn scores(
    bf16: bool,
    q: &[f32],
    d: usize,
    kt: &[f32],
    panels: usize,
    s: &mut [f32],
    stride: usize,
) {
    let rows = q.len() / d;
    assert!(rows.is_multiple_of(SCORE_ROWS));
    assert!(kt.len() >= panels * d * PANEL && panels * PANEL <= stride);
    assert!(rows == 0 || s.len() >= (rows - 1) * stride + panels * PANEL);
    let (q, s) = (q.as_ptr(), s.as_mut_ptr());
    let mut p = 0;
    while p < panels {
        let two = p + 2 <= panels;
        for r in (0..rows).step_by(SCORE_ROWS) {
            // SAFETY: the asserts above bound every pointer the blocks read and write; the
            // caller checked BF16 for `bf16`.
            unsafe {
                let (kp, sp) = (
                    kt.as_ptr().add(p * d * PANEL),
                    s.add(r * stride + p * PANEL),
                );
                let q = q.add(r * d);
                match (bf16, two) {
                    (false, true) => score_block::<SCORE_ROWS, 2>(q, d, kp, sp, stride),
                    (false, false) => score_block::<SCORE_ROWS, 1>(q, d, kp, sp, stride),
                    (true, true) => score_block_bf16::<SCORE_ROWS, 2>(q, d, kp, sp, stride),
                    (true, false) => score_block_bf16::<SCORE_ROWS, 1>(q, d, kp, sp, stride),
                }
            }
        }
        p += if two { 2 } else { 1 };
    }
}

/// Scores of `MR` query rows against `NP` consecutive 16-key panels, held in registers over
/// the whole head.
///
/// # Safety
/// `q` has `MR * d` values, `kp` `NP * d * 16`, and `s` rows `0..MR` of `NP * 16` values
/// `stride` apart.
#[inline]
#[target_feature(enable = "avx512f")]
unsafe fn score_block<const MR: usize, const NP: usize>(
    q: *const f32,
    d: usize,
    kp: *const f32,
    s: *mut f32,
    stride: usize,
) {
    let mut acc = [[_mm512_setzero_ps(); NP]; MR];
    for i in 0..d {
        let mut k = [_mm512_setzero_ps(); NP];
        for (p, x) in k.iter_mut().enumerate() {
            *x = _mm512_loadu_ps(kp.add((p * d + i) * PANEL));
        }
        for (r, a) in acc.iter_mut().enumerate() {
            let x = _mm512_set1_ps(*q.add(r * d + i));
            for (a, &k) in a.iter_mut().zip(&k) {
                *a = _mm512_fmadd_ps(x, k, *a);
            }
        }
    }
    for (r, a) in acc.iter().enumerate() {
        for (p, &x) in a.iter().enumerate() {
            _mm512_storeu_ps(s.add(r * stride + p * PANEL), x);
        }
    }
}

/// `o[r] = o[r] * alpha[r] + sum over j < keys of p[r][j] * value k0 + j` for every row of `o`
/// (`width` wide, the row count a multiple of [`ROW_STEP`]; `first`: `o` holds nothing yet and
/// is overwritten). `p` rows are `p_stride` apart, `vh` is the head's values as
/// [`pack_values`] lays them out. With `bf16`, `keys` and `k0` count pairs of keys: `p` holds
/// probability pairs and `vh` is [`pack_values_bf16`]'s.
///
/// # Safety
/// With `bf16`, the CPU must have AVX-512 BF16 ([`bf16_fits`]).
#[allow(clippy::too_many_arguments)]
#[target_feature(enable = "avx512f")]
unsafe fn values(
    bf16: bool,
    p: &[f32],
    p_stride: usize,
    keys: usize,
    vh: &[f32],
    k0: usize,
    alpha: &[f32],
    first: bool,
    o: &mut [f32],
    width: usize,
) {
    let rows = o.len() / width;
    if rows == 0 || keys == 0 {
        return;
    }
    let sk = vh.len() / width;
    assert!(rows.is_multiple_of(ROW_STEP) && width.is_multiple_of(LANES));
    assert!(keys <= p_stride && p.len() >= (rows - 1) * p_stride + keys);
    assert!(k0 + keys <= sk && alpha.len() >= rows);
    let (p, a, o) = (p.as_ptr(), alpha.as_ptr(), o.as_mut_ptr());
    let mut run = 0;
    let runs = width / LANES;
    while run < runs {
        // Up to 4 vectors of columns at a time; 5 as 3 + 2 rather than 4 + 1.
        let nv = match runs - run {
            5 => 3,
            left => left.min(4),
        };
        // These runs' values for keys k0.., each run `sk * 16` after the previous one.
        let v = vh[run * LANES * sk + k0 * LANES..].as_ptr();
        let run_len = sk * LANES;
        let mut r = 0;
        while r < rows {
            // SAFETY: the asserts above bound every pointer the blocks read and write; each
            // height divides ROW_STEP, so no block passes the last row; the caller checked
            // BF16 for `bf16`.
            r += unsafe {
                let (p, a, o) = (
                    p.add(r * p_stride),
                    a.add(r),
                    o.add(r * width + run * LANES),
                );
                // Rows x vectors: 24 accumulators, or 12 for one vector (loads bound it).
                macro_rules! block {
                    ($mr:literal, $nv:literal) => {{
                        if bf16 {
                            value_block_bf16::<$mr, $nv>(
                                p, p_stride, keys, v, run_len, a, first, o, width,
                            );
                        } else {
                            value_block::<$mr, $nv>(
                                p, p_stride, keys, v, run_len, a, first, o, width,
                            );
                        }
                        $mr
                    }};
                }
                match nv {
                    4 => block!(6, 4),
                    3 => block!(8, 3),
                    2 => block!(12, 2),
                    _ => block!(12, 1),
                }
            };
        }
        run += nv;
    }
}

/// `MR` rows x `NV` vectors of the output, held in registers over all the keys.
///
/// # Safety
/// `p` has `MR` rows of `keys` values `p_stride` apart; `v` has `NV` runs `run_len` apart, each
/// `keys` rows of 16 values; `alpha` has `MR` values and `o` `MR` rows of `NV * 16` values
/// `width` apart.
#[allow(clippy::too_many_arguments)]
#[inline]
#[target_feature(enable = "avx512f")]
unsafe fn value_block<const MR: usize, const NV: usize>(
    p: *const f32,
    p_stride: usize,
    keys: usize,
    v: *const f32,
    run_len: usize,
    alpha: *const f32,
    first: bool,
    o: *mut f32,
    width: usize,
) {
    let mut acc = [[_mm512_setzero_ps(); NV]; MR];
    if !first {
        // The softmax's rescaling of what earlier key tiles accumulated, folded into loading it.
        for (r, row) in acc.iter_mut().enumerate() {
            let scale = _mm512_set1_ps(*alpha.add(r));
            for (c, x) in row.iter_mut().enumerate() {
                *x = _mm512_mul_ps(_mm512_loadu_ps(o.add(r * width + c * LANES)), scale);
            }
        }
    }
    for j in 0..keys {
        let mut vs = [_mm512_setzero_ps(); NV];
        for (c, x) in vs.iter_mut().enumerate() {
            *x = _mm512_loadu_ps(v.add(c * run_len + j * LANES));
        }
        for (r, row) in acc.iter_mut().enumerate() {
            let w = _mm512_set1_ps(*p.add(r * p_stride + j));
            for (x, &vc) in row.iter_mut().zip(&vs) {
                *x = _mm512_fmadd_ps(w, vc, *x);
            }
        }
    }
    for (r, row) in acc.iter().enumerate() {
        for (c, &x) in row.iter().enumerate() {
            _mm512_storeu_ps(o.add(r * width + c * LANES), x);
        }
    }
}
