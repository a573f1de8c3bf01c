//! Step plans: one decoder step as data — the ordered ops of a pass over named buffers, at the
//! fusion boundaries the fast GPU executor uses, each with ONE parameter struct that is the
//! definition of its arguments (`../shared/docs/DESIGN.md` §1).
//!
//! A [`Plan`] is built from a [`ModelConfig`], a [`WeightStorage`] (how the tensors are stored:
//! it sets the bytes an op reads) and a [`PassShape`] (prefill chunk of n, decode 1, verify B,
//! batched N rows, and the drafter's context-append / block-draft in [`draft`]). Executors
//! interpret or lower it; they do not re-derive op arguments from the config:
//!
//! * the per-layer tables ([`LayerTables`]: RoPE table id, sliding window, KV row widths) are
//!   derived once here, and the distinct RoPE configurations are listed in [`Plan::ropes`];
//! * the router of a MoE layer is [`RouterParams`] (its `kind` is the config's
//!   [`RouterSpec`]); the CPU builds its `moe::RouterKind` from it, a GPU executor its
//!   `RouteSpec`;
//! * attention geometry, window, sinks and scale are [`AttentionParams`]; RoPE, q/k norms,
//!   biases and the value scale of the projection are [`QkvRopeParams`].
//!
//! The op list of a pass (L layers; `⊕` = added into the residual stream `x`):
//!
//! ```text
//! embed                       tokens → x
//! rms_norm(input_norm₀)       x → h
//! per layer l:
//!   qkv_rope_kv               h → q, kv[l]        (q/k/v (+bias), q/k norm, RoPE, v·scale, KV write)
//!   attention                 q, kv[l] → attn     (GQA, window, sinks)
//!   o_proj                    attn → x ⊕          (+bias)
//!   MoE:   norm_router_topk   x → h, routing      (post_attn_norm, router (+bias), top-k)
//!          experts_gate_up    h, routing → act    (each hit expert once, + bias, GLU)
//!          experts_down       act, routing → x ⊕ → h   (+bias, ·gate weight, combine, next norm)
//!   dense: rms_norm           x → h               (post_attn_norm)
//!          mlp_gate_up        h → act             (+ GLU)
//!          mlp_down           act → x ⊕ → h       (next norm)
//! lm_head                     h → logits          (the last row, or every row)
//! sample                      logits → token      (argmax; executors that sample on the device)
//! ```
//!
//! "Next norm" is the next layer's `input_norm`, or the final norm after the last layer, so `h`
//! after the last layer is the normed final hidden state. Hidden states an executor is asked for
//! are read at the [`Plan::taps`] (same indexing as `crate::cpu`'s module docs).
//!
//! Costs: every op carries the weight bytes it reads and its FLOPs for the shape (matrix ops:
//! 2 FLOPs per multiply-add), and attention its KV bytes at the shape's context. For a decode
//! the weight bytes sum to [`crate::footprint::Footprint::bytes_per_token`] (the same counting
//! rules: the embedding row is not counted, routed experts count `top_k` experts).
//!
//! [`tp::shard_plan`] shards a plan over N tensor-parallel ranks (explicit all-reduce nodes); the CPU
//! executor (`crate::cpu`) interprets both.

pub mod draft;
pub mod tp;

use std::fmt;

use crate::config::{Activation, AttnKind, ModelConfig, Rope, RouterSpec};
use crate::footprint::StoragePlan;
use crate::weights::GateUpLayout;

/// What a pass is for (the shape's name; the row count is [`PassShape::rows`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PassKind {
    /// A chunk of a prompt (logits of its last row only when it is the last chunk).
    Prefill,
    /// One token of one sequence.
    Decode,
    /// A block of B tokens of one sequence: logits (and asked-for hidden states) of every row.
    Verify,
    /// One token for each of N sequences (each row attends over its own KV cache).
    Batched,
    /// A drafter appending n committed tokens' target features to its context caches.
    DraftContext,
    /// A drafter drafting one block of B rows.
    DraftBlock,
}

/// Which rows get logits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Logits {
    /// No LM head (a prefill chunk that is not the last).
    None,
    /// The last row only.
    Last,
    /// Every row.
    All,
}

/// The shape of one pass.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PassShape {
    pub kind: PassKind,
    /// Activation rows (tokens) in the pass.
    pub rows: usize,
    pub logits: Logits,
    /// Append a `sample` (argmax) op after the LM head.
    pub sample: bool,
    /// Positions already cached before the pass (sets attention's FLOPs and KV bytes).
    pub context: usize,
}

impl PassShape {
    /// A prefill chunk of `n` tokens after `context` cached positions; `last`: the chunk that
    /// gives the prompt's logits.
    pub fn prefill(n: usize, context: usize, last: bool) -> PassShape {
        PassShape {
            kind: PassKind::Prefill,
            rows: n,
            logits: if last { Logits::Last } else { Logits::None },
            sample: false,
            context,
        }
    }
    /// One decoded token at position `context`.
    pub fn decode(context: usize) -> PassShape {
        PassShape {
            kind: PassKind::Decode,
            rows: 1,
            logits: Logits::Last,
            sample: false,
            context,
        }
    }
    /// A verify block of `b` tokens.
    pub fn verify(b: usize, context: usize) -> PassShape {
        PassShape {
            kind: PassKind::Verify,
            rows: b,
            logits: Logits::All,
            sample: false,
            context,
        }
    }
    /// One token for each of `n` sequences, each at `context` cached positions.
    pub fn batched(n: usize, context: usize) -> PassShape {
        PassShape {
            kind: PassKind::Batched,
            rows: n,
            logits: Logits::All,
            sample: false,
            context,
        }
    }
    /// The same shape with a `sample` op at the end.
    pub fn with_sample(self) -> PassShape {
        PassShape {
            sample: true,
            ..self
        }
    }
    /// Rows the LM head produces.
    pub fn logit_rows(&self) -> usize {
        match self.logits {
            Logits::None => 0,
            Logits::Last => 1,
            Logits::All => self.rows,
        }
    }
    /// Context (positions attended before the pass) of row `i` in attention. Batched rows are
    /// separate sequences, each at `context`; the other shapes are one sequence.
    fn row_position(&self, i: usize) -> usize {
        match self.kind {
            PassKind::Batched => self.context,
            _ => self.context + i,
        }
    }
}

impl fmt::Display for PassShape {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let name = match self.kind {
            PassKind::Prefill => format!("prefill({})", self.rows),
            PassKind::Decode => "decode(1)".into(),
            PassKind::Verify => format!("verify({})", self.rows),
            PassKind::Batched => format!("batched({})", self.rows),
            PassKind::DraftContext => format!("draft-context({})", self.rows),
            PassKind::DraftBlock => format!("draft-block({})", self.rows),
        };
        let logits = match self.logits {
            Logits::None => "no logits",
            Logits::Last => "logits of the last row",
            Logits::All => "logits of every row",
        };
        write!(f, "{name} at context {}, {logits}", self.context)
    }
}

/// How the weights are stored (sets the bytes every op reads).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct WeightStorage {
    /// Bytes per routed-expert matrix weight (MXFP4: 17/32; FP8 with block scales: 1 + ε).
    pub expert_bytes: f64,
    /// Bytes per other weight (norms, attention, routers, dense MLPs, embeddings, biases).
    pub dense_bytes: f64,
    /// Bytes per cached key / value element.
    pub kv_bytes: f64,
    /// Routed experts are MXFP4 (their reduction dimension splits only at 32-element blocks).
    pub mxfp4_experts: bool,
    /// A short description.
    pub label: &'static str,
}

