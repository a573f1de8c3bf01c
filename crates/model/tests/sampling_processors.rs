//! Sampler tests: greedy, temperature limits, top-k / top-p / min-p kept sets and frequencies
//! (χ² against an independent reference), repetition / presence / frequency penalties, seeds, non-finite logits,
//! log-probability helpers and parameter validation.

use model::sampling::{
    log_softmax, logprob_of, logsumexp, top_logprobs, Sampler, SamplingError, SamplingParams,
};

fn params(temperature: f32) -> SamplingParams {
    SamplingParams {
        temperature,
        seed: Some(1234),
        ..SamplingParams::default()
    }
}

fn ln_probs(p: &[f64]) -> Vec<f32> {
    p.iter().map(|&x| x.ln() as f32).collect()
}

/// Independent reference: the expected distribution after the processors (full sort, f64),
/// with `history` as the prompt and nothing generated.
fn reference(logits: &[f32], p: &SamplingParams, history: &[u32]) -> Vec<f64> {
    reference_gen(logits, p, history, &[])
}

/// [`reference`] after `generated` tokens (which the presence / frequency penalties count).
fn reference_gen(
    logits: &[f32],
    p: &SamplingParams,
    prompt: &[u32],
    generated: &[u32],
) -> Vec<f64> {
    let n = logits.len();
    let mut x: Vec<f64> = logits
        .iter()
        .map(|&v| {
            if v.is_nan() {
                f64::NEG_INFINITY
            } else {
                v as f64
            }
        })
        .collect();
    if let Some(rp) = p.repetition_penalty {
        let mut seen = vec![false; n];
        for &t in prompt.iter().chain(generated) {
            if (t as usize) < n && !seen[t as usize] {
                seen[t as usize] = true;
                let v = &mut x[t as usize];
                *v = if *v < 0.0 {
                    *v * rp as f64
                } else {
                    *v / rp as f64
                };
            }
        }
    }
    let mut count = vec![0usize; n];
    for &t in generated {
        if (t as usize) < n {
            count[t as usize] += 1;
        }
    }
    for (v, &c) in x.iter_mut().zip(&count) {
        if c > 0 {
            *v -= p.frequency_penalty as f64 * c as f64 + p.presence_penalty as f64;
        }
    }
    for v in &mut x {
        *v /= p.temperature as f64;
    }
    let mut keep = vec![true; n];
    let mut order: Vec<usize> = (0..n).collect();
    order.sort_by(|&a, &b| x[b].partial_cmp(&x[a]).unwrap().then(a.cmp(&b)));
    if let Some(k) = p.top_k {
        if k < n {
            let thr = x[order[k - 1]];
            for i in 0..n {
                keep[i] &= x[i] >= thr;
            }
        }
    }
    let probs = |keep: &[bool]| {
        let m = (0..n)
            .filter(|&i| keep[i])
            .map(|i| x[i])
            .fold(f64::NEG_INFINITY, f64::max);
        let w: Vec<f64> = (0..n)
            .map(|i| if keep[i] { (x[i] - m).exp() } else { 0.0 })
            .collect();
        let s: f64 = w.iter().sum();
        w.into_iter().map(|v| v / s).collect::<Vec<f64>>()
    };
    if let Some(tp) = p.top_p {
        let pr = probs(&keep);
        let mut acc = 0.0;
        for &i in &order {
            if !keep[i] {
                continue;
            }
            if acc >= tp as f64 - 1e-6 {
                keep[i] = false;
            } else {
                acc += pr[i];
            }
        }
    }
    if let Some(mp) = p.min_p {
        let pr = probs(&keep);
        let top = pr.iter().cloned().fold(0.0, f64::max);
        for i in 0..n {
            keep[i] &= pr[i] >= mp as f64 * top;
        }
    }
    probs(&keep)
}

fn counts(s: &mut Sampler, logits: &[f32], history: &[u32], draws: usize) -> Vec<usize> {
    counts_gen(s, logits, history, &[], draws)
}

