//! Downloading models from the Hugging Face hub (or anything that speaks its HTTP layout), safely:
//! resumable (Range with If-Range, so a file that changed on the server starts over instead of
//! being spliced), every file's sha256 checked before it gets its final name, free space checked
//! first, retries with backoff, cancellable, with progress reports.
//!
//! Written here rather than with the `hf-hub` crate: hf-hub 1.0 restarts interrupted downloads
//! from zero and owns its own progress handling, and resuming multi-gigabyte files is the point.
//! The hub's layout is small: `GET /api/models/{repo}/tree/{rev}?recursive=true` lists files
//! (large ones with their LFS sha256), `GET /{repo}/resolve/{rev}/{path}` serves them (usually
//! through a redirect to a CDN).

use crate::catalog::CatalogEntry;
use futures_util::StreamExt;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

/// Attempts in a row that bring a file no further before giving up on it. An attempt that moves
/// the file forward starts the count again: a multi-gigabyte download on a flaky line may break
/// many times and still get there.
const MAX_TRIES: u32 = 5;
/// First wait between attempts; doubled each time.
const BACKOFF_MS: u64 = if cfg!(test) { 5 } else { 250 };
/// How often waits look at the cancel flag, so a cancel takes effect within about this long even
/// when no data arrives.
const CANCEL_POLL: Duration = Duration::from_millis(100);
/// Bytes hashed per trip to the blocking pool; a cancel is looked at between trips.
const HASH_CHUNK: usize = 32 << 20;
/// Kept free beyond the download itself, so the system does not run dry.
pub const SPACE_MARGIN: u64 = 512 * 1024 * 1024;
/// The marker file our installed models carry.
pub const MARKER: &str = "local-diffusers.json";

#[derive(Debug, thiserror::Error)]
pub enum DownloadError {
    #[error("the download server could not be reached ({0}); check the internet connection")]
    Network(String),
    #[error("the server answered {status} for {what}")]
    Http { status: u16, what: String },
    #[error("{repo} is not on the server, or needs a Hugging Face login and accepted licence")]
    NotFound { repo: String },
    #[error("{file} arrived damaged (its checksum does not match); it was deleted, try again")]
    HashMismatch { file: String },
    #[error("{file} is {got} bytes but should be {want}; it was deleted, try again")]
    SizeMismatch { file: String, got: u64, want: u64 },
    #[error(
        "not enough free disk space in {path}: the download needs {need_gb:.1} GB more{}; free up \
         space, then start the download again (it continues where it stopped)",
        free_text(*.free_gb)
    )]
    DiskFull {
        /// What is left to download plus the margin kept free.
        need_gb: f64,
        /// None when the free space could not be found out.
        free_gb: Option<f64>,
        path: PathBuf,
    },
    #[error(
        "the connection to the download server broke ({0}); starting the download again continues \
         where it stopped"
    )]
    ConnectionBroke(String),
    #[error("the download was cancelled; starting it again continues where it stopped")]
    Cancelled,
    #[error("{0} is already installed")]
    AlreadyInstalled(String),
    #[error("the repository has none of the files this model needs")]
    NothingToDownload,
    #[error("could not write {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

fn free_text(free_gb: Option<f64>) -> String {
    free_gb.map_or_else(String::new, |f| format!(", {f:.1} GB are free"))
}

fn gb(bytes: u64) -> f64 {
    bytes as f64 / 1e9
}

