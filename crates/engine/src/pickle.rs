//! PyTorch pickle checkpoints (`.ckpt`, `.pt`, `.pth`, `.bin`) read without ever unpickling:
//! a reader for torch's zip container (stored entries only, as `torch.save` writes them) and for
//! the pickle opcode stream that accepts only what a tensor state dict needs
//! (`torch._utils._rebuild_tensor_v2`, `collections.OrderedDict`, `torch.*Storage`, persistent
//! ids). Any other `GLOBAL`/`REDUCE` target (`os.system`, `builtins.eval`, ...) is refused; the
//! stream is data to us, so nothing it names is ever run. [`convert_to_safetensors`] writes the
//! tensors, names kept, to a `.safetensors` file atomically.
//!
//! Why not a blocklist scanner: they are bypassed again and again (picklescan advisories,
//! CVE-2025-1716); an allowlist of four callables cannot be.

use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use safetensors::Dtype;

use crate::{EngineError, Result};

/// Extensions of pickle-based formats.
pub const PICKLE_EXTENSIONS: [&str; 4] = ["ckpt", "pt", "pth", "bin"];

/// Whether `path` has a pickle-format extension.
pub fn is_pickle_path(path: &Path) -> bool {
    path.extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| PICKLE_EXTENSIONS.contains(&e.to_ascii_lowercase().as_str()))
}

/// Limits that keep a hostile file from making us allocate or loop without bound.
const MAX_PICKLE_BYTES: usize = 512 << 20;
const MAX_STACK: usize = 1 << 20;
const MAX_MEMO: usize = 1 << 22;
/// Value nodes copied by memo gets / DUP, all together (copying is how we model shared refs).
const MAX_COPIED_NODES: usize = 1 << 24;

/// Why a pickle file cannot be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PickleError {
    #[error("it calls `{0}`, which is not tensor data: loading this file in Python would run that code, so it is refused (only torch tensor storage, OrderedDict and plain values are accepted)")]
    Forbidden(String),
    #[error("it uses pickle opcode {0:#04x} ({1}), which only code-carrying pickles need")]
    ForbiddenOpcode(u8, &'static str),
    #[error("it uses unknown pickle opcode {0:#04x} at byte {1}")]
    UnknownOpcode(u8, usize),
    #[error("the pickle stream is malformed: {0}")]
    Malformed(String),
    #[error("the zip container is malformed: {0}")]
    Zip(String),
    #[error("it is in the legacy (pre-1.6) PyTorch format, which is not supported; re-save it with a current PyTorch or get the .safetensors version")]
    Legacy,
    #[error("it is not a PyTorch checkpoint (no zip container with data.pkl)")]
    NotTorch,
    #[error("tensor `{0}`: {1}")]
    BadTensor(String, String),
    #[error("it holds no tensors")]
    NoTensors,
}

impl PickleError {
    /// As an engine error naming `path`, with what the user can do.
    pub fn at(self, path: &Path) -> EngineError {
        EngineError::Weights {
            path: path.to_path_buf(),
            message: format!(
                "cannot convert this pickle file: {self}. Get the .safetensors version of the model instead"
            ),
        }
    }
}

type PResult<T> = std::result::Result<T, PickleError>;

fn malformed(m: impl Into<String>) -> PickleError {
    PickleError::Malformed(m.into())
}

/// The only callables a state dict needs.
#[derive(Debug, Clone, PartialEq)]
pub enum Global {
    OrderedDict,
    RebuildTensorV2,
    RebuildParameter,
    Storage(Dtype),
}

/// A tensor as the pickle describes it: a view into a storage.
#[derive(Debug, Clone, PartialEq)]
pub struct TensorRef {
    /// The storage's key: its entry is `<archive>/data/<key>`.
    pub storage: String,
    pub dtype: Dtype,
    /// Elements in the storage, as the persistent id says.
    pub storage_numel: u64,
    /// In elements.
    pub offset: u64,
    pub shape: Vec<u64>,
    pub stride: Vec<u64>,
}

/// Pickle values we build. Containers are copied, not shared (enough for state dicts).
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    None,
    Bool(bool),
    Int(i64),
    Float(f64),
    Str(String),
    Bytes(Vec<u8>),
    Tuple(Vec<Value>),
    List(Vec<Value>),
    Dict(Vec<(Value, Value)>),
    Global(Global),
    /// A persistent id tuple resolved to a storage (`('storage', type, key, location, numel)`).
    Storage {
        dtype: Dtype,
        key: String,
        numel: u64,
    },
    Tensor(TensorRef),
}

impl Value {
    fn nodes(&self) -> usize {
        match self {
            Value::Tuple(v) | Value::List(v) => 1 + v.iter().map(Value::nodes).sum::<usize>(),
            Value::Dict(v) => 1 + v.iter().map(|(k, x)| k.nodes() + x.nodes()).sum::<usize>(),
            Value::Tensor(t) => 1 + t.shape.len(),
            _ => 1,
        }
    }
}

