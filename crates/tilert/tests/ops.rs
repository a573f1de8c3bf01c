//! GPU tests of `tilert::ops` (kernels/*.cu): every op against its CPU definition
//! (`model::cpu::ops`, `model::cpu::rope`, `moe::route`, `model::sampling`) on fresh random
//! inputs, at tiny sizes and at gpt-oss-20b / MiMo / Qwen3 sizes. Skipped without a GPU (fails
//! with `ULTRA_REQUIRE_GPU=1`). The seed of each test is printed; set `ULTRA_TEST_SEED` to
//! replay one. The batched-decode ops (`ops::rows`) are checked bit for bit against the
//! single-sequence ops they share their code with.
//!
//! Tolerances: the kernels accumulate in f32 in another order than the CPU (warp trees, split
//! keys), so a reduction of n terms may differ by a few ulp of Σ|terms|: we allow
//! `1e-5 · Σ|terms|` (about 80 ulp — far above reassociation noise, far below any real bug,
//! which shows up at the scale of the terms themselves). Elementwise ops whose only difference is
//! `expf` (≤ 2 ulp on both sides) allow `1e-6` relative.

use std::sync::Arc;

use cudarc::driver::sys::CUevent_flags;
use cudarc::driver::{CudaContext, CudaStream, LaunchConfig, PushKernelArg};
use half::bf16;
use model::config::Activation;
use model::cpu::ops as cpu;
use model::cpu::rope::RopeTable;
use model::weights::{GateUpLayout, Linear, Mat};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha20Rng;
use tilert::arena::{dtoh, htod, Arena, DPtr};
use tilert::ops::{
    sample_scratch_len, AttnArgs, GluArgs, Ops, RouteArgs, SampleArgs, ARGMAX_SCRATCH, MAX_TOKENS,
};
use tilert::tensor::{DenseData, DeviceMatrix};

struct Gpu {
    stream: Arc<CudaStream>,
    arena: Arena,
    ops: Ops,
    ctx: Arc<CudaContext>,
}

fn gpu(test: &str) -> Option<(Gpu, ChaCha20Rng)> {
    let ctx = ultra_kernels::gpu_for_test(test)?;
    let stream = ctx.default_stream();
    let ops = Ops::load(&ctx).expect("load ops kernels");
    let seed = ultra_kernels::test_seed(test);
    Some((
        Gpu {
            arena: Arena::new(stream.clone()),
            stream,
            ops,
            ctx,
        },
        ChaCha20Rng::seed_from_u64(seed),
    ))
}

impl Gpu {
    fn up<T: cudarc::driver::DeviceRepr>(&mut self, v: &[T]) -> DPtr<T> {
        self.arena.upload(v, "test input").unwrap()
    }
    fn zeros<T: cudarc::driver::DeviceRepr>(&mut self, n: usize) -> DPtr<T> {
        self.arena.alloc(n, "test output").unwrap()
    }
    fn down<T: cudarc::driver::DeviceRepr + Default + Clone>(&self, p: DPtr<T>) -> Vec<T> {
        dtoh(&self.stream, p).unwrap()
    }
}

fn uniform(rng: &mut ChaCha20Rng, n: usize, scale: f32) -> Vec<f32> {
    (0..n).map(|_| rng.random_range(-scale..scale)).collect()
}

/// Values exactly representable in bf16 (so `DeviceMatrix::upload` stores bf16).
fn bf16_exact(v: Vec<f32>) -> Vec<f32> {
    v.into_iter().map(|x| bf16::from_f32(x).to_f32()).collect()
}

/// Asserts `|got − want| ≤ tol[i]` for every element.
fn assert_close(what: &str, got: &[f32], want: &[f32], tol: impl Fn(usize) -> f64) {
    assert_eq!(got.len(), want.len(), "{what}: lengths");
    let mut worst = (0.0f64, 0usize);
    for i in 0..got.len() {
        let d = (got[i] as f64 - want[i] as f64).abs();
        let t = tol(i);
        assert!(
            d <= t || (got[i].is_nan() && want[i].is_nan()),
            "{what}: element {i}: got {} want {} (|diff| {d:e} > tol {t:e})",
            got[i],
            want[i]
        );
        if t > 0.0 && d / t > worst.0 {
            worst = (d / t, i);
        }
    }
    println!(
        "{what}: {} values ok, worst {:.3} of tolerance",
        got.len(),
        worst.0
    );
}

// ---------------------------------------------------------------------------------------------
// linear
// ---------------------------------------------------------------------------------------------

/// One linear case against `model::cpu::ops::linear` (+ the residual when accumulating).
#[allow(clippy::too_many_arguments)]
fn check_linear(
    g: &mut Gpu,
    rng: &mut ChaCha20Rng,
    rows: usize,
    cols: usize,
    bf16_weights: bool,
    bias: bool,
    accumulate: bool,
    t: usize,
) {
    let mut wv = uniform(rng, rows * cols, 0.5);
    if bf16_weights {
        wv = bf16_exact(wv);
    } else {
        wv[0] = 0.1; // not a bf16 value: forces f32 storage
    }
    let w = DeviceMatrix::upload(&mut g.arena, &wv, rows, cols, "w").unwrap();
    assert_eq!(matches!(w.data, DenseData::Bf16(_)), bf16_weights);
    let b = bias.then(|| uniform(rng, rows, 1.0));
    let x = uniform(rng, t * cols, 1.0);
    let y0 = uniform(rng, t * rows, 1.0);
    let (dx, dy) = (g.up(&x), g.up(&y0));
    let db = b.as_ref().map(|b| g.up(b));
    g.ops
        .linear(&g.stream, &w, db, dx, t, dy, accumulate)
        .unwrap();
    let got = g.down(dy);
    let lin = Linear {
        w: Mat::from_f32(rows, cols, wv.clone()),
        bias: b.clone(),
    };
    let mut want = vec![0f32; t * rows];
    cpu::linear(&lin, &x, t, &mut want);
    if accumulate {
        for (o, &r) in want.iter_mut().zip(&y0) {
            *o += r;
        }
    }
    let tol = |i: usize| {
        let (ti, r) = (i / rows, i % rows);
        let mut s: f64 = (0..cols)
            .map(|c| (wv[r * cols + c] as f64 * x[ti * cols + c] as f64).abs())
            .sum();
        s += b.as_ref().map_or(0.0, |b| b[r].abs() as f64);
        s += if accumulate { y0[i].abs() as f64 } else { 0.0 };
        1e-5 * s + 1e-30
    };
    assert_close(
        &format!(
            "linear {rows}x{cols} {} t={t} bias={bias} acc={accumulate}",
            if bf16_weights { "bf16" } else { "f32" }
        ),
        &got,
        &want,
        tol,
    );
}

#[test]
fn linear_matches_cpu() {
    let Some((mut g, mut rng)) = gpu("linear_matches_cpu") else {
        return;
    };
    // Tiny shapes: vectorised (K % 8 == 0), odd K and K % 8 != 0 (generic kernel), every T.
    for t in 1..=MAX_TOKENS {
        check_linear(&mut g, &mut rng, 7, 16, true, t % 2 == 0, t % 3 == 0, t);
        check_linear(&mut g, &mut rng, 5, 13, true, true, false, t);
        check_linear(&mut g, &mut rng, 9, 12, false, t % 2 == 1, t % 4 == 0, t);
        check_linear(&mut g, &mut rng, 33, 40, false, false, true, t);
        check_linear(&mut g, &mut rng, 65, 264, true, true, false, t);
    }
    // Odd K with f32 weights, and every rows-per-warp variant (row counts around the
    // thresholds, not multiples of the rows per warp).
    check_linear(&mut g, &mut rng, 3, 7, false, true, true, 3);
    check_linear(&mut g, &mut rng, 8_449, 64, true, true, false, 1);
    check_linear(&mut g, &mut rng, 16_897, 32, true, false, true, 2);
    check_linear(&mut g, &mut rng, 16_897, 32, true, false, false, 9);
    // gpt-oss-20b shapes: QKV, O (+ residual), router (+ bias), MLP-sized f32.
    for t in [1, 2, 4, 16] {
        check_linear(&mut g, &mut rng, 5120, 2880, true, true, false, t);
    }
    check_linear(&mut g, &mut rng, 2880, 4096, true, true, true, 1);
    check_linear(&mut g, &mut rng, 2880, 4096, true, true, true, 8);
    check_linear(&mut g, &mut rng, 32, 2880, true, true, false, 1);
    check_linear(&mut g, &mut rng, 32, 2880, true, true, false, 16);
    check_linear(&mut g, &mut rng, 1100, 2880, false, false, false, 5);
    check_linear(&mut g, &mut rng, 1500, 512, true, true, true, 3);
}

