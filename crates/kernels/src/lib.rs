//! # ultra-kernels — the committed CUDA kernel images and how to load them
//!
//! This crate owns the Rust face of the top-level `kernels/` folder: every `kernels/NAME.cu` (one
//! op family; shared device code in `kernels/common/*.cuh`) is compiled by `cargo xtask kernels`
//! into `kernels/artifacts/NAME.sm_90a.cubin` (Hopper machine code) and
//! `kernels/artifacts/NAME.compute_90.ptx` (portable fallback that the driver JIT-compiles for any
//! GPU of compute capability ≥ 9.0). Both are committed and embedded here with `include_bytes!`,
//! so users of Ultra never need a CUDA compiler. Each image loads as one CUDA module; a
//! [`KernelSet`] is several images loaded together whose kernels are found by name (kernel names
//! are unique across [`ALL`]).
//!
//! The kernel ABI (structs passed by value, limits) is `kernels/common/abi.cuh`, embedded as
//! [`ABI_HEADER`]; [`abi`] reads its limits and layout asserts so the Rust mirror (tilert's
//! `abi` module) can be tested against it.
//!
//! It also owns the driver probe: cudarc loads `libcuda` lazily and *panics* when it is missing,
//! so every GPU entry point in Ultra calls [`open_device`] first, which turns "no driver" and "no
//! GPU" into a [`GpuUnavailable`] error.

pub mod abi;

use std::collections::HashMap;
use std::sync::Arc;

use cudarc::driver::{sys, CudaContext, CudaFunction, CudaModule, DriverError};
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

/// MXFP4 dequantize, activation prep and GEMV, and the routed-expert kernels (`kernels/mxfp4.cu`).
pub const MXFP4: KernelImage = image!("mxfp4");
/// Deterministic random fills of device buffers (`kernels/fill.cu`).
pub const FILL: KernelImage = image!("fill");
/// Token embedding (`kernels/embed.cu`).
pub const EMBED: KernelImage = image!("embed");
/// RMSNorm (`kernels/norm.cu`).
pub const NORM: KernelImage = image!("norm");
/// Dense linear layers, bf16 / f32 weights (`kernels/linear.cu`).
pub const LINEAR: KernelImage = image!("linear");
/// RoPE + KV-cache write, the fused QKV projection with RoPE, and their batched-decode variants
/// (`kernels/rope.cu`).
pub const ROPE: KernelImage = image!("rope");
/// Attention (flash-decoding), single-sequence and batched decode (`kernels/attention.cu`).
pub const ATTENTION: KernelImage = image!("attention");
/// The dense side of a MoE block: GLU and the combine with the next norm fused (`kernels/moe.cu`).
pub const MOE: KernelImage = image!("moe");
/// Expert parallelism: a rank's routing localized to its experts and its partial combine
/// (`kernels/ep.cu`).
pub const EP: KernelImage = image!("ep");
/// Routing, and the router fused with the post-attention norm (`kernels/router.cu`).
pub const ROUTER: KernelImage = image!("router");
/// Argmax and sampling (`kernels/sampling.cu`).
pub const SAMPLING: KernelImage = image!("sampling");
/// Dense projections from tiled FP8 (e4m3, 128×128 block scales) or BF16 weights, batch 1..16
/// (`kernels/proj.cu`).
pub const PROJ: KernelImage = image!("proj");
/// Measurement kernels: streaming read (the bandwidth ceiling) and on-device random fill
/// (`kernels/bench.cu`).
pub const BENCH: KernelImage = image!("bench");
/// The persistent engine's resident kernels: one block per SM runs its compiled instruction
/// stream, cross-SM dependencies through epoch counters (`kernels/persistent.cu`; loaded by
/// tilert's `persistent::device`).
pub const PERSISTENT: KernelImage = image!("persistent");
/// Communication: the one-shot all-reduce over peer memory, bf16 / f32 partials, with the
/// residual add and the next RMSNorm fusable (`kernels/comm.cu`; loaded by the `comm` crate).
pub const COMM: KernelImage = image!("comm");

/// The op families of a decoder step's dense ops (what tilert's `Ops` loads as one
/// [`KernelSet`]).
pub const OPS: &[KernelImage] = &[
    FILL, EMBED, NORM, LINEAR, ROPE, ATTENTION, MOE, ROUTER, SAMPLING,
];