impl WeightStorage {
    /// The storage of a checkpoint as `ultra inspect` reads it from `config.json`.
    pub fn from_plan(p: StoragePlan) -> WeightStorage {
        WeightStorage {
            expert_bytes: p.expert_bytes_per_weight,
            dense_bytes: p.dense_bytes_per_weight,
            kv_bytes: p.dense_bytes_per_weight,
            mxfp4_experts: p.expert_bytes_per_weight
                == StoragePlan::MXFP4_EXPERTS.expert_bytes_per_weight,
            label: p.label,
        }
    }

    /// The CPU executor's in-memory weights: f32 everywhere, experts MXFP4 when `mxfp4`.
    pub fn cpu(mxfp4: bool) -> WeightStorage {
        WeightStorage {
            expert_bytes: if mxfp4 { 17.0 / 32.0 } else { 4.0 },
            dense_bytes: 4.0,
            kv_bytes: 4.0,
            mxfp4_experts: mxfp4,
            label: if mxfp4 {
                "MXFP4 experts, f32 rest"
            } else {
                "f32"
            },
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Buffers and weights
// ---------------------------------------------------------------------------------------------

/// A named buffer of a pass. Rank-local buffers carry their tensor-parallel rank (0 when the
/// plan is not sharded).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Buf {
    /// Token ids `[t]`.
    Tokens,
    /// A drafter's input features `[t, K·H_target]` (target hidden states of committed tokens).
    Features,
    /// The residual stream `[t, H]`.
    X,
    /// Normed activations `[t, H]` (the input of the next matrix op).
    H,
    /// Queries after q-norm and RoPE `[t, heads·head_dim]`.
    Q(usize),
    /// One layer's KV cache.
    Kv { layer: usize, rank: usize },
    /// Attention output `[t, heads·v_head_dim]`.
    Attn(usize),
    /// The routing of every row: `top_k` expert ids and gate weights.
    Routing,
    /// Gated activations: `[t·top_k, I]` (experts) or `[t, I]` (dense MLP).
    Act(usize),
    /// A rank's partial sum `[t, H]` that an all-reduce adds up.
    Partial(usize),
    /// Logits `[rows, V]`.
    Logits,
    /// Sampled token ids.
    Sampled,
}

impl fmt::Display for Buf {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Buf::Tokens => write!(f, "tokens"),
            Buf::Features => write!(f, "features"),
            Buf::X => write!(f, "x"),
            Buf::H => write!(f, "h"),
            Buf::Q(r) => write!(f, "q{}", rank_suffix(*r)),
            Buf::Kv { layer, rank } => write!(f, "kv[{layer}]{}", rank_suffix(*rank)),
            Buf::Attn(r) => write!(f, "attn{}", rank_suffix(*r)),
            Buf::Routing => write!(f, "routing"),
            Buf::Act(r) => write!(f, "act{}", rank_suffix(*r)),
            Buf::Partial(r) => write!(f, "partial@{r}"),
            Buf::Logits => write!(f, "logits"),
            Buf::Sampled => write!(f, "sampled"),
        }
    }
}

fn rank_suffix(r: usize) -> String {
    if r == 0 {
        String::new()
    } else {
        format!("@{r}")
    }
}

/// A model tensor (HF-independent name; the loader maps checkpoint names onto these).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Tensor {
    Embed,
    LmHead,
    FinalNorm,
    InputNorm,
    PostAttnNorm,
    Q,
    K,
    V,
    O,
    QBias,
    KBias,
    VBias,
    OBias,
    QNorm,
    KNorm,
    Sinks,
    Router,
    RouterBias,
    CorrectionBias,
    ExpertsGateUp,
    ExpertsGateUpBias,
    ExpertsDown,
    ExpertsDownBias,
    MlpGateUp,
    MlpDown,
    /// A drafter's feature projection `[H, K·H_target]`.
    Fc,
    /// A drafter's norm of the projected features.
    HiddenNorm,
}

impl Tensor {
    fn name(self) -> &'static str {
        match self {
            Tensor::Embed => "embed",
            Tensor::LmHead => "lm_head",
            Tensor::FinalNorm => "final_norm",
            Tensor::InputNorm => "input_norm",
            Tensor::PostAttnNorm => "post_attn_norm",
            Tensor::Q => "q",
            Tensor::K => "k",
            Tensor::V => "v",
            Tensor::O => "o",
            Tensor::QBias => "q.bias",
            Tensor::KBias => "k.bias",
            Tensor::VBias => "v.bias",
            Tensor::OBias => "o.bias",
            Tensor::QNorm => "q_norm",
            Tensor::KNorm => "k_norm",
            Tensor::Sinks => "sinks",
            Tensor::Router => "router",
            Tensor::RouterBias => "router.bias",
            Tensor::CorrectionBias => "correction_bias",
            Tensor::ExpertsGateUp => "experts.gate_up",
            Tensor::ExpertsGateUpBias => "experts.gate_up.bias",
            Tensor::ExpertsDown => "experts.down",
            Tensor::ExpertsDownBias => "experts.down.bias",
            Tensor::MlpGateUp => "mlp.gate_up",
            Tensor::MlpDown => "mlp.down",
            Tensor::Fc => "fc",
            Tensor::HiddenNorm => "hidden_norm",
        }
    }
}

/// The part of a tensor a tensor-parallel rank holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Shard {
    pub rank: usize,
    pub ranks: usize,
    /// What is split: query heads, KV heads, or the FFN intermediate dimension.
    pub unit: ShardUnit,
    /// The rank's range of `unit` (`lo..hi`).
    pub lo: usize,
    pub hi: usize,
}

/// The dimension a [`Shard`] splits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ShardUnit {
    Heads,
    KvHeads,
    Intermediate,
    /// Routed experts placed whole on ranks (expert parallelism): the rank's expert ids.
    Experts,
    /// The whole tensor, held by this rank only (a bias added once before the all-reduce).
    Whole,
}

/// A weight an op reads: a tensor of a layer (or a model-level one), possibly one rank's shard.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct WeightId {
    pub tensor: Tensor,
    pub layer: Option<usize>,
    pub shard: Option<Shard>,
}

impl WeightId {
    pub fn model(tensor: Tensor) -> WeightId {
        WeightId {
            tensor,
            layer: None,
            shard: None,
        }
    }
    pub fn layer(tensor: Tensor, layer: usize) -> WeightId {
        WeightId {
            tensor,
            layer: Some(layer),
            shard: None,
        }
    }
}

impl fmt::Display for WeightId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(l) = self.layer {
            write!(f, "layers.{l}.")?;
        }
        write!(f, "{}", self.tensor.name())?;
        if let Some(s) = self.shard {
            let unit = match s.unit {
                ShardUnit::Heads => "heads",
                ShardUnit::KvHeads => "kv heads",
                ShardUnit::Intermediate => "I",
                ShardUnit::Experts => "experts",
                ShardUnit::Whole => return write!(f, "[rank {} only]", s.rank),
            };
            write!(f, "[{unit} {}..{}]", s.lo, s.hi)?;
        }
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------------
// Op parameters: THE definition of each op's arguments
// ---------------------------------------------------------------------------------------------

/// The attention geometry of one layer (of one rank when sharded).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AttnGeom {
    pub n_heads: usize,
    pub n_kv_heads: usize,
    /// q/k head dimension.
    pub head_dim: usize,
    /// v head dimension.
    pub v_head_dim: usize,
}

