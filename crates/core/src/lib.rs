//! ld-core: the app's use cases, shared by the server, the CLI and the desktop shell.

pub mod catalog;
pub mod characters;
pub mod chat;
pub mod compose;
pub mod datadir;
pub mod diagnostics;
pub mod download;
pub mod gallery;
pub mod hardware;
pub mod hashes;
pub mod image_file;
pub mod infotext;
pub mod jobs;
pub mod metadata;
pub mod models;
pub mod presets;
pub mod settings;
pub mod vae;

mod fsutil;
