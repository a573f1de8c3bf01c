//! GGUF files (llama.cpp's model format, version 3): a writer, a header reader, and the export
//! of an in-memory gpt-oss model ([`ModelConfig`] + [`Weights`]) as llama.cpp's `gpt-oss`
//! architecture.
//!
//! Used by `ultra bench-shapes --gguf` (and through it `cargo xtask bench-cpu`) to hand llama.cpp
//! exactly the random model that Ultra times. The export follows llama.cpp's own converter
//! (`convert_hf_to_gguf.py`, `GptOssModel`) with `--outtype f16`:
//!
//! * 2-D dense matrices (`token_embd`, `output`, `attn_{q,k,v,output}`) as F16 (round to nearest
//!   even); the router `ffn_gate_inp` and every 1-D tensor (norms, biases, sinks) as F32;
//! * experts as `ffn_{gate,up,down}_exps` `[E, N, K]` tensors of GGML type MXFP4 (17-byte
//!   `block_mxfp4`, [`fp4::layout::to_gguf`], lossless), the interleaved gate/up rows of gpt-oss
//!   split into even (gate) and odd (up) rows and their biases likewise;
//! * `output.weight` is always written (llama.cpp's gpt-oss requires it), a copy of the embedding
//!   when the embeddings are tied;
//! * no tokenizer: `tokenizer.ggml.model = "none"` with `gpt-oss.vocab_size` dummy tokens (what
//!   llama-bench needs: it feeds random token ids).
//!
//! Shapes follow GGUF's convention: `dims[0]` is the contiguous (innermost) dimension, so a
//! row-major `[rows, cols]` matrix has dims `[cols, rows]`.

use std::collections::{BTreeMap, HashSet};
use std::io::Write;
use std::path::Path;

use half::f16;

use crate::config::{Activation, Arch, AttnKind, ModelConfig, RouterSpec};
use crate::weights::{ExpertMat, GateUpLayout, Mat, Mlp, Weights};

/// `GGUF` as a little-endian u32.
pub const MAGIC: [u8; 4] = *b"GGUF";
/// The format version written (and the only one read).
pub const VERSION: u32 = 3;
/// Data alignment (GGUF's default `general.alignment`).
pub const ALIGNMENT: usize = 32;

/// What can be wrong when writing or reading a GGUF file or exporting a model.
#[derive(Debug, thiserror::Error)]
pub enum GgufError {
    #[error("GGUF tensor {name}: {what}")]
    Tensor { name: String, what: String },
    #[error("GGUF export: {0}")]
    Unsupported(String),
    #[error("GGUF file: {0}")]
    Malformed(String),
    #[error("GGUF file {path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
}

/// GGML tensor types written here (values of `enum ggml_type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TensorType {
    F32,
    F16,
    Mxfp4,
}

impl TensorType {
    /// The `ggml_type` number.
    pub fn id(self) -> u32 {
        match self {
            TensorType::F32 => 0,
            TensorType::F16 => 1,
            TensorType::Mxfp4 => 39,
        }
    }

    /// The type of a `ggml_type` number, if it is one of ours.
    pub fn from_id(id: u32) -> Option<TensorType> {
        match id {
            0 => Some(TensorType::F32),
            1 => Some(TensorType::F16),
            39 => Some(TensorType::Mxfp4),
            _ => None,
        }
    }

    /// Bytes of a row of `ne0` elements (`None` if `ne0` is not a whole number of blocks).
    pub fn row_bytes(self, ne0: u64) -> Option<u64> {
        match self {
            TensorType::F32 => Some(4 * ne0),
            TensorType::F16 => Some(2 * ne0),
            TensorType::Mxfp4 => ne0
                .is_multiple_of(32)
                .then_some(ne0 / 32 * fp4::layout::GGUF_BLOCK_BYTES as u64),
        }
    }

    /// Bytes of a tensor of these dims.
    pub fn nbytes(self, dims: &[u64]) -> Option<u64> {
        let (&ne0, rest) = dims.split_first()?;
        rest.iter()
            .try_fold(self.row_bytes(ne0)?, |acc, &d| acc.checked_mul(d))
    }
}

/// A metadata value.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    U32(u32),
    I32(i32),
    F32(f32),
    Bool(bool),
    Str(String),
}

