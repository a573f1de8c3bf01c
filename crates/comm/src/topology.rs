//! The device probe: every GPU (name, compute capability, memory, PCI bus id), the peer matrix
//! (P2P access via `cuDeviceCanAccessPeer`, the driver's P2P attributes, and the link kind —
//! NVLink or PCIe — from NVML's `nvmlDeviceGetP2PStatus` where libnvidia-ml is present), and the
//! NCCL version. `ultra devices` prints it; multi-GPU setups check it first.

use std::fmt;

use cudarc::driver::sys;

use crate::{CommError, NcclVersion};

/// One GPU.
#[derive(Debug, Clone, PartialEq)]
pub struct DeviceInfo {
    pub ordinal: usize,
    pub name: String,
    pub compute_capability: (i32, i32),
    pub total_mem_bytes: usize,
    pub sm_count: i32,
    pub pci_bus_id: String,
}

/// How two GPUs are connected, as far as the driver and NVML tell.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Link {
    NvLink,
    Pcie,
    /// P2P is possible but NVML (libnvidia-ml) could not say over what.
    Unknown,
}

impl fmt::Display for Link {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Link::NvLink => "NVLink",
            Link::Pcie => "PCIe",
            Link::Unknown => "link?",
        })
    }
}

/// Peer access from one GPU to another.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PeerLink {
    /// `cuDeviceCanAccessPeer`: this GPU can map the other's memory.
    pub can_access: bool,
    /// `CU_DEVICE_P2P_ATTRIBUTE_NATIVE_ATOMIC_SUPPORTED`.
    pub native_atomics: bool,
    /// `CU_DEVICE_P2P_ATTRIBUTE_PERFORMANCE_RANK` (lower is better).
    pub performance_rank: i32,
    pub link: Link,
}

/// What this machine offers for multi-GPU work.
#[derive(Debug, Clone)]
pub struct Topology {
    pub devices: Vec<DeviceInfo>,
    /// `peers[i][j]` for i ≠ j (None on the diagonal).
    pub peers: Vec<Vec<Option<PeerLink>>>,
    /// The NCCL version, or why NCCL cannot be used.
    pub nccl: Result<NcclVersion, String>,
    /// Whether NVML answered (else links are [`Link::Unknown`]).
    pub nvml: bool,
}

fn drv<T>(what: &str, r: Result<T, cudarc::driver::DriverError>) -> Result<T, CommError> {
    r.map_err(CommError::driver(what.to_string()))
}

fn check(what: &str, r: sys::CUresult) -> Result<(), CommError> {
    drv(what, r.result())
}

impl Topology {
    /// Probes every GPU and pair. `Err(NoDriver)` without a driver; zero GPUs is a topology
    /// with no devices.
    pub fn probe() -> Result<Self, CommError> {
        use cudarc::driver::result::device;
        let n = crate::device_count()?;
        let mut devices = Vec::with_capacity(n);
        let mut handles = Vec::with_capacity(n);
        for ordinal in 0..n {
            let dev = drv("opening a device", device::get(ordinal as i32))?;
            handles.push(dev);
            let name = drv("reading a device name", device::get_name(dev))?;
            // SAFETY: dev is a valid device handle from get().
            let total = drv("reading device memory", unsafe { device::total_mem(dev) })?;
            let attr = |a| {
                // SAFETY: as above.
                drv("reading a device attribute", unsafe {
                    device::get_attribute(dev, a)
                })
            };
            use sys::CUdevice_attribute::*;
            let cc = (
                attr(CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR)?,
                attr(CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR)?,
            );
            let sm_count = attr(CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)?;
            let mut bus = [0 as std::ffi::c_char; 32];
            // SAFETY: the buffer holds 32 bytes, as passed.
            check("reading a PCI bus id", unsafe {
                sys::cuDeviceGetPCIBusId(bus.as_mut_ptr(), bus.len() as i32, dev)
            })?;
            // SAFETY: the driver wrote a NUL-terminated string into the buffer.
            let pci_bus_id = unsafe { std::ffi::CStr::from_ptr(bus.as_ptr()) }
                .to_string_lossy()
                .into_owned();
            devices.push(DeviceInfo {
                ordinal,
                name,
                compute_capability: cc,
                total_mem_bytes: total,
                sm_count,
                pci_bus_id,
            });
        }
        let nvml = if n > 1 { nvml::Nvml::open() } else { None };
        let mut peers = vec![vec![None; n]; n];
        for i in 0..n {
            for j in 0..n {
                if i == j {
                    continue;
                }
                let (a, b) = (handles[i], handles[j]);
                let mut can = 0;
                // SAFETY: valid handles, out-pointer to a live int.
                check("cuDeviceCanAccessPeer", unsafe {
                    sys::cuDeviceCanAccessPeer(&mut can, a, b)
                })?;
                let p2p = |attr| -> Result<i32, CommError> {
                    let mut v = 0;
                    // SAFETY: as above.
                    check("cuDeviceGetP2PAttribute", unsafe {
                        sys::cuDeviceGetP2PAttribute(&mut v, attr, a, b)
                    })?;
                    Ok(v)
                };
                use sys::CUdevice_P2PAttribute::*;
                let atomics = p2p(CU_DEVICE_P2P_ATTRIBUTE_NATIVE_ATOMIC_SUPPORTED)? != 0;
                let rank = p2p(CU_DEVICE_P2P_ATTRIBUTE_PERFORMANCE_RANK)?;
                let link = nvml
                    .as_ref()
                    .and_then(|m| m.link(&devices[i].pci_bus_id, &devices[j].pci_bus_id))
                    .unwrap_or(Link::Unknown);
                peers[i][j] = Some(PeerLink {
                    can_access: can != 0,
                    native_atomics: atomics,
                    performance_rank: rank,
                    link,
                });
            }
        }
        Ok(Self {
            devices,
            peers,
            nccl: crate::nccl_version().map_err(|e| e.to_string()),
            nvml: nvml.is_some(),
        })
    }

