//! GPU kernels of `fp4` against the CPU/f64 references, on fresh random data.
//!
//! Without a usable GPU each test prints `SKIPPED <name>: <why>` and returns; with
//! `ULTRA_REQUIRE_GPU=1` (set by `gpu-bundle/run.sh`) a missing GPU fails instead.
#![cfg(feature = "cuda")]

use std::sync::Arc;

use cudarc::driver::CudaStream;
use fp4::cuda::{gemv_error_bound, Activations, GpuError, Mxfp4Gpu};
use fp4::{MxExpertsRef, MxMatrixRef, BLOCK};
use half::bf16;
use rand::seq::index::sample;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

fn setup(test: &str) -> Option<(Arc<CudaStream>, Mxfp4Gpu)> {
    let ctx = ultra_kernels::gpu_for_test(test)?;
    let stream = ctx.new_stream().expect("stream");
    let gpu = Mxfp4Gpu::new(stream.clone()).expect("loading the MXFP4 kernels");
    Some((stream, gpu))
}

/// Random experts: uniform code bytes; scales drawn from `scales`.
fn random_experts(
    rng: &mut ChaCha8Rng,
    experts: usize,
    rows: usize,
    k: usize,
    scales: std::ops::RangeInclusive<u8>,
) -> (Vec<u8>, Vec<u8>) {
    let mut blocks = vec![0u8; experts * rows * k / 2];
    rng.fill(&mut blocks[..]);
    let s = (0..experts * rows * k / BLOCK)
        .map(|_| rng.random_range(scales.clone()))
        .collect();
    (blocks, s)
}

#[test]
fn dequantize_is_exact_for_every_scale_byte() {
    let Some((stream, gpu)) = setup("dequantize_is_exact_for_every_scale_byte") else {
        return;
    };
    let mut rng = ChaCha8Rng::seed_from_u64(11);
    // 255 rows × 64 values: row r uses scale byte r (0..=254) in both blocks, every code appears.
    let (rows, k) = (255usize, 64usize);
    let mut blocks = vec![0u8; rows * k / 2];
    rng.fill(&mut blocks[..]);
    let scales: Vec<u8> = (0..rows).flat_map(|r| [r as u8, r as u8]).collect();
    let m = MxMatrixRef::new(rows, k, &blocks, &scales).unwrap();
    let w = gpu.upload_matrix(m).unwrap();
    let mut out32 = stream.alloc_zeros::<f32>(rows * k).unwrap();
    let mut out16 = stream.alloc_zeros::<bf16>(rows * k).unwrap();
    // Poison first: every element must be written.
    stream
        .memcpy_htod(&vec![f32::NAN; rows * k], &mut out32)
        .unwrap();
    gpu.dequantize_f32(&w, &mut out32).unwrap();
    gpu.dequantize_bf16(&w, &mut out16).unwrap();
    let got32 = stream.clone_dtoh(&out32).unwrap();
    let got16 = stream.clone_dtoh(&out16).unwrap();
    for r in 0..rows {
        for c in 0..k {
            let exact = m.get_f64(r, c);
            let want = exact as f32; // f64 → f32: exact, or ±inf beyond the f32 range
            let i = r * k + c;
            assert_eq!(
                got32[i].to_bits(),
                want.to_bits(),
                "f32 ({r},{c}) scale {r}: got {} want {want}",
                got32[i]
            );
            let want16 = bf16::from_f64(exact);
            assert_eq!(got16[i].to_bits(), want16.to_bits(), "bf16 ({r},{c})");
        }
    }
}

/// A GEMV case: `slots` random experts of a stack of `experts` matrices of `rows × k`, with one
/// shared activation or one per slot.
struct Case {
    experts: usize,
    rows: usize,
    k: usize,
    slots: usize,
    per_slot_x: bool,
}

