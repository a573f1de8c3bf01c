//! Greedy acceptance, rejection sampling (χ² goodness of fit, edge cases) and errors.

use dflash::{
    accept_greedy, accept_sampled, AcceptError, Acceptance, AcceptanceStats, Dist,
    DEFAULT_PROB_TOLERANCE,
};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

// ---------------------------------------------------------------------------------------------
// Greedy
// ---------------------------------------------------------------------------------------------

#[test]
fn greedy_cases() {
    let acc = |d: &[u32], t: &[u32]| accept_greedy(d, t).unwrap();
    // All match: a = n, bonus = t[n].
    assert_eq!(
        acc(&[5, 6, 7], &[5, 6, 7, 8]),
        Acceptance {
            accepted: 3,
            bonus: 8
        }
    );
    // First draft wrong: a = 0, bonus = t[0] (the correction).
    assert_eq!(
        acc(&[1, 6, 7], &[5, 6, 7, 8]),
        Acceptance {
            accepted: 0,
            bonus: 5
        }
    );
    // Mismatch in the middle; a later match does not count.
    assert_eq!(
        acc(&[5, 9, 7], &[5, 6, 7, 8]),
        Acceptance {
            accepted: 1,
            bonus: 6
        }
    );
    assert_eq!(
        acc(&[5, 6, 0], &[5, 6, 7, 8]),
        Acceptance {
            accepted: 2,
            bonus: 7
        }
    );
    // No drafts: plain decoding.
    assert_eq!(
        acc(&[], &[42]),
        Acceptance {
            accepted: 0,
            bonus: 42
        }
    );
    assert_eq!(acc(&[5, 6, 7], &[5, 6, 7, 8]).emitted(), 4);
    // Lengths must be drafts + 1.
    for t in [&[5u32, 6, 7][..], &[5, 6, 7, 8, 9], &[]] {
        assert_eq!(
            accept_greedy(&[5, 6, 7], t),
            Err(AcceptError::LengthMismatch {
                what: "target argmax (drafts + 1)",
                expected: 4,
                got: t.len()
            })
        );
    }
}

// ---------------------------------------------------------------------------------------------
// χ² goodness of fit of rejection sampling
// ---------------------------------------------------------------------------------------------

const V: usize = 5;
const N_DRAFTS: usize = 3; // B = 4 verified rows

/// Target at the first generated position.
const P0: [f32; V] = [0.10, 0.25, 0.30, 0.05, 0.30];
/// Target conditional on the previous token: a context-dependent "model", so row i of a verify
/// depends on draft i−1, as in real verification.
const T: [[f32; V]; V] = [
    [0.50, 0.10, 0.10, 0.20, 0.10],
    [0.05, 0.05, 0.60, 0.10, 0.20],
    [0.20, 0.20, 0.20, 0.20, 0.20],
    [0.10, 0.40, 0.05, 0.05, 0.40],
    [0.30, 0.05, 0.15, 0.35, 0.15],
];
/// Draft distributions per block position, independent of the other drafts (DFlash drafts the
/// block in parallel). Q[2] never proposes token 0 although the target allows it.
const Q: [[f32; V]; N_DRAFTS] = [
    [0.40, 0.10, 0.10, 0.30, 0.10],
    [0.20, 0.20, 0.20, 0.20, 0.20],
    [0.00, 0.50, 0.10, 0.20, 0.20],
];

fn sample(row: &[f32], rng: &mut ChaCha8Rng) -> u32 {
    let u: f32 = rng.random();
    let mut cum = 0.0;
    let mut last = 0;
    for (j, &p) in row.iter().enumerate() {
        if p > 0.0 {
            cum += p;
            last = j;
            if u < cum {
                return j as u32;
            }
        }
    }
    last as u32
}

/// One verify round after `prev` (None = the prompt): draft, build the target rows, accept.
fn round(prev: Option<u32>, rng: &mut ChaCha8Rng) -> (Vec<u32>, Acceptance) {
    let drafts: Vec<u32> = Q.iter().map(|q| sample(q, rng)).collect();
    let mut p = Vec::with_capacity((N_DRAFTS + 1) * V);
    p.extend_from_slice(match prev {
        None => &P0,
        Some(t) => &T[t as usize],
    });
    for &d in &drafts {
        p.extend_from_slice(&T[d as usize]);
    }
    let q: Vec<f32> = Q.iter().flatten().copied().collect();
    let acc = accept_sampled(&p, &q, &drafts, V, DEFAULT_PROB_TOLERANCE, &mut || {
        rng.random::<f64>()
    })
    .unwrap();
    (drafts, acc)
}

