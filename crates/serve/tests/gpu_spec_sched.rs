//! Speculative requests on the GPU driven by the scheduler (`GpuBackend` with the drafter on the
//! device): every running request a resumable `dflash::SpecStream`, their verify blocks in one
//! batched target pass per step (`tilert::exec::GpuBatch::forward_device`), their targets in the
//! paged KV pool with prefix caching (drafter context features cached with the blocks). On the
//! embedded default model and its trained drafter (rounds of several tokens):
//!
//! * N concurrent speculative requests (greedy and seeded sampling) give each request's output
//!   alone, and `ultra generate --draft --device cuda`'s (`dflash::gpu::GpuSpec` over a session
//!   of the server's size);
//! * outputs are identical with and without prefix caching, and cached prefixes are served
//!   (adopted with their drafter features);
//! * after a load with finished, aborted and disconnected requests the KV gauge is back to zero
//!   and nothing runs.
//!
//! Skipped without a GPU (fails with `ULTRA_REQUIRE_GPU=1`).

mod common;

use std::ops::ControlFlow;
use std::path::Path;
use std::time::Duration;

use serve::commands::generate::{gpu_max_seq, gpu_spec_setup, load};
use serve::engine::{EngineConfig, EngineHandle, GenerateRequest};
use serve::server::load_gpu_engine;

#[path = "common/engine.rs"]
#[allow(dead_code)]
mod engine_common;
use engine_common::{
    assert_blocks_freed, cfg, load_with_aborts_and_disconnects, request, run_all, settle, tokens,
};

const BUDGET: u64 = 512 << 20;

fn start(caching: bool, max_running: usize) -> EngineHandle {
    let (target, drafter) = common::default_model_dirs();
    load_gpu_engine(
        &target,
        Some(&drafter),
        None,
        EngineConfig {
            max_waiting: 256,
            ..cfg(caching, 16, BUDGET, max_running)
        },
        0,
    )
    .unwrap()
}

/// `ultra generate --draft --device cuda`: the speculative loop over one session of the
/// server's size (`gpu_max_seq`), the drafter on the device.
fn lone_generate(target: &Path, drafter: &Path, reqs: &[GenerateRequest]) -> Vec<Vec<u32>> {
    let mut loaded = load(target).unwrap();
    loaded.to_gpu(0).unwrap();
    let (gd, opts) = gpu_spec_setup(&loaded, drafter, None).unwrap();
    let gpu = loaded.gpu.as_ref().unwrap();
    reqs.iter()
        .map(|r| {
            let mut session = gpu.session(gpu_max_seq(gpu)).unwrap();
            let mut spec = dflash::gpu::GpuSpec::new(&mut session, &gd).unwrap();
            let params = model::sampling::SamplingParams {
                max_tokens: r.max_tokens.unwrap(),
                ..r.params.clone()
            };
            let out = dflash::run_speculative(
                &mut spec,
                &opts,
                &r.prompt,
                &params,
                &mut |_| ControlFlow::Continue(()),
                &mut |_| {},
            )
            .unwrap();
            out.tokens
        })
        .collect()
}

/// Requests of several prompt lengths, greedy (even) and seeded sampling (odd).
fn requests(n: u64) -> Vec<GenerateRequest> {
    (0..n)
        .map(|i| {
            request(
                tokens(300 + i, 5 + 7 * i as usize),
                20 + i as usize % 3,
                (i % 2 == 1).then_some(17 + i),
            )
        })
        .collect()
}

#[test]
fn gpu_concurrent_speculative_requests_equal_their_lone_runs() {
    let Some(_ctx) =
        ultra_kernels::gpu_for_test("gpu_concurrent_speculative_requests_equal_their_lone_runs")
    else {
        return;
    };
    let (target, drafter) = common::default_model_dirs();
    let reqs = requests(8);
    let engine = start(true, 8);
    let together = run_all(&engine, reqs.clone());
    let alone: Vec<Vec<u32>> = reqs
        .iter()
        .map(|r| run_all(&engine, vec![r.clone()]).remove(0))
        .collect();
    let mt = engine.metrics();
    let drafts = mt.spec_decode_num_drafts.get();
    let accepted = mt.spec_decode_num_accepted_tokens.get();
    settle(&engine, Duration::from_secs(60));
    assert_eq!(mt.kv_cache_usage_perc.get(), 0.0);
    engine.shutdown();
    assert!(drafts > 0, "no speculative rounds");
    eprintln!("{drafts} rounds, {accepted} drafts accepted");
    for (i, (t, a)) in together.iter().zip(&alone).enumerate() {
        assert_eq!(t, a, "request {i}: batched with 7 others vs alone");
    }
    let reference = lone_generate(&target, &drafter, &reqs);
    for (i, (t, r)) in together.iter().zip(&reference).enumerate() {
        assert_eq!(
            t, r,
            "request {i}: server vs ultra generate --draft --device cuda"
        );
    }
}

#[test]
fn gpu_speculative_prefix_caching_changes_no_output() {
    let Some(_ctx) =
        ultra_kernels::gpu_for_test("gpu_speculative_prefix_caching_changes_no_output")
    else {
        return;
    };
    let ctx = tokens(1, 70);
    let waves = || -> Vec<Vec<GenerateRequest>> {
        let cont = |i: u64| {
            let mut p = ctx.clone();
            p.extend(tokens(100 + i, 1 + i as usize % 5));
            request(p, 12, (i % 2 == 1).then_some(40 + i))
        };
        vec![
            vec![request(ctx.clone(), 8, None)],
            (0..6).map(cont).collect(),
        ]
    };
    let mut outs = Vec::new();
    let mut hits = Vec::new();
    for caching in [false, true] {
        let engine = start(caching, 8);
        let o: Vec<Vec<Vec<u32>>> = waves().into_iter().map(|w| run_all(&engine, w)).collect();
        settle(&engine, Duration::from_secs(60));
        let mt = engine.metrics();
        assert_eq!(mt.kv_cache_usage_perc.get(), 0.0, "caching {caching}");
        hits.push(mt.prefix_cache_hits.get());
        outs.push(o);
        engine.shutdown();
    }
    assert_eq!(outs[0], outs[1], "outputs differ with prefix caching");
    assert_eq!(hits[0], 0);
    // Wave 2: each of the 6 continuations adopts the context's 4 full blocks (64 positions).
    assert!(hits[1] >= 6 * 64, "prefix hits {}", hits[1]);
}

#[test]
fn gpu_speculative_blocks_are_freed_after_finish_abort_and_disconnect() {
    let Some(_ctx) = ultra_kernels::gpu_for_test(
        "gpu_speculative_blocks_are_freed_after_finish_abort_and_disconnect",
    ) else {
        return;
    };
    let engine = start(true, 6);
    let ctx = tokens(5, 40);
    load_with_aborts_and_disconnects(&engine, &ctx, 24, 30);
    settle(&engine, Duration::from_secs(60));
    assert_blocks_freed(&engine);
    engine.shutdown();
}