impl DownloadError {
    /// A write that failed because the disk is full. `install` turns these into `DiskFull` with
    /// the real numbers; here, deep in one file's write, they are not known.
    fn is_out_of_space(&self) -> bool {
        matches!(self, DownloadError::Io { source, .. }
            if source.kind() == std::io::ErrorKind::StorageFull)
    }
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> DownloadError + '_ {
    move |source| DownloadError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// A failed request in words for the user: the server's name and what went wrong (the innermost
/// cause, e.g. "Connection refused"), without the request's address, a long API URL that says
/// nothing to a non-technical user (found by review).
fn network_problem(e: &reqwest::Error) -> String {
    let host = e.url().and_then(|u| u.host_str()).map(str::to_owned);
    let mut root = None;
    let mut cause = std::error::Error::source(e);
    while let Some(c) = cause {
        root = Some(c);
        cause = c.source();
    }
    let what = match root {
        _ if e.is_timeout() => "it did not answer in time".to_string(),
        Some(r) => r.to_string(),
        // reqwest's own text ends with " for url (...)" when it knows the URL.
        None => e
            .to_string()
            .split(" for url (")
            .next()
            .unwrap_or_default()
            .to_string(),
    };
    match host {
        Some(h) => format!("{h}: {what}"),
        None => what,
    }
}

fn file_len(path: &Path) -> u64 {
    std::fs::metadata(path).map(|m| m.len()).unwrap_or(0)
}

/// Resolves once `cancel` is set. The flag is a plain `AtomicBool` (set from the UI's thread), so
/// it is looked at every `CANCEL_POLL`. Raced against network reads and waits: without it, a
/// connection that stops sending holds a cancel back until the read timeout, a minute later.
async fn cancelled(cancel: &AtomicBool) {
    while !cancel.load(Ordering::SeqCst) {
        tokio::time::sleep(CANCEL_POLL).await;
    }
}

/// One file of a repository.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RemoteFile {
    pub path: String,
    pub size: u64,
    /// Known for LFS files (the weights); small text files are checked by size only.
    pub sha256: Option<String>,
}

#[derive(Deserialize)]
struct TreeEntry {
    #[serde(rename = "type")]
    kind: String,
    path: String,
    #[serde(default)]
    size: u64,
    #[serde(default)]
    lfs: Option<Lfs>,
}

#[derive(Deserialize)]
struct Lfs {
    oid: String,
    size: u64,
}

/// A hub client.
#[derive(Clone)]
pub struct Hub {
    endpoint: String,
    client: reqwest::Client,
    token: Option<String>,
    /// The first wait between attempts (tests lengthen it to see that a cancel cuts it short).
    retry_wait: Duration,
}

