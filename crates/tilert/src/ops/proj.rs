//! Dense projections from FP8 (e4m3, 128×128 block scales) and BF16 weights on the GPU
//! (`kernels/proj.cu`): the device matrix in the kernels' tiled layout ([`ProjMatrix`], uploaded
//! as FP8 or BF16 — never widened) and the launch wrapper [`ProjOps::linear`], GEMV for one token
//! and the small-batch kernels (verify blocks, batched decode) for 2..=16, with the optional bias
//! and residual add of [`super::Ops::linear`].
//!
//! The layout (`kernels/NOTES.md`, "Dense projections"): rows in groups of
//! [`PROJ_TILE_ROWS`] (16), columns in tiles of 32 bytes per row (32 FP8 or 16 BF16 values), one
//! 512-byte tile per (row group, column tile) stored in lane order, group-major; rows and columns
//! are padded with zero weights to whole tiles. [`tile_layout`] is the host repacking. FP8 scales
//! live on the device as one f32 per (16-row group, 128-column block) ([`group_scales`]).
//!
//! Three kernel families: "row groups" (a CTA per 1-2 row groups over the whole K), "stream-K"
//! (a grid of the resident capacity, the tiles in storage order cut into one contiguous range per
//! warp; groups shared between warps are summed by the last warp in, in warp order, through
//! [`ProjOps`]' scratch) and "bulk" (a CTA per SM or two owning blocks of 1, 2 or 4 row groups
//! over the whole K, weights streamed into shared memory by `cp.async.bulk`).
//! [`ProjOps::choose`] picks per weight type, row length and token count from measurements
//! ([`BULK_CHOICE`]; kernels/NOTES.md).
//!
//! Numerics: weights decode exactly to f32, activations are f32, products and sums are f32
//! (per lane, then across the two lane halves, then across warps in order); FP8 partial sums of
//! one 32-column tile are multiplied by their block's scale. Deterministic (no atomics).

use std::sync::Arc;

use cudarc::driver::{CudaContext, CudaFunction, CudaStream};
use half::bf16;
use model::weights::{Mat, MatData};

use super::{check_len, check_tokens, invalid, launch_with_smem, token_bucket, u32_arg, Arg};
use crate::abi::{
    FP8_BLOCK, MAX_TOKENS, PROJ_BULK_MAX_STAGES, PROJ_BULK_STAGE_TILES, PROJ_BULK_THREADS,
    PROJ_MAX_THREADS, PROJ_SK_THREADS, PROJ_TILE_ROWS,
};
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
/// Row groups per CTA block of the bulk-copy kernels (`proj_bulk_*_r{R}`).
const BULK_GROUPS: [usize; 3] = [1, 2, 4];
/// Most resident bulk-copy CTAs per SM a launch asks for (each takes its share of the SM's
/// shared memory for stages).
const BULK_MAX_CTAS_PER_SM: usize = 2;
/// Bytes of one bulk-copy stage (`PROJ_BULK_STAGE_TILES` tiles of 512 bytes).
const BULK_STAGE_BYTES: usize = PROJ_BULK_STAGE_TILES * 512;
/// Measured choice of [`ProjOps::choose`] (H100, `gpu-fp8`, BENCHMARKS.md 2026-12-08): the
/// row-group kernels ([`ProjOps::choose_row_groups`]) were the fastest tiled launch at every
/// measured shape and token count except FP8 weights with short rows at 8 and 16 tokens, where
/// the bulk kernel with 2 row groups per block and 2 CTAs per SM was (MiMo dense down/rank
/// 6144×2048: 25.8 vs 38.8 µs at T = 8, 43.3 vs 72.5 at T = 16; gpt-oss qkv 5120×2880: 35.5 vs
/// 52.9, 61.6 vs 100.2); at K = 4096 and 6144 row groups won at every T. `[fp8?][token bucket]`
/// → the bulk launch (row groups per block, CTAs per SM) for FP8 rows of at most
/// [`BULK_MAX_COLS`] columns, or `None` for row groups.
const BULK_CHOICE: [[Option<(usize, usize)>; TOKENS.len()]; 2] = [
    [None, None, None, Some((2, 2)), Some((2, 2))],
    [None; TOKENS.len()],
];
/// Longest rows (columns) for which [`BULK_CHOICE`] applies (measured: 2048 and 2880 won, 4096
/// and 6144 lost).
const BULK_MAX_COLS: usize = 3072;
/// Shared memory the driver reserves per CTA.
const SMEM_RESERVED_PER_CTA: usize = 1024;

