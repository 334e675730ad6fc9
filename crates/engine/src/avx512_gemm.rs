//! Matrix products on x86 CPUs with AVX-512, in two formats:
//! - f32 with `vfmadd231ps` on 16 lanes. `gemm` (the crate candle's CPU matmul uses) runs its
//!   AVX2 kernels on stable Rust, 8 lanes wide: where the vector units are 512 bits wide
//!   (AMD Zen 5 EPYC, Intel Xeon) that is half of what a core can do (register-only loops on a
//!   Zen 5: 257 against 128 GFLOP/s).
//! - bf16 with `vdpbf16ps` (AVX-512 BF16: AMD Zen 4 and later, Intel Cooper Lake / Sapphire
//!   Rapids and later): the operands are rounded to bf16 and multiplied two depth indices per
//!   f32 lane per instruction, accumulating in f32 (494 GFLOP/s per core). Opt-in through
//!   [`crate::bf16_gemm`]: bf16 keeps 8 bits of mantissa.
//!
//! Written by hand: no maintained crate has AVX-512 kernels on stable Rust, nor a bf16 one
//! (candle widens bf16 to f32 for its CPU products). The scheme is the textbook one: the left
//! operand packed in blocks of 8 rows and the right one in panels of 32 columns, each as a run
//! of "steps" (one depth index in f32, a pair of them in bf16, the layout `vdpbf16ps` reads);
//! a micro-kernel of 8 rows by 32 columns in 16 zmm accumulators; and the product cut into
//! slices of rows and depth sized for the caches.

use crate::kernels::{MatMut, MatRef};

/// Rows and columns of the micro-kernel's output tile ([`PackedLhs`] blocks hold `MR` rows).
pub(crate) const MR: usize = 8;
#[cfg(target_arch = "x86_64")]
const NR: usize = 32;

/// The number format of a product's operands (the output and accumulation are f32 in both).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Format {
    F32,
    Bf16,
}

impl Format {
    /// Depth indices per packed step.
    pub(crate) fn depth(self) -> usize {
        match self {
            Format::F32 => 1,
            Format::Bf16 => 2,
        }
    }

    /// Steps per depth slice: a column panel's slice (`steps * 128` bytes) then stays in L1
    /// (32 KiB in f32, 24 KiB in bf16) while a block of rows runs over it.
    #[cfg(target_arch = "x86_64")]
    fn slice_steps(self) -> usize {
        match self {
            Format::F32 => 256,
            Format::Bf16 => 192,
        }
    }

    /// Whether this CPU runs products in this format.
    #[cfg(test)]
    pub(crate) fn supported(self) -> bool {
        match self {
            Format::F32 => f32_supported(),
            Format::Bf16 => crate::bf16_gemm::supported(),
        }
    }
}

/// Whether this CPU has AVX-512 F (all the f32 kernels need).
fn f32_supported() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        static HAS: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        *HAS.get_or_init(|| std::arch::is_x86_feature_detected!("avx512f"))
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// Whether the f32 products of the linear layers and convolutions take these kernels: on CPUs
/// with AVX-512 F, unless `LD_CPU_GEMM=crate` asks for the `gemm` crate (to compare).
pub(crate) fn f32_active() -> bool {
    static CRATE: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    f32_supported()
        && !*CRATE.get_or_init(|| std::env::var("LD_CPU_GEMM").is_ok_and(|v| v == "crate"))
}

/// One packed step of an operand: `values[0]` (and in bf16 `values[1]`, the next depth
/// index; 0 past the end).
#[cfg(target_arch = "x86_64")]
#[inline(always)]
fn step(fmt: Format, first: f32, second: f32) -> u32 {
    match fmt {
        Format::F32 => first.to_bits(),
        Format::Bf16 => pair(first, second),
    }
}

/// Two depth-adjacent values as the kernel reads them: `even` rounded to bf16 in the low half,
/// `odd` in the high half.
#[inline(always)]
pub(crate) fn pair(even: f32, odd: f32) -> u32 {
    to_bf16(even) as u32 | ((to_bf16(odd) as u32) << 16)
}

/// `x` rounded to bf16 (nearest, ties to even), as its 16 bits; NaN stays NaN.
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
#[inline(always)]
fn to_bf16(x: f32) -> u16 {
    let bits = x.to_bits();
    if x.is_nan() {
        return ((bits >> 16) | 0x40) as u16;
    }
    let round = 0x7fff + ((bits >> 16) & 1);
    (bits.wrapping_add(round) >> 16) as u16
}

/// `len` f32 values from `src` (contiguous) as bf16 pairs: pair `p` (values `2p`, `2p + 1`) to
/// `dst[p * stride]`. 32 values at a time with `vcvtne2ps2bf16` (the same rounding as
/// [`to_bf16`], except that the instruction flushes denormal inputs to zero: values below
/// 1.2e-38, which make no difference to a product's f32 sum), the rest one by one.
///
/// # Safety
/// The CPU must have AVX-512 F and BF16; `src` holds `len` values and `dst` reaches pair
/// `(len - 1) / 2` at its stride.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bf16")]
unsafe fn pack_run(src: *const f32, len: usize, dst: *mut u32, stride: usize) {
    use std::arch::x86_64::*;
    let mut lanes = [0u32; 16];
    let full = len / 32;
    for b in 0..full {
        let lo = _mm512_loadu_ps(src.add(32 * b));
        let hi = _mm512_loadu_ps(src.add(32 * b + 16));
        let packed: __m512i = std::mem::transmute(_mm512_cvtne2ps_pbh(hi, lo));
        _mm512_storeu_si512(lanes.as_mut_ptr() as *mut __m512i, packed);
        for (i, v) in lanes.iter().enumerate() {
            *dst.add((16 * b + i) * stride) = *v;
        }
    }
    for p in (16 * full)..len.div_ceil(2) {
        let odd = if 2 * p + 1 < len {
            *src.add(2 * p + 1)
        } else {
            0.0
        };
        *dst.add(p * stride) = pair(*src.add(2 * p), odd);
    }
}

