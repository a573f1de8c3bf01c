//! Dense projections from FP8 (e4m3, 128×128 block scales) and BF16 weights on the GPU
//! (`kernels/proj.cu`, `tilert::ops::proj`) at MiMo-V2.5-Pro and gpt-oss-20b projection shapes,
//! T = 1 / 2 / 4 / 8 / 16, against a same-size streaming read measured in the same run: per (shape,
//! T) the launch `ProjOps::choose` takes, every bulk-copy shape that fits, the row-group launch,
//! stream-K, and the row-major bf16 `linear` (`kernels/linear.cu`; FP8 cases: the bf16-widened
//! copy, twice the bytes, timed against its own same-size read). The last table gives per (shape,
//! T) the chosen launch, the fastest bulk shape and the other families, each as µs and % of the
//! same-size read.
//!
//! Each case uploads random weights once (host-generated, FP8 without NaN codes), checks one
//! launch at T = 1 and T = 16 against an f64 CPU reference on sampled rows, then copies the
//! weights on the device until the rotation pool holds ≥ 256 MB (5× the H100's 50 MB L2), so
//! every timed launch reads its weights from DRAM. Times: CUDA events around `--iters`
//! back-to-back launches, `--samples` times; the median per launch is reported.
//! Bytes = the tiled weights (row / column padding included) + FP8 scales; activations and
//! outputs (≤ 16 rows) are not counted. Ratio = same-size stream read time / kernel time.

use anyhow::{bail, Context, Result};
use clap::Parser;
use cudarc::driver::CudaStream;
use half::bf16;
use model::weights::f8_e4m3;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::Serialize;
use tilert::arena::{dtod, dtoh, htod, Arena, DPtr};
use tilert::ops::proj::{ProjData, ProjLaunch, ProjMatrix, ProjOps};
use tilert::ops::Ops;
use tilert::tensor::{DenseData, DeviceMatrix};
use ultra_benches::{median, time_us, BenchKernels};

#[derive(Parser)]
#[command(about = "FP8 / BF16 projection GEMV benchmark (MiMo-V2.5-Pro and gpt-oss-20b shapes)")]
struct Args {
    /// Write full results as JSON here.
    #[arg(long)]
    json: Option<std::path::PathBuf>,
    /// Timing samples (the median is reported).
    #[arg(long, default_value_t = 21)]
    samples: usize,
    /// Launches per sample.
    #[arg(long, default_value_t = 32)]
    iters: usize,
    /// Only cases whose name contains this.
    #[arg(long)]
    only: Option<String>,
}

#[derive(Serialize)]
struct Row {
    case: String,
    dtype: String,
    rows: usize,
    cols: usize,
    tokens: usize,
    kernel: String,
    bytes: usize,
    median_us: f64,
    min_us: f64,
    max_us: f64,
    gb_per_s: f64,
    /// Same-size streaming read, µs (the ceiling at this size).
    ceiling_us: f64,
    ratio_to_ceiling: f64,
}

#[derive(Serialize)]
struct Report {
    device: String,
    date_utc_unix: u64,
    samples: usize,
    iters: usize,
    big_stream_gb_per_s: f64,
    checks: Vec<String>,
    rows: Vec<Row>,
}

struct Case {
    name: &'static str,
    rows: usize,
    cols: usize,
    fp8: bool,
}

