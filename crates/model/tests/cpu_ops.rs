//! Unit tests of the CPU ops (`model::cpu::ops`, `model::cpu::rope`) against independent f64
//! formulas. Tolerances are relative to f32 rounding: a few ulps per op (stated per test).

use model::config::{Activation, AttnKind, LayerSpec, Rope, Yarn};
use model::cpu::ops::{self, AttnShape};
use model::cpu::rope::{yarn_correction_range, RopeTable};
use model::weights::{GateUpLayout, Mat};

/// Deterministic values in [-1, 1).
fn vals(seed: u64, n: usize) -> Vec<f32> {
    let mut s = seed.wrapping_add(0x9E37_79B9_7F4A_7C15);
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        })
        .collect()
}

fn dot64(a: &[f32], b: &[f32]) -> f64 {
    a.iter().zip(b).map(|(&x, &y)| x as f64 * y as f64).sum()
}

#[test]
fn dot_matches_f64() {
    for n in [0, 1, 7, 15, 16, 17, 31, 64, 100, 2880] {
        let (a, b) = (vals(n as u64, n), vals(1000 + n as u64, n));
        let want = dot64(&a, &b);
        let bound: f64 = a.iter().zip(&b).map(|(x, y)| (x * y).abs() as f64).sum();
        // f32 summation error ≤ n·u·Σ|a_i b_i| (u = 2^-24); far below for these trees.
        assert!(
            (ops::dot(&a, &b) as f64 - want).abs() <= (n as f64 + 1.0) * 6e-8 * bound + 1e-30,
            "n = {n}"
        );
    }
}

#[test]
fn dot_kernels_are_bit_identical() {
    // The dispatched kernel (AVX2 where available) and the portable definition agree exactly.
    for n in (0..200).chain([2880, 4096, 5759]) {
        let a: Vec<f32> = vals(3 * n as u64, n).iter().map(|v| v * 1e3).collect();
        let b = vals(5 * n as u64 + 1, n);
        assert_eq!(
            ops::dot(&a, &b).to_bits(),
            ops::dot_portable(&a, &b).to_bits(),
            "n = {n}"
        );
    }
}

#[test]
fn matvec_and_matmul_match_f64_and_each_other() {
    // 600 x 300 = 180k entries: above PAR_MIN_WORK, so the rayon path runs; t = 40 crosses the
    // 32-token tile of matmul.
    for (rows, cols, t) in [(5, 7, 3), (64, 96, 1), (600, 300, 40), (300, 600, 2)] {
        let w = Mat::from_f32(rows, cols, vals(rows as u64, rows * cols));
        let x = vals(7 + cols as u64, t * cols);
        let mut y = vec![0f32; t * rows];
        ops::matmul(&w, &x, t, &mut y);
        for j in 0..t {
            let xj = &x[j * cols..(j + 1) * cols];
            let mut yv = vec![0f32; rows];
            ops::matvec(&w, xj, &mut yv);
            // Batched rows are bit-identical to single-vector products.
            assert_eq!(&y[j * rows..(j + 1) * rows], &yv[..]);
            for (r, &got) in yv.iter().enumerate() {
                let want = dot64(&w.row(r), xj);
                assert!(
                    (got as f64 - want).abs() <= 1e-5 * (cols as f64).sqrt(),
                    "{rows}x{cols} r={r}"
                );
            }
        }
    }
}

#[test]
fn rms_norm_matches_f64() {
    let x = vals(3, 96);
    let w = vals(4, 96);
    let eps = 1e-5f32;
    let mut out = vec![0f32; 96];
    ops::rms_norm(&x, &w, eps, &mut out);
    let ms: f64 = x.iter().map(|&v| (v as f64).powi(2)).sum::<f64>() / 96.0;
    let r = 1.0 / (ms + eps as f64).sqrt();
    for i in 0..96 {
        let want = w[i] as f64 * x[i] as f64 * r;
        assert!(
            (out[i] as f64 - want).abs() <= 1e-6 * want.abs().max(1e-3),
            "i={i}"
        );
    }
    // In-place and row-wise forms are the same function.
    let mut rows = [x.clone(), x.clone()].concat();
    ops::rms_norm_rows(&mut rows, &w, eps);
    assert_eq!(&rows[..96], &out[..]);
    assert_eq!(&rows[96..], &out[..]);
}

