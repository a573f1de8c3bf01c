//! GPU tests of the routed-expert kernels (`tilert::moe`) against the CPU definition of a MoE
//! block (`model::cpu::ffn::moe_block`'s per-expert path: `expert_matmul` + bias → `ops::glu` →
//! `expert_matmul` + bias, times the routing weight), on random experts routed by
//! `moe::route_into`; and their timings at gpt-oss-20b size (printed, not asserted).
//!
//! Tolerances (each output compared with the CPU's f32 result, both sides bounded against the
//! exact value):
//! * a gate/up row: GPU bound + CPU bound + one f32 rounding of the bias add on each side. MXFP4:
//!   `fp4::cuda::gemv_error_bound` (the kernels' numerics are the GEMV's) + `fp4::cpu::
//!   gemv_error_bound`; dense: `γ_n·Σ|w·x|` with `n = moe::dense_roundings(K)` on the GPU and
//!   `K/32 + 40` for the CPU's 32-lane dot (products, lane sums, 5-level tree, ≤ 31 tail adds);
//! * an activation: the largest change of `glu` (the CPU definition) over the corners of the
//!   gate/up error box, plus 2^-20 relative for the two sides' f32 evaluation of `exp` and the
//!   products (a few ulps each);
//! * a down output, computed from the GPU's own activations: `|w|·(GPU + CPU bound + 2^-22·|s|)`
//!   plus 2^-23·|y| for the weight multiply.

use std::sync::Arc;

use cudarc::driver::sys::CUevent_flags;
use cudarc::driver::{CudaContext, CudaStream, LaunchConfig, PushKernelArg};
use model::config::Activation;
use model::cpu::{ffn::expert_matmul, ops};
use model::weights::{Expert, ExpertMat, GateUpLayout, Linear, Mat, Moe};
use rand::seq::index::sample;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use tilert::arena::{dtoh, Arena, DPtr};
use tilert::moe::{dense_roundings, DeviceMoe, MoeKernels, MoeTuning};
use tilert::ops::GluArgs;
use tilert::RuntimeError;

const GPT_OSS_GLU: Activation = Activation::ClampedSwiglu {
    alpha: 1.702,
    limit: 7.0,
};

fn glu_args(a: Activation) -> GluArgs {
    match a {
        Activation::ClampedSwiglu { alpha, limit } => GluArgs::ClampedSwiglu { alpha, limit },
        Activation::Swiglu => GluArgs::Swiglu,
    }
}

