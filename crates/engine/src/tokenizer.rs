//! The CLIP tokenizer (byte-level BPE from the `tokenizers` crate), read from a diffusers
//! `tokenizer/` folder, turning a prompt into the fixed-length id rows the text encoder takes.

use std::path::Path;

use serde::Deserialize;
use tokenizers::models::bpe::BPE;
use tokenizers::normalizers::{Lowercase, Replace, Sequence as NormalizerSequence, NFC};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::sequence::Sequence as PreTokenizerSequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::{AddedToken, SplitDelimiterBehavior, Tokenizer};

use crate::config::read_json;
use crate::{EngineError, Result};

/// `<|startoftext|>`, `<|endoftext|>`: CLIP's special tokens (OpenAI CLIP `simple_tokenizer.py`).
pub const BOS_TOKEN: &str = "<|startoftext|>";
pub const EOS_TOKEN: &str = "<|endoftext|>";
/// 77: CLIP's context length (`model_max_length` of every SD tokenizer_config.json).
pub const DEFAULT_MAX_LEN: usize = 77;

/// CLIP's pre-tokenizer pattern, as transformers' `CLIPConverter` writes it into tokenizer.json.
const CLIP_SPLIT_PATTERN: &str = r"'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+";

/// A CLIP tokenizer with its special ids and row length.
///
/// A prompt becomes `[BOS, t1, ..., tn, EOS, PAD, ...]`, `max_len` ids long. [`Self::tokenize`]
/// gives the bare `t1..tn` (any length) so a caller can split long prompts into chunks of
/// [`Self::chunk_capacity`] tokens and wrap each with [`Self::pad_chunk`] (A1111's way of going
/// past 77 tokens).
#[derive(Clone)]
pub struct ClipTokenizer {
    inner: Tokenizer,
    bos: u32,
    eos: u32,
    pad: u32,
    max_len: usize,
}

impl std::fmt::Debug for ClipTokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClipTokenizer")
            .field("bos", &self.bos)
            .field("eos", &self.eos)
            .field("pad", &self.pad)
            .field("max_len", &self.max_len)
            .finish()
    }
}

/// The fields we use from `tokenizer_config.json` / `special_tokens_map.json`.
#[derive(Debug, Default, Deserialize)]
struct TokenizerSettings {
    #[serde(default)]
    model_max_length: Option<f64>,
    #[serde(default)]
    bos_token: Option<TokenName>,
    #[serde(default)]
    eos_token: Option<TokenName>,
    #[serde(default)]
    pad_token: Option<TokenName>,
}

/// A special token is written either as a string or as an AddedToken object with `content`.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
enum TokenName {
    Plain(String),
    Object { content: String },
}

impl TokenName {
    fn as_str(&self) -> &str {
        match self {
            TokenName::Plain(s) => s,
            TokenName::Object { content } => content,
        }
    }
}

impl ClipTokenizer {
    /// Loads a diffusers `tokenizer/` folder: `tokenizer.json`, or else `vocab.json` +
    /// `merges.txt`; special tokens and length from `tokenizer_config.json` and
    /// `special_tokens_map.json` when present.
    pub fn from_dir(dir: impl AsRef<Path>) -> Result<Self> {
        let dir = dir.as_ref();
        if !dir.is_dir() {
            return Err(EngineError::MissingFile {
                path: dir.to_path_buf(),
            });
        }
        let json = dir.join("tokenizer.json");
        let vocab = dir.join("vocab.json");
        let merges = dir.join("merges.txt");
        let settings = read_settings(dir)?;
        let inner = if json.is_file() {
            Tokenizer::from_file(&json)
                .map_err(|e| EngineError::Tokenizer(format!("{}: {e}", json.display())))?
        } else if vocab.is_file() && merges.is_file() {
            // transformers registers every configured special token as an added token, so SD2's
            // pad "!" inside a prompt becomes the single special id 0, not BPE's "!</w>". We do
            // the same so both routes give the ids diffusers gives (fixture `ids_bang`).
            let specials: Vec<&str> = [
                &settings.bos_token,
                &settings.eos_token,
                &settings.pad_token,
            ]
            .into_iter()
            .flatten()
            .map(TokenName::as_str)
            .collect();
            clip_bpe(&vocab, &merges, &specials)?
        } else {
            return Err(EngineError::MissingFile { path: json });
        };
        Self::new(inner, &settings)
    }

