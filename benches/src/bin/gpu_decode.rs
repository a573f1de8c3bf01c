//! `gpu-decode`: the GPU executor (tilert v1: kernel per op + CUDA graphs) at real gpt-oss-20b
//! dimensions, with random weights generated on the device (MXFP4 experts, bf16 dense weights).
//!
//! Reports, in one run: the streaming-read ceiling; batch-1 decode tokens/s and its share of the
//! roofline (weight bytes per token ÷ that ceiling); a per-op time breakdown from a profiled
//! graph replay; verify-step time for B = 2, 4, 8, 16 against the decode step and against the
//! distinct-expert byte ratio; aggregate tokens/s of batched decode (`GpuBatch`: N sequences,
//! one pass per step) for N = 1, 2, 4, 8, 16 against the same N sequences decoded one after
//! another; per-token latency of the tiny fixture checkpoints. Writes a
//! markdown table (stdout and `<json stem>.md`), JSON (`--json`) and an SVG bar chart of time per
//! op (`<json stem>.svg`).

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use anyhow::{Context, Result};
use clap::Parser;
use model::config::ModelConfig;
use serde::Serialize;
use tilert::exec::{GpuBatch, GpuModel, GpuSession, SyntheticDtypes};
use ultra_benches::{median, time_us, BenchKernels};

#[derive(Parser)]
struct Args {
    /// Write the full results here (JSON); the markdown table and the SVG go beside it.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Decode steps per timed window.
    #[arg(long, default_value_t = 64)]
    tokens: usize,
    /// Timed windows (the median is reported).
    #[arg(long, default_value_t = 5)]
    repeats: usize,
    /// Session capacity (full-attention layers' KV cache).
    #[arg(long, default_value_t = 4096)]
    max_seq: usize,
    /// Prompt length before decoding.
    #[arg(long, default_value_t = 64)]
    prompt: usize,
    /// Folder with the tiny fixture checkpoints (skipped when absent).
    #[arg(long, default_value = "fixtures")]
    fixtures: PathBuf,
    /// Only the batched-decode comparison (skips the ceiling, the profile, verify and fixtures).
    #[arg(long)]
    batch_only: bool,
    /// Decode steps per timed window of the batched-decode comparison.
    #[arg(long, default_value_t = 32)]
    batch_steps: usize,
    /// Instead of gpt-oss-20b: one tensor-parallel rank's slice of this model config (e.g.
    /// fixtures/configs/mimo-v2.5-pro.json) at true dimensions, random weights in the released
    /// dtypes (FP8 qkv / dense MLP, bf16 o_proj, MXFP4 experts), and an N-GPU projection.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Ranks of the slice (`--config`): attention heads, dense MLP and LM-head rows split N
    /// ways (TP), routed experts N ways (EP: n_experts / N local experts, top_k / N per token).
    #[arg(long, default_value_t = 8)]
    tensor_parallel: usize,
    /// Assumed all-reduce latency at batch 1, µs (`--config`; default: the published one-shot
    /// custom all-reduce on 8×H100 for 4–32 KB, research/mimo-v2.md §4).
    #[arg(long, default_value_t = 6.0)]
    allreduce_us: f64,
    /// Assumed all-reduce latency for a verify block of 8 tokens, µs (98 KB bf16 at hidden
    /// 6144: between the published 32 KB 7.8 µs and 256 KB 16.7 µs points).
    #[arg(long, default_value_t = 10.0)]
    allreduce_b8_us: f64,
    /// Mean accepted tokens per DFlash round for the projection (`--config`).
    #[arg(long, default_value_t = 6.3)]
    tau: f64,
}

#[derive(Serialize)]
struct OpRow {
    op: String,
    launches_per_step: usize,
    us_per_step: f64,
    share: f64,
}

#[derive(Serialize)]
struct VerifyRow {
    block: usize,
    ms: f64,
    vs_decode: f64,
    distinct_experts_last_layer: f64,
    byte_ratio: f64,
}

