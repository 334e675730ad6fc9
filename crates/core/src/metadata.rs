//! Reading generation settings out of PNG files made by other apps (A1111/Forge, ComfyUI,
//! InvokeAI) or by us: for images dropped on the app, uploads to `/api/v1/images/inspect`, and
//! files found in the gallery folder. Input is untrusted, so every size is checked before use.

use crate::infotext::Parameters;
use serde::Serialize;
use serde_json::Value;

/// PNG signature, PNG spec 5.2.
const SIGNATURE: [u8; 8] = [0x89, b'P', b'N', b'G', 0x0d, 0x0a, 0x1a, 0x0a];
/// Largest text chunk we accept, compressed or not. A1111 infotexts are a few KB and ComfyUI
/// workflows rarely pass 200 KB.
pub const MAX_TEXT_BYTES: usize = 1024 * 1024;
/// All text of one file together, after decompression: bounds zTXt "zip bombs" across chunks.
pub const MAX_TOTAL_TEXT_BYTES: usize = 8 * 1024 * 1024;
/// How many links we follow through a ComfyUI graph; real graphs need a handful, cycles need
/// a stop.
const MAX_LINK_DEPTH: usize = 32;
/// How many links one file's reading follows in all. The depth limit alone does not bound the
/// work: a node that links to itself through several inputs is retried through each of them at
/// every level (4 inputs, 32 levels: 4^32 visits). Real graphs read a few hundred at most.
const MAX_LINK_VISITS: usize = 10_000;

#[derive(Debug, thiserror::Error)]
pub enum MetadataError {
    #[error("this is not a PNG file; only PNG images carry generation settings")]
    NotPng,
    #[error("the PNG file is cut off at byte {offset}; the download or copy may be incomplete")]
    Truncated { offset: usize },
    #[error("the PNG file is damaged: {what} (at byte {offset})")]
    Corrupt { what: String, offset: usize },
    #[error(
        "the PNG has a text chunk \"{keyword}\" of {size} bytes or more; at most {limit} bytes are read"
    )]
    TextTooLarge {
        keyword: String,
        size: usize,
        limit: usize,
    },
}

/// Which app wrote the settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum Source {
    #[serde(rename = "a1111")]
    A1111,
    #[serde(rename = "comfyui")]
    ComfyUi,
    #[serde(rename = "invokeai")]
    InvokeAi,
    /// No settings we know how to read.
    #[serde(rename = "none")]
    None,
}

/// The generation settings found in an image. Sampler and schedule use A1111 names where a
/// mapping is known (ComfyUI "dpmpp_2m" + "karras" -> "DPM++ 2M" + "Karras"), else the
/// original name.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Inspected {
    pub source: Source,
    pub prompt: Option<String>,
    pub negative_prompt: Option<String>,
    pub steps: Option<u32>,
    pub cfg_scale: Option<f64>,
    pub seed: Option<u64>,
    pub width: Option<u32>,
    pub height: Option<u32>,
    pub sampler: Option<String>,
    pub schedule: Option<String>,
    pub model: Option<String>,
    /// Every text chunk, keyword and text, in file order.
    pub raw: Vec<(String, String)>,
}

impl Inspected {
    fn empty(raw: Vec<(String, String)>) -> Self {
        Inspected {
            source: Source::None,
            prompt: None,
            negative_prompt: None,
            steps: None,
            cfg_scale: None,
            seed: None,
            width: None,
            height: None,
            sampler: None,
            schedule: None,
            model: None,
            raw,
        }
    }
}

/// The pixel size and text chunks of a PNG.
#[derive(Debug, Clone, PartialEq)]
pub struct PngText {
    pub width: u32,
    pub height: u32,
    /// Keyword and text of each tEXt, zTXt and iTXt chunk, in file order.
    pub chunks: Vec<(String, String)>,
}

/// Read the settings an app stored in a PNG.
pub fn inspect_png(bytes: &[u8]) -> Result<Inspected, MetadataError> {
    Ok(inspect_text(read_png_text(bytes)?.chunks))
}

/// Interpret text chunks, trying A1111 first (Forge and several ComfyUI extensions also write
/// `parameters`, and it is the most complete), then InvokeAI, then ComfyUI.
pub fn inspect_text(chunks: Vec<(String, String)>) -> Inspected {
    let find = |key: &str| {
        chunks
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.clone())
    };
    let mut out = Inspected::empty(Vec::new());
    if let Some(text) = find("parameters") {
        from_a1111(&mut out, &text);
    } else if let Some(meta) = find("invokeai_metadata").and_then(|t| json_object(&t)) {
        from_invokeai(&mut out, &meta);
    } else if let Some(graph) = find("prompt").and_then(|t| json_object(&t)) {
        from_comfyui(&mut out, &graph);
    }
    out.raw = chunks;
    out
}

fn json_object(text: &str) -> Option<serde_json::Map<String, Value>> {
    match serde_json::from_str(text) {
        Ok(Value::Object(m)) => Some(m),
        _ => None,
    }
}

fn from_a1111(out: &mut Inspected, text: &str) {
    let p = Parameters::parse(text);
    out.source = Source::A1111;
    out.prompt = Some(p.prompt);
    out.negative_prompt = Some(p.negative_prompt);
    out.steps = p.steps;
    out.cfg_scale = p.cfg_scale;
    out.seed = p.seed;
    out.width = p.width;
    out.height = p.height;
    out.sampler = p.sampler;
    out.schedule = p.schedule;
    out.model = p.model;
}