impl Value {
    fn type_id(&self) -> u32 {
        match self {
            Value::U32(_) => 4,
            Value::I32(_) => 5,
            Value::F32(_) => 6,
            Value::Bool(_) => 7,
            Value::Str(_) => 8,
        }
    }
}

/// One tensor to write.
struct PendingTensor {
    name: String,
    dims: Vec<u64>,
    ty: TensorType,
    data: Vec<u8>,
}

/// Collects metadata and tensors, then writes one GGUF v3 file.
#[derive(Default)]
pub struct GgufWriter {
    kv: Vec<(String, Value)>,
    tensors: Vec<PendingTensor>,
    names: HashSet<String>,
}

impl GgufWriter {
    pub fn new() -> GgufWriter {
        GgufWriter::default()
    }

    /// Adds (or replaces) a metadata key.
    pub fn kv(&mut self, key: &str, value: Value) {
        match self.kv.iter_mut().find(|(k, _)| k == key) {
            Some(slot) => slot.1 = value,
            None => self.kv.push((key.to_string(), value)),
        }
    }

    /// Adds a tensor of raw bytes. Errors: a duplicate name, no dims or a zero dim, a row that is
    /// not a whole number of blocks, or `data` of the wrong length.
    pub fn tensor(
        &mut self,
        name: &str,
        dims: &[u64],
        ty: TensorType,
        data: Vec<u8>,
    ) -> Result<(), GgufError> {
        let err = |what: String| GgufError::Tensor {
            name: name.to_string(),
            what,
        };
        if dims.is_empty() || dims.len() > 4 || dims.contains(&0) {
            return Err(err(format!("dims {dims:?}: need 1 to 4 non-zero dims")));
        }
        let want = ty
            .nbytes(dims)
            .ok_or_else(|| err(format!("dims {dims:?} do not fit type {ty:?}")))?;
        if data.len() as u64 != want {
            return Err(err(format!(
                "{} data bytes for {ty:?} dims {dims:?}, expected {want}",
                data.len()
            )));
        }
        if !self.names.insert(name.to_string()) {
            return Err(err("written twice".into()));
        }
        self.tensors.push(PendingTensor {
            name: name.to_string(),
            dims: dims.to_vec(),
            ty,
            data,
        });
        Ok(())
    }

    /// Adds f32 values as an F32 tensor.
    pub fn tensor_f32(&mut self, name: &str, dims: &[u64], v: &[f32]) -> Result<(), GgufError> {
        let data = v.iter().flat_map(|x| x.to_le_bytes()).collect();
        self.tensor(name, dims, TensorType::F32, data)
    }

    /// Adds f32 values rounded to F16 (nearest even).
    pub fn tensor_f16(&mut self, name: &str, dims: &[u64], v: &[f32]) -> Result<(), GgufError> {
        let data = v
            .iter()
            .flat_map(|&x| f16::from_f32(x).to_le_bytes())
            .collect();
        self.tensor(name, dims, TensorType::F16, data)
    }

    /// Number of tensors added so far.
    pub fn n_tensors(&self) -> usize {
        self.tensors.len()
    }

