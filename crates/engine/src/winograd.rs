//! Winograd convolution on the CPU for 3x3, stride-1, padding-1 layers (most of the UNet's
//! compute outside attention, nearly all of the VAE decoder's): F(4x4, 3x3) does the work of a
//! 3x3 convolution with 4x fewer multiplications than an im2col product, F(2x2, 3x3) with 2.25x.
//!
//! Written here because no maintained Rust crate offers it. The method (Lavin & Gray, "Fast
//! Algorithms for Convolutional Neural Networks", 2015): cut the output into m x m tiles; each
//! tile's (m+2) x (m+2) input patch `d` and each 3x3 filter `g` are transformed
//! (`V = Bᵀ d B`, `U = G g Gᵀ`), multiplied point by point and summed over input channels — for
//! each of the (m+2)² points that sum is one matrix product `[tiles, c_in] x [c_in, c_out]`, run
//! by our AVX-512 kernels (`avx512_gemm`, the filters packed for them as they are transformed)
//! or elsewhere by the `gemm` crate — and transformed back (`Y = Aᵀ M A`).
//!
//! The filters are transformed on every call rather than stored, so no weight is held twice in
//! memory; that costs about as much as the multiplications it saves on small feature maps, so
//! [`worth_it`] keeps those on the im2col path. Tiles are handled in chunks of whole tile rows,
//! one chunk per thread at a time, so buffers stay a few MiB however large the image; where
//! the transformed filters would be the larger part (many channels on a small map), output
//! channels are handled in blocks instead (see [`Plan`]).

use candle_core::{CpuStorage, Layout, Result, Shape, Tensor};

use crate::avx512_gemm::{self, Format};
use crate::kernels::{self, contiguous_f32, simd_dispatch, Mat, Products, SendPtr};

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
/// (torch's `[c_out, c, 3, 3]` flattened, as `resnet::Conv2d` holds it), padding 1, plus `bias`,
/// plus `residual` (of the output's shape) when given.
pub(crate) fn conv3x3(
    x: &Tensor,
    weight: &Tensor,
    bias: &[f32],
    tile: Tile,
    residual: Option<&Tensor>,
) -> Result<Tensor> {
    let op = Winograd3x3 {
        bias: bias.to_vec(),
        tile,
        plan: None,
        products: None,
    };
    kernels::with_residual(x, weight, residual, &op)
}

struct Winograd3x3 {
    bias: Vec<f32>,
    tile: Tile,
    /// How to split the work; `None`: by the sizes (tests set it to reach every path with
    /// small shapes).
    plan: Option<Plan>,
    /// The products' kernels; `None`: [`Products::current`] (tests run each kind without
    /// turning the process-wide bf16 switch).
    products: Option<Products>,
}

kernels::layer_op!(Winograd3x3, "ld-winograd3x3");

