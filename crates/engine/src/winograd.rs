//! Winograd convolution on the CPU for 3x3, stride-1, padding-1 layers (most of the UNet's
//! compute outside attention, nearly all of the VAE decoder's): F(4x4, 3x3) does the work of a
//! 3x3 convolution with 4x fewer multiplications than an im2col product, F(2x2, 3x3) with 2.25x.
//!
//! Written here because no maintained Rust crate offers it. The method (Lavin & Gray, "Fast
//! Algorithms for Convolutional Neural Networks", 2015): cut the output into m x m tiles; each
//! tile's (m+2) x (m+2) input patch `d` and each 3x3 filter `g` are transformed
//! (`V = Bᵀ d B`, `U = G g Gᵀ`), multiplied point by point and summed over input channels — for
//! each of the (m+2)² points that sum is one matrix product `[tiles, c_in] x [c_in, c_out]`, run
//! by the `gemm` crate — and transformed back (`Y = Aᵀ M A`).
//!
//! The filters are transformed on every call rather than stored, so no weight is held twice in
//! memory; that costs about as much as the multiplications it saves on small feature maps, so
//! [`worth_it`] keeps those on the im2col path. Tiles are handled in chunks of whole tile rows,
//! one chunk per thread at a time, so buffers stay a few MiB however large the image.

use candle_core::{CpuStorage, CustomOp2, Layout, Result, Shape, Tensor};

use crate::kernels::{contiguous_f32, simd_dispatch, SendPtr};

/// Tiles (or channels) transformed together, one per SIMD lane (8 f32 = one AVX2 register).
const L: usize = 8;
type Lanes = [f32; L];

/// The transform matrices of one F(M x M, 3 x 3); `A = M + 2` is the input tile's side.
struct Transforms<const M: usize, const A: usize> {
    bt: [[f32; A]; A],
    g: [[f32; 3]; A],
    at: [[f32; A]; M],
}

/// F(2x2, 3x3), interpolation points 0, 1, -1 and infinity.
const F2: Transforms<2, 4> = Transforms {
    bt: [
        [1.0, 0.0, -1.0, 0.0],
        [0.0, 1.0, 1.0, 0.0],
        [0.0, -1.0, 1.0, 0.0],
        [0.0, 1.0, 0.0, -1.0],
    ],
    g: [
        [1.0, 0.0, 0.0],
        [0.5, 0.5, 0.5],
        [0.5, -0.5, 0.5],
        [0.0, 0.0, 1.0],
    ],
    at: [[1.0, 1.0, 1.0, 0.0], [0.0, 1.0, -1.0, -1.0]],
};

/// F(4x4, 3x3), interpolation points 0, 1, -1, 2, -2 and infinity. In f32 its results differ
/// from a direct convolution by about 1e-6 of the values' scale (tested below).
const F4: Transforms<4, 6> = Transforms {
    bt: [
        [4.0, 0.0, -5.0, 0.0, 1.0, 0.0],
        [0.0, -4.0, -4.0, 1.0, 1.0, 0.0],
        [0.0, 4.0, -4.0, -1.0, 1.0, 0.0],
        [0.0, -2.0, -1.0, 2.0, 1.0, 0.0],
        [0.0, 2.0, -1.0, -2.0, 1.0, 0.0],
        [0.0, 4.0, 0.0, -5.0, 0.0, 1.0],
    ],
    g: [
        [1.0 / 4.0, 0.0, 0.0],
        [-1.0 / 6.0, -1.0 / 6.0, -1.0 / 6.0],
        [-1.0 / 6.0, 1.0 / 6.0, -1.0 / 6.0],
        [1.0 / 24.0, 1.0 / 12.0, 1.0 / 6.0],
        [1.0 / 24.0, -1.0 / 12.0, 1.0 / 6.0],
        [0.0, 0.0, 1.0],
    ],
    at: [
        [1.0, 1.0, 1.0, 1.0, 1.0, 0.0],
        [0.0, 1.0, -1.0, 2.0, -2.0, 0.0],
        [0.0, 1.0, 1.0, 4.0, 4.0, 0.0],
        [0.0, 1.0, -1.0, 8.0, -8.0, 1.0],
    ],
};

