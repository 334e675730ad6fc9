//! Memory-mapped safetensors weights: every file's header is validated when it is opened, and the
//! `VarBuilder` handed to model code reports a missing or mis-shaped tensor by name and file,
//! before anything is allocated for it. Large tensors for the CPU are copied out of the mapping
//! on all compute threads.

use std::collections::HashMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::safetensors::Load;
use candle_core::{DType, Device, Shape, Tensor};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::VarBuilder;
use memmap2::Mmap;
use safetensors::tensor::{SafeTensorError, TensorView};
use safetensors::SafeTensors;

use crate::{EngineError, Result};

/// One or more safetensors files (shards of one model component), mapped read-only.
#[derive(Clone)]
pub struct Weights {
    inner: Arc<Inner>,
}

struct Inner {
    files: Vec<Mapped>,
    index: HashMap<String, Entry>,
}

struct Mapped {
    path: PathBuf,
    mmap: Mmap,
    /// The header's `__metadata__` string map (LoRA files keep their alpha there).
    metadata: HashMap<String, String>,
}

struct Entry {
    file: usize,
    dtype: safetensors::Dtype,
    shape: Vec<usize>,
    /// Absolute byte range in the mapped file.
    start: usize,
    end: usize,
}

impl fmt::Debug for Weights {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Weights")
            .field("files", &self.files().collect::<Vec<_>>())
            .field("tensors", &self.inner.index.len())
            .finish()
    }
}

impl Weights {
    /// Maps one safetensors file and validates its header.
    pub fn open(path: impl AsRef<Path>) -> Result<Self> {
        Self::open_all(&[path])
    }

    /// Maps several files (shards) as one set of tensors. A tensor name in two files is an error,
    /// since which one the model would get would be arbitrary.
    pub fn open_all<P: AsRef<Path>>(paths: &[P]) -> Result<Self> {
        if paths.is_empty() {
            return Err(EngineError::InvalidRequest(
                "no weight files were given".into(),
            ));
        }
        let mut files = Vec::with_capacity(paths.len());
        let mut index = HashMap::new();
        for (file, path) in paths.iter().enumerate() {
            let path = path.as_ref();
            let mmap = map(path)?;
            let (entries, metadata) = read_header(path, &mmap)?;
            for (name, entry) in entries {
                let entry = Entry { file, ..entry };
                if let Some(previous) = index.insert(name.clone(), entry) {
                    return Err(EngineError::Weights {
                        path: path.to_path_buf(),
                        message: format!(
                            "tensor `{name}` is also in {}",
                            paths[previous.file].as_ref().display()
                        ),
                    });
                }
            }
            files.push(Mapped {
                path: path.to_path_buf(),
                mmap,
                metadata,
            });
        }
        Ok(Self {
            inner: Arc::new(Inner { files, index }),
        })
    }

    /// The files, in the order given.
    pub fn files(&self) -> impl Iterator<Item = &Path> {
        self.inner.files.iter().map(|f| f.path.as_path())
    }

