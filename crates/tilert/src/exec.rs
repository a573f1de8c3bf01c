//! The op-by-op GPU executor: a model's weights uploaded once ([`GpuModel`]) and sequences
//! ([`GpuSession`]) whose passes run one kernel per op, captured as a CUDA graph per pass size
//! and replayed.
//!
//! A pass over `T ≤ MAX_TOKENS` tokens (decode: T = 1; verify: 2..=16; prefill: chunks of 16)
//! is this sequence of launches, the same math as the CPU's `cpu::run_pass`:
//!
//! ```text
//! embed → rms_norm(input_norm₀)
//! per layer: qkv linear (+bias) → rope_kv_write → attention → o linear (+bias, += residual)
//!            → rms_norm(post_attn_norm)
//!            → MoE: router linear (+bias) → route → experts gate_up+GLU → experts down·weight
//!                   → combine (+= residual)
//!              dense: gate_up linear → glu → down linear (+= residual)
//!            → rms_norm(next input_norm, or the final norm)
//! lm_head linear → argmax
//! ```
//!
//! Everything that changes between steps (token ids, the start position) lives in a small device
//! buffer written before each replay, so one captured graph per `(T, logits)` serves every step.
//! Hidden states asked for by a speculative drafter are copied out inside the pass (the capture
//! set is part of the session; changing it drops the captured graphs).
//!
//! [`GpuBatch`] runs the same pass with one row per session (batched decode; see its module).

use std::collections::HashMap;
use std::sync::Arc;

use cudarc::driver::sys::{CUevent_flags, CUgraphInstantiate_flags, CUstreamCaptureMode};
use cudarc::driver::{CudaEvent, CudaGraph, CudaStream};

use model::config::{Activation, AttnKind, ModelConfig, RouterSpec};
use model::weights::{Linear, Mlp, Weights};
use model::{RopeTable, LAST_LAYER_PRE_NORM};

use crate::arena::{dtoh, htod, Arena, DPtr};
use crate::moe::{DeviceMoe, MoeKernels};
use crate::ops::{AttnArgs, GluArgs, Ops, RouteArgs, SampleArgs, ARGMAX_SCRATCH, MAX_TOKENS};
use crate::tensor::DeviceMatrix;
use crate::{Device, RuntimeError};

mod batch;
mod executor;
pub use batch::GpuBatch;

/// Default truncation depth a [`GpuSession`] keeps exact (as the CPU executor's).
pub const DEFAULT_MAX_ROLLBACK: usize = model::DEFAULT_MAX_ROLLBACK;
/// Bump-chunk size of a session's arena: a session reserves at most this much beyond its use
/// (its large buffers, such as full-attention KV caches, get chunks of their own).
pub(crate) const SESSION_CHUNK_BYTES: usize = 16 << 20;

/// One RoPE table on the device ([`model::RopeTable`]).
#[derive(Debug, Clone, Copy)]
pub(crate) struct Rope {
    pub(crate) inv_freq: DPtr<f32>,
    pub(crate) attention_factor: f32,
    pub(crate) rotary_dim: usize,
}

enum GpuMlp {
    Dense {
        gate_up: DeviceMatrix,
        gate_up_bias: Option<DPtr<f32>>,
        down: DeviceMatrix,
        down_bias: Option<DPtr<f32>>,
    },
    Moe {
        router: DeviceMatrix,
        router_bias: Option<DPtr<f32>>,
        route: RouteArgs,
        experts: DeviceMoe,
    },
}

struct GpuLayer {
    input_norm: DPtr<f32>,
    post_attn_norm: DPtr<f32>,
    /// `[q; k; v]` rows fused into one matrix.
    qkv: DeviceMatrix,
    qkv_bias: Option<DPtr<f32>>,
    /// `qkv` is in `ops::rope_pair_order` and the step runs `Ops::linear_qkv_rope` (RoPE and
    /// the KV write fused into the projection) instead of `linear` + `rope_kv_write`.
    qkv_rope_fused: bool,
    o: DeviceMatrix,
    o_bias: Option<DPtr<f32>>,
    q_norm: Option<DPtr<f32>>,
    k_norm: Option<DPtr<f32>>,
    sinks: Option<DPtr<f32>>,
    rope: usize,
    mlp: GpuMlp,
}

