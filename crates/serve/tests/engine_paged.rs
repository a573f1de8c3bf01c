//! The paged KV cache and automatic prefix caching in the scheduler, on the CPU executor (tiny
//! random models of `model::cpu::toy`, sliding layers included):
//!
//! * outputs are identical with and without prefix caching — greedy and seeded sampling, a
//!   shared context continued by several requests, `n` samples of one prompt, a chat turn
//!   extending the last — while the cache serves the shared prefixes (the
//!   `prefix_cache_hits_total` counter);
//! * a pool too small for everything at once preempts (recompute) instead of failing, and the
//!   outputs are those of a large pool;
//! * blocks come back on every kind of end: after a load with finished, aborted and
//!   disconnected requests the KV gauge returns to zero.

use std::sync::Arc;
use std::time::Duration;

use model::cpu::toy::{self, ToyExperts};
use model::cpu::CpuModel;
use serve::engine::{Backend, CpuBackend, EngineConfig, EngineHandle};

#[path = "common/engine.rs"]
#[allow(dead_code)]
mod engine_common;
use engine_common::{
    assert_blocks_freed, cfg, drain, load_with_aborts_and_disconnects, request, run_all, settle,
    tokens, workloads,
};

fn model(which: usize) -> CpuModel {
    let (c, w) = match which {
        0 => toy::gpt_oss(11, ToyExperts::Mxfp4),
        _ => toy::mimo_v2_flash(12, ToyExperts::Dense),
    };
    CpuModel::new(Arc::new(c), Arc::new(w)).unwrap()
}

/// Bytes of one KV block of `block_size` positions of `m`.
fn block_bytes(m: &CpuModel, block_size: usize) -> u64 {
    CpuBackend::new(m.clone()).kv_bytes_fn()(block_size)
}

fn start(m: &CpuModel, cfg: EngineConfig) -> EngineHandle {
    let m = m.clone();
    EngineHandle::start(move || Ok(CpuBackend::new(m)), None, vec![1], cfg, None).unwrap()
}

#[test]
fn prefix_caching_changes_no_output_and_serves_shared_prefixes() {
    for which in 0..2 {
        let m = model(which);
        let budget = 4096 * block_bytes(&m, 16);
        let mut outs = Vec::new();
        let mut hits = Vec::new();
        for caching in [false, true] {
            let engine = start(&m, cfg(caching, 16, budget, 8));
            let mut o = Vec::new();
            for wave in workloads() {
                o.push(run_all(&engine, wave));
            }
            settle(&engine, Duration::from_secs(30));
            let mt = engine.metrics();
            assert_eq!(mt.kv_cache_usage_perc.get(), 0.0);
            hits.push((mt.prefix_cache_hits.get(), mt.prefix_cache_queries.get()));
            let text = mt.render();
            for name in [
                "vllm:prefix_cache_queries_total",
                "vllm:prefix_cache_hits_total",
                "vllm:num_preemptions_total",
            ] {
                assert!(text.contains(name), "/metrics lacks {name}");
            }
            outs.push(o);
            engine.shutdown();
        }
        assert_eq!(
            outs[0], outs[1],
            "model {which}: outputs differ with prefix caching"
        );
        assert_eq!(hits[0].0, 0, "no hits without caching");
        // Wave 2: 6 × 64 cached positions (4 blocks of the 70-token context); wave 3: the 3
        // later samples × 32 and the chat turn's 64 (the context) at least.
        assert!(
            hits[1].0 >= 6 * 64 + 3 * 32 + 64,
            "model {which}: prefix hits {:?}",
            hits[1]
        );
    }
}

#[test]
fn the_kv_block_size_changes_no_output() {
    let m = model(0);
    let mut outs = Vec::new();
    for bs in [1, 5, 16, 64] {
        let engine = start(&m, cfg(true, bs, 1 << 30, 8));
        let mut o = Vec::new();
        for wave in workloads() {
            o.push(run_all(&engine, wave));
        }
        outs.push(o);
        engine.shutdown();
    }
    for o in &outs[1..] {
        assert_eq!(&outs[0], o);
    }
}