    /// The whole file as bytes.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = Vec::new();
        self.write_into(&mut out).expect("writing to a Vec");
        out
    }

    /// Writes the file to `path` (through a temporary sibling, renamed into place).
    pub fn write(&self, path: &Path) -> Result<(), GgufError> {
        let io = |source| GgufError::Io {
            path: path.display().to_string(),
            source,
        };
        let tmp = path.with_extension("gguf.partial");
        let f = std::fs::File::create(&tmp).map_err(io)?;
        let mut w = std::io::BufWriter::with_capacity(1 << 20, f);
        self.write_into(&mut w).map_err(io)?;
        w.flush().map_err(io)?;
        drop(w);
        std::fs::rename(&tmp, path).map_err(io)
    }

    fn write_into(&self, w: &mut impl Write) -> std::io::Result<()> {
        fn string(w: &mut impl Write, s: &str) -> std::io::Result<()> {
            w.write_all(&(s.len() as u64).to_le_bytes())?;
            w.write_all(s.as_bytes())
        }
        let mut head = Vec::new();
        head.extend_from_slice(&MAGIC);
        head.extend_from_slice(&VERSION.to_le_bytes());
        head.extend_from_slice(&(self.tensors.len() as u64).to_le_bytes());
        head.extend_from_slice(&(self.kv.len() as u64).to_le_bytes());
        for (k, v) in &self.kv {
            string(&mut head, k)?;
            head.extend_from_slice(&v.type_id().to_le_bytes());
            match v {
                Value::U32(x) => head.extend_from_slice(&x.to_le_bytes()),
                Value::I32(x) => head.extend_from_slice(&x.to_le_bytes()),
                Value::F32(x) => head.extend_from_slice(&x.to_le_bytes()),
                Value::Bool(x) => head.push(u8::from(*x)),
                Value::Str(s) => string(&mut head, s)?,
            }
        }
        let mut offset = 0u64;
        for t in &self.tensors {
            string(&mut head, &t.name)?;
            head.extend_from_slice(&(t.dims.len() as u32).to_le_bytes());
            for d in &t.dims {
                head.extend_from_slice(&d.to_le_bytes());
            }
            head.extend_from_slice(&t.ty.id().to_le_bytes());
            head.extend_from_slice(&offset.to_le_bytes());
            offset += pad(t.data.len()) as u64;
        }
        let zeros = [0u8; ALIGNMENT];
        w.write_all(&head)?;
        w.write_all(&zeros[..pad(head.len()) - head.len()])?;
        for t in &self.tensors {
            w.write_all(&t.data)?;
            w.write_all(&zeros[..pad(t.data.len()) - t.data.len()])?;
        }
        Ok(())
    }
}

fn pad(n: usize) -> usize {
    n.div_ceil(ALIGNMENT) * ALIGNMENT
}

/// A tensor entry of a parsed GGUF header.
#[derive(Debug, Clone, PartialEq)]
pub struct TensorInfo {
    pub dims: Vec<u64>,
    pub ty: TensorType,
    /// Byte offset of the data in the file.
    pub start: usize,
    pub nbytes: usize,
}

/// The header of a GGUF v3 file (metadata of the types [`Value`] covers; arrays are skipped)
/// and its tensor directory, every tensor checked to lie inside the file.
#[derive(Debug, Clone)]
pub struct GgufHeader {
    pub kv: BTreeMap<String, Value>,
    pub tensors: BTreeMap<String, TensorInfo>,
}

impl GgufHeader {
    /// Parses `bytes` (a whole file). Errors name what is wrong; never panics on bad input.
    pub fn parse(bytes: &[u8]) -> Result<GgufHeader, GgufError> {
        let mut r = Reader { b: bytes, pos: 0 };
        if r.take(4)? != MAGIC {
            return Err(GgufError::Malformed("not a GGUF file (bad magic)".into()));
        }
        let version = r.u32()?;
        if version != VERSION {
            return Err(GgufError::Malformed(format!(
                "version {version}, only {VERSION} is read"
            )));
        }
        let n_tensors = r.u64()?;
        let n_kv = r.u64()?;
        let mut kv = BTreeMap::new();
        let mut alignment = ALIGNMENT;
        for _ in 0..n_kv {
            let key = r.string()?;
            let ty = r.u32()?;
            if let Some(v) = r.value(ty)? {
                if key == "general.alignment" {
                    match v {
                        Value::U32(a) if a > 0 && a.is_power_of_two() => alignment = a as usize,
                        _ => return Err(GgufError::Malformed(format!("bad alignment {v:?}"))),
                    }
                }
                kv.insert(key, v);
            }
        }
        let mut infos = Vec::new();
        for _ in 0..n_tensors {
            let name = r.string()?;
            let nd = r.u32()?;
            if nd == 0 || nd > 4 {
                return Err(GgufError::Malformed(format!("tensor {name}: {nd} dims")));
            }
            let dims = (0..nd).map(|_| r.u64()).collect::<Result<Vec<_>, _>>()?;
            let id = r.u32()?;
            let ty = TensorType::from_id(id).ok_or_else(|| GgufError::Tensor {
                name: name.clone(),
                what: format!("ggml type {id} is not one this reader knows"),
            })?;
            let offset = r.u64()?;
            infos.push((name, dims, ty, offset));
        }
        let data_start = r.pos.div_ceil(alignment) * alignment;
        let mut tensors = BTreeMap::new();
        for (name, dims, ty, offset) in infos {
            let bad = |what: String| GgufError::Tensor {
                name: name.clone(),
                what,
            };
            let nbytes = ty
                .nbytes(&dims)
                .ok_or_else(|| bad(format!("dims {dims:?} do not fit {ty:?}")))?;
            if !offset.is_multiple_of(alignment as u64) {
                return Err(bad(format!("offset {offset} not aligned to {alignment}")));
            }
            let start = (data_start as u64).checked_add(offset);
            match start.and_then(|s| s.checked_add(nbytes)) {
                Some(end) if end <= bytes.len() as u64 => {}
                _ => return Err(bad("data beyond the end of the file".into())),
            }
            let info = TensorInfo {
                dims,
                ty,
                start: data_start + offset as usize,
                nbytes: nbytes as usize,
            };
            if tensors.insert(name.clone(), info).is_some() {
                return Err(bad("listed twice".into()));
            }
        }
        Ok(GgufHeader { kv, tensors })
    }
}

