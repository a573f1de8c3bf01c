//! DFlash drafting on the GPU: a drafter's weights on the device ([`GpuDrafter`], from the
//! model-level `model::drafter` types) and its per-sequence context cache and forward
//! ([`GpuDraftSession`]). The speculative loop's GPU backend that pairs them with a
//! [`GpuSession`] lives with the loop (`dflash::gpu`, feature `cuda`): this crate does not
//! depend on `dflash`.
//!
//! The math is `dflash::drafter`'s (research/dflash.md §2–3), launched with the [`Ops`] kernels:
//!
//! ```text
//! context (n ≤ 16 committed tokens, features = the target's captured hidden states):
//!   fc (K column blocks, accumulated) → rms_norm(hidden_norm)
//!   per layer: qkv linear → rope_kv_write at the tokens' positions (k, v into the draft cache)
//! draft (block [x_last, MASK × (B−1)] at positions start .. start+B):
//!   embed(x_last) ‖ mask rows → per layer: rms_norm → qkv → rope_kv_write → attention
//!   (bidirectional / causal / sliding as the config says) → o (+= residual) → rms_norm → gate_up
//!   → SwiGLU → down (+= residual) → rms_norm(norm) on rows 1..B → the TARGET's LM head → argmax
//! ```
//!
//! Both passes are captured as CUDA graphs (one per context length n and one per block size B)
//! and replayed: what changes between rounds (positions, `x_last`) lives in a small device
//! buffer written before each replay. The block's keys and values are written at their
//! positions in the draft cache and overwritten by the committed context of the next round, so
//! the cache holds committed context only where it is ever read as such.
//!
//! A non-causal sliding window `W` shorter than the block (query `p` sees keys up to
//! `p + W − 1`, not the block's end; only tiny test drafters have that) is handled exactly: the
//! rows whose upper bound falls inside the block are recomputed one by one.
//!
//! `input_embedding_scale ≠ 1` (for targets that scale their embeddings, z-lab's
//! `_raw_input_embeddings`) multiplies the block's input rows as the CPU drafter does: the mask
//! rows are scaled once on the host at upload; `x_last`'s row is scaled on the device by the
//! `linear` op with the gathered row as a `[H, 1]` weight and the scale as the one-element input
//! (`y[r] = row[r] · scale`, one rounded f32 product per element: the CPU's `v *= scale`).

use std::collections::HashMap;
use std::sync::Arc;

use cudarc::driver::{CudaGraph, CudaStream};
use model::drafter::{
    hidden_index, DraftAttn, DrafterConfig, DrafterWeights, MAX_BLOCK_SIZE, MIN_BLOCK_SIZE,
};
use model::weights::{Mat, Mlp};
use model::RopeTable;

use crate::arena::{dtod, dtoh, htod, Arena, DPtr};
use crate::exec::{
    capture_graph, upload_linear, upload_opt, upload_qkv, upload_ropes, GpuModel, GpuSession, Rope,
    SESSION_CHUNK_BYTES,
};
use crate::ops::{AttnArgs, GluArgs, MAX_TOKENS};
use crate::tensor::{patterned_vector, DenseData, DeviceMatrix};
use crate::RuntimeError;

struct DraftLayer {
    input_norm: DPtr<f32>,
    post_attn_norm: DPtr<f32>,
    /// `[q; k; v]` rows fused.
    qkv: DeviceMatrix,
    qkv_bias: Option<DPtr<f32>>,
    o: DeviceMatrix,
    o_bias: Option<DPtr<f32>>,
    q_norm: Option<DPtr<f32>>,
    k_norm: Option<DPtr<f32>>,
    sinks: Option<DPtr<f32>>,
    /// `[2I, H]`, gate rows then up rows.
    gate_up: DeviceMatrix,
    down: DeviceMatrix,
}

