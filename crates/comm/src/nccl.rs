//! NCCL: finding libnccl at run time, its version, and communicators of one process driving N
//! GPUs (`ncclCommInitAll`, one stream per GPU) with all-reduce / all-gather / all-to-all. One
//! thread drives every rank, so each collective is issued inside `ncclGroupStart/End`.
//!
//! cudarc opens libnccl by name (`libnccl.so`, `libnccl.so.2`, ...) and panics when it is
//! missing; pip installs it where the dynamic loader does not look. [`load_nccl`] therefore
//! first tries the loader's path, then `ULTRA_NCCL_LIB` (a file) and the `nvidia/nccl/lib` folder
//! of the Python environments it knows; a library found there is opened once, globally, so
//! cudarc's later `dlopen("libnccl.so.2")` finds it by its soname. Nothing calls into NCCL
//! before that check.

use std::ffi::c_void;
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};

use cudarc::driver::{CudaContext, CudaSlice, CudaStream, DevicePtr, DevicePtrMut};
use cudarc::nccl::result as nr;
use cudarc::nccl::safe::NcclType;
use cudarc::nccl::sys;

use crate::CommError;

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

/// An NCCL error code in words.
pub(crate) fn describe(e: &nr::NcclError) -> String {
    format!("{:?}", e.0)
}

/// Where libnccl may live besides the loader's search path: `ULTRA_NCCL_LIB`, then the
/// `nvidia/nccl/lib` (pip's `nvidia-nccl-cu1x`) folders of the Python environments below.
pub fn nccl_candidates() -> Vec<PathBuf> {
    let mut v = Vec::new();
    if let Some(p) = std::env::var_os("ULTRA_NCCL_LIB") {
        v.push(PathBuf::from(p));
    }
    let mut roots: Vec<PathBuf> = Vec::new();
    for var in ["VIRTUAL_ENV", "CONDA_PREFIX"] {
        if let Some(p) = std::env::var_os(var) {
            roots.push(PathBuf::from(p).join("lib"));
        }
    }
    if let Some(home) = std::env::var_os("HOME") {
        roots.push(PathBuf::from(home).join(".local/lib"));
    }
    roots.extend(
        [
            "/opt/torch/.venv/lib",
            "/usr/local/lib",
            "/usr/lib",
            "/opt/conda/lib",
        ]
        .iter()
        .map(PathBuf::from),
    );
    for root in roots {
        let Ok(entries) = std::fs::read_dir(&root) else {
            continue;
        };
        let mut pythons: Vec<PathBuf> = entries
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| {
                p.file_name()
                    .is_some_and(|n| n.to_string_lossy().starts_with("python3"))
            })
            .collect();
        pythons.sort();
        for py in pythons.iter().rev() {
            for pkgs in ["site-packages", "dist-packages"] {
                for sub in ["nvidia/nccl/lib", "nvidia/cu13/lib", "nvidia/cu12/lib"] {
                    v.push(py.join(pkgs).join(sub).join("libnccl.so.2"));
                }
            }
        }
    }
    v.push(PathBuf::from("/usr/local/cuda/lib64/libnccl.so.2"));
    v
}

/// Opens the library at `path` for the whole process (kept open forever) so that cudarc finds
/// it by soname; `Ok(false)` when it is not there or not loadable.
fn preload(path: &Path) -> bool {
    if !path.is_file() {
        return false;
    }
    use libloading::os::unix::{Library, RTLD_GLOBAL, RTLD_NOW};
    // SAFETY: loading NCCL runs its (trusted, vendor) initialisers only.
    match unsafe { Library::open(Some(path), RTLD_NOW | RTLD_GLOBAL) } {
        Ok(lib) => {
            std::mem::forget(lib);
            true
        }
        Err(_) => false,
    }
}