fn global(module: &str, name: &str) -> PResult<Global> {
    let storage = |d| Ok(Global::Storage(d));
    match (module, name) {
        ("collections", "OrderedDict") => Ok(Global::OrderedDict),
        ("torch._utils", "_rebuild_tensor_v2") => Ok(Global::RebuildTensorV2),
        ("torch._utils", "_rebuild_parameter") => Ok(Global::RebuildParameter),
        ("torch", "FloatStorage") => storage(Dtype::F32),
        ("torch", "HalfStorage") => storage(Dtype::F16),
        ("torch", "BFloat16Storage") => storage(Dtype::BF16),
        ("torch", "DoubleStorage") => storage(Dtype::F64),
        ("torch", "LongStorage") => storage(Dtype::I64),
        ("torch", "IntStorage") => storage(Dtype::I32),
        ("torch", "ShortStorage") => storage(Dtype::I16),
        ("torch", "CharStorage") => storage(Dtype::I8),
        ("torch", "ByteStorage") => storage(Dtype::U8),
        ("torch", "BoolStorage") => storage(Dtype::BOOL),
        _ => Err(PickleError::Forbidden(format!("{module}.{name}"))),
    }
}

struct Reader<'a> {
    b: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> PResult<&'a [u8]> {
        let end = self
            .pos
            .checked_add(n)
            .filter(|&e| e <= self.b.len())
            .ok_or_else(|| malformed(format!("ends inside an opcode at byte {}", self.pos)))?;
        let s = &self.b[self.pos..end];
        self.pos = end;
        Ok(s)
    }
    fn u8(&mut self) -> PResult<u8> {
        Ok(self.take(1)?[0])
    }
    fn u16(&mut self) -> PResult<usize> {
        Ok(u16::from_le_bytes(self.take(2)?.try_into().unwrap()) as usize)
    }
    fn u32(&mut self) -> PResult<usize> {
        Ok(u32::from_le_bytes(self.take(4)?.try_into().unwrap()) as usize)
    }
    fn u64(&mut self) -> PResult<usize> {
        usize::try_from(u64::from_le_bytes(self.take(8)?.try_into().unwrap()))
            .map_err(|_| malformed("length too large"))
    }
    fn line(&mut self) -> PResult<&'a str> {
        let rest = &self.b[self.pos..];
        let n = rest
            .iter()
            .position(|&c| c == b'\n')
            .ok_or_else(|| malformed("unterminated text line"))?;
        let s = std::str::from_utf8(&rest[..n]).map_err(|_| malformed("text line is not UTF-8"))?;
        self.pos += n + 1;
        Ok(s)
    }
}

fn utf8(b: &[u8]) -> PResult<String> {
    String::from_utf8(b.to_vec()).map_err(|_| malformed("string is not UTF-8"))
}