#[derive(Serialize)]
struct BatchRow {
    sequences: usize,
    /// First step: max |batched − alone| / (1 + max|logit|) over the rows, and the rows whose
    /// greedy token differs.
    max_rel_logit_diff: f64,
    argmax_mismatches: usize,
    /// Batched: one `GpuBatch::decode_greedy` pass per step over all N sequences.
    batched_ms_per_step: f64,
    batched_tokens_per_s: f64,
    /// Sequential: N `GpuSession::decode_greedy` calls per step.
    sequential_ms_per_step: f64,
    sequential_tokens_per_s: f64,
    speedup: f64,
}

#[derive(Serialize)]
struct FixtureRow {
    fixture: String,
    us_per_token: f64,
    tokens_per_s: f64,
}

#[derive(Serialize)]
struct Report {
    device: String,
    date: String,
    stream_read_gbps: f64,
    weight_bytes_resident: usize,
    decode_bytes_per_token: usize,
    decode_ms_per_token: f64,
    decode_tokens_per_s: f64,
    decode_tokens_per_s_no_graphs: f64,
    roofline_tokens_per_s: f64,
    roofline_share: f64,
    context_positions: (usize, usize),
    ops: Vec<OpRow>,
    profiled_step_us: f64,
    verify: Vec<VerifyRow>,
    batch: Vec<BatchRow>,
    fixtures: Vec<FixtureRow>,
}

fn lcg(state: &mut u64) -> u32 {
    *state = state
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    (*state >> 33) as u32
}

/// Wall-clock ms per greedy decode step over `n` steps (each step waits for its token: the real
/// autoregressive latency).
fn decode_ms(s: &mut GpuSession, first: u32, n: usize) -> Result<(f64, u32)> {
    let mut tok = first;
    let t0 = Instant::now();
    for _ in 0..n {
        tok = s.decode_greedy(tok)?;
    }
    Ok((t0.elapsed().as_secs_f64() * 1e3 / n as f64, tok))
}

/// Batched decode against sequential decode of the same N sequences (each prefilled with its
/// own `prompt`-token prompt), median over `repeats` windows of `steps` greedy steps. Checks
/// first that a batched step gives every sequence the token its own decode gives.
fn batch_rows(
    gpu: &GpuModel,
    args: &Args,
    rng: &mut u64,
    counts: &[usize],
) -> Result<Vec<BatchRow>> {
    let v = gpu.config().vocab_size as u32;
    let mut batch = GpuBatch::new(gpu).context("batch buffers")?;
    let mut out = Vec::new();
    for &n in counts {
        let mut seqs = Vec::with_capacity(n);
        let mut next = Vec::with_capacity(n);
        for _ in 0..n {
            let prompt: Vec<u32> = (0..args.prompt).map(|_| lcg(rng) % v).collect();
            let mut s = gpu.session(args.max_seq).context("session")?;
            next.push(s.prefill_greedy(&prompt).context("prefill")?);
            seqs.push(s);
        }
        // Before timing: one batched step against each sequence's own step, reported (at this
        // size the expert kernels' summation order depends on the pass size, as verify's does,
        // and a random model's near-tie routing can amplify that); only non-finite logits fail.
        let mut solo = Vec::with_capacity(n);
        for (s, &t) in seqs.iter_mut().zip(&next) {
            solo.push(s.decode(t)?);
            s.truncate(s.len() - 1)?;
        }
        let mut refs: Vec<&mut GpuSession> = seqs.iter_mut().collect();
        let got = batch.decode(&mut refs, &next)?;
        let (mut diff, mut mismatches) = (0f64, 0usize);
        for (g, w) in got.iter().zip(&solo) {
            let mag = w.iter().fold(0f32, |m, x| m.max(x.abs())) as f64;
            let d = g.iter().zip(w).fold(0f32, |m, (a, b)| m.max((a - b).abs())) as f64;
            anyhow::ensure!(
                g.iter().all(|x| x.is_finite()),
                "N={n}: non-finite batched logits"
            );
            diff = diff.max(d / (1.0 + mag));
            mismatches += usize::from(argmax(g) != argmax(w));
        }
        next = got.iter().map(|l| argmax(l)).collect();
        let mut batched = Vec::new();
        let mut sequential = Vec::new();
        for rep in 0..=args.repeats {
            let mut refs: Vec<&mut GpuSession> = seqs.iter_mut().collect();
            let t0 = Instant::now();
            for _ in 0..args.batch_steps {
                next = batch.decode_greedy(&mut refs, &next)?;
            }
            let b_ms = t0.elapsed().as_secs_f64() * 1e3 / args.batch_steps as f64;
            let t0 = Instant::now();
            for _ in 0..args.batch_steps {
                for (s, t) in seqs.iter_mut().zip(next.iter_mut()) {
                    *t = s.decode_greedy(*t)?;
                }
            }
            let s_ms = t0.elapsed().as_secs_f64() * 1e3 / args.batch_steps as f64;
            if rep > 0 {
                // The first window captures the graphs.
                batched.push(b_ms);
                sequential.push(s_ms);
            }
        }
        let (b, s) = (median(&batched), median(&sequential));
        eprintln!(
            "batched decode N={n}: {b:.3} ms/step vs sequential {s:.3} ms/step (first step: max \
             |Δ|/(1+max|logit|) {diff:.2e} vs each alone, {mismatches} greedy tokens differ)"
        );
        out.push(BatchRow {
            sequences: n,
            max_rel_logit_diff: diff,
            argmax_mismatches: mismatches,
            batched_ms_per_step: b,
            batched_tokens_per_s: n as f64 * 1e3 / b,
            sequential_ms_per_step: s,
            sequential_tokens_per_s: n as f64 * 1e3 / s,
            speedup: s / b,
        });
    }
    Ok(out)
}

