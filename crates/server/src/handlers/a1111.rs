//! The parts of the AUTOMATIC1111 web UI's API (`/sdapi/v1/...`) that chat apps use (SillyTavern,
//! Open WebUI, Voxta), so they connect to us with their A1111 setting and nothing else. Field
//! defaults and answer shapes follow A1111; requests go through the same composer and queue as
//! our own UI.

use crate::error::{ApiError, Code};
use crate::handlers::jobs::{submit_noted, wait_for};
use crate::state::AppState;
use axum::extract::rejection::JsonRejection;
use axum::extract::{Query, State};
use axum::Json;
use base64::Engine as _;
use ld_core::compose::GenerationInput;
use ld_core::compose::HiresInput;
use ld_core::jobs::{JobInfo, JobState};
use ld_engine::hires::HiresUpscaler;
use ld_engine::sampler::SamplerKind;
use ld_engine::schedule::ScheduleKind;
use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};

/// A1111's `StableDiffusionTxt2ImgProcessingAPI` fields we act on, with its defaults. Anything
/// else a client sends is accepted and echoed back (A1111 does the same).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default)]
pub struct Txt2Img {
    pub prompt: String,
    pub negative_prompt: String,
    pub seed: i64,
    pub sampler_name: Option<String>,
    pub sampler_index: Option<String>,
    pub scheduler: Option<String>,
    pub batch_size: usize,
    pub n_iter: usize,
    pub steps: usize,
    pub cfg_scale: f64,
    pub width: usize,
    pub height: usize,
    pub override_settings: Map<String, Value>,
    /// Some clients (SillyTavern) send clip skip here as well as in override_settings.
    pub clip_skip: Option<usize>,
    pub send_images: bool,
    pub save_images: bool,
    /// A1111 1.6+: the SDXL refiner and where it takes over.
    pub refiner_checkpoint: Option<String>,
    pub refiner_switch_at: Option<f64>,
    /// The hires fix: a second pass at `hr_scale` times the size (or `hr_resize_x`/`_y`).
    pub enable_hr: bool,
    pub hr_scale: f64,
    pub hr_resize_x: usize,
    pub hr_resize_y: usize,
    pub hr_second_pass_steps: usize,
    pub hr_upscaler: Option<String>,
    pub denoising_strength: Option<f64>,
}

impl Default for Txt2Img {
    fn default() -> Self {
        Self {
            prompt: String::new(),
            negative_prompt: String::new(),
            seed: -1,
            sampler_name: None,
            sampler_index: None,
            scheduler: None,
            batch_size: 1,
            n_iter: 1,
            steps: 50,
            cfg_scale: 7.0,
            width: 512,
            height: 512,
            override_settings: Map::new(),
            clip_skip: None,
            send_images: true,
            save_images: false,
            refiner_checkpoint: None,
            refiner_switch_at: None,
            enable_hr: false,
            hr_scale: ld_core::compose::HIRES_SCALE,
            hr_resize_x: 0,
            hr_resize_y: 0,
            hr_second_pass_steps: 0,
            hr_upscaler: None,
            denoising_strength: None,
        }
    }
}

