//! Router variants against an independent f64 reference, hand-computed cases, ties, groups,
//! renormalization, scaling and every error.

use moe::{route, route_into, RouterKind, RouterScratch, Routing, RoutingError, SigmoidRouter};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

// ---------------------------------------------------------------------------------------------
// f64 reference: sort-based (not the crate's insertion algorithm), written from the formulas in
// research/mxfp4-moe.md §4.
// ---------------------------------------------------------------------------------------------

/// Indices sorted by descending score, ties by ascending index; scores of `None` are excluded.
fn ref_order(scores: &[Option<f64>]) -> Vec<usize> {
    let mut idx: Vec<usize> = (0..scores.len()).filter(|&i| scores[i].is_some()).collect();
    idx.sort_by(|&a, &b| {
        scores[b]
            .unwrap()
            .partial_cmp(&scores[a].unwrap())
            .unwrap()
            .then(a.cmp(&b))
    });
    idx
}

/// Reference result plus the gap between the k-th and (k+1)-th selection score (∞ if none).
struct RefRouting {
    experts: Vec<usize>,
    weights: Vec<f64>,
    margin: f64,
}

fn select(scores: &[Option<f64>], k: usize) -> (Vec<usize>, f64) {
    let order = ref_order(scores);
    let margin = if order.len() > k {
        scores[order[k - 1]].unwrap() - scores[order[k]].unwrap()
    } else {
        f64::INFINITY
    };
    (order[..k].to_vec(), margin)
}

fn ref_gpt_oss(logits: &[f32], bias: Option<&[f32]>, k: usize) -> RefRouting {
    let z: Vec<Option<f64>> = (0..logits.len())
        .map(|e| Some(logits[e] as f64 + bias.map_or(0.0, |b| b[e] as f64)))
        .collect();
    let (experts, margin) = select(&z, k);
    let m = experts
        .iter()
        .map(|&e| z[e].unwrap())
        .fold(f64::NEG_INFINITY, f64::max);
    let ex: Vec<f64> = experts.iter().map(|&e| (z[e].unwrap() - m).exp()).collect();
    let s: f64 = ex.iter().sum();
    RefRouting {
        experts,
        weights: ex.iter().map(|v| v / s).collect(),
        margin,
    }
}

fn ref_qwen3(logits: &[f32], norm: bool, k: usize) -> RefRouting {
    let m = logits
        .iter()
        .map(|&v| v as f64)
        .fold(f64::NEG_INFINITY, f64::max);
    let s: f64 = logits.iter().map(|&v| (v as f64 - m).exp()).sum();
    let p: Vec<Option<f64>> = logits
        .iter()
        .map(|&v| Some((v as f64 - m).exp() / s))
        .collect();
    let (experts, margin) = select(&p, k);
    let mut weights: Vec<f64> = experts.iter().map(|&e| p[e].unwrap()).collect();
    if norm {
        let t: f64 = weights.iter().sum();
        weights.iter_mut().for_each(|w| *w /= t);
    }
    RefRouting {
        experts,
        weights,
        margin,
    }
}

fn ref_sigmoid(logits: &[f32], p: &SigmoidRouter<'_>, k: usize) -> RefRouting {
    let e_count = logits.len();
    let s: Vec<f64> = logits
        .iter()
        .map(|&z| 1.0 / (1.0 + (-(z as f64)).exp()))
        .collect();
    let c: Vec<f64> = (0..e_count)
        .map(|e| s[e] + p.correction_bias.map_or(0.0, |b| b[e] as f64))
        .collect();
    let gs = e_count / p.n_group;
    let mut candidate: Vec<Option<f64>> = c.iter().map(|&v| Some(v)).collect();
    if p.n_group > 1 {
        let group_scores: Vec<Option<f64>> = (0..p.n_group)
            .map(|g| {
                let mut v: Vec<f64> = c[g * gs..(g + 1) * gs].to_vec();
                v.sort_by(|a, b| b.partial_cmp(a).unwrap());
                Some(if p.correction_bias.is_some() {
                    v.iter().take(2).sum()
                } else {
                    v[0]
                })
            })
            .collect();
        let kept = &ref_order(&group_scores)[..p.topk_group];
        for (e, cand) in candidate.iter_mut().enumerate() {
            if !kept.contains(&(e / gs)) {
                *cand = None;
            }
        }
    }
    let (experts, margin) = select(&candidate, k);
    let mut weights: Vec<f64> = experts.iter().map(|&e| s[e]).collect();
    if p.norm_topk_prob {
        let t: f64 = weights.iter().sum::<f64>() + 1e-20;
        weights.iter_mut().for_each(|w| *w /= t);
    }
    weights
        .iter_mut()
        .for_each(|w| *w *= p.routed_scaling_factor as f64);
    RefRouting {
        experts,
        weights,
        margin,
    }
}

