//! Presets: named starting points (size, steps, CFG, sampler, prompt affixes) that a user picks
//! instead of tuning settings. Four are built in and read-only; the user's own are TOML files in a
//! folder beside the settings, one file per preset, named by its id.

use crate::fsutil::write_atomic;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

/// The built-in presets, in the order the UI lists them. Their ids are reserved.
const BUILTIN_SOURCES: &[(&str, &str)] = &[
    ("portrait", include_str!("../../../presets/portrait.toml")),
    ("scene", include_str!("../../../presets/scene.toml")),
    ("quick", include_str!("../../../presets/quick.toml")),
    ("quality", include_str!("../../../presets/quality.toml")),
];

/// Ids are file names, so they are short and plain: `[a-z0-9-]`, at most this long.
pub const MAX_ID_LEN: usize = 40;
/// A preset file is a few hundred bytes; anything far bigger is not one.
pub const MAX_TOML_BYTES: usize = 64 * 1024;
const MAX_NAME_CHARS: usize = 60;
const MAX_DESCRIPTION_CHARS: usize = 500;
const MAX_PROMPT_CHARS: usize = 2000;
const MAX_SAMPLER_CHARS: usize = 64;

/// Names Windows will not create as files, whatever the extension ("con.toml" is the console).
const WINDOWS_RESERVED: &[&str] = &[
    "con", "prn", "aux", "nul", "com1", "com2", "com3", "com4", "com5", "com6", "com7", "com8",
    "com9", "lpt1", "lpt2", "lpt3", "lpt4", "lpt5", "lpt6", "lpt7", "lpt8", "lpt9",
];

/// One preset. The settings left out (`None`) are not changed by the preset: the user's choice or
/// the app's default applies.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Preset {
    /// The slug the preset is stored under. Given by the store, never taken from a request.
    #[serde(default)]
    pub id: String,
    pub name: String,
    #[serde(default)]
    pub description: String,
    /// Built-in presets cannot be changed or deleted. Set by the store.
    #[serde(default)]
    pub builtin: bool,
    #[serde(default)]
    pub width: Option<usize>,
    #[serde(default)]
    pub height: Option<usize>,
    #[serde(default)]
    pub steps: Option<usize>,
    #[serde(default)]
    pub cfg_scale: Option<f64>,
    /// An A1111 sampler name ("DPM++ 2M"); checked against the engine when a job is composed.
    #[serde(default)]
    pub sampler: Option<String>,
    /// An A1111 schedule type ("Karras").
    #[serde(default)]
    pub schedule: Option<String>,
    #[serde(default)]
    pub prompt_prefix: String,
    #[serde(default)]
    pub prompt_suffix: String,
    #[serde(default)]
    pub negative_prompt: String,
}

/// A preset as written in TOML: no id (the file name is the id) and no builtin flag, so a file
/// can never claim to be built in. Unknown keys are refused so a typo ("step = 20") is reported
/// instead of silently ignored.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct PresetFile {
    name: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    description: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    width: Option<usize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    height: Option<usize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    steps: Option<usize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    cfg_scale: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    sampler: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    schedule: Option<String>,
    #[serde(default)]
    prompt_prefix: String,
    #[serde(default)]
    prompt_suffix: String,
    #[serde(default)]
    negative_prompt: String,
}

impl PresetFile {
    fn from_preset(p: &Preset) -> Self {
        Self {
            name: p.name.trim().to_owned(),
            description: p.description.clone(),
            width: p.width,
            height: p.height,
            steps: p.steps,
            cfg_scale: p.cfg_scale,
            sampler: p.sampler.clone(),
            schedule: p.schedule.clone(),
            prompt_prefix: p.prompt_prefix.clone(),
            prompt_suffix: p.prompt_suffix.clone(),
            negative_prompt: p.negative_prompt.clone(),
        }
    }

    fn into_preset(self, id: String, builtin: bool) -> Preset {
        Preset {
            id,
            name: self.name,
            description: self.description,
            builtin,
            width: self.width,
            height: self.height,
            steps: self.steps,
            cfg_scale: self.cfg_scale,
            sampler: self.sampler,
            schedule: self.schedule,
            prompt_prefix: self.prompt_prefix,
            prompt_suffix: self.prompt_suffix,
            negative_prompt: self.negative_prompt,
        }
    }

