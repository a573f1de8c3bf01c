//! The scheduler over a scripted [`Backend`] that records every executor call: chunked prefill
//! (a long prompt is prefilled in chunks of at most `max_batched_tokens` minus the running
//! sequences' decode tokens, between decode steps that keep the running stream flowing, and the
//! output does not depend on the chunking), a sequence that cannot be allocated (an error for
//! that request only; everything already accepted finishes), a decode error of one sequence
//! (the others go on), a backend that fails to build (an error from `EngineHandle::start`), and
//! speculative requests on a scripted device drafter: their prompts are prefilled in chunks
//! too, interleaved with the other requests' verify rounds.
//!
//! The scripted model: the logits after token `t` are one-hot at `(t + 1) mod V`, so greedy
//! decoding counts up from the prompt's last token; a sequence is the list of its tokens.

use std::borrow::Cow;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use dflash::{Rows, SpecBackend, SpecError, SpecOptions, Want};
use model::config::ModelConfig;
use model::cpu::VerifyOutput;
use model::executor::Executor;
use model::sampling::{FinishReason, SamplingParams};
use serve::engine::{
    Backend, EngineConfig, EngineHandle, Event, Finished, GenerateRequest, KvBytes,
};

const VOCAB: usize = 512;

#[derive(Debug, Clone, PartialEq)]
enum Call {
    /// A prefill chunk of `n` tokens into the sequence whose prompt starts with `first`.
    Prefill { first: u32, n: usize },
    /// One decode step over the sequences with these first tokens.
    Decode(Vec<u32>),
    /// A speculative prefill chunk of `n` tokens.
    SpecPrefill { first: u32, n: usize },
    /// A speculative verify block of `n` tokens.
    Verify { first: u32, n: usize },
}

struct Scripted {
    config: Arc<ModelConfig>,
    log: Arc<Mutex<Vec<Call>>>,
    /// `new_sequence` fails for more positions than this.
    max_positions: usize,
    /// Decoding the sequence starting with this token fails once it holds this many tokens.
    fail_decode: Option<(u32, usize)>,
    /// A device drafter: every request is speculative.
    spec: Option<SpecOptions>,
    granularity: usize,
}

/// A scripted sequence: its tokens (prefills are logged).
struct ScriptedSeq {
    tokens: Vec<u32>,
    config: Arc<ModelConfig>,
    log: Arc<Mutex<Vec<Call>>>,
}

/// What the scripted model refuses.
#[derive(Debug, thiserror::Error)]
#[error("{0} (scripted)")]
struct ScriptedError(&'static str);

impl Executor for ScriptedSeq {
    type Error = ScriptedError;

    fn config(&self) -> &ModelConfig {
        &self.config
    }

    fn len(&self) -> usize {
        self.tokens.len()
    }

    fn max_rollback(&self) -> usize {
        usize::MAX
    }

    fn prefill(&mut self, tokens: &[u32]) -> Result<Cow<'_, [f32]>, ScriptedError> {
        let Some(&last) = tokens.last() else {
            return Err(ScriptedError("empty prefill"));
        };
        self.tokens.extend_from_slice(tokens);
        self.log.lock().unwrap().push(Call::Prefill {
            first: self.tokens[0],
            n: tokens.len(),
        });
        Ok(Cow::Owned(one_hot(last)))
    }

    fn decode(&mut self, token: u32) -> Result<Cow<'_, [f32]>, ScriptedError> {
        self.tokens.push(token);
        Ok(Cow::Owned(one_hot(token)))
    }

    fn verify(&mut self, tokens: &[u32], hidden: &[usize]) -> Result<VerifyOutput, ScriptedError> {
        if !hidden.is_empty() {
            return Err(ScriptedError("no hidden states"));
        }
        self.tokens.extend_from_slice(tokens);
        Ok(VerifyOutput {
            logits: tokens.iter().map(|&t| one_hot(t)).collect(),
            hidden: Vec::new(),
        })
    }

    fn truncate(&mut self, len: usize) -> Result<(), ScriptedError> {
        self.tokens.truncate(len);
        Ok(())
    }
}

