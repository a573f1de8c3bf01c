//! Batched decode on the GPU (`tilert::exec::GpuBatch`): sessions of different lengths (different
//! prompts, different session sizes) decoded together against each decoded alone on the GPU and
//! against the CPU executor, for every fixture checkpoint and the toy models of the three
//! architectures; N = 1, 2, 5, 16 rows; sliding-window rings that wrap; graphs against op-by-op
//! launches; the error cases (all-or-nothing).
//!
//! Tolerances: against a session's own `GpuSession::decode` the logits must be **bit-identical**
//! (a row is computed with the session's own key splits, and every other kernel computes each
//! row independently of the others). Against the CPU executor, the tolerance of `tests/exec.rs`:
//! |Δ| ≤ 1e-3·(1 + max|logit|) for dense models, 3e-2·(1 + max|logit|) with MXFP4 experts.
//! Greedy continuations must match decoding each session alone token for token.

mod common;

use std::sync::Arc;

use common::{argmax, fixture, tolerance, FIXTURES};
use model::config::{AttnKind, ModelConfig};
use model::cpu::toy::{self, ToyExperts};
use model::cpu::{CpuModel, DEFAULT_MAX_ROLLBACK};
use model::weights::Weights;
use tilert::exec::{GpuModel, GpuSession};
use tilert::ops::MAX_TOKENS;

/// The prompt of row `i`: `3 + 9·i` tokens (rows have different lengths; from row 10 on they
/// are longer than a sliding layer's ring of `window + 16 + max_rollback` slots).
fn prompt(i: usize, vocab: u32) -> Vec<u32> {
    (0..3 + 9 * i as u32)
        .map(|j| (j * 31 + 7 * i as u32 + 3) % vocab)
        .collect()
}

/// Session sizes alternate, so rows of one pass use different attention key splits.
fn session_size(i: usize) -> usize {
    if i.is_multiple_of(2) {
        256
    } else {
        200
    }
}

fn refs(v: &mut [GpuSession]) -> Vec<&mut GpuSession> {
    v.iter_mut().collect()
}

/// Checks one model for N = 1, 2, 5, 16 rows: one batched step's logits against each session's
/// own decode (bit-identical) and the CPU (tolerance), then a greedy continuation.
fn check_model(name: &str, config: ModelConfig, weights: Weights) {
    let tol = tolerance(&weights);
    let config = Arc::new(config);
    let weights = Arc::new(weights);
    let cpu = CpuModel::new(config.clone(), weights.clone()).unwrap();
    let gpu = GpuModel::new(0, config.clone(), &weights).unwrap();
    let mut batch = gpu.batch().unwrap();
    let vocab = config.vocab_size as u32;
    let wraps = config.layers.iter().any(|l| match l.attn {
        AttnKind::Sliding { window } => {
            prompt(15, vocab).len() > window + 16 + DEFAULT_MAX_ROLLBACK
        }
        AttnKind::Full => false,
    });
    let sliding = config
        .layers
        .iter()
        .any(|l| matches!(l.attn, AttnKind::Sliding { .. }));
    assert_eq!(
        wraps, sliding,
        "{name}: the longest rows must wrap every sliding ring"
    );
    let mut worst = 0f32;
    for n in [1usize, 2, 5, 16] {
        let mut together: Vec<GpuSession> = Vec::new();
        let mut alone: Vec<GpuSession> = Vec::new();
        let mut cpus = Vec::new();
        let mut first = Vec::new();
        for i in 0..n {
            let p = prompt(i, vocab);
            let mut a = gpu.session(session_size(i)).unwrap();
            let mut b = gpu.session(session_size(i)).unwrap();
            let la = a.prefill(&p).unwrap();
            b.prefill(&p).unwrap();
            let mut c = cpu.session();
            c.prefill(&p).unwrap();
            first.push(argmax(&la));
            together.push(a);
            alone.push(b);
            cpus.push(c);
        }
        // One step: logits.
        let got = batch.decode(&mut refs(&mut together), &first).unwrap();
        assert_eq!(got.len(), n);
        for i in 0..n {
            let want = alone[i].decode(first[i]).unwrap();
            assert_eq!(
                got[i],
                want,
                "{name}: N={n} row {i} (length {}) differs from its own decode",
                together[i].len() - 1
            );
            let c = cpus[i].decode(first[i]).unwrap().to_vec();
            let mag = c.iter().fold(0f32, |m, x| m.max(x.abs()));
            let err = got[i]
                .iter()
                .zip(&c)
                .fold(0f32, |m, (x, y)| m.max((x - y).abs()));
            assert!(
                err <= tol * (1.0 + mag),
                "{name}: N={n} row {i}: batched vs CPU |Δ| {err} (max |logit| {mag})"
            );
            worst = worst.max(err / (1.0 + mag));
            assert_eq!(together[i].len(), alone[i].len());
        }
        // Greedy continuation, 6 steps.
        let mut next_b: Vec<u32> = got.iter().map(|l| argmax(l)).collect();
        let mut next_a = next_b.clone();
        let (mut cont_b, mut cont_a) = (vec![next_b.clone()], vec![next_a.clone()]);
        for _ in 0..6 {
            next_b = batch
                .decode_greedy(&mut refs(&mut together), &next_b)
                .unwrap();
            next_a = alone
                .iter_mut()
                .zip(&next_a)
                .map(|(s, &t)| s.decode_greedy(t).unwrap())
                .collect();
            cont_b.push(next_b.clone());
            cont_a.push(next_a.clone());
        }
        assert_eq!(cont_b, cont_a, "{name}: N={n} greedy continuation");
        for (a, b) in together.iter().zip(&alone) {
            assert_eq!(a.len(), b.len());
        }
    }
    eprintln!(
        "{name}: batched == own decode (bit-identical) for N = 1, 2, 5, 16; vs CPU max \
         |Δ|/(1+max|logit|) {worst:.2e}; sliding rings wrapped: {wraps}"
    );
}

