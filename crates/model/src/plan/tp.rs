//! The tensor-parallel transform of a plan: N ranks, attention sharded by KV-head group, dense
//! and expert FFNs along the intermediate dimension, and explicit all-reduce nodes.
//!
//! [`TpLayout`] is the one definition of what each rank holds; [`shard`] rewrites a plan with
//! it and the weight sharding (`crate::shard`) slices tensors by it.
//!
//! * **Attention**: rank r holds query heads `r·nh/N .. (r+1)·nh/N` and the KV heads serving
//!   them. With `N ≤ n_kv` (`N | n_kv`) every rank owns `n_kv/N` whole KV-head groups; with
//!   `N > n_kv` (`n_kv | N`) each KV head is replicated on `N/n_kv` ranks, which split its
//!   query heads (vLLM's rule). Anything else is a [`PlanError::TensorParallel`] naming the head
//!   counts. `qkv_rope_kv` and `attention` run per rank on its heads (and its own KV cache);
//!   `o_proj` multiplies the rank's columns of `W_o` into a partial sum (bias on rank 0), and
//!   an `all_reduce` adds the partials into the residual stream.
//! * **FFN**: rank r holds a contiguous range of the intermediate dimension (gate and up rows,
//!   down columns, gate/up bias entries; the down bias on rank 0). MXFP4 experts split only at
//!   32-element blocks, so ranges are whole blocks and may be uneven (a rank can hold none).
//!   The router (and the norms, embedding and LM head) is replicated: every rank computes the
//!   same routing. `experts_down` / `mlp_down` write partial sums; the `all_reduce` adds them
//!   into `x` and applies the next norm.
//!
//! The sums are the only change of arithmetic: an all-reduce adds per-rank partial dot
//! products, so logits differ from the unsharded plan by f32 reassociation only.

use std::ops::Range;

use crate::config::ModelConfig;

use super::{
    attention_op, experts_down_op, experts_gate_up_op, mlp_down_op, mlp_gate_up_op, o_proj_op,
    qkv_op, AllReduceParams, AttnGeom, Buf, LayerTables, NextNorm, Op, OpKind, Placement, Plan,
    PlanError, Shard, ShardUnit, Tap,
};

/// What one layer's ranks hold.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LayerShards {
    /// Query heads per rank.
    pub heads: Vec<Range<usize>>,
    /// KV heads per rank (one replicated head when ranks > KV heads).
    pub kv_heads: Vec<Range<usize>>,
    /// FFN intermediate range per rank (experts or dense MLP).
    pub intermediate: Vec<Range<usize>>,
}

/// What every rank holds, per layer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TpLayout {
    pub ranks: usize,
    pub layers: Vec<LayerShards>,
}

/// Splits `units` into `n` contiguous ranges at multiples of `granularity` (as even as the
/// granularity allows; trailing ranks get the larger parts).
pub fn split_range(units: usize, n: usize, granularity: usize) -> Vec<Range<usize>> {
    let blocks = units / granularity;
    (0..n)
        .map(|r| {
            let lo = r * blocks / n * granularity;
            let hi = if r + 1 == n {
                units
            } else {
                (r + 1) * blocks / n * granularity
            };
            lo..hi
        })
        .collect()
}

impl TpLayout {
    /// The layout of `cfg` over `ranks` ranks (`mxfp4_experts`: the routed experts are MXFP4,
    /// so their intermediate dimension splits at 32-element blocks).
    pub fn new(
        cfg: &ModelConfig,
        ranks: usize,
        mxfp4_experts: bool,
    ) -> Result<TpLayout, PlanError> {
        let err = |reason: String| PlanError::TensorParallel { ranks, reason };
        if ranks == 0 {
            return Err(err("at least one rank is needed".into()));
        }
        let mut layers = Vec::with_capacity(cfg.layers.len());
        for (l, s) in cfg.layers.iter().enumerate() {
            let (nh, nkv) = (s.n_heads, s.n_kv_heads);
            if nh == 0 || nkv == 0 || !nh.is_multiple_of(nkv) {
                return Err(err(format!(
                    "layer {l}: {nh} query heads over {nkv} KV heads"
                )));
            }
            if !nh.is_multiple_of(ranks)
                || !(nkv.is_multiple_of(ranks) || ranks.is_multiple_of(nkv))
            {
                return Err(err(format!(
                    "layer {l} has {nh} query heads and {nkv} KV heads: the rank count must divide \
                     the query heads and either divide the KV heads or be a multiple of them \
                     (possible here: {})",
                    possible_ranks(nh, nkv)
                )));
            }
            let hq = nh / ranks;
            let heads: Vec<Range<usize>> = (0..ranks).map(|r| r * hq..(r + 1) * hq).collect();
            let kv_heads = if nkv >= ranks {
                let g = nkv / ranks;
                (0..ranks).map(|r| r * g..(r + 1) * g).collect()
            } else {
                let rep = ranks / nkv;
                (0..ranks).map(|r| r / rep..r / rep + 1).collect()
            };
            let (i, gran) = if s.moe {
                (
                    cfg.moe_intermediate_size,
                    if mxfp4_experts { fp4::BLOCK } else { 1 },
                )
            } else {
                (cfg.dense_intermediate_size.unwrap_or(0), 1)
            };
            layers.push(LayerShards {
                heads,
                kv_heads,
                intermediate: split_range(i, ranks, gran),
            });
        }
        Ok(TpLayout { ranks, layers })
    }
}