impl Hub {
    /// `endpoint` like `https://huggingface.co`; `token` for gated repositories.
    pub fn new(endpoint: &str, token: Option<String>) -> Result<Self, DownloadError> {
        let client = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(20))
            // Between bytes, not for the whole file: a slow line may take hours for 7 GB.
            .read_timeout(Duration::from_secs(60))
            .user_agent(concat!("local-diffusers/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| DownloadError::Network(e.to_string()))?;
        Ok(Self {
            endpoint: endpoint.trim_end_matches('/').to_owned(),
            client,
            token: token.filter(|t| !t.is_empty()),
            retry_wait: Duration::from_millis(BACKOFF_MS),
        })
    }

    /// The endpoint from `HF_ENDPOINT` (mirrors, tests), else the public hub; the token from
    /// `HF_TOKEN`.
    pub fn from_env() -> Result<Self, DownloadError> {
        let endpoint =
            std::env::var("HF_ENDPOINT").unwrap_or_else(|_| "https://huggingface.co".to_owned());
        Self::new(&endpoint, std::env::var("HF_TOKEN").ok())
    }

    fn get(&self, url: &str) -> reqwest::RequestBuilder {
        let r = self.client.get(url);
        match &self.token {
            Some(t) => r.bearer_auth(t),
            None => r,
        }
    }

    pub async fn list(&self, repo: &str, revision: &str) -> Result<Vec<RemoteFile>, DownloadError> {
        let url = format!(
            "{}/api/models/{repo}/tree/{revision}?recursive=true",
            self.endpoint
        );
        let res = self
            .get(&url)
            .send()
            .await
            .map_err(|e| DownloadError::Network(network_problem(&e)))?;
        match res.status().as_u16() {
            200 => {}
            401 | 403 | 404 => {
                return Err(DownloadError::NotFound {
                    repo: repo.to_owned(),
                })
            }
            s => {
                return Err(DownloadError::Http {
                    status: s,
                    what: format!("the file list of {repo}"),
                })
            }
        }
        let tree: Vec<TreeEntry> = res
            .json()
            .await
            .map_err(|e| DownloadError::Network(format!("the file list was not readable: {e}")))?;
        Ok(tree
            .into_iter()
            .filter(|e| e.kind == "file")
            .map(|e| RemoteFile {
                size: e.lfs.as_ref().map_or(e.size, |l| l.size),
                sha256: e.lfs.map(|l| l.oid.to_ascii_lowercase()),
                path: e.path,
            })
            .collect())
    }

    /// Downloads one file to `dest`, resuming a `.part` left by an earlier attempt. `progress`
    /// gets the bytes of this file on disk so far.
    pub async fn fetch(
        &self,
        repo: &str,
        revision: &str,
        file: &RemoteFile,
        dest: &Path,
        progress: &mut (dyn FnMut(u64) + Send),
        cancel: &AtomicBool,
    ) -> Result<(), DownloadError> {
        let name = dest
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let dir = dest.parent().unwrap_or(Path::new("."));
        std::fs::create_dir_all(dir).map_err(io(dir))?;
        let part = dir.join(format!(".{name}.part"));
        let tag_file = dir.join(format!(".{name}.part-etag"));
        let url = format!("{}/{repo}/resolve/{revision}/{}", self.endpoint, file.path);

        // Failed attempts since the file last moved forward.
        let mut fruitless = 0;
        loop {
            if cancel.load(Ordering::SeqCst) {
                return Err(DownloadError::Cancelled);
            }
            let before = file_len(&part);
            match self
                .attempt(&url, file, &part, &tag_file, progress, cancel)
                .await
            {
                Ok(()) => break,
                Err(Attempt::Fatal(e)) => return Err(e),
                Err(Attempt::Retry(e)) => {
                    // Progress means the line works, if badly: only a run of attempts that get
                    // nowhere ends the download. (A restart from zero that gets no further than
                    // before is no progress, so a server that never resumes cannot loop forever.)
                    if file_len(&part) > before {
                        fruitless = 0;
                    }
                    fruitless += 1;
                    if fruitless >= MAX_TRIES {
                        return Err(e);
                    }
                    let wait = self.retry_wait * 2u32.pow(fruitless.min(6));
                    tracing::warn!(file = %file.path, error = %e, ?wait, "download attempt failed; retrying");
                    tokio::select! {
                        () = tokio::time::sleep(wait) => {}
                        () = cancelled(cancel) => return Err(DownloadError::Cancelled),
                    }
                }
            }
        }

        // Check before the file gets its final name: a damaged file never looks installed.
        let got = std::fs::metadata(&part).map_err(io(&part))?.len();
        if got != file.size {
            let _ = std::fs::remove_file(&part);
            let _ = std::fs::remove_file(&tag_file);
            return Err(DownloadError::SizeMismatch {
                file: file.path.clone(),
                got,
                want: file.size,
            });
        }
        if let Some(want) = &file.sha256 {
            let Some(have) = sha256_file(&part, cancel).await.map_err(io(&part))? else {
                return Err(DownloadError::Cancelled);
            };
            if &have != want {
                let _ = std::fs::remove_file(&part);
                let _ = std::fs::remove_file(&tag_file);
                return Err(DownloadError::HashMismatch {
                    file: file.path.clone(),
                });
            }
        }
        std::fs::File::open(&part)
            .and_then(|f| f.sync_all())
            .map_err(io(&part))?;
        std::fs::rename(&part, dest).map_err(io(dest))?;
        let _ = std::fs::remove_file(&tag_file);
        Ok(())
    }

    async fn attempt(
        &self,
        url: &str,
        file: &RemoteFile,
        part: &Path,
        tag_file: &Path,
        progress: &mut (dyn FnMut(u64) + Send),
        cancel: &AtomicBool,
    ) -> Result<(), Attempt> {
        let have = std::fs::metadata(part).map(|m| m.len()).unwrap_or(0);
        let etag = std::fs::read_to_string(tag_file).ok();
        if have == file.size && file.size > 0 {
            // Complete from an earlier run; the caller verifies it.
            return Ok(());
        }
        let mut req = self.get(url);
        let resuming = have > 0 && have < file.size && etag.is_some();
        if resuming {
            // If-Range: the server sends the rest only if the file is still the one we started;
            // otherwise the whole new file (200), and we start over.
            req = req
                .header(reqwest::header::RANGE, format!("bytes={have}-"))
                .header(reqwest::header::IF_RANGE, etag.clone().unwrap_or_default());
        }
        let res = tokio::select! {
            res = req.send() => {
                res.map_err(|e| Attempt::Retry(DownloadError::Network(network_problem(&e))))?
            }
            () = cancelled(cancel) => return Err(Attempt::Fatal(DownloadError::Cancelled)),
        };
        let status = res.status().as_u16();
        let append = match status {
            206 if resuming => {
                let starts_at = res
                    .headers()
                    .get(reqwest::header::CONTENT_RANGE)
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| v.strip_prefix("bytes "))
                    .and_then(|v| v.split('-').next())
                    .and_then(|v| v.parse::<u64>().ok());
                if starts_at != Some(have) {
                    // A range we did not ask for: start over rather than splice.
                    let _ = std::fs::remove_file(part);
                    return Err(Attempt::Retry(DownloadError::Http {
                        status,
                        what: file.path.clone(),
                    }));
                }
                true
            }
            200 => false,
            401 | 403 | 404 => {
                return Err(Attempt::Fatal(DownloadError::Http {
                    status,
                    what: file.path.clone(),
                }))
            }
            _ => {
                return Err(Attempt::Retry(DownloadError::Http {
                    status,
                    what: file.path.clone(),
                }))
            }
        };
        // The hub puts the file's own ETag in X-Linked-Etag on the redirect; the final answer's
        // ETag is what If-Range is compared with next time.
        if let Some(tag) = res
            .headers()
            .get(reqwest::header::ETAG)
            .and_then(|v| v.to_str().ok())
        {
            std::fs::write(tag_file, tag).map_err(|e| Attempt::Fatal(io(tag_file)(e)))?;
        }
        let mut out = std::fs::OpenOptions::new()
            .create(true)
            .write(true)
            .append(append)
            .truncate(!append)
            .open(part)
            .map_err(|e| Attempt::Fatal(io(part)(e)))?;
        let mut written = if append { have } else { 0 };
        progress(written);
        let mut stream = res.bytes_stream();
        loop {
            if cancel.load(Ordering::SeqCst) {
                let _ = out.flush();
                return Err(Attempt::Fatal(DownloadError::Cancelled));
            }
            // Data first, so a steady stream costs no timers; when none comes, the cancel flag is
            // watched meanwhile (then back to the top, which ends the attempt).
            let next = tokio::select! {
                biased;
                next = stream.next() => next,
                () = cancelled(cancel) => continue,
            };
            let Some(chunk) = next else { break };
            // The server was reached; the connection broke (or stalled past the read timeout).
            let chunk = chunk
                .map_err(|e| Attempt::Retry(DownloadError::ConnectionBroke(network_problem(&e))))?;
            if written + chunk.len() as u64 > file.size {
                let _ = std::fs::remove_file(part);
                return Err(Attempt::Fatal(DownloadError::SizeMismatch {
                    file: file.path.clone(),
                    got: written + chunk.len() as u64,
                    want: file.size,
                }));
            }
            out.write_all(&chunk)
                .map_err(|e| Attempt::Fatal(io(part)(e)))?;
            written += chunk.len() as u64;
            progress(written);
        }
        out.flush().map_err(|e| Attempt::Fatal(io(part)(e)))?;
        if written < file.size {
            return Err(Attempt::Retry(DownloadError::ConnectionBroke(format!(
                "the connection closed after {written} of {} bytes",
                file.size
            ))));
        }
        Ok(())
    }
}