    /// Every tensor name (unordered).
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.inner.index.keys().map(String::as_str)
    }

    pub fn len(&self) -> usize {
        self.inner.index.len()
    }

    pub fn is_empty(&self) -> bool {
        self.inner.index.is_empty()
    }

    pub fn contains(&self, name: &str) -> bool {
        self.inner.index.contains_key(name)
    }

    /// The stored shape of a tensor, read from the header (no data is touched).
    pub fn shape(&self, name: &str) -> Option<&[usize]> {
        self.inner.index.get(name).map(|e| e.shape.as_slice())
    }

    /// The stored element type of a tensor, when candle supports it.
    pub fn dtype(&self, name: &str) -> Option<DType> {
        self.inner
            .index
            .get(name)
            .and_then(|e| DType::try_from(e.dtype).ok())
    }

    /// Whether every floating-point tensor is stored in f16 (so f16 storage in memory loses
    /// nothing; see `LoadOptions::half_weights`). Read from the headers.
    pub fn all_f16(&self) -> bool {
        self.floats_all_f16(|_| true)
    }

    /// [`Self::all_f16`] for the UNet's tensors: in a single-file checkpoint only those under
    /// `model.diffusion_model.` count, since such files often keep the VAE or the schedule
    /// (`alphas_cumprod`) in f32 beside an f16 UNet (found by review: one f32 tensor anywhere
    /// kept the UNet in f32, 1.7 GB more for SD 1.5); a UNet file counts whole.
    pub fn unet_all_f16(&self) -> bool {
        const UNET: &str = "model.diffusion_model.";
        let single_file = self.inner.index.keys().any(|n| n.starts_with(UNET));
        self.floats_all_f16(|name| !single_file || name.starts_with(UNET))
    }

    fn floats_all_f16(&self, counts: impl Fn(&str) -> bool) -> bool {
        use safetensors::Dtype as D;
        let mut floats = self
            .inner
            .index
            .iter()
            .filter(|(name, e)| {
                matches!(
                    e.dtype,
                    D::F16 | D::BF16 | D::F32 | D::F64 | D::F8_E4M3 | D::F8_E5M2
                ) && counts(name.as_str())
            })
            .map(|(_, e)| e)
            .peekable();
        // 8-bit floats widen to f16 exactly, so an f8 UNet loses nothing kept in f16.
        floats.peek().is_some()
            && floats.all(|e| matches!(e.dtype, D::F16 | D::F8_E4M3 | D::F8_E5M2))
    }

    /// Loads one tensor, converted to `dtype`, on `device`.
    pub fn load(&self, name: &str, dtype: DType, device: &Device) -> Result<Tensor> {
        Ok(self.inner.load(name, None, dtype, device)?)
    }

    /// The `__metadata__` strings of the first file (empty when it has none).
    pub fn metadata(&self) -> &HashMap<String, String> {
        &self.inner.files[0].metadata
    }

    /// Like [`Self::var_builder`], with `patch` applied to every tensor it names as the tensor
    /// loads: merged LoRA weights without a second copy of the model in memory.
    pub fn var_builder_patched(
        &self,
        dtype: DType,
        device: &Device,
        patch: Arc<dyn LoadPatch>,
    ) -> Result<VarBuilder<'static>> {
        check_weight_dtype(dtype)?;
        Ok(VarBuilder::from_backend(
            Box::new(Patched {
                inner: self.inner.clone(),
                patch,
            }),
            dtype,
            device.clone(),
        ))
    }

    /// A `VarBuilder` over these weights that yields tensors converted to `dtype` (f32, f16 or
    /// bf16) on `device`. fp16 files load as f32 when asked, and the other way round. Errors from
    /// it convert (`?`) to [`EngineError::Weights`] naming the tensor and file.
    pub fn var_builder(&self, dtype: DType, device: &Device) -> Result<VarBuilder<'static>> {
        check_weight_dtype(dtype)?;
        Ok(VarBuilder::from_backend(
            Box::new(Backend(self.inner.clone())),
            dtype,
            device.clone(),
        ))
    }
}

fn check_weight_dtype(dtype: DType) -> Result<()> {
    if !matches!(dtype, DType::F32 | DType::F16 | DType::BF16 | DType::F64) {
        return Err(EngineError::InvalidRequest(format!(
            "weights can be loaded as f32, f16, bf16 or f64, not {dtype:?}"
        )));
    }
    Ok(())
}

/// Changes some tensors as they load (LoRA merging: `W + delta`).
pub trait LoadPatch: Send + Sync {
    /// Whether `name` is changed.
    fn touches(&self, name: &str) -> bool;
    /// The changed tensor; `tensor` is the stored one in f32 on the target device.
    fn apply(&self, name: &str, tensor: Tensor) -> candle_core::Result<Tensor>;
}

/// The `VarBuilder` backend with a [`LoadPatch`].
struct Patched {
    inner: Arc<Inner>,
    patch: Arc<dyn LoadPatch>,
}

