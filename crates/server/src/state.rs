//! What every handler shares: the data folder, the settings, the generation service, the gallery,
//! the presets, the per-launch session token and the address rules the guard enforces.

use anyhow::Context;
use ld_core::characters::CharacterStore;
use ld_core::compose::{self, ComposeError, ComposedJob, GenerationInput};
use ld_core::datadir::DataDir;
use ld_core::download::manager::Downloads;
use ld_core::download::Hub;
use ld_core::gallery::Gallery;
use ld_core::hardware::{GpuProbe, NvmlProbe};
use ld_core::jobs::{JobService, ServiceConfig};
use ld_core::models::ModelInfo;
use ld_core::presets::{Preset, PresetStore};
use ld_core::settings::Settings;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard, RwLock};

/// How the server state is built; [`StateOptions::new`] gives the defaults.
pub struct StateOptions {
    pub data: DataDir,
    /// The port actually bound: the guard accepts only Host headers naming it.
    pub port: u16,
    pub api_key: Option<String>,
    /// Model folders from the command line (`--models-dir`), on top of the settings' list.
    pub models_dirs: Vec<PathBuf>,
    pub gpu: Arc<dyn GpuProbe>,
    /// Jobs that may wait in the queue.
    pub queue_capacity: usize,
    /// Where models are downloaded from; `None`: `HF_ENDPOINT` or the Hugging Face hub.
    pub hub_endpoint: Option<String>,
}

impl StateOptions {
    pub fn new(data: DataDir, port: u16) -> Self {
        Self {
            data,
            port,
            api_key: None,
            models_dirs: Vec::new(),
            gpu: Arc::new(NvmlProbe::default()),
            queue_capacity: 16,
            hub_endpoint: None,
        }
    }
}

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
    /// Held from reading the settings to installing the saved ones ([`AppState::change_settings`]),
    /// so two changes at once (the UI's and a chat app's model switch) cannot undo each other or
    /// leave the file and the running app disagreeing.
    settings_change: Mutex<()>,
    settings_warning: Option<String>,
    gpu: Arc<dyn GpuProbe>,
    models_dirs: Vec<PathBuf>,
    jobs: JobService,
    presets: Mutex<PresetStore>,
    characters: CharacterStore,
    downloads: Downloads,
    /// Problems found while starting (a rebuilt gallery index, broken preset files), shown in
    /// Diagnostics.
    startup_warnings: Vec<String>,
}

