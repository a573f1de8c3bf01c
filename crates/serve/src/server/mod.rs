//! `ultra serve`: the gRPC service (`ultra.v1.Engine` + `grpc.health.v1` + reflection) and the
//! OpenAI-compatible HTTP API over one [`EngineHandle`], behind one connection layer
//! ([`conn`]: connection cap, header-read / body-read / idle timeouts, API key, CORS, `Host`
//! check, request size limits).
//!
//! Both listeners are bound before the model loads: meanwhile `/health` answers 503, the gRPC
//! health service says `NOT_SERVING` and requests get 503 / `UNAVAILABLE`. Shutdown
//! ([`Server::shutdown`], or SIGINT / SIGTERM in `ultra serve`) drains and always ends: new
//! requests are refused (503 / `UNAVAILABLE`, `/health` 503, gRPC health `NOT_SERVING`) while
//! the listeners keep answering, running and queued requests finish, idle connections are
//! closed; after [`Limits::shutdown_timeout`] the remaining requests are aborted (their streams
//! end with finish reason `abort`), then every connection is closed and the scheduler stops.
//!
//! Request ids are private: the engine id of every request is namespaced by where it came from
//! (an HTTP request gets a random id; a gRPC request's id is prefixed with its connection), so
//! a client's `x-request-id` / `request_id` can never collide with, or abort, another client's
//! request. Ids the server assigns are 128-bit random.

pub mod conn;
pub mod fuzz;
pub mod grpc;
pub mod http;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use model::tokenizer::ChatMessage;
use tokio::sync::{watch, Semaphore};

use crate::commands::generate;
use crate::engine::{CpuBackend, EngineConfig, EngineHandle, GpuBackend, SpecConfig, SubmitError};
use crate::metrics::ServerMetrics;

/// Most stop strings one request may give (OpenAI allows 4).
pub const MAX_STOP_STRINGS: usize = 16;
/// Longest stop string, in bytes.
pub const MAX_STOP_STRING_BYTES: usize = 256;
/// Most stop token ids one request may give.
pub const MAX_STOP_TOKEN_IDS: usize = 256;
/// Prompt text bytes tokenized at once across all requests (a larger prompt waits for the
/// others, then runs alone): bounds the tokenizer's working memory.
pub const TOKENIZE_BUDGET_BYTES: usize = 512 << 10;

/// Connection, timeout and size limits of both front ends.
#[derive(Debug, Clone)]
pub struct Limits {
    /// How long a drain waits for running requests before aborting them.
    pub shutdown_timeout: Duration,
    /// Time for a request's headers to arrive (HTTP/1: also between keep-alive requests'
    /// first byte and the end of the head; gRPC: a new connection's first call).
    pub header_read_timeout: Duration,
    /// Time for a request body to arrive in full (both APIs).
    pub body_read_timeout: Duration,
    /// A connection with no request in flight for this long is closed (HTTP keep-alive and
    /// gRPC / HTTP/2 connections alike).
    pub idle_timeout: Duration,
    /// Open connections over both ports; more are refused (HTTP: a 503 answer, gRPC: closed).
    /// `None`: sized from the open-file limit ([`default_max_connections`]).
    pub max_connections: Option<usize>,
    /// Largest request body (HTTP JSON body, gRPC message), in bytes.
    pub max_request_bytes: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            shutdown_timeout: Duration::from_secs(30),
            header_read_timeout: Duration::from_secs(10),
            body_read_timeout: Duration::from_secs(30),
            idle_timeout: Duration::from_secs(60),
            max_connections: None,
            max_request_bytes: 4 << 20,
        }
    }
}