    fn parse(text: &str) -> Result<Self, PresetError> {
        if text.len() > MAX_TOML_BYTES {
            return Err(PresetError::TooLarge {
                size: text.len(),
                limit: MAX_TOML_BYTES,
            });
        }
        let file: PresetFile = toml::from_str(text).map_err(|e| PresetError::Parse {
            message: e.message().to_owned(),
        })?;
        file.validate()?;
        Ok(file)
    }

    fn validate(&self) -> Result<(), PresetError> {
        let invalid = |field: &'static str, reason: String| PresetError::Invalid { field, reason };
        let name = self.name.trim();
        if name.is_empty() {
            return Err(invalid("name", "give the preset a name".into()));
        }
        check_text("name", name, MAX_NAME_CHARS)?;
        if name.contains('\n') {
            return Err(invalid("name", "the name must be one line".into()));
        }
        check_text("description", &self.description, MAX_DESCRIPTION_CHARS)?;
        check_text("prompt_prefix", &self.prompt_prefix, MAX_PROMPT_CHARS)?;
        check_text("prompt_suffix", &self.prompt_suffix, MAX_PROMPT_CHARS)?;
        check_text("negative_prompt", &self.negative_prompt, MAX_PROMPT_CHARS)?;
        for (field, v) in [("width", self.width), ("height", self.height)] {
            // Same limits as a generation request: the UNet needs multiples of 8.
            match v {
                Some(v) if !(64..=2048).contains(&v) || v % 8 != 0 => {
                    return Err(invalid(
                        field,
                        format!("{v} is not allowed; use a multiple of 8 from 64 to 2048"),
                    ));
                }
                _ => {}
            }
        }
        if let Some(s) = self.steps.filter(|s| !(1..=150).contains(s)) {
            return Err(invalid(
                "steps",
                format!("{s} is not allowed; use 1 to 150"),
            ));
        }
        if let Some(c) = self
            .cfg_scale
            .filter(|c| !(c.is_finite() && (0.0..=30.0).contains(c)))
        {
            return Err(invalid(
                "cfg_scale",
                format!("{c} is not allowed; use 0 to 30"),
            ));
        }
        for (field, v) in [("sampler", &self.sampler), ("schedule", &self.schedule)] {
            if let Some(v) = v {
                if v.trim().is_empty() {
                    return Err(invalid(field, "leave it out instead of empty".into()));
                }
                check_text(field, v, MAX_SAMPLER_CHARS)?;
            }
        }
        Ok(())
    }
}

fn check_text(field: &'static str, v: &str, max: usize) -> Result<(), PresetError> {
    if v.chars().count() > max {
        return Err(PresetError::Invalid {
            field,
            reason: format!("it is longer than {max} characters"),
        });
    }
    if v.chars().any(|c| c.is_control() && c != '\n' && c != '\t') {
        return Err(PresetError::Invalid {
            field,
            reason: "it contains control characters".into(),
        });
    }
    Ok(())
}