/// Bytes of one row of one tile.
const TILE_ROW_BYTES: usize = 32;
/// Most resident CTAs per SM a stream-K launch uses (bounds the partials scratch).
const SK_MAX_CTAS_PER_SM: usize = 8;
/// Most row groups a stream-K launch serves (the counters scratch); larger matrices use the
/// row-group kernels.
const SK_MAX_GROUPS: usize = 1 << 15;

/// The weight type of a [`ProjMatrix`].
#[derive(Debug, Clone, Copy)]
pub enum ProjData {
    /// e4m3 codes in the tiled layout, and the `[ceil(rows/16), ceil(cols/128)]` scales (one per
    /// 16-row group and 128-column block: value = e4m3(code) · scale), row-major.
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
        let kb = cols.div_ceil(FP8_BLOCK);
        let groups: Vec<f32> = (0..rows.div_ceil(PROJ_TILE_ROWS))
            .flat_map(|g| {
                let b = g * PROJ_TILE_ROWS / FP8_BLOCK;
                scales[b * kb..(b + 1) * kb].iter().copied()
            })
            .collect();
        Self::upload_fp8_groups(arena, codes, &groups, rows, cols, what)
    }

    /// Uploads FP8 e4m3 `codes` `[rows, cols]` (row-major) with their device scales
    /// `[ceil(rows/16), ceil(cols/128)]` (one per 16-row group and 128-column block; see
    /// [`group_scales`]).
    pub fn upload_fp8_groups(
        arena: &mut Arena,
        codes: &[u8],
        groups: &[f32],
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
        let want = rows.div_ceil(PROJ_TILE_ROWS) * cols.div_ceil(FP8_BLOCK);
        if groups.len() != want {
            return Err(invalid(format!(
                "{what}: {} group scales for a {rows}x{cols} matrix ({want} needed)",
                groups.len()
            )));
        }
        let tiled = tile_layout(codes, rows, cols, tile_cols(true));
        Ok(Self {
            data: ProjData::Fp8 {
                tiles: arena.upload(&tiled, what)?,
                scales: arena.upload(groups, what)?,
            },
            rows,
            cols,
        })
    }

    /// One FP8 matrix whose row `p` is row `pick(p) = (i, r)` of `mats[i]` (fused projections),
    /// when every part is FP8 with 128-column scale blocks and each 16-row group of the result
    /// has one scale per column block ([`group_scales`]); `Ok(None)` when not (the caller keeps
    /// the dense path). Rows are checked.
    pub fn fp8_from_rows(
        arena: &mut Arena,
        mats: &[&Mat],
        rows: usize,
        cols: usize,
        pick: impl Fn(usize) -> (usize, usize),
        what: &str,
    ) -> Result<Option<Self>, RuntimeError> {
        match fp8_rows(mats, rows, cols, pick, what)? {
            Some((codes, g)) => {
                Self::upload_fp8_groups(arena, &codes, &g, rows, cols, what).map(Some)
            }
            None => Ok(None),
        }
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

    /// Uploads a checkpoint weight stored as FP8 e4m3 with block scales of 128 columns that are
    /// constant over each 16-row group (128×128 `weight_scale_inv`, MiMo's per-group qkv parts)
    /// or as bf16, in its stored dtype. Other dtypes and other FP8 scale blocks are refused (the
    /// dense `DeviceMatrix` takes them). A matrix in row segments ([`Mat::segments`]: MiMo's
    /// `[gate; up]` views) is read segment by segment, bit-identical to the contiguous one.
    pub fn from_mat(arena: &mut Arena, m: &Mat, what: &str) -> Result<Self, RuntimeError> {
        let segs = m.segments();
        match segs[0].2 {
            MatData::Bf16(v) if segs.len() == 1 => {
                Self::upload_bf16(arena, v, m.rows, m.cols, what)
            }
            MatData::Bf16(_) => {
                // The tiling takes one row-major buffer: gather the segments into it.
                let mut v = Vec::with_capacity(m.rows * m.cols);
                for (_, _, d) in &segs {
                    let MatData::Bf16(s) = d else {
                        unreachable!("a matrix has one dtype")
                    };
                    v.extend_from_slice(s);
                }
                Self::upload_bf16(arena, &v, m.rows, m.cols, what)
            }
            MatData::F8E4M3 {
                codes,
                scales: Some(s),
            } => {
                let uploaded = if segs.len() == 1 {
                    let rows: Vec<&[f32]> = (0..m.rows).map(|r| s.row(r)).collect();
                    let groups = (s.block[1] == FP8_BLOCK)
                        .then(|| group_scales(&rows, m.cols.div_ceil(FP8_BLOCK)))
                        .flatten();
                    groups
                        .map(|g| Self::upload_fp8_groups(arena, codes, &g, m.rows, m.cols, what))
                        .transpose()?
                } else {
                    let all = |p: usize| (0, p);
                    Self::fp8_from_rows(arena, &[m], m.rows, m.cols, all, what)?
                };
                match uploaded {
                    Some(p) => Ok(p),
                    None => Err(RuntimeError::Unsupported(format!(
                        "{what}: FP8 block scales of {:?} (the projection kernels take blocks \
                         of {FP8_BLOCK} columns constant over each {PROJ_TILE_ROWS}-row group)",
                        s.block
                    ))),
                }
            }
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
                scales: arena.alloc(
                    rows.div_ceil(PROJ_TILE_ROWS) * cols.div_ceil(FP8_BLOCK),
                    what,
                )?,
            }
        } else {
            ProjData::Bf16 {
                tiles: arena.alloc(len, what)?,
            }
        };
        Ok(Self { data, rows, cols })
    }

    /// A `[rows, cols]` matrix of random weights generated on the device (synthetic models at
    /// real sizes), of standard deviation about 1/√cols: FP8 codes uniform over the positive
    /// finite e4m3 values (RMS ≈ 100) with scales uniform in ±√3/(100·√cols) (random signs per
    /// block), or bf16 values uniform with that standard deviation.
    pub fn synthetic(
        arena: &mut Arena,
        ops: &super::Ops,
        fp8: bool,
        rows: usize,
        cols: usize,
        seed: u64,
        what: &str,
    ) -> Result<Self, RuntimeError> {
        let m = Self::alloc(arena, fp8, rows, cols, what)?;
        let s = arena.stream().clone();
        let a = (3.0 / cols as f32).sqrt();
        match m.data {
            ProjData::Fp8 { tiles, scales } => {
                ops.fill_bytes(&s, tiles, 0, 0x7e, seed)?;
                ops.fill_uniform_f32(&s, scales, a / 100.0, seed ^ 0x5CA1E)?;
            }
            ProjData::Bf16 { tiles } => ops.fill_uniform_bf16(&s, tiles, a, seed)?,
        }
        Ok(m)
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
            ProjData::Fp8 { .. } => {
                self.rows * self.cols
                    + 4 * self.rows.div_ceil(FP8_BLOCK) * self.cols.div_ceil(FP8_BLOCK)
            }
            ProjData::Bf16 { .. } => 2 * self.rows * self.cols,
        }
    }
}

