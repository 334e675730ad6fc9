//! `local-diffusers bench`: times the full-size SD1.5 UNet and VAE with random weights (compute
//! cost does not depend on weight values), so speed can be measured without a download. With a
//! Python that has torch (and diffusers), it runs `scripts/bench_pytorch.py` (or, with `--ops`,
//! `scripts/bench_ops_pytorch.py`) in the same run, on the same threads, and prints each figure
//! beside PyTorch's with the ratio: the machine's load changes between runs, a ratio measured
//! side by side much less.

use clap::Args;
use ld_engine::attention::AttentionOptions;
use ld_engine::bench::{BenchFamily, BenchOptions, BenchReport};
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::Command;
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
    /// Time the single layers of an SD1.5 512x512 step (convolutions, attention, linear layers,
    /// norms) instead of whole models (CPU, f32).
    #[arg(long)]
    pub ops: bool,
    /// With --ops: only the cases whose name contains this.
    #[arg(long, default_value = "")]
    pub filter: String,
    /// Timed runs of each part, the median reported; above 1, an untimed warm-up run goes first.
    /// Default: 5 per layer with --ops; for whole models 1 on the CPU, 10 on a GPU.
    #[arg(long)]
    pub repeats: Option<usize>,
    /// Alternate ours and PyTorch this many times; each figure is the median over rounds.
    #[arg(long, default_value_t = 1)]
    pub rounds: usize,
    /// Compute threads for both sides (RAYON_NUM_THREADS here, torch.set_num_threads there);
    /// 0: this machine's default.
    #[arg(long, default_value_t = 0)]
    pub threads: usize,
    /// Python with torch and diffusers for the side-by-side figures.
    #[arg(long, env = "LD_BENCH_PYTHON")]
    pub python: Option<PathBuf>,
    /// Our attention as chunked matrix products instead of the fused tiled kernel (to compare).
    #[arg(long)]
    pub chunked_attention: bool,
    /// Skip PyTorch even when a Python is given.
    #[arg(long)]
    pub no_torch: bool,
    /// Our UNet's weights in f16 storage, widened layer by layer (the low-memory mode of
    /// `generate --low-memory`; CPU, fp32).
    #[arg(long)]
    pub half_weights: bool,
    /// The CPU's matrix products (linear layers, convolutions) in bfloat16 with AVX-512 BF16
    /// (Zen 4, Sapphire Rapids), f32 accumulation; fp32 only.
    #[arg(long)]
    pub bf16: bool,
    /// How the CPU time scales with threads: one thread against `--threads` (default: all
    /// cores), each in a process of its own, alternated `--rounds` times; and, as the ceiling
    /// the machine sets, as many one-thread copies at once as there are threads.
    #[arg(long)]
    pub scaling: bool,
}

