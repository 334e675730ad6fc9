//! Config files of a diffusers model folder (`model_index.json`, `scheduler/scheduler_config.json`)
//! and [`ModelFolder`], which finds each component's config and weight files in such a folder.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::de::DeserializeOwned;
use serde::Deserialize;

use crate::{EngineError, Result};

/// Reads and parses a JSON file. A missing file is [`EngineError::MissingFile`]; unreadable or
/// malformed JSON, or values of the wrong type, are [`EngineError::Config`] naming the file.
pub fn read_json<T: DeserializeOwned>(path: impl AsRef<Path>) -> Result<T> {
    let path = path.as_ref();
    serde_json::from_str(&read_text(path)?).map_err(|e| EngineError::Config {
        path: path.to_path_buf(),
        message: e.to_string(),
    })
}

/// Reads a text file; a missing file is [`EngineError::MissingFile`].
pub(crate) fn read_text(path: &Path) -> Result<String> {
    std::fs::read_to_string(path).map_err(|e| EngineError::from_io(path, e))
}

/// `model_index.json`: the pipeline class and which library/class implements each component.
#[derive(Debug, Clone, Deserialize)]
pub struct ModelIndex {
    /// e.g. `StableDiffusionPipeline`, `StableDiffusionXLPipeline`.
    #[serde(rename = "_class_name")]
    pub class_name: String,
    #[serde(rename = "_diffusers_version", default)]
    pub diffusers_version: Option<String>,
    /// SDXL: an empty negative prompt means zero conditioning rather than encoding "".
    #[serde(default)]
    pub force_zeros_for_empty_prompt: Option<bool>,
    /// Everything else; components are the `"name": ["library", "Class"]` entries.
    #[serde(flatten)]
    rest: BTreeMap<String, serde_json::Value>,
}

/// One `"name": ["library", "Class"]` entry of `model_index.json`. Both are `None` when the entry
/// is `[null, null]` (a component the pipeline was saved without, e.g. the safety checker).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Component {
    pub library: Option<String>,
    pub class: Option<String>,
}

impl ModelIndex {
    /// The components listed, by name (`unet`, `vae`, `text_encoder`, `tokenizer`, ...).
    pub fn components(&self) -> BTreeMap<&str, Component> {
        self.rest
            .iter()
            .filter(|(name, _)| !name.starts_with('_'))
            .filter_map(|(name, value)| {
                let pair = value.as_array().filter(|a| a.len() == 2)?;
                let text = |v: &serde_json::Value| v.as_str().map(str::to_owned);
                Some((
                    name.as_str(),
                    Component {
                        library: text(&pair[0]),
                        class: text(&pair[1]),
                    },
                ))
            })
            .collect()
    }

    /// Whether the index names a (non-null) component called `name`.
    pub fn has_component(&self, name: &str) -> bool {
        self.components()
            .get(name)
            .is_some_and(|c| c.class.is_some())
    }
}

/// How the training betas were spaced (diffusers `beta_schedule`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BetaSchedule {
    Linear,
    /// Linear in sqrt(beta): what every Stable Diffusion model was trained with.
    ScaledLinear,
    /// The cosine schedule of Nichol & Dhariwal ("squaredcos_cap_v2" in diffusers).
    #[serde(rename = "squaredcos_cap_v2")]
    SquaredcosCapV2,
}

/// What the UNet predicts (diffusers `prediction_type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PredictionType {
    /// The added noise (SD1.x, SD2-base, SDXL).
    Epsilon,
    /// v = alpha * noise - sigma * x0 (SD2 768-v models).
    VPrediction,
    /// The clean sample itself.
    Sample,
}

/// How inference timesteps are picked from the training ones (diffusers `timestep_spacing`,
/// table 2 of "Common Diffusion Noise Schedules and Sample Steps are Flawed").
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TimestepSpacing {
    Leading,
    Linspace,
    Trailing,
}

