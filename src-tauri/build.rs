//! Generates the Tauri context (config, icons, capabilities, embedded splash assets).

fn main() {
    tauri_build::build()
}
