//! Dense projections from FP8 (e4m3, 128×128 block scales) and BF16 weights on the GPU
//! (`kernels/proj.cu`): the device matrix in the kernels' tiled layout ([`ProjMatrix`], uploaded
//! as FP8 or BF16 — never widened) and the launch wrapper [`ProjOps::linear`], GEMV for one token
//! and the small-batch kernels (verify blocks, batched decode) for 2..=16, with the optional bias
//! and residual add of [`super::Ops::linear`].
//!
//! The layout (`kernels/NOTES.md`, "Dense projections"): rows in groups of
//! [`PROJ_TILE_ROWS`] (16), columns in tiles of 32 bytes per row (32 FP8 or 16 BF16 values), one
//! 512-byte tile per (row group, column tile) stored in lane order, group-major; rows and columns
//! are padded with zero weights to whole tiles. [`tile_layout`] is the host repacking.
//!
//! Numerics: weights decode exactly to f32, activations are f32, products and sums are f32
//! (per lane, then across the two lane halves, then across warps in order); FP8 partial sums of
//! one 32-column tile are multiplied by their block's scale. Deterministic (no atomics).

use std::sync::Arc;

use cudarc::driver::{CudaContext, CudaFunction, CudaStream};
use half::bf16;
use model::weights::{Mat, MatData};

use super::{check_len, check_tokens, invalid, launch_with_smem, token_bucket, u32_arg, Arg};
use crate::abi::{FP8_BLOCK, MAX_TOKENS, PROJ_MAX_THREADS, PROJ_TILE_ROWS};
use crate::arena::{Arena, DPtr};
use crate::RuntimeError;

/// Token buckets of the kernels (`proj_*_t{T}`): a pass of `t` tokens uses the smallest ≥ t.
const TOKENS: [usize; 5] = [1, 2, 4, 8, 16];
/// Row groups per CTA of the kernels (`proj_*_r{R}`).
const GROUPS: [usize; 2] = [1, 2];
/// Tiles of each row group a lane has in flight (the kernels' `U`).
const TILES_IN_FLIGHT: usize = 4;
/// Warp counts the launcher considers (most first).
const WARPS: [usize; 3] = [16, 8, 4];

/// Bytes of one row of one tile.
const TILE_ROW_BYTES: usize = 32;

/// The weight type of a [`ProjMatrix`].
#[derive(Debug, Clone, Copy)]
pub enum ProjData {
    /// e4m3 codes in the tiled layout, and the `[ceil(rows/128), ceil(cols/128)]` block scales
    /// (`weight_scale_inv`: value = e4m3(code) · scale), row-major.
    Fp8 { tiles: DPtr<u8>, scales: DPtr<f32> },
    /// bf16 values in the tiled layout.
    Bf16 { tiles: DPtr<bf16> },
}

/// A dense `[rows, cols]` weight (`y = W·x`) in the projection kernels' tiled layout.
#[derive(Debug, Clone, Copy)]
pub struct ProjMatrix {
    pub data: ProjData,
    pub rows: usize,
    pub cols: usize,
}

/// Columns per tile: 32 FP8 or 16 BF16 values (32 bytes of one row).
pub fn tile_cols(fp8: bool) -> usize {
    if fp8 {
        TILE_ROW_BYTES
    } else {
        TILE_ROW_BYTES / 2
    }
}

/// Elements of the tiled layout of a `[rows, cols]` matrix with `kt` columns per tile.
pub fn tiled_len(rows: usize, cols: usize, kt: usize) -> usize {
    rows.div_ceil(PROJ_TILE_ROWS) * PROJ_TILE_ROWS * cols.div_ceil(kt) * kt
}