impl Patched {
    fn load(
        &self,
        name: &str,
        expected: Option<&Shape>,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        if !self.patch.touches(name) {
            return self.inner.load(name, expected, dtype, dev);
        }
        // Merge in f32 whatever the model's dtype: an f16 sum of a small delta loses bits.
        let merged = self
            .patch
            .apply(name, self.inner.load(name, expected, DType::F32, dev)?)?;
        merged.to_dtype(dtype)
    }
}

impl SimpleBackend for Patched {
    fn get(
        &self,
        s: Shape,
        name: &str,
        _: candle_nn::Init,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        self.load(name, Some(&s), dtype, dev)
    }

    fn get_unchecked(&self, name: &str, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        self.load(name, None, dtype, dev)
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.inner.index.contains_key(name)
    }
}

fn map(path: &Path) -> Result<Mmap> {
    let file = std::fs::File::open(path).map_err(|e| EngineError::from_io(path, e))?;
    // SAFETY: the map is read-only. If another process truncates or rewrites the file while it is
    // mapped, reads may fault or see new bytes; that is the same contract candle and safetensors
    // accept for mapped weights, and the app never writes a model file it has open.
    unsafe { Mmap::map(&file) }.map_err(|e| EngineError::Io {
        path: path.to_path_buf(),
        source: e,
    })
}

/// Parses and validates the header with the `safetensors` crate (header size cap, UTF-8 JSON,
/// contiguous offsets inside the file, byte spans matching shape x dtype, overflow checks).
/// Tensor entries and the `__metadata__` strings of one file.
type Header = (Vec<(String, Entry)>, HashMap<String, String>);

fn read_header(path: &Path, bytes: &[u8]) -> Result<Header> {
    let bad = |message: String| EngineError::Weights {
        path: path.to_path_buf(),
        message,
    };
    let (header_len, metadata) = SafeTensors::read_metadata(bytes).map_err(|e| {
        bad(match e {
            SafeTensorError::HeaderTooSmall
            | SafeTensorError::InvalidHeaderLength
            | SafeTensorError::MetadataIncompleteBuffer => format!(
                "the file ({} bytes) is shorter or longer than its header says ({e}); \
                 it is probably truncated or not a safetensors file, download it again",
                bytes.len()
            ),
            other => format!("not a valid safetensors file: {other}"),
        })
    })?;
    let data_start = 8 + header_len;
    let strings = metadata.metadata().clone().unwrap_or_default();
    let entries = metadata
        .tensors()
        .into_iter()
        .map(|(name, info)| {
            let entry = Entry {
                file: 0,
                dtype: info.dtype,
                shape: info.shape.clone(),
                start: data_start + info.data_offsets.0,
                end: data_start + info.data_offsets.1,
            };
            (name, entry)
        })
        .collect();
    Ok((entries, strings))
}

