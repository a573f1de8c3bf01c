//! The scheduler thread (see the module docs of `engine`).

use std::collections::VecDeque;
use std::sync::atomic::Ordering;
use std::sync::{mpsc as std_mpsc, Arc};

use std::time::{Duration, Instant};

use model::executor::Executor;
use model::sampling::{FinishReason, StopCause};
use model::tokenizer::Tokenizer;

use super::kv_blocks::{BlockPool, Cached, SeqBlocks};
use super::kv_sched::Parked;
use super::spec::{SpecConfig, SpecRunning};
use super::{
    Backend, Command, DeviceRow, EngineConfig, Event, Finished, Pending, PromptLogprob, Shared,
    TokenEvent, TokenLogprob,
};
use crate::stream::{Emitted, TokenOutput};

/// How long an idle scheduler sleeps between checks for commands.
const IDLE_WAIT: Duration = Duration::from_millis(50);

/// Most prompt tokens one `forward` call of a `prompt_logprobs` request runs (rounded down to the
/// backend's granularity): its logits rows (`tokens × vocab` floats) are held at once.
const PROMPT_LOGPROBS_CHUNK: usize = 256;

/// The entry of a prompt token under the logits row of the position before it.
fn prompt_logprob(logits: &[f32], token: u32, top: usize) -> PromptLogprob {
    // vLLM's rank: how many tokens are at least as likely (the token itself included).
    let x = logits.get(token as usize).copied().unwrap_or(f32::NAN);
    let rank = if x.is_nan() {
        logits.len()
    } else {
        logits.iter().filter(|&&y| y >= x).count()
    };
    PromptLogprob {
        logprob: TokenLogprob::of(logits, token, top),
        rank,
    }
}

/// A request being prefilled or in the running batch.
pub(super) struct Running<S> {
    pub p: Pending,
    pub seq: S,
    pub out: TokenOutput,
    /// Tokens of `fill` already in `seq` (chunked prefill).
    pub prefilled: usize,
    /// With `prompt_logprobs`: the entries of the prompt positions prefilled so far (sent with
    /// the first token).
    pub prompt_lps: Vec<PromptLogprob>,
    /// The last sampled token (decoded by the next step).
    pub next: u32,
    pub admitted: Instant,
    pub first: Option<Instant>,
    pub last: Instant,
    /// What `seq` must hold before the request decodes: the prompt, or after a preemption the
    /// prompt and the tokens generated before it (recomputed; see `kv_sched`).
    pub fill: Vec<u32>,
    /// Re-admitted after a preemption: its next token is already sampled and sent.
    pub resumed: bool,
    /// Its KV blocks (paged executors; see `kv_blocks`).
    pub blocks: SeqBlocks,
    /// KV bytes reserved at admission (executors whose KV is not paged), given back at the end.
    pub kv_reserved: u64,
}

/// `(cause, stop_reason)` in vLLM's words.
pub(super) fn describe(cause: &StopCause) -> (&'static str, Option<String>) {
    match cause {
        StopCause::Eos(t) => ("eos", Some(t.to_string())),
        StopCause::StopToken(t) => ("stop_token", Some(t.to_string())),
        StopCause::StopString(s) => ("stop_string", Some(s.clone())),
        StopCause::MaxTokens => ("max_tokens", None),
    }
}

pub(super) struct Sched<B: Backend> {
    pub backend: B,
    pub tokenizer: Option<Arc<Tokenizer>>,
    pub eos: Vec<u32>,
    pub cfg: EngineConfig,
    pub shared: Arc<Shared>,
    pub kv_used: u64,
    pub waiting: VecDeque<Pending>,
    /// Admitted requests whose prompt is not fully prefilled yet, in arrival order.
    pub prefilling: VecDeque<Running<B::Sequence>>,
    pub running: Vec<Running<B::Sequence>>,
    pub spec: Option<SpecConfig>,
    /// Speculative requests (prefilling or running), in arrival order.
    pub spec_running: Vec<SpecRunning<B::Sequence, B::Spec>>,
    /// What finished speculative requests measured (adaptive speculation starts from it).
    pub spec_prior: dflash::AdaptPrior,
    /// The KV block pool (`None`: the executor's KV is not paged; requests reserve bytes).
    pub kv: Option<BlockPool<Cached<B::Block>>>,
    /// Bytes of one KV block (for the byte reservations of speculative requests).
    pub block_bytes: u64,
    /// Requests preempted for lack of KV blocks, re-admitted first (oldest first).
    pub parked: VecDeque<Parked>,
}

