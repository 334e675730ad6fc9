//! Downloads against a local server that speaks the hub's HTTP layout (file list with LFS sha256,
//! resolve URLs that redirect, ETag, Range/If-Range), serving the tiny test model: interrupted and
//! resumed, content changed between attempts, damaged data, server errors, a full disk, cancel and
//! resume. Never a partial file under a final name.

use super::*;
use axum::body::{Body, Bytes};
use axum::extract::{Path as UrlPath, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};

#[derive(Default)]
struct Served {
    files: HashMap<String, (Vec<u8>, String)>,
    /// Close the connection after this many bytes, this many times.
    drop_after: Option<(usize, usize)>,
    /// Serve these bytes instead of the real ones for this path.
    corrupt: Option<String>,
    /// Answer every file request with this status.
    fail: Option<u16>,
    /// Send this many bytes of every weights file, then nothing more, keeping the connection open
    /// (a stalled line).
    stall_after: Option<usize>,
    /// Every file request's Range and If-Range headers.
    seen: Vec<(String, Option<String>, Option<String>)>,
}

type Hub0 = Arc<Mutex<Served>>;

fn tiny_files() -> HashMap<String, (Vec<u8>, String)> {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../models/tiny/sd1");
    let mut out = HashMap::new();
    fn walk(
        dir: &std::path::Path,
        root: &std::path::Path,
        out: &mut HashMap<String, (Vec<u8>, String)>,
    ) {
        for e in std::fs::read_dir(dir).unwrap().flatten() {
            let p = e.path();
            if p.is_dir() {
                walk(&p, root, out);
            } else {
                let rel = p
                    .strip_prefix(root)
                    .unwrap()
                    .to_string_lossy()
                    .replace('\\', "/");
                let bytes = std::fs::read(&p).unwrap();
                out.insert(rel, (bytes, "\"v1\"".to_owned()));
            }
        }
    }
    walk(&root, &root, &mut out);
    out
}

fn sha(b: &[u8]) -> String {
    Sha256::digest(b)
        .iter()
        .map(|x| format!("{x:02x}"))
        .collect()
}

async fn tree(
    State(s): State<Hub0>,
    UrlPath((_org, repo, _rev)): UrlPath<(String, String, String)>,
) -> Response {
    if repo == "missing" {
        return StatusCode::NOT_FOUND.into_response();
    }
    let s = s.lock().unwrap();
    let list: Vec<serde_json::Value> = s
        .files
        .iter()
        .map(|(path, (bytes, _))| {
            if path.ends_with(".safetensors") {
                serde_json::json!({"type": "file", "path": path, "size": 134,
                    "lfs": {"oid": sha(bytes), "size": bytes.len(), "pointerSize": 134}})
            } else {
                serde_json::json!({"type": "file", "path": path, "size": bytes.len()})
            }
        })
        .chain(std::iter::once(
            serde_json::json!({"type": "directory", "path": "unet", "size": 0}),
        ))
        .collect();
    axum::Json(list).into_response()
}

async fn resolve(
    UrlPath((_org, _repo, _rev, path)): UrlPath<(String, String, String, String)>,
) -> Response {
    // The hub redirects file requests to its CDN.
    (
        StatusCode::FOUND,
        [(header::LOCATION, format!("/cdn/{path}"))],
    )
        .into_response()
}

