//! Pictures from a conversation: deciding whether a chat moment calls for a picture (`auto`), and
//! writing the image prompt from the recent messages and the characters in the scene, either with
//! the built-in writer (no language model needed) or by asking an OpenAI-compatible chat server the
//! user configured (llama.cpp, Ollama, ...), falling back to the built-in writer on any failure.
//!
//! The built-in writer is a small hand-written heuristic: no crate does "keep what can be seen in
//! roleplay text". It drops speech (quoted text), out-of-character notes, markup and links, keeps
//! narration clauses that mention visible things (looks, clothing, places, light, poses), and
//! puts the characters' appearance texts first, since those are what keep a character recognisable.

use crate::settings::ChatWriterSettings;
use serde::{Deserialize, Serialize};
use std::time::Duration;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    User,
    /// The character speaking (SillyTavern's "assistant").
    #[serde(alias = "assistant", alias = "char")]
    Character,
    #[serde(alias = "narrator")]
    System,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ChatMessage {
    pub role: Role,
    #[serde(default)]
    pub name: Option<String>,
    pub text: String,
}

/// What picture to make. The names follow what chat users know from SillyTavern's image menu.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Mode {
    /// The (first) character: "yourself".
    Portrait,
    /// The user's own persona: "me".
    User,
    /// Everyone in the scene, doing what the recent messages describe: "the whole story".
    Scene,
    /// Only the last message.
    LastMessage,
    /// The place, without people.
    Background,
    /// Decide from the conversation whether a picture is wanted, and which.
    Auto,
}

/// A character as the writer sees it.
#[derive(Debug, Clone, PartialEq)]
pub struct SceneCharacter {
    pub name: String,
    pub appearance: String,
}

/// The outcome of `auto`: draw (with which mode, and a literal prompt for `/imagine`) or not.
#[derive(Debug, Clone, PartialEq)]
pub enum Decision {
    Draw {
        mode: Mode,
        /// `/imagine a red fox` asks for exactly this prompt.
        literal: Option<String>,
        reason: String,
    },
    NoPicture {
        reason: String,
    },
}

/// How readily a descriptive message triggers a picture in `auto` mode.
pub use crate::characters::Eagerness;

/// Phrases that ask for a picture outright.
const REQUESTS: &[&str] = &[
    "send me a pic",
    "send a pic",
    "send me a photo",
    "send a photo",
    "send me a picture",
    "send a picture",
    "send me an image",
    "send me a selfie",
    "selfie",
    "show me",
    "draw me",
    "draw a",
    "draw us",
    "take a picture",
    "take a photo",
    "picture of you",
    "photo of you",
    "pic of you",
    "what do you look like",
    "let me see you",
    "can i see you",
    "i want to see you",
];

/// Decides for `auto` mode from the last messages. Explicit requests come from the user's last
/// message; a descriptive turn is the character's last message rich in visible detail.
pub fn decide(messages: &[ChatMessage], eagerness: Eagerness) -> Decision {
    if eagerness == Eagerness::Off {
        return Decision::NoPicture {
            reason: "Automatic pictures are turned off for this character.".into(),
        };
    }
    if let Some(last_user) = messages.iter().rev().find(|m| m.role == Role::User) {
        let text = last_user.text.trim();
        if let Some(rest) = text.strip_prefix("/imagine") {
            let literal = rest.trim();
            if !literal.is_empty() {
                return Decision::Draw {
                    mode: Mode::Scene,
                    literal: Some(literal.to_owned()),
                    reason: "The user asked for this picture with /imagine.".into(),
                };
            }
        }
        // Only a request in the newest user message counts: an old one was already answered.
        let newest_is_user = messages.last().is_some_and(|m| m.role == Role::User);
        let lower = text.to_lowercase();
        if newest_is_user {
            if let Some(phrase) = REQUESTS.iter().find(|p| lower.contains(*p)) {
                return Decision::Draw {
                    mode: requested_mode(&lower),
                    literal: None,
                    reason: format!("The user asked for a picture (\"{phrase}\")."),
                };
            }
        }
    }
    let threshold = match eagerness {
        Eagerness::Off | Eagerness::Low => usize::MAX,
        Eagerness::Normal => 5,
        Eagerness::High => 3,
    };
    if let Some(last) = messages.last().filter(|m| m.role != Role::User) {
        let score = visual_score(&strip_markup(&last.text));
        if score >= threshold {
            return Decision::Draw {
                mode: Mode::LastMessage,
                literal: None,
                reason: format!(
                    "The last message describes a lot to see ({score} visual details)."
                ),
            };
        }
    }
    Decision::NoPicture {
        reason: "Nobody asked for a picture, and the last message describes little to see.".into(),
    }
}

