//! The CPU reference executor: exact f32 math of gpt-oss, Qwen3-MoE and MiMo-V2-Flash as
//! transformers computes them — the embedded default and the oracle for every GPU path. It is an
//! interpreter of the step plan ([`crate::plan`]): `run_pass` walks the plan's ops and runs
//! each with the op functions below; the plan's parameter structs are the ops' arguments. The
//! target's passes and a drafter's ([`draft`]) are interpreted by the same `run_pass`.
//!
//! * [`ops`]: the ops as small pure functions (RMSNorm, RoPE application, attention with GQA /
//!   sinks / sliding windows, gated activations, matvec / matmul);
//! * [`kernels`]: the dense matrix kernels per weight dtype (f32 / bf16 / f16 / FP8 E4M3 with
//!   block scales; AVX-512F, AVX2 and portable paths chosen at run time): the decode GEMV and the
//!   register-blocked small GEMM of verify / prefill chunks, bit-identical to each other;
//! * [`moe_ops`]: the mixture of experts split at the plan's boundaries (router + top-k, experts
//!   gate_up + GLU, experts down + combine);
//! * [`kv`]: the per-sequence f32 KV cache (sliding layers bounded, see its docs for exactness);
//! * [`draft`]: DFlash drafters ([`draft::CpuDrafter`]): their context-append and block-draft
//!   plans (`Plan::draft`) run by the same interpreter, with per-sequence context caches;
//! * [`ffn`]: dense MLP and mixture of experts as whole blocks (routing through `moe`, each
//!   distinct expert run once per block, MXFP4 experts through `fp4`);
//! * [`shard`]: the weights of tensor-parallel ranks ([`CpuModel::tensor_parallel`]);
//! * [`toy`]: tiny random models of each architecture for tests (here and in GPU executors);
//! * [`CpuModel`] (weights + plans + tables, cheap to clone, shareable) and [`Session`] (one
//!   sequence: KV cache + reusable buffers) with `prefill`, `decode`, `verify`, `truncate`; a
//!   `Session` is a [`crate::executor::Executor`].
//!
//! # Numerics
//! Weights and activations are f32 and every sum is accumulated in f32. Every op computes a
//! token's outputs with the same sequence of f32 operations whatever else is in the block, so a
//! token's logits and hidden states are **bit-identical** whether it is decoded alone, verified
//! in a block, prefilled, or part of [`CpuModel::forward_full`] (the tests assert equality).
//!
//! # Tensor parallelism
//! [`CpuModel::tensor_parallel`] runs the plan sharded over N simulated ranks
//! ([`crate::plan::tp`]): each rank's ops run on its weight shard and its own KV cache, and the
//! all-reduce nodes add the ranks' partial sums in rank order. The logits equal the unsharded
//! model's up to f32 reassociation of those sums (the tests bound the difference).
//! [`CpuModel::parallel`] also places the routed experts whole on the ranks (expert
//! parallelism): each rank's expert ops run its own experts and the all-reduce combines them.
//!
//! # Hidden-state indexing
//! As [`crate::executor`] documents: index `0` is the embedding output, `i` in `1..L` the output
//! of layer `i − 1`, `L` the last layer's output after the final norm, and
//! [`LAST_LAYER_PRE_NORM`] before it. The logits are `lm_head · hidden[L]`.

pub mod draft;
pub mod ffn;
pub mod kernels;
pub mod kv;
pub mod moe_ops;
pub mod ops;
/// The weight sharding (moved to [`crate::shard`]; re-exported where it was).
pub use crate::shard;
pub mod toy;

/// The weights check (moved to [`crate::check`]; re-exported for existing paths).
pub use crate::check;
pub use crate::executor::{VerifyOutput, DEFAULT_MAX_ROLLBACK, LAST_LAYER_PRE_NORM};
/// RoPE tables (moved to [`crate::rope`]; re-exported for existing paths).
pub use crate::rope;

use std::borrow::Cow;
use std::sync::Arc;

use crate::config::{AttnKind, ModelConfig};
use crate::executor::Executor;
use crate::plan::tp::{shard_plan, Parallelism, TpLayout};
use crate::plan::{
    AttentionParams, Buf, Logits, OpKind, PassKind, PassShape, Placement, Plan, PlanError, Tensor,
    WeightId, WeightStorage,
};
use crate::rope::RopeTable;
use crate::weights::{ExpertMat, GateUpLayout, Layer, Mat, Mlp, Weights};

