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
//!
//! # Expert parallelism
//! [`Parallelism`] selects, besides the tensor-parallel split above, **expert parallelism**
//! (`--expert-parallel`): the routed experts of every MoE layer are placed whole on the ranks,
//! rank r holding the contiguous ids `r·E/N .. (r+1)·E/N` (E must divide by N). Attention and
//! dense MLPs stay tensor-parallel (`--tensor-parallel N --expert-parallel`, vLLM's
//! `--enable-expert-parallel`) or are replicated on every rank (`--expert-parallel` alone: each
//! rank runs them whole, no all-reduce after attention).
//!
//! Dispatch and combine at the batch sizes of decode and verify (≤ 16 rows): the residual
//! stream is replicated on every rank after each all-reduce, and so are the normed rows and the
//! routing (the router is replicated), so **dispatch moves nothing**: every rank already holds
//! every token's activation and choice of experts. Each rank runs its own experts over the rows
//! routed to them (`experts_gate_up` / `experts_down` with the rank's [`ExpertRange`]) and writes
//! the sum of its experts' weighted outputs (ascending expert id) as its partial; the combine is
//! the `all_reduce` that follows, the same node (and on the GPU the same one-shot kernel with
//! the residual add and the next RMSNorm fused) as tensor parallelism's. An all-to-all
//! dispatch/combine (DeepEP, pplx) moves less data, but at one to sixteen tokens its two
//! collectives cost tens of µs each against one fused ~6 µs all-reduce
//! (`../shared/research/mxfp4-moe.md` §5.5), so it is not used.
//!
//! Each row's expert outputs are summed per rank and the per-rank sums in rank order: the same
//! terms as the unsharded plan's ascending-id sum, re-associated at rank boundaries (bit-identical
//! when a row's experts all live on one rank).

use std::ops::Range;

use crate::config::ModelConfig;

use super::{
    attention_op, experts_down_op, experts_gate_up_op, mlp_down_op, mlp_gate_up_op, o_proj_op,
    qkv_op, AllReduceParams, AttnGeom, Buf, ExpertRange, LayerTables, NextNorm, Op, OpKind,
    Placement, Plan, PlanError, Shard, ShardUnit, Tap,
};

/// How a model is split over its ranks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Parallelism {
    pub ranks: usize,
    /// Attention by KV-head group and dense MLPs along the intermediate dimension (tensor
    /// parallelism); false: both replicated on every rank.
    pub shard_attention: bool,
    /// Routed experts placed whole on the ranks (contiguous id ranges); false: every expert split
    /// along its intermediate dimension.
    pub expert_parallel: bool,
}

impl Parallelism {
    /// Tensor parallelism over `ranks` (`--tensor-parallel N`).
    pub fn tensor(ranks: usize) -> Parallelism {
        Parallelism {
            ranks,
            shard_attention: true,
            expert_parallel: false,
        }
    }
    /// Tensor-parallel attention and dense MLPs, expert-parallel MoE layers
    /// (`--tensor-parallel N --expert-parallel`).
    pub fn tensor_expert(ranks: usize) -> Parallelism {
        Parallelism {
            ranks,
            shard_attention: true,
            expert_parallel: true,
        }
    }
    /// Expert-parallel MoE layers, everything else replicated (`--expert-parallel` alone).
    pub fn expert(ranks: usize) -> Parallelism {
        Parallelism {
            ranks,
            shard_attention: false,
            expert_parallel: true,
        }
    }
}

impl std::fmt::Display for Parallelism {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match (self.shard_attention, self.expert_parallel) {
            (true, false) => write!(f, "tensor parallelism over {} ranks", self.ranks),
            (true, true) => write!(
                f,
                "tensor parallelism over {} ranks with expert-parallel MoE layers",
                self.ranks
            ),
            (false, true) => write!(
                f,
                "expert parallelism over {} ranks (attention replicated)",
                self.ranks
            ),
            (false, false) => write!(f, "{} replicated ranks", self.ranks),
        }
    }
}

/// What one layer's ranks hold.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LayerShards {
    /// Query heads per rank.
    pub heads: Vec<Range<usize>>,
    /// KV heads per rank (one replicated head when ranks > KV heads).
    pub kv_heads: Vec<Range<usize>>,
    /// FFN intermediate range per rank (experts or dense MLP).
    pub intermediate: Vec<Range<usize>>,
    /// Routed expert ids per rank: all of them on every rank unless expert-parallel (empty for
    /// a dense layer).
    pub experts: Vec<Range<usize>>,
}

