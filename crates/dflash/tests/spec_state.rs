//! After every verify round — in particular after a rejection — the target session is exactly
//! the session a fresh prefill of the committed tokens gives: the next-token logits of both, for
//! a probe token, are bit-identical (tolerance 0: the executor computes a token's logits with
//! the same f32 operations whatever the call pattern, so any difference is a stale or missing
//! cache row). Checked inside the loop through a `DraftTarget` wrapper on every round, greedy and
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
            prefill_chunk: None,
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

/// Chunked prefill ([`SpecOptions::prefill_chunk`]) leaves the state one call leaves: the
/// prompt's last row, the drafter's next block (its context cache) and the target session (its
/// next-token logits for a probe) are bit-identical, on every architecture (chunks of 1, 4 and 7
/// cross the sliding windows of 4 and the drafters' windows); and generations with chunked
/// prefill emit the same tokens and rounds as the one-call prefill, the same tokens as plain
/// decoding.
#[test]
fn chunked_prefill_equals_one_call() {
    use dflash::{prefill_prompt, run_speculative, CpuBackend, Rows, SpecBackend, Want};
    let prompt = tokens(3, 23, 0, 6);
    let kinds = [ToyKind::ZLab, ToyKind::ZLabMixed, ToyKind::MiMo];
    for ((name, m), kind) in tiny_targets(6).into_iter().zip(kinds) {
        let d = toy::drafter(m.config(), kind, 8, 5);
        let logits = |r: Rows| match r {
            Rows::Logits(l) => l,
            Rows::Argmax(_) => panic!("the CPU backend returns logits"),
        };
        // One call: the last row, the next block's draft rows, the session.
        let mut one = m.session();
        let (row, draft) = {
            let mut b = CpuBackend::new(&mut one, &d).unwrap();
            let row = logits(prefill_prompt(&mut b, &prompt, None, Want::Logits).unwrap());
            (row, logits(b.draft(2, 8, Want::Logits).unwrap()))
        };
        let greedy = SamplingParams {
            max_tokens: 16,
            ignore_eos: true,
            ..SamplingParams::greedy()
        };
        let plain = plain_decode(&m, &prompt, &greedy);
        let generate = |chunk: Option<usize>| {
            let opts = SpecOptions {
                block_size: 4,
                eos_token_ids: Vec::new(),
                prefill_chunk: chunk,
            };
            let mut s = m.session();
            let mut b = CpuBackend::new(&mut s, &d).unwrap();
            let mut chunks = 0;
            let out = run_speculative(
                &mut Counting(&mut b, &mut chunks),
                &opts,
                &prompt,
                &greedy,
                &mut |_| ControlFlow::Continue(()),
                &mut |_| {},
            )
            .unwrap();
            (out, chunks)
        };
        let (reference, calls) = generate(None);
        assert_eq!(calls, 1, "{name}: one prefill call");
        assert_eq!(
            reference.tokens, plain,
            "{name}: one call vs plain decoding"
        );
        for chunk in [1, 4, 7] {
            let what = format!("{name}, chunks of {chunk}");
            let mut s = m.session();
            {
                let mut b = CpuBackend::new(&mut s, &d).unwrap();
                let r = logits(prefill_prompt(&mut b, &prompt, Some(chunk), Want::Logits).unwrap());
                assert_bits(&r, &row, &format!("{what}: last row"));
                let dr = logits(b.draft(2, 8, Want::Logits).unwrap());
                assert_bits(&dr, &draft, &format!("{what}: draft rows"));
            }
            assert_eq!(s.len(), one.len(), "{what}");
            for probe in [0, 1] {
                let (mut a, mut b) = (s.clone(), one.clone());
                let la = a.decode(probe).unwrap().to_vec();
                let lb = b.decode(probe).unwrap().to_vec();
                assert_bits(&la, &lb, &format!("{what}: target, probe {probe}"));
            }
            let (out, calls) = generate(Some(chunk));
            assert_eq!(calls, prompt.len().div_ceil(chunk), "{what}: prefill calls");
            assert_eq!(out, reference, "{what}: generation");
        }
    }
}

/// Counts the prefill calls of a backend.
struct Counting<'a, B>(&'a mut B, &'a mut usize);

impl<B: dflash::SpecBackend> dflash::SpecBackend for Counting<'_, B> {
    fn vocab_size(&self) -> usize {
        self.0.vocab_size()
    }
    fn len(&self) -> usize {
        self.0.len()
    }
    fn prefill(
        &mut self,
        chunk: &[u32],
        want: Option<dflash::Want>,
    ) -> Result<Option<dflash::Rows>, dflash::SpecError> {
        *self.1 += 1;
        self.0.prefill(chunk, want)
    }
    fn draft(
        &mut self,
        x_last: u32,
        block: usize,
        want: dflash::Want,
    ) -> Result<dflash::Rows, dflash::SpecError> {
        self.0.draft(x_last, block, want)
    }
    fn verify(
        &mut self,
        tokens: &[u32],
        want: dflash::Want,
    ) -> Result<dflash::Rows, dflash::SpecError> {
        self.0.verify(tokens, want)
    }
    fn commit(&mut self, keep: usize) -> Result<(), dflash::SpecError> {
        self.0.commit(keep)
    }
}

