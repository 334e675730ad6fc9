//! The router in-process (`app(state).oneshot`): the localhost guard, the error shape, the system
//! report and the settings route. Pins issue #2's "Done when" list.

use axum::body::Body;
use axum::http::{Request, StatusCode};
use http_body_util::BodyExt;
use ld_core::datadir::DataDir;
use ld_server::{app, AppState, StateOptions};
use serde_json::Value;
use tower::ServiceExt;

const PORT: u16 = 7860;

fn state(dir: &tempfile::TempDir) -> AppState {
    AppState::open(StateOptions::new(
        DataDir::open(Some(dir.path())).unwrap(),
        PORT,
    ))
    .unwrap()
}

fn get(path: &str) -> axum::http::request::Builder {
    Request::builder()
        .uri(path)
        .header("host", format!("127.0.0.1:{PORT}"))
}

async fn send(
    state: &AppState,
    req: Request<Body>,
) -> (StatusCode, axum::http::HeaderMap, Vec<u8>) {
    let res = app(state.clone()).oneshot(req).await.unwrap();
    let status = res.status();
    let headers = res.headers().clone();
    let body = res.into_body().collect().await.unwrap().to_bytes().to_vec();
    (status, headers, body)
}

fn json(body: &[u8]) -> Value {
    serde_json::from_slice(body)
        .unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(body)))
}

#[tokio::test]
async fn loopback_request_is_served() {
    let dir = tempfile::tempdir().unwrap();
    let s = state(&dir);
    for host in ["127.0.0.1:7860", "localhost:7860", "[::1]:7860"] {
        let req = Request::builder()
            .uri("/api/v1/health")
            .header("host", host)
            .body(Body::empty())
            .unwrap();
        let (status, _, body) = send(&s, req).await;
        assert_eq!(status, StatusCode::OK, "{host}");
        assert_eq!(
            json(&body),
            serde_json::json!({"status": "ok", "version": env!("CARGO_PKG_VERSION")})
        );
    }
}

#[tokio::test]
async fn foreign_host_is_refused_with_the_error_shape() {
    let dir = tempfile::tempdir().unwrap();
    let s = state(&dir);
    // DNS rebinding: an attacker's name resolving to 127.0.0.1 still carries its own Host.
    for host in ["evil.example:7860", "127.0.0.1:7861", "127.0.0.1"] {
        let req = Request::builder()
            .uri("/api/v1/health")
            .header("host", host)
            .body(Body::empty())
            .unwrap();
        let (status, headers, body) = send(&s, req).await;
        assert_eq!(status, StatusCode::FORBIDDEN, "{host}");
        let v = json(&body);
        assert_eq!(v["code"], "forbidden");
        assert!(v["message"].as_str().unwrap().contains("not allowed"));
        assert!(v["hint"]
            .as_str()
            .unwrap()
            .contains("http://127.0.0.1:7860/"));
        assert_eq!(
            v.as_object().unwrap().len(),
            3,
            "exactly code, message, hint: {v}"
        );
        assert!(headers.contains_key("content-security-policy"));
    }
    // The static UI is guarded too, not just the API.
    let req = Request::builder()
        .uri("/")
        .header("host", "evil.example:7860")
        .body(Body::empty())
        .unwrap();
    assert_eq!(send(&s, req).await.0, StatusCode::FORBIDDEN);
}

#[tokio::test]
async fn foreign_origin_is_refused_and_same_origin_allowed() {
    let dir = tempfile::tempdir().unwrap();
    let s = state(&dir);
    let req = get("/api/v1/health")
        .header("origin", "https://evil.example")
        .body(Body::empty())
        .unwrap();
    let (status, _, body) = send(&s, req).await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    assert_eq!(json(&body)["code"], "forbidden");

    let req = get("/api/v1/health")
        .header("origin", "http://127.0.0.1:7860")
        .body(Body::empty())
        .unwrap();
    assert_eq!(send(&s, req).await.0, StatusCode::OK);
    // Same host, other port: another origin.
    let req = get("/api/v1/health")
        .header("origin", "http://127.0.0.1:8000")
        .body(Body::empty())
        .unwrap();
    assert_eq!(send(&s, req).await.0, StatusCode::FORBIDDEN);
}

