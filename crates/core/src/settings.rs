//! The user's settings, kept as JSON in the data folder. Saved atomically; a corrupt file is moved
//! aside (never deleted) and defaults are used, with a warning the UI can show.

use crate::fsutil::write_atomic;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Precision {
    #[default]
    Auto,
    Fp16,
    Fp32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum LowVram {
    #[default]
    Auto,
    On,
    Off,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Settings {
    pub default_model: Option<String>,
    pub prompt_prefix: String,
    pub prompt_suffix: String,
    pub negative_prompt: String,
    pub precision: Precision,
    pub low_vram: LowVram,
    /// Extra browser origins (e.g. a chat app's web page) allowed to call the API.
    pub allowed_origins: Vec<String>,
    /// Folders of models the user already has (A1111, ComfyUI, anywhere): used in place.
    pub models_dirs: Vec<std::path::PathBuf>,
    /// An optional language model that writes prompts for chat pictures.
    pub chat_writer: ChatWriterSettings,
    /// A1111's "Clip skip" for requests that do not set one: 1 = the text encoder's last layer,
    /// 2 = the one before (what many anime models expect).
    pub clip_skip: usize,
    /// A1111's "SD VAE": "Automatic" (the model's own, or `<name>.vae.safetensors` beside a
    /// single file), "None" (the model's own only), or a VAE file's name (see [`crate::vae`]).
    pub vae: String,
    /// Pictures drawn on the processor use its bf16 matrix products where it has them (AVX-512
    /// BF16: AMD Zen 4, Intel Sapphire Rapids and newer): about 1.5x faster, pictures change a
    /// little ([`ld_engine::bf16_gemm`]). Off by default; no effect elsewhere.
    pub cpu_bf16: bool,
}

/// An OpenAI-compatible chat server (llama.cpp, Ollama, LM Studio, ...) that writes image prompts
/// from a conversation. Off by default: the built-in writer needs nothing.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct ChatWriterSettings {
    pub enabled: bool,
    /// Base address, e.g. `http://127.0.0.1:11434/v1`.
    pub url: String,
    pub model: String,
    /// Sent as a bearer token when set.
    pub api_key: String,
    /// Empty: the built-in instructions.
    pub system_prompt: String,
    pub timeout_seconds: u64,
}

impl Default for ChatWriterSettings {
    fn default() -> Self {
        Self {
            enabled: false,
            url: String::new(),
            model: String::new(),
            api_key: String::new(),
            system_prompt: String::new(),
            timeout_seconds: 30,
        }
    }
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            default_model: None,
            prompt_prefix: String::new(),
            prompt_suffix: String::new(),
            negative_prompt: "lowres, blurry, bad anatomy, watermark, text".to_owned(),
            precision: Precision::Auto,
            low_vram: LowVram::Auto,
            allowed_origins: Vec::new(),
            models_dirs: Vec::new(),
            chat_writer: ChatWriterSettings::default(),
            clip_skip: 1,
            vae: crate::vae::AUTOMATIC.to_owned(),
            cpu_bf16: false,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SettingsError {
    #[error("could not save settings to {path}: {source}")]
    Save {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// Settings as loaded, with a warning when the file was unusable.
#[derive(Debug, Clone)]
pub struct Loaded {
    pub settings: Settings,
    pub warning: Option<String>,
}

pub fn load(path: &Path) -> Loaded {
    let bytes = match std::fs::read(path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Loaded {
                settings: Settings::default(),
                warning: None,
            }
        }
        Err(e) => {
            return Loaded {
                settings: Settings::default(),
                warning: Some(format!(
                    "Your settings file {} could not be read ({e}); defaults are used for now.",
                    path.display()
                )),
            }
        }
    };
    match serde_json::from_slice::<Settings>(&bytes) {
        Ok(settings) => Loaded {
            settings,
            warning: None,
        },
        Err(e) => {
            let aside = path.with_extension(format!(
                "corrupt-{}.json",
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map(|d| d.as_secs())
                    .unwrap_or(0)
            ));
            let kept = std::fs::rename(path, &aside).is_ok();
            let where_ = if kept {
                format!("it was kept as {}", aside.display())
            } else {
                "it could not be moved aside".to_owned()
            };
            tracing::warn!(error = %e, "settings file is corrupt");
            Loaded {
                settings: Settings::default(),
                warning: Some(format!(
                    "Your settings file was damaged ({e}); {where_} and defaults are used."
                )),
            }
        }
    }
}

pub fn save(path: &Path, settings: &Settings) -> Result<(), SettingsError> {
    let mut json = serde_json::to_vec_pretty(settings).expect("settings always serialise");
    json.push(b'\n');
    write_atomic(path, &json).map_err(|source| SettingsError::Save {
        path: path.to_path_buf(),
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip() {
        let t = tempfile::tempdir().unwrap();
        let p = t.path().join("settings.json");
        let s = Settings {
            prompt_prefix: "masterpiece, ".into(),
            precision: Precision::Fp16,
            ..Settings::default()
        };
        save(&p, &s).unwrap();
        let l = load(&p);
        assert_eq!(l.settings, s);
        assert!(l.warning.is_none());
    }

    #[test]
    fn a_settings_file_from_before_the_vae_setting_gets_automatic() {
        let t = tempfile::tempdir().unwrap();
        let p = t.path().join("settings.json");
        std::fs::write(&p, br#"{"clip_skip": 2}"#).unwrap();
        let l = load(&p);
        assert_eq!(l.settings.vae, "Automatic");
        assert_eq!(l.settings.clip_skip, 2);
        assert!(l.warning.is_none());
    }

    #[test]
    fn missing_file_gives_defaults_without_warning() {
        let t = tempfile::tempdir().unwrap();
        let l = load(&t.path().join("nope.json"));
        assert_eq!(l.settings, Settings::default());
        assert!(l.warning.is_none());
    }

    #[test]
    fn corrupt_file_is_moved_aside_and_reported() {
        let t = tempfile::tempdir().unwrap();
        let p = t.path().join("settings.json");
        std::fs::write(&p, b"{ not json").unwrap();
        let l = load(&p);
        assert_eq!(l.settings, Settings::default());
        let w = l.warning.unwrap();
        assert!(w.contains("damaged"), "{w}");
        assert!(!p.exists());
        let kept: Vec<_> = std::fs::read_dir(t.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        assert!(kept.iter().any(|n| n.contains("corrupt")), "{kept:?}");
        // The damaged bytes are kept, not lost.
        let aside = t
            .path()
            .join(kept.iter().find(|n| n.contains("corrupt")).unwrap());
        assert_eq!(std::fs::read(aside).unwrap(), b"{ not json");
    }
}
