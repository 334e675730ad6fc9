//! Flash-style attention for NVIDIA GPUs (the `cuda` feature, Ampere or newer): one CUDA kernel,
//! compiled at run time with NVRTC, that computes `softmax(q kᵀ · scale) v` in half precision
//! on tensor cores without ever writing the `[queries, keys]` score matrix to memory.
//!
//! Why: the materialised path (`attention::scaled_dot_product_attention`'s blocks) copies q, k
//! and v into head-major order, writes every score block to memory, reads it back for the
//! softmax, writes the probabilities and reads them again for the second product. On an H100 in
//! fp16 that was 43% of the SDXL UNet step (1024x1024: 4096-token self-attention over 10 heads)
//! while the arithmetic is a few per cent of it. PyTorch's SDPA uses a fused kernel here.
//!
//! How: each block of 8 warps owns 128 queries of one (batch, head). It walks the keys in tiles
//! of 64 (32 for heads wider than 64): copies the next key and value tiles into shared memory
//! (`cp.async`) while it multiplies the current ones with `mma.sync`
//! (m16n8k16, f16 or bf16 inputs, f32 accumulation), keeps a running row maximum and sum in f32
//! (the online softmax), and rescales its f32 output accumulator as the maximum grows. Scores
//! and probabilities stay in registers; the probabilities are rounded to the input precision
//! only as operands of the second product, as PyTorch's fused kernels do. q, k, v are read in
//! place from their `[batch, tokens, heads * dim]` projections and the result is written in the
//! same layout, so no transposing copies are made. (A first version with 4 warps and no copy
//! overlap made the SDXL step 92 ms where this one makes it 60; it was dropped.)
//!
//! Head sizes 40-160 in steps of 8 cover SD 1.x (40, 80, 160), SD 2.x and SDXL (64); others
//! (the VAE's single 512-wide head), f32, pre-Ampere GPUs and odd strides take the materialised
//! path. Written by hand: candle 0.11 has no fused attention, and the crates that wrap
//! FlashAttention need nvcc and CUTLASS at build time. The source needs no CUDA headers.

use std::sync::OnceLock;

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::{DeviceRepr, LaunchConfig, PushKernelArg};
use candle_core::cuda_backend::{CudaDType, CudaDevice, WrapErr};
use candle_core::{CudaStorage, CustomOp3, DType, Layout, Result, Shape, Tensor};

const MODULE: &str = "ld_flash_attention";
/// Queries and threads per block (8 warps of 16 rows); must match the source.
const BQ: usize = 128;
const THREADS: u32 = 256;
/// Head sizes with a compiled kernel (`flash_<dtype>_d<size>` in the source).
const HEAD_DIMS: [usize; 8] = [40, 48, 64, 80, 96, 112, 128, 160];

const SOURCE: &str = r#"
typedef unsigned int u32;
typedef unsigned short u16;
#define NEG_INF __int_as_float(0xff800000)

__device__ __forceinline__ u32 ld32(const u16* p) { return *(const u32*)p; }

// Two floats rounded to one f16x2 / bf16x2 register (`lo` in the low half).
template <bool BF> __device__ __forceinline__ u32 pack2(float lo, float hi) {
    u16 a, b;
    if (BF) {
        asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(a) : "f"(lo));
        asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(b) : "f"(hi));
    } else {
        asm("cvt.rn.f16.f32 %0, %1;" : "=h"(a) : "f"(lo));
        asm("cvt.rn.f16.f32 %0, %1;" : "=h"(b) : "f"(hi));
    }
    return (u32)a | ((u32)b << 16);
}

// c += a * b for one 16x8x16 tile: a row-major 16x16, b column-major 16x8, c 16x8 in f32.
template <bool BF> __device__ __forceinline__ void mma(float* c, const u32* a, u32 b0, u32 b1) {
    if (BF) {
        asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 "
            "{%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};"
            : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
            : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
    } else {
        asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 "
            "{%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};"
            : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
            : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
    }
}

// The two registers of an 8x8 tile of `rows` (16-byte aligned row addresses from lanes 0-15),
// transposed: lane l gets rows 2*(l%4) and 2*(l%4)+1 of column l/4, for the first tile (lanes
// 0-7's rows) in `b0` and the second (lanes 8-15's rows) in `b1`.
__device__ __forceinline__ void ldmatrix_x2_trans(u32& b0, u32& b1, const u16* row) {
    u32 addr;
    asm("{ .reg .u64 t; cvta.to.shared.u64 t, %1; cvt.u32.u64 %0, t; }" : "=r"(addr) : "l"(row));
    asm volatile("ldmatrix.sync.aligned.m8n8.x2.trans.shared.b16 {%0, %1}, [%2];"
        : "=r"(b0), "=r"(b1) : "r"(addr));
}