/// The LM head (201088 × 2880 bf16, generated on the device) at T = 1 and T = 16 against the
/// CPU on a sample of rows, then the timings of the big decode shapes against a streaming
/// read of the same bytes (printed, not asserted).
#[test]
fn linear_lm_head_and_bandwidth() {
    let Some((mut g, mut rng)) = gpu("linear_lm_head_and_bandwidth") else {
        return;
    };
    let (rows, cols) = (201_088usize, 2880usize);
    let wp: DPtr<bf16> = g.zeros(rows * cols);
    g.ops
        .fill_uniform_bf16(&g.stream, wp, 0.05, rng.random())
        .unwrap();
    let w = DeviceMatrix {
        data: DenseData::Bf16(wp),
        rows,
        cols,
    };
    let wh: Vec<f32> = g.down(wp).into_iter().map(|v| v.to_f32()).collect();
    for t in [1usize, 16] {
        let x = uniform(&mut rng, t * cols, 1.0);
        let (dx, dy) = (g.up(&x), g.zeros::<f32>(t * rows));
        g.ops.linear(&g.stream, &w, None, dx, t, dy, false).unwrap();
        let got = g.down(dy);
        let sample: Vec<usize> = (0..rows).step_by(97).chain(rows - 5..rows).collect();
        let (mut gs, mut ws, mut ts) = (Vec::new(), Vec::new(), Vec::new());
        for ti in 0..t {
            for &r in &sample {
                let row = &wh[r * cols..(r + 1) * cols];
                let xr = &x[ti * cols..(ti + 1) * cols];
                gs.push(got[ti * rows + r]);
                ws.push(cpu::dot(row, xr));
                ts.push(
                    1e-5 * row
                        .iter()
                        .zip(xr)
                        .map(|(&a, &b)| (a as f64 * b as f64).abs())
                        .sum::<f64>(),
                );
            }
        }
        assert_close(&format!("lm head t={t} (sampled rows)"), &gs, &ws, |i| {
            ts[i]
        });
    }

    // Timings (CUDA events), T = 1.
    let bench = ultra_kernels::load(&g.ctx, &ultra_kernels::BENCH).unwrap();
    let stream_read = bench.load_function("stream_read").unwrap();
    let sink: DPtr<u32> = g.zeros(1);
    let sms = g
        .ctx
        .attribute(
            cudarc::driver::sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT,
        )
        .unwrap() as u32;
    // Iteration i uses copy i mod `copies` of the weights (disjoint slices of the big buffer),
    // so that a matrix smaller than L2 is not served from L2 by the previous iteration.
    let time_us = |g: &Gpu, f: &mut dyn FnMut(usize)| -> f64 {
        f(0); // warm-up
        let iters = 32;
        let start = g
            .stream
            .record_event(Some(CUevent_flags::CU_EVENT_DEFAULT))
            .unwrap();
        for i in 0..iters {
            f(i);
        }
        let end = g
            .stream
            .record_event(Some(CUevent_flags::CU_EVENT_DEFAULT))
            .unwrap();
        start.elapsed_ms(&end).unwrap() as f64 * 1e3 / iters as f64
    };
    let shapes = [
        ("lm head", 201_088usize, 2880usize),
        ("qkv", 5120, 2880),
        ("o proj", 2880, 4096),
        ("router", 32, 2880),
    ];
    for (name, rows, cols) in shapes {
        let copies = (wp.len() / (rows * cols)).min(16);
        let wm = |i: usize| DeviceMatrix {
            data: DenseData::Bf16(
                wp.slice((i % copies) * rows * cols..(i % copies + 1) * rows * cols),
            ),
            rows,
            cols,
        };
        let bytes = (rows * cols * 2) as f64;
        for t in [1usize, 2, 4, 8, 16] {
            let x: DPtr<f32> = g.zeros(t * cols);
            let y: DPtr<f32> = g.zeros(t * rows);
            let us = time_us(&g, &mut |i| {
                g.ops
                    .linear(&g.stream, &wm(i), None, x, t, y, false)
                    .unwrap()
            });
            let mut line = format!(
                "TIMING linear {name} {rows}x{cols} bf16 t={t}: {us:.1} us = {:.0} GB/s of weights",
                bytes / us * 1e-3
            );
            if t == 1 {
                let n16 = (rows * cols * 2 / 16) as u64;
                let us_stream = time_us(&g, &mut |i| {
                    let cfg = LaunchConfig {
                        grid_dim: (sms * 8, 1, 1),
                        block_dim: (256, 1, 1),
                        shared_mem_bytes: 0,
                    };
                    let a = match wm(i).data {
                        DenseData::Bf16(p) => p.addr(),
                        DenseData::F32(p) => p.addr(),
                        DenseData::Tiled(_) => unreachable!("the timed weights are row-major bf16"),
                    };
                    let s = sink.addr();
                    let mut b = g.stream.launch_builder(&stream_read);
                    b.arg(&a).arg(&n16).arg(&s);
                    // SAFETY: stream_read(const uint4*, u64, u32*) over the n16·16 bytes of
                    // one weight copy.
                    unsafe { b.launch(cfg) }.unwrap();
                });
                line += &format!(
                    "; stream_read of the same bytes {us_stream:.1} us = {:.0} GB/s \
                     (linear at {:.0}% of stream)",
                    bytes / us_stream * 1e-3,
                    100.0 * us_stream / us
                );
            }
            println!("{line}");
        }
    }
}

// ---------------------------------------------------------------------------------------------
// embed, rms_norm, glu, combine, argmax
// ---------------------------------------------------------------------------------------------

#[test]
fn embed_and_rms_norm_match_cpu() {
    let Some((mut g, mut rng)) = gpu("embed_and_rms_norm_match_cpu") else {
        return;
    };
    for (vocab, h, t, as_bf16) in [
        (50, 24, 3, true),
        (1000, 2880, 16, true),
        (37, 40, 5, false),
    ] {
        let mut tv = uniform(&mut rng, vocab * h, 1.0);
        if as_bf16 {
            tv = bf16_exact(tv);
        }
        let table = DeviceMatrix::upload(&mut g.arena, &tv, vocab, h, "embed").unwrap();
        let toks: Vec<u32> = (0..t).map(|_| rng.random_range(0..vocab as u32)).collect();
        let (dt, dx) = (g.up(&toks), g.zeros::<f32>(t * h));
        g.ops.embed(&g.stream, &table, dt, t, dx).unwrap();
        let got = g.down(dx);
        let want: Vec<f32> = toks
            .iter()
            .flat_map(|&id| tv[id as usize * h..(id as usize + 1) * h].to_vec())
            .collect();
        assert_eq!(got, want, "embed {vocab}x{h} t={t}");
    }
    for (rows, n) in [(1usize, 8usize), (3, 64), (16, 2880), (2, 4096), (5, 13)] {
        let x = uniform(&mut rng, rows * n, 3.0);
        let w = uniform(&mut rng, n, 2.0);
        let eps = 1e-5f32;
        let (dx, dw, dout) = (g.up(&x), g.up(&w), g.zeros::<f32>(rows * n));
        g.ops
            .rms_norm(&g.stream, dx, dw, rows, n, eps, dout)
            .unwrap();
        let got = g.down(dout);
        let mut want = vec![0f32; rows * n];
        for r in 0..rows {
            cpu::rms_norm(
                &x[r * n..(r + 1) * n],
                &w,
                eps,
                &mut want[r * n..(r + 1) * n],
            );
        }
        // The only reassociated value is Σx², which enters through a square root: relative
        // 1e-5 of each output.
        assert_close(&format!("rms_norm {rows}x{n}"), &got, &want, |i| {
            1e-5 * want[i].abs() as f64 + 1e-37
        });
    }
}

#[test]
fn glu_combine_argmax_match_cpu() {
    let Some((mut g, mut rng)) = gpu("glu_combine_argmax_match_cpu") else {
        return;
    };
    for (act, glu_arg) in [
        (
            Activation::ClampedSwiglu {
                alpha: 1.702,
                limit: 7.0,
            },
            GluArgs::ClampedSwiglu {
                alpha: 1.702,
                limit: 7.0,
            },
        ),
        (Activation::Swiglu, GluArgs::Swiglu),
    ] {
        for (t, i) in [(1usize, 5usize), (16, 2880), (3, 768)] {
            let gu = uniform(&mut rng, t * 2 * i, 10.0);
            let (dgu, dout) = (g.up(&gu), g.zeros::<f32>(t * i));
            g.ops.glu(&g.stream, glu_arg, dgu, t, i, dout).unwrap();
            let got = g.down(dout);
            let mut want = vec![0f32; t * i];
            cpu::glu_rows(act, GateUpLayout::Halves, &gu, &mut want, i);
            // Only expf differs (≤ 2 ulp each side), amplified at most ~10x by the product.
            assert_close(&format!("glu {glu_arg:?} t={t} I={i}"), &got, &want, |j| {
                2e-6 * want[j].abs() as f64 + 1e-30
            });
        }
    }

    // combine: bit-identical (the same f32 additions in the same order); with the next
    // RMSNorm fused in, the normed rows as `rms_norm`'s tolerance (hidden sizes for each of the
    // register-resident variants, ≤ 1024 / 2048 / 4096, and the strided one beyond; top-k that
    // is and is not a multiple of their 4-row load groups).
    for (t, k, h, fused_norm) in [
        (1usize, 4usize, 2880usize, false),
        (16, 4, 2880, false),
        (3, 8, 7, false),
        (2, 16, 300, false),
        (1, 4, 2880, true),
        (16, 4, 2880, true),
        (3, 8, 7, true),
        (2, 6, 2048, true),
        (4, 16, 1024, true),
        (1, 3, 4096, true),
        (2, 4, 5000, true),
    ] {
        let x = uniform(&mut rng, t * h, 1.0);
        let y = uniform(&mut rng, t * k * h, 1.0);
        let mut ids = Vec::new();
        for _ in 0..t {
            let mut e: Vec<i32> = (0..64).collect();
            for j in 0..k {
                let r = rng.random_range(j..64);
                e.swap(j, r);
            }
            ids.extend_from_slice(&e[..k]);
        }
        let (dx, dy, di) = (g.up(&x), g.up(&y), g.up(&ids));
        let nw = uniform(&mut rng, h, 2.0);
        let (dnw, dh) = (g.up(&nw), g.zeros::<f32>(t * h));
        let eps = 1e-5f32;
        let norm = fused_norm.then_some((dnw, eps, dh));
        g.ops.combine(&g.stream, dx, dy, di, t, k, h, norm).unwrap();
        let got = g.down(dx);
        let mut want = x.clone();
        for ti in 0..t {
            let mut order: Vec<usize> = (0..k).collect();
            order.sort_by_key(|&s| ids[ti * k + s]);
            let mut o = vec![0f32; h];
            for &s in &order {
                cpu::add_assign(&mut o, &y[(ti * k + s) * h..(ti * k + s + 1) * h]);
            }
            cpu::add_assign(&mut want[ti * h..(ti + 1) * h], &o);
        }
        assert_eq!(got, want, "combine t={t} k={k} h={h} norm={fused_norm}");
        if fused_norm {
            let mut want_h = vec![0f32; t * h];
            for r in 0..t {
                cpu::rms_norm(
                    &want[r * h..(r + 1) * h],
                    &nw,
                    eps,
                    &mut want_h[r * h..(r + 1) * h],
                );
            }
            assert_close(
                &format!("combine + rms_norm t={t} h={h}"),
                &g.down(dh),
                &want_h,
                |i| 1e-5 * want_h[i].abs() as f64 + 1e-37,
            );
        }
    }

    // argmax: ties go to the lowest index, NaN reads as -inf; one scratch serves every launch
    // (the multi-block merge leaves its counters zero).
    let scratch = g.zeros::<u32>(ARGMAX_SCRATCH);
    for (t, v) in [
        (1usize, 10usize),
        (3, 201_088),
        (16, 1000),
        (16, 151_936),
        (1, 201_088),
        (2, 5000),
    ] {
        let mut l = uniform(&mut rng, t * v, 5.0);
        let mut want = Vec::new();
        for ti in 0..t {
            let row = &mut l[ti * v..(ti + 1) * v];
            let a = rng.random_range(0..v);
            let b = rng.random_range(0..v);
            row[a] = 9.0;
            row[b] = 9.0;
            row[rng.random_range(0..v)] = f32::NAN;
            want.push(row.iter().position(|&x| x == 9.0).unwrap() as u32);
        }
        let (dl, dout) = (g.up(&l), g.zeros::<u32>(t));
        for run in 0..2 {
            g.ops.argmax(&g.stream, dl, t, v, scratch, dout).unwrap();
            assert_eq!(g.down(dout), want, "argmax t={t} v={v} run {run}");
        }
    }
}

