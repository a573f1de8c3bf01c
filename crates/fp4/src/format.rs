//! The MXFP4 element and scale formats, and validated views over packed matrices.
//!
//! A row of K values is stored as K/32 blocks. Block `b` of row `r` has 16 code bytes at
//! `blocks[(r * K/32 + b) * 16 ..][..16]` (byte j: element 2j in the low nibble, element 2j+1 in
//! the high nibble — the gpt-oss checkpoint order) and one E8M0 scale byte at
//! `scales[r * K/32 + b]`. Value = `E2M1(code) × 2^(scale − 127)`.

use thiserror::Error;

/// Values per MXFP4 block (the OCP block size k = 32), along the reduction axis.
pub const BLOCK: usize = 32;
/// Packed code bytes per block (two E2M1 codes per byte).
pub const BLOCK_BYTES: usize = 16;
/// The E8M0 byte that encodes NaN.
pub const E8M0_NAN: u8 = 0xFF;

/// E2M1 code → value. Bit 3 is the sign, bits 2..1 the exponent (bias 1), bit 0 the mantissa.
/// Code 0x8 is −0.0.
pub const E2M1_VALUES: [f32; 16] = [
    0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0,
];

/// Decodes one E2M1 code (only the low 4 bits are read).
#[inline(always)]
pub fn e2m1_to_f32(code: u8) -> f32 {
    E2M1_VALUES[(code & 0x0F) as usize]
}

/// Decodes an E8M0 scale byte to f32: `2^(s − 127)`; `0xFF` → NaN. `s = 0` gives 2^−127, an f32
/// subnormal, which is exact.
#[inline(always)]
pub fn e8m0_to_f32(s: u8) -> f32 {
    match s {
        E8M0_NAN => f32::NAN,
        0 => f32::from_bits(0x0040_0000),
        _ => f32::from_bits((s as u32) << 23),
    }
}

/// Decodes an E8M0 scale byte to f64 (exact for every byte; `0xFF` → NaN).
#[inline]
pub fn e8m0_to_f64(s: u8) -> f64 {
    if s == E8M0_NAN {
        f64::NAN
    } else {
        f64::from_bits(((s as u64) + 1023 - 127) << 52)
    }
}

/// Everything that can be wrong with MXFP4 input.
///
/// Only `PartialEq` (not `Eq`): [`Fp4Error::NonFinite`] carries the offending `f32`, which may be
/// NaN (so such an error is not equal to itself; match on it with `matches!`).
#[derive(Debug, Clone, PartialEq, Error)]
pub enum Fp4Error {
    /// The reduction length is not a whole number of 32-value blocks.
    #[error("K = {k} is not a multiple of the MXFP4 block size 32")]
    KNotMultipleOfBlock { k: usize },
    /// A buffer's length disagrees with the shape it is supposed to hold.
    #[error("{what}: expected {expected} bytes/elements for the given shape, got {got}")]
    LengthMismatch {
        what: &'static str,
        expected: usize,
        got: usize,
    },
    /// Two shapes that must agree do not (e.g. blocks `[.., N, K/32, 16]` vs scales `[.., N, K/32]`).
    #[error("shape mismatch: {0}")]
    ShapeMismatch(String),
    /// A scale byte is 0xFF (NaN): the whole block would decode to NaN.
    #[error("NaN scale byte 0xFF at row {row}, block {block}")]
    NanScale { row: usize, block: usize },
    /// A value to quantize is NaN or ±inf.
    #[error("non-finite input value {value} at row {row}, column {col}")]
    NonFinite { row: usize, col: usize, value: f32 },
    /// An index (expert, row) is out of range.
    #[error("{what} index {index} out of range (< {len})")]
    OutOfRange {
        what: &'static str,
        index: usize,
        len: usize,
    },
    /// A small-batch GEMM was asked for a batch outside `1..=max`.
    #[error("batch {batch} out of range (supported: 1..={max})")]
    BatchOutOfRange { batch: usize, max: usize },
    /// A CPU kernel was requested explicitly that this machine cannot run (e.g. AVX2 on a CPU
    /// without it).
    #[error("CPU kernel {kernel} is not available on this machine")]
    KernelUnavailable { kernel: &'static str },
}

/// Checks the (rows, K) shape against buffer lengths; returns the number of blocks per row.
pub(crate) fn check_shape(
    rows: usize,
    k: usize,
    blocks_len: usize,
    scales_len: usize,
) -> Result<usize, Fp4Error> {
    if !k.is_multiple_of(BLOCK) {
        return Err(Fp4Error::KNotMultipleOfBlock { k });
    }
    let nb = k / BLOCK;
    let want_blocks = rows * nb * BLOCK_BYTES;
    if blocks_len != want_blocks {
        return Err(Fp4Error::LengthMismatch {
            what: "MXFP4 code bytes",
            expected: want_blocks,
            got: blocks_len,
        });
    }
    if scales_len != rows * nb {
        return Err(Fp4Error::LengthMismatch {
            what: "MXFP4 scale bytes",
            expected: rows * nb,
            got: scales_len,
        });
    }
    Ok(nb)
}

/// Returns the first NaN scale byte as an error.
pub(crate) fn check_scales(scales: &[u8], blocks_per_row: usize) -> Result<(), Fp4Error> {
    // `contains` is a vectorized byte search: this runs on every view of an expert matrix.
    if !scales.contains(&E8M0_NAN) {
        return Ok(());
    }
    match scales.iter().position(|&s| s == E8M0_NAN) {
        None => Ok(()),
        Some(i) => Err(Fp4Error::NanScale {
            row: i / blocks_per_row.max(1),
            block: i % blocks_per_row.max(1),
        }),
    }
}

/// A borrowed, validated MXFP4 matrix of `rows × k` values (row-major, K contiguous), e.g. one
/// expert's `gate_up_proj` straight out of an mmap'd checkpoint.
#[derive(Debug, Clone, Copy)]
pub struct MxMatrixRef<'a> {
    rows: usize,
    k: usize,
    blocks: &'a [u8],
    scales: &'a [u8],
}

