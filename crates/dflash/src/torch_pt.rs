//! Just enough of PyTorch's `torch.save` format to read a MiMo drafter's `mask_embedding.pt`
//! (research/dflash.md §2.3, §6.3: a dict `{mask_token_id: int, embedding: bf16[H]}`).
//!
//! A `.pt` file (PyTorch ≥ 1.6) is a zip archive of *stored* (uncompressed) entries:
//! `<archive>/data.pkl` (a pickle of the object, tensors as `torch._utils._rebuild_tensor_v2`
//! calls over persistent-id storages), `<archive>/data/<key>` (each storage's raw
//! little-endian bytes), `<archive>/byteorder`, `<archive>/version`. This module reads the
//! zip's central directory (zip64 included), runs a pickle machine over the opcodes
//! `torch.save` emits for plain containers, ints, floats, strings and tensors (protocols 2–5),
//! and materializes tensors of dtype bf16, f16 or f32 as f32 values in logical (row-major)
//! order, honoring storage offset and strides. Anything else — a compressed entry, an unknown
//! opcode, a global other than the tensor / storage / `OrderedDict` constructors, another dtype
//! — is a [`PtError`] that says what was found, never a panic; no code from the file is run.

use std::collections::HashMap;
use std::path::Path;

/// Why a `.pt` file could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct PtError(pub String);

fn err<T>(msg: impl Into<String>) -> Result<T, PtError> {
    Err(PtError(msg.into()))
}

/// A value the pickle machine builds.
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
    /// Keys and values in insertion order.
    Dict(Vec<(Value, Value)>),
    /// `module.name` of a `GLOBAL` (only constructors this module knows are ever applied).
    Global(String),
    /// A persistent-id storage: element type (`torch.BFloat16Storage` → `BFloat16`), archive
    /// key, number of elements.
    Storage {
        dtype: String,
        key: String,
        numel: usize,
    },
    Tensor(TensorRef),
}

/// A tensor as the pickle describes it (its data stays in the archive).
#[derive(Debug, Clone, PartialEq)]
pub struct TensorRef {
    pub dtype: String,
    pub key: String,
    pub storage_numel: usize,
    pub offset: usize,
    pub shape: Vec<usize>,
    pub stride: Vec<usize>,
}

impl Value {
    fn kind(&self) -> &'static str {
        match self {
            Value::None => "None",
            Value::Bool(_) => "bool",
            Value::Int(_) => "int",
            Value::Float(_) => "float",
            Value::Str(_) => "str",
            Value::Bytes(_) => "bytes",
            Value::Tuple(_) => "tuple",
            Value::List(_) => "list",
            Value::Dict(_) => "dict",
            Value::Global(_) => "global",
            Value::Storage { .. } => "storage",
            Value::Tensor(_) => "tensor",
        }
    }

    /// The entry of a dict with string key `key`.
    pub fn get(&self, key: &str) -> Option<&Value> {
        match self {
            Value::Dict(items) => items
                .iter()
                .find(|(k, _)| matches!(k, Value::Str(s) if s == key))
                .map(|(_, v)| v),
            _ => None,
        }
    }
}

// ------------------------------------------------------------------------------------------
// Zip (stored entries only)
// ------------------------------------------------------------------------------------------

struct Entry {
    name: String,
    method: u16,
    compressed: u64,
    size: u64,
    local_offset: u64,
}

fn u16_at(b: &[u8], at: usize) -> Option<u16> {
    b.get(at..at + 2).map(|s| u16::from_le_bytes([s[0], s[1]]))
}

fn u32_at(b: &[u8], at: usize) -> Option<u32> {
    b.get(at..at + 4)
        .map(|s| u32::from_le_bytes([s[0], s[1], s[2], s[3]]))
}

fn u64_at(b: &[u8], at: usize) -> Option<u64> {
    b.get(at..at + 8).map(|s| {
        let mut a = [0u8; 8];
        a.copy_from_slice(s);
        u64::from_le_bytes(a)
    })
}

