//! The Local Diffusers desktop app: a thin Tauri shell that starts ld-server in-process on
//! 127.0.0.1 and opens a window at it. All behaviour lives in the server and the web UI.

// No console window on Windows release builds.
#![cfg_attr(not(debug_assertions), windows_subsystem = "windows")]

mod args;
mod server;
mod window;

use anyhow::Context;
use std::io::IsTerminal;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tauri::{AppHandle, Manager, RunEvent};

/// How long the server may take to finish in-flight requests when the window closes.
const STOP_GRACE: Duration = Duration::from_secs(3);

fn main() -> ExitCode {
    ld_server::keep_freed_buffers();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        // Plain text when the log goes to a file (the smoke test, a desktop launcher's journal).
        .with_ansi(std::io::stderr().is_terminal())
        .init();
    let opts = match args::parse(std::env::args_os().skip(1)) {
        Ok(args::Command::Run(opts)) => opts,
        Ok(args::Command::Help) => {
            print!("{}", args::USAGE);
            return ExitCode::SUCCESS;
        }
        Ok(args::Command::Version) => {
            println!("local-diffusers-desktop {}", env!("CARGO_PKG_VERSION"));
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            eprintln!("local-diffusers-desktop: {e:#}\n\n{}", args::USAGE);
            return ExitCode::from(2);
        }
    };
    match run(opts) {
        Ok(code) => code,
        Err(e) => {
            tracing::error!("{e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(opts: args::Options) -> anyhow::Result<ExitCode> {
    // Before the window's and the server's threads start.
    ld_server::prepare_allocator(opts.data_dir.as_deref());
    let failed = Arc::new(AtomicBool::new(false));
    let failed_in_setup = failed.clone();
    let app = tauri::Builder::default()
        // First, so a second launch hands over to the running app before anything else starts
        // (plugins are set up in build(); the server starts later, in setup).
        .plugin(tauri_plugin_single_instance::init(|app, _argv, _cwd| {
            window::focus_existing(app);
        }))
        .plugin(tauri_plugin_opener::init())
        .setup(move |app| {
            let handle = app.handle().clone();
            let failed_later = failed_in_setup.clone();
            let started = server::spawn(opts.data_dir, move |event| {
                on_server_event(&handle, &failed_later, event)
            });
            match started {
                Ok(thread) => {
                    app.manage(thread);
                }
                Err(e) => on_server_event(app.handle(), &failed_in_setup, server::Event::Failed(e)),
            }
            Ok(())
        })
        .build(tauri::generate_context!())
        .context("could not start the desktop window")?;
    let code = app.run_return(|app, event| {
        if let RunEvent::Exit = event {
            if let Some(server) = app.try_state::<server::ServerThread>() {
                server.stop(STOP_GRACE);
            }
        }
    });
    Ok(if failed.load(Ordering::SeqCst) {
        ExitCode::FAILURE
    } else {
        ExitCode::from(u8::try_from(code).unwrap_or(1))
    })
}

/// Called on the server thread; windows are made on the main thread.
fn on_server_event(app: &AppHandle, failed: &AtomicBool, event: server::Event) {
    if let server::Event::Failed(_) = event {
        failed.store(true, Ordering::SeqCst);
    }
    let handle = app.clone();
    let scheduled = app.run_on_main_thread(move || {
        let shown = match &event {
            server::Event::Ready(url) => window::open_main(&handle, url),
            server::Event::Failed(e) => {
                tracing::error!("the app's server failed: {e:#}");
                window::open_error(&handle, e)
            }
        };
        if let Err(e) = shown {
            tracing::error!("could not open the window: {e:#}");
            handle.exit(1);
        }
    });
    if let Err(e) = scheduled {
        tracing::error!("the window system went away: {e}");
    }
}