impl AttnGeom {
    /// Query width `heads · head_dim`.
    pub fn q_width(&self) -> usize {
        self.n_heads * self.head_dim
    }
    /// Key row width `kv_heads · head_dim`.
    pub fn k_width(&self) -> usize {
        self.n_kv_heads * self.head_dim
    }
    /// Value row width `kv_heads · v_head_dim`.
    pub fn v_width(&self) -> usize {
        self.n_kv_heads * self.v_head_dim
    }
    /// Attention output width `heads · v_head_dim`.
    pub fn out_width(&self) -> usize {
        self.n_heads * self.v_head_dim
    }
}

/// Index into [`Plan::ropes`].
pub type RopeId = usize;

/// `embed`: `x[i] = embed[tokens[i]] · scale`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct EmbedParams {
    pub vocab: usize,
    pub hidden: usize,
    /// Multiplies the embedding rows (1 for targets; a drafter's `input_embedding_scale`).
    pub scale: f32,
}

/// A standalone RMSNorm `h = w ⊙ x / rms(x)` over rows of `dim`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct NormParams {
    pub weight: WeightId,
    pub dim: usize,
    pub eps: f32,
}

/// The RMSNorm that closes a layer (the next layer's input norm, or the final norm), fused into
/// the op that finishes the residual stream.
pub type NextNorm = NormParams;

/// `qkv_rope_kv`: `q = h·Wqᵀ (+b)`, `k`, `v` likewise; per-head RMSNorm of q and k
/// (`qk_norm`); NeoX RoPE of the first `rotary_dim` dims of each q/k head at each row's
/// position (table [`Plan::ropes`]`[rope]`, attention factor included); `v ← v · value_scale`;
/// k and v appended to the layer's KV cache.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct QkvRopeParams {
    pub geom: AttnGeom,
    pub hidden: usize,
    pub rope: RopeId,
    /// Rotary dims (≤ head_dim; 0 = no rotation).
    pub rotary_dim: usize,
    pub qk_norm: bool,
    pub bias: bool,
    /// RMSNorm epsilon of the q/k norms.
    pub eps: f32,
    pub value_scale: f32,
    /// Keys and values only (a drafter's context rows): no queries.
    pub kv_only: bool,
}

/// `attention`: for every query row and head, softmax over the visible cached keys
/// (`(p − window, p]`, or `[0, p]` without a window) with an optional per-head sink logit in the
/// denominator, times the values. KV head `g` serves query heads `g·G .. (g+1)·G`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AttentionParams {
    pub geom: AttnGeom,
    pub window: Option<usize>,
    pub sinks: bool,
    /// Score scale `1/sqrt(head_dim)`.
    pub scale: f32,
}

/// `o_proj`: `out = attn·Woᵀ (+b)`; added into `x` when `residual` (else written to a partial
/// sum for an all-reduce).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct OProjParams {
    pub in_dim: usize,
    pub out_dim: usize,
    pub bias: bool,
    pub residual: bool,
}

/// `norm_router_topk`: `h = post_attn_norm(x)`, router logits `h·Wrᵀ (+b)`, then the routing
/// variant `kind` picks `top_k` experts and their gate weights per row.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RouterParams {
    pub norm: NormParams,
    pub n_experts: usize,
    pub top_k: usize,
    pub kind: RouterSpec,
    /// A bias added to the router logits (gpt-oss).
    pub bias: bool,
    /// A selection-only bias (sigmoid routers' `e_score_correction_bias`).
    pub correction_bias: bool,
}

/// The routed experts an expert op computes: ids `lo..hi` of the router's `n_experts` — all of
/// them, except on a rank of an expert-parallel plan, which holds a contiguous range of whole
/// experts (its weights are those experts, local index `id − lo`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ExpertRange {
    pub lo: usize,
    pub hi: usize,
}

impl ExpertRange {
    /// Every expert of `n`.
    pub fn all(n: usize) -> ExpertRange {
        ExpertRange { lo: 0, hi: n }
    }
    /// Experts held.
    pub fn len(&self) -> usize {
        self.hi - self.lo
    }
    pub fn is_empty(&self) -> bool {
        self.hi == self.lo
    }
    /// Whether expert id `e` is held.
    pub fn contains(&self, e: usize) -> bool {
        (self.lo..self.hi).contains(&e)
    }
    /// Whether this is a part of `n` experts (expert parallelism), not all of them.
    pub fn is_part_of(&self, n: usize) -> bool {
        self.lo != 0 || self.hi != n
    }
}

/// `experts_gate_up`: every hit expert runs once over its rows: `gu = h·Wguᵀ (+b)`, then the
/// gated activation `glu` over the `layout`-ordered gate/up halves → `act[row·k + slot]`. Only the
/// experts of `experts` run (entries routed elsewhere are left alone).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ExpertsGateUpParams {
    pub n_experts: usize,
    /// The experts this op computes (all of them unless expert-parallel).
    pub experts: ExpertRange,
    pub top_k: usize,
    pub hidden: usize,
    /// The intermediate size this op computes (a rank's slice when sharded).
    pub intermediate: usize,
    pub glu: Activation,
    pub layout: GateUpLayout,
    pub bias: bool,
    pub mxfp4: bool,
}

/// `experts_down`: `y = act·Wdᵀ (+b)` per hit expert, times the row's gate weight; each row sums
/// its k expert outputs in ascending expert id (only those of `experts`: an expert-parallel
/// rank's share). `y` is added into `x` and `next_norm` applied (`residual`), or written to a
/// partial sum for an all-reduce.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ExpertsDownParams {
    pub n_experts: usize,
    /// The experts this op computes (all of them unless expert-parallel).
    pub experts: ExpertRange,
    pub top_k: usize,
    pub hidden: usize,
    pub intermediate: usize,
    pub bias: bool,
    pub mxfp4: bool,
    pub residual: bool,
    pub next_norm: Option<NextNorm>,
}

/// `mlp_gate_up`: `gu = h·Wguᵀ (+b)` (gate rows then up rows), then the gated activation.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct MlpGateUpParams {
    pub hidden: usize,
    pub intermediate: usize,
    pub glu: Activation,
    pub bias: bool,
}

/// `mlp_down`: `y = act·Wdᵀ (+b)`, added into `x` with `next_norm` applied (`residual`), or a
/// partial sum for an all-reduce.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct MlpDownParams {
    pub hidden: usize,
    pub intermediate: usize,
    pub bias: bool,
    pub residual: bool,
    pub next_norm: Option<NextNorm>,
}

/// `all_reduce`: `x += Σ_r partial[r]` (summed in rank order), then `next_norm` if any. The
/// reduction an N-GPU executor runs between its ranks (one-shot at batch 1).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AllReduceParams {
    pub ranks: usize,
    pub width: usize,
    pub next_norm: Option<NextNorm>,
}

/// `lm_head`: `logits = h·Wᵀ` for the rows `rows` selects.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LmHeadParams {
    pub vocab: usize,
    pub hidden: usize,
    pub rows: Logits,
    /// Rows of `h` the head reads from (a drafter skips its block's first row).
    pub skip_rows: usize,
}

/// `sample`: the token of every logits row (argmax, lowest id on ties; device-side sampling
/// with temperature / top-k / top-p belongs here too once an executor needs it).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SampleParams {
    pub vocab: usize,
}

