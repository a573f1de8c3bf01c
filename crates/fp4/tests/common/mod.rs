//! Test helpers written independently of the crate's tables and bit tricks: E2M1/E8M0 decoding
//! from the bit fields, a straightforward f64 reference quantizer, random matrices.
#![allow(dead_code)]

use fp4::MxMatrix;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

pub fn rng(seed: u64) -> ChaCha8Rng {
    ChaCha8Rng::seed_from_u64(seed)
}

/// 2^e in f64 for |e| ≤ 600, from a table built once by repeated doubling/halving (exact).
pub fn pow2(e: i32) -> f64 {
    static TABLE: std::sync::OnceLock<Vec<f64>> = std::sync::OnceLock::new();
    let t = TABLE.get_or_init(|| {
        let mut t = vec![0.0; 1201];
        t[600] = 1.0;
        for i in 1..=600 {
            t[600 + i] = t[600 + i - 1] * 2.0;
            t[600 - i] = t[600 - i + 1] / 2.0;
        }
        t
    });
    t[(e + 600) as usize]
}

/// E2M1 value from its bit fields: sign bit 3, exponent bits 2..1 (bias 1), mantissa bit 0;
/// exponent 0 is subnormal (`m · 2^(1−1) · 0.5`).
pub fn e2m1_value(code: u8) -> f64 {
    let sign = if code & 0b1000 != 0 { -1.0 } else { 1.0 };
    let e = ((code >> 1) & 0b11) as i32;
    let m = (code & 1) as f64;
    let mag = if e == 0 {
        m / 2.0
    } else {
        pow2(e - 1) * (1.0 + m / 2.0)
    };
    sign * mag
}

/// E8M0 value from its byte: `2^(s − 127)`, `None` for the NaN byte 0xFF.
pub fn e8m0_value(s: u8) -> Option<f64> {
    (s != 0xFF).then(|| pow2(s as i32 - 127))
}

/// Unpacks a gpt-oss-order block (byte j: element 2j low nibble, 2j+1 high nibble).
pub fn unpack_block(bytes: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(bytes.len() * 2);
    for &b in bytes {
        out.push(b % 16);
        out.push(b / 16);
    }
    out
}

/// Exact f64 value of element (r, c) of a matrix, from the raw bytes.
pub fn element(m: &MxMatrix, r: usize, c: usize) -> f64 {
    let nb = m.k / 32;
    let byte = m.blocks[r * m.k / 2 + c / 2];
    let code = if c.is_multiple_of(2) {
        byte % 16
    } else {
        byte / 16
    };
    e2m1_value(code) * e8m0_value(m.scales[r * nb + c / 32]).expect("no NaN scales")
}

/// The 8 E2M1 magnitudes in code order.
pub const MAGS: [f64; 8] = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0];

/// Reference quantization of one block, straight from the spec, in f64:
/// returns (32 codes in element order, scale byte).
pub fn ref_quantize_block(values: &[f32], up: bool) -> (Vec<u8>, u8) {
    assert_eq!(values.len(), 32);
    if values.iter().any(|v| !v.is_finite()) {
        return (vec![0; 32], 0xFF);
    }
    let amax = values.iter().map(|&v| (v as f64).abs()).fold(0.0, f64::max);
    let shared: i32 = if amax == 0.0 {
        -127
    } else {
        // floor(log2(amax)) by search over exact powers of two.
        let mut e = 0i32;
        while pow2(e) > amax {
            e -= 1;
        }
        while pow2(e + 1) <= amax {
            e += 1;
        }
        if !up {
            e - 2 // − emax(E2M1)
        } else {
            // Smallest s with amax ≤ 6 · 2^s, searching down from one that surely works.
            let mut s = e + 1;
            while amax <= 6.0 * pow2(s - 1) {
                s -= 1;
            }
            s
        }
    };
    let shared = shared.clamp(-127, 127);
    let x = pow2(shared);
    let codes = values
        .iter()
        .map(|&v| {
            let q = (v as f64).abs() / x; // exact: f64 has the range and bits
                                          // Nearest magnitude; on a tie the even code index wins.
            let mut best = 0usize;
            for (i, &m) in MAGS.iter().enumerate() {
                let (d, db) = ((q - m).abs(), (q - MAGS[best]).abs());
                if d < db || (d == db && i % 2 == 0) {
                    best = i;
                }
            }
            let sign = if v.is_sign_negative() { 8 } else { 0 };
            best as u8 | sign
        })
        .collect();
    (codes, (shared + 127) as u8)
}

/// A random valid matrix: uniform code bytes, scale bytes uniform in `scale_range`.
pub fn random_matrix(
    rng: &mut ChaCha8Rng,
    rows: usize,
    k: usize,
    scale_range: std::ops::RangeInclusive<u8>,
) -> MxMatrix {
    let blocks = (0..rows * k / 2).map(|_| rng.random()).collect();
    let scales = (0..rows * k / 32)
        .map(|_| rng.random_range(scale_range.clone()))
        .collect();
    MxMatrix {
        rows,
        k,
        blocks,
        scales,
    }
}

/// A random finite f32 with a random sign, a uniform mantissa and an exponent in `exps`
/// (values below −126 produce subnormals/zero by exact scaling in f64 first).
pub fn random_f32(rng: &mut ChaCha8Rng, exps: std::ops::RangeInclusive<i32>) -> f32 {
    let m: f64 = 1.0 + rng.random::<f64>();
    let e = rng.random_range(exps);
    let v = ((m * pow2(e)) as f32).min(f32::MAX); // m·2^127 may round up to inf
    if rng.random() {
        -v
    } else {
        v
    }
}
