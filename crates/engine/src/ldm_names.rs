//! Original-LDM tensor names (single-file checkpoints) for the diffusers names our model code
//! asks for, and a `VarBuilder` backend that serves a memory-mapped single file under diffusers
//! names: model code stays the same for folders and single files, and nothing is converted or
//! copied up front.
//!
//! The rules are those of diffusers `loaders/single_file_utils.py` (`convert_ldm_unet_checkpoint`,
//! `convert_ldm_vae_checkpoint`, `convert_ldm_clip_checkpoint`, `convert_open_clip_checkpoint`,
//! `DIFFUSERS_TO_LDM_MAPPING`), written here in the other direction (diffusers -> LDM), since
//! the model asks for one diffusers name at a time.

use std::sync::Arc;

use candle_core::{DType, Device, Shape, Tensor};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::VarBuilder;

use crate::lora::LayerIndex;
use crate::unet::{OneOrMany, UNetConfig};
use crate::weights::{LoadPatch, TensorError, TensorProblem, Weights};
use crate::Result;

/// How a diffusers tensor is made from what is stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    /// Stored as is under this name.
    Copy(String),
    /// Part `index` of `parts` equal slices along dim 0 (OpenCLIP's fused `in_proj` q/k/v).
    Part {
        name: String,
        index: usize,
        parts: usize,
    },
    /// Stored transposed (OpenCLIP's `text_projection` is `x @ P`, a Linear weight is `P^T`).
    Transpose(String),
    /// Stored as a 1x1 convolution `[out, in, 1, 1]` (or `[out, in, 1]`), used as a Linear
    /// `[out, in]` (the LDM VAE's mid-block attention).
    Conv1x1(String),
}

impl Source {
    /// The stored tensor's name.
    pub fn name(&self) -> &str {
        match self {
            Source::Copy(n) | Source::Transpose(n) | Source::Conv1x1(n) => n,
            Source::Part { name, .. } => name,
        }
    }
}

/// Maps a diffusers name (relative to one component) to its source in the file.
pub trait NameMap: Send + Sync {
    fn source(&self, name: &str) -> Option<Source>;

    /// The diffusers names a stored tensor may serve (the other direction, for LoRA matching,
    /// which needs the component's names up front). Only a proposal: [`MappedNames`] keeps those
    /// whose [`NameMap::source`] is that tensor, so the forward map stays the one authority.
    /// Empty for maps LoRAs never target (the VAE).
    fn candidates(&self, _stored: &str) -> Vec<String> {
        Vec::new()
    }
}

/// UNet: diffusers `UNet2DConditionModel` names -> `model.diffusion_model.*`.
#[derive(Debug, Clone)]
pub struct UnetNames {
    prefix: String,
    /// LDM `input_blocks` index of each down block's first layer.
    down_start: Vec<usize>,
    down_layers: Vec<usize>,
    /// LDM `output_blocks` index of each up block's first layer, its layer count, and whether
    /// it has attentions (then the upsampler sits at `.2` instead of `.1`).
    up_start: Vec<usize>,
    up_layers: Vec<usize>,
    up_attn: Vec<bool>,
}

impl UnetNames {
    pub fn new(cfg: &UNetConfig, prefix: &str) -> Self {
        let n = cfg.block_out_channels.len();
        let down_layers: Vec<usize> = match &cfg.layers_per_block {
            OneOrMany::One(l) => vec![*l; n],
            OneOrMany::Many(v) => v.clone(),
        };
        // input_blocks.0 is conv_in; each down block then has its layers plus one downsampler
        // (the last block has none).
        let mut down_start = Vec::with_capacity(n);
        let mut next = 1;
        for (i, l) in down_layers.iter().enumerate() {
            down_start.push(next);
            next += l + usize::from(i + 1 < n);
        }
        let up_layers: Vec<usize> = down_layers.iter().rev().map(|l| l + 1).collect();
        let mut up_start = Vec::with_capacity(n);
        let mut next = 0;
        for l in &up_layers {
            up_start.push(next);
            next += l;
        }
        let up_attn = cfg
            .up_block_types
            .iter()
            .map(|t| t.contains("CrossAttn"))
            .collect();
        Self {
            prefix: prefix.to_string(),
            down_start,
            down_layers,
            up_start,
            up_layers,
            up_attn,
        }
    }

