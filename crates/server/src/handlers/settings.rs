//! `GET/PUT /api/v1/settings`: the user's defaults. UI-only (session token).

use crate::error::{ApiError, Code};
use crate::state::AppState;
use axum::extract::rejection::JsonRejection;
use axum::extract::State;
use axum::Json;
use ld_core::settings::Settings;
use serde::Serialize;

#[derive(Serialize)]
pub struct SettingsView {
    #[serde(flatten)]
    settings: Settings,
    data_dir: String,
    /// Set when the settings file was damaged and defaults are in use.
    warning: Option<String>,
}

fn view(state: &AppState) -> SettingsView {
    SettingsView {
        settings: state.settings(),
        data_dir: state.data().root().display().to_string(),
        warning: state.settings_warning().map(str::to_owned),
    }
}

pub async fn get(State(state): State<AppState>) -> Json<SettingsView> {
    Json(view(&state))
}

pub async fn put(
    State(state): State<AppState>,
    body: Result<Json<Settings>, JsonRejection>,
) -> Result<Json<SettingsView>, ApiError> {
    let Json(new) = body.map_err(|e| {
        ApiError::new(
            Code::InvalidRequest,
            format!("These settings could not be read: {}", e.body_text()),
            "Send the settings object as JSON, as GET /api/v1/settings returns it.",
        )
    })?;
    let s = state.clone();
    tokio::task::spawn_blocking(move || s.change_settings(|settings| *settings = new))
        .await
        .map_err(ApiError::internal)?
        .map_err(|e| {
            ApiError::new(
                Code::Internal,
                format!("{e}"),
                "Check that the disk is not full and the data folder is writable.",
            )
        })?;
    Ok(Json(view(&state)))
}