fn counts_gen(
    s: &mut Sampler,
    logits: &[f32],
    prompt: &[u32],
    generated: &[u32],
    draws: usize,
) -> Vec<usize> {
    let mut c = vec![0usize; logits.len()];
    for _ in 0..draws {
        c[s.sample(logits, prompt, generated) as usize] += 1;
    }
    c
}

/// χ² goodness of fit; fails when the statistic exceeds the ~5σ (p ≈ 3e-7) critical value
/// (Wilson–Hilferty), and when a token with probability 0 was ever drawn.
fn assert_fits(c: &[usize], expected: &[f64]) {
    let n: usize = c.iter().sum();
    let mut chi2 = 0.0;
    let mut df = 0usize;
    for (i, (&o, &p)) in c.iter().zip(expected).enumerate() {
        if p == 0.0 {
            assert_eq!(o, 0, "token {i} has probability 0 but was drawn {o} times");
            continue;
        }
        let e = p * n as f64;
        chi2 += (o as f64 - e).powi(2) / e;
        df += 1;
    }
    let df = (df.max(2) - 1) as f64;
    let z = 5.0;
    let a = 2.0 / (9.0 * df);
    let crit = df * (1.0 - a + z * a.sqrt()).powi(3);
    assert!(
        chi2 < crit,
        "χ² = {chi2:.1} ≥ {crit:.1} (df {df}); counts {c:?}, expected {expected:?}"
    );
}

fn support(c: &[usize]) -> Vec<usize> {
    (0..c.len()).filter(|&i| c[i] > 0).collect()
}

#[test]
fn default_is_greedy_and_valid() {
    let p = SamplingParams::default();
    assert_eq!(p.temperature, 0.0);
    assert!(p.is_greedy());
    assert!(p.validate().is_ok());
    assert!(p.max_tokens > 0);
    assert!(!p.ignore_eos);
}

#[test]
fn greedy_argmax_with_lowest_id_on_ties() {
    let mut s = Sampler::new(&SamplingParams::default()).unwrap();
    assert_eq!(s.sample(&[1.0, 3.0, 0.5, 2.0], &[], &[]), 1);
    assert_eq!(s.sample(&[1.0, 3.0, 3.0, 2.0], &[], &[]), 1);
    assert_eq!(s.sample(&[-5.0, -5.0], &[], &[]), 0);
    // Greedy ignores top-k / top-p / min-p and the RNG.
    let p = SamplingParams {
        top_k: Some(1),
        top_p: Some(0.1),
        min_p: Some(0.9),
        ..SamplingParams::default()
    };
    let mut s = Sampler::new(&p).unwrap();
    for _ in 0..10 {
        assert_eq!(s.sample(&[0.0, 0.1, 7.0, 6.9], &[], &[]), 2);
    }
}

#[test]
fn temperature_to_zero_is_argmax() {
    // Below the greedy epsilon: greedy path.
    let mut s = Sampler::new(&params(1e-6)).unwrap();
    assert_eq!(s.sample(&[1.0, 1.5, 1.2], &[], &[]), 1);
    // A tiny but sampled temperature concentrates all mass on the argmax.
    let mut s = Sampler::new(&params(1e-3)).unwrap();
    let c = counts(&mut s, &[1.0, 1.5, 1.2, 1.49], &[], 2000);
    assert_eq!(c, vec![0, 2000, 0, 0]);
}

#[test]
fn temperature_to_infinity_is_uniform() {
    let logits = [0.0f32, 1.0, 2.0, 3.0, 4.0];
    let mut s = Sampler::new(&params(1e5)).unwrap();
    let c = counts(&mut s, &logits, &[], 20_000);
    assert_fits(&c, &[0.2; 5]);
    // Against the plain softmax, a uniform sample is rejected (sanity check of the test itself).
    let soft = reference(&logits, &params(1.0), &[]);
    let n = 20_000.0;
    let chi2: f64 = c
        .iter()
        .zip(&soft)
        .map(|(&o, &p)| (o as f64 - p * n).powi(2) / (p * n))
        .sum();
    assert!(chi2 > 1000.0);
}

