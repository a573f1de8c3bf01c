//! Quantization of f32 / bf16 values to MXFP4 (OCP Microscaling v1.0, E2M1 elements, E8M0
//! scales, blocks of 32 along K).
//!
//! This module owns the choice of the shared block exponent ([`ScaleRounding`]), the rounding of
//! elements to E2M1 ([`quantize_block`]) and whole-matrix quantization into the gpt-oss packed
//! layout ([`quantize_matrix`], [`quantize_matrix_bf16`]).
//!
//! Everything is computed with exponent/bit arithmetic, never with `log2`/`powf`, so results
//! are exact for every finite f32 input, subnormals included:
//!
//! * `amax` is the largest `|v|` of the block, found by comparing the magnitude bit patterns.
//! * The shared exponent `s` (scale `X = 2^s`, stored as the E8M0 byte `s + 127`) is chosen by
//!   the [`ScaleRounding`] rule and clamped to `[-127, 127]`. For finite f32 input it never
//!   exceeds 126, so no finite block gets the NaN scale.
//! * Each element is divided by `X` (a multiplication by the power of two `2^-s`, exact
//!   whenever the quotient is ≥ 2^-126; smaller quotients round to code 0 anyway) and rounded
//!   to the nearest E2M1 magnitude {0, 0.5, 1, 1.5, 2, 3, 4, 6}, ties to the *even code*
//!   (0.25 → 0, 0.75 → 1, 1.25 → 1, 1.75 → 2, 2.5 → 2, 3.5 → 4, 5 → 4), saturating at 6.
//! * The sign bit is always kept: negative values that round to zero, and −0.0, give code
//!   0x8 (−0.0).

use half::bf16;
use rayon::prelude::*;

use crate::format::{Fp4Error, MxMatrix, BLOCK, BLOCK_BYTES, E8M0_NAN};

/// How the shared exponent of a block is chosen from its largest magnitude `amax`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum ScaleRounding {
    /// The OCP v1.0 rule (spec §6.3, microxcaling, torchao `FLOOR`, triton `ROUND_DOWN`,
    /// ggml): `s = floor(log2(amax)) − 2`, clamped to `[-127, 127]`. `amax / 2^s` lies in
    /// `[4, 8)`, so the largest elements of a block may be clipped to ±6 (saturation).
    /// An all-zero block gets `s = −127` (scale byte 0), as microxcaling's `FP32_MIN_NORMAL`
    /// guard gives (`floor(log2(tiny)) − 2` clamps to −127).
    #[default]
    Floor,
    /// Never clips: `s` is the smallest integer with `amax ≤ 6 · 2^s` (decided exactly from
    /// the bits of `amax`: with `amax = 1.f × 2^e`, `s = e − 2` if `1.f ≤ 1.5`, else `e − 1`),
    /// clamped to `[-127, 127]` (the clamp only ever raises `s`, so it cannot clip either).
    /// This is the exact form of triton's `ROUND_UP` / NVIDIA's RCEIL (`2^ceil(log2(amax/6))`)
    /// without the rounding of `amax / 6`. All-zero block → scale byte 0.
    Up,
}

/// The E8M0 byte of an all-zero block (`2^-127`).
const ZERO_BLOCK_SCALE: u8 = 0;

/// Shared exponent for a finite, nonzero `amax` given by its magnitude bits.
#[inline(always)]
fn shared_exponent(amax_bits: u32, rounding: ScaleRounding) -> i32 {
    debug_assert!(amax_bits != 0 && amax_bits < 0x7F80_0000);
    // amax = 1.frac × 2^e exactly (frac: 23 fraction bits).
    let (e, frac) = if amax_bits >= 0x0080_0000 {
        ((amax_bits >> 23) as i32 - 127, amax_bits & 0x007F_FFFF)
    } else {
        // Subnormal: amax = m × 2^-149 with 1 ≤ m < 2^23.
        let lz = amax_bits.leading_zeros(); // 9..=31
        let e = (31 - lz as i32) - 149;
        (e, (amax_bits << (lz - 8)) & 0x007F_FFFF)
    };
    let s = match rounding {
        ScaleRounding::Floor => e - 2,
        // 1.frac ≤ 1.5  ⇔  amax ≤ 6 · 2^(e−2).
        ScaleRounding::Up => {
            if frac <= 0x0040_0000 {
                e - 2
            } else {
                e - 1
            }
        }
    };
    s.clamp(-127, 127)
}