impl<'a> MxMatrixRef<'a> {
    /// Validates shapes (K multiple of 32, `blocks.len() == rows·K/2`, `scales.len() == rows·K/32`)
    /// and rejects NaN scale bytes.
    pub fn new(
        rows: usize,
        k: usize,
        blocks: &'a [u8],
        scales: &'a [u8],
    ) -> Result<Self, Fp4Error> {
        let nb = check_shape(rows, k, blocks.len(), scales.len())?;
        check_scales(scales, nb)?;
        Ok(Self {
            rows,
            k,
            blocks,
            scales,
        })
    }

    /// [`MxMatrixRef::new`] without the scan for NaN scale bytes, for bytes the caller already
    /// validated with [`MxMatrixRef::new`] and has not changed since (a model checks its
    /// mapped expert matrices once, not on every product). Shapes are still checked. A NaN
    /// scale that slipped through only makes that block's outputs NaN.
    pub fn new_scales_checked(
        rows: usize,
        k: usize,
        blocks: &'a [u8],
        scales: &'a [u8],
    ) -> Result<Self, Fp4Error> {
        check_shape(rows, k, blocks.len(), scales.len())?;
        Ok(Self {
            rows,
            k,
            blocks,
            scales,
        })
    }

    /// Output rows (N).
    pub fn rows(&self) -> usize {
        self.rows
    }
    /// Reduction length (K).
    pub fn k(&self) -> usize {
        self.k
    }
    /// Blocks per row (K/32).
    pub fn blocks_per_row(&self) -> usize {
        self.k / BLOCK
    }
    /// All code bytes, `[rows, K/32, 16]`.
    pub fn blocks(&self) -> &'a [u8] {
        self.blocks
    }
    /// All scale bytes, `[rows, K/32]`.
    pub fn scales(&self) -> &'a [u8] {
        self.scales
    }
    /// Code bytes of one row (K/2 bytes).
    #[inline]
    pub fn row_blocks(&self, r: usize) -> &'a [u8] {
        let w = self.k / 2;
        &self.blocks[r * w..(r + 1) * w]
    }
    /// Scale bytes of one row (K/32 bytes).
    #[inline]
    pub fn row_scales(&self, r: usize) -> &'a [u8] {
        let nb = self.blocks_per_row();
        &self.scales[r * nb..(r + 1) * nb]
    }
    /// Bytes of packed weight data (codes + scales) — what a GEMV must read.
    pub fn nbytes(&self) -> usize {
        self.blocks.len() + self.scales.len()
    }
    /// Decodes element (r, c) exactly in f64.
    pub fn get_f64(&self, r: usize, c: usize) -> f64 {
        let byte = self.blocks[r * self.k / 2 + c / 2];
        let code = if c.is_multiple_of(2) {
            byte & 0x0F
        } else {
            byte >> 4
        };
        e2m1_to_f32(code) as f64 * e8m0_to_f64(self.scales[r * self.blocks_per_row() + c / BLOCK])
    }
}

/// An owned MXFP4 matrix (the output of quantization or layout conversion).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MxMatrix {
    pub rows: usize,
    pub k: usize,
    /// `[rows, K/32, 16]` code bytes, gpt-oss nibble order.
    pub blocks: Vec<u8>,
    /// `[rows, K/32]` E8M0 bytes.
    pub scales: Vec<u8>,
}

impl MxMatrix {
    /// Validated borrowed view.
    pub fn view(&self) -> Result<MxMatrixRef<'_>, Fp4Error> {
        MxMatrixRef::new(self.rows, self.k, &self.blocks, &self.scales)
    }
}

/// A borrowed stack of experts as in a gpt-oss checkpoint: blocks `[E, N, K/32, 16]`, scales
/// `[E, N, K/32]`.
#[derive(Debug, Clone, Copy)]
pub struct MxExpertsRef<'a> {
    experts: usize,
    rows: usize,
    k: usize,
    blocks: &'a [u8],
    scales: &'a [u8],
}

