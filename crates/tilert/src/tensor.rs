//! Device-resident weights as the kernels see them, and their upload from the host weights
//! ([`DeviceMatrix::from_mat`]: tensor by tensor from the mapped checkpoint, no whole-model copy).

use half::bf16;
use model::weights::{DenseDtype, Mat, MatData};

use crate::arena::{htod, Arena, DPtr};
use crate::ops::proj::{ProjData, ProjMatrix};
use crate::ops::Ops;
use crate::RuntimeError;

/// The element type of a dense device matrix.
#[derive(Debug, Clone, Copy)]
pub enum DenseData {
    Bf16(DPtr<bf16>),
    F32(DPtr<f32>),
    /// FP8 (block-scaled) or bf16 in the projection kernels' tiled layout
    /// (`tilert::ops::proj`): only `Ops::linear` reads it (through `ProjOps`).
    Tiled(ProjData),
}

/// A dense row-major matrix `[rows, cols]` (an `nn.Linear` weight, `y = W·x`), or a stack of
/// `rows / per_expert_rows` of them when used as dense experts.
///
/// bf16 checkpoint weights stay bf16 ([`DeviceMatrix::from_mat`]); weights of other dtypes are
/// stored as bf16 when every value is exactly a bf16, else as f32
/// ([`DeviceMatrix::upload`]), so the GPU computes with the very weights the CPU executor uses.
#[derive(Debug, Clone, Copy)]
pub struct DeviceMatrix {
    pub data: DenseData,
    pub rows: usize,
    pub cols: usize,
}

/// Whether every value of `v` is exactly representable in bf16.
pub fn fits_bf16(v: &[f32]) -> bool {
    v.iter()
        .all(|&x| bf16::from_f32(x).to_f32().to_bits() == x.to_bits() || x.is_nan())
}

impl DeviceMatrix {
    /// Uploads `[rows, cols]` f32 values, as bf16 when that is lossless (see the type docs).
    pub fn upload(
        arena: &mut Arena,
        data: &[f32],
        rows: usize,
        cols: usize,
        what: &str,
    ) -> Result<Self, RuntimeError> {
        assert_eq!(
            data.len(),
            rows * cols,
            "DeviceMatrix::upload {what}: shape"
        );
        let data = if fits_bf16(data) {
            let h: Vec<bf16> = data.iter().map(|&x| bf16::from_f32(x)).collect();
            DenseData::Bf16(arena.upload(&h, what)?)
        } else {
            DenseData::F32(arena.upload(data, what)?)
        };
        Ok(Self { data, rows, cols })
    }

    /// Uploads a weight matrix: bf16 storage is copied to the device as it is (straight from the
    /// mapped checkpoint, no host copy, no value scan); any other dtype (f32, f16, FP8 with its
    /// block scales) is widened to f32 for this one tensor and stored by
    /// [`DeviceMatrix::upload`]'s rule (bf16 when lossless, else f32) — the device bytes of the
    /// widening loader before, so GPU outputs do not change. FP8 thus lands as bf16 or f32
    /// until FP8 kernels exist.
    ///
    /// A matrix in row segments ([`Mat::segments`]: MiMo's `[gate; up]` views) is copied
    /// segment by segment into its rows of the device buffer — still no host copy.
    pub fn from_mat(arena: &mut Arena, m: &Mat, what: &str) -> Result<Self, RuntimeError> {
        if m.dtype() == DenseDtype::Bf16 {
            let p = arena.alloc::<bf16>(m.rows * m.cols, what)?;
            for (r0, n, d) in m.segments() {
                let MatData::Bf16(v) = d else {
                    unreachable!("a matrix has one dtype")
                };
                htod(arena.stream(), v, p.slice(r0 * m.cols..(r0 + n) * m.cols))?;
            }
            arena.stream().synchronize()?;
            return Ok(Self {
                data: DenseData::Bf16(p),
                rows: m.rows,
                cols: m.cols,
            });
        }
        let v = m.to_f32();
        Self::upload(arena, &v, m.rows, m.cols, what)
    }

    /// One `[rows, cols]` matrix whose row `p` is row `pick(p) = (i, r)` of `mats[i]` (fused
    /// projections, expert stacks, permuted rows), by the rules of [`DeviceMatrix::from_mat`]:
    /// bf16 when every source is stored bf16, else widened to f32 and stored by
    /// [`DeviceMatrix::upload`]'s rule. Needs one host buffer of the result's size.
    pub fn from_rows(
        arena: &mut Arena,
        mats: &[&Mat],
        rows: usize,
        cols: usize,
        pick: impl Fn(usize) -> (usize, usize),
        what: &str,
    ) -> Result<Self, RuntimeError> {
        if let Some((i, m)) = mats.iter().enumerate().find(|(_, m)| m.cols != cols) {
            return Err(RuntimeError::Invalid(format!(
                "{what}: part {i} has {} columns, not {cols}",
                m.cols
            )));
        }
        let check = |i: usize, r: usize| -> Result<(), RuntimeError> {
            match mats.get(i) {
                Some(m) if r < m.rows => Ok(()),
                _ => Err(RuntimeError::Invalid(format!(
                    "{what}: row {r} of part {i} does not exist"
                ))),
            }
        };
        if mats.iter().all(|m| m.dtype() == DenseDtype::Bf16) {
            let mut h: Vec<bf16> = Vec::with_capacity(rows * cols);
            for p in 0..rows {
                let (i, r) = pick(p);
                check(i, r)?;
                let (MatData::Bf16(v), r) = mats[i].row_data(r) else {
                    unreachable!("checked above")
                };
                h.extend_from_slice(&v[r * cols..(r + 1) * cols]);
            }
            return Ok(Self {
                data: DenseData::Bf16(arena.upload(&h, what)?),
                rows,
                cols,
            });
        }
        let mut v = vec![0f32; rows * cols];
        for (p, row) in v.chunks_exact_mut(cols.max(1)).enumerate().take(rows) {
            let (i, r) = pick(p);
            check(i, r)?;
            mats[i].row_into(r, row);
        }
        Self::upload(arena, &v, rows, cols, what)
    }

