//! The feed-forward half of a layer: the dense SwiGLU MLP and the mixture of experts.
//!
//! MoE over a block of T tokens (T = 1 for decode):
//! 1. router logits `h · W_rᵀ (+ b_r)` for every token (f32 accumulation);
//! 2. [`moe::route_into`] per token (the routing variant of the config);
//! 3. [`moe::Dispatch`] groups the `(token, slot)` pairs by expert;
//! 4. every distinct expert runs ONCE over its tokens, in chunks of at most
//!    [`fp4::MAX_BATCH`] = 16 rows (`fp4::gemm` for MXFP4, [`ops::matmul`] for dense):
//!    `gate_up (+ b_gu)` → gated activation → `down (+ b_down)`, times the token's gate weight
//!    (gpt-oss weights the down bias too, as transformers does);
//! 5. each token sums its k weighted expert outputs in ascending expert id, starting from 0 —
//!    the order of transformers' `index_add_` loop over the hit experts — so the result is the
//!    same whether the token runs alone or in a block.

use crate::config::ModelConfig;
use crate::weights::{ExpertMat, GateUpLayout, Linear, Mlp, Moe, MxMat};

use super::ops;
use super::CpuError;

/// Reusable buffers of [`mlp_forward`]; after the first call of a given block size nothing is
/// allocated here (the fp4 kernels allocate their own small temporaries).
#[derive(Debug, Default, Clone)]
pub struct FfnScratch {
    router_logits: Vec<f32>,
    routings: Vec<moe::Routing>,
    router_scratch: moe::RouterScratch,
    dispatch: moe::Dispatch,
    xe: Vec<f32>,
    gu: Vec<f32>,
    act: Vec<f32>,
    down: Vec<f32>,
    slots: Vec<f32>,
    order: Vec<usize>,
}

/// The `moe` routing variant of `cfg` for the MoE block `m` (see
/// [`super::moe_ops::spec_router_kind`]).
pub fn router_kind<'a>(cfg: &ModelConfig, m: &'a Moe) -> moe::RouterKind<'a> {
    super::moe_ops::spec_router_kind(cfg.router, m)
}

/// `y = X · Wᵀ` for `t` rows of an expert matrix (`x` `[t, in]`, `y` `[t, out]`); MXFP4 runs
/// `fp4::gemm` in chunks of at most 16 rows (bit-identical to one `fp4::gemv` per row).
pub fn expert_matmul(
    w: &ExpertMat,
    x: &[f32],
    t: usize,
    y: &mut [f32],
) -> Result<(), fp4::Fp4Error> {
    match w {
        ExpertMat::Dense(m) => {
            ops::matmul(m, x, t, y);
            Ok(())
        }
        ExpertMat::Mxfp4(m) => {
            let k = m.k;
            mx_segments(m, t, y, |view, out| {
                let n = view.rows();
                for (xc, yc) in x
                    .chunks(fp4::MAX_BATCH * k)
                    .zip(out.chunks_mut(fp4::MAX_BATCH * n))
                {
                    fp4::gemm(view, xc, xc.len() / k.max(1), yc)?;
                }
                Ok(())
            })
        }
    }
}