    fn ldm(&self, name: &str) -> Option<String> {
        let p: Vec<&str> = name.split('.').collect();
        let idx = |s: &str| s.parse::<usize>().ok();
        let rest = |k: usize| p[k..].join(".");
        let fixed = [
            ("time_embedding.linear_1.", "time_embed.0."),
            ("time_embedding.linear_2.", "time_embed.2."),
            ("conv_in.", "input_blocks.0.0."),
            ("conv_norm_out.", "out.0."),
            ("conv_out.", "out.2."),
            // SDXL: its `label_emb` holds the added text/time embedding.
            ("add_embedding.linear_1.", "label_emb.0.0."),
            ("add_embedding.linear_2.", "label_emb.0.2."),
        ];
        for (d, l) in fixed {
            if let Some(tail) = name.strip_prefix(d) {
                return Some(format!("{l}{tail}"));
            }
        }
        match p.as_slice() {
            ["down_blocks", i, "resnets", j, ..] => {
                let (i, j) = (idx(i)?, idx(j)?);
                let b = self.down_start.get(i)? + j;
                Some(format!("input_blocks.{b}.0.{}", resnet(&rest(4))?))
            }
            ["down_blocks", i, "attentions", j, ..] => {
                let (i, j) = (idx(i)?, idx(j)?);
                let b = self.down_start.get(i)? + j;
                Some(format!("input_blocks.{b}.1.{}", rest(4)))
            }
            ["down_blocks", i, "downsamplers", "0", "conv", ..] => {
                let i = idx(i)?;
                let b = self.down_start.get(i)? + self.down_layers.get(i)?;
                Some(format!("input_blocks.{b}.0.op.{}", rest(5)))
            }
            ["mid_block", "resnets", j, ..] => {
                let b = match idx(j)? {
                    0 => 0,
                    1 => 2,
                    _ => return None,
                };
                Some(format!("middle_block.{b}.{}", resnet(&rest(3))?))
            }
            ["mid_block", "attentions", "0", ..] => Some(format!("middle_block.1.{}", rest(3))),
            ["up_blocks", i, "resnets", j, ..] => {
                let (i, j) = (idx(i)?, idx(j)?);
                let b = self.up_start.get(i)? + j;
                Some(format!("output_blocks.{b}.0.{}", resnet(&rest(4))?))
            }
            ["up_blocks", i, "attentions", j, ..] => {
                let (i, j) = (idx(i)?, idx(j)?);
                let b = self.up_start.get(i)? + j;
                Some(format!("output_blocks.{b}.1.{}", rest(4)))
            }
            ["up_blocks", i, "upsamplers", "0", "conv", ..] => {
                let i = idx(i)?;
                let b = self.up_start.get(i)? + self.up_layers.get(i)? - 1;
                let slot = if *self.up_attn.get(i)? { 2 } else { 1 };
                Some(format!("output_blocks.{b}.{slot}.conv.{}", rest(5)))
            }
            _ => None,
        }
    }
}

impl UnetNames {
    /// The LDM name of a diffusers UNet name, without the checkpoint prefix.
    pub fn ldm_name(&self, name: &str) -> Option<String> {
        self.ldm(name)
    }