const CASES: &[Case] = &[
    // MiMo-V2.5-Pro, one TP8 rank: qkv = one KV group (3392 rows, stored padded to 27 blocks of
    // 128), dense gate_up (2 × 16384 / 8) and down (K = 16384 / 8) FP8, o_proj (K = 16384 / 8) BF16.
    Case {
        name: "mimo qkv/rank",
        rows: 3456,
        cols: 6144,
        fp8: true,
    },
    Case {
        name: "mimo dense gate_up/rank",
        rows: 4096,
        cols: 6144,
        fp8: true,
    },
    Case {
        name: "mimo dense down/rank",
        rows: 6144,
        cols: 2048,
        fp8: true,
    },
    Case {
        name: "mimo o_proj/rank",
        rows: 6144,
        cols: 2048,
        fp8: false,
    },
    // MiMo-V2.5-Pro whole matrices.
    Case {
        name: "mimo qkv",
        rows: 27136,
        cols: 6144,
        fp8: true,
    },
    Case {
        name: "mimo dense gate",
        rows: 16384,
        cols: 6144,
        fp8: true,
    },
    Case {
        name: "mimo o_proj",
        rows: 6144,
        cols: 16384,
        fp8: false,
    },
    // gpt-oss-20b attention (bf16 in the checkpoint; FP8 at the same shapes for comparison).
    Case {
        name: "gpt-oss qkv",
        rows: 5120,
        cols: 2880,
        fp8: false,
    },
    Case {
        name: "gpt-oss o_proj",
        rows: 2880,
        cols: 4096,
        fp8: false,
    },
    Case {
        name: "gpt-oss qkv",
        rows: 5120,
        cols: 2880,
        fp8: true,
    },
    Case {
        name: "gpt-oss o_proj",
        rows: 2880,
        cols: 4096,
        fp8: true,
    },
];

const TOKENS: [usize; 5] = [1, 2, 4, 8, 16];
const POOL_BYTES: usize = 256 << 20;

/// Host weights of one case: exact values of sampled rows for the check, and the upload.
struct HostWeight {
    m: ProjMatrix,
    /// Row-major bf16 copy on the device for today's `linear` (for FP8 cases the values
    /// rounded to bf16: the bytes the widening upload streamed; timing only).
    dense: Option<DeviceMatrix>,
    /// Whether `dense` holds this weight's exact values (checked) or a rounded copy.
    dense_exact: bool,
    /// Exact values of rows `0, step, 2·step, ...` (f64).
    sample_rows: Vec<(usize, Vec<f64>)>,
}

fn make_weight(
    arena: &mut Arena,
    rng: &mut ChaCha8Rng,
    case: &Case,
    step: usize,
) -> Result<HostWeight> {
    let (rows, cols) = (case.rows, case.cols);
    if case.fp8 {
        let codes: Vec<u8> = (0..rows * cols)
            .map(|_| loop {
                let c: u8 = rng.random();
                if c & 0x7f != 0x7f {
                    break c;
                }
            })
            .collect();
        let sc = cols.div_ceil(128);
        let scales: Vec<f32> = (0..rows.div_ceil(128) * sc)
            .map(|_| 2f32.powf(rng.random_range(-12.0..-3.0)))
            .collect();
        let sample_rows = (0..rows)
            .step_by(step)
            .map(|r| {
                let v = (0..cols)
                    .map(|c| {
                        f8_e4m3(codes[r * cols + c]) as f64
                            * scales[(r / 128) * sc + c / 128] as f64
                    })
                    .collect();
                (r, v)
            })
            .collect();
        let m = ProjMatrix::upload_fp8(arena, &codes, &scales, rows, cols, case.name)?;
        let widened: Vec<bf16> = codes
            .iter()
            .enumerate()
            .map(|(i, &c)| {
                bf16::from_f32(f8_e4m3(c) * scales[(i / cols / 128) * sc + (i % cols) / 128])
            })
            .collect();
        let dense = DeviceMatrix {
            data: DenseData::Bf16(arena.upload(&widened, case.name)?),
            rows,
            cols,
        };
        Ok(HostWeight {
            m,
            dense: Some(dense),
            dense_exact: false,
            sample_rows,
        })
    } else {
        let a = 1.0 / (cols as f32).sqrt();
        let v: Vec<bf16> = (0..rows * cols)
            .map(|_| bf16::from_f32(rng.random_range(-a..a)))
            .collect();
        let sample_rows = (0..rows)
            .step_by(step)
            .map(|r| {
                (
                    r,
                    v[r * cols..(r + 1) * cols]
                        .iter()
                        .map(|x| x.to_f64())
                        .collect(),
                )
            })
            .collect();
        let m = ProjMatrix::upload_bf16(arena, &v, rows, cols, case.name)?;
        let dense = DeviceMatrix {
            data: DenseData::Bf16(arena.upload(&v, case.name)?),
            rows,
            cols,
        };
        Ok(HostWeight {
            m,
            dense: Some(dense),
            dense_exact: true,
            sample_rows,
        })
    }
}

