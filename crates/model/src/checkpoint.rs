//! safetensors checkpoints through mmap: a single `model.safetensors` or a sharded
//! `model.safetensors.index.json` (`weight_map` → shard files).
//!
//! Every file is memory-mapped and its header validated before any tensor is handed out: a
//! truncated file, a header length beyond the file, corrupt header JSON, an unknown dtype, data
//! offsets outside the data section or disagreeing with dtype × shape, gaps/overlaps, duplicate
//! tensor names (inside one header or across shards), a missing shard — each is an error naming
//! the file and, where there is one, the tensor. Headers are parsed with the `safetensors` crate
//! (after a pre-pass of our own that finds duplicates and names the offending tensor).
//!
//! Decoders to f32: BF16, F16, F32, F8_E4M3 (with an optional block-scale tensor
//! `<name>_scale_inv`, e.g. `q_proj.weight_scale_inv`, 128×128 blocks unless
//! `quantization_config.weight_block_size` says otherwise), and MXFP4 pairs `<base>_blocks` U8
//! `[.., N, K/32, 16]` + `<base>_scales` U8 `[.., N, K/32]` as validated [`fp4`] views (NaN scale
//! byte → error naming the tensor).
//!
//! Safety note: the files are mapped read-only; like every mmap-based loader this assumes nobody
//! truncates or rewrites them while the [`Checkpoint`] is alive.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::fs::File;
use std::path::{Component, Path, PathBuf};
use std::sync::Arc;

use memmap2::Mmap;
use rayon::prelude::*;
use serde::de::{Deserialize, Deserializer, MapAccess, Visitor};
use serde_json::Value;

pub use safetensors::Dtype;

/// The single-file checkpoint name.
pub const SINGLE_FILE: &str = "model.safetensors";
/// The sharded checkpoint index name.
pub const INDEX_FILE: &str = "model.safetensors.index.json";
/// Largest header accepted (the safetensors crate's own limit).
pub const MAX_HEADER_BYTES: u64 = 100_000_000;

/// Everything that can be wrong with a checkpoint's files and tensors.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CheckpointError {
    /// A file could not be opened, read or mapped.
    #[error("{}: {message}", file.display())]
    Io { file: PathBuf, message: String },
    /// The directory has neither `model.safetensors` nor `model.safetensors.index.json`.
    #[error("{}: no model.safetensors or model.safetensors.index.json", dir.display())]
    NoWeights { dir: PathBuf },
    /// The sharded index is malformed.
    #[error("{}: bad index: {message}", file.display())]
    Index { file: PathBuf, message: String },
    /// A shard named by the index does not exist.
    #[error("{}: shard {shard:?} (holding tensor `{tensor}`) does not exist", index.display())]
    MissingShard {
        index: PathBuf,
        shard: String,
        tensor: String,
    },
    /// A file-level problem: truncated, header length beyond the file, corrupt header JSON,
    /// data section size disagreeing with the header.
    #[error("{}: {message}", file.display())]
    File { file: PathBuf, message: String },
    /// A problem with one tensor of one file (bad dtype, offsets, shape, scale tensor, NaN
    /// MXFP4 scale, ...).
    #[error("{}: tensor `{tensor}`: {message}", file.display())]
    Tensor {
        file: PathBuf,
        tensor: String,
        message: String,
    },
    /// The same tensor name occurs twice (in one header or in two shards).
    #[error("tensor `{tensor}` occurs twice: in {} and in {}", first.display(), second.display())]
    Duplicate {
        tensor: String,
        first: PathBuf,
        second: PathBuf,
    },
    /// A tensor that was asked for is not in the checkpoint.
    #[error("{}: tensor `{tensor}` not found", dir.display())]
    NotFound { dir: PathBuf, tensor: String },
}

type CkResult<T> = Result<T, CheckpointError>;

/// One memory-mapped file (shared with the [`crate::weights::Bytes`] views of its tensors,
/// which keep it mapped after the [`Checkpoint`] is dropped).
struct Shard {
    path: PathBuf,
    map: Arc<Mmap>,
}

