//! Session behaviour of the CPU executor on tiny random models of every architecture (gpt-oss
//! MXFP4 and dense experts, Qwen3-MoE, MiMo-V2-Flash; see `model::cpu::toy`): cached decode,
//! prefill, verify blocks and truncation must reproduce the full forward.
//!
//! Tolerance: **bit-identical** (`f32::to_bits` equality). Every op computes a token's results
//! with the same f32 operations whatever the block, so any difference is a bug (a wrong
//! position, a stale or missing cache row, a token leaking into another's MoE output), not
//! rounding. Prompts of 12 tokens cross the toys' sliding window of 4.

mod cpu_util;

use std::sync::Arc;

use cpu_util::{argmax, assert_bits, max_abs_diff, tokens, toys};
use model::cpu::toy::{self, ToyExperts, TOY_WINDOW};
use model::cpu::{CpuError, CpuModel, Session};

const N: usize = 12;

#[test]
fn decode_through_cache_equals_forward_full() {
    for (name, m) in toys() {
        let toks = tokens(11, N, m.config().vocab_size);
        let (full, hidden) = m.forward_full(&toks).unwrap();
        assert_eq!(full.len(), N);
        assert_eq!(hidden.len(), m.config().layers.len() + 1);
        let mut s = m.session();
        for (i, &t) in toks.iter().enumerate() {
            let l = s.decode(t).unwrap();
            assert_bits(l, &full[i], &format!("{name}: decode position {i}"));
        }
        assert_eq!(s.len(), N);
    }
}

#[test]
fn prefill_then_decode_equals_forward_full() {
    for (name, m) in toys() {
        let toks = tokens(12, N, m.config().vocab_size);
        let (full, _) = m.forward_full(&toks).unwrap();
        for split in [1, 3, 5, 11] {
            let mut s = m.session();
            let last = s.prefill(&toks[..split]).unwrap().to_vec();
            assert_bits(&last, &full[split - 1], &format!("{name}: prefill {split}"));
            for i in split..N {
                let l = s.decode(toks[i]).unwrap();
                assert_bits(l, &full[i], &format!("{name}: split {split} decode {i}"));
            }
        }
        let mut s = m.session();
        let all = s.prefill_all(&toks).unwrap();
        for i in 0..N {
            assert_bits(&all[i], &full[i], &format!("{name}: prefill_all {i}"));
        }
    }
}

#[test]
fn verify_blocks_equal_sequential_decodes() {
    for (name, m) in toys() {
        let nl = m.config().layers.len();
        let toks = tokens(13, 4 + 8, m.config().vocab_size);
        let (full, hidden) = m.forward_full(&toks).unwrap();
        let layers: Vec<usize> = (0..=nl).rev().collect();
        for b in 2..=8 {
            let mut s = m.session();
            s.prefill(&toks[..4]).unwrap();
            let out = s.verify(&toks[4..4 + b], &layers).unwrap();
            assert_eq!(out.logits.len(), b);
            assert_eq!(out.hidden.len(), layers.len());
            for j in 0..b {
                let p = 4 + j;
                assert_bits(
                    &out.logits[j],
                    &full[p],
                    &format!("{name}: B={b} logits {j}"),
                );
                for (slot, &li) in layers.iter().enumerate() {
                    assert_bits(
                        &out.hidden[slot][j],
                        &hidden[li][p],
                        &format!("{name}: B={b} hidden {li} token {j}"),
                    );
                }
            }
            assert_eq!(s.len(), 4 + b);
        }
    }
}

#[test]
fn hidden_state_indexing() {
    let (name, m) = toys().swap_remove(0);
    let toks = tokens(14, 6, m.config().vocab_size);
    let (full, hidden) = m.forward_full(&toks).unwrap();
    let w = m.weights();
    let nl = m.config().layers.len();
    for j in 0..6 {
        // hidden[0] = embeddings.
        assert_eq!(hidden[0][j], &*w.embed.row(toks[j] as usize), "{name}");
        // logits = lm_head · hidden[L] (the last hidden state is after the final norm).
        let mut l = vec![0f32; m.config().vocab_size];
        model::cpu::ops::matvec(&w.lm_head, &hidden[nl][j], &mut l);
        assert_bits(&l, &full[j], "lm_head of hidden[L]");
        // hidden[L] is final_norm(output of layer L−1): dividing out the norm weights leaves a
        // vector of RMS 1 (up to eps). (HF agreement of every index: cpu_goldens.rs.)
        let unit: Vec<f32> = hidden[nl][j]
            .iter()
            .zip(&w.final_norm)
            .map(|(h, g)| h / g)
            .collect();
        let rms = (unit.iter().map(|v| v * v).sum::<f32>() / unit.len() as f32).sqrt();
        assert!((rms - 1.0).abs() < 1e-3, "{name}: rms {rms}");
    }
}