fn chi2_stat(observed: &[u64], expected_prob: &[f64], n: u64) -> f64 {
    observed
        .iter()
        .zip(expected_prob)
        .map(|(&o, &p)| {
            let e = p * n as f64;
            (o as f64 - e).powi(2) / e
        })
        .sum()
}

/// Upper tail P(χ²_df > x) for even df: exp(−x/2) Σ_{j<df/2} (x/2)^j / j!.
fn chi2_sf_even_df(x: f64, df: usize) -> f64 {
    assert!(df.is_multiple_of(2));
    let h = x / 2.0;
    let mut term = 1.0;
    let mut sum = 0.0;
    for j in 0..df / 2 {
        if j > 0 {
            term *= h / j as f64;
        }
        sum += term;
    }
    (-h).exp() * sum
}

/// Significance level of each χ² test (3 tests → family-wise error ≤ 0.3% for a correct
/// implementation; with the fixed seed the outcome is deterministic anyway).
const ALPHA: f64 = 1e-3;
/// Tabulated critical values χ²_{1−α}(df) at α = 0.001, cross-checked against the closed form.
const CRIT_DF4: f64 = 18.467;
const CRIT_DF24: f64 = 51.179;

#[test]
fn chi2_critical_values() {
    assert!((chi2_sf_even_df(CRIT_DF4, 4) - ALPHA).abs() < 1e-6);
    assert!((chi2_sf_even_df(CRIT_DF24, 24) - ALPHA).abs() < 1e-6);
}

#[test]
fn rejection_sampling_reproduces_target_distribution() {
    const TRIALS: u64 = 200_000;
    let mut rng = ChaCha8Rng::seed_from_u64(0x00df_1a54);
    let mut joint = [0u64; V * V];
    let mut first = [0u64; V];
    let mut second = [0u64; V];
    let mut naive_first = [0u64; V]; // negative control: always emit the first draft
    let mut stats = AcceptanceStats::new();
    for _ in 0..TRIALS {
        let (drafts, acc) = round(None, &mut rng);
        stats.record(acc.accepted, drafts.len()).unwrap();
        naive_first[drafts[0] as usize] += 1;
        let mut emitted: Vec<u32> = drafts[..acc.accepted].to_vec();
        emitted.push(acc.bonus);
        if emitted.len() < 2 {
            // Only one token this round: the next round continues after it.
            let (d2, acc2) = round(Some(emitted[0]), &mut rng);
            emitted.push(if acc2.accepted > 0 { d2[0] } else { acc2.bonus });
        }
        let (x0, x1) = (emitted[0] as usize, emitted[1] as usize);
        joint[x0 * V + x1] += 1;
        first[x0] += 1;
        second[x1] += 1;
    }

    // Expected: x0 ~ P0, x1 | x0 ~ T[x0].
    let p0: Vec<f64> = P0.iter().map(|&v| v as f64).collect();
    let pj: Vec<f64> = (0..V * V)
        .map(|c| P0[c / V] as f64 * T[c / V][c % V] as f64)
        .collect();
    let p1: Vec<f64> = (0..V)
        .map(|y| (0..V).map(|x| pj[x * V + y]).sum())
        .collect();

    let c_first = chi2_stat(&first, &p0, TRIALS);
    let c_second = chi2_stat(&second, &p1, TRIALS);
    let c_joint = chi2_stat(&joint, &pj, TRIALS);
    assert!(
        c_first < CRIT_DF4,
        "first token: χ² = {c_first} ≥ {CRIT_DF4} (df 4, α {ALPHA}); counts {first:?}"
    );
    assert!(
        c_second < CRIT_DF4,
        "second token: χ² = {c_second} ≥ {CRIT_DF4} (df 4, α {ALPHA}); counts {second:?}"
    );
    assert!(
        c_joint < CRIT_DF24,
        "joint: χ² = {c_joint} ≥ {CRIT_DF24} (df 24, α {ALPHA}); counts {joint:?}"
    );
    // The test has power: the draft distribution alone is rejected overwhelmingly.
    let c_naive = chi2_stat(&naive_first, &p0, TRIALS);
    assert!(
        c_naive > 100.0 * CRIT_DF4,
        "negative control χ² = {c_naive}"
    );

    // Position-0 acceptance rate = Σ_x min(p0(x), q0(x)) = 0.45 (within 5 standard errors).
    let want: f64 = (0..V).map(|x| P0[x].min(Q[0][x]) as f64).sum();
    let got = stats.position_acceptance_rate(0).unwrap();
    let se = (want * (1.0 - want) / TRIALS as f64).sqrt();
    assert!((got - want).abs() < 5.0 * se, "rate {got}, want {want}");
    assert_eq!(stats.rounds(), TRIALS);
}