/// Rank counts ≤ 16 a layer of `nh` / `nkv` heads allows, for error messages.
fn possible_ranks(nh: usize, nkv: usize) -> String {
    let ok: Vec<String> = (1..=16)
        .filter(|&n| nh.is_multiple_of(n) && (nkv.is_multiple_of(n) || n.is_multiple_of(nkv)))
        .map(|n| n.to_string())
        .collect();
    ok.join(", ")
}

fn shard(rank: usize, ranks: usize, unit: ShardUnit, r: &Range<usize>) -> Shard {
    Shard {
        rank,
        ranks,
        unit,
        lo: r.start,
        hi: r.end,
    }
}

fn all_reduce(
    layer: usize,
    ranks: usize,
    width: usize,
    t: usize,
    next_norm: Option<NextNorm>,
    d: f64,
) -> Op {
    let mut outputs = vec![Buf::X];
    let mut weights = Vec::new();
    let mut bytes = 0.0;
    if let Some(nn) = next_norm {
        outputs.push(Buf::H);
        weights.push(nn.weight);
        bytes = nn.dim as f64 * d;
    }
    let mut inputs: Vec<Buf> = (0..ranks).map(Buf::Partial).collect();
    inputs.push(Buf::X);
    Op {
        kind: OpKind::AllReduce(AllReduceParams {
            ranks,
            width,
            next_norm,
        }),
        layer: Some(layer),
        placement: Placement::Replicated,
        inputs,
        outputs,
        weights,
        weight_bytes: bytes,
        kv_bytes: 0.0,
        flops: (ranks * t * width) as f64,
    }
}

