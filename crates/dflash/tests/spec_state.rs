//! After every verify round — in particular after a rejection — the target session is exactly
//! the session a fresh prefill of the committed tokens gives: the next-token logits of both, for
//! a probe token, are bit-identical (tolerance 0: the executor computes a token's logits with
//! the same f32 operations whatever the call pattern, so any difference is a stale or missing
//! cache row). Checked inside the loop through a [`Target`] wrapper on every round, greedy and
//! sampled, on the tiny models of every architecture (sliding windows of 4 are crossed).

mod common;

use std::ops::ControlFlow;

use common::{
    assert_bits, copycat, most_frequent, plain_decode, tiny_targets, tokens, Watch, Watched,
};
use dflash::toy::{self, ToyKind};
use dflash::{speculative_generate, SpecOptions};
use model::cpu::{CpuError, CpuModel, Session, VerifyOutput};
use model::sampling::SamplingParams;

/// After every truncation, compares the session with a fresh prefill of the tokens it holds.
struct Checked {
    model: CpuModel,
    /// Every token the session holds.
    held: Vec<u32>,
    checks: usize,
    rejections: usize,
    /// Rejections after at least one accepted draft.
    partial: usize,
    /// Length before the latest forward.
    before: usize,
}

impl Watch for Checked {
    fn forwarded(&mut self, s: &Session, tokens: &[u32], _out: &VerifyOutput) {
        self.before = s.len() - tokens.len();
        self.held.extend_from_slice(tokens);
    }
    fn truncated(&mut self, s: &Session, from: usize, len: usize) -> Result<(), CpuError> {
        if len < from {
            self.rejections += 1;
            if len > self.before + 1 {
                self.partial += 1;
            }
        }
        self.held.truncate(len);
        let mut fresh = self.model.session();
        fresh.prefill(&self.held)?;
        let mut cont = s.clone();
        assert_eq!(cont.len(), fresh.len());
        for probe in [0, 1] {
            let (mut a, mut b) = (cont.clone(), fresh.clone());
            let la = a.decode(probe)?.to_vec();
            let lb = b.decode(probe)?.to_vec();
            assert_bits(&la, &lb, &format!("after truncate({len}), probe {probe}"));
        }
        // The kept cache also continues correctly with a block.
        let la = cont.verify(&[2, 3], &[])?.logits;
        let lb = fresh.verify(&[2, 3], &[])?.logits;
        assert_bits(
            &la.concat(),
            &lb.concat(),
            &format!("after truncate({len}), block"),
        );
        self.checks += 1;
        Ok(())
    }
}

/// Greedy with a drafter that proposes the target's most frequent token (long accepted runs,
/// then a rejection), sampled with a random drafter.
fn check(arch: usize, kind: ToyKind, block: usize) {
    let (name, m) = tiny_targets(5).swap_remove(arch);
    let prompt = tokens(1, 9, 0, 5);
    let (mut partial, mut rejections) = (0, 0);
    for temperature in [0.0, 1.0] {
        let d = if temperature == 0.0 {
            let greedy = SamplingParams {
                max_tokens: 20,
                ignore_eos: true,
                ..SamplingParams::greedy()
            };
            copycat(&m, kind, most_frequent(&plain_decode(&m, &prompt, &greedy)))
        } else {
            toy::drafter(m.config(), kind, 8, 3)
        };
        let mut t = Watched {
            s: m.session(),
            watch: Checked {
                model: m.clone(),
                held: Vec::new(),
                checks: 0,
                rejections: 0,
                partial: 0,
                before: 0,
            },
        };
        let params = SamplingParams {
            temperature,
            seed: Some(7),
            max_tokens: 20,
            ignore_eos: true,
            ..SamplingParams::default()
        };
        let opts = SpecOptions {
            block_size: block,
            eos_token_ids: Vec::new(),
        };
        let out = speculative_generate(
            &mut t,
            &d,
            &opts,
            &prompt,
            &params,
            &mut |_| ControlFlow::Continue(()),
            &mut |_| {},
        )
        .unwrap();
        let what = format!("{name} {kind:?} block {block} T={temperature}");
        assert_eq!(out.tokens.len(), 20);
        assert_eq!(
            t.watch.checks as u64,
            out.stats.rounds(),
            "{what}: one check per round"
        );
        // Committed = prompt + every emitted token but the last (the bonus rides in the next
        // block).
        let mut committed = prompt.clone();
        committed.extend_from_slice(&out.tokens[..19]);
        assert_eq!(t.watch.held, committed, "{what}");
        partial += t.watch.partial;
        rejections += t.watch.rejections;
    }
    assert!(rejections > 0, "{name}: no rejection happened");
    assert!(partial > 0, "{name}: no rejection after an accepted draft");
}

#[test]
fn state_after_rounds_gpt_oss() {
    check(0, ToyKind::ZLab, 4);
}

#[test]
fn state_after_rounds_qwen3_moe() {
    check(1, ToyKind::ZLabMixed, 16);
}

#[test]
fn state_after_rounds_mimo_v2_flash() {
    check(2, ToyKind::MiMo, 8);
}
