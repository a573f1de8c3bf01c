//! The op-by-op GPU executor: a model's weights uploaded once ([`GpuModel`]) and sequences
//! ([`GpuSession`]) whose passes run one kernel per op, captured as a CUDA graph per pass size
//! and replayed.
//!
//! A pass over `T ≤ MAX_TOKENS` tokens (decode: T = 1; verify: 2..=16; prefill: chunks of 16)
//! is the model's step plan ([`model::plan::Plan`], built once per pass shape and cached in the
//! [`GpuModel`]) lowered to launches by `lower` — the same plan the CPU executor interprets:
//!
//! ```text
//! embed → rms_norm(input_norm₀)
//! per layer: qkv_rope_kv (qkv linear (+bias) + RoPE + KV write, fused when the weight allows)
//!            → attention → o_proj (+bias, += residual)
//!            → MoE: norm_router_topk (post_attn_norm + router (+bias) + route, fused when
//!                   aligned) → experts_gate_up (+GLU) → experts_down (·weight, combine += residual,
//!                   next norm)
//!              dense: rms_norm(post_attn_norm) → mlp_gate_up (+GLU) → mlp_down (+= residual,
//!                     next norm)
//! lm_head → sample (argmax)
//! ```
//!
//! Everything that changes between steps (token ids, the start position) lives in a small device
//! buffer written before each replay, so one captured graph per `(T, logits)` serves every step.
//! Hidden states asked for by a speculative drafter are copied out inside the pass at the plan's
//! taps (the capture set is part of the session; changing it drops the captured graphs).
//!
//! [`GpuBatch`] runs the batched plan of the same model over rows of several sessions: one token
//! per session (batched decode), or each session's block of tokens — a speculative request's
//! verify block — at its own length, causal inside the block (see its module).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use cudarc::driver::sys::{CUevent_flags, CUgraphInstantiate_flags, CUstreamCaptureMode};
use cudarc::driver::{CudaEvent, CudaGraph, CudaStream};

use model::config::{ModelConfig, RouterSpec};
use model::plan::{OpKind, PassShape, Plan, QkvRopeParams, WeightStorage};
use model::weights::{Linear, Mlp, Weights};
use model::{RopeTable, LAST_LAYER_PRE_NORM};

use crate::arena::{dtoh, htod, Arena, DPtr};
use crate::moe::{DeviceMoe, MoeKernels};
use crate::ops::{Ops, SampleArgs, ARGMAX_SCRATCH, MAX_TOKENS};
use crate::tensor::DeviceMatrix;
use crate::{Device, RuntimeError};

mod batch;
mod executor;
pub(crate) mod lower;
pub mod paged;
pub mod tp;
pub use batch::{row_passes, GpuBatch, RowSlot, SharedBatch};
pub use paged::{GpuKvPool, KvBlock, SharedKvBlock};

use lower::{
    Bindings, Captures, DeviceLayer, DeviceMlp, DeviceWeights, KvBinding, LayerKv, Lowering,
    RowPass, Scratch, TokenBinding,
};

/// Default truncation depth a [`GpuSession`] keeps exact (as the CPU executor's).
pub const DEFAULT_MAX_ROLLBACK: usize = model::DEFAULT_MAX_ROLLBACK;
/// Bump-chunk size of a session's arena: a session reserves at most this much beyond its use
/// (its large buffers, such as full-attention KV caches, get chunks of their own).
pub(crate) const SESSION_CHUNK_BYTES: usize = 16 << 20;

/// One RoPE table on the device ([`model::RopeTable`] of one of [`Plan::ropes`]).
#[derive(Debug, Clone, Copy)]
pub(crate) struct Rope {
    pub(crate) inv_freq: DPtr<f32>,
    pub(crate) attention_factor: f32,
    pub(crate) rotary_dim: usize,
}

/// Most LM-head chunks the persistent engine's per-chunk argmax has room for.
pub(crate) const ARGMAX_CHUNKS: usize = 1024;

/// The key of a cached plan: rows, logits, batched.
type PassKey = (usize, Logits, bool);

struct Inner {
    device: Device,
    stream: Arc<CudaStream>,
    ops: Ops,
    moe: MoeKernels,
    config: Arc<ModelConfig>,
    weights: DeviceWeights,
    /// The device tables of the plans' `ropes` (the same for every pass shape of the model).
    ropes: Vec<Rope>,
    /// The decode plan: the layout the weights were uploaded for (RoPE tables, fused QKV) and
    /// the per-layer tables (`LayerTables`) sessions size their caches by.
    layout: Plan,
    /// The plan of every pass shape run so far, built once each (at graph capture).
    plans: Mutex<HashMap<PassKey, Arc<Plan>>>,
    weight_bytes: usize,
    /// A tensor-parallel rank's part (`tp`): its plans are rank views of the sharded plan and its
    /// all-reduces go through the rank's collective. None for a whole model on one device.
    rank: Option<tp::RankPart>,
    /// Owns every weight allocation (dropped last).
    _arena: Arena,
}

/// A model resident on one GPU. Cheap to clone (shared); create sessions with
/// [`GpuModel::session`].
#[derive(Clone)]
pub struct GpuModel {
    inner: Arc<Inner>,
}

/// How the device holds a model's weights (sets only the plans' byte counts): bf16 dense
/// weights, MXFP4 experts, an f32 KV cache.
pub(crate) const DEVICE_STORAGE: WeightStorage = WeightStorage {
    expert_bytes: 17.0 / 32.0,
    dense_bytes: 2.0,
    kv_bytes: 4.0,
    mxfp4_experts: true,
    label: "bf16 dense, MXFP4 experts, f32 KV (device)",
};

/// The dense weights of a synthetic model ([`GpuModel::synthetic_with`]); experts are MXFP4
/// either way.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SyntheticDtypes {
    /// bf16 dense weights (row-major, the `linear` kernels).
    Bf16,
    /// The dtypes of MiMo-V2.5-Pro's FP4 release: FP8 (e4m3, block scales) qkv and dense MLP
    /// (tiled, the projection kernels), bf16 o_proj, router and LM head.
    Released,
}

/// The plan shape of a session pass of `t` rows (`batched`: one row per sequence). A pass with
/// logits computes them for every row and their argmax on the device.
pub(crate) fn pass_shape(t: usize, logits: Logits, batched: bool) -> PassShape {
    match (batched, logits) {
        (true, _) => PassShape::batched(t, 0).with_sample(),
        (false, Logits::None) => PassShape::prefill(t, 0, false),
        (false, Logits::All) if t == 1 => PassShape::decode(0).with_sample(),
        (false, Logits::All) => PassShape::verify(t, 0).with_sample(),
    }
}

pub(crate) fn plan_error(e: model::plan::PlanError) -> RuntimeError {
    RuntimeError::Invalid(format!("step plan: {e}"))
}

/// The `qkv_rope_kv` parameters of layer `l` of `plan`.
pub(crate) fn qkv_params(plan: &Plan, l: usize) -> Result<QkvRopeParams, RuntimeError> {
    plan.ops
        .iter()
        .find_map(|o| match o.kind {
            OpKind::QkvRope(p) if o.layer == Some(l) => Some(p),
            _ => None,
        })
        .ok_or_else(|| RuntimeError::Invalid(format!("the plan has no qkv_rope_kv of layer {l}")))
}

pub(crate) fn upload_opt(
    arena: &mut Arena,
    v: Option<&Vec<f32>>,
    what: &str,
) -> Result<Option<DPtr<f32>>, RuntimeError> {
    v.map(|v| arena.upload(v, what)).transpose()
}

pub(crate) fn upload_linear(
    arena: &mut Arena,
    l: &Linear,
    what: &str,
) -> Result<(DeviceMatrix, Option<DPtr<f32>>), RuntimeError> {
    Ok((
        DeviceMatrix::from_mat(arena, &l.w, what)?,
        upload_opt(arena, l.bias.as_ref(), what)?,
    ))
}

/// A projection weight (O, dense MLP, LM head) and its bias: FP8 stays FP8 where the projection
/// kernels take its scales ([`DeviceMatrix::projection`]), else the dense rules.
pub(crate) fn upload_projection(
    arena: &mut Arena,
    l: &Linear,
    what: &str,
) -> Result<(DeviceMatrix, Option<DPtr<f32>>), RuntimeError> {
    Ok((
        DeviceMatrix::projection(arena, &l.w, what)?,
        upload_opt(arena, l.bias.as_ref(), what)?,
    ))
}