#[test]
fn temperature_one_and_half_match_softmax() {
    let logits = ln_probs(&[0.1, 0.2, 0.3, 0.4]);
    for t in [1.0f32, 0.5, 2.0] {
        let p = params(t);
        let mut s = Sampler::new(&p).unwrap();
        let c = counts(&mut s, &logits, &[], 20_000);
        assert_fits(&c, &reference(&logits, &p, &[]));
    }
}

#[test]
fn top_k_keeps_exactly_k_and_boundary_ties() {
    let logits = [0.3f32, 2.0, -1.0, 1.5, 1.0, 0.0, 1.9, -0.5];
    let p = SamplingParams {
        top_k: Some(3),
        ..params(1.0)
    };
    let mut s = Sampler::new(&p).unwrap();
    let c = counts(&mut s, &logits, &[], 20_000);
    assert_eq!(support(&c), vec![1, 3, 6]);
    assert_fits(&c, &reference(&logits, &p, &[]));

    // Tokens tied with the k-th largest logit are all kept (HF semantics).
    let logits = [5.0f32, 4.0, 4.0, 1.0];
    let p = SamplingParams {
        top_k: Some(2),
        ..params(1.0)
    };
    let mut s = Sampler::new(&p).unwrap();
    let c = counts(&mut s, &logits, &[], 20_000);
    assert_eq!(support(&c), vec![0, 1, 2]);
    assert_fits(&c, &reference(&logits, &p, &[]));

    // k = 1 is greedy; k ≥ vocab keeps everything.
    let p = SamplingParams {
        top_k: Some(1),
        ..params(1.0)
    };
    let mut s = Sampler::new(&p).unwrap();
    assert_eq!(counts(&mut s, &[0.0, 0.5, 0.4], &[], 500), vec![0, 500, 0]);
    let p = SamplingParams {
        top_k: Some(100),
        ..params(1.0)
    };
    let mut s = Sampler::new(&p).unwrap();
    let c = counts(&mut s, &[0.0, 0.5, 0.4], &[], 20_000);
    assert_fits(&c, &reference(&[0.0, 0.5, 0.4], &p, &[]));
}

#[test]
fn top_p_keeps_smallest_nucleus_including_crossing_token() {
    // Shuffled ids so that the nucleus is not an id prefix.
    let probs = [0.06, 0.25, 0.04, 0.4, 0.1, 0.15];
    let logits = ln_probs(&probs);
    // Sorted: 0.4 (3), 0.25 (1), 0.15 (5), 0.1 (4), ...; 0.4+0.25 = 0.65 < 0.7 → 0.15 crosses.
    // top_k = 5 drops only the 0.04 token and exercises the short-list code path.
    for top_k in [None, Some(5)] {
        let p = SamplingParams {
            top_p: Some(0.7),
            top_k,
            ..params(1.0)
        };
        let mut s = Sampler::new(&p).unwrap();
        let c = counts(&mut s, &logits, &[], 20_000);
        assert_eq!(support(&c), vec![1, 3, 5]);
        assert_fits(&c, &[0.0, 0.25 / 0.8, 0.0, 0.4 / 0.8, 0.0, 0.15 / 0.8]);

        // Exactly reaching top_p is enough: 0.4 + 0.25 = 0.65.
        let p = SamplingParams {
            top_p: Some(0.65),
            top_k,
            ..params(1.0)
        };
        let mut s = Sampler::new(&p).unwrap();
        assert_eq!(support(&counts(&mut s, &logits, &[], 5000)), vec![1, 3]);
    }

    // A tiny top_p keeps only the most likely token; top_p = 1 keeps everything.
    let p = SamplingParams {
        top_p: Some(1e-6),
        ..params(1.0)
    };
    let mut s = Sampler::new(&p).unwrap();
    assert_eq!(support(&counts(&mut s, &logits, &[], 500)), vec![3]);
    let p = SamplingParams {
        top_p: Some(1.0),
        ..params(1.0)
    };
    let mut s = Sampler::new(&p).unwrap();
    let c = counts(&mut s, &logits, &[], 20_000);
    assert_fits(&c, &probs);
}

