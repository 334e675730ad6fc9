//! cuDNN convolutions for NVIDIA GPUs (the `cudnn` feature), used by `resnet::Conv2d` in place
//! of candle's.
//!
//! Why our own call rather than candle 0.11's `conv2d`, measured on an H100 (fp16):
//! - candle asks cuDNN's legacy heuristic (`GetConvolutionForwardAlgorithm_v7`) on every call
//!   and takes its first answer; forcing implicit-precomp GEMM alone made the SD1.5 UNet step
//!   2.9x faster (303 -> 106 ms). Here the algorithm is implicit-precomp GEMM unless
//!   `LD_CUDNN_ALGO` says otherwise. Measuring each shape once with cuDNN's Find (PyTorch's
//!   `cudnn.benchmark`), also here as `LD_CUDNN_ALGO=find`, gave the same UNet step but picked
//!   slower algorithms for the VAE's large convolutions: decode 24 vs 14 ms (SD1.5 512) and
//!   285 vs 61 ms (SDXL 1024).
//! - candle runs f16 convolutions with an f16 compute type (f16 accumulation); PyTorch, and so
//!   the references, accumulate in f32. Here half-precision inputs always accumulate in f32,
//!   on tensor cores (asked for explicitly, as PyTorch does).
//! - candle builds four descriptors and allocates a zeroed workspace per call, then adds the bias
//!   as a separate broadcast op; here descriptors live with the cached plan, one workspace per
//!   device is reused, and the bias is added in place (`cudnnAddTensor`).
//!
//! Written against cudarc's raw cuDNN bindings because its safe wrappers keep the descriptors
//! private, and the cache, the AddTensor call and Find need them.

use std::cell::RefCell;
use std::collections::HashMap;
use std::ffi::c_void;

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::cudnn::{result, sys, CudnnError};
use candle_core::cuda_backend::cudarc::driver::{
    CudaSlice, CudaStream, DevicePtr, DevicePtrMut, DeviceRepr,
};
use candle_core::cuda_backend::{CudaDType, CudaDevice, DeviceId};
use candle_core::{CudaStorage, CustomOp3, DType, Layout, Result, Shape, Tensor};

/// Workspace offered to cuDNN's Find call. Large enough for the fast algorithms at SDXL sizes;
/// algorithms that want more (some FFT variants want gigabytes) are skipped.
const FIND_WORKSPACE: usize = 256 << 20;

/// `y = conv2d(x, w) + b` on a CUDA device (x `[n, c, h, w]`, w `[k, c, r, r]`, b `[k]`, all of
/// the same float dtype).
pub(crate) fn conv2d(
    x: &Tensor,
    w: &Tensor,
    b: &Tensor,
    stride: usize,
    padding: usize,
) -> Result<Tensor> {
    let x = x.contiguous()?;
    x.apply_op3_no_bwd(w, b, &CudnnConv { stride, padding })
}

/// Whether convolutions on CUDA devices use [`conv2d`] (the default) or candle's; `LD_GPU_CONV=candle`
/// picks candle's, for comparisons.
pub(crate) fn enabled() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| std::env::var("LD_GPU_CONV").map_or(true, |v| v != "candle"))
}

struct CudnnConv {
    stride: usize,
    padding: usize,
}