struct Inner {
    config: Arc<DrafterConfig>,
    target: GpuModel,
    /// `fc` split by target layer: `K` matrices `[H, H_t]`, summed (`fc · [h₀ ‖ … ‖ h_K−1]`).
    fc: Vec<DeviceMatrix>,
    hidden_norm: DPtr<f32>,
    norm: DPtr<f32>,
    layers: Vec<DraftLayer>,
    rope: Rope,
    /// `[MAX_TOKENS − 1, H]`: the block's mask row (the mask embedding, or the target's
    /// embedding of the mask token) repeated.
    mask_rows: DPtr<f32>,
    /// The target's hidden-state indices of `target_layer_ids` (as `GpuSession::set_capture`).
    hidden_indices: Vec<usize>,
    /// `[1]`: `input_embedding_scale` when it is not 1 (the draft pass then scales `x_last`'s
    /// embedding row on the device; the mask rows are uploaded scaled).
    embed_scale: Option<DPtr<f32>>,
    weight_bytes: usize,
    _arena: Arena,
}

/// A DFlash drafter resident on the GPU of its target (whose embedding and LM head it borrows).
/// Cheap to clone (shared).
#[derive(Clone)]
pub struct GpuDrafter {
    inner: Arc<Inner>,
}

fn invalid(e: impl std::fmt::Display) -> RuntimeError {
    RuntimeError::Invalid(e.to_string())
}

fn device_addr(m: &DeviceMatrix) -> u64 {
    match m.data {
        DenseData::Bf16(p) => p.addr(),
        DenseData::F32(p) => p.addr(),
    }
}

/// Columns `c0 .. c0 + n` of a row-major matrix.
fn column_block(m: &Mat, c0: usize, n: usize) -> Vec<f32> {
    (0..m.rows)
        .flat_map(|r| m.row(r)[c0..c0 + n].to_vec())
        .collect()
}

/// The rows of the draft block whose attention must be recomputed alone: with a non-causal
/// window `W < block`, query `i` may see keys only up to position `start + i + W − 1`, short of
/// the block's end, for `i < block − W` (the attention kernel's non-causal range ends at the
/// block's end).
fn short_window_rows(attn: DraftAttn, block: usize) -> std::ops::Range<usize> {
    match (attn.causal, attn.window) {
        (false, Some(w)) if w < block => 0..block - w,
        _ => 0..0,
    }
}

/// Key-cache capacity of one draft layer for sequences of at most `max_seq` committed positions:
/// full attention keeps every position up to the block's end; a window `W` keeps a ring of
/// `W + MAX_TOKENS` (the oldest key a block query sees is `W − 1` before the block start, the
/// newest `MAX_TOKENS − 1` after it).
fn cache_capacity(attn: DraftAttn, max_seq: usize) -> usize {
    let full = max_seq + MAX_TOKENS;
    attn.window.map_or(full, |w| (w + MAX_TOKENS).min(full))
}

impl GpuDrafter {
    /// Uploads a drafter (`config` + `weights`, as `dflash::Drafter::config` / `weights`) next
    /// to its `target` (checked against the config, and against the target: hidden size,
    /// vocabulary, target layers, mask token).
    pub fn new(
        target: &GpuModel,
        config: &DrafterConfig,
        weights: &DrafterWeights,
    ) -> Result<Self, RuntimeError> {
        weights.check(config).map_err(invalid)?;
        weights
            .check_target(config, target.config())
            .map_err(invalid)?;
        let (c, w) = (config, weights);
        let mut arena = Arena::new(target.stream().clone());
        let k = c.num_features();
        let ht = w.fc.cols / k;
        let fc = (0..k)
            .map(|i| {
                let block = column_block(&w.fc, i * ht, ht);
                DeviceMatrix::upload(&mut arena, &block, w.fc.rows, ht, &format!("fc block {i}"))
            })
            .collect::<Result<Vec<_>, _>>()?;
        let mut layers = Vec::with_capacity(w.layers.len());
        for (l, lw) in w.layers.iter().enumerate() {
            let at = |what: &str| format!("draft layer {l} {what}");
            let a = &lw.attn;
            let (qkv, qkv_bias) = upload_qkv(&mut arena, a, None, &at("qkv"))?;
            let (o, o_bias) = upload_linear(&mut arena, &a.o, &at("o_proj"))?;
            let Mlp::Dense { gate_up, down } = &lw.mlp else {
                return Err(invalid(format!("draft layer {l}: not a dense MLP")));
            };
            layers.push(DraftLayer {
                input_norm: arena.upload(&lw.input_norm, &at("input norm"))?,
                post_attn_norm: arena.upload(&lw.post_attn_norm, &at("post-attention norm"))?,
                qkv,
                qkv_bias,
                o,
                o_bias,
                q_norm: upload_opt(&mut arena, a.q_norm.as_ref(), &at("q norm"))?,
                k_norm: upload_opt(&mut arena, a.k_norm.as_ref(), &at("k norm"))?,
                sinks: upload_opt(&mut arena, a.sinks.as_ref(), &at("sinks"))?,
                gate_up: upload_linear(&mut arena, gate_up, &at("gate_up"))?.0,
                down: upload_linear(&mut arena, down, &at("down"))?.0,
            });
        }
        let hidden_norm = arena.upload(&w.hidden_norm, "hidden norm")?;
        let norm = arena.upload(&w.norm, "draft norm")?;
        Self::assemble(
            target,
            c.clone(),
            arena,
            fc,
            hidden_norm,
            norm,
            layers,
            w.mask_embedding.clone(),
        )
    }