    /// The diffusers name an LDM name (without prefix) comes from; see [`NameMap::candidates`].
    fn diffusers(&self, ldm: &str) -> Option<String> {
        let p: Vec<&str> = ldm.split('.').collect();
        let idx = |s: &str| s.parse::<usize>().ok();
        let rest = |k: usize| p[k..].join(".");
        let fixed = [
            ("time_embed.0.", "time_embedding.linear_1."),
            ("time_embed.2.", "time_embedding.linear_2."),
            ("input_blocks.0.0.", "conv_in."),
            ("out.0.", "conv_norm_out."),
            ("out.2.", "conv_out."),
            ("label_emb.0.0.", "add_embedding.linear_1."),
            ("label_emb.0.2.", "add_embedding.linear_2."),
        ];
        for (l, d) in fixed {
            if let Some(tail) = ldm.strip_prefix(l) {
                return Some(format!("{d}{tail}"));
            }
        }
        match p.as_slice() {
            ["input_blocks", b, slot, ..] => {
                let b = idx(b)?;
                let i = (0..self.down_start.len()).find(|&i| {
                    b >= self.down_start[i] && b <= self.down_start[i] + self.down_layers[i]
                })?;
                let j = b - self.down_start[i];
                match (*slot, j == self.down_layers[i]) {
                    ("0", true) => Some(format!("down_blocks.{i}.downsamplers.0.conv.{}", rest(4))),
                    ("0", false) => Some(format!(
                        "down_blocks.{i}.resnets.{j}.{}",
                        resnet_diffusers(&rest(3))?
                    )),
                    ("1", false) => Some(format!("down_blocks.{i}.attentions.{j}.{}", rest(3))),
                    _ => None,
                }
            }
            ["middle_block", "0" | "2", ..] => {
                let j = if p[1] == "0" { 0 } else { 1 };
                Some(format!(
                    "mid_block.resnets.{j}.{}",
                    resnet_diffusers(&rest(2))?
                ))
            }
            ["middle_block", "1", ..] => Some(format!("mid_block.attentions.0.{}", rest(2))),
            ["output_blocks", b, slot, ..] => {
                let b = idx(b)?;
                let i = (0..self.up_start.len())
                    .find(|&i| b >= self.up_start[i] && b < self.up_start[i] + self.up_layers[i])?;
                let j = b - self.up_start[i];
                let last = j + 1 == self.up_layers[i];
                match (*slot, self.up_attn[i]) {
                    ("0", _) => Some(format!(
                        "up_blocks.{i}.resnets.{j}.{}",
                        resnet_diffusers(&rest(3))?
                    )),
                    ("1", true) => Some(format!("up_blocks.{i}.attentions.{j}.{}", rest(3))),
                    ("1", false) | ("2", true) if last => {
                        Some(format!("up_blocks.{i}.upsamplers.0.{}", rest(3)))
                    }
                    _ => None,
                }
            }
            _ => None,
        }
    }
}

impl NameMap for UnetNames {
    fn source(&self, name: &str) -> Option<Source> {
        Some(Source::Copy(format!("{}{}", self.prefix, self.ldm(name)?)))
    }

    fn candidates(&self, stored: &str) -> Vec<String> {
        stored
            .strip_prefix(&self.prefix)
            .and_then(|l| self.diffusers(l))
            .into_iter()
            .collect()
    }
}

/// [`resnet`] the other way: an LDM resnet sub-name -> diffusers.
fn resnet_diffusers(tail: &str) -> Option<String> {
    let (module, param) = tail.rsplit_once('.')?;
    let d = match module {
        "in_layers.0" => "norm1",
        "in_layers.2" => "conv1",
        "emb_layers.1" => "time_emb_proj",
        "out_layers.0" => "norm2",
        "out_layers.3" => "conv2",
        "skip_connection" => "conv_shortcut",
        _ => return None,
    };
    Some(format!("{d}.{param}"))
}

/// A UNet resnet's diffusers sub-name -> LDM (`convert_ldm_unet_checkpoint`'s renames).
fn resnet(tail: &str) -> Option<String> {
    let (module, param) = tail.rsplit_once('.')?;
    let ldm = match module {
        "norm1" => "in_layers.0",
        "conv1" => "in_layers.2",
        "time_emb_proj" => "emb_layers.1",
        "norm2" => "out_layers.0",
        "conv2" => "out_layers.3",
        "conv_shortcut" => "skip_connection",
        _ => return None,
    };
    Some(format!("{ldm}.{param}"))
}

/// VAE: diffusers `AutoencoderKL` names -> LDM (`first_stage_model.*` in a checkpoint, no prefix
/// in most VAE files). The decoder's up blocks are numbered the other way round.
#[derive(Debug, Clone)]
pub struct VaeNames {
    prefix: String,
    blocks: usize,
}

impl VaeNames {
    pub fn new(blocks: usize, prefix: &str) -> Self {
        Self {
            prefix: prefix.to_string(),
            blocks,
        }
    }

