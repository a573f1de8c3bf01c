//! MXFP4 GEMV / dequantize on the GPU at gpt-oss-20b expert shapes, against a streaming-read
//! ceiling measured in the same run.
//!
//! Weights: `--layers` layers of 32 experts (gate_up 5760×2880, down 2880×2880), filled on the
//! device with random codes and scales, so the GEMV of one launch (4 random experts of one layer)
//! is cold in the 50 MB L2. Each measured launch rotates layer and expert set. Before timing, one
//! launch of each shape is checked against the f64 CPU reference of `fp4`.

use std::sync::Arc;

use anyhow::{bail, Context, Result};
use clap::Parser;
use cudarc::driver::{CudaSlice, CudaStream};
use fp4::cuda::{Activations, DeviceMxExperts, Mxfp4Gpu};
use half::bf16;
use rand::seq::index::sample;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::Serialize;
use ultra_benches::{median, time_us, BenchKernels};

#[derive(Parser)]
#[command(about = "MXFP4 GEMV/dequantize GPU benchmark at gpt-oss-20b expert shapes")]
struct Args {
    /// Write full results as JSON here.
    #[arg(long)]
    json: Option<std::path::PathBuf>,
    /// Layers of 32 experts in the rotation pool (423 MB each).
    #[arg(long, default_value_t = 8)]
    layers: usize,
    /// Timing samples (the median is reported).
    #[arg(long, default_value_t = 21)]
    samples: usize,
    /// Launches per sample.
    #[arg(long, default_value_t = 64)]
    iters: usize,
}

const EXPERTS: usize = 32;
const TOP_K: usize = 4;
const HIDDEN: usize = 2880;
const INTER: usize = 2880;

#[derive(Serialize)]
struct Row {
    case: String,
    bytes: usize,
    median_us: f64,
    min_us: f64,
    max_us: f64,
    gb_per_s: f64,
    /// Same-size streaming read, µs (the ceiling at this size).
    ceiling_us: Option<f64>,
    ratio_to_ceiling: Option<f64>,
}

#[derive(Serialize)]
struct Report {
    device: String,
    date_utc_unix: u64,
    layers: usize,
    samples: usize,
    iters: usize,
    checks: Vec<String>,
    rows: Vec<Row>,
}

struct Shape {
    name: &'static str,
    rows: usize,
    k: usize,
    per_slot_x: bool,
}

fn upload_random_layer(
    kern: &BenchKernels,
    stream: &Arc<CudaStream>,
    shape: &Shape,
    seed: u64,
) -> Result<DeviceMxExperts> {
    let mut w = DeviceMxExperts::alloc(stream, EXPERTS, shape.rows, shape.k)?;
    // Random codes everywhere (padding included: the kernel must ignore it); scales 2^-9 .. 2^3,
    // the range of real expert weights, far from f32 overflow.
    kern.fill(&mut w.blocks, seed, 0, 256)?;
    kern.fill(&mut w.scales, seed ^ 0x5CA1E, 118, 13)?;
    Ok(w)
}

/// Runs one GEMV and compares each output with the f64 reference; returns the worst error as a
/// fraction of the documented bound.
fn check_gemv(
    gpu: &Mxfp4Gpu,
    w: &DeviceMxExperts,
    shape: &Shape,
    rng: &mut ChaCha8Rng,
    use_bf16: bool,
) -> Result<f64> {
    let stream = gpu.stream();
    let ids: Vec<i32> = sample(rng, EXPERTS, TOP_K)
        .into_iter()
        .map(|e| e as i32)
        .collect();
    let x_rows = if shape.per_slot_x { TOP_K } else { 1 };
    let x: Vec<f32> = (0..x_rows * shape.k)
        .map(|_| {
            let v: f32 = rng.random_range(-2.0..2.0);
            if use_bf16 {
                bf16::from_f32(v).to_f32()
            } else {
                v
            }
        })
        .collect();
    let d_ids = stream.clone_htod(&ids)?;
    let mut scratch = gpu.scratch(x_rows, shape.k)?;
    let mut y = stream.alloc_zeros::<f32>(TOP_K * shape.rows)?;
    if use_bf16 {
        let xb: Vec<bf16> = x.iter().map(|&v| bf16::from_f32(v)).collect();
        let d_x = stream.clone_htod(&xb)?;
        gpu.gemv(w, &d_ids, Activations::Bf16(&d_x), &mut scratch, &mut y)?;
    } else {
        let d_x = stream.clone_htod(&x)?;
        gpu.gemv(w, &d_ids, Activations::F32(&d_x), &mut scratch, &mut y)?;
    }
    let y = stream.clone_dtoh(&y)?;
    let mut worst = 0f64;
    for (s, &e) in ids.iter().enumerate() {
        let owned = w.download_expert(stream, e as usize)?;
        let m = owned.view()?;
        let xs = &x[if shape.per_slot_x { s * shape.k } else { 0 }..][..shape.k];
        let x64: Vec<f64> = xs.iter().map(|&v| v as f64).collect();
        let want = fp4::cpu::gemv_f64_reference(m, &x64);
        let bound = fp4::cuda::gemv_error_bound(m, xs, use_bf16);
        for r in 0..shape.rows {
            let err = (y[s * shape.rows + r] as f64 - want[r]).abs();
            if !err.is_finite() {
                bail!("{}: non-finite output at slot {s} row {r}", shape.name);
            }
            worst = worst.max(err / (bound[r] + 1e-30));
        }
    }
    Ok(worst)
}