#[test]
fn truncate_then_rerun_equals_fresh_prefill() {
    for (name, m) in toys() {
        let toks = tokens(15, N, m.config().vocab_size);
        let (full, _) = m.forward_full(&toks).unwrap();
        // Speculative pattern: verify a block, accept part of it, continue.
        let mut s = m.session();
        s.prefill(&toks[..5]).unwrap();
        let bogus: Vec<u32> = tokens(99, 6, m.config().vocab_size);
        s.verify(&bogus, &[1]).unwrap();
        s.truncate(5).unwrap();
        assert_eq!(s.len(), 5);
        let out = s.verify(&toks[5..9], &[]).unwrap();
        for j in 0..4 {
            assert_bits(
                &out.logits[j],
                &full[5 + j],
                &format!("{name}: after truncate {j}"),
            );
        }
        s.truncate(7).unwrap();
        for i in 7..N {
            let l = s.decode(toks[i]).unwrap();
            assert_bits(l, &full[i], &format!("{name}: truncate 7 decode {i}"));
        }
        // Back to the start.
        s.truncate(0).unwrap();
        assert!(s.is_empty());
        let l = s.prefill(&toks).unwrap();
        assert_bits(l, &full[N - 1], &format!("{name}: truncate 0"));
        assert_eq!(
            s.truncate(N + 1),
            Err(CpuError::TruncateBeyondEnd {
                len: N + 1,
                have: N
            })
        );
    }
}

#[test]
fn long_sequences_bounded_sliding_cache_and_rollback_limit() {
    // 150 positions with window 4: sliding layers compact their history; truncation within
    // max_rollback stays exact, deeper truncation is refused.
    let (c, w) = toy::mimo_v2_flash(5, ToyExperts::Dense);
    let m = CpuModel::new(Arc::new(c), Arc::new(w)).unwrap();
    let n = 150;
    let toks = tokens(16, n, m.config().vocab_size);
    let (full, _) = m.forward_full(&toks).unwrap();
    let rollback = 3;
    let mut s = Session::new(&m, rollback);
    for (i, &t) in toks.iter().enumerate() {
        let l = s.decode(t).unwrap();
        assert_bits(l, &full[i], &format!("long decode {i}"));
    }
    let keep = TOY_WINDOW - 1 + rollback;
    for (l, spec) in s.kv().layers.iter().zip(&m.config().layers) {
        match spec.attn {
            model::config::AttnKind::Full => assert_eq!(l.rows(), n),
            model::config::AttnKind::Sliding { .. } => {
                assert!(
                    l.rows() <= 2 * keep.max(32),
                    "sliding layer holds {} rows",
                    l.rows()
                );
                assert!(l.first_pos() > 0);
            }
        }
    }
    // Within max_rollback: exact.
    s.truncate(n - rollback).unwrap();
    for i in n - rollback..n {
        let l = s.decode(toks[i]).unwrap();
        assert_bits(l, &full[i], &format!("rollback decode {i}"));
    }
    // Far back: refused, and the session is unchanged.
    let err = s.truncate(10).unwrap_err();
    assert!(
        matches!(err, CpuError::TruncateTooDeep { len: 10, .. }),
        "{err}"
    );
    assert_eq!(s.len(), n);
    let more = tokens(17, 2, m.config().vocab_size);
    s.decode(more[0]).unwrap();
    // The same 150 tokens as one prefill call.
    let mut s2 = Session::new(&m, rollback);
    let last = s2.prefill(&toks).unwrap();
    assert_bits(last, &full[n - 1], "long prefill");
}

