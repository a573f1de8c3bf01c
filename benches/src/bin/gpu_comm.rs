//! One-shot all-reduce latency (`comm`, `kernels/comm.cu`) with N VIRTUAL ranks on one GPU,
//! against NCCL on a single-GPU communicator.
//!
//! Virtual ranks (N buffers, flag tables and streams on one device, every rank's kernel running
//! concurrently and waiting for the others through the same flags real peers use) measure the
//! protocol's floor on one device: flag round trips through L2 instead of NVLink, and N ranks
//! sharing one GPU's SMs and memory. **This is not multi-GPU latency** (issue #19 makes the real
//! runs); it bounds the kernel's own overhead and checks that it composes with CUDA graphs.
//!
//! Per case: one correctness check against the host's rank-order f32 sum (bit-equal), then
//! `--samples` samples of `--iters` back-to-back all-reduces, eager (N launches per all-reduce)
//! and graph-captured (one graph of `--iters` all-reduces per rank, the ranks' graphs launched on
//! their own streams), timed with CUDA events around a fork/join of the ranks' streams; the
//! median per all-reduce is reported.

use std::sync::Arc;

use anyhow::{bail, Context, Result};
use clap::Parser;
use comm::{AllReduce, DType, Epilogue, NcclComms, SymmetricGroup};
use cudarc::driver::sys::{CUevent_flags, CUgraphInstantiate_flags, CUstreamCaptureMode};
use cudarc::driver::{CudaGraph, CudaSlice, CudaStream, DevicePtr};
use half::bf16;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::Serialize;
use ultra_benches::median;

#[derive(Parser)]
#[command(
    about = "One-shot all-reduce latency with virtual ranks on one GPU, and NCCL on one rank"
)]
struct Args {
    /// Write full results as JSON here.
    #[arg(long)]
    json: Option<std::path::PathBuf>,
    /// Timing samples (the median is reported).
    #[arg(long, default_value_t = 15)]
    samples: usize,
    /// All-reduces per sample (and per captured graph).
    #[arg(long, default_value_t = 100)]
    iters: usize,
    /// Real ranks too (a multi-GPU machine, issue #19 run 1): the one-shot all-reduce and NCCL
    /// over the first 2, 4 and 8 of these GPUs (one rank per GPU, NVLS off), in the same run.
    #[arg(long, value_delimiter = ',')]
    devices: Option<Vec<usize>>,
}

#[derive(Serialize)]
struct Row {
    case: String,
    ranks: usize,
    bytes: usize,
    eager_us: f64,
    graph_us: f64,
    eager_min_us: f64,
    graph_min_us: f64,
}

#[derive(Serialize)]
struct Report {
    device: String,
    note: &'static str,
    nccl: String,
    samples: usize,
    iters: usize,
    rows: Vec<Row>,
}

const NOTE: &str = "virtual ranks share one GPU: this is the one-shot protocol's floor on one \
                    device, not multi-GPU latency (issue #19 measures real ranks)";

/// Times `samples` × (`iters` calls of `enqueue`), forked from and joined to `main` over the
/// ranks' `streams`; returns µs per call, one per sample (after one warm-up sample).
fn time_forked(
    main: &Arc<CudaStream>,
    streams: &[Arc<CudaStream>],
    samples: usize,
    iters: usize,
    mut enqueue: impl FnMut() -> Result<()>,
) -> Result<Vec<f64>> {
    let mut out = Vec::new();
    for s in 0..=samples {
        let start = main.record_event(Some(CUevent_flags::CU_EVENT_DEFAULT))?;
        for st in streams {
            st.wait(&start)?;
        }
        enqueue()?;
        for st in streams {
            let done = st.record_event(Some(CUevent_flags::CU_EVENT_DISABLE_TIMING))?;
            main.wait(&done)?;
        }
        let end = main.record_event(Some(CUevent_flags::CU_EVENT_DEFAULT))?;
        let ms = start.elapsed_ms(&end)? as f64;
        if s > 0 {
            out.push(ms * 1e3 / iters as f64);
        }
    }
    Ok(out)
}