/// The archive's entries, from its central directory.
fn zip_entries(b: &[u8]) -> Result<Vec<Entry>, PtError> {
    const EOCD: u32 = 0x0605_4b50;
    const EOCD64_LOCATOR: u32 = 0x0706_4b50;
    const EOCD64: u32 = 0x0606_4b50;
    const CENTRAL: u32 = 0x0201_4b50;
    let trunc = || PtError("not a zip archive (truncated or corrupt central directory)".into());
    // The end-of-central-directory record: 22 bytes + a comment of at most 65535.
    let lowest = b.len().saturating_sub(22 + 65_535);
    let eocd = (lowest..=b.len().saturating_sub(22))
        .rev()
        .find(|&i| u32_at(b, i) == Some(EOCD))
        .ok_or_else(|| {
            PtError("not a zip archive (no end-of-central-directory record): torch.save writes zip files since PyTorch 1.6; re-save it with a recent PyTorch".into())
        })?;
    let mut count = u64::from(u16_at(b, eocd + 10).ok_or_else(trunc)?);
    let mut cd = u64::from(u32_at(b, eocd + 16).ok_or_else(trunc)?);
    if count == 0xFFFF || cd == 0xFFFF_FFFF {
        // zip64: the locator sits right before the classic record.
        let loc = eocd.checked_sub(20).ok_or_else(trunc)?;
        if u32_at(b, loc) != Some(EOCD64_LOCATOR) {
            return Err(trunc());
        }
        let rec = usize::try_from(u64_at(b, loc + 8).ok_or_else(trunc)?).map_err(|_| trunc())?;
        if u32_at(b, rec) != Some(EOCD64) {
            return Err(trunc());
        }
        count = u64_at(b, rec + 32).ok_or_else(trunc)?;
        cd = u64_at(b, rec + 48).ok_or_else(trunc)?;
    }
    let mut at = usize::try_from(cd).map_err(|_| trunc())?;
    let mut out = Vec::new();
    for _ in 0..count {
        if u32_at(b, at) != Some(CENTRAL) {
            return Err(trunc());
        }
        let method = u16_at(b, at + 10).ok_or_else(trunc)?;
        let mut compressed = u64::from(u32_at(b, at + 20).ok_or_else(trunc)?);
        let mut size = u64::from(u32_at(b, at + 24).ok_or_else(trunc)?);
        let name_len = usize::from(u16_at(b, at + 28).ok_or_else(trunc)?);
        let extra_len = usize::from(u16_at(b, at + 30).ok_or_else(trunc)?);
        let comment_len = usize::from(u16_at(b, at + 32).ok_or_else(trunc)?);
        let mut local_offset = u64::from(u32_at(b, at + 42).ok_or_else(trunc)?);
        let name = b.get(at + 46..at + 46 + name_len).ok_or_else(trunc)?;
        let name = String::from_utf8_lossy(name).into_owned();
        let extra = b
            .get(at + 46 + name_len..at + 46 + name_len + extra_len)
            .ok_or_else(trunc)?;
        // zip64 extended information: the 0xFFFFFFFF fields, in order, as u64.
        let mut e = 0;
        while e + 4 <= extra.len() {
            let tag = u16_at(extra, e).ok_or_else(trunc)?;
            let len = usize::from(u16_at(extra, e + 2).ok_or_else(trunc)?);
            if tag == 1 {
                let mut f = e + 4;
                for field in [&mut size, &mut compressed, &mut local_offset] {
                    if *field == 0xFFFF_FFFF {
                        *field = u64_at(extra, f).ok_or_else(trunc)?;
                        f += 8;
                    }
                }
            }
            e += 4 + len;
        }
        out.push(Entry {
            name,
            method,
            compressed,
            size,
            local_offset,
        });
        at += 46 + name_len + extra_len + comment_len;
    }
    Ok(out)
}

/// The bytes of a stored entry.
fn entry_data<'a>(b: &'a [u8], e: &Entry) -> Result<&'a [u8], PtError> {
    const LOCAL: u32 = 0x0403_4b50;
    if e.method != 0 {
        return err(format!(
            "zip entry {} is compressed (method {}); torch.save stores entries uncompressed",
            e.name, e.method
        ));
    }
    if e.compressed != e.size {
        return err(format!("zip entry {}: inconsistent sizes", e.name));
    }
    let bad = || PtError(format!("zip entry {}: truncated", e.name));
    let at = usize::try_from(e.local_offset).map_err(|_| bad())?;
    if u32_at(b, at) != Some(LOCAL) {
        return Err(bad());
    }
    let n = usize::from(u16_at(b, at + 26).ok_or_else(bad)?);
    let x = usize::from(u16_at(b, at + 28).ok_or_else(bad)?);
    let start = at + 30 + n + x;
    let len = usize::try_from(e.size).map_err(|_| bad())?;
    b.get(start..start.checked_add(len).ok_or_else(bad)?)
        .ok_or_else(bad)
}