#[derive(Debug, thiserror::Error)]
pub enum PresetError {
    #[error("there is no preset \"{id}\"")]
    NotFound { id: String },
    #[error("\"{id}\" is not a preset id; ids use only a-z, 0-9 and '-'")]
    InvalidId { id: String },
    #[error("\"{id}\" is a built-in preset and cannot be changed or deleted; save a copy instead")]
    ReadOnly { id: String },
    #[error("the preset's {field} is not valid: {reason}")]
    Invalid { field: &'static str, reason: String },
    #[error("the preset is not valid TOML: {message}")]
    Parse { message: String },
    #[error("the preset is {size} bytes; a preset file is at most {limit} bytes")]
    TooLarge { size: usize, limit: usize },
    #[error("could not write the preset to {path}: {source}; check that the folder is writable")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("could not read the presets folder {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("could not write the preset as TOML: {message}")]
    Encode { message: String },
}

/// The built-in presets, parsed from the embedded TOML. A broken one is a bug caught by the tests;
/// at run time it is logged and left out rather than stopping the app.
pub fn builtin_presets() -> Vec<Preset> {
    BUILTIN_SOURCES
        .iter()
        .filter_map(|(id, text)| match PresetFile::parse(text) {
            Ok(f) => Some(f.into_preset((*id).to_owned(), true)),
            Err(e) => {
                tracing::error!(preset = id, error = %e, "built-in preset is broken");
                None
            }
        })
        .collect()
}

/// Built-in presets plus the user's, kept in `dir`. Shared between request handlers.
pub struct PresetStore {
    dir: PathBuf,
    builtins: Vec<Preset>,
    state: Mutex<State>,
}

struct State {
    /// Sorted by name, then id.
    user: Vec<Preset>,
    warnings: Vec<String>,
}

impl PresetStore {
    /// Load the user presets in `dir` (which need not exist yet). Files that cannot be read are
    /// skipped and listed by [`PresetStore::warnings`].
    pub fn open(dir: &Path) -> Result<PresetStore, PresetError> {
        let builtins = builtin_presets();
        let mut user = Vec::new();
        let mut warnings = Vec::new();
        let entries = match std::fs::read_dir(dir) {
            Ok(e) => e.filter_map(Result::ok).map(|e| e.path()).collect(),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
            Err(source) => {
                return Err(PresetError::Read {
                    path: dir.to_path_buf(),
                    source,
                });
            }
        };
        let mut paths: Vec<PathBuf> = entries;
        paths.sort();
        for path in paths {
            let Some(file_name) = path.file_name().and_then(|n| n.to_str()) else {
                continue;
            };
            // Our own temp files start with '.', and other files in the folder are not ours.
            let Some(id) = file_name.strip_suffix(".toml") else {
                continue;
            };
            if file_name.starts_with('.') || !path.is_file() {
                continue;
            }
            let skip = |why: String| {
                let msg = format!(
                    "skipped the preset file {}: {why}; fix or remove the file",
                    path.display()
                );
                tracing::warn!("{msg}");
                msg
            };
            if !is_valid_id(id) {
                warnings.push(skip(
                    "its name is not a preset id (only a-z, 0-9 and '-')".into(),
                ));
                continue;
            }
            if builtins.iter().any(|b| b.id == id) {
                warnings.push(skip("it has the id of a built-in preset".into()));
                continue;
            }
            let loaded = std::fs::metadata(&path)
                .map_err(|e| e.to_string())
                .and_then(|m| {
                    if m.len() > MAX_TOML_BYTES as u64 {
                        Err(format!("it is larger than {MAX_TOML_BYTES} bytes"))
                    } else {
                        std::fs::read_to_string(&path).map_err(|e| e.to_string())
                    }
                })
                .and_then(|text| PresetFile::parse(&text).map_err(|e| e.to_string()));
            match loaded {
                Ok(f) => user.push(f.into_preset(id.to_owned(), false)),
                Err(why) => warnings.push(skip(why)),
            }
        }
        sort_presets(&mut user);
        Ok(PresetStore {
            dir: dir.to_path_buf(),
            builtins,
            state: Mutex::new(State { user, warnings }),
        })
    }

    /// Built-ins first, in their fixed order, then the user's by name.
    pub fn list(&self) -> Vec<Preset> {
        let state = self.lock();
        self.builtins
            .iter()
            .chain(state.user.iter())
            .cloned()
            .collect()
    }

    pub fn get(&self, id: &str) -> Result<Preset, PresetError> {
        if !is_valid_id(id) {
            return Err(PresetError::InvalidId { id: id.to_owned() });
        }
        if let Some(b) = self.builtins.iter().find(|p| p.id == id) {
            return Ok(b.clone());
        }
        self.lock()
            .user
            .iter()
            .find(|p| p.id == id)
            .cloned()
            .ok_or_else(|| PresetError::NotFound { id: id.to_owned() })
    }

    /// Save a new user preset. Its id is made from the name and made unique (a name that matches
    /// a built-in or an existing preset gets "-2", "-3", ...); `preset.id` and `preset.builtin`
    /// are ignored.
    pub fn create(&self, preset: Preset) -> Result<Preset, PresetError> {
        let file = PresetFile::from_preset(&preset);
        file.validate()?;
        let mut state = self.lock();
        let base = slugify(&file.name);
        let id = (1..)
            .map(|n| with_suffix(&base, n))
            .find(|id| self.id_is_free(&state, id))
            .expect("an unbounded counter always finds a free id");
        self.write(&id, &file)?;
        let saved = file.into_preset(id, false);
        state.user.push(saved.clone());
        sort_presets(&mut state.user);
        Ok(saved)
    }