struct Reader<'a> {
    b: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], GgufError> {
        match self.pos.checked_add(n) {
            Some(end) if end <= self.b.len() => {
                let s = &self.b[self.pos..end];
                self.pos = end;
                Ok(s)
            }
            _ => Err(GgufError::Malformed(format!(
                "truncated: {n} bytes wanted at offset {}",
                self.pos
            ))),
        }
    }
    fn u32(&mut self) -> Result<u32, GgufError> {
        Ok(u32::from_le_bytes(self.take(4)?.try_into().expect("4")))
    }
    fn u64(&mut self) -> Result<u64, GgufError> {
        Ok(u64::from_le_bytes(self.take(8)?.try_into().expect("8")))
    }
    fn len(&mut self) -> Result<usize, GgufError> {
        let n = self.u64()?;
        usize::try_from(n)
            .ok()
            .filter(|&n| n <= self.b.len())
            .ok_or_else(|| GgufError::Malformed(format!("length {n} beyond the file")))
    }
    fn string(&mut self) -> Result<String, GgufError> {
        let n = self.len()?;
        String::from_utf8(self.take(n)?.to_vec())
            .map_err(|_| GgufError::Malformed("a string is not UTF-8".into()))
    }
    /// A value of GGUF type `ty`; `None` for the types [`Value`] does not cover (skipped).
    fn value(&mut self, ty: u32) -> Result<Option<Value>, GgufError> {
        Ok(match ty {
            0 | 1 => {
                self.take(1)?;
                None
            }
            2 | 3 => {
                self.take(2)?;
                None
            }
            4 => Some(Value::U32(self.u32()?)),
            5 => Some(Value::I32(self.u32()? as i32)),
            6 => Some(Value::F32(f32::from_bits(self.u32()?))),
            7 => Some(Value::Bool(self.take(1)?[0] != 0)),
            8 => Some(Value::Str(self.string()?)),
            9 => {
                let ety = self.u32()?;
                let n = self.len()?;
                for _ in 0..n {
                    if ety == 9 {
                        return Err(GgufError::Malformed("nested arrays".into()));
                    }
                    self.value(ety)?;
                }
                None
            }
            10..=12 => {
                self.take(8)?;
                None
            }
            t => return Err(GgufError::Malformed(format!("unknown value type {t}"))),
        })
    }
}

/// Dense f32 values of a matrix, whatever its stored dtype (the one place that reads the
/// executor's dense storage).
fn dense(m: &Mat) -> std::borrow::Cow<'_, [f32]> {
    match m.as_f32() {
        Some(v) => std::borrow::Cow::Borrowed(v),
        None => std::borrow::Cow::Owned(m.to_f32()),
    }
}

