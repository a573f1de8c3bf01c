//! # comm — communication between the GPUs of one node
//!
//! Owns Ultra's multi-GPU data movement: NCCL communicators through cudarc's `nccl` bindings
//! (pinned to the NCCL 2.28 API that the target machines ship), and — with the tensor-parallel
//! MoE work — peer-to-peer buffers over NVLink and a one-shot all-reduce signalled with flags.
//! NVLink multicast (NVLS) is never used: `NCCL_NVLS_ENABLE=0` stays set.
//!
//! Today it provides the probe every multi-GPU entry point starts with: cudarc loads `libnccl.so`
//! lazily and panics when it is missing, so [`nccl_version`] checks for the library first.

use thiserror::Error;

/// Why NCCL cannot be used.
#[derive(Debug, Error)]
pub enum CommError {
    #[error("libnccl.so not found (NCCL is loaded at run time; install NCCL 2.28 or newer)")]
    NoNccl,
    #[error("NCCL error: {0:?}")]
    Nccl(cudarc::nccl::result::NcclError),
}

/// A decoded NCCL version (e.g. 2.28.3).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct NcclVersion {
    pub major: u32,
    pub minor: u32,
    pub patch: u32,
}

impl NcclVersion {
    /// Decodes `ncclGetVersion`'s integer (major·10000 + minor·100 + patch since 2.9).
    pub fn from_code(code: i32) -> Self {
        let code = code.max(0) as u32;
        Self {
            major: code / 10000,
            minor: (code / 100) % 100,
            patch: code % 100,
        }
    }
}

impl std::fmt::Display for NcclVersion {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}.{}.{}", self.major, self.minor, self.patch)
    }
}

/// The version of the NCCL library found at run time; never panics when it is absent.
pub fn nccl_version() -> Result<NcclVersion, CommError> {
    // SAFETY: only tries to dlopen the library.
    if !unsafe { cudarc::nccl::sys::is_culib_present() } {
        return Err(CommError::NoNccl);
    }
    cudarc::nccl::result::get_nccl_version()
        .map(NcclVersion::from_code)
        .map_err(CommError::Nccl)
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
}
