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
