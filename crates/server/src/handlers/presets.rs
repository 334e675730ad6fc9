//! `/api/v1/presets`: the built-in presets (read-only) and the user's own (create, edit, delete,
//! import and export as TOML). Changes are UI-only.

use crate::error::{ApiError, Code};
use crate::handlers::blocking;
use crate::state::AppState;
use axum::extract::rejection::JsonRejection;
use axum::extract::{Path, State};
use axum::http::header;
use axum::response::{IntoResponse, Response};
use axum::Json;
use ld_core::presets::{Preset, PresetError};
use serde_json::{json, Value};

fn preset_error(e: PresetError) -> ApiError {
    let code = match &e {
        PresetError::NotFound { .. } | PresetError::InvalidId { .. } => Code::NotFound,
        PresetError::Write { .. } | PresetError::Read { .. } | PresetError::Encode { .. } => {
            Code::Internal
        }
        _ => Code::InvalidRequest,
    };
    let hint = match code {
        Code::NotFound => "Refresh the list of presets.",
        Code::Internal => "Check that the disk is not full and the data folder is writable.",
        _ if matches!(e, PresetError::ReadOnly { .. }) => {
            "Built-in presets cannot be changed; save a copy under a new name instead."
        }
        _ => "Correct the preset and try again.",
    };
    ApiError::new(code, e.to_string(), hint)
}

pub async fn list(State(state): State<AppState>) -> Json<Vec<Preset>> {
    Json(state.all_presets())
}

pub async fn get(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<Preset>, ApiError> {
    state.presets().get(&id).map(Json).map_err(preset_error)
}

fn body_of(body: Result<Json<Preset>, JsonRejection>) -> Result<Preset, ApiError> {
    body.map(|Json(p)| p).map_err(|e| {
        ApiError::bad_json(
            &e,
            "Send the preset as JSON, as GET /api/v1/presets returns it.",
        )
    })
}

pub async fn create(
    State(state): State<AppState>,
    body: Result<Json<Preset>, JsonRejection>,
) -> Result<Json<Preset>, ApiError> {
    let p = body_of(body)?;
    blocking(move || state.presets().create(p).map(Json).map_err(preset_error)).await
}

pub async fn update(
    State(state): State<AppState>,
    Path(id): Path<String>,
    body: Result<Json<Preset>, JsonRejection>,
) -> Result<Json<Preset>, ApiError> {
    let p = body_of(body)?;
    blocking(move || {
        state
            .presets()
            .update(&id, p)
            .map(Json)
            .map_err(preset_error)
    })
    .await
}

pub async fn delete(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    blocking(move || {
        state.presets().delete(&id).map_err(preset_error)?;
        Ok(Json(json!({"deleted": id})))
    })
    .await
}

/// The body is the TOML text of one preset.
pub async fn import(State(state): State<AppState>, body: String) -> Result<Json<Preset>, ApiError> {
    blocking(move || {
        state
            .presets()
            .import_toml(&body)
            .map(Json)
            .map_err(preset_error)
    })
    .await
}

pub async fn export(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let text = state.presets().export_toml(&id).map_err(preset_error)?;
    let name: String = id
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || *c == '-')
        .collect();
    Ok((
        [
            (
                header::CONTENT_TYPE,
                "application/toml; charset=utf-8".to_owned(),
            ),
            (
                header::CONTENT_DISPOSITION,
                format!("attachment; filename=\"{name}.toml\""),
            ),
        ],
        text,
    )
        .into_response())
}
