//! The localhost guard. A web page the user visits can make their browser send requests to
//! 127.0.0.1; these checks keep such pages out (DNS rebinding: Host; cross-site requests: Origin)
//! and keep settings-changing routes to our own UI (session token). Binding to another interface
//! requires an API key instead of the Host check.

use crate::error::{ApiError, Code};
use crate::state::AppState;
use axum::extract::{Request, State};
use axum::http::header::{AUTHORIZATION, HOST, ORIGIN};
use axum::http::HeaderMap;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

/// Header our UI sends the per-launch token in.
pub const SESSION_HEADER: &str = "x-ld-session";

/// Applied to every route.
pub async fn localhost_guard(State(state): State<AppState>, req: Request, next: Next) -> Response {
    let preflight = req.method() == axum::http::Method::OPTIONS
        && req
            .headers()
            .contains_key(axum::http::header::ACCESS_CONTROL_REQUEST_METHOD);
    // The TCP peer, where the server records it (`serve` does; tests calling the router
    // directly do not, and count as remote).
    // A proxy on this computer forwards remote clients from a loopback address too: a request
    // that says it was forwarded is not local (most proxies say so; see the README).
    let forwarded = [
        "forwarded",
        "x-forwarded-for",
        "x-forwarded-host",
        "x-real-ip",
    ]
    .iter()
    .any(|h| req.headers().contains_key(*h));
    // `to_canonical`: on a dual-stack (`::`) socket, 127.0.0.1 arrives as ::ffff:127.0.0.1.
    let local_peer = !forwarded
        && req
            .extensions()
            .get::<axum::extract::ConnectInfo<std::net::SocketAddr>>()
            .is_some_and(|c| c.0.ip().to_canonical().is_loopback());
    match check(&state, req.headers(), req.uri(), preflight, local_peer) {
        Ok(()) => next.run(req).await,
        Err(e) => e.into_response(),
    }
}

/// `preflight`: a browser's CORS preflight, which never carries credentials and runs no
/// handler (the CORS layer answers it), so it needs no API key; its Origin is checked as any.
fn check(
    state: &AppState,
    headers: &HeaderMap,
    uri: &axum::http::Uri,
    preflight: bool,
    local_peer: bool,
) -> Result<(), ApiError> {
    let path = uri.path();
    let host = headers
        .get(HOST)
        .and_then(|h| h.to_str().ok())
        .unwrap_or("");
    // With a key, a connection from this computer that names it as the Host is treated as
    // without one: the Host check keeps web pages out as before, and the user's own browser
    // (the address `serve` prints is 127.0.0.1) gets the UI working (found by review: every API
    // call of the page, its pictures and its event stream were refused for want of the key,
    // which the page has no way to send). The peer address cannot be forged over TCP.
    let key = state
        .api_key()
        .filter(|_| !(local_peer && is_loopback_host(host, state.port())));
    match key {
        None => {
            if !is_loopback_host(host, state.port()) {
                tracing::warn!(host, "refused request with a foreign Host header");
                return Err(ApiError::new(
                    Code::Forbidden,
                    "This address is not allowed to reach Local Diffusers.",
                    format!(
                        "Open the app at http://127.0.0.1:{}/ on this computer.",
                        state.port()
                    ),
                ));
            }
        }
        Some(key) => {
            // On a network interface the Host can be any name for this machine; the key is what
            // keeps strangers out. The UI's static files stay reachable so the page can load.
            let is_api = path.starts_with("/api/")
                || path.starts_with("/sdapi/")
                || path.starts_with("/v1/");
            if is_api && !preflight && !has_api_key(headers, key) && !is_signed_image_link(uri, key)
            {
                return Err(ApiError::new(
                    Code::Unauthorized,
                    "An API key is required.",
                    "Send it as 'Authorization: Bearer KEY', or in a chat app's A1111 API auth field as user:KEY.",
                ));
            }
        }
    }
    if let Some(origin) = headers.get(ORIGIN) {
        let origin = origin.to_str().unwrap_or("");
        let same_origin = !host.is_empty() && origin == format!("http://{host}");
        let allowed = same_origin || is_allowed_page(state, origin);
        if !allowed {
            tracing::warn!(origin, "refused request from a foreign web page");
            return Err(ApiError::new(
                Code::Forbidden,
                format!("Requests from the web page {origin} are not allowed."),
                "If this is a chat app you trust, add its address in Settings under \"Web pages allowed to use Local Diffusers\".",
            ));
        }
    }
    Ok(())
}

/// Whether `origin` is one of the web pages the user allowed in Settings (a trailing slash there
/// is ignored). The guard lets their requests in; the CORS layer lets their browser read the
/// answers.
pub fn is_allowed_page(state: &AppState, origin: &str) -> bool {
    state
        .settings()
        .allowed_origins
        .iter()
        .any(|o| o.trim_end_matches('/') == origin)
}

