//! Plans of a DFlash block drafter (research/dflash.md §2–3): the context-append pass (target
//! hidden features of committed tokens → every draft layer's context KV cache) and the
//! block-draft pass (`[x_last, MASK × (B−1)]` → draft logits of rows `1..B`).
//!
//! The drafter is described by [`DraftSpec`] (the model-level view of a drafter config; `dflash`
//! converts its `DrafterConfig` into one). Ops reuse the target's parameter structs
//! ([`QkvRopeParams`], [`OProjParams`], [`MlpGateUpParams`], [`MlpDownParams`], ...) so both
//! executors lower the same fused kernels; only the fused context projection
//! ([`ContextParams`]) and the block attention over `[context | block]`
//! ([`BlockAttentionParams`]) are drafter-specific.

use crate::config::{Activation, Rope};

use super::{
    attention_flops_rows, mlp_down_op, mlp_gate_up_op, norm_op, o_proj_op, push_head, qkv_op,
    AttnGeom, Buf, Builder, EmbedParams, LayerTables, Logits, MlpDownParams, MlpGateUpParams,
    NormParams, OProjParams, Op, OpKind, PassKind, PassShape, Placement, Plan, PlanError,
    QkvRopeParams, Tensor, WeightId, WeightStorage,
};

/// Attention pattern of one draft layer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DraftLayer {
    /// Sliding window over context + block keys (None: all of them).
    pub window: Option<usize>,
    /// Block query i sees block keys `0..=i` only.
    pub causal: bool,
}

/// What a plan needs to know about a drafter.
#[derive(Debug, Clone, PartialEq)]
pub struct DraftSpec {
    /// Hidden size (= the target's).
    pub hidden: usize,
    /// Dense MLP intermediate size.
    pub intermediate: usize,
    pub n_heads: usize,
    pub n_kv_heads: usize,
    pub head_dim: usize,
    pub eps: f32,
    pub rope: Rope,
    pub bias: bool,
    /// Per-head q/k RMSNorm (Qwen3 blocks).
    pub qk_norm: bool,
    pub sinks: bool,
    pub value_scale: f32,
    pub input_embedding_scale: f32,
    pub activation: Activation,
    pub layers: Vec<DraftLayer>,
    /// Width of the concatenated target features (`K · H_target`).
    pub features: usize,
    /// The target's vocabulary (the drafter borrows its embedding and LM head).
    pub vocab: usize,
}

/// Which drafter pass.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DraftPass {
    /// Append `n` committed tokens' features to the context caches.
    Context { n: usize },
    /// Draft one block of `b` rows (`b − 1` draft tokens).
    Block { b: usize },
}

/// `draft_context`: `ctx = hidden_norm(features · W_fcᵀ)` for each committed token (the draft
/// layers then project `ctx` into their context caches with k/v-only [`QkvRopeParams`]).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ContextParams {
    pub features: usize,
    pub hidden: usize,
    /// Draft layers whose caches the context feeds.
    pub layers: usize,
    pub eps: f32,
}

/// `draft_attention`: block queries over `[context cache | block keys]`; a window bounds the
/// keys per query, `causal` limits block keys to `0..=i`, sinks join the denominator.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BlockAttentionParams {
    pub geom: AttnGeom,
    pub window: Option<usize>,
    pub causal: bool,
    pub sinks: bool,
    pub scale: f32,
}