/// The host side of [`ProjMatrix::fp8_from_rows`]: the gathered row-major codes and the device
/// group scales, or `None` when a part is not FP8 with 128-column blocks or some 16-row group
/// has more than one scale per column block.
#[allow(clippy::type_complexity)]
pub fn fp8_rows(
    mats: &[&Mat],
    rows: usize,
    cols: usize,
    pick: impl Fn(usize) -> (usize, usize),
    what: &str,
) -> Result<Option<(Vec<u8>, Vec<f32>)>, RuntimeError> {
    // Every row segment of every part (MiMo's `[gate; up]` is two views) must qualify.
    for m in mats {
        for (_, _, d) in m.segments() {
            match d {
                MatData::F8E4M3 {
                    scales: Some(s), ..
                } if s.block[1] == FP8_BLOCK && m.cols == cols => {}
                _ => return Ok(None),
            }
        }
    }
    let mut codes = Vec::with_capacity(rows * cols);
    let mut scale_rows: Vec<&[f32]> = Vec::with_capacity(rows);
    for p in 0..rows {
        let (i, r) = pick(p);
        let Some(m) = mats.get(i) else {
            return Err(invalid(format!("{what}: part {i} does not exist")));
        };
        if r >= m.rows {
            return Err(invalid(format!(
                "{what}: row {r} of part {i} does not exist"
            )));
        }
        let (
            MatData::F8E4M3 {
                codes: c,
                scales: Some(s),
            },
            r,
        ) = m.row_data(r)
        else {
            unreachable!("checked above")
        };
        codes.extend_from_slice(&c[r * cols..(r + 1) * cols]);
        scale_rows.push(s.row(r));
    }
    Ok(group_scales(&scale_rows, cols.div_ceil(FP8_BLOCK)).map(|g| (codes, g)))
}