/// Where a tensor lives.
#[derive(Debug, Clone)]
struct Entry {
    shard: usize,
    dtype: Dtype,
    shape: Vec<usize>,
    /// Absolute byte range in the mapped file.
    start: usize,
    end: usize,
}

/// An opened, validated checkpoint.
pub struct Checkpoint {
    dir: PathBuf,
    shards: Vec<Shard>,
    /// Sorted by name (deterministic iteration).
    tensors: BTreeMap<String, Entry>,
    fp8_block: [usize; 2],
}

impl fmt::Debug for Checkpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Checkpoint")
            .field("dir", &self.dir)
            .field("files", &self.files())
            .field("tensors", &self.tensors.len())
            .finish()
    }
}

/// A borrowed tensor: name, dtype, shape and raw little-endian bytes (straight from the mmap).
#[derive(Debug, Clone, Copy)]
pub struct TensorView<'a> {
    pub name: &'a str,
    pub dtype: Dtype,
    pub shape: &'a [usize],
    pub data: &'a [u8],
    /// The file it came from.
    pub file: &'a Path,
}

impl TensorView<'_> {
    /// Number of elements.
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }

    fn err(&self, message: impl Into<String>) -> CheckpointError {
        CheckpointError::Tensor {
            file: self.file.to_path_buf(),
            tensor: self.name.to_string(),
            message: message.into(),
        }
    }

    /// Decodes a BF16 / F16 / F32 / F8_E4M3 tensor to f32 (FP8 without any block scale: see
    /// [`Checkpoint::read_f32`] for the scaled form).
    pub fn to_f32(&self) -> CkResult<Vec<f32>> {
        let mut out = vec![0f32; self.numel()];
        decode_into(self.dtype, self.data, &mut out).map_err(|m| self.err(m))?;
        Ok(out)
    }
}

/// Whether [`decode_into`] decodes this dtype.
pub fn is_float(dtype: Dtype) -> bool {
    matches!(
        dtype,
        Dtype::BF16 | Dtype::F16 | Dtype::F32 | Dtype::F8_E4M3
    )
}

/// Bytes per element of the decodable dtypes.
fn elem_bytes(dtype: Dtype) -> Option<usize> {
    match dtype {
        Dtype::BF16 | Dtype::F16 => Some(2),
        Dtype::F32 => Some(4),
        Dtype::F8_E4M3 => Some(1),
        _ => None,
    }
}

/// E4M3FN (the `torch.float8_e4m3fn` of FP8 checkpoints; no infinities, 0x7F/0xFF = NaN) → f32.
pub const fn f8_e4m3_to_f32(b: u8) -> f32 {
    let sign = if b & 0x80 != 0 { -1.0f32 } else { 1.0f32 };
    let e = ((b >> 3) & 0x0F) as i32;
    let m = (b & 0x07) as u32;
    if e == 0x0F && m == 0x07 {
        return f32::NAN;
    }
    if e == 0 {
        // Subnormal: m/8 · 2^−6 = m · 2^−9.
        return sign * (m as f32) * (1.0 / 512.0);
    }
    // Normal: (1 + m/8) · 2^(e−7), exact in f32.
    let bits = (((e - 7 + 127) as u32) << 23) | (m << 20);
    sign * f32::from_bits(bits)
}

pub(crate) static F8_TABLE: [f32; 256] = {
    let mut t = [0f32; 256];
    let mut i = 0;
    while i < 256 {
        t[i] = f8_e4m3_to_f32(i as u8);
        i += 1;
    }
    t
};

/// Elements per parallel decode chunk.
const CHUNK: usize = 1 << 16;