#[allow(clippy::too_many_arguments)]
pub(super) fn run<B: Backend>(
    backend: B,
    tokenizer: Option<Arc<Tokenizer>>,
    eos: Vec<u32>,
    cfg: EngineConfig,
    spec: Option<SpecConfig>,
    shared: Arc<Shared>,
    rx: std_mpsc::Receiver<Command>,
    kv: Option<(BlockPool<Cached<B::Block>>, u64)>,
) {
    let (kv, block_bytes) = match kv {
        Some((pool, bytes)) => (Some(pool), bytes),
        None => (None, 1),
    };
    let mut s = Sched {
        backend,
        tokenizer,
        eos,
        cfg,
        shared,
        kv_used: 0,
        waiting: VecDeque::new(),
        prefilling: VecDeque::new(),
        running: Vec::new(),
        spec,
        spec_running: Vec::new(),
        spec_prior: dflash::AdaptPrior::default(),
        kv,
        block_bytes,
        parked: VecDeque::new(),
    };
    let mut shutdown = false;
    loop {
        let idle = s.running.is_empty()
            && s.waiting.is_empty()
            && s.prefilling.is_empty()
            && s.parked.is_empty()
            && s.spec_running.is_empty();
        if idle && shutdown {
            break;
        }
        if idle {
            match rx.recv_timeout(IDLE_WAIT) {
                Ok(c) => shutdown |= s.command(c),
                Err(std_mpsc::RecvTimeoutError::Timeout) => continue,
                Err(std_mpsc::RecvTimeoutError::Disconnected) => shutdown = true,
            }
        }
        while let Ok(c) = rx.try_recv() {
            shutdown |= s.command(c);
        }
        s.drop_disconnected();
        s.admit();
        let decoded = s.decode_step() + s.spec_step();
        s.prefill_step(decoded);
        s.update_gauges();
    }
}

impl<B: Backend> Sched<B> {
    /// Handles one command; `true` for shutdown.
    fn command(&mut self, c: Command) -> bool {
        match c {
            Command::Submit(p) => self.waiting.push_back(*p),
            Command::Abort(id) => self.abort(&id),
            Command::Shutdown => return true,
        }
        false
    }

    fn tok(&self) -> Option<&Tokenizer> {
        self.tokenizer.as_deref()
    }

    /// A waiting request leaves the queue.
    pub(super) fn unqueue(&self) {
        self.shared.waiting.fetch_sub(1, Ordering::SeqCst);
        self.shared.metrics.num_requests_waiting.dec();
    }

    /// A request ends: its id becomes free and the success counter counts it.
    pub(super) fn forget(&self, id: &str, reason: FinishReason) {
        // Counted before the id is freed, so whoever sees the request gone sees it counted.
        self.shared
            .metrics
            .request_success
            .with_label_values(&[reason.as_str()])
            .inc();
        self.shared
            .live
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(id);
    }

    fn abort(&mut self, id: &str) {
        if let Some(i) = self.waiting.iter().position(|p| p.id == id) {
            if let Some(p) = self.waiting.remove(i) {
                self.unqueue();
                self.end_waiting(p, FinishReason::Abort, None);
            }
        } else if let Some(i) = self.running.iter().position(|r| r.p.id == id) {
            let r = self.running.swap_remove(i);
            self.end_running(r, FinishReason::Abort, "abort", None, None);
        } else if let Some(i) = self.prefilling.iter().position(|r| r.p.id == id) {
            if let Some(r) = self.prefilling.remove(i) {
                self.end_running(r, FinishReason::Abort, "abort", None, None);
            }
        } else if let Some(i) = self.parked.iter().position(|r| r.p.id == id) {
            if let Some(r) = self.parked.remove(i) {
                self.end_parked(r, FinishReason::Abort, None);
            }
        } else {
            self.abort_spec(id);
        }
    }