    /// A drafter of `config`'s shape with random weights generated on the device (benchmarks:
    /// nothing large on the host), next to `target`. Every layer gets q/k norms; sinks when the
    /// config has them; no biases.
    pub fn synthetic(
        target: &GpuModel,
        config: DrafterConfig,
        seed: u64,
    ) -> Result<Self, RuntimeError> {
        let tc = target.config();
        config
            .check_target_dims(
                config.num_features() * tc.hidden_size,
                tc.vocab_size,
                tc.hidden_size,
                tc.layers.len(),
            )
            .map_err(invalid)?;
        let ops = target.ops();
        let mut arena = Arena::new(target.stream().clone());
        let (h, nh, nkv, d, inter) = (
            config.hidden_size,
            config.n_heads,
            config.n_kv_heads,
            config.head_dim,
            config.intermediate_size,
        );
        let mut seed = seed;
        let mut next = || {
            seed = seed
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            seed
        };
        let mut dense = |arena: &mut Arena, rows: usize, cols: usize, what: &str| {
            DeviceMatrix::synthetic(arena, ops, rows, cols, next(), what)
        };
        let fc = (0..config.num_features())
            .map(|i| dense(&mut arena, h, tc.hidden_size, &format!("fc block {i}")))
            .collect::<Result<Vec<_>, _>>()?;
        let mut layers = Vec::with_capacity(config.num_layers());
        for l in 0..config.num_layers() {
            let at = |what: &str| format!("draft layer {l} {what}");
            let v = |arena: &mut Arena, n: usize, c: f32, s: f32, what: &str| {
                patterned_vector(arena, n, c, s, &at(what))
            };
            layers.push(DraftLayer {
                input_norm: v(&mut arena, h, 1.0, 0.1, "input norm")?,
                post_attn_norm: v(&mut arena, h, 1.0, 0.1, "post-attention norm")?,
                qkv: dense(&mut arena, nh * d + 2 * nkv * d, h, &at("qkv"))?,
                qkv_bias: None,
                o: dense(&mut arena, h, nh * d, &at("o_proj"))?,
                o_bias: None,
                q_norm: Some(v(&mut arena, d, 1.0, 0.1, "q norm")?),
                k_norm: Some(v(&mut arena, d, 1.0, 0.1, "k norm")?),
                sinks: if config.sinks {
                    Some(v(&mut arena, nh, 0.0, 0.5, "sinks")?)
                } else {
                    None
                },
                gate_up: dense(&mut arena, 2 * inter, h, &at("gate_up"))?,
                down: dense(&mut arena, h, inter, &at("down"))?,
            });
        }
        let hidden_norm = patterned_vector(&mut arena, h, 1.0, 0.1, "hidden norm")?;
        let norm = patterned_vector(&mut arena, h, 1.0, 0.1, "draft norm")?;
        Self::assemble(target, config, arena, fc, hidden_norm, norm, layers, None)
    }

