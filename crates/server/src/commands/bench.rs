//! `local-diffusers bench`: times the full-size SD1.5 UNet and VAE with random weights (compute
//! cost does not depend on weight values), so speed can be measured without a download. Compare
//! with `scripts/bench_pytorch.py`, which times diffusers on the same shapes.

use clap::Args;
use ld_engine::bench::{BenchOptions, BenchReport};
use std::time::Duration;

#[derive(Args, Debug)]
pub struct BenchArgs {
    #[arg(long, default_value_t = 512)]
    pub width: usize,
    #[arg(long, default_value_t = 512)]
    pub height: usize,
    /// UNet batch; 2 is one step of one image with classifier-free guidance.
    #[arg(long, default_value_t = 2)]
    pub batch: usize,
    /// Skip the UNet.
    #[arg(long)]
    pub no_unet: bool,
    /// Skip the VAE decode.
    #[arg(long)]
    pub no_vae: bool,
    /// auto, fp16 or fp32.
    #[arg(long, default_value = "auto")]
    pub precision: String,
    /// Print JSON instead of text.
    #[arg(long)]
    pub json: bool,
}

pub fn run(args: BenchArgs) -> anyhow::Result<()> {
    let device = super::pick_device()?;
    let dtype = super::pick_dtype(&args.precision, &device)?;
    let opts = BenchOptions {
        device,
        dtype,
        width: args.width,
        height: args.height,
        batch: args.batch,
        unet: !args.no_unet,
        vae: !args.no_vae,
        ..BenchOptions::default()
    };
    let report = ld_engine::bench::run(&opts)?;
    let peak = peak_rss_bytes();
    if args.json {
        let secs = |d: Option<Duration>| d.map(|d| d.as_secs_f64());
        let v = serde_json::json!({
            "width": args.width, "height": args.height, "batch": args.batch,
            "dtype": format!("{dtype:?}"),
            "threads": std::thread::available_parallelism().map_or(1, |n| n.get()),
            "unet_build_s": secs(report.unet_build),
            "unet_step_s": secs(report.unet_forward),
            "vae_build_s": secs(report.vae_build),
            "vae_decode_s": secs(report.vae_decode),
            "peak_rss_bytes": peak,
        });
        println!("{v}");
    } else {
        print_text(&args, &report, peak);
    }
    Ok(())
}

fn print_text(args: &BenchArgs, r: &BenchReport, peak: Option<u64>) {
    let show = |label: &str, d: Option<Duration>| {
        if let Some(d) = d {
            println!("{label:<28} {:>8.2} s", d.as_secs_f64());
        }
    };
    println!(
        "SD1.5 sizes, random weights, {}x{}, UNet batch {}",
        args.width, args.height, args.batch
    );
    show("UNet build", r.unet_build);
    show("UNet step", r.unet_forward);
    show("VAE build", r.vae_build);
    show("VAE decode", r.vae_decode);
    if let Some(p) = peak {
        println!("{:<28} {:>8.2} GB", "Peak memory (RSS)", p as f64 / 1e9);
    }
}

/// Peak resident memory of this process, from /proc (Linux only).
fn peak_rss_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}
