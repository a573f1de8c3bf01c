//! The engine: one scheduler thread owns the executor ([`Backend`]) and runs continuous
//! batching; front ends (gRPC, HTTP) talk to it through an [`EngineHandle`].
//!
//! # Scheduling
//! Each step the scheduler
//! 1. takes new commands (submissions, aborts) — requests join between steps;
//! 2. ends requests whose client went away (its event receiver was dropped) or that were
//!    aborted, freeing their sequence and KV reservation — within one step;
//! 3. admits waiting requests in arrival order while fewer than `max_running` run and the
//!    request's KV reservation (`kv_bytes(prompt + max_tokens)`) fits the remaining budget: a
//!    sequence is allocated (a failure — say, no device memory — ends that request with an
//!    error and nothing else) and joins the prefill queue;
//! 4. runs ONE decode step for every running sequence (batched on the CPU; one sequence after
//!    another on the GPU) and samples each with its own parameters and seed ([`TokenOutput`],
//!    the code path of `ultra generate`, so the output is the same as `ultra generate` for the
//!    same seed);
//! 5. prefills the queued prompts in arrival order with the step's remaining token budget
//!    (chunked prefill: `max_batched_tokens` minus the tokens just decoded, at least one chunk;
//!    chunks cut at the backend's granularity so the result equals one whole prefill): a long
//!    prompt is prefilled over several steps while the running streams keep decoding; when a
//!    prompt is complete its first token is sampled and the sequence joins the running batch.
//!
//! With a drafter, every request is speculative: a resumable state (`spec`) the scheduler
//! advances in step 4 — one batched drafter pass for the requests that draft this round, one
//! batched target pass for all verify blocks, then acceptance, commit and emission per request
//! (no thread per request). Its prompt is chunk-prefilled in step 5 like a plain one, with the
//! budget the verified tokens left. `EngineConfig::spec_policy` chooses fixed blocks or
//! adaptive speculation (each request picks its block size, or no drafts, by measured
//! acceptance and cost).
//!
//! Back-pressure: [`EngineHandle::submit`] refuses with [`SubmitError::QueueFull`] when
//! `max_waiting` requests already wait; [`EngineHandle::submit_all`] queues a group of requests
//! (the sequences of one API request) all together or not at all. Shutdown ([`EngineHandle::shutdown`]) refuses new
//! requests and lets the scheduler drain what was admitted or queued.

pub mod backend;
pub mod gpu;
mod kv_blocks;
mod kv_sched;
mod scheduler;
mod spec;
pub mod tp;

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc as std_mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

use model::sampling::{logprob_of, top_logprobs, FinishReason, SamplingParams};
use model::tokenizer::Tokenizer;
use tokio::sync::mpsc;

pub use backend::{Backend, CpuBackend, DeviceRow, KvBytes, NoBlock, NoDeviceSpec, SpecAccept};
pub use gpu::GpuBackend;
pub use spec::SpecConfig;

use crate::metrics::Metrics;

/// Scheduler limits.
#[derive(Debug, Clone)]
pub struct EngineConfig {
    /// The model's name in APIs (`model` fields, `/v1/models`).
    pub model_id: String,
    /// Most sequences decoded together.
    pub max_running: usize,
    /// Most requests waiting for admission; more are refused (RESOURCE_EXHAUSTED / 429).
    pub max_waiting: usize,
    /// KV-cache bytes that admitted requests may reserve together.
    pub kv_budget_bytes: u64,
    /// Prompt plus generated tokens of one request (default: the model's context length, or
    /// on the GPU the sequence size).
    pub max_context: Option<usize>,
    /// Tokens one step may run (decode tokens first, the rest prefills queued prompts in
    /// chunks; vLLM's `max_num_batched_tokens`).
    pub max_batched_tokens: usize,
    /// With a drafter: the configured block size for every round, or adaptive speculation.
    pub spec_policy: dflash::BlockPolicy,
    /// Positions per KV block of a paged executor (the CPU's; vLLM's `--block-size`).
    pub kv_block_size: usize,
    /// Automatic prefix caching (paged executors): requests reuse the cached KV blocks of
    /// their longest cached prompt prefix.
    pub prefix_caching: bool,
}

/// Default of [`EngineConfig::kv_block_size`] (vLLM's).
pub const DEFAULT_KV_BLOCK_SIZE: usize = model::cpu::kv::DEFAULT_BLOCK_SIZE;

/// Largest [`EngineConfig::kv_block_size`].
pub const MAX_KV_BLOCK_SIZE: usize = 1024;