/// Makes libnccl loadable by cudarc, searching [`nccl_candidates`] when the dynamic loader
/// alone cannot find it; returns the file it preloaded, if any. Cached: the search runs once.
pub fn load_nccl() -> Result<Option<PathBuf>, CommError> {
    static FOUND: OnceLock<Option<Option<PathBuf>>> = OnceLock::new();
    let found = FOUND.get_or_init(|| {
        // SAFETY: only tries to dlopen the library by its usual names.
        if unsafe { sys::is_culib_present() } {
            return Some(None);
        }
        for c in nccl_candidates() {
            // SAFETY: as above.
            if preload(&c) && unsafe { sys::is_culib_present() } {
                return Some(Some(c));
            }
        }
        None
    });
    found.clone().ok_or(CommError::NoNccl)
}

/// `load_nccl` restricted to `candidates` (no loader search, no cache): whether one of them is a
/// loadable libnccl. For tests and diagnostics.
pub fn nccl_loadable_from(candidates: &[PathBuf]) -> Result<PathBuf, CommError> {
    candidates
        .iter()
        .find(|c| preload(c))
        .cloned()
        .ok_or(CommError::NoNccl)
}

/// The version of the NCCL library found at run time; never panics when it is absent.
pub fn nccl_version() -> Result<NcclVersion, CommError> {
    load_nccl()?;
    nr::get_nccl_version()
        .map(NcclVersion::from_code)
        .map_err(CommError::Nccl)
}

/// NCCL element types the wrappers take (cudarc's `NcclType`: f32, bf16, f16, integers).
pub use cudarc::nccl::safe::NcclType as Element;

/// NCCL communicators of one process driving one GPU per rank: rank r runs on `streams[r]`.
pub struct NcclComms {
    comms: Vec<sys::ncclComm_t>,
    streams: Vec<Arc<CudaStream>>,
}

// SAFETY: NCCL communicators may be used from any thread as long as calls on one are not
// concurrent; NcclComms's methods take &self but issue each group from one call (NCCL's own
// group calls are thread-local), and the type is not Sync.
unsafe impl Send for NcclComms {}

impl NcclComms {
    /// One communicator per GPU of `devices` (ordinals, rank = position), each with a new stream.
    pub fn on_devices(devices: &[usize]) -> Result<Self, CommError> {
        let available = crate::device_count()?;
        crate::check_devices(devices, available)?;
        let mut streams = Vec::with_capacity(devices.len());
        for &d in devices {
            let ctx = CudaContext::new(d).map_err(CommError::driver(format!("opening GPU {d}")))?;
            streams.push(
                ctx.new_stream()
                    .map_err(CommError::driver(format!("creating a stream on GPU {d}")))?,
            );
        }
        Self::new(streams)
    }

    /// One communicator per stream (rank r = `streams[r]`, whose GPUs must be distinct):
    /// `ncclCommInitAll` after `NCCL_NVLS_ENABLE=0` is set.
    pub fn new(streams: Vec<Arc<CudaStream>>) -> Result<Self, CommError> {
        if streams.is_empty() {
            return Err(CommError::Invalid(
                "an NCCL group needs at least one rank".into(),
            ));
        }
        let ordinals: Vec<usize> = streams.iter().map(|s| s.context().ordinal()).collect();
        for (i, d) in ordinals.iter().enumerate() {
            if ordinals[..i].contains(d) {
                return Err(CommError::DuplicateDevice(*d));
            }
        }
        load_nccl()?;
        crate::disable_nvls();
        let devlist: Vec<i32> = ordinals.iter().map(|&d| d as i32).collect();
        let mut comms = vec![std::ptr::null_mut(); streams.len()];
        // SAFETY: `comms` has room for one handle per device of `devlist`.
        unsafe { nr::comm_init_all(comms.as_mut_ptr(), devlist.len() as i32, devlist.as_ptr()) }
            .map_err(CommError::Nccl)?;
        Ok(Self { comms, streams })
    }

    pub fn ranks(&self) -> usize {
        self.comms.len()
    }