// ---------------------------------------------------------------------------------------------
// RoPE + KV write, attention
// ---------------------------------------------------------------------------------------------

/// An attention layer's geometry for the tests.
#[derive(Clone, Copy, Debug)]
struct Geo {
    nh: usize,
    nkv: usize,
    d: usize,
    dv: usize,
    rot: usize,
    capacity: usize,
    window: Option<usize>,
    sinks: bool,
    qk_norm: bool,
    value_scale: f32,
    attention_factor: f32,
}

struct Layer {
    args: AttnArgs,
    inv_freq: Vec<f32>,
    q_norm: Vec<f32>,
    k_norm: Vec<f32>,
    sinks: Vec<f32>,
}

fn layer(g: &mut Gpu, rng: &mut ChaCha20Rng, geo: Geo) -> Layer {
    let half = geo.rot / 2;
    let inv_freq: Vec<f32> = (0..half)
        .map(|i| 1.0 / 150_000f64.powf(2.0 * i as f64 / geo.rot as f64) as f32)
        .collect();
    let q_norm: Vec<f32> = (0..geo.d).map(|_| rng.random_range(0.5..1.5)).collect();
    let k_norm: Vec<f32> = (0..geo.d).map(|_| rng.random_range(0.5..1.5)).collect();
    let sinks = uniform(rng, geo.nh, 2.0);
    let k_cache = g.up(&uniform(rng, geo.capacity * geo.nkv * geo.d, 1.0));
    let v_cache = g.up(&uniform(rng, geo.capacity * geo.nkv * geo.dv, 1.0));
    let args = AttnArgs {
        n_heads: geo.nh,
        n_kv_heads: geo.nkv,
        head_dim: geo.d,
        v_head_dim: geo.dv,
        rotary_dim: geo.rot,
        inv_freq: g.up(if half > 0 { &inv_freq } else { &[0.0] }),
        attention_factor: geo.attention_factor,
        q_norm: geo.qk_norm.then(|| g.up(&q_norm)),
        k_norm: geo.qk_norm.then(|| g.up(&k_norm)),
        eps: 1e-6,
        value_scale: geo.value_scale,
        k_cache,
        v_cache,
        capacity: geo.capacity,
        paging: None,
        window: geo.window,
        sinks: geo.sinks.then(|| g.up(&sinks)),
        scale: (1.0 / (geo.d as f64).sqrt()) as f32,
    };
    Layer {
        args,
        inv_freq,
        q_norm,
        k_norm,
        sinks,
    }
}

fn check_rope_kv_write(g: &mut Gpu, rng: &mut ChaCha20Rng, geo: Geo, t: usize, step: u32) {
    let l = layer(g, rng, geo);
    let a = l.args;
    let (nh, nkv, d, dv) = (geo.nh, geo.nkv, geo.d, geo.dv);
    if t > geo.capacity {
        let (qkv, st, q) = (
            g.zeros::<f32>(1 << 16),
            g.zeros::<u32>(1),
            g.zeros::<f32>(1 << 16),
        );
        assert!(g.ops.rope_kv_write(&g.stream, &a, qkv, t, st, q).is_err());
        return;
    }
    let roww = nh * d + nkv * d + nkv * dv;
    let qkv = uniform(rng, t * roww, 2.0);
    let (dqkv, dstep, dq) = (g.up(&qkv), g.up(&[step]), g.zeros::<f32>(t * nh * d));
    g.ops
        .rope_kv_write(&g.stream, &a, dqkv, t, dstep, dq)
        .unwrap();
    let (gq, gk, gv) = (g.down(dq), g.down(a.k_cache), g.down(a.v_cache));
    let table = RopeTable {
        rotary_dim: geo.rot,
        inv_freq: l.inv_freq.clone(),
        attention_factor: geo.attention_factor,
    };
    let half = geo.rot / 2;
    let (mut wq, mut wk, mut wv) = (Vec::new(), Vec::new(), Vec::new());
    let (mut gq2, mut gk2, mut gv2) = (Vec::new(), Vec::new(), Vec::new());
    for ti in 0..t {
        let row = &qkv[ti * roww..(ti + 1) * roww];
        let mut q = row[..nh * d].to_vec();
        let mut k = row[nh * d..nh * d + nkv * d].to_vec();
        let mut v = row[nh * d + nkv * d..].to_vec();
        if geo.qk_norm {
            cpu::rms_norm_rows(&mut q, &l.q_norm, a.eps);
            cpu::rms_norm_rows(&mut k, &l.k_norm, a.eps);
        }
        if half > 0 {
            let (mut c, mut s) = (vec![0f32; half], vec![0f32; half]);
            table.cos_sin(step as usize + ti, &mut c, &mut s);
            cpu::apply_rope_heads(&mut q, d, &c, &s);
            cpu::apply_rope_heads(&mut k, d, &c, &s);
        }
        for x in v.iter_mut() {
            *x *= geo.value_scale;
        }
        let slot = (step as usize + ti) % geo.capacity;
        wq.extend_from_slice(&q);
        wk.extend_from_slice(&k);
        wv.extend_from_slice(&v);
        gq2.extend_from_slice(&gq[ti * nh * d..(ti + 1) * nh * d]);
        gk2.extend_from_slice(&gk[slot * nkv * d..(slot + 1) * nkv * d]);
        gv2.extend_from_slice(&gv[slot * nkv * dv..(slot + 1) * nkv * dv]);
    }
    // Without q/k norm RoPE is the same chain of f32 roundings (cos/sin from f64): equal up
    // to a rare 1-ulp difference of the f64 cos/sin libraries. With the norm, Σx² is
    // reassociated: 1e-5 relative of the head's magnitude.
    let tol = |w: &[f32], i: usize| {
        if geo.qk_norm {
            1e-5 * (w[i].abs() as f64 + 1.0)
        } else {
            4e-7 * (w[i].abs() as f64 + 2.0)
        }
    };
    let what = format!("rope_kv_write {geo:?} t={t} step={step}");
    assert_close(&format!("{what} q"), &gq2, &wq, |i| tol(&wq, i));
    assert_close(&format!("{what} k"), &gk2, &wk, |i| tol(&wk, i));
    assert_eq!(gv2, wv, "{what} v");
}