#[tokio::test]
async fn allowed_pages_get_cors_answers_for_the_api_only() {
    // Found by review: a chat app in a browser tab that the user allowed was still blocked by
    // its browser: no preflight answer and no Access-Control-Allow-Origin. Now the API answers
    // both for allowed pages, and never hands the UI (whose page holds the session token) to one.
    let dir = tempfile::tempdir().unwrap();
    let s = state(&dir);
    let app_page = "http://localhost:8000";
    let mut settings = s.settings();
    settings.allowed_origins = vec![format!("{app_page}/")];
    s.set_settings(settings);
    let preflight = |origin: &str, path: &str| {
        Request::builder()
            .method("OPTIONS")
            .uri(path)
            .header("host", format!("127.0.0.1:{PORT}"))
            .header("origin", origin)
            .header("access-control-request-method", "POST")
            .header("access-control-request-headers", "content-type")
            .body(Body::empty())
            .unwrap()
    };
    let allow = |h: &axum::http::HeaderMap| {
        h.get("access-control-allow-origin")
            .map(|v| v.to_str().unwrap().to_owned())
    };
    for path in [
        "/sdapi/v1/txt2img",
        "/v1/images/generations",
        "/api/v1/jobs",
    ] {
        let (status, h, _) = send(&s, preflight(app_page, path)).await;
        assert!(status.is_success(), "{path}: {status}");
        assert_eq!(allow(&h).as_deref(), Some(app_page), "{path}");
        let methods = h["access-control-allow-methods"].to_str().unwrap();
        assert!(methods.contains("POST"), "{methods}");
        let headers = h["access-control-allow-headers"].to_str().unwrap();
        assert!(headers.contains("content-type"), "{headers}");
    }
    let req = get("/sdapi/v1/samplers")
        .header("origin", app_page)
        .body(Body::empty())
        .unwrap();
    let (status, h, _) = send(&s, req).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(allow(&h).as_deref(), Some(app_page));
    // Other pages are refused before any CORS answer.
    let (status, h, _) = send(&s, preflight("https://evil.example", "/sdapi/v1/txt2img")).await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    assert_eq!(allow(&h), None);
    // The UI page and the UI's own routes are not readable from an allowed page.
    for path in ["/", "/api/v1/settings"] {
        let req = get(path)
            .header("origin", app_page)
            .body(Body::empty())
            .unwrap();
        let (_, h, _) = send(&s, req).await;
        assert_eq!(allow(&h), None, "{path}");
    }
}

#[tokio::test]
async fn requests_refused_before_a_handler_get_the_json_error_shape() {
    // Found by review: a query, path or body that axum's extractors could not read was answered
    // in plain text, which clients and the UI cannot show as an error with a hint.
    let dir = tempfile::tempdir().unwrap();
    let s = state(&dir);
    let ui = |method: &str, path: &str, body: Body, content_type: &str| {
        Request::builder()
            .method(method)
            .uri(path)
            .header("host", format!("127.0.0.1:{PORT}"))
            .header("x-ld-session", s.session_token())
            .header("content-type", content_type)
            .body(body)
            .unwrap()
    };
    let cases = [
        (
            get("/api/v1/images?offset=abc")
                .body(Body::empty())
                .unwrap(),
            StatusCode::BAD_REQUEST,
            "invalid_request",
        ),
        (
            get("/api/v1/images/%FF/file").body(Body::empty()).unwrap(),
            StatusCode::BAD_REQUEST,
            "invalid_request",
        ),
        (
            ui(
                "POST",
                "/api/v1/presets/import",
                Body::from(vec![0xff, 0xfe, 0x00]),
                "text/plain",
            ),
            StatusCode::BAD_REQUEST,
            "invalid_request",
        ),
        (
            ui(
                "POST",
                "/api/v1/jobs",
                Body::from("{bad"),
                "application/json",
            ),
            StatusCode::BAD_REQUEST,
            "invalid_request",
        ),
        (
            ui(
                "POST",
                "/api/v1/presets/import",
                Body::from(vec![b'x'; 2 << 20]),
                "text/plain",
            ),
            StatusCode::PAYLOAD_TOO_LARGE,
            "too_large",
        ),
        (
            ui(
                "DELETE",
                "/api/v1/health",
                Body::empty(),
                "application/json",
            ),
            StatusCode::METHOD_NOT_ALLOWED,
            "invalid_request",
        ),
    ];
    for (req, want, code) in cases {
        let what = format!("{} {}", req.method(), req.uri());
        let (status, headers, body) = send(&s, req).await;
        assert_eq!(status, want, "{what}");
        let v = json(&body);
        assert_eq!(v["code"], code, "{what}: {v}");
        assert!(!v["message"].as_str().unwrap().is_empty(), "{what}");
        assert!(!v["hint"].as_str().unwrap().is_empty(), "{what}");
        if want == StatusCode::METHOD_NOT_ALLOWED {
            assert!(headers.contains_key("allow"), "{what}");
        }
    }
}

