//! Single-file `.safetensors` model files (A1111 / ComfyUI / Civitai downloads): the header is
//! validated before anything else is read or allocated, and [`inspect`] tells from the tensor
//! names and shapes alone what the file is (a whole SD1/SD2/SDXL checkpoint, a VAE, a LoRA, a
//! textual-inversion embedding) without touching the tensor data.
//!
//! Detection follows diffusers' `loaders/single_file_utils.py` (`CHECKPOINT_KEY_NAMES`,
//! `infer_diffusers_model_type`), which keys off a handful of original-LDM tensor names.

use std::collections::{BTreeMap, HashSet};
use std::fmt;
use std::path::Path;

use safetensors::tensor::{Dtype, SafeTensorError};
use safetensors::SafeTensors;
use serde::de::{Deserializer, IgnoredAny, MapAccess, Visitor};
use serde::Serialize;

use crate::{EngineError, Result};

/// Largest header we read: 64 MiB. Real headers are far smaller (SDXL with EMA: ~400 KB; LoRAs
/// with Kohya training metadata: a few MB); the `safetensors` crate's own cap is 100 MB, and a
/// corrupt length field should not make us allocate that much for a model list.
pub const MAX_HEADER_BYTES: u64 = 64 << 20;

/// Original-LDM name prefixes of a whole checkpoint (see REFERENCE.md, "Models and formats").
pub const LDM_UNET_PREFIX: &str = "model.diffusion_model.";
pub const LDM_VAE_PREFIX: &str = "first_stage_model.";
pub const LDM_CLIP_PREFIX: &str = "cond_stage_model.transformer.";
pub const LDM_OPEN_CLIP_PREFIX: &str = "cond_stage_model.model.";
pub const SDXL_EMBEDDER_0: &str = "conditioner.embedders.0.";
pub const SDXL_EMBEDDER_1: &str = "conditioner.embedders.1.";
/// SD1/SD2 checkpoints saved with Stability's generative-models ("SGM") names keep their one
/// text encoder under SDXL's first embedder: CLIP-L as `transformer.`, OpenCLIP-H as `model.`.
pub const SGM_CLIP_PREFIX: &str = "conditioner.embedders.0.transformer.";
pub const SGM_OPEN_CLIP_PREFIX: &str = "conditioner.embedders.0.model.";

/// diffusers `CHECKPOINT_KEY_NAMES["v2"]`: its last dimension is the cross-attention width
/// (768 for SD1's CLIP-L, 1024 for SD2's OpenCLIP-H).
const V2_PROBE: &str =
    "model.diffusion_model.input_blocks.2.1.transformer_blocks.0.attn2.to_k.weight";
/// SD2's weights do not say whether the UNet predicts v (SD 2.x 768-v) or noise (SD 2.x base,
/// 512). ComfyUI tells them apart by the spread of this LayerNorm bias: its population standard
/// deviation is above 0.09 in v-prediction models (`supported_models.SD20.model_type`).
const SD2_V_PROBE: &str =
    "model.diffusion_model.output_blocks.11.1.transformer_blocks.0.norm1.bias";
const SD2_V_SPREAD: f64 = 0.09;
/// diffusers `CHECKPOINT_KEY_NAMES["inpainting"]`: 9 input channels for inpainting UNets.
const INPAINT_PROBE: &str = "model.diffusion_model.input_blocks.0.0.weight";
/// Said of a checkpoint without a VAE inside.
const NO_VAE_NOTE: &str = "no VAE inside: choose a VAE file in Settings, or put its VAE file \
    beside it, named like the checkpoint with .vae.safetensors in place of .safetensors (as \
    A1111 reads it)";
/// diffusers `CHECKPOINT_KEY_NAMES["xl_base"]` / `["xl_refiner"]`.
const XL_BASE_PROBE: &str = "conditioner.embedders.1.model.transformer.resblocks.9.mlp.c_proj.bias";
const XL_REFINER_PROBE: &str =
    "conditioner.embedders.0.model.transformer.resblocks.9.mlp.c_proj.bias";

/// What is wrong with a file that claims to be safetensors. Each message says what was found;
/// [`FormatError::advice`] says what the user can do about it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FormatError {
    #[error("the file is only {len} bytes long, too short for a safetensors header")]
    TooShort { len: u64 },
    #[error("its header claims {claimed} bytes, more than the {max} bytes we accept")]
    HeaderTooLarge { claimed: u64, max: u64 },
    #[error("its header claims {claimed} bytes but the file has only {available} bytes after the length field; the file is truncated")]
    HeaderTruncated { claimed: u64, available: u64 },
    #[error("its header is not valid UTF-8 (at byte {at} of the header)")]
    NotUtf8 { at: usize },
    #[error("its header is not valid JSON: {0}")]
    NotJson(String),
    #[error("its header names tensor `{0}` twice")]
    DuplicateKey(String),
    #[error("the data of tensor `{0}` does not start where the previous tensor ends or lies outside the file")]
    BadOffsets(String),
    #[error("a tensor's shape times its element size does not match its byte range")]
    SizeMismatch,
    #[error("a tensor's shape is so large that its size overflows")]
    Overflow,
    #[error("the tensor data ends before the end of the file, or the file ends before the data does ({file_len} bytes); the file is truncated or has extra bytes")]
    LengthMismatch { file_len: u64 },
    #[error("not a valid safetensors header: {0}")]
    Other(String),
}

