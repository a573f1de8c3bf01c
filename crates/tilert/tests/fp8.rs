//! GPU tests of the dense projection kernels (`kernels/proj.cu`, `tilert::ops::proj`): FP8 e4m3
//! with 128×128 block scales and BF16 weights, 1..=16 tokens, against an f64 CPU reference on
//! fresh random inputs, at small odd shapes (columns not a multiple of the tile or of 4, rows not
//! a multiple of 16 or of the 128-row scale block), at gpt-oss-20b shapes (2880 / 4096 / 5120) and
//! at MiMo-V2.5-Pro per-rank shapes (qkv 3392×6144, dense 2048×6144, o_proj 6144×2048). Skipped
//! without a GPU (fails with `ULTRA_REQUIRE_GPU=1`). The seed is printed; set `ULTRA_TEST_SEED`
//! to replay it.
//!
//! Tolerance: weights decode exactly, products and sums are f32 in some order, so each output may
//! differ from the exact value by at most γ·(Σ|w·s·x| + |bias| + |y₀|) with γ = (K + 8)·2⁻²⁴
//! (the worst-case bound of any f32 summation order of K + 2 terms plus the scale product); in
//! addition ‖y − ref‖ / ‖ref‖ must be below 1e-5 (f32 arithmetic; a real bug is O(1)). Every
//! output is poisoned with NaN before the launch and must come back finite.

use std::sync::Arc;

use cudarc::driver::{CudaContext, CudaStream};
use half::bf16;
use model::weights::f8_e4m3;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha20Rng;
use tilert::arena::{dtoh, htod, Arena, DPtr};
use tilert::ops::proj::{ProjLaunch, ProjMatrix, ProjOps};

struct Gpu {
    stream: Arc<CudaStream>,
    arena: Arena,
    ops: ProjOps,
    _ctx: Arc<CudaContext>,
}

fn gpu(test: &str) -> Option<(Gpu, ChaCha20Rng)> {
    let ctx = ultra_kernels::gpu_for_test(test)?;
    let stream = ctx.default_stream();
    let ops = ProjOps::load(&ctx).expect("load proj kernels");
    let seed = ultra_kernels::test_seed(test);
    Some((
        Gpu {
            arena: Arena::new(stream.clone()),
            stream,
            ops,
            _ctx: ctx,
        },
        ChaCha20Rng::seed_from_u64(seed),
    ))
}

/// A random weight: the uploaded matrix and its exact values (f64, row-major).
struct Weight {
    m: ProjMatrix,
    exact: Vec<f64>,
}

/// Random FP8 codes (every finite e4m3 value, both signs; no NaN codes) and scales
/// 2^-12 .. 2^-3 (the range of real `weight_scale_inv`).
fn random_fp8(g: &mut Gpu, rng: &mut ChaCha20Rng, rows: usize, cols: usize) -> Weight {
    let codes: Vec<u8> = (0..rows * cols)
        .map(|_| loop {
            let c: u8 = rng.random();
            if c & 0x7f != 0x7f {
                break c;
            }
        })
        .collect();
    let (sr, sc) = (rows.div_ceil(128), cols.div_ceil(128));
    let scales: Vec<f32> = (0..sr * sc)
        .map(|_| 2f32.powf(rng.random_range(-12.0..-3.0)))
        .collect();
    let exact = (0..rows * cols)
        .map(|i| {
            let (r, c) = (i / cols, i % cols);
            f8_e4m3(codes[i]) as f64 * scales[(r / 128) * sc + c / 128] as f64
        })
        .collect();
    let m = ProjMatrix::upload_fp8(&mut g.arena, &codes, &scales, rows, cols, "fp8 weight")
        .expect("upload fp8");
    Weight { m, exact }
}