// Fragment layouts of mma.m16n8k16 (g = lane / 4, t = lane % 4):
//   A (16x16): a[0] = row g, cols 2t..2t+1; a[1] = row g+8, same cols; a[2], a[3] = cols + 8.
//   B (16x8):  b0 = rows 2t..2t+1 of col g; b1 = rows 2t+8..2t+9.
//   C (16x8):  c[0], c[1] = row g, cols 2t..2t+1; c[2], c[3] = row g+8.
__device__ __forceinline__ u32 smem_addr(const void* p) {
    u32 a;
    asm("{ .reg .u64 t; cvta.to.shared.u64 t, %1; cvt.u32.u64 %0, t; }" : "=r"(a) : "l"(p));
    return a;
}
// 16 bytes from `src` to shared `dst`, or 16 zero bytes if `!ok` (nothing is read then).
__device__ __forceinline__ void cp16(u16* dst, const u16* src, bool ok) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;"
        :: "r"(smem_addr(dst)), "l"(src), "r"(ok ? 16 : 0) : "memory");
}

// One block: 8 warps of 16 query rows (128 queries) of one (batch, head) share each key/value
// tile; the next tile is copied into shared memory (cp.async, 16 bytes at a time) while the
// current one is used. Needs every 8-element group of q, k, v 16-byte aligned.
template <int D, int KB, bool BF>
__device__ void flash(const u16* __restrict__ q, const u16* __restrict__ k,
        const u16* __restrict__ v, u16* __restrict__ o, int sq, int sk,
        long long qb, long long qr, long long kb, long long kr, long long vb, long long vr,
        long long ob, long long orow, float scale_log2) {
    constexpr int DK = (D + 15) / 16 * 16;
    constexpr int KP = DK + 8;
    constexpr int VP = D + 8;
    constexpr int NT = 256;
    __shared__ __align__(16) u16 ks[2][KB * KP];
    __shared__ __align__(16) u16 vs[2][KB * VP];

    const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
    const int g = lane >> 2, t = lane & 3;
    const long long head = (long long)blockIdx.y * D;
    q += blockIdx.z * qb + head;
    k += blockIdx.z * kb + head;
    v += blockIdx.z * vb + head;
    o += blockIdx.z * ob + head;
    const int r0 = blockIdx.x * 128 + warp * 16 + g, r1 = r0 + 8;

    u32 qa[DK / 16][4];
#pragma unroll
    for (int s = 0; s < DK / 16; s++) {
        const int c0 = s * 16 + 2 * t, c1 = c0 + 8;
        qa[s][0] = (r0 < sq && c0 < D) ? ld32(q + r0 * qr + c0) : 0u;
        qa[s][1] = (r1 < sq && c0 < D) ? ld32(q + r1 * qr + c0) : 0u;
        qa[s][2] = (r0 < sq && c1 < D) ? ld32(q + r0 * qr + c1) : 0u;
        qa[s][3] = (r1 < sq && c1 < D) ? ld32(q + r1 * qr + c1) : 0u;
    }

    // Keys (zero past the head size up to DK, and past the last key) and values of one tile.
    auto load = [&](int buf, int k0) {
        for (int i = tid; i < KB * (DK / 8); i += NT) {
            const int r = i / (DK / 8), c = (i % (DK / 8)) * 8;
            const bool ok = k0 + r < sk && c < D;
            cp16(&ks[buf][r * KP + c], ok ? k + (k0 + r) * kr + c : k, ok);
        }
        for (int i = tid; i < KB * (D / 8); i += NT) {
            const int r = i / (D / 8), c = (i % (D / 8)) * 8;
            const bool ok = k0 + r < sk;
            cp16(&vs[buf][r * VP + c], ok ? v + (k0 + r) * vr + c : v, ok);
        }
        asm volatile("cp.async.commit_group;" ::: "memory");
    };

    float acc[D / 8][4];
#pragma unroll
    for (int n = 0; n < D / 8; n++) acc[n][0] = acc[n][1] = acc[n][2] = acc[n][3] = 0.f;
    float m0 = NEG_INF, m1 = NEG_INF, l0 = 0.f, l1 = 0.f;

    const int tiles = (sk + KB - 1) / KB;
    load(0, 0);
    for (int it = 0; it < tiles; it++) {
        const int k0 = it * KB, buf = it & 1;
        if (it + 1 < tiles) {
            load(buf ^ 1, k0 + KB);  // that buffer was released by the barrier ending it - 1
            asm volatile("cp.async.wait_group 1;" ::: "memory");
        } else {
            asm volatile("cp.async.wait_group 0;" ::: "memory");
        }
        __syncthreads();
        const u16* kt = ks[buf];
        const u16* vt = vs[buf];

        float s[KB / 8][4];
#pragma unroll
        for (int n = 0; n < KB / 8; n++) {
            s[n][0] = s[n][1] = s[n][2] = s[n][3] = 0.f;
            const u16* krow = &kt[(n * 8 + g) * KP + 2 * t];
#pragma unroll
            for (int j = 0; j < DK / 16; j++)
                mma<BF>(s[n], qa[j], ld32(krow + j * 16), ld32(krow + j * 16 + 8));
        }
        float mx0 = m0, mx1 = m1;
#pragma unroll
        for (int n = 0; n < KB / 8; n++) {
#pragma unroll
            for (int e = 0; e < 2; e++) {
                const bool valid = k0 + n * 8 + 2 * t + e < sk;
                s[n][e] = valid ? s[n][e] * scale_log2 : NEG_INF;
                s[n][2 + e] = valid ? s[n][2 + e] * scale_log2 : NEG_INF;
                mx0 = fmaxf(mx0, s[n][e]);
                mx1 = fmaxf(mx1, s[n][2 + e]);
            }
        }
        mx0 = fmaxf(mx0, __shfl_xor_sync(0xffffffffu, mx0, 1));
        mx0 = fmaxf(mx0, __shfl_xor_sync(0xffffffffu, mx0, 2));
        mx1 = fmaxf(mx1, __shfl_xor_sync(0xffffffffu, mx1, 1));
        mx1 = fmaxf(mx1, __shfl_xor_sync(0xffffffffu, mx1, 2));
        const float f0 = exp2f(m0 - mx0), f1 = exp2f(m1 - mx1);
        m0 = mx0;
        m1 = mx1;
        l0 *= f0;
        l1 *= f1;
#pragma unroll
        for (int n = 0; n < D / 8; n++) {
            acc[n][0] *= f0; acc[n][1] *= f0;
            acc[n][2] *= f1; acc[n][3] *= f1;
        }
#pragma unroll
        for (int j = 0; j < KB / 16; j++) {
            const float p00 = exp2f(s[2 * j][0] - m0), p01 = exp2f(s[2 * j][1] - m0);
            const float p10 = exp2f(s[2 * j][2] - m1), p11 = exp2f(s[2 * j][3] - m1);
            const float p02 = exp2f(s[2 * j + 1][0] - m0), p03 = exp2f(s[2 * j + 1][1] - m0);
            const float p12 = exp2f(s[2 * j + 1][2] - m1), p13 = exp2f(s[2 * j + 1][3] - m1);
            l0 += p00 + p01 + p02 + p03;
            l1 += p10 + p11 + p12 + p13;
            u32 pa[4];
            pa[0] = pack2<BF>(p00, p01);
            pa[1] = pack2<BF>(p10, p11);
            pa[2] = pack2<BF>(p02, p03);
            pa[3] = pack2<BF>(p12, p13);
            const u16* vrow = &vt[(j * 16 + (lane & 15)) * VP];
#pragma unroll
            for (int n = 0; n < D / 8; n++) {
                u32 b0, b1;
                ldmatrix_x2_trans(b0, b1, vrow + n * 8);
                mma<BF>(acc[n], pa, b0, b1);
            }
        }
        __syncthreads();  // every warp is done with `buf` before it is refilled
    }

    l0 += __shfl_xor_sync(0xffffffffu, l0, 1);
    l0 += __shfl_xor_sync(0xffffffffu, l0, 2);
    l1 += __shfl_xor_sync(0xffffffffu, l1, 1);
    l1 += __shfl_xor_sync(0xffffffffu, l1, 2);
    const float i0 = 1.f / l0, i1 = 1.f / l1;
#pragma unroll
    for (int n = 0; n < D / 8; n++) {
        const int c = n * 8 + 2 * t;
        if (r0 < sq) *(u32*)(o + r0 * orow + c) = pack2<BF>(acc[n][0] * i0, acc[n][1] * i0);
        if (r1 < sq) *(u32*)(o + r1 * orow + c) = pack2<BF>(acc[n][2] * i1, acc[n][3] * i1);
    }
}