/// Repacks a row-major `[rows, cols]` matrix into the tiled layout with `kt` columns per tile
/// (`tile_cols`): tile (g, c) holds rows `16g..16g+16` × columns `c·kt..(c+1)·kt`, lane `l` of it
/// the `kt / 2` values of row `16g + (l & 15)` starting at column `c·kt + (l >> 4)·kt/2`; tiles
/// group-major. Padding is `T::default()` (zero).
pub fn tile_layout<T: Copy + Default>(v: &[T], rows: usize, cols: usize, kt: usize) -> Vec<T> {
    assert_eq!(v.len(), rows * cols, "tile_layout: shape");
    let ct = cols.div_ceil(kt);
    let half = kt / 2;
    let mut out = vec![T::default(); tiled_len(rows, cols, kt)];
    for (r, row) in v.chunks_exact(cols.max(1)).enumerate().take(rows) {
        let (g, rl) = (r / PROJ_TILE_ROWS, r % PROJ_TILE_ROWS);
        for (c, piece) in row.chunks(half).enumerate() {
            let (tc, h) = (c / 2, c % 2);
            let lane = h * PROJ_TILE_ROWS + rl;
            let at = ((g * ct + tc) * 32 + lane) * half;
            out[at..at + piece.len()].copy_from_slice(piece);
        }
    }
    out
}

impl ProjMatrix {
    /// Uploads FP8 e4m3 `codes` `[rows, cols]` (row-major) with their 128×128 block `scales`
    /// `[ceil(rows/128), ceil(cols/128)]` (f32, the checkpoint's `weight_scale_inv`).
    pub fn upload_fp8(
        arena: &mut Arena,
        codes: &[u8],
        scales: &[f32],
        rows: usize,
        cols: usize,
        what: &str,
    ) -> Result<Self, RuntimeError> {
        check_shape(what, rows, cols)?;
        if codes.len() != rows * cols {
            return Err(invalid(format!(
                "{what}: {} FP8 codes for a {rows}x{cols} matrix",
                codes.len()
            )));
        }
        let want = rows.div_ceil(FP8_BLOCK) * cols.div_ceil(FP8_BLOCK);
        if scales.len() != want {
            return Err(invalid(format!(
                "{what}: {} block scales for a {rows}x{cols} matrix with {FP8_BLOCK}x{FP8_BLOCK} \
                 blocks ({want} needed)",
                scales.len()
            )));
        }
        let tiled = tile_layout(codes, rows, cols, tile_cols(true));
        Ok(Self {
            data: ProjData::Fp8 {
                tiles: arena.upload(&tiled, what)?,
                scales: arena.upload(scales, what)?,
            },
            rows,
            cols,
        })
    }

    /// Uploads a row-major bf16 `[rows, cols]` matrix.
    pub fn upload_bf16(
        arena: &mut Arena,
        values: &[bf16],
        rows: usize,
        cols: usize,
        what: &str,
    ) -> Result<Self, RuntimeError> {
        check_shape(what, rows, cols)?;
        if values.len() != rows * cols {
            return Err(invalid(format!(
                "{what}: {} values for a {rows}x{cols} matrix",
                values.len()
            )));
        }
        let tiled = tile_layout(values, rows, cols, tile_cols(false));
        Ok(Self {
            data: ProjData::Bf16 {
                tiles: arena.upload(&tiled, what)?,
            },
            rows,
            cols,
        })
    }

    /// Uploads a checkpoint weight stored as FP8 e4m3 with 128×128 block scales or as bf16, in
    /// its stored dtype. Other dtypes and other FP8 scale blocks are refused (the dense
    /// `DeviceMatrix` takes them).
    pub fn from_mat(arena: &mut Arena, m: &Mat, what: &str) -> Result<Self, RuntimeError> {
        match m.data() {
            MatData::Bf16(v) => Self::upload_bf16(arena, v, m.rows, m.cols, what),
            MatData::F8E4M3 {
                codes,
                scales: Some(s),
            } if s.block == [FP8_BLOCK, FP8_BLOCK] => {
                Self::upload_fp8(arena, codes, s.values, m.rows, m.cols, what)
            }
            MatData::F8E4M3 { scales: Some(s), .. } => Err(RuntimeError::Unsupported(format!(
                "{what}: FP8 block scales of {:?} (the projection kernels take {FP8_BLOCK}x{FP8_BLOCK})",
                s.block
            ))),
            MatData::F8E4M3 { scales: None, .. } => Err(RuntimeError::Unsupported(format!(
                "{what}: FP8 without block scales (the projection kernels take \
                 {FP8_BLOCK}x{FP8_BLOCK} block-scaled FP8)"
            ))),
            MatData::F32(_) | MatData::F16(_) => Err(RuntimeError::Unsupported(format!(
                "{what}: the projection kernels take FP8 or bf16 weights, not f32 / f16"
            ))),
        }
    }

