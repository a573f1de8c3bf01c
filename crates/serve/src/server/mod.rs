//! `ultra serve`: the gRPC service (`ultra.v1.Engine` + `grpc.health.v1` + reflection) and the
//! OpenAI-compatible HTTP API over one [`EngineHandle`].
//!
//! Both listeners are bound before the model loads: meanwhile `/health` answers 503, the gRPC
//! health service says `NOT_SERVING` and requests get 503 / `UNAVAILABLE`. Shutdown
//! ([`Server::shutdown`], or SIGINT / SIGTERM in `ultra serve`) drains: new requests are
//! refused, running and queued ones finish and their streams complete, then the servers and
//! the scheduler exit.

pub mod grpc;
pub mod http;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};

use anyhow::{bail, Context, Result};
use model::tokenizer::ChatMessage;
use tokio::sync::watch;

use crate::commands::generate;
use crate::engine::{CpuBackend, EngineConfig, EngineHandle, GpuBackend, SpecConfig, SubmitError};

/// Where to listen.
#[derive(Debug, Clone)]
pub struct ServeOptions {
    pub grpc_addr: SocketAddr,
    pub http_addr: SocketAddr,
}

/// What the front ends share: the engine once loaded, and the shutdown flag.
#[derive(Clone)]
pub struct AppState {
    engine: Arc<OnceLock<EngineHandle>>,
    load_error: Arc<OnceLock<String>>,
    model_id: String,
}

/// Why a front end cannot take a request now.
#[derive(Debug, Clone, PartialEq)]
pub enum Unavailable {
    Loading,
    LoadFailed(String),
}

impl std::fmt::Display for Unavailable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Unavailable::Loading => f.write_str("Loading model"),
            Unavailable::LoadFailed(e) => write!(f, "the model failed to load: {e}"),
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

    pub fn model_id(&self) -> &str {
        &self.model_id
    }
}

/// A request's input before tokenization.
#[derive(Debug, Clone)]
pub enum Input {
    Text(String),
    Tokens(Vec<u32>),
    Chat(Vec<ChatMessage>),
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
    EngineHandle::start(move || Ok(CpuBackend { model }), tokenizer, eos, cfg, spec)
}

/// Loads a checkpoint (and a drafter) and starts the engine on GPU `ordinal`: the weights and
/// the drafter are uploaded by the scheduler thread, which owns the GPU objects. Sequences hold
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
    let mut loaded = generate::load(model_dir)?;
    let eos = generate::eos_ids(&loaded);
    let tokenizer = loaded.tokenizer.take();
    let draft = draft.map(Path::to_path_buf);
    let (max_context, pool) = (cfg.max_context, cfg.max_running);
    EngineHandle::start(
        move || {
            loaded.to_gpu(ordinal)?;
            let drafter = match &draft {
                Some(d) => Some(generate::gpu_spec_setup(&loaded, d, block_size)?),
                None => None,
            };
            let Some(gpu) = loaded.gpu.take() else {
                bail!("the model is not on the GPU");
            };
            // The host copy of the weights is not needed any more.
            drop(loaded);
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

/// A running server.
pub struct Server {
    pub grpc_addr: SocketAddr,
    pub http_addr: SocketAddr,
    state: AppState,
    stop: watch::Sender<bool>,
    tasks: Vec<tokio::task::JoinHandle<Result<()>>>,
    loader: tokio::task::JoinHandle<()>,
}

impl Server {
    /// Binds both listeners, starts serving, and loads the engine with `load` on a blocking
    /// thread (requests get 503 / UNAVAILABLE until it returns).
    pub async fn start(
        opts: ServeOptions,
        model_id: String,
        load: impl FnOnce() -> Result<EngineHandle> + Send + 'static,
    ) -> Result<Server> {
        let grpc_listener = tokio::net::TcpListener::bind(opts.grpc_addr)
            .await
            .with_context(|| format!("binding the gRPC address {}", opts.grpc_addr))?;
        let http_listener = tokio::net::TcpListener::bind(opts.http_addr)
            .await
            .with_context(|| format!("binding the HTTP address {}", opts.http_addr))?;
        let grpc_addr = grpc_listener.local_addr()?;
        let http_addr = http_listener.local_addr()?;
        let state = AppState {
            engine: Arc::new(OnceLock::new()),
            load_error: Arc::new(OnceLock::new()),
            model_id,
        };
        let (stop, stop_rx) = watch::channel(false);
        let (health, health_svc) = tonic_health::server::health_reporter();
        health
            .set_not_serving::<crate::proto::v1::engine_server::EngineServer<grpc::GrpcService>>()
            .await;
        let tasks = vec![
            tokio::spawn(grpc::serve(
                grpc_listener,
                state.clone(),
                health_svc,
                stopped(stop_rx.clone()),
            )),
            tokio::spawn(http::serve(
                http_listener,
                state.clone(),
                stopped(stop_rx.clone()),
            )),
        ];
        let loader = {
            let state = state.clone();
            tokio::spawn(async move {
                match tokio::task::spawn_blocking(load).await {
                    Ok(Ok(engine)) => {
                        let _ = state.engine.set(engine);
                        health
                            .set_serving::<crate::proto::v1::engine_server::EngineServer<grpc::GrpcService>>()
                            .await;
                    }
                    Ok(Err(e)) => {
                        eprintln!("ultra serve: loading failed: {e:#}");
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
            stop,
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
                Err(Unavailable::Loading) => {
                    tokio::time::sleep(std::time::Duration::from_millis(20)).await
                }
            }
        }
    }

    /// Drains and stops: refuses new requests, lets every running and queued one finish, closes
    /// the listeners, stops the scheduler.
    pub async fn shutdown(self) -> Result<()> {
        let _ = self.loader.await;
        let engine = self.state.engine.get().cloned();
        // Refuse new work first, then let the servers finish their in-flight responses while
        // the scheduler drains.
        let drained = engine.map(|e| tokio::task::spawn_blocking(move || e.shutdown()));
        let _ = self.stop.send(true);
        for t in self.tasks {
            t.await??;
        }
        if let Some(d) = drained {
            d.await?;
        }
        Ok(())
    }
}

/// A future that completes when `rx` turns true.
async fn stopped(mut rx: watch::Receiver<bool>) {
    while !*rx.borrow() {
        if rx.changed().await.is_err() {
            return;
        }
    }
}

/// Completes on SIGINT or SIGTERM.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = term => {},
    }
}