/// The `[q; k; v]` rows of an attention block fused into one matrix, with a bias for all three
/// when any has one (zeros for the others); with `order`, row `p` of the upload is row
/// `order[p]` of `[q; k; v]` (`ops::rope_pair_order`).
pub(crate) fn upload_qkv(
    arena: &mut Arena,
    a: &model::weights::Attention,
    order: Option<&[usize]>,
    what: &str,
) -> Result<(DeviceMatrix, Option<DPtr<f32>>), RuntimeError> {
    let rows = a.q.w.rows + a.k.w.rows + a.v.w.rows;
    let cols = a.q.w.cols;
    let mut b = [&a.q, &a.k, &a.v]
        .iter()
        .any(|m| m.bias.is_some())
        .then(|| {
            let mut b = Vec::with_capacity(rows);
            for m in [&a.q, &a.k, &a.v] {
                match &m.bias {
                    Some(v) => b.extend_from_slice(v),
                    None => b.extend(std::iter::repeat_n(0.0, m.w.rows)),
                }
            }
            b
        });
    if let Some(order) = order {
        if order.len() != rows {
            return Err(RuntimeError::Invalid(format!(
                "{what}: row order of {} for {rows} rows",
                order.len()
            )));
        }
        if let Some(&r) = order.iter().find(|&&r| r >= rows) {
            return Err(RuntimeError::Invalid(format!(
                "{what}: row order names row {r} of {rows}"
            )));
        }
        b = b.map(|b| order.iter().map(|&r| b[r]).collect());
    }
    // Row p of [q; k; v] (after the optional permutation) → (part, row in part).
    let (nq, nk) = (a.q.w.rows, a.k.w.rows);
    let pick = |p: usize| {
        let r = order.map_or(p, |o| o[p]);
        if r < nq {
            (0, r)
        } else if r < nq + nk {
            (1, r - nq)
        } else {
            (2, r - nq - nk)
        }
    };
    let parts = [&a.q.w, &a.k.w, &a.v.w];
    let qkv = if order.is_some() {
        DeviceMatrix::from_rows(arena, &parts, rows, cols, pick, what)?
    } else {
        DeviceMatrix::projection_rows(arena, &parts, rows, cols, pick, what)?
    };
    let bias = b
        .map(|b| arena.upload(&b, &format!("{what} bias")))
        .transpose()?;
    Ok((qkv, bias))
}

/// The rope pair order of a layer's QKV rows (geometry of its `qkv_rope_kv` op) when the fused
/// projection can serve it (no q/k norm, even head and rotary dims, 16-byte weight rows), else
/// `None`.
fn fused_qkv_order(
    p: &QkvRopeParams,
    rotary_dim: usize,
    qk_norm: bool,
    cols: usize,
) -> Option<Vec<usize>> {
    if qk_norm || !cols.is_multiple_of(8) {
        return None;
    }
    let g = p.geom;
    crate::ops::rope_pair_order(
        g.n_heads,
        g.n_kv_heads,
        g.head_dim,
        g.v_head_dim,
        rotary_dim,
    )
}

/// Captures what `encode` enqueues on `stream` into an instantiated, uploaded CUDA graph.
pub(crate) fn capture_graph(
    stream: &Arc<CudaStream>,
    encode: impl FnOnce() -> Result<(), RuntimeError>,
) -> Result<CudaGraph, RuntimeError> {
    stream.synchronize()?;
    stream.begin_capture(CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL)?;
    let r = encode();
    let g = stream.end_capture(CUgraphInstantiate_flags(0));
    r?;
    let g = g?.ok_or_else(|| RuntimeError::Invalid("graph capture produced nothing".into()))?;
    g.upload()?;
    Ok(g)
}

/// A target model's weights (no drafter parts).
fn target_weights(
    embed: DeviceMatrix,
    lm_head: DeviceMatrix,
    final_norm: DPtr<f32>,
    layers: Vec<DeviceLayer>,
) -> DeviceWeights {
    DeviceWeights {
        embed,
        lm_head,
        final_norm,
        layers,
        fc: Vec::new(),
        hidden_norm: None,
        embed_scale: None,
    }
}

impl GpuModel {
    /// Uploads `weights` (validated against `config` as the CPU executor does) to GPU `ordinal`.
    pub fn new(
        ordinal: usize,
        config: Arc<ModelConfig>,
        weights: &Weights,
    ) -> Result<Self, RuntimeError> {
        Self::new_with_progress(ordinal, config, weights, &mut |_| {})
    }

    /// [`GpuModel::new`], telling `progress` the weight bytes uploaded after each layer. Each
    /// tensor goes from the host weights (views of the mapped checkpoint) to the device on its
    /// own (see [`DeviceMatrix::from_mat`]); once a layer is on the device its mapped pages are
    /// released, so host memory stays near one layer's size however large the model.
    pub fn new_with_progress(
        ordinal: usize,
        config: Arc<ModelConfig>,
        weights: &Weights,
        progress: &mut dyn FnMut(model::progress::Progress),
    ) -> Result<Self, RuntimeError> {
        model::check_weights(&config, weights).map_err(|e| RuntimeError::Invalid(e.to_string()))?;
        let layout =
            Plan::new(&config, DEVICE_STORAGE, PassShape::decode(0)).map_err(plan_error)?;
        let (device, stream, ops, moe) = open(ordinal)?;
        let mut arena = Arena::new(stream.clone());
        let ropes = upload_ropes(&mut arena, &layout.ropes)?;
        let weights = upload_target(&mut arena, &config, &layout, &ropes, weights, progress)?;
        Ok(Self::assemble(
            device, stream, ops, moe, config, weights, ropes, layout, arena, None,
        ))
    }

    /// A model of `config`'s shape with random weights generated on the device (no checkpoint,
    /// nothing large on the host): bf16 dense weights of standard deviation ~1/sqrt(K), MXFP4
    /// experts from [`DeviceMoe::synthetic`] ([`SyntheticDtypes::Bf16`]).
    pub fn synthetic(
        ordinal: usize,
        config: Arc<ModelConfig>,
        seed: u64,
    ) -> Result<Self, RuntimeError> {
        Self::synthetic_with(ordinal, config, seed, SyntheticDtypes::Bf16)
    }

    /// [`GpuModel::synthetic`] with the dense weights in `dtypes`. Dense-MLP layers need the
    /// config's `dense_intermediate_size`; sigmoid routers get a correction bias, gpt-oss
    /// routers and experts their biases.
    pub fn synthetic_with(
        ordinal: usize,
        config: Arc<ModelConfig>,
        seed: u64,
        dtypes: SyntheticDtypes,
    ) -> Result<Self, RuntimeError> {
        let layout =
            Plan::new(&config, DEVICE_STORAGE, PassShape::decode(0)).map_err(plan_error)?;
        let (device, stream, ops, moe) = open(ordinal)?;
        let mut arena = Arena::new(stream.clone());
        let ropes = upload_ropes(&mut arena, &layout.ropes)?;
        let weights = synthetic_target(&mut arena, &ops, &config, &layout, &ropes, seed, dtypes)?;
        stream.synchronize()?;
        Ok(Self::assemble(
            device, stream, ops, moe, config, weights, ropes, layout, arena, None,
        ))
    }

    #[allow(clippy::too_many_arguments)]
    fn assemble(
        device: Device,
        stream: Arc<CudaStream>,
        ops: Ops,
        moe: MoeKernels,
        config: Arc<ModelConfig>,
        weights: DeviceWeights,
        ropes: Vec<Rope>,
        layout: Plan,
        arena: Arena,
        rank: Option<tp::RankPart>,
    ) -> Self {
        let weight_bytes = arena.used_bytes();
        Self {
            inner: Arc::new(Inner {
                device,
                stream,
                ops,
                moe,
                config,
                weights,
                ropes,
                layout,
                plans: Mutex::new(HashMap::new()),
                weight_bytes,
                rank,
                _arena: arena,
            }),
        }
    }