    fn ldm(&self, name: &str) -> Option<Source> {
        let p: Vec<&str> = name.split('.').collect();
        let idx = |s: &str| s.parse::<usize>().ok();
        let rest = |k: usize| p[k..].join(".");
        let copy = |s: String| Some(Source::Copy(format!("{}{s}", self.prefix)));
        match p.as_slice() {
            ["quant_conv" | "post_quant_conv", ..] => copy(name.to_string()),
            [part @ ("encoder" | "decoder"), "conv_in" | "conv_out", ..] => {
                let _ = part;
                copy(name.to_string())
            }
            [part @ ("encoder" | "decoder"), "conv_norm_out", param] => {
                copy(format!("{part}.norm_out.{param}"))
            }
            ["encoder", "down_blocks", i, "resnets", j, ..] => copy(format!(
                "encoder.down.{i}.block.{j}.{}",
                vae_resnet(&rest(5))
            )),
            ["encoder", "down_blocks", i, "downsamplers", "0", "conv", param] => {
                copy(format!("encoder.down.{i}.downsample.conv.{param}"))
            }
            ["decoder", "up_blocks", i, "resnets", j, ..] => {
                let b = self.blocks.checked_sub(1)?.checked_sub(idx(i)?)?;
                copy(format!("decoder.up.{b}.block.{j}.{}", vae_resnet(&rest(5))))
            }
            ["decoder", "up_blocks", i, "upsamplers", "0", "conv", param] => {
                let b = self.blocks.checked_sub(1)?.checked_sub(idx(i)?)?;
                copy(format!("decoder.up.{b}.upsample.conv.{param}"))
            }
            [part @ ("encoder" | "decoder"), "mid_block", "resnets", j, ..] => {
                let b = idx(j)? + 1;
                copy(format!("{part}.mid.block_{b}.{}", vae_resnet(&rest(4))))
            }
            [part @ ("encoder" | "decoder"), "mid_block", "attentions", "0", module @ .., param] => {
                let m = match module.join(".").as_str() {
                    "group_norm" => "norm",
                    "to_q" => "q",
                    "to_k" => "k",
                    "to_v" => "v",
                    "to_out.0" => "proj_out",
                    _ => return None,
                };
                let stored = format!("{}{part}.mid.attn_1.{m}.{param}", self.prefix);
                if m != "norm" && *param == "weight" {
                    Some(Source::Conv1x1(stored))
                } else {
                    Some(Source::Copy(stored))
                }
            }
            _ => None,
        }
    }
}

impl NameMap for VaeNames {
    fn source(&self, name: &str) -> Option<Source> {
        self.ldm(name)
    }
}

fn vae_resnet(tail: &str) -> String {
    tail.replace("conv_shortcut", "nin_shortcut")
}

/// SD1's CLIP-L (transformers names already, under `cond_stage_model.transformer.`), and SDXL's
/// first encoder (`conditioner.embedders.0.transformer.`). Older files lack the `text_model.`
/// level; [`crate::clip::ClipTextModel::load`] asks for both spellings, so we only add the prefix.
#[derive(Debug, Clone)]
pub struct ClipNames {
    prefix: String,
}

impl ClipNames {
    pub fn new(prefix: &str) -> Self {
        Self {
            prefix: prefix.to_string(),
        }
    }
}

impl NameMap for ClipNames {
    fn source(&self, name: &str) -> Option<Source> {
        Some(Source::Copy(format!("{}{name}", self.prefix)))
    }

    fn candidates(&self, stored: &str) -> Vec<String> {
        stored
            .strip_prefix(&self.prefix)
            .map(str::to_string)
            .into_iter()
            .collect()
    }
}

/// SD2's OpenCLIP-H (`cond_stage_model.model.*`) and SDXL's bigG (`conditioner.embedders.1.model.*`).
#[derive(Debug, Clone)]
pub struct OpenClipNames {
    prefix: String,
    /// SD2's text encoder is a `CLIPTextModel`: diffusers drops `text_projection`
    /// (`SD_2_TEXT_ENCODER_KEYS_TO_IGNORE`). SDXL's second encoder keeps it.
    with_projection: bool,
    /// Some SDXL saves keep the projection as a Linear weight (`text_projection.weight`, already
    /// `P^T`) instead of OpenCLIP's `text_projection` parameter (ComfyUI reads both).
    projection_is_linear: bool,
}

