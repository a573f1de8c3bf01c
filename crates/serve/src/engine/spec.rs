//! DFlash speculative decoding in the engine, driven by the scheduler.
//!
//! Each speculative request is a resumable state the scheduler advances — its sequence (host
//! drafter: the target sequence + the CPU drafter's context, a [`dflash::CpuBackend`]; device
//! drafter: the backend's [`Backend::Spec`], target session + drafter state on the device) and
//! its loop, a [`dflash::SpecStream`] (prefill → draft → verify → accept → commit → emit; the
//! same loop `ultra generate --draft` runs). No thread per request: every scheduler step
//! ([`Sched::spec_step`]) runs
//! 1. one batched drafter pass for every running speculative request that drafts this round
//!    ([`dflash::SpecBackend::draft_batch`]);
//! 2. one batched target pass for all of their verify blocks — each request's block at its own
//!    length, its own width ([`dflash::SpecBackend::verify_batch`]: one
//!    [`model::Executor::forward_batch`] pass on the CPU executor);
//! 3. per request: acceptance, commit (the target truncated to the kept tokens, their features
//!    appended to the drafter context) and emission through the same [`TokenOutput`] as plain
//!    decoding, one event per round (the round's tokens and its draft/accept counts).
//!
//! Prompts are prefilled in chunks like plain ones ([`Sched::spec_prefill_step`]: the step's
//! remaining token budget, cut at the backend's granularity, in arrival order); the first token
//! goes out when the last chunk is in.
//!
//! With [`dflash::BlockPolicy::Adaptive`] (`EngineConfig::spec_policy`) each request's rounds
//! choose their width from its measured acceptance and the measured cost of its steps
//! (`dflash::adapt`): the cost of a round is the time of the step's drafter pass (when it drafted),
//! its verify pass and its own commit — the latency the request sees per step on this device
//! under this load. Plain steps of such a request are verify blocks of one token in the same
//! batched pass. A new request starts from what finished requests measured (`dflash::AdaptPrior`:
//! their latest step costs and recent acceptance), so it skips the warm-up once the engine knows
//! whether drafting pays.
//!
//! With `logprobs`, each emitted token gets the target's raw logits row it was chosen from (the
//! verify rows come back as logits then) and its log-probabilities are computed as plain
//! decoding's ([`TokenLogprob::of`]).
//!
//! On a paged executor with the host drafter ([`Sched::spec_take_blocks`]), a request takes its
//! KV from the block pool when its prefill starts — the longest cached run of its prompt's
//! blocks that carry drafter context features, adopted with those features (no target prefill,
//! no target passes for the drafter's context), then blocks for all its positions — and
//! [`Sched::spec_cache_sync`] caches every block it fills with the features of its positions,
//! recorded by its [`dflash::CpuBackend`]. A device drafter's requests do the same through the
//! backend ([`Backend::spec_adopt_prefix`], [`Backend::spec_share_block`]; the features recorded
//! on the device and brought back, `Backend::spec_take_features`): their target sequences live
//! in the pool, their drafter states outside it.
//!
//! Cancellation and disconnects end the request within one step: its state is dropped and its
//! stream ends with `abort`.

use std::borrow::Cow;
use std::ops::ControlFlow;
use std::sync::Arc;
use std::time::Instant;

use anyhow::{anyhow, Result};
use dflash::{
    DraftTarget, Drafter, Plan, Round, Rows, SpecBackend, SpecDecoder, SpecError, SpecOptions,
    SpecStream, Want,
};
use model::config::ModelConfig;
use model::cpu::{CpuModel, VerifyOutput};
use model::executor::{Executor, FORWARD_CHUNK};
use model::sampling::FinishReason;
use model::weights::Mat;

use super::kv_blocks::{Cached, SeqBlocks};
use super::scheduler::{describe, Sched};
use super::{Backend, Event, Finished, Pending, SpecSummary, TokenEvent, TokenLogprob};
use crate::metrics::Metrics;
use crate::stream::TokenOutput;

/// Speculative decoding settings: the decoder (target model tables, drafter, block size).
#[derive(Clone)]
pub struct SpecConfig {
    pub decoder: Arc<SpecDecoder>,
}

/// The scheduler's target sequence with the CPU model's tables: what the host drafter drafts for.
pub(crate) struct HostTarget<S> {
    seq: S,
    model: CpuModel,
}

impl<S: Executor> Executor for HostTarget<S> {
    type Error = S::Error;

