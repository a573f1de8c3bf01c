//! Batched passes whose rows carry several tokens (`tilert::exec::GpuBatch::verify` /
//! `forward_device`, `Executor::forward_batch` of sessions sharing a batch): speculative verify
//! blocks of different widths (1..=16) next to plain one-token rows, every sequence at its own
//! length, contiguous and paged caches mixed, more rows than one pass holds (blocks straddling
//! pass boundaries), sliding-window rings that wrap — against each session's own
//! `GpuSession::verify` on the GPU and against the CPU executor's `forward_batch`
//! (`CpuModel::verify_batch`: the oracle), for every fixture checkpoint and the toy models of
//! the three architectures.
//!
//! Tolerances: against a session's own verify the logits and captured hidden states must be
//! **bit-identical** (each row uses its block's own key splits; every other kernel computes each
//! row independently). Against the CPU executor, `tests/exec.rs`'s tolerance:
//! |Δ| ≤ 1e-3·(1 + max|logit|) dense, 3e-2·(1 + max|logit|) with MXFP4 experts; greedy tokens
//! equal to the CPU's wherever the CPU's top two logits are further apart than twice that bound,
//! and equal to the session's own verify everywhere.

mod common;

use std::sync::Arc;

use common::{argmax, fixture, tolerance, FIXTURES};
use model::config::ModelConfig;
use model::cpu::toy::{self, ToyExperts};
use model::cpu::{CpuModel, Session};
use model::executor::{forward_index, Executor};
use model::weights::Weights;
use tilert::exec::{GpuModel, GpuSession};
use tilert::ops::MAX_TOKENS;

/// The prompt of sequence `i`: `3 + 9·i` tokens.
fn prompt(i: usize, vocab: u32) -> Vec<u32> {
    (0..3 + 9 * i as u32)
        .map(|j| (j * 31 + 7 * i as u32 + 3) % vocab)
        .collect()
}

/// The block of sequence `i` in round `r`: widths mix plain rows (1) and verify blocks up to 16.
fn block(i: usize, r: usize, vocab: u32) -> Vec<u32> {
    const WIDTHS: [usize; 8] = [1, 4, 8, 1, 16, 3, 2, 7];
    let w = WIDTHS[(i + 3 * r) % WIDTHS.len()];
    (0..w as u32)
        .map(|j| (j * 17 + 11 * i as u32 + 5 * r as u32 + 1) % vocab)
        .collect()
}

fn session_size(i: usize) -> usize {
    if i.is_multiple_of(2) {
        320
    } else {
        256
    }
}

/// The layers a drafter would read: the first and the last.
fn layers(config: &ModelConfig) -> Vec<usize> {
    let nl = config.layers.len();
    vec![0, nl - 1]
}

