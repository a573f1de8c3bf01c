//! Helpers shared by the engine-level paged-KV test binaries (`engine_paged.rs`,
//! `engine_paged_spec.rs`, `engine_device_spec.rs` on the CPU, `gpu_paged.rs`, `gpu_spec_sched.rs`
//! on the GPU): the engine configuration, a deterministic token stream, request builders,
//! collecting a request's tokens, a load with aborts and disconnects, and the freed-blocks check.

use model::sampling::{FinishReason, SamplingParams};
use serve::engine::{EngineConfig, EngineHandle, Event, Finished, GenerateRequest};

pub fn cfg(caching: bool, block_size: usize, budget: u64, max_running: usize) -> EngineConfig {
    EngineConfig {
        max_running,
        kv_budget_bytes: budget,
        kv_block_size: block_size,
        prefix_caching: caching,
        ..EngineConfig::default()
    }
}

pub fn tokens(seed: u64, n: usize) -> Vec<u32> {
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            (2 + s % 90) as u32
        })
        .collect()
}

pub fn request(prompt: Vec<u32>, max_tokens: usize, seed: Option<u64>) -> GenerateRequest {
    let params = match seed {
        None => SamplingParams::greedy(),
        Some(s) => SamplingParams {
            temperature: 0.9,
            top_p: Some(0.95),
            seed: Some(s),
            ..SamplingParams::default()
        },
    };
    GenerateRequest {
        id: String::new(),
        prompt,
        params: SamplingParams {
            ignore_eos: true,
            ..params
        },
        max_tokens: Some(max_tokens),
        logprobs: None,
        prompt_logprobs: None,
    }
}

pub fn drain(mut events: tokio::sync::mpsc::UnboundedReceiver<Event>) -> (Vec<u32>, Finished) {
    let mut out = Vec::new();
    while let Some(e) = events.blocking_recv() {
        match e {
            Event::Tokens(t) => out.extend(t.tokens),
            Event::Finished(f) => return (out, f),
        }
    }
    panic!("the stream ended without Finished");
}

/// Submits all requests at once and returns each one's tokens.
pub fn run_all(engine: &EngineHandle, reqs: Vec<GenerateRequest>) -> Vec<Vec<u32>> {
    let subs: Vec<_> = reqs
        .into_iter()
        .map(|r| engine.submit(r).unwrap())
        .collect();
    subs.into_iter()
        .map(|s| {
            let (toks, f) = drain(s.events);
            assert_eq!(f.reason, FinishReason::Length, "{f:?}");
            toks
        })
        .collect()
}

/// Waits (up to `limit`) until the engine holds no live request, then a little longer for the
/// blocks of the last ones to be released.
pub fn settle(engine: &EngineHandle, limit: std::time::Duration) {
    let t = std::time::Instant::now();
    while engine.load().1 > 0 || engine.metrics().num_requests_running.get() != 0 {
        assert!(t.elapsed() < limit, "requests still live");
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    std::thread::sleep(std::time::Duration::from_millis(120));
}

/// A load of `n` seeded requests continuing `ctx` (plus 1..7 tokens of their own, `max_tokens`
/// each) whose clients end in four ways in turn: finish; leave at once (maybe before
/// admission); abort after the first event; leave after two events. Returns what the kept ones
/// (finished or aborted) produced, each checked to have ended by length or abort.
pub fn load_with_aborts_and_disconnects(
    engine: &EngineHandle,
    ctx: &[u32],
    n: u64,
    max_tokens: usize,
) -> Vec<(Vec<u32>, Finished)> {
    let mut keep = Vec::new();
    for i in 0..n {
        let mut p = ctx.to_vec();
        p.extend(tokens(200 + i, 1 + (i % 7) as usize));
        let sub = engine.submit(request(p, max_tokens, Some(i))).unwrap();
        match i % 4 {
            0 => keep.push(sub),
            1 => drop(sub.events),
            2 => {
                let mut ev = sub.events;
                let _ = ev.blocking_recv();
                engine.abort(&sub.id);
                keep.push(serve::engine::Submitted { events: ev, ..sub });
            }
            _ => {
                let mut ev = sub.events;
                let _ = ev.blocking_recv();
                let _ = ev.blocking_recv();
                drop(ev);
            }
        }
    }
    keep.into_iter()
        .map(|s| {
            let (toks, f) = drain(s.events);
            assert!(
                matches!(f.reason, FinishReason::Length | FinishReason::Abort),
                "{f:?}"
            );
            (toks, f)
        })
        .collect()
}

/// After a load has settled: no block in use, nothing running, and cached prefixes were adopted.
pub fn assert_blocks_freed(engine: &EngineHandle) {
    let mt = engine.metrics();
    assert_eq!(mt.kv_cache_usage_perc.get(), 0.0);
    assert_eq!(mt.num_requests_running.get(), 0);
    assert!(
        mt.prefix_cache_hits.get() > 0,
        "no cached prefix was adopted"
    );
}

/// The prefix-caching workload of `engine_paged.rs` and `gpu_paged.rs`, run in waves (each wave
/// after the last finished, so the cache holds the earlier waves' blocks).
pub fn workloads() -> Vec<Vec<GenerateRequest>> {
    let ctx = tokens(1, 70);
    let cont = |i: u64, seed| {
        let mut p = ctx.clone();
        p.extend(tokens(100 + i, 1 + i as usize % 5));
        request(p, 6, seed)
    };
    // Wave 1: the context alone; wave 2: 6 continuations of it, greedy and seeded; wave 3: n = 4
    // samples of one prompt (all at once) and a chat turn extending wave 1's exchange.
    let mut turn = ctx.clone();
    turn.extend(tokens(7, 9));
    vec![
        vec![request(ctx.clone(), 8, None)],
        (0..6)
            .map(|i| cont(i, (i % 2 == 1).then_some(40 + i)))
            .collect(),
        (0..4)
            .map(|i| request(tokens(3, 37), 5, Some(7 + i)))
            .chain([request(turn, 6, Some(99))])
            .collect(),
    ]
}