fn batch_markdown(rows: &[BatchRow], args: &Args) -> String {
    let mut s = format!(
        "\nBatched decode (`GpuBatch`, one pass per step over N sequences of {} prompt tokens, \
         sessions of {} positions) vs the same N sequences decoded one after another:\n\n\
         | N | batched ms/step | batched tok/s | sequential ms/step | sequential tok/s | speedup | \
         first step vs alone: max Δ/(1+max|logit|), greedy tokens differing |\n\
         |---|---|---|---|---|---|---|\n",
        args.prompt, args.max_seq
    );
    for r in rows {
        s += &format!(
            "| {} | {:.3} | {:.0} | {:.3} | {:.0} | {:.2}× | {:.1e}, {} of {} |\n",
            r.sequences,
            r.batched_ms_per_step,
            r.batched_tokens_per_s,
            r.sequential_ms_per_step,
            r.sequential_tokens_per_s,
            r.speedup,
            r.max_rel_logit_diff,
            r.argmax_mismatches,
            r.sequences
        );
    }
    s
}

const BATCH_COUNTS: [usize; 5] = [1, 2, 4, 8, 16];

fn argmax(v: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &x) in v.iter().enumerate() {
        if x > v[best] {
            best = i;
        }
    }
    best as u32
}

/// One rank's slice of `cfg` under `tp`-way tensor parallelism (attention heads, dense MLP and
/// LM-head rows split; experts split EP-style: `n_experts / tp` local experts, `top_k / tp` of
/// them per token on average).
fn rank_slice(cfg: &ModelConfig, tp: usize) -> Result<ModelConfig> {
    anyhow::ensure!(tp >= 1, "--tensor-parallel must be at least 1");
    let mut c = cfg.clone();
    for (l, spec) in c.layers.iter_mut().enumerate() {
        anyhow::ensure!(
            spec.n_heads.is_multiple_of(tp),
            "layer {l}: {} attention heads do not split {tp} ways",
            spec.n_heads
        );
        spec.n_heads /= tp;
        anyhow::ensure!(
            spec.n_kv_heads.is_multiple_of(tp) || tp.is_multiple_of(spec.n_kv_heads),
            "layer {l}: {} KV heads do not split {tp} ways",
            spec.n_kv_heads
        );
        spec.n_kv_heads = (spec.n_kv_heads / tp).max(1);
    }
    anyhow::ensure!(
        c.n_experts.is_multiple_of(tp),
        "{} experts do not split {tp} ways",
        c.n_experts
    );
    c.n_experts /= tp;
    c.top_k = (c.top_k / tp).max(1);
    if let Some(i) = c.dense_intermediate_size.as_mut() {
        anyhow::ensure!(
            i.is_multiple_of(tp),
            "dense intermediate {i} does not split {tp} ways"
        );
        *i /= tp;
    }
    c.vocab_size = c.vocab_size.div_ceil(tp);
    c.tie_word_embeddings = false;
    c.eos_token_ids.clear();
    Ok(c)
}