    fn config(&self) -> &ModelConfig {
        self.seq.config()
    }
    fn len(&self) -> usize {
        self.seq.len()
    }
    fn max_rollback(&self) -> usize {
        self.seq.max_rollback()
    }
    fn prefill(&mut self, tokens: &[u32]) -> Result<Cow<'_, [f32]>, S::Error> {
        self.seq.prefill(tokens)
    }
    fn decode(&mut self, token: u32) -> Result<Cow<'_, [f32]>, S::Error> {
        self.seq.decode(token)
    }
    fn verify(&mut self, tokens: &[u32], hidden: &[usize]) -> Result<VerifyOutput, S::Error> {
        self.seq.verify(tokens, hidden)
    }
    fn forward(&mut self, tokens: &[u32], layers: &[usize]) -> Result<VerifyOutput, S::Error> {
        self.seq.forward(tokens, layers)
    }
    fn truncate(&mut self, len: usize) -> Result<(), S::Error> {
        self.seq.truncate(len)
    }
    fn forward_batch(
        seqs: &mut [&mut Self],
        blocks: &[&[u32]],
        layers: &[usize],
    ) -> Vec<Result<VerifyOutput, S::Error>> {
        let mut inner: Vec<&mut S> = seqs.iter_mut().map(|s| &mut s.seq).collect();
        S::forward_batch(&mut inner, blocks, layers)
    }
}

impl<S: Executor> DraftTarget for HostTarget<S> {
    fn embedding(&self) -> &Mat {
        &self.model.weights().embed
    }
    fn lm_head(&self) -> &Mat {
        &self.model.weights().lm_head
    }
}

type HostSpec<S> = dflash::CpuBackend<HostTarget<S>, Arc<Drafter>>;

/// What the scheduler holds for a speculative request.
enum SpecSeq<S: Executor, D> {
    /// The target sequence and the CPU drafter's context.
    Host(Box<HostSpec<S>>),
    /// The target sequence and the drafter state on the device.
    Device(D),
}

impl<S: Executor, D: SpecBackend> SpecSeq<S, D> {
    fn as_backend(&mut self) -> &mut dyn SpecBackend {
        match self {
            SpecSeq::Host(h) => &mut **h,
            SpecSeq::Device(d) => d,
        }
    }
}

/// Tokens and draft counts of the current round, not yet sent.
#[derive(Default)]
struct Batch {
    tokens: Vec<u32>,
    text: String,
    /// One per token when log-probabilities were asked for.
    logprobs: Vec<TokenLogprob>,
    draft_tokens: u32,
    accepted: u32,
}

/// A speculative request the scheduler advances.
pub(super) struct SpecRunning<S: Executor, D> {
    p: Pending,
    seq: SpecSeq<S, D>,
    stream: SpecStream,
    out: TokenOutput,
    /// Prompt tokens already in the sequence (chunked prefill).
    prefilled: usize,
    /// Its blocks in the KV pool (host drafter on a paged executor; empty otherwise).
    blocks: SeqBlocks,
    /// It holds its blocks (taken when its prefill starts), or takes none.
    pooled: bool,
    /// Drafter context features of the positions after its last full block, waiting for that
    /// block to fill and be cached with them.
    feats: Vec<f32>,
    batch: Batch,
    summary: SpecSummary,
    /// How generation ended (a stop the output found: EOS, stop token or string, length).
    finish: Option<(FinishReason, model::sampling::StopCause)>,
    /// An error of the output (detokenization) that ends the request.
    failure: Option<String>,
    /// The client went away (its event receiver was dropped).
    gone: bool,
    admitted: Instant,
    first: Option<Instant>,
    last: Option<Instant>,
}

impl<S: Executor, D> SpecRunning<S, D> {
    fn prefilling(&self) -> bool {
        self.prefilled < self.p.prompt.len()
    }
}

/// Pushes an emitted token into the request's output and round batch (a closure body of
/// `SpecStream::start` / `emit`).
#[allow(clippy::too_many_arguments)]
fn push_token(
    out: &mut TokenOutput,
    batch: &mut Batch,
    finish: &mut Option<(FinishReason, model::sampling::StopCause)>,
    failure: &mut Option<String>,
    tok: Option<&model::tokenizer::Tokenizer>,
    logprobs: Option<usize>,
    t: u32,
    row: Option<&[f32]>,
) -> ControlFlow<()> {
    match out.push(t, tok) {
        Ok(e) => {
            batch.tokens.push(t);
            batch.text.push_str(&e.text);
            if let (Some(n), Some(row)) = (logprobs, row) {
                batch.logprobs.push(TokenLogprob::of(row, t, n));
            }
            match e.finish {
                Some(f) => {
                    *finish = Some(f);
                    ControlFlow::Break(())
                }
                None => ControlFlow::Continue(()),
            }
        }
        Err(e) => {
            *failure = Some(e.to_string());
            ControlFlow::Break(())
        }
    }
}

/// Whether a cached block carries drafter features (a speculative request can adopt it).
fn has_ctx<K>(c: &Cached<K>) -> bool {
    c.ctx.is_some()
}

/// The rows of one batched call, per request; errors become that request's.
fn spread<T>(r: Vec<Result<T, SpecError>>, n: usize) -> Vec<Result<T, SpecError>> {
    if r.len() == n {
        return r;
    }
    let got = r.len();
    (0..n)
        .map(|_| {
            Err(SpecError::TargetOutput(format!(
                "the batched pass returned {got} results for {n} sequences"
            )))
        })
        .collect()
}

