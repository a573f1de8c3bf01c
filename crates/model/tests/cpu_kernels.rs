//! The dense CPU kernels ([`model::cpu::kernels`]): on every ISA this CPU runs, for every dtype,
//! each output equals the portable reference dot of the widened row bit for bit, whatever the
//! number of activation rows in the call (GEMV vs the GEMM's register tiles and remainders) and
//! whatever range of rows a call covers; and every output is within the stated f64 bound.

use half::{bf16, f16};
use model::cpu::kernels::{dot_f8, rows_dot_with, Isa};
use model::cpu::ops;
use model::weights::{Bytes, DenseDtype, Mat};

/// A small deterministic generator (xorshift).
fn vals(seed: u64, n: usize, scale: f32) -> Vec<f32> {
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            scale * (2.0 * ((s >> 40) as f32 / (1u64 << 24) as f32) - 1.0)
        })
        .collect()
}

fn mats(rows: usize, cols: usize) -> Vec<(&'static str, Mat)> {
    let v = vals(rows as u64 * 31 + cols as u64, rows * cols, 2.0);
    let codes: Vec<u8> = (0..rows * cols).map(|k| (k * 37 % 0x7E) as u8).collect();
    let sc = cols.div_ceil(16);
    let scaled = Mat::from_bytes(
        DenseDtype::F8E4M3,
        rows,
        cols,
        Bytes::from_vec(codes.clone()),
        Some(([16, 16], sc, vals(5, rows.div_ceil(16) * sc, 4.0))),
    )
    .unwrap();
    vec![
        ("f32", Mat::from_f32(rows, cols, v.clone())),
        (
            "bf16",
            Mat::from_bf16(rows, cols, v.iter().map(|&x| bf16::from_f32(x)).collect()),
        ),
        (
            "f16",
            Mat::from_f16(rows, cols, v.iter().map(|&x| f16::from_f32(x)).collect()),
        ),
        (
            "fp8",
            Mat::from_bytes(DenseDtype::F8E4M3, rows, cols, Bytes::from_vec(codes), None).unwrap(),
        ),
        ("fp8 scaled", scaled),
    ]
}

#[test]
fn every_isa_and_tile_equals_the_portable_dot_bit_for_bit() {
    let isas: Vec<Isa> = [Isa::Portable, Isa::Avx2, Isa::Avx512]
        .into_iter()
        .filter(|i| i.is_available())
        .collect();
    // Columns: empty, tail only, one chunk, chunk + tail, several chunks + tail.
    for (rows, cols) in [(7, 0), (5, 13), (9, 32), (11, 61), (6, 200)] {
        for (what, m) in mats(rows, cols) {
            let wide: Vec<Vec<f32>> = (0..rows).map(|r| m.row(r).into_owned()).collect();
            for t in [1, 2, 3, 4, 5, 7, 9] {
                let x = vals(t as u64 + 100, t * cols, 1.5);
                let want: Vec<u32> = (0..rows)
                    .flat_map(|r| {
                        let wr = &wide[r];
                        (0..t)
                            .map(|j| ops::dot_portable(wr, &x[j * cols..(j + 1) * cols]).to_bits())
                            .collect::<Vec<_>>()
                    })
                    .collect();
                for &isa in &isas {
                    // All rows at once, and the rows split at an odd boundary.
                    let mut out = vec![0f32; rows * t];
                    rows_dot_with(
                        isa,
                        m.data(),
                        cols,
                        0..rows,
                        &x,
                        t,
                        &mut out,
                        &mut Vec::new(),
                    );
                    let got: Vec<u32> = out.iter().map(|v| v.to_bits()).collect();
                    assert_eq!(got, want, "{what} {rows}x{cols} t={t} {isa:?}");
                    let cut = rows / 2 + 1;
                    let (mut a, mut b) = (vec![0f32; cut * t], vec![0f32; (rows - cut) * t]);
                    rows_dot_with(isa, m.data(), cols, 0..cut, &x, t, &mut a, &mut Vec::new());
                    rows_dot_with(
                        isa,
                        m.data(),
                        cols,
                        cut..rows,
                        &x,
                        t,
                        &mut b,
                        &mut Vec::new(),
                    );
                    a.extend(b);
                    let got: Vec<u32> = a.iter().map(|v| v.to_bits()).collect();
                    assert_eq!(got, want, "{what} {rows}x{cols} t={t} {isa:?} split");
                }
            }
        }
    }
}

