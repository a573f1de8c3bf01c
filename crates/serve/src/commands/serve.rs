//! `ultra serve` (gRPC + OpenAI-compatible HTTP until SIGINT / SIGTERM, then drain) and
//! `ultra bench-serve` (an in-process server on loopback driven by a gRPC load generator:
//! throughput, TTFT and inter-token latency percentiles).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use rand::{Rng, SeedableRng};

use model::cpu::toy::{random_weights, synthetic_gpt_oss_100m, ToyExperts};

use crate::commands::generate::gpu_max_seq;
use crate::engine::{CpuBackend, EngineConfig, EngineHandle, GpuBackend};
use crate::proto::v1 as pb;
use crate::server::{self, ServeOptions, Server};

/// Where the server's executor runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ServeDevice {
    /// The CPU reference executor.
    Cpu,
    /// The GPU executor on this GPU.
    Cuda(usize),
    /// The GPU executor sharded over tensor- and/or expert-parallel ranks.
    CudaTp {
        opts: tilert::exec::tp::TpOptions,
        placement: tilert::exec::tp::RankPlacement,
    },
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
    /// `--synthetic-config`: instead of `model`, a model of a config's dimensions with random
    /// weights on the GPU (and optionally the controlled-acceptance drafter).
    pub synthetic: Option<super::bench_serve::controlled::SyntheticGpu>,
}

pub(crate) fn runtime() -> Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?)
}

/// The engine of the checkpoint in `dir` (with `draft`, speculative) on `device`.
pub(crate) fn load_engine(
    dir: &Path,
    draft: Option<&Path>,
    block_size: Option<usize>,
    cfg: EngineConfig,
    device: ServeDevice,
) -> Result<EngineHandle> {
    match device {
        ServeDevice::Cpu => server::load_cpu_engine(dir, draft, block_size, cfg),
        ServeDevice::Cuda(ordinal) => server::load_gpu_engine(dir, draft, block_size, cfg, ordinal),
        ServeDevice::CudaTp { opts, placement } => {
            server::load_tp_engine(dir, draft, block_size, cfg, opts, placement)
        }
    }
}

pub(crate) async fn start(setup: ServeSetup, opts: ServeOptions) -> Result<Server> {
    let model_id = setup.engine.model_id.clone();
    Server::start(opts, model_id, move || match (&setup.model, setup.device) {
        (_, ServeDevice::Cuda(ordinal)) if setup.synthetic.is_some() => {
            let syn = setup.synthetic.as_ref().expect("checked");
            super::bench_serve::controlled::start_engine(
                syn,
                ordinal,
                setup.block_size,
                setup.engine,
            )
        }
        (_, _) if setup.synthetic.is_some() => {
            anyhow::bail!("--synthetic-config runs on one GPU (--device cuda, no parallelism)")
        }
        (Some(dir), device) => load_engine(
            dir,
            setup.draft.as_deref(),
            setup.block_size,
            setup.engine,
            device,
        ),
        (None, device) => {
            let cfg = synthetic_gpt_oss_100m();
            let weights = random_weights(&cfg, 7, ToyExperts::Mxfp4);
            let eos = cfg.eos_token_ids.clone();
            let (max_context, pool) = (setup.engine.max_context, setup.engine.max_running);
            match device {
                ServeDevice::Cpu => {
                    let model = super::cpu_model(Arc::new(cfg), Arc::new(weights))?;
                    EngineHandle::start(
                        move || Ok(CpuBackend::new(model)),
                        None,
                        eos,
                        setup.engine,
                        None,
                    )
                }
                ServeDevice::CudaTp { opts, placement } => EngineHandle::start(
                    move || {
                        comm::symmetric::prepare_virtual_ranks();
                        let tp = tilert::exec::tp::TpModel::build(
                            Arc::new(cfg),
                            &weights,
                            opts,
                            &placement,
                            &mut |_| {},
                        )?;
                        let max_seq = max_context.unwrap_or(super::generate::tp_max_seq(&tp));
                        crate::engine::tp::TpBackend::new(tp, max_seq)
                    },
                    None,
                    eos,
                    setup.engine,
                    None,
                ),
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
                // A load error is returned once; the caller prints it.
                r?;
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

/// One soak sample: the server process's resources and gauges.
#[derive(Debug, Clone)]
pub struct SoakSample {
    pub t_s: f64,
    pub rss_mib: f64,
    pub fds: usize,
    pub running: i64,
    pub waiting: i64,
    pub kv_usage: f64,
    pub inflight: usize,
    pub open_connections: i64,
    /// Requests finished (completed, disconnected or aborted on purpose) so far.
    pub done: u64,
    /// Requests that failed unexpectedly so far.
    pub errors: u64,
}

impl SoakSample {
    pub fn header() -> &'static str {
        "| t s | RSS MiB | fds | running | waiting | KV use | in flight | connections | done | errors |\n|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
    }

    pub fn row(&self) -> String {
        format!(
            "| {:.0} | {:.1} | {} | {} | {} | {:.3} | {} | {} | {} | {} |",
            self.t_s,
            self.rss_mib,
            self.fds,
            self.running,
            self.waiting,
            self.kv_usage,
            self.inflight,
            self.open_connections,
            self.done,
            self.errors
        )
    }
}

fn rss_mib() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.split_whitespace().next()?.parse::<f64>().ok())
        })
        .map_or(0.0, |kib| kib / 1024.0)
}

fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd").map_or(0, |d| d.count())
}

/// One request of the soak's mix (`kind` 0..6): a full gRPC stream, a gRPC stream dropped
/// after its first message, a gRPC stream aborted by id, a full HTTP completion, an HTTP
/// stream whose client leaves after the first bytes, an idle TCP connection left open a moment.
async fn soak_one(
    kind: u64,
    n: u64,
    grpc: &mut pb::engine_client::EngineClient<tonic::transport::Channel>,
    http: std::net::SocketAddr,
    prompt: Vec<u32>,
    max_tokens: usize,
) -> Result<()> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let req = |id: String, max: usize| pb::GenerateRequest {
        request_id: id,
        input: Some(pb::generate_request::Input::TokenIds(pb::TokenIds {
            ids: prompt.clone(),
        })),
        sampling: Some(pb::SamplingParams {
            max_tokens: Some(max as u32),
            ignore_eos: Some(true),
            ..Default::default()
        }),
        ..Default::default()
    };
    match kind {
        0 => {
            let mut s = grpc
                .generate(req(String::new(), max_tokens))
                .await?
                .into_inner();
            while s.message().await?.is_some() {}
        }
        1 => {
            let mut s = grpc
                .generate(req(String::new(), max_tokens))
                .await?
                .into_inner();
            s.message().await?;
        }
        2 => {
            let id = format!("soak-{n}");
            let mut s = grpc
                .generate(req(id.clone(), 100_000.min(max_tokens * 8)))
                .await?
                .into_inner();
            s.message().await?;
            grpc.abort(pb::AbortRequest { request_id: id }).await?;
            while s.message().await?.is_some() {}
        }
        3 | 4 => {
            let body = serde_json::json!({"prompt": prompt, "max_tokens": max_tokens,
                "ignore_eos": true, "stream": kind == 4})
            .to_string();
            let mut s = tokio::net::TcpStream::connect(http).await?;
            s.write_all(
                format!(
                    "POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                    body.len()
                )
                .as_bytes(),
            )
            .await?;
            let mut buf = vec![0u8; 4096];
            if kind == 4 {
                // The client leaves after the first bytes (or none, if the answer is slow).
                let n = s.read(&mut buf).await?;
                if n >= 12 && !buf.starts_with(b"HTTP/1.1 200") {
                    bail!(
                        "HTTP answered {}",
                        String::from_utf8_lossy(&buf[..n.min(200)])
                    );
                }
            } else {
                let mut all = Vec::new();
                s.read_to_end(&mut all).await?;
                if !all.starts_with(b"HTTP/1.1 200") {
                    bail!(
                        "HTTP answered {}",
                        String::from_utf8_lossy(&all[..all.len().min(200)])
                    );
                }
            }
        }
        _ => {
            let _s = tokio::net::TcpStream::connect(http).await?;
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
    Ok(())
}

/// `ultra bench-serve --soak MINUTES`: an in-process server on loopback under a mixed load
/// (`load.concurrency` clients: full and dropped gRPC streams, aborts, HTTP completions, HTTP
/// streams whose clients leave, idle connections) for `minutes`, sampling RSS, open fds and the
/// gauges every `every`; a last sample once the load stopped and the server is idle (no request
/// and no connection left). RSS and fds
/// are the whole process's (clients included).
pub fn soak(
    setup: ServeSetup,
    load: BenchLoad,
    minutes: f64,
    every: Duration,
) -> Result<Vec<SoakSample>> {
    runtime()?.block_on(async move {
        let opts = ServeOptions::new("127.0.0.1:0".parse()?, "127.0.0.1:0".parse()?);
        let server = start(setup, opts).await?;
        tokio::time::timeout(Duration::from_secs(600), server.ready())
            .await
            .context("the model did not load in 10 minutes")??;
        let engine = server
            .state()
            .engine()
            .map_err(|u| anyhow::anyhow!("{u}"))?
            .clone();
        let vocab = engine.info().vocab_size;
        let url = format!("http://{}", server.grpc_addr);
        let http = server.http_addr;
        let done = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let errors = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let t0 = Instant::now();
        let end = t0 + Duration::from_secs_f64(minutes * 60.0);
        let mut workers = Vec::new();
        for w in 0..load.concurrency.max(1) {
            let url = url.clone();
            let (done, errors) = (done.clone(), errors.clone());
            let (ptoks, max_tokens) = (load.prompt_tokens.max(1), load.max_tokens.max(1));
            let seed = load.seed.wrapping_add(w as u64);
            workers.push(tokio::spawn(async move {
                let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
                let mut grpc = match pb::engine_client::EngineClient::connect(url).await {
                    Ok(c) => c,
                    Err(_) => {
                        errors.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        return;
                    }
                };
                let mut n = 0u64;
                while Instant::now() < end {
                    let prompt: Vec<u32> = (0..ptoks)
                        .map(|_| rng.random_range(0..vocab as u32))
                        .collect();
                    let kind = rng.random_range(0..6u64);
                    n += 1;
                    let id = (w as u64) << 32 | n;
                    match soak_one(kind, id, &mut grpc, http, prompt, max_tokens).await {
                        Ok(()) => done.fetch_add(1, std::sync::atomic::Ordering::Relaxed),
                        Err(_) => errors.fetch_add(1, std::sync::atomic::Ordering::Relaxed),
                    };
                }
            }));
        }
        let metrics = engine.metrics().clone();
        let state = server.state().clone();
        let sample = move || {
            let front = state.front();
            SoakSample {
                t_s: t0.elapsed().as_secs_f64(),
                rss_mib: rss_mib(),
                fds: open_fds(),
                running: metrics.num_requests_running.get(),
                waiting: metrics.num_requests_waiting.get(),
                kv_usage: metrics.kv_cache_usage_perc.get(),
                inflight: front.inflight(),
                open_connections: ["http", "grpc"]
                    .iter()
                    .map(|a| front.metrics.open_connections.with_label_values(&[a]).get())
                    .sum(),
                done: done.load(std::sync::atomic::Ordering::Relaxed),
                errors: errors.load(std::sync::atomic::Ordering::Relaxed),
            }
        };
        let mut samples = vec![sample()];
        println!("{}", SoakSample::header());
        println!("{}", samples[0].row());
        while Instant::now() < end {
            tokio::time::sleep(every.min(end.saturating_duration_since(Instant::now()))).await;
            let s = sample();
            println!("{}", s.row());
            samples.push(s);
        }
        for w in workers {
            let _ = w.await;
        }
        // Idle: every gauge back to zero.
        let settle = Instant::now();
        let open = |f: &server::Front| -> i64 {
            ["http", "grpc"]
                .iter()
                .map(|a| f.metrics.open_connections.with_label_values(&[a]).get())
                .sum()
        };
        while (engine.load().1 > 0
            || server.state().front().inflight() > 0
            || open(server.state().front()) > 0)
            && settle.elapsed() < Duration::from_secs(30)
        {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let s = sample();
        println!("{} (idle)", s.row());
        samples.push(s);
        server.shutdown().await?;
        Ok(samples)
    })
}