/// One op's kind and its parameters.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum OpKind {
    Embed(EmbedParams),
    RmsNorm(NormParams),
    QkvRope(QkvRopeParams),
    Attention(AttentionParams),
    OProj(OProjParams),
    NormRouterTopK(RouterParams),
    ExpertsGateUp(ExpertsGateUpParams),
    ExpertsDown(ExpertsDownParams),
    MlpGateUp(MlpGateUpParams),
    MlpDown(MlpDownParams),
    AllReduce(AllReduceParams),
    LmHead(LmHeadParams),
    Sample(SampleParams),
    /// A drafter's context op (see [`draft`]).
    DraftContext(draft::ContextParams),
    /// A drafter layer's attention over its context cache and the block (see [`draft`]).
    DraftAttention(draft::BlockAttentionParams),
}

impl OpKind {
    /// The op's name (the GPU executor's profiling marks use the same names).
    pub fn name(&self) -> &'static str {
        match self {
            OpKind::Embed(_) => "embed",
            OpKind::RmsNorm(_) => "rms_norm",
            OpKind::QkvRope(_) => "qkv_rope_kv",
            OpKind::Attention(_) => "attention",
            OpKind::OProj(_) => "o_proj",
            OpKind::NormRouterTopK(_) => "norm_router_topk",
            OpKind::ExpertsGateUp(_) => "experts_gate_up",
            OpKind::ExpertsDown(_) => "experts_down",
            OpKind::MlpGateUp(_) => "mlp_gate_up",
            OpKind::MlpDown(_) => "mlp_down",
            OpKind::AllReduce(_) => "all_reduce",
            OpKind::LmHead(_) => "lm_head",
            OpKind::Sample(_) => "sample",
            OpKind::DraftContext(_) => "draft_context",
            OpKind::DraftAttention(_) => "draft_attention",
        }
    }
}

/// Where an op runs in a tensor-parallel plan.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Placement {
    /// Every rank computes it on identical inputs (an unsharded plan: the one device).
    Replicated,
    /// One rank, on its shard.
    Rank(usize),
}

/// One op of a plan.
#[derive(Debug, Clone, PartialEq)]
pub struct Op {
    pub kind: OpKind,
    /// The decoder layer (None for model-level ops).
    pub layer: Option<usize>,
    pub placement: Placement,
    pub inputs: Vec<Buf>,
    pub outputs: Vec<Buf>,
    pub weights: Vec<WeightId>,
    /// Weight bytes the op reads for the pass.
    pub weight_bytes: f64,
    /// KV-cache bytes the op reads (attention).
    pub kv_bytes: f64,
    pub flops: f64,
}

/// A hidden state an executor can return: index `hidden` (the `crate::cpu` indexing) is buffer
/// `buf` right after op `after`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Tap {
    pub hidden: usize,
    pub after: usize,
    pub buf: Buf,
}

/// Per-layer tables, derived once.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LayerTables {
    /// Index into [`Plan::ropes`].
    pub rope: RopeId,
    /// Sliding window (None: full attention).
    pub window: Option<usize>,
    /// Key / value row widths of the layer's KV cache (per rank when sharded).
    pub k_width: usize,
    pub v_width: usize,
}

impl LayerTables {
    /// Positions a device ring cache of this layer holds for sequences of at most `max_seq`
    /// positions, passes of at most `max_rows` rows and truncation up to `max_rollback` back:
    /// `max_seq` for full attention, `min(window + max_rows + max_rollback, max_seq)` for a
    /// sliding window (the keys a pass's queries see, plus the rows a rollback must restore).
    pub fn kv_capacity(&self, max_seq: usize, max_rows: usize, max_rollback: usize) -> usize {
        match self.window {
            None => max_seq,
            Some(w) => (w + max_rows + max_rollback).min(max_seq),
        }
    }

    /// Most keys the queries of one pass of at most `max_rows` rows read (sizes attention
    /// splits): `max_seq` for full attention, `min(window + max_rows, max_seq)` for a window.
    pub fn max_keys(&self, max_seq: usize, max_rows: usize) -> usize {
        match self.window {
            None => max_seq,
            Some(w) => (w + max_rows).min(max_seq),
        }
    }

    /// Rows a sliding layer of a growable host cache keeps when it compacts: `window − 1 +
    /// max_rollback` (`crate::cpu::kv`; 0 for full attention, which never compacts).
    pub fn kv_keep(&self, max_rollback: usize) -> usize {
        self.window
            .map_or(0, |w| w.saturating_sub(1) + max_rollback)
    }
}

/// The ordered ops of one pass.
#[derive(Debug, Clone, PartialEq)]
pub struct Plan {
    pub shape: PassShape,
    pub storage: WeightStorage,
    /// Tensor-parallel ranks (1 = unsharded).
    pub ranks: usize,
    /// Distinct RoPE configurations (executors build one table each).
    pub ropes: Vec<Rope>,
    pub layers: Vec<LayerTables>,
    pub ops: Vec<Op>,
    pub taps: Vec<Tap>,
}

/// Hidden index of the last layer's output before the final norm (as
/// [`crate::executor::LAST_LAYER_PRE_NORM`]).
pub use crate::executor::LAST_LAYER_PRE_NORM;

/// Totals of a plan.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Totals {
    pub ops: usize,
    pub weight_bytes: f64,
    pub kv_bytes: f64,
    pub flops: f64,
}

/// A plan that cannot be built (inconsistent config).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PlanError {
    #[error("layer {layer}: {reason}")]
    Layer { layer: usize, reason: String },
    #[error("{0}")]
    Invalid(String),
    /// The model does not shard over this many tensor-parallel ranks.
    #[error("tensor parallelism over {ranks} ranks: {reason}")]
    TensorParallel { ranks: usize, reason: String },
}

fn matmul_flops(rows: usize, out: usize, inp: usize) -> f64 {
    2.0 * rows as f64 * out as f64 * inp as f64
}

