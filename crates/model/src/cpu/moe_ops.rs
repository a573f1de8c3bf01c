//! The mixture of experts as the plan's three ops — `norm_router_topk`, `experts_gate_up`,
//! `experts_down` — over a block of `t` rows. Together they compute exactly what
//! [`super::ffn::moe_block`] computes (same f32 operations in the same order; a test asserts
//! bit-identity), split at the boundaries where a tensor-parallel plan shards the experts.
//!
//! The router runs once per pass (replicated); each rank's `experts_gate_up` / `experts_down`
//! run over its slice of every expert's intermediate dimension, sharing the routing.

use crate::plan::{ExpertsDownParams, ExpertsGateUpParams, RouterParams};
use crate::weights::{ExpertMat, Moe};

use super::ffn::expert_matmul;
use super::{ops, CpuError};

/// The routing of a pass and the per-expert bookkeeping (shared by every rank).
#[derive(Debug, Default, Clone)]
pub struct Routing {
    router_logits: Vec<f32>,
    routings: Vec<moe::Routing>,
    router_scratch: moe::RouterScratch,
    dispatch: moe::Dispatch,
    rows: usize,
}

/// Reusable buffers of the expert ops.
#[derive(Debug, Default, Clone)]
pub struct ExpertScratch {
    xe: Vec<f32>,
    gu: Vec<f32>,
    down: Vec<f32>,
    slots: Vec<f32>,
    order: Vec<usize>,
}

/// The `moe` routing variant of `p` for the MoE block `m`.
pub fn router_kind<'a>(p: &RouterParams, m: &'a Moe) -> moe::RouterKind<'a> {
    spec_router_kind(p.kind, m)
}

/// The `moe` routing variant of a router `spec` for the MoE block `m` (the gpt-oss router bias
/// is part of `m.router`, added by [`ops::linear`] before routing, so it is not passed again).
pub fn spec_router_kind(spec: crate::config::RouterSpec, m: &Moe) -> moe::RouterKind<'_> {
    match spec {
        crate::config::RouterSpec::GptOss => moe::RouterKind::GptOss { bias: None },
        crate::config::RouterSpec::Qwen3 { norm_topk_prob } => {
            moe::RouterKind::Qwen3Moe { norm_topk_prob }
        }
        crate::config::RouterSpec::Sigmoid {
            n_group,
            topk_group,
            norm_topk_prob,
            routed_scaling_factor,
        } => moe::RouterKind::Sigmoid(moe::SigmoidRouter {
            correction_bias: m.correction_bias.as_deref(),
            n_group,
            topk_group,
            norm_topk_prob,
            routed_scaling_factor,
        }),
    }
}

/// Router logits of the normed rows `h` (`[t, H]`), top-k per row, and the dispatch.
pub fn route(
    p: &RouterParams,
    m: &Moe,
    h: &[f32],
    t: usize,
    r: &mut Routing,
) -> Result<(), CpuError> {
    let (ne, k) = (m.experts.len(), p.top_k);
    r.router_logits.resize(t * ne, 0.0);
    ops::linear(&m.router, h, t, &mut r.router_logits);
    let kind = router_kind(p, m);
    if r.routings.len() < t {
        r.routings.resize_with(t, || moe::Routing::with_capacity(k));
    }
    for (ro, z) in r.routings[..t]
        .iter_mut()
        .zip(r.router_logits.chunks_exact(ne))
    {
        moe::route_into(&kind, z, k, &mut r.router_scratch, ro)?;
    }
    r.dispatch.build_into(&r.routings[..t], ne)?;
    r.rows = t;
    Ok(())
}

/// Every hit expert once over its rows (chunks of [`fp4::MAX_BATCH`]): `gate_up (+ b)` → GLU
/// into `act[(row·k + slot)·I ..]`, `I` = `p.intermediate` (this rank's slice).
pub fn experts_gate_up(
    p: &ExpertsGateUpParams,
    m: &Moe,
    h: &[f32],
    r: &Routing,
    act: &mut Vec<f32>,
    s: &mut ExpertScratch,
) -> Result<(), CpuError> {
    let (hs, k, i) = (p.hidden, p.top_k, p.intermediate);
    act.resize(r.rows * k * i, 0.0);
    if i == 0 {
        return Ok(());
    }
    for &e in r.dispatch.active_experts() {
        let ex = &m.experts[e];
        let i2 = ex.gate_up.rows();
        for chunk in r.dispatch.expert_entries(e).chunks(fp4::MAX_BATCH) {
            let n = chunk.len();
            s.xe.resize(n * hs, 0.0);
            for (dst, en) in s.xe.chunks_exact_mut(hs).zip(chunk) {
                dst.copy_from_slice(&h[en.token * hs..(en.token + 1) * hs]);
            }
            s.gu.resize(n * i2, 0.0);
            expert_matmul(&ex.gate_up, &s.xe, n, &mut s.gu)?;
            if let Some(b) = &ex.gate_up_bias {
                ops::add_bias(&mut s.gu, b);
            }
            for (gu, en) in s.gu.chunks_exact(i2).zip(chunk) {
                let at = (en.token * k + en.slot) * i;
                ops::glu(p.glu, p.layout, gu, &mut act[at..at + i]);
            }
        }
    }
    Ok(())
}

/// Every hit expert's `down (+ b)` over its rows' activations, times the gate weight, then each
/// row's sum of its k expert outputs in ascending expert id → `out` (`[t, H]`).
pub fn experts_down(
    p: &ExpertsDownParams,
    m: &Moe,
    act: &[f32],
    r: &Routing,
    out: &mut [f32],
    s: &mut ExpertScratch,
) -> Result<(), CpuError> {
    let (hs, k, i) = (p.hidden, p.top_k, p.intermediate);
    let t = r.rows;
    s.slots.resize(t * k * hs, 0.0);
    for &e in r.dispatch.active_experts() {
        let ex = &m.experts[e];
        for chunk in r.dispatch.expert_entries(e).chunks(fp4::MAX_BATCH) {
            let n = chunk.len();
            s.down.resize(n * hs, 0.0);
            if i == 0 {
                s.down.fill(0.0);
            } else {
                s.xe.resize(n * i, 0.0);
                for (dst, en) in s.xe.chunks_exact_mut(i).zip(chunk) {
                    let at = (en.token * k + en.slot) * i;
                    dst.copy_from_slice(&act[at..at + i]);
                }
                down_matmul(&ex.down, &s.xe, n, &mut s.down)?;
            }
            if let Some(b) = &ex.down_bias {
                ops::add_bias(&mut s.down, b);
            }
            for (row, en) in s.down.chunks_exact(hs).zip(chunk) {
                let at = (en.token * k + en.slot) * hs;
                for (o, &v) in s.slots[at..at + hs].iter_mut().zip(row) {
                    *o = v * en.weight;
                }
            }
        }
    }
    for (ti, (o, ro)) in out
        .chunks_exact_mut(hs)
        .zip(r.routings[..t].iter())
        .enumerate()
    {
        s.order.clear();
        s.order.extend(0..ro.experts.len());
        s.order.sort_unstable_by_key(|&slot| ro.experts[slot]);
        o.fill(0.0);
        for &slot in s.order.iter() {
            let at = (ti * k + slot) * hs;
            ops::add_assign(o, &s.slots[at..at + hs]);
        }
    }
    Ok(())
}

fn down_matmul(w: &ExpertMat, x: &[f32], n: usize, y: &mut [f32]) -> Result<(), CpuError> {
    expert_matmul(w, x, n, y)?;
    Ok(())
}
