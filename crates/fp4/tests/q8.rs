//! The integer MXFP4 path (`fp4::q8`): every kernel gives the same bits, a row's result does not
//! depend on the batch it is in, and results are within the stated bound of the exact product.

use fp4::{
    gemm_q8_with, gemv_f64_reference, q8_error_bound, quantize_matrix, Q8Kernel, Q8Rows,
    ScaleRounding,
};

fn rnd(seed: &mut u64, n: usize, scale: f32) -> Vec<f32> {
    (0..n)
        .map(|_| {
            *seed = seed
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            let u = ((*seed >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0;
            // Heavy-ish tails: some blocks with an outlier.
            if (*seed >> 20).is_multiple_of(97) {
                u * scale * 20.0
            } else {
                u * scale
            }
        })
        .collect()
}

#[test]
fn kernels_agree_bitwise_and_stay_within_the_bound() {
    let mut seed = 1u64;
    // K with whole groups, a partial group, and a single block; N odd.
    for &(n, k) in &[(37usize, 256usize), (19, 96), (8, 32), (64, 2880)] {
        let wv = rnd(&mut seed, n * k, 0.05);
        let m = quantize_matrix(&wv, n, k, ScaleRounding::Floor).unwrap();
        let w = m.view().unwrap();
        for batch in [1usize, 3, 8, 11] {
            let x = rnd(&mut seed, batch * k, 1.0);
            let mut q = Q8Rows::new(k).unwrap();
            q.push_rows(&x).unwrap();
            let mut want: Option<Vec<f32>> = None;
            for kern in Q8Kernel::ALL.into_iter().filter(|k| k.is_available()) {
                let mut y = vec![0f32; batch * n];
                gemm_q8_with(kern, w, &q, &mut y).unwrap();
                match &want {
                    None => want = Some(y),
                    Some(wy) => {
                        let a: Vec<u32> = wy.iter().map(|v| v.to_bits()).collect();
                        let b: Vec<u32> = y.iter().map(|v| v.to_bits()).collect();
                        assert_eq!(
                            a,
                            b,
                            "{} differs from the first kernel ({n}x{k}, batch {batch})",
                            kern.name()
                        );
                    }
                }
            }
            let y = want.unwrap();
            for t in 0..batch {
                // Alone, the row gives the same bits.
                let mut one = Q8Rows::new(k).unwrap();
                one.push_from(&q, t).unwrap();
                let mut y1 = vec![0f32; n];
                fp4::gemm_q8(w, &one, &mut y1).unwrap();
                for r in 0..n {
                    assert_eq!(y1[r].to_bits(), y[t * n + r].to_bits(), "row {t} alone");
                }
                let xr: Vec<f64> = x[t * k..(t + 1) * k]
                    .iter()
                    .map(|&v| f64::from(v))
                    .collect();
                let exact = gemv_f64_reference(w, &xr);
                for r in 0..n {
                    let err = (f64::from(y[t * n + r]) - exact[r]).abs();
                    let bound = q8_error_bound(w, r, &q, t);
                    assert!(
                        err <= bound,
                        "{n}x{k} row {r} batch row {t}: |err| {err:e} > bound {bound:e}"
                    );
                }
            }
        }
    }
}

#[test]
fn quantization_is_per_row_and_errors_are_named() {
    assert!(Q8Rows::new(33).is_err());
    let mut q = Q8Rows::new(64).unwrap();
    assert!(q.push_rows(&[0.0; 65]).is_err());
    let x: Vec<f32> = (0..64).map(|i| i as f32 - 31.5).collect();
    q.push_rows(&x).unwrap();
    let back = q.dequantize_row(0);
    for (a, b) in x.iter().zip(&back) {
        assert!((a - b).abs() <= 32.5 / 127.0 / 2.0 + 1e-6, "{a} vs {b}");
    }
    // Zero rows quantize to zero.
    let mut z = Q8Rows::new(32).unwrap();
    z.push_rows(&[0.0; 32]).unwrap();
    assert!(z.dequantize_row(0).iter().all(|&v| v == 0.0));
}
