//! Speculative (DFlash) requests on the paged KV cache, on the CPU executor with a host drafter
//! (tiny random models of `model::cpu::toy` and `dflash::toy`):
//!
//! * a speculative request takes its blocks from the pool and adopts the longest cached prefix
//!   of its prompt together with the drafter's context features cached with those blocks, so
//!   it skips the target prefill and the target passes that made the drafter's features;
//! * outputs are identical with and without prefix caching (greedy, seeded sampling, a chat turn
//!   extending an earlier prompt and its output), and greedy output is plain decoding's;
//! * blocks come back on every kind of end (the KV gauge returns to zero after a load with
//!   aborts and disconnects).

use std::sync::Arc;
use std::time::Duration;

use dflash::toy::{self as dtoy, ToyKind};
use dflash::SpecDecoder;
use model::cpu::toy::{self, ToyExperts};
use model::cpu::CpuModel;
use serve::engine::{Backend, CpuBackend, EngineConfig, EngineHandle, SpecConfig};

#[path = "common/engine.rs"]
#[allow(dead_code)]
mod engine_common;
use engine_common::{
    assert_blocks_freed, load_with_aborts_and_disconnects, request, run_all, settle, tokens,
};

fn models() -> Vec<(CpuModel, ToyKind)> {
    let (c, w) = toy::gpt_oss(11, ToyExperts::Mxfp4);
    let a = CpuModel::new(Arc::new(c), Arc::new(w)).unwrap();
    let (c, w) = toy::mimo_v2_flash(12, ToyExperts::Dense);
    let b = CpuModel::new(Arc::new(c), Arc::new(w)).unwrap();
    vec![(a, ToyKind::ZLab), (b, ToyKind::MiMo)]
}

fn block_bytes(m: &CpuModel, block_size: usize) -> u64 {
    CpuBackend::new(m.clone()).kv_bytes_fn()(block_size)
}

/// An engine over `m`; speculative with a toy drafter of `kind` when `kind` is given.
fn start(m: &CpuModel, kind: Option<ToyKind>, caching: bool, blocks: u64) -> EngineHandle {
    start_with(m, kind, caching, blocks, 16)
}

fn start_with(
    m: &CpuModel,
    kind: Option<ToyKind>,
    caching: bool,
    blocks: u64,
    max_batched_tokens: usize,
) -> EngineHandle {
    let bs = 4;
    let spec = kind.map(|k| SpecConfig {
        decoder: Arc::new(
            SpecDecoder::new(m, dtoy::drafter(m.config(), k, 8, 21), Some(4)).unwrap(),
        ),
    });
    let cfg = EngineConfig {
        max_running: 6,
        max_batched_tokens,
        kv_budget_bytes: blocks * block_bytes(m, bs),
        kv_block_size: bs,
        prefix_caching: caching,
        ..EngineConfig::default()
    };
    let m = m.clone();
    EngineHandle::start(move || Ok(CpuBackend::new(m)), None, vec![1], cfg, spec).unwrap()
}

/// A shared context: one request alone (it fills the cache), then four continuing it at once
/// (greedy and seeded), then a chat turn extending the first prompt and its output. Returns
/// every output, the (hits, queries) counters and the (draft, accepted) token counters.
fn workload(engine: &EngineHandle, ctx: &[u32]) -> (Vec<Vec<u32>>, u64, u64, (u64, u64)) {
    let mut first = ctx.to_vec();
    first.extend(tokens(100, 3));
    let mut outs = run_all(engine, vec![request(first.clone(), 20, None)]);
    let reqs = (0..4u64)
        .map(|i| {
            let mut p = ctx.to_vec();
            p.extend(tokens(200 + i, 1 + i as usize));
            request(p, 20, (i % 2 == 1).then_some(i))
        })
        .collect();
    outs.extend(run_all(engine, reqs));
    let mut turn = first;
    turn.extend(&outs[0]);
    turn.extend(tokens(300, 5));
    outs.extend(run_all(engine, vec![request(turn, 12, Some(7))]));
    settle(engine, Duration::from_secs(30));
    let mt = engine.metrics();
    assert_eq!(mt.kv_cache_usage_perc.get(), 0.0);
    assert_eq!(mt.num_requests_running.get(), 0);
    let (h, q) = (mt.prefix_cache_hits.get(), mt.prefix_cache_queries.get());
    let spec = (
        mt.spec_decode_num_draft_tokens.get(),
        mt.spec_decode_num_accepted_tokens.get(),
    );
    (outs, h, q, spec)
}

#[test]
fn speculative_requests_reuse_cached_prefixes_without_changing_outputs() {
    let ctx = tokens(5, 37);
    for (m, kind) in models() {
        let on = start(&m, Some(kind), true, 256);
        let (got, hits, queries, drafts) = workload(&on, &ctx);
        on.shutdown();
        let off = start(&m, Some(kind), false, 256);
        let (want, off_hits, _, off_drafts) = workload(&off, &ctx);
        off.shutdown();
        assert_eq!(got, want, "{kind:?}: outputs differ with prefix caching");
        assert_eq!(off_hits, 0);
        // The drafter drafted from the same context: same drafts, same acceptance.
        assert_eq!(
            drafts, off_drafts,
            "{kind:?}: (draft, accepted) tokens differ"
        );
        assert!(drafts.0 > 0);
        // Each of the four continuations finds the context's 9 full blocks (36 tokens) cached
        // with its drafter features; the chat turn at least the first prompt's.
        assert!(hits >= 4 * 36 + 36, "{kind:?}: {hits} hits of {queries}");
        // Greedy speculative output is plain greedy decoding's.
        let plain = start(&m, None, false, 256);
        let (p, _, _, _) = workload(&plain, &ctx);
        plain.shutdown();
        for i in [0, 1, 3] {
            assert_eq!(
                got[i], p[i],
                "{kind:?}: request {i} differs from plain decoding"
            );
        }
    }
}

#[test]
fn speculative_blocks_are_freed_after_a_load_with_aborts_and_disconnects() {
    let (m, kind) = models().swap_remove(0);
    let engine = start(&m, Some(kind), true, 96);
    let ctx = tokens(5, 30);
    load_with_aborts_and_disconnects(&engine, &ctx, 24, 24);
    settle(&engine, Duration::from_secs(30));
    assert_blocks_freed(&engine);
    engine.shutdown();
}

/// A prompt far longer than one executor call, prefilled in one step: its blocks are cached
/// call by call, so the requests after it find the whole context. (The default model's sliding
/// layers dropped a 2,000-token prompt's early blocks within one call; these toys do not
/// reproduce that, `ultra bench-serve --workload shared-prefix` does.)
#[test]
fn long_prompts_prefilled_in_one_step_are_cached() {
    let ctx = tokens(9, 150);
    for (m, kind) in models() {
        let on = start_with(&m, Some(kind), true, 1024, 2048);
        let (got, hits, queries, _) = workload(&on, &ctx);
        on.shutdown();
        let off = start_with(&m, Some(kind), false, 1024, 2048);
        let (want, _, _, _) = workload(&off, &ctx);
        off.shutdown();
        assert_eq!(got, want, "{kind:?}: outputs differ with prefix caching");
        // 37 full context blocks (148 tokens) for each of the four continuations and the turn.
        assert!(hits >= 5 * 148, "{kind:?}: {hits} hits of {queries}");
    }
}