    /// Rank `r`'s stream (what its collectives are ordered on).
    pub fn stream(&self, r: usize) -> &Arc<CudaStream> {
        &self.streams[r]
    }

    /// Runs `f(rank, comm, stream)` for every rank inside one NCCL group.
    fn grouped(
        &self,
        mut f: impl FnMut(usize, sys::ncclComm_t, sys::cudaStream_t) -> Result<(), CommError>,
    ) -> Result<(), CommError> {
        nr::group_start().map_err(CommError::Nccl)?;
        let mut first_err = None;
        for (r, (&comm, s)) in self.comms.iter().zip(&self.streams).enumerate() {
            if let Err(e) = f(r, comm, s.cu_stream() as sys::cudaStream_t) {
                first_err = Some(e);
                break;
            }
        }
        let end = nr::group_end().map_err(CommError::Nccl);
        match first_err {
            Some(e) => Err(e),
            None => end.map(|_| ()),
        }
    }

    fn check_ranks<T>(&self, what: &str, bufs: usize, _: &[T]) -> Result<(), CommError> {
        if bufs != self.ranks() {
            return Err(CommError::Invalid(format!(
                "{what}: {bufs} buffers for {} ranks",
                self.ranks()
            )));
        }
        Ok(())
    }

    /// Σ over ranks of `send[r]` into every `recv[r]` (same length), enqueued on each rank's
    /// stream. In place is allowed by passing the same data as `send` and `recv` via
    /// [`NcclComms::all_reduce_raw`].
    pub fn all_reduce<T: NcclType>(
        &self,
        send: &[CudaSlice<T>],
        recv: &mut [CudaSlice<T>],
    ) -> Result<(), CommError> {
        self.check_ranks("all_reduce", send.len(), send)?;
        self.check_ranks("all_reduce", recv.len(), recv)?;
        let n = send[0].len();
        if send.iter().chain(recv.iter()).any(|b| b.len() != n) {
            return Err(CommError::Invalid(
                "all_reduce: buffers of different lengths".into(),
            ));
        }
        let ptrs = self.ptrs(send, recv);
        // SAFETY: every pointer is a live allocation of n elements of T on its rank's device.
        unsafe { self.all_reduce_raw(&ptrs.0, &ptrs.1, n, T::as_nccl_type()) }
    }

    /// Every rank's `send` (n elements) gathered in rank order into every `recv` (ranks·n).
    pub fn all_gather<T: NcclType>(
        &self,
        send: &[CudaSlice<T>],
        recv: &mut [CudaSlice<T>],
    ) -> Result<(), CommError> {
        self.check_ranks("all_gather", send.len(), send)?;
        self.check_ranks("all_gather", recv.len(), recv)?;
        let n = send[0].len();
        if send.iter().any(|b| b.len() != n) || recv.iter().any(|b| b.len() != n * self.ranks()) {
            return Err(CommError::Invalid(format!(
                "all_gather: send buffers must hold n elements and receive buffers {} × n",
                self.ranks()
            )));
        }
        let (s, r) = self.ptrs(send, recv);
        let dt = T::as_nccl_type();
        self.grouped(|rank, comm, stream| {
            // SAFETY: lengths checked above; pointers are live allocations on rank's device.
            unsafe {
                nr::all_gather(
                    s[rank] as *const c_void,
                    r[rank] as *mut c_void,
                    n,
                    dt,
                    comm,
                    stream,
                )
            }
            .map(|_| ())
            .map_err(CommError::Nccl)
        })
    }