impl<B: Backend> Sched<B> {
    /// The speculative loop's settings and the block policy.
    fn spec_options(&self) -> Option<SpecOptions> {
        let mut opts = match (&self.spec, self.backend.device_spec()) {
            (Some(spec), _) => spec.decoder.options().clone(),
            (None, Some(opts)) => opts.clone(),
            (None, None) => return None,
        };
        opts.prefill_chunk = None;
        Some(opts)
    }

    /// Admits `p` as a speculative request: a fresh sequence (or device state) and its loop
    /// state. A state that cannot be allocated fails this request only.
    pub(super) fn start_spec(&mut self, p: Pending) {
        let positions = p.prompt.len() + p.params.max_tokens;
        let vocab = self.backend.config().vocab_size;
        let made = match (&self.spec, self.backend.device_spec()) {
            (Some(spec), _) => self.backend.new_sequence(positions).and_then(|seq| {
                let target = HostTarget {
                    seq,
                    model: spec.decoder.model().clone(),
                };
                dflash::CpuBackend::new(target, spec.decoder.drafter_arc().clone())
                    .map(|h| SpecSeq::Host(Box::new(h)))
                    .map_err(anyhow::Error::new)
            }),
            (None, Some(_)) => self.backend.new_spec(positions).map(SpecSeq::Device),
            (None, None) => Err(anyhow!("no drafter is loaded")),
        };
        let policy = self.cfg.spec_policy;
        let opts = self.spec_options();
        let started = made.and_then(|seq| {
            let opts = opts.ok_or_else(|| anyhow!("no drafter is loaded"))?;
            let stream = SpecStream::new(
                &opts,
                policy,
                &p.prompt,
                &p.params,
                vocab,
                p.logprobs.is_some(),
            );
            match stream {
                Ok(mut s) => {
                    s.set_prior(&self.spec_prior);
                    Ok((seq, s))
                }
                Err(e) => {
                    self.release_seq(seq);
                    Err(anyhow::Error::new(e))
                }
            }
        });
        let out = TokenOutput::new(&p.params, &self.eos, &p.prompt, self.tokenizer.is_some());
        let (seq, stream, out) = match (started, out) {
            (Ok((seq, stream)), Ok(out)) => (seq, stream, out),
            (Ok((seq, _)), Err(e)) => {
                self.release_seq(seq);
                self.kv_used -= self.spec_reserved(&p);
                self.end_waiting(p, FinishReason::Error, Some(e.to_string()));
                return;
            }
            (Err(e), _) => {
                self.kv_used -= self.spec_reserved(&p);
                let msg = format!("cannot allocate the sequence: {e:#}");
                self.end_waiting(p, FinishReason::Error, Some(msg));
                return;
            }
        };
        let mut r = SpecRunning {
            p,
            seq,
            stream,
            out,
            prefilled: 0,
            blocks: SeqBlocks::default(),
            pooled: false,
            feats: Vec::new(),
            batch: Batch::default(),
            summary: SpecSummary::default(),
            finish: None,
            failure: None,
            gone: false,
            admitted: Instant::now(),
            first: None,
            last: None,
        };
        // Features are kept only for the prefix cache (on the GPU they cross to the host).
        if self.kv.as_ref().is_some_and(|p| p.caching()) {
            match &mut r.seq {
                SpecSeq::Host(h) => h.record_features(),
                SpecSeq::Device(d) => {
                    self.backend.spec_record_features(d);
                }
            }
        }
        self.spec_running.push(r);
    }

    /// The bytes a speculative request reserved at admission (none when it takes blocks).
    fn spec_reserved(&self, p: &Pending) -> u64 {
        if self.reserves_bytes() {
            p.kv_reserve
        } else {
            0
        }
    }

    /// Whether the pool has the blocks of a speculative request (all its positions, less the
    /// cached prefix with drafter features it would adopt).
    pub(super) fn spec_fits(&self, p: &Pending) -> bool {
        let Some(pool) = &self.kv else {
            return true;
        };
        let need = pool.need_where(&p.prompt, p.prompt.len() + p.params.max_tokens, has_ctx);
        pool.available() >= need + self.reserved_blocks()
    }