impl Plan {
    /// The plan of a drafter pass with `context` tokens already in its caches.
    pub fn draft(
        spec: &DraftSpec,
        storage: WeightStorage,
        pass: DraftPass,
        context: usize,
    ) -> Result<Plan, PlanError> {
        let (h, d) = (spec.hidden, storage.dense_bytes);
        if spec.n_kv_heads == 0 || !spec.n_heads.is_multiple_of(spec.n_kv_heads) {
            return Err(PlanError::Invalid(format!(
                "drafter: {} query heads do not group over {} KV heads",
                spec.n_heads, spec.n_kv_heads
            )));
        }
        let geom = AttnGeom {
            n_heads: spec.n_heads,
            n_kv_heads: spec.n_kv_heads,
            head_dim: spec.head_dim,
            v_head_dim: spec.head_dim,
        };
        let layers: Vec<LayerTables> = spec
            .layers
            .iter()
            .map(|l| LayerTables {
                rope: 0,
                window: l.window,
                k_width: geom.k_width(),
                v_width: geom.v_width(),
            })
            .collect();
        let qkv = |kv_only: bool| QkvRopeParams {
            geom,
            hidden: h,
            rope: 0,
            rotary_dim: spec.rope.rotary_dim,
            qk_norm: spec.qk_norm,
            bias: spec.bias,
            eps: spec.eps,
            value_scale: spec.value_scale,
            kv_only,
        };
        let norm = |tensor: Tensor, layer: Option<usize>| NormParams {
            weight: WeightId {
                tensor,
                layer,
                shard: None,
            },
            dim: h,
            eps: spec.eps,
        };
        let nl = spec.layers.len();
        let mut b = Builder::new();
        let shape = match pass {
            DraftPass::Context { n } => {
                if n == 0 {
                    return Err(PlanError::Invalid("a pass needs at least one row".into()));
                }
                b.push(Op {
                    kind: OpKind::DraftContext(ContextParams {
                        features: spec.features,
                        hidden: h,
                        layers: nl,
                        eps: spec.eps,
                    }),
                    layer: None,
                    placement: Placement::Replicated,
                    inputs: vec![Buf::Features],
                    outputs: vec![Buf::H],
                    weights: vec![
                        WeightId::model(Tensor::Fc),
                        WeightId::model(Tensor::HiddenNorm),
                    ],
                    weight_bytes: (spec.features * h + h) as f64 * d,
                    kv_bytes: 0.0,
                    flops: 2.0 * (n * spec.features * h) as f64,
                });
                for l in 0..nl {
                    b.push(qkv_op(l, qkv(true), 0, None, n, d));
                }
                PassShape {
                    kind: PassKind::DraftContext,
                    rows: n,
                    logits: Logits::None,
                    sample: false,
                    context,
                }
            }
            DraftPass::Block { b: rows } => {
                if rows < 2 {
                    return Err(PlanError::Invalid(format!(
                        "a draft block has at least 2 rows, got {rows}"
                    )));
                }
                b.push(Op {
                    kind: OpKind::Embed(EmbedParams {
                        vocab: spec.vocab,
                        hidden: h,
                        scale: spec.input_embedding_scale,
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
                b.push(norm_op(norm(Tensor::InputNorm, Some(0)), Some(0), rows, d));
                for (l, dl) in spec.layers.iter().enumerate() {
                    b.push(qkv_op(l, qkv(false), 0, None, rows, d));
                    let p = BlockAttentionParams {
                        geom,
                        window: dl.window,
                        causal: dl.causal,
                        sinks: spec.sinks,
                        scale: (1.0 / (spec.head_dim as f64).sqrt()) as f32,
                    };
                    let (flops, keys) = attention_flops_rows(&geom, dl.window, rows, |i| {
                        if dl.causal {
                            context + i + 1
                        } else {
                            context + rows
                        }
                    });
                    let mut weights = Vec::new();
                    if spec.sinks {
                        weights.push(WeightId::layer(Tensor::Sinks, l));
                    }
                    b.push(Op {
                        kind: OpKind::DraftAttention(p),
                        layer: Some(l),
                        placement: Placement::Replicated,
                        inputs: vec![Buf::Q(0), Buf::Kv { layer: l, rank: 0 }],
                        outputs: vec![Buf::Attn(0)],
                        weights,
                        weight_bytes: if spec.sinks {
                            spec.n_heads as f64 * d
                        } else {
                            0.0
                        },
                        kv_bytes: keys as f64
                            * (geom.k_width() + geom.v_width()) as f64
                            * storage.kv_bytes,
                        flops,
                    });
                    b.push(o_proj_op(
                        l,
                        OProjParams {
                            in_dim: geom.out_width(),
                            out_dim: h,
                            bias: spec.bias,
                            residual: true,
                        },
                        0,
                        None,
                        rows,
                        d,
                    ));
                    b.push(norm_op(
                        norm(Tensor::PostAttnNorm, Some(l)),
                        Some(l),
                        rows,
                        d,
                    ));
                    b.push(mlp_gate_up_op(
                        l,
                        MlpGateUpParams {
                            hidden: h,
                            intermediate: spec.intermediate,
                            glu: spec.activation,
                            bias: false,
                        },
                        0,
                        None,
                        rows,
                        d,
                    ));
                    let next = if l + 1 < nl {
                        norm(Tensor::InputNorm, Some(l + 1))
                    } else {
                        norm(Tensor::FinalNorm, None)
                    };
                    b.push(mlp_down_op(
                        l,
                        MlpDownParams {
                            hidden: h,
                            intermediate: spec.intermediate,
                            bias: false,
                            residual: true,
                            next_norm: Some(next),
                        },
                        0,
                        None,
                        rows,
                        d,
                    ));
                }
                let shape = PassShape {
                    kind: PassKind::DraftBlock,
                    rows,
                    logits: Logits::All,
                    sample: true,
                    context,
                };
                // The target's LM head on rows 1..B (row 0 is the last committed token).
                push_head(&mut b, &shape, spec.vocab, h, 1, d);
                shape
            }
        };
        Ok(Plan {
            shape,
            storage,
            ranks: 1,
            ropes: vec![spec.rope],
            layers,
            ops: b.ops,
            taps: b.taps,
        })
    }
}
