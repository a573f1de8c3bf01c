//! Lowering a step plan ([`model::plan::Plan`]) to kernel launches: the one place where the GPU
//! runtime turns ops into launches, shared by the target's passes ([`super::GpuSession`]:
//! prefill chunks, decode, verify), the batched decode ([`super::GpuBatch`]) and the DFlash
//! drafter's context-append and block-draft passes ([`crate::draft`]).
//!
//! [`Lowering::encode`] walks the plan's ops and launches each op's kernel(s) in one
//! `match op.kind`, with every argument taken from the op's parameter struct and the plan's
//! per-layer tables; nothing is re-derived from a model config here. What the plan leaves to the
//! executor is bound from outside:
//!
//! * buffers: [`Bindings`] maps each [`Buf`] of the plan to a device buffer (`Buf::Kv` to one
//!   sequence's caches, or — batched decode — to a row table naming each row's own cache);
//! * weights: [`DeviceWeights`] maps each [`WeightId`] to the uploaded tensor (q, k and v are
//!   rows of one fused matrix on the device; a linear's bias travels with its matrix);
//! * RoPE tables: the device copies of [`Plan::ropes`], indexed by the ops' `rope` ids;
//! * hidden-state captures: [`Captures`] copies the [`Plan::taps`] a caller asked for.
//!
//! Fusion choices are made inside an op's arm and do not change the plan: `qkv_rope_kv` runs the
//! fused `linear_qkv_rope` when the layer's weight was uploaded in RoPE pair order, else
//! `linear` + `rope_kv_write`; `norm_router_topk` runs `router_route` when its alignment allows,
//! else `rms_norm` + `linear` + `route`; `experts_down` fuses the combine with the next norm;
//! the final norm of a drafter block skips the rows the LM head does not read.
//!
//! Profiling marks ([`super::GpuSession::profile_pass`]) are the op's [`OpKind::name`] for its
//! first launch and `name:part` for the further launches of one op (e.g.
//! `experts_down:combine_norm`), so every op has exactly one launch labelled with its name. An
//! error names the op, its index and its layer.

use cudarc::driver::CudaStream;
use model::drafter::DraftAttn;
use model::plan::{
    AttnGeom, Buf, Logits, Op, OpKind, Placement, Plan, QkvRopeParams, Tensor, WeightId,
};

use crate::arena::{dtod, DPtr};
use crate::moe::{DeviceMoe, MoeKernels};
use crate::ops::rows::{RowOps, KV_ROW_WORDS};
use crate::ops::{AttnArgs, GluArgs, Ops, RouteArgs, MAX_TOKENS};
use crate::tensor::{DenseData, DeviceMatrix};
use crate::RuntimeError;

use super::Rope;

/// The MLP of one layer on the device.
pub(crate) enum DeviceMlp {
    Dense {
        gate_up: DeviceMatrix,
        gate_up_bias: Option<DPtr<f32>>,
        down: DeviceMatrix,
        down_bias: Option<DPtr<f32>>,
    },
    Moe {
        router: DeviceMatrix,
        router_bias: Option<DPtr<f32>>,
        /// Sigmoid routers' selection-only bias.
        correction_bias: Option<DPtr<f32>>,
        experts: DeviceMoe,
    },
}

/// One decoder layer's weights on the device (a target's or a drafter's).
pub(crate) struct DeviceLayer {
    pub(crate) input_norm: DPtr<f32>,
    pub(crate) post_attn_norm: DPtr<f32>,
    /// `[q; k; v]` rows fused into one matrix.
    pub(crate) qkv: DeviceMatrix,
    pub(crate) qkv_bias: Option<DPtr<f32>>,
    /// `qkv` is in `ops::rope_pair_order`, so `qkv_rope_kv` runs `Ops::linear_qkv_rope` (RoPE
    /// and the KV write fused into the projection) instead of `linear` + `rope_kv_write`.
    pub(crate) qkv_rope_fused: bool,
    pub(crate) o: DeviceMatrix,
    pub(crate) o_bias: Option<DPtr<f32>>,
    pub(crate) q_norm: Option<DPtr<f32>>,
    pub(crate) k_norm: Option<DPtr<f32>>,
    pub(crate) sinks: Option<DPtr<f32>>,
    pub(crate) mlp: DeviceMlp,
}

/// The uploaded tensors a plan's [`WeightId`]s resolve to.
pub(crate) struct DeviceWeights {
    pub(crate) embed: DeviceMatrix,
    pub(crate) lm_head: DeviceMatrix,
    /// The final norm (a drafter's `norm`).
    pub(crate) final_norm: DPtr<f32>,
    pub(crate) layers: Vec<DeviceLayer>,
    /// A drafter's feature projection, split by target layer: `K` matrices `[H, H_t]`.
    pub(crate) fc: Vec<DeviceMatrix>,
    /// A drafter's norm of the projected features.
    pub(crate) hidden_norm: Option<DPtr<f32>>,
    /// `[1]`: a drafter's `input_embedding_scale` when it is not 1.
    pub(crate) embed_scale: Option<DPtr<f32>>,
}

fn missing(id: WeightId, what: &str) -> RuntimeError {
    RuntimeError::Invalid(format!("weight {id} ({what}) is not on the device"))
}

impl DeviceWeights {
    fn layer(&self, id: WeightId) -> Result<&DeviceLayer, RuntimeError> {
        if id.shard.is_some() {
            return Err(RuntimeError::Unsupported(format!(
                "weight {id}: tensor-parallel shards (one device holds whole tensors)"
            )));
        }
        id.layer
            .and_then(|l| self.layers.get(l))
            .ok_or_else(|| missing(id, "no such layer"))
    }

    /// A matrix and the bias uploaded with it.
    pub(crate) fn linear(
        &self,
        id: WeightId,
    ) -> Result<(&DeviceMatrix, Option<DPtr<f32>>), RuntimeError> {
        match id.tensor {
            Tensor::Embed => return Ok((&self.embed, None)),
            Tensor::LmHead => return Ok((&self.lm_head, None)),
            _ => {}
        }
        let l = self.layer(id)?;
        match (id.tensor, &l.mlp) {
            (Tensor::Q | Tensor::K | Tensor::V, _) => Ok((&l.qkv, l.qkv_bias)),
            (Tensor::O, _) => Ok((&l.o, l.o_bias)),
            (
                Tensor::Router,
                DeviceMlp::Moe {
                    router,
                    router_bias,
                    ..
                },
            ) => Ok((router, *router_bias)),
            (
                Tensor::MlpGateUp,
                DeviceMlp::Dense {
                    gate_up,
                    gate_up_bias,
                    ..
                },
            ) => Ok((gate_up, *gate_up_bias)),
            (
                Tensor::MlpDown,
                DeviceMlp::Dense {
                    down, down_bias, ..
                },
            ) => Ok((down, *down_bias)),
            _ => Err(missing(id, "a matrix")),
        }
    }

