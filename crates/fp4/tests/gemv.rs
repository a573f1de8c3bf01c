//! GEMV / GEMM on every available CPU kernel against the f64 oracle, with the derived f32
//! error bound; bf16 activations; error handling.
#![allow(clippy::needless_range_loop)] // index-heavy checks read better with indices

mod common;

use common::{random_f32, random_matrix, rng};
use fp4::cpu::{self, CpuKernel};
use fp4::{Fp4Error, MxMatrix, MxMatrixRef, MAX_BATCH};
use half::bf16;
use rand::Rng;

/// 16 activation rows of length k with values spread over `exps` binades, some zeros.
fn random_x(r: &mut impl Rng, k: usize, exps: std::ops::RangeInclusive<i32>) -> Vec<f32> {
    let mut r = common::rng(r.random());
    (0..MAX_BATCH * k)
        .map(|_| {
            if r.random_range(0..10) == 0 {
                0.0
            } else {
                random_f32(&mut r, exps.clone())
            }
        })
        .collect()
}

struct Oracle {
    reference: Vec<Vec<f64>>,
    bound: Vec<Vec<f64>>,
}

/// Reference and tolerance for each of the 16 rows of `x`.
fn oracle(w: MxMatrixRef<'_>, x: &[f32]) -> Oracle {
    let k = w.k();
    let rows: Vec<&[f32]> = x.chunks_exact(k.max(1)).take(MAX_BATCH).collect();
    Oracle {
        reference: rows
            .iter()
            .map(|xt| cpu::gemv_f64_reference(w, &xt.iter().map(|&v| v as f64).collect::<Vec<_>>()))
            .collect(),
        bound: rows.iter().map(|xt| cpu::gemv_error_bound(w, xt)).collect(),
    }
}

fn assert_within(o: &Oracle, y: &[f32], batch: usize, n: usize, what: &str) {
    for t in 0..batch {
        for r in 0..n {
            let (got, want, tol) = (y[t * n + r] as f64, o.reference[t][r], o.bound[t][r]);
            assert!(
                (got - want).abs() <= tol,
                "{what}: y[{t}, {r}] = {got:e}, reference {want:e}, |diff| {:e} > bound {tol:e}",
                (got - want).abs()
            );
        }
    }
}

/// Runs every kernel and every batch size 1..=16 on one shape; checks the bound, and that a row
/// of the batch gives bit-identical results whatever the batch size (and equals gemv).
fn check_shape(
    seed: u64,
    n: usize,
    k: usize,
    batches: &[usize],
    scales: std::ops::RangeInclusive<u8>,
    exps: std::ops::RangeInclusive<i32>,
) {
    let mut r = rng(seed);
    let m = random_matrix(&mut r, n, k, scales);
    let w = m.view().unwrap();
    let x = random_x(&mut r, k, exps);
    let o = oracle(w, &x);
    for kernel in CpuKernel::available() {
        let mut first_rows: Vec<Option<Vec<u32>>> = vec![None; MAX_BATCH];
        for &batch in batches {
            let mut y = vec![f32::NAN; batch * n];
            cpu::gemm_with(kernel, w, &x[..batch * k], batch, &mut y).unwrap();
            assert_within(
                &o,
                &y,
                batch,
                n,
                &format!("{kernel:?} N={n} K={k} batch={batch}"),
            );
            for (t, row) in y.chunks_exact(n.max(1)).enumerate().take(batch) {
                let bits: Vec<u32> = row.iter().map(|v| v.to_bits()).collect();
                match &first_rows[t] {
                    None => first_rows[t] = Some(bits),
                    Some(prev) => {
                        assert_eq!(prev, &bits, "{kernel:?}: row {t} depends on the batch size")
                    }
                }
            }
        }
        // gemv (default kernel) agrees with the bound too.
        let mut y = vec![0f32; n];
        cpu::gemv(w, &x[..k], &mut y).unwrap();
        assert_within(&o, &y, 1, n, "gemv");
    }
}

