//! `app(state) -> Router`: every route, the guard, and the security headers. Kept apart from
//! `main` so tests call `app(state).oneshot(request)` without opening a socket.

use crate::error::{ApiError, Code};
use crate::guard::{localhost_guard, require_session};
use crate::handlers::{
    a1111, characters, diagnostics, health, images, jobs, models, openai, presets, settings, system,
};
use crate::state::AppState;
use crate::static_ui;
use axum::extract::DefaultBodyLimit;
use axum::http::{header, HeaderValue};
use axum::middleware::{from_fn, from_fn_with_state};
use axum::routing::{get, post, put};
use axum::Router;
use tower_http::cors::{AllowOrigin, CorsLayer};

/// Strict: our own scripts and styles only, no inline code, no framing, no foreign connections.
pub const CONTENT_SECURITY_POLICY: &str = "default-src 'self'; script-src 'self'; \
    style-src 'self'; img-src 'self' data: blob:; connect-src 'self'; font-src 'self'; \
    object-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'";

/// Largest JSON body: prompts are capped far below this.
const BODY_LIMIT: usize = 1024 * 1024;
/// A PNG dropped on the window for its parameters.
const INSPECT_LIMIT: usize = 64 * 1024 * 1024;

pub fn app(state: AppState) -> Router {
    // Changes only our own window may make: settings, deletions, presets, imports.
    let ui_only = Router::new()
        .route("/api/v1/settings", get(settings::get).put(settings::put))
        .route("/api/v1/images/{id}", axum::routing::delete(images::delete))
        .route("/api/v1/images/{id}/favourite", put(images::set_favourite))
        .route("/api/v1/images/{id}/restore", post(images::restore))
        .route("/api/v1/trash", axum::routing::delete(images::empty_trash))
        .route("/api/v1/presets", post(presets::create))
        .route("/api/v1/presets/import", post(presets::import))
        .route(
            "/api/v1/presets/{id}",
            put(presets::update).delete(presets::delete),
        )
        .route("/api/v1/downloads", post(models::start_download))
        .route("/api/v1/models/convert", post(models::convert))
        .route(
            "/api/v1/downloads/{id}/cancel",
            post(models::cancel_download),
        )
        .route(
            "/api/v1/models/{name}",
            axum::routing::delete(models::delete),
        )
        .route("/api/v1/characters", post(characters::create))
        .route(
            "/api/v1/characters/import",
            post(characters::import).layer(DefaultBodyLimit::max(INSPECT_LIMIT)),
        )
        .route(
            "/api/v1/characters/{id}",
            put(characters::update).delete(characters::delete),
        )
        .route_layer(from_fn_with_state(state.clone(), require_session));

    let native = Router::new()
        .route("/api/v1/health", get(health::get))
        .route("/api/v1/system", get(system::get))
        .route("/api/v1/diagnostics", get(diagnostics::get))
        .route(
            "/api/v1/diagnostics/self-test",
            post(diagnostics::self_test),
        )
        .route("/api/v1/jobs", get(jobs::list).post(jobs::create))
        .route("/api/v1/jobs/{id}", get(jobs::get))
        .route("/api/v1/jobs/{id}/cancel", post(jobs::cancel))
        .route("/api/v1/jobs/{id}/preview", get(jobs::preview))
        .route("/api/v1/events", get(jobs::events))
        .route("/api/v1/images", get(images::list))
        .route("/api/v1/images/{id}", get(images::get))
        .route("/api/v1/images/{id}/file", get(images::file))
        .route("/api/v1/images/{id}/thumbnail", get(images::thumbnail))
        .route(
            "/api/v1/images/inspect",
            post(images::inspect).layer(DefaultBodyLimit::max(INSPECT_LIMIT)),
        )
        .route("/api/v1/presets", get(presets::list))
        .route("/api/v1/presets/{id}", get(presets::get))
        .route("/api/v1/presets/{id}/export", get(presets::export))
        .route("/api/v1/characters", get(characters::list))
        .route("/api/v1/characters/{id}", get(characters::get))
        .route("/api/v1/characters/{id}/export", get(characters::export))
        .route(
            "/api/v1/characters/{id}/portrait",
            post(characters::portrait),
        )
        .route("/api/v1/chat/illustrate", post(characters::illustrate))
        .route("/api/v1/models", get(models::list))
        .route("/api/v1/catalog", get(models::catalog))
        .route("/api/v1/networks", get(models::networks))
        .route("/api/v1/models/hash", post(models::hash))
        .route("/api/v1/setup", get(models::setup))
        .route("/api/v1/downloads", get(models::downloads))
        .route("/api/v1/samplers", get(models::samplers))
        .route("/api/v1/schedules", get(models::schedules));

    let a1111 = Router::new()
        .route("/sdapi/v1/txt2img", post(a1111::txt2img))
        .route("/sdapi/v1/progress", get(a1111::progress))
        .route("/sdapi/v1/interrupt", post(a1111::interrupt))
        .route("/sdapi/v1/skip", post(a1111::skip))
        .route("/sdapi/v1/sd-models", get(a1111::sd_models))
        .route("/sdapi/v1/samplers", get(a1111::samplers))
        .route("/sdapi/v1/schedulers", get(a1111::schedulers))
        .route(
            "/sdapi/v1/options",
            get(a1111::get_options).post(a1111::set_options),
        )
        .route("/sdapi/v1/sd-vae", get(a1111::sd_vae))
        .route("/sdapi/v1/loras", get(a1111::loras))
        .route("/sdapi/v1/upscalers", get(a1111::upscalers))
        .route(
            "/sdapi/v1/latent-upscale-modes",
            get(a1111::latent_upscale_modes),
        )
        .route("/sdapi/v1/embeddings", get(a1111::embeddings))
        .route("/sdapi/v1/cmd-flags", get(a1111::cmd_flags))
        .route("/sdapi/v1/img2img", post(a1111::img2img))
        .route("/v1/images/generations", post(openai::generations))
        .route("/v1/images/edits", post(openai::text_only))
        .route("/v1/images/variations", post(openai::text_only))
        .route("/v1/models", get(openai::models))
        .route("/v1/{*rest}", axum::routing::any(openai::not_found));

    // Chat apps that run in a browser tab (and the pages the user allowed) read the API's answers;
    // never the UI's routes or files, whose page carries the session token.
    let cors = allowed_apps_cors(&state);
    let routes = Router::new()
        .merge(ui_only)
        .merge(native.layer(cors.clone()))
        .merge(a1111.layer(cors))
        .route("/api/{*rest}", axum::routing::any(api_not_found))
        .route("/sdapi/{*rest}", axum::routing::any(api_not_found))
        .fallback(static_ui::serve)
        .layer(DefaultBodyLimit::max(BODY_LIMIT))
        .layer(from_fn(plain_errors_as_json))
        .layer(from_fn_with_state(state.clone(), localhost_guard))
        // Outermost, so the guard's refusals carry the headers too.
        .layer(from_fn(security_headers))
        .with_state(state);
    // Every request passes through `like_a1111` before routing (a `Router::layer` runs after
    // it, too late to change which route a path takes).
    Router::new().fallback_service(
        tower::ServiceBuilder::new()
            .map_request(like_a1111)
            .service(routes),
    )
}