async fn cdn(
    State(s): State<Hub0>,
    UrlPath(path): UrlPath<String>,
    headers: HeaderMap,
) -> Response {
    let mut s = s.lock().unwrap();
    let h = |k: header::HeaderName| {
        headers
            .get(k)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
    };
    s.seen
        .push((path.clone(), h(header::RANGE), h(header::IF_RANGE)));
    if let Some(code) = s.fail {
        return StatusCode::from_u16(code).unwrap().into_response();
    }
    let Some((bytes, etag)) = s.files.get(&path).cloned() else {
        return StatusCode::NOT_FOUND.into_response();
    };
    let bytes = if s.corrupt.as_deref() == Some(path.as_str()) {
        let mut b = bytes.clone();
        let mid = b.len() / 2;
        b[mid] ^= 0xff;
        b
    } else {
        bytes
    };
    let range_ok = h(header::IF_RANGE).is_none_or(|t| t == etag);
    let start = match (h(header::RANGE), range_ok) {
        (Some(r), true) => r
            .trim_start_matches("bytes=")
            .trim_end_matches('-')
            .parse::<usize>()
            .unwrap(),
        _ => 0,
    };
    let body_bytes = bytes[start..].to_vec();
    let drop_now = match &mut s.drop_after {
        Some((n, times)) if *times > 0 && path.ends_with(".safetensors") => {
            *times -= 1;
            Some(*n)
        }
        _ => None,
    };
    if let Some(n) = s.stall_after.filter(|_| path.ends_with(".safetensors")) {
        use futures_util::StreamExt as _;
        let first = Bytes::from(bytes[..n.min(bytes.len())].to_vec());
        let stream = futures_util::stream::iter(vec![Ok::<Bytes, std::io::Error>(first)])
            .chain(futures_util::stream::pending());
        let mut res = Response::new(Body::from_stream(stream));
        res.headers_mut()
            .insert(header::ETAG, etag.parse().unwrap());
        return res;
    }
    let body = match drop_now {
        Some(n) => {
            let first = Bytes::from(body_bytes[..n.min(body_bytes.len())].to_vec());
            use futures_util::StreamExt as _;
            // The first bytes go out, then the connection breaks (after a pause, so they are on
            // the wire before the break).
            let stream = futures_util::stream::iter(vec![Ok::<Bytes, std::io::Error>(first)])
                .chain(futures_util::stream::once(async {
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                    Err(std::io::Error::other("connection reset"))
                }));
            Body::from_stream(stream)
        }
        None => Body::from(body_bytes),
    };
    let mut res = Response::new(body);
    res.headers_mut()
        .insert(header::ETAG, etag.parse().unwrap());
    if start > 0 {
        *res.status_mut() = StatusCode::PARTIAL_CONTENT;
        res.headers_mut().insert(
            header::CONTENT_RANGE,
            format!("bytes {start}-{}/{}", bytes.len() - 1, bytes.len())
                .parse()
                .unwrap(),
        );
    }
    res
}