impl Inner {
    /// Loads `name`, checking its shape against `expected` first when given.
    fn load(
        &self,
        name: &str,
        expected: Option<&Shape>,
        dtype: DType,
        device: &Device,
    ) -> candle_core::Result<Tensor> {
        let Some(entry) = self.index.get(name) else {
            return Err(TensorError {
                file: self.files[0].path.clone(),
                tensor: name.to_string(),
                kind: TensorProblem::Missing {
                    files: self.files.len(),
                },
            }
            .into_candle());
        };
        let file = &self.files[entry.file];
        if let Some(expected) = expected {
            if expected.dims() != entry.shape.as_slice() {
                return Err(TensorError {
                    file: file.path.clone(),
                    tensor: name.to_string(),
                    kind: TensorProblem::Shape {
                        expected: expected.dims().to_vec(),
                        found: entry.shape.clone(),
                    },
                }
                .into_candle());
            }
        }
        let unreadable = |message: String| {
            TensorError {
                file: file.path.clone(),
                tensor: name.to_string(),
                kind: TensorProblem::Unreadable(message),
            }
            .into_candle()
        };
        let bytes = &file.mmap[entry.start..entry.end];
        let tensor = match entry.dtype {
            // 8-bit floats: widened to f16 here, which holds every value of both formats
            // exactly; candle reads neither E5M2 nor (on every backend) E4M3 itself.
            safetensors::Dtype::F8_E4M3 | safetensors::Dtype::F8_E5M2 => {
                let halves = f8_to_f16(entry.dtype, bytes);
                Tensor::from_vec(halves, entry.shape.clone(), &Device::Cpu)?.to_device(device)?
            }
            safetensors::Dtype::F32 if copy_here(device, bytes) => {
                cpu_copy::<f32>(bytes, &entry.shape)?
            }
            safetensors::Dtype::F16 if copy_here(device, bytes) => {
                cpu_copy::<half::f16>(bytes, &entry.shape)?
            }
            _ => {
                let view = TensorView::new(entry.dtype, entry.shape.clone(), bytes)
                    .map_err(|e| unreadable(e.to_string()))?;
                view.load(device).map_err(|e| unreadable(e.to_string()))?
            }
        };
        release_pages(&file.mmap, entry.start, entry.end - entry.start);
        if tensor.dtype() == dtype {
            Ok(tensor)
        } else {
            tensor.to_dtype(dtype)
        }
    }
}

/// Tensors at least this large are copied out of the mapping on all compute threads.
const PARALLEL_COPY_BYTES: usize = 1 << 20;

/// Whether a tensor's `bytes` are copied by [`cpu_copy`]: large ones for the CPU, on
/// little-endian targets (others are read by candle, which swaps the bytes).
fn copy_here(device: &Device, bytes: &[u8]) -> bool {
    device.is_cpu() && bytes.len() >= PARALLEL_COPY_BYTES && cfg!(target_endian = "little")
}

/// Value types whose every bit pattern is a value, so a tensor of them can be filled with the
/// file's bytes as they are (safetensors stores little-endian, as these targets are).
trait PlainBits: candle_core::WithDType {}
impl PlainBits for f32 {}
impl PlainBits for half::f16 {}

/// A CPU tensor of `shape` holding `bytes` (little-endian values of `T`, on a little-endian
/// target: see [`copy_here`]), copied on all compute threads. A load is mostly this copy: the pages of the new buffer are faulted in and cleared
/// by the kernel (a third of an SD 1.5 load in a profile, in `clear_page`), and the thread that
/// first writes a page pays for it, so one thread copying paid for all of them.
fn cpu_copy<T: PlainBits>(bytes: &[u8], shape: &[usize]) -> candle_core::Result<Tensor> {
    let size = std::mem::size_of::<T>();
    let n: usize = shape.iter().product();
    if bytes.len() != n * size {
        candle_core::bail!("{} bytes do not hold {shape:?} values", bytes.len());
    }
    // SAFETY: each part is filled whole with its own values' bytes, and every bit pattern of
    // `T` is a value (`PlainBits`); the byte ranges of the parts do not overlap.
    let values = unsafe {
        crate::kernels::written_on_threads::<T>(n, 1, |part, first| {
            let from = &bytes[first * size..(first + part.len()) * size];
            std::ptr::copy_nonoverlapping(
                from.as_ptr(),
                part.as_mut_ptr().cast::<u8>(),
                from.len(),
            );
        })
    };
    Tensor::from_vec(values, shape, &Device::Cpu)
}

/// Widens 8-bit floats to f16 through a table of all 256 codes. E5M2 is the top byte of an f16
/// (same exponent bias); E4M3 is the "FN" variant that PyTorch and ComfyUI save
/// (`float8_e4m3fn`: bias 7, no infinities, only `S.1111.111` is NaN, largest 448).
fn f8_to_f16(dtype: safetensors::Dtype, bytes: &[u8]) -> Vec<half::f16> {
    let table: Vec<half::f16> = (0..=255u8)
        .map(|b| match dtype {
            safetensors::Dtype::F8_E5M2 => half::f16::from_bits(u16::from(b) << 8),
            _ => half::f16::from_f32(e4m3fn_to_f32(b)),
        })
        .collect();
    bytes.iter().map(|&b| table[usize::from(b)]).collect()
}