enum Attempt {
    Retry(DownloadError),
    Fatal(DownloadError),
}

/// The sha256 of a file, or None when `cancel` was set meanwhile: a multi-gigabyte file takes a
/// while to hash, and a cancel should not wait for that. The reading happens on the blocking
/// pool, `HASH_CHUNK` at a time, so a slow disk holds up no async task.
pub async fn sha256_file(path: &Path, cancel: &AtomicBool) -> std::io::Result<Option<String>> {
    let mut state = (
        std::fs::File::open(path)?,
        Sha256::new(),
        vec![0u8; 1 << 20],
    );
    loop {
        if cancel.load(Ordering::SeqCst) {
            return Ok(None);
        }
        let (back, at_end) = tokio::task::spawn_blocking(move || {
            let (f, h, buf) = &mut state;
            let mut hashed = 0;
            while hashed < HASH_CHUNK {
                let n = f.read(buf)?;
                if n == 0 {
                    return Ok((state, true));
                }
                h.update(&buf[..n]);
                hashed += n;
            }
            Ok::<_, std::io::Error>((state, false))
        })
        .await
        .map_err(std::io::Error::other)??;
        state = back;
        if at_end {
            let digest = state.1.finalize();
            return Ok(Some(digest.iter().map(|b| format!("{b:02x}")).collect()));
        }
    }
}

/// The parts of a diffusers pipeline we load; safety checkers and feature extractors are not.
const COMPONENTS: &[&str] = &[
    "scheduler",
    "text_encoder",
    "text_encoder_2",
    "tokenizer",
    "tokenizer_2",
    "unet",
    "vae",
];
const WEIGHT_STEMS: &[&str] = &["diffusion_pytorch_model", "model"];

