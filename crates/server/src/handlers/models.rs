//! `GET /api/v1/models`, `/samplers`, `/schedules`: what the playground's pickers offer.

use crate::state::AppState;
use axum::extract::State;
use axum::Json;
use ld_core::models::ModelInfo;
use ld_engine::sampler::SamplerKind;
use ld_engine::schedule::ScheduleKind;
use serde_json::{json, Value};

pub async fn list(State(state): State<AppState>) -> Json<Value> {
    let (models, default) = tokio::task::spawn_blocking(move || {
        let models: Vec<ModelInfo> = state.models();
        let default = state.default_model().map(|m| m.name);
        (models, default)
    })
    .await
    .unwrap_or_default();
    Json(json!({"models": models, "default": default}))
}

pub async fn samplers() -> Json<Value> {
    Json(json!({
        "samplers": SamplerKind::ALL.iter().map(|k| k.name()).collect::<Vec<_>>(),
        "default": SamplerKind::default().name(),
    }))
}

pub async fn schedules() -> Json<Value> {
    Json(json!({
        "schedules": ScheduleKind::ALL.iter().map(|k| k.name()).collect::<Vec<_>>(),
        "default": "Karras",
    }))
}