async fn fake_hub() -> (Hub, Hub0) {
    let state: Hub0 = Arc::new(Mutex::new(Served {
        files: tiny_files(),
        ..Default::default()
    }));
    let app = axum::Router::new()
        .route(
            "/api/models/{org}/{repo}/tree/{rev}",
            axum::routing::get(tree),
        )
        .route(
            "/{org}/{repo}/resolve/{rev}/{*path}",
            axum::routing::get(resolve),
        )
        .route("/cdn/{*path}", axum::routing::get(cdn))
        .with_state(state.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (Hub::new(&url, None).unwrap(), state)
}

fn entry() -> CatalogEntry {
    let mut e = crate::catalog::find("sd-1.5").unwrap();
    e.repo = "test/tiny".into();
    e
}

fn plenty(_: &Path) -> Option<u64> {
    Some(u64::MAX / 2)
}

async fn install_here(
    hub: &Hub,
    dir: &Path,
    cancel: &AtomicBool,
) -> Result<PathBuf, DownloadError> {
    let opts = InstallOptions {
        free_space: &plenty,
    };
    install(hub, &entry(), dir, &opts, &mut |_| {}, cancel).await
}

/// No `.part`, staging or final folder that is not complete and verified.
fn no_partial_under_final_names(dir: &Path) {
    let target = dir.join("sd-1.5");
    if target.exists() {
        let reference = tiny_files();
        for (rel, (bytes, _)) in reference {
            if rel.starts_with("unet/") || rel.starts_with("vae/") || rel == "model_index.json" {
                assert_eq!(std::fs::read(target.join(&rel)).unwrap(), bytes, "{rel}");
            }
        }
    }
}

#[tokio::test]
async fn installs_the_tiny_model_which_then_loads() {
    let (hub, served) = fake_hub().await;
    let t = tempfile::tempdir().unwrap();
    let path = install_here(&hub, t.path(), &AtomicBool::new(false))
        .await
        .unwrap();
    assert_eq!(path, t.path().join("sd-1.5"));
    assert!(!t.path().join(".sd-1.5.partial").exists());
    no_partial_under_final_names(t.path());
    let models = crate::models::scan(t.path(), &[]);
    assert_eq!(models.len(), 1);
    assert!(models[0].managed);
    assert_eq!(models[0].catalog_id.as_deref(), Some("sd-1.5"));
    ld_engine::pipeline::Pipeline::load(&path, &Default::default()).expect("the download loads");
    assert!(served
        .lock()
        .unwrap()
        .seen
        .iter()
        .all(|(_, range, _)| range.is_none()));
    // Installing twice is refused, not overwritten.
    let again = install_here(&hub, t.path(), &AtomicBool::new(false)).await;
    assert!(matches!(again, Err(DownloadError::AlreadyInstalled(_))));
}

#[tokio::test]
async fn an_interrupted_download_resumes_with_range_and_if_range() {
    let (hub, served) = fake_hub().await;
    served.lock().unwrap().drop_after = Some((1000, 2));
    let t = tempfile::tempdir().unwrap();
    install_here(&hub, t.path(), &AtomicBool::new(false))
        .await
        .unwrap();
    no_partial_under_final_names(t.path());
    let seen = served.lock().unwrap().seen.clone();
    let resumed: Vec<_> = seen.iter().filter(|(_, r, _)| r.is_some()).collect();
    assert_eq!(resumed.len(), 2, "{seen:?}");
    for (_, range, if_range) in resumed {
        // Each break comes 1000 bytes into a response; a resumed one may break again.
        let from: usize = range
            .as_deref()
            .unwrap()
            .trim_start_matches("bytes=")
            .trim_end_matches('-')
            .parse()
            .unwrap();
        assert!(from > 0 && from.is_multiple_of(1000), "{range:?}");
        assert_eq!(if_range.as_deref(), Some("\"v1\""));
    }
}

#[tokio::test]
async fn a_file_that_changed_on_the_server_starts_over() {
    let (hub, served) = fake_hub().await;
    let t = tempfile::tempdir().unwrap();
    let dest = t.path().join("unet/diffusion_pytorch_model.safetensors");
    // A .part of the old version, with its ETag.
    let (old, _) = served.lock().unwrap().files["unet/diffusion_pytorch_model.safetensors"].clone();
    std::fs::create_dir_all(dest.parent().unwrap()).unwrap();
    std::fs::write(
        t.path()
            .join("unet/.diffusion_pytorch_model.safetensors.part"),
        &old[..500],
    )
    .unwrap();
    std::fs::write(
        t.path()
            .join("unet/.diffusion_pytorch_model.safetensors.part-etag"),
        "\"v1\"",
    )
    .unwrap();
    let mut new = old.clone();
    new[10] ^= 1;
    new.extend_from_slice(b"more");
    served.lock().unwrap().files.insert(
        "unet/diffusion_pytorch_model.safetensors".into(),
        (new.clone(), "\"v2\"".into()),
    );
    let file = RemoteFile {
        path: "unet/diffusion_pytorch_model.safetensors".into(),
        size: new.len() as u64,
        sha256: Some(sha(&new)),
    };
    hub.fetch(
        "test/tiny",
        "main",
        &file,
        &dest,
        &mut |_| {},
        &AtomicBool::new(false),
    )
    .await
    .unwrap();
    assert_eq!(
        std::fs::read(&dest).unwrap(),
        new,
        "the new file, not a splice of old and new"
    );
    let seen = served.lock().unwrap().seen.clone();
    assert_eq!(
        seen[0].2.as_deref(),
        Some("\"v1\""),
        "asked to resume the old version"
    );
}

#[tokio::test]
async fn damaged_data_is_deleted_and_never_gets_the_final_name() {
    let (hub, served) = fake_hub().await;
    served.lock().unwrap().corrupt = Some("unet/diffusion_pytorch_model.safetensors".into());
    let t = tempfile::tempdir().unwrap();
    let err = install_here(&hub, t.path(), &AtomicBool::new(false))
        .await
        .unwrap_err();
    assert!(matches!(err, DownloadError::HashMismatch { .. }), "{err}");
    assert!(err.to_string().contains("damaged"));
    assert!(!t.path().join("sd-1.5").exists());
    let staged = t.path().join(".sd-1.5.partial/unet");
    assert!(!staged.join("diffusion_pytorch_model.safetensors").exists());
    assert!(!staged
        .join(".diffusion_pytorch_model.safetensors.part")
        .exists());
    // Once the server is fixed, the same install completes.
    served.lock().unwrap().corrupt = None;
    install_here(&hub, t.path(), &AtomicBool::new(false))
        .await
        .unwrap();
    no_partial_under_final_names(t.path());
}

#[tokio::test]
async fn server_errors_are_retried_then_reported() {
    let (hub, served) = fake_hub().await;
    served.lock().unwrap().fail = Some(503);
    let t = tempfile::tempdir().unwrap();
    let err = install_here(&hub, t.path(), &AtomicBool::new(false))
        .await
        .unwrap_err();
    assert!(
        matches!(err, DownloadError::Http { status: 503, .. }),
        "{err}"
    );
    assert_eq!(served.lock().unwrap().seen.len(), MAX_TRIES as usize);
    assert!(!t.path().join("sd-1.5").exists());
    let missing = CatalogEntry {
        repo: "test/missing".into(),
        ..entry()
    };
    let opts = InstallOptions {
        free_space: &plenty,
    };
    let err = install(
        &hub,
        &missing,
        t.path(),
        &opts,
        &mut |_| {},
        &AtomicBool::new(false),
    )
    .await
    .unwrap_err();
    assert!(matches!(err, DownloadError::NotFound { .. }), "{err}");
}

#[tokio::test]
async fn a_full_disk_is_found_before_downloading() {
    let (hub, served) = fake_hub().await;
    let t = tempfile::tempdir().unwrap();
    let tiny = |_: &Path| Some(1000u64);
    let opts = InstallOptions { free_space: &tiny };
    let err = install(
        &hub,
        &entry(),
        t.path(),
        &opts,
        &mut |_| {},
        &AtomicBool::new(false),
    )
    .await
    .unwrap_err();
    assert!(matches!(err, DownloadError::DiskFull { .. }), "{err}");
    assert!(err.to_string().contains("free"));
    assert!(
        served.lock().unwrap().seen.is_empty(),
        "nothing was downloaded"
    );
}

#[tokio::test]
async fn cancel_keeps_the_partial_file_and_a_new_start_resumes() {
    let (hub, served) = fake_hub().await;
    // Slow the weights down to one chunk per response so cancel lands mid-file.
    served.lock().unwrap().drop_after = Some((700, 1));
    let t = tempfile::tempdir().unwrap();
    let cancel = AtomicBool::new(false);
    let opts = InstallOptions {
        free_space: &plenty,
    };
    // The first report of a file is its start; the second comes after its first bytes.
    let mut reports = 0;
    let mut cancel_on_weights = |p: &InstallProgress| {
        if p.file.ends_with(".safetensors") {
            reports += 1;
            if reports == 2 {
                cancel.store(true, Ordering::SeqCst);
            }
        }
    };
    let err = install(
        &hub,
        &entry(),
        t.path(),
        &opts,
        &mut cancel_on_weights,
        &cancel,
    )
    .await
    .unwrap_err();
    assert!(matches!(err, DownloadError::Cancelled), "{err}");
    assert!(!t.path().join("sd-1.5").exists());
    let parts: Vec<_> = walk_names(&t.path().join(".sd-1.5.partial"))
        .into_iter()
        .filter(|n| n.ends_with(".part"))
        .collect();
    assert_eq!(parts.len(), 1, "one partial file kept: {parts:?}");
    install_here(&hub, t.path(), &AtomicBool::new(false))
        .await
        .unwrap();
    no_partial_under_final_names(t.path());
    let seen = served.lock().unwrap().seen.clone();
    assert!(
        seen.iter().any(|(_, r, _)| r.is_some()),
        "resumed: {seen:?}"
    );
}

fn walk_names(dir: &Path) -> Vec<String> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        if e.path().is_dir() {
            out.extend(walk_names(&e.path()));
        } else {
            out.push(e.file_name().to_string_lossy().into_owned());
        }
    }
    out
}