use kv::{KvCache, LayerKv};
use moe_ops::{ExpertScratch, Routing};
use ops::AttnShape;

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
    /// The step plan could not be built (or sharded).
    #[error(transparent)]
    Plan(#[from] PlanError),
    #[error(transparent)]
    Routing(#[from] moe::RoutingError),
    #[error(transparent)]
    Fp4(#[from] fp4::Fp4Error),
}

impl From<check::Mismatch> for CpuError {
    fn from(e: check::Mismatch) -> Self {
        CpuError::Mismatch(e.0)
    }
}

/// Prefill runs in passes of at most this many tokens (bounds the activation buffers; results
/// do not depend on it).
pub const PREFILL_CHUNK: usize = 256;

/// The plans a model's passes interpret: the layer ops are the same for every pass; they differ
/// in which rows get logits.
#[derive(Debug)]
struct Plans {
    none: Plan,
    last: Plan,
    all: Plan,
}

impl Plans {
    fn get(&self, logits: Logits) -> &Plan {
        match logits {
            Logits::None => &self.none,
            Logits::Last => &self.last,
            Logits::All => &self.all,
        }
    }
}

/// Tensor-parallel ranks: what each holds and its layers' weights.
#[derive(Debug)]
struct Ranks {
    layout: TpLayout,
    /// `[rank][layer]`.
    layers: Vec<Vec<Layer>>,
}

/// A model ready to run on the CPU: config, weights (shared, immutable), its step plans, RoPE
/// tables and per-layer attention geometry. Cheap to clone; `Send + Sync`.
#[derive(Debug, Clone)]
pub struct CpuModel {
    config: Arc<ModelConfig>,
    weights: Arc<Weights>,
    plans: Arc<Plans>,
    /// One table per entry of the plan's `ropes`.
    ropes: Arc<[RopeTable]>,
    shapes: Arc<[AttnShape]>,
    /// Tensor-parallel ranks (None: one).
    tp: Option<Arc<Ranks>>,
    /// How MXFP4 experts take their activations.
    acts: Activations,
}

/// The attention geometry of a plan's attention op (the CPU ops' argument struct).
pub fn attn_shape(p: &AttentionParams) -> AttnShape {
    AttnShape {
        n_heads: p.geom.n_heads,
        n_kv_heads: p.geom.n_kv_heads,
        head_dim: p.geom.head_dim,
        v_head_dim: p.geom.v_head_dim,
        window: p.window,
        scale: p.scale,
    }
}

/// The storage of in-memory weights (f32, experts MXFP4 when the checkpoint stores them so).
pub fn weight_storage(w: &Weights) -> WeightStorage {
    let mxfp4 = w.layers.iter().any(|l| match &l.mlp {
        Mlp::Moe(m) => m
            .experts
            .iter()
            .any(|e| matches!(e.gate_up, ExpertMat::Mxfp4(_))),
        Mlp::Dense { .. } => false,
    });
    WeightStorage::cpu(mxfp4)
}

impl CpuModel {
    /// Validates `weights` against `config` (every shape, every optional tensor) and builds the
    /// step plans and RoPE tables.
    pub fn new(config: Arc<ModelConfig>, weights: Arc<Weights>) -> Result<Self, CpuError> {
        check::check(&config, &weights)?;
        let storage = weight_storage(&weights);
        let plan = |logits| -> Result<Plan, CpuError> {
            let shape = PassShape {
                logits,
                ..PassShape::decode(0)
            };
            let p = Plan::new(&config, storage, shape)?;
            p.validate()?;
            Ok(p)
        };
        let plans = Plans {
            none: plan(Logits::None)?,
            last: plan(Logits::Last)?,
            all: plan(Logits::All)?,
        };
        let ropes = plans.last.ropes.iter().map(RopeTable::new).collect();
        let shapes = plans
            .last
            .ops
            .iter()
            .filter_map(|o| match o.kind {
                OpKind::Attention(p) => Some(attn_shape(&p)),
                _ => None,
            })
            .collect();
        Ok(CpuModel {
            ropes,
            shapes,
            plans: Arc::new(plans),
            tp: None,
            config,
            weights,
            acts: Activations::F32,
        })
    }

    /// The same model run over `ranks` simulated tensor-parallel ranks ([`crate::plan::tp`]):
    /// attention sharded by KV-head group, the FFNs along the intermediate dimension, all-reduce
    /// nodes between. `ranks == 1` is the unsharded model. An error names the head counts that
    /// do not split.
    pub fn tensor_parallel(&self, ranks: usize) -> Result<CpuModel, CpuError> {
        self.parallel(Parallelism::tensor(ranks))
    }

    /// The same model split over simulated ranks as `par` says: tensor parallelism
    /// ([`CpuModel::tensor_parallel`]), and/or expert parallelism (each rank holding whole
    /// experts, see [`crate::plan::tp`]). One rank is the unsharded model. An error names what
    /// does not split (heads, experts).
    pub fn parallel(&self, par: Parallelism) -> Result<CpuModel, CpuError> {
        let base =
            CpuModel::new(self.config.clone(), self.weights.clone())?.with_activations(self.acts);
        if par.ranks == 1 {
            return Ok(base);
        }
        let storage = weight_storage(&self.weights);
        let layout = TpLayout::with(&self.config, par, storage.mxfp4_experts)?;
        let layers = shard::shard_layers(&self.config, &self.weights, &layout)?;
        let p = &base.plans;
        let shard = |p: &Plan| -> Result<Plan, CpuError> {
            let s = shard_plan(p, &self.config, &layout)?;
            s.validate()?;
            Ok(s)
        };
        let plans = Plans {
            none: shard(&p.none)?,
            last: shard(&p.last)?,
            all: shard(&p.all)?,
        };
        Ok(CpuModel {
            plans: Arc::new(plans),
            tp: Some(Arc::new(Ranks { layout, layers })),
            ..base
        })
    }

    /// The same model with MXFP4 experts fed `acts` ([`Activations`]).
    pub fn with_activations(mut self, acts: Activations) -> CpuModel {
        self.acts = acts;
        self
    }

    /// How MXFP4 experts take their activations.
    pub fn activations(&self) -> Activations {
        self.acts
    }

    /// Tensor-parallel ranks the model runs over (1 = unsharded).
    pub fn ranks(&self) -> usize {
        self.tp.as_ref().map_or(1, |t| t.layout.ranks)
    }

    /// The tensor-parallel layout, when sharded.
    pub fn tp_layout(&self) -> Option<&TpLayout> {
        self.tp.as_ref().map(|t| &t.layout)
    }

    pub fn config(&self) -> &ModelConfig {
        &self.config
    }

    pub fn weights(&self) -> &Weights {
        &self.weights
    }

    /// The plan a pass interprets for `logits` (its costs are those of a decode at position 0).
    pub fn plan(&self, logits: Logits) -> &Plan {
        self.plans.get(logits)
    }

    /// The RoPE table used by `layer`.
    pub fn rope_table(&self, layer: usize) -> &RopeTable {
        &self.ropes[self.plans.last.layers[layer].rope]
    }

    /// The attention geometry of `layer`.
    pub fn attn_shape(&self, layer: usize) -> &AttnShape {
        &self.shapes[layer]
    }

    /// A new empty sequence with [`DEFAULT_MAX_ROLLBACK`].
    pub fn session(&self) -> Session {
        Session::new(self, DEFAULT_MAX_ROLLBACK)
    }

    /// What a pass of `logits` reads: its plan, the weights it names, the RoPE tables.
    fn bound(&self, logits: Logits) -> Bound<'_> {
        let w = &*self.weights;
        Bound {
            plan: self.plans.get(logits),
            hidden: self.config.hidden_size,
            ropes: &self.ropes,
            embed: Some(&w.embed),
            lm_head: Some(&w.lm_head),
            layers: &w.layers,
            rank_layers: self.tp.as_ref().map(|t| t.layers.as_slice()),
            final_norm: &w.final_norm,
            drafter: None,
            acts: self.acts,
        }
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
        let blocks: Vec<&[u32]> = tokens.iter().map(std::slice::from_ref).collect();
        let out = self.batch_pass("decode_batch", sessions, &blocks, &[])?;
        Ok(out
            .into_iter()
            .map(|o| o.logits.into_iter().next().unwrap_or_default())
            .collect())
    }

    /// Runs `blocks[i]` on `sessions[i]` for every `i` in ONE pass (as [`Session::verify`] of
    /// each, causal inside each block, every sequence's rows attending to its own cache at its
    /// own length; each weight matrix read once for all rows) and returns each one's logits and
    /// requested hidden states. Every row is bit-identical to `sessions[i].verify(blocks[i], …)`
    /// (the ops compute a row the same way whatever else is in the pass). All-or-nothing: on
    /// error every session is left as it was. The sessions must belong to this model.
    pub fn verify_batch(
        &self,
        sessions: &mut [&mut Session],
        blocks: &[&[u32]],
        hidden_layers: &[usize],
    ) -> Result<Vec<VerifyOutput>, CpuError> {
        if sessions.len() != blocks.len() {
            return Err(CpuError::Mismatch(format!(
                "verify_batch: {} sessions but {} blocks",
                sessions.len(),
                blocks.len()
            )));
        }
        self.batch_pass("verify_batch", sessions, blocks, hidden_layers)
    }

    /// The one batched pass behind [`CpuModel::decode_batch`] and [`CpuModel::verify_batch`]
    /// (`what` names the caller in errors): `blocks[i]` on `sessions[i]`, all-or-nothing.
    fn batch_pass(
        &self,
        what: &str,
        sessions: &mut [&mut Session],
        blocks: &[&[u32]],
        hidden_layers: &[usize],
    ) -> Result<Vec<VerifyOutput>, CpuError> {
        if sessions.is_empty() {
            return Err(CpuError::EmptyInput);
        }
        let nl = self.config.layers.len();
        if let Some(&index) = hidden_layers
            .iter()
            .find(|&&i| i > nl && i != LAST_LAYER_PRE_NORM)
        {
            return Err(CpuError::HiddenIndex { index, layers: nl });
        }
        if let Some(i) = sessions.iter().position(|x| {
            !Arc::ptr_eq(&x.model.weights, &self.weights) || x.model.ranks() != self.ranks()
        }) {
            return Err(CpuError::Mismatch(format!(
                "{what}: session {i} belongs to another model"
            )));
        }
        for (x, b) in sessions.iter().zip(blocks) {
            x.check_tokens(b)?;
        }
        for x in sessions.iter_mut() {
            x.begin_call();
        }
        let tokens: Vec<u32> = blocks.concat();
        let mut hidden = vec![Vec::with_capacity(tokens.len()); hidden_layers.len()];
        // The first session lends its buffers to the pass.
        let mut scratch = std::mem::take(&mut sessions[0].s);
        let mut segs: Vec<Segment<'_>> = sessions
            .iter_mut()
            .zip(blocks)
            .map(|(x, b)| Segment {
                start: x.len,
                len: b.len(),
                kv: &mut x.kv,
            })
            .collect();
        let r = run_pass(
            &self.bound(Logits::All),
            &mut segs,
            &mut scratch,
            PassInput::Tokens(&tokens),
            hidden_layers,
            &mut hidden,
        );
        drop(segs);
        let v = self.config.vocab_size;
        let out = r.map(|()| {
            let mut logits = scratch.logits.chunks_exact(v).map(<[f32]>::to_vec);
            let mut hidden: Vec<_> = hidden.into_iter().map(Vec::into_iter).collect();
            blocks
                .iter()
                .map(|b| VerifyOutput {
                    logits: logits.by_ref().take(b.len()).collect(),
                    hidden: hidden
                        .iter_mut()
                        .map(|h| h.by_ref().take(b.len()).collect())
                        .collect(),
                })
                .collect()
        });
        sessions[0].s = scratch;
        match out {
            Ok(out) => {
                for (x, b) in sessions.iter_mut().zip(blocks) {
                    x.len += b.len();
                }
                Ok(out)
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

/// Reusable activation buffers of a pass (rank-local ones per rank).
#[derive(Debug, Default, Clone)]
pub(crate) struct Scratch {
    x: Vec<f32>,
    h: Vec<f32>,
    q: Vec<Vec<f32>>,
    k: Vec<f32>,
    v: Vec<f32>,
    attn: Vec<Vec<f32>>,
    act: Vec<Vec<f32>>,
    partial: Vec<Vec<f32>>,
    gu: Vec<f32>,
    o: Vec<f32>,
    scores: Vec<f32>,
    cos: Vec<Vec<f32>>,
    sin: Vec<Vec<f32>>,
    routing: Routing,
    experts: ExpertScratch,
    logits: Vec<f32>,
    sampled: Vec<u32>,
}

/// One block of positions of a sequence across all its layers (and tensor-parallel ranks),
/// shared by reference: what a prefix cache keeps and [`Session::adopt_prefix`] takes.
#[derive(Debug, Clone)]
pub struct SharedBlock {
    layers: Arc<[Arc<kv::KvBlockData>]>,
}

/// One sequence: its KV cache (one per tensor-parallel rank), its length, and the buffers its
/// passes reuse (a decode step allocates nothing here once the buffers have grown, apart from
/// KV growth).
#[derive(Debug, Clone)]
pub struct Session {
    model: CpuModel,
    /// `[rank]`.
    kv: Vec<KvCache>,
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
        Session::with_block_size(model, max_rollback, kv::DEFAULT_BLOCK_SIZE)
    }

    /// [`Session::new`] whose KV cache is paged in blocks of `block_size` positions (at least 1;
    /// results do not depend on it, see [`kv`]).
    pub fn with_block_size(model: &CpuModel, max_rollback: usize, block_size: usize) -> Self {
        let tables = &model.plans.last.layers;
        let kv = (0..model.ranks())
            .map(|_| KvCache {
                layers: tables
                    .iter()
                    .map(|lt| {
                        LayerKv::new(lt.k_width, lt.v_width, lt.window, max_rollback, block_size)
                    })
                    .collect(),
            })
            .collect();
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

    /// The KV cache (for inspection; rank 0's when the model is tensor-parallel).
    pub fn kv(&self) -> &KvCache {
        &self.kv[0]
    }

    /// Positions per KV block.
    pub fn block_size(&self) -> usize {
        self.kv[0]
            .layers
            .first()
            .map_or(kv::DEFAULT_BLOCK_SIZE, LayerKv::block_size)
    }

    /// Full block `b` of every layer of every rank (shared, not copied: the prefix cache's
    /// payload), when the sequence holds it whole in every layer — a sliding layer may already
    /// have dropped it.
    pub fn full_block(&self, b: usize) -> Option<SharedBlock> {
        let mut layers = Vec::new();
        for l in self.kv.iter().flat_map(|c| c.layers.iter()) {
            layers.push(l.full_block(b)?.clone());
        }
        Some(SharedBlock {
            layers: layers.into(),
        })
    }

    /// Makes an empty sequence hold `blocks` (from [`Session::full_block`] of sequences of the
    /// same model and block size) as its first `blocks.len() · block_size()` positions, shared
    /// with whoever else holds them; later calls behave exactly as if those positions had been
    /// prefilled here. Refused (nothing changes) for a non-empty sequence or a block of another
    /// shape.
    pub fn adopt_prefix(&mut self, blocks: &[SharedBlock]) -> Result<(), CpuError> {
        if self.len != 0 {
            return Err(CpuError::Mismatch(format!(
                "adopt_prefix: the sequence already holds {} positions",
                self.len
            )));
        }
        let n_layers = self.kv.iter().map(|c| c.layers.len()).sum::<usize>();
        if let Some(i) = blocks.iter().position(|b| b.layers.len() != n_layers) {
            return Err(CpuError::Mismatch(format!(
                "adopt_prefix: block {i} has {} layers, the model {n_layers}",
                blocks[i].layers.len()
            )));
        }
        let mut per_layer: Vec<Vec<Arc<kv::KvBlockData>>> = vec![Vec::new(); n_layers];
        for b in blocks {
            for (dst, src) in per_layer.iter_mut().zip(b.layers.iter()) {
                dst.push(src.clone());
            }
        }
        for (i, (l, bl)) in self
            .kv
            .iter_mut()
            .flat_map(|c| c.layers.iter_mut())
            .zip(&per_layer)
            .enumerate()
        {
            if l.adopt(bl).is_none() {
                self.reset();
                return Err(CpuError::Mismatch(format!(
                    "adopt_prefix: layer {i}: the blocks do not match this sequence's block \
                     size or row widths"
                )));
            }
        }
        self.len = blocks.len() * self.block_size();
        self.call_start = self.len;
        Ok(())
    }

    /// Appends `tokens` (in passes of [`PREFILL_CHUNK`]) and returns the logits of the last one.
    /// Works on a non-empty session too (chunked prefill / continuing a conversation). Every
    /// call is all-or-nothing: on error the session is left as it was.
    pub fn prefill(&mut self, tokens: &[u32]) -> Result<&[f32], CpuError> {
        self.check_tokens(tokens)?;
        self.begin_call();
        let n = tokens.chunks(PREFILL_CHUNK).len();
        for (i, c) in tokens.chunks(PREFILL_CHUNK).enumerate() {
            let want = if i + 1 == n {
                Logits::Last
            } else {
                Logits::None
            };
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
            if let Err(e) = self.pass(c, Logits::All, &[], &mut []) {
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
        self.pass(&[token], Logits::Last, &[], &mut [])?;
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
        self.pass(tokens, Logits::All, hidden_layers, &mut hidden)?;
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
        for (layer, (l, spec)) in self.kv[0]
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
        for l in self.kv.iter_mut().flat_map(|c| c.layers.iter_mut()) {
            l.truncate(len);
        }
        self.len = len;
        Ok(())
    }

    /// Empties the sequence (keeps the buffers).
    pub fn reset(&mut self) {
        for l in self.kv.iter_mut().flat_map(|c| c.layers.iter_mut()) {
            l.truncate(0);
        }
        self.len = 0;
        self.call_start = 0;
    }

    /// Drops everything the current call appended (always exact: nothing before the call's
    /// start was compacted away since `begin_call`).
    fn undo_call(&mut self) {
        for l in self.kv.iter_mut().flat_map(|c| c.layers.iter_mut()) {
            l.truncate(self.call_start);
        }
        self.len = self.call_start;
    }

    /// Starts a public call (prefill / decode / verify): records its start position and lets
    /// sliding layers compact (the only point where history is dropped).
    fn begin_call(&mut self) {
        self.call_start = self.len;
        for l in self.kv.iter_mut().flat_map(|c| c.layers.iter_mut()) {
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
        want: Logits,
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
            &self.model.bound(want),
            &mut segs,
            &mut self.s,
            PassInput::Tokens(tokens),
            hidden_layers,
            hidden,
        );
        match r {
            Ok(()) => {
                self.len += tokens.len();
                Ok(())
            }
            Err(e) => {
                for l in self.kv.iter_mut().flat_map(|c| c.layers.iter_mut()) {
                    l.truncate(start);
                }
                Err(e)
            }
        }
    }
}

impl Session {
    /// Appends `tokens` (in verify passes of at most [`crate::executor::FORWARD_CHUNK`]) and
    /// returns every token's logits plus the output of each decoder layer in `layers` (the residual stream
    /// after it; before the final norm for the last layer too) — what a drafter reads. A layer
    /// beyond the model is [`CpuError::HiddenIndex`]. ([`Executor::forward`], callable without
    /// the trait in scope.)
    pub fn forward(&mut self, tokens: &[u32], layers: &[usize]) -> Result<VerifyOutput, CpuError> {
        Executor::forward(self, tokens, layers)
    }
}

impl Executor for Session {
    type Error = CpuError;

    fn config(&self) -> &ModelConfig {
        &self.model.config
    }

    fn len(&self) -> usize {
        self.len
    }

    fn max_rollback(&self) -> usize {
        self.max_rollback
    }

    fn prefill(&mut self, tokens: &[u32]) -> Result<Cow<'_, [f32]>, CpuError> {
        Session::prefill(self, tokens).map(Cow::Borrowed)
    }

    fn decode(&mut self, token: u32) -> Result<Cow<'_, [f32]>, CpuError> {
        Session::decode(self, token).map(Cow::Borrowed)
    }

    fn verify(&mut self, tokens: &[u32], hidden: &[usize]) -> Result<VerifyOutput, CpuError> {
        Session::verify(self, tokens, hidden)
    }

    fn truncate(&mut self, len: usize) -> Result<(), CpuError> {
        Session::truncate(self, len)
    }

    /// One pass ([`CpuModel::verify_batch`]) when every block fits one verify call
    /// ([`crate::executor::FORWARD_CHUNK`]); otherwise, or when the batched pass fails (say, one
    /// sequence's token is out of range), one call after another, so each pair fails on its own.
    fn forward_batch(
        seqs: &mut [&mut Session],
        blocks: &[&[u32]],
        layers: &[usize],
    ) -> Vec<Result<VerifyOutput, CpuError>> {
        let n = seqs.len().min(blocks.len());
        let fits = blocks[..n]
            .iter()
            .all(|b| !b.is_empty() && b.len() <= crate::executor::FORWARD_CHUNK);
        if n > 1 && fits {
            let model = seqs[0].model.clone();
            let nl = model.config.layers.len();
            let idx: Vec<usize> = layers
                .iter()
                .map(|&l| crate::executor::forward_index(l, nl))
                .collect();
            if let Ok(out) = model.verify_batch(&mut seqs[..n], &blocks[..n], &idx) {
                return out.into_iter().map(Ok).collect();
            }
        }
        seqs.iter_mut()
            .zip(blocks)
            .map(|(s, b)| Executor::forward(&mut **s, b, layers))
            .collect()
    }
}

fn capture(layers: &[usize], hidden: &mut [Vec<Vec<f32>>], idx: usize, rows: &[f32], hs: usize) {
    for (slot, _) in layers.iter().enumerate().filter(|(_, &li)| li == idx) {
        hidden[slot].extend(rows.chunks_exact(hs).map(<[f32]>::to_vec));
    }
}

/// One sequence's part of a pass: its caches (one per rank), the position of its first token,
/// its token count.
pub(crate) struct Segment<'a> {
    pub(crate) kv: &'a mut [KvCache],
    pub(crate) start: usize,
    pub(crate) len: usize,
}

/// What a pass reads besides its activations: the plan, the weights its ops name and the RoPE
/// tables of the plan's `ropes`. A target model (each rank's shard when tensor-parallel) or a
/// drafter (its own layers and norms, the target's embedding and LM head).
pub(crate) struct Bound<'a> {
    pub(crate) plan: &'a Plan,
    pub(crate) hidden: usize,
    pub(crate) ropes: &'a [RopeTable],
    /// `[V, H]` (None: the pass embeds no tokens, e.g. a drafter's context append).
    pub(crate) embed: Option<&'a Mat>,
    /// `[V, H]` (None: the pass has no LM head).
    pub(crate) lm_head: Option<&'a Mat>,
    /// The unsharded layers (norms and routers are replicated).
    pub(crate) layers: &'a [Layer],
    /// `[rank][layer]` shards when tensor-parallel.
    pub(crate) rank_layers: Option<&'a [Vec<Layer>]>,
    pub(crate) final_norm: &'a [f32],
    /// A drafter's own tensors (its plans' `draft_context` and block embedding).
    pub(crate) drafter: Option<DraftTensors<'a>>,
    /// How MXFP4 experts take their activations.
    pub(crate) acts: Activations,
}

/// How the CPU executor feeds activations to the MXFP4 expert products.
///
/// * [`Activations::F32`] (the library default): f32 activations, the exact reference — the
///   mode every golden, the GPU executors' tests and the f64 error bounds of `fp4::cpu` refer to.
/// * [`Activations::Q8`]: each activation row quantized once per op to int8 per block of 32
///   (`fp4::q8`, llama.cpp's `q8_0` scheme) and multiplied with integer dot products
///   (AVX-512-VNNI / AVX2). Deterministic per row, so decode, verify and chunked prefill stay
///   bit-identical to each other and speculative greedy equals plain greedy; the error against
///   the exact product is bounded by `fp4::q8_error_bound` (≈ `Σ_b amax_b/254 · Σ|W|`, about
///   0.4 % of a block's largest activation per weight). The CLI's default on the CPU (`ultra
///   generate / serve / bench-*`, `--activations f32` for the exact mode).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Activations {
    #[default]
    F32,
    Q8,
}

impl std::str::FromStr for Activations {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "f32" => Ok(Activations::F32),
            "q8" => Ok(Activations::Q8),
            other => Err(format!("unknown activation mode {other:?}: f32 or q8")),
        }
    }
}

