//! Quantization against an independent f64 reference, adversarial inputs, round trips.
#![allow(clippy::needless_range_loop)] // index-heavy checks read better with indices

mod common;

use common::{
    e2m1_value, e8m0_value, pow2, random_f32, ref_quantize_block, rng, unpack_block, MAGS,
};
use fp4::{
    cpu, quantize_block, quantize_matrix, quantize_matrix_bf16, Fp4Error, MxMatrix, ScaleRounding,
};
use half::bf16;
use rand::Rng;

const MODES: [ScaleRounding; 2] = [ScaleRounding::Floor, ScaleRounding::Up];

fn is_up(mode: ScaleRounding) -> bool {
    mode == ScaleRounding::Up
}

/// Quantizes one block with the crate and checks it against the reference and the invariants of
/// the mode. Returns (codes in element order, scale byte).
fn check_block(values: &[f32; 32], mode: ScaleRounding) -> (Vec<u8>, u8) {
    let (packed, scale) = quantize_block(values, mode);
    let codes = unpack_block(&packed);
    let (want_codes, want_scale) = ref_quantize_block(values, is_up(mode));
    assert_eq!(scale, want_scale, "{mode:?} scale of {values:?}");
    assert_eq!(
        codes, want_codes,
        "{mode:?} codes of {values:?} (scale {scale})"
    );
    if scale != 0xFF {
        let x = e8m0_value(scale).unwrap();
        for (&v, &c) in values.iter().zip(&codes) {
            let (v, q) = (v as f64, e2m1_value(c) * x);
            assert_eq!(
                q.is_sign_negative(),
                v.is_sign_negative(),
                "sign kept for {v}"
            );
            if mode == ScaleRounding::Up {
                assert!(v.abs() <= 6.0 * x, "Up never clips: |{v}| > 6·{x}");
            }
            // Round to nearest: the error is at most half the gap to the next magnitude,
            // except for Floor saturation above 6X.
            if v.abs() <= 6.0 * x {
                assert!((v - q).abs() <= x, "{v} → {q} (X = {x})");
            } else {
                assert_eq!(q.abs(), 6.0 * x, "saturation of {v}");
            }
        }
    }
    (codes, scale)
}

fn block_from(f: impl FnMut(usize) -> f32) -> [f32; 32] {
    std::array::from_fn(f)
}

#[test]
fn random_blocks_of_widely_varying_magnitude_match_reference() {
    let mut r = rng(1);
    for n in 0..20000 {
        // Block exponent anywhere from deep subnormal to near f32::MAX, elements spread over up
        // to 40 binades below it, with zeros and signed zeros mixed in.
        let top = r.random_range(-160..=127);
        let spread = r.random_range(0..40);
        let values = block_from(|_| match r.random_range(0..20) {
            0 => 0.0,
            1 => -0.0,
            _ => random_f32(&mut r, (top - spread)..=top),
        });
        let mode = MODES[n % 2];
        check_block(&values, mode);
        check_block(&values, MODES[1 - n % 2]);
    }
}

#[test]
fn random_bit_patterns_match_reference() {
    let mut r = rng(2);
    for _ in 0..10000 {
        let values = block_from(|_| loop {
            let v = f32::from_bits(r.random());
            if v.is_finite() {
                break v;
            }
        });
        for mode in MODES {
            check_block(&values, mode);
        }
    }
}

/// Values a few ulps around every rounding threshold, relative to a scale fixed by a 6X or 4X
/// element (which pins X for both modes).
#[test]
fn random_values_near_thresholds_match_reference() {
    let mut r = rng(3);
    let thresholds = [
        0.25f32, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 6.0, 0.5, 1.0, 3.0, 4.0,
    ];
    for _ in 0..10000 {
        let s = r.random_range(-127..=125);
        let x = pow2(s) as f32;
        let pin = if r.random() { 6.0 } else { 4.0 };
        let values = block_from(|i| {
            if i == 7 {
                return pin * x;
            }
            let t = thresholds[r.random_range(0..thresholds.len())] * x;
            let mut v = t;
            for _ in 0..r.random_range(0..3) {
                v = if r.random() {
                    v.next_up()
                } else {
                    v.next_down()
                };
            }
            if r.random() {
                -v
            } else {
                v
            }
        });
        let amax = values.iter().map(|v| v.abs()).fold(0f32, f32::max);
        for mode in MODES {
            let (_, scale) = check_block(&values, mode);
            // Floor keeps X (amax/X < 8); Up moves up a binade only if amax > 6X.
            let bump = (is_up(mode) && amax > 6.0 * x) as i32;
            assert_eq!(scale as i32, s + 127 + bump, "{mode:?}");
        }
    }
}