/// `len` f32 values from `src` (contiguous), value `p` to `dst[p * stride]` (f32 steps).
///
/// # Safety
/// `src` holds `len` values and `dst` reaches step `len - 1` at its stride.
#[cfg(target_arch = "x86_64")]
unsafe fn pack_run_f32(src: *const f32, len: usize, dst: *mut u32, stride: usize) {
    for p in 0..len {
        *dst.add(p * stride) = (*src.add(p)).to_bits();
    }
}

/// The 8x8 transpose of 32-bit lanes: output `i` holds lane `i` of each input, in order.
#[cfg(target_arch = "x86_64")]
#[inline]
#[target_feature(enable = "avx2")]
pub(crate) fn transpose8(r: [std::arch::x86_64::__m256; 8]) -> [std::arch::x86_64::__m256; 8] {
    use std::arch::x86_64::*;
    let t = [
        _mm256_unpacklo_ps(r[0], r[1]),
        _mm256_unpackhi_ps(r[0], r[1]),
        _mm256_unpacklo_ps(r[2], r[3]),
        _mm256_unpackhi_ps(r[2], r[3]),
        _mm256_unpacklo_ps(r[4], r[5]),
        _mm256_unpackhi_ps(r[4], r[5]),
        _mm256_unpacklo_ps(r[6], r[7]),
        _mm256_unpackhi_ps(r[6], r[7]),
    ];
    let u = [
        _mm256_shuffle_ps::<0x44>(t[0], t[2]),
        _mm256_shuffle_ps::<0xee>(t[0], t[2]),
        _mm256_shuffle_ps::<0x44>(t[1], t[3]),
        _mm256_shuffle_ps::<0xee>(t[1], t[3]),
        _mm256_shuffle_ps::<0x44>(t[4], t[6]),
        _mm256_shuffle_ps::<0xee>(t[4], t[6]),
        _mm256_shuffle_ps::<0x44>(t[5], t[7]),
        _mm256_shuffle_ps::<0xee>(t[5], t[7]),
    ];
    [
        _mm256_permute2f128_ps::<0x20>(u[0], u[4]),
        _mm256_permute2f128_ps::<0x20>(u[1], u[5]),
        _mm256_permute2f128_ps::<0x20>(u[2], u[6]),
        _mm256_permute2f128_ps::<0x20>(u[3], u[7]),
        _mm256_permute2f128_ps::<0x31>(u[0], u[4]),
        _mm256_permute2f128_ps::<0x31>(u[1], u[5]),
        _mm256_permute2f128_ps::<0x31>(u[2], u[6]),
        _mm256_permute2f128_ps::<0x31>(u[3], u[7]),
    ]
}

/// `MR` rows of `kk` contiguous f32 values (`rows`, the next row `rs` further) packed as
/// [`pack_lhs_into`] packs a block in f32, 8 steps at a time through [`transpose8`].
///
/// # Safety
/// The CPU must have AVX-512 F; the rows hold `kk` values each; `block` holds `kk * MR`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn pack_rows_f32(rows: *const f32, rs: isize, kk: usize, block: &mut [u32]) {
    use std::arch::x86_64::*;
    debug_assert!(block.len() >= kk * MR);
    let out = block.as_mut_ptr() as *mut f32;
    let whole = kk / 8 * 8;
    for p in (0..whole).step_by(8) {
        let mut r = [_mm256_setzero_ps(); 8];
        for (i, x) in r.iter_mut().enumerate() {
            *x = _mm256_loadu_ps(rows.offset(i as isize * rs).add(p));
        }
        for (i, x) in transpose8(r).into_iter().enumerate() {
            _mm256_storeu_ps(out.add((p + i) * MR), x);
        }
    }
    for p in whole..kk {
        for i in 0..MR {
            *out.add(p * MR + i) = *rows.offset(i as isize * rs).add(p);
        }
    }
}

/// `MR` rows of `kk` contiguous f32 values packed as [`pack_lhs_into`] packs a block in
/// bf16: 16 values (8 pairs) of each row rounded with `vcvtneps2bf16`, then the rows' pairs
/// transposed through [`transpose8`].
///
/// # Safety
/// The CPU must have AVX-512 F and BF16; the rows hold `kk` values each; `block` holds
/// `kk.div_ceil(2) * MR`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bf16")]
unsafe fn pack_rows_bf16(rows: *const f32, rs: isize, kk: usize, block: &mut [u32]) {
    use std::arch::x86_64::*;
    debug_assert!(block.len() >= kk.div_ceil(2) * MR);
    let out = block.as_mut_ptr();
    let whole = kk / 16 * 16;
    for p in (0..whole).step_by(16) {
        let mut r = [_mm256_setzero_ps(); 8];
        for (i, x) in r.iter_mut().enumerate() {
            let v = _mm512_loadu_ps(rows.offset(i as isize * rs).add(p));
            // 16 bf16 words: lane j of the 8 u32 holds values 2j (low half) and 2j + 1.
            *x = std::mem::transmute::<__m256bh, __m256>(_mm512_cvtneps_pbh(v));
        }
        for (i, x) in transpose8(r).into_iter().enumerate() {
            _mm256_storeu_ps(out.add((p / 2 + i) * MR) as *mut f32, x);
        }
    }
    for q in whole.div_ceil(2)..kk.div_ceil(2) {
        for i in 0..MR {
            let row = rows.offset(i as isize * rs);
            let odd = if 2 * q + 1 < kk {
                *row.add(2 * q + 1)
            } else {
                0.0
            };
            *out.add(q * MR + i) = pair(*row.add(2 * q), odd);
        }
    }
}

/// `MR` adjacent rows (`src[r]` is row `r`, depth index `p` at `src[p * cs]`) packed as
/// [`pack_lhs_into`] packs a block, in f32: a copy of 8 values per depth index.
///
/// # Safety
/// `src` reaches `MR` values at each of the `k` depth offsets, and `block` holds `k * MR`.
#[cfg(target_arch = "x86_64")]
unsafe fn pack_columns_f32(src: *const f32, k: usize, cs: isize, block: &mut [u32]) {
    debug_assert!(block.len() >= k * MR);
    for p in 0..k {
        let from = src.offset(p as isize * cs) as *const u32;
        std::ptr::copy_nonoverlapping(from, block.as_mut_ptr().add(p * MR), MR);
    }
}