fn summarize(case: String, ranks: usize, bytes: usize, eager: &[f64], graph: &[f64]) -> Row {
    let min = |v: &[f64]| v.iter().copied().fold(f64::INFINITY, f64::min);
    Row {
        case,
        ranks,
        bytes,
        eager_us: median(eager),
        graph_us: median(graph),
        eager_min_us: min(eager),
        graph_min_us: min(graph),
    }
}

fn ptr<T>(s: &Arc<CudaStream>, d: &CudaSlice<T>) -> u64 {
    d.device_ptr(s).0
}

/// One case of the one-shot all-reduce: `ops[r]` on every rank, checked then timed.
fn one_shot_case(
    g: &SymmetricGroup,
    main: &Arc<CudaStream>,
    ops: &[AllReduce],
    args: &Args,
) -> Result<(Vec<f64>, Vec<f64>)> {
    let ranks = g.ranks();
    let streams: Vec<_> = (0..ranks).map(|r| g.stream(r).clone()).collect();
    let launch_all = || -> Result<()> {
        for (r, op) in ops.iter().enumerate() {
            // SAFETY: the caller's buffers are live for the whole case.
            unsafe { g.all_reduce(r, op) }?;
        }
        Ok(())
    };
    let eager = time_forked(main, &streams, args.samples, args.iters, || {
        for _ in 0..args.iters {
            launch_all()?;
        }
        Ok(())
    })?;
    g.check()?;
    let mut graphs: Vec<CudaGraph> = Vec::new();
    for (r, op) in ops.iter().enumerate() {
        let st = &streams[r];
        st.begin_capture(CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL)?;
        let mut res = Ok(());
        for _ in 0..args.iters {
            // SAFETY: as above.
            res = unsafe { g.all_reduce(r, op) };
            if res.is_err() {
                break;
            }
        }
        let graph = st.end_capture(CUgraphInstantiate_flags(0))?;
        res?;
        let graph = graph.context("capture produced no graph")?;
        graph.upload()?;
        graphs.push(graph);
    }
    let graph = time_forked(main, &streams, args.samples, args.iters, || {
        for gr in &graphs {
            gr.launch()?;
        }
        Ok(())
    })?;
    g.check()?;
    Ok((eager, graph))
}