// ------------------------------------------------------------------------------------------
// Pickle
// ------------------------------------------------------------------------------------------

enum Slot {
    Mark,
    V(Value),
}

struct Machine<'a> {
    b: &'a [u8],
    at: usize,
    stack: Vec<Slot>,
    memo: HashMap<u64, Value>,
}

impl<'a> Machine<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], PtError> {
        let s = self
            .b
            .get(self.at..self.at.saturating_add(n))
            .ok_or_else(|| PtError(format!("pickle truncated at byte {}", self.at)))?;
        self.at += n;
        Ok(s)
    }

    fn u8(&mut self) -> Result<u8, PtError> {
        Ok(self.take(1)?[0])
    }

    fn u32(&mut self) -> Result<u32, PtError> {
        let s = self.take(4)?;
        Ok(u32::from_le_bytes([s[0], s[1], s[2], s[3]]))
    }

    fn u64(&mut self) -> Result<u64, PtError> {
        let s = self.take(8)?;
        let mut a = [0u8; 8];
        a.copy_from_slice(s);
        Ok(u64::from_le_bytes(a))
    }

    fn line(&mut self) -> Result<String, PtError> {
        let rest = &self.b[self.at.min(self.b.len())..];
        let n = rest
            .iter()
            .position(|&c| c == b'\n')
            .ok_or_else(|| PtError("pickle: unterminated text argument".into()))?;
        let s = String::from_utf8_lossy(&rest[..n]).into_owned();
        self.at += n + 1;
        Ok(s)
    }

    fn text(&mut self, n: usize) -> Result<Value, PtError> {
        let s = self.take(n)?;
        Ok(Value::Str(
            std::str::from_utf8(s)
                .map_err(|_| PtError("pickle: a string is not UTF-8".into()))?
                .to_string(),
        ))
    }

    fn push(&mut self, v: Value) {
        self.stack.push(Slot::V(v));
    }

    fn pop(&mut self) -> Result<Value, PtError> {
        match self.stack.pop() {
            Some(Slot::V(v)) => Ok(v),
            Some(Slot::Mark) => err("pickle: a value expected, found a mark"),
            None => err("pickle: stack underflow"),
        }
    }

    fn top(&mut self) -> Result<&mut Value, PtError> {
        match self.stack.last_mut() {
            Some(Slot::V(v)) => Ok(v),
            _ => err("pickle: a value expected on the stack"),
        }
    }

    /// The values above the topmost mark (the mark is removed).
    fn pop_mark(&mut self) -> Result<Vec<Value>, PtError> {
        let m = self
            .stack
            .iter()
            .rposition(|s| matches!(s, Slot::Mark))
            .ok_or_else(|| PtError("pickle: no mark on the stack".into()))?;
        let items = self.stack.split_off(m + 1);
        self.stack.pop();
        Ok(items
            .into_iter()
            .map(|s| match s {
                Slot::V(v) => v,
                Slot::Mark => unreachable!("rposition found the topmost mark"),
            })
            .collect())
    }

    fn memo_put(&mut self, key: u64) -> Result<(), PtError> {
        let v = self.top()?.clone();
        self.memo.insert(key, v);
        Ok(())
    }

    fn memo_get(&mut self, key: u64) -> Result<(), PtError> {
        let v = self
            .memo
            .get(&key)
            .cloned()
            .ok_or_else(|| PtError(format!("pickle: memo {key} is unset")))?;
        self.push(v);
        Ok(())
    }

    fn set_items(&mut self, items: Vec<Value>) -> Result<(), PtError> {
        if !items.len().is_multiple_of(2) {
            return err("pickle: SETITEMS with an odd number of values");
        }
        let Value::Dict(d) = self.top()? else {
            return err("pickle: SETITEM(S) on a non-dict");
        };
        let mut it = items.into_iter();
        while let (Some(k), Some(v)) = (it.next(), it.next()) {
            d.retain(|(old, _)| *old != k);
            d.push((k, v));
        }
        Ok(())
    }

    fn run(mut self) -> Result<Value, PtError> {
        loop {
            let at = self.at;
            let op = self.u8()?;
            match op {
                0x80 => {
                    let p = self.u8()?;
                    if p > 5 {
                        return err(format!("pickle protocol {p} (at most 5 is known)"));
                    }
                }
                0x95 => {
                    self.u64()?; // FRAME: a length hint
                }
                b'.' => return self.pop(), // STOP
                b'(' => self.stack.push(Slot::Mark),
                b'}' => self.push(Value::Dict(Vec::new())),
                b']' => self.push(Value::List(Vec::new())),
                b')' => self.push(Value::Tuple(Vec::new())),
                b'N' => self.push(Value::None),
                0x88 => self.push(Value::Bool(true)),
                0x89 => self.push(Value::Bool(false)),
                b'J' => {
                    let v = self.u32()? as i32;
                    self.push(Value::Int(i64::from(v)))
                }
                b'K' => {
                    let v = self.u8()?;
                    self.push(Value::Int(i64::from(v)))
                }
                b'M' => {
                    let s = self.take(2)?;
                    self.push(Value::Int(i64::from(u16::from_le_bytes([s[0], s[1]]))))
                }
                0x8a => {
                    // LONG1: little-endian two's complement of n ≤ 8 bytes.
                    let n = usize::from(self.u8()?);
                    if n > 8 {
                        return err(format!("pickle: a {n}-byte integer"));
                    }
                    let s = self.take(n)?;
                    let mut a = [0u8; 8];
                    a[..n].copy_from_slice(s);
                    if n > 0 && s[n - 1] & 0x80 != 0 {
                        a[n..].fill(0xFF);
                    }
                    self.push(Value::Int(i64::from_le_bytes(a)))
                }
                b'G' => {
                    let s = self.take(8)?;
                    let mut a = [0u8; 8];
                    a.copy_from_slice(s);
                    self.push(Value::Float(f64::from_be_bytes(a)))
                }
                b'X' => {
                    let n = self.u32()? as usize;
                    let v = self.text(n)?;
                    self.push(v)
                }
                0x8c => {
                    let n = usize::from(self.u8()?);
                    let v = self.text(n)?;
                    self.push(v)
                }
                0x8d => {
                    let n = usize::try_from(self.u64()?)
                        .map_err(|_| PtError("pickle: string too long".into()))?;
                    let v = self.text(n)?;
                    self.push(v)
                }
                b'C' => {
                    let n = usize::from(self.u8()?);
                    let v = self.take(n)?.to_vec();
                    self.push(Value::Bytes(v))
                }
                b'B' => {
                    let n = self.u32()? as usize;
                    let v = self.take(n)?.to_vec();
                    self.push(Value::Bytes(v))
                }
                b'q' => {
                    let k = self.u8()?;
                    self.memo_put(u64::from(k))?
                }
                b'r' => {
                    let k = self.u32()?;
                    self.memo_put(u64::from(k))?
                }
                0x94 => {
                    let k = self.memo.len() as u64;
                    self.memo_put(k)?
                }
                b'h' => {
                    let k = self.u8()?;
                    self.memo_get(u64::from(k))?
                }
                b'j' => {
                    let k = self.u32()?;
                    self.memo_get(u64::from(k))?
                }
                b'c' => {
                    let module = self.line()?;
                    let name = self.line()?;
                    self.push(Value::Global(format!("{module}.{name}")))
                }
                0x93 => {
                    let name = self.pop()?;
                    let module = self.pop()?;
                    match (module, name) {
                        (Value::Str(m), Value::Str(n)) => {
                            self.push(Value::Global(format!("{m}.{n}")))
                        }
                        _ => return err("pickle: STACK_GLOBAL of non-strings"),
                    }
                }
                b't' => {
                    let items = self.pop_mark()?;
                    self.push(Value::Tuple(items))
                }
                0x85..=0x87 => {
                    let n = usize::from(op - 0x84);
                    let mut items = Vec::with_capacity(n);
                    for _ in 0..n {
                        items.push(self.pop()?);
                    }
                    items.reverse();
                    self.push(Value::Tuple(items))
                }
                b'l' => {
                    let items = self.pop_mark()?;
                    self.push(Value::List(items))
                }
                b'a' => {
                    let v = self.pop()?;
                    match self.top()? {
                        Value::List(l) => l.push(v),
                        _ => return err("pickle: APPEND to a non-list"),
                    }
                }
                b'e' => {
                    let items = self.pop_mark()?;
                    match self.top()? {
                        Value::List(l) => l.extend(items),
                        _ => return err("pickle: APPENDS to a non-list"),
                    }
                }
                b'd' => {
                    let items = self.pop_mark()?;
                    self.push(Value::Dict(Vec::new()));
                    self.set_items(items)?
                }
                b's' => {
                    let v = self.pop()?;
                    let k = self.pop()?;
                    self.set_items(vec![k, v])?
                }
                b'u' => {
                    let items = self.pop_mark()?;
                    self.set_items(items)?
                }
                b'Q' => {
                    let pid = self.pop()?;
                    let v = persistent_load(pid)?;
                    self.push(v)
                }
                b'R' => {
                    let args = self.pop()?;
                    let f = self.pop()?;
                    let v = reduce(f, args)?;
                    self.push(v)
                }
                b'b' => {
                    // BUILD: state for an object; tensors' and dicts' states are not used here.
                    self.pop()?;
                    self.top()?;
                }
                _ => {
                    return err(format!(
                        "pickle opcode 0x{op:02x} at byte {at} is not supported by this reader"
                    ))
                }
            }
        }
    }
}