// ---------------------------------------------------------------------------------------------

/// Selection margins below this are near-ties where f32 and f64 may legitimately disagree.
const MIN_MARGIN: f64 = 1e-5;

fn random_vec(rng: &mut ChaCha8Rng, n: usize, lo: f32, hi: f32) -> Vec<f32> {
    (0..n).map(|_| rng.random_range(lo..hi)).collect()
}

/// Compares the crate against the reference; returns whether the case was a near-tie (skipped).
fn check(got: &Routing, want: &RefRouting, tol: f64, what: &str) -> bool {
    if want.margin < MIN_MARGIN {
        return true;
    }
    assert_eq!(got.experts, want.experts, "{what}: experts");
    assert_eq!(got.weights.len(), want.weights.len(), "{what}: weights len");
    for (j, (&g, &w)) in got.weights.iter().zip(&want.weights).enumerate() {
        assert!(
            (g as f64 - w).abs() <= tol * (1.0 + w.abs()),
            "{what}: weight {j}: got {g}, want {w}"
        );
    }
    false
}

#[test]
fn gpt_oss_matches_f64_reference() {
    let mut rng = ChaCha8Rng::seed_from_u64(0x6770_7453);
    let mut skipped = 0;
    for case in 0..500 {
        let e = [4usize, 8, 32, 128][case % 4];
        let k = 1 + case % e.min(8);
        let logits = random_vec(&mut rng, e, -6.0, 6.0);
        let bias = random_vec(&mut rng, e, -1.0, 1.0);
        let b = if case % 3 == 0 { None } else { Some(&bias[..]) };
        let got = route(&RouterKind::GptOss { bias: b }, &logits, k).unwrap();
        let want = ref_gpt_oss(&logits, b, k);
        skipped += check(&got, &want, 1e-6, &format!("case {case}")) as usize;
        let s: f32 = got.weights.iter().sum();
        assert!((s - 1.0).abs() < 1e-6);
    }
    assert!(skipped < 5, "too many near-ties skipped: {skipped}");
}

#[test]
fn qwen3_matches_f64_reference() {
    let mut rng = ChaCha8Rng::seed_from_u64(0x5177_656e);
    let mut skipped = 0;
    for case in 0..500 {
        let e = [4usize, 16, 64, 128][case % 4];
        let k = 1 + case % e.min(8);
        let norm = case % 2 == 0;
        let logits = random_vec(&mut rng, e, -8.0, 8.0);
        let got = route(
            &RouterKind::Qwen3Moe {
                norm_topk_prob: norm,
            },
            &logits,
            k,
        )
        .unwrap();
        let want = ref_qwen3(&logits, norm, k);
        skipped += check(&got, &want, 1e-5, &format!("case {case}")) as usize;
    }
    assert!(skipped < 5, "too many near-ties skipped: {skipped}");
}