fn e4m3fn_to_f32(b: u8) -> f32 {
    let sign = if b & 0x80 != 0 { -1.0 } else { 1.0 };
    let exponent = i32::from((b >> 3) & 0x0f);
    let mantissa = f32::from(b & 0x07);
    if exponent == 0x0f && b & 0x07 == 0x07 {
        return f32::NAN;
    }
    let magnitude = if exponent == 0 {
        // Subnormal: 0.mmm x 2^(1 - 7).
        mantissa / 8.0 * 2f32.powi(-6)
    } else {
        (1.0 + mantissa / 8.0) * 2f32.powi(exponent - 7)
    };
    sign * magnitude
}

/// Takes a loaded tensor's mapped bytes out of this process's resident memory. The tensor owns
/// a copy by now (in RAM or on the GPU), but the pages it was read from would stay resident until
/// the file is unmapped, so while a model loads its weights would count twice: 3.4 GB more peak
/// for SD 1.5's UNet in f32. The bytes stay in the OS page cache, so a later read is cheap.
#[cfg(unix)]
fn release_pages(mmap: &Mmap, start: usize, len: usize) {
    // SAFETY: the map is a read-only shared mapping of a file (`map`), and no slice of this range
    // is alive here. MADV_DONTNEED on such a mapping only drops page-table entries: the next read
    // (this tensor again, or a neighbour sharing the first or last page, even on another thread)
    // faults the same file bytes back in. Failure is harmless: the pages simply stay resident.
    let _ = unsafe { mmap.unchecked_advise_range(memmap2::UncheckedAdvice::DontNeed, start, len) };
}

#[cfg(not(unix))]
fn release_pages(_: &Mmap, _: usize, _: usize) {}

/// The `VarBuilder` backend. candle's own safetensors backend reports a missing tensor without
/// the file and a wrong shape only as a candle error; ours says both, in [`TensorError`].
struct Backend(Arc<Inner>);

impl SimpleBackend for Backend {
    fn get(
        &self,
        s: Shape,
        name: &str,
        _: candle_nn::Init,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        self.0.load(name, Some(&s), dtype, dev)
    }

    fn get_unchecked(&self, name: &str, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        self.0.load(name, None, dtype, dev)
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.0.index.contains_key(name)
    }
}

/// A tensor a model needs that the weights cannot give. It travels inside a `candle_core::Error`
/// (model code loads through `VarBuilder`, whose errors are candle's) and comes back out as
/// [`EngineError::Weights`] when that error is converted with `?`.
#[derive(Clone, PartialEq, Eq)]
pub struct TensorError {
    pub file: PathBuf,
    pub tensor: String,
    pub kind: TensorProblem,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TensorProblem {
    /// Not in any of the files (`files` of them were searched).
    Missing { files: usize },
    /// Present with another shape than the model's config implies.
    Shape {
        expected: Vec<usize>,
        found: Vec<usize>,
    },
    /// Present but its data could not be read (e.g. an element type candle lacks).
    Unreadable(String),
}

impl TensorError {
    /// What is wrong, without the file (which [`EngineError::Weights`] prints itself).
    pub fn problem(&self) -> String {
        let t = &self.tensor;
        match &self.kind {
            TensorProblem::Missing { files: 1 } => format!("tensor `{t}` is missing"),
            TensorProblem::Missing { files } => {
                format!("tensor `{t}` is missing (looked in {files} shard files)")
            }
            TensorProblem::Shape { expected, found } => format!(
                "tensor `{t}` has shape {found:?} but the model's config needs {expected:?}; \
                 the weights do not belong to this model or config"
            ),
            TensorProblem::Unreadable(m) => format!("tensor `{t}` cannot be read: {m}"),
        }
    }

