//! CUDA graphs for the UNet: one denoising step is recorded once and then replayed, instead of
//! being queued kernel by kernel from the host at every step.
//!
//! Why: at SD 1.5 sizes a fast card finishes each kernel before the host has queued the next
//! (on an H200, 14.2 ms of host queueing in a 15.0 ms step), so a step costs what candle's
//! per-operation host work costs. A replayed graph hands the whole step to the GPU at once.
//!
//! How (candle 0.11 and cudarc provide the capture calls; the bookkeeping is ours):
//! - The first call with a new key (the inputs' shapes and dtypes) runs eagerly as a warm-up. Kernels get compiled and loaded, cuDNN plans
//!   made and its workspace grown, and the small host-to-device uploads candle makes for strided
//!   layouts are cached by content (`enable_cuda_graph_htod_cache`), so that recording needs
//!   none of them.
//! - The second call records the body on the device's stream over stable input buffers of our
//!   own, then replays it. Later calls copy their inputs into those buffers, replay, and copy the
//!   output out (the graph writes its output to the same address at every replay).
//! - Anything that fails while recording (a read back to the host, an operation CUDA cannot
//!   record) ends the recording, and that key runs eagerly from then on. A graph is a speed-up,
//!   never a requirement; `LD_CUDA_GRAPHS=0` turns them off.
//! - Steps that go through candle's cuBLAS products (attention with a head size or dtype our
//!   fused kernel lacks, f32 among them; candle's own linear layers and convolutions) are not
//!   recorded at all: the warm-up notes them ([`unrecordable`]). On an H200, recordings of the
//!   f32 reference tests' steps failed; what was measured and tested there is the fused path.
//! - A graph belongs to the thread that recorded it: cuDNN's and cuBLASLt's workspaces and
//!   candle's upload cache are per thread, and the graph reads them. It is recorded again after
//!   the convolution workspace was regrown (the buffer it read is gone).
//! - The pipeline releases the graph when a sampling run ends, so its memory goes to the VAE.
//!   Candle's upload cache stays: a few hundred bytes of layout numbers per shape seen.

use std::cell::Cell;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, OnceLock};
use std::thread::ThreadId;

use candle_core::cuda_backend::cudarc::driver::{sys, CudaGraph, CudaStream};
use candle_core::cuda_backend::CudaDevice;
use candle_core::{DType, Device, Result, Shape, Tensor};

/// Whether UNet steps on CUDA devices are replayed as graphs (the default); `LD_CUDA_GRAPHS=0`
/// runs every step eagerly, for comparisons.
pub(crate) fn enabled() -> bool {
    static ON: OnceLock<bool> = OnceLock::new();
    *ON.get_or_init(|| std::env::var("LD_CUDA_GRAPHS").map_or(true, |v| v != "0"))
}

thread_local! {
    /// What made the running warm-up unfit for recording, if anything did.
    static UNRECORDABLE: Cell<Option<&'static str>> = const { Cell::new(None) };
}

/// Notes that the operation being run on this thread must not be recorded in a CUDA graph
/// (`why` says which it is). Harmless outside a warm-up: the next warm-up starts afresh.
pub(crate) fn unrecordable(why: &'static str) {
    UNRECORDABLE.with(|c| {
        if c.get().is_none() {
            c.set(Some(why));
        }
    });
}

/// One recorded body and what it needs, for the most recent key (a sampling run uses one).
#[derive(Default)]
pub(crate) struct GraphCache {
    slot: Mutex<Option<Entry>>,
    replays: AtomicU64,
    /// Why the last recording failed, if one did.
    failure: Mutex<Option<String>>,
}

/// A clone (a model copied to change its options) records its own graphs.
impl Clone for GraphCache {
    fn clone(&self) -> Self {
        Self::default()
    }
}

impl std::fmt::Debug for GraphCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "GraphCache({} replays)", self.replays())
    }
}

/// The inputs' shapes and dtypes: what the recorded operations depend on besides the weights.
type Key = Vec<(Shape, DType)>;

struct Entry {
    key: Key,
    state: State,
}

enum State {
    /// Warmed up on this key, on this thread; the next call from it records.
    Warm(ThreadId),
    Ready(Captured),
    /// Recording failed: this key runs eagerly.
    Eager,
}

/// Fields drop in order: the output (a graph allocation, freed in stream order) before the graph.
struct Captured {
    output: Tensor,
    inputs: Vec<Tensor>,
    graph: CudaGraph,
    thread: ThreadId,
    conv_epoch: u64,
}

// SAFETY: `CudaGraph` holds raw CUDA handles, which CUDA allows any thread to use as long as
// calls on one graph are serialised. It is only launched under the cache's mutex, only from the
// thread that recorded it (checked before every replay), and destroyed once, on drop. (Recording
// itself assumes what the engine does: one thread issues a device's work; another thread's
// operations on the same stream while it records would join the graph.)
unsafe impl Send for Captured {}

