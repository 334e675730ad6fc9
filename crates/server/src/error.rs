//! The one error shape every route answers with: `{code, message, hint}`. The UI switches on
//! `code`, never on the message text.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::Serialize;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Code {
    InvalidRequest,
    Unauthorized,
    Forbidden,
    NotFound,
    ModelMissing,
    ModelBroken,
    OutOfMemory,
    Cancelled,
    Busy,
    TooLarge,
    /// The request clashes with what is there now (restoring over a file of the same name).
    Conflict,
    Internal,
}

impl Code {
    fn status(self) -> StatusCode {
        match self {
            Code::InvalidRequest => StatusCode::BAD_REQUEST,
            Code::Unauthorized => StatusCode::UNAUTHORIZED,
            Code::Forbidden => StatusCode::FORBIDDEN,
            Code::NotFound | Code::ModelMissing => StatusCode::NOT_FOUND,
            Code::ModelBroken | Code::OutOfMemory | Code::Internal => {
                StatusCode::INTERNAL_SERVER_ERROR
            }
            Code::Cancelled | Code::Conflict => StatusCode::CONFLICT,
            Code::Busy => StatusCode::TOO_MANY_REQUESTS,
            Code::TooLarge => StatusCode::PAYLOAD_TOO_LARGE,
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct ApiError {
    pub code: Code,
    pub message: String,
    pub hint: String,
    /// Seconds for a `Retry-After` header (a full queue).
    #[serde(skip)]
    pub retry_after: Option<u64>,
}

impl ApiError {
    pub fn new(code: Code, message: impl Into<String>, hint: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
            hint: hint.into(),
            retry_after: None,
        }
    }

    /// A JSON body that could not be read into the expected shape.
    pub fn bad_json(e: &axum::extract::rejection::JsonRejection, hint: &str) -> Self {
        if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
            return Self::new(
                Code::TooLarge,
                "The request is too large.",
                "Send less: prompts are limited to 10,000 characters.",
            );
        }
        Self::new(
            Code::InvalidRequest,
            format!("The request could not be read: {}", e.body_text()),
            hint,
        )
    }

    /// A job failure from the service, with its code mapped onto ours.
    pub fn from_job(e: &ld_core::jobs::JobError) -> Self {
        let code = match e.code {
            "invalid_request" => Code::InvalidRequest,
            "out_of_memory" => Code::OutOfMemory,
            "model_broken" => Code::ModelBroken,
            _ => Code::Internal,
        };
        Self::new(code, e.message.clone(), e.hint.clone())
    }

    /// An unexpected failure: the detail goes to the log, the caller gets no internals.
    pub fn internal(detail: impl std::fmt::Display) -> Self {
        tracing::error!(%detail, "internal error");
        Self::new(
            Code::Internal,
            "Something went wrong inside Local Diffusers.",
            "Try again. If it keeps happening, open Diagnostics and copy the report.",
        )
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let retry = self.retry_after;
        let mut res = (self.code.status(), axum::Json(self)).into_response();
        if let Some(secs) = retry {
            res.headers_mut()
                .insert(axum::http::header::RETRY_AFTER, secs.into());
        }
        res
    }
}

impl From<ld_core::compose::ComposeError> for ApiError {
    fn from(e: ld_core::compose::ComposeError) -> Self {
        use ld_core::compose::ComposeErrorKind as K;
        let code = match e.kind {
            K::Invalid => Code::InvalidRequest,
            K::NoModel | K::UnknownModel => Code::ModelMissing,
            K::UnknownPreset => Code::NotFound,
        };
        Self::new(code, e.message, e.hint)
    }
}

impl From<ld_core::jobs::SubmitError> for ApiError {
    fn from(e: ld_core::jobs::SubmitError) -> Self {
        match e {
            ld_core::jobs::SubmitError::QueueFull {
                capacity,
                retry_after,
            } => {
                let mut err = Self::new(
                    Code::Busy,
                    format!("{capacity} pictures are already waiting to be drawn."),
                    "Wait for some to finish, then try again.",
                );
                err.retry_after = Some(retry_after.as_secs().max(1));
                err
            }
        }
    }
}
