//! Matrix products in bfloat16 on x86 CPUs with AVX-512 BF16 (AMD Zen 4 and later, Intel
//! Cooper Lake / Sapphire Rapids and later): the operands are rounded to bf16 and multiplied with
//! `vdpbf16ps`, which does two bf16 multiply-adds per f32 lane per instruction, accumulating in
//! f32. On a Zen 4 core it peaks at 494 GFLOP/s against 266 for f32 FMA (register-only loops,
//! measured here). Opt-in ([`set_enabled`], or `LD_CPU_BF16=1` in the environment for
//! benchmarks): bf16 keeps 8 bits of mantissa, so pictures differ from f32 ones by about what
//! fp16 on a GPU changes.
//!
//! Written by hand: neither `gemm` nor candle has a bf16 kernel (candle widens bf16 to f32 for
//! its CPU products). The scheme is the textbook one: both operands packed into pairs along the
//! depth (the layout `vdpbf16ps` reads), a micro-kernel of 8 rows by 32 columns in 16 zmm
//! accumulators, the whole depth per tile, then the tile added into the output with its strides.

use std::sync::atomic::{AtomicBool, Ordering};

use crate::kernels::{MatMut, MatRef};

/// Rows and columns of the micro-kernel's output tile.
#[cfg(target_arch = "x86_64")]
const MR: usize = 8;
#[cfg(target_arch = "x86_64")]
const NR: usize = 32;

static ENABLED: AtomicBool = AtomicBool::new(false);

/// What to tell someone who asks for bf16 on a CPU without it.
pub const UNSUPPORTED: &str =
    "bf16 needs a CPU with AVX-512 BF16 (AMD Zen 4, Intel Sapphire Rapids or newer)";

/// Turns the bf16 products on or off for this process (where the CPU has AVX-512 BF16).
pub fn set_enabled(on: bool) {
    ENABLED.store(on, Ordering::Relaxed);
}

/// Turns the bf16 products on; an error saying why ([`UNSUPPORTED`]) on a CPU without them.
pub fn enable() -> Result<(), &'static str> {
    if !supported() {
        return Err(UNSUPPORTED);
    }
    set_enabled(true);
    Ok(())
}

/// `LD_CPU_BF16=1`: on whatever the settings say (read once; warned about once where the CPU
/// cannot).
fn forced_by_env() -> bool {
    static FORCED: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *FORCED.get_or_init(|| {
        let asked = std::env::var("LD_CPU_BF16").is_ok_and(|v| v == "1");
        if asked && !supported() {
            tracing::warn!("LD_CPU_BF16=1 is ignored: {UNSUPPORTED}");
        }
        asked
    })
}

/// Whether this CPU can run the bf16 products.
pub fn supported() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        // Enabling avx512bf16 also lets the compiler use avx512bw in those functions.
        std::arch::is_x86_feature_detected!("avx512f")
            && std::arch::is_x86_feature_detected!("avx512bw")
            && std::arch::is_x86_feature_detected!("avx512vl")
            && std::arch::is_x86_feature_detected!("avx512bf16")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// Whether products should take the bf16 path: asked for, and the CPU has it.
pub fn active() -> bool {
    (ENABLED.load(Ordering::Relaxed) || forced_by_env()) && supported()
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
/// [`to_bf16`]), the rest one by one.
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
        let lo = to_bf16(*src.add(2 * p)) as u32;
        let hi = if 2 * p + 1 < len {
            to_bf16(*src.add(2 * p + 1)) as u32
        } else {
            0
        };
        *dst.add(p * stride) = lo | (hi << 16);
    }
}

/// `MR` adjacent rows (`src[r]` is row `r`, depth index `p` at `src[p * cs]`) packed as
/// [`pack_lhs`] packs a block.
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

