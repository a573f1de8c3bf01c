//! Checks that a [`Weights`] matches its [`ModelConfig`] before the executor uses it, so that a
//! loader mistake is a clear error at build time and never a panic or silent garbage later.

use crate::config::{AttnKind, ModelConfig, RouterSpec};
use crate::weights::{ExpertMat, Linear, Mat, Mlp, Weights};

/// Weights that do not match their config (the message names the tensor and both shapes).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct Mismatch(pub String);

fn fail(msg: String) -> Result<(), Mismatch> {
    Err(Mismatch(msg))
}

fn mat(what: &str, m: &Mat, rows: usize, cols: usize) -> Result<(), Mismatch> {
    if m.rows != rows || m.cols != cols {
        return fail(format!(
            "{what}: expected [{rows}, {cols}], got [{}, {}]",
            m.rows, m.cols
        ));
    }
    Ok(())
}

fn vector(what: &str, v: &[f32], len: usize) -> Result<(), Mismatch> {
    if v.len() != len {
        return fail(format!("{what}: expected {len} values, got {}", v.len()));
    }
    Ok(())
}

fn opt_vector(what: &str, v: Option<&[f32]>, len: Option<usize>) -> Result<(), Mismatch> {
    match (v, len) {
        (None, None) => Ok(()),
        (Some(v), Some(len)) => vector(what, v, len),
        (Some(_), None) => fail(format!("{what}: present but the config does not use it")),
        (None, Some(_)) => fail(format!("{what}: missing but the config requires it")),
    }
}

fn linear(what: &str, l: &Linear, rows: usize, cols: usize, bias: bool) -> Result<(), Mismatch> {
    mat(&format!("{what}.weight"), &l.w, rows, cols)?;
    opt_vector(
        &format!("{what}.bias"),
        l.bias.as_deref(),
        bias.then_some(rows),
    )
}

fn expert_mat(what: &str, m: &ExpertMat, rows: usize, cols: usize) -> Result<(), Mismatch> {
    match m {
        ExpertMat::Dense(d) => mat(what, d, rows, cols),
        ExpertMat::Mxfp4(x) => {
            if x.rows != rows || x.k != cols {
                return fail(format!(
                    "{what}: expected [{rows}, {cols}], got MXFP4 [{}, {}]",
                    x.rows, x.k
                ));
            }
            x.parts()
                .map(|_| ())
                .map_err(|e| Mismatch(format!("{what}: {e}")))
        }
    }
}

/// Validates every shape, presence of optional tensors, and the config's own consistency.
pub fn check(cfg: &ModelConfig, w: &Weights) -> Result<(), Mismatch> {
    let (v, h) = (cfg.vocab_size, cfg.hidden_size);
    if v == 0 || h == 0 {
        return fail(format!(
            "vocab_size {v} and hidden_size {h} must be nonzero"
        ));
    }
    mat("embed", &w.embed, v, h)?;
    mat("lm_head", &w.lm_head, v, h)?;
    vector("final_norm", &w.final_norm, h)?;
    if w.layers.len() != cfg.layers.len() {
        return fail(format!(
            "{} weight layers for {} config layers",
            w.layers.len(),
            cfg.layers.len()
        ));
    }
    for (l, (spec, lw)) in cfg.layers.iter().zip(&w.layers).enumerate() {
        let p = |s: &str| format!("layer {l}: {s}");
        let (nh, nkv, d, dv) = (
            spec.n_heads,
            spec.n_kv_heads,
            spec.head_dim,
            spec.v_head_dim,
        );
        if nh == 0 || nkv == 0 || !nh.is_multiple_of(nkv) || d == 0 || dv == 0 {
            return fail(p(&format!(
                "heads {nh} / kv heads {nkv} / head_dim {d} / v_head_dim {dv} are inconsistent"
            )));
        }
        let rd = spec.rope.rotary_dim;
        if !rd.is_multiple_of(2) || rd > d {
            return fail(p(&format!(
                "rotary_dim {rd} must be even and at most head_dim {d}"
            )));
        }
        if let AttnKind::Sliding { window: 0 } = spec.attn {
            return fail(p("sliding window 0"));
        }
        vector(&p("input_norm"), &lw.input_norm, h)?;
        vector(&p("post_attn_norm"), &lw.post_attn_norm, h)?;
        let a = &lw.attn;
        linear(&p("q"), &a.q, nh * d, h, spec.attn_bias)?;
        linear(&p("k"), &a.k, nkv * d, h, spec.attn_bias)?;
        linear(&p("v"), &a.v, nkv * dv, h, spec.attn_bias)?;
        linear(&p("o"), &a.o, h, nh * dv, spec.attn_bias)?;
        let qk = spec.qk_norm.then_some(d);
        opt_vector(&p("q_norm"), a.q_norm.as_deref(), qk)?;
        opt_vector(&p("k_norm"), a.k_norm.as_deref(), qk)?;
        opt_vector(&p("sinks"), a.sinks.as_deref(), spec.sinks.then_some(nh))?;
        match (&lw.mlp, spec.moe) {
            (Mlp::Dense { gate_up, down }, false) => {
                let i = cfg
                    .dense_intermediate_size
                    .ok_or_else(|| Mismatch(p("dense MLP but no dense_intermediate_size")))?;
                let b = gate_up.bias.is_some();
                linear(&p("mlp.gate_up"), gate_up, 2 * i, h, b)?;
                linear(&p("mlp.down"), down, h, i, down.bias.is_some())?;
            }
            (Mlp::Moe(m), true) => {
                let (e, i) = (cfg.n_experts, cfg.moe_intermediate_size);
                if cfg.top_k == 0 || cfg.top_k > e {
                    return fail(p(&format!("top_k {} with {e} experts", cfg.top_k)));
                }
                let router_bias =
                    matches!(cfg.router, RouterSpec::GptOss) && m.router.bias.is_some();
                linear(&p("router"), &m.router, e, h, router_bias)?;
                let corr =
                    matches!(cfg.router, RouterSpec::Sigmoid { .. }) && m.correction_bias.is_some();
                opt_vector(
                    &p("correction_bias"),
                    m.correction_bias.as_deref(),
                    corr.then_some(e),
                )?;
                if m.experts.len() != e {
                    return fail(p(&format!("{} experts, config says {e}", m.experts.len())));
                }
                for (j, x) in m.experts.iter().enumerate() {
                    let q = |s: &str| p(&format!("expert {j} {s}"));
                    expert_mat(&q("gate_up"), &x.gate_up, 2 * i, h)?;
                    expert_mat(&q("down"), &x.down, h, i)?;
                    if let Some(b) = &x.gate_up_bias {
                        vector(&q("gate_up_bias"), b, 2 * i)?;
                    }
                    if let Some(b) = &x.down_bias {
                        vector(&q("down_bias"), b, h)?;
                    }
                }
            }
            (Mlp::Dense { .. }, true) => {
                return fail(p("dense MLP weights but the config says MoE"))
            }
            (Mlp::Moe(_), false) => return fail(p("MoE weights but the config says dense")),
        }
    }
    Ok(())
}