#[test]
fn top_p_large_vocab_nucleus() {
    // 1000 tokens with a smooth distribution: the nucleus has about a hundred members, which
    // exercises the partial-sort widening path; compare the support with the reference set.
    let n = 1000;
    let logits: Vec<f32> = (0..n)
        .map(|i| {
            let j = (i * 7919) % n; // permute ids
            -(j as f32) / 300.0
        })
        .collect();
    // Dense path (no top-k) and short-list path (top-k 900 > nucleus).
    for top_k in [None, Some(900)] {
        let p = SamplingParams {
            top_p: Some(0.3),
            top_k,
            ..params(1.0)
        };
        let expected = reference(&logits, &p, &[]);
        let kept: Vec<usize> = (0..n).filter(|&i| expected[i] > 0.0).collect();
        assert!(kept.len() > 64 && kept.len() < 200, "{}", kept.len());
        let mut s = Sampler::new(&p).unwrap();
        let c = counts(&mut s, &logits, &[], 4_000);
        for i in 0..n {
            if expected[i] == 0.0 {
                assert_eq!(c[i], 0, "token {i} outside the nucleus was drawn");
            }
        }
        assert_fits(&c, &expected);
    }
}

#[test]
fn min_p_keeps_tokens_above_fraction_of_top() {
    let probs = [0.04, 0.5, 0.1, 0.3, 0.06];
    let logits = ln_probs(&probs);
    // threshold 0.15 * 0.5 = 0.075 → keeps 0.5, 0.3, 0.1.
    let p = SamplingParams {
        min_p: Some(0.15),
        ..params(1.0)
    };
    let mut s = Sampler::new(&p).unwrap();
    let c = counts(&mut s, &logits, &[], 20_000);
    assert_eq!(support(&c), vec![1, 2, 3]);
    assert_fits(&c, &[0.0, 0.5 / 0.9, 0.1 / 0.9, 0.3 / 0.9, 0.0]);
    // min_p = 0 keeps all, min_p = 1 keeps only the top.
    let p = SamplingParams {
        min_p: Some(0.0),
        ..params(1.0)
    };
    let mut s = Sampler::new(&p).unwrap();
    assert_fits(&counts(&mut s, &logits, &[], 20_000), &probs);
    let p = SamplingParams {
        min_p: Some(1.0),
        ..params(1.0)
    };
    let mut s = Sampler::new(&p).unwrap();
    assert_eq!(support(&counts(&mut s, &logits, &[], 500)), vec![1]);
}

#[test]
fn processors_run_in_hf_order() {
    // top-k before top-p: after top-k = 3 the probabilities renormalise to [.4, .333, .267], so
    // top-p = 0.7 keeps two tokens (it would keep three on the original distribution).
    let probs = [0.3, 0.25, 0.2, 0.15, 0.1];
    let logits = ln_probs(&probs);
    let p = SamplingParams {
        top_k: Some(3),
        top_p: Some(0.7),
        ..params(1.0)
    };
    let mut s = Sampler::new(&p).unwrap();
    let c = counts(&mut s, &logits, &[], 20_000);
    assert_eq!(support(&c), vec![0, 1]);
    assert_fits(&c, &[0.3 / 0.55, 0.25 / 0.55, 0.0, 0.0, 0.0]);

    // temperature before top-p: T = 0.5 sharpens [.3,.25,.2,.15,.1] to ∝ [.09,.0625,.04,...],
    // so top-p 0.6 keeps two tokens (three at T = 1).
    let p = SamplingParams {
        top_p: Some(0.6),
        ..params(0.5)
    };
    let expected = reference(&logits, &p, &[]);
    assert_eq!(expected.iter().filter(|&&x| x > 0.0).count(), 2);
    let mut s = Sampler::new(&p).unwrap();
    let c = counts(&mut s, &logits, &[], 20_000);
    assert_eq!(support(&c), vec![0, 1]);
    assert_fits(&c, &expected);

    // Everything together, against the reference.
    let logits = [1.0f32, 0.2, 2.5, -0.3, 1.7, 2.2, 0.9, -2.0, 1.1, 2.4];
    let history = [2u32, 2, 7, 4, 99];
    let p = SamplingParams {
        temperature: 0.8,
        top_k: Some(6),
        top_p: Some(0.9),
        min_p: Some(0.05),
        repetition_penalty: Some(1.3),
        seed: Some(7),
        ..SamplingParams::default()
    };
    let expected = reference(&logits, &p, &history);
    let mut s = Sampler::new(&p).unwrap();
    let c = counts(&mut s, &logits, &history, 40_000);
    assert_fits(&c, &expected);
}