    /// Finds a `TensorError` carried inside a candle error, through candle's context wrappers.
    pub fn find(e: &candle_core::Error) -> Option<&TensorError> {
        use candle_core::Error as E;
        match e {
            E::WrappedContext { wrapped, .. } => wrapped.downcast_ref::<TensorError>(),
            E::WithBacktrace { inner, .. }
            | E::Context { inner, .. }
            | E::WithPath { inner, .. } => Self::find(inner),
            _ => None,
        }
    }

    fn into_candle(self) -> candle_core::Error {
        // `WrappedContext` is the one candle variant that keeps a `dyn Error` we can downcast;
        // its Display prints our Debug, which is why Debug below is the plain message.
        candle_core::Error::WrappedContext {
            wrapped: Box::new(self),
            context: "loading model weights".into(),
        }
    }
}

impl fmt::Display for TensorError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} in {}", self.problem(), self.file.display())
    }
}

impl fmt::Debug for TensorError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl std::error::Error for TensorError {}

#[cfg(test)]
mod tests {
    use super::*;

    fn save(path: &Path, tensors: &[(&str, Tensor)]) {
        let map: HashMap<String, Tensor> = tensors
            .iter()
            .map(|(n, t)| (n.to_string(), t.clone()))
            .collect();
        candle_core::safetensors::save(&map, path).unwrap();
    }

    fn sample(dir: &Path) -> PathBuf {
        let path = dir.join("model.safetensors");
        let w = Tensor::arange(0f32, 6., &Device::Cpu)
            .unwrap()
            .reshape((2, 3))
            .unwrap()
            .to_dtype(DType::F16)
            .unwrap();
        save(&path, &[("layer.weight", w)]);
        path
    }

    #[test]
    fn a_single_files_unet_is_f16_whatever_else_it_keeps_in_f32() {
        let dir = tempfile::tempdir().unwrap();
        let t = |dtype| Tensor::zeros((2, 2), dtype, &Device::Cpu).unwrap();
        let path = dir.path().join("checkpoint.safetensors");
        save(
            &path,
            &[
                ("model.diffusion_model.out.0.weight", t(DType::F16)),
                ("first_stage_model.decoder.conv_in.weight", t(DType::F32)),
                ("alphas_cumprod", t(DType::F32)),
            ],
        );
        let w = Weights::open(&path).unwrap();
        assert!(!w.all_f16());
        assert!(w.unet_all_f16());
        // An f32 UNet tensor counts.
        save(
            &path,
            &[
                ("model.diffusion_model.out.0.weight", t(DType::F16)),
                ("model.diffusion_model.out.2.bias", t(DType::F32)),
            ],
        );
        assert!(!Weights::open(&path).unwrap().unet_all_f16());
        // A UNet file (a diffusers folder's) counts whole.
        let unet = dir.path().join("diffusion_pytorch_model.safetensors");
        save(
            &unet,
            &[
                ("conv_in.weight", t(DType::F16)),
                ("conv_in.bias", t(DType::F32)),
            ],
        );
        assert!(!Weights::open(&unet).unwrap().unet_all_f16());
        save(&unet, &[("conv_in.weight", t(DType::F16))]);
        assert!(Weights::open(&unet).unwrap().unet_all_f16());
    }

