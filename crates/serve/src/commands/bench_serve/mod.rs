//! `ultra bench-serve --streams 1,4,16,64`: concurrent streams against an in-process server on
//! loopback (or a running one, `--url`), plain vs DFlash (`--compare-draft`), for each stream
//! count: aggregate output tok/s, per-stream tok/s, TTFT and inter-token latency p50 / p99.
//!
//! Each of the `N` streams is one gRPC client sending its requests (a [`workload::Workload`])
//! one after another; the streams start together. Measured at the client:
//! * **aggregate tok/s**: all streams' generated tokens / the wall time from the start until the
//!   last stream ends;
//! * **per-stream tok/s**: each request's generated tokens after the first / the time from its
//!   first to its last token (decode speed as its user sees it), mean and p50 over requests;
//! * **TTFT**: request sent → first token;
//! * **inter-token latency**: the gap between two token messages spread over the tokens of the
//!   later message (a speculative round sends several tokens at once: each gets `gap / k`, so
//!   plain and speculative numbers compare per token).
//!
//! In-process runs also print, after each row, the bytes of decode results that crossed from
//! the executor to the host per plain decode step (`vllm:decode_result_bytes_total` /
//! `vllm:decode_steps_total` over the row): `4 · rows` with sampling on the GPU, `4 · V · rows`
//! where the logits come back (the CPU executor, or a step where a request asks for logprobs).

pub mod controlled;
pub mod workload;

use std::sync::Arc;
use std::time::Instant;

use anyhow::{bail, Context, Result};

use crate::commands::serve::{percentile, ServeSetup};
use crate::proto::v1 as pb;
use crate::server::ServeOptions;
use workload::{BenchRequest, Workload, WorkloadSettings};

/// A sweep's settings.
#[derive(Debug, Clone)]
pub struct Sweep {
    /// Stream counts, run in this order.
    pub streams: Vec<usize>,
    pub requests_per_stream: usize,
    pub prompt_tokens: usize,
    pub max_tokens: usize,
    pub seed: u64,
    pub workload: String,
}

/// One stream count's measurements.
#[derive(Debug, Clone)]
pub struct SweepRow {
    /// `plain`, `dflash` or the server's (`--url`).
    pub mode: String,
    pub streams: usize,
    pub requests: usize,
    pub tokens: usize,
    pub wall_s: f64,
    pub per_stream_tok_s: Vec<f64>,
    pub ttft_ms: Vec<f64>,
    pub itl_ms: Vec<f64>,
    /// In-process runs: decode-result bytes handed to the host and plain decode steps over the
    /// row (the server's counters).
    pub host_bytes: Option<(u64, u64)>,
}

impl SweepRow {
    /// The line after the row: bytes to the host per plain decode step (in-process runs).
    pub fn host_bytes_line(&self) -> Option<String> {
        let (bytes, steps) = self.host_bytes?;
        Some(if steps == 0 {
            format!(
                "{} streams: no plain decode steps ({bytes} bytes of decode results)",
                self.streams
            )
        } else {
            format!(
                "{} streams: {:.0} bytes to the host per decode step ({bytes} bytes over {steps} steps)",
                self.streams,
                bytes as f64 / steps as f64
            )
        })
    }

    pub fn aggregate_tok_s(&self) -> f64 {
        self.tokens as f64 / self.wall_s.max(1e-9)
    }

    pub fn header() -> &'static str {
        "| mode | streams | requests | tokens | wall s | aggregate tok/s | per-stream tok/s mean | per-stream p50 | TTFT p50 ms | TTFT p99 ms | ITL p50 ms | ITL p99 ms |\n\
         |---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
    }

    pub fn row(&self) -> String {
        let sorted = |v: &[f64]| {
            let mut v = v.to_vec();
            v.sort_by(f64::total_cmp);
            v
        };
        let (ps, ttft, itl) = (
            sorted(&self.per_stream_tok_s),
            sorted(&self.ttft_ms),
            sorted(&self.itl_ms),
        );
        let mean = if ps.is_empty() {
            f64::NAN
        } else {
            ps.iter().sum::<f64>() / ps.len() as f64
        };
        format!(
            "| {} | {} | {} | {} | {:.2} | {:.1} | {:.1} | {:.1} | {:.1} | {:.1} | {:.2} | {:.2} |",
            self.mode,
            self.streams,
            self.requests,
            self.tokens,
            self.wall_s,
            self.aggregate_tok_s(),
            mean,
            percentile(&ps, 0.5),
            percentile(&ttft, 0.5),
            percentile(&ttft, 0.99),
            percentile(&itl, 0.5),
            percentile(&itl, 0.99),
        )
    }
}