pub fn run(mut args: BenchArgs) -> anyhow::Result<()> {
    if args.bf16 {
        ld_engine::bf16_gemm::enable().map_err(|e| anyhow::anyhow!("--bf16: {e}"))?;
    }
    if args.threads > 0 {
        // Read by candle (and the kernels) on every call; set before any compute starts, while
        // this process has only this thread.
        std::env::set_var("RAYON_NUM_THREADS", args.threads.to_string());
    }
    if args.ops {
        return run_ops(&args);
    }
    if args.scaling {
        return run_scaling(&args);
    }
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
    // A GPU step takes tens of milliseconds and its first call loads kernels: time many.
    let repeats = args.repeats.unwrap_or(if device.is_cpu() { 1 } else { 10 });
    let on_gpu = !device.is_cpu();
    let opts = BenchOptions {
        repeats,
        device,
        dtype,
        width,
        height,
        batch: args.batch,
        unet: !args.no_unet,
        vae: !args.no_vae,
        family,
        attention: attention(&args),
        half_weights: args.half_weights,
    };
    let torch_args = {
        let mut a = vec![
            "--json".to_string(),
            "--family".into(),
            args.family.to_ascii_lowercase(),
            "--width".into(),
            width.to_string(),
            "--height".into(),
            height.to_string(),
            "--batch".into(),
            args.batch.to_string(),
            "--threads".into(),
            threads(&args).to_string(),
            "--repeats".into(),
            repeats.to_string(),
            "--precision".into(),
            if dtype == candle_core::DType::F16 {
                "fp16"
            } else {
                "fp32"
            }
            .into(),
        ];
        if on_gpu {
            a.extend(["--device".into(), "cuda".into()]);
        }
        if args.no_vae {
            a.push("--no-vae".into());
        }
        if args.no_unet {
            a.push("--no-unet".into());
        }
        a
    };
    let python = torch_python(&args);
    let mut ours: Vec<BenchReport> = Vec::new();
    let mut theirs: Vec<serde_json::Value> = Vec::new();
    for _ in 0..args.rounds.max(1) {
        ours.push(ld_engine::bench::run(&opts)?);
        if let Some(py) = &python {
            theirs.push(run_script(py, "bench_pytorch.py", &torch_args)?);
        }
    }
    let peak = peak_rss_bytes();
    let med = |f: fn(&BenchReport) -> Option<Duration>| {
        median(ours.iter().filter_map(f).map(|d| d.as_secs_f64()).collect())
    };
    let torch = |key: &str| median(theirs.iter().filter_map(|v| v[key].as_f64()).collect());
    // The ratio is the median of each round's own ratio: a round's two figures were measured
    // a minute apart, under much the same load from the rest of the machine.
    let paired = |f: fn(&BenchReport) -> Option<Duration>, key: &str| {
        median(
            ours.iter()
                .zip(&theirs)
                .filter_map(|(o, t)| Some(f(o)?.as_secs_f64() / t[key].as_f64()?))
                .collect(),
        )
    };
    let row = |name, f: fn(&BenchReport) -> Option<Duration>, key: &str| {
        (name, med(f), torch(key), paired(f, key))
    };
    let rows = [
        row("UNet build", |r| r.unet_build, "unet_build_s"),
        row("UNet step", |r| r.unet_forward, "unet_step_s"),
        row("VAE build", |r| r.vae_build, "vae_build_s"),
        row("VAE decode", |r| r.vae_decode, "vae_decode_s"),
    ];
    let torch_peak = median(
        theirs
            .iter()
            .filter_map(|v| v["peak_rss_bytes"].as_f64())
            .collect(),
    );
    if args.json {
        let secs = |v: Option<f64>| serde_json::json!(v);
        let v = serde_json::json!({
            "family": args.family, "width": width, "height": height, "batch": args.batch,
            "dtype": format!("{dtype:?}"),
            "threads": threads(&args),
            "rounds": args.rounds.max(1),
            "unet_build_s": secs(rows[0].1),
            "unet_step_s": secs(rows[1].1),
            "vae_build_s": secs(rows[2].1),
            "vae_decode_s": secs(rows[3].1),
            "peak_rss_bytes": peak,
            "torch": theirs,
        });
        println!("{v}");
        return Ok(());
    }
    let label = if family == BenchFamily::Sdxl {
        "SDXL"
    } else {
        "SD1.5"
    };
    let on = if on_gpu {
        "GPU".to_string()
    } else {
        format!(
            "CPU, {} threads, products by {}",
            threads(&args),
            ld_engine::cpu_products()
        )
    };
    println!(
        "{label} sizes, random weights, {width}x{height}, UNet batch {}, {dtype:?}, {on}, median of {repeats} run(s) x {} round(s) (ratio: median of the rounds' ratios)",
        args.batch,
        args.rounds.max(1)
    );
    print_header(python.is_some());
    let step = (rows[1].1, rows[1].2);
    for (name, o, t, ratio) in rows {
        if let Some(o) = o {
            print_row(name, o, t, ratio);
        }
    }
    // Steps per second, the figure GPU users compare (one step here is one CFG pair).
    if let (true, Some(o)) = (on_gpu, step.0) {
        let t = step
            .1
            .map_or(String::new(), |t| format!("{:>10.2} it/s", 1.0 / t));
        println!("{:<36} {:>8.2} it/s {t}", "UNet steps per second", 1.0 / o);
    }
    let torch_vram = median(
        theirs
            .iter()
            .filter_map(|v| v["peak_vram_bytes"].as_f64())
            .collect(),
    );
    if let Some(v) = torch_vram {
        println!(
            "{:<36} {:>11} {:>10.2} GB   (PyTorch's allocator; measure both with nvidia-smi)",
            "Peak GPU memory allocated",
            "-",
            v / 1e9
        );
    }
    if let Some(p) = peak {
        let t = torch_peak.map_or(String::new(), |t| format!("{:>10.2} GB", t / 1e9));
        println!("{:<36} {:>8.2} GB {t}", "Peak memory (RSS)", p as f64 / 1e9);
    }
    if let Some(last) = ours.last() {
        print_profile("UNet step", last.unet_forward, &last.unet_profile);
        print_profile("VAE decode", last.vae_decode, &last.vae_profile);
    }
    if python.is_none() && !args.no_torch {
        how_to_compare("bench_pytorch.py", &torch_args);
    }
    Ok(())
}

