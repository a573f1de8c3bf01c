//! # ultra-kernels — the committed CUDA kernel images and how to load them
//!
//! This crate owns the Rust face of the top-level `kernels/` folder: every `kernels/NAME.cu` is
//! compiled by `cargo xtask kernels` into `kernels/artifacts/NAME.sm_90a.cubin` (Hopper machine
//! code) and `kernels/artifacts/NAME.compute_90.ptx` (portable fallback that the driver JIT-compiles
//! for any GPU of compute capability ≥ 9.0). Both are committed and embedded here with
//! `include_bytes!`, so users of Ultra never need a CUDA compiler.
//!
//! It also owns the driver probe: cudarc loads `libcuda` lazily and *panics* when it is missing,
//! so every GPU entry point in Ultra calls [`open_device`] first, which turns "no driver" and "no
//! GPU" into a [`GpuUnavailable`] error.

use std::sync::Arc;

use cudarc::driver::{CudaContext, CudaModule, DriverError};
use cudarc::nvrtc::Ptx;

/// One kernel family compiled from `kernels/<name>.cu`.
#[derive(Debug, Clone, Copy)]
pub struct KernelImage {
    /// The source file stem (`mxfp4` for `kernels/mxfp4.cu`).
    pub name: &'static str,
    /// sm_90a machine code: used on compute capability 9.0 (H100, H200).
    pub cubin_sm90a: &'static [u8],
    /// compute_90 PTX: JIT-compiled by the driver on other GPUs of compute capability ≥ 9.0.
    pub ptx_compute90: &'static str,
}

macro_rules! image {
    ($name:literal) => {
        KernelImage {
            name: $name,
            cubin_sm90a: include_bytes!(concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/../../kernels/artifacts/",
                $name,
                ".sm_90a.cubin"
            )),
            ptx_compute90: include_str!(concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/../../kernels/artifacts/",
                $name,
                ".compute_90.ptx"
            )),
        }
    };
}

/// MXFP4 dequantize, activation prep and GEMV (`kernels/mxfp4.cu`).
pub const MXFP4: KernelImage = image!("mxfp4");
/// The dense ops of a decoder step: embedding, RMSNorm, linear, RoPE + KV write, attention,
/// routing, combine, GLU, argmax / sampling, random fills (`kernels/ops.cu`).
pub const OPS: KernelImage = image!("ops");
/// Measurement kernels: streaming read (the bandwidth ceiling) and on-device random fill
/// (`kernels/bench.cu`).
pub const BENCH: KernelImage = image!("bench");

/// Every embedded image (what `cargo xtask kernels --check` and the loaders agree on).
pub const ALL: &[KernelImage] = &[MXFP4, OPS, BENCH];

/// Why no GPU can be used.
#[derive(Debug, thiserror::Error)]
pub enum GpuUnavailable {
    #[error("no CUDA driver: libcuda.so could not be loaded (install the NVIDIA driver; the CPU paths need none)")]
    NoDriver,
    #[error("CUDA driver present but device {ordinal} cannot be opened: {source}")]
    NoDevice {
        ordinal: usize,
        #[source]
        source: DriverError,
    },
    #[error("device {ordinal} has compute capability {major}.{minor}; Ultra's kernels need 9.0 or newer")]
    TooOld {
        ordinal: usize,
        major: i32,
        minor: i32,
    },
}

/// True when `libcuda` can be loaded. Never panics.
pub fn driver_present() -> bool {
    // SAFETY: only tries to dlopen the library; no CUDA call is made.
    unsafe { cudarc::driver::sys::is_culib_present() }
}

/// Opens GPU `ordinal` (its primary context) after probing for the driver, and checks that it
/// can run the embedded images.
pub fn open_device(ordinal: usize) -> Result<Arc<CudaContext>, GpuUnavailable> {
    if !driver_present() {
        return Err(GpuUnavailable::NoDriver);
    }
    let ctx =
        CudaContext::new(ordinal).map_err(|source| GpuUnavailable::NoDevice { ordinal, source })?;
    let (major, minor) = ctx
        .compute_capability()
        .map_err(|source| GpuUnavailable::NoDevice { ordinal, source })?;
    if major < 9 {
        return Err(GpuUnavailable::TooOld {
            ordinal,
            major,
            minor,
        });
    }
    Ok(ctx)
}

/// Which embedded form [`load`] uses on a device of this compute capability.
pub fn uses_cubin(major: i32, minor: i32) -> bool {
    (major, minor) == (9, 0)
}

/// Loads `image` into `ctx`: the sm_90a cubin on compute capability 9.0, else the PTX.
pub fn load(ctx: &Arc<CudaContext>, image: &KernelImage) -> Result<Arc<CudaModule>, DriverError> {
    let (major, minor) = ctx.compute_capability()?;
    let module = if uses_cubin(major, minor) {
        Ptx::from_binary(image.cubin_sm90a.to_vec())
    } else {
        Ptx::from_src(image.ptx_compute90)
    };
    ctx.load_module(module)
}

/// How a GPU test reacts to a machine without a usable GPU: it prints why and returns (skips),
/// unless `ULTRA_REQUIRE_GPU=1` is set (the GPU bundle sets it), in which case it fails. Returns
/// the context when a GPU is there.
pub fn gpu_for_test(test: &str) -> Option<Arc<CudaContext>> {
    match open_device(0) {
        Ok(ctx) => Some(ctx),
        Err(why) => {
            if std::env::var("ULTRA_REQUIRE_GPU").as_deref() == Ok("1") {
                panic!("{test}: GPU required (ULTRA_REQUIRE_GPU=1) but unavailable: {why}");
            }
            // Straight to the process's stderr, past the test harness's output capture, so the
            // skip is visible in a plain `cargo test` run.
            use std::io::Write;
            let _ = writeln!(std::io::stderr(), "SKIPPED {test}: {why}");
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn images_are_embedded_and_well_formed() {
        for img in ALL {
            // ELF magic of the cubin, PTX header of the fallback, and the target each claims.
            assert_eq!(&img.cubin_sm90a[..4], b"\x7fELF", "{} cubin", img.name);
            assert!(
                img.ptx_compute90.contains(".target sm_90"),
                "{} ptx",
                img.name
            );
            assert!(
                img.ptx_compute90.contains(".version 9.0"),
                "{} ptx ISA",
                img.name
            );
        }
    }

    #[test]
    fn cubin_only_on_hopper() {
        assert!(uses_cubin(9, 0));
        assert!(!uses_cubin(10, 0));
        assert!(!uses_cubin(12, 0));
    }

    #[test]
    fn no_driver_is_an_error_not_a_panic() {
        if driver_present() {
            eprintln!("driver present: the no-driver path cannot be exercised here");
            return;
        }
        assert!(matches!(open_device(0), Err(GpuUnavailable::NoDriver)));
    }
}