    /// Replace a user preset's settings and name; its id stays. Built-ins are refused.
    pub fn update(&self, id: &str, preset: Preset) -> Result<Preset, PresetError> {
        self.check_writable(id)?;
        let file = PresetFile::from_preset(&preset);
        file.validate()?;
        let mut state = self.lock();
        let Some(i) = state.user.iter().position(|p| p.id == id) else {
            return Err(PresetError::NotFound { id: id.to_owned() });
        };
        self.write(id, &file)?;
        state.user[i] = file.into_preset(id.to_owned(), false);
        sort_presets(&mut state.user);
        Ok(state.user.iter().find(|p| p.id == id).cloned().unwrap())
    }

    /// Delete a user preset's file. Built-ins are refused.
    pub fn delete(&self, id: &str) -> Result<(), PresetError> {
        self.check_writable(id)?;
        let mut state = self.lock();
        let Some(i) = state.user.iter().position(|p| p.id == id) else {
            return Err(PresetError::NotFound { id: id.to_owned() });
        };
        let path = self.path_of(id);
        match std::fs::remove_file(&path) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(source) => return Err(PresetError::Write { path, source }),
        }
        state.user.remove(i);
        Ok(())
    }

    /// Save a preset someone shared as TOML (the format [`PresetStore::export_toml`] writes).
    pub fn import_toml(&self, text: &str) -> Result<Preset, PresetError> {
        let file = PresetFile::parse(text)?;
        self.create(file.into_preset(String::new(), false))
    }

    /// A preset, built-in or not, as TOML to share or keep.
    pub fn export_toml(&self, id: &str) -> Result<String, PresetError> {
        let preset = self.get(id)?;
        let body = toml::to_string(&PresetFile::from_preset(&preset)).map_err(|e| {
            PresetError::Encode {
                message: e.to_string(),
            }
        })?;
        Ok(format!("# Local Diffusers preset\n{body}"))
    }

    /// Plain-language notes about user preset files that were skipped when the store opened.
    pub fn warnings(&self) -> Vec<String> {
        self.lock().warnings.clone()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // A panic while holding the lock leaves the list as it was before the write: still usable.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn check_writable(&self, id: &str) -> Result<(), PresetError> {
        if !is_valid_id(id) {
            return Err(PresetError::InvalidId { id: id.to_owned() });
        }
        if self.builtins.iter().any(|p| p.id == id) {
            return Err(PresetError::ReadOnly { id: id.to_owned() });
        }
        Ok(())
    }

    fn id_is_free(&self, state: &State, id: &str) -> bool {
        is_valid_id(id)
            && !self.builtins.iter().any(|p| p.id == id)
            && !state.user.iter().any(|p| p.id == id)
            // A broken file that was skipped still owns its name: never overwrite it.
            && !self.path_of(id).exists()
    }

    fn path_of(&self, id: &str) -> PathBuf {
        debug_assert!(is_valid_id(id));
        self.dir.join(format!("{id}.toml"))
    }

    fn write(&self, id: &str, file: &PresetFile) -> Result<(), PresetError> {
        let text = toml::to_string(file).map_err(|e| PresetError::Encode {
            message: e.to_string(),
        })?;
        let path = self.path_of(id);
        write_atomic(&path, text.as_bytes()).map_err(|source| PresetError::Write { path, source })
    }
}

fn sort_presets(v: &mut [Preset]) {
    v.sort_by(|a, b| {
        a.name
            .to_lowercase()
            .cmp(&b.name.to_lowercase())
            .then_with(|| a.id.cmp(&b.id))
    });
}

/// Whether `id` can be a preset id, and so a file name: `[a-z0-9-]`, no leading or trailing '-',
/// at most [`MAX_ID_LEN`], and not a name Windows reserves.
pub fn is_valid_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= MAX_ID_LEN
        && id
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !id.starts_with('-')
        && !id.ends_with('-')
        && !WINDOWS_RESERVED.contains(&id)
}

/// "My Portrait (v2)!" -> "my-portrait-v2". Names without ASCII letters or digits get "preset".
fn slugify(name: &str) -> String {
    slug(name, "preset")
}

