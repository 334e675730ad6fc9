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
    tokio::task::spawn_blocking(move || -> Result<_, ApiError> {
        let mut new = new;
        // Checked only when it changes: a file removed since it was chosen must not block
        // saving the other settings (jobs fall back to "Automatic" and say so).
        if new.vae != s.settings().vae {
            new.vae = vae_setting(&s, &new.vae)?;
        }
        Ok(s.change_settings(|settings| *settings = new))
    })
    .await
    .map_err(ApiError::internal)??
    .map_err(|e| {
        ApiError::new(
            Code::Internal,
            format!("{e}"),
            "Check that the disk is not full and the data folder is writable.",
        )
    })?;
    Ok(Json(view(&state)))
}

/// The "SD VAE" setting's value for `wanted`: "Automatic", "None" or a VAE file's name as listed
/// (`GET /api/v1/networks`, A1111's `/sdapi/v1/sd-vae`). Blocking (reads the VAE folders). An
/// unknown name is an `invalid_request` naming it and listing what there is.
pub(crate) fn vae_setting(state: &AppState, wanted: &str) -> Result<String, ApiError> {
    let files = state.vaes();
    ld_core::vae::setting_value(&files, wanted).ok_or_else(|| {
        let names: Vec<String> = [ld_core::vae::AUTOMATIC, ld_core::vae::NONE]
            .iter()
            .map(|n| format!("\"{n}\""))
            .chain(files.iter().map(|v| format!("\"{}\"", v.name)))
            .collect();
        ApiError::new(
            Code::InvalidRequest,
            format!("There is no VAE file called '{}'.", wanted.trim()),
            format!(
                "Choose one of: {}. VAE files (.safetensors) go in {}, or in the VAE folder of a \
                 models folder you added (A1111's models/VAE).",
                names.join(", "),
                state.data().vaes().display()
            ),
        )
    })
}