fn fresh_rng(test: &str) -> ChaCha8Rng {
    let seed: u64 = rand::random();
    eprintln!("{test}: seed {seed}");
    ChaCha8Rng::seed_from_u64(seed)
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Kind {
    Mxfp4,
    Bf16,
    F32,
}

/// Random codes; scale bytes around `2^c`, `c = −log2(2.93·√K)`, so O(1) inputs give O(1)
/// outputs (as `DeviceMoe::synthetic`).
fn random_mx(rng: &mut ChaCha8Rng, rows: usize, k: usize) -> fp4::MxMatrix {
    let c = -(2.93 * (k as f64).sqrt()).log2();
    let lo = (127.0 + c.round() - 2.0) as u8;
    fp4::MxMatrix {
        rows,
        k,
        blocks: (0..rows * k / 2).map(|_| rng.random()).collect(),
        scales: (0..rows * k / 32)
            .map(|_| lo + rng.random_range(0..4u8))
            .collect(),
    }
}

fn random_dense(rng: &mut ChaCha8Rng, rows: usize, k: usize, bf16: bool) -> Mat {
    let a = (3.0 / k as f32).sqrt();
    let data: Vec<f32> = (0..rows * k).map(|_| rng.random_range(-a..a)).collect();
    // bf16 experts are stored as bf16, as a bf16 checkpoint loads.
    if bf16 {
        Mat::from_bf16(
            rows,
            k,
            data.into_iter().map(half::bf16::from_f32).collect(),
        )
    } else {
        Mat::from_f32(rows, k, data)
    }
}

fn random_mat(rng: &mut ChaCha8Rng, kind: Kind, rows: usize, k: usize) -> ExpertMat {
    match kind {
        Kind::Mxfp4 => ExpertMat::Mxfp4(random_mx(rng, rows, k).into()),
        Kind::Bf16 => ExpertMat::Dense(random_dense(rng, rows, k, true)),
        Kind::F32 => ExpertMat::Dense(random_dense(rng, rows, k, false)),
    }
}

fn random_vec(rng: &mut ChaCha8Rng, n: usize, a: f32) -> Vec<f32> {
    (0..n).map(|_| rng.random_range(-a..a)).collect()
}

#[allow(clippy::too_many_arguments)]
fn random_moe(
    rng: &mut ChaCha8Rng,
    kind: Kind,
    layout: GateUpLayout,
    e: usize,
    h: usize,
    i: usize,
    bias: bool,
) -> Moe {
    Moe {
        router: Linear {
            w: random_dense(rng, e, h, false),
            bias: None,
        },
        correction_bias: None,
        experts: (0..e)
            .map(|_| Expert {
                gate_up: random_mat(rng, kind, 2 * i, h),
                gate_up_bias: bias.then(|| random_vec(rng, 2 * i, 0.5)),
                down: random_mat(rng, kind, h, i),
                down_bias: bias.then(|| random_vec(rng, h, 0.5)),
            })
            .collect(),
        gate_up_layout: layout,
    }
}

/// `γ_n = n·u / (1 − n·u)`, u = 2^-24.
fn gamma(n: usize) -> f64 {
    let nu = n as f64 * 2f64.powi(-24);
    nu / (1.0 - nu)
}

/// `W·x` on the CPU (`expert_matmul`, the CPU executor's definition) and the per-row bound of
/// |GPU − CPU| (both against the exact value; see the module docs).
fn cpu_matvec_and_bound(w: &ExpertMat, x: &[f32]) -> (Vec<f32>, Vec<f64>) {
    let mut y = vec![0f32; w.rows()];
    expert_matmul(w, x, 1, &mut y).unwrap();
    let bound = match w {
        ExpertMat::Mxfp4(m) => {
            let v = m.view().unwrap();
            let g = fp4::cuda::gemv_error_bound(v, x, false);
            let c = fp4::cpu::gemv_error_bound(v, x);
            g.iter().zip(&c).map(|(a, b)| a + b).collect()
        }
        ExpertMat::Dense(m) => {
            let k = m.cols;
            let gam = gamma(dense_roundings(k)) + gamma(k / 32 + 40);
            (0..m.rows)
                .map(|r| {
                    let s: f64 = m
                        .row(r)
                        .iter()
                        .zip(x)
                        .map(|(&w, &x)| (w as f64 * x as f64).abs())
                        .sum();
                    gam * s + 1e-37
                })
                .collect()
        }
    };
    (y, bound)
}

/// One routed batch: `ids` / `weights` `[T, k]` from `moe::route_into` (GptOss on random
/// logits; `shared`: every token gets the same logits, so all share the same k experts).
fn route(rng: &mut ChaCha8Rng, e: usize, t: usize, k: usize, shared: bool) -> (Vec<i32>, Vec<f32>) {
    let kind = moe::RouterKind::GptOss { bias: None };
    let mut scratch = moe::RouterScratch::new();
    let mut r = moe::Routing::with_capacity(k);
    let common = random_vec(rng, e, 2.0);
    let (mut ids, mut ws) = (Vec::new(), Vec::new());
    for _ in 0..t {
        let logits = if shared {
            common.clone()
        } else {
            random_vec(rng, e, 2.0)
        };
        moe::route_into(&kind, &logits, k, &mut scratch, &mut r).unwrap();
        ids.extend(r.experts.iter().map(|&x| x as i32));
        ws.extend_from_slice(&r.weights);
    }
    (ids, ws)
}

struct Gpu {
    stream: Arc<CudaStream>,
    kernels: MoeKernels,
}

impl Gpu {
    fn new(ctx: &Arc<CudaContext>) -> Self {
        Self {
            stream: ctx.default_stream(),
            kernels: MoeKernels::load(ctx).unwrap(),
        }
    }
}

/// One checked configuration (`kind`, `layout`, `bias` are read through `Debug` in failure
/// messages: the experts themselves are built from them by the caller).
#[derive(Debug, Clone, Copy)]
#[allow(dead_code)]
struct Case {
    kind: Kind,
    layout: GateUpLayout,
    glu: Activation,
    bias: bool,
    e: usize,
    h: usize,
    i: usize,
    t: usize,
    k: usize,
    shared: bool,
}

/// Runs gate_up and down on the GPU and checks every output; returns the worst error as a
/// fraction of its bound for (act, y).
fn check_case(gpu: &Gpu, rng: &mut ChaCha8Rng, c: Case, m: &Moe, dm: &DeviceMoe) -> (f64, f64) {
    let (h, i, t, k) = (c.h, c.i, c.t, c.k);
    let (ids, ws) = route(rng, c.e, t, k, c.shared);
    let x = random_vec(rng, t * h, 2.0);
    let mut arena = Arena::new(gpu.stream.clone());
    let d_x = arena.upload(&x, "h").unwrap();
    let d_ids = arena.upload(&ids, "ids").unwrap();
    let d_w = arena.upload(&ws, "weights").unwrap();
    let d_act = arena.alloc::<f32>(t * k * i, "act").unwrap();
    let d_y = arena.alloc::<f32>(t * k * h, "y").unwrap();
    let s = &gpu.stream;
    gpu.kernels
        .gate_up(
            s,
            dm,
            glu_args(c.glu),
            d_x,
            t,
            k,
            d_ids,
            DPtr::null(),
            d_act,
        )
        .unwrap();
    gpu.kernels
        .down(s, dm, d_act, t, k, d_ids, d_w, DPtr::null(), d_y)
        .unwrap();
    let act = dtoh(s, d_act).unwrap();
    let y = dtoh(s, d_y).unwrap();

    let (mut worst_act, mut worst_y) = (0f64, 0f64);
    let f = |g: f32, u: f32| {
        let mut o = [0f32];
        ops::glu(c.glu, GateUpLayout::Interleaved, &[g, u], &mut o);
        o[0] as f64
    };
    for tt in 0..t {
        for j in 0..k {
            let entry = tt * k + j;
            let ex = &m.experts[ids[entry] as usize];
            // gate_up + bias → glu (the CPU definition), with the error box of each gate/up row.
            let (mut gu, bound) = cpu_matvec_and_bound(&ex.gate_up, &x[tt * h..(tt + 1) * h]);
            if let Some(b) = &ex.gate_up_bias {
                ops::add_bias(&mut gu, b);
            }
            let mut want = vec![0f32; i];
            ops::glu(c.glu, m.gate_up_layout, &gu, &mut want);
            for jj in 0..i {
                let (rg, ru) = match m.gate_up_layout {
                    GateUpLayout::Interleaved => (2 * jj, 2 * jj + 1),
                    GateUpLayout::Halves => (jj, i + jj),
                };
                let eg = (bound[rg] + gu[rg].abs() as f64 * 2f64.powi(-23)) as f32;
                let eu = (bound[ru] + gu[ru].abs() as f64 * 2f64.powi(-23)) as f32;
                let w0 = want[jj] as f64;
                let mut tol = 0f64;
                let mut scale = w0.abs();
                for (sg, su) in [(-1f32, -1f32), (-1.0, 1.0), (1.0, -1.0), (1.0, 1.0)] {
                    // Widen the box by an ulp so the f32 corners lie outside the exact one.
                    let gc = gu[rg] + sg * (eg + gu[rg].abs() * f32::EPSILON);
                    let uc = gu[ru] + su * (eu + gu[ru].abs() * f32::EPSILON);
                    let v = f(gc, uc);
                    tol = tol.max((v - w0).abs());
                    scale = scale.max(v.abs());
                }
                tol += scale * 2f64.powi(-20) + 1e-30;
                let got = act[entry * i + jj] as f64;
                let ratio = (got - w0).abs() / tol;
                assert!(
                    ratio <= 1.0,
                    "{c:?}: act[{tt}][{j}][{jj}] (expert {}) = {got}, CPU {w0}, tolerance {tol}",
                    ids[entry]
                );
                worst_act = worst_act.max(ratio);
            }
            // down + bias, times the weight, from the GPU's own activations.
            let a = &act[entry * i..(entry + 1) * i];
            let (mut sum, bound) = cpu_matvec_and_bound(&ex.down, a);
            if let Some(b) = &ex.down_bias {
                ops::add_bias(&mut sum, b);
            }
            let wt = ws[entry];
            for r in 0..h {
                let want = (sum[r] * wt) as f64;
                let tol = wt.abs() as f64 * (bound[r] + sum[r].abs() as f64 * 2f64.powi(-22))
                    + want.abs() * 2f64.powi(-23)
                    + 1e-30;
                let got = y[entry * h + r] as f64;
                let ratio = (got - want).abs() / tol;
                assert!(
                    ratio <= 1.0,
                    "{c:?}: y[{tt}][{j}][{r}] (expert {}) = {got}, CPU {want}, tolerance {tol}",
                    ids[entry]
                );
                worst_y = worst_y.max(ratio);
            }
        }
    }
    (worst_act, worst_y)
}

fn run_cases(test: &str, gpu: &mut Gpu, kinds: &[Kind], tunings: &[MoeTuning]) {
    let mut rng = fresh_rng(test);
    let (e, h, i) = (16, 160, 96); // K = 160: 5 blocks, a ragged last K tile
    for &kind in kinds {
        for (layout, glu, bias) in [
            (GateUpLayout::Interleaved, GPT_OSS_GLU, true),
            (GateUpLayout::Halves, Activation::Swiglu, false),
        ] {
            let m = random_moe(&mut rng, kind, layout, e, h, i, bias);
            let mut arena = Arena::new(gpu.stream.clone());
            let dm = DeviceMoe::upload(&mut arena, &m).unwrap();
            for &t in &[1usize, 2, 5, 16] {
                for &k in &[1usize, 4, 8] {
                    for shared in [false, true] {
                        if shared && t == 1 {
                            continue;
                        }
                        for &tuning in tunings {
                            gpu.kernels.set_tuning(tuning).unwrap();
                            let c = Case {
                                kind,
                                layout,
                                glu,
                                bias,
                                e,
                                h,
                                i,
                                t,
                                k,
                                shared,
                            };
                            let (wa, wy) = check_case(gpu, &mut rng, c, &m, &dm);
                            println!(
                                "{kind:?} {layout:?} T={t} k={k} shared={shared} {tuning:?}: worst act {wa:.3}, y {wy:.3} of bound"
                            );
                        }
                    }
                }
            }
        }
    }
    gpu.kernels.set_tuning(MoeTuning::default()).unwrap();
}

#[test]
fn mxfp4_experts_match_cpu() {
    let Some(ctx) = ultra_kernels::gpu_for_test("mxfp4_experts_match_cpu") else {
        return;
    };
    let mut gpu = Gpu::new(&ctx);
    let tunings = [
        MoeTuning::default(),
        MoeTuning {
            warps: Some(1),
            row_groups: Some(1),
            token_pairs: Some(1),
        },
        MoeTuning {
            warps: Some(4),
            row_groups: Some(3),
            token_pairs: Some(4),
        },
        MoeTuning {
            warps: Some(16),
            row_groups: Some(4),
            token_pairs: Some(2),
        },
        MoeTuning {
            warps: Some(3),
            row_groups: Some(64),
            token_pairs: Some(1),
        },
    ];
    run_cases(
        "mxfp4_experts_match_cpu",
        &mut gpu,
        &[Kind::Mxfp4],
        &tunings,
    );
}

#[test]
fn dense_experts_match_cpu() {
    let Some(ctx) = ultra_kernels::gpu_for_test("dense_experts_match_cpu") else {
        return;
    };
    let mut gpu = Gpu::new(&ctx);
    run_cases(
        "dense_experts_match_cpu",
        &mut gpu,
        &[Kind::Bf16, Kind::F32],
        &[MoeTuning::default()],
    );
}

#[test]
fn gpt_oss_20b_size_experts_match_cpu() {
    let Some(ctx) = ultra_kernels::gpu_for_test("gpt_oss_20b_size_experts_match_cpu") else {
        return;
    };
    let gpu = Gpu::new(&ctx);
    let mut rng = fresh_rng("gpt_oss_20b_size_experts_match_cpu");
    // gpt-oss-20b expert shapes; 8 of its 32 experts (host generation and the f64 bounds).
    let (e, h, i) = (8, 2880, 2880);
    let m = random_moe(
        &mut rng,
        Kind::Mxfp4,
        GateUpLayout::Interleaved,
        e,
        h,
        i,
        true,
    );
    let mut arena = Arena::new(gpu.stream.clone());
    let dm = DeviceMoe::upload(&mut arena, &m).unwrap();
    for (t, k) in [(1, 4), (4, 4)] {
        let c = Case {
            kind: Kind::Mxfp4,
            layout: GateUpLayout::Interleaved,
            glu: GPT_OSS_GLU,
            bias: true,
            e,
            h,
            i,
            t,
            k,
            shared: false,
        };
        let (wa, wy) = check_case(&gpu, &mut rng, c, &m, &dm);
        println!("gpt-oss-20b size T={t} k={k}: worst act {wa:.3}, y {wy:.3} of bound");
    }
}

#[test]
fn invalid_expert_ids_give_nan_rows() {
    let Some(ctx) = ultra_kernels::gpu_for_test("invalid_expert_ids_give_nan_rows") else {
        return;
    };
    let gpu = Gpu::new(&ctx);
    let mut rng = fresh_rng("invalid_expert_ids_give_nan_rows");
    let (e, h, i, t, k) = (8, 64, 64, 2, 2);
    let m = random_moe(
        &mut rng,
        Kind::Mxfp4,
        GateUpLayout::Interleaved,
        e,
        h,
        i,
        true,
    );
    let mut arena = Arena::new(gpu.stream.clone());
    let dm = DeviceMoe::upload(&mut arena, &m).unwrap();
    let ids = [3i32, -1, 8, 3];
    let d_x = arena
        .upload(&random_vec(&mut rng, t * h, 1.0), "h")
        .unwrap();
    let d_ids = arena.upload(&ids, "ids").unwrap();
    let d_w = arena.upload(&[0.5f32; 4], "w").unwrap();
    let d_act = arena.alloc::<f32>(t * k * i, "act").unwrap();
    let d_y = arena.alloc::<f32>(t * k * h, "y").unwrap();
    let s = &gpu.stream;
    let glu = glu_args(GPT_OSS_GLU);
    gpu.kernels
        .gate_up(s, &dm, glu, d_x, t, k, d_ids, DPtr::null(), d_act)
        .unwrap();
    gpu.kernels
        .down(s, &dm, d_act, t, k, d_ids, d_w, DPtr::null(), d_y)
        .unwrap();
    let act = dtoh(s, d_act).unwrap();
    let y = dtoh(s, d_y).unwrap();
    for (entry, &id) in ids.iter().enumerate() {
        let valid = (0..e as i32).contains(&id);
        let a = &act[entry * i..(entry + 1) * i];
        let yy = &y[entry * h..(entry + 1) * h];
        if valid {
            assert!(a.iter().chain(yy).all(|v| v.is_finite()), "entry {entry}");
        } else {
            assert!(a.iter().chain(yy).all(|v| v.is_nan()), "entry {entry}");
        }
    }
}

#[test]
fn bad_shapes_and_arguments_are_errors() {
    let Some(ctx) = ultra_kernels::gpu_for_test("bad_shapes_and_arguments_are_errors") else {
        return;
    };
    let gpu = Gpu::new(&ctx);
    let mut rng = fresh_rng("bad_shapes_and_arguments_are_errors");
    let mut arena = Arena::new(gpu.stream.clone());
    let mut m = random_moe(
        &mut rng,
        Kind::Mxfp4,
        GateUpLayout::Interleaved,
        4,
        64,
        32,
        false,
    );
    let mixed = {
        let mut m = m.clone();
        m.experts[1].down = random_mat(&mut rng, Kind::Bf16, 64, 32);
        m
    };
    assert!(matches!(
        DeviceMoe::upload(&mut arena, &mixed),
        Err(RuntimeError::Unsupported(_))
    ));
    let dm = DeviceMoe::upload(&mut arena, &m).unwrap();
    let d_x = arena.alloc::<f32>(17 * 64, "h").unwrap();
    let d_ids = arena.alloc::<i32>(17 * 4, "ids").unwrap();
    let d_act = arena.alloc::<f32>(17 * 4 * 32, "act").unwrap();
    let s = &gpu.stream;
    let glu = GluArgs::Swiglu;
    // k above the stack's 4 experts is allowed (an expert-parallel rank holds a few of the
    // router's experts); k above MAX_TOP_K is not.
    for (t, k) in [(0, 2), (17, 2), (2, 0), (2, tilert::moe::MAX_TOP_K + 1)] {
        let r = gpu
            .kernels
            .gate_up(s, &dm, glu, d_x, t, k, d_ids, DPtr::null(), d_act);
        assert!(matches!(r, Err(RuntimeError::Invalid(_))), "T={t} k={k}");
    }
    let short = d_act.slice(0..10);
    let r = gpu
        .kernels
        .gate_up(s, &dm, glu, d_x, 2, 2, d_ids, DPtr::null(), short);
    assert!(matches!(r, Err(RuntimeError::Invalid(_))));
    // A NaN scale byte is rejected at upload.
    if let ExpertMat::Mxfp4(w) = &mut m.experts[2].gate_up {
        w.scales_mut()[5] = fp4::E8M0_NAN;
    }
    assert!(matches!(
        DeviceMoe::upload(&mut arena, &m),
        Err(RuntimeError::Invalid(_))
    ));
}

// ---- Timings ----------------------------------------------------------------------------------

/// Per-call µs of `f(i)`: `samples` medians of `iters` back-to-back calls between two events,
/// after one warm-up sample.
fn time_us(s: &CudaStream, samples: usize, iters: usize, mut f: impl FnMut(usize)) -> Vec<f64> {
    let mut out = Vec::new();
    for smp in 0..=samples {
        let a = s
            .record_event(Some(CUevent_flags::CU_EVENT_DEFAULT))
            .unwrap();
        for it in 0..iters {
            f(smp * iters + it);
        }
        let b = s
            .record_event(Some(CUevent_flags::CU_EVENT_DEFAULT))
            .unwrap();
        let ms = a.elapsed_ms(&b).unwrap() as f64;
        if smp > 0 {
            out.push(ms * 1e3 / iters as f64);
        }
    }
    out
}

fn median(v: &[f64]) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// gpt-oss-20b MoE layer (E = 32, k = 4, H = I = 2880, biases, clamped SwiGLU) on synthetic
/// MXFP4 experts: 8 layers rotated so the 50 MB L2 is cold, a fresh random routing per launch.
/// Prints µs per launch (median of 21 samples × 48 launches) against a streaming read of the
/// same (distinct-expert) byte count (`kernels/bench.cu: stream_read`).
#[test]
fn timing_gpt_oss_20b() {
    let Some(ctx) = ultra_kernels::gpu_for_test("timing_gpt_oss_20b") else {
        return;
    };
    let mut gpu = Gpu::new(&ctx);
    let s = gpu.stream.clone();
    let (layers, e, h, i, k) = (8, 32, 2880, 2880, 4);
    let (samples, iters) = (21, 48);
    let mut arena = Arena::new(s.clone());
    let moes: Vec<DeviceMoe> = (0..layers)
        .map(|l| DeviceMoe::synthetic_mxfp4(&mut arena, e, h, i, true, 100 + l as u64).unwrap())
        .collect();
    let gu_bytes = moes[0].gate_up.expert_bytes();
    let dn_bytes = moes[0].down.expert_bytes();

    // Streaming-read ceiling.
    let bench = ultra_kernels::load(&ctx, &ultra_kernels::BENCH).unwrap();
    let stream_read = bench.load_function("stream_read").unwrap();
    let pool_bytes = 2usize << 30;
    let pool = arena.alloc::<u8>(pool_bytes, "pool").unwrap();
    let sink = arena.alloc::<u32>(1, "sink").unwrap();
    let sms = ctx
        .attribute(
            cudarc::driver::sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT,
        )
        .unwrap() as u32;
    let read = |bytes: usize| {
        time_us(&s, samples, iters, |n| {
            let off = (n * bytes) % (pool_bytes - bytes) / 16 * 16;
            let (addr, n16, sink) = (pool.addr() + off as u64, (bytes / 16) as u64, sink.addr());
            let mut b = s.launch_builder(&stream_read);
            b.arg(&addr).arg(&n16).arg(&sink);
            let cfg = LaunchConfig {
                grid_dim: (sms * 8, 1, 1),
                block_dim: (256, 1, 1),
                shared_mem_bytes: 0,
            };
            // SAFETY: matches `stream_read(const uint4*, u64, u32*)`; the range is in the pool.
            unsafe { b.launch(cfg) }.unwrap();
        })
    };

    let mut rng = ChaCha8Rng::seed_from_u64(0x0E55);
    let n_launch = (samples + 1) * iters;
    println!(
        "{}; gpt-oss-20b experts, {layers} layers rotated, median of {samples}×{iters} launches",
        tilert::Device::open(0)
            .map(|d| d.info.to_string())
            .unwrap_or_default()
    );
    println!("| T | proj | tuning | µs | distinct experts | MB | GB/s | stream read µs | ratio |");
    println!("|---|---|---|---:|---:|---:|---:|---:|---:|");
    let default = MoeTuning::default();
    let tune = |w: usize, g: usize, p: Option<usize>| MoeTuning {
        warps: Some(w),
        row_groups: Some(g),
        token_pairs: p,
    };
    let sweep_t1: Vec<MoeTuning> = std::iter::once(default)
        .chain(
            [
                (2, 1),
                (2, 2),
                (4, 1),
                (4, 2),
                (4, 3),
                (8, 1),
                (8, 2),
                (8, 4),
                (8, 6),
                (16, 8),
                (16, 11),
            ]
            .map(|(w, g)| tune(w, g, None)),
        )
        .collect();
    let sweep_tn: Vec<MoeTuning> = std::iter::once(default)
        .chain(
            [
                (4, 1, 1),
                (8, 2, 1),
                (4, 1, 2),
                (8, 2, 2),
                (8, 4, 2),
                (4, 2, 4),
                (8, 4, 4),
            ]
            .map(|(w, g, p)| tune(w, g, Some(p))),
        )
        .collect();
    for t in [1usize, 2, 4, 8, 16] {
        // Random routing per launch: k distinct experts per token.
        let mut ids = Vec::with_capacity(n_launch * t * k);
        let mut distinct = 0usize;
        for _ in 0..n_launch {
            let mut seen = vec![false; e];
            for _ in 0..t {
                for x in sample(&mut rng, e, k) {
                    ids.push(x as i32);
                    if !seen[x] {
                        seen[x] = true;
                        distinct += 1;
                    }
                }
            }
        }
        let mean_distinct = distinct as f64 / n_launch as f64;
        let d_ids = arena.upload(&ids, "ids").unwrap();
        let ws: Vec<f32> = (0..t * k).map(|_| rng.random_range(0.0..1.0)).collect();
        let d_w = arena.upload(&ws, "w").unwrap();
        let d_h = arena
            .upload(&random_vec(&mut rng, t * h, 1.0), "h")
            .unwrap();
        let d_act = arena.alloc::<f32>(t * k * i, "act").unwrap();
        let d_a = arena
            .upload(&random_vec(&mut rng, t * k * i, 1.0), "a")
            .unwrap();
        let d_y = arena.alloc::<f32>(t * k * h, "y").unwrap();
        let glu = glu_args(GPT_OSS_GLU);
        let tunings: &[MoeTuning] = if t == 1 { &sweep_t1 } else { &sweep_tn };
        for (proj, bytes1) in [("gate_up+GLU", gu_bytes), ("down", dn_bytes)] {
            let bytes = (mean_distinct * bytes1 as f64) as usize;
            let ceiling = median(&read(bytes));
            for &tuning in tunings {
                gpu.kernels.set_tuning(tuning).unwrap();
                let kern = &gpu.kernels;
                let us = time_us(&s, samples, iters, |n| {
                    let m = &moes[n % layers];
                    let ids_n = d_ids.slice(n * t * k..(n + 1) * t * k);
                    if proj == "down" {
                        kern.down(&s, m, d_a, t, k, ids_n, d_w, DPtr::null(), d_y)
                            .unwrap();
                    } else {
                        kern.gate_up(&s, m, glu, d_h, t, k, ids_n, DPtr::null(), d_act)
                            .unwrap();
                    }
                });
                let med = median(&us);
                println!(
                    "| {t} | {proj} | {tuning:?} | {med:.2} | {mean_distinct:.2} | {:.1} | {:.0} | {ceiling:.2} | {:.0} % |",
                    bytes as f64 / 1e6,
                    bytes as f64 / med / 1e3,
                    100.0 * ceiling / med
                );
            }
        }
        gpu.kernels.set_tuning(default).unwrap();
        // Sanity: the outputs of the last launches are finite and O(1).
        let act = dtoh(&s, d_act).unwrap();
        let y = dtoh(&s, d_y).unwrap();
        let amax = act.iter().fold(0f32, |m, v| m.max(v.abs()));
        let ymax = y.iter().fold(0f32, |m, v| m.max(v.abs()));
        assert!(amax.is_finite() && ymax.is_finite());
        println!("T={t}: max |act| {amax:.3}, max |y| {ymax:.3}");
    }
}
