//! MXFP4 on NVIDIA GPUs (feature `cuda`): dequantize and batch-1 GEMV over stacked experts.
//!
//! The kernels live in `kernels/mxfp4.cu` and are embedded prebuilt (sm_90a cubin, compute_90 PTX
//! fallback) by `ultra-kernels`; nothing here needs a CUDA compiler. Weights are repacked once at
//! upload from the checkpoint layout into the GEMV's tiled layout ([`crate::tiled`]).
//!
//! Numerics of [`Mxfp4Gpu::gemv`]: weights are exact; each 32-value block of the activation is
//! scaled by a power of two and rounded to fp16 (11 significant bits — exact for bf16
//! activations, a relative rounding of ≤ 2^-12 per element for f32 ones); products are summed in
//! f32 on the tensor cores. The bound used by the tests is therefore
//! `|y − y_ref| ≤ (2^-11 + K·2^-23)·Σ|w·x|` for f32 activations.

use std::sync::Arc;

use cudarc::driver::{
    CudaFunction, CudaSlice, CudaStream, DriverError, LaunchConfig, PushKernelArg,
};
use half::{bf16, f16};
use ultra_kernels::GpuUnavailable;

use crate::format::{Fp4Error, MxExpertsRef, MxMatrix, MxMatrixRef, BLOCK};
use crate::tiled::{self, TiledShape};

