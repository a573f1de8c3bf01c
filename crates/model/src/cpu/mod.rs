//! The CPU reference executor: exact f32 math of gpt-oss, Qwen3-MoE and MiMo-V2-Flash as
//! transformers computes them — the embedded default and the oracle for every GPU path.
//!
//! * [`ops`]: the ops as small pure functions (RMSNorm, RoPE application, attention with GQA /
//!   sinks / sliding windows, gated activations, matvec / matmul);
//! * [`rope`]: RoPE frequency tables (default and YaRN, partial rotary);
//! * [`kv`]: the per-sequence f32 KV cache (sliding layers bounded, see its docs for exactness);
//! * [`ffn`]: dense MLP and mixture of experts (routing through `moe`, each distinct expert run
//!   once per block, MXFP4 experts through `fp4`);
//! * [`toy`]: tiny random models of each architecture for tests (here and in GPU executors);
//! * [`CpuModel`] (weights + tables, cheap to clone, shareable) and [`Session`] (one sequence:
//!   KV cache + reusable buffers) with `prefill`, `decode`, `verify`, `truncate`.
//!
//! # Numerics
//! Weights and activations are f32 and every sum is accumulated in f32. Every op computes a
//! token's outputs with the same sequence of f32 operations whatever else is in the block, so a
//! token's logits and hidden states are **bit-identical** whether it is decoded alone, verified
//! in a block, prefilled, or part of [`CpuModel::forward_full`] (the tests assert equality).
//!
//! # Hidden-state indexing (as transformers' `output_hidden_states`)
//! For a model of L layers, hidden index `0` is the embedding output, index `i` in `1..L` is the
//! output (residual stream) of layer `i − 1`, and index `L` is the output of the last layer
//! **after the final RMSNorm** — exactly HF's `hidden_states[i]` (whose last entry is normed).
//! The logits are `lm_head · hidden[L]`. One more index, [`LAST_LAYER_PRE_NORM`], is the output
//! of the last layer **before** the final RMSNorm (no HF entry; the residual stream speculative
//! drafters read as "the output of the last layer").

pub mod check;
pub mod ffn;
pub mod kv;
pub mod ops;
pub mod rope;
pub mod toy;

use std::sync::Arc;

use crate::config::{AttnKind, ModelConfig};
use crate::weights::Weights;

use ffn::FfnScratch;
use kv::{KvCache, LayerKv};
use ops::AttnShape;
use rope::RopeTable;

