//! DFlash speculative decoding in the engine.
//!
//! Each speculative request runs DFlash's loop (`dflash::run_speculative`, what `ultra generate
//! --draft` runs) on a worker thread of its own; every call that touches the executor is sent
//! to the scheduler thread, which executes it on the state it owns between steps:
//!
//! * **host drafter** (the CPU executor, [`SpecConfig`]): the worker runs the drafter's forward
//!   and the acceptance itself, against a proxy target ([`dflash::DraftTarget`]: an executor
//!   whose passes and `truncate` the scheduler runs on the request's sequence);
//! * **device drafter** (the GPU executor, [`Backend::device_spec`]): the worker runs the
//!   acceptance against a proxy [`dflash::SpecBackend`] whose `prefill` / `draft` / `verify` /
//!   `commit` the scheduler runs on the request's device state (target session + drafter
//!   state), so only ids or logits rows cross threads.
//!
//! Either way the scheduler owns the executor and every KV cache. Tokens are emitted through
//! the same [`TokenOutput`] as plain decoding, one event per verify round (the round's tokens
//! and its draft/accept counts). With `logprobs`, the loop hands each emitted token the target's
//! raw logits row it was chosen from (`dflash::run_speculative_rows`; the verify rows come back
//! as logits then), and its log-probabilities are computed as plain decoding's
//! ([`TokenLogprob::of`]).
//!
//! A speculative prompt is prefilled in chunks like a plain one: the loop
//! (`dflash::prefill_prompt`) sends chunks of `max_batched_tokens` (cut at the backend's
//! granularity) one at a time, and the scheduler queues each chunk and runs it in its prefill
//! step with the budget left by the tokens just decoded and verified (at least one chunk per
//! step), so a long prompt does not stall the other requests' rounds. The first token is chosen
//! once the last chunk is in.
//! Cancellation: the scheduler drops the state at once and refuses the worker's next call; the
//! worker's token callback also stops on the cancel flag.

use std::borrow::Cow;
use std::cell::RefCell;
use std::ops::ControlFlow;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc as std_mpsc, Arc};
use std::time::Instant;

use anyhow::{anyhow, Result};
use dflash::{DraftTarget, Round, Rows, SpecBackend, SpecDecoder, SpecError, SpecOptions, Want};
use model::config::ModelConfig;
use model::cpu::{CpuError, VerifyOutput};
use model::executor::Executor;
use model::sampling::FinishReason;
use model::tokenizer::Tokenizer;
use model::weights::Mat;
use tokio::sync::mpsc;

use super::scheduler::{describe, Sched};
use super::{
    Backend, Command, Event, Finished, Pending, Shared, SpecSummary, TokenEvent, TokenLogprob,
};
use crate::stream::TokenOutput;

/// Speculative decoding settings: the decoder (target model tables, drafter, block size).
#[derive(Clone)]
pub struct SpecConfig {
    pub decoder: Arc<SpecDecoder>,
}

/// Which executor pass a host drafter's target call is.
pub(crate) enum HostPass {
    /// [`Executor::forward`]: the outputs of these decoder layers.
    Forward(Vec<usize>),
    /// [`Executor::verify`]: these hidden indices.
    Verify(Vec<usize>),
}

/// A worker's call into the scheduler.
pub(crate) enum SpecOp {
    /// Host drafter: a pass over the request's target sequence.
    Forward {
        id: String,
        tokens: Vec<u32>,
        pass: HostPass,
        /// A prompt chunk (queued for the prefill step), not a verify block.
        prefill: bool,
        reply: std_mpsc::Sender<Result<VerifyOutput>>,
    },
    /// Host drafter: `Executor::truncate` of the request's target sequence.
    Truncate {
        id: String,
        len: usize,
        reply: std_mpsc::Sender<Result<()>>,
    },
    /// Device drafter: `SpecBackend::prefill` of a prompt chunk on the request's state (queued
    /// for the prefill step).
    Prefill {
        id: String,
        chunk: Vec<u32>,
        want: Option<Want>,
        reply: std_mpsc::Sender<Result<Option<Rows>, SpecError>>,
    },
    /// Device drafter: `SpecBackend::draft`.
    Draft {
        id: String,
        x_last: u32,
        block_size: usize,
        want: Want,
        reply: std_mpsc::Sender<Result<Rows, SpecError>>,
    },
    /// Device drafter: `SpecBackend::verify`.
    Verify {
        id: String,
        tokens: Vec<u32>,
        want: Want,
        reply: std_mpsc::Sender<Result<Rows, SpecError>>,
    },
    /// Device drafter: `SpecBackend::commit`.
    Commit {
        id: String,
        keep: usize,
        reply: std_mpsc::Sender<Result<(), SpecError>>,
    },
    /// The worker finished (its final event is sent).
    Done { id: String, reason: FinishReason },
}