/// Which picture a request means: "show me the room" is the place, "selfie" the character.
fn requested_mode(lower: &str) -> Mode {
    let has = |words: &[&str]| words.iter().any(|w| lower.contains(w));
    if has(&[
        "room",
        "place",
        "where you are",
        "surroundings",
        "view",
        "background",
        "outside",
    ]) {
        Mode::Background
    } else if has(&[
        " us",
        "both of us",
        "the scene",
        "what's happening",
        "what is happening",
    ]) {
        Mode::Scene
    } else if has(&["draw me", "picture of me", "photo of me", "myself"]) {
        Mode::User
    } else {
        Mode::Portrait
    }
}

/// Writes the prompt for `mode` (not `Auto`: decide first). `characters[0]` is the main character;
/// `user` is the user's persona when the chat app sent one.
pub fn write_prompt(
    mode: Mode,
    messages: &[ChatMessage],
    characters: &[SceneCharacter],
    user: Option<&SceneCharacter>,
) -> String {
    let mut parts: Vec<String> = Vec::new();
    let look = |c: &SceneCharacter| join_nonempty(&[c.name.as_str(), c.appearance.as_str()]);
    match mode {
        Mode::Portrait | Mode::Auto => {
            if let Some(c) = characters.first() {
                parts.push(look(c));
            }
            parts.push("portrait, looking at viewer".into());
            // The pose and clothes of the moment, if the last character message describes them.
            if let Some(m) = messages.iter().rev().find(|m| m.role == Role::Character) {
                parts.push(visual_clauses(&m.text, 20, false));
            }
        }
        Mode::User => {
            match user {
                Some(u) => parts.push(look(u)),
                None => parts.push("a person".into()),
            }
            parts.push("portrait, looking at viewer".into());
        }
        Mode::Scene => {
            for c in characters {
                parts.push(look(c));
            }
            let recent: Vec<&ChatMessage> = messages.iter().rev().take(4).collect();
            let text: Vec<String> = recent
                .iter()
                .rev()
                .map(|m| visual_clauses(&m.text, 20, false))
                .collect();
            parts.push(join_nonempty(
                &text.iter().map(String::as_str).collect::<Vec<_>>(),
            ));
        }
        Mode::LastMessage => {
            if let Some(m) = messages.last() {
                let speaker = characters.iter().find(|c| {
                    m.name
                        .as_deref()
                        .is_some_and(|n| n.eq_ignore_ascii_case(&c.name))
                });
                let speaker = speaker.or(if m.role == Role::Character {
                    characters.first()
                } else {
                    None
                });
                if let Some(c) = speaker {
                    parts.push(look(c));
                }
                parts.push(visual_clauses(&m.text, 40, false));
            }
        }
        Mode::Background => {
            parts.push("scenery, no humans".into());
            let recent: Vec<String> = messages
                .iter()
                .rev()
                .take(4)
                .map(|m| visual_clauses(&m.text, 20, true))
                .collect();
            parts.push(join_nonempty(
                &recent.iter().rev().map(String::as_str).collect::<Vec<_>>(),
            ));
        }
    }
    let refs: Vec<&str> = parts.iter().map(String::as_str).collect();
    let prompt = join_nonempty(&refs);
    // Several stored characters (up to 2,000 characters of look each) or a long inline look
    // could pass the composer's prompt limit, a refusal of a prompt the caller never wrote.
    // The text encoder reads far less than this anyway.
    match prompt.char_indices().nth(MAX_WRITTEN_PROMPT_CHARS) {
        Some((end, _)) => {
            let cut = &prompt[..end];
            // At the last whole phrase (or word) inside the limit.
            let at = cut.rfind(", ").or_else(|| cut.rfind(' ')).unwrap_or(end);
            prompt[..at].trim_end_matches([',', ' ']).to_owned()
        }
        None => prompt,
    }
}