impl Limits {
    /// Refuses zero and absurd values, naming the flag.
    pub fn validate(&self) -> Result<()> {
        let secs = |name: &str, d: Duration, max: u64| -> Result<()> {
            if d.is_zero() {
                bail!("{name} must be more than 0 seconds");
            }
            if d > Duration::from_secs(max) {
                bail!("{name} must be at most {max} seconds, got {}", d.as_secs());
            }
            Ok(())
        };
        secs("--shutdown-timeout", self.shutdown_timeout, 24 * 3600)?;
        secs("--header-read-timeout", self.header_read_timeout, 3600)?;
        secs("--body-read-timeout", self.body_read_timeout, 3600)?;
        secs("--idle-timeout", self.idle_timeout, 24 * 3600)?;
        if self.max_request_bytes < 1024 {
            bail!(
                "--max-request-bytes must be at least 1024, got {}",
                self.max_request_bytes
            );
        }
        if self.max_request_bytes > 1 << 30 {
            bail!(
                "--max-request-bytes must be at most 1 GiB, got {}",
                self.max_request_bytes
            );
        }
        if let Some(n) = self.max_connections {
            let limit = conn::open_file_limit();
            if n == 0 {
                bail!("--max-connections must be at least 1");
            }
            if n > limit.saturating_sub(32) {
                bail!(
                    "--max-connections {n} needs more open files than this process may have \
                     ({limit}; raise `ulimit -n` or lower --max-connections)"
                );
            }
        }
        Ok(())
    }

    /// The connection cap in force.
    pub fn connections(&self) -> usize {
        self.max_connections
            .unwrap_or_else(|| default_max_connections(conn::open_file_limit()))
    }
}

/// The default connection cap for an open-file limit: the limit less a reserve for the
/// process's own files (a quarter, 32 to 256), at most 10,000.
pub fn default_max_connections(nofile: usize) -> usize {
    let reserve = (nofile / 4).clamp(32, 256);
    nofile.saturating_sub(reserve).clamp(1, 10_000)
}

/// Who may call: an API key (both APIs; `/health`, `/metrics` and gRPC health exempt) and the
/// browser origins allowed cross-origin access to the HTTP API.
#[derive(Debug, Clone, Default)]
pub struct Security {
    pub api_key: Option<String>,
    /// Exact origins (`https://app.example`), or `*` for any; empty: no cross-origin access.
    pub allowed_origins: Vec<String>,
}

/// Where to listen, and how.
#[derive(Debug, Clone)]
pub struct ServeOptions {
    pub grpc_addr: SocketAddr,
    pub http_addr: SocketAddr,
    pub limits: Limits,
    pub security: Security,
}

impl ServeOptions {
    /// Both APIs on these addresses with the default limits and no API key.
    pub fn new(grpc_addr: SocketAddr, http_addr: SocketAddr) -> Self {
        ServeOptions {
            grpc_addr,
            http_addr,
            limits: Limits::default(),
            security: Security::default(),
        }
    }
}

/// State of the front door shared by both APIs and every connection.
pub struct Front {
    pub limits: Limits,
    pub security: Security,
    /// The HTTP port when the HTTP API is bound to a loopback address: `Host` must then name
    /// loopback (DNS-rebinding protection).
    pub loopback_http_port: Option<u16>,
    draining: AtomicBool,
    inflight: AtomicUsize,
    pub metrics: ServerMetrics,
    conn_slots: Arc<Semaphore>,
    tokenize_budget: Semaphore,
    /// Graceful close of every connection (drain began).
    drain_tx: watch::Sender<bool>,
    /// Close every connection now (drain ended).
    close_tx: watch::Sender<bool>,
}

impl Front {
    fn new(
        limits: Limits,
        security: Security,
        loopback_http_port: Option<u16>,
    ) -> Result<Arc<Front>> {
        let max_connections = limits.connections();
        Ok(Arc::new(Front {
            loopback_http_port,
            limits,
            security,
            draining: AtomicBool::new(false),
            inflight: AtomicUsize::new(0),
            metrics: ServerMetrics::new()?,
            conn_slots: Arc::new(Semaphore::new(max_connections)),
            tokenize_budget: Semaphore::new(TOKENIZE_BUDGET_BYTES),
            drain_tx: watch::channel(false).0,
            close_tx: watch::channel(false).0,
        }))
    }

    /// Whether a drain has begun.
    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::SeqCst)
    }

    /// Requests (HTTP requests, gRPC calls) whose responses are not finished.
    pub fn inflight(&self) -> usize {
        self.inflight.load(Ordering::SeqCst)
    }
}

/// What the front ends share: the engine once loaded, and the front door.
#[derive(Clone)]
pub struct AppState {
    engine: Arc<OnceLock<EngineHandle>>,
    load_error: Arc<OnceLock<String>>,
    /// Longest token of the vocabulary in bytes (computed once the engine is up): a prompt of
    /// `b` bytes has at least `b / max_token_bytes` tokens.
    max_token_bytes: Arc<OnceLock<usize>>,
    model_id: String,
    front: Arc<Front>,
}