/// What one request measured.
struct Measured {
    tokens: usize,
    ttft_ms: f64,
    /// Generated tokens after the first per second of their span.
    tok_s: Option<f64>,
    itl_ms: Vec<f64>,
}

async fn one_request(
    client: &mut pb::engine_client::EngineClient<tonic::transport::Channel>,
    r: &BenchRequest,
) -> Result<Measured> {
    let start = Instant::now();
    let req = pb::GenerateRequest {
        input: Some(pb::generate_request::Input::TokenIds(pb::TokenIds {
            ids: r.prompt.clone(),
        })),
        sampling: Some(pb::SamplingParams {
            max_tokens: Some(r.max_tokens as u32),
            ignore_eos: Some(true),
            ..Default::default()
        }),
        ..Default::default()
    };
    let mut stream = client.generate(req).await?.into_inner();
    let (mut first, mut last, mut n) = (None, start, 0usize);
    let mut itl = Vec::new();
    while let Some(msg) = stream.message().await? {
        match msg.event {
            Some(pb::generate_response::Event::Chunk(c)) if !c.token_ids.is_empty() => {
                let now = Instant::now();
                let k = c.token_ids.len();
                if first.is_none() {
                    first = Some(now);
                    // Tokens after the first in the same message came with no gap.
                    itl.extend(std::iter::repeat_n(0.0, k - 1));
                } else {
                    let gap = (now - last).as_secs_f64() * 1e3 / k as f64;
                    itl.extend(std::iter::repeat_n(gap, k));
                }
                last = now;
                n += k;
            }
            Some(pb::generate_response::Event::Complete(c)) if c.finish_reason != "length" => {
                bail!("a request ended with {} {}", c.finish_reason, c.error);
            }
            _ => {}
        }
    }
    let Some(first) = first else {
        bail!("a request produced no tokens");
    };
    let span = (last - first).as_secs_f64();
    Ok(Measured {
        tokens: n,
        ttft_ms: (first - start).as_secs_f64() * 1e3,
        tok_s: (n > 1 && span > 0.0).then(|| (n - 1) as f64 / span),
        itl_ms: itl,
    })
}

/// Runs `streams` concurrent streams of `load` against the gRPC server at `url`.
async fn run_streams(url: &str, mode: &str, streams: Vec<Vec<BenchRequest>>) -> Result<SweepRow> {
    let channel = tonic::transport::Endpoint::from_shared(url.to_string())?
        .connect()
        .await
        .with_context(|| format!("connecting to {url}"))?;
    let n = streams.len();
    let go = Arc::new(tokio::sync::Barrier::new(n + 1));
    let mut tasks = Vec::with_capacity(n);
    for reqs in streams {
        let mut client = pb::engine_client::EngineClient::new(channel.clone());
        let go = go.clone();
        tasks.push(tokio::spawn(async move {
            go.wait().await;
            let mut out = Vec::with_capacity(reqs.len());
            for r in &reqs {
                out.push(one_request(&mut client, r).await?);
            }
            anyhow::Ok(out)
        }));
    }
    go.wait().await;
    let t0 = Instant::now();
    let mut row = SweepRow {
        mode: mode.to_string(),
        streams: n,
        requests: 0,
        tokens: 0,
        wall_s: 0.0,
        per_stream_tok_s: Vec::new(),
        ttft_ms: Vec::new(),
        itl_ms: Vec::new(),
        host_bytes: None,
    };
    for t in tasks {
        for m in t.await?? {
            row.requests += 1;
            row.tokens += m.tokens;
            row.ttft_ms.push(m.ttft_ms);
            row.itl_ms.extend(m.itl_ms);
            row.per_stream_tok_s.extend(m.tok_s);
        }
    }
    row.wall_s = t0.elapsed().as_secs_f64();
    Ok(row)
}

/// The vocabulary of the model served at `url` and whether it speculates (its `ModelInfo`).
async fn served_model(url: &str) -> Result<(usize, bool)> {
    let mut c = pb::engine_client::EngineClient::connect(url.to_string())
        .await
        .with_context(|| format!("connecting to {url}"))?;
    let info = c
        .get_model_info(pb::GetModelInfoRequest {})
        .await?
        .into_inner();
    Ok((info.vocab_size as usize, info.speculative))
}