/// The longest prompt [`write_prompt`] writes, well inside the composer's limit so that the
/// settings' prefix and suffix still fit.
pub const MAX_WRITTEN_PROMPT_CHARS: usize = 4_000;

/// Joins the non-empty parts with ", ".
fn join_nonempty(parts: &[&str]) -> String {
    parts
        .iter()
        .map(|p| p.trim().trim_matches(',').trim())
        .filter(|p| !p.is_empty())
        .collect::<Vec<_>>()
        .join(", ")
}

/// Removes what is not seen: quoted speech, out-of-character notes ((...)), [bracketed notes],
/// HTML tags, links, markdown emphasis marks. Narration in *asterisks* is kept: in roleplay it
/// is the action.
pub fn strip_markup(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars().peekable();
    // Which closing mark ends the span being skipped.
    let mut skip_until: Option<char> = None;
    let mut paren_depth = 0usize;
    while let Some(c) = chars.next() {
        if let Some(end) = skip_until {
            if c == end {
                skip_until = None;
                out.push(' ');
            }
            continue;
        }
        if paren_depth > 0 {
            match c {
                '(' => paren_depth += 1,
                ')' => paren_depth -= 1,
                _ => {}
            }
            continue;
        }
        match c {
            '"' => skip_until = Some('"'),
            '“' => skip_until = Some('”'),
            '«' => skip_until = Some('»'),
            '<' => skip_until = Some('>'),
            '[' => skip_until = Some(']'),
            '(' if chars.peek() == Some(&'(') => {
                chars.next();
                paren_depth = 2;
            }
            '*' | '_' | '~' | '#' | '`' => out.push(' '),
            _ => out.push(c),
        }
    }
    // Links say nothing a picture can show.
    out.split_whitespace()
        .filter(|w| !w.starts_with("http://") && !w.starts_with("https://"))
        .collect::<Vec<_>>()
        .join(" ")
}

/// Splits prose into sentences and clauses (on . ! ? ; and newlines).
pub fn sentences(text: &str) -> Vec<&str> {
    text.split(['.', '!', '?', ';', '\n'])
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .collect()
}

/// Words for a visible person or thing: looks, clothing, poses, what they hold.
const PERSON: &[&str] = &[
    "red", "blue", "green", "black", "white", "silver", "golden", "gold", "blonde", "brown",
    "pink", "purple", "grey", "gray", "auburn", "pale", "tanned", "freckles", "hair", "eyes",
    "skin", "face", "lips", "smile", "beard", "ears", "tail", "wings", "horns", "tall", "short",
    "slender", "muscular", "curly", "long", "braid", "ponytail", "scar", "tattoo", "glasses",
    "dress", "shirt", "cloak", "armor", "armour", "jacket", "coat", "skirt", "boots", "hat",
    "hood", "robe", "gown", "uniform", "apron", "scarf", "gloves", "necklace", "earrings", "ring",
    "crown", "sweater", "hoodie", "jeans", "kimono", "bikini", "suit", "tie", "cape", "door",
    "bed", "table", "chair", "books", "train", "throne", "darkness", "shadow", "glowing", "bright",
    "dim", "lit", "sitting", "sits", "standing", "stands", "walking", "walks", "running", "lying",
    "lies", "leaning", "leans", "holding", "holds", "wearing", "wears", "smiling", "smiles",
    "dancing", "reading", "sleeping", "kneeling", "kneels", "looking", "gazing", "waving",
    "hugging", "laughing", "crying", "blushing", "blushes", "sword", "staff", "cup", "book",
];

