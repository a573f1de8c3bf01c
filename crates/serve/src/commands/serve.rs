//! `ultra serve` (gRPC + OpenAI-compatible HTTP until SIGINT / SIGTERM, then drain) and
//! `ultra bench-serve` (an in-process server on loopback driven by a gRPC load generator:
//! throughput, TTFT and inter-token latency percentiles).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use rand::{Rng, SeedableRng};

use model::cpu::toy::{random_weights, synthetic_gpt_oss_100m, ToyExperts};
use model::cpu::CpuModel;

use crate::commands::generate::gpu_max_seq;
use crate::engine::{CpuBackend, EngineConfig, EngineHandle, GpuBackend};
use crate::proto::v1 as pb;
use crate::server::{self, ServeOptions, Server};

/// Where the server's executor runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ServeDevice {
    /// The CPU reference executor.
    Cpu,
    /// The GPU executor on this GPU.
    Cuda(usize),
}

/// What `ultra serve` and `ultra bench-serve` load and how they schedule.
#[derive(Debug, Clone)]
pub struct ServeSetup {
    /// Checkpoint directory; `None`: the synthetic ~100M-parameter MoE of `bench-decode`.
    pub model: Option<PathBuf>,
    pub draft: Option<PathBuf>,
    pub block_size: Option<usize>,
    pub engine: EngineConfig,
    pub device: ServeDevice,
}

fn runtime() -> Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?)
}

async fn start(setup: ServeSetup, opts: ServeOptions) -> Result<Server> {
    let model_id = setup.engine.model_id.clone();
    Server::start(opts, model_id, move || match (&setup.model, setup.device) {
        (Some(dir), ServeDevice::Cpu) => {
            server::load_cpu_engine(dir, setup.draft.as_deref(), setup.block_size, setup.engine)
        }
        (Some(dir), ServeDevice::Cuda(ordinal)) => server::load_gpu_engine(
            dir,
            setup.draft.as_deref(),
            setup.block_size,
            setup.engine,
            ordinal,
        ),
        (None, device) => {
            let cfg = synthetic_gpt_oss_100m();
            let weights = random_weights(&cfg, 7, ToyExperts::Mxfp4);
            let eos = cfg.eos_token_ids.clone();
            let (max_context, pool) = (setup.engine.max_context, setup.engine.max_running);
            match device {
                ServeDevice::Cpu => {
                    let model = CpuModel::new(Arc::new(cfg), Arc::new(weights))?;
                    EngineHandle::start(
                        move || Ok(CpuBackend { model }),
                        None,
                        eos,
                        setup.engine,
                        None,
                    )
                }
                ServeDevice::Cuda(ordinal) => EngineHandle::start(
                    move || {
                        let gpu = tilert::exec::GpuModel::new(ordinal, Arc::new(cfg), &weights)?;
                        let max_seq = max_context.unwrap_or(gpu_max_seq(&gpu));
                        GpuBackend::new(gpu, max_seq, None, pool)
                    },
                    None,
                    eos,
                    setup.engine,
                    None,
                ),
            }
        }
    })
    .await
}

/// Serves until SIGINT / SIGTERM, then drains (see [`server`]): exits 0 once drained, or
/// once the model load a signal interrupted is abandoned; a second signal exits at once with
/// 128 + its number. A model that fails to load is an error (one message, no backtrace).
pub fn serve(setup: ServeSetup, opts: ServeOptions) -> Result<()> {
    let rt = runtime()?;
    let result = rt.block_on(async move {
        let mut signals = server::Signals::install()?;
        let nofile = server::conn::raise_open_file_limit();
        let max_conn = opts.limits.connections();
        let server = start(setup, opts).await?;
        eprintln!(
            "ultra serve: gRPC on {}, HTTP on {} (loading the model; /health answers 503 until ready); \
             at most {max_conn} connections (open-file limit {nofile})",
            server.grpc_addr, server.http_addr
        );
        tokio::select! {
            r = server.ready() => {
                if let Err(e) = r {
                    // The load error, once: the caller prints it.
                    return Err(e);
                }
                eprintln!("ultra serve: ready");
            }
            s = signals.first() => {
                eprintln!("ultra serve: signal {s} while loading: exiting");
                return Ok(());
            }
        }
        let s = signals.first().await;
        let timeout = server.state().front().limits.shutdown_timeout;
        eprintln!(
            "ultra serve: signal {s}: draining (new requests get 503 / UNAVAILABLE; running \
             ones get up to {} s; a second signal exits now)",
            timeout.as_secs()
        );
        let drained = server.shutdown().await?;
        if drained.aborted > 0 {
            eprintln!(
                "ultra serve: aborted {} requests still running at the shutdown timeout",
                drained.aborted
            );
        }
        eprintln!("ultra serve: stopped");
        Ok(())
    });
    // Neither a model still loading nor a scheduler thread holds the exit.
    rt.shutdown_background();
    result
}

/// Load-generator settings.
#[derive(Debug, Clone)]
pub struct BenchLoad {
    pub requests: usize,
    pub concurrency: usize,
    pub prompt_tokens: usize,
    pub max_tokens: usize,
    pub seed: u64,
}