/// The fused QKV projection (`linear_qkv_rope`, weights in `rope_pair_order`) against its two
/// parts (`linear` on the natural order, then `rope_kv_write`): q and the written KV slots.
fn check_qkv_rope(g: &mut Gpu, rng: &mut ChaCha20Rng, geo: Geo, cols: usize, t: usize, step: u32) {
    let l = layer(g, rng, geo);
    let (nh, nkv, d, dv) = (geo.nh, geo.nkv, geo.d, geo.dv);
    let rows = nh * d + nkv * d + nkv * dv;
    let wv = bf16_exact(uniform(rng, rows * cols, 0.5));
    let bias = uniform(rng, rows, 1.0);
    let x = uniform(rng, t * cols, 1.0);
    let order = tilert::ops::rope_pair_order(nh, nkv, d, dv, geo.rot).expect("even dims");
    let permuted: Vec<f32> = order
        .iter()
        .flat_map(|&r| wv[r * cols..(r + 1) * cols].to_vec())
        .collect();
    let pbias: Vec<f32> = order.iter().map(|&r| bias[r]).collect();
    let w = DeviceMatrix::upload(&mut g.arena, &wv, rows, cols, "qkv").unwrap();
    let wp = DeviceMatrix::upload(&mut g.arena, &permuted, rows, cols, "qkv permuted").unwrap();
    let (dx, db, dpb, dstep) = (g.up(&x), g.up(&bias), g.up(&pbias), g.up(&[step]));
    // Two paths, two caches.
    let a1 = l.args;
    let mut a2 = l.args;
    a2.k_cache = g.zeros::<f32>(geo.capacity * nkv * d);
    a2.v_cache = g.zeros::<f32>(geo.capacity * nkv * dv);
    let (qkv, q1, q2) = (
        g.zeros::<f32>(t * rows),
        g.zeros::<f32>(t * nh * d),
        g.zeros::<f32>(t * nh * d),
    );
    g.ops
        .linear(&g.stream, &w, Some(db), dx, t, qkv, false)
        .unwrap();
    g.ops
        .rope_kv_write(&g.stream, &a1, qkv, t, dstep, q1)
        .unwrap();
    g.ops
        .linear_qkv_rope(&g.stream, &wp, Some(dpb), dx, t, &a2, dstep, q2)
        .unwrap();
    let what = format!("linear_qkv_rope {geo:?} cols={cols} t={t} step={step}");
    // The dot products may round differently (two rows per warp instead of one): relative
    // 1e-5 of the row's Σ|w·x| bounds both; RoPE then mixes two such values.
    let scale: f64 = wv.iter().map(|w| w.abs() as f64).sum::<f64>() / rows as f64 + 1.0;
    let tol = |_: usize| 1e-5 * scale;
    assert_close(&format!("{what} q"), &g.down(q2), &g.down(q1), tol);
    let slots: Vec<usize> = (0..t).map(|i| (step as usize + i) % geo.capacity).collect();
    for (cache1, cache2, width, name) in [
        (a1.k_cache, a2.k_cache, nkv * d, "k"),
        (a1.v_cache, a2.v_cache, nkv * dv, "v"),
    ] {
        let (c1, c2) = (g.down(cache1), g.down(cache2));
        let pick = |c: &[f32]| -> Vec<f32> {
            slots
                .iter()
                .flat_map(|&sl| c[sl * width..(sl + 1) * width].to_vec())
                .collect()
        };
        assert_close(&format!("{what} {name}"), &pick(&c2), &pick(&c1), tol);
    }
}

#[test]
fn linear_qkv_rope_matches_linear_then_rope_kv_write() {
    let Some((mut g, mut rng)) = gpu("linear_qkv_rope_matches_linear_then_rope_kv_write") else {
        return;
    };
    let tiny = Geo {
        qk_norm: false,
        ..TINY_ROPE
    };
    check_qkv_rope(&mut g, &mut rng, GPT_OSS_SLIDING, 2880, 1, 77);
    check_qkv_rope(&mut g, &mut rng, GPT_OSS_SLIDING, 2880, 16, 5000); // ring wrap
    check_qkv_rope(&mut g, &mut rng, MIMO_ROPE, 256, 3, 100_000);
    check_qkv_rope(&mut g, &mut rng, tiny, 64, 5, 14); // ring wrap inside the pass
    check_qkv_rope(&mut g, &mut rng, Geo { rot: 0, ..tiny }, 64, 2, 9);
    check_qkv_rope(&mut g, &mut rng, Geo { dv: 7, ..tiny }, 64, 8, 3); // odd row count
}

/// MiMo-V2-Flash-like geometry (partial RoPE, v dim ≠ qk dim, value scale, sinks).
const MIMO_ROPE: Geo = Geo {
    nh: 16,
    nkv: 4,
    d: 192,
    dv: 128,
    rot: 64,
    capacity: 512,
    window: None,
    sinks: true,
    qk_norm: false,
    value_scale: 0.707,
    attention_factor: 1.0,
};

/// A tiny geometry with partial RoPE, q/k norm and a ring smaller than a pass.
const TINY_ROPE: Geo = Geo {
    nh: 4,
    nkv: 2,
    d: 16,
    dv: 8,
    rot: 12,
    capacity: 16,
    window: Some(4),
    sinks: false,
    qk_norm: true,
    value_scale: 1.0,
    attention_factor: 1.0,
};

const GPT_OSS_SLIDING: Geo = Geo {
    nh: 64,
    nkv: 8,
    d: 64,
    dv: 64,
    rot: 64,
    capacity: 128,
    window: Some(128),
    sinks: true,
    qk_norm: false,
    value_scale: 1.0,
    attention_factor: 1.3465736,
};

#[test]
fn rope_kv_write_matches_cpu() {
    let Some((mut g, mut rng)) = gpu("rope_kv_write_matches_cpu") else {
        return;
    };
    let qwen = Geo {
        nh: 32,
        nkv: 4,
        d: 128,
        dv: 128,
        rot: 128,
        capacity: 4096,
        window: None,
        sinks: false,
        qk_norm: true,
        value_scale: 1.0,
        attention_factor: 1.0,
    };
    let no_rope = Geo {
        rot: 0,
        ..TINY_ROPE
    };
    check_rope_kv_write(&mut g, &mut rng, GPT_OSS_SLIDING, 1, 0);
    check_rope_kv_write(&mut g, &mut rng, GPT_OSS_SLIDING, 16, 5000); // ring wrap
    check_rope_kv_write(&mut g, &mut rng, qwen, 1, 4095);
    check_rope_kv_write(&mut g, &mut rng, qwen, 8, 77);
    check_rope_kv_write(&mut g, &mut rng, MIMO_ROPE, 3, 100_000);
    check_rope_kv_write(&mut g, &mut rng, TINY_ROPE, 16, 3);
    check_rope_kv_write(&mut g, &mut rng, TINY_ROPE, 5, 14); // ring wrap inside the pass
    check_rope_kv_write(&mut g, &mut rng, no_rope, 2, 9);
    // More tokens than ring slots: an error, not a race.
    check_rope_kv_write(
        &mut g,
        &mut rng,
        Geo {
            capacity: 8,
            ..TINY_ROPE
        },
        9,
        0,
    );
}

/// Attention of `t` queries at positions `step..step+t` over the (random) cache of `geo`
/// against `model::cpu::ops::attention_span`.
fn check_attention(
    g: &mut Gpu,
    rng: &mut ChaCha20Rng,
    geo: Geo,
    t: usize,
    step: usize,
    causal: bool,
    max_keys: usize,
) {
    let l = layer(g, rng, geo);
    let a = l.args;
    let (nh, nkv, d, dv) = (geo.nh, geo.nkv, geo.d, geo.dv);
    let q = uniform(rng, t * nh * d, 2.0);
    let scratch_len = Ops::attention_scratch_len(&a, t, max_keys);
    let (dq, dstep) = (g.up(&q), g.up(&[step as u32]));
    let (scratch, dout) = (g.zeros::<f32>(scratch_len), g.zeros::<f32>(t * nh * dv));
    g.ops
        .attention(&g.stream, &a, dq, t, dstep, causal, max_keys, scratch, dout)
        .unwrap();
    let got = g.down(dout);
    let (kc, vc) = (g.down(a.k_cache), g.down(a.v_cache));
    let shape = cpu::AttnShape {
        n_heads: nh,
        n_kv_heads: nkv,
        head_dim: d,
        v_head_dim: dv,
        window: geo.window,
        scale: a.scale,
    };
    let mut want = vec![0f32; t * nh * dv];
    let mut tols = vec![0f64; t * nh * dv];
    let mut scores = Vec::new();
    for ti in 0..t {
        let pos = step + ti;
        let last = if causal { pos } else { step + t - 1 };
        let first = shape.first_visible(pos);
        // Gather the visible rows out of the ring in position order.
        let (mut kr, mut vr) = (Vec::new(), Vec::new());
        for p in first..=last {
            let s = p % geo.capacity;
            kr.extend_from_slice(&kc[s * nkv * d..(s + 1) * nkv * d]);
            vr.extend_from_slice(&vc[s * nkv * dv..(s + 1) * nkv * dv]);
        }
        for h in 0..nh {
            let o = &mut want[(ti * nh + h) * dv..(ti * nh + h + 1) * dv];
            cpu::attention_span(
                &shape,
                &q[ti * nh * d..(ti + 1) * nh * d],
                &kr,
                &vr,
                first,
                first..last + 1,
                h,
                geo.sinks.then_some(&l.sinks[..]),
                &mut scores,
                o,
            );
            // Tolerance: 2e-5 of Σ_j p_j |v_j| (scores reassociated and exp'd, sums of
            // split partials) plus the same of the output scale.
            let gk = h / (nh / nkv);
            let mut ps = Vec::new();
            let mut m = if geo.sinks {
                l.sinks[h] as f64
            } else {
                f64::NEG_INFINITY
            };
            for j in 0..=(last - first) {
                let kk = &kr[j * nkv * d + gk * d..j * nkv * d + (gk + 1) * d];
                let s: f64 = (0..d)
                    .map(|i| q[ti * nh * d + h * d + i] as f64 * kk[i] as f64)
                    .sum::<f64>()
                    * a.scale as f64;
                m = m.max(s);
                ps.push(s);
            }
            let mut den: f64 = ps.iter().map(|s| (s - m).exp()).sum();
            if geo.sinks {
                den += (l.sinks[h] as f64 - m).exp();
            }
            for c in 0..dv {
                let mut mag = 0.0;
                for (j, s) in ps.iter().enumerate() {
                    mag += (s - m).exp() / den * vr[j * nkv * dv + gk * dv + c].abs() as f64;
                }
                tols[(ti * nh + h) * dv + c] = 2e-5 * mag + 1e-7;
            }
        }
    }
    assert_close(
        &format!("attention {geo:?} t={t} step={step} causal={causal} max_keys={max_keys}"),
        &got,
        &want,
        |i| tols[i],
    );
}