    /// When the prefill of `spec_running[i]` (a host-drafter request on a paged executor)
    /// starts: adopts the longest cached prefix of its prompt whose blocks carry drafter
    /// features (target KV and drafter context, no prefill), then takes the blocks of all its
    /// positions from the pool. `false`: they are not available now (other requests admitted
    /// meanwhile hold them); it holds nothing and waits.
    fn spec_take_blocks(&mut self, i: usize) -> bool {
        let g = self.backend.prefill_granularity().max(1);
        let reserved = self.reserved_blocks();
        let r = &mut self.spec_running[i];
        if r.pooled {
            return true;
        }
        let Some(pool) = &mut self.kv else {
            r.pooled = true;
            return true;
        };
        let bs = pool.block_size();
        let positions = r.p.prompt.len() + r.p.params.max_tokens;
        let need = pool.need_where(&r.p.prompt, positions, has_ctx);
        if pool.available() < need + reserved {
            return false;
        }
        if pool.caching() {
            let mut k = pool.peek_where(&r.p.prompt, has_ctx) / bs;
            while k > 0 && (k * bs) % g != 0 {
                k -= 1;
            }
            let hit = pool.adopt_prefix_where(&mut r.blocks, &r.p.prompt, k, has_ctx);
            let m = &self.shared.metrics;
            m.prefix_cache_queries.inc_by(r.p.prompt.len() as u64);
            if hit.tokens > 0 {
                let mut feats = Vec::new();
                let mut kv = Vec::with_capacity(hit.payloads.len());
                for c in hit.payloads {
                    feats.extend_from_slice(c.ctx.as_deref().unwrap_or_default());
                    kv.push(c.kv);
                }
                let backend = &self.backend;
                let adopted = match &mut r.seq {
                    SpecSeq::Host(host) => host.adopt_prefix(&feats, |t| {
                        backend
                            .adopt_blocks(&mut t.seq, &kv)
                            .map_err(|e| SpecError::TargetOutput(format!("{e:#}")))
                    }),
                    SpecSeq::Device(d) => backend
                        .spec_adopt_prefix(d, &kv, &feats)
                        .map_err(|e| SpecError::TargetOutput(format!("{e:#}"))),
                };
                match adopted {
                    Ok(()) => {
                        r.prefilled = hit.tokens;
                        m.prefix_cache_hits.inc_by(hit.tokens as u64);
                    }
                    Err(e) => {
                        // The state is empty again: prefill everything.
                        eprintln!(
                            "ultra serve: request {}: cached prefix not adopted: {e}",
                            r.p.id
                        );
                        pool.forget_prefix(&mut r.blocks);
                    }
                }
            }
        }
        if !pool.grow(&mut r.blocks, positions, reserved) {
            // Not reached (checked above); the request waits with nothing held.
            pool.release_seq(&mut r.blocks);
            let _ = r.seq.as_backend().reset();
            r.prefilled = 0;
            return false;
        }
        r.pooled = true;
        true
    }

    /// After `spec_running[i]`'s sequence grew (a prefill chunk, a committed round): records the
    /// tokens its KV now holds and caches its blocks that became full, each with the drafter
    /// features of its positions.
    fn spec_cache_sync(&mut self, i: usize) {
        let Some(pool) = &mut self.kv else {
            return;
        };
        let r = &mut self.spec_running[i];
        let backend = &self.backend;
        let (new_feats, dim, held) = match &mut r.seq {
            SpecSeq::Host(host) => (
                host.take_features(),
                host.feature_dim(),
                host.target().len(),
            ),
            SpecSeq::Device(d) => (
                backend.spec_take_features(d),
                backend.spec_feature_dim(d),
                d.len(),
            ),
        };
        r.feats.extend(new_feats);
        let known = r.blocks.tokens().len();
        if held > known {
            let all = r.p.prompt.iter().chain(r.out.tokens()).copied();
            let new: Vec<u32> = all.skip(known).take(held - known).collect();
            r.blocks.push_tokens(&new);
        }
        let bs = pool.block_size();
        // `feats` holds the rows of positions `base ..`: those after the last full block done
        // with before this call.
        let base = (known / bs) * bs;
        let (seq, feats) = (&r.seq, &r.feats);
        pool.register_full(&mut r.blocks, |b| {
            let lo = (b * bs).checked_sub(base)? * dim;
            let ctx = feats.get(lo..lo + bs * dim).filter(|c| !c.is_empty())?;
            let kv = match seq {
                SpecSeq::Host(host) => backend.share_block(&host.target().seq, b),
                SpecSeq::Device(d) => backend.spec_share_block(d, b),
            };
            kv.map(|kv| Cached {
                kv,
                ctx: Some(ctx.into()),
            })
        });
        let done = (held / bs) * bs;
        let drop = (done.saturating_sub(base) * dim).min(r.feats.len());
        r.feats.drain(..drop);
    }

    fn release_seq(&self, seq: SpecSeq<B::Sequence, B::Spec>) {
        match seq {
            SpecSeq::Host(h) => {
                let (target, _) = (*h).into_parts();
                self.backend.release(target.seq);
            }
            SpecSeq::Device(d) => self.backend.release_spec(d),
        }
    }

