//! Device-resident weights as the kernels see them.

use half::bf16;

use crate::arena::{Arena, DPtr};
use crate::ops::Ops;
use crate::RuntimeError;

/// The element type of a dense device matrix.
#[derive(Debug, Clone, Copy)]
pub enum DenseData {
    Bf16(DPtr<bf16>),
    F32(DPtr<f32>),
}

/// A dense row-major matrix `[rows, cols]` (an `nn.Linear` weight, `y = W·x`), or a stack of
/// `rows / per_expert_rows` of them when used as dense experts.
///
/// Weights are stored as bf16 when every value is exactly a bf16 (all Hugging Face bf16
/// checkpoints), else as f32, so the GPU computes with the very weights the CPU executor uses.
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
        }
    }

    /// Rows `r0..r1` (for stacks of dense experts).
    pub fn rows_slice(&self, r0: usize, r1: usize) -> Self {
        let (a, b) = (r0 * self.cols, r1 * self.cols);
        Self {
            data: match self.data {
                DenseData::Bf16(p) => DenseData::Bf16(p.slice(a..b)),
                DenseData::F32(p) => DenseData::F32(p.slice(a..b)),
            },
            rows: r1 - r0,
            cols: self.cols,
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
