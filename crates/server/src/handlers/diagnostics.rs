//! `GET /api/v1/diagnostics` (the whole report: hardware, recommendation, models, disk, recent
//! problems) and `POST /api/v1/diagnostics/self-test` (the tiny model through the whole
//! pipeline, timed).

use crate::error::{ApiError, Code};
use crate::state::AppState;
use axum::extract::State;
use axum::Json;
use ld_core::diagnostics::{self, Report, SelfTest};
use std::sync::atomic::{AtomicBool, Ordering};

/// How many recent problems the report lists.
const PROBLEMS: usize = 10;

pub async fn get(State(state): State<AppState>) -> Result<Json<Report>, ApiError> {
    let probe = state.gpu();
    let data = state.data().root().to_path_buf();
    let models = state.models();
    let jobs = state.jobs().list();
    // NVML, /proc and the disk list block: keep them off the async runtime's threads.
    let report = tokio::task::spawn_blocking(move || {
        Report::new(
            ld_core::hardware::system_report(&*probe, crate::BUILD),
            diagnostics::summarize_models(&models),
            diagnostics::disk_for(&data),
            diagnostics::problems_from_jobs(&jobs, PROBLEMS),
        )
    })
    .await
    .map_err(ApiError::internal)?;
    Ok(Json(report))
}

/// One self-test at a time: a second request while one runs is answered `busy`.
static RUNNING: AtomicBool = AtomicBool::new(false);

struct Running;
impl Drop for Running {
    fn drop(&mut self) {
        RUNNING.store(false, Ordering::SeqCst);
    }
}

pub async fn self_test(State(state): State<AppState>) -> Result<Json<SelfTest>, ApiError> {
    let Some(model) = diagnostics::find_tiny_model(state.data().root()) else {
        return Err(ApiError::new(
            Code::ModelMissing,
            "The built-in test model (models/tiny/sd1) was not found.",
            "Reinstall Local Diffusers, or copy its models/tiny folder into the data folder's models folder.",
        ));
    };
    if RUNNING.swap(true, Ordering::SeqCst) {
        return Err(ApiError::new(
            Code::Busy,
            "A self-test is already running.",
            "Wait for it to finish; it takes a few seconds.",
        ));
    }
    let guard = Running;
    let settings = state.settings();
    let load = crate::device::load_options_with(
        settings.precision,
        settings.low_vram,
        crate::device::gpu_advised(&*state.gpu()),
    );
    let result = tokio::task::spawn_blocking(move || {
        let _guard = guard;
        diagnostics::self_test(&model, &load)
    })
    .await
    .map_err(ApiError::internal)?;
    Ok(Json(result))
}