/// `('storage', torch.<Dtype>Storage, key, location, numel)`.
fn persistent_load(pid: Value) -> Result<Value, PtError> {
    let Value::Tuple(t) = pid else {
        return err(format!("persistent id is a {}, not a tuple", pid.kind()));
    };
    match t.as_slice() {
        [Value::Str(tag), Value::Global(ty), Value::Str(key), _location, Value::Int(numel)]
            if tag == "storage" =>
        {
            let dtype = ty
                .strip_prefix("torch.")
                .and_then(|s| s.strip_suffix("Storage"))
                .ok_or_else(|| PtError(format!("unknown storage type {ty}")))?;
            Ok(Value::Storage {
                dtype: dtype.to_string(),
                key: key.clone(),
                numel: usize::try_from(*numel)
                    .map_err(|_| PtError(format!("storage of {numel} elements")))?,
            })
        }
        _ => err("a persistent id that is not a torch storage"),
    }
}

fn usizes(v: &Value, what: &str) -> Result<Vec<usize>, PtError> {
    match v {
        Value::Tuple(items) | Value::List(items) => items
            .iter()
            .map(|x| match x {
                Value::Int(i) => usize::try_from(*i).map_err(|_| PtError(format!("{what}: {i}"))),
                _ => err(format!("{what}: a {} entry", x.kind())),
            })
            .collect(),
        _ => err(format!("{what}: a {}, not a tuple", v.kind())),
    }
}