/// Decodes little-endian `data` of `dtype` into `out` (one f32 per element). Large tensors are
/// decoded in parallel.
pub fn decode_into(dtype: Dtype, data: &[u8], out: &mut [f32]) -> Result<(), String> {
    let Some(eb) = elem_bytes(dtype) else {
        return Err(format!(
            "dtype {dtype:?} cannot be decoded to f32 (expected BF16, F16, F32 or F8_E4M3)"
        ));
    };
    if data.len() != out.len() * eb {
        return Err(format!(
            "{} bytes for {} elements of {dtype:?}",
            data.len(),
            out.len()
        ));
    }
    let run = |src: &[u8], dst: &mut [f32]| match dtype {
        Dtype::BF16 => {
            for (d, s) in dst.iter_mut().zip(src.chunks_exact(2)) {
                *d = f32::from_bits((u16::from_le_bytes([s[0], s[1]]) as u32) << 16);
            }
        }
        Dtype::F16 => {
            for (d, s) in dst.iter_mut().zip(src.chunks_exact(2)) {
                *d = half::f16::from_bits(u16::from_le_bytes([s[0], s[1]])).to_f32();
            }
        }
        Dtype::F32 => {
            for (d, s) in dst.iter_mut().zip(src.chunks_exact(4)) {
                *d = f32::from_le_bytes([s[0], s[1], s[2], s[3]]);
            }
        }
        _ => {
            for (d, s) in dst.iter_mut().zip(src) {
                *d = F8_TABLE[*s as usize];
            }
        }
    };
    if out.len() <= CHUNK {
        run(data, out);
    } else {
        out.par_chunks_mut(CHUNK)
            .zip(data.par_chunks(CHUNK * eb))
            .for_each(|(d, s)| run(s, d));
    }
    Ok(())
}

/// The header entries in file order, keeping duplicates (serde_json's maps would silently keep
/// the last one).
struct Entries(Vec<(String, Value)>);

impl<'de> Deserialize<'de> for Entries {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Entries;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut m: A) -> Result<Entries, A::Error> {
                let mut v = Vec::new();
                while let Some((k, val)) = m.next_entry::<String, Value>()? {
                    v.push((k, val));
                }
                Ok(Entries(v))
            }
        }
        d.deserialize_map(V)
    }
}

fn io_err(file: &Path, e: impl fmt::Display) -> CheckpointError {
    CheckpointError::Io {
        file: file.to_path_buf(),
        message: e.to_string(),
    }
}

fn file_err(file: &Path, message: impl Into<String>) -> CheckpointError {
    CheckpointError::File {
        file: file.to_path_buf(),
        message: message.into(),
    }
}

fn tensor_err(file: &Path, tensor: &str, message: impl Into<String>) -> CheckpointError {
    CheckpointError::Tensor {
        file: file.to_path_buf(),
        tensor: tensor.to_string(),
        message: message.into(),
    }
}

/// Maps one file.
fn map_file(path: &Path) -> CkResult<Mmap> {
    let f = File::open(path).map_err(|e| io_err(path, e))?;
    let len = f.metadata().map_err(|e| io_err(path, e))?.len();
    if len < 8 {
        return Err(file_err(
            path,
            format!("truncated: {len} bytes, too short for the 8-byte header length"),
        ));
    }
    // SAFETY: read-only map of a regular file; see the module docs on concurrent modification.
    unsafe { Mmap::map(&f) }.map_err(|e| io_err(path, e))
}