    #[allow(clippy::too_many_arguments)]
    fn assemble(
        target: &GpuModel,
        config: DrafterConfig,
        mut arena: Arena,
        fc: Vec<DeviceMatrix>,
        hidden_norm: DPtr<f32>,
        norm: DPtr<f32>,
        layers: Vec<DraftLayer>,
        mask_embedding: Option<Vec<f32>>,
    ) -> Result<Self, RuntimeError> {
        let h = config.hidden_size;
        let mask_row = match mask_embedding {
            Some(m) => m,
            None => {
                // The target's embedding row of the mask token, gathered on the device.
                let tok = arena.upload(&[config.mask_token_id], "mask token")?;
                let row = arena.alloc::<f32>(h, "mask row")?;
                let stream = target.stream();
                target
                    .ops()
                    .embed(stream, target.embed_matrix(), tok, 1, row)?;
                dtoh(stream, row)?
            }
        };
        let scale = config.input_embedding_scale;
        if !scale.is_finite() {
            return Err(invalid(format!("input_embedding_scale {scale}")));
        }
        // The CPU drafter multiplies the copied rows in place (`v *= scale`): the same f32
        // products here.
        let mask_row: Vec<f32> = if scale == 1.0 {
            mask_row
        } else {
            mask_row.iter().map(|&v| v * scale).collect()
        };
        let mask_rows = arena.upload(&mask_row.repeat(MAX_TOKENS - 1), "mask rows")?;
        let embed_scale = if scale == 1.0 {
            None
        } else {
            Some(arena.upload(&[scale], "input embedding scale")?)
        };
        let rope = upload_ropes(&mut arena, &[RopeTable::new(&config.rope)])?[0];
        let nl = target.config().layers.len();
        let hidden_indices = config
            .target_layer_ids
            .iter()
            .map(|&l| {
                hidden_index(l, nl)
                    .ok_or_else(|| invalid(format!("target layer {l} ≥ the target's {nl} layers")))
            })
            .collect::<Result<Vec<_>, _>>()?;
        target.stream().synchronize()?;
        Ok(Self {
            inner: Arc::new(Inner {
                config: Arc::new(config),
                target: target.clone(),
                fc,
                hidden_norm,
                norm,
                layers,
                rope,
                mask_rows,
                hidden_indices,
                embed_scale,
                weight_bytes: arena.used_bytes(),
                _arena: arena,
            }),
        })
    }

    pub fn config(&self) -> &DrafterConfig {
        &self.inner.config
    }

    /// The target model this drafter runs with.
    pub fn target(&self) -> &GpuModel {
        &self.inner.target
    }

    /// The target's hidden-state indices the drafter reads (`GpuSession::set_capture`).
    pub fn hidden_indices(&self) -> &[usize] {
        &self.inner.hidden_indices
    }

    /// Device bytes of the drafter's own weights.
    pub fn weight_bytes(&self) -> usize {
        self.inner.weight_bytes
    }

    /// A new empty per-sequence draft state for sequences of at most `max_seq` positions.
    pub fn session(&self, max_seq: usize) -> Result<GpuDraftSession, RuntimeError> {
        GpuDraftSession::new(self.clone(), max_seq)
    }
}

struct LayerKv {
    k: DPtr<f32>,
    v: DPtr<f32>,
    capacity: usize,
}

struct Buffers {
    /// `[context start, x_last, start, start + 1, …, start + MAX_TOKENS − 1]`.
    io: DPtr<u32>,
    ctx: DPtr<f32>,
    ctx_normed: DPtr<f32>,
    x: DPtr<f32>,
    h: DPtr<f32>,
    qkv: DPtr<f32>,
    q: DPtr<f32>,
    attn: DPtr<f32>,
    attn_row: DPtr<f32>,
    attn_scratch: DPtr<f32>,
    gu: DPtr<f32>,
    act: DPtr<f32>,
    logits: DPtr<f32>,
    argmax: DPtr<u32>,
    argmax_scratch: DPtr<u32>,
}

/// io slots.
const IO_CTX_STEP: usize = 0;
const IO_X_LAST: usize = 1;
const IO_BLOCK_STEP: usize = 2;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Pass {
    /// Context append of `n` tokens whose features are at these captured-hidden addresses
    /// (the first slot's; the slots are consecutive).
    Context { n: usize, hidden: u64 },
    /// A draft block of `block` tokens.
    Draft { block: usize },
}

