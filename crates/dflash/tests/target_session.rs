//! The executor contract's `forward` (what the drafter reads) over `model::cpu::Session`: layer `L`'s output is the executor's
//! hidden index `L + 1`, and for the last layer the residual stream before the final norm
//! (`LAST_LAYER_PRE_NORM`; normalizing it gives hidden index `L` bit for bit); long inputs run in
//! chunks with results identical to one pass; bad layers are errors. Tolerance: bit-identical.

mod common;

use common::{assert_bits, load_target, tokens};
use dflash::target::Executor;
use dflash::target::FORWARD_CHUNK;
use model::cpu::{ops, CpuError};

#[test]
fn layer_outputs_and_the_pre_norm_last_layer() {
    for rel in common::TARGET_FIXTURES {
        let m = load_target(rel);
        let nl = m.config().layers.len();
        let toks = tokens(2, 9, 3, m.config().vocab_size);
        let (_, hidden) = m.forward_full(&toks).unwrap();
        let layers: Vec<usize> = (0..nl).collect();
        let mut s = m.session();
        let out = Executor::forward(&mut s, &toks, &layers).unwrap();
        assert_eq!(out.hidden.len(), nl);
        for l in 0..nl - 1 {
            for (ours, want) in out.hidden[l].iter().zip(&hidden[l + 1]) {
                assert_bits(ours, want, &format!("{rel} layer {l}"));
            }
        }
        // The last layer: before the final norm; the norm of it is HF's last hidden state.
        let eps = m.config().rms_norm_eps;
        for (pre, post) in out.hidden[nl - 1].iter().zip(&hidden[nl]) {
            let mut normed = vec![0f32; pre.len()];
            ops::rms_norm(pre, &m.weights().final_norm, eps, &mut normed);
            assert_bits(&normed, post, &format!("{rel}: normed last layer"));
            assert_ne!(pre, post);
        }
        let e = Executor::forward(&mut m.session(), &toks, &[nl]).unwrap_err();
        assert_eq!(
            e,
            CpuError::HiddenIndex {
                index: nl + 1,
                layers: nl
            }
        );
    }
}

#[test]
fn long_inputs_run_in_chunks_with_identical_results() {
    let m = load_target("mimo-v2-flash/native");
    let n = 2 * FORWARD_CHUNK + 5;
    let toks = tokens(5, n, 3, m.config().vocab_size);
    let layers = [0, 3];
    let mut a = m.session();
    let chunked = Executor::forward(&mut a, &toks, &layers).unwrap();
    let one = m
        .session()
        .verify(&toks, &[1, model::cpu::LAST_LAYER_PRE_NORM])
        .unwrap();
    assert_eq!(Executor::len(&a), n);
    assert_eq!(chunked.logits.len(), n);
    for j in 0..n {
        assert_bits(&chunked.logits[j], &one.logits[j], &format!("logits {j}"));
        for i in 0..2 {
            assert_bits(
                &chunked.hidden[i][j],
                &one.hidden[i][j],
                &format!("hidden {i} {j}"),
            );
        }
    }
}