/// What the scheduler holds for a speculative request.
enum SpecSeq<S, D> {
    /// The target sequence (the drafter runs on the worker).
    Host(S),
    /// The target sequence and the drafter state on the device.
    Device(D),
}

/// A speculative request the scheduler holds the state of.
pub(super) struct SpecRunning<S, D> {
    id: String,
    seq: SpecSeq<S, D>,
    events: mpsc::UnboundedSender<Event>,
    cancel: Arc<AtomicBool>,
    kv_reserve: u64,
}

/// How a worker runs the loop.
#[derive(Clone)]
enum LoopKind {
    /// The decoder and the target sequence's rollback depth.
    Host(Arc<SpecDecoder>, usize),
    Device {
        opts: SpecOptions,
        vocab: usize,
    },
}

fn find_seq<'a, S, D>(
    running: &'a mut [SpecRunning<S, D>],
    id: &str,
) -> Option<&'a mut SpecSeq<S, D>> {
    running.iter_mut().find(|s| s.id == id).map(|s| &mut s.seq)
}

fn cancelled(id: &str) -> SpecError {
    SpecError::Target(Box::new(ProxyError::Engine(format!(
        "request {id} was cancelled"
    ))))
}

impl<B: Backend> Sched<B> {
    /// Admits `p` as a speculative request: a fresh sequence (or device state) here, a worker
    /// thread for the loop. A state that cannot be allocated fails this request only.
    pub(super) fn start_spec(&mut self, p: Pending) {
        let positions = p.prompt.len() + p.params.max_tokens;
        let made = match (&self.spec, self.backend.device_spec()) {
            (Some(spec), _) => self.backend.new_sequence(positions).map(|s| {
                let kind = LoopKind::Host(spec.decoder.clone(), s.max_rollback());
                (SpecSeq::Host(s), kind)
            }),
            (None, Some(opts)) => {
                let kind = LoopKind::Device {
                    opts: opts.clone(),
                    vocab: self.backend.config().vocab_size,
                };
                self.backend
                    .new_spec(positions)
                    .map(|d| (SpecSeq::Device(d), kind))
            }
            (None, None) => Err(anyhow!("no drafter is loaded")),
        };
        let (seq, kind) = match made {
            Ok(m) => m,
            Err(e) => {
                self.kv_used -= p.kv_reserve;
                let msg = format!("cannot allocate the sequence: {e:#}");
                self.end_waiting(p, FinishReason::Error, Some(msg));
                return;
            }
        };
        let cancel = Arc::new(AtomicBool::new(false));
        self.spec_running.push(SpecRunning {
            id: p.id.clone(),
            seq,
            events: p.events.clone(),
            cancel: cancel.clone(),
            kv_reserve: p.kv_reserve,
        });
        // Prompt chunks as plain requests': `max_batched_tokens` cut at the granularity.
        let granularity = self.backend.prefill_granularity().max(1);
        let worker = Worker {
            kind,
            granularity,
            prefill_chunk: (self.cfg.max_batched_tokens / granularity).max(1) * granularity,
            tokenizer: self.tokenizer.clone(),
            eos: self.eos.clone(),
            shared: self.shared.clone(),
            tx: self.tx.clone(),
            cancel,
            admitted: Instant::now(),
        };
        let id = p.id.clone();
        let spawned = std::thread::Builder::new()
            .name(format!("ultra-spec-{id}"))
            .spawn(move || worker.run(p));
        if let Err(e) = spawned {
            if let Some(i) = self.spec_running.iter().position(|s| s.id == id) {
                let s = self.spec_running.swap_remove(i);
                let _ = s
                    .events
                    .send(error_event(format!("cannot start a worker: {e}")));
                self.release_spec(s, FinishReason::Error);
            }
        }
    }