/// The weights files of the tiny model, as the install fetches them.
fn weights_requests(served: &Hub0) -> usize {
    let s = served.lock().unwrap();
    s.seen
        .iter()
        .filter(|(p, _, _)| p.ends_with(".safetensors"))
        .count()
}

/// A bound for what should happen at once, loose enough for a slow test machine; the bugs it
/// catches made these things take a minute.
const PROMPTLY: std::time::Duration = std::time::Duration::from_secs(10);

#[tokio::test]
async fn cancel_takes_effect_while_the_connection_is_stalled() {
    // Found by review: cancel was looked at only when data arrived, so on a stalled line it
    // waited for the minute-long read timeout.
    let (hub, served) = fake_hub().await;
    served.lock().unwrap().stall_after = Some(500);
    let t = tempfile::tempdir().unwrap();
    let (bytes, _) =
        served.lock().unwrap().files["unet/diffusion_pytorch_model.safetensors"].clone();
    let file = RemoteFile {
        path: "unet/diffusion_pytorch_model.safetensors".into(),
        size: bytes.len() as u64,
        sha256: Some(sha(&bytes)),
    };
    let dest = t.path().join("unet/diffusion_pytorch_model.safetensors");
    let cancel = AtomicBool::new(false);
    let first_bytes = tokio::sync::Notify::new();
    let mut report = |n: u64| {
        if n > 0 {
            first_bytes.notify_one();
        }
    };
    let fetching = hub.fetch("test/tiny", "main", &file, &dest, &mut report, &cancel);
    let cancelling = async {
        first_bytes.notified().await;
        // Into the stall: the cancel must not depend on more data coming.
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        cancel.store(true, Ordering::SeqCst);
    };
    let (result, ()) = tokio::time::timeout(PROMPTLY, async { tokio::join!(fetching, cancelling) })
        .await
        .expect("the cancel took effect while no data came");
    assert!(
        matches!(result, Err(DownloadError::Cancelled)),
        "{result:?}"
    );
    assert!(!dest.exists());
    let part = t
        .path()
        .join("unet/.diffusion_pytorch_model.safetensors.part");
    assert_eq!(
        std::fs::metadata(part).unwrap().len(),
        500,
        "kept to resume"
    );
}

