//! The Rust drafter and loop against the PyTorch reference (`scripts/fixtures/dflash_reference.py`,
//! an independent implementation of research/dflash.md) on the fixture drafters
//! `fixtures/drafters/*/` (`golden_draft.json`, written by `scripts/fixtures/make_drafters.py`
//! against the HF transformers targets in f32).
//!
//! Compared, round by round: the target's context features (the outputs of the
//! `target_layer_ids` layers; the last layer before the final norm), the fused context
//! `hidden_norm(fc(·))` — from the golden's own features (the drafter alone) and from ours —,
//! the draft logits of rows 1..B−1, their argmax, the acceptance and bonus **exactly**, and the
//! emitted tokens (which also equal plain greedy decoding).
//!
//! Tolerance 1e-4 absolute on features, fused context and logits (magnitudes ≤ ~5): the CPU
//! executor matches HF f32 to ~3e-6 on these fixtures (fixtures/README.md: its goldens use
//! 1e-4), and the drafter is a few f32 layers whose sums run in a different order than torch's
//! (32-lane dot products vs BLAS), i.e. ~1e-6 relative per op; 1e-4 leaves a margin of ~10–30×
//! over the observed differences (printed by the test) while far below any semantic error (a
//! wrong mask, position, norm or RoPE moves logits by ≥ 1e-2). The goldens are committed; a
//! missing one fails the test.

mod common;

use std::ops::ControlFlow;

use common::{fixtures_root, load_target, max_abs_diff, Watch, Watched};
use dflash::{Drafter, SpecDecoder};
use model::cpu::{Session, VerifyOutput};
use model::sampling::SamplingParams;
use serde_json::Value;

const TOL: f32 = 1e-4;

fn flat(v: &Value) -> Vec<f32> {
    match v {
        Value::Array(a) => a.iter().flat_map(flat).collect(),
        Value::Number(n) => vec![n.as_f64().expect("number") as f32],
        other => panic!("expected numbers, got {other}"),
    }
}

fn ids(v: &Value) -> Vec<u32> {
    v.as_array()
        .expect("list")
        .iter()
        .map(|x| x.as_u64().expect("id") as u32)
        .collect()
}

/// Keeps every target output of the loop.
struct Recording {
    outputs: Vec<VerifyOutput>,
}

impl Watch for Recording {
    fn forwarded(&mut self, _s: &Session, _tokens: &[u32], out: &VerifyOutput) {
        self.outputs.push(out.clone());
    }
}

/// Rows `0..rows` of a forward's features, concatenated per token.
fn features(o: &VerifyOutput, rows: usize) -> Vec<f32> {
    (0..rows)
        .flat_map(|j| o.hidden.iter().flat_map(move |h| h[j].iter().copied()))
        .collect()
}