/// `scheduler/scheduler_config.json`. Only the training-schedule facts matter to us: the sampler
/// itself is the user's choice. Defaults are those of diffusers' `DDIMScheduler` (the class whose
/// options `set_alpha_to_one`, `clip_sample` and `timestep_spacing` are), so a config that leaves
/// a key out means what it means in diffusers.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct SchedulerConfig {
    /// e.g. `PNDMScheduler`, `EulerDiscreteScheduler`; informational.
    #[serde(rename = "_class_name", default)]
    pub class_name: Option<String>,
    #[serde(default = "defaults::num_train_timesteps")]
    pub num_train_timesteps: usize,
    #[serde(default = "defaults::beta_start")]
    pub beta_start: f64,
    #[serde(default = "defaults::beta_end")]
    pub beta_end: f64,
    #[serde(default = "defaults::beta_schedule")]
    pub beta_schedule: BetaSchedule,
    /// When present, used instead of `beta_start`/`beta_end`/`beta_schedule`.
    #[serde(default)]
    pub trained_betas: Option<Vec<f64>>,
    #[serde(default = "defaults::prediction_type")]
    pub prediction_type: PredictionType,
    /// SD1/SD2 configs say 1: "leading" timesteps are shifted up by one.
    #[serde(default)]
    pub steps_offset: usize,
    #[serde(default = "defaults::yes")]
    pub set_alpha_to_one: bool,
    #[serde(default = "defaults::timestep_spacing")]
    pub timestep_spacing: TimestepSpacing,
    #[serde(default = "defaults::yes")]
    pub clip_sample: bool,
    #[serde(default = "defaults::one")]
    pub clip_sample_range: f64,
    #[serde(default)]
    pub rescale_betas_zero_snr: bool,
    /// Written by some Euler/DPM++ configs; the app's own schedule choice overrides it.
    #[serde(default)]
    pub use_karras_sigmas: bool,
}

impl Default for SchedulerConfig {
    fn default() -> Self {
        // An empty object takes every serde default, so the two can never disagree.
        serde_json::from_str("{}").expect("defaults parse")
    }
}

mod defaults {
    use super::{BetaSchedule, PredictionType, TimestepSpacing};

    pub fn num_train_timesteps() -> usize {
        1000
    }
    pub fn beta_start() -> f64 {
        0.0001
    }
    pub fn beta_end() -> f64 {
        0.02
    }
    pub fn beta_schedule() -> BetaSchedule {
        BetaSchedule::Linear
    }
    pub fn prediction_type() -> PredictionType {
        PredictionType::Epsilon
    }
    pub fn timestep_spacing() -> TimestepSpacing {
        TimestepSpacing::Leading
    }
    pub fn yes() -> bool {
        true
    }
    pub fn one() -> f64 {
        1.0
    }
}

/// Weight file names a diffusers component folder may hold, best first. transformers models
/// (text encoders) use `model`, diffusers models (UNet, VAE) `diffusion_pytorch_model`; the fp16
/// "variant" is only taken when the full-precision file is absent.
const WEIGHT_FILES: [&str; 4] = [
    "model.safetensors",
    "diffusion_pytorch_model.safetensors",
    "model.fp16.safetensors",
    "diffusion_pytorch_model.fp16.safetensors",
];

/// Sharded weights: an index JSON whose `weight_map` names the shard files.
const WEIGHT_INDEX_FILES: [&str; 4] = [
    "model.safetensors.index.json",
    "diffusion_pytorch_model.safetensors.index.json",
    "model.safetensors.index.fp16.json",
    "diffusion_pytorch_model.safetensors.index.fp16.json",
];

/// Extensions of pickle-based formats. Unpickling can run arbitrary code, so we never open them.
const PICKLE_EXTENSIONS: [&str; 4] = ["bin", "ckpt", "pt", "pth"];

#[derive(Deserialize)]
struct WeightIndex {
    weight_map: BTreeMap<String, String>,
}