#[test]
fn repetition_penalty_sign_handling() {
    let greedy_rp = |rp: f32| SamplingParams {
        repetition_penalty: Some(rp),
        ..SamplingParams::default()
    };
    let mut s = Sampler::new(&greedy_rp(2.0)).unwrap();
    // Positive logit divided: 3.0 / 2 = 1.5 < 2.0.
    assert_eq!(s.sample(&[3.0, 2.0, -1.0], &[0], &[]), 1);
    assert_eq!(s.sample(&[3.0, 2.0, -1.0], &[], &[]), 0);
    // Negative logit multiplied: -1.0 * 2 = -2.0 < -1.2 (dividing would give -0.5 > -1.2).
    assert_eq!(s.sample(&[-1.0, -1.2], &[0], &[]), 1);
    // Each distinct token once: 4.0 / 1.5 = 2.67 > 2.5 (twice would be 1.78).
    let mut s = Sampler::new(&greedy_rp(1.5)).unwrap();
    assert_eq!(s.sample(&[4.0, 2.5], &[0, 0, 0], &[]), 0);
    // A penalty below 1 favours seen tokens: 1.0 / 0.5 = 2.0 > 1.5.
    let mut s = Sampler::new(&greedy_rp(0.5)).unwrap();
    assert_eq!(s.sample(&[1.0, 1.5], &[0], &[]), 0);
    // Out-of-range history ids are ignored; a zero logit stays zero.
    let mut s = Sampler::new(&greedy_rp(3.0)).unwrap();
    assert_eq!(s.sample(&[0.0, -0.1], &[0, 1000, u32::MAX], &[]), 0);
    // Sampled distribution with a penalty matches the reference.
    let p = SamplingParams {
        repetition_penalty: Some(1.8),
        ..params(1.0)
    };
    let logits = [1.0f32, -0.5, 0.7, 0.2];
    let mut s = Sampler::new(&p).unwrap();
    let c = counts(&mut s, &logits, &[0, 1], 20_000);
    assert_fits(&c, &reference(&logits, &p, &[0, 1]));
}

#[test]
fn presence_and_frequency_penalties_count_generated_tokens_only() {
    let pen = |presence: f32, frequency: f32| SamplingParams {
        presence_penalty: presence,
        frequency_penalty: frequency,
        ..SamplingParams::default()
    };
    // Frequency: 1.0 − 0.2 · 1 = 0.8 < 0.9, so token 1 wins once token 0 was generated.
    let mut s = Sampler::new(&pen(0.0, 0.2)).unwrap();
    assert_eq!(s.sample(&[1.0, 0.9], &[], &[0]), 1);
    assert_eq!(s.sample(&[1.0, 0.9], &[], &[]), 0);
    // The prompt does not count, however often the token appears there.
    assert_eq!(s.sample(&[1.0, 0.9], &[0, 0, 0], &[]), 0);
    // Counts: 2.0 − 0.4 · 2 = 1.2 < 1.5 (token 0 twice), but 2.0 − 0.4 = 1.6 > 1.5 (once).
    let mut s = Sampler::new(&pen(0.0, 0.4)).unwrap();
    assert_eq!(s.sample(&[2.0, 1.5], &[], &[0, 0]), 1);
    assert_eq!(s.sample(&[2.0, 1.5], &[], &[0]), 0);
    // Presence: once however many times: 2.0 − 0.4 = 1.6 > 1.5 with token 0 generated 3 times.
    let mut s = Sampler::new(&pen(0.4, 0.0)).unwrap();
    assert_eq!(s.sample(&[2.0, 1.5], &[], &[0, 0, 0]), 0);
    assert_eq!(s.sample(&[2.0, 1.55, 1.5], &[], &[0, 1]), 0);
    // A negative penalty favours generated tokens: 1.0 + 0.5 = 1.5 > 1.2; ids outside the
    // vocabulary are ignored.
    let mut s = Sampler::new(&pen(-0.5, 0.0)).unwrap();
    assert_eq!(s.sample(&[1.2, 1.0], &[], &[1, 7, u32::MAX]), 1);
    // Sampled: the distribution after all three penalties matches the reference.
    let p = SamplingParams {
        repetition_penalty: Some(1.3),
        presence_penalty: 0.3,
        frequency_penalty: 0.45,
        ..params(1.0)
    };
    let logits = [1.0f32, -0.5, 0.7, 0.2, 0.9];
    let (prompt, generated) = ([4u32, 2], [0u32, 1, 0, 2, 0]);
    let mut s = Sampler::new(&p).unwrap();
    let c = counts_gen(&mut s, &logits, &prompt, &generated, 40_000);
    assert_fits(&c, &reference_gen(&logits, &p, &prompt, &generated));
}

