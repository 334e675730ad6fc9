//! The model library, catalog and downloads through the API and the command line, against a local
//! server that speaks the Hugging Face layout and serves the tiny test model. Pins issue #7's
//! library and download parts.

use axum::body::Body;
use axum::extract::Path as UrlPath;
use axum::http::{header, Request, StatusCode};
use axum::response::{IntoResponse, Response};
use http_body_util::BodyExt;
use ld_core::datadir::DataDir;
use ld_server::{app, AppState, StateOptions};
use serde_json::{json, Value};
use std::path::PathBuf;
use std::time::Duration;
use tower::ServiceExt;

use crate::support::{call_json, tiny_models, PORT};

fn tiny(name: &str) -> PathBuf {
    tiny_models().join("../../models/tiny").join(name)
}

/// Serves models/tiny/sd1 as any repository: the file list and the files (no resume; the
/// downloader's resume and failure cases are tested in ld-core).
async fn fake_hub() -> String {
    async fn tree(UrlPath((_o, _r, _v)): UrlPath<(String, String, String)>) -> Response {
        let root = tiny("sd1");
        let mut list = Vec::new();
        for (rel, bytes) in files(&root) {
            list.push(json!({"type": "file", "path": rel, "size": bytes.len()}));
        }
        axum::Json(list).into_response()
    }
    async fn resolve(
        UrlPath((_o, _r, _v, path)): UrlPath<(String, String, String, String)>,
    ) -> Response {
        match files(&tiny("sd1"))
            .into_iter()
            .find(|(rel, _)| *rel == path)
        {
            Some((_, bytes)) => ([(header::ETAG, "\"x\"")], bytes).into_response(),
            None => StatusCode::NOT_FOUND.into_response(),
        }
    }
    let app = axum::Router::new()
        .route("/api/models/{o}/{r}/tree/{v}", axum::routing::get(tree))
        .route("/{o}/{r}/resolve/{v}/{*path}", axum::routing::get(resolve));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    url
}