/// `MR` adjacent rows (`src[r]` is row `r`, depth index `p` at `src[p * cs]`) packed as
/// [`pack_lhs_into`] packs a block, in bf16.
///
/// # Safety
/// The CPU must have AVX-512 F, VL and BF16; `src` reaches `MR` values at each of the `k`
/// depth offsets, and `block` holds `k.div_ceil(2) * MR` values.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512vl,avx512bf16")]
unsafe fn pack_columns(src: *const f32, k: usize, cs: isize, block: &mut [u32]) {
    use std::arch::x86_64::*;
    debug_assert!(MR == 8 && block.len() >= k.div_ceil(2) * MR);
    for p in 0..k.div_ceil(2) {
        let even = _mm256_loadu_ps(src.offset((2 * p) as isize * cs));
        let odd = if 2 * p + 1 < k {
            _mm256_loadu_ps(src.offset((2 * p + 1) as isize * cs))
        } else {
            _mm256_setzero_ps()
        };
        let e: __m128i = std::mem::transmute(_mm256_cvtneps_pbh(even));
        let o: __m128i = std::mem::transmute(_mm256_cvtneps_pbh(odd));
        let out = block.as_mut_ptr().add(p * MR) as *mut __m128i;
        _mm_storeu_si128(out, _mm_unpacklo_epi16(e, o));
        _mm_storeu_si128(out.add(1), _mm_unpackhi_epi16(e, o));
    }
}

/// Rows `r0..r0 + rows` of `lhs` over depth `k0..k0 + kk` (`k0` a whole step) packed for the
/// micro-kernel into `out`: per block of `MR` rows, per step, `MR` u32 (in bf16 holding two
/// values, the lower half the even index). Rows past `rows` and the depth past `kk` are zeros.
///
/// # Safety
/// `lhs` must address those rows and depths with its strides; `out` holds
/// `rows.div_ceil(MR) * kk.div_ceil(fmt.depth()) * MR` values; the CPU must run `fmt`.
#[cfg(target_arch = "x86_64")]
unsafe fn pack_lhs_into(
    fmt: Format,
    (r0, rows): (usize, usize),
    (k0, kk): (usize, usize),
    lhs: MatRef,
    out: &mut [u32],
) {
    let d = fmt.depth();
    let steps = kk.div_ceil(d);
    let blocks = rows.div_ceil(MR);
    let out = &mut out[..blocks * steps * MR];
    out.fill(0);
    let base = lhs.ptr.offset(r0 as isize * lhs.rs + k0 as isize * lhs.cs);
    let at = |i: usize, p: usize| -> u32 {
        let row = base.offset(i as isize * lhs.rs);
        let value = |q: usize| {
            if q < kk {
                *row.offset(q as isize * lhs.cs)
            } else {
                0.0
            }
        };
        step(fmt, value(d * p), value(d * p + 1))
    };
    for (bi, block) in out.chunks_exact_mut(steps * MR).enumerate() {
        let n = MR.min(rows - bi * MR);
        // Read along whichever direction is contiguous in memory.
        if lhs.cs == 1 && n == MR {
            // Eight whole rows: transposed 8 steps at a time in registers.
            let rows = base.offset((bi * MR) as isize * lhs.rs);
            match fmt {
                Format::F32 => pack_rows_f32(rows, lhs.rs, kk, block),
                Format::Bf16 => pack_rows_bf16(rows, lhs.rs, kk, block),
            }
        } else if lhs.cs == 1 {
            for r in 0..n {
                let row = base.offset((bi * MR + r) as isize * lhs.rs);
                let dst = block.as_mut_ptr().add(r);
                match fmt {
                    Format::F32 => pack_run_f32(row, kk, dst, MR),
                    Format::Bf16 => pack_run(row, kk, dst, MR),
                }
            }
        } else if lhs.rs == 1 && n == MR {
            // The block's rows are side by side (Winograd's tiles): 8 at a time.
            match fmt {
                Format::F32 => pack_columns_f32(base.add(bi * MR), kk, lhs.cs, block),
                Format::Bf16 => pack_columns(base.add(bi * MR), kk, lhs.cs, block),
            }
        } else {
            for p in 0..steps {
                for r in 0..n {
                    block[p * MR + r] = at(bi * MR + r, p);
                }
            }
        }
    }
}

/// All of `rhs` (`k x n`) packed: per panel of `NR` columns, per step, `NR` u32; panel `j`
/// starts at `j * k.div_ceil(fmt.depth()) * NR`. Columns past `n` are zeros.
///
/// # Safety
/// `rhs` must address a `k x n` matrix with its strides; the CPU must run `fmt`.
#[cfg(target_arch = "x86_64")]
unsafe fn pack_rhs(fmt: Format, k: usize, n: usize, rhs: MatRef) -> Vec<u32> {
    let mut out = vec![0u32; rhs_len(fmt, k, n)];
    pack_rhs_into(fmt, k, n, rhs, &mut out);
    out
}

/// Length of [`pack_rhs`]' output.
#[cfg(target_arch = "x86_64")]
fn rhs_len(fmt: Format, k: usize, n: usize) -> usize {
    n.div_ceil(NR) * k.div_ceil(fmt.depth()) * NR
}