impl CustomOp3 for CudnnConv {
    fn name(&self) -> &'static str {
        "cudnn-conv2d"
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
        candle_core::bail!("cudnn conv2d: the input is on the CPU; this layer was loaded for a GPU")
    }

    fn cuda_fwd(
        &self,
        xs: &CudaStorage,
        xl: &Layout,
        ws: &CudaStorage,
        wl: &Layout,
        bs: &CudaStorage,
        bl: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        let (n, c, h, w) = xl.shape().dims4()?;
        let (k, wc, r, r2) = wl.shape().dims4()?;
        if wc != c || r != r2 || bl.shape().elem_count() != k {
            candle_core::bail!(
                "cudnn conv2d: input {:?}, weight {:?} and bias {:?} do not fit together",
                xl.shape(),
                wl.shape(),
                bl.shape()
            );
        }
        let (ho, wo) = (
            (h + 2 * self.padding).saturating_sub(r) / self.stride + 1,
            (w + 2 * self.padding).saturating_sub(r) / self.stride + 1,
        );
        let key = Key {
            dtype: xs.dtype(),
            dims: [n, c, h, w, k, r, self.stride, self.padding],
        };
        let dev = xs.device().clone();
        let storage = match key.dtype {
            DType::F16 => {
                run::<half::f16>(&dev, key, (xs, xl), (ws, wl), (bs, bl), n * k * ho * wo)?
            }
            DType::BF16 => {
                run::<half::bf16>(&dev, key, (xs, xl), (ws, wl), (bs, bl), n * k * ho * wo)?
            }
            DType::F32 => run::<f32>(&dev, key, (xs, xl), (ws, wl), (bs, bl), n * k * ho * wo)?,
            other => candle_core::bail!("cudnn conv2d: {other:?} tensors are not supported"),
        };
        Ok((storage, Shape::from((n, k, ho, wo))))
    }
}

/// What a cached plan depends on: dtype, then n, c, h, w, out channels, kernel, stride, padding.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct Key {
    dtype: DType,
    dims: [usize; 8],
}

/// A contiguous view of a custom op's input, checked against its layout.
fn view<'a, T: CudaDType>(
    s: &'a CudaStorage,
    l: &Layout,
) -> Result<candle_core::cuda_backend::cudarc::driver::CudaView<'a, T>> {
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(s.as_cuda_slice::<T>()?.slice(a..b)),
        None => candle_core::bail!("cudnn conv2d: expects contiguous tensors"),
    }
}

fn run<T: CudaDType + DeviceRepr>(
    dev: &CudaDevice,
    key: Key,
    (xs, xl): (&CudaStorage, &Layout),
    (ws, wl): (&CudaStorage, &Layout),
    (bs, bl): (&CudaStorage, &Layout),
    out_len: usize,
) -> Result<CudaStorage> {
    let x = view::<T>(xs, xl)?;
    let w = view::<T>(ws, wl)?;
    let b = view::<T>(bs, bl)?;
    // SAFETY: every element is written by the convolution below before anyone reads it.
    let mut y = unsafe { dev.alloc::<T>(out_len)? };
    let stream = dev.cuda_stream();
    STATE.with(|state| -> Result<()> {
        let mut state = state.borrow_mut();
        let st = match state.entry(dev.id()) {
            std::collections::hash_map::Entry::Occupied(e) => e.into_mut(),
            std::collections::hash_map::Entry::Vacant(e) => e.insert(DeviceState::new(dev)?),
        };
        let handle = st.handle.0;
        let (xp, _gx) = x.device_ptr(&stream);
        let (wp, _gw) = w.device_ptr(&stream);
        let (bp, _gb) = b.device_ptr(&stream);
        let (yp, _gy) = y.device_ptr_mut(&stream);
        let plan = match st.plans.entry(key) {
            std::collections::hash_map::Entry::Occupied(e) => e.into_mut(),
            std::collections::hash_map::Entry::Vacant(e) => {
                e.insert(Plan::new(handle, key, dev, (xp, wp, yp))?)
            }
        };
        // A failed launch is tried once more (cuDNN reports a CUDA runtime error left pending
        // by an earlier call, e.g. an algorithm that failed while Find timed it, on the next
        // call that checks), then with the fallback algorithm, before it becomes an error.
        let mut attempt = 0;
        loop {
            if plan.workspace > st.workspace.as_ref().map_or(0, |s| s.len()) {
                // A buffer allocated while a CUDA graph records would belong to that graph; the
                // recording fails instead and the step runs eagerly (the warm-up sized it).
                if crate::cuda_graph::recording(&stream) {
                    candle_core::bail!("cuDNN's workspace would grow while a CUDA graph records");
                }
                // Grown to the largest need seen; freed in stream order, so reuse is safe.
                st.workspace = Some(unsafe { dev.alloc::<u8>(plan.workspace)? });
                // A recorded CUDA graph that read the old buffer must not be replayed.
                WORKSPACE_EPOCH.with(|e| e.set(e.get() + 1));
            }
            let ws = match st.workspace.as_mut() {
                Some(buf) if plan.workspace > 0 => Some(buf),
                _ => None,
            };
            match plan.launch(handle, &stream, (xp, wp, bp, yp), ws) {
                Ok(()) => return Ok(()),
                Err(e) if attempt < 2 => {
                    tracing::debug!("cuDNN convolution {key:?} failed ({e:?}); trying again");
                    if attempt == 1 {
                        plan.fall_back(handle)?;
                    }
                }
                Err(e) => return Err(e.into()),
            }
            attempt += 1;
        }
    })?;
    Ok(T::wrap_cuda_slice(y, dev.clone()))
}