// Two blocks per SM where 128 registers suffice; larger heads need more registers than that.
#define KERNEL(NAME, D, BF) \
extern "C" __global__ void __launch_bounds__(256, (D <= 64 ? 2 : 1)) flash_##NAME##_d##D( \
        const u16* q, const u16* k, const u16* v, u16* o, int sq, int sk, \
        long long qb, long long qr, long long kb, long long kr, long long vb, long long vr, \
        long long ob, long long orow, float scale_log2) { \
    flash<D, (D <= 64 ? 64 : 32), BF>(q, k, v, o, sq, sk, qb, qr, kb, kr, vb, vr, ob, orow, \
        scale_log2); \
}
#define SIZES(NAME, BF) \
    KERNEL(NAME, 40, BF) KERNEL(NAME, 48, BF) KERNEL(NAME, 64, BF) KERNEL(NAME, 80, BF) \
    KERNEL(NAME, 96, BF) KERNEL(NAME, 112, BF) KERNEL(NAME, 128, BF) KERNEL(NAME, 160, BF)
SIZES(f16, false)
SIZES(bf16, true)

"#;

/// The PTX (for compute capability 8.0, which `mma.sync` m16n8k16 and `ldmatrix` need),
/// compiled once per process; `Err` holds NVRTC's message.
fn ptx() -> std::result::Result<&'static str, &'static str> {
    static PTX: OnceLock<std::result::Result<String, String>> = OnceLock::new();
    PTX.get_or_init(|| {
        use candle_core::cuda_backend::cudarc::nvrtc;
        nvrtc::compile_ptx_with_opts(
            SOURCE,
            nvrtc::CompileOptions {
                name: Some("ld_flash_attention.cu".into()),
                arch: Some("compute_80"),
                ..Default::default()
            },
        )
        .map(|p| p.to_src())
        .map_err(|e| format!("{e:?}"))
    })
    .as_deref()
    .map_err(String::as_str)
}