/// Which tile size to use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Tile {
    /// F(2x2, 3x3).
    Two,
    /// F(4x4, 3x3).
    Four,
}

/// Output pixels (batch x height x width) from which the Winograd path pays for transforming
/// the filters on each call. Below it (the UNet's 16x16 and 8x8 levels at 512x512) the im2col
/// path is used. Measured with `bench --ops`: see the issue-12 note.
const MIN_PIXELS: usize = 2048;

/// Whether a convolution of this size should take the Winograd path.
pub(crate) fn worth_it(batch: usize, h: usize, w: usize) -> bool {
    batch * h * w >= MIN_PIXELS
}

/// Tiles per chunk aimed at: each of the (m+2)² products is then `[~256, c_in] x [c_in, c_out]`,
/// large enough for the matrix kernel to run at full speed.
const CHUNK_TILES: usize = 256;

/// `x` (`[batch, c, h, w]`, contiguous f32 on the CPU) convolved with `weight` `[c_out, 9 * c]`
/// (torch's `[c_out, c, 3, 3]` flattened, as `resnet::Conv2d` holds it), padding 1, plus `bias`.
pub(crate) fn conv3x3(x: &Tensor, weight: &Tensor, bias: &[f32], tile: Tile) -> Result<Tensor> {
    x.apply_op2_no_bwd(
        weight,
        &Winograd3x3 {
            bias: bias.to_vec(),
            tile,
        },
    )
}

struct Winograd3x3 {
    bias: Vec<f32>,
    tile: Tile,
}

impl CustomOp2 for Winograd3x3 {
    fn name(&self) -> &'static str {
        "ld-winograd3x3"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let x = contiguous_f32(s1, l1, self.name())?;
        let wt = contiguous_f32(s2, l2, self.name())?;
        let (batch, c, h, w) = l1.shape().dims4()?;
        let (cout, kdim) = l2.shape().dims2()?;
        if kdim != 9 * c || self.bias.len() != cout || h == 0 || w == 0 || c == 0 {
            candle_core::bail!(
                "{}: weights {:?} and bias {} do not fit input {:?}",
                self.name(),
                l2.dims(),
                self.bias.len(),
                l1.dims()
            );
        }
        let shape = ConvShape {
            batch,
            c,
            cout,
            h,
            w,
        };
        let out = match self.tile {
            Tile::Two => run(&F2, &shape, x, wt, &self.bias),
            Tile::Four => run(&F4, &shape, x, wt, &self.bias),
        };
        Ok((CpuStorage::F32(out), Shape::from((batch, cout, h, w))))
    }
}

#[derive(Clone, Copy)]
struct ConvShape {
    batch: usize,
    c: usize,
    cout: usize,
    h: usize,
    w: usize,
}

/// Runs `f(thread, threads)` on `threads` scoped threads (or inline for one).
fn on_threads(threads: usize, f: impl Fn(usize, usize) + Sync) {
    if threads <= 1 {
        f(0, 1);
        return;
    }
    std::thread::scope(|s| {
        for t in 0..threads {
            let f = &f;
            s.spawn(move || f(t, threads));
        }
    });
}