/// Every embedded image (what `cargo xtask kernels --check` and the loaders agree on).
pub const ALL: &[KernelImage] = &[
    MXFP4, FILL, EMBED, NORM, LINEAR, ROPE, ATTENTION, MOE, ROUTER, SAMPLING, PROJ, BENCH, COMM,
    PERSISTENT, EP,
];

/// `kernels/common/abi.cuh`: the structs kernels take by value and the limits the host checks.
pub const ABI_HEADER: &str = include_str!(concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../../kernels/common/abi.cuh"
));

/// `kernels/common/persistent_abi.cuh`: the persistent engine's instruction and argument records
/// and opcodes (tilert's `persistent::abi` mirrors it).
pub const PERSISTENT_ABI_HEADER: &str = include_str!(concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../../kernels/common/persistent_abi.cuh"
));

impl KernelImage {
    /// The names of the image's kernels (its PTX `.entry` points), in file order.
    pub fn kernels(&self) -> Vec<&'static str> {
        let ptx = self.ptx_compute90;
        let mut names = Vec::new();
        for line in ptx.lines() {
            let Some(rest) = line.trim_start().strip_prefix(".visible .entry ") else {
                continue;
            };
            let end = rest.find(['(', ' ']).unwrap_or(rest.len());
            // Borrow from the 'static PTX rather than the line iterator's lifetime.
            let start = rest.as_ptr() as usize - ptx.as_ptr() as usize;
            names.push(&ptx[start..start + end]);
        }
        names
    }
}

/// Several kernel images loaded into one context, their kernels found by name (the op families
/// of [`OPS`] are one set: callers need not know which family file defines a kernel).
pub struct KernelSet {
    modules: Vec<Arc<CudaModule>>,
    /// Kernel name → index into `modules`.
    index: HashMap<&'static str, usize>,
}

impl KernelSet {
    /// The kernel `name`, from whichever image defines it; `CUDA_ERROR_NOT_FOUND` when none does.
    pub fn load_function(&self, name: &str) -> Result<CudaFunction, DriverError> {
        match self.index.get(name) {
            Some(&m) => self.modules[m].load_function(name),
            None => Err(DriverError(sys::CUresult::CUDA_ERROR_NOT_FOUND)),
        }
    }
}

/// Loads every image of `images` into `ctx` (see [`load`]) as one [`KernelSet`].
pub fn load_set(
    ctx: &Arc<CudaContext>,
    images: &[KernelImage],
) -> Result<Arc<KernelSet>, DriverError> {
    let mut modules = Vec::with_capacity(images.len());
    let mut index = HashMap::new();
    for (m, image) in images.iter().enumerate() {
        modules.push(load(ctx, image)?);
        for name in image.kernels() {
            index.insert(name, m);
        }
    }
    Ok(Arc::new(KernelSet { modules, index }))
}

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

/// The seed of a randomized GPU test: `ULTRA_TEST_SEED` when set (to replay a run), else the
/// clock. Printed with the test's name so a failing run can be replayed.
pub fn test_seed(test: &str) -> u64 {
    let seed = std::env::var("ULTRA_TEST_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos() as u64)
                .unwrap_or(1)
        });
    println!("{test}: seed {seed}");
    seed
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
    fn kernel_names_are_unique_across_images() {
        let mut seen = std::collections::HashMap::new();
        for img in ALL {
            let names = img.kernels();
            assert!(
                !names.is_empty(),
                "{}: no kernels found in its PTX",
                img.name
            );
            for n in names {
                if let Some(other) = seen.insert(n, img.name) {
                    panic!("kernel {n} is defined by both {other} and {}", img.name);
                }
            }
        }
        // A few of the names tilert loads, each from its family's image.
        let family = |n: &str| seen.get(n).copied();
        assert_eq!(family("rms_norm"), Some("norm"));
        assert_eq!(family("linear_bf16_t16_r4"), Some("linear"));
        assert_eq!(family("linear_qkv_rope_rows_f32_t1"), Some("rope"));
        assert_eq!(family("attention_gqa_rows"), Some("attention"));
        assert_eq!(family("router_route_bf16_t1"), Some("router"));
        assert_eq!(family("sample"), Some("sampling"));
        assert_eq!(family("moe_mx_gate_up_np1"), Some("mxfp4"));
        assert_eq!(family("ep_combine"), Some("ep"));
        assert_eq!(family("no_such_kernel"), None);
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
