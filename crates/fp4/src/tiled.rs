//! The GPU GEMV's weight layout ("tiled"), built once at upload from the checkpoint layout.
//!
//! The GEMV kernel has each warp multiply 16 rows × 4 blocks (128 values of K) per step; lane
//! (g, t) needs block t of rows g and g+8. In the checkpoint layout those 16-byte blocks lie in 16
//! rows K/2 bytes apart, so every load instruction touches 8 scattered 64-byte pieces. Here each
//! such tile is one contiguous 1 KiB chunk in lane order — rows 0..7 (512 B) then rows 8..15, each
//! half `[g][t]` — so a warp's load instruction reads 512 contiguous bytes. The tile's 64 scale
//! bytes follow the same order (`[row 0..16][t]`).
//!
//! Shapes are padded to whole tiles: rows to a multiple of 16, K to a multiple of 128. Padding
//! codes are 0 (the value +0) with scale byte 0, so padding contributes exactly 0.
//! Tile order: `[expert][row group][K tile]`.

use crate::format::{Fp4Error, MxExpertsRef, MxMatrix, BLOCK, BLOCK_BYTES};

/// Rows per tile.
pub const TILE_ROWS: usize = 16;
/// 32-value blocks per tile.
pub const TILE_BLOCKS: usize = 4;
/// Code bytes per tile.
pub const TILE_CODE_BYTES: usize = TILE_ROWS * TILE_BLOCKS * BLOCK_BYTES;
/// Scale bytes per tile.
pub const TILE_SCALE_BYTES: usize = TILE_ROWS * TILE_BLOCKS;

/// The tiled shape of a stack of `experts` matrices of `rows × k`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TiledShape {
    pub experts: usize,
    pub rows: usize,
    pub k: usize,
}

impl TiledShape {
    pub fn row_groups(&self) -> usize {
        self.rows.div_ceil(TILE_ROWS)
    }
    pub fn k_tiles(&self) -> usize {
        (self.k / BLOCK).div_ceil(TILE_BLOCKS)
    }
    pub fn tiles_per_expert(&self) -> usize {
        self.row_groups() * self.k_tiles()
    }
    pub fn code_bytes(&self) -> usize {
        self.experts * self.tiles_per_expert() * TILE_CODE_BYTES
    }
    pub fn scale_bytes(&self) -> usize {
        self.experts * self.tiles_per_expert() * TILE_SCALE_BYTES
    }
    /// (code offset, scale offset) of block `b` of row `row` of expert `e`.
    #[inline]
    pub fn offsets(&self, e: usize, row: usize, b: usize) -> (usize, usize) {
        let tile = (e * self.row_groups() + row / TILE_ROWS) * self.k_tiles() + b / TILE_BLOCKS;
        let r16 = row % TILE_ROWS;
        let t = b % TILE_BLOCKS;
        let lane_slot = (r16 / 8) * 32 + (r16 % 8) * TILE_BLOCKS + t;
        (
            tile * TILE_CODE_BYTES + lane_slot * BLOCK_BYTES,
            tile * TILE_SCALE_BYTES + r16 * TILE_BLOCKS + t,
        )
    }
}

/// Checkpoint layout → tiled layout: `(codes, scales)`.
pub fn tile(w: MxExpertsRef<'_>) -> (TiledShape, Vec<u8>, Vec<u8>) {
    let shape = TiledShape {
        experts: w.experts(),
        rows: w.rows(),
        k: w.k(),
    };
    let nb = shape.k / BLOCK;
    let mut codes = vec![0u8; shape.code_bytes()];
    let mut scales = vec![0u8; shape.scale_bytes()];
    for e in 0..shape.experts {
        for r in 0..shape.rows {
            let src_row = (e * shape.rows + r) * nb;
            for b in 0..nb {
                let (co, so) = shape.offsets(e, r, b);
                let src = (src_row + b) * BLOCK_BYTES;
                codes[co..co + BLOCK_BYTES].copy_from_slice(&w.blocks()[src..src + BLOCK_BYTES]);
                scales[so] = w.scales()[src_row + b];
            }
        }
    }
    (shape, codes, scales)
}