/// Default of [`EngineConfig::max_batched_tokens`] (vLLM's for chunked prefill).
pub const DEFAULT_MAX_BATCHED_TOKENS: usize = 2048;

impl Default for EngineConfig {
    fn default() -> Self {
        EngineConfig {
            model_id: "ultra".into(),
            max_running: 16,
            max_waiting: 256,
            kv_budget_bytes: 4 << 30,
            max_context: None,
            max_batched_tokens: DEFAULT_MAX_BATCHED_TOKENS,
            spec_policy: dflash::BlockPolicy::Fixed,
            kv_block_size: DEFAULT_KV_BLOCK_SIZE,
            prefix_caching: true,
        }
    }
}

/// What a request asks for.
#[derive(Debug, Clone)]
pub struct GenerateRequest {
    /// Unique among live requests; empty: one is assigned.
    pub id: String,
    pub prompt: Vec<u32>,
    /// `max_tokens` `None`: `min(256, context − prompt)`.
    pub params: SamplingParams,
    pub max_tokens: Option<usize>,
    /// `Some(n)`: each token's log-probability and the `n` most likely (n ≤ 20).
    pub logprobs: Option<usize>,
    /// `Some(n)`: each prompt token's (after the first) log-probability, rank and the `n` most
    /// likely (n ≤ 20), computed from the logits of every prompt position and sent with the
    /// first token event (vLLM's `prompt_logprobs`). Not with speculative decoding.
    pub prompt_logprobs: Option<usize>,
}

/// Most top log-probabilities per token.
pub const MAX_TOP_LOGPROBS: usize = 20;

/// Log-probabilities of one generated token (natural log, under the model's raw distribution).
#[derive(Debug, Clone, PartialEq)]
pub struct TokenLogprob {
    pub token: u32,
    pub logprob: f64,
    pub top: Vec<(u32, f64)>,
}

/// Log-probabilities of one prompt token under the model's raw distribution after the tokens
/// before it (vLLM's `prompt_logprobs` entry).
#[derive(Debug, Clone, PartialEq)]
pub struct PromptLogprob {
    /// The prompt token, its log-probability and the most likely tokens at its position.
    pub logprob: TokenLogprob,
    /// The prompt token's rank in the vocabulary (1: the most likely; ties count as ahead).
    pub rank: usize,
}

impl TokenLogprob {
    /// `token`'s log-probability and the `top` most likely tokens under the log-softmax of the
    /// raw `logits` row it was chosen from (before penalties, temperature and filters, as
    /// vLLM's default `logprobs_mode`). Plain and speculative decoding both report this.
    pub fn of(logits: &[f32], token: u32, top: usize) -> TokenLogprob {
        TokenLogprob {
            token,
            logprob: logprob_of(logits, token),
            top: top_logprobs(logits, top),
        }
    }
}

/// Tokens one step produced for a request.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenEvent {
    pub tokens: Vec<u32>,
    /// Text that became final (see `TokenOutput`).
    pub text: String,
    /// One per token when log-probabilities were asked for.
    pub logprobs: Vec<TokenLogprob>,
    /// With `prompt_logprobs`, in the first event only: one entry per prompt token from the
    /// second on (the first token has none).
    pub prompt_logprobs: Vec<PromptLogprob>,
    /// Speculative decoding: drafts verified and accepted in this step.
    pub draft_tokens: u32,
    pub accepted_draft_tokens: u32,
}

/// Speculative-decoding totals of a request.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct SpecSummary {
    pub drafts: u64,
    pub draft_tokens: u64,
    pub accepted_tokens: u64,
    pub accepted_per_position: Vec<u64>,
    /// Plain steps (no drafts) adaptive speculation chose; not counted in `drafts`.
    pub plain_steps: u64,
    /// With adaptive speculation: what it chose.
    pub adaptive: Option<dflash::AdaptSummary>,
}

impl SpecSummary {
    /// `1 + accepted / drafts` (counts the bonus token); 0 without drafts.
    pub fn mean_acceptance_length(&self) -> f64 {
        if self.drafts == 0 {
            0.0
        } else {
            1.0 + self.accepted_tokens as f64 / self.drafts as f64
        }
    }
}