/// Runs `f(view, out)` — `out` `[t, view rows]` — on each row segment of an MXFP4 matrix
/// ([`MxMat::parts`]: MiMo's `[gate; up]` views) and gathers the rows into `y` `[t, rows]`: one
/// call straight into `y` when the matrix is one segment. A row's result depends on its own
/// weights only, so segments give the bits of one contiguous matrix.
pub fn mx_segments(
    m: &MxMat,
    t: usize,
    y: &mut [f32],
    mut f: impl FnMut(fp4::MxMatrixRef<'_>, &mut [f32]) -> Result<(), fp4::Fp4Error>,
) -> Result<(), fp4::Fp4Error> {
    if m.num_parts() == 1 {
        return f(m.view()?, y);
    }
    let parts = m.parts()?;
    let n = m.rows;
    let mut out = Vec::new();
    for (r0, view) in parts {
        let pr = view.rows();
        out.clear();
        out.resize(t * pr, 0.0);
        f(view, &mut out)?;
        for (row, part) in y.chunks_exact_mut(n).zip(out.chunks_exact(pr.max(1))) {
            row[r0..r0 + pr].copy_from_slice(part);
        }
    }
    Ok(())
}

/// The dense gated MLP: `down(act(gate_up(h)))`, `gate_up` in [`GateUpLayout::Halves`] order.
pub fn dense_mlp(
    cfg: &ModelConfig,
    gate_up: &Linear,
    down: &Linear,
    h: &[f32],
    t: usize,
    out: &mut [f32],
    s: &mut FfnScratch,
) {
    let i = down.w.cols;
    s.gu.resize(t * 2 * i, 0.0);
    ops::linear(gate_up, h, t, &mut s.gu);
    s.act.resize(t * i, 0.0);
    ops::glu_rows(cfg.activation, GateUpLayout::Halves, &s.gu, &mut s.act, i);
    ops::linear(down, &s.act, t, out);
}

/// The mixture of experts over `t` tokens (`h` `[t, H]` → `out` `[t, H]`), see the module docs.
pub fn moe_block(
    cfg: &ModelConfig,
    m: &Moe,
    h: &[f32],
    t: usize,
    out: &mut [f32],
    s: &mut FfnScratch,
) -> Result<(), CpuError> {
    let FfnScratch {
        router_logits,
        routings,
        router_scratch,
        dispatch,
        xe,
        gu,
        act,
        down,
        slots,
        order,
    } = s;
    let hs = cfg.hidden_size;
    let k = cfg.top_k;
    let ne = m.experts.len();

    router_logits.resize(t * ne, 0.0);
    ops::linear(&m.router, h, t, router_logits);
    let kind = router_kind(cfg, m);
    if routings.len() < t {
        routings.resize_with(t, || moe::Routing::with_capacity(k));
    }
    let routings = &mut routings[..t];
    for (r, z) in routings.iter_mut().zip(router_logits.chunks_exact(ne)) {
        moe::route_into(&kind, z, k, router_scratch, r)?;
    }
    dispatch.build_into(routings, ne)?;
    let routings = &*routings;

    slots.resize(t * k * hs, 0.0);
    for &e in dispatch.active_experts() {
        let ex = &m.experts[e];
        let i2 = ex.gate_up.rows();
        let i = i2 / 2;
        for chunk in dispatch.expert_entries(e).chunks(fp4::MAX_BATCH) {
            let n = chunk.len();
            xe.resize(n * hs, 0.0);
            for (dst, en) in xe.chunks_exact_mut(hs).zip(chunk) {
                dst.copy_from_slice(&h[en.token * hs..(en.token + 1) * hs]);
            }
            gu.resize(n * i2, 0.0);
            expert_matmul(&ex.gate_up, xe, n, gu)?;
            if let Some(b) = &ex.gate_up_bias {
                ops::add_bias(gu, b);
            }
            act.resize(n * i, 0.0);
            ops::glu_rows(cfg.activation, m.gate_up_layout, gu, act, i);
            down.resize(n * hs, 0.0);
            expert_matmul(&ex.down, act, n, down)?;
            if let Some(b) = &ex.down_bias {
                ops::add_bias(down, b);
            }
            for (row, en) in down.chunks_exact(hs).zip(chunk) {
                let at = (en.token * k + en.slot) * hs;
                for (o, &v) in slots[at..at + hs].iter_mut().zip(row) {
                    *o = v * en.weight;
                }
            }
        }
    }

    for (ti, (o, r)) in out.chunks_exact_mut(hs).zip(routings.iter()).enumerate() {
        order.clear();
        order.extend(0..r.experts.len());
        order.sort_unstable_by_key(|&slot| r.experts[slot]);
        o.fill(0.0);
        for &slot in order.iter() {
            let at = (ti * k + slot) * hs;
            ops::add_assign(o, &slots[at..at + hs]);
        }
    }
    Ok(())
}

/// The feed-forward block of a layer over `t` tokens.
pub fn mlp_forward(
    cfg: &ModelConfig,
    mlp: &Mlp,
    h: &[f32],
    t: usize,
    out: &mut [f32],
    s: &mut FfnScratch,
) -> Result<(), CpuError> {
    match mlp {
        Mlp::Dense { gate_up, down } => {
            dense_mlp(cfg, gate_up, down, h, t, out, s);
            Ok(())
        }
        Mlp::Moe(m) => moe_block(cfg, m, h, t, out, s),
    }
}