impl OpenClipNames {
    pub fn new(prefix: &str, with_projection: bool) -> Self {
        Self {
            prefix: prefix.to_string(),
            with_projection,
            projection_is_linear: false,
        }
    }

    /// For a file whose projection is stored as `{prefix}text_projection.weight`.
    pub fn projection_stored_as_linear(mut self, yes: bool) -> Self {
        self.projection_is_linear = yes;
        self
    }
}

impl NameMap for OpenClipNames {
    fn source(&self, name: &str) -> Option<Source> {
        let pre = &self.prefix;
        let fixed = match name {
            "text_model.embeddings.token_embedding.weight" => Some("token_embedding.weight"),
            "text_model.embeddings.position_embedding.weight" => Some("positional_embedding"),
            "text_model.final_layer_norm.weight" => Some("ln_final.weight"),
            "text_model.final_layer_norm.bias" => Some("ln_final.bias"),
            _ => None,
        };
        if let Some(f) = fixed {
            return Some(Source::Copy(format!("{pre}{f}")));
        }
        if name == "text_projection.weight" {
            return self.with_projection.then(|| {
                if self.projection_is_linear {
                    Source::Copy(format!("{pre}text_projection.weight"))
                } else {
                    Source::Transpose(format!("{pre}text_projection"))
                }
            });
        }
        let tail = name.strip_prefix("text_model.encoder.layers.")?;
        let (layer, module) = tail.split_once('.')?;
        layer.parse::<usize>().ok()?;
        let block = format!("{pre}transformer.resblocks.{layer}");
        let (module, param) = module.rsplit_once('.')?;
        let part = |index| {
            Some(Source::Part {
                name: format!("{block}.attn.in_proj_{param}"),
                index,
                parts: 3,
            })
        };
        let renamed = match module {
            "self_attn.q_proj" => return part(0),
            "self_attn.k_proj" => return part(1),
            "self_attn.v_proj" => return part(2),
            "self_attn.out_proj" => "attn.out_proj",
            "layer_norm1" => "ln_1",
            "layer_norm2" => "ln_2",
            "mlp.fc1" => "mlp.c_fc",
            "mlp.fc2" => "mlp.c_proj",
            _ => return None,
        };
        Some(Source::Copy(format!("{block}.{renamed}.{param}")))
    }

    fn candidates(&self, stored: &str) -> Vec<String> {
        let Some(tail) = stored.strip_prefix(&self.prefix) else {
            return Vec::new();
        };
        let fixed = match tail {
            "token_embedding.weight" => Some("text_model.embeddings.token_embedding.weight"),
            "positional_embedding" => Some("text_model.embeddings.position_embedding.weight"),
            "ln_final.weight" => Some("text_model.final_layer_norm.weight"),
            "ln_final.bias" => Some("text_model.final_layer_norm.bias"),
            "text_projection" | "text_projection.weight" => Some("text_projection.weight"),
            _ => None,
        };
        if let Some(f) = fixed {
            return vec![f.to_string()];
        }
        let Some(rest) = tail.strip_prefix("transformer.resblocks.") else {
            return Vec::new();
        };
        let Some((layer, module)) = rest.split_once('.') else {
            return Vec::new();
        };
        let layer = format!("text_model.encoder.layers.{layer}");
        if let Some(param) = module.strip_prefix("attn.in_proj_") {
            return ["q_proj", "k_proj", "v_proj"]
                .map(|m| format!("{layer}.self_attn.{m}.{param}"))
                .to_vec();
        }
        let Some((module, param)) = module.rsplit_once('.') else {
            return Vec::new();
        };
        let renamed = match module {
            "attn.out_proj" => "self_attn.out_proj",
            "ln_1" => "layer_norm1",
            "ln_2" => "layer_norm2",
            "mlp.c_fc" => "mlp.fc1",
            "mlp.c_proj" => "mlp.fc2",
            _ => return Vec::new(),
        };
        vec![format!("{layer}.{renamed}.{param}")]
    }
}

