//! LoRA files merged into the UNet and text encoder weights as they load:
//! `W' = W + multiplier * alpha / rank * (up @ down)` (convolutions reshaped to match).
//!
//! Formats read:
//! - Kohya / sd-scripts (what Civitai ships): `lora_unet_<module>` and `lora_te_<module>` (also
//!   `lora_te1_`/`lora_te2_`), each with `lora_down.weight`, `lora_up.weight` and an optional
//!   `alpha`; the module name is the diffusers/transformers path with `.` written as `_`
//!   (`lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q`). LoCon conv
//!   layers (`down` `[r, in, k, k]`, `up` `[out, r, 1, 1]`, 3x3 included) merge the same way.
//!   sd-scripts' SDXL LoRAs name UNet layers by their original LDM path instead
//!   (`lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q`); those are matched through
//!   [`crate::ldm_names`] ([`LayerIndex::ldm_name`]).
//! - diffusers / PEFT: `unet.<path>.lora_A.weight` / `lora_B.weight` (also `lora.down/up` and
//!   `lora_down/up`) and `text_encoder.<path>...`, alpha from the file's
//!   `lora_adapter_metadata` (diffusers `save_lora_weights`), from `<path>.alpha` keys, or else
//!   equal to the rank (scale 1), as diffusers assumes.
//!
//! Module names are matched against the names the model's weights actually have (for a
//! single-file checkpoint, the diffusers names its LDM tensors serve), so nothing is guessed;
//! whatever matches nothing is reported in [`LoraWarning`]s, and a file that matches nothing at
//! all (a LoRA for another model family) is an error.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::{DType, Device, Tensor};

use crate::weights::{LoadPatch, Weights};
use crate::{EngineError, Result};

/// One LoRA to merge, with A1111's two multipliers (`<lora:name:te:unet>`).
#[derive(Debug, Clone, PartialEq)]
pub struct LoraSpec {
    pub path: PathBuf,
    pub unet_weight: f64,
    pub text_encoder_weight: f64,
}

impl LoraSpec {
    /// The same multiplier for the UNet and the text encoder (`<lora:name:w>`).
    pub fn new(path: impl Into<PathBuf>, weight: f64) -> Self {
        Self {
            path: path.into(),
            unet_weight: weight,
            text_encoder_weight: weight,
        }
    }
}

/// The model component a LoRA module changes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum LoraTarget {
    Unet,
    TextEncoder,
    /// SDXL's second text encoder.
    TextEncoder2,
}

impl LoraTarget {
    /// The diffusers folder name of the component.
    pub fn component(self) -> &'static str {
        match self {
            LoraTarget::Unet => "unet",
            LoraTarget::TextEncoder => "text_encoder",
            LoraTarget::TextEncoder2 => "text_encoder_2",
        }
    }
}

/// Something in a LoRA file that was not merged. The rest of the file still is.
#[derive(Debug, Clone, PartialEq)]
pub enum LoraWarning {
    /// Modules naming layers this model does not have (e.g. an SDXL LoRA's extra blocks).
    UnknownTargets { path: PathBuf, modules: Vec<String> },
    /// Modules of a kind we cannot merge (LyCORIS LoHa/LoKr, DoRA, CP-decomposed conv, ...).
    Unsupported {
        path: PathBuf,
        modules: Vec<String>,
        what: String,
    },
    /// The layer exists but the LoRA was made for another shape.
    ShapeMismatch {
        path: PathBuf,
        module: String,
        layer: Vec<usize>,
        lora: Vec<usize>,
    },
    /// A `down` without its `up` or the other way round.
    Incomplete { path: PathBuf, module: String },
    /// Modules for a component this model has not got (a second text encoder on SD1).
    MissingComponent {
        path: PathBuf,
        component: &'static str,
        modules: usize,
    },
}