/// Validates a whole safetensors file and returns its tensors (absolute byte ranges).
fn parse_file(path: &Path, bytes: &[u8]) -> CkResult<Vec<(String, Entry)>> {
    let len = bytes.len();
    if len < 8 {
        return Err(file_err(
            path,
            format!("truncated: {len} bytes, too short for the 8-byte header length"),
        ));
    }
    let mut n8 = [0u8; 8];
    n8.copy_from_slice(&bytes[..8]);
    let n = u64::from_le_bytes(n8);
    if n > (len as u64 - 8) {
        return Err(file_err(
            path,
            format!(
                "header length {n} exceeds the file size ({len} bytes): truncated or corrupt file"
            ),
        ));
    }
    if n > MAX_HEADER_BYTES {
        return Err(file_err(
            path,
            format!("header length {n} exceeds the limit {MAX_HEADER_BYTES}"),
        ));
    }
    let n = n as usize;
    let header = std::str::from_utf8(&bytes[8..8 + n])
        .map_err(|e| file_err(path, format!("header is not UTF-8: {e}")))?;
    let entries: Entries = serde_json::from_str(header)
        .map_err(|e| file_err(path, format!("corrupt header JSON: {e}")))?;
    let data_start = 8 + n;
    let data_len = len - data_start;

    let mut seen: HashMap<&str, ()> = HashMap::with_capacity(entries.0.len());
    let mut out = Vec::with_capacity(entries.0.len());
    for (name, v) in &entries.0 {
        if seen.insert(name.as_str(), ()).is_some() {
            return Err(CheckpointError::Duplicate {
                tensor: name.clone(),
                first: path.to_path_buf(),
                second: path.to_path_buf(),
            });
        }
        if name == "__metadata__" {
            let ok = v
                .as_object()
                .is_some_and(|m| m.values().all(|x| x.is_string()));
            if !ok {
                return Err(file_err(
                    path,
                    "header `__metadata__` is not a map of strings",
                ));
            }
            continue;
        }
        let info: safetensors::tensor::TensorInfo = serde_json::from_value(v.clone())
            .map_err(|e| tensor_err(path, name, format!("bad header entry: {e}")))?;
        let (s, e) = info.data_offsets;
        if e < s {
            return Err(tensor_err(
                path,
                name,
                format!("data offsets [{s}, {e}) are reversed"),
            ));
        }
        if e > data_len {
            return Err(tensor_err(
                path,
                name,
                format!(
                    "data offsets [{s}, {e}) lie beyond the data section ({data_len} bytes): \
                     truncated or corrupt file"
                ),
            ));
        }
        let numel = info
            .shape
            .iter()
            .try_fold(1usize, |a, &d| a.checked_mul(d))
            .ok_or_else(|| tensor_err(path, name, format!("shape {:?} overflows", info.shape)))?;
        let bits = numel
            .checked_mul(info.dtype.bitsize())
            .ok_or_else(|| tensor_err(path, name, format!("shape {:?} overflows", info.shape)))?;
        if !bits.is_multiple_of(8) || bits / 8 != e - s {
            return Err(tensor_err(
                path,
                name,
                format!(
                    "{:?} {:?} needs {} bits but data offsets [{s}, {e}) hold {} bytes",
                    info.dtype,
                    info.shape,
                    bits,
                    e - s
                ),
            ));
        }
        out.push((
            name.clone(),
            Entry {
                shard: 0,
                dtype: info.dtype,
                shape: info.shape,
                start: data_start + s,
                end: data_start + e,
            },
        ));
    }
    // The crate's own validation: contiguous offsets covering exactly the data section.
    if let Err(err) = safetensors::SafeTensors::read_metadata(bytes) {
        use safetensors::SafeTensorError as E;
        return Err(match err {
            E::InvalidOffset(t) => tensor_err(
                path,
                &t,
                "data offsets are not contiguous with the previous tensor (gap or overlap)",
            ),
            E::MetadataIncompleteBuffer => {
                let covered: usize = out.iter().map(|(_, e)| e.end - e.start).sum();
                file_err(
                    path,
                    format!(
                        "data section is {data_len} bytes but the tensors cover {covered}: \
                         truncated file, gaps or trailing bytes"
                    ),
                )
            }
            other => file_err(path, format!("invalid safetensors header: {other}")),
        });
    }
    Ok(out)
}

/// Validates a shard name from an index: a relative path without `..`.
fn safe_relative(name: &str) -> bool {
    let p = Path::new(name);
    !name.is_empty()
        && p.components()
            .all(|c| matches!(c, Component::Normal(_) | Component::CurDir))
}

