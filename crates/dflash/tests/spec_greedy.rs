//! Speculative GREEDY decoding is token-for-token identical to plain greedy decoding.
//!
//! Every target fixture (gpt-oss bf16 and MXFP4, Qwen3-MoE, MiMo-V2-Flash, and their Hub-config /
//! sharded variants), block sizes 2, 4, 8 and 16, 24 generated tokens, with a random in-memory
//! drafter (the shapes rotate over the targets: z-lab full attention, z-lab mixed sliding/full
//! with YaRN, MiMo all-SWA with sinks and a mask embedding) and with the fixture drafters under
//! `fixtures/drafters/` that fit. An untrained drafter is rejected almost every round; the
//! tiny-vocabulary targets below accept often, so runs of several accepted drafts, full-block
//! acceptance and the shrinking last block are exercised too, with the repetition, presence and
//! frequency penalties (which make row i's pick depend on the drafts before it). Exact equality
//! is the requirement (the verify rows are bit-identical to decode steps); the target rows the
//! loop hands out for log-probabilities are the plain decode rows, bit for bit.

mod common;

use std::ops::ControlFlow;

use common::{
    assert_bits, copycat, fixture_prompt, fixtures_root, load_target, most_frequent, plain_decode,
    plain_decode_rows, tiny_targets, tokens,
};
use dflash::toy::{self, ToyKind};
use dflash::{
    run_speculative, run_speculative_rows, Drafter, Rows, SpecBackend, SpecDecoder, SpecError,
    SpecOptions, Want,
};
use model::sampling::{SamplingParams, StopCause};

const BLOCKS: [usize; 4] = [2, 4, 8, 16];
const KINDS: [ToyKind; 3] = [ToyKind::ZLab, ToyKind::ZLabMixed, ToyKind::MiMo];

fn greedy(max_tokens: usize, ignore_eos: bool) -> SamplingParams {
    SamplingParams {
        max_tokens,
        ignore_eos,
        ..SamplingParams::greedy()
    }
}

/// Greedy parameters with penalties: none, repetition, presence + frequency, all three (a
/// negative presence penalty, which favours repeats, with a frequency penalty against them).
fn penalized(max_tokens: usize) -> [SamplingParams; 4] {
    let g = greedy(max_tokens, true);
    [
        g.clone(),
        SamplingParams {
            repetition_penalty: Some(1.2),
            ..g.clone()
        },
        SamplingParams {
            presence_penalty: 0.5,
            frequency_penalty: 0.3,
            ..g.clone()
        },
        SamplingParams {
            repetition_penalty: Some(1.1),
            presence_penalty: -0.4,
            frequency_penalty: 0.9,
            ..g
        },
    ]
}

/// The penalties of `p`, for messages.
fn pens(p: &SamplingParams) -> String {
    format!(
        "rep {:?} presence {} frequency {}",
        p.repetition_penalty, p.presence_penalty, p.frequency_penalty
    )
}

