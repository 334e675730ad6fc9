//! ld-server: the local HTTP server (native API, later the A1111 and OpenAI compatible APIs), its
//! localhost guard, the embedded web UI, and the `local-diffusers` command line.

mod device;
pub mod error;
pub mod guard;
mod handlers;
pub mod router;
pub mod serve;
pub mod state;
mod static_ui;

/// For the desktop app's `main`, which links the engine only through this crate.
pub use ld_engine::memory::keep_freed_buffers;
pub use router::app;
pub use serve::{bind, ServeOptions, Server};
pub use state::{AppState, StateOptions};

/// The GPU back ends compiled into this binary.
pub const BUILD: ld_core::hardware::BuildInfo = ld_core::hardware::BuildInfo {
    cuda: cfg!(feature = "cuda"),
    metal: cfg!(feature = "metal"),
};