#[test]
fn attention_matches_cpu() {
    let Some((mut g, mut rng)) = gpu("attention_matches_cpu") else {
        return;
    };
    let gpt_oss_full = Geo {
        capacity: 8192,
        window: None,
        ..GPT_OSS_SLIDING
    };
    let mimo = Geo {
        nh: 16,
        nkv: 4,
        d: 192,
        dv: 128,
        rot: 64,
        capacity: 1024,
        window: None,
        sinks: false,
        qk_norm: false,
        value_scale: 0.707,
        attention_factor: 1.0,
    };
    let mimo_swa = Geo {
        capacity: 160,
        window: Some(128),
        sinks: true,
        ..mimo
    };
    let tiny = Geo {
        nh: 4,
        nkv: 2,
        d: 16,
        dv: 16,
        rot: 16,
        capacity: 64,
        window: None,
        sinks: false,
        qk_norm: false,
        value_scale: 1.0,
        attention_factor: 1.0,
    };
    let tiny_win = Geo {
        nh: 6,
        nkv: 3,
        d: 32,
        dv: 24,
        capacity: 16,
        window: Some(5),
        sinks: true,
        ..tiny
    };
    for t in [1usize, 2, 8, 16] {
        // gpt-oss sliding layer: ring of 128, wrapped many times.
        check_attention(&mut g, &mut rng, GPT_OSS_SLIDING, t, 3000, true, 128 + t);
        // gpt-oss full layer at a few thousand keys, and at the very first tokens.
        check_attention(&mut g, &mut rng, gpt_oss_full, t, 5000, true, 8192);
        check_attention(&mut g, &mut rng, gpt_oss_full, t, 0, true, 8192);
        // MiMo geometry (d 192, dv 128), causal and bidirectional (drafter) blocks.
        check_attention(&mut g, &mut rng, mimo, t, 700, t > 2, 1024);
        check_attention(&mut g, &mut rng, mimo_swa, t, 1000, false, 160);
        // Tiny heads, windows shorter than the block, non-causal.
        check_attention(&mut g, &mut rng, tiny, t, 40, false, 64);
        check_attention(&mut g, &mut rng, tiny_win, t, 21, t % 2 == 0, 16);
    }
    // max_keys smaller than the real key count still covers every key (longer splits).
    check_attention(&mut g, &mut rng, gpt_oss_full, 2, 7000, true, 64);
}

// ---------------------------------------------------------------------------------------------
// Routing
// ---------------------------------------------------------------------------------------------

#[allow(clippy::too_many_arguments)]
fn check_route(
    g: &mut Gpu,
    rng: &mut ChaCha20Rng,
    kind: RouteArgs,
    cpu_kind: impl Fn(Option<&[f32]>) -> moe::RouterKind<'_>,
    bias: Option<Vec<f32>>,
    e: usize,
    k: usize,
    t: usize,
    ties: bool,
) {
    let mut logits = uniform(rng, t * e, 4.0);
    if ties {
        // Few distinct values: many exact ties, broken by the lower expert id.
        for x in logits.iter_mut() {
            *x = (*x * 1.5).round() / 1.5;
        }
    }
    let (dl, dids, dw) = (g.up(&logits), g.zeros::<i32>(t * k), g.zeros::<f32>(t * k));
    let dbias = bias.as_ref().map(|b| g.up(b));
    let kind = match kind {
        RouteArgs::Sigmoid {
            n_group,
            topk_group,
            norm_topk_prob,
            routed_scaling_factor,
            ..
        } => RouteArgs::Sigmoid {
            correction_bias: dbias,
            n_group,
            topk_group,
            norm_topk_prob,
            routed_scaling_factor,
        },
        other => other,
    };
    g.ops
        .route(&g.stream, &kind, dl, t, e, k, dids, dw)
        .unwrap();
    let (gids, gw) = (g.down(dids), g.down(dw));
    let ck = cpu_kind(bias.as_deref());
    for ti in 0..t {
        let r = moe::route(&ck, &logits[ti * e..(ti + 1) * e], k).unwrap();
        let ids: Vec<usize> = gids[ti * k..(ti + 1) * k]
            .iter()
            .map(|&i| i as usize)
            .collect();
        assert_eq!(ids, r.experts, "route {kind:?} e={e} k={k} token {ti}: ids");
        assert_close(
            &format!("route {kind:?} e={e} k={k} token {ti} weights"),
            &gw[ti * k..(ti + 1) * k],
            &r.weights,
            |j| 2e-6 * r.weights[j].abs() as f64 + 1e-30,
        );
    }
}

#[test]
fn route_matches_cpu() {
    let Some((mut g, mut rng)) = gpu("route_matches_cpu") else {
        return;
    };
    for ties in [false, true] {
        for t in [1usize, 16] {
            // gpt-oss: 32 experts, top-4.
            check_route(
                &mut g,
                &mut rng,
                RouteArgs::GptOss,
                |_| moe::RouterKind::GptOss { bias: None },
                None,
                32,
                4,
                t,
                ties,
            );
            // Qwen3-MoE: 128 experts, top-8, with and without renormalization.
            for norm in [true, false] {
                check_route(
                    &mut g,
                    &mut rng,
                    RouteArgs::Qwen3 {
                        norm_topk_prob: norm,
                    },
                    move |_| moe::RouterKind::Qwen3Moe {
                        norm_topk_prob: norm,
                    },
                    None,
                    128,
                    8,
                    t,
                    ties,
                );
            }
            // Sigmoid: MiMo (256, top-8, no groups), DeepSeek-style groups with and without a
            // correction bias, and the largest shapes (384 experts, top-16).
            for (e, k, n_group, topk_group, with_bias, norm, scaling) in [
                (256usize, 8usize, 1usize, 1usize, true, true, 1.0f32),
                (256, 8, 8, 4, true, true, 2.5),
                (256, 8, 8, 4, false, false, 1.0),
                (384, 16, 1, 1, true, true, 1.0),
                (64, 6, 16, 3, true, true, 1.5),  // groups of 4
                (12, 3, 12, 5, true, false, 1.0), // groups of one expert
            ] {
                let bias = with_bias.then(|| uniform(&mut rng, e, 0.3));
                check_route(
                    &mut g,
                    &mut rng,
                    RouteArgs::Sigmoid {
                        correction_bias: None,
                        n_group,
                        topk_group,
                        norm_topk_prob: norm,
                        routed_scaling_factor: scaling,
                    },
                    move |b| {
                        moe::RouterKind::Sigmoid(moe::SigmoidRouter {
                            correction_bias: b,
                            n_group,
                            topk_group,
                            norm_topk_prob: norm,
                            routed_scaling_factor: scaling,
                        })
                    },
                    bias,
                    e,
                    k,
                    t,
                    ties,
                );
            }
        }
    }
}

