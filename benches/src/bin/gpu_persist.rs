//! The persistent engine on the GPU: the compiled per-SM streams of a model's decode step
//! (`tilert::persistent`) run by the resident runtime with schedule-replay tile bodies (each
//! tile streams the bytes the compiler assigns it, no math), and the real engine
//! (`PersistentSession`: `pk_step`, the ops' math), against the same run's streaming read
//! ceiling and — A/B on the same GPU, same synthetic weights, same tokens — the graph
//! executor's decode step (with the largest logit difference between the two engines). Prints the per-SM timeline summary (per-layer fixed overhead, idle share
//! per SM, GB/s per op) and with `--timeline FILE` writes FILE.json (Chrome trace / Perfetto)
//! and FILE.svg (bubble chart).

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use anyhow::{Context, Result};
use clap::Parser;
use model::config::ModelConfig;
use model::plan::{PassShape, Plan, WeightStorage};
use tilert::persistent::{compile, timeline, CompileOptions, Replay};
use ultra_benches::{median, time_us, BenchKernels, GPT_OSS_20B_CONFIG};

#[derive(Parser)]
struct Args {
    /// Model config (config.json); default gpt-oss-20b.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Cached positions before the decoded token.
    #[arg(long, default_value_t = 512)]
    context: usize,
    /// Write the timeline of one step to FILE.json and FILE.svg (default with --json: beside it,
    /// `<json stem>-timeline.{json,svg}`).
    #[arg(long)]
    timeline: Option<PathBuf>,
    /// Skip the real decode steps of both engines (no synthetic model build).
    #[arg(long)]
    no_graph: bool,
    /// Decode steps per graph-executor window.
    #[arg(long, default_value_t = 64)]
    tokens: usize,
    /// Write the results as JSON here.
    #[arg(long)]
    json: Option<PathBuf>,
}

const DEVICE_STORAGE: WeightStorage = WeightStorage {
    expert_bytes: 17.0 / 32.0,
    dense_bytes: 2.0,
    kv_bytes: 4.0,
    mxfp4_experts: true,
    label: "bf16 dense, MXFP4 experts, f32 KV (device)",
};

