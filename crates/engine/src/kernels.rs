//! Fused CPU kernels for the element-wise steps that cost the most after the matrix products:
//! softmax over attention scores, GEGLU, group norm (+ per-channel shift, + SiLU) and layer
//! norm; the moves candle makes on one thread (nearest upsampling, joining channels); and the
//! starting values of layer outputs (bias, plus a skip connection's residual), with the 3x3 and
//! 1x1 convolutions that write into them.
//!
//! candle 0.11 runs each of these as several full passes over memory with scalar libm
//! `exp`/`erf` calls (and the crate is built for baseline x86-64, so its own SIMD paths are off).
//! Here each is one or two passes of branch-free arithmetic that LLVM vectorises, on all cores,
//! and softmax/GEGLU write in place. Every entry point falls back to candle's ops for other
//! devices, dtypes or layouts, so callers need not care.

use std::mem::MaybeUninit;

use crate::avx512_gemm;
use candle_core::{
    CpuStorage, CustomOp1, CustomOp2, CustomOp3, DType, InplaceOp1, InplaceOp2, Layout, Result,
    Shape, Tensor,
};

/// Defines `fn $name(args)` running `$body` compiled for AVX2 and FMA (8-wide vectors, fused
/// multiply-adds) when the CPU has them, else for the baseline target the crate is built for (SSE2
/// on x86-64). The body is generic over `const FMA: bool`, which says whether [`madd`] may use
/// the hardware instruction; the helpers the bodies call are `#[inline(always)]`, so they are
/// compiled into each variant.
macro_rules! simd_dispatch {
    ($name:ident($($arg:ident: $ty:ty),*) $body:block) => {
        fn $name($($arg: $ty),*) {
            #[inline(always)]
            fn body<const FMA: bool>($($arg: $ty),*) $body
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx2,fma")]
                unsafe fn avx2($($arg: $ty),*) {
                    body::<true>($($arg),*)
                }
                if std::arch::is_x86_feature_detected!("avx2")
                    && std::arch::is_x86_feature_detected!("fma")
                {
                    // SAFETY: the CPU supports AVX2 and FMA, the features `avx2` is compiled for.
                    return unsafe { avx2($($arg),*) };
                }
            }
            // Other 64-bit targets this builds for (aarch64) always have a fused multiply-add.
            body::<{ !cfg!(target_arch = "x86_64") }>($($arg),*)
        }
    };
}
pub(crate) use simd_dispatch;

/// Implements candle's `CustomOp2` (input, weight) and `CustomOp3` (input, weight, residual of
/// the output's shape, added to the result) for a CPU layer op whose
/// `run(input, weight, residual)` does the work; `$name` names the op, `-add` appended for the
/// second.
macro_rules! layer_op {
    ($ty:ty, $name:literal) => {
        impl candle_core::CustomOp2 for $ty {
            fn name(&self) -> &'static str {
                $name
            }

            fn cpu_fwd(
                &self,
                s1: &candle_core::CpuStorage,
                l1: &candle_core::Layout,
                s2: &candle_core::CpuStorage,
                l2: &candle_core::Layout,
            ) -> candle_core::Result<(candle_core::CpuStorage, candle_core::Shape)> {
                self.run((s1, l1), (s2, l2), None)
            }
        }

        impl candle_core::CustomOp3 for $ty {
            fn name(&self) -> &'static str {
                concat!($name, "-add")
            }

            fn cpu_fwd(
                &self,
                s1: &candle_core::CpuStorage,
                l1: &candle_core::Layout,
                s2: &candle_core::CpuStorage,
                l2: &candle_core::Layout,
                s3: &candle_core::CpuStorage,
                l3: &candle_core::Layout,
            ) -> candle_core::Result<(candle_core::CpuStorage, candle_core::Shape)> {
                self.run((s1, l1), (s2, l2), Some((s3, l3)))
            }
        }
    };
}
pub(crate) use layer_op;

/// `a * b + c`: one fused multiply-add (one rounding) where the variant is compiled for it,
/// else a multiply and an add. Rust never fuses the two by itself, and in the exponential's
/// polynomial they form one long dependency chain, so fusing halves its latency and its
/// instruction count. Without the hardware instruction `mul_add` would be a slow libm call.
#[inline(always)]
fn madd<const FMA: bool>(a: f32, b: f32, c: f32) -> f32 {
    if FMA {
        a.mul_add(b, c)
    } else {
        a * b + c
    }
}

/// `exp(x)` in f32: Cephes' `expf` polynomial (about 1 ulp), written without branches so loops
/// over it vectorise. Inputs below -87.3 give 0 (the true value is below f32's normal range).
#[inline(always)]
fn exp_f32<const FMA: bool>(x: f32) -> f32 {
    // 1.5 * 2^23: adding and subtracting it rounds to the nearest integer without a libm call.
    const ROUND: f32 = 12_582_912.0;
    let xc = x.clamp(-87.33, 88.37);
    let t = madd::<FMA>(xc, std::f32::consts::LOG2_E, ROUND);
    let n = t - ROUND;
    // ln 2 split in two (Cephes C1, C2) so x - n ln2 stays exact.
    let r = madd::<FMA>(n, 2.121_944_4e-4, madd::<FMA>(n, -0.693_359_4, xc));
    // 2^n built from the bits of `t`, whose low mantissa bits hold n: integer ops only, because
    // a float-to-int `as` cast saturates, and its checks stop LLVM from vectorising the loop.
    let ni = t.to_bits().wrapping_sub(ROUND.to_bits());
    let scale = f32::from_bits(ni.wrapping_add(127) << 23);
    let mut p = 1.987_569_1e-4f32;
    p = madd::<FMA>(p, r, 1.398_199_9e-3);
    p = madd::<FMA>(p, r, 8.333_452e-3);
    p = madd::<FMA>(p, r, 4.166_579_6e-2);
    p = madd::<FMA>(p, r, 1.666_666_5e-1);
    p = madd::<FMA>(p, r, 0.5); // Cephes: 5.0000001201e-1, 0.5 in f32
    let y = madd::<FMA>(p, r * r, r + 1.0) * scale;
    // Zero below the range with a mask, not a branch (a branch would stop vectorisation);
    // NaN passes through, so a broken model still shows up as NaN downstream.
    let keep = u32::from(x < -87.33).wrapping_sub(1); // all ones unless below the range
    f32::from_bits(y.to_bits() & keep)
}

/// `erf(x)` by Abramowitz & Stegun 7.1.26 (max abs error 1.5e-7): the same formula PyTorch's
/// vectorised CPU `erf` uses, so GELU here tracks diffusers on the CPU closely.
#[inline(always)]
fn erf_f32<const FMA: bool>(x: f32) -> f32 {
    let a = x.abs();
    let t = 1.0 / madd::<FMA>(0.327_591_1, a, 1.0);
    let mut r = madd::<FMA>(1.061_405_4, t, -1.453_152_1);
    r = madd::<FMA>(r, t, 1.421_413_8);
    r = madd::<FMA>(r, t, -0.284_496_74);
    r = madd::<FMA>(r, t, 0.254_829_6);
    madd::<FMA>(-(r * t), exp_f32::<FMA>(-a * a), 1.0).copysign(x)
}

/// Exact (erf) GELU, as torch's default `F.gelu`.
#[inline(always)]
fn gelu_f32<const FMA: bool>(x: f32) -> f32 {
    0.5 * x * (1.0 + erf_f32::<FMA>(x * std::f32::consts::FRAC_1_SQRT_2))
}

#[inline(always)]
fn silu_f32<const FMA: bool>(x: f32) -> f32 {
    x / (1.0 + exp_f32::<FMA>(-x))
}

/// Splits `dst` (and `src` alongside) into one contiguous run of whole `unit`s per thread and
/// runs `f(dst_part, src_part, first_unit)` on each. Small inputs stay on this thread.
///
/// Every multi-threaded kernel here runs its parts on rayon's global pool, the threads that
/// candle and `gemm` already use, not on threads of its own. With fresh threads per call (as
/// before), a kernel's threads started while the pool's workers were still spinning after the
/// last matrix product, and on two cores they took turns: moving to the pool made a 2-thread
/// UNet step's group norms 15% and its 3x3 convolutions about 5% faster (`LD_LAYER_TIMES`,
/// three interleaved runs).
pub(crate) fn par_units<F>(dst: &mut [f32], src: Option<&[f32]>, unit: usize, f: F)
where
    F: Fn(&mut [f32], Option<&[f32]>, usize) + Sync,
{
    let units = dst.len() / unit.max(1);
    let threads = candle_core::utils::get_num_threads().clamp(1, units.max(1));
    // Below ~32k elements a thread costs more than it saves.
    if threads == 1 || dst.len() < 1 << 15 {
        f(dst, src, 0);
        return;
    }
    let per = units.div_ceil(threads);
    rayon::scope(|s| {
        for (i, part) in dst.chunks_mut(per * unit).enumerate() {
            let src_part = src.map(|s| &s[i * per * unit..i * per * unit + part.len()]);
            let f = &f;
            s.spawn(move |_| f(part, src_part, i * per));
        }
    });
}

/// A layer's output before its product is added in: `rows x width` row-major, each row
/// `residual`'s row (when given) plus `bias` (`width` values, when given), written on all
/// compute threads. A large layer's output starts as its bias this way (84 MB for SD 1.5's
/// 320 -> 2560 layer at 512x512): filled on one thread, that and its first-touch page faults
/// were a serial part of the step. With a residual, the transformer's `x + layer(..)` costs no
/// pass of its own (candle's adds took 38 ms of a two-thread UNet step, more than on one).
///
/// # Panics
/// If `bias` does not hold `width` values or `residual` `rows * width`.
pub(crate) fn rows_start(
    rows: usize,
    width: usize,
    bias: Option<&[f32]>,
    residual: Option<&[f32]>,
) -> Vec<f32> {
    let len = rows * width;
    assert!(bias.is_none_or(|b| b.len() == width) && residual.is_none_or(|r| r.len() == len));
    // SAFETY: each part is whole rows, every value of which is written.
    unsafe {
        written_on_threads(len, width, |part, first| {
            let from = residual.map(|r| &r[first * width..first * width + part.len()]);
            for (n, dst) in part.chunks_exact_mut(width.max(1)).enumerate() {
                let from = from.map(|f| &f[n * width..(n + 1) * width]);
                match (bias, from) {
                    (Some(b), Some(f)) => {
                        for ((d, &x), &v) in dst.iter_mut().zip(f).zip(b) {
                            d.write(x + v);
                        }
                    }
                    (Some(v), None) | (None, Some(v)) => {
                        for (d, &x) in dst.iter_mut().zip(v) {
                            d.write(x);
                        }
                    }
                    (None, None) => dst.fill(MaybeUninit::new(0.0)),
                }
            }
        })
    }
}