/// Errors of the GPU path.
#[derive(Debug, thiserror::Error)]
pub enum GpuError {
    #[error(transparent)]
    Unavailable(#[from] GpuUnavailable),
    #[error("CUDA driver error: {0}")]
    Driver(#[from] DriverError),
    #[error(transparent)]
    Format(#[from] Fp4Error),
    #[error("{0}")]
    Shape(String),
}

/// Stacked MXFP4 experts resident on the device, in the tiled layout of [`crate::tiled`].
pub struct DeviceMxExperts {
    pub blocks: CudaSlice<u8>,
    pub scales: CudaSlice<u8>,
    pub experts: usize,
    pub rows: usize,
    pub k: usize,
}

impl DeviceMxExperts {
    /// The tiled shape (padding included) of these experts.
    pub fn shape(&self) -> TiledShape {
        TiledShape {
            experts: self.experts,
            rows: self.rows,
            k: self.k,
        }
    }

    /// Allocates experts of the given shape (contents zero; fill them on the device).
    pub fn alloc(
        stream: &Arc<CudaStream>,
        experts: usize,
        rows: usize,
        k: usize,
    ) -> Result<Self, GpuError> {
        if !k.is_multiple_of(BLOCK) {
            return Err(Fp4Error::KNotMultipleOfBlock { k }.into());
        }
        let shape = TiledShape { experts, rows, k };
        Ok(Self {
            blocks: stream.alloc_zeros::<u8>(shape.code_bytes())?,
            scales: stream.alloc_zeros::<u8>(shape.scale_bytes())?,
            experts,
            rows,
            k,
        })
    }

    /// Copies expert `e` back to the host in the checkpoint layout.
    pub fn download_expert(
        &self,
        stream: &Arc<CudaStream>,
        e: usize,
    ) -> Result<MxMatrix, GpuError> {
        if e >= self.experts {
            return Err(Fp4Error::OutOfRange {
                what: "expert",
                index: e,
                len: self.experts,
            }
            .into());
        }
        // Experts are contiguous in the tiled layout: copy only this one's tiles.
        let one = TiledShape {
            experts: 1,
            rows: self.rows,
            k: self.k,
        };
        let (cb, sb) = (one.code_bytes(), one.scale_bytes());
        let codes = stream.clone_dtoh(&self.blocks.slice(e * cb..(e + 1) * cb))?;
        let scales = stream.clone_dtoh(&self.scales.slice(e * sb..(e + 1) * sb))?;
        Ok(tiled::untile_expert(one, &codes, &scales, 0)?)
    }

    /// Bytes of one expert's weights (codes + scales).
    pub fn expert_bytes(&self) -> usize {
        self.rows * self.k / 2 + self.rows * self.k / BLOCK
    }
}

/// Activations for [`Mxfp4Gpu::gemv`].
pub enum Activations<'a> {
    F32(&'a CudaSlice<f32>),
    Bf16(&'a CudaSlice<bf16>),
}

/// Device scratch for the GEMV's prepared activations (fp16 values + per-block factors), rows
/// padded with zeros to whole 128-value tiles.
pub struct GemvScratch {
    xh: CudaSlice<f16>,
    xf: CudaSlice<f32>,
    rows: usize,
    k: usize,
    prepared_rows: usize,
}

/// The loaded MXFP4 kernels bound to one stream.
pub struct Mxfp4Gpu {
    stream: Arc<CudaStream>,
    dequant_f32: CudaFunction,
    dequant_bf16: CudaFunction,
    prep_f32: CudaFunction,
    prep_bf16: CudaFunction,
    gemv: CudaFunction,
    sm_count: u32,
}

const THREADS: u32 = 256;
/// Warps the GEMV aims to keep resident per SM (bytes in flight hide DRAM latency).
const GEMV_TARGET_WARPS_PER_SM: usize = 48;
const GEMV_MAX_WARPS: usize = 16;

/// K rounded up to the GEMV's 128-value tiles (the prepared activations' row length).
fn padded_k(k: usize) -> usize {
    k.div_ceil(tiled::TILE_BLOCKS * BLOCK) * tiled::TILE_BLOCKS * BLOCK
}

fn grid_for(items: usize, sm_count: u32) -> u32 {
    let blocks = items.div_ceil(THREADS as usize).max(1);
    blocks.min(sm_count as usize * 16) as u32
}

impl Mxfp4Gpu {
    /// Loads the kernels into the stream's context.
    pub fn new(stream: Arc<CudaStream>) -> Result<Self, GpuError> {
        let ctx = stream.context().clone();
        let module = ultra_kernels::load(&ctx, &ultra_kernels::MXFP4)?;
        let sm_count = ctx.attribute(
            cudarc::driver::sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT,
        )? as u32;
        Ok(Self {
            dequant_f32: module.load_function("mxfp4_dequant_f32")?,
            dequant_bf16: module.load_function("mxfp4_dequant_bf16")?,
            prep_f32: module.load_function("mxfp4_prep_act_f32")?,
            prep_bf16: module.load_function("mxfp4_prep_act_bf16")?,
            gemv: module.load_function("mxfp4_gemv")?,
            stream,
            sm_count,
        })
    }

    pub fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }

    /// Repacks validated experts into the tiled layout and copies them to the device.
    pub fn upload(&self, w: MxExpertsRef<'_>) -> Result<DeviceMxExperts, GpuError> {
        let (_, codes, scales) = tiled::tile(w);
        Ok(DeviceMxExperts {
            blocks: self.stream.clone_htod(&codes)?,
            scales: self.stream.clone_htod(&scales)?,
            experts: w.experts(),
            rows: w.rows(),
            k: w.k(),
        })
    }

    /// Copies one validated matrix to the device (as a stack of one expert).
    pub fn upload_matrix(&self, w: MxMatrixRef<'_>) -> Result<DeviceMxExperts, GpuError> {
        self.upload(MxExpertsRef::new(
            1,
            w.rows(),
            w.k(),
            w.blocks(),
            w.scales(),
        )?)
    }

    fn check_dequant_out(w: &DeviceMxExperts, len: usize) -> Result<usize, GpuError> {
        let want = w.experts * w.rows * w.k;
        if len != want {
            return Err(GpuError::Shape(format!(
                "dequantize output holds {len} values, the experts have {want}"
            )));
        }
        Ok(want / 8)
    }

    /// Launches one of the dequantize kernels (`[E, N, K]` of `T` out, tiled weights in).
    fn dequantize_with<T>(
        &self,
        kernel: &CudaFunction,
        w: &DeviceMxExperts,
        out: &mut CudaSlice<T>,
    ) -> Result<(), GpuError> {
        let n_words = Self::check_dequant_out(w, out.len())?;
        let cfg = LaunchConfig {
            grid_dim: (grid_for(n_words, self.sm_count), 1, 1),
            block_dim: (THREADS, 1, 1),
            shared_mem_bytes: 0,
        };
        let (e, n, k) = (w.experts as u32, w.rows as u32, w.k as u32);
        let mut b = self.stream.launch_builder(kernel);
        b.arg(&w.blocks)
            .arg(&w.scales)
            .arg(&e)
            .arg(&n)
            .arg(&k)
            .arg(out);
        // SAFETY: both dequantize kernels take (blocks, scales, E, N, K, out) with `out` of the
        // callers' element type; the output length was checked above.
        unsafe { b.launch(cfg) }?;
        Ok(())
    }

    /// Decodes every expert to f32, `[E, N, K]`. Exact (values beyond the f32 range become ±inf).
    pub fn dequantize_f32(
        &self,
        w: &DeviceMxExperts,
        out: &mut CudaSlice<f32>,
    ) -> Result<(), GpuError> {
        self.dequantize_with(&self.dequant_f32, w, out)
    }

    /// Decodes every expert to bf16, `[E, N, K]` (exact: E2M1 × 2^k fits bf16).
    pub fn dequantize_bf16(
        &self,
        w: &DeviceMxExperts,
        out: &mut CudaSlice<bf16>,
    ) -> Result<(), GpuError> {
        self.dequantize_with(&self.dequant_bf16, w, out)
    }

    /// Scratch for activations of `rows` × `k` (rows = 1 for a shared activation, or the number of
    /// slots for per-slot activations).
    pub fn scratch(&self, rows: usize, k: usize) -> Result<GemvScratch, GpuError> {
        if !k.is_multiple_of(BLOCK) {
            return Err(Fp4Error::KNotMultipleOfBlock { k }.into());
        }
        let k_pad = padded_k(k);
        Ok(GemvScratch {
            xh: self.stream.alloc_zeros::<f16>(rows * k_pad)?,
            xf: self.stream.alloc_zeros::<f32>(rows * k_pad / BLOCK)?,
            rows,
            k,
            prepared_rows: 0,
        })
    }

    /// Prepares activations for [`Self::gemv_prepared`]: each 32-value block scaled by a power of
    /// two and rounded to fp16, in the kernel's pair order. `x` holds `rows × K` values (rows = 1
    /// for an activation shared by every slot, or one row per slot).
    pub fn prepare(&self, x: Activations<'_>, scratch: &mut GemvScratch) -> Result<(), GpuError> {
        let x_len = match &x {
            Activations::F32(s) => s.len(),
            Activations::Bf16(s) => s.len(),
        };
        if x_len == 0 || x_len % scratch.k != 0 || x_len / scratch.k > scratch.rows {
            return Err(GpuError::Shape(format!(
                "activations hold {x_len} values: need a whole number (1..={}) of rows of K = {}",
                scratch.rows, scratch.k
            )));
        }
        let (rows, k, k_pad) = (
            (x_len / scratch.k) as u32,
            scratch.k as u32,
            padded_k(scratch.k) as u32,
        );
        let cfg = LaunchConfig {
            grid_dim: (grid_for(x_len / 8, self.sm_count), 1, 1),
            block_dim: (THREADS, 1, 1),
            shared_mem_bytes: 0,
        };
        let mut b = match x {
            Activations::F32(xs) => {
                let mut b = self.stream.launch_builder(&self.prep_f32);
                b.arg(xs);
                b
            }
            Activations::Bf16(xs) => {
                let mut b = self.stream.launch_builder(&self.prep_bf16);
                b.arg(xs);
                b
            }
        };
        b.arg(&rows)
            .arg(&k)
            .arg(&k_pad)
            .arg(&mut scratch.xh)
            .arg(&mut scratch.xf);
        // SAFETY: argument types match `mxfp4_prep_act_{f32,bf16}`; scratch size checked above.
        unsafe { b.launch(cfg) }?;
        scratch.prepared_rows = x_len / scratch.k;
        Ok(())
    }

    /// `y[s, n] = Σ_k W[expert_ids[s]][n][k] · x_s[k]` over activations already prepared in
    /// `scratch` by [`Self::prepare`]: one shared row, or one row per slot. `y` is `[slots, N]`.
    /// Expert ids are read on the device; an id outside `0..E` yields NaN rows.
    pub fn gemv_prepared(
        &self,
        w: &DeviceMxExperts,
        expert_ids: &CudaSlice<i32>,
        scratch: &GemvScratch,
        y: &mut CudaSlice<f32>,
    ) -> Result<(), GpuError> {
        let slots = expert_ids.len();
        let x_rows = scratch.prepared_rows;
        if scratch.k != w.k || !(x_rows == 1 || x_rows == slots) {
            return Err(GpuError::Shape(format!(
                "prepared activations are {x_rows} × {}; the experts need K = {} and 1 or {slots} rows",
                scratch.k, w.k
            )));
        }
        if y.len() != slots * w.rows {
            return Err(GpuError::Shape(format!(
                "output holds {}, slots × N = {}",
                y.len(),
                slots * w.rows
            )));
        }
        if slots == 0 {
            return Ok(());
        }
        let groups = w.rows.div_ceil(16);
        let ctas = slots * groups;
        let tiles = (w.k / BLOCK).div_ceil(4);
        let target = self.sm_count as usize * GEMV_TARGET_WARPS_PER_SM;
        let warps = target
            .div_ceil(ctas)
            .clamp(1, GEMV_MAX_WARPS)
            .min(tiles.max(1));
        let cfg = LaunchConfig {
            grid_dim: (ctas as u32, 1, 1),
            block_dim: (32 * warps as u32, 1, 1),
            shared_mem_bytes: 0,
        };
        let (n_experts, n, k) = (w.experts as u32, w.rows as u32, w.k as u32);
        let x_stride: u32 = if x_rows == 1 { 0 } else { padded_k(w.k) as u32 };
        let mut b = self.stream.launch_builder(&self.gemv);
        b.arg(&w.blocks)
            .arg(&w.scales)
            .arg(expert_ids)
            .arg(&n_experts)
            .arg(&n)
            .arg(&k)
            .arg(&scratch.xh)
            .arg(&scratch.xf)
            .arg(&x_stride)
            .arg(y);
        // SAFETY: argument types match `mxfp4_gemv`; every length checked above.
        unsafe { b.launch(cfg) }?;
        Ok(())
    }

    /// [`Self::prepare`] then [`Self::gemv_prepared`]: `x` is one activation of K values shared by
    /// all slots (the gate/up projection of one token) or one per slot, `[slots, K]` (the down
    /// projection).
    pub fn gemv(
        &self,
        w: &DeviceMxExperts,
        expert_ids: &CudaSlice<i32>,
        x: Activations<'_>,
        scratch: &mut GemvScratch,
        y: &mut CudaSlice<f32>,
    ) -> Result<(), GpuError> {
        if scratch.k != w.k {
            return Err(GpuError::Shape(format!(
                "scratch is for K = {}, the experts have K = {}",
                scratch.k, w.k
            )));
        }
        self.prepare(x, scratch)?;
        self.gemv_prepared(w, expert_ids, scratch, y)
    }
}

/// f32 roundings on the longest path through [`Mxfp4Gpu::gemv`], in units of u = 2^-24, for the
/// error model of [`crate::cpu::dot_error_bound`]: rounding an f32 activation to fp16 (relative
/// 2^-11 = 8192 u; none for bf16 activations, which fp16 holds exactly after the power-of-two
/// block scaling); then, doubled because tensor-core accumulation need not round to nearest, 32
/// additions inside a block (8 chained mma of 4 products per column), the scale multiply-add into
/// the lane sum for each of the K/32 blocks, one shuffle and ≤ 16 warp partials.
pub fn gemv_roundings(k: usize, bf16_activations: bool) -> usize {
    let activation = if bf16_activations { 0 } else { 8192 };
    activation + 2 * (BLOCK + k / BLOCK + 1 + 16)
}

/// The per-row error bound of [`Mxfp4Gpu::gemv`] against the exact result:
/// [`crate::cpu::dot_error_bound`] with [`gemv_roundings`], plus the fp16 subnormal rounding of
/// activations far below their block's maximum (absolute error ≤ amax_b · 2^-39 each, since the
/// block is scaled so that amax_b lands in [2^14, 2^15)).
pub fn gemv_error_bound(w: MxMatrixRef<'_>, x: &[f32], bf16_activations: bool) -> Vec<f64> {
    let relative = crate::cpu::dot_error_bound(w, x, gemv_roundings(w.k(), bf16_activations));
    relative
        .into_iter()
        .enumerate()
        .map(|(r, bound)| {
            let mut subnormal = 0f64;
            for (b, xb) in x.chunks_exact(BLOCK).enumerate() {
                let amax = xb.iter().fold(0f32, |m, v| m.max(v.abs())) as f64;
                let wsum: f64 = (0..BLOCK).map(|i| w.get_f64(r, b * BLOCK + i).abs()).sum();
                subnormal += amax * wsum;
            }
            bound + subnormal * 2f64.powi(-39)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    /// The launch bound of `mxfp4_gemv` is the kernel ABI's limit (`kernels/common/abi.cuh`).
    #[test]
    fn gemv_max_warps_is_the_kernel_limit() {
        assert_eq!(
            ultra_kernels::abi::limit("GEMV_MAX_WARPS"),
            Some(super::GEMV_MAX_WARPS as u64)
        );
    }
}
