//! Kernel launches with programmatic dependent launch (PDL).
//!
//! Every kernel of the op families (`kernels/*.cu`, including the MoE kernels of
//! `kernels/mxfp4.cu`) begins with `pdl_begin()` (`griddepcontrol.wait` then
//! `griddepcontrol.launch_dependents`), so they may be launched with the
//! programmatic-stream-serialization attribute: the next kernel's blocks start
//! as soon as the current kernel's blocks are all running, do what needs no earlier result (the
//! linear kernels prefetch their weights into L2), then wait for the predecessor to complete.
//! Captured into a CUDA graph the attribute becomes a programmatic edge.
//!
//! Measured on an H100 (BENCHMARKS.md, 2026-11-21) the gpt-oss-20b decode step was *slower* with
//! PDL (3.34 ms) than without (2.95 ms), so it is off by default: `ULTRA_PDL=1` turns it on (and
//! with it the linear kernels' L2 prefetch), for comparison.

use std::ffi::c_void;
use std::sync::OnceLock;

use cudarc::driver::{sys, CudaFunction, CudaStream};

use crate::RuntimeError;

/// Whether launches carry the PDL attribute (`ULTRA_PDL=1`; read once).
pub fn pdl_enabled() -> bool {
    static ON: OnceLock<bool> = OnceLock::new();
    *ON.get_or_init(|| std::env::var("ULTRA_PDL").is_ok_and(|v| v == "1"))
}

/// Enqueues `f` on `s`.
///
/// # Safety
/// `params` must hold one pointer per kernel parameter, in order, each to a live value of that
/// parameter's C type; device addresses among them must point at buffers the kernel may access
/// for the lengths the caller validated; the kernel must call `pdl_begin()` before touching any
/// memory an earlier kernel writes.
pub(crate) unsafe fn launch_raw(
    s: &CudaStream,
    f: &CudaFunction,
    grid: (u32, u32, u32),
    block: u32,
    shared_mem_bytes: u32,
    params: &mut [*mut c_void],
) -> Result<(), RuntimeError> {
    s.context().bind_to_thread()?;
    // SAFETY: a zeroed CUlaunchAttribute is a valid value (id 0 = ignored, union of plain data).
    let mut attr: sys::CUlaunchAttribute = unsafe { std::mem::zeroed() };
    attr.id = sys::CUlaunchAttributeID::CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION;
    attr.value.programmaticStreamSerializationAllowed = 1;
    let cfg = sys::CUlaunchConfig {
        gridDimX: grid.0,
        gridDimY: grid.1,
        gridDimZ: grid.2,
        blockDimX: block,
        blockDimY: 1,
        blockDimZ: 1,
        sharedMemBytes: shared_mem_bytes,
        hStream: s.cu_stream(),
        attrs: &mut attr,
        numAttrs: u32::from(pdl_enabled()),
    };
    // SAFETY: the configuration and attribute outlive the call; the caller vouches for params.
    unsafe {
        sys::cuLaunchKernelEx(
            &cfg,
            f.cu_function(),
            params.as_mut_ptr(),
            std::ptr::null_mut(),
        )
    }
    .result()?;
    Ok(())
}
