//! `app(state) -> Router`: every route, the guard, and the security headers. Kept apart from
//! `main` so tests call `app(state).oneshot(request)` without opening a socket.

use crate::error::{ApiError, Code};
use crate::guard::{localhost_guard, require_session};
use crate::handlers::{health, settings, system};
use crate::state::AppState;
use crate::static_ui;
use axum::extract::DefaultBodyLimit;
use axum::http::{header, HeaderValue};
use axum::middleware::{from_fn, from_fn_with_state};
use axum::routing::get;
use axum::Router;

/// Strict: our own scripts and styles only, no inline code, no framing, no foreign connections.
pub const CONTENT_SECURITY_POLICY: &str = "default-src 'self'; script-src 'self'; \
    style-src 'self'; img-src 'self' data: blob:; connect-src 'self'; font-src 'self'; \
    object-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'";

pub fn app(state: AppState) -> Router {
    let ui_only = Router::new()
        .route("/api/v1/settings", get(settings::get).put(settings::put))
        .route_layer(from_fn_with_state(state.clone(), require_session));

    Router::new()
        .route("/api/v1/health", get(health::get))
        .route("/api/v1/system", get(system::get))
        .merge(ui_only)
        .route("/api/{*rest}", axum::routing::any(api_not_found))
        .fallback(static_ui::serve)
        .layer(DefaultBodyLimit::max(2 * 1024 * 1024))
        .layer(from_fn_with_state(state.clone(), localhost_guard))
        // Outermost, so the guard's refusals carry the headers too.
        .layer(from_fn(security_headers))
        .with_state(state)
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