/// InvokeAI 3/4/5 `invokeai_metadata`: a flat JSON object (invokeai/app/invocations/metadata.py,
/// `CoreMetadataInvocation`).
fn from_invokeai(out: &mut Inspected, m: &serde_json::Map<String, Value>) {
    out.source = Source::InvokeAi;
    let text = |k: &str| m.get(k).and_then(Value::as_str).map(str::to_owned);
    out.prompt = text("positive_prompt");
    out.negative_prompt = text("negative_prompt");
    out.steps = m.get("steps").and_then(as_u32);
    out.cfg_scale = m.get("cfg_scale").and_then(Value::as_f64);
    out.seed = m.get("seed").and_then(Value::as_u64);
    out.width = m.get("width").and_then(as_u32);
    out.height = m.get("height").and_then(as_u32);
    if let Some(s) = text("scheduler") {
        let (sampler, schedule) = invokeai_scheduler(&s);
        out.sampler = Some(sampler);
        out.schedule = schedule;
    }
    out.model = match m.get("model") {
        Some(Value::Object(model)) => model
            .get("name")
            .or_else(|| model.get("model_name"))
            .and_then(Value::as_str)
            .map(str::to_owned),
        Some(Value::String(s)) => Some(s.clone()),
        _ => None,
    };
}

fn as_u32(v: &Value) -> Option<u32> {
    v.as_u64().and_then(|n| u32::try_from(n).ok())
}

/// InvokeAI scheduler names (invokeai/backend/stable_diffusion/schedulers/schedulers.py); a
/// `_k` suffix means Karras sigmas.
fn invokeai_scheduler(name: &str) -> (String, Option<String>) {
    let (base, karras) = match name.strip_suffix("_k") {
        Some(base) => (base, true),
        None => (name, false),
    };
    let sampler = match base {
        "euler" => "Euler",
        "euler_a" => "Euler a",
        "heun" => "Heun",
        "lms" => "LMS",
        "ddim" => "DDIM",
        "kdpm_2" => "DPM2",
        "kdpm_2_a" => "DPM2 a",
        "dpmpp_2m" => "DPM++ 2M",
        "dpmpp_2m_sde" => "DPM++ 2M SDE",
        "dpmpp_sde" => "DPM++ SDE",
        "unipc" => "UniPC",
        "lcm" => "LCM",
        _ => return (name.to_owned(), None),
    };
    (sampler.to_owned(), karras.then(|| "Karras".to_owned()))
}

/// ComfyUI's sampler names (comfy/samplers.py, KSAMPLER_NAMES) to A1111's.
fn comfy_sampler(name: &str) -> String {
    match name {
        "euler" => "Euler",
        "euler_ancestral" => "Euler a",
        "heun" => "Heun",
        "dpm_2" => "DPM2",
        "dpm_2_ancestral" => "DPM2 a",
        "lms" => "LMS",
        "dpmpp_2s_ancestral" => "DPM++ 2S a",
        "dpmpp_sde" => "DPM++ SDE",
        "dpmpp_2m" => "DPM++ 2M",
        "dpmpp_2m_sde" => "DPM++ 2M SDE",
        "dpmpp_3m_sde" => "DPM++ 3M SDE",
        "ddim" => "DDIM",
        "uni_pc" => "UniPC",
        "lcm" => "LCM",
        other => other,
    }
    .to_owned()
}

/// ComfyUI's scheduler names (comfy/samplers.py, SCHEDULER_NAMES) to A1111's schedule types.
fn comfy_schedule(name: &str) -> String {
    match name {
        "simple" => "Simple",
        "sgm_uniform" => "SGM Uniform",
        "karras" => "Karras",
        "exponential" => "Exponential",
        "ddim_uniform" => "DDIM",
        "beta" => "Beta",
        "normal" => "Normal",
        "kl_optimal" => "KL Optimal",
        other => other,
    }
    .to_owned()
}

/// A ComfyUI API-format graph (the `prompt` chunk): `{"<node id>": {"class_type": ..., "inputs":
/// {...}}}`, where an input is a literal or a link `["<node id>", <output index>]`.
struct Graph<'a> {
    nodes: &'a serde_json::Map<String, Value>,
    /// Links still to follow ([`MAX_LINK_VISITS`]); once spent, every walk ends where it is.
    visits: std::cell::Cell<usize>,
}

impl<'a> Graph<'a> {
    fn new(nodes: &'a serde_json::Map<String, Value>) -> Self {
        Self {
            nodes,
            visits: std::cell::Cell::new(MAX_LINK_VISITS),
        }
    }

    /// Whether a walk `depth` links deep may follow one more; counts it against the budget.
    fn may_follow(&self, depth: usize) -> bool {
        let left = self.visits.get();
        if depth > MAX_LINK_DEPTH || left == 0 {
            return false;
        }
        self.visits.set(left - 1);
        true
    }

    fn node(&self, id: &str) -> Option<(&'a str, &'a serde_json::Map<String, Value>)> {
        let node = self.nodes.get(id)?.as_object()?;
        let class = node.get("class_type")?.as_str()?;
        let inputs = node.get("inputs")?.as_object()?;
        Some((class, inputs))
    }