/// `plan` over the ranks of `layout` (see the module docs). The input must be an unsharded
/// target plan of `cfg`.
pub fn shard_plan(plan: &Plan, cfg: &ModelConfig, layout: &TpLayout) -> Result<Plan, PlanError> {
    if plan.ranks != 1 {
        return Err(PlanError::Invalid("the plan is already sharded".into()));
    }
    if layout.layers.len() != cfg.layers.len() {
        return Err(PlanError::Invalid(format!(
            "the layout has {} layers, the model {}",
            layout.layers.len(),
            cfg.layers.len()
        )));
    }
    let n = layout.ranks;
    let t = plan.shape.rows;
    let st = plan.storage;
    let (d, x) = (st.dense_bytes, st.expert_bytes);
    let mut ops: Vec<Op> = Vec::with_capacity(plan.ops.len() * n);
    // new index of the last op emitted for each old op (taps follow it)
    let mut last = Vec::with_capacity(plan.ops.len());
    for op in &plan.ops {
        let lay = op.layer.map(|l| &layout.layers[l]);
        match (op.kind, lay) {
            (OpKind::QkvRope(p), Some(ls)) => {
                let l = op.layer.unwrap_or(0);
                for r in 0..n {
                    let geom = AttnGeom {
                        n_heads: ls.heads[r].len(),
                        n_kv_heads: ls.kv_heads[r].len(),
                        ..p.geom
                    };
                    ops.push(qkv_op(
                        l,
                        super::QkvRopeParams { geom, ..p },
                        r,
                        Some((
                            shard(r, n, ShardUnit::Heads, &ls.heads[r]),
                            shard(r, n, ShardUnit::KvHeads, &ls.kv_heads[r]),
                        )),
                        t,
                        d,
                    ));
                }
            }
            (OpKind::Attention(p), Some(ls)) => {
                let l = op.layer.unwrap_or(0);
                for r in 0..n {
                    let geom = AttnGeom {
                        n_heads: ls.heads[r].len(),
                        n_kv_heads: ls.kv_heads[r].len(),
                        ..p.geom
                    };
                    ops.push(attention_op(
                        l,
                        super::AttentionParams { geom, ..p },
                        r,
                        Some(shard(r, n, ShardUnit::Heads, &ls.heads[r])),
                        &plan.shape,
                        st,
                    ));
                }
            }
            (OpKind::OProj(p), Some(ls)) => {
                let l = op.layer.unwrap_or(0);
                for r in 0..n {
                    let heads = ls.heads[r].len();
                    let dv = if p.in_dim == 0 {
                        0
                    } else {
                        p.in_dim / ls.heads.iter().map(|h| h.len()).sum::<usize>()
                    };
                    ops.push(o_proj_op(
                        l,
                        super::OProjParams {
                            in_dim: heads * dv,
                            bias: p.bias && r == 0,
                            residual: false,
                            ..p
                        },
                        r,
                        Some(shard(r, n, ShardUnit::Heads, &ls.heads[r])),
                        t,
                        d,
                    ));
                }
                ops.push(all_reduce(l, n, p.out_dim, t, None, d));
            }
            (OpKind::ExpertsGateUp(p), Some(ls)) => {
                let l = op.layer.unwrap_or(0);
                for r in 0..n {
                    ops.push(experts_gate_up_op(
                        l,
                        super::ExpertsGateUpParams {
                            intermediate: ls.intermediate[r].len(),
                            ..p
                        },
                        r,
                        Some(shard(r, n, ShardUnit::Intermediate, &ls.intermediate[r])),
                        t,
                        (d, x),
                    ));
                }
            }
            (OpKind::ExpertsDown(p), Some(ls)) => {
                let l = op.layer.unwrap_or(0);
                for r in 0..n {
                    ops.push(experts_down_op(
                        l,
                        super::ExpertsDownParams {
                            intermediate: ls.intermediate[r].len(),
                            bias: p.bias && r == 0,
                            residual: false,
                            next_norm: None,
                            ..p
                        },
                        r,
                        Some(shard(r, n, ShardUnit::Intermediate, &ls.intermediate[r])),
                        t,
                        (d, x),
                    ));
                }
                ops.push(all_reduce(l, n, p.hidden, t, p.next_norm, d));
            }
            (OpKind::MlpGateUp(p), Some(ls)) => {
                let l = op.layer.unwrap_or(0);
                for r in 0..n {
                    ops.push(mlp_gate_up_op(
                        l,
                        super::MlpGateUpParams {
                            intermediate: ls.intermediate[r].len(),
                            ..p
                        },
                        r,
                        Some(shard(r, n, ShardUnit::Intermediate, &ls.intermediate[r])),
                        t,
                        d,
                    ));
                }
            }
            (OpKind::MlpDown(p), Some(ls)) => {
                let l = op.layer.unwrap_or(0);
                for r in 0..n {
                    ops.push(mlp_down_op(
                        l,
                        super::MlpDownParams {
                            intermediate: ls.intermediate[r].len(),
                            bias: p.bias && r == 0,
                            residual: false,
                            next_norm: None,
                            ..p
                        },
                        r,
                        Some(shard(r, n, ShardUnit::Intermediate, &ls.intermediate[r])),
                        t,
                        d,
                    ));
                }
                ops.push(all_reduce(l, n, p.hidden, t, p.next_norm, d));
            }
            (
                OpKind::Embed(_)
                | OpKind::RmsNorm(_)
                | OpKind::NormRouterTopK(_)
                | OpKind::LmHead(_)
                | OpKind::Sample(_),
                _,
            ) => ops.push(op.clone()),
            (kind, _) => {
                return Err(PlanError::Invalid(format!(
                    "op {} of layer {:?} cannot be sharded",
                    kind.name(),
                    op.layer
                )))
            }
        }
        last.push(ops.len() - 1);
    }
    let layers = plan
        .layers
        .iter()
        .zip(&layout.layers)
        .zip(&cfg.layers)
        .map(|((lt, ls), s)| LayerTables {
            k_width: ls.kv_heads[0].len() * s.head_dim,
            v_width: ls.kv_heads[0].len() * s.v_head_dim,
            ..*lt
        })
        .collect();
    let taps = plan
        .taps
        .iter()
        .map(|tp| Tap {
            after: last[tp.after],
            ..*tp
        })
        .collect();
    Ok(Plan {
        shape: plan.shape,
        storage: st,
        ranks: n,
        ropes: plan.ropes.clone(),
        layers,
        ops,
        taps,
    })
}
