//! # tilert — Ultra's GPU runtime
//!
//! Owns everything that runs a model on NVIDIA GPUs: device selection, the memory arena, the
//! registry of the embedded kernel images, the op-by-op executor captured as CUDA graphs, and later
//! the persistent warp-specialized engine and its timeline profiler (see `DESIGN.md`).
//!
//! * [`Device::open`] probes for the driver (a missing `libcuda` becomes an error, not a panic)
//!   and reports what the kernels and the roofline need to know;
//! * [`arena`]: device memory ownership and the raw typed pointers kernels take;
//! * [`tensor`]: device weight matrices (bf16 when lossless, else f32);
//! * [`ops`]: the dense ops of a step (one `kernels/*.cu` per op family); [`moe`]: routed
//!   experts (`kernels/mxfp4.cu`); [`abi`]: the structs and limits shared with the kernels
//!   (`kernels/common/abi.cuh`), with their layout test;
//! * [`exec`]: the op-by-op executor (`GpuModel`, `GpuSession`) with decode / verify steps
//!   captured as CUDA graphs, and batched decode of many sessions in one pass (`GpuBatch`;
//!   its KV-cache ops: [`ops::rows`]); every pass is a `model::plan::Plan` lowered to launches
//!   by `exec::lower`;
//! * [`draft`]: DFlash drafters on the GPU (`GpuDrafter`, `GpuDraftSession`) from the
//!   model-level drafter types (`model::drafter`), their passes lowered the same way.
//!
//! Dependencies point down: this crate builds on `model` (config, weights, spec, sampling, the
//! drafter types) and never on the CPU executor (`model`'s `cpu` module, the oracle of its tests only) or
//! on the speculative loop: the loop's GPU backend (`GpuSpec`) is `dflash::gpu` (feature
//! `cuda`), which depends on this crate.

pub mod abi;
pub mod arena;
pub mod draft;
pub mod exec;
pub mod launch;
pub mod moe;
pub mod ops;
pub mod persistent;
pub mod sample;
pub mod tensor;

use std::sync::Arc;

use cudarc::driver::sys::CUdevice_attribute as Attr;
use cudarc::driver::{CudaContext, DriverError};
pub use ultra_kernels::GpuUnavailable;

/// Errors of the GPU runtime.
#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    #[error(transparent)]
    Unavailable(#[from] GpuUnavailable),
    #[error("CUDA driver error: {0}")]
    Driver(#[from] DriverError),
    #[error("out of GPU memory allocating {what}: {bytes} bytes requested, {free} bytes free")]
    OutOfMemory {
        what: String,
        bytes: usize,
        free: usize,
    },
    #[error("unsupported on the GPU: {0}")]
    Unsupported(String),
    #[error("invalid argument: {0}")]
    Invalid(String),
    /// A collective (the tensor-parallel all-reduce) failed: no peer access, a timeout, ...
    #[error(transparent)]
    Comm(#[from] comm::CommError),
    #[error("{pass}: {source}")]
    Op {
        pass: String,
        #[source]
        source: Box<RuntimeError>,
    },
}

/// What Ultra needs to know about a GPU.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceInfo {
    pub ordinal: usize,
    pub name: String,
    pub compute_capability: (i32, i32),
    pub multiprocessors: u32,
    pub total_memory_bytes: usize,
    pub l2_cache_bytes: usize,
    /// Whether the embedded sm_90a cubins run natively (else the PTX is JIT-compiled).
    pub native_cubin: bool,
}

/// An opened GPU (its primary context).
pub struct Device {
    pub ctx: Arc<CudaContext>,
    pub info: DeviceInfo,
}

impl Device {
    /// Opens GPU `ordinal`; fails with a clear error when there is no driver or device.
    pub fn open(ordinal: usize) -> Result<Self, RuntimeError> {
        let ctx = ultra_kernels::open_device(ordinal)?;
        let (major, minor) = ctx.compute_capability()?;
        let info = DeviceInfo {
            ordinal,
            name: ctx.name()?,
            compute_capability: (major, minor),
            multiprocessors: ctx.attribute(Attr::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)? as u32,
            total_memory_bytes: ctx.total_mem()?,
            l2_cache_bytes: ctx.attribute(Attr::CU_DEVICE_ATTRIBUTE_L2_CACHE_SIZE)? as usize,
            native_cubin: ultra_kernels::uses_cubin(major, minor),
        };
        Ok(Self { ctx, info })
    }

    /// Number of CUDA devices; 0 when there is no driver.
    pub fn count() -> usize {
        if !ultra_kernels::driver_present() {
            return 0;
        }
        CudaContext::device_count().map(|n| n as usize).unwrap_or(0)
    }
}

impl std::fmt::Display for DeviceInfo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "GPU {}: {} (sm_{}{}), {} SMs, {:.1} GiB, L2 {} MiB, kernels: {}",
            self.ordinal,
            self.name,
            self.compute_capability.0,
            self.compute_capability.1,
            self.multiprocessors,
            self.total_memory_bytes as f64 / (1u64 << 30) as f64,
            self.l2_cache_bytes >> 20,
            if self.native_cubin {
                "sm_90a cubin"
            } else {
                "compute_90 PTX (JIT)"
            }
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn open_reports_or_explains() {
        match Device::open(0) {
            Ok(d) => {
                assert!(d.info.multiprocessors > 0);
                assert!(d.info.compute_capability.0 >= 9);
            }
            Err(e) => {
                assert_eq!(
                    Device::count(),
                    0,
                    "a device exists but could not be opened: {e}"
                );
                assert!(!e.to_string().is_empty());
            }
        }
    }
}