/// The files of a diffusers repository to fetch, each with the local path it is saved under:
/// configs and tokenizer files of the components we load, and per component one weights file,
/// the `variant` one when the repository has it, saved under the plain name the loader expects.
pub fn select_files(files: &[RemoteFile], variant: Option<&str>) -> Vec<(RemoteFile, String)> {
    let mut out = Vec::new();
    for f in files {
        if f.path == "model_index.json" {
            out.push((f.clone(), f.path.clone()));
            continue;
        }
        let Some((component, name)) = f.path.split_once('/') else {
            continue;
        };
        if !COMPONENTS.contains(&component) || !is_plain_file_name(name) {
            continue;
        }
        if name.ends_with(".json") || name.ends_with(".txt") {
            out.push((f.clone(), f.path.clone()));
            continue;
        }
        // Weights: only safetensors (pickles can run code), only the stems the loader reads.
        let Some(stem_and_variant) = name.strip_suffix(".safetensors") else {
            continue;
        };
        let (stem, file_variant) = match stem_and_variant.split_once('.') {
            Some((s, v)) => (s, Some(v)),
            None => (stem_and_variant, None),
        };
        if !WEIGHT_STEMS.contains(&stem) {
            continue;
        }
        let has_variant = variant.is_some_and(|v| {
            files
                .iter()
                .any(|g| g.path == format!("{component}/{stem}.{v}.safetensors"))
        });
        let wanted = if has_variant { variant } else { None };
        if file_variant == wanted {
            out.push((f.clone(), format!("{component}/{stem}.safetensors")));
        }
    }
    out
}

/// Whether a file name from a hub listing is one plain name on every platform, so that joined to
/// the download folder it stays in it: no separators (`\\` is one on Windows), no drive or
/// stream colon, no control characters, not `.` or `..`. A listing comes from the repository's
/// owner or a mirror, neither of which may choose where on the user's disk a file lands.
fn is_plain_file_name(name: &str) -> bool {
    !name.is_empty()
        && name != "."
        && name != ".."
        && !name
            .chars()
            .any(|c| matches!(c, '/' | '\\' | ':') || c.is_control())
}

/// Free bytes on the disk holding `path` (the longest mount point that contains it).
pub fn free_space(path: &Path) -> Option<u64> {
    let path = std::fs::canonicalize(path).ok()?;
    let disks = sysinfo::Disks::new_with_refreshed_list().ok()?;
    disks
        .iter()
        .filter(|d| path.starts_with(d.mount_point()))
        .max_by_key(|d| d.mount_point().as_os_str().len())
        .map(|d| d.available_space())
}

/// Where an install stands, for progress bars and events.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct InstallProgress {
    /// The file being fetched.
    pub file: String,
    pub files_done: usize,
    pub files_total: usize,
    pub bytes_done: u64,
    pub bytes_total: u64,
}

/// What `install` needs besides the hub: a free-space probe (replaceable in tests).
pub struct InstallOptions<'a> {
    pub free_space: &'a (dyn Fn(&Path) -> Option<u64> + Sync),
}

impl Default for InstallOptions<'_> {
    fn default() -> Self {
        Self {
            free_space: &free_space,
        }
    }
}