fn yarn_20b() -> (Rope, Yarn) {
    let y = Yarn {
        factor: 32.0,
        beta_fast: 32.0,
        beta_slow: 1.0,
        original_max_position_embeddings: 4096,
        truncate: false,
        attention_factor: 0.1 * 32f64.ln() + 1.0,
    };
    (
        Rope {
            theta: 150000.0,
            rotary_dim: 64,
            yarn: Some(y),
        },
        y,
    )
}

/// An independent f64 transcription of transformers' `_compute_yarn_parameters`.
fn yarn_f64(dim: usize, base: f64, y: &Yarn) -> (Vec<f64>, f64, f64) {
    let corr = |r: f64| {
        dim as f64
            * (y.original_max_position_embeddings as f64 / (2.0 * std::f64::consts::PI * r)).ln()
            / (2.0 * base.ln())
    };
    let (mut low, mut high) = (corr(y.beta_fast), corr(y.beta_slow));
    if y.truncate {
        low = low.floor();
        high = high.ceil();
    }
    let (low, high) = (low.max(0.0), high.min(dim as f64 - 1.0));
    let inv = (0..dim / 2)
        .map(|i| {
            let pf = base.powf(2.0 * i as f64 / dim as f64);
            let (extrap, interp) = (1.0 / pf, 1.0 / (y.factor * pf));
            let ramp = ((i as f64 - low) / (high - low)).clamp(0.0, 1.0);
            let m = 1.0 - ramp;
            interp * (1.0 - m) + extrap * m
        })
        .collect();
    (inv, low, high)
}

#[test]
fn yarn_gpt_oss_20b_numbers() {
    let (rope, y) = yarn_20b();
    let (low, high) = yarn_correction_range(64, 150000.0, &y);
    // research/models.md §1.4: low = 8.0928, high = 17.398, attention factor 1.34657.
    assert!((low - 8.0928).abs() < 1e-4, "low = {low}");
    assert!((high - 17.398).abs() < 1e-3, "high = {high}");
    assert!((y.attention_factor - 1.34657).abs() < 1e-5);
    let (inv64, l64, h64) = yarn_f64(64, 150000.0, &y);
    assert!((l64 - low).abs() < 1e-12 && (h64 - high).abs() < 1e-12);
    let t = RopeTable::new(&rope);
    assert_eq!(t.inv_freq.len(), 32);
    assert_eq!(t.attention_factor, 1.346_573_6_f32);
    for (i, (&a, &b)) in t.inv_freq.iter().zip(&inv64).enumerate() {
        // f32 evaluation of the same formula: a few ulps.
        assert!(((a as f64 - b) / b).abs() < 1e-6, "i={i}: {a} vs {b}");
    }
    // Outside the ramp: pure extrapolation below low, pure interpolation above high.
    assert!(((t.inv_freq[0] as f64) - 1.0).abs() < 1e-7);
    let pf31 = 150000f64.powf(62.0 / 64.0);
    assert!(((t.inv_freq[31] as f64) * 32.0 * pf31 - 1.0).abs() < 1e-6);
    // cos and sin carry the attention factor.
    let (mut c, mut s) = (vec![0f32; 32], vec![0f32; 32]);
    t.cos_sin(0, &mut c, &mut s);
    assert!(c.iter().all(|&v| v == t.attention_factor) && s.iter().all(|&v| v == 0.0));
    t.cos_sin(1000, &mut c, &mut s);
    for i in 0..32 {
        let a = (t.inv_freq[i] * 1000.0) as f64;
        assert!((c[i] as f64 - a.cos() * 1.346_573_6).abs() < 1e-6);
        assert!((s[i] as f64 - a.sin() * 1.346_573_6).abs() < 1e-6);
    }
}