/// Runs the opcode stream of one pickle and returns the value it builds. Only opcodes that
/// describe data are implemented; those that instantiate arbitrary classes (`INST`, `OBJ`,
/// `NEWOBJ`, `EXT*`) are refused outright, and `GLOBAL`/`STACK_GLOBAL` only resolve the
/// allowlist in [`global`].
pub fn parse(bytes: &[u8]) -> PResult<Value> {
    if bytes.len() > MAX_PICKLE_BYTES {
        return Err(malformed("the pickle is unreasonably large"));
    }
    let mut r = Reader { b: bytes, pos: 0 };
    let mut stack: Vec<Value> = Vec::new();
    let mut marks: Vec<usize> = Vec::new();
    let mut memo: HashMap<usize, Value> = HashMap::new();
    let mut copied = 0usize;
    let mut copy = |v: &Value| -> PResult<Value> {
        copied += v.nodes();
        if copied > MAX_COPIED_NODES {
            return Err(malformed("too many shared references"));
        }
        Ok(v.clone())
    };
    fn pop(stack: &mut Vec<Value>) -> PResult<Value> {
        stack.pop().ok_or_else(|| malformed("stack underflow"))
    }
    fn top(stack: &mut [Value]) -> PResult<&mut Value> {
        stack.last_mut().ok_or_else(|| malformed("stack underflow"))
    }
    fn pop_mark(stack: &mut Vec<Value>, marks: &mut Vec<usize>) -> PResult<Vec<Value>> {
        let m = marks.pop().ok_or_else(|| malformed("no MARK"))?;
        if m > stack.len() {
            return Err(malformed("MARK above the stack"));
        }
        Ok(stack.split_off(m))
    }
    fn memo_put(memo: &mut HashMap<usize, Value>, k: usize, v: Value) -> PResult<()> {
        if memo.len() >= MAX_MEMO && !memo.contains_key(&k) {
            return Err(malformed("memo too large"));
        }
        memo.insert(k, v);
        Ok(())
    }
    fn set_items(target: &mut Value, items: Vec<Value>) -> PResult<()> {
        let Value::Dict(d) = target else {
            return Err(malformed("SETITEM(S) on a non-dict"));
        };
        if !items.len().is_multiple_of(2) {
            return Err(malformed("odd number of dict items"));
        }
        let mut it = items.into_iter();
        while let (Some(k), Some(v)) = (it.next(), it.next()) {
            d.push((k, v));
        }
        Ok(())
    }
    fn append(target: &mut Value, items: Vec<Value>) -> PResult<()> {
        match target {
            Value::List(l) => {
                l.extend(items);
                Ok(())
            }
            _ => Err(malformed("APPEND(S) on a non-list")),
        }
    }

    loop {
        if stack.len() > MAX_STACK || marks.len() > MAX_STACK {
            return Err(malformed("stack too deep"));
        }
        let at = r.pos;
        let op = r.u8()?;
        match op {
            0x80 => {
                let proto = r.u8()?;
                if proto > 5 {
                    return Err(malformed(format!("unknown protocol {proto}")));
                }
            }
            0x95 => {
                r.take(8)?;
            }
            b'.' => return pop(&mut stack),
            b'(' => marks.push(stack.len()),
            b'}' => stack.push(Value::Dict(Vec::new())),
            b']' => stack.push(Value::List(Vec::new())),
            b')' => stack.push(Value::Tuple(Vec::new())),
            b'N' => stack.push(Value::None),
            0x88 => stack.push(Value::Bool(true)),
            0x89 => stack.push(Value::Bool(false)),
            b'J' => {
                let v = i32::from_le_bytes(r.take(4)?.try_into().unwrap());
                stack.push(Value::Int(v as i64));
            }
            b'K' => {
                let v = r.u8()?;
                stack.push(Value::Int(v as i64));
            }
            b'M' => {
                let v = r.u16()?;
                stack.push(Value::Int(v as i64));
            }
            0x8a => {
                let n = r.u8()? as usize;
                let b = r.take(n)?;
                if n > 8 {
                    return Err(malformed("integer wider than 64 bits"));
                }
                let mut buf = if b.last().is_some_and(|&x| x & 0x80 != 0) {
                    [0xffu8; 8]
                } else {
                    [0u8; 8]
                };
                buf[..n].copy_from_slice(b);
                stack.push(Value::Int(i64::from_le_bytes(buf)));
            }
            b'I' => {
                let line = r.line()?;
                let v = match line {
                    "00" => Value::Bool(false),
                    "01" => Value::Bool(true),
                    s => Value::Int(s.parse().map_err(|_| malformed("bad INT"))?),
                };
                stack.push(v);
            }
            b'G' => {
                let v = f64::from_be_bytes(r.take(8)?.try_into().unwrap());
                stack.push(Value::Float(v));
            }
            b'X' => {
                let n = r.u32()?;
                stack.push(Value::Str(utf8(r.take(n)?)?));
            }
            0x8c => {
                let n = r.u8()? as usize;
                stack.push(Value::Str(utf8(r.take(n)?)?));
            }
            0x8d => {
                let n = r.u64()?;
                stack.push(Value::Str(utf8(r.take(n)?)?));
            }
            b'T' => {
                let n = r.u32()?;
                stack.push(Value::Bytes(r.take(n)?.to_vec()));
            }
            b'U' | b'C' => {
                let n = r.u8()? as usize;
                stack.push(Value::Bytes(r.take(n)?.to_vec()));
            }
            b'B' => {
                let n = r.u32()?;
                stack.push(Value::Bytes(r.take(n)?.to_vec()));
            }
            0x8e => {
                let n = r.u64()?;
                stack.push(Value::Bytes(r.take(n)?.to_vec()));
            }
            b't' => {
                let items = pop_mark(&mut stack, &mut marks)?;
                stack.push(Value::Tuple(items));
            }
            0x85..=0x87 => {
                let n = (op - 0x84) as usize;
                if stack.len() < n {
                    return Err(malformed("stack underflow"));
                }
                let items = stack.split_off(stack.len() - n);
                stack.push(Value::Tuple(items));
            }
            b'l' => {
                let items = pop_mark(&mut stack, &mut marks)?;
                stack.push(Value::List(items));
            }
            b'd' => {
                let items = pop_mark(&mut stack, &mut marks)?;
                let mut d = Value::Dict(Vec::new());
                set_items(&mut d, items)?;
                stack.push(d);
            }
            b's' => {
                let v = pop(&mut stack)?;
                let k = pop(&mut stack)?;
                set_items(top(&mut stack)?, vec![k, v])?;
            }
            b'u' => {
                let items = pop_mark(&mut stack, &mut marks)?;
                set_items(top(&mut stack)?, items)?;
            }
            b'a' => {
                let v = pop(&mut stack)?;
                append(top(&mut stack)?, vec![v])?;
            }
            b'e' => {
                let items = pop_mark(&mut stack, &mut marks)?;
                append(top(&mut stack)?, items)?;
            }
            b'0' => {
                pop(&mut stack)?;
            }
            b'1' => {
                pop_mark(&mut stack, &mut marks)?;
            }
            b'2' => {
                let v = copy(top(&mut stack)?)?;
                stack.push(v);
            }
            b'q' => {
                let k = r.u8()? as usize;
                let v = copy(top(&mut stack)?)?;
                memo_put(&mut memo, k, v)?;
            }
            b'r' => {
                let k = r.u32()?;
                let v = copy(top(&mut stack)?)?;
                memo_put(&mut memo, k, v)?;
            }
            b'p' => {
                let k: usize = r.line()?.parse().map_err(|_| malformed("bad PUT"))?;
                let v = copy(top(&mut stack)?)?;
                memo_put(&mut memo, k, v)?;
            }
            0x94 => {
                let k = memo.len();
                let v = copy(top(&mut stack)?)?;
                memo_put(&mut memo, k, v)?;
            }
            b'h' | b'j' | b'g' => {
                let k = match op {
                    b'h' => r.u8()? as usize,
                    b'j' => r.u32()?,
                    _ => r.line()?.parse().map_err(|_| malformed("bad GET"))?,
                };
                let v = memo
                    .get(&k)
                    .ok_or_else(|| malformed(format!("memo key {k} missing")))?;
                let v = copy(v)?;
                stack.push(v);
            }
            b'c' => {
                let module = r.line()?.to_string();
                let name = r.line()?;
                stack.push(Value::Global(global(&module, name)?));
            }
            0x93 => {
                let name = pop(&mut stack)?;
                let module = pop(&mut stack)?;
                match (module, name) {
                    (Value::Str(m), Value::Str(n)) => stack.push(Value::Global(global(&m, &n)?)),
                    _ => return Err(malformed("STACK_GLOBAL needs two strings")),
                }
            }
            b'Q' => {
                let pid = pop(&mut stack)?;
                stack.push(persistent(pid)?);
            }
            b'R' => {
                let args = pop(&mut stack)?;
                let callable = pop(&mut stack)?;
                stack.push(reduce(callable, args)?);
            }
            b'b' => {
                // BUILD sets an object's state. A state dict is an OrderedDict subclass whose
                // `_metadata` attribute arrives this way; a plain data dict state on a dict
                // changes no code path, so it is dropped. Anything else is refused.
                let state = pop(&mut stack)?;
                let target = top(&mut stack)?;
                match (target, state) {
                    (Value::Dict(_), Value::Dict(_) | Value::None) => {}
                    (Value::Tensor(_), Value::Tuple(_) | Value::Dict(_)) => {}
                    _ => return Err(PickleError::ForbiddenOpcode(op, "BUILD on a non-dict")),
                }
            }
            b'i' => return Err(PickleError::ForbiddenOpcode(op, "INST")),
            b'o' => return Err(PickleError::ForbiddenOpcode(op, "OBJ")),
            0x81 => return Err(PickleError::ForbiddenOpcode(op, "NEWOBJ")),
            0x92 => return Err(PickleError::ForbiddenOpcode(op, "NEWOBJ_EX")),
            0x82..=0x84 => return Err(PickleError::ForbiddenOpcode(op, "EXT")),
            b'P' => return Err(PickleError::ForbiddenOpcode(op, "PERSID")),
            _ => return Err(PickleError::UnknownOpcode(op, at)),
        }
    }
}