    /// All-to-all: `send[r]` holds ranks chunks of n elements; chunk p goes to rank p, which
    /// stores it as chunk r of its `recv` (grouped send/recv).
    pub fn all_to_all<T: NcclType>(
        &self,
        send: &[CudaSlice<T>],
        recv: &mut [CudaSlice<T>],
    ) -> Result<(), CommError> {
        self.check_ranks("all_to_all", send.len(), send)?;
        self.check_ranks("all_to_all", recv.len(), recv)?;
        let ranks = self.ranks();
        let total = send[0].len();
        if !total.is_multiple_of(ranks) || send.iter().chain(recv.iter()).any(|b| b.len() != total)
        {
            return Err(CommError::Invalid(format!(
                "all_to_all: every buffer must hold {ranks} equal chunks"
            )));
        }
        let n = total / ranks;
        let bytes = n * std::mem::size_of::<T>();
        let (s, r) = self.ptrs(send, recv);
        let dt = T::as_nccl_type();
        self.grouped(|rank, comm, stream| {
            for peer in 0..ranks {
                let off = (peer * bytes) as u64;
                // SAFETY: chunk `peer` of live allocations of ranks·n elements.
                unsafe {
                    nr::send(
                        (s[rank] + off) as *const c_void,
                        n,
                        dt,
                        peer as i32,
                        comm,
                        stream,
                    )
                    .map_err(CommError::Nccl)?;
                    nr::recv(
                        (r[rank] + off) as *mut c_void,
                        n,
                        dt,
                        peer as i32,
                        comm,
                        stream,
                    )
                    .map_err(CommError::Nccl)?;
                }
            }
            Ok(())
        })
    }

    /// All-reduce (sum) of raw device buffers: `count` elements of `dtype` at `send[r]` into
    /// `recv[r]` (may equal `send[r]`), on each rank's stream.
    ///
    /// # Safety
    /// Each pointer must be a live device allocation of at least `count` elements of `dtype` on
    /// rank r's GPU, not freed before the stream has run the collective.
    pub unsafe fn all_reduce_raw(
        &self,
        send: &[u64],
        recv: &[u64],
        count: usize,
        dtype: sys::ncclDataType_t,
    ) -> Result<(), CommError> {
        if send.len() != self.ranks() || recv.len() != self.ranks() {
            return Err(CommError::Invalid("all_reduce: one buffer per rank".into()));
        }
        self.grouped(|rank, comm, stream| {
            // SAFETY: the caller's contract.
            unsafe {
                nr::all_reduce(
                    send[rank] as *const c_void,
                    recv[rank] as *mut c_void,
                    count,
                    dtype,
                    sys::ncclRedOp_t::ncclSum,
                    comm,
                    stream,
                )
            }
            .map(|_| ())
            .map_err(CommError::Nccl)
        })
    }

    /// Raw device addresses of the buffers, each as seen by its rank's stream.
    fn ptrs<T>(&self, send: &[CudaSlice<T>], recv: &mut [CudaSlice<T>]) -> (Vec<u64>, Vec<u64>) {
        let s = send
            .iter()
            .zip(&self.streams)
            .map(|(b, st)| b.device_ptr(st).0)
            .collect();
        let r = recv
            .iter_mut()
            .zip(&self.streams)
            .map(|(b, st)| b.device_ptr_mut(st).0)
            .collect();
        (s, r)
    }
}

impl NcclComms {
    /// Splits the group into one handle per rank, for a process that drives each rank from its
    /// own thread: each thread issues its rank's collectives on its rank's stream, no group call
    /// needed (NCCL's one-thread-per-GPU model).
    pub fn into_ranks(mut self) -> Vec<NcclRank> {
        let comms = std::mem::take(&mut self.comms);
        let streams = std::mem::take(&mut self.streams);
        let ranks = comms.len();
        comms
            .into_iter()
            .zip(streams)
            .enumerate()
            .map(|(rank, (comm, stream))| NcclRank {
                comm,
                stream,
                rank,
                ranks,
            })
            .collect()
    }
}

/// One rank of an NCCL group ([`NcclComms::into_ranks`]): its communicator and stream. Used by
/// one thread at a time (the rank's); every rank must issue the same collectives in the same
/// order.
pub struct NcclRank {
    comm: sys::ncclComm_t,
    stream: Arc<CudaStream>,
    rank: usize,
    ranks: usize,
}