fn run<const M: usize, const A: usize>(
    tr: &'static Transforms<M, A>,
    sh: &ConvShape,
    x: &[f32],
    wt: &[f32],
    bias: &[f32],
) -> Vec<f32> {
    let (c, cout) = (sh.c, sh.cout);
    let threads = candle_core::utils::get_num_threads().max(1);

    // U[point][k][c]: the transformed filters, c contiguous (8 channels per lane group).
    let mut u = vec![0f32; A * A * cout * c];
    let u_ptr = SendPtr(u.as_mut_ptr());
    on_threads(threads.min(cout), |t, n| {
        let (k0, k1) = (t * cout / n, (t + 1) * cout / n);
        // SAFETY: this thread writes only rows k0..k1 of every point's [cout, c] block.
        unsafe { filters(tr, wt, c, cout, k0, k1, u_ptr) };
    });

    let (th, tw) = (sh.h.div_ceil(M), sh.w.div_ceil(M));
    let tile_rows = sh.batch * th;
    // At least two chunks per thread where there are enough rows, so no thread idles.
    let rows_per_chunk = (CHUNK_TILES / tw)
        .min(tile_rows.div_ceil(2 * threads))
        .clamp(1, tile_rows);
    let chunks = tile_rows.div_ceil(rows_per_chunk);
    let mut out = vec![0f32; sh.batch * cout * sh.h * sh.w];
    let out_ptr = SendPtr(out.as_mut_ptr());
    let u = &u;
    on_threads(threads.min(chunks), |t, n| {
        let tiles = rows_per_chunk * tw;
        let mut scratch = Scratch {
            v: vec![0f32; A * A * c * tiles],
            m: vec![0f32; A * A * cout * tiles],
            phases: vec![0f32; A * M * phase_stride(tw)],
        };
        // Chunks dealt round-robin: neighbouring chunks cost the same, so threads finish together.
        for chunk in (t..chunks).step_by(n) {
            let r0 = chunk * rows_per_chunk;
            let r1 = (r0 + rows_per_chunk).min(tile_rows);
            // SAFETY: chunks cover disjoint tile rows, so disjoint output pixels.
            unsafe { chunk_fwd(tr, sh, x, u, bias, r0, r1, &mut scratch, out_ptr) };
        }
    });
    out
}

/// Per-thread buffers: transformed inputs `[point][c][tile]`, products `[point][k][tile]`, and
/// the zero-padded input rows of one tile row (see [`pad_phases`]).
struct Scratch {
    v: Vec<f32>,
    m: Vec<f32>,
    phases: Vec<f32>,
}

/// Entries per column phase in [`pad_phases`]: the row's tiles, one more for the columns a tile
/// shares with the next, and a spare lane group.
fn phase_stride(tw: usize) -> usize {
    tw + 1 + L
}

simd_dispatch!(filters_f2(wt: &[f32], c: usize, cout: usize, k0: usize, k1: usize, u: SendPtr) {
    filters_impl(&F2, wt, c, cout, k0, k1, u)
});
simd_dispatch!(filters_f4(wt: &[f32], c: usize, cout: usize, k0: usize, k1: usize, u: SendPtr) {
    filters_impl(&F4, wt, c, cout, k0, k1, u)
});

/// Transforms filters `k0..k1` into `u` (`[A*A][cout][c]`), compiled for AVX2 where the CPU
/// has it.
///
/// # Safety
/// `u` must point to `A * A * cout * c` f32s; no other thread may write rows `k0..k1`.
unsafe fn filters<const M: usize, const A: usize>(
    tr: &Transforms<M, A>,
    wt: &[f32],
    c: usize,
    cout: usize,
    k0: usize,
    k1: usize,
    u: SendPtr,
) {
    if M == 2 {
        filters_f2(wt, c, cout, k0, k1, u)
    } else if M == 4 {
        filters_f4(wt, c, cout, k0, k1, u)
    } else {
        filters_impl(tr, wt, c, cout, k0, k1, u)
    }
}