/// How a request ended.
#[derive(Debug, Clone, PartialEq)]
pub struct Finished {
    pub reason: FinishReason,
    /// `eos`, `stop_token`, `stop_string`, `max_tokens`, `abort`, `error`.
    pub cause: String,
    /// The matched stop string or stop token (vLLM's `stop_reason`).
    pub stop_reason: Option<String>,
    /// Text released at the end (held back while it could start a stop string; on abort).
    pub text: String,
    pub prompt_tokens: usize,
    pub completion_tokens: usize,
    pub queue: Duration,
    pub time_to_first_token: Option<Duration>,
    pub e2e: Duration,
    pub spec: Option<SpecSummary>,
    pub error: Option<String>,
}

/// What the engine sends back for a request, in order: token events, then one `Finished`.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    Tokens(TokenEvent),
    Finished(Finished),
}

/// A submitted request's id and its event stream. Dropping the receiver cancels the request.
pub struct Submitted {
    pub id: String,
    pub events: mpsc::UnboundedReceiver<Event>,
    pub prompt_tokens: usize,
    pub max_tokens: usize,
}

/// Why a request was refused before it ran.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum SubmitError {
    /// Malformed (empty prompt, token outside the vocabulary, bad sampling parameters,
    /// duplicate id).
    #[error("{0}")]
    Invalid(String),
    /// Prompt plus `max_tokens` exceeds the context, or one request alone exceeds the KV
    /// budget.
    #[error("{0}")]
    TooLong(String),
    /// `max_waiting` requests already wait.
    #[error("the queue is full ({0} requests waiting); retry later")]
    QueueFull(usize),
    /// The engine is shutting down.
    #[error("the server is shutting down")]
    ShuttingDown,
}

/// What the model is, for info endpoints.
#[derive(Debug, Clone)]
pub struct ModelInfo {
    pub model_id: String,
    pub architecture: String,
    pub vocab_size: usize,
    pub max_context: usize,
    pub num_layers: usize,
    pub eos_token_ids: Vec<u32>,
    pub device: String,
    pub max_running: usize,
    /// Speculative decoding block size, when a drafter runs.
    pub spec_block_size: Option<usize>,
    pub created_unix: u64,
}

pub(crate) enum Command {
    Submit(Box<Pending>),
    Abort(String),
    Shutdown,
}

/// A request on its way into the scheduler.
pub(crate) struct Pending {
    pub id: String,
    pub prompt: Vec<u32>,
    pub params: SamplingParams,
    pub logprobs: Option<usize>,
    pub prompt_logprobs: Option<usize>,
    pub events: mpsc::UnboundedSender<Event>,
    pub arrival: Instant,
    pub kv_reserve: u64,
}

/// A request that passed [`EngineHandle::submit_all`]'s checks (`params.max_tokens` resolved).
struct Checked {
    id: String,
    prompt: Vec<u32>,
    params: SamplingParams,
    logprobs: Option<usize>,
    prompt_logprobs: Option<usize>,
    kv_reserve: u64,
}

/// State shared by the handle and the scheduler.
pub(crate) struct Shared {
    pub waiting: std::sync::atomic::AtomicUsize,
    pub draining: AtomicBool,
    pub live: Mutex<HashSet<String>>,
    pub next_id: AtomicU64,
    pub metrics: Metrics,
}

/// A cheap, cloneable handle to a running engine.
#[derive(Clone)]
pub struct EngineHandle {
    tx: std_mpsc::Sender<Command>,
    shared: Arc<Shared>,
    info: Arc<ModelInfo>,
    tokenizer: Option<Arc<Tokenizer>>,
    cfg: Arc<EngineConfig>,
    kv_bytes: KvBytes,
    thread: Arc<Mutex<Option<std::thread::JoinHandle<()>>>>,
}