// SAFETY: a communicator may be used from any thread as long as calls on it are not concurrent;
// NcclRank is not Sync (a caller sharing it wraps it in a lock).
unsafe impl Send for NcclRank {}

impl NcclRank {
    pub fn rank(&self) -> usize {
        self.rank
    }

    pub fn ranks(&self) -> usize {
        self.ranks
    }

    /// The stream this rank's collectives are ordered on.
    pub fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }

    /// In-place sum over the ranks of `count` f32 at `buf`, enqueued on the rank's stream
    /// (`ncclAllReduce`, `ncclSum`; NCCL picks its algorithm, so the summation order is NCCL's).
    ///
    /// # Safety
    /// `buf` must be a live device allocation of at least `count` f32 on this rank's GPU, not
    /// freed before the stream has run the collective; every other rank must issue the same
    /// all-reduce (same count) as its next collective, or the ranks wait forever.
    pub unsafe fn all_reduce_f32_in_place(&self, buf: u64, count: usize) -> Result<(), CommError> {
        if buf == 0 || count == 0 {
            return Err(CommError::Invalid(
                "NCCL all-reduce of an empty or null buffer".into(),
            ));
        }
        // SAFETY: the caller's contract.
        unsafe {
            nr::all_reduce(
                buf as *const c_void,
                buf as *mut c_void,
                count,
                sys::ncclDataType_t::ncclFloat32,
                sys::ncclRedOp_t::ncclSum,
                self.comm,
                self.stream.cu_stream() as sys::cudaStream_t,
            )
        }
        .map(|_| ())
        .map_err(CommError::Nccl)
    }
}

impl Drop for NcclRank {
    fn drop(&mut self) {
        let _ = self.stream.synchronize();
        // SAFETY: the handle came from comm_init_all (via into_ranks) and is destroyed once.
        let _ = unsafe { nr::comm_destroy(self.comm) };
    }
}

impl Drop for NcclComms {
    fn drop(&mut self) {
        for s in &self.streams {
            let _ = s.synchronize();
        }
        for &c in &self.comms {
            // SAFETY: each handle came from comm_init_all and is destroyed once.
            let _ = unsafe { nr::comm_destroy(c) };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bogus_library_paths_are_no_nccl() {
        let dir = std::env::temp_dir().join(format!("ultra-no-nccl-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        // A file that exists but is not a library, and one that does not exist.
        let fake = dir.join("libnccl.so.2");
        std::fs::write(&fake, b"not an ELF file").unwrap();
        let r = nccl_loadable_from(&[fake, dir.join("missing/libnccl.so.2")]);
        let _ = std::fs::remove_dir_all(&dir);
        assert!(matches!(r, Err(CommError::NoNccl)), "{r:?}");
        assert!(CommError::NoNccl.to_string().contains("ULTRA_NCCL_LIB"));
    }

    #[test]
    fn candidates_honour_the_override() {
        std::env::set_var("ULTRA_NCCL_LIB", "/nonexistent/libnccl.so.2");
        let c = nccl_candidates();
        assert_eq!(
            c.first().map(PathBuf::as_path),
            Some(Path::new("/nonexistent/libnccl.so.2"))
        );
        assert!(c.iter().all(|p| p.ends_with("libnccl.so.2")));
    }

    #[test]
    fn groups_without_a_gpu_or_nccl_are_errors() {
        // Without a driver: NoDriver; with fewer GPUs than asked: TooFewGpus; never a panic.
        match NcclComms::on_devices(&[0, 1, 2, 3, 4, 5, 6, 7, 8]) {
            Err(CommError::NoDriver) | Err(CommError::TooFewGpus { .. }) => {}
            Err(e) => panic!("unexpected error: {e}"),
            Ok(_) => panic!("a 9-GPU group cannot be created on a node of at most 8"),
        }
    }
}