/// Rounds a non-negative quotient `a = |v| / X` (< 8) to the E2M1 magnitude code 0..=7:
/// nearest value, ties to the even code, saturating at 6.
#[inline(always)]
fn e2m1_magnitude_code(a: f32) -> u8 {
    (a > 0.25) as u8
        + (a >= 0.75) as u8
        + (a > 1.25) as u8
        + (a >= 1.75) as u8
        + (a > 2.5) as u8
        + (a >= 3.5) as u8
        + (a > 5.0) as u8
}

/// Quantizes one block of 32 values to MXFP4 with OCP semantics.
///
/// Returns the 16 packed code bytes (gpt-oss order: byte j holds element 2j in the low nibble
/// and element 2j+1 in the high nibble) and the E8M0 scale byte.
///
/// * Scale: see [`ScaleRounding`]; all-zero blocks (±0.0 only) get scale byte 0.
/// * Elements: `v / X` rounded to the nearest E2M1 value, ties to the even code, saturating at
///   ±6; the sign bit of `v` is kept, so tiny negatives and −0.0 become code 0x8 (−0.0).
/// * Subnormal inputs are handled exactly (bit arithmetic only); amax below `2^-125` clamps the
///   scale to `2^-127` (byte 0).
/// * If any value is NaN or ±inf the block is unrepresentable: the result is scale byte 0xFF
///   (E8M0 NaN, so the whole block decodes to NaN, as in the OCP spec / torchao) and all codes 0.
///   [`quantize_matrix`] reports such input as [`Fp4Error::NonFinite`] instead.
pub fn quantize_block(values: &[f32; BLOCK], rounding: ScaleRounding) -> ([u8; BLOCK_BYTES], u8) {
    let mut amax_bits = 0u32;
    for v in values {
        amax_bits = amax_bits.max(v.to_bits() & 0x7FFF_FFFF);
    }
    if amax_bits >= 0x7F80_0000 {
        return ([0; BLOCK_BYTES], E8M0_NAN);
    }
    let (s, scale) = if amax_bits == 0 {
        (-127, ZERO_BLOCK_SCALE)
    } else {
        let s = shared_exponent(amax_bits, rounding);
        (s, (s + 127) as u8)
    };
    // For finite f32 input s ≤ 126, so 2^-s is a normal f32 (biased exponent 1..=254).
    debug_assert!((-127..=126).contains(&s));
    let inv = f32::from_bits(((127 - s) as u32) << 23);
    let mut codes = [0u8; BLOCK];
    for (c, v) in codes.iter_mut().zip(values) {
        let bits = v.to_bits();
        let a = f32::from_bits(bits & 0x7FFF_FFFF) * inv;
        *c = e2m1_magnitude_code(a) | ((bits >> 28) & 8) as u8;
    }
    let mut packed = [0u8; BLOCK_BYTES];
    for (j, p) in packed.iter_mut().enumerate() {
        *p = codes[2 * j] | (codes[2 * j + 1] << 4);
    }
    (packed, scale)
}

/// Quantizes a row-major `rows × k` f32 matrix (blocks of 32 along k) into an [`MxMatrix`]
/// (gpt-oss layout). Rows are processed in parallel with rayon.
///
/// Errors: `k % 32 != 0` → [`Fp4Error::KNotMultipleOfBlock`]; `data.len() != rows·k` →
/// [`Fp4Error::LengthMismatch`]; any NaN/±inf → [`Fp4Error::NonFinite`] naming the first one in
/// row-major order (instead of silently producing a NaN block as [`quantize_block`] does).
pub fn quantize_matrix(
    data: &[f32],
    rows: usize,
    k: usize,
    rounding: ScaleRounding,
) -> Result<MxMatrix, Fp4Error> {
    quantize_rows(data, rows, k, rounding, "f32 values to quantize", |v| v)
}