thread_local! {
    /// cuDNN handles are not thread-safe: one per thread and device, with its plans.
    static STATE: RefCell<HashMap<DeviceId, DeviceState>> = RefCell::new(HashMap::new());
    /// How many times this thread's workspace was replaced (`cuda_graph` checks it).
    static WORKSPACE_EPOCH: std::cell::Cell<u64> = const { std::cell::Cell::new(0) };
}

/// This thread's workspace generation: it changes whenever a workspace buffer is replaced.
pub(crate) fn workspace_epoch() -> u64 {
    WORKSPACE_EPOCH.with(|e| e.get())
}

struct DeviceState {
    handle: Handle,
    plans: HashMap<Key, Plan>,
    workspace: Option<CudaSlice<u8>>,
}

impl DeviceState {
    fn new(dev: &CudaDevice) -> Result<Self> {
        let stream = dev.cuda_stream();
        stream
            .context()
            .bind_to_thread()
            .map_err(candle_core::Error::wrap)?;
        let handle = Handle(result::create_handle()?);
        // SAFETY: a live handle and the device's own stream.
        unsafe { result::set_stream(handle.0, stream.cu_stream() as sys::cudaStream_t)? };
        Ok(Self {
            handle,
            plans: HashMap::new(),
            workspace: None,
        })
    }
}

struct Handle(sys::cudnnHandle_t);
impl Drop for Handle {
    fn drop(&mut self) {
        // SAFETY: created by `create_handle`, destroyed once.
        let _ = unsafe { result::destroy_handle(self.0) };
    }
}

struct TensorDesc(sys::cudnnTensorDescriptor_t);
impl Drop for TensorDesc {
    fn drop(&mut self) {
        // SAFETY: created by `create_tensor_descriptor`, destroyed once.
        let _ = unsafe { result::destroy_tensor_descriptor(self.0) };
    }
}

struct FilterDesc(sys::cudnnFilterDescriptor_t);
impl Drop for FilterDesc {
    fn drop(&mut self) {
        // SAFETY: created by `create_filter_descriptor`, destroyed once.
        let _ = unsafe { result::destroy_filter_descriptor(self.0) };
    }
}

struct ConvDesc(sys::cudnnConvolutionDescriptor_t);
impl Drop for ConvDesc {
    fn drop(&mut self) {
        // SAFETY: created by `create_convolution_descriptor`, destroyed once.
        let _ = unsafe { result::destroy_convolution_descriptor(self.0) };
    }
}

fn tensor_desc(dtype: sys::cudnnDataType_t, dims: [usize; 4]) -> Result<TensorDesc> {
    let d = TensorDesc(result::create_tensor_descriptor()?);
    // SAFETY: a freshly created descriptor.
    unsafe {
        result::set_tensor4d_descriptor(
            d.0,
            sys::cudnnTensorFormat_t::CUDNN_TENSOR_NCHW,
            dtype,
            dims.map(|v| v as i32),
        )?
    };
    Ok(d)
}

/// Descriptors and the chosen algorithm for one layer shape.
struct Plan {
    x: TensorDesc,
    w: FilterDesc,
    y: TensorDesc,
    bias: TensorDesc,
    conv: ConvDesc,
    algo: sys::cudnnConvolutionFwdAlgo_t,
    /// The math type asked for before Find (kept for the fallback).
    math: sys::cudnnMathType_t,
    workspace: usize,
}