#[test]
fn sigmoid_matches_f64_reference() {
    let mut rng = ChaCha8Rng::seed_from_u64(0x5369_676d);
    let mut skipped = 0;
    // (E, n_group, topk_group, k)
    let shapes = [
        (8usize, 1usize, 1usize, 2usize),
        (16, 4, 2, 4),
        (64, 8, 4, 8),
        (256, 8, 4, 8),
        (256, 1, 1, 8),
        (12, 6, 3, 3),
        (6, 6, 2, 2), // groups of one expert
    ];
    for case in 0..700 {
        let (e, n_group, topk_group, k) = shapes[case % shapes.len()];
        let logits = random_vec(&mut rng, e, -5.0, 5.0);
        let bias = random_vec(&mut rng, e, -0.5, 0.5);
        let p = SigmoidRouter {
            correction_bias: if case % 3 == 0 { None } else { Some(&bias) },
            n_group,
            topk_group,
            norm_topk_prob: case % 2 == 0,
            routed_scaling_factor: [1.0, 2.5, 0.75][case % 3],
        };
        let got = route(&RouterKind::Sigmoid(p), &logits, k).unwrap();
        let want = ref_sigmoid(&logits, &p, k);
        skipped += check(&got, &want, 1e-6, &format!("case {case}")) as usize;
    }
    assert!(skipped < 5, "too many near-ties skipped: {skipped}");
}

// ---------------------------------------------------------------------------------------------
// Hand-computed cases
// ---------------------------------------------------------------------------------------------

fn assert_close(got: &[f32], want: &[f32]) {
    assert_eq!(got.len(), want.len());
    for (g, w) in got.iter().zip(want) {
        assert!((g - w).abs() < 1e-6, "got {got:?}, want {want:?}");
    }
}

#[test]
fn gpt_oss_hand_computed() {
    // top-2 of [1, 3, 2, 0] = experts 1, 2; softmax([3, 2]) = [1/(1+e^-1), 1/(1+e)].
    let r = route(&RouterKind::GptOss { bias: None }, &[1.0, 3.0, 2.0, 0.0], 2).unwrap();
    assert_eq!(r.experts, vec![1, 2]);
    assert_close(&r.weights, &[0.731_058_6, 0.268_941_43]);
    // The bias changes selection and weights: [1+2, 3, 2, 0-1] -> tie 3/3, lower id first.
    let bias = [2.0, 0.0, 0.0, -1.0];
    let r = route(
        &RouterKind::GptOss { bias: Some(&bias) },
        &[1.0, 3.0, 2.0, 0.0],
        3,
    )
    .unwrap();
    assert_eq!(r.experts, vec![0, 1, 2]);
    let d = 2.0 + (-1.0f32).exp();
    assert_close(&r.weights, &[1.0 / d, 1.0 / d, (-1.0f32).exp() / d]);
    // k = 1 always gives weight 1.
    let r = route(&RouterKind::GptOss { bias: None }, &[-5.0, -7.0], 1).unwrap();
    assert_eq!((r.experts, r.weights), (vec![0], vec![1.0]));
}

#[test]
fn qwen3_hand_computed_renorm_on_off() {
    // softmax([0, ln2, ln3, ln4]) = [0.1, 0.2, 0.3, 0.4].
    let logits = [0.0, 2f32.ln(), 3f32.ln(), 4f32.ln()];
    let off = route(
        &RouterKind::Qwen3Moe {
            norm_topk_prob: false,
        },
        &logits,
        2,
    )
    .unwrap();
    assert_eq!(off.experts, vec![3, 2]);
    assert_close(&off.weights, &[0.4, 0.3]);
    let on = route(
        &RouterKind::Qwen3Moe {
            norm_topk_prob: true,
        },
        &logits,
        2,
    )
    .unwrap();
    assert_eq!(on.experts, vec![3, 2]);
    assert_close(&on.weights, &[4.0 / 7.0, 3.0 / 7.0]);
    // k = E with renorm: the full softmax.
    let all = route(
        &RouterKind::Qwen3Moe {
            norm_topk_prob: true,
        },
        &logits,
        4,
    )
    .unwrap();
    assert_eq!(all.experts, vec![3, 2, 1, 0]);
    assert_close(&all.weights, &[0.4, 0.3, 0.2, 0.1]);
    // Numerically stable on huge logits.
    let big = route(
        &RouterKind::Qwen3Moe {
            norm_topk_prob: false,
        },
        &[1000.0, 1001.0, -1000.0],
        1,
    )
    .unwrap();
    assert_eq!(big.experts, vec![1]);
    assert_close(&big.weights, &[0.731_058_6]); // e / (1 + e)
}