/// A convolution's (or channels-first layer's) output before its product is added in:
/// `planes` planes of `plane` values, plane `p` holding `bias[p % bias.len()]` (the channel's
/// bias, when given) plus `residual`'s plane `p` (when given), written on all compute threads.
/// With a residual, the resnet's `x + conv(..)` costs no pass of its own.
///
/// # Panics
/// If `bias` is empty or does not divide `planes` (when there are planes), or `residual` does not
/// hold every value.
pub(crate) fn planes_start(
    planes: usize,
    plane: usize,
    bias: Option<&[f32]>,
    residual: Option<&[f32]>,
) -> Vec<f32> {
    let len = planes * plane;
    assert!(
        bias.is_none_or(|b| planes == 0 || (!b.is_empty() && planes.is_multiple_of(b.len())))
            && residual.is_none_or(|r| r.len() == len)
    );
    // SAFETY: each part is whole planes, every value of which is written.
    unsafe {
        written_on_threads(len, plane, |part, first| {
            let from = residual.map(|r| &r[first * plane..first * plane + part.len()]);
            for (n, dst) in part.chunks_exact_mut(plane.max(1)).enumerate() {
                let v = bias.map_or(0.0, |b| b[(first + n) % b.len()]);
                match from {
                    Some(f) => {
                        for (d, &x) in dst.iter_mut().zip(&f[n * plane..(n + 1) * plane]) {
                            d.write(x + v);
                        }
                    }
                    None => dst.fill(MaybeUninit::new(v)),
                }
            }
        })
    }
}

/// `len` zeros, cleared by all compute threads when called from outside them. A layer's output
/// buffer reuses memory freed by an earlier one (see `memory::keep_freed_buffers`), which
/// calloc (`vec![0.0; len]`) must clear on the calling thread: a profile of a two-thread UNet
/// step had that thread busy in memset for half of its own time while the other core waited.
pub(crate) fn zeros<T: Copy + Default + Send + Sync>(len: usize) -> Vec<T> {
    if len < PAR_FILL_MIN || rayon::current_thread_index().is_some() {
        return vec![T::default(); len];
    }
    // SAFETY: each part is filled whole.
    unsafe { written_on_threads(len, 1, |part, _| part.fill(MaybeUninit::new(T::default()))) }
}

/// Below this many values a buffer is written on the calling thread: a thread costs more.
const PAR_FILL_MIN: usize = 1 << 15;

/// A new vector of `len` values (a multiple of `unit`), written straight into fresh memory by
/// `write(part, first)` on all compute threads: each part is a run of whole units, `first` the
/// index of its first unit. Small vectors, and calls from a compute thread, are written here in
/// one part. A layer's output written this way is not cleared first (a second full pass).
///
/// # Safety
/// `write` must initialize every value of each part it is given.
pub(crate) unsafe fn written_on_threads<T: Send>(
    len: usize,
    unit: usize,
    write: impl Fn(&mut [MaybeUninit<T>], usize) + Sync,
) -> Vec<T> {
    let threads = if len < PAR_FILL_MIN || rayon::current_thread_index().is_some() {
        1
    } else {
        candle_core::utils::get_num_threads()
    };
    written_in_parts(len, unit, threads, write)
}

/// [`written_on_threads`] in (at most) `threads` parts.
///
/// # Safety
/// As [`written_on_threads`].
unsafe fn written_in_parts<T: Send>(
    len: usize,
    unit: usize,
    threads: usize,
    write: impl Fn(&mut [MaybeUninit<T>], usize) + Sync,
) -> Vec<T> {
    let unit = unit.max(1);
    // Whole units only: a remainder would be given to no part and stay uninitialized.
    assert!(
        len.is_multiple_of(unit),
        "{len} values are not whole units of {unit}"
    );
    let mut out = Vec::with_capacity(len);
    if len > 0 {
        let spare = &mut out.spare_capacity_mut()[..len];
        let threads = threads.clamp(1, len / unit);
        if threads == 1 {
            write(spare, 0);
        } else {
            let per = (len / unit).div_ceil(threads);
            let write = &write;
            rayon::scope(|s| {
                for (i, part) in spare.chunks_mut(per * unit).enumerate() {
                    s.spawn(move |_| write(part, i * per));
                }
            });
        }
    }
    // SAFETY: the parts cover all `len` values, and `write` initialized each (the contract).
    unsafe { out.set_len(len) };
    out
}

pub(crate) fn contiguous_f32<'a>(s: &'a CpuStorage, l: &Layout, what: &str) -> Result<&'a [f32]> {
    match (s, l.contiguous_offsets()) {
        (CpuStorage::F32(v), Some((a, b))) => Ok(&v[a..b]),
        _ => candle_core::bail!("{what}: expects a contiguous f32 tensor"),
    }
}

fn contiguous_f32_mut<'a>(s: &'a mut CpuStorage, l: &Layout, what: &str) -> Result<&'a mut [f32]> {
    match (s, l.contiguous_offsets()) {
        (CpuStorage::F32(v), Some((a, b))) => Ok(&mut v[a..b]),
        _ => candle_core::bail!("{what}: expects a contiguous f32 tensor"),
    }
}

/// A pointer worker threads share to write one output buffer; every user writes a disjoint set of
/// elements through it (see the SAFETY notes where it is written through).
#[derive(Clone, Copy)]
pub(crate) struct SendPtr(pub(crate) *mut f32);
// SAFETY: threads never write the same element through it (each user's contract).
unsafe impl Send for SendPtr {}
unsafe impl Sync for SendPtr {}

/// A matrix operand of [`gemm_on_threads`]: its first element and its row and column strides,
/// in elements.
#[derive(Clone, Copy)]
pub(crate) struct Mat<P> {
    pub(crate) ptr: P,
    pub(crate) rs: isize,
    pub(crate) cs: isize,
}

/// An operand that is only read.
pub(crate) type MatRef = Mat<*const f32>;
/// The output, which threads write in disjoint blocks.
pub(crate) type MatMut = Mat<*mut f32>;

impl<P> Mat<P> {
    /// A row-major matrix whose rows start `row` elements apart.
    pub(crate) fn row_major(ptr: P, row: usize) -> Self {
        Self {
            ptr,
            rs: row as isize,
            cs: 1,
        }
    }

    /// The transpose of a row-major matrix whose rows start `row` elements apart (a
    /// `[out, in]` weight read as Wᵀ, or `[c, hw]` planes read as `hw x c` tokens).
    pub(crate) fn transposed(ptr: P, row: usize) -> Self {
        Self {
            ptr,
            rs: 1,
            cs: row as isize,
        }
    }
}

// SAFETY: operands are only read by the threads of one product while the caller holds them;
// the output is written in disjoint blocks (see `gemm_on_threads`).
unsafe impl Send for MatRef {}
unsafe impl Sync for MatRef {}
unsafe impl Send for MatMut {}
unsafe impl Sync for MatMut {}

/// Products below this many multiply-adds (about 15 µs on one core) run on one thread: handing
/// parts to the pool's workers and waiting for them costs about as much as splitting saves.
/// The same order as `gemm`'s own threading threshold (48 x 48 x 256).
const PAR_GEMM_MIN_MACS: usize = 1 << 20;

/// Each thread's share of a split product is kept at least this wide, so its packing and
/// set-up stay small beside its multiplications.
const PAR_GEMM_MIN_PART: usize = 64;

/// `dst = (read_dst ? dst : 0) + lhs · rhs` for an `m x n` `dst` and depth `k`, through
/// [`Products::current`]'s kernels, on this process's compute threads.
///
/// The output is cut into one block of rows or of columns per thread. Our AVX-512 kernels
/// share the packed operand between the parts (`avx512_gemm::gemm_parts`); with the `gemm`
/// crate each part is an independent single-threaded product. The crate's own rayon mode synchronises every thread
/// at each of its depth and packing steps and deals its micro-tiles out statically. Beside
/// it, on two threads with the UNet's shapes, this split ran 1.05-1.5x faster alone (e.g.
/// `[256 x 1280] x [1280 x 1280]`: 1.03x -> 1.6x over one thread; the 8x8 level's im2col
/// product `[1280 x 23040] x [23040 x 64]`: 1.1x -> 1.5x). Inside a whole UNet step the linear
/// layers gain nothing measurable and the 3x3 convolutions (whose small levels run here as
/// im2col products) about 5%. Each thread packs all of the operand its cut shares, so the cut
/// leaves the smaller operand shared.
///
/// # Safety
/// `dst`, `lhs` and `rhs` must address `m x n`, `m x k` and `k x n` matrices with the given
/// strides, valid for the call; `dst` must not overlap the others, and no two of its elements
/// may share an address.
pub(crate) unsafe fn gemm_on_threads(
    m: usize,
    n: usize,
    k: usize,
    dst: MatMut,
    read_dst: bool,
    lhs: MatRef,
    rhs: MatRef,
) {
    gemm_split(
        candle_core::utils::get_num_threads(),
        Products::current(),
        (m, n, k),
        dst,
        read_dst,
        lhs,
        rhs,
    );
}

/// How [`gemm_split`] cuts a product: into `parts` blocks of columns or of rows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Split {
    parts: usize,
    by_columns: bool,
}