/// A speculative request's state on the scripted device: the target sequence and the drafter's
/// committed context length. The drafter is perfect (it proposes the counting tokens), so every
/// draft is accepted.
struct ScriptedSpec {
    seq: Vec<u32>,
    ctx: usize,
    verified: Option<usize>,
    log: Arc<Mutex<Vec<Call>>>,
}

impl SpecBackend for ScriptedSpec {
    fn vocab_size(&self) -> usize {
        VOCAB
    }
    fn len(&self) -> usize {
        self.seq.len()
    }
    fn prefill(&mut self, chunk: &[u32], want: Option<Want>) -> Result<Option<Rows>, SpecError> {
        if chunk.is_empty() || self.seq.len() != self.ctx {
            return Err(SpecError::TargetOutput("bad prefill (scripted)".into()));
        }
        // A prefill chunk takes time, as on a real device.
        std::thread::sleep(Duration::from_millis(2));
        self.seq.extend_from_slice(chunk);
        self.ctx = self.seq.len();
        self.log.lock().unwrap().push(Call::SpecPrefill {
            first: self.seq[0],
            n: chunk.len(),
        });
        let next = (chunk[chunk.len() - 1] + 1) % VOCAB as u32;
        Ok(want.map(|_| Rows::Argmax(vec![next])))
    }
    fn draft(&mut self, x_last: u32, block: usize, _: Want) -> Result<Rows, SpecError> {
        Ok(Rows::Argmax(
            (1..block as u32)
                .map(|i| (x_last + i) % VOCAB as u32)
                .collect(),
        ))
    }
    fn verify(&mut self, tokens: &[u32], _: Want) -> Result<Rows, SpecError> {
        self.verified = Some(self.seq.len());
        self.seq.extend_from_slice(tokens);
        self.log.lock().unwrap().push(Call::Verify {
            first: self.seq[0],
            n: tokens.len(),
        });
        Ok(Rows::Argmax(
            tokens.iter().map(|t| (t + 1) % VOCAB as u32).collect(),
        ))
    }
    fn commit(&mut self, keep: usize) -> Result<(), SpecError> {
        let start = self.verified.take().expect("a verify before commit");
        self.seq.truncate(start + keep);
        self.ctx = self.seq.len();
        Ok(())
    }
}

fn one_hot(t: u32) -> Vec<f32> {
    let mut l = vec![0.0; VOCAB];
    l[(t as usize + 1) % VOCAB] = 10.0;
    l
}

impl Backend for Scripted {
    type Sequence = ScriptedSeq;
    type Spec = ScriptedSpec;
    type Block = serve::engine::NoBlock;

    fn config(&self) -> &ModelConfig {
        &self.config
    }

    fn device(&self) -> String {
        "scripted".into()
    }

    fn kv_bytes_fn(&self) -> KvBytes {
        Arc::new(|n| n as u64)
    }

    fn new_sequence(&self, positions: usize) -> Result<ScriptedSeq> {
        if positions > self.max_positions {
            bail!("out of device memory (scripted: {positions} positions)");
        }
        Ok(ScriptedSeq {
            tokens: Vec::new(),
            config: self.config.clone(),
            log: self.log.clone(),
        })
    }

    fn decode_batch(&self, seqs: &mut [&mut ScriptedSeq], tokens: &[u32]) -> Vec<Result<Vec<f32>>> {
        // A decode step takes time, as on a real device (the running streams overlap arrivals).
        std::thread::sleep(Duration::from_millis(2));
        self.log
            .lock()
            .unwrap()
            .push(Call::Decode(seqs.iter().map(|s| s.tokens[0]).collect()));
        seqs.iter_mut()
            .zip(tokens)
            .map(|(s, &t)| {
                if self
                    .fail_decode
                    .is_some_and(|(first, len)| s.tokens[0] == first && s.len() >= len)
                {
                    bail!("device fault (scripted)");
                }
                s.tokens.push(t);
                Ok(one_hot(t))
            })
            .collect()
    }