    /// Ends a speculative request: its last tokens and final event, metrics, its state and KV
    /// reservation released.
    fn end_spec(
        &mut self,
        mut r: SpecRunning<B::Sequence, B::Spec>,
        reason: FinishReason,
        cause: &str,
        stop_reason: Option<String>,
        error: Option<String>,
    ) {
        if !matches!(reason, FinishReason::Abort) {
            flush_spec(&self.shared.metrics, &mut r);
        }
        let text = match reason {
            FinishReason::Abort | FinishReason::Error => r.out.finish(),
            _ => String::new(),
        };
        let now = Instant::now();
        let e2e = now - r.p.arrival;
        let n = r.out.tokens().len();
        let m = &self.shared.metrics;
        m.e2e_request_latency.observe(e2e.as_secs_f64());
        if let (Some(first), Some(last)) = (r.first, r.last) {
            if n > 1 {
                m.request_time_per_output_token
                    .observe((last - first).as_secs_f64() / (n - 1) as f64);
            }
        }
        r.summary.plain_steps = r.stream.plain_steps();
        r.summary.adaptive = r.stream.adapt_summary();
        if let Some(a) = &r.summary.adaptive {
            self.spec_prior.absorb(a, r.stream.stats());
        }
        let _ = r.p.events.send(Event::Finished(Finished {
            reason,
            cause: cause.to_string(),
            stop_reason,
            text,
            prompt_tokens: r.p.prompt.len(),
            completion_tokens: n,
            queue: r.admitted - r.p.arrival,
            time_to_first_token: r.first.map(|f| f - r.p.arrival),
            e2e,
            spec: Some(std::mem::take(&mut r.summary)),
            error,
        }));
        self.kv_used -= self.spec_reserved(&r.p);
        if let Some(pool) = &mut self.kv {
            pool.release_seq(&mut r.blocks);
        }
        self.forget(&r.p.id, reason);
        self.release_seq(r.seq);
    }

    /// Ends a request after its stream stopped or failed: the cause the output or the loop
    /// reported.
    fn end_spec_outcome(&mut self, r: SpecRunning<B::Sequence, B::Spec>, err: Option<SpecError>) {
        if let Some(e) = err {
            let msg = e.to_string();
            return self.end_spec(r, FinishReason::Error, "error", None, Some(msg));
        }
        if let Some(f) = r.failure.clone() {
            return self.end_spec(r, FinishReason::Error, "error", None, Some(f));
        }
        if let Some((reason, cause)) = r.finish.clone() {
            let (cause, stop_reason) = describe(&cause);
            return self.end_spec(r, reason, cause, stop_reason, None);
        }
        match r.stream.stop_cause().cloned().flatten() {
            Some(c) => {
                let (cause, stop_reason) = describe(&c);
                self.end_spec(r, c.finish_reason(), cause, stop_reason, None)
            }
            None => self.end_spec(r, FinishReason::Stop, "stop", None, None),
        }
    }

    /// Cancels a speculative request: its state is freed and its stream ends with `abort` now.
    pub(super) fn abort_spec(&mut self, id: &str) {
        if let Some(i) = self.spec_running.iter().position(|s| s.p.id == id) {
            let r = self.spec_running.remove(i);
            self.end_spec(r, FinishReason::Abort, "abort", None, None);
        }
    }

    pub(super) fn drop_disconnected_spec(&mut self) {
        let mut i = 0;
        while i < self.spec_running.len() {
            if self.spec_running[i].p.events.is_closed() {
                let r = self.spec_running.remove(i);
                self.end_spec(r, FinishReason::Abort, "abort", None, None);
            } else {
                i += 1;
            }
        }
    }

