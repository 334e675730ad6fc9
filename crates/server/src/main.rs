//! The `local-diffusers` command: serve the app, check the hardware, (later) generate and bench.

use anyhow::Context;
use clap::{Parser, Subcommand};
use ld_core::datadir::DataDir;
use std::net::IpAddr;
use std::path::PathBuf;

mod commands;

#[derive(Parser)]
#[command(
    name = "local-diffusers",
    version,
    about = "Private, local Stable Diffusion image generator"
)]
struct Cli {
    /// Folder for settings, gallery, models and logs (default: the platform's app data folder).
    #[arg(long, global = true, value_name = "DIR")]
    data_dir: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Start the app without a window: an HTTP server with the web UI and the API.
    Serve {
        /// Port to listen on (default: 7860, or the next free one). 0 picks any free port.
        #[arg(long)]
        port: Option<u16>,
        /// Address to listen on. Anything but 127.0.0.1/::1 also needs --api-key.
        #[arg(long, default_value = "127.0.0.1")]
        host: IpAddr,
        /// Key other computers must send (Authorization: Bearer KEY) when --host is not local.
        #[arg(long, env = "LOCAL_DIFFUSERS_API_KEY", hide_env_values = true)]
        api_key: Option<String>,
        /// A folder of models you already have (A1111, ComfyUI, diffusers folders); repeatable.
        #[arg(long = "models-dir", value_name = "DIR")]
        models_dirs: Vec<PathBuf>,
    },
    /// Print what this computer has for image generation (CPU, memory, GPU), the recommended
    /// settings, installed models and free disk space.
    Doctor {
        /// Also draw a picture with the built-in tiny model and time each step.
        #[arg(long)]
        self_test: bool,
    },
    /// Make one image from a prompt and save it as a PNG.
    Generate(Box<commands::generate::GenerateArgs>),
    /// List, browse and download models.
    #[command(subcommand)]
    Models(commands::models::ModelsCommand),
    /// Time the full-size SD1.5 UNet and VAE on this machine (random weights, no download).
    Bench(commands::bench::BenchArgs),
}

fn main() -> std::process::ExitCode {
    match run() {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            // The whole cause chain on one line, no backtrace: this is read by people.
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn run() -> anyhow::Result<()> {
    ld_engine::memory::keep_freed_buffers();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "info,ld_server=info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let data = DataDir::open(cli.data_dir.as_deref())?;
    match cli.command {
        Command::Serve {
            port,
            host,
            api_key,
            models_dirs,
        } => serve(data, host, port, api_key, models_dirs),
        Command::Doctor { self_test } => doctor(&data, self_test),
        Command::Generate(args) => commands::generate::run(*args, &data),
        Command::Bench(args) => commands::bench::run(args),
        Command::Models(cmd) => commands::models::run(cmd, &data),
    }
}

/// The diagnostics report as text; recent failures are only known to a running app.
fn doctor(data: &DataDir, self_test: bool) -> anyhow::Result<()> {
    use ld_core::diagnostics;
    let settings = ld_core::settings::load(&data.settings_file()).settings;
    let models = ld_core::models::scan(&data.models(), &settings.models_dirs);
    let report = diagnostics::Report::new(
        ld_core::hardware::system_report(
            &ld_core::hardware::NvmlProbe::default(),
            ld_server::BUILD,
        ),
        diagnostics::summarize_models(&models),
        diagnostics::disk_for(data.root()),
        Vec::new(),
    );
    print!("{}", report.text);
    if self_test {
        let Some(tiny) = diagnostics::find_tiny_model(data.root()) else {
            anyhow::bail!(
                "the built-in test model (models/tiny/sd1) was not found; looked in:\n{}",
                diagnostics::tiny_model_candidates(data.root())
                    .iter()
                    .map(|p| format!("  {}", p.display()))
                    .collect::<Vec<_>>()
                    .join("\n")
            );
        };
        let load = ld_engine::pipeline::LoadOptions {
            device: commands::pick_device()?,
            ..Default::default()
        };
        let load = ld_engine::pipeline::LoadOptions {
            dtype: commands::pick_dtype("auto", &load.device)?,
            ..load
        };
        let result = diagnostics::self_test(&tiny, &load);
        print!("\n{}", result.to_text());
        if !result.ok {
            anyhow::bail!("the self-test failed");
        }
    }
    Ok(())
}

fn serve(
    data: DataDir,
    host: IpAddr,
    port: Option<u16>,
    api_key: Option<String>,
    models_dirs: Vec<PathBuf>,
) -> anyhow::Result<()> {
    ld_server::prepare_allocator(Some(data.root()));
    let rt = tokio::runtime::Runtime::new().context("could not start the async runtime")?;
    rt.block_on(async move {
        let server = ld_server::bind(ld_server::ServeOptions {
            host,
            port,
            api_key,
            data,
            models_dirs,
        })
        .await?;
        // Tests and scripts read this line to find the address.
        println!("Local Diffusers is running at {}", server.url());
        server
            .run_until(async {
                let _ = tokio::signal::ctrl_c().await;
            })
            .await
    })
}
