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
    OutOfMemory,
    Cancelled,
    Busy,
    Internal,
}

impl Code {
    fn status(self) -> StatusCode {
        match self {
            Code::InvalidRequest => StatusCode::BAD_REQUEST,
            Code::Unauthorized => StatusCode::UNAUTHORIZED,
            Code::Forbidden => StatusCode::FORBIDDEN,
            Code::NotFound | Code::ModelMissing => StatusCode::NOT_FOUND,
            Code::OutOfMemory | Code::Internal => StatusCode::INTERNAL_SERVER_ERROR,
            Code::Cancelled => StatusCode::CONFLICT,
            Code::Busy => StatusCode::TOO_MANY_REQUESTS,
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct ApiError {
    pub code: Code,
    pub message: String,
    pub hint: String,
}

impl ApiError {
    pub fn new(code: Code, message: impl Into<String>, hint: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
            hint: hint.into(),
        }
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
        (self.code.status(), axum::Json(self)).into_response()
    }
}
