//! Characters and pictures from a conversation through the API, with the tiny model; the language
//! model path against a real local HTTP server speaking the OpenAI chat API. Pins issue #10.

use axum::body::Body;
use axum::http::StatusCode;
use base64::Engine as _;
use ld_core::datadir::DataDir;
use ld_server::{AppState, StateOptions};
use serde_json::{json, Value};
use std::time::Duration;

use crate::support::{call, call_json, tiny_models, PORT};

fn state(dir: &tempfile::TempDir) -> AppState {
    AppState::open(StateOptions {
        models_dirs: vec![tiny_models()],
        ..StateOptions::new(DataDir::open(Some(dir.path())).unwrap(), PORT)
    })
    .unwrap()
}

async fn wait_done(s: &AppState, id: &str) -> ld_core::jobs::JobInfo {
    tokio::time::timeout(Duration::from_secs(120), s.jobs().wait(id))
        .await
        .expect("the job finishes")
        .expect("the job exists")
}

fn small() -> Value {
    json!({"width": 64, "height": 64, "steps": 2})
}

async fn seraphina(s: &AppState) -> Value {
    let c = json!({"name": "Seraphina", "appearance": "young woman, long silver hair, green eyes", "seed": 777, "model": "sd1"});
    let (status, created) = call_json(s, "POST", "/api/v1/characters", c, true).await;
    assert_eq!(status, StatusCode::OK, "{created}");
    created
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn characters_are_managed_imported_and_exported() {
    let dir = tempfile::tempdir().unwrap();
    let s = state(&dir);
    let c = json!({"name": "Seraphina", "appearance": "silver hair"});
    let (status, _) = call_json(&s, "POST", "/api/v1/characters", c, false).await;
    assert_eq!(
        status,
        StatusCode::UNAUTHORIZED,
        "only our window creates characters"
    );
    let created = seraphina(&s).await;
    assert_eq!(created["id"], "seraphina");
    let (_, list) = call_json(&s, "GET", "/api/v1/characters", Value::Null, false).await;
    assert_eq!(list.as_array().unwrap().len(), 1);

    let mut edited = created.clone();
    edited["appearance"] = json!("short black hair");
    edited["eagerness"] = json!("high");
    let (status, after) = call_json(&s, "PUT", "/api/v1/characters/seraphina", edited, true).await;
    assert_eq!(status, StatusCode::OK, "{after}");
    assert_eq!(after["eagerness"], "high");
    let mut bad = after.clone();
    bad["avatar"] = json!(999);
    let (status, err) = call_json(&s, "PUT", "/api/v1/characters/seraphina", bad, true).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{err}");

    // Export, then import the file back; and a SillyTavern card PNG.
    let (status, exported) = call(
        &s,
        "GET",
        "/api/v1/characters/seraphina/export",
        Body::empty(),
        false,
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    let (status, again) = call(
        &s,
        "POST",
        "/api/v1/characters/import",
        Body::from(exported),
        true,
    )
    .await;
    assert_eq!(
        status,
        StatusCode::OK,
        "{}",
        String::from_utf8_lossy(&again)
    );
    let card = json!({"spec": "chara_card_v2", "data": {"name": "Kael", "description": "Kael is a tall knight with short black hair and blue eyes, in silver armor. He is brave."}});
    let mut png = Vec::new();
    {
        let mut enc = png::Encoder::new(&mut png, 1, 1);
        enc.set_color(png::ColorType::Rgb);
        enc.add_text_chunk(
            "chara".into(),
            base64::engine::general_purpose::STANDARD.encode(card.to_string()),
        )
        .unwrap();
        let mut w = enc.write_header().unwrap();
        w.write_image_data(&[1, 2, 3]).unwrap();
    }
    let (status, kael) = call(
        &s,
        "POST",
        "/api/v1/characters/import",
        Body::from(png),
        true,
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{}", String::from_utf8_lossy(&kael));
    let kael: Value = serde_json::from_slice(&kael).unwrap();
    assert_eq!(kael["name"], "Kael");
    assert!(kael["appearance"]
        .as_str()
        .unwrap()
        .contains("short black hair"));
    let (status, _) = call(
        &s,
        "POST",
        "/api/v1/characters/import",
        Body::from("garbage"),
        true,
    )
    .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);

    for path in [
        "/api/v1/characters/..%2F..%2Fsettings",
        "/api/v1/characters/..%2Fsettings/export",
    ] {
        let (status, _) = call(&s, "GET", path, Body::empty(), false).await;
        assert_eq!(status, StatusCode::NOT_FOUND, "{path}");
    }
    let (status, _) = call(
        &s,
        "DELETE",
        "/api/v1/characters/seraphina",
        Body::empty(),
        true,
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    let (status, _) = call(
        &s,
        "GET",
        "/api/v1/characters/seraphina",
        Body::empty(),
        false,
    )
    .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_portrait_keeps_the_characters_seed_and_look() {
    let dir = tempfile::tempdir().unwrap();
    let s = state(&dir);
    seraphina(&s).await;
    let (status, answer) = call_json(
        &s,
        "POST",
        "/api/v1/characters/seraphina/portrait",
        small(),
        false,
    )
    .await;
    assert_eq!(status, StatusCode::ACCEPTED, "{answer}");
    let prompt = answer["prompt"].as_str().unwrap();
    assert!(
        prompt.contains("Seraphina, young woman, long silver hair, green eyes"),
        "{prompt}"
    );
    let done = wait_done(&s, answer["job"]["id"].as_str().unwrap()).await;
    assert_eq!(done.images.len(), 1, "{:?}", done.error);
    assert_eq!(done.images[0].seed, Some(777), "the locked seed");
    // Two steps: the time between them is the job's time per step.
    assert!(done.step_ms.is_some());
    assert!(done.images[0].parameters.contains("long silver hair"));
    assert_eq!(done.model, "sd1");
}

/// Found by review: a character's style could name no preset, and deleting the preset it named
/// made every picture of the character fail with "There is no preset called ...".
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_characters_style_must_be_a_preset_and_a_deleted_one_falls_back() {
    let dir = tempfile::tempdir().unwrap();
    let s = state(&dir);
    let mine = json!({"name": "Moody", "width": 64, "height": 64, "steps": 2});
    let (status, preset) = call_json(&s, "POST", "/api/v1/presets", mine, true).await;
    assert_eq!(status, StatusCode::OK, "{preset}");
    let c = json!({"name": "Ann", "appearance": "a woman", "style": "nonexistent-style", "model": "sd1"});
    let (status, err) = call_json(&s, "POST", "/api/v1/characters", c, true).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{err}");
    assert!(err["message"]
        .as_str()
        .unwrap()
        .contains("nonexistent-style"));
    assert!(err["hint"].as_str().unwrap().contains("moody"), "{err}");
    let c = json!({"name": "Ann", "appearance": "a woman", "style": "moody", "model": "sd1"});
    let (status, ann) = call_json(&s, "POST", "/api/v1/characters", c, true).await;
    assert_eq!(status, StatusCode::OK, "{ann}");

    let (status, _) = call_json(&s, "DELETE", "/api/v1/presets/moody", Value::Null, true).await;
    assert!(status.is_success(), "{status}");
    // Other edits of the character still save with the style it had.
    let mut edited = ann.clone();
    edited["appearance"] = json!("a tall woman");
    let (status, saved) = call_json(&s, "PUT", "/api/v1/characters/ann", edited, true).await;
    assert_eq!(status, StatusCode::OK, "{saved}");
    let (status, answer) = call_json(
        &s,
        "POST",
        "/api/v1/characters/ann/portrait",
        small(),
        false,
    )
    .await;
    assert_eq!(status, StatusCode::ACCEPTED, "{answer}");
    let done = wait_done(&s, answer["job"]["id"].as_str().unwrap()).await;
    assert_eq!(done.images.len(), 1, "{:?}", done.error);
    assert!(
        done.notes
            .iter()
            .any(|n| n.contains("'moody' is no longer a preset")),
        "{:?}",
        done.notes
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_chat_request_for_a_picture_lands_in_the_gallery_with_its_prompt() {
    let dir = tempfile::tempdir().unwrap();
    let s = state(&dir);
    seraphina(&s).await;
    let mut body = json!({
        "messages": [
            {"role": "assistant", "name": "Seraphina", "text": "*She sits by the fireplace, wrapped in a red shawl.* \"It's cold tonight.\""},
            {"role": "user", "name": "Alex", "text": "Send me a selfie!"}
        ],
        "characters": ["Seraphina"],
        "mode": "auto",
    });
    for (k, v) in small().as_object().unwrap() {
        body[k] = v.clone();
    }
    let (status, answer) = call_json(&s, "POST", "/api/v1/chat/illustrate", body, false).await;
    assert_eq!(status, StatusCode::ACCEPTED, "{answer}");
    assert_eq!(answer["picture"], true);
    assert_eq!(answer["mode"], "portrait");
    assert_eq!(answer["writer"], "built_in");
    let prompt = answer["prompt"].as_str().unwrap().to_owned();
    assert!(
        prompt.contains("long silver hair") && prompt.contains("red shawl"),
        "{prompt}"
    );
    assert!(!prompt.contains("cold tonight"), "no dialogue: {prompt}");
    let done = wait_done(&s, answer["job"]["id"].as_str().unwrap()).await;
    let id = done.images[0].id;
    let rec = s.gallery().get(id).unwrap().unwrap();
    assert_eq!(
        rec.prompt, prompt,
        "the gallery records the prompt that was used"
    );

    // Nothing to draw: a plain answer, no job.
    let quiet = json!({"messages": [{"role": "user", "text": "How are you?"}, {"role": "assistant", "text": "\"Fine!\""}], "characters": ["seraphina"]});
    let (status, answer) = call_json(&s, "POST", "/api/v1/chat/illustrate", quiet, false).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(answer["picture"], false);
    assert!(answer["reason"].as_str().unwrap().contains("Nobody asked"));

    // Bad input is explained.
    let (status, err) = call_json(
        &s,
        "POST",
        "/api/v1/chat/illustrate",
        json!({"messages": [{"role": "user", "text": "draw"}], "characters": ["Nobody"]}),
        false,
    )
    .await;
    assert_eq!(status, StatusCode::NOT_FOUND, "{err}");
    let (status, _) = call_json(
        &s,
        "POST",
        "/api/v1/chat/illustrate",
        json!({"messages": [], "mode": "scene"}),
        false,
    )
    .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    let (status, _) = call_json(
        &s,
        "POST",
        "/api/v1/chat/illustrate",
        json!({"messages": [{"role": "wizard", "text": "x"}]}),
        false,
    )
    .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
}

/// A stand-in for llama.cpp/Ollama: answers /v1/chat/completions with a fixed prompt, or fails.
async fn fake_chat_server(fail: bool) -> (String, tokio::sync::mpsc::UnboundedReceiver<Value>) {
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    let handler = move |axum::Json(body): axum::Json<Value>| {
        let tx = tx.clone();
        async move {
            tx.send(body).unwrap();
            if fail {
                return (
                    StatusCode::INTERNAL_SERVER_ERROR,
                    axum::Json(json!({"error": "model not loaded"})),
                );
            }
            (
                StatusCode::OK,
                axum::Json(
                    json!({"choices": [{"message": {"role": "assistant", "content": "Prompt: \"silver-haired woman by a fireplace, warm light\""}}]}),
                ),
            )
        }
    };
    let router = axum::Router::new().route("/v1/chat/completions", axum::routing::post(handler));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/v1", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, router).await.unwrap() });
    (url, rx)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_configured_chat_server_writes_the_prompt_and_failures_fall_back() {
    let dir = tempfile::tempdir().unwrap();
    let s = state(&dir);
    seraphina(&s).await;
    let request = json!({
        "messages": [{"role": "assistant", "name": "Seraphina", "text": "*She sits by the fireplace.*"}],
        "characters": ["seraphina"],
        "mode": "scene",
        "width": 64, "height": 64, "steps": 1,
    });

    let (url, mut seen) = fake_chat_server(false).await;
    let mut settings = s.settings();
    settings.chat_writer.enabled = true;
    settings.chat_writer.url = url;
    settings.chat_writer.model = "llama3".into();
    settings.chat_writer.system_prompt = "Write SD prompts.".into();
    s.set_settings(settings.clone());
    let (status, answer) = call_json(
        &s,
        "POST",
        "/api/v1/chat/illustrate",
        request.clone(),
        false,
    )
    .await;
    assert_eq!(status, StatusCode::ACCEPTED, "{answer}");
    assert_eq!(answer["writer"], "chat_server");
    assert!(answer["note"].is_null());
    let prompt = answer["prompt"].as_str().unwrap();
    assert!(
        prompt.contains("silver-haired woman by a fireplace, warm light"),
        "{prompt}"
    );
    assert!(
        !prompt.contains("Prompt:") && !prompt.contains('"'),
        "{prompt}"
    );
    let sent = seen.recv().await.unwrap();
    assert_eq!(sent["model"], "llama3");
    assert_eq!(sent["messages"][0]["content"], "Write SD prompts.");
    let brief = sent["messages"][1]["content"].as_str().unwrap();
    assert!(
        brief.contains("long silver hair") && brief.contains("She sits by the fireplace"),
        "{brief}"
    );

    // The server fails: the built-in writer steps in and says so.
    let (url, _seen) = fake_chat_server(true).await;
    settings.chat_writer.url = url;
    s.set_settings(settings.clone());
    let (status, answer) = call_json(
        &s,
        "POST",
        "/api/v1/chat/illustrate",
        request.clone(),
        false,
    )
    .await;
    assert_eq!(status, StatusCode::ACCEPTED, "{answer}");
    assert_eq!(answer["writer"], "built_in");
    assert!(answer["note"].as_str().unwrap().contains("500"), "{answer}");
    assert!(answer["prompt"].as_str().unwrap().contains("fireplace"));

    // Nobody listening at all.
    settings.chat_writer.url = "http://127.0.0.1:9/v1".into();
    s.set_settings(settings);
    let (_, answer) = call_json(&s, "POST", "/api/v1/chat/illustrate", request, false).await;
    assert_eq!(answer["writer"], "built_in");
    assert!(
        answer["note"].as_str().unwrap().contains("did not answer"),
        "{answer}"
    );
}