#[test]
fn yarn_truncate_and_partial_dims() {
    let (_, mut y) = yarn_20b();
    y.truncate = true;
    assert_eq!(yarn_correction_range(64, 150000.0, &y), (8.0, 18.0));
    for dim in [16, 48, 64] {
        for truncate in [false, true] {
            y.truncate = truncate;
            let t = RopeTable::new(&Rope {
                theta: 10000.0,
                rotary_dim: dim,
                yarn: Some(y),
            });
            let (inv, _, _) = yarn_f64(dim, 10000.0, &y);
            for (a, b) in t.inv_freq.iter().zip(&inv) {
                assert!(
                    ((*a as f64 - b) / b).abs() < 1e-6,
                    "dim {dim} truncate {truncate}"
                );
            }
        }
    }
}

#[test]
fn default_rope_inv_freq() {
    for (theta, dim) in [(1e6, 32), (5e6, 16), (1e4, 64)] {
        let t = RopeTable::new(&Rope {
            theta,
            rotary_dim: dim,
            yarn: None,
        });
        assert_eq!(t.attention_factor, 1.0);
        for (i, &f) in t.inv_freq.iter().enumerate() {
            let want = theta.powf(-(2.0 * i as f64) / dim as f64);
            assert!(((f as f64 - want) / want).abs() < 2e-7, "θ {theta} i {i}");
        }
    }
}

#[test]
fn rope_half_split_partial() {
    // head_dim 8, rotary 4: dims 0,1 pair with 2,3; dims 4..8 untouched.
    let mut x = [1.0f32, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0];
    let (c, s) = ([0.6f32, 0.0], [0.8f32, 1.0]);
    ops::apply_rope(&mut x[..], &c, &s);
    let want = [
        1.0 * 0.6 - 3.0 * 0.8,
        2.0 * 0.0 - 4.0 * 1.0,
        3.0 * 0.6 + 1.0 * 0.8,
        4.0 * 0.0 + 2.0 * 1.0,
        5.0,
        6.0,
        7.0,
        8.0,
    ];
    assert_eq!(x, want);
    // Per head.
    let mut two = [[1.0f32, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0]; 2].concat();
    ops::apply_rope_heads(&mut two, 8, &c, &s);
    assert_eq!(&two[..8], &want[..]);
    assert_eq!(&two[8..], &want[..]);
}

/// Naive f64 attention of one query head over n keys, with an optional sink.
fn attn_f64(
    q: &[f32],
    ks: &[Vec<f32>],
    vs: &[Vec<f32>],
    scale: f64,
    sink: Option<f32>,
) -> Vec<f64> {
    let s: Vec<f64> = ks.iter().map(|k| dot64(q, k) * scale).collect();
    let m = s
        .iter()
        .copied()
        .fold(sink.map_or(f64::NEG_INFINITY, |x| x as f64), f64::max);
    let e: Vec<f64> = s.iter().map(|x| (x - m).exp()).collect();
    let den: f64 = e.iter().sum::<f64>() + sink.map_or(0.0, |x| (x as f64 - m).exp());
    let mut out = vec![0f64; vs[0].len()];
    for (p, v) in e.iter().zip(vs) {
        for (o, &x) in out.iter_mut().zip(v) {
            *o += p / den * x as f64;
        }
    }
    out
}

