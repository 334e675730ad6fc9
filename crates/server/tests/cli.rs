//! The real `local-diffusers` binary: `serve` prints its address and answers; `doctor` reports the
//! hardware; a non-loopback host without a key is refused with a clear message; `bench --scaling`
//! runs its child processes and reports their figures.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::Duration;

fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_local-diffusers"))
}

#[test]
fn doctor_prints_the_hardware_report() {
    let dir = tempfile::tempdir().unwrap();
    let out = bin()
        .args(["doctor", "--data-dir"])
        .arg(dir.path())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(
        text.contains("CPU:") && text.contains("Memory:") && text.contains("GPU:"),
        "{text}"
    );
    assert!(text.contains(&dir.path().display().to_string()), "{text}");
}

#[test]
fn bench_scaling_times_one_thread_two_threads_and_two_copies_at_once() {
    // The VAE at 64x64: a few seconds for the five child runs.
    let out = bin()
        .args([
            "bench",
            "--scaling",
            "--no-unet",
            "--width",
            "64",
            "--height",
            "64",
        ])
        .args(["--threads", "2", "--json"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).unwrap();
    let v: serde_json::Value = serde_json::from_str(text.lines().last().unwrap()).unwrap();
    assert_eq!(v["threads"], 2, "{v}");
    let vae = &v["parts"]["VAE decode"];
    let (one, two) = (
        vae["one_thread_s"].as_f64().unwrap(),
        vae["threads_s"].as_f64().unwrap(),
    );
    assert!(one > 0.0 && two > 0.0, "{v}");
    assert!(
        (vae["scaling"].as_f64().unwrap() - one / two).abs() < 1e-9,
        "{v}"
    );
    // The copies ran (a 64x64 decode needs far less memory than any test machine has).
    let copies = vae["copies_at_once_s"].as_f64().unwrap();
    let ceiling = vae["ceiling"].as_f64().unwrap();
    assert!((ceiling - 2.0 * one / copies).abs() < 1e-9, "{v}");
    assert!(v["parts"]["UNet step"].is_null(), "{v}");

    // One thread has nothing to compare with.
    let out = bin()
        .args(["bench", "--scaling", "--no-unet", "--threads", "1"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--threads 2"));
}

#[test]
fn serve_on_a_lan_address_requires_an_api_key() {
    let dir = tempfile::tempdir().unwrap();
    let out = bin()
        .args(["serve", "--host", "0.0.0.0", "--port", "0", "--data-dir"])
        .arg(dir.path())
        .env_remove("LOCAL_DIFFUSERS_API_KEY")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--api-key"), "{err}");
}

#[test]
fn serve_prints_its_address_and_answers() {
    let dir = tempfile::tempdir().unwrap();
    let mut child = bin()
        .args(["serve", "--port", "0", "--data-dir"])
        .arg(dir.path())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let url = line
        .trim()
        .strip_prefix("Local Diffusers is running at ")
        .unwrap_or_else(|| panic!("unexpected first line: {line:?}"))
        .to_owned();
    let addr = url
        .trim_start_matches("http://")
        .trim_end_matches('/')
        .to_owned();
    // A raw HTTP/1.1 request: no client library needed for one GET.
    let reply = {
        use std::io::{Read, Write};
        let mut s = std::net::TcpStream::connect(&addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        write!(
            s,
            "GET /api/v1/health HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
        )
        .unwrap();
        let mut r = String::new();
        s.read_to_string(&mut r).unwrap();
        r
    };
    child.kill().unwrap();
    let _ = child.wait();
    assert!(reply.starts_with("HTTP/1.1 200"), "{reply}");
    assert!(reply.contains("\"status\":\"ok\""), "{reply}");
}

fn tiny_model() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../models/tiny/sd1")
}

/// `generate --low-memory` of "a red cube" at 64x64 in 2 steps, seed 5, from `model` (plus
/// `extra` arguments) into `out_file`, with the staged run's debug log on stderr.
fn low_memory_generate(
    dir: &std::path::Path,
    model: &std::path::Path,
    extra: &[&std::ffi::OsStr],
    out_file: &std::path::Path,
) -> std::process::Output {
    bin()
        .args(["generate", "a red cube", "--steps", "2", "--seed", "5"])
        .args(["--width", "64", "--height", "64", "--low-memory", "--model"])
        .arg(model)
        .args(extra)
        .arg("--out")
        .arg(out_file)
        .arg("--data-dir")
        .arg(dir)
        .env("RUST_LOG", "ld_engine::pipeline::staged=debug")
        .output()
        .unwrap()
}

#[test]
fn low_memory_generation_draws_sd1_and_sdxl_folders_in_stages() {
    // Issue 12: `--low-memory` draws SD1 and SDXL folders one model at a time (the staged run's
    // debug log marks the UNet freed before the VAE loads) and gives the picture asked for.
    let dir = tempfile::tempdir().unwrap();
    for family in ["sd1", "sdxl"] {
        let out_file = dir.path().join(format!("{family}.png"));
        let model = tiny_model().with_file_name(family);
        let out = low_memory_generate(dir.path(), &model, &[], &out_file);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{family}: {stderr}");
        let at = |line: &str| stderr.find(line);
        assert!(
            matches!((at("sampled, UNet freed"), at("VAE loaded")), (Some(u), Some(v)) if u < v),
            "{family}: the UNet must be freed before the VAE loads: {stderr}"
        );
        let png = std::fs::read(&out_file).unwrap();
        let info = png::Decoder::new(std::io::Cursor::new(&png[..]))
            .read_info()
            .unwrap();
        assert_eq!(
            (info.info().width, info.info().height),
            (64, 64),
            "{family}"
        );
    }
}

#[test]
fn generate_with_a_refiner_loads_it_after_the_base_is_freed() {
    // Issue 12: `--refiner` finishes an SDXL picture from `--refiner-switch` on; the run loads
    // the refiner's UNet only once the base's is freed, and the PNG names the refiner as the app
    // does.
    let dir = tempfile::tempdir().unwrap();
    let base = tiny_model().with_file_name("sdxl");
    let refiner = tiny_model().with_file_name("sdxl-refiner");
    let plain_file = dir.path().join("plain.png");
    let plain = low_memory_generate(dir.path(), &base, &[], &plain_file);
    assert!(plain.status.success());
    let refined_file = dir.path().join("refined.png");
    let args = [
        "--refiner".as_ref(),
        refiner.as_os_str(),
        "--refiner-switch".as_ref(),
        "0.5".as_ref(),
    ];
    let out = low_memory_generate(dir.path(), &base, &args, &refined_file);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    let order = [
        "sampled, UNet freed",
        "refiner loaded",
        "refined, refiner freed",
        "VAE loaded",
    ]
    .map(|line| stderr.find(line));
    assert!(
        order.iter().all(Option::is_some) && order.windows(2).all(|w| w[0] < w[1]),
        "{order:?}: {stderr}"
    );
    let (plain, refined) = (
        std::fs::read(&plain_file).unwrap(),
        std::fs::read(&refined_file).unwrap(),
    );
    let text = ld_core::image_file::read_parameters(&refined).unwrap();
    assert!(
        text.contains("Refiner: sdxl-refiner, Refiner switch at: 0.5"),
        "{text}"
    );
    let pixels = |png: &[u8]| {
        let mut reader = png::Decoder::new(std::io::Cursor::new(png))
            .read_info()
            .unwrap();
        let mut buf = vec![0; reader.output_buffer_size().unwrap()];
        reader.next_frame(&mut buf).unwrap();
        buf
    };
    assert_ne!(
        pixels(&plain),
        pixels(&refined),
        "the refiner changed nothing"
    );

    // Refused before anything loads: a switch point outside 0..1, a refiner for an SD1 model.
    let bad_switch = [
        "--refiner".as_ref(),
        refiner.as_os_str(),
        "--refiner-switch".as_ref(),
        "1.5".as_ref(),
    ];
    let out = low_memory_generate(dir.path(), &base, &bad_switch, &refined_file);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && stderr.contains("between 0 and 1"),
        "{stderr}"
    );
    let out = low_memory_generate(dir.path(), &tiny_model(), &args[..2], &refined_file);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && stderr.contains("SDXL base"),
        "{stderr}"
    );
}

/// The tiny SD1 as a single fp32 checkpoint in LDM names, rebuilt from the recipe of
/// tests/fixtures/make_single_file_refs.py (the engine's tests/single_file.rs `build` checks the
/// result is byte for byte the file diffusers read back; SD1 needs only its `copy` and `conv1x1`).
fn sd1_single_file(dir: &std::path::Path) -> std::path::PathBuf {
    use candle_core::{DType, Device, Tensor};
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let recipe: serde_json::Value = serde_json::from_slice(
        &std::fs::read(root.join("tests/fixtures/refs/single_file_recipe.json")).unwrap(),
    )
    .unwrap();
    let folder = tiny_model();
    let component = |c: &str| {
        let files = ld_engine::config::weight_files_in(&folder.join(c)).unwrap();
        ld_engine::weights::Weights::open_all(&files).unwrap()
    };
    let components: std::collections::HashMap<&str, _> = ["unet", "vae", "text_encoder"]
        .into_iter()
        .map(|c| (c, component(c)))
        .collect();
    let mut tensors = std::collections::HashMap::new();
    for e in recipe["sd1"]["entries"].as_array().unwrap() {
        let (name, from, op) = (e[0].as_str().unwrap(), e[1].as_str().unwrap(), &e[3]);
        let src = components[from]
            .load(e[2][0].as_str().unwrap(), DType::F32, &Device::Cpu)
            .unwrap();
        let t: Tensor = match op.as_str().unwrap() {
            "copy" => src,
            "conv1x1" => {
                let (o, i) = src.dims2().unwrap();
                src.reshape((o, i, 1, 1)).unwrap()
            }
            other => panic!("{name}: op {other} is not used by SD1's recipe"),
        };
        tensors.insert(name.to_string(), t);
    }
    let path = dir.join("tiny-sd1.safetensors");
    candle_core::safetensors::save(&tensors, &path).unwrap();
    path
}

#[test]
fn low_memory_generation_draws_a_single_file_in_stages_like_its_folder() {
    // A .safetensors checkpoint is drawn one model at a time too (the staged run's debug log),
    // with --config naming the folder whose configs describe the tiny architecture (the
    // embedded ones are SD 1.5's). The file holds the folder's fp32 weights, so the picture is
    // the folder's, pixel for pixel.
    let dir = tempfile::tempdir().unwrap();
    let file = sd1_single_file(dir.path());
    let draw = |name: &str, model: &std::path::Path, extra: &[&std::ffi::OsStr]| {
        let out_file = dir.path().join(format!("{name}.png"));
        let out = low_memory_generate(dir.path(), model, extra, &out_file);
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        assert!(out.status.success(), "{name}: {stderr}");
        let png = std::fs::read(&out_file).unwrap();
        let pixels = image::load_from_memory(&png).unwrap().to_rgb8().into_raw();
        (stderr, pixels)
    };
    let (stderr, from_file) = draw(
        "file",
        &file,
        &["--config".as_ref(), tiny_model().as_os_str()],
    );
    assert!(stderr.contains("sampled, UNet freed"), "{stderr}");
    let (_, from_folder) = draw("folder", &tiny_model(), &[]);
    assert_eq!(from_file.len(), 64 * 64 * 3);
    assert!(
        from_file == from_folder,
        "the file's picture is not the folder's"
    );
    // --vae decodes with a separate VAE file (the tiny SD2's, same shapes, other weights), for
    // the file and the folder alike; a file that is no VAE is refused before any step runs.
    let vae = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures/refs/sd2_vae_ldm.fp16.safetensors");
    let with_vae = ["--vae".as_ref(), vae.as_os_str()];
    let (stderr, file_vae) = draw(
        "file-vae",
        &file,
        &[
            &["--config".as_ref(), tiny_model().as_os_str()],
            &with_vae[..],
        ]
        .concat(),
    );
    assert!(stderr.contains("sampled, UNet freed"), "{stderr}");
    let (_, folder_vae) = draw("folder-vae", &tiny_model(), &with_vae);
    assert!(file_vae != from_file, "--vae changed nothing");
    assert!(file_vae == folder_vae, "file and folder decode differently");
    let out_file = dir.path().join("not-a-vae.png");
    let lora = vae.with_file_name("lora_kohya.safetensors");
    let out = low_memory_generate(
        dir.path(),
        &tiny_model(),
        &["--vae".as_ref(), lora.as_os_str()],
        &out_file,
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(stderr.contains("not a VAE file"), "{stderr}");
    assert!(!out_file.exists());
}

#[test]
fn generate_writes_a_png_with_its_parameters() {
    let dir = tempfile::tempdir().unwrap();
    let out_file = dir.path().join("cat.png");
    let out = bin()
        .args([
            "generate",
            "a photo of a cat",
            "--negative",
            "blurry, lowres",
            "--steps",
            "3",
        ])
        // 72x88: multiples of 8 but not of 64, as A1111 allows.
        .args(["--width", "72", "--height", "88", "--seed", "-1", "--model"])
        .arg(tiny_model())
        .arg("--out")
        .arg(&out_file)
        .arg("--data-dir")
        .arg(dir.path())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let png = std::fs::read(&out_file).unwrap();
    let (w, h) = {
        let r = png::Decoder::new(std::io::Cursor::new(&png[..]))
            .read_info()
            .unwrap();
        (r.info().width, r.info().height)
    };
    assert_eq!((w, h), (72, 88));
    let params = ld_core::image_file::read_parameters(&png).expect("parameters chunk");
    assert!(
        params.starts_with(
            // Issue 4: the default is DPM++ 2M with the Karras schedule.
            "a photo of a cat\nNegative prompt: blurry, lowres\nSteps: 3, Sampler: DPM++ 2M, \
             Schedule type: Karras"
        ),
        "{params}"
    );
    // Seed -1 means random, and the seed actually used is recorded.
    let seed: u64 = params
        .split(", ")
        .find_map(|kv| kv.strip_prefix("Seed: "))
        .expect("seed field")
        .parse()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains(&format!("seed {seed}")), "{stderr}");
}

#[test]
fn generate_takes_fused_sampler_names_schedules_and_the_nv_source() {
    // Issue 4: an old fused A1111 name sets sampler and schedule; --seed-source nv runs.
    let dir = tempfile::tempdir().unwrap();
    for (i, extra) in [
        &["--sampler", "DPM++ 2M SDE Karras", "--seed-source", "nv"][..],
        &["--sampler", "euler_ancestral", "--schedule", "sgm_uniform"][..],
    ]
    .into_iter()
    .enumerate()
    {
        let out_file = dir.path().join(format!("{i}.png"));
        let out = bin()
            .args([
                "generate", "a cat", "--steps", "2", "--width", "64", "--height", "64",
            ])
            .args(["--seed", "7", "--model"])
            .arg(tiny_model())
            .args(extra)
            .arg("--out")
            .arg(&out_file)
            .arg("--data-dir")
            .arg(dir.path())
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{extra:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let params = ld_core::image_file::read_parameters(&std::fs::read(&out_file).unwrap())
            .expect("parameters chunk");
        let sampler = if i == 0 { "DPM++ 2M SDE" } else { "Euler a" };
        assert!(
            params.contains(&format!("Sampler: {sampler}, ")),
            "{params}"
        );
    }
}

#[test]
fn generate_refuses_bad_input_clearly_and_writes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let out_file = dir.path().join("x.png");
    let cases: [(&[&str], &str); 10] = [
        (&["--width", "65"], "width must be a multiple of 8"),
        (&["--steps", "0"], "steps must be between 1 and"),
        // Issue 4: unknown names list the valid ones.
        (
            &["--sampler", "Nope"],
            "unknown sampler 'Nope'; choose one of: DPM++ 2M, DPM++ SDE, DPM++ 2M SDE, \
             DPM++ 2S a, DPM++ 3M SDE, Euler a, Euler, LMS, Heun, DPM2, DPM2 a, DDIM, UniPC, LCM",
        ),
        (
            &["--sampler", "DPM++ 2M Nope"],
            "unknown sampler 'DPM++ 2M Nope'",
        ),
        (
            &["--schedule", "Nope"],
            "unknown schedule 'Nope'; choose one of: Automatic, Uniform, Karras, Exponential, \
             Polyexponential, SGM Uniform, KL Optimal, Align Your Steps, Simple, Normal, DDIM, \
             Beta, Leading, Trailing",
        ),
        (
            &["--seed-source", "gpu"],
            "unknown seed source 'gpu'; choose cpu or nv",
        ),
        (&["--seed", "-5"], "seed must be -1"),
        // A folder has its own configs: a --config beside it would be silently ignored.
        (
            &["--config", "."],
            "--config is for .safetensors checkpoints",
        ),
        (
            &["--vae", "no-such-vae.safetensors"],
            "--vae no-such-vae.safetensors is not a file",
        ),
        (
            &["--config", "no-such-dir"],
            "--config no-such-dir is not a folder",
        ),
    ];
    for (extra, want) in cases {
        let out = bin()
            .args(["generate", "x", "--model"])
            .arg(tiny_model())
            .args(extra)
            .arg("--out")
            .arg(&out_file)
            .arg("--data-dir")
            .arg(dir.path())
            .output()
            .unwrap();
        assert!(!out.status.success());
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(want), "{extra:?}: {err}");
        assert!(
            !err.contains("panicked") && !err.contains("backtrace"),
            "{err}"
        );
        assert!(!out_file.exists());
    }
    let out = bin()
        .args(["generate", "x", "--model"])
        .arg(dir.path())
        .args(["--width", "64", "--height", "64"])
        .arg("--data-dir")
        .arg(dir.path())
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("model_index.json is missing"), "{err}");
}