    fn release_spec(&mut self, s: SpecRunning<B::Sequence, B::Spec>, reason: FinishReason) {
        self.kv_used -= s.kv_reserve;
        self.forget(&s.id, reason);
        match s.seq {
            SpecSeq::Host(seq) => self.backend.release(seq),
            SpecSeq::Device(d) => self.backend.release_spec(d),
        }
    }

    /// Cancels a speculative request: its sequence is freed now; the worker sends the final
    /// event when it notices.
    pub(super) fn abort_spec(&mut self, id: &str) {
        if let Some(i) = self.spec_running.iter().position(|s| s.id == id) {
            let s = self.spec_running.swap_remove(i);
            s.cancel.store(true, Ordering::SeqCst);
            self.release_spec(s, FinishReason::Abort);
        }
    }

    pub(super) fn drop_disconnected_spec(&mut self) {
        let gone: Vec<String> = self
            .spec_running
            .iter()
            .filter(|s| s.events.is_closed())
            .map(|s| s.id.clone())
            .collect();
        for id in gone {
            self.abort_spec(&id);
        }
    }

    /// Handles a worker's call: a prompt chunk waits for the prefill step
    /// ([`Sched::spec_prefill_step`]); everything else runs now.
    pub(super) fn spec_op(&mut self, op: SpecOp) {
        match op {
            SpecOp::Forward { prefill: true, .. } | SpecOp::Prefill { .. } => {
                self.spec_prefills.push_back(op)
            }
            op => self.run_spec_op(op),
        }
    }

    /// Runs queued speculative prompt chunks in arrival order while `budget` tokens are left (at
    /// least one chunk when any is queued); returns the budget left.
    pub(super) fn spec_prefill_step(&mut self, mut budget: usize) -> usize {
        while budget > 0 {
            let Some(op) = self.spec_prefills.pop_front() else {
                break;
            };
            let n = match &op {
                SpecOp::Forward { tokens, .. } => tokens.len(),
                SpecOp::Prefill { chunk, .. } => chunk.len(),
                _ => 0,
            };
            self.run_spec_op(op);
            budget = budget.saturating_sub(n.max(1));
        }
        budget
    }

    fn run_spec_op(&mut self, op: SpecOp) {
        let running = &mut self.spec_running;
        let not_host = |id: &str| anyhow!("request {id} has no host sequence");
        match op {
            SpecOp::Forward {
                id,
                tokens,
                pass,
                prefill,
                reply,
            } => {
                if !prefill {
                    self.spec_decoded += tokens.len();
                }
                let r = match find_seq(running, &id) {
                    Some(SpecSeq::Host(seq)) => match &pass {
                        HostPass::Forward(layers) => seq.forward(&tokens, layers),
                        HostPass::Verify(hidden) => seq.verify(&tokens, hidden),
                    }
                    .map_err(anyhow::Error::new),
                    Some(SpecSeq::Device(_)) => Err(not_host(&id)),
                    None => Err(anyhow!("request {id} was cancelled")),
                };
                let _ = reply.send(r);
            }
            SpecOp::Truncate { id, len, reply } => {
                let r = match find_seq(running, &id) {
                    Some(SpecSeq::Host(seq)) => seq.truncate(len).map_err(anyhow::Error::new),
                    Some(SpecSeq::Device(_)) => Err(not_host(&id)),
                    None => Err(anyhow!("request {id} was cancelled")),
                };
                let _ = reply.send(r);
            }
            SpecOp::Prefill {
                id,
                chunk,
                want,
                reply,
            } => {
                let r = match find_seq(running, &id) {
                    Some(SpecSeq::Device(d)) => d.prefill(&chunk, want),
                    Some(SpecSeq::Host(_)) => {
                        Err(SpecError::TargetOutput("not a device state".into()))
                    }
                    None => Err(cancelled(&id)),
                };
                let _ = reply.send(r);
            }
            SpecOp::Draft {
                id,
                x_last,
                block_size,
                want,
                reply,
            } => {
                let r = match find_seq(running, &id) {
                    Some(SpecSeq::Device(d)) => d.draft(x_last, block_size, want),
                    Some(SpecSeq::Host(_)) => {
                        Err(SpecError::TargetOutput("not a device state".into()))
                    }
                    None => Err(cancelled(&id)),
                };
                let _ = reply.send(r);
            }
            SpecOp::Verify {
                id,
                tokens,
                want,
                reply,
            } => {
                self.spec_decoded += tokens.len();
                let r = match find_seq(running, &id) {
                    Some(SpecSeq::Device(d)) => d.verify(&tokens, want),
                    Some(SpecSeq::Host(_)) => {
                        Err(SpecError::TargetOutput("not a device state".into()))
                    }
                    None => Err(cancelled(&id)),
                };
                let _ = reply.send(r);
            }
            SpecOp::Commit { id, keep, reply } => {
                let r = match find_seq(running, &id) {
                    Some(SpecSeq::Device(d)) => d.commit(keep),
                    Some(SpecSeq::Host(_)) => {
                        Err(SpecError::TargetOutput("not a device state".into()))
                    }
                    None => Err(cancelled(&id)),
                };
                let _ = reply.send(r);
            }
            SpecOp::Done { id, reason } => {
                if let Some(i) = self.spec_running.iter().position(|s| s.id == id) {
                    let s = self.spec_running.swap_remove(i);
                    self.release_spec(s, reason);
                }
            }
        }
    }
}