/// The tensors only a drafter's plans read.
pub(crate) struct DraftTensors<'a> {
    /// `[H, K·H_t]`.
    pub(crate) fc: &'a Mat,
    /// `[H]`.
    pub(crate) hidden_norm: &'a [f32],
    /// Replaces the embedding of rows `1..` of a block (MiMo), if present.
    pub(crate) mask_embedding: Option<&'a [f32]>,
}

impl<'a> Bound<'a> {
    /// Layer `l`'s weights on `rank`.
    fn layer(&self, rank: usize, l: usize) -> &Layer {
        match self.rank_layers {
            Some(r) => &r[rank][l],
            None => &self.layers[l],
        }
    }

    /// A norm weight vector.
    fn norm_weight(&self, id: WeightId) -> Result<&[f32], CpuError> {
        Ok(match (id.tensor, id.layer) {
            (Tensor::InputNorm, Some(l)) => &self.layers[l].input_norm,
            (Tensor::PostAttnNorm, Some(l)) => &self.layers[l].post_attn_norm,
            (Tensor::FinalNorm, None) => self.final_norm,
            _ => {
                return Err(CpuError::Plan(PlanError::Invalid(format!(
                    "{id} is not a norm the CPU executor knows"
                ))))
            }
        })
    }

    fn matrix(m: Option<&'a Mat>, what: &str) -> Result<&'a Mat, CpuError> {
        m.ok_or_else(|| {
            CpuError::Plan(PlanError::Invalid(format!(
                "the plan reads the {what}, which this pass has none of"
            )))
        })
    }

    fn drafter(&self, op: &str) -> Result<&DraftTensors<'_>, CpuError> {
        self.drafter.as_ref().ok_or_else(|| {
            CpuError::Plan(PlanError::Invalid(format!(
                "{op} is a drafter op; a target model does not run it"
            )))
        })
    }
}