fn as_u64(v: &Value, what: &str) -> PResult<u64> {
    match v {
        Value::Int(i) if *i >= 0 => Ok(*i as u64),
        _ => Err(malformed(format!("{what} is not a non-negative integer"))),
    }
}

fn u64_list(v: &Value, what: &str) -> PResult<Vec<u64>> {
    match v {
        Value::Tuple(items) | Value::List(items) => items.iter().map(|i| as_u64(i, what)).collect(),
        _ => Err(malformed(format!("{what} is not a tuple"))),
    }
}

/// torch's persistent id: `('storage', <Storage class>, key, location, numel)`.
fn persistent(pid: Value) -> PResult<Value> {
    let Value::Tuple(items) = pid else {
        return Err(malformed("persistent id is not a tuple"));
    };
    match items.as_slice() {
        [Value::Str(tag), Value::Global(Global::Storage(dtype)), key, _location, numel]
            if tag == "storage" =>
        {
            let key = match key {
                Value::Str(k) => k.clone(),
                Value::Int(i) => i.to_string(),
                _ => return Err(malformed("storage key is not a string")),
            };
            Ok(Value::Storage {
                dtype: *dtype,
                key,
                numel: as_u64(numel, "storage size")?,
            })
        }
        _ => Err(malformed("persistent id is not a torch storage reference")),
    }
}

