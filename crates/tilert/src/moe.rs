//! Routed experts on the GPU (`kernels/mxfp4.cu` grouped kernels): upload of a MoE block's
//! experts into kernel layouts and the two expert launches of a step.
//!
//! A pass over `T ≤ MAX_TOKENS` tokens with top-k routing (`ids` / `weights` `[T, k]` from
//! [`crate::ops::Ops::route`]) runs each **distinct** selected expert once: its weights are read
//! once for all the tokens that chose it (`model::cpu::ffn::moe_block` does the same on the CPU).
//!
//! Layouts: MXFP4 experts are repacked at upload into `fp4::tiled` (16-row × 4-block tiles, 1 KiB
//! of codes each, coalesced 16-byte loads); dense experts (bf16 when lossless, else f32) are
//! `[E, rows, K]`. Gate/up rows are always **interleaved** on the device (row 2j = gate j,
//! row 2j+1 = up j): Qwen3-MoE / MiMo halves are permuted at upload (biases too), so one fused
//! gate_up + GLU kernel serves every architecture.

use std::sync::Arc;

use cudarc::driver::{CudaContext, CudaStream};

use crate::arena::{Arena, DPtr};
use crate::ops::GluArgs;
use crate::tensor::DeviceMatrix;
use crate::RuntimeError;

/// One stack of expert matrices `[E, rows, K]` on the device.
#[derive(Debug, Clone, Copy)]
pub enum DeviceExperts {
    /// `fp4::tiled` layout: `codes` = `TiledShape::code_bytes()`, `scales` = `scale_bytes()`.
    Mxfp4 {
        codes: DPtr<u8>,
        scales: DPtr<u8>,
        experts: usize,
        rows: usize,
        k: usize,
    },
    /// `[E·rows, K]` row-major.
    Dense { w: DeviceMatrix, experts: usize },
}

impl DeviceExperts {
    pub fn experts(&self) -> usize {
        match self {
            DeviceExperts::Mxfp4 { experts, .. } | DeviceExperts::Dense { experts, .. } => *experts,
        }
    }
    /// Rows of one expert.
    pub fn rows(&self) -> usize {
        match self {
            DeviceExperts::Mxfp4 { rows, .. } => *rows,
            DeviceExperts::Dense { w, experts } => w.rows / experts,
        }
    }
    pub fn k(&self) -> usize {
        match self {
            DeviceExperts::Mxfp4 { k, .. } => *k,
            DeviceExperts::Dense { w, .. } => w.cols,
        }
    }
    /// Bytes of one expert's weights as stored (codes + scales, or dense values).
    pub fn expert_bytes(&self) -> usize {
        match self {
            DeviceExperts::Mxfp4 { rows, k, .. } => rows * k / 2 + rows * k / fp4::BLOCK,
            DeviceExperts::Dense { w, experts } => w.bytes() / experts,
        }
    }
}

/// A MoE block's experts on the device.
#[derive(Debug, Clone, Copy)]
pub struct DeviceMoe {
    /// `[E, 2I, H]`, interleaved gate/up rows.
    pub gate_up: DeviceExperts,
    /// `[E, 2I]` interleaved (gpt-oss), f32.
    pub gate_up_bias: Option<DPtr<f32>>,
    /// `[E, H, I]`.
    pub down: DeviceExperts,
    /// `[E, H]` (gpt-oss), f32.
    pub down_bias: Option<DPtr<f32>>,
    pub n_experts: usize,
    /// Intermediate size I.
    pub inter: usize,
    pub hidden: usize,
}

impl DeviceMoe {
    /// Uploads the experts of `m` (every expert MXFP4, or every expert dense — mixed stacks are a
    /// [`RuntimeError::Unsupported`]).
    pub fn upload(_arena: &mut Arena, _m: &model::weights::Moe) -> Result<Self, RuntimeError> {
        unimplemented!()
    }

    /// Random MXFP4 experts of the given shape, generated on the device (benchmarks at real
    /// model sizes without a checkpoint): codes uniform, scale bytes in a range that keeps
    /// activations O(1); biases uniform small when `bias`.
    pub fn synthetic(
        _arena: &mut Arena,
        _ops: &crate::ops::Ops,
        _n_experts: usize,
        _hidden: usize,
        _inter: usize,
        _bias: bool,
        _seed: u64,
    ) -> Result<Self, RuntimeError> {
        unimplemented!()
    }
}

/// The loaded expert kernels.
pub struct MoeKernels {
    _private: (),
}

impl MoeKernels {
    pub fn load(_ctx: &Arc<CudaContext>) -> Result<Self, RuntimeError> {
        unimplemented!()
    }

    /// Scratch elements (f32) the two launches need for `t` tokens with top-`k` routing.
    pub fn scratch_len(_m: &DeviceMoe, _t: usize, _k: usize) -> usize {
        unimplemented!()
    }

    /// `act[t][j] = glu(W_gu[ids[t][j]] · h[t] + b_gu)` for every `(t, j)`, `h` `[T, H]`,
    /// `act` `[T, k, I]`; each distinct expert read once.
    #[allow(clippy::too_many_arguments)]
    pub fn gate_up(
        &self,
        _s: &CudaStream,
        _m: &DeviceMoe,
        _glu: GluArgs,
        _h: DPtr<f32>,
        _t: usize,
        _k: usize,
        _ids: DPtr<i32>,
        _scratch: DPtr<f32>,
        _act: DPtr<f32>,
    ) -> Result<(), RuntimeError> {
        unimplemented!()
    }

    /// `y[t][j] = weights[t][j] · (W_d[ids[t][j]] · act[t][j] + b_d)`, `y` `[T, k, H]`; each
    /// distinct expert read once.
    #[allow(clippy::too_many_arguments)]
    pub fn down(
        &self,
        _s: &CudaStream,
        _m: &DeviceMoe,
        _act: DPtr<f32>,
        _t: usize,
        _k: usize,
        _ids: DPtr<i32>,
        _weights: DPtr<f32>,
        _scratch: DPtr<f32>,
        _y: DPtr<f32>,
    ) -> Result<(), RuntimeError> {
        unimplemented!()
    }
}