impl Txt2Img {
    /// The request in our terms. A1111 floors sizes to multiples of 8; so do we, so a chat app's
    /// 500x700 works here as it does there.
    pub fn to_input(&self) -> GenerationInput {
        let setting = |key: &str| self.override_settings.get(key);
        let clip_skip = setting("CLIP_stop_at_last_layers")
            .and_then(Value::as_u64)
            .map(|v| v as usize)
            .or(self.clip_skip);
        let model = setting("sd_model_checkpoint")
            .and_then(Value::as_str)
            .map(str::to_owned);
        // For this request only, as A1111 restores it afterwards (and we never save it).
        let vae = setting("sd_vae").and_then(Value::as_str).map(str::to_owned);
        let sampler = self
            .sampler_name
            .clone()
            .or_else(|| self.sampler_index.clone())
            .filter(|s| !s.trim().is_empty())
            // A1111 draws with Euler when the request names no sampler.
            .unwrap_or_else(|| "Euler".to_owned());
        GenerationInput {
            prompt: self.prompt.clone(),
            negative_prompt: (!self.negative_prompt.trim().is_empty())
                .then(|| self.negative_prompt.clone()),
            model,
            width: Some(self.width / 8 * 8),
            height: Some(self.height / 8 * 8),
            steps: Some(self.steps),
            cfg_scale: Some(self.cfg_scale),
            sampler: Some(sampler),
            schedule: self
                .scheduler
                .clone()
                .filter(|s| !s.trim().is_empty())
                .map(|s| schedule_from_a1111(&s)),
            seed: Some(self.seed),
            // Saturating: a product past the limit is refused by its size, not wrapped to a
            // small one (found by review; a huge pair wrapped to 0 in release builds).
            batch_size: Some(self.batch_size.max(1).saturating_mul(self.n_iter.max(1))),
            clip_skip,
            // A1111 sends "None" (the text) for no refiner.
            refiner: self
                .refiner_checkpoint
                .clone()
                .filter(|r| !r.trim().is_empty() && r != "None"),
            refiner_switch: self.refiner_switch_at,
            hires: self.enable_hr.then(|| HiresInput {
                scale: Some(self.hr_scale),
                // As sent: A1111's cut works on the exact sizes (compose floors what it must).
                width: Some(self.hr_resize_x),
                height: Some(self.hr_resize_y),
                steps: Some(self.hr_second_pass_steps),
                // A1111's API default (its UI's is 0.7).
                denoise: Some(self.denoising_strength.unwrap_or(0.75)),
                upscaler: self.hr_upscaler.clone(),
            }),
            vae,
            ..Default::default()
        }
    }
}

/// The sampler A1111 1.9+ draws with for a name it does not know (its first).
const A1111_FALLBACK_SAMPLER: &str = "DPM++ 2M";

/// A1111 1.9+ draws with its first sampler when it does not know the one asked for, and with
/// Automatic for an unknown scheduler, where we would refuse the request. Chat apps keep
/// sending names they saved for another A1111 build (SillyTavern resends its stored scheduler
/// whatever our list says; Open WebUI offers samplers such as "Restart"), and Open WebUI shows
/// only `'images'` for a refusal. So this edge does as A1111 does, and says so in a job note.
fn a1111_fallbacks(input: &mut GenerationInput) -> Vec<String> {
    let mut notes = Vec::new();
    if let Some(name) = input.sampler.clone() {
        if ld_engine::sampler::parse_sampler(&name).is_err() {
            // A fused name's schedule still counts ("Restart Karras"), and wins over
            // `scheduler`, as in A1111's `get_sampler_and_scheduler`.
            if let Some((_, k)) = ld_engine::schedule::fused_schedules(&name).next() {
                input.schedule = Some(k.name().to_owned());
            }
            notes.push(format!(
                "The sampler '{}' is not available here, so '{A1111_FALLBACK_SAMPLER}' drew the picture.",
                name.trim()
            ));
            input.sampler = Some(A1111_FALLBACK_SAMPLER.to_owned());
        }
    }
    if let Some(name) = input.schedule.clone() {
        if ScheduleKind::from_name(&name).is_none() {
            notes.push(format!(
                "The schedule '{}' is not available here, so the sampler's own (Automatic) was used.",
                name.trim()
            ));
            input.schedule = None;
        }
    }
    notes
}

/// A1111 schedule ids ("karras", "sgm_uniform", "automatic") and labels ("SGM Uniform") both
/// work; ids without a match are passed on for the composer's error to list the valid ones.
fn schedule_from_a1111(name: &str) -> String {
    let wanted = name.trim();
    ScheduleKind::ALL
        .iter()
        .find(|k| a1111_schedule_id(**k).eq_ignore_ascii_case(wanted))
        .map(|k| k.name().to_owned())
        .unwrap_or_else(|| wanted.to_owned())
}

/// A1111's internal schedule name: its label in lower case with underscores ("sgm_uniform").
fn a1111_schedule_id(k: ScheduleKind) -> String {
    match k {
        ScheduleKind::DdimUniform => "ddim".to_owned(),
        other => other.name().to_ascii_lowercase().replace(' ', "_"),
    }
}