#[test]
fn a_small_pool_preempts_and_recomputes_without_changing_outputs() {
    let m = model(1);
    let bs = 4;
    // 12 requests of 20 prompt + 24 generated positions (11 blocks each): a pool of 24 blocks
    // holds two at a time, so decoding sequences run out of blocks and get preempted.
    let reqs = || {
        (0..12)
            .map(|i| request(tokens(50 + i, 20), 24, (i % 3 == 0).then_some(i)))
            .collect::<Vec<_>>()
    };
    let big = start(&m, cfg(false, bs, 4096 * block_bytes(&m, bs), 12));
    let want = run_all(&big, reqs());
    big.shutdown();
    for caching in [false, true] {
        let small = start(&m, cfg(caching, bs, 24 * block_bytes(&m, bs), 12));
        let got = run_all(&small, reqs());
        assert_eq!(got, want, "caching {caching}");
        settle(&small, Duration::from_secs(30));
        let mt = small.metrics();
        assert!(mt.num_preemptions.get() > 0, "nothing was preempted");
        assert_eq!(mt.kv_cache_usage_perc.get(), 0.0);
        small.shutdown();
    }
}

#[test]
fn a_request_larger_than_the_pool_is_refused_at_submission() {
    let m = model(0);
    let engine = start(&m, cfg(true, 4, 10 * block_bytes(&m, 4), 4));
    // 41 positions need 11 blocks of 4.
    let err = engine
        .submit(request(tokens(9, 21), 20, None))
        .err()
        .expect("refused");
    assert!(
        matches!(err, serve::engine::SubmitError::TooLong(_)),
        "{err}"
    );
    // 40 positions fit exactly and complete.
    let out = run_all(&engine, vec![request(tokens(9, 20), 20, None)]);
    assert_eq!(out[0].len(), 20);
    engine.shutdown();
}

#[test]
fn blocks_are_freed_after_a_load_with_aborts_and_disconnects() {
    let m = model(0);
    let bs = 4;
    let engine = start(&m, cfg(true, bs, 64 * block_bytes(&m, bs), 6));
    let ctx = tokens(5, 30);
    load_with_aborts_and_disconnects(&engine, &ctx, 40, 30);
    settle(&engine, Duration::from_secs(30));
    assert_blocks_freed(&engine);
    engine.shutdown();
}

/// `n` samples of one prompt: the first prefills it (here in chunks of 8 tokens, so the others
/// are queued by then), the others fork its sequence — all 37 positions, the partial last block
/// included — and prefill nothing; their first writes copy the shared block. Outputs equal those
/// without prefix caching.
#[test]
fn samples_of_one_prompt_fork_the_first_ones_sequence() {
    let m = model(0);
    let prompt = tokens(21, 37);
    let reqs = || {
        (0..4)
            .map(|i| request(prompt.clone(), 12, Some(60 + i)))
            .collect::<Vec<_>>()
    };
    let mut outs = Vec::new();
    for caching in [false, true] {
        let mut c = cfg(caching, 16, 4096 * block_bytes(&m, 16), 8);
        c.max_batched_tokens = 8;
        let engine = start(&m, c);
        let subs = engine.submit_all(reqs()).unwrap();
        outs.push(
            subs.into_iter()
                .map(|s| drain(s.events).0)
                .collect::<Vec<_>>(),
        );
        settle(&engine, Duration::from_secs(30));
        let mt = engine.metrics();
        if caching {
            assert_eq!(mt.prefix_cache_hits.get(), 3 * 37);
            assert_eq!(mt.prefix_cache_queries.get(), 4 * 37);
        }
        assert_eq!(mt.kv_cache_usage_perc.get(), 0.0);
        engine.shutdown();
    }
    assert_eq!(outs[0], outs[1]);
    assert_ne!(outs[1][0], outs[1][1], "seeded samples differ");
}