/// [`pack_rhs`] into `out` (zeroed, [`rhs_len`] long).
///
/// # Safety
/// As [`pack_rhs`].
#[cfg(target_arch = "x86_64")]
unsafe fn pack_rhs_into(fmt: Format, k: usize, n: usize, rhs: MatRef, out: &mut [u32]) {
    if k == 0 || n == 0 {
        return;
    }
    let d = fmt.depth();
    let steps = k.div_ceil(d);
    if rhs.cs == 1 {
        match fmt {
            Format::F32 => pack_rhs_rows_f32(k, n, rhs, out),
            Format::Bf16 => pack_rhs_rows(k, n, rhs, out),
        }
        return;
    }
    let at = |j: usize, p: usize| -> u32 {
        let col = rhs.ptr.offset(j as isize * rhs.cs);
        let value = |q: usize| {
            if q < k {
                *col.offset(q as isize * rhs.rs)
            } else {
                0.0
            }
        };
        step(fmt, value(d * p), value(d * p + 1))
    };
    for (jp, panel) in out.chunks_exact_mut(steps * NR).enumerate() {
        let c0 = jp * NR;
        let cols = NR.min(n - c0);
        if rhs.rs == 1 {
            // Each column is contiguous along the depth (a weight read as Wᵀ).
            for j in 0..cols {
                let col = rhs.ptr.offset((c0 + j) as isize * rhs.cs);
                let dst = panel.as_mut_ptr().add(j);
                match fmt {
                    Format::F32 => pack_run_f32(col, k, dst, NR),
                    Format::Bf16 => pack_run(col, k, dst, NR),
                }
            }
        } else {
            for p in 0..steps {
                for j in 0..cols {
                    panel[p * NR + j] = at(c0 + j, p);
                }
            }
        }
    }
}

/// [`pack_rhs`] for a row-major `rhs` (each depth index a contiguous row, as Winograd's
/// transformed tiles and the im2col columns are): rows `2p` and `2p + 1` are read 16 columns
/// at a time, rounded, and interleaved into pairs with vector operations.
///
/// # Safety
/// As [`pack_rhs`], with `rhs.cs == 1`; `out` holds its output.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bf16")]
unsafe fn pack_rhs_rows(k: usize, n: usize, rhs: MatRef, out: &mut [u32]) {
    use std::arch::x86_64::*;
    let pairs = k.div_ceil(2);
    // 16 bf16 words widened to the low halves of 16 u32.
    let words = |x: __m512| -> __m512i {
        let h: __m256i = std::mem::transmute(_mm512_cvtneps_pbh(x));
        _mm512_cvtepu16_epi32(h)
    };
    for (jp, panel) in out.chunks_exact_mut(pairs * NR).enumerate() {
        let c0 = jp * NR;
        let mut masks = [0 as __mmask16; NR / 16];
        for (v, mask) in masks.iter_mut().enumerate() {
            let cols = (n - c0).saturating_sub(16 * v).min(16);
            *mask = ((1u32 << cols) - 1) as __mmask16;
        }
        for p in 0..pairs {
            // Wrapping arithmetic: the odd row past an odd `k`, and a second vector whose
            // mask is empty, are addressed but never read, and may lie past the buffer.
            let even = rhs
                .ptr
                .wrapping_offset((2 * p) as isize * rhs.rs + c0 as isize);
            let odd = rhs
                .ptr
                .wrapping_offset((2 * p + 1) as isize * rhs.rs + c0 as isize);
            for (v, &mask) in masks.iter().enumerate() {
                let lo = words(_mm512_maskz_loadu_ps(mask, even.wrapping_add(16 * v)));
                let hi = if 2 * p + 1 < k {
                    words(_mm512_maskz_loadu_ps(mask, odd.wrapping_add(16 * v)))
                } else {
                    _mm512_setzero_si512()
                };
                let pair = _mm512_or_si512(lo, _mm512_slli_epi32::<16>(hi));
                let at = panel.as_mut_ptr().add(p * NR + 16 * v) as *mut __m512i;
                _mm512_storeu_si512(at, pair);
            }
        }
    }
}

/// [`pack_rhs`] for a row-major `rhs` in f32: each row's columns of a panel copied as they are.
///
/// # Safety
/// As [`pack_rhs`], with `rhs.cs == 1`; `out` holds its output (zeroed).
#[cfg(target_arch = "x86_64")]
unsafe fn pack_rhs_rows_f32(k: usize, n: usize, rhs: MatRef, out: &mut [u32]) {
    for (jp, panel) in out.chunks_exact_mut(k * NR).enumerate() {
        let c0 = jp * NR;
        let cols = NR.min(n - c0);
        for p in 0..k {
            let from = rhs.ptr.offset(p as isize * rhs.rs + c0 as isize) as *const u32;
            std::ptr::copy_nonoverlapping(from, panel.as_mut_ptr().add(p * NR), cols);
        }
    }
}

/// One `MR x NR` tile in f32: the dot products of a packed row block and a packed column panel
/// over `steps` depth indices, into `tile` (row-major, `NR` wide).
///
/// # Safety
/// The CPU must have AVX-512 F; `a` holds `steps * MR` and `b` `steps * NR` values.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn tile_f32(steps: usize, a: *const u32, b: *const u32, tile: &mut [f32; MR * NR]) {
    use std::arch::x86_64::*;
    let mut acc = [_mm512_setzero_ps(); 2 * MR];
    let (mut ap, mut bp) = (a as *const f32, b as *const f32);
    for _ in 0..steps {
        let b0 = _mm512_loadu_ps(bp);
        let b1 = _mm512_loadu_ps(bp.add(16));
        for r in 0..MR {
            let av = _mm512_set1_ps(*ap.add(r));
            acc[2 * r] = _mm512_fmadd_ps(av, b0, acc[2 * r]);
            acc[2 * r + 1] = _mm512_fmadd_ps(av, b1, acc[2 * r + 1]);
        }
        ap = ap.add(MR);
        bp = bp.add(NR);
    }
    for r in 0..MR {
        _mm512_storeu_ps(tile.as_mut_ptr().add(r * NR), acc[2 * r]);
        _mm512_storeu_ps(tile.as_mut_ptr().add(r * NR + 16), acc[2 * r + 1]);
    }
}

