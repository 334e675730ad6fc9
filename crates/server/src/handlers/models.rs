//! `GET /api/v1/models`, `/samplers`, `/schedules`: what the playground's pickers offer.

use crate::error::{ApiError, Code};
use crate::state::AppState;
use axum::extract::{Path, State};
use axum::Json;
use ld_core::models::ModelInfo;
use ld_engine::sampler::SamplerKind;
use ld_engine::schedule::ScheduleKind;
use serde_json::{json, Value};

pub async fn list(State(state): State<AppState>) -> Json<Value> {
    let (models, default) = tokio::task::spawn_blocking(move || {
        let models: Vec<ModelInfo> = state.models();
        let default = state.default_model_in(&models).map(|m| m.name);
        (models, default)
    })
    .await
    .unwrap_or_default();
    Json(json!({"models": models, "default": default}))
}

/// `GET /api/v1/networks`: the LoRAs and embeddings the prompt box offers, and the VAE files
/// Settings offers for "SD VAE" (`name` is what the setting takes).
pub async fn networks(State(state): State<AppState>) -> Json<Value> {
    let (loras, embeddings, vaes) =
        tokio::task::spawn_blocking(move || (state.loras(), state.embeddings(), state.vaes()))
            .await
            .unwrap_or_default();
    Json(json!({"loras": loras, "embeddings": embeddings, "vaes": vaes}))
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

/// The usable VRAM for catalog advice: the largest NVIDIA card when this build can use CUDA
/// and the hardware advice draws on it, else none (the CPU, as the worker then draws).
fn usable_vram_gb(state: &AppState) -> Option<f64> {
    if !crate::BUILD.cuda || !crate::device::gpu_advised(&*state.gpu()) {
        return None;
    }
    state
        .gpu()
        .probe()
        .0
        .iter()
        .map(|g| g.vram_total_bytes as f64 / (1u64 << 30) as f64)
        .fold(None, |a: Option<f64>, v| Some(a.map_or(v, |a| a.max(v))))
}

/// `GET /api/v1/catalog`: the recommended models, each with whether it fits this computer and is
/// installed, and the one the guided setup suggests first.
pub async fn catalog(State(state): State<AppState>) -> Json<Value> {
    let body = tokio::task::spawn_blocking(move || {
        let vram = usable_vram_gb(&state);
        let installed: Vec<String> = state
            .models()
            .into_iter()
            .filter_map(|m| m.catalog_id)
            .collect();
        let entries: Vec<Value> = ld_core::catalog::entries()
            .into_iter()
            .map(|e| {
                let mut v = serde_json::to_value(&e).unwrap_or_default();
                v["fits"] = json!(ld_core::catalog::fits(&e, vram));
                v["installed"] = json!(installed.contains(&e.id));
                v
            })
            .collect();
        json!({
            "models": entries,
            "suggested": ld_core::catalog::suggest(vram).id,
            "vram_gb": vram,
        })
    })
    .await
    .unwrap_or_default();
    Json(body)
}

/// `GET /api/v1/setup`: what the first-start guide needs: whether any model is installed, the
/// suggestion, and downloads under way.
pub async fn setup(State(state): State<AppState>) -> Json<Value> {
    let s = state.clone();
    let (has_model, vram) =
        // Only a model that can draw counts: a folder of `.ckpt` files or unsupported
        // checkpoints must not end the first-start guide (found by review).
        tokio::task::spawn_blocking(move || {
            let usable = s.models().iter().any(|m| m.problem.is_none() && !m.refiner);
            (usable, usable_vram_gb(&s))
        })
            .await
            .unwrap_or((false, None));
    let suggested = ld_core::catalog::suggest(vram);
    Json(json!({
        "has_model": has_model,
        "suggested": suggested,
        "downloads": state.downloads().list(),
        "offline_hint": "No internet? Choose \"I already have a model\" below to use a folder with models you already have.",
    }))
}

#[derive(serde::Deserialize)]
pub struct DownloadRequest {
    id: String,
}

/// `POST /api/v1/downloads {id}` (UI-only): install a catalog model; progress comes as
/// `download` events on `/api/v1/events`.
pub async fn start_download(
    State(state): State<AppState>,
    body: Result<Json<DownloadRequest>, axum::extract::rejection::JsonRejection>,
) -> Result<
    (
        axum::http::StatusCode,
        Json<ld_core::download::manager::DownloadInfo>,
    ),
    ApiError,
> {
    let Json(req) = body.map_err(|e| ApiError::bad_json(&e, "Send {\"id\": \"sd-turbo\"}."))?;
    let entry = ld_core::catalog::find(&req.id).ok_or_else(|| {
        ApiError::new(
            Code::NotFound,
            format!(
                "There is no catalog model '{}'.",
                req.id.chars().take(60).collect::<String>()
            ),
            format!(
                "Choose one of: {}.",
                ld_core::catalog::entries()
                    .iter()
                    .map(|e| e.id.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        )
    })?;
    Ok((
        axum::http::StatusCode::ACCEPTED,
        Json(state.downloads().start(entry)),
    ))
}

pub async fn downloads(
    State(state): State<AppState>,
) -> Json<Vec<ld_core::download::manager::DownloadInfo>> {
    Json(state.downloads().list())
}

pub async fn cancel_download(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<ld_core::download::manager::DownloadInfo>, ApiError> {
    state.downloads().cancel(&id).map(Json).ok_or_else(|| {
        ApiError::new(
            Code::NotFound,
            "There is no such download.",
            "Refresh the Models page.",
        )
    })
}

/// `DELETE /api/v1/models/{name}` (UI-only): only models we downloaded.
pub async fn delete(
    State(state): State<AppState>,
    Path(name): Path<String>,
) -> Result<Json<Value>, ApiError> {
    tokio::task::spawn_blocking(move || {
        let models = state.models();
        let model = models
            .iter()
            .find(|m| m.name == name)
            .ok_or_else(|| {
                ApiError::new(
                    Code::NotFound,
                    "There is no such model.",
                    "Refresh the Models page.",
                )
            })?;
        if !model.managed {
            return Err(ApiError::new(
                Code::Forbidden,
                format!(
                    "'{}' is in a folder you added ({}); Local Diffusers only deletes models it downloaded.",
                    model.name,
                    model.path.display()
                ),
                "Delete it with your file manager if you no longer want it, or remove its folder from Settings.",
            ));
        }
        ld_core::models::delete_managed(model).map_err(|e| {
            ApiError::new(
                Code::Internal,
                format!("The model could not be deleted: {e}"),
                "Close other programs using it and try again.",
            )
        })?;
        Ok(Json(json!({"deleted": model.name})))
    })
    .await
    .map_err(ApiError::internal)?
}

#[derive(serde::Deserialize)]
pub struct ConvertRequest {
    name: String,
}

/// `POST /api/v1/models/convert {name}` (UI-only): a pickle checkpoint from the library becomes
/// a `.safetensors` file in our models folder, read without running anything in it. The
/// original stays where the user keeps it.
pub async fn convert(
    State(state): State<AppState>,
    body: Result<Json<ConvertRequest>, axum::extract::rejection::JsonRejection>,
) -> Result<Json<Value>, ApiError> {
    let Json(req) = body.map_err(|e| ApiError::bad_json(&e, "Send {\"name\": \"model\"}."))?;
    crate::handlers::blocking(move || {
        let models = state.models();
        let model = models
            .iter()
            .find(|m| m.name == req.name && m.format == "pickle")
            .ok_or_else(|| {
                ApiError::new(
                    Code::NotFound,
                    "There is no pickle checkpoint by that name.",
                    "Only .ckpt/.pt/.bin models listed on the Models page can be converted.",
                )
            })?;
        let stem = model
            .path
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_else(|| "converted".into());
        let dst = state.data().models().join(format!("{stem}.safetensors"));
        if dst.exists() {
            return Err(ApiError::new(
                Code::InvalidRequest,
                format!("{} already exists.", dst.display()),
                // Two pickles of one name in different folders share the converted name, so
                // this may be another model's conversion.
                "If it was converted from this file, use that model. If it is another model \
                 of the same name, rename one of the two files and convert again.",
            ));
        }
        let done = ld_engine::pickle::convert_to_safetensors(&model.path, &dst).map_err(|e| {
            ApiError::new(
                Code::InvalidRequest,
                format!("The file could not be converted: {e}"),
                "Download the .safetensors version of this model instead.",
            )
        })?;
        Ok(Json(json!({
            "path": done.path.display().to_string(),
            "tensors": done.tensors,
            "bytes": done.bytes,
        })))
    })
    .await
}

/// `POST /api/v1/models/hash {name}`: computes (and caches) a single-file checkpoint's sha256 and
/// AutoV2 hash, as Civitai shows them. Reads the whole file: seconds for a few gigabytes.
pub async fn hash(
    State(state): State<AppState>,
    body: Result<Json<ConvertRequest>, axum::extract::rejection::JsonRejection>,
) -> Result<Json<Value>, ApiError> {
    let Json(req) = body.map_err(|e| ApiError::bad_json(&e, "Send {\"name\": \"model\"}."))?;
    crate::handlers::blocking(move || {
        let models = state.models();
        let model = models
            .iter()
            .find(|m| m.name == req.name && m.path.is_file())
            .ok_or_else(|| {
                ApiError::new(
                    Code::NotFound,
                    "There is no single-file model by that name.",
                    "Hashes are shown for .safetensors checkpoints; model folders have none.",
                )
            })?;
        let sha = state
            .jobs()
            .hashes()
            .sha256(&model.path)
            .map_err(ApiError::internal)?;
        Ok(Json(json!({
            "name": model.name,
            "sha256": sha,
            "short_hash": ld_core::hashes::autov2(&sha),
        })))
    })
    .await
}
