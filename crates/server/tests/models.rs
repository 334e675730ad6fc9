//! The model library, catalog and downloads through the API and the command line, against a local
//! server that speaks the Hugging Face layout and serves the tiny test model. Pins issue #7's
//! library and download parts.

use axum::body::Body;
use axum::extract::Path as UrlPath;
use axum::http::{header, Request, StatusCode};
use axum::response::{IntoResponse, Response};
use http_body_util::BodyExt;
use ld_core::datadir::DataDir;
use ld_server::{app, AppState, StateOptions};
use serde_json::{json, Value};
use std::path::PathBuf;
use std::time::Duration;
use tower::ServiceExt;

const PORT: u16 = 7860;

fn tiny(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../models/tiny")
        .join(name)
}

/// Serves models/tiny/sd1 as any repository: the file list and the files (no resume; the
/// downloader's resume and failure cases are tested in ld-core).
async fn fake_hub() -> String {
    async fn tree(UrlPath((_o, _r, _v)): UrlPath<(String, String, String)>) -> Response {
        let root = tiny("sd1");
        let mut list = Vec::new();
        for (rel, bytes) in files(&root) {
            list.push(json!({"type": "file", "path": rel, "size": bytes.len()}));
        }
        axum::Json(list).into_response()
    }
    async fn resolve(
        UrlPath((_o, _r, _v, path)): UrlPath<(String, String, String, String)>,
    ) -> Response {
        match files(&tiny("sd1"))
            .into_iter()
            .find(|(rel, _)| *rel == path)
        {
            Some((_, bytes)) => ([(header::ETAG, "\"x\"")], bytes).into_response(),
            None => StatusCode::NOT_FOUND.into_response(),
        }
    }
    let app = axum::Router::new()
        .route("/api/models/{o}/{r}/tree/{v}", axum::routing::get(tree))
        .route("/{o}/{r}/resolve/{v}/{*path}", axum::routing::get(resolve));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    url
}

fn files(root: &std::path::Path) -> Vec<(String, Vec<u8>)> {
    fn walk(d: &std::path::Path, root: &std::path::Path, out: &mut Vec<(String, Vec<u8>)>) {
        for e in std::fs::read_dir(d).unwrap().flatten() {
            let p = e.path();
            if p.is_dir() {
                walk(&p, root, out);
            } else {
                let rel = p
                    .strip_prefix(root)
                    .unwrap()
                    .to_string_lossy()
                    .replace('\\', "/");
                out.push((rel, std::fs::read(&p).unwrap()));
            }
        }
    }
    let mut out = Vec::new();
    walk(root, root, &mut out);
    out
}