/// A `VarBuilder` over a single file whose tensor names differ from our model code's.
pub fn var_builder(
    weights: &Weights,
    names: Arc<dyn NameMap>,
    dtype: DType,
    device: &Device,
) -> Result<VarBuilder<'static>> {
    var_builder_patched(weights, names, dtype, device, None)
}

/// [`var_builder`] with a [`LoadPatch`] (merged LoRA weights) applied to the tensors it names,
/// by their diffusers names, as `Weights::var_builder_patched` does for a diffusers folder.
pub fn var_builder_patched(
    weights: &Weights,
    names: Arc<dyn NameMap>,
    dtype: DType,
    device: &Device,
    patch: Option<Arc<dyn LoadPatch>>,
) -> Result<VarBuilder<'static>> {
    // Reuse weights.rs's dtype check by building (and dropping) its own builder.
    weights.var_builder(dtype, device)?;
    Ok(VarBuilder::from_backend(
        Box::new(Mapped {
            weights: weights.clone(),
            names,
            patch,
        }),
        dtype,
        device.clone(),
    ))
}

/// A single file's tensors under the diffusers names a [`NameMap`] gives them, with the shapes
/// the model gets (after splits and transposes): what LoRA matching needs
/// ([`crate::lora::LayerIndex`]).
pub struct MappedNames {
    names: Arc<dyn NameMap>,
    /// diffusers name -> shape.
    shapes: std::collections::HashMap<String, Vec<usize>>,
    /// The checkpoint prefix of the component (`model.diffusion_model.`), stripped for
    /// [`crate::lora::LayerIndex::ldm_name`].
    prefix: String,
}

impl MappedNames {
    pub fn new(weights: &Weights, names: Arc<dyn NameMap>, prefix: &str) -> Self {
        let mut shapes = std::collections::HashMap::new();
        for stored in weights.names() {
            for name in names.candidates(stored) {
                let Some(source) = names.source(&name) else {
                    continue;
                };
                if source.name() != stored {
                    continue;
                }
                if let Some(shape) = produced_shape(&source, weights.shape(stored).unwrap_or(&[])) {
                    shapes.insert(name, shape);
                }
            }
        }
        Self {
            names,
            shapes,
            prefix: prefix.to_string(),
        }
    }
}

impl LayerIndex for MappedNames {
    fn layer_names(&self) -> Vec<String> {
        self.shapes.keys().cloned().collect()
    }

    fn layer_shape(&self, name: &str) -> Option<Vec<usize>> {
        self.shapes.get(name).cloned()
    }

    fn ldm_name(&self, name: &str) -> Option<String> {
        let source = self.names.source(name)?;
        source.name().strip_prefix(&self.prefix).map(str::to_string)
    }
}

/// A diffusers folder's UNet weights, which also know each tensor's LDM name, so Kohya SDXL
/// LoRAs (`lora_unet_input_blocks_4_1_...`) find their layers in folders as in single files.
pub struct FolderUnetNames<'a> {
    weights: &'a Weights,
    names: UnetNames,
}

impl<'a> FolderUnetNames<'a> {
    pub fn new(weights: &'a Weights, cfg: &UNetConfig) -> Self {
        Self {
            weights,
            names: UnetNames::new(cfg, ""),
        }
    }
}

impl LayerIndex for FolderUnetNames<'_> {
    fn layer_names(&self) -> Vec<String> {
        self.weights.layer_names()
    }

    fn layer_shape(&self, name: &str) -> Option<Vec<usize>> {
        self.weights.layer_shape(name)
    }

    fn ldm_name(&self, name: &str) -> Option<String> {
        self.names.ldm_name(name)
    }
}

/// The shape the model gets from a stored tensor of shape `stored`; `None` when it cannot.
fn produced_shape(source: &Source, stored: &[usize]) -> Option<Vec<usize>> {
    match source {
        Source::Copy(_) => Some(stored.to_vec()),
        Source::Transpose(_) => (stored.len() == 2).then(|| vec![stored[1], stored[0]]),
        Source::Conv1x1(_) => (stored.len() >= 2).then(|| stored[..2].to_vec()),
        Source::Part { parts, .. } => {
            let rows = *stored.first()?;
            if rows == 0 || rows % parts != 0 {
                return None;
            }
            let mut s = stored.to_vec();
            s[0] = rows / parts;
            Some(s)
        }
    }
}

