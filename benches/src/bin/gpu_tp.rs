//! `gpu-tp`: tensor-parallel decode (`tilert::exec::tp`) at a real model's dimensions, on a slice
//! of its first `--layers` MoE layers (random weights generated on the device: bf16 dense, MXFP4
//! experts; the full embedding and LM head, or `--vocab` rows of them).
//!
//! For each rank count N of `--ranks`, in one run on the same GPU:
//! * **per-rank step** (`TpModel::synthetic_rank`): rank 0's share of the TP-N plan alone on one
//!   GPU — its heads, its intermediate slice of every expert, the replicated embedding, router,
//!   norms and LM head, and its all-reduce kernels over a group of one (no peer to wait for).
//!   This is what one GPU of an N-GPU node computes per decode step, without the link; its weight
//!   bytes per step and their share of the streaming-read ceiling (measured in the same run).
//! * **virtual ranks** (`TpModel::synthetic` on `RankPlacement::Virtual`): all N ranks on one GPU
//!   joined by the one-shot all-reduce — the protocol in the decode loop. The N ranks share one
//!   GPU's bandwidth, so this step is about N per-rank steps plus the flag round trips; it is a
//!   correctness and overhead check, not a multi-GPU number.
//! * **devices** (`--devices A,B,..`, a multi-GPU machine; issue #19): the N ranks on the first N
//!   listed GPUs — the real TP step.
//!
//! `--expert-parallel`: the same with each rank holding E/N whole experts (TP attention), and
//! `--all-reduce nccl` runs the `--devices` rows through NCCL (the reference).
//!
//! The unsharded slice (`GpuModel::synthetic`) is the N = 1 baseline. Every step is a greedy
//! decode step with CUDA graphs, timed by wall clock from the host (it waits for its token);
//! the median over `--repeats` windows of `--steps` steps after a `--prompt`-token prompt.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use clap::Parser;
use model::config::ModelConfig;
use model::plan::tp::Parallelism;
use serde::Serialize;
use tilert::exec::tp::{AllReduceKind, RankPlacement, TpModel, TpOptions, TpSession};
use tilert::exec::GpuModel;
use ultra_benches::{median, time_us, BenchKernels};

#[derive(Parser)]
#[command(about = "Tensor-parallel decode step times at a model's dimensions (a layer slice)")]
struct Args {
    /// Model config.json files, comma-separated (default: the embedded gpt-oss-120b and
    /// MiMo-V2.5-Pro configs of fixtures/configs).
    #[arg(long, value_delimiter = ',')]
    config: Vec<PathBuf>,
    /// MoE layers in the slice (the config's first ones; dense layers are skipped).
    #[arg(long, default_value_t = 4)]
    layers: usize,
    /// Vocabulary rows of the slice's embedding and LM head (default: the config's).
    #[arg(long)]
    vocab: Option<usize>,
    /// Tensor-parallel rank counts.
    #[arg(long, value_delimiter = ',', default_value = "1,2,4,8")]
    ranks: Vec<usize>,
    /// Also run each N on the first N of these GPUs (one rank per GPU).
    #[arg(long, value_delimiter = ',')]
    devices: Option<Vec<usize>>,
    /// Skip the virtual-rank runs (all N ranks on GPU 0).
    #[arg(long)]
    no_virtual: bool,
    /// Expert parallelism: each rank holds E/N whole experts (attention stays tensor-parallel)
    /// instead of a 1/N slice of every expert. The per-rank step reads the experts its rank's
    /// share of the routing hits.
    #[arg(long)]
    expert_parallel: bool,
    /// The all-reduce of the `--devices` runs: oneshot (default) or nccl.
    #[arg(long, default_value = "oneshot")]
    all_reduce: String,
    /// Decode steps per timed window.
    #[arg(long, default_value_t = 64)]
    steps: usize,
    /// Timed windows (the median is reported).
    #[arg(long, default_value_t = 5)]
    repeats: usize,
    /// Prompt tokens before decoding.
    #[arg(long, default_value_t = 32)]
    prompt: usize,
    /// Sequence capacity.
    #[arg(long, default_value_t = 2048)]
    max_seq: usize,
    /// Write the rows as JSON here.
    #[arg(long)]
    json: Option<PathBuf>,
}

#[derive(Serialize)]
struct Row {
    case: String,
    ranks: usize,
    /// Median wall-clock ms per greedy decode step.
    ms_per_step: f64,
    tokens_per_s: f64,
    /// Weight bytes one step streams on one GPU (per-rank and unsharded rows: that GPU's; virtual
    /// ranks: all ranks' together, on the one GPU).
    weight_bytes_per_step: usize,
    gb_per_s: f64,
    roofline_share: f64,
}