/// The cut for an `m x n` output of depth `k` on `threads` threads; `None`: one product.
///
/// Each part reads all of the operand its cut does not divide (all of `rhs` when rows are
/// cut, all of `lhs` when columns are), so the longer side is cut, which leaves the smaller
/// operand shared. Where that side is too short for every thread to get
/// [`PAR_GEMM_MIN_PART`] of it, fewer parts are made rather than none.
fn split_plan(threads: usize, m: usize, n: usize, k: usize) -> Option<Split> {
    let parts = threads.min(m.max(n) / PAR_GEMM_MIN_PART);
    let macs = m.saturating_mul(n).saturating_mul(k);
    (parts > 1 && macs >= PAR_GEMM_MIN_MACS).then_some(Split {
        parts,
        by_columns: n > m,
    })
}

/// `dst = (read_dst ? dst : 0) + lhs · rhs` on this thread, through `products`' kernels.
/// Every CPU product of the linear layers and convolutions goes through here.
///
/// # Safety
/// As [`gemm_on_threads`]; and the CPU must run `products` ([`Products::current`] or one of
/// [`Products::available`]).
pub(crate) unsafe fn gemm_single(
    products: Products,
    (m, n, k): (usize, usize, usize),
    dst: MatMut,
    read_dst: bool,
    lhs: MatRef,
    rhs: MatRef,
) {
    if let Products::Avx512(fmt) = products {
        return avx512_gemm::gemm(fmt, m, n, k, dst, read_dst, lhs, rhs);
    }
    gemm::gemm(
        m,
        n,
        k,
        dst.ptr,
        dst.cs,
        dst.rs,
        read_dst,
        lhs.ptr,
        lhs.cs,
        lhs.rs,
        rhs.ptr,
        rhs.cs,
        rhs.rs,
        1.0,
        1.0,
        false,
        false,
        false,
        gemm::Parallelism::None,
    )
}

/// The kernels that run the CPU's products of f32 tensors.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Products {
    /// The `gemm` crate, in f32 (any CPU).
    Crate,
    /// Ours ([`avx512_gemm`]), with the operands in this format.
    Avx512(avx512_gemm::Format),
}

impl Products {
    /// The kernels the linear layers and convolutions take now: bf16 when that is on
    /// ([`crate::bf16_gemm::active`]), ours in f32 on CPUs with AVX-512 F (unless
    /// `LD_CPU_GEMM=crate`), else the crate.
    pub(crate) fn current() -> Self {
        if crate::bf16_gemm::active() {
            Products::Avx512(avx512_gemm::Format::Bf16)
        } else if avx512_gemm::f32_active() {
            Products::Avx512(avx512_gemm::Format::F32)
        } else {
            Products::Crate
        }
    }

    /// Every kind this CPU runs (tests compare them without turning process-wide switches).
    #[cfg(test)]
    pub(crate) fn available() -> Vec<Self> {
        use avx512_gemm::Format;
        let mut all = vec![Products::Crate];
        all.extend(
            [Format::F32, Format::Bf16]
                .into_iter()
                .filter(|f| f.supported())
                .map(Products::Avx512),
        );
        all
    }
}

/// [`gemm_on_threads`] on `threads` threads (tests reach every split with it).
///
/// # Safety
/// As [`gemm_on_threads`].
unsafe fn gemm_split(
    threads: usize,
    products: Products,
    (m, n, k): (usize, usize, usize),
    dst: MatMut,
    read_dst: bool,
    lhs: MatRef,
    rhs: MatRef,
) {
    if m == 0 || n == 0 {
        return;
    }
    // SAFETY (for every call below): each product writes only its own block of `dst` (rows
    // `r0..r1` or columns `c0..c1`), which the caller's contract makes valid and disjoint.
    let product = |r0: usize, r1: usize, c0: usize, c1: usize| unsafe {
        // Whole-struct copies, so the closure holds the `Sync` wrappers, not their raw fields.
        let (dst, lhs, rhs) = (dst, lhs, rhs);
        gemm_single(
            products,
            (r1 - r0, c1 - c0, k),
            Mat {
                ptr: dst.ptr.offset(r0 as isize * dst.rs + c0 as isize * dst.cs),
                ..dst
            },
            read_dst,
            Mat {
                ptr: lhs.ptr.offset(r0 as isize * lhs.rs),
                ..lhs
            },
            Mat {
                ptr: rhs.ptr.offset(c0 as isize * rhs.cs),
                ..rhs
            },
        )
    };
    let Some(split) = split_plan(threads, m, n, k) else {
        product(0, m, 0, n);
        return;
    };
    if let Products::Avx512(fmt) = products {
        // The AVX-512 kernels split the product themselves and share its packed operand.
        let (parts, by_columns) = (split.parts, split.by_columns);
        return avx512_gemm::gemm_parts(fmt, parts, by_columns, (m, n, k), dst, read_dst, lhs, rhs);
    }
    // Part boundaries on multiples of 16 (a cache line of f32), spread evenly.
    let (threads, by_columns) = (split.parts, split.by_columns);
    let len = if by_columns { n } else { m };
    let bound = |t: usize| {
        if t == threads {
            len
        } else {
            (len * t / threads).next_multiple_of(16).min(len)
        }
    };
    let part = |t: usize| {
        let (a, b) = (bound(t), bound(t + 1));
        if a < b {
            if by_columns {
                product(0, m, a, b)
            } else {
                product(a, b, 0, n)
            }
        }
    };
    // On rayon's pool (see `par_units`), whose workers also keep `gemm`'s thread-local
    // packing slab between calls.
    rayon::scope(|s| {
        for t in 1..threads {
            let part = &part;
            s.spawn(move |_| part(t));
        }
        part(0);
    });
}

/// Whether a tensor can take the fused CPU path.
fn fast_path(t: &Tensor) -> bool {
    t.device().is_cpu() && t.dtype() == DType::F32 && t.is_contiguous()
}

#[inline(always)]
fn softmax_row<const FMA: bool>(row: &mut [f32]) {
    let max = lane_max(row);
    let inv = (1.0 / exp_sum::<FMA>(row, max)) as f32;
    // Plain element loops: LLVM's loop vectoriser handles these; the reductions use lanes.
    for v in row.iter_mut() {
        *v *= inv;
    }
}

/// Replaces each `v` of `row` by `exp(v - max)` and returns their sum, in one pass: the sum is
/// taken in the order [`lane_sum`] takes it (eight f32 lanes per block of 4096, blocks in f64),
/// so fusing the two passes changes no result.
#[inline(always)]
fn exp_sum<const FMA: bool>(row: &mut [f32], max: f32) -> f64 {
    let mut total = 0f64;
    for block in row.chunks_mut(4096) {
        let mut lanes = [0f32; 8];
        let mut chunks = block.chunks_exact_mut(8);
        for c in &mut chunks {
            for i in 0..8 {
                let e = exp_f32::<FMA>(c[i] - max);
                c[i] = e;
                lanes[i] += e;
            }
        }
        let mut tail = 0f32;
        for v in chunks.into_remainder() {
            *v = exp_f32::<FMA>(*v - max);
            tail += *v;
        }
        total += f64::from(tail + lanes.iter().sum::<f32>());
    }
    total
}

/// Maximum of `xs` in eight lanes (vectorisable; -inf for an empty slice).
#[inline(always)]
fn lane_max(xs: &[f32]) -> f32 {
    let mut lanes = [f32::NEG_INFINITY; 8];
    let mut chunks = xs.chunks_exact(8);
    for c in &mut chunks {
        for i in 0..8 {
            lanes[i] = if c[i] > lanes[i] { c[i] } else { lanes[i] };
        }
    }
    let tail = chunks.remainder().iter();
    tail.chain(lanes.iter())
        .fold(f32::NEG_INFINITY, |m, &v| if v > m { v } else { m })
}

simd_dispatch!(softmax_rows(part: &mut [f32], n: usize) {
    for row in part.chunks_exact_mut(n) {
        softmax_row::<FMA>(row)
    }
});

simd_dispatch!(online_softmax_rows(
    s: &mut [f32],
    keys: usize,
    max: &mut [f32],
    sum: &mut [f32],
    alpha: &mut [f32],
    changed: &mut bool
) {
    for (((row, m), l), a) in s.chunks_exact_mut(keys).zip(max).zip(sum).zip(alpha) {
        let m_new = lane_max(row).max(*m);
        let total = exp_sum::<FMA>(row, m_new);
        // exp(-inf) = 0 for the first tile: the empty accumulator needs no weight.
        *a = exp_f32::<FMA>(*m - m_new);
        *changed |= *a != 1.0;
        *l = madd::<FMA>(*l, *a, total as f32);
        *m = m_new;
    }
});

/// One key tile of an online softmax (see `fused_attention`): turns the scores `s`
/// (`[rows, keys]`) into `exp(score - running max)` in place, updates each row's running
/// maximum and sum, and stores in `alpha` the factor each row's accumulated output must be
/// multiplied by. Returns whether any such factor differs from 1.
pub(crate) fn online_softmax_tile(
    s: &mut [f32],
    keys: usize,
    max: &mut [f32],
    sum: &mut [f32],
    alpha: &mut [f32],
) -> bool {
    let mut changed = false;
    online_softmax_rows(s, keys, max, sum, alpha, &mut changed);
    changed
}

struct SoftmaxLastDim;

impl InplaceOp1 for SoftmaxLastDim {
    fn name(&self) -> &'static str {
        "ld-softmax-last-dim"
    }

    fn cpu_fwd(&self, s: &mut CpuStorage, l: &Layout) -> Result<()> {
        let n = l.dims().last().copied().unwrap_or(1).max(1);
        let data = contiguous_f32_mut(s, l, self.name())?;
        par_units(data, None, n, |part, _, _| softmax_rows(part, n));
        Ok(())
    }
}

/// Softmax over the last dimension, in place when `t` is a CPU f32 contiguous tensor that this
/// call owns (the attention scores it is used on are always fresh).
pub(crate) fn softmax_last_dim(t: Tensor) -> Result<Tensor> {
    if fast_path(&t) {
        t.inplace_op1(&SoftmaxLastDim)?;
        Ok(t)
    } else {
        candle_nn::ops::softmax_last_dim(&t)
    }
}

