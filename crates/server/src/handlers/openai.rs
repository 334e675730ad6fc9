//! `POST /v1/images/generations`, the OpenAI images API as Open WebUI and LibreChat call it:
//! `{prompt, n, size: "WxH", response_format: "b64_json" | "url", model}`, and `GET /v1/models`.
//! Errors use OpenAI's `{"error": {message, type, code}}` shape, which these clients show to their
//! users.

use crate::error::ApiError;
use crate::handlers::jobs::{submit, wait_for};
use crate::state::AppState;
use axum::extract::rejection::JsonRejection;
use axum::extract::State;
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use base64::Engine as _;
use ld_core::compose::GenerationInput;
use ld_core::jobs::JobState;
use serde::Deserialize;
use serde_json::{json, Value};

#[derive(Debug, Deserialize)]
pub struct Generations {
    pub prompt: String,
    #[serde(default)]
    pub model: Option<String>,
    #[serde(default)]
    pub n: Option<usize>,
    #[serde(default)]
    pub size: Option<String>,
    #[serde(default)]
    pub response_format: Option<String>,
    #[serde(default)]
    pub negative_prompt: Option<String>,
    #[serde(default)]
    pub seed: Option<i64>,
}

/// OpenAI's error body for one of ours.
pub struct OpenAiError(ApiError);

impl From<ApiError> for OpenAiError {
    fn from(e: ApiError) -> Self {
        Self(e)
    }
}

impl IntoResponse for OpenAiError {
    fn into_response(self) -> Response {
        let status = self.0.clone().into_response().status();
        let body = json!({"error": {
            "message": format!("{} {}", self.0.message, self.0.hint),
            "type": if status.is_client_error() { "invalid_request_error" } else { "server_error" },
            "param": Value::Null,
            "code": self.0.code,
        }});
        let mut res = (status, Json(body)).into_response();
        if let Some(secs) = self.0.retry_after {
            res.headers_mut().insert(header::RETRY_AFTER, secs.into());
        }
        res
    }
}

fn bad(message: impl Into<String>, hint: &str) -> OpenAiError {
    OpenAiError(ApiError::new(
        crate::error::Code::InvalidRequest,
        message,
        hint,
    ))
}

/// "512x768" -> (512, 768); sizes that are not multiples of 8 are floored, as A1111 does.
fn parse_size(size: &str) -> Option<(usize, usize)> {
    let (w, h) = size.trim().split_once(['x', 'X'])?;
    Some((
        w.trim().parse::<usize>().ok()? / 8 * 8,
        h.trim().parse::<usize>().ok()? / 8 * 8,
    ))
}