/// One sequence's drafter state on the device: each layer's key/value cache of the committed
/// context (plus the transient block), activation buffers, captured graphs.
pub struct GpuDraftSession {
    drafter: GpuDrafter,
    arena: Arena,
    kv: Vec<LayerKv>,
    b: Buffers,
    len: usize,
    max_seq: usize,
    graphs: HashMap<Pass, CudaGraph>,
    use_graphs: bool,
}

impl GpuDraftSession {
    fn new(drafter: GpuDrafter, max_seq: usize) -> Result<Self, RuntimeError> {
        if max_seq == 0 {
            return Err(invalid("max_seq must be positive"));
        }
        let m = &*drafter.inner;
        let c = &*m.config;
        let t = MAX_TOKENS;
        let mut arena = Arena::with_chunk_bytes(m.target.stream().clone(), SESSION_CHUNK_BYTES);
        let (h, nh, nkv, d, inter) = (
            c.hidden_size,
            c.n_heads,
            c.n_kv_heads,
            c.head_dim,
            c.intermediate_size,
        );
        let v = m.target.config().vocab_size;
        let mut kv = Vec::with_capacity(c.num_layers());
        for (l, attn) in c.layers.iter().enumerate() {
            let capacity = cache_capacity(*attn, max_seq);
            kv.push(LayerKv {
                k: arena.alloc(capacity * nkv * d, &format!("draft layer {l} key cache"))?,
                v: arena.alloc(capacity * nkv * d, &format!("draft layer {l} value cache"))?,
                capacity,
            });
        }
        let mut scratch = 1;
        for (l, kv) in kv.iter().enumerate() {
            let a = attn_args(m, l, kv);
            // Fewer queries get more key splits: the largest need is not always at T = 16.
            for rows in 1..=t {
                scratch = scratch.max(crate::ops::Ops::attention_scratch_len(
                    &a,
                    rows,
                    kv.capacity,
                ));
            }
        }
        let b = Buffers {
            io: arena.alloc(IO_BLOCK_STEP + t, "draft io")?,
            ctx: arena.alloc(t * h, "draft context")?,
            ctx_normed: arena.alloc(t * h, "draft context (normed)")?,
            x: arena.alloc(t * h, "draft residual")?,
            h: arena.alloc(t * h, "draft normed activations")?,
            qkv: arena.alloc(t * (nh + 2 * nkv) * d, "draft qkv")?,
            q: arena.alloc(t * nh * d, "draft queries")?,
            attn: arena.alloc(t * nh * d, "draft attention output")?,
            attn_row: arena.alloc(t * nh * d, "draft attention rows")?,
            attn_scratch: arena.alloc(scratch, "draft attention scratch")?,
            gu: arena.alloc(t * 2 * inter, "draft gate_up")?,
            act: arena.alloc(t * inter, "draft activations")?,
            logits: arena.alloc((t - 1) * v, "draft logits")?,
            argmax: arena.alloc(t - 1, "draft argmax")?,
            argmax_scratch: arena.alloc(crate::ops::ARGMAX_SCRATCH, "draft argmax scratch")?,
        };
        m.target.stream().synchronize()?;
        Ok(Self {
            drafter,
            arena,
            kv,
            b,
            len: 0,
            max_seq,
            graphs: HashMap::new(),
            use_graphs: true,
        })
    }

    /// Committed context tokens (the next block's `x_last` sits at this position).
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The drafter this state belongs to.
    pub fn drafter(&self) -> &GpuDrafter {
        &self.drafter
    }

    /// Checks that `target` can feed this state: a session of the drafter's target model
    /// holding at most as many positions as this state.
    pub fn check_target(&self, target: &GpuSession) -> Result<(), RuntimeError> {
        let (a, b) = (target.model(), self.drafter.target());
        if device_addr(a.embed_matrix()) != device_addr(b.embed_matrix()) {
            return Err(invalid(
                "the session's model is not the drafter's target model",
            ));
        }
        if self.max_seq < target.max_seq() {
            return Err(invalid(format!(
                "the draft state holds {} positions, the target session {}",
                self.max_seq,
                target.max_seq()
            )));
        }
        Ok(())
    }

    /// Device bytes this state holds (caches + buffers, as reserved from the device).
    pub fn device_bytes(&self) -> usize {
        self.arena.reserved_bytes()
    }

    /// Launch op by op instead of replaying captured graphs.
    pub fn set_use_graphs(&mut self, on: bool) {
        self.use_graphs = on;
    }