impl Plan {
    /// Builds the descriptors and picks the algorithm, running the candidates on the live
    /// buffers (`y` is overwritten by the real convolution right after).
    fn new(
        handle: sys::cudnnHandle_t,
        key: Key,
        dev: &CudaDevice,
        (xp, wp, yp): (u64, u64, u64),
    ) -> Result<Self> {
        use sys::cudnnDataType_t as D;
        let [n, c, h, w, k, r, stride, pad] = key.dims;
        let data = match key.dtype {
            DType::F16 => D::CUDNN_DATA_HALF,
            DType::BF16 => D::CUDNN_DATA_BFLOAT16,
            _ => D::CUDNN_DATA_FLOAT,
        };
        let (ho, wo) = (
            (h + 2 * pad - r) / stride + 1,
            (w + 2 * pad - r) / stride + 1,
        );
        // As PyTorch sets them: half precision asks for tensor cores explicitly (cuDNN's default
        // math allows them for TF32 only, and half convolutions then ran several times slower);
        // f32 keeps the default, TF32 allowed unless NVIDIA_TF32_OVERRIDE=0. Never
        // down-conversion of f32 inputs to f16.
        let math = match key.dtype {
            DType::F16 | DType::BF16 => sys::cudnnMathType_t::CUDNN_TENSOR_OP_MATH,
            _ => sys::cudnnMathType_t::CUDNN_DEFAULT_MATH,
        };
        let x = tensor_desc(data, [n, c, h, w])?;
        let y = tensor_desc(data, [n, k, ho, wo])?;
        let bias = tensor_desc(data, [1, k, 1, 1])?;
        let wd = FilterDesc(result::create_filter_descriptor()?);
        let conv = ConvDesc(result::create_convolution_descriptor()?);
        // SAFETY: fresh descriptors; f32 is the compute type for every data type (f32
        // accumulation for f16/bf16, as PyTorch does).
        unsafe {
            result::set_filter4d_descriptor(
                wd.0,
                data,
                sys::cudnnTensorFormat_t::CUDNN_TENSOR_NCHW,
                [k, c, r, r].map(|v| v as i32),
            )?;
            result::set_convolution2d_descriptor(
                conv.0,
                pad as i32,
                pad as i32,
                stride as i32,
                stride as i32,
                1,
                1,
                sys::cudnnConvolutionMode_t::CUDNN_CROSS_CORRELATION,
                D::CUDNN_DATA_FLOAT,
            )?;
            result::set_convolution_math_type(conv.0, math)?;
        }
        let mut plan = Self {
            x,
            w: wd,
            y,
            bias,
            conv,
            algo: sys::cudnnConvolutionFwdAlgo_t::CUDNN_CONVOLUTION_FWD_ALGO_IMPLICIT_PRECOMP_GEMM,
            math,
            workspace: 0,
        };
        match choice() {
            Choice::Fixed(algo) => plan.algo = algo,
            Choice::Heuristic => plan.algo = plan.heuristic(handle)?,
            Choice::Find => plan.find(handle, dev, (xp, wp, yp))?,
        }
        // SAFETY: live handle and descriptors.
        plan.workspace = unsafe {
            result::get_convolution_forward_workspace_size(
                handle,
                plan.x.0,
                plan.w.0,
                plan.conv.0,
                plan.y.0,
                plan.algo,
            )?
        };
        Ok(plan)
    }

