//! Sampled speculative decoding has exactly the target's sampling distribution.
//!
//! * [`SamplingDist`] (the dense `p` / `q` rows of rejection sampling) is the distribution
//!   `model::sampling::Sampler` draws from: same support, χ² goodness of fit of the Sampler's
//!   draws, for temperature / top-k / top-p / min-p / repetition, presence and frequency
//!   penalties.
//! * The loop: over many seeds, the joint distribution of the first two generated tokens equals
//!   `p(t1) · p(t2 | t1)` computed from the target directly (χ² p-value > 1e-3; deterministic seeds,
//!   so the outcome is fixed). The target is a tiny analytic model behind the `DraftTarget` trait
//!   (logits depend on the token, the previous token and the position, so a misaligned row
//!   would show); the drafter is a real random [`Drafter`] whose proposals differ from the
//!   target's distribution (the negative control checks that the test has power). With presence
//!   / frequency penalties, the joint distribution of the first THREE tokens, so that the third
//!   often comes from the second row of a block whose first draft was accepted (its penalties
//!   count that draft); a penalty-blind expectation is rejected (the test sees the penalties).
//! * On the real CPU executor, sampled generation is deterministic given the seed.

mod common;

use std::borrow::Cow;
use std::convert::Infallible;
use std::ops::ControlFlow;

use common::{tiny_targets, tokens};
use dflash::target::{DraftTarget, Executor};
use dflash::toy::{self, ToyKind};
use dflash::{speculative_generate, Drafter, SamplingDist, SpecDecoder, SpecOptions};
use model::config::ModelConfig;
use model::cpu::VerifyOutput;
use model::sampling::{Sampler, SamplingParams};
use model::weights::Mat;
use model::LAST_LAYER_PRE_NORM;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// χ² statistic over cells with positive expected probability; observations in zero-probability
/// cells are a hard failure. Cells with expected count < 5 are pooled into one.
fn chi2(observed: &[u64], expected: &[f64], n: u64, what: &str) -> (f64, usize) {
    let (mut stat, mut cells) = (0.0, 0usize);
    let (mut pool_o, mut pool_e) = (0.0, 0.0);
    for (i, (&o, &p)) in observed.iter().zip(expected).enumerate() {
        if p == 0.0 {
            assert_eq!(
                o, 0,
                "{what}: cell {i} has probability 0 but was observed {o} times"
            );
            continue;
        }
        let e = p * n as f64;
        if e < 5.0 {
            pool_o += o as f64;
            pool_e += e;
            continue;
        }
        stat += (o as f64 - e).powi(2) / e;
        cells += 1;
    }
    if pool_e > 0.0 {
        stat += (pool_o - pool_e).powi(2) / pool_e;
        cells += 1;
    }
    (stat, cells.saturating_sub(1))
}

/// Upper tail `P(χ²_df > x)` = `Q(df/2, x/2)`, the regularized upper incomplete gamma function
/// (series for `x < a + 1`, Lentz's continued fraction otherwise; Numerical Recipes §6.2).
fn chi2_sf(x: f64, df: usize) -> f64 {
    let (a, x) = (df as f64 / 2.0, x / 2.0);
    if x <= 0.0 {
        return 1.0;
    }
    let ln_pre = a * x.ln() - x - ln_gamma(a);
    if x < a + 1.0 {
        let (mut term, mut sum, mut ap) = (1.0 / a, 1.0 / a, a);
        for _ in 0..1000 {
            ap += 1.0;
            term *= x / ap;
            sum += term;
            if term < sum * 1e-15 {
                break;
            }
        }
        1.0 - sum * ln_pre.exp()
    } else {
        let tiny = 1e-300;
        let mut b = x + 1.0 - a;
        let mut c = 1.0 / tiny;
        let mut d = 1.0 / b;
        let mut h = d;
        for i in 1..1000 {
            let an = -(i as f64) * (i as f64 - a);
            b += 2.0;
            d = an * d + b;
            if d.abs() < tiny {
                d = tiny;
            }
            c = b + an / c;
            if c.abs() < tiny {
                c = tiny;
            }
            d = 1.0 / d;
            let del = d * c;
            h *= del;
            if (del - 1.0).abs() < 1e-15 {
                break;
            }
        }
        ln_pre.exp() * h
    }
}