    /// Builds the tokenizer the way transformers' `CLIPConverter` does from the slow tokenizer's
    /// files, for folders that ship only `vocab.json` and `merges.txt`.
    pub fn from_vocab_merges(vocab: &Path, merges: &Path) -> Result<Self> {
        Self::new(clip_bpe(vocab, merges, &[])?, &TokenizerSettings::default())
    }

    fn new(mut inner: Tokenizer, settings: &TokenizerSettings) -> Result<Self> {
        // A saved tokenizer.json may carry padding/truncation settings; we do both ourselves so
        // the rules below hold whatever the file says.
        inner
            .with_truncation(None)
            .map_err(|e| EngineError::Tokenizer(e.to_string()))?;
        inner.with_padding(None);
        let id = |name: &str| {
            inner
                .token_to_id(name)
                .ok_or_else(|| EngineError::Tokenizer(format!("the vocabulary has no {name:?}")))
        };
        let bos = id(settings
            .bos_token
            .as_ref()
            .map_or(BOS_TOKEN, TokenName::as_str))?;
        let eos = id(settings
            .eos_token
            .as_ref()
            .map_or(EOS_TOKEN, TokenName::as_str))?;
        // SD1 pads with <|endoftext|>, SD2 (OpenCLIP) with "!" (id 0); both come from the config.
        let pad = match &settings.pad_token {
            Some(name) => id(name.as_str())?,
            None => eos,
        };
        // transformers writes a huge sentinel (1e30) when the length is unknown; CLIP's 77 then.
        let max_len = match settings.model_max_length {
            Some(n) if (3.0..=4096.0).contains(&n) => n as usize,
            _ => DEFAULT_MAX_LEN,
        };
        Ok(Self {
            inner,
            bos,
            eos,
            pad,
            max_len,
        })
    }

    pub fn bos_id(&self) -> u32 {
        self.bos
    }

    pub fn eos_id(&self) -> u32 {
        self.eos
    }

    pub fn pad_id(&self) -> u32 {
        self.pad
    }

    /// The row length the text encoder takes (77).
    pub fn max_len(&self) -> usize {
        self.max_len
    }

    /// How many prompt tokens fit in one row between BOS and EOS (75).
    pub fn chunk_capacity(&self) -> usize {
        self.max_len - 2
    }

    /// The id of a token in the vocabulary, e.g. for textual-inversion trigger words.
    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    /// The prompt's tokens without BOS/EOS, not truncated.
    pub fn tokenize(&self, text: &str) -> Result<Vec<u32>> {
        let encoding = self
            .inner
            .encode(text, false)
            .map_err(|e| EngineError::Tokenizer(format!("cannot tokenize the prompt: {e}")))?;
        Ok(encoding.get_ids().to_vec())
    }