fn error_event(msg: String) -> Event {
    Event::Finished(Finished {
        reason: FinishReason::Error,
        cause: "error".into(),
        stop_reason: None,
        text: String::new(),
        prompt_tokens: 0,
        completion_tokens: 0,
        queue: Default::default(),
        time_to_first_token: None,
        e2e: Default::default(),
        spec: None,
        error: Some(msg),
    })
}

/// How a proxy reaches the scheduler.
struct Link<'a> {
    id: String,
    tx: std_mpsc::Sender<Command>,
    cancel: Arc<AtomicBool>,
    /// Tokens of the previous round, sent when the next round starts.
    pending: &'a RefCell<Batch>,
    flush: &'a dyn Fn(&mut Batch),
}

impl Link<'_> {
    /// Sends the previous round's tokens (one event per round).
    fn flush(&self) {
        (self.flush)(&mut self.pending.borrow_mut());
    }

    fn call<T, E>(
        &self,
        make: impl FnOnce(std_mpsc::Sender<Result<T, E>>) -> SpecOp,
        err: impl Fn(ProxyError) -> E,
    ) -> Result<T, E> {
        if self.cancel.load(Ordering::SeqCst) {
            return Err(err(ProxyError::Cancelled));
        }
        let (tx, rx) = std_mpsc::channel();
        self.tx
            .send(Command::Spec(make(tx)))
            .map_err(|_| err(ProxyError::Engine("the scheduler stopped".into())))?;
        match rx.recv() {
            Ok(r) => r,
            Err(_) => Err(err(ProxyError::Engine("the scheduler stopped".into()))),
        }
    }
}

/// The target as a host-drafter worker sees it: every call runs on the scheduler thread.
struct ProxyTarget<'a> {
    link: Link<'a>,
    model: &'a model::cpu::CpuModel,
    len: usize,
    /// The sequence's [`Executor::max_rollback`].
    max_rollback: usize,
    /// Forwards below this length are prompt chunks.
    prompt_len: usize,
}

/// Errors of the proxy target.
#[derive(Debug, thiserror::Error)]
enum ProxyError {
    #[error("cancelled")]
    Cancelled,
    #[error("{0}")]
    Engine(String),
    #[error(transparent)]
    Cpu(#[from] CpuError),
}

impl ProxyTarget<'_> {
    fn call<T>(
        &self,
        make: impl FnOnce(std_mpsc::Sender<Result<T>>) -> SpecOp,
    ) -> Result<T, ProxyError> {
        self.link
            .call(make, anyhow::Error::new)
            .map_err(|e| match e.downcast::<ProxyError>() {
                Ok(p) => p,
                Err(e) => ProxyError::Engine(e.to_string()),
            })
    }
}

