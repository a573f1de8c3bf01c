//! The CPU executor against an independent, naive f64 forward written in this file straight
//! from the model math (research/models.md §1–§3): full score matrices with explicit masks, no
//! KV cache, per-token MoE with its own top-k / softmax / sigmoid routers, its own RoPE/YaRN
//! frequencies. It shares nothing with the executor except the weights (MXFP4 experts are
//! decoded with `fp4::dequantize`, which is exact).
//!
//! Tolerance: 1e-5 absolute on logits of magnitude ≈ 1–3 (observed ≤ 1.1e-6). The executor accumulates in f32
//! (relative rounding ≈ 6e-8 per op, a few hundred ops deep), so its distance from exact math
//! is ≈ 1e-6; 1e-5 leaves margin without hiding any real mistake (a wrong sign, mask, position,
//! scale or routing changes logits by ≥ 1e-2 here). The observed maximum is printed.

mod cpu_util;

use cpu_util::{tokens, toys};
use model::config::{Activation, AttnKind, ModelConfig, RouterSpec};
use model::weights::{ExpertMat, GateUpLayout, Linear, Mat, Mlp, Weights};

type M = Vec<Vec<f64>>;

fn lin(l: &Linear, x: &[f64]) -> Vec<f64> {
    mat(&l.w, x)
        .into_iter()
        .enumerate()
        .map(|(i, v)| v + l.bias.as_ref().map_or(0.0, |b| b[i] as f64))
        .collect()
}

fn mat(w: &Mat, x: &[f64]) -> Vec<f64> {
    (0..w.rows)
        .map(|r| w.row(r).iter().zip(x).map(|(&a, &b)| a as f64 * b).sum())
        .collect()
}

fn expert(w: &ExpertMat, x: &[f64]) -> Vec<f64> {
    match w {
        ExpertMat::Dense(m) => mat(m, x),
        ExpertMat::Mxfp4(q) => {
            let d = fp4::dequantize(q.view().unwrap());
            mat(&Mat::from_f32(q.rows, q.k, d), x)
        }
    }
}

fn rms(x: &[f64], w: &[f32], eps: f64) -> Vec<f64> {
    let ms = x.iter().map(|v| v * v).sum::<f64>() / x.len() as f64;
    let r = 1.0 / (ms + eps).sqrt();
    x.iter().zip(w).map(|(v, &g)| v * r * g as f64).collect()
}

fn sig(x: f64) -> f64 {
    1.0 / (1.0 + (-x).exp())
}

/// inv_freq and attention factor, per transformers' default / YaRN formulas.
fn freqs(r: &model::config::Rope) -> (Vec<f64>, f64) {
    let d = r.rotary_dim;
    let pf: Vec<f64> = (0..d / 2)
        .map(|i| r.theta.powf(2.0 * i as f64 / d as f64))
        .collect();
    match &r.yarn {
        None => (pf.iter().map(|p| 1.0 / p).collect(), 1.0),
        Some(y) => {
            let corr = |rot: f64| {
                d as f64
                    * (y.original_max_position_embeddings as f64
                        / (rot * 2.0 * std::f64::consts::PI))
                        .ln()
                    / (2.0 * r.theta.ln())
            };
            let (mut lo, mut hi) = (corr(y.beta_fast), corr(y.beta_slow));
            if y.truncate {
                lo = lo.floor();
                hi = hi.ceil();
            }
            let (lo, mut hi) = (lo.max(0.0), hi.min(d as f64 - 1.0));
            if lo == hi {
                hi += 0.001;
            }
            let inv = pf
                .iter()
                .enumerate()
                .map(|(i, p)| {
                    let extrap_w = 1.0 - ((i as f64 - lo) / (hi - lo)).clamp(0.0, 1.0);
                    (1.0 / (y.factor * p)) * (1.0 - extrap_w) + (1.0 / p) * extrap_w
                })
                .collect();
            (inv, y.attention_factor)
        }
    }
}

fn rope(x: &mut [f64], pos: usize, inv: &[f64], af: f64) {
    let h = inv.len();
    for i in 0..h {
        let a = inv[i] * pos as f64;
        let (c, s) = (a.cos() * af, a.sin() * af);
        let (x1, x2) = (x[i], x[i + h]);
        x[i] = x1 * c - x2 * s;
        x[i + h] = x2 * c + x1 * s;
    }
}