/// The `LD_LAYER_TIMES=1` table of one part: time per layer kind in one run, its share, and the
/// rest of the run (adds, copies, concatenations, embeddings) as "other"; with
/// `LD_LAYER_TIMES=shapes`, convolutions and linear layers by input shape too.
fn print_profile(part: &str, total: Option<Duration>, rows: &[ld_engine::bench::ProfileRow]) {
    let Some(total) = total.filter(|_| !rows.is_empty()) else {
        return;
    };
    let total = total.as_secs_f64();
    println!("\n{part}, time per layer kind in one run (LD_LAYER_TIMES; waits after each layer):");
    let mut counted = 0.0;
    for (name, d, n) in rows {
        let s = d.as_secs_f64();
        counted += s;
        println!(
            "  {name:<24} {:>9.2} ms {:>5.1}% {n:>6}x",
            s * 1e3,
            100.0 * s / total
        );
    }
    let other = (total - counted).max(0.0);
    println!(
        "  {:<24} {:>9.2} ms {:>5.1}%",
        "other",
        other * 1e3,
        100.0 * other / total
    );
}

/// `--ops`: each layer case, ours beside torch's.
fn run_ops(args: &BenchArgs) -> anyhow::Result<()> {
    let cases = ld_engine::bench::op_cases(&args.filter, attention(args))?;
    let torch_args = |filter: &str| {
        vec![
            "--threads".to_string(),
            threads(args).to_string(),
            "--repeats".into(),
            ops_repeats(args).to_string(),
            "--filter".into(),
            filter.to_string(),
        ]
    };
    let python = torch_python(args);
    let mut ours: BTreeMap<&str, Vec<f64>> = BTreeMap::new();
    let mut theirs: BTreeMap<String, Vec<f64>> = BTreeMap::new();
    // Case by case, ours then PyTorch's: the load on a shared machine drifts within seconds, and
    // a ratio is only fair when both sides ran under the same load.
    for _ in 0..args.rounds.max(1) {
        for case in &cases {
            for (name, d) in
                ld_engine::bench::run_ops(std::slice::from_ref(case), ops_repeats(args))?
            {
                ours.entry(name).or_default().push(d.as_secs_f64());
            }
            let Some(py) = &python else { continue };
            let v = run_script(py, "bench_ops_pytorch.py", &torch_args(case.name))?;
            if let Some(t) = v["median_s"][case.name].as_f64() {
                theirs.entry(case.name.to_string()).or_default().push(t);
            }
        }
    }
    let rows: Vec<(&str, f64, Option<f64>)> = cases
        .iter()
        .filter_map(|c| {
            let o = median(ours.get(c.name)?.clone())?;
            Some((
                c.name,
                o,
                theirs.get(c.name).and_then(|t| median(t.clone())),
            ))
        })
        .collect();
    if args.json {
        let v: serde_json::Map<String, serde_json::Value> = rows
            .iter()
            .map(|(n, o, t)| {
                let r = serde_json::json!({"ours_s": o, "torch_s": t, "ratio": t.map(|t| o / t)});
                (n.to_string(), r)
            })
            .collect();
        println!("{}", serde_json::Value::Object(v));
        return Ok(());
    }
    println!(
        "Single layers, f32 CPU, {} threads, median of {} runs x {} round(s)",
        threads(args),
        ops_repeats(args),
        args.rounds.max(1)
    );
    print_header(python.is_some());
    for (name, o, t) in rows {
        print_row(name, o, t, t.map(|t| o / t));
    }
    if python.is_none() && !args.no_torch {
        how_to_compare("bench_ops_pytorch.py", &torch_args(&args.filter));
    }
    Ok(())
}