/// One `MR x NR` tile: the dot products of a packed row block and a packed column panel over
/// `pairs` depth pairs, into `tile` (row-major, `NR` wide).
///
/// # Safety
/// The CPU must have AVX-512 F and BF16; `a` holds `pairs * MR` and `b` `pairs * NR` values.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bf16")]
unsafe fn tile_bf16(pairs: usize, a: *const u32, b: *const u32, tile: &mut [f32; MR * NR]) {
    use std::arch::x86_64::*;
    let mut acc = [_mm512_setzero_ps(); 2 * MR];
    let (mut ap, mut bp) = (a, b);
    for _ in 0..pairs {
        let b0: __m512bh = std::mem::transmute(_mm512_loadu_si512(bp as *const __m512i));
        let b1: __m512bh = std::mem::transmute(_mm512_loadu_si512(bp.add(16) as *const __m512i));
        for r in 0..MR {
            let av: __m512bh = std::mem::transmute(_mm512_set1_epi32(*ap.add(r) as i32));
            acc[2 * r] = _mm512_dpbf16_ps(acc[2 * r], av, b0);
            acc[2 * r + 1] = _mm512_dpbf16_ps(acc[2 * r + 1], av, b1);
        }
        ap = ap.add(MR);
        bp = bp.add(NR);
    }
    for r in 0..MR {
        _mm512_storeu_ps(tile.as_mut_ptr().add(r * NR), acc[2 * r]);
        _mm512_storeu_ps(tile.as_mut_ptr().add(r * NR + 16), acc[2 * r + 1]);
    }
}

/// `values` written (or, with `add`, added) to the contiguous `row`, 16 at a time.
///
/// # Safety
/// The CPU must have AVX-512 F; `row` holds `values.len()` floats.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn store_row(row: *mut f32, values: &[f32], add: bool) {
    use std::arch::x86_64::*;
    for (i, chunk) in values.chunks(16).enumerate() {
        let mask: __mmask16 = if chunk.len() == 16 {
            0xffff
        } else {
            (1u16 << chunk.len()) - 1
        };
        let dst = row.add(16 * i);
        let mut v = _mm512_maskz_loadu_ps(mask, chunk.as_ptr());
        if add {
            v = _mm512_add_ps(v, _mm512_maskz_loadu_ps(mask, dst));
        }
        _mm512_mask_storeu_ps(dst, mask, v);
    }
}

/// Asks for the cache line at `p` in a state ready to be written (`prefetchw`).
#[cfg(target_arch = "x86_64")]
#[inline(always)]
fn prefetch_for_write(p: *const f32) {
    use std::arch::x86_64::*;
    // SAFETY: a prefetch is a hint: it never faults, whatever the address.
    unsafe { _mm_prefetch::<_MM_HINT_ET0>(p as *const i8) };
}

/// Rows packed together (a whole number of `MR`): their slice, 72 KiB at most, stays in L2
/// while every column panel passes over it.
#[cfg(target_arch = "x86_64")]
const MC: usize = 96;

/// The left operand of a product packed once for the micro-kernel, to multiply by many right
/// operands (Winograd's transformed filters, one per point, used by every chunk of tiles).
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
pub(crate) struct PackedLhs {
    fmt: Format,
    m: usize,
    k: usize,
    /// Per block of `MR` rows, `k.div_ceil(fmt.depth()) * MR` steps.
    #[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
    data: Vec<u32>,
}

impl PackedLhs {
    /// An `m x k` operand of zeros in `fmt`, to be filled through [`PackedLhs::data_mut`].
    pub(crate) fn zeroed(fmt: Format, m: usize, k: usize) -> Self {
        Self {
            fmt,
            m,
            k,
            data: crate::kernels::zeros(m.div_ceil(MR) * k.div_ceil(fmt.depth()) * MR),
        }
    }

    /// Rows and depth of the operand.
    pub(crate) fn dims(&self) -> (usize, usize) {
        (self.m, self.k)
    }

    /// The packed values: element `(block * steps + p) * MR + r` is step `p` of row
    /// `block * MR + r` (zero past `m` and `k`): in f32 the bits of depth `p`, in bf16 the
    /// [`pair`] of depths `2p` and `2p + 1` (`steps` is `k` or `k.div_ceil(2)`).
    pub(crate) fn data_mut(&mut self) -> &mut [u32] {
        &mut self.data
    }

    /// `lhs` (`m x k`) packed (the tests pack through it; Winograd fills
    /// [`PackedLhs::zeroed`] ones as it transforms its filters).
    ///
    /// # Safety
    /// `lhs` must address an `m x k` matrix with its strides; the CPU must have what
    /// [`supported`] checks.
    #[cfg_attr(not(test), allow(dead_code))]
    pub(crate) unsafe fn new(fmt: Format, m: usize, k: usize, lhs: MatRef) -> Self {
        #[cfg(target_arch = "x86_64")]
        {
            let mut packed = Self::zeroed(fmt, m, k);
            if m > 0 && k > 0 {
                pack_lhs_into(fmt, (0, m), (0, k), lhs, &mut packed.data);
            }
            packed
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            let _ = (fmt, m, k, lhs);
            unreachable!("AVX-512 products are only taken where the CPU runs them");
        }
    }
}

/// Where the blocked product gets its row blocks.
#[cfg(target_arch = "x86_64")]
#[derive(Clone, Copy)]
enum Lhs<'a> {
    /// Packed a slice at a time from this matrix.
    Plain(MatRef),
    /// Already packed.
    Packed(&'a PackedLhs),
}

/// `dst = (read_dst ? dst : 0) + lhs · rhs` for an `m x n` `dst` of depth `k`, on this thread,
/// with the operands in `fmt` (rounded to it; f32 accumulation).
///
/// # Safety
/// As `kernels::gemm_on_threads`; and the CPU must run `fmt` ([`Format::supported`]).
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn gemm(
    fmt: Format,
    m: usize,
    n: usize,
    k: usize,
    dst: MatMut,
    read_dst: bool,
    lhs: MatRef,
    rhs: MatRef,
) {
    #[cfg(target_arch = "x86_64")]
    {
        if dst.cs != 1 && dst.rs == 1 {
            // A column-major output: computed as its transpose.
            let (dt, lhs, rhs) = transposed(dst, lhs, rhs);
            return gemm(fmt, n, m, k, dt, read_dst, lhs, rhs);
        }
        let b = pack_rhs(fmt, k, n, rhs);
        blocked(fmt, m, n, k, dst, read_dst, Lhs::Plain(lhs), &b);
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = (fmt, m, n, k, dst, read_dst, lhs, rhs);
        unreachable!("AVX-512 products are only taken where the CPU runs them");
    }
}

