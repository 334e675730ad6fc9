//! A1111 prompt syntax: `<lora:name:w>` tags, attention weights (`(a)`, `[a]`, `(a:1.3)`,
//! escapes), `BREAK`, 75-token chunking with comma backtracking, and the "Original" emphasis that
//! scales hidden states and restores their mean.
//!
//! The rules follow AUTOMATIC1111/stable-diffusion-webui `modules/prompt_parser.py`
//! (`parse_prompt_attention`), `modules/extra_networks.py` (`parse_prompt`),
//! `modules/sd_hijack_clip.py` (`tokenize_line`, `process_tokens`) and `modules/sd_emphasis.py`
//! (`EmphasisOriginal`). Where A1111 crashes or loses data we keep going and say so in a
//! [`PromptWarning`] instead (noted at each place).

use std::fmt;

use candle_core::{DType, Tensor};

use crate::Result;

/// `(text)` multiplies attention by 1.1 (A1111 `round_bracket_multiplier`).
pub const ROUND_MULTIPLIER: f64 = 1.1;
/// `[text]` divides it by 1.1 (A1111 `square_bracket_multiplier`).
pub const SQUARE_MULTIPLIER: f64 = 1.0 / 1.1;
/// 20: A1111's default `comma_padding_backtrack` setting: when a chunk fills up, text after a comma
/// among its last 20 tokens moves to the next chunk so a phrase is not cut in two.
pub const COMMA_BACKTRACK: usize = 20;

/// Something in the prompt that A1111 tolerates but that is probably not what the user meant.
/// `position` is a character (not byte) offset into the text that was parsed.
#[derive(Debug, Clone, PartialEq)]
pub enum PromptWarning {
    /// An opening bracket never closed: as in A1111, its weight applies to the rest of the prompt.
    UnclosedBracket { bracket: char, position: usize },
    /// A closing bracket (or `:weight)`) with nothing open: kept as literal text, as in A1111.
    UnmatchedClose { text: String, position: usize },
    /// `(text:1.2.3)`: not a number. A1111 fails the whole generation; we close the bracket with
    /// the default 1.1 and ignore the number.
    BadWeight { text: String, position: usize },
    /// A `<lora:...>` tag whose multiplier is not a number; 1.0 is used.
    BadNetworkArgument { tag: String, argument: String },
}

impl fmt::Display for PromptWarning {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PromptWarning::UnclosedBracket { bracket, position } => write!(
                f,
                "`{bracket}` at character {position} is never closed; its weight applies to the rest of the prompt"
            ),
            PromptWarning::UnmatchedClose { text, position } => write!(
                f,
                "`{text}` at character {position} closes nothing and is kept as text (write `\\)` or `\\]` for a literal bracket)"
            ),
            PromptWarning::BadWeight { text, position } => write!(
                f,
                "`{text}` at character {position} is not a weight; the bracket counts as a plain (x1.1)"
            ),
            PromptWarning::BadNetworkArgument { tag, argument } => {
                write!(f, "`{argument}` in `{tag}` is not a number; 1.0 is used")
            }
        }
    }
}

/// An extra-network tag `<kind:arg:arg...>` found in a prompt (A1111 `re_extra_net`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetworkTag {
    /// `lora`, `lyco`, `hypernet`, ... as written.
    pub kind: String,
    /// The `:`-separated arguments; the first is the network's name.
    pub args: Vec<String>,
}

/// A `<lora:name:te:unet>` tag read with A1111's rules (`extensions-builtin/Lora/networks.py`):
/// the second argument is the text-encoder multiplier (default 1), the third the UNet multiplier
/// (default: the text encoder's); `te=` and `unet=` named arguments override both.
#[derive(Debug, Clone, PartialEq)]
pub struct LoraTag {
    /// The name as written: a file stem the caller resolves to a file.
    pub name: String,
    pub text_encoder_weight: f64,
    pub unet_weight: f64,
}

/// A prompt with its extra-network tags taken out.
#[derive(Debug, Clone, PartialEq)]
pub struct PromptNetworks {
    /// The prompt text the text encoder sees (tags replaced by nothing, as A1111 does).
    pub text: String,
    /// Every tag, in order.
    pub tags: Vec<NetworkTag>,
}

impl PromptNetworks {
    /// The `lora` (and `lyco`, its old alias) tags, read as [`LoraTag`]s. Tags without a name are
    /// dropped; unreadable multipliers become 1.0 with a warning.
    pub fn loras(&self) -> (Vec<LoraTag>, Vec<PromptWarning>) {
        let mut warnings = Vec::new();
        let loras = self
            .tags
            .iter()
            .filter(|t| t.kind == "lora" || t.kind == "lyco")
            .filter_map(|t| LoraTag::from_tag(t, &mut warnings))
            .collect();
        (loras, warnings)
    }
}

