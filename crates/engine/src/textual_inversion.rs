//! Textual-inversion embeddings ("EasyNegative" and the like): learned token vectors read from
//! `.safetensors` files and used by file name in a prompt. The text encoder swaps them in for the
//! tokens of their name (see [`crate::clip::TextEncoder::set_embeddings`]).
//!
//! Layouts read (A1111 `modules/textual_inversion/textual_inversion.py`,
//! `create_embedding_from_data`; diffusers `load_textual_inversion`):
//! - A1111 / stable-diffusion-webui training: `emb_params` `[n, width]`, or the flattened
//!   `string_to_param.*` of its older `.pt` layout;
//! - diffusers `learned_embeds.safetensors`: one tensor named after its token (`<cat-toy>`),
//!   `[width]` or `[n, width]`;
//! - any other file with exactly one tensor, as A1111 accepts it.
//!
//! SDXL embeddings (`clip_l` + `clip_g`) are refused with a clear message until SDXL lands.

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};

use crate::weights::Weights;
use crate::{EngineError, Result};

/// One embedding: `vectors` is `[n, width]`, f32, on the CPU; it takes `n` token positions.
#[derive(Debug, Clone)]
pub struct Embedding {
    name: String,
    path: PathBuf,
    vectors: Tensor,
}

/// An embedding file that was skipped, and why (the rest still load).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EmbeddingWarning {
    pub path: PathBuf,
    pub message: String,
}

impl std::fmt::Display for EmbeddingWarning {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.path.display(), self.message)
    }
}

impl Embedding {
    /// Loads a `.safetensors` embedding; its name is the file name without the extension (what
    /// A1111 users type in prompts).
    pub fn load(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let name =
            path.file_stem()
                .and_then(|s| s.to_str())
                .ok_or_else(|| EngineError::Weights {
                    path: path.to_path_buf(),
                    message: "the file name is not valid UTF-8, so it cannot be typed in a prompt"
                        .into(),
                })?;
        Self::load_named(name, path)
    }

    /// Loads a `.safetensors` embedding under another name.
    pub fn load_named(name: &str, path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let bad = |message: String| EngineError::Weights {
            path: path.to_path_buf(),
            message,
        };
        if is_pickle(path) {
            return Err(EngineError::PickleRefused {
                path: path.to_path_buf(),
            });
        }
        let weights = Weights::open(path)?;
        let mut names: Vec<&str> = weights.names().collect();
        names.sort_unstable();
        if names.contains(&"clip_l") && names.contains(&"clip_g") {
            return Err(bad(
                "this is an SDXL embedding (clip_l + clip_g); it does not fit SD1/SD2 models"
                    .into(),
            ));
        }
        let key = ["emb_params", "string_to_param.*"]
            .into_iter()
            .find(|k| names.contains(k))
            .or(match names.as_slice() {
                [only] => Some(*only),
                _ => None,
            })
            .ok_or_else(|| {
                bad(format!(
                    "expected one embedding tensor (`emb_params`, `string_to_param.*` or a \
                     token name), found {}: {}",
                    names.len(),
                    names.join(", ")
                ))
            })?;
        let t = weights.load(key, DType::F32, &Device::Cpu)?;
        let vectors = match t.rank() {
            1 => t.unsqueeze(0)?,
            2 => t,
            _ => {
                return Err(bad(format!(
                    "embedding tensor `{key}` has shape {:?}; expected [width] or [vectors, width]",
                    t.dims()
                )))
            }
        };
        Self::new(name, path, vectors)
    }