    /// The plan of a pass of `t` rows (see [`pass_shape`]), built on first use and cached.
    pub(crate) fn plan_for(
        &self,
        t: usize,
        logits: Logits,
        batched: bool,
    ) -> Result<Arc<Plan>, RuntimeError> {
        let key = (t, logits, batched);
        let mut plans = self
            .inner
            .plans
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if let Some(p) = plans.get(&key) {
            return Ok(p.clone());
        }
        let plan = Plan::new(
            &self.inner.config,
            DEVICE_STORAGE,
            pass_shape(t, logits, batched),
        )
        .map_err(plan_error)?;
        let plan = match &self.inner.rank {
            Some(r) => r.view(&plan, &self.inner.config)?,
            None => plan,
        };
        lower::check_plan_for(&plan, self.inner.rank.is_some())?;
        lower::check_weights(&plan, &self.inner.weights)?;
        let plan = Arc::new(plan);
        plans.insert(key, plan.clone());
        Ok(plan)
    }

    /// The uploaded weights (the persistent engine binds its argument blocks to them).
    pub(crate) fn weights(&self) -> &DeviceWeights {
        &self.inner.weights
    }

    /// The device RoPE tables of the plans' `ropes`.
    pub(crate) fn ropes(&self) -> &[Rope] {
        &self.inner.ropes
    }

    /// The kernels, weights and RoPE tables this model's plans lower onto.
    fn lowering(&self) -> Lowering<'_> {
        let m = &*self.inner;
        Lowering {
            ops: &m.ops,
            moe: &m.moe,
            stream: &m.stream,
            weights: &m.weights,
            ropes: &m.ropes,
            rank: m.rank.as_ref().map(|r| &r.comm),
        }
    }

    pub fn config(&self) -> &ModelConfig {
        &self.inner.config
    }

    pub fn device(&self) -> &Device {
        &self.inner.device
    }

    pub fn stream(&self) -> &Arc<CudaStream> {
        &self.inner.stream
    }

    /// The loaded dense-op kernels (for benchmarks and drafters that share this device).
    pub fn ops(&self) -> &Ops {
        &self.inner.ops
    }

    /// The loaded expert kernels.
    pub fn moe_kernels(&self) -> &MoeKernels {
        &self.inner.moe
    }

    /// The token embedding `[V, H]` on the device (drafters borrow it).
    pub fn embed_matrix(&self) -> &DeviceMatrix {
        &self.inner.weights.embed
    }

    /// The LM head `[V, H]` on the device (drafters borrow it).
    pub fn lm_head_matrix(&self) -> &DeviceMatrix {
        &self.inner.weights.lm_head
    }

    /// Bytes of weights resident on the device.
    pub fn weight_bytes(&self) -> usize {
        self.inner.weight_bytes
    }

    /// How many projection matrices (QKV, O, dense MLP, LM head) are stored as FP8 on the device
    /// (tiled for `tilert::ops::proj`, not widened).
    pub fn fp8_projections(&self) -> usize {
        let w = &self.inner.weights;
        let fp8 = |m: &DeviceMatrix| usize::from(m.tiled().is_some_and(|p| p.is_fp8()));
        let mut n = fp8(&w.lm_head);
        for l in &w.layers {
            n += fp8(&l.qkv) + fp8(&l.o);
            if let DeviceMlp::Dense { gate_up, down, .. } = &l.mlp {
                n += fp8(gate_up) + fp8(down);
            }
        }
        n
    }

    /// Weight bytes one decode step reads: every dense matrix of the layers, the LM head, and
    /// `top_k` experts per MoE layer (the embedding is gathered, one row per token).
    pub fn decode_bytes_per_token(&self) -> usize {
        self.step_weight_bytes(self.inner.config.top_k)
    }

    /// Weight bytes a pass reads when `distinct` experts per MoE layer are selected.
    pub fn step_weight_bytes(&self, distinct: usize) -> usize {
        let mut b = self.inner.weights.lm_head.bytes();
        for l in &self.inner.weights.layers {
            b += l.qkv.bytes() + l.o.bytes();
            match &l.mlp {
                DeviceMlp::Dense { gate_up, down, .. } => b += gate_up.bytes() + down.bytes(),
                DeviceMlp::Moe {
                    router, experts, ..
                } => {
                    b += router.bytes()
                        + distinct.min(experts.n_experts)
                            * (experts.gate_up.expert_bytes() + experts.down.expert_bytes())
                }
            }
        }
        b
    }

    /// A new empty sequence holding at most `max_seq` positions (full-attention layers keep
    /// that many; sliding layers a ring of `window + MAX_TOKENS + max_rollback`).
    pub fn session(&self, max_seq: usize) -> Result<GpuSession, RuntimeError> {
        GpuSession::new(self.clone(), max_seq, DEFAULT_MAX_ROLLBACK)
    }
}

/// Random weights of `config`'s shape generated on the device (see [`GpuModel::synthetic`]) in
/// the layout of the decode plan `layout`; `config` gives the dimensions (a tensor-parallel
/// rank's: its heads and intermediate slice).
fn synthetic_target(
    arena: &mut Arena,
    ops: &Ops,
    config: &ModelConfig,
    layout: &Plan,
    ropes: &[Rope],
    seed: u64,
    dtypes: SyntheticDtypes,
) -> Result<DeviceWeights, RuntimeError> {
    let fp8 = dtypes == SyntheticDtypes::Released;
    let h = config.hidden_size;
    let seed_state = std::cell::Cell::new(seed);
    let next_seed = || {
        let s = seed_state
            .get()
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        seed_state.set(s);
        s
    };
    let dense = |arena: &mut Arena, rows: usize, cols: usize, what: &str| {
        DeviceMatrix::synthetic(arena, ops, rows, cols, next_seed(), what)
    };
    let small = crate::tensor::patterned_vector;
    let mut layers = Vec::with_capacity(config.layers.len());
    // FP8 projections in the projection kernels' tiled layout (as an FP8 checkpoint loads).
    let fp8_proj = |arena: &mut Arena, rows: usize, cols: usize, what: &str| {
        crate::ops::proj::ProjMatrix::synthetic(arena, ops, true, rows, cols, next_seed(), what)
            .map(DeviceMatrix::from)
    };
    for (l, spec) in config.layers.iter().enumerate() {
        let at = |what: &str| format!("layer {l} {what}");
        let (nh, nkv, d, dv) = (
            spec.n_heads,
            spec.n_kv_heads,
            spec.head_dim,
            spec.v_head_dim,
        );
        let rows = nh * d + nkv * d + nkv * dv;
        let qkv = if fp8 {
            fp8_proj(arena, rows, h, &at("qkv"))?
        } else {
            dense(arena, rows, h, &at("qkv"))?
        };
        let qkv_bias = if spec.attn_bias {
            Some(small(arena, rows, 0.0, 0.1, &at("qkv bias"))?)
        } else {
            None
        };
        let o = dense(arena, h, nh * dv, &at("o_proj"))?;
        let o_bias = if spec.attn_bias {
            Some(small(arena, h, 0.0, 0.1, &at("o bias"))?)
        } else {
            None
        };
        let mlp = if spec.moe {
            let router = dense(arena, config.n_experts, h, &at("router"))?;
            let gpt_oss = matches!(config.router, RouterSpec::GptOss);
            let router_bias = if gpt_oss {
                Some(small(
                    arena,
                    config.n_experts,
                    0.0,
                    0.1,
                    &at("router bias"),
                )?)
            } else {
                None
            };
            // The experts the layer's ops compute (an expert-parallel rank holds a range).
            let held = layout
                .ops
                .iter()
                .find_map(|o| match o.kind {
                    model::plan::OpKind::ExpertsGateUp(p) if o.layer == Some(l) => {
                        Some(p.experts.len())
                    }
                    _ => None,
                })
                .unwrap_or(config.n_experts);
            let experts = DeviceMoe::synthetic(
                arena,
                ops,
                held,
                h,
                config.moe_intermediate_size,
                gpt_oss,
                next_seed(),
            )?;
            let correction_bias = if matches!(config.router, RouterSpec::Sigmoid { .. }) {
                Some(small(
                    arena,
                    config.n_experts,
                    0.0,
                    0.01,
                    &at("correction bias"),
                )?)
            } else {
                None
            };
            DeviceMlp::Moe {
                router,
                router_bias,
                correction_bias,
                experts,
            }
        } else {
            let inter = config.dense_intermediate_size.ok_or_else(|| {
                RuntimeError::Invalid(format!(
                    "layer {l} is dense but the config has no dense intermediate size"
                ))
            })?;
            let mut proj = |rows: usize, cols: usize, what: &str| {
                if fp8 {
                    fp8_proj(arena, rows, cols, &at(what))
                } else {
                    dense(arena, rows, cols, &at(what))
                }
            };
            DeviceMlp::Dense {
                gate_up: proj(2 * inter, h, "mlp gate_up")?,
                gate_up_bias: None,
                down: proj(h, inter, "mlp down")?,
                down_bias: None,
            }
        };
        // Random rows: any order is as good as the rope pair order (row-major qkv only).
        let p = qkv_params(layout, l)?;
        let qkv_rope_fused =
            !fp8 && fused_qkv_order(&p, ropes[p.rope].rotary_dim, spec.qk_norm, h).is_some();
        layers.push(DeviceLayer {
            input_norm: small(arena, h, 1.0, 0.1, &at("input norm"))?,
            post_attn_norm: small(arena, h, 1.0, 0.1, &at("post-attention norm"))?,
            qkv,
            qkv_bias,
            qkv_rope_fused,
            o,
            o_bias,
            q_norm: if spec.qk_norm {
                Some(small(arena, d, 1.0, 0.1, &at("q norm"))?)
            } else {
                None
            },
            k_norm: if spec.qk_norm {
                Some(small(arena, d, 1.0, 0.1, &at("k norm"))?)
            } else {
                None
            },
            sinks: if spec.sinks {
                Some(small(arena, nh, 0.0, 0.5, &at("sinks"))?)
            } else {
                None
            },
            mlp,
        });
    }
    // The embedding is only gathered; the LM head is read whole every step.
    let embed = dense(arena, config.vocab_size, h, "embedding")?;
    let lm_head = dense(arena, config.vocab_size, h, "lm_head")?;
    let final_norm = small(arena, h, 1.0, 0.1, "final norm")?;
    Ok(target_weights(embed, lm_head, final_norm, layers))
}