/// The device scales `[ceil(rows/16), kb]` of a matrix whose row `r` has the scale row
/// `rows[r]` (`kb` values, one per 128 columns), or `None` when some 16-row group's rows differ
/// (compared bit for bit).
pub fn group_scales(rows: &[&[f32]], kb: usize) -> Option<Vec<f32>> {
    let mut out = Vec::with_capacity(rows.len().div_ceil(PROJ_TILE_ROWS) * kb);
    for group in rows.chunks(PROJ_TILE_ROWS) {
        let first = group[0];
        if first.len() != kb {
            return None;
        }
        let same = |r: &&[f32]| r.iter().zip(first).all(|(a, b)| a.to_bits() == b.to_bits());
        if !group.iter().all(same) {
            return None;
        }
        out.extend_from_slice(first);
    }
    Some(out)
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

/// How one projection is launched.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProjLaunch {
    /// `proj_*_t*_r{groups}`: a CTA per `groups` (1 or 2) row groups of 16 rows over the whole
    /// K, `warps` (1..=16) warps splitting the columns.
    RowGroups { groups: usize, warps: usize },
    /// `proj_sk_*`: `ctas_per_sm` (1..=8) CTAs of 4 warps per SM, the tiles cut into one
    /// contiguous range per warp.
    StreamK { ctas_per_sm: usize },
    /// `proj_bulk_*_r{groups}`: CTAs of 8 warps, `ctas_per_sm` (1 or 2) per SM, each owning
    /// blocks of `groups` (1, 2 or 4) row groups over the whole K; weights stream into shared
    /// memory by bulk copies, as many 16 KB stages in flight as the CTA's share of the SM's
    /// shared memory holds.
    Bulk { groups: usize, ctas_per_sm: usize },
}

/// The projection kernels of `kernels/proj.cu`, and the stream-K scratch (partials and
/// counters). The scratch is shared by every launch of this `ProjOps`: launches must be ordered
/// (one stream, as tilert's executor issues them; each launch leaves the counters at zero).
pub struct ProjOps {
    /// `[token bucket][groups index]` for FP8 and BF16.
    fp8: Vec<Vec<CudaFunction>>,
    bf16: Vec<Vec<CudaFunction>>,
    /// `[token bucket]` stream-K kernels for FP8 and BF16.
    sk_fp8: Vec<CudaFunction>,
    sk_bf16: Vec<CudaFunction>,
    /// `[fp8?][token bucket][BULK_GROUPS index]` bulk-copy kernels.
    bulk: [Vec<Vec<CudaFunction>>; 2],
    /// Whether `ctas_per_sm` (index + 1) bulk CTAs fit on an SM with at least two stages each
    /// (`[fp8?][bucket][groups][ctas_per_sm − 1]`), from the occupancy calculator at load.
    bulk_fits: [[[[bool; BULK_MAX_CTAS_PER_SM]; BULK_GROUPS.len()]; TOKENS.len()]; 2],
    /// Shared memory of one SM and the most one CTA may take (bytes).
    smem_per_sm: usize,
    smem_per_cta: usize,
    /// Resident CTAs per SM of each kernel at each warp count of [`WARPS`]
    /// (`[fp8?][bucket][groups][warps index]`), from the occupancy calculator at load.
    occupancy: [[[[u32; WARPS.len()]; GROUPS.len()]; TOKENS.len()]; 2],
    /// Resident stream-K CTAs per SM (`[fp8?][bucket]`), at most [`SK_MAX_CTAS_PER_SM`].
    sk_occupancy: [[usize; TOKENS.len()]; 2],
    sms: usize,
    /// `[sms · SK_MAX_CTAS_PER_SM · 4 warps][2][MAX_TOKENS][16]` f32 partials.
    sk_part: DPtr<f32>,
    /// `[SK_MAX_GROUPS]` u32, zero between launches.
    sk_counters: DPtr<u32>,
    _scratch: Arena,
}

/// Dynamic shared memory of one CTA: the partial sums `[warps][groups][T][16]`.
fn smem_bytes(warps: usize, groups: usize, tt: usize) -> usize {
    warps * groups * tt * PROJ_TILE_ROWS * 4
}

/// Warps per stream-K CTA.
const SK_WARPS: usize = PROJ_SK_THREADS as usize / 32;

/// Byte offset of the first stage in a bulk CTA's shared memory (`bulk_stage_offset` of
/// kernels/proj.cu): the barriers, then the reduction buffer `[8 warps][groups][T][16]` f32.
fn bulk_stage_offset(groups: usize, tt: usize) -> usize {
    (8 * PROJ_BULK_MAX_STAGES + (PROJ_BULK_THREADS as usize / 32) * groups * tt * 16 * 4)
        .next_multiple_of(128)
}