    /// Prefills speculative prompts in arrival order while `budget` tokens are left: one chunk
    /// per prompt and step, of `max_batched_tokens` cut at the backend's granularity (the last
    /// chunk takes the rest), so a short prompt arriving behind a long one is prefilled in the
    /// same step as the long one's next chunk. A complete prompt emits its first token at once.
    /// Returns the budget left.
    pub(super) fn spec_prefill_step(&mut self, mut budget: usize) -> usize {
        let g = self.backend.prefill_granularity().max(1);
        let chunk = (self.cfg.max_batched_tokens / g).max(1) * g;
        let tok = self.tokenizer.clone();
        let mut i = 0;
        while budget > 0 && i < self.spec_running.len() {
            if !self.spec_running[i].prefilling() || !self.spec_take_blocks(i) {
                i += 1;
                continue;
            }
            let (n, last, want, piece) = {
                let r = &self.spec_running[i];
                let n = (r.p.prompt.len() - r.prefilled).min(chunk);
                let last = r.prefilled + n == r.p.prompt.len();
                // Paged host sequences: passes the executor runs as one call each, each
                // followed by caching the blocks it filled (a sliding layer keeps only the
                // rows of its latest call beyond its window).
                let piece = match (&r.seq, &self.kv) {
                    (SpecSeq::Host(_), Some(_)) => (FORWARD_CHUNK / g).max(1) * g,
                    _ => n,
                };
                (n, last, last.then(|| r.stream.prefill_want()), piece)
            };
            budget = budget.saturating_sub(n);
            let mut done = 0;
            let mut rows = Ok(None);
            while done < n {
                let m = (n - done).min(piece);
                let r = &mut self.spec_running[i];
                let start = r.prefilled;
                let w = if done + m == n { want } else { None };
                rows = r.seq.as_backend().prefill(&r.p.prompt[start..start + m], w);
                if rows.is_err() {
                    break;
                }
                r.prefilled += m;
                done += m;
                self.spec_cache_sync(i);
            }
            let rows = match rows {
                Ok(rows) => rows,
                Err(e) => {
                    let r = self.spec_running.remove(i);
                    let msg = format!("prefill failed: {e}");
                    self.end_spec(r, FinishReason::Error, "error", None, Some(msg));
                    continue;
                }
            };
            let r = &mut self.spec_running[i];
            if !last {
                i += 1;
                continue;
            }
            let started = match rows {
                Some(rows) => {
                    let SpecRunning {
                        stream,
                        out,
                        batch,
                        finish,
                        failure,
                        p,
                        ..
                    } = r;
                    let lp = p.logprobs;
                    stream.start(&rows, &mut |t, row| {
                        push_token(out, batch, finish, failure, tok.as_deref(), lp, t, row)
                    })
                }
                None => Err(SpecError::TargetOutput(
                    "the prefill returned no row".into(),
                )),
            };
            // The first token goes out at once (TTFT).
            let sent = flush_spec(&self.shared.metrics, &mut self.spec_running[i]);
            let done = self.spec_running[i].stream.is_done() || !sent;
            match started {
                Err(e) => {
                    let r = self.spec_running.remove(i);
                    self.end_spec_outcome(r, Some(e));
                }
                Ok(()) if !sent => {
                    let r = self.spec_running.remove(i);
                    self.end_spec(r, FinishReason::Abort, "abort", None, None);
                }
                Ok(()) if done => {
                    let r = self.spec_running.remove(i);
                    self.end_spec_outcome(r, None);
                }
                Ok(()) => i += 1,
            }
        }
        budget
    }

