//! Exact decoding: every code under every scale byte, NaN scales, dequantize paths.

mod common;

use common::{e2m1_value, e8m0_value, element, random_matrix, rng};
use fp4::{cpu, e2m1_to_f32, e8m0_to_f32, e8m0_to_f64, Fp4Error, MxMatrix, MxMatrixRef};
use half::bf16;

/// One row per scale byte 0..=254; each row is one block whose element i has code i % 16.
fn all_codes_all_scales() -> MxMatrix {
    let rows = 255;
    let mut blocks = Vec::new();
    for _ in 0..rows {
        for j in 0..16u8 {
            let (lo, hi) = ((2 * j) % 16, (2 * j + 1) % 16);
            blocks.push(lo | (hi << 4));
        }
    }
    MxMatrix {
        rows,
        k: 32,
        blocks,
        scales: (0..=254).collect(),
    }
}

/// What an f32 decode must give for an exact value: itself, or ±inf beyond the f32 range.
fn expected_f32(exact: f64) -> f64 {
    if exact.abs() > f32::MAX as f64 {
        f64::INFINITY.copysign(exact)
    } else {
        exact
    }
}

#[test]
fn element_tables_match_bit_fields() {
    for code in 0u8..16 {
        let v = e2m1_to_f32(code);
        assert_eq!(v as f64, e2m1_value(code), "code {code:#x}");
        assert_eq!(v.is_sign_negative(), code >= 8, "sign of code {code:#x}");
        // Only the low nibble is read.
        assert_eq!(e2m1_to_f32(code | 0xF0).to_bits(), v.to_bits());
    }
    for s in 0u8..=254 {
        let want = e8m0_value(s).unwrap();
        assert_eq!(e8m0_to_f64(s), want, "scale {s}");
        assert_eq!(e8m0_to_f32(s) as f64, want, "scale {s}");
    }
    assert!(e8m0_to_f32(0xFF).is_nan() && e8m0_to_f64(0xFF).is_nan());
    assert_eq!(e8m0_value(0xFF), None);
}

#[test]
fn every_code_times_every_scale_decodes_exactly() {
    let m = all_codes_all_scales();
    let w = m.view().unwrap();
    let f = cpu::dequantize(w);
    let h = cpu::dequantize_bf16(w);
    let mut infinities = 0;
    for s in 0..=254u8 {
        let r = s as usize;
        for i in 0..32 {
            let code = (i % 16) as u8;
            let exact = e2m1_value(code) * e8m0_value(s).unwrap();
            let want = expected_f32(exact);
            let got = f[r * 32 + i];
            assert_eq!(got as f64, want, "scale {s} code {code:#x}");
            assert_eq!(
                got.is_sign_negative(),
                code >= 8,
                "sign, scale {s} code {code:#x}"
            );
            let got_h = h[r * 32 + i].to_f32();
            assert_eq!(got_h as f64, want, "bf16: scale {s} code {code:#x}");
            assert_eq!(got_h.is_sign_negative(), code >= 8);
            // The f64 accessor never overflows.
            assert_eq!(w.get_f64(r, i), exact);
            assert_eq!(element(&m, r, i), exact);
            if want.is_infinite() {
                infinities += 1;
            }
        }
    }
    // Beyond f32: |v| ≥ 2^128, i.e. |code| ≥ 2 at scale 254 (2, 3, 4, 6) and ≥ 4 at 253 (4, 6),
    // each for both signs and both copies of the code in the block.
    assert_eq!(infinities, (4 + 2) * 2 * 2);
    // The smallest nonzero magnitude, 0.5 · 2^-127 = 2^-128, is an exact f32 subnormal.
    assert_eq!(f[1], f32::from_bits(0x0020_0000));
    assert_eq!(f[9], -f32::from_bits(0x0020_0000));
}

#[test]
fn nan_scale_byte_is_rejected_everywhere() {
    let blocks = vec![0x21u8; 3 * 2 * 16];
    let mut scales = vec![127u8; 3 * 2];
    scales[3] = 0xFF;
    assert_eq!(
        MxMatrixRef::new(3, 64, &blocks, &scales).unwrap_err(),
        Fp4Error::NanScale { row: 1, block: 1 }
    );
    let m = MxMatrix {
        rows: 3,
        k: 64,
        blocks,
        scales,
    };
    assert_eq!(
        m.view().unwrap_err(),
        Fp4Error::NanScale { row: 1, block: 1 }
    );
    // What such a block means: E8M0 NaN times any code is NaN.
    for code in 0..16 {
        assert!((e2m1_to_f32(code) * e8m0_to_f32(0xFF)).is_nan());
    }
}

#[test]
fn dequantize_random_matrix_in_parallel() {
    let mut r = rng(11);
    // Big enough to split over several rayon tasks; all scale bytes.
    let m = random_matrix(&mut r, 300, 320, 0..=254);
    let w = m.view().unwrap();
    let f = cpu::dequantize(w);
    let h = cpu::dequantize_bf16(w);
    assert_eq!(f.len(), 300 * 320);
    for row in 0..300 {
        for c in 0..320 {
            let want = expected_f32(element(&m, row, c));
            assert_eq!(f[row * 320 + c] as f64, want, "({row}, {c})");
            assert_eq!(h[row * 320 + c].to_f32() as f64, want, "bf16 ({row}, {c})");
        }
    }
    let mut out = vec![1f32; 300 * 320];
    cpu::dequantize_into(w, &mut out).unwrap();
    assert_eq!(
        out.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
        f.iter().map(|v| v.to_bits()).collect::<Vec<_>>()
    );
}

#[test]
fn dequantize_output_length_is_checked() {
    let m = random_matrix(&mut rng(1), 2, 64, 100..=150);
    let w = m.view().unwrap();
    let mut short = vec![0f32; 127];
    assert_eq!(
        cpu::dequantize_into(w, &mut short).unwrap_err(),
        Fp4Error::LengthMismatch {
            what: "dequantize output",
            expected: 128,
            got: 127
        }
    );
    let mut long = vec![bf16::ZERO; 129];
    assert!(matches!(
        cpu::dequantize_bf16_into(w, &mut long),
        Err(Fp4Error::LengthMismatch {
            expected: 128,
            got: 129,
            ..
        })
    ));
}

#[test]
fn empty_matrices() {
    let w = MxMatrixRef::new(0, 64, &[], &[]).unwrap();
    assert!(cpu::dequantize(w).is_empty());
    let w = MxMatrixRef::new(3, 0, &[], &[]).unwrap();
    assert!(cpu::dequantize(w).is_empty());
    let mut y = vec![5f32; 3];
    cpu::gemv(w, &[], &mut y).unwrap();
    assert_eq!(y, vec![0.0; 3]);
}