/// Everything that can go wrong in the CPU executor.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum CpuError {
    /// The weights do not match the config (or the config is inconsistent).
    #[error("weights do not match the config: {0}")]
    Mismatch(String),
    /// A token id is not below `vocab_size`.
    #[error("token {token} at index {index} is outside the vocabulary (size {vocab})")]
    TokenOutOfRange {
        index: usize,
        token: u32,
        vocab: usize,
    },
    /// A pass was asked for no tokens.
    #[error("empty token list")]
    EmptyInput,
    /// A requested hidden-state index exceeds the number of layers.
    #[error("hidden-state index {index} is out of range (0..={layers}, or LAST_LAYER_PRE_NORM)")]
    HiddenIndex { index: usize, layers: usize },
    /// `truncate` to more positions than the session holds.
    #[error("cannot truncate to {len}: the session holds {have} positions")]
    TruncateBeyondEnd { len: usize, have: usize },
    /// `truncate` so deep that a sliding-window layer no longer holds the keys it would need.
    #[error(
        "cannot truncate to {len}: layer {layer} (sliding window {window}) keeps positions from {oldest} on; \
         truncation is exact up to max_rollback positions back"
    )]
    TruncateTooDeep {
        len: usize,
        layer: usize,
        window: usize,
        oldest: usize,
    },
    #[error(transparent)]
    Routing(#[from] moe::RoutingError),
    #[error(transparent)]
    Fp4(#[from] fp4::Fp4Error),
}

/// Hidden index of the last layer's output before the final RMSNorm (see the module docs), accepted
/// by [`Session::verify`] besides `0..=L`.
pub const LAST_LAYER_PRE_NORM: usize = usize::MAX;

/// Default truncation depth that a [`Session`] keeps exact (sliding layers keep
/// `window − 1 + max_rollback` positions of history).
pub const DEFAULT_MAX_ROLLBACK: usize = 64;

/// Prefill runs in passes of at most this many tokens (bounds the activation buffers; results
/// do not depend on it).
pub const PREFILL_CHUNK: usize = 256;

/// A model ready to run on the CPU: config, weights (shared, immutable), RoPE tables and the
/// per-layer attention geometry. Cheap to clone; `Send + Sync`.
#[derive(Debug, Clone)]
pub struct CpuModel {
    config: Arc<ModelConfig>,
    weights: Arc<Weights>,
    /// Distinct RoPE tables (one per distinct [`crate::config::Rope`]).
    ropes: Arc<[RopeTable]>,
    /// Index into `ropes` per layer.
    layer_rope: Arc<[usize]>,
    shapes: Arc<[AttnShape]>,
}

/// The result of [`Session::verify`].
#[derive(Debug, Clone, PartialEq)]
pub struct VerifyOutput {
    /// `logits[j]`: the `vocab_size` logits after token `j` of the block (predicting token j+1).
    pub logits: Vec<Vec<f32>>,
    /// `hidden[i][j]`: the hidden state with index `hidden_layers[i]` (see the module docs) of
    /// token `j`.
    pub hidden: Vec<Vec<Vec<f32>>>,
}

impl CpuModel {
    /// Validates `weights` against `config` (every shape, every optional tensor) and builds the
    /// RoPE tables.
    pub fn new(config: Arc<ModelConfig>, weights: Arc<Weights>) -> Result<Self, CpuError> {
        check::check(&config, &weights)?;
        let mut ropes: Vec<(crate::config::Rope, RopeTable)> = Vec::new();
        let mut layer_rope = Vec::with_capacity(config.layers.len());
        for spec in &config.layers {
            let idx = match ropes.iter().position(|(r, _)| *r == spec.rope) {
                Some(i) => i,
                None => {
                    ropes.push((spec.rope, RopeTable::new(&spec.rope)));
                    ropes.len() - 1
                }
            };
            layer_rope.push(idx);
        }
        let shapes = config.layers.iter().map(AttnShape::from_spec).collect();
        Ok(CpuModel {
            ropes: ropes.into_iter().map(|(_, t)| t).collect(),
            layer_rope: layer_rope.into(),
            shapes,
            config,
            weights,
        })
    }

    pub fn config(&self) -> &ModelConfig {
        &self.config
    }

    pub fn weights(&self) -> &Weights {
        &self.weights
    }

    /// The RoPE table used by `layer`.
    pub fn rope_table(&self, layer: usize) -> &RopeTable {
        &self.ropes[self.layer_rope[layer]]
    }

    /// The attention geometry of `layer`.
    pub fn attn_shape(&self, layer: usize) -> &AttnShape {
        &self.shapes[layer]
    }

    /// A new empty sequence with [`DEFAULT_MAX_ROLLBACK`].
    pub fn session(&self) -> Session {
        Session::new(self, DEFAULT_MAX_ROLLBACK)
    }

    /// Appends `tokens[i]` to `sessions[i]` for every `i` in ONE pass (each weight matrix is read
    /// once for all sequences; attention runs per sequence over its own cache) and returns the
    /// logits of each. Every row is bit-identical to `sessions[i].decode(tokens[i])` (the ops
    /// compute a row the same way whatever else is in the pass). All-or-nothing: on error every
    /// session is left as it was. The sessions must belong to this model.
    pub fn decode_batch(
        &self,
        sessions: &mut [&mut Session],
        tokens: &[u32],
    ) -> Result<Vec<Vec<f32>>, CpuError> {
        if sessions.len() != tokens.len() {
            return Err(CpuError::Mismatch(format!(
                "decode_batch: {} sessions but {} tokens",
                sessions.len(),
                tokens.len()
            )));
        }
        if sessions.is_empty() {
            return Err(CpuError::EmptyInput);
        }
        if let Some(i) = sessions
            .iter()
            .position(|x| !Arc::ptr_eq(&x.model.weights, &self.weights))
        {
            return Err(CpuError::Mismatch(format!(
                "decode_batch: session {i} belongs to another model"
            )));
        }
        for (x, &t) in sessions.iter().zip(tokens) {
            x.check_tokens(&[t])?;
        }
        for x in sessions.iter_mut() {
            x.begin_call();
        }
        // The first session lends its buffers to the pass.
        let mut scratch = std::mem::take(&mut sessions[0].s);
        let mut segs: Vec<Segment<'_>> = sessions
            .iter_mut()
            .map(|x| Segment {
                start: x.len,
                len: 1,
                kv: &mut x.kv,
            })
            .collect();
        let r = run_pass(
            self,
            &mut segs,
            &mut scratch,
            tokens,
            Want::All,
            &[],
            &mut [],
        );
        drop(segs);
        let v = self.config.vocab_size;
        let out = r.map(|()| {
            scratch
                .logits
                .chunks_exact(v)
                .map(<[f32]>::to_vec)
                .collect()
        });
        sessions[0].s = scratch;
        match out {
            Ok(logits) => {
                for x in sessions.iter_mut() {
                    x.len += 1;
                }
                Ok(logits)
            }
            Err(e) => {
                for x in sessions.iter_mut() {
                    x.undo_call();
                }
                Err(e)
            }
        }
    }

    /// One pass over all of `tokens` from position 0 (no cache reuse): the logits of every
    /// position and every hidden state (`hidden[i][j]`, `i` in `0..=L`, see the module docs).
    #[allow(clippy::type_complexity)]
    pub fn forward_full(
        &self,
        tokens: &[u32],
    ) -> Result<(Vec<Vec<f32>>, Vec<Vec<Vec<f32>>>), CpuError> {
        let mut s = self.session();
        let all: Vec<usize> = (0..=self.config.layers.len()).collect();
        let out = s.verify(tokens, &all)?;
        Ok((out.logits, out.hidden))
    }
}

/// Reusable activation buffers of a pass.
#[derive(Debug, Default, Clone)]
struct Scratch {
    x: Vec<f32>,
    h: Vec<f32>,
    q: Vec<f32>,
    k: Vec<f32>,
    v: Vec<f32>,
    attn: Vec<f32>,
    o: Vec<f32>,
    scores: Vec<f32>,
    cos: Vec<Vec<f32>>,
    sin: Vec<Vec<f32>>,
    ffn: FfnScratch,
    logits: Vec<f32>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Want {
    Skip,
    Last,
    All,
}

/// One sequence: its KV cache, its length, and the buffers its passes reuse (a decode step
/// allocates nothing here once the buffers have grown, apart from KV growth).
#[derive(Debug, Clone)]
pub struct Session {
    model: CpuModel,
    kv: KvCache,
    len: usize,
    /// Length before the most recent prefill / decode / verify call.
    call_start: usize,
    max_rollback: usize,
    s: Scratch,
}

impl Session {
    /// An empty sequence. `max_rollback` is how far below the start of the latest call
    /// [`Session::truncate`] is guaranteed to reach (sliding layers keep
    /// `window − 1 + max_rollback` positions of history; see [`kv`]).
    pub fn new(model: &CpuModel, max_rollback: usize) -> Self {
        let kv = KvCache {
            layers: model
                .config
                .layers
                .iter()
                .map(|l| {
                    let window = match l.attn {
                        AttnKind::Full => None,
                        AttnKind::Sliding { window } => Some(window),
                    };
                    LayerKv::new(
                        l.n_kv_heads * l.head_dim,
                        l.n_kv_heads * l.v_head_dim,
                        window,
                        max_rollback,
                    )
                })
                .collect(),
        };
        Session {
            model: model.clone(),
            kv,
            len: 0,
            call_start: 0,
            max_rollback,
            s: Scratch::default(),
        }
    }

    pub fn model(&self) -> &CpuModel {
        &self.model
    }

    /// Positions in the sequence (the next token gets position `len()`).
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn max_rollback(&self) -> usize {
        self.max_rollback
    }

    /// The smallest length [`Session::truncate`] is guaranteed to accept (besides 0):
    /// `L₀ − max_rollback`, `L₀` = the length before the most recent prefill / decode / verify.
    pub fn guaranteed_truncate_floor(&self) -> usize {
        self.call_start.saturating_sub(self.max_rollback)
    }

    /// The KV cache (for inspection).
    pub fn kv(&self) -> &KvCache {
        &self.kv
    }

    /// Appends `tokens` (in passes of [`PREFILL_CHUNK`]) and returns the logits of the last one.
    /// Works on a non-empty session too (chunked prefill / continuing a conversation). Every
    /// call is all-or-nothing: on error the session is left as it was.
    pub fn prefill(&mut self, tokens: &[u32]) -> Result<&[f32], CpuError> {
        self.check_tokens(tokens)?;
        self.begin_call();
        let n = tokens.chunks(PREFILL_CHUNK).len();
        for (i, c) in tokens.chunks(PREFILL_CHUNK).enumerate() {
            let want = if i + 1 == n { Want::Last } else { Want::Skip };
            if let Err(e) = self.pass(c, want, &[], &mut []) {
                self.undo_call();
                return Err(e);
            }
        }
        Ok(&self.s.logits)
    }

    /// [`Session::prefill`] returning the logits of every position.
    pub fn prefill_all(&mut self, tokens: &[u32]) -> Result<Vec<Vec<f32>>, CpuError> {
        self.check_tokens(tokens)?;
        self.begin_call();
        let v = self.model.config.vocab_size;
        let mut out = Vec::with_capacity(tokens.len());
        for c in tokens.chunks(PREFILL_CHUNK) {
            if let Err(e) = self.pass(c, Want::All, &[], &mut []) {
                self.undo_call();
                return Err(e);
            }
            out.extend(self.s.logits.chunks_exact(v).map(<[f32]>::to_vec));
        }
        Ok(out)
    }

    /// Appends one token; returns its logits (borrowed from the session's buffer).
    pub fn decode(&mut self, token: u32) -> Result<&[f32], CpuError> {
        self.check_tokens(&[token])?;
        self.begin_call();
        self.pass(&[token], Want::Last, &[], &mut [])?;
        Ok(&self.s.logits)
    }

    /// Appends a block of tokens in ONE pass (causal inside the block) and returns the logits of
    /// every token plus the requested hidden states (indices per the module docs, `0..=L` and
    /// [`LAST_LAYER_PRE_NORM`]).
    /// Follow with [`Session::truncate`] to drop rejected tokens.
    pub fn verify(
        &mut self,
        tokens: &[u32],
        hidden_layers: &[usize],
    ) -> Result<VerifyOutput, CpuError> {
        let nl = self.model.config.layers.len();
        if let Some(&index) = hidden_layers
            .iter()
            .find(|&&i| i > nl && i != LAST_LAYER_PRE_NORM)
        {
            return Err(CpuError::HiddenIndex { index, layers: nl });
        }
        self.check_tokens(tokens)?;
        self.begin_call();
        let mut hidden = vec![Vec::with_capacity(tokens.len()); hidden_layers.len()];
        self.pass(tokens, Want::All, hidden_layers, &mut hidden)?;
        let v = self.model.config.vocab_size;
        Ok(VerifyOutput {
            logits: self.s.logits.chunks_exact(v).map(<[f32]>::to_vec).collect(),
            hidden,
        })
    }

    /// Drops every position ≥ `len`. Whenever it succeeds it is exact: later calls give
    /// bit-identical results to a fresh session that prefilled the kept prefix.
    ///
    /// Guaranteed to succeed for `len == 0` and for every `len ≥ L₀ − max_rollback`, where `L₀`
    /// is the length before the most recent prefill / decode / verify call (so a rejected
    /// verify block can always be dropped, repeatedly). Deeper truncations succeed while the
    /// sliding-window layers still hold the history they need; otherwise they return
    /// [`CpuError::TruncateTooDeep`] and change nothing. Full-attention layers never limit it.
    pub fn truncate(&mut self, len: usize) -> Result<(), CpuError> {
        if len > self.len {
            return Err(CpuError::TruncateBeyondEnd {
                len,
                have: self.len,
            });
        }
        for (layer, (l, spec)) in self
            .kv
            .layers
            .iter()
            .zip(&self.model.config.layers)
            .enumerate()
        {
            if !l.can_truncate(len) {
                let window = match spec.attn {
                    AttnKind::Sliding { window } => window,
                    AttnKind::Full => 0,
                };
                return Err(CpuError::TruncateTooDeep {
                    len,
                    layer,
                    window,
                    oldest: l.first_pos(),
                });
            }
        }
        for l in &mut self.kv.layers {
            l.truncate(len);
        }
        self.len = len;
        Ok(())
    }

    /// Empties the sequence (keeps the buffers).
    pub fn reset(&mut self) {
        for l in &mut self.kv.layers {
            l.truncate(0);
        }
        self.len = 0;
        self.call_start = 0;
    }

    /// Drops everything the current call appended (always exact: nothing before the call's
    /// start was compacted away since `begin_call`).
    fn undo_call(&mut self) {
        for l in &mut self.kv.layers {
            l.truncate(self.call_start);
        }
        self.len = self.call_start;
    }

    /// Starts a public call (prefill / decode / verify): records its start position and lets
    /// sliding layers compact (the only point where history is dropped).
    fn begin_call(&mut self) {
        self.call_start = self.len;
        for l in &mut self.kv.layers {
            l.begin_pass();
        }
    }

    fn check_tokens(&self, tokens: &[u32]) -> Result<(), CpuError> {
        if tokens.is_empty() {
            return Err(CpuError::EmptyInput);
        }
        let vocab = self.model.config.vocab_size;
        if let Some((index, &token)) = tokens
            .iter()
            .enumerate()
            .find(|(_, &t)| t as usize >= vocab)
        {
            return Err(CpuError::TokenOutOfRange {
                index,
                token,
                vocab,
            });
        }
        Ok(())
    }

    /// One pass over `tokens` at positions `len .. len + t`. On error the cache is restored.
    fn pass(
        &mut self,
        tokens: &[u32],
        want: Want,
        hidden_layers: &[usize],
        hidden: &mut [Vec<Vec<f32>>],
    ) -> Result<(), CpuError> {
        self.check_tokens(tokens)?;
        let start = self.len;
        let mut segs = [Segment {
            kv: &mut self.kv,
            start,
            len: tokens.len(),
        }];
        let r = run_pass(
            &self.model,
            &mut segs,
            &mut self.s,
            tokens,
            want,
            hidden_layers,
            hidden,
        );
        match r {
            Ok(()) => {
                self.len += tokens.len();
                Ok(())
            }
            Err(e) => {
                for l in &mut self.kv.layers {
                    l.truncate(start);
                }
                Err(e)
            }
        }
    }
}

fn capture(layers: &[usize], hidden: &mut [Vec<Vec<f32>>], idx: usize, rows: &[f32], hs: usize) {
    for (slot, _) in layers.iter().enumerate().filter(|(_, &li)| li == idx) {
        hidden[slot].extend(rows.chunks_exact(hs).map(<[f32]>::to_vec));
    }
}

/// One sequence's part of a pass: its cache, the position of its first token, its token count.
struct Segment<'a> {
    kv: &'a mut KvCache,
    start: usize,
    len: usize,
}

/// One pass over the concatenated `tokens` of `segs` (each segment a different sequence at its
/// own positions): the matrix ops read each weight once for all rows, attention runs per segment
/// over its own cache. `Want::Last` gives the logits of the last row of the pass.
fn run_pass(
    m: &CpuModel,
    segs: &mut [Segment<'_>],
    s: &mut Scratch,
    tokens: &[u32],
    want: Want,
    hidden_layers: &[usize],
    hidden: &mut [Vec<Vec<f32>>],
) -> Result<(), CpuError> {
    let cfg = &*m.config;
    let w = &*m.weights;
    let t = tokens.len();
    let hs = cfg.hidden_size;
    let nl = cfg.layers.len();
    let eps = cfg.rms_norm_eps;

    s.x.resize(t * hs, 0.0);
    for (row, &tok) in s.x.chunks_exact_mut(hs).zip(tokens) {
        w.embed.row_into(tok as usize, row);
    }
    capture(hidden_layers, hidden, 0, &s.x, hs);

    s.cos.resize_with(m.ropes.len(), Vec::new);
    s.sin.resize_with(m.ropes.len(), Vec::new);
    for (r, table) in m.ropes.iter().enumerate() {
        let half = table.half();
        s.cos[r].resize(t * half, 0.0);
        s.sin[r].resize(t * half, 0.0);
        let positions = segs.iter().flat_map(|g| g.start..g.start + g.len);
        for (ti, pos) in positions.enumerate() {
            table.cos_sin(
                pos,
                &mut s.cos[r][ti * half..(ti + 1) * half],
                &mut s.sin[r][ti * half..(ti + 1) * half],
            );
        }
    }

    s.h.resize(t * hs, 0.0);
    s.o.resize(t * hs, 0.0);
    for (l, (spec, lw)) in cfg.layers.iter().zip(&w.layers).enumerate() {
        let shape = &m.shapes[l];
        let (nh, nkv, d, dv) = (
            spec.n_heads,
            spec.n_kv_heads,
            spec.head_dim,
            spec.v_head_dim,
        );

        // Attention.
        for (x, h) in s.x.chunks_exact(hs).zip(s.h.chunks_exact_mut(hs)) {
            ops::rms_norm(x, &lw.input_norm, eps, h);
        }
        s.q.resize(t * nh * d, 0.0);
        s.k.resize(t * nkv * d, 0.0);
        s.v.resize(t * nkv * dv, 0.0);
        ops::linear(&lw.attn.q, &s.h, t, &mut s.q);
        ops::linear(&lw.attn.k, &s.h, t, &mut s.k);
        ops::linear(&lw.attn.v, &s.h, t, &mut s.v);
        if let Some(qn) = &lw.attn.q_norm {
            ops::rms_norm_rows(&mut s.q, qn, eps);
        }
        if let Some(kn) = &lw.attn.k_norm {
            ops::rms_norm_rows(&mut s.k, kn, eps);
        }
        let r = m.layer_rope[l];
        let half = m.ropes[r].half();
        if half > 0 {
            for ti in 0..t {
                let (c, sn) = (
                    &s.cos[r][ti * half..(ti + 1) * half],
                    &s.sin[r][ti * half..(ti + 1) * half],
                );
                ops::apply_rope_heads(&mut s.q[ti * nh * d..(ti + 1) * nh * d], d, c, sn);
                ops::apply_rope_heads(&mut s.k[ti * nkv * d..(ti + 1) * nkv * d], d, c, sn);
            }
        }
        if cfg.value_scale != 1.0 {
            for v in s.v.iter_mut() {
                *v *= cfg.value_scale;
            }
        }
        s.attn.resize(t * nh * dv, 0.0);
        let mut r0 = 0;
        for seg in segs.iter_mut() {
            let r1 = r0 + seg.len;
            let cache = &mut seg.kv.layers[l];
            cache.append(
                &s.k[r0 * nkv * d..r1 * nkv * d],
                &s.v[r0 * nkv * dv..r1 * nkv * dv],
            );
            ops::attention_rows(
                shape,
                &s.q[r0 * nh * d..r1 * nh * d],
                cache.keys(),
                cache.values(),
                cache.first_pos(),
                seg.start,
                seg.len,
                lw.attn.sinks.as_deref(),
                &mut s.scores,
                &mut s.attn[r0 * nh * dv..r1 * nh * dv],
            );
            r0 = r1;
        }
        ops::linear(&lw.attn.o, &s.attn, t, &mut s.o);
        ops::add_assign(&mut s.x, &s.o);

        // Feed-forward.
        for (x, h) in s.x.chunks_exact(hs).zip(s.h.chunks_exact_mut(hs)) {
            ops::rms_norm(x, &lw.post_attn_norm, eps, h);
        }
        ffn::mlp_forward(cfg, &lw.mlp, &s.h, t, &mut s.o, &mut s.ffn)?;
        ops::add_assign(&mut s.x, &s.o);

        let idx = if l + 1 < nl {
            l + 1
        } else {
            LAST_LAYER_PRE_NORM
        };
        capture(hidden_layers, hidden, idx, &s.x, hs);
    }

    if want != Want::Skip || hidden_layers.contains(&nl) {
        for (x, h) in s.x.chunks_exact(hs).zip(s.h.chunks_exact_mut(hs)) {
            ops::rms_norm(x, &w.final_norm, eps, h);
        }
        capture(hidden_layers, hidden, nl, &s.h, hs);
    }
    let v = cfg.vocab_size;
    match want {
        Want::Skip => {}
        Want::Last => {
            s.logits.resize(v, 0.0);
            ops::matvec(&w.lm_head, &s.h[(t - 1) * hs..], &mut s.logits);
        }
        Want::All => {
            s.logits.resize(t * v, 0.0);
            ops::matmul(&w.lm_head, &s.h, t, &mut s.logits);
        }
    }
    Ok(())
}