fn main() -> Result<()> {
    let args = Args::parse();
    let text = match &args.config {
        Some(p) => std::fs::read_to_string(p).with_context(|| format!("{}", p.display()))?,
        None => GPT_OSS_20B_CONFIG.to_string(),
    };
    let mut config = ModelConfig::from_json_str(&text)?;
    config.eos_token_ids.clear();
    let dev = tilert::Device::open(0)?;
    let info = dev.info.clone();
    eprintln!("{info}");
    let stream = dev.ctx.default_stream();

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

    let shape = PassShape::decode(args.context).with_sample();
    let plan = Plan::new(&config, DEVICE_STORAGE, shape)?;
    let weight_bytes = plan.totals().weight_bytes;
    let opts = CompileOptions {
        bandwidth: read_gbps * 1e9,
        ..CompileOptions::h100().with_sms(info.multiprocessors as usize)
    };
    let t = Instant::now();
    let prog = compile(&plan, &opts)?;
    let compile_ms = t.elapsed().as_secs_f64() * 1e3;
    let report = tilert::persistent::validate(&prog)?;
    eprintln!(
        "compiled {} layers: {} phases, {} tiles, {} instructions, {} counters in {compile_ms:.0} ms; predicted {:.1} µs",
        config.layers.len(),
        prog.phases.len(),
        prog.tiles(),
        report.instructions,
        report.counters,
        prog.predicted_s * 1e6
    );
    let replay = Replay::new(stream.clone(), &prog, false)?;
    let replay_us = median(&time_us(&stream, 11, 20, |_| Ok(replay.launch()?))?);
    drop(replay);
    let traced = Replay::new(stream.clone(), &prog, true)?;
    for _ in 0..3 {
        traced.launch()?;
    }
    stream.synchronize()?;
    let traced_us = median(&time_us(&stream, 5, 5, |_| Ok(traced.launch()?))?);
    let trace = traced.trace()?.context("trace buffer")?;
    let tl = timeline::build(&prog, &trace, read_gbps * 1e9).map_err(anyhow::Error::msg)?;
    drop(traced);
    print!("{}", tl.summary());
    // With --json alone (the bundle's runner), the timeline goes beside it.
    let timeline_path = args.timeline.clone().or_else(|| {
        args.json.as_ref().map(|j| {
            let stem = j
                .file_stem()
                .map_or("gpu-persist".into(), |s| s.to_string_lossy().into_owned());
            j.with_file_name(format!("{stem}-timeline"))
        })
    });
    if let Some(path) = &timeline_path {
        std::fs::write(path.with_extension("json"), tl.chrome_json())?;
        std::fs::write(path.with_extension("svg"), tl.svg())?;
        eprintln!(
            "timeline: {}.{{json,svg}}",
            path.with_extension("").display()
        );
    }

    // The real steps of both engines on one synthetic model, same prompt, same tokens.
    let (graph_us, persist_us, max_diff) = if args.no_graph {
        (None, None, None)
    } else {
        let gpu = tilert::exec::GpuModel::synthetic(0, Arc::new(config.clone()), 20261121)?;
        let v = config.vocab_size as u32;
        let prompt: Vec<u32> = (0..args.context as u32)
            .map(|i| (i * 7919 + 13) % v)
            .collect();
        let time_steps = |step: &mut dyn FnMut(u32) -> Result<u32>, mut tok: u32| -> Result<f64> {
            for _ in 0..16 {
                tok = step(tok)?;
            }
            let mut w = Vec::new();
            for _ in 0..3 {
                let t0 = Instant::now();
                for _ in 0..args.tokens {
                    tok = step(tok)?;
                }
                w.push(t0.elapsed().as_secs_f64() * 1e6 / args.tokens as f64);
            }
            Ok(median(&w))
        };
        let mut s = gpu.session(args.context + 256)?;
        let tok = s.prefill_greedy(&prompt)?;
        let graph = time_steps(&mut |t| Ok(s.decode_greedy(t)?), tok)?;
        drop(s);
        let persist = match tilert::persistent::PersistentSession::new(&gpu, args.context + 256) {
            Ok(mut p) => {
                // One step of each engine from the same state: the largest logit difference.
                let mut g = gpu.session(args.context + 256)?;
                g.prefill(&prompt)?;
                p.prefill(&prompt)?;
                let lg = g.decode(tok)?;
                let lp = p.decode(tok)?;
                let diff = lg
                    .iter()
                    .zip(&lp)
                    .map(|(a, b)| (a - b).abs())
                    .fold(0f32, f32::max);
                drop(g);
                let t = time_steps(&mut |t| Ok(p.decode_greedy(t)?), tok)?;
                Some((t, diff))
            }
            Err(e) => {
                eprintln!("persistent engine: {e}");
                None
            }
        };
        (Some(graph), persist.map(|p| p.0), persist.map(|p| p.1))
    };

    let roofline_us = weight_bytes / (read_gbps * 1e9) * 1e6;
    let layers = config.layers.len() as f64;
    println!(
        "\n{} — {} layers, decode at context {}, {:.3} GB of weights per step\n",
        info,
        config.layers.len(),
        args.context,
        weight_bytes / 1e9
    );
    println!("| measure | µs per step | tok/s | share of roofline |");
    println!("|---|---|---|---|");
    let row = |name: &str, us: f64| {
        println!(
            "| {name} | {us:.1} | {:.0} | {:.1} % |",
            1e6 / us,
            roofline_us / us * 100.0
        )
    };
    println!("| streaming read (ceiling) | {read_gbps:.0} GB/s | | |");
    row("byte roofline at the ceiling", roofline_us);
    row(
        "compiler's prediction (list schedule)",
        prog.predicted_s * 1e6,
    );
    row("persistent schedule replay (no math)", replay_us);
    row("persistent schedule replay, timeline on", traced_us);
    if let Some(g) = graph_us {
        row("graph executor decode (real math)", g);
    }
    if let Some(p) = persist_us {
        row("persistent engine decode (real math, pk_step)", p);
    }
    if let Some(d) = max_diff {
        println!("\npersistent vs graph executor: max |Δ logit| = {d:e} (one step, same state)");
    }
    println!(
        "\nreplay fixed overhead per layer: {:.2} µs ((replay − roofline) / layers)",
        (replay_us - roofline_us) / layers
    );
    if let Some(path) = &args.json {
        let fixed: Vec<f64> = tl.layers.iter().map(|l| l.fixed_ns / 1e3).collect();
        let v = serde_json::json!({
            "device": info.to_string(),
            "layers": config.layers.len(),
            "context": args.context,
            "weight_bytes": weight_bytes,
            "stream_read_gbps": read_gbps,
            "roofline_us": roofline_us,
            "predicted_us": prog.predicted_s * 1e6,
            "replay_us": replay_us,
            "replay_traced_us": traced_us,
            "graph_decode_us": graph_us,
            "persistent_decode_us": persist_us,
            "persistent_vs_graph_max_abs_logit_diff": max_diff,
            "timeline_fixed_overhead_us_per_layer": fixed,
            "instructions": report.instructions,
            "counters": report.counters,
        });
        std::fs::write(path, serde_json::to_string_pretty(&v)?)?;
    }
    Ok(())
}