#[test]
fn exact_ties_go_to_the_even_code() {
    // (multiple of X, expected magnitude code): the even neighbour wins.
    let ties = [
        (0.25f32, 0u8),
        (0.75, 2),
        (1.25, 2),
        (1.75, 4),
        (2.5, 4),
        (3.5, 6),
        (5.0, 6),
    ];
    for s in [-127, -126, -125, -100, -20, -1, 0, 1, 7, 64, 120, 125] {
        let x = pow2(s) as f32;
        let mut values = [0f32; 32];
        values[0] = 6.0 * x; // pins X = 2^s in both modes
        for (i, &(t, _)) in ties.iter().enumerate() {
            values[1 + i] = t * x;
            values[8 + i] = -t * x;
            values[15 + i] = (t * x).next_up();
            values[22 + i] = (t * x).next_down();
        }
        for mode in MODES {
            let (codes, scale) = check_block(&values, mode);
            assert_eq!(scale as i32, s + 127, "{mode:?} s = {s}");
            for (i, &(_, c)) in ties.iter().enumerate() {
                assert_eq!(codes[1 + i], c, "tie {} at s = {s}", ties[i].0);
                assert_eq!(codes[8 + i], c | 8, "negative tie {} at s = {s}", ties[i].0);
                // Just above a tie rounds up, just below rounds down.
                let above = if c % 2 == 0 && ties[i].0 > MAGS[c as usize] as f32 {
                    c + 1
                } else {
                    c
                };
                let below = if ties[i].0 < MAGS[c as usize] as f32 {
                    c - 1
                } else {
                    c
                };
                assert_eq!(codes[15 + i], above, "above tie {} at s = {s}", ties[i].0);
                assert_eq!(codes[22 + i], below, "below tie {} at s = {s}", ties[i].0);
            }
        }
    }
}

/// amax on and around the binade boundaries that decide the shared exponent.
#[test]
fn amax_on_exponent_boundaries() {
    let mut cases = Vec::new();
    for e in -149..=127 {
        let p = pow2(e) as f32;
        cases.push(p);
        cases.push(p.next_up());
        if p > f32::from_bits(1) {
            cases.push(p.next_down());
        }
        if e <= 125 {
            for m in [1.5f32, 3.0] {
                // 1.5·2^e is the Up boundary (amax = 6 · 2^(e−2)); 3·2^e = 6·2^(e−1).
                let v = m * p;
                cases.push(v);
                cases.push(v.next_up());
                cases.push(v.next_down());
            }
        }
    }
    cases.push(f32::MAX);
    cases.push(f32::MAX.next_down());
    cases.push(f32::MIN_POSITIVE);
    for &amax in &cases {
        assert!(amax.is_finite() && amax > 0.0);
        let values = block_from(|i| match i {
            5 => amax,
            6 => -amax / 3.0,
            _ => amax / (i as f32 + 2.0),
        });
        for mode in MODES {
            check_block(&values, mode);
        }
        // The spec formulas, written out directly from amax's binary exponent.
        let e = (amax as f64).log2().floor() as i32;
        let e = if pow2(e) > amax as f64 {
            e - 1
        } else if pow2(e + 1) <= amax as f64 {
            e + 1
        } else {
            e
        };
        let floor = (e - 2).clamp(-127, 127);
        let up = if (amax as f64) <= 1.5 * pow2(e) {
            e - 2
        } else {
            e - 1
        }
        .clamp(-127, 127);
        assert_eq!(
            quantize_block(&values, ScaleRounding::Floor).1 as i32,
            floor + 127,
            "Floor amax {amax:e}"
        );
        assert_eq!(
            quantize_block(&values, ScaleRounding::Up).1 as i32,
            up + 127,
            "Up amax {amax:e}"
        );
    }
}