/// Why a front end cannot take a request now.
#[derive(Debug, Clone, PartialEq)]
pub enum Unavailable {
    Loading,
    LoadFailed(String),
    Draining,
}

impl std::fmt::Display for Unavailable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Unavailable::Loading => f.write_str("Loading model"),
            Unavailable::LoadFailed(e) => write!(f, "the model failed to load: {e}"),
            Unavailable::Draining => f.write_str("the server is shutting down"),
        }
    }
}

impl AppState {
    /// The engine, or why there is none yet.
    pub fn engine(&self) -> Result<&EngineHandle, Unavailable> {
        match (self.engine.get(), self.load_error.get()) {
            (Some(e), _) => Ok(e),
            (None, Some(err)) => Err(Unavailable::LoadFailed(err.clone())),
            (None, None) => Err(Unavailable::Loading),
        }
    }

    /// The engine when it takes new requests (not loading, not draining).
    pub fn admitting(&self) -> Result<&EngineHandle, Unavailable> {
        if self.front.is_draining() {
            return Err(Unavailable::Draining);
        }
        self.engine()
    }

    pub fn model_id(&self) -> &str {
        &self.model_id
    }

    pub fn front(&self) -> &Front {
        &self.front
    }
}

/// A request's input before tokenization.
#[derive(Debug, Clone)]
pub enum Input {
    Text(String),
    Tokens(Vec<u32>),
    Chat(Vec<ChatMessage>),
}

impl Input {
    /// Bytes of text the tokenizer would read.
    fn text_bytes(&self) -> usize {
        match self {
            Input::Text(t) => t.len(),
            Input::Tokens(_) => 0,
            Input::Chat(m) => m.iter().map(|m| m.content.len() + m.role.len()).sum(),
        }
    }
}

/// A fresh 128-bit random id (hex), from the thread's CSPRNG: unguessable.
pub fn random_id() -> String {
    format!("{:032x}", rand::random::<u128>())
}

/// Checks the stop conditions' sizes ([`MAX_STOP_STRINGS`] strings of at most
/// [`MAX_STOP_STRING_BYTES`] bytes, [`MAX_STOP_TOKEN_IDS`] ids), so that matching them costs
/// every client little.
pub fn check_stops(strings: &[String], ids: &[u32]) -> Result<(), SubmitError> {
    if strings.len() > MAX_STOP_STRINGS {
        return Err(SubmitError::Invalid(format!(
            "at most {MAX_STOP_STRINGS} stop strings, got {}",
            strings.len()
        )));
    }
    if let Some(s) = strings.iter().find(|s| s.len() > MAX_STOP_STRING_BYTES) {
        return Err(SubmitError::Invalid(format!(
            "a stop string is at most {MAX_STOP_STRING_BYTES} bytes, got one of {}",
            s.len()
        )));
    }
    if ids.len() > MAX_STOP_TOKEN_IDS {
        return Err(SubmitError::Invalid(format!(
            "at most {MAX_STOP_TOKEN_IDS} stop token ids, got {}",
            ids.len()
        )));
    }
    Ok(())
}

/// Token ids of `input` (text with the tokenizer's special tokens; chat through the chat
/// template with the generation prompt, as `ultra generate --chat`).
pub fn tokenize(engine: &EngineHandle, input: &Input) -> Result<Vec<u32>, SubmitError> {
    let tok = || {
        engine.tokenizer().ok_or_else(|| {
            SubmitError::Invalid("the model has no tokenizer: send token ids".into())
        })
    };
    match input {
        Input::Tokens(ids) => Ok(ids.clone()),
        Input::Text(t) => tok()?
            .encode(t, true)
            .map_err(|e| SubmitError::Invalid(format!("tokenizing the prompt: {e}"))),
        Input::Chat(msgs) => {
            if msgs.is_empty() {
                return Err(SubmitError::Invalid("messages is empty".into()));
            }
            let tok = tok()?;
            let text = tok
                .apply_chat_template(msgs, true)
                .map_err(|e| SubmitError::Invalid(format!("applying the chat template: {e}")))?;
            tok.encode(&text, false)
                .map_err(|e| SubmitError::Invalid(format!("tokenizing the chat: {e}")))
        }
    }
}