impl FormatError {
    /// What the user can do; every problem here means the file itself is damaged or not what
    /// its name says.
    pub fn advice(&self) -> &'static str {
        match self {
            FormatError::TooShort { .. }
            | FormatError::HeaderTruncated { .. }
            | FormatError::LengthMismatch { .. } => {
                "the download was probably interrupted: download the file again"
            }
            _ => {
                "this is not a usable .safetensors file (damaged, or another format renamed): \
                 download it again from its source"
            }
        }
    }

    /// As an engine error naming `path`.
    pub fn at(self, path: &Path) -> EngineError {
        EngineError::Weights {
            path: path.to_path_buf(),
            message: format!("{self}; {}", self.advice()),
        }
    }
}

/// One tensor of a validated header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorEntry {
    pub dtype: Dtype,
    pub shape: Vec<usize>,
    /// Byte range relative to the start of the data section.
    pub offsets: (usize, usize),
}

/// A validated safetensors header.
#[derive(Debug, Clone)]
pub struct Header {
    /// Header JSON length (the data starts at `8 + header_len`).
    pub header_len: usize,
    pub tensors: BTreeMap<String, TensorEntry>,
    /// The `__metadata__` strings.
    pub metadata: BTreeMap<String, String>,
}

/// Validates a whole safetensors file held in `bytes` (usually a memory map: only the header's
/// pages are touched). Checks, in this order: the length field against [`MAX_HEADER_BYTES`] and
/// the file, UTF-8, JSON with no duplicate names (the `safetensors` crate keeps the last of
/// duplicates silently), then the crate's own checks: offsets contiguous from 0 to the end of the
/// file, each byte span equal to shape x dtype size computed with overflow checks.
pub fn validate(bytes: &[u8]) -> std::result::Result<Header, FormatError> {
    let len = bytes.len() as u64;
    let Some(n) = bytes.get(..8) else {
        return Err(FormatError::TooShort { len });
    };
    let n = u64::from_le_bytes(n.try_into().expect("8 bytes"));
    if n > MAX_HEADER_BYTES {
        return Err(FormatError::HeaderTooLarge {
            claimed: n,
            max: MAX_HEADER_BYTES,
        });
    }
    if n > len - 8 {
        return Err(FormatError::HeaderTruncated {
            claimed: n,
            available: len - 8,
        });
    }
    let header_len = n as usize;
    let raw = &bytes[8..8 + header_len];
    let text = std::str::from_utf8(raw).map_err(|e| FormatError::NotUtf8 {
        at: e.valid_up_to(),
    })?;
    check_unique_keys(text)?;
    let (_, meta) = SafeTensors::read_metadata(bytes).map_err(|e| match e {
        SafeTensorError::InvalidOffset(name) => FormatError::BadOffsets(name),
        SafeTensorError::TensorInvalidInfo | SafeTensorError::MisalignedSlice => {
            FormatError::SizeMismatch
        }
        SafeTensorError::ValidationOverflow => FormatError::Overflow,
        SafeTensorError::MetadataIncompleteBuffer => FormatError::LengthMismatch { file_len: len },
        SafeTensorError::InvalidHeaderDeserialization(e) | SafeTensorError::JsonError(e) => {
            FormatError::NotJson(e.to_string())
        }
        other => FormatError::Other(other.to_string()),
    })?;
    let tensors = meta
        .tensors()
        .into_iter()
        .map(|(name, info)| {
            (
                name,
                TensorEntry {
                    dtype: info.dtype,
                    shape: info.shape.clone(),
                    offsets: info.data_offsets,
                },
            )
        })
        .collect();
    let metadata = meta
        .metadata()
        .clone()
        .unwrap_or_default()
        .into_iter()
        .collect();
    Ok(Header {
        header_len,
        tensors,
        metadata,
    })
}

/// Fails on a top-level JSON object that names a key twice.
fn check_unique_keys(text: &str) -> std::result::Result<(), FormatError> {
    struct Keys;
    impl<'de> Visitor<'de> for Keys {
        type Value = Option<String>;
        fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
            f.write_str("a JSON object")
        }
        fn visit_map<A: MapAccess<'de>>(
            self,
            mut map: A,
        ) -> std::result::Result<Self::Value, A::Error> {
            let mut seen = HashSet::new();
            while let Some(key) = map.next_key::<String>()? {
                map.next_value::<IgnoredAny>()?;
                if !seen.insert(key.clone()) {
                    return Ok(Some(key));
                }
            }
            Ok(None)
        }
    }
    let mut de = serde_json::Deserializer::from_str(text);
    match de.deserialize_map(Keys) {
        Ok(Some(dup)) => Err(FormatError::DuplicateKey(dup)),
        Ok(None) => Ok(()),
        Err(e) => Err(FormatError::NotJson(e.to_string())),
    }
}

/// What a single file holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum CheckpointKind {
    /// A whole model in original LDM names (UNet, usually text encoder(s) and VAE).
    Checkpoint,
    /// A VAE alone (LDM or diffusers names, see [`CheckpointInfo::vae_layout`]).
    Vae,
    /// A LoRA / LyCORIS adapter (Kohya or diffusers/PEFT names).
    Lora,
    /// A textual-inversion embedding.
    TextualInversion,
    /// Something else (a ControlNet, an upscaler, a file of another architecture).
    Unknown,
}

/// Which model family the file belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ModelFamily {
    Sd1,
    Sd2,
    SdxlBase,
    SdxlRefiner,
}