/// Body of [`filters`]: a safe fn so `simd_dispatch!` can wrap it; same contract.
#[inline(always)]
fn filters_impl<const M: usize, const A: usize>(
    tr: &Transforms<M, A>,
    wt: &[f32],
    c: usize,
    cout: usize,
    k0: usize,
    k1: usize,
    u: SendPtr,
) {
    // Work arrays live outside the loops: returned by value they were copied each time.
    let mut g = [[[0f32; L]; 3]; 3];
    let mut gt = [[[0f32; L]; 3]; A];
    let mut ut = [[[0f32; L]; A]; A];
    for k in k0..k1 {
        let row = &wt[k * 9 * c..(k + 1) * 9 * c];
        for c0 in (0..c).step_by(L) {
            let lanes = L.min(c - c0);
            // Channel c's nine taps are `row[9 * c..9 * c + 9]`: lane l takes channel c0 + l.
            for (l, taps) in row[9 * c0..9 * (c0 + lanes)].chunks_exact(9).enumerate() {
                for (gv, &t) in g.iter_mut().flatten().zip(taps) {
                    gv[l] = t;
                }
            }
            mul_left(&tr.g, &g, &mut gt);
            mul_right_t(&gt, &tr.g, &mut ut);
            for (p, v) in ut.iter().flatten().enumerate() {
                let at = (p * cout + k) * c + c0;
                // SAFETY: `at..at + lanes` lies in row k of point p, which this thread owns.
                unsafe {
                    if lanes == L {
                        std::ptr::copy_nonoverlapping(v.as_ptr(), u.0.add(at), L)
                    } else {
                        std::ptr::copy_nonoverlapping(v.as_ptr(), u.0.add(at), lanes)
                    }
                };
            }
        }
    }
}

/// One chunk of tile rows `r0..r1` (row index = image * tile rows per image + tile row).
///
/// # Safety
/// `out` must point to the `[batch, cout, h, w]` output; no other thread may write these tiles.
#[allow(clippy::too_many_arguments)]
unsafe fn chunk_fwd<const M: usize, const A: usize>(
    tr: &Transforms<M, A>,
    sh: &ConvShape,
    x: &[f32],
    u: &[f32],
    bias: &[f32],
    r0: usize,
    r1: usize,
    sc: &mut Scratch,
    out: SendPtr,
) {
    let (c, cout) = (sh.c, sh.cout);
    let (th, tw) = (sh.h.div_ceil(M), sh.w.div_ceil(M));
    let tiles = (r1 - r0) * tw;
    let v = &mut sc.v[..A * A * c * tiles];
    let m = &mut sc.m[..A * A * cout * tiles];

    for ch in 0..c {
        for r in r0..r1 {
            let (img, ty) = (r / th, r % th);
            let plane = &x[(img * c + ch) * sh.h * sh.w..][..sh.h * sh.w];
            pad_phases::<M, A>(plane, sh.h, sh.w, ty, phase_stride(tw), &mut sc.phases);
            input_row(tr, &sc.phases, tw, (r - r0) * tw, ch, c, tiles, v);
        }
    }

    for p in 0..A * A {
        // [tiles, c] x [c, cout] -> [tiles, cout], all stored column-major (tiles contiguous),
        // the layout gemm's kernel reads and writes without transposing.
        // SAFETY: each matrix lies inside its buffer: v block p is `c` columns of `tiles`,
        // u block p is `cout` columns of `c`, m block p is `cout` columns of `tiles`.
        unsafe {
            gemm::gemm(
                tiles,
                cout,
                c,
                m.as_mut_ptr().add(p * cout * tiles),
                tiles as isize,
                1,
                false,
                v.as_ptr().add(p * c * tiles),
                tiles as isize,
                1,
                u.as_ptr().add(p * cout * c),
                c as isize,
                1,
                0.0,
                1.0,
                false,
                false,
                false,
                gemm::Parallelism::None,
            );
        }
    }

    for (k, &b) in bias.iter().enumerate() {
        for r in r0..r1 {
            let (img, ty) = (r / th, r % th);
            let base = (img * cout + k) * sh.h * sh.w;
            let row = OutRow {
                k,
                t0: (r - r0) * tw,
                tiles,
                ty,
                bias: b,
                base,
            };
            // SAFETY: writes only this chunk's tiles of output plane (img, k).
            unsafe { output_row(tr, sh, m, &row, out) };
        }
    }
}