    /// Every code of both 8-bit formats against PyTorch's own widening
    /// (`tests/fixtures/make_f8_refs.py`); exact, NaN for NaN.
    #[test]
    fn eight_bit_float_weights_load_as_pytorch_reads_them() {
        let path =
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/refs/f8.safetensors");
        let w = Weights::open(&path).unwrap();
        for name in ["e4m3", "e5m2"] {
            let want: Vec<f32> = w
                .load(&format!("{name}_f32"), DType::F32, &Device::Cpu)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap();
            for dtype in [DType::F32, DType::F16] {
                let got: Vec<f32> = w
                    .load(name, dtype, &Device::Cpu)
                    .unwrap()
                    .to_dtype(DType::F32)
                    .unwrap()
                    .flatten_all()
                    .unwrap()
                    .to_vec1()
                    .unwrap();
                assert_eq!(got.len(), 256);
                for (code, (g, e)) in got.iter().zip(&want).enumerate() {
                    assert!(
                        g == e || (g.is_nan() && e.is_nan()),
                        "{name} code {code:#04x}: {g} vs PyTorch's {e}"
                    );
                }
            }
        }
        // An f8 UNet is kept in f16 on the CPU: widening it is lossless.
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("checkpoint.safetensors");
        let raw = std::fs::read(&path).unwrap();
        let src = SafeTensors::deserialize(&raw).unwrap();
        let f8 = src.tensor("e4m3").unwrap();
        safetensors::serialize_to_file([("model.diffusion_model.out.0.weight", f8)], None, &file)
            .unwrap();
        assert!(Weights::open(&file).unwrap().unet_all_f16());
    }