/// How a VAE's tensors are named.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum VaeLayout {
    /// Original LDM names (`encoder.down.0.block.0...`, `mid.attn_1.q` as 1x1 convs).
    Ldm,
    /// diffusers `AutoencoderKL` names (`encoder.down_blocks.0.resnets.0...`).
    Diffusers,
}

/// The floating-point type the weights are stored in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum WeightDtype {
    F16,
    Bf16,
    F32,
    F64,
    /// 8-bit floats (F8_E4M3 / F8_E5M2): widened to f16 when loaded.
    F8,
    /// Several of the above.
    Mixed,
    /// No floating-point tensor at all.
    None,
}

/// What the UNet predicts, as far as the file tells.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Prediction {
    Epsilon,
    VPrediction,
}

/// What [`inspect`] found, from the header alone.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct CheckpointInfo {
    pub kind: CheckpointKind,
    pub family: Option<ModelFamily>,
    pub dtype: WeightDtype,
    pub tensor_count: usize,
    /// Number of weights (elements), all tensors together.
    pub parameter_count: u64,
    pub has_unet: bool,
    pub has_text_encoder: bool,
    /// For a checkpoint: whether it carries its own VAE; for a VAE file: true.
    pub has_vae: bool,
    /// Layout of the VAE tensors when there are any.
    pub vae_layout: Option<VaeLayout>,
    /// 9-channel UNet input (image + mask + masked image).
    pub inpainting: bool,
    /// `model_ema.*` copies are present (training checkpoints; we use the plain weights).
    pub has_ema: bool,
    /// The likely prediction type of a checkpoint. SD1 and SDXL: epsilon. SD2: told by one
    /// LayerNorm bias's spread as ComfyUI does (`SD2_V_PROBE`; [`inspect`] reads it, not
    /// [`classify`]); without that tensor, diffusers' guess for single files, 768-v. A `v_pred`
    /// marker tensor (ComfyUI) or SAI `modelspec.prediction_type` metadata wins over both.
    pub prediction: Option<Prediction>,
    /// Trained with zero terminal SNR (a `ztsnr` marker tensor, as ComfyUI reads it: NoobAI-XL
    /// v-pred and other anime v-prediction models); sampled with the rescaled schedule.
    pub zero_terminal_snr: bool,
    /// Whether this engine can load it as a model, refiner or VAE (SD1/SD2/SDXL checkpoints with
    /// a VAE inside, SDXL refiners, VAEs); LoRAs and embeddings are used through their own
    /// loaders.
    pub loadable: bool,
    /// Loadable but for its missing VAE: usable with a separate VAE file (one beside it, see
    /// [`crate::single_file::sibling_vae`]).
    pub needs_vae: bool,
    /// Why not, or anything the user should know (e.g. an SDXL refiner is loaded as a refiner).
    pub note: Option<String>,
}

/// Inspects the file at `path`: validates the header and classifies the file without reading
/// any tensor data (the file is memory-mapped; only the header pages are touched). Errors are
/// [`EngineError::Weights`] naming the file, the problem and what to do.
pub fn inspect(path: impl AsRef<Path>) -> Result<CheckpointInfo> {
    let path = path.as_ref();
    let map = map_file(path)?;
    inspect_bytes(&map).map_err(|e| e.at(path))
}

/// [`inspect`] on bytes already in memory (the fuzz targets use this).
pub fn inspect_bytes(bytes: &[u8]) -> std::result::Result<CheckpointInfo, FormatError> {
    Ok(classify_with_data(&validate(bytes)?, Some(bytes)))
}

/// Maps `path` read-only, refusing files too short to be safetensors before mapping them.
pub(crate) fn map_file(path: &Path) -> Result<memmap2::Mmap> {
    let file = std::fs::File::open(path).map_err(|e| EngineError::from_io(path, e))?;
    let len = file
        .metadata()
        .map_err(|e| EngineError::from_io(path, e))?
        .len();
    if len < 8 {
        return Err(FormatError::TooShort { len }.at(path));
    }
    // SAFETY: read-only map; a file changed underneath us while mapped may give odd bytes or a
    // fault, the same contract `weights.rs` and candle accept for model files.
    unsafe { memmap2::Mmap::map(&file) }.map_err(|e| EngineError::Io {
        path: path.to_path_buf(),
        source: e,
    })
}

/// Classifies a validated header by its names and shapes.
pub fn classify(header: &Header) -> CheckpointInfo {
    classify_with_data(header, None)
}

