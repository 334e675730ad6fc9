//! `/api/v1/images`: the gallery. Images are addressed by their numeric id only; the file behind
//! an id comes from the index, never from anything in the request, so no id can name a path.

use crate::error::{ApiError, Code};
use crate::handlers::blocking;
use crate::state::AppState;
use axum::body::Bytes;
use axum::extract::rejection::JsonRejection;
use axum::extract::{Path, Query, State};
use axum::http::header;
use axum::response::{IntoResponse, Response};
use axum::Json;
use ld_core::gallery::{ImagePage, ImageQuery, ImageRecord};
use serde::Deserialize;
use serde_json::{json, Value};

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub struct ListParams {
    pub search: Option<String>,
    pub model: Option<String>,
    pub favourites: bool,
    pub trash: bool,
    /// Unix milliseconds.
    pub since: Option<i64>,
    pub until: Option<i64>,
    pub offset: usize,
    pub limit: Option<usize>,
}

fn gallery_error(e: impl std::fmt::Display) -> ApiError {
    ApiError::new(
        Code::Internal,
        format!("The gallery could not do this: {e}"),
        "Check that the disk is not full and the data folder is writable.",
    )
}

fn parse_id(raw: &str) -> Result<i64, ApiError> {
    raw.parse::<i64>()
        .ok()
        .filter(|id| *id > 0)
        .ok_or_else(not_found)
}

fn not_found() -> ApiError {
    ApiError::new(
        Code::NotFound,
        "There is no such image.",
        "It may have been deleted. Refresh the gallery.",
    )
}

fn record(state: &AppState, raw: &str) -> Result<ImageRecord, ApiError> {
    let id = parse_id(raw)?;
    state
        .gallery()
        .get(id)
        .map_err(gallery_error)?
        .ok_or_else(not_found)
}

pub async fn list(
    State(state): State<AppState>,
    Query(p): Query<ListParams>,
) -> Result<Json<ImagePage>, ApiError> {
    blocking(move || {
        let q = ImageQuery {
            search: p.search.filter(|s| !s.trim().is_empty()),
            model: p.model.filter(|s| !s.trim().is_empty()),
            favourites_only: p.favourites,
            since: p.since,
            until: p.until,
            trashed: p.trash,
            offset: p.offset,
            limit: p.limit.unwrap_or(0),
        };
        state.gallery().list(&q).map(Json).map_err(gallery_error)
    })
    .await
}

pub async fn get(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<ImageRecord>, ApiError> {
    blocking(move || record(&state, &id).map(Json)).await
}

/// The PNG itself (the original, with its parameters chunk).
pub async fn file(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    blocking(move || {
        let r = record(&state, &id)?;
        let path = state.gallery().file_path(&r);
        let bytes = std::fs::read(&path).map_err(|_| not_found())?;
        Ok(png_response(bytes, Some(&format!("{}.png", r.id)), true))
    })
    .await
}

pub async fn thumbnail(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    blocking(move || {
        let r = record(&state, &id)?;
        let path = state.gallery().thumbnail_path(&r).map_err(gallery_error)?;
        let bytes = std::fs::read(&path).map_err(|_| not_found())?;
        Ok(png_response(bytes, None, true))
    })
    .await
}

fn png_response(bytes: Vec<u8>, name: Option<&str>, cache: bool) -> Response {
    let mut res = (
        [
            (header::CONTENT_TYPE, "image/png"),
            (
                header::CACHE_CONTROL,
                if cache {
                    "private, max-age=31536000, immutable"
                } else {
                    "no-store"
                },
            ),
        ],
        bytes,
    )
        .into_response();
    if let Some(n) = name {
        if let Ok(v) = format!("inline; filename=\"{n}\"").parse() {
            res.headers_mut().insert(header::CONTENT_DISPOSITION, v);
        }
    }
    res
}

#[derive(Deserialize)]
pub struct Favourite {
    favourite: bool,
}

pub async fn set_favourite(
    State(state): State<AppState>,
    Path(id): Path<String>,
    body: Result<Json<Favourite>, JsonRejection>,
) -> Result<Json<ImageRecord>, ApiError> {
    let Json(f) = body.map_err(|e| ApiError::bad_json(&e, "Send {\"favourite\": true}."))?;
    blocking(move || {
        let r = record(&state, &id)?;
        state
            .gallery()
            .set_favourite(r.id, f.favourite)
            .map_err(gallery_error)?;
        record(&state, &r.id.to_string()).map(Json)
    })
    .await
}

/// Moves the image to the trash (UI-only); it can be restored until the trash is emptied.
pub async fn delete(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    blocking(move || {
        let r = record(&state, &id)?;
        state.gallery().trash(r.id).map_err(gallery_error)?;
        Ok(Json(json!({"trashed": r.id})))
    })
    .await
}

pub async fn restore(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<ImageRecord>, ApiError> {
    blocking(move || {
        let r = record(&state, &id)?;
        state.gallery().restore(r.id).map_err(gallery_error)?;
        record(&state, &r.id.to_string()).map(Json)
    })
    .await
}

pub async fn empty_trash(State(state): State<AppState>) -> Result<Json<Value>, ApiError> {
    blocking(move || {
        let n = state.gallery().empty_trash().map_err(gallery_error)?;
        Ok(Json(json!({"deleted": n})))
    })
    .await
}

/// The parameters of any PNG (ours, A1111's, ComfyUI's, InvokeAI's): the body is the file.
pub async fn inspect(body: Bytes) -> Result<Json<ld_core::metadata::Inspected>, ApiError> {
    blocking(move || {
        ld_core::metadata::inspect_png(&body)
            .map(Json)
            .map_err(|e| {
                ApiError::new(
                    Code::InvalidRequest,
                    e.to_string(),
                    "Drop a PNG made by Local Diffusers, A1111, ComfyUI or InvokeAI.",
                )
            })
    })
    .await
}