    /// A vector the op cannot run without (norm weights).
    pub(crate) fn vector(&self, id: WeightId) -> Result<DPtr<f32>, RuntimeError> {
        match id.tensor {
            Tensor::FinalNorm => return Ok(self.final_norm),
            Tensor::HiddenNorm => return self.hidden_norm.ok_or_else(|| missing(id, "a norm")),
            _ => {}
        }
        let l = self.layer(id)?;
        match id.tensor {
            Tensor::InputNorm => Ok(l.input_norm),
            Tensor::PostAttnNorm => Ok(l.post_attn_norm),
            _ => self.optional(id)?.ok_or_else(|| missing(id, "a vector")),
        }
    }

    /// A vector the checkpoint may not have (q/k norms, sinks, a correction bias).
    pub(crate) fn optional(&self, id: WeightId) -> Result<Option<DPtr<f32>>, RuntimeError> {
        let l = self.layer(id)?;
        match (id.tensor, &l.mlp) {
            (Tensor::QNorm, _) => Ok(l.q_norm),
            (Tensor::KNorm, _) => Ok(l.k_norm),
            (Tensor::Sinks, _) => Ok(l.sinks),
            (
                Tensor::CorrectionBias,
                DeviceMlp::Moe {
                    correction_bias, ..
                },
            ) => Ok(*correction_bias),
            _ => Err(missing(id, "an optional vector")),
        }
    }

    /// Whether `id` resolves (see [`check_weights`]).
    fn resolve(&self, id: WeightId) -> Result<(), RuntimeError> {
        let need = |present: bool| {
            if present {
                Ok(())
            } else {
                Err(missing(id, "a bias"))
            }
        };
        match id.tensor {
            Tensor::Embed
            | Tensor::LmHead
            | Tensor::Q
            | Tensor::K
            | Tensor::V
            | Tensor::O
            | Tensor::Router
            | Tensor::MlpGateUp
            | Tensor::MlpDown => self.linear(id).map(|_| ()),
            Tensor::QBias | Tensor::KBias | Tensor::VBias => {
                need(self.layer(id)?.qkv_bias.is_some())
            }
            Tensor::OBias => need(self.layer(id)?.o_bias.is_some()),
            Tensor::RouterBias => need(
                self.linear(WeightId {
                    tensor: Tensor::Router,
                    ..id
                })?
                .1
                .is_some(),
            ),
            Tensor::InputNorm | Tensor::PostAttnNorm | Tensor::FinalNorm | Tensor::HiddenNorm => {
                self.vector(id).map(|_| ())
            }
            Tensor::QNorm | Tensor::KNorm | Tensor::Sinks | Tensor::CorrectionBias => {
                self.optional(id).map(|_| ())
            }
            Tensor::ExpertsGateUp
            | Tensor::ExpertsDown
            | Tensor::ExpertsGateUpBias
            | Tensor::ExpertsDownBias => self.experts(id).map(|_| ()),
            Tensor::Fc => {
                if self.fc.is_empty() {
                    Err(missing(id, "the feature projection"))
                } else {
                    Ok(())
                }
            }
        }
    }

    /// The routed experts of a MoE layer.
    pub(crate) fn experts(&self, id: WeightId) -> Result<&DeviceMoe, RuntimeError> {
        match &self.layer(id)?.mlp {
            DeviceMlp::Moe { experts, .. } => Ok(experts),
            DeviceMlp::Dense { .. } => Err(missing(id, "routed experts")),
        }
    }
}

/// One layer's KV cache of one sequence: position p in slot `p % capacity` — contiguous, or with
/// `paging` a block pool read through a block table ([`crate::ops::KvPaging`]).
#[derive(Debug, Clone, Copy)]
pub(crate) struct LayerKv {
    pub(crate) k: DPtr<f32>,
    pub(crate) v: DPtr<f32>,
    pub(crate) capacity: usize,
    pub(crate) paging: Option<crate::ops::KvPaging>,
}

impl LayerKv {
    /// No cache (the batched kernels read each row's cache from the row table).
    pub(crate) const NONE: LayerKv = LayerKv {
        k: DPtr::null(),
        v: DPtr::null(),
        capacity: 0,
        paging: None,
    };
}

/// The row table of a batched decode: row `t` of the pass is the next token of its own
/// sequence, whose cache, position and key splits row `t` of layer `l`'s table names.
pub(crate) struct RowPass<'a> {
    pub(crate) ops: &'a RowOps,
    /// `[layer][MAX_TOKENS]` rows of [`KV_ROW_WORDS`] words.
    pub(crate) table: DPtr<u64>,
    /// Per layer, the largest key splits of any row (the attention grid).
    pub(crate) splits: &'a [usize],
    pub(crate) scratch: DPtr<f32>,
}

impl RowPass<'_> {
    fn rows(&self, l: usize, t: usize) -> DPtr<u64> {
        let at = l * MAX_TOKENS * KV_ROW_WORDS;
        self.table.slice(at..at + t * KV_ROW_WORDS)
    }
}

/// What `Buf::Kv` binds to.
pub(crate) enum KvBinding<'a> {
    /// One sequence: its layers' caches; `positions[i]` is the position of the pass's row `i`
    /// (only `positions[0]` for a target pass: row `i` is at `positions[0] + i`); `keys[l]` the
    /// keys that size layer `l`'s attention splits ([`model::plan::LayerTables::max_keys`]).
    Sequence {
        caches: &'a [LayerKv],
        positions: DPtr<u32>,
        keys: &'a [usize],
    },
    /// A batched decode: every row its own sequence.
    Rows(&'a RowPass<'a>),
}

/// What `Buf::Tokens` binds to.
pub(crate) enum TokenBinding {
    /// Token ids `[t]`.
    Ids(DPtr<u32>),
    /// A drafter block `[x_last, MASK × (t − 1)]`: the id of `x_last` and the (already scaled)
    /// mask rows.
    DraftBlock {
        x_last: DPtr<u32>,
        mask_rows: DPtr<f32>,
    },
    /// A pass without token input (a drafter's context append).
    None,
}

/// Scratch buffers of the arms (not plan buffers: the intermediates inside one op).
pub(crate) struct Scratch {
    /// The unfused QKV projection `[t, q + k + v]`.
    pub(crate) qkv: DPtr<f32>,
    /// Attention split partials and counters.
    pub(crate) attn: DPtr<f32>,
    /// A drafter's short-window rows (one attention call per row).
    pub(crate) attn_row: DPtr<f32>,
    pub(crate) router_logits: DPtr<f32>,
    /// The fused router's last-block counter (zero between launches).
    pub(crate) route_counter: DPtr<u32>,
    pub(crate) moe: DPtr<f32>,
    /// Weighted expert outputs `[t, k, H]` before the combine.
    pub(crate) y: DPtr<f32>,
    /// Dense MLP gate/up projection `[t, 2I]`.
    pub(crate) gu: DPtr<f32>,
    /// Where a dense MLP's activations (`Buf::Act`) live: `None` = right after the gate/up
    /// projection in `gu` (the target's layout; the activations' alignment picks the down
    /// projection's kernel, so the layout is kept as it is).
    pub(crate) dense_act: Option<DPtr<f32>>,
    /// The multi-block argmax's scratch.
    pub(crate) argmax: DPtr<u32>,
    /// A drafter's projected features before their norm `[t, H]`.
    pub(crate) ctx: DPtr<f32>,
    /// A tensor-parallel rank's partial sum `[t, H]` (`Buf::Partial`: what `o_proj`,
    /// `experts_down` and `mlp_down` write when their `residual` is off and the following
    /// `all_reduce` reads); null on one device.
    pub(crate) partial: DPtr<f32>,
}

