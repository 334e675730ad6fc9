//! A1111-style generation parameters ("infotext"): the text stored in a PNG's `parameters` chunk
//! that Civitai, image viewers and A1111 itself read back.
//!
//! Format: the prompt; a `Negative prompt: ...` line only when there is one; then one line of
//! `Key: value` pairs joined by ", ". A value holding `,`, `:` or a newline is JSON-quoted.
//! [`Parameters::parse`] reads any A1111-style text back (nothing required); [`Infotext::parse`]
//! also insists on the settings needed to make the image again.

/// The settings of one generated image, in the words A1111 uses.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Infotext {
    pub prompt: String,
    pub negative_prompt: String,
    pub steps: u32,
    pub sampler: String,
    /// A1111 1.9+ writes the schedule separately ("Schedule type: Karras").
    pub schedule: Option<String>,
    pub cfg_scale: f64,
    pub seed: u64,
    pub width: u32,
    pub height: u32,
    /// AutoV2: the first 10 hex digits of the checkpoint's sha256.
    pub model_hash: Option<String>,
    pub model: Option<String>,
    /// A1111 writes "Clip skip" only when it is above 1.
    pub clip_skip: u32,
    /// Other `Key: value` pairs (hires fix, extensions, "Seed resize from", ...), kept in order so
    /// that reading and writing an infotext loses nothing. Written just before "Version".
    pub extra: Vec<(String, String)>,
}

impl Infotext {
    pub fn to_text(&self) -> String {
        let mut out = self.prompt.clone();
        if !self.negative_prompt.is_empty() {
            out.push_str("\nNegative prompt: ");
            out.push_str(&self.negative_prompt);
        }
        let mut fields: Vec<(&str, String)> = vec![
            ("Steps", self.steps.to_string()),
            ("Sampler", self.sampler.clone()),
        ];
        if let Some(s) = &self.schedule {
            fields.push(("Schedule type", s.clone()));
        }
        fields.push(("CFG scale", format_number(self.cfg_scale)));
        fields.push(("Seed", self.seed.to_string()));
        fields.push(("Size", format!("{}x{}", self.width, self.height)));
        if let Some(h) = &self.model_hash {
            fields.push(("Model hash", h.clone()));
        }
        if let Some(m) = &self.model {
            fields.push(("Model", m.clone()));
        }
        if self.clip_skip > 1 {
            fields.push(("Clip skip", self.clip_skip.to_string()));
        }
        for (k, v) in &self.extra {
            // A key that the parser could not read back would corrupt every field after it.
            if is_valid_key(k) && !is_known_key(k) {
                fields.push((k.as_str(), v.clone()));
            } else {
                tracing::debug!(key = %k, "infotext: extra key left out");
            }
        }
        fields.push((
            "Version",
            format!("Local Diffusers {}", env!("CARGO_PKG_VERSION")),
        ));
        let line = fields
            .iter()
            .map(|(k, v)| format!("{k}: {}", quote(v)))
            .collect::<Vec<_>>()
            .join(", ");
        out.push('\n');
        out.push_str(&line);
        out
    }
}

/// "7" for 7.0 and "7.5" for 7.5, as A1111's infotexts show whole CFG scales.
pub(crate) fn format_number(x: f64) -> String {
    if x.fract() == 0.0 && x.abs() < 1e15 {
        format!("{}", x as i64)
    } else {
        format!("{x}")
    }
}

fn quote(v: &str) -> String {
    if v.contains([',', ':', '\n']) {
        serde_json::to_string(v).expect("strings always serialise")
    } else {
        v.to_owned()
    }
}

/// Keys that have a field of their own in [`Infotext`] / [`Parameters`].
const KNOWN_KEYS: &[&str] = &[
    "Steps",
    "Sampler",
    "Schedule type",
    "CFG scale",
    "Seed",
    "Size",
    "Model hash",
    "Model",
    "Clip skip",
    "Version",
];

fn is_known_key(k: &str) -> bool {
    KNOWN_KEYS.contains(&k)
}