#[derive(Serialize)]
struct RankReport {
    device: String,
    config: String,
    tensor_parallel: usize,
    layers: usize,
    stream_read_gbps: f64,
    rank_weight_bytes_per_token: usize,
    /// The replicated router's bytes the slice does not hold (the full f32 router of every MoE
    /// layer minus the slice's local-expert bf16 router), added to the roofline and projection.
    replicated_router_extra_bytes: usize,
    decode_ms_per_token: f64,
    roofline_ms_per_token: f64,
    roofline_share: f64,
    per_layer_us: f64,
    ops: Vec<OpRow>,
    verify8_ms: f64,
    allreduce_us: f64,
    allreduce_b8_us: f64,
    allreduces_per_step: usize,
    projected_plain_tokens_per_s: f64,
    tau: f64,
    projected_dflash_tokens_per_s: f64,
}

fn rank_run(args: &Args, path: &std::path::Path) -> Result<()> {
    let text = std::fs::read_to_string(path).with_context(|| format!("{}", path.display()))?;
    let full = ModelConfig::from_json_str(&text).with_context(|| format!("{}", path.display()))?;
    let tp = args.tensor_parallel;
    let cfg = rank_slice(&full, tp)?;
    let nl = cfg.layers.len();
    let t_build = Instant::now();
    let gpu = GpuModel::synthetic_with(
        0,
        Arc::new(cfg.clone()),
        20261207,
        SyntheticDtypes::Released,
    )?;
    let info = gpu.device().info.clone();
    eprintln!(
        "{info}\n{}: rank slice of {tp}, {:.2} GB on the device in {:.1} s ({} FP8 projections)",
        path.display(),
        gpu.weight_bytes() as f64 / 1e9,
        t_build.elapsed().as_secs_f64(),
        gpu.fp8_projections()
    );
    let stream = gpu.stream().clone();
    let read_gbps = {
        let bytes = 2usize << 30;
        let mut kern = BenchKernels::new(stream.clone(), info.multiprocessors)?;
        let mut pool = stream.alloc_zeros::<u8>(bytes)?;
        kern.fill(&mut pool, 7, 0, 256)?;
        let us = median(&time_us(&stream, 11, 5, |_| {
            kern.stream_read(&pool, 0, bytes)
        })?);
        bytes as f64 / (us * 1e-6) / 1e9
    };
    let v = cfg.vocab_size as u32;
    let mut rng = 4242u64;
    let prompt: Vec<u32> = (0..args.prompt).map(|_| lcg(&mut rng) % v).collect();
    let mut s = gpu.session(args.max_seq).context("session")?;
    let mut tok = s.prefill_greedy(&prompt).context("prefill")?;
    (_, tok) = decode_ms(&mut s, tok, 16).context("decode warm-up")?;
    let mut windows = Vec::new();
    for _ in 0..args.repeats {
        let (ms, t) = decode_ms(&mut s, tok, args.tokens)?;
        tok = t;
        windows.push(ms);
    }
    let decode_ms_med = median(&windows);
    let mut per_op: BTreeMap<&'static str, Vec<f64>> = BTreeMap::new();
    let mut launches: BTreeMap<&'static str, usize> = BTreeMap::new();
    let mut steps = Vec::new();
    for rep in 0..5 {
        let times = s.profile_pass(&[tok])?;
        let mut sums: BTreeMap<&'static str, f64> = BTreeMap::new();
        for (label, ms) in &times {
            *sums.entry(label).or_default() += *ms as f64 * 1e3;
            if rep == 0 {
                *launches.entry(label).or_default() += 1;
            }
        }
        steps.push(sums.values().sum::<f64>());
        for (k, us) in sums {
            per_op.entry(k).or_default().push(us);
        }
    }
    let profiled = median(&steps);
    let ops: Vec<OpRow> = per_op
        .iter()
        .map(|(k, v)| OpRow {
            op: k.to_string(),
            launches_per_step: launches[k],
            us_per_step: median(v),
            share: median(v) / profiled,
        })
        .collect();
    let base = s.len();
    let mut vt = Vec::new();
    for rep in 0..9 {
        let toks: Vec<u32> = (0..8).map(|_| lcg(&mut rng) % v).collect();
        let t0 = Instant::now();
        let _ = s.verify_greedy(&toks)?;
        if rep > 0 {
            vt.push(t0.elapsed().as_secs_f64() * 1e3);
        }
        s.truncate(base)?;
    }
    let verify8_ms = median(&vt);
    let bytes = gpu.decode_bytes_per_token();
    let moe_layers = cfg.layers.iter().filter(|l| l.moe).count();
    let router_extra = moe_layers * (full.n_experts * 4 - cfg.n_experts * 2) * cfg.hidden_size;
    let bw = read_gbps * 1e9;
    let roofline_ms = (bytes + router_extra) as f64 / bw * 1e3;
    let router_ms = router_extra as f64 / bw * 1e3;
    // Two all-reduces per layer (after o_proj, after the MLP) and one for the LM head.
    let ars = 2 * nl + 1;
    let plain_ms = decode_ms_med + router_ms + ars as f64 * args.allreduce_us * 1e-3;
    let round_ms = verify8_ms + router_ms + ars as f64 * args.allreduce_b8_us * 1e-3;
    let r = RankReport {
        device: info.to_string(),
        config: path.display().to_string(),
        tensor_parallel: tp,
        layers: nl,
        stream_read_gbps: read_gbps,
        rank_weight_bytes_per_token: bytes,
        replicated_router_extra_bytes: router_extra,
        decode_ms_per_token: decode_ms_med,
        roofline_ms_per_token: roofline_ms,
        roofline_share: roofline_ms / (decode_ms_med + router_ms),
        per_layer_us: decode_ms_med * 1e3 / nl as f64,
        ops,
        verify8_ms,
        allreduce_us: args.allreduce_us,
        allreduce_b8_us: args.allreduce_b8_us,
        allreduces_per_step: ars,
        projected_plain_tokens_per_s: 1e3 / plain_ms,
        tau: args.tau,
        projected_dflash_tokens_per_s: args.tau * 1e3 / round_ms,
    };
    let mut md = format!(
        "{} — {} as rank 1 of {tp} (TP{tp} attention / dense / LM head, EP{tp} experts), {} \
         layers, synthetic weights in the released dtypes\n\n\
         | stream GB/s | rank bytes/token | decode ms/token | per layer µs | roofline ms (incl. \
         replicated router) | % of roofline | verify(8) ms |\n|---|---|---|---|---|---|---|\n\
         | {:.0} | {:.1} MB (+{:.1} MB router) | {:.3} | {:.1} | {:.3} | {:.0} % | {:.3} |\n\n",
        r.device,
        r.config,
        nl,
        read_gbps,
        bytes as f64 / 1e6,
        router_extra as f64 / 1e6,
        decode_ms_med,
        r.per_layer_us,
        roofline_ms,
        100.0 * r.roofline_share,
        verify8_ms
    );
    md += &format!(
        "Projection to {tp} GPUs: {ars} all-reduces per step (2 per layer + LM head) at {:.1} µs \
         (batch 1) / {:.1} µs (8 tokens), replicated f32 router streamed at the measured rate \
         (+{:.3} ms), drafter cost not included: plain **{:.0} tok/s**, DFlash at τ = {:.1}, B = 8: \
         **{:.0} tok/s**.\n\nPer-op time of one decode step (profiled graph replay, {:.1} µs):\n\n\
         | op | launches | µs/step | share |\n|---|---|---|---|\n",
        args.allreduce_us,
        args.allreduce_b8_us,
        router_ms,
        r.projected_plain_tokens_per_s,
        args.tau,
        r.projected_dflash_tokens_per_s,
        profiled
    );
    for o in &r.ops {
        md += &format!(
            "| {} | {} | {:.1} | {:.1} % |\n",
            o.op,
            o.launches_per_step,
            o.us_per_step,
            100.0 * o.share
        );
    }
    println!("{md}");
    if let Some(p) = &args.json {
        std::fs::write(p, serde_json::to_string_pretty(&r)?)?;
        std::fs::write(p.with_extension("md"), &md)?;
    }
    Ok(())
}

