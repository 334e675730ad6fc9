//! Binding and running the server: 127.0.0.1 by default, port 7860 (what chat apps expect of an
//! A1111 server) when free, else the next free one. Used by `local-diffusers serve` and by the
//! desktop shell, which runs the same server in-process.

use crate::state::AppState;
use anyhow::{bail, Context};
use ld_core::datadir::DataDir;
use std::future::Future;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use tokio::net::TcpListener;

/// The port A1111 listens on; chat apps default to it.
pub const DEFAULT_PORT: u16 = 7860;
/// How many ports after the default we try before giving up.
const PORT_SEARCH: u16 = 40;

pub struct ServeOptions {
    pub host: IpAddr,
    /// `None`: 7860 or the next free port. `Some(0)`: any free port. `Some(p)`: exactly `p`.
    pub port: Option<u16>,
    /// Required when `host` is not a loopback address.
    pub api_key: Option<String>,
    pub data: DataDir,
    /// Extra model folders (`--models-dir`), used in place.
    pub models_dirs: Vec<std::path::PathBuf>,
}

impl ServeOptions {
    pub fn local(data: DataDir) -> Self {
        Self {
            host: IpAddr::V4(Ipv4Addr::LOCALHOST),
            port: None,
            api_key: None,
            data,
            models_dirs: Vec::new(),
        }
    }
}

/// A bound server, ready to run.
pub struct Server {
    listener: TcpListener,
    state: AppState,
    url: String,
}

pub async fn bind(opts: ServeOptions) -> anyhow::Result<Server> {
    let loopback = opts.host.is_loopback();
    let api_key = opts.api_key.filter(|k| !k.is_empty());
    if !loopback && api_key.is_none() {
        bail!(
            "serving on {} would let other computers use this app; pass --api-key KEY as well \
             (chat apps then send it as 'Authorization: Bearer KEY', or as the password of \
             their A1111 API auth setting, user:KEY)",
            opts.host
        );
    }
    let listener = match opts.port {
        Some(p) => TcpListener::bind(SocketAddr::new(opts.host, p))
            .await
            .with_context(|| {
                format!(
                    "port {p} on {} is not free; choose another with --port",
                    opts.host
                )
            })?,
        None => first_free(opts.host).await?,
    };
    let port = listener.local_addr()?.port();
    let shown_host = if opts.host.is_unspecified() || loopback {
        "127.0.0.1".to_owned()
    } else {
        match opts.host {
            IpAddr::V6(a) => format!("[{a}]"),
            IpAddr::V4(a) => a.to_string(),
        }
    };
    let url = format!("http://{shown_host}:{port}/");
    let state = AppState::open(crate::StateOptions {
        api_key: if loopback { None } else { api_key },
        models_dirs: opts.models_dirs,
        ..crate::StateOptions::new(opts.data, port)
    })?;
    Ok(Server {
        listener,
        state,
        url,
    })
}

async fn first_free(host: IpAddr) -> anyhow::Result<TcpListener> {
    for p in DEFAULT_PORT..DEFAULT_PORT + PORT_SEARCH {
        if let Ok(l) = TcpListener::bind(SocketAddr::new(host, p)).await {
            return Ok(l);
        }
    }
    bail!(
        "ports {DEFAULT_PORT}-{} are all in use; choose one with --port",
        DEFAULT_PORT + PORT_SEARCH - 1
    )
}

impl Server {
    /// The address to open in a browser.
    pub fn url(&self) -> &str {
        &self.url
    }

    pub fn state(&self) -> &AppState {
        &self.state
    }

    /// Serve until `shutdown` completes.
    pub async fn run_until(
        self,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> anyhow::Result<()> {
        if let Some(w) = self.state.settings_warning() {
            tracing::warn!("{w}");
        }
        // With each connection's address, which the guard reads (`ConnectInfo`).
        let app = crate::app(self.state).into_make_service_with_connect_info::<SocketAddr>();
        axum::serve(self.listener, app)
            .with_graceful_shutdown(shutdown)
            .await
            .context("the server stopped with an error")
    }
}