/// Whether the kernel is used on `dev`: not with `LD_GPU_ATTN=candle` (for comparisons), not
/// before Ampere (no m16n8k16 tensor-core instruction), and not if NVRTC cannot compile it
/// here (reported once).
fn enabled(dev: &CudaDevice) -> bool {
    static ON: OnceLock<bool> = OnceLock::new();
    let wanted = *ON.get_or_init(|| {
        if std::env::var("LD_GPU_ATTN").is_ok_and(|v| v == "candle") {
            return false;
        }
        match ptx() {
            Ok(_) => true,
            Err(e) => {
                tracing::warn!("GPU attention kernel did not compile ({e}); using matrix products");
                false
            }
        }
    });
    wanted
        && dev
            .cuda_stream()
            .context()
            .compute_capability()
            .is_ok_and(|(major, _)| major >= 8)
}

/// Whether [`attention`] takes `q` `[batch, queries, heads * dim]` (and `k` like it) rather
/// than returning `None`.
pub(crate) fn handles(q: &Tensor, k: &Tensor, v: &Tensor, heads: usize) -> bool {
    let candle_core::Device::Cuda(dev) = q.device() else {
        return false;
    };
    let Some(&inner) = q.dims().last() else {
        return false;
    };
    let dtype_ok = matches!(q.dtype(), DType::F16 | DType::BF16)
        && k.dtype() == q.dtype()
        && v.dtype() == q.dtype();
    dtype_ok
        && q.rank() == 3
        && heads > 0
        && inner.is_multiple_of(heads)
        && HEAD_DIMS.contains(&(inner / heads))
        && [q, k, v].iter().all(|t| strides(t.layout()).is_some())
        && enabled(dev)
}

/// `(batch stride, row stride, start offset)` in elements if `l` is `[batch, rows, width]`
/// with unit stride along the width, and the kernel's 16-byte copies fit: strides and offset in
/// whole groups of 8 elements (projection outputs always are).
fn strides(l: &Layout) -> Option<(usize, usize, usize)> {
    let st = l.stride();
    if l.dims().len() != 3 || st[2] != 1 {
        return None;
    }
    let (bs, rs, off) = (st[0], st[1], l.start_offset());
    [bs, rs, off]
        .iter()
        .all(|x| x.is_multiple_of(8))
        .then_some((bs, rs, off))
}

/// `softmax(q kᵀ · scale) v` over `heads` heads, or `None` where [`handles`] says no.
/// Shapes are checked by the caller (`attention::scaled_dot_product_attention`).
pub(crate) fn attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    heads: usize,
    scale: f64,
) -> Option<Result<Tensor>> {
    if !handles(q, k, v, heads) {
        return None;
    }
    Some(q.apply_op3_no_bwd(
        k,
        v,
        &FlashAttention {
            heads,
            scale: scale as f32,
        },
    ))
}