pub async fn txt2img(
    State(state): State<AppState>,
    body: Result<Json<Value>, JsonRejection>,
) -> Result<Json<Value>, ApiError> {
    let Json(raw) = body.map_err(|e| {
        ApiError::bad_json(
            &e,
            "Send the txt2img fields as a JSON object, as A1111 expects.",
        )
    })?;
    let mut raw = raw;
    coerce_like_a1111(&mut raw);
    let req: Txt2Img = serde_json::from_value(raw.clone()).map_err(|e| {
        ApiError::new(
            Code::InvalidRequest,
            format!("A txt2img field has the wrong type: {e}"),
            "Check the request against the A1111 API: numbers as numbers, text as text.",
        )
    })?;
    let pictures = req.batch_size.max(1).saturating_mul(req.n_iter.max(1));
    if pictures > ld_core::compose::MAX_BATCH && req.n_iter > 1 {
        return Err(ApiError::new(
            Code::InvalidRequest,
            format!(
                "batch_size {} times n_iter {} asks for more pictures than the {} drawn at once.",
                req.batch_size,
                req.n_iter,
                ld_core::compose::MAX_BATCH
            ),
            "Lower batch_size or n_iter, or send the request again for more pictures.",
        ));
    }
    // Checked before the sizes are floored to multiples of 8, so the error names what was sent.
    use ld_engine::pipeline::{MAX_SIZE, MIN_SIZE};
    for (field, v) in [("width", req.width), ("height", req.height)] {
        if !(MIN_SIZE..=MAX_SIZE).contains(&v) {
            return Err(ApiError::new(
                Code::InvalidRequest,
                format!("{field} must be between {MIN_SIZE} and {MAX_SIZE} pixels, got {v}."),
                "512 suits SD 1.5 models, 1024 SDXL models.",
            ));
        }
    }
    let mut input = req.to_input();
    let notes = a1111_fallbacks(&mut input);
    let job = submit_noted(&state, input, notes).await?;
    let done = wait_for(&state, &job.id).await?;
    if done.state == JobState::Failed {
        let err = done.error.as_ref().expect("a failed job has its error");
        return Err(ApiError::from_job(err));
    }
    let images = if req.send_images {
        read_images(&state, &done).await?
    } else {
        Vec::new()
    };
    // Echo the request with A1111's defaults filled in, keeping fields we do not use, except
    // SillyTavern's `auth` ("user:password", sent in the body beside its URL): a credential
    // has no place in an answer that clients log.
    let mut parameters = serde_json::to_value(&req).unwrap_or_default();
    if let (Some(p), Value::Object(orig)) = (parameters.as_object_mut(), raw) {
        for (k, v) in orig {
            if k != "auth" {
                p.entry(k).or_insert(v);
            }
        }
    }
    Ok(Json(json!({
        "images": images,
        "parameters": parameters,
        "info": info_json(&done).to_string(),
    })))
}

/// Loosens a txt2img body the way A1111's request parsing (pydantic) does, so clients written
/// against it work here: `null` means "the default" (the field is dropped), numbers may come as
/// text (`"steps": "20"`), and whole numbers as floats (`"seed": -1.0`, JavaScript's numbers).
/// What still does not fit gets the type error.
fn coerce_like_a1111(raw: &mut Value) {
    const WHOLE: &[&str] = &[
        "seed",
        "batch_size",
        "n_iter",
        "steps",
        "width",
        "height",
        "clip_skip",
        "hr_resize_x",
        "hr_resize_y",
        "hr_second_pass_steps",
    ];
    const REAL: &[&str] = &[
        "cfg_scale",
        "refiner_switch_at",
        "hr_scale",
        "denoising_strength",
    ];
    let Some(fields) = raw.as_object_mut() else {
        return;
    };
    fields.retain(|_, v| !v.is_null());
    // Form-style clients send the switch as text, which pydantic reads as a bool.
    if let Some(v) = fields.get_mut("enable_hr") {
        if let Some(text) = v.as_str() {
            match text.trim().to_ascii_lowercase().as_str() {
                "true" | "1" | "yes" | "on" => *v = json!(true),
                "false" | "0" | "no" | "off" | "" => *v = json!(false),
                _ => {}
            }
        }
    }
    for (key, v) in fields.iter_mut() {
        let whole = WHOLE.contains(&key.as_str());
        if !whole && !REAL.contains(&key.as_str()) {
            continue;
        }
        let number = match &*v {
            Value::String(text) => text.trim().parse::<f64>().ok(),
            Value::Number(n) if whole && n.is_f64() => n.as_f64(),
            _ => None,
        };
        let Some(x) = number.filter(|x| x.is_finite()) else {
            continue;
        };
        if !whole {
            *v = json!(x);
        } else if x.fract() == 0.0 && x.abs() < 9.0e15 {
            *v = json!(x as i64);
        }
    }
}