struct Mapped {
    weights: Weights,
    names: Arc<dyn NameMap>,
    patch: Option<Arc<dyn LoadPatch>>,
}

impl Mapped {
    fn error(&self, tensor: String, kind: TensorProblem) -> candle_core::Error {
        let file = self
            .weights
            .files()
            .next()
            .map(|p| p.to_path_buf())
            .unwrap_or_default();
        // `WrappedContext` keeps the `TensorError` so `EngineError::from` finds it and names the
        // file and tensor, as for a diffusers folder.
        candle_core::Error::WrappedContext {
            wrapped: Box::new(TensorError { file, tensor, kind }),
            context: "loading model weights".into(),
        }
    }

    /// [`Self::load_unpatched`], merged with the patch when it names `name` (in f32, as
    /// weights.rs does: an f16 sum of a small delta loses bits).
    fn load(
        &self,
        name: &str,
        expected: Option<&Shape>,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        match &self.patch {
            Some(p) if p.touches(name) => p
                .apply(name, self.load_unpatched(name, expected, DType::F32, dev)?)?
                .to_dtype(dtype),
            _ => self.load_unpatched(name, expected, dtype, dev),
        }
    }

    fn load_unpatched(
        &self,
        name: &str,
        expected: Option<&Shape>,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        let Some(source) = self.names.source(name) else {
            return Err(self.error(
                format!("{name} (no tensor of a single-file checkpoint maps to it)"),
                TensorProblem::Missing { files: 1 },
            ));
        };
        let stored = source.name();
        // Report the name the user can find in the file, with the one the model asked for.
        let label = format!("{stored}` (for `{name}");
        let Some(shape) = self.weights.shape(stored).map(<[usize]>::to_vec) else {
            return Err(self.error(label, TensorProblem::Missing { files: 1 }));
        };
        let wanted: Option<Vec<usize>> = expected.map(|s| s.dims().to_vec());
        let check = |produced: &[usize]| -> candle_core::Result<()> {
            match &wanted {
                Some(w) if w.as_slice() != produced => Err(self.error(
                    label.clone(),
                    TensorProblem::Shape {
                        expected: w.clone(),
                        found: shape.clone(),
                    },
                )),
                _ => Ok(()),
            }
        };
        let read = || {
            self.weights
                .load(stored, dtype, dev)
                .map_err(|e| self.error(label.clone(), TensorProblem::Unreadable(e.to_string())))
        };
        match &source {
            Source::Copy(_) => {
                check(&shape)?;
                read()
            }
            Source::Transpose(_) => {
                let produced: Vec<usize> = shape.iter().rev().copied().collect();
                if shape.len() != 2 {
                    return Err(self.error(
                        label.clone(),
                        TensorProblem::Unreadable("expected a matrix".into()),
                    ));
                }
                check(&produced)?;
                read()?.t()?.contiguous()
            }
            Source::Conv1x1(_) => {
                let ok = matches!(shape.as_slice(), [_, _] | [_, _, 1] | [_, _, 1, 1]);
                if !ok {
                    return Err(self.error(
                        label.clone(),
                        TensorProblem::Unreadable(format!(
                            "expected a 1x1 convolution weight, found shape {shape:?}"
                        )),
                    ));
                }
                let produced = shape[..2].to_vec();
                check(&produced)?;
                read()?.reshape(produced)
            }
            Source::Part { index, parts, .. } => {
                let rows = shape.first().copied().unwrap_or(0);
                if rows == 0 || rows % parts != 0 {
                    return Err(self.error(
                        label.clone(),
                        TensorProblem::Unreadable(format!(
                            "cannot split {rows} rows into {parts} parts"
                        )),
                    ));
                }
                let mut produced = shape.clone();
                produced[0] = rows / parts;
                check(&produced)?;
                read()?
                    .narrow(0, index * produced[0], produced[0])?
                    .contiguous()
            }
        }
    }
}