fn reduce(callable: Value, args: Value) -> PResult<Value> {
    let Value::Global(g) = callable else {
        return Err(malformed(
            "REDUCE on something that is not an allowed callable",
        ));
    };
    let Value::Tuple(args) = args else {
        return Err(malformed("REDUCE arguments are not a tuple"));
    };
    match g {
        Global::OrderedDict => match args.as_slice() {
            [] => Ok(Value::Dict(Vec::new())),
            [Value::List(pairs)] => {
                let mut d = Vec::new();
                for p in pairs {
                    match p {
                        Value::Tuple(kv) | Value::List(kv) if kv.len() == 2 => {
                            d.push((kv[0].clone(), kv[1].clone()))
                        }
                        _ => return Err(malformed("OrderedDict items are not pairs")),
                    }
                }
                Ok(Value::Dict(d))
            }
            _ => Err(malformed("unexpected OrderedDict arguments")),
        },
        Global::RebuildTensorV2 => {
            // (storage, storage_offset, size, stride, requires_grad, backward_hooks[, metadata])
            if !(6..=7).contains(&args.len()) {
                return Err(malformed("_rebuild_tensor_v2 takes 6 or 7 arguments"));
            }
            let Value::Storage { dtype, key, numel } = &args[0] else {
                return Err(malformed("_rebuild_tensor_v2 without a storage"));
            };
            let shape = u64_list(&args[2], "tensor size")?;
            let stride = u64_list(&args[3], "tensor stride")?;
            if shape.len() != stride.len() {
                return Err(malformed("size and stride differ in length"));
            }
            Ok(Value::Tensor(TensorRef {
                storage: key.clone(),
                dtype: *dtype,
                storage_numel: *numel,
                offset: as_u64(&args[1], "storage offset")?,
                shape,
                stride,
            }))
        }
        Global::RebuildParameter => match args.into_iter().next() {
            Some(t @ Value::Tensor(_)) => Ok(t),
            _ => Err(malformed("_rebuild_parameter without a tensor")),
        },
        Global::Storage(_) => Err(PickleError::Forbidden(
            "a torch storage class called directly".into(),
        )),
    }
}

/// One stored entry of a zip archive (method 0: stored).
#[derive(Debug, Clone)]
struct ZipEntry {
    name: String,
    data: std::ops::Range<usize>,
}

fn le16(b: &[u8], at: usize) -> PResult<u64> {
    b.get(at..at + 2)
        .map(|s| u16::from_le_bytes(s.try_into().unwrap()) as u64)
        .ok_or_else(|| PickleError::Zip("record runs past the end".into()))
}
fn le32(b: &[u8], at: usize) -> PResult<u64> {
    b.get(at..at + 4)
        .map(|s| u32::from_le_bytes(s.try_into().unwrap()) as u64)
        .ok_or_else(|| PickleError::Zip("record runs past the end".into()))
}
fn le64(b: &[u8], at: usize) -> PResult<u64> {
    b.get(at..at + 8)
        .map(|s| u64::from_le_bytes(s.try_into().unwrap()))
        .ok_or_else(|| PickleError::Zip("record runs past the end".into()))
}

fn zerr(m: &str) -> PickleError {
    PickleError::Zip(m.into())
}

fn to_usize(v: u64) -> PResult<usize> {
    usize::try_from(v).map_err(|_| zerr("offset too large"))
}

/// Lists the entries of a zip archive (torch writes stored entries, zip64 for big files).
fn zip_entries(b: &[u8]) -> PResult<Vec<ZipEntry>> {
    // The end-of-central-directory record is in the last 22 + 65535 bytes.
    let lo = b.len().saturating_sub(22 + 0xffff);
    let eocd = (lo..b.len().saturating_sub(21))
        .rev()
        .find(|&i| b[i..i + 4] == [0x50, 0x4b, 0x05, 0x06])
        .ok_or(PickleError::NotTorch)?;
    let mut count = le16(b, eocd + 10)?;
    let mut cd_size = le32(b, eocd + 12)?;
    let mut cd_off = le32(b, eocd + 16)?;
    if count == 0xffff || cd_size == 0xffff_ffff || cd_off == 0xffff_ffff {
        // zip64: the locator sits just before the EOCD record.
        let loc = eocd
            .checked_sub(20)
            .ok_or_else(|| zerr("no zip64 locator"))?;
        if le32(b, loc)? != 0x0706_4b50 {
            return Err(zerr("no zip64 locator"));
        }
        let rec = to_usize(le64(b, loc + 8)?)?;
        if le32(b, rec)? != 0x0606_4b50 {
            return Err(zerr("bad zip64 end record"));
        }
        count = le64(b, rec + 32)?;
        cd_size = le64(b, rec + 40)?;
        cd_off = le64(b, rec + 48)?;
    }
    let cd_off = to_usize(cd_off)?;
    let cd_end = cd_off
        .checked_add(to_usize(cd_size)?)
        .filter(|&e| e <= b.len())
        .ok_or_else(|| zerr("central directory outside the file"))?;
    // Each central record is at least 46 bytes; a count beyond that is a lie.
    if count > (cd_end - cd_off) as u64 / 46 {
        return Err(zerr("entry count does not fit the central directory"));
    }
    let mut entries = Vec::with_capacity(count as usize);
    let mut p = cd_off;
    for _ in 0..count {
        if le32(b, p)? != 0x0201_4b50 {
            return Err(zerr("bad central directory record"));
        }
        let method = le16(b, p + 10)?;
        let mut csize = le32(b, p + 20)?;
        let mut usize_ = le32(b, p + 24)?;
        let name_len = to_usize(le16(b, p + 28)?)?;
        let extra_len = to_usize(le16(b, p + 30)?)?;
        let comment_len = to_usize(le16(b, p + 32)?)?;
        let mut local = le32(b, p + 42)?;
        let name_start = p + 46;
        let name = b
            .get(name_start..name_start + name_len)
            .ok_or_else(|| zerr("name runs past the end"))?;
        let name = String::from_utf8_lossy(name).into_owned();
        // zip64 extra field: the 0xffffffff fields, in order usize, csize, offset.
        let extra = b
            .get(name_start + name_len..name_start + name_len + extra_len)
            .ok_or_else(|| zerr("extra field runs past the end"))?;
        let mut e = 0;
        while e + 4 <= extra.len() {
            let id = le16(extra, e)?;
            let len = to_usize(le16(extra, e + 2)?)?;
            if id == 1 {
                let mut q = e + 4;
                let end = (e + 4 + len).min(extra.len());
                for field in [&mut usize_, &mut csize, &mut local] {
                    if *field == 0xffff_ffff && q + 8 <= end {
                        *field = le64(extra, q)?;
                        q += 8;
                    }
                }
            }
            e += 4 + len;
        }
        if method != 0 {
            return Err(zerr(&format!(
                "entry {name} is compressed (method {method}); torch.save writes stored entries"
            )));
        }
        if csize != usize_ {
            return Err(zerr("stored entry sizes differ"));
        }
        let local = to_usize(local)?;
        if le32(b, local)? != 0x0403_4b50 {
            return Err(zerr("bad local header"));
        }
        let data_start = local
            .checked_add(30)
            .and_then(|x| x.checked_add(to_usize(le16(b, local + 26).ok()?).ok()?))
            .and_then(|x| x.checked_add(to_usize(le16(b, local + 28).ok()?).ok()?))
            .ok_or_else(|| zerr("bad local header"))?;
        let data_end = data_start
            .checked_add(to_usize(csize)?)
            .filter(|&e| e <= b.len())
            .ok_or_else(|| zerr(&format!("entry {name} runs past the end of the file")))?;
        entries.push(ZipEntry {
            name,
            data: data_start..data_end,
        });
        p = name_start + name_len + extra_len + comment_len;
    }
    Ok(entries)
}