impl LoraTag {
    fn from_tag(tag: &NetworkTag, warnings: &mut Vec<PromptWarning>) -> Option<Self> {
        let mut positional = Vec::new();
        let mut named = Vec::new();
        for arg in &tag.args {
            match arg.split_once('=') {
                Some((k, v)) => named.push((k.trim(), v.trim())),
                None => positional.push(arg.trim()),
            }
        }
        let name = positional.first().filter(|n| !n.is_empty())?.to_string();
        let mut number = |s: &str| match s.parse::<f64>() {
            Ok(v) if v.is_finite() => v,
            _ => {
                warnings.push(PromptWarning::BadNetworkArgument {
                    tag: format!("<{}:{}>", tag.kind, tag.args.join(":")),
                    argument: s.to_string(),
                });
                1.0
            }
        };
        let mut te = positional.get(1).map_or(1.0, |s| number(s));
        if let Some((_, v)) = named.iter().find(|(k, _)| *k == "te") {
            te = number(v);
        }
        let mut unet = positional.get(2).map_or(te, |s| number(s));
        if let Some((_, v)) = named.iter().find(|(k, _)| *k == "unet") {
            unet = number(v);
        }
        Some(Self {
            name,
            text_encoder_weight: te,
            unet_weight: unet,
        })
    }
}

/// Takes `<kind:args>` tags out of a prompt. `kind` is one or more word characters and `args` at
/// least one character other than `>` (A1111's `<(\w+):([^>]+)>`); anything else is left as text.
pub fn extract_networks(prompt: &str) -> PromptNetworks {
    let mut text = String::with_capacity(prompt.len());
    let mut tags = Vec::new();
    let mut rest = prompt;
    while let Some(open) = rest.find('<') {
        text.push_str(&rest[..open]);
        let after = &rest[open + 1..];
        match parse_tag(after) {
            Some((tag, used)) => {
                tags.push(tag);
                rest = &after[used..];
            }
            None => {
                text.push('<');
                rest = after;
            }
        }
    }
    text.push_str(rest);
    PromptNetworks { text, tags }
}

/// `kind:args>` at the start of `s` -> the tag and the bytes it used (including `>`).
fn parse_tag(s: &str) -> Option<(NetworkTag, usize)> {
    let kind_len = s
        .char_indices()
        .find(|&(_, c)| !is_word_char(c))
        .map_or(s.len(), |(i, _)| i);
    if kind_len == 0 || !s[kind_len..].starts_with(':') {
        return None;
    }
    let args_start = kind_len + 1;
    let close = s[args_start..].find('>')? + args_start;
    if close == args_start {
        return None;
    }
    let tag = NetworkTag {
        kind: s[..kind_len].to_string(),
        args: s[args_start..close]
            .split(':')
            .map(str::to_string)
            .collect(),
    };
    Some((tag, close + 1))
}

/// Python's `\w` for str patterns: Unicode letters and digits, and `_`.
fn is_word_char(c: char) -> bool {
    c.is_alphanumeric() || c == '_'
}

/// One piece of a parsed prompt.
#[derive(Debug, Clone, PartialEq)]
pub enum Segment {
    /// Text with its attention multiplier (1.0 = normal).
    Text { text: String, weight: f64 },
    /// `BREAK`: start a new 75-token chunk here.
    Break,
}

/// The result of [`parse_attention`].
#[derive(Debug, Clone, PartialEq)]
pub struct ParsedPrompt {
    /// Never empty: an empty prompt is one empty text segment of weight 1 (as in A1111).
    pub segments: Vec<Segment>,
    pub warnings: Vec<PromptWarning>,
}