    /// Device buffers for a `[rows, cols]` matrix in the tiled layout, zeroed (benchmarks fill
    /// them on the device); `fp8` selects the weight type.
    pub fn alloc(
        arena: &mut Arena,
        fp8: bool,
        rows: usize,
        cols: usize,
        what: &str,
    ) -> Result<Self, RuntimeError> {
        check_shape(what, rows, cols)?;
        let len = tiled_len(rows, cols, tile_cols(fp8));
        let data = if fp8 {
            ProjData::Fp8 {
                tiles: arena.alloc(len, what)?,
                scales: arena.alloc(rows.div_ceil(FP8_BLOCK) * cols.div_ceil(FP8_BLOCK), what)?,
            }
        } else {
            ProjData::Bf16 {
                tiles: arena.alloc(len, what)?,
            }
        };
        Ok(Self { data, rows, cols })
    }

    /// Whether the weights are FP8.
    pub fn is_fp8(&self) -> bool {
        matches!(self.data, ProjData::Fp8 { .. })
    }

    /// Bytes a pass streams: the tiled weights (padding included) and the FP8 scales.
    pub fn bytes(&self) -> usize {
        match self.data {
            ProjData::Fp8 { tiles, scales } => tiles.bytes() + scales.bytes(),
            ProjData::Bf16 { tiles } => tiles.bytes(),
        }
    }

    /// Bytes of the weights as stored in the checkpoint (no padding): the minimum a pass moves.
    pub fn logical_bytes(&self) -> usize {
        match self.data {
            ProjData::Fp8 { scales, .. } => self.rows * self.cols + scales.bytes(),
            ProjData::Bf16 { .. } => 2 * self.rows * self.cols,
        }
    }
}

fn check_shape(what: &str, rows: usize, cols: usize) -> Result<(), RuntimeError> {
    if rows == 0 || cols == 0 {
        return Err(invalid(format!("{what}: {rows}x{cols} weight")));
    }
    u32_arg(
        &format!("{what} rows"),
        rows.next_multiple_of(PROJ_TILE_ROWS),
    )?;
    u32_arg(
        &format!("{what} cols"),
        cols.next_multiple_of(TILE_ROW_BYTES),
    )?;
    Ok(())
}

/// How one projection is launched: row groups per CTA and warps per CTA.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProjLaunch {
    /// Row groups (of 16 rows) per CTA: 1 or 2.
    pub groups: usize,
    /// Warps per CTA (1..=16), splitting the columns.
    pub warps: usize,
}

/// The projection kernels of `kernels/proj.cu`.
pub struct ProjOps {
    /// `[token bucket][groups index]` for FP8 and BF16.
    fp8: Vec<Vec<CudaFunction>>,
    bf16: Vec<Vec<CudaFunction>>,
    /// Resident CTAs per SM of each kernel at each warp count of [`WARPS`]
    /// (`[fp8?][bucket][groups][warps index]`), from the occupancy calculator at load.
    occupancy: [[[[u32; WARPS.len()]; GROUPS.len()]; TOKENS.len()]; 2],
    sms: usize,
}

/// Dynamic shared memory of one CTA: the partial sums `[warps][groups][T][16]`.
fn smem_bytes(warps: usize, groups: usize, tt: usize) -> usize {
    warps * groups * tt * PROJ_TILE_ROWS * 4
}