/// Installs a catalog model into `models_dir/<id>`: files go to a hidden staging folder
/// (`.<id>.partial`, kept between attempts so a restart resumes), and the folder gets its final
/// name only when every file is verified.
pub async fn install(
    hub: &Hub,
    entry: &CatalogEntry,
    models_dir: &Path,
    opts: &InstallOptions<'_>,
    progress: &mut (dyn FnMut(&InstallProgress) + Send),
    cancel: &AtomicBool,
) -> Result<PathBuf, DownloadError> {
    let target = models_dir.join(&entry.id);
    if target.exists() {
        return Err(DownloadError::AlreadyInstalled(entry.name.clone()));
    }
    let listing = tokio::select! {
        listing = hub.list(&entry.repo, &entry.revision) => listing?,
        () = cancelled(cancel) => return Err(DownloadError::Cancelled),
    };
    let files = select_files(&listing, entry.variant.as_deref());
    if !files.iter().any(|(f, _)| f.path == "model_index.json")
        || !files.iter().any(|(_, local)| local.starts_with("unet/"))
    {
        return Err(DownloadError::NothingToDownload);
    }
    let staging = models_dir.join(format!(".{}.partial", entry.id));
    std::fs::create_dir_all(&staging).map_err(io(&staging))?;

    let on_disk = |local: &str| -> u64 {
        let done = std::fs::metadata(staging.join(local))
            .map(|m| m.len())
            .unwrap_or(0);
        let (dir, name) = local.rsplit_once('/').unwrap_or(("", local));
        let part = staging.join(dir).join(format!(".{name}.part"));
        done + std::fs::metadata(part).map(|m| m.len()).unwrap_or(0)
    };
    let bytes_total: u64 = files.iter().map(|(f, _)| f.size).sum();
    let remaining = || -> u64 {
        files
            .iter()
            .map(|(f, local)| f.size.saturating_sub(on_disk(local)))
            .sum()
    };
    if let Some(free) = (opts.free_space)(&staging) {
        if free < remaining() + SPACE_MARGIN {
            return Err(DownloadError::DiskFull {
                need_gb: gb(remaining() + SPACE_MARGIN),
                free_gb: Some(gb(free)),
                path: models_dir.to_path_buf(),
            });
        }
    }

    let fetched: Result<(), DownloadError> = async {
        fetch_all(hub, entry, &files, &staging, bytes_total, progress, cancel).await?;
        let marker = serde_json::json!({
            "catalog_id": entry.id,
            "name": entry.name,
            "repo": entry.repo,
            "revision": entry.revision,
            "installed_at": std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0),
        });
        let marker_path = staging.join(MARKER);
        crate::fsutil::write_atomic(&marker_path, marker.to_string().as_bytes())
            .map_err(io(&marker_path))?;
        std::fs::rename(&staging, &target).map_err(io(&target))
    }
    .await;
    match fetched {
        Ok(()) => {}
        // The disk filled up while writing (something else wrote to it meanwhile, or the free
        // space probe was wrong): the same answer as the check before starting, with the numbers
        // as they are now, which is what starting again will need.
        Err(e) if e.is_out_of_space() => {
            return Err(DownloadError::DiskFull {
                need_gb: gb(remaining() + SPACE_MARGIN),
                free_gb: (opts.free_space)(&staging).map(gb),
                path: models_dir.to_path_buf(),
            })
        }
        Err(e) => return Err(e),
    }
    progress(&InstallProgress {
        file: String::new(),
        files_done: files.len(),
        files_total: files.len(),
        bytes_done: bytes_total,
        bytes_total,
    });
    Ok(target)
}

/// Fetches every file of `files` not yet complete in `staging`, reporting progress over them all.
async fn fetch_all(
    hub: &Hub,
    entry: &CatalogEntry,
    files: &[(RemoteFile, String)],
    staging: &Path,
    bytes_total: u64,
    progress: &mut (dyn FnMut(&InstallProgress) + Send),
    cancel: &AtomicBool,
) -> Result<(), DownloadError> {
    let mut done_before = 0u64;
    for (i, (file, local)) in files.iter().enumerate() {
        let dest = staging.join(local);
        let finished = std::fs::metadata(&dest).is_ok_and(|m| m.len() == file.size);
        if !finished {
            let mut report = |bytes: u64| {
                progress(&InstallProgress {
                    file: local.clone(),
                    files_done: i,
                    files_total: files.len(),
                    bytes_done: done_before + bytes,
                    bytes_total,
                })
            };
            hub.fetch(
                &entry.repo,
                &entry.revision,
                file,
                &dest,
                &mut report,
                cancel,
            )
            .await?;
        }
        done_before += file.size;
    }
    Ok(())
}

#[cfg(test)]
#[path = "download_tests.rs"]
mod hub_tests;

#[cfg(test)]
mod tests {
    use super::*;

    fn f(path: &str) -> RemoteFile {
        RemoteFile {
            path: path.into(),
            size: 1,
            sha256: None,
        }
    }