/// Tiled layout → checkpoint layout of expert `e` (the inverse of [`tile`]).
pub fn untile_expert(
    shape: TiledShape,
    codes: &[u8],
    scales: &[u8],
    e: usize,
) -> Result<MxMatrix, Fp4Error> {
    if codes.len() != shape.code_bytes() || scales.len() != shape.scale_bytes() {
        return Err(Fp4Error::LengthMismatch {
            what: "tiled MXFP4 buffers",
            expected: shape.code_bytes() + shape.scale_bytes(),
            got: codes.len() + scales.len(),
        });
    }
    if e >= shape.experts {
        return Err(Fp4Error::OutOfRange {
            what: "expert",
            index: e,
            len: shape.experts,
        });
    }
    let nb = shape.k / BLOCK;
    let mut m = MxMatrix {
        rows: shape.rows,
        k: shape.k,
        blocks: vec![0u8; shape.rows * shape.k / 2],
        scales: vec![0u8; shape.rows * nb],
    };
    for r in 0..shape.rows {
        for b in 0..nb {
            let (co, so) = shape.offsets(e, r, b);
            let dst = (r * nb + b) * BLOCK_BYTES;
            m.blocks[dst..dst + BLOCK_BYTES].copy_from_slice(&codes[co..co + BLOCK_BYTES]);
            m.scales[r * nb + b] = scales[so];
        }
    }
    Ok(m)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tile_round_trips_and_pads_with_zeros() {
        let (experts, rows, k) = (3, 37, 160); // rows and K/32 = 5 both ragged
        let blocks: Vec<u8> = (0..experts * rows * k / 2)
            .map(|i| (i * 7 + 3) as u8)
            .collect();
        let scales: Vec<u8> = (0..experts * rows * k / 32)
            .map(|i| (100 + i % 50) as u8)
            .collect();
        let w = MxExpertsRef::new(experts, rows, k, &blocks, &scales).unwrap();
        let (shape, tc, ts) = tile(w);
        assert_eq!(shape.row_groups(), 3);
        assert_eq!(shape.k_tiles(), 2);
        for e in 0..experts {
            let m = untile_expert(shape, &tc, &ts, e).unwrap();
            let orig = w.expert(e).unwrap();
            assert_eq!(m.blocks, orig.blocks());
            assert_eq!(m.scales, orig.scales());
        }
        // Everything not written by a real block is zero padding.
        let real_codes = experts * rows * k / 2;
        let nonzero_possible = tc.len() - real_codes;
        assert!(nonzero_possible > 0);
        let (co, _) = shape.offsets(0, 36, 4); // last real block of expert 0
        let (pad, pad_s) = shape.offsets(0, 36, 5); // K padding of the same row
        assert!(pad != co);
        assert!(tc[pad..pad + 16].iter().all(|&b| b == 0));
        assert_eq!(ts[pad_s], 0);
        assert!(untile_expert(shape, &tc, &ts, 3).is_err());
        assert!(untile_expert(shape, &tc[1..], &ts, 0).is_err());
    }

    #[test]
    fn experts_are_contiguous() {
        // `DeviceMxExperts::download_expert` copies one expert's tiles as one range.
        let shape = TiledShape {
            experts: 3,
            rows: 37,
            k: 160,
        };
        let one = TiledShape {
            experts: 1,
            ..shape
        };
        for e in 0..3 {
            for (r, b) in [(0, 0), (17, 3), (36, 4)] {
                let (c, s) = shape.offsets(e, r, b);
                let (c1, s1) = one.offsets(0, r, b);
                assert_eq!(c, e * one.code_bytes() + c1);
                assert_eq!(s, e * one.scale_bytes() + s1);
            }
        }
    }

    #[test]
    fn a_warp_load_is_contiguous() {
        let shape = TiledShape {
            experts: 1,
            rows: 16,
            k: 128,
        };
        // lane (g, t) at row g, block t → slot g*4 + t: 32 lanes cover 512 contiguous bytes.
        let mut offs: Vec<usize> = (0..8)
            .flat_map(|g| (0..4).map(move |t| shape.offsets(0, g, t).0))
            .collect();
        offs.sort();
        assert_eq!(offs, (0..32).map(|i| i * 16).collect::<Vec<_>>());
    }
}
