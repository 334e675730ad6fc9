//! Copies the built web UI (ui/dist) into OUT_DIR so it is embedded in the binary. When the UI has
//! not been built (a Rust-only checkout), a one-page notice is embedded instead of failing the
//! build, and it says which command builds the UI.

use std::path::{Path, PathBuf};

fn main() {
    let manifest = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").unwrap());
    let dist = manifest.join("../../ui/dist");
    let out = PathBuf::from(std::env::var("OUT_DIR").unwrap()).join("ui");
    println!("cargo:rerun-if-changed={}", dist.display());
    let _ = std::fs::remove_dir_all(&out);
    std::fs::create_dir_all(&out).unwrap();
    if dist.join("index.html").is_file() {
        copy_dir(&dist, &out);
        // Rebuild when any file of the UI changes, not only the folder's own entry.
        track(&dist);
    } else {
        println!("cargo:warning=ui/dist is missing: embedding a placeholder page (run `npm ci --prefix ui && npm run --prefix ui build`)");
        std::fs::write(
            out.join("index.html"),
            "<!doctype html><html><head><meta charset=\"utf-8\"><title>Local Diffusers</title></head>\
             <body><h1>Local Diffusers</h1><p>The web interface was not built into this copy. \
             Build it with <code>npm ci --prefix ui &amp;&amp; npm run --prefix ui build</code> \
             and rebuild the app.</p></body></html>",
        )
        .unwrap();
    }
}

fn copy_dir(from: &Path, to: &Path) {
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            std::fs::create_dir_all(&target).unwrap();
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), target).unwrap();
        }
    }
}

fn track(dir: &Path) {
    for entry in std::fs::read_dir(dir).unwrap().flatten() {
        let p = entry.path();
        println!("cargo:rerun-if-changed={}", p.display());
        if p.is_dir() {
            track(&p);
        }
    }
}