impl EngineHandle {
    /// Starts the scheduler thread; it builds its backend with `make` (so the executor's
    /// objects are created on, and never leave, the thread that drives them) and this returns
    /// once that succeeded (or with its error). `eos` are the ids that end generation; `spec`
    /// enables DFlash with a drafter on the host (a backend with a drafter on its own device —
    /// [`Backend::device_spec`] — needs none).
    pub fn start<B, F>(
        make: F,
        tokenizer: Option<Tokenizer>,
        eos: Vec<u32>,
        cfg: EngineConfig,
        spec: Option<SpecConfig>,
    ) -> anyhow::Result<EngineHandle>
    where
        B: Backend,
        F: FnOnce() -> anyhow::Result<B> + Send + 'static,
    {
        if cfg.max_running == 0 {
            anyhow::bail!("max_running must be at least 1");
        }
        if cfg.max_batched_tokens == 0 {
            anyhow::bail!("max_batched_tokens must be at least 1");
        }
        if !(1..=MAX_KV_BLOCK_SIZE).contains(&cfg.kv_block_size) {
            anyhow::bail!(
                "the KV block size must be 1..={MAX_KV_BLOCK_SIZE} positions, got {}",
                cfg.kv_block_size
            );
        }
        let shared = Arc::new(Shared {
            waiting: Default::default(),
            draining: AtomicBool::new(false),
            live: Mutex::new(HashSet::new()),
            next_id: AtomicU64::new(0),
            metrics: Metrics::new(&cfg.model_id)?,
        });
        let tokenizer = tokenizer.map(Arc::new);
        let (tx, rx) = std_mpsc::channel();
        let (ready_tx, ready_rx) = std_mpsc::channel::<anyhow::Result<(ModelInfo, KvBytes)>>();
        let thread = {
            let shared = shared.clone();
            let tokenizer = tokenizer.clone();
            let cfg = cfg.clone();
            let eos = eos.clone();
            std::thread::Builder::new()
                .name("ultra-scheduler".into())
                .spawn(move || {
                    let mut backend = match make() {
                        Ok(b) => b,
                        Err(e) => {
                            let _ = ready_tx.send(Err(e));
                            return;
                        }
                    };
                    if spec.is_some() && backend.device_spec().is_some() {
                        let _ = ready_tx.send(Err(anyhow::anyhow!(
                            "a drafter on the host and one on the device: give one"
                        )));
                        return;
                    }
                    let mc = backend.config();
                    let limit = backend.max_context().min(mc.max_position_embeddings);
                    let info = ModelInfo {
                        model_id: cfg.model_id.clone(),
                        architecture: format!("{:?}", mc.arch),
                        vocab_size: mc.vocab_size,
                        max_context: cfg.max_context.unwrap_or(limit).min(limit),
                        num_layers: mc.layers.len(),
                        eos_token_ids: eos.clone(),
                        device: backend.device(),
                        max_running: cfg.max_running,
                        spec_block_size: spec
                            .as_ref()
                            .map(|s| s.decoder.block_size())
                            .or(backend.device_spec().map(|o| o.block_size)),
                        created_unix: std::time::SystemTime::now()
                            .duration_since(std::time::UNIX_EPOCH)
                            .map_or(0, |d| d.as_secs()),
                    };
                    // A paged executor: one pool of blocks; a request's KV is counted in whole
                    // blocks (its reservation too, for speculative requests).
                    let mut kv_bytes = backend.kv_bytes_fn();
                    let mut pool = None;
                    if backend.use_paged_kv(cfg.kv_block_size) {
                        let bs = cfg.kv_block_size;
                        // The bytes of a paged sequence (an executor may count them differently
                        // once paged: the GPU's are its pool's, not a whole session's).
                        let block_bytes = backend.kv_bytes_fn()(bs).max(1);
                        let blocks = (cfg.kv_budget_bytes / block_bytes) as usize;
                        if let Err(e) = backend.set_kv_blocks(blocks) {
                            let _ = ready_tx.send(Err(e.context(format!(
                                "allocating the KV cache: {blocks} blocks of {bs} positions \
                                 ({} MiB; --kv-cache-mib sets it)",
                                (blocks as u64 * block_bytes) >> 20
                            ))));
                            return;
                        }
                        pool = Some((
                            kv_blocks::BlockPool::new(blocks, bs, cfg.prefix_caching),
                            block_bytes,
                        ));
                        kv_bytes = Arc::new(move |n| n.div_ceil(bs) as u64 * block_bytes);
                    }
                    if ready_tx.send(Ok((info, kv_bytes))).is_err() {
                        return;
                    }
                    scheduler::run(backend, tokenizer, eos, cfg, spec, shared, rx, pool);
                })?
        };
        let (info, kv_bytes) = match ready_rx.recv() {
            Ok(Ok(r)) => r,
            Ok(Err(e)) => {
                let _ = thread.join();
                return Err(e);
            }
            Err(_) => {
                let why = match thread.join() {
                    Err(p) => p
                        .downcast_ref::<String>()
                        .cloned()
                        .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
                        .unwrap_or_default(),
                    Ok(()) => String::new(),
                };
                anyhow::bail!("the scheduler thread failed while loading the model: {why}");
            }
        };
        Ok(EngineHandle {
            tx,
            shared,
            info: Arc::new(info),
            tokenizer,
            cfg: Arc::new(cfg),
            kv_bytes,
            thread: Arc::new(Mutex::new(Some(thread))),
        })
    }