simd_dispatch!(mul_gelu_slice(d: &mut [f32], g: &[f32]) {
    for (d, &g) in d.iter_mut().zip(g) {
        *d *= gelu_f32::<FMA>(g);
    }
});

struct MulGelu;

impl InplaceOp2 for MulGelu {
    fn name(&self) -> &'static str {
        "ld-mul-gelu"
    }

    fn cpu_fwd(
        &self,
        s1: &mut CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<()> {
        let gate = contiguous_f32(s2, l2, self.name())?;
        let dst = contiguous_f32_mut(s1, l1, self.name())?;
        if gate.len() != dst.len() {
            candle_core::bail!("{}: operands differ in size", self.name());
        }
        par_units(dst, Some(gate), 1, |d, g, _| {
            mul_gelu_slice(d, g.unwrap_or_default())
        });
        Ok(())
    }
}

/// GEGLU's `hidden * gelu(gate)` with the exact GELU, in place in `hidden` on the CPU fast path
/// and on NVIDIA GPUs (`gpu_norm`).
pub(crate) fn mul_gelu(hidden: Tensor, gate: &Tensor) -> Result<Tensor> {
    if fast_path(&hidden) && fast_path(gate) && hidden.shape() == gate.shape() {
        hidden.inplace_op2(gate, &MulGelu)?;
        Ok(hidden)
    } else {
        #[cfg(feature = "cuda")]
        if hidden.device().is_cuda()
            && crate::gpu_norm::enabled()
            && hidden.shape() == gate.shape()
            && hidden.dtype() == gate.dtype()
            && hidden.is_contiguous()
            && gate.is_contiguous()
        {
            crate::gpu_norm::mul_gelu(&hidden, gate)?;
            return Ok(hidden);
        }
        hidden * gate.gelu_erf()?
    }
}

/// Group norm over `[batch, channels, ...]` with affine weight/bias, optionally after adding a
/// per-(batch, channel) shift and before a SiLU: the resnet's `norm2(h + temb)` then SiLU in one
/// pass over memory instead of candle's ten.
struct GroupNormOp {
    groups: usize,
    eps: f64,
    silu: bool,
    /// `[batch * channels]` values added to every element of that channel first.
    shift: Option<Vec<f32>>,
}

impl CustomOp3 for GroupNormOp {
    fn name(&self) -> &'static str {
        "ld-group-norm"
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
        let x = contiguous_f32(s1, l1, self.name())?;
        let w = contiguous_f32(s2, l2, self.name())?;
        let b = contiguous_f32(s3, l3, self.name())?;
        let dims = l1.dims();
        let (batch, c) = (dims[0], dims[1]);
        let hw: usize = dims[2..].iter().product();
        let cpg = c / self.groups;
        if w.len() != c || b.len() != c || cpg * self.groups != c {
            candle_core::bail!("{}: weight/bias do not match {c} channels", self.name());
        }
        if let Some(s) = &self.shift {
            if s.len() != batch * c {
                candle_core::bail!(
                    "{}: shift has {} values for {batch}x{c}",
                    self.name(),
                    s.len()
                );
            }
        }
        let group_len = cpg * hw;
        let p = NormParams {
            op: self,
            c,
            hw,
            cpg,
            w,
            b,
        };
        // Written straight into fresh memory, one run of whole groups per thread (clearing it
        // first was a second pass over the output).
        // SAFETY: `norm_groups` writes every value of each group it is given.
        let dst = unsafe {
            written_on_threads(x.len(), group_len, |part, first| {
                let from = &x[first * group_len..first * group_len + part.len()];
                norm_groups(&p, part, from, first)
            })
        };
        Ok((CpuStorage::F32(dst), l1.shape().clone()))
    }
}

/// Values per block of a group norm's statistics: 16 KB, well inside L1.
const NORM_BLOCK: usize = 4096;

/// What every group of one group-norm call shares.
struct NormParams<'a> {
    op: &'a GroupNormOp,
    c: usize,
    hw: usize,
    /// Channels per group.
    cpg: usize,
    w: &'a [f32],
    b: &'a [f32],
}

simd_dispatch!(norm_groups(p: &NormParams, d: &mut [MaybeUninit<f32>], xs: &[f32], first: usize) {
    let (c, hw, cpg, w, b) = (p.c, p.hw, p.cpg, p.w, p.b);
    let group_len = cpg * hw;
    for (k, (dg, xg)) in d
        .chunks_exact_mut(group_len)
        .zip(xs.chunks_exact(group_len))
        .enumerate()
    {
        let gi = first + k; // batch * groups + group
        let c0 = (gi % p.op.groups) * cpg;
        let bi = gi / p.op.groups;
        let shift = |ci: usize| p.op.shift.as_ref().map_or(0.0, |s| s[bi * c + c0 + ci]);
        // Mean and squared deviations of blocks small enough to stay in L1 (two passes over
        // each block, as stable as torch's two passes), merged in f64 (Chan et al.'s pairwise
        // update): the group is read from memory once for its statistics, not twice. A VAE
        // group at 512x512 is 4 MB, more than a core's L2.
        let (mut n, mut mean, mut m2) = (0f64, 0f64, 0f64);
        for ci in 0..cpg {
            let sh = shift(ci);
            for block in xg[ci * hw..(ci + 1) * hw].chunks(NORM_BLOCK) {
                let nb = block.len() as f64;
                let mb = lane_sum(block, |v| v + sh) / nb;
                let off = sh - mb as f32;
                // Deviations from the f32-rounded mean, corrected to the exact one.
                let d = f64::from(sh) - mb - f64::from(off);
                let m2b = lane_sum(block, |v| (v + off) * (v + off)) - nb * d * d;
                let total = n + nb;
                let delta = mb - mean;
                mean += delta * nb / total;
                m2 += m2b + delta * delta * n * nb / total;
                n = total;
            }
        }
        let rstd = 1.0 / (m2.max(0.0) / group_len as f64 + p.op.eps).sqrt();
        for ci in 0..cpg {
            let ch = c0 + ci;
            // y = (x + shift - mean) * rstd * w + b = x * a + k
            let a = (w[ch] as f64 * rstd) as f32;
            let k = (b[ch] as f64 + (shift(ci) as f64 - mean) * rstd * w[ch] as f64) as f32;
            let xc = &xg[ci * hw..(ci + 1) * hw];
            let dc = &mut dg[ci * hw..(ci + 1) * hw];
            if p.op.silu {
                for (o, &v) in dc.iter_mut().zip(xc) {
                    o.write(silu_f32::<FMA>(madd::<FMA>(v, a, k)));
                }
            } else {
                for (o, &v) in dc.iter_mut().zip(xc) {
                    o.write(madd::<FMA>(v, a, k));
                }
            }
        }
    }
});

/// Builds the im2col matrix of a 3x3, stride 1, padding 1 convolution for image `b` of
/// `x` (`[batch, c, h, w]`), output rows `y0..y1`: `[9 * c + 1, (y1 - y0) * w]`, row
/// `ci * 9 + kh * 3 + kw` holding the input pixel each output pixel sees through tap (kh, kw),
/// and a final row of ones that multiplies the bias column of the packed weights.
///
/// Channel-major like this, `weights [c_out, 9c+1] @ im2col` lands directly in NCHW order, and
/// every row is built from whole-row copies of the input.
struct Im2Col3x3 {
    b: usize,
    y0: usize,
    y1: usize,
}

impl CustomOp1 for Im2Col3x3 {
    fn name(&self) -> &'static str {
        "ld-im2col-3x3"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = contiguous_f32(s, l, self.name())?;
        let (_, c, h, w) = l.shape().dims4()?;
        let (y0, y1) = (self.y0, self.y1.min(h));
        let n = y1.saturating_sub(y0) * w;
        if n == 0 || self.b >= l.dims()[0] {
            candle_core::bail!(
                "{}: empty block or image {} out of range",
                self.name(),
                self.b
            );
        }
        let image = &x[self.b * c * h * w..(self.b + 1) * c * h * w];
        let mut dst = zeros::<f32>((9 * c + 1) * n);
        par_units(&mut dst, None, n, |part, _, first| {
            for (i, row) in part.chunks_exact_mut(n).enumerate() {
                let r = first + i;
                if r == 9 * c {
                    row.fill(1.0);
                    continue;
                }
                let (ci, tap) = (r / 9, r % 9);
                let (kh, kw) = (tap / 3, tap % 3);
                let plane = &image[ci * h * w..(ci + 1) * h * w];
                for (y, out) in (y0..y1).zip(row.chunks_exact_mut(w)) {
                    // Input row y + kh - 1; outside the image it is the zero padding.
                    let Some(sy) = (y + kh).checked_sub(1).filter(|&sy| sy < h) else {
                        continue; // `dst` starts zeroed
                    };
                    let src = &plane[sy * w..(sy + 1) * w];
                    match kw {
                        0 => out[1..].copy_from_slice(&src[..w - 1]),
                        1 => out.copy_from_slice(src),
                        _ => out[..w - 1].copy_from_slice(&src[1..]),
                    }
                }
            }
        });
        Ok((CpuStorage::F32(dst), Shape::from((9 * c + 1, n))))
    }
}

/// See [`Im2Col3x3`]; `x` must be a contiguous f32 CPU tensor.
pub(crate) fn im2col_3x3(x: &Tensor, b: usize, y0: usize, y1: usize) -> Result<Tensor> {
    x.apply_op1_no_bwd(&Im2Col3x3 { b, y0, y1 })
}