impl GraphCache {
    /// Graph replays so far (for tests that must know a graph ran, not the eager path).
    pub(crate) fn replays(&self) -> u64 {
        self.replays.load(Ordering::Relaxed)
    }

    /// Why the last steps ran without a graph: the warm-up's reason, or a failed recording or
    /// replay (`None` if neither happened).
    pub(crate) fn failure(&self) -> Option<String> {
        self.failure
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Drops the recorded graph and returns the device memory it held for its intermediates.
    pub(crate) fn release(&self) {
        let old = self.slot.lock().unwrap_or_else(|p| p.into_inner()).take();
        let Some(Entry {
            state: State::Ready(c),
            ..
        }) = old
        else {
            return;
        };
        let Device::Cuda(dev) = c.output.device().clone() else {
            return;
        };
        drop(c);
        // CUDA keeps a destroyed graph's memory cached for other graphs, out of reach of
        // ordinary allocations (the VAE decode comes next), until it is trimmed; trimming skips
        // memory a graph still running uses, hence the wait.
        let stream = dev.cuda_stream();
        let trimmed = stream.synchronize().and_then(|()| {
            // SAFETY: a plain driver call on the device of a live context.
            unsafe { sys::cuDeviceGraphMemTrim(stream.context().cu_device()).result() }
        });
        if let Err(e) = trimmed {
            tracing::debug!("returning CUDA graph memory: {e}");
        }
    }

    /// `body(inputs)`, through a graph where one applies (see the module docs). The operations
    /// `body` issues must depend on nothing but its inputs' shapes and dtypes, and read nothing
    /// but its inputs and state that outlives the graph (the weights).
    pub(crate) fn run(
        &self,
        inputs: &[&Tensor],
        body: impl Fn(&[Tensor]) -> Result<Tensor>,
    ) -> Result<Tensor> {
        let dev = match inputs.first().map(|t| t.device()) {
            Some(Device::Cuda(dev)) if enabled() => dev.clone(),
            _ => return body(&owned(inputs)),
        };
        let key: Key = inputs
            .iter()
            .map(|t| (t.shape().clone(), t.dtype()))
            .collect();
        let mut slot = self.slot.lock().unwrap_or_else(|p| p.into_inner());
        let entry = match slot.as_mut() {
            Some(e) if e.key == key => e,
            _ => {
                // A new key: the old graph (another size) is of no further use.
                *slot = None;
                let (out, state) = self.warm_up(&dev, inputs, &body)?;
                *slot = Some(Entry { key, state });
                return Ok(out);
            }
        };
        let here = std::thread::current().id();
        match &entry.state {
            State::Eager => return body(&owned(inputs)),
            State::Ready(c) if c.thread == here && c.conv_epoch == conv_epoch() => {}
            State::Warm(t) if *t == here => match record(&dev, inputs, &body) {
                Ok(c) => {
                    // The first launch maps the graph's memory: let the warm-up's freed blocks
                    // go back to the device first.
                    dev.cuda_stream()
                        .synchronize()
                        .map_err(candle_core::Error::wrap)?;
                    entry.state = State::Ready(c);
                }
                Err(e) => {
                    tracing::warn!("UNet steps run without a CUDA graph (recording failed: {e})");
                    self.fail(e.to_string());
                    entry.state = State::Eager;
                    return body(&owned(inputs));
                }
            },
            State::Ready(_) | State::Warm(_) => {
                // Another thread, or a regrown workspace: warm up here, then record again.
                entry.state = State::Eager;
                let (out, state) = self.warm_up(&dev, inputs, &body)?;
                entry.state = state;
                return Ok(out);
            }
        }
        let State::Ready(c) = &entry.state else {
            return body(&owned(inputs));
        };
        match replay(c, inputs) {
            Ok(out) => {
                self.replays.fetch_add(1, Ordering::Relaxed);
                Ok(out)
            }
            Err(e) => {
                // Out of memory at the first launch, say: the step runs eagerly instead, and so
                // do the next ones.
                tracing::warn!("UNet steps run without a CUDA graph (a replay failed: {e})");
                self.fail(format!("a replay failed: {e}"));
                entry.state = State::Eager;
                // Freeing the output of a graph that never ran fails; that error is not the
                // next operation's.
                let _ = dev.cuda_stream().context().check_err();
                body(&owned(inputs))
            }
        }
    }

    fn fail(&self, why: String) {
        *self.failure.lock().unwrap_or_else(|p| p.into_inner()) = Some(why);
    }

    /// An eager run with candle's upload cache on, so that recording finds every upload cached;
    /// the state it leaves: ready to record on this thread, or eager for good.
    fn warm_up(
        &self,
        dev: &CudaDevice,
        inputs: &[&Tensor],
        body: &impl Fn(&[Tensor]) -> Result<Tensor>,
    ) -> Result<(Tensor, State)> {
        let _cache = dev.enable_cuda_graph_htod_cache();
        UNRECORDABLE.with(|c| c.set(None));
        let out = body(&owned(inputs))?;
        Ok(match UNRECORDABLE.with(|c| c.take()) {
            Some(why) => {
                tracing::debug!("UNet steps run without a CUDA graph: {why}");
                self.fail(why.to_string());
                (out, State::Eager)
            }
            None => (out, State::Warm(std::thread::current().id())),
        })
    }
}

fn owned(inputs: &[&Tensor]) -> Vec<Tensor> {
    inputs.iter().map(|t| (*t).clone()).collect()
}

/// The convolution workspace's generation on this thread (0 without cuDNN).
fn conv_epoch() -> u64 {
    #[cfg(feature = "cudnn")]
    return crate::gpu_conv::workspace_epoch();
    #[cfg(not(feature = "cudnn"))]
    0
}

/// Records `body` over fresh input buffers. Nothing runs until the graph is launched.
fn record(
    dev: &CudaDevice,
    inputs: &[&Tensor],
    body: &impl Fn(&[Tensor]) -> Result<Tensor>,
) -> Result<Captured> {
    let stable = inputs
        .iter()
        .map(|t| t.zeros_like())
        .collect::<Result<Vec<_>>>()?;
    let conv_epoch = conv_epoch();
    let stream = dev.cuda_stream();
    let _cache = dev.enable_cuda_graph_htod_cache();
    stream
        .begin_capture(sys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL)
        .map_err(candle_core::Error::wrap)?;
    let mut open = OpenCapture(&stream, false);
    let output = body(&stable);
    let graph = open.end();
    match (output, graph) {
        (Ok(output), Ok(Some(graph))) => Ok(Captured {
            output,
            inputs: stable,
            graph,
            thread: std::thread::current().id(),
            conv_epoch,
        }),
        (output, graph) => {
            let why = match (&output, &graph) {
                (Err(e), _) => e.to_string(),
                (_, Err(e)) => e.to_string(),
                _ => "nothing was recorded".to_string(),
            };
            drop((output, graph));
            // Frees of buffers made while recording fail once the recording is abandoned;
            // cudarc keeps such errors for the next call, which must not inherit them.
            let _ = stream.context().check_err();
            candle_core::bail!("{why}")
        }
    }
}

/// A recording in progress on `.0` (`.1`: ended). It must end whatever happens: a thread left
/// recording fails every later CUDA call, its clean-up at exit included (seen as a crash in the
/// driver).
struct OpenCapture<'a>(&'a std::sync::Arc<CudaStream>, bool);