/// A lexical unit of the attention syntax (the alternatives of A1111's `re_attention`, in order).
#[derive(Debug, PartialEq)]
enum Token<'a> {
    /// `\(`, `\)`, `\[`, `\]`, `\\`, `\:`: the character after the backslash. A backslash before
    /// any other character (or at the end) is dropped, as A1111's lone `\\` alternative does.
    Escaped(&'a str),
    Open(char),
    /// `:` + optional spaces + `[+-]?[.0-9]+` + optional spaces + `)`; `number` is the digits part.
    WeightClose {
        whole: &'a str,
        number: &'a str,
    },
    Close(char),
    Text(&'a str),
}

fn lex(text: &str) -> Vec<(usize, Token<'_>)> {
    let mut out = Vec::new();
    let mut i = 0;
    let bytes = text.as_bytes();
    while i < text.len() {
        let c = text[i..].chars().next().expect("i is on a char boundary");
        let start = i;
        let token = match c {
            '\\' => {
                let next = text[i + 1..].chars().next();
                match next {
                    // `\:` is ours: A1111 drops the backslash and may then read `:9)` as a
                    // weight, so `(16\:9)` would weigh "16" x9; a user escaping it means a colon.
                    Some(n @ ('(' | ')' | '[' | ']' | '\\' | ':')) => {
                        i += 1 + n.len_utf8();
                        Token::Escaped(&text[start + 1..i])
                    }
                    _ => {
                        i += 1;
                        Token::Escaped("")
                    }
                }
            }
            '(' | '[' => {
                i += 1;
                Token::Open(c)
            }
            ')' | ']' => {
                i += 1;
                Token::Close(c)
            }
            ':' => match weight_close(&text[i..]) {
                Some((len, number)) => {
                    i += len;
                    Token::WeightClose {
                        whole: &text[start..i],
                        number,
                    }
                }
                None => {
                    i += 1;
                    Token::Text(":")
                }
            },
            _ => {
                while i < text.len()
                    && !matches!(bytes[i], b'\\' | b'(' | b')' | b'[' | b']' | b':')
                {
                    i += text[i..].chars().next().map_or(1, char::len_utf8);
                }
                Token::Text(&text[start..i])
            }
        };
        out.push((start, token));
    }
    out
}

/// Matches `:\s*([+-]?[.\d]+)\s*\)` at the start of `s` -> (bytes used, the number part).
fn weight_close(s: &str) -> Option<(usize, &str)> {
    let skip_ws = |from: usize| {
        s[from..]
            .char_indices()
            .find(|&(_, c)| !c.is_whitespace())
            .map_or(s.len(), |(i, _)| from + i)
    };
    let num_start = skip_ws(1);
    let mut j = num_start;
    if matches!(s.as_bytes().get(j), Some(b'+' | b'-')) {
        j += 1;
    }
    let digits_start = j;
    while matches!(s.as_bytes().get(j), Some(b'.' | b'0'..=b'9')) {
        j += 1;
    }
    if j == digits_start {
        return None;
    }
    let number = &s[num_start..j];
    let close = skip_ws(j);
    (s.as_bytes().get(close) == Some(&b')')).then_some((close + 1, number))
}

/// Splits plain text at `BREAK` words (A1111's `\s*\bBREAK\b\s*`: whitespace on both sides is
/// eaten, and BREAK must not touch a word character).
fn split_breaks(text: &str) -> Vec<&str> {
    let mut parts = Vec::new();
    let mut part_start = 0;
    let mut search = 0;
    while let Some(found) = text[search..].find("BREAK") {
        let at = search + found;
        let end = at + "BREAK".len();
        let before_ok = text[..at]
            .chars()
            .next_back()
            .is_none_or(|c| !is_word_char(c));
        let after_ok = text[end..].chars().next().is_none_or(|c| !is_word_char(c));
        if before_ok && after_ok {
            let left = text[part_start..at].trim_end_matches(char::is_whitespace);
            parts.push(left);
            let after = &text[end..];
            part_start = end + (after.len() - after.trim_start_matches(char::is_whitespace).len());
            search = part_start.max(end);
        } else {
            search = at + 1;
        }
    }
    parts.push(&text[part_start..]);
    parts
}

/// Reads A1111's attention syntax:
/// - `(text)` x1.1, `[text]` /1.1, nesting multiplies: `((text))` x1.21;
/// - `(text:1.3)` sets x1.3 for that bracket (still multiplied by outer brackets);
/// - `\(` `\)` `\[` `\]` `\\` are literal characters, and `\:` (not an escape in A1111);
/// - `BREAK` (upper case, a word of its own) starts a new chunk;
/// - unclosed brackets weigh the rest of the prompt, stray closing brackets stay as text, both
///   with a warning (A1111 accepts them silently).
///
/// Neighbouring pieces with equal weights are joined, as in A1111, so `a(b:1)` is one piece `ab`
/// and tokenizes as one word. Unlike A1111, `BREAK` markers are never joined with each other or
/// weighted by brackets around them: `(a BREAK b)` breaks between two x1.1 pieces, where A1111
/// would weight its marker and then tokenize the word "BREAK".
pub fn parse_attention(text: &str) -> ParsedPrompt {
    // (text, weight, is_break)
    let mut res: Vec<(String, f64, bool)> = Vec::new();
    let mut warnings = Vec::new();
    let mut round: Vec<(usize, usize)> = Vec::new();
    let mut square: Vec<(usize, usize)> = Vec::new();
    // Character offsets for warnings: lex() gives byte offsets.
    let char_pos = |byte: usize| text[..byte].chars().count();

    fn multiply(res: &mut [(String, f64, bool)], from: usize, by: f64) {
        for r in &mut res[from..] {
            if !r.2 {
                r.1 *= by;
            }
        }
    }

    for (at, token) in lex(text) {
        match token {
            Token::Escaped(s) => res.push((s.to_string(), 1.0, false)),
            Token::Open('(') => round.push((res.len(), at)),
            Token::Open(_) => square.push((res.len(), at)),
            Token::WeightClose { whole, number } => match round.pop() {
                Some((from, _)) => match number.parse::<f64>() {
                    Ok(w) if w.is_finite() => multiply(&mut res, from, w),
                    _ => {
                        warnings.push(PromptWarning::BadWeight {
                            text: whole.to_string(),
                            position: char_pos(at),
                        });
                        multiply(&mut res, from, ROUND_MULTIPLIER);
                    }
                },
                None => {
                    warnings.push(PromptWarning::UnmatchedClose {
                        text: whole.to_string(),
                        position: char_pos(at),
                    });
                    push_text(&mut res, whole);
                }
            },
            Token::Close(c) => {
                let stack = if c == ')' { &mut round } else { &mut square };
                match stack.pop() {
                    Some((from, _)) => {
                        let by = if c == ')' {
                            ROUND_MULTIPLIER
                        } else {
                            SQUARE_MULTIPLIER
                        };
                        multiply(&mut res, from, by);
                    }
                    None => {
                        warnings.push(PromptWarning::UnmatchedClose {
                            text: c.to_string(),
                            position: char_pos(at),
                        });
                        push_text(&mut res, if c == ')' { ")" } else { "]" });
                    }
                }
            }
            Token::Text(s) => push_text(&mut res, s),
        }
    }
    // A1111 applies the still-open round brackets first, then the square ones, each from the
    // outermost; the order matters only for the last bits of the product, kept for parity.
    for (from, at) in round.iter().copied() {
        warnings.push(PromptWarning::UnclosedBracket {
            bracket: '(',
            position: char_pos(at),
        });
        multiply(&mut res, from, ROUND_MULTIPLIER);
    }
    for (from, at) in square.iter().copied() {
        warnings.push(PromptWarning::UnclosedBracket {
            bracket: '[',
            position: char_pos(at),
        });
        multiply(&mut res, from, SQUARE_MULTIPLIER);
    }
    warnings.sort_by_key(|w| match w {
        PromptWarning::UnclosedBracket { position, .. }
        | PromptWarning::UnmatchedClose { position, .. }
        | PromptWarning::BadWeight { position, .. } => *position,
        PromptWarning::BadNetworkArgument { .. } => 0,
    });

    let mut segments: Vec<Segment> = Vec::new();
    for (text, weight, is_break) in res {
        if is_break {
            segments.push(Segment::Break);
            continue;
        }
        // Exact float equality is A1111's merge rule: x1.1 twice and x1.21 can differ in the last
        // bit and then stay separate pieces there too.
        if let Some(Segment::Text { text: t, weight: w }) = segments.last_mut() {
            if *w == weight {
                t.push_str(&text);
                continue;
            }
        }
        segments.push(Segment::Text { text, weight });
    }
    if segments.is_empty() {
        segments.push(Segment::Text {
            text: String::new(),
            weight: 1.0,
        });
    }
    ParsedPrompt { segments, warnings }
}

/// Adds plain text, splitting it at BREAK words.
fn push_text(res: &mut Vec<(String, f64, bool)>, s: &str) {
    for (i, part) in split_breaks(s).into_iter().enumerate() {
        if i > 0 {
            res.push((String::new(), 1.0, true));
        }
        res.push((part.to_string(), 1.0, false));
    }
}

/// A parsed segment turned into token ids.
#[derive(Debug, Clone, PartialEq)]
pub enum TokenSegment {
    Tokens { ids: Vec<u32>, weight: f64 },
    Break,
}

/// A textual-inversion embedding found in a token stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EmbeddingMatch {
    /// The caller's index of the embedding.
    pub index: usize,
    /// How many prompt tokens its name used.
    pub consumed: usize,
    /// How many token positions its vectors take.
    pub vectors: usize,
}