    /// Forgets every committed token.
    pub fn reset(&mut self) {
        self.len = 0;
    }

    /// Drops committed context beyond `len` (the cache keeps the rest; later appends overwrite).
    pub fn truncate(&mut self, len: usize) -> Result<(), RuntimeError> {
        if len > self.len {
            return Err(invalid(format!(
                "cannot truncate the draft context to {len}: it holds {}",
                self.len
            )));
        }
        self.len = len;
        Ok(())
    }

    fn stream(&self) -> Arc<CudaStream> {
        self.drafter.inner.target.stream().clone()
    }

    /// Appends `n ≤ MAX_TOKENS` committed tokens at positions `len() ..`, their features read
    /// from `target`'s captured hidden states (rows `0..n` of the latest pass; the session must
    /// capture [`GpuDrafter::hidden_indices`], in that order).
    pub fn append_context(&mut self, target: &GpuSession, n: usize) -> Result<(), RuntimeError> {
        if n == 0 || n > MAX_TOKENS {
            return Err(invalid(format!(
                "context append of {n} tokens (1..={MAX_TOKENS})"
            )));
        }
        if self.len + n > self.max_seq {
            return Err(invalid(format!(
                "the draft context would hold {} positions; at most {}",
                self.len + n,
                self.max_seq
            )));
        }
        if target.capture() != self.drafter.hidden_indices() {
            return Err(invalid(format!(
                "the target session captures hidden states {:?}; the drafter reads {:?}",
                target.capture(),
                self.drafter.hidden_indices()
            )));
        }
        let k = self.drafter.inner.fc.len();
        let hidden: Vec<DPtr<f32>> = (0..k).map(|s| target.captured_hidden(s, n)).collect();
        htod(
            &self.stream(),
            &[self.len as u32],
            self.b.io.slice(IO_CTX_STEP..IO_CTX_STEP + 1),
        )?;
        let key = Pass::Context {
            n,
            hidden: hidden[0].addr(),
        };
        self.run(key, &|me: &Self| me.encode_context(n, &hidden))?;
        self.len += n;
        Ok(())
    }

    /// One draft forward of `[x_last, MASK × (block − 1)]` at positions `len() ..`; the
    /// `block − 1` draft rows stay on the device ([`GpuDraftSession::logits_device`],
    /// [`GpuDraftSession::argmax_device`]).
    pub fn draft(&mut self, x_last: u32, block: usize) -> Result<(), RuntimeError> {
        let v = self.drafter.inner.target.config().vocab_size;
        if !(MIN_BLOCK_SIZE..=MAX_BLOCK_SIZE).contains(&block) {
            return Err(invalid(format!(
                "block size {block} is outside {}..={}",
                MIN_BLOCK_SIZE, MAX_BLOCK_SIZE
            )));
        }
        if x_last as usize >= v {
            return Err(invalid(format!(
                "token {x_last} is outside the vocabulary (size {v})"
            )));
        }
        if self.len + block > self.max_seq + MAX_TOKENS {
            return Err(invalid(format!(
                "a block of {block} at position {} exceeds the draft cache",
                self.len
            )));
        }
        let mut io = vec![x_last];
        io.extend((0..MAX_TOKENS).map(|i| (self.len + i) as u32));
        htod(
            &self.stream(),
            &io,
            self.b.io.slice(IO_X_LAST..IO_BLOCK_STEP + MAX_TOKENS),
        )?;
        self.run(Pass::Draft { block }, &|me: &Self| me.encode_draft(block))
    }

    /// The `[rows, V]` draft logits of the latest [`GpuDraftSession::draft`], on the device.
    pub fn logits_device(&self, rows: usize) -> DPtr<f32> {
        let v = self.drafter.inner.target.config().vocab_size;
        self.b.logits.slice(0..rows.min(MAX_TOKENS - 1) * v)
    }

    /// The argmax of each draft row of the latest [`GpuDraftSession::draft`], on the device.
    pub fn argmax_device(&self, rows: usize) -> DPtr<u32> {
        self.b.argmax.slice(0..rows.min(MAX_TOKENS - 1))
    }