/// What one bench run measured (client side, over loopback gRPC).
#[derive(Debug, Clone)]
pub struct BenchReport {
    pub requests: usize,
    pub generated_tokens: usize,
    pub wall_s: f64,
    pub ttft_ms: Vec<f64>,
    pub itl_ms: Vec<f64>,
}

/// The `q`-quantile (nearest rank) of sorted values.
pub fn percentile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    sorted[rank - 1]
}

impl BenchReport {
    pub fn print(&self) {
        let mut ttft = self.ttft_ms.clone();
        let mut itl = self.itl_ms.clone();
        ttft.sort_by(f64::total_cmp);
        itl.sort_by(f64::total_cmp);
        println!(
            "| requests | generated tokens | wall s | output tok/s | req/s | TTFT p50 ms | TTFT p99 ms | ITL p50 ms | ITL p99 ms |"
        );
        println!("|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
        println!(
            "| {} | {} | {:.2} | {:.1} | {:.2} | {:.1} | {:.1} | {:.2} | {:.2} |",
            self.requests,
            self.generated_tokens,
            self.wall_s,
            self.generated_tokens as f64 / self.wall_s,
            self.requests as f64 / self.wall_s,
            percentile(&ttft, 0.5),
            percentile(&ttft, 0.99),
            percentile(&itl, 0.5),
            percentile(&itl, 0.99),
        );
    }
}

/// Runs `load` against a running gRPC server at `url` (`http://127.0.0.1:PORT`).
pub async fn run_load(url: String, vocab: usize, load: &BenchLoad) -> Result<BenchReport> {
    let channel = tonic::transport::Endpoint::from_shared(url)?
        .connect()
        .await?;
    let sem = Arc::new(tokio::sync::Semaphore::new(load.concurrency.max(1)));
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(load.seed);
    let t0 = Instant::now();
    let mut tasks = Vec::with_capacity(load.requests);
    for _ in 0..load.requests {
        let prompt: Vec<u32> = (0..load.prompt_tokens)
            .map(|_| rng.random_range(0..vocab as u32))
            .collect();
        let mut client = pb::engine_client::EngineClient::new(channel.clone());
        let permit = sem.clone().acquire_owned().await?;
        let max_tokens = load.max_tokens as u32;
        tasks.push(tokio::spawn(async move {
            let _permit = permit;
            let start = Instant::now();
            let req = pb::GenerateRequest {
                input: Some(pb::generate_request::Input::TokenIds(pb::TokenIds {
                    ids: prompt,
                })),
                sampling: Some(pb::SamplingParams {
                    max_tokens: Some(max_tokens),
                    ignore_eos: Some(true),
                    ..Default::default()
                }),
                ..Default::default()
            };
            let mut stream = client.generate(req).await?.into_inner();
            let (mut ttft, mut itl, mut n) = (None, Vec::new(), 0usize);
            let mut last = start;
            while let Some(msg) = stream.message().await? {
                match msg.event {
                    Some(pb::generate_response::Event::Chunk(c)) if !c.token_ids.is_empty() => {
                        let now = Instant::now();
                        match ttft {
                            None => ttft = Some((now - start).as_secs_f64() * 1e3),
                            Some(_) => itl.push((now - last).as_secs_f64() * 1e3),
                        }
                        last = now;
                        n += c.token_ids.len();
                    }
                    Some(pb::generate_response::Event::Complete(c))
                        if c.finish_reason != "length" =>
                    {
                        bail!("request ended with {} {}", c.finish_reason, c.error);
                    }
                    _ => {}
                }
            }
            anyhow::Ok((ttft.unwrap_or(f64::NAN), itl, n))
        }));
    }
    let mut report = BenchReport {
        requests: load.requests,
        generated_tokens: 0,
        wall_s: 0.0,
        ttft_ms: Vec::new(),
        itl_ms: Vec::new(),
    };
    for t in tasks {
        let (ttft, itl, n) = t.await??;
        report.ttft_ms.push(ttft);
        report.itl_ms.extend(itl);
        report.generated_tokens += n;
    }
    report.wall_s = t0.elapsed().as_secs_f64();
    Ok(report)
}

/// `ultra bench-serve`: an in-process server on loopback ports, a warm-up request, then the
/// load.
pub fn bench(setup: ServeSetup, load: BenchLoad) -> Result<BenchReport> {
    runtime()?.block_on(async move {
        let opts = ServeOptions::new("127.0.0.1:0".parse()?, "127.0.0.1:0".parse()?);
        let server = start(setup, opts).await?;
        tokio::time::timeout(Duration::from_secs(600), server.ready())
            .await
            .context("the model did not load in 10 minutes")??;
        let vocab = server
            .state()
            .engine()
            .map_err(|u| anyhow::anyhow!("{u}"))?
            .info()
            .vocab_size;
        let url = format!("http://{}", server.grpc_addr);
        let warm = BenchLoad {
            requests: 1,
            concurrency: 1,
            ..load.clone()
        };
        run_load(url.clone(), vocab, &warm).await?;
        let report = run_load(url, vocab, &load).await?;
        server.shutdown().await?;
        Ok(report)
    })
}

/// The model id `ultra serve` uses for `dir` (`synthetic-moe-100m` without one) unless
/// `--served-model-name` is given.
pub fn model_id(dir: Option<&Path>, name: Option<String>) -> String {
    name.unwrap_or_else(|| dir.map_or("synthetic-moe-100m".into(), server::default_model_id))
}