    /// Uploads a projection weight (QKV, O, dense MLP, LM head) for `Ops::linear`: FP8 with
    /// 128-column block scales constant over each 16-row group stays FP8 in the tiled layout
    /// (`DenseData::Tiled`); anything else goes through [`DeviceMatrix::from_mat`] (bf16 as it
    /// is — the row-major `linear` kernels are as fast as the tiled ones for bf16, see
    /// kernels/NOTES.md).
    pub fn projection(arena: &mut Arena, m: &Mat, what: &str) -> Result<Self, RuntimeError> {
        if m.dtype() == DenseDtype::F8E4M3 {
            let all = |p: usize| (0, p);
            if let Some(p) = ProjMatrix::fp8_from_rows(arena, &[m], m.rows, m.cols, all, what)? {
                return Ok(p.into());
            }
        }
        Self::from_mat(arena, m, what)
    }

    /// [`DeviceMatrix::from_rows`] for a fused projection: FP8 parts that
    /// [`ProjMatrix::fp8_from_rows`] takes stay FP8 (tiled), else the dense rules.
    pub fn projection_rows(
        arena: &mut Arena,
        mats: &[&Mat],
        rows: usize,
        cols: usize,
        pick: impl Fn(usize) -> (usize, usize),
        what: &str,
    ) -> Result<Self, RuntimeError> {
        if let Some(p) = ProjMatrix::fp8_from_rows(arena, mats, rows, cols, &pick, what)? {
            return Ok(p.into());
        }
        Self::from_rows(arena, mats, rows, cols, pick, what)
    }

    /// The tiled form, when the matrix is one (`DenseData::Tiled`).
    pub fn tiled(&self) -> Option<ProjMatrix> {
        match self.data {
            DenseData::Tiled(data) => Some(ProjMatrix {
                data,
                rows: self.rows,
                cols: self.cols,
            }),
            _ => None,
        }
    }

    /// A `[rows, cols]` bf16 matrix of random values generated on the device (synthetic models):
    /// uniform with standard deviation 1/√cols, which keeps outputs O(1) for O(1) inputs.
    pub fn synthetic(
        arena: &mut Arena,
        ops: &Ops,
        rows: usize,
        cols: usize,
        seed: u64,
        what: &str,
    ) -> Result<Self, RuntimeError> {
        let p = arena.alloc::<bf16>(rows * cols, what)?;
        // Uniform in ±a has std a/√3.
        let a = (3.0 / cols as f32).sqrt();
        ops.fill_uniform_bf16(arena.stream(), p, a, seed)?;
        Ok(Self {
            data: DenseData::Bf16(p),
            rows,
            cols,
        })
    }

    /// Bytes of the weights.
    pub fn bytes(&self) -> usize {
        match self.data {
            DenseData::Bf16(p) => p.bytes(),
            DenseData::F32(p) => p.bytes(),
            DenseData::Tiled(_) => self.tiled().map_or(0, |p| p.bytes()),
        }
    }

    /// Rows `r0..r1` (for stacks of dense experts, which are row-major); `None` for a tiled
    /// matrix.
    pub fn rows_slice(&self, r0: usize, r1: usize) -> Option<Self> {
        let (a, b) = (r0 * self.cols, r1 * self.cols);
        let data = match self.data {
            DenseData::Bf16(p) => DenseData::Bf16(p.slice(a..b)),
            DenseData::F32(p) => DenseData::F32(p.slice(a..b)),
            DenseData::Tiled(_) => return None,
        };
        Some(Self {
            data,
            rows: r1 - r0,
            cols: self.cols,
        })
    }
}

impl From<ProjMatrix> for DeviceMatrix {
    fn from(p: ProjMatrix) -> Self {
        Self {
            data: DenseData::Tiled(p.data),
            rows: p.rows,
            cols: p.cols,
        }
    }
}

/// `n` values spread deterministically over `center ± spread` (norm weights, biases and sinks of
/// synthetic models), uploaded.
pub fn patterned_vector(
    arena: &mut Arena,
    n: usize,
    center: f32,
    spread: f32,
    what: &str,
) -> Result<DPtr<f32>, RuntimeError> {
    let v: Vec<f32> = (0..n)
        .map(|i| center + spread * (((i * 7919) % 1000) as f32 / 500.0 - 1.0))
        .collect();
    arena.upload(&v, what)
}