    fn run(
        &mut self,
        key: Pass,
        encode: &dyn Fn(&Self) -> Result<(), RuntimeError>,
    ) -> Result<(), RuntimeError> {
        if !self.use_graphs {
            return encode(self);
        }
        if !self.graphs.contains_key(&key) {
            if let Pass::Context { hidden, .. } = key {
                // The target's capture buffer moved: graphs of the old one are stale.
                self.graphs
                    .retain(|k, _| !matches!(k, Pass::Context { hidden: h, .. } if *h != hidden));
            }
            let g = capture_graph(&self.stream(), || encode(self))?;
            self.graphs.insert(key, g);
        }
        self.graphs[&key].launch()?;
        Ok(())
    }

    fn encode_context(&self, n: usize, hidden: &[DPtr<f32>]) -> Result<(), RuntimeError> {
        let m = &*self.drafter.inner;
        let c = &*m.config;
        let ops = m.target.ops();
        let s = &*self.stream();
        let b = &self.b;
        let h = c.hidden_size;
        let ctx = b.ctx.slice(0..n * h);
        for (k, (fc, rows)) in m.fc.iter().zip(hidden).enumerate() {
            ops.linear(s, fc, None, *rows, n, ctx, k > 0)?;
        }
        ops.rms_norm(s, ctx, m.hidden_norm, n, h, c.rms_norm_eps, b.ctx_normed)?;
        let step = b.io.slice(IO_CTX_STEP..IO_CTX_STEP + 1);
        for (l, (layer, kv)) in m.layers.iter().zip(&self.kv).enumerate() {
            let args = attn_args(m, l, kv);
            let qkv = b.qkv.slice(0..n * layer.qkv.rows);
            ops.linear(s, &layer.qkv, layer.qkv_bias, b.ctx_normed, n, qkv, false)?;
            ops.rope_kv_write(s, &args, qkv, n, step, b.q)?;
        }
        Ok(())
    }

    fn encode_draft(&self, block: usize) -> Result<(), RuntimeError> {
        let m = &*self.drafter.inner;
        let c = &*m.config;
        let ops = m.target.ops();
        let s = &*self.stream();
        let b = &self.b;
        let (h, nh, d, eps) = (c.hidden_size, c.n_heads, c.head_dim, c.rms_norm_eps);
        let x = b.x.slice(0..block * h);
        let x_last = b.io.slice(IO_X_LAST..IO_X_LAST + 1);
        match m.embed_scale {
            None => ops.embed(s, m.target.embed_matrix(), x_last, 1, x)?,
            Some(scale) => {
                // Gather into scratch, then x[0] = row · scale: `linear` with the row as a
                // `[H, 1]` weight and the scale as the single input value.
                let row = b.h.slice(0..h);
                ops.embed(s, m.target.embed_matrix(), x_last, 1, row)?;
                let w = DeviceMatrix {
                    data: DenseData::F32(row),
                    rows: h,
                    cols: 1,
                };
                ops.linear(s, &w, None, scale, 1, x.slice(0..h), false)?;
            }
        }
        dtod(
            s,
            m.mask_rows.slice(0..(block - 1) * h),
            x.slice(h..block * h),
        )?;
        let step = |i: usize| b.io.slice(IO_BLOCK_STEP + i..IO_BLOCK_STEP + i + 1);
        let row = nh * d;
        for (l, ((layer, kv), attn)) in m.layers.iter().zip(&self.kv).zip(&c.layers).enumerate() {
            let args = attn_args(m, l, kv);
            ops.rms_norm(s, x, layer.input_norm, block, h, eps, b.h)?;
            let qkv = b.qkv.slice(0..block * layer.qkv.rows);
            ops.linear(s, &layer.qkv, layer.qkv_bias, b.h, block, qkv, false)?;
            ops.rope_kv_write(s, &args, qkv, block, step(0), b.q)?;
            let keys = max_keys(*attn, kv);
            ops.attention(
                s,
                &args,
                b.q,
                block,
                step(0),
                attn.causal,
                keys,
                b.attn_scratch,
                b.attn,
            )?;
            if let Some(w) = attn.window {
                for i in short_window_rows(*attn, block) {
                    // Query i alone with its window's keys: a call of W queries from position
                    // start + i whose non-causal range ends at start + i + W − 1; its row 0.
                    ops.attention(
                        s,
                        &args,
                        b.q.slice(i * row..(i + w) * row),
                        w,
                        step(i),
                        false,
                        keys,
                        b.attn_scratch,
                        b.attn_row,
                    )?;
                    dtod(
                        s,
                        b.attn_row.slice(0..row),
                        b.attn.slice(i * row..(i + 1) * row),
                    )?;
                }
            }
            ops.linear(s, &layer.o, layer.o_bias, b.attn, block, x, true)?;
            ops.rms_norm(s, x, layer.post_attn_norm, block, h, eps, b.h)?;
            let inter = layer.down.cols;
            let gu = b.gu.slice(0..block * 2 * inter);
            ops.linear(s, &layer.gate_up, None, b.h, block, gu, false)?;
            ops.glu(s, GluArgs::Swiglu, gu, block, inter, b.act)?;
            ops.linear(s, &layer.down, None, b.act, block, x, true)?;
        }
        let rows = block - 1;
        ops.rms_norm(s, x.slice(h..block * h), m.norm, rows, h, eps, b.h)?;
        let lm_head = m.target.lm_head_matrix();
        let v = lm_head.rows;
        ops.linear(
            s,
            lm_head,
            None,
            b.h,
            rows,
            b.logits.slice(0..rows * v),
            false,
        )?;
        ops.argmax(s, b.logits, rows, v, b.argmax_scratch, b.argmax)?;
        Ok(())
    }
}