#[test]
fn settings_changes_at_once_are_all_kept_in_the_app_and_the_file() {
    // Found by review: a chat app's model switch read, changed and saved the settings with no
    // lock, so it could undo a change the UI saved at the same moment.
    let dir = tempfile::tempdir().unwrap();
    let s = state(&dir);
    std::thread::scope(|t| {
        for i in 0..8 {
            let s = &s;
            t.spawn(move || {
                s.change_settings(|st| st.allowed_origins.push(format!("http://localhost:{i}")))
                    .unwrap()
            });
        }
    });
    let mut in_use = s.settings().allowed_origins;
    in_use.sort();
    assert_eq!(in_use.len(), 8, "{in_use:?}");
    let saved = ld_core::settings::load(&s.data().settings_file());
    assert_eq!(saved.warning, None);
    let mut on_disk = saved.settings.allowed_origins;
    on_disk.sort();
    assert_eq!(on_disk, in_use);
}

#[tokio::test]
async fn ui_only_route_needs_the_session_token() {
    let dir = tempfile::tempdir().unwrap();
    let s = state(&dir);
    let (status, _, body) = send(&s, get("/api/v1/settings").body(Body::empty()).unwrap()).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert_eq!(json(&body)["code"], "unauthorized");

    let req = get("/api/v1/settings")
        .header("x-ld-session", "wrong")
        .body(Body::empty())
        .unwrap();
    assert_eq!(send(&s, req).await.0, StatusCode::UNAUTHORIZED);

    let req = get("/api/v1/settings")
        .header("x-ld-session", s.session_token())
        .body(Body::empty())
        .unwrap();
    let (status, _, body) = send(&s, req).await;
    assert_eq!(status, StatusCode::OK);
    let v = json(&body);
    assert_eq!(v["data_dir"], dir.path().display().to_string());
    assert_eq!(v["precision"], "auto");
}