#[test]
fn batched_decode_matches_alone_and_cpu_on_fixtures() {
    let Some(_ctx) =
        ultra_kernels::gpu_for_test("batched_decode_matches_alone_and_cpu_on_fixtures")
    else {
        return;
    };
    for rel in FIXTURES {
        let (config, weights) = model::load::load(&fixture(rel)).unwrap();
        check_model(rel, config, weights);
    }
}

#[test]
fn batched_decode_matches_alone_and_cpu_on_toys() {
    let Some(_ctx) = ultra_kernels::gpu_for_test("batched_decode_matches_alone_and_cpu_on_toys")
    else {
        return;
    };
    for experts in [ToyExperts::Dense, ToyExperts::Mxfp4] {
        for (name, (c, w)) in [
            ("toy gpt-oss", toy::gpt_oss(7, experts)),
            ("toy qwen3-moe", toy::qwen3_moe(8, experts)),
            ("toy mimo", toy::mimo_v2_flash(9, experts)),
        ] {
            check_model(&format!("{name} {experts:?}"), c, w);
        }
    }
}

#[test]
fn batched_graphs_equal_op_by_op() {
    let Some(_ctx) = ultra_kernels::gpu_for_test("batched_graphs_equal_op_by_op") else {
        return;
    };
    let (c, w) = toy::gpt_oss(3, ToyExperts::Mxfp4);
    let vocab = c.vocab_size as u32;
    let gpu = GpuModel::new(0, Arc::new(c), &w).unwrap();
    let mut graphs = gpu.batch().unwrap();
    let mut launches = gpu.batch().unwrap();
    launches.set_use_graphs(false);
    let make = || -> Vec<GpuSession> {
        (0..5)
            .map(|i| {
                let mut s = gpu.session(session_size(i)).unwrap();
                s.prefill(&prompt(i, vocab)).unwrap();
                s
            })
            .collect()
    };
    let (mut a, mut b) = (make(), make());
    let toks = [5, 9, 11, 2, 7];
    for _ in 0..3 {
        let la = graphs.decode(&mut refs(&mut a), &toks).unwrap();
        let lb = launches.decode(&mut refs(&mut b), &toks).unwrap();
        assert_eq!(la, lb, "graph replay vs op-by-op launches");
    }
}