/// Selected experts and weights of one token.
fn route(cfg: &ModelConfig, z: &[f64], corr: Option<&[f32]>) -> Vec<(usize, f64)> {
    let k = cfg.top_k;
    let topk = |score: &dyn Fn(usize) -> f64| -> Vec<usize> {
        let mut idx: Vec<usize> = (0..z.len()).collect();
        idx.sort_by(|&a, &b| score(b).partial_cmp(&score(a)).unwrap().then(a.cmp(&b)));
        idx.truncate(k);
        idx
    };
    match cfg.router {
        RouterSpec::GptOss => {
            let sel = topk(&|e| z[e]);
            let m = z[sel[0]];
            let den: f64 = sel.iter().map(|&e| (z[e] - m).exp()).sum();
            sel.iter().map(|&e| (e, (z[e] - m).exp() / den)).collect()
        }
        RouterSpec::Qwen3 { norm_topk_prob } => {
            let m = z.iter().copied().fold(f64::NEG_INFINITY, f64::max);
            let den: f64 = z.iter().map(|v| (v - m).exp()).sum();
            let p: Vec<f64> = z.iter().map(|v| (v - m).exp() / den).collect();
            let sel = topk(&|e| p[e]);
            let s: f64 = if norm_topk_prob {
                sel.iter().map(|&e| p[e]).sum()
            } else {
                1.0
            };
            sel.iter().map(|&e| (e, p[e] / s)).collect()
        }
        RouterSpec::Sigmoid {
            norm_topk_prob,
            routed_scaling_factor,
            ..
        } => {
            let s: Vec<f64> = z.iter().map(|&v| sig(v)).collect();
            let sel = topk(&|e| s[e] + corr.map_or(0.0, |c| c[e] as f64));
            let den: f64 = if norm_topk_prob {
                sel.iter().map(|&e| s[e]).sum::<f64>() + 1e-20
            } else {
                1.0
            };
            sel.iter()
                .map(|&e| (e, s[e] / den * routed_scaling_factor as f64))
                .collect()
        }
    }
}

fn act(cfg: &ModelConfig, layout: GateUpLayout, gu: &[f64]) -> Vec<f64> {
    let i = gu.len() / 2;
    (0..i)
        .map(|j| {
            let (g, u) = match layout {
                GateUpLayout::Interleaved => (gu[2 * j], gu[2 * j + 1]),
                GateUpLayout::Halves => (gu[j], gu[i + j]),
            };
            match cfg.activation {
                Activation::Swiglu => g * sig(g) * u,
                Activation::ClampedSwiglu { alpha, limit } => {
                    let (a, l) = (alpha as f64, limit as f64);
                    let g = g.min(l);
                    let u = u.clamp(-l, l);
                    (u + 1.0) * g * sig(a * g)
                }
            }
        })
        .collect()
}