/// The GGUF of a gpt-oss model: llama.cpp's `gpt-oss` architecture, F16 dense matrices, F32
/// router/norms/biases/sinks, MXFP4 experts (see the module docs). `name` goes to
/// `general.name`.
///
/// Errors: a config or weights that llama.cpp's gpt-oss cannot express — another architecture
/// or activation, dense MLP layers, dense (non-MXFP4) experts, layers whose head counts or head
/// dims differ, a rotary dim other than the head dim, a sliding window that differs between
/// layers, or an attention pattern other than sliding on even layers and full on odd ones.
pub fn export_gpt_oss(cfg: &ModelConfig, w: &Weights, name: &str) -> Result<GgufWriter, GgufError> {
    let unsupported = |s: String| Err(GgufError::Unsupported(s));
    if cfg.arch != Arch::GptOss || cfg.router != RouterSpec::GptOss {
        return unsupported(format!("architecture {:?} is not gpt-oss", cfg.arch));
    }
    let (alpha, limit) = match cfg.activation {
        Activation::ClampedSwiglu { alpha, limit } => (alpha, limit),
        a => {
            return unsupported(format!(
                "activation {a:?}: llama.cpp's gpt-oss has clamped SwiGLU"
            ))
        }
    };
    if (alpha - 1.702).abs() > 1e-6 || (limit - 7.0).abs() > 1e-6 {
        return unsupported(format!(
            "SwiGLU alpha {alpha}, limit {limit}: llama.cpp hard-codes 1.702 and 7"
        ));
    }
    let l0 = cfg
        .layers
        .first()
        .ok_or_else(|| GgufError::Unsupported("no layers".into()))?;
    let mut window = None;
    for (i, s) in cfg.layers.iter().enumerate() {
        if (s.n_heads, s.n_kv_heads, s.head_dim, s.v_head_dim, s.rope)
            != (
                l0.n_heads,
                l0.n_kv_heads,
                l0.head_dim,
                l0.v_head_dim,
                l0.rope,
            )
        {
            return unsupported(format!(
                "layer {i}: heads, head dims or RoPE differ from layer 0"
            ));
        }
        if !s.moe || !s.sinks || !s.attn_bias || s.qk_norm {
            return unsupported(format!(
                "layer {i}: gpt-oss layers are MoE with sinks and attention biases, no q/k norm"
            ));
        }
        match (s.attn, i % 2) {
            (AttnKind::Sliding { window: wdw }, 0) => {
                if window.is_some_and(|x| x != wdw) {
                    return unsupported("sliding windows differ between layers".into());
                }
                window = Some(wdw);
            }
            (AttnKind::Full, 1) => {}
            (a, _) => {
                return unsupported(format!(
                    "layer {i} is {a:?}: llama.cpp's gpt-oss slides on even layers only"
                ))
            }
        }
    }
    if l0.head_dim != l0.v_head_dim || l0.rope.rotary_dim != l0.head_dim {
        return unsupported("head dims / rotary dim differ".into());
    }
    let (h, v, e, i) = (
        cfg.hidden_size as u64,
        cfg.vocab_size as u64,
        cfg.n_experts as u64,
        cfg.moe_intermediate_size as u64,
    );
    let arch = "gpt-oss";
    let mut g = GgufWriter::new();
    let u = |x: usize| Value::U32(x as u32);
    g.kv("general.architecture", Value::Str(arch.into()));
    g.kv("general.name", Value::Str(name.into()));
    // LLAMA_FTYPE_MOSTLY_MXFP4_MOE: MXFP4 experts, the rest F16/F32.
    g.kv("general.file_type", Value::U32(38));
    g.kv(
        &format!("{arch}.context_length"),
        u(cfg.max_position_embeddings),
    );
    g.kv(&format!("{arch}.embedding_length"), u(cfg.hidden_size));
    g.kv(&format!("{arch}.block_count"), u(cfg.layers.len()));
    g.kv(
        &format!("{arch}.feed_forward_length"),
        u(cfg.moe_intermediate_size),
    );
    g.kv(
        &format!("{arch}.expert_feed_forward_length"),
        u(cfg.moe_intermediate_size),
    );
    g.kv(&format!("{arch}.expert_count"), u(cfg.n_experts));
    g.kv(&format!("{arch}.expert_used_count"), u(cfg.top_k));
    g.kv(&format!("{arch}.attention.head_count"), u(l0.n_heads));
    g.kv(&format!("{arch}.attention.head_count_kv"), u(l0.n_kv_heads));
    g.kv(&format!("{arch}.attention.key_length"), u(l0.head_dim));
    g.kv(&format!("{arch}.attention.value_length"), u(l0.v_head_dim));
    g.kv(
        &format!("{arch}.rope.dimension_count"),
        u(l0.rope.rotary_dim),
    );
    g.kv(
        &format!("{arch}.attention.layer_norm_rms_epsilon"),
        Value::F32(cfg.rms_norm_eps),
    );
    // A model with no sliding layer (one layer) still needs the key; it is then unused.
    g.kv(
        &format!("{arch}.attention.sliding_window"),
        u(window.unwrap_or(128)),
    );
    g.kv(
        &format!("{arch}.rope.freq_base"),
        Value::F32(l0.rope.theta as f32),
    );
    if let Some(y) = l0.rope.yarn {
        g.kv(
            &format!("{arch}.rope.scaling.type"),
            Value::Str("yarn".into()),
        );
        g.kv(
            &format!("{arch}.rope.scaling.factor"),
            Value::F32(y.factor as f32),
        );
        g.kv(
            &format!("{arch}.rope.scaling.original_context_length"),
            u(y.original_max_position_embeddings),
        );
    }
    g.kv(&format!("{arch}.vocab_size"), u(cfg.vocab_size));
    g.kv("tokenizer.ggml.model", Value::Str("none".into()));

    g.tensor_f16("token_embd.weight", &[h, v], &dense(&w.embed))?;
    for (l, layer) in w.layers.iter().enumerate() {
        let p = |s: &str| format!("blk.{l}.{s}");
        let a = &layer.attn;
        g.tensor_f32(&p("attn_norm.weight"), &[h], &layer.input_norm)?;
        g.tensor_f32(
            &p("post_attention_norm.weight"),
            &[h],
            &layer.post_attn_norm,
        )?;
        for (n, lin) in [
            ("attn_q", &a.q),
            ("attn_k", &a.k),
            ("attn_v", &a.v),
            ("attn_output", &a.o),
        ] {
            let (rows, cols) = (lin.w.rows as u64, lin.w.cols as u64);
            g.tensor_f16(&p(&format!("{n}.weight")), &[cols, rows], &dense(&lin.w))?;
            let b = lin
                .bias
                .as_ref()
                .ok_or_else(|| GgufError::Unsupported(format!("layer {l}: {n} has no bias")))?;
            g.tensor_f32(&p(&format!("{n}.bias")), &[rows], b)?;
        }
        let sinks = a
            .sinks
            .as_ref()
            .ok_or_else(|| GgufError::Unsupported(format!("layer {l}: no sinks")))?;
        g.tensor_f32(&p("attn_sinks.weight"), &[sinks.len() as u64], sinks)?;
        let Mlp::Moe(moe) = &layer.mlp else {
            return unsupported(format!("layer {l}: dense MLP"));
        };
        if moe.gate_up_layout != GateUpLayout::Interleaved || moe.experts.len() as u64 != e {
            return unsupported(format!(
                "layer {l}: gate/up not interleaved or expert count"
            ));
        }
        g.tensor_f32(&p("ffn_gate_inp.weight"), &[h, e], &dense(&moe.router.w))?;
        let rb = moe
            .router
            .bias
            .as_ref()
            .ok_or_else(|| GgufError::Unsupported(format!("layer {l}: router has no bias")))?;
        g.tensor_f32(&p("ffn_gate_inp.bias"), &[e], rb)?;
        let (mut gate, mut up, mut down) = (Vec::new(), Vec::new(), Vec::new());
        let (mut gate_b, mut up_b, mut down_b) = (Vec::new(), Vec::new(), Vec::new());
        for (x, ex) in moe.experts.iter().enumerate() {
            let mx = |m: &ExpertMat, what: &str| -> Result<Vec<u8>, GgufError> {
                match m {
                    ExpertMat::Mxfp4(q) => Ok(fp4::layout::to_gguf(q.view().map_err(|err| {
                        GgufError::Tensor {
                            name: p(&format!("expert {x} {what}")),
                            what: err.to_string(),
                        }
                    })?)),
                    ExpertMat::Dense(_) => Err(GgufError::Unsupported(format!(
                        "layer {l} expert {x}: {what} is dense; the benchmark's experts are MXFP4"
                    ))),
                }
            };
            let gu = mx(&ex.gate_up, "gate_up")?;
            let row = (h / 32) as usize * fp4::layout::GGUF_BLOCK_BYTES;
            if gu.len() != 2 * i as usize * row {
                return unsupported(format!("layer {l} expert {x}: gate_up shape"));
            }
            for (r, bytes) in gu.chunks_exact(row).enumerate() {
                if r % 2 == 0 { &mut gate } else { &mut up }.extend_from_slice(bytes);
            }
            down.extend_from_slice(&mx(&ex.down, "down")?);
            let bias = |b: &Option<Vec<f32>>, what: &str| {
                b.clone().ok_or_else(|| {
                    GgufError::Unsupported(format!("layer {l} expert {x}: no {what} bias"))
                })
            };
            let gub = bias(&ex.gate_up_bias, "gate_up")?;
            gate_b.extend(gub.iter().step_by(2));
            up_b.extend(gub.iter().skip(1).step_by(2));
            down_b.extend(bias(&ex.down_bias, "down")?);
        }
        g.tensor(
            &p("ffn_gate_exps.weight"),
            &[h, i, e],
            TensorType::Mxfp4,
            gate,
        )?;
        g.tensor(&p("ffn_up_exps.weight"), &[h, i, e], TensorType::Mxfp4, up)?;
        g.tensor(
            &p("ffn_down_exps.weight"),
            &[i, h, e],
            TensorType::Mxfp4,
            down,
        )?;
        g.tensor_f32(&p("ffn_gate_exps.bias"), &[i, e], &gate_b)?;
        g.tensor_f32(&p("ffn_up_exps.bias"), &[i, e], &up_b)?;
        g.tensor_f32(&p("ffn_down_exps.bias"), &[h, e], &down_b)?;
    }
    g.tensor_f32("output_norm.weight", &[h], &w.final_norm)?;
    g.tensor_f16("output.weight", &[h, v], &dense(&w.lm_head))?;
    Ok(g)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{LayerSpec, Rope, Yarn};
    use crate::cpu::toy::{random_weights, ToyExperts};

    fn tiny() -> ModelConfig {
        let rope = Rope {
            theta: 150000.0,
            rotary_dim: 16,
            yarn: Some(Yarn::gpt_oss()),
        };
        ModelConfig {
            arch: Arch::GptOss,
            vocab_size: 50,
            hidden_size: 64,
            layers: (0..2)
                .map(|l| LayerSpec {
                    attn: if l == 0 {
                        AttnKind::Sliding { window: 8 }
                    } else {
                        AttnKind::Full
                    },
                    n_heads: 4,
                    n_kv_heads: 2,
                    head_dim: 16,
                    v_head_dim: 16,
                    rope,
                    sinks: true,
                    qk_norm: false,
                    attn_bias: true,
                    moe: true,
                })
                .collect(),
            rms_norm_eps: 1e-5,
            n_experts: 4,
            top_k: 2,
            moe_intermediate_size: 32,
            dense_intermediate_size: None,
            router: RouterSpec::GptOss,
            activation: Activation::ClampedSwiglu {
                alpha: 1.702,
                limit: 7.0,
            },
            value_scale: 1.0,
            tie_word_embeddings: false,
            max_position_embeddings: 4096,
            bos_token_id: None,
            eos_token_ids: vec![1],
            pad_token_id: None,
        }
    }

    fn f32s(b: &[u8]) -> Vec<f32> {
        b.chunks_exact(4)
            .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
            .collect()
    }

    #[test]
    fn tiny_gpt_oss_round_trips_through_the_header_reader() {
        let cfg = tiny();
        let w = random_weights(&cfg, 7, ToyExperts::Mxfp4);
        let bytes = export_gpt_oss(&cfg, &w, "tiny").unwrap().to_bytes();
        let hdr = GgufHeader::parse(&bytes).unwrap();

        assert_eq!(hdr.kv["general.architecture"], Value::Str("gpt-oss".into()));
        assert_eq!(hdr.kv["gpt-oss.block_count"], Value::U32(2));
        assert_eq!(hdr.kv["gpt-oss.expert_used_count"], Value::U32(2));
        assert_eq!(hdr.kv["gpt-oss.attention.sliding_window"], Value::U32(8));
        assert_eq!(hdr.kv["gpt-oss.rope.scaling.factor"], Value::F32(32.0));
        assert_eq!(hdr.kv["gpt-oss.vocab_size"], Value::U32(50));
        // 3 global + 19 per layer (norms 2, q/k/v/o weight+bias 8, sinks, router 2, experts 6).
        assert_eq!(hdr.tensors.len(), 3 + 2 * 19);

        let t = &hdr.tensors["token_embd.weight"];
        assert_eq!(
            (t.dims.as_slice(), t.ty),
            (&[64u64, 50][..], TensorType::F16)
        );
        let first = f16::from_le_bytes([bytes[t.start], bytes[t.start + 1]]);
        assert_eq!(first, f16::from_f32(w.embed.to_f32()[0]));

        let t = &hdr.tensors["blk.1.ffn_gate_inp.weight"];
        assert_eq!(
            (t.dims.as_slice(), t.ty),
            (&[64u64, 4][..], TensorType::F32)
        );
        let Mlp::Moe(moe) = &w.layers[1].mlp else {
            unreachable!()
        };
        assert_eq!(
            f32s(&bytes[t.start..t.start + t.nbytes]),
            moe.router.w.to_f32()
        );

        // Expert 2's up rows are gate_up's odd rows, in GGUF block_mxfp4 order: decoding them
        // back gives exactly those rows.
        let t = &hdr.tensors["blk.1.ffn_up_exps.weight"];
        assert_eq!(
            (t.dims.as_slice(), t.ty),
            (&[64u64, 32, 4][..], TensorType::Mxfp4)
        );
        let per_expert = t.nbytes / 4;
        let ex2 = &bytes[t.start + 2 * per_expert..t.start + 3 * per_expert];
        let up = fp4::layout::from_gguf(ex2, 32, 64).unwrap();
        let ExpertMat::Mxfp4(gu) = &moe.experts[2].gate_up else {
            unreachable!()
        };
        let gu = fp4::dequantize(gu.view().unwrap());
        let odd: Vec<f32> = gu
            .chunks_exact(64)
            .skip(1)
            .step_by(2)
            .flatten()
            .copied()
            .collect();
        assert_eq!(fp4::dequantize(up.view().unwrap()), odd);

        let t = &hdr.tensors["blk.0.ffn_gate_exps.bias"];
        assert_eq!(t.dims, [32u64, 4]);
        let gb = f32s(&bytes[t.start..t.start + t.nbytes]);
        let want: Vec<f32> = moe_of(&w, 0).experts[0]
            .gate_up_bias
            .as_ref()
            .unwrap()
            .iter()
            .step_by(2)
            .copied()
            .collect();
        assert_eq!(&gb[..32], &want[..]);

        let t = &hdr.tensors["blk.0.ffn_down_exps.weight"];
        assert_eq!(t.dims, [32u64, 64, 4]);
        assert_eq!(t.start % ALIGNMENT, 0);
    }

    fn moe_of(w: &Weights, l: usize) -> &crate::weights::Moe {
        match &w.layers[l].mlp {
            Mlp::Moe(m) => m,
            Mlp::Dense { .. } => unreachable!(),
        }
    }

    #[test]
    fn writer_and_reader_reject_bad_input() {
        let mut g = GgufWriter::new();
        g.tensor_f32("a", &[2, 2], &[0.0; 4]).unwrap();
        let e = g.tensor_f32("a", &[4], &[0.0; 4]).unwrap_err().to_string();
        assert!(e.contains("written twice"), "{e}");
        let e = g.tensor_f32("b", &[3], &[0.0; 4]).unwrap_err().to_string();
        assert!(e.contains("expected 12"), "{e}");
        let e = g
            .tensor("c", &[48], TensorType::Mxfp4, vec![0; 17])
            .unwrap_err()
            .to_string();
        assert!(e.contains("do not fit"), "{e}");

        let bytes = g.to_bytes();
        let hdr_end = |b: &[u8]| {
            let t = &GgufHeader::parse(b).unwrap().tensors["a"];
            t.start + t.nbytes
        };
        let e = GgufHeader::parse(&bytes[..hdr_end(&bytes) - 1])
            .unwrap_err()
            .to_string();
        assert!(e.contains("beyond the end"), "{e}");
        let e = GgufHeader::parse(&bytes[..20]).unwrap_err().to_string();
        assert!(e.contains("truncated"), "{e}");
        let e = GgufHeader::parse(b"GGML\x03\0\0\0")
            .unwrap_err()
            .to_string();
        assert!(e.contains("magic"), "{e}");

        let mut cfg = tiny();
        cfg.layers[0].attn = AttnKind::Full;
        let w = random_weights(&cfg, 1, ToyExperts::Mxfp4);
        let e = export_gpt_oss(&cfg, &w, "x").err().unwrap().to_string();
        assert!(e.contains("slides on even layers"), "{e}");
        let cfg = tiny();
        let w = random_weights(&cfg, 1, ToyExperts::Dense);
        let e = export_gpt_oss(&cfg, &w, "x").err().unwrap().to_string();
        assert!(e.contains("is dense"), "{e}");
    }
}