fn check_model(name: &str, config: ModelConfig, weights: Weights) {
    let tol = tolerance(&weights);
    let config = Arc::new(config);
    let weights = Arc::new(weights);
    let cpu = CpuModel::new(config.clone(), weights.clone()).unwrap();
    let gpu = GpuModel::new(0, config.clone(), &weights).unwrap();
    let shared = gpu.shared_batch().unwrap();
    let pool = gpu.kv_pool(16, 12 * 320usize.div_ceil(16)).unwrap();
    let vocab = config.vocab_size as u32;
    let lay = layers(&config);
    let nl = config.layers.len();
    let idx: Vec<usize> = lay.iter().map(|&l| forward_index(l, nl)).collect();
    let mut worst = 0f32;
    for n in [1usize, 3, 6, 12] {
        let mut together: Vec<GpuSession> = Vec::new();
        let mut alone: Vec<GpuSession> = Vec::new();
        let mut cpus: Vec<Session> = Vec::new();
        for i in 0..n {
            let p = prompt(i, vocab);
            // Odd sequences are paged, even ones contiguous: one pass mixes both.
            let mut a = if i % 2 == 1 {
                gpu.session_paged(&pool, session_size(i)).unwrap()
            } else {
                gpu.session(session_size(i)).unwrap()
            };
            let mut b = gpu.session(session_size(i)).unwrap();
            a.prefill(&p).unwrap();
            b.prefill(&p).unwrap();
            a.share_batch(shared.clone()).unwrap();
            let mut c = cpu.session();
            c.prefill(&p).unwrap();
            together.push(a);
            alone.push(b);
            cpus.push(c);
        }
        for round in 0..3 {
            let blocks: Vec<Vec<u32>> = (0..n).map(|i| block(i, round, vocab)).collect();
            let brefs: Vec<&[u32]> = blocks.iter().map(Vec::as_slice).collect();
            let got = {
                let mut seqs: Vec<&mut GpuSession> = together.iter_mut().collect();
                <GpuSession as Executor>::forward_batch(&mut seqs, &brefs, &lay)
            };
            let want_cpu = {
                let mut seqs: Vec<&mut Session> = cpus.iter_mut().collect();
                <Session as Executor>::forward_batch(&mut seqs, &brefs, &lay)
            };
            assert_eq!(got.len(), n);
            for i in 0..n {
                let g = got[i].as_ref().unwrap();
                let own = alone[i].verify(&blocks[i], &idx).unwrap();
                assert_eq!(
                    g.logits, own.logits,
                    "{name}: N={n} round {round} seq {i} (block {}) logits differ from its own verify",
                    blocks[i].len()
                );
                assert_eq!(
                    g.hidden, own.hidden,
                    "{name}: N={n} round {round} seq {i}: captured hidden states differ"
                );
                let c = want_cpu[i].as_ref().unwrap();
                assert_eq!(c.logits.len(), g.logits.len());
                for (j, (gr, cr)) in g.logits.iter().zip(&c.logits).enumerate() {
                    let mag = cr.iter().fold(0f32, |m, x| m.max(x.abs()));
                    let err = gr
                        .iter()
                        .zip(cr)
                        .fold(0f32, |m, (x, y)| m.max((x - y).abs()));
                    assert!(
                        err <= tol * (1.0 + mag),
                        "{name}: N={n} round {round} seq {i} row {j}: batched vs CPU |Δ| {err} \
                         (max |logit|{mag})"
                    );
                    worst = worst.max(err / (1.0 + mag));
                    let mut sorted = cr.clone();
                    sorted.sort_by(|a, b| b.total_cmp(a));
                    if sorted.len() < 2 || sorted[0] - sorted[1] > 2.0 * tol * (1.0 + mag) {
                        assert_eq!(
                            argmax(gr),
                            argmax(cr),
                            "{name}: N={n} round {round} seq {i} row {j}: greedy token vs CPU"
                        );
                    }
                }
                assert_eq!(together[i].len(), alone[i].len());
                assert_eq!(together[i].len(), cpus[i].len());
            }
            // Speculative rounds keep a prefix of each block: truncate all three alike.
            for i in 0..n {
                let keep = together[i].len() - blocks[i].len() + 1 + (i + round) % blocks[i].len();
                together[i].truncate(keep).unwrap();
                alone[i].truncate(keep).unwrap();
                Executor::truncate(&mut cpus[i], keep).unwrap();
            }
        }
    }
    eprintln!(
        "{name}: multi-token batched rows == own verify (bit-identical) for N = 1, 3, 6, 12; \
         vs CPU forward_batch max |Δ|/(1+max|logit|) {worst:.2e}"
    );
}

#[test]
fn batched_verify_blocks_match_alone_and_cpu_on_fixtures() {
    let Some(_ctx) =
        ultra_kernels::gpu_for_test("batched_verify_blocks_match_alone_and_cpu_on_fixtures")
    else {
        return;
    };
    for rel in FIXTURES {
        let (config, weights) = model::load::load(&fixture(rel)).unwrap();
        check_model(rel, config, weights);
    }
}