impl ProxyTarget<'_> {
    /// Runs `pass` over `tokens` on the scheduler thread (after sending the previous round's
    /// tokens).
    fn pass(&mut self, tokens: &[u32], pass: HostPass) -> Result<VerifyOutput, ProxyError> {
        self.link.flush();
        let out = self.call(|reply| SpecOp::Forward {
            id: self.link.id.clone(),
            tokens: tokens.to_vec(),
            pass,
            prefill: self.len < self.prompt_len,
            reply,
        })?;
        self.len += tokens.len();
        Ok(out)
    }
}

impl Executor for ProxyTarget<'_> {
    type Error = ProxyError;

    fn config(&self) -> &ModelConfig {
        self.model.config()
    }

    fn len(&self) -> usize {
        self.len
    }

    fn max_rollback(&self) -> usize {
        self.max_rollback
    }

    fn prefill(&mut self, tokens: &[u32]) -> Result<Cow<'_, [f32]>, ProxyError> {
        let mut out = self.pass(tokens, HostPass::Forward(Vec::new()))?;
        let last = out
            .logits
            .pop()
            .ok_or_else(|| ProxyError::Engine("the executor returned no logits".into()))?;
        Ok(Cow::Owned(last))
    }

    fn decode(&mut self, token: u32) -> Result<Cow<'_, [f32]>, ProxyError> {
        self.prefill(&[token])
    }

    fn verify(&mut self, tokens: &[u32], hidden: &[usize]) -> Result<VerifyOutput, ProxyError> {
        self.pass(tokens, HostPass::Verify(hidden.to_vec()))
    }

    /// One call for the whole input: the scheduler's sequence chunks it.
    fn forward(&mut self, tokens: &[u32], layers: &[usize]) -> Result<VerifyOutput, ProxyError> {
        self.pass(tokens, HostPass::Forward(layers.to_vec()))
    }

    fn truncate(&mut self, len: usize) -> Result<(), ProxyError> {
        self.call(|reply| SpecOp::Truncate {
            id: self.link.id.clone(),
            len,
            reply,
        })?;
        self.len = len;
        Ok(())
    }
}

impl DraftTarget for ProxyTarget<'_> {
    fn embedding(&self) -> &Mat {
        &self.model.weights().embed
    }

    fn lm_head(&self) -> &Mat {
        &self.model.weights().lm_head
    }
}

/// The device state as a device-drafter worker sees it: every call runs on the scheduler
/// thread; the committed length is tracked here (`SpecBackend::len` is synchronous).
struct ProxySpec<'a> {
    link: Link<'a>,
    vocab: usize,
    granularity: usize,
    len: usize,
    /// Start of the latest verified block.
    verified: Option<usize>,
}

fn spec_proxy_err(e: ProxyError) -> SpecError {
    SpecError::Target(Box::new(e))
}

impl SpecBackend for ProxySpec<'_> {
    fn vocab_size(&self) -> usize {
        self.vocab
    }

    fn len(&self) -> usize {
        self.len
    }

    fn prefill_granularity(&self) -> usize {
        self.granularity
    }

    fn prefill(&mut self, chunk: &[u32], want: Option<Want>) -> Result<Option<Rows>, SpecError> {
        let rows = self.link.call(
            |reply| SpecOp::Prefill {
                id: self.link.id.clone(),
                chunk: chunk.to_vec(),
                want,
                reply,
            },
            spec_proxy_err,
        )?;
        self.len += chunk.len();
        self.verified = None;
        Ok(rows)
    }

    fn draft(&mut self, x_last: u32, block_size: usize, want: Want) -> Result<Rows, SpecError> {
        self.link.flush();
        self.link.call(
            |reply| SpecOp::Draft {
                id: self.link.id.clone(),
                x_last,
                block_size,
                want,
                reply,
            },
            spec_proxy_err,
        )
    }

    fn verify(&mut self, tokens: &[u32], want: Want) -> Result<Rows, SpecError> {
        self.link.flush();
        let rows = self.link.call(
            |reply| SpecOp::Verify {
                id: self.link.id.clone(),
                tokens: tokens.to_vec(),
                want,
                reply,
            },
            spec_proxy_err,
        )?;
        self.verified = Some(self.len);
        self.len += tokens.len();
        Ok(rows)
    }

    fn commit(&mut self, keep: usize) -> Result<(), SpecError> {
        self.link.call(
            |reply| SpecOp::Commit {
                id: self.link.id.clone(),
                keep,
                reply,
            },
            spec_proxy_err,
        )?;
        if let Some(start) = self.verified.take() {
            self.len = start + keep;
        }
        Ok(())
    }
}