/// [`classify`], reading one small tensor of the file's `bytes` where the names cannot tell
/// (SD2's prediction type).
fn classify_with_data(header: &Header, bytes: Option<&[u8]>) -> CheckpointInfo {
    let t = &header.tensors;
    let any = |prefix: &str| t.keys().any(|k| k.starts_with(prefix));
    let shape = |name: &str| t.get(name).map(|e| e.shape.as_slice());
    let parameter_count = t
        .values()
        .map(|e| e.shape.iter().map(|&d| d as u64).product::<u64>())
        .sum();

    let has_unet = any(LDM_UNET_PREFIX);
    let sd1_te = any(LDM_CLIP_PREFIX);
    let sd2_te = any(LDM_OPEN_CLIP_PREFIX);
    let xl_0 = any(SDXL_EMBEDDER_0);
    let xl_1 = any(SDXL_EMBEDDER_1);
    let has_text_encoder = sd1_te || sd2_te || xl_0 || xl_1;
    // One embedder and a UNet without SDXL's added conditions (`label_emb`): an SD1/SD2 model
    // in SGM names, not a refiner (found by review: SGM SD2 files were offered as refiners).
    let context = shape(V2_PROBE).and_then(|s| s.last().copied());
    let sgm_single = xl_0
        && !xl_1
        && has_unet
        && context != Some(1280)
        && !any("model.diffusion_model.label_emb.");
    let sgm_clip = sgm_single && any(SGM_CLIP_PREFIX);
    let sgm_open_clip = sgm_single && any(SGM_OPEN_CLIP_PREFIX);
    let mut info = CheckpointInfo {
        kind: CheckpointKind::Unknown,
        family: None,
        dtype: weight_dtype(t.values().map(|e| e.dtype)),
        tensor_count: t.len(),
        parameter_count,
        has_unet,
        has_text_encoder,
        has_vae: false,
        vae_layout: None,
        inpainting: false,
        has_ema: any("model_ema."),
        prediction: None,
        zero_terminal_snr: t.contains_key("ztsnr"),
        loadable: false,
        needs_vae: false,
        note: None,
    };

    if has_unet || has_text_encoder {
        info.kind = CheckpointKind::Checkpoint;
        info.vae_layout = vae_prefix(header).map(|(_, layout)| layout);
        info.has_vae = info.vae_layout.is_some();
        let in_channels = shape(INPAINT_PROBE).and_then(|s| s.get(1).copied());
        info.inpainting = in_channels == Some(9);
        // A width no released model has (a test or pruned model): the text encoder decides.
        let known_width = matches!(context, Some(768 | 1024 | 1280 | 2048));
        info.family = if t.contains_key(XL_BASE_PROBE) || (xl_1 && !sd2_te) {
            Some(ModelFamily::SdxlBase)
        } else if !sgm_single && (t.contains_key(XL_REFINER_PROBE) || xl_0) {
            Some(ModelFamily::SdxlRefiner)
        } else if context == Some(1024) || (!known_width && (sd2_te || sgm_open_clip)) {
            Some(ModelFamily::Sd2)
        } else if context == Some(768) || (!known_width && (sd1_te || sgm_clip)) {
            Some(ModelFamily::Sd1)
        } else {
            None
        };
        // SD2 without a probe: diffusers' guess for single files, 768-v.
        let sd2_told = (info.family == Some(ModelFamily::Sd2))
            .then(|| bytes.and_then(|b| sd2_predicts_v(header, b)))
            .flatten();
        info.prediction = info.family.map(|f| match f {
            // Stability's SD2 inpainting model is epsilon (512-inpainting-ema; diffusers'
            // `inpainting_v2` config), and ComfyUI probes only 4-channel UNets.
            ModelFamily::Sd2 if info.inpainting => Prediction::Epsilon,
            ModelFamily::Sd2 if sd2_told == Some(false) => Prediction::Epsilon,
            ModelFamily::Sd2 => Prediction::VPrediction,
            _ => Prediction::Epsilon,
        });
        // Explicit markers beat the family default.
        let mut marked = false;
        if t.contains_key("v_pred") {
            info.prediction = Some(Prediction::VPrediction);
            marked = true;
        }
        match header
            .metadata
            .get("modelspec.prediction_type")
            .map(String::as_str)
        {
            Some("v") | Some("v_prediction") => {
                info.prediction = Some(Prediction::VPrediction);
                marked = true;
            }
            Some("epsilon") | Some("eps") => {
                info.prediction = Some(Prediction::Epsilon);
                marked = true;
            }
            _ => {}
        }
        let guessed = !marked && sd2_told.is_none() && !info.inpainting;
        // EDM models (Playground v2.5: `edm_mean`/`edm_std`; CosXL: `edm_vpred.sigma_max`) are
        // sampled on a continuous schedule with their own latent scaling (ComfyUI's markers).
        let edm = (t.contains_key("edm_mean") && t.contains_key("edm_std"))
            || t.contains_key("edm_vpred.sigma_max");
        let (loadable, note) = match info.family {
            _ if !has_unet => (
                false,
                Some("the file has no UNet (`model.diffusion_model.*`)".to_string()),
            ),
            _ if edm => (
                false,
                Some(
                    "an EDM model (Playground v2.5 or CosXL) needs a sampling schedule that is \
                     not supported yet"
                        .to_string(),
                ),
            ),
            // SD1/SD2 inpainting models draw from a prompt alone (`crate::inpaint`); SDXL's
            // would need the SDXL pipeline to pass the mask through too.
            Some(ModelFamily::SdxlBase | ModelFamily::SdxlRefiner) if info.inpainting => (
                false,
                Some("SDXL inpainting checkpoints are not supported yet".to_string()),
            ),
            // Depth (5 channels) and instruct-pix2pix (8) models need an image beside the prompt;
            // listed as usable, they failed at load with a shape mismatch (found by review).
            _ if in_channels.is_some_and(|c| c != 4) && !info.inpainting => (
                false,
                Some(format!(
                    "a {}-channel UNet (a depth or image-editing model) needs a picture to start \
                     from, which is not supported",
                    in_channels.unwrap_or_default()
                )),
            ),
            Some(ModelFamily::Sd1) | Some(ModelFamily::Sd2) if !has_text_encoder => (
                false,
                Some("the file has no text encoder (`cond_stage_model.*`)".to_string()),
            ),
            Some(ModelFamily::Sd1) => (true, None),
            Some(ModelFamily::Sd2) => (
                true,
                (guessed && info.prediction == Some(Prediction::VPrediction)).then(|| {
                    "SD2: assumed v-prediction (SD 2.x 768-v), as diffusers does; SD2-base \
                     checkpoints need an epsilon config"
                        .to_string()
                }),
            ),
            Some(ModelFamily::SdxlBase) if !(xl_0 && xl_1) => (
                false,
                Some(
                    "the file lacks one of SDXL's two text encoders (`conditioner.embedders.0/1.*`)"
                        .to_string(),
                ),
            ),
            Some(ModelFamily::SdxlBase) => (true, None),
            // A refiner decodes with the base model's VAE, so its own is not needed.
            Some(ModelFamily::SdxlRefiner) => {
                info.note = Some(
                    "SDXL refiner: it finishes pictures of an SDXL model; choose it as the refiner"
                        .to_string(),
                );
                info.loadable = true;
                return info;
            }
            None => (
                false,
                Some("the UNet's cross-attention width matches no SD1/SD2/SDXL model".to_string()),
            ),
        };
        if !info.has_vae && loadable {
            info.note = Some(match note {
                Some(n) => format!("{n}; {NO_VAE_NOTE}"),
                None => NO_VAE_NOTE.to_string(),
            });
        } else {
            info.note = note;
        }
        info.needs_vae = loadable && !info.has_vae;
        info.loadable = loadable && info.has_vae;
        return info;
    }

    if is_lora(header) {
        info.kind = CheckpointKind::Lora;
        info.family = lora_family(header);
        return info;
    }

    if let Some((_, layout)) = vae_prefix(header) {
        info.kind = CheckpointKind::Vae;
        info.has_vae = true;
        info.vae_layout = Some(layout);
        info.family = vae_family(header);
        info.loadable = true;
        return info;
    }

    if let Some(width) = embedding_width(header) {
        info.kind = CheckpointKind::TextualInversion;
        info.family = match width {
            Embedding::Sdxl => Some(ModelFamily::SdxlBase),
            Embedding::Width(768) => Some(ModelFamily::Sd1),
            Embedding::Width(1024) => Some(ModelFamily::Sd2),
            Embedding::Width(_) => None,
        };
        return info;
    }
    info.note = Some("no known Stable Diffusion tensor names".to_string());
    info
}