/// Uploads a target's `weights` (already checked against `config`, or one tensor-parallel rank's
/// shards) into `arena` in the layout of the decode plan `layout` (the rope pair order of its
/// `qkv_rope_kv` geometry), telling `progress` the bytes uploaded after each layer.
fn upload_target(
    arena: &mut Arena,
    config: &ModelConfig,
    layout: &Plan,
    ropes: &[Rope],
    weights: &Weights,
    progress: &mut dyn FnMut(model::progress::Progress),
) -> Result<DeviceWeights, RuntimeError> {
    let total = weights.stored_bytes() as u64;
    let mut done = 0u64;
    let mut layers = Vec::with_capacity(config.layers.len());
    for (l, lw) in weights.layers.iter().enumerate() {
        let at = |what: &str| format!("layer {l} {what}");
        let a = &lw.attn;
        let p = qkv_params(layout, l)?;
        // FP8 q/k/v go to the tiled projection kernels (no RoPE-fused FP8 kernel).
        let fp8 = a.q.w.dtype() == model::weights::DenseDtype::F8E4M3;
        let order = fused_qkv_order(
            &p,
            ropes[p.rope].rotary_dim,
            a.q_norm.is_some() || a.k_norm.is_some(),
            a.q.w.cols,
        )
        .filter(|_| !fp8);
        let (qkv, qkv_bias) = upload_qkv(arena, a, order.as_deref(), &at("qkv"))?;
        let (o, o_bias) = upload_projection(arena, &a.o, &at("o_proj"))?;
        let mlp = match &lw.mlp {
            Mlp::Dense { gate_up, down } => {
                let (gate_up, gate_up_bias) =
                    upload_projection(arena, gate_up, &at("mlp gate_up"))?;
                let (down, down_bias) = upload_projection(arena, down, &at("mlp down"))?;
                DeviceMlp::Dense {
                    gate_up,
                    gate_up_bias,
                    down,
                    down_bias,
                }
            }
            Mlp::Moe(m) => {
                let (router, router_bias) = upload_linear(arena, &m.router, &at("router"))?;
                let correction_bias =
                    upload_opt(arena, m.correction_bias.as_ref(), &at("correction bias"))?;
                DeviceMlp::Moe {
                    router,
                    router_bias,
                    correction_bias,
                    experts: DeviceMoe::upload(arena, m)?,
                }
            }
        };
        layers.push(DeviceLayer {
            input_norm: arena.upload(&lw.input_norm, &at("input norm"))?,
            post_attn_norm: arena.upload(&lw.post_attn_norm, &at("post-attention norm"))?,
            qkv,
            qkv_bias,
            qkv_rope_fused: order.is_some(),
            o,
            o_bias,
            q_norm: upload_opt(arena, a.q_norm.as_ref(), &at("q norm"))?,
            k_norm: upload_opt(arena, a.k_norm.as_ref(), &at("k norm"))?,
            sinks: upload_opt(arena, a.sinks.as_ref(), &at("sinks"))?,
            mlp,
        });
        lw.release_pages();
        done += lw.stored_bytes() as u64;
        progress(model::progress::Progress { done, total });
    }
    let embed = DeviceMatrix::from_mat(arena, &weights.embed, "embedding")?;
    // Tied embeddings (known from the config): one device copy serves both.
    let lm_head = if config.tie_word_embeddings {
        embed
    } else {
        DeviceMatrix::projection(arena, &weights.lm_head, "lm_head")?
    };
    let final_norm = arena.upload(&weights.final_norm, "final norm")?;
    weights.embed.release_pages();
    weights.lm_head.release_pages();
    progress(model::progress::Progress { done: total, total });
    Ok(target_weights(embed, lm_head, final_norm, layers))
}

fn open(ordinal: usize) -> Result<(Device, Arc<CudaStream>, Ops, MoeKernels), RuntimeError> {
    let device = Device::open(ordinal)?;
    // Kernels take raw addresses from the arena; cudarc's per-slice event tracking would only
    // add work (and must be off during graph capture).
    // SAFETY: this executor uses a single stream per model, so no cross-stream ordering relies
    // on cudarc's events.
    unsafe { device.ctx.disable_event_tracking() };
    let stream = device.ctx.new_stream()?;
    let ops = Ops::load(&device.ctx)?;
    let moe = MoeKernels::load(&device.ctx)?;
    Ok((device, stream, ops, moe))
}

/// The device tables of a plan's RoPE configurations ([`Plan::ropes`]).
pub(crate) fn upload_ropes(
    arena: &mut Arena,
    ropes: &[model::config::Rope],
) -> Result<Vec<Rope>, RuntimeError> {
    ropes
        .iter()
        .map(|r| {
            let t = RopeTable::new(r);
            Ok(Rope {
                inv_freq: if t.inv_freq.is_empty() {
                    DPtr::null()
                } else {
                    arena.upload(&t.inv_freq, "rope table")?
                },
                attention_factor: t.attention_factor,
                rotary_dim: t.rotary_dim,
            })
        })
        .collect()
}

/// The output of [`GpuSession::verify`] (same shape as the CPU executor's).
pub type VerifyOutput = model::VerifyOutput;

/// What a pass leaves on the device for the caller.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) enum Logits {
    /// No LM head (inner prefill chunks).
    None,
    /// LM head over every token of the pass + argmax.
    All,
}

pub(crate) struct Buffers {
    /// `[start, tok_0 .. tok_{MAX_TOKENS-1}]`, written before every pass.
    pub(crate) io: DPtr<u32>,
    pub(crate) x: DPtr<f32>,
    pub(crate) h: DPtr<f32>,
    pub(crate) qkv: DPtr<f32>,
    pub(crate) q: DPtr<f32>,
    pub(crate) attn: DPtr<f32>,
    pub(crate) attn_scratch: DPtr<f32>,
    pub(crate) router_logits: DPtr<f32>,
    pub(crate) ids: DPtr<i32>,
    pub(crate) weights: DPtr<f32>,
    pub(crate) act: DPtr<f32>,
    pub(crate) y: DPtr<f32>,
    pub(crate) moe_scratch: DPtr<f32>,
    /// Dense MLPs: `[T, 2I]` and `[T, I]`.
    pub(crate) gu: DPtr<f32>,
    pub(crate) logits: DPtr<f32>,
    pub(crate) argmax: DPtr<u32>,
    /// [`ARGMAX_SCRATCH`] words for the multi-block argmax (its counters start at zero).
    pub(crate) argmax_scratch: DPtr<u32>,
    /// The fused router's last-block counter (zero between launches).
    pub(crate) route_counter: DPtr<u32>,
    /// Captured hidden states, one `[MAX_TOKENS, H]` slot per requested index.
    pub(crate) hidden: DPtr<f32>,
    pub(crate) sample_uniform: DPtr<f32>,
    pub(crate) sample_out: DPtr<u32>,
    /// A tensor-parallel rank's partial sums `[T, H]` (null on one device).
    pub(crate) partial: DPtr<f32>,
    /// The persistent engine's distinct-expert count (`tilert::persistent`).
    pub(crate) expert_list: DPtr<u32>,
    /// The persistent engine's per-chunk argmax of the LM head: `[MAX_TOKENS, ARGMAX_CHUNKS, 2]`.
    pub(crate) argmax_partials: DPtr<u32>,
}