/// The rows a pass starts from: token ids (embedded by the plan's `embed` op) or a drafter's
/// context features (`[rows, K·H_t]`, read by `draft_context`).
#[derive(Clone, Copy)]
pub(crate) enum PassInput<'a> {
    Tokens(&'a [u32]),
    Features(&'a [f32]),
}

/// RMSNorm of every `hs`-wide row of `x` into `h`.
fn norm_rows(x: &[f32], w: &[f32], eps: f32, h: &mut [f32], hs: usize) {
    for (x, h) in x.chunks_exact(hs).zip(h.chunks_exact_mut(hs)) {
        ops::rms_norm(x, w, eps, h);
    }
}

fn missing(what: &str, l: usize) -> CpuError {
    CpuError::Mismatch(format!(
        "layer {l}: the plan uses {what} but the weights have none"
    ))
}

fn moe_of(layer: &Layer, l: usize) -> Result<&crate::weights::Moe, CpuError> {
    match &layer.mlp {
        Mlp::Moe(m) => Ok(m),
        Mlp::Dense { .. } => Err(missing("routed experts", l)),
    }
}

/// The plan interpreter: one pass over the concatenated `tokens` of `segs` (each segment a
/// different sequence at its own positions), running the ops of the model's plan for `logits`
/// in order. Matrix ops read each weight once for all rows; attention runs per segment over its
/// own cache. Hidden states are copied out at the plan's taps.
pub(crate) fn run_pass(
    m: &Bound<'_>,
    segs: &mut [Segment<'_>],
    s: &mut Scratch,
    input: PassInput<'_>,
    hidden_layers: &[usize],
    hidden: &mut [Vec<Vec<f32>>],
) -> Result<(), CpuError> {
    let plan = m.plan;
    let t: usize = segs.iter().map(|g| g.len).sum();
    let hs = m.hidden;
    let ranks = plan.ranks;
    for b in [&mut s.q, &mut s.attn, &mut s.act, &mut s.partial] {
        b.resize_with(ranks, Vec::new);
    }

    // cos / sin of every row's position, per RoPE table.
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

    s.x.resize(t * hs, 0.0);
    s.h.resize(t * hs, 0.0);
    s.o.resize(t * hs, 0.0);
    let mut taps = plan.taps.iter().peekable();
    for (i, op) in plan.ops.iter().enumerate() {
        let rank = match op.placement {
            Placement::Rank(r) => r,
            Placement::Replicated => 0,
        };
        let l = op.layer.unwrap_or(0);
        match op.kind {
            OpKind::Embed(p) => {
                let PassInput::Tokens(tokens) = input else {
                    return Err(CpuError::Plan(PlanError::Invalid(
                        "the plan embeds tokens but the pass has features".into(),
                    )));
                };
                // A drafter block's rows 1.. are mask rows: the mask embedding replaces the
                // mask token's row when the drafter has one.
                if tokens.len() != t {
                    return Err(CpuError::Mismatch(format!(
                        "{} tokens for a pass of {t} rows",
                        tokens.len()
                    )));
                }
                let embed = Bound::matrix(m.embed, "embedding")?;
                let mask = match (&m.drafter, plan.shape.kind) {
                    (Some(d), PassKind::DraftBlock) => d.mask_embedding,
                    _ => None,
                };
                for (i, (row, &tok)) in s.x.chunks_exact_mut(hs).zip(tokens).enumerate() {
                    match mask {
                        Some(me) if i > 0 => row.copy_from_slice(me),
                        _ => embed.row_into(tok as usize, row),
                    }
                    if p.scale != 1.0 {
                        row.iter_mut().for_each(|v| *v *= p.scale);
                    }
                }
            }
            OpKind::RmsNorm(p) => norm_rows(&s.x, m.norm_weight(p.weight)?, p.eps, &mut s.h, hs),
            OpKind::QkvRope(p) => {
                let lw = &m.layer(rank, l).attn;
                let g = p.geom;
                let (d, nh, nkv) = (g.head_dim, g.n_heads, g.n_kv_heads);
                let q = &mut s.q[rank];
                if !p.kv_only {
                    q.resize(t * g.q_width(), 0.0);
                    ops::linear(&lw.q, &s.h, t, q);
                }
                s.k.resize(t * g.k_width(), 0.0);
                s.v.resize(t * g.v_width(), 0.0);
                ops::linear(&lw.k, &s.h, t, &mut s.k);
                ops::linear(&lw.v, &s.h, t, &mut s.v);
                if p.qk_norm {
                    if !p.kv_only {
                        let qn = lw.q_norm.as_deref().ok_or_else(|| missing("q_norm", l))?;
                        ops::rms_norm_rows(q, qn, p.eps);
                    }
                    let kn = lw.k_norm.as_deref().ok_or_else(|| missing("k_norm", l))?;
                    ops::rms_norm_rows(&mut s.k, kn, p.eps);
                }
                let half = m.ropes[p.rope].half();
                if half > 0 {
                    let (cos, sin) = (&s.cos[p.rope], &s.sin[p.rope]);
                    for ti in 0..t {
                        let (c, sn) = (
                            &cos[ti * half..(ti + 1) * half],
                            &sin[ti * half..(ti + 1) * half],
                        );
                        if !p.kv_only {
                            ops::apply_rope_heads(&mut q[ti * nh * d..(ti + 1) * nh * d], d, c, sn);
                        }
                        ops::apply_rope_heads(&mut s.k[ti * nkv * d..(ti + 1) * nkv * d], d, c, sn);
                    }
                }
                if p.value_scale != 1.0 {
                    for v in s.v.iter_mut() {
                        *v *= p.value_scale;
                    }
                }
                let (kw, vw) = (g.k_width(), g.v_width());
                let mut r0 = 0;
                for seg in segs.iter_mut() {
                    let r1 = r0 + seg.len;
                    seg.kv[rank].layers[l].append(&s.k[r0 * kw..r1 * kw], &s.v[r0 * vw..r1 * vw]);
                    r0 = r1;
                }
            }
            OpKind::Attention(p) => {
                let lw = &m.layer(rank, l).attn;
                let shape = attn_shape(&p);
                let sinks = if p.sinks {
                    Some(lw.sinks.as_deref().ok_or_else(|| missing("sinks", l))?)
                } else {
                    None
                };
                let (qw, ow) = (p.geom.q_width(), p.geom.out_width());
                let attn = &mut s.attn[rank];
                attn.resize(t * ow, 0.0);
                let mut r0 = 0;
                for seg in segs.iter_mut() {
                    let r1 = r0 + seg.len;
                    let cache = &seg.kv[rank].layers[l];
                    ops::attention_rows_in(
                        &shape,
                        &s.q[rank][r0 * qw..r1 * qw],
                        &cache.keys(),
                        &cache.values(),
                        seg.start,
                        seg.len,
                        sinks,
                        &mut s.scores,
                        &mut attn[r0 * ow..r1 * ow],
                    );
                    r0 = r1;
                }
            }
            OpKind::OProj(p) => {
                let o = &m.layer(rank, l).attn.o;
                if p.residual {
                    ops::linear(o, &s.attn[rank], t, &mut s.o);
                    ops::add_assign(&mut s.x, &s.o);
                } else {
                    let out = &mut s.partial[rank];
                    out.resize(t * hs, 0.0);
                    ops::linear(o, &s.attn[rank], t, out);
                }
            }
            OpKind::NormRouterTopK(p) => {
                norm_rows(
                    &s.x,
                    m.norm_weight(p.norm.weight)?,
                    p.norm.eps,
                    &mut s.h,
                    hs,
                );
                let moe = moe_of(&m.layers[l], l)?;
                moe_ops::route(&p, moe, &s.h, t, &mut s.routing)?;
            }
            OpKind::ExpertsGateUp(p) => {
                let moe = moe_of(m.layer(rank, l), l)?;
                moe_ops::experts_gate_up(
                    &p,
                    m.acts,
                    moe,
                    &s.h,
                    &s.routing,
                    &mut s.act[rank],
                    &mut s.experts,
                )?;
            }
            OpKind::ExpertsDown(p) => {
                let moe = moe_of(m.layer(rank, l), l)?;
                let out = if p.residual {
                    &mut s.o
                } else {
                    s.partial[rank].resize(t * hs, 0.0);
                    &mut s.partial[rank]
                };
                moe_ops::experts_down(
                    &p,
                    m.acts,
                    moe,
                    &s.act[rank],
                    &s.routing,
                    out,
                    &mut s.experts,
                )?;
                if p.residual {
                    ops::add_assign(&mut s.x, &s.o);
                    if let Some(nn) = p.next_norm {
                        norm_rows(&s.x, m.norm_weight(nn.weight)?, nn.eps, &mut s.h, hs);
                    }
                }
            }
            OpKind::MlpGateUp(p) => {
                let Mlp::Dense { gate_up, .. } = &m.layer(rank, l).mlp else {
                    return Err(missing("a dense MLP", l));
                };
                let i = p.intermediate;
                let act = &mut s.act[rank];
                act.resize(t * i, 0.0);
                if i > 0 {
                    s.gu.resize(t * 2 * i, 0.0);
                    ops::linear(gate_up, &s.h, t, &mut s.gu);
                    ops::glu_rows(p.glu, GateUpLayout::Halves, &s.gu, act, i);
                }
            }
            OpKind::MlpDown(p) => {
                let Mlp::Dense { down, .. } = &m.layer(rank, l).mlp else {
                    return Err(missing("a dense MLP", l));
                };
                let out = if p.residual {
                    &mut s.o
                } else {
                    s.partial[rank].resize(t * hs, 0.0);
                    &mut s.partial[rank]
                };
                if p.intermediate > 0 {
                    ops::linear(down, &s.act[rank], t, out);
                } else {
                    out.fill(0.0);
                    if let Some(b) = &down.bias {
                        ops::add_bias(out, b);
                    }
                }
                if p.residual {
                    ops::add_assign(&mut s.x, &s.o);
                    if let Some(nn) = p.next_norm {
                        norm_rows(&s.x, m.norm_weight(nn.weight)?, nn.eps, &mut s.h, hs);
                    }
                }
            }
            OpKind::AllReduce(p) => {
                let n = t * p.width;
                s.o[..n].copy_from_slice(&s.partial[0][..n]);
                for part in &s.partial[1..p.ranks] {
                    ops::add_assign(&mut s.o[..n], &part[..n]);
                }
                ops::add_assign(&mut s.x, &s.o);
                if let Some(nn) = p.next_norm {
                    norm_rows(&s.x, m.norm_weight(nn.weight)?, nn.eps, &mut s.h, hs);
                }
            }
            OpKind::LmHead(p) => match p.rows {
                Logits::None => {}
                Logits::Last => {
                    s.logits.resize(p.vocab, 0.0);
                    ops::matvec(
                        Bound::matrix(m.lm_head, "LM head")?,
                        &s.h[(t - 1) * hs..t * hs],
                        &mut s.logits,
                    );
                }
                Logits::All => {
                    let rows = t - p.skip_rows.min(t);
                    s.logits.resize(rows * p.vocab, 0.0);
                    ops::matmul(
                        Bound::matrix(m.lm_head, "LM head")?,
                        &s.h[(t - rows) * hs..t * hs],
                        rows,
                        &mut s.logits,
                    );
                }
            },
            OpKind::Sample(p) => {
                s.sampled.clear();
                s.sampled.extend(s.logits.chunks_exact(p.vocab).map(|row| {
                    let mut best = 0;
                    for (j, &v) in row.iter().enumerate() {
                        if v > row[best] {
                            best = j;
                        }
                    }
                    best as u32
                }));
            }
            OpKind::DraftContext(p) => {
                let d = m.drafter(op.kind.name())?;
                let PassInput::Features(features) = input else {
                    return Err(CpuError::Plan(PlanError::Invalid(
                        "draft_context reads features but the pass has tokens".into(),
                    )));
                };
                if features.len() != t * p.features || d.fc.cols != p.features {
                    return Err(CpuError::Mismatch(format!(
                        "draft_context: {} feature values for {t} rows of {} (fc takes {})",
                        features.len(),
                        p.features,
                        d.fc.cols
                    )));
                }
                ops::matmul(d.fc, features, t, &mut s.h);
                ops::rms_norm_rows(&mut s.h, d.hidden_norm, p.eps);
            }
            OpKind::DraftAttention(p) => {
                m.drafter(op.kind.name())?;
                let lw = &m.layer(rank, l).attn;
                let shape = AttnShape {
                    n_heads: p.geom.n_heads,
                    n_kv_heads: p.geom.n_kv_heads,
                    head_dim: p.geom.head_dim,
                    v_head_dim: p.geom.v_head_dim,
                    window: None,
                    scale: p.scale,
                };
                let sinks = if p.sinks {
                    Some(lw.sinks.as_deref().ok_or_else(|| missing("sinks", l))?)
                } else {
                    None
                };
                let (qw, ow) = (p.geom.q_width(), p.geom.out_width());
                let attn = &mut s.attn[rank];
                attn.resize(t * ow, 0.0);
                let mut r0 = 0;
                for seg in segs.iter_mut() {
                    let r1 = r0 + seg.len;
                    let cache = &seg.kv[rank].layers[l];
                    ops::block_attention(
                        &shape,
                        p.window,
                        p.causal,
                        &s.q[rank][r0 * qw..r1 * qw],
                        &cache.keys(),
                        &cache.values(),
                        seg.start,
                        seg.len,
                        sinks,
                        &mut s.scores,
                        &mut attn[r0 * ow..r1 * ow],
                    );
                    r0 = r1;
                }
            }
        }
        while let Some(tap) = taps.next_if(|tp| tp.after == i) {
            let rows = match tap.buf {
                Buf::X => &s.x,
                Buf::H => &s.h,
                other => {
                    return Err(CpuError::Plan(PlanError::Invalid(format!(
                        "hidden state {} is read from {other}, not the residual stream",
                        tap.hidden
                    ))))
                }
            };
            capture(hidden_layers, hidden, tap.hidden, rows, hs);
        }
    }
    Ok(())
}