/// The fixture drafters that fit `target` (by dims), with their names.
fn fixture_drafters(target: &model::cpu::CpuModel) -> Vec<(String, Drafter)> {
    let root = fixtures_root().join("drafters");
    let Ok(dirs) = std::fs::read_dir(&root) else {
        return Vec::new();
    };
    let mut out = Vec::new();
    let mut paths: Vec<_> = dirs.filter_map(|d| d.ok().map(|d| d.path())).collect();
    paths.sort();
    for p in paths {
        if !p.join("config.json").is_file() {
            continue;
        }
        let d = Drafter::load_unchecked(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
        if d.check_target(target.config()).is_ok() {
            out.push((p.file_name().unwrap().to_string_lossy().into_owned(), d));
        }
    }
    out
}

/// Plain greedy vs speculative greedy on one fixture target: a random drafter of `kind` and every
/// fixture drafter that fits the target, block sizes `blocks`, 24 tokens.
fn check_fixture(rel: &str, kind: ToyKind, blocks: &[usize]) {
    let m = load_target(rel);
    let prompt = fixture_prompt(rel);
    let params = greedy(24, true);
    let want = plain_decode(&m, &prompt, &params);
    assert_eq!(want.len(), 24);
    let mut drafters = vec![(
        format!("toy {kind:?}"),
        toy::drafter(m.config(), kind, 8, 21),
    )];
    drafters.extend(fixture_drafters(&m));
    for (name, d) in &drafters {
        for &b in blocks {
            let spec = SpecDecoder::new(&m, d.clone(), Some(b)).unwrap();
            let mut streamed = Vec::new();
            let out = spec
                .generate(&prompt, &params, |t| {
                    streamed.push(t);
                    ControlFlow::Continue(())
                })
                .unwrap();
            assert_eq!(out.tokens, want, "{rel}, drafter {name}, block {b}");
            assert_eq!(streamed, want, "{rel}, {name}, block {b}: streamed tokens");
            assert_eq!(out.stop_cause, Some(StopCause::MaxTokens));
            // The first token comes from the prefill; every other one from a round.
            assert_eq!(out.stats.emitted_tokens(), 23, "{rel}, {name}, block {b}");
            assert!(out.stats.tau().unwrap() <= b as f64);
        }
    }
    eprintln!(
        "{rel}: drafters {:?}",
        drafters.iter().map(|d| &d.0).collect::<Vec<_>>()
    );
}

#[test]
fn greedy_identity_gpt_oss_bf16() {
    check_fixture("gpt-oss/bf16", ToyKind::ZLabMixed, &BLOCKS);
}

#[test]
fn greedy_identity_gpt_oss_mxfp4() {
    check_fixture("gpt-oss/mxfp4", ToyKind::MiMo, &BLOCKS);
}

#[test]
fn greedy_identity_qwen3_moe() {
    check_fixture("qwen3-moe/native", ToyKind::ZLab, &BLOCKS);
}

#[test]
fn greedy_identity_mimo_v2_flash() {
    check_fixture("mimo-v2-flash/native", ToyKind::MiMo, &BLOCKS);
}

/// The other checkpoint layouts of the same models (Hub-spelling configs, sharded weights): the
/// fixture drafters fit them too, and speculative greedy equals plain greedy (block sizes 3 and
/// 16; the weights are those of the fixtures above).
#[test]
fn greedy_identity_checkpoint_variants() {
    for (rel, kind) in [
        ("gpt-oss/bf16-hub", ToyKind::ZLab),
        ("qwen3-moe/hub", ToyKind::MiMo),
        ("qwen3-moe/sharded", ToyKind::ZLabMixed),
        ("mimo-v2-flash/hub", ToyKind::ZLab),
    ] {
        let m = load_target(rel);
        assert!(
            !fixture_drafters(&m).is_empty(),
            "{rel}: no fixture drafter fits"
        );
        check_fixture(rel, kind, &[3, 16]);
    }
}

#[test]
fn eos_and_stop_tokens_end_inside_an_emitted_run() {
    let (_, m) = tiny_targets(6).swap_remove(1);
    let prompt = tokens(3, 10, 0, 6);
    let long = plain_decode(&m, &prompt, &greedy(40, true));
    let d = toy::drafter(m.config(), ToyKind::ZLab, 8, 4);
    let spec = SpecDecoder::new(&m, d, Some(8)).unwrap();
    // Stop at the 1st, 2nd, … occurrence of a token that appears mid-stream.
    let stop = long[long.len() / 2];
    let params = SamplingParams {
        stop_token_ids: vec![stop],
        ..greedy(40, true)
    };
    let want = plain_decode(&m, &prompt, &params);
    assert_eq!(*want.last().unwrap(), stop);
    let out = spec
        .generate(&prompt, &params, |_| ControlFlow::Continue(()))
        .unwrap();
    assert_eq!(out.tokens, want);
    assert_eq!(out.stop_cause, Some(StopCause::StopToken(stop)));
    // Same token as EOS (the decoder's EOS ids) → reported as EOS; ignore_eos → runs on.
    let spec = spec.with_eos_token_ids(vec![stop]);
    let out = spec
        .generate(&prompt, &greedy(40, false), |_| ControlFlow::Continue(()))
        .unwrap();
    assert_eq!(out.tokens, want);
    assert_eq!(out.stop_cause, Some(StopCause::Eos(stop)));
    let out = spec
        .generate(&prompt, &greedy(40, true), |_| ControlFlow::Continue(()))
        .unwrap();
    assert_eq!(out.tokens, long);
    // The callback can stop at any token (a stop string); the token that stopped is the last.
    for cut in [1, 2, 7, 13] {
        let mut n = 0;
        let out = spec
            .generate(&prompt, &greedy(40, true), |_| {
                n += 1;
                if n == cut {
                    ControlFlow::Break(())
                } else {
                    ControlFlow::Continue(())
                }
            })
            .unwrap();
        assert_eq!(out.tokens, long[..cut], "callback stop at {cut}");
        assert_eq!(out.stop_cause, None);
    }
    // max_tokens of every size, also inside a run of accepted drafts.
    for max in 1..=12 {
        let out = spec
            .generate(&prompt, &greedy(max, true), |_| ControlFlow::Continue(()))
            .unwrap();
        assert_eq!(out.tokens, long[..max], "max_tokens {max}");
    }
}

/// Frequent acceptance: a drafter that always proposes the target's most frequent token (see
/// `common::copycat`) on small-vocabulary targets that repeat it, so runs of several accepted
/// drafts, all-accepted blocks and the penalties (which make row i's argmax depend on the
/// drafts before it: the presence / frequency counts grow inside the block) are exercised; a
/// random drafter alongside for the rejection side.
#[test]
fn greedy_identity_with_frequent_acceptance() {
    let mut hist = vec![0u64; 17];
    let mut full_blocks = 0;
    let mut penalized_accepts = 0;
    for ((name, m), kind) in tiny_targets(6).into_iter().zip(KINDS) {
        let prompt = tokens(9, 12, 0, 6);
        for (b, params) in BLOCKS
            .into_iter()
            .flat_map(|b| penalized(24).map(|p| (b, p)))
        {
            let penalty = pens(&params);
            let want = plain_decode(&m, &prompt, &params);
            let drafters = [
                copycat(&m, kind, most_frequent(&want)),
                toy::drafter(m.config(), kind, 8, 5),
            ];
            for d in drafters {
                let spec = SpecDecoder::new(&m, d, Some(b)).unwrap();
                let out = spec
                    .generate(&prompt, &params, |_| ControlFlow::Continue(()))
                    .unwrap();
                assert_eq!(out.tokens, want, "{name} {kind:?} block {b} {penalty}");
                for (a, &c) in out.stats.histogram().iter().enumerate() {
                    hist[a] += c;
                }
                if params.presence_penalty != 0.0 {
                    penalized_accepts += out.stats.histogram().iter().skip(2).sum::<u64>();
                }
                full_blocks += out.stats.histogram().get(b - 1).copied().unwrap_or(0);
            }
        }
    }
    // Acceptance of 0, 1 and 3 or more drafts, and whole blocks, all occurred.
    assert!(
        hist[0] > 0 && hist[1] > 0 && hist[3..].iter().sum::<u64>() > 0 && full_blocks > 0,
        "{hist:?}, {full_blocks} full blocks"
    );
    // With presence / frequency penalties, blocks with two or more accepted drafts (whose
    // later rows count the earlier drafts) occurred.
    assert!(penalized_accepts > 0, "{penalized_accepts}");
    eprintln!("acceptance histogram {hist:?}, {full_blocks} full blocks");
}

/// A backend that answers [`Want::Argmax`] with argmax ids only (as a GPU backend does): the
/// CPU backend's rows reduced to their argmax (lowest id on ties) when the loop allows it.
struct ArgmaxOnly<'a, T: dflash::DraftTarget>(dflash::CpuBackend<&'a mut T, &'a dflash::Drafter>);

fn reduce(rows: Rows, want: Want, v: usize) -> Rows {
    match (rows, want) {
        (Rows::Logits(l), Want::Argmax) => Rows::Argmax(
            l.chunks_exact(v)
                .map(|r| {
                    let max = r.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                    r.iter().position(|&x| x == max).unwrap() as u32
                })
                .collect(),
        ),
        (rows, _) => rows,
    }
}

impl<T: dflash::DraftTarget> SpecBackend for ArgmaxOnly<'_, T> {
    fn vocab_size(&self) -> usize {
        self.0.vocab_size()
    }
    fn len(&self) -> usize {
        self.0.len()
    }
    fn prefill(&mut self, chunk: &[u32], want: Option<Want>) -> Result<Option<Rows>, SpecError> {
        let v = self.vocab_size();
        let rows = self.0.prefill(chunk, want)?;
        Ok(rows.zip(want).map(|(r, w)| reduce(r, w, v)))
    }
    fn draft(&mut self, x_last: u32, block: usize, want: Want) -> Result<Rows, SpecError> {
        let v = self.vocab_size();
        Ok(reduce(self.0.draft(x_last, block, want)?, want, v))
    }
    fn verify(&mut self, tokens: &[u32], want: Want) -> Result<Rows, SpecError> {
        let v = self.vocab_size();
        Ok(reduce(self.0.verify(tokens, want)?, want, v))
    }
    fn commit(&mut self, keep: usize) -> Result<(), SpecError> {
        self.0.commit(keep)
    }
}