// ---------------------------------------------------------------------------------------------
// Rejection-sampling edge cases
// ---------------------------------------------------------------------------------------------

fn seeded_uniform(seed: u64) -> impl FnMut() -> f64 {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    move || rng.random::<f64>()
}

fn random_row(rng: &mut ChaCha8Rng, v: usize) -> Vec<f32> {
    let raw: Vec<f32> = (0..v).map(|_| rng.random_range(0.01f32..1.0)).collect();
    let s: f32 = raw.iter().sum();
    raw.iter().map(|x| x / s).collect()
}

#[test]
fn identical_distributions_accept_everything() {
    let mut rng = ChaCha8Rng::seed_from_u64(1);
    let mut u = seeded_uniform(2);
    for _ in 0..200 {
        let v = 7;
        let n = 4;
        let rows: Vec<Vec<f32>> = (0..=n).map(|_| random_row(&mut rng, v)).collect();
        let p: Vec<f32> = rows.iter().flatten().copied().collect();
        let q: Vec<f32> = rows[..n].iter().flatten().copied().collect();
        let drafts: Vec<u32> = (0..n).map(|_| rng.random_range(0..v as u32)).collect();
        let acc = accept_sampled(&p, &q, &drafts, v, DEFAULT_PROB_TOLERANCE, &mut u).unwrap();
        assert_eq!(acc.accepted, n);
        assert!((acc.bonus as usize) < v);
    }
}

#[test]
fn one_hot_draft_is_target_only_verification() {
    // Greedy drafts with q = one-hot(d) (SGLang's "target-only" rule): accept with probability
    // p(d); on rejection the residual is p with d removed, so the bonus is never d.
    let p = [0.2f32, 0.5, 0.3, 0.2, 0.5, 0.3];
    let q = [0.0f32, 1.0, 0.0];
    let mut u = seeded_uniform(3);
    let (mut accepted, trials) = (0u32, 20_000u32);
    for _ in 0..trials {
        let acc = accept_sampled(&p, &q, &[1], 3, DEFAULT_PROB_TOLERANCE, &mut u).unwrap();
        if acc.accepted == 1 {
            accepted += 1;
        } else {
            assert_ne!(acc.bonus, 1);
        }
    }
    let rate = accepted as f64 / trials as f64;
    assert!((rate - 0.5).abs() < 0.02, "rate {rate}");
}

#[test]
fn zero_draft_probability() {
    // q(d) = 0 < p(d): the ratio is +∞ → always accepted.
    let p = [0.5f32, 0.5, 0.0, 0.25, 0.25, 0.5];
    let q = [1.0f32, 0.0, 0.0];
    let mut u = seeded_uniform(4);
    for _ in 0..1000 {
        let acc = accept_sampled(&p, &q, &[1], 3, DEFAULT_PROB_TOLERANCE, &mut u).unwrap();
        assert_eq!(acc.accepted, 1);
    }
    // q(d) = 0 = p(d): rejected; the residual max(0, p − q) = [0, 0.5, 0] gives token 1.
    for _ in 0..1000 {
        let acc = accept_sampled(&p, &q, &[2], 3, DEFAULT_PROB_TOLERANCE, &mut u).unwrap();
        assert_eq!(
            acc,
            Acceptance {
                accepted: 0,
                bonus: 1
            }
        );
    }
}