fn max_keys(attn: DraftAttn, kv: &LayerKv) -> usize {
    attn.window
        .map_or(kv.capacity, |w| (w + MAX_TOKENS).min(kv.capacity))
}

fn attn_args(m: &Inner, l: usize, kv: &LayerKv) -> AttnArgs {
    let c = &*m.config;
    let layer = &m.layers[l];
    AttnArgs {
        n_heads: c.n_heads,
        n_kv_heads: c.n_kv_heads,
        head_dim: c.head_dim,
        v_head_dim: c.head_dim,
        rotary_dim: m.rope.rotary_dim,
        inv_freq: m.rope.inv_freq,
        attention_factor: m.rope.attention_factor,
        q_norm: layer.q_norm,
        k_norm: layer.k_norm,
        eps: c.rms_norm_eps,
        value_scale: c.value_scale,
        k_cache: kv.k,
        v_cache: kv.v,
        capacity: kv.capacity,
        window: c.layers[l].window,
        sinks: layer.sinks,
        scale: (1.0 / (c.head_dim as f64).sqrt()) as f32,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn short_window_rows_only_for_non_causal_windows_shorter_than_the_block() {
        let a = |window, causal| DraftAttn { window, causal };
        assert_eq!(short_window_rows(a(None, false), 16), 0..0);
        assert_eq!(short_window_rows(a(Some(3), true), 16), 0..0);
        assert_eq!(short_window_rows(a(Some(1024), false), 16), 0..0);
        assert_eq!(short_window_rows(a(Some(16), false), 16), 0..0);
        // W = 3, B = 4: query 0 sees keys up to start + 2, short of the block end start + 3.
        assert_eq!(short_window_rows(a(Some(3), false), 4), 0..1);
        assert_eq!(short_window_rows(a(Some(1), false), 8), 0..7);
    }

    #[test]
    fn cache_capacity_covers_window_and_block() {
        let full = DraftAttn {
            window: None,
            causal: false,
        };
        assert_eq!(cache_capacity(full, 100), 100 + MAX_TOKENS);
        let sliding = DraftAttn {
            window: Some(6),
            causal: true,
        };
        // A block query at `start` sees keys from start − 5; the block ends at start + 15.
        assert_eq!(cache_capacity(sliding, 1000), 6 + MAX_TOKENS);
        assert_eq!(cache_capacity(sliding, 2), 2 + MAX_TOKENS);
    }

    #[test]
    fn column_block_takes_the_columns_of_each_row() {
        let m = Mat::from_f32(2, 4, (0..8).map(|x| x as f32).collect());
        assert_eq!(column_block(&m, 0, 2), [0.0, 1.0, 4.0, 5.0]);
        assert_eq!(column_block(&m, 2, 2), [2.0, 3.0, 6.0, 7.0]);
    }
}