/// The loop on argmax-only rows (plain greedy) produces the same tokens and rounds as on logits;
/// with a penalty it asks for logits and still matches plain decoding.
#[test]
fn argmax_rows_match_logit_rows() {
    let ((name, m), kind) = (tiny_targets(6).swap_remove(0), ToyKind::ZLab);
    let prompt = tokens(11, 12, 0, 6);
    let [plain, rep, pres_freq, all] = penalized(20);
    for (b, params) in BLOCKS.into_iter().zip([plain, rep, pres_freq, all]) {
        let penalty = pens(&params);
        let want = plain_decode(&m, &prompt, &params);
        let d = copycat(&m, kind, most_frequent(&want));
        let opts = SpecOptions {
            block_size: b,
            eos_token_ids: Vec::new(),
            prefill_chunk: None,
        };
        let mut s = m.session();
        let mut backend = ArgmaxOnly(dflash::CpuBackend::new(&mut s, &d).unwrap());
        let (mut argmax_rounds, mut drafted_rounds) = (0, 0);
        let out = run_speculative(
            &mut backend,
            &opts,
            &prompt,
            &params,
            &mut |_| ControlFlow::Continue(()),
            &mut |r| {
                argmax_rounds += usize::from(r.draft_logits.is_empty());
                drafted_rounds += usize::from(!r.drafts.is_empty());
            },
        )
        .unwrap();
        assert_eq!(out.tokens, want, "{name} block {b} {penalty}");
        let reference = SpecDecoder::new(&m, d, Some(b))
            .unwrap()
            .generate(&prompt, &params, |_| ControlFlow::Continue(()))
            .unwrap();
        assert_eq!(out.stats, reference.stats, "{name} block {b}");
        // Without a penalty every round saw argmax ids only; with one, logits (a last round
        // of no drafts has no draft rows either way).
        let rounds = out.stats.rounds() as usize;
        assert!(rounds > 0);
        let want_ids = if params.penalizes() {
            rounds - drafted_rounds
        } else {
            rounds
        };
        assert_eq!(argmax_rounds, want_ids, "{name} block {b} {penalty}");
    }
}