#[tokio::test]
async fn settings_are_saved_and_bad_json_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let s = state(&dir);
    let req = get("/api/v1/settings")
        .method("PUT")
        .header("x-ld-session", s.session_token())
        .header("content-type", "application/json")
        .body(Body::from(
            r#"{"prompt_prefix":"masterpiece, ","precision":"fp16"}"#,
        ))
        .unwrap();
    let (status, _, body) = send(&s, req).await;
    assert_eq!(status, StatusCode::OK, "{}", String::from_utf8_lossy(&body));
    assert_eq!(json(&body)["prompt_prefix"], "masterpiece, ");
    let on_disk: Value =
        serde_json::from_slice(&std::fs::read(dir.path().join("settings.json")).unwrap()).unwrap();
    assert_eq!(on_disk["precision"], "fp16");

    let req = get("/api/v1/settings")
        .method("PUT")
        .header("x-ld-session", s.session_token())
        .header("content-type", "application/json")
        .body(Body::from(r#"{"precision":"fp8"}"#))
        .unwrap();
    let (status, _, body) = send(&s, req).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    let v = json(&body);
    assert_eq!(v["code"], "invalid_request");
    assert!(v["message"].as_str().unwrap().contains("precision"), "{v}");

    // "Faster drawing on this processor": applied at once where the CPU has bf16 products, a
    // no-op elsewhere. (This test has a process of its own under nextest, as CI runs it.)
    assert!(!ld_engine::bf16_gemm::active());
    let put = |body: &'static str| {
        get("/api/v1/settings")
            .method("PUT")
            .header("x-ld-session", s.session_token())
            .header("content-type", "application/json")
            .body(Body::from(body))
            .unwrap()
    };
    let (status, _, body) = send(&s, put(r#"{"cpu_bf16":true}"#)).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(json(&body)["cpu_bf16"], true);
    assert_eq!(
        ld_engine::bf16_gemm::active(),
        ld_engine::bf16_gemm::supported()
    );
    let (status, _, _) = send(&s, put(r#"{"cpu_bf16":false}"#)).await;
    assert_eq!(status, StatusCode::OK);
    assert!(!ld_engine::bf16_gemm::active());
}

#[tokio::test]
async fn system_report_has_the_documented_shape() {
    let dir = tempfile::tempdir().unwrap();
    let s = state(&dir);
    let (status, _, body) = send(&s, get("/api/v1/system").body(Body::empty()).unwrap()).await;
    assert_eq!(status, StatusCode::OK);
    let v = json(&body);
    for key in [
        "os",
        "cpu",
        "memory",
        "gpus",
        "gpu_status",
        "build",
        "data_dir",
    ] {
        assert!(v.get(key).is_some(), "missing {key}: {v}");
    }
    assert!(v["cpu"]["name"].as_str().is_some_and(|n| !n.is_empty()));
    assert!(v["cpu"]["logical_cores"].as_u64().unwrap() >= 1);
    assert!(v["cpu"]["features"].is_array());
    assert!(v["memory"]["total_bytes"].as_u64().unwrap() > 0);
    assert!(v["memory"]["available_bytes"].as_u64().is_some());
    assert!(v["os"]["arch"].as_str().is_some());
    assert!(v["gpus"].is_array());
    assert!(v["gpu_status"]["available"].is_boolean());
    if v["gpu_status"]["available"] == false {
        // No GPU is a normal answer, with its reason.
        assert!(v["gpu_status"]["reason"]
            .as_str()
            .unwrap()
            .contains("No NVIDIA GPU found"));
    }
    assert_eq!(v["build"]["cuda"], cfg!(feature = "cuda"));
}

#[tokio::test]
async fn index_carries_the_token_and_a_strict_csp() {
    let dir = tempfile::tempdir().unwrap();
    let s = state(&dir);
    let (status, headers, body) = send(&s, get("/").body(Body::empty()).unwrap()).await;
    assert_eq!(status, StatusCode::OK);
    let html = String::from_utf8(body).unwrap();
    assert!(html.contains(&format!(
        "<meta name=\"ld-session\" content=\"{}\">",
        s.session_token()
    )));
    let csp = headers["content-security-policy"].to_str().unwrap();
    assert!(
        csp.contains("script-src 'self'") && !csp.contains("unsafe-inline"),
        "{csp}"
    );
    assert_eq!(headers["x-content-type-options"], "nosniff");
    assert_eq!(headers["cache-control"], "no-store");
    // A page path of the single-page app gets the index too; a missing asset is a plain 404.
    assert_eq!(
        send(&s, get("/diagnostics").body(Body::empty()).unwrap())
            .await
            .0,
        StatusCode::OK
    );
    assert_eq!(
        send(&s, get("/assets/nope.js").body(Body::empty()).unwrap())
            .await
            .0,
        StatusCode::NOT_FOUND
    );
}

#[tokio::test]
async fn unknown_api_route_and_traversal_get_json_404() {
    let dir = tempfile::tempdir().unwrap();
    let s = state(&dir);
    for path in [
        "/api/v1/nope",
        "/api/v1/../../etc/passwd",
        "/api/%2e%2e/settings",
    ] {
        let (status, _, body) = send(&s, get(path).body(Body::empty()).unwrap()).await;
        assert_eq!(status, StatusCode::NOT_FOUND, "{path}");
        assert_eq!(json(&body)["code"], "not_found");
    }
    // Static files come from the embedded bundle only; a traversal path is never a disk read.
    let (status, _, body) = send(
        &s,
        get("/../../../../etc/passwd").body(Body::empty()).unwrap(),
    )
    .await;
    assert!(
        !String::from_utf8_lossy(&body).contains("root:"),
        "{status}"
    );
}

#[tokio::test]
async fn api_key_mode_needs_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let s = AppState::open(StateOptions {
        api_key: Some("s3cret".into()),
        ..StateOptions::new(DataDir::open(Some(dir.path())).unwrap(), PORT)
    })
    .unwrap();
    let req = Request::builder()
        .uri("/api/v1/health")
        .header("host", "192.168.1.20:7860")
        .body(Body::empty())
        .unwrap();
    let (status, _, body) = send(&s, req).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert_eq!(json(&body)["code"], "unauthorized");
    let req = Request::builder()
        .uri("/api/v1/health")
        .header("host", "192.168.1.20:7860")
        .header("authorization", "Bearer s3cret")
        .body(Body::empty())
        .unwrap();
    assert_eq!(send(&s, req).await.0, StatusCode::OK);
    // A1111's --api-auth is Basic auth, all SillyTavern and Open WebUI can send: the key as the
    // password (any user) or as the whole credential (found by review).
    use base64::Engine as _;
    let basic = |credential: &str| {
        format!(
            "Basic {}",
            base64::engine::general_purpose::STANDARD.encode(credential)
        )
    };
    for (credential, status) in [
        ("user:s3cret", StatusCode::OK),
        (":s3cret", StatusCode::OK),
        ("s3cret", StatusCode::OK),
        ("user:wrong", StatusCode::UNAUTHORIZED),
        ("s3cret:user", StatusCode::UNAUTHORIZED),
        ("user:s3cret2", StatusCode::UNAUTHORIZED),
    ] {
        let req = Request::builder()
            .uri("/sdapi/v1/samplers")
            .header("host", "192.168.1.20:7860")
            .header("authorization", basic(credential))
            .body(Body::empty())
            .unwrap();
        assert_eq!(send(&s, req).await.0, status, "{credential}");
    }
    let req = Request::builder()
        .uri("/sdapi/v1/samplers")
        .header("host", "192.168.1.20:7860")
        .header("authorization", "Basic %%%")
        .body(Body::empty())
        .unwrap();
    assert_eq!(send(&s, req).await.0, StatusCode::UNAUTHORIZED);
    // The user's own browser on this computer, at the address `serve` prints: no key needed
    // (the page cannot send one), but only when both the connection and the Host are local.
    let from = |peer: [u8; 4], host: String, origin: Option<&str>| {
        let mut r = Request::builder()
            .uri("/api/v1/health")
            .header("host", host)
            .extension(axum::extract::ConnectInfo(std::net::SocketAddr::from((
                peer, 50_000,
            ))));
        if let Some(o) = origin {
            r = r.header("origin", o);
        }
        r.body(Body::empty()).unwrap()
    };
    let local = format!("127.0.0.1:{PORT}");
    for (peer, host, origin, status) in [
        ([127, 0, 0, 1], local.clone(), None, StatusCode::OK),
        (
            [127, 0, 0, 1],
            format!("localhost:{PORT}"),
            Some(format!("http://localhost:{PORT}")),
            StatusCode::OK,
        ),
        // A remote computer naming this one as 127.0.0.1 still needs the key.
        (
            [192, 168, 1, 5],
            local.clone(),
            None,
            StatusCode::UNAUTHORIZED,
        ),
        // A local connection under another name (DNS rebinding) needs it too.
        (
            [127, 0, 0, 1],
            "192.168.1.20:7860".to_owned(),
            None,
            StatusCode::UNAUTHORIZED,
        ),
        // And a foreign web page is refused as ever.
        (
            [127, 0, 0, 1],
            local.clone(),
            Some("https://evil.example".to_owned()),
            StatusCode::FORBIDDEN,
        ),
    ] {
        let (got, _, _) = send(&s, from(peer, host.clone(), origin.as_deref())).await;
        assert_eq!(got, status, "{peer:?} {host} {origin:?}");
    }
    // A proxy on this computer forwards remote clients from 127.0.0.1: a request that says it
    // was forwarded needs the key (found by review).
    let mut forwarded = from([127, 0, 0, 1], local.clone(), None);
    forwarded
        .headers_mut()
        .insert("x-forwarded-for", "203.0.113.9".parse().unwrap());
    assert_eq!(send(&s, forwarded).await.0, StatusCode::UNAUTHORIZED);
    // A dual-stack socket (`--host ::`) sees 127.0.0.1 as ::ffff:127.0.0.1: still local.
    let mapped = Request::builder()
        .uri("/api/v1/health")
        .header("host", local.clone())
        .extension(axum::extract::ConnectInfo(std::net::SocketAddr::from((
            std::net::Ipv4Addr::LOCALHOST.to_ipv6_mapped(),
            50_000,
        ))))
        .body(Body::empty())
        .unwrap();
    assert_eq!(send(&s, mapped).await.0, StatusCode::OK);
    // A browser's preflight carries no credentials; it runs no handler, so it needs no key.
    let req = Request::builder()
        .method("OPTIONS")
        .uri("/sdapi/v1/txt2img")
        .header("host", "192.168.1.20:7860")
        .header("access-control-request-method", "POST")
        .body(Body::empty())
        .unwrap();
    assert_ne!(send(&s, req).await.0, StatusCode::UNAUTHORIZED);
    // Any other OPTIONS request still does.
    let req = Request::builder()
        .method("OPTIONS")
        .uri("/sdapi/v1/txt2img")
        .header("host", "192.168.1.20:7860")
        .body(Body::empty())
        .unwrap();
    assert_eq!(send(&s, req).await.0, StatusCode::UNAUTHORIZED);
}
