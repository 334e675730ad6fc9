//! `/api/v1/characters` (list, get, create, edit, delete, import from JSON or a character-card
//! PNG, export) and `/api/v1/chat/illustrate`: pictures from a conversation.

use crate::error::{ApiError, Code};
use crate::handlers::blocking;
use crate::handlers::jobs::submit;
use crate::state::AppState;
use axum::body::Bytes;
use axum::extract::rejection::JsonRejection;
use axum::extract::{Path, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use ld_core::characters::{Character, CharacterError, Eagerness};
use ld_core::chat::{self, ChatMessage, Decision, Mode, SceneCharacter};
use ld_core::compose::GenerationInput;
use ld_core::jobs::JobInfo;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

fn character_error(e: CharacterError) -> ApiError {
    let (code, hint) = match &e {
        CharacterError::NotFound { .. } => (Code::NotFound, "Refresh the list of characters."),
        CharacterError::Write { .. } => (
            Code::Internal,
            "Check that the disk is not full and the data folder is writable.",
        ),
        CharacterError::NoCard | CharacterError::Parse(_) => (
            Code::InvalidRequest,
            "Import a character exported from Local Diffusers, or a SillyTavern/TavernAI card (PNG or JSON).",
        ),
        _ => (Code::InvalidRequest, "Correct the character and try again."),
    };
    ApiError::new(code, e.to_string(), hint)
}

pub async fn list(State(state): State<AppState>) -> Json<Vec<Character>> {
    Json(state.characters().list())
}

pub async fn get(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<Character>, ApiError> {
    state
        .characters()
        .get(&id)
        .map(Json)
        .map_err(character_error)
}

fn body_of(body: Result<Json<Character>, JsonRejection>) -> Result<Character, ApiError> {
    body.map(|Json(c)| c).map_err(|e| {
        ApiError::bad_json(
            &e,
            "Send the character as JSON: {\"name\": \"...\", \"appearance\": \"...\"}.",
        )
    })
}

/// Whether `style` names a preset (by id or name, as a job's preset is found).
fn is_preset(state: &AppState, style: &str) -> bool {
    state
        .all_presets()
        .iter()
        .any(|p| p.id.eq_ignore_ascii_case(style) || p.name.eq_ignore_ascii_case(style))
}

/// A character's style must be a preset when it is saved (found by review: any text was kept
/// and every picture of the character then failed).
fn check_style(state: &AppState, c: &Character) -> Result<(), ApiError> {
    match c.style.as_deref().map(str::trim).filter(|s| !s.is_empty()) {
        Some(style) if !is_preset(state, style) => Err(ApiError::new(
            Code::InvalidRequest,
            format!("There is no preset called '{style}' for the character's style."),
            format!(
                "Choose one of: {}.",
                state
                    .all_presets()
                    .iter()
                    .map(|p| p.id.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        )),
        _ => Ok(()),
    }
}

/// The preset a character's pictures use: its style, or `default` when it has none or its preset
/// was deleted since, with a note saying so for the job.
fn style_of(state: &AppState, style: Option<&str>, default: &str) -> (String, Option<String>) {
    match style.map(str::trim).filter(|s| !s.is_empty()) {
        Some(s) if is_preset(state, s) => (s.to_owned(), None),
        Some(s) => (
            default.to_owned(),
            Some(format!(
                "The character's style '{s}' is no longer a preset; drawn with '{default}'. Choose another style for the character."
            )),
        ),
        None => (default.to_owned(), None),
    }
}

/// An avatar must be one of the gallery's images.
fn check_avatar(state: &AppState, c: &Character) -> Result<(), ApiError> {
    if let Some(id) = c.avatar {
        let exists = state
            .gallery()
            .get(id)
            .map_err(ApiError::internal)?
            .is_some();
        if !exists {
            return Err(ApiError::new(
                Code::InvalidRequest,
                "The avatar is not an image in the gallery.",
                "Choose the avatar from the character's portraits.",
            ));
        }
    }
    Ok(())
}

pub async fn create(
    State(state): State<AppState>,
    body: Result<Json<Character>, JsonRejection>,
) -> Result<Json<Character>, ApiError> {
    let c = body_of(body)?;
    blocking(move || {
        check_avatar(&state, &c)?;
        check_style(&state, &c)?;
        state
            .characters()
            .create(c)
            .map(Json)
            .map_err(character_error)
    })
    .await
}

pub async fn update(
    State(state): State<AppState>,
    Path(id): Path<String>,
    body: Result<Json<Character>, JsonRejection>,
) -> Result<Json<Character>, ApiError> {
    let c = body_of(body)?;
    blocking(move || {
        check_avatar(&state, &c)?;
        // A style kept from before its preset was deleted does not block other edits.
        let kept = state.characters().get(&id).ok().map(|old| old.style) == Some(c.style.clone());
        if !kept {
            check_style(&state, &c)?;
        }
        state
            .characters()
            .update(&id, c)
            .map(Json)
            .map_err(character_error)
    })
    .await
}

pub async fn delete(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    blocking(move || {
        state.characters().delete(&id).map_err(character_error)?;
        Ok(Json(json!({"deleted": id})))
    })
    .await
}

/// The body is our JSON export, a card's JSON, or a character-card PNG (told apart by its
/// signature, not by a header the client may get wrong).
pub async fn import(
    State(state): State<AppState>,
    body: Bytes,
) -> Result<Json<Character>, ApiError> {
    blocking(move || {
        let store = state.characters();
        let result = if body.starts_with(b"\x89PNG") {
            store.import_card_png(&body)
        } else {
            let text = std::str::from_utf8(&body).map_err(|_| {
                character_error(CharacterError::Parse(
                    "the file is not text or a PNG".into(),
                ))
            })?;
            store.import_json(text)
        };
        result.map(Json).map_err(character_error)
    })
    .await
}

pub async fn export(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let text = state
        .characters()
        .export_json(&id)
        .map_err(character_error)?;
    Ok((
        [
            (header::CONTENT_TYPE, "application/json".to_owned()),
            (
                header::CONTENT_DISPOSITION,
                format!("attachment; filename=\"{id}.json\""),
            ),
        ],
        text,
    )
        .into_response())
}

/// Optional overrides for a portrait.
#[derive(Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PortraitOptions {
    pub model: Option<String>,
    pub seed: Option<i64>,
    pub steps: Option<usize>,
    pub width: Option<usize>,
    pub height: Option<usize>,
}

/// One click: a portrait from the character's appearance with its style (default Portrait) and
/// its locked seed, so the look stays the same.
pub async fn portrait(
    State(state): State<AppState>,
    Path(id): Path<String>,
    body: Option<Json<PortraitOptions>>,
) -> Result<(StatusCode, Json<Illustrated>), ApiError> {
    let opts = body.map(|Json(o)| o).unwrap_or_default();
    let c = state.characters().get(&id).map_err(character_error)?;
    let scene = SceneCharacter {
        name: c.name.clone(),
        appearance: c.appearance.clone(),
    };
    let prompt = chat::write_prompt(Mode::Portrait, &[], &[scene], None);
    let (preset, note) = style_of(&state, c.style.as_deref(), "portrait");
    let input = GenerationInput {
        prompt: prompt.clone(),
        negative_prompt: (!c.negative_prompt.trim().is_empty()).then(|| c.negative_prompt.clone()),
        preset: Some(preset),
        model: opts.model.or(c.model.clone()),
        seed: opts.seed.or(c.seed.map(|s| s as i64)),
        steps: opts.steps,
        width: opts.width,
        height: opts.height,
        ..Default::default()
    };
    let job = submit(&state, input).await?;
    if let Some(note) = note {
        state.jobs().add_note(&job.id, &note);
    }
    Ok((
        StatusCode::ACCEPTED,
        Json(Illustrated::queued(
            Mode::Portrait,
            format!("A portrait of {}.", c.name),
            "built_in",
            None,
            job,
        )),
    ))
}

/// A character named in a chat request: one of ours by id or name, or described inline.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum CharacterRef {
    Named(String),
    Inline {
        name: String,
        #[serde(default)]
        appearance: String,
    },
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IllustrateRequest {
    pub messages: Vec<ChatMessage>,
    #[serde(default)]
    pub characters: Vec<CharacterRef>,
    /// The user's persona, for `user` mode.
    #[serde(default)]
    pub user: Option<CharacterRef>,
    #[serde(default = "auto")]
    pub mode: Mode,
    #[serde(default)]
    pub preset: Option<String>,
    #[serde(default)]
    pub model: Option<String>,
    #[serde(default)]
    pub width: Option<usize>,
    #[serde(default)]
    pub height: Option<usize>,
    #[serde(default)]
    pub steps: Option<usize>,
    #[serde(default)]
    pub seed: Option<i64>,
}

fn auto() -> Mode {
    Mode::Auto
}

#[derive(Debug, Serialize)]
pub struct Illustrated {
    /// Whether a picture was queued.
    pub picture: bool,
    pub mode: Option<Mode>,
    /// Why (or why not) in plain words.
    pub reason: String,
    pub prompt: Option<String>,
    pub negative_prompt: Option<String>,
    /// "built_in" or "chat_server".
    pub writer: Option<&'static str>,
    /// Set when the chat server failed and the built-in writer was used.
    pub note: Option<String>,
    pub job: Option<JobInfo>,
}

impl Illustrated {
    /// A picture was queued; the prompt shown is the one the job really uses (with affixes).
    fn queued(
        mode: Mode,
        reason: String,
        writer: &'static str,
        note: Option<String>,
        job: JobInfo,
    ) -> Self {
        Self {
            picture: true,
            mode: Some(mode),
            reason,
            prompt: Some(job.prompt.clone()),
            negative_prompt: Some(job.negative_prompt.clone()),
            writer: Some(writer),
            note,
            job: Some(job),
        }
    }
}

/// Most messages we read; chat apps may send the whole history.
const MAX_MESSAGES: usize = 50;

pub async fn illustrate(
    State(state): State<AppState>,
    body: Result<Json<IllustrateRequest>, JsonRejection>,
) -> Result<(StatusCode, Json<Illustrated>), ApiError> {
    let Json(mut req) = body.map_err(|e| {
        ApiError::bad_json(
            &e,
            "Send {\"messages\": [{\"role\": \"user\", \"text\": \"...\"}], \"characters\": [\"name\"], \"mode\": \"auto\"}.",
        )
    })?;
    if req.messages.len() > MAX_MESSAGES {
        req.messages.drain(..req.messages.len() - MAX_MESSAGES);
    }
    if req.messages.is_empty() && req.mode != Mode::Portrait && req.mode != Mode::User {
        return Err(ApiError::new(
            Code::InvalidRequest,
            "There are no messages to draw from.",
            "Send the recent messages of the conversation.",
        ));
    }

    // Resolve the characters: ours carry seed, model, style and eagerness.
    let mut ours: Vec<Option<Character>> = Vec::new();
    let mut scene: Vec<SceneCharacter> = Vec::new();
    for r in &req.characters {
        match r {
            CharacterRef::Named(n) => {
                let c = state.characters().find(n).ok_or_else(|| {
                    ApiError::new(
                        Code::NotFound,
                        format!("There is no character called '{}'.", n.chars().take(80).collect::<String>()),
                        "Create the character on the Characters page, or describe it inline: {\"name\": ..., \"appearance\": ...}.",
                    )
                })?;
                scene.push(SceneCharacter {
                    name: c.name.clone(),
                    appearance: c.appearance.clone(),
                });
                ours.push(Some(c));
            }
            CharacterRef::Inline { name, appearance } => {
                let stored = state.characters().find(name);
                scene.push(SceneCharacter {
                    name: name.clone(),
                    appearance: if appearance.trim().is_empty() {
                        stored
                            .as_ref()
                            .map(|c| c.appearance.clone())
                            .unwrap_or_default()
                    } else {
                        appearance.clone()
                    },
                });
                ours.push(stored);
            }
        }
    }
    let user = req.user.as_ref().map(|u| match u {
        CharacterRef::Named(n) => state
            .characters()
            .find(n)
            .map(|c| SceneCharacter {
                name: c.name,
                appearance: c.appearance,
            })
            .unwrap_or(SceneCharacter {
                name: n.clone(),
                appearance: String::new(),
            }),
        CharacterRef::Inline { name, appearance } => SceneCharacter {
            name: name.clone(),
            appearance: appearance.clone(),
        },
    });
    let main = ours.first().cloned().flatten();

    let (mode, literal, reason) = if req.mode == Mode::Auto {
        let eagerness = main.as_ref().map_or(Eagerness::Normal, |c| c.eagerness);
        match chat::decide(&req.messages, eagerness) {
            Decision::Draw {
                mode,
                literal,
                reason,
            } => (mode, literal, reason),
            Decision::NoPicture { reason } => {
                return Ok((
                    StatusCode::OK,
                    Json(Illustrated {
                        picture: false,
                        mode: None,
                        reason,
                        prompt: None,
                        negative_prompt: None,
                        writer: None,
                        note: None,
                        job: None,
                    }),
                ))
            }
        }
    } else {
        (req.mode, None, "Asked for.".to_owned())
    };

    let settings = state.settings();
    let (prompt, writer, note) = match literal {
        Some(l) => (l, "built_in", None),
        None => {
            let built_in = || chat::write_prompt(mode, &req.messages, &scene, user.as_ref());
            if settings.chat_writer.enabled {
                match chat::llm_prompt(&settings.chat_writer, mode, &req.messages, &scene).await {
                    Ok(p) => (p, "chat_server", None),
                    Err(why) => {
                        tracing::warn!(%why, "chat server could not write the prompt");
                        (
                            built_in(),
                            "built_in",
                            Some(format!(
                                "The chat server could not write the prompt ({why}); the built-in writer was used."
                            )),
                        )
                    }
                }
            } else {
                (built_in(), "built_in", None)
            }
        }
    };

    // A portrait of one of ours keeps its locked seed, model and style.
    let portrait_of_ours = matches!(mode, Mode::Portrait)
        .then_some(main.as_ref())
        .flatten();
    let default_preset = match mode {
        Mode::Portrait | Mode::User => "portrait",
        _ => "scene",
    };
    let negative = main
        .as_ref()
        .map(|c| c.negative_prompt.trim().to_owned())
        .filter(|n| !n.is_empty());
    // A preset the request names is its own (an unknown one is refused by name); a character's
    // style falls back to the default when its preset was deleted.
    let (preset, style_note) = match &req.preset {
        Some(p) => (p.clone(), None),
        None => style_of(
            &state,
            main.as_ref().and_then(|c| c.style.as_deref()),
            default_preset,
        ),
    };
    let input = GenerationInput {
        prompt,
        negative_prompt: negative,
        preset: Some(preset),
        model: req
            .model
            .clone()
            .or_else(|| main.as_ref().and_then(|c| c.model.clone())),
        seed: req
            .seed
            .or_else(|| portrait_of_ours.and_then(|c| c.seed.map(|s| s as i64))),
        width: req.width,
        height: req.height,
        steps: req.steps,
        ..Default::default()
    };
    let job = submit(&state, input).await?;
    if let Some(style_note) = style_note {
        state.jobs().add_note(&job.id, &style_note);
    }
    Ok((
        StatusCode::ACCEPTED,
        Json(Illustrated::queued(mode, reason, writer, note, job)),
    ))
}