fn files(root: &std::path::Path) -> Vec<(String, Vec<u8>)> {
    fn walk(d: &std::path::Path, root: &std::path::Path, out: &mut Vec<(String, Vec<u8>)>) {
        for e in std::fs::read_dir(d).unwrap().flatten() {
            let p = e.path();
            if p.is_dir() {
                walk(&p, root, out);
            } else {
                let rel = p
                    .strip_prefix(root)
                    .unwrap()
                    .to_string_lossy()
                    .replace('\\', "/");
                out.push((rel, std::fs::read(&p).unwrap()));
            }
        }
    }
    let mut out = Vec::new();
    walk(root, root, &mut out);
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn catalog_setup_download_use_and_delete() {
    let hub = fake_hub().await;
    let dir = tempfile::tempdir().unwrap();
    let s = AppState::open(StateOptions {
        hub_endpoint: Some(hub),
        models_dirs: vec![tiny("sd2")],
        ..StateOptions::new(DataDir::open(Some(dir.path())).unwrap(), PORT)
    })
    .unwrap();

    let (status, catalog) = call_json(&s, "GET", "/api/v1/catalog", Value::Null, false).await;
    assert_eq!(status, StatusCode::OK);
    // This build has no GPU back end: the suggestion is the fast CPU model.
    assert_eq!(catalog["suggested"], "sd-turbo");
    let turbo = catalog["models"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["id"] == "sd-turbo")
        .unwrap();
    assert_eq!(
        (turbo["fits"].as_bool(), turbo["installed"].as_bool()),
        (Some(true), Some(false))
    );
    let xl = catalog["models"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["id"] == "sdxl-base")
        .unwrap();
    assert_eq!(xl["fits"], false);
    let (_, setup) = call_json(&s, "GET", "/api/v1/setup", Value::Null, false).await;
    assert_eq!(setup["has_model"], true, "the sd2 folder counts");
    assert_eq!(setup["suggested"]["id"], "sd-turbo");

    // The user's own folder is never ours to delete.
    let (status, err) = call_json(&s, "DELETE", "/api/v1/models/sd2", Value::Null, true).await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{err}");
    assert!(err["message"]
        .as_str()
        .unwrap()
        .contains("only deletes models it downloaded"));
    assert!(tiny("sd2").join("model_index.json").exists());

    let (status, _) = call_json(
        &s,
        "POST",
        "/api/v1/downloads",
        json!({"id": "sd-turbo"}),
        false,
    )
    .await;
    assert_eq!(
        status,
        StatusCode::UNAUTHORIZED,
        "downloads are for our window"
    );
    let (status, err) =
        call_json(&s, "POST", "/api/v1/downloads", json!({"id": "nope"}), true).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert!(err["hint"].as_str().unwrap().contains("sd-turbo"));

    // Watch the events while it downloads.
    let events = app(s.clone())
        .oneshot(
            Request::builder()
                .uri("/api/v1/events")
                .header("host", format!("127.0.0.1:{PORT}"))
                .body(Body::empty())
                .unwrap(),
        )
        .await
        .unwrap();
    let mut events = events.into_body();
    let (status, started) = call_json(
        &s,
        "POST",
        "/api/v1/downloads",
        json!({"id": "sd-turbo"}),
        true,
    )
    .await;
    assert_eq!(status, StatusCode::ACCEPTED, "{started}");
    let mut text = String::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while !text.contains("\"state\":\"done\"") && !text.contains("\"state\":\"failed\"") {
        let frame = tokio::time::timeout_at(deadline, events.frame())
            .await
            .expect("download events")
            .unwrap()
            .unwrap();
        if let Ok(d) = frame.into_data() {
            text.push_str(&String::from_utf8_lossy(&d));
        }
    }
    assert!(text.contains("event: download"), "{text}");
    assert!(text.contains("\"state\":\"done\""), "{text}");

    let (_, models) = call_json(&s, "GET", "/api/v1/models", Value::Null, false).await;
    let turbo = models["models"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["name"] == "sd-turbo")
        .expect("installed");
    assert_eq!(turbo["managed"], true);
    assert_eq!(turbo["catalog_id"], "sd-turbo");
    // It draws.
    let (status, job) = call_json(
        &s,
        "POST",
        "/api/v1/jobs",
        json!({"prompt": "x", "model": "sd-turbo", "width": 64, "height": 64, "steps": 1}),
        false,
    )
    .await;
    assert_eq!(status, StatusCode::ACCEPTED, "{job}");
    let done = s.jobs().wait(job["id"].as_str().unwrap()).await.unwrap();
    assert_eq!(done.images.len(), 1, "{:?}", done.error);
    // And, being ours, it can be deleted.
    let (status, _) = call_json(&s, "DELETE", "/api/v1/models/sd-turbo", Value::Null, true).await;
    assert_eq!(status, StatusCode::OK);
    assert!(!dir.path().join("models/sd-turbo").exists());
}

/// Found by review: a folder holding only files the app cannot draw with (here a `.ckpt`, which
/// is never opened) ended the first-start guide, and every picture then failed.
#[tokio::test]
async fn setup_counts_only_models_that_can_draw() {
    let dir = tempfile::tempdir().unwrap();
    let theirs = tempfile::tempdir().unwrap();
    let ckpt = std::fs::File::create(theirs.path().join("old.ckpt")).unwrap();
    ckpt.set_len(600_000_000).unwrap();
    let s = AppState::open(StateOptions {
        models_dirs: vec![theirs.path().to_path_buf()],
        ..StateOptions::new(DataDir::open(Some(dir.path())).unwrap(), PORT)
    })
    .unwrap();
    let (_, models) = call_json(&s, "GET", "/api/v1/models", Value::Null, false).await;
    assert_eq!(models["models"][0]["format"], "pickle", "{models}");
    let (_, setup) = call_json(&s, "GET", "/api/v1/setup", Value::Null, false).await;
    assert_eq!(setup["has_model"], false);
}

/// Found by review: A1111's options call saved a model that cannot draw as the default; each
/// picture after it then quietly came from another model.
#[tokio::test]
async fn a1111_options_refuse_a_model_that_cannot_draw() {
    let dir = tempfile::tempdir().unwrap();
    let theirs = tempfile::tempdir().unwrap();
    let ckpt = std::fs::File::create(theirs.path().join("old.ckpt")).unwrap();
    ckpt.set_len(600_000_000).unwrap();
    let s = AppState::open(StateOptions {
        models_dirs: vec![tiny("sd1"), theirs.path().to_path_buf()],
        ..StateOptions::new(DataDir::open(Some(dir.path())).unwrap(), PORT)
    })
    .unwrap();
    let set = |model: &str| {
        let s = s.clone();
        let body = json!({ "sd_model_checkpoint": model });
        async move { call_json(&s, "POST", "/sdapi/v1/options", body, false).await }
    };
    let (status, err) = set("old").await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{err}");
    assert!(
        err["message"]
            .as_str()
            .unwrap()
            .starts_with("The model 'old' cannot draw:"),
        "{err}"
    );
    assert_eq!(s.settings().default_model, None, "nothing saved");
    let (status, err) = set("sd1").await;
    assert_eq!(status, StatusCode::OK, "{err}");
    assert_eq!(s.settings().default_model.as_deref(), Some("sd1"));
}

fn bin() -> std::process::Command {
    std::process::Command::new(env!("CARGO_BIN_EXE_local-diffusers"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_command_line_lists_downloads_and_generates_by_name() {
    let hub = fake_hub().await;
    let dir = tempfile::tempdir().unwrap();
    let run = |args: &[&str]| {
        let out = bin()
            .args(args)
            .arg("--data-dir")
            .arg(dir.path())
            .env("HF_ENDPOINT", &hub)
            .output()
            .unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (ok, text, _) = tokio::task::block_in_place(|| run(&["models", "catalog"]));
    assert!(
        ok && text.contains("sd-turbo") && text.contains("sdxl-base"),
        "{text}"
    );
    let tiny_dir = tiny("").display().to_string();
    let (ok, text, _) =
        tokio::task::block_in_place(|| run(&["models", "list", "--models-dir", &tiny_dir]));
    assert!(ok && text.contains("sd1") && text.contains("SD2"), "{text}");
    let (ok, _, err) = tokio::task::block_in_place(|| run(&["models", "download", "nope"]));
    assert!(!ok && err.contains("sd-turbo"), "{err}");
    let (ok, text, err) = tokio::task::block_in_place(|| run(&["models", "download", "sd-1.5"]));
    assert!(ok, "{err}");
    assert!(text.contains("Installed Stable Diffusion 1.5"), "{text}");
    let out = dir.path().join("by-name.png");
    let (ok, _, err) = tokio::task::block_in_place(|| {
        run(&[
            "generate",
            "a cat",
            "--model",
            "sd-1.5",
            "--width",
            "64",
            "--height",
            "64",
            "--steps",
            "1",
            "--out",
            out.to_str().unwrap(),
        ])
    });
    assert!(ok, "{err}");
    assert!(out.is_file());
    let (ok, _, err) =
        tokio::task::block_in_place(|| run(&["generate", "a cat", "--model", "missing-model"]));
    assert!(!ok && err.contains("installed: sd-1.5"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn loras_and_embeddings_are_listed_from_our_folder_and_a1111_layouts() {
    let dir = tempfile::tempdir().unwrap();
    let a1111 = tempfile::tempdir().unwrap();
    let refs = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/refs");
    let data = DataDir::open(Some(dir.path())).unwrap();
    std::fs::copy(
        refs.join("lora_kohya.safetensors"),
        data.loras().join("kohya-style.safetensors"),
    )
    .unwrap();
    std::fs::create_dir_all(a1111.path().join("models/Lora/sub")).unwrap();
    std::fs::copy(
        refs.join("lora_peft.safetensors"),
        a1111.path().join("models/Lora/sub/peft.safetensors"),
    )
    .unwrap();
    std::fs::create_dir_all(a1111.path().join("embeddings")).unwrap();
    std::fs::copy(
        refs.join("tinyemb.safetensors"),
        a1111.path().join("embeddings/tinyemb.safetensors"),
    )
    .unwrap();
    std::fs::write(
        a1111.path().join("embeddings/broken.safetensors"),
        b"not a tensor file",
    )
    .unwrap();
    let s = AppState::open(StateOptions {
        models_dirs: vec![a1111.path().to_path_buf()],
        ..StateOptions::new(data, PORT)
    })
    .unwrap();
    let (status, loras) = call_json(&s, "GET", "/sdapi/v1/loras", Value::Null, false).await;
    assert_eq!(status, StatusCode::OK);
    let names: Vec<_> = loras
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l["name"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(names, ["kohya-style", "peft"]);
    let (_, emb) = call_json(&s, "GET", "/sdapi/v1/embeddings", Value::Null, false).await;
    assert!(
        emb["loaded"]["tinyemb"]["vectors"].as_u64().unwrap() >= 1,
        "{emb}"
    );
    assert!(emb["skipped"]["broken"].is_object(), "{emb}");
    let (_, networks) = call_json(&s, "GET", "/api/v1/networks", Value::Null, false).await;
    assert_eq!(networks["loras"].as_array().unwrap().len(), 2);
    assert_eq!(networks["embeddings"].as_array().unwrap().len(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_prompt_with_a_lora_and_an_embedding_draws_with_them_and_records_their_hashes() {
    let dir = tempfile::tempdir().unwrap();
    let refs = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/refs");
    let data = DataDir::open(Some(dir.path())).unwrap();
    std::fs::copy(
        refs.join("lora_kohya.safetensors"),
        data.loras().join("kohya.safetensors"),
    )
    .unwrap();
    std::fs::copy(
        refs.join("tinyemb.safetensors"),
        data.embeddings().join("tinyemb.safetensors"),
    )
    .unwrap();
    let s = AppState::open(StateOptions {
        models_dirs: vec![tiny("sd1")],
        ..StateOptions::new(data, PORT)
    })
    .unwrap();
    let draw = |prompt: &str| {
        let s = s.clone();
        let body = json!({"prompt": prompt, "width": 64, "height": 64, "steps": 2, "seed": 5, "negative_prompt": ""});
        async move {
            let (status, job) = call_json(&s, "POST", "/api/v1/jobs", body, false).await;
            assert_eq!(status, StatusCode::ACCEPTED, "{job}");
            let done = s.jobs().wait(job["id"].as_str().unwrap()).await.unwrap();
            assert_eq!(done.images.len(), 1, "{:?}", done.error);
            let rec = &done.images[0];
            let pixels = image::open(s.gallery().file_path(rec))
                .unwrap()
                .to_rgb8()
                .into_raw();
            (rec.parameters.clone(), pixels)
        }
    };
    let (plain_params, plain) = draw("a cat").await;
    assert!(!plain_params.contains("Lora hashes"));
    let (params, with_lora) = draw("a cat <lora:kohya:0.7> tinyemb").await;
    assert_ne!(
        plain, with_lora,
        "the LoRA and the embedding change the picture"
    );
    assert!(
        params.contains("<lora:kohya:0.7>"),
        "the prompt is kept as written: {params}"
    );
    let lora_hash = regex_like(&params, "Lora hashes: \"kohya: ");
    let ti_hash = regex_like(&params, "TI hashes: \"tinyemb: ");
    assert_eq!((lora_hash.len(), ti_hash.len()), (12, 12), "{params}");
    // Back without them: the model is reloaded plain, the same picture as the first.
    let (_, again) = draw("a cat").await;
    assert_eq!(plain, again);

    let (status, err) = call_json(
        &s,
        "POST",
        "/api/v1/jobs",
        json!({"prompt": "<lora:nope:1> x"}),
        false,
    )
    .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(err["hint"].as_str().unwrap().contains("kohya"), "{err}");
}

/// SillyTavern's VAE list reads `/sdapi/v1/sd-vae` and sets one with POST `/sdapi/v1/options
/// {"sd_vae": model_name}`, as with A1111; our Settings page reads `vaes` from
/// `/api/v1/networks` and saves `vae` with the settings.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_vae_is_listed_chosen_the_a1111_way_and_named_in_what_it_draws() {
    let dir = tempfile::tempdir().unwrap();
    let a1111 = tempfile::tempdir().unwrap();
    let data = DataDir::open(Some(dir.path())).unwrap();
    let own_vae = tiny("sd1").join("vae/diffusion_pytorch_model.safetensors");
    let mine = data.vaes().join("mine.safetensors");
    std::fs::copy(&own_vae, &mine).unwrap();
    let anime = a1111.path().join("models/VAE/anime.safetensors");
    std::fs::create_dir_all(anime.parent().unwrap()).unwrap();
    std::fs::copy(&own_vae, &anime).unwrap();
    let s = AppState::open(StateOptions {
        models_dirs: vec![tiny("sd1"), a1111.path().to_path_buf()],
        ..StateOptions::new(data, PORT)
    })
    .unwrap();

    let (status, list) = call_json(&s, "GET", "/sdapi/v1/sd-vae", Value::Null, false).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        list,
        json!([
            {"model_name": "anime.safetensors", "filename": anime.display().to_string()},
            {"model_name": "mine.safetensors", "filename": mine.display().to_string()},
        ])
    );
    let (_, networks) = call_json(&s, "GET", "/api/v1/networks", Value::Null, false).await;
    let names: Vec<_> = networks["vaes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["anime.safetensors", "mine.safetensors"]);
    let (_, options) = call_json(&s, "GET", "/sdapi/v1/options", Value::Null, false).await;
    assert_eq!(options["sd_vae"], "Automatic");

    let set = |value: Value| {
        let s = s.clone();
        async move {
            call_json(
                &s,
                "POST",
                "/sdapi/v1/options",
                json!({ "sd_vae": value }),
                false,
            )
            .await
        }
    };
    let (status, err) = set(json!("nope.safetensors")).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(err["code"], "invalid_request");
    assert_eq!(
        err["message"],
        "There is no VAE file called 'nope.safetensors'."
    );
    let hint = err["hint"].as_str().unwrap();
    assert!(
        hint.starts_with(
            "Choose one of: \"Automatic\", \"None\", \"anime.safetensors\", \"mine.safetensors\"."
        ),
        "{hint}"
    );
    assert_eq!(
        s.settings().vae,
        "Automatic",
        "a refused name changes nothing"
    );
    // A model and a VAE together: a refused VAE switches no model either.
    let (status, _) = call_json(
        &s,
        "POST",
        "/sdapi/v1/options",
        json!({"sd_model_checkpoint": "sd1", "sd_vae": 7}),
        false,
    )
    .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(s.settings().default_model, None);

    let (status, _) = set(json!("mine.safetensors")).await;
    assert_eq!(status, StatusCode::OK);
    let (_, options) = call_json(&s, "GET", "/sdapi/v1/options", Value::Null, false).await;
    assert_eq!(options["sd_vae"], "mine.safetensors");
    let (_, settings) = call_json(&s, "GET", "/api/v1/settings", Value::Null, true).await;
    assert_eq!(settings["vae"], "mine.safetensors");
    let on_disk = ld_core::settings::load(&s.data().settings_file()).settings;
    assert_eq!(on_disk.vae, "mine.safetensors");

    let draw = || {
        let s = s.clone();
        async move {
            let body = json!({"prompt": "a cat", "width": 64, "height": 64, "steps": 1});
            let (status, answer) = call_json(&s, "POST", "/sdapi/v1/txt2img", body, false).await;
            assert_eq!(status, StatusCode::OK, "{answer}");
            serde_json::from_str::<Value>(answer["info"].as_str().unwrap()).unwrap()
        }
    };
    let info = draw().await;
    assert_eq!(info["sd_vae_name"], "mine.safetensors");
    let text = info["infotexts"][0].as_str().unwrap();
    assert!(text.contains("VAE: mine.safetensors"), "{text}");
    // A1111's AutoV2 hash of the file, as the parameters text gives it.
    let hash = info["sd_vae_hash"].as_str().unwrap();
    assert_eq!(hash.len(), 10, "{hash}");
    assert!(text.contains(&format!("VAE hash: {hash}")), "{text}");

    // "none" in any case is A1111's "None": the model's own, nothing named.
    let (status, _) = set(json!("none")).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(s.settings().vae, "None");
    let info = draw().await;
    assert!(info["sd_vae_name"].is_null(), "{info}");
    // A request's own `override_settings.sd_vae` (SillyTavern sends it with every picture):
    // used for that picture, the setting left as it was.
    let body = json!({"prompt": "a cat", "width": 64, "height": 64, "steps": 1,
        "override_settings": {"sd_vae": "mine.safetensors"}});
    let (status, answer) = call_json(&s, "POST", "/sdapi/v1/txt2img", body, false).await;
    assert_eq!(status, StatusCode::OK, "{answer}");
    let info: Value = serde_json::from_str(answer["info"].as_str().unwrap()).unwrap();
    assert_eq!(info["sd_vae_name"], "mine.safetensors");
    assert_eq!(s.settings().vae, "None");
    assert!(draw().await["sd_vae_name"].is_null());

    // Our settings route: an unknown name is refused the same way; a known one is kept as
    // listed.
    let mut wanted = settings.clone();
    wanted["vae"] = json!("Nope");
    let (status, err) = call_json(&s, "PUT", "/api/v1/settings", wanted.clone(), true).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{err}");
    assert_eq!(err["message"], "There is no VAE file called 'Nope'.");
    wanted["vae"] = json!("ANIME.safetensors");
    let (status, saved) = call_json(&s, "PUT", "/api/v1/settings", wanted.clone(), true).await;
    assert_eq!(status, StatusCode::OK, "{saved}");
    assert_eq!(saved["vae"], "anime.safetensors");
    // Gone since it was chosen: the other settings can still be saved, and drawing falls back
    // to the model's own VAE with a note instead of failing.
    std::fs::remove_file(&anime).unwrap();
    wanted["vae"] = json!("anime.safetensors");
    wanted["prompt_prefix"] = json!("masterpiece, ");
    let (status, saved) = call_json(&s, "PUT", "/api/v1/settings", wanted, true).await;
    assert_eq!(status, StatusCode::OK, "{saved}");
    assert_eq!(saved["prompt_prefix"], "masterpiece, ");
    let (status, job) = call_json(
        &s,
        "POST",
        "/api/v1/jobs",
        json!({"prompt": "a cat", "width": 64, "height": 64, "steps": 1}),
        false,
    )
    .await;
    assert_eq!(status, StatusCode::ACCEPTED, "{job}");
    let done = s.jobs().wait(job["id"].as_str().unwrap()).await.unwrap();
    assert_eq!(done.images.len(), 1, "{:?}", done.error);
    assert!(
        done.notes.iter().any(|n| n.contains("'anime.safetensors'")),
        "{:?}",
        done.notes
    );
}

/// The 12 hex digits after `prefix` in `text`.
fn regex_like(text: &str, prefix: &str) -> String {
    let start = text
        .find(prefix)
        .unwrap_or_else(|| panic!("no '{prefix}' in {text}"))
        + prefix.len();
    text[start..]
        .chars()
        .take_while(|c| c.is_ascii_hexdigit())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pickles_are_converted_without_running_them_and_never_loaded() {
    let dir = tempfile::tempdir().unwrap();
    let pickles =
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/refs/pickles");
    let run = |args: &[&str]| {
        let out = bin()
            .args(args)
            .arg("--data-dir")
            .arg(dir.path())
            .output()
            .unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let ckpt = dir.path().join("vae.ckpt");
    std::fs::copy(pickles.join("sd1_vae_ldm.ckpt"), &ckpt).unwrap();
    let (ok, text, err) = run(&["models", "convert", ckpt.to_str().unwrap()]);
    assert!(ok, "{err}");
    assert!(text.contains("tensors"), "{text}");
    let converted = dir.path().join("vae.safetensors");
    let info = ld_engine::checkpoint::inspect(&converted).expect("a valid safetensors file");
    assert!(info.has_vae, "{info:?}");

    // A pickle that would run a command is refused, and nothing is written.
    let marker = dir.path().join("pwned");
    let evil = dir.path().join("evil.ckpt");
    std::fs::copy(pickles.join("malicious_system.ckpt"), &evil).unwrap();
    let (ok, _, err) = run(&["models", "convert", evil.to_str().unwrap()]);
    assert!(!ok && err.contains("posix.system"), "{err}");
    assert!(!dir.path().join("evil.safetensors").exists() && !marker.exists());
    // generate never opens a pickle.
    let (ok, _, err) = run(&["generate", "x", "--model", ckpt.to_str().unwrap()]);
    assert!(!ok && err.contains("models convert"), "{err}");

    // The API's converter is for our window only, and names what it can convert.
    let s = AppState::open(StateOptions::new(
        DataDir::open(Some(dir.path())).unwrap(),
        PORT,
    ))
    .unwrap();
    let (status, _) = call_json(
        &s,
        "POST",
        "/api/v1/models/convert",
        json!({"name": "x"}),
        false,
    )
    .await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    let (status, err) = call_json(
        &s,
        "POST",
        "/api/v1/models/convert",
        json!({"name": "x"}),
        true,
    )
    .await;
    assert_eq!(status, StatusCode::NOT_FOUND, "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sdxl_draws_with_its_refiner_and_the_refiner_alone_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let s = AppState::open(StateOptions {
        models_dirs: vec![tiny_models()],
        ..StateOptions::new(DataDir::open(Some(dir.path())).unwrap(), PORT)
    })
    .unwrap();
    let job = json!({"prompt": "a lighthouse", "model": "sdxl", "refiner": "sdxl-refiner",
                     "refiner_switch": 0.5, "width": 64, "height": 64, "steps": 4, "seed": 3});
    let (status, queued) = call_json(&s, "POST", "/api/v1/jobs", job.clone(), false).await;
    assert_eq!(status, StatusCode::ACCEPTED, "{queued}");
    let done = s.jobs().wait(queued["id"].as_str().unwrap()).await.unwrap();
    assert_eq!(done.images.len(), 1, "{:?}", done.error);
    let params = &done.images[0].parameters;
    assert!(
        params.contains("Model: sdxl") && params.contains("Refiner: sdxl-refiner"),
        "{params}"
    );
    assert!(params.contains("Refiner switch at: 0.5"), "{params}");

    // The same through A1111's fields.
    let body = json!({"prompt": "a lighthouse", "steps": 4, "width": 64, "height": 64,
                      "override_settings": {"sd_model_checkpoint": "sdxl"},
                      "refiner_checkpoint": "sdxl-refiner", "refiner_switch_at": 0.7});
    let (status, answer) = call_json(&s, "POST", "/sdapi/v1/txt2img", body, false).await;
    assert_eq!(status, StatusCode::OK, "{answer}");
    let info: Value = serde_json::from_str(answer["info"].as_str().unwrap()).unwrap();
    assert!(
        info["infotexts"][0]
            .as_str()
            .unwrap()
            .contains("Refiner switch at: 0.7"),
        "{info}"
    );

    // Issue 12: with Low-VRAM mode On (set as the Settings page does) a chat app's refiner
    // request is drawn one model at a time, refiner included, and says so.
    let (status, mut settings) = call_json(&s, "GET", "/api/v1/settings", Value::Null, true).await;
    assert_eq!(status, StatusCode::OK, "{settings}");
    settings["low_vram"] = json!("on");
    let (status, saved) = call_json(&s, "PUT", "/api/v1/settings", settings, true).await;
    assert_eq!(status, StatusCode::OK, "{saved}");
    let (status, queued) = call_json(&s, "POST", "/api/v1/jobs", job.clone(), false).await;
    assert_eq!(status, StatusCode::ACCEPTED, "{queued}");
    let staged = s.jobs().wait(queued["id"].as_str().unwrap()).await.unwrap();
    assert_eq!(staged.images.len(), 1, "{:?}", staged.error);
    assert!(
        staged
            .notes
            .iter()
            .any(|n| n.contains("the refiner and the VAE were loaded one at a time")),
        "{:?}",
        staged.notes
    );
    let params = &staged.images[0].parameters;
    assert!(
        params.contains("Refiner: sdxl-refiner, Refiner switch at: 0.5, Low VRAM: "),
        "{params}"
    );

    let bad = [
        (
            json!({"prompt": "x", "model": "sd1", "refiner": "sdxl-refiner"}),
            "SDXL",
        ),
        (
            json!({"prompt": "x", "model": "sdxl", "refiner": "sd2"}),
            "sdxl-refiner",
        ),
        (
            json!({"prompt": "x", "model": "sdxl", "refiner": "sdxl-refiner", "refiner_switch": 2.0}),
            "between 0 and 1",
        ),
        (json!({"prompt": "x", "model": "sdxl-refiner"}), "refiner"),
    ];
    for (body, needle) in bad {
        let (status, err) = call_json(&s, "POST", "/api/v1/jobs", body.clone(), false).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{body}: {err}");
        let text = format!("{} {}", err["message"], err["hint"]);
        assert!(text.contains(needle), "{body}: '{needle}' not in {text}");
    }
}

/// A minimal single-file checkpoint: the key names that mark an SD1 file, tiny tensors.
fn fake_checkpoint(path: &std::path::Path) {
    let names = [
        "model.diffusion_model.input_blocks.0.0.weight",
        "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight",
        "first_stage_model.decoder.conv_in.weight",
    ];
    let mut header = serde_json::Map::new();
    for (i, n) in names.iter().enumerate() {
        header.insert(
            (*n).into(),
            json!({"dtype": "F32", "shape": [1], "data_offsets": [i * 4, i * 4 + 4]}),
        );
    }
    let header = serde_json::to_vec(&header).unwrap();
    let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
    bytes.extend_from_slice(&header);
    bytes.extend_from_slice(&[0u8; 12]);
    std::fs::write(path, bytes).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_single_files_hash_is_computed_on_request_and_then_listed() {
    let dir = tempfile::tempdir().unwrap();
    let data = DataDir::open(Some(dir.path())).unwrap();
    fake_checkpoint(&data.models().join("mini.safetensors"));
    let s = AppState::open(StateOptions::new(data, PORT)).unwrap();
    let (_, models) = call_json(&s, "GET", "/api/v1/models", Value::Null, false).await;
    let mini = &models["models"][0];
    assert_eq!(mini["name"], "mini", "{models}");
    assert_eq!(mini["format"], "safetensors");
    assert!(
        mini["short_hash"].is_null(),
        "not hashed until asked or used"
    );
    let (status, h) = call_json(
        &s,
        "POST",
        "/api/v1/models/hash",
        json!({"name": "mini"}),
        false,
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{h}");
    let sha = h["sha256"].as_str().unwrap().to_owned();
    assert_eq!(sha.len(), 64);
    assert_eq!(h["short_hash"].as_str().unwrap(), &sha[..10]);
    let (_, models) = call_json(&s, "GET", "/api/v1/models", Value::Null, false).await;
    assert_eq!(models["models"][0]["sha256"], sha.as_str());
    let (status, _) = call_json(
        &s,
        "POST",
        "/api/v1/models/hash",
        json!({"name": "nope"}),
        false,
    )
    .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fast_models_list_their_own_settings_for_the_ui() {
    // Found by review: the UI always sent its form's 20 steps and CFG 7, undoing a fast model's
    // own few steps; it now fills the form from the defaults listed here.
    let dir = tempfile::tempdir().unwrap();
    let s = AppState::open(StateOptions {
        models_dirs: vec![tiny_models()],
        ..StateOptions::new(DataDir::open(Some(dir.path())).unwrap(), PORT)
    })
    .unwrap();
    let (_, models) = call_json(&s, "GET", "/api/v1/models", Value::Null, false).await;
    let lcm = models["models"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["name"] == "sd1-lcm")
        .expect("the tiny LCM model");
    assert_eq!(lcm["fast"], true, "{lcm}");
    let d = &lcm["defaults"];
    assert!(d["steps"].as_u64().unwrap() <= 8, "{d}");
    assert_eq!(d["sampler"], "LCM", "{d}");
    assert!(d["cfg_scale"].as_f64().unwrap() > 0.0, "{d}");
    assert!(d["width"].as_u64().unwrap() >= 64, "{d}");
}