/// What A1111's server (FastAPI) accepts and ours would not, mended before routing:
/// - Doubled and trailing slashes in API paths. Open WebUI's own example address is
///   `http://127.0.0.1:7860/`, and it appends `/sdapi/v1/...` to it as typed: `//sdapi/...`
///   matched no route and got the UI's page with 200, so its "verify" button passed and every
///   call after it failed to parse. FastAPI redirects a trailing slash to the route.
/// - A JSON body posted to `/sdapi/` without a `Content-Type` (scripts that send
///   `data=json.dumps(...)`): FastAPI reads it as JSON; axum's JSON extractor refuses it.
fn like_a1111(mut req: axum::extract::Request) -> axum::extract::Request {
    let path = req.uri().path();
    if path.contains("//") || (path.len() > 1 && path.ends_with('/')) {
        let tidy: String = path
            .split('/')
            .filter(|s| !s.is_empty())
            .flat_map(|s| ["/", s])
            .collect();
        if ["/sdapi/", "/api/", "/v1/"]
            .iter()
            .any(|p| tidy.starts_with(p))
        {
            let with_query = match req.uri().query() {
                Some(q) => format!("{tidy}?{q}"),
                None => tidy,
            };
            let mut parts = req.uri().clone().into_parts();
            if let Ok(pq) = with_query.parse() {
                parts.path_and_query = Some(pq);
                if let Ok(uri) = axum::http::Uri::from_parts(parts) {
                    *req.uri_mut() = uri;
                }
            }
        }
    }
    if req.method() == axum::http::Method::POST
        && req.uri().path().starts_with("/sdapi/")
        && !req.headers().contains_key(header::CONTENT_TYPE)
    {
        req.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
    }
    req
}