    /// Ends a request that never ran (abort, disconnect, error).
    pub(super) fn end_waiting(&self, p: Pending, reason: FinishReason, error: Option<String>) {
        let e2e = p.arrival.elapsed();
        let _ = p.events.send(Event::Finished(Finished {
            reason,
            cause: reason.as_str().to_string(),
            stop_reason: None,
            text: String::new(),
            prompt_tokens: p.prompt.len(),
            completion_tokens: 0,
            queue: e2e,
            time_to_first_token: None,
            e2e,
            spec: None,
            error,
        }));
        self.shared
            .metrics
            .e2e_request_latency
            .observe(e2e.as_secs_f64());
        self.forget(&p.id, reason);
    }

    /// Ends a running request: final event, metrics, sequence and KV blocks (or reservation)
    /// released.
    pub(super) fn end_running(
        &mut self,
        mut r: Running<B::Sequence>,
        reason: FinishReason,
        cause: &str,
        stop_reason: Option<String>,
        error: Option<String>,
    ) {
        let times = (r.admitted, r.first, r.last);
        self.finish_request(&r.p, &mut r.out, times, reason, cause, stop_reason, error);
        self.kv_used -= r.kv_reserved;
        if let Some(pool) = &mut self.kv {
            pool.release_seq(&mut r.blocks);
        }
        self.forget(&r.p.id, reason);
        self.backend.release(r.seq);
    }

