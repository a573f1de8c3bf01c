//! `ultra devices`: the GPUs this machine offers Ultra, the peer-access / link matrix between
//! them (P2P yes/no, NVLink or PCIe) and the NCCL library found — or a clear sentence when there
//! is no driver, no GPU or no libnccl. The probe is `comm::Topology`.

use comm::{CommError, Topology};

/// The report `ultra devices` prints (never fails: every missing piece is a sentence).
pub fn report() -> String {
    match Topology::probe() {
        Ok(t) if t.devices.is_empty() => format!(
            "no GPU: the CUDA driver is present but reports no device; Ultra runs on the CPU\n{}",
            nccl_line(&t.nccl)
        ),
        Ok(t) => t.to_string(),
        Err(CommError::NoDriver) => format!(
            "no GPU: no CUDA driver (libcuda.so not loadable); Ultra runs on the CPU\n{}",
            nccl_line(&comm::nccl_version().map_err(|e| e.to_string()))
        ),
        Err(e) => format!(
            "GPU probe failed: {e}\n{}",
            nccl_line(&comm::nccl_version().map_err(|e| e.to_string()))
        ),
    }
}

fn nccl_line(v: &Result<comm::NcclVersion, String>) -> String {
    match v {
        Ok(v) => format!("NCCL {v} (NVLink multicast disabled: NCCL_NVLS_ENABLE=0)"),
        Err(e) => format!("NCCL unavailable: {e}"),
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn nccl_line_says_what_is_missing() {
        let l = super::nccl_line(&Err("libnccl.so not found".into()));
        assert_eq!(l, "NCCL unavailable: libnccl.so not found");
        let v = comm::NcclVersion::from_code(22803);
        assert!(super::nccl_line(&Ok(v)).starts_with("NCCL 2.28.3"));
    }
}