/// Whether an SD2 UNet predicts v, by [`SD2_V_PROBE`]'s spread; `None` when the file lacks the
/// tensor (a pruned or test model) or stores it in a type other than f16/bf16/f32.
fn sd2_predicts_v(header: &Header, bytes: &[u8]) -> Option<bool> {
    let entry = header.tensors.get(SD2_V_PROBE)?;
    let start = 8 + header.header_len + entry.offsets.0;
    let data = bytes.get(start..8 + header.header_len + entry.offsets.1)?;
    let values: Vec<f64> = match entry.dtype {
        Dtype::F32 => data
            .chunks_exact(4)
            .map(|c| f64::from(f32::from_le_bytes(c.try_into().expect("4 bytes"))))
            .collect(),
        Dtype::F16 => data
            .chunks_exact(2)
            .map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f64())
            .collect(),
        Dtype::BF16 => data
            .chunks_exact(2)
            .map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f64())
            .collect(),
        _ => return None,
    };
    if values.is_empty() {
        return None;
    }
    let n = values.len() as f64;
    let mean = values.iter().sum::<f64>() / n;
    let variance = values.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / n;
    Some(variance.sqrt() > SD2_V_SPREAD)
}

fn weight_dtype(dtypes: impl Iterator<Item = Dtype>) -> WeightDtype {
    let mut found: Option<WeightDtype> = None;
    for d in dtypes {
        let this = match d {
            Dtype::F16 => WeightDtype::F16,
            Dtype::BF16 => WeightDtype::Bf16,
            Dtype::F32 => WeightDtype::F32,
            Dtype::F64 => WeightDtype::F64,
            Dtype::F8_E4M3 | Dtype::F8_E5M2 => WeightDtype::F8,
            // Integer tensors (CLIP's position_ids, counters) say nothing about the weights.
            _ => continue,
        };
        found = match found {
            None => Some(this),
            Some(f) if f == this => Some(f),
            Some(_) => return WeightDtype::Mixed,
        };
    }
    found.unwrap_or(WeightDtype::None)
}

/// Where a VAE sits in the file: its name prefix (`""`, `first_stage_model.`, `vae.`) and layout.
pub fn vae_prefix(header: &Header) -> Option<(&'static str, VaeLayout)> {
    vae_layout(|name| header.tensors.contains_key(name))
}

/// [`vae_prefix`] for any set of names, given as a membership test.
pub fn vae_layout(contains: impl Fn(&str) -> bool) -> Option<(&'static str, VaeLayout)> {
    for prefix in ["", LDM_VAE_PREFIX, "vae."] {
        let has = |name: &str| contains(&format!("{prefix}{name}"));
        if !(has("encoder.conv_in.weight") || has("decoder.conv_in.weight")) {
            continue;
        }
        if has("decoder.up.0.block.0.conv1.weight") || has("encoder.down.0.block.0.conv1.weight") {
            return Some((prefix, VaeLayout::Ldm));
        }
        if has("decoder.up_blocks.0.resnets.0.conv1.weight")
            || has("encoder.down_blocks.0.resnets.0.conv1.weight")
        {
            return Some((prefix, VaeLayout::Diffusers));
        }
    }
    None
}

fn is_lora(header: &Header) -> bool {
    header.tensors.keys().any(|k| {
        k.starts_with("lora_unet_")
            || k.starts_with("lora_te")
            || k.contains(".lora_down.")
            || k.contains(".lora_up.")
            || k.contains(".lora_A.")
            || k.contains(".lora_B.")
            || k.contains(".lora.down.")
            || k.contains(".hada_w1_a")
            || k.contains(".lokr_w1")
    })
}