    /// The final event and metrics of an admitted request; `times`: admitted, first token,
    /// last token.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn finish_request(
        &self,
        p: &Pending,
        out: &mut TokenOutput,
        times: (Instant, Option<Instant>, Instant),
        reason: FinishReason,
        cause: &str,
        stop_reason: Option<String>,
        error: Option<String>,
    ) {
        let (admitted, first, last) = times;
        let text = match reason {
            FinishReason::Abort | FinishReason::Error => out.finish(),
            _ => String::new(),
        };
        let now = Instant::now();
        let e2e = now - p.arrival;
        let n = out.tokens().len();
        let m = &self.shared.metrics;
        m.e2e_request_latency.observe(e2e.as_secs_f64());
        if let Some(first) = first {
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
            queue: admitted - p.arrival,
            time_to_first_token: first.map(|f| f - p.arrival),
            e2e,
            spec: None,
            error,
        }));
    }

    /// Ends requests whose client went away (their event receiver was dropped).
    fn drop_disconnected(&mut self) {
        let mut i = 0;
        while i < self.waiting.len() {
            if self.waiting[i].events.is_closed() {
                if let Some(p) = self.waiting.remove(i) {
                    self.unqueue();
                    self.end_waiting(p, FinishReason::Abort, None);
                }
            } else {
                i += 1;
            }
        }
        let mut i = 0;
        while i < self.running.len() {
            if self.running[i].p.events.is_closed() {
                let r = self.running.swap_remove(i);
                self.end_running(r, FinishReason::Abort, "abort", None, None);
            } else {
                i += 1;
            }
        }
        let mut i = 0;
        while i < self.prefilling.len() {
            if self.prefilling[i].p.events.is_closed() {
                if let Some(r) = self.prefilling.remove(i) {
                    self.end_running(r, FinishReason::Abort, "abort", None, None);
                }
            } else {
                i += 1;
            }
        }
        let mut i = 0;
        while i < self.parked.len() {
            if self.parked[i].p.events.is_closed() {
                if let Some(r) = self.parked.remove(i) {
                    self.end_parked(r, FinishReason::Abort, None);
                }
            } else {
                i += 1;
            }
        }
        self.drop_disconnected_spec();
    }

    pub(super) fn active(&self) -> usize {
        self.running.len() + self.prefilling.len() + self.spec_running.len()
    }

    /// Admits preempted requests, then waiting ones, in order while the batch has room and
    /// the KV pool has the blocks of the request's uncached prompt (paged executors) or the
    /// budget its whole reservation (speculative requests, executors whose KV is not paged).
    fn admit(&mut self) {
        self.readmit_parked();
        while self.active() < self.cfg.max_running && self.parked.is_empty() {
            let Some(front) = self.waiting.front() else {
                break;
            };
            let reserve = self.reserves_bytes();
            let fits = if reserve {
                self.reservation_fits(front.kv_reserve)
            } else if self.spec.is_some() || self.backend.device_spec().is_some() {
                self.spec_fits(front)
            } else {
                self.prompt_fits(&front.prompt)
            };
            if !fits {
                break;
            }
            let Some(p) = self.waiting.pop_front() else {
                break;
            };
            self.unqueue();
            let kv_reserved = if reserve { p.kv_reserve } else { 0 };
            self.kv_used += kv_reserved;
            let m = &self.shared.metrics;
            m.request_queue_time
                .observe(p.arrival.elapsed().as_secs_f64());
            m.prompt_tokens.inc_by(p.prompt.len() as u64);
            if self.spec.is_some() || self.backend.device_spec().is_some() {
                self.start_spec(p);
                continue;
            }
            let admitted = Instant::now();
            let out = match TokenOutput::new(&p.params, &self.eos, &p.prompt, self.tok().is_some())
            {
                Ok(o) => o,
                Err(e) => {
                    self.kv_used -= kv_reserved;
                    self.end_waiting(p, FinishReason::Error, Some(e.to_string()));
                    continue;
                }
            };
            let seq = match self
                .backend
                .new_sequence(p.prompt.len() + p.params.max_tokens)
            {
                Ok(s) => s,
                Err(e) => {
                    self.kv_used -= kv_reserved;
                    let msg = format!("cannot allocate the sequence: {e:#}");
                    self.end_waiting(p, FinishReason::Error, Some(msg));
                    continue;
                }
            };
            let fill = p.prompt.clone();
            self.prefilling.push_back(Running {
                p,
                seq,
                out,
                prefilled: 0,
                prompt_lps: Vec::new(),
                next: 0,
                admitted,
                first: None,
                last: admitted,
                fill,
                resumed: false,
                blocks: SeqBlocks::default(),
                kv_reserved,
            });
        }
    }

    /// Prefills queued prompts with `max_batched_tokens − decoded` tokens (at least one chunk),
    /// in arrival order, each cut at the backend's granularity; a complete prompt samples its
    /// first token and joins the running batch. Queued speculative prompt chunks take the budget
    /// left ([`Sched::spec_prefill_step`]). A request with `prompt_logprobs` runs its
    /// chunks (at most [`PROMPT_LOGPROBS_CHUNK`] tokens) through `forward`, which returns the
    /// logits of every position, and keeps each prompt token's entry.
    fn prefill_step(&mut self, decoded: usize) {
        let g = self.backend.prefill_granularity().max(1);
        let lp_chunk = (PROMPT_LOGPROBS_CHUNK / g).max(1) * g;
        let mut budget = self.cfg.max_batched_tokens.saturating_sub(decoded).max(g);
        while budget > 0 {
            let Some(mut r) = self.prefilling.pop_front() else {
                break;
            };
            // Paged: reuse the longest cached prefix first (not with prompt logprobs, whose
            // every position's logits are wanted).
            if r.prefilled == 0 && (r.resumed || r.p.prompt_logprobs.is_none()) {
                self.adopt_cached_prefix(&mut r);
            }
            let rest = r.fill.len() - r.prefilled;
            let mut n = if rest <= budget { rest } else { budget / g * g };
            if r.p.prompt_logprobs.is_some() && !r.resumed && n > lp_chunk {
                n = lp_chunk;
            }
            // Paged: as many positions as the free blocks hold (a prefill waits, it never
            // preempts a running request).
            let room = self.block_room(&r);
            if n > room {
                n = if room >= rest { rest } else { room / g * g };
            }
            let upto = r.prefilled + n;
            if n == 0 || !self.grow_blocks(&mut r, upto) {
                self.prefilling.push_front(r);
                break;
            }
            let start = r.prefilled;
            let chunk = &r.fill[start..start + n];
            let logits = match r.p.prompt_logprobs.filter(|_| !r.resumed) {
                None => r
                    .seq
                    .prefill(chunk)
                    .map(|l| l.into_owned())
                    .map_err(anyhow::Error::new),
                Some(top) => r
                    .seq
                    .forward(chunk, &[])
                    .map_err(anyhow::Error::new)
                    .and_then(|o| {
                        let mut rows = o.logits;
                        if rows.len() != n {
                            anyhow::bail!(
                                "the executor returned {} logits rows for {n} tokens",
                                rows.len()
                            );
                        }
                        // Row j predicts prompt token start + j + 1 (the last row of the prompt
                        // predicts the first generated token).
                        for (j, row) in rows.iter().enumerate() {
                            if let Some(&t) = r.p.prompt.get(start + j + 1) {
                                r.prompt_lps.push(prompt_logprob(row, t, top));
                            }
                        }
                        rows.pop()
                            .ok_or_else(|| anyhow::anyhow!("the executor returned no logits"))
                    }),
            };
            budget -= n;
            match logits {
                Err(e) => {
                    let msg = format!("prefill failed: {e:#}");
                    self.end_running(r, FinishReason::Error, "error", None, Some(msg));
                }
                Ok(l) => {
                    r.prefilled += n;
                    self.commit_tokens(&mut r, start, n);
                    if r.prefilled < r.fill.len() {
                        self.prefilling.push_front(r);
                        break;
                    }
                    if r.resumed {
                        // Recomputed after a preemption: its next token was sampled before.
                        self.running.push(r);
                        continue;
                    }
                    for s in self.fork_same_prompt(&r) {
                        if let Some(s) = self.sample_and_emit(s, &l) {
                            self.running.push(s);
                        }
                    }
                    if let Some(r) = self.sample_and_emit(r, &l) {
                        self.running.push(r);
                    }
                }
            }
        }
        // Speculative requests' prompt chunks (a drafter makes every request speculative, so
        // the two queues are not filled at once).
        self.spec_prefill_step(budget);
    }

    /// Samples the next token of `r` from `logits` and sends it; `None` when the request ended.
    fn sample_and_emit(
        &mut self,
        mut r: Running<B::Sequence>,
        logits: &[f32],
    ) -> Option<Running<B::Sequence>> {
        let tok = self.tokenizer.clone();
        let e: Emitted = match r.out.sample(logits, tok.as_deref()) {
            Ok(e) => e,
            Err(err) => {
                self.end_running(r, FinishReason::Error, "error", None, Some(err.to_string()));
                return None;
            }
        };
        let logprobs = match r.p.logprobs {
            Some(n) => vec![TokenLogprob::of(logits, e.token, n)],
            None => Vec::new(),
        };
        self.emit(r, e, logprobs)
    }

    /// Pushes `token`, sampled on the device from `r`'s own stream, and sends it.
    fn emit_device_sampled(
        &mut self,
        mut r: Running<B::Sequence>,
        token: u32,
    ) -> Option<Running<B::Sequence>> {
        let tok = self.tokenizer.clone();
        match r.out.push_device_sampled(token, tok.as_deref()) {
            Ok(e) => self.emit(r, e, Vec::new()),
            Err(err) => {
                self.end_running(r, FinishReason::Error, "error", None, Some(err.to_string()));
                None
            }
        }
    }

    /// Sends the token `e` (with its `logprobs`) of `r`; `None` when the request ended.
    fn emit(
        &mut self,
        mut r: Running<B::Sequence>,
        e: Emitted,
        logprobs: Vec<TokenLogprob>,
    ) -> Option<Running<B::Sequence>> {
        let now = Instant::now();
        let m = &self.shared.metrics;
        match r.first {
            None => {
                r.first = Some(now);
                m.time_to_first_token
                    .observe((now - r.p.arrival).as_secs_f64());
            }
            Some(_) => m.inter_token_latency.observe((now - r.last).as_secs_f64()),
        }
        r.last = now;
        m.generation_tokens.inc();
        let sent = r.p.events.send(Event::Tokens(TokenEvent {
            tokens: vec![e.token],
            text: e.text,
            logprobs,
            prompt_logprobs: std::mem::take(&mut r.prompt_lps),
            draft_tokens: 0,
            accepted_draft_tokens: 0,
        }));
        if sent.is_err() {
            self.end_running(r, FinishReason::Abort, "abort", None, None);
            return None;
        }
        if let Some((reason, cause)) = e.finish {
            let (cause, stop_reason) = describe(&cause);
            self.end_running(r, reason, cause, stop_reason, None);
            return None;
        }
        r.next = e.token;
        Some(r)
    }

    /// One decode step over the running batch; returns the number of tokens decoded.
    fn decode_step(&mut self) -> usize {
        self.make_room_for_decode();
        if self.running.is_empty() {
            return 0;
        }
        let tokens: Vec<u32> = self.running.iter().map(|r| r.next).collect();
        self.shared.metrics.decode_steps.inc();
        // Sampling where the logits are (the GPU): only token ids come back. Not when a
        // request asks for logprobs (they need its logits on the host).
        if self.running.iter().all(|r| r.p.logprobs.is_none()) {
            let ids = {
                let n = self.running.len();
                let (mut rows, mut seqs) = (Vec::with_capacity(n), Vec::with_capacity(n));
                // (`rows` borrows each request's output, `seqs` its sequence: disjoint fields.)
                for r in self.running.iter_mut() {
                    let (params, prompt, generated, stream) = r.out.device_row();
                    rows.push(DeviceRow {
                        params,
                        prompt,
                        generated,
                        stream,
                    });
                    seqs.push(&mut r.seq);
                }
                self.backend.decode_sample_batch(&mut seqs, &tokens, &rows)
            };
            if let Some(ids) = ids {
                let batch = std::mem::take(&mut self.running);
                let n = batch.len();
                let mut ids = ids.into_iter();
                for mut r in batch {
                    match ids.next() {
                        Some(Ok(t)) => {
                            self.commit_decoded(&mut r);
                            if let Some(r) = self.emit_device_sampled(r, t) {
                                self.running.push(r);
                            }
                        }
                        Some(Err(e)) => {
                            let msg = format!("decode step failed: {e:#}");
                            self.end_running(r, FinishReason::Error, "error", None, Some(msg));
                        }
                        None => {
                            let msg =
                                format!("the executor returned too few results for {n} sequences");
                            self.end_running(r, FinishReason::Error, "error", None, Some(msg));
                        }
                    }
                }
                self.shared
                    .metrics
                    .decode_result_bytes
                    .inc_by((4 * tokens.len()) as u64);
                return tokens.len();
            }
        }
        let mut results = {
            let mut seqs: Vec<&mut B::Sequence> =
                self.running.iter_mut().map(|r| &mut r.seq).collect();
            self.backend.decode_batch(&mut seqs, &tokens)
        };
        let batch = std::mem::take(&mut self.running);
        if results.len() != batch.len() {
            let msg = format!(
                "the executor returned {} results for {} sequences",
                results.len(),
                batch.len()
            );
            results = batch
                .iter()
                .map(|_| Err(anyhow::anyhow!("{msg}")))
                .collect();
        }
        for (mut r, l) in batch.into_iter().zip(results) {
            match l {
                Ok(l) => {
                    self.shared
                        .metrics
                        .decode_result_bytes
                        .inc_by((4 * l.len()) as u64);
                    self.commit_decoded(&mut r);
                    if let Some(r) = self.sample_and_emit(r, &l) {
                        self.running.push(r);
                    }
                }
                Err(e) => {
                    let msg = format!("decode step failed: {e:#}");
                    self.end_running(r, FinishReason::Error, "error", None, Some(msg));
                }
            }
        }
        tokens.len()
    }

    fn update_gauges(&self) {
        let m = &self.shared.metrics;
        m.num_requests_running.set(self.active() as i64);
        m.kv_cache_usage_perc.set(self.kv_usage());
    }
}
