//! What the in-process API tests share: the tiny models' folder and one way to call a route.

use axum::body::Body;
use axum::http::{Request, StatusCode};
use http_body_util::BodyExt;
use ld_server::{app, AppState};
use serde_json::Value;
use std::path::PathBuf;
use tower::ServiceExt;

/// The port the tests' states believe they listen on (the guard checks Host against it).
pub const PORT: u16 = 7860;

/// models/tiny: the tiny SD1 and SD2 test models.
pub fn tiny_models() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../models/tiny")
}

/// Sends one request to the router; `ui` adds our window's session token.
pub async fn call(
    s: &AppState,
    method: &str,
    path: &str,
    body: Body,
    ui: bool,
) -> (StatusCode, Vec<u8>) {
    let mut r = Request::builder()
        .method(method)
        .uri(path)
        .header("host", format!("127.0.0.1:{PORT}"))
        .header("content-type", "application/json");
    if ui {
        r = r.header("x-ld-session", s.session_token());
    }
    let res = app(s.clone()).oneshot(r.body(body).unwrap()).await.unwrap();
    let status = res.status();
    (
        status,
        res.into_body().collect().await.unwrap().to_bytes().to_vec(),
    )
}

pub async fn call_json(
    s: &AppState,
    method: &str,
    path: &str,
    body: Value,
    ui: bool,
) -> (StatusCode, Value) {
    let body = if body.is_null() {
        Body::empty()
    } else {
        Body::from(body.to_string())
    };
    let (status, bytes) = call(s, method, path, body, ui).await;
    let v = serde_json::from_slice(&bytes)
        .unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(&bytes)));
    (status, v)
}