impl SimpleBackend for Mapped {
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
        self.names
            .source(name)
            .is_some_and(|s| self.weights.contains(s.name()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sd15_unet() -> UNetConfig {
        UNetConfig::from_json(crate::single_file::SD15_UNET).unwrap()
    }

    #[test]
    fn unet_names_follow_the_ldm_layout() {
        let m = UnetNames::new(&sd15_unet(), "");
        let cases = [
            ("conv_in.weight", "input_blocks.0.0.weight"),
            ("time_embedding.linear_2.bias", "time_embed.2.bias"),
            (
                "down_blocks.0.resnets.1.norm1.weight",
                "input_blocks.2.0.in_layers.0.weight",
            ),
            (
                "down_blocks.0.attentions.1.proj_in.weight",
                "input_blocks.2.1.proj_in.weight",
            ),
            (
                "down_blocks.0.downsamplers.0.conv.weight",
                "input_blocks.3.0.op.weight",
            ),
            (
                "down_blocks.1.resnets.0.conv_shortcut.weight",
                "input_blocks.4.0.skip_connection.weight",
            ),
            (
                "down_blocks.3.resnets.1.time_emb_proj.bias",
                "input_blocks.11.0.emb_layers.1.bias",
            ),
            (
                "mid_block.resnets.1.conv2.weight",
                "middle_block.2.out_layers.3.weight",
            ),
            (
                "mid_block.attentions.0.transformer_blocks.0.attn2.to_k.weight",
                "middle_block.1.transformer_blocks.0.attn2.to_k.weight",
            ),
            (
                "up_blocks.0.resnets.2.conv1.weight",
                "output_blocks.2.0.in_layers.2.weight",
            ),
            (
                "up_blocks.0.upsamplers.0.conv.weight",
                "output_blocks.2.1.conv.weight",
            ),
            (
                "up_blocks.1.upsamplers.0.conv.bias",
                "output_blocks.5.2.conv.bias",
            ),
            (
                "up_blocks.3.attentions.2.norm.weight",
                "output_blocks.11.1.norm.weight",
            ),
            ("conv_norm_out.weight", "out.0.weight"),
        ];
        for (d, l) in cases {
            assert_eq!(m.ldm(d).as_deref(), Some(l), "{d}");
        }
        assert_eq!(m.ldm("down_blocks.9.resnets.0.conv1.weight"), None);
    }

    #[test]
    fn vae_and_open_clip_names() {
        let v = VaeNames::new(4, "first_stage_model.");
        assert_eq!(
            v.source("decoder.up_blocks.0.resnets.2.conv_shortcut.weight"),
            Some(Source::Copy(
                "first_stage_model.decoder.up.3.block.2.nin_shortcut.weight".into()
            ))
        );
        assert_eq!(
            v.source("encoder.mid_block.attentions.0.to_out.0.weight"),
            Some(Source::Conv1x1(
                "first_stage_model.encoder.mid.attn_1.proj_out.weight".into()
            ))
        );
        assert_eq!(
            v.source("decoder.mid_block.attentions.0.group_norm.bias"),
            Some(Source::Copy(
                "first_stage_model.decoder.mid.attn_1.norm.bias".into()
            ))
        );
        assert_eq!(
            v.source("encoder.conv_norm_out.weight"),
            Some(Source::Copy(
                "first_stage_model.encoder.norm_out.weight".into()
            ))
        );
        let o = OpenClipNames::new("cond_stage_model.model.", false);
        assert_eq!(
            o.source("text_model.encoder.layers.3.self_attn.k_proj.bias"),
            Some(Source::Part {
                name: "cond_stage_model.model.transformer.resblocks.3.attn.in_proj_bias".into(),
                index: 1,
                parts: 3
            })
        );
        assert_eq!(
            o.source("text_model.encoder.layers.0.mlp.fc2.weight"),
            Some(Source::Copy(
                "cond_stage_model.model.transformer.resblocks.0.mlp.c_proj.weight".into()
            ))
        );
        assert_eq!(o.source("text_projection.weight"), None);
        assert_eq!(
            OpenClipNames::new("p.", true).source("text_projection.weight"),
            Some(Source::Transpose("p.text_projection".into()))
        );
        assert_eq!(
            OpenClipNames::new("p.", true)
                .projection_stored_as_linear(true)
                .source("text_projection.weight"),
            Some(Source::Copy("p.text_projection.weight".into()))
        );
    }
}