/// Fills output rows `y0..y1` of a 3x3 convolution with padding 1 and `stride` (1 or 2) over
/// image plane set `image` (`[c, h, w]`, c = `dst` rows / 9) into `dst` as the im2col block
/// `[9 * c, (y1 - y0) * ow]` (row `ci * 9 + kh * 3 + kw`; `ow` output columns), in parallel
/// over rows. Stride 1 copies shifted input rows; a larger stride gathers every `stride`-th value.
fn im2col_block(
    image: &[f32],
    (h, w): (usize, usize),
    (stride, ow): (usize, usize),
    y0: usize,
    y1: usize,
    dst: &mut [f32],
) {
    let n = (y1 - y0) * ow;
    par_units(dst, None, n, |part, _, first| {
        for (i, row) in part.chunks_exact_mut(n).enumerate() {
            let r = first + i;
            let (ci, tap) = (r / 9, r % 9);
            let (kh, kw) = (tap / 3, tap % 3);
            let plane = &image[ci * h * w..(ci + 1) * h * w];
            for (y, out) in (y0..y1).zip(row.chunks_exact_mut(ow)) {
                // Input row y * stride + kh - 1; outside the image it is the zero padding.
                let Some(sy) = (y * stride + kh).checked_sub(1).filter(|&sy| sy < h) else {
                    out.fill(0.0);
                    continue;
                };
                let src = &plane[sy * w..(sy + 1) * w];
                match (stride, kw) {
                    (1, 0) => {
                        out[0] = 0.0;
                        out[1..].copy_from_slice(&src[..w - 1]);
                    }
                    (1, 1) => out.copy_from_slice(src),
                    (1, _) => {
                        out[..w - 1].copy_from_slice(&src[1..]);
                        out[w - 1] = 0.0;
                    }
                    _ => {
                        for (x, o) in out.iter_mut().enumerate() {
                            *o = (x * stride + kw)
                                .checked_sub(1)
                                .and_then(|sx| src.get(sx))
                                .copied()
                                .unwrap_or(0.0);
                        }
                    }
                }
            }
        }
    });
}

/// A 3x3, stride 1 or 2, padding 1 convolution with bias, as blocks of im2col rows times the packed
/// weights `[c_out, 9 * c_in]` (torch's `[c_out, c_in, 3, 3]` as it is stored). Each block's product is written
/// by the matrix kernel straight into its place in the NCHW output, which starts as the bias:
/// no per-block result tensors, no concatenation copies, and one im2col buffer reused for every
/// block instead of a fresh allocation each.
struct Conv3x3 {
    bias: Vec<f32>,
    /// Most elements of the im2col buffer.
    block: usize,
    /// A 1x1 convolution instead: weights `[c_out, c_in]`, the image is the right-hand matrix.
    pointwise: bool,
    /// 1, or 2 for the UNet's downsampling convolutions (3x3 only).
    stride: usize,
}

layer_op!(Conv3x3, "ld-conv3x3");

/// Checks that `residual` (when given) is a contiguous f32 tensor of `shape`, the output's.
pub(crate) fn residual_of<'a>(
    residual: Option<(&'a CpuStorage, &Layout)>,
    shape: &[usize],
    what: &str,
) -> Result<Option<&'a [f32]>> {
    residual
        .map(|(s, l)| {
            if l.dims() != shape {
                candle_core::bail!(
                    "{what}: residual {:?} does not match the output {shape:?}",
                    l.dims()
                );
            }
            contiguous_f32(s, l, what)
        })
        .transpose()
}

impl Conv3x3 {
    fn run(
        &self,
        (s1, l1): (&CpuStorage, &Layout),
        (s2, l2): (&CpuStorage, &Layout),
        residual: Option<(&CpuStorage, &Layout)>,
    ) -> Result<(CpuStorage, Shape)> {
        let name = "ld-conv3x3";
        let x = contiguous_f32(s1, l1, name)?;
        let wt = contiguous_f32(s2, l2, name)?;
        let (batch, c, h, w) = l1.shape().dims4()?;
        let (cout, kdim) = l2.shape().dims2()?;
        let pointwise = self.pointwise;
        let taps = if pointwise { 1 } else { 9 };
        let stride = self.stride;
        if kdim != taps * c
            || self.bias.len() != cout
            || h == 0
            || w == 0
            || stride == 0
            || (pointwise && stride != 1)
        {
            candle_core::bail!(
                "{name}: weights {:?} and bias {} do not fit input {:?}",
                l2.dims(),
                self.bias.len(),
                l1.dims()
            );
        }
        let hw = h * w;
        // Output size with padding 1: (h + 2 - 3) / stride + 1.
        let (oh, ow) = ((h - 1) / stride + 1, (w - 1) / stride + 1);
        let ohw = oh * ow;
        let residual = residual_of(residual, &[batch, cout, oh, ow], name)?;
        // Each output plane starts as its channel's bias (plus the residual's plane).
        let mut out = planes_start(batch * cout, ohw, Some(&self.bias), residual);
        let rows = (self.block / (kdim * ow).max(1)).clamp(1, oh);
        let mut col = if pointwise {
            Vec::new()
        } else {
            zeros::<f32>(kdim * rows * ow)
        };
        for b in 0..batch {
            let image = &x[b * c * hw..(b + 1) * c * hw];
            if pointwise {
                // A 1x1 convolution: the image itself is the `[c, hw]` right-hand matrix.
                // SAFETY: dst is image b's `cout x hw` block of `out`; lhs is `cout x c`
                // packed, rhs `c x hw` packed.
                unsafe {
                    gemm_on_threads(
                        cout,
                        hw,
                        kdim,
                        MatMut::row_major(out[b * cout * hw..].as_mut_ptr(), hw),
                        true,
                        MatRef::row_major(wt.as_ptr(), kdim),
                        MatRef::row_major(image.as_ptr(), hw),
                    );
                }
                continue;
            }
            for y0 in (0..oh).step_by(rows) {
                let y1 = (y0 + rows).min(oh);
                let n = (y1 - y0) * ow;
                let col = &mut col[..kdim * n];
                im2col_block(image, (h, w), (stride, ow), y0, y1, col);
                let dst = &mut out[b * cout * ohw + y0 * ow..];
                // SAFETY: dst rows are `ohw` apart and each holds `n` columns inside `out`
                // (`y0 * ow + n <= ohw`); lhs is `cout x kdim` packed, rhs `kdim x n` packed.
                unsafe {
                    gemm_on_threads(
                        cout,
                        n,
                        kdim,
                        MatMut::row_major(dst.as_mut_ptr(), ohw),
                        true,
                        MatRef::row_major(wt.as_ptr(), kdim),
                        MatRef::row_major(col.as_ptr(), n),
                    );
                }
            }
        }
        Ok((CpuStorage::F32(out), Shape::from((batch, cout, oh, ow))))
    }
}

/// 3x3/stride 1/padding 1 convolution of `x` (`[batch, c, h, w]`, contiguous f32 CPU) with
/// `weight` `[c_out, 9 * c]` (torch's `[c_out, c, 3, 3]` flattened) and `bias`, plus `residual`
/// (of the output's shape) when given; im2col blocks of at most `block` elements.
pub(crate) fn conv3x3(
    x: &Tensor,
    weight: &Tensor,
    bias: &[f32],
    block: usize,
    residual: Option<&Tensor>,
) -> Result<Tensor> {
    conv3x3_strided(x, weight, bias, block, 1, residual)
}

/// [`conv3x3`] with `stride` (1 or 2; padding stays 1): the output is `(h - 1) / stride + 1`
/// by `(w - 1) / stride + 1`, as torch's.
pub(crate) fn conv3x3_strided(
    x: &Tensor,
    weight: &Tensor,
    bias: &[f32],
    block: usize,
    stride: usize,
    residual: Option<&Tensor>,
) -> Result<Tensor> {
    let op = Conv3x3 {
        bias: bias.to_vec(),
        block,
        pointwise: false,
        stride,
    };
    with_residual(x, weight, residual, &op)
}

/// 1x1 convolution of `x` (`[batch, c, h, w]`, contiguous f32 CPU) with `weight` `[c_out, c]`
/// and `bias`, plus `residual` when given: one product per image, written into an output that
/// starts as the bias (and the residual).
pub(crate) fn conv1x1(
    x: &Tensor,
    weight: &Tensor,
    bias: &[f32],
    residual: Option<&Tensor>,
) -> Result<Tensor> {
    let op = Conv3x3 {
        bias: bias.to_vec(),
        block: 0,
        pointwise: true,
        stride: 1,
    };
    with_residual(x, weight, residual, &op)
}

/// Runs a layer's op on `x` and `weight`, with `residual` as the third operand when given (the
/// op adds it to its result).
pub(crate) fn with_residual<Op: CustomOp2 + CustomOp3>(
    x: &Tensor,
    weight: &Tensor,
    residual: Option<&Tensor>,
    op: &Op,
) -> Result<Tensor> {
    match residual {
        Some(r) => x.apply_op3_no_bwd(weight, r, op),
        None => x.apply_op2_no_bwd(weight, op),
    }
}

/// Whether `x` can use [`im2col_3x3`] (and the other fused CPU kernels).
/// A CPU f32 layer weight as the layer keeps it: in f16 while half-precision storage is on
/// (`crate::weights::with_half_storage`, `LoadOptions::half_weights`), else as given.
pub(crate) fn stored_weight(w: Tensor) -> Result<Tensor> {
    if crate::weights::half_storage() && cpu_f32(&w) {
        narrow_f16(&w)
    } else {
        Ok(w)
    }
}

/// The weight a layer computes `x` with: a [`stored_weight`] kept in f16 widened for f32 input
/// on the CPU, else the weight as held (an f16 pipeline's weights stay f16).
pub(crate) fn weight_for<'a>(w: &'a Tensor, x: &Tensor) -> Result<std::borrow::Cow<'a, Tensor>> {
    Ok(
        if w.dtype() == DType::F16 && x.dtype() == DType::F32 && w.device().is_cpu() {
            std::borrow::Cow::Owned(widen_f16(w)?)
        } else {
            std::borrow::Cow::Borrowed(w)
        },
    )
}

/// A CPU f32 tensor stored as f16, converted on all compute threads.
pub(crate) fn narrow_f16(t: &Tensor) -> Result<Tensor> {
    t.contiguous()?.apply_op1_no_bwd(&Convert(DType::F16))
}