/// The fused norm + router + routing against its three parts on the CPU: the normed rows as
/// `rms_norm`, the logits as `linear`, and ids / weights exactly those `moe::route` picks from
/// the GPU's own logits (so a near-tie that the summation order flips cannot make it flaky).
#[test]
fn router_route_matches_cpu() {
    let Some((mut g, mut rng)) = gpu("router_route_matches_cpu") else {
        return;
    };
    let counter = g.zeros::<u32>(1);
    for (e, k, cols, t, bf16_weights, with_bias, kind) in [
        (
            32usize,
            4usize,
            2880usize,
            1usize,
            true,
            true,
            RouteArgs::GptOss,
        ),
        (32, 4, 2880, 16, true, true, RouteArgs::GptOss),
        (32, 4, 64, 5, false, true, RouteArgs::GptOss),
        // One token, bf16: the register-cached path at its limit (2 vectors per thread) and
        // just past it (the general path), and more experts than blocks (rows per block > 1).
        (64, 4, 4096, 1, true, true, RouteArgs::GptOss),
        (64, 4, 4104, 1, true, false, RouteArgs::GptOss),
        (
            256,
            8,
            512,
            1,
            true,
            false,
            RouteArgs::Qwen3 {
                norm_topk_prob: false,
            },
        ),
        (
            128,
            8,
            256,
            3,
            true,
            false,
            RouteArgs::Qwen3 {
                norm_topk_prob: true,
            },
        ),
        (
            256,
            8,
            128,
            16,
            true,
            false,
            RouteArgs::Sigmoid {
                correction_bias: None,
                n_group: 8,
                topk_group: 4,
                norm_topk_prob: true,
                routed_scaling_factor: 2.5,
            },
        ),
    ] {
        let mut wv = uniform(&mut rng, e * cols, 0.5);
        if bf16_weights {
            wv = bf16_exact(wv);
        } else {
            wv[0] = 0.1;
        }
        let router = DeviceMatrix::upload(&mut g.arena, &wv, e, cols, "router").unwrap();
        let bias = with_bias.then(|| uniform(&mut rng, e, 1.0));
        let x = uniform(&mut rng, t * cols, 3.0);
        let nw = uniform(&mut rng, cols, 2.0);
        let eps = 1e-5f32;
        let (dx, dnw, dh) = (g.up(&x), g.up(&nw), g.zeros::<f32>(t * cols));
        let db = bias.as_ref().map(|b| g.up(b));
        let (dlogits, dids, dw) = (
            g.zeros::<f32>(t * e),
            g.zeros::<i32>(t * k),
            g.zeros::<f32>(t * k),
        );
        // Twice on the same counter: the first launch must leave it ready for the second.
        for run in 0..2 {
            let fused = g
                .ops
                .router_route(
                    &g.stream, &router, db, dx, dnw, eps, t, &kind, k, dh, dlogits, counter, dids,
                    dw,
                )
                .unwrap();
            assert!(fused, "16-byte rows take the fused kernel");
            let what = format!("router_route e={e} k={k} cols={cols} t={t} {kind:?} run {run}");
            let mut want_h = vec![0f32; t * cols];
            for r in 0..t {
                cpu::rms_norm(
                    &x[r * cols..(r + 1) * cols],
                    &nw,
                    eps,
                    &mut want_h[r * cols..(r + 1) * cols],
                );
            }
            let got_h = g.down(dh);
            assert_close(&format!("{what}: h"), &got_h, &want_h, |i| {
                1e-5 * want_h[i].abs() as f64 + 1e-37
            });
            let lin = Linear {
                w: Mat::from_f32(e, cols, wv.clone()),
                bias: bias.clone(),
            };
            let mut want_logits = vec![0f32; t * e];
            cpu::linear(&lin, &want_h, t, &mut want_logits);
            let got_logits = g.down(dlogits);
            assert_close(&format!("{what}: logits"), &got_logits, &want_logits, |i| {
                let (ti, r) = (i / e, i % e);
                let s: f64 = (0..cols)
                    .map(|c| (wv[r * cols + c] as f64 * want_h[ti * cols + c] as f64).abs())
                    .sum();
                2e-5 * s + bias.as_ref().map_or(0.0, |b| 1e-6 * b[r].abs() as f64) + 1e-30
            });
            let ck = match kind {
                RouteArgs::GptOss => moe::RouterKind::GptOss { bias: None },
                RouteArgs::Qwen3 { norm_topk_prob } => moe::RouterKind::Qwen3Moe { norm_topk_prob },
                RouteArgs::Sigmoid {
                    n_group,
                    topk_group,
                    norm_topk_prob,
                    routed_scaling_factor,
                    ..
                } => moe::RouterKind::Sigmoid(moe::SigmoidRouter {
                    correction_bias: None,
                    n_group,
                    topk_group,
                    norm_topk_prob,
                    routed_scaling_factor,
                }),
            };
            let (gids, gw) = (g.down(dids), g.down(dw));
            for ti in 0..t {
                let r = moe::route(&ck, &got_logits[ti * e..(ti + 1) * e], k).unwrap();
                let ids: Vec<usize> = gids[ti * k..(ti + 1) * k]
                    .iter()
                    .map(|&i| i as usize)
                    .collect();
                assert_eq!(ids, r.experts, "{what}: token {ti} ids");
                assert_close(
                    &format!("{what}: token {ti} weights"),
                    &gw[ti * k..(ti + 1) * k],
                    &r.weights,
                    |j| 2e-6 * r.weights[j].abs() as f64 + 1e-30,
                );
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Sampling
// ---------------------------------------------------------------------------------------------

/// The exact distribution `model::sampling::Sampler` draws from, in f64: the kept set and
/// weights of `model::sampling::SamplingDist::kept` (the one definition of the sampling
/// transform; `w = exp_f32((x − max) · (1/T))`, the kernel's `exp_f32` bit for bit), each weight
/// divided by the kept mass.
fn reference_distribution(logits: &[f32], p: &SampleArgs) -> Vec<f64> {
    let params = model::sampling::SamplingParams {
        temperature: p.temperature,
        top_k: (p.top_k > 0).then_some(p.top_k),
        top_p: Some(p.top_p),
        min_p: Some(p.min_p),
        ..Default::default()
    };
    let mut dist = model::sampling::SamplingDist::new(&params).unwrap();
    let kept = dist.kept(logits, &[], &[]).unwrap();
    let total = kept.total();
    let mut out = vec![0.0; logits.len()];
    kept.for_each(|id, w| out[id as usize] = w as f64 / total);
    out
}

#[test]
fn sample_draws_the_sampler_distribution() {
    let Some((mut g, mut rng)) = gpu("sample_draws_the_sampler_distribution") else {
        return;
    };
    let params = [
        SampleArgs {
            temperature: 0.7,
            top_k: 0,
            top_p: 1.0,
            min_p: 0.0,
        },
        SampleArgs {
            temperature: 1.0,
            top_k: 10,
            top_p: 1.0,
            min_p: 0.0,
        },
        SampleArgs {
            temperature: 1.3,
            top_k: 0,
            top_p: 0.8,
            min_p: 0.0,
        },
        SampleArgs {
            temperature: 1.0,
            top_k: 0,
            top_p: 1.0,
            min_p: 0.05,
        },
        SampleArgs {
            temperature: 0.9,
            top_k: 20,
            top_p: 0.9,
            min_p: 0.02,
        },
        SampleArgs {
            temperature: 2.0,
            top_k: 1,
            top_p: 1.0,
            min_p: 0.0,
        },
    ];
    let draws = 4000usize;
    let uniforms: Vec<f32> = (0..draws)
        .map(|i| ((i as f64 + 0.5) / draws as f64) as f32)
        .collect();
    let du = g.up(&uniforms);
    let dout = g.zeros::<u32>(draws);
    let scratch = g.zeros::<u32>(sample_scratch_len(3000));
    for v in [50usize, 3000] {
        for ties in [false, true] {
            let mut logits = uniform(&mut rng, v, 4.0);
            if ties {
                for x in logits.iter_mut() {
                    *x = (*x * 2.0).round() / 2.0;
                }
            }
            logits[rng.random_range(0..v)] = f32::NAN;
            let dl = g.up(&logits);
            for p in &params {
                let want = reference_distribution(
                    &logits
                        .iter()
                        .map(|&x| if x.is_nan() { f32::NEG_INFINITY } else { x })
                        .collect::<Vec<_>>(),
                    p,
                );
                // The reference is model::sampling's distribution: check it against the
                // Sampler itself (its own RNG; 6 sigma per token).
                let sp = model::sampling::SamplingParams {
                    temperature: p.temperature,
                    top_k: (p.top_k > 0).then_some(p.top_k),
                    top_p: Some(p.top_p),
                    min_p: Some(p.min_p),
                    seed: Some(rng.random()),
                    ..Default::default()
                };
                let mut sampler = model::sampling::Sampler::new(&sp).unwrap();
                let n_cpu = 20_000usize;
                let mut counts = vec![0usize; v];
                for _ in 0..n_cpu {
                    counts[sampler.sample(&logits, &[], &[]) as usize] += 1;
                }
                for (i, &c) in counts.iter().enumerate() {
                    let e = n_cpu as f64 * want[i];
                    let sd = (e * (1.0 - want[i])).sqrt();
                    assert!(
                        (c as f64 - e).abs() <= 6.0 * sd + 2.0 && (want[i] > 0.0 || c == 0),
                        "reference vs Sampler (6 sigma), v={v} ties={ties} {p:?}: token {i}: {c} of \
                         {n_cpu}, p = {}",
                        want[i]
                    );
                }
                // Device: stratified uniforms through the inverse CDF give each token
                // N·p ± 1 draws (exactly, up to f64 rounding of the bin edges).
                for i in 0..draws {
                    g.ops
                        .sample(
                            &g.stream,
                            dl,
                            v,
                            p,
                            du.slice(i..i + 1),
                            scratch,
                            dout.slice(i..i + 1),
                        )
                        .unwrap();
                }
                let got = g.down(dout);
                let mut dc = vec![0usize; v];
                for &tok in &got {
                    assert!((tok as usize) < v, "token {tok} out of range");
                    dc[tok as usize] += 1;
                }
                for i in 0..v {
                    let e = draws as f64 * want[i];
                    assert!(
                        (dc[i] as f64 - e).abs() <= 1.01 && (want[i] > 0.0 || dc[i] == 0),
                        "device sampler, v={v} ties={ties} {p:?}: token {i} drawn {} times, \
                         expected {e:.3}",
                        dc[i]
                    );
                }
                println!(
                    "sample v={v} ties={ties} {p:?}: {} tokens kept, device counts match",
                    want.iter().filter(|&&x| x > 0.0).count()
                );
            }
        }
    }
    // No finite logit: token 0, as Sampler::sample.
    let dl = g.up(&[f32::NEG_INFINITY, f32::NAN, f32::NEG_INFINITY]);
    htod(&g.stream, &[7u32], dout.slice(0..1)).unwrap();
    g.ops
        .sample(
            &g.stream,
            dl,
            3,
            &params[0],
            du.slice(0..1),
            scratch,
            dout.slice(0..1),
        )
        .unwrap();
    assert_eq!(g.down(dout.slice(0..1)), vec![0]);
}

// ---------------------------------------------------------------------------------------------
// Fills
// ---------------------------------------------------------------------------------------------

#[test]
fn fills_are_deterministic_and_in_range() {
    let Some((mut g, mut rng)) = gpu("fills_are_deterministic_and_in_range") else {
        return;
    };
    let n = 1_000_003usize;
    let seed: u64 = rng.random();
    let (a, b): (DPtr<bf16>, DPtr<bf16>) = (g.zeros(n), g.zeros(n));
    g.ops.fill_uniform_bf16(&g.stream, a, 0.25, seed).unwrap();
    g.ops.fill_uniform_bf16(&g.stream, b, 0.25, seed).unwrap();
    let (va, vb) = (g.down(a), g.down(b));
    assert_eq!(va, vb, "same seed, same values");
    let f: Vec<f32> = va.iter().map(|x| x.to_f32()).collect();
    assert!(f.iter().all(|&x| (-0.25..0.25).contains(&x)), "bf16 range");
    let mean = f.iter().map(|&x| x as f64).sum::<f64>() / n as f64;
    let var = f.iter().map(|&x| (x as f64).powi(2)).sum::<f64>() / n as f64;
    // Uniform on [-s, s): mean 0 (sd s/sqrt(3n)), variance s²/3.
    assert!(mean.abs() < 1e-3, "bf16 mean {mean}");
    assert!((var - 0.0625 / 3.0).abs() < 2e-4, "bf16 variance {var}");

    let c: DPtr<f32> = g.zeros(n);
    g.ops.fill_uniform_f32(&g.stream, c, 3.0, seed + 1).unwrap();
    let vc = g.down(c);
    assert!(vc.iter().all(|&x| (-3.0..3.0).contains(&x)), "f32 range");
    let distinct: std::collections::HashSet<u32> = vc.iter().map(|x| x.to_bits()).collect();
    assert!(distinct.len() > n / 2, "f32 fill is not random");

    let d: DPtr<u8> = g.zeros(n);
    g.ops.fill_bytes(&g.stream, d, 118, 125, seed).unwrap();
    let vd = g.down(d);
    let mut hist = [0usize; 256];
    for &x in &vd {
        hist[x as usize] += 1;
    }
    for (v, &h) in hist.iter().enumerate() {
        if (118..=125).contains(&v) {
            let e = n as f64 / 8.0;
            assert!((h as f64 - e).abs() < 6.0 * e.sqrt(), "byte {v}: {h}");
        } else {
            assert_eq!(h, 0, "byte {v} outside 118..=125");
        }
    }
}

/// Bad shapes are typed errors, not panics or launches.
#[test]
fn invalid_arguments_are_errors() {
    let Some((mut g, _rng)) = gpu("invalid_arguments_are_errors") else {
        return;
    };
    let w = DeviceMatrix::upload(&mut g.arena, &[1.0; 12], 3, 4, "w").unwrap();
    let x: DPtr<f32> = g.zeros(4 * 17);
    let y: DPtr<f32> = g.zeros(3 * 17);
    assert!(g.ops.linear(&g.stream, &w, None, x, 17, y, false).is_err());
    assert!(g.ops.linear(&g.stream, &w, None, x, 0, y, false).is_err());
    assert!(g
        .ops
        .linear(&g.stream, &w, None, x.slice(0..3), 1, y, false)
        .is_err());
    let logits: DPtr<f32> = g.zeros(400);
    let ids: DPtr<i32> = g.zeros(32);
    let wts: DPtr<f32> = g.zeros(32);
    assert!(g
        .ops
        .route(&g.stream, &RouteArgs::GptOss, logits, 1, 400, 4, ids, wts)
        .is_err());
    assert!(g
        .ops
        .route(
            &g.stream,
            &RouteArgs::Sigmoid {
                correction_bias: None,
                n_group: 3,
                topk_group: 1,
                norm_topk_prob: true,
                routed_scaling_factor: 1.0
            },
            logits,
            1,
            32,
            4,
            ids,
            wts
        )
        .is_err());
    let u: DPtr<f32> = g.zeros(1);
    let o: DPtr<u32> = g.zeros(1);
    let bad = SampleArgs {
        temperature: 0.0,
        top_k: 0,
        top_p: 1.0,
        min_p: 0.0,
    };
    let scratch: DPtr<u32> = g.zeros(sample_scratch_len(400));
    assert!(g
        .ops
        .sample(&g.stream, logits, 400, &bad, u, scratch, o)
        .is_err());
    // Too little scratch: an error, not a fault.
    let good = SampleArgs {
        temperature: 1.0,
        ..bad
    };
    assert!(g
        .ops
        .sample(&g.stream, logits, 400, &good, u, scratch.slice(0..100), o)
        .is_err());
}

/// Timings of the other ops at gpt-oss-20b sizes (printed, not asserted).
#[test]
fn op_timings_at_gpt_oss_sizes() {
    let Some((mut g, mut rng)) = gpu("op_timings_at_gpt_oss_sizes") else {
        return;
    };
    let time_us = |g: &Gpu, f: &mut dyn FnMut()| -> f64 {
        f();
        let iters = 20;
        let start = g
            .stream
            .record_event(Some(CUevent_flags::CU_EVENT_DEFAULT))
            .unwrap();
        for _ in 0..iters {
            f();
        }
        let end = g
            .stream
            .record_event(Some(CUevent_flags::CU_EVENT_DEFAULT))
            .unwrap();
        start.elapsed_ms(&end).unwrap() as f64 * 1e3 / iters as f64
    };
    for (capacity, window, step) in [
        (128usize, Some(128usize), 5000u32),
        (4096, None, 4095),
        (32_768, None, 32_767),
    ] {
        let geo = Geo {
            capacity,
            window,
            ..GPT_OSS_SLIDING
        };
        let l = layer(&mut g, &mut rng, geo);
        for t in [1usize, 16] {
            let step = step + 1 - t as u32;
            let q = g.up(&uniform(&mut rng, t * 64 * 64, 1.0));
            let dstep = g.up(&[step]);
            let scratch = g.zeros::<f32>(Ops::attention_scratch_len(&l.args, t, capacity));
            let out = g.zeros::<f32>(t * 64 * 64);
            let us = time_us(&g, &mut || {
                g.ops
                    .attention(
                        &g.stream, &l.args, q, t, dstep, true, capacity, scratch, out,
                    )
                    .unwrap()
            });
            let qkv = g.zeros::<f32>(t * (64 * 64 + 2 * 8 * 64));
            let us_rope = time_us(&g, &mut || {
                g.ops
                    .rope_kv_write(&g.stream, &l.args, qkv, t, dstep, q)
                    .unwrap()
            });
            println!(
                "TIMING attention gpt-oss (64 q / 8 kv heads, d 64) window {window:?} keys up to \
                 {} t={t}: {us:.1} us; rope_kv_write {us_rope:.1} us",
                step as usize + t
            );
        }
    }
    let v = 201_088usize;
    let logits = g.up(&uniform(&mut rng, 16 * v, 8.0));
    let out = g.zeros::<u32>(16);
    let argmax_scratch = g.zeros::<u32>(ARGMAX_SCRATCH);
    let u = g.up(&[0.37f32]);
    let scratch = g.zeros::<u32>(sample_scratch_len(v));
    for t in [1usize, 16] {
        let us = time_us(&g, &mut || {
            g.ops
                .argmax(&g.stream, logits, t, v, argmax_scratch, out)
                .unwrap()
        });
        println!("TIMING argmax v={v} t={t}: {us:.1} us");
    }
    for p in [
        SampleArgs {
            temperature: 0.8,
            top_k: 0,
            top_p: 1.0,
            min_p: 0.0,
        },
        SampleArgs {
            temperature: 0.8,
            top_k: 50,
            top_p: 0.95,
            min_p: 0.0,
        },
        SampleArgs {
            temperature: 1.0,
            top_k: 0,
            top_p: 0.9,
            min_p: 0.05,
        },
    ] {
        let us = time_us(&g, &mut || {
            g.ops
                .sample(&g.stream, logits, v, &p, u, scratch, out)
                .unwrap()
        });
        println!("TIMING sample v={v} {p:?}: {us:.1} us");
    }
    // Every row of a 16-row pass sampled in one launch (row table and history upload, ids
    // back included), without and with penalties over a 512-token history.
    let mut sampler = tilert::sample::DeviceSampler::new(g.stream.clone(), v).unwrap();
    let hist: Vec<u32> = (0..512u32).map(|i| i * 7919 % v as u32).collect();
    for p in [
        model::sampling::SamplingParams::greedy(),
        model::sampling::SamplingParams {
            temperature: 0.8,
            top_k: Some(50),
            top_p: Some(0.95),
            ..Default::default()
        },
        model::sampling::SamplingParams {
            temperature: 1.0,
            top_p: Some(0.9),
            min_p: Some(0.05),
            repetition_penalty: Some(1.1),
            frequency_penalty: 0.3,
            ..Default::default()
        },
    ] {
        let rows: Vec<tilert::sample::RowSample> = (0..16)
            .map(|i| tilert::sample::RowSample {
                logits: logits.slice(i * v..(i + 1) * v),
                params: &p,
                prompt: &hist,
                generated: &hist[..64],
                stream: Some(model::sampling::UniformStream {
                    key: [i as u32; 8],
                    word_pos: 0,
                }),
            })
            .collect();
        let us = time_us(&g, &mut || {
            sampler.sample(&g.ops, &rows).unwrap();
        });
        println!(
            "TIMING sample_rows 16 rows v={v} temperature {} top_k {:?} top_p {:?} min_p {:?} \
             penalties {}: {us:.1} us",
            p.temperature,
            p.top_k,
            p.top_p,
            p.min_p,
            p.penalizes()
        );
    }
    let rl = g.up(&uniform(&mut rng, 16 * 32, 3.0));
    let (ids, w) = (g.zeros::<i32>(16 * 4), g.zeros::<f32>(16 * 4));
    for t in [1usize, 16] {
        let us = time_us(&g, &mut || {
            g.ops
                .route(&g.stream, &RouteArgs::GptOss, rl, t, 32, 4, ids, w)
                .unwrap()
        });
        let x = g.zeros::<f32>(t * 2880);
        let nw = g.up(&vec![1.0f32; 2880]);
        let h = g.zeros::<f32>(t * 2880);
        let us_norm = time_us(&g, &mut || {
            g.ops.rms_norm(&g.stream, x, nw, t, 2880, 1e-5, h).unwrap()
        });
        let y = g.zeros::<f32>(t * 4 * 2880);
        let us_comb = time_us(&g, &mut || {
            g.ops
                .combine(&g.stream, x, y, ids, t, 4, 2880, Some((nw, 1e-5, h)))
                .unwrap()
        });
        let router = DeviceMatrix::upload(
            &mut g.arena,
            &bf16_exact(uniform(&mut rng, 32 * 2880, 0.05)),
            32,
            2880,
            "router",
        )
        .unwrap();
        let (logits32, counter) = (g.zeros::<f32>(t * 32), g.zeros::<u32>(1));
        let us_rr = time_us(&g, &mut || {
            let fused = g
                .ops
                .router_route(
                    &g.stream,
                    &router,
                    None,
                    x,
                    nw,
                    1e-5,
                    t,
                    &RouteArgs::GptOss,
                    4,
                    h,
                    logits32,
                    counter,
                    ids,
                    w,
                )
                .unwrap();
            assert!(fused);
        });
        println!(
            "TIMING t={t}: route gpt-oss (32 experts, top-4) {us:.1} us; rms_norm 2880 \
             {us_norm:.1} us; combine + rms_norm (k 4, H 2880) {us_comb:.1} us; \
             rms_norm + router + route (fused) {us_rr:.1} us"
        );
    }
}

// ---------------------------------------------------------------------------------------------
// Batched-decode ops (`ops::rows`): each row its own cache, position and key splits
// ---------------------------------------------------------------------------------------------

/// A copy of row `r`'s layer whose caches are fresh copies of its own (to run the single-sequence
/// op on the same inputs).
fn cache_copy(g: &mut Gpu, a: &AttnArgs) -> AttnArgs {
    let (k, v) = (g.down(a.k_cache), g.down(a.v_cache));
    AttnArgs {
        k_cache: g.up(&k),
        v_cache: g.up(&v),
        ..*a
    }
}

/// `rows[r] = (position, max_keys)`: the batched attention (one launch over all rows, each with
/// `decode_splits(max_keys)` splits over its own ring) against each row as a one-token pass of
/// `Ops::attention` with that `max_keys` — bit-identical; then RoPE + KV write (unfused, with the
/// geometry's q/k norm) and, without q/k norm, the fused projection, each against the
/// single-sequence op on copies of the row's cache — bit-identical q and caches.
fn check_rows(g: &mut Gpu, rng: &mut ChaCha20Rng, geo: Geo, rows: &[(usize, usize)]) {
    use tilert::ops::rows::{decode_splits, KvRow, RowOps, KV_ROW_WORDS};
    let rops = RowOps::load(&g.ops).unwrap();
    let t = rows.len();
    let (nh, nkv, d, dv) = (geo.nh, geo.nkv, geo.d, geo.dv);
    let a = layer(g, rng, geo).args;
    // Every row: the shared weights / tables of `a`, its own random cache.
    let own: Vec<AttnArgs> = (0..t)
        .map(|_| {
            let (k, v) = (
                uniform(rng, geo.capacity * nkv * d, 1.0),
                uniform(rng, geo.capacity * nkv * dv, 1.0),
            );
            AttnArgs {
                k_cache: g.up(&k),
                v_cache: g.up(&v),
                ..a
            }
        })
        .collect();
    let table = |own: &[AttnArgs]| -> (Vec<u64>, usize) {
        let mut words = Vec::new();
        let mut max_s = 1;
        for (r, &(pos, max_keys)) in rows.iter().enumerate() {
            let s = decode_splits(&own[r], max_keys);
            max_s = max_s.max(s);
            let row = KvRow::new(
                &own[r],
                own[r].k_cache,
                own[r].v_cache,
                geo.capacity,
                pos,
                s,
            );
            words.extend(row.unwrap().words());
        }
        assert_eq!(words.len(), t * KV_ROW_WORDS);
        (words, max_s)
    };
    let what = format!("rows {geo:?} {rows:?}");

    // Attention.
    let (words, max_s) = table(&own);
    let dtable = g.up(&words);
    let q = uniform(rng, t * nh * d, 2.0);
    let dq = g.up(&q);
    let scratch = g.zeros::<f32>(RowOps::attention_scratch_len(&a, t, max_s));
    let out = g.zeros::<f32>(t * nh * dv);
    for rep in 0..2 {
        // Twice: the merge counters are left at zero for the next launch.
        rops.attention(&g.stream, &a, dq, t, dtable, max_s, scratch, out)
            .unwrap();
        let got = g.down(out);
        for (r, &(pos, max_keys)) in rows.iter().enumerate() {
            let q1 = g.up(&q[r * nh * d..(r + 1) * nh * d]);
            let step = g.up(&[pos as u32]);
            let sc = g.zeros::<f32>(Ops::attention_scratch_len(&own[r], 1, max_keys));
            let o1 = g.zeros::<f32>(nh * dv);
            g.ops
                .attention(&g.stream, &own[r], q1, 1, step, true, max_keys, sc, o1)
                .unwrap();
            assert_eq!(
                got[r * nh * dv..(r + 1) * nh * dv],
                g.down(o1)[..],
                "{what}: attention row {r} (launch {rep})"
            );
        }
    }

    // RoPE + KV write, then the fused projection (weights in rope pair order).
    let qkv_w = nh * d + nkv * d + nkv * dv;
    let cols = 64;
    let wv = bf16_exact(uniform(rng, qkv_w * cols, 0.5));
    let w = DeviceMatrix::upload(&mut g.arena, &wv, qkv_w, cols, "qkv").unwrap();
    let bias = g.up(&uniform(rng, qkv_w, 1.0));
    let x = uniform(rng, t * cols, 1.0);
    let qkv = uniform(rng, t * qkv_w, 1.0);
    let (dx, dqkv) = (g.up(&x), g.up(&qkv));
    let fused = !geo.qk_norm && tilert::ops::rope_pair_order(nh, nkv, d, dv, geo.rot).is_some();
    for pass in 0..1 + usize::from(fused) {
        let copies: Vec<AttnArgs> = own.iter().map(|o| cache_copy(g, o)).collect();
        let qb = g.zeros::<f32>(t * nh * d);
        if pass == 0 {
            rops.rope_kv_write(&g.stream, &a, dqkv, t, dtable, qb)
                .unwrap();
        } else {
            rops.linear_qkv_rope(&g.stream, &w, Some(bias), dx, t, &a, dtable, qb)
                .unwrap();
        }
        let got_q = g.down(qb);
        for (r, &(pos, _)) in rows.iter().enumerate() {
            let step = g.up(&[pos as u32]);
            let q1 = g.zeros::<f32>(nh * d);
            if pass == 0 {
                let row = g.up(&qkv[r * qkv_w..(r + 1) * qkv_w]);
                g.ops
                    .rope_kv_write(&g.stream, &copies[r], row, 1, step, q1)
                    .unwrap();
            } else {
                let xr = g.up(&x[r * cols..(r + 1) * cols]);
                g.ops
                    .linear_qkv_rope(&g.stream, &w, Some(bias), xr, 1, &copies[r], step, q1)
                    .unwrap();
            }
            let op = if pass == 0 {
                "rope_kv_write"
            } else {
                "linear_qkv_rope"
            };
            assert_eq!(
                got_q[r * nh * d..(r + 1) * nh * d],
                g.down(q1)[..],
                "{what}: {op} q row {r}"
            );
            assert_eq!(
                g.down(own[r].k_cache),
                g.down(copies[r].k_cache),
                "{what}: {op} k cache row {r}"
            );
            assert_eq!(
                g.down(own[r].v_cache),
                g.down(copies[r].v_cache),
                "{what}: {op} v cache row {r}"
            );
        }
    }
    println!("{what}: bit-identical to the single-sequence ops");
}

#[test]
fn rows_ops_match_single_sequence_ops() {
    let Some((mut g, mut rng)) = gpu("rows_ops_match_single_sequence_ops") else {
        return;
    };
    let gpt_oss_full = Geo {
        capacity: 8192,
        window: None,
        ..GPT_OSS_SLIDING
    };
    // gpt-oss full layers: rows at different contexts and session sizes (different splits, up
    // to the most a one-token pass uses), the first position included.
    check_rows(
        &mut g,
        &mut rng,
        gpt_oss_full,
        &[
            (0, 8192),
            (5000, 8192),
            (700, 2048),
            (31, 256),
            (8000, 4096),
        ],
    );
    // gpt-oss sliding layer: rings wrapped many times, 16 rows.
    let sliding: Vec<(usize, usize)> = (0..16).map(|i| (i * 397 + 3, 144)).collect();
    check_rows(&mut g, &mut rng, GPT_OSS_SLIDING, &sliding);
    // MiMo geometry (d 192, dv 128, partial RoPE, value scale), ring wrap.
    check_rows(&mut g, &mut rng, MIMO_ROPE, &[(1000, 512), (3, 512)]);
    // q/k norm (unfused RoPE + KV write), tiny ring and window.
    check_rows(&mut g, &mut rng, TINY_ROPE, &[(40, 16), (0, 16), (17, 16)]);
    // Bad inputs are errors.
    let rops = tilert::ops::rows::RowOps::load(&g.ops).unwrap();
    let a = layer(&mut g, &mut rng, TINY_ROPE).args;
    let short = g.zeros::<u64>(3);
    let (q, out) = (g.zeros::<f32>(64 * 16), g.zeros::<f32>(64 * 16));
    let scratch = g.zeros::<f32>(1 << 16);
    let e = rops
        .attention(&g.stream, &a, q, 1, short, 1, scratch, out)
        .unwrap_err();
    assert!(e.to_string().contains("row table"), "{e}");
    let table = g.zeros::<u64>(64);
    let e = rops
        .attention(&g.stream, &a, q, 2, table, 65, scratch, out)
        .unwrap_err();
    assert!(e.to_string().contains("65 key splits"), "{e}");
    let e = tilert::ops::rows::KvRow::new(&a, a.k_cache, a.v_cache, 17, 0, 1).unwrap_err();
    assert!(e.to_string().contains("k_cache"), "{e}");
    let e = tilert::ops::rows::KvRow::new(&a, a.k_cache, a.v_cache, 16, 0, 0).unwrap_err();
    assert!(e.to_string().contains("0 key splits"), "{e}");
}