impl ProjOps {
    /// Loads the kernels into `ctx`.
    pub fn load(ctx: &Arc<CudaContext>) -> Result<Self, RuntimeError> {
        let set = ultra_kernels::load_set(ctx, &[ultra_kernels::PROJ])?;
        let sms = ctx.attribute(
            cudarc::driver::sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT,
        )? as usize;
        let mut occupancy = [[[[0u32; WARPS.len()]; GROUPS.len()]; TOKENS.len()]; 2];
        let mut tables = [Vec::new(), Vec::new()];
        for (ti, ty) in ["fp8", "bf16"].iter().enumerate() {
            for (bi, tt) in TOKENS.iter().enumerate() {
                let mut row = Vec::new();
                for (gi, g) in GROUPS.iter().enumerate() {
                    let f = set.load_function(&format!("proj_{ty}_t{tt}_r{g}"))?;
                    for (wi, w) in WARPS.iter().enumerate() {
                        occupancy[ti][bi][gi][wi] = f
                            .occupancy_max_active_blocks_per_multiprocessor(
                                (32 * w) as u32,
                                smem_bytes(*w, *g, *tt),
                                None,
                            )?;
                    }
                    row.push(f);
                }
                tables[ti].push(row);
            }
        }
        let [fp8, bf16] = tables;
        Ok(Self {
            fp8,
            bf16,
            occupancy,
            sms,
        })
    }

    /// The launch [`ProjOps::linear`] uses for `w` and `t` tokens. Two row groups per CTA from
    /// four tokens on (each activation load then feeds two weight vectors), when that still
    /// leaves two CTAs per SM; then as many warps as have a full load each (4 tiles) while every
    /// CTA stays resident in one wave (the launch's bytes are all requested at once, as the
    /// streaming-read ceiling's are), else the most warps.
    pub fn choose(&self, w: &ProjMatrix, t: usize) -> ProjLaunch {
        let bucket = token_bucket(t);
        let fp8 = w.is_fp8();
        let row_groups = w.rows.div_ceil(PROJ_TILE_ROWS);
        let ct = w.cols.div_ceil(tile_cols(fp8));
        let gi = usize::from(TOKENS[bucket] >= 4 && row_groups >= 4 * self.sms);
        let groups = GROUPS[gi];
        let ctas = row_groups.div_ceil(groups);
        let useful = ct.div_ceil(TILES_IN_FLIGHT).clamp(1, WARPS[0]);
        let occ = &self.occupancy[usize::from(!fp8)][bucket][gi];
        let warps = WARPS
            .iter()
            .enumerate()
            .filter(|(_, &w)| w <= useful)
            .find(|(wi, _)| ctas <= occ[*wi] as usize * self.sms)
            .map(|(_, &w)| w)
            .unwrap_or(useful.min(WARPS[1]));
        ProjLaunch { groups, warps }
    }

    /// `y[t] = W · x[t] (+ bias)` for `t < T ≤ MAX_TOKENS`; with `accumulate`, `y[t] += ...`
    /// instead (a residual add). `x` `[T, cols]` f32, `y` `[T, rows]` f32.
    #[allow(clippy::too_many_arguments)]
    pub fn linear(
        &self,
        s: &CudaStream,
        w: &ProjMatrix,
        bias: Option<DPtr<f32>>,
        x: DPtr<f32>,
        t: usize,
        y: DPtr<f32>,
        accumulate: bool,
    ) -> Result<(), RuntimeError> {
        check_tokens("proj linear", t)?;
        let how = self.choose(w, t);
        self.linear_with(s, w, bias, x, t, y, accumulate, how)
    }