/// [`gemm`] with a left operand packed beforehand: `dst` (`a.m x n`) `= (read_dst ? dst : 0) +
/// a · rhs`.
///
/// # Safety
/// As [`gemm`], for an `a.m x n` `dst` and an `a.k x n` `rhs`.
pub(crate) unsafe fn gemm_packed_lhs(
    n: usize,
    dst: MatMut,
    read_dst: bool,
    a: &PackedLhs,
    rhs: MatRef,
) {
    #[cfg(target_arch = "x86_64")]
    {
        let b = pack_rhs(a.fmt, a.k, n, rhs);
        blocked(a.fmt, a.m, n, a.k, dst, read_dst, Lhs::Packed(a), &b);
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = (n, dst, read_dst, a, rhs);
        unreachable!("AVX-512 products are only taken where the CPU runs them");
    }
}

/// Tasks per part in [`gemm_parts`]: the product is cut into this many blocks per thread,
/// which rayon's idle threads take as they come free. With one block per thread, a thread
/// that fell behind (the other core's interrupts, the hypervisor, a cache miss storm) held the
/// other waiting at the end of every product; smaller blocks even that out. Against one block
/// per thread, interleaved six times on two threads (Zen 5): UNet step 3.81 s against 3.89 s
/// (medians), VAE decode 3.50 s against 3.63 s; 8 per thread measured as 4. Packing is
/// unchanged (one share per thread), and on row cuts the shared operand is read once per block
/// of at most MC rows anyway, so the smaller blocks add little memory traffic.
#[cfg(target_arch = "x86_64")]
const TASKS_PER_PART: usize = 4;