    /// Checks that every pair of `devices` (distinct ordinals) has peer access both ways.
    pub fn check_peer_access(&self, devices: &[usize]) -> Result<(), CommError> {
        crate::check_devices(devices, self.devices.len())?;
        for &a in devices {
            for &b in devices {
                if a != b && !self.peers[a][b].is_some_and(|p| p.can_access) {
                    return Err(CommError::NoPeerAccess { from: a, to: b });
                }
            }
        }
        Ok(())
    }
}

impl fmt::Display for Topology {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let n = self.devices.len();
        writeln!(f, "{n} GPU(s)")?;
        for d in &self.devices {
            writeln!(
                f,
                "  GPU {}: {} (sm_{}{}, {} SMs, {:.1} GiB, PCI {})",
                d.ordinal,
                d.name,
                d.compute_capability.0,
                d.compute_capability.1,
                d.sm_count,
                d.total_mem_bytes as f64 / (1u64 << 30) as f64,
                d.pci_bus_id
            )?;
        }
        if n > 1 {
            writeln!(
                f,
                "peer access (row → column: P2P over NVLink / PCIe, \"no\" = no P2P{})",
                if self.nvml {
                    ""
                } else {
                    "; link kind unknown: libnvidia-ml not loadable"
                }
            )?;
            write!(f, "       ")?;
            for j in 0..n {
                write!(f, " {:>7}", format!("GPU{j}"))?;
            }
            writeln!(f)?;
            for i in 0..n {
                write!(f, "  GPU{i:<2}")?;
                for j in 0..n {
                    let cell = match self.peers[i][j] {
                        None => "-".to_string(),
                        Some(p) if !p.can_access => "no".to_string(),
                        Some(p) => p.link.to_string(),
                    };
                    write!(f, " {cell:>7}")?;
                }
                writeln!(f)?;
            }
        } else if n == 1 {
            writeln!(f, "peer access: one GPU (nothing to connect)")?;
        }
        match &self.nccl {
            Ok(v) => writeln!(
                f,
                "NCCL {v} (NVLink multicast disabled: NCCL_NVLS_ENABLE=0)"
            ),
            Err(e) => writeln!(f, "NCCL unavailable: {e}"),
        }
    }
}

/// The few NVML calls that tell NVLink from PCIe, loaded at run time from libnvidia-ml.
mod nvml {
    use std::ffi::{c_char, c_int, c_void, CString};

    use libloading::Library;

    use super::Link;

    type Init = unsafe extern "C" fn() -> c_int;
    type ByBus = unsafe extern "C" fn(*const c_char, *mut *mut c_void) -> c_int;
    type P2P = unsafe extern "C" fn(*mut c_void, *mut c_void, c_int, *mut c_int) -> c_int;
    /// `NVML_P2P_CAPS_INDEX_NVLINK` and `NVML_P2P_STATUS_OK` of nvml.h.
    const CAPS_NVLINK: c_int = 2;
    const STATUS_OK: c_int = 0;