/// A chunk that does not continue the drafter's context, and a prompt prefilled into a backend
/// that already holds positions, are errors.
#[test]
fn prefill_errors() {
    use dflash::{prefill_prompt, CpuBackend, SpecBackend, SpecError, Want};
    let (_, m) = tiny_targets(6).swap_remove(1);
    let d = toy::drafter(m.config(), ToyKind::ZLab, 4, 1);
    let mut s = m.session();
    s.prefill(&[1, 2]).unwrap();
    let mut b = CpuBackend::new(&mut s, &d).unwrap();
    let e = b.prefill(&[3], Some(Want::Logits)).unwrap_err();
    assert!(e.to_string().contains("drafter context 0"), "{e}");
    let e = prefill_prompt(&mut b, &[3], None, Want::Logits).unwrap_err();
    assert!(matches!(e, SpecError::TargetNotEmpty(2)), "{e}");
    let mut s = m.session();
    let mut b = CpuBackend::new(&mut s, &d).unwrap();
    assert!(matches!(
        prefill_prompt(&mut b, &[], Some(2), Want::Logits),
        Err(SpecError::EmptyPrompt)
    ));
    assert!(matches!(b.prefill(&[], None), Err(SpecError::EmptyPrompt)));
    // A middle chunk returns no row.
    assert!(b.prefill(&[1, 2], None).unwrap().is_none());
    assert_eq!(b.len(), 2);
}

/// A state started from a cached prefix — the target adopting another session's full KV blocks,
/// the drafter context taking that session's recorded features — then prefilling the rest of
/// the prompt gives bit-identical last logits and draft rows to a state that prefilled it all.
/// Features recorded across verify rounds are the rows a prefill of those tokens computes.
#[test]
fn adopting_a_cached_prefix_with_its_features_equals_prefilling_it() {
    use dflash::{CpuBackend, Rows, SpecBackend, SpecError, Want};
    use model::cpu::DEFAULT_MAX_ROLLBACK;
    let prompt = tokens(4, 26, 0, 6);
    let bs = 4;
    let kinds = [ToyKind::ZLab, ToyKind::ZLabMixed, ToyKind::MiMo];
    let logits = |r: Rows| match r {
        Rows::Logits(l) => l,
        Rows::Argmax(_) => panic!("the CPU backend returns logits"),
    };
    for ((name, m), kind) in tiny_targets(6).into_iter().zip(kinds) {
        let d = toy::drafter(m.config(), kind, 8, 5);
        // The source: 17 prompt tokens prefilled, then verify rounds commit the rest (kept
        // rows of a verify, as a speculative request's generated tokens are).
        let mut src = Session::with_block_size(&m, DEFAULT_MAX_ROLLBACK, bs);
        let mut a = CpuBackend::new(&mut src, &d).unwrap();
        a.record_features();
        a.prefill(&prompt[..17], None).unwrap();
        let mut at = 17;
        while at < prompt.len() {
            let n = (prompt.len() - at).min(3);
            a.verify(&prompt[at..at + n], Want::Logits).unwrap();
            a.commit(n.min(2)).unwrap();
            at += n.min(2);
        }
        let feats = a.take_features();
        let dim = a.feature_dim();
        assert_eq!(feats.len(), prompt.len() * dim, "{name}");
        // Whole blocks that every layer still holds.
        let mut blocks = Vec::new();
        while let Some(b) = a.target().full_block(blocks.len()) {
            blocks.push(b);
        }
        drop(a);
        assert!(blocks.len() >= 4, "{name}: {} full blocks", blocks.len());
        let k = blocks.len().min((prompt.len() - 1) / bs);
        let cached = k * bs;
        // Reference: the whole prompt prefilled.
        let mut one = m.session();
        let (row, draft) = {
            let mut b = CpuBackend::new(&mut one, &d).unwrap();
            let row = logits(b.prefill(&prompt, Some(Want::Logits)).unwrap().unwrap());
            (row, logits(b.draft(2, 8, Want::Logits).unwrap()))
        };
        // Adopted prefix, the rest prefilled.
        let mut s = Session::with_block_size(&m, DEFAULT_MAX_ROLLBACK, bs);
        let mut b = CpuBackend::new(&mut s, &d).unwrap();
        b.adopt_prefix(&feats[..cached * dim], |t| {
            t.adopt_prefix(&blocks[..k])
                .map_err(|e| SpecError::TargetOutput(e.to_string()))
        })
        .unwrap();
        assert_eq!(b.len(), cached, "{name}");
        let got = logits(
            b.prefill(&prompt[cached..], Some(Want::Logits))
                .unwrap()
                .unwrap(),
        );
        assert_bits(&got, &row, &format!("{name}: last logits"));
        let got = logits(b.draft(2, 8, Want::Logits).unwrap());
        assert_bits(&got, &draft, &format!("{name}: draft rows"));
        // Features of the wrong length are refused and leave the state empty.
        let mut s = Session::with_block_size(&m, DEFAULT_MAX_ROLLBACK, bs);
        let mut b = CpuBackend::new(&mut s, &d).unwrap();
        let err = b.adopt_prefix(&feats[..dim], |t| {
            t.adopt_prefix(&blocks[..k])
                .map_err(|e| SpecError::TargetOutput(e.to_string()))
        });
        assert!(err.is_err(), "{name}");
        assert_eq!(b.len(), 0, "{name}");
    }
}