/// A1111's key pattern `\w[\w \-/]+` (modules/infotext_utils.py, `re_param_code`), without the
/// surrounding spaces the parser trims away.
fn is_valid_key(k: &str) -> bool {
    let mut chars = k.chars();
    let Some(first) = chars.next() else {
        return false;
    };
    (first.is_alphanumeric() || first == '_')
        && k.chars().count() >= 2
        && k.trim_end() == k
        && chars.all(|c| c.is_alphanumeric() || matches!(c, '_' | ' ' | '-' | '/'))
}

/// Why a text could not be read as the complete settings of an image.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum InfotextError {
    #[error(
        "the parameters text has no \"{key}\" value, so the image cannot be made again from it"
    )]
    Missing { key: &'static str },
    #[error("the parameters text has \"{key}: {value}\", which is not a valid {key}")]
    Invalid { key: &'static str, value: String },
}

/// What an A1111-style parameters text says, as far as it says it. Nothing is required, so this
/// also reads texts from other tools and older versions; values that do not parse stay in `extra`.
#[derive(Debug, Clone, PartialEq, Default, serde::Serialize)]
pub struct Parameters {
    pub prompt: String,
    pub negative_prompt: String,
    pub steps: Option<u32>,
    /// As written: A1111 before 1.9 fused the schedule into it ("DPM++ 2M Karras").
    pub sampler: Option<String>,
    pub schedule: Option<String>,
    pub cfg_scale: Option<f64>,
    pub seed: Option<u64>,
    pub width: Option<u32>,
    pub height: Option<u32>,
    pub model_hash: Option<String>,
    pub model: Option<String>,
    pub clip_skip: Option<u32>,
    pub version: Option<String>,
    pub extra: Vec<(String, String)>,
}

impl Parameters {
    /// Read a parameters text. Like A1111's `parse_generation_parameters`, the last line is the
    /// settings line only when at least three `Key: value` pairs read from it; otherwise the whole
    /// text is prompt. Lines are kept as they are (A1111 trims them) so multi-line prompts survive.
    pub fn parse(text: &str) -> Parameters {
        let text = text.trim_end();
        let (body, pairs) = match text.rsplit_once('\n') {
            Some((body, last)) => match parse_pairs(last) {
                Some(pairs) => (body, pairs),
                None => (text, Vec::new()),
            },
            None => match parse_pairs(text) {
                Some(pairs) => ("", pairs),
                None => (text, Vec::new()),
            },
        };

        let mut p = Parameters::default();
        let mut prompt: Vec<&str> = Vec::new();
        let mut negative: Option<Vec<&str>> = None;
        for line in body.split('\n') {
            let line = line.strip_suffix('\r').unwrap_or(line);
            match &mut negative {
                Some(neg) => neg.push(line),
                None => match line.strip_prefix("Negative prompt:") {
                    Some(rest) => negative = Some(vec![rest.trim_start()]),
                    None => prompt.push(line),
                },
            }
        }
        p.prompt = prompt.join("\n");
        p.negative_prompt = negative.map(|n| n.join("\n")).unwrap_or_default();

        for (key, value) in pairs {
            let ok = match key.as_str() {
                "Steps" => set(&mut p.steps, value.parse().ok()),
                "Sampler" => set(&mut p.sampler, Some(value.clone())),
                "Schedule type" => set(&mut p.schedule, Some(value.clone())),
                "CFG scale" => set(
                    &mut p.cfg_scale,
                    value.parse::<f64>().ok().filter(|x| x.is_finite()),
                ),
                "Seed" => set(&mut p.seed, value.parse().ok()),
                "Size" => match parse_size(&value) {
                    Some((w, h)) => {
                        p.width = Some(w);
                        p.height = Some(h);
                        true
                    }
                    None => false,
                },
                "Model hash" => set(&mut p.model_hash, Some(value.clone())),
                "Model" => set(&mut p.model, Some(value.clone())),
                "Clip skip" => set(&mut p.clip_skip, value.parse().ok()),
                "Version" => set(&mut p.version, Some(value.clone())),
                _ => false,
            };
            if !ok {
                p.extra.push((key, value));
            }
        }
        p
    }
}

fn set<T>(slot: &mut Option<T>, value: Option<T>) -> bool {
    let ok = value.is_some();
    if ok {
        *slot = value;
    }
    ok
}

fn parse_size(v: &str) -> Option<(u32, u32)> {
    let (w, h) = v.split_once('x')?;
    Some((w.trim().parse().ok()?, h.trim().parse().ok()?))
}

/// The `Key: value` pairs of a settings line, or `None` when it is not one.
fn parse_pairs(line: &str) -> Option<Vec<(String, String)>> {
    let line = line.strip_suffix('\r').unwrap_or(line);
    let mut rest = line;
    let mut out = Vec::new();
    loop {
        rest = rest.trim_start();
        if rest.is_empty() {
            break;
        }
        let colon = rest.find(':')?;
        let key = rest[..colon].trim();
        if !is_valid_key(key) {
            return None;
        }
        rest = rest[colon + 1..].trim_start();
        let value = if rest.starts_with('"') {
            let end = json_string_end(rest)?;
            let value: String = serde_json::from_str(&rest[..end]).ok()?;
            rest = rest[end..].trim_start();
            if !rest.is_empty() {
                rest = rest.strip_prefix(',')?;
            }
            value
        } else {
            match rest.find(',') {
                Some(i) => {
                    let v = rest[..i].trim().to_owned();
                    rest = &rest[i + 1..];
                    v
                }
                None => {
                    let v = rest.trim().to_owned();
                    rest = "";
                    v
                }
            }
        };
        out.push((key.to_owned(), value));
    }
    // Three pairs: A1111's own threshold for telling a settings line from a prompt line.
    (out.len() >= 3).then_some(out)
}

/// Byte index just past the closing quote of the JSON string that `s` starts with.
fn json_string_end(s: &str) -> Option<usize> {
    let mut escaped = false;
    for (i, c) in s.char_indices().skip(1) {
        match c {
            _ if escaped => escaped = false,
            '\\' => escaped = true,
            '"' => return Some(i + 1),
            _ => {}
        }
    }
    None
}

impl Infotext {
    /// Read a parameters text that must hold everything needed to make the image again (Steps,
    /// Sampler, CFG scale, Seed, Size). "Version" is dropped: [`Infotext::to_text`] writes ours.
    pub fn parse(text: &str) -> Result<Infotext, InfotextError> {
        let p = Parameters::parse(text);
        fn need<T>(v: Option<T>, key: &'static str, p: &Parameters) -> Result<T, InfotextError> {
            v.ok_or_else(|| match p.extra.iter().find(|(k, _)| k == key) {
                Some((_, value)) => InfotextError::Invalid {
                    key,
                    value: value.clone(),
                },
                None => InfotextError::Missing { key },
            })
        }
        Ok(Infotext {
            steps: need(p.steps, "Steps", &p)?,
            sampler: need(p.sampler.clone(), "Sampler", &p)?,
            cfg_scale: need(p.cfg_scale, "CFG scale", &p)?,
            seed: need(p.seed, "Seed", &p)?,
            width: need(p.width, "Size", &p)?,
            height: need(p.height, "Size", &p)?,
            clip_skip: match p.clip_skip {
                Some(n) => n,
                None => match p.extra.iter().find(|(k, _)| k == "Clip skip") {
                    Some((_, value)) => {
                        return Err(InfotextError::Invalid {
                            key: "Clip skip",
                            value: value.clone(),
                        });
                    }
                    // A1111 leaves "Clip skip" out when it is 1.
                    None => 1,
                },
            },
            schedule: p.schedule,
            model_hash: p.model_hash,
            model: p.model,
            extra: p
                .extra
                .into_iter()
                .filter(|(k, _)| !is_known_key(k))
                .collect(),
            prompt: p.prompt,
            negative_prompt: p.negative_prompt,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Infotext {
        Infotext {
            prompt: "portrait of a knight, (detailed eyes:1.2)".into(),
            negative_prompt: "lowres, blurry".into(),
            steps: 20,
            sampler: "DPM++ 2M".into(),
            schedule: Some("Karras".into()),
            cfg_scale: 7.0,
            seed: 1234567890,
            width: 512,
            height: 768,
            model_hash: Some("0123456789".into()),
            model: Some("name".into()),
            clip_skip: 2,
            extra: Vec::new(),
        }
    }

    #[test]
    fn matches_the_a1111_layout() {
        // Layout as in REFERENCE.md's A1111 example; only the Version value is ours.
        let want = "portrait of a knight, (detailed eyes:1.2)\nNegative prompt: lowres, blurry\n\
            Steps: 20, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 7, Seed: 1234567890, \
            Size: 512x768, Model hash: 0123456789, Model: name, Clip skip: 2, Version: Local Diffusers ";
        assert!(
            sample().to_text().starts_with(want),
            "{}",
            sample().to_text()
        );
    }

    #[test]
    fn no_negative_line_when_empty_and_no_clip_skip_1() {
        let t = Infotext {
            negative_prompt: String::new(),
            clip_skip: 1,
            cfg_scale: 7.5,
            ..sample()
        }
        .to_text();
        assert!(!t.contains("Negative prompt"));
        assert!(!t.contains("Clip skip"));
        assert!(t.contains("CFG scale: 7.5,"));
    }

    #[test]
    fn values_with_separators_are_json_quoted() {
        let t = Infotext {
            model: Some("my, model: v2".into()),
            ..sample()
        }
        .to_text();
        assert!(t.contains(r#"Model: "my, model: v2""#), "{t}");
    }

    #[test]
    fn round_trips_through_text() {
        let cases = [
            sample(),
            Infotext {
                negative_prompt: String::new(),
                clip_skip: 1,
                schedule: None,
                model_hash: None,
                model: None,
                ..sample()
            },
            Infotext {
                prompt: "line one\nline two, with: colon\n\n(indented)".into(),
                negative_prompt: "bad\nworse".into(),
                cfg_scale: 7.5,
                seed: u64::MAX,
                model: Some("my, model: v2".into()),
                extra: vec![
                    ("Denoising strength".into(), "0.7".into()),
                    ("Lora hashes".into(), "a: 123, b: \"456\"".into()),
                    ("Hires upscaler".into(), "R-ESRGAN 4x+".into()),
                ],
                ..sample()
            },
            Infotext {
                prompt: String::new(),
                ..sample()
            },
        ];
        for want in cases {
            let text = want.to_text();
            let got = Infotext::parse(&text).unwrap_or_else(|e| panic!("{e}: {text}"));
            assert_eq!(got, want, "{text}");
            assert_eq!(got.to_text(), text);
        }
    }

    #[test]
    fn extra_pairs_are_written_before_version() {
        let t = Infotext {
            extra: vec![("Seed resize from".into(), "-1x-1".into())],
            ..sample()
        }
        .to_text();
        assert!(
            t.contains("Clip skip: 2, Seed resize from: -1x-1, Version: "),
            "{t}"
        );
    }

    #[test]
    fn extra_keys_that_would_not_read_back_are_left_out() {
        let t = Infotext {
            extra: vec![
                ("Bad: key".into(), "x".into()),
                ("Steps".into(), "99".into()),
                ("Good key".into(), "y".into()),
            ],
            ..sample()
        }
        .to_text();
        assert!(!t.contains("Bad"), "{t}");
        assert!(!t.contains("Steps: 99"), "{t}");
        assert!(t.contains("Good key: y"), "{t}");
    }

    #[test]
    fn reads_a1111_text() {
        // Verbatim shape of an A1111 1.10 infotext (REFERENCE.md), CRLF line ends as some
        // Windows tools save them.
        let text =
            "portrait of a knight, (detailed eyes:1.2)\r\nNegative prompt: lowres, blurry\r\n\
            Steps: 20, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 7, Seed: 1234567890, \
            Size: 512x768, Model hash: 0123456789, Model: name, VAE: name, Clip skip: 2, \
            Lora hashes: \"add_detail: 7c6bad76eb54, x: 1\", Version: v1.10.1\r\n";
        let p = Parameters::parse(text);
        assert_eq!(p.prompt, "portrait of a knight, (detailed eyes:1.2)");
        assert_eq!(p.negative_prompt, "lowres, blurry");
        assert_eq!(p.steps, Some(20));
        assert_eq!(p.sampler.as_deref(), Some("DPM++ 2M"));
        assert_eq!(p.schedule.as_deref(), Some("Karras"));
        assert_eq!(p.cfg_scale, Some(7.0));
        assert_eq!(p.seed, Some(1234567890));
        assert_eq!((p.width, p.height), (Some(512), Some(768)));
        assert_eq!(p.model_hash.as_deref(), Some("0123456789"));
        assert_eq!(p.model.as_deref(), Some("name"));
        assert_eq!(p.clip_skip, Some(2));
        assert_eq!(p.version.as_deref(), Some("v1.10.1"));
        assert_eq!(
            p.extra,
            vec![
                ("VAE".to_owned(), "name".to_owned()),
                (
                    "Lora hashes".to_owned(),
                    "add_detail: 7c6bad76eb54, x: 1".to_owned()
                ),
            ]
        );
        let info = Infotext::parse(text).unwrap();
        assert!(info.extra.iter().all(|(k, _)| k != "Version"));
    }

    #[test]
    fn fused_sampler_names_are_kept_and_negative_may_be_missing() {
        // Before 1.9 A1111 wrote "DPM++ 2M Karras" and no "Schedule type".
        let p = Parameters::parse(
            "a cat\nin a hat\nSteps: 30, Sampler: DPM++ 2M Karras, CFG scale: 7.5, Seed: 1, Size: 768x512",
        );
        assert_eq!(p.prompt, "a cat\nin a hat");
        assert_eq!(p.negative_prompt, "");
        assert_eq!(p.sampler.as_deref(), Some("DPM++ 2M Karras"));
        assert_eq!(p.schedule, None);
        assert_eq!(p.cfg_scale, Some(7.5));
        let info = Infotext::parse(
            "a cat\nSteps: 30, Sampler: DPM++ 2M Karras, CFG scale: 7.5, Seed: 1, Size: 768x512",
        )
        .unwrap();
        assert_eq!(info.clip_skip, 1);
    }

    #[test]
    fn text_without_settings_is_all_prompt() {
        // Two pairs are below A1111's threshold of three.
        let p = Parameters::parse("a: b, c: d");
        assert_eq!(p.prompt, "a: b, c: d");
        assert_eq!(p.steps, None);
        let p = Parameters::parse("just a prompt\nwith two lines");
        assert_eq!(p.prompt, "just a prompt\nwith two lines");
        assert!(p.extra.is_empty());
        assert_eq!(
            Infotext::parse("just a prompt"),
            Err(InfotextError::Missing { key: "Steps" })
        );
    }

    #[test]
    fn bad_values_are_kept_and_reported() {
        let text = "x\nSteps: many, Sampler: Euler, CFG scale: 7, Seed: 1, Size: 512x512";
        let p = Parameters::parse(text);
        assert_eq!(p.steps, None);
        assert_eq!(p.extra, vec![("Steps".to_owned(), "many".to_owned())]);
        let err = Infotext::parse(text).unwrap_err();
        assert_eq!(
            err,
            InfotextError::Invalid {
                key: "Steps",
                value: "many".into()
            }
        );
        assert!(err.to_string().contains("Steps: many"), "{err}");
        let p = Parameters::parse("x\nSteps: 2, Sampler: Euler, Size: 512by512");
        assert_eq!(p.width, None);
        let p = Parameters::parse("x\nSteps: 2, Sampler: Euler, CFG scale: NaN");
        assert_eq!(p.cfg_scale, None);
    }

    #[test]
    fn unterminated_quote_is_not_a_settings_line() {
        let p = Parameters::parse("x\nSteps: 2, Sampler: Euler, Model: \"open");
        assert_eq!(p.steps, None);
        assert!(p.prompt.ends_with("\"open"));
    }
}