fn reference(cfg: &ModelConfig, w: &Weights, toks: &[u32]) -> M {
    let eps = cfg.rms_norm_eps as f64;
    let n = toks.len();
    let mut x: M = toks
        .iter()
        .map(|&t| w.embed.row(t as usize).iter().map(|&v| v as f64).collect())
        .collect();
    for (spec, lw) in cfg.layers.iter().zip(&w.layers) {
        let (nh, nkv, d, dv) = (
            spec.n_heads,
            spec.n_kv_heads,
            spec.head_dim,
            spec.v_head_dim,
        );
        let (inv, af) = freqs(&spec.rope);
        let mut q = Vec::new();
        let mut k = Vec::new();
        let mut v = Vec::new();
        for (p, xt) in x.iter().enumerate() {
            let h = rms(xt, &lw.input_norm, eps);
            let (mut qt, mut kt, mut vt) = (
                lin(&lw.attn.q, &h),
                lin(&lw.attn.k, &h),
                lin(&lw.attn.v, &h),
            );
            for (buf, nrm) in [(&mut qt, &lw.attn.q_norm), (&mut kt, &lw.attn.k_norm)] {
                for head in buf.chunks_mut(d) {
                    if let Some(nw) = nrm {
                        let r = rms(head, nw, eps);
                        head.copy_from_slice(&r);
                    }
                    rope(head, p, &inv, af);
                }
            }
            vt.iter_mut().for_each(|e| *e *= cfg.value_scale as f64);
            q.push(qt);
            k.push(kt);
            v.push(vt);
        }
        let scale = 1.0 / (d as f64).sqrt();
        for i in 0..n {
            let mut attn = vec![0f64; nh * dv];
            for hd in 0..nh {
                let g = hd / (nh / nkv);
                let qh = &q[i][hd * d..(hd + 1) * d];
                // Score row over all keys with an explicit mask.
                let visible = |j: usize| {
                    j <= i
                        && match spec.attn {
                            AttnKind::Full => true,
                            AttnKind::Sliding { window } => i < j + window,
                        }
                };
                let s: Vec<Option<f64>> = (0..n)
                    .map(|j| {
                        visible(j).then(|| {
                            qh.iter()
                                .zip(&k[j][g * d..(g + 1) * d])
                                .map(|(a, b)| a * b)
                                .sum::<f64>()
                                * scale
                        })
                    })
                    .collect();
                let sink = lw.attn.sinks.as_ref().map(|s| s[hd] as f64);
                let m = s
                    .iter()
                    .flatten()
                    .copied()
                    .fold(sink.unwrap_or(f64::NEG_INFINITY), f64::max);
                let den = s.iter().flatten().map(|v| (v - m).exp()).sum::<f64>()
                    + sink.map_or(0.0, |v| (v - m).exp());
                for (j, sj) in s.iter().enumerate() {
                    if let Some(sj) = sj {
                        let p = (sj - m).exp() / den;
                        for c in 0..dv {
                            attn[hd * dv + c] += p * v[j][g * dv + c];
                        }
                    }
                }
            }
            let o = lin(&lw.attn.o, &attn);
            x[i].iter_mut().zip(o).for_each(|(a, b)| *a += b);
        }
        for xt in x.iter_mut() {
            let h = rms(xt, &lw.post_attn_norm, eps);
            let y = match &lw.mlp {
                Mlp::Dense { gate_up, down } => {
                    lin(down, &act(cfg, GateUpLayout::Halves, &lin(gate_up, &h)))
                }
                Mlp::Moe(mo) => {
                    let z = lin(&mo.router, &h);
                    let mut y = vec![0f64; h.len()];
                    for (e, wt) in route(cfg, &z, mo.correction_bias.as_deref()) {
                        let ex = &mo.experts[e];
                        let mut gu = expert(&ex.gate_up, &h);
                        if let Some(b) = &ex.gate_up_bias {
                            gu.iter_mut().zip(b).for_each(|(a, &b)| *a += b as f64);
                        }
                        let mut dn = expert(&ex.down, &act(cfg, mo.gate_up_layout, &gu));
                        if let Some(b) = &ex.down_bias {
                            dn.iter_mut().zip(b).for_each(|(a, &b)| *a += b as f64);
                        }
                        y.iter_mut().zip(dn).for_each(|(a, b)| *a += wt * b);
                    }
                    y
                }
            };
            xt.iter_mut().zip(y).for_each(|(a, b)| *a += b);
        }
    }
    x.iter()
        .map(|xt| mat(&w.lm_head, &rms(xt, &w.final_norm, eps)))
        .collect()
}

#[test]
fn executor_matches_naive_f64_forward() {
    for (name, m) in toys() {
        let toks = tokens(21, 12, m.config().vocab_size);
        let want = reference(m.config(), m.weights(), &toks);
        let (got, _) = m.forward_full(&toks).unwrap();
        let mut worst = 0f64;
        let mut mag = 0f64;
        for (g, w) in got.iter().zip(&want) {
            for (&a, &b) in g.iter().zip(w) {
                worst = worst.max((a as f64 - b).abs());
                mag = mag.max(b.abs());
            }
        }
        println!("{name}: max |Δlogit| vs f64 = {worst:.2e} (max |logit| {mag:.2})");
        assert!(worst < 1e-5, "{name}: max |Δlogit| = {worst}");
    }
}