#[derive(Serialize)]
struct Report {
    device: String,
    config: String,
    layers: usize,
    vocab: usize,
    stream_read_gbps: f64,
    rows: Vec<Row>,
}

/// The slice of `cfg`: its first `layers` MoE layers, `vocab` rows, no EOS.
fn slice(mut cfg: ModelConfig, layers: usize, vocab: Option<usize>) -> Result<ModelConfig> {
    cfg.layers = cfg
        .layers
        .into_iter()
        .filter(|l| l.moe)
        .take(layers)
        .collect();
    if cfg.layers.is_empty() {
        bail!("the config has no MoE layers");
    }
    if let Some(v) = vocab {
        cfg.vocab_size = v;
    }
    cfg.eos_token_ids.clear();
    Ok(cfg)
}

/// Median ms per greedy decode step of `step` over `repeats` windows of `steps` steps.
fn time_steps(
    repeats: usize,
    steps: usize,
    first: u32,
    mut step: impl FnMut(u32) -> Result<u32>,
) -> Result<f64> {
    let mut tok = step(first)?;
    let mut ms = Vec::with_capacity(repeats);
    for _ in 0..repeats {
        let t0 = Instant::now();
        for _ in 0..steps {
            tok = step(tok)?;
        }
        ms.push(t0.elapsed().as_secs_f64() * 1e3 / steps as f64);
    }
    Ok(median(&ms))
}

fn tp_ms(s: &mut TpSession, args: &Args, prompt: &[u32]) -> Result<f64> {
    let first = s.prefill_greedy(prompt)?;
    time_steps(args.repeats, args.steps, first, |t| Ok(s.decode_greedy(t)?))
}

/// Weight bytes every rank of `m` streams per decode step, summed (the LM head once: only rank 0
/// runs it).
fn tp_bytes(m: &TpModel) -> usize {
    let head = m.rank(0).lm_head_matrix().bytes();
    (0..m.ranks())
        .map(|r| m.rank(r).decode_bytes_per_token() - if r == 0 { 0 } else { head })
        .sum()
}

const GPT_OSS_120B: &str = include_str!("../../../fixtures/configs/gpt-oss-120b.json");
const MIMO_V25_PRO: &str = include_str!("../../../fixtures/configs/mimo-v2.5-pro.json");

fn main() -> Result<()> {
    let args = Args::parse();
    comm::symmetric::prepare_virtual_ranks();
    let configs: Vec<(String, String)> = if args.config.is_empty() {
        vec![
            ("gpt-oss-120b".into(), GPT_OSS_120B.into()),
            ("MiMo-V2.5-Pro".into(), MIMO_V25_PRO.into()),
        ]
    } else {
        args.config
            .iter()
            .map(|p| {
                let text = std::fs::read_to_string(p)
                    .with_context(|| format!("reading {}", p.display()))?;
                Ok((p.display().to_string(), text))
            })
            .collect::<Result<_>>()?
    };
    let mut reports = Vec::new();
    for (name, text) in &configs {
        reports.push(run_config(&args, name, text)?);
    }
    if let Some(path) = &args.json {
        std::fs::write(path, serde_json::to_string_pretty(&reports)?)?;
    }
    Ok(())
}