/// Runs `case` against the f64 reference, with the documented bound.
fn check_gemv(stream: &Arc<CudaStream>, gpu: &Mxfp4Gpu, rng: &mut ChaCha8Rng, case: Case) {
    let Case {
        experts,
        rows,
        k,
        slots,
        per_slot_x,
    } = case;
    let (blocks, scales) = random_experts(rng, experts, rows, k, 110..=140);
    let stack = MxExpertsRef::new(experts, rows, k, &blocks, &scales).unwrap();
    let w = gpu.upload(stack).unwrap();
    let ids: Vec<i32> = sample(rng, experts, slots)
        .into_iter()
        .map(|e| e as i32)
        .collect();
    let d_ids = stream.clone_htod(&ids).unwrap();
    let x_rows = if per_slot_x { slots } else { 1 };
    for use_bf16 in [false, true] {
        // Activations spanning several binades, fresh for each run.
        let x: Vec<f32> = (0..x_rows * k)
            .map(|_| {
                let v = rng.random_range(-1.0f32..1.0) * 2f32.powi(rng.random_range(-6..6));
                if use_bf16 {
                    bf16::from_f32(v).to_f32()
                } else {
                    v
                }
            })
            .collect();
        let mut scratch = gpu.scratch(x_rows, k).unwrap();
        let mut y = stream.clone_htod(&vec![f32::NAN; slots * rows]).unwrap();
        if use_bf16 {
            let xb: Vec<bf16> = x.iter().map(|&v| bf16::from_f32(v)).collect();
            let d_x = stream.clone_htod(&xb).unwrap();
            gpu.gemv(&w, &d_ids, Activations::Bf16(&d_x), &mut scratch, &mut y)
                .unwrap();
        } else {
            let d_x = stream.clone_htod(&x).unwrap();
            gpu.gemv(&w, &d_ids, Activations::F32(&d_x), &mut scratch, &mut y)
                .unwrap();
        }
        let y = stream.clone_dtoh(&y).unwrap();
        for (s, &e) in ids.iter().enumerate() {
            let m = stack.expert(e as usize).unwrap();
            let xs = &x[if per_slot_x { s * k } else { 0 }..][..k];
            let x64: Vec<f64> = xs.iter().map(|&v| v as f64).collect();
            let want = fp4::cpu::gemv_f64_reference(m, &x64);
            let bound = gemv_error_bound(m, xs, use_bf16);
            for r in 0..rows {
                let got = y[s * rows + r] as f64;
                assert!(
                    (got - want[r]).abs() <= bound[r],
                    "{rows}x{k} slot {s} (expert {e}) row {r} bf16={use_bf16}: got {got}, want {}, bound {}",
                    want[r],
                    bound[r]
                );
            }
        }
    }
}

/// One gpt-oss-20b expert GEMV case on a fresh random seed (printed, for reproduction).
fn gpt_oss_case(test: &str, rows: usize, per_slot_x: bool) {
    let Some((stream, gpu)) = setup(test) else {
        return;
    };
    let seed: u64 = rand::random();
    eprintln!("{test}: seed {seed}");
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let case = Case {
        experts: 32,
        rows,
        k: 2880,
        slots: 4,
        per_slot_x,
    };
    check_gemv(&stream, &gpu, &mut rng, case);
}

#[test]
fn gemv_gpt_oss_20b_gate_up_4_of_32_experts() {
    gpt_oss_case("gemv_gpt_oss_20b_gate_up_4_of_32_experts", 5760, false);
}

#[test]
fn gemv_gpt_oss_20b_down_4_of_32_experts_per_slot_activations() {
    gpt_oss_case("gemv_gpt_oss_20b_down_4_of_32_experts", 2880, true);
}

#[test]
fn gemv_ragged_shapes() {
    let Some((stream, gpu)) = setup("gemv_ragged_shapes") else {
        return;
    };
    let mut rng = ChaCha8Rng::seed_from_u64(rand::random());
    // Rows not a multiple of 16, K not a multiple of the 128-value tile, tiny K.
    for (rows, k) in [(100, 96), (17, 32), (33, 160), (1, 2880), (300, 4128)] {
        for (slots, per_slot_x) in [(2, true), (3, false)] {
            let case = Case {
                experts: 3,
                rows,
                k,
                slots,
                per_slot_x,
            };
            check_gemv(&stream, &gpu, &mut rng, case);
        }
    }
}

#[test]
fn gemv_invalid_expert_id_gives_nan_rows_and_bad_shapes_are_errors() {
    let Some((stream, gpu)) = setup("gemv_invalid_expert_id") else {
        return;
    };
    let mut rng = ChaCha8Rng::seed_from_u64(5);
    let (blocks, scales) = random_experts(&mut rng, 2, 32, 64, 120..=130);
    let w = gpu
        .upload(MxExpertsRef::new(2, 32, 64, &blocks, &scales).unwrap())
        .unwrap();
    let ids = stream.clone_htod(&[1i32, 7]).unwrap();
    let x = stream.clone_htod(&vec![1.0f32; 64]).unwrap();
    let mut scratch = gpu.scratch(1, 64).unwrap();
    let mut y = stream.alloc_zeros::<f32>(2 * 32).unwrap();
    gpu.gemv(&w, &ids, Activations::F32(&x), &mut scratch, &mut y)
        .unwrap();
    let y = stream.clone_dtoh(&y).unwrap();
    assert!(y[..32].iter().all(|v| v.is_finite()));
    assert!(y[32..].iter().all(|v| v.is_nan()));

    let mut short = stream.alloc_zeros::<f32>(10).unwrap();
    assert!(matches!(
        gpu.gemv(&w, &ids, Activations::F32(&x), &mut scratch, &mut short),
        Err(GpuError::Shape(_))
    ));
    let x_bad = stream.clone_htod(&vec![1.0f32; 65]).unwrap();
    let mut y2 = stream.alloc_zeros::<f32>(64).unwrap();
    assert!(matches!(
        gpu.gemv(&w, &ids, Activations::F32(&x_bad), &mut scratch, &mut y2),
        Err(GpuError::Shape(_))
    ));
    let mut out = stream.alloc_zeros::<f32>(5).unwrap();
    assert!(matches!(
        gpu.dequantize_f32(&w, &mut out),
        Err(GpuError::Shape(_))
    ));
    assert!(gpu.scratch(1, 48).is_err());
}