impl OpenCapture<'_> {
    /// Ends the recording and instantiates the graph (`None`: nothing was recorded).
    fn end(&mut self) -> std::result::Result<Option<CudaGraph>, String> {
        // cudarc defers errors of frees made while recording (after a failed operation they
        // fail too) to the next call, and `end_capture` checks for them before it ends the
        // recording: take them first, so the recording ends.
        let pending = self.0.context().check_err();
        let graph = self.0.end_capture(
            sys::CUgraphInstantiate_flags::CUDA_GRAPH_INSTANTIATE_FLAG_AUTO_FREE_ON_LAUNCH,
        );
        if graph.is_err() && recording(self.0) {
            // An error deferred meanwhile (by another user of the context) made cudarc return
            // before ending: end it here, and discard what was recorded.
            let mut raw: sys::CUgraph = std::ptr::null_mut();
            // SAFETY: ends the recording this thread began on a live stream; the graph handed
            // back is ours, destroyed once.
            unsafe {
                if sys::cuStreamEndCapture(self.0.cu_stream(), &mut raw)
                    == sys::CUresult::CUDA_SUCCESS
                    && !raw.is_null()
                {
                    sys::cuGraphDestroy(raw);
                }
            }
        }
        self.1 = true;
        let graph = graph.map_err(|e| e.to_string())?;
        pending.map_err(|e| format!("an operation failed while recording: {e}"))?;
        Ok(graph)
    }
}

/// Whether `stream` is being recorded into a graph (read without cudarc's error check).
pub(crate) fn recording(stream: &CudaStream) -> bool {
    let mut status = sys::CUstreamCaptureStatus::CU_STREAM_CAPTURE_STATUS_NONE;
    // SAFETY: a query on a live stream, writing one status value.
    let r = unsafe { sys::cuStreamIsCapturing(stream.cu_stream(), &mut status) };
    r == sys::CUresult::CUDA_SUCCESS
        && status != sys::CUstreamCaptureStatus::CU_STREAM_CAPTURE_STATUS_NONE
}

impl Drop for OpenCapture<'_> {
    /// Ends a recording left open by a panic in the body.
    fn drop(&mut self) {
        if !self.1 {
            let _ = self.end();
            let _ = self.0.context().check_err();
        }
    }
}

/// Copies `inputs` into the graph's buffers, replays it, and copies its output out.
fn replay(c: &Captured, inputs: &[&Tensor]) -> Result<Tensor> {
    for (dst, src) in c.inputs.iter().zip(inputs) {
        dst.slice_set(&src.contiguous()?, 0, 0)?;
    }
    c.graph.launch().map_err(candle_core::Error::wrap)?;
    c.output.copy()
}