/// A device copy of `m` (for the rotation pool).
fn copy_matrix(arena: &mut Arena, s: &CudaStream, m: &ProjMatrix) -> Result<ProjMatrix> {
    let data = match m.data {
        ProjData::Fp8 { tiles, scales } => {
            let t = arena.alloc::<u8>(tiles.len(), "pool")?;
            let sc = arena.alloc::<f32>(scales.len(), "pool")?;
            dtod(s, tiles, t)?;
            dtod(s, scales, sc)?;
            ProjData::Fp8 {
                tiles: t,
                scales: sc,
            }
        }
        ProjData::Bf16 { tiles } => {
            let t = arena.alloc::<bf16>(tiles.len(), "pool")?;
            dtod(s, tiles, t)?;
            ProjData::Bf16 { tiles: t }
        }
    };
    Ok(ProjMatrix { data, ..*m })
}

fn copy_dense(arena: &mut Arena, s: &CudaStream, m: &DeviceMatrix) -> Result<DeviceMatrix> {
    let DenseData::Bf16(p) = m.data else {
        bail!("dense copies are bf16");
    };
    let q = arena.alloc::<bf16>(p.len(), "pool")?;
    dtod(s, p, q)?;
    Ok(DeviceMatrix {
        data: DenseData::Bf16(q),
        ..*m
    })
}

/// Worst error over the sampled rows as a fraction of the bound γ·Σ|w·x| (γ = (K + 8)·2⁻²⁴),
/// for `t` tokens of `x`; `y` `[t, rows]` from the device.
fn check_rows(hw: &HostWeight, x: &[f32], y: &[f32], t: usize) -> Result<f64> {
    let (n, k) = (hw.m.rows, hw.m.cols);
    let gamma = (k as f64 + 8.0) * 2f64.powi(-24);
    let mut worst = 0f64;
    for (r, w) in &hw.sample_rows {
        for j in 0..t {
            let (mut s, mut mag) = (0f64, 0f64);
            for c in 0..k {
                let p = w[c] * x[j * k + c] as f64;
                s += p;
                mag += p.abs();
            }
            let got = y[j * n + r] as f64;
            if !got.is_finite() {
                bail!("non-finite output y[{j}][{r}] = {got}");
            }
            worst = worst.max((got - s).abs() / (gamma * mag + 1e-30));
        }
    }
    Ok(worst)
}

fn launch_name(what: &str, how: ProjLaunch) -> String {
    match how {
        ProjLaunch::StreamK { ctas_per_sm } => format!("{what} sk c{ctas_per_sm}"),
        ProjLaunch::RowGroups { groups, warps } => format!("{what} g{groups} w{warps}"),
        ProjLaunch::Bulk {
            groups,
            ctas_per_sm,
        } => format!("{what} bulk r{groups} c{ctas_per_sm}"),
    }
}