/// A diffusers-format model folder (`model_index.json` plus one subfolder per component).
#[derive(Debug, Clone)]
pub struct ModelFolder {
    root: PathBuf,
}

impl ModelFolder {
    /// Opens `root`, which must be a directory holding `model_index.json`.
    pub fn open(root: impl Into<PathBuf>) -> Result<Self> {
        let root = root.into();
        if !root.is_dir() {
            return Err(EngineError::MissingFile { path: root });
        }
        let index = root.join("model_index.json");
        if !index.is_file() {
            return Err(EngineError::MissingFile { path: index });
        }
        Ok(Self { root })
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn model_index(&self) -> Result<ModelIndex> {
        read_json(self.root.join("model_index.json"))
    }

    pub fn scheduler_config(&self) -> Result<SchedulerConfig> {
        read_json(self.root.join("scheduler").join("scheduler_config.json"))
    }

    /// The subfolder of a component (`unet`, `text_encoder`, ...), which must exist.
    pub fn component_dir(&self, component: &str) -> Result<PathBuf> {
        let dir = self.root.join(component);
        if dir.is_dir() {
            Ok(dir)
        } else {
            Err(EngineError::MissingFile { path: dir })
        }
    }

    /// `<component>/config.json`, which must exist.
    pub fn config_file(&self, component: &str) -> Result<PathBuf> {
        let path = self.component_dir(component)?.join("config.json");
        if path.is_file() {
            Ok(path)
        } else {
            Err(EngineError::MissingFile { path })
        }
    }

    /// Parses `<component>/config.json`.
    pub fn component_config<T: DeserializeOwned>(&self, component: &str) -> Result<T> {
        read_json(self.config_file(component)?)
    }

    /// The safetensors file(s) holding a component's weights: one file, or every shard of a
    /// sharded checkpoint in index order. Full precision is preferred over the `.fp16` variant.
    pub fn weight_files(&self, component: &str) -> Result<Vec<PathBuf>> {
        let dir = self.component_dir(component)?;
        weight_files_in(&dir)
    }
}

/// Finds the weights in one component folder; see [`ModelFolder::weight_files`].
pub fn weight_files_in(dir: &Path) -> Result<Vec<PathBuf>> {
    // Interleave single files and shard indexes by precision: a full-precision sharded model
    // beats an fp16 single file, just as a full-precision single file does.
    for (file, index) in WEIGHT_FILES.iter().zip(WEIGHT_INDEX_FILES.iter()) {
        let path = dir.join(file);
        if path.is_file() {
            return Ok(vec![path]);
        }
        let index_path = dir.join(index);
        if index_path.is_file() {
            return shards(&index_path, dir);
        }
    }
    // Any other fp16 variant name (e.g. a renamed transformers file).
    if let Some(path) = sorted_files(dir)?
        .into_iter()
        .find(|p| file_name(p).ends_with(".fp16.safetensors"))
    {
        return Ok(vec![path]);
    }
    if let Some(pickle) = sorted_files(dir)?.into_iter().find(|p| {
        p.extension()
            .and_then(|e| e.to_str())
            .is_some_and(|e| PICKLE_EXTENSIONS.contains(&e.to_ascii_lowercase().as_str()))
    }) {
        return Err(EngineError::PickleRefused { path: pickle });
    }
    Err(EngineError::MissingFile {
        path: dir.join(WEIGHT_FILES[0]),
    })
}

fn shards(index_path: &Path, dir: &Path) -> Result<Vec<PathBuf>> {
    let index: WeightIndex = read_json(index_path)?;
    let mut files: Vec<PathBuf> = Vec::new();
    for name in index.weight_map.values() {
        // A shard name is a plain file name beside the index; anything else (a path with `..`
        // or a separator) would let a downloaded index point us at arbitrary files.
        if Path::new(name).file_name().and_then(|n| n.to_str()) != Some(name.as_str()) {
            return Err(EngineError::Config {
                path: index_path.to_path_buf(),
                message: format!("shard name {name:?} is not a plain file name"),
            });
        }
        if !name.ends_with(".safetensors") {
            return Err(EngineError::PickleRefused {
                path: dir.join(name),
            });
        }
        let path = dir.join(name);
        if !files.contains(&path) {
            files.push(path);
        }
    }
    files.sort();
    for path in &files {
        if !path.is_file() {
            return Err(EngineError::MissingFile { path: path.clone() });
        }
    }
    if files.is_empty() {
        return Err(EngineError::Config {
            path: index_path.to_path_buf(),
            message: "weight_map is empty".into(),
        });
    }
    Ok(files)
}

fn sorted_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let entries = std::fs::read_dir(dir).map_err(|e| EngineError::Io {
        path: dir.to_path_buf(),
        source: e,
    })?;
    let mut files: Vec<PathBuf> = entries
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.is_file())
        .collect();
    files.sort();
    Ok(files)
}

