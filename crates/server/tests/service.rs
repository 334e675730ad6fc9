//! The generation service through the HTTP API, in-process, with the tiny test models: native jobs,
//! events, gallery, presets, the A1111 and OpenAI routes as chat apps call them, limits and bad
//! input. Pins issue #5.

use axum::body::Body;
use axum::http::{Request, StatusCode};
use base64::Engine as _;
use http_body_util::BodyExt;
use ld_core::datadir::DataDir;
use ld_server::{app, AppState, StateOptions};
use serde_json::{json, Value};
use std::path::PathBuf;
use std::time::Duration;
use tower::ServiceExt;

const PORT: u16 = 7860;

fn tiny_models() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../models/tiny")
}

fn state_with(dir: &tempfile::TempDir, capacity: usize) -> AppState {
    AppState::open(StateOptions {
        models_dirs: vec![tiny_models()],
        queue_capacity: capacity,
        ..StateOptions::new(DataDir::open(Some(dir.path())).unwrap(), PORT)
    })
    .unwrap()
}

fn state(dir: &tempfile::TempDir) -> AppState {
    state_with(dir, 16)
}

fn req(method: &str, path: &str) -> axum::http::request::Builder {
    Request::builder()
        .method(method)
        .uri(path)
        .header("host", format!("127.0.0.1:{PORT}"))
}

fn ui(s: &AppState, method: &str, path: &str) -> axum::http::request::Builder {
    req(method, path).header("x-ld-session", s.session_token())
}

async fn send(s: &AppState, r: Request<Body>) -> (StatusCode, axum::http::HeaderMap, Vec<u8>) {
    let res = app(s.clone()).oneshot(r).await.unwrap();
    let status = res.status();
    let headers = res.headers().clone();
    let body = res.into_body().collect().await.unwrap().to_bytes().to_vec();
    (status, headers, body)
}

async fn send_json(s: &AppState, method: &str, path: &str, body: Value) -> (StatusCode, Value) {
    let r = req(method, path)
        .header("content-type", "application/json")
        .body(Body::from(body.to_string()))
        .unwrap();
    let (status, _, bytes) = send(s, r).await;
    (status, json(&bytes))
}

async fn get_json(s: &AppState, path: &str) -> (StatusCode, Value) {
    let (status, _, bytes) = send(s, req("GET", path).body(Body::empty()).unwrap()).await;
    (status, json(&bytes))
}

fn json(body: &[u8]) -> Value {
    serde_json::from_slice(body)
        .unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(body)))
}

