//! The engine's error type: every variant names what went wrong and where, so the layers above can
//! turn it into a plain-language message without parsing strings.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    /// A file the model folder must have is not there.
    #[error("{path} is missing; this folder does not look like a complete diffusers model")]
    MissingFile { path: PathBuf },
    /// A config JSON file could not be parsed or holds values we cannot use.
    #[error("{path} is not a valid config: {message}")]
    Config { path: PathBuf, message: String },
    /// A weights file is unreadable, or lacks / mis-shapes a tensor the architecture needs.
    #[error("weights in {path} are not usable: {message}")]
    Weights { path: PathBuf, message: String },
    /// Only a pickle file (.bin/.ckpt/.pt/.pth) is there. Unpickling can run arbitrary code, so we
    /// never open one; the user needs the .safetensors version.
    #[error("{path} is a pickle file, which can run code when loaded, so it is never opened; use the .safetensors version of this model")]
    PickleRefused { path: PathBuf },
    /// The tokenizer files could not be loaded or the text could not be tokenized.
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    /// The caller asked for something the engine cannot do (size, steps, sampler...).
    #[error("invalid request: {0}")]
    InvalidRequest(String),
    /// The observer asked to stop.
    #[error("cancelled")]
    Cancelled,
    /// Reading a file failed.
    #[error("could not read {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A tensor operation failed (out of memory on a device, a shape bug).
    #[error("tensor operation failed: {0}")]
    Candle(candle_core::Error),
}

impl From<candle_core::Error> for EngineError {
    /// A missing or mis-shaped tensor met while a model loads through a `VarBuilder` from
    /// [`crate::weights`] becomes [`EngineError::Weights`] naming the file and tensor; any other
    /// candle error stays [`EngineError::Candle`].
    fn from(e: candle_core::Error) -> Self {
        match crate::weights::TensorError::find(&e) {
            Some(t) => EngineError::Weights {
                path: t.file.clone(),
                message: t.problem(),
            },
            None => EngineError::Candle(e),
        }
    }
}

pub type Result<T> = std::result::Result<T, EngineError>;

impl EngineError {
    /// A failed file access: a missing file is [`EngineError::MissingFile`] (the user can act on
    /// it), anything else [`EngineError::Io`].
    pub fn from_io(path: &std::path::Path, source: std::io::Error) -> Self {
        if source.kind() == std::io::ErrorKind::NotFound {
            EngineError::MissingFile {
                path: path.to_path_buf(),
            }
        } else {
            EngineError::Io {
                path: path.to_path_buf(),
                source,
            }
        }
    }
}
