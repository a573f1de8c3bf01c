//! The paged KV cache and automatic prefix caching of the scheduler on the GPU executor
//! (`GpuBackend` over a device block pool, `tilert::exec::GpuKvPool`), on toy models of
//! `model::cpu::toy` (sliding layers included):
//!
//! * outputs are identical with and without prefix caching — a shared context continued by
//!   several requests (greedy and seeded sampling), `n` samples of one prompt (forked sequences,
//!   the partial last block copied on write), a chat turn extending an earlier one — while the
//!   cache serves the shared prefixes (`prefix_cache_hits_total`);
//! * a pool too small for everything at once preempts instead of failing;
//! * after a load with finished, aborted and disconnected requests the KV gauge is back to zero.
//!
//! Skipped without a GPU (fails with `ULTRA_REQUIRE_GPU=1`).

use std::sync::Arc;
use std::time::Duration;

use model::config::ModelConfig;
use model::cpu::toy::{self, ToyExperts};
use model::weights::Weights;
use serve::engine::{EngineConfig, EngineHandle, GpuBackend};
use tilert::exec::GpuModel;

#[path = "common/engine.rs"]
#[allow(dead_code)]
mod engine_common;
use engine_common::{
    assert_blocks_freed, cfg, load_with_aborts_and_disconnects, request, run_all, settle, tokens,
    workloads,
};

type Toy = (Arc<ModelConfig>, Arc<Weights>);

fn toy_model(which: usize) -> Toy {
    let (c, w) = match which {
        0 => toy::gpt_oss(11, ToyExperts::Mxfp4),
        _ => toy::mimo_v2_flash(12, ToyExperts::Dense),
    };
    (Arc::new(c), Arc::new(w))
}

/// Device bytes of one KV block of `block_size` positions of `m` (what the scheduler counts).
fn block_bytes(m: &Toy, block_size: usize) -> u64 {
    let gpu = GpuModel::new(0, m.0.clone(), &m.1).unwrap();
    (gpu.kv_position_bytes() * block_size) as u64
}

fn start(m: &Toy, cfg: EngineConfig) -> EngineHandle {
    let (c, w) = m.clone();
    let max_running = cfg.max_running;
    EngineHandle::start(
        move || {
            let gpu = GpuModel::new(0, c, &w)?;
            GpuBackend::new(gpu, 256, None, max_running)
        },
        None,
        vec![1],
        cfg,
        None,
    )
    .unwrap()
}

#[test]
fn gpu_prefix_caching_changes_no_output_and_serves_shared_prefixes() {
    let Some(_ctx) = ultra_kernels::gpu_for_test(
        "gpu_prefix_caching_changes_no_output_and_serves_shared_prefixes",
    ) else {
        return;
    };
    for which in 0..2 {
        let m = toy_model(which);
        let budget = 1024 * block_bytes(&m, 16);
        let mut outs = Vec::new();
        let mut hits = Vec::new();
        for caching in [false, true] {
            let engine = start(&m, cfg(caching, 16, budget, 8));
            let mut o = Vec::new();
            for wave in workloads() {
                o.push(run_all(&engine, wave));
            }
            settle(&engine, Duration::from_secs(60));
            let mt = engine.metrics();
            assert_eq!(mt.kv_cache_usage_perc.get(), 0.0);
            hits.push((mt.prefix_cache_hits.get(), mt.prefix_cache_queries.get()));
            outs.push(o);
            engine.shutdown();
        }
        assert_eq!(
            outs[0], outs[1],
            "model {which}: outputs differ with prefix caching"
        );
        assert_eq!(hits[0].0, 0, "no hits without caching");
        // Wave 2: 6 × 64 cached positions (4 blocks of the 70-token context); wave 3: the chat
        // turn's 64 at least (forked samples count their whole prompt).
        assert!(
            hits[1].0 >= 6 * 64 + 64,
            "model {which}: prefix hits {:?}",
            hits[1]
        );
    }
}

/// A pool too small for all requests at once: sequences that run out of blocks are preempted and
/// recomputed, and every request still completes. (Unlike on the CPU, the recomputed positions
/// run in passes of other sizes — a prefill instead of the decode steps — and the GPU's attention
/// key splits depend on the pass size, so a preempted request's continuation may differ in the
/// last bits from an uninterrupted run, as in vLLM; its output is not compared.)
#[test]
fn gpu_small_pool_preempts_and_completes_every_request() {
    let Some(_ctx) =
        ultra_kernels::gpu_for_test("gpu_small_pool_preempts_and_completes_every_request")
    else {
        return;
    };
    let m = toy_model(1);
    let bs = 16;
    // 8 requests of 20 prompt + 40 generated positions (4 blocks each): 8 blocks hold two.
    let reqs = || {
        (0..8)
            .map(|i| request(tokens(50 + i, 20), 40, (i % 3 == 0).then_some(i)))
            .collect::<Vec<_>>()
    };
    for caching in [false, true] {
        let small = start(&m, cfg(caching, bs, 8 * block_bytes(&m, bs), 8));
        let got = run_all(&small, reqs());
        assert!(got.iter().all(|t| t.len() == 40), "caching {caching}");
        settle(&small, Duration::from_secs(60));
        let mt = small.metrics();
        assert!(mt.num_preemptions.get() > 0, "nothing was preempted");
        assert_eq!(mt.kv_cache_usage_perc.get(), 0.0);
        small.shutdown();
    }
}

#[test]
fn gpu_blocks_are_freed_after_a_load_with_aborts_and_disconnects() {
    let Some(_ctx) = ultra_kernels::gpu_for_test(
        "gpu_blocks_are_freed_after_a_load_with_aborts_and_disconnects",
    ) else {
        return;
    };
    let m = toy_model(0);
    let bs = 16;
    let engine = start(&m, cfg(true, bs, 48 * block_bytes(&m, bs), 6));
    let ctx = tokens(5, 40);
    load_with_aborts_and_disconnects(&engine, &ctx, 40, 30);
    settle(&engine, Duration::from_secs(60));
    assert_blocks_freed(&engine);
    engine.shutdown();
}