async fn call(
    s: &AppState,
    method: &str,
    path: &str,
    body: Value,
    ui: bool,
) -> (StatusCode, Value) {
    let mut r = Request::builder()
        .method(method)
        .uri(path)
        .header("host", format!("127.0.0.1:{PORT}"))
        .header("content-type", "application/json");
    if ui {
        r = r.header("x-ld-session", s.session_token());
    }
    let body = if body.is_null() {
        Body::empty()
    } else {
        Body::from(body.to_string())
    };
    let res = app(s.clone()).oneshot(r.body(body).unwrap()).await.unwrap();
    let status = res.status();
    let bytes = res.into_body().collect().await.unwrap().to_bytes();
    (
        status,
        serde_json::from_slice(&bytes).unwrap_or(Value::Null),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn catalog_setup_download_use_and_delete() {
    let hub = fake_hub().await;
    let dir = tempfile::tempdir().unwrap();
    let s = AppState::open(StateOptions {
        hub_endpoint: Some(hub),
        models_dirs: vec![tiny("sd2")],
        ..StateOptions::new(DataDir::open(Some(dir.path())).unwrap(), PORT)
    })
    .unwrap();

    let (status, catalog) = call(&s, "GET", "/api/v1/catalog", Value::Null, false).await;
    assert_eq!(status, StatusCode::OK);
    // This build has no GPU back end: the suggestion is the fast CPU model.
    assert_eq!(catalog["suggested"], "sd-turbo");
    let turbo = catalog["models"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["id"] == "sd-turbo")
        .unwrap();
    assert_eq!(
        (turbo["fits"].as_bool(), turbo["installed"].as_bool()),
        (Some(true), Some(false))
    );
    let xl = catalog["models"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["id"] == "sdxl-base")
        .unwrap();
    assert_eq!(xl["fits"], false);
    let (_, setup) = call(&s, "GET", "/api/v1/setup", Value::Null, false).await;
    assert_eq!(setup["has_model"], true, "the sd2 folder counts");
    assert_eq!(setup["suggested"]["id"], "sd-turbo");

    // The user's own folder is never ours to delete.
    let (status, err) = call(&s, "DELETE", "/api/v1/models/sd2", Value::Null, true).await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{err}");
    assert!(err["message"]
        .as_str()
        .unwrap()
        .contains("only deletes models it downloaded"));
    assert!(tiny("sd2").join("model_index.json").exists());

    let (status, _) = call(
        &s,
        "POST",
        "/api/v1/downloads",
        json!({"id": "sd-turbo"}),
        false,
    )
    .await;
    assert_eq!(
        status,
        StatusCode::UNAUTHORIZED,
        "downloads are for our window"
    );
    let (status, err) = call(&s, "POST", "/api/v1/downloads", json!({"id": "nope"}), true).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert!(err["hint"].as_str().unwrap().contains("sd-turbo"));

    // Watch the events while it downloads.
    let events = app(s.clone())
        .oneshot(
            Request::builder()
                .uri("/api/v1/events")
                .header("host", format!("127.0.0.1:{PORT}"))
                .body(Body::empty())
                .unwrap(),
        )
        .await
        .unwrap();
    let mut events = events.into_body();
    let (status, started) = call(
        &s,
        "POST",
        "/api/v1/downloads",
        json!({"id": "sd-turbo"}),
        true,
    )
    .await;
    assert_eq!(status, StatusCode::ACCEPTED, "{started}");
    let mut text = String::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while !text.contains("\"state\":\"done\"") && !text.contains("\"state\":\"failed\"") {
        let frame = tokio::time::timeout_at(deadline, events.frame())
            .await
            .expect("download events")
            .unwrap()
            .unwrap();
        if let Ok(d) = frame.into_data() {
            text.push_str(&String::from_utf8_lossy(&d));
        }
    }
    assert!(text.contains("event: download"), "{text}");
    assert!(text.contains("\"state\":\"done\""), "{text}");

    let (_, models) = call(&s, "GET", "/api/v1/models", Value::Null, false).await;
    let turbo = models["models"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["name"] == "sd-turbo")
        .expect("installed");
    assert_eq!(turbo["managed"], true);
    assert_eq!(turbo["catalog_id"], "sd-turbo");
    // It draws.
    let (status, job) = call(
        &s,
        "POST",
        "/api/v1/jobs",
        json!({"prompt": "x", "model": "sd-turbo", "width": 64, "height": 64, "steps": 1}),
        false,
    )
    .await;
    assert_eq!(status, StatusCode::ACCEPTED, "{job}");
    let done = s.jobs().wait(job["id"].as_str().unwrap()).await.unwrap();
    assert_eq!(done.images.len(), 1, "{:?}", done.error);
    // And, being ours, it can be deleted.
    let (status, _) = call(&s, "DELETE", "/api/v1/models/sd-turbo", Value::Null, true).await;
    assert_eq!(status, StatusCode::OK);
    assert!(!dir.path().join("models/sd-turbo").exists());
}

fn bin() -> std::process::Command {
    std::process::Command::new(env!("CARGO_BIN_EXE_local-diffusers"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_command_line_lists_downloads_and_generates_by_name() {
    let hub = fake_hub().await;
    let dir = tempfile::tempdir().unwrap();
    let run = |args: &[&str]| {
        let out = bin()
            .args(args)
            .arg("--data-dir")
            .arg(dir.path())
            .env("HF_ENDPOINT", &hub)
            .output()
            .unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (ok, text, _) = tokio::task::block_in_place(|| run(&["models", "catalog"]));
    assert!(
        ok && text.contains("sd-turbo") && text.contains("sdxl-base"),
        "{text}"
    );
    let tiny_dir = tiny("").display().to_string();
    let (ok, text, _) =
        tokio::task::block_in_place(|| run(&["models", "list", "--models-dir", &tiny_dir]));
    assert!(ok && text.contains("sd1") && text.contains("SD2"), "{text}");
    let (ok, _, err) = tokio::task::block_in_place(|| run(&["models", "download", "nope"]));
    assert!(!ok && err.contains("sd-turbo"), "{err}");
    let (ok, text, err) = tokio::task::block_in_place(|| run(&["models", "download", "sd-1.5"]));
    assert!(ok, "{err}");
    assert!(text.contains("Installed Stable Diffusion 1.5"), "{text}");
    let out = dir.path().join("by-name.png");
    let (ok, _, err) = tokio::task::block_in_place(|| {
        run(&[
            "generate",
            "a cat",
            "--model",
            "sd-1.5",
            "--width",
            "64",
            "--height",
            "64",
            "--steps",
            "1",
            "--out",
            out.to_str().unwrap(),
        ])
    });
    assert!(ok, "{err}");
    assert!(out.is_file());
    let (ok, _, err) =
        tokio::task::block_in_place(|| run(&["generate", "a cat", "--model", "missing-model"]));
    assert!(!ok && err.contains("installed: sd-1.5"), "{err}");
}