/// The device buffers of a pass's [`Buf`]s: the `Buf → device buffer` map of one pass (one
/// field per buffer kind; [`check_plan`] checks that a plan names no other). `Buf::Kv` maps to
/// one sequence's layer caches or to a batched row table ([`KvBinding`]).
pub(crate) struct Bindings<'a> {
    pub(crate) tokens: TokenBinding,
    /// A drafter's input features: `K` column blocks `[t, H_t]` (`Buf::Features`).
    pub(crate) features: &'a [DPtr<f32>],
    pub(crate) x: DPtr<f32>,
    pub(crate) h: DPtr<f32>,
    pub(crate) q: DPtr<f32>,
    pub(crate) attn: DPtr<f32>,
    /// Expert activations `[t·k, I]` (`Buf::Act` of a MoE layer).
    pub(crate) act: DPtr<f32>,
    /// `Buf::Routing`: expert ids and gate weights `[t, k]`.
    pub(crate) ids: DPtr<i32>,
    pub(crate) weights: DPtr<f32>,
    pub(crate) logits: DPtr<f32>,
    /// `Buf::Sampled`.
    pub(crate) sampled: DPtr<u32>,
    pub(crate) kv: KvBinding<'a>,
    pub(crate) scratch: Scratch,
}

impl Bindings<'_> {
    /// The f32 activation buffer bound to `b` (`x`, `h`, `q`, `attn`, `act`, `logits`).
    pub(crate) fn f32(&self, b: Buf) -> Result<DPtr<f32>, RuntimeError> {
        match b {
            Buf::X => Ok(self.x),
            Buf::H => Ok(self.h),
            Buf::Q(0) => Ok(self.q),
            Buf::Attn(0) => Ok(self.attn),
            Buf::Act(0) => Ok(self.act),
            Buf::Logits => Ok(self.logits),
            b => Err(RuntimeError::Unsupported(format!(
                "buffer {b} is not an f32 activation of this pass"
            ))),
        }
    }
}

/// The hidden states a caller asked for: slot `s` (index `indices[s]`, as
/// [`model::plan::Tap::hidden`]) goes to `dst[s·stride ..]`.
pub(crate) struct Captures<'a> {
    pub(crate) indices: &'a [usize],
    pub(crate) dst: DPtr<f32>,
    pub(crate) stride: usize,
}

impl Captures<'_> {
    pub(crate) const NONE: Captures<'static> = Captures {
        indices: &[],
        dst: DPtr::null(),
        stride: 0,
    };
}

/// A profiling mark after each launch.
pub(crate) type Mark<'m> = dyn FnMut(&'static str) -> Result<(), RuntimeError> + 'm;

/// Checks, without a device, that this executor can lower `plan`: one device (no shards,
/// no all-reduce), residual outputs, at most [`MAX_TOKENS`] rows, and only buffers that
/// [`Bindings`] binds. [`Lowering::encode`] runs it first.
pub(crate) fn check_plan(plan: &Plan) -> Result<(), RuntimeError> {
    check_plan_for(plan, false)
}

/// [`check_plan`]; with `rank`, `plan` is one tensor-parallel rank's part of a sharded plan
/// (`exec::tp::rank_plan`): it may also write partial sums (`Buf::Partial(0)`) and all-reduce
/// them.
pub(crate) fn check_plan_for(plan: &Plan, rank: bool) -> Result<(), RuntimeError> {
    let unsupported = |i: usize, op: &Op, why: &str| {
        RuntimeError::Unsupported(format!(
            "op #{i} `{}`{}: {why}",
            op.kind.name(),
            layer_suffix(op)
        ))
    };
    if plan.ranks != 1 {
        return Err(RuntimeError::Unsupported(format!(
            "a plan sharded over {} tensor-parallel ranks (one GPU runs unsharded plans)",
            plan.ranks
        )));
    }
    let t = plan.shape.rows;
    if t == 0 || t > MAX_TOKENS {
        return Err(RuntimeError::Invalid(format!(
            "a pass of {t} rows (1..={MAX_TOKENS})"
        )));
    }
    for (i, op) in plan.ops.iter().enumerate() {
        if op.placement != Placement::Replicated {
            return Err(unsupported(i, op, "placed on a tensor-parallel rank"));
        }
        let residual = match op.kind {
            OpKind::AllReduce(_) if !rank => {
                return Err(unsupported(i, op, "all-reduce needs several GPUs"));
            }
            OpKind::OProj(p) => p.residual || rank,
            OpKind::ExpertsDown(p) => p.residual || rank,
            OpKind::MlpDown(p) => p.residual || rank,
            _ => true,
        };
        if !residual {
            return Err(unsupported(
                i,
                op,
                "writes a partial sum (no all-reduce here)",
            ));
        }
        for b in op.inputs.iter().chain(&op.outputs) {
            let bound = match *b {
                Buf::Tokens
                | Buf::Features
                | Buf::X
                | Buf::H
                | Buf::Routing
                | Buf::Logits
                | Buf::Sampled => true,
                Buf::Q(r) | Buf::Attn(r) | Buf::Act(r) => r == 0,
                Buf::Kv { layer, rank } => rank == 0 && layer < plan.layers.len(),
                Buf::Partial(r) => rank && r == 0,
            };
            if !bound {
                return Err(unsupported(
                    i,
                    op,
                    &format!("buffer {b} has no device binding"),
                ));
            }
        }
    }
    if let Some(t) = plan.taps.iter().find(|t| !matches!(t.buf, Buf::X | Buf::H)) {
        return Err(RuntimeError::Unsupported(format!(
            "hidden state {} taps {} (captures copy x or h)",
            t.hidden, t.buf
        )));
    }
    if head_skip(plan) > 0 && plan.taps.iter().any(|t| t.buf == Buf::H) {
        return Err(RuntimeError::Unsupported(
            "a hidden-state tap of the normed rows of a pass whose LM head skips rows".into(),
        ));
    }
    Ok(())
}

/// Checks, without a device, that every weight `plan`'s ops name resolves to a tensor of
/// `weights` (a bias travels with its matrix or experts and must be there when named; the
/// optional vectors — q/k norms, sinks, a correction bias — need only their layer).
pub(crate) fn check_weights(plan: &Plan, weights: &DeviceWeights) -> Result<(), RuntimeError> {
    for (i, op) in plan.ops.iter().enumerate() {
        for &id in &op.weights {
            weights.resolve(id).map_err(|e| RuntimeError::Op {
                pass: format!("op #{i} `{}`{}", op.kind.name(), layer_suffix(op)),
                source: Box::new(e),
            })?;
        }
    }
    Ok(())
}

/// Rows at the start of the pass the LM head does not read (a drafter block's first row): the
/// final norm skips them too, so `h` row 0 is the LM head's first row.
fn head_skip(plan: &Plan) -> usize {
    plan.ops
        .iter()
        .find_map(|o| match o.kind {
            OpKind::LmHead(p) => Some(p.skip_rows),
            _ => None,
        })
        .unwrap_or(0)
}