/// A parsed torch checkpoint: its tensors (flattened names) and small scalar facts.
#[derive(Debug, Clone)]
pub struct TorchCheckpoint {
    pub tensors: Vec<(String, TensorRef)>,
    /// e.g. `global_step`, which diffusers uses to tell SD2-base (875000) from SD2 768-v.
    pub global_step: Option<i64>,
    storages: HashMap<String, std::ops::Range<usize>>,
}

/// The torch pickle magic of the legacy (non-zip) format.
const LEGACY_MAGIC: [u8; 10] = [0x8a, 0x0a, 0x6c, 0xfc, 0x9c, 0x46, 0xf9, 0x20, 0x6a, 0xa8];

/// Reads the container and pickle of a torch checkpoint held in `bytes`; checks every tensor
/// lies inside its storage and every storage inside the file. Nothing is executed.
pub fn read_torch(bytes: &[u8]) -> PResult<TorchCheckpoint> {
    if bytes.len() >= 12 && bytes[0] == 0x80 && bytes[2..12] == LEGACY_MAGIC {
        return Err(PickleError::Legacy);
    }
    let entries = match zip_entries(bytes) {
        // A bare pickle (no torch container): parse it anyway, so a code-carrying one is named
        // as such rather than merely "not a checkpoint".
        Err(PickleError::NotTorch) if bytes.first() == Some(&0x80) => {
            parse(bytes)?;
            return Err(PickleError::NotTorch);
        }
        other => other?,
    };
    let pkl = entries
        .iter()
        .find(|e| e.name.ends_with("/data.pkl") && e.name.matches('/').count() == 1)
        .ok_or(PickleError::NotTorch)?;
    let root = pkl.name.trim_end_matches("data.pkl").to_string();
    if let Some(order) = entries
        .iter()
        .find(|e| e.name == format!("{root}byteorder"))
    {
        if &bytes[order.data.clone()] != b"little" {
            return Err(malformed("big-endian tensors are not supported"));
        }
    }
    let storages: HashMap<String, std::ops::Range<usize>> = entries
        .iter()
        .filter_map(|e| {
            let key = e.name.strip_prefix(&format!("{root}data/"))?;
            Some((key.to_string(), e.data.clone()))
        })
        .collect();
    let value = parse(&bytes[pkl.data.clone()])?;

    let Value::Dict(top) = &value else {
        return Err(malformed("the top-level object is not a dict"));
    };
    let global_step = top.iter().find_map(|(k, v)| match (k, v) {
        (Value::Str(k), Value::Int(i)) if k == "global_step" => Some(*i),
        _ => None,
    });
    // Lightning checkpoints keep the weights under "state_dict"; plain ones are the dict itself.
    let dict = top
        .iter()
        .find_map(|(k, v)| match (k, v) {
            (Value::Str(k), d @ Value::Dict(_)) if k == "state_dict" => Some(d),
            _ => None,
        })
        .unwrap_or(&value);
    let mut tensors = Vec::new();
    flatten("", dict, &mut tensors, 0)?;
    if tensors.is_empty() {
        return Err(PickleError::NoTensors);
    }
    let mut seen = std::collections::HashSet::new();
    for (name, t) in &tensors {
        if !seen.insert(name.as_str()) {
            return Err(PickleError::BadTensor(name.clone(), "named twice".into()));
        }
        check_tensor(name, t, &storages)?;
    }
    Ok(TorchCheckpoint {
        tensors,
        global_step,
        storages,
    })
}