    /// The node a link input points at.
    fn linked(&self, v: &Value) -> Option<&'a str> {
        let arr = v.as_array()?;
        if arr.len() != 2 {
            return None;
        }
        let id = match &arr[0] {
            Value::String(s) => s.as_str(),
            _ => return None,
        };
        self.nodes.get_key_value(id).map(|(k, _)| k.as_str())
    }

    /// A literal input, following links to primitive nodes ("PrimitiveNode", "Seed (rgthree)",
    /// "CR Seed", ...) that hold the value under a common name.
    fn value(&self, v: &'a Value, depth: usize) -> Option<&'a Value> {
        let Some(id) = self.linked(v) else {
            return Some(v);
        };
        if !self.may_follow(depth) {
            return None;
        }
        let (_, inputs) = self.node(id)?;
        [
            "value",
            "seed",
            "noise_seed",
            "int",
            "float",
            "string",
            "text",
            "Text",
        ]
        .iter()
        .find_map(|k| inputs.get(*k).and_then(|v| self.value(v, depth + 1)))
    }

    fn input(&self, inputs: &'a serde_json::Map<String, Value>, key: &str) -> Option<&'a Value> {
        self.value(inputs.get(key)?, 0)
    }

    /// The prompt text behind a conditioning input: the CLIPTextEncode it comes from, through
    /// conditioning nodes in between (ConditioningCombine, ControlNetApply, ...).
    fn text(&self, v: &Value, depth: usize) -> Option<String> {
        let id = self.linked(v)?;
        if !self.may_follow(depth) {
            return None;
        }
        let (class, inputs) = self.node(id)?;
        let own = match class {
            "CLIPTextEncodeSDXL" => inputs.get("text_g").or_else(|| inputs.get("text_l")),
            _ => inputs.get("text").or_else(|| inputs.get("prompt")),
        };
        if let Some(text) = own.and_then(|t| self.value(t, depth + 1)?.as_str()) {
            return Some(text.to_owned());
        }
        // Follow the first conditioning input, by name so the order of the JSON does not matter.
        let mut keys: Vec<&String> = inputs
            .keys()
            .filter(|k| k.starts_with("conditioning") || *k == "positive" || *k == "negative")
            .collect();
        keys.sort();
        keys.into_iter()
            .find_map(|k| self.text(&inputs[k.as_str()], depth + 1))
    }

    /// Walk upstream from `v` to the first node whose class is in `classes`.
    fn upstream(
        &self,
        v: &Value,
        classes: &[&str],
        via: &[&str],
        depth: usize,
    ) -> Option<&'a serde_json::Map<String, Value>> {
        let id = self.linked(v)?;
        if !self.may_follow(depth) {
            return None;
        }
        let (class, inputs) = self.node(id)?;
        if classes.contains(&class) {
            return Some(inputs);
        }
        via.iter().find_map(|k| {
            inputs
                .get(*k)
                .and_then(|next| self.upstream(next, classes, via, depth + 1))
        })
    }

    /// Any node of one of these classes, the lowest id first so the answer is stable.
    fn any(&self, classes: &[&str]) -> Option<&'a serde_json::Map<String, Value>> {
        let mut ids: Vec<&String> = self.nodes.keys().collect();
        ids.sort_by_key(|id| (id.parse::<u64>().unwrap_or(u64::MAX), id.as_str()));
        ids.into_iter().find_map(|id| {
            let (class, inputs) = self.node(id)?;
            classes.contains(&class).then_some(inputs)
        })
    }
}

const SAMPLER_NODES: &[&str] = &["KSampler", "KSamplerAdvanced"];
const CHECKPOINT_NODES: &[&str] = &["CheckpointLoaderSimple", "CheckpointLoader"];
const LATENT_NODES: &[&str] = &["EmptyLatentImage", "EmptySD3LatentImage"];

fn from_comfyui(out: &mut Inspected, graph: &serde_json::Map<String, Value>) {
    let g = Graph::new(graph);
    let mut samplers: Vec<(&String, &serde_json::Map<String, Value>)> = graph
        .iter()
        .filter_map(|(id, _)| {
            let (class, inputs) = g.node(id)?;
            SAMPLER_NODES.contains(&class).then_some((id, inputs))
        })
        .collect();
    if samplers.is_empty() {
        return;
    }
    // With a hires-fix pass there are two samplers; the first pass (the one starting from an
    // empty latent) holds the settings a user means. Otherwise the lowest node id.
    samplers.sort_by_key(|(id, inputs)| {
        let from_empty = inputs
            .get("latent_image")
            .and_then(|v| g.upstream(v, LATENT_NODES, &[], 0))
            .is_some();
        (
            !from_empty,
            id.parse::<u64>().unwrap_or(u64::MAX),
            id.as_str(),
        )
    });
    let ks = samplers[0].1;
    out.source = Source::ComfyUi;
    out.seed = g
        .input(ks, "seed")
        .or_else(|| g.input(ks, "noise_seed"))
        .and_then(Value::as_u64);
    out.steps = g.input(ks, "steps").and_then(as_u32);
    out.cfg_scale = g.input(ks, "cfg").and_then(Value::as_f64);
    out.sampler = g
        .input(ks, "sampler_name")
        .and_then(Value::as_str)
        .map(comfy_sampler);
    out.schedule = g
        .input(ks, "scheduler")
        .and_then(Value::as_str)
        .map(comfy_schedule);
    out.prompt = ks.get("positive").and_then(|v| g.text(v, 0));
    out.negative_prompt = ks.get("negative").and_then(|v| g.text(v, 0));

    let latent = ks
        .get("latent_image")
        .and_then(|v| g.upstream(v, LATENT_NODES, &["samples", "latent_image"], 0))
        .or_else(|| g.any(LATENT_NODES));
    if let Some(latent) = latent {
        out.width = g.input(latent, "width").and_then(as_u32);
        out.height = g.input(latent, "height").and_then(as_u32);
    }
    // The model input passes through LoRA loaders and patches on its way from the checkpoint.
    let checkpoint = ks
        .get("model")
        .and_then(|v| g.upstream(v, CHECKPOINT_NODES, &["model"], 0))
        .or_else(|| g.any(CHECKPOINT_NODES));
    out.model = checkpoint
        .and_then(|c| g.input(c, "ckpt_name"))
        .and_then(Value::as_str)
        .map(str::to_owned);
}