/// One round of `--scaling`: a part's time on one thread, on `n`, and each one-thread copy's
/// time when `n` ran at once (empty when they were not run).
#[derive(Debug, Clone, PartialEq)]
struct ScalingRound {
    one: f64,
    many: f64,
    copies: Vec<f64>,
}

/// A part's `--scaling` figures over the rounds: medians of the times, and of each round's
/// ratios (a round's runs were minutes apart at most, under much the same load).
#[derive(Debug, Clone, PartialEq)]
struct ScalingRow {
    one: f64,
    many: f64,
    /// One thread's time over `n` threads' time.
    scaling: f64,
    /// The median time of a one-thread copy while `n` copies ran at once.
    copies: Option<f64>,
    /// `n` copies' work in one copy's time against one thread alone: what `n` threads could
    /// reach if nothing of a job ran on one thread and no thread waited for another. It is
    /// below `n` by what the cores share: memory bandwidth, the last-level cache and the
    /// power budget.
    ceiling: Option<f64>,
}

fn scaling_row(n: usize, rounds: &[ScalingRound]) -> Option<ScalingRow> {
    let copies: Vec<f64> = rounds
        .iter()
        .filter_map(|r| median(r.copies.clone()))
        .collect();
    let ceiling = rounds
        .iter()
        .filter_map(|r| Some(n as f64 * r.one / median(r.copies.clone())?))
        .collect();
    Some(ScalingRow {
        one: median(rounds.iter().map(|r| r.one).collect())?,
        many: median(rounds.iter().map(|r| r.many).collect())?,
        scaling: median(rounds.iter().map(|r| r.one / r.many).collect())?,
        copies: median(copies),
        ceiling: median(ceiling),
    })
}