/// The longest token of `engine`'s vocabulary in bytes (its string form, an upper bound of the
/// input bytes one token covers for byte-level and SentencePiece tokenizers alike).
fn max_token_bytes(engine: &EngineHandle) -> usize {
    let Some(tok) = engine.tokenizer() else {
        return usize::MAX;
    };
    let inner = tok.inner();
    let longest = inner
        .get_vocab(true)
        .keys()
        .map(|k| k.len())
        .max()
        .unwrap_or(1);
    longest.max(1)
}

impl AppState {
    /// [`tokenize`] off the async runtime: the prompt's byte length is checked against the
    /// context first (a prompt of `b` bytes has at least `b / longest token` tokens), and
    /// prompts share a byte budget ([`TOKENIZE_BUDGET_BYTES`]) so that the tokenizer's working
    /// memory stays bounded however many arrive at once.
    pub async fn tokenize(
        &self,
        engine: &EngineHandle,
        input: Input,
    ) -> Result<Vec<u32>, SubmitError> {
        if let Input::Tokens(ids) = input {
            return Ok(ids);
        }
        let bytes = input.text_bytes();
        let per_token = *self.max_token_bytes.get_or_init(|| max_token_bytes(engine));
        let ctx = engine.info().max_context;
        // Special tokens and the chat template add a few; they never lower the count.
        let least = bytes / per_token;
        if least >= ctx {
            return Err(SubmitError::TooLong(format!(
                "the prompt has {bytes} bytes, so at least {least} tokens; this model's maximum \
                 context length is {ctx} tokens"
            )));
        }
        let want = bytes.clamp(1, TOKENIZE_BUDGET_BYTES) as u32;
        let _permit = self
            .front
            .tokenize_budget
            .acquire_many(want)
            .await
            .map_err(|_| SubmitError::ShuttingDown)?;
        let engine = engine.clone();
        tokio::task::spawn_blocking(move || tokenize(&engine, &input))
            .await
            .map_err(|e| SubmitError::Invalid(format!("tokenizing failed: {e}")))?
    }

    /// Runs `f` — work on `bytes` bytes of a request (parsing a large JSON body) — on a
    /// blocking thread within the shared byte budget ([`TOKENIZE_BUDGET_BYTES`]), so that
    /// many large requests at once are handled one core at a time and the async workers
    /// (`/health`) keep a core.
    pub async fn heavy<T: Send + 'static>(
        &self,
        bytes: usize,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> Result<T, String> {
        let want = bytes.clamp(1, TOKENIZE_BUDGET_BYTES) as u32;
        let _permit = self
            .front
            .tokenize_budget
            .acquire_many(want)
            .await
            .map_err(|_| "the server is shutting down".to_string())?;
        self.blocking(f).await
    }

    /// Runs `f` (tokenizer work bounded by the request size) on a blocking thread.
    pub async fn blocking<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> Result<T, String> {
        tokio::task::spawn_blocking(f)
            .await
            .map_err(|e| format!("a tokenizer task failed: {e}"))
    }
}

/// Checks what a server must be able to do before it says ready: the chat template compiles
/// and renders a one-message chat (a broken template is the operator's fault, reported at
/// load, not every client's).
pub fn check_loaded(engine: &EngineHandle) -> Result<()> {
    if let Some(tok) = engine.tokenizer() {
        if tok.has_chat_template() {
            tok.apply_chat_template(&[ChatMessage::user("hello")], true)
                .context("the checkpoint's chat template does not work")?;
        }
    }
    Ok(())
}

/// Loads a checkpoint (and a drafter) on the CPU and starts the engine.
pub fn load_cpu_engine(
    model_dir: &Path,
    draft: Option<&Path>,
    block_size: Option<usize>,
    cfg: EngineConfig,
) -> Result<EngineHandle> {
    let mut loaded = generate::load(model_dir)?;
    let spec = match draft {
        Some(d) => Some(SpecConfig {
            decoder: Arc::new(generate::spec_decoder(&loaded, d, block_size)?),
        }),
        None => None,
    };
    let eos = generate::eos_ids(&loaded);
    let tokenizer = loaded.tokenizer.take();
    let model = loaded.into_cpu()?;
    EngineHandle::start(
        move || Ok(CpuBackend::new(model)),
        tokenizer,
        eos,
        cfg,
        spec,
    )
}

