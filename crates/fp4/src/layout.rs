//! Packing orders of MXFP4 codes: the native gpt-oss order and the GGUF `block_mxfp4` order.
//!
//! This module owns the conversions between
//!
//! * one code per `u8` (element order) ↔ the packed gpt-oss order used everywhere else in this
//!   crate: byte j of a block holds element 2j in the low nibble and element 2j+1 in the high
//!   nibble ([`pack_codes`], [`unpack_codes`]);
//! * an [`MxMatrix`] (separate `[rows, K/32, 16]` codes and `[rows, K/32]` scales) ↔ GGUF
//!   `block_mxfp4` (llama.cpp `ggml-common.h`): an array of 17-byte blocks
//!   `{ e: u8, qs: [u8; 16] }` in row-major block order, where `e` is the same E8M0 byte and
//!   `qs[j]` holds element j in the low nibble and element j+16 in the high nibble
//!   ([`to_gguf`], [`from_gguf`]). Both directions are pure byte/nibble permutations, so they are
//!   lossless.

use rayon::prelude::*;

use crate::format::{Fp4Error, MxMatrix, MxMatrixRef, BLOCK, BLOCK_BYTES, E8M0_NAN};

/// Bytes of one GGUF `block_mxfp4` (`e` + 16 `qs` bytes).
pub const GGUF_BLOCK_BYTES: usize = 1 + BLOCK_BYTES;

/// Packs one code per byte into the gpt-oss order: output byte j = `codes[2j] | codes[2j+1] << 4`.
///
/// Only the low 4 bits of each code are used. An odd-length input leaves the high nibble of the
/// last byte 0.
pub fn pack_codes(codes: &[u8]) -> Vec<u8> {
    codes
        .chunks(2)
        .map(|p| (p[0] & 0x0F) | (p.get(1).map_or(0, |&h| h & 0x0F) << 4))
        .collect()
}

/// Unpacks gpt-oss-order bytes into one code per byte (`2 · bytes.len()` codes: low nibble
/// first).
pub fn unpack_codes(bytes: &[u8]) -> Vec<u8> {
    bytes.iter().flat_map(|&b| [b & 0x0F, b >> 4]).collect()
}

/// Converts the 16 code bytes of one block from gpt-oss order to GGUF `qs` order.
#[inline]
pub fn block_to_gguf_qs(block: &[u8; BLOCK_BYTES]) -> [u8; BLOCK_BYTES] {
    let mut codes = [0u8; BLOCK];
    for (j, &b) in block.iter().enumerate() {
        codes[2 * j] = b & 0x0F;
        codes[2 * j + 1] = b >> 4;
    }
    let mut qs = [0u8; BLOCK_BYTES];
    for (j, q) in qs.iter_mut().enumerate() {
        *q = codes[j] | (codes[j + BLOCK_BYTES] << 4);
    }
    qs
}

/// Converts the 16 `qs` bytes of one GGUF block to gpt-oss order (inverse of
/// [`block_to_gguf_qs`]).
#[inline]
pub fn block_from_gguf_qs(qs: &[u8; BLOCK_BYTES]) -> [u8; BLOCK_BYTES] {
    let mut codes = [0u8; BLOCK];
    for (j, &q) in qs.iter().enumerate() {
        codes[j] = q & 0x0F;
        codes[j + BLOCK_BYTES] = q >> 4;
    }
    let mut block = [0u8; BLOCK_BYTES];
    for (j, b) in block.iter_mut().enumerate() {
        *b = codes[2 * j] | (codes[2 * j + 1] << 4);
    }
    block
}

/// Serializes a matrix as GGUF `block_mxfp4` data: `rows · K/32` blocks of 17 bytes, row-major,
/// each `[e, qs[0..16]]`. Lossless.
pub fn to_gguf(m: MxMatrixRef<'_>) -> Vec<u8> {
    let nblocks = m.scales().len();
    let mut out = vec![0u8; nblocks * GGUF_BLOCK_BYTES];
    out.par_chunks_mut(GGUF_BLOCK_BYTES)
        .zip(m.blocks().par_chunks(BLOCK_BYTES))
        .zip(m.scales().par_iter())
        .with_min_len(1024)
        .for_each(|((dst, src), &e)| {
            dst[0] = e;
            let src: &[u8; BLOCK_BYTES] = src.try_into().expect("16-byte block");
            dst[1..].copy_from_slice(&block_to_gguf_qs(src));
        });
    out
}

/// Parses GGUF `block_mxfp4` data of a `rows × k` tensor (row-major blocks) into an
/// [`MxMatrix`] in gpt-oss order. Lossless inverse of [`to_gguf`].
///
/// Errors: `k % 32 != 0` → [`Fp4Error::KNotMultipleOfBlock`]; `bytes.len() != rows · K/32 · 17`
/// → [`Fp4Error::LengthMismatch`]; a block with `e == 0xFF` → [`Fp4Error::NanScale`] (the first
/// one, row-major).
pub fn from_gguf(bytes: &[u8], rows: usize, k: usize) -> Result<MxMatrix, Fp4Error> {
    if !k.is_multiple_of(BLOCK) {
        return Err(Fp4Error::KNotMultipleOfBlock { k });
    }
    let nb = k / BLOCK;
    let nblocks = rows.saturating_mul(nb);
    let expected = nblocks.saturating_mul(GGUF_BLOCK_BYTES);
    if bytes.len() != expected {
        return Err(Fp4Error::LengthMismatch {
            what: "GGUF block_mxfp4 bytes",
            expected,
            got: bytes.len(),
        });
    }
    if let Some(i) = bytes
        .chunks_exact(GGUF_BLOCK_BYTES)
        .position(|b| b[0] == E8M0_NAN)
    {
        return Err(Fp4Error::NanScale {
            row: i / nb,
            block: i % nb,
        });
    }
    let mut blocks = vec![0u8; nblocks * BLOCK_BYTES];
    let mut scales = vec![0u8; nblocks];
    blocks
        .par_chunks_mut(BLOCK_BYTES)
        .zip(scales.par_iter_mut())
        .zip(bytes.par_chunks(GGUF_BLOCK_BYTES))
        .with_min_len(1024)
        .for_each(|((dst, e), src)| {
            *e = src[0];
            let qs: &[u8; BLOCK_BYTES] = src[1..].try_into().expect("16 qs bytes");
            dst.copy_from_slice(&block_from_gguf_qs(qs));
        });
    Ok(MxMatrix {
        rows,
        k,
        blocks,
        scales,
    })
}