/// Finds textual-inversion embeddings by their tokenized names (A1111
/// `EmbeddingDatabase.find_embedding_at_position`).
pub trait EmbeddingLookup {
    /// The embedding whose name's tokens start at `tokens[at]`, if any (longest name first).
    fn find(&self, tokens: &[u32], at: usize) -> Option<EmbeddingMatch>;
}

/// No embeddings.
impl EmbeddingLookup for () {
    fn find(&self, _: &[u32], _: usize) -> Option<EmbeddingMatch> {
        None
    }
}

/// Special ids and sizes for chunking.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChunkLayout {
    pub bos: u32,
    pub eos: u32,
    /// What follows the EOS (SD1: EOS again, SD2: "!" = 0).
    pub pad: u32,
    /// The id of `,</w>`, for comma backtracking; `None` turns backtracking off.
    pub comma: Option<u32>,
    /// Prompt tokens per chunk (75: 77 minus BOS and EOS).
    pub capacity: usize,
    /// [`COMMA_BACKTRACK`]; 0 turns it off.
    pub backtrack: usize,
}

/// Placeholder id at embedding positions (A1111 uses 0 too). Never EOS, so the first EOS still
/// marks the end of the text; the vectors replace whatever it embeds to.
const EMBEDDING_PLACEHOLDER: u32 = 0;

/// One encoder row: `capacity + 2` ids and weights.
#[derive(Debug, Clone, PartialEq)]
pub struct PromptChunk {
    /// `[BOS, tokens.., EOS, PAD..]`.
    pub ids: Vec<u32>,
    /// Attention multiplier per position; 1.0 at BOS, EOS and padding.
    pub weights: Vec<f32>,
    /// (row position of the first vector, embedding index) for each embedding in the row.
    pub embeddings: Vec<(usize, usize)>,
}

/// A chunk being filled: tokens without BOS/EOS.
#[derive(Default)]
struct Open {
    ids: Vec<u32>,
    weights: Vec<f32>,
    /// (position in `ids`, embedding index)
    embeddings: Vec<(usize, usize)>,
}

impl Open {
    fn finish(self, layout: &ChunkLayout) -> PromptChunk {
        let len = layout.capacity + 2;
        let mut ids = Vec::with_capacity(len);
        ids.push(layout.bos);
        ids.extend_from_slice(&self.ids);
        ids.push(layout.eos);
        ids.resize(len, layout.pad);
        let mut weights = Vec::with_capacity(len);
        weights.push(1.0);
        weights.extend_from_slice(&self.weights);
        weights.resize(len, 1.0);
        PromptChunk {
            ids,
            weights,
            embeddings: self.embeddings.iter().map(|&(p, e)| (p + 1, e)).collect(),
        }
    }
}

