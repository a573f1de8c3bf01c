//! The batched verify pass of the CPU executor (`CpuModel::verify_batch`, and
//! `Executor::forward_batch` over sessions): several sequences, each at its own length, each
//! with its own block width, in ONE pass — bit-identical logits and hidden states to verifying
//! each block alone; all-or-nothing on error.

mod cpu_util;

use cpu_util::{assert_bits, tokens, toys};
use model::cpu::{CpuError, Session, LAST_LAYER_PRE_NORM};
use model::executor::Executor;

#[test]
fn verify_batch_equals_verifying_each_block_alone() {
    for (name, m) in toys() {
        let vocab = m.config().vocab_size;
        let nl = m.config().layers.len();
        let hidden = [0, 1, nl, LAST_LAYER_PRE_NORM];
        // Sequences of different lengths (prompts of 9, 1, 5 and 13 tokens: across the toys'
        // sliding window of 4) and blocks of different widths.
        let prompts: Vec<Vec<u32>> = [(31, 9), (32, 1), (33, 5), (34, 13)]
            .iter()
            .map(|&(seed, n)| tokens(seed, n, vocab))
            .collect();
        let mut batched: Vec<Session> = Vec::new();
        let mut alone: Vec<Session> = Vec::new();
        for p in &prompts {
            let mut s = m.session();
            s.prefill(p).unwrap();
            batched.push(s.clone());
            alone.push(s);
        }
        for (round, widths) in [[4, 1, 8, 2], [1, 3, 1, 5]].iter().enumerate() {
            let blocks: Vec<Vec<u32>> = widths
                .iter()
                .enumerate()
                .map(|(i, &w)| tokens(40 + round as u64 * 8 + i as u64, w, vocab))
                .collect();
            let refs: Vec<&[u32]> = blocks.iter().map(Vec::as_slice).collect();
            let mut seqs: Vec<&mut Session> = batched.iter_mut().collect();
            let got = m.verify_batch(&mut seqs, &refs, &hidden).unwrap();
            for (i, s) in alone.iter_mut().enumerate() {
                let want = s.verify(&blocks[i], &hidden).unwrap();
                let what = format!("{name}: round {round} sequence {i}");
                assert_eq!(got[i].logits.len(), blocks[i].len(), "{what}");
                for (g, w) in got[i].logits.iter().zip(&want.logits) {
                    assert_bits(g, w, &what);
                }
                assert_eq!(got[i].hidden.len(), hidden.len(), "{what}");
                for (gh, wh) in got[i].hidden.iter().zip(&want.hidden) {
                    assert_eq!(gh.len(), blocks[i].len(), "{what}");
                    for (g, w) in gh.iter().zip(wh) {
                        assert_bits(g, w, &what);
                    }
                }
                assert_eq!(batched[i].len(), s.len(), "{what}");
            }
            // Keep a prefix of each block, as a speculative round does.
            for (i, s) in alone.iter_mut().enumerate() {
                let keep = s.len() - blocks[i].len() + 1;
                s.truncate(keep).unwrap();
                batched[i].truncate(keep).unwrap();
            }
        }
        // Through the executor contract: one pass, the same results as `forward` one by one.
        let layers = [0, nl - 1];
        let blocks = [vec![3, 4], vec![5], vec![6, 7, 8], vec![9]];
        let refs: Vec<&[u32]> = blocks.iter().map(Vec::as_slice).collect();
        let mut seqs: Vec<&mut Session> = batched.iter_mut().collect();
        let got = Session::forward_batch(&mut seqs, &refs, &layers);
        for (i, s) in alone.iter_mut().enumerate() {
            let want = s.forward(&blocks[i], &layers).unwrap();
            assert_eq!(got[i].as_ref().unwrap(), &want, "{name}: forward_batch {i}");
        }

        // Errors: nothing changes, and forward_batch fails only the bad pair.
        let lens: Vec<usize> = batched.iter().map(Session::len).collect();
        let bad = [vec![1], vec![vocab as u32], vec![2], vec![3]];
        let refs: Vec<&[u32]> = bad.iter().map(Vec::as_slice).collect();
        let mut seqs: Vec<&mut Session> = batched.iter_mut().collect();
        assert!(matches!(
            m.verify_batch(&mut seqs, &refs, &hidden),
            Err(CpuError::TokenOutOfRange { .. })
        ));
        assert!(matches!(
            m.verify_batch(&mut seqs, &refs[..2], &hidden),
            Err(CpuError::Mismatch(_))
        ));
        assert!(matches!(
            m.verify_batch(&mut seqs, &refs, &[nl + 5]),
            Err(CpuError::HiddenIndex { .. })
        ));
        assert_eq!(batched.iter().map(Session::len).collect::<Vec<_>>(), lens);
        let mut seqs: Vec<&mut Session> = batched.iter_mut().collect();
        let got = Session::forward_batch(&mut seqs, &refs, &[]);
        assert!(got[1].is_err(), "{name}: the bad block fails");
        for i in [0, 2, 3] {
            let want = alone[i].forward(&bad[i], &[]).unwrap();
            assert_eq!(got[i].as_ref().unwrap(), &want, "{name}: good pair {i}");
        }
    }
}