/// What every rank holds, per layer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TpLayout {
    pub ranks: usize,
    /// How the model is split (attention sharded or replicated; experts split or placed).
    pub parallelism: Parallelism,
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
    /// The tensor-parallel layout of `cfg` over `ranks` ranks (`mxfp4_experts`: the routed
    /// experts are MXFP4, so their intermediate dimension splits at 32-element blocks).
    pub fn new(
        cfg: &ModelConfig,
        ranks: usize,
        mxfp4_experts: bool,
    ) -> Result<TpLayout, PlanError> {
        TpLayout::with(cfg, Parallelism::tensor(ranks), mxfp4_experts)
    }

    /// The layout of `cfg` split as `par` says (see the module docs).
    pub fn with(
        cfg: &ModelConfig,
        par: Parallelism,
        mxfp4_experts: bool,
    ) -> Result<TpLayout, PlanError> {
        let ranks = par.ranks;
        let err = |reason: String| PlanError::TensorParallel { ranks, reason };
        if ranks == 0 {
            return Err(err("at least one rank is needed".into()));
        }
        let e = cfg.n_experts;
        if par.expert_parallel {
            if !cfg.layers.iter().any(|l| l.moe) {
                return Err(err(
                    "expert parallelism needs routed experts; this model has no MoE layer".into(),
                ));
            }
            if e < ranks || !e.is_multiple_of(ranks) {
                let ok: Vec<String> = (1..=16.min(e))
                    .filter(|&n| e.is_multiple_of(n))
                    .map(|n| n.to_string())
                    .collect();
                return Err(err(format!(
                    "expert parallelism places {e} routed experts on {ranks} ranks: the rank \
                     count must divide the experts (possible here: {})",
                    ok.join(", ")
                )));
            }
        }
        let mut layers = Vec::with_capacity(cfg.layers.len());
        for (l, s) in cfg.layers.iter().enumerate() {
            let (nh, nkv) = (s.n_heads, s.n_kv_heads);
            if nh == 0 || nkv == 0 || !nh.is_multiple_of(nkv) {
                return Err(err(format!(
                    "layer {l}: {nh} query heads over {nkv} KV heads"
                )));
            }
            let (heads, kv_heads) = if par.shard_attention {
                if !nh.is_multiple_of(ranks)
                    || !(nkv.is_multiple_of(ranks) || ranks.is_multiple_of(nkv))
                {
                    return Err(err(format!(
                        "layer {l} has {nh} query heads and {nkv} KV heads: the rank count must \
                         divide the query heads and either divide the KV heads or be a multiple \
                         of them (possible here: {})",
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
                (heads, kv_heads)
            } else {
                (vec![0..nh; ranks], vec![0..nkv; ranks])
            };
            let (intermediate, experts) = if s.moe {
                let i = cfg.moe_intermediate_size;
                if par.expert_parallel {
                    let per = e / ranks;
                    (
                        vec![0..i; ranks],
                        (0..ranks).map(|r| r * per..(r + 1) * per).collect(),
                    )
                } else {
                    let gran = if mxfp4_experts { fp4::BLOCK } else { 1 };
                    (split_range(i, ranks, gran), vec![0..e; ranks])
                }
            } else {
                let i = cfg.dense_intermediate_size.unwrap_or(0);
                let inter = if par.shard_attention {
                    split_range(i, ranks, 1)
                } else {
                    vec![0..i; ranks]
                };
                (inter, vec![0..0; ranks])
            };
            layers.push(LayerShards {
                heads,
                kv_heads,
                intermediate,
                experts,
            });
        }
        Ok(TpLayout {
            ranks,
            parallelism: par,
            layers,
        })
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
    let par = layout.parallelism;
    let mut ops: Vec<Op> = Vec::with_capacity(plan.ops.len() * n);
    // new index of the last op emitted for each old op (taps follow it)
    let mut last = Vec::with_capacity(plan.ops.len());
    for op in &plan.ops {
        let lay = op.layer.map(|l| &layout.layers[l]);
        let replicated = !par.shard_attention
            && matches!(
                op.kind,
                OpKind::QkvRope(_)
                    | OpKind::Attention(_)
                    | OpKind::OProj(_)
                    | OpKind::MlpGateUp(_)
                    | OpKind::MlpDown(_)
            );
        if replicated {
            // Expert parallelism alone: every rank runs attention and dense MLPs whole.
            ops.push(op.clone());
            last.push(ops.len() - 1);
            continue;
        }
        match (op.kind, lay) {
            (OpKind::ExpertsGateUp(p), Some(ls)) if par.expert_parallel => {
                let l = op.layer.unwrap_or(0);
                for r in 0..n {
                    let held = &ls.experts[r];
                    ops.push(experts_gate_up_op(
                        l,
                        super::ExpertsGateUpParams {
                            experts: ExpertRange {
                                lo: held.start,
                                hi: held.end,
                            },
                            ..p
                        },
                        r,
                        Some(shard(r, n, ShardUnit::Experts, held)),
                        t,
                        (d, x),
                    ));
                }
            }
            (OpKind::ExpertsDown(p), Some(ls)) if par.expert_parallel => {
                let l = op.layer.unwrap_or(0);
                for r in 0..n {
                    let held = &ls.experts[r];
                    ops.push(experts_down_op(
                        l,
                        super::ExpertsDownParams {
                            experts: ExpertRange {
                                lo: held.start,
                                hi: held.end,
                            },
                            residual: false,
                            next_norm: None,
                            ..p
                        },
                        r,
                        Some(shard(r, n, ShardUnit::Experts, held)),
                        t,
                        (d, x),
                    ));
                }
                ops.push(all_reduce(l, n, p.hidden, t, p.next_norm, d));
            }
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
