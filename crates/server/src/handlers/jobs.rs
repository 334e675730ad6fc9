//! `/api/v1/jobs` and `/api/v1/events`: queue a generation, watch it, cancel it. The same service
//! backs the A1111 and OpenAI routes.

use crate::error::{ApiError, Code};
use crate::state::AppState;
use axum::extract::rejection::JsonRejection;
use axum::extract::{Path, State};
use axum::http::{header, StatusCode};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::Json;
use ld_core::compose::GenerationInput;
use ld_core::jobs::{JobInfo, JobService};
use std::convert::Infallible;
use std::time::Duration;
use tokio_stream::wrappers::BroadcastStream;
use tokio_stream::{Stream, StreamExt};

pub async fn create(
    State(state): State<AppState>,
    body: Result<Json<GenerationInput>, JsonRejection>,
) -> Result<(StatusCode, Json<JobInfo>), ApiError> {
    let Json(input) = body.map_err(|e| {
        ApiError::bad_json(
            &e,
            "Send JSON like {\"prompt\": \"a lighthouse at dusk\"}; see the README for the fields.",
        )
    })?;
    let info = submit(&state, input).await?;
    Ok((StatusCode::ACCEPTED, Json(info)))
}

/// Composes (file reads: off the runtime) and queues.
pub async fn submit(state: &AppState, input: GenerationInput) -> Result<JobInfo, ApiError> {
    submit_noted(state, input, Vec::new()).await
}

/// [`submit`], the job carrying `notes` (what an API edge chose in place of what was asked).
pub async fn submit_noted(
    state: &AppState,
    input: GenerationInput,
    mut notes: Vec<String>,
) -> Result<JobInfo, ApiError> {
    notes.extend(ld_core::compose::hires_note(&input));
    let s = state.clone();
    let composed = tokio::task::spawn_blocking(move || s.compose(&input))
        .await
        .map_err(ApiError::internal)??;
    let info = state.jobs().submit(composed)?;
    for note in notes {
        state.jobs().add_note(&info.id, &note);
    }
    Ok(info)
}

pub async fn list(State(state): State<AppState>) -> Json<Vec<JobInfo>> {
    Json(state.jobs().list())
}

pub async fn get(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<JobInfo>, ApiError> {
    state.jobs().get(&id).map(Json).ok_or_else(|| no_job(&id))
}

pub async fn cancel(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<JobInfo>, ApiError> {
    state
        .jobs()
        .cancel(&id)
        .map(Json)
        .ok_or_else(|| no_job(&id))
}

/// The latest preview of a running job as a PNG.
pub async fn preview(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let png = state.jobs().preview(&id).ok_or_else(|| {
        ApiError::new(
            Code::NotFound,
            "There is no preview for this job yet.",
            "Previews appear after the first few steps.",
        )
    })?;
    Ok((
        [
            (header::CONTENT_TYPE, "image/png"),
            (header::CACHE_CONTROL, "no-store"),
        ],
        png.as_ref().clone(),
    )
        .into_response())
}

fn no_job(id: &str) -> ApiError {
    // The id is echoed only after trimming to a sane length; it is never used as a path.
    let shown: String = id.chars().take(40).collect();
    ApiError::new(
        Code::NotFound,
        format!("There is no job '{shown}'."),
        "Finished jobs are kept for a while; list them with GET /api/v1/jobs.",
    )
}

/// Server-Sent Events: every job event as `event: <type>` with the JSON in `data`.
pub async fn events(
    State(state): State<AppState>,
) -> Sse<impl Stream<Item = Result<Event, Infallible>>> {
    let jobs = BroadcastStream::new(state.jobs().subscribe()).filter_map(|e| {
        // A slow listener that fell behind skips what it missed; the next event catches it up.
        let e = e.ok()?;
        let json = serde_json::to_value(&e).ok()?;
        let kind = json.get("type")?.as_str()?.to_owned();
        Some(Ok(Event::default().event(kind).data(json.to_string())))
    });
    let downloads = BroadcastStream::new(state.downloads().subscribe()).filter_map(|e| {
        let mut json = serde_json::to_value(&e.ok()?).ok()?;
        json["type"] = "download".into();
        Some(Ok(Event::default()
            .event("download")
            .data(json.to_string())))
    });
    let stream = jobs.merge(downloads);
    Sse::new(stream).keep_alive(KeepAlive::new().interval(Duration::from_secs(15)))
}

/// Cancels its job when dropped unless disarmed: a request handler that waits for its job holds
/// one, so a client that goes away (its future dropped) does not leave the GPU busy for nothing.
pub struct CancelOnDrop<'a> {
    jobs: &'a JobService,
    id: Option<String>,
}

impl<'a> CancelOnDrop<'a> {
    pub fn new(jobs: &'a JobService, id: &str) -> Self {
        Self {
            jobs,
            id: Some(id.to_owned()),
        }
    }
    pub fn disarm(mut self) {
        self.id = None;
    }
}

impl Drop for CancelOnDrop<'_> {
    fn drop(&mut self) {
        if let Some(id) = self.id.take() {
            tracing::info!(job = %id, "the client went away; cancelling its job");
            self.jobs.cancel(&id);
        }
    }
}

/// Waits for a job the caller owns; cancels it if the caller goes away first.
pub async fn wait_for(state: &AppState, id: &str) -> Result<JobInfo, ApiError> {
    let guard = CancelOnDrop::new(state.jobs(), id);
    let info = state
        .jobs()
        .wait(id)
        .await
        .ok_or_else(|| ApiError::internal(format!("job {id} vanished while waited for")))?;
    guard.disarm();
    Ok(info)
}