fn main() -> Result<()> {
    let args = Args::parse();
    let dev = tilert::Device::open(0).context("opening GPU 0")?;
    println!("{}", dev.info);
    // SAFETY: this program orders its single stream itself.
    unsafe { dev.ctx.disable_event_tracking() };
    let stream = dev.ctx.new_stream()?;
    let gpu = Mxfp4Gpu::new(stream.clone())?;
    let mut kern = BenchKernels::new(stream.clone(), dev.info.multiprocessors)?;
    let mut rng = ChaCha8Rng::seed_from_u64(0x0FF4);

    let shapes = [
        Shape {
            name: "gate_up 5760x2880",
            rows: 2 * INTER,
            k: HIDDEN,
            per_slot_x: false,
        },
        Shape {
            name: "down 2880x2880",
            rows: HIDDEN,
            k: INTER,
            per_slot_x: true,
        },
    ];
    let mut rows = Vec::new();
    let mut checks = Vec::new();

    // One big pool for the streaming-read ceiling (2 GiB), also used for same-size reads.
    let pool_bytes = 2usize << 30;
    let mut pool = stream.alloc_zeros::<u8>(pool_bytes)?;
    kern.fill(&mut pool, 7, 0, 256)?;

    for (si, shape) in shapes.iter().enumerate() {
        let layers: Vec<DeviceMxExperts> = (0..args.layers)
            .map(|l| upload_random_layer(&kern, &stream, shape, 1000 * si as u64 + l as u64))
            .collect::<Result<_>>()?;
        stream.synchronize()?;
        for use_bf16 in [false, true] {
            let worst = check_gemv(&gpu, &layers[0], shape, &mut rng, use_bf16)?;
            let line = format!(
                "check {} x={}: worst error {:.3} of bound",
                shape.name,
                if use_bf16 { "bf16" } else { "f32" },
                worst
            );
            println!("{line}");
            if worst > 1.0 {
                bail!("GEMV result outside the error bound: {line}");
            }
            checks.push(line);
        }

        // Timed launches: rotate layers and random expert sets.
        let n_launch = (args.samples + 1) * args.iters;
        let id_sets: Vec<CudaSlice<i32>> = (0..n_launch)
            .map(|_| {
                let ids: Vec<i32> = sample(&mut rng, EXPERTS, TOP_K)
                    .into_iter()
                    .map(|e| e as i32)
                    .collect();
                stream.clone_htod(&ids)
            })
            .collect::<Result<_, _>>()?;
        let x_rows = if shape.per_slot_x { TOP_K } else { 1 };
        let x_host: Vec<f32> = (0..x_rows * shape.k)
            .map(|_| rng.random_range(-2.0..2.0))
            .collect();
        let x_f32 = stream.clone_htod(&x_host)?;
        let x_bf16 = stream.clone_htod(
            &x_host
                .iter()
                .map(|&v| bf16::from_f32(v))
                .collect::<Vec<_>>(),
        )?;
        let mut scratch = gpu.scratch(x_rows, shape.k)?;
        let mut y = stream.alloc_zeros::<f32>(TOP_K * shape.rows)?;
        let bytes = TOP_K * layers[0].expert_bytes();

        let ceiling = time_us(&stream, args.samples, args.iters, |i| {
            let off = (i * bytes) % (pool_bytes - bytes) / 16 * 16;
            kern.stream_read(&pool, off, bytes)
        })?;
        let ceiling_med = median(&ceiling);
        rows.push(row(
            format!("stream read {:.1} MB (ceiling)", bytes as f64 / 1e6),
            bytes,
            &ceiling,
            None,
        ));
        for use_bf16 in [false, true] {
            let t = time_us(&stream, args.samples, args.iters, |i| {
                let w = &layers[i % layers.len()];
                let x = if use_bf16 {
                    Activations::Bf16(&x_bf16)
                } else {
                    Activations::F32(&x_f32)
                };
                gpu.gemv(w, &id_sets[i], x, &mut scratch, &mut y)?;
                Ok(())
            })?;
            rows.push(row(
                format!(
                    "GEMV {} x {} experts, x {}",
                    shape.name,
                    TOP_K,
                    if use_bf16 { "bf16" } else { "f32" }
                ),
                bytes,
                &t,
                Some(ceiling_med),
            ));
        }
        // The GEMV kernel alone, on activations prepared once (what a fused producer would hand it).
        gpu.prepare(Activations::F32(&x_f32), &mut scratch)?;
        let t = time_us(&stream, args.samples, args.iters, |i| {
            gpu.gemv_prepared(&layers[i % layers.len()], &id_sets[i], &scratch, &mut y)?;
            Ok(())
        })?;
        rows.push(row(
            format!("GEMV kernel only {} x {} experts", shape.name, TOP_K),
            bytes,
            &t,
            Some(ceiling_med),
        ));
        if si == 0 {
            // Dequantize a whole layer (32 experts) to bf16.
            let one = layers[0].expert_bytes();
            let values = shape.rows * shape.k;
            let mut out = stream.alloc_zeros::<bf16>(EXPERTS * values)?;
            let t = time_us(&stream, args.samples, args.iters.min(16), |i| {
                gpu.dequantize_bf16(&layers[i % layers.len()], &mut out)
                    .map_err(Into::into)
            })?;
            let moved = EXPERTS * (one + 2 * values);
            rows.push(row(
                format!(
                    "dequantize {} x 32 experts -> bf16 (read+write)",
                    shape.name
                ),
                moved,
                &t,
                None,
            ));
        }
        drop(layers);
    }

    // The large-buffer ceiling.
    let big = 1usize << 31;
    let t = time_us(&stream, args.samples.min(9), 4, |_| {
        kern.stream_read(&pool, 0, big)
    })?;
    rows.push(row("stream read 2.1 GB (ceiling)".into(), big, &t, None));

    println!();
    println!("| case | bytes | median µs | GB/s | same-size stream µs | ratio |");
    println!("|---|---:|---:|---:|---:|---:|");
    for r in &rows {
        println!(
            "| {} | {} | {:.2} | {:.0} | {} | {} |",
            r.case,
            r.bytes,
            r.median_us,
            r.gb_per_s,
            r.ceiling_us.map_or("".into(), |c| format!("{c:.2}")),
            r.ratio_to_ceiling
                .map_or("".into(), |c| format!("{:.0}%", 100.0 * c)),
        );
    }
    if let Some(path) = args.json {
        let report = Report {
            device: dev.info.to_string(),
            date_utc_unix: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)?
                .as_secs(),
            layers: args.layers,
            samples: args.samples,
            iters: args.iters,
            checks,
            rows,
        };
        std::fs::write(&path, serde_json::to_string_pretty(&report)?)?;
    }
    Ok(())
}

fn row(case: String, bytes: usize, t: &[f64], ceiling: Option<f64>) -> Row {
    let med = median(t);
    Row {
        case,
        bytes,
        median_us: med,
        min_us: t.iter().cloned().fold(f64::INFINITY, f64::min),
        max_us: t.iter().cloned().fold(0.0, f64::max),
        gb_per_s: bytes as f64 / med / 1e3,
        ceiling_us: ceiling,
        ratio_to_ceiling: ceiling.map(|c| c / med),
    }
}