    /// `y = conv(x, w)`, then `y += bias`, on the handle's stream.
    fn launch(
        &self,
        handle: sys::cudnnHandle_t,
        stream: &CudaStream,
        (xp, wp, bp, yp): (u64, u64, u64, u64),
        workspace: Option<&mut CudaSlice<u8>>,
    ) -> std::result::Result<(), CudnnError> {
        let (wsp, wsn, _guard) = match workspace {
            Some(buf) => {
                let n = buf.len();
                let (p, g) = buf.device_ptr_mut(stream);
                (p as *mut c_void, n, Some(g))
            }
            None => (std::ptr::null_mut(), 0, None),
        };
        let (one, zero) = (1f32, 0f32);
        // SAFETY: the descriptors describe these buffers (shapes and dtype from the plan's
        // key), all on `stream`, which the handle is bound to; alpha/beta are f32 for every
        // dtype used here.
        unsafe {
            result::convolution_forward(
                handle,
                (&one as *const f32).cast(),
                self.x.0,
                xp as *const c_void,
                self.w.0,
                wp as *const c_void,
                self.conv.0,
                self.algo,
                wsp,
                wsn,
                (&zero as *const f32).cast(),
                self.y.0,
                yp as *mut c_void,
            )?;
            sys::cudnnAddTensor(
                handle,
                (&one as *const f32).cast(),
                self.bias.0,
                bp as *const c_void,
                (&one as *const f32).cast(),
                self.y.0,
                yp as *mut c_void,
            )
            .result()
        }
    }

    /// Switches to implicit-precomp GEMM, or from it to plain implicit GEMM (cuDNN's most
    /// general algorithm, no workspace).
    fn fall_back(&mut self, handle: sys::cudnnHandle_t) -> Result<()> {
        use sys::cudnnConvolutionFwdAlgo_t as A;
        self.algo = if self.algo == A::CUDNN_CONVOLUTION_FWD_ALGO_IMPLICIT_PRECOMP_GEMM {
            A::CUDNN_CONVOLUTION_FWD_ALGO_IMPLICIT_GEMM
        } else {
            A::CUDNN_CONVOLUTION_FWD_ALGO_IMPLICIT_PRECOMP_GEMM
        };
        // SAFETY: live handle and descriptors.
        unsafe {
            result::set_convolution_math_type(self.conv.0, self.math)?;
            self.workspace = result::get_convolution_forward_workspace_size(
                handle,
                self.x.0,
                self.w.0,
                self.conv.0,
                self.y.0,
                self.algo,
            )?;
        }
        Ok(())
    }

    /// Times the algorithms on the real buffers and keeps the fastest that fits
    /// [`FIND_WORKSPACE`]; its math type goes on the descriptor, as cuDNN asks.
    fn find(
        &mut self,
        handle: sys::cudnnHandle_t,
        dev: &CudaDevice,
        (xp, wp, yp): (u64, u64, u64),
    ) -> Result<()> {
        let stream = dev.cuda_stream();
        // Fewer algorithms are tried if the scratch memory cannot be had, rather than failing.
        let mut scratch = unsafe { dev.alloc::<u8>(FIND_WORKSPACE) }.ok();
        let (sp, sn, _g) = match scratch.as_mut() {
            Some(s) => {
                let (p, g) = s.device_ptr_mut(&stream);
                (p as *mut c_void, FIND_WORKSPACE, Some(g))
            }
            None => (std::ptr::null_mut(), 0, None),
        };
        const WANT: usize =
            sys::cudnnConvolutionFwdAlgo_t::CUDNN_CONVOLUTION_FWD_ALGO_COUNT as usize;
        let mut found = 0i32;
        // SAFETY: plain-old-data out-structs, filled by cuDNN up to `found`.
        let mut perf: [sys::cudnnConvolutionFwdAlgoPerf_t; WANT] = unsafe { std::mem::zeroed() };
        // SAFETY: descriptors match the buffers, which live on the handle's stream.
        let status = unsafe {
            sys::cudnnFindConvolutionForwardAlgorithmEx(
                handle,
                self.x.0,
                xp as *const c_void,
                self.w.0,
                wp as *const c_void,
                self.conv.0,
                self.y.0,
                yp as *mut c_void,
                WANT as i32,
                &mut found,
                perf.as_mut_ptr(),
                sp,
                sn,
            )
            .result()
        };
        if let Err(e) = status {
            // Keep implicit-precomp GEMM rather than fail the layer.
            tracing::debug!("cuDNN could not time convolution algorithms ({e:?})");
            return Ok(());
        }
        let best = perf[..found.max(0) as usize].iter().find(|p| {
            p.status == sys::cudnnStatus_t::CUDNN_STATUS_SUCCESS
                && p.memory <= sn
                && p.mathType != sys::cudnnMathType_t::CUDNN_TENSOR_OP_MATH_ALLOW_CONVERSION
        });
        if let Some(p) = best {
            self.algo = p.algo;
            // SAFETY: live descriptor.
            unsafe { result::set_convolution_math_type(self.conv.0, p.mathType)? };
        }
        // (None found: keep implicit-precomp GEMM, which supports every shape used here.)
        Ok(())
    }

