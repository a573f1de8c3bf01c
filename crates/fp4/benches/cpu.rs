//! CPU MXFP4 kernels at gpt-oss-20b expert shapes: GEMV / GEMM (batch 1, 4, 16) and
//! dequantize. Throughput is reported in weight bytes (codes + scales) per second.
//!
//! `cargo bench -p fp4` (all kernels this CPU has), or e.g. `cargo bench -p fp4 -- gemv/`.

use std::hint::black_box;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use fp4::{cpu, CpuKernel, MxMatrix};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// gpt-oss-20b expert projections: (name, N, K).
const SHAPES: [(&str, usize, usize); 2] = [
    ("gate_up_5760x2880", 5760, 2880),
    ("down_2880x2880", 2880, 2880),
];

/// A random valid matrix with realistic scale bytes (around 2^-8..2^-2, like trained weights).
fn random_matrix(rows: usize, k: usize, seed: u64) -> MxMatrix {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let blocks = (0..rows * k / 2).map(|_| rng.random()).collect();
    let scales = (0..rows * k / 32)
        .map(|_| rng.random_range(119..126))
        .collect();
    MxMatrix {
        rows,
        k,
        blocks,
        scales,
    }
}

fn random_x(n: usize, seed: u64) -> Vec<f32> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    (0..n).map(|_| rng.random_range(-1.0f32..1.0)).collect()
}

fn configure<'a>(
    c: &'a mut Criterion,
    name: &str,
) -> criterion::BenchmarkGroup<'a, criterion::measurement::WallTime> {
    let mut g = c.benchmark_group(name);
    g.sample_size(10)
        .warm_up_time(Duration::from_millis(300))
        .measurement_time(Duration::from_secs(1));
    g
}

fn bench_gemm(c: &mut Criterion) {
    for (batch, group) in [(1, "gemv"), (4, "gemm_b4"), (16, "gemm_b16")] {
        let mut g = configure(c, group);
        for (name, n, k) in SHAPES {
            let m = random_matrix(n, k, 1);
            let w = m.view().unwrap();
            let x = random_x(batch * k, 2);
            let mut y = vec![0f32; batch * n];
            g.throughput(Throughput::Bytes(w.nbytes() as u64));
            for kernel in CpuKernel::available() {
                // The portable kernel only as a baseline at batch 1.
                if kernel == CpuKernel::Portable && batch != 1 {
                    continue;
                }
                g.bench_with_input(BenchmarkId::new(kernel.name(), name), &(), |b, _| {
                    b.iter(|| {
                        cpu::gemm_with(kernel, w, black_box(&x), batch, &mut y).unwrap();
                        black_box(&y);
                    })
                });
            }
        }
        g.finish();
    }
}

fn bench_dequantize(c: &mut Criterion) {
    let mut g = configure(c, "dequantize");
    for (name, n, k) in SHAPES {
        let m = random_matrix(n, k, 3);
        let w = m.view().unwrap();
        let mut out = vec![0f32; n * k];
        g.throughput(Throughput::Bytes(w.nbytes() as u64));
        g.bench_function(name, |b| {
            b.iter(|| {
                cpu::dequantize_into(black_box(w), &mut out).unwrap();
                black_box(&out);
            })
        });
    }
    g.finish();
}

criterion_group!(benches, bench_gemm, bench_dequantize);
criterion_main!(benches);