#[test]
fn drafter_matches_the_pytorch_reference() {
    let root = fixtures_root().join("drafters");
    let mut checked = 0;
    for name in ["qwen3-moe-dflash", "gpt-oss-dflash", "mimo-dflash"] {
        let dir = root.join(name);
        let golden = dir.join("golden_draft.json");
        // The goldens are committed: a missing one is a failure, not a skip.
        assert!(
            golden.is_file(),
            "{}: missing (regenerate with scripts/fixtures/make_drafters.py)",
            golden.display()
        );
        let g: Value = serde_json::from_str(&std::fs::read_to_string(&golden).unwrap()).unwrap();
        let m = load_target(g["target"].as_str().expect("target"));
        let d = Drafter::load(&dir, m.config()).unwrap_or_else(|e| panic!("{name}: {e}"));
        let c = d.config();
        let b = g["block_size"].as_u64().unwrap() as usize;
        assert_eq!(c.block_size, b, "{name}: block size");
        assert_eq!(c.mask_token_id as u64, g["mask_token_id"].as_u64().unwrap());
        assert_eq!(
            c.target_layer_ids,
            ids(&g["target_layer_ids"])
                .iter()
                .map(|&x| x as usize)
                .collect::<Vec<_>>()
        );
        let v = m.config().vocab_size;
        let prompt = ids(&g["prompt_ids"]);
        let want_tokens = ids(&g["emitted_tokens"]);
        let rounds = g["rounds"].as_array().expect("rounds");

        // The loop, recording the target's outputs and every round.
        let mut t = Watched {
            s: m.session(),
            watch: Recording {
                outputs: Vec::new(),
            },
        };
        let spec = SpecDecoder::new(&m, d.clone(), Some(b)).unwrap();
        let params = SamplingParams {
            max_tokens: want_tokens.len() + b,
            ignore_eos: true,
            ..SamplingParams::greedy()
        };
        let mut seen = Vec::new();
        let mut n = 0;
        let out = dflash::speculative_generate(
            &mut t,
            spec.drafter(),
            spec.options(),
            &prompt,
            &params,
            &mut |_| {
                n += 1;
                if n == want_tokens.len() {
                    ControlFlow::Break(())
                } else {
                    ControlFlow::Continue(())
                }
            },
            &mut |r| {
                seen.push((
                    r.start,
                    r.x_last,
                    r.draft_logits.to_vec(),
                    r.acceptance.accepted,
                    r.acceptance.bonus,
                ))
            },
        )
        .unwrap();
        assert_eq!(out.tokens, want_tokens, "{name}: emitted tokens");
        assert_eq!(out.tokens, ids(&g["plain_greedy"]), "{name}: plain greedy");
        assert_eq!(out.tokens[0] as u64, g["prefill_token"].as_u64().unwrap());
        assert_eq!(seen.len(), rounds.len(), "{name}: number of rounds");

        let (mut d_feat, mut d_fused, mut d_logit) = (0f32, 0f32, 0f32);
        for (ri, (gr, (start, x_last, logits, accepted, bonus))) in
            rounds.iter().zip(&seen).enumerate()
        {
            let what = format!("{name} round {ri}");
            assert_eq!(
                *start as u64,
                gr["start"].as_u64().unwrap(),
                "{what}: start"
            );
            assert_eq!(
                *x_last as u64,
                gr["x_last"].as_u64().unwrap(),
                "{what}: x_last"
            );
            // This round's new context rows: the prompt, or the committed rows of the previous
            // verify.
            let ours = if ri == 0 {
                features(&t.watch.outputs[0], prompt.len())
            } else {
                features(&t.watch.outputs[ri], seen[ri - 1].3 + 1)
            };
            let gf = flat(&gr["context_features"]);
            d_feat = d_feat.max(max_abs_diff(&ours, &gf));
            // Fused context: the drafter alone (golden features in), and end to end.
            let gfused = flat(&gr["fused_context"]);
            d_fused = d_fused.max(max_abs_diff(&d.fuse(&gf).unwrap(), &gfused));
            d_fused = d_fused.max(max_abs_diff(&d.fuse(&ours).unwrap(), &gfused));
            // Draft logits, their argmax, acceptance.
            let gl = flat(&gr["draft_logits"]);
            assert_eq!(logits.len(), (b - 1) * v, "{what}: draft logits shape");
            d_logit = d_logit.max(max_abs_diff(logits, &gl));
            let argmax: Vec<u32> = logits
                .chunks_exact(v)
                .map(|row| {
                    let mx = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                    row.iter().position(|&x| x == mx).unwrap() as u32
                })
                .collect();
            assert_eq!(argmax, ids(&gr["draft_tokens"]), "{what}: draft tokens");
            assert_eq!(
                *accepted as u64,
                gr["accepted"].as_u64().unwrap(),
                "{what}: accepted"
            );
            assert_eq!(
                *bonus as u64,
                gr["bonus"].as_u64().unwrap(),
                "{what}: bonus"
            );
        }
        if let Some(r1) = g.get("round1").and_then(|r| r.get("fused_context")) {
            let ours = d
                .fuse(&features(&t.watch.outputs[0], prompt.len()))
                .unwrap();
            d_fused = d_fused.max(max_abs_diff(&ours, &flat(r1)));
        }
        eprintln!(
            "{name}: {} rounds, max |Δ| features {d_feat:.2e}, fused context {d_fused:.2e}, \
             draft logits {d_logit:.2e}",
            rounds.len()
        );
        assert!(d_feat <= TOL, "{name}: target features differ by {d_feat}");
        assert!(d_fused <= TOL, "{name}: fused context differs by {d_fused}");
        assert!(d_logit <= TOL, "{name}: draft logits differ by {d_logit}");
        let acc: Vec<u64> = g["accepted_per_round"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_u64().unwrap())
            .collect();
        assert_eq!(
            acc,
            seen.iter().map(|s| s.3 as u64).collect::<Vec<_>>(),
            "{name}: acceptances"
        );
        checked += 1;
    }
    assert_eq!(checked, 3, "goldens checked");
}