impl fmt::Display for LoraWarning {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let list = |m: &[String]| {
            let shown: Vec<&str> = m.iter().take(5).map(String::as_str).collect();
            let more = m.len().saturating_sub(shown.len());
            if more > 0 {
                format!("{} and {more} more", shown.join(", "))
            } else {
                shown.join(", ")
            }
        };
        match self {
            LoraWarning::UnknownTargets { path, modules } => write!(
                f,
                "{}: {} modules match no layer of this model and were not applied: {}",
                path.display(),
                modules.len(),
                list(modules)
            ),
            LoraWarning::Unsupported {
                path,
                modules,
                what,
            } => write!(
                f,
                "{}: {} modules are {what}, which cannot be merged yet: {}",
                path.display(),
                modules.len(),
                list(modules)
            ),
            LoraWarning::ShapeMismatch {
                path,
                module,
                layer,
                lora,
            } => write!(
                f,
                "{}: module {module} makes a {lora:?} update for a {layer:?} layer; not applied",
                path.display()
            ),
            LoraWarning::Incomplete { path, module } => write!(
                f,
                "{}: module {module} lacks its up or down matrix; not applied",
                path.display()
            ),
            LoraWarning::MissingComponent {
                path,
                component,
                modules,
            } => write!(
                f,
                "{}: {modules} modules target {component}, which this model does not have",
                path.display()
            ),
        }
    }
}

/// How a module is named in its file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Naming {
    /// Kohya: the layer path with `_` for `.`.
    Underscored,
    /// diffusers/PEFT: the layer path as is.
    Dotted,
}

#[derive(Debug, Default)]
struct Parts {
    down: Option<String>,
    up: Option<String>,
    alpha: Option<String>,
}

/// One low-rank module as read from the file.
#[derive(Debug)]
struct Module {
    target: LoraTarget,
    naming: Naming,
    /// Layer path without `.weight` (dotted or underscored, see `naming`).
    layer: String,
    /// How the file names it, for messages.
    label: String,
    parts: Parts,
}

/// A LoRA file, opened and sorted into modules; tensors are read when merged.
#[derive(Debug)]
pub struct LoraFile {
    path: PathBuf,
    weights: Weights,
    modules: Vec<Module>,
    /// (what, module labels) for modules that cannot be merged.
    unsupported: BTreeMap<String, Vec<String>>,
    /// PEFT alpha settings from the file metadata, per component.
    peft: HashMap<LoraTarget, PeftAlpha>,
}

/// diffusers' `lora_adapter_metadata`: PEFT `LoraConfig` fields per component.
#[derive(Debug, Clone, Default)]
struct PeftAlpha {
    lora_alpha: Option<f64>,
    /// Layer-name pattern -> alpha (PEFT matches it against the end of the module path).
    alpha_pattern: Vec<(String, f64)>,
    /// rsLoRA: scale alpha / sqrt(rank) instead of alpha / rank.
    use_rslora: bool,
}

const KOHYA_PREFIXES: [(&str, LoraTarget); 4] = [
    ("lora_unet_", LoraTarget::Unet),
    ("lora_te1_", LoraTarget::TextEncoder),
    ("lora_te2_", LoraTarget::TextEncoder2),
    ("lora_te_", LoraTarget::TextEncoder),
];

const DOTTED_PREFIXES: [(&str, LoraTarget); 3] = [
    ("unet.", LoraTarget::Unet),
    ("text_encoder_2.", LoraTarget::TextEncoder2),
    ("text_encoder.", LoraTarget::TextEncoder),
];

/// (suffix, part): `d` down, `u` up, `a` alpha. Longest first where one ends another.
const DOTTED_SUFFIXES: [(&str, char); 8] = [
    (".lora_A.default.weight", 'd'),
    (".lora_B.default.weight", 'u'),
    (".lora_A.weight", 'd'),
    (".lora_B.weight", 'u'),
    (".lora.down.weight", 'd'),
    (".lora.up.weight", 'u'),
    (".lora_down.weight", 'd'),
    (".lora_up.weight", 'u'),
];

/// Kohya-side names of LyCORIS / other module kinds we recognise but cannot merge.
const UNSUPPORTED_PARTS: [(&str, &str); 8] = [
    ("hada_", "LoHa (LyCORIS)"),
    ("lokr_", "LoKr (LyCORIS)"),
    ("lora_mid", "CP-decomposed LoCon (lora_mid)"),
    ("dora_scale", "DoRA"),
    ("oft_", "OFT"),
    ("diff", "full weight differences"),
    ("bias_indices", "bias updates"),
    ("w_norm", "GLoRA/norm updates"),
];