/// `--scaling`: see [`BenchArgs::scaling`]. Each figure comes from a child process
/// (`bench --json`), so every run starts with a fresh thread pool and allocator.
fn run_scaling(args: &BenchArgs) -> anyhow::Result<()> {
    let n = threads(args);
    if n < 2 {
        anyhow::bail!(
            "--scaling compares one thread with several, and this machine runs one: pass --threads 2 or more"
        );
    }
    let exe = std::env::current_exe()?;
    let mut child: Vec<String> = vec!["bench".into(), "--json".into(), "--no-torch".into()];
    child.extend(["--family".into(), args.family.clone()]);
    for (flag, v) in [("--width", args.width), ("--height", args.height)] {
        if let Some(v) = v {
            child.extend([flag.into(), v.to_string()]);
        }
    }
    child.extend(["--batch".into(), args.batch.to_string()]);
    child.extend(["--precision".into(), args.precision.clone()]);
    if let Some(r) = args.repeats {
        child.extend(["--repeats".into(), r.to_string()]);
    }
    for (on, flag) in [
        (args.no_unet, "--no-unet"),
        (args.no_vae, "--no-vae"),
        (args.half_weights, "--half-weights"),
        (args.bf16, "--bf16"),
        (args.chunked_attention, "--chunked-attention"),
    ] {
        if on {
            child.push(flag.into());
        }
    }
    let start = |threads: usize| -> anyhow::Result<std::process::Child> {
        Command::new(&exe)
            .args(&child)
            .args(["--threads", &threads.to_string()])
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .map_err(|e| anyhow::anyhow!("starting {}: {e}", exe.display()))
    };
    let finish = |c: std::process::Child| -> anyhow::Result<serde_json::Value> {
        json_output("the benchmark's child run", c.wait_with_output()?)
    };
    let parts = [("UNet step", "unet_step_s"), ("VAE decode", "vae_decode_s")];
    let mut rounds: Vec<Vec<ScalingRound>> = vec![Vec::new(); parts.len()];
    let mut skipped_copies = None;
    for _ in 0..args.rounds.max(1) {
        let one = finish(start(1)?)?;
        let many = finish(start(n)?)?;
        // n copies need n times one copy's memory: run them only where that is known to fit.
        let peak = one["peak_rss_bytes"].as_f64();
        let room = ld_core::hardware::available_ram().map(|b| b as f64);
        let copies = match (peak, room) {
            (Some(peak), Some(room)) if n as f64 * peak < 0.9 * room => {
                let mut started = Vec::with_capacity(n);
                for _ in 0..n {
                    match start(1) {
                        Ok(c) => started.push(c),
                        Err(e) => {
                            stop_all(started);
                            return Err(e);
                        }
                    }
                }
                // Waited in turn: each child's output is a few lines, well under a pipe's
                // buffer, so none blocks while another is read.
                let mut done = Vec::with_capacity(n);
                let mut started = started.into_iter();
                while let Some(c) = started.next() {
                    match finish(c) {
                        Ok(v) => done.push(v),
                        Err(e) => {
                            stop_all(started.collect());
                            return Err(e);
                        }
                    }
                }
                done
            }
            _ => {
                skipped_copies = Some((peak, room));
                Vec::new()
            }
        };
        for (i, (_, key)) in parts.iter().enumerate() {
            if let (Some(o), Some(m)) = (one[key].as_f64(), many[key].as_f64()) {
                let copies = copies.iter().filter_map(|c| c[key].as_f64()).collect();
                rounds[i].push(ScalingRound {
                    one: o,
                    many: m,
                    copies,
                });
            }
        }
    }
    let rows: Vec<_> = parts
        .iter()
        .zip(&rounds)
        .filter_map(|((name, _), r)| Some((*name, scaling_row(n, r)?)))
        .collect();
    if args.json {
        let v: serde_json::Map<String, serde_json::Value> = rows
            .iter()
            .map(|(name, r)| {
                let v = serde_json::json!({
                    "one_thread_s": r.one, "threads_s": r.many, "scaling": r.scaling,
                    "copies_at_once_s": r.copies, "ceiling": r.ceiling,
                });
                (name.to_string(), v)
            })
            .collect();
        println!("{}", serde_json::json!({"threads": n, "parts": v}));
        return Ok(());
    }
    println!(
        "Thread scaling, {} sizes, CPU, products by {}, {} round(s), each figure a median",
        args.family,
        ld_engine::cpu_products(),
        args.rounds.max(1)
    );
    println!(
        "{:<14} {:>10} {:>10} {:>8} {:>14} {:>8}",
        "",
        "1 thread",
        format!("{n} threads"),
        "scaling",
        format!("{n} at once"),
        "ceiling"
    );
    for (name, r) in &rows {
        let copies = r.copies.map_or("-".into(), |c| format!("{c:.3} s"));
        let ceiling = r.ceiling.map_or("-".into(), |c| format!("{c:.2}x"));
        println!(
            "{name:<14} {:>8.3} s {:>8.3} s {:>7.2}x {copies:>14} {ceiling:>8}",
            r.one, r.many, r.scaling
        );
    }
    println!(
        "(ceiling: {n} one-thread copies' work at once against one thread alone; what the \
         machine's shared memory, cache and power leave for {n} threads)"
    );
    match skipped_copies {
        Some((Some(peak), Some(room))) => println!(
            "{n} copies at once were not run: each peaks at {:.1} GB and {:.1} GB is free",
            peak / 1e9,
            room / 1e9
        ),
        Some(_) => println!(
            "{n} copies at once were not run: this system does not say how much memory one takes or is free"
        ),
        None => {}
    }
    Ok(())
}

/// Ends child runs that are no longer wanted (another one failed), so none outlives this one.
fn stop_all(children: Vec<std::process::Child>) {
    for mut c in children {
        let _ = c.kill();
        let _ = c.wait();
    }
}

fn attention(args: &BenchArgs) -> AttentionOptions {
    AttentionOptions {
        fused: !args.chunked_attention,
        ..AttentionOptions::default()
    }
}

fn ops_repeats(args: &BenchArgs) -> usize {
    args.repeats.unwrap_or(5)
}

fn threads(args: &BenchArgs) -> usize {
    if args.threads > 0 {
        args.threads
    } else {
        candle_core::utils::get_num_threads()
    }
}