/// Words for the place, light and weather (all `background` keeps).
const PLACE: &[&str] = &[
    "room",
    "forest",
    "woods",
    "beach",
    "street",
    "city",
    "castle",
    "tavern",
    "inn",
    "kitchen",
    "bedroom",
    "garden",
    "mountain",
    "mountains",
    "river",
    "lake",
    "sea",
    "ocean",
    "sky",
    "window",
    "fireplace",
    "fire",
    "candle",
    "candles",
    "lamp",
    "library",
    "shelves",
    "field",
    "meadow",
    "cave",
    "ruins",
    "temple",
    "market",
    "ship",
    "cafe",
    "office",
    "balcony",
    "rooftop",
    "bridge",
    "tower",
    "hall",
    "flowers",
    "trees",
    "grass",
    "stars",
    "moon",
    "sun",
    "clouds",
    "waves",
    "sand",
    "snow",
    "rain",
    "fog",
    "mist",
    "storm",
    "light",
    "sunlight",
    "moonlight",
    "candlelight",
    "dark",
    "shadows",
    "glow",
    "sunset",
    "sunrise",
    "dusk",
    "dawn",
    "night",
    "morning",
    "evening",
    "neon",
    "lantern",
];

/// Whether a word names something a picture can show.
fn is_visual(w: &str) -> bool {
    PERSON.contains(&w) || PLACE.contains(&w)
}

/// Filler at the start of a clause that a picture cannot show.
const FILLER: &[&str] = &[
    "i", "me", "my", "you", "your", "she", "he", "her", "his", "they", "them", "their", "we",
    "our", "it", "and", "then", "but", "so", "just", "slowly", "softly", "gently", "quickly",
    "suddenly", "finally", "also", "still", "now", "as",
];

fn words(s: &str) -> impl Iterator<Item = String> + '_ {
    s.split(|c: char| !c.is_alphanumeric() && c != '\'' && c != '-')
        .filter(|w| !w.is_empty())
        .map(|w| w.to_lowercase())
}

/// How many visible details a text names.
pub fn visual_score(text: &str) -> usize {
    words(text).filter(|w| is_visual(w)).count()
}

/// The clauses of `text` (speech and markup removed) that name something visible, in order,
/// trimmed of leading filler, at most `max_words` words. `places_only` keeps place/light clauses.
fn visual_clauses(text: &str, max_words: usize, places_only: bool) -> String {
    let clean = strip_markup(text);
    let wanted = |w: &str| {
        if places_only {
            PLACE.contains(&w)
        } else {
            is_visual(w)
        }
    };
    let mut kept: Vec<String> = Vec::new();
    let mut used = 0;
    for clause in clean.split([',', '.', '!', '?', ';', '\n', ':']) {
        let ws: Vec<String> = words(clause).collect();
        if !ws.iter().any(|w| wanted(w)) {
            continue;
        }
        // For the place alone, a clause about a person ("leans against the window") gives only
        // its place words ("window").
        let about_person = ws.iter().any(|w| PERSON.contains(&w.as_str()));
        let phrase: Vec<&str> = if places_only && about_person {
            ws.iter()
                .map(String::as_str)
                .filter(|w| PLACE.contains(w))
                .collect()
        } else {
            let start = ws
                .iter()
                .position(|w| !FILLER.contains(&w.as_str()))
                .unwrap_or(ws.len());
            ws[start..].iter().map(String::as_str).collect()
        };
        if phrase.is_empty() || used + phrase.len() > max_words {
            continue;
        }
        used += phrase.len();
        kept.push(phrase.join(if places_only && about_person {
            ", "
        } else {
            " "
        }));
    }
    kept.join(", ")
}