/// `ln Γ(a)` (Lanczos, g = 7, n = 9; ~1e-15 relative).
fn ln_gamma(a: f64) -> f64 {
    const G: [f64; 9] = [
        0.999_999_999_999_809_9,
        676.520_368_121_885_1,
        -1_259.139_216_722_402_8,
        771.323_428_777_653_1,
        -176.615_029_162_140_6,
        12.507_343_278_686_905,
        -0.138_571_095_265_720_12,
        9.984_369_578_019_572e-6,
        1.505_632_735_149_311_6e-7,
    ];
    let x = a - 1.0;
    let mut s = G[0];
    for (i, g) in G.iter().enumerate().skip(1) {
        s += g / (x + i as f64);
    }
    let t = x + 7.5;
    0.5 * (2.0 * std::f64::consts::PI).ln() + (x + 0.5) * t.ln() - t + s.ln()
}

/// Significance level of every χ² test here (deterministic seeds: the outcome is fixed).
const ALPHA: f64 = 1e-3;

#[test]
fn chi2_tail_matches_tables() {
    // χ²_{0.999} critical values from the tables: df 1, 4, 7, 24.
    for (x, df) in [(10.828, 1), (18.467, 4), (24.322, 7), (51.179, 24)] {
        let p = chi2_sf(x, df);
        assert!((p - ALPHA).abs() < 2e-6, "df {df}: {p}");
    }
    assert!((ln_gamma(5.0) - 24f64.ln()).abs() < 1e-12);
}

fn param_sets() -> Vec<SamplingParams> {
    let base = SamplingParams {
        temperature: 1.0,
        ..SamplingParams::default()
    };
    vec![
        base.clone(),
        SamplingParams {
            temperature: 0.7,
            top_k: Some(3),
            ..base.clone()
        },
        SamplingParams {
            temperature: 1.3,
            top_p: Some(0.8),
            ..base.clone()
        },
        SamplingParams {
            min_p: Some(0.2),
            repetition_penalty: Some(1.8),
            ..base.clone()
        },
        SamplingParams {
            temperature: 0.9,
            top_k: Some(5),
            top_p: Some(0.9),
            min_p: Some(0.05),
            repetition_penalty: Some(0.7),
            ..base.clone()
        },
        SamplingParams {
            presence_penalty: 0.9,
            frequency_penalty: 0.7,
            ..base.clone()
        },
        SamplingParams {
            temperature: 0.8,
            top_p: Some(0.95),
            repetition_penalty: Some(1.3),
            presence_penalty: -0.5,
            frequency_penalty: 1.2,
            ..base
        },
    ]
}

#[test]
fn sampling_dist_is_the_samplers_distribution() {
    const V: usize = 8;
    const DRAWS: u64 = 20_000;
    let mut rng = ChaCha8Rng::seed_from_u64(5);
    for (pi, params) in param_sets().into_iter().enumerate() {
        let logits: Vec<f32> = (0..V).map(|_| rng.random_range(-2.0..2.0)).collect();
        let (prompt, generated) = ([1u32, 4], [4u32, 6, 4]);
        let mut dist = SamplingDist::new(&params).unwrap();
        let mut p = vec![0f32; V];
        dist.probs(&logits, &prompt, &generated, &mut p).unwrap();
        assert!((p.iter().map(|&x| x as f64).sum::<f64>() - 1.0).abs() < 1e-6);
        let mut sampler = Sampler::new(&SamplingParams {
            seed: Some(pi as u64),
            ..params.clone()
        })
        .unwrap();
        let mut counts = [0u64; V];
        for _ in 0..DRAWS {
            counts[sampler.sample(&logits, &prompt, &generated) as usize] += 1;
        }
        let expected: Vec<f64> = p.iter().map(|&x| x as f64).collect();
        let (stat, df) = chi2(&counts, &expected, DRAWS, &format!("params {pi}"));
        assert!(
            df == 0 || chi2_sf(stat, df) > ALPHA,
            "params {pi}: χ² {stat} (df {df}); counts {counts:?}, p {p:?}"
        );
    }
    // Greedy: the one-hot of the Sampler's argmax (ties → lowest id).
    let mut dist = SamplingDist::new(&SamplingParams::greedy()).unwrap();
    let mut p = vec![0f32; 4];
    dist.probs(&[0.5, 2.0, 2.0, f32::NAN], &[], &[], &mut p)
        .unwrap();
    assert_eq!(p, [0.0, 1.0, 0.0, 0.0]);
}

// ---------------------------------------------------------------------------------------------
// The loop on a tiny analytic target
// ---------------------------------------------------------------------------------------------

const V: usize = 5;
const H: usize = 16;

