//! Characters: people (or creatures) the app draws again and again, from chat apps or by hand. A
//! character keeps its look through a fixed appearance text, an optional locked seed and model,
//! and a style preset. Stored as one JSON file each in the data folder's `characters/`; importable
//! from JSON and from SillyTavern/TavernAI character-card PNGs.

use crate::fsutil::write_atomic;
use crate::presets::{is_valid_id, slug, with_suffix};
use base64::Engine as _;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

/// Longest appearance text we keep; a card's description can be pages long, and only the start
/// describes the look.
pub const MAX_APPEARANCE_CHARS: usize = 2_000;
const MAX_NAME_CHARS: usize = 80;
/// A character file or imported JSON larger than this is refused.
const MAX_FILE_BYTES: usize = 256 * 1024;
/// How much of a card's description is searched for the character's look.
const MAX_CARD_DESCRIPTION_CHARS: usize = 20_000;

/// How readily `auto` mode draws this character during a chat.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Eagerness {
    /// Never on its own; only portrait/scene requests.
    Off,
    /// Only when someone asks for a picture.
    Low,
    /// Asked-for pictures and clearly descriptive moments.
    #[default]
    Normal,
    /// Also fairly descriptive moments.
    High,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Character {
    /// Given by the store (from the name); never a path from a request.
    pub id: String,
    pub name: String,
    /// What the character looks like: "young woman, long silver hair, green eyes, ...".
    pub appearance: String,
    /// A preset id for the style (default "portrait" for portraits, "scene" for scenes).
    pub style: Option<String>,
    pub negative_prompt: String,
    /// The same seed keeps the same face across portraits.
    pub seed: Option<u64>,
    pub model: Option<String>,
    /// A gallery image id chosen as the avatar.
    pub avatar: Option<i64>,
    pub eagerness: Eagerness,
}