    #[test]
    fn selects_configs_and_one_weights_file_per_component() {
        let listing: Vec<RemoteFile> = [
            "model_index.json",
            "README.md",
            "v1-5-pruned.ckpt",
            "safety_checker/model.safetensors",
            "feature_extractor/preprocessor_config.json",
            "scheduler/scheduler_config.json",
            "text_encoder/config.json",
            "text_encoder/model.safetensors",
            "text_encoder/model.fp16.safetensors",
            "text_encoder/pytorch_model.bin",
            "tokenizer/vocab.json",
            "tokenizer/merges.txt",
            "unet/config.json",
            "unet/diffusion_pytorch_model.safetensors",
            "unet/diffusion_pytorch_model.fp16.safetensors",
            "unet/diffusion_pytorch_model.non_ema.safetensors",
            "vae/config.json",
            "vae/diffusion_pytorch_model.safetensors",
        ]
        .iter()
        .map(|p| f(p))
        .collect();
        let picked: Vec<(String, String)> = select_files(&listing, Some("fp16"))
            .into_iter()
            .map(|(r, l)| (r.path, l))
            .collect();
        let want = [
            ("model_index.json", "model_index.json"),
            (
                "scheduler/scheduler_config.json",
                "scheduler/scheduler_config.json",
            ),
            ("text_encoder/config.json", "text_encoder/config.json"),
            (
                "text_encoder/model.fp16.safetensors",
                "text_encoder/model.safetensors",
            ),
            ("tokenizer/vocab.json", "tokenizer/vocab.json"),
            ("tokenizer/merges.txt", "tokenizer/merges.txt"),
            ("unet/config.json", "unet/config.json"),
            (
                "unet/diffusion_pytorch_model.fp16.safetensors",
                "unet/diffusion_pytorch_model.safetensors",
            ),
            ("vae/config.json", "vae/config.json"),
            // No fp16 VAE in this repository: the plain one.
            (
                "vae/diffusion_pytorch_model.safetensors",
                "vae/diffusion_pytorch_model.safetensors",
            ),
        ];
        let want: Vec<(String, String)> = want
            .iter()
            .map(|(a, b)| (a.to_string(), b.to_string()))
            .collect();
        assert_eq!(picked, want);
    }

    #[test]
    fn listed_names_that_could_leave_the_model_folder_are_skipped() {
        // Found by review: on Windows `\\` separates folders, so a listing entry
        // `unet/..\\..\\..\\settings.json` would have been saved over the app's settings.
        let f = |p: &str| RemoteFile {
            path: p.into(),
            size: 10,
            sha256: None,
        };
        let listing: Vec<RemoteFile> = [
            "model_index.json",
            "unet/config.json",
            "unet/..\\..\\..\\settings.json",
            "unet/..",
            "unet/config.json:stream.json",
            "unet/C:\\x.json",
            "vae/con\tfig.json",
            "vae/config.json",
        ]
        .iter()
        .map(|p| f(p))
        .collect();
        let picked: Vec<String> = select_files(&listing, None)
            .into_iter()
            .map(|(_, local)| local)
            .collect();
        assert_eq!(
            picked,
            ["model_index.json", "unet/config.json", "vae/config.json"]
        );
    }
}

/// Downloads in progress and finished, for the API and the UI's event stream.
pub mod manager {
    use super::*;
    use std::collections::HashMap;
    use std::sync::{Arc, Mutex};
    use tokio::sync::broadcast;

    #[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
    #[serde(rename_all = "snake_case")]
    pub enum DownloadState {
        Downloading,
        Done,
        Failed,
        Cancelled,
    }

    #[derive(Debug, Clone, Serialize)]
    pub struct DownloadInfo {
        /// The catalog id.
        pub id: String,
        pub name: String,
        pub state: DownloadState,
        pub progress: Option<InstallProgress>,
        pub error: Option<String>,
    }

    /// A change of one download, sent to every listener.
    #[derive(Debug, Clone, Serialize)]
    pub struct DownloadEvent {
        #[serde(flatten)]
        pub info: DownloadInfo,
    }

    struct Entry {
        info: DownloadInfo,
        /// Also tells the tasks apart: a task updates the entry only while it holds this flag.
        cancel: Arc<AtomicBool>,
        /// The task installing it, until a restart takes it to wait for it.
        task: Option<tokio::task::JoinHandle<()>>,
    }

    #[derive(Clone)]
    pub struct Downloads {
        hub: Hub,
        models_dir: PathBuf,
        items: Arc<Mutex<HashMap<String, Entry>>>,
        events: broadcast::Sender<DownloadEvent>,
    }

    impl Downloads {
        pub fn new(hub: Hub, models_dir: PathBuf) -> Self {
            Self {
                hub,
                models_dir,
                items: Arc::new(Mutex::new(HashMap::new())),
                events: broadcast::channel(64).0,
            }
        }

