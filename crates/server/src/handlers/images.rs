//! `/api/v1/images`: the gallery. Images are addressed by their numeric id only; the file behind
//! an id comes from the index, never from anything in the request, so no id can name a path.

use crate::error::{ApiError, Code};
use crate::handlers::blocking;
use crate::state::AppState;
use axum::body::Bytes;
use axum::extract::rejection::JsonRejection;
use axum::extract::{Path, Query, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use ld_core::gallery::{GalleryError, ImagePage, ImageQuery, ImageRecord};
use serde::Deserialize;
use serde_json::{json, Value};
use std::hash::{Hash, Hasher};
use std::io::Read;

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

/// Each gallery failure with the status and hint that fit it: only failures of the disk or the
/// index are the server's fault.
fn gallery_error(e: GalleryError) -> ApiError {
    match e {
        GalleryError::NotFound { .. } => not_found(),
        GalleryError::FileMissing { path } => ApiError::new(
            Code::NotFound,
            format!("The picture's file {} is missing.", path.display()),
            "It was moved or deleted outside the app. Restart the app to bring the gallery up \
             to date.",
        ),
        GalleryError::RestoreConflict { path } => ApiError::new(
            Code::Conflict,
            format!(
                "The picture cannot be restored: {} already exists.",
                path.display()
            ),
            "Move or rename that file, then restore the picture again.",
        ),
        GalleryError::Thumbnail { path, source } => {
            // The decoder's words ("CRC error in chunk IDAT") help a bug report, not the user.
            tracing::warn!(path = %path.display(), error = %source, "unreadable image");
            ApiError::new(
                Code::InvalidRequest,
                format!("The picture {} cannot be read.", path.display()),
                "The file is damaged. Open it in an image editor and save it again, or move it \
                 to the trash.",
            )
        }
        e => {
            tracing::error!(error = %e, "gallery failure");
            ApiError::new(
                Code::Internal,
                format!("The gallery could not do this: {e}"),
                "Check that the disk is not full and the data folder is writable.",
            )
        }
    }
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
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    blocking(move || {
        let r = record(&state, &id)?;
        let path = state.gallery().file_path(&r);
        serve_png(&path, &headers, Some(&format!("{}.png", r.id)))
    })
    .await
}

pub async fn thumbnail(
    State(state): State<AppState>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    blocking(move || {
        let r = record(&state, &id)?;
        let path = state.gallery().thumbnail_path(&r).map_err(gallery_error)?;
        serve_png(&path, &headers, None)
    })
    .await
}

/// The PNG at `path`. The file under an id can change (edited outside the app, a rebuilt
/// index), so it is never cached as immutable: the browser keeps it but asks again each time
/// with the entity tag, and an unchanged file costs a bodiless 304.
fn serve_png(
    path: &std::path::Path,
    request: &HeaderMap,
    name: Option<&str>,
) -> Result<Response, ApiError> {
    let open_err = |e: std::io::Error| {
        if e.kind() == std::io::ErrorKind::NotFound {
            gallery_error(GalleryError::FileMissing {
                path: path.to_path_buf(),
            })
        } else {
            ApiError::internal(format!("reading {}: {e}", path.display()))
        }
    };
    // Size and time come from the open file, so the tag belongs to the bytes read even when the
    // file is replaced meanwhile.
    let mut file = std::fs::File::open(path).map_err(open_err)?;
    let meta = file.metadata().map_err(open_err)?;
    let etag = entity_tag(path, &meta);
    let mut res = if matches_etag(request, &etag) {
        StatusCode::NOT_MODIFIED.into_response()
    } else {
        let mut bytes = Vec::new();
        file.read_to_end(&mut bytes).map_err(open_err)?;
        ([(header::CONTENT_TYPE, "image/png")], bytes).into_response()
    };
    let headers = res.headers_mut();
    headers.insert(
        header::CACHE_CONTROL,
        HeaderValue::from_static("private, no-cache"),
    );
    if let Ok(v) = HeaderValue::from_str(&etag) {
        headers.insert(header::ETAG, v);
    }
    if let Some(n) = name {
        if let Ok(v) = format!("inline; filename=\"{n}\"").parse() {
            headers.insert(header::CONTENT_DISPOSITION, v);
        }
    }
    Ok(res)
}

/// A tag that changes whenever the file is rewritten (size or modified time) or the id names
/// another file (the path).
fn entity_tag(path: &std::path::Path, meta: &std::fs::Metadata) -> String {
    let mtime_ns = meta
        .modified()
        .ok()
        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
        .map_or(0, |d| d.as_nanos());
    let mut h = std::collections::hash_map::DefaultHasher::new();
    (path, meta.len(), mtime_ns).hash(&mut h);
    format!("\"{:016x}\"", h.finish())
}

/// Whether an `If-None-Match` header names `etag` (weakly or strongly) or is `*`.
fn matches_etag(headers: &HeaderMap, etag: &str) -> bool {
    headers
        .get_all(header::IF_NONE_MATCH)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .any(|tag| tag == "*" || tag.strip_prefix("W/").unwrap_or(tag) == etag)
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