/// Copies the `A` input rows under tile row `ty` into `ph`, split by column phase: entry
/// `(i * M + q) * stride + t` holds padded column `M * t + q` of row `i`, so the column `j` of
/// eight neighbouring tiles is eight consecutive values (`q = j % M`, `t = tx + j / M`). Zero
/// padding around the image, past its edges and for `L` tiles beyond the row is filled in, so
/// every load of eight lanes stays in bounds.
fn pad_phases<const M: usize, const A: usize>(
    plane: &[f32],
    h: usize,
    w: usize,
    ty: usize,
    stride: usize,
    ph: &mut [f32],
) {
    for i in 0..A {
        // Input row y = ty * M - 1 + i (padding 1 above).
        let row = (ty * M + i)
            .checked_sub(1)
            .filter(|&y| y < h)
            .map(|y| &plane[y * w..(y + 1) * w]);
        for q in 0..M {
            let dst = &mut ph[(i * M + q) * stride..(i * M + q + 1) * stride];
            match row {
                Some(row) => {
                    for (t, d) in dst.iter_mut().enumerate() {
                        // Padded column M * t + q is image column M * t + q - 1.
                        *d = (M * t + q)
                            .checked_sub(1)
                            .and_then(|x| row.get(x))
                            .copied()
                            .unwrap_or(0.0);
                    }
                }
                None => dst.fill(0.0),
            }
        }
    }
}

simd_dispatch!(input_row_f2(rows: &[f32], tw: usize, t0: usize, ch: usize, c: usize, tiles: usize, v: &mut [f32]) {
    input_row_impl(&F2, rows, tw, t0, ch, c, tiles, v)
});
simd_dispatch!(input_row_f4(rows: &[f32], tw: usize, t0: usize, ch: usize, c: usize, tiles: usize, v: &mut [f32]) {
    input_row_impl(&F4, rows, tw, t0, ch, c, tiles, v)
});

/// Dispatches to the AVX2-compiled transform for this tile size.
#[allow(clippy::too_many_arguments)]
fn input_row<const M: usize, const A: usize>(
    tr: &Transforms<M, A>,
    rows: &[f32],
    tw: usize,
    t0: usize,
    ch: usize,
    c: usize,
    tiles: usize,
    v: &mut [f32],
) {
    if M == 2 {
        input_row_f2(rows, tw, t0, ch, c, tiles, v)
    } else if M == 4 {
        input_row_f4(rows, tw, t0, ch, c, tiles, v)
    } else {
        input_row_impl(tr, rows, tw, t0, ch, c, tiles, v)
    }
}

/// `V = Bᵀ d B` for the `tw` tiles of one tile row in channel `ch`, 8 tiles at a time, stored at
/// tiles `t0..t0 + tw` of `v` (`[A*A][c][tiles]`).
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn input_row_impl<const M: usize, const A: usize>(
    tr: &Transforms<M, A>,
    rows: &[f32],
    tw: usize,
    t0: usize,
    ch: usize,
    c: usize,
    tiles: usize,
    v: &mut [f32],
) {
    let stride = phase_stride(tw);
    let mut d = [[[0f32; L]; A]; A];
    let mut t = [[[0f32; L]; A]; A];
    let mut vt = [[[0f32; L]; A]; A];
    for tx0 in (0..tw).step_by(L) {
        let lanes = L.min(tw - tx0);
        for (i, di) in d.iter_mut().enumerate() {
            for (j, dij) in di.iter_mut().enumerate() {
                let at = (i * M + j % M) * stride + tx0 + j / M;
                dij.copy_from_slice(&rows[at..at + L]);
            }
        }
        mul_left(&tr.bt, &d, &mut t);
        mul_right_t(&t, &tr.bt, &mut vt);
        for (p, vals) in vt.iter().flatten().enumerate() {
            let at = (p * c + ch) * tiles + t0 + tx0;
            if lanes == L {
                v[at..at + L].copy_from_slice(vals);
            } else {
                v[at..at + lanes].copy_from_slice(&vals[..lanes]);
            }
        }
    }
}