/// Splits tokenized segments into chunks the way A1111's `tokenize_line` does:
/// - a chunk holds `capacity` tokens; when it is full the next token starts a new one;
/// - when a full chunk has a comma among its last `backtrack` tokens, the tokens after that comma
///   move to the next chunk (the comma itself stays);
/// - `BREAK` closes the current chunk (even an empty one, so `BREAK BREAK` leaves an empty chunk);
/// - an embedding's vectors are never split over two chunks;
/// - an empty prompt is one chunk of BOS, EOS and padding.
///
/// A1111 does not move embeddings along when it backtracks to a comma (their vectors then land
/// at stale positions); here they move with their tokens.
pub fn chunk_tokens(
    segments: &[TokenSegment],
    layout: &ChunkLayout,
    embeddings: &dyn EmbeddingLookup,
) -> Vec<PromptChunk> {
    let cap = layout.capacity;
    let mut chunks = Vec::new();
    let mut open = Open::default();
    // Position in `open.ids` of the last comma, when there is one.
    let mut last_comma: Option<usize> = None;

    for segment in segments {
        let (ids, weight) = match segment {
            TokenSegment::Break => {
                chunks.push(std::mem::take(&mut open).finish(layout));
                last_comma = None;
                continue;
            }
            TokenSegment::Tokens { ids, weight } => (ids, *weight as f32),
        };
        let mut at = 0;
        while at < ids.len() {
            let token = ids[at];
            if Some(token) == layout.comma {
                last_comma = Some(open.ids.len());
            } else if let Some(comma) = last_comma.filter(|&c| {
                layout.backtrack != 0 && open.ids.len() == cap && cap - c <= layout.backtrack
            }) {
                let split = comma + 1;
                let moved_ids = open.ids.split_off(split);
                let moved_weights = open.weights.split_off(split);
                let (stay, moved): (Vec<_>, Vec<_>) =
                    open.embeddings.iter().partition(|&&(p, _)| p < split);
                open.embeddings = stay;
                chunks.push(std::mem::take(&mut open).finish(layout));
                open.ids = moved_ids;
                open.weights = moved_weights;
                open.embeddings = moved.into_iter().map(|(p, e)| (p - split, e)).collect();
                last_comma = None;
            }
            if open.ids.len() == cap {
                chunks.push(std::mem::take(&mut open).finish(layout));
                last_comma = None;
            }
            match embeddings.find(ids, at) {
                None => {
                    open.ids.push(token);
                    open.weights.push(weight);
                    at += 1;
                }
                Some(m) => {
                    if open.ids.len() + m.vectors > cap {
                        chunks.push(std::mem::take(&mut open).finish(layout));
                        last_comma = None;
                    }
                    open.embeddings.push((open.ids.len(), m.index));
                    open.ids
                        .extend(std::iter::repeat_n(EMBEDDING_PLACEHOLDER, m.vectors));
                    open.weights.extend(std::iter::repeat_n(weight, m.vectors));
                    at += m.consumed.max(1);
                }
            }
        }
    }
    if !open.ids.is_empty() || chunks.is_empty() {
        chunks.push(open.finish(layout));
    }
    chunks
}