#[test]
fn batched_decode_errors_leave_sessions_unchanged() {
    let Some(_ctx) = ultra_kernels::gpu_for_test("batched_decode_errors_leave_sessions_unchanged")
    else {
        return;
    };
    let (c, w) = toy::qwen3_moe(1, ToyExperts::Mxfp4);
    let vocab = c.vocab_size as u32;
    let c = Arc::new(c);
    let gpu = GpuModel::new(0, c.clone(), &w).unwrap();
    let other = GpuModel::new(0, c, &w).unwrap();
    let mut batch = gpu.batch().unwrap();
    let mut s: Vec<GpuSession> = (0..3)
        .map(|i| {
            let mut s = gpu.session(16).unwrap();
            s.prefill(&prompt(i, vocab)[..2 + i]).unwrap();
            s
        })
        .collect();
    let lens = |s: &[GpuSession]| s.iter().map(GpuSession::len).collect::<Vec<_>>();
    let before = lens(&s);
    let expect_err = |r: Result<Vec<u32>, tilert::RuntimeError>, what: &str| {
        let e = r.expect_err(what).to_string();
        assert!(e.contains(what), "{what}: {e}");
    };

    // Mismatched lengths, no sessions, too many rows, a token outside the vocabulary.
    expect_err(
        batch.decode_greedy(&mut refs(&mut s), &[1, 2]),
        "3 sessions but 2 tokens",
    );
    expect_err(batch.decode_greedy(&mut [], &[]), "0 sessions");
    expect_err(
        batch.decode_greedy(&mut refs(&mut s), &[1, vocab, 2]),
        "outside the vocabulary",
    );
    assert_eq!(lens(&s), before);

    // A session of another model (same weights, another upload).
    let mut foreign = other.session(16).unwrap();
    foreign.prefill(&[1, 2]).unwrap();
    {
        let mut rows: Vec<&mut GpuSession> = s.iter_mut().collect();
        rows.push(&mut foreign);
        expect_err(
            batch.decode_greedy(&mut rows, &[1, 2, 3, 4]),
            "session 3 belongs to another model",
        );
    }
    assert_eq!(lens(&s), before);
    assert_eq!(foreign.len(), 2);

    // A session at its max_seq: the whole call fails and nobody advances.
    let mut full = gpu.session(4).unwrap();
    full.prefill(&[1, 2, 3, 4]).unwrap();
    {
        let mut rows: Vec<&mut GpuSession> = s.iter_mut().collect();
        rows.insert(1, &mut full);
        expect_err(
            batch.decode_greedy(&mut rows, &[1, 2, 3, 4]),
            "session 1: sequence would hold 5 positions",
        );
    }
    assert_eq!(lens(&s), before);
    assert_eq!(full.len(), 4);

    // More rows than one pass holds.
    let mut many: Vec<GpuSession> = (0..MAX_TOKENS + 1)
        .map(|_| gpu.session(16).unwrap())
        .collect();
    let toks = vec![1u32; MAX_TOKENS + 1];
    expect_err(
        batch.decode_greedy(&mut refs(&mut many), &toks),
        "17 sessions (1..=16 per pass)",
    );
    assert!(many.iter().all(GpuSession::is_empty));

    // After the failures the batch and the sessions still decode exactly.
    let mut alone: Vec<GpuSession> = (0..3)
        .map(|i| {
            let mut x = gpu.session(16).unwrap();
            x.prefill(&prompt(i, vocab)[..2 + i]).unwrap();
            x
        })
        .collect();
    let toks = [4, 5, 6];
    let got = batch.decode(&mut refs(&mut s), &toks).unwrap();
    for (i, x) in alone.iter_mut().enumerate() {
        assert_eq!(got[i], x.decode(toks[i]).unwrap(), "row {i} after errors");
    }
    assert_eq!(lens(&s), before.iter().map(|l| l + 1).collect::<Vec<_>>());
}
