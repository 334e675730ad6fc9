//! ld-core: the app's use cases, shared by the server, the CLI and the desktop shell.