impl Plan {
    /// The plan of one pass of `shape` over a model of `cfg` stored as `storage`.
    pub fn new(
        cfg: &ModelConfig,
        storage: WeightStorage,
        shape: PassShape,
    ) -> Result<Plan, PlanError> {
        if shape.rows == 0 {
            return Err(PlanError::Invalid("a pass needs at least one row".into()));
        }
        if cfg.layers.is_empty() {
            return Err(PlanError::Invalid("the model has no layers".into()));
        }
        let (h, v, nl) = (cfg.hidden_size, cfg.vocab_size, cfg.layers.len());
        let (d, x) = (storage.dense_bytes, storage.expert_bytes);
        let t = shape.rows;
        let eps = cfg.rms_norm_eps;
        let mut b = Builder::new();

        let mut ropes: Vec<Rope> = Vec::new();
        let mut layers = Vec::with_capacity(nl);
        for (l, s) in cfg.layers.iter().enumerate() {
            if s.n_heads == 0 || s.n_kv_heads == 0 || !s.n_heads.is_multiple_of(s.n_kv_heads) {
                return Err(PlanError::Layer {
                    layer: l,
                    reason: format!(
                        "{} query heads do not group over {} KV heads",
                        s.n_heads, s.n_kv_heads
                    ),
                });
            }
            let rope = match ropes.iter().position(|r| *r == s.rope) {
                Some(i) => i,
                None => {
                    ropes.push(s.rope);
                    ropes.len() - 1
                }
            };
            layers.push(LayerTables {
                rope,
                window: match s.attn {
                    AttnKind::Full => None,
                    AttnKind::Sliding { window } => Some(window),
                },
                k_width: s.n_kv_heads * s.head_dim,
                v_width: s.n_kv_heads * s.v_head_dim,
            });
        }

        let norm = |tensor: Tensor, layer: Option<usize>| NormParams {
            weight: WeightId {
                tensor,
                layer,
                shard: None,
            },
            dim: h,
            eps,
        };
        let next_norm = |l: usize| {
            if l + 1 < nl {
                norm(Tensor::InputNorm, Some(l + 1))
            } else {
                norm(Tensor::FinalNorm, None)
            }
        };

        b.push(Op {
            kind: OpKind::Embed(EmbedParams {
                vocab: v,
                hidden: h,
                scale: 1.0,
            }),
            layer: None,
            placement: Placement::Replicated,
            inputs: vec![Buf::Tokens],
            outputs: vec![Buf::X],
            weights: vec![WeightId::model(Tensor::Embed)],
            weight_bytes: 0.0,
            kv_bytes: 0.0,
            flops: 0.0,
        });
        b.tap(0, Buf::X);
        b.push(norm_op(norm(Tensor::InputNorm, Some(0)), Some(0), t, d));

        for (l, s) in cfg.layers.iter().enumerate() {
            let geom = AttnGeom {
                n_heads: s.n_heads,
                n_kv_heads: s.n_kv_heads,
                head_dim: s.head_dim,
                v_head_dim: s.v_head_dim,
            };
            let lt = layers[l];
            b.push(qkv_op(
                l,
                QkvRopeParams {
                    geom,
                    hidden: h,
                    rope: lt.rope,
                    rotary_dim: s.rope.rotary_dim,
                    qk_norm: s.qk_norm,
                    bias: s.attn_bias,
                    eps,
                    value_scale: cfg.value_scale,
                    kv_only: false,
                },
                0,
                None,
                t,
                d,
            ));
            b.push(attention_op(
                l,
                AttentionParams {
                    geom,
                    window: lt.window,
                    sinks: s.sinks,
                    scale: (1.0 / (s.head_dim as f64).sqrt()) as f32,
                },
                0,
                None,
                &shape,
                storage,
            ));
            b.push(o_proj_op(
                l,
                OProjParams {
                    in_dim: geom.out_width(),
                    out_dim: h,
                    bias: s.attn_bias,
                    residual: true,
                },
                0,
                None,
                t,
                d,
            ));
            let glu = cfg.activation;
            if s.moe {
                let i = cfg.moe_intermediate_size;
                let (e, k) = (cfg.n_experts, cfg.top_k);
                let expert_bias = matches!(cfg.router, RouterSpec::GptOss);
                let layout = match cfg.arch {
                    crate::config::Arch::GptOss => GateUpLayout::Interleaved,
                    _ => GateUpLayout::Halves,
                };
                let rp = RouterParams {
                    norm: norm(Tensor::PostAttnNorm, Some(l)),
                    n_experts: e,
                    top_k: k,
                    kind: cfg.router,
                    bias: matches!(cfg.router, RouterSpec::GptOss),
                    correction_bias: matches!(cfg.router, RouterSpec::Sigmoid { .. }),
                };
                b.push(router_op(l, rp, t, d));
                b.push(experts_gate_up_op(
                    l,
                    ExpertsGateUpParams {
                        n_experts: e,
                        experts: ExpertRange::all(e),
                        top_k: k,
                        hidden: h,
                        intermediate: i,
                        glu,
                        layout,
                        bias: expert_bias,
                        mxfp4: storage.mxfp4_experts,
                    },
                    0,
                    None,
                    t,
                    (d, x),
                ));
                b.push(experts_down_op(
                    l,
                    ExpertsDownParams {
                        n_experts: e,
                        experts: ExpertRange::all(e),
                        top_k: k,
                        hidden: h,
                        intermediate: i,
                        bias: expert_bias,
                        mxfp4: storage.mxfp4_experts,
                        residual: true,
                        next_norm: Some(next_norm(l)),
                    },
                    0,
                    None,
                    t,
                    (d, x),
                ));
            } else {
                let Some(i) = cfg.dense_intermediate_size else {
                    return Err(PlanError::Layer {
                        layer: l,
                        reason: "dense MLP layer without dense_intermediate_size".into(),
                    });
                };
                b.push(norm_op(norm(Tensor::PostAttnNorm, Some(l)), Some(l), t, d));
                b.push(mlp_gate_up_op(
                    l,
                    MlpGateUpParams {
                        hidden: h,
                        intermediate: i,
                        glu,
                        bias: false,
                    },
                    0,
                    None,
                    t,
                    d,
                ));
                b.push(mlp_down_op(
                    l,
                    MlpDownParams {
                        hidden: h,
                        intermediate: i,
                        bias: false,
                        residual: true,
                        next_norm: Some(next_norm(l)),
                    },
                    0,
                    None,
                    t,
                    d,
                ));
            }
            let idx = if l + 1 < nl {
                l + 1
            } else {
                LAST_LAYER_PRE_NORM
            };
            b.tap(idx, Buf::X);
        }
        b.tap(nl, Buf::H);
        push_head(&mut b, &shape, v, h, 0, d);
        Ok(Plan {
            shape,
            storage,
            ranks: 1,
            ropes,
            layers,
            ops: b.ops,
            taps: b.taps,
        })
    }

    /// Sums over the ops.
    pub fn totals(&self) -> Totals {
        Totals {
            ops: self.ops.len(),
            weight_bytes: self.ops.iter().map(|o| o.weight_bytes).sum(),
            kv_bytes: self.ops.iter().map(|o| o.kv_bytes).sum(),
            flops: self.ops.iter().map(|o| o.flops).sum(),
        }
    }

    /// Checks that the op list is a valid schedule: every input is a pass input (token ids,
    /// drafter features), a KV cache (persistent across passes), or written by an earlier op;
    /// every rank-placed op's rank-local buffers belong to its rank; taps follow existing ops
    /// and read buffers written by then. Executors may rely on it (the CPU checks every plan it
    /// builds).
    pub fn validate(&self) -> Result<(), PlanError> {
        let mut written: Vec<Buf> = vec![Buf::Tokens, Buf::Features];
        let bad = |i: usize, op: &Op, why: String| {
            PlanError::Invalid(format!(
                "op {i} ({}, layer {:?}): {why}",
                op.kind.name(),
                op.layer
            ))
        };
        let mut taps = self.taps.iter().peekable();
        for (i, op) in self.ops.iter().enumerate() {
            for b in &op.inputs {
                if !matches!(b, Buf::Kv { .. }) && !written.contains(b) {
                    return Err(bad(i, op, format!("reads {b} before any op writes it")));
                }
            }
            if let Placement::Rank(r) = op.placement {
                if r >= self.ranks {
                    return Err(bad(i, op, format!("placed on rank {r} of {}", self.ranks)));
                }
                for b in op.inputs.iter().chain(&op.outputs) {
                    let owner = match *b {
                        Buf::Q(x) | Buf::Attn(x) | Buf::Act(x) | Buf::Partial(x) => Some(x),
                        Buf::Kv { rank, .. } => Some(rank),
                        _ => None,
                    };
                    if owner.is_some_and(|x| x != r) {
                        return Err(bad(i, op, format!("rank {r} touches {b}")));
                    }
                }
            }
            for b in &op.outputs {
                if !written.contains(b) {
                    written.push(*b);
                }
            }
            while let Some(t) = taps.next_if(|t| t.after == i) {
                if !written.contains(&t.buf) {
                    return Err(PlanError::Invalid(format!(
                        "hidden state {} reads {} after op {i}, before any op writes it",
                        t.hidden, t.buf
                    )));
                }
            }
        }
        if let Some(t) = taps.next() {
            return Err(PlanError::Invalid(format!(
                "hidden state {} follows op {}, which is out of order or beyond the {} ops",
                t.hidden,
                t.after,
                self.ops.len()
            )));
        }
        Ok(())
    }