/// SDXL LoRAs name a second text encoder; otherwise the width of a cross-attention key
/// projection's input tells SD1 (768) from SD2 (1024) and SDXL (2048).
fn lora_family(header: &Header) -> Option<ModelFamily> {
    let t = &header.tensors;
    if t.keys()
        .any(|k| k.starts_with("lora_te2_") || k.contains("text_encoder_2."))
    {
        return Some(ModelFamily::SdxlBase);
    }
    let width = t.iter().find_map(|(k, e)| {
        let cross_k = k.contains("attn2_to_k") || k.contains("attn2.to_k");
        let down = k.contains("lora_down") || k.contains("lora_A");
        (cross_k && down && e.shape.len() >= 2).then(|| e.shape[1])
    })?;
    match width {
        768 => Some(ModelFamily::Sd1),
        1024 => Some(ModelFamily::Sd2),
        2048 => Some(ModelFamily::SdxlBase),
        _ => None,
    }
}

/// The family a VAE file says it is for, if it says: SD1/SD2 and SDXL VAEs have the same tensor
/// names and shapes, so only metadata tells them apart. SAI's ModelSpec
/// (<https://github.com/Stability-AI/ModelSpec>) names it in `modelspec.architecture`, e.g.
/// `stable-diffusion-xl-v1-base/vae` or `stable-diffusion-v1`; most VAE files carry none.
fn vae_family(header: &Header) -> Option<ModelFamily> {
    let arch = header
        .metadata
        .get("modelspec.architecture")?
        .to_ascii_lowercase();
    // The refiner decodes with the base's VAE, so an SDXL VAE is `SdxlBase` whichever it names.
    if arch.starts_with("stable-diffusion-xl") {
        Some(ModelFamily::SdxlBase)
    } else if arch.starts_with("stable-diffusion-v1") {
        Some(ModelFamily::Sd1)
    } else if arch.starts_with("stable-diffusion-v2") {
        Some(ModelFamily::Sd2)
    } else {
        None
    }
}

enum Embedding {
    Sdxl,
    Width(usize),
}