#[test]
fn attention_head_matches_f64_with_and_without_sink() {
    let (d, dv, n) = (16, 8, 9);
    let q = vals(1, d);
    let ks: Vec<Vec<f32>> = (0..n)
        .map(|j| vals(10 + j as u64, d).iter().map(|v| v * 3.0).collect())
        .collect();
    let vs: Vec<Vec<f32>> = (0..n).map(|j| vals(100 + j as u64, dv)).collect();
    let kflat = ks.concat();
    let vflat = vs.concat();
    let scale = 0.25f32;
    let mut scores = Vec::new();
    for sink in [None, Some(0.7f32), Some(-2.0)] {
        let mut out = vec![0f32; dv];
        ops::attention_head(
            &q,
            &kflat,
            d,
            &vflat,
            dv,
            n,
            scale,
            sink,
            &mut scores,
            &mut out,
        );
        let want = attn_f64(&q, &ks, &vs, scale as f64, sink);
        for (a, b) in out.iter().zip(&want) {
            assert!((*a as f64 - b).abs() < 1e-6, "sink {sink:?}: {a} vs {b}");
        }
    }
    // A huge sink takes (almost) all the probability mass: the output vanishes.
    let mut out = vec![1f32; dv];
    ops::attention_head(
        &q,
        &kflat,
        d,
        &vflat,
        dv,
        n,
        scale,
        Some(1e4),
        &mut scores,
        &mut out,
    );
    assert!(out.iter().all(|v| v.abs() < 1e-30), "{out:?}");
    // A sink of −∞-like size changes nothing at all.
    let mut a = vec![0f32; dv];
    let mut b = vec![0f32; dv];
    ops::attention_head(
        &q,
        &kflat,
        d,
        &vflat,
        dv,
        n,
        scale,
        None,
        &mut scores,
        &mut a,
    );
    ops::attention_head(
        &q,
        &kflat,
        d,
        &vflat,
        dv,
        n,
        scale,
        Some(-1e30),
        &mut scores,
        &mut b,
    );
    assert_eq!(a, b);
}

fn spec(attn: AttnKind, n_heads: usize, n_kv_heads: usize, d: usize, dv: usize) -> LayerSpec {
    LayerSpec {
        attn,
        n_heads,
        n_kv_heads,
        head_dim: d,
        v_head_dim: dv,
        rope: Rope {
            theta: 1e4,
            rotary_dim: d,
            yarn: None,
        },
        sinks: false,
        qk_norm: false,
        attn_bias: false,
        moe: true,
    }
}

#[test]
fn sliding_window_and_gqa_visibility() {
    // Values are one-hot in the key position, so the output is the attention distribution.
    let (nh, nkv, d, n) = (4, 2, 4, 12);
    let shape = AttnShape::from_spec(&spec(AttnKind::Sliding { window: 4 }, nh, nkv, d, n));
    assert_eq!(shape.scale, 0.5);
    assert_eq!(
        (
            shape.kv_head(0),
            shape.kv_head(1),
            shape.kv_head(2),
            shape.kv_head(3)
        ),
        (0, 0, 1, 1)
    );
    let k_rows = vals(5, n * nkv * d);
    let mut v_rows = vec![0f32; n * nkv * n];
    for p in 0..n {
        for g in 0..nkv {
            v_rows[p * nkv * n + g * n + p] = 1.0;
        }
    }
    let q = vals(6, nh * d);
    let mut scores = Vec::new();
    for pos in 0..n {
        let mut out = vec![0f32; nh * n];
        ops::attention_query(
            &shape,
            &q,
            &k_rows,
            &v_rows,
            0,
            pos,
            None,
            &mut scores,
            &mut out,
        );
        for h in 0..nh {
            let probs = &out[h * n..(h + 1) * n];
            for (j, &p) in probs.iter().enumerate() {
                // Key j visible from query i iff i − W < j ≤ i.
                let visible = pos < j + 4 && j <= pos;
                assert_eq!(p > 0.0, visible, "pos {pos} head {h} key {j}");
            }
            assert!((probs.iter().sum::<f32>() - 1.0).abs() < 1e-6);
        }
        // The cache may start later (rows before the window dropped) with the same result.
        let first = (pos + 1).saturating_sub(4);
        let mut out2 = vec![0f32; nh * n];
        ops::attention_query(
            &shape,
            &q,
            &k_rows[first * nkv * d..],
            &v_rows[first * nkv * n..],
            first,
            pos,
            None,
            &mut scores,
            &mut out2,
        );
        assert_eq!(out, out2);
    }
    // Full attention sees everything up to the query.
    let full = AttnShape::from_spec(&spec(AttnKind::Full, nh, nkv, d, n));
    let mut out = vec![0f32; nh * n];
    ops::attention_query(
        &full,
        &q,
        &k_rows,
        &v_rows,
        0,
        10,
        None,
        &mut scores,
        &mut out,
    );
    assert!(out[..n]
        .iter()
        .enumerate()
        .all(|(j, &p)| (p > 0.0) == (j <= 10)));
}