#[test]
fn zero_target_probability_is_never_emitted() {
    // p(2) = 0 at row 0 and p(0) = 0 at row 1: drafts of those tokens are always rejected and
    // no sampled bonus is ever a zero-probability token.
    let p = [0.6f32, 0.4, 0.0, 0.0, 0.5, 0.5];
    let q = [0.1f32, 0.1, 0.8];
    let mut u = seeded_uniform(5);
    for _ in 0..2000 {
        let acc = accept_sampled(&p, &q, &[2], 3, DEFAULT_PROB_TOLERANCE, &mut u).unwrap();
        assert_eq!(acc.accepted, 0);
        assert_ne!(acc.bonus, 2);
        let acc = accept_sampled(&p, &q, &[0], 3, DEFAULT_PROB_TOLERANCE, &mut u).unwrap();
        if acc.accepted == 1 {
            assert_ne!(acc.bonus, 0); // bonus from row 1
        } else {
            assert_ne!(acc.bonus, 2);
        }
    }
}

#[test]
fn zero_residual_mass_falls_back_to_target() {
    // p = q, and the draft has p = q = 0: rejected, residual max(0, p − q) = 0 → sample p.
    let p = [0.0f32, 1.0, 0.0, 0.3, 0.3, 0.4];
    let q = [0.0f32, 1.0, 0.0];
    let mut u = seeded_uniform(6);
    for _ in 0..100 {
        let acc = accept_sampled(&p, &q, &[0], 3, DEFAULT_PROB_TOLERANCE, &mut u).unwrap();
        assert_eq!(
            acc,
            Acceptance {
                accepted: 0,
                bonus: 1
            }
        );
    }
}

#[test]
fn deterministic_given_the_seed_and_rows_within_tolerance() {
    let mut rng = ChaCha8Rng::seed_from_u64(9);
    let v = 11;
    let n = 5;
    // Rows off by up to 5e-4 from 1 are accepted with the default tolerance.
    let p: Vec<f32> = (0..=n)
        .flat_map(|_| random_row(&mut rng, v).into_iter().map(|x| x * 1.0005))
        .collect();
    let q: Vec<f32> = (0..n).flat_map(|_| random_row(&mut rng, v)).collect();
    let drafts: Vec<u32> = (0..n).map(|_| rng.random_range(0..v as u32)).collect();
    let run = |seed| {
        let mut u = seeded_uniform(seed);
        (0..50)
            .map(|_| accept_sampled(&p, &q, &drafts, v, DEFAULT_PROB_TOLERANCE, &mut u).unwrap())
            .collect::<Vec<_>>()
    };
    assert_eq!(run(77), run(77));
    assert_ne!(run(77), run(78));
    // No drafts: the bonus is a sample of p[0]; u = 0 gives the first positive entry.
    let single = [0.0f32, 0.0, 0.7, 0.3];
    let acc = accept_sampled(&single, &[], &[], 4, 0.0, &mut || 0.0).unwrap();
    assert_eq!(
        acc,
        Acceptance {
            accepted: 0,
            bonus: 2
        }
    );
    let acc = accept_sampled(&single, &[], &[], 4, 0.0, &mut || 0.999_999).unwrap();
    assert_eq!(acc.bonus, 3);
}

#[test]
fn uniform_stream_order_is_documented() {
    // One uniform per examined draft, then one for the bonus: with p = q all drafts are
    // accepted, so exactly n + 1 uniforms are consumed.
    let row = [0.25f32, 0.25, 0.5];
    let p: Vec<f32> = row.repeat(4);
    let q: Vec<f32> = row.repeat(3);
    let mut calls = 0;
    let acc = accept_sampled(&p, &q, &[0, 1, 2], 3, 0.0, &mut || {
        calls += 1;
        0.5
    })
    .unwrap();
    assert_eq!(acc.accepted, 3);
    assert_eq!(calls, 4);
    // A rejection at draft 0: one acceptance uniform + one residual uniform.
    let q2 = [0.0f32, 0.0, 1.0, 0.25, 0.25, 0.5, 0.25, 0.25, 0.5];
    let mut calls = 0;
    let acc = accept_sampled(&p, &q2, &[2, 1, 2], 3, 0.0, &mut || {
        calls += 1;
        0.9
    })
    .unwrap();
    // u·q(2) = 0.9 ≥ p(2) = 0.5 → rejected; residual = [0.25, 0.25, 0] → u = 0.9 → token 1.
    assert_eq!(
        acc,
        Acceptance {
            accepted: 0,
            bonus: 1
        }
    );
    assert_eq!(calls, 2);
}