fn main() -> Result<()> {
    let args = Args::parse();
    comm::symmetric::prepare_virtual_ranks();
    let ctx = ultra_kernels::open_device(0).context("opening GPU 0")?;
    // SAFETY: this program orders its streams itself (events, explicit synchronisation).
    unsafe { ctx.disable_event_tracking() };
    let device = ctx.name()?;
    println!("{device}\n{NOTE}");
    let main_stream = ctx.new_stream()?;
    let s = &main_stream;
    let mut rng = ChaCha8Rng::seed_from_u64(0xA11_2ED);
    let mut rows = Vec::new();

    for ranks in [1usize, 2, 4, 8] {
        let g = SymmetricGroup::virtual_ranks(&ctx, ranks, 1 << 20)?;
        // Plain all-reduce of bf16 partials (out = Σ, bf16).
        for bytes in [8usize << 10, 64 << 10, 1 << 20] {
            let n = bytes / 2;
            let parts: Vec<Vec<bf16>> = (0..ranks)
                .map(|_| {
                    (0..n)
                        .map(|_| bf16::from_f32(rng.random_range(-2.0..2.0)))
                        .collect()
                })
                .collect();
            let ins: Vec<_> = parts
                .iter()
                .map(|p| s.clone_htod(p))
                .collect::<Result<_, _>>()?;
            let outs: Vec<_> = (0..ranks)
                .map(|_| s.clone_htod(&vec![bf16::NAN; n]))
                .collect::<Result<_, _>>()?;
            s.synchronize()?;
            let ops: Vec<AllReduce> = (0..ranks)
                .map(|r| AllReduce {
                    dtype: DType::Bf16,
                    rows: 1,
                    width: n,
                    input: ptr(s, &ins[r]),
                    epilogue: Epilogue::Out {
                        out: ptr(s, &outs[r]),
                    },
                })
                .collect();
            let (eager, graph) = one_shot_case(&g, s, &ops, &args)?;
            for (r, o) in outs.iter().enumerate() {
                let got = s.clone_dtoh(o)?;
                for i in 0..n {
                    let mut acc = parts[0][i].to_f32();
                    for p in &parts[1..] {
                        acc += p[i].to_f32();
                    }
                    if got[i].to_bits() != bf16::from_f32(acc).to_bits() {
                        bail!(
                            "{ranks} ranks, {bytes} B: rank {r} element {i}: {} vs {acc}",
                            got[i]
                        );
                    }
                }
            }
            rows.push(summarize(
                format!("one-shot bf16 {} KB", bytes >> 10),
                ranks,
                bytes,
                &eager,
                &graph,
            ));
        }
        // Fused x += Σ; h = rmsnorm(x)·w, one row of bf16 partials (gpt-oss and MiMo widths).
        for width in [2880usize, 6144] {
            let parts: Vec<Vec<bf16>> = (0..ranks)
                .map(|_| {
                    (0..width)
                        .map(|_| bf16::from_f32(rng.random_range(-2.0..2.0)))
                        .collect()
                })
                .collect();
            let ins: Vec<_> = parts
                .iter()
                .map(|p| s.clone_htod(p))
                .collect::<Result<_, _>>()?;
            let x0: Vec<f32> = (0..width).map(|_| rng.random_range(-1.0..1.0)).collect();
            let xs: Vec<_> = (0..ranks)
                .map(|_| s.clone_htod(&x0))
                .collect::<Result<_, _>>()?;
            let hs: Vec<_> = (0..ranks)
                .map(|_| s.alloc_zeros::<f32>(width))
                .collect::<Result<_, _>>()?;
            let w = s.clone_htod(&vec![1.0f32; width])?;
            s.synchronize()?;
            let ops: Vec<AllReduce> = (0..ranks)
                .map(|r| AllReduce {
                    dtype: DType::Bf16,
                    rows: 1,
                    width,
                    input: ptr(s, &ins[r]),
                    epilogue: Epilogue::ResidualNorm {
                        x: ptr(s, &xs[r]),
                        h: ptr(s, &hs[r]),
                        w: ptr(s, &w),
                        eps: 1e-5,
                    },
                })
                .collect();
            let (eager, graph) = one_shot_case(&g, s, &ops, &args)?;
            let h = s.clone_dtoh(&hs[0])?;
            if h.iter().any(|v| !v.is_finite()) {
                bail!("fused all-reduce + RMSNorm produced a non-finite value");
            }
            rows.push(summarize(
                format!("one-shot + residual + RMSNorm, 1×{width} bf16"),
                ranks,
                width * 2,
                &eager,
                &graph,
            ));
        }
    }

    // NCCL on one rank (a copy through NCCL's kernels: its launch + protocol floor).
    let nccl = match NcclComms::new(vec![ctx.new_stream()?]) {
        Ok(c) => {
            let v = comm::nccl_version()?;
            let st = c.stream(0).clone();
            for bytes in [8usize << 10, 64 << 10, 1 << 20] {
                let n = bytes / 2;
                let send = vec![st.clone_htod(&vec![bf16::from_f32(1.5); n])?];
                let mut recv = vec![st.alloc_zeros::<bf16>(n)?];
                let streams = [st.clone()];
                let eager = time_forked(s, &streams, args.samples, args.iters, || {
                    for _ in 0..args.iters {
                        c.all_reduce(&send, &mut recv)?;
                    }
                    Ok(())
                })?;
                st.begin_capture(CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL)?;
                let mut res = Ok(());
                for _ in 0..args.iters {
                    res = c.all_reduce(&send, &mut recv);
                    if res.is_err() {
                        break;
                    }
                }
                let graph = st.end_capture(CUgraphInstantiate_flags(0))?;
                res?;
                let graph = graph.context("NCCL capture produced no graph")?;
                graph.upload()?;
                let graphed = time_forked(s, &streams, args.samples, args.iters, || {
                    graph.launch()?;
                    Ok(())
                })?;
                st.synchronize()?;
                if st
                    .clone_dtoh(&recv[0])?
                    .iter()
                    .any(|&x| x != bf16::from_f32(1.5))
                {
                    bail!("NCCL all-reduce on one rank did not copy its input");
                }
                rows.push(summarize(
                    format!("NCCL all_reduce bf16 {} KB", bytes >> 10),
                    1,
                    bytes,
                    &eager,
                    &graphed,
                ));
            }
            format!("NCCL {v}")
        }
        Err(e) => {
            println!("NCCL rows skipped: {e}");
            format!("unavailable: {e}")
        }
    };

    if let Some(devices) = &args.devices {
        real_ranks(devices, &args, &mut rng, &mut rows)?;
    }

    println!(
        "\n{NOTE}\n{nccl}; median (min) µs per all-reduce over {} samples of {} calls",
        args.samples, args.iters
    );
    println!("| case | ranks | bytes | eager µs | graph µs |");
    println!("|---|---:|---:|---:|---:|");
    for r in &rows {
        println!(
            "| {} | {} | {} | {:.2} ({:.2}) | {:.2} ({:.2}) |",
            r.case, r.ranks, r.bytes, r.eager_us, r.eager_min_us, r.graph_us, r.graph_min_us
        );
    }
    if let Some(path) = &args.json {
        let report = Report {
            device,
            note: NOTE,
            nccl,
            samples: args.samples,
            iters: args.iters,
            rows,
        };
        std::fs::write(path, serde_json::to_string_pretty(&report)?)?;
    }
    Ok(())
}

