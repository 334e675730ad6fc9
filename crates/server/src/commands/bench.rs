//! `local-diffusers bench`: times the full-size SD1.5 UNet and VAE with random weights (compute
//! cost does not depend on weight values), so speed can be measured without a download. Compare
//! with `scripts/bench_pytorch.py`, which times diffusers on the same shapes.

use clap::Args;
use ld_engine::bench::{BenchFamily, BenchOptions, BenchReport};
use std::time::Duration;

#[derive(Args, Debug)]
pub struct BenchArgs {
    /// Model shapes: sd15 or sdxl.
    #[arg(long, default_value = "sd15")]
    pub family: String,
    /// Image width; the family's native size when left out (512 for sd15, 1024 for sdxl).
    #[arg(long)]
    pub width: Option<usize>,
    #[arg(long)]
    pub height: Option<usize>,
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

pub fn run(mut args: BenchArgs) -> anyhow::Result<()> {
    let (family, native) = match args.family.to_ascii_lowercase().as_str() {
        "sd15" | "sd1" | "sd1.5" => (BenchFamily::Sd15, 512),
        "sdxl" => (BenchFamily::Sdxl, 1024),
        other => anyhow::bail!("unknown --family {other:?}: use sd15 or sdxl"),
    };
    args.width.get_or_insert(native);
    args.height.get_or_insert(native);
    let (width, height) = (args.width.unwrap_or(native), args.height.unwrap_or(native));
    let device = super::pick_device()?;
    let dtype = super::pick_dtype(&args.precision, &device)?;
    let opts = BenchOptions {
        device,
        dtype,
        width,
        height,
        batch: args.batch,
        unet: !args.no_unet,
        vae: !args.no_vae,
        family,
        ..BenchOptions::default()
    };
    let report = ld_engine::bench::run(&opts)?;
    let peak = peak_rss_bytes();
    if args.json {
        let secs = |d: Option<Duration>| d.map(|d| d.as_secs_f64());
        let v = serde_json::json!({
            "family": args.family, "width": width, "height": height, "batch": args.batch,
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
    let label = if args.family.eq_ignore_ascii_case("sdxl") {
        "SDXL"
    } else {
        "SD1.5"
    };
    println!(
        "{label} sizes, random weights, {}x{}, UNet batch {}",
        args.width.unwrap_or(0),
        args.height.unwrap_or(0),
        args.batch
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