    fn prefill_granularity(&self) -> usize {
        self.granularity
    }

    fn device_spec(&self) -> Option<&SpecOptions> {
        self.spec.as_ref()
    }

    fn new_spec(&self, _positions: usize) -> Result<ScriptedSpec> {
        Ok(ScriptedSpec {
            seq: Vec::new(),
            ctx: 0,
            verified: None,
            log: self.log.clone(),
        })
    }
}

fn config() -> ModelConfig {
    let (mut c, _) = model::cpu::toy::qwen3_moe(1, model::cpu::toy::ToyExperts::Dense);
    c.vocab_size = VOCAB;
    c.max_position_embeddings = 4096;
    c
}

fn start(
    max_batched_tokens: usize,
    max_positions: usize,
    fail_decode: Option<(u32, usize)>,
) -> (EngineHandle, Arc<Mutex<Vec<Call>>>) {
    start_with(max_batched_tokens, max_positions, fail_decode, None, 1)
}

fn start_with(
    max_batched_tokens: usize,
    max_positions: usize,
    fail_decode: Option<(u32, usize)>,
    spec: Option<SpecOptions>,
    granularity: usize,
) -> (EngineHandle, Arc<Mutex<Vec<Call>>>) {
    let log = Arc::new(Mutex::new(Vec::new()));
    let l = log.clone();
    let engine = EngineHandle::start(
        move || {
            Ok(Scripted {
                config: Arc::new(config()),
                log: l,
                max_positions,
                fail_decode,
                spec,
                granularity,
            })
        },
        None,
        Vec::new(),
        EngineConfig {
            max_running: 4,
            max_batched_tokens,
            ..EngineConfig::default()
        },
        None,
    )
    .unwrap();
    (engine, log)
}

fn request(prompt: Vec<u32>, max_tokens: usize) -> GenerateRequest {
    GenerateRequest {
        id: String::new(),
        prompt,
        params: SamplingParams {
            ignore_eos: true,
            ..SamplingParams::greedy()
        },
        max_tokens: Some(max_tokens),
        logprobs: None,
        prompt_logprobs: None,
    }
}

/// Every token and the final event of a request (blocking).
fn drain(mut events: tokio::sync::mpsc::UnboundedReceiver<Event>) -> (Vec<u32>, Finished) {
    let mut tokens = Vec::new();
    while let Some(e) = events.blocking_recv() {
        match e {
            Event::Tokens(t) => tokens.extend(t.tokens),
            Event::Finished(f) => return (tokens, f),
        }
    }
    panic!("the stream ended without Finished");
}

fn counting(from: u32, n: usize) -> Vec<u32> {
    (1..=n as u32).map(|i| (from + i) % VOCAB as u32).collect()
}