#[test]
fn up_is_exact_where_amax_over_6_would_round() {
    // amax = next_up(1.5 · 2^e): 6 · 2^(e−2) < amax, so the non-clipping scale is 2^(e−1); the
    // float formula ceil(log2(amax / 6)) in f32 gets e − 2 for large |e| (log2 rounds to the
    // integer) and would clip.
    for e in [-100, -3, 0, 5, 100] {
        let amax = (1.5 * pow2(e) as f32).next_up();
        if e.abs() >= 100 {
            assert_eq!(
                (amax / 6.0).log2().ceil() as i32,
                e - 2,
                "the naive formula is wrong here"
            );
        }
        let mut values = [0f32; 32];
        values[3] = amax;
        let (packed, scale) = quantize_block(&values, ScaleRounding::Up);
        assert_eq!(scale as i32, e - 1 + 127);
        // amax / 2^(e−1) = 3.000…: code 5 (3.0), not a clipped 6.
        assert_eq!(unpack_block(&packed)[3], 5);
        // On the boundary itself, 2^(e−2) suffices and amax maps to 6 exactly.
        values[3] = 1.5 * pow2(e) as f32;
        let (packed, scale) = quantize_block(&values, ScaleRounding::Up);
        assert_eq!((scale as i32, unpack_block(&packed)[3]), (e - 2 + 127, 7));
    }
}

#[test]
fn floor_clips_the_top_of_the_block() {
    // amax = 7.9·2^s: Floor keeps X = 2^s, so 7.9 saturates to 6; Up picks 2^(s+1) (3.95 → 4).
    let mut values = [0f32; 32];
    values[0] = 7.9;
    values[1] = -7.0;
    let (packed, scale) = quantize_block(&values, ScaleRounding::Floor);
    assert_eq!(
        (scale, unpack_block(&packed)[0], unpack_block(&packed)[1]),
        (127, 7, 15)
    );
    let (packed, scale) = quantize_block(&values, ScaleRounding::Up);
    // 7.9/2 = 3.95 → 4 (code 6); −7/2 = −3.5 is a tie between 3 and 4 → 4 (code 0xE).
    assert_eq!(
        (scale, unpack_block(&packed)[0], unpack_block(&packed)[1]),
        (128, 6, 0xE)
    );
}

#[test]
fn tiny_and_subnormal_blocks() {
    let sub = f32::from_bits(1); // 2^-149
                                 // All amax below 2^-125 clamp to X = 2^-127 (scale byte 0).
    for amax_bits in [
        1u32,
        2,
        3,
        0x0010_0000,
        0x003F_FFFF,
        0x0040_0000,
        0x007F_FFFF,
        0x0080_0000,
        0x00FF_FFFF,
        0x0100_0000 - 1,
    ] {
        let amax = f32::from_bits(amax_bits);
        let values = block_from(|i| {
            if i % 3 == 0 {
                amax
            } else {
                -amax * (i as f32) / 64.0
            }
        });
        for mode in MODES {
            let (_, scale) = check_block(&values, mode);
            assert_eq!(scale, 0, "{mode:?} amax {amax:e}");
        }
    }
    // 2^-129 = 0.25·2^-127 is a tie → 0; 3·2^-130 = 0.375·X → 0.5 (code 1); 2^-149 → 0 with sign.
    let mut values = [0f32; 32];
    values[0] = pow2(-129) as f32;
    values[1] = 3.0 * pow2(-130) as f32;
    values[2] = -sub;
    values[3] = 6.0 * pow2(-127) as f32;
    values[4] = 7.0 * pow2(-127) as f32; // Floor: floor(log2) = -125 → s = -127; 7 → 6
    let (codes, scale) = check_block(&values, ScaleRounding::Floor);
    assert_eq!((&codes[..5], scale), (&[0, 1, 8, 7, 7][..], 0));
    // Up: 7·2^-127 needs X = 2^-126 (byte 1): 0.125 → 0, 0.1875 → 0, 3 → 3, 3.5 (tie) → 4.
    let (codes, scale) = check_block(&values, ScaleRounding::Up);
    assert_eq!((&codes[..5], scale), (&[0, 0, 8, 5, 6][..], 1));
}