/// A text chunk found while walking the file; compressed ones are read afterwards.
enum Found {
    Plain(String, String),
    Compressed,
}

/// Read a PNG's size and all its text chunks. The whole chunk structure is checked (signature,
/// lengths, CRCs of text chunks, IEND present), so a cut-off file is reported, not half-read.
pub fn read_png_text(bytes: &[u8]) -> Result<PngText, MetadataError> {
    if bytes.len() < SIGNATURE.len() || bytes[..8] != SIGNATURE {
        return Err(MetadataError::NotPng);
    }
    let mut pos = 8;
    let mut size = None;
    let mut found = Vec::new();
    let mut total = 0usize;
    loop {
        if bytes.len() - pos < 12 {
            return Err(MetadataError::Truncated {
                offset: bytes.len(),
            });
        }
        let len = u32::from_be_bytes(bytes[pos..pos + 4].try_into().unwrap()) as usize;
        let kind: [u8; 4] = bytes[pos + 4..pos + 8].try_into().unwrap();
        // PNG spec 5.3: lengths above 2^31-1 are invalid.
        if len > i32::MAX as usize {
            return Err(MetadataError::Corrupt {
                what: "a chunk length is out of range".into(),
                offset: pos,
            });
        }
        let data_start = pos + 8;
        if bytes.len() - data_start < len + 4 {
            return Err(MetadataError::Truncated {
                offset: bytes.len(),
            });
        }
        let data = &bytes[data_start..data_start + len];
        if size.is_none() {
            if &kind != b"IHDR" || len != 13 {
                return Err(MetadataError::Corrupt {
                    what: "the first chunk is not a valid IHDR".into(),
                    offset: pos,
                });
            }
            let w = u32::from_be_bytes(data[0..4].try_into().unwrap());
            let h = u32::from_be_bytes(data[4..8].try_into().unwrap());
            size = Some((w, h));
        }
        match &kind {
            b"tEXt" | b"zTXt" | b"iTXt" => {
                let keyword = keyword_of(data);
                if len > MAX_TEXT_BYTES {
                    return Err(MetadataError::TextTooLarge {
                        keyword,
                        size: len,
                        limit: MAX_TEXT_BYTES,
                    });
                }
                let stored_crc = u32::from_be_bytes(
                    bytes[data_start + len..data_start + len + 4]
                        .try_into()
                        .unwrap(),
                );
                if crc32(&bytes[pos + 4..data_start + len]) != stored_crc {
                    return Err(MetadataError::Corrupt {
                        what: format!("the text chunk \"{keyword}\" fails its checksum"),
                        offset: pos,
                    });
                }
                if let Some(f) = parse_text_chunk(&kind, data) {
                    if let Found::Plain(_, text) = &f {
                        total += text.len();
                    }
                    found.push(f);
                }
            }
            _ => {}
        }
        pos = data_start + len + 4;
        if &kind == b"IEND" {
            break;
        }
    }
    if total > MAX_TOTAL_TEXT_BYTES {
        return Err(MetadataError::TextTooLarge {
            keyword: "(all text chunks)".into(),
            size: total,
            limit: MAX_TOTAL_TEXT_BYTES,
        });
    }
    let compressed = if found.iter().any(|f| matches!(f, Found::Compressed)) {
        decompress_all(bytes, &mut total)?
    } else {
        Vec::new()
    };
    let mut compressed = compressed.into_iter();
    let chunks = found
        .into_iter()
        .filter_map(|f| match f {
            Found::Plain(k, v) => Some((k, v)),
            // `None`: the decoder could not read this one (see decompress_all); skip it.
            Found::Compressed => compressed.next().flatten(),
        })
        .collect();
    let (width, height) = size.expect("the loop reads IHDR first");
    Ok(PngText {
        width,
        height,
        chunks,
    })
}

/// Keyword of a text chunk (Latin-1, up to the first NUL), for messages.
fn keyword_of(data: &[u8]) -> String {
    let end = data
        .iter()
        .position(|&b| b == 0)
        .unwrap_or(data.len())
        .min(79);
    latin1(&data[..end])
}

fn latin1(b: &[u8]) -> String {
    b.iter().map(|&c| c as char).collect()
}

/// tEXt and uncompressed iTXt are read here; zTXt and compressed iTXt are only noted. Malformed
/// chunks are skipped: one bad chunk should not hide the others.
fn parse_text_chunk(kind: &[u8; 4], data: &[u8]) -> Option<Found> {
    let nul = data.iter().position(|&b| b == 0)?;
    if nul == 0 || nul > 79 {
        return None;
    }
    let keyword = latin1(&data[..nul]);
    let rest = &data[nul + 1..];
    match kind {
        b"tEXt" => Some(Found::Plain(keyword, latin1(rest))),
        b"zTXt" => Some(Found::Compressed),
        _ => {
            // iTXt: compression flag, method, language tag NUL, translated keyword NUL, text.
            let (&flag, rest) = rest.split_first()?;
            let (_, rest) = rest.split_first()?;
            let lang_end = rest.iter().position(|&b| b == 0)?;
            let rest = &rest[lang_end + 1..];
            let tk_end = rest.iter().position(|&b| b == 0)?;
            let text = &rest[tk_end + 1..];
            match flag {
                0 => Some(Found::Plain(
                    keyword,
                    String::from_utf8(text.to_vec()).ok()?,
                )),
                1 => Some(Found::Compressed),
                _ => None,
            }
        }
    }
}