/// [`slugify`] with another fallback; characters share the id rules.
pub(crate) fn slug(name: &str, fallback: &str) -> String {
    let mut out = String::new();
    for c in name.chars() {
        if c.is_ascii_alphanumeric() {
            out.push(c.to_ascii_lowercase());
        } else if !out.is_empty() && !out.ends_with('-') {
            out.push('-');
        }
    }
    out.truncate(MAX_ID_LEN);
    let out = out.trim_end_matches('-');
    if out.is_empty() {
        fallback.to_owned()
    } else {
        out.to_owned()
    }
}

/// `base` for n = 1, else `base-n`, shortened so the whole stays within [`MAX_ID_LEN`].
pub(crate) fn with_suffix(base: &str, n: u32) -> String {
    if n == 1 {
        return base.to_owned();
    }
    let suffix = format!("-{n}");
    let keep = MAX_ID_LEN.saturating_sub(suffix.len()).min(base.len());
    format!("{}{suffix}", base[..keep].trim_end_matches('-'))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mine(name: &str) -> Preset {
        Preset {
            id: String::new(),
            name: name.into(),
            description: "mine".into(),
            builtin: false,
            width: Some(640),
            height: None,
            steps: Some(12),
            cfg_scale: Some(6.5),
            sampler: Some("Euler".into()),
            schedule: None,
            prompt_prefix: "a photo of ".into(),
            prompt_suffix: String::new(),
            negative_prompt: "blurry".into(),
        }
    }

    #[test]
    fn builtins_parse_and_match_the_issue() {
        let b = builtin_presets();
        let ids: Vec<_> = b.iter().map(|p| p.id.as_str()).collect();
        assert_eq!(ids, ["portrait", "scene", "quick", "quality"]);
        let get = |id: &str| b.iter().find(|p| p.id == id).unwrap();
        // Sizes and step counts as issue 5 / the seed describe them.
        assert_eq!(
            (get("portrait").width, get("portrait").height),
            (Some(512), Some(768))
        );
        assert_eq!(
            (get("scene").width, get("scene").height),
            (Some(768), Some(512))
        );
        assert_eq!(get("quick").steps, Some(8));
        assert_eq!(get("quick").cfg_scale, Some(5.0));
        assert_eq!(get("quality").steps, Some(30));
        assert_eq!(get("quality").cfg_scale, Some(7.0));
        for p in &b {
            assert!(p.builtin);
            assert!(!p.description.is_empty(), "{}", p.id);
            assert_eq!(p.sampler.as_deref(), Some("DPM++ 2M"), "{}", p.id);
            assert_eq!(p.schedule.as_deref(), Some("Karras"), "{}", p.id);
            assert!(!p.negative_prompt.is_empty(), "{}", p.id);
        }
        assert!(get("portrait").prompt_suffix.contains("detailed face"));
    }

    #[test]
    fn create_get_list_update_delete() {
        let dir = tempfile::tempdir().unwrap();
        let store = PresetStore::open(dir.path()).unwrap();
        let p = store.create(mine("My Cats (v2)!")).unwrap();
        assert_eq!(p.id, "my-cats-v2");
        assert!(!p.builtin);
        assert!(dir.path().join("my-cats-v2.toml").is_file());
        assert_eq!(store.get("my-cats-v2").unwrap(), p);

        let ids: Vec<_> = store.list().into_iter().map(|p| p.id).collect();
        assert_eq!(ids, ["portrait", "scene", "quick", "quality", "my-cats-v2"]);

        let changed = store
            .update(
                "my-cats-v2",
                Preset {
                    name: "Renamed".into(),
                    steps: Some(40),
                    ..mine("x")
                },
            )
            .unwrap();
        assert_eq!(
            changed.id, "my-cats-v2",
            "the id stays when the name changes"
        );
        assert_eq!(changed.name, "Renamed");

        // A fresh store reads what was saved.
        let again = PresetStore::open(dir.path()).unwrap();
        assert_eq!(again.get("my-cats-v2").unwrap().steps, Some(40));
        assert!(again.warnings().is_empty());

        store.delete("my-cats-v2").unwrap();
        assert!(matches!(
            store.get("my-cats-v2"),
            Err(PresetError::NotFound { .. })
        ));
        assert!(!dir.path().join("my-cats-v2.toml").exists());
        assert!(matches!(
            store.delete("my-cats-v2"),
            Err(PresetError::NotFound { .. })
        ));
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
    }

    #[test]
    fn ids_are_unique_and_never_collide_with_builtins() {
        let dir = tempfile::tempdir().unwrap();
        let store = PresetStore::open(dir.path()).unwrap();
        assert_eq!(store.create(mine("Portrait")).unwrap().id, "portrait-2");
        assert_eq!(store.create(mine("portrait!")).unwrap().id, "portrait-3");
        assert_eq!(store.create(mine("Cats")).unwrap().id, "cats");
        assert_eq!(store.create(mine("Cats")).unwrap().id, "cats-2");
        assert_eq!(store.create(mine("猫")).unwrap().id, "preset");
        let long = store.create(mine(&"a".repeat(60))).unwrap();
        assert_eq!(long.id.len(), MAX_ID_LEN);
        let long2 = store.create(mine(&"a".repeat(60))).unwrap();
        assert!(long2.id.ends_with("-2") && long2.id.len() <= MAX_ID_LEN);
        assert_eq!(store.get("portrait").unwrap().name, "Portrait");
        assert!(store.get("portrait").unwrap().builtin);
    }

    #[test]
    fn traversal_looking_names_give_plain_ids() {
        let dir = tempfile::tempdir().unwrap();
        let store = PresetStore::open(dir.path().join("presets").as_path()).unwrap();
        let cases = [
            ("../x", "x"),
            ("a/b", "a-b"),
            ("..\\..\\evil", "evil"),
            ("CON", "con-2"),
            ("lpt1", "lpt1-2"),
            ("/etc/passwd", "etc-passwd"),
        ];
        for (name, want) in cases {
            let p = store.create(mine(name)).unwrap();
            assert_eq!(p.id, want, "{name}");
            assert!(dir
                .path()
                .join("presets")
                .join(format!("{want}.toml"))
                .is_file());
        }
        // Nothing was written outside the presets folder.
        let top: Vec<_> = std::fs::read_dir(dir.path()).unwrap().collect();
        assert_eq!(top.len(), 1);
    }

    #[test]
    fn traversal_looking_ids_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let store = PresetStore::open(dir.path()).unwrap();
        for id in [
            "../x",
            "a/b",
            "CON",
            "con",
            "",
            "x.toml",
            "-x",
            &"a".repeat(41),
        ] {
            assert!(
                matches!(store.get(id), Err(PresetError::InvalidId { .. })),
                "{id}"
            );
            assert!(matches!(
                store.update(id, mine("x")),
                Err(PresetError::InvalidId { .. })
            ));
            assert!(matches!(
                store.delete(id),
                Err(PresetError::InvalidId { .. })
            ));
            assert!(matches!(
                store.export_toml(id),
                Err(PresetError::InvalidId { .. })
            ));
        }
    }

    #[test]
    fn builtins_are_read_only() {
        let dir = tempfile::tempdir().unwrap();
        let store = PresetStore::open(dir.path()).unwrap();
        let err = store.update("quick", mine("Quick")).unwrap_err();
        assert!(matches!(err, PresetError::ReadOnly { .. }));
        assert!(err.to_string().contains("save a copy"), "{err}");
        assert!(matches!(
            store.delete("quality"),
            Err(PresetError::ReadOnly { .. })
        ));
        assert_eq!(store.get("quick").unwrap().steps, Some(8));
    }

    #[test]
    fn export_and_import_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let store = PresetStore::open(dir.path()).unwrap();
        let p = store.create(mine("Shared")).unwrap();
        let text = store.export_toml(&p.id).unwrap();
        assert!(
            !text.contains("builtin") && !text.contains("id ="),
            "{text}"
        );
        let imported = store.import_toml(&text).unwrap();
        assert_eq!(imported.id, "shared-2");
        assert_eq!(
            Preset {
                id: p.id.clone(),
                ..imported
            },
            p
        );
        // A built-in exports too, and imports as an editable copy.
        let copy = store
            .import_toml(&store.export_toml("portrait").unwrap())
            .unwrap();
        assert_eq!(copy.id, "portrait-2");
        assert!(!copy.builtin);
        assert_eq!(copy.width, Some(512));
    }

    #[test]
    fn import_refuses_unknown_keys_bad_values_and_huge_text() {
        let dir = tempfile::tempdir().unwrap();
        let store = PresetStore::open(dir.path()).unwrap();
        let err = store.import_toml("name = \"x\"\nstep = 20\n").unwrap_err();
        assert!(matches!(err, PresetError::Parse { .. }));
        assert!(err.to_string().contains("step"), "{err}");
        // A file cannot make itself built in or choose its id.
        for key in ["builtin = true", "id = \"quick\""] {
            let err = store
                .import_toml(&format!("name = \"x\"\n{key}\n"))
                .unwrap_err();
            assert!(matches!(err, PresetError::Parse { .. }), "{key}: {err}");
        }
        assert!(matches!(
            store.import_toml("description = \"no name\""),
            Err(PresetError::Parse { .. })
        ));
        for (text, field) in [
            ("name = \"x\"\nwidth = 500", "width"),
            ("name = \"x\"\nheight = 4096", "height"),
            ("name = \"x\"\nsteps = 0", "steps"),
            ("name = \"x\"\ncfg_scale = nan", "cfg_scale"),
            ("name = \"  \"", "name"),
            ("name = \"x\"\nsampler = \"\"", "sampler"),
        ] {
            match store.import_toml(text) {
                Err(PresetError::Invalid { field: f, .. }) => assert_eq!(f, field, "{text}"),
                other => panic!("{text}: {other:?}"),
            }
        }
        let huge = format!("name = \"x\"\ndescription = \"{}\"", "a".repeat(70_000));
        assert!(matches!(
            store.import_toml(&huge),
            Err(PresetError::TooLarge { .. })
        ));
        assert_eq!(store.list().len(), 4, "nothing was saved");
    }

    #[test]
    fn broken_user_files_are_skipped_with_warnings() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        std::fs::write(d.join("good.toml"), "name = \"Good\"\nsteps = 10\n").unwrap();
        std::fs::write(d.join("broken.toml"), "name = \"Broken\nsteps = ").unwrap();
        std::fs::write(d.join("typo.toml"), "name = \"T\"\nstepz = 3\n").unwrap();
        std::fs::write(d.join("Bad Name.toml"), "name = \"B\"\n").unwrap();
        std::fs::write(d.join("quick.toml"), "name = \"Fake quick\"\n").unwrap();
        std::fs::write(d.join("notes.txt"), "not a preset").unwrap();
        std::fs::write(d.join(".good.toml.tmp-1"), "half").unwrap();
        let store = PresetStore::open(d).unwrap();
        let ids: Vec<_> = store.list().into_iter().map(|p| p.id).collect();
        assert_eq!(ids, ["portrait", "scene", "quick", "quality", "good"]);
        let warnings = store.warnings();
        assert_eq!(warnings.len(), 4, "{warnings:#?}");
        for name in ["broken.toml", "typo.toml", "Bad Name.toml", "quick.toml"] {
            assert!(
                warnings.iter().any(|w| w.contains(name)),
                "{name}: {warnings:#?}"
            );
        }
        assert_eq!(store.get("quick").unwrap().name, "Quick");
        // A broken file keeps its name: a new preset called "Broken" does not overwrite it.
        assert_eq!(store.create(mine("Broken")).unwrap().id, "broken-2");
        assert!(std::fs::read_to_string(d.join("broken.toml"))
            .unwrap()
            .contains("Broken\n"));
    }

    #[test]
    fn store_is_shareable_between_threads() {
        fn check<T: Send + Sync>() {}
        check::<PresetStore>();
        let dir = tempfile::tempdir().unwrap();
        let store = std::sync::Arc::new(PresetStore::open(dir.path()).unwrap());
        let handles: Vec<_> = (0..4)
            .map(|_| {
                let s = store.clone();
                std::thread::spawn(move || s.create(mine("Same")).unwrap().id)
            })
            .collect();
        let mut ids: Vec<_> = handles.into_iter().map(|h| h.join().unwrap()).collect();
        ids.sort();
        assert_eq!(ids, ["same", "same-2", "same-3", "same-4"]);
    }
}
