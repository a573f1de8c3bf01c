//! `ultra bench-serve --workload shared-prefix`: what automatic prefix caching saves. Two
//! workloads on the in-process engine (no network), each run with prefix caching on and off:
//!
//! * **shared context**: `requests` requests (32) submitted at once, each a `context`-token
//!   context (2,000) common to all followed by a short suffix of its own — a coding agent
//!   resending its context, several chats on one document;
//! * **n samples**: `samples` (8) sampled completions of one `context`-token prompt, submitted
//!   together as one API request's `n` sequences.
//!
//! Reported per workload: TTFT (arrival to first token, mean / p50 / max over the requests),
//! prompt tokens, prompt tokens prefilled (computed) and served from the cache, the share of
//! the shared prefix served from cache, and the wall time. Prompts are seeded random token ids;
//! sampling is seeded (temperature 0.8), so both runs produce the same tokens. With a drafter
//! (on the CPU) every request is speculative: its cached prefix brings the drafter's context
//! features with the target's KV.

use std::time::Instant;

use anyhow::{bail, Result};
use model::sampling::SamplingParams;
use rand::{Rng, SeedableRng};

use super::serve::{load_engine, ServeSetup};
use crate::engine::{EngineHandle, Event, GenerateRequest};

/// The workload's sizes.
#[derive(Debug, Clone)]
pub struct PrefixLoad {
    /// Tokens of the shared context (and of the n-samples prompt).
    pub context: usize,
    /// Requests continuing the shared context.
    pub requests: usize,
    /// Tokens each request adds after the context.
    pub suffix: usize,
    /// Samples of the one prompt.
    pub samples: usize,
    /// Tokens generated per request.
    pub max_tokens: usize,
    pub seed: u64,
}

impl Default for PrefixLoad {
    fn default() -> Self {
        PrefixLoad {
            context: 2000,
            requests: 32,
            suffix: 16,
            samples: 8,
            max_tokens: 16,
            seed: 7,
        }
    }
}

/// One workload run with caching on or off.
#[derive(Debug, Clone)]
pub struct PrefixRun {
    pub workload: &'static str,
    pub caching: bool,
    pub requests: usize,
    pub prompt_tokens: u64,
    /// Prompt tokens served from the prefix cache (not prefilled).
    pub cached_tokens: u64,
    /// Tokens of the prefix all requests share, summed over the requests.
    pub shared_tokens: u64,
    pub ttft_mean_s: f64,
    pub ttft_p50_s: f64,
    pub ttft_max_s: f64,
    pub wall_s: f64,
}

impl PrefixRun {
    /// Prompt tokens computed.
    pub fn prefilled(&self) -> u64 {
        self.prompt_tokens - self.cached_tokens
    }

    /// Share of the shared prefix's tokens served from the cache.
    pub fn shared_from_cache(&self) -> f64 {
        (self.cached_tokens.min(self.shared_tokens)) as f64 / self.shared_tokens.max(1) as f64
    }
}

fn start(setup: &ServeSetup, caching: bool) -> Result<EngineHandle> {
    if setup.synthetic.is_some() {
        bail!("the shared-prefix workload needs a checkpoint, not --synthetic-config");
    }
    let Some(dir) = &setup.model else {
        bail!("the shared-prefix workload needs a checkpoint (--model DIR or the default model)");
    };
    let mut cfg = setup.engine.clone();
    cfg.prefix_caching = caching;
    load_engine(
        dir,
        setup.draft.as_deref(),
        setup.block_size,
        cfg,
        setup.device.clone(),
    )
}

fn request(prompt: Vec<u32>, max_tokens: usize, seed: u64) -> GenerateRequest {
    GenerateRequest {
        id: String::new(),
        prompt,
        params: SamplingParams {
            temperature: 0.8,
            seed: Some(seed),
            ignore_eos: true,
            ..SamplingParams::default()
        },
        max_tokens: Some(max_tokens),
        logprobs: None,
        prompt_logprobs: None,
    }
}

/// Submits `reqs` together, waits for all, returns `(TTFTs, generated tokens of each)`.
fn run_group(
    engine: &EngineHandle,
    reqs: Vec<GenerateRequest>,
) -> Result<(Vec<f64>, Vec<Vec<u32>>)> {
    let subs = engine.submit_all(reqs)?;
    let mut ttft = Vec::new();
    let mut outs = Vec::new();
    for mut s in subs {
        let mut toks = Vec::new();
        loop {
            match s.events.blocking_recv() {
                Some(Event::Tokens(t)) => toks.extend(t.tokens),
                Some(Event::Finished(f)) => {
                    if let Some(e) = f.error {
                        bail!("request {} failed: {e}", s.id);
                    }
                    ttft.push(f.time_to_first_token.map_or(f64::NAN, |d| d.as_secs_f64()));
                    break;
                }
                None => bail!("request {} ended without a final event", s.id),
            }
        }
        outs.push(toks);
    }
    Ok((ttft, outs))
}