        pub fn subscribe(&self) -> broadcast::Receiver<DownloadEvent> {
            self.events.subscribe()
        }

        pub fn list(&self) -> Vec<DownloadInfo> {
            let items = self.items.lock().unwrap_or_else(|p| p.into_inner());
            let mut v: Vec<_> = items.values().map(|e| e.info.clone()).collect();
            v.sort_by(|a, b| a.id.cmp(&b.id));
            v
        }

        pub fn get(&self, id: &str) -> Option<DownloadInfo> {
            let items = self.items.lock().unwrap_or_else(|p| p.into_inner());
            items.get(id).map(|e| e.info.clone())
        }

        /// Starts (or resumes) installing `entry` on the current tokio runtime. A download of the
        /// same model already running is returned as it is; one that was cancelled but has not
        /// ended yet is started again once it has.
        pub fn start(&self, entry: CatalogEntry) -> DownloadInfo {
            let cancel = Arc::new(AtomicBool::new(false));
            let info = DownloadInfo {
                id: entry.id.clone(),
                name: entry.name.clone(),
                state: DownloadState::Downloading,
                progress: None,
                error: None,
            };
            // Held until the new task's handle is stored, so no other start sees the entry
            // without it; the task's first update waits for it.
            let mut items = self.items.lock().unwrap_or_else(|p| p.into_inner());
            let previous = match items.get_mut(&entry.id) {
                Some(e)
                    if e.info.state == DownloadState::Downloading
                        && !e.cancel.load(Ordering::SeqCst) =>
                {
                    return e.info.clone();
                }
                // Ended, or cancelled and about to end: the user's start must not be lost to the
                // old task's "cancelled", so a new task takes over. It waits for the old one
                // first, because both would write the same files.
                Some(e) => e.task.take(),
                None => None,
            };
            items.insert(
                entry.id.clone(),
                Entry {
                    info: info.clone(),
                    cancel: cancel.clone(),
                    task: None,
                },
            );
            self.emit(&info);
            let me = self.clone();
            let task = tokio::spawn(async move {
                if let Some(previous) = previous {
                    // A panic there is not ours to report; the files are free either way.
                    let _ = previous.await;
                }
                let id = entry.id.clone();
                let mut last = std::time::Instant::now() - Duration::from_secs(1);
                let mut last_file = String::new();
                let reporter = me.clone();
                let mut on_progress = |p: &InstallProgress| {
                    // Progress arrives per network chunk; a few updates a second are plenty.
                    if last.elapsed() < Duration::from_millis(250) && p.file == last_file {
                        return;
                    }
                    last = std::time::Instant::now();
                    last_file = p.file.clone();
                    reporter.update(&id, &cancel, |i| i.progress = Some(p.clone()));
                };
                let result = install(
                    &me.hub,
                    &entry,
                    &me.models_dir,
                    &InstallOptions::default(),
                    &mut on_progress,
                    &cancel,
                )
                .await;
                me.update(&entry.id, &cancel, |i| match result {
                    Ok(_) => i.state = DownloadState::Done,
                    Err(DownloadError::Cancelled) => i.state = DownloadState::Cancelled,
                    Err(e) => {
                        i.state = DownloadState::Failed;
                        i.error = Some(e.to_string());
                    }
                });
            });
            if let Some(e) = items.get_mut(&info.id) {
                e.task = Some(task);
            }
            info
        }

        /// Stops a running download; its files stay so that starting it again resumes.
        pub fn cancel(&self, id: &str) -> Option<DownloadInfo> {
            let items = self.items.lock().unwrap_or_else(|p| p.into_inner());
            let e = items.get(id)?;
            e.cancel.store(true, Ordering::SeqCst);
            Some(e.info.clone())
        }

        /// Changes the entry of `id` if the task holding `owner` still runs it: a task replaced
        /// by a restart must not report its end over the new one.
        fn update(&self, id: &str, owner: &Arc<AtomicBool>, f: impl FnOnce(&mut DownloadInfo)) {
            let info = {
                let mut items = self.items.lock().unwrap_or_else(|p| p.into_inner());
                let Some(e) = items.get_mut(id) else { return };
                if !Arc::ptr_eq(&e.cancel, owner) {
                    return;
                }
                f(&mut e.info);
                e.info.clone()
            };
            self.emit(&info);
        }

        fn emit(&self, info: &DownloadInfo) {
            let _ = self.events.send(DownloadEvent { info: info.clone() });
        }
    }
}