/// Runs the sweep against `url` (one warm-up request first), printing each row as it ends;
/// `metrics`: the in-process server's counters (the host-bytes line).
async fn sweep_at(
    url: &str,
    mode: &str,
    sweep: &Sweep,
    w: &dyn Workload,
    metrics: Option<&crate::metrics::Metrics>,
) -> Result<Vec<SweepRow>> {
    let counters = || metrics.map(|m| (m.decode_result_bytes.get(), m.decode_steps.get()));
    let (vocab, speculative) = served_model(url).await?;
    let mode = match mode {
        "server" if speculative => "server (dflash)",
        "server" => "server (plain)",
        m => m,
    };
    let settings = |streams, requests_per_stream| WorkloadSettings {
        vocab,
        streams,
        requests_per_stream,
        prompt_tokens: sweep.prompt_tokens,
        max_tokens: sweep.max_tokens,
        seed: sweep.seed,
    };
    run_streams(url, mode, w.streams(&settings(1, 1))?).await?;
    let mut rows = Vec::new();
    for &n in &sweep.streams {
        let before = counters();
        let mut row = run_streams(
            url,
            mode,
            w.streams(&settings(n, sweep.requests_per_stream))?,
        )
        .await?;
        row.host_bytes = before
            .zip(counters())
            .map(|((b0, s0), (b1, s1))| (b1 - b0, s1 - s0));
        println!("{}", row.row());
        if let Some(line) = row.host_bytes_line() {
            println!("{line}");
        }
        rows.push(row);
    }
    Ok(rows)
}

/// Checks a sweep's settings.
fn check(sweep: &Sweep) -> Result<()> {
    if sweep.streams.is_empty() || sweep.streams.contains(&0) {
        bail!("--streams needs stream counts of at least 1, e.g. 1,4,16,64");
    }
    if sweep.requests_per_stream == 0 {
        bail!("--requests-per-stream must be at least 1");
    }
    Ok(())
}

/// The sweep against a running server (`--url http://HOST:GRPC_PORT`): what it serves (plain or
/// speculative) is its own setting.
pub fn run_url(url: &str, sweep: &Sweep) -> Result<Vec<SweepRow>> {
    check(sweep)?;
    let w = workload::by_name(&sweep.workload)?;
    crate::commands::serve::runtime()?.block_on(async {
        println!("{}", SweepRow::header());
        sweep_at(url, "server", sweep, &*w, None).await
    })
}

/// The sweep against in-process servers on loopback: with the setup's drafter (`dflash`) and,
/// when `compare` (or without a drafter), without it (`plain`). `max_running` is raised to the
/// largest stream count so every stream decodes at once.
pub fn run_local(setup: ServeSetup, sweep: &Sweep, compare: bool) -> Result<Vec<SweepRow>> {
    check(sweep)?;
    let w = workload::by_name(&sweep.workload)?;
    let most = sweep.streams.iter().copied().max().unwrap_or(1);
    let mut setup = setup;
    setup.engine.max_running = setup.engine.max_running.max(most);
    setup.engine.max_waiting = setup.engine.max_waiting.max(most);
    let mut modes = Vec::new();
    let controlled = setup
        .synthetic
        .as_ref()
        .is_some_and(|s| s.controlled.is_some());
    let drafts = setup.draft.is_some() || controlled;
    if drafts {
        modes.push(("dflash", setup.clone()));
    }
    if compare || !drafts {
        let mut plain = setup.clone();
        plain.draft = None;
        plain.block_size = None;
        if let Some(s) = &mut plain.synthetic {
            s.controlled = None;
        }
        modes.insert(0, ("plain", plain));
    }
    crate::commands::serve::runtime()?.block_on(async {
        println!("{}", SweepRow::header());
        let mut rows = Vec::new();
        for (mode, setup) in modes {
            let opts = ServeOptions::new("127.0.0.1:0".parse()?, "127.0.0.1:0".parse()?);
            let server = crate::commands::serve::start(setup, opts).await?;
            tokio::time::timeout(std::time::Duration::from_secs(600), server.ready())
                .await
                .context("the model did not load in 10 minutes")??;
            let url = format!("http://{}", server.grpc_addr);
            let metrics = server.state().engine().ok().map(|e| e.metrics().clone());
            let r = sweep_at(&url, mode, sweep, &*w, metrics.as_ref()).await;
            server.shutdown().await?;
            rows.extend(r?);
        }
        Ok(rows)
    })
}