fn layer_suffix(op: &Op) -> String {
    op.layer.map_or(String::new(), |l| format!(" of layer {l}"))
}

fn op_layer(op: &Op) -> Result<usize, RuntimeError> {
    op.layer
        .ok_or_else(|| RuntimeError::Invalid(format!("`{}` without a layer", op.kind.name())))
}

/// The RoPE + KV-write arguments of a `qkv_rope_kv` op (`window` checked by the kernels'
/// geometry check; sinks and score scale are attention's and unused by these kernels).
fn rope_args(
    p: &QkvRopeParams,
    window: Option<usize>,
    rope: &Rope,
    layer: &DeviceLayer,
    kv: &LayerKv,
) -> AttnArgs {
    AttnArgs {
        n_heads: p.geom.n_heads,
        n_kv_heads: p.geom.n_kv_heads,
        head_dim: p.geom.head_dim,
        v_head_dim: p.geom.v_head_dim,
        rotary_dim: rope.rotary_dim,
        inv_freq: rope.inv_freq,
        attention_factor: rope.attention_factor,
        q_norm: layer.q_norm,
        k_norm: layer.k_norm,
        eps: p.eps,
        value_scale: p.value_scale,
        k_cache: kv.k,
        v_cache: kv.v,
        capacity: kv.capacity,
        paging: kv.paging,
        window,
        sinks: None,
        scale: 0.0,
    }
}

/// The attention arguments of an `attention` / `draft_attention` op (the RoPE fields are the
/// projection's and unused by the attention kernels).
pub(crate) fn attention_args(
    geom: AttnGeom,
    window: Option<usize>,
    sinks: Option<DPtr<f32>>,
    scale: f32,
    kv: &LayerKv,
) -> AttnArgs {
    AttnArgs {
        n_heads: geom.n_heads,
        n_kv_heads: geom.n_kv_heads,
        head_dim: geom.head_dim,
        v_head_dim: geom.v_head_dim,
        rotary_dim: 0,
        inv_freq: DPtr::null(),
        attention_factor: 1.0,
        q_norm: None,
        k_norm: None,
        eps: 0.0,
        value_scale: 1.0,
        k_cache: kv.k,
        v_cache: kv.v,
        capacity: kv.capacity,
        paging: kv.paging,
        window,
        sinks,
        scale,
    }
}

/// The attention arguments of layer `l` of `plan` (its `attention` or `draft_attention` op)
/// over `kv`, without sinks (sizing scratch and row tables: geometry and window only).
pub(crate) fn layer_attention_args(
    plan: &Plan,
    l: usize,
    kv: &LayerKv,
) -> Result<AttnArgs, RuntimeError> {
    plan.ops
        .iter()
        .find_map(|o| match o.kind {
            OpKind::Attention(p) if o.layer == Some(l) => {
                Some(attention_args(p.geom, p.window, None, p.scale, kv))
            }
            OpKind::DraftAttention(p) if o.layer == Some(l) => {
                Some(attention_args(p.geom, p.window, None, p.scale, kv))
            }
            _ => None,
        })
        .ok_or_else(|| RuntimeError::Invalid(format!("the plan has no attention of layer {l}")))
}

/// The rows of a drafter block whose attention must be recomputed alone: with a non-causal
/// window `W < block`, query `i` may see keys only up to position `start + i + W − 1`, short of
/// the block's end, for `i < block − W` (the attention kernel's non-causal range ends at the
/// block's end).
pub(crate) fn short_window_rows(attn: DraftAttn, block: usize) -> std::ops::Range<usize> {
    match (attn.causal, attn.window) {
        (false, Some(w)) if w < block => 0..block - w,
        _ => 0..0,
    }
}

/// The kernels, weights and RoPE tables a pass is lowered onto.
pub(crate) struct Lowering<'a> {
    pub(crate) ops: &'a Ops,
    pub(crate) moe: &'a MoeKernels,
    pub(crate) stream: &'a CudaStream,
    pub(crate) weights: &'a DeviceWeights,
    /// The device tables of the plan's [`Plan::ropes`].
    pub(crate) ropes: &'a [Rope],
    /// A tensor-parallel rank's collective (its plans are `exec::tp::rank_plan` views); None on
    /// one device.
    pub(crate) rank: Option<&'a super::tp::RankComm>,
}