/// Applies one of the known constructors.
fn reduce(f: Value, args: Value) -> Result<Value, PtError> {
    let Value::Global(name) = &f else {
        return err(format!("REDUCE of a {}", f.kind()));
    };
    let Value::Tuple(a) = args else {
        return err(format!("{name}: arguments are a {}", args.kind()));
    };
    match name.as_str() {
        "torch._utils._rebuild_tensor_v2" | "torch._utils._rebuild_tensor" => {
            let (Some(Value::Storage { dtype, key, numel }), Some(Value::Int(offset))) =
                (a.first(), a.get(1))
            else {
                return err(format!(
                    "{name}: expected (storage, offset, size, stride, …)"
                ));
            };
            let shape = usizes(a.get(2).unwrap_or(&Value::None), "tensor size")?;
            let stride = usizes(a.get(3).unwrap_or(&Value::None), "tensor stride")?;
            if shape.len() != stride.len() {
                return err("tensor size and stride differ in length");
            }
            Ok(Value::Tensor(TensorRef {
                dtype: dtype.clone(),
                key: key.clone(),
                storage_numel: *numel,
                offset: usize::try_from(*offset)
                    .map_err(|_| PtError(format!("tensor offset {offset}")))?,
                shape,
                stride,
            }))
        }
        "collections.OrderedDict" if a.is_empty() => Ok(Value::Dict(Vec::new())),
        _ => err(format!(
            "the pickle calls {name}, which this reader does not run (only tensors, storages and \
             plain containers are read)"
        )),
    }
}