impl Checkpoint {
    /// Opens a checkpoint directory: `model.safetensors` if present, else the sharded
    /// `model.safetensors.index.json`.
    pub fn open(dir: &Path) -> CkResult<Checkpoint> {
        let single = dir.join(SINGLE_FILE);
        if single.is_file() {
            let mut c = Checkpoint::open_file(&single)?;
            c.dir = dir.to_path_buf();
            return Ok(c);
        }
        let index = dir.join(INDEX_FILE);
        if index.is_file() {
            return Checkpoint::open_index(&index);
        }
        Err(CheckpointError::NoWeights {
            dir: dir.to_path_buf(),
        })
    }

    /// Opens one safetensors file.
    pub fn open_file(path: &Path) -> CkResult<Checkpoint> {
        let map = map_file(path)?;
        let entries = parse_file(path, &map)?;
        let mut c = Checkpoint {
            dir: path.parent().unwrap_or(Path::new(".")).to_path_buf(),
            shards: Vec::new(),
            tensors: BTreeMap::new(),
            fp8_block: [128, 128],
        };
        c.add_shard(path.to_path_buf(), map, entries)?;
        Ok(c)
    }

    /// Opens a sharded checkpoint through its index (`weight_map`: tensor → shard file).
    pub fn open_index(index: &Path) -> CkResult<Checkpoint> {
        let dir = index.parent().unwrap_or(Path::new(".")).to_path_buf();
        let bad = |m: String| CheckpointError::Index {
            file: index.to_path_buf(),
            message: m,
        };
        let text = std::fs::read_to_string(index).map_err(|e| io_err(index, e))?;
        #[derive(serde::Deserialize)]
        struct IndexFile {
            weight_map: Option<Entries>,
        }
        let root: IndexFile =
            serde_json::from_str(&text).map_err(|e| bad(format!("invalid index JSON: {e}")))?;
        let wm = root
            .weight_map
            .ok_or_else(|| bad("missing `weight_map`".into()))?;
        let mut map: BTreeMap<String, String> = BTreeMap::new();
        // shard file → first tensor mapped to it (for the missing-shard message)
        let mut files: BTreeMap<String, String> = BTreeMap::new();
        for (tensor, v) in wm.0 {
            let Some(file) = v.as_str() else {
                return Err(bad(format!("`weight_map[{tensor:?}]` is not a file name")));
            };
            if !safe_relative(file) {
                return Err(bad(format!(
                    "`weight_map[{tensor:?}]` = {file:?} is not a relative path inside the \
                     checkpoint directory"
                )));
            }
            if let Some(prev) = map.get(&tensor) {
                return Err(CheckpointError::Duplicate {
                    tensor,
                    first: dir.join(prev),
                    second: dir.join(file),
                });
            }
            files
                .entry(file.to_string())
                .or_insert_with(|| tensor.clone());
            map.insert(tensor, file.to_string());
        }
        if files.is_empty() {
            return Err(bad("`weight_map` is empty".into()));
        }
        let mut c = Checkpoint {
            dir: dir.clone(),
            shards: Vec::new(),
            tensors: BTreeMap::new(),
            fp8_block: [128, 128],
        };
        // shard name → shard index
        let mut shard_idx: HashMap<String, usize> = HashMap::new();
        for (file, first_tensor) in &files {
            let path = dir.join(file);
            if !path.is_file() {
                return Err(CheckpointError::MissingShard {
                    index: index.to_path_buf(),
                    shard: file.clone(),
                    tensor: first_tensor.clone(),
                });
            }
            let m = map_file(&path)?;
            let entries = parse_file(&path, &m)?;
            shard_idx.insert(file.clone(), c.shards.len());
            c.add_shard(path, m, entries)?;
        }
        for (tensor, file) in &map {
            let want = shard_idx[file];
            match c.tensors.get(tensor) {
                Some(e) if e.shard == want => {}
                Some(e) => {
                    return Err(CheckpointError::Tensor {
                        file: index.to_path_buf(),
                        tensor: tensor.clone(),
                        message: format!(
                            "the index places it in {file:?} but it is in {:?}",
                            c.shards[e.shard].path
                        ),
                    })
                }
                None => {
                    return Err(CheckpointError::Tensor {
                        file: index.to_path_buf(),
                        tensor: tensor.clone(),
                        message: format!("the index places it in {file:?}, which lacks it"),
                    })
                }
            }
        }
        Ok(c)
    }