impl Winograd3x3 {
    fn run(
        &self,
        (s1, l1): (&CpuStorage, &Layout),
        (s2, l2): (&CpuStorage, &Layout),
        residual: Option<(&CpuStorage, &Layout)>,
    ) -> Result<(CpuStorage, Shape)> {
        let name = "ld-winograd3x3";
        let x = contiguous_f32(s1, l1, name)?;
        let wt = contiguous_f32(s2, l2, name)?;
        let (batch, c, h, w) = l1.shape().dims4()?;
        let (cout, kdim) = l2.shape().dims2()?;
        if kdim != 9 * c || self.bias.len() != cout || h == 0 || w == 0 || c == 0 {
            candle_core::bail!(
                "{name}: weights {:?} and bias {} do not fit input {:?}",
                l2.dims(),
                self.bias.len(),
                l1.dims()
            );
        }
        let residual = kernels::residual_of(residual, &[batch, cout, h, w], name)?;
        let ends = Ends {
            bias: &self.bias,
            residual,
        };
        let shape = ConvShape {
            batch,
            c,
            cout,
            h,
            w,
        };
        // With bf16 products, F(4x4)'s transforms (entries up to 8 and down to 1/24) magnify
        // the rounding of the transformed operands: the largest error reached 5-7% of the
        // output's scale in the test below, against 0.4% for F(2x2), which runs about as fast
        // here because its transforms are cheaper (bench --ops --bf16 on a Zen 5).
        let products = self.products.unwrap_or_else(Products::current);
        let tile = if products == Products::Avx512(Format::Bf16) {
            Tile::Two
        } else {
            self.tile
        };
        let out = match tile {
            Tile::Two => run(&F2, &shape, x, wt, ends, self.plan, products),
            Tile::Four => run(&F4, &shape, x, wt, ends, self.plan, products),
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

/// Runs `f(thread, threads)` as `threads` tasks on rayon's pool (see `kernels::par_units`), or
/// inline for one.
fn on_threads(threads: usize, f: impl Fn(usize, usize) + Sync) {
    if threads <= 1 {
        f(0, 1);
        return;
    }
    rayon::scope(|s| {
        for t in 0..threads {
            let f = &f;
            s.spawn(move |_| f(t, threads));
        }
    });
}

fn run<const M: usize, const A: usize>(
    tr: &'static Transforms<M, A>,
    sh: &ConvShape,
    x: &[f32],
    wt: &[f32],
    ends: Ends<'_>,
    plan: Option<Plan>,
    products: Products,
) -> Vec<f32> {
    let threads = candle_core::utils::get_num_threads().max(1);
    let plan = plan.unwrap_or_else(|| Plan::new(A, M, sh, threads));
    let mut out = kernels::zeros::<f32>(sh.batch * sh.cout * sh.h * sh.w);
    let job = Job {
        tr,
        sh,
        x,
        wt,
        ends,
        out: SendPtr(out.as_mut_ptr()),
        threads,
        products,
    };
    if plan.by_channel_blocks {
        by_channel_blocks(&job, &plan);
    } else {
        by_tile_chunks(&job, &plan);
    }
    out
}

/// What is added to each output as it is written: its channel's bias, and the residual's value
/// at the same place when there is one (the resnet's skip connection, which then needs no pass
/// of its own).
#[derive(Clone, Copy)]
struct Ends<'a> {
    bias: &'a [f32],
    /// `[batch, cout, h, w]`, as the output.
    residual: Option<&'a [f32]>,
}

/// One convolution's operands, shared by both work orders.
struct Job<'a, const M: usize, const A: usize> {
    tr: &'static Transforms<M, A>,
    sh: &'a ConvShape,
    x: &'a [f32],
    wt: &'a [f32],
    ends: Ends<'a>,
    /// The `[batch, cout, h, w]` output, written by disjoint parts from several threads.
    out: SendPtr,
    threads: usize,
    products: Products,
}

/// Work-space budget for one group of transformed input tiles in [`by_channel_blocks`].
const V_GROUP_BYTES: usize = 48 << 20;
/// Work space aimed at for one block of transformed filters in [`by_channel_blocks`].
const U_BLOCK_BYTES: usize = 32 << 20;

/// How one convolution is split up.
///
/// Two orders, picked by the work memory each needs (f32 counts below, `P = (m+2)²` points):
/// - By tile chunks: all filters transformed first (`P * c * cout`), then chunks of tile rows
///   (each `P * (c + cout) * tiles`, one per thread at a time). Suits large images with few
///   channels (the UNet's and VAE's top levels).
/// - By channel blocks: the input tiles transformed first (`P * c * all tiles`, in groups of at
///   most [`V_GROUP_BYTES`]), then blocks of output channels whose filters are transformed,
///   multiplied and transformed back one block per thread at a time. Suits small images with
///   many channels: the first order needs 236 MB of transformed filters for SD1.5's
///   1280-channel convolution at 32x32 (four times that layer's weights), this one 63 MB on
///   two threads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Plan {
    by_channel_blocks: bool,
    /// Tile rows per chunk.
    rows_per_chunk: usize,
    /// Chunks per input group (channel-block order only).
    chunks_per_group: usize,
    /// Output channels per block (channel-block order only).
    block: usize,
}

impl Plan {
    fn new(a: usize, m: usize, sh: &ConvShape, threads: usize) -> Self {
        let p = a * a;
        let (th, tw) = (sh.h.div_ceil(m), sh.w.div_ceil(m));
        let tile_rows = sh.batch * th;
        let all_tiles = tile_rows * tw;

        // By tile chunks: as large as the matrix kernel likes, and at least one per thread.
        // (Two per thread, as before, halved the 32x32 level's chunks to 32 tiles: on two
        // threads SD1.5's 640-channel layer there took 0.030 s against 0.023 s with one
        // 128-tile chunk each, and scaled 1.5x over one thread instead of 1.9x.)
        let rows_a = (CHUNK_TILES / tw)
            .min(tile_rows.div_ceil(threads))
            .clamp(1, tile_rows);
        let tiles_a = rows_a * tw;
        let mem_a = p * sh.c * sh.cout + threads.min(tile_rows) * p * (sh.c + sh.cout) * tiles_a;

        // By channel blocks: chunks as large as the matrix kernel likes, grouped up to the
        // budget. Output channels go in blocks of equal size (a multiple of 16), as many per
        // thread, each block's transformed filters within the budget: each block's product
        // packs the chunk's tiles again (seen in a profile as 10% of the layer with blocks of
        // 80), so blocks are as large as the budget allows, and with blocks of 240 SD1.5's
        // 1280-channel layer at 32x32 split 3 + 3 blocks on two threads where 8 blocks of 160
        // split evenly (`bench --ops`, two threads: 0.087 s against 0.079 s).
        let rows_b = (CHUNK_TILES / tw).clamp(1, tile_rows);
        let tiles_b = rows_b * tw;
        let chunks = tile_rows.div_ceil(rows_b);
        let chunks_per_group = (V_GROUP_BYTES / 4 / (p * sh.c * tiles_b)).clamp(1, chunks);
        let group_tiles = (chunks_per_group * tiles_b).min(all_tiles);
        let block_max = (U_BLOCK_BYTES / 4 / (p * sh.c)).max(16);
        let per_thread = sh.cout.div_ceil(threads * block_max);
        let block = sh
            .cout
            .div_ceil(threads * per_thread)
            .next_multiple_of(16)
            .min(sh.cout);
        let blocks = sh.cout.div_ceil(block);
        let mem_b = p * sh.c * group_tiles + threads.min(blocks) * p * block * (sh.c + tiles_b);

        // Channel blocks pack the tiles again for every block and ran slower than tile chunks
        // on one thread where the memory was close, so they are taken where they save more
        // than half of it; and on several threads where tile chunks would give each thread
        // fewer tiles than a chunk holds: each thread then multiplies its few tiles by all of
        // the transformed filters, which it streams from memory whole, where a channel block
        // streams only its own. SD1.5's 640-channel layer at 32x32 (128 tiles) on two threads
        // went 0.025 -> 0.021 s that way; the VAE's 512 channels at 64x64 (256 tiles) ran
        // alike in both orders.
        let few_tiles = threads > 1 && all_tiles < threads * CHUNK_TILES && blocks >= threads;
        let by_channel_blocks = 2 * mem_b < mem_a || few_tiles;
        Self {
            by_channel_blocks,
            rows_per_chunk: if by_channel_blocks { rows_b } else { rows_a },
            chunks_per_group,
            block,
        }
    }
}