    /// The taps of hidden index `hidden`.
    pub fn taps_of(&self, hidden: usize) -> impl Iterator<Item = &Tap> {
        self.taps.iter().filter(move |t| t.hidden == hidden)
    }

    /// The same plan with the LM head (and sample) replaced for `logits` (the layer ops do not
    /// depend on which rows get logits).
    pub fn with_logits(&self, logits: Logits) -> Plan {
        let mut p = self.clone();
        p.shape.logits = logits;
        let d = p.storage.dense_bytes;
        p.ops
            .retain(|o| !matches!(o.kind, OpKind::LmHead(_) | OpKind::Sample(_)));
        let mut b = Builder {
            ops: std::mem::take(&mut p.ops),
            taps: Vec::new(),
        };
        let (v, h) = (self.vocab(), self.hidden());
        push_head(&mut b, &p.shape, v, h, 0, d);
        p.ops = b.ops;
        p
    }

    fn vocab(&self) -> usize {
        self.ops
            .iter()
            .find_map(|o| match o.kind {
                OpKind::Embed(e) => Some(e.vocab),
                _ => None,
            })
            .unwrap_or(0)
    }

    fn hidden(&self) -> usize {
        self.ops
            .iter()
            .find_map(|o| match o.kind {
                OpKind::Embed(e) => Some(e.hidden),
                _ => None,
            })
            .unwrap_or(0)
    }
}

pub(crate) struct Builder {
    pub(crate) ops: Vec<Op>,
    pub(crate) taps: Vec<Tap>,
}

impl Builder {
    pub(crate) fn new() -> Builder {
        Builder {
            ops: Vec::new(),
            taps: Vec::new(),
        }
    }
    pub(crate) fn push(&mut self, op: Op) {
        self.ops.push(op);
    }
    /// Hidden index `hidden` is `buf` after the last op pushed.
    pub(crate) fn tap(&mut self, hidden: usize, buf: Buf) {
        self.taps.push(Tap {
            hidden,
            after: self.ops.len() - 1,
            buf,
        });
    }
}

fn placement(rank: usize, shard: Option<Shard>) -> Placement {
    match shard {
        Some(_) => Placement::Rank(rank),
        None => Placement::Replicated,
    }
}

fn w(tensor: Tensor, l: usize, shard: Option<Shard>) -> WeightId {
    WeightId {
        tensor,
        layer: Some(l),
        shard,
    }
}

pub(crate) fn norm_op(p: NormParams, layer: Option<usize>, t: usize, d: f64) -> Op {
    Op {
        kind: OpKind::RmsNorm(p),
        layer,
        placement: Placement::Replicated,
        inputs: vec![Buf::X],
        outputs: vec![Buf::H],
        weights: vec![p.weight],
        weight_bytes: p.dim as f64 * d,
        kv_bytes: 0.0,
        flops: 4.0 * t as f64 * p.dim as f64,
    }
}

pub(crate) fn qkv_op(
    l: usize,
    p: QkvRopeParams,
    rank: usize,
    shard: Option<(Shard, Shard)>,
    t: usize,
    d: f64,
) -> Op {
    let g = p.geom;
    let (hs, kvs) = match shard {
        Some((a, b)) => (Some(a), Some(b)),
        None => (None, None),
    };
    let q_rows = if p.kv_only { 0 } else { g.q_width() };
    let mut weights = Vec::with_capacity(8);
    if !p.kv_only {
        weights.push(w(Tensor::Q, l, hs));
    }
    weights.extend([w(Tensor::K, l, kvs), w(Tensor::V, l, kvs)]);
    let rows = q_rows + g.k_width() + g.v_width();
    let mut params = rows * p.hidden;
    if p.bias {
        if !p.kv_only {
            weights.push(w(Tensor::QBias, l, hs));
        }
        weights.extend([w(Tensor::KBias, l, kvs), w(Tensor::VBias, l, kvs)]);
        params += rows;
    }
    if p.qk_norm {
        if !p.kv_only {
            weights.push(w(Tensor::QNorm, l, None));
            params += g.head_dim;
        }
        weights.push(w(Tensor::KNorm, l, None));
        params += g.head_dim;
    }
    let mut outputs = vec![Buf::Kv { layer: l, rank }];
    if !p.kv_only {
        outputs.insert(0, Buf::Q(rank));
    }
    Op {
        kind: OpKind::QkvRope(p),
        layer: Some(l),
        placement: placement(rank, hs),
        inputs: vec![Buf::H],
        outputs,
        weights,
        weight_bytes: params as f64 * d,
        kv_bytes: 0.0,
        flops: matmul_flops(t, rows, p.hidden),
    }
}

pub(crate) fn attention_op(
    l: usize,
    p: AttentionParams,
    rank: usize,
    shard: Option<Shard>,
    shape: &PassShape,
    storage: WeightStorage,
) -> Op {
    let g = p.geom;
    let mut keys_total = 0usize;
    let mut keys_max = 0usize;
    for i in 0..shape.rows {
        let pos = shape.row_position(i);
        let visible = match p.window {
            Some(win) => (pos + 1).min(win),
            None => pos + 1,
        };
        keys_total += visible;
        keys_max = keys_max.max(visible);
    }
    // A single sequence reads its keys once for the whole block; batched rows read their own.
    let keys_read = match shape.kind {
        PassKind::Batched => keys_total,
        _ => keys_max,
    };
    let mut weights = Vec::new();
    let mut wb = 0.0;
    if p.sinks {
        weights.push(w(Tensor::Sinks, l, shard));
        wb = g.n_heads as f64 * storage.dense_bytes;
    }
    Op {
        kind: OpKind::Attention(p),
        layer: Some(l),
        placement: placement(rank, shard),
        inputs: vec![Buf::Q(rank), Buf::Kv { layer: l, rank }],
        outputs: vec![Buf::Attn(rank)],
        weights,
        weight_bytes: wb,
        kv_bytes: keys_read as f64 * (g.k_width() + g.v_width()) as f64 * storage.kv_bytes,
        flops: 2.0 * keys_total as f64 * g.n_heads as f64 * (g.head_dim + g.v_head_dim) as f64,
    }
}

pub(crate) fn o_proj_op(
    l: usize,
    p: OProjParams,
    rank: usize,
    shard: Option<Shard>,
    t: usize,
    d: f64,
) -> Op {
    let mut weights = vec![w(Tensor::O, l, shard)];
    let mut params = p.in_dim * p.out_dim;
    if p.bias {
        weights.push(w(
            Tensor::OBias,
            l,
            shard.map(|s| Shard {
                unit: ShardUnit::Whole,
                ..s
            }),
        ));
        params += p.out_dim;
    }
    Op {
        kind: OpKind::OProj(p),
        layer: Some(l),
        placement: placement(rank, shard),
        inputs: vec![Buf::Attn(rank)],
        outputs: vec![if p.residual {
            Buf::X
        } else {
            Buf::Partial(rank)
        }],
        weights,
        weight_bytes: params as f64 * d,
        kv_bytes: 0.0,
        flops: matmul_flops(t, p.out_dim, p.in_dim),
    }
}