/// Loads a checkpoint (and a drafter) and starts the engine on GPU `ordinal`: the config and
/// the tokenizer are read here; the weights go straight from the mapped files to the device
/// (`generate::load_gpu_weights`, as `ultra generate --device cuda`: no CPU model) and the
/// drafter is uploaded, both by the scheduler thread, which owns the GPU objects. Sequences hold
/// `cfg.max_context` positions (default: the model's context, at most
/// [`generate::GPU_MAX_SEQ`], as `ultra generate --device cuda`); `max_running` finished
/// sequences are kept for reuse.
pub fn load_gpu_engine(
    model_dir: &Path,
    draft: Option<&Path>,
    block_size: Option<usize>,
    cfg: EngineConfig,
    ordinal: usize,
) -> Result<EngineHandle> {
    let config = model::load::load_config(model_dir)
        .with_context(|| format!("loading {}", model_dir.display()))?;
    let tokenizer = generate::load_tokenizer(model_dir)?;
    let eos = generate::eos_ids_of(tokenizer.as_ref(), &config);
    let dir = model_dir.to_path_buf();
    let draft = draft.map(Path::to_path_buf);
    let (max_context, pool) = (cfg.max_context, cfg.max_running);
    EngineHandle::start(
        move || {
            // Without the tokenizer (it is the engine's): the drafter's loop options take the
            // config's EOS ids, as they always did here.
            let loaded = generate::load_gpu_weights(&dir, ordinal)?;
            let drafter = match &draft {
                Some(d) => Some(generate::gpu_spec_setup(&loaded, d, block_size)?),
                None => None,
            };
            let Some(gpu) = loaded.gpu else {
                bail!("the model is not on the GPU");
            };
            let default = generate::gpu_max_seq(&gpu);
            let max_seq = max_context
                .unwrap_or(default)
                .min(gpu.config().max_position_embeddings);
            GpuBackend::new(gpu, max_seq, drafter, pool)
        },
        tokenizer,
        eos,
        cfg,
        None,
    )
}

/// Loads a checkpoint sharded over tensor-parallel GPU ranks placed by `placement` and starts
/// the engine: plain decoding, or with `draft` DFlash speculative decoding with the drafter on
/// rank 0's GPU (block size `block_size` or the drafter's). As [`load_gpu_engine`], the config
/// and tokenizer are read here and the weights are sliced and uploaded (and the drafter loaded)
/// by the scheduler thread, which owns the GPU objects.
pub fn load_tp_engine(
    model_dir: &Path,
    draft: Option<&Path>,
    block_size: Option<usize>,
    cfg: EngineConfig,
    opts: tilert::exec::tp::TpOptions,
    placement: tilert::exec::tp::RankPlacement,
) -> Result<EngineHandle> {
    let config = model::load::load_config(model_dir)
        .with_context(|| format!("loading {}", model_dir.display()))?;
    let tokenizer = generate::load_tokenizer(model_dir)?;
    let eos = generate::eos_ids_of(tokenizer.as_ref(), &config);
    let dir = model_dir.to_path_buf();
    let draft = draft.map(Path::to_path_buf);
    let max_context = cfg.max_context;
    let pool = cfg.max_running;
    EngineHandle::start(
        move || {
            let loaded = generate::load_gpu_tp(&dir, opts, &placement)?;
            let drafter = match &draft {
                Some(d) => Some(generate::tp_spec_setup(&loaded, d, block_size)?),
                None => None,
            };
            let Some(tp) = loaded.tp else {
                bail!("the model is not on the tensor-parallel ranks");
            };
            let default = generate::tp_max_seq(&tp.model);
            let max_seq = max_context
                .unwrap_or(default)
                .min(tp.model.config().max_position_embeddings);
            crate::engine::tp::TpBackend::with_drafter(tp.model, max_seq, drafter, pool)
        },
        tokenizer,
        eos,
        cfg,
        None,
    )
}

/// The model's API name: the checkpoint directory's last two components (`qwen3-moe/native`).
pub fn default_model_id(dir: &Path) -> String {
    let parts: Vec<String> = dir
        .components()
        .rev()
        .take(2)
        .map(|c| c.as_os_str().to_string_lossy().into_owned())
        .collect();
    let id: PathBuf = parts.iter().rev().collect();
    id.to_string_lossy().into_owned()
}