/// The tile-chunk order (see [`Plan`]).
fn by_tile_chunks<const M: usize, const A: usize>(job: &Job<'_, M, A>, plan: &Plan) {
    let Job {
        tr,
        sh,
        x,
        wt,
        ends,
        out,
        threads,
        products,
    } = *job;
    let (c, cout) = (sh.c, sh.cout);

    let u = transformed_filters(tr, products, wt, c, cout, threads);

    let (th, tw) = (sh.h.div_ceil(M), sh.w.div_ceil(M));
    let tile_rows = sh.batch * th;
    let rows_per_chunk = plan.rows_per_chunk;
    let chunks = tile_rows.div_ceil(rows_per_chunk);
    let u = &u;
    on_threads(threads.min(chunks), |t, n| {
        let tiles = rows_per_chunk * tw;
        let mut v = vec![0f32; A * A * c * tiles];
        let mut m = vec![0f32; A * A * cout * tiles];
        let mut phases = vec![0f32; A * M * phase_stride(tw)];
        // Chunks dealt round-robin: neighbouring chunks cost the same, so threads finish together.
        for chunk in (t..chunks).step_by(n) {
            let r0 = chunk * rows_per_chunk;
            let r1 = (r0 + rows_per_chunk).min(tile_rows);
            let tiles = (r1 - r0) * tw;
            assert!(v.len() >= A * A * c * tiles);
            // SAFETY: this thread's own buffer, large enough (checked above).
            unsafe {
                let v = SendPtr(v.as_mut_ptr());
                transform_inputs(tr, sh, x, (r0, r1), 0..c, &mut phases, v);
            }
            multiply(A * A, tiles, c, cout, &v, u.as_ref(), &mut m);
            // SAFETY: chunks cover disjoint tile rows, so disjoint output pixels.
            unsafe { transform_outputs(tr, sh, sh, &m, ends, 0, r0, r1, out) };
        }
    });
}

/// The channel-block order (see [`Plan`]).
fn by_channel_blocks<const M: usize, const A: usize>(job: &Job<'_, M, A>, plan: &Plan) {
    let Job {
        tr,
        sh,
        x,
        wt,
        ends,
        out,
        threads,
        products,
    } = *job;
    let (c, cout) = (sh.c, sh.cout);
    let (th, tw) = (sh.h.div_ceil(M), sh.w.div_ceil(M));
    let tile_rows = sh.batch * th;
    let rows_per_chunk = plan.rows_per_chunk;
    let chunks = tile_rows.div_ceil(rows_per_chunk);
    // Each chunk's transformed tiles `[point][c][tiles]` take this much of the group buffer.
    let chunk_len = A * A * c * rows_per_chunk * tw;
    let block = plan.block;
    let blocks = cout.div_ceil(block);

    for group in (0..chunks).step_by(plan.chunks_per_group) {
        let in_group = plan.chunks_per_group.min(chunks - group);
        let rows = |j: usize| {
            let r0 = (group + j) * rows_per_chunk;
            (r0, (r0 + rows_per_chunk).min(tile_rows))
        };
        let mut v = kernels::zeros::<f32>(in_group * chunk_len);
        let v_ptr = SendPtr(v.as_mut_ptr());
        // Split by input channel: a group may be a single chunk (SD1.5's 32x32 level is one).
        on_threads(threads.min(c), |t, n| {
            // The whole wrapper, not its pointer field alone (which is not `Sync`).
            let v_ptr = &v_ptr;
            let chs = t * c / n..(t + 1) * c / n;
            let mut phases = vec![0f32; A * M * phase_stride(tw)];
            for j in 0..in_group {
                // SAFETY: chunk j's part of the group buffer (`chunk_len` f32s from
                // `j * chunk_len`), in which this thread writes only channels `chs`.
                unsafe {
                    let part = SendPtr(v_ptr.0.add(j * chunk_len));
                    transform_inputs(tr, sh, x, rows(j), chs.clone(), &mut phases, part);
                }
            }
        });

        let v = &v;
        on_threads(threads.min(blocks), |t, n| {
            let mut m = vec![0f32; A * A * block * rows_per_chunk * tw];
            for b in (t..blocks).step_by(n) {
                let k0 = b * block;
                let kn = block.min(cout - k0);
                let wt_block = &wt[k0 * 9 * c..(k0 + kn) * 9 * c];
                let u = transformed_filters(tr, products, wt_block, c, kn, 1);
                let sub = ConvShape { cout: kn, ..*sh };
                for j in 0..in_group {
                    let (r0, r1) = rows(j);
                    multiply(
                        A * A,
                        (r1 - r0) * tw,
                        c,
                        kn,
                        &v[j * chunk_len..],
                        u.as_ref(),
                        &mut m,
                    );
                    // SAFETY: output channels k0..k0 + kn, which only this thread writes.
                    unsafe { transform_outputs(tr, sh, &sub, &m, ends, k0, r0, r1, out) };
                }
            }
        });
    }
}