#[test]
fn sampled_errors() {
    let p = [0.5f32, 0.5, 0.5, 0.5]; // 2 rows, V = 2
    let q = [0.5f32, 0.5];
    let tol = DEFAULT_PROB_TOLERANCE;
    let mut u = seeded_uniform(10);
    let e = |p: &[f32], q: &[f32], d: &[u32], v: usize, tol: f64, u: &mut dyn FnMut() -> f64| {
        accept_sampled(p, q, d, v, tol, &mut || u()).unwrap_err()
    };
    assert_eq!(e(&p, &q, &[0], 0, tol, &mut u), AcceptError::EmptyVocab);
    assert_eq!(
        e(&p[..3], &q, &[0], 2, tol, &mut u),
        AcceptError::LengthMismatch {
            what: "target probabilities ((drafts + 1) · vocab)",
            expected: 4,
            got: 3
        }
    );
    assert_eq!(
        e(&p, &p, &[0], 2, tol, &mut u),
        AcceptError::LengthMismatch {
            what: "draft probabilities (drafts · vocab)",
            expected: 2,
            got: 4
        }
    );
    // Two drafts need three target rows.
    assert!(matches!(
        e(&p, &q, &[0, 1], 2, tol, &mut u),
        AcceptError::LengthMismatch { expected: 6, .. }
    ));
    assert_eq!(
        e(&p, &q, &[2], 2, tol, &mut u),
        AcceptError::TokenOutOfRange {
            position: 0,
            token: 2,
            vocab: 2
        }
    );
    for bad in [-0.1f32, f32::NAN, f32::INFINITY] {
        let pb = [0.5f32, 0.5, bad, 0.5];
        assert!(matches!(
            e(&pb, &q, &[0], 2, tol, &mut u),
            AcceptError::InvalidProbability {
                dist: Dist::Target,
                row: 1,
                index: 0,
                ..
            }
        ));
        let qb = [0.5f32, bad];
        assert!(matches!(
            e(&p, &qb, &[0], 2, tol, &mut u),
            AcceptError::InvalidProbability {
                dist: Dist::Draft,
                row: 0,
                index: 1,
                ..
            }
        ));
    }
    let p_unnorm = [0.45f32, 0.45, 0.5, 0.5];
    assert!(matches!(
        e(&p_unnorm, &q, &[0], 2, tol, &mut u),
        AcceptError::NotNormalized {
            dist: Dist::Target,
            row: 0,
            ..
        }
    ));
    let q_unnorm = [0.6f32, 0.5];
    assert!(matches!(
        e(&p, &q_unnorm, &[0], 2, tol, &mut u),
        AcceptError::NotNormalized {
            dist: Dist::Draft,
            row: 0,
            ..
        }
    ));
    // Logits passed instead of probabilities.
    let logits = [2.0f32, -1.0, 0.3, 0.1];
    assert!(matches!(
        e(&logits, &q, &[0], 2, tol, &mut u),
        AcceptError::InvalidProbability { .. } | AcceptError::NotNormalized { .. }
    ));
    for bad_tol in [-1e-3, 1.0, f64::NAN] {
        assert!(matches!(
            e(&p, &q, &[0], 2, bad_tol, &mut u),
            AcceptError::InvalidTolerance(_)
        ));
    }
    for bad_u in [1.0f64, -0.5, f64::NAN, f64::INFINITY] {
        assert!(matches!(
            e(&p, &q, &[0], 2, tol, &mut move || bad_u),
            AcceptError::UniformOutOfRange(_)
        ));
    }
    // Errors display something readable.
    assert_eq!(
        AcceptError::TokenOutOfRange {
            position: 0,
            token: 2,
            vocab: 2
        }
        .to_string(),
        "draft 0: token 2 out of range (vocab = 2)"
    );
}
