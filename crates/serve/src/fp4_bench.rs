//! `ultra bench-fp4`: CPU MXFP4 expert GEMV/GEMM at gpt-oss-20b expert shapes.
//!
//! One decoded token of gpt-oss-20b runs, per MoE layer, the gate/up projection (5760×2880) and
//! the down projection (2880×2880) of its 4 routed experts. This job builds random MXFP4 experts
//! of those shapes, checks the CPU kernels against the f64 reference within the documented bound,
//! then times them and reports weight bytes per second.

use std::time::Instant;

use anyhow::{ensure, Result};
use fp4::{MxMatrixRef, BLOCK};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// One measured case.
#[derive(Debug, Clone)]
pub struct BenchRow {
    pub case: String,
    pub weight_bytes: usize,
    pub median_ms: f64,
    pub gb_per_s: f64,
}

/// Random MXFP4 weights: uniform code bytes, scales 2^-9..2^3.
pub fn random_weights(rows: usize, k: usize, rng: &mut ChaCha8Rng) -> (Vec<u8>, Vec<u8>) {
    let blocks = (0..rows * k / 2).map(|_| rng.random::<u8>()).collect();
    let scales = (0..rows * k / BLOCK)
        .map(|_| rng.random_range(118u8..=130))
        .collect();
    (blocks, scales)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

/// Checks `fp4::cpu::gemm` on `w` against the f64 reference for `batch` random rows.
pub fn check(w: MxMatrixRef<'_>, batch: usize, rng: &mut ChaCha8Rng) -> Result<f64> {
    let k = w.k();
    let x: Vec<f32> = (0..batch * k)
        .map(|_| rng.random_range(-2.0..2.0))
        .collect();
    let mut y = vec![0f32; batch * w.rows()];
    fp4::cpu::gemm(w, &x, batch, &mut y)?;
    let mut worst = 0f64;
    for b in 0..batch {
        let xs = &x[b * k..(b + 1) * k];
        let x64: Vec<f64> = xs.iter().map(|&v| v as f64).collect();
        let want = fp4::cpu::gemv_f64_reference(w, &x64);
        let bound = fp4::cpu::gemv_error_bound(w, xs);
        for r in 0..w.rows() {
            let err = (y[b * w.rows() + r] as f64 - want[r]).abs();
            ensure!(
                err <= bound[r],
                "row {r} batch {b}: |{} - {}| exceeds bound {}",
                y[b * w.rows() + r],
                want[r],
                bound[r]
            );
            worst = worst.max(err / bound[r].max(f64::MIN_POSITIVE));
        }
    }
    Ok(worst)
}

/// Runs the benchmark: for each shape and batch size, `iters` timed runs over 4 experts.
pub fn run(iters: usize, batches: &[usize], seed: u64) -> Result<Vec<BenchRow>> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let shapes = [("gate_up", 5760usize, 2880usize), ("down", 2880, 2880)];
    let mut rows = Vec::new();
    for (name, n, k) in shapes {
        let experts: Vec<(Vec<u8>, Vec<u8>)> =
            (0..4).map(|_| random_weights(n, k, &mut rng)).collect();
        let views: Vec<MxMatrixRef<'_>> = experts
            .iter()
            .map(|(b, s)| MxMatrixRef::new(n, k, b, s))
            .collect::<Result<_, _>>()?;
        let bytes: usize = views.iter().map(|v| v.nbytes()).sum();
        for &batch in batches {
            check(views[0], batch, &mut rng)?;
            let x: Vec<f32> = (0..batch * k)
                .map(|_| rng.random_range(-2.0..2.0))
                .collect();
            let mut y = vec![0f32; batch * n];
            let mut times = Vec::with_capacity(iters);
            for it in 0..=iters {
                let t0 = Instant::now();
                for v in &views {
                    fp4::cpu::gemm(*v, &x, batch, &mut y)?;
                }
                if it > 0 {
                    times.push(t0.elapsed().as_secs_f64() * 1e3);
                }
            }
            let med = median(times);
            rows.push(BenchRow {
                case: format!("{name} {n}x{k} x 4 experts, batch {batch}"),
                weight_bytes: bytes,
                median_ms: med,
                gb_per_s: bytes as f64 / med / 1e6,
            });
        }
    }
    Ok(rows)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn check_accepts_the_kernel_and_rows_are_consistent() {
        let mut rng = ChaCha8Rng::seed_from_u64(1);
        let (b, s) = random_weights(64, 96, &mut rng);
        let w = MxMatrixRef::new(64, 96, &b, &s).unwrap();
        let worst = check(w, 3, &mut rng).unwrap();
        assert!(worst <= 1.0);
    }
}