    /// One encoder row: `[BOS, tokens.., EOS, PAD..]` of `max_len` ids. Tokens past
    /// [`Self::chunk_capacity`] are dropped, so the row always ends its text with EOS — the same
    /// ids as transformers' `tokenizer(text, padding="max_length", truncation=True)`.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        let tokens = self.tokenize(text)?;
        let keep = tokens.len().min(self.chunk_capacity());
        if keep < tokens.len() {
            tracing::debug!(
                dropped = tokens.len() - keep,
                "prompt longer than {} tokens was truncated",
                self.chunk_capacity()
            );
        }
        self.pad_chunk(&tokens[..keep])
    }

    /// Wraps up to [`Self::chunk_capacity`] tokens into one `max_len` row.
    pub fn pad_chunk(&self, tokens: &[u32]) -> Result<Vec<u32>> {
        if tokens.len() > self.chunk_capacity() {
            return Err(EngineError::InvalidRequest(format!(
                "{} tokens do not fit in one text encoder row of {}",
                tokens.len(),
                self.chunk_capacity()
            )));
        }
        let mut row = Vec::with_capacity(self.max_len);
        row.push(self.bos);
        row.extend_from_slice(tokens);
        row.push(self.eos);
        row.resize(self.max_len, self.pad);
        Ok(row)
    }
}

fn read_settings(dir: &Path) -> Result<TokenizerSettings> {
    let mut settings = TokenizerSettings::default();
    // special_tokens_map.json first, tokenizer_config.json on top: transformers gives the latter
    // precedence when both name a token.
    for name in ["special_tokens_map.json", "tokenizer_config.json"] {
        let path = dir.join(name);
        if !path.is_file() {
            continue;
        }
        let s: TokenizerSettings = read_json(&path)?;
        settings.model_max_length = s.model_max_length.or(settings.model_max_length);
        settings.bos_token = s.bos_token.or(settings.bos_token);
        settings.eos_token = s.eos_token.or(settings.eos_token);
        settings.pad_token = s.pad_token.or(settings.pad_token);
    }
    Ok(settings)
}