/// Polls a job until it has finished.
async fn wait_job(s: &AppState, id: &str) -> Value {
    for _ in 0..600 {
        let (status, job) = get_json(s, &format!("/api/v1/jobs/{id}")).await;
        assert_eq!(status, StatusCode::OK, "{job}");
        if ["done", "failed", "cancelled"].contains(&job["state"].as_str().unwrap()) {
            return job;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("job {id} did not finish in a minute");
}

fn png_parameters(png: &[u8]) -> String {
    ld_core::image_file::read_parameters(png).expect("the PNG carries its parameters")
}

/// Width and height from a PNG's header.
fn png_size(png: &[u8]) -> (u32, u32) {
    let header = png::Decoder::new(std::io::Cursor::new(png))
        .read_info()
        .expect("a PNG");
    (header.info().width, header.info().height)
}

fn small(prompt: &str) -> Value {
    json!({"prompt": prompt, "model": "sd1", "width": 64, "height": 64, "steps": 4, "seed": 42})
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_native_job_lands_in_the_gallery_with_its_parameters() {
    let dir = tempfile::tempdir().unwrap();
    let s = state(&dir);
    let (status, job) = send_json(&s, "POST", "/api/v1/jobs", small("a red lighthouse")).await;
    assert_eq!(status, StatusCode::ACCEPTED, "{job}");
    assert_eq!(job["sampler"], "DPM++ 2M");
    assert_eq!(job["schedule"], "Karras");
    let done = wait_job(&s, job["id"].as_str().unwrap()).await;
    assert_eq!(done["state"], "done", "{done}");
    let id = done["images"][0]["id"].as_i64().unwrap();

    let (status, page) = get_json(&s, "/api/v1/images?search=LIGHTHOUSE").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(page["total"], 1, "{page}");
    assert_eq!(page["items"][0]["id"], id);
    let (_, page) = get_json(&s, "/api/v1/images?search=castle").await;
    assert_eq!(page["total"], 0);

    let (status, headers, png) = send(
        &s,
        req("GET", &format!("/api/v1/images/{id}/file"))
            .body(Body::empty())
            .unwrap(),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(headers["content-type"], "image/png");
    assert_eq!(headers["x-content-type-options"], "nosniff");
    let params = png_parameters(&png);
    // The default negative prompt from the settings was applied.
    assert!(
        params.starts_with("a red lighthouse\nNegative prompt: lowres"),
        "{params}"
    );
    assert!(
        params.contains("Sampler: DPM++ 2M, Schedule type: Karras"),
        "{params}"
    );
    assert!(
        params.contains("Seed: 42, Size: 64x64, Model: sd1"),
        "{params}"
    );
    assert!(params.contains("RNG: CPU"), "{params}");
    let decoded = image::load_from_memory(&png).unwrap();
    assert_eq!((decoded.width(), decoded.height()), (64, 64));

    let (status, headers, thumb) = send(
        &s,
        req("GET", &format!("/api/v1/images/{id}/thumbnail"))
            .body(Body::empty())
            .unwrap(),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(headers["content-type"], "image/png");
    assert!(image::load_from_memory(&thumb).is_ok());

    // Inspecting our own PNG gives the settings back.
    let (status, _, body) = send(
        &s,
        req("POST", "/api/v1/images/inspect")
            .body(Body::from(png.clone()))
            .unwrap(),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    let inspected = json(&body);
    assert_eq!(inspected["source"], "a1111");
    assert_eq!(inspected["prompt"], "a red lighthouse");
    assert_eq!(inspected["seed"], 42);

    // Favourite, then trash (UI only), restore, trash again and empty.
    let (status, _, _) = send(
        &s,
        req("DELETE", &format!("/api/v1/images/{id}"))
            .body(Body::empty())
            .unwrap(),
    )
    .await;
    assert_eq!(
        status,
        StatusCode::UNAUTHORIZED,
        "deleting needs our window"
    );
    let (status, _, body) = send(
        &s,
        ui(&s, "PUT", &format!("/api/v1/images/{id}/favourite"))
            .header("content-type", "application/json")
            .body(Body::from(r#"{"favourite": true}"#))
            .unwrap(),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{}", String::from_utf8_lossy(&body));
    let (_, page) = get_json(&s, "/api/v1/images?favourites=true").await;
    assert_eq!(page["total"], 1);
    let del = ui(&s, "DELETE", &format!("/api/v1/images/{id}"));
    assert_eq!(
        send(&s, del.body(Body::empty()).unwrap()).await.0,
        StatusCode::OK
    );
    let (_, page) = get_json(&s, "/api/v1/images").await;
    assert_eq!(page["total"], 0, "a trashed image leaves the gallery");
    let (_, page) = get_json(&s, "/api/v1/images?trash=true").await;
    assert_eq!(page["total"], 1, "and sits in the trash");
    let restore = ui(&s, "POST", &format!("/api/v1/images/{id}/restore"));
    assert_eq!(
        send(&s, restore.body(Body::empty()).unwrap()).await.0,
        StatusCode::OK
    );
    let (_, page) = get_json(&s, "/api/v1/images").await;
    assert_eq!(page["total"], 1);
    let del = ui(&s, "DELETE", &format!("/api/v1/images/{id}"));
    assert_eq!(
        send(&s, del.body(Body::empty()).unwrap()).await.0,
        StatusCode::OK
    );
    let (status, _, body) = send(
        &s,
        ui(&s, "DELETE", "/api/v1/trash")
            .body(Body::empty())
            .unwrap(),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(json(&body)["deleted"], 1);
    let (status, _) = get_json(&s, &format!("/api/v1/images/{id}")).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_same_seed_gives_the_same_image_and_batches_count_seeds_up() {
    let dir = tempfile::tempdir().unwrap();
    let s = state(&dir);
    let mut body = small("a cat");
    body["batch_size"] = json!(2);
    let (_, job) = send_json(&s, "POST", "/api/v1/jobs", body).await;
    let done = wait_job(&s, job["id"].as_str().unwrap()).await;
    let seeds: Vec<_> = done["images"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["seed"].clone())
        .collect();
    assert_eq!(seeds, [json!(42), json!(43)]);
    let (_, job) = send_json(&s, "POST", "/api/v1/jobs", small("a cat")).await;
    let again = wait_job(&s, job["id"].as_str().unwrap()).await;
    let file = |v: &Value| {
        let path = s
            .gallery()
            .file_path(&s.gallery().get(v["id"].as_i64().unwrap()).unwrap().unwrap());
        image::open(path).unwrap().to_rgb8().into_raw()
    };
    assert_eq!(file(&done["images"][0]), file(&again["images"][0]));
    assert_ne!(file(&done["images"][0]), file(&done["images"][1]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_stream_reports_progress_previews_and_done() {
    let dir = tempfile::tempdir().unwrap();
    let s = state(&dir);
    let res = app(s.clone())
        .oneshot(req("GET", "/api/v1/events").body(Body::empty()).unwrap())
        .await
        .unwrap();
    assert_eq!(res.headers()["content-type"], "text/event-stream");
    let mut body = res.into_body();
    let (_, job) = send_json(&s, "POST", "/api/v1/jobs", small("a boat")).await;
    let id = job["id"].as_str().unwrap().to_owned();
    let mut text = String::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while !text.contains("event: done") {
        let frame = tokio::time::timeout_at(deadline, body.frame())
            .await
            .expect("events within a minute")
            .unwrap()
            .unwrap();
        if let Ok(data) = frame.into_data() {
            text.push_str(&String::from_utf8_lossy(&data));
        }
    }
    for kind in ["queued", "started", "progress", "preview", "done"] {
        assert!(
            text.contains(&format!("event: {kind}")),
            "no {kind} in {text}"
        );
    }
    assert!(text.contains(&format!("\"job\":\"{id}\"")));
    assert!(
        text.contains("data:image/png;base64,"),
        "previews are images"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_works_queued_and_running() {
    let dir = tempfile::tempdir().unwrap();
    let s = state(&dir);
    let mut long = small("a long one");
    long["steps"] = json!(150);
    long["width"] = json!(256);
    long["height"] = json!(256);
    let (_, running) = send_json(&s, "POST", "/api/v1/jobs", long.clone()).await;
    let (_, queued) = send_json(&s, "POST", "/api/v1/jobs", long).await;
    assert_eq!(queued["position"], 2, "{queued}");
    let (status, c) = send_json(
        &s,
        "POST",
        &format!("/api/v1/jobs/{}/cancel", queued["id"].as_str().unwrap()),
        json!({}),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(c["state"], "cancelled", "a queued job is cancelled at once");
    // Wait until the first is drawing, then cancel it.
    let id = running["id"].as_str().unwrap();
    for _ in 0..300 {
        let (_, j) = get_json(&s, &format!("/api/v1/jobs/{id}")).await;
        if j["step"].as_u64().unwrap_or(0) > 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    send_json(&s, "POST", &format!("/api/v1/jobs/{id}/cancel"), json!({})).await;
    let done = wait_job(&s, id).await;
    assert_eq!(done["state"], "cancelled", "{done}");
    assert!(done["step"].as_u64().unwrap() < 150);
    let (_, page) = get_json(&s, "/api/v1/images").await;
    assert_eq!(page["total"], 0, "a cancelled job saves nothing");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_queue_answers_429_with_retry_after() {
    let dir = tempfile::tempdir().unwrap();
    let s = state_with(&dir, 1);
    let mut statuses = Vec::new();
    let mut retry = None;
    for _ in 0..3 {
        let r = req("POST", "/api/v1/jobs")
            .header("content-type", "application/json")
            .body(Body::from(small("x").to_string()))
            .unwrap();
        let (status, headers, body) = send(&s, r).await;
        if status == StatusCode::TOO_MANY_REQUESTS {
            assert_eq!(json(&body)["code"], "busy");
            retry = headers.get("retry-after").cloned();
        }
        statuses.push(status);
    }
    assert!(
        statuses.contains(&StatusCode::TOO_MANY_REQUESTS),
        "{statuses:?}"
    );
    assert!(retry.unwrap().to_str().unwrap().parse::<u64>().unwrap() >= 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_get_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    let s = state(&dir);
    let cases = [
        (json!({"prompt": "x", "width": 100}), "multiple of 8"),
        (json!({"prompt": "x", "width": 4096}), "2048"),
        (json!({"prompt": "x", "steps": 0}), "steps"),
        (json!({"prompt": "x", "steps": 151}), "150"),
        (json!({"prompt": "x", "batch_size": 9}), "batch_size"),
        (json!({"prompt": "x", "seed": -5}), "seed"),
        (json!({"prompt": "x", "sampler": "Euler z"}), "DPM++ 2M"),
        (json!({"prompt": "x", "schedule": "wobbly"}), "Karras"),
        (json!({"prompt": "x".repeat(10_001)}), "10000"),
        (json!({"prompt": "x", "colour": "red"}), "colour"),
        (json!({"prompt": 5}), "prompt"),
    ];
    for (body, needle) in cases {
        let (status, err) = send_json(&s, "POST", "/api/v1/jobs", body.clone()).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{body} -> {err}");
        assert_eq!(err["code"], "invalid_request");
        let text = format!("{} {}", err["message"], err["hint"]);
        assert!(text.contains(needle), "{body}: '{needle}' not in {text}");
    }
    let (status, err) = send_json(
        &s,
        "POST",
        "/api/v1/jobs",
        json!({"prompt": "x", "model": "nope"}),
    )
    .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert_eq!(err["code"], "model_missing");
    assert!(err["hint"].as_str().unwrap().contains("sd1"), "{err}");
    let (status, err) = send_json(
        &s,
        "POST",
        "/api/v1/jobs",
        json!({"prompt": "x", "preset": "nope"}),
    )
    .await;
    assert_eq!(status, StatusCode::NOT_FOUND, "{err}");
    assert!(err["hint"].as_str().unwrap().contains("portrait"), "{err}");
    // A1111 sizes are floored to multiples of 8 after this check, so it names what was sent.
    let body = json!({"prompt": "x", "width": 60});
    let (status, err) = send_json(&s, "POST", "/sdapi/v1/txt2img", body).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{err}");
    assert!(err["message"].as_str().unwrap().contains("got 60"), "{err}");
    // A1111's batch_size times n_iter: too many pictures, or a product past usize (found by
    // review: it panicked in debug builds and wrapped to 0 in release ones), is a clear refusal.
    for (batch, n_iter, needle) in [
        (json!(4), json!(4), "n_iter"),
        (json!(4294967296u64), json!(4294967296u64), "n_iter"),
        (json!(18446744073709551615u64), json!(1), "batch_size"),
    ] {
        let body = json!({"prompt": "x", "batch_size": batch, "n_iter": n_iter});
        let (status, err) = send_json(&s, "POST", "/sdapi/v1/txt2img", body.clone()).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{body} -> {err}");
        assert_eq!(err["code"], "invalid_request");
        let text = format!("{} {}", err["message"], err["hint"]);
        assert!(text.contains(needle), "{body}: '{needle}' not in {text}");
    }
    // Bodies over the limit are refused before they are read.
    let big = json!({"prompt": "x".repeat(2 * 1024 * 1024)});
    let (status, _) = send_json(&s, "POST", "/api/v1/jobs", big).await;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE);
    // Garbage to inspect.
    let (status, _, body) = send(
        &s,
        req("POST", "/api/v1/images/inspect")
            .body(Body::from("not a png"))
            .unwrap(),
    )
    .await;
    assert_eq!(
        status,
        StatusCode::BAD_REQUEST,
        "{}",
        String::from_utf8_lossy(&body)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ids_never_reach_the_file_system() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("secret.txt"), "secret").unwrap();
    let s = state(&dir);
    let attempts = [
        "/api/v1/images/..%2F..%2Fsecret.txt/file",
        "/api/v1/images/..%2Fsettings.json",
        "/api/v1/images/0/file",
        "/api/v1/images/-1/thumbnail",
        "/api/v1/images/1e3/file",
        "/api/v1/images/%2Fetc%2Fpasswd/file",
        "/api/v1/jobs/..%2F..%2Fsecret.txt",
        "/api/v1/jobs/job-1%2F..%2F..%2Fsecret/preview",
        "/api/v1/presets/..%2F..%2Fsettings",
        "/api/v1/presets/..%2F..%2Fsettings/export",
    ];
    for path in attempts {
        let (status, _, body) = send(&s, req("GET", path).body(Body::empty()).unwrap()).await;
        assert_eq!(status, StatusCode::NOT_FOUND, "{path}");
        let text = String::from_utf8_lossy(&body);
        assert!(
            !text.contains("secret") || text.contains("no such") || text.contains("There is no"),
            "{path}: {text}"
        );
        assert_eq!(json(&body)["code"], "not_found", "{path}");
    }
    for path in [
        "/api/v1/presets/..%2F..%2Fsettings",
        "/api/v1/presets/a%2F..%2Fb",
    ] {
        let r = ui(&s, "DELETE", path).body(Body::empty()).unwrap();
        let (status, _, _) = send(&s, r).await;
        assert!(
            status == StatusCode::NOT_FOUND || status == StatusCode::BAD_REQUEST,
            "{path}: {status}"
        );
    }
    assert!(dir.path().join("secret.txt").exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn presets_are_listed_applied_and_managed_from_the_ui() {
    let dir = tempfile::tempdir().unwrap();
    let s = state(&dir);
    let (_, list) = get_json(&s, "/api/v1/presets").await;
    let ids: Vec<_> = list
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["id"].as_str().unwrap().to_owned())
        .collect();
    for want in ["portrait", "scene", "quick", "quality"] {
        assert!(ids.contains(&want.to_owned()), "{ids:?}");
    }
    // A job with a preset takes the preset's size unless the request sets one.
    let (status, job) = send_json(
        &s,
        "POST",
        "/api/v1/jobs",
        json!({"prompt": "a knight", "model": "sd1", "preset": "portrait", "steps": 1}),
    )
    .await;
    assert_eq!(status, StatusCode::ACCEPTED, "{job}");
    assert!(
        job["height"].as_u64().unwrap() > job["width"].as_u64().unwrap(),
        "{job}"
    );
    assert!(job["prompt"].as_str().unwrap().contains("a knight"));
    s.jobs().cancel(job["id"].as_str().unwrap());

    // Creating needs the session token.
    let mine = json!({"name": "My Style", "width": 64, "height": 128, "steps": 3, "prompt_prefix": "oil painting"});
    let r = req("POST", "/api/v1/presets")
        .header("content-type", "application/json")
        .body(Body::from(mine.to_string()))
        .unwrap();
    assert_eq!(send(&s, r).await.0, StatusCode::UNAUTHORIZED);
    let r = ui(&s, "POST", "/api/v1/presets")
        .header("content-type", "application/json")
        .body(Body::from(mine.to_string()))
        .unwrap();
    let (status, _, body) = send(&s, r).await;
    assert_eq!(status, StatusCode::OK, "{}", String::from_utf8_lossy(&body));
    let created = json(&body);
    let id = created["id"].as_str().unwrap().to_owned();
    let (status, job) = send_json(
        &s,
        "POST",
        "/api/v1/jobs",
        json!({"prompt": "a fox", "model": "sd1", "preset": id, "ignore_affixes": false}),
    )
    .await;
    assert_eq!(status, StatusCode::ACCEPTED, "{job}");
    assert_eq!(
        (
            job["width"].as_u64(),
            job["height"].as_u64(),
            job["steps"].as_u64()
        ),
        (Some(64), Some(128), Some(3))
    );
    assert!(
        job["prompt"]
            .as_str()
            .unwrap()
            .starts_with("oil painting, a fox"),
        "{job}"
    );
    let (_, job2) = send_json(
        &s,
        "POST",
        "/api/v1/jobs",
        json!({"prompt": "a fox", "model": "sd1", "preset": id, "ignore_affixes": true}),
    )
    .await;
    assert_eq!(
        job2["prompt"], "a fox",
        "ignore_affixes leaves the prompt as written"
    );

    // Export and import round-trip; built-ins cannot be deleted.
    let (status, headers, toml) = send(
        &s,
        req("GET", &format!("/api/v1/presets/{id}/export"))
            .body(Body::empty())
            .unwrap(),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    assert!(headers["content-disposition"]
        .to_str()
        .unwrap()
        .contains(".toml"));
    let toml = String::from_utf8(toml).unwrap();
    assert!(toml.contains("oil painting"));
    let r = ui(&s, "POST", "/api/v1/presets/import")
        .body(Body::from(toml.replace("My Style", "Imported Style")))
        .unwrap();
    let (status, _, body) = send(&s, r).await;
    assert_eq!(status, StatusCode::OK, "{}", String::from_utf8_lossy(&body));
    let r = ui(&s, "DELETE", "/api/v1/presets/portrait")
        .body(Body::empty())
        .unwrap();
    assert_eq!(send(&s, r).await.0, StatusCode::BAD_REQUEST);
    let r = ui(&s, "DELETE", &format!("/api/v1/presets/{id}"))
        .body(Body::empty())
        .unwrap();
    assert_eq!(send(&s, r).await.0, StatusCode::OK);
    let (status, _) = get_json(&s, &format!("/api/v1/presets/{id}")).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
}

/// What SillyTavern sends (its `generateAutoImage` body for the A1111 source), replayed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sillytavern_connects_switches_model_draws_and_polls() {
    let dir = tempfile::tempdir().unwrap();
    let s = state(&dir);
    // Connect: it reads the options, the models, samplers, schedulers, VAEs and upscalers.
    let (status, options) = get_json(&s, "/sdapi/v1/options").await;
    assert_eq!(status, StatusCode::OK);
    assert!(options["sd_model_checkpoint"].is_string());
    let (_, models) = get_json(&s, "/sdapi/v1/sd-models").await;
    let titles: Vec<_> = models
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["title"].as_str().unwrap().to_owned())
        .collect();
    for want in ["sd1", "sd2"] {
        assert!(titles.contains(&want.to_owned()), "{titles:?}");
    }
    let (_, samplers) = get_json(&s, "/sdapi/v1/samplers").await;
    let names: Vec<_> = samplers
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["name"].as_str().unwrap().to_owned())
        .collect();
    for want in ["Euler a", "Euler", "DPM++ 2M", "DDIM"] {
        assert!(names.contains(&want.to_owned()), "{names:?}");
    }
    let (_, schedulers) = get_json(&s, "/sdapi/v1/schedulers").await;
    assert!(schedulers
        .as_array()
        .unwrap()
        .iter()
        .any(|s| s["name"] == "karras" && s["label"] == "Karras"));
    // A1111 1.9+'s ids and labels, in its order (ours add diffusers' Leading and Trailing).
    let ids: Vec<&str> = schedulers
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["name"].as_str().unwrap())
        .collect();
    assert_eq!(
        ids,
        [
            "automatic",
            "uniform",
            "karras",
            "exponential",
            "polyexponential",
            "sgm_uniform",
            "kl_optimal",
            "align_your_steps",
            "simple",
            "normal",
            "ddim",
            "beta",
            "leading",
            "trailing"
        ]
    );
    let poly = &schedulers[4];
    assert_eq!(
        (&poly["label"], &poly["default_rho"]),
        (&json!("Polyexponential"), &json!(1.0))
    );
    for path in [
        "/sdapi/v1/sd-vae",
        "/sdapi/v1/upscalers",
        "/sdapi/v1/latent-upscale-modes",
        "/sdapi/v1/loras",
        "/sdapi/v1/embeddings",
        "/sdapi/v1/cmd-flags",
    ] {
        let (status, _) = get_json(&s, path).await;
        assert_eq!(status, StatusCode::OK, "{path}");
    }
    let (_, flags) = get_json(&s, "/sdapi/v1/cmd-flags").await;
    assert!(
        !flags.to_string().contains(dir.path().to_str().unwrap()),
        "no paths in cmd-flags"
    );

    // Switch model the A1111 way.
    let (status, _) = send_json(
        &s,
        "POST",
        "/sdapi/v1/options",
        json!({"sd_model_checkpoint": "sd2"}),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    let (_, options) = get_json(&s, "/sdapi/v1/options").await;
    assert_eq!(options["sd_model_checkpoint"], "sd2");
    let (status, err) = send_json(
        &s,
        "POST",
        "/sdapi/v1/options",
        json!({"sd_model_checkpoint": "missing.safetensors [123]"}),
    )
    .await;
    assert_eq!(status, StatusCode::NOT_FOUND, "{err}");

    // Idle progress has A1111's shape.
    let (_, p) = get_json(&s, "/sdapi/v1/progress?skip_current_image=false").await;
    assert_eq!(p["state"]["job_count"], 0);
    assert!(p["current_image"].is_null());

    let body = json!({
        "prompt": "portrait of Seraphina, silver hair, green eyes",
        "negative_prompt": "lowres, bad anatomy",
        "sampler_name": "DPM++ 2M",
        "scheduler": "karras",
        "steps": 3,
        "cfg_scale": 7,
        "width": 64,
        "height": 64,
        "restore_faces": false,
        "enable_hr": false,
        "hr_upscaler": "Latent",
        "hr_scale": 2,
        "denoising_strength": 0.7,
        "hr_second_pass_steps": 0,
        "seed": 1234,
        "override_settings": {"CLIP_stop_at_last_layers": 2, "sd_vae": "Automatic"},
        "override_settings_restore_afterwards": true,
        "clip_skip": 2,
        "save_images": true,
        // SillyTavern's connection settings ride along in the body; its key must not be echoed.
        "auth": "user:secret-key",
        "send_images": true,
    });
    let (status, answer) = send_json(&s, "POST", "/sdapi/v1/txt2img", body).await;
    assert_eq!(status, StatusCode::OK, "{answer}");
    let images = answer["images"].as_array().unwrap();
    assert_eq!(images.len(), 1);
    let png = base64::engine::general_purpose::STANDARD
        .decode(images[0].as_str().unwrap())
        .unwrap();
    let params = png_parameters(&png);
    assert!(
        params.starts_with(
            "portrait of Seraphina, silver hair, green eyes\nNegative prompt: lowres, bad anatomy"
        ),
        "{params}"
    );
    assert!(params.contains("Steps: 3, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 7, Seed: 1234, Size: 64x64"), "{params}");
    assert!(
        params.contains("Model: sd2"),
        "the switched model was used: {params}"
    );
    assert!(params.contains("Clip skip: 2"), "{params}");
    let info: Value = serde_json::from_str(answer["info"].as_str().unwrap()).unwrap();
    assert_eq!(info["seed"], 1234);
    assert_eq!(info["all_seeds"], json!([1234]));
    assert_eq!(info["infotexts"][0], params);
    assert_eq!(info["sd_model_name"], "sd2");
    assert_eq!(info["clip_skip"], 2, "the clip skip used (found by review)");
    assert_eq!(
        answer["parameters"]["hr_upscaler"], "Latent",
        "unknown fields are echoed"
    );
    assert_eq!(answer["parameters"]["steps"], 3);
    assert!(
        !answer.to_string().contains("secret-key"),
        "the credential in the body is not echoed"
    );
}

/// What A1111's server (FastAPI) takes from clients, found by review against their code.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a1111_clients_loose_requests_are_taken_as_a1111_takes_them() {
    let dir = tempfile::tempdir().unwrap();
    let s = state(&dir);
    // Open WebUI appends `/sdapi/v1/...` to the address as typed, `http://127.0.0.1:7860/`.
    let (status, options) = get_json(&s, "//sdapi/v1/options").await;
    assert_eq!(status, StatusCode::OK);
    assert!(options["sd_model_checkpoint"].is_string(), "{options}");
    let (status, models) = get_json(&s, "/sdapi/v1/sd-models/").await;
    assert_eq!(status, StatusCode::OK);
    assert!(models.is_array(), "{models}");
    let (status, _) = get_json(&s, "//api/v1/health").await;
    assert_eq!(status, StatusCode::OK);
    // Python's requests sends `True`.
    let (status, p) = get_json(&s, "/sdapi/v1/progress?skip_current_image=True").await;
    assert_eq!(status, StatusCode::OK, "{p}");
    let (status, _) = get_json(&s, "/sdapi/v1/progress?skip_current_image=maybe").await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    // A JSON body without a Content-Type, as `requests.post(url, data=json.dumps(...))` sends.
    let r = req("POST", "//sdapi/v1/txt2img/")
        .body(Body::from(
            json!({"prompt": "a cat", "width": 64, "height": 64, "steps": 1}).to_string(),
        ))
        .unwrap();
    let (status, _, body) = send(&s, r).await;
    assert_eq!(status, StatusCode::OK, "{}", String::from_utf8_lossy(&body));
    assert_eq!(json(&body)["images"].as_array().unwrap().len(), 1);
    // Open WebUI switches models by posting back all the options it read, the VAE setting
    // included, even when that VAE file has gone since.
    s.change_settings(|st| st.vae = "gone.safetensors".into())
        .unwrap();
    let (_, mut options) = get_json(&s, "/sdapi/v1/options").await;
    options["sd_model_checkpoint"] = json!("sd2");
    let (status, err) = send_json(&s, "POST", "/sdapi/v1/options", options).await;
    assert_eq!(status, StatusCode::OK, "{err}");
    assert_eq!(s.settings().default_model.as_deref(), Some("sd2"));
    assert_eq!(s.settings().vae, "gone.safetensors");
    // Naming that missing VAE as a change is still refused.
    let (status, _) = send_json(
        &s,
        "POST",
        "/sdapi/v1/options",
        json!({"sd_vae": "other-gone.safetensors"}),
    )
    .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
}

/// Open WebUI's A1111 engine: prompt, batch_size, size, steps, negative prompt; A1111 defaults
/// for the rest (Euler, 7, random seed), sizes floored to multiples of 8.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn open_webui_a1111_request() {
    let dir = tempfile::tempdir().unwrap();
    let s = state(&dir);
    let body = json!({"prompt": "a sunny meadow", "batch_size": 2, "width": 70, "height": 64, "steps": 2, "negative_prompt": ""});
    let (status, answer) = send_json(&s, "POST", "/sdapi/v1/txt2img", body).await;
    assert_eq!(status, StatusCode::OK, "{answer}");
    assert_eq!(answer["images"].as_array().unwrap().len(), 2);
    let info: Value = serde_json::from_str(answer["info"].as_str().unwrap()).unwrap();
    assert_eq!(info["sampler_name"], "Euler");
    assert_eq!(info["width"], 64);
    let seeds = info["all_seeds"].as_array().unwrap();
    assert_eq!(seeds[1].as_u64().unwrap(), seeds[0].as_u64().unwrap() + 1);
    // A bad field type is a clear 400, not a crash.
    for body in [
        json!({"prompt": "x", "steps": "many"}),
        json!({"prompt": "x", "steps": 2.5}),
    ] {
        let (status, err) = send_json(&s, "POST", "/sdapi/v1/txt2img", body.clone()).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{body}: {err}");
    }
    // What A1111's parsing takes, this takes (found by review): null for "the default", numbers
    // as text, whole numbers as floats.
    let body = json!({"prompt": "a sunny meadow", "seed": 7.0, "steps": "2", "cfg_scale": "6.5",
        "width": 64.0, "height": null, "negative_prompt": null, "override_settings": null,
        "sampler_name": null, "batch_size": "1", "enable_hr": true, "hr_scale": 2});
    let (status, answer) = send_json(&s, "POST", "/sdapi/v1/txt2img", body).await;
    assert_eq!(status, StatusCode::OK, "{answer}");
    let info: Value = serde_json::from_str(answer["info"].as_str().unwrap()).unwrap();
    assert_eq!(
        (&info["seed"], &info["steps"], &info["cfg_scale"]),
        (&json!(7), &json!(2), &json!(6.5))
    );
    // A null height is A1111's default, 512.
    assert_eq!((&info["width"], &info["height"]), (&json!(64), &json!(512)));
    // The hires fix is drawn: twice the size, with A1111's keys in the parameters text.
    let png = base64::engine::general_purpose::STANDARD
        .decode(answer["images"][0].as_str().unwrap())
        .unwrap();
    assert_eq!(png_size(&png), (128, 1024));
    let params = png_parameters(&png);
    // Without a denoising_strength, A1111's API default (0.75, not its UI's 0.7).
    assert!(
        params.contains("Size: 64x512")
            && params.contains("Denoising strength: 0.75")
            && params.contains("Hires upscale: 2, Hires steps: 2, Hires upscaler: Latent"),
        "{params}"
    );
    let info: Value = serde_json::from_str(answer["info"].as_str().unwrap()).unwrap();
    assert_eq!(info["denoising_strength"], 0.75);
    assert_eq!(info["extra_generation_params"]["Hires upscale"], 2.0);
    assert_eq!(info["extra_generation_params"]["Hires upscaler"], "Latent");
    // Progress counts both passes: 2 + 2 steps.
    let (_, jobs) = get_json(&s, "/api/v1/jobs").await;
    let job = jobs
        .as_array()
        .unwrap()
        .iter()
        .find(|j| j["seed"] == 7)
        .unwrap()
        .clone();
    assert_eq!((&job["steps"], &job["total_steps"]), (&json!(2), &json!(4)));
    // An upscaler we do not have draws with a stand-in, and the job says which.
    let body = json!({"prompt": "a sunny meadow", "steps": 2, "width": 64, "height": 64,
        "enable_hr": "true", "hr_scale": "1.5", "hr_upscaler": "R-ESRGAN 4x+",
        "denoising_strength": 0.5, "hr_second_pass_steps": 1, "seed": 3});
    let (status, answer) = send_json(&s, "POST", "/sdapi/v1/txt2img", body).await;
    assert_eq!(status, StatusCode::OK, "{answer}");
    let png = base64::engine::general_purpose::STANDARD
        .decode(answer["images"][0].as_str().unwrap())
        .unwrap();
    assert_eq!(png_size(&png), (96, 96));
    assert!(png_parameters(&png).contains("Hires steps: 1, Hires upscaler: Lanczos"));
    let (_, jobs) = get_json(&s, "/api/v1/jobs").await;
    let notes = jobs
        .as_array()
        .unwrap()
        .iter()
        .find(|j| j["seed"] == 3)
        .map(|j| j["notes"].to_string())
        .unwrap();
    assert!(
        notes.contains("'R-ESRGAN 4x+' is not available here"),
        "{notes}"
    );
    // A final size of another shape, as sent (found in a last look: the handler floored 124 to
    // 120 before A1111's cut, which keeps all 128 columns: (128 - 124) // 8 = 0 cut).
    let body = json!({"prompt": "a sunny meadow", "steps": 1, "width": 64, "height": 64,
        "enable_hr": true, "hr_resize_x": 124, "hr_resize_y": 128, "hr_second_pass_steps": 1,
        "seed": 4});
    let (status, answer) = send_json(&s, "POST", "/sdapi/v1/txt2img", body).await;
    assert_eq!(status, StatusCode::OK, "{answer}");
    let png = base64::engine::general_purpose::STANDARD
        .decode(answer["images"][0].as_str().unwrap())
        .unwrap();
    assert_eq!(png_size(&png), (128, 128));
    // A sampler or scheduler this A1111 build lacks draws with A1111's fallbacks (its first
    // sampler, the Automatic schedule), as A1111 1.9+ does, and the job says so; a fused name
    // keeps its schedule, over `scheduler` (as A1111). SillyTavern resends a scheduler saved for another build; Open WebUI
    // offers "Restart" and shows only 'images' for a refusal.
    // A1111 1.9+'s newer schedules are ours too (by their A1111 ids), with no note.
    for (seed, sampler, scheduler, schedule) in [
        (11, "Restart", "karras_exponential", "Automatic"),
        (12, "DPM++ 2M SDE Heun Exponential", "normal", "Exponential"),
        (13, "Euler", "linear_quadratic", "Automatic"),
        (14, "Euler", "align_your_steps", "Align Your Steps"),
        (15, "DPM++ 2M", "kl_optimal", "KL Optimal"),
        (16, "DPM++ 2M", "beta", "Beta"),
        (17, "DPM++ 2M", "polyexponential", "Polyexponential"),
    ] {
        let body = json!({"prompt": "a sunny meadow", "steps": 1, "width": 64, "height": 64,
            "sampler_name": sampler, "scheduler": scheduler, "seed": seed});
        let (status, answer) = send_json(&s, "POST", "/sdapi/v1/txt2img", body).await;
        assert_eq!(status, StatusCode::OK, "{answer}");
        let info: Value = serde_json::from_str(answer["info"].as_str().unwrap()).unwrap();
        let (_, jobs) = get_json(&s, "/api/v1/jobs").await;
        let notes = jobs
            .as_array()
            .unwrap()
            .iter()
            .find(|j| j["seed"] == seed)
            .map(|j| j["notes"].to_string())
            .unwrap();
        if ["Euler", "DPM++ 2M"].contains(&sampler) {
            assert_eq!(info["sampler_name"], sampler);
            assert!(!notes.contains("The sampler"), "{notes}");
        } else {
            assert_eq!(info["sampler_name"], "DPM++ 2M", "{sampler}");
            assert!(
                notes.contains(&format!("The sampler '{sampler}' is not available here")),
                "{notes}"
            );
        }
        let fell_back =
            notes.contains(&format!("The schedule '{scheduler}' is not available here"));
        assert_eq!(
            fell_back,
            !scheduler.is_empty() && schedule == "Automatic",
            "{scheduler}: {notes}"
        );
        let params = png_parameters(
            &base64::engine::general_purpose::STANDARD
                .decode(answer["images"][0].as_str().unwrap())
                .unwrap(),
        );
        // Automatic is written as the schedule it resolves to.
        if schedule != "Automatic" {
            assert!(
                params.contains(&format!("Schedule type: {schedule}")),
                "{params}"
            );
        }
    }
    // SillyTavern's menus list the latent modes and the pixel upscalers.
    let (_, modes) = get_json(&s, "/sdapi/v1/latent-upscale-modes").await;
    assert_eq!(modes[0]["name"], "Latent");
    let (_, ups) = get_json(&s, "/sdapi/v1/upscalers").await;
    assert!(ups
        .as_array()
        .unwrap()
        .iter()
        .any(|u| u["name"] == "Lanczos"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_goes_away_cancels_its_job_and_interrupt_stops_one() {
    let dir = tempfile::tempdir().unwrap();
    let s = state(&dir);
    let body = json!({"prompt": "slow", "steps": 150, "width": 256, "height": 256});
    let s2 = s.clone();
    let call = tokio::spawn(async move { send_json(&s2, "POST", "/sdapi/v1/txt2img", body).await });
    let mut id = None;
    for _ in 0..300 {
        if let Some(j) = s.jobs().current().filter(|j| j.step > 0) {
            id = Some(j.id);
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let id = id.expect("the job started");
    let (_, p) = get_json(&s, "/sdapi/v1/progress").await;
    assert_eq!(p["state"]["job"], id.as_str());
    assert!(p["progress"].as_f64().unwrap() > 0.0);
    call.abort();
    let _ = call.await;
    let done = wait_job(&s, &id).await;
    assert_eq!(done["state"], "cancelled", "{done}");

    // /interrupt stops the running job of another caller; that caller gets what was drawn (none).
    let s3 = s.clone();
    let call = tokio::spawn(async move {
        send_json(
            &s3,
            "POST",
            "/sdapi/v1/txt2img",
            json!({"prompt": "slow", "steps": 150, "width": 256, "height": 256}),
        )
        .await
    });
    for _ in 0..300 {
        if s.jobs().current().is_some_and(|j| j.step > 0) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (status, _) = send_json(&s, "POST", "/sdapi/v1/interrupt", json!({})).await;
    assert_eq!(status, StatusCode::OK);
    let (status, answer) = call.await.unwrap();
    assert_eq!(status, StatusCode::OK, "{answer}");
    assert_eq!(answer["images"], json!([]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openai_images_api_answers_b64_and_urls() {
    let dir = tempfile::tempdir().unwrap();
    let s = state(&dir);
    let body = json!({"model": "dall-e-3", "prompt": "a teapot", "n": 1, "size": "64x64", "response_format": "b64_json"});
    let (status, answer) = send_json(&s, "POST", "/v1/images/generations", body).await;
    assert_eq!(status, StatusCode::OK, "{answer}");
    assert!(answer["created"].as_i64().unwrap() > 1_700_000_000);
    let png = base64::engine::general_purpose::STANDARD
        .decode(answer["data"][0]["b64_json"].as_str().unwrap())
        .unwrap();
    assert!(png_parameters(&png).starts_with("a teapot"));

    let body = json!({"prompt": "a teapot", "size": "64x64"});
    let (status, answer) = send_json(&s, "POST", "/v1/images/generations", body).await;
    assert_eq!(status, StatusCode::OK, "{answer}");
    let url = answer["data"][0]["url"].as_str().unwrap();
    let path = url
        .strip_prefix(&format!("http://127.0.0.1:{PORT}"))
        .expect(url);
    let (status, headers, _) = send(&s, req("GET", path).body(Body::empty()).unwrap()).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(headers["content-type"], "image/png");

    // With an API key (a server on the network), the link opens without the key, as OpenAI's
    // signed links do (found by review: clients fetch the URL without credentials); its
    // signature opens that one picture only.
    let keyed_dir = tempfile::tempdir().unwrap();
    let keyed = AppState::open(StateOptions {
        models_dirs: vec![tiny_models()],
        api_key: Some("s3cret".into()),
        ..StateOptions::new(DataDir::open(Some(keyed_dir.path())).unwrap(), PORT)
    })
    .unwrap();
    let host = "192.168.1.20:7860";
    let call = |method: &str, path: &str, key: bool| {
        let r = Request::builder()
            .method(method)
            .uri(path)
            .header("host", host)
            .header("content-type", "application/json");
        if key {
            r.header("authorization", "Bearer s3cret")
        } else {
            r
        }
    };
    let body = json!({"prompt": "a teapot", "size": "64x64", "n": 2});
    let r = call("POST", "/v1/images/generations", true)
        .body(Body::from(body.to_string()))
        .unwrap();
    let (status, _, answer) = send(&keyed, r).await;
    let answer = json(&answer);
    assert_eq!(status, StatusCode::OK, "{answer}");
    let links: Vec<String> = (0..2)
        .map(|i| {
            answer["data"][i]["url"]
                .as_str()
                .unwrap()
                .strip_prefix(&format!("http://{host}"))
                .unwrap()
                .to_owned()
        })
        .collect();
    for link in &links {
        assert!(link.contains("?sig="), "{link}");
        let (status, headers, _) = send(
            &keyed,
            call("GET", link, false).body(Body::empty()).unwrap(),
        )
        .await;
        assert_eq!(status, StatusCode::OK, "{link}");
        assert_eq!(headers["content-type"], "image/png");
    }
    // One picture's signature does not open another, nor any other route.
    let (path0, sig0) = links[0].split_once('?').unwrap();
    let (path1, _) = links[1].split_once('?').unwrap();
    for forged in [
        format!("{path1}?{sig0}"),
        path0.to_owned(),
        format!("{path0}?sig=00"),
        format!("/api/v1/images?{sig0}"),
        format!("{}?{sig0}", path0.trim_end_matches("/file")),
    ] {
        let (status, _, _) = send(
            &keyed,
            call("GET", &forged, false).body(Body::empty()).unwrap(),
        )
        .await;
        assert_eq!(status, StatusCode::UNAUTHORIZED, "{forged}");
    }

    // Editing a picture is not offered, and the answer says so in the client's own error shape.
    for (path, shape) in [
        ("/v1/images/edits", "/error/message"),
        ("/v1/images/variations", "/error/message"),
        ("/sdapi/v1/img2img", "/message"),
    ] {
        let (status, err) = send_json(&s, "POST", path, json!({"prompt": "x"})).await;
        assert_eq!(status, StatusCode::NOT_FOUND, "{path}");
        let message = err
            .pointer(shape)
            .and_then(Value::as_str)
            .unwrap_or_default();
        assert!(message.contains("from text only"), "{path}: {err}");
    }

    let (status, err) = send_json(
        &s,
        "POST",
        "/v1/images/generations",
        json!({"prompt": "x", "size": "big"}),
    )
    .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(err["error"]["type"], "invalid_request_error");
    assert!(err["error"]["message"]
        .as_str()
        .unwrap()
        .contains("512x512"));

    // Found by review. gpt-image models answer in base64 when no format is asked for (Open WebUI
    // refuses links to private addresses for them).
    let body = json!({"model": "gpt-image-1", "prompt": "a teapot", "size": "64x64"});
    let (status, answer) = send_json(&s, "POST", "/v1/images/generations", body).await;
    assert_eq!(status, StatusCode::OK, "{answer}");
    assert!(answer["data"][0]["b64_json"].is_string(), "{answer}");
    assert!(answer["data"][0].get("url").is_none(), "{answer}");
    // Too many images names OpenAI's field, not ours.
    for n in [0, 10] {
        let body = json!({"prompt": "x", "n": n});
        let (status, err) = send_json(&s, "POST", "/v1/images/generations", body).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{err}");
        let message = err["error"]["message"].as_str().unwrap();
        assert!(
            message.starts_with("n must be between 1 and 8"),
            "{message}"
        );
    }
    // The model list clients probe, and OpenAI's error shape for the routes we do not offer.
    let (status, list) = send_json(&s, "GET", "/v1/models", Value::Null).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(list["object"], "list");
    let ids: Vec<&str> = list["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_str().unwrap())
        .collect();
    assert!(ids.contains(&"sd1"), "{ids:?}");
    let (status, err) = send_json(&s, "POST", "/v1/chat/completions", json!({})).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert_eq!(err["error"]["type"], "invalid_request_error");
}