/// Random mixes of prefill / decode / verify / truncate (small max_rollback, so compaction and
/// refused truncations happen). Every truncation at or above `guaranteed_truncate_floor()`
/// must succeed; every logit ever returned for a position that is still in the sequence must
/// equal, bit for bit, the full forward of the final sequence.
#[test]
fn random_operation_sequences_stay_exact() {
    let models = [
        CpuModel::new(
            Arc::new(toy::mimo_v2_flash(7, ToyExperts::Mxfp4).0),
            Arc::new(toy::mimo_v2_flash(7, ToyExperts::Mxfp4).1),
        )
        .unwrap(),
        CpuModel::new(
            Arc::new(toy::gpt_oss(8, ToyExperts::Dense).0),
            Arc::new(toy::gpt_oss(8, ToyExperts::Dense).1),
        )
        .unwrap(),
    ];
    for (mi, m) in models.iter().enumerate() {
        let v = m.config().vocab_size;
        let mut rng = 0x1234_5678_u64 + mi as u64;
        let mut next = |n: u64| {
            rng = rng
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (rng >> 33) % n
        };
        let mut s = Session::new(m, 2);
        let mut cur: Vec<u32> = Vec::new();
        let mut rec: Vec<Vec<f32>> = Vec::new();
        let (mut refused, mut deep_ok) = (0, 0);
        for step in 0..120 {
            match next(10) {
                0 => {
                    let b = 1 + next(12) as usize;
                    let toks: Vec<u32> = (0..b).map(|_| 2 + next(v as u64 - 2) as u32).collect();
                    rec.extend(s.prefill_all(&toks).unwrap());
                    cur.extend(&toks);
                }
                1..=4 => {
                    let t = 2 + next(v as u64 - 2) as u32;
                    rec.push(s.decode(t).unwrap().to_vec());
                    cur.push(t);
                }
                5..=7 => {
                    let b = 1 + next(6) as usize;
                    let toks: Vec<u32> = (0..b).map(|_| 2 + next(v as u64 - 2) as u32).collect();
                    let out = s.verify(&toks, &[]).unwrap();
                    rec.extend(out.logits);
                    cur.extend(&toks);
                }
                _ => {
                    let back = next(8) as usize;
                    let len = cur.len().saturating_sub(back);
                    let floor = s.guaranteed_truncate_floor();
                    match s.truncate(len) {
                        Ok(()) => {
                            if len < floor {
                                deep_ok += 1;
                            }
                            cur.truncate(len);
                            rec.truncate(len);
                        }
                        Err(CpuError::TruncateTooDeep { .. }) => {
                            assert!(
                                len < floor && len > 0,
                                "step {step}: truncate({len}) refused, floor {floor}"
                            );
                            refused += 1;
                        }
                        Err(e) => panic!("{e}"),
                    }
                }
            }
            assert_eq!(s.len(), cur.len());
        }
        let (full, _) = m.forward_full(&cur).unwrap();
        for (i, (a, b)) in rec.iter().zip(&full).enumerate() {
            assert_bits(a, b, &format!("model {mi}: position {i}"));
        }
        println!(
            "model {mi}: final length {}, refused {refused}, deep truncations accepted {deep_ok}",
            cur.len()
        );
        assert!(
            refused > 0 || deep_ok > 0,
            "the test should exercise deep truncations"
        );
    }
}

#[test]
fn prefill_longer_than_chunk() {
    let (name, m) = toys().swap_remove(2);
    let n = model::cpu::PREFILL_CHUNK + 20;
    let toks = tokens(18, n, m.config().vocab_size);
    let mut a = m.session();
    let all = a.prefill_all(&toks).unwrap();
    let mut b = m.session();
    let last = b.prefill(&toks).unwrap();
    assert_bits(last, &all[n - 1], name);
    // Spot-check a decode on top against a single full pass.
    let (full, _) = m.forward_full(&toks).unwrap();
    for i in [0, 100, n - 1] {
        assert_bits(
            &all[i],
            &full[i],
            &format!("{name}: chunked prefill_all {i}"),
        );
    }
}