    /// cuDNN's heuristic answer (what candle uses), for comparisons.
    fn heuristic(&self, handle: sys::cudnnHandle_t) -> Result<sys::cudnnConvolutionFwdAlgo_t> {
        let mut found = 0i32;
        // SAFETY: as in `find`.
        let mut perf: [sys::cudnnConvolutionFwdAlgoPerf_t; 8] = unsafe { std::mem::zeroed() };
        unsafe {
            result::get_convolution_forward_algorithm(
                handle,
                self.x.0,
                self.w.0,
                self.conv.0,
                self.y.0,
                8,
                &mut found,
                perf.as_mut_ptr(),
            )?;
        }
        Ok(if found > 0 {
            perf[0].algo
        } else {
            sys::cudnnConvolutionFwdAlgo_t::CUDNN_CONVOLUTION_FWD_ALGO_IMPLICIT_PRECOMP_GEMM
        })
    }
}

#[derive(Debug, Clone, Copy)]
enum Choice {
    Fixed(sys::cudnnConvolutionFwdAlgo_t),
    Heuristic,
    Find,
}

/// `LD_CUDNN_ALGO`: unset, implicit-precomp GEMM (see the module docs); `find` (each shape
/// timed once), `heuristic` (cuDNN's legacy heuristic, candle's choice) or a fixed algorithm
/// (`implicit`, `implicit-precomp`, `gemm`, `direct`, `fft`, `fft-tiling`, `winograd`,
/// `winograd-nonfused`), for comparisons. An unknown name is reported once and ignored.
fn choice() -> Choice {
    use sys::cudnnConvolutionFwdAlgo_t as A;
    static CHOICE: std::sync::OnceLock<Choice> = std::sync::OnceLock::new();
    const DEFAULT: Choice = Choice::Fixed(A::CUDNN_CONVOLUTION_FWD_ALGO_IMPLICIT_PRECOMP_GEMM);
    *CHOICE.get_or_init(|| {
        let Ok(name) = std::env::var("LD_CUDNN_ALGO") else {
            return DEFAULT;
        };
        Choice::Fixed(match name.as_str() {
            "find" => return Choice::Find,
            "heuristic" => return Choice::Heuristic,
            "implicit" => A::CUDNN_CONVOLUTION_FWD_ALGO_IMPLICIT_GEMM,
            "implicit-precomp" => A::CUDNN_CONVOLUTION_FWD_ALGO_IMPLICIT_PRECOMP_GEMM,
            "gemm" => A::CUDNN_CONVOLUTION_FWD_ALGO_GEMM,
            "direct" => A::CUDNN_CONVOLUTION_FWD_ALGO_DIRECT,
            "fft" => A::CUDNN_CONVOLUTION_FWD_ALGO_FFT,
            "fft-tiling" => A::CUDNN_CONVOLUTION_FWD_ALGO_FFT_TILING,
            "winograd" => A::CUDNN_CONVOLUTION_FWD_ALGO_WINOGRAD,
            "winograd-nonfused" => A::CUDNN_CONVOLUTION_FWD_ALGO_WINOGRAD_NONFUSED,
            _ => {
                tracing::warn!(
                    "LD_CUDNN_ALGO={name:?} is not a cuDNN algorithm name (find, heuristic, \
                     implicit-precomp, ...); using implicit-precomp GEMM"
                );
                return DEFAULT;
            }
        })
    })
}