pub async fn generations(
    State(state): State<AppState>,
    headers: HeaderMap,
    body: Result<Json<Generations>, JsonRejection>,
) -> Result<Response, OpenAiError> {
    let Json(req) = body.map_err(|e| {
        OpenAiError(ApiError::bad_json(
            &e,
            "Send {\"prompt\": \"...\", \"size\": \"512x512\"} as JSON.",
        ))
    })?;
    // OpenAI's gpt-image models always answer with base64 and clients send them no
    // response_format (Open WebUI then refuses a link to a private address); dall-e's default is
    // a link.
    let gpt_image = req
        .model
        .as_deref()
        .is_some_and(|m| m.trim().starts_with("gpt-image"));
    let format =
        req.response_format
            .as_deref()
            .unwrap_or(if gpt_image { "b64_json" } else { "url" });
    if format != "url" && format != "b64_json" {
        return Err(bad(
            format!("response_format must be 'url' or 'b64_json', got '{format}'."),
            "Use b64_json to get the image in the answer.",
        ));
    }
    let size = match req.size.as_deref() {
        None | Some("auto") => None,
        Some(s) => Some(parse_size(s).ok_or_else(|| {
            bad(
                format!("size must look like '512x512', got '{s}'."),
                "Give the width and height in pixels.",
            )
        })?),
    };
    let n = req.n.unwrap_or(1);
    if !(1..=ld_core::compose::MAX_BATCH).contains(&n) {
        return Err(bad(
            format!(
                "n must be between 1 and {} here, got {n}.",
                ld_core::compose::MAX_BATCH
            ),
            "Ask for fewer images at once, or send the request again for more.",
        ));
    }
    // OpenAI model ids ("dall-e-3") mean nothing here: use the default model for them.
    let s = state.clone();
    let wanted = req.model.clone();
    let model = tokio::task::spawn_blocking(move || {
        let models = s.models();
        wanted.and_then(|w| ld_core::models::find(&models, &w).map(|m| m.name.clone()))
    })
    .await
    .map_err(ApiError::internal)?;
    let input = GenerationInput {
        prompt: req.prompt.clone(),
        negative_prompt: req.negative_prompt.clone(),
        model,
        width: size.map(|s| s.0),
        height: size.map(|s| s.1),
        seed: req.seed,
        batch_size: Some(n),
        ..Default::default()
    };
    let job = submit(&state, input).await?;
    let done = wait_for(&state, &job.id).await?;
    match done.state {
        JobState::Done => {}
        JobState::Failed => {
            let err = done.error.as_ref().expect("a failed job has its error");
            return Err(ApiError::from_job(err).into());
        }
        _ => {
            return Err(ApiError::new(
                crate::error::Code::Cancelled,
                "The picture was cancelled before it was finished.",
                "Ask again.",
            )
            .into())
        }
    }
    let mut data = Vec::new();
    for record in &done.images {
        if format == "url" {
            // The same host the client reached us on, so the link works for it.
            let host = headers
                .get(header::HOST)
                .and_then(|h| h.to_str().ok())
                .unwrap_or("127.0.0.1");
            // With an API key, the link is signed so it opens without the key, as OpenAI's do.
            let sig = state
                .api_key()
                .map(|key| {
                    format!(
                        "?sig={}",
                        crate::guard::image_link_signature(key, record.id)
                    )
                })
                .unwrap_or_default();
            data.push(json!({
                "url": format!("http://{host}/api/v1/images/{}/file{sig}", record.id),
                "revised_prompt": done.prompt,
            }));
        } else {
            let path = state.gallery().file_path(record);
            let bytes = tokio::task::spawn_blocking(move || std::fs::read(path))
                .await
                .map_err(ApiError::internal)?
                .map_err(ApiError::internal)?;
            data.push(json!({
                "b64_json": base64::engine::general_purpose::STANDARD.encode(bytes),
                "revised_prompt": done.prompt,
            }));
        }
    }
    let created = done.created_at / 1000;
    Ok((
        StatusCode::OK,
        Json(json!({"created": created, "data": data})),
    )
        .into_response())
}

/// `GET /v1/models`, OpenAI's model list as clients probe it: the installed models by name (what
/// `model` takes here).
pub async fn models(State(state): State<AppState>) -> Result<Json<Value>, OpenAiError> {
    let models = tokio::task::spawn_blocking(move || state.models())
        .await
        .map_err(ApiError::internal)?;
    let data: Vec<Value> = models
        .iter()
        .map(|m| json!({"id": m.name, "object": "model", "created": 0, "owned_by": "local"}))
        .collect();
    Ok(Json(json!({"object": "list", "data": data})))
}

/// `/v1/images/edits` and `/variations` (Open WebUI's image editing): named, so the client
/// shows why rather than a bare "not found".
pub async fn text_only() -> OpenAiError {
    OpenAiError(ApiError::new(
        crate::error::Code::NotFound,
        "Local Diffusers draws pictures from text only; editing a picture or making variations \
         of one is not offered.",
        "Use POST /v1/images/generations with a prompt that describes the whole picture.",
    ))
}

/// Any other `/v1/` route: OpenAI's error shape, not the UI page (found by review: clients that
/// probe `/v1/chat/completions` took the page for an answer).
pub async fn not_found() -> OpenAiError {
    OpenAiError(ApiError::new(
        crate::error::Code::NotFound,
        "Local Diffusers offers only the images part of the OpenAI API here.",
        "Use POST /v1/images/generations; GET /v1/models lists the models.",
    ))
}