/// CORS for the web pages in the settings' allowed origins (read on each request, so a change
/// applies at once): preflights are answered and responses name the page, so its browser lets
/// it read them. Requests from other pages never get this far (the guard refuses them).
fn allowed_apps_cors(state: &AppState) -> CorsLayer {
    let state = state.clone();
    CorsLayer::new()
        .allow_origin(AllowOrigin::predicate(move |origin, _| {
            origin
                .to_str()
                .is_ok_and(|origin| crate::guard::is_allowed_page(&state, origin))
        }))
        .allow_methods([
            axum::http::Method::GET,
            axum::http::Method::POST,
            axum::http::Method::DELETE,
        ])
        .allow_headers([
            header::CONTENT_TYPE,
            header::AUTHORIZATION,
            header::HeaderName::from_static("x-api-key"),
        ])
        .max_age(std::time::Duration::from_secs(600))
}

/// The API's errors in its one JSON shape, also where axum's extractors refuse a request before
/// a handler runs (a query, path or body that does not parse, a body over the limit, a method
/// the route does not take): those answer in plain text, which clients and the UI cannot read.
async fn plain_errors_as_json(
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    use axum::http::StatusCode;
    use axum::response::IntoResponse;
    let path = req.uri().path();
    let api = path.starts_with("/api/") || path.starts_with("/sdapi/") || path.starts_with("/v1/");
    let method = req.method().clone();
    let res = next.run(req).await;
    let status = res.status();
    let is_json = res
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/json"));
    if !api || !status.is_client_error() || is_json {
        return res;
    }
    let allow = res.headers().get(header::ALLOW).cloned();
    // axum's rejection texts are one short line; more is not an extractor's.
    let text = match axum::body::to_bytes(res.into_body(), 4096).await {
        Ok(b) => String::from_utf8_lossy(&b).trim().to_owned(),
        Err(_) => String::new(),
    };
    let said = |what: &str| {
        if text.is_empty() {
            what.to_owned()
        } else {
            format!("{what}: {text}")
        }
    };
    let err = match status {
        StatusCode::PAYLOAD_TOO_LARGE => ApiError::new(
            Code::TooLarge,
            "The request is too large.",
            "Send less: prompts are limited to 10,000 characters, pictures to 64 MB.",
        ),
        StatusCode::METHOD_NOT_ALLOWED => ApiError::new(
            Code::InvalidRequest,
            format!("This route does not take {method} requests."),
            "See the API section of the README for the routes and their methods.",
        ),
        StatusCode::UNSUPPORTED_MEDIA_TYPE => ApiError::new(
            Code::InvalidRequest,
            said("The request body is not in the expected format"),
            "Send JSON with the header 'Content-Type: application/json'.",
        ),
        StatusCode::NOT_FOUND => ApiError::new(
            Code::NotFound,
            said("Not found"),
            "See the API section of the README for the routes this version offers.",
        ),
        _ => ApiError::new(
            Code::InvalidRequest,
            said("The request could not be read"),
            "Check the request against the API section of the README.",
        ),
    };
    let mut json = err.into_response();
    // The status the extractor chose stays (422 for a body of the wrong shape, 400 for bad syntax).
    *json.status_mut() = status;
    if let Some(allow) = allow {
        json.headers_mut().insert(header::ALLOW, allow);
    }
    json
}

async fn api_not_found() -> ApiError {
    ApiError::new(
        Code::NotFound,
        "There is no such API route.",
        "See the API section of the README for the routes this version offers.",
    )
}

async fn security_headers(
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    let mut res = next.run(req).await;
    let h = res.headers_mut();
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CONTENT_SECURITY_POLICY),
    );
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    res
}