#[test]
fn attention_rows_parallel_equals_serial() {
    // Large enough (t·heads·visible·(d+dv) ≥ PAR_MIN_WORK) to take the rayon path.
    let (nh, nkv, d, dv, t) = (8, 2, 64, 64, 64);
    let shape = AttnShape::from_spec(&spec(AttnKind::Full, nh, nkv, d, dv));
    let k_rows = vals(1, t * nkv * d);
    let v_rows = vals(2, t * nkv * dv);
    let q = vals(3, t * nh * d);
    let sinks = vals(4, nh);
    let mut scores = Vec::new();
    let mut out = vec![0f32; t * nh * dv];
    ops::attention_rows(
        &shape,
        &q,
        &k_rows,
        &v_rows,
        0,
        0,
        t,
        Some(&sinks),
        &mut scores,
        &mut out,
    );
    for ti in 0..t {
        let mut o = vec![0f32; nh * dv];
        ops::attention_query(
            &shape,
            &q[ti * nh * d..(ti + 1) * nh * d],
            &k_rows,
            &v_rows,
            0,
            ti,
            Some(&sinks),
            &mut scores,
            &mut o,
        );
        assert_eq!(&out[ti * nh * dv..(ti + 1) * nh * dv], &o[..]);
    }
}

#[test]
fn activations() {
    let (alpha, limit) = (1.702f32, 7.0f32);
    let sig = |x: f64| 1.0 / (1.0 + (-x).exp());
    for (g, u) in [
        (0.5f32, -0.3f32),
        (10.0, -10.0),
        (-9.0, 9.0),
        (7.0, 7.0),
        (-0.1, 0.2),
    ] {
        let gc = (g as f64).min(7.0);
        let uc = (u as f64).clamp(-7.0, 7.0);
        let want = (uc + 1.0) * gc * sig(1.702 * gc);
        let got = ops::clamped_swiglu(g, u, alpha, limit) as f64;
        assert!(
            (got - want).abs() < 1e-6 * want.abs().max(1.0),
            "({g}, {u})"
        );
        let want = g as f64 * sig(g as f64) * u as f64;
        assert!((ops::swiglu(g, u) as f64 - want).abs() < 1e-6 * want.abs().max(1.0));
    }
    // Layouts: interleaved (gate 2j, up 2j+1) vs halves (gate j, up I+j).
    let gate = [0.5f32, -1.0, 2.0];
    let up = [1.5f32, 0.25, -3.0];
    let inter: Vec<f32> = gate.iter().zip(&up).flat_map(|(&g, &u)| [g, u]).collect();
    let halves: Vec<f32> = gate.iter().chain(&up).copied().collect();
    for act in [
        Activation::Swiglu,
        Activation::ClampedSwiglu { alpha, limit },
    ] {
        let (mut a, mut b) = (vec![0f32; 3], vec![0f32; 3]);
        ops::glu(act, GateUpLayout::Interleaved, &inter, &mut a);
        ops::glu(act, GateUpLayout::Halves, &halves, &mut b);
        assert_eq!(a, b);
        for j in 0..3 {
            let want = match act {
                Activation::Swiglu => ops::swiglu(gate[j], up[j]),
                Activation::ClampedSwiglu { alpha, limit } => {
                    ops::clamped_swiglu(gate[j], up[j], alpha, limit)
                }
            };
            assert_eq!(a[j], want);
        }
    }
}