/// Per-launch labels and times of a profiled pass (see [`GpuSession::profile_pass`]): a label
/// is the plan op's `OpKind::name` (`qkv_rope_kv`, `experts_down`, ...) for its first launch
/// and `name:part` for its further launches (`experts_down:combine_norm`, `mlp_gate_up:glu`,
/// ...).
pub type OpTimes = Vec<(&'static str, f32)>;

/// One sequence on the GPU: KV cache, activation buffers, captured graphs.
pub struct GpuSession {
    model: GpuModel,
    arena: Arena,
    kv: Vec<LayerKv>,
    b: Buffers,
    len: usize,
    /// One past the highest position ever written (bounds exact truncation of sliding layers).
    high_water: usize,
    max_seq: usize,
    /// Per layer, the keys that size its attention splits (`LayerTables::max_keys`).
    keys: Vec<usize>,
    /// Hidden indices (as the CPU's `cpu::Session::verify`) copied out by every pass.
    capture: Vec<usize>,
    graphs: HashMap<(usize, Logits), CudaGraph>,
    use_graphs: bool,
    /// The blocks and block table of a paged session (`None`: contiguous caches).
    paged: Option<paged::SessionBlocks>,
    /// [`GpuSession::sample_last`]'s scratch (`ops::sample_scratch_len(V)` words), allocated on
    /// first use.
    sample_scratch: DPtr<u32>,
    /// The batched pass this session's batched calls run through ([`GpuSession::share_batch`]).
    batch: Option<SharedBatch>,
}

impl GpuSession {
    fn new(model: GpuModel, max_seq: usize, max_rollback: usize) -> Result<Self, RuntimeError> {
        Self::with_pool(model, max_seq, max_rollback, None)
    }

    /// A session whose caches are contiguous, or with `pool` paged in its blocks.
    fn with_pool(
        model: GpuModel,
        max_seq: usize,
        max_rollback: usize,
        pool: Option<&GpuKvPool>,
    ) -> Result<Self, RuntimeError> {
        let m = &*model.inner;
        let cfg = &*m.config;
        if max_seq == 0 {
            return Err(RuntimeError::Invalid("max_seq must be positive".into()));
        }
        let mut arena = Arena::with_chunk_bytes(m.stream.clone(), SESSION_CHUNK_BYTES);
        let t = MAX_TOKENS;
        let h = cfg.hidden_size;
        let layout = &m.layout;
        let mut kv = Vec::with_capacity(layout.layers.len());
        let mut keys = Vec::with_capacity(layout.layers.len());
        let mut attn_scratch = 0;
        let (mut qkv_w, mut q_w, mut attn_w) = (0, 0, 0);
        let (mut paged, paged_kv) = match pool {
            Some(pool) => {
                let capacity = paged::SessionBlocks::capacity(pool, max_seq);
                let (blocks, kv) = paged::SessionBlocks::new(pool, &mut arena, capacity)?;
                (Some(blocks), kv)
            }
            None => (None, Vec::new()),
        };
        for (l, (tables, layer)) in layout.layers.iter().zip(&m.weights.layers).enumerate() {
            let layer_keys = tables.max_keys(max_seq, MAX_TOKENS);
            let lk = match paged_kv.get(l) {
                Some(&lk) => lk,
                None => {
                    let capacity = tables.kv_capacity(max_seq, MAX_TOKENS, max_rollback);
                    LayerKv {
                        k: arena
                            .alloc(capacity * tables.k_width, &format!("layer {l} key cache"))?,
                        v: arena
                            .alloc(capacity * tables.v_width, &format!("layer {l} value cache"))?,
                        capacity,
                        paging: None,
                    }
                }
            };
            let args = lower::layer_attention_args(layout, l, &lk)?;
            // Fewer queries get more key splits: the largest need is not always at T = 16.
            for rows in 1..=t {
                attn_scratch =
                    attn_scratch.max(Ops::attention_scratch_len(&args, rows, layer_keys));
            }
            kv.push(lk);
            keys.push(layer_keys);
            qkv_w = qkv_w.max(layer.qkv.rows);
            q_w = q_w.max(args.n_heads * args.head_dim);
            attn_w = attn_w.max(args.n_heads * args.v_head_dim);
        }
        let (ne, k) = (cfg.n_experts.max(1), cfg.top_k.max(1));
        let mut moe_scratch = 0;
        let mut inter = 0;
        for layer in &m.weights.layers {
            match &layer.mlp {
                DeviceMlp::Moe { experts, .. } => {
                    moe_scratch = moe_scratch.max(MoeKernels::scratch_len(experts, t, k));
                    inter = inter.max(experts.inter);
                }
                DeviceMlp::Dense { down, .. } => inter = inter.max(down.cols),
            }
        }
        let v = cfg.vocab_size;
        let b = Buffers {
            io: arena.alloc(1 + t, "token buffer")?,
            x: arena.alloc(t * h, "residual")?,
            h: arena.alloc(t * h, "normed activations")?,
            qkv: arena.alloc(t * qkv_w, "qkv")?,
            q: arena.alloc(t * q_w, "queries")?,
            attn: arena.alloc(t * attn_w, "attention output")?,
            attn_scratch: arena.alloc(attn_scratch.max(1), "attention scratch")?,
            router_logits: arena.alloc(t * ne, "router logits")?,
            ids: arena.alloc(t * k, "routing ids")?,
            weights: arena.alloc(t * k, "routing weights")?,
            act: arena.alloc(t * k * inter.max(1), "expert activations")?,
            y: arena.alloc(t * k * h, "expert outputs")?,
            moe_scratch: arena.alloc(moe_scratch.max(1), "expert scratch")?,
            gu: arena.alloc(t * 3 * inter.max(1), "dense mlp activations")?,
            logits: arena.alloc(t * v, "logits")?,
            argmax: arena.alloc(t, "argmax")?,
            argmax_scratch: arena.alloc(ARGMAX_SCRATCH, "argmax scratch")?,
            route_counter: arena.alloc(1, "router counter")?,
            hidden: DPtr::null(),
            sample_uniform: arena.alloc(1, "sampling uniform")?,
            sample_out: arena.alloc(1, "sampled token")?,
            partial: if m.rank.is_some() {
                arena.alloc(t * h, "partial sums")?
            } else {
                DPtr::null()
            },
            expert_list: arena.alloc(1, "persistent expert list")?,
            argmax_partials: arena.alloc(t * ARGMAX_CHUNKS * 2, "persistent argmax partials")?,
        };
        m.stream.synchronize()?;
        Ok(Self {
            model,
            arena,
            kv,
            b,
            len: 0,
            high_water: 0,
            max_seq,
            keys,
            capture: Vec::new(),
            graphs: HashMap::new(),
            // ULTRA_NO_GRAPHS=1: launch op by op (debugging; with ULTRA_TRACE_OPS=1 each op is
            // synchronized so a fault names its op).
            use_graphs: std::env::var("ULTRA_NO_GRAPHS").map_or(true, |v| v != "1"),
            paged: paged.take(),
            sample_scratch: DPtr::null(),
            batch: None,
        })
    }

    pub fn model(&self) -> &GpuModel {
        &self.model
    }

    /// Positions held (the next token gets position `len()`).
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The most positions this session can hold.
    pub fn max_seq(&self) -> usize {
        self.max_seq
    }

    /// Device bytes this session holds (KV cache + buffers, as reserved from the device: what a
    /// server must budget per sequence).
    pub fn device_bytes(&self) -> usize {
        self.arena.reserved_bytes()
    }

    /// Run passes op by op instead of replaying captured graphs (for comparisons and profiling).
    pub fn set_use_graphs(&mut self, on: bool) {
        self.use_graphs = on;
    }

    /// Sets the hidden indices (as the CPU's `cpu::Session::verify`: `0..=L` or
    /// `LAST_LAYER_PRE_NORM`) that every pass copies out; drops captured graphs when it changes.
    pub fn set_capture(&mut self, indices: &[usize]) -> Result<(), RuntimeError> {
        let nl = self.model.inner.config.layers.len();
        if let Some(&bad) = indices
            .iter()
            .find(|&&i| i > nl && i != LAST_LAYER_PRE_NORM)
        {
            return Err(RuntimeError::Invalid(format!(
                "hidden-state index {bad} is out of range (0..={nl}, or LAST_LAYER_PRE_NORM)"
            )));
        }
        if indices == self.capture.as_slice() {
            return Ok(());
        }
        if indices.len() > self.capture.len() {
            let h = self.model.inner.config.hidden_size;
            self.b.hidden = self
                .arena
                .alloc(indices.len() * MAX_TOKENS * h, "captured hidden states")?;
        }
        self.capture = indices.to_vec();
        self.graphs.clear();
        Ok(())
    }

    /// Attaches the batched pass that `Executor::forward_batch` (and the speculative loop's
    /// batched verify) runs this session's rows through, together with the other sessions
    /// attached to it ([`GpuBatch::verify`]); without one they run one session after another.
    pub fn share_batch(&mut self, batch: SharedBatch) -> Result<(), RuntimeError> {
        if !Arc::ptr_eq(&batch.borrow().model().inner, &self.model.inner) {
            return Err(RuntimeError::Invalid(
                "share_batch: the batch belongs to another model".into(),
            ));
        }
        self.batch = Some(batch);
        Ok(())
    }

    /// The batched pass attached by [`GpuSession::share_batch`].
    pub fn shared_batch(&self) -> Option<&SharedBatch> {
        self.batch.as_ref()
    }

    /// The hidden indices every pass copies out (see [`GpuSession::set_capture`]).
    pub fn capture(&self) -> &[usize] {
        &self.capture
    }

    /// The model's stream.
    pub(crate) fn stream(&self) -> &Arc<CudaStream> {
        &self.model.inner.stream
    }

    /// `[start, tokens..]`: the pass's first position and its token ids.
    pub(crate) fn io(&self) -> DPtr<u32> {
        self.b.io
    }

    /// The activation buffers.
    pub(crate) fn buffers(&self) -> &Buffers {
        &self.b
    }

    /// The KV cache of every layer.
    pub(crate) fn caches(&self) -> &[LayerKv] {
        &self.kv
    }

    /// Per layer, the keys that size its attention splits.
    pub(crate) fn layer_keys(&self) -> &[usize] {
        &self.keys
    }

    /// Counts `t` positions appended by a pass another engine ran on these buffers.
    pub(crate) fn advance(&mut self, t: usize) {
        self.len += t;
        self.high_water = self.high_water.max(self.len);
    }

    /// Makes the model's CUDA context current on this thread.
    pub(crate) fn bind_context(&self) -> Result<(), RuntimeError> {
        Ok(self.model.device().ctx.bind_to_thread()?)
    }

    pub(crate) fn check_tokens(&self, tokens: &[u32]) -> Result<(), RuntimeError> {
        if tokens.is_empty() {
            return Err(RuntimeError::Invalid("empty token list".into()));
        }
        let vocab = self.model.inner.config.vocab_size;
        if let Some((i, t)) = tokens
            .iter()
            .enumerate()
            .find(|(_, &t)| t as usize >= vocab)
        {
            return Err(RuntimeError::Invalid(format!(
                "token {t} at index {i} is outside the vocabulary (size {vocab})"
            )));
        }
        if self.len + tokens.len() > self.max_seq {
            return Err(RuntimeError::Invalid(format!(
                "sequence would hold {} positions; this session holds at most {}",
                self.len + tokens.len(),
                self.max_seq
            )));
        }
        Ok(())
    }

    /// Runs `tokens` (≤ MAX_TOKENS) at positions `len..`: writes the io buffer, then replays
    /// (capturing on first use) or launches the pass.
    fn pass(&mut self, tokens: &[u32], logits: Logits) -> Result<(), RuntimeError> {
        debug_assert!(!tokens.is_empty() && tokens.len() <= MAX_TOKENS);
        let t = tokens.len();
        self.prepare_blocks(t)?;
        let mut io = Vec::with_capacity(1 + t);
        io.push(self.len as u32);
        io.extend_from_slice(tokens);
        let stream = self.model.inner.stream.clone();
        htod(&stream, &io, self.b.io.slice(0..1 + t))?;
        if self.use_graphs {
            let key = (t, logits);
            if !self.graphs.contains_key(&key) {
                let g = self.capture_graph(t, logits)?;
                self.graphs.insert(key, g);
            }
            self.graphs[&key].launch()?;
        } else {
            self.encode(t, logits, None, &mut |_| Ok(()))?;
        }
        self.len += t;
        self.high_water = self.high_water.max(self.len);
        Ok(())
    }

    fn capture_graph(&self, t: usize, logits: Logits) -> Result<CudaGraph, RuntimeError> {
        capture_graph(&self.model.inner.stream, || {
            self.encode(t, logits, None, &mut |_| Ok(()))
        })
    }

    /// Enqueues one pass of `t` tokens (io buffer already written): the pass's plan lowered
    /// onto this session's buffers ([`lower`]); `mark(label)` is called after each launch
    /// (profiling records an event there). An error names the op and layer it came from. With
    /// `ULTRA_TRACE_OPS=1` in the environment (and graphs off) every launch is followed by a
    /// synchronization, so asynchronous faults are pinned to their op too. With `rows`, the pass
    /// is a batched decode ([`GpuBatch`]): row `t` is the next token of its own sequence, whose
    /// cache `rows` names (this session only lends its activation buffers).
    fn encode(
        &self,
        t: usize,
        logits: Logits,
        rows: Option<&RowPass>,
        mark: &mut dyn FnMut(&'static str) -> Result<(), RuntimeError>,
    ) -> Result<(), RuntimeError> {
        let trace = !self.use_graphs && std::env::var("ULTRA_TRACE_OPS").is_ok_and(|v| v == "1");
        let plan = self.model.plan_for(t, logits, rows.is_some())?;
        let m = &*self.model.inner;
        let b = &self.b;
        let h = m.config.hidden_size;
        let kv = match rows {
            Some(r) => KvBinding::Rows(r),
            None => KvBinding::Sequence {
                caches: &self.kv,
                positions: b.io.slice(0..1),
                keys: &self.keys,
            },
        };
        let bind = Bindings {
            tokens: TokenBinding::Ids(b.io.slice(1..1 + t)),
            features: &[],
            x: b.x.slice(0..t * h),
            h: b.h,
            q: b.q,
            attn: b.attn,
            act: b.act,
            ids: b.ids,
            weights: b.weights,
            logits: b.logits,
            sampled: b.argmax,
            kv,
            scratch: Scratch {
                qkv: b.qkv,
                attn: b.attn_scratch,
                attn_row: DPtr::null(),
                router_logits: b.router_logits,
                route_counter: b.route_counter,
                moe: b.moe_scratch,
                y: b.y,
                gu: b.gu,
                dense_act: None,
                argmax: b.argmax_scratch,
                ctx: DPtr::null(),
                partial: b.partial,
            },
        };
        let captures = Captures {
            indices: &self.capture,
            dst: b.hidden,
            stride: MAX_TOKENS * h,
        };
        let stream = &m.stream;
        self.model
            .lowering()
            .encode(&plan, &bind, &captures, &mut |label| {
                if trace {
                    stream.synchronize()?;
                }
                mark(label)
            })
    }

    pub(crate) fn logits_rows(&self, t: usize) -> Result<Vec<Vec<f32>>, RuntimeError> {
        let v = self.model.inner.config.vocab_size;
        let all = dtoh(&self.model.inner.stream, self.b.logits.slice(0..t * v))?;
        Ok(all.chunks_exact(v).map(<[f32]>::to_vec).collect())
    }

    /// Runs `tokens` in passes of at most MAX_TOKENS; the last pass computes logits. On error the
    /// session is restored to its length before the call.
    fn run(&mut self, tokens: &[u32]) -> Result<usize, RuntimeError> {
        self.check_tokens(tokens)?;
        let start = self.len;
        let n = tokens.chunks(MAX_TOKENS).len();
        for (i, c) in tokens.chunks(MAX_TOKENS).enumerate() {
            let logits = if i + 1 == n {
                Logits::All
            } else {
                Logits::None
            };
            if let Err(e) = self.pass(c, logits) {
                self.restore_len(start);
                return Err(e);
            }
        }
        Ok(tokens.len() - (n - 1) * MAX_TOKENS)
    }

    /// Appends `tokens` and returns the logits of the last one.
    pub fn prefill(&mut self, tokens: &[u32]) -> Result<Vec<f32>, RuntimeError> {
        let last = self.run(tokens)?;
        Ok(self.logits_rows(last)?.pop().expect("one row"))
    }

    /// Appends `tokens` and returns the greedy next token (argmax of the last logits, computed on
    /// the device; only 4 bytes come back).
    pub fn prefill_greedy(&mut self, tokens: &[u32]) -> Result<u32, RuntimeError> {
        let last = self.run(tokens)?;
        let ids = dtoh(&self.model.inner.stream, self.b.argmax.slice(0..last))?;
        Ok(ids[last - 1])
    }

    /// Appends one token; returns its logits.
    pub fn decode(&mut self, token: u32) -> Result<Vec<f32>, RuntimeError> {
        self.prefill(&[token])
    }

    /// Appends one token; returns the greedy next token.
    pub fn decode_greedy(&mut self, token: u32) -> Result<u32, RuntimeError> {
        self.prefill_greedy(&[token])
    }

    /// Appends one token; samples the next one on the device with `p`, driven by `uniform` in
    /// [0, 1) (the caller's seeded RNG), and returns it.
    pub fn decode_sample(
        &mut self,
        token: u32,
        p: &SampleArgs,
        uniform: f32,
    ) -> Result<u32, RuntimeError> {
        self.run(&[token])?;
        self.sample_last(p, uniform, 0)
    }

    /// Samples from the logits row `row` of the latest pass.
    pub fn sample_last(
        &mut self,
        p: &SampleArgs,
        uniform: f32,
        row: usize,
    ) -> Result<u32, RuntimeError> {
        let m = &*self.model.inner;
        let v = m.config.vocab_size;
        if row >= MAX_TOKENS {
            return Err(RuntimeError::Invalid(format!(
                "sample_last: row {row} (a pass has at most {MAX_TOKENS})"
            )));
        }
        if self.sample_scratch.is_null() {
            self.sample_scratch = self
                .arena
                .alloc(crate::ops::sample_scratch_len(v), "sampling scratch")?;
        }
        htod(&m.stream, &[uniform], self.b.sample_uniform)?;
        m.ops.sample(
            &m.stream,
            self.b.logits.slice(row * v..(row + 1) * v),
            v,
            p,
            self.b.sample_uniform,
            self.sample_scratch,
            self.b.sample_out,
        )?;
        Ok(dtoh(&m.stream, self.b.sample_out)?[0])
    }

    /// Runs a block of tokens (causal inside the block; passes of ≤ MAX_TOKENS) and returns the
    /// logits of every token and the requested hidden states (indices as
    /// the CPU's `cpu::Session::verify`). Follow with [`GpuSession::truncate`] to drop rejected
    /// tokens.
    pub fn verify(
        &mut self,
        tokens: &[u32],
        hidden_layers: &[usize],
    ) -> Result<VerifyOutput, RuntimeError> {
        self.check_tokens(tokens)?;
        self.set_capture(hidden_layers)?;
        let h = self.model.inner.config.hidden_size;
        let start = self.len;
        let mut out = VerifyOutput {
            logits: Vec::with_capacity(tokens.len()),
            hidden: vec![Vec::with_capacity(tokens.len()); hidden_layers.len()],
        };
        for c in tokens.chunks(MAX_TOKENS) {
            if let Err(e) = self.pass(c, Logits::All) {
                self.restore_len(start);
                return Err(e);
            }
            out.logits.extend(self.logits_rows(c.len())?);
            if !hidden_layers.is_empty() {
                let all = dtoh(
                    &self.model.inner.stream,
                    self.b.hidden.slice(0..hidden_layers.len() * MAX_TOKENS * h),
                )?;
                for (slot, dst) in out.hidden.iter_mut().enumerate() {
                    let rows = &all[slot * MAX_TOKENS * h..slot * MAX_TOKENS * h + c.len() * h];
                    dst.extend(rows.chunks_exact(h).map(<[f32]>::to_vec));
                }
            }
        }
        Ok(out)
    }

    /// Runs a block and returns the greedy choice after each token (argmax on the device).
    pub fn verify_greedy(&mut self, tokens: &[u32]) -> Result<Vec<u32>, RuntimeError> {
        self.check_tokens(tokens)?;
        let mut out = Vec::with_capacity(tokens.len());
        let start = self.len;
        for c in tokens.chunks(MAX_TOKENS) {
            if let Err(e) = self.pass(c, Logits::All) {
                self.restore_len(start);
                return Err(e);
            }
            out.extend(dtoh(
                &self.model.inner.stream,
                self.b.argmax.slice(0..c.len()),
            )?);
        }
        Ok(out)
    }

    /// The hidden states captured by the latest pass (see [`GpuSession::set_capture`]): slot `i`
    /// (the `i`-th requested index) holds `[t, H]` rows on the device, valid until the next pass.
    pub fn captured_hidden(&self, slot: usize, t: usize) -> DPtr<f32> {
        let h = self.model.inner.config.hidden_size;
        assert!(
            slot < self.capture.len() && t <= MAX_TOKENS,
            "captured_hidden({slot}, {t})"
        );
        self.b
            .hidden
            .slice(slot * MAX_TOKENS * h..slot * MAX_TOKENS * h + t * h)
    }

    /// Writes `rows` rows of context features into the capture slots, as if the latest pass had
    /// captured them: `features` is `[rows, K·H]`, row `j` the `K` captured states of token `j`
    /// one after another (slot 0's, slot 1's, … — the layout a drafter's context takes). A
    /// drafter context rebuilt from cached features reads them ([`GpuSession::captured_hidden`]).
    pub fn write_captured(&mut self, features: &[f32], rows: usize) -> Result<(), RuntimeError> {
        let h = self.model.inner.config.hidden_size;
        let k = self.capture.len();
        if rows == 0 || rows > MAX_TOKENS {
            return Err(RuntimeError::Invalid(format!(
                "write_captured: {rows} rows (1..={MAX_TOKENS})"
            )));
        }
        if k == 0 || features.len() != rows * k * h {
            return Err(RuntimeError::Invalid(format!(
                "write_captured: {} values for {rows} rows of {k} captured states of {h}",
                features.len()
            )));
        }
        let stream = self.model.inner.stream.clone();
        for slot in 0..k {
            let part: Vec<f32> = features
                .chunks_exact(k * h)
                .flat_map(|row| &row[slot * h..(slot + 1) * h])
                .copied()
                .collect();
            let at = slot * MAX_TOKENS * h;
            htod(&stream, &part, self.b.hidden.slice(at..at + rows * h))?;
        }
        Ok(())
    }

    /// Runs a block like [`GpuSession::verify_greedy`] but leaves the logits and the captured
    /// hidden states on the device (no copy back): [`GpuSession::logits_device`] and
    /// [`GpuSession::captured_hidden`] read them. `tokens.len() ≤ MAX_TOKENS`.
    pub fn forward_device(&mut self, tokens: &[u32]) -> Result<(), RuntimeError> {
        self.check_tokens(tokens)?;
        if tokens.len() > MAX_TOKENS {
            return Err(RuntimeError::Invalid(format!(
                "forward_device takes at most {MAX_TOKENS} tokens"
            )));
        }
        self.pass(tokens, Logits::All)
    }

    /// The `[t, V]` logits of the latest pass, on the device.
    pub fn logits_device(&self, t: usize) -> DPtr<f32> {
        let v = self.model.inner.config.vocab_size;
        self.b.logits.slice(0..t.min(MAX_TOKENS) * v)
    }

    /// The greedy choices (`[t]` argmax of the logits) of the latest pass, on the device.
    pub fn argmax_device(&self, t: usize) -> DPtr<u32> {
        self.b.argmax.slice(0..t.min(MAX_TOKENS))
    }

    /// The routing (`[T, top_k]` expert ids) of the last MoE layer in the latest pass (for
    /// benchmarks that count distinct experts).
    pub fn last_routing(&self, t: usize) -> Result<Vec<i32>, RuntimeError> {
        let k = self.model.inner.config.top_k;
        dtoh(
            &self.model.inner.stream,
            self.b.ids.slice(0..t.min(MAX_TOKENS) * k),
        )
    }

    /// Drops every position ≥ `len`. Exact whenever it succeeds. Full-attention layers never
    /// limit it; sliding layers keep a ring of `window + MAX_TOKENS + max_rollback` positions, so
    /// truncation reaches back `max_rollback` positions from the furthest position ever written
    /// (deeper: an error, nothing changed). `len == 0` always works.
    pub fn truncate(&mut self, len: usize) -> Result<(), RuntimeError> {
        if len > self.len {
            return Err(RuntimeError::Invalid(format!(
                "cannot truncate to {len}: the session holds {} positions",
                self.len
            )));
        }
        if len == 0 {
            self.reset();
            return Ok(());
        }
        if let Some(p) = &mut self.paged {
            // No ring: every position stays until truncated away.
            p.truncate(len);
            self.len = len;
            return Ok(());
        }
        let layout = &self.model.inner.layout;
        for (l, (tables, kv)) in layout.layers.iter().zip(&self.kv).enumerate() {
            if let Some(window) = tables.window {
                // Positions ≥ len − window + 1 must still be in the ring: none of them may have
                // been overwritten by a position up to high_water − 1.
                if self.high_water > len + kv.capacity - window {
                    return Err(RuntimeError::Invalid(format!(
                        "cannot truncate to {len}: layer {l} (sliding window {window}) keeps \
                         {} positions and position {} was written; truncation is exact up to \
                         max_rollback positions back",
                        kv.capacity,
                        self.high_water - 1
                    )));
                }
            }
        }
        self.len = len;
        Ok(())
    }

    /// Empties the sequence (a paged session gives its blocks back).
    pub fn reset(&mut self) {
        self.len = 0;
        self.high_water = 0;
        if let Some(p) = &mut self.paged {
            p.truncate(0);
        }
    }

    /// Back to `len` positions after a failed call (a paged session gives back the blocks the
    /// call took past it).
    fn restore_len(&mut self, len: usize) {
        self.len = len;
        if let Some(p) = &mut self.paged {
            p.truncate(len);
        }
    }

    /// Makes a paged session own the blocks the next `t` positions are written to (see
    /// [`paged`]); nothing for a contiguous session.
    fn prepare_blocks(&mut self, t: usize) -> Result<(), RuntimeError> {
        match &mut self.paged {
            Some(p) => p.prepare(self.len, self.len + t),
            None => Ok(()),
        }
    }

    /// The block pool of a paged session.
    pub fn kv_pool(&self) -> Option<&GpuKvPool> {
        self.paged.as_ref().map(|p| p.pool())
    }

    /// KV blocks a paged session holds (0 for a contiguous one).
    pub fn kv_blocks_held(&self) -> usize {
        self.paged.as_ref().map_or(0, |p| p.held())
    }

    /// Block `b` (positions `b·block_size ..`) of a paged session, shared, when it is full and
    /// holds what a prefill of the same tokens would hold (computed by full passes of
    /// `MAX_TOKENS` tokens at multiples of `MAX_TOKENS`; see [`paged`]).
    pub fn full_block(&self, b: usize) -> Option<SharedKvBlock> {
        self.paged.as_ref()?.full_block(b, self.len)
    }

    /// Makes an empty paged session hold `blocks` (full blocks of sessions of the same pool,
    /// from [`GpuSession::full_block`]) as its first positions, shared, as if it had prefilled
    /// them: the next pass continues at `blocks.len() · block_size`. All or nothing.
    pub fn adopt_prefix(&mut self, blocks: &[SharedKvBlock]) -> Result<(), RuntimeError> {
        let Some(p) = &mut self.paged else {
            return Err(RuntimeError::Invalid(
                "adopt_prefix: this session's KV cache is not paged".into(),
            ));
        };
        if self.len != 0 {
            return Err(RuntimeError::Invalid(
                "adopt_prefix: the session is not empty".into(),
            ));
        }
        let len = p.adopt(blocks)?;
        self.len = len;
        self.high_water = len;
        Ok(())
    }

    /// A new paged session holding what this one holds, sharing its blocks (each copied when
    /// either session writes to it). Needs a paged session.
    pub fn fork(&self) -> Result<GpuSession, RuntimeError> {
        let Some(p) = &self.paged else {
            return Err(RuntimeError::Invalid(
                "fork: this session's KV cache is not paged".into(),
            ));
        };
        let mut s = self.model.session_paged(p.pool(), self.max_seq)?;
        if let Some(q) = &mut s.paged {
            p.share_into(q)?;
        }
        s.len = self.len;
        s.high_water = self.len;
        s.set_capture(&self.capture)?;
        s.use_graphs = self.use_graphs;
        s.batch = self.batch.clone();
        Ok(s)
    }

    /// Runs one pass of `tokens` with a timing event after each launch and returns the time of
    /// each (milliseconds, in launch order, labelled as [`OpTimes`] says). With graphs on (the default) the pass and its events
    /// are captured into a one-off graph and replayed — the timing of a graph replay; otherwise
    /// ops are launched one by one. The session advances as by a normal pass.
    pub fn profile_pass(&mut self, tokens: &[u32]) -> Result<OpTimes, RuntimeError> {
        self.check_tokens(tokens)?;
        if tokens.len() > MAX_TOKENS {
            return Err(RuntimeError::Invalid(format!(
                "a profiled pass takes at most {MAX_TOKENS} tokens"
            )));
        }
        self.prepare_blocks(tokens.len())?;
        let stream = self.model.inner.stream.clone();
        let mut io = vec![self.len as u32];
        io.extend_from_slice(tokens);
        htod(&stream, &io, self.b.io.slice(0..io.len()))?;
        stream.synchronize()?;
        let mut events: Vec<(&'static str, CudaEvent)> = Vec::new();
        if self.use_graphs {
            stream.begin_capture(CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL)?;
        }
        let capturing = self.use_graphs;
        let first = timing_event(&stream, capturing);
        let r = first.and_then(|first| {
            let r = self.encode(tokens.len(), Logits::All, None, &mut |label| {
                events.push((label, timing_event(&stream, capturing)?));
                Ok(())
            });
            r.map(|()| first)
        });
        let first = if self.use_graphs {
            let g = stream.end_capture(CUgraphInstantiate_flags(0));
            let first = r?;
            let g =
                g?.ok_or_else(|| RuntimeError::Invalid("graph capture produced nothing".into()))?;
            g.launch()?;
            stream.synchronize()?;
            first
        } else {
            let first = r?;
            stream.synchronize()?;
            first
        };
        self.len += tokens.len();
        self.high_water = self.high_water.max(self.len);
        let mut out = Vec::with_capacity(events.len());
        let mut prev = &first;
        for (label, e) in &events {
            out.push((*label, prev.elapsed_ms(e)?));
            prev = e;
        }
        Ok(out)
    }
}

/// A timing event recorded on `stream`. Inside a graph capture (`capturing`) it becomes an
/// event-record node (`CU_EVENT_RECORD_EXTERNAL`: a plain record during capture only orders work
/// and is never timestamped); outside a capture it is a plain record (the external flag is
/// valid only during a capture: op-by-op profiles failed with it).
fn timing_event(stream: &CudaStream, capturing: bool) -> Result<CudaEvent, RuntimeError> {
    use cudarc::driver::sys::CUevent_record_flags as F;
    let event = stream
        .context()
        .new_event(Some(CUevent_flags::CU_EVENT_DEFAULT))?;
    let flags = if capturing {
        F::CU_EVENT_RECORD_EXTERNAL
    } else {
        F::CU_EVENT_RECORD_DEFAULT
    };
    // SAFETY: both handles are live; the flag is a valid CUevent_record_flags value.
    unsafe {
        cudarc::driver::sys::cuEventRecordWithFlags(
            event.cu_event(),
            stream.cu_stream(),
            flags as u32,
        )
    }
    .result()?;
    Ok(event)
}