fn random_bf16(g: &mut Gpu, rng: &mut ChaCha20Rng, rows: usize, cols: usize) -> Weight {
    let v: Vec<bf16> = (0..rows * cols)
        .map(|_| bf16::from_f32(rng.random_range(-1.0f32..1.0) / (cols as f32).sqrt()))
        .collect();
    let exact = v.iter().map(|x| x.to_f64()).collect();
    let m =
        ProjMatrix::upload_bf16(&mut g.arena, &v, rows, cols, "bf16 weight").expect("upload bf16");
    Weight { m, exact }
}

fn up<T: cudarc::driver::DeviceRepr>(g: &mut Gpu, v: &[T]) -> DPtr<T> {
    g.arena.upload(v, "test input").unwrap()
}

/// Runs one projection of `t` tokens (random x, optional random bias, optional accumulate onto
/// random y₀) and checks it against the f64 reference; returns the relative norm error.
fn check(
    g: &mut Gpu,
    rng: &mut ChaCha20Rng,
    w: &Weight,
    t: usize,
    bias: bool,
    accumulate: bool,
    how: Option<ProjLaunch>,
) -> f64 {
    let (n, k) = (w.m.rows, w.m.cols);
    let x: Vec<f32> = (0..t * k).map(|_| rng.random_range(-2.0..2.0)).collect();
    let b: Vec<f32> = (0..n).map(|_| rng.random_range(-1.0..1.0)).collect();
    let y0: Vec<f32> = if accumulate {
        (0..t * n).map(|_| rng.random_range(-1.0..1.0)).collect()
    } else {
        vec![f32::NAN; t * n]
    };
    let dx = up(g, &x);
    let db = up(g, &b);
    let dy = g.arena.alloc::<f32>(t * n, "y").unwrap();
    htod(&g.stream, &y0, dy).unwrap();
    let bias_p = bias.then_some(db);
    match how {
        Some(h) => g
            .ops
            .linear_with(&g.stream, &w.m, bias_p, dx, t, dy, accumulate, h)
            .unwrap(),
        None => g
            .ops
            .linear(&g.stream, &w.m, bias_p, dx, t, dy, accumulate)
            .unwrap(),
    }
    let y = dtoh(&g.stream, dy).unwrap();
    let gamma = (k as f64 + 8.0) * 2f64.powi(-24);
    let (mut err2, mut ref2) = (0f64, 0f64);
    for j in 0..t {
        for r in 0..n {
            let (mut s, mut mag) = (0f64, 0f64);
            for c in 0..k {
                let p = w.exact[r * k + c] * x[j * k + c] as f64;
                s += p;
                mag += p.abs();
            }
            if bias {
                s += b[r] as f64;
                mag += (b[r] as f64).abs();
            }
            if accumulate {
                s += y0[j * n + r] as f64;
                mag += (y0[j * n + r] as f64).abs();
            }
            let got = y[j * n + r] as f64;
            assert!(
                got.is_finite(),
                "{n}x{k} t={t} {how:?}: y[{j}][{r}] = {got} (not written or not finite)"
            );
            let e = (got - s).abs();
            assert!(
                e <= gamma * mag + 1e-30,
                "{n}x{k} t={t} bias={bias} acc={accumulate} {how:?}: y[{j}][{r}] = {got}, \
                 reference {s}, error {e:.3e} > bound {:.3e}",
                gamma * mag
            );
            err2 += e * e;
            ref2 += s * s;
        }
    }
    let rel = (err2 / ref2.max(1e-300)).sqrt();
    assert!(
        rel < 1e-5,
        "{n}x{k} t={t} {how:?}: relative error {rel:.3e}"
    );
    rel
}