/// Entries per column phase in [`pad_phases`]: the row's tiles, one more for the columns a tile
/// shares with the next, and a spare lane group.
fn phase_stride(tw: usize) -> usize {
    tw + 1 + L
}

/// A convolution's transformed filters, as [`multiply`] takes them.
enum TransformedFilters {
    /// `[point][k][c]` f32, for the `gemm` crate.
    F32(Vec<f32>),
    /// One left operand per point (`k x c`), packed for the AVX-512 kernels as they are
    /// transformed: a plain copy would only be packed again for every chunk of tiles.
    Packed(Vec<avx512_gemm::PackedLhs>),
}

/// A borrowed [`TransformedFilters`].
#[derive(Clone, Copy)]
enum Filters<'a> {
    F32(&'a [f32]),
    Packed(&'a [avx512_gemm::PackedLhs]),
}

impl TransformedFilters {
    fn as_ref(&self) -> Filters<'_> {
        match self {
            Self::F32(u) => Filters::F32(u),
            Self::Packed(p) => Filters::Packed(p),
        }
    }
}

/// The filters `wt` (`[cout, 9 * c]`) transformed on up to `threads` threads: packed for
/// `products` where they are ours, else in f32 for the crate.
fn transformed_filters<const M: usize, const A: usize>(
    tr: &'static Transforms<M, A>,
    products: Products,
    wt: &[f32],
    c: usize,
    cout: usize,
    threads: usize,
) -> TransformedFilters {
    if let Products::Avx512(fmt) = products {
        let mut packed: Vec<_> = (0..A * A)
            .map(|_| avx512_gemm::PackedLhs::zeroed(fmt, cout, c))
            .collect();
        let ptrs = PackedPtrs(
            packed
                .iter_mut()
                .map(|p| p.data_mut().as_mut_ptr())
                .collect(),
        );
        let blocks = cout.div_ceil(avx512_gemm::MR);
        on_threads(threads.min(blocks), |t, n| {
            let blocks = (t * blocks / n, (t + 1) * blocks / n);
            // SAFETY: this thread writes only row blocks b0..b1 of every point's operand.
            unsafe { filters_packed(tr, fmt, wt, c, cout, blocks, &ptrs) };
        });
        return TransformedFilters::Packed(packed);
    }
    // U[point][k][c]: the transformed filters, c contiguous (8 channels per lane group).
    let mut u = vec![0f32; A * A * cout * c];
    let u_ptr = SendPtr(u.as_mut_ptr());
    on_threads(threads.min(cout), |t, n| {
        let (k0, k1) = (t * cout / n, (t + 1) * cout / n);
        // SAFETY: this thread writes only rows k0..k1 of every point's [cout, c] block.
        unsafe { filters(tr, wt, c, cout, k0, k1, u_ptr) };
    });
    TransformedFilters::F32(u)
}

/// The data of each point's packed operand, written by several threads in disjoint blocks.
struct PackedPtrs(Vec<*mut u32>);
// SAFETY: threads write disjoint row blocks through these (see `filters_packed`).
unsafe impl Sync for PackedPtrs {}

simd_dispatch!(filters_packed_f2(fmt: Format, wt: &[f32], c: usize, cout: usize, blocks: (usize, usize), out: &PackedPtrs) {
    filters_packed_impl(&F2, fmt, wt, c, cout, blocks, out)
});
simd_dispatch!(filters_packed_f4(fmt: Format, wt: &[f32], c: usize, cout: usize, blocks: (usize, usize), out: &PackedPtrs) {
    filters_packed_impl(&F4, fmt, wt, c, cout, blocks, out)
});

/// Transforms the filters of row blocks `b0..b1` (output channels `8 * b0..8 * b1`) straight
/// into each point's packed operand in `fmt` (`avx512_gemm::PackedLhs` layout: a lane per
/// output channel of the block, input channels one per step in f32, in pairs in bf16), so
/// each point's data is written in order.
///
/// # Safety
/// `out` holds `A * A` operands made by `PackedLhs::zeroed(fmt, cout, c)`; no other thread
/// may write blocks `b0..b1`.
unsafe fn filters_packed<const M: usize, const A: usize>(
    tr: &Transforms<M, A>,
    fmt: Format,
    wt: &[f32],
    c: usize,
    cout: usize,
    blocks: (usize, usize),
    out: &PackedPtrs,
) {
    if M == 2 {
        filters_packed_f2(fmt, wt, c, cout, blocks, out)
    } else if M == 4 {
        filters_packed_f4(fmt, wt, c, cout, blocks, out)
    } else {
        filters_packed_impl(tr, fmt, wt, c, cout, blocks, out)
    }
}

