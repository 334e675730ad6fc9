//! Route handlers, one module per resource, named by verb.

pub mod a1111;
pub mod characters;
pub mod diagnostics;
pub mod health;
pub mod images;
pub mod jobs;
pub mod models;
pub mod openai;
pub mod presets;
pub mod settings;
pub mod system;

use crate::error::ApiError;

/// Runs file-system and database work (gallery, presets, characters) off the async runtime's
/// threads, so a slow disk never stalls other requests.
pub async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, ApiError> + Send + 'static,
) -> Result<T, ApiError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(ApiError::internal)?
}
