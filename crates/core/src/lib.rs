//! ld-core: the app's use cases, shared by the server, the CLI and the desktop shell.

pub mod datadir;
pub mod hardware;
pub mod image_file;
pub mod infotext;
pub mod settings;

mod fsutil;