    pub fn info(&self) -> &ModelInfo {
        &self.info
    }

    pub fn tokenizer(&self) -> Option<&Tokenizer> {
        self.tokenizer.as_deref()
    }

    pub fn metrics(&self) -> &Metrics {
        &self.shared.metrics
    }

    pub fn config(&self) -> &EngineConfig {
        &self.cfg
    }

    /// Whether shutdown has begun.
    pub fn is_draining(&self) -> bool {
        self.shared.draining.load(Ordering::SeqCst)
    }

    /// Checks and queues a request. Its events arrive on the returned receiver; dropping the
    /// receiver cancels it.
    pub fn submit(&self, req: GenerateRequest) -> Result<Submitted, SubmitError> {
        let mut subs = self.submit_all(vec![req])?;
        subs.pop()
            .ok_or_else(|| SubmitError::Invalid("no request was submitted".into()))
    }

    /// Checks and queues several requests together (the sequences of one API request: `n`
    /// samples, a list of prompts): all are queued or none is — the first refusal is returned,
    /// [`SubmitError::QueueFull`] when fewer queue slots than requests are free, and
    /// [`SubmitError::Invalid`] when there are more requests than the queue holds at all
    /// (`max_waiting`). Each request's events arrive on its own receiver, in the given order.
    pub fn submit_all(&self, reqs: Vec<GenerateRequest>) -> Result<Vec<Submitted>, SubmitError> {
        if self.is_draining() {
            return Err(SubmitError::ShuttingDown);
        }
        let k = reqs.len();
        if k == 0 {
            return Err(SubmitError::Invalid("no request to submit".into()));
        }
        if k > self.cfg.max_waiting {
            return Err(SubmitError::Invalid(format!(
                "{k} sequences in one request; this server queues at most {} (--max-waiting)",
                self.cfg.max_waiting
            )));
        }
        let mut checked = reqs
            .into_iter()
            .map(|r| self.check(r))
            .collect::<Result<Vec<_>, _>>()?;
        {
            let mut live = self.shared.live.lock().unwrap_or_else(|p| p.into_inner());
            for i in 0..k {
                if checked[i].id.is_empty() {
                    checked[i].id = self.next_request_id();
                }
                let id = &checked[i].id;
                if live.contains(id) || checked[..i].iter().any(|c| &c.id == id) {
                    return Err(SubmitError::Invalid(format!(
                        "request id {id:?} is already in use"
                    )));
                }
            }
            // Reserve the queue slots (the scheduler gives each back at admission or when its
            // request ends).
            let waiting = self.shared.waiting.fetch_add(k, Ordering::SeqCst);
            if waiting + k > self.cfg.max_waiting {
                self.shared.waiting.fetch_sub(k, Ordering::SeqCst);
                return Err(SubmitError::QueueFull(waiting));
            }
            live.extend(checked.iter().map(|c| c.id.clone()));
        }
        self.shared.metrics.num_requests_waiting.add(k as i64);
        let mut out = Vec::with_capacity(k);
        let mut rest = checked.into_iter();
        while let Some(c) = rest.next() {
            let (etx, erx) = mpsc::unbounded_channel();
            let sub = Submitted {
                id: c.id.clone(),
                events: erx,
                prompt_tokens: c.prompt.len(),
                max_tokens: c.params.max_tokens,
            };
            let id = c.id.clone();
            let pending = Pending {
                id: c.id,
                prompt: c.prompt,
                params: c.params,
                logprobs: c.logprobs,
                prompt_logprobs: c.prompt_logprobs,
                events: etx,
                arrival: Instant::now(),
                kv_reserve: c.kv_reserve,
            };
            if self.tx.send(Command::Submit(Box::new(pending))).is_err() {
                // The scheduler is gone: give back this request's slot and those of the rest
                // (the ones already sent end with the scheduler).
                for id in std::iter::once(id).chain(rest.map(|c| c.id)) {
                    self.shared.waiting.fetch_sub(1, Ordering::SeqCst);
                    self.shared.metrics.num_requests_waiting.dec();
                    self.forget(&id);
                }
                return Err(SubmitError::ShuttingDown);
            }
            out.push(sub);
        }
        Ok(out)
    }

    /// A fresh server-assigned request id (`req-N`).
    pub fn next_request_id(&self) -> String {
        format!(
            "req-{}",
            self.shared.next_id.fetch_add(1, Ordering::Relaxed)
        )
    }