/// Decoder layers of the analytic target.
const LAYERS: usize = 2;

/// A deterministic toy target: logits of the token at position `p` after token `x` preceded by
/// `y` are `table[x][y] + 0.4·((p + i) mod 3)`; the "output of layer L" of that token is a fixed
/// function of `(x, p, L)` (hidden index `L + 1`; the last layer's pre-norm index as `LAYERS`).
#[derive(Clone)]
struct Analytic {
    /// A toy config with the analytic dimensions (vocab V, hidden H, `LAYERS` layers): all of it
    /// the loop reads.
    config: ModelConfig,
    table: Vec<f32>,
    embed: Mat,
    lm_head: Mat,
    held: Vec<u32>,
}

impl Analytic {
    fn new(seed: u64) -> Analytic {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let mut mat = |rows, cols| {
            Mat::from_f32(
                rows,
                cols,
                (0..rows * cols)
                    .map(|_| rng.random_range(-0.5..0.5))
                    .collect(),
            )
        };
        let embed = mat(V, H);
        let lm_head = mat(V, H);
        let table = (0..V * V * V)
            .map(|_| rng.random_range(-1.5..1.5))
            .collect();
        let (mut config, _) = model::cpu::toy::qwen3_moe(seed, model::cpu::toy::ToyExperts::Dense);
        config.layers.truncate(LAYERS);
        assert_eq!(
            config.layers.len(),
            LAYERS,
            "the toy config has too few layers"
        );
        config.vocab_size = V;
        config.hidden_size = H;
        Analytic {
            config,
            table,
            embed,
            lm_head,
            held: Vec::new(),
        }
    }

    fn logits_at(&self, pos: usize, x: u32, prev: u32) -> Vec<f32> {
        let base = (x as usize * V + prev as usize) * V;
        (0..V)
            .map(|i| self.table[base + i] + 0.4 * ((pos + i) % 3) as f32)
            .collect()
    }

    /// Next-token logits after `seq`.
    fn next_logits(&self, seq: &[u32]) -> Vec<f32> {
        let n = seq.len();
        let prev = if n >= 2 { seq[n - 2] } else { 0 };
        self.logits_at(n - 1, seq[n - 1], prev)
    }
}

impl Executor for Analytic {
    type Error = Infallible;
    fn config(&self) -> &ModelConfig {
        &self.config
    }
    fn len(&self) -> usize {
        self.held.len()
    }
    fn max_rollback(&self) -> usize {
        usize::MAX
    }
    fn prefill(&mut self, tokens: &[u32]) -> Result<Cow<'_, [f32]>, Infallible> {
        let mut out = self.verify(tokens, &[])?;
        Ok(Cow::Owned(out.logits.pop().unwrap_or_default()))
    }
    fn decode(&mut self, token: u32) -> Result<Cow<'_, [f32]>, Infallible> {
        self.prefill(&[token])
    }
    fn verify(&mut self, tokens: &[u32], hidden: &[usize]) -> Result<VerifyOutput, Infallible> {
        let start = self.held.len();
        self.held.extend_from_slice(tokens);
        let mut logits = Vec::new();
        let mut states = vec![Vec::new(); hidden.len()];
        for (j, &x) in tokens.iter().enumerate() {
            let pos = start + j;
            logits.push(self.next_logits(&self.held[..=pos]));
            for (slot, &i) in hidden.iter().enumerate() {
                // Hidden index i = the output of layer i − 1 (LAST_LAYER_PRE_NORM: the last).
                let f = if i == LAST_LAYER_PRE_NORM { LAYERS } else { i };
                let row = self
                    .embed
                    .row(x as usize)
                    .iter()
                    .enumerate()
                    .map(|(i, &e)| e * f as f32 + 0.01 * ((pos * 7 + i) % 5) as f32)
                    .collect();
                states[slot].push(row);
            }
        }
        Ok(VerifyOutput {
            logits,
            hidden: states,
        })
    }
    fn truncate(&mut self, len: usize) -> Result<(), Infallible> {
        self.held.truncate(len);
        Ok(())
    }
}

impl DraftTarget for Analytic {
    fn embedding(&self) -> &Mat {
        &self.embed
    }
    fn lm_head(&self) -> &Mat {
        &self.lm_head
    }
}