#[test]
fn fp8_and_bf16_match_the_f64_reference() {
    let Some((mut g, mut rng)) = gpu("fp8_and_bf16_match_the_f64_reference") else {
        return;
    };
    // (rows, cols, token counts): odd shapes first, then gpt-oss-20b and MiMo per-rank shapes.
    let cases: &[(usize, usize, &[usize])] = &[
        (37, 200, &[1, 2, 3, 4, 5, 8, 9, 16]),
        (19, 45, &[1, 3, 16]),
        (130, 2880, &[1, 2, 4, 7, 8, 16]),
        (333, 1000, &[1, 6, 12]),
        (5120, 2880, &[1, 8]),
        (2880, 4096, &[1, 4, 16]),
        (3392, 6144, &[1, 9]),
        (2048, 6144, &[1, 16]),
        (6144, 2048, &[1, 2, 8]),
    ];
    for fp8 in [true, false] {
        for &(rows, cols, ts) in cases {
            let w = if fp8 {
                random_fp8(&mut g, &mut rng, rows, cols)
            } else {
                random_bf16(&mut g, &mut rng, rows, cols)
            };
            let mut worst = 0f64;
            for (i, &t) in ts.iter().enumerate() {
                let bias = i % 2 == 0;
                let acc = i % 3 == 1;
                worst = worst.max(check(&mut g, &mut rng, &w, t, bias, acc, None));
            }
            println!(
                "{} {rows}x{cols} tokens {ts:?}: worst relative error {worst:.2e} (launch t=1: {:?})",
                if fp8 { "fp8" } else { "bf16" },
                g.ops.choose(&w.m, 1)
            );
        }
    }
}

#[test]
fn every_launch_shape_computes_the_same_function() {
    let Some((mut g, mut rng)) = gpu("every_launch_shape_computes_the_same_function") else {
        return;
    };
    for fp8 in [true, false] {
        // 300 rows: an odd number of 16-row groups (19) and a partial 128-row scale block.
        let w = if fp8 {
            random_fp8(&mut g, &mut rng, 300, 1000)
        } else {
            random_bf16(&mut g, &mut rng, 300, 1000)
        };
        let mut shapes: Vec<ProjLaunch> = Vec::new();
        for groups in [1, 2] {
            for warps in [1, 3, 4, 8, 16] {
                shapes.push(ProjLaunch::RowGroups { groups, warps });
            }
        }
        for ctas_per_sm in [1, 2, 8] {
            shapes.push(ProjLaunch::StreamK { ctas_per_sm });
        }
        for how in shapes {
            for t in [1, 5, 16] {
                check(&mut g, &mut rng, &w, t, true, t == 5, Some(how));
            }
        }
    }
}

