//! Runs ld-server in-process on its own thread and tokio runtime, so Tauri's main thread never
//! waits on it, and stops it when the app exits.

use anyhow::Context;
use std::path::PathBuf;
use std::sync::mpsc;
use std::sync::Mutex;
use std::time::Duration;
use tokio::sync::oneshot;

/// What the server thread reports to the shell.
pub enum Event {
    /// Bound and serving; the URL to open.
    Ready(String),
    /// Could not start, or stopped with an error.
    Failed(anyhow::Error),
}

/// The running server thread. Kept in Tauri's state so the exit handler can stop it.
pub struct ServerThread {
    stop: Mutex<Option<oneshot::Sender<()>>>,
    finished: Mutex<mpsc::Receiver<()>>,
}

/// Starts the server thread; `on_event` is called on that thread, once with `Ready` or `Failed`,
/// and once more with `Failed` if a running server stops with an error.
pub fn spawn(
    data_dir: Option<PathBuf>,
    on_event: impl Fn(Event) + Send + 'static,
) -> anyhow::Result<ServerThread> {
    let (stop_tx, stop_rx) = oneshot::channel::<()>();
    let (finished_tx, finished_rx) = mpsc::channel::<()>();
    std::thread::Builder::new()
        .name("ld-server".into())
        .spawn(move || {
            if let Err(e) = serve(data_dir, stop_rx, &on_event) {
                on_event(Event::Failed(e));
            }
            let _ = finished_tx.send(());
        })
        .context("could not start the server thread")?;
    Ok(ServerThread {
        stop: Mutex::new(Some(stop_tx)),
        finished: Mutex::new(finished_rx),
    })
}

fn serve(
    data_dir: Option<PathBuf>,
    stop: oneshot::Receiver<()>,
    on_event: &impl Fn(Event),
) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Runtime::new().context("could not start the async runtime")?;
    runtime.block_on(async move {
        let data = ld_core::datadir::DataDir::open(data_dir.as_deref())?;
        let server = ld_server::bind(ld_server::ServeOptions::local(data)).await?;
        let url = server.url().to_owned();
        // The desktop smoke test (and anyone scripting the app) reads this line, as with the CLI.
        println!("Local Diffusers is running at {url}");
        tracing::info!("serving the UI at {url}");
        on_event(Event::Ready(url));
        server
            .run_until(async {
                // A dropped sender (the app went away without stopping us) also ends the server.
                let _ = stop.await;
            })
            .await
    })
}

impl ServerThread {
    /// Asks the server to finish its in-flight requests and waits up to `grace` for it; the
    /// process may then exit anyway (an open event stream from the window would otherwise keep
    /// graceful shutdown waiting).
    pub fn stop(&self, grace: Duration) {
        if let Some(tx) = self.stop.lock().unwrap_or_else(|e| e.into_inner()).take() {
            let _ = tx.send(());
        }
        let finished = self.finished.lock().unwrap_or_else(|e| e.into_inner());
        if let Err(mpsc::RecvTimeoutError::Timeout) = finished.recv_timeout(grace) {
            tracing::warn!("the server did not stop within {grace:?}; exiting anyway");
        }
    }
}