#[test]
fn seeds_are_deterministic() {
    let logits: Vec<f32> = (0..50).map(|i| ((i * 37) % 11) as f32 * 0.3).collect();
    let p = SamplingParams {
        temperature: 1.0,
        top_p: Some(0.95),
        seed: Some(42),
        ..SamplingParams::default()
    };
    let run = |p: &SamplingParams| {
        let mut s = Sampler::new(p).unwrap();
        (0..300)
            .map(|_| s.sample(&logits, &[], &[]))
            .collect::<Vec<u32>>()
    };
    let a = run(&p);
    assert_eq!(a, run(&p));
    let b = run(&SamplingParams {
        seed: Some(43),
        ..p.clone()
    });
    assert_ne!(a, b);
    // Cloning a sampler clones its RNG position.
    let mut s = Sampler::new(&p).unwrap();
    s.sample(&logits, &[], &[]);
    let mut t = s.clone();
    assert_eq!(s.sample(&logits, &[], &[]), t.sample(&logits, &[], &[]));
    // Unseeded samplers work (and almost surely differ from each other).
    let u = SamplingParams { seed: None, ..p };
    let x = run(&u);
    let y = run(&u);
    assert_ne!(x, y);
}

#[test]
fn non_finite_logits_never_panic() {
    for p in [SamplingParams::default(), params(1.0)] {
        let mut s = Sampler::new(&p).unwrap();
        // NaN is -inf.
        let c = counts(&mut s, &[f32::NAN, 0.0, 0.0, f32::NAN], &[], 200);
        assert_eq!(c[0] + c[3], 0);
        // +inf dominates.
        assert_eq!(
            counts(&mut s, &[0.0, f32::INFINITY, 5.0], &[], 50),
            vec![0, 50, 0]
        );
        // Nothing finite: error from try_sample, documented fallback 0 from sample.
        let bad = [f32::NEG_INFINITY, f32::NAN, f32::NEG_INFINITY];
        assert_eq!(
            s.try_sample(&bad, &[], &[]),
            Err(SamplingError::NoFiniteLogits)
        );
        assert_eq!(s.sample(&bad, &[], &[]), 0);
        assert_eq!(s.try_sample(&[], &[], &[]), Err(SamplingError::EmptyLogits));
        assert_eq!(s.sample(&[], &[], &[]), 0);
    }
    // Two +inf: both drawn, nothing else.
    let mut s = Sampler::new(&params(1.0)).unwrap();
    let c = counts(&mut s, &[f32::INFINITY, 1.0, f32::INFINITY], &[], 4000);
    assert_eq!(c[1], 0);
    assert!(c[0] > 1500 && c[2] > 1500, "{c:?}");
    // Filters that remove everything but -inf tokens still leave the finite ones.
    let p = SamplingParams {
        top_k: Some(2),
        top_p: Some(0.5),
        min_p: Some(0.5),
        ..params(1.0)
    };
    let mut s = Sampler::new(&p).unwrap();
    assert_eq!(
        support(&counts(
            &mut s,
            &[f32::NEG_INFINITY, -3.0, f32::NAN],
            &[],
            100
        )),
        vec![1]
    );
}