pub(crate) fn router_op(l: usize, p: RouterParams, t: usize, d: f64) -> Op {
    let mut weights = vec![p.norm.weight, w(Tensor::Router, l, None)];
    let mut params = p.norm.dim + p.n_experts * p.norm.dim;
    if p.bias {
        weights.push(w(Tensor::RouterBias, l, None));
        params += p.n_experts;
    }
    if p.correction_bias {
        weights.push(w(Tensor::CorrectionBias, l, None));
        params += p.n_experts;
    }
    Op {
        kind: OpKind::NormRouterTopK(p),
        layer: Some(l),
        placement: Placement::Replicated,
        inputs: vec![Buf::X],
        outputs: vec![Buf::H, Buf::Routing],
        weights,
        weight_bytes: params as f64 * d,
        kv_bytes: 0.0,
        flops: matmul_flops(t, p.n_experts, p.norm.dim) + 4.0 * (t * p.norm.dim) as f64,
    }
}

/// Attention FLOPs of `rows` query rows whose visible key count is `end(i)` (capped by
/// `window`), and the keys the block reads (the longest row's).
pub(crate) fn attention_flops_rows(
    g: &AttnGeom,
    window: Option<usize>,
    rows: usize,
    end: impl Fn(usize) -> usize,
) -> (f64, usize) {
    let mut total = 0usize;
    let mut most = 0usize;
    for i in 0..rows {
        let keys = window.map_or(end(i), |w| end(i).min(w));
        total += keys;
        most = most.max(keys);
    }
    (
        2.0 * total as f64 * g.n_heads as f64 * (g.head_dim + g.v_head_dim) as f64,
        most,
    )
}

/// Distinct experts a pass of `t` rows reads, at most: `min(E, t·k)` (`k` for a decode); of an
/// expert-parallel rank's `held` experts, that many times its share `held / E` (the expected
/// count under uniform routing).
fn experts_read(t: usize, k: usize, e: usize, held: ExpertRange) -> f64 {
    let all = (t * k).min(e) as f64;
    if e == 0 {
        return 0.0;
    }
    all * held.len() as f64 / e as f64
}

pub(crate) fn experts_gate_up_op(
    l: usize,
    p: ExpertsGateUpParams,
    rank: usize,
    shard: Option<Shard>,
    t: usize,
    (d, x): (f64, f64),
) -> Op {
    let n = experts_read(t, p.top_k, p.n_experts, p.experts);
    let (i2, h) = (2 * p.intermediate, p.hidden);
    let mut weights = vec![w(Tensor::ExpertsGateUp, l, shard)];
    let mut bytes = n * (i2 * h) as f64 * x;
    if p.bias {
        weights.push(w(Tensor::ExpertsGateUpBias, l, shard));
        bytes += n * i2 as f64 * d;
    }
    Op {
        kind: OpKind::ExpertsGateUp(p),
        layer: Some(l),
        placement: placement(rank, shard),
        inputs: vec![Buf::H, Buf::Routing],
        outputs: vec![Buf::Act(rank)],
        weights,
        weight_bytes: bytes,
        kv_bytes: 0.0,
        flops: matmul_flops(t * p.top_k, i2, h),
    }
}

pub(crate) fn experts_down_op(
    l: usize,
    p: ExpertsDownParams,
    rank: usize,
    shard: Option<Shard>,
    t: usize,
    (d, x): (f64, f64),
) -> Op {
    let n = experts_read(t, p.top_k, p.n_experts, p.experts);
    let (i, h) = (p.intermediate, p.hidden);
    let mut weights = vec![w(Tensor::ExpertsDown, l, shard)];
    let mut bytes = n * (i * h) as f64 * x;
    if p.bias {
        // Split along I, the bias is added once (rank 0); placed whole, each expert's with it.
        weights.push(w(
            Tensor::ExpertsDownBias,
            l,
            shard.map(|s| match s.unit {
                ShardUnit::Experts => s,
                _ => Shard {
                    unit: ShardUnit::Whole,
                    ..s
                },
            }),
        ));
        bytes += n * h as f64 * d;
    }
    if let Some(nn) = p.next_norm {
        weights.push(nn.weight);
        bytes += nn.dim as f64 * d;
    }
    let outputs = if p.residual {
        vec![Buf::X, Buf::H]
    } else {
        vec![Buf::Partial(rank)]
    };
    Op {
        kind: OpKind::ExpertsDown(p),
        layer: Some(l),
        placement: placement(rank, shard),
        inputs: vec![Buf::Act(rank), Buf::Routing],
        outputs,
        weights,
        weight_bytes: bytes,
        kv_bytes: 0.0,
        flops: matmul_flops(t * p.top_k, h, i),
    }
}

pub(crate) fn mlp_gate_up_op(
    l: usize,
    p: MlpGateUpParams,
    rank: usize,
    shard: Option<Shard>,
    t: usize,
    d: f64,
) -> Op {
    let i2 = 2 * p.intermediate;
    Op {
        kind: OpKind::MlpGateUp(p),
        layer: Some(l),
        placement: placement(rank, shard),
        inputs: vec![Buf::H],
        outputs: vec![Buf::Act(rank)],
        weights: vec![w(Tensor::MlpGateUp, l, shard)],
        weight_bytes: (i2 * p.hidden + if p.bias { i2 } else { 0 }) as f64 * d,
        kv_bytes: 0.0,
        flops: matmul_flops(t, i2, p.hidden),
    }
}

pub(crate) fn mlp_down_op(
    l: usize,
    p: MlpDownParams,
    rank: usize,
    shard: Option<Shard>,
    t: usize,
    d: f64,
) -> Op {
    let mut weights = vec![w(Tensor::MlpDown, l, shard)];
    let mut params = p.intermediate * p.hidden + if p.bias { p.hidden } else { 0 };
    if let Some(nn) = p.next_norm {
        weights.push(nn.weight);
        params += nn.dim;
    }
    let outputs = if p.residual {
        vec![Buf::X, Buf::H]
    } else {
        vec![Buf::Partial(rank)]
    };
    Op {
        kind: OpKind::MlpDown(p),
        layer: Some(l),
        placement: placement(rank, shard),
        inputs: vec![Buf::Act(rank)],
        outputs,
        weights,
        weight_bytes: params as f64 * d,
        kv_bytes: 0.0,
        flops: matmul_flops(t, p.hidden, p.intermediate),
    }
}

pub(crate) fn push_head(
    b: &mut Builder,
    shape: &PassShape,
    v: usize,
    h: usize,
    skip_rows: usize,
    d: f64,
) {
    if shape.logits == Logits::None {
        return;
    }
    let rows = shape.logit_rows().saturating_sub(skip_rows);
    b.push(Op {
        kind: OpKind::LmHead(LmHeadParams {
            vocab: v,
            hidden: h,
            rows: shape.logits,
            skip_rows,
        }),
        layer: None,
        placement: Placement::Replicated,
        inputs: vec![Buf::H],
        outputs: vec![Buf::Logits],
        weights: vec![WeightId::model(Tensor::LmHead)],
        weight_bytes: (v * h) as f64 * d,
        kv_bytes: 0.0,
        flops: matmul_flops(rows, v, h),
    });
    if shape.sample {
        b.push(Op {
            kind: OpKind::Sample(SampleParams { vocab: v }),
            layer: None,
            placement: Placement::Replicated,
            inputs: vec![Buf::Logits],
            outputs: vec![Buf::Sampled],
            weights: Vec::new(),
            weight_bytes: 0.0,
            kv_bytes: 0.0,
            flops: (rows * v) as f64,
        });
    }
}