/// `img2img`: named, so a chat app shows why rather than a bare "no such route".
pub async fn img2img() -> ApiError {
    ApiError::new(
        Code::NotFound,
        "Local Diffusers draws pictures from text only; img2img is not offered.",
        "Use /sdapi/v1/txt2img with a prompt that describes the whole picture.",
    )
}

/// The job's PNG files as base64, in order.
async fn read_images(state: &AppState, job: &JobInfo) -> Result<Vec<String>, ApiError> {
    let paths: Vec<_> = job
        .images
        .iter()
        .map(|r| state.gallery().file_path(r))
        .collect();
    tokio::task::spawn_blocking(move || {
        paths
            .iter()
            .map(|p| {
                std::fs::read(p)
                    .map(|b| base64::engine::general_purpose::STANDARD.encode(b))
                    .map_err(|e| ApiError::internal(format!("reading {}: {e}", p.display())))
            })
            .collect()
    })
    .await
    .map_err(ApiError::internal)?
}

/// A1111's `info`: the settings used and one infotext per image.
fn info_json(job: &JobInfo) -> Value {
    let seeds: Vec<u64> = if job.images.is_empty() {
        vec![job.seed]
    } else {
        job.images
            .iter()
            .map(|r| r.seed.unwrap_or(job.seed))
            .collect()
    };
    let n = seeds.len();
    let infotexts: Vec<&str> = job.images.iter().map(|r| r.parameters.as_str()).collect();
    // The hires fix's keys, as A1111 returns them: the strength on its own, the rest among the
    // extra parameters (numbers as numbers).
    let first = infotexts
        .first()
        .map(|t| ld_core::infotext::Parameters::parse(t))
        .unwrap_or_default();
    // The hashes A1111 gives (AutoV2, 10 hex digits), as the parameters text has them.
    let model_hash = first.model_hash.clone();
    let vae_hash = first
        .extra
        .iter()
        .find(|(k, _)| k == "VAE hash")
        .map(|(_, v)| v.clone());
    let extras = first.extra;
    let denoising = extras
        .iter()
        .find(|(k, _)| k == "Denoising strength")
        .and_then(|(_, v)| v.parse::<f64>().ok());
    let hires: Map<String, Value> = extras
        .iter()
        .filter(|(k, _)| k.starts_with("Hires "))
        .map(|(k, v)| {
            let value = v.parse::<f64>().map_or_else(|_| json!(v), |x| json!(x));
            (k.clone(), value)
        })
        .collect();
    json!({
        "prompt": job.prompt,
        "all_prompts": vec![&job.prompt; n],
        "negative_prompt": job.negative_prompt,
        "all_negative_prompts": vec![&job.negative_prompt; n],
        "seed": seeds[0],
        "all_seeds": seeds,
        "subseed": seeds[0],
        "all_subseeds": seeds,
        "subseed_strength": 0,
        "width": job.width,
        "height": job.height,
        "sampler_name": job.sampler,
        "scheduler": job.schedule,
        "cfg_scale": job.cfg_scale,
        "steps": job.steps,
        "batch_size": job.batch,
        "restore_faces": false,
        "sd_model_name": job.model,
        "sd_model_hash": model_hash,
        // A1111 names the VAE file used (the one chosen, or the one beside the model).
        "sd_vae_name": job.vae,
        "sd_vae_hash": vae_hash,
        "seed_resize_from_w": -1,
        "seed_resize_from_h": -1,
        "denoising_strength": denoising,
        "extra_generation_params": hires,
        "index_of_first_image": 0,
        "infotexts": infotexts,
        "styles": [],
        "job_timestamp": timestamp(job.created_at),
        "clip_skip": job.clip_skip,
        "is_using_inpainting_conditioning": false,
        "version": concat!("Local Diffusers ", env!("CARGO_PKG_VERSION")),
    })
}

