//! File hashes the way A1111 and Civitai show them, cached so a multi-gigabyte checkpoint is
//! hashed once: the full sha256, "AutoV2" (its first 10 hex digits, Civitai's model hash), the
//! "addnet" hash of a LoRA (sha256 of the tensor data after the safetensors header; A1111's
//! "Lora hashes" show its first 12 digits) and the short hash of an embedding (12 digits).
//!
//! The cache is a JSON file keyed by path, valid while the file's size and modification time are
//! unchanged.

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::collections::HashMap;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
struct Entry {
    size: u64,
    mtime_ms: u128,
    sha256: Option<String>,
    addnet: Option<String>,
}

pub struct HashCache {
    /// `None`: kept in memory only.
    file: Option<PathBuf>,
    entries: Mutex<HashMap<String, Entry>>,
}

#[derive(Clone, Copy)]
enum Kind {
    Whole,
    AddNet,
}

impl HashCache {
    /// Opens the cache stored at `file`; a missing or damaged cache starts empty (it is only a
    /// cache).
    pub fn open(file: &Path) -> Self {
        let entries = std::fs::read(file)
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or_default();
        Self {
            file: Some(file.to_path_buf()),
            entries: Mutex::new(entries),
        }
    }

    /// A cache that lives as long as the process.
    pub fn in_memory() -> Self {
        Self {
            file: None,
            entries: Mutex::new(HashMap::new()),
        }
    }

    /// The sha256 of the whole file if it is already known (cached and the file unchanged);
    /// never reads the file itself.
    pub fn peek_sha256(&self, path: &Path) -> Option<String> {
        let meta = std::fs::metadata(path).ok()?;
        let mtime_ms = meta
            .modified()
            .ok()?
            .duration_since(std::time::UNIX_EPOCH)
            .ok()?
            .as_millis();
        let entries = self.entries.lock().unwrap_or_else(|p| p.into_inner());
        entries
            .get(path.to_string_lossy().as_ref())
            .filter(|e| e.size == meta.len() && e.mtime_ms == mtime_ms)
            .and_then(|e| e.sha256.clone())
    }

    /// The sha256 of the whole file, lower-case hex.
    pub fn sha256(&self, path: &Path) -> std::io::Result<String> {
        self.get(path, Kind::Whole)
    }

    /// The sha256 of a `.safetensors` file's tensor data (everything after its header): what
    /// A1111 calls the addnet hash, stable when only the metadata changes.
    pub fn addnet(&self, path: &Path) -> std::io::Result<String> {
        self.get(path, Kind::AddNet)
    }

    fn get(&self, path: &Path, kind: Kind) -> std::io::Result<String> {
        let meta = std::fs::metadata(path)?;
        let mtime_ms = meta
            .modified()?
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis())
            .unwrap_or(0);
        let key = path.to_string_lossy().into_owned();
        {
            let entries = self.entries.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(e) = entries
                .get(&key)
                .filter(|e| e.size == meta.len() && e.mtime_ms == mtime_ms)
            {
                let known = match kind {
                    Kind::Whole => &e.sha256,
                    Kind::AddNet => &e.addnet,
                };
                if let Some(h) = known {
                    return Ok(h.clone());
                }
            }
        }
        let hash = match kind {
            Kind::Whole => hash_from(path, 0)?,
            Kind::AddNet => {
                let mut f = std::fs::File::open(path)?;
                let mut len = [0u8; 8];
                f.read_exact(&mut len)?;
                hash_from(path, 8 + u64::from_le_bytes(len))?
            }
        };
        let mut entries = self.entries.lock().unwrap_or_else(|p| p.into_inner());
        let e = entries.entry(key).or_insert(Entry {
            size: meta.len(),
            mtime_ms,
            sha256: None,
            addnet: None,
        });
        if e.size != meta.len() || e.mtime_ms != mtime_ms {
            *e = Entry {
                size: meta.len(),
                mtime_ms,
                sha256: None,
                addnet: None,
            };
        }
        match kind {
            Kind::Whole => e.sha256 = Some(hash.clone()),
            Kind::AddNet => e.addnet = Some(hash.clone()),
        }
        let bytes = serde_json::to_vec(&*entries).unwrap_or_default();
        drop(entries);
        // A cache that cannot be written costs time later, nothing else.
        if let Some(file) = &self.file {
            if let Err(e) = crate::fsutil::write_atomic(file, &bytes) {
                tracing::warn!(error = %e, "could not save the hash cache");
            }
        }
        Ok(hash)
    }
}

fn hash_from(path: &Path, offset: u64) -> std::io::Result<String> {
    let mut f = std::fs::File::open(path)?;
    f.seek(SeekFrom::Start(offset))?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(h.finalize().iter().map(|b| format!("{b:02x}")).collect())
}

/// Civitai's "AutoV2" model hash.
pub fn autov2(sha256: &str) -> String {
    sha256.chars().take(10).collect()
}

/// A1111's short hash of LoRAs and embeddings.
pub fn short(hash: &str) -> String {
    hash.chars().take(12).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hashes_are_right_and_cached_until_the_file_changes() {
        let t = tempfile::tempdir().unwrap();
        let f = t.path().join("a.safetensors");
        // A safetensors-shaped file: 8-byte header length, the header, then the data.
        let header = br#"{"__metadata__":{"x":"1"}}"#;
        let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
        bytes.extend_from_slice(header);
        bytes.extend_from_slice(b"tensor data");
        std::fs::write(&f, &bytes).unwrap();
        let cache = HashCache::open(&t.path().join("hashes.json"));
        let whole = cache.sha256(&f).unwrap();
        let want: String = Sha256::digest(&bytes)
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        assert_eq!(whole, want);
        let addnet = cache.addnet(&f).unwrap();
        let want: String = Sha256::digest(b"tensor data")
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        assert_eq!(addnet, want);
        assert_eq!(autov2(&whole).len(), 10);
        assert_eq!(short(&addnet), &addnet[..12]);

        // Cached: a reopened cache answers from the file without reading the model.
        let reopened = HashCache::open(&t.path().join("hashes.json"));
        assert_eq!(reopened.peek_sha256(&f), Some(whole.clone()));
        assert_eq!(
            HashCache::in_memory().peek_sha256(&f),
            None,
            "peek never hashes"
        );
        assert_eq!(reopened.sha256(&f).unwrap(), whole);
        // Changed file (other size): hashed again.
        bytes.extend_from_slice(b"more");
        std::fs::write(&f, &bytes).unwrap();
        assert_ne!(reopened.sha256(&f).unwrap(), whole);
        // A damaged cache file is only a cache.
        std::fs::write(t.path().join("hashes.json"), b"{garbage").unwrap();
        let fresh = HashCache::open(&t.path().join("hashes.json"));
        assert_eq!(fresh.sha256(&f).unwrap().len(), 64);
    }
}