/// Tokens and draft counts not yet sent.
#[derive(Default)]
struct Batch {
    tokens: Vec<u32>,
    text: String,
    /// One per token when log-probabilities were asked for.
    logprobs: Vec<TokenLogprob>,
    draft_tokens: u32,
    accepted: u32,
    first: Option<Instant>,
    last: Option<Instant>,
    client_gone: bool,
}

/// One speculative request's loop.
struct Worker {
    kind: LoopKind,
    /// The backend's prefill granularity.
    granularity: usize,
    /// Most prompt tokens per prefill call (a multiple of `granularity`).
    prefill_chunk: usize,
    tokenizer: Option<Arc<Tokenizer>>,
    eos: Vec<u32>,
    shared: Arc<Shared>,
    tx: std_mpsc::Sender<Command>,
    cancel: Arc<AtomicBool>,
    admitted: Instant,
}

impl Worker {
    fn run(self, p: Pending) {
        let reason = self.generate(&p);
        let _ = self.tx.send(Command::Spec(SpecOp::Done {
            id: p.id.clone(),
            reason,
        }));
    }

    fn generate(&self, p: &Pending) -> FinishReason {
        let m = &self.shared.metrics;
        let tok = self.tokenizer.as_deref();
        let mut out = match TokenOutput::new(&p.params, &self.eos, &p.prompt, tok.is_some()) {
            Ok(o) => o,
            Err(e) => {
                let _ = p.events.send(error_event(e.to_string()));
                return FinishReason::Error;
            }
        };
        let batch = RefCell::new(Batch::default());
        let flush = |b: &mut Batch| {
            if b.tokens.is_empty() {
                return;
            }
            let now = Instant::now();
            match b.last {
                None => {
                    b.first = Some(now);
                    m.time_to_first_token
                        .observe((now - p.arrival).as_secs_f64());
                }
                Some(last) => m.inter_token_latency.observe((now - last).as_secs_f64()),
            }
            b.last = Some(now);
            m.generation_tokens.inc_by(b.tokens.len() as u64);
            let ev = TokenEvent {
                tokens: std::mem::take(&mut b.tokens),
                text: std::mem::take(&mut b.text),
                logprobs: std::mem::take(&mut b.logprobs),
                prompt_logprobs: Vec::new(),
                draft_tokens: std::mem::take(&mut b.draft_tokens),
                accepted_draft_tokens: std::mem::take(&mut b.accepted),
            };
            if p.events.send(Event::Tokens(ev)).is_err() {
                b.client_gone = true;
            }
        };
        let link = Link {
            id: p.id.clone(),
            tx: self.tx.clone(),
            cancel: self.cancel.clone(),
            pending: &batch,
            flush: &flush,
        };
        let mut finish = None;
        let mut failure = None;
        let mut summary = SpecSummary::default();
        let mut on_token = |t: u32, row: Option<&[f32]>| {
            if self.cancel.load(Ordering::SeqCst) || batch.borrow().client_gone {
                return ControlFlow::Break(());
            }
            match out.push(t, tok) {
                Ok(e) => {
                    let mut b = batch.borrow_mut();
                    b.tokens.push(t);
                    b.text.push_str(&e.text);
                    if let (Some(n), Some(row)) = (p.logprobs, row) {
                        b.logprobs.push(TokenLogprob::of(row, t, n));
                    }
                    if b.last.is_none() {
                        // The first token goes out at once (TTFT), not with the first round.
                        flush(&mut b);
                    }
                    match e.finish {
                        Some(f) => {
                            finish = Some(f);
                            ControlFlow::Break(())
                        }
                        None => ControlFlow::Continue(()),
                    }
                }
                Err(e) => {
                    failure = Some(e.to_string());
                    ControlFlow::Break(())
                }
            }
        };
        let mut on_round = |r: &Round<'_>| {
            let n = r.drafts.len();
            if n == 0 {
                return;
            }
            let a = r.acceptance.accepted;
            summary.drafts += 1;
            summary.draft_tokens += n as u64;
            summary.accepted_tokens += a as u64;
            if summary.accepted_per_position.len() < n {
                summary.accepted_per_position.resize(n, 0);
            }
            for (i, c) in summary.accepted_per_position[..a].iter_mut().enumerate() {
                *c += 1;
                m.spec_decode_num_accepted_tokens_per_pos
                    .with_label_values(&[&i.to_string()])
                    .inc();
            }
            m.spec_decode_num_drafts.inc();
            m.spec_decode_num_draft_tokens.inc_by(n as u64);
            m.spec_decode_num_accepted_tokens.inc_by(a as u64);
            let mut b = batch.borrow_mut();
            b.draft_tokens += n as u32;
            b.accepted += a as u32;
        };
        let rows = p.logprobs.is_some();
        let result = match &self.kind {
            LoopKind::Host(decoder, max_rollback) => {
                let mut target = ProxyTarget {
                    link,
                    model: decoder.model(),
                    len: 0,
                    max_rollback: *max_rollback,
                    prompt_len: p.prompt.len(),
                };
                let opts = SpecOptions {
                    prefill_chunk: Some(self.prefill_chunk),
                    ..decoder.options().clone()
                };
                dflash::CpuBackend::new(&mut target, decoder.drafter()).and_then(|mut backend| {
                    dflash::run_speculative_rows(
                        &mut backend,
                        &opts,
                        &p.prompt,
                        &p.params,
                        rows,
                        &mut on_token,
                        &mut on_round,
                    )
                })
            }
            LoopKind::Device { opts, vocab } => {
                let mut backend = ProxySpec {
                    link,
                    vocab: *vocab,
                    granularity: self.granularity,
                    len: 0,
                    verified: None,
                };
                let opts = SpecOptions {
                    prefill_chunk: Some(self.prefill_chunk),
                    ..opts.clone()
                };
                dflash::run_speculative_rows(
                    &mut backend,
                    &opts,
                    &p.prompt,
                    &p.params,
                    rows,
                    &mut on_token,
                    &mut on_round,
                )
            }
        };
        flush(&mut batch.borrow_mut());
        let cancelled = self.cancel.load(Ordering::SeqCst) || batch.borrow().client_gone;
        let (reason, cause, stop_reason, error) = match (&result, finish, failure) {
            _ if cancelled => (FinishReason::Abort, "abort", None, None),
            (Err(e), _, _) => (FinishReason::Error, "error", None, Some(e.to_string())),
            (_, _, Some(f)) => (FinishReason::Error, "error", None, Some(f)),
            (Ok(_), Some((r, c)), None) => {
                let (cause, stop_reason) = describe(&c);
                (r, cause, stop_reason, None)
            }
            (Ok(o), None, None) => match &o.stop_cause {
                Some(c) => {
                    let (cause, stop_reason) = describe(c);
                    (c.finish_reason(), cause, stop_reason, None)
                }
                None => (FinishReason::Stop, "stop", None, None),
            },
        };
        let text = match reason {
            FinishReason::Abort | FinishReason::Error => out.finish(),
            _ => String::new(),
        };
        let now = Instant::now();
        let e2e = now - p.arrival;
        let n = out.tokens().len();
        m.e2e_request_latency.observe(e2e.as_secs_f64());
        let b = batch.borrow();
        if let (Some(first), Some(last)) = (b.first, b.last) {
            if n > 1 {
                m.request_time_per_output_token
                    .observe((last - first).as_secs_f64() / (n - 1) as f64);
            }
        }
        let _ = p.events.send(Event::Finished(Finished {
            reason,
            cause: cause.to_string(),
            stop_reason,
            text,
            prompt_tokens: p.prompt.len(),
            completion_tokens: n,
            queue: self.admitted - p.arrival,
            time_to_first_token: b.first.map(|f| f - p.arrival),
            e2e,
            spec: Some(summary),
            error,
        }));
        reason
    }
}