/// A1111's job timestamp, `YYYYmmddHHMMSS` in UTC.
fn timestamp(unix_ms: i64) -> String {
    let t = time::OffsetDateTime::from_unix_timestamp(unix_ms / 1000)
        .unwrap_or(time::OffsetDateTime::UNIX_EPOCH);
    t.format(time::macros::format_description!(
        "[year][month][day][hour][minute][second]"
    ))
    .unwrap_or_default()
}

#[derive(Deserialize)]
pub struct ProgressQuery {
    #[serde(default, deserialize_with = "query_bool")]
    skip_current_image: bool,
}

/// A query flag as FastAPI reads it: Python's `requests` sends `True` for `True`, and forms
/// send 1/yes/on; serde's own bool takes only `true` and `false`, which made a 400 of it.
fn query_bool<'de, D: serde::Deserializer<'de>>(d: D) -> Result<bool, D::Error> {
    let text = String::deserialize(d)?;
    match text.trim().to_ascii_lowercase().as_str() {
        "true" | "1" | "yes" | "on" => Ok(true),
        "false" | "0" | "no" | "off" | "" => Ok(false),
        _ => Err(serde::de::Error::custom(format!(
            "'{text}' is not true or false"
        ))),
    }
}

pub async fn progress(
    State(state): State<AppState>,
    Query(q): Query<ProgressQuery>,
) -> Json<Value> {
    let jobs = state.jobs();
    let count = jobs.active_count();
    let Some(job) = jobs.current() else {
        return Json(json!({
            "progress": 0.0,
            "eta_relative": 0.0,
            "state": {
                "skipped": false, "interrupted": false, "job": "", "job_count": count,
                "job_timestamp": "0", "job_no": 0, "sampling_step": 0, "sampling_steps": 0,
            },
            "current_image": Value::Null,
            "textinfo": Value::Null,
        }));
    };
    let image = if q.skip_current_image {
        None
    } else {
        jobs.preview(&job.id)
            .map(|png| base64::engine::general_purpose::STANDARD.encode(png.as_slice()))
    };
    Json(json!({
        "progress": job.progress,
        "eta_relative": job.eta_ms.map_or(0.0, |ms| ms as f64 / 1000.0),
        "state": {
            "skipped": false,
            "interrupted": false,
            "job": job.id,
            "job_count": count,
            "job_timestamp": timestamp(job.created_at),
            "job_no": job.image,
            "sampling_step": job.step,
            "sampling_steps": job.total_steps,
        },
        "current_image": image,
        "textinfo": Value::Null,
    }))
}

pub async fn interrupt(State(state): State<AppState>) -> Json<Value> {
    state.jobs().interrupt();
    Json(json!({}))
}

pub async fn skip(State(state): State<AppState>) -> Json<Value> {
    state.jobs().skip();
    Json(json!({}))
}

pub async fn sd_models(State(state): State<AppState>) -> Json<Value> {
    let models = tokio::task::spawn_blocking(move || state.models())
        .await
        .unwrap_or_default();
    Json(Value::Array(
        models
            .iter()
            .map(|m| {
                json!({
                    "title": m.name,
                    "model_name": m.name,
                    "hash": Value::Null,
                    "sha256": Value::Null,
                    "filename": m.path.display().to_string(),
                    "config": Value::Null,
                })
            })
            .collect(),
    ))
}

pub async fn samplers() -> Json<Value> {
    Json(Value::Array(
        SamplerKind::ALL
            .iter()
            .map(|k| json!({"name": k.name(), "aliases": k.aliases(), "options": {}}))
            .collect(),
    ))
}

pub async fn schedulers() -> Json<Value> {
    Json(Value::Array(
        ScheduleKind::ALL
            .iter()
            .map(|k| {
                // As A1111's list has them: Karras and Polyexponential take a rho, and the
                // schedules read from the model's own training sigmas need it.
                let rho = match k {
                    ScheduleKind::Karras => json!(7.0),
                    ScheduleKind::Polyexponential => json!(1.0),
                    _ => json!(-1),
                };
                let inner = matches!(
                    k,
                    ScheduleKind::Uniform
                        | ScheduleKind::SgmUniform
                        | ScheduleKind::Simple
                        | ScheduleKind::Normal
                        | ScheduleKind::DdimUniform
                        | ScheduleKind::Beta
                );
                json!({
                    "name": a1111_schedule_id(*k),
                    "label": k.name(),
                    "aliases": k.aliases(),
                    "default_rho": rho,
                    "need_inner_model": inner,
                })
            })
            .collect(),
    ))
}