/// [`gemm`] on `parts` threads of rayon's pool, the output cut into blocks of rows (or, with
/// `by_columns`, of columns), [`TASKS_PER_PART`] per thread. The operand every task reads
/// whole (the right one when rows are cut, the left one when columns are) is packed once, by
/// all the threads, and shared: with independent products per task
/// (`kernels::gemm_on_threads`' scheme), each packed all of it, and on two threads the 8x8
/// level's im2col product packed its 23040 x 128 right operand twice.
///
/// # Safety
/// As [`gemm`].
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn gemm_parts(
    fmt: Format,
    parts: usize,
    by_columns: bool,
    (m, n, k): (usize, usize, usize),
    dst: MatMut,
    read_dst: bool,
    lhs: MatRef,
    rhs: MatRef,
) {
    #[cfg(target_arch = "x86_64")]
    {
        if dst.cs != 1 && dst.rs == 1 {
            let (dt, lhs, rhs) = transposed(dst, lhs, rhs);
            return gemm_parts(fmt, parts, !by_columns, (n, m, k), dt, read_dst, lhs, rhs);
        }
        if parts <= 1 || k == 0 || m == 0 || n == 0 {
            return gemm(fmt, m, n, k, dst, read_dst, lhs, rhs);
        }
        // Task boundaries on whole row blocks or column panels, spread evenly.
        let (len, unit) = if by_columns { (n, NR) } else { (m, MR) };
        let tasks = (parts * TASKS_PER_PART).min(len.div_ceil(unit)).max(1);
        let bound = |t: usize| (len * t / tasks).next_multiple_of(unit).min(len);
        let run_parts = |f: &(dyn Fn(usize, usize) + Sync)| {
            each_part(tasks, &|t| f(bound(t), bound(t + 1)));
        };
        let steps = k.div_ceil(fmt.depth());
        if by_columns {
            // The left operand shared: each task packs its share of the row blocks.
            let mut a = PackedLhs::zeroed(fmt, m, k);
            pack_in_parts(
                parts,
                &mut a.data,
                m.div_ceil(MR),
                steps * MR,
                &|b0, b1, part| {
                    let rows = (b1 * MR).min(m) - b0 * MR;
                    pack_lhs_into(fmt, (b0 * MR, rows), (0, k), lhs, part);
                },
            );
            let a = &a;
            run_parts(&|c0: usize, c1: usize| {
                if c0 < c1 {
                    // SAFETY: columns c0..c1 of the operands and of `dst`, which only this
                    // task writes.
                    let (dst, rhs) = (dst, rhs);
                    let dst = MatMut {
                        ptr: dst.ptr.offset(c0 as isize * dst.cs),
                        ..dst
                    };
                    let rhs = MatRef {
                        ptr: rhs.ptr.offset(c0 as isize * rhs.cs),
                        ..rhs
                    };
                    let b = pack_rhs(fmt, k, c1 - c0, rhs);
                    blocked(fmt, m, c1 - c0, k, dst, read_dst, Lhs::Packed(a), &b);
                }
            });
        } else {
            // The right operand shared: each task packs its share of the column panels.
            let mut b = crate::kernels::zeros::<u32>(rhs_len(fmt, k, n));
            pack_in_parts(
                parts,
                &mut b,
                n.div_ceil(NR),
                steps * NR,
                &|p0, p1, part| {
                    let cols = (p1 * NR).min(n) - p0 * NR;
                    // A whole-struct copy, so the closure holds the `Sync` wrapper, not its
                    // raw pointer field.
                    let whole = rhs;
                    // SAFETY: column p0 * NR is inside `rhs` (p0 < p1, so it is below n).
                    let rhs = MatRef {
                        ptr: unsafe { whole.ptr.offset((p0 * NR) as isize * whole.cs) },
                        ..whole
                    };
                    pack_rhs_into(fmt, k, cols, rhs, part);
                },
            );
            let b = &b;
            run_parts(&|r0: usize, r1: usize| {
                if r0 < r1 {
                    // SAFETY: rows r0..r1 of `lhs` and `dst`, which only this task writes.
                    let (dst, lhs) = (dst, lhs);
                    let dst = MatMut {
                        ptr: dst.ptr.offset(r0 as isize * dst.rs),
                        ..dst
                    };
                    let lhs = MatRef {
                        ptr: lhs.ptr.offset(r0 as isize * lhs.rs),
                        ..lhs
                    };
                    blocked(fmt, r1 - r0, n, k, dst, read_dst, Lhs::Plain(lhs), b);
                }
            });
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = (fmt, parts, by_columns, m, n, k, dst, read_dst, lhs, rhs);
        unreachable!("AVX-512 products are only taken where the CPU runs them");
    }
}

/// Packs a shared operand in `parts` tasks: `buf` holds `units` packed units (row blocks or
/// column panels) of `unit_len` values each, and task `t` packs the units `u0..u1` of its
/// even share into their part of it with `pack(u0, u1, part)` (not called for an empty share).
#[cfg(target_arch = "x86_64")]
fn pack_in_parts(
    parts: usize,
    buf: &mut [u32],
    units: usize,
    unit_len: usize,
    pack: &(dyn Fn(usize, usize, &mut [u32]) + Sync),
) {
    let mut rest = &mut buf[..units * unit_len];
    let mut shares = Vec::with_capacity(parts);
    for t in 0..parts {
        let (u0, u1) = (units * t / parts, units * (t + 1) / parts);
        let (part, tail) = std::mem::take(&mut rest).split_at_mut((u1 - u0) * unit_len);
        rest = tail;
        if u0 < u1 {
            shares.push((u0, u1, part));
        }
    }
    rayon::scope(|s| {
        let mut shares = shares.into_iter();
        let first = shares.next();
        for (u0, u1, part) in shares {
            s.spawn(move |_| pack(u0, u1, part));
        }
        if let Some((u0, u1, part)) = first {
            pack(u0, u1, part);
        }
    });
}

/// Runs `f(t)` for every `t < parts` as tasks on rayon's pool, `f(0)` on this thread.
#[cfg(target_arch = "x86_64")]
fn each_part(parts: usize, f: &(dyn Fn(usize) + Sync)) {
    rayon::scope(|s| {
        for t in 1..parts {
            s.spawn(move |_| f(t));
        }
        f(0);
    });
}

/// The product `dst = lhs · rhs` restated as `dstᵀ = rhsᵀ · lhsᵀ`: for a column-major `dst`,
/// whose transpose has contiguous rows, so tiles are stored as whole vectors.
#[cfg(target_arch = "x86_64")]
fn transposed(dst: MatMut, lhs: MatRef, rhs: MatRef) -> (MatMut, MatRef, MatRef) {
    let t = |x: MatRef| MatRef {
        rs: x.cs,
        cs: x.rs,
        ..x
    };
    let dt = MatMut {
        rs: dst.cs,
        cs: dst.rs,
        ..dst
    };
    (dt, t(rhs), t(lhs))
}

/// The product in blocks, with `b` the right operand as [`pack_rhs`] packs it: per slice of
/// [`MC`] rows and [`Format::slice_steps`] depth steps, the row slice (packed now or
/// beforehand) against every column panel's slice.
///
/// # Safety
/// As [`gemm`]; a packed `lhs` is `m x k` in `fmt`, `b` `k x n` in `fmt`.
#[allow(clippy::too_many_arguments)]
#[cfg(target_arch = "x86_64")]
unsafe fn blocked(
    fmt: Format,
    m: usize,
    n: usize,
    k: usize,
    dst: MatMut,
    read_dst: bool,
    lhs: Lhs,
    b: &[u32],
) {
    assert!(
        b.len() >= rhs_len(fmt, k, n),
        "avx512_gemm: packed operand too short"
    );
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        // An empty sum: the output stays, or is zero.
        if !read_dst {
            for i in 0..m {
                for j in 0..n {
                    *dst.ptr.offset(i as isize * dst.rs + j as isize * dst.cs) = 0.0;
                }
            }
        }
        return;
    }
    let d = fmt.depth();
    let steps = k.div_ceil(d);
    let slice_steps = fmt.slice_steps();
    let mut slice = match lhs {
        Lhs::Plain(_) => vec![0u32; MC * slice_steps],
        Lhs::Packed(_) => Vec::new(),
    };
    let mut out = [0f32; MR * NR];
    for r0 in (0..m).step_by(MC) {
        let rows = MC.min(m - r0);
        for p0 in (0..steps).step_by(slice_steps) {
            let steps_now = slice_steps.min(steps - p0);
            // Block `i` of this slice starts at `base + (i * stride + skip) * MR`.
            let (base, stride, skip, first_block) = match lhs {
                Lhs::Plain(lhs) => {
                    let kk = (d * steps_now).min(k - d * p0);
                    pack_lhs_into(fmt, (r0, rows), (d * p0, kk), lhs, &mut slice);
                    (slice.as_ptr(), steps_now, 0, 0)
                }
                Lhs::Packed(a) => (a.data.as_ptr(), steps, p0, r0 / MR),
            };
            // Later depth slices add to what the first one wrote.
            let add = read_dst || p0 > 0;
            for (jp, c0) in (0..n).step_by(NR).enumerate() {
                let panel = b.as_ptr().add((jp * steps + p0) * NR);
                let cols = NR.min(n - c0);
                for i in 0..rows.div_ceil(MR) {
                    let block = base.add(((first_block + i) * stride + skip) * MR);
                    let top = r0 + i * MR;
                    if dst.cs == 1 {
                        // The output is usually not in cache (a large layer's is tens of MB):
                        // ask for this tile's lines now, to be written, so the misses overlap
                        // the multiplications instead of stalling the stores after them.
                        for r in 0..MR.min(m - top) {
                            let row = dst.ptr.offset((top + r) as isize * dst.rs + c0 as isize);
                            for line in (0..cols).step_by(16) {
                                prefetch_for_write(row.add(line));
                            }
                        }
                    }
                    match fmt {
                        Format::F32 => tile_f32(steps_now, block, panel, &mut out),
                        Format::Bf16 => tile_bf16(steps_now, block, panel, &mut out),
                    }
                    for r in 0..MR.min(m - top) {
                        let row = dst
                            .ptr
                            .offset((top + r) as isize * dst.rs + c0 as isize * dst.cs);
                        let values = &out[r * NR..r * NR + cols];
                        if dst.cs == 1 {
                            store_row(row, values, add);
                            continue;
                        }
                        for (j, v) in values.iter().enumerate() {
                            let d = row.offset(j as isize * dst.cs);
                            *d = if add { *d + v } else { *v };
                        }
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn values(len: usize, seed: u32) -> Vec<f32> {
        // A fixed pseudo-random sequence in [-1, 1).
        let mut s = seed.wrapping_mul(2_654_435_761).wrapping_add(1);
        (0..len)
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 17;
                s ^= s << 5;
                (s as f32 / u32::MAX as f32) * 2.0 - 1.0
            })
            .collect()
    }

    #[test]
    fn rounding_is_to_nearest_even() {
        assert_eq!(to_bf16(1.0), 0x3f80);
        // 1 + 2^-8 is halfway between two bf16 values: to the even one (1.0).
        assert_eq!(to_bf16(1.0 + 1.0 / 256.0), 0x3f80);
        // 1 + 3 * 2^-8 is halfway too: up to the even one (1 + 2^-6, 0x3f82).
        assert_eq!(to_bf16(1.0 + 3.0 / 256.0), 0x3f82);
        assert_eq!(to_bf16(-2.5), 0xc020);
        assert!(f32::from_bits((to_bf16(f32::NAN) as u32) << 16).is_nan());
    }

    /// Products of every edge case (sizes not multiples of the tile, odd depth, several row and
    /// depth slices, each operand row-major, transposed or strided, row- and column-major
    /// outputs, accumulation into the output, a left operand packed beforehand) in both
    /// formats, against f64 on the same inputs (rounded to bf16 for bf16): the kernel's only
    /// error is then f32 accumulation.
    #[test]
    fn products_match_f64_on_rounded_inputs() {
        for fmt in [Format::F32, Format::Bf16] {
            if fmt.supported() {
                products_match_f64(fmt);
            } else {
                eprintln!("{fmt:?} skipped: this CPU cannot run it");
            }
        }
    }

    fn products_match_f64(fmt: Format) {
        let round = |v: f32| match fmt {
            Format::F32 => v as f64,
            Format::Bf16 => f32::from_bits((to_bf16(v) as u32) << 16) as f64,
        };
        let shapes = [
            (1, 1, 1),
            (8, 32, 2),
            (13, 45, 77),
            (64, 100, 320),
            (3, 70, 9),
            (5, 3, 0),
            // Three row slices (the last partial) and, in either format, several depth slices
            // (the last odd).
            (200, 33, 901),
        ];
        // (lhs, rhs) layouts: row-major, or stored transposed; "strided": neither unit.
        let layouts = ["row", "transposed", "strided"];
        for &(m, n, k) in &shapes {
            for (case, (lhs_layout, rhs_layout)) in layouts
                .iter()
                .flat_map(|a| layouts.iter().map(move |b| (*a, *b)))
                .enumerate()
            {
                // Every layout pair with both output layouts, with and without accumulation,
                // and each way in: one product, a packed left operand, split by rows on two
                // tasks, split by columns on three; spread over the cases.
                let col_major = (case / 4) % 2 == 1;
                let read_dst = case % 3 != 0;
                let mode = case % 4;
                // Operands in buffers twice their size, so "strided" can skip every other
                // element along both directions.
                let a = values(4 * m * k + 4, 1);
                let b = values(4 * k * n + 4, 2);
                let operand = |ptr: *const f32, rows: usize, cols: usize, layout: &str| match layout
                {
                    "row" => MatRef::row_major(ptr, cols),
                    "transposed" => MatRef::transposed(ptr, rows),
                    _ => MatRef {
                        ptr,
                        rs: 2 * cols as isize + 1,
                        cs: 2,
                    },
                };
                let lhs = operand(a.as_ptr(), m, k, lhs_layout);
                let rhs = operand(b.as_ptr(), k, n, rhs_layout);
                let elem = |x: &[f32], op: MatRef, i: usize, j: usize| {
                    let base = op.ptr as usize - x.as_ptr() as usize;
                    round(x[base / 4 + (i as isize * op.rs + j as isize * op.cs) as usize])
                };
                // The output inside a buffer with spare elements on each line.
                let (rs, cs, len) = if col_major {
                    (1, m + 3, (m + 3) * n)
                } else {
                    (n + 5, 1, (n + 5) * m)
                };
                let mut c = values(len, 3);
                let before = c.clone();
                let dst = MatMut {
                    ptr: c.as_mut_ptr(),
                    rs: rs as isize,
                    cs: cs as isize,
                };
                // SAFETY: the operands address their buffers with these strides; the CPU was
                // checked above.
                unsafe {
                    match mode {
                        0 => gemm(fmt, m, n, k, dst, read_dst, lhs, rhs),
                        1 => {
                            let a = PackedLhs::new(fmt, m, k, lhs);
                            gemm_packed_lhs(n, dst, read_dst, &a, rhs);
                        }
                        2 => gemm_parts(fmt, 2, false, (m, n, k), dst, read_dst, lhs, rhs),
                        _ => gemm_parts(fmt, 3, true, (m, n, k), dst, read_dst, lhs, rhs),
                    }
                }
                let what = format!(
                    "{fmt:?} {m}x{n}x{k} lhs {lhs_layout} rhs {rhs_layout} col-major {col_major} \
                     read {read_dst} mode {mode}"
                );
                let mut inside = vec![false; len];
                for i in 0..m {
                    for j in 0..n {
                        let idx = i * rs + j * cs;
                        inside[idx] = true;
                        let mut want: f64 = (0..k)
                            .map(|p| elem(&a, lhs, i, p) * elem(&b, rhs, p, j))
                            .sum();
                        if read_dst {
                            want += before[idx] as f64;
                        }
                        let got = c[idx] as f64;
                        assert!(
                            (got - want).abs() <= 1e-5 * (k as f64).sqrt() + 1e-6,
                            "{what}: [{i},{j}] {got} vs {want}"
                        );
                    }
                }
                // Nothing outside the m x n block changed.
                for (idx, (x, y)) in c.iter().zip(&before).enumerate() {
                    assert!(
                        inside[idx] || x.to_bits() == y.to_bits(),
                        "{what}: wrote {idx}"
                    );
                }
            }
        }
    }
}