fn main() -> Result<()> {
    let args = Args::parse();
    if let Some(path) = args.config.clone() {
        return rank_run(&args, &path);
    }
    let gpu = ultra_benches::synthetic_gpt_oss_20b()?;
    if args.batch_only {
        let mut rng = 777u64;
        let rows = batch_rows(&gpu, &args, &mut rng, &BATCH_COUNTS)?;
        let md = format!(
            "gpt-oss-20b dimensions, synthetic weights — {}\n{}",
            gpu.device().info,
            batch_markdown(&rows, &args)
        );
        println!("{md}");
        if let Some(path) = &args.json {
            std::fs::write(path, serde_json::to_string_pretty(&rows)?)?;
            std::fs::write(path.with_extension("md"), &md)?;
        }
        return Ok(());
    }
    let config = Arc::new(gpu.config().clone());
    let info = gpu.device().info.clone();
    let stream = gpu.stream().clone();
    let resident = gpu.weight_bytes();

    // The ceiling, in the same run: a streaming read of 2 GiB.
    let read_gbps = {
        let bytes = 2usize << 30;
        let mut kern = BenchKernels::new(stream.clone(), info.multiprocessors)?;
        let mut pool = stream.alloc_zeros::<u8>(bytes)?;
        kern.fill(&mut pool, 7, 0, 256)?;
        let us = median(&time_us(&stream, 11, 5, |_| {
            kern.stream_read(&pool, 0, bytes)
        })?);
        bytes as f64 / (us * 1e-6) / 1e9
    };
    eprintln!("streaming read: {read_gbps:.0} GB/s");

    let v = config.vocab_size as u32;
    let mut rng = 12345u64;
    let prompt: Vec<u32> = (0..args.prompt).map(|_| lcg(&mut rng) % v).collect();

    // Decode with graphs.
    let mut s = gpu.session(args.max_seq).context("session")?;
    let mut tok = s.prefill_greedy(&prompt).context("prefill")?;
    let ctx_start = s.len();
    (_, tok) = decode_ms(&mut s, tok, 16).context("decode warm-up")?; // graph capture
    let mut windows = Vec::new();
    for _ in 0..args.repeats {
        let (ms, t) = decode_ms(&mut s, tok, args.tokens)?;
        tok = t;
        windows.push(ms);
    }
    let ctx_end = s.len();
    let decode_ms_med = median(&windows);
    // Without graphs (op-by-op launches), for comparison.
    let mut s2 = gpu.session(args.max_seq)?;
    s2.set_use_graphs(false);
    let t2 = s2.prefill_greedy(&prompt)?;
    let (ms_nog, _) = decode_ms(&mut s2, t2, args.tokens.min(32))?;
    drop(s2);

    let bytes = gpu.decode_bytes_per_token();
    let roofline_tps = read_gbps * 1e9 / bytes as f64;
    let tps = 1e3 / decode_ms_med;

    // Per-op breakdown: profiled graph replays of one decode step, median per op over 7.
    let mut per_op: BTreeMap<&'static str, Vec<f64>> = BTreeMap::new();
    let mut launches: BTreeMap<&'static str, usize> = BTreeMap::new();
    let mut steps = Vec::new();
    for rep in 0..7 {
        let times = s.profile_pass(&[tok])?;
        let mut sums: BTreeMap<&'static str, f64> = BTreeMap::new();
        for (label, ms) in &times {
            *sums.entry(label).or_default() += *ms as f64 * 1e3;
            if rep == 0 {
                *launches.entry(label).or_default() += 1;
            }
        }
        steps.push(sums.values().sum::<f64>());
        for (k, us) in sums {
            per_op.entry(k).or_default().push(us);
        }
    }
    let profiled_step = median(&steps);
    let mut ops: Vec<OpRow> = per_op
        .iter()
        .map(|(k, v)| OpRow {
            op: k.to_string(),
            launches_per_step: launches[k],
            us_per_step: median(v),
            share: median(v) / profiled_step,
        })
        .collect();
    ops.sort_by(|a, b| b.us_per_step.total_cmp(&a.us_per_step));

    // Verify blocks.
    let mut verify = Vec::new();
    let k = config.top_k;
    for &block in &[2usize, 4, 8, 16] {
        let base = s.len();
        let mut times = Vec::new();
        let mut distinct = Vec::new();
        for rep in 0..11 {
            let toks: Vec<u32> = (0..block).map(|_| lcg(&mut rng) % v).collect();
            let t0 = Instant::now();
            let _ = s.verify_greedy(&toks)?;
            let ms = t0.elapsed().as_secs_f64() * 1e3;
            if rep > 0 {
                times.push(ms);
            }
            let ids = s.last_routing(block)?;
            let mut set: Vec<i32> = ids;
            set.sort_unstable();
            set.dedup();
            distinct.push(set.len() as f64);
            s.truncate(base)?;
        }
        let ms = median(&times);
        let d = distinct.iter().sum::<f64>() / distinct.len() as f64;
        let byte_ratio =
            gpu.step_weight_bytes(d.round() as usize) as f64 / gpu.step_weight_bytes(k) as f64;
        verify.push(VerifyRow {
            block,
            ms,
            vs_decode: ms / decode_ms_med,
            distinct_experts_last_layer: d,
            byte_ratio,
        });
    }
    drop(s);
    let batch = batch_rows(&gpu, &args, &mut rng, &BATCH_COUNTS)?;
    drop(gpu);

    // Tiny fixtures: per-token latency (graphs, greedy).
    let mut fixtures = Vec::new();
    for rel in [
        "gpt-oss/bf16",
        "gpt-oss/mxfp4",
        "qwen3-moe/native",
        "mimo-v2-flash/native",
    ] {
        let dir = args.fixtures.join(rel);
        if !dir.exists() {
            eprintln!("{} absent: fixture latency skipped", dir.display());
            continue;
        }
        let (c, w) = model::load::load(&dir).with_context(|| format!("{}", dir.display()))?;
        let fm = GpuModel::new(0, Arc::new(c), &w)?;
        let mut fs = fm.session(512)?;
        let t = fs.prefill_greedy(&[1, 2, 3, 4, 5, 6, 7, 8])?;
        let (_, t) = decode_ms(&mut fs, t, 16)?;
        let mut w = Vec::new();
        let mut t = t;
        for _ in 0..5 {
            let (ms, nt) = decode_ms(&mut fs, t, 64)?;
            t = nt;
            w.push(ms);
        }
        let ms = median(&w);
        fixtures.push(FixtureRow {
            fixture: rel.to_string(),
            us_per_token: ms * 1e3,
            tokens_per_s: 1e3 / ms,
        });
    }

    let report = Report {
        device: info.to_string(),
        date: "2026-11-21".into(),
        stream_read_gbps: read_gbps,
        weight_bytes_resident: resident,
        decode_bytes_per_token: bytes,
        decode_ms_per_token: decode_ms_med,
        decode_tokens_per_s: tps,
        decode_tokens_per_s_no_graphs: 1e3 / ms_nog,
        roofline_tokens_per_s: roofline_tps,
        roofline_share: tps / roofline_tps,
        context_positions: (ctx_start, ctx_end),
        ops,
        profiled_step_us: profiled_step,
        verify,
        batch,
        fixtures,
    };
    let mut md = markdown(&report);
    md += &batch_markdown(&report.batch, &args);
    println!("{md}");
    if let Some(path) = &args.json {
        std::fs::write(path, serde_json::to_string_pretty(&report)?)?;
        std::fs::write(path.with_extension("md"), &md)?;
        std::fs::write(path.with_extension("svg"), svg(&report))?;
    }
    Ok(())
}