/// CLIP's BPE pipeline: NFC, whitespace runs to one space, lowercase; split on CLIP's pattern;
/// byte-level alphabet; `</w>` marks the end of a word.
fn clip_bpe(vocab: &Path, merges: &Path, extra_specials: &[&str]) -> Result<Tokenizer> {
    let err = |e: String| EngineError::Tokenizer(format!("{}: {e}", vocab.display()));
    let (Some(vocab_s), Some(merges_s)) = (vocab.to_str(), merges.to_str()) else {
        return Err(err("path is not valid UTF-8".into()));
    };
    let bpe = BPE::from_file(vocab_s, merges_s)
        .continuing_subword_prefix(String::new())
        .end_of_word_suffix("</w>".into())
        .unk_token(EOS_TOKEN.into())
        .fuse_unk(false)
        .build()
        .map_err(|e| err(e.to_string()))?;
    let mut tokenizer = Tokenizer::new(bpe);
    let whitespace = Replace::new(
        tokenizers::normalizers::replace::ReplacePattern::Regex(r"\s+".into()),
        " ",
    )
    .map_err(|e| err(e.to_string()))?;
    tokenizer
        .with_normalizer(Some(NormalizerSequence::new(vec![
            NFC.into(),
            whitespace.into(),
            Lowercase.into(),
        ])))
        .map_err(|e| err(e.to_string()))?;
    let split = Split::new(
        SplitPattern::Regex(CLIP_SPLIT_PATTERN.into()),
        SplitDelimiterBehavior::Removed,
        true,
    )
    .map_err(|e| err(e.to_string()))?;
    tokenizer.with_pre_tokenizer(Some(PreTokenizerSequence::new(vec![
        split.into(),
        ByteLevel::new(false, true, true).into(),
    ])));
    // The special tokens must never be split by BPE when they appear in text.
    let mut specials = vec![BOS_TOKEN, EOS_TOKEN];
    for name in extra_specials {
        // Only mark tokens the vocabulary has: a new id would be past the embedding table.
        if !specials.contains(name) && tokenizer.token_to_id(name).is_some() {
            specials.push(name);
        }
    }
    let specials: Vec<AddedToken> = specials
        .into_iter()
        .map(|name| AddedToken::from(name, true))
        .collect();
    tokenizer
        .add_special_tokens(specials)
        .map_err(|e| err(e.to_string()))?;
    Ok(tokenizer)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A tiny BPE vocabulary in CLIP's layout: byte symbols, a few merges, `</w>` word ends, and
    /// the two special tokens last.
    fn tiny_vocab(dir: &Path) {
        let mut vocab = serde_json::Map::new();
        let mut add = |t: &str| {
            let n = vocab.len();
            vocab.insert(t.to_string(), n.into());
        };
        for t in ["!", "a", "c", "t", "a</w>", "t</w>", "ca", "cat</w>"] {
            add(t);
        }
        add(BOS_TOKEN);
        add(EOS_TOKEN);
        std::fs::write(
            dir.join("vocab.json"),
            serde_json::Value::Object(vocab).to_string(),
        )
        .unwrap();
        std::fs::write(dir.join("merges.txt"), "#version: 0.2\nc a\nca t</w>\n").unwrap();
    }

    #[test]
    fn builds_from_vocab_and_merges_and_pads() {
        let dir = tempfile::tempdir().unwrap();
        tiny_vocab(dir.path());
        std::fs::write(
            dir.path().join("tokenizer_config.json"),
            r#"{"model_max_length": 8, "pad_token": {"content": "!", "lstrip": false}}"#,
        )
        .unwrap();
        let tok = ClipTokenizer::from_dir(dir.path()).unwrap();
        assert_eq!((tok.bos_id(), tok.eos_id(), tok.pad_id()), (8, 9, 0));
        assert_eq!(tok.max_len(), 8);
        // "A  CAT": lowercased, whitespace collapsed, "a" a word of its own.
        assert_eq!(tok.tokenize("A  CAT").unwrap(), vec![4, 7]);
        assert_eq!(tok.encode("a cat").unwrap(), vec![8, 4, 7, 9, 0, 0, 0, 0]);
    }

    #[test]
    fn truncation_keeps_bos_and_ends_with_eos() {
        let dir = tempfile::tempdir().unwrap();
        tiny_vocab(dir.path());
        std::fs::write(
            dir.path().join("tokenizer_config.json"),
            r#"{"model_max_length": 5}"#,
        )
        .unwrap();
        let tok = ClipTokenizer::from_dir(dir.path()).unwrap();
        assert_eq!(tok.tokenize("cat cat cat cat").unwrap().len(), 4);
        assert_eq!(tok.encode("cat cat cat cat").unwrap(), vec![8, 7, 7, 7, 9]);
        assert!(tok.pad_chunk(&[7, 7, 7, 7]).is_err());
    }

    #[test]
    fn huge_model_max_length_means_77() {
        let dir = tempfile::tempdir().unwrap();
        tiny_vocab(dir.path());
        std::fs::write(
            dir.path().join("tokenizer_config.json"),
            r#"{"model_max_length": 1000000000000000019884624838656}"#,
        )
        .unwrap();
        let tok = ClipTokenizer::from_dir(dir.path()).unwrap();
        assert_eq!(tok.max_len(), DEFAULT_MAX_LEN);
        // SD1 default: pad with EOS.
        assert_eq!(tok.pad_id(), tok.eos_id());
    }

    #[test]
    fn missing_files_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let err = ClipTokenizer::from_dir(dir.path()).unwrap_err();
        assert!(
            matches!(&err, EngineError::MissingFile { path } if path.ends_with("tokenizer.json"))
        );
        let gone = dir.path().join("tokenizer");
        assert!(matches!(
            ClipTokenizer::from_dir(&gone),
            Err(EngineError::MissingFile { path }) if path == gone
        ));
    }

    #[test]
    fn unknown_pad_token_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        tiny_vocab(dir.path());
        std::fs::write(
            dir.path().join("special_tokens_map.json"),
            r#"{"pad_token": "<pad>"}"#,
        )
        .unwrap();
        let err = ClipTokenizer::from_dir(dir.path()).unwrap_err();
        assert!(err.to_string().contains("<pad>"), "{err}");
    }
}