/// Body of [`filters_packed`]: a safe fn so `simd_dispatch!` can wrap it; same contract.
#[inline(always)]
fn filters_packed_impl<const M: usize, const A: usize>(
    tr: &Transforms<M, A>,
    fmt: Format,
    wt: &[f32],
    c: usize,
    cout: usize,
    (b0, b1): (usize, usize),
    out: &PackedPtrs,
) {
    const { assert!(avx512_gemm::MR == L) };
    assert!(out.0.len() == A * A && wt.len() >= cout * 9 * c);
    // Input channels per packed step.
    let depth = fmt.depth();
    let steps = c.div_ceil(depth);
    let mut g = [[[0f32; L]; 3]; 3];
    let mut gt = [[[0f32; L]; 3]; A];
    let mut even = [[[0f32; L]; A]; A];
    let mut odd = [[[0f32; L]; A]; A];
    // A run of steps' packed values, step-major (`[step][point]`), written out point by point
    // afterwards: each point's part of a run is contiguous in its operand, where writing each
    // step as it came touched 36 (F(4x4)) places half a cache line at a time.
    const RUN: usize = 16;
    let mut run = vec![[0u32; L]; RUN * A * A];
    #[cfg(target_arch = "x86_64")]
    let avx2 = std::arch::is_x86_feature_detected!("avx2");
    for b in b0..b1 {
        let lanes = L.min(cout - b * L);
        for p0 in (0..steps).step_by(RUN) {
            let len = RUN.min(steps - p0);
            for (i, packed) in run.chunks_exact_mut(A * A).take(len).enumerate() {
                let p = p0 + i;
                for (half, ut) in [&mut even, &mut odd].into_iter().enumerate().take(depth) {
                    let ch = depth * p + half;
                    if ch >= c {
                        *ut = [[[0f32; L]; A]; A];
                        continue;
                    }
                    #[cfg(target_arch = "x86_64")]
                    if avx2 && lanes == L {
                        // SAFETY: the CPU has AVX2; all 8 output channels from b * 8 exist.
                        unsafe { gather_taps(wt, c, b * L, ch, &mut g) };
                        mul_left(&tr.g, &g, &mut gt);
                        mul_right_t(&gt, &tr.g, ut);
                        continue;
                    }
                    // Lane l takes output channel b * 8 + l's nine taps of input channel `ch`.
                    for l in 0..lanes {
                        let taps = &wt[(b * L + l) * 9 * c + 9 * ch..][..9];
                        for (gv, &t) in g.iter_mut().flatten().zip(taps) {
                            gv[l] = t;
                        }
                    }
                    for gv in g.iter_mut().flatten() {
                        gv[lanes..].fill(0.0);
                    }
                    mul_left(&tr.g, &g, &mut gt);
                    mul_right_t(&gt, &tr.g, ut);
                }
                let points = packed
                    .iter_mut()
                    .zip(even.iter().flatten().zip(odd.iter().flatten()));
                match fmt {
                    Format::F32 => {
                        for (dst, (e, _)) in points {
                            *dst = e.map(f32::to_bits);
                        }
                    }
                    Format::Bf16 => {
                        for (dst, (e, o)) in points {
                            for ((d, &x), &y) in dst.iter_mut().zip(e).zip(o) {
                                *d = avx512_gemm::pair(x, y);
                            }
                        }
                    }
                }
            }
            let at = (b * steps + p0) * L;
            for (point, &base) in out.0.iter().enumerate() {
                // SAFETY: steps p0..p0 + len of block b lie in the operand (`b < blocks`,
                // `p0 + len <= steps`), and only this thread writes block b (the caller's
                // contract).
                let dst = unsafe { std::slice::from_raw_parts_mut(base.add(at), len * L) };
                for (d, i) in dst.chunks_exact_mut(L).zip(0..len) {
                    d.copy_from_slice(&run[i * A * A + point]);
                }
            }
        }
    }
}

/// The nine taps of input channel `ch` for output channels `k0..k0 + 8` of `wt`
/// (`[cout, 9 * c]`) into `g`, lane `l` from channel `k0 + l`: eight taps of each row loaded as
/// vectors and transposed in registers, the ninth gathered. Written lane by lane, the vector
/// reads that followed waited on eight separate stores each (no store forwarding), and the
/// filter transform took a quarter of a 640-channel convolution.
///
/// # Safety
/// The CPU must have AVX2; output channels `k0..k0 + 8` and input channel `ch` must exist.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn gather_taps(wt: &[f32], c: usize, k0: usize, ch: usize, g: &mut [[Lanes; 3]; 3]) {
    use std::arch::x86_64::*;
    assert!((k0 + L) * 9 * c <= wt.len() && ch < c);
    let row = |l: usize| wt.as_ptr().add((k0 + l) * 9 * c + 9 * ch);
    let mut rows = [_mm256_setzero_ps(); L];
    for (l, r) in rows.iter_mut().enumerate() {
        *r = _mm256_loadu_ps(row(l));
    }
    let taps = crate::avx512_gemm::transpose8(rows);
    for (t, v) in taps.iter().enumerate() {
        _mm256_storeu_ps(g[t / 3][t % 3].as_mut_ptr(), *v);
    }
    for (l, x) in g[2][2].iter_mut().enumerate() {
        *x = *row(l).add(8);
    }
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
                        copy_part(v.as_ptr(), u.0.add(at), lanes)
                    }
                };
            }
        }
    }
}