#[test]
fn mxfp4_experts_match_dense_dequantized_experts() {
    // Same weights (the dense toy holds the dequantized MXFP4 values): only the accumulation
    // order of the expert products differs (fp4 kernel vs dense dot), so logits agree to f32
    // rounding. Observed ≈ 1e-6 on logits of magnitude ≈ 1; bound 1e-4.
    let pairs = [
        (
            toy::gpt_oss(1, ToyExperts::Mxfp4),
            toy::gpt_oss(1, ToyExperts::Dense),
        ),
        (
            toy::qwen3_moe(2, ToyExperts::Mxfp4),
            toy::qwen3_moe(2, ToyExperts::Dense),
        ),
        (
            toy::mimo_v2_flash(3, ToyExperts::Mxfp4),
            toy::mimo_v2_flash(3, ToyExperts::Dense),
        ),
    ];
    for ((ca, wa), (cb, wb)) in pairs {
        let name = format!("{:?}", ca.arch);
        let a = CpuModel::new(Arc::new(ca), Arc::new(wa)).unwrap();
        let b = CpuModel::new(Arc::new(cb), Arc::new(wb)).unwrap();
        let toks = tokens(19, N, a.config().vocab_size);
        let (la, _) = a.forward_full(&toks).unwrap();
        let (lb, _) = b.forward_full(&toks).unwrap();
        for i in 0..N {
            let d = max_abs_diff(&la[i], &lb[i]);
            assert!(d < 1e-4, "{name}: position {i}: max |Δ| = {d}");
            assert_eq!(argmax(&la[i]), argmax(&lb[i]));
        }
    }
}

#[test]
fn errors() {
    let (_, m) = toys().swap_remove(0);
    let v = m.config().vocab_size;
    let mut s = m.session();
    assert_eq!(s.prefill(&[]).unwrap_err(), CpuError::EmptyInput);
    assert_eq!(
        s.decode(v as u32).unwrap_err(),
        CpuError::TokenOutOfRange {
            index: 0,
            token: v as u32,
            vocab: v
        }
    );
    let nl = m.config().layers.len();
    assert_eq!(
        s.verify(&[2, 3], &[nl + 1]).unwrap_err(),
        CpuError::HiddenIndex {
            index: nl + 1,
            layers: nl
        }
    );
    assert!(s.is_empty(), "failed calls leave the session unchanged");

    // Weights that disagree with the config are rejected at build time.
    let (c, mut w) = toy::gpt_oss(1, ToyExperts::Dense);
    w.layers[2].attn.sinks = None;
    let err = CpuModel::new(Arc::new(c), Arc::new(w)).unwrap_err();
    assert!(
        matches!(&err, CpuError::Mismatch(msg) if msg.contains("layer 2") && msg.contains("sinks")),
        "{err}"
    );
    let (mut c, w) = toy::qwen3_moe(1, ToyExperts::Dense);
    c.moe_intermediate_size = 16;
    let err = CpuModel::new(Arc::new(c), Arc::new(w)).unwrap_err();
    assert!(
        matches!(&err, CpuError::Mismatch(msg) if msg.contains("gate_up")),
        "{err}"
    );
}

#[test]
fn failed_calls_leave_the_session_unchanged() {
    // A poisoned embedding row makes the router logits NaN: moe::route refuses them mid-pass.
    let (c, mut w) = toy::gpt_oss(4, ToyExperts::Mxfp4);
    let poison = 5u32;
    let h = c.hidden_size;
    w.embed.make_f32_mut()[poison as usize * h..(poison as usize + 1) * h].fill(f32::NAN);
    let m = CpuModel::new(Arc::new(c), Arc::new(w)).unwrap();
    let v = m.config().vocab_size;
    let mut good: Vec<u32> = tokens(30, model::cpu::PREFILL_CHUNK + 10, v);
    good.iter_mut()
        .filter(|t| **t == poison)
        .for_each(|t| *t = 6);
    let (full, _) = m.forward_full(&good[..20]).unwrap();
    let mut s = m.session();
    s.prefill(&good[..10]).unwrap();
    // Fails in the second prefill chunk: the first chunk is rolled back too.
    let mut bad = good.clone();
    bad.push(poison);
    let err = s.prefill(&bad).unwrap_err();
    assert!(matches!(err, CpuError::Routing(_)), "{err}");
    assert_eq!(s.len(), 10);
    assert!(s.kv().layers.iter().all(|l| l.end_pos() == 10));
    assert!(s.verify(&[2, poison, 3], &[0]).is_err());
    assert!(s.decode(poison).is_err());
    assert_eq!(s.len(), 10);
    for i in 10..20 {
        assert_bits(s.decode(good[i]).unwrap(), &full[i], "after failed calls");
    }
}