fn markdown(r: &Report) -> String {
    let mut s = String::new();
    s += &format!(
        "gpt-oss-20b dimensions, synthetic weights — {}\n\n",
        r.device
    );
    s += "| metric | value |\n|---|---|\n";
    s += &format!(
        "| streaming read (ceiling) | {:.0} GB/s |\n",
        r.stream_read_gbps
    );
    s += &format!(
        "| weight bytes per decode token | {:.3} GB |\n",
        r.decode_bytes_per_token as f64 / 1e9
    );
    s += &format!(
        "| batch-1 decode (graphs) | **{:.1} tok/s** ({:.3} ms/token, context {}..{}) |\n",
        r.decode_tokens_per_s, r.decode_ms_per_token, r.context_positions.0, r.context_positions.1
    );
    s += &format!(
        "| roofline at the ceiling | {:.1} tok/s → **{:.1} %** |\n",
        r.roofline_tokens_per_s,
        100.0 * r.roofline_share
    );
    s += &format!(
        "| decode without graphs | {:.1} tok/s |\n\n",
        r.decode_tokens_per_s_no_graphs
    );
    s += &format!(
        "Per-op time of one decode step (profiled graph replay, {:.1} µs total):\n\n",
        r.profiled_step_us
    );
    s += "| op | launches/step | µs/step | share |\n|---|---|---|---|\n";
    for o in &r.ops {
        s += &format!(
            "| {} | {} | {:.1} | {:.1} % |\n",
            o.op,
            o.launches_per_step,
            o.us_per_step,
            100.0 * o.share
        );
    }
    s += "\nVerify step (greedy, graphs):\n\n| B | ms | × decode step | distinct experts (last layer) | distinct-expert byte ratio |\n|---|---|---|---|---|\n";
    for v in &r.verify {
        s += &format!(
            "| {} | {:.3} | {:.2} | {:.1} | {:.2} |\n",
            v.block, v.ms, v.vs_decode, v.distinct_experts_last_layer, v.byte_ratio
        );
    }
    if !r.fixtures.is_empty() {
        s += "\nTiny fixtures (graphs, greedy decode):\n\n| fixture | µs/token | tok/s |\n|---|---|---|\n";
        for f in &r.fixtures {
            s += &format!(
                "| {} | {:.1} | {:.0} |\n",
                f.fixture, f.us_per_token, f.tokens_per_s
            );
        }
    }
    s
}