/// The bulk-copy kernels (`proj_bulk_*`), every launch shape that fits the device, at every
/// token count 1..=16, on fresh random weights: tiny and odd shapes (one row, one column, a
/// partial 128-column scale block, rows not a multiple of 16 or of the block's row groups), a
/// matrix with more row blocks than resident CTAs (a CTA streams several blocks back to back)
/// and one with more column chunks per block than stages (the ring wraps inside a block), plus
/// larger gpt-oss / MiMo shapes at a few token counts. Repeats are bit-identical.
#[test]
fn bulk_kernels_match_the_f64_reference_at_every_shape() {
    let Some((mut g, mut rng)) = gpu("bulk_kernels_match_the_f64_reference_at_every_shape") else {
        return;
    };
    let all: Vec<usize> = (1..=16).collect();
    let cases: &[(usize, usize, &[usize])] = &[
        (1, 1, &all),
        (5, 9, &all),
        (37, 200, &all),
        (300, 1000, &all),
        (130, 2880, &all),
        (8000, 100, &[1, 2, 5, 8, 16]),
        (40, 40_000, &[1, 3, 4, 11, 16]),
        (2880, 4096, &[1, 8]),
        (3392, 6144, &[1, 16]),
        (6144, 2048, &[1, 4]),
    ];
    for fp8 in [true, false] {
        for &(rows, cols, ts) in cases {
            let w = if fp8 {
                random_fp8(&mut g, &mut rng, rows, cols)
            } else {
                random_bf16(&mut g, &mut rng, rows, cols)
            };
            let mut worst = 0f64;
            let mut launches = 0;
            for (i, &t) in ts.iter().enumerate() {
                let shapes = g.ops.bulk_launches(fp8, t);
                assert!(!shapes.is_empty(), "no bulk launch fits at {t} tokens");
                for how in shapes {
                    let (bias, acc) = (i % 2 == 0, i % 3 == 1);
                    worst = worst.max(check(&mut g, &mut rng, &w, t, bias, acc, Some(how)));
                    launches += 1;
                }
            }
            println!(
                "{} {rows}x{cols}: {launches} bulk launches, worst relative error {worst:.2e}",
                if fp8 { "fp8" } else { "bf16" }
            );
        }
        // Determinism: the same launch twice gives the same bits.
        let w = if fp8 {
            random_fp8(&mut g, &mut rng, 1000, 3000)
        } else {
            random_bf16(&mut g, &mut rng, 1000, 3000)
        };
        let x: Vec<f32> = (0..16 * 3000)
            .map(|_| rng.random_range(-1.0..1.0))
            .collect();
        let dx = up(&mut g, &x);
        let dy = g.arena.alloc::<f32>(16 * 1000, "y").unwrap();
        for how in g.ops.bulk_launches(fp8, 16) {
            let mut first: Option<Vec<f32>> = None;
            for _ in 0..3 {
                g.ops
                    .linear_with(&g.stream, &w.m, None, dx, 16, dy, false, how)
                    .unwrap();
                let y = dtoh(&g.stream, dy).unwrap();
                match &first {
                    None => first = Some(y),
                    Some(f) => assert!(
                        f.iter().zip(&y).all(|(a, b)| a.to_bits() == b.to_bits()),
                        "fp8={fp8} {how:?}: a repeat differs"
                    ),
                }
            }
        }
    }
}

#[test]
fn stream_k_is_deterministic_and_rearms_its_counters() {
    let Some((mut g, mut rng)) = gpu("stream_k_is_deterministic_and_rearms_its_counters") else {
        return;
    };
    // Shapes where groups are shared by 2+ warps (few tiles per group) and where one warp
    // spans many groups (many row groups, short K).
    for (rows, cols) in [(64, 4096), (4000, 64), (1000, 1000)] {
        for fp8 in [true, false] {
            let w = if fp8 {
                random_fp8(&mut g, &mut rng, rows, cols)
            } else {
                random_bf16(&mut g, &mut rng, rows, cols)
            };
            let x: Vec<f32> = (0..16 * cols)
                .map(|_| rng.random_range(-1.0..1.0))
                .collect();
            let dx = up(&mut g, &x);
            let dy = g.arena.alloc::<f32>(16 * rows, "y").unwrap();
            let mut first: Option<Vec<f32>> = None;
            for rep in 0..4 {
                for ctas_per_sm in [1, 3] {
                    let how = ProjLaunch::StreamK { ctas_per_sm };
                    g.ops
                        .linear_with(&g.stream, &w.m, None, dx, 16, dy, false, how)
                        .unwrap();
                    let y = dtoh(&g.stream, dy).unwrap();
                    if ctas_per_sm == 1 {
                        match &first {
                            None => first = Some(y),
                            Some(f) => assert!(
                                f.iter().zip(&y).all(|(a, b)| a.to_bits() == b.to_bits()),
                                "{rows}x{cols} fp8={fp8}: repeat {rep} differs"
                            ),
                        }
                    }
                }
            }
            // And still right after the repeats (counters back at zero).
            check(&mut g, &mut rng, &w, 7, true, true, None);
        }
    }
}