/// A parsed `.pt` archive: the unpickled object and the storages' bytes.
pub struct PtFile {
    bytes: Vec<u8>,
    entries: Vec<Entry>,
    prefix: String,
    pub object: Value,
}

impl PtFile {
    /// Reads and unpickles `path`.
    pub fn open(path: &Path) -> Result<PtFile, PtError> {
        let bytes =
            std::fs::read(path).map_err(|e| PtError(format!("cannot read the file: {e}")))?;
        PtFile::from_bytes(bytes)
    }

    pub fn from_bytes(bytes: Vec<u8>) -> Result<PtFile, PtError> {
        let entries = zip_entries(&bytes)?;
        let pkl = entries
            .iter()
            .find(|e| e.name == "data.pkl" || e.name.ends_with("/data.pkl"))
            .ok_or_else(|| PtError("the archive has no data.pkl".into()))?;
        let prefix = pkl.name[..pkl.name.len() - "data.pkl".len()].to_string();
        if let Some(bo) = entries
            .iter()
            .find(|e| e.name == format!("{prefix}byteorder"))
        {
            let order = entry_data(&bytes, bo)?;
            if order != b"little" {
                return err(format!(
                    "byte order {:?} (only little-endian archives are read)",
                    String::from_utf8_lossy(order)
                ));
            }
        }
        let object = Machine {
            b: entry_data(&bytes, pkl)?,
            at: 0,
            stack: Vec::new(),
            memo: HashMap::new(),
        }
        .run()?;
        Ok(PtFile {
            bytes,
            entries,
            prefix,
            object,
        })
    }

    /// The values of `t` as f32, in row-major order of its shape (bf16, f16 and f32 tensors).
    pub fn tensor_f32(&self, t: &TensorRef) -> Result<Vec<f32>, PtError> {
        let width = match t.dtype.as_str() {
            "BFloat16" | "Half" => 2,
            "Float" => 4,
            other => return err(format!("tensor dtype {other} (bf16, f16 and f32 are read)")),
        };
        let name = format!("{}data/{}", self.prefix, t.key);
        let e = self
            .entries
            .iter()
            .find(|e| e.name == name)
            .ok_or_else(|| PtError(format!("the archive has no storage {name}")))?;
        let raw = entry_data(&self.bytes, e)?;
        if raw.len() != t.storage_numel * width {
            return err(format!(
                "storage {name} holds {} bytes, not {} elements of {width} bytes",
                raw.len(),
                t.storage_numel
            ));
        }
        let n: usize = t.shape.iter().product();
        let mut out = Vec::with_capacity(n);
        let mut idx = vec![0usize; t.shape.len()];
        for _ in 0..n {
            let at = t.offset + idx.iter().zip(&t.stride).map(|(i, s)| i * s).sum::<usize>();
            if at >= t.storage_numel {
                return err(format!(
                    "tensor element at storage index {at} is outside its storage of {} elements",
                    t.storage_numel
                ));
            }
            let b = &raw[at * width..(at + 1) * width];
            out.push(match t.dtype.as_str() {
                "BFloat16" => f32::from_bits(u32::from(u16::from_le_bytes([b[0], b[1]])) << 16),
                "Half" => half_to_f32(u16::from_le_bytes([b[0], b[1]])),
                _ => f32::from_le_bytes([b[0], b[1], b[2], b[3]]),
            });
            for d in (0..idx.len()).rev() {
                idx[d] += 1;
                if idx[d] < t.shape[d] {
                    break;
                }
                idx[d] = 0;
            }
        }
        Ok(out)
    }
}