impl Lowering<'_> {
    /// Enqueues `plan` on the stream: every op's launches in order, the captures after their
    /// taps. `mark(label)` is called after each launch. An error names the op and its layer.
    pub(crate) fn encode(
        &self,
        plan: &Plan,
        bind: &Bindings,
        captures: &Captures,
        mark: &mut Mark,
    ) -> Result<(), RuntimeError> {
        check_plan_for(plan, self.rank.is_some())?;
        let skip = head_skip(plan);
        let mut taps = 0;
        for (i, op) in plan.ops.iter().enumerate() {
            self.op(plan, i, op, skip, bind, captures, &mut taps, mark)
                .map_err(|e| RuntimeError::Op {
                    pass: format!(
                        "pass of {} rows ({:?}), op #{i} `{}`{}",
                        plan.shape.rows,
                        plan.shape.kind,
                        op.kind.name(),
                        layer_suffix(op)
                    ),
                    source: Box::new(e),
                })?;
        }
        Ok(())
    }

    /// Copies the captured taps that follow op `i` and whose buffer passes `only` (advancing
    /// `next` past them when they are the next ones in order).
    #[allow(clippy::too_many_arguments)]
    fn taps(
        &self,
        plan: &Plan,
        i: usize,
        bind: &Bindings,
        captures: &Captures,
        next: &mut usize,
        only: impl Fn(Buf) -> bool,
    ) -> Result<(), RuntimeError> {
        let t = plan.shape.rows;
        while let Some(tap) = plan.taps.get(*next) {
            if tap.after != i || !only(tap.buf) {
                break;
            }
            *next += 1;
            let width = plan_hidden(plan);
            let src = bind.f32(tap.buf)?;
            for (slot, _) in captures
                .indices
                .iter()
                .enumerate()
                .filter(|(_, &h)| h == tap.hidden)
            {
                let at = slot * captures.stride;
                dtod(
                    self.stream,
                    src.slice(0..t * width),
                    captures.dst.slice(at..at + t * width),
                )?;
            }
        }
        Ok(())
    }

    #[allow(clippy::too_many_arguments)]
    fn op(
        &self,
        plan: &Plan,
        i: usize,
        op: &Op,
        skip: usize,
        bind: &Bindings,
        captures: &Captures,
        taps: &mut usize,
        mark: &mut Mark,
    ) -> Result<(), RuntimeError> {
        let (ops, s, w) = (self.ops, self.stream, self.weights);
        let t = plan.shape.rows;
        let sc = &bind.scratch;
        let (x, h) = (bind.x, bind.h);
        let weight = |n: usize| {
            op.weights.get(n).copied().ok_or_else(|| {
                RuntimeError::Invalid(format!("`{}` names no weight #{n}", op.kind.name()))
            })
        };
        match op.kind {
            OpKind::Embed(p) => {
                let (table, _) = w.linear(weight(0)?)?;
                match bind.tokens {
                    TokenBinding::Ids(ids) => {
                        if p.scale != 1.0 {
                            return Err(RuntimeError::Unsupported(format!(
                                "embedding scale {} of a token-id pass",
                                p.scale
                            )));
                        }
                        ops.embed(s, table, ids.slice(0..t), t, x)?;
                        mark("embed")?;
                    }
                    TokenBinding::DraftBlock { x_last, mask_rows } => {
                        let hd = p.hidden;
                        match (w.embed_scale, p.scale != 1.0) {
                            (None, false) => ops.embed(s, table, x_last, 1, x)?,
                            (Some(scale), true) => {
                                // Gather into scratch, then x[0] = row · scale: `linear` with
                                // the row as a `[H, 1]` weight and the scale as the single
                                // input value (one rounded f32 product, the CPU's `v *= scale`).
                                let row = h.slice(0..hd);
                                ops.embed(s, table, x_last, 1, row)?;
                                let m = DeviceMatrix {
                                    data: DenseData::F32(row),
                                    rows: hd,
                                    cols: 1,
                                };
                                ops.linear(s, &m, None, scale, 1, x.slice(0..hd), false)?;
                            }
                            _ => {
                                return Err(RuntimeError::Invalid(format!(
                                    "embedding scale {}: the device scale is {}",
                                    p.scale,
                                    if w.embed_scale.is_some() {
                                        "set"
                                    } else {
                                        "absent"
                                    }
                                )))
                            }
                        }
                        mark("embed")?;
                        // The mask rows were scaled at upload.
                        dtod(s, mask_rows.slice(0..(t - 1) * hd), x.slice(hd..t * hd))?;
                        mark("embed:mask")?;
                    }
                    TokenBinding::None => {
                        return Err(RuntimeError::Invalid("no token ids bound".into()))
                    }
                }
            }
            OpKind::RmsNorm(p) => {
                ops.rms_norm(s, x, w.vector(p.weight)?, t, p.dim, p.eps, h)?;
                mark("rms_norm")?;
            }
            OpKind::QkvRope(p) => {
                let l = op_layer(op)?;
                let id = weight(0)?;
                let layer = w.layer(id)?;
                let (qkv, qkv_bias) = w.linear(id)?;
                let rope = self.ropes.get(p.rope).ok_or_else(|| {
                    RuntimeError::Invalid(format!("RoPE table #{} is not on the device", p.rope))
                })?;
                let window = plan.layers.get(l).and_then(|tb| tb.window);
                let staged = sc.qkv.slice(0..t * qkv.rows);
                match &bind.kv {
                    KvBinding::Sequence {
                        caches, positions, ..
                    } => {
                        let kv = caches.get(l).ok_or_else(|| no_cache(l))?;
                        let args = rope_args(&p, window, rope, layer, kv);
                        let step = positions.slice(0..1);
                        if layer.qkv_rope_fused {
                            ops.linear_qkv_rope(s, qkv, qkv_bias, h, t, &args, step, bind.q)?;
                            mark("qkv_rope_kv")?;
                        } else {
                            ops.linear(s, qkv, qkv_bias, h, t, staged, false)?;
                            mark("qkv_rope_kv")?;
                            ops.rope_kv_write(s, &args, staged, t, step, bind.q)?;
                            mark("qkv_rope_kv:rope_kv")?;
                        }
                    }
                    KvBinding::Rows(r) => {
                        let args = rope_args(&p, window, rope, layer, &LayerKv::NONE);
                        let rows = r.rows(l, t);
                        if layer.qkv_rope_fused {
                            r.ops
                                .linear_qkv_rope(s, qkv, qkv_bias, h, t, &args, rows, bind.q)?;
                            mark("qkv_rope_kv")?;
                        } else {
                            ops.linear(s, qkv, qkv_bias, h, t, staged, false)?;
                            mark("qkv_rope_kv")?;
                            r.ops.rope_kv_write(s, &args, staged, t, rows, bind.q)?;
                            mark("qkv_rope_kv:rope_kv")?;
                        }
                    }
                }
            }
            OpKind::Attention(p) => {
                let l = op_layer(op)?;
                let sinks = if p.sinks {
                    w.optional(WeightId::layer(Tensor::Sinks, l))?
                } else {
                    None
                };
                match &bind.kv {
                    KvBinding::Sequence {
                        caches,
                        positions,
                        keys,
                    } => {
                        let kv = caches.get(l).ok_or_else(|| no_cache(l))?;
                        let args = attention_args(p.geom, p.window, sinks, p.scale, kv);
                        let keys = *keys.get(l).ok_or_else(|| no_cache(l))?;
                        let step = positions.slice(0..1);
                        ops.attention(s, &args, bind.q, t, step, true, keys, sc.attn, bind.attn)?;
                    }
                    KvBinding::Rows(r) => {
                        let args = attention_args(p.geom, p.window, sinks, p.scale, &LayerKv::NONE);
                        let splits = *r.splits.get(l).ok_or_else(|| no_cache(l))?;
                        r.ops.attention(
                            s,
                            &args,
                            bind.q,
                            t,
                            r.rows(l, t),
                            splits,
                            r.scratch,
                            bind.attn,
                        )?;
                    }
                }
                mark("attention")?;
            }
            OpKind::DraftAttention(p) => {
                let l = op_layer(op)?;
                let KvBinding::Sequence {
                    caches,
                    positions,
                    keys,
                } = &bind.kv
                else {
                    return Err(RuntimeError::Unsupported(
                        "a drafter block over a batched row table".into(),
                    ));
                };
                let sinks = if p.sinks {
                    w.optional(WeightId::layer(Tensor::Sinks, l))?
                } else {
                    None
                };
                let kv = caches.get(l).ok_or_else(|| no_cache(l))?;
                let keys = *keys.get(l).ok_or_else(|| no_cache(l))?;
                let args = attention_args(p.geom, p.window, sinks, p.scale, kv);
                let step = |i: usize| positions.slice(i..i + 1);
                ops.attention(
                    s,
                    &args,
                    bind.q,
                    t,
                    step(0),
                    p.causal,
                    keys,
                    sc.attn,
                    bind.attn,
                )?;
                mark("draft_attention")?;
                let shape = DraftAttn {
                    window: p.window,
                    causal: p.causal,
                };
                if let Some(win) = p.window {
                    let row = p.geom.q_width();
                    let out_row = p.geom.out_width();
                    for i in short_window_rows(shape, t) {
                        // Query i alone with its window's keys: a call of W queries from
                        // position start + i whose non-causal range ends at start + i + W − 1;
                        // its row 0.
                        ops.attention(
                            s,
                            &args,
                            bind.q.slice(i * row..(i + win) * row),
                            win,
                            step(i),
                            false,
                            keys,
                            sc.attn,
                            sc.attn_row,
                        )?;
                        dtod(
                            s,
                            sc.attn_row.slice(0..out_row),
                            bind.attn.slice(i * out_row..(i + 1) * out_row),
                        )?;
                        mark("draft_attention:short_window_row")?;
                    }
                }
            }
            OpKind::OProj(p) => {
                let (o, o_bias) = w.linear(weight(0)?)?;
                if p.residual {
                    ops.linear(s, o, o_bias, bind.attn, t, x, true)?;
                } else {
                    let part = partial(sc, t, p.out_dim)?;
                    ops.linear(s, o, o_bias, bind.attn, t, part, false)?;
                }
                mark("o_proj")?;
            }
            OpKind::NormRouterTopK(p) => {
                let l = op_layer(op)?;
                let norm_w = w.vector(p.norm.weight)?;
                let (router, router_bias) = w.linear(WeightId::layer(Tensor::Router, l))?;
                let correction = if p.correction_bias {
                    w.optional(WeightId::layer(Tensor::CorrectionBias, l))?
                } else {
                    None
                };
                let route = RouteArgs::of(p.kind, correction);
                let k = p.top_k;
                let fused = ops.router_route(
                    s,
                    router,
                    router_bias,
                    x,
                    norm_w,
                    p.norm.eps,
                    t,
                    &route,
                    k,
                    h,
                    sc.router_logits,
                    sc.route_counter,
                    bind.ids,
                    bind.weights,
                )?;
                if fused {
                    mark("norm_router_topk")?;
                } else {
                    ops.rms_norm(s, x, norm_w, t, p.norm.dim, p.norm.eps, h)?;
                    mark("norm_router_topk")?;
                    ops.linear(s, router, router_bias, h, t, sc.router_logits, false)?;
                    mark("norm_router_topk:router")?;
                    ops.route(
                        s,
                        &route,
                        sc.router_logits,
                        t,
                        p.n_experts,
                        k,
                        bind.ids,
                        bind.weights,
                    )?;
                    mark("norm_router_topk:route")?;
                }
            }
            OpKind::ExpertsGateUp(p) => {
                let experts = w.experts(weight(0)?)?;
                if p.experts.is_part_of(p.n_experts) {
                    // An expert-parallel rank: the routing becomes its local ids, which its
                    // experts_down reads too (see `exec::tp`).
                    if experts.n_experts != p.experts.len() {
                        return Err(RuntimeError::Invalid(format!(
                            "experts {}..{} of the plan, {} on the device",
                            p.experts.lo, p.experts.hi, experts.n_experts
                        )));
                    }
                    self.moe
                        .localize(s, bind.ids, t * p.top_k, p.experts.lo, p.experts.hi)?;
                    mark("experts_gate_up")?;
                }
                self.moe.gate_up(
                    s,
                    experts,
                    GluArgs::from(p.glu),
                    h,
                    t,
                    p.top_k,
                    bind.ids,
                    sc.moe,
                    bind.act,
                )?;
                mark(if p.experts.is_part_of(p.n_experts) {
                    "experts_gate_up:experts"
                } else {
                    "experts_gate_up"
                })?;
            }
            OpKind::ExpertsDown(p) => {
                let experts = w.experts(weight(0)?)?;
                let k = p.top_k;
                self.moe.down(
                    s,
                    experts,
                    bind.act,
                    t,
                    k,
                    bind.ids,
                    bind.weights,
                    sc.moe,
                    sc.y,
                )?;
                mark("experts_down")?;
                if p.experts.is_part_of(p.n_experts) {
                    // An expert-parallel rank's partial: its own experts (local ids ≥ 0, set by
                    // its experts_gate_up) summed in ascending id; the all-reduce combines.
                    if p.residual {
                        return Err(RuntimeError::Unsupported(
                            "an expert-parallel rank's experts_down adds into the residual \
                             (its share goes to an all-reduce)"
                                .into(),
                        ));
                    }
                    let part = partial(sc, t, p.hidden)?;
                    self.moe
                        .combine_local(s, part, sc.y, bind.ids, t, k, p.hidden)?;
                } else if p.residual {
                    let norm = match p.next_norm {
                        Some(n) => Some((w.vector(n.weight)?, n.eps, h)),
                        None => None,
                    };
                    ops.combine(s, x, sc.y, bind.ids, t, k, p.hidden, norm)?;
                } else {
                    // A rank's partial sum: the combine into zeros (the all-reduce adds the
                    // residual and applies the next norm).
                    let part = partial(sc, t, p.hidden)?;
                    crate::arena::zero(s, part)?;
                    ops.combine(s, part, sc.y, bind.ids, t, k, p.hidden, None)?;
                }
                mark("experts_down:combine_norm")?;
            }
            OpKind::MlpGateUp(p) => {
                let (gate_up, bias) = w.linear(weight(0)?)?;
                let i = p.intermediate;
                let (gu, act) = dense_bufs(sc, t, i);
                ops.linear(s, gate_up, bias, h, t, gu, false)?;
                mark("mlp_gate_up")?;
                ops.glu(s, GluArgs::from(p.glu), gu, t, i, act)?;
                mark("mlp_gate_up:glu")?;
            }
            OpKind::MlpDown(p) => {
                let (down, bias) = w.linear(weight(0)?)?;
                let (_, act) = dense_bufs(sc, t, p.intermediate);
                if p.residual {
                    ops.linear(s, down, bias, act, t, x, true)?;
                } else {
                    let part = partial(sc, t, p.hidden)?;
                    ops.linear(s, down, bias, act, t, part, false)?;
                }
                mark("mlp_down")?;
                // The residual stream's taps come before the next norm (which leaves x as it is).
                self.taps(plan, i, bind, captures, taps, |b| b == Buf::X)?;
                if let Some(n) = p.next_norm {
                    let norm_w = w.vector(n.weight)?;
                    // The final norm of a pass whose LM head skips rows normalizes only the
                    // rows it reads, into h's first rows.
                    let first = if n.weight.tensor == Tensor::FinalNorm {
                        skip
                    } else {
                        0
                    };
                    let xs = if first == 0 {
                        x
                    } else {
                        x.slice(first * n.dim..t * n.dim)
                    };
                    ops.rms_norm(s, xs, norm_w, t - first, n.dim, n.eps, h)?;
                    mark("mlp_down:norm")?;
                }
            }
            OpKind::LmHead(p) => {
                let (head, _) = w.linear(weight(0)?)?;
                let (rows, first) = head_rows(plan, p.rows, skip);
                let input = if first == 0 {
                    h
                } else {
                    h.slice(first * p.hidden..h.len())
                };
                let out = bind.logits.slice(0..rows * p.vocab);
                ops.linear(s, head, None, input, rows, out, false)?;
                mark("lm_head")?;
            }
            OpKind::Sample(p) => {
                let (rows, _) = head_rows(plan, plan.shape.logits, skip);
                ops.argmax(s, bind.logits, rows, p.vocab, sc.argmax, bind.sampled)?;
                mark("sample")?;
            }
            OpKind::DraftContext(p) => {
                let fc = &w.fc;
                if fc.len() != bind.features.len() {
                    return Err(RuntimeError::Invalid(format!(
                        "{} feature blocks bound for {} fc blocks",
                        bind.features.len(),
                        fc.len()
                    )));
                }
                let ctx = sc.ctx.slice(0..t * p.hidden);
                for (k, (m, rows)) in fc.iter().zip(bind.features).enumerate() {
                    ops.linear(s, m, None, *rows, t, ctx, k > 0)?;
                    mark(if k == 0 {
                        "draft_context"
                    } else {
                        "draft_context:fc"
                    })?;
                }
                let norm_w = w.vector(WeightId::model(Tensor::HiddenNorm))?;
                ops.rms_norm(s, ctx, norm_w, t, p.hidden, p.eps, h)?;
                mark("draft_context:norm")?;
            }
            OpKind::AllReduce(p) => {
                let Some(rank) = self.rank else {
                    return Err(RuntimeError::Unsupported(
                        "all-reduce needs several GPUs".into(),
                    ));
                };
                let n = t * p.width;
                let norm = match p.next_norm {
                    Some(nn) => Some((w.vector(nn.weight)?, nn.eps, h.slice(0..n))),
                    None => None,
                };
                let part = partial(sc, t, p.width)?;
                let fused = rank.all_reduce(s, part, x.slice(0..n), t, norm)?;
                mark("all_reduce")?;
                if !fused {
                    // NCCL summed the partials in place: x += Σ and the next norm, as the
                    // one-term combine (the routing ids it reads are not used with one term).
                    ops.combine(s, x.slice(0..n), part, bind.ids, t, 1, p.width, norm)?;
                    mark("all_reduce:residual_norm")?;
                }
            }
        }
        self.taps(plan, i, bind, captures, taps, |_| true)
    }
}