struct FlashAttention {
    heads: usize,
    scale: f32,
}

impl CustomOp3 for FlashAttention {
    fn name(&self) -> &'static str {
        "ld-gpu-flash-attention"
    }

    fn cpu_fwd(
        &self,
        _: &candle_core::CpuStorage,
        _: &Layout,
        _: &candle_core::CpuStorage,
        _: &Layout,
        _: &candle_core::CpuStorage,
        _: &Layout,
    ) -> Result<(candle_core::CpuStorage, Shape)> {
        candle_core::bail!("GPU attention called with CPU tensors")
    }

    fn cuda_fwd(
        &self,
        qs: &CudaStorage,
        ql: &Layout,
        ks: &CudaStorage,
        kl: &Layout,
        vs: &CudaStorage,
        vl: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        let dev = qs.device().clone();
        let storage = match qs.dtype() {
            DType::F16 => self.launch::<half::f16>(&dev, "f16", (qs, ql), (ks, kl), (vs, vl))?,
            DType::BF16 => self.launch::<half::bf16>(&dev, "bf16", (qs, ql), (ks, kl), (vs, vl))?,
            other => candle_core::bail!("GPU attention: {other:?} is not supported"),
        };
        Ok((storage, ql.shape().clone()))
    }
}

impl FlashAttention {
    fn launch<T: CudaDType + DeviceRepr>(
        &self,
        dev: &CudaDevice,
        suffix: &str,
        (qs, ql): (&CudaStorage, &Layout),
        (ks, kl): (&CudaStorage, &Layout),
        (vs, vl): (&CudaStorage, &Layout),
    ) -> Result<CudaStorage> {
        let (b, sq, inner) = ql.shape().dims3()?;
        let (_, sk, _) = kl.shape().dims3()?;
        let d = inner / self.heads;
        let bad = || candle_core::Error::Msg("GPU attention: unsupported layout".into());
        let (qb, qr, q0) = strides(ql).ok_or_else(bad)?;
        let (kb, kr, k0) = strides(kl).ok_or_else(bad)?;
        let (vb, vr, v0) = strides(vl).ok_or_else(bad)?;
        if sq > i32::MAX as usize || sk > i32::MAX as usize || b > 65_535 || self.heads > 65_535 {
            candle_core::bail!("GPU attention: input {:?} is too large", ql.shape());
        }
        // The kernels address from the start of each view; candle's slices end where the
        // storage ends, which covers every element a strided view reaches.
        let q = qs.as_cuda_slice::<T>()?.slice(q0..);
        let k = ks.as_cuda_slice::<T>()?.slice(k0..);
        let v = vs.as_cuda_slice::<T>()?.slice(v0..);
        let ptx = ptx().map_err(|e| candle_core::Error::Msg(e.to_string()))?;
        let func = dev.get_or_load_custom_func(&format!("flash_{suffix}_d{d}"), MODULE, ptx)?;
        // SAFETY: the kernel writes every element of the output (rows < sq, all heads, all of
        // each head's columns).
        let mut out = unsafe { dev.alloc::<T>(b * sq * inner)? };
        let (sq_i, sk_i) = (sq as i32, sk as i32);
        let (qb, qr, kb, kr, vb, vr) = (
            qb as i64, qr as i64, kb as i64, kr as i64, vb as i64, vr as i64,
        );
        let (ob, orow) = ((sq * inner) as i64, inner as i64);
        let scale_log2 = self.scale * std::f32::consts::LOG2_E;
        let cfg = LaunchConfig {
            grid_dim: (sq.div_ceil(BQ) as u32, self.heads as u32, b as u32),
            block_dim: (THREADS, 1, 1),
            shared_mem_bytes: 0,
        };
        let mut l = func.builder();
        l.arg(&q);
        l.arg(&k);
        l.arg(&v);
        l.arg(&mut out);
        l.arg(&sq_i);
        l.arg(&sk_i);
        l.arg(&qb);
        l.arg(&qr);
        l.arg(&kb);
        l.arg(&kr);
        l.arg(&vb);
        l.arg(&vr);
        l.arg(&ob);
        l.arg(&orow);
        l.arg(&scale_log2);
        // SAFETY: argument types and order match `flash_*_d*`; every load
        // stays inside the views checked above (rows < sq / sk, columns < dim within the head).
        unsafe { l.launch(cfg) }.w()?;
        Ok(T::wrap_cuda_slice(out, dev.clone()))
    }
}