    /// Tensors large enough to be copied on all threads come out exactly as saved, in f32
    /// and f16, read as stored and widened, next to a small one read by candle.
    #[test]
    fn large_tensors_copied_on_all_threads_load_exactly() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("big.safetensors");
        // Large enough in f16 too (2 bytes a value), and not a multiple of the parts.
        let n = 3 * 174_877;
        assert!(n * 2 >= PARALLEL_COPY_BYTES);
        let values: Vec<f32> = (0..n).map(|i| i as f32 * 0.5 - 1000.25).collect();
        let big = Tensor::from_vec(values, (n / 3, 3), &Device::Cpu).unwrap();
        let half = big.to_dtype(DType::F16).unwrap();
        let small = Tensor::new(&[1.5f32, -2.0], &Device::Cpu).unwrap();
        save(
            &path,
            &[
                ("big", big.clone()),
                ("half", half.clone()),
                ("small", small.clone()),
            ],
        );
        let w = Weights::open(&path).unwrap();
        let same = |a: &Tensor, b: &Tensor| {
            assert_eq!(a.dims(), b.dims());
            assert_eq!(a.dtype(), b.dtype());
            let (a, b) = (
                a.to_dtype(DType::F64).unwrap(),
                b.to_dtype(DType::F64).unwrap(),
            );
            let a: Vec<f64> = a.flatten_all().unwrap().to_vec1().unwrap();
            let b: Vec<f64> = b.flatten_all().unwrap().to_vec1().unwrap();
            assert!(a == b);
        };
        same(&w.load("big", DType::F32, &Device::Cpu).unwrap(), &big);
        same(&w.load("half", DType::F16, &Device::Cpu).unwrap(), &half);
        let widened = half.to_dtype(DType::F32).unwrap();
        same(&w.load("half", DType::F32, &Device::Cpu).unwrap(), &widened);
        same(&w.load("small", DType::F32, &Device::Cpu).unwrap(), &small);
    }

    #[test]
    fn loads_fp16_file_as_f32_through_var_builder() {
        let dir = tempfile::tempdir().unwrap();
        let w = Weights::open(sample(dir.path())).unwrap();
        assert_eq!(w.shape("layer.weight"), Some(&[2usize, 3][..]));
        assert_eq!(w.dtype("layer.weight"), Some(DType::F16));
        let vb = w.var_builder(DType::F32, &Device::Cpu).unwrap();
        let t = vb.pp("layer").get((2, 3), "weight").unwrap();
        assert_eq!(t.dtype(), DType::F32);
        assert_eq!(
            t.to_vec2::<f32>().unwrap(),
            vec![vec![0., 1., 2.], vec![3., 4., 5.]]
        );
    }

    #[test]
    fn wrong_shape_names_tensor_file_and_both_shapes() {
        let dir = tempfile::tempdir().unwrap();
        let path = sample(dir.path());
        let vb = Weights::open(&path)
            .unwrap()
            .var_builder(DType::F32, &Device::Cpu)
            .unwrap();
        let err = vb.get((3, 2), "layer.weight").unwrap_err();
        let t = TensorError::find(&err).expect("a TensorError inside");
        assert_eq!(t.tensor, "layer.weight");
        assert_eq!(
            t.kind,
            TensorProblem::Shape {
                expected: vec![3, 2],
                found: vec![2, 3]
            }
        );
        let engine: EngineError = err.into();
        let text = engine.to_string();
        assert!(matches!(&engine, EngineError::Weights { path: p, .. } if p == &path));
        assert!(
            text.contains("layer.weight") && text.contains("[2, 3]") && text.contains("[3, 2]")
        );
    }

    #[test]
    fn missing_tensor_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let path = sample(dir.path());
        let vb = Weights::open(&path)
            .unwrap()
            .var_builder(DType::F32, &Device::Cpu)
            .unwrap();
        let err: EngineError = vb.pp("other").get(3, "bias").unwrap_err().into();
        assert!(
            matches!(&err, EngineError::Weights { path: p, message } if p == &path && message.contains("`other.bias` is missing")),
            "{err}"
        );
    }

    #[test]
    fn truncated_file_is_refused_at_open() {
        let dir = tempfile::tempdir().unwrap();
        let path = sample(dir.path());
        let bytes = std::fs::read(&path).unwrap();
        for keep in [0, 5, 20, bytes.len() - 1] {
            std::fs::write(&path, &bytes[..keep]).unwrap();
            let err = Weights::open(&path).unwrap_err();
            assert!(
                matches!(&err, EngineError::Weights { path: p, message } if p == &path && message.contains("truncated")),
                "{keep} bytes: {err}"
            );
        }
    }

    #[test]
    fn garbage_header_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x.safetensors");
        let mut bytes = 2u64.to_le_bytes().to_vec();
        bytes.extend_from_slice(b"{]");
        std::fs::write(&path, &bytes).unwrap();
        assert!(matches!(
            Weights::open(&path),
            Err(EngineError::Weights { path: p, .. }) if p == path
        ));
    }

    #[test]
    fn missing_file_and_duplicate_shards() {
        let dir = tempfile::tempdir().unwrap();
        let gone = dir.path().join("gone.safetensors");
        assert!(matches!(
            Weights::open(&gone),
            Err(EngineError::MissingFile { path }) if path == gone
        ));
        let a = sample(dir.path());
        let b = dir.path().join("b.safetensors");
        std::fs::copy(&a, &b).unwrap();
        let err = Weights::open_all(&[&a, &b]).unwrap_err();
        assert!(err.to_string().contains("also in"), "{err}");
    }

    #[test]
    fn integer_dtype_is_not_a_weight_precision() {
        let dir = tempfile::tempdir().unwrap();
        let w = Weights::open(sample(dir.path())).unwrap();
        assert!(matches!(
            w.var_builder(DType::U32, &Device::Cpu),
            Err(EngineError::InvalidRequest(_))
        ));
    }
}

thread_local! {
    static HALF_STORAGE: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Runs `load` with half-precision weight storage on (`on`) for the layers it builds on this
/// thread: CPU f32 convolutions and linear layers then keep their weights in f16 and widen them
/// as each layer runs (`LoadOptions::half_weights`). A thread-local switch rather than a
/// parameter through every model constructor: only the UNet's loaders set it.
pub(crate) fn with_half_storage<T>(on: bool, load: impl FnOnce() -> T) -> T {
    let before = HALF_STORAGE.with(|h| h.replace(on));
    let out = load();
    HALF_STORAGE.with(|h| h.set(before));
    out
}

/// Whether layers being built now store their large weights in f16 (see [`with_half_storage`]).
pub(crate) fn half_storage() -> bool {
    HALF_STORAGE.with(std::cell::Cell::get)
}