/// A one-layer MiMo-shaped drafter for the analytic target (a real [`Drafter`], random weights).
fn analytic_drafter(block: usize) -> Drafter {
    let cfg = serde_json::json!({
        "architectures": ["DFlashDraftModel"],
        "hidden_size": H, "intermediate_size": 2 * H, "num_hidden_layers": 1,
        "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 8,
        "partial_rotary_factor": 0.5, "rope_theta": 10000, "rms_norm_eps": 1e-5,
        "vocab_size": V, "block_size": block,
        "dflash_config": {"target_layer_ids": [0, 1], "mask_token_id": 0, "use_swa": true,
                          "swa_window_size": 3, "attention_sink_bias": true,
                          "attention_value_scale": 0.612}
    });
    let cfg = dflash::DrafterConfig::from_json_str(&cfg.to_string()).unwrap();
    let w = toy::random_weights(&cfg, H, true, 17);
    Drafter::new(cfg, w).unwrap()
}

#[test]
fn sampled_loop_reproduces_the_target_distribution() {
    const RUNS: u64 = 6000;
    let target = Analytic::new(3);
    let drafter = analytic_drafter(4);
    let prompt = [1u32, 3, 2];
    let opts = SpecOptions {
        block_size: 4,
        eos_token_ids: Vec::new(),
        prefill_chunk: None,
    };
    let sets = param_sets();
    for (pi, params) in [&sets[0], &sets[3], &sets[4]].into_iter().enumerate() {
        // Expected joint p(t1) p(t2 | t1), straight from the target under the transform.
        let expected = expected_joint(&target, params, &prompt, 2);
        let mut joint = [0u64; V * V];
        let mut naive = [0u64; V * V]; // negative control: (t1, first draft)
        let mut accepted_first = 0u64;
        for seed in 0..RUNS {
            // Stop after two tokens through the callback: a `max_tokens` of 2 would shrink the
            // first verify block to x_last alone and bypass the drafts.
            let run = SamplingParams {
                seed: Some(seed),
                max_tokens: 16,
                ignore_eos: true,
                ..params.clone()
            };
            let mut n = 0;
            let mut t = Analytic {
                held: Vec::new(),
                ..target.clone()
            };
            let mut first_draft = None;
            let out = speculative_generate(
                &mut t,
                &drafter,
                &opts,
                &prompt,
                &run,
                &mut |_| {
                    n += 1;
                    if n == 2 {
                        ControlFlow::Break(())
                    } else {
                        ControlFlow::Continue(())
                    }
                },
                &mut |r| {
                    if r.index == 0 {
                        first_draft = Some(r.drafts[0]);
                    }
                },
            )
            .unwrap();
            let (a, b) = (out.tokens[0] as usize, out.tokens[1] as usize);
            joint[a * V + b] += 1;
            naive[a * V + first_draft.unwrap() as usize] += 1;
            accepted_first += out.stats.accepted_tokens().min(1);
        }
        let (stat, df) = chi2(&joint, &expected, RUNS, &format!("set {pi}"));
        let pv = chi2_sf(stat, df);
        assert!(
            pv > ALPHA,
            "set {pi}: χ² {stat}, df {df}, p-value {pv}; {joint:?}"
        );
        // Power: the drafter's own proposals are far from the target's distribution…
        let naive_stat: f64 = naive
            .iter()
            .zip(&expected)
            .map(|(&o, &p)| {
                let e = (p * RUNS as f64).max(1e-9);
                (o as f64 - e).powi(2) / e
            })
            .sum();
        assert!(
            chi2_sf(naive_stat, V * V - 1) < 1e-12,
            "set {pi}: negative control χ² {naive_stat}"
        );
        // …and yet drafts were accepted (the acceptance path is what produced the match).
        assert!(
            accepted_first > RUNS / 10,
            "set {pi}: {accepted_first} accepted"
        );
    }
}

/// The exact distribution of the first `k` generated tokens after `prompt` (a `V^k` table, the
/// sequence `t1 … tk` at `Σ t_i · V^(k−i)`), from the target under the transform of `params`,
/// the penalties counting `t1 …` as generated.
fn expected_joint(
    target: &Analytic,
    params: &SamplingParams,
    prompt: &[u32],
    k: usize,
) -> Vec<f64> {
    let mut dist = SamplingDist::new(params).unwrap();
    let mut out = vec![1.0f64];
    let mut p = vec![0f32; V];
    for step in 0..k {
        let mut next = vec![0f64; out.len() * V];
        for (idx, &mass) in out.iter().enumerate() {
            // The `step` tokens of index `idx` (most significant first).
            let mut generated: Vec<u32> = (0..step)
                .scan(idx, |rest, _| {
                    let t = (*rest % V) as u32;
                    *rest /= V;
                    Some(t)
                })
                .collect();
            generated.reverse();
            let seq = [prompt, &generated].concat();
            dist.probs(&target.next_logits(&seq), prompt, &generated, &mut p)
                .unwrap();
            for (b, &pb) in p.iter().enumerate() {
                next[idx * V + b] = mass * pb as f64;
            }
        }
        out = next;
    }
    out
}