#[test]
fn model_and_session_are_shareable() {
    fn send_sync<T: Send + Sync>() {}
    send_sync::<CpuModel>();
    send_sync::<Session>();
}

/// Sequences of different lengths (some past the sliding window, one fresh) decoded together in
/// one batched pass give bit-identical logits to decoding each alone, step after step; a
/// failing batch (a token outside the vocabulary) leaves every session untouched.
#[test]
fn decode_batch_equals_per_session_decode() {
    for (name, m) in toys() {
        let vocab = m.config().vocab_size;
        let prompts: Vec<Vec<u32>> = [(21, 9), (22, 1), (23, 5), (24, 0)]
            .iter()
            .map(|&(seed, n)| tokens(seed, n, vocab))
            .collect();
        let mut batched: Vec<Session> = Vec::new();
        let mut alone: Vec<Session> = Vec::new();
        for p in &prompts {
            let mut s = m.session();
            if !p.is_empty() {
                s.prefill(p).unwrap();
            }
            batched.push(s.clone());
            alone.push(s);
        }
        let steps = tokens(25, 6 * prompts.len(), vocab);
        for (step, toks) in steps.chunks(prompts.len()).enumerate() {
            let mut refs: Vec<&mut Session> = batched.iter_mut().collect();
            let got = m.decode_batch(&mut refs, toks).unwrap();
            for (i, (s, &t)) in alone.iter_mut().zip(toks).enumerate() {
                let want = s.decode(t).unwrap();
                assert_bits(&got[i], want, &format!("{name}: step {step} sequence {i}"));
                assert_eq!(batched[i].len(), s.len());
            }
        }
        let lens: Vec<usize> = batched.iter().map(Session::len).collect();
        let mut refs: Vec<&mut Session> = batched.iter_mut().collect();
        let bad = [1, vocab as u32, 2, 3];
        assert!(matches!(
            m.decode_batch(&mut refs, &bad),
            Err(CpuError::TokenOutOfRange { .. })
        ));
        assert!(matches!(
            m.decode_batch(&mut refs, &bad[..2]),
            Err(CpuError::Mismatch(_))
        ));
        assert_eq!(batched.iter().map(Session::len).collect::<Vec<_>>(), lens);
        // After the failed calls the batch still matches decoding alone.
        let toks = [4, 5, 6, 7];
        let mut refs: Vec<&mut Session> = batched.iter_mut().collect();
        let got = m.decode_batch(&mut refs, &toks).unwrap();
        for (i, s) in alone.iter_mut().enumerate() {
            assert_bits(
                &got[i],
                s.decode(toks[i]).unwrap(),
                &format!("{name}: after error {i}"),
            );
        }
        // Sessions of another model are refused.
        let other = CpuModel::new(Arc::new(m.config().clone()), Arc::new(m.weights().clone()));
        if let Ok(other) = other {
            let mut foreign = other.session();
            let mut refs: Vec<&mut Session> = vec![&mut foreign];
            assert!(matches!(
                m.decode_batch(&mut refs, &[1]),
                Err(CpuError::Mismatch(_))
            ));
        }
    }
}