/// (stages, dynamic shared memory bytes) of a bulk CTA with `groups` row groups and a `tt`
/// token bucket when `ctas_per_sm` CTAs share an SM of `smem_per_sm` bytes (at most
/// `smem_per_cta` per CTA).
fn bulk_smem(
    groups: usize,
    tt: usize,
    ctas_per_sm: usize,
    smem_per_sm: usize,
    smem_per_cta: usize,
) -> (usize, usize) {
    let budget = (smem_per_sm / ctas_per_sm.max(1))
        .saturating_sub(SMEM_RESERVED_PER_CTA)
        .min(smem_per_cta);
    let off = bulk_stage_offset(groups, tt);
    let stages = (budget.saturating_sub(off) / BULK_STAGE_BYTES).min(PROJ_BULK_MAX_STAGES);
    (stages, off + stages * BULK_STAGE_BYTES)
}

impl ProjOps {
    /// Loads the kernels into `ctx` and allocates the stream-K scratch (64 KB of partials per
    /// SM, 128 KB of counters).
    pub fn load(ctx: &Arc<CudaContext>) -> Result<Self, RuntimeError> {
        let set = ultra_kernels::load_set(ctx, &[ultra_kernels::PROJ])?;
        let sms = ctx.attribute(
            cudarc::driver::sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT,
        )? as usize;
        let mut occupancy = [[[[0u32; WARPS.len()]; GROUPS.len()]; TOKENS.len()]; 2];
        let mut sk_occupancy = [[0usize; TOKENS.len()]; 2];
        let mut tables = [Vec::new(), Vec::new()];
        let mut sk = [Vec::new(), Vec::new()];
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
                let f = set.load_function(&format!("proj_sk_{ty}_t{tt}"))?;
                let occ =
                    f.occupancy_max_active_blocks_per_multiprocessor(PROJ_SK_THREADS, 0, None)?
                        as usize;
                sk_occupancy[ti][bi] = occ.clamp(1, SK_MAX_CTAS_PER_SM);
                sk[ti].push(f);
            }
        }
        let [fp8, bf16] = tables;
        let [sk_fp8, sk_bf16] = sk;
        use cudarc::driver::sys::CUdevice_attribute as A;
        let smem_per_sm =
            ctx.attribute(A::CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_MULTIPROCESSOR)? as usize;
        let smem_per_cta =
            ctx.attribute(A::CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN)? as usize;
        let mut bulk = [Vec::new(), Vec::new()];
        let mut bulk_fits = [[[[false; BULK_MAX_CTAS_PER_SM]; BULK_GROUPS.len()]; TOKENS.len()]; 2];
        for (ti, ty) in ["fp8", "bf16"].iter().enumerate() {
            for (bi, tt) in TOKENS.iter().enumerate() {
                let mut row = Vec::new();
                for (gi, g) in BULK_GROUPS.iter().enumerate() {
                    let f = set.load_function(&format!("proj_bulk_{ty}_t{tt}_r{g}"))?;
                    f.set_attribute(
                        cudarc::driver::sys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                        smem_per_cta as i32,
                    )?;
                    for c in 1..=BULK_MAX_CTAS_PER_SM {
                        let (stages, smem) = bulk_smem(*g, *tt, c, smem_per_sm, smem_per_cta);
                        let occ = f.occupancy_max_active_blocks_per_multiprocessor(
                            PROJ_BULK_THREADS,
                            smem,
                            None,
                        )? as usize;
                        bulk_fits[ti][bi][gi][c - 1] = stages >= 2 && occ >= c;
                    }
                    row.push(f);
                }
                bulk[ti].push(row);
            }
        }
        let mut scratch = Arena::new(ctx.default_stream());
        let warps = sms * SK_MAX_CTAS_PER_SM * SK_WARPS;
        let sk_part = scratch.alloc(warps * 2 * MAX_TOKENS * PROJ_TILE_ROWS, "proj partials")?;
        let sk_counters = scratch.alloc(SK_MAX_GROUPS, "proj counters")?;
        scratch.stream().synchronize()?;
        Ok(Self {
            fp8,
            bf16,
            sk_fp8,
            sk_bf16,
            bulk,
            bulk_fits,
            smem_per_sm,
            smem_per_cta,
            occupancy,
            sk_occupancy,
            sms,
            sk_part,
            sk_counters,
            _scratch: scratch,
        })
    }

    /// The launch [`ProjOps::linear`] uses for `w` and `t` tokens, by measurement
    /// ([`BULK_CHOICE`]): the bulk-copy kernel where it measured fastest and fits the device,
    /// else the row-group kernels ([`ProjOps::choose_row_groups`]). Stream-K is never chosen
    /// (slowest at every measured shape).
    pub fn choose(&self, w: &ProjMatrix, t: usize) -> ProjLaunch {
        let bucket = token_bucket(t);
        let ti = usize::from(!w.is_fp8());
        let bulk = BULK_CHOICE[ti][bucket]
            .filter(|_| w.cols <= BULK_MAX_COLS)
            .and_then(|(groups, ctas_per_sm)| {
                let gi = BULK_GROUPS.iter().position(|&g| g == groups)?;
                self.bulk_fits[ti][bucket][gi][ctas_per_sm - 1].then_some(ProjLaunch::Bulk {
                    groups,
                    ctas_per_sm,
                })
            });
        bulk.unwrap_or_else(|| self.choose_row_groups(w, t))
    }

    /// The stream-K launch with every resident CTA for `fp8` weights and `t` tokens (kept for
    /// comparison: measured far slower than the bulk kernels, kernels/NOTES.md).
    pub fn stream_k(&self, fp8: bool, t: usize) -> ProjLaunch {
        ProjLaunch::StreamK {
            ctas_per_sm: self.sk_occupancy[usize::from(!fp8)][token_bucket(t)],
        }
    }

    /// Every bulk-copy launch shape that fits the device for `fp8` weights and `t` tokens
    /// (benchmarks and tests sweep them).
    pub fn bulk_launches(&self, fp8: bool, t: usize) -> Vec<ProjLaunch> {
        let bucket = token_bucket(t);
        let ti = usize::from(!fp8);
        let mut v = Vec::new();
        for (gi, &groups) in BULK_GROUPS.iter().enumerate() {
            for c in 1..=BULK_MAX_CTAS_PER_SM {
                if self.bulk_fits[ti][bucket][gi][c - 1] {
                    v.push(ProjLaunch::Bulk {
                        groups,
                        ctas_per_sm: c,
                    });
                }
            }
        }
        v
    }

    /// The best row-group launch for `w` and `t` tokens. Two row groups per CTA from four
    /// tokens on (each activation load then feeds two weight vectors), when that still leaves
    /// two CTAs per SM; then as many warps as have a full load each (4 tiles) while every CTA
    /// stays resident in one wave (the launch's bytes are all requested at once, as the
    /// streaming-read ceiling's are), else the most warps.
    pub fn choose_row_groups(&self, w: &ProjMatrix, t: usize) -> ProjLaunch {
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
        ProjLaunch::RowGroups { groups, warps }
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
                    w.rows.div_ceil(PROJ_TILE_ROWS) * w.cols.div_ceil(FP8_BLOCK),
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
        debug_assert!(t <= MAX_TOKENS);
        let bucket = token_bucket(t);
        let row_groups = w.rows.div_ceil(PROJ_TILE_ROWS);
        let ct = w.cols.div_ceil(kt);
        let xvec = w.cols.is_multiple_of(4) && x.addr().is_multiple_of(16);
        let head: [Arg; 5] = [
            addr.into(),
            scales.into(),
            crate::arena::addr_or_null(bias).into(),
            x.addr().into(),
            y.addr().into(),
        ];
        let tail: [Arg; 6] = [
            u32_arg("proj rows", w.rows)?.into(),
            u32_arg("proj cols", w.cols)?.into(),
            u32_arg("proj column tiles", ct)?.into(),
            (t as u32).into(),
            u32::from(accumulate).into(),
            u32::from(xvec).into(),
        ];
        match how {
            ProjLaunch::RowGroups { groups, warps } => {
                let Some(gi) = GROUPS.iter().position(|&g| g == groups) else {
                    return Err(invalid(format!(
                        "proj linear: {groups} row groups per CTA (1 or 2)"
                    )));
                };
                let threads = 32 * warps;
                if warps == 0 || threads > PROJ_MAX_THREADS as usize {
                    return Err(invalid(format!(
                        "proj linear: {warps} warps per CTA (1..={})",
                        PROJ_MAX_THREADS / 32
                    )));
                }
                let f = if fp8 {
                    &self.fp8[bucket][gi]
                } else {
                    &self.bf16[bucket][gi]
                };
                let ctas = u32_arg("proj linear CTAs", row_groups.div_ceil(groups))?;
                let smem = smem_bytes(warps, groups, TOKENS[bucket]);
                let args: Vec<Arg> = head.iter().chain(&tail).copied().collect();
                launch_with_smem(s, f, (ctas, 1, 1), threads as u32, smem as u32, &args)
            }
            ProjLaunch::Bulk {
                groups,
                ctas_per_sm,
            } => {
                let Some(gi) = BULK_GROUPS.iter().position(|&g| g == groups) else {
                    return Err(invalid(format!(
                        "proj linear: {groups} row groups per bulk block (1, 2 or 4)"
                    )));
                };
                if !(1..=BULK_MAX_CTAS_PER_SM).contains(&ctas_per_sm) {
                    return Err(invalid(format!(
                        "proj linear: {ctas_per_sm} bulk CTAs per SM (1..={BULK_MAX_CTAS_PER_SM})"
                    )));
                }
                let ti = usize::from(!fp8);
                if !self.bulk_fits[ti][bucket][gi][ctas_per_sm - 1] {
                    return Err(invalid(format!(
                        "proj linear: {ctas_per_sm} bulk CTAs of {groups} row groups at {} \
                         tokens do not fit on one SM",
                        TOKENS[bucket]
                    )));
                }
                let (stages, smem) = bulk_smem(
                    groups,
                    TOKENS[bucket],
                    ctas_per_sm,
                    self.smem_per_sm,
                    self.smem_per_cta,
                );
                let ctas = u32_arg(
                    "proj linear CTAs",
                    row_groups.div_ceil(groups).min(ctas_per_sm * self.sms),
                )?;
                let f = &self.bulk[ti][bucket][gi];
                let mut args: Vec<Arg> = head.iter().chain(&tail).copied().collect();
                args.push((stages as u32).into());
                launch_with_smem(s, f, (ctas, 1, 1), PROJ_BULK_THREADS, smem as u32, &args)
            }
            ProjLaunch::StreamK { ctas_per_sm } => {
                if !(1..=SK_MAX_CTAS_PER_SM).contains(&ctas_per_sm) {
                    return Err(invalid(format!(
                        "proj linear: {ctas_per_sm} stream-K CTAs per SM (1..={SK_MAX_CTAS_PER_SM})"
                    )));
                }
                if row_groups > SK_MAX_GROUPS {
                    return Err(invalid(format!(
                        "proj linear: {row_groups} row groups for stream-K (at most \
                         {SK_MAX_GROUPS}; use the row-group kernels)"
                    )));
                }
                let (ctas, warps) = sk_grid(row_groups * ct, self.sms * ctas_per_sm);
                let f = if fp8 {
                    &self.sk_fp8[bucket]
                } else {
                    &self.sk_bf16[bucket]
                };
                let mut args: Vec<Arg> = head.to_vec();
                args.push(self.sk_part.addr().into());
                args.push(self.sk_counters.addr().into());
                args.extend_from_slice(&tail);
                launch_with_smem(s, f, (ctas as u32, 1, 1), 32 * warps as u32, 0, &args)
            }
        }
    }
}