/// Nested dicts become dotted names (`string_to_param.*` for A1111 `.pt` embeddings).
fn flatten(
    prefix: &str,
    v: &Value,
    out: &mut Vec<(String, TensorRef)>,
    depth: usize,
) -> PResult<()> {
    if depth > 32 {
        return Err(malformed("dicts nested too deep"));
    }
    let Value::Dict(items) = v else { return Ok(()) };
    for (k, v) in items {
        let key = match k {
            Value::Str(s) => s.clone(),
            Value::Int(i) => i.to_string(),
            _ => continue,
        };
        let name = if prefix.is_empty() {
            key
        } else {
            format!("{prefix}.{key}")
        };
        match v {
            Value::Tensor(t) => out.push((name, t.clone())),
            Value::Dict(_) => flatten(&name, v, out, depth + 1)?,
            _ => {}
        }
    }
    Ok(())
}

fn dtype_size(d: Dtype) -> u64 {
    (d.bitsize() / 8).max(1) as u64
}

fn check_tensor(
    name: &str,
    t: &TensorRef,
    storages: &HashMap<String, std::ops::Range<usize>>,
) -> PResult<()> {
    let bad = |m: String| PickleError::BadTensor(name.to_string(), m);
    let data = storages
        .get(&t.storage)
        .ok_or_else(|| bad(format!("its storage `{}` is not in the archive", t.storage)))?;
    let avail = (data.end - data.start) as u64 / dtype_size(t.dtype);
    if t.storage_numel > avail {
        return Err(bad(format!(
            "its storage claims {} elements but holds {avail}",
            t.storage_numel
        )));
    }
    let numel = t
        .shape
        .iter()
        .try_fold(1u64, |a, &d| a.checked_mul(d))
        .ok_or_else(|| bad("its size overflows".into()))?;
    if numel == 0 {
        return Ok(());
    }
    // Highest element the view touches: offset + sum((size - 1) * stride).
    let last = t
        .shape
        .iter()
        .zip(&t.stride)
        .try_fold(t.offset, |a, (&d, &s)| {
            a.checked_add((d - 1).checked_mul(s)?)
        })
        .ok_or_else(|| bad("its extent overflows".into()))?;
    if last >= t.storage_numel {
        return Err(bad(format!(
            "it reaches element {last} of a storage of {}",
            t.storage_numel
        )));
    }
    numel
        .checked_mul(dtype_size(t.dtype))
        .ok_or_else(|| bad("its byte size overflows".into()))?;
    Ok(())
}

impl TorchCheckpoint {
    /// The bytes of tensor `t` in row-major order (a copy; views and strides resolved).
    fn tensor_bytes(&self, file: &[u8], t: &TensorRef, out: &mut Vec<u8>) {
        let es = dtype_size(t.dtype) as usize;
        let data = &file[self.storages[&t.storage].clone()];
        let numel: u64 = t.shape.iter().product();
        out.clear();
        if numel == 0 {
            return;
        }
        let contiguous = {
            let mut expect = 1u64;
            let mut ok = true;
            for (&d, &s) in t.shape.iter().zip(&t.stride).rev() {
                if d != 1 && s != expect {
                    ok = false;
                }
                expect *= d;
            }
            ok
        };
        if contiguous {
            let start = t.offset as usize * es;
            out.extend_from_slice(&data[start..start + numel as usize * es]);
            return;
        }
        out.reserve(numel as usize * es);
        let mut index = vec![0u64; t.shape.len()];
        for _ in 0..numel {
            let e = t.offset + index.iter().zip(&t.stride).map(|(i, s)| i * s).sum::<u64>();
            let s = e as usize * es;
            out.extend_from_slice(&data[s..s + es]);
            for k in (0..index.len()).rev() {
                index[k] += 1;
                if index[k] < t.shape[k] {
                    break;
                }
                index[k] = 0;
            }
        }
    }
}

/// Parses a torch checkpoint held in memory and reports how many tensors it holds (the fuzz
/// target; also what a model list may call to describe a `.ckpt` without converting it).
pub fn inspect_bytes(bytes: &[u8]) -> PResult<usize> {
    Ok(read_torch(bytes)?.tensors.len())
}

/// Reads every tensor's bytes out of a torch checkpoint in memory, as the converter does, and
/// returns their total size (the fuzz targets use this to reach the strided copy too).
pub fn tensor_bytes_total(bytes: &[u8]) -> PResult<u64> {
    let ckpt = read_torch(bytes)?;
    let mut buf = Vec::new();
    let mut total = 0u64;
    for (_, t) in &ckpt.tensors {
        ckpt.tensor_bytes(bytes, t, &mut buf);
        total += buf.len() as u64;
    }
    Ok(total)
}

/// What [`convert_to_safetensors`] wrote.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Converted {
    pub path: PathBuf,
    pub tensors: usize,
    pub bytes: u64,
}