#[test]
fn fp8_dot_matches_the_row_kernel() {
    for (what, m) in mats(20, 61) {
        if m.dtype() != DenseDtype::F8E4M3 {
            continue;
        }
        let x = vals(9, 61, 1.0);
        let Fp8 { codes, scales } = fp8_parts(&m);
        for r in 0..20 {
            let s = scales.map(|(rows, b0, b1, sc)| (&rows[(r / b0) * sc..(r / b0 + 1) * sc], b1));
            assert_eq!(
                dot_f8(&codes[r * 61..(r + 1) * 61], s, &x, &mut Vec::new()).to_bits(),
                ops::dot_portable(&m.row(r), &x).to_bits(),
                "{what} row {r}"
            );
        }
    }
}

struct Fp8<'a> {
    codes: &'a [u8],
    /// (scales, rows per block, columns per block, scale columns)
    scales: Option<(&'a [f32], usize, usize, usize)>,
}

fn fp8_parts(m: &Mat) -> Fp8<'_> {
    match m.data() {
        model::weights::MatData::F8E4M3 { codes, scales } => Fp8 {
            codes,
            scales: scales.map(|s| (s.values, s.block[0], s.block[1], s.cols)),
        },
        _ => unreachable!("an FP8 matrix"),
    }
}

#[test]
fn results_are_within_the_stated_bound_of_the_f64_dot() {
    // |ŷ − y| ≤ γ_{⌊K/32⌋ + (K mod 32) + 6} · Σ|w·x| (module docs of `kernels`).
    let gamma = |n: usize| {
        let u = 2f64.powi(-24) * n as f64;
        u / (1.0 - u)
    };
    for (rows, cols) in [(33, 61), (16, 1000), (4, 4096)] {
        for (what, m) in mats(rows, cols) {
            let t = 3;
            let x = vals(77, t * cols, 3.0);
            let mut out = vec![0f32; rows * t];
            model::cpu::kernels::rows_dot(
                m.data(),
                cols,
                0..rows,
                &x,
                t,
                &mut out,
                &mut Vec::new(),
            );
            for r in 0..rows {
                let wr = m.row(r);
                for j in 0..t {
                    let xj = &x[j * cols..(j + 1) * cols];
                    let exact: f64 = wr.iter().zip(xj).map(|(&a, &b)| a as f64 * b as f64).sum();
                    let mag: f64 = wr
                        .iter()
                        .zip(xj)
                        .map(|(&a, &b)| (a as f64 * b as f64).abs())
                        .sum();
                    // The tail adds up to 31 more sequential roundings.
                    let bound = gamma(cols / 32 + 6 + cols % 32) * mag;
                    let err = (out[r * t + j] as f64 - exact).abs();
                    assert!(
                        err <= bound,
                        "{what} {rows}x{cols} r={r} j={j}: {err} > {bound}"
                    );
                }
            }
        }
    }
}

/// The logits of a 6-token prefill and 3 decodes of a gpt-oss-layout model whose expert jobs and
/// dense products are large enough for the rayon paths (experts in parallel, rows split),
/// computed in a pool of `threads`.
fn logits_with_threads(threads: usize) -> Vec<Vec<u32>> {
    use model::cpu::toy::{random_weights, synthetic_gpt_oss_100m, ToyExperts};
    use std::sync::Arc;
    let mut cfg = synthetic_gpt_oss_100m();
    cfg.vocab_size = 600;
    cfg.layers.truncate(2);
    cfg.hidden_size = 256;
    cfg.n_experts = 8;
    cfg.moe_intermediate_size = 512;
    let w = random_weights(&cfg, 3, ToyExperts::Mxfp4);
    let m = model::cpu::CpuModel::new(Arc::new(cfg), Arc::new(w)).unwrap();
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build()
        .unwrap();
    pool.install(|| {
        let mut s = m.session();
        let bits = |l: &[f32]| l.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
        let mut out = vec![bits(s.prefill(&[1, 5, 9, 200, 3, 77]).unwrap())];
        for t in [4, 500, 42] {
            out.push(bits(s.decode(t).unwrap()));
        }
        out
    })
}

#[test]
fn the_thread_count_does_not_change_a_bit() {
    assert_eq!(logits_with_threads(1), logits_with_threads(3));
}