/// The hidden size of a plan's residual stream.
fn plan_hidden(plan: &Plan) -> usize {
    plan.ops
        .iter()
        .find_map(|o| match o.kind {
            OpKind::Embed(p) => Some(p.hidden),
            OpKind::DraftContext(p) => Some(p.hidden),
            _ => None,
        })
        .unwrap_or(0)
}

/// The rank's partial-sum buffer `[t, width]`.
fn partial(sc: &Scratch, t: usize, width: usize) -> Result<DPtr<f32>, RuntimeError> {
    if sc.partial.len() < t * width {
        return Err(RuntimeError::Invalid(format!(
            "a partial sum of {t}x{width} needs a tensor-parallel rank's partial buffer \
             ({} floats bound)",
            sc.partial.len()
        )));
    }
    Ok(sc.partial.slice(0..t * width))
}

fn no_cache(l: usize) -> RuntimeError {
    RuntimeError::Invalid(format!("no KV cache bound for layer {l}"))
}

/// A dense MLP's gate/up projection `[t, 2i]` and activations `[t, i]` (see
/// [`Scratch::dense_act`]).
fn dense_bufs(sc: &Scratch, t: usize, i: usize) -> (DPtr<f32>, DPtr<f32>) {
    let gu = sc.gu.slice(0..t * 2 * i);
    let act = match sc.dense_act {
        Some(a) => a,
        None => sc.gu.slice(t * 2 * i..t * 3 * i),
    };
    (gu, act)
}