    /// [`ProjOps::linear`] with an explicit launch shape (benchmarks sweep them).
    #[allow(clippy::too_many_arguments)]
    pub fn linear_with(
        &self,
        s: &CudaStream,
        w: &ProjMatrix,
        bias: Option<DPtr<f32>>,
        x: DPtr<f32>,
        t: usize,
        y: DPtr<f32>,
        accumulate: bool,
        how: ProjLaunch,
    ) -> Result<(), RuntimeError> {
        check_tokens("proj linear", t)?;
        check_shape("proj linear weight", w.rows, w.cols)?;
        let fp8 = w.is_fp8();
        let kt = tile_cols(fp8);
        let tiled = tiled_len(w.rows, w.cols, kt);
        let (addr, scales) = match w.data {
            ProjData::Fp8 { tiles, scales } => {
                check_len("proj linear: FP8 tiles", tiles, tiled)?;
                check_len(
                    "proj linear: FP8 scales",
                    scales,
                    w.rows.div_ceil(FP8_BLOCK) * w.cols.div_ceil(FP8_BLOCK),
                )?;
                (tiles.addr(), scales.addr())
            }
            ProjData::Bf16 { tiles } => {
                check_len("proj linear: bf16 tiles", tiles, tiled)?;
                (tiles.addr(), 0)
            }
        };
        if !addr.is_multiple_of(16) {
            return Err(invalid("proj linear: weights not 16-byte aligned".into()));
        }
        check_len("proj linear: x", x, t * w.cols)?;
        check_len("proj linear: y", y, t * w.rows)?;
        if let Some(b) = bias {
            check_len("proj linear: bias", b, w.rows)?;
        }
        let Some(gi) = GROUPS.iter().position(|&g| g == how.groups) else {
            return Err(invalid(format!(
                "proj linear: {} row groups per CTA (1 or 2)",
                how.groups
            )));
        };
        let threads = 32 * how.warps;
        if how.warps == 0 || threads > PROJ_MAX_THREADS as usize {
            return Err(invalid(format!(
                "proj linear: {} warps per CTA (1..={})",
                how.warps,
                PROJ_MAX_THREADS / 32
            )));
        }
        debug_assert!(t <= MAX_TOKENS);
        let bucket = token_bucket(t);
        let f = if fp8 {
            &self.fp8[bucket][gi]
        } else {
            &self.bf16[bucket][gi]
        };
        let row_groups = w.rows.div_ceil(PROJ_TILE_ROWS);
        let ctas = u32_arg("proj linear CTAs", row_groups.div_ceil(how.groups))?;
        let ct = w.cols.div_ceil(kt);
        let xvec = w.cols.is_multiple_of(4) && x.addr().is_multiple_of(16);
        let smem = smem_bytes(how.warps, how.groups, TOKENS[bucket]);
        let args: [Arg; 11] = [
            addr.into(),
            scales.into(),
            crate::arena::addr_or_null(bias).into(),
            x.addr().into(),
            y.addr().into(),
            u32_arg("proj rows", w.rows)?.into(),
            u32_arg("proj cols", w.cols)?.into(),
            u32_arg("proj column tiles", ct)?.into(),
            (t as u32).into(),
            u32::from(accumulate).into(),
            u32::from(xvec).into(),
        ];
        launch_with_smem(s, f, (ctas, 1, 1), threads as u32, smem as u32, &args)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tile_layout_places_every_value_once() {
        // Non-multiple rows and columns; values = their row-major index + 1 (0 = padding).
        for (rows, cols, kt) in [(37, 70, 32), (16, 32, 32), (5, 9, 16), (33, 48, 16)] {
            let v: Vec<u32> = (1..=(rows * cols) as u32).collect();
            let t = tile_layout(&v, rows, cols, kt);
            assert_eq!(t.len(), tiled_len(rows, cols, kt));
            let ct = cols.div_ceil(kt);
            let half = kt / 2;
            for r in 0..rows {
                for c in 0..cols {
                    let (g, rl) = (r / 16, r % 16);
                    let (tc, within) = (c / kt, c % kt);
                    let lane = (within / half) * 16 + rl;
                    let at = ((g * ct + tc) * 32 + lane) * half + within % half;
                    assert_eq!(t[at], (r * cols + c + 1) as u32, "{rows}x{cols} ({r}, {c})");
                }
            }
            let nonzero = t.iter().filter(|&&x| x != 0).count();
            assert_eq!(nonzero, rows * cols, "padding is zero");
        }
    }
}
