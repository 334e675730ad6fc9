//! `GET /api/v1/system`: the hardware report Diagnostics shows.

use crate::error::ApiError;
use crate::state::AppState;
use axum::extract::State;
use axum::Json;
use ld_core::hardware::SystemReport;
use serde::Serialize;

#[derive(Serialize)]
pub struct System {
    #[serde(flatten)]
    report: SystemReport,
    data_dir: String,
}

pub async fn get(State(state): State<AppState>) -> Result<Json<System>, ApiError> {
    let probe = state.gpu();
    // NVML and /proc reads block: keep them off the async runtime's threads.
    let report = tokio::task::spawn_blocking(move || {
        ld_core::hardware::system_report(&*probe, crate::BUILD)
    })
    .await
    .map_err(ApiError::internal)?;
    Ok(Json(System {
        report,
        data_dir: state.data().root().display().to_string(),
    }))
}