/// The one-shot all-reduce and NCCL over real ranks: the first N of `devices` for N = 2, 4, 8
/// (as many as listed), bf16 8 KB / 64 KB / 1 MB, each checked bit-equal to the host's rank-order
/// f32 sum (one-shot) or to the exact sum (NCCL, small integers), then timed eager and
/// graph-captured (NCCL's graph row is NaN where its capture over several GPUs fails).
fn real_ranks(
    devices: &[usize],
    args: &Args,
    rng: &mut ChaCha8Rng,
    rows: &mut Vec<Row>,
) -> Result<()> {
    comm::disable_nvls();
    println!("{}", comm::Topology::probe()?);
    for n in [2usize, 4, 8].into_iter().filter(|&n| n <= devices.len()) {
        let gpus = &devices[..n];
        let g = SymmetricGroup::on_devices(gpus, 1 << 20)
            .with_context(|| format!("one-shot group on GPUs {gpus:?}"))?;
        let main = g.stream(0).context().new_stream()?;
        for bytes in [8usize << 10, 64 << 10, 1 << 20] {
            let m = bytes / 2;
            let parts: Vec<Vec<bf16>> = (0..n)
                .map(|_| {
                    (0..m)
                        .map(|_| bf16::from_f32(rng.random_range(-2.0..2.0)))
                        .collect()
                })
                .collect();
            let mut ins = Vec::new();
            let mut outs = Vec::new();
            for (r, p) in parts.iter().enumerate() {
                let st = g.stream(r);
                ins.push(st.clone_htod(p)?);
                outs.push(st.clone_htod(&vec![bf16::NAN; m])?);
                st.synchronize()?;
            }
            let ops: Vec<AllReduce> = (0..n)
                .map(|r| AllReduce {
                    dtype: DType::Bf16,
                    rows: 1,
                    width: m,
                    input: ptr(g.stream(r), &ins[r]),
                    epilogue: Epilogue::Out {
                        out: ptr(g.stream(r), &outs[r]),
                    },
                })
                .collect();
            let (eager, graph) = one_shot_case(&g, &main, &ops, args)?;
            for (r, o) in outs.iter().enumerate() {
                let got = g.stream(r).clone_dtoh(o)?;
                for i in 0..m {
                    let mut acc = parts[0][i].to_f32();
                    for p in &parts[1..] {
                        acc += p[i].to_f32();
                    }
                    if got[i].to_bits() != bf16::from_f32(acc).to_bits() {
                        bail!(
                            "GPUs {gpus:?}, {bytes} B: rank {r} element {i}: {} vs {acc}",
                            got[i]
                        );
                    }
                }
            }
            rows.push(summarize(
                format!("one-shot bf16 {} KB, GPUs {gpus:?}", bytes >> 10),
                n,
                bytes,
                &eager,
                &graph,
            ));
        }
        drop(g);
        let streams = gpus
            .iter()
            .map(|&d| Ok(ultra_kernels::open_device(d)?.new_stream()?))
            .collect::<Result<Vec<_>>>()?;
        let c = NcclComms::new(streams.clone()).context("NCCL over the GPUs")?;
        for bytes in [8usize << 10, 64 << 10, 1 << 20] {
            let m = bytes / 2;
            let send = streams
                .iter()
                .enumerate()
                .map(|(r, st)| Ok(st.clone_htod(&vec![bf16::from_f32(r as f32 + 1.0); m])?))
                .collect::<Result<Vec<_>>>()?;
            let mut recv = streams
                .iter()
                .map(|st| Ok(st.alloc_zeros::<bf16>(m)?))
                .collect::<Result<Vec<_>>>()?;
            let eager = time_forked(&main, &streams, args.samples, args.iters, || {
                for _ in 0..args.iters {
                    c.all_reduce(&send, &mut recv)?;
                }
                Ok(())
            })?;
            let want = bf16::from_f32((n * (n + 1) / 2) as f32);
            for (r, st) in streams.iter().enumerate() {
                if st.clone_dtoh(&recv[r])?.iter().any(|&x| x != want) {
                    bail!("NCCL all-reduce over GPUs {gpus:?}: rank {r} is not the sum");
                }
            }
            let graph =
                nccl_graph(&c, &main, &streams, &send, &mut recv, args).unwrap_or_else(|e| {
                    println!("NCCL graph capture over GPUs {gpus:?}: {e:#}");
                    vec![f64::NAN]
                });
            rows.push(summarize(
                format!("NCCL all_reduce bf16 {} KB, GPUs {gpus:?}", bytes >> 10),
                n,
                bytes,
                &eager,
                &graph,
            ));
        }
    }
    Ok(())
}

/// `args.iters` NCCL all-reduces captured on every rank's stream, timed as graph launches.
fn nccl_graph(
    c: &NcclComms,
    main: &Arc<CudaStream>,
    streams: &[Arc<CudaStream>],
    send: &[CudaSlice<bf16>],
    recv: &mut [CudaSlice<bf16>],
    args: &Args,
) -> Result<Vec<f64>> {
    for st in streams {
        st.synchronize()?;
        st.begin_capture(CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL)?;
    }
    let mut res = Ok(());
    for _ in 0..args.iters {
        res = c.all_reduce(send, recv);
        if res.is_err() {
            break;
        }
    }
    let mut graphs = Vec::new();
    for st in streams {
        graphs.push(st.end_capture(CUgraphInstantiate_flags(0)));
    }
    res?;
    let mut ready = Vec::new();
    for g in graphs {
        let g = g?.context("NCCL capture produced no graph")?;
        g.upload()?;
        ready.push(g);
    }
    time_forked(main, streams, args.samples, args.iters, || {
        for g in &ready {
            g.launch()?;
        }
        Ok(())
    })
}