#[test]
fn logprob_helpers() {
    let logits = [0.0f32, (3.0f64).ln() as f32];
    let lp = log_softmax(&logits);
    assert!((lp[0] - 0.25f64.ln()).abs() < 1e-6);
    assert!((lp[1] - 0.75f64.ln()).abs() < 1e-6);
    assert!((logprob_of(&logits, 1) - lp[1]).abs() < 1e-12);
    // Large logits do not overflow; the sum of probabilities is 1.
    let big = [1000.0f32, 1000.0, 990.0];
    let lp = log_softmax(&big);
    let total: f64 = lp.iter().map(|x| x.exp()).sum();
    assert!((total - 1.0).abs() < 1e-12);
    assert!((logsumexp(&big) - (1000.0 + (2.0 + (-10f64).exp()).ln())).abs() < 1e-9);
    // NaN and -inf get -inf; out of range is -inf; an all -inf row is all -inf.
    let lp = log_softmax(&[f32::NAN, 0.0, f32::NEG_INFINITY]);
    assert_eq!(lp[0], f64::NEG_INFINITY);
    assert_eq!(lp[1], 0.0);
    assert_eq!(lp[2], f64::NEG_INFINITY);
    assert_eq!(logprob_of(&[0.0, 1.0], 2), f64::NEG_INFINITY);
    assert!(log_softmax(&[f32::NEG_INFINITY; 3])
        .iter()
        .all(|&x| x == f64::NEG_INFINITY));
    assert!(log_softmax(&[]).is_empty());
    // top_logprobs: most likely first, ties by id, no -inf entries.
    let t = top_logprobs(&[1.0, 3.0, 3.0, f32::NAN, 2.0], 3);
    let ids: Vec<u32> = t.iter().map(|x| x.0).collect();
    assert_eq!(ids, vec![1, 2, 4]);
    assert!((t[0].1 - logprob_of(&[1.0, 3.0, 3.0, f32::NAN, 2.0], 1)).abs() < 1e-12);
    assert_eq!(top_logprobs(&[0.0, f32::NEG_INFINITY], 5).len(), 1);
    assert!(top_logprobs(&[0.0], 0).is_empty());
}