/// The LM head's rows and the first of them in `h` (after the final norm skipped `skip` rows).
fn head_rows(plan: &Plan, logits: Logits, skip: usize) -> (usize, usize) {
    let t = plan.shape.rows;
    match logits {
        Logits::None => (0, 0),
        Logits::Last => (1, t - 1 - skip.min(t - 1)),
        Logits::All => (t - skip, 0),
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use std::path::{Path, PathBuf};

    use model::config::{ModelConfig, RouterSpec};
    use model::cpu::toy::{self, ToyExperts};
    use model::drafter::DrafterConfig;
    use model::plan::draft::DraftPass;
    use model::plan::tp::{shard_plan, TpLayout};
    use model::plan::{AllReduceParams, PassKind, PassShape};

    use super::*;
    use crate::exec::{pass_shape, Logits, DEVICE_STORAGE};
    use crate::moe::DeviceExperts;

    fn fixture(rel: &str) -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../../fixtures")
            .join(rel)
    }

    /// Every target config the GPU tests and benchmarks run: the toy models of each
    /// architecture, the fixture checkpoints' configs, the benchmark shapes.
    fn targets() -> Vec<(String, ModelConfig)> {
        let mut v = vec![
            ("toy gpt-oss".into(), toy::gpt_oss(1, ToyExperts::Mxfp4).0),
            (
                "toy qwen3-moe".into(),
                toy::qwen3_moe(2, ToyExperts::Dense).0,
            ),
            (
                "toy mimo".into(),
                toy::mimo_v2_flash(3, ToyExperts::Dense).0,
            ),
            (
                "synthetic gpt-oss 100m".into(),
                toy::synthetic_gpt_oss_100m(),
            ),
        ];
        for rel in [
            "gpt-oss/bf16",
            "gpt-oss/mxfp4",
            "qwen3-moe/native",
            "mimo-v2-flash/native",
        ] {
            v.push((rel.into(), ModelConfig::from_dir(&fixture(rel)).unwrap()));
        }
        let text = std::fs::read_to_string(fixture("configs/gpt-oss-20b.json")).unwrap();
        v.push((
            "gpt-oss-20b".into(),
            ModelConfig::from_json_str(&text).unwrap(),
        ));
        v
    }

    fn matrix(rows: usize, cols: usize) -> DeviceMatrix {
        DeviceMatrix {
            data: DenseData::F32(DPtr::null()),
            rows,
            cols,
        }
    }

    fn vector(present: bool) -> Option<DPtr<f32>> {
        present.then(DPtr::null)
    }

    /// Device weights of `cfg`'s shape as the upload lays them out (null pointers: the host
    /// side of the lowering never dereferences them).
    pub(crate) fn fake_target(cfg: &ModelConfig) -> DeviceWeights {
        let h = cfg.hidden_size;
        let layers = cfg
            .layers
            .iter()
            .map(|s| {
                let rows = s.n_heads * s.head_dim + s.n_kv_heads * (s.head_dim + s.v_head_dim);
                let mlp = if s.moe {
                    let (e, i) = (cfg.n_experts, cfg.moe_intermediate_size);
                    let stack = |rows: usize, cols: usize| DeviceExperts::Dense {
                        w: matrix(e * rows, cols),
                        experts: e,
                    };
                    DeviceMlp::Moe {
                        router: matrix(e, h),
                        router_bias: vector(matches!(cfg.router, RouterSpec::GptOss)),
                        correction_bias: vector(matches!(cfg.router, RouterSpec::Sigmoid { .. })),
                        experts: DeviceMoe {
                            gate_up: stack(2 * i, h),
                            gate_up_bias: None,
                            down: stack(h, i),
                            down_bias: None,
                            n_experts: e,
                            inter: i,
                            hidden: h,
                        },
                    }
                } else {
                    let i = cfg.dense_intermediate_size.unwrap();
                    DeviceMlp::Dense {
                        gate_up: matrix(2 * i, h),
                        gate_up_bias: None,
                        down: matrix(h, i),
                        down_bias: None,
                    }
                };
                DeviceLayer {
                    input_norm: DPtr::null(),
                    post_attn_norm: DPtr::null(),
                    qkv: matrix(rows, h),
                    qkv_bias: vector(s.attn_bias),
                    qkv_rope_fused: false,
                    o: matrix(h, s.n_heads * s.v_head_dim),
                    o_bias: vector(s.attn_bias),
                    q_norm: vector(s.qk_norm),
                    k_norm: vector(s.qk_norm),
                    sinks: vector(s.sinks),
                    mlp,
                }
            })
            .collect();
        DeviceWeights {
            embed: matrix(cfg.vocab_size, h),
            lm_head: matrix(cfg.vocab_size, h),
            final_norm: DPtr::null(),
            layers,
            fc: Vec::new(),
            hidden_norm: None,
            embed_scale: None,
        }
    }

    fn fake_drafter(d: &DrafterConfig, target: &ModelConfig) -> DeviceWeights {
        let (h, nh, nkv, hd, i) = (
            d.hidden_size,
            d.n_heads,
            d.n_kv_heads,
            d.head_dim,
            d.intermediate_size,
        );
        let layers = d
            .layers
            .iter()
            .map(|_| DeviceLayer {
                input_norm: DPtr::null(),
                post_attn_norm: DPtr::null(),
                qkv: matrix((nh + 2 * nkv) * hd, h),
                qkv_bias: vector(d.attention_bias),
                qkv_rope_fused: false,
                o: matrix(h, nh * hd),
                o_bias: vector(d.attention_bias),
                q_norm: vector(true),
                k_norm: vector(true),
                sinks: vector(d.sinks),
                mlp: DeviceMlp::Dense {
                    gate_up: matrix(2 * i, h),
                    gate_up_bias: None,
                    down: matrix(h, i),
                    down_bias: None,
                },
            })
            .collect();
        DeviceWeights {
            embed: matrix(target.vocab_size, h),
            lm_head: matrix(target.vocab_size, h),
            final_norm: DPtr::null(),
            layers,
            fc: vec![matrix(h, target.hidden_size); d.num_features()],
            hidden_norm: Some(DPtr::null()),
            embed_scale: vector(d.input_embedding_scale != 1.0),
        }
    }

    /// Every pass a session or a batch runs (prefill chunks, decode, verify, batched decode of
    /// 1..=16 rows) of every target config lowers: ops supported, buffers bound, weights found.
    #[test]
    fn every_target_pass_lowers() {
        for (name, cfg) in targets() {
            let weights = fake_target(&cfg);
            let mut kinds = Vec::new();
            for t in 1..=MAX_TOKENS {
                for (logits, batched) in [
                    (Logits::None, false),
                    (Logits::All, false),
                    (Logits::All, true),
                ] {
                    let plan = Plan::new(&cfg, DEVICE_STORAGE, pass_shape(t, logits, batched))
                        .unwrap_or_else(|e| panic!("{name}: {e}"));
                    check_plan(&plan).unwrap_or_else(|e| panic!("{name} {t} rows: {e}"));
                    check_weights(&plan, &weights).unwrap_or_else(|e| panic!("{name}: {e}"));
                    // Every layer's attention can be sized from the plan.
                    for l in 0..cfg.layers.len() {
                        let a = layer_attention_args(&plan, l, &LayerKv::NONE).unwrap();
                        assert_eq!(a.n_heads, cfg.layers[l].n_heads, "{name} layer {l}");
                        assert_eq!(a.window, plan.layers[l].window, "{name} layer {l}");
                    }
                    kinds.push(plan.shape.kind);
                    let head = plan
                        .ops
                        .iter()
                        .filter(|o| matches!(o.kind, OpKind::LmHead(_) | OpKind::Sample(_)))
                        .count();
                    assert_eq!(head, if logits == Logits::All { 2 } else { 0 }, "{name}");
                }
            }
            for k in [
                PassKind::Prefill,
                PassKind::Decode,
                PassKind::Verify,
                PassKind::Batched,
            ] {
                assert!(kinds.contains(&k), "{name}: no {k:?} pass");
            }
        }
    }

    /// The fixture drafters' context-append (1..=16 tokens) and block-draft (2..=16 rows)
    /// passes lower onto a drafter's weights.
    #[test]
    fn every_drafter_pass_lowers() {
        for (drafter, target) in [
            ("drafters/gpt-oss-dflash", "gpt-oss/bf16"),
            ("drafters/qwen3-moe-dflash", "qwen3-moe/native"),
            ("drafters/mimo-dflash", "mimo-v2-flash/native"),
        ] {
            let text = std::fs::read_to_string(fixture(drafter).join("config.json")).unwrap();
            let d = DrafterConfig::from_json_str(&text).unwrap();
            let tc = ModelConfig::from_dir(&fixture(target)).unwrap();
            let spec = d.draft_spec(&tc);
            let weights = fake_drafter(&d, &tc);
            let passes = (1..=MAX_TOKENS)
                .map(|n| DraftPass::Context { n })
                .chain((2..=MAX_TOKENS).map(|b| DraftPass::Block { b }));
            for pass in passes {
                let plan = Plan::draft(&spec, DEVICE_STORAGE, pass, 0).unwrap();
                check_plan(&plan).unwrap_or_else(|e| panic!("{drafter} {pass:?}: {e}"));
                check_weights(&plan, &weights).unwrap_or_else(|e| panic!("{drafter}: {e}"));
                if let DraftPass::Block { b } = pass {
                    // The LM head reads rows 1..b; the final norm skips row 0 with it.
                    assert_eq!(head_skip(&plan), 1);
                    assert_eq!(head_rows(&plan, plan.shape.logits, 1), (b - 1, 0));
                }
            }
        }
    }

    #[test]
    fn unsupported_plans_are_errors_naming_the_op() {
        let cfg = toy::gpt_oss(1, ToyExperts::Mxfp4).0;
        let plan = Plan::new(&cfg, DEVICE_STORAGE, PassShape::decode(0)).unwrap();
        // Tensor-parallel plans need one device per rank.
        let layout = TpLayout::new(&cfg, 2, true).unwrap();
        let sharded = shard_plan(&plan, &cfg, &layout).unwrap();
        let e = check_plan(&sharded).unwrap_err().to_string();
        assert!(e.contains("2 tensor-parallel ranks"), "{e}");
        let mut one = sharded.clone();
        one.ranks = 1;
        let e = check_plan(&one).unwrap_err().to_string();
        assert!(e.contains("tensor-parallel rank"), "{e}");
        // An all-reduce on one GPU.
        let mut ar = plan.clone();
        ar.ops.insert(
            3,
            Op {
                kind: OpKind::AllReduce(AllReduceParams {
                    ranks: 2,
                    width: cfg.hidden_size,
                    next_norm: None,
                }),
                layer: Some(0),
                placement: Placement::Replicated,
                inputs: vec![Buf::X],
                outputs: vec![Buf::X],
                weights: Vec::new(),
                weight_bytes: 0.0,
                kv_bytes: 0.0,
                flops: 0.0,
            },
        );
        let e = check_plan(&ar).unwrap_err().to_string();
        assert!(e.contains("op #3 `all_reduce` of layer 0"), "{e}");
        // More rows than a pass holds.
        let big = Plan::new(&cfg, DEVICE_STORAGE, PassShape::verify(MAX_TOKENS + 1, 0)).unwrap();
        assert!(check_plan(&big).is_err());
        // A weight the device does not hold is named with its op.
        let mut weights = fake_target(&cfg);
        weights.layers.pop();
        let e = check_weights(&plan, &weights).unwrap_err().to_string();
        assert!(
            e.contains(&format!("layers.{}.", cfg.layers.len() - 1)),
            "{e}"
        );
    }

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
}