/// The HTTP router as the connection layer serves it.
fn http_service(state: AppState) -> conn::Svc {
    tower::util::BoxCloneService::new(
        tower::ServiceExt::<axum::http::Request<conn::BoxBody>>::map_response(
            http::router(state),
            |r: axum::http::Response<axum::body::Body>| r.map(conn::box_axum),
        ),
    )
}

/// The gRPC routes as the connection layer serves them.
fn grpc_service(
    state: AppState,
    health: tonic_health::pb::health_server::HealthServer<
        impl tonic_health::pb::health_server::Health,
    >,
) -> Result<conn::Svc> {
    Ok(tower::util::BoxCloneService::new(tower::ServiceExt::<
        axum::http::Request<conn::BoxBody>,
    >::map_response(
        grpc::routes(state, health)?,
        |r: axum::http::Response<tonic::body::Body>| {
            r.map(|b| {
                http_body_util::BodyExt::boxed_unsync(http_body_util::BodyExt::map_err(
                    b,
                    conn::BodyError::new,
                ))
            })
        },
    )))
}

/// A running server.
pub struct Server {
    pub grpc_addr: SocketAddr,
    pub http_addr: SocketAddr,
    state: AppState,
    health: tonic_health::server::HealthReporter,
    tasks: Vec<tokio::task::JoinHandle<Result<()>>>,
    loader: tokio::task::JoinHandle<()>,
}

/// How a drain ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Drained {
    /// Requests still running at the deadline, aborted.
    pub aborted: usize,
}

impl Server {
    /// Binds both listeners, starts serving, and loads the engine with `load` on a blocking
    /// thread (requests get 503 / UNAVAILABLE until it returns).
    pub async fn start(
        opts: ServeOptions,
        model_id: String,
        load: impl FnOnce() -> Result<EngineHandle> + Send + 'static,
    ) -> Result<Server> {
        opts.limits.validate()?;
        let grpc_listener = tokio::net::TcpListener::bind(opts.grpc_addr)
            .await
            .with_context(|| format!("binding the gRPC address {}", opts.grpc_addr))?;
        let http_listener = tokio::net::TcpListener::bind(opts.http_addr)
            .await
            .with_context(|| format!("binding the HTTP address {}", opts.http_addr))?;
        let grpc_addr = grpc_listener.local_addr()?;
        let http_addr = http_listener.local_addr()?;
        let front = Front::new(
            opts.limits,
            opts.security,
            http_addr.ip().is_loopback().then_some(http_addr.port()),
        )?;
        let state = AppState {
            engine: Arc::new(OnceLock::new()),
            load_error: Arc::new(OnceLock::new()),
            max_token_bytes: Arc::new(OnceLock::new()),
            model_id,
            front: front.clone(),
        };
        let (health, health_svc) = tonic_health::server::health_reporter();
        health
            .set_not_serving::<crate::proto::v1::engine_server::EngineServer<grpc::GrpcService>>()
            .await;
        let http_svc = http_service(state.clone());
        let grpc_svc = grpc_service(state.clone(), health_svc)?;
        let tasks = vec![
            tokio::spawn(conn::accept_loop(
                grpc_listener,
                conn::Api::Grpc,
                front.clone(),
                grpc_svc,
            )),
            tokio::spawn(conn::accept_loop(
                http_listener,
                conn::Api::Http,
                front.clone(),
                http_svc,
            )),
        ];
        let loader = {
            let state = state.clone();
            let health = health.clone();
            tokio::spawn(async move {
                let loaded = tokio::task::spawn_blocking(move || {
                    let engine = load()?;
                    if let Err(e) = check_loaded(&engine) {
                        engine.shutdown();
                        return Err(e);
                    }
                    Ok(engine)
                })
                .await;
                match loaded {
                    Ok(Ok(engine)) => {
                        let _ = state.engine.set(engine);
                        if !state.front.is_draining() {
                            health
                                .set_serving::<crate::proto::v1::engine_server::EngineServer<grpc::GrpcService>>()
                                .await;
                        }
                    }
                    Ok(Err(e)) => {
                        let _ = state.load_error.set(format!("{e:#}"));
                    }
                    Err(e) => {
                        let _ = state.load_error.set(format!("the loader panicked: {e}"));
                    }
                }
            })
        };
        Ok(Server {
            grpc_addr,
            http_addr,
            state,
            health,
            tasks,
            loader,
        })
    }