#[test]
fn long_prompts_are_prefilled_in_chunks_between_decode_steps() {
    let (engine, log) = start(8, usize::MAX, None);
    // A runs (decoding) when B's 40-token prompt arrives.
    let a = engine
        .submit(request(vec![100, 101, 102, 103], 40))
        .unwrap();
    let mut a_events = a.events;
    let mut a_tokens = Vec::new();
    while a_tokens.len() < 2 {
        match a_events.blocking_recv().unwrap() {
            Event::Tokens(t) => a_tokens.extend(t.tokens),
            Event::Finished(f) => panic!("A finished early: {f:?}"),
        }
    }
    let b_prompt: Vec<u32> = (200..240).collect();
    let b = engine.submit(request(b_prompt.clone(), 5)).unwrap();
    let (b_tokens, b_fin) = drain(b.events);
    let (rest, a_fin) = drain(a_events);
    a_tokens.extend(rest);
    assert_eq!(a_tokens, counting(103, 40));
    assert_eq!(b_tokens, counting(239, 5), "chunking changed B's output");
    assert_eq!(a_fin.reason, FinishReason::Length);
    assert_eq!(b_fin.reason, FinishReason::Length);

    let log = log.lock().unwrap().clone();
    let b_chunks: Vec<(usize, usize)> = log
        .iter()
        .enumerate()
        .filter_map(|(i, c)| match c {
            Call::Prefill { first: 200, n } => Some((i, *n)),
            _ => None,
        })
        .collect();
    assert_eq!(b_chunks.iter().map(|c| c.1).sum::<usize>(), 40);
    assert!(b_chunks.len() >= 6, "40 tokens at ≤ 7 a step: {b_chunks:?}");
    for w in b_chunks.windows(2) {
        // Each chunk fits the step's budget (8 minus A's decode token), and A decoded between
        // two chunks: the running stream kept flowing.
        assert!(w[0].1 <= 7, "{b_chunks:?}");
        assert!(
            log[w[0].0..w[1].0]
                .iter()
                .any(|c| matches!(c, Call::Decode(d) if d.contains(&100))),
            "no decode of A between B's chunks: {log:?}"
        );
    }
    engine.shutdown();
}

#[test]
fn failed_allocation_fails_only_that_request() {
    // Sequences of more than 50 positions cannot be allocated.
    let (engine, _log) = start(2048, 50, None);
    let a = engine.submit(request(vec![10, 11], 30)).unwrap();
    let b = engine.submit(request(vec![20; 10], 60)).unwrap();
    let c = engine.submit(request(vec![30, 31, 32], 20)).unwrap();
    let (b_tokens, b_fin) = drain(b.events);
    assert!(b_tokens.is_empty());
    assert_eq!(b_fin.reason, FinishReason::Error);
    let msg = b_fin.error.unwrap();
    assert!(msg.contains("out of device memory"), "{msg}");
    let (a_tokens, a_fin) = drain(a.events);
    let (c_tokens, c_fin) = drain(c.events);
    assert_eq!(
        (a_tokens, a_fin.reason),
        (counting(11, 30), FinishReason::Length)
    );
    assert_eq!(
        (c_tokens, c_fin.reason),
        (counting(32, 20), FinishReason::Length)
    );
    // The engine keeps serving, and the failed request's reservation was given back.
    let d = engine.submit(request(vec![40], 3)).unwrap();
    assert_eq!(drain(d.events).0, counting(40, 3));
    // (A request's id is freed right after its final event.)
    let t0 = Instant::now();
    while engine.load() != (0, 0) {
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "{:?}",
            engine.load()
        );
        std::thread::sleep(Duration::from_millis(2));
    }
    engine.shutdown();
}

#[test]
fn a_decode_error_ends_only_its_sequence() {
    // The sequence starting with 7 fails once it holds 6 tokens (prompt 3 + 3 decoded).
    let (engine, _log) = start(2048, usize::MAX, Some((7, 6)));
    let a = engine.submit(request(vec![7, 8, 9], 20)).unwrap();
    let b = engine.submit(request(vec![50, 51], 20)).unwrap();
    let (a_tokens, a_fin) = drain(a.events);
    assert_eq!(a_fin.reason, FinishReason::Error);
    assert!(a_fin.error.unwrap().contains("device fault"));
    assert_eq!(a_tokens, counting(9, a_tokens.len()));
    let (b_tokens, b_fin) = drain(b.events);
    assert_eq!(
        (b_tokens, b_fin.reason),
        (counting(51, 20), FinishReason::Length)
    );
    engine.shutdown();
}

#[test]
fn a_backend_that_fails_to_build_is_an_error() {
    let r = EngineHandle::start(
        || -> Result<Scripted> { bail!("no GPU here (scripted)") },
        None,
        Vec::new(),
        EngineConfig::default(),
        None,
    );
    let Err(e) = r else {
        panic!("started without a backend");
    };
    assert!(e.to_string().contains("no GPU here"), "{e}");
    // And max_batched_tokens 0 is refused up front.
    let r = EngineHandle::start(
        || -> Result<Scripted> { bail!("not reached") },
        None,
        Vec::new(),
        EngineConfig {
            max_batched_tokens: 0,
            ..EngineConfig::default()
        },
        None,
    );
    assert!(r.is_err());
}