#[test]
fn huge_blocks_near_f32_max() {
    let values = block_from(|i| {
        if i == 0 {
            f32::MAX
        } else {
            -f32::MAX / (i as f32 + 1.0)
        }
    });
    let (_, floor) = check_block(&values, ScaleRounding::Floor);
    let (_, up) = check_block(&values, ScaleRounding::Up);
    assert_eq!((floor, up), (125 + 127, 126 + 127));
}

#[test]
fn zero_blocks_and_signed_zeros() {
    for mode in MODES {
        let (packed, scale) = quantize_block(&[0.0; 32], mode);
        assert_eq!((packed, scale), ([0; 16], 0));
        let (packed, scale) = quantize_block(&[-0.0; 32], mode);
        assert_eq!((packed, scale), ([0x88; 16], 0));
        let mixed = block_from(|i| if i % 2 == 0 { 0.0 } else { -0.0 });
        assert_eq!(quantize_block(&mixed, mode), ([0x80; 16], 0));
        // Tiny negatives next to a large value round to −0 (code 8).
        let v = block_from(|i| if i == 0 { 1.0 } else { -1e-9 });
        let (codes, _) = check_block(&v, mode);
        assert!(codes[1..].iter().all(|&c| c == 8));
    }
}

#[test]
fn non_finite_blocks_get_the_nan_scale() {
    for bad in [f32::NAN, -f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
        for pos in [0, 1, 15, 16, 31] {
            let mut values = block_from(|i| i as f32 - 10.0);
            values[pos] = bad;
            for mode in MODES {
                assert_eq!(
                    quantize_block(&values, mode),
                    ([0; 16], 0xFF),
                    "{bad} at {pos}"
                );
                check_block(&values, mode);
            }
        }
    }
}

#[test]
fn matrix_quantization_matches_blocks() {
    let mut r = rng(4);
    let (rows, k) = (37, 96 * 2);
    let data: Vec<f32> = (0..rows * k)
        .map(|i| {
            let top = (i / 32 % 50) as i32 - 25;
            random_f32(&mut r, (top - 6)..=top)
        })
        .collect();
    for mode in MODES {
        let m = quantize_matrix(&data, rows, k, mode).unwrap();
        assert_eq!(
            (m.rows, m.k, m.blocks.len(), m.scales.len()),
            (rows, k, rows * k / 2, rows * k / 32)
        );
        for (b, chunk) in data.chunks_exact(32).enumerate() {
            let (packed, scale) = quantize_block(chunk.try_into().unwrap(), mode);
            assert_eq!(&m.blocks[b * 16..b * 16 + 16], &packed[..]);
            assert_eq!(m.scales[b], scale);
        }
        // bf16 input: same as quantizing the widened values.
        let data_h: Vec<bf16> = data.iter().map(|&v| bf16::from_f32(v)).collect();
        let widened: Vec<f32> = data_h.iter().map(|v| v.to_f32()).collect();
        assert_eq!(
            quantize_matrix_bf16(&data_h, rows, k, mode).unwrap(),
            quantize_matrix(&widened, rows, k, mode).unwrap()
        );
    }
}