#[test]
fn sigmoid_hand_computed_bias_selects_only() {
    // s = sigmoid([ln3, -ln3, 0, ln4]) = [0.75, 0.25, 0.5, 0.8]
    // c = s + [0, 0.6, 0.3, -0.2]      = [0.75, 0.85, 0.8, 0.6]  -> top-2 = experts 1, 2
    // weights from s: [0.25, 0.5]; renorm -> [1/3, 2/3]; × 2.5.
    let logits = [3f32.ln(), -(3f32.ln()), 0.0, 4f32.ln()];
    let bias = [0.0, 0.6, 0.3, -0.2];
    let mut p = SigmoidRouter {
        correction_bias: Some(&bias),
        n_group: 1,
        topk_group: 1,
        norm_topk_prob: true,
        routed_scaling_factor: 2.5,
    };
    let r = route(&RouterKind::Sigmoid(p), &logits, 2).unwrap();
    assert_eq!(r.experts, vec![1, 2]);
    assert_close(&r.weights, &[2.5 / 3.0, 5.0 / 3.0]);
    // Renorm off: raw sigmoid × scale.
    p.norm_topk_prob = false;
    let r = route(&RouterKind::Sigmoid(p), &logits, 2).unwrap();
    assert_eq!(r.experts, vec![1, 2]);
    assert_close(&r.weights, &[0.625, 1.25]);
    // No bias: selection on s alone -> experts 3, 0.
    let r = route(&RouterKind::Sigmoid(SigmoidRouter::new(None)), &logits, 2).unwrap();
    assert_eq!(r.experts, vec![3, 0]);
    assert_close(&r.weights, &[0.8 / 1.55, 0.75 / 1.55]);
}

#[test]
fn sigmoid_scaling_factor_multiplies_weights() {
    let mut rng = ChaCha8Rng::seed_from_u64(7);
    let logits = random_vec(&mut rng, 32, -3.0, 3.0);
    let bias = random_vec(&mut rng, 32, -0.2, 0.2);
    for norm in [false, true] {
        let mut p = SigmoidRouter {
            correction_bias: Some(&bias),
            n_group: 4,
            topk_group: 2,
            norm_topk_prob: norm,
            routed_scaling_factor: 1.0,
        };
        let one = route(&RouterKind::Sigmoid(p), &logits, 4).unwrap();
        p.routed_scaling_factor = 2.5;
        let scaled = route(&RouterKind::Sigmoid(p), &logits, 4).unwrap();
        assert_eq!(one.experts, scaled.experts);
        for (a, b) in one.weights.iter().zip(&scaled.weights) {
            assert!((a * 2.5 - b).abs() <= 1e-6 * b.abs());
        }
        if norm {
            let s: f32 = one.weights.iter().sum();
            assert!((s - 1.0).abs() < 1e-6);
        }
    }
}

fn logit(s: f64) -> f32 {
    (s / (1.0 - s)).ln() as f32
}