#[test]
fn bad_arguments_are_errors() {
    let Some((mut g, mut rng)) = gpu("bad_arguments_are_errors") else {
        return;
    };
    let w = random_fp8(&mut g, &mut rng, 64, 256);
    let x = g.arena.alloc::<f32>(16 * 256, "x").unwrap();
    let y = g.arena.alloc::<f32>(16 * 64, "y").unwrap();
    for t in [0, 17] {
        let e = g.ops.linear(&g.stream, &w.m, None, x, t, y, false);
        assert!(e.is_err(), "{t} tokens accepted");
    }
    let short = x.slice(0..255);
    assert!(g
        .ops
        .linear(&g.stream, &w.m, None, short, 1, y, false)
        .is_err());
    for how in [
        ProjLaunch::RowGroups {
            groups: 3,
            warps: 4,
        },
        ProjLaunch::RowGroups {
            groups: 1,
            warps: 0,
        },
        ProjLaunch::RowGroups {
            groups: 1,
            warps: 17,
        },
        ProjLaunch::StreamK { ctas_per_sm: 0 },
        ProjLaunch::StreamK { ctas_per_sm: 9 },
        ProjLaunch::Bulk {
            groups: 3,
            ctas_per_sm: 1,
        },
        ProjLaunch::Bulk {
            groups: 1,
            ctas_per_sm: 0,
        },
        ProjLaunch::Bulk {
            groups: 1,
            ctas_per_sm: 3,
        },
    ] {
        let e = g
            .ops
            .linear_with(&g.stream, &w.m, None, x, 1, y, false, how);
        assert!(e.is_err(), "{how:?} accepted");
    }
    let codes = vec![0u8; 64 * 256];
    let e = ProjMatrix::upload_fp8(&mut g.arena, &codes, &[1.0; 3], 64, 256, "w");
    assert!(e.unwrap_err().to_string().contains("block scales"));
}

#[test]
fn checkpoint_matrices_upload_in_their_dtype() {
    let Some((mut g, mut rng)) = gpu("checkpoint_matrices_upload_in_their_dtype") else {
        return;
    };
    use model::weights::{Bytes, DenseDtype, Mat};
    let (rows, cols) = (200, 300);
    let codes: Vec<u8> = (0..rows * cols)
        .map(|_| rng.random::<u8>() & 0x7e)
        .collect();
    let scales: Vec<f32> = (0..2 * 3).map(|i| 0.01 * (i + 1) as f32).collect();
    let codes_copy = codes.clone();
    let m = Mat::from_bytes(
        DenseDtype::F8E4M3,
        rows,
        cols,
        Bytes::from_vec(codes.clone()),
        Some(([128, 128], 3, scales.clone())),
    )
    .unwrap();
    let a = ProjMatrix::from_mat(&mut g.arena, &m, "qkv_proj").unwrap();
    let b = ProjMatrix::upload_fp8(&mut g.arena, &codes, &scales, rows, cols, "direct").unwrap();
    assert!(a.is_fp8());
    assert_eq!(
        a.logical_bytes(),
        rows * cols + 6 * 4,
        "stored as FP8, not widened"
    );
    let x: Vec<f32> = (0..cols).map(|_| rng.random_range(-1.0..1.0)).collect();
    let dx = up(&mut g, &x);
    let ya = g.arena.alloc::<f32>(rows, "ya").unwrap();
    let yb = g.arena.alloc::<f32>(rows, "yb").unwrap();
    g.ops.linear(&g.stream, &a, None, dx, 1, ya, false).unwrap();
    g.ops.linear(&g.stream, &b, None, dx, 1, yb, false).unwrap();
    let (ya, yb) = (dtoh(&g.stream, ya).unwrap(), dtoh(&g.stream, yb).unwrap());
    assert!(ya.iter().zip(&yb).all(|(p, q)| p.to_bits() == q.to_bits()));
    // Other FP8 blocks and f32 weights are refused with the tensor's name.
    let other = Mat::from_bytes(
        DenseDtype::F8E4M3,
        rows,
        cols,
        Bytes::from_vec(codes),
        Some(([1, 32], 10, vec![1.0; rows * 10])),
    )
    .unwrap();
    let e = ProjMatrix::from_mat(&mut g.arena, &other, "gate_proj").unwrap_err();
    // One scale row per weight row (MiMo's K / V parts of a fused qkv) is taken when each
    // 16-row group shares its scales, and computes like the 128x128 form.
    let per_row: Vec<f32> = (0..rows)
        .flat_map(|r| scales[(r / 128) * 3..(r / 128) * 3 + 3].to_vec())
        .collect();
    let rowwise = Mat::from_bytes(
        DenseDtype::F8E4M3,
        rows,
        cols,
        Bytes::from_vec(codes_copy.clone()),
        Some(([1, 128], 3, per_row)),
    )
    .unwrap();
    let c = ProjMatrix::from_mat(&mut g.arena, &rowwise, "k_proj").unwrap();
    let yc = g.arena.alloc::<f32>(rows, "yc").unwrap();
    g.ops.linear(&g.stream, &c, None, dx, 1, yc, false).unwrap();
    let yc = dtoh(&g.stream, yc).unwrap();
    assert!(ya.iter().zip(&yc).all(|(p, q)| p.to_bits() == q.to_bits()));
    assert!(e.to_string().contains("gate_proj"), "{e}");
    let f = Mat::from_f32(2, 2, vec![1.0; 4]);
    let e = ProjMatrix::from_mat(&mut g.arena, &f, "o_proj").unwrap_err();
    assert!(e.to_string().contains("o_proj"), "{e}");
}