/// `V = Bᵀ d B` for input channels `chs` of tile rows `r0..r1` (row index = image * tile rows
/// per image + tile row) into `v` (`[point][c][tile]`, the chunk's tiles only).
///
/// # Safety
/// `v` must point to `A * A * c * (r1 - r0) * tw` f32s; no other thread may access the entries
/// of channels `chs` meanwhile.
#[allow(clippy::too_many_arguments)]
unsafe fn transform_inputs<const M: usize, const A: usize>(
    tr: &Transforms<M, A>,
    sh: &ConvShape,
    x: &[f32],
    (r0, r1): (usize, usize),
    chs: std::ops::Range<usize>,
    phases: &mut [f32],
    v: SendPtr,
) {
    let c = sh.c;
    let (th, tw) = (sh.h.div_ceil(M), sh.w.div_ceil(M));
    let tiles = (r1 - r0) * tw;
    for ch in chs {
        for r in r0..r1 {
            let (img, ty) = (r / th, r % th);
            let plane = &x[(img * c + ch) * sh.h * sh.w..][..sh.h * sh.w];
            pad_phases::<M, A>(plane, sh.h, sh.w, ty, phase_stride(tw), phases);
            // SAFETY: the caller's contract; `(r - r0) * tw + tw <= tiles`.
            unsafe { input_row(tr, phases, tw, (r - r0) * tw, ch, c, tiles, v) };
        }
    }
}

/// The point-wise products summed over input channels: for each of the `points` points,
/// `m[p] = v[p] u[p]`, `[tiles, c] x [c, k] -> [tiles, k]`, all stored column-major (tiles
/// contiguous), the layout gemm's kernel reads and writes without transposing. `v` is
/// `[point][c][tile]`, `u` `[point][k][c]` (or packed for the AVX-512 kernels), `m`
/// `[point][k][tile]`.
fn multiply(points: usize, tiles: usize, c: usize, k: usize, v: &[f32], u: Filters, m: &mut [f32]) {
    assert!(
        v.len() >= points * c * tiles && m.len() >= points * k * tiles,
        "winograd: work buffers too small"
    );
    let u = match u {
        Filters::F32(u) => u,
        Filters::Packed(packed) => {
            assert!(
                packed.len() == points && packed.iter().all(|a| a.dims() == (k, c)),
                "winograd: one packed k x c filter set per point"
            );
            for (p, a) in packed.iter().enumerate() {
                // SAFETY: checked above: v block p is `c` rows of `tiles` and m block p `k`
                // rows of `tiles`, each inside its buffer; `a` is `k x c` (checked too), and it
                // exists only where the CPU runs its format.
                unsafe {
                    avx512_gemm::gemm_packed_lhs(
                        tiles,
                        Mat::row_major(m.as_mut_ptr().add(p * k * tiles), tiles),
                        false,
                        a,
                        Mat::row_major(v.as_ptr().add(p * c * tiles), tiles),
                    );
                }
            }
            return;
        }
    };
    assert!(
        u.len() >= points * k * c,
        "winograd: filter buffer too small"
    );
    for p in 0..points {
        // SAFETY: checked above: v block p is `c` columns of `tiles`, u block p is `k` columns
        // of `c`, m block p is `k` columns of `tiles`, each inside its buffer.
        unsafe {
            // The f32 filters are made for the crate's kernels (`transformed_filters`).
            kernels::gemm_single(
                Products::Crate,
                (tiles, k, c),
                Mat {
                    ptr: m.as_mut_ptr().add(p * k * tiles),
                    rs: 1,
                    cs: tiles as isize,
                },
                false,
                Mat {
                    ptr: v.as_ptr().add(p * c * tiles),
                    rs: 1,
                    cs: tiles as isize,
                },
                Mat {
                    ptr: u.as_ptr().add(p * k * c),
                    rs: 1,
                    cs: c as isize,
                },
            );
        }
    }
}

