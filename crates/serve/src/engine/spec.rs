//! DFlash speculative decoding in the engine.
//!
//! Each speculative request runs `dflash::speculative_generate` (the loop `ultra generate
//! --draft` runs) on a worker thread of its own, against a proxy [`dflash::Target`] whose
//! `forward` / `truncate` are executed by the scheduler thread on the sequence it owns — so the
//! scheduler still owns the target model and every KV cache, while the drafter's forward and
//! the acceptance run beside it. Tokens are emitted through the same [`TokenOutput`] as plain
//! decoding, one event per verify round (the round's tokens and its draft/accept counts).
//! Cancellation: the scheduler drops the sequence at once and refuses the worker's next call;
//! the worker's token callback also stops on the cancel flag.

use std::cell::RefCell;
use std::ops::ControlFlow;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc as std_mpsc, Arc};
use std::time::Instant;

use anyhow::{anyhow, Result};
use dflash::{Round, SpecDecoder, Target};
use model::cpu::{CpuError, VerifyOutput};
use model::sampling::FinishReason;
use model::tokenizer::Tokenizer;
use model::weights::Mat;
use tokio::sync::mpsc;

use super::scheduler::{describe, Sched};
use super::{Backend, Command, Event, Finished, Pending, Shared, SpecSummary, TokenEvent};
use crate::stream::TokenOutput;

/// Speculative decoding settings: the decoder (target model tables, drafter, block size).
#[derive(Clone)]
pub struct SpecConfig {
    pub decoder: Arc<SpecDecoder>,
}

/// A worker's call into the scheduler.
pub(crate) enum SpecOp {
    Forward {
        id: String,
        tokens: Vec<u32>,
        layers: Vec<usize>,
        reply: std_mpsc::Sender<Result<VerifyOutput>>,
    },
    Truncate {
        id: String,
        len: usize,
        reply: std_mpsc::Sender<Result<()>>,
    },
    /// The worker finished (its final event is sent).
    Done { id: String, reason: FinishReason },
}

/// A speculative request the scheduler holds the sequence of.
pub(super) struct SpecRunning<S> {
    id: String,
    seq: S,
    events: mpsc::UnboundedSender<Event>,
    cancel: Arc<AtomicBool>,
    kv_reserve: u64,
}