fn spec_chunks(log: &[Call], first: u32) -> Vec<(usize, usize)> {
    log.iter()
        .enumerate()
        .filter_map(|(i, c)| match c {
            Call::SpecPrefill { first: f, n } if *f == first => Some((i, *n)),
            _ => None,
        })
        .collect()
}

/// With a device drafter, a long prompt is prefilled in chunks of `max_batched_tokens` cut at
/// the backend's granularity (4 → 3 here), one chunk per scheduler step, and a short request
/// that arrives meanwhile is prefilled and runs its verify rounds between the long prompt's
/// chunks: it finishes before the long prompt is in. The tokens do not depend on the chunking.
#[test]
fn speculative_prompts_are_prefilled_in_chunks_between_rounds() {
    let opts = SpecOptions {
        block_size: 4,
        eos_token_ids: Vec::new(),
        prefill_chunk: None,
    };
    let (engine, log) = start_with(4, usize::MAX, None, Some(opts.clone()), 3);
    // 100 chunks of 2 ms each.
    let long: Vec<u32> = (0..300).map(|i| 100 + i % 300).collect();
    let a = engine.submit(request(long.clone(), 9)).unwrap();
    let t0 = Instant::now();
    while spec_chunks(&log.lock().unwrap(), 100).is_empty() {
        assert!(t0.elapsed() < Duration::from_secs(10), "no chunk of A ran");
        std::thread::sleep(Duration::from_millis(1));
    }
    let b = engine.submit(request(vec![50, 51, 52], 7)).unwrap();
    let (b_tokens, b_fin) = drain(b.events);
    let (a_tokens, a_fin) = drain(a.events);
    assert_eq!(
        (b_tokens, b_fin.reason),
        (counting(52, 7), FinishReason::Length)
    );
    assert_eq!(
        (a_tokens, a_fin.reason),
        (counting(399, 9), FinishReason::Length)
    );
    let spec = b_fin.spec.expect("a speculative summary");
    // 1 token from the prefill, rounds of 3 drafts + bonus and of 1 draft + bonus.
    assert_eq!((spec.drafts, spec.accepted_tokens), (2, 4));

    let log = log.lock().unwrap().clone();
    let a_chunks = spec_chunks(&log, 100);
    assert_eq!(a_chunks.iter().map(|c| c.1).sum::<usize>(), 300);
    assert!(a_chunks.iter().all(|c| c.1 == 3), "{a_chunks:?}");
    // B's prompt and both its rounds ran before A's last chunk.
    let a_last = a_chunks.last().unwrap().0;
    let b_calls: Vec<usize> = log
        .iter()
        .enumerate()
        .filter(|(_, c)| {
            matches!(
                c,
                Call::SpecPrefill { first: 50, .. } | Call::Verify { first: 50, .. }
            )
        })
        .map(|(i, _)| i)
        .collect();
    assert_eq!(b_calls.len(), 3, "{log:?}");
    assert!(
        b_calls.iter().all(|&i| i < a_last),
        "B waited for A's prefill: {log:?}"
    );
    // No verify of A before its prompt was in.
    let a_first_verify = log
        .iter()
        .position(|c| matches!(c, Call::Verify { first: 100, .. }))
        .unwrap();
    assert!(a_first_verify > a_last);
    engine.shutdown();

    // One chunk when the budget holds the prompt: the same tokens.
    let (engine, log) = start_with(4096, usize::MAX, None, Some(opts), 3);
    let a = engine.submit(request(long, 9)).unwrap();
    assert_eq!(drain(a.events).0, counting(399, 9));
    assert_eq!(spec_chunks(&log.lock().unwrap(), 100), vec![(0, 300)]);
    engine.shutdown();
}