fn print_header(torch: bool) {
    if torch {
        println!("{:<36} {:>11} {:>11} {:>7}", "", "ours", "PyTorch", "ratio");
    }
}

fn print_row(name: &str, ours: f64, torch: Option<f64>, ratio: Option<f64>) {
    match (torch, ratio) {
        (Some(t), Some(r)) => println!("{name:<36} {ours:>9.4} s {t:>9.4} s {r:>7.2}"),
        _ => println!("{name:<36} {ours:>9.4} s"),
    }
}

/// The Python to run PyTorch with: `--python`/`LD_BENCH_PYTHON`, unless `--no-torch`.
fn torch_python(args: &BenchArgs) -> Option<PathBuf> {
    if args.no_torch {
        return None;
    }
    args.python.clone()
}

/// Where the PyTorch scripts are: `./scripts` when run from the repository, else the
/// repository this binary was built from.
fn script_path(name: &str) -> PathBuf {
    let here = PathBuf::from("scripts").join(name);
    if here.is_file() {
        return here;
    }
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../scripts")
        .join(name)
}

/// Runs a PyTorch bench script and parses the JSON line it prints last.
fn run_script(python: &PathBuf, name: &str, args: &[String]) -> anyhow::Result<serde_json::Value> {
    let out = Command::new(python)
        .arg(script_path(name))
        .args(args)
        .output()
        .map_err(|e| anyhow::anyhow!("running {} {name}: {e}", python.display()))?;
    json_output(name, out)
}

/// The JSON line a child process (ours or a PyTorch script) printed last; its failure, with
/// what it wrote to stderr, as an error naming `what`.
fn json_output(what: &str, out: std::process::Output) -> anyhow::Result<serde_json::Value> {
    if !out.status.success() {
        anyhow::bail!(
            "{what} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    let text = String::from_utf8_lossy(&out.stdout);
    let last = text
        .lines()
        .rev()
        .find(|l| l.starts_with('{'))
        .unwrap_or("");
    serde_json::from_str(last).map_err(|e| anyhow::anyhow!("{what} printed no JSON ({e}): {text}"))
}

fn how_to_compare(script: &str, args: &[String]) {
    println!(
        "\nFor PyTorch's figures beside these, pass --python (or set LD_BENCH_PYTHON) to a Python \
         with torch and diffusers, or run: python scripts/{script} {}",
        args.join(" ")
    );
}

fn median(mut v: Vec<f64>) -> Option<f64> {
    if v.is_empty() {
        return None;
    }
    v.sort_by(f64::total_cmp);
    Some(v[v.len() / 2])
}

/// Peak resident memory of this process, from /proc (Linux only).
fn peak_rss_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scaling_rows_take_medians_of_times_and_of_each_rounds_ratios() {
        let rounds = [
            ScalingRound {
                one: 8.0,
                many: 4.0,
                copies: vec![8.4, 8.6],
            },
            ScalingRound {
                one: 7.0,
                many: 4.0,
                copies: vec![7.0, 7.2],
            },
            ScalingRound {
                one: 9.0,
                many: 5.0,
                copies: vec![9.6, 9.0],
            },
        ];
        let r = scaling_row(2, &rounds).unwrap();
        assert_eq!((r.one, r.many), (8.0, 4.0));
        // Per round: 2.0, 1.75, 1.8.
        assert!((r.scaling - 1.8).abs() < 1e-12, "{r:?}");
        // Copies' medians: 8.6, 7.2, 9.6; ceilings 16/8.6 = 1.86, 14/7.2 = 1.94, 18/9.6 = 1.875.
        assert_eq!(r.copies, Some(8.6));
        assert!((r.ceiling.unwrap() - 18.0 / 9.6).abs() < 1e-12, "{r:?}");
        // Without the copies there is no ceiling, and without rounds no row.
        let bare: Vec<_> = rounds
            .iter()
            .map(|r| ScalingRound {
                copies: Vec::new(),
                ..r.clone()
            })
            .collect();
        let r = scaling_row(2, &bare).unwrap();
        assert_eq!((r.copies, r.ceiling), (None, None));
        assert_eq!(scaling_row(2, &[]), None);
    }
}