#[test]
fn gemm_all_batches_small_shapes() {
    let all: Vec<usize> = (1..=MAX_BATCH).collect();
    check_shape(1, 1, 32, &all, 100..=150, -4..=4);
    check_shape(2, 7, 96, &all, 110..=140, -4..=4);
    check_shape(3, 33, 320, &all, 115..=135, -10..=10);
}

#[test]
fn gemm_gpt_oss_reduction_length() {
    // K = 2880 (gpt-oss hidden size, not a power of two); N not a multiple of the row groups.
    check_shape(4, 19, 2880, &[1, 2, 3, 4, 5, 8, 9, 16], 118..=128, -6..=3);
}

#[test]
fn gemm_many_rows_split_over_threads() {
    check_shape(5, 203, 64, &[1, 4, 7, 16], 120..=130, -3..=3);
}

#[test]
fn extreme_scales_and_subnormal_activations() {
    // Tiny scales (2^-127.. 2^-118) with ordinary x: products in and near the subnormal range.
    check_shape(6, 9, 128, &[1, 3, 16], 0..=9, -2..=2);
    // Huge scales with tiny x, and subnormal x with ordinary scales.
    check_shape(7, 9, 128, &[1, 2, 16], 240..=250, -120..=-100);
    check_shape(8, 9, 128, &[1, 16], 125..=129, -149..=-126);
    // Every scale byte at once (no overflow: x is small enough).
    check_shape(9, 16, 256, &[1, 5], 0..=254, -140..=-135);
}

#[test]
fn bf16_activations() {
    let mut r = rng(10);
    let (n, k) = (23, 2880);
    let m = random_matrix(&mut r, n, k, 118..=128);
    let w = m.view().unwrap();
    let xh: Vec<bf16> = random_x(&mut r, k, -5..=5)
        .iter()
        .map(|&v| bf16::from_f32(v))
        .collect();
    let xw: Vec<f32> = xh.iter().map(|v| v.to_f32()).collect();
    let o = oracle(w, &xw);
    for batch in [1, 2, 7, 16] {
        for kernel in CpuKernel::available() {
            let mut y = vec![0f32; batch * n];
            cpu::gemm_bf16_with(kernel, w, &xh[..batch * k], batch, &mut y).unwrap();
            assert_within(&o, &y, batch, n, &format!("bf16 {kernel:?} batch {batch}"));
            // Widening is exact: identical to the f32 path on the widened values.
            let mut yf = vec![0f32; batch * n];
            cpu::gemm_with(kernel, w, &xw[..batch * k], batch, &mut yf).unwrap();
            assert_eq!(y, yf);
        }
        let mut y = vec![0f32; batch * n];
        cpu::gemm_bf16(w, &xh[..batch * k], batch, &mut y).unwrap();
        assert_within(&o, &y, batch, n, "gemm_bf16");
    }
    let mut y = vec![0f32; n];
    cpu::gemv_bf16(w, &xh[..k], &mut y).unwrap();
    assert_within(&o, &y, 1, n, "gemv_bf16");
}

#[test]
fn bound_is_tight_enough_to_catch_a_single_wrong_code() {
    let mut r = rng(11);
    let (n, k) = (8, 2880);
    let m = random_matrix(&mut r, n, k, 127..=127);
    let x: Vec<f32> = (0..k).map(|_| r.random_range(0.5f32..1.0)).collect();
    let bound = cpu::gemv_error_bound(m.view().unwrap(), &x);
    let reference = cpu::gemv_f64_reference(
        m.view().unwrap(),
        &x.iter().map(|&v| v as f64).collect::<Vec<_>>(),
    );
    for r in 0..n {
        // The tolerance is a tiny fraction of Σ|w x| (≈ γ_{127} ≈ 7.6e-6).
        let sum_abs: f64 = (0..k)
            .map(|c| (m.view().unwrap().get_f64(r, c) * x[c] as f64).abs())
            .sum();
        assert!(bound[r] < 1e-5 * sum_abs && bound[r] > 0.0);
    }
    // Change one element by the smallest step (0 ↔ 0.5): the result leaves the bound.
    let mut bad = m.clone();
    bad.blocks[3 * k / 2 + 100] ^= 0x01;
    let mut y = vec![0f32; n];
    cpu::gemv(bad.view().unwrap(), &x, &mut y).unwrap();
    assert!(((y[3] as f64) - reference[3]).abs() > bound[3]);
    for r in (0..n).filter(|&r| r != 3) {
        assert!(((y[r] as f64) - reference[r]).abs() <= bound[r]);
    }
}