impl Default for Character {
    fn default() -> Self {
        Self {
            id: String::new(),
            name: String::new(),
            appearance: String::new(),
            style: None,
            negative_prompt: String::new(),
            seed: None,
            model: None,
            avatar: None,
            eagerness: Eagerness::Normal,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum CharacterError {
    #[error("there is no character \"{id}\"")]
    NotFound { id: String },
    #[error("the character's {field} is not valid: {reason}")]
    Invalid { field: &'static str, reason: String },
    #[error("this is not a character: {0}")]
    Parse(String),
    #[error("this PNG has no character card in it (no 'chara' or 'ccv3' text)")]
    NoCard,
    #[error("the file is {size} bytes; a character is at most {limit} bytes")]
    TooLarge { size: usize, limit: usize },
    #[error("could not save the character to {path}: {source}; check that the folder is writable")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// The user's characters, one JSON file per character.
pub struct CharacterStore {
    dir: PathBuf,
    items: Mutex<BTreeMap<String, Character>>,
    warnings: Vec<String>,
}

impl CharacterStore {
    /// Reads every `*.json` in `dir` (created if missing). A broken file is skipped with a warning
    /// and never overwritten.
    pub fn open(dir: &Path) -> Result<Self, CharacterError> {
        std::fs::create_dir_all(dir).map_err(|source| CharacterError::Write {
            path: dir.to_path_buf(),
            source,
        })?;
        let mut items = BTreeMap::new();
        let mut warnings = Vec::new();
        let entries = std::fs::read_dir(dir).map_err(|source| CharacterError::Write {
            path: dir.to_path_buf(),
            source,
        })?;
        for entry in entries.flatten() {
            let path = entry.path();
            let Some(id) = path
                .file_name()
                .and_then(|n| n.to_str())
                .and_then(|n| n.strip_suffix(".json"))
                .filter(|id| is_valid_id(id))
                .map(str::to_owned)
            else {
                continue;
            };
            let parsed = std::fs::read(&path)
                .map_err(|e| e.to_string())
                .and_then(|b| serde_json::from_slice::<Character>(&b).map_err(|e| e.to_string()));
            match parsed {
                Ok(mut c) => {
                    c.id = id.clone();
                    items.insert(id, c);
                }
                Err(e) => warnings.push(format!(
                    "The character file {} could not be read ({e}); it was skipped.",
                    path.display()
                )),
            }
        }
        Ok(Self {
            dir: dir.to_path_buf(),
            items: Mutex::new(items),
            warnings,
        })
    }

    pub fn warnings(&self) -> &[String] {
        &self.warnings
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, Character>> {
        self.items.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Sorted by name.
    pub fn list(&self) -> Vec<Character> {
        let mut v: Vec<_> = self.lock().values().cloned().collect();
        v.sort_by_key(|c| c.name.to_lowercase());
        v
    }

    pub fn get(&self, id: &str) -> Result<Character, CharacterError> {
        self.lock()
            .get(id)
            .cloned()
            .ok_or_else(|| CharacterError::NotFound { id: shown(id) })
    }

    /// Finds a character by id or by name (case-insensitive), as chat requests name them.
    pub fn find(&self, id_or_name: &str) -> Option<Character> {
        let items = self.lock();
        let wanted = id_or_name.trim();
        items.get(wanted).cloned().or_else(|| {
            items
                .values()
                .find(|c| c.name.eq_ignore_ascii_case(wanted))
                .cloned()
        })
    }

    pub fn create(&self, c: Character) -> Result<Character, CharacterError> {
        let mut c = clean(c)?;
        let mut items = self.lock();
        let base = slug(&c.name, "character");
        let id = (1..)
            .map(|n| with_suffix(&base, n))
            // A file that failed to load (a newer version's, a hand edit) still owns its name:
            // it is the user's, and is never overwritten.
            .find(|id| {
                is_valid_id(id)
                    && !items.contains_key(id)
                    && !self.dir.join(format!("{id}.json")).exists()
            })
            .expect("some suffix is free");
        c.id = id.clone();
        self.write(&c)?;
        items.insert(id, c.clone());
        Ok(c)
    }

    pub fn update(&self, id: &str, c: Character) -> Result<Character, CharacterError> {
        let mut c = clean(c)?;
        let mut items = self.lock();
        if !items.contains_key(id) {
            return Err(CharacterError::NotFound { id: shown(id) });
        }
        c.id = id.to_owned();
        self.write(&c)?;
        items.insert(id.to_owned(), c.clone());
        Ok(c)
    }

    pub fn delete(&self, id: &str) -> Result<(), CharacterError> {
        let mut items = self.lock();
        if !items.contains_key(id) {
            return Err(CharacterError::NotFound { id: shown(id) });
        }
        let path = self.dir.join(format!("{id}.json"));
        match std::fs::remove_file(&path) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(source) => return Err(CharacterError::Write { path, source }),
        }
        items.remove(id);
        Ok(())
    }

    /// Our own export format (the character as JSON), or a SillyTavern/TavernAI card's JSON (V1,
    /// or V2/V3 with a `data` object).
    pub fn import_json(&self, text: &str) -> Result<Character, CharacterError> {
        if text.len() > MAX_FILE_BYTES {
            return Err(CharacterError::TooLarge {
                size: text.len(),
                limit: MAX_FILE_BYTES,
            });
        }
        let value: serde_json::Value =
            serde_json::from_str(text).map_err(|e| CharacterError::Parse(e.to_string()))?;
        let c = if value.get("appearance").is_some() {
            serde_json::from_value::<Character>(value)
                .map_err(|e| CharacterError::Parse(e.to_string()))?
        } else {
            from_card(&value)?
        };
        self.create(c)
    }

    /// A character card PNG: the `chara` (V1/V2) or `ccv3` (V3) text chunk holds base64 JSON.
    pub fn import_card_png(&self, png: &[u8]) -> Result<Character, CharacterError> {
        let text = crate::metadata::read_png_text(png)
            .map_err(|e| CharacterError::Parse(e.to_string()))?;
        let card = ["ccv3", "chara"]
            .iter()
            .find_map(|k| text.chunks.iter().find(|(key, _)| key == k))
            .ok_or(CharacterError::NoCard)?;
        let json = base64::engine::general_purpose::STANDARD
            .decode(card.1.trim())
            .map_err(|e| CharacterError::Parse(format!("the card is not base64: {e}")))?;
        let json = String::from_utf8(json)
            .map_err(|_| CharacterError::Parse("the card is not UTF-8 text".into()))?;
        let value: serde_json::Value =
            serde_json::from_str(&json).map_err(|e| CharacterError::Parse(e.to_string()))?;
        self.create(from_card(&value)?)
    }

    pub fn export_json(&self, id: &str) -> Result<String, CharacterError> {
        let c = self.get(id)?;
        Ok(serde_json::to_string_pretty(&c).expect("a character serialises"))
    }

    fn write(&self, c: &Character) -> Result<(), CharacterError> {
        let path = self.dir.join(format!("{}.json", c.id));
        let bytes = serde_json::to_vec_pretty(c).expect("a character serialises");
        write_atomic(&path, &bytes).map_err(|source| CharacterError::Write { path, source })
    }
}

/// An id as it may be echoed in a message: short, printable.
fn shown(id: &str) -> String {
    id.chars().filter(|c| !c.is_control()).take(40).collect()
}

/// Name and look from a TavernAI/SillyTavern card. V1 has the fields at the top; V2 and V3 in
/// `data`. The description is where card authors write the appearance (and the personality);
/// we keep its start, the rest is for the chat model, not the picture.
fn from_card(v: &serde_json::Value) -> Result<Character, CharacterError> {
    let data = v.get("data").filter(|d| d.is_object()).unwrap_or(v);
    let field = |k: &str| {
        data.get(k)
            .and_then(|x| x.as_str())
            .unwrap_or("")
            .trim()
            .to_owned()
    };
    let name = field("name");
    if name.is_empty() {
        return Err(CharacterError::Parse(
            "the card has no name; is this a character card?".into(),
        ));
    }
    // The name is checked here, not only in `clean`: it is pasted into the description below,
    // and a long name times many `{{char}}`s would grow without bound (a zTXt chunk of a few KB
    // can carry a 100 KB name and 50,000 of them).
    if name.chars().count() > MAX_NAME_CHARS {
        return Err(CharacterError::Invalid {
            field: "name",
            reason: format!("it is longer than {MAX_NAME_CHARS} characters"),
        });
    }
    // Only the description's start is read for the look; long cards put their lore after it.
    let description = truncate_chars(&field("description"), MAX_CARD_DESCRIPTION_CHARS)
        .replace("{{char}}", &name);
    let appearance = appearance_from_description(&description);
    Ok(Character {
        name,
        appearance,
        ..Character::default()
    })
}

/// The sentences of a card description that say how the character looks, else its start.
fn appearance_from_description(text: &str) -> String {
    let visual: Vec<&str> = crate::chat::sentences(text)
        .into_iter()
        .filter(|s| crate::chat::visual_score(s) >= 2)
        .collect();
    let chosen = if visual.is_empty() {
        text.to_owned()
    } else {
        visual.join(" ")
    };
    truncate_chars(&chosen, 600)
}

fn truncate_chars(s: &str, n: usize) -> String {
    match s.char_indices().nth(n) {
        Some((i, _)) => s[..i].trim_end().to_owned(),
        None => s.to_owned(),
    }
}

fn clean(mut c: Character) -> Result<Character, CharacterError> {
    c.name = c.name.trim().to_owned();
    if c.name.is_empty() {
        return Err(CharacterError::Invalid {
            field: "name",
            reason: "give the character a name".into(),
        });
    }
    for (field, value, max) in [
        ("name", &c.name, MAX_NAME_CHARS),
        ("appearance", &c.appearance, MAX_APPEARANCE_CHARS),
        ("negative prompt", &c.negative_prompt, MAX_APPEARANCE_CHARS),
    ] {
        if value.chars().count() > max {
            return Err(CharacterError::Invalid {
                field,
                reason: format!("it is longer than {max} characters"),
            });
        }
        if value.chars().any(|ch| ch.is_control() && ch != '\n') {
            return Err(CharacterError::Invalid {
                field,
                reason: "it contains control characters".into(),
            });
        }
    }
    // Seeds travel on as A1111's signed 64-bit numbers, where -1 means "random".
    if c.seed.is_some_and(|s| s > i64::MAX as u64) {
        return Err(CharacterError::Invalid {
            field: "seed",
            reason: format!(
                "it must be at most {}; leave it empty for a new face each time",
                i64::MAX
            ),
        });
    }
    c.style = c.style.filter(|s| !s.trim().is_empty());
    c.model = c.model.filter(|s| !s.trim().is_empty());
    Ok(c)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seraphina() -> Character {
        Character {
            name: "Seraphina".into(),
            appearance: "young woman, long silver hair, green eyes, white dress".into(),
            seed: Some(1234),
            ..Character::default()
        }
    }

    #[test]
    fn create_update_delete_and_reopen() {
        let t = tempfile::tempdir().unwrap();
        let store = CharacterStore::open(t.path()).unwrap();
        let c = store.create(seraphina()).unwrap();
        assert_eq!(c.id, "seraphina");
        let again = store.create(seraphina()).unwrap();
        assert_eq!(again.id, "seraphina-2", "names may repeat, ids may not");
        let mut changed = c.clone();
        changed.appearance = "short black hair".into();
        store.update(&c.id, changed).unwrap();
        let reopened = CharacterStore::open(t.path()).unwrap();
        assert_eq!(
            reopened.get("seraphina").unwrap().appearance,
            "short black hair"
        );
        assert_eq!(reopened.find("SERAPHINA").unwrap().id, "seraphina");
        reopened.delete("seraphina-2").unwrap();
        assert!(matches!(
            reopened.get("seraphina-2"),
            Err(CharacterError::NotFound { .. })
        ));
        assert_eq!(CharacterStore::open(t.path()).unwrap().list().len(), 1);
    }

    #[test]
    fn ids_are_never_paths_and_bad_input_is_refused() {
        let t = tempfile::tempdir().unwrap();
        let store = CharacterStore::open(t.path()).unwrap();
        for name in ["../../etc/passwd", "a/b", "CON", "..", "名前"] {
            let c = store
                .create(Character {
                    name: name.into(),
                    ..Character::default()
                })
                .unwrap();
            assert!(is_valid_id(&c.id), "{name} -> {}", c.id);
            assert!(t.path().join(format!("{}.json", c.id)).is_file());
        }
        assert!(store.get("../settings").is_err());
        assert!(store.delete("../settings").is_err());
        let blank = store.create(Character::default()).unwrap_err();
        assert!(blank.to_string().contains("name"));
        let long = store.create(Character {
            appearance: "x".repeat(MAX_APPEARANCE_CHARS + 1),
            ..seraphina()
        });
        assert!(long.unwrap_err().to_string().contains("appearance"));
    }

    #[test]
    fn broken_files_are_skipped_with_a_warning() {
        let t = tempfile::tempdir().unwrap();
        std::fs::write(t.path().join("broken.json"), b"{not json").unwrap();
        let store = CharacterStore::open(t.path()).unwrap();
        assert_eq!(store.list().len(), 0);
        assert_eq!(store.warnings().len(), 1);
        assert!(t.path().join("broken.json").exists(), "never deleted");
    }

    #[test]
    fn a_skipped_file_keeps_its_name_from_new_characters() {
        // Found by review: a character file this version cannot read (a field it does not
        // know) was skipped, and creating a character of the same name then wrote over it.
        let t = tempfile::tempdir().unwrap();
        let newer = br#"{"id": "seraphina", "name": "Seraphina", "mood": 1}"#;
        std::fs::write(t.path().join("seraphina.json"), newer).unwrap();
        let store = CharacterStore::open(t.path()).unwrap();
        assert_eq!((store.list().len(), store.warnings().len()), (0, 1));
        let c = store.create(seraphina()).unwrap();
        assert_eq!(c.id, "seraphina-2");
        assert_eq!(
            std::fs::read(t.path().join("seraphina.json")).unwrap(),
            newer,
            "the user's file is untouched"
        );
    }

    #[test]
    fn export_import_round_trip() {
        let t = tempfile::tempdir().unwrap();
        let store = CharacterStore::open(t.path()).unwrap();
        let c = store.create(seraphina()).unwrap();
        let json = store.export_json(&c.id).unwrap();
        let back = store.import_json(&json).unwrap();
        assert_eq!(back.id, "seraphina-2");
        assert_eq!(back.appearance, c.appearance);
        assert_eq!(back.seed, Some(1234));
        assert!(store.import_json("[1, 2]").is_err());
        assert!(store.import_json(&"x".repeat(MAX_FILE_BYTES + 1)).is_err());
        // u64::MAX would arrive as A1111's -1, "random": refused, not silently unlocked.
        let err = store
            .import_json(r#"{"name": "Big", "appearance": "a", "seed": 18446744073709551615}"#)
            .unwrap_err();
        assert!(
            matches!(err, CharacterError::Invalid { field: "seed", .. }),
            "{err}"
        );
    }

    fn card_png(keyword: &str, json: &str) -> Vec<u8> {
        let mut out = Vec::new();
        {
            let mut enc = png::Encoder::new(&mut out, 1, 1);
            enc.set_color(png::ColorType::Rgb);
            let b64 = base64::engine::general_purpose::STANDARD.encode(json);
            enc.add_text_chunk(keyword.to_owned(), b64).unwrap();
            let mut w = enc.write_header().unwrap();
            w.write_image_data(&[0, 0, 0]).unwrap();
        }
        out
    }

    #[test]
    fn imports_sillytavern_cards_v1_v2_and_v3() {
        let t = tempfile::tempdir().unwrap();
        let store = CharacterStore::open(t.path()).unwrap();
        let v1 = r#"{"name": "Aria", "description": "{{char}} is a cheerful bard. She has curly red hair, freckles and wears a green cloak.", "personality": "kind"}"#;
        let c = store.import_card_png(&card_png("chara", v1)).unwrap();
        assert_eq!(c.name, "Aria");
        assert!(c.appearance.contains("curly red hair"), "{}", c.appearance);
        assert!(!c.appearance.contains("{{char}}"));
        let v2 = r#"{"spec": "chara_card_v2", "spec_version": "2.0", "data": {"name": "Kael", "description": "Tall knight with short black hair and blue eyes, in silver armor."}}"#;
        assert_eq!(
            store.import_card_png(&card_png("chara", v2)).unwrap().name,
            "Kael"
        );
        let v3 = r#"{"spec": "chara_card_v3", "data": {"name": "Nyx", "description": "A shadowy figure."}}"#;
        assert_eq!(
            store.import_card_png(&card_png("ccv3", v3)).unwrap().name,
            "Nyx"
        );
        let plain = card_png("parameters", "a cat");
        assert!(matches!(
            store.import_card_png(&plain),
            Err(CharacterError::NoCard)
        ));
        assert!(store.import_card_png(b"not a png").is_err());
        assert!(store.import_card_png(&card_png("chara", "{}")).is_err());
    }

    #[test]
    fn a_card_cannot_blow_up_its_description() {
        // The name is pasted into each `{{char}}`, so an over-long one is refused first (a
        // 100 KB name in 50,000 of them would be 5 GB).
        let card = serde_json::json!({
            "name": "n".repeat(MAX_NAME_CHARS + 1),
            "description": "{{char}} has red hair.",
        });
        assert!(matches!(
            from_card(&card),
            Err(CharacterError::Invalid { field: "name", .. })
        ));
        // Only the description's start is searched for the look.
        let lore = "{{char}} waits. ".repeat(1_000);
        let card = serde_json::json!({
            "name": "Mira",
            "description": format!(
                "{lore} She has long silver hair. {} She wears a blue cloak.",
                "x".repeat(MAX_CARD_DESCRIPTION_CHARS)
            ),
        });
        let c = from_card(&card).unwrap();
        assert!(
            c.appearance.contains("long silver hair"),
            "{}",
            c.appearance
        );
        assert!(!c.appearance.contains("blue cloak"), "{}", c.appearance);
        let t = tempfile::tempdir().unwrap();
        let store = CharacterStore::open(t.path()).unwrap();
        assert_eq!(
            store
                .import_card_png(&card_png("chara", &card.to_string()))
                .unwrap()
                .name,
            "Mira"
        );
    }
}
