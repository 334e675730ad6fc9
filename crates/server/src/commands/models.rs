//! `local-diffusers models list | catalog | download ID`: the model library from the command line,
//! with a progress bar for downloads.

use anyhow::{bail, Context};
use clap::Subcommand;
use indicatif::{ProgressBar, ProgressStyle};
use ld_core::datadir::DataDir;
use std::path::PathBuf;
use std::sync::atomic::AtomicBool;

#[derive(Subcommand, Debug)]
pub enum ModelsCommand {
    /// The installed models.
    List {
        /// Another folder of models; repeatable.
        #[arg(long = "models-dir", value_name = "DIR")]
        models_dirs: Vec<PathBuf>,
    },
    /// The recommended models you can download.
    Catalog,
    /// Convert a pickle checkpoint (.ckpt/.pt/.bin) to .safetensors without running it: only
    /// tensor data is read; anything else in the file is refused.
    Convert {
        /// The pickle file.
        file: PathBuf,
        /// Where to write (default: beside it, with .safetensors).
        #[arg(long, value_name = "FILE")]
        out: Option<PathBuf>,
    },
    /// Download a model from the catalog (resumes an interrupted download).
    Download {
        /// A catalog id, e.g. sd-turbo (see `models catalog`).
        id: String,
    },
}

pub fn run(cmd: ModelsCommand, data: &DataDir) -> anyhow::Result<()> {
    match cmd {
        ModelsCommand::List { mut models_dirs } => {
            models_dirs.extend(
                ld_core::settings::load(&data.settings_file())
                    .settings
                    .models_dirs,
            );
            let models = ld_core::models::scan(&data.models(), &models_dirs);
            if models.is_empty() {
                println!(
                    "No models installed. Download one with `local-diffusers models download sd-turbo`."
                );
            }
            for m in models {
                println!(
                    "{:<28} {:<5} {:>8.2} GB  {}",
                    m.name,
                    m.family.label(),
                    m.size_bytes as f64 / 1e9,
                    m.path.display()
                );
            }
            Ok(())
        }
        ModelsCommand::Convert { file, out } => {
            let out = out.unwrap_or_else(|| file.with_extension("safetensors"));
            if out == file {
                bail!("the output would overwrite {}; pass --out", file.display());
            }
            let done = ld_engine::pickle::convert_to_safetensors(&file, &out)
                .with_context(|| format!("could not convert {}", file.display()))?;
            println!(
                "Wrote {} ({} tensors, {:.2} GB)",
                done.path.display(),
                done.tensors,
                done.bytes as f64 / 1e9
            );
            Ok(())
        }
        ModelsCommand::Catalog => {
            for e in ld_core::catalog::entries() {
                println!(
                    "{:<18} {:<5} {:>5.1} GB  {}{}",
                    e.id,
                    e.family,
                    e.size_gb,
                    e.name,
                    if e.cpu_ok {
                        "  (works without a GPU)"
                    } else {
                        ""
                    }
                );
            }
            Ok(())
        }
        ModelsCommand::Download { id } => {
            let Some(entry) = ld_core::catalog::find(&id) else {
                let ids: Vec<String> = ld_core::catalog::entries()
                    .into_iter()
                    .map(|e| e.id)
                    .collect();
                bail!(
                    "there is no catalog model '{id}'; choose one of: {}",
                    ids.join(", ")
                );
            };
            let rt = tokio::runtime::Runtime::new().context("could not start the async runtime")?;
            let hub = ld_core::download::Hub::from_env()?;
            let bar = ProgressBar::new(0);
            bar.set_style(
                ProgressStyle::with_template(
                    "{msg:30!} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} ETA {eta}",
                )
                .expect("a valid template")
                .progress_chars("=> "),
            );
            let cancel = AtomicBool::new(false);
            let models = data.models();
            let path = rt.block_on(async {
                let mut on_progress = |p: &ld_core::download::InstallProgress| {
                    bar.set_length(p.bytes_total);
                    bar.set_position(p.bytes_done);
                    bar.set_message(p.file.clone());
                };
                ld_core::download::install(
                    &hub,
                    &entry,
                    &models,
                    &Default::default(),
                    &mut on_progress,
                    &cancel,
                )
                .await
            });
            bar.finish_and_clear();
            let path = path.with_context(|| format!("could not download {}", entry.name))?;
            println!("Installed {} in {}", entry.name, path.display());
            Ok(())
        }
    }
}