/// Every row of one config (see the module docs).
fn run_config(args: &Args, name: &str, text: &str) -> Result<Report> {
    let full = ModelConfig::from_json_str(text).with_context(|| format!("parsing {name}"))?;
    let cfg = Arc::new(slice(full, args.layers, args.vocab)?);
    let seed = 20261207;

    let base = GpuModel::synthetic(0, cfg.clone(), seed).context("the unsharded slice")?;
    let info = base.device().info.clone();
    let read_gbps = {
        let stream = base.stream().clone();
        let bytes = 2usize << 30;
        let mut kern = BenchKernels::new(stream.clone(), info.multiprocessors)?;
        let mut pool = stream.alloc_zeros::<u8>(bytes)?;
        kern.fill(&mut pool, 7, 0, 256)?;
        let us = median(&time_us(&stream, 11, 5, |_| {
            kern.stream_read(&pool, 0, bytes)
        })?);
        bytes as f64 / (us * 1e-6) / 1e9
    };
    println!(
        "{info}\nslice of {name}: {} MoE layers, vocab {}, hidden {}; streaming read {read_gbps:.0} GB/s",
        cfg.layers.len(),
        cfg.vocab_size,
        cfg.hidden_size
    );
    let v = cfg.vocab_size as u32;
    let prompt: Vec<u32> = (0..args.prompt as u32)
        .map(|i| (i * 7919 + 13) % v)
        .collect();
    let mut rows = Vec::new();
    let mut push = |case: String, ranks: usize, ms: f64, bytes: usize| {
        let gbps = bytes as f64 / (ms * 1e-3) / 1e9;
        println!("{case}: {ms:.3} ms/step");
        rows.push(Row {
            case,
            ranks,
            ms_per_step: ms,
            tokens_per_s: 1e3 / ms,
            weight_bytes_per_step: bytes,
            gb_per_s: gbps,
            roofline_share: gbps / read_gbps,
        });
    };

    {
        let mut s = base.session(args.max_seq)?;
        let first = s.prefill_greedy(&prompt)?;
        let ms = time_steps(args.repeats, args.steps, first, |t| Ok(s.decode_greedy(t)?))?;
        push(
            "unsharded (one GPU)".into(),
            1,
            ms,
            base.decode_bytes_per_token(),
        );
    }
    drop(base);

    let all_reduce = match args.all_reduce.as_str() {
        "oneshot" => AllReduceKind::OneShot,
        "nccl" => AllReduceKind::Nccl,
        other => bail!("--all-reduce {other:?}: oneshot or nccl"),
    };
    let split = |n: usize| {
        if args.expert_parallel {
            Parallelism::tensor_expert(n)
        } else {
            Parallelism::tensor(n)
        }
    };
    let tag = if args.expert_parallel { "TP+EP" } else { "TP" };
    for &n in &args.ranks {
        let opts = TpOptions {
            parallelism: split(n),
            all_reduce: AllReduceKind::OneShot,
        };
        let alone = TpModel::synthetic_rank_with(cfg.clone(), split(n), 0, 0, seed)
            .with_context(|| format!("rank 0 of {tag}{n}"))?;
        let mut s = alone.session(args.max_seq)?;
        let ms = tp_ms(&mut s, args, &prompt)?;
        push(
            format!("{tag}{n} per-rank step (rank 0 alone)"),
            n,
            ms,
            tp_bytes(&alone),
        );
        drop((s, alone));
        if !args.no_virtual && n > 1 {
            let m = TpModel::synthetic_with(
                cfg.clone(),
                opts,
                &RankPlacement::Virtual { device: 0 },
                seed,
            )
            .with_context(|| format!("{tag}{n} on virtual ranks"))?;
            let mut s = m.session(args.max_seq)?;
            let ms = tp_ms(&mut s, args, &prompt)?;
            push(
                format!("{tag}{n} virtual ranks on one GPU"),
                n,
                ms,
                tp_bytes(&m),
            );
        }
        if let Some(d) = &args.devices {
            if d.len() >= n && n > 1 {
                let gpus = d[..n].to_vec();
                let m = TpModel::synthetic_with(
                    cfg.clone(),
                    TpOptions { all_reduce, ..opts },
                    &RankPlacement::Devices(gpus.clone()),
                    seed,
                )
                .with_context(|| format!("{tag}{n} on GPUs {gpus:?}"))?;
                let mut s = m.session(args.max_seq)?;
                let ms = tp_ms(&mut s, args, &prompt)?;
                push(
                    format!("{tag}{n} on GPUs {gpus:?} ({} all-reduce)", m.all_reduce()),
                    n,
                    ms,
                    m.rank(0).decode_bytes_per_token(),
                );
            }
        }
    }

    println!(
        "\n{info}; slice of {name} ({} MoE layers, vocab {}); streaming read {read_gbps:.0} GB/s; \
         median of {} windows of {} greedy steps (graphs)",
        cfg.layers.len(),
        cfg.vocab_size,
        args.repeats,
        args.steps
    );
    println!("| case | ms / step | tok/s | weight MB / step (one GPU) | GB/s | of read ceiling |");
    println!("|---|---:|---:|---:|---:|---:|");
    for r in &rows {
        println!(
            "| {} | {:.3} | {:.1} | {:.1} | {:.0} | {:.0}% |",
            r.case,
            r.ms_per_step,
            r.tokens_per_s,
            r.weight_bytes_per_step as f64 / 1e6,
            r.gb_per_s,
            100.0 * r.roofline_share
        );
    }
    Ok(Report {
        device: info.to_string(),
        config: name.to_string(),
        layers: cfg.layers.len(),
        vocab: cfg.vocab_size,
        stream_read_gbps: read_gbps,
        rows,
    })
}