    pub fn state(&self) -> &AppState {
        &self.state
    }

    /// Waits until the model is loaded (or failed to load).
    pub async fn ready(&self) -> Result<()> {
        loop {
            match self.state.engine() {
                Ok(_) => return Ok(()),
                Err(Unavailable::LoadFailed(e)) => bail!("{e}"),
                Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
            }
        }
    }

    /// Starts a drain: new requests get 503 / UNAVAILABLE (the listeners keep answering),
    /// `/health` 503, gRPC health NOT_SERVING; idle connections are closed, busy ones after
    /// their requests.
    pub async fn begin_drain(&self) {
        let front = &self.state.front;
        if front.draining.swap(true, Ordering::SeqCst) {
            return;
        }
        self.health
            .set_not_serving::<crate::proto::v1::engine_server::EngineServer<grpc::GrpcService>>()
            .await;
        front.drain_tx.send_replace(true);
    }

    /// Drains and stops (see the module doc): waits up to the shutdown timeout for running
    /// requests and in-flight responses, aborts what is left, closes every connection and
    /// stops the scheduler. Never waits on a connection that has no request in flight, nor on
    /// a model still loading.
    pub async fn shutdown(self) -> Result<Drained> {
        self.begin_drain().await;
        let front = self.state.front.clone();
        let deadline = Instant::now() + front.limits.shutdown_timeout;
        let engine = self.state.engine.get().cloned();
        // The engine refuses new work and finishes what it holds; its thread is joined below.
        let stopper = engine
            .clone()
            .map(|e| tokio::task::spawn_blocking(move || e.shutdown()));
        let busy = |engine: &Option<EngineHandle>| {
            front.inflight() > 0 || engine.as_ref().is_some_and(|e| e.load().1 > 0)
        };
        while busy(&engine) && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let mut aborted = 0;
        if busy(&engine) {
            if let Some(e) = &engine {
                aborted = e.abort_all();
            }
            // The aborted streams end with finish reason "abort": give them a moment to go out.
            let grace = Instant::now() + Duration::from_millis(500);
            while busy(&engine) && Instant::now() < grace {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
        front.close_tx.send_replace(true);
        for t in self.tasks {
            match tokio::time::timeout(Duration::from_millis(500), t).await {
                Ok(r) => r??,
                Err(_) => bail!("a listener did not stop"),
            }
        }
        if let Some(s) = stopper {
            // A scheduler step in progress finishes first; do not hang on a stuck one.
            let _ = tokio::time::timeout(Duration::from_millis(500), s).await;
        }
        self.loader.abort();
        Ok(Drained { aborted })
    }
}

/// SIGINT / SIGTERM: the first completes [`Signals::first`]; a second one exits the process at
/// once with status 128 + the signal number.
pub struct Signals {
    rx: watch::Receiver<Option<i32>>,
}

impl Signals {
    /// Installs the handlers (call before loading, so a signal while loading is seen).
    pub fn install() -> Result<Signals> {
        let (tx, rx) = watch::channel(None);
        #[cfg(unix)]
        {
            use tokio::signal::unix::{signal, SignalKind};
            let mut term = signal(SignalKind::terminate()).context("installing SIGTERM")?;
            let mut int = signal(SignalKind::interrupt()).context("installing SIGINT")?;
            tokio::spawn(async move {
                let mut seen = 0;
                loop {
                    let signo = tokio::select! {
                        _ = term.recv() => libc::SIGTERM,
                        _ = int.recv() => libc::SIGINT,
                    };
                    seen += 1;
                    if seen > 1 {
                        eprintln!("ultra serve: second signal: exiting now");
                        std::process::exit(128 + signo);
                    }
                    tx.send_replace(Some(signo));
                }
            });
        }
        #[cfg(not(unix))]
        tokio::spawn(async move {
            let mut seen = 0;
            loop {
                if tokio::signal::ctrl_c().await.is_err() {
                    return;
                }
                seen += 1;
                if seen > 1 {
                    std::process::exit(130);
                }
                tx.send_replace(Some(2));
            }
        });
        Ok(Signals { rx })
    }

    /// Completes with the first signal's number.
    pub async fn first(&mut self) -> i32 {
        loop {
            if let Some(s) = *self.rx.borrow() {
                return s;
            }
            if self.rx.changed().await.is_err() {
                return std::future::pending().await;
            }
        }
    }
}