#[test]
fn sigmoid_group_masking() {
    // 8 experts in 4 groups of 2; sigmoid scores per group:
    //   g0: [0.9, 0.1]  g1: [0.8, 0.7]  g2: [0.85, 0.05]  g3: [0.2, 0.3]
    let s = [0.9, 0.1, 0.8, 0.7, 0.85, 0.05, 0.2, 0.3];
    let logits: Vec<f32> = s.iter().map(|&v| logit(v)).collect();
    let zeros = [0.0f32; 8];
    let base = SigmoidRouter {
        correction_bias: Some(&zeros),
        n_group: 4,
        topk_group: 2,
        norm_topk_prob: false,
        routed_scaling_factor: 1.0,
    };
    // With a bias present the group score is the top-2 sum: g0 1.0, g1 1.5, g2 0.9, g3 0.5
    // -> keep g1, g0 -> top-2 of experts {0,1,2,3} = 0 (0.9), 2 (0.8). Expert 4 (0.85) is masked.
    let r = route(&RouterKind::Sigmoid(base), &logits, 2).unwrap();
    assert_eq!(r.experts, vec![0, 2]);
    assert_close(&r.weights, &[0.9, 0.8]);
    // Without a bias the group score is the max: g0 0.9, g1 0.8, g2 0.85, g3 0.3
    // -> keep g0, g2 -> top-2 of {0,1,4,5} = 0, 4.
    let no_bias = SigmoidRouter {
        correction_bias: None,
        ..base
    };
    let r = route(&RouterKind::Sigmoid(no_bias), &logits, 2).unwrap();
    assert_eq!(r.experts, vec![0, 4]);
    // k = 3 with the bias: from {0,1,2,3}: 0, 2, 3 (0.7) — expert 4 (0.85) still masked.
    let r = route(&RouterKind::Sigmoid(base), &logits, 3).unwrap();
    assert_eq!(r.experts, vec![0, 2, 3]);
    // topk_group == n_group keeps everything: plain top-2 = 0, 4.
    let all = SigmoidRouter {
        topk_group: 4,
        ..base
    };
    let r = route(&RouterKind::Sigmoid(all), &logits, 2).unwrap();
    assert_eq!(r.experts, vec![0, 4]);
    // A bias moves a whole group in: +0.6 on expert 7 makes g3 = 0.2 + 0.9 = 1.1 > g0 (1.0).
    let mut b = [0.0f32; 8];
    b[7] = 0.6;
    let biased = SigmoidRouter {
        correction_bias: Some(&b),
        ..base
    };
    let r = route(&RouterKind::Sigmoid(biased), &logits, 2).unwrap();
    assert_eq!(r.experts, vec![7, 2]); // c7 = 0.9, c2 = 0.8; weights from s
    assert_close(&r.weights, &[0.3, 0.8]);
}

#[test]
fn tie_breaking_lower_id_first() {
    let flat = [1.0f32; 6];
    let kinds = [
        RouterKind::GptOss { bias: None },
        RouterKind::Qwen3Moe {
            norm_topk_prob: true,
        },
        RouterKind::Sigmoid(SigmoidRouter::new(None)),
    ];
    for kind in &kinds {
        let r = route(kind, &flat, 3).unwrap();
        assert_eq!(r.experts, vec![0, 1, 2], "{kind:?}");
        assert_close(&r.weights, &[1.0 / 3.0; 3]);
        // A tie straddling the k-th place: [0, 2, 1, 2, 1] -> 1, 3 then 2 before 4.
        let r = route(kind, &[0.0, 2.0, 1.0, 2.0, 1.0], 3).unwrap();
        assert_eq!(r.experts, vec![1, 3, 2], "{kind:?}");
        let r = route(kind, &[0.0, 2.0, 1.0, 2.0, 1.0], 2).unwrap();
        assert_eq!(r.experts, vec![1, 3], "{kind:?}");
    }
    // Tied group scores: the lower group id is kept.
    let logits = [0.0f32; 8];
    let p = SigmoidRouter {
        correction_bias: None,
        n_group: 4,
        topk_group: 1,
        norm_topk_prob: true,
        routed_scaling_factor: 1.0,
    };
    let r = route(&RouterKind::Sigmoid(p), &logits, 2).unwrap();
    assert_eq!(r.experts, vec![0, 1]);
}

#[test]
fn route_into_reuses_buffers() {
    let mut rng = ChaCha8Rng::seed_from_u64(11);
    let bias = random_vec(&mut rng, 64, -0.1, 0.1);
    let kind = RouterKind::Sigmoid(SigmoidRouter {
        correction_bias: Some(&bias),
        n_group: 8,
        topk_group: 4,
        norm_topk_prob: true,
        routed_scaling_factor: 2.5,
    });
    let mut out = Routing::with_capacity(8);
    let mut scratch = RouterScratch::new();
    let first = random_vec(&mut rng, 64, -2.0, 2.0);
    route_into(&kind, &first, 8, &mut scratch, &mut out).unwrap();
    let (pe, pw) = (out.experts.as_ptr(), out.weights.as_ptr());
    for _ in 0..50 {
        let logits = random_vec(&mut rng, 64, -2.0, 2.0);
        route_into(&kind, &logits, 8, &mut scratch, &mut out).unwrap();
        assert_eq!(out, route(&kind, &logits, 8).unwrap());
        assert_eq!(out.len(), 8);
        assert_eq!((out.experts.as_ptr(), out.weights.as_ptr()), (pe, pw));
    }
    // An error leaves `out` empty.
    assert!(route_into(&kind, &first[..63], 8, &mut scratch, &mut out).is_err());
    assert!(out.is_empty());
}