/// Converts a torch pickle checkpoint to `.safetensors` without executing it: tensor names kept
/// (LDM names stay LDM names), `global_step` kept in the metadata. The output is written to a
/// temporary file beside `dst`, validated, and renamed into place, so `dst` never exists half
/// written. An existing `dst` is replaced.
pub fn convert_to_safetensors(src: &Path, dst: &Path) -> Result<Converted> {
    let file = std::fs::File::open(src).map_err(|e| EngineError::from_io(src, e))?;
    // SAFETY: read-only map of a file we do not write; see weights.rs for the shared contract.
    let map = unsafe { memmap2::Mmap::map(&file) }.map_err(|e| EngineError::Io {
        path: src.to_path_buf(),
        source: e,
    })?;
    let ckpt = read_torch(&map).map_err(|e| e.at(src))?;

    let mut tensors: Vec<&(String, TensorRef)> = ckpt.tensors.iter().collect();
    tensors.sort_by(|a, b| a.0.cmp(&b.0));
    let mut header = serde_json::Map::new();
    let mut meta = serde_json::Map::new();
    meta.insert("format".into(), "pt".into());
    if let Some(step) = ckpt.global_step {
        meta.insert("global_step".into(), step.to_string().into());
    }
    header.insert("__metadata__".into(), serde_json::Value::Object(meta));
    let mut offset = 0u64;
    for (name, t) in &tensors {
        let bytes = t.shape.iter().product::<u64>() * dtype_size(t.dtype);
        header.insert(
            name.clone(),
            serde_json::json!({
                "dtype": t.dtype,
                "shape": t.shape,
                "data_offsets": [offset, offset + bytes],
            }),
        );
        offset += bytes;
    }
    let mut json = serde_json::Value::Object(header).to_string().into_bytes();
    // Pad so the data starts 8-byte aligned, as the safetensors writer does.
    while !(json.len() + 8).is_multiple_of(8) {
        json.push(b' ');
    }

    let dir = dst
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let tmp = dir.join(format!(
        ".{}.partial-{}",
        dst.file_name()
            .and_then(|n| n.to_str())
            .unwrap_or("converted"),
        std::process::id()
    ));
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |e: std::io::Error| EngineError::Io { path, source: e }
    };
    let write = || -> Result<u64> {
        let f = std::fs::File::create(&tmp).map_err(io(&tmp))?;
        let mut w = std::io::BufWriter::new(f);
        w.write_all(&(json.len() as u64).to_le_bytes())
            .map_err(io(&tmp))?;
        w.write_all(&json).map_err(io(&tmp))?;
        let mut buf = Vec::new();
        for (_, t) in &tensors {
            ckpt.tensor_bytes(&map, t, &mut buf);
            w.write_all(&buf).map_err(io(&tmp))?;
        }
        let f = w.into_inner().map_err(|e| io(&tmp)(e.into_error()))?;
        f.sync_all().map_err(io(&tmp))?;
        let len = f.metadata().map_err(io(&tmp))?.len();
        drop(f);
        // Read back what we wrote before it gets its final name.
        let check = crate::checkpoint::map_file(&tmp)?;
        crate::checkpoint::validate(&check).map_err(|e| e.at(&tmp))?;
        Ok(len)
    };
    match write() {
        Ok(bytes) => {
            std::fs::rename(&tmp, dst).map_err(io(dst))?;
            Ok(Converted {
                path: dst.to_path_buf(),
                tensors: tensors.len(),
                bytes,
            })
        }
        Err(e) => {
            let _ = std::fs::remove_file(&tmp);
            Err(e)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refuses_code_globals_without_running_them() {
        // protocol 2: c os\nsystem\n (S'echo pwned' tR.
        let evil = b"\x80\x02cos\nsystem\nq\x00X\x0b\x00\x00\x00echo pwnedq\x01\x85q\x02Rq\x03.";
        assert_eq!(parse(evil), Err(PickleError::Forbidden("os.system".into())));
        let stack_global = b"\x80\x04\x8c\x08builtins\x8c\x04eval\x93.";
        assert_eq!(
            parse(stack_global),
            Err(PickleError::Forbidden("builtins.eval".into()))
        );
        assert!(matches!(
            parse(b"\x80\x02(i\n"),
            Err(PickleError::ForbiddenOpcode(..))
        ));
    }

    #[test]
    fn plain_values_parse() {
        // pickle.dumps({"a": [1, 2.5, None, True]}, protocol=2)
        let p = b"\x80\x02}q\x00X\x01\x00\x00\x00aq\x01]q\x02(K\x01G@\x04\x00\x00\x00\x00\x00\x00N\x88es.";
        assert_eq!(
            parse(p).unwrap(),
            Value::Dict(vec![(
                Value::Str("a".into()),
                Value::List(vec![
                    Value::Int(1),
                    Value::Float(2.5),
                    Value::None,
                    Value::Bool(true)
                ])
            )])
        );
    }

    #[test]
    fn malformed_streams_are_errors() {
        for bad in [
            &b""[..],
            b"\x80",
            b"X\xff\xff\xff\xff",
            b"h\x05.",
            b"t.",
            b"s.",
            b"\xff",
        ] {
            assert!(parse(bad).is_err(), "{bad:?}");
        }
    }
}