struct Inner {
    device: Device,
    stream: Arc<CudaStream>,
    ops: Ops,
    moe: MoeKernels,
    config: Arc<ModelConfig>,
    embed: DeviceMatrix,
    lm_head: DeviceMatrix,
    final_norm: DPtr<f32>,
    layers: Vec<GpuLayer>,
    ropes: Vec<Rope>,
    glu: GluArgs,
    weight_bytes: usize,
    /// Owns every weight allocation (dropped last).
    _arena: Arena,
}

/// A model resident on one GPU. Cheap to clone (shared); create sessions with
/// [`GpuModel::session`].
#[derive(Clone)]
pub struct GpuModel {
    inner: Arc<Inner>,
}

fn glu_args(a: Activation) -> GluArgs {
    match a {
        Activation::ClampedSwiglu { alpha, limit } => GluArgs::ClampedSwiglu { alpha, limit },
        Activation::Swiglu => GluArgs::Swiglu,
    }
}

fn route_args(spec: RouterSpec, correction_bias: Option<DPtr<f32>>) -> RouteArgs {
    match spec {
        RouterSpec::GptOss => RouteArgs::GptOss,
        RouterSpec::Qwen3 { norm_topk_prob } => RouteArgs::Qwen3 { norm_topk_prob },
        RouterSpec::Sigmoid {
            n_group,
            topk_group,
            norm_topk_prob,
            routed_scaling_factor,
        } => RouteArgs::Sigmoid {
            correction_bias,
            n_group,
            topk_group,
            norm_topk_prob,
            routed_scaling_factor,
        },
    }
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
    let qkv = DeviceMatrix::from_rows(arena, &[&a.q.w, &a.k.w, &a.v.w], rows, cols, pick, what)?;
    let bias = b
        .map(|b| arena.upload(&b, &format!("{what} bias")))
        .transpose()?;
    Ok((qkv, bias))
}