// ---------------------------------------------------------------------------------------------
// Printing
// ---------------------------------------------------------------------------------------------

/// `12.3 MB`-style byte counts.
pub fn human_bytes(b: f64) -> String {
    if b >= 1e9 {
        format!("{:.3} GB", b / 1e9)
    } else if b >= 1e6 {
        format!("{:.3} MB", b / 1e6)
    } else if b >= 1e3 {
        format!("{:.1} kB", b / 1e3)
    } else {
        format!("{b:.0} B")
    }
}

/// `1.23 GFLOP`-style counts.
pub fn human_flops(f: f64) -> String {
    if f >= 1e12 {
        format!("{:.3} TFLOP", f / 1e12)
    } else if f >= 1e9 {
        format!("{:.3} GFLOP", f / 1e9)
    } else if f >= 1e6 {
        format!("{:.3} MFLOP", f / 1e6)
    } else if f >= 1e3 {
        format!("{:.1} kFLOP", f / 1e3)
    } else {
        format!("{f:.0} FLOP")
    }
}

/// ` (experts lo..hi)` for an expert-parallel rank's share of `n` experts, else nothing.
fn held(r: &ExpertRange, n: usize) -> String {
    if r.is_part_of(n) {
        format!(" (experts {}..{})", r.lo, r.hi)
    } else {
        String::new()
    }
}

impl fmt::Display for OpKind {
    /// The parameter struct in one line.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            OpKind::Embed(p) => write!(f, "V={} H={} scale={}", p.vocab, p.hidden, p.scale),
            OpKind::RmsNorm(p) => write!(f, "dim={} eps={:e}", p.dim, p.eps),
            OpKind::QkvRope(p) => write!(
                f,
                "heads={}/{} d={}/{} rope#{} rot={} qk_norm={} bias={} v·{}",
                p.geom.n_heads,
                p.geom.n_kv_heads,
                p.geom.head_dim,
                p.geom.v_head_dim,
                p.rope,
                p.rotary_dim,
                p.qk_norm,
                p.bias,
                p.value_scale
            ),
            OpKind::Attention(p) => write!(
                f,
                "heads={}/{} d={}/{} window={} sinks={} scale={:.6}",
                p.geom.n_heads,
                p.geom.n_kv_heads,
                p.geom.head_dim,
                p.geom.v_head_dim,
                p.window.map_or("full".to_string(), |w| w.to_string()),
                p.sinks,
                p.scale
            ),
            OpKind::OProj(p) => write!(
                f,
                "{}→{} bias={} {}",
                p.in_dim,
                p.out_dim,
                p.bias,
                if p.residual { "x+=" } else { "partial" }
            ),
            OpKind::NormRouterTopK(p) => write!(
                f,
                "E={} top-{} {:?} bias={} correction_bias={}",
                p.n_experts, p.top_k, p.kind, p.bias, p.correction_bias
            ),
            OpKind::ExpertsGateUp(p) => write!(
                f,
                "E={}{} k={} {}→2×{} {:?} {:?} bias={}{}",
                p.n_experts,
                held(&p.experts, p.n_experts),
                p.top_k,
                p.hidden,
                p.intermediate,
                p.glu,
                p.layout,
                p.bias,
                if p.mxfp4 { " MXFP4" } else { "" }
            ),
            OpKind::ExpertsDown(p) => write!(
                f,
                "E={}{} k={} {}→{} bias={}{} {}",
                p.n_experts,
                held(&p.experts, p.n_experts),
                p.top_k,
                p.intermediate,
                p.hidden,
                p.bias,
                if p.mxfp4 { " MXFP4" } else { "" },
                if p.residual {
                    "x+= then next norm"
                } else {
                    "partial"
                }
            ),
            OpKind::MlpGateUp(p) => write!(
                f,
                "{}→2×{} {:?} bias={}",
                p.hidden, p.intermediate, p.glu, p.bias
            ),
            OpKind::MlpDown(p) => write!(
                f,
                "{}→{} bias={} {}",
                p.intermediate,
                p.hidden,
                p.bias,
                if p.residual {
                    "x+= then next norm"
                } else {
                    "partial"
                }
            ),
            OpKind::AllReduce(p) => write!(
                f,
                "sum {} ranks × {} then x+={}",
                p.ranks,
                p.width,
                if p.next_norm.is_some() {
                    ", next norm"
                } else {
                    ""
                }
            ),
            OpKind::LmHead(p) => write!(f, "{}→{} rows={:?}", p.hidden, p.vocab, p.rows),
            OpKind::Sample(p) => write!(f, "argmax over {}", p.vocab),
            OpKind::DraftContext(p) => write!(
                f,
                "features {}→{} then k/v of {} layers",
                p.features, p.hidden, p.layers
            ),
            OpKind::DraftAttention(p) => write!(
                f,
                "heads={}/{} d={} window={} causal={} sinks={}",
                p.geom.n_heads,
                p.geom.n_kv_heads,
                p.geom.head_dim,
                p.window.map_or("full".to_string(), |w| w.to_string()),
                p.causal,
                p.sinks
            ),
        }
    }
}

impl fmt::Display for Plan {
    /// One line per op (name, layer, rank, inputs → outputs, weights, bytes, FLOPs, params) and
    /// the totals.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "plan: {}, {} rank{}, weights {}",
            self.shape,
            self.ranks,
            if self.ranks == 1 { "" } else { "s" },
            self.storage.label
        )?;
        for (i, r) in self.ropes.iter().enumerate() {
            writeln!(
                f,
                "  rope#{i}: theta {} rotary_dim {}{}",
                r.theta,
                r.rotary_dim,
                if r.yarn.is_some() { " YaRN" } else { "" }
            )?;
        }
        writeln!(
            f,
            "{:>4} {:<17} {:>5} {:>4} {:<28} {:>11} {:>11} {:>13}  params / weights",
            "#", "op", "layer", "rank", "in → out", "weights", "KV read", "FLOPs"
        )?;
        for (i, op) in self.ops.iter().enumerate() {
            let io = format!(
                "{} → {}",
                op.inputs
                    .iter()
                    .map(|b| b.to_string())
                    .collect::<Vec<_>>()
                    .join(","),
                op.outputs
                    .iter()
                    .map(|b| b.to_string())
                    .collect::<Vec<_>>()
                    .join(",")
            );
            let rank = match op.placement {
                Placement::Replicated => "*".to_string(),
                Placement::Rank(r) => r.to_string(),
            };
            let weights: Vec<String> = op.weights.iter().map(|w| w.to_string()).collect();
            writeln!(
                f,
                "{i:>4} {:<17} {:>5} {:>4} {:<28} {:>11} {:>11} {:>13}  {} | {}",
                op.kind.name(),
                op.layer.map_or("-".to_string(), |l| l.to_string()),
                rank,
                io,
                human_bytes(op.weight_bytes),
                if op.kv_bytes > 0.0 {
                    human_bytes(op.kv_bytes)
                } else {
                    "-".into()
                },
                human_flops(op.flops),
                op.kind,
                weights.join(" ")
            )?;
        }
        let t = self.totals();
        writeln!(
            f,
            "total: {} ops, weights {} ({:.0} bytes), KV {}, {}",
            t.ops,
            human_bytes(t.weight_bytes),
            t.weight_bytes,
            human_bytes(t.kv_bytes),
            human_flops(t.flops)
        )
    }
}