/// Where one tile row of one output channel comes from and goes to.
#[derive(Clone, Copy)]
struct OutRow {
    /// Output channel.
    k: usize,
    /// The row's first tile within the chunk, and the chunk's tile count.
    t0: usize,
    tiles: usize,
    /// Tile row within the image.
    ty: usize,
    bias: f32,
    /// Offset of output plane (image, k).
    base: usize,
}

simd_dispatch!(output_row_f2(sh: &ConvShape, m: &[f32], row: &OutRow, out: SendPtr) {
    output_row_impl(&F2, sh, m, row, out)
});
simd_dispatch!(output_row_f4(sh: &ConvShape, m: &[f32], row: &OutRow, out: SendPtr) {
    output_row_impl(&F4, sh, m, row, out)
});

/// Dispatches to the AVX2-compiled inverse transform for this tile size.
///
/// # Safety
/// As [`output_row_impl`].
unsafe fn output_row<const M: usize, const A: usize>(
    tr: &Transforms<M, A>,
    sh: &ConvShape,
    m: &[f32],
    row: &OutRow,
    out: SendPtr,
) {
    if M == 2 {
        output_row_f2(sh, m, row, out)
    } else if M == 4 {
        output_row_f4(sh, m, row, out)
    } else {
        output_row_impl(tr, sh, m, row, out)
    }
}

/// `Y = Aᵀ M A + bias` for the tiles of one tile row and output channel `k`, written into the
/// output plane starting at `base`, clipped at the right and bottom edges.
///
/// Safety: `out` must point to the whole output and no other thread may write this tile row of
/// plane `base` (a safe fn so `simd_dispatch!` can wrap it; its callers are unsafe fns).
#[inline(always)]
fn output_row_impl<const M: usize, const A: usize>(
    tr: &Transforms<M, A>,
    sh: &ConvShape,
    m: &[f32],
    row: &OutRow,
    out: SendPtr,
) {
    let OutRow {
        k,
        t0,
        tiles,
        ty,
        bias: b,
        base,
    } = *row;
    let (h, w) = (sh.h, sh.w);
    let tw = w.div_ceil(M);
    let cout = sh.cout;
    let mut mt = [[[0f32; L]; A]; A];
    let mut t = [[[0f32; L]; A]; M];
    let mut y = [[[0f32; L]; M]; M];
    for tx0 in (0..tw).step_by(L) {
        let lanes = L.min(tw - tx0);
        for (p, vals) in mt.iter_mut().flatten().enumerate() {
            let at = (p * cout + k) * tiles + t0 + tx0;
            if lanes == L {
                vals.copy_from_slice(&m[at..at + L]);
            } else {
                vals[..lanes].copy_from_slice(&m[at..at + lanes]);
            }
        }
        mul_left(&tr.at, &mt, &mut t);
        mul_right_t(&t, &tr.at, &mut y);
        for (a, ya) in y.iter().enumerate() {
            let oy = ty * M + a;
            if oy >= h {
                break;
            }
            for (l, tx) in (tx0..tx0 + lanes).enumerate() {
                let row = base + oy * w + tx * M;
                let n = M.min(w - tx * M);
                for (bx, yab) in ya.iter().enumerate().take(n) {
                    // SAFETY: (oy, tx * M + bx) is inside the plane at `base` (bx < n), in this
                    // tile row, which only this call writes (see the function's contract).
                    unsafe { *out.0.add(row + bx) = yab[l] + b };
                }
            }
        }
    }
}

/// `Y = mat x X` where `X`'s elements are lane vectors. The matrices are constants, so once this
/// is inlined and unrolled the zero and ±1 entries cost nothing or a plain add. Each element is
/// summed in registers and stored once.
#[inline(always)]
fn mul_left<const R: usize, const K: usize, const C: usize>(
    mat: &[[f32; K]; R],
    x: &[[Lanes; C]; K],
    y: &mut [[Lanes; C]; R],
) {
    for (yr, mr) in y.iter_mut().zip(mat) {
        for (c, yc) in yr.iter_mut().enumerate() {
            let mut acc = [0f32; L];
            for (xk, &f) in x.iter().zip(mr) {
                axpy(f, &xk[c], &mut acc);
            }
            *yc = acc;
        }
    }
}