/// `run_speculative_rows` hands every emitted token the target's raw logits row it was chosen
/// from: bit-identical to the rows plain decoding samples from (so log-probabilities equal
/// plain decoding's), also on a backend that answers argmax ids where it may (the target rows
/// are then still logits, the draft rows ids), and with penalties; the tokens do not change.
#[test]
fn target_rows_are_the_plain_decode_rows() {
    let ((name, m), kind) = (tiny_targets(6).swap_remove(1), ToyKind::MiMo);
    let prompt = tokens(13, 10, 0, 6);
    let [plain, _, pres_freq, _] = penalized(18);
    for params in [plain, pres_freq] {
        let (want, want_rows) = plain_decode_rows(&m, &prompt, &params);
        let d = copycat(&m, kind, most_frequent(&want));
        for b in [2, 5] {
            let opts = SpecOptions {
                block_size: b,
                eos_token_ids: Vec::new(),
                prefill_chunk: None,
            };
            let mut s = m.session();
            let mut backend = ArgmaxOnly(dflash::CpuBackend::new(&mut s, &d).unwrap());
            let (mut got, mut rows) = (Vec::new(), Vec::new());
            let (mut draft_ids, mut drafted_rounds) = (0, 0);
            let out = run_speculative_rows(
                &mut backend,
                &opts,
                &prompt,
                &params,
                true,
                &mut |t, row| {
                    got.push(t);
                    rows.push(row.expect("target rows were asked for").to_vec());
                    ControlFlow::Continue(())
                },
                &mut |r| {
                    draft_ids += usize::from(r.draft_logits.is_empty());
                    drafted_rounds += usize::from(!r.drafts.is_empty());
                },
            )
            .unwrap();
            let what = format!("{name} block {b} {}", pens(&params));
            assert_eq!(out.tokens, want, "{what}");
            assert_eq!(got, want, "{what}");
            assert!(out.stats.accepted_tokens() > 0, "{what}: no draft accepted");
            for (i, (r, w)) in rows.iter().zip(&want_rows).enumerate() {
                assert_bits(r, w, &format!("{what}, token {i}"));
            }
            // Draft rows stayed ids where the picks are plain argmaxes.
            let rounds = out.stats.rounds() as usize;
            let want_ids = if params.penalizes() {
                rounds - drafted_rounds
            } else {
                rounds
            };
            assert_eq!(draft_ids, want_ids, "{what}");
        }
    }
    // Not asked for: no rows.
    let d = toy::drafter(m.config(), kind, 8, 3);
    let mut s = m.session();
    let mut backend = dflash::CpuBackend::new(&mut s, &d).unwrap();
    let opts = SpecOptions {
        block_size: 4,
        eos_token_ids: Vec::new(),
        prefill_chunk: None,
    };
    let mut seen = 0;
    run_speculative_rows(
        &mut backend,
        &opts,
        &prompt,
        &greedy(6, true),
        false,
        &mut |_, row| {
            assert!(row.is_none());
            seen += 1;
            ControlFlow::Continue(())
        },
        &mut |_| {},
    )
    .unwrap();
    assert_eq!(seen, 6);
}