/// The device bytes of a `ProjMatrix` (tiles, and FP8 scales).
fn proj_bytes(g: &Gpu, m: &ProjMatrix) -> (Vec<u8>, Vec<u32>) {
    use tilert::ops::proj::ProjData;
    match m.data {
        ProjData::Fp8 { tiles, scales } => (
            dtoh(&g.stream, tiles).unwrap(),
            dtoh(&g.stream, scales)
                .unwrap()
                .iter()
                .map(|s| s.to_bits())
                .collect(),
        ),
        ProjData::Bf16 { tiles } => (
            dtoh(&g.stream, tiles)
                .unwrap()
                .iter()
                .flat_map(|v| v.to_bits().to_le_bytes())
                .collect(),
            Vec::new(),
        ),
    }
}

/// A checkpoint matrix held as row segments (MiMo's FP8 dense `[gate; up]`: a view of each half
/// with its own 128x128 block scales; bf16 halves that are not adjacent) uploads to exactly the
/// device bytes of the contiguous matrix — the tiled FP8 / bf16 projection form
/// (`ProjMatrix::from_mat`, `DeviceMatrix::projection`) and the row-major bf16 form
/// (`DeviceMatrix::from_mat`) — and the projection computes the same bits.
#[test]
fn segmented_checkpoint_matrices_upload_like_contiguous_ones() {
    let Some((mut g, mut rng)) = gpu("segmented_checkpoint_matrices_upload_like_contiguous_ones")
    else {
        return;
    };
    use model::weights::{Bytes, DenseDtype, Mat};
    use tilert::tensor::{DenseData, DeviceMatrix};
    // 160 rows a half: the seam is not on a 128-row scale block (it is on a 16-row group).
    let (half, cols): (usize, usize) = (160, 300);
    let (rows, sc) = (2 * half, cols.div_ceil(128));
    let codes: Vec<u8> = (0..rows * cols)
        .map(|_| rng.random::<u8>() & 0x7e)
        .collect();
    let scale = |t: usize, b: usize, c: usize| 2f32.powi(-3 - ((t * 5 + b * 3 + c) % 9) as i32);
    let fp8_half = |t: usize| {
        let s = (0..half.div_ceil(128))
            .flat_map(|b| (0..sc).map(move |c| scale(t, b, c)))
            .collect();
        let c = codes[t * half * cols..(t + 1) * half * cols].to_vec();
        Mat::from_bytes(
            DenseDtype::F8E4M3,
            half,
            cols,
            Bytes::from_vec(c),
            Some(([128, 128], sc, s)),
        )
        .unwrap()
    };
    let seg = Mat::from_segments(vec![fp8_half(0), fp8_half(1)]).unwrap();
    // The contiguous form: one scale row per weight row.
    let per_row = (0..rows)
        .flat_map(|r| (0..sc).map(move |c| scale(r / half, (r % half) / 128, c)))
        .collect();
    let whole = Mat::from_bytes(
        DenseDtype::F8E4M3,
        rows,
        cols,
        Bytes::from_vec(codes.clone()),
        Some(([1, 128], sc, per_row)),
    )
    .unwrap();
    assert_eq!(seg.num_segments(), 2);
    let (a, b) = (
        ProjMatrix::from_mat(&mut g.arena, &seg, "gate_up").unwrap(),
        ProjMatrix::from_mat(&mut g.arena, &whole, "gate_up").unwrap(),
    );
    assert!(a.is_fp8());
    assert_eq!(
        proj_bytes(&g, &a),
        proj_bytes(&g, &b),
        "FP8 tiles and scales"
    );
    let p = DeviceMatrix::projection(&mut g.arena, &seg, "gate_up").unwrap();
    let p = p.tiled().expect("FP8 stays tiled FP8");
    assert_eq!(
        proj_bytes(&g, &p),
        proj_bytes(&g, &b),
        "DeviceMatrix::projection"
    );
    let x: Vec<f32> = (0..3 * cols).map(|_| rng.random_range(-1.0..1.0)).collect();
    let dx = up(&mut g, &x);
    let ya = g.arena.alloc::<f32>(3 * rows, "ya").unwrap();
    let yb = g.arena.alloc::<f32>(3 * rows, "yb").unwrap();
    g.ops.linear(&g.stream, &a, None, dx, 3, ya, false).unwrap();
    g.ops.linear(&g.stream, &b, None, dx, 3, yb, false).unwrap();
    let (ya, yb) = (dtoh(&g.stream, ya).unwrap(), dtoh(&g.stream, yb).unwrap());
    assert!(ya.iter().zip(&yb).all(|(p, q)| p.to_bits() == q.to_bits()));

    // bf16 halves.
    let v: Vec<bf16> = (0..rows * cols)
        .map(|_| bf16::from_f32(rng.random_range(-1.0..1.0)))
        .collect();
    let bf_half = |t: usize| {
        Mat::from_bf16(
            half,
            cols,
            v[t * half * cols..(t + 1) * half * cols].to_vec(),
        )
    };
    let seg = Mat::from_segments(vec![bf_half(0), bf_half(1)]).unwrap();
    let whole = Mat::from_bf16(rows, cols, v.clone());
    let (a, b) = (
        ProjMatrix::from_mat(&mut g.arena, &seg, "gate_up").unwrap(),
        ProjMatrix::from_mat(&mut g.arena, &whole, "gate_up").unwrap(),
    );
    assert_eq!(proj_bytes(&g, &a), proj_bytes(&g, &b), "bf16 tiles");
    let (a, b) = (
        DeviceMatrix::from_mat(&mut g.arena, &seg, "gate_up").unwrap(),
        DeviceMatrix::from_mat(&mut g.arena, &whole, "gate_up").unwrap(),
    );
    let (DenseData::Bf16(pa), DenseData::Bf16(pb)) = (a.data, b.data) else {
        panic!("bf16 stays bf16 row-major")
    };
    let bits = |p| -> Vec<u16> {
        dtoh(&g.stream, p)
            .unwrap()
            .iter()
            .map(|x: &bf16| x.to_bits())
            .collect()
    };
    assert_eq!(bits(pa), bits(pb), "row-major bf16 upload");
    assert_eq!(bits(pa), v.iter().map(|x| x.to_bits()).collect::<Vec<_>>());
}
