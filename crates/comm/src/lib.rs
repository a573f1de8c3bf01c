//! # comm — communication between the GPUs of one node
//!
//! Owns Ultra's multi-GPU data movement:
//! * [`topology`]: the device probe (GPUs, peer access and link kind between each pair, NCCL
//!   version) that `ultra devices` prints and every multi-GPU entry point checks first.
//! * [`nccl`]: NCCL communicators for one process driving N GPUs (one stream per GPU) with
//!   all-reduce / all-gather / all-to-all, through cudarc's NCCL 2.28 bindings. libnccl is loaded
//!   at run time and found where pip or the system installed it ([`nccl::load_nccl`]).
//! * [`symmetric`]: symmetric buffers (per-rank data regions and flag tables, every rank holding
//!   every peer's pointers) and the **one-shot all-reduce** kernel of `kernels/comm.cu`
//!   (flags with release/acquire and per-block epochs; fp32 accumulation in rank order; the
//!   residual add and the next RMSNorm fusable), capturable in CUDA graphs. Ranks may share a
//!   GPU ("virtual ranks"), which is how the protocol is tested on one GPU.
//! * [`abi`]: the Rust mirror of `kernels/common/comm_abi.cuh`.
//!
//! NVLink multicast (NVLS) is never used: the process sets `NCCL_NVLS_ENABLE=0` itself before any
//! NCCL communicator is created ([`disable_nvls`]), and no kernel here uses multimem.
//! Every failure (no driver, no libnccl, fewer GPUs than asked, no peer access) is a
//! [`CommError`], never a panic.

pub mod abi;
pub mod nccl;
pub mod symmetric;
pub mod topology;

use cudarc::driver::DriverError;
use thiserror::Error;

pub use nccl::{nccl_version, NcclComms, NcclRank, NcclVersion};
pub use symmetric::{AllReduce, DType, Epilogue, SymmetricGroup};
pub use topology::{DeviceInfo, Link, PeerLink, Topology};

/// Why a communication setup or call failed.
#[derive(Debug, Error)]
pub enum CommError {
    #[error(
        "libnccl.so not found (NCCL is loaded at run time: install NCCL 2.28 or newer, e.g. \
         `pip install nvidia-nccl-cu13`, or point ULTRA_NCCL_LIB at libnccl.so.2)"
    )]
    NoNccl,
    #[error("NCCL error: {}", nccl::describe(.0))]
    Nccl(cudarc::nccl::result::NcclError),
    #[error("no CUDA driver: libcuda.so could not be loaded (multi-GPU needs the NVIDIA driver)")]
    NoDriver,
    #[error("CUDA error while {what}: {source}")]
    Driver {
        what: String,
        #[source]
        source: DriverError,
    },
    #[error("asked for GPU {asked} but this machine has {available} GPU(s)")]
    TooFewGpus { asked: usize, available: usize },
    #[error("GPU {0} is listed twice (NCCL needs one rank per GPU; virtual ranks are for the one-shot all-reduce only)")]
    DuplicateDevice(usize),
    #[error("GPU {from} cannot access GPU {to}'s memory (no P2P between them: cuDeviceCanAccessPeer = 0)")]
    NoPeerAccess { from: usize, to: usize },
    #[error("rank {rank}: all-reduce call {call} of the group waited more than {timeout_ms} ms for rank {peer} (block {block}): rank {peer} never issued its side of that call; the group's flags are now inconsistent: reset it")]
    Timeout {
        rank: usize,
        peer: usize,
        block: usize,
        /// The call's number since the group was created or reset (1 = the first all-reduce).
        call: u64,
        timeout_ms: u64,
    },
    #[error("{0}")]
    Invalid(String),
}

impl CommError {
    pub(crate) fn driver(what: impl Into<String>) -> impl FnOnce(DriverError) -> CommError {
        let what = what.into();
        move |source| CommError::Driver { what, source }
    }
}

/// Sets `NCCL_NVLS_ENABLE=0` in this process's environment (NCCL reads it when a communicator is
/// created). NVLink multicast can put a shared host's GPUs out of service; Ultra never uses it.
pub fn disable_nvls() {
    if std::env::var("NCCL_NVLS_ENABLE").as_deref() != Ok("0") {
        // Edition 2021: set_var is safe; it is called before NCCL (and its threads) start.
        std::env::set_var("NCCL_NVLS_ENABLE", "0");
    }
}

/// The CUDA devices this machine has: 0 without a driver (never panics).
pub fn device_count() -> Result<usize, CommError> {
    if !ultra_kernels::driver_present() {
        return Err(CommError::NoDriver);
    }
    cudarc::driver::result::init().map_err(CommError::driver("initialising the CUDA driver"))?;
    let n =
        cudarc::driver::result::device::get_count().map_err(CommError::driver("counting GPUs"))?;
    Ok(n.max(0) as usize)
}

/// Checks that every ordinal of `devices` exists on a machine with `available` GPUs.
pub fn check_devices(devices: &[usize], available: usize) -> Result<(), CommError> {
    if devices.is_empty() {
        return Err(CommError::Invalid("no GPUs were asked for".into()));
    }
    match devices.iter().find(|&&d| d >= available) {
        Some(&asked) => Err(CommError::TooFewGpus { asked, available }),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn version_code_decodes() {
        assert_eq!(
            NcclVersion::from_code(22803),
            NcclVersion {
                major: 2,
                minor: 28,
                patch: 3
            }
        );
        assert_eq!(NcclVersion::from_code(22803).to_string(), "2.28.3");
    }

    #[test]
    fn missing_library_is_an_error() {
        match nccl_version() {
            Ok(v) => assert!(v.major >= 2, "implausible NCCL version {v}"),
            Err(e) => assert!(matches!(e, CommError::NoNccl), "{e}"),
        }
    }

    #[test]
    fn too_few_gpus_is_an_error() {
        assert!(check_devices(&[0, 1], 2).is_ok());
        match check_devices(&[0, 1, 2], 2) {
            Err(CommError::TooFewGpus { asked, available }) => {
                assert_eq!((asked, available), (2, 2));
            }
            other => panic!("{other:?}"),
        }
        let e = check_devices(&[0, 3], 0).unwrap_err();
        assert_eq!(
            e.to_string(),
            "asked for GPU 0 but this machine has 0 GPU(s)"
        );
        assert!(matches!(check_devices(&[], 8), Err(CommError::Invalid(_))));
    }

    #[test]
    fn disable_nvls_sets_the_variable() {
        disable_nvls();
        assert_eq!(std::env::var("NCCL_NVLS_ENABLE").as_deref(), Ok("0"));
    }
}