pub async fn get_options(State(state): State<AppState>) -> Json<Value> {
    let vae = state.settings().vae;
    let model = tokio::task::spawn_blocking(move || state.default_model())
        .await
        .ok()
        .flatten();
    Json(json!({
        "sd_model_checkpoint": model.as_ref().map(|m| m.name.clone()).unwrap_or_default(),
        "sd_checkpoint_hash": Value::Null,
        "sd_vae": vae,
        "CLIP_stop_at_last_layers": 1,
        "samples_format": "png",
        "samples_save": true,
        "eta_noise_seed_delta": 0,
        "randn_source": "CPU",
    }))
}

/// Saves the options we understand; `sd_model_checkpoint` switches the default model, as
/// SillyTavern and Open WebUI expect, and `sd_vae` the VAE ("Automatic", "None" or a file
/// `/sdapi/v1/sd-vae` lists, as SillyTavern's VAE list sets it). Others are accepted and ignored
/// (logged). Both are checked before either is saved.
pub async fn set_options(
    State(state): State<AppState>,
    body: Result<Json<Map<String, Value>>, JsonRejection>,
) -> Result<Json<Value>, ApiError> {
    let Json(options) = body.map_err(|e| {
        ApiError::bad_json(&e, "Send the options as a JSON object, as A1111 expects.")
    })?;
    for key in options
        .keys()
        .filter(|k| *k != "sd_model_checkpoint" && *k != "sd_vae")
    {
        tracing::debug!(key, "A1111 option not used by Local Diffusers");
    }
    let wanted_model = options
        .get("sd_model_checkpoint")
        .and_then(Value::as_str)
        .map(str::to_owned);
    let wanted_vae = match options.get("sd_vae") {
        None | Some(Value::Null) => None,
        Some(Value::String(v)) => Some(v.clone()),
        Some(other) => {
            return Err(ApiError::new(
                Code::InvalidRequest,
                format!("sd_vae must be text, got {other}."),
                "Send a name /sdapi/v1/sd-vae lists, \"Automatic\" or \"None\".",
            ))
        }
    };
    // Open WebUI switches models by posting back the whole dict it read: the VAE as it stands
    // is no change, even when its file has gone since (found by review: that refused the
    // model switch, and Open WebUI only logs it).
    let current_vae = state.settings().vae;
    let wanted_vae = wanted_vae.filter(|v| *v != current_vae);
    if wanted_model.is_none() && wanted_vae.is_none() {
        return Ok(Json(Value::Null));
    }
    let s = state.clone();
    tokio::task::spawn_blocking(move || -> Result<(), ApiError> {
        // Both are checked before either is saved: a refused VAE changes no model.
        let model = match wanted_model {
            None => None,
            Some(wanted) => {
                let models = s.models();
                let model = ld_core::models::find(&models, &wanted).ok_or_else(|| {
                    ApiError::new(
                        Code::ModelMissing,
                        format!("There is no model called '{wanted}'."),
                        format!(
                            "Installed models: {}.",
                            models
                                .iter()
                                .map(|m| m.name.as_str())
                                .collect::<Vec<_>>()
                                .join(", ")
                        ),
                    )
                })?;
                // Saved, a model that cannot draw would be passed over for the first one that
                // can, with no word to the chat app. One that lacks only a VAE may get a VAE
                // file in this same call (not "Automatic" or "None", which give it none).
                let vae_file = wanted_vae
                    .as_deref()
                    .is_some_and(ld_core::vae::names_a_file);
                if let Some(problem) = model
                    .problem
                    .as_ref()
                    .filter(|_| !(model.needs_vae && vae_file))
                {
                    return Err(ApiError::new(
                        Code::InvalidRequest,
                        format!("The model '{}' cannot draw: {problem}", model.name),
                        "Choose another model from /sdapi/v1/sd-models.",
                    ));
                }
                Some(model.name.clone())
            }
        };
        let vae = match wanted_vae {
            None => None,
            Some(wanted) => Some(crate::handlers::settings::vae_setting(&s, &wanted)?),
        };
        s.change_settings(|settings| {
            if let Some(m) = model {
                settings.default_model = Some(m);
            }
            if let Some(v) = vae {
                settings.vae = v;
            }
        })
        .map_err(|e| {
            ApiError::new(
                Code::Internal,
                e.to_string(),
                "Check that the disk is not full and the data folder is writable.",
            )
        })?;
        Ok(())
    })
    .await
    .map_err(ApiError::internal)??;
    Ok(Json(Value::Null))
}