/// Textual-inversion layouts (see `textual_inversion.rs`): A1111 `emb_params`, the older
/// `string_to_param.*`, SDXL `clip_l` + `clip_g`, or diffusers' single `<token>` vector.
fn embedding_width(header: &Header) -> Option<Embedding> {
    let t = &header.tensors;
    if t.contains_key("clip_l") && t.contains_key("clip_g") {
        return Some(Embedding::Sdxl);
    }
    let float =
        |e: &TensorEntry| matches!(e.dtype, Dtype::F16 | Dtype::BF16 | Dtype::F32 | Dtype::F64);
    let candidate = t
        .get("emb_params")
        .or_else(|| t.get("string_to_param.*"))
        .or_else(|| (t.len() == 1).then(|| t.values().next()).flatten())?;
    if !float(candidate) || candidate.shape.is_empty() || candidate.shape.len() > 2 {
        return None;
    }
    Some(Embedding::Width(*candidate.shape.last()?))
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A safetensors file of zero-filled f16 tensors with the given names and shapes.
    pub(crate) fn file(tensors: &[(&str, &[usize])]) -> Vec<u8> {
        let mut header = serde_json::Map::new();
        let mut offset = 0usize;
        for (name, shape) in tensors {
            let bytes = shape.iter().product::<usize>() * 2;
            header.insert(
                name.to_string(),
                serde_json::json!({"dtype": "F16", "shape": shape, "data_offsets": [offset, offset + bytes]}),
            );
            offset += bytes;
        }
        raw(&serde_json::Value::Object(header).to_string(), offset)
    }

    fn raw(header: &str, data: usize) -> Vec<u8> {
        let mut out = (header.len() as u64).to_le_bytes().to_vec();
        out.extend_from_slice(header.as_bytes());
        out.resize(out.len() + data, 0);
        out
    }

    #[test]
    fn duplicate_names_are_refused() {
        let h = r#"{"a":{"dtype":"F16","shape":[1],"data_offsets":[0,2]},"a":{"dtype":"F16","shape":[1],"data_offsets":[0,2]}}"#;
        assert_eq!(
            validate(&raw(h, 2)).unwrap_err(),
            FormatError::DuplicateKey("a".into())
        );
    }

    #[test]
    fn length_field_checks() {
        assert_eq!(
            validate(&[1, 2, 3]).unwrap_err(),
            FormatError::TooShort { len: 3 }
        );
        let mut huge = u64::MAX.to_le_bytes().to_vec();
        huge.extend_from_slice(b"{}");
        assert!(matches!(
            validate(&huge).unwrap_err(),
            FormatError::HeaderTooLarge { .. }
        ));
        let mut short = 100u64.to_le_bytes().to_vec();
        short.extend_from_slice(b"{}");
        assert_eq!(
            validate(&short).unwrap_err(),
            FormatError::HeaderTruncated {
                claimed: 100,
                available: 2
            }
        );
    }

    #[test]
    fn utf8_json_offsets_and_sizes() {
        let mut bad = raw("{\"a\":1}", 0);
        bad[9] = 0xff;
        assert!(matches!(
            validate(&bad).unwrap_err(),
            FormatError::NotUtf8 { at: 1 }
        ));
        assert!(matches!(
            validate(&raw("{]", 0)).unwrap_err(),
            FormatError::NotJson(_)
        ));
        assert!(matches!(
            validate(&raw("[]", 0)).unwrap_err(),
            FormatError::NotJson(_)
        ));
        let gap = r#"{"a":{"dtype":"F16","shape":[1],"data_offsets":[2,4]}}"#;
        assert_eq!(
            validate(&raw(gap, 4)).unwrap_err(),
            FormatError::BadOffsets("a".into())
        );
        let size = r#"{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,2]}}"#;
        assert_eq!(
            validate(&raw(size, 2)).unwrap_err(),
            FormatError::SizeMismatch
        );
        let over = format!(
            r#"{{"a":{{"dtype":"F32","shape":[{},{}],"data_offsets":[0,2]}}}}"#,
            usize::MAX,
            4
        );
        assert_eq!(validate(&raw(&over, 2)).unwrap_err(), FormatError::Overflow);
        let ok = r#"{"a":{"dtype":"F16","shape":[1],"data_offsets":[0,2]}}"#;
        assert!(validate(&raw(ok, 2)).is_ok());
        assert_eq!(
            validate(&raw(ok, 3)).unwrap_err(),
            FormatError::LengthMismatch {
                file_len: 3 + 8 + ok.len() as u64
            }
        );
    }

    #[test]
    fn classifies_by_names_and_shapes() {
        let sd1 = file(&[
            (V2_PROBE, &[320, 768]),
            (INPAINT_PROBE, &[320, 4, 3, 3]),
            (
                "cond_stage_model.transformer.text_model.final_layer_norm.weight",
                &[768],
            ),
            ("first_stage_model.decoder.conv_in.weight", &[512, 4, 3, 3]),
            (
                "first_stage_model.decoder.up.0.block.0.conv1.weight",
                &[128, 256, 3, 3],
            ),
        ]);
        let i = inspect_bytes(&sd1).unwrap();
        assert_eq!(
            (i.kind, i.family, i.dtype, i.has_vae, i.loadable),
            (
                CheckpointKind::Checkpoint,
                Some(ModelFamily::Sd1),
                WeightDtype::F16,
                true,
                true
            )
        );
        assert_eq!(i.prediction, Some(Prediction::Epsilon));

        let sd2 = file(&[
            (V2_PROBE, &[320, 1024]),
            ("cond_stage_model.model.ln_final.weight", &[1024]),
        ]);
        let i = inspect_bytes(&sd2).unwrap();
        assert_eq!(
            (i.family, i.has_vae, i.loadable),
            (Some(ModelFamily::Sd2), false, false)
        );
        assert_eq!(i.prediction, Some(Prediction::VPrediction));
        assert!(i.note.unwrap().contains("VAE"));

        let xl = file(&[
            (
                "model.diffusion_model.input_blocks.4.1.transformer_blocks.0.attn2.to_k.weight",
                &[640, 2048],
            ),
            (XL_BASE_PROBE, &[1280]),
            (
                "conditioner.embedders.0.transformer.text_model.final_layer_norm.weight",
                &[768],
            ),
        ]);
        let i = inspect_bytes(&xl).unwrap();
        // Loadable but for its missing VAE.
        assert_eq!((i.family, i.loadable), (Some(ModelFamily::SdxlBase), false));
        assert!(i.note.unwrap().contains("VAE"));
        let mut with_vae: Vec<(&str, &[usize])> = vec![
            (XL_BASE_PROBE, &[1280]),
            (
                "conditioner.embedders.0.transformer.text_model.final_layer_norm.weight",
                &[768],
            ),
            ("model.diffusion_model.out.2.bias", &[4]),
            ("first_stage_model.decoder.conv_in.weight", &[512, 4, 3, 3]),
            (
                "first_stage_model.decoder.up.0.block.0.conv1.weight",
                &[128, 256, 3, 3],
            ),
        ];
        let i = inspect_bytes(&file(&with_vae)).unwrap();
        assert_eq!(
            (i.family, i.loadable, i.note),
            (Some(ModelFamily::SdxlBase), true, None)
        );
        // Without CLIP-L it is not a whole SDXL model.
        with_vae.remove(1);
        let i = inspect_bytes(&file(&with_vae)).unwrap();
        assert!(!i.loadable && i.note.unwrap().contains("text encoders"));
        let refiner = file(&[
            (XL_REFINER_PROBE, &[1280]),
            ("model.diffusion_model.out.2.bias", &[4]),
            ("model.diffusion_model.label_emb.0.0.weight", &[8, 8]),
        ]);
        let i = inspect_bytes(&refiner).unwrap();
        assert_eq!(
            (i.family, i.loadable),
            (Some(ModelFamily::SdxlRefiner), true)
        );
        assert!(i.note.unwrap().contains("refiner"));

        let vae = file(&[
            ("encoder.conv_in.weight", &[128, 3, 3, 3]),
            ("decoder.conv_in.weight", &[512, 4, 3, 3]),
            ("decoder.up.0.block.0.conv1.weight", &[128, 256, 3, 3]),
        ]);
        let i = inspect_bytes(&vae).unwrap();
        assert_eq!(
            (i.kind, i.vae_layout),
            (CheckpointKind::Vae, Some(VaeLayout::Ldm))
        );
        let dvae = file(&[
            ("encoder.conv_in.weight", &[128, 3, 3, 3]),
            (
                "decoder.up_blocks.0.resnets.0.conv1.weight",
                &[512, 512, 3, 3],
            ),
        ]);
        assert_eq!(
            inspect_bytes(&dvae).unwrap().vae_layout,
            Some(VaeLayout::Diffusers)
        );

        let lora = file(&[
            ("lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k.lora_down.weight", &[4, 1024]),
            ("lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k.alpha", &[]),
        ]);
        let i = inspect_bytes(&lora).unwrap();
        assert_eq!(
            (i.kind, i.family),
            (CheckpointKind::Lora, Some(ModelFamily::Sd2))
        );

        let ti = file(&[("emb_params", &[2, 768])]);
        let i = inspect_bytes(&ti).unwrap();
        assert_eq!(
            (i.kind, i.family),
            (CheckpointKind::TextualInversion, Some(ModelFamily::Sd1))
        );
        let other = file(&[("a", &[2]), ("b", &[3])]);
        assert_eq!(inspect_bytes(&other).unwrap().kind, CheckpointKind::Unknown);
    }

    #[test]
    fn sd2_base_and_768_v_are_told_apart_by_one_biass_spread() {
        let mut f = file(&[
            (V2_PROBE, &[320, 1024]),
            (SD2_V_PROBE, &[320]),
            ("cond_stage_model.model.ln_final.weight", &[1024]),
            ("first_stage_model.decoder.conv_in.weight", &[512, 4, 3, 3]),
            (
                "first_stage_model.decoder.up.0.block.0.conv1.weight",
                &[128, 256, 3, 3],
            ),
        ]);
        let header = validate(&f).unwrap();
        let (from, to) = header.tensors[SD2_V_PROBE].offsets;
        let data = 8 + header.header_len;
        let mut with_spread = |spread: f32| {
            for (i, c) in f[data + from..data + to].chunks_exact_mut(2).enumerate() {
                let v = if i % 2 == 0 { spread } else { -spread };
                c.copy_from_slice(&half::f16::from_f32(0.5 + v).to_le_bytes());
            }
            inspect_bytes(&f).unwrap()
        };
        // Population spreads either side of ComfyUI's 0.09.
        let v = with_spread(0.2);
        assert_eq!(
            (v.family, v.prediction, v.note.as_deref()),
            (Some(ModelFamily::Sd2), Some(Prediction::VPrediction), None)
        );
        let base = with_spread(0.02);
        assert_eq!(
            (base.prediction, base.loadable, base.note.as_deref()),
            (Some(Prediction::Epsilon), true, None)
        );
        // The defaults follow: base at 512, 768-v at 768.
        let size = |i: &CheckpointInfo| {
            crate::model_defaults::ModelDefaults::for_checkpoint("sd2", i)
                .unwrap()
                .width
        };
        assert_eq!((size(&base), size(&v)), (512, 768));
        // From the header alone (no data), the guess and its note.
        let guess = classify(&validate(&f).unwrap());
        assert_eq!(guess.prediction, Some(Prediction::VPrediction));
        assert!(guess.note.unwrap().contains("assumed v-prediction"));
    }

    #[test]
    fn inpainting_and_markers() {
        let f = file(&[
            (V2_PROBE, &[320, 768]),
            (INPAINT_PROBE, &[320, 9, 3, 3]),
            ("v_pred", &[]),
            (
                "cond_stage_model.transformer.text_model.final_layer_norm.weight",
                &[768],
            ),
            ("first_stage_model.decoder.conv_in.weight", &[512, 4, 3, 3]),
            (
                "first_stage_model.decoder.up.0.block.0.conv1.weight",
                &[128, 256, 3, 3],
            ),
        ]);
        let i = inspect_bytes(&f).unwrap();
        assert!(i.inpainting && i.loadable, "{i:?}");
        assert_eq!(i.prediction, Some(Prediction::VPrediction));
        // SD2 inpainting is epsilon, whatever a 768-v guess would say (found by review).
        let sd2 = file(&[
            (V2_PROBE, &[320, 1024]),
            (INPAINT_PROBE, &[320, 9, 3, 3]),
            ("cond_stage_model.model.ln_final.weight", &[1024]),
        ]);
        let i = inspect_bytes(&sd2).unwrap();
        assert_eq!(
            (i.family, i.prediction),
            (Some(ModelFamily::Sd2), Some(Prediction::Epsilon))
        );
        // SDXL inpainting models are refused with the reason.
        let xl = file(&[
            (XL_BASE_PROBE, &[1280]),
            (
                "conditioner.embedders.0.transformer.text_model.final_layer_norm.weight",
                &[8],
            ),
            (INPAINT_PROBE, &[320, 9, 3, 3]),
            ("first_stage_model.decoder.conv_in.weight", &[512, 4, 3, 3]),
        ]);
        let i = inspect_bytes(&xl).unwrap();
        assert_eq!(i.family, Some(ModelFamily::SdxlBase));
        assert!(!i.loadable && i.note.unwrap().contains("SDXL inpainting"));
        // Depth (5) and instruct-pix2pix (8) UNets are refused when listed, not at load.
        for channels in [5, 8] {
            let f = file(&[
                (V2_PROBE, &[320, 768]),
                (INPAINT_PROBE, &[320, channels, 3, 3]),
                (
                    "cond_stage_model.transformer.text_model.final_layer_norm.weight",
                    &[768],
                ),
                ("first_stage_model.decoder.conv_in.weight", &[512, 4, 3, 3]),
            ]);
            let i = inspect_bytes(&f).unwrap();
            assert!(!i.loadable && !i.inpainting, "{channels}");
            let note = i.note.unwrap();
            assert!(note.contains(&format!("{channels}-channel")), "{note}");
        }
    }
}
