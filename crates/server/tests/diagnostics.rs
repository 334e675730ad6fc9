//! Diagnostics through the HTTP API (issue #8): the report's shape, recent failures mapped to
//! causes, and the self-test on the tiny model; `doctor --self-test` from the real binary.

use axum::body::Body;
use axum::http::{Request, StatusCode};
use http_body_util::BodyExt;
use ld_core::datadir::DataDir;
use ld_server::{app, AppState, StateOptions};
use serde_json::Value;
use tower::ServiceExt;

const PORT: u16 = 7860;

async fn call(s: &AppState, method: &str, path: &str) -> (StatusCode, Value) {
    let r = Request::builder()
        .method(method)
        .uri(path)
        .header("host", format!("127.0.0.1:{PORT}"))
        .body(Body::empty())
        .unwrap();
    let res = app(s.clone()).oneshot(r).await.unwrap();
    let status = res.status();
    let bytes = res.into_body().collect().await.unwrap().to_bytes();
    (status, serde_json::from_slice(&bytes).unwrap())
}

#[tokio::test]
async fn the_report_has_hardware_recommendation_models_disk_and_problems() {
    let dir = tempfile::tempdir().unwrap();
    let s = AppState::open(StateOptions::new(
        DataDir::open(Some(dir.path())).unwrap(),
        PORT,
    ))
    .unwrap();
    let (status, r) = call(&s, "GET", "/api/v1/diagnostics").await;
    assert_eq!(status, StatusCode::OK, "{r}");
    assert!(r["system"]["cpu"]["name"].is_string(), "{r}");
    // This machine has no usable GPU in a CPU build: the processor in fp32.
    assert_eq!(r["recommendation"]["device"]["value"], "cpu");
    assert_eq!(r["recommendation"]["precision"]["value"], "fp32");
    assert!(
        r["recommendation"]["device"]["reason"]
            .as_str()
            .unwrap()
            .len()
            > 10
    );
    let families: Vec<&str> = r["recommendation"]["families"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f["family"].as_str().unwrap())
        .collect();
    assert_eq!(families, ["SD1", "SD2", "SDXL"]);
    assert_eq!(r["models"]["count"], 0);
    assert!(
        r["disk"]["free_bytes"].as_u64().unwrap() > 0,
        "{}",
        r["disk"]
    );
    assert_eq!(r["problems"], serde_json::json!([]));
    let ids: Vec<&str> = r["troubleshooting"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["id"].as_str().unwrap())
        .collect();
    for id in [
        "out_of_memory",
        "slow_generation",
        "poor_quality",
        "wont_start",
    ] {
        assert!(ids.contains(&id), "{ids:?}");
    }
    let text = r["text"].as_str().unwrap();
    assert!(
        text.contains("CPU:") && text.contains("Recommended settings"),
        "{text}"
    );
}

#[tokio::test]
async fn the_self_test_runs_the_tiny_model() {
    let dir = tempfile::tempdir().unwrap();
    let s = AppState::open(StateOptions::new(
        DataDir::open(Some(dir.path())).unwrap(),
        PORT,
    ))
    .unwrap();
    // Found through the repository this test binary was built from (see find_tiny_model).
    let (status, r) = call(&s, "POST", "/api/v1/diagnostics/self-test").await;
    assert_eq!(status, StatusCode::OK, "{r}");
    assert_eq!(r["ok"], true, "{r}");
    assert_eq!(
        r["step_ms"].as_array().unwrap().len(),
        r["steps"].as_u64().unwrap() as usize
    );
    assert_eq!(r["model"], "tiny/sd1");
}

#[test]
fn doctor_self_test_prints_the_report_and_the_timing() {
    let dir = tempfile::tempdir().unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_local-diffusers"))
        .args(["doctor", "--self-test", "--data-dir"])
        .arg(dir.path())
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        text.contains("Recommended settings") && text.contains("Disk:"),
        "{text}"
    );
    assert!(text.contains("Self-test: passed on cpu"), "{text}");
}