/// A horizontal bar chart of µs per op per decode step.
fn svg(r: &Report) -> String {
    let bar_h = 22.0;
    let left = 150.0;
    let width = 520.0;
    let max = r.ops.iter().map(|o| o.us_per_step).fold(1e-9, f64::max);
    let h = 60.0 + bar_h * r.ops.len() as f64;
    let mut s = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{}\" height=\"{h}\" font-family=\"sans-serif\" font-size=\"12\">\n",
        left + width + 120.0
    );
    s += &format!(
        "<text x=\"10\" y=\"20\" font-size=\"14\">Time per op, one gpt-oss-20b decode step ({:.0} µs; {:.0} tok/s)</text>\n",
        r.profiled_step_us, r.decode_tokens_per_s
    );
    for (i, o) in r.ops.iter().enumerate() {
        let y = 40.0 + bar_h * i as f64;
        let w = width * o.us_per_step / max;
        s += &format!(
            "<text x=\"{}\" y=\"{}\" text-anchor=\"end\">{}</text>\n",
            left - 8.0,
            y + 15.0,
            o.op
        );
        s += &format!(
            "<rect x=\"{left}\" y=\"{y}\" width=\"{w:.1}\" height=\"{}\" fill=\"#4a7ab5\"/>\n",
            bar_h - 4.0
        );
        s += &format!(
            "<text x=\"{}\" y=\"{}\">{:.1} µs ({:.1} %)</text>\n",
            left + w + 6.0,
            y + 15.0,
            o.us_per_step,
            100.0 * o.share
        );
    }
    s += "</svg>\n";
    s
}