/// The compressed text chunks, in file order, decompressed with a bound. The `png` crate does
/// the inflating (so we need no zlib of our own); it reads them while walking the file, which
/// the structure check in [`read_png_text`] has already passed.
fn decompress_all(
    bytes: &[u8],
    total: &mut usize,
) -> Result<Vec<Option<(String, String)>>, MetadataError> {
    let mut decoder = png::Decoder::new_with_limits(
        std::io::Cursor::new(bytes),
        png::Limits {
            bytes: 64 * 1024 * 1024,
        },
    );
    decoder.ignore_checksums(true);
    let mut reader = match decoder.read_info() {
        Ok(r) => r,
        Err(e) => {
            tracing::warn!(error = %e, "PNG: compressed text chunks could not be read");
            return Ok(Vec::new());
        }
    };
    // Text after the image data is only seen once the decoder has walked to the end.
    if let Err(e) = reader.finish() {
        tracing::warn!(error = %e, "PNG: could not read to the end; later text chunks are skipped");
    }
    let info = reader.info();
    // The decoder keeps zTXt and iTXt in separate lists; put them back in file order by
    // walking our own chunk list again.
    let mut ztxt = info.compressed_latin1_text.iter().cloned().peekable();
    let mut itxt = info
        .utf8_text
        .iter()
        .filter(|c| c.compressed)
        .cloned()
        .peekable();
    let mut out = Vec::new();
    let mut pos = 8;
    while pos + 8 <= bytes.len() {
        let len = u32::from_be_bytes(bytes[pos..pos + 4].try_into().unwrap()) as usize;
        let kind = &bytes[pos + 4..pos + 8];
        let Some(data) = bytes.get(pos + 8..pos + 8 + len) else {
            break;
        };
        let is_compressed = match kind {
            b"zTXt" => matches!(parse_text_chunk(b"zTXt", data), Some(Found::Compressed)),
            b"iTXt" => matches!(parse_text_chunk(b"iTXt", data), Some(Found::Compressed)),
            _ => false,
        };
        if is_compressed {
            let keyword = keyword_of(data);
            let budget = MAX_TEXT_BYTES.min(MAX_TOTAL_TEXT_BYTES.saturating_sub(*total));
            // Take the decoder's next chunk of this kind only if it is the same one (the
            // decoder may have dropped a chunk it found malformed).
            let text = if kind == b"zTXt" {
                ztxt.next_if(|c| c.keyword == keyword).map(|mut c| {
                    c.decompress_text_with_limit(budget + 1)
                        .and_then(|()| c.get_text())
                })
            } else {
                itxt.next_if(|c| c.keyword == keyword).map(|mut c| {
                    c.decompress_text_with_limit(budget + 1)
                        .and_then(|()| c.get_text())
                })
            };
            match text {
                Some(Ok(text)) if text.len() <= budget => {
                    *total += text.len();
                    out.push(Some((keyword, text)));
                }
                Some(Ok(text)) => {
                    return Err(MetadataError::TextTooLarge {
                        keyword,
                        size: text.len(),
                        limit: budget,
                    })
                }
                // The png crate does not expose the error kind; its message is the only way to
                // tell "over the limit" (refused) from "damaged" (skipped).
                Some(Err(png::DecodingError::Format(e)))
                    if e.to_string().contains("decompression space") =>
                {
                    return Err(MetadataError::TextTooLarge {
                        keyword,
                        size: budget + 1,
                        limit: budget,
                    })
                }
                Some(Err(e)) => {
                    tracing::warn!(%keyword, error = %e, "PNG: compressed text chunk skipped");
                    out.push(None);
                }
                None => out.push(None),
            }
        }
        if kind == b"IEND" {
            break;
        }
        pos += 12 + len;
    }
    Ok(out)
}