/// A1111's "Original" emphasis on one chunk's hidden states `z` `[1, t, h]` (or `[t, h]`): multiply
/// each position by its weight, then rescale the whole chunk so its mean is the mean it had
/// before (`modules/sd_emphasis.py`). All-1 weights return `z` untouched. Computed in f32 and
/// returned in `z`'s dtype.
pub fn apply_emphasis(z: &Tensor, weights: &[f32]) -> Result<Tensor> {
    if weights.iter().all(|&w| w == 1.0) {
        return Ok(z.clone());
    }
    let dtype = z.dtype();
    let zf = z.to_dtype(DType::F32)?;
    let t = zf.dim(zf.rank() - 2)?;
    if t != weights.len() {
        return Err(crate::EngineError::InvalidRequest(format!(
            "{} emphasis weights for {t} token positions",
            weights.len()
        )));
    }
    let mut shape = vec![1; zf.rank()];
    shape[zf.rank() - 2] = t;
    let w = Tensor::from_slice(weights, shape, zf.device())?;
    // Means summed in f64: with random-weight models the mean can be 1e-4 of the values, and an
    // f32 running sum over 77 x hidden values would then decide the ratio's last digits.
    let mean =
        |t: &Tensor| -> Result<f64> { Ok(t.to_dtype(DType::F64)?.mean_all()?.to_scalar::<f64>()?) };
    let original_mean = mean(&zf)?;
    let scaled = zf.broadcast_mul(&w)?;
    let new_mean = mean(&scaled)?;
    // A zero mean after weighting (all weights 0, or cancelling signs) would make A1111 divide by
    // zero and return NaNs; leave the weighted states as they are instead.
    let out = if new_mean != 0.0 && new_mean.is_finite() {
        (scaled * (original_mean / new_mean))?
    } else {
        scaled
    };
    Ok(out.to_dtype(dtype)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn text(t: &str, w: f64) -> Segment {
        Segment::Text {
            text: t.into(),
            weight: w,
        }
    }

    fn parse(s: &str) -> Vec<Segment> {
        parse_attention(s).segments
    }

    // The examples in the docstring of A1111's `parse_prompt_attention`, with its exact floats.
    #[test]
    fn a1111_docstring_examples() {
        assert_eq!(parse("normal text"), vec![text("normal text", 1.0)]);
        assert_eq!(
            parse("an (important) word"),
            vec![text("an ", 1.0), text("important", 1.1), text(" word", 1.0)]
        );
        assert_eq!(parse("(unbalanced"), vec![text("unbalanced", 1.1)]);
        assert_eq!(parse(r"\(literal\]"), vec![text("(literal]", 1.0)]);
        assert_eq!(
            parse("(unnecessary)(parens)"),
            vec![text("unnecessaryparens", 1.1)]
        );
        assert_eq!(
            parse("a (((house:1.3)) [on] a (hill:0.5), sun, (((sky)))."),
            vec![
                text("a ", 1.0),
                text("house", 1.5730000000000004),
                text(" ", 1.1),
                text("on", 1.0),
                text(" a ", 1.1),
                text("hill", 0.55),
                text(", sun, ", 1.1),
                text("sky", 1.4641000000000006),
                text(".", 1.1),
            ]
        );
    }

    #[test]
    fn nesting_and_explicit_weights() {
        assert_eq!(
            parse("((word))"),
            vec![text("word", ROUND_MULTIPLIER * ROUND_MULTIPLIER)]
        );
        assert_eq!(parse("[word]"), vec![text("word", 1.0 / 1.1)]);
        assert_eq!(parse("(word:1.3)"), vec![text("word", 1.3)]);
        assert_eq!(parse("(word: 0.5 )"), vec![text("word", 0.5)]);
        assert_eq!(parse("(word:-1)"), vec![text("word", -1.0)]);
        assert_eq!(parse("(word:.5)"), vec![text("word", 0.5)]);
        assert_eq!(
            parse("((a:1.5) b)"),
            vec![text("a", 1.5 * 1.1), text(" b", 1.1)]
        );
        // The explicit weight replaces x1.1 for its own bracket only.
        assert_eq!(parse("[(a:2)]"), vec![text("a", 2.0 / 1.1)]);
        // A weight of 1 joins the neighbours into one word for the tokenizer.
        assert_eq!(parse("foo(bar:1)"), vec![text("foobar", 1.0)]);
        // A colon that is not a weight is text.
        assert_eq!(
            parse("ratio 16:9 (a:b)"),
            vec![text("ratio 16:9 ", 1.0), text("a:b", 1.1)]
        );
        assert!(parse_attention("(a:1.3)").warnings.is_empty());
    }

    #[test]
    fn escapes() {
        assert_eq!(parse(r"\(a\) \[b\]"), vec![text("(a) [b]", 1.0)]);
        assert_eq!(parse(r"a \\ b"), vec![text(r"a \ b", 1.0)]);
        // A backslash before anything else is dropped (A1111's lone `\\` alternative).
        assert_eq!(parse(r"a\b\"), vec![text("ab", 1.0)]);
        // Escaped brackets inside a weighted group keep the group's weight.
        assert_eq!(parse(r"(\(x\):1.2)"), vec![text("(x)", 1.2)]);
        // `\:` is a literal colon (our addition), so it never starts a weight.
        assert_eq!(parse(r"(a\:1.2)"), vec![text("a:1.2", 1.1)]);
        assert_eq!(parse(r"(16\:9)"), vec![text("16:9", 1.1)]);
    }

    #[test]
    fn unbalanced_brackets_warn_and_keep_going() {
        let p = parse_attention("a) b]");
        assert_eq!(p.segments, vec![text("a) b]", 1.0)]);
        assert_eq!(
            p.warnings,
            vec![
                PromptWarning::UnmatchedClose {
                    text: ")".into(),
                    position: 1
                },
                PromptWarning::UnmatchedClose {
                    text: "]".into(),
                    position: 4
                },
            ]
        );
        let p = parse_attention("x [(a b");
        assert_eq!(
            p.segments,
            // x1.1 then /1.1 is exactly 1.0 in f64, so the pieces join.
            vec![text("x a b", 1.0)]
        );
        assert_eq!(p.warnings.len(), 2);
        assert!(p.warnings[0].to_string().contains("never closed"));
        // `:1.2)` with nothing open stays text.
        let p = parse_attention("a:1.2)");
        assert_eq!(p.segments, vec![text("a:1.2)", 1.0)]);
        assert_eq!(p.warnings.len(), 1);
        // Square bracket closing a round one: text, and the round one stays open.
        let p = parse_attention("(a]");
        assert_eq!(p.segments, vec![text("a]", 1.1)]);
        assert_eq!(p.warnings.len(), 2);
        // A malformed weight closes its bracket as a plain one.
        let p = parse_attention("(a:1.2.3) b");
        assert_eq!(p.segments, vec![text("a", 1.1), text(" b", 1.0)]);
        assert!(
            matches!(&p.warnings[..], [PromptWarning::BadWeight { text, position: 2 }] if text == ":1.2.3)")
        );
    }

    #[test]
    fn break_splits_with_its_whitespace() {
        assert_eq!(
            parse("a cat BREAK a dog"),
            vec![text("a cat", 1.0), Segment::Break, text("a dog", 1.0)]
        );
        assert_eq!(
            parse("a,BREAK,b"),
            vec![text("a,", 1.0), Segment::Break, text(",b", 1.0)]
        );
        // Not a word of its own, or not upper case: plain text.
        for s in ["BREAKING news", "xBREAK", "break", "_BREAK"] {
            assert_eq!(parse(s), vec![text(s, 1.0)], "{s}");
        }
        assert_eq!(
            parse("a BREAK BREAK b"),
            vec![
                text("a", 1.0),
                Segment::Break,
                text("", 1.0),
                Segment::Break,
                text("b", 1.0)
            ]
        );
        assert_eq!(
            parse("(a BREAK b)"),
            vec![text("a", 1.1), Segment::Break, text("b", 1.1)]
        );
        assert_eq!(
            parse("BREAK"),
            vec![text("", 1.0), Segment::Break, text("", 1.0)]
        );
    }

    #[test]
    fn unicode_positions_are_characters() {
        assert_eq!(
            parse("東京 (🐱:1.2) café"),
            vec![text("東京 ", 1.0), text("🐱", 1.2), text(" café", 1.0)]
        );
        let p = parse_attention("東京) x");
        assert_eq!(
            p.warnings,
            vec![PromptWarning::UnmatchedClose {
                text: ")".into(),
                position: 2
            }]
        );
        // Non-ASCII digits are not weights.
        assert_eq!(parse("(a:١)"), vec![text("a:١", 1.1)]);
    }

    #[test]
    fn empty_prompt_is_one_empty_segment() {
        assert_eq!(parse(""), vec![text("", 1.0)]);
        assert_eq!(parse("()"), vec![text("", 1.0)]);
    }

    #[test]
    fn network_tags_are_taken_out() {
        let p = extract_networks("a cat <lora:style_v2:0.8>, <lora:detail:0.5:1.2> <hypernet:h:1>");
        assert_eq!(p.text, "a cat ,  ");
        assert_eq!(p.tags.len(), 3);
        assert_eq!(p.tags[2].kind, "hypernet");
        let (loras, warnings) = p.loras();
        assert!(warnings.is_empty());
        assert_eq!(
            loras,
            vec![
                LoraTag {
                    name: "style_v2".into(),
                    text_encoder_weight: 0.8,
                    unet_weight: 0.8
                },
                LoraTag {
                    name: "detail".into(),
                    text_encoder_weight: 0.5,
                    unet_weight: 1.2
                },
            ]
        );
        let p = extract_networks("<lora:x> <lyco:y:te=0.2:unet=0.7> <lora:z:abc>");
        let (loras, warnings) = p.loras();
        assert_eq!(
            (loras[0].text_encoder_weight, loras[0].unet_weight),
            (1.0, 1.0)
        );
        assert_eq!(
            (loras[1].text_encoder_weight, loras[1].unet_weight),
            (0.2, 0.7)
        );
        assert_eq!(loras[2].unet_weight, 1.0);
        assert_eq!(warnings.len(), 1);
        // Not tags: no kind, no colon, no arguments, unclosed.
        for s in ["a < b", "<:x>", "<lora>", "<lora:>", "<lora:x", "1<2>3"] {
            let p = extract_networks(s);
            assert_eq!(p.text, s, "{s}");
            assert!(p.tags.is_empty(), "{s}");
        }
        let p = extract_networks("<lora:名前:0.5>東京");
        assert_eq!(p.text, "東京");
        assert_eq!(p.loras().0[0].name, "名前");
    }

    const LAYOUT: ChunkLayout = ChunkLayout {
        bos: 100,
        eos: 101,
        pad: 0,
        comma: Some(50),
        capacity: 5,
        backtrack: 2,
    };

    fn toks(ids: &[u32], weight: f64) -> TokenSegment {
        TokenSegment::Tokens {
            ids: ids.to_vec(),
            weight,
        }
    }

    #[test]
    fn chunks_pad_and_split() {
        let c = chunk_tokens(&[toks(&[1, 2], 1.5)], &LAYOUT, &());
        assert_eq!(c.len(), 1);
        assert_eq!(c[0].ids, vec![100, 1, 2, 101, 0, 0, 0]);
        assert_eq!(c[0].weights, vec![1.0, 1.5, 1.5, 1.0, 1.0, 1.0, 1.0]);
        // Exactly full: no extra chunk; one more token: a second chunk.
        let c = chunk_tokens(&[toks(&[1, 2, 3, 4, 5], 1.0)], &LAYOUT, &());
        assert_eq!(c.len(), 1);
        assert_eq!(c[0].ids, vec![100, 1, 2, 3, 4, 5, 101]);
        let c = chunk_tokens(&[toks(&[1, 2, 3, 4, 5, 6], 1.0)], &LAYOUT, &());
        assert_eq!(c.len(), 2);
        assert_eq!(c[1].ids, vec![100, 6, 101, 0, 0, 0, 0]);
        // Empty prompt: one empty chunk.
        let c = chunk_tokens(&[toks(&[], 1.0)], &LAYOUT, &());
        assert_eq!(c[0].ids, vec![100, 101, 0, 0, 0, 0, 0]);
    }

    #[test]
    fn comma_backtrack_moves_the_tail() {
        // Comma at position 3 of 5: within the last 2, so 4, 5 move on with the next token.
        let c = chunk_tokens(
            &[toks(&[1, 2, 3], 1.0), toks(&[50, 4, 5, 6], 2.0)],
            &LAYOUT,
            &(),
        );
        assert_eq!(c.len(), 2);
        assert_eq!(c[0].ids, vec![100, 1, 2, 3, 50, 101, 0]);
        assert_eq!(c[0].weights, vec![1.0, 1.0, 1.0, 1.0, 2.0, 1.0, 1.0]);
        assert_eq!(c[1].ids, vec![100, 4, 5, 6, 101, 0, 0]);
        assert_eq!(c[1].weights[1..4], [2.0, 2.0, 2.0]);
        // Comma too far back (3 tokens from the end > 2): a hard split.
        let c = chunk_tokens(&[toks(&[1, 50, 2, 3, 4, 5], 1.0)], &LAYOUT, &());
        assert_eq!(c[0].ids, vec![100, 1, 50, 2, 3, 4, 101]);
        // Backtracking off.
        let off = ChunkLayout {
            backtrack: 0,
            ..LAYOUT
        };
        let c = chunk_tokens(&[toks(&[1, 2, 3, 50, 4, 5], 1.0)], &off, &());
        assert_eq!(c[0].ids, vec![100, 1, 2, 3, 50, 4, 101]);
    }

    #[test]
    fn break_closes_chunks() {
        let segs = [
            toks(&[1], 1.0),
            TokenSegment::Break,
            toks(&[], 1.0),
            TokenSegment::Break,
            toks(&[2], 1.0),
        ];
        let c = chunk_tokens(&segs, &LAYOUT, &());
        assert_eq!(c.len(), 3);
        assert_eq!(c[1].ids, vec![100, 101, 0, 0, 0, 0, 0]);
        // A trailing BREAK adds nothing.
        let c = chunk_tokens(&[toks(&[1], 1.0), TokenSegment::Break], &LAYOUT, &());
        assert_eq!(c.len(), 1);
    }

    struct OneEmbedding;
    impl EmbeddingLookup for OneEmbedding {
        // Tokens [7, 8] name embedding 0 with 3 vectors.
        fn find(&self, tokens: &[u32], at: usize) -> Option<EmbeddingMatch> {
            tokens[at..].starts_with(&[7, 8]).then_some(EmbeddingMatch {
                index: 0,
                consumed: 2,
                vectors: 3,
            })
        }
    }

    #[test]
    fn embeddings_take_positions_and_do_not_split() {
        let c = chunk_tokens(&[toks(&[1, 7, 8, 2], 1.2)], &LAYOUT, &OneEmbedding);
        assert_eq!(c[0].ids, vec![100, 1, 0, 0, 0, 2, 101]);
        assert_eq!(c[0].embeddings, vec![(2, 0)]);
        assert_eq!(c[0].weights[2..5], [1.2, 1.2, 1.2]);
        // Three vectors do not fit after three tokens: the embedding opens the next chunk.
        let c = chunk_tokens(&[toks(&[1, 2, 3, 7, 8], 1.0)], &LAYOUT, &OneEmbedding);
        assert_eq!(c.len(), 2);
        assert_eq!(c[1].embeddings, vec![(1, 0)]);
        // Moved with its tokens by comma backtracking.
        let c = chunk_tokens(&[toks(&[1, 2, 50, 7, 8, 9], 1.0)], &LAYOUT, &OneEmbedding);
        assert_eq!(c[0].ids, vec![100, 1, 2, 50, 101, 0, 0]);
        assert_eq!(c[1].ids, vec![100, 0, 0, 0, 9, 101, 0]);
        assert_eq!(c[1].embeddings, vec![(1, 0)]);
        assert!(c[0].embeddings.is_empty());
    }

    #[test]
    fn emphasis_restores_the_mean() {
        let dev = candle_core::Device::Cpu;
        let z = Tensor::new(&[[[1f32, 2.0], [3.0, 4.0], [5.0, 6.0]]], &dev).unwrap();
        let out = apply_emphasis(&z, &[1.0, 2.0, 1.0]).unwrap();
        let v = out.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        // Weighted: [1,2,6,8,5,6], mean 28/6; original mean 21/6; factor 0.75.
        let expected = [0.75, 1.5, 4.5, 6.0, 3.75, 4.5];
        for (a, b) in v.iter().zip(expected) {
            assert!((a - b).abs() < 1e-6, "{v:?}");
        }
        let same = apply_emphasis(&z, &[1.0; 3]).unwrap();
        assert_eq!(same.to_vec3::<f32>().unwrap(), z.to_vec3::<f32>().unwrap());
        assert!(apply_emphasis(&z, &[2.0; 2]).is_err());
        // All-zero weights: no division by zero.
        let zero = apply_emphasis(&z, &[0.0; 3]).unwrap();
        assert_eq!(zero.sum_all().unwrap().to_scalar::<f32>().unwrap(), 0.0);
    }
}