#[test]
fn reference_is_exact_on_exactly_representable_sums() {
    // Integers small enough that every partial sum is exact in f64 and f32.
    let codes: Vec<u8> = (0..64).map(|i| (i % 16) as u8).collect();
    let m = MxMatrix {
        rows: 1,
        k: 64,
        blocks: fp4::pack_codes(&codes),
        scales: vec![128, 126],
    };
    let x: Vec<f64> = (0..64).map(|i| (i as f64) - 20.0).collect();
    let want: f64 = (0..64)
        .map(|i| common::e2m1_value(codes[i]) * if i < 32 { 2.0 } else { 0.5 } * x[i])
        .sum();
    assert_eq!(cpu::gemv_f64_reference(m.view().unwrap(), &x), vec![want]);
    let xf: Vec<f32> = x.iter().map(|&v| v as f32).collect();
    for kernel in CpuKernel::available() {
        let mut y = [0f32];
        cpu::gemm_with(kernel, m.view().unwrap(), &xf, 1, &mut y).unwrap();
        assert_eq!(y[0] as f64, want, "{kernel:?}");
    }
}

#[test]
fn non_finite_activations_propagate() {
    let m = random_matrix(&mut rng(12), 5, 64, 120..=130);
    let w = m.view().unwrap();
    for bad in [f32::NAN, f32::INFINITY] {
        let mut x = vec![1f32; 64];
        x[37] = bad;
        for kernel in CpuKernel::available() {
            let mut y = vec![0f32; 5];
            cpu::gemm_with(kernel, w, &x, 1, &mut y).unwrap();
            for (r, &v) in y.iter().enumerate() {
                let code = (m.blocks[r * 32 + 18] >> 4) & 7; // element 37's magnitude code
                if code == 0 || bad.is_nan() {
                    assert!(v.is_nan(), "{kernel:?} row {r}: {v}");
                } else {
                    assert!(v.is_infinite(), "{kernel:?} row {r}: {v}");
                }
            }
        }
    }
}

#[test]
fn results_are_deterministic() {
    let mut r = rng(13);
    let m = random_matrix(&mut r, 300, 96, 120..=130);
    let x = random_x(&mut r, 96, -3..=3);
    for kernel in CpuKernel::available() {
        let mut a = vec![0f32; 300 * 16];
        let mut b = vec![0f32; 300 * 16];
        cpu::gemm_with(kernel, m.view().unwrap(), &x, 16, &mut a).unwrap();
        for _ in 0..3 {
            cpu::gemm_with(kernel, m.view().unwrap(), &x, 16, &mut b).unwrap();
            assert_eq!(a, b);
        }
    }
}