fn main() -> Result<()> {
    let args = Args::parse();
    let dev = tilert::Device::open(0).context("opening GPU 0")?;
    println!("{}", dev.info);
    // SAFETY: this program orders its single stream itself.
    unsafe { dev.ctx.disable_event_tracking() };
    let stream = dev.ctx.new_stream()?;
    let proj = ProjOps::load(&dev.ctx)?;
    let ops = Ops::load(&dev.ctx)?;
    let mut kern = BenchKernels::new(stream.clone(), dev.info.multiprocessors)?;
    let mut rng = ChaCha8Rng::seed_from_u64(0xF8F8);

    let pool_bytes = 2usize << 30;
    let mut pool = stream.alloc_zeros::<u8>(pool_bytes)?;
    kern.fill(&mut pool, 7, 0, 256)?;
    let big = time_us(&stream, 9, 4, |_| kern.stream_read(&pool, 0, pool_bytes))?;
    let big_gbs = pool_bytes as f64 / median(&big) / 1e3;
    println!("stream read 2.1 GB: {big_gbs:.0} GB/s");

    let mut rows = Vec::new();
    let mut checks = Vec::new();
    for case in CASES {
        let dtype = if case.fp8 { "fp8" } else { "bf16" };
        let label = format!("{} {}x{} {dtype}", case.name, case.rows, case.cols);
        if args
            .only
            .as_ref()
            .is_some_and(|o| !label.contains(o.as_str()))
        {
            continue;
        }
        let mut arena = Arena::new(stream.clone());
        let step = (case.rows / 97).max(1);
        let hw = make_weight(&mut arena, &mut rng, case, step)?;
        let k = case.cols;
        let x_host: Vec<f32> = (0..16 * k).map(|_| rng.random_range(-2.0..2.0)).collect();
        let x = arena.upload(&x_host, "x")?;
        let y: DPtr<f32> = arena.alloc(16 * case.rows, "y")?;
        for t in [1, 16] {
            htod(&stream, &vec![f32::NAN; 16 * case.rows], y)?;
            proj.linear(&stream, &hw.m, None, x, t, y, false)?;
            let yh = dtoh(&stream, y)?;
            let worst = check_rows(&hw, &x_host, &yh, t)?;
            let line = format!("check {label} T={t}: worst error {worst:.3} of bound");
            println!("{line}");
            if worst > 1.0 {
                bail!("projection outside the error bound: {line}");
            }
            checks.push(line);
            if let Some(d) = hw.dense.as_ref().filter(|_| hw.dense_exact) {
                htod(&stream, &vec![f32::NAN; 16 * case.rows], y)?;
                ops.linear(&stream, d, None, x, t, y, false)?;
                let yh = dtoh(&stream, y)?;
                let worst = check_rows(&hw, &x_host, &yh, t)?;
                let line = format!("check {label} linear (row-major) T={t}: {worst:.3} of bound");
                println!("{line}");
                checks.push(line);
            }
        }
        let copies = POOL_BYTES.div_ceil(hw.m.bytes()).max(2);
        let mut mats = vec![hw.m];
        let mut dense = hw.dense.into_iter().collect::<Vec<_>>();
        for _ in 1..copies {
            let c = copy_matrix(&mut arena, &stream, &mats[0])?;
            mats.push(c);
            if let Some(d) = dense.first().copied() {
                dense.push(copy_dense(&mut arena, &stream, &d)?);
            }
        }
        stream.synchronize()?;
        let bytes = mats[0].bytes();
        let ceiling = time_us(&stream, args.samples, args.iters, |i| {
            let off = (i * bytes) % (pool_bytes - bytes) / 16 * 16;
            kern.stream_read(&pool, off, bytes)
        })?;
        let ceil_us = median(&ceiling);
        let mut push = |kernel: String, t: usize, bytes: usize, ts: &[f64], ceil_us: f64| {
            let med = median(ts);
            let r = Row {
                case: case.name.into(),
                dtype: dtype.into(),
                rows: case.rows,
                cols: case.cols,
                tokens: t,
                kernel,
                bytes,
                median_us: med,
                min_us: ts.iter().cloned().fold(f64::INFINITY, f64::min),
                max_us: ts.iter().cloned().fold(0.0, f64::max),
                gb_per_s: bytes as f64 / med / 1e3,
                ceiling_us: ceil_us,
                ratio_to_ceiling: ceil_us / med,
            };
            println!(
                "{label} T={t} {}: {:.2} µs, {:.0} GB/s, stream {:.2} µs, {:.0}%",
                r.kernel,
                r.median_us,
                r.gb_per_s,
                ceil_us,
                100.0 * r.ratio_to_ceiling
            );
            rows.push(r);
        };
        push("stream read".into(), 0, bytes, &ceiling, ceil_us);
        for t in TOKENS {
            let chosen = proj.choose(&mats[0], t);
            let mut shapes = vec![chosen];
            for how in proj.bulk_launches(case.fp8, t).into_iter().chain([
                proj.choose_row_groups(&mats[0], t),
                proj.stream_k(case.fp8, t),
            ]) {
                if !shapes.contains(&how) {
                    shapes.push(how);
                }
            }
            for how in shapes {
                let ts = time_us(&stream, args.samples, args.iters, |i| {
                    proj.linear_with(&stream, &mats[i % mats.len()], None, x, t, y, false, how)
                        .map_err(Into::into)
                })?;
                let mut name = launch_name("proj", how);
                if how == chosen {
                    name.push_str(" (chosen)");
                }
                push(name, t, bytes, &ts, ceil_us);
            }
            if !dense.is_empty() {
                let dbytes = 2 * case.rows * case.cols;
                let ts = time_us(&stream, args.samples, args.iters, |i| {
                    ops.linear(&stream, &dense[i % dense.len()], None, x, t, y, false)
                        .map_err(Into::into)
                })?;
                // The row-major matrix has no padding: its own same-size read.
                let c = time_us(&stream, args.samples, args.iters, |i| {
                    let off = (i * dbytes) % (pool_bytes - dbytes) / 16 * 16;
                    kern.stream_read(&pool, off, dbytes)
                })?;
                let name = if hw.dense_exact {
                    "linear (today)"
                } else {
                    "linear bf16-widened (today)"
                };
                push(name.into(), t, dbytes, &ts, median(&c));
            }
        }
        drop(mats);
        drop(dense);
        drop(arena);
    }

    println!();
    println!("stream read 2.1 GB: {big_gbs:.0} GB/s");
    // Per (case, T): the chosen launch, the fastest bulk shape, the row-group and stream-K
    // launches and today's row-major linear, each as µs and % of the same-size stream read.
    println!(
        "| case | dtype | shape | MB | stream µs | T | chosen | µs | % | best bulk | µs | % | row groups µs | % | stream-K µs | % | linear µs | % of its read |"
    );
    println!(
        "|---|---|---|---:|---:|---:|---|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|"
    );
    let mut keys: Vec<(String, String, usize, usize, usize)> = Vec::new();
    for r in &rows {
        let key = (r.case.clone(), r.dtype.clone(), r.rows, r.cols, r.tokens);
        if r.tokens > 0 && !keys.contains(&key) {
            keys.push(key);
        }
    }
    for (case, dtype, n, k, t) in keys {
        let of = |f: &dyn Fn(&Row) -> bool| {
            rows.iter()
                .filter(|r| {
                    r.case == case
                        && r.dtype == dtype
                        && r.rows == n
                        && r.cols == k
                        && r.tokens == t
                })
                .filter(|r| f(r))
                .min_by(|a, b| a.median_us.total_cmp(&b.median_us))
        };
        let cell = |r: Option<&Row>| {
            r.map_or("- | -".to_string(), |r| {
                format!("{:.2} | {:.0}%", r.median_us, 100.0 * r.ratio_to_ceiling)
            })
        };
        let chosen = of(&|r: &Row| r.kernel.ends_with("(chosen)"));
        let bulk = of(&|r: &Row| r.kernel.contains(" bulk "));
        println!(
            "| {case} | {dtype} | {n}x{k} | {:.1} | {:.2} | {t} | {} | {} | {} | {} | {} | {} | {} |",
            chosen.map_or(0.0, |r| r.bytes as f64 / 1e6),
            chosen.map_or(0.0, |r| r.ceiling_us),
            chosen.map_or("-".into(), |r| r.kernel.replace(" (chosen)", "")),
            cell(chosen),
            bulk.map_or("-".into(), |r| r.kernel.replace(" (chosen)", "")),
            cell(bulk),
            cell(of(&|r: &Row| r.kernel.contains(" g") && r.kernel.contains(" w"))),
            cell(of(&|r: &Row| r.kernel.contains(" sk "))),
            cell(of(&|r: &Row| r.kernel.starts_with("linear"))),
        );
    }
    if let Some(path) = args.json {
        let report = Report {
            device: dev.info.to_string(),
            date_utc_unix: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)?
                .as_secs(),
            samples: args.samples,
            iters: args.iters,
            big_stream_gb_per_s: big_gbs,
            checks,
            rows,
        };
        std::fs::write(&path, serde_json::to_string_pretty(&report)?)?;
    }
    Ok(())
}