#[test]
fn matrix_quantization_errors_are_typed() {
    let data = vec![1f32; 4 * 64];
    assert_eq!(
        quantize_matrix(&data, 4, 48, ScaleRounding::Floor).unwrap_err(),
        Fp4Error::KNotMultipleOfBlock { k: 48 }
    );
    assert_eq!(
        quantize_matrix(&data[1..], 4, 64, ScaleRounding::Floor).unwrap_err(),
        Fp4Error::LengthMismatch {
            what: "f32 values to quantize",
            expected: 256,
            got: 255
        }
    );
    assert!(matches!(
        quantize_matrix(&data, usize::MAX, 64, ScaleRounding::Up),
        Err(Fp4Error::LengthMismatch { .. })
    ));
    assert!(matches!(
        quantize_matrix_bf16(&[bf16::ONE; 10], 1, 32, ScaleRounding::Up),
        Err(Fp4Error::LengthMismatch {
            expected: 32,
            got: 10,
            ..
        })
    ));
    // Several non-finite values: the first in row-major order is reported, whatever the
    // parallel schedule.
    let (rows, k) = (300, 64);
    let mut data = vec![0.5f32; rows * k];
    data[250 * k + 40] = f32::NAN;
    data[100 * k + 33] = f32::NEG_INFINITY;
    data[100 * k + 63] = f32::INFINITY;
    for mode in MODES {
        assert_eq!(
            quantize_matrix(&data, rows, k, mode).unwrap_err(),
            Fp4Error::NonFinite {
                row: 100,
                col: 33,
                value: f32::NEG_INFINITY
            }
        );
    }
    data[100 * k + 33] = 0.0;
    data[100 * k + 63] = 0.0;
    match quantize_matrix(&data, rows, k, ScaleRounding::Floor) {
        Err(Fp4Error::NonFinite {
            row: 250,
            col: 40,
            value,
        }) => assert!(value.is_nan()),
        other => panic!("expected NonFinite at (250, 40), got {other:?}"),
    }
    let mut h = vec![bf16::ONE; 2 * 32];
    h[45] = bf16::INFINITY;
    assert_eq!(
        quantize_matrix_bf16(&h, 2, 32, ScaleRounding::Up).unwrap_err(),
        Fp4Error::NonFinite {
            row: 1,
            col: 13,
            value: f32::INFINITY
        }
    );
    // Degenerate shapes are fine.
    assert_eq!(
        quantize_matrix(&[], 0, 64, ScaleRounding::Floor)
            .unwrap()
            .blocks
            .len(),
        0
    );
    assert_eq!(
        quantize_matrix(&[], 5, 0, ScaleRounding::Floor)
            .unwrap()
            .scales
            .len(),
        0
    );
}

/// A random valid block whose largest code magnitude index is `top` (0..=7).
fn random_block_codes(r: &mut impl Rng, top: u8) -> [u8; 32] {
    let mut codes: [u8; 32] =
        std::array::from_fn(|_| r.random_range(0..=top) | (r.random_range(0..2u8) << 3));
    codes[r.random_range(0..32)] = top | (r.random_range(0..2u8) << 3);
    codes
}

fn pack(codes: &[u8]) -> Vec<u8> {
    codes.chunks(2).map(|p| p[0] | (p[1] << 4)).collect()
}

/// quantize(dequantize(m)) == m exactly for the blocks whose largest magnitude is 4 or 6
/// (amax / X then lies in [4, 8) for Floor and (3, 6] for Up, so X is re-derived), and for
/// scale byte 0 (any smaller exponent would clamp back to −127); every other block changes
/// (its scale drops). Both modes have the same fixed points.
#[test]
fn fixed_points_of_quantize_after_dequantize() {
    let mut r = rng(5);
    let (rows, k) = (64, 128);
    for trial in 0..6 {
        let mut blocks = Vec::new();
        let mut scales = Vec::new();
        let mut top_of = Vec::new();
        for _ in 0..rows * k / 32 {
            let top = r.random_range(0..8u8);
            blocks.extend(pack(&random_block_codes(&mut r, top)));
            // Scale 0 often; otherwise up to 252 so that every value stays finite in f32.
            scales.push(if r.random_range(0..5) == 0 {
                0
            } else {
                r.random_range(1..=252u8)
            });
            top_of.push(top);
        }
        let m = MxMatrix {
            rows,
            k,
            blocks,
            scales,
        };
        let deq = cpu::dequantize(m.view().unwrap());
        for mode in MODES {
            let back = quantize_matrix(&deq, rows, k, mode).unwrap();
            let mut fixed = 0;
            for b in 0..rows * k / 32 {
                let same = back.scales[b] == m.scales[b]
                    && back.blocks[b * 16..b * 16 + 16] == m.blocks[b * 16..b * 16 + 16];
                let predicted = m.scales[b] == 0 || top_of[b] >= 6;
                assert_eq!(
                    same, predicted,
                    "trial {trial} {mode:?} block {b}: scale {}, top code {}",
                    m.scales[b], top_of[b]
                );
                if !same {
                    assert!(
                        back.scales[b] < m.scales[b],
                        "a changed block gets a smaller scale"
                    );
                }
                fixed += same as usize;
            }
            assert!(fixed > 0 && fixed < rows * k / 32);
            // Whatever the bytes, the values survive exactly (they are all representable).
            assert_eq!(cpu::dequantize(back.view().unwrap()), deq);
        }
    }
    // Scale bytes 253/254 hold values beyond f32 (≥ 2^128) for large codes: they decode to inf
    // and cannot be re-quantized.
    let m = MxMatrix {
        rows: 1,
        k: 32,
        blocks: pack(&[6; 32]),
        scales: vec![253],
    };
    let deq = cpu::dequantize(m.view().unwrap());
    assert!(deq.iter().all(|v| v.is_infinite()));
    assert!(matches!(
        quantize_matrix(&deq, 1, 32, ScaleRounding::Floor),
        Err(Fp4Error::NonFinite { row: 0, col: 0, .. })
    ));
}