/// The stream-K grid for `tiles` tiles and at most `max_ctas` CTAs: (CTAs, warps per CTA) with
/// at most one warp per tile (every warp's range is non-empty, as the kernel requires).
fn sk_grid(tiles: usize, max_ctas: usize) -> (usize, usize) {
    let warps = SK_WARPS.min(tiles).max(1);
    (max_ctas.min(tiles / warps).max(1), warps)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stream_k_grids_give_every_warp_a_tile() {
        for tiles in [1, 2, 3, 4, 5, 31, 1000, 41_472, 10_000_000] {
            for max_ctas in [1, 132, 1056] {
                let (ctas, warps) = sk_grid(tiles, max_ctas);
                assert!(ctas >= 1 && ctas <= max_ctas && (1..=SK_WARPS).contains(&warps));
                assert!(ctas * warps <= tiles, "{tiles} tiles, {ctas}x{warps} warps");
            }
        }
    }

    /// A host model of `proj_sk_body`'s work split (kernels/proj.cu: `sk_start`, `sk_owner`,
    /// the flush rule and the partial slots), run over many shapes and grids: every tile is
    /// summed exactly once into its group, every group's rows are written exactly once (directly
    /// by the warp that covers it, else by the last of its `qb − qa + 1` contributors, which
    /// reads back exactly the slots they wrote), and no warp writes one slot twice.
    #[test]
    fn stream_k_split_covers_every_tile_once() {
        fn start(q: u64, tiles: u64, warps: u64) -> u64 {
            q * tiles / warps
        }
        fn owner(i: u64, tiles: u64, warps: u64) -> u64 {
            ((i + 1) * warps - 1) / tiles
        }
        for (groups, ct) in [
            (1u64, 1u64),
            (3, 1),
            (1, 7),
            (216, 192),
            (19, 32),
            (1000, 3),
            (5, 1024),
        ] {
            let tiles = groups * ct;
            for max_ctas in [1usize, 2, 7, 132, 1056] {
                let (ctas, w) = sk_grid(tiles as usize, max_ctas);
                let warps = (ctas * w) as u64;
                let mut summed = vec![0u64; groups as usize];
                let mut written = vec![0u32; groups as usize];
                let mut contributors = vec![0u64; groups as usize];
                // (warp, slot) -> group
                let mut slots = std::collections::HashMap::new();
                for q in 0..warps {
                    let (a, b) = (start(q, tiles, warps), start(q + 1, tiles, warps));
                    assert!(a < b, "empty range");
                    let (mut g, mut c) = (a / ct, a % ct);
                    let g_first = g;
                    let mut acc = 0u64;
                    for i in a..b {
                        acc += 1;
                        let end_group = c + 1 == ct;
                        if end_group || i + 1 == b {
                            let gs = g * ct;
                            if a <= gs && gs + ct <= b {
                                written[g as usize] += 1;
                                summed[g as usize] += acc;
                            } else {
                                let slot = u64::from(g != g_first);
                                assert!(slots.insert((q, slot), (g, acc)).is_none(), "slot reused");
                                contributors[g as usize] += 1;
                                let (qa, qb) =
                                    (owner(gs, tiles, warps), owner(gs + ct - 1, tiles, warps));
                                assert!(qa <= q && q <= qb);
                                if contributors[g as usize] == qb - qa + 1 {
                                    // The reducer's reads.
                                    for r in qa..=qb {
                                        let slot = u64::from(start(r, tiles, warps) / ct != g);
                                        let (gg, part) = slots[&(r, slot)];
                                        assert_eq!(gg, g, "slot of warp {r} holds group {gg}");
                                        summed[g as usize] += part;
                                    }
                                    written[g as usize] += 1;
                                }
                            }
                            acc = 0;
                        }
                        if end_group {
                            c = 0;
                            g += 1;
                        } else {
                            c += 1;
                        }
                    }
                }
                assert!(
                    written.iter().all(|&n| n == 1),
                    "{groups}x{ct} on {warps} warps"
                );
                assert!(
                    summed.iter().all(|&n| n == ct),
                    "{groups}x{ct} on {warps} warps"
                );
            }
        }
    }

    /// The released-layout MiMo fixture: every layer's fused qkv (split per KV group at load,
    /// K and V carrying per-row scales) regathers as FP8 with one scale per 16-row group and
    /// 128 columns — the GPU upload keeps it FP8 — and the gathered values are the split
    /// matrices' values exactly.
    #[test]
    fn mimo_fixture_qkv_stays_fp8() {
        let dir =
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/mimo-v2/fp4");
        let (_, w) = model::load::load(&dir).unwrap();
        for (l, lw) in w.layers.iter().enumerate() {
            let a = &lw.attn;
            let parts = [&a.q.w, &a.k.w, &a.v.w];
            let (nq, nk) = (a.q.w.rows, a.k.w.rows);
            let rows = nq + nk + a.v.w.rows;
            let cols = a.q.w.cols;
            let pick = |p: usize| {
                if p < nq {
                    (0, p)
                } else if p < nq + nk {
                    (1, p - nq)
                } else {
                    (2, p - nq - nk)
                }
            };
            let (codes, g) = fp8_rows(&parts, rows, cols, pick, "qkv")
                .unwrap()
                .unwrap_or_else(|| panic!("layer {l}: qkv not taken as FP8"));
            let kb = cols.div_ceil(FP8_BLOCK);
            let mut want = vec![0f32; cols];
            for p in 0..rows {
                let (i, r) = pick(p);
                parts[i].row_into(r, &mut want);
                for (c, &w) in want.iter().enumerate() {
                    let got =
                        model::weights::f8_e4m3(codes[p * cols + c]) * g[(p / 16) * kb + c / 128];
                    assert_eq!(got.to_bits(), w.to_bits(), "layer {l} row {p} col {c}");
                }
            }
        }
    }

    #[test]
    fn group_scales_need_one_scale_per_sixteen_rows() {
        let a = [1.0f32, 2.0];
        let b = [3.0f32, 4.0];
        let mut rows: Vec<&[f32]> = vec![&a; 16];
        rows.extend(vec![&b[..]; 5]);
        assert_eq!(group_scales(&rows, 2), Some(vec![1.0, 2.0, 3.0, 4.0]));
        rows[7] = &b;
        assert_eq!(group_scales(&rows, 2), None);
        assert_eq!(group_scales(&[&a[..]], 3), None);
    }

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