#[tokio::test]
async fn cancel_takes_effect_during_the_wait_between_tries() {
    let (mut hub, served) = fake_hub().await;
    // Waits as long as the real ones get after a few failures.
    hub.retry_wait = std::time::Duration::from_secs(30);
    served.lock().unwrap().fail = Some(503);
    let t = tempfile::tempdir().unwrap();
    let cancel = AtomicBool::new(false);
    let installing = install_here(&hub, t.path(), &cancel);
    let cancelling = async {
        while served.lock().unwrap().seen.is_empty() {
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        cancel.store(true, Ordering::SeqCst);
    };
    let (result, ()) =
        tokio::time::timeout(PROMPTLY, async { tokio::join!(installing, cancelling) })
            .await
            .expect("the cancel cut the wait short");
    assert!(
        matches!(result, Err(DownloadError::Cancelled)),
        "{result:?}"
    );
    assert_eq!(
        served.lock().unwrap().seen.len(),
        1,
        "no try after the cancel"
    );
}

#[tokio::test]
async fn cancel_takes_effect_while_a_large_file_is_checked() {
    let (hub, _served) = fake_hub().await;
    let t = tempfile::tempdir().unwrap();
    // A complete .part of 4 GiB (sparse, so it costs no disk): hashing it takes seconds.
    let size = 4u64 << 30;
    let part = t.path().join(".big.safetensors.part");
    std::fs::File::create(&part).unwrap().set_len(size).unwrap();
    let file = RemoteFile {
        path: "big.safetensors".into(),
        size,
        sha256: Some("0".repeat(64)),
    };
    let dest = t.path().join("big.safetensors");
    let cancel = AtomicBool::new(false);
    let mut report = |_| {};
    let fetching = hub.fetch("test/tiny", "main", &file, &dest, &mut report, &cancel);
    let cancelling = async {
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        cancel.store(true, Ordering::SeqCst);
    };
    let (result, ()) = tokio::join!(fetching, cancelling);
    // Without the cancel the hash would run to its end and find the (made-up) checksum wrong.
    assert!(
        matches!(result, Err(DownloadError::Cancelled)),
        "{result:?}"
    );
    assert_eq!(
        std::fs::metadata(&part).unwrap().len(),
        size,
        "kept to resume"
    );
}

#[tokio::test]
async fn a_start_right_after_a_cancel_on_a_stalled_line_resumes_the_download() {
    // Found by review: `start` returned the cancelled download that was still winding down, so
    // the user's start ended as "cancelled" a moment later.
    let (hub, served) = fake_hub().await;
    served.lock().unwrap().stall_after = Some(500);
    let t = tempfile::tempdir().unwrap();
    let m = manager::Downloads::new(hub, t.path().to_path_buf());
    let mut events = m.subscribe();
    m.start(entry());
    let stalled = tokio::time::timeout(PROMPTLY, async {
        loop {
            let event = events.recv().await;
            if let Ok(e) = event {
                if e.info
                    .progress
                    .is_some_and(|p| p.file.ends_with(".safetensors"))
                {
                    break;
                }
            }
        }
    });
    stalled.await.expect("a weights file was started");
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    m.cancel("sd-1.5").unwrap();
    let again = m.start(entry());
    assert_eq!(again.state, manager::DownloadState::Downloading);
    served.lock().unwrap().stall_after = None;
    let last = tokio::time::timeout(PROMPTLY, async {
        loop {
            if let Ok(e) = events.recv().await {
                if e.info.state != manager::DownloadState::Downloading {
                    break e.info;
                }
            }
        }
    })
    .await
    .expect("the download ended");
    assert_eq!(last.state, manager::DownloadState::Done, "{last:?}");
    assert_eq!(m.get("sd-1.5").unwrap().state, manager::DownloadState::Done);
    no_partial_under_final_names(t.path());
    let seen = served.lock().unwrap().seen.clone();
    assert!(
        seen.iter()
            .any(|(_, r, _)| r.as_deref() == Some("bytes=500-")),
        "resumed where the stall left it: {seen:?}"
    );
}

#[tokio::test]
async fn a_download_that_breaks_often_but_keeps_moving_completes() {
    // Found by review: five breaks failed the download even though each one came after new data
    // (a 7 GB download on flaky Wi-Fi).
    let (hub, served) = fake_hub().await;
    served.lock().unwrap().drop_after = Some((50_000, 12));
    let t = tempfile::tempdir().unwrap();
    install_here(&hub, t.path(), &AtomicBool::new(false))
        .await
        .unwrap();
    no_partial_under_final_names(t.path());
    assert!(weights_requests(&served) > 12);
}

#[tokio::test]
async fn a_connection_that_breaks_with_no_progress_gives_up_and_says_so() {
    let (hub, served) = fake_hub().await;
    // Every weights response breaks before its first byte.
    served.lock().unwrap().drop_after = Some((0, 1000));
    let t = tempfile::tempdir().unwrap();
    let err = install_here(&hub, t.path(), &AtomicBool::new(false))
        .await
        .unwrap_err();
    assert!(matches!(err, DownloadError::ConnectionBroke(_)), "{err}");
    let text = err.to_string();
    // The server was reached: not the "check the internet connection" of an unreachable one.
    assert!(!text.contains("could not be reached"), "{text}");
    assert!(text.contains("connection"), "{text}");
    assert!(text.contains("continues where it stopped"), "{text}");
    assert_eq!(weights_requests(&served), MAX_TRIES as usize);
}

#[cfg(target_os = "linux")]
#[tokio::test]
async fn a_disk_that_fills_up_while_writing_is_reported_with_real_numbers() {
    // Found by review: the message read "0.0 GB needed, 0.0 GB free in …/.x.part".
    let (hub, _served) = fake_hub().await;
    let t = tempfile::tempdir().unwrap();
    // Writes to /dev/full fail as on a full disk.
    let unet = t.path().join(".sd-1.5.partial/unet");
    std::fs::create_dir_all(&unet).unwrap();
    std::os::unix::fs::symlink(
        "/dev/full",
        unet.join(".diffusion_pytorch_model.safetensors.part"),
    )
    .unwrap();
    // Room at the check before starting; 1.2 GB by the time the write fails.
    let probes = std::sync::atomic::AtomicUsize::new(0);
    let probe = |_: &Path| {
        if probes.fetch_add(1, Ordering::SeqCst) == 0 {
            Some(u64::MAX / 2)
        } else {
            Some(1_200_000_000)
        }
    };
    let opts = InstallOptions { free_space: &probe };
    let err = install(
        &hub,
        &entry(),
        t.path(),
        &opts,
        &mut |_| {},
        &AtomicBool::new(false),
    )
    .await
    .unwrap_err();
    let DownloadError::DiskFull {
        need_gb,
        free_gb,
        ref path,
    } = err
    else {
        panic!("{err}");
    };
    assert_eq!(free_gb, Some(1.2));
    assert_eq!(path, t.path());
    // What is left of the model (at least the unet, at most all of it) and the margin.
    let total: usize = tiny_files().values().map(|(b, _)| b.len()).sum();
    let unet_size = std::fs::metadata(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../../models/tiny/sd1/unet/diffusion_pytorch_model.safetensors"),
    )
    .unwrap()
    .len();
    let need = (need_gb * 1e9).round() as u64;
    assert!(
        need >= SPACE_MARGIN + unet_size && need <= SPACE_MARGIN + total as u64,
        "{need}"
    );
    let text = err.to_string();
    assert!(text.contains("1.2 GB are free"), "{text}");
    assert!(text.contains("free up space"), "{text}");
    assert!(text.contains("start the download again"), "{text}");
}

#[tokio::test]
async fn an_unreachable_server_is_named_without_its_api_address() {
    // Found by review: the message quoted the whole request URL
    // ("error sending request for url (http://.../api/models/...)").
    let closed = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", closed.local_addr().unwrap());
    drop(closed);
    let hub = Hub::new(&url, None).unwrap();
    let t = tempfile::tempdir().unwrap();
    let err = install_here(&hub, t.path(), &AtomicBool::new(false))
        .await
        .unwrap_err();
    assert!(matches!(err, DownloadError::Network(_)), "{err}");
    let text = err.to_string();
    assert!(text.contains("could not be reached (127.0.0.1: "), "{text}");
    assert!(
        !text.contains("http://") && !text.contains("/api/"),
        "{text}"
    );
    assert!(text.contains("check the internet connection"), "{text}");
}