    /// One round for every running (prefilled) speculative request: one batched drafter pass,
    /// one batched verify pass, then acceptance, commit and emission per request. Returns the
    /// tokens verified.
    pub(super) fn spec_step(&mut self) -> usize {
        let ready: Vec<usize> = (0..self.spec_running.len())
            .filter(|&i| !self.spec_running[i].prefilling())
            .collect();
        if ready.is_empty() {
            return 0;
        }
        // Plans.
        let mut failed: Vec<(usize, SpecError)> = Vec::new();
        let mut plans: Vec<(usize, Plan)> = Vec::with_capacity(ready.len());
        for &i in &ready {
            match self.spec_running[i].stream.plan() {
                Ok(Some(p)) => plans.push((i, p)),
                Ok(None) => {}
                Err(e) => failed.push((i, e)),
            }
        }
        // Drafts: one batched pass.
        let t0 = Instant::now();
        let drafting: Vec<(usize, Plan)> = plans
            .iter()
            .filter(|(_, p)| p.draft_block.is_some())
            .copied()
            .collect();
        let mut draft_rows: Vec<Option<Result<Rows, SpecError>>> =
            (0..self.spec_running.len()).map(|_| None).collect();
        if !drafting.is_empty() {
            let x: Vec<u32> = drafting.iter().map(|(_, p)| p.x_last).collect();
            let b: Vec<usize> = drafting
                .iter()
                .map(|(_, p)| p.draft_block.unwrap_or(2))
                .collect();
            let w: Vec<Want> = drafting.iter().map(|(_, p)| p.want_draft).collect();
            let idx: Vec<usize> = drafting.iter().map(|(i, _)| *i).collect();
            let rows = self.batched(&idx, |h, d| {
                (
                    <HostSpec<B::Sequence> as SpecBackend>::draft_batch(h, &x, &b, &w),
                    <B::Spec as SpecBackend>::draft_batch(d, &x, &b, &w),
                )
            });
            for (i, r) in idx.into_iter().zip(rows) {
                draft_rows[i] = Some(r);
            }
        }
        let draft_secs = t0.elapsed().as_secs_f64();
        // Verify blocks. A device state whose round needs the target's logits (sampled, or
        // greedy with a penalty) has its acceptance run on the device when the backend can:
        // its verify brings back only argmax ids, and only the verdict comes back after.
        let device_accepts = self.backend.spec_accepts_on_device();
        let mut blocks: Vec<(usize, Plan, Vec<u32>, usize, bool)> = Vec::with_capacity(plans.len());
        for (i, plan) in plans {
            let r = &mut self.spec_running[i];
            let rows = match draft_rows[i].take() {
                Some(Ok(rows)) => Some(rows),
                Some(Err(e)) => {
                    failed.push((i, e));
                    continue;
                }
                None => None,
            };
            match r.stream.drafted(rows) {
                Ok(block) => {
                    let block = block.to_vec();
                    let start = r.seq.as_backend().len();
                    let on_device = device_accepts
                        && matches!(r.seq, SpecSeq::Device(_))
                        && plan.want_verify == Want::Logits
                        && block.len() > 1
                        && r.stream.acceptance_input().is_some();
                    blocks.push((i, plan, block, start, on_device));
                }
                Err(e) => failed.push((i, e)),
            }
        }
        let t1 = Instant::now();
        let verified = if blocks.is_empty() {
            Vec::new()
        } else {
            let idx: Vec<usize> = blocks.iter().map(|b| b.0).collect();
            let toks: Vec<&[u32]> = blocks.iter().map(|b| b.2.as_slice()).collect();
            let w: Vec<Want> = blocks
                .iter()
                .map(|b| if b.4 { Want::Argmax } else { b.1.want_verify })
                .collect();
            self.batched(&idx, |h, d| {
                (
                    <HostSpec<B::Sequence> as SpecBackend>::verify_batch(h, &toks, &w),
                    <B::Spec as SpecBackend>::verify_batch(d, &toks, &w),
                )
            })
        };
        let mut device_acc = self.accept_on_device(&blocks, &verified);
        let verify_secs = t1.elapsed().as_secs_f64();
        let mut n_verified = 0;
        let mut ended: Vec<(usize, Option<SpecError>)> = Vec::new();
        let tok = self.tokenizer.clone();
        let shared = self.shared.clone();
        let m = &shared.metrics;
        for (k, ((i, plan, block, start, _), rows)) in blocks.into_iter().zip(verified).enumerate()
        {
            n_verified += block.len();
            let t2 = Instant::now();
            let r = &mut self.spec_running[i];
            let SpecRunning {
                stream,
                out,
                batch,
                finish,
                failure,
                p,
                seq,
                summary,
                ..
            } = r;
            let _ = &plan;
            let mut round = None;
            let lp = p.logprobs;
            let result = (|| -> Result<bool, SpecError> {
                let mut on_round = |rd: &Round<'_>| {
                    round = Some((rd.drafts.len(), rd.acceptance.accepted));
                };
                let rows = rows?;
                let keep = match device_acc[k].take() {
                    Some(acc) => {
                        let (acc, uniforms) = acc.map_err(|e| SpecError::Target(e.into()))?;
                        stream.verified_with(start, acc, uniforms, &mut on_round)?
                    }
                    None => stream.verified(start, rows, &mut on_round)?,
                };
                seq.as_backend().commit(keep)?;
                let own = t2.elapsed().as_secs_f64();
                let drafted = if plan.draft_block.is_some() {
                    draft_secs
                } else {
                    0.0
                };
                stream.observe_cost(drafted + verify_secs + own);
                if let Some((n, a)) = round {
                    record_round(m, summary, batch, n, a);
                }
                stream.emit(&mut |t, row| {
                    push_token(out, batch, finish, failure, tok.as_deref(), lp, t, row)
                })
            })();
            if result.is_ok() {
                self.spec_cache_sync(i);
            }
            match result {
                Ok(done) => {
                    if !flush_spec(m, &mut self.spec_running[i]) {
                        self.spec_running[i].gone = true;
                        ended.push((i, None));
                    } else if done {
                        ended.push((i, None));
                    }
                }
                Err(e) => ended.push((i, Some(e))),
            }
        }
        ended.extend(failed.into_iter().map(|(i, e)| (i, Some(e))));
        // Remove from the back so the indices stay valid.
        ended.sort_by_key(|e| std::cmp::Reverse(e.0));
        ended.dedup_by_key(|e| e.0);
        for (i, err) in ended {
            let r = self.spec_running.remove(i);
            if r.gone {
                self.end_spec(r, FinishReason::Abort, "abort", None, None);
            } else {
                self.end_spec_outcome(r, err);
            }
        }
        n_verified
    }

    /// The device acceptance of the verified blocks marked for it (`blocks[k].4` and a verify
    /// that worked), in one backend call; `result[k]` is block `k`'s (`None`: accepted on the
    /// host from its rows).
    #[allow(clippy::type_complexity)]
    fn accept_on_device(
        &mut self,
        blocks: &[(usize, Plan, Vec<u32>, usize, bool)],
        verified: &[Result<Rows, SpecError>],
    ) -> Vec<Option<Result<(dflash::Acceptance, usize)>>> {
        let mut out: Vec<Option<Result<(dflash::Acceptance, usize)>>> =
            (0..blocks.len()).map(|_| None).collect();
        let wanted: Vec<(usize, usize)> = blocks
            .iter()
            .zip(verified)
            .enumerate()
            .filter(|(_, (b, v))| b.4 && v.is_ok())
            .map(|(k, (b, _))| (b.0, k))
            .collect();
        if wanted.is_empty() {
            return out;
        }
        let backend = &self.backend;
        let mut specs = Vec::with_capacity(wanted.len());
        let mut rounds = Vec::with_capacity(wanted.len());
        let mut who = Vec::with_capacity(wanted.len());
        let mut next = wanted.iter().peekable();
        for (i, r) in self.spec_running.iter_mut().enumerate() {
            let Some(&&(want_i, k)) = next.peek() else {
                break;
            };
            if want_i != i {
                continue;
            }
            next.next();
            let SpecRunning { seq, stream, p, .. } = r;
            match (seq, stream.acceptance_input()) {
                (SpecSeq::Device(d), Some(input)) => {
                    specs.push(d);
                    rounds.push(super::SpecAccept {
                        input,
                        params: &p.params,
                    });
                    who.push(k);
                }
                _ => out[k] = Some(Err(anyhow!("no device acceptance for this request"))),
            }
        }
        let got = backend
            .spec_accept_batch(&mut specs, &rounds)
            .filter(|g| g.len() == who.len());
        match got {
            Some(got) => {
                for (k, a) in who.into_iter().zip(got) {
                    out[k] = Some(a);
                }
            }
            None => {
                for k in who {
                    out[k] = Some(Err(anyhow!("the device acceptance returned no result")));
                }
            }
        }
        out
    }

    /// Runs one batched call over the requests `idx` (host states through the first closure's
    /// call, device states through the second's) and returns their results in `idx` order.
    fn batched<T>(
        &mut self,
        idx: &[usize],
        call: impl FnOnce(
            &mut [&mut HostSpec<B::Sequence>],
            &mut [&mut B::Spec],
        ) -> (Vec<Result<T, SpecError>>, Vec<Result<T, SpecError>>),
    ) -> Vec<Result<T, SpecError>> {
        // Each index's position within its kind.
        let mut host: Vec<&mut HostSpec<B::Sequence>> = Vec::new();
        let mut device: Vec<&mut B::Spec> = Vec::new();
        let mut kind = Vec::with_capacity(idx.len());
        let mut want = idx.iter().copied().peekable();
        for (i, r) in self.spec_running.iter_mut().enumerate() {
            if want.peek() != Some(&i) {
                continue;
            }
            want.next();
            match &mut r.seq {
                SpecSeq::Host(h) => {
                    kind.push(true);
                    host.push(&mut **h);
                }
                SpecSeq::Device(d) => {
                    kind.push(false);
                    device.push(d);
                }
            }
        }
        let (nh, nd) = (host.len(), device.len());
        let (h, d) = call(&mut host, &mut device);
        let mut h = spread(h, nh).into_iter();
        let mut d = spread(d, nd).into_iter();
        kind.into_iter()
            .map(|is_host| {
                let next = if is_host { h.next() } else { d.next() };
                next.unwrap_or_else(|| Err(SpecError::TargetOutput("missing result".into())))
            })
            .collect()
    }
}