fn file_name(path: &Path) -> &str {
    path.file_name().and_then(|n| n.to_str()).unwrap_or("")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(path: &Path, text: &str) {
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, text).unwrap();
    }

    #[test]
    fn sd15_scheduler_config_parses_with_defaults_for_missing_keys() {
        // runwayml/stable-diffusion-v1-5 scheduler/scheduler_config.json, verbatim.
        let json = r#"{
          "_class_name": "PNDMScheduler", "_diffusers_version": "0.6.0",
          "beta_end": 0.012, "beta_schedule": "scaled_linear", "beta_start": 0.00085,
          "num_train_timesteps": 1000, "set_alpha_to_one": false, "skip_prk_steps": true,
          "steps_offset": 1, "trained_betas": null, "clip_sample": false
        }"#;
        let cfg: SchedulerConfig = serde_json::from_str(json).unwrap();
        assert_eq!(cfg.class_name.as_deref(), Some("PNDMScheduler"));
        assert_eq!(cfg.beta_schedule, BetaSchedule::ScaledLinear);
        assert_eq!(cfg.beta_start, 0.00085);
        assert_eq!(cfg.beta_end, 0.012);
        assert_eq!(cfg.steps_offset, 1);
        assert!(!cfg.set_alpha_to_one);
        assert!(!cfg.clip_sample);
        assert_eq!(cfg.trained_betas, None);
        // Not in the file: diffusers' defaults.
        assert_eq!(cfg.prediction_type, PredictionType::Epsilon);
        assert_eq!(cfg.timestep_spacing, TimestepSpacing::Leading);
    }

    #[test]
    fn v_prediction_and_defaults() {
        let cfg: SchedulerConfig = serde_json::from_str(
            r#"{"prediction_type": "v_prediction", "timestep_spacing": "trailing"}"#,
        )
        .unwrap();
        assert_eq!(cfg.prediction_type, PredictionType::VPrediction);
        assert_eq!(cfg.timestep_spacing, TimestepSpacing::Trailing);
        let d = SchedulerConfig::default();
        assert_eq!(d.num_train_timesteps, 1000);
        assert_eq!(d.beta_schedule, BetaSchedule::Linear);
        assert!(d.set_alpha_to_one && d.clip_sample);
    }

    #[test]
    fn unknown_enum_value_is_a_config_error_naming_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("scheduler_config.json");
        write(&path, r#"{"beta_schedule": "sigmoid"}"#);
        let err = read_json::<SchedulerConfig>(&path).unwrap_err();
        match &err {
            EngineError::Config { path: p, message } => {
                assert_eq!(p, &path);
                assert!(message.contains("sigmoid"), "{message}");
            }
            other => panic!("expected Config, got {other:?}"),
        }
    }

    #[test]
    fn missing_json_is_missing_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("nope.json");
        assert!(matches!(
            read_json::<SchedulerConfig>(&path),
            Err(EngineError::MissingFile { path: p }) if p == path
        ));
    }

    #[test]
    fn model_index_lists_components() {
        let json = r#"{
          "_class_name": "StableDiffusionXLPipeline", "_diffusers_version": "0.19.0",
          "force_zeros_for_empty_prompt": true,
          "scheduler": ["diffusers", "EulerDiscreteScheduler"],
          "text_encoder": ["transformers", "CLIPTextModel"],
          "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
          "safety_checker": [null, null],
          "unet": ["diffusers", "UNet2DConditionModel"]
        }"#;
        let index: ModelIndex = serde_json::from_str(json).unwrap();
        assert_eq!(index.class_name, "StableDiffusionXLPipeline");
        assert_eq!(index.force_zeros_for_empty_prompt, Some(true));
        let c = index.components();
        assert_eq!(
            c["text_encoder_2"].class.as_deref(),
            Some("CLIPTextModelWithProjection")
        );
        assert!(index.has_component("unet"));
        assert!(!index.has_component("safety_checker"));
        assert!(!index.has_component("vae"));
        assert!(!c.contains_key("force_zeros_for_empty_prompt"));
    }

    #[test]
    fn weight_file_preference() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        write(&d.join("diffusion_pytorch_model.fp16.safetensors"), "");
        assert_eq!(
            weight_files_in(d).unwrap(),
            vec![d.join("diffusion_pytorch_model.fp16.safetensors")]
        );
        write(&d.join("diffusion_pytorch_model.safetensors"), "");
        assert_eq!(
            weight_files_in(d).unwrap(),
            vec![d.join("diffusion_pytorch_model.safetensors")]
        );
    }

    #[test]
    fn pickle_only_folder_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        write(&dir.path().join("pytorch_model.bin"), "");
        let err = weight_files_in(dir.path()).unwrap_err();
        assert!(
            matches!(&err, EngineError::PickleRefused { path } if path.ends_with("pytorch_model.bin")),
            "{err:?}"
        );
        assert!(err.to_string().contains("safetensors"), "{err}");
    }

    #[test]
    fn empty_component_folder_names_the_expected_file() {
        let dir = tempfile::tempdir().unwrap();
        let err = weight_files_in(dir.path()).unwrap_err();
        assert!(
            matches!(&err, EngineError::MissingFile { path } if path == &dir.path().join("model.safetensors")),
            "{err:?}"
        );
    }

    #[test]
    fn sharded_weights_are_listed_and_checked() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        write(
            &d.join("model.safetensors.index.json"),
            r#"{"weight_map": {"a": "model-00002-of-00002.safetensors", "b": "model-00001-of-00002.safetensors", "c": "model-00001-of-00002.safetensors"}}"#,
        );
        write(&d.join("model-00001-of-00002.safetensors"), "");
        let err = weight_files_in(d).unwrap_err();
        assert!(
            matches!(&err, EngineError::MissingFile { path } if path.ends_with("model-00002-of-00002.safetensors"))
        );
        write(&d.join("model-00002-of-00002.safetensors"), "");
        assert_eq!(
            weight_files_in(d).unwrap(),
            vec![
                d.join("model-00001-of-00002.safetensors"),
                d.join("model-00002-of-00002.safetensors")
            ]
        );
        write(
            &d.join("model.safetensors.index.json"),
            r#"{"weight_map": {"a": "../../etc/passwd.safetensors"}}"#,
        );
        assert!(matches!(
            weight_files_in(d),
            Err(EngineError::Config { .. })
        ));
    }

    #[test]
    fn model_folder_requires_model_index() {
        let dir = tempfile::tempdir().unwrap();
        let err = ModelFolder::open(dir.path()).unwrap_err();
        assert!(
            matches!(&err, EngineError::MissingFile { path } if path.ends_with("model_index.json"))
        );
        let missing = dir.path().join("no-such-model");
        assert!(matches!(
            ModelFolder::open(&missing),
            Err(EngineError::MissingFile { path }) if path == missing
        ));
    }
}
