//! A1111-style generation parameters ("infotext"): the text stored in a PNG's `parameters` chunk
//! that Civitai, image viewers and A1111 itself read back.
//!
//! Format: the prompt; a `Negative prompt: ...` line only when there is one; then one line of
//! `Key: value` pairs joined by ", ". A value holding `,`, `:` or a newline is JSON-quoted.

/// The settings of one generated image, in the words A1111 uses.
#[derive(Debug, Clone, PartialEq)]
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
fn format_number(x: f64) -> String {
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
}