fn summarize(
    workload: &'static str,
    caching: bool,
    engine: &EngineHandle,
    reqs: Vec<GenerateRequest>,
    shared: usize,
) -> Result<(PrefixRun, Vec<Vec<u32>>)> {
    let m = engine.metrics();
    let hits0 = m.prefix_cache_hits.get();
    let n = reqs.len();
    let prompt_tokens = reqs.iter().map(|r| r.prompt.len() as u64).sum();
    let t0 = Instant::now();
    let (mut ttft, outs) = run_group(engine, reqs)?;
    let wall_s = t0.elapsed().as_secs_f64();
    ttft.sort_by(f64::total_cmp);
    let run = PrefixRun {
        workload,
        caching,
        requests: n,
        prompt_tokens,
        cached_tokens: m.prefix_cache_hits.get() - hits0,
        shared_tokens: (shared * n) as u64,
        ttft_mean_s: ttft.iter().sum::<f64>() / n.max(1) as f64,
        ttft_p50_s: ttft.get(n / 2).copied().unwrap_or(f64::NAN),
        ttft_max_s: ttft.last().copied().unwrap_or(f64::NAN),
        wall_s,
    };
    Ok((run, outs))
}

/// Runs both workloads with prefix caching off, then on; checks that the generated tokens are
/// the same both times.
pub fn run(setup: &ServeSetup, load: &PrefixLoad) -> Result<Vec<PrefixRun>> {
    if load.context == 0 || load.requests == 0 || load.samples == 0 || load.max_tokens == 0 {
        bail!("the shared-prefix workload needs a context, requests, samples and max_tokens ≥ 1");
    }
    let mut runs = Vec::new();
    let mut outputs: Vec<Vec<Vec<u32>>> = Vec::new();
    for caching in [false, true] {
        let engine = start(setup, caching)?;
        let vocab = engine.info().vocab_size as u32;
        let need = load.context + load.suffix + load.max_tokens;
        if need > engine.info().max_context {
            bail!(
                "context {} + suffix {} + max_tokens {} exceed the model's context of {} tokens",
                load.context,
                load.suffix,
                load.max_tokens,
                engine.info().max_context
            );
        }
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(load.seed);
        let mut ids =
            |n: usize| -> Vec<u32> { (0..n).map(|_| rng.random_range(0..vocab)).collect() };
        let context = ids(load.context);
        let shared: Vec<GenerateRequest> = (0..load.requests)
            .map(|i| {
                let mut p = context.clone();
                p.extend(ids(load.suffix));
                request(p, load.max_tokens, load.seed + i as u64)
            })
            .collect();
        let one = ids(load.context);
        let samples: Vec<GenerateRequest> = (0..load.samples)
            .map(|i| request(one.clone(), load.max_tokens, load.seed + 1000 + i as u64))
            .collect();
        let mut outs = Vec::new();
        for (name, reqs, shared_len) in [
            ("shared context", shared, load.context),
            ("n samples", samples, load.context),
        ] {
            let (run, o) = summarize(name, caching, &engine, reqs, shared_len)?;
            runs.push(run);
            outs.extend(o);
        }
        outputs.push(outs);
        engine.shutdown();
    }
    if outputs[0] != outputs[1] {
        bail!("the generated tokens differ with and without prefix caching");
    }
    Ok(runs)
}

/// Prints the runs as a table plus the with/without ratios.
pub fn print(runs: &[PrefixRun]) {
    println!(
        "{:<15} {:<8} {:>4} {:>8} {:>10} {:>8} {:>8} {:>10} {:>10} {:>10} {:>8}",
        "workload",
        "caching",
        "reqs",
        "prompt",
        "prefilled",
        "cached",
        "shared%",
        "TTFT mean",
        "TTFT p50",
        "TTFT max",
        "wall"
    );
    for r in runs {
        println!(
            "{:<15} {:<8} {:>4} {:>8} {:>10} {:>8} {:>7.1}% {:>9.1}ms {:>9.1}ms {:>9.1}ms {:>7.2}s",
            r.workload,
            if r.caching { "on" } else { "off" },
            r.requests,
            r.prompt_tokens,
            r.prefilled(),
            r.cached_tokens,
            100.0 * r.shared_from_cache(),
            r.ttft_mean_s * 1e3,
            r.ttft_p50_s * 1e3,
            r.ttft_max_s * 1e3,
            r.wall_s
        );
    }
    for w in ["shared context", "n samples"] {
        let off = runs.iter().find(|r| r.workload == w && !r.caching);
        let on = runs.iter().find(|r| r.workload == w && r.caching);
        if let (Some(off), Some(on)) = (off, on) {
            println!(
                "{w}: TTFT mean {:.1}x lower, p50 {:.1}x lower with prefix caching; prefill tokens {} -> {} ({:.1}% of the shared prefix from cache)",
                off.ttft_mean_s / on.ttft_mean_s,
                off.ttft_p50_s / on.ttft_p50_s,
                off.prefilled(),
                on.prefilled(),
                100.0 * on.shared_from_cache()
            );
        }
    }
}