/// The f32 tensor a [`narrow_f16`] one stands for, for the layer about to use it: one pass on all
/// compute threads (`half` converts with the CPU's F16C instructions where present), where
/// candle's `to_dtype` converts element by element on one thread.
pub(crate) fn widen_f16(t: &Tensor) -> Result<Tensor> {
    t.contiguous()?.apply_op1_no_bwd(&Convert(DType::F32))
}

/// f32 <-> f16 conversion of a contiguous CPU tensor, to the dtype held.
struct Convert(DType);

impl CustomOp1 for Convert {
    fn name(&self) -> &'static str {
        "ld-convert-f16"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        use half::f16;
        use half::slice::HalfFloatSliceExt;
        let Some((a, b)) = l.contiguous_offsets() else {
            candle_core::bail!("{}: expects a contiguous tensor", self.name());
        };
        let threads = candle_core::utils::get_num_threads().max(1);
        let per = (b - a).div_ceil(threads).max(1 << 16);
        let out = match (s, self.0) {
            (CpuStorage::F16(v), DType::F32) => {
                let src = &v[a..b];
                let mut dst = zeros::<f32>(src.len());
                rayon::scope(|sc| {
                    for (d, s) in dst.chunks_mut(per).zip(src.chunks(per)) {
                        sc.spawn(move |_| s.convert_to_f32_slice(d));
                    }
                });
                CpuStorage::F32(dst)
            }
            (CpuStorage::F32(v), DType::F16) => {
                let src = &v[a..b];
                let mut dst = zeros::<f16>(src.len());
                rayon::scope(|sc| {
                    for (d, s) in dst.chunks_mut(per).zip(src.chunks(per)) {
                        sc.spawn(move |_| d.convert_from_f32_slice(s));
                    }
                });
                CpuStorage::F16(dst)
            }
            _ => candle_core::bail!("{}: converts f16 <-> f32 only", self.name()),
        };
        Ok((out, l.shape().clone()))
    }
}

pub(crate) fn cpu_f32(x: &Tensor) -> bool {
    fast_path(x)
}

/// `a` and `b` (`[batch, c, ...]` each, the same batch and sizes) joined along the channels. On
/// the CPU in f32 the planes are copied on all compute threads (candle's concatenation copies on
/// one): the UNet joins each up block's input with its skip connection this way.
pub(crate) fn cat_channels(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    let (da, db) = (a.dims(), b.dims());
    if !(fast_path(a) && fast_path(b))
        || da.len() < 2
        || da.len() != db.len()
        || da[0] != db[0]
        || da[2..] != db[2..]
    {
        return Tensor::cat(&[a, b], 1);
    }
    a.apply_op2_no_bwd(b, &CatChannels)
}

/// See [`cat_channels`].
struct CatChannels;

impl CustomOp2 for CatChannels {
    fn name(&self) -> &'static str {
        "ld-cat-channels"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let a = contiguous_f32(s1, l1, self.name())?;
        let b = contiguous_f32(s2, l2, self.name())?;
        let (da, db) = (l1.dims(), l2.dims());
        let (batch, ca, cb) = (da[0], da[1], db[1]);
        let plane: usize = da[2..].iter().product();
        let c = ca + cb;
        // SAFETY: each part is whole planes, each copied from its source plane.
        let out = unsafe {
            written_on_threads(batch * c * plane, plane.max(1), |part, first| {
                for (n, dst) in part.chunks_exact_mut(plane.max(1)).enumerate() {
                    let (img, ch) = ((first + n) / c, (first + n) % c);
                    let from = if ch < ca {
                        &a[(img * ca + ch) * plane..][..plane]
                    } else {
                        &b[(img * cb + ch - ca) * plane..][..plane]
                    };
                    for (d, &v) in dst.iter_mut().zip(from) {
                        d.write(v);
                    }
                }
            })
        };
        let mut dims = da.to_vec();
        dims[1] = c;
        Ok((CpuStorage::F32(out), Shape::from(dims)))
    }
}

/// Nearest-neighbour upsampling of `x` `[batch, c, h, w]` to `oh x ow`, picking source pixels as
/// torch does for an output size (`floor(dst * in / out)`). On the CPU in f32 the planes are
/// split between the compute threads and each output row is built once from its source row
/// (the rows that repeat it are copies); candle's kernel ran on one thread with an index
/// computation per value, 2.4% of a two-thread VAE decode.
pub(crate) fn upsample_nearest(x: &Tensor, oh: usize, ow: usize) -> Result<Tensor> {
    if !fast_path(x) || x.rank() != 4 || oh == 0 || ow == 0 {
        return x.upsample_nearest2d(oh, ow);
    }
    x.apply_op1_no_bwd(&UpsampleNearest { oh, ow })
}

/// See [`upsample_nearest`].
struct UpsampleNearest {
    oh: usize,
    ow: usize,
}

impl CustomOp1 for UpsampleNearest {
    fn name(&self) -> &'static str {
        "ld-upsample-nearest"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = contiguous_f32(s, l, self.name())?;
        let (b, c, h, w) = l.shape().dims4()?;
        let (oh, ow) = (self.oh, self.ow);
        if h == 0 || w == 0 {
            candle_core::bail!("{}: empty input {:?}", self.name(), l.dims());
        }
        // The same source index as candle's and torch's: computed in f64, clamped.
        let src = |dst: usize, n: usize, out: usize| {
            ((dst as f64 * (n as f64 / out as f64)) as usize).min(n - 1)
        };
        let rows: Vec<usize> = (0..oh).map(|y| src(y, h, oh)).collect();
        let cols: Vec<usize> = (0..ow).map(|x| src(x, w, ow)).collect();
        let plane = oh * ow;
        // SAFETY: each part is whole planes; every row of each is written, the first from its
        // source row and each later one either so or as a copy of the row above.
        let out = unsafe {
            written_on_threads(b * c * plane, plane, |part, first| {
                for (n, dst) in part.chunks_exact_mut(plane).enumerate() {
                    let from = &x[(first + n) * h * w..(first + n + 1) * h * w];
                    for (y, &sy) in rows.iter().enumerate() {
                        let (above, row) = dst.split_at_mut(y * ow);
                        let row = &mut row[..ow];
                        if y > 0 && rows[y - 1] == sy {
                            row.copy_from_slice(&above[(y - 1) * ow..]);
                            continue;
                        }
                        let line = &from[sy * w..(sy + 1) * w];
                        for (d, &sx) in row.iter_mut().zip(&cols) {
                            d.write(line[sx]);
                        }
                    }
                }
            })
        };
        Ok((CpuStorage::F32(out), Shape::from((b, c, oh, ow))))
    }
}

/// torch's `nn.LayerNorm` over the last dimension, as `norm` holds it: on the CPU in f32 each row
/// is normalised in cache (mean, then squared deviations, then the output: one read of the row
/// from memory and one write), rows split between the compute threads and written straight into
/// fresh memory. candle's kernel cleared its output on the calling thread first and split the
/// rows into tasks of one row each; inside a two-thread UNet step it scaled 1.4x over one
/// thread, where this one scales with the memory.
pub(crate) fn layer_norm(x: &Tensor, norm: &candle_nn::LayerNorm) -> Result<Tensor> {
    let w = norm.weight();
    match norm.bias() {
        // The op checks the sizes (a mismatch is an error naming the shapes).
        Some(b) if norm.remove_mean() && fast_path(x) && fast_path(w) && fast_path(b) => {
            x.apply_op3_no_bwd(w, b, &LayerNormOp { eps: norm.eps() })
        }
        _ => candle_core::Module::forward(norm, x),
    }
}

/// See [`layer_norm`].
struct LayerNormOp {
    eps: f64,
}

impl CustomOp3 for LayerNormOp {
    fn name(&self) -> &'static str {
        "ld-layer-norm"
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
        let x = contiguous_f32(s1, l1, self.name())?;
        let w = contiguous_f32(s2, l2, self.name())?;
        let b = contiguous_f32(s3, l3, self.name())?;
        let dim = w.len();
        if dim == 0 || b.len() != dim || l1.dims().last() != Some(&dim) {
            candle_core::bail!(
                "{}: weight {:?} and bias {:?} do not fit input {:?}",
                self.name(),
                l2.dims(),
                l3.dims(),
                l1.dims()
            );
        }
        // SAFETY: `norm_rows` writes every value of each row it is given.
        let dst = unsafe {
            written_on_threads(x.len(), dim, |part, first| {
                let from = &x[first * dim..first * dim + part.len()];
                norm_rows(part, from, w, b, self.eps)
            })
        };
        Ok((CpuStorage::F32(dst), l1.shape().clone()))
    }
}

simd_dispatch!(norm_rows(d: &mut [MaybeUninit<f32>], xs: &[f32], w: &[f32], b: &[f32], eps: f64) {
    let dim = w.len();
    for (dr, xr) in d.chunks_exact_mut(dim).zip(xs.chunks_exact(dim)) {
        // Two passes over the row (in L1), as torch: the mean, then the squared deviations.
        let mean = lane_sum(xr, |v| v) / dim as f64;
        let m = mean as f32;
        let var = lane_sum(xr, |v| (v - m) * (v - m)) / dim as f64;
        let rstd = (1.0 / (var + eps).sqrt()) as f32;
        for (((o, &v), &wj), &bj) in dr.iter_mut().zip(xr).zip(w).zip(b) {
            o.write(madd::<FMA>((v - m) * rstd, wj, bj));
        }
    }
});

/// Sum of `f(v)` over `xs`: eight f32 lanes (vectorisable) over blocks of 4096 elements, the
/// block sums added in f64, so a VAE channel of 262144 values loses no precision that matters.
#[inline(always)]
fn lane_sum(xs: &[f32], f: impl Fn(f32) -> f32) -> f64 {
    let mut total = 0f64;
    for block in xs.chunks(4096) {
        let mut lanes = [0f32; 8];
        let mut chunks = block.chunks_exact(8);
        for c in &mut chunks {
            for i in 0..8 {
                lanes[i] += f(c[i]);
            }
        }
        let tail: f32 = chunks.remainder().iter().map(|&v| f(v)).sum();
        total += f64::from(tail + lanes.iter().sum::<f32>());
    }
    total
}