#[test]
fn batched_verify_blocks_match_alone_and_cpu_on_toys() {
    let Some(_ctx) =
        ultra_kernels::gpu_for_test("batched_verify_blocks_match_alone_and_cpu_on_toys")
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

/// `forward_device` leaves each session's own buffers (argmax, logits, captured hidden states)
/// as its own `forward_device` of the block does, so a drafter reading them sees the same.
#[test]
fn batched_forward_device_fills_each_sessions_buffers() {
    let Some(_ctx) =
        ultra_kernels::gpu_for_test("batched_forward_device_fills_each_sessions_buffers")
    else {
        return;
    };
    let (c, w) = toy::gpt_oss(5, ToyExperts::Mxfp4);
    let vocab = c.vocab_size as u32;
    let (v, h) = (c.vocab_size, c.hidden_size);
    let nl = c.layers.len();
    let gpu = GpuModel::new(0, Arc::new(c), &w).unwrap();
    let mut batch = gpu.batch().unwrap();
    let capture = [forward_index(0, nl), forward_index(nl - 1, nl)];
    let make = || -> Vec<GpuSession> {
        (0..5)
            .map(|i| {
                let mut s = gpu.session(session_size(i)).unwrap();
                s.prefill(&prompt(i, vocab)).unwrap();
                s.set_capture(&capture).unwrap();
                s
            })
            .collect()
    };
    let (mut a, mut b) = (make(), make());
    let stream = gpu.stream().clone();
    for round in 0..3 {
        let blocks: Vec<Vec<u32>> = (0..5).map(|i| block(i, round, vocab)).collect();
        let brefs: Vec<&[u32]> = blocks.iter().map(Vec::as_slice).collect();
        {
            let mut seqs: Vec<&mut GpuSession> = a.iter_mut().collect();
            batch.forward_device(&mut seqs, &brefs, true).unwrap();
        }
        for (i, s) in b.iter_mut().enumerate() {
            s.forward_device(&blocks[i]).unwrap();
            let t = blocks[i].len();
            let get = |x: &GpuSession| {
                let l = tilert::arena::dtoh(&stream, x.logits_device(t)).unwrap();
                let m = tilert::arena::dtoh(&stream, x.argmax_device(t)).unwrap();
                let hs: Vec<Vec<f32>> = (0..capture.len())
                    .map(|k| tilert::arena::dtoh(&stream, x.captured_hidden(k, t)).unwrap())
                    .collect();
                (l, m, hs)
            };
            let (ga, gb) = (get(&a[i]), get(s));
            assert_eq!(ga.0.len(), t * v);
            assert_eq!(ga.0, gb.0, "round {round} seq {i}: logits");
            assert_eq!(ga.1, gb.1, "round {round} seq {i}: argmax");
            assert_eq!(ga.2[0].len(), t * h);
            assert_eq!(ga.2, gb.2, "round {round} seq {i}: captured hidden states");
            assert_eq!(a[i].len(), s.len());
        }
    }
}

#[test]
fn batched_verify_errors_leave_sessions_unchanged() {
    let Some(_ctx) = ultra_kernels::gpu_for_test("batched_verify_errors_leave_sessions_unchanged")
    else {
        return;
    };
    let (c, w) = toy::qwen3_moe(1, ToyExperts::Mxfp4);
    let vocab = c.vocab_size as u32;
    let gpu = GpuModel::new(0, Arc::new(c), &w).unwrap();
    let mut batch = gpu.batch().unwrap();
    let mut s: Vec<GpuSession> = (0..3)
        .map(|i| {
            let mut s = gpu.session(40).unwrap();
            s.prefill(&prompt(i, vocab)[..2 + i]).unwrap();
            s
        })
        .collect();
    let lens = |s: &[GpuSession]| s.iter().map(GpuSession::len).collect::<Vec<_>>();
    let before = lens(&s);
    let mut err = |s: &mut [GpuSession], blocks: &[&[u32]], what: &str| {
        let mut seqs: Vec<&mut GpuSession> = s.iter_mut().collect();
        let e = batch
            .verify(&mut seqs, blocks, &[])
            .expect_err(what)
            .to_string();
        assert!(e.contains(what), "{what}: {e}");
    };
    err(&mut s, &[&[1, 2], &[3]], "3 sessions but 2 blocks");
    err(&mut s, &[&[1, 2], &[3, vocab], &[4]], "session 1: token");
    err(&mut s, &[&[1, 2], &[], &[4]], "session 1: empty token list");
    // A block past the session's size fails the whole call; nobody advances.
    let long: Vec<u32> = (0..39).collect();
    err(
        &mut s,
        &[&[1], &[2], &long],
        "session 2: sequence would hold",
    );
    assert_eq!(lens(&s), before);
    // forward_device takes blocks of at most MAX_TOKENS.
    {
        let mut seqs: Vec<&mut GpuSession> = s.iter_mut().collect();
        let big: Vec<u32> = (0..MAX_TOKENS as u32 + 1).collect();
        let e = batch
            .forward_device(&mut seqs, &[&[1], &big, &[2]], false)
            .expect_err("block too long")
            .to_string();
        assert!(e.contains("a block of 17 tokens"), "{e}");
    }
    assert_eq!(lens(&s), before);
    // After the failures: a long block (more than one round) still matches its own verify.
    let mut alone = gpu.session(40).unwrap();
    alone.prefill(&prompt(2, vocab)[..4]).unwrap();
    let long: Vec<u32> = (0..20).map(|j| (j * 7 + 1) % vocab).collect();
    let mut seqs: Vec<&mut GpuSession> = s.iter_mut().collect();
    let got = batch
        .verify(&mut seqs, &[&[1], &[2, 3], &long], &[])
        .unwrap();
    assert_eq!(got[2].logits, alone.verify(&long, &[]).unwrap().logits);
    assert_eq!(
        lens(&s),
        vec![before[0] + 1, before[1] + 2, before[2] + long.len()]
    );
}