    /// An embedding from vectors already in memory (`[n, width]`).
    pub fn new(name: &str, path: impl AsRef<Path>, vectors: Tensor) -> Result<Self> {
        let path = path.as_ref().to_path_buf();
        let (n, width) = vectors.dims2().map_err(|_| EngineError::Weights {
            path: path.clone(),
            message: format!(
                "embedding vectors must be [vectors, width], got {:?}",
                vectors.dims()
            ),
        })?;
        if n == 0 || width == 0 || name.trim().is_empty() {
            return Err(EngineError::Weights {
                path,
                message: "the embedding is empty or has no name".into(),
            });
        }
        Ok(Self {
            name: name.to_string(),
            path,
            vectors: vectors.to_dtype(DType::F32)?.to_device(&Device::Cpu)?,
        })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// `[n, width]`, f32, CPU.
    pub fn vectors(&self) -> &Tensor {
        &self.vectors
    }

    /// How many token positions it takes.
    pub fn len(&self) -> usize {
        self.vectors.dim(0).unwrap_or(0)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The text encoder width it was trained for (768 SD1, 1024 SD2).
    pub fn width(&self) -> usize {
        self.vectors.dim(1).unwrap_or(0)
    }
}

fn is_pickle(path: &Path) -> bool {
    path.extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| ["pt", "bin", "ckpt", "pth"].contains(&e.to_ascii_lowercase().as_str()))
}

/// Loads every `.safetensors` file under `dir` (subfolders too, as A1111 does), sorted by path.
/// Files that cannot be used (pickles, other layouts, broken files) are skipped with a warning;
/// only an unreadable `dir` is an error.
pub fn load_dir(dir: impl AsRef<Path>) -> Result<(Vec<Embedding>, Vec<EmbeddingWarning>)> {
    let mut files = Vec::new();
    collect_files(dir.as_ref(), &mut files)?;
    files.sort();
    let mut embeddings = Vec::new();
    let mut warnings = Vec::new();
    for path in files {
        let ext = path
            .extension()
            .and_then(|e| e.to_str())
            .map(str::to_ascii_lowercase);
        match ext.as_deref() {
            Some("safetensors") => match Embedding::load(&path) {
                Ok(e) => embeddings.push(e),
                Err(e) => warnings.push(EmbeddingWarning {
                    path,
                    message: e.to_string(),
                }),
            },
            _ if is_pickle(&path) => warnings.push(EmbeddingWarning {
                path,
                message: "pickle files can run code when loaded and are never opened; use the \
                          .safetensors version"
                    .into(),
            }),
            // Previews (.png), notes (.txt), ... live next to embeddings.
            _ => {}
        }
    }
    Ok((embeddings, warnings))
}

fn collect_files(dir: &Path, out: &mut Vec<PathBuf>) -> Result<()> {
    let entries = std::fs::read_dir(dir).map_err(|e| EngineError::from_io(dir, e))?;
    for entry in entries {
        let entry = entry.map_err(|e| EngineError::from_io(dir, e))?;
        let path = entry.path();
        let kind = entry
            .file_type()
            .map_err(|e| EngineError::from_io(&path, e))?;
        if kind.is_dir() {
            collect_files(&path, out)?;
        } else if kind.is_file() {
            out.push(path);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn save(path: &Path, tensors: &[(&str, Tensor)]) {
        let map: HashMap<String, Tensor> = tensors
            .iter()
            .map(|(n, t)| (n.to_string(), t.clone()))
            .collect();
        candle_core::safetensors::save(&map, path).unwrap();
    }

    fn vecs(n: usize, w: usize) -> Tensor {
        Tensor::arange(0f32, (n * w) as f32, &Device::Cpu)
            .unwrap()
            .reshape((n, w))
            .unwrap()
    }

    #[test]
    fn reads_a1111_and_diffusers_layouts() {
        let dir = tempfile::tempdir().unwrap();
        let a = dir.path().join("EasyNeg.safetensors");
        save(&a, &[("emb_params", vecs(3, 4))]);
        let e = Embedding::load(&a).unwrap();
        assert_eq!((e.name(), e.len(), e.width()), ("EasyNeg", 3, 4));

        let b = dir.path().join("old.safetensors");
        save(&b, &[("string_to_param.*", vecs(2, 4))]);
        assert_eq!(Embedding::load(&b).unwrap().len(), 2);

        let c = dir.path().join("cat-toy.safetensors");
        save(
            &c,
            &[(
                "<cat-toy>",
                vecs(1, 4).squeeze(0).unwrap().to_dtype(DType::F16).unwrap(),
            )],
        );
        let e = Embedding::load(&c).unwrap();
        assert_eq!((e.len(), e.vectors().dtype()), (1, DType::F32));
    }

    #[test]
    fn refuses_what_it_cannot_use() {
        let dir = tempfile::tempdir().unwrap();
        let two = dir.path().join("two.safetensors");
        save(&two, &[("a", vecs(1, 4)), ("b", vecs(1, 4))]);
        let err = Embedding::load(&two).unwrap_err().to_string();
        assert!(err.contains("found 2"), "{err}");
        let xl = dir.path().join("xl.safetensors");
        save(&xl, &[("clip_l", vecs(1, 4)), ("clip_g", vecs(1, 8))]);
        assert!(Embedding::load(&xl)
            .unwrap_err()
            .to_string()
            .contains("SDXL"));
        let pt = dir.path().join("old.pt");
        std::fs::write(&pt, b"not opened").unwrap();
        assert!(matches!(
            Embedding::load(&pt),
            Err(EngineError::PickleRefused { .. })
        ));
        std::fs::write(dir.path().join("preview.png"), b"x").unwrap();
        let sub = dir.path().join("neg");
        std::fs::create_dir(&sub).unwrap();
        save(&sub.join("bad.safetensors"), &[("emb_params", vecs(1, 4))]);
        let (embs, warnings) = load_dir(dir.path()).unwrap();
        assert_eq!(embs.len(), 1);
        assert_eq!(embs[0].name(), "bad");
        // two, xl, and the pickle; the png is ignored.
        assert_eq!(warnings.len(), 3, "{warnings:?}");
    }
}
