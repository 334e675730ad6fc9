//! The data folder: where settings, the gallery, downloaded models and logs live. Every command
//! takes `--data-dir` so portable installs and isolated tests work; the default is the platform's
//! application data folder.

use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum DataDirError {
    #[error("no home folder was found to keep the app's data in; pass --data-dir FOLDER")]
    NoDefault,
    #[error("could not create the data folder {path}")]
    Create {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// A data folder that exists and has its subfolders.
#[derive(Debug, Clone)]
pub struct DataDir {
    root: PathBuf,
}

impl DataDir {
    /// The platform default: `~/.local/share/local-diffusers` on Linux, `~/Library/Application
    /// Support/...` on macOS, `%APPDATA%\...` on Windows.
    pub fn default_root() -> Result<PathBuf, DataDirError> {
        directories::ProjectDirs::from("", "", "local-diffusers")
            .map(|d| d.data_dir().to_path_buf())
            .ok_or(DataDirError::NoDefault)
    }

    /// Open (creating if needed) the data folder at `root`, or the default when `None`.
    pub fn open(root: Option<&Path>) -> Result<Self, DataDirError> {
        let root = match root {
            Some(r) => r.to_path_buf(),
            None => Self::default_root()?,
        };
        let dir = Self { root };
        for sub in [
            dir.root.clone(),
            dir.models(),
            dir.gallery(),
            dir.logs(),
            dir.presets(),
            dir.characters(),
            dir.loras(),
            dir.embeddings(),
            dir.vaes(),
        ] {
            std::fs::create_dir_all(&sub).map_err(|source| DataDirError::Create {
                path: sub.clone(),
                source,
            })?;
        }
        Ok(dir)
    }

    pub fn root(&self) -> &Path {
        &self.root
    }
    pub fn settings_file(&self) -> PathBuf {
        self.root.join("settings.json")
    }
    pub fn models(&self) -> PathBuf {
        self.root.join("models")
    }
    pub fn gallery(&self) -> PathBuf {
        self.root.join("gallery")
    }
    pub fn logs(&self) -> PathBuf {
        self.root.join("logs")
    }
    /// LoRA files (`<lora:name:weight>` in prompts).
    pub fn loras(&self) -> PathBuf {
        self.root.join("loras")
    }
    /// Textual-inversion embeddings, used by name in prompts.
    pub fn embeddings(&self) -> PathBuf {
        self.root.join("embeddings")
    }
    /// VAE files the "SD VAE" setting offers (see [`crate::vae::vae_dirs`]).
    pub fn vaes(&self) -> PathBuf {
        self.root.join("vae")
    }
    /// The user's characters, one JSON file each.
    pub fn characters(&self) -> PathBuf {
        self.root.join("characters")
    }
    /// The user's own presets, one TOML file each.
    pub fn presets(&self) -> PathBuf {
        self.root.join("presets")
    }
    /// The gallery's SQLite index (the PNGs in [`DataDir::gallery`] are the truth; this is
    /// rebuilt from them when lost).
    pub fn gallery_index(&self) -> PathBuf {
        self.root.join("gallery.sqlite")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn creates_subfolders() {
        let t = tempfile::tempdir().unwrap();
        let d = DataDir::open(Some(&t.path().join("nested/data"))).unwrap();
        assert!(d.models().is_dir() && d.gallery().is_dir() && d.logs().is_dir());
    }

    #[test]
    fn a_file_in_the_way_is_a_clear_error() {
        let t = tempfile::tempdir().unwrap();
        let f = t.path().join("file");
        std::fs::write(&f, b"x").unwrap();
        let err = DataDir::open(Some(&f)).unwrap_err().to_string();
        assert!(err.contains("could not create the data folder"), "{err}");
    }
}