/// Sends the round's tokens (one event); `false` when the client is gone.
fn flush_spec<S: Executor, D>(m: &Metrics, r: &mut SpecRunning<S, D>) -> bool {
    let b = &mut r.batch;
    if b.tokens.is_empty() {
        return true;
    }
    let now = Instant::now();
    match r.last {
        None => {
            r.first = Some(now);
            m.time_to_first_token
                .observe((now - r.p.arrival).as_secs_f64());
        }
        Some(last) => m.inter_token_latency.observe((now - last).as_secs_f64()),
    }
    r.last = Some(now);
    m.generation_tokens.inc_by(b.tokens.len() as u64);
    let ev = TokenEvent {
        tokens: std::mem::take(&mut b.tokens),
        text: std::mem::take(&mut b.text),
        logprobs: std::mem::take(&mut b.logprobs),
        prompt_logprobs: Vec::new(),
        draft_tokens: std::mem::take(&mut b.draft_tokens),
        accepted_draft_tokens: std::mem::take(&mut b.accepted),
    };
    r.p.events.send(Event::Tokens(ev)).is_ok()
}

/// Counts a round's drafts and accepted drafts (request summary, metrics, the round's event).
fn record_round(m: &Metrics, summary: &mut SpecSummary, batch: &mut Batch, n: usize, a: usize) {
    summary.drafts += 1;
    summary.draft_tokens += n as u64;
    summary.accepted_tokens += a as u64;
    if summary.accepted_per_position.len() < n {
        summary.accepted_per_position.resize(n, 0);
    }
    for (k, c) in summary.accepted_per_position[..a].iter_mut().enumerate() {
        *c += 1;
        m.spec_decode_num_accepted_tokens_per_pos
            .with_label_values(&[&k.to_string()])
            .inc();
    }
    m.spec_decode_num_drafts.inc();
    m.spec_decode_num_draft_tokens.inc_by(n as u64);
    m.spec_decode_num_accepted_tokens.inc_by(a as u64);
    batch.draft_tokens += n as u32;
    batch.accepted += a as u32;
}