/// Presence / frequency penalties: the first three tokens have exactly the target's joint
/// distribution. The third token comes from the second row of round 0 whenever its first draft
/// was accepted; that row's penalties count the draft (and the first token), so a loop that
/// used stale counts inside the block would be off (the penalty-blind expectation is rejected,
/// so the test has the power to see it).
#[test]
fn sampled_loop_with_penalties_reproduces_the_target_distribution() {
    const RUNS: u64 = 12_000;
    let target = Analytic::new(3);
    let drafter = analytic_drafter(4);
    let prompt = [1u32, 3, 2];
    let opts = SpecOptions {
        block_size: 4,
        eos_token_ids: Vec::new(),
        prefill_chunk: None,
    };
    let sets = param_sets();
    for (pi, params) in sets[5..].iter().enumerate() {
        let expected = expected_joint(&target, params, &prompt, 3);
        let blind = expected_joint(
            &target,
            &SamplingParams {
                presence_penalty: 0.0,
                frequency_penalty: 0.0,
                ..params.clone()
            },
            &prompt,
            3,
        );
        let mut joint = vec![0u64; V * V * V];
        let mut in_block = 0u64;
        for seed in 0..RUNS {
            let run = SamplingParams {
                seed: Some(seed),
                max_tokens: 16,
                ignore_eos: true,
                ..params.clone()
            };
            let mut n = 0;
            let mut t = Analytic {
                held: Vec::new(),
                ..target.clone()
            };
            let mut first_accepted = 0;
            let out = speculative_generate(
                &mut t,
                &drafter,
                &opts,
                &prompt,
                &run,
                &mut |_| {
                    n += 1;
                    if n == 3 {
                        ControlFlow::Break(())
                    } else {
                        ControlFlow::Continue(())
                    }
                },
                &mut |r| {
                    if r.index == 0 {
                        first_accepted = r.acceptance.accepted;
                    }
                },
            )
            .unwrap();
            let i = out.tokens[..3]
                .iter()
                .fold(0, |acc, &t| acc * V + t as usize);
            joint[i] += 1;
            in_block += u64::from(first_accepted >= 1);
        }
        let (stat, df) = chi2(&joint, &expected, RUNS, &format!("penalty set {pi}"));
        let pv = chi2_sf(stat, df);
        assert!(
            pv > ALPHA,
            "penalty set {pi}: χ² {stat}, df {df}, p-value {pv}"
        );
        let blind_stat: f64 = joint
            .iter()
            .zip(&blind)
            .map(|(&o, &p)| {
                let e = (p * RUNS as f64).max(1e-9);
                (o as f64 - e).powi(2) / e
            })
            .sum();
        assert!(
            chi2_sf(blind_stat, V * V * V - 1) < 1e-9,
            "penalty set {pi}: the penalty-blind expectation fits too (χ² {blind_stat})"
        );
        assert!(
            in_block > RUNS / 10,
            "penalty set {pi}: only {in_block} runs took token 3 from inside a block"
        );
    }
}

#[test]
fn sampled_generation_is_deterministic_given_the_seed() {
    let (_, m) = tiny_targets(16).swap_remove(2);
    let d = toy::drafter(m.config(), ToyKind::MiMo, 8, 2);
    let spec = SpecDecoder::new(&m, d, None).unwrap();
    let prompt = tokens(4, 8, 0, 16);
    let params = |seed| SamplingParams {
        temperature: 0.8,
        top_p: Some(0.95),
        seed: Some(seed),
        max_tokens: 20,
        ignore_eos: true,
        ..SamplingParams::default()
    };
    let run = |seed| {
        spec.generate(&prompt, &params(seed), |_| ControlFlow::Continue(()))
            .unwrap()
    };
    let (a, b, c) = (run(1), run(1), run(2));
    assert_eq!(a, b);
    assert_eq!(a.tokens.len(), 20);
    assert_ne!(
        a.tokens, c.tokens,
        "different seeds should differ over 20 tokens"
    );
}