/// Quantizing a dequantized quantization: Floor is idempotent on the bytes; Up is idempotent on
/// the values, and on the bytes exactly when its first result is a fixed point (it may give a
/// block whose largest magnitude is 3, e.g. amax/X = 3.2 → 3, which re-encodes as 6 · X/2).
#[test]
fn quantization_is_idempotent() {
    let mut r = rng(6);
    let (rows, k) = (50, 160);
    let data: Vec<f32> = (0..rows * k)
        .map(|_| random_f32(&mut r, -140..=120))
        .collect();
    for mode in MODES {
        let q1 = quantize_matrix(&data, rows, k, mode).unwrap();
        let d1 = cpu::dequantize(q1.view().unwrap());
        let q2 = quantize_matrix(&d1, rows, k, mode).unwrap();
        assert_eq!(
            cpu::dequantize(q2.view().unwrap()),
            d1,
            "{mode:?}: values are a fixed point"
        );
        let mut changed = 0;
        for b in 0..rows * k / 32 {
            let codes = common::unpack_block(&q1.blocks[b * 16..b * 16 + 16]);
            let top = codes.iter().map(|c| c & 7).max().unwrap();
            let fixed = q1.scales[b] == 0 || top >= 6;
            if mode == ScaleRounding::Floor {
                assert!(
                    fixed,
                    "Floor output is always a fixed point (top code {top})"
                );
            } else {
                assert!(
                    q1.scales[b] == 0 || top >= 5,
                    "Up: amax/X ∈ (3, 6] (top code {top})"
                );
            }
            let same = q2.scales[b] == q1.scales[b]
                && q2.blocks[b * 16..b * 16 + 16] == q1.blocks[b * 16..b * 16 + 16];
            assert_eq!(same, fixed, "{mode:?} block {b}");
            changed += !same as usize;
        }
        if mode == ScaleRounding::Up {
            assert!(changed > 0, "some Up blocks have top magnitude 3");
        }
    }
}

#[test]
fn dequantized_values_are_representable() {
    // Every value a quantizer outputs is code × 2^e with e ∈ [−127, 127].
    let mut r = rng(7);
    let data: Vec<f32> = (0..64 * 64)
        .map(|_| random_f32(&mut r, -150..=127))
        .collect();
    for mode in MODES {
        let q = quantize_matrix(&data, 64, 64, mode).unwrap();
        let w = q.view().unwrap();
        for row in 0..64 {
            for c in 0..64 {
                let v = w.get_f64(row, c);
                let ok =
                    v == 0.0 || (-127..=127).any(|e| MAGS.iter().any(|&m| m * pow2(e) == v.abs()));
                assert!(ok, "{v:e} not representable");
            }
        }
    }
}