#[test]
fn every_error() {
    let l4 = [0.1f32, 0.2, 0.3, 0.4];
    let q = RouterKind::Qwen3Moe {
        norm_topk_prob: true,
    };
    assert_eq!(route(&q, &l4, 0), Err(RoutingError::ZeroK));
    assert_eq!(
        route(&q, &l4, 5),
        Err(RoutingError::KExceedsExperts {
            k: 5,
            num_experts: 4
        })
    );
    assert_eq!(
        route(&q, &[], 1),
        Err(RoutingError::KExceedsExperts {
            k: 1,
            num_experts: 0
        })
    );
    for bad in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
        let l = [0.0, 1.0, bad, 2.0];
        for kind in [
            q,
            RouterKind::GptOss { bias: None },
            RouterKind::Sigmoid(SigmoidRouter::new(None)),
        ] {
            assert!(matches!(
                route(&kind, &l, 1),
                Err(RoutingError::NonFiniteLogit { index: 2, .. })
            ));
        }
    }
    let short = [0.0f32; 3];
    assert_eq!(
        route(&RouterKind::GptOss { bias: Some(&short) }, &l4, 1),
        Err(RoutingError::BiasLength {
            got: 3,
            expected: 4
        })
    );
    assert_eq!(
        route(
            &RouterKind::Sigmoid(SigmoidRouter::new(Some(&short))),
            &l4,
            1
        ),
        Err(RoutingError::BiasLength {
            got: 3,
            expected: 4
        })
    );
    let nan_bias = [0.0, f32::NAN, 0.0, 0.0];
    assert!(matches!(
        route(
            &RouterKind::GptOss {
                bias: Some(&nan_bias)
            },
            &l4,
            1
        ),
        Err(RoutingError::NonFiniteBias { index: 1, .. })
    ));
    assert!(matches!(
        route(
            &RouterKind::Sigmoid(SigmoidRouter::new(Some(&nan_bias))),
            &l4,
            1
        ),
        Err(RoutingError::NonFiniteBias { index: 1, .. })
    ));
    let g = |n_group, topk_group| {
        RouterKind::Sigmoid(SigmoidRouter {
            correction_bias: None,
            n_group,
            topk_group,
            norm_topk_prob: true,
            routed_scaling_factor: 1.0,
        })
    };
    assert_eq!(
        route(&g(3, 1), &l4, 1),
        Err(RoutingError::GroupsDoNotDivide {
            n_group: 3,
            num_experts: 4
        })
    );
    assert_eq!(
        route(&g(0, 1), &l4, 1),
        Err(RoutingError::GroupsDoNotDivide {
            n_group: 0,
            num_experts: 4
        })
    );
    assert_eq!(
        route(&g(2, 3), &l4, 1),
        Err(RoutingError::TopkGroupOutOfRange {
            topk_group: 3,
            n_group: 2
        })
    );
    assert_eq!(
        route(&g(2, 0), &l4, 1),
        Err(RoutingError::TopkGroupOutOfRange {
            topk_group: 0,
            n_group: 2
        })
    );
    assert_eq!(
        route(&g(4, 2), &l4, 3),
        Err(RoutingError::KExceedsKeptExperts { k: 3, kept: 2 })
    );
    let inf_scale = RouterKind::Sigmoid(SigmoidRouter {
        routed_scaling_factor: f32::INFINITY,
        ..SigmoidRouter::new(None)
    });
    assert!(matches!(
        route(&inf_scale, &l4, 1),
        Err(RoutingError::NonFiniteScalingFactor(_))
    ));
    // Errors display something readable.
    assert_eq!(RoutingError::ZeroK.to_string(), "top-k must be at least 1");
}