/// `lhs` (`m x k`) packed for the micro-kernel: per block of `MR` rows, per pair of depth
/// indices, `MR` u32 holding the two bf16 values (lower half: the even index). Rows past `m`
/// and the odd depth index past `k` are zeros.
///
/// # Safety
/// `lhs` must address an `m x k` matrix with its strides; the CPU must have what [`supported`]
/// checks.
#[cfg(target_arch = "x86_64")]
unsafe fn pack_lhs(m: usize, k: usize, lhs: MatRef) -> Vec<u32> {
    let pairs = k.div_ceil(2);
    let blocks = m.div_ceil(MR);
    let mut out = vec![0u32; blocks * pairs * MR];
    let at = |i: usize, p: usize| -> u32 {
        let row = lhs.ptr.offset(i as isize * lhs.rs);
        let lo = to_bf16(*row.offset((2 * p) as isize * lhs.cs)) as u32;
        let hi = if 2 * p + 1 < k {
            to_bf16(*row.offset((2 * p + 1) as isize * lhs.cs)) as u32
        } else {
            0
        };
        lo | (hi << 16)
    };
    for (bi, block) in out.chunks_exact_mut(pairs * MR).enumerate() {
        let rows = MR.min(m - bi * MR);
        // Read along whichever direction is contiguous in memory.
        if lhs.cs == 1 {
            for r in 0..rows {
                let row = lhs.ptr.offset((bi * MR + r) as isize * lhs.rs);
                pack_run(row, k, block.as_mut_ptr().add(r), MR);
            }
        } else if lhs.rs == 1 && rows == MR {
            // The block's rows are side by side (Winograd's tiles): 8 at a time.
            pack_columns(lhs.ptr.add(bi * MR), k, lhs.cs, block);
        } else {
            for p in 0..pairs {
                for r in 0..rows {
                    block[p * MR + r] = at(bi * MR + r, p);
                }
            }
        }
    }
    out
}

/// Columns `c0..c0 + NR` of `rhs` (`k x n`) packed: per pair of depth indices, `NR` u32 holding
/// the two bf16 values. Columns past `n` are zeros.
///
/// # Safety
/// `rhs` must address a `k x n` matrix with its strides; the CPU must have what [`supported`]
/// checks.
#[cfg(target_arch = "x86_64")]
unsafe fn pack_rhs_panel(k: usize, n: usize, c0: usize, rhs: MatRef, out: &mut [u32]) {
    let pairs = k.div_ceil(2);
    out[..pairs * NR].fill(0);
    let at = |j: usize, p: usize| -> u32 {
        let col = rhs.ptr.offset((c0 + j) as isize * rhs.cs);
        let lo = to_bf16(*col.offset((2 * p) as isize * rhs.rs)) as u32;
        let hi = if 2 * p + 1 < k {
            to_bf16(*col.offset((2 * p + 1) as isize * rhs.rs)) as u32
        } else {
            0
        };
        lo | (hi << 16)
    };
    let cols = NR.min(n - c0);
    // Read along whichever direction is contiguous in memory.
    if rhs.rs == 1 {
        for j in 0..cols {
            let col = rhs.ptr.offset((c0 + j) as isize * rhs.cs);
            pack_run(col, k, out.as_mut_ptr().add(j), NR);
        }
    } else {
        for p in 0..pairs {
            for j in 0..cols {
                out[p * NR + j] = at(j, p);
            }
        }
    }
}