    pub(super) struct Nvml {
        lib: Library,
    }

    impl Nvml {
        pub(super) fn open() -> Option<Self> {
            for name in ["libnvidia-ml.so.1", "libnvidia-ml.so"] {
                // SAFETY: the vendor's management library; its initialiser only.
                let Ok(lib) = (unsafe { Library::new(name) }) else {
                    continue;
                };
                // SAFETY: nvmlInit_v2 takes no arguments and returns nvmlReturn_t.
                let ok = unsafe {
                    lib.get::<Init>(b"nvmlInit_v2\0")
                        .is_ok_and(|init| init() == 0)
                };
                if ok {
                    return Some(Self { lib });
                }
            }
            None
        }

        fn device(&self, bus: &str) -> Option<*mut c_void> {
            let c = CString::new(bus).ok()?;
            let mut dev = std::ptr::null_mut();
            // SAFETY: documented signature; `c` and `dev` outlive the call.
            let rc = unsafe {
                let f = self
                    .lib
                    .get::<ByBus>(b"nvmlDeviceGetHandleByPciBusId_v2\0")
                    .ok()?;
                f(c.as_ptr(), &mut dev)
            };
            (rc == 0).then_some(dev)
        }

        /// NVLink when NVML reports NVLink P2P between the two GPUs, else PCIe; None when NVML
        /// cannot answer.
        pub(super) fn link(&self, a: &str, b: &str) -> Option<Link> {
            let (da, db) = (self.device(a)?, self.device(b)?);
            let mut status = -1;
            // SAFETY: handles from NVML; out-pointer to a live int.
            let rc = unsafe {
                let f = self.lib.get::<P2P>(b"nvmlDeviceGetP2PStatus\0").ok()?;
                f(da, db, CAPS_NVLINK, &mut status)
            };
            (rc == 0).then_some(if status == STATUS_OK {
                Link::NvLink
            } else {
                Link::Pcie
            })
        }
    }

    impl Drop for Nvml {
        fn drop(&mut self) {
            // SAFETY: nvmlShutdown pairs the successful nvmlInit_v2 of open().
            unsafe {
                if let Ok(f) = self.lib.get::<Init>(b"nvmlShutdown\0") {
                    f();
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fake(n: usize, access: bool) -> Topology {
        let devices = (0..n)
            .map(|i| DeviceInfo {
                ordinal: i,
                name: "NVIDIA H100 80GB HBM3".into(),
                compute_capability: (9, 0),
                total_mem_bytes: 80 << 30,
                sm_count: 132,
                pci_bus_id: format!("0000:{:02X}:00.0", 0x18 + i),
            })
            .collect();
        let peers = (0..n)
            .map(|i| {
                (0..n)
                    .map(|j| {
                        (i != j).then_some(PeerLink {
                            can_access: access,
                            native_atomics: access,
                            performance_rank: 0,
                            link: Link::NvLink,
                        })
                    })
                    .collect()
            })
            .collect();
        Topology {
            devices,
            peers,
            nccl: Err("libnccl.so not found".into()),
            nvml: true,
        }
    }

    #[test]
    fn display_lists_devices_links_and_nccl() {
        let s = fake(2, true).to_string();
        assert!(s.starts_with("2 GPU(s)\n  GPU 0: NVIDIA H100 80GB HBM3 (sm_90, 132 SMs, 80.0 GiB, PCI 0000:18:00.0)"), "{s}");
        assert!(s.contains("  GPU0        -  NVLink\n"), "{s}");
        assert!(s.contains("NCCL unavailable: libnccl.so not found"), "{s}");
        let s = fake(2, false).to_string();
        assert!(s.contains("  GPU1       no       -\n"), "{s}");
    }

    #[test]
    fn peer_access_is_checked() {
        assert!(fake(4, true).check_peer_access(&[0, 2, 3]).is_ok());
        assert!(matches!(
            fake(4, false).check_peer_access(&[1, 3]),
            Err(CommError::NoPeerAccess { from: 1, to: 3 })
        ));
        assert!(matches!(
            fake(2, true).check_peer_access(&[0, 2]),
            Err(CommError::TooFewGpus {
                asked: 2,
                available: 2
            })
        ));
    }

    #[test]
    fn probe_without_a_driver_is_an_error() {
        match Topology::probe() {
            Ok(t) => assert_eq!(t.devices.len(), t.peers.len()),
            Err(e) => assert!(matches!(e, CommError::NoDriver), "{e}"),
        }
    }
}