/// The default instructions for a language model writing prompts; the user can edit them.
pub const DEFAULT_SYSTEM_PROMPT: &str = "You write prompts for an image generator (Stable \
Diffusion). From the conversation and the characters given, describe the picture asked for as one \
line of short comma-separated phrases: who is in it and how they look, clothing, pose, place, \
lighting, mood. Only what can be seen. No dialogue, no story, no explanations, no quotes.";

/// Asks an OpenAI-compatible chat server to write the prompt. Any failure is an `Err` with a
/// plain reason; the caller falls back to the built-in writer.
pub async fn llm_prompt(
    cfg: &ChatWriterSettings,
    mode: Mode,
    messages: &[ChatMessage],
    characters: &[SceneCharacter],
) -> Result<String, String> {
    let base = cfg.url.trim().trim_end_matches('/');
    if base.is_empty() {
        return Err("no chat server address is set".into());
    }
    let url = if base.ends_with("/chat/completions") {
        base.to_owned()
    } else {
        format!("{base}/chat/completions")
    };
    let mut brief = String::new();
    for c in characters {
        brief.push_str(&format!("Character {}: {}\n", c.name, c.appearance));
    }
    brief.push_str("\nConversation:\n");
    for m in messages.iter().rev().take(8).rev() {
        let who = m.name.clone().unwrap_or_else(|| {
            match m.role {
                Role::User => "User",
                Role::Character => "Character",
                Role::System => "Narrator",
            }
            .to_owned()
        });
        brief.push_str(&format!("{who}: {}\n", m.text.trim()));
    }
    let ask = match mode {
        Mode::Portrait | Mode::Auto => "a portrait of the main character",
        Mode::User => "a portrait of the user",
        Mode::Scene => "the current scene with everyone in it",
        Mode::LastMessage => "what the last message describes",
        Mode::Background => "the place only, with no people",
    };
    brief.push_str(&format!("\nWrite the image prompt for {ask}."));
    let system = if cfg.system_prompt.trim().is_empty() {
        DEFAULT_SYSTEM_PROMPT
    } else {
        cfg.system_prompt.as_str()
    };
    let body = serde_json::json!({
        "model": cfg.model,
        "messages": [
            {"role": "system", "content": system},
            {"role": "user", "content": brief},
        ],
        "temperature": 0.4,
        "max_tokens": 200,
        "stream": false,
    });
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(cfg.timeout_seconds.clamp(1, 300)))
        .build()
        .map_err(|e| format!("could not start the HTTP client: {e}"))?;
    let mut req = client.post(&url).json(&body);
    if !cfg.api_key.is_empty() {
        req = req.bearer_auth(&cfg.api_key);
    }
    let res = req
        .send()
        .await
        .map_err(|e| format!("the chat server at {url} did not answer ({e})"))?;
    let status = res.status();
    if !status.is_success() {
        return Err(format!("the chat server at {url} answered {status}"));
    }
    let answer: serde_json::Value = res
        .json()
        .await
        .map_err(|e| format!("the chat server's answer was not JSON ({e})"))?;
    let text = answer
        .pointer("/choices/0/message/content")
        .and_then(|v| v.as_str())
        .ok_or("the chat server's answer had no message")?;
    let cleaned = clean_llm_text(text);
    if cleaned.is_empty() {
        return Err("the chat server wrote an empty prompt".into());
    }
    Ok(cleaned)
}