    fn add_shard(
        &mut self,
        path: PathBuf,
        map: Mmap,
        entries: Vec<(String, Entry)>,
    ) -> CkResult<()> {
        let idx = self.shards.len();
        for (name, mut e) in entries {
            if let Some(prev) = self.tensors.get(&name) {
                return Err(CheckpointError::Duplicate {
                    tensor: name,
                    first: self.shards[prev.shard].path.clone(),
                    second: path,
                });
            }
            e.shard = idx;
            self.tensors.insert(name, e);
        }
        self.shards.push(Shard {
            path,
            map: Arc::new(map),
        });
        Ok(())
    }

    /// The checkpoint directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The mapped files.
    pub fn files(&self) -> Vec<&Path> {
        self.shards.iter().map(|s| s.path.as_path()).collect()
    }

    /// Number of tensors.
    pub fn len(&self) -> usize {
        self.tensors.len()
    }

    /// Whether the checkpoint holds no tensor.
    pub fn is_empty(&self) -> bool {
        self.tensors.is_empty()
    }

    /// All tensor names, sorted.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.tensors.keys().map(String::as_str)
    }

    /// Whether a tensor exists.
    pub fn contains(&self, name: &str) -> bool {
        self.tensors.contains_key(name)
    }

    /// The FP8 scale block size `[rows, cols]` (default 128×128).
    pub fn fp8_block(&self) -> [usize; 2] {
        self.fp8_block
    }

    /// Sets the FP8 scale block size (from `quantization_config.weight_block_size`).
    pub fn set_fp8_block(&mut self, block: [usize; 2]) {
        self.fp8_block = [block[0].max(1), block[1].max(1)];
    }

    /// A tensor, if present.
    pub fn get(&self, name: &str) -> Option<TensorView<'_>> {
        let (k, e) = self.tensors.get_key_value(name)?;
        let shard = &self.shards[e.shard];
        Some(TensorView {
            name: k,
            dtype: e.dtype,
            shape: &e.shape,
            data: &shard.map[e.start..e.end],
            file: &shard.path,
        })
    }

    /// A tensor, or [`CheckpointError::NotFound`].
    pub fn tensor(&self, name: &str) -> CkResult<TensorView<'_>> {
        self.get(name).ok_or_else(|| CheckpointError::NotFound {
            dir: self.dir.clone(),
            tensor: name.to_string(),
        })
    }

    /// Total bytes of the mapped files.
    pub fn total_bytes(&self) -> u64 {
        self.shards.iter().map(|s| s.map.len() as u64).sum()
    }

    /// The bytes of a tensor as a shared view of its mapped file (no copy; keeps the file
    /// mapped as long as the view lives).
    pub fn shared_bytes(&self, name: &str) -> CkResult<crate::weights::Bytes> {
        let e = self.entry(name)?;
        Ok(crate::weights::Bytes::from_map(
            self.shards[e.shard].map.clone(),
            e.start,
            e.end - e.start,
        ))
    }

    /// The bytes of tensors `a` then `b` as one shared view when `b` starts where `a` ends in
    /// the same file (`None` otherwise).
    pub fn shared_bytes_adjacent(
        &self,
        a: &str,
        b: &str,
    ) -> CkResult<Option<crate::weights::Bytes>> {
        let (ea, eb) = (self.entry(a)?, self.entry(b)?);
        if ea.shard != eb.shard || ea.end != eb.start {
            return Ok(None);
        }
        Ok(Some(crate::weights::Bytes::from_map(
            self.shards[ea.shard].map.clone(),
            ea.start,
            eb.end - ea.start,
        )))
    }

    fn entry(&self, name: &str) -> CkResult<&Entry> {
        self.tensors
            .get(name)
            .ok_or_else(|| CheckpointError::NotFound {
                dir: self.dir.clone(),
                tensor: name.to_string(),
            })
    }

    /// Drops the resident pages of a tensor that was copied out (e.g. transposed) and will not
    /// be read through the mapping again; they would be re-read from the file if it were.
    pub fn release(&self, name: &str) {
        let Ok(e) = self.entry(name) else { return };
        let map = &self.shards[e.shard].map;
        // Whole pages inside the tensor only (neighbouring tensors stay resident).
        const PAGE: usize = 4096;
        let (lo, hi) = (e.start.div_ceil(PAGE) * PAGE, e.end / PAGE * PAGE);
        if hi > lo {
            // SAFETY: the mapping is private and read-only, so dropping its pages loses nothing:
            // a later read faults them in again from the file.
            let _ = unsafe {
                map.unchecked_advise_range(memmap2::UncheckedAdvice::DontNeed, lo, hi - lo)
            };
        }
    }

    /// Reads every mapped page once, in file order, so that the first forward pass does not
    /// fault them in one by one; `progress` is told the bytes done after each step. The pages
    /// belong to the page cache and the mapping, not to an extra copy.
    pub fn prefetch(&self, progress: &mut dyn FnMut(u64)) {
        const STEP: usize = 16 << 20;
        const PAGE: usize = 4096;
        for s in &self.shards {
            let map: &[u8] = &s.map;
            let _ = s.map.advise(memmap2::Advice::Sequential);
            for chunk in map.chunks(STEP) {
                let mut x = 0u8;
                for i in (0..chunk.len()).step_by(PAGE) {
                    // SAFETY: i < chunk.len(); a volatile read so the touch is not elided.
                    x ^= unsafe { std::ptr::read_volatile(chunk.as_ptr().add(i)) };
                }
                std::hint::black_box(x);
                progress(chunk.len() as u64);
            }
            let _ = s.map.advise(memmap2::Advice::Normal);
        }
    }

    /// Decodes a dense tensor to f32. F8_E4M3 tensors are multiplied by their block scales
    /// `<name>_scale_inv` (`[ceil(rows/b0), ceil(cols/b1)]`, F32/BF16/F16) when present.
    pub fn read_f32(&self, name: &str) -> CkResult<Vec<f32>> {
        let t = self.tensor(name)?;
        let mut out = vec![0f32; t.numel()];
        self.read_f32_into(name, &mut out)?;
        Ok(out)
    }

    /// [`Checkpoint::read_f32`] into a caller's buffer of exactly `numel` elements.
    pub fn read_f32_into(&self, name: &str, out: &mut [f32]) -> CkResult<()> {
        let t = self.tensor(name)?;
        if out.len() != t.numel() {
            return Err(t.err(format!(
                "buffer of {} elements for {} elements",
                out.len(),
                t.numel()
            )));
        }
        decode_into(t.dtype, t.data, out).map_err(|m| t.err(m))?;
        if let Some(s) = self.fp8_scale(&t)? {
            let [b0, b1] = self.fp8_block;
            let cols = t.shape[1];
            let scales = s.to_f32()?;
            let sc = s.shape[1];
            if cols > 0 {
                out.par_chunks_mut(cols).enumerate().for_each(|(r, row)| {
                    let srow = &scales[(r / b0) * sc..(r / b0 + 1) * sc];
                    for (c, x) in row.iter_mut().enumerate() {
                        *x *= srow[c / b1];
                    }
                });
            }
        }
        Ok(())
    }

    /// The validated block-scale tensor `<name>_scale_inv` of an F8_E4M3 weight, if any: the
    /// weight must be 2-D `[rows, cols]` and the scales `[ceil(rows/b0), ceil(cols/b1)]` in
    /// F32, BF16 or F16. `None` for non-FP8 tensors and FP8 tensors without scales.
    pub fn fp8_scale<'a>(&'a self, t: &TensorView<'_>) -> CkResult<Option<TensorView<'a>>> {
        if t.dtype != Dtype::F8_E4M3 {
            return Ok(None);
        }
        let Some(s) = self.get(&format!("{}_scale_inv", t.name)) else {
            return Ok(None);
        };
        let [b0, b1] = self.fp8_block;
        let [rows, cols] = t.shape else {
            return Err(s.err(format!(
                "block scales need a 2-D weight, `{}` is {:?}",
                t.name, t.shape
            )));
        };
        let want = [rows.div_ceil(b0), cols.div_ceil(b1)];
        if s.shape != want {
            return Err(s.err(format!(
                "expected shape {want:?} (weight {:?} in {b0}×{b1} blocks), found {:?}",
                t.shape, s.shape
            )));
        }
        if !matches!(s.dtype, Dtype::F32 | Dtype::BF16 | Dtype::F16) {
            return Err(s.err(format!(
                "expected dtype F32, BF16 or F16, found {:?}",
                s.dtype
            )));
        }
        Ok(Some(s))
    }

    /// The two U8 tensors of an MXFP4 pair, `<base>_blocks` and `<base>_scales`.
    fn mx_pair(&self, base: &str) -> CkResult<(TensorView<'_>, TensorView<'_>)> {
        let b = self.tensor(&format!("{base}_blocks"))?;
        let s = self.tensor(&format!("{base}_scales"))?;
        for t in [&b, &s] {
            if t.dtype != Dtype::U8 {
                return Err(t.err(format!("expected dtype U8 (MXFP4), found {:?}", t.dtype)));
            }
        }
        Ok((b, s))
    }

    /// A stacked MXFP4 expert tensor: `<base>_blocks` U8 `[E, N, K/32, 16]` + `<base>_scales` U8
    /// `[E, N, K/32]` (validated, NaN scale bytes rejected).
    pub fn mxfp4_experts(&self, base: &str) -> CkResult<fp4::MxExpertsRef<'_>> {
        let (b, s) = self.mx_pair(base)?;
        fp4::MxExpertsRef::from_shapes(b.shape, b.data, s.shape, s.data)
            .map_err(|e| mx_err(&b, &s, e, s.shape.get(1).copied()))
    }

    /// A single MXFP4 matrix: `<base>_blocks` U8 `[N, K/32, 16]` + `<base>_scales` U8 `[N, K/32]`.
    pub fn mxfp4_matrix(&self, base: &str) -> CkResult<fp4::MxMatrixRef<'_>> {
        let (b, s) = self.mx_pair(base)?;
        match (b.shape, s.shape) {
            ([n, g, 16], [n2, g2]) if n == n2 && g == g2 => {
                fp4::MxMatrixRef::new(*n, g * fp4::BLOCK, b.data, s.data)
                    .map_err(|e| mx_err(&b, &s, e, None))
            }
            _ => Err(b.err(format!(
                "expected blocks [N, G, 16] and scales [N, G], found {:?} and {:?}",
                b.shape, s.shape
            ))),
        }
    }
}

/// Maps an fp4 validation error onto the tensor it is about.
fn mx_err(
    b: &TensorView<'_>,
    s: &TensorView<'_>,
    e: fp4::Fp4Error,
    rows_per_expert: Option<usize>,
) -> CheckpointError {
    match e {
        fp4::Fp4Error::NanScale { row, block } => {
            let at = match rows_per_expert {
                Some(n) if n > 0 => format!("expert {}, row {}, block {block}", row / n, row % n),
                _ => format!("row {row}, block {block}"),
            };
            s.err(format!("NaN scale byte 0xFF at {at}"))
        }
        other => b.err(format!("invalid MXFP4 pair with `{}`: {other}", s.name)),
    }
}