/// IEEE binary16 → f32 (exact).
fn half_to_f32(h: u16) -> f32 {
    let sign = u32::from(h >> 15) << 31;
    let exp = u32::from((h >> 10) & 0x1F);
    let man = u32::from(h & 0x3FF);
    let bits = match (exp, man) {
        (0, 0) => sign,
        (0, m) => {
            // Subnormal: m · 2^-24.
            let v = m as f32 * f32::from_bits(0x3380_0000);
            return if sign != 0 { -v } else { v };
        }
        (0x1F, 0) => sign | 0x7F80_0000,
        (0x1F, m) => sign | 0x7FC0_0000 | (m << 13),
        (e, m) => sign | ((e + 112) << 23) | (m << 13),
    };
    f32::from_bits(bits)
}

/// A MiMo `mask_embedding.pt`: `{mask_token_id: int, embedding: [H] or [1, H]}` → `(mask_token_id,
/// embedding)`.
pub fn read_mask_embedding(path: &Path) -> Result<(Option<i64>, Vec<f32>), PtError> {
    let f = PtFile::open(path)?;
    let obj = &f.object;
    match obj {
        Value::Dict(_) => {}
        // A bare tensor (no id): accepted, the config's mask id applies.
        Value::Tensor(t) => return Ok((None, check_vector(&f, t)?)),
        other => {
            return err(format!(
                "the pickled object is a {}, not a dict {{mask_token_id, embedding}}",
                other.kind()
            ))
        }
    }
    let id = match obj.get("mask_token_id") {
        None => None,
        Some(Value::Int(i)) => Some(*i),
        Some(v) => return err(format!("mask_token_id is a {}, not an int", v.kind())),
    };
    let t = match obj.get("embedding") {
        Some(Value::Tensor(t)) => t,
        Some(v) => return err(format!("embedding is a {}, not a tensor", v.kind())),
        None => return err("the dict has no `embedding` entry"),
    };
    Ok((id, check_vector(&f, t)?))
}

fn check_vector(f: &PtFile, t: &TensorRef) -> Result<Vec<f32>, PtError> {
    if !(t.shape.len() == 1 || (t.shape.len() == 2 && t.shape[0] == 1)) {
        return err(format!(
            "embedding has shape {:?}, not [hidden_size] or [1, hidden_size]",
            t.shape
        ));
    }
    f.tensor_f32(t)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn half_conversion_is_exact() {
        for (h, f) in [
            (0x3C00u16, 1.0f32),
            (0xC000, -2.0),
            (0x0001, 5.960_464_5e-8),
            (0x7BFF, 65504.0),
            (0x7C00, f32::INFINITY),
            (0x0000, 0.0),
        ] {
            assert_eq!(half_to_f32(h), f, "{h:#x}");
        }
        assert!(half_to_f32(0x7E00).is_nan());
    }

    #[test]
    fn garbage_is_an_error_not_a_panic() {
        for bytes in [
            Vec::new(),
            b"PK\x03\x04".to_vec(),
            b"PK\x05\x06".to_vec(),
            vec![0u8; 100],
            {
                let mut v = vec![0u8; 22];
                v[..4].copy_from_slice(b"PK\x05\x06");
                v[10] = 3; // three entries, central directory at offset 0 (which is not one)
                v
            },
        ] {
            assert!(PtFile::from_bytes(bytes).is_err());
        }
    }

    #[test]
    fn pickle_machine_rejects_unknown_globals_and_opcodes() {
        let run = |b: &[u8]| {
            Machine {
                b,
                at: 0,
                stack: Vec::new(),
                memo: HashMap::new(),
            }
            .run()
        };
        // os.system("x"): a global this reader never calls.
        let e = run(b"\x80\x02cos\nsystem\nq\x00X\x01\x00\x00\x00x\x85R.").unwrap_err();
        assert!(e.0.contains("os.system"), "{e}");
        assert!(run(b"\x80\x02\xff").unwrap_err().0.contains("0xff"));
        assert!(run(b"\x80\x02}").unwrap_err().0.contains("truncated"));
        // A small dict round trip: {"a": 1, "b": [2.5, None]}.
        let v = run(b"\x80\x02}q\x00(X\x01\x00\x00\x00aK\x01X\x01\x00\x00\x00b]q\x01(G@\x04\x00\x00\x00\x00\x00\x00Neu.")
            .unwrap();
        assert_eq!(v.get("a"), Some(&Value::Int(1)));
        assert_eq!(
            v.get("b"),
            Some(&Value::List(vec![Value::Float(2.5), Value::None]))
        );
    }
}
