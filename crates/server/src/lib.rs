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

/// The allocator setting the saved settings in `data_dir` call for, applied before the server's
/// threads start: with Low-VRAM mode On in a build that draws on the CPU, one malloc arena for
/// all threads ([`ld_engine::memory::share_one_arena`]), so memory freed between a job's stages
/// and between jobs goes back to the system. A change of the setting applies at the next start,
/// as the CPU's f16 weight storage does.
pub fn prepare_allocator(data_dir: Option<&std::path::Path>) {
    let Ok(data) = ld_core::datadir::DataDir::open(data_dir) else {
        return;
    };
    let settings = ld_core::settings::load(&data.settings_file()).settings;
    if settings.low_vram == ld_core::settings::LowVram::On && !BUILD.cuda && !BUILD.metal {
        ld_engine::memory::share_one_arena();
    }
}
pub use router::app;
pub use serve::{bind, ServeOptions, Server};
pub use state::{AppState, StateOptions};

/// The GPU back ends compiled into this binary.
pub const BUILD: ld_core::hardware::BuildInfo = ld_core::hardware::BuildInfo {
    cuda: cfg!(feature = "cuda"),
    metal: cfg!(feature = "metal"),
};