/// One line, no "Prompt:" label, no wrapping quotes, no reasoning block, at most 1000 characters.
fn clean_llm_text(text: &str) -> String {
    let mut t = text.to_owned();
    // Reasoning models wrap their thinking in <think>...</think>.
    while let (Some(a), Some(b)) = (t.find("<think>"), t.find("</think>")) {
        if b < a {
            break;
        }
        t.replace_range(a..b + "</think>".len(), "");
    }
    let t = t.trim();
    let t = t
        .strip_prefix("Prompt:")
        .or_else(|| t.strip_prefix("prompt:"))
        .unwrap_or(t);
    let one_line = t
        .lines()
        .map(|l| l.trim().trim_end_matches(',').trim())
        .filter(|l| !l.is_empty())
        .collect::<Vec<_>>()
        .join(", ");
    let unquoted = one_line.trim().trim_matches(['"', '\'', '`']).trim();
    unquoted.chars().take(1000).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn user(t: &str) -> ChatMessage {
        ChatMessage {
            role: Role::User,
            name: Some("Alex".into()),
            text: t.into(),
        }
    }
    fn char_msg(t: &str) -> ChatMessage {
        ChatMessage {
            role: Role::Character,
            name: Some("Seraphina".into()),
            text: t.into(),
        }
    }
    fn seraphina() -> SceneCharacter {
        SceneCharacter {
            name: "Seraphina".into(),
            appearance: "young woman, long silver hair, green eyes".into(),
        }
    }

    #[test]
    fn many_long_looks_still_make_a_prompt_the_composer_takes() {
        // Found by review: five stored characters of 2,000 characters each made a scene prompt
        // past the composer's 10,000, refused as "the prompt is too long".
        let cast: Vec<SceneCharacter> = (0..5)
            .map(|i| SceneCharacter {
                name: format!("Hero{i}"),
                appearance: "tall, red cloak, ".repeat(120),
            })
            .collect();
        let p = write_prompt(Mode::Scene, &[char_msg("*She waves.*")], &cast, None);
        let n = p.chars().count();
        assert!(n <= MAX_WRITTEN_PROMPT_CHARS && n > 3_900, "{n}");
        assert!(p.starts_with("Hero0, tall, red cloak"), "{p}");
        assert!(
            p.ends_with("cloak") || p.ends_with("tall"),
            "cut at a phrase: {p}"
        );
        const { assert!(MAX_WRITTEN_PROMPT_CHARS < crate::compose::MAX_PROMPT_CHARS) };
    }

    #[test]
    fn markup_and_speech_are_removed_narration_kept() {
        let t = strip_markup(
            "*She smiles and sits by the fire* \"Welcome, traveller!\" ((OOC: brb)) [Note: x] <b>bold</b> see https://x.example",
        );
        assert!(t.contains("She smiles and sits by the fire"), "{t}");
        for gone in ["Welcome", "OOC", "Note", "https", "<b>"] {
            assert!(!t.contains(gone), "{gone} in {t}");
        }
        assert!(t.contains("bold"));
        assert_eq!(strip_markup("“Hello” she waves"), "she waves");
    }

    #[test]
    fn scene_prompt_has_appearances_and_visible_content_but_no_dialogue() {
        let msgs = [
            user("*I push open the tavern door* \"Anyone here?\""),
            char_msg(
                "*Seraphina looks up from the bar, her white dress glowing in the candlelight.* \
                 \"Oh! A guest. Sit, sit — I'll bring you some tea.\" *She waves at a chair by the fireplace.*",
            ),
        ];
        let p = write_prompt(Mode::Scene, &msgs, &[seraphina()], None);
        assert!(
            p.starts_with("Seraphina, young woman, long silver hair, green eyes"),
            "{p}"
        );
        for want in ["tavern door", "white dress", "candlelight", "fireplace"] {
            assert!(p.contains(want), "'{want}' missing from {p}");
        }
        for unwanted in ["Anyone here", "guest", "tea", "*", "\""] {
            assert!(!p.contains(unwanted), "'{unwanted}' in {p}");
        }
    }

    #[test]
    fn portrait_user_background_and_last_message_modes() {
        let msgs = [char_msg(
            "*She leans against the window, moonlight on her face, wearing a dark blue cloak.* \"Can't sleep?\"",
        )];
        let p = write_prompt(Mode::Portrait, &msgs, &[seraphina()], None);
        assert!(p.starts_with("Seraphina, young woman"), "{p}");
        assert!(p.contains("portrait") && p.contains("blue cloak"), "{p}");
        let u = SceneCharacter {
            name: "Alex".into(),
            appearance: "man with short brown hair".into(),
        };
        let p = write_prompt(Mode::User, &msgs, &[seraphina()], Some(&u));
        assert!(
            p.starts_with("Alex, man with short brown hair, portrait"),
            "{p}"
        );
        assert!(!p.contains("Seraphina"));
        let p = write_prompt(Mode::Background, &msgs, &[seraphina()], None);
        assert!(p.starts_with("scenery, no humans"), "{p}");
        assert!(p.contains("moonlight"), "{p}");
        assert!(!p.contains("cloak") && !p.contains("Seraphina"), "{p}");
        let p = write_prompt(Mode::LastMessage, &msgs, &[seraphina()], None);
        assert!(
            p.contains("Seraphina") && p.contains("leans against the window"),
            "{p}"
        );
        assert!(!p.contains("sleep"), "{p}");
    }

    #[test]
    fn explicit_requests_trigger_with_the_right_mode() {
        let cases = [
            ("Send me a selfie!", Mode::Portrait),
            ("can you show me what you look like?", Mode::Portrait),
            ("show me the room you're in", Mode::Background),
            ("Draw us together at the beach", Mode::Scene),
            ("draw me as a knight", Mode::User),
        ];
        for (text, mode) in cases {
            let d = decide(&[char_msg("Hi."), user(text)], Eagerness::Low);
            match d {
                Decision::Draw {
                    mode: m,
                    literal: None,
                    ..
                } => assert_eq!(m, mode, "{text}"),
                other => panic!("{text}: {other:?}"),
            }
        }
        match decide(&[user("/imagine a red fox in the snow")], Eagerness::Low) {
            Decision::Draw {
                literal: Some(l), ..
            } => assert_eq!(l, "a red fox in the snow"),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn no_picture_without_reason_and_eagerness_matters() {
        let plain = [
            user("How was your day?"),
            char_msg("\"Fine, thanks. And yours?\""),
        ];
        for e in [Eagerness::Low, Eagerness::Normal, Eagerness::High] {
            assert!(
                matches!(decide(&plain, e), Decision::NoPicture { .. }),
                "{e:?}"
            );
        }
        let vivid = [
            user("Where are we?"),
            char_msg("*The sunset paints the sky red over the lake. She stands on the wooden bridge, her long silver hair and white dress moving in the wind.*"),
        ];
        assert!(matches!(
            decide(&vivid, Eagerness::Normal),
            Decision::Draw {
                mode: Mode::LastMessage,
                ..
            }
        ));
        assert!(matches!(
            decide(&vivid, Eagerness::Low),
            Decision::NoPicture { .. }
        ));
        let some = [char_msg("*She sits by the window in the morning light.*")];
        assert!(matches!(
            decide(&some, Eagerness::High),
            Decision::Draw { .. }
        ));
        assert!(matches!(
            decide(&some, Eagerness::Normal),
            Decision::NoPicture { .. }
        ));
        // An old request that the character already answered does not trigger again.
        let answered = [user("send me a selfie"), char_msg("\"Here you go!\"")];
        assert!(matches!(
            decide(&answered, Eagerness::Normal),
            Decision::NoPicture { .. }
        ));
        let off = [user("send me a selfie")];
        assert!(matches!(
            decide(&off, Eagerness::Off),
            Decision::NoPicture { .. }
        ));
    }

    #[test]
    fn llm_text_is_cleaned_to_one_prompt_line() {
        assert_eq!(
            clean_llm_text("<think>hmm</think>\nPrompt: \"a girl,\nsilver hair\""),
            "a girl, silver hair"
        );
        assert_eq!(clean_llm_text("   "), "");
    }
}