/// Group norm with affine parameters, optionally shifted per (batch, channel) first and
/// followed by SiLU. `shift`: `[batch, channels]`.
pub(crate) fn group_norm(
    x: &Tensor,
    weight: &Tensor,
    bias: &Tensor,
    groups: usize,
    eps: f64,
    shift: Option<&Tensor>,
    silu: bool,
) -> Result<Tensor> {
    let dims = x.dims();
    if dims.len() < 3 {
        candle_core::bail!("group norm: input must be [batch, channels, ...], got {dims:?}");
    }
    let (batch, c) = (dims[0], dims[1]);
    if groups == 0 || !c.is_multiple_of(groups) {
        candle_core::bail!("group norm: {c} channels do not split into {groups} groups");
    }
    if fast_path(x) && fast_path(weight) && fast_path(bias) {
        let shift = match shift {
            Some(s) => Some(
                s.broadcast_as((batch, c))?
                    .to_dtype(DType::F32)?
                    .flatten_all()?
                    .to_vec1::<f32>()?,
            ),
            None => None,
        };
        let op = GroupNormOp {
            groups,
            eps,
            silu,
            shift,
        };
        return x.apply_op3_no_bwd(weight, bias, &op);
    }
    // Other devices and dtypes: candle's ops (the same maths, in more passes).
    let x = match shift {
        Some(s) => {
            let mut s = s.clone();
            for _ in 2..dims.len() {
                s = s.unsqueeze(s.rank())?;
            }
            x.broadcast_add(&s)?
        }
        None => x.clone(),
    };
    let norm = candle_nn::GroupNorm::new(weight.clone(), bias.clone(), c, groups, eps)?;
    let y = candle_core::Module::forward(&norm, &x)?;
    if silu {
        y.silu()
    } else {
        Ok(y)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Module};

    /// Seeded normal values ([`crate::rng::seeded_normal`]).
    fn randn(seed: u64, mean: f64, std: f64, shape: &[usize]) -> Tensor {
        crate::rng::seeded_normal(seed, mean, std, shape).unwrap()
    }

    fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
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

    /// How products are cut: the longer side, into fewer parts where it is too short for
    /// every thread, and not at all when small.
    #[test]
    fn products_are_cut_along_their_longer_side() {
        let cut = |parts, by_columns| Some(Split { parts, by_columns });
        assert_eq!(split_plan(2, 200, 300, 80), cut(2, true));
        assert_eq!(split_plan(3, 300, 200, 80), cut(3, false));
        assert_eq!(split_plan(3, 500, 40, 256), cut(3, false));
        // 150 columns give two parts of at least 64, not three.
        assert_eq!(split_plan(3, 100, 150, 400), cut(2, true));
        // Large but too narrow to split, small, or one thread: one product.
        assert_eq!(split_plan(2, 60, 50, 2000), None);
        assert_eq!(split_plan(2, 20, 30, 50), None);
        assert_eq!(split_plan(1, 300, 200, 80), None);
    }

    /// `gemm_split` against a plain f64 product on 1-3 threads, for the cuts above, with the
    /// operand layouts the layers use: row-major operands; a column-major `lhs` (channels read
    /// as tokens), `rhs` as a transposed weight and a transposed output (tokens written back
    /// as channels); and an output that is a window of a wider matrix (one im2col block).
    /// Unread outputs start as NaN, so an element no part writes fails; the window's margin
    /// must come back untouched.
    #[test]
    fn products_split_across_threads_match_a_plain_product() {
        let value = |i: usize, j: usize, salt: usize| {
            ((i * 7919 + j * 104_729 + salt * 15_485_863) % 1000) as f32 / 500.0 - 1.0
        };
        for (m, n, k) in [
            (200, 300, 80),
            (300, 200, 80),
            (500, 40, 256),
            (100, 150, 400),
        ] {
            let want: Vec<f64> = (0..m * n)
                .map(|at| {
                    let (i, j) = (at / n, at % n);
                    (0..k)
                        .map(|p| value(i, p, 1) as f64 * value(p, j, 2) as f64)
                        .sum()
                })
                .collect();
            for layers_layout in [false, true] {
                // lhs[i][p] at i * lrs + p * lcs; rhs[p][j] at p * rrs + j * rcs.
                let (lrs, lcs) = if layers_layout { (1, m) } else { (k, 1) };
                let (rrs, rcs) = if layers_layout { (1, k) } else { (n, 1) };
                let mut lhs = vec![0f32; m * k];
                let mut rhs = vec![0f32; k * n];
                for i in 0..m {
                    for p in 0..k {
                        lhs[i * lrs + p * lcs] = value(i, p, 1);
                    }
                }
                for p in 0..k {
                    for j in 0..n {
                        rhs[p * rrs + j * rcs] = value(p, j, 2);
                    }
                }
                // The output: transposed in the layers' layout, else a window `n` wide of a
                // row-major matrix `n + 7` wide.
                let (drs, dcs, len) = if layers_layout {
                    (1, m, m * n)
                } else {
                    (n + 7, 1, m * (n + 7))
                };
                // Every f32 kind of product this CPU runs (the crate's and ours).
                let kinds = Products::available()
                    .into_iter()
                    .filter(|p| *p != Products::Avx512(avx512_gemm::Format::Bf16));
                for (products, threads) in
                    kinds.flat_map(|p| (1..=3).map(move |threads| (p, threads)))
                {
                    for read_dst in [false, true] {
                        let margin = -7.5f32;
                        let mut dst = vec![margin; len];
                        for i in 0..m {
                            for j in 0..n {
                                dst[i * drs + j * dcs] =
                                    if read_dst { value(i, j, 3) } else { f32::NAN };
                            }
                        }
                        // SAFETY: the buffers hold these matrices at these strides.
                        unsafe {
                            gemm_split(
                                threads,
                                products,
                                (m, n, k),
                                MatMut {
                                    ptr: dst.as_mut_ptr(),
                                    rs: drs as isize,
                                    cs: dcs as isize,
                                },
                                read_dst,
                                MatRef {
                                    ptr: lhs.as_ptr(),
                                    rs: lrs as isize,
                                    cs: lcs as isize,
                                },
                                MatRef {
                                    ptr: rhs.as_ptr(),
                                    rs: rrs as isize,
                                    cs: rcs as isize,
                                },
                            );
                        }
                        let case = format!(
                            "{m}x{n}x{k}, {products:?} on {threads} threads, layers' layout \
                             {layers_layout}, read {read_dst}"
                        );
                        for i in 0..m {
                            for j in 0..n {
                                let mut w = want[i * n + j];
                                if read_dst {
                                    w += value(i, j, 3) as f64;
                                }
                                let got = dst[i * drs + j * dcs] as f64;
                                assert!(
                                    (got - w).abs() <= 1e-4 * (1.0 + w.abs()),
                                    "{case}: [{i}, {j}] = {got}, want {w}"
                                );
                            }
                        }
                        if !layers_layout {
                            for i in 0..m {
                                for j in n..n + 7 {
                                    assert_eq!(dst[i * drs + j], margin, "{case}: margin");
                                }
                            }
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn exp_is_accurate_over_the_softmax_range() {
        // Within f32's normal range: a couple of ulp (1 ulp = 1.2e-7 relative).
        // Both variants: with a fused multiply-add (in software here unless the test build has
        // FMA, which changes speed, not results) and with separate multiplies and adds.
        fn check(exp: fn(f32) -> f32) {
            for i in -8730..=8830 {
                let x = i as f32 * 0.01;
                let (got, want) = (exp(x), x.exp());
                assert!(
                    (got - want).abs() <= 3e-7 * want,
                    "exp({x}) = {got}, want {want}"
                );
            }
            // Below it the true value is a denormal; flushing to 0 changes a softmax by < 1e-38.
            assert_eq!(exp(-1000.0), 0.0);
            assert_eq!(exp(f32::NEG_INFINITY), 0.0);
            assert!(exp(f32::NAN).is_nan());
        }
        check(exp_f32::<true>);
        check(exp_f32::<false>);
    }

    #[test]
    fn gelu_matches_candles_exact_gelu() {
        let x = Tensor::arange(-800f32, 800., &Device::Cpu)
            .unwrap()
            .affine(0.01, 0.)
            .unwrap();
        let want = x.gelu_erf().unwrap();
        let got = mul_gelu(x.ones_like().unwrap(), &x).unwrap();
        // A&S 7.1.26 is good to 1.5e-7 in erf; GELU scales that by |x|/2 <= 4.
        assert!(max_abs_diff(&got, &want) < 1e-6);
    }

    #[test]
    fn softmax_matches_candle() {
        let x = randn(1, 0., 3., &[5, 7, 37]);
        let want = candle_nn::ops::softmax_last_dim(&x).unwrap();
        let got = softmax_last_dim(x.copy().unwrap()).unwrap();
        assert!(max_abs_diff(&got, &want) < 1e-6);
    }

    #[test]
    fn f16_storage_round_trips_like_candles_conversion() {
        // Several threads' worth with a tail; values past f16's precision (up to ~1.4e4).
        let x = (randn(2, 0., 3., &[300_001]) * 1e3).unwrap();
        let half = narrow_f16(&x).unwrap();
        assert_eq!(half.dtype(), DType::F16);
        let want = x.to_dtype(DType::F16).unwrap();
        assert_eq!(
            max_abs_diff(
                &half.to_dtype(DType::F32).unwrap(),
                &want.to_dtype(DType::F32).unwrap()
            ),
            0.0
        );
        let wide = widen_f16(&half).unwrap();
        assert_eq!(wide.dtype(), DType::F32);
        assert_eq!(
            max_abs_diff(&wide, &want.to_dtype(DType::F32).unwrap()),
            0.0
        );
        // A 2-D view that is not contiguous converts in its logical order.
        let m = x
            .narrow(0, 0, 300_000)
            .unwrap()
            .reshape((600, 500))
            .unwrap()
            .t()
            .unwrap();
        let got = widen_f16(&narrow_f16(&m).unwrap()).unwrap();
        assert_eq!(
            max_abs_diff(
                &got,
                &m.to_dtype(DType::F16)
                    .unwrap()
                    .to_dtype(DType::F32)
                    .unwrap()
            ),
            0.0
        );
    }

    #[test]
    fn zeros_fill_every_value() {
        // Large enough for the threaded paths.
        for len in [0, 10, (1 << 16) + 7, 3 << 20] {
            let z = zeros::<u32>(len);
            assert_eq!(z.len(), len);
            assert!(z.iter().all(|&v| v == 0), "{len}");
            // Parts of every size (the last one shorter), with a value fresh memory cannot hold
            // by chance, each told where it starts.
            for threads in [1, 2, 3, 7] {
                // SAFETY: each part is filled whole.
                let v = unsafe {
                    written_in_parts(len, 1, threads, |part, first| {
                        for (i, x) in part.iter_mut().enumerate() {
                            x.write(7 + first + i);
                        }
                    })
                };
                assert_eq!(v.len(), len);
                assert!(
                    v.iter().enumerate().all(|(i, &x)| x == 7 + i),
                    "{len} on {threads}"
                );
            }
        }
    }

    /// Every combination of bias and residual, at sizes that take one part and several (the
    /// last shorter); the values are exact in f32, so the sums are compared exactly.
    #[test]
    fn layer_outputs_start_as_bias_plus_residual() {
        for (width, rows) in [(13, 5), (13, 20_011), (320, 8192), (0, 4), (3, 0)] {
            drop(vec![-1f32; width * rows]);
            let row: Vec<f32> = (0..width).map(|i| i as f32 + 0.5).collect();
            let res: Vec<f32> = (0..width * rows).map(|i| i as f32 * 0.25).collect();
            for (bias, residual) in [
                (Some(&row[..]), None),
                (None, Some(&res[..])),
                (Some(&row[..]), Some(&res[..])),
                (None, None),
            ] {
                let out = rows_start(rows, width, bias, residual);
                assert_eq!(out.len(), width * rows);
                for (i, v) in out.iter().enumerate() {
                    let want = bias.map_or(0.0, |b| b[i % width]) + residual.map_or(0.0, |r| r[i]);
                    assert_eq!(*v, want, "rows {width}x{rows} at {i}");
                }
                // The same values as planes: `rows` planes of `width`, the bias per plane
                // (planes of several images share it: 4 channels here, or one bias value).
                let channels = if rows % 4 == 0 { 4 } else { 1 };
                let per_plane: Vec<f32> = (0..channels).map(|c| c as f32 - 7.0).collect();
                let bias = bias.map(|_| &per_plane[..]);
                let out = planes_start(rows, width, bias, residual);
                assert_eq!(out.len(), width * rows);
                for (i, v) in out.iter().enumerate() {
                    let plane = i / width;
                    let want =
                        bias.map_or(0.0, |b| b[plane % channels]) + residual.map_or(0.0, |r| r[i]);
                    assert_eq!(*v, want, "planes {rows}x{width} at {i}");
                }
            }
        }
    }

    /// Row widths with lane tails and the UNet's, small inputs and ones split between threads,
    /// against the textbook formula in f64; an input candle's own kernel takes (non-contiguous)
    /// still gives the same result.
    #[test]
    fn layer_norm_matches_the_formula_in_f64() {
        for (rows, dim) in [(3, 13), (5, 1), (2048, 20), (300, 320), (64, 1280)] {
            let x = randn(7, 0.5, 2., &[rows, dim]);
            let w = randn(8, 1., 0.5, &[dim]);
            let b = randn(9, 0., 0.5, &[dim]);
            let norm = candle_nn::LayerNorm::new(w.clone(), b.clone(), 1e-5);
            let x64 = x.to_dtype(DType::F64).unwrap();
            let mean = x64.mean_keepdim(1).unwrap();
            let dev = x64.broadcast_sub(&mean).unwrap();
            let var = dev.sqr().unwrap().mean_keepdim(1).unwrap();
            let want = dev
                .broadcast_div(&(var + 1e-5).unwrap().sqrt().unwrap())
                .unwrap()
                .broadcast_mul(&w.to_dtype(DType::F64).unwrap())
                .unwrap()
                .broadcast_add(&b.to_dtype(DType::F64).unwrap())
                .unwrap()
                .to_dtype(DType::F32)
                .unwrap();
            let got = layer_norm(&x, &norm).unwrap();
            assert_eq!(got.dims(), x.dims());
            assert!(max_abs_diff(&got, &want) < 1e-5, "{rows}x{dim}");
            let strided = x.t().unwrap().contiguous().unwrap().t().unwrap();
            let got = layer_norm(&strided, &norm).unwrap();
            assert!(max_abs_diff(&got, &want) < 1e-4, "{rows}x{dim} strided");
            // Contiguous rows that start inside a larger buffer (our kernel, at an offset).
            let padded = Tensor::cat(&[&randn(17, 0., 1., &[1, dim]), &x], 0).unwrap();
            let got = layer_norm(&padded.narrow(0, 1, rows).unwrap(), &norm).unwrap();
            assert!(
                max_abs_diff(&got, &want) < 1e-5,
                "{rows}x{dim} at an offset"
            );
        }
        // Rows of another width than the weights: an error, not a panic.
        let norm =
            candle_nn::LayerNorm::new(randn(1, 1., 0.5, &[8]), randn(2, 0., 0.5, &[8]), 1e-5);
        assert!(layer_norm(&randn(3, 0., 1., &[4, 7]), &norm).is_err());
    }

    /// Exactly candle's values (which follow torch's source-index rule): 2x, sizes that are not
    /// multiples (the UNet's odd latent sides), shrinking, and planes split between threads.
    #[test]
    fn nearest_upsampling_matches_candle() {
        for (shape, oh, ow) in [
            ([2, 3, 5, 7], 10, 14),
            ([1, 2, 5, 7], 11, 13),
            ([1, 1, 6, 6], 4, 9),
            ([1, 1, 1, 1], 3, 2),
            ([2, 64, 32, 32], 64, 64),
        ] {
            let x = randn(10, 0., 1., &shape);
            let want = x.upsample_nearest2d(oh, ow).unwrap();
            let got = upsample_nearest(&x, oh, ow).unwrap();
            assert_eq!(got.dims(), want.dims());
            assert_eq!(max_abs_diff(&got, &want), 0.0, "{shape:?} to {oh}x{ow}");
        }
    }

    /// Exactly candle's concatenation: small, and planes split between threads.
    #[test]
    fn channel_concatenation_matches_candle() {
        for (a, b) in [
            (vec![2, 3, 4, 5], vec![2, 1, 4, 5]),
            (vec![1, 2, 3], vec![1, 4, 3]),
            (vec![2, 64, 16, 16], vec![2, 32, 16, 16]),
        ] {
            let (a, b) = (randn(11, 0., 1., &a), randn(12, 0., 1., &b));
            let want = Tensor::cat(&[&a, &b], 1).unwrap();
            let got = cat_channels(&a, &b).unwrap();
            assert_eq!(got.dims(), want.dims());
            assert_eq!(max_abs_diff(&got, &want), 0.0, "{:?}", got.dims());
        }
        // Different sizes are refused (as candle refuses them).
        assert!(
            cat_channels(&randn(1, 0., 1., &[1, 2, 3]), &randn(2, 0., 1., &[1, 2, 4])).is_err()
        );
    }

    #[test]
    fn group_norm_matches_candle_with_shift_and_silu() {
        // Large enough (> 32k elements) to take the multi-threaded path.
        let x = randn(3, 1., 2., &[2, 16, 40, 30]);
        let w = randn(4, 1., 0.5, &[16]);
        let b = randn(5, 0., 0.5, &[16]);
        let shift = randn(6, 0., 1., &[2, 16]);
        let norm = candle_nn::GroupNorm::new(w.clone(), b.clone(), 16, 4, 1e-5).unwrap();
        let shifted = x
            .broadcast_add(&shift.reshape((2, 16, 1, 1)).unwrap())
            .unwrap();
        let want = norm.forward(&shifted).unwrap().silu().unwrap();
        let got = group_norm(&x, &w, &b, 4, 1e-5, Some(&shift), true).unwrap();
        assert!(max_abs_diff(&got, &want) < 1e-5);
        let want = norm.forward(&x).unwrap();
        let got = group_norm(&x, &w, &b, 4, 1e-5, None, false).unwrap();
        assert!(max_abs_diff(&got, &want) < 1e-5);
    }

    /// Planes of several statistics blocks (the last one shorter), far from zero (where one
    /// pass of sums and squares would lose the variance), against candle's group norm in f64.
    #[test]
    fn group_norm_statistics_merge_blocks_exactly() {
        let x = randn(13, 500., 1., &[1, 8, 100, 70]);
        let w = randn(14, 1., 0.5, &[8]);
        let b = randn(15, 0., 0.5, &[8]);
        let shift = randn(16, 0., 3., &[1, 8]);
        let f64_of = |t: &Tensor| t.to_dtype(DType::F64).unwrap();
        let norm = candle_nn::GroupNorm::new(f64_of(&w), f64_of(&b), 8, 2, 1e-5).unwrap();
        let shifted = f64_of(&x)
            .broadcast_add(&f64_of(&shift).reshape((1, 8, 1, 1)).unwrap())
            .unwrap();
        let want = norm
            .forward(&shifted)
            .unwrap()
            .to_dtype(DType::F32)
            .unwrap();
        let got = group_norm(&x, &w, &b, 2, 1e-5, Some(&shift), false).unwrap();
        // The inputs themselves are rounded to f32 near 500 (steps of 3e-5 of a unit-variance
        // value), which bounds the agreement: 3.5e-5 measured.
        let d = max_abs_diff(&got, &want);
        assert!(d < 1e-4, "{d}");
    }
}