/// [`quantize_matrix`] for bf16 input (every bf16 is exactly an f32, so the result is the same
/// as quantizing the widened values).
pub fn quantize_matrix_bf16(
    data: &[bf16],
    rows: usize,
    k: usize,
    rounding: ScaleRounding,
) -> Result<MxMatrix, Fp4Error> {
    quantize_rows(
        data,
        rows,
        k,
        rounding,
        "bf16 values to quantize",
        bf16::to_f32,
    )
}

fn quantize_rows<T: Copy + Sync>(
    data: &[T],
    rows: usize,
    k: usize,
    rounding: ScaleRounding,
    what: &'static str,
    widen: impl Fn(T) -> f32 + Sync,
) -> Result<MxMatrix, Fp4Error> {
    if !k.is_multiple_of(BLOCK) {
        return Err(Fp4Error::KNotMultipleOfBlock { k });
    }
    let expected = rows.saturating_mul(k);
    if data.len() != expected {
        return Err(Fp4Error::LengthMismatch {
            what,
            expected,
            got: data.len(),
        });
    }
    let nb = k / BLOCK;
    let mut blocks = vec![0u8; rows * nb * BLOCK_BYTES];
    let mut scales = vec![0u8; rows * nb];
    if nb > 0 && rows > 0 {
        // Roughly 16 Ki values per rayon task.
        let min_rows = (16384 / k).max(1);
        let first_bad = blocks
            .par_chunks_mut(nb * BLOCK_BYTES)
            .zip(scales.par_chunks_mut(nb))
            .zip(data.par_chunks(k))
            .enumerate()
            .with_min_len(min_rows)
            .filter_map(|(r, ((out_codes, out_scales), row))| {
                quantize_row(row, out_codes, out_scales, rounding, &widen).map(|c| (r, c))
            })
            .min_by_key(|&(r, c)| (r, c));
        if let Some((row, col)) = first_bad {
            return Err(Fp4Error::NonFinite {
                row,
                col,
                value: widen(data[row * k + col]),
            });
        }
    }
    Ok(MxMatrix {
        rows,
        k,
        blocks,
        scales,
    })
}

/// Quantizes one row; returns the column of its first non-finite value, if any.
fn quantize_row<T: Copy>(
    row: &[T],
    out_codes: &mut [u8],
    out_scales: &mut [u8],
    rounding: ScaleRounding,
    widen: &impl Fn(T) -> f32,
) -> Option<usize> {
    for (b, ((src, dst), scale)) in row
        .chunks_exact(BLOCK)
        .zip(out_codes.chunks_exact_mut(BLOCK_BYTES))
        .zip(out_scales.iter_mut())
        .enumerate()
    {
        let mut vals = [0f32; BLOCK];
        for (v, &s) in vals.iter_mut().zip(src) {
            *v = widen(s);
        }
        let (codes, s) = quantize_block(&vals, rounding);
        if s == E8M0_NAN {
            let i = vals.iter().position(|v| !v.is_finite()).unwrap_or(0);
            return Some(b * BLOCK + i);
        }
        dst.copy_from_slice(&codes);
        *scale = s;
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn magnitude_code_thresholds() {
        let cases = [
            (0.0, 0),
            (0.25, 0),
            (0.2500001, 1),
            (0.75, 2),
            (1.25, 2),
            (1.2500001, 3),
            (1.75, 4),
            (2.5, 4),
            (3.5, 6),
            (5.0, 6),
            (5.0000005, 7),
            (7.99, 7),
        ];
        for (a, c) in cases {
            assert_eq!(e2m1_magnitude_code(a), c, "a = {a}");
        }
    }

    #[test]
    fn shared_exponent_of_subnormals() {
        // 2^-149 (bits 1): e = -149 → clamps to -127 either way.
        assert_eq!(shared_exponent(1, ScaleRounding::Floor), -127);
        assert_eq!(shared_exponent(1, ScaleRounding::Up), -127);
        // Largest subnormal: e = -127, frac all ones.
        assert_eq!(shared_exponent(0x007F_FFFF, ScaleRounding::Floor), -127);
        // 1.0: e = 0.
        assert_eq!(shared_exponent(1.0f32.to_bits(), ScaleRounding::Floor), -2);
        assert_eq!(shared_exponent(1.5f32.to_bits(), ScaleRounding::Up), -2);
        assert_eq!(
            shared_exponent(1.5f32.next_up().to_bits(), ScaleRounding::Up),
            -1
        );
    }
}