impl LoraFile {
    /// Opens a `.safetensors` LoRA and sorts its keys into modules. Pickle files are refused.
    pub fn open(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref().to_path_buf();
        let ext = path
            .extension()
            .and_then(|e| e.to_str())
            .map(str::to_ascii_lowercase);
        if matches!(ext.as_deref(), Some("pt" | "bin" | "ckpt" | "pth")) {
            return Err(EngineError::PickleRefused { path });
        }
        let weights = Weights::open(&path)?;
        let mut modules: BTreeMap<(LoraTarget, String), Module> = BTreeMap::new();
        let mut unsupported: BTreeMap<String, Vec<String>> = BTreeMap::new();
        let mut unknown_keys = Vec::new();
        let mut names: Vec<&str> = weights.names().collect();
        names.sort_unstable();
        for key in names {
            let Some((target, naming, layer, part)) = classify(key) else {
                unknown_keys.push(key.to_string());
                continue;
            };
            let label = match naming {
                Naming::Underscored => key.split('.').next().unwrap_or(key).to_string(),
                Naming::Dotted => format!("{}.{layer}", target.component()),
            };
            match part {
                Part::Down | Part::Up | Part::Alpha => {
                    let m = modules
                        .entry((target, layer.clone()))
                        .or_insert_with(|| Module {
                            target,
                            naming,
                            layer,
                            label,
                            parts: Parts::default(),
                        });
                    let slot = match part {
                        Part::Down => &mut m.parts.down,
                        Part::Up => &mut m.parts.up,
                        _ => &mut m.parts.alpha,
                    };
                    *slot = Some(key.to_string());
                }
                Part::Unsupported(what) => {
                    let list = unsupported.entry(what.to_string()).or_default();
                    if !list.contains(&label) {
                        list.push(label);
                    }
                }
            }
        }
        if !unknown_keys.is_empty() {
            unsupported.insert("not LoRA keys we know".into(), unknown_keys);
        }
        let peft = read_peft_metadata(&path, &weights)?;
        Ok(Self {
            path,
            weights,
            modules: modules.into_values().collect(),
            unsupported,
            peft,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// How many mergeable modules the file has.
    pub fn len(&self) -> usize {
        self.modules.len()
    }

    pub fn is_empty(&self) -> bool {
        self.modules.is_empty()
    }

    /// The components the file changes.
    pub fn targets(&self) -> Vec<LoraTarget> {
        let mut t: Vec<LoraTarget> = self.modules.iter().map(|m| m.target).collect();
        t.sort();
        t.dedup();
        t
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Part {
    Down,
    Up,
    Alpha,
    Unsupported(&'static str),
}

/// Sorts one key: (component, naming, layer path, which part).
fn classify(key: &str) -> Option<(LoraTarget, Naming, String, Part)> {
    for (prefix, target) in KOHYA_PREFIXES {
        if let Some(rest) = key.strip_prefix(prefix) {
            // Kohya module names have no dots; what follows the first dot is the part.
            let (layer, part) = rest.split_once('.')?;
            let part = match part {
                "lora_down.weight" => Part::Down,
                "lora_up.weight" => Part::Up,
                "alpha" => Part::Alpha,
                other => Part::Unsupported(unsupported_kind(other)),
            };
            return Some((target, Naming::Underscored, layer.to_string(), part));
        }
    }
    for (prefix, target) in DOTTED_PREFIXES {
        if let Some(rest) = key.strip_prefix(prefix) {
            for (suffix, p) in DOTTED_SUFFIXES {
                if let Some(layer) = rest.strip_suffix(suffix) {
                    let part = if p == 'd' { Part::Down } else { Part::Up };
                    return Some((target, Naming::Dotted, layer.to_string(), part));
                }
            }
            if let Some(layer) = rest.strip_suffix(".alpha") {
                return Some((target, Naming::Dotted, layer.to_string(), Part::Alpha));
            }
            let (layer, last) = rest.rsplit_once('.')?;
            return Some((
                target,
                Naming::Dotted,
                layer.to_string(),
                Part::Unsupported(unsupported_kind(last)),
            ));
        }
    }
    None
}

fn unsupported_kind(part: &str) -> &'static str {
    UNSUPPORTED_PARTS
        .iter()
        .find(|(p, _)| part.starts_with(p))
        .map_or("an unknown module kind", |(_, what)| what)
}

/// Reads `lora_adapter_metadata` (JSON with `unet.lora_alpha`, `unet.alpha_pattern`,
/// `unet.use_rslora`, `text_encoder.…`), which diffusers' `save_lora_weights` writes.
fn read_peft_metadata(path: &Path, weights: &Weights) -> Result<HashMap<LoraTarget, PeftAlpha>> {
    let mut out: HashMap<LoraTarget, PeftAlpha> = HashMap::new();
    // "lora_adapter_metadata": diffusers `LORA_ADAPTER_METADATA_KEY` (loaders/lora_base.py).
    let Some(json) = weights.metadata().get("lora_adapter_metadata") else {
        return Ok(out);
    };
    let value: serde_json::Value =
        serde_json::from_str(json).map_err(|e| EngineError::Weights {
            path: path.to_path_buf(),
            message: format!("lora_adapter_metadata is not valid JSON: {e}"),
        })?;
    let Some(map) = value.as_object() else {
        return Ok(out);
    };
    for (key, v) in map {
        let Some((prefix, field)) = key.split_once('.') else {
            continue;
        };
        let Some(target) = DOTTED_PREFIXES
            .iter()
            .find(|(p, _)| p.trim_end_matches('.') == prefix)
            .map(|(_, t)| *t)
        else {
            continue;
        };
        let entry = out.entry(target).or_default();
        match field {
            "lora_alpha" => entry.lora_alpha = v.as_f64(),
            "use_rslora" => entry.use_rslora = v.as_bool().unwrap_or(false),
            "alpha_pattern" => {
                if let Some(m) = v.as_object() {
                    entry.alpha_pattern = m
                        .iter()
                        .filter_map(|(k, a)| Some((k.clone(), a.as_f64()?)))
                        .collect();
                }
            }
            _ => {}
        }
    }
    Ok(out)
}

/// One `scale * up @ down` update, kept factored until its layer loads.
struct Delta {
    /// `[out, rank]`, f32, CPU.
    up: Tensor,
    /// `[rank, in * kh * kw]`, f32, CPU.
    down: Tensor,
    scale: f64,
}

/// The tensors of one model component as LoRA matching sees them: diffusers/transformers names
/// and the shapes the model gets. A diffusers folder's [`Weights`] are one; a single-file
/// checkpoint is seen through its LDM renaming ([`crate::ldm_names::MappedNames`]), so a LoRA
/// merges the same way into either.
pub trait LayerIndex {
    /// Every tensor name, as the model code asks for it.
    fn layer_names(&self) -> Vec<String>;
    /// The shape the model gets for `name`; `None` when there is no such tensor.
    fn layer_shape(&self, name: &str) -> Option<Vec<usize>>;
    /// The original-LDM name of `name` (no checkpoint prefix) when known. Kohya's SDXL LoRAs name
    /// UNet layers that way (`lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q`),
    /// since sd-scripts trains SDXL on the original model code.
    fn ldm_name(&self, _name: &str) -> Option<String> {
        None
    }
}

impl LayerIndex for Weights {
    fn layer_names(&self) -> Vec<String> {
        self.names().map(str::to_string).collect()
    }

    fn layer_shape(&self, name: &str) -> Option<Vec<usize>> {
        self.shape(name).map(<[usize]>::to_vec)
    }
}

/// The updates for one component, by weight name.
struct Deltas(HashMap<String, Vec<Delta>>);

impl LoadPatch for Deltas {
    fn touches(&self, name: &str) -> bool {
        self.0.contains_key(name)
    }

    fn apply(&self, name: &str, tensor: Tensor) -> candle_core::Result<Tensor> {
        let Some(deltas) = self.0.get(name) else {
            return Ok(tensor);
        };
        let dev = tensor.device().clone();
        let mut w = tensor;
        for d in deltas {
            let delta = (d.up.to_device(&dev)?.matmul(&d.down.to_device(&dev)?)? * d.scale)?;
            let delta = delta.reshape(w.shape())?;
            w = (w + delta)?;
        }
        Ok(w)
    }
}

/// The LoRAs of one model load: open them with [`LoraSet::open`], ask for each component's patch
/// with [`LoraSet::patch_for`] while loading it, then [`LoraSet::finish`].
pub struct LoraSet {
    files: Vec<(LoraSpec, LoraFile)>,
    /// Modules merged per file.
    merged: Vec<usize>,
    /// Components seen so far.
    resolved: Vec<LoraTarget>,
    warnings: Vec<LoraWarning>,
}

impl fmt::Debug for LoraSet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LoraSet")
            .field(
                "files",
                &self.files.iter().map(|(s, _)| s).collect::<Vec<_>>(),
            )
            .finish()
    }
}

impl LoraSet {
    /// Opens every file; any that cannot be read is an error naming it.
    pub fn open(specs: &[LoraSpec]) -> Result<Self> {
        let mut files = Vec::with_capacity(specs.len());
        for spec in specs {
            for (what, value) in [
                ("unet_weight", spec.unet_weight),
                ("text_encoder_weight", spec.text_encoder_weight),
            ] {
                if !value.is_finite() {
                    return Err(EngineError::InvalidRequest(format!(
                        "LoRA {}: {what} must be a finite number, got {value}",
                        spec.path.display()
                    )));
                }
            }
            files.push((spec.clone(), LoraFile::open(&spec.path)?));
        }
        let mut warnings = Vec::new();
        for (_, file) in &files {
            for (what, modules) in &file.unsupported {
                warnings.push(LoraWarning::Unsupported {
                    path: file.path.clone(),
                    modules: modules.clone(),
                    what: what.clone(),
                });
            }
        }
        Ok(Self {
            merged: vec![0; files.len()],
            files,
            resolved: Vec::new(),
            warnings,
        })
    }

    pub fn is_empty(&self) -> bool {
        self.files.is_empty()
    }

    /// The patch that merges every module aimed at `target` into `weights` (the component's
    /// tensors, named as diffusers/transformers name them), or `None` when no module is.
    /// Modules that match no tensor, or one of another shape, become warnings.
    pub fn patch_for(
        &mut self,
        target: LoraTarget,
        weights: &dyn LayerIndex,
    ) -> Result<Option<Arc<dyn LoadPatch>>> {
        self.resolved.push(target);
        let names = LayerNames::new(weights, target);
        let mut deltas: HashMap<String, Vec<Delta>> = HashMap::new();
        for (i, (spec, file)) in self.files.iter().enumerate() {
            let multiplier = match target {
                LoraTarget::Unet => spec.unet_weight,
                _ => spec.text_encoder_weight,
            };
            let mut unknown = Vec::new();
            for m in file.modules.iter().filter(|m| m.target == target) {
                let Some(weight_name) = names.find(m) else {
                    unknown.push(m.label.clone());
                    continue;
                };
                let (Some(down), Some(up)) = (&m.parts.down, &m.parts.up) else {
                    self.warnings.push(LoraWarning::Incomplete {
                        path: file.path.clone(),
                        module: m.label.clone(),
                    });
                    continue;
                };
                let down = file.weights.load(down, DType::F32, &Device::Cpu)?;
                let up = file.weights.load(up, DType::F32, &Device::Cpu)?;
                let layer = weights.layer_shape(&weight_name).unwrap_or_default();
                let Some((up, down)) = factor_shapes(&up, &down, &layer)? else {
                    self.warnings.push(LoraWarning::ShapeMismatch {
                        path: file.path.clone(),
                        module: m.label.clone(),
                        layer,
                        lora: vec![up.dim(0)?, down.elem_count() / down.dim(0)?.max(1)],
                    });
                    continue;
                };
                let rank = down.dim(0)? as f64;
                let alpha = match &m.parts.alpha {
                    Some(key) => Some(
                        file.weights
                            .load(key, DType::F32, &Device::Cpu)?
                            .flatten_all()?
                            .get(0)?
                            .to_scalar::<f32>()? as f64,
                    ),
                    None => None,
                };
                let peft = file.peft.get(&target);
                let alpha = alpha
                    .or_else(|| peft.and_then(|p| p.alpha_for(&m.layer)))
                    .unwrap_or(rank);
                let denominator = if peft.is_some_and(|p| p.use_rslora) {
                    rank.sqrt()
                } else {
                    rank
                };
                deltas.entry(weight_name).or_default().push(Delta {
                    up,
                    down,
                    scale: multiplier * alpha / denominator,
                });
                self.merged[i] += 1;
            }
            if !unknown.is_empty() {
                self.warnings.push(LoraWarning::UnknownTargets {
                    path: file.path.clone(),
                    modules: unknown,
                });
            }
        }
        if deltas.is_empty() {
            return Ok(None);
        }
        Ok(Some(Arc::new(Deltas(deltas))))
    }

    /// Ends the load: a file of which no module was merged is an error (it is for another model
    /// family); otherwise the warnings (modules not merged, components this model lacks).
    pub fn finish(mut self) -> Result<Vec<LoraWarning>> {
        for (i, (_, file)) in self.files.iter().enumerate() {
            for target in file.targets() {
                if !self.resolved.contains(&target) {
                    let modules = file.modules.iter().filter(|m| m.target == target).count();
                    self.warnings.push(LoraWarning::MissingComponent {
                        path: file.path.clone(),
                        component: target.component(),
                        modules,
                    });
                }
            }
            if self.merged[i] == 0 {
                return Err(EngineError::Weights {
                    path: file.path.clone(),
                    message: format!(
                        "none of its {} LoRA modules fit this model; it was probably made for \
                         another model family (SD1, SD2, SDXL)",
                        file.modules.len()
                    ),
                });
            }
        }
        for w in &self.warnings {
            tracing::warn!("{w}");
        }
        Ok(self.warnings)
    }
}

impl PeftAlpha {
    /// PEFT's rule: an `alpha_pattern` key matches when the module path ends with it at a `.`
    /// boundary; otherwise `lora_alpha`.
    fn alpha_for(&self, layer: &str) -> Option<f64> {
        self.alpha_pattern
            .iter()
            .find(|(p, _)| layer == p || layer.ends_with(&format!(".{p}")))
            .map(|(_, a)| *a)
            .or(self.lora_alpha)
    }
}

/// `up` `[out, r, ...]` and `down` `[r, in, ...]` as `[out, r]` and `[r, rest]` when their
/// product has the layer's size (and its output size); `None` when it does not fit.
fn factor_shapes(up: &Tensor, down: &Tensor, layer: &[usize]) -> Result<Option<(Tensor, Tensor)>> {
    if up.rank() < 2 || down.rank() < 2 || layer.is_empty() {
        return Ok(None);
    }
    let (out, r) = (up.dim(0)?, up.dim(1)?);
    let rank = down.dim(0)?;
    let rest = down.elem_count() / rank.max(1);
    let layer_size: usize = layer.iter().product();
    // up's extra dims must be 1x1: a LoCon up is a 1x1 conv.
    if r != rank || up.elem_count() != out * r || out != layer[0] || out * rest != layer_size {
        return Ok(None);
    }
    Ok(Some((up.reshape((out, r))?, down.reshape((rank, rest))?)))
}

/// The `.weight` tensors of a component, findable by dotted or Kohya-underscored layer path.
///
/// CLIP layers are named with or without transformers' `text_model.` level depending on who
/// saved them (transformers 5 drops it, Kohya and older diffusers files keep it), in the model
/// and in the LoRA alike, so text encoder names are compared without it. UNet layers are also
/// findable by their underscored LDM path when the index knows it (Kohya SDXL LoRAs).
struct LayerNames<'a> {
    index: &'a dyn LayerIndex,
    /// Underscored layer path (without `text_model_` for text encoders) -> weight name; `None`
    /// when two layers collide.
    underscored: HashMap<String, Option<String>>,
    text_encoder: bool,
}

impl<'a> LayerNames<'a> {
    fn new(index: &'a dyn LayerIndex, target: LoraTarget) -> Self {
        let text_encoder = target != LoraTarget::Unet;
        let mut underscored: HashMap<String, Option<String>> = HashMap::new();
        let mut insert = |key: String, name: &str| {
            underscored
                .entry(key)
                .and_modify(|v| {
                    if v.as_deref() != Some(name) {
                        *v = None;
                    }
                })
                .or_insert_with(|| Some(name.to_string()));
        };
        for name in index.layer_names() {
            let Some(layer) = name.strip_suffix(".weight") else {
                continue;
            };
            let layer = if text_encoder {
                layer.strip_prefix("text_model.").unwrap_or(layer)
            } else {
                layer
            };
            insert(layer.replace('.', "_"), &name);
            if !text_encoder {
                if let Some(ldm) = index.ldm_name(&name) {
                    if let Some(l) = ldm.strip_suffix(".weight") {
                        insert(l.replace('.', "_"), &name);
                    }
                }
            }
        }
        Self {
            index,
            underscored,
            text_encoder,
        }
    }

    fn find(&self, m: &Module) -> Option<String> {
        match m.naming {
            Naming::Underscored => {
                let layer = if self.text_encoder {
                    m.layer.strip_prefix("text_model_").unwrap_or(&m.layer)
                } else {
                    &m.layer
                };
                self.underscored.get(layer).cloned().flatten()
            }
            Naming::Dotted => {
                let mut candidates = vec![format!("{}.weight", m.layer)];
                if self.text_encoder {
                    match m.layer.strip_prefix("text_model.") {
                        Some(bare) => candidates.push(format!("{bare}.weight")),
                        None => candidates.push(format!("text_model.{}.weight", m.layer)),
                    }
                }
                candidates
                    .into_iter()
                    .find(|n| self.index.layer_shape(n).is_some())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_sorted_into_modules() {
        let k = classify("lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight").unwrap();
        assert_eq!(
            (k.0, k.1, k.2.as_str(), k.3),
            (
                LoraTarget::Unet,
                Naming::Underscored,
                "down_blocks_0_attentions_0_proj_in",
                Part::Down
            )
        );
        let k = classify("lora_te_text_model_encoder_layers_0_mlp_fc1.alpha").unwrap();
        assert_eq!((k.0, k.3), (LoraTarget::TextEncoder, Part::Alpha));
        let k = classify("lora_te2_x.lora_up.weight").unwrap();
        assert_eq!(k.0, LoraTarget::TextEncoder2);
        let k = classify("unet.mid_block.attentions.0.proj_in.lora_B.weight").unwrap();
        assert_eq!(
            (k.0, k.1, k.2.as_str(), k.3),
            (
                LoraTarget::Unet,
                Naming::Dotted,
                "mid_block.attentions.0.proj_in",
                Part::Up
            )
        );
        let k =
            classify("text_encoder.text_model.encoder.layers.1.self_attn.q_proj.lora.down.weight")
                .unwrap();
        assert_eq!(
            (k.0, k.2.as_str(), k.3),
            (
                LoraTarget::TextEncoder,
                "text_model.encoder.layers.1.self_attn.q_proj",
                Part::Down
            )
        );
        let k = classify("lora_unet_x.hada_w1_a").unwrap();
        assert_eq!(k.3, Part::Unsupported("LoHa (LyCORIS)"));
        assert!(classify("model.diffusion_model.x.weight").is_none());
    }

    #[test]
    fn factor_shapes_fit_linear_and_conv() {
        let dev = Device::Cpu;
        let up = Tensor::zeros((8, 2), DType::F32, &dev).unwrap();
        let down = Tensor::zeros((2, 4), DType::F32, &dev).unwrap();
        assert!(factor_shapes(&up, &down, &[8, 4]).unwrap().is_some());
        // A linear LoRA on a 1x1 conv layer.
        assert!(factor_shapes(&up, &down, &[8, 4, 1, 1]).unwrap().is_some());
        assert!(factor_shapes(&up, &down, &[8, 5]).unwrap().is_none());
        assert!(factor_shapes(&up, &down, &[4, 8]).unwrap().is_none());
        // LoCon 3x3: down [r, in, 3, 3], up [out, r, 1, 1].
        let up = Tensor::zeros((8, 2, 1, 1), DType::F32, &dev).unwrap();
        let down = Tensor::zeros((2, 4, 3, 3), DType::F32, &dev).unwrap();
        let (u, d) = factor_shapes(&up, &down, &[8, 4, 3, 3]).unwrap().unwrap();
        assert_eq!((u.dims(), d.dims()), (&[8, 2][..], &[2, 36][..]));
    }

    #[test]
    fn alpha_pattern_matches_at_a_dot() {
        let p = PeftAlpha {
            lora_alpha: Some(8.0),
            alpha_pattern: vec![("to_q".into(), 2.0)],
            use_rslora: false,
        };
        assert_eq!(p.alpha_for("down_blocks.0.attn1.to_q"), Some(2.0));
        assert_eq!(p.alpha_for("down_blocks.0.attn1.xto_q"), Some(8.0));
    }
}
