//! Helpers shared by the engine-level paged-KV test binaries (`engine_paged.rs`,
//! `engine_paged_spec.rs` on the CPU, `gpu_paged.rs` on the GPU): the engine configuration, a
//! deterministic token stream, request builders, and collecting a request's tokens.

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