/// A1111's VAE list: `[{model_name, filename}]`, the file's name (what `sd_vae` takes) and its
/// full path; "Automatic" and "None" are not listed (A1111 does not list them either).
pub async fn sd_vae(State(state): State<AppState>) -> Json<Value> {
    let vaes = tokio::task::spawn_blocking(move || state.vaes())
        .await
        .unwrap_or_default();
    Json(Value::Array(
        vaes.iter()
            .map(|v| json!({"model_name": v.name, "filename": v.path.display().to_string()}))
            .collect(),
    ))
}

/// A1111's LoRA list: `[{name, alias, path, metadata}]`; the name is what `<lora:NAME:w>` takes.
pub async fn loras(State(state): State<AppState>) -> Json<Value> {
    let loras = tokio::task::spawn_blocking(move || state.loras())
        .await
        .unwrap_or_default();
    Json(Value::Array(
        loras
            .iter()
            .map(|l| {
                json!({"name": l.name, "alias": l.name, "path": l.path.display().to_string(),
                       "metadata": {}})
            })
            .collect(),
    ))
}

/// The hires fix's latent upscalers, as A1111 lists them (`[{name}]`); SillyTavern shows them
/// beside [`upscalers`] in its hires upscaler menu.
pub async fn latent_upscale_modes() -> Json<Value> {
    let modes: Vec<Value> = HiresUpscaler::ALL
        .iter()
        .filter(|u| u.is_latent())
        .map(|u| json!({"name": u.name()}))
        .collect();
    Json(Value::Array(modes))
}

/// The pixel upscalers: Lanczos, and A1111's "None" (a plain resize, Lanczos there too). No
/// model upscalers (ESRGAN and friends); a request naming one is drawn with Lanczos and says so.
pub async fn upscalers() -> Json<Value> {
    let entry = |name: &str| {
        json!({"name": name, "model_name": Value::Null, "model_path": Value::Null,
               "model_url": Value::Null, "scale": 4})
    };
    Json(json!([entry("None"), entry("Lanczos")]))
}

/// A1111's embedding list: `{loaded: {name: {shape, vectors, ...}}, skipped: {name: ...}}`.
pub async fn embeddings(State(state): State<AppState>) -> Json<Value> {
    let (loaded, skipped) = tokio::task::spawn_blocking(move || {
        let mut loaded = Map::new();
        let mut skipped = Map::new();
        for e in state.embeddings() {
            match ld_engine::textual_inversion::Embedding::load(&e.path) {
                Ok(emb) => {
                    loaded.insert(
                        e.name.clone(),
                        json!({"step": Value::Null, "sd_checkpoint": Value::Null,
                               "sd_checkpoint_name": Value::Null,
                               "shape": emb.vectors().dims().last().copied().unwrap_or(0),
                               "vectors": emb.len()}),
                    );
                }
                Err(err) => {
                    skipped.insert(e.name.clone(), json!({"error": err.to_string()}));
                }
            }
        }
        (loaded, skipped)
    })
    .await
    .unwrap_or_default();
    Json(json!({"loaded": loaded, "skipped": skipped}))
}

/// Flags as A1111 reports them; never paths or keys.
pub async fn cmd_flags(State(state): State<AppState>) -> Json<Value> {
    Json(json!({
        "api": true,
        "nowebui": false,
        "listen": state.api_key().is_some(),
        "port": state.port(),
        "api_auth": Value::Null,
        "lowvram": false,
        "medvram": false,
        "no_half": false,
        "precision": "autocast",
        "xformers": false,
    }))
}