    /// Checks one request: prompt, logprobs, context, sampling parameters, KV budget.
    fn check(&self, req: GenerateRequest) -> Result<Checked, SubmitError> {
        if req.prompt.is_empty() {
            return Err(SubmitError::Invalid("the prompt has no tokens".into()));
        }
        let vocab = self.info.vocab_size;
        if let Some((i, t)) = req
            .prompt
            .iter()
            .enumerate()
            .find(|(_, &t)| t as usize >= vocab)
        {
            return Err(SubmitError::Invalid(format!(
                "prompt token {i} is {t}, outside the vocabulary (size {vocab})"
            )));
        }
        for (name, n) in [
            ("top logprobs", req.logprobs),
            ("prompt logprobs", req.prompt_logprobs),
        ] {
            if let Some(n) = n.filter(|&n| n > MAX_TOP_LOGPROBS) {
                return Err(SubmitError::Invalid(format!(
                    "{name} must be at most {MAX_TOP_LOGPROBS}, got {n}"
                )));
            }
        }
        if req.prompt_logprobs.is_some() && self.info.spec_block_size.is_some() {
            return Err(SubmitError::Invalid(
                "prompt logprobs are not available with speculative decoding on this server".into(),
            ));
        }
        let ctx = self.info.max_context;
        let plen = req.prompt.len();
        if plen >= ctx {
            return Err(SubmitError::TooLong(format!(
                "the prompt has {plen} tokens; this model's maximum context length is {ctx} tokens"
            )));
        }
        let max_tokens = match req.max_tokens {
            Some(0) => return Err(SubmitError::Invalid("max_tokens must be at least 1".into())),
            Some(m) if plen + m > ctx => {
                return Err(SubmitError::TooLong(format!(
                    "this model's maximum context length is {ctx} tokens; the request asks for {} \
                     ({plen} in the prompt, {m} to generate)",
                    plen + m
                )))
            }
            Some(m) => m,
            None => model::sampling::DEFAULT_MAX_TOKENS.min(ctx - plen),
        };
        let mut params = req.params;
        params.max_tokens = max_tokens;
        params
            .validate()
            .map_err(|e| SubmitError::Invalid(e.to_string()))?;
        if params.stop_token_ids.iter().any(|&t| t as usize >= vocab) {
            return Err(SubmitError::Invalid(format!(
                "stop_token_ids must be below the vocabulary size {vocab}"
            )));
        }
        let kv_reserve = (self.kv_bytes)(plen + max_tokens);
        if kv_reserve > self.cfg.kv_budget_bytes {
            return Err(SubmitError::TooLong(format!(
                "the request needs {kv_reserve} bytes of KV cache ({} tokens); the budget is {} bytes",
                plen + max_tokens,
                self.cfg.kv_budget_bytes
            )));
        }
        Ok(Checked {
            id: req.id,
            prompt: req.prompt,
            params,
            logprobs: req.logprobs,
            prompt_logprobs: req.prompt_logprobs,
            kv_reserve,
        })
    }

    fn forget(&self, id: &str) {
        self.shared
            .live
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(id);
    }

    /// Cancels a live request; `false` when no live request has that id. Its stream ends with
    /// finish reason `abort` within one step.
    pub fn abort(&self, id: &str) -> bool {
        let found = self
            .shared
            .live
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .contains(id);
        if found {
            let _ = self.tx.send(Command::Abort(id.to_string()));
        }
        found
    }

    /// Cancels every live request (a drain's deadline); returns how many. Their streams end
    /// with finish reason `abort` within one step.
    pub fn abort_all(&self) -> usize {
        let ids: Vec<String> = self
            .shared
            .live
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .cloned()
            .collect();
        for id in &ids {
            let _ = self.tx.send(Command::Abort(id.clone()));
        }
        ids.len()
    }

    /// Requests waiting for admission and live requests (waiting + running).
    pub fn load(&self) -> (usize, usize) {
        let live = self
            .shared
            .live
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .len();
        (self.shared.waiting.load(Ordering::SeqCst), live)
    }

    /// Refuses new requests, lets the scheduler finish every admitted and queued one, and waits
    /// for it to exit (blocking: call from a blocking context).
    pub fn shutdown(&self) {
        self.shared.draining.store(true, Ordering::SeqCst);
        let _ = self.tx.send(Command::Shutdown);
        let thread = self.thread.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(t) = thread {
            let _ = t.join();
        }
    }
}