/// Host header values that mean "this machine, our port". Names that merely resolve to 127.0.0.1
/// (the DNS-rebinding trick) are refused because they are not in this list.
fn is_loopback_host(host: &str, port: u16) -> bool {
    let Some((name, p)) = host.rsplit_once(':') else {
        return false;
    };
    if p.parse::<u16>().ok() != Some(port) {
        return false;
    }
    matches!(
        name.to_ascii_lowercase().as_str(),
        "127.0.0.1" | "localhost" | "[::1]"
    )
}

/// The key as `Authorization: Bearer KEY`, `X-Api-Key: KEY`, or `Authorization: Basic` with the
/// key as the password (any user name) or as the whole credential: A1111's `--api-auth` is Basic
/// auth, and it is all SillyTavern and Open WebUI can send to an A1111 server.
fn has_api_key(headers: &HeaderMap, key: &str) -> bool {
    use base64::Engine as _;
    let matches = |g: &[u8]| constant_time_eq(g, key.as_bytes());
    let auth = headers.get(AUTHORIZATION).and_then(|v| v.to_str().ok());
    if let Some(token) = auth.and_then(|v| v.strip_prefix("Bearer ")) {
        return matches(token.trim().as_bytes());
    }
    if let Some(basic) = auth.and_then(|v| v.strip_prefix("Basic ")) {
        let Ok(decoded) = base64::engine::general_purpose::STANDARD.decode(basic.trim()) else {
            return false;
        };
        let password = decoded
            .iter()
            .position(|&b| b == b':')
            .map(|colon| &decoded[colon + 1..]);
        return matches(&decoded) || password.is_some_and(matches);
    }
    headers
        .get("x-api-key")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|g| matches(g.trim().as_bytes()))
}

/// The signature that lets a link to one picture's file (`/api/v1/images/{id}/file?sig=...`)
/// be fetched without the API key: HMAC-SHA256 of the image id under the key, in hex. OpenAI's
/// image API answers with links clients fetch as they are, without credentials (its own are
/// signed the same way), so the links `/v1/images/generations` hands out carry one. It opens
/// that one file and nothing else, and a new key voids every link made with the old one.
pub fn image_link_signature(key: &str, id: i64) -> String {
    use hmac::{Mac, SimpleHmac};
    let mut mac = SimpleHmac::<sha2::Sha256>::new_from_slice(key.as_bytes())
        .expect("HMAC takes a key of any length");
    mac.update(format!("image-file:{id}").as_bytes());
    mac.finalize()
        .into_bytes()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Whether `uri` is a picture's file link with a valid [`image_link_signature`].
fn is_signed_image_link(uri: &axum::http::Uri, key: &str) -> bool {
    let Some(id) = uri
        .path()
        .strip_prefix("/api/v1/images/")
        .and_then(|rest| rest.strip_suffix("/file"))
        .and_then(|id| id.parse::<i64>().ok())
    else {
        return false;
    };
    let Some(sig) = uri
        .query()
        .into_iter()
        .flat_map(|q| q.split('&'))
        .find_map(|pair| pair.strip_prefix("sig="))
    else {
        return false;
    };
    constant_time_eq(sig.as_bytes(), image_link_signature(key, id).as_bytes())
}

/// Applied to UI-only routes (settings, downloads, deletes, imports).
pub async fn require_session(State(state): State<AppState>, req: Request, next: Next) -> Response {
    let ok = req
        .headers()
        .get(SESSION_HEADER)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|t| constant_time_eq(t.as_bytes(), state.session_token().as_bytes()));
    if ok {
        next.run(req).await
    } else {
        ApiError::new(
            Code::Unauthorized,
            "Only the Local Diffusers window may do this.",
            "Use the app's own interface for settings, downloads and deletions.",
        )
        .into_response()
    }
}

/// Compare secrets without an early exit, so timing does not reveal how much matched.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_hosts() {
        assert!(is_loopback_host("127.0.0.1:7860", 7860));
        assert!(is_loopback_host("LOCALHOST:7860", 7860));
        assert!(is_loopback_host("[::1]:7860", 7860));
        assert!(!is_loopback_host("127.0.0.1:7861", 7860));
        assert!(!is_loopback_host("127.0.0.1", 7860));
        assert!(!is_loopback_host("evil.example:7860", 7860));
        assert!(!is_loopback_host("127.0.0.1.nip.io:7860", 7860));
        assert!(!is_loopback_host("", 7860));
    }

    #[test]
    fn constant_time_eq_works() {
        assert!(constant_time_eq(b"abc", b"abc"));
        assert!(!constant_time_eq(b"abc", b"abd"));
        assert!(!constant_time_eq(b"abc", b"ab"));
    }
}