/// `Y = Aᵀ M A + bias (+ residual)` for tile rows `r0..r1` of the `sub.cout` output channels from `k0`
/// that `m` holds (as [`multiply`] left it), in the whole output of shape `sh` (`sub` is `sh`
/// when `m` holds every channel).
///
/// # Safety
/// `out` must point to the `[batch, sh.cout, h, w]` output; no other thread may write these
/// tiles of channels `k0..k0 + sub.cout`.
#[allow(clippy::too_many_arguments)]
unsafe fn transform_outputs<const M: usize, const A: usize>(
    tr: &Transforms<M, A>,
    sh: &ConvShape,
    sub: &ConvShape,
    m: &[f32],
    ends: Ends<'_>,
    k0: usize,
    r0: usize,
    r1: usize,
    out: SendPtr,
) {
    let (th, tw) = (sh.h.div_ceil(M), sh.w.div_ceil(M));
    let tiles = (r1 - r0) * tw;
    assert!(
        m.len() >= A * A * sub.cout * tiles && k0 + sub.cout <= sh.cout,
        "winograd: products buffer too small"
    );
    for (k, &b) in ends.bias[k0..k0 + sub.cout].iter().enumerate() {
        for r in r0..r1 {
            let (img, ty) = (r / th, r % th);
            let row = OutRow {
                k,
                t0: (r - r0) * tw,
                tiles,
                ty,
                bias: b,
                residual: ends.residual,
                base: (img * sh.cout + k0 + k) * sh.h * sh.w,
            };
            // SAFETY: writes only these tiles of output plane (img, k0 + k): the caller's
            // contract.
            unsafe { output_row(tr, sub, m, &row, out) };
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

simd_dispatch!(input_row_f2(rows: &[f32], tw: usize, t0: usize, ch: usize, c: usize, tiles: usize, v: SendPtr) {
    input_row_impl(&F2, rows, tw, t0, ch, c, tiles, v)
});
simd_dispatch!(input_row_f4(rows: &[f32], tw: usize, t0: usize, ch: usize, c: usize, tiles: usize, v: SendPtr) {
    input_row_impl(&F4, rows, tw, t0, ch, c, tiles, v)
});

/// Dispatches to the AVX2-compiled transform for this tile size.
///
/// # Safety
/// As [`input_row_impl`].
#[allow(clippy::too_many_arguments)]
unsafe fn input_row<const M: usize, const A: usize>(
    tr: &Transforms<M, A>,
    rows: &[f32],
    tw: usize,
    t0: usize,
    ch: usize,
    c: usize,
    tiles: usize,
    v: SendPtr,
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
/// tiles `t0..t0 + tw` of `v` (`[A*A][c][tiles]`). Written through a pointer so threads can
/// fill different channels of one buffer.
///
/// Safety: `v` must point to `A * A * c * tiles` f32s with `t0 + tw <= tiles`, and no other
/// thread may access channel `ch`'s entries meanwhile (a safe fn so `simd_dispatch!` can wrap
/// it; its callers are unsafe fns).
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
    v: SendPtr,
) {
    assert!(
        t0 + tw <= tiles && ch < c,
        "winograd: tile row outside the buffer"
    );
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
            // SAFETY: `at + lanes <= (p * c + ch + 1) * tiles`, inside the buffer (checked
            // above), in channel ch's entries, which only this thread writes.
            unsafe {
                if lanes == L {
                    std::ptr::copy_nonoverlapping(vals.as_ptr(), v.0.add(at), L);
                } else {
                    copy_part(vals.as_ptr(), v.0.add(at), lanes);
                }
            }
        }
    }
}

/// Copies the lanes of a partial lane group, kept out of line on purpose: written inline beside
/// the full group's fixed 8-lane copy, the compiler merged the two into one variable-length
/// `memcpy` call, so every full group (nearly all of them) paid for a library call too. That
/// call was 10% of a Winograd convolution's time in a profile.
#[inline(never)]
fn copy_slice_part(src: &[f32], dst: &mut [f32]) {
    dst.copy_from_slice(src);
}

/// [`copy_slice_part`] for raw pointers.
///
/// # Safety
/// As `std::ptr::copy_nonoverlapping(src, dst, n)`.
#[inline(never)]
unsafe fn copy_part(src: *const f32, dst: *mut f32, n: usize) {
    // SAFETY: the caller's contract.
    unsafe { std::ptr::copy_nonoverlapping(src, dst, n) }
}

/// Where one tile row of one output channel comes from and goes to.
#[derive(Clone, Copy)]
struct OutRow<'a> {
    /// Output channel.
    k: usize,
    /// The row's first tile within the chunk, and the chunk's tile count.
    t0: usize,
    tiles: usize,
    /// Tile row within the image.
    ty: usize,
    bias: f32,
    /// The whole residual, of the output's shape, when one is added.
    residual: Option<&'a [f32]>,
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
        residual,
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
                copy_slice_part(&m[at..at + lanes], &mut vals[..lanes]);
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
                // The residual's values at these output places (zeros when there is none).
                let mut r = [0f32; M];
                if let Some(res) = residual {
                    r[..n].copy_from_slice(&res[row..row + n]);
                }
                for (bx, yab) in ya.iter().enumerate().take(n) {
                    // SAFETY: (oy, tx * M + bx) is inside the plane at `base` (bx < n), in this
                    // tile row, which only this call writes (see the function's contract).
                    unsafe { *out.0.add(row + bx) = yab[l] + b + r[bx] };
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

    /// Winograd vs candle's direct convolution on the same weights, for one shape: the worst
    /// relative difference over every f32 kind of products this CPU runs.
    fn check(tile: Tile, batch: usize, c: usize, cout: usize, h: usize, w: usize) -> f32 {
        f32_kinds()
            .into_iter()
            .map(|p| check_planned(tile, batch, c, cout, h, w, None, p))
            .fold(0.0, f32::max)
    }

    /// The f32 products this CPU runs: the crate's, and ours where it has AVX-512.
    fn f32_kinds() -> Vec<Products> {
        Products::available()
            .into_iter()
            .filter(|p| *p != Products::Avx512(Format::Bf16))
            .collect()
    }

    /// [`check`] with the work split and the products given.
    #[allow(clippy::too_many_arguments)]
    fn check_planned(
        tile: Tile,
        batch: usize,
        c: usize,
        cout: usize,
        h: usize,
        w: usize,
        plan: Option<Plan>,
        products: Products,
    ) -> f32 {
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
        let op = Winograd3x3 {
            bias: bias.clone(),
            tile,
            plan,
            products: Some(products),
        };
        let got = x.apply_op2_no_bwd(&packed, &op).unwrap();
        let rel = relative_difference(&got, &want);
        // With a residual (the resnet's skip connection), added as each output is written.
        let residual = Tensor::from_vec(values(want.elem_count(), 4), want.dims(), &dev).unwrap();
        let got = x.apply_op3_no_bwd(&packed, &residual, &op).unwrap();
        rel.max(relative_difference(&got, &(want + residual).unwrap()))
    }

    /// The largest difference between `got` and `want` over `want`'s largest magnitude.
    fn relative_difference(got: &Tensor, want: &Tensor) -> f32 {
        assert_eq!(got.dims(), want.dims());
        let max = |t: Tensor| {
            t.abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap()
        };
        max((got - want).unwrap()) / max(want.clone())
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
    fn both_work_orders_match_direct_convolution() {
        // (tile, batch, c, cout, h, w, rows per chunk, chunks per group, channels per block):
        // several chunks and groups, a last chunk with fewer rows, a last block with fewer
        // channels, one block for all, and F(2x2, 3x3).
        for (tile, batch, c, cout, h, w, rows, group, block) in [
            (Tile::Four, 2, 17, 40, 13, 38, 1, 2, 16),
            (Tile::Four, 1, 9, 33, 23, 20, 2, 1, 8),
            (Tile::Four, 2, 8, 5, 8, 8, 3, 5, 5),
            (Tile::Two, 1, 12, 21, 9, 14, 2, 2, 16),
            (Tile::Four, 1, 5, 3, 1, 1, 1, 1, 3),
        ] {
            for by_channel_blocks in [false, true] {
                let plan = Plan {
                    by_channel_blocks,
                    rows_per_chunk: rows,
                    chunks_per_group: group,
                    block,
                };
                let rel = f32_kinds()
                    .into_iter()
                    .map(|p| check_planned(tile, batch, c, cout, h, w, Some(plan), p))
                    .fold(0.0, f32::max);
                assert!(
                    rel < 1e-5,
                    "{plan:?} {tile:?} {batch}x{c}->{cout} {h}x{w}: rel {rel}"
                );
            }
        }
    }

    /// With bf16 products on, the filters are transformed straight into packed bf16 operands
    /// (both work orders, channel counts not multiples of the lane groups, F(4x4) asked for
    /// and F(2x2) run instead): the result stays within bf16 rounding of the direct
    /// convolution, and differs from the f32 result (so the bf16 path did run).
    #[test]
    fn bf16_filters_packed_as_transformed_match_direct_convolution() {
        if !Format::Bf16.supported() {
            eprintln!("skipped: this CPU has no AVX-512 BF16");
            return;
        }
        let bf16 = Products::Avx512(Format::Bf16);
        for (tile, batch, c, cout, h, w, rows, group, block) in [
            (Tile::Four, 2, 17, 40, 13, 38, 1, 2, 16),
            (Tile::Four, 1, 9, 33, 23, 20, 2, 1, 8),
            (Tile::Two, 1, 12, 21, 9, 14, 2, 2, 16),
            (Tile::Four, 1, 5, 3, 1, 1, 1, 1, 3),
        ] {
            for by_channel_blocks in [false, true] {
                let plan = Plan {
                    by_channel_blocks,
                    rows_per_chunk: rows,
                    chunks_per_group: group,
                    block,
                };
                let rel = check_planned(tile, batch, c, cout, h, w, Some(plan), bf16);
                // Operands rounded to 8 bits of mantissa (relative 2^-9 each), summed over
                // 9 * c products of mixed signs: under 1% of the largest output (F(4x4) in
                // bf16 gave 7%).
                assert!(
                    rel > 1e-6 && rel < 1e-2,
                    "{plan:?} {tile:?} {batch}x{c}->{cout} {h}x{w}: rel {rel}"
                );
            }
        }
    }

    #[test]
    fn the_plan_bounds_the_work_memory_of_deep_layers() {
        let shape = |batch, c, cout, h| ConvShape {
            batch,
            c,
            cout,
            h,
            w: h,
        };
        // SD1.5 at 512x512, batch 2 (guidance): the 64x64 level keeps the tile-chunk order
        // (256 tiles per thread); on two threads the 640 channels at 32x32 (128 tiles) and
        // the VAE's 512 at 64x64 (256) take channel blocks, one per thread, where one thread
        // alone keeps tile chunks; the 1280-channel convolution at 32x32 takes channel blocks
        // on any number of threads, each block's filters within U_BLOCK_BYTES, and as many
        // blocks per thread.
        assert!(!Plan::new(6, 4, &shape(2, 320, 320, 64), 2).by_channel_blocks);
        for (c, h, batch) in [(640, 32, 2), (512, 64, 1)] {
            let two = Plan::new(6, 4, &shape(batch, c, c, h), 2);
            assert!(two.by_channel_blocks && two.block == c / 2, "{two:?}");
            assert!(!Plan::new(6, 4, &shape(batch, c, c, h), 1).by_channel_blocks);
        }
        for threads in [1, 2, 3] {
            let deep = Plan::new(6, 4, &shape(2, 1280, 1280, 32), threads);
            assert!(deep.by_channel_blocks, "{deep:?}");
            assert_eq!(deep.chunks_per_group, 1);
            assert!(36 * 1280 * deep.block * 4 <= U_BLOCK_BYTES, "{deep:?}");
            assert_eq!(deep.block % 16, 0);
            assert_eq!(1280usize.div_ceil(deep.block) % threads, 0, "{deep:?}");
        }
        // SDXL's 1920-channel input at 64x64: the transformed tiles go in groups under budget.
        let wide = Plan::new(6, 4, &shape(2, 1920, 640, 64), 2);
        assert!(wide.by_channel_blocks, "{wide:?}");
        let tiles = wide.rows_per_chunk * 16;
        assert!(
            wide.chunks_per_group == 1
                || 36 * 1920 * tiles * wide.chunks_per_group * 4 <= V_GROUP_BYTES
        );
    }

    #[test]
    fn many_tile_rows_split_into_chunks_and_threads() {
        // 64 tiles per row: 4 rows per chunk, several chunks, dealt to the threads.
        let rel = check(Tile::Four, 2, 4, 6, 37, 256);
        assert!(rel < 1e-5, "rel {rel}");
    }
}