impl AppState {
    /// Opens the gallery and presets and starts the generation worker.
    pub fn open(opts: StateOptions) -> anyhow::Result<Self> {
        let loaded = ld_core::settings::load(&opts.data.settings_file());
        let mut warnings = Vec::new();
        let (gallery, report) = Gallery::open(&opts.data.gallery(), &opts.data.gallery_index())
            .with_context(|| {
                format!(
                    "the gallery in {} could not be opened",
                    opts.data.gallery().display()
                )
            })?;
        if report.added + report.removed > 0 {
            tracing::info!(
                added = report.added,
                removed = report.removed,
                "gallery index brought up to date with the folder"
            );
        }
        warnings.extend(report.warnings.iter().cloned());
        let presets = PresetStore::open(&opts.data.presets()).with_context(|| {
            format!(
                "the presets in {} could not be read",
                opts.data.presets().display()
            )
        })?;
        warnings.extend(presets.warnings().iter().cloned());
        let characters = CharacterStore::open(&opts.data.characters()).with_context(|| {
            format!(
                "the characters in {} could not be read",
                opts.data.characters().display()
            )
        })?;
        warnings.extend(characters.warnings().iter().cloned());
        let hub = match &opts.hub_endpoint {
            Some(url) => Hub::new(url, std::env::var("HF_TOKEN").ok()),
            None => Hub::from_env(),
        }
        .context("the download client could not start")?;
        let downloads = Downloads::new(hub, opts.data.models());
        let jobs = JobService::new(
            Arc::new(gallery),
            ServiceConfig {
                capacity: opts.queue_capacity,
                load: crate::device::load_options_with(
                    loaded.settings.precision,
                    loaded.settings.low_vram,
                    crate::device::gpu_advised(&*opts.gpu),
                ),
                hash_cache: Some(opts.data.root().join("hashes.json")),
            },
        );
        jobs.set_memory_policy(crate::device::memory_policy(
            &loaded.settings,
            opts.gpu.clone(),
        ));
        apply_cpu_bf16(&loaded.settings);
        Ok(Self {
            inner: Arc::new(Inner {
                session_token: new_token(),
                data: opts.data,
                port: opts.port,
                api_key: opts.api_key,
                settings: RwLock::new(loaded.settings),
                settings_change: Mutex::new(()),
                settings_warning: loaded.warning,
                gpu: opts.gpu,
                models_dirs: opts.models_dirs,
                jobs,
                presets: Mutex::new(presets),
                characters,
                downloads,
                startup_warnings: warnings,
            }),
        })
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
    pub fn jobs(&self) -> &JobService {
        &self.inner.jobs
    }
    pub fn gallery(&self) -> &Arc<Gallery> {
        self.inner.jobs.gallery()
    }
    pub fn presets(&self) -> MutexGuard<'_, PresetStore> {
        self.inner.presets.lock().unwrap_or_else(|p| p.into_inner())
    }
    pub fn downloads(&self) -> &Downloads {
        &self.inner.downloads
    }
    pub fn characters(&self) -> &CharacterStore {
        &self.inner.characters
    }
    pub fn startup_warnings(&self) -> &[String] {
        &self.inner.startup_warnings
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
    /// Changes the settings with `change` (given the current ones), saves them to the settings
    /// file and puts them in use, as one step against other changes. Blocking (disk I/O). Nothing
    /// changes when the save fails.
    pub fn change_settings(
        &self,
        change: impl FnOnce(&mut Settings),
    ) -> Result<Settings, ld_core::settings::SettingsError> {
        let _one_at_a_time = self
            .inner
            .settings_change
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        let mut settings = self.settings();
        change(&mut settings);
        ld_core::settings::save(&self.data().settings_file(), &settings)?;
        self.set_settings(settings.clone());
        Ok(settings)
    }

    pub fn set_settings(&self, s: Settings) {
        // Low-VRAM mode applies from the next job; precision, and the CPU's f16 weight storage
        // that low-VRAM mode turns on (`device::load_options_with`), from the next start.
        self.inner
            .jobs
            .set_memory_policy(crate::device::memory_policy(&s, self.gpu()));
        // The bf16 products, from the next matrix product on.
        apply_cpu_bf16(&s);
        *self
            .inner
            .settings
            .write()
            .unwrap_or_else(|p| p.into_inner()) = s;
    }

    /// Every installed model: the data folder's, the command line's folders, the settings' folders.
    pub fn models(&self) -> Vec<ModelInfo> {
        self.models_with(&self.settings(), None)
    }

    /// [`Self::models`] under `settings`; `vaes`: the VAE files already listed (a caller that
    /// needs both walks the VAE folders once; `None`: listed here when a model needs them).
    fn models_with(
        &self,
        settings: &Settings,
        vaes: Option<&[ld_core::vae::VaeFile]>,
    ) -> Vec<ModelInfo> {
        let mut models = ld_core::models::scan(&self.inner.data.models(), &self.user_roots());
        if models.iter().any(|m| m.needs_vae) {
            match vaes {
                Some(vaes) => ld_core::vae::usable_with(&mut models, &settings.vae, vaes),
                None => ld_core::vae::usable_with(&mut models, &settings.vae, &self.vaes()),
            }
        }
        for m in models.iter_mut().filter(|m| m.path.is_file()) {
            m.sha256 = self.jobs().hashes().peek_sha256(&m.path);
            m.short_hash = m.sha256.as_deref().map(ld_core::hashes::autov2);
        }
        models
    }

    /// Every folder the user added (command line and settings).
    pub fn user_roots(&self) -> Vec<PathBuf> {
        let mut dirs = self.inner.models_dirs.clone();
        dirs.extend(self.settings().models_dirs);
        dirs
    }

    /// LoRA files by name.
    pub fn loras(&self) -> Vec<ld_core::models::NetworkFile> {
        ld_core::models::network_files(&ld_core::models::lora_dirs(
            self.inner.data.root(),
            &self.user_roots(),
        ))
    }

    /// Textual-inversion embeddings by name.
    pub fn embeddings(&self) -> Vec<ld_core::models::NetworkFile> {
        ld_core::models::network_files(&ld_core::models::embedding_dirs(
            self.inner.data.root(),
            &self.user_roots(),
        ))
    }

    /// The VAE files the "SD VAE" setting may name (data folder, model folders, added folders).
    pub fn vaes(&self) -> Vec<ld_core::vae::VaeFile> {
        #[cfg(test)]
        tests::VAE_LISTINGS.with(|n| n.set(n.get() + 1));
        ld_core::vae::vae_files(&ld_core::vae::vae_dirs(
            self.inner.data.root(),
            &self.inner.data.models(),
            &self.user_roots(),
        ))
    }

    /// The model new jobs use when they name none.
    pub fn default_model(&self) -> Option<ModelInfo> {
        self.default_model_in(&self.models())
    }

    /// [`Self::default_model`] among `models` (a list just scanned, not scanned again).
    pub fn default_model_in(&self, models: &[ModelInfo]) -> Option<ModelInfo> {
        compose::choose_model(None, &self.settings(), models)
            .ok()
            .cloned()
    }

    pub fn all_presets(&self) -> Vec<Preset> {
        self.presets().list()
    }

    /// Composes a request with the current settings, presets and models (blocking file reads:
    /// call from `spawn_blocking` or accept the few milliseconds).
    pub fn compose(&self, input: &GenerationInput) -> Result<ComposedJob, ComposeError> {
        // One read of the settings and one walk of the VAE folders for both the models'
        // usability and the job's VAE choice.
        let settings = self.settings();
        let vaes = self.vaes();
        let models = self.models_with(&settings, Some(&vaes));
        let networks = compose::Networks {
            loras: self.loras(),
            embedding_dirs: ld_core::models::embedding_dirs(
                self.inner.data.root(),
                &self.user_roots(),
            ),
            vaes,
        };
        compose::compose(input, &settings, &self.all_presets(), &models, &networks)
    }
}

/// 256 random bits, hex: unguessable by a web page that cannot read our index.html.
fn new_token() -> String {
    use rand::RngCore;
    let mut b = [0u8; 32];
    rand::rng().fill_bytes(&mut b);
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// The settings' "Faster drawing on this processor" (a no-op where the CPU has no AVX-512 BF16).
fn apply_cpu_bf16(s: &Settings) {
    ld_engine::bf16_gemm::set_enabled(s.cpu_bf16);
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::cell::Cell;

    thread_local! {
        /// How often this thread listed the VAE files ([`AppState::vaes`]).
        pub(crate) static VAE_LISTINGS: Cell<usize> = const { Cell::new(0) };
    }

    #[test]
    fn composing_for_a_checkpoint_lacking_its_vae_lists_vae_files_once() {
        use candle_core::{Device, Tensor};
        let dir = tempfile::tempdir().unwrap();
        let data = DataDir::open(Some(dir.path())).unwrap();
        // An SD1 single file with a UNet and a text encoder but no VAE (the names decide).
        let t = |shape: &[usize]| Tensor::zeros(shape, candle_core::DType::F32, &Device::Cpu);
        let tensors = std::collections::HashMap::from([
            (
                "model.diffusion_model.input_blocks.0.0.weight".to_string(),
                t(&[4, 4, 3, 3]).unwrap(),
            ),
            (
                "cond_stage_model.transformer.text_model.final_layer_norm.weight".to_string(),
                t(&[4]).unwrap(),
            ),
        ]);
        let file = data.models().join("lacking.safetensors");
        candle_core::safetensors::save(&tensors, &file).unwrap();
        let state = AppState::open(StateOptions::new(data, 7860)).unwrap();
        let models = state.models();
        assert!(
            models.iter().any(|m| m.name == "lacking" && m.needs_vae),
            "{models:?}"
        );

        VAE_LISTINGS.with(|n| n.set(0));
        let input = GenerationInput {
            prompt: "a cat".into(),
            ..Default::default()
        };
        // It cannot be drawn without a VAE; what counts here is the folders walked.
        let _ = state.compose(&input);
        assert_eq!(VAE_LISTINGS.with(Cell::get), 1);
    }
}