/// CRC-32 as PNG uses it (ISO 3309, polynomial 0xEDB88320), PNG spec annex D.
fn crc32(data: &[u8]) -> u32 {
    static TABLE: std::sync::OnceLock<[u32; 256]> = std::sync::OnceLock::new();
    let table = TABLE.get_or_init(|| {
        let mut t = [0u32; 256];
        for (n, slot) in t.iter_mut().enumerate() {
            let mut c = n as u32;
            for _ in 0..8 {
                c = if c & 1 != 0 {
                    0xEDB8_8320 ^ (c >> 1)
                } else {
                    c >> 1
                };
            }
            *slot = c;
        }
        t
    });
    !data.iter().fold(!0u32, |c, &b| {
        table[((c ^ b as u32) & 0xff) as usize] ^ (c >> 8)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    enum Chunk<'a> {
        Text(&'a str, &'a str),
        Ztxt(&'a str, &'a str),
        Itxt(&'a str, &'a str),
        ItxtCompressed(&'a str, &'a str),
        /// Written after the image data, where some tools put it.
        TextAfterImage(&'a str, &'a str),
    }

    fn png_with(chunks: &[Chunk<'_>]) -> Vec<u8> {
        let mut out = Vec::new();
        {
            let mut enc = png::Encoder::new(&mut out, 3, 2);
            enc.set_color(png::ColorType::Rgb);
            for c in chunks {
                match *c {
                    Chunk::Text(k, v) => enc.add_text_chunk(k.into(), v.into()).unwrap(),
                    Chunk::Ztxt(k, v) => enc.add_ztxt_chunk(k.into(), v.into()).unwrap(),
                    Chunk::Itxt(k, v) => enc.add_itxt_chunk(k.into(), v.into()).unwrap(),
                    _ => {}
                }
            }
            let mut w = enc.write_header().unwrap();
            for c in chunks {
                if let Chunk::ItxtCompressed(k, v) = *c {
                    let mut t = png::text_metadata::ITXtChunk::new(k, v);
                    t.compress_text().unwrap();
                    w.write_text_chunk(&t).unwrap();
                }
            }
            w.write_image_data(&[7; 3 * 2 * 3]).unwrap();
            for c in chunks {
                if let Chunk::TextAfterImage(k, v) = *c {
                    w.write_text_chunk(&png::text_metadata::TEXtChunk::new(k, v))
                        .unwrap();
                }
            }
            w.finish().unwrap();
        }
        out
    }

    const A1111: &str = "a knight\nNegative prompt: blurry\nSteps: 20, Sampler: DPM++ 2M, \
        Schedule type: Karras, CFG scale: 7, Seed: 1234567890, Size: 512x768, Model: dreamy, \
        Version: v1.10.1";

    fn check_a1111(i: &Inspected) {
        assert_eq!(i.source, Source::A1111);
        assert_eq!(i.prompt.as_deref(), Some("a knight"));
        assert_eq!(i.negative_prompt.as_deref(), Some("blurry"));
        assert_eq!(i.steps, Some(20));
        assert_eq!(i.cfg_scale, Some(7.0));
        assert_eq!(i.seed, Some(1234567890));
        assert_eq!((i.width, i.height), (Some(512), Some(768)));
        assert_eq!(i.sampler.as_deref(), Some("DPM++ 2M"));
        assert_eq!(i.schedule.as_deref(), Some("Karras"));
        assert_eq!(i.model.as_deref(), Some("dreamy"));
    }

    #[test]
    fn reads_a1111_parameters_in_every_chunk_kind() {
        for png in [
            png_with(&[Chunk::Text("parameters", A1111)]),
            png_with(&[Chunk::Ztxt("parameters", A1111)]),
            png_with(&[Chunk::Itxt("parameters", A1111)]),
            png_with(&[Chunk::ItxtCompressed("parameters", A1111)]),
            png_with(&[Chunk::TextAfterImage("parameters", A1111)]),
        ] {
            let i = inspect_png(&png).unwrap();
            check_a1111(&i);
            assert_eq!(i.raw, vec![("parameters".to_owned(), A1111.to_owned())]);
        }
    }

    #[test]
    fn reads_our_own_files() {
        let text = "東京の猫 🐱\nSteps: 4, Sampler: Euler, CFG scale: 7, Seed: 5, Size: 3x2";
        let png = crate::image_file::encode_png(&[1; 18], 3, 2, text).unwrap();
        let i = inspect_png(&png).unwrap();
        assert_eq!(i.prompt.as_deref(), Some("東京の猫 🐱"));
        let t = read_png_text(&png).unwrap();
        assert_eq!((t.width, t.height), (3, 2));
    }

    #[test]
    fn compressed_and_plain_chunks_keep_file_order() {
        let png = png_with(&[
            Chunk::Text("a", "1"),
            Chunk::Ztxt("b", "2"),
            Chunk::Itxt("c", "3"),
            Chunk::ItxtCompressed("d", "4"),
            Chunk::TextAfterImage("e", "5"),
        ]);
        let keys: Vec<_> = read_png_text(&png)
            .unwrap()
            .chunks
            .into_iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect();
        // The encoder writes tEXt, zTXt, iTXt in that order before IDAT.
        assert_eq!(keys, ["a=1", "b=2", "c=3", "d=4", "e=5"]);
    }

    /// ComfyUI API-format graph as its default workflow saves it, with a LoRA between checkpoint
    /// and sampler and the seed coming from a primitive node.
    const COMFY: &str = r#"{
        "3": {"class_type": "KSampler", "inputs": {"seed": ["10", 0], "steps": 25, "cfg": 6.5,
              "sampler_name": "dpmpp_2m", "scheduler": "karras", "denoise": 1,
              "model": ["11", 0], "positive": ["6", 0], "negative": ["7", 0],
              "latent_image": ["5", 0]}},
        "4": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "sd15.safetensors"}},
        "11": {"class_type": "LoraLoader", "inputs": {"model": ["4", 0], "clip": ["4", 1],
               "lora_name": "x.safetensors", "strength_model": 1, "strength_clip": 1}},
        "5": {"class_type": "EmptyLatentImage", "inputs": {"width": 640, "height": 448, "batch_size": 1}},
        "6": {"class_type": "CLIPTextEncode", "inputs": {"text": "a red fox", "clip": ["11", 1]}},
        "7": {"class_type": "CLIPTextEncode", "inputs": {"text": "ugly", "clip": ["11", 1]}},
        "8": {"class_type": "VAEDecode", "inputs": {"samples": ["3", 0], "vae": ["4", 2]}},
        "10": {"class_type": "PrimitiveNode", "inputs": {"value": 18446744073709551615}},
        "9": {"class_type": "SaveImage", "inputs": {"filename_prefix": "ComfyUI", "images": ["8", 0]}}
    }"#;

    #[test]
    fn reads_a_comfyui_graph() {
        let png = png_with(&[
            Chunk::Text("prompt", COMFY),
            Chunk::Text("workflow", r#"{"nodes": []}"#),
        ]);
        let i = inspect_png(&png).unwrap();
        assert_eq!(i.source, Source::ComfyUi);
        assert_eq!(i.prompt.as_deref(), Some("a red fox"));
        assert_eq!(i.negative_prompt.as_deref(), Some("ugly"));
        assert_eq!(i.steps, Some(25));
        assert_eq!(i.cfg_scale, Some(6.5));
        assert_eq!(i.seed, Some(u64::MAX));
        assert_eq!((i.width, i.height), (Some(640), Some(448)));
        assert_eq!(i.sampler.as_deref(), Some("DPM++ 2M"));
        assert_eq!(i.schedule.as_deref(), Some("Karras"));
        assert_eq!(i.model.as_deref(), Some("sd15.safetensors"));
        assert_eq!(i.raw.len(), 2);
    }

    #[test]
    fn comfyui_hires_graph_uses_the_first_pass() {
        let graph = r#"{
            "1": {"class_type": "KSamplerAdvanced", "inputs": {"noise_seed": 7, "steps": 10,
                  "cfg": 4, "sampler_name": "euler", "scheduler": "normal", "model": ["4", 0],
                  "positive": ["6", 0], "negative": ["7", 0], "latent_image": ["20", 0]}},
            "2": {"class_type": "KSampler", "inputs": {"seed": 42, "steps": 30, "cfg": 8,
                  "sampler_name": "euler_ancestral", "scheduler": "sgm_uniform", "model": ["4", 0],
                  "positive": ["12", 0], "negative": ["7", 0], "latent_image": ["5", 0]}},
            "4": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "xl.safetensors"}},
            "5": {"class_type": "EmptyLatentImage", "inputs": {"width": 1024, "height": 1024}},
            "20": {"class_type": "LatentUpscale", "inputs": {"samples": ["2", 0], "width": 1536}},
            "6": {"class_type": "CLIPTextEncode", "inputs": {"text": "second pass"}},
            "12": {"class_type": "ConditioningCombine", "inputs": {"conditioning_1": ["13", 0],
                   "conditioning_2": ["7", 0]}},
            "13": {"class_type": "CLIPTextEncodeSDXL", "inputs": {"text_g": "a castle", "text_l": "x"}},
            "7": {"class_type": "CLIPTextEncode", "inputs": {"text": "lowres"}}
        }"#;
        let i = inspect_png(&png_with(&[Chunk::Text("prompt", graph)])).unwrap();
        assert_eq!(i.seed, Some(42));
        assert_eq!(i.steps, Some(30));
        assert_eq!(i.prompt.as_deref(), Some("a castle"));
        assert_eq!(i.sampler.as_deref(), Some("Euler a"));
        assert_eq!(i.schedule.as_deref(), Some("SGM Uniform"));
        assert_eq!((i.width, i.height), (Some(1024), Some(1024)));
    }

    #[test]
    fn comfyui_link_cycles_end() {
        let graph = r#"{
            "1": {"class_type": "KSampler", "inputs": {"seed": ["2", 0], "steps": 5, "cfg": 1,
                  "positive": ["3", 0], "negative": ["3", 0], "model": ["4", 0]}},
            "2": {"class_type": "Loop", "inputs": {"value": ["2", 0]}},
            "3": {"class_type": "ConditioningConcat", "inputs": {"conditioning_to": ["3", 0]}},
            "4": {"class_type": "LoraLoader", "inputs": {"model": ["4", 0]}}
        }"#;
        let i = inspect_png(&png_with(&[Chunk::Text("prompt", graph)])).unwrap();
        assert_eq!(i.source, Source::ComfyUi);
        assert_eq!(
            (i.seed, i.prompt.clone(), i.model.clone()),
            (None, None, None)
        );
        assert_eq!(i.steps, Some(5));
    }

    #[test]
    fn comfyui_graphs_that_branch_into_cycles_end_quickly() {
        // A node that links to itself through four inputs: each level of the walk retries every
        // branch, so the depth limit alone would take 4^32 visits (found by review: it hung the
        // inspect endpoint and the gallery's start-up scan). The visit budget ends it.
        let graph = r#"{
            "1": {"class_type": "KSampler", "inputs": {"steps": 5, "seed": ["2", 0],
                  "positive": ["3", 0], "negative": ["3", 0]}},
            "2": {"class_type": "X", "inputs": {"value": ["2", 0], "seed": ["2", 0],
                  "int": ["2", 0], "text": ["2", 0]}},
            "3": {"class_type": "X", "inputs": {"conditioning_1": ["3", 0],
                  "conditioning_2": ["3", 0], "conditioning_3": ["3", 0],
                  "conditioning_4": ["3", 0]}}
        }"#;
        let i = inspect_png(&png_with(&[Chunk::Text("prompt", graph)])).unwrap();
        assert_eq!(i.source, Source::ComfyUi);
        assert_eq!((i.steps, i.seed, i.prompt.clone()), (Some(5), None, None));
        // One walk alone spends the whole budget and stops there.
        let nodes: serde_json::Map<String, Value> = serde_json::from_str(graph).unwrap();
        let g = Graph::new(&nodes);
        assert_eq!(g.text(&serde_json::json!(["3", 0]), 0), None);
        assert_eq!(g.visits.get(), 0);
    }

    #[test]
    fn reads_invokeai_metadata() {
        let meta = r#"{"generation_mode": "txt2img", "positive_prompt": "a lighthouse",
            "negative_prompt": "fog", "width": 768, "height": 512, "seed": 3000000000,
            "cfg_scale": 7.5, "steps": 28, "scheduler": "dpmpp_2m_k",
            "model": {"key": "abc", "hash": "blake3:00", "name": "Juggernaut XL", "base": "sdxl"}}"#;
        let i = inspect_png(&png_with(&[Chunk::Text("invokeai_metadata", meta)])).unwrap();
        assert_eq!(i.source, Source::InvokeAi);
        assert_eq!(i.prompt.as_deref(), Some("a lighthouse"));
        assert_eq!(i.negative_prompt.as_deref(), Some("fog"));
        assert_eq!((i.width, i.height), (Some(768), Some(512)));
        assert_eq!(i.seed, Some(3_000_000_000));
        assert_eq!(i.cfg_scale, Some(7.5));
        assert_eq!(i.steps, Some(28));
        assert_eq!(i.sampler.as_deref(), Some("DPM++ 2M"));
        assert_eq!(i.schedule.as_deref(), Some("Karras"));
        assert_eq!(i.model.as_deref(), Some("Juggernaut XL"));
        let json = serde_json::to_value(&i).unwrap();
        assert_eq!(json["source"], "invokeai");
    }

    #[test]
    fn no_metadata_and_broken_json_give_source_none() {
        let i = inspect_png(&png_with(&[])).unwrap();
        assert_eq!(i.source, Source::None);
        assert!(i.raw.is_empty() && i.prompt.is_none());
        let i = inspect_png(&png_with(&[Chunk::Text("prompt", "{not json")])).unwrap();
        assert_eq!(i.source, Source::None);
        assert_eq!(i.raw.len(), 1, "the text is still shown");
        assert_eq!(serde_json::to_value(&i).unwrap()["source"], "none");
        let i = inspect_png(&png_with(&[Chunk::Text("parameters", A1111)])).unwrap();
        assert_eq!(serde_json::to_value(&i).unwrap()["source"], "a1111");
        let i = inspect_png(&png_with(&[Chunk::Text("prompt", COMFY)])).unwrap();
        assert_eq!(serde_json::to_value(&i).unwrap()["source"], "comfyui");
    }

    #[test]
    fn a1111_wins_over_comfyui_when_both_are_present() {
        let png = png_with(&[
            Chunk::Text("prompt", COMFY),
            Chunk::Text("parameters", A1111),
        ]);
        check_a1111(&inspect_png(&png).unwrap());
    }

    #[test]
    fn garbage_is_not_a_png() {
        for bytes in [&b""[..], b"GIF89a......", b"\x89PNG", &[0u8; 100]] {
            assert!(matches!(inspect_png(bytes), Err(MetadataError::NotPng)));
        }
        let err = inspect_png(b"<html>").unwrap_err();
        assert!(err.to_string().contains("not a PNG"), "{err}");
    }

    #[test]
    fn every_truncation_is_an_error_not_a_panic() {
        let png = png_with(&[Chunk::Ztxt("parameters", A1111), Chunk::Text("x", "y")]);
        for len in 8..png.len() {
            match inspect_png(&png[..len]) {
                Err(MetadataError::Truncated { .. }) => {}
                other => panic!("cut at {len}: {other:?}"),
            }
        }
        assert!(inspect_png(&png).is_ok());
    }

    #[test]
    fn damaged_text_chunk_is_reported() {
        let mut png = png_with(&[Chunk::Text("parameters", A1111)]);
        let at = png.windows(5).position(|w| w == b"knigh").unwrap();
        png[at] ^= 0x20;
        let err = inspect_png(&png).unwrap_err();
        assert!(matches!(err, MetadataError::Corrupt { .. }), "{err}");
        assert!(err.to_string().contains("parameters"), "{err}");
    }

    #[test]
    fn huge_chunk_length_is_caught_before_reading() {
        let mut png = png_with(&[Chunk::Text("parameters", "x")]);
        // First chunk after IHDR (8 signature + 25 IHDR bytes) is the tEXt; claim 2 GiB.
        png[33..37].copy_from_slice(&0x7fff_ffffu32.to_be_bytes());
        assert!(matches!(
            inspect_png(&png),
            Err(MetadataError::Truncated { .. })
        ));
        png[33..37].copy_from_slice(&0xffff_ffffu32.to_be_bytes());
        assert!(matches!(
            inspect_png(&png),
            Err(MetadataError::Corrupt { .. })
        ));
    }

    #[test]
    fn oversized_text_is_refused() {
        let big = "a".repeat(MAX_TEXT_BYTES + 1);
        let err = inspect_png(&png_with(&[Chunk::Text("parameters", &big)])).unwrap_err();
        assert!(matches!(err, MetadataError::TextTooLarge { .. }), "{err}");
        // A zTXt that is small on disk but inflates past the limit ("zip bomb").
        let bomb = png_with(&[Chunk::Ztxt("parameters", &big)]);
        assert!(bomb.len() < 10_000, "{}", bomb.len());
        let err = inspect_png(&bomb).unwrap_err();
        assert!(matches!(err, MetadataError::TextTooLarge { .. }), "{err}");
        let err = inspect_png(&png_with(&[Chunk::ItxtCompressed("parameters", &big)])).unwrap_err();
        assert!(matches!(err, MetadataError::TextTooLarge { .. }), "{err}");
        // Just under the limit is fine.
        let ok = "a".repeat(MAX_TEXT_BYTES - 100);
        assert!(inspect_png(&png_with(&[Chunk::Ztxt("parameters", &ok)])).is_ok());
    }

    #[test]
    fn total_text_is_bounded_across_chunks() {
        let part = "b".repeat(MAX_TEXT_BYTES - 100);
        let chunks: Vec<_> = (0..9).map(|_| Chunk::Ztxt("k", &part)).collect();
        let err = inspect_png(&png_with(&chunks)).unwrap_err();
        assert!(matches!(err, MetadataError::TextTooLarge { .. }), "{err}");
    }

    #[test]
    fn crc_matches_the_png_spec() {
        // CRC of "IEND" with no data, as every PNG ends: ae 42 60 82.
        assert_eq!(crc32(b"IEND"), 0xae42_6082);
    }
}