/// One `MR x NR` tile: the dot products of a packed row block and a packed column panel over
/// `pairs` depth pairs, into `tile` (row-major, `NR` wide).
///
/// # Safety
/// The CPU must have AVX-512 F and BF16; `a` holds `pairs * MR` and `b` `pairs * NR` values.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bf16")]
unsafe fn tile(pairs: usize, a: &[u32], b: &[u32], tile: &mut [f32; MR * NR]) {
    use std::arch::x86_64::*;
    debug_assert!(a.len() >= pairs * MR && b.len() >= pairs * NR);
    let mut acc = [_mm512_setzero_ps(); 2 * MR];
    let (mut ap, mut bp) = (a.as_ptr(), b.as_ptr());
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

/// `dst = (read_dst ? dst : 0) + lhs · rhs` for an `m x n` `dst` of depth `k`, on this thread,
/// with the operands rounded to bf16 (f32 accumulation).
///
/// # Safety
/// As `kernels::gemm_on_threads`; and the CPU must have AVX-512 BF16 ([`supported`]).
pub(crate) unsafe fn gemm(
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
        let pairs = k.div_ceil(2);
        let a = pack_lhs(m, k, lhs);
        let mut panel = vec![0u32; pairs * NR];
        let mut out = [0f32; MR * NR];
        for c0 in (0..n).step_by(NR) {
            pack_rhs_panel(k, n, c0, rhs, &mut panel);
            let cols = NR.min(n - c0);
            for (bi, block) in a.chunks_exact(pairs * MR).enumerate() {
                tile(pairs, block, &panel, &mut out);
                let r0 = bi * MR;
                for r in 0..MR.min(m - r0) {
                    let row = dst
                        .ptr
                        .offset((r0 + r) as isize * dst.rs + c0 as isize * dst.cs);
                    let values = &out[r * NR..r * NR + cols];
                    if dst.cs == 1 {
                        store_row(row, values, read_dst);
                        continue;
                    }
                    for (j, v) in values.iter().enumerate() {
                        let d = row.offset(j as isize * dst.cs);
                        *d = if read_dst { *d + v } else { *v };
                    }
                }
            }
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = (m, n, k, dst, read_dst, lhs, rhs);
        unreachable!("bf16 products are only taken where `supported()` is true");
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

    /// Products of every edge case (sizes not multiples of the tile, odd depth, strided and
    /// transposed operands, accumulation into the output) against f64 on the same bf16-rounded
    /// inputs: the kernel's only error is then f32 accumulation.
    #[test]
    fn products_match_f64_on_rounded_inputs() {
        if !supported() {
            eprintln!("skipped: this CPU has no AVX-512 BF16");
            return;
        }
        let round = |v: f32| f32::from_bits((to_bf16(v) as u32) << 16) as f64;
        let shapes = [
            (1, 1, 1),
            (8, 32, 2),
            (13, 45, 77),
            (64, 100, 320),
            (3, 70, 9),
            (5, 3, 0),
        ];
        let cases = [(false, false), (true, true), (true, false), (false, true)];
        for &(m, n, k) in &shapes {
            for (transposed, read_dst) in cases {
                let a = values(m * k, 1);
                let b = values(k * n, 2);
                // The output: row-major, or (transposed) column-major as Winograd's products
                // write it, inside a buffer with spare elements on each line.
                let (rs, cs, len) = if transposed {
                    (1, m + 3, (m + 3) * n)
                } else {
                    (n + 5, 1, (n + 5) * m)
                };
                let mut c = values(len, 3);
                let before = c.clone();
                // lhs row-major m x k, or stored k x m read transposed; rhs likewise.
                let lhs = if transposed {
                    MatRef::transposed(a.as_ptr(), m)
                } else {
                    MatRef::row_major(a.as_ptr(), k)
                };
                let rhs = if transposed {
                    MatRef::transposed(b.as_ptr(), k)
                } else {
                    MatRef::row_major(b.as_ptr(), n)
                };
                let dst = MatMut {
                    ptr: c.as_mut_ptr(),
                    rs: rs as isize,
                    cs: cs as isize,
                };
                unsafe { gemm(m, n, k, dst, read_dst, lhs, rhs) };
                let at = |i: usize, p: usize| {
                    round(if transposed {
                        a[p * m + i]
                    } else {
                        a[i * k + p]
                    })
                };
                let bt = |p: usize, j: usize| {
                    round(if transposed {
                        b[j * k + p]
                    } else {
                        b[p * n + j]
                    })
                };
                let mut inside = vec![false; len];
                for i in 0..m {
                    for j in 0..n {
                        let idx = i * rs + j * cs;
                        inside[idx] = true;
                        let mut want: f64 = (0..k).map(|p| at(i, p) * bt(p, j)).sum();
                        if read_dst {
                            want += before[idx] as f64;
                        }
                        let got = c[idx] as f64;
                        assert!(
                            (got - want).abs() <= 1e-5 * (k as f64).sqrt() + 1e-6,
                            "{m}x{n}x{k} transposed {transposed}: [{i},{j}] {got} vs {want}"
                        );
                    }
                }
                // Nothing outside the m x n block changed.
                for (idx, (x, y)) in c.iter().zip(&before).enumerate() {
                    assert!(
                        inside[idx] || x.to_bits() == y.to_bits(),
                        "{m}x{n}x{k}: wrote {idx}"
                    );
                }
            }
        }
    }
}