impl<B: Backend + Sync> Sched<B> {
    /// Admits `p` as a speculative request: a fresh sequence here, a worker thread for the loop.
    pub(super) fn start_spec(&mut self, p: Pending) {
        let Some(spec) = self.spec.clone() else {
            return;
        };
        let cancel = Arc::new(AtomicBool::new(false));
        self.spec_running.push(SpecRunning {
            id: p.id.clone(),
            seq: self.backend.new_sequence(),
            events: p.events.clone(),
            cancel: cancel.clone(),
            kv_reserve: p.kv_reserve,
        });
        let worker = Worker {
            spec,
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

    fn release_spec(&mut self, s: SpecRunning<B::Sequence>, reason: FinishReason) {
        self.kv_used -= s.kv_reserve;
        self.forget(&s.id, reason);
        self.backend.release(s.seq);
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

    pub(super) fn spec_op(&mut self, op: SpecOp) {
        let backend = self.backend.clone();
        let find = |this: &mut Self, id: &str| this.spec_running.iter().position(|s| s.id == id);
        match op {
            SpecOp::Forward {
                id,
                tokens,
                layers,
                reply,
            } => {
                let r = match find(self, &id) {
                    Some(i) => backend.forward(&mut self.spec_running[i].seq, &tokens, &layers),
                    None => Err(anyhow!("request {id} was cancelled")),
                };
                let _ = reply.send(r);
            }
            SpecOp::Truncate { id, len, reply } => {
                let r = match find(self, &id) {
                    Some(i) => backend.truncate(&mut self.spec_running[i].seq, len),
                    None => Err(anyhow!("request {id} was cancelled")),
                };
                let _ = reply.send(r);
            }
            SpecOp::Done { id, reason } => {
                if let Some(i) = find(self, &id) {
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

/// The target as the worker sees it: every call runs on the scheduler thread.
struct ProxyTarget<'a> {
    id: String,
    tx: std_mpsc::Sender<Command>,
    model: &'a model::cpu::CpuModel,
    len: usize,
    cancel: Arc<AtomicBool>,
    /// Tokens of the previous round, sent when the next verify starts.
    pending: &'a RefCell<Batch>,
    flush: &'a dyn Fn(&mut Batch),
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
        if self.cancel.load(Ordering::SeqCst) {
            return Err(ProxyError::Cancelled);
        }
        let (tx, rx) = std_mpsc::channel();
        self.tx
            .send(Command::Spec(make(tx)))
            .map_err(|_| ProxyError::Engine("the scheduler stopped".into()))?;
        match rx.recv() {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) => Err(ProxyError::Engine(e.to_string())),
            Err(_) => Err(ProxyError::Engine("the scheduler stopped".into())),
        }
    }
}

impl Target for ProxyTarget<'_> {
    type Error = ProxyError;

    fn vocab_size(&self) -> usize {
        self.model.config().vocab_size
    }

    fn hidden_size(&self) -> usize {
        self.model.config().hidden_size
    }

    fn num_layers(&self) -> usize {
        self.model.config().layers.len()
    }

    fn embedding(&self) -> &Mat {
        &self.model.weights().embed
    }

    fn lm_head(&self) -> &Mat {
        &self.model.weights().lm_head
    }

    fn len(&self) -> usize {
        self.len
    }

    fn forward(&mut self, tokens: &[u32], layers: &[usize]) -> Result<VerifyOutput, ProxyError> {
        (self.flush)(&mut self.pending.borrow_mut());
        let out = self.call(|reply| SpecOp::Forward {
            id: self.id.clone(),
            tokens: tokens.to_vec(),
            layers: layers.to_vec(),
            reply,
        })?;
        self.len += tokens.len();
        Ok(out)
    }

    fn truncate(&mut self, len: usize) -> Result<(), ProxyError> {
        self.call(|reply| SpecOp::Truncate {
            id: self.id.clone(),
            len,
            reply,
        })?;
        self.len = len;
        Ok(())
    }
}

/// Tokens and draft counts not yet sent.
#[derive(Default)]
struct Batch {
    tokens: Vec<u32>,
    text: String,
    draft_tokens: u32,
    accepted: u32,
    first: Option<Instant>,
    last: Option<Instant>,
    client_gone: bool,
}

/// One speculative request's loop.
struct Worker {
    spec: SpecConfig,
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
                logprobs: Vec::new(),
                draft_tokens: std::mem::take(&mut b.draft_tokens),
                accepted_draft_tokens: std::mem::take(&mut b.accepted),
            };
            if p.events.send(Event::Tokens(ev)).is_err() {
                b.client_gone = true;
            }
        };
        let mut target = ProxyTarget {
            id: p.id.clone(),
            tx: self.tx.clone(),
            model: self.spec.decoder.model(),
            len: 0,
            cancel: self.cancel.clone(),
            pending: &batch,
            flush: &flush,
        };
        let mut finish = None;
        let mut failure = None;
        let mut summary = SpecSummary::default();
        let mut on_token = |t: u32| {
            if self.cancel.load(Ordering::SeqCst) || batch.borrow().client_gone {
                return ControlFlow::Break(());
            }
            match out.push(t, tok) {
                Ok(e) => {
                    let mut b = batch.borrow_mut();
                    b.tokens.push(t);
                    b.text.push_str(&e.text);
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
        let result = dflash::speculative_generate(
            &mut target,
            self.spec.decoder.drafter(),
            self.spec.decoder.options(),
            &p.prompt,
            &p.params,
            &mut on_token,
            &mut on_round,
        );
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