#[test]
fn bad_inputs_return_typed_errors() {
    let m = random_matrix(&mut rng(14), 4, 64, 120..=130);
    let w = m.view().unwrap();
    let x = vec![1f32; 64 * 17];
    let xh = vec![bf16::ONE; 64 * 17];
    let mut y = vec![0f32; 4 * 17];
    for batch in [0, 17, 100] {
        let want = Fp4Error::BatchOutOfRange { batch, max: 16 };
        assert_eq!(
            cpu::gemm(w, &x[..64 * batch.min(17)], batch, &mut y).unwrap_err(),
            want
        );
        assert_eq!(
            cpu::gemm_bf16(w, &xh[..64 * batch.min(17)], batch, &mut y).unwrap_err(),
            want
        );
    }
    assert_eq!(
        cpu::gemv(w, &x[..63], &mut y[..4]).unwrap_err(),
        Fp4Error::LengthMismatch {
            what: "activations x [batch, K]",
            expected: 64,
            got: 63
        }
    );
    assert_eq!(
        cpu::gemv(w, &x[..64], &mut y[..5]).unwrap_err(),
        Fp4Error::LengthMismatch {
            what: "output y [batch, N]",
            expected: 4,
            got: 5
        }
    );
    assert!(matches!(
        cpu::gemv_bf16(w, &xh[..65], &mut y[..4]),
        Err(Fp4Error::LengthMismatch {
            expected: 64,
            got: 65,
            ..
        })
    ));
    assert!(matches!(
        cpu::gemm(w, &x[..64 * 3], 2, &mut y[..8]),
        Err(Fp4Error::LengthMismatch {
            expected: 128,
            got: 192,
            ..
        })
    ));
    assert!(matches!(
        cpu::gemm(w, &x[..64 * 3], 3, &mut y[..8]),
        Err(Fp4Error::LengthMismatch {
            expected: 12,
            got: 8,
            ..
        })
    ));
    assert!(matches!(
        cpu::gemm_bf16(w, &xh[..64 * 2], 2, &mut y[..7]),
        Err(Fp4Error::LengthMismatch {
            expected: 8,
            got: 7,
            ..
        })
    ));
    // Inputs that were wrong fail before anything is written.
    assert!(y.iter().all(|&v| v == 0.0));
    for kernel in CpuKernel::ALL {
        let res = cpu::gemm_with(kernel, w, &x[..64], 1, &mut y[..4]);
        if kernel.is_available() {
            assert!(res.is_ok());
        } else {
            assert_eq!(
                res.unwrap_err(),
                Fp4Error::KernelUnavailable {
                    kernel: kernel.name()
                }
            );
        }
    }
    assert!(CpuKernel::available().contains(&CpuKernel::Portable));
    assert!(CpuKernel::detect().is_available());
    // Malformed weights never reach a kernel: the view rejects them.
    assert_eq!(
        MxMatrixRef::new(4, 80, &m.blocks, &m.scales).unwrap_err(),
        Fp4Error::KNotMultipleOfBlock { k: 80 }
    );
    assert!(matches!(
        MxMatrixRef::new(4, 64, &m.blocks[1..], &m.scales),
        Err(Fp4Error::LengthMismatch { .. })
    ));
    assert!(matches!(
        MxMatrixRef::new(4, 64, &m.blocks, &m.scales[1..]),
        Err(Fp4Error::LengthMismatch { .. })
    ));
    let mut nan = m.scales.clone();
    nan[5] = 0xFF;
    assert_eq!(
        MxMatrixRef::new(4, 64, &m.blocks, &nan).unwrap_err(),
        Fp4Error::NanScale { row: 2, block: 1 }
    );
}

#[test]
fn gemm_matches_dequantize_then_f64_matmul() {
    // An independent path: decode with `dequantize`, multiply in f64 naively.
    let mut r = rng(15);
    let (n, k, batch) = (13, 160, 6);
    let m = random_matrix(&mut r, n, k, 122..=132);
    let w = m.view().unwrap();
    let x = random_x(&mut r, k, -2..=2);
    let dense = cpu::dequantize(w);
    let mut y = vec![0f32; batch * n];
    cpu::gemm(w, &x[..batch * k], batch, &mut y).unwrap();
    for t in 0..batch {
        let bound = cpu::gemv_error_bound(w, &x[t * k..(t + 1) * k]);
        for row in 0..n {
            let exact: f64 = (0..k)
                .map(|c| dense[row * k + c] as f64 * x[t * k + c] as f64)
                .sum();
            // The naive f64 sum adds at most K·2^-53·Σ|w x| ≪ the f32 bound.
            assert!(
                (y[t * n + row] as f64 - exact).abs() <= bound[row],
                "({t}, {row})"
            );
        }
    }
}
