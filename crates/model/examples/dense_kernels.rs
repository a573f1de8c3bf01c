//! Times the dense CPU kernels ([`model::cpu::kernels::rows_dot`]) against the one-row dot
//! products of [`model::cpu::ops`] (`dot_f16` / `dot_bf16` / `dot` per row and activation
//! row), alternating in one process and timed in the thread's CPU time (not wall time), so that
//! a shared machine's load hits both alike:
//! `cargo run --release -p model --example dense_kernels` (single thread; prints the median
//! time of each and their ratio per shape, dtype and number of activation rows).

use half::{bf16, f16};
use model::cpu::kernels::rows_dot;
use model::cpu::ops;
use model::weights::{Mat, MatData};

/// The calling thread's CPU time in seconds.
fn cpu_now() -> f64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: a valid timespec out-pointer.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    ts.tv_sec as f64 + ts.tv_nsec as f64 * 1e-9
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn per_row(m: &Mat, x: &[f32], t: usize, out: &mut [f32]) {
    let k = m.cols;
    for r in 0..m.rows {
        for j in 0..t {
            let xj = &x[j * k..(j + 1) * k];
            out[r * t + j] = match m.data() {
                MatData::F32(v) => ops::dot(&v[r * k..(r + 1) * k], xj),
                MatData::Bf16(v) => ops::dot_bf16(&v[r * k..(r + 1) * k], xj),
                MatData::F16(v) => ops::dot_f16(&v[r * k..(r + 1) * k], xj),
                d => ops::dot_row(d, r, xj, &mut Vec::new()),
            };
        }
    }
}

fn main() {
    let shapes: Vec<(usize, usize)> = match std::env::args().nth(1) {
        Some(s) => s
            .split(',')
            .map(|p| {
                let (a, b) = p.split_once('x').expect("ROWSxCOLS");
                (a.parse().unwrap(), b.parse().unwrap())
            })
            .collect(),
        None => vec![(32000, 512), (512, 512), (4096, 2880), (8192, 256)],
    };
    for (rows, cols) in shapes {
        let v: Vec<f32> = (0..rows * cols)
            .map(|i| ((i * 2654435761) % 1000) as f32 / 500.0 - 1.0)
            .collect();
        let ms = [
            ("f32", Mat::from_f32(rows, cols, v.clone())),
            (
                "bf16",
                Mat::from_bf16(rows, cols, v.iter().map(|&x| bf16::from_f32(x)).collect()),
            ),
            (
                "f16",
                Mat::from_f16(rows, cols, v.iter().map(|&x| f16::from_f32(x)).collect()),
            ),
        ];
        for (name, m) in &ms {
            for t in [1, 8, 32] {
                let x: Vec<f32> = (0..t * cols).map(|i| (i % 7) as f32 * 0.1).collect();
                let (mut a, mut b) = (vec![0f32; rows * t], vec![0f32; rows * t]);
                let reps = (20_000_000 / (rows * cols * t)).clamp(3, 200);
                let (mut ta, mut tb) = (Vec::new(), Vec::new());
                for _ in 0..7 {
                    let s = cpu_now();
                    for _ in 0..reps {
                        per_row(m, &x, t, &mut a);
                    }
                    ta.push((cpu_now() - s) / reps as f64);
                    let s = cpu_now();
                    for _ in 0..reps {
                        rows_dot(m.data(), cols, 0..rows, &x, t, &mut b, &mut Vec::new());
                    }
                    tb.push((cpu_now() - s) / reps as f64);
                }
                assert_eq!(a, b, "the kernels disagree");
                let (ta, tb) = (median(ta), median(tb));
                let gbs = (rows * cols * m.dtype().size()) as f64 / tb / 1e9;
                println!(
                    "{rows}x{cols} {name} t={t}: per-row dots {:.1} µs, rows_dot {:.1} µs ({gbs:.1} GB/s of weights), {:.2}x",
                    ta * 1e6,
                    tb * 1e6,
                    ta / tb
                );
            }
        }
    }
}