/// `Y = X x matᵀ` where `X`'s elements are lane vectors.
#[inline(always)]
fn mul_right_t<const R: usize, const K: usize, const C: usize>(
    x: &[[Lanes; K]; R],
    mat: &[[f32; K]; C],
    y: &mut [[Lanes; C]; R],
) {
    for (xr, yr) in x.iter().zip(y.iter_mut()) {
        for (yc, mc) in yr.iter_mut().zip(mat) {
            let mut acc = [0f32; L];
            for (xk, &f) in xr.iter().zip(mc) {
                axpy(f, xk, &mut acc);
            }
            *yc = acc;
        }
    }
}

/// `y += f * x`, with the multiply left out for 0 and ±1 (constants here, so the branches fold).
#[inline(always)]
fn axpy(f: f32, x: &Lanes, y: &mut Lanes) {
    if f == 0.0 {
        return;
    }
    for l in 0..L {
        y[l] += if f == 1.0 {
            x[l]
        } else if f == -1.0 {
            -x[l]
        } else {
            f * x[l]
        };
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Tensor};

    /// Seeded values in [-1, 1) from a small LCG, so the test needs no RNG crate.
    fn values(n: usize, seed: u64) -> Vec<f32> {
        let mut s = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (0..n)
            .map(|_| {
                s = s
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
            })
            .collect()
    }

    /// Winograd vs candle's direct convolution on the same weights, for one shape.
    fn check(tile: Tile, batch: usize, c: usize, cout: usize, h: usize, w: usize) -> f32 {
        let dev = Device::Cpu;
        let x = Tensor::from_vec(values(batch * c * h * w, 1), (batch, c, h, w), &dev).unwrap();
        let wt = Tensor::from_vec(values(cout * c * 9, 2), (cout, c, 3, 3), &dev).unwrap();
        let bias = values(cout, 3);
        let b = Tensor::from_vec(bias.clone(), (1, cout, 1, 1), &dev).unwrap();
        let want = x
            .conv2d(&wt, 1, 1, 1, 1)
            .unwrap()
            .broadcast_add(&b)
            .unwrap();
        let packed = wt.reshape((cout, 9 * c)).unwrap();
        let got = conv3x3(&x, &packed, &bias, tile).unwrap();
        assert_eq!(got.dims(), want.dims());
        let scale = want
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        let diff = (got - want)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        diff / scale
    }

    #[test]
    fn f4_matches_direct_convolution() {
        // Edges not a multiple of the tile, more than one lane group and chunk, odd channels.
        for (batch, c, cout, h, w) in [
            (1, 3, 5, 7, 9),
            (2, 17, 9, 13, 38),
            (1, 8, 8, 4, 4),
            (2, 32, 40, 20, 66),
            (1, 5, 3, 1, 1),
        ] {
            let rel = check(Tile::Four, batch, c, cout, h, w);
            assert!(rel < 1e-5, "F(4,3) {batch}x{c}->{cout} {h}x{w}: rel {rel}");
        }
    }

    #[test]
    fn f2_matches_direct_convolution() {
        for (batch, c, cout, h, w) in [(1, 3, 5, 7, 9), (2, 17, 9, 13, 38), (1, 5, 3, 1, 2)] {
            let rel = check(Tile::Two, batch, c, cout, h, w);
            assert!(rel < 1e-5, "F(2,3) {batch}x{c}->{cout} {h}x{w}: rel {rel}");
        }
    }

    #[test]
    fn many_tile_rows_split_into_chunks_and_threads() {
        // 64 tiles per row: 4 rows per chunk, several chunks, dealt to the threads.
        let rel = check(Tile::Four, 2, 4, 6, 37, 256);
        assert!(rel < 1e-5, "rel {rel}");
    }
}