impl<'a> MxExpertsRef<'a> {
    /// Validates shapes and scale bytes of the whole stack.
    pub fn new(
        experts: usize,
        rows: usize,
        k: usize,
        blocks: &'a [u8],
        scales: &'a [u8],
    ) -> Result<Self, Fp4Error> {
        let nb = check_shape(experts * rows, k, blocks.len(), scales.len())?;
        check_scales(scales, nb)?;
        Ok(Self {
            experts,
            rows,
            k,
            blocks,
            scales,
        })
    }

    /// Builds the view from checkpoint tensor shapes: blocks `[E, N, G, 16]`, scales `[E, N, G]`.
    pub fn from_shapes(
        blocks_shape: &[usize],
        blocks: &'a [u8],
        scales_shape: &[usize],
        scales: &'a [u8],
    ) -> Result<Self, Fp4Error> {
        match (blocks_shape, scales_shape) {
            ([e, n, g, 16], [e2, n2, g2]) if e == e2 && n == n2 && g == g2 => {
                Self::new(*e, *n, g * BLOCK, blocks, scales)
            }
            _ => Err(Fp4Error::ShapeMismatch(format!(
                "expected blocks [E, N, G, 16] and scales [E, N, G], got blocks {blocks_shape:?} and scales {scales_shape:?}"
            ))),
        }
    }

    pub fn experts(&self) -> usize {
        self.experts
    }
    pub fn rows(&self) -> usize {
        self.rows
    }
    pub fn k(&self) -> usize {
        self.k
    }
    /// All code bytes `[E, N, K/32, 16]`.
    pub fn blocks(&self) -> &'a [u8] {
        self.blocks
    }
    /// All scale bytes `[E, N, K/32]`.
    pub fn scales(&self) -> &'a [u8] {
        self.scales
    }
    /// One expert's matrix (already validated, so no re-check).
    pub fn expert(&self, e: usize) -> Result<MxMatrixRef<'a>, Fp4Error> {
        if e >= self.experts {
            return Err(Fp4Error::OutOfRange {
                what: "expert",
                index: e,
                len: self.experts,
            });
        }
        let wb = self.rows * self.k / 2;
        let ws = self.rows * self.k / BLOCK;
        Ok(MxMatrixRef {
            rows: self.rows,
            k: self.k,
            blocks: &self.blocks[e * wb..(e + 1) * wb],
            scales: &self.scales[e * ws..(e + 1) * ws],
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn e8m0_decodes_every_byte_exactly() {
        for s in 0u8..=254 {
            let want = 2f64.powi(s as i32 - 127);
            assert_eq!(e8m0_to_f64(s), want, "s={s}");
            assert_eq!(e8m0_to_f32(s) as f64, want, "s={s}");
        }
        assert!(e8m0_to_f32(0xFF).is_nan());
        assert!(e8m0_to_f64(0xFF).is_nan());
    }

    #[test]
    fn e2m1_table_matches_bit_definition() {
        for code in 0u8..16 {
            let sign = if code & 8 != 0 { -1.0 } else { 1.0 };
            let e = (code >> 1) & 3;
            let m = (code & 1) as f64;
            let mag = if e == 0 {
                m * 0.5
            } else {
                2f64.powi(e as i32 - 1) * (1.0 + m / 2.0)
            };
            let v = e2m1_to_f32(code) as f64;
            assert_eq!(v, sign * mag, "code {code:#x}");
            assert_eq!(
                v.is_sign_negative(),
                code & 8 != 0,
                "sign of code {code:#x}"
            );
        }
    }

    #[test]
    fn shape_errors_are_typed() {
        assert_eq!(
            MxMatrixRef::new(2, 48, &[0; 48], &[127; 3]).unwrap_err(),
            Fp4Error::KNotMultipleOfBlock { k: 48 }
        );
        assert!(matches!(
            MxMatrixRef::new(2, 64, &[0; 63], &[127; 4]).unwrap_err(),
            Fp4Error::LengthMismatch { .. }
        ));
        assert!(matches!(
            MxMatrixRef::new(2, 64, &[0; 64], &[127; 5]).unwrap_err(),
            Fp4Error::LengthMismatch { .. }
        ));
        assert_eq!(
            MxMatrixRef::new(2, 64, &[0; 64], &[127, 127, 0xFF, 127]).unwrap_err(),
            Fp4Error::NanScale { row: 1, block: 0 }
        );
        assert!(matches!(
            MxExpertsRef::from_shapes(&[2, 3, 4, 16], &[0; 384], &[2, 3, 5], &[127; 30]),
            Err(Fp4Error::ShapeMismatch(_))
        ));
        let ex =
            MxExpertsRef::from_shapes(&[2, 3, 4, 16], &[0; 384], &[2, 3, 4], &[127; 24]).unwrap();
        assert_eq!((ex.experts(), ex.rows(), ex.k()), (2, 3, 128));
        assert!(matches!(ex.expert(2), Err(Fp4Error::OutOfRange { .. })));
    }
}
