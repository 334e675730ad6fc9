//! What every handler shares: the data folder, the settings, the per-launch session token and the
//! address rules the guard enforces.

use ld_core::datadir::DataDir;
use ld_core::hardware::{GpuProbe, NvmlProbe};
use ld_core::settings::Settings;
use std::sync::{Arc, RwLock};

#[derive(Clone)]
pub struct AppState {
    inner: Arc<Inner>,
}

struct Inner {
    data: DataDir,
    session_token: String,
    port: u16,
    api_key: Option<String>,
    settings: RwLock<Settings>,
    settings_warning: Option<String>,
    gpu: Arc<dyn GpuProbe>,
}

impl AppState {
    /// `port` is the port actually bound: the guard accepts only Host headers naming it.
    pub fn new(data: DataDir, port: u16, api_key: Option<String>) -> Self {
        Self::with_probe(data, port, api_key, Arc::new(NvmlProbe::default()))
    }

    pub fn with_probe(
        data: DataDir,
        port: u16,
        api_key: Option<String>,
        gpu: Arc<dyn GpuProbe>,
    ) -> Self {
        let loaded = ld_core::settings::load(&data.settings_file());
        Self {
            inner: Arc::new(Inner {
                session_token: new_token(),
                data,
                port,
                api_key,
                settings: RwLock::new(loaded.settings),
                settings_warning: loaded.warning,
                gpu,
            }),
        }
    }

    pub fn data(&self) -> &DataDir {
        &self.inner.data
    }
    pub fn session_token(&self) -> &str {
        &self.inner.session_token
    }
    pub fn port(&self) -> u16 {
        self.inner.port
    }
    pub fn api_key(&self) -> Option<&str> {
        self.inner.api_key.as_deref()
    }
    pub fn gpu(&self) -> Arc<dyn GpuProbe> {
        self.inner.gpu.clone()
    }
    pub fn settings(&self) -> Settings {
        self.inner
            .settings
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }
    pub fn settings_warning(&self) -> Option<&str> {
        self.inner.settings_warning.as_deref()
    }
    pub fn set_settings(&self, s: Settings) {
        *self
            .inner
            .settings
            .write()
            .unwrap_or_else(|p| p.into_inner()) = s;
    }
}

/// 256 random bits, hex: unguessable by a web page that cannot read our index.html.
fn new_token() -> String {
    use rand::RngCore;
    let mut b = [0u8; 32];
    rand::rng().fill_bytes(&mut b);
    b.iter().map(|x| format!("{x:02x}")).collect()
}