/// The paged KV cache: logits do not depend on the block size (1, 3, 16, 64 positions per
/// block), through prefill, decode, verify and truncation into the middle of a block, with
/// sliding layers compacting whole blocks (40 positions past the toys' window of 4).
#[test]
fn results_do_not_depend_on_the_kv_block_size() {
    for (name, m) in toys() {
        let vocab = m.config().vocab_size;
        let toks = tokens(31, 40, vocab);
        let (full, _) = m.forward_full(&toks).unwrap();
        for bs in [1, 3, 16, 64] {
            let mut s = Session::with_block_size(&m, 8, bs);
            assert_eq!(s.block_size(), bs);
            let last = s.prefill(&toks[..17]).unwrap().to_vec();
            assert_bits(&last, &full[16], &format!("{name}: bs {bs} prefill"));
            for i in 17..25 {
                let l = s.decode(toks[i]).unwrap();
                assert_bits(l, &full[i], &format!("{name}: bs {bs} decode {i}"));
            }
            let v = s.verify(&toks[25..33], &[]).unwrap();
            for (j, row) in v.logits.iter().enumerate() {
                assert_bits(row, &full[25 + j], &format!("{name}: bs {bs} verify {j}"));
            }
            s.truncate(27).unwrap();
            let v = s.verify(&toks[27..40], &[]).unwrap();
            for (j, row) in v.logits.iter().enumerate() {
                assert_bits(
                    row,
                    &full[27 + j],
                    &format!("{name}: bs {bs} re-verify {j}"),
                );
            }
        }
    }
}

/// Prefix sharing: a sequence that adopts another's full blocks and prefills only the rest
/// computes bit-identical logits to one that prefilled everything; writes to shared blocks are
/// copied first (copy-on-write), so neither sequence ever sees the other's later tokens —
/// also after truncating into a shared block or cloning a session.
#[test]
fn adopted_prefix_blocks_are_exact_and_copied_on_write() {
    for (name, m) in toys() {
        let vocab = m.config().vocab_size;
        let toks = tokens(41, 30, vocab);
        let other = tokens(42, 30, vocab);
        let (full, _) = m.forward_full(&toks).unwrap();
        let mut fork_toks = toks[..12].to_vec();
        fork_toks.extend_from_slice(&other[12..30]);
        let (fork_full, _) = m.forward_full(&fork_toks).unwrap();

        let bs = 4;
        let mut a = Session::with_block_size(&m, 64, bs);
        a.prefill(&toks[..22]).unwrap();
        // Blocks 0..5 are full (20 positions); block 5 is partial.
        assert!(a.full_block(5).is_none());
        let blocks: Vec<_> = (0..5).map(|b| a.full_block(b).unwrap()).collect();

        // b: adopts 3 blocks (12 positions) and diverges.
        let mut b = Session::with_block_size(&m, 64, bs);
        b.adopt_prefix(&blocks[..3]).unwrap();
        assert_eq!(b.len(), 12);
        let got = b.prefill(&fork_toks[12..20]).unwrap().to_vec();
        assert_bits(&got, &fork_full[19], &format!("{name}: forked prefill"));
        // c: adopts all 5 blocks, truncates into block 4 (shared) and rewrites it.
        let mut c = Session::with_block_size(&m, 64, bs);
        c.adopt_prefix(&blocks).unwrap();
        c.truncate(18).unwrap();
        let got = c.verify(&fork_toks[18..22], &[]).unwrap();
        let mut mixed = toks[..18].to_vec();
        mixed.extend_from_slice(&fork_toks[18..22]);
        let (mixed_full, _) = m.forward_full(&mixed).unwrap();
        for (j, row) in got.logits.iter().enumerate() {
            assert_bits(
                row,
                &mixed_full[18 + j],
                &format!("{name}: rewritten block {j}"),
            );
        }
        // a was not disturbed by either, nor by a clone that goes its own way.
        let mut d = a.clone();
        d.truncate(13).unwrap();
        d.prefill(&other[13..16]).unwrap();
        for i in 22..30 {
            let l = a.decode(toks[i]).unwrap();
            assert_bits(l, &full[i], &format!("{name}: original decode {i}"));
        }
        for i in 20..30 {
            let l = b.decode(fork_toks[i]).unwrap();
            assert_bits(l, &fork_full[i], &format!("{name}: forked decode {i}"));
        }
        // Refusals: a non-empty sequence, another block size.
        assert!(matches!(
            b.adopt_prefix(&blocks[..1]),
            Err(CpuError::Mismatch(_))
        ));
        let mut e = Session::with_block_size(&m, 64, 8);
        assert!(matches!(
            e.adopt_prefix(&blocks[..1]),
            Err(CpuError::Mismatch(_))
        ));
        assert_eq!(e.len(), 0);
    }
}