#[test]
fn validation_errors() {
    let ok = SamplingParams {
        temperature: 0.7,
        top_k: Some(40),
        top_p: Some(1.0),
        min_p: Some(0.0),
        repetition_penalty: Some(1.1),
        ..SamplingParams::default()
    };
    assert!(ok.validate().is_ok());
    let cases: Vec<(SamplingParams, SamplingError)> = vec![
        (
            SamplingParams {
                temperature: -0.1,
                ..ok.clone()
            },
            SamplingError::InvalidTemperature(-0.1),
        ),
        (
            SamplingParams {
                top_k: Some(0),
                ..ok.clone()
            },
            SamplingError::InvalidTopK,
        ),
        (
            SamplingParams {
                top_p: Some(0.0),
                ..ok.clone()
            },
            SamplingError::InvalidTopP(0.0),
        ),
        (
            SamplingParams {
                top_p: Some(1.5),
                ..ok.clone()
            },
            SamplingError::InvalidTopP(1.5),
        ),
        (
            SamplingParams {
                min_p: Some(-0.01),
                ..ok.clone()
            },
            SamplingError::InvalidMinP(-0.01),
        ),
        (
            SamplingParams {
                min_p: Some(1.01),
                ..ok.clone()
            },
            SamplingError::InvalidMinP(1.01),
        ),
        (
            SamplingParams {
                repetition_penalty: Some(0.0),
                ..ok.clone()
            },
            SamplingError::InvalidRepetitionPenalty(0.0),
        ),
        (
            SamplingParams {
                repetition_penalty: Some(-1.0),
                ..ok.clone()
            },
            SamplingError::InvalidRepetitionPenalty(-1.0),
        ),
        (
            SamplingParams {
                presence_penalty: 2.01,
                ..ok.clone()
            },
            SamplingError::InvalidPresencePenalty(2.01),
        ),
        (
            SamplingParams {
                frequency_penalty: -2.5,
                ..ok.clone()
            },
            SamplingError::InvalidFrequencyPenalty(-2.5),
        ),
        (
            SamplingParams {
                max_tokens: 0,
                ..ok.clone()
            },
            SamplingError::InvalidMaxTokens,
        ),
        (
            SamplingParams {
                stop_strings: vec!["x".into(), String::new()],
                ..ok.clone()
            },
            SamplingError::EmptyStopString,
        ),
    ];
    for (p, e) in cases {
        assert_eq!(p.validate(), Err(e.clone()));
        assert_eq!(Sampler::new(&p).err(), Some(e));
    }
    // NaN anywhere is an error (NaN != NaN, so match on the variant).
    let nan = f32::NAN;
    let nans = [
        SamplingParams {
            temperature: nan,
            ..ok.clone()
        },
        SamplingParams {
            top_p: Some(nan),
            ..ok.clone()
        },
        SamplingParams {
            min_p: Some(nan),
            ..ok.clone()
        },
        SamplingParams {
            repetition_penalty: Some(nan),
            ..ok.clone()
        },
        SamplingParams {
            temperature: f32::INFINITY,
            ..ok.clone()
        },
        SamplingParams {
            repetition_penalty: Some(f32::INFINITY),
            ..ok.clone()
        },
        SamplingParams {
            presence_penalty: nan,
            ..ok.clone()
        },
        SamplingParams {
            frequency_penalty: nan,
            ..ok.clone()
        },
        SamplingParams {
            frequency_penalty: f32::NEG_INFINITY,
            ..ok.clone()
        },
    ];
    let kinds: Vec<&str> = nans
        .iter()
        .map(|p| match p.validate() {
            Err(SamplingError::InvalidTemperature(_)) => "t",
            Err(SamplingError::InvalidTopP(_)) => "p",
            Err(SamplingError::InvalidMinP(_)) => "m",
            Err(SamplingError::InvalidRepetitionPenalty(_)) => "r",
            Err(SamplingError::InvalidPresencePenalty(_)) => "pp",
            Err(SamplingError::InvalidFrequencyPenalty(_)) => "fp",
            other => panic!("unexpected {other:?}"),
        })
        .collect();
    assert_eq!(kinds, vec!["t", "p", "m", "r", "t", "r", "pp", "fp", "fp"]);
    // Error messages name the field.
    let msg = SamplingError::InvalidTopP(2.0).to_string();
    assert!(msg.contains("top_p"), "{msg}");
    for (e, field) in [
        (
            SamplingError::InvalidPresencePenalty(3.0),
            "presence_penalty",
        ),
        (
            SamplingError::InvalidFrequencyPenalty(3.0),
            "frequency_penalty",
        ),
    ] {
        let msg = e.to_string();
        assert!(msg.contains(field) && msg.contains("[-2, 2]"), "{msg}");
    }
    // The bounds themselves are valid.
    for v in [-2.0, 2.0] {
        let p = SamplingParams {
            presence_penalty: v,
            frequency_penalty: v,
            ..ok.clone()
        };
        assert_eq!(p.validate(), Ok(()));
    }
}

#[test]
fn params_deserialize_with_defaults() {
    let p: SamplingParams = serde_json::from_str("{}").unwrap();
    assert_eq!(p, SamplingParams::default());
    let p: SamplingParams =
        serde_json::from_str(r#"{"temperature": 0.7, "top_k": 20, "stop_strings": ["\n\n"]}"#)
            .unwrap();
    assert_eq!(p.temperature, 0.7);
    assert_eq!(p.top_k, Some(20));
    assert_eq!(p.stop_strings, vec!["\n\n".to_string()]);
    assert_eq!(p.max_tokens, SamplingParams::default().max_tokens);
}