/// The rope pair order of a layer's QKV rows when the fused projection can serve it (no q/k
/// norm, even head and rotary dims, 16-byte weight rows), else `None`.
fn fused_qkv_order(
    spec: &model::config::LayerSpec,
    rotary_dim: usize,
    qk_norm: bool,
    cols: usize,
) -> Option<Vec<usize>> {
    if qk_norm || !cols.is_multiple_of(8) {
        return None;
    }
    crate::ops::rope_pair_order(
        spec.n_heads,
        spec.n_kv_heads,
        spec.head_dim,
        spec.v_head_dim,
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

/// Distinct RoPE tables and the table index of each layer.
fn rope_tables(config: &ModelConfig) -> (Vec<RopeTable>, Vec<usize>) {
    let mut specs: Vec<model::config::Rope> = Vec::new();
    let mut tables = Vec::new();
    let mut per_layer = Vec::new();
    for l in &config.layers {
        let i = match specs.iter().position(|r| *r == l.rope) {
            Some(i) => i,
            None => {
                specs.push(l.rope);
                tables.push(RopeTable::new(&l.rope));
                specs.len() - 1
            }
        };
        per_layer.push(i);
    }
    (tables, per_layer)
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
        let total = weights.stored_bytes() as u64;
        let mut done = 0u64;
        model::check_weights(&config, weights).map_err(|e| RuntimeError::Invalid(e.to_string()))?;
        let (device, stream, ops, moe) = open(ordinal)?;
        let mut arena = Arena::new(stream.clone());
        let (tables, per_layer) = rope_tables(&config);
        let ropes = upload_ropes(&mut arena, &tables)?;
        let mut layers = Vec::with_capacity(config.layers.len());
        for (l, (spec, lw)) in config.layers.iter().zip(&weights.layers).enumerate() {
            let at = |what: &str| format!("layer {l} {what}");
            let a = &lw.attn;
            let order = fused_qkv_order(
                spec,
                ropes[per_layer[l]].rotary_dim,
                a.q_norm.is_some() || a.k_norm.is_some(),
                a.q.w.cols,
            );
            let (qkv, qkv_bias) = upload_qkv(&mut arena, a, order.as_deref(), &at("qkv"))?;
            let (o, o_bias) = upload_linear(&mut arena, &a.o, &at("o_proj"))?;
            let mlp = match &lw.mlp {
                Mlp::Dense { gate_up, down } => {
                    let (gate_up, gate_up_bias) =
                        upload_linear(&mut arena, gate_up, &at("mlp gate_up"))?;
                    let (down, down_bias) = upload_linear(&mut arena, down, &at("mlp down"))?;
                    GpuMlp::Dense {
                        gate_up,
                        gate_up_bias,
                        down,
                        down_bias,
                    }
                }
                Mlp::Moe(m) => {
                    let (router, router_bias) =
                        upload_linear(&mut arena, &m.router, &at("router"))?;
                    let correction = upload_opt(
                        &mut arena,
                        m.correction_bias.as_ref(),
                        &at("correction bias"),
                    )?;
                    GpuMlp::Moe {
                        router,
                        router_bias,
                        route: route_args(config.router, correction),
                        experts: DeviceMoe::upload(&mut arena, m)?,
                    }
                }
            };
            layers.push(GpuLayer {
                input_norm: arena.upload(&lw.input_norm, &at("input norm"))?,
                post_attn_norm: arena.upload(&lw.post_attn_norm, &at("post-attention norm"))?,
                qkv,
                qkv_bias,
                qkv_rope_fused: order.is_some(),
                o,
                o_bias,
                q_norm: upload_opt(&mut arena, a.q_norm.as_ref(), &at("q norm"))?,
                k_norm: upload_opt(&mut arena, a.k_norm.as_ref(), &at("k norm"))?,
                sinks: upload_opt(&mut arena, a.sinks.as_ref(), &at("sinks"))?,
                rope: per_layer[l],
                mlp,
            });
            let _ = spec;
            lw.release_pages();
            done += lw.stored_bytes() as u64;
            progress(model::progress::Progress { done, total });
        }
        let embed = DeviceMatrix::from_mat(&mut arena, &weights.embed, "embedding")?;
        // Tied embeddings (known from the config): one device copy serves both.
        let lm_head = if config.tie_word_embeddings {
            embed
        } else {
            DeviceMatrix::from_mat(&mut arena, &weights.lm_head, "lm_head")?
        };
        let final_norm = arena.upload(&weights.final_norm, "final norm")?;
        weights.embed.bytes().release_pages();
        weights.lm_head.bytes().release_pages();
        progress(model::progress::Progress { done: total, total });
        Ok(Self::assemble(
            device, stream, ops, moe, config, embed, lm_head, final_norm, layers, ropes, arena,
        ))
    }

    /// A model of `config`'s shape with random weights generated on the device (no checkpoint,
    /// nothing large on the host): bf16 dense weights of standard deviation ~1/sqrt(K), MXFP4
    /// experts from [`DeviceMoe::synthetic`]. Every MoE layer must be gpt-oss style (the
    /// benchmark's model); dense-MLP layers are rejected.
    pub fn synthetic(
        ordinal: usize,
        config: Arc<ModelConfig>,
        seed: u64,
    ) -> Result<Self, RuntimeError> {
        let (device, stream, ops, moe) = open(ordinal)?;
        let mut arena = Arena::new(stream.clone());
        let (tables, per_layer) = rope_tables(&config);
        let ropes = upload_ropes(&mut arena, &tables)?;
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
            DeviceMatrix::synthetic(arena, &ops, rows, cols, next_seed(), what)
        };
        let small = crate::tensor::patterned_vector;
        let mut layers = Vec::with_capacity(config.layers.len());
        for (l, spec) in config.layers.iter().enumerate() {
            if !spec.moe {
                return Err(RuntimeError::Unsupported(format!(
                    "synthetic models need MoE layers everywhere (layer {l} is dense)"
                )));
            }
            let at = |what: &str| format!("layer {l} {what}");
            let (nh, nkv, d, dv) = (
                spec.n_heads,
                spec.n_kv_heads,
                spec.head_dim,
                spec.v_head_dim,
            );
            let rows = nh * d + nkv * d + nkv * dv;
            let qkv = dense(&mut arena, rows, h, &at("qkv"))?;
            let qkv_bias = if spec.attn_bias {
                Some(small(&mut arena, rows, 0.0, 0.1, &at("qkv bias"))?)
            } else {
                None
            };
            let o = dense(&mut arena, h, nh * dv, &at("o_proj"))?;
            let o_bias = if spec.attn_bias {
                Some(small(&mut arena, h, 0.0, 0.1, &at("o bias"))?)
            } else {
                None
            };
            let router = dense(&mut arena, config.n_experts, h, &at("router"))?;
            let gpt_oss = matches!(config.router, RouterSpec::GptOss);
            let router_bias = if gpt_oss {
                Some(small(
                    &mut arena,
                    config.n_experts,
                    0.0,
                    0.1,
                    &at("router bias"),
                )?)
            } else {
                None
            };
            let experts = DeviceMoe::synthetic(
                &mut arena,
                &ops,
                config.n_experts,
                h,
                config.moe_intermediate_size,
                gpt_oss,
                next_seed(),
            )?;
            // Random rows: any order is as good as the rope pair order.
            let qkv_rope_fused =
                fused_qkv_order(spec, ropes[per_layer[l]].rotary_dim, spec.qk_norm, h).is_some();
            layers.push(GpuLayer {
                input_norm: small(&mut arena, h, 1.0, 0.1, &at("input norm"))?,
                post_attn_norm: small(&mut arena, h, 1.0, 0.1, &at("post-attention norm"))?,
                qkv,
                qkv_bias,
                qkv_rope_fused,
                o,
                o_bias,
                q_norm: if spec.qk_norm {
                    Some(small(&mut arena, d, 1.0, 0.1, &at("q norm"))?)
                } else {
                    None
                },
                k_norm: if spec.qk_norm {
                    Some(small(&mut arena, d, 1.0, 0.1, &at("k norm"))?)
                } else {
                    None
                },
                sinks: if spec.sinks {
                    Some(small(&mut arena, nh, 0.0, 0.5, &at("sinks"))?)
                } else {
                    None
                },
                rope: per_layer[l],
                mlp: GpuMlp::Moe {
                    router,
                    router_bias,
                    route: route_args(config.router, None),
                    experts,
                },
            });
        }
        // The embedding is only gathered; the LM head is read whole every step.
        let embed = dense(&mut arena, config.vocab_size, h, "embedding")?;
        let lm_head = dense(&mut arena, config.vocab_size, h, "lm_head")?;
        let final_norm = small(&mut arena, h, 1.0, 0.1, "final norm")?;
        stream.synchronize()?;
        Ok(Self::assemble(
            device, stream, ops, moe, config, embed, lm_head, final_norm, layers, ropes, arena,
        ))
    }

    #[allow(clippy::too_many_arguments)]
    fn assemble(
        device: Device,
        stream: Arc<CudaStream>,
        ops: Ops,
        moe: MoeKernels,
        config: Arc<ModelConfig>,
        embed: DeviceMatrix,
        lm_head: DeviceMatrix,
        final_norm: DPtr<f32>,
        layers: Vec<GpuLayer>,
        ropes: Vec<Rope>,
        arena: Arena,
    ) -> Self {
        let weight_bytes = arena.used_bytes();
        Self {
            inner: Arc::new(Inner {
                device,
                stream,
                ops,
                moe,
                glu: glu_args(config.activation),
                config,
                embed,
                lm_head,
                final_norm,
                layers,
                ropes,
                weight_bytes,
                _arena: arena,
            }),
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
        &self.inner.embed
    }

    /// The LM head `[V, H]` on the device (drafters borrow it).
    pub fn lm_head_matrix(&self) -> &DeviceMatrix {
        &self.inner.lm_head
    }

    /// Bytes of weights resident on the device.
    pub fn weight_bytes(&self) -> usize {
        self.inner.weight_bytes
    }

    /// Weight bytes one decode step reads: every dense matrix of the layers, the LM head, and
    /// `top_k` experts per MoE layer (the embedding is gathered, one row per token).
    pub fn decode_bytes_per_token(&self) -> usize {
        self.step_weight_bytes(self.inner.config.top_k)
    }

    /// Weight bytes a pass reads when `distinct` experts per MoE layer are selected.
    pub fn step_weight_bytes(&self, distinct: usize) -> usize {
        let mut b = self.inner.lm_head.bytes();
        for l in &self.inner.layers {
            b += l.qkv.bytes() + l.o.bytes();
            match &l.mlp {
                GpuMlp::Dense { gate_up, down, .. } => b += gate_up.bytes() + down.bytes(),
                GpuMlp::Moe {
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

pub(crate) fn upload_ropes(
    arena: &mut Arena,
    tables: &[RopeTable],
) -> Result<Vec<Rope>, RuntimeError> {
    tables
        .iter()
        .map(|t| {
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
enum Logits {
    /// No LM head (inner prefill chunks).
    None,
    /// LM head over every token of the pass + argmax.
    All,
}

struct Buffers {
    /// `[start, tok_0 .. tok_{MAX_TOKENS-1}]`, written before every pass.
    io: DPtr<u32>,
    x: DPtr<f32>,
    h: DPtr<f32>,
    qkv: DPtr<f32>,
    q: DPtr<f32>,
    attn: DPtr<f32>,
    attn_scratch: DPtr<f32>,
    router_logits: DPtr<f32>,
    ids: DPtr<i32>,
    weights: DPtr<f32>,
    act: DPtr<f32>,
    y: DPtr<f32>,
    moe_scratch: DPtr<f32>,
    /// Dense MLPs: `[T, 2I]` and `[T, I]`.
    gu: DPtr<f32>,
    logits: DPtr<f32>,
    argmax: DPtr<u32>,
    /// [`ARGMAX_SCRATCH`] words for the multi-block argmax (its counters start at zero).
    argmax_scratch: DPtr<u32>,
    /// The fused router's last-block counter (zero between launches).
    route_counter: DPtr<u32>,
    /// Captured hidden states, one `[MAX_TOKENS, H]` slot per requested index.
    hidden: DPtr<f32>,
    sample_uniform: DPtr<f32>,
    sample_out: DPtr<u32>,
}

struct LayerKv {
    k: DPtr<f32>,
    v: DPtr<f32>,
    capacity: usize,
}

/// Per-op labels of a profiled pass (see [`GpuSession::profile_pass`]).
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
    max_keys: usize,
    /// Hidden indices (as the CPU's `cpu::Session::verify`) copied out by every pass.
    capture: Vec<usize>,
    graphs: HashMap<(usize, Logits), CudaGraph>,
    use_graphs: bool,
}

impl GpuSession {
    fn new(model: GpuModel, max_seq: usize, max_rollback: usize) -> Result<Self, RuntimeError> {
        let m = &*model.inner;
        let cfg = &*m.config;
        if max_seq == 0 {
            return Err(RuntimeError::Invalid("max_seq must be positive".into()));
        }
        let mut arena = Arena::with_chunk_bytes(m.stream.clone(), SESSION_CHUNK_BYTES);
        let t = MAX_TOKENS;
        let h = cfg.hidden_size;
        let mut kv = Vec::with_capacity(cfg.layers.len());
        let mut max_keys = 0;
        let mut attn_scratch = 0;
        let (mut qkv_w, mut q_w, mut attn_w) = (0, 0, 0);
        for (l, (spec, layer)) in cfg.layers.iter().zip(&m.layers).enumerate() {
            let capacity = match spec.attn {
                AttnKind::Full => max_seq,
                AttnKind::Sliding { window } => (window + MAX_TOKENS + max_rollback).min(max_seq),
            };
            let keys = match spec.attn {
                AttnKind::Full => max_seq,
                AttnKind::Sliding { window } => (window + MAX_TOKENS).min(max_seq),
            };
            max_keys = max_keys.max(keys);
            let (nkv, d, dv) = (spec.n_kv_heads, spec.head_dim, spec.v_head_dim);
            let lk = LayerKv {
                k: arena.alloc(capacity * nkv * d, &format!("layer {l} key cache"))?,
                v: arena.alloc(capacity * nkv * dv, &format!("layer {l} value cache"))?,
                capacity,
            };
            let args = attn_args(m, spec, layer, &lk);
            // Fewer queries get more key splits: the largest need is not always at T = 16.
            for rows in 1..=t {
                attn_scratch = attn_scratch.max(Ops::attention_scratch_len(&args, rows, keys));
            }
            kv.push(lk);
            qkv_w = qkv_w.max(layer.qkv.rows);
            q_w = q_w.max(spec.n_heads * d);
            attn_w = attn_w.max(spec.n_heads * dv);
        }
        let (ne, k) = (cfg.n_experts.max(1), cfg.top_k.max(1));
        let mut moe_scratch = 0;
        let mut inter = 0;
        for layer in &m.layers {
            match &layer.mlp {
                GpuMlp::Moe { experts, .. } => {
                    moe_scratch = moe_scratch.max(MoeKernels::scratch_len(experts, t, k));
                    inter = inter.max(experts.inter);
                }
                GpuMlp::Dense { down, .. } => inter = inter.max(down.cols),
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
            max_keys,
            capture: Vec::new(),
            graphs: HashMap::new(),
            // ULTRA_NO_GRAPHS=1: launch op by op (debugging; with ULTRA_TRACE_OPS=1 each op is
            // synchronized so a fault names its op).
            use_graphs: std::env::var("ULTRA_NO_GRAPHS").map_or(true, |v| v != "1"),
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

    /// The hidden indices every pass copies out (see [`GpuSession::set_capture`]).
    pub fn capture(&self) -> &[usize] {
        &self.capture
    }

    fn check_tokens(&self, tokens: &[u32]) -> Result<(), RuntimeError> {
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

    /// Enqueues one pass of `t` tokens (io buffer already written); `mark(label)` is called after
    /// each op's launch (profiling records an event there). An error names the op and layer it
    /// came from. With `ULTRA_TRACE_OPS=1` in the environment (and graphs off) every op is
    /// followed by a synchronization, so asynchronous faults are pinned to their op too. With
    /// `rows`, the pass is a batched decode ([`GpuBatch`]): row `t` is the next token of its own
    /// sequence, whose cache `rows` names (this session only lends its activation buffers).
    fn encode(
        &self,
        t: usize,
        logits: Logits,
        rows: Option<&batch::RowPass>,
        mark: &mut dyn FnMut(&'static str) -> Result<(), RuntimeError>,
    ) -> Result<(), RuntimeError> {
        let trace = !self.use_graphs && std::env::var("ULTRA_TRACE_OPS").is_ok_and(|v| v == "1");
        let stream = self.model.inner.stream.clone();
        let mut done = 0usize;
        let mut last = "start";
        let r = self.encode_ops(t, logits, rows, &mut |label| {
            done += 1;
            last = label;
            if trace {
                stream.synchronize()?;
            }
            mark(label)
        });
        r.map_err(|e| {
            let nl = self.model.inner.config.layers.len().max(1);
            RuntimeError::Op {
                pass: format!("pass of {t} tokens, op #{done} after `{last}` (~{nl} layers)"),
                source: Box::new(e),
            }
        })
    }

    fn encode_ops(
        &self,
        t: usize,
        logits: Logits,
        rows: Option<&batch::RowPass>,
        mark: &mut dyn FnMut(&'static str) -> Result<(), RuntimeError>,
    ) -> Result<(), RuntimeError> {
        let m = &*self.model.inner;
        let cfg = &*m.config;
        let s = &*m.stream;
        let b = &self.b;
        let (h, eps, nl) = (cfg.hidden_size, cfg.rms_norm_eps, cfg.layers.len());
        let step = b.io.slice(0..1);
        let tokens = b.io.slice(1..1 + t);
        let x = b.x.slice(0..t * h);
        m.ops.embed(s, &m.embed, tokens, t, x)?;
        mark("embed")?;
        self.capture_hidden(0, x, t)?;
        m.ops
            .rms_norm(s, x, m.layers[0].input_norm, t, h, eps, b.h)?;
        mark("norm")?;
        let k = cfg.top_k;
        for (l, (spec, layer)) in cfg.layers.iter().zip(&m.layers).enumerate() {
            let args = attn_args(m, spec, layer, &self.kv[l]);
            if let Some(rows) = rows {
                rows.attention(m, l, layer, &args, b, t, mark)?;
            } else {
                if layer.qkv_rope_fused {
                    m.ops.linear_qkv_rope(
                        s,
                        &layer.qkv,
                        layer.qkv_bias,
                        b.h,
                        t,
                        &args,
                        step,
                        b.q,
                    )?;
                    mark("qkv_rope_kv")?;
                } else {
                    m.ops
                        .linear(s, &layer.qkv, layer.qkv_bias, b.h, t, b.qkv, false)?;
                    mark("qkv")?;
                    m.ops.rope_kv_write(s, &args, b.qkv, t, step, b.q)?;
                    mark("rope_kv")?;
                }
                let keys = self.attention_keys(l);
                m.ops
                    .attention(s, &args, b.q, t, step, true, keys, b.attn_scratch, b.attn)?;
                mark("attention")?;
            }
            m.ops
                .linear(s, &layer.o, layer.o_bias, b.attn, t, x, true)?;
            mark("o_proj")?;
            // The layer's last op applies the next RMSNorm (fused into the MoE combine).
            let next_norm = if l + 1 < nl {
                m.layers[l + 1].input_norm
            } else {
                m.final_norm
            };
            match &layer.mlp {
                GpuMlp::Moe {
                    router,
                    router_bias,
                    route,
                    experts,
                } => {
                    let ne = experts.n_experts;
                    let fused = m.ops.router_route(
                        s,
                        router,
                        *router_bias,
                        x,
                        layer.post_attn_norm,
                        eps,
                        t,
                        route,
                        k,
                        b.h,
                        b.router_logits,
                        b.route_counter,
                        b.ids,
                        b.weights,
                    )?;
                    if fused {
                        mark("norm_router_route")?;
                    } else {
                        m.ops.rms_norm(s, x, layer.post_attn_norm, t, h, eps, b.h)?;
                        mark("norm")?;
                        m.ops
                            .linear(s, router, *router_bias, b.h, t, b.router_logits, false)?;
                        mark("router")?;
                        m.ops
                            .route(s, route, b.router_logits, t, ne, k, b.ids, b.weights)?;
                        mark("route")?;
                    }
                    m.moe
                        .gate_up(s, experts, m.glu, b.h, t, k, b.ids, b.moe_scratch, b.act)?;
                    mark("experts_gate_up")?;
                    m.moe.down(
                        s,
                        experts,
                        b.act,
                        t,
                        k,
                        b.ids,
                        b.weights,
                        b.moe_scratch,
                        b.y,
                    )?;
                    mark("experts_down")?;
                    m.ops
                        .combine(s, x, b.y, b.ids, t, k, h, Some((next_norm, eps, b.h)))?;
                    mark("combine_norm")?;
                    self.capture_hidden(next_capture(l, nl), x, t)?;
                }
                GpuMlp::Dense {
                    gate_up,
                    gate_up_bias,
                    down,
                    down_bias,
                } => {
                    let i = down.cols;
                    let gu = b.gu.slice(0..t * 2 * i);
                    let act = b.gu.slice(t * 2 * i..t * 3 * i);
                    m.ops.rms_norm(s, x, layer.post_attn_norm, t, h, eps, b.h)?;
                    mark("norm")?;
                    m.ops.linear(s, gate_up, *gate_up_bias, b.h, t, gu, false)?;
                    mark("mlp_gate_up")?;
                    m.ops.glu(s, m.glu, gu, t, i, act)?;
                    mark("glu")?;
                    m.ops.linear(s, down, *down_bias, act, t, x, true)?;
                    mark("mlp_down")?;
                    self.capture_hidden(next_capture(l, nl), x, t)?;
                    m.ops.rms_norm(s, x, next_norm, t, h, eps, b.h)?;
                    mark("norm")?;
                }
            }
        }
        self.capture_hidden(nl, b.h.slice(0..t * h), t)?;
        if logits == Logits::All {
            let v = cfg.vocab_size;
            m.ops
                .linear(s, &m.lm_head, None, b.h, t, b.logits.slice(0..t * v), false)?;
            mark("lm_head")?;
            m.ops
                .argmax(s, b.logits, t, v, b.argmax_scratch, b.argmax)?;
            mark("argmax")?;
        }
        Ok(())
    }

    /// The keys that size layer `l`'s attention splits (the session's size, or the window).
    fn attention_keys(&self, l: usize) -> usize {
        match self.model.inner.config.layers[l].attn {
            AttnKind::Full => self.max_keys.min(self.kv[l].capacity),
            AttnKind::Sliding { window } => (window + MAX_TOKENS).min(self.kv[l].capacity),
        }
    }

    fn capture_hidden(&self, idx: usize, rows: DPtr<f32>, t: usize) -> Result<(), RuntimeError> {
        let h = self.model.inner.config.hidden_size;
        for (slot, _) in self.capture.iter().enumerate().filter(|(_, &i)| i == idx) {
            let dst = self
                .b
                .hidden
                .slice(slot * MAX_TOKENS * h..slot * MAX_TOKENS * h + t * h);
            crate::arena::dtod(&self.model.inner.stream, rows.slice(0..t * h), dst)?;
        }
        Ok(())
    }

    fn logits_rows(&self, t: usize) -> Result<Vec<Vec<f32>>, RuntimeError> {
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
                self.len = start;
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
        htod(&m.stream, &[uniform], self.b.sample_uniform)?;
        m.ops.sample(
            &m.stream,
            self.b.logits.slice(row * v..(row + 1) * v),
            v,
            p,
            self.b.sample_uniform,
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
                self.len = start;
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
                self.len = start;
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
        let cfg = &*self.model.inner.config;
        for (l, (spec, kv)) in cfg.layers.iter().zip(&self.kv).enumerate() {
            if let AttnKind::Sliding { window } = spec.attn {
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

    /// Empties the sequence.
    pub fn reset(&mut self) {
        self.len = 0;
        self.high_water = 0;
    }

    /// Runs one pass of `tokens` with a timing event after each op and returns the time of each
    /// op (milliseconds, in launch order). With graphs on (the default) the pass and its events
    /// are captured into a one-off graph and replayed — the timing of a graph replay; otherwise
    /// ops are launched one by one. The session advances as by a normal pass.
    pub fn profile_pass(&mut self, tokens: &[u32]) -> Result<OpTimes, RuntimeError> {
        self.check_tokens(tokens)?;
        if tokens.len() > MAX_TOKENS {
            return Err(RuntimeError::Invalid(format!(
                "a profiled pass takes at most {MAX_TOKENS} tokens"
            )));
        }
        let stream = self.model.inner.stream.clone();
        let mut io = vec![self.len as u32];
        io.extend_from_slice(tokens);
        htod(&stream, &io, self.b.io.slice(0..io.len()))?;
        stream.synchronize()?;
        let mut events: Vec<(&'static str, CudaEvent)> = Vec::new();
        if self.use_graphs {
            stream.begin_capture(CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL)?;
        }
        let first = timing_event(&stream);
        let r = first.and_then(|first| {
            let r = self.encode(tokens.len(), Logits::All, None, &mut |label| {
                events.push((label, timing_event(&stream)?));
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

/// A timing event recorded on `stream`; inside a graph capture it becomes an event-record node
/// (`CU_EVENT_RECORD_EXTERNAL`: a plain record during capture only orders work and is never
/// timestamped).
fn timing_event(stream: &CudaStream) -> Result<CudaEvent, RuntimeError> {
    let event = stream
        .context()
        .new_event(Some(CUevent_flags::CU_EVENT_DEFAULT))?;
    // SAFETY: both handles are live; the flag is a valid CUevent_record_flags value.
    unsafe {
        cudarc::driver::sys::cuEventRecordWithFlags(
            event.cu_event(),
            stream.cu_stream(),
            cudarc::driver::sys::CUevent_record_flags::CU_EVENT_RECORD_EXTERNAL as u32,
        )
    }
    .result()?;
    Ok(event)
}

/// The hidden-state index of the residual after layer `l` of `nl` (as the CPU's `cpu::Session`).
fn next_capture(l: usize, nl: usize) -> usize {
    if l + 1 < nl {
        l + 1
    } else {
        LAST_LAYER_PRE_NORM
    }
}

fn attn_args(
    m: &Inner,
    spec: &model::config::LayerSpec,
    layer: &GpuLayer,
    kv: &LayerKv,
) -> AttnArgs {
    let rope = &m.ropes[layer.rope];
    AttnArgs {
        n_heads: spec.n_heads,
        n_kv_heads: spec.n_kv_heads,
        head_dim: spec.head_dim,
        v_head_dim: spec.v_head_dim,
        rotary_dim: rope.rotary_dim,
        inv_freq: rope.inv_freq,
        attention_factor: rope.attention_factor,
        q_norm: layer.q_norm,
        k_norm: layer.k_norm,
        eps: m.config.rms_norm_eps,
        value_scale: m.config.value_scale,
        k_cache: kv.k,
        v_cache: kv.v,
        capacity: kv.capacity,
        window: match spec.attn {
            AttnKind::Full => None,
            AttnKind::Sliding { window } => Some(window),
        },
        sinks: layer.sinks,
        scale: (1.0 / (spec.head_dim as f64).sqrt()) as f32,
    }
}
