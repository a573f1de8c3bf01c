//! Symmetric buffers and the one-shot all-reduce.
//!
//! A [`SymmetricGroup`] holds, for each rank, a data region (two slots of `slot_bytes`, used
//! alternately by epoch) and a flag table (`abi::COMM_FLAG_WORDS` u32: per-block epochs, the
//! flags peers publish, a status word) in that rank's device memory, and gives every rank every
//! peer's addresses. Ranks on different GPUs get peer access enabled (it must be possible:
//! [`CommError::NoPeerAccess`]); ranks may also share a GPU ("virtual ranks": N buffers, flag
//! tables and streams on one device), which runs exactly the code real peers run — a peer's
//! address is just a device address — and is how the protocol is tested on one GPU.
//!
//! [`SymmetricGroup::all_reduce`] enqueues one rank's side of the one-shot all-reduce
//! (`kernels/comm.cu`, protocol in `kernels/common/allreduce.cuh`) on that rank's stream: no host
//! synchronisation and no allocation, so it can be captured in a CUDA graph and replayed; the
//! epochs live in device memory. Every rank must issue the same sequence of all-reduces (same
//! shapes), as with any collective.
//!
//! Co-residency: each block waits for the same block of every peer, so every rank's blocks must
//! be resident at once. The grid is capped at the device's occupancy divided by the number of
//! ranks that share a device; other work running concurrently on the GPU could still starve a
//! rank, which the kernel's timeout turns into [`CommError::Timeout`] instead of a hang. With
//! virtual ranks, the streams must also not share a hardware queue (a spinning kernel would block
//! its peer queued behind it): call [`prepare_virtual_ranks`] before the process's first CUDA
//! call (it raises `CUDA_DEVICE_MAX_CONNECTIONS` to 32).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use cudarc::driver::{sys, CudaContext, CudaFunction, CudaStream, LaunchConfig, PushKernelArg};

use crate::abi::{self, AllReduceArgs};
use crate::CommError;

/// Element type of the partials.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DType {
    Bf16,
    F32,
}

impl DType {
    pub fn size(self) -> usize {
        match self {
            DType::Bf16 => 2,
            DType::F32 => 4,
        }
    }
    /// Elements per 16-byte vector.
    fn vec(self) -> usize {
        16 / self.size()
    }
}

/// What the all-reduce does with `Σ partial` (`rows × width`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Epilogue {
    /// `out = Σ`, in the input's dtype (rounded once from the fp32 sum); `out` may be the input.
    Out { out: u64 },
    /// `x += Σ` (f32 residual stream, `rows × width`).
    Residual { x: u64 },
    /// `x += Σ; h = rmsnorm(x)·w` per row (`w`: f32 `[width]`), the step plan's `AllReduce` op
    /// with its `next_norm`.
    ResidualNorm { x: u64, h: u64, w: u64, eps: f32 },
}

/// One rank's all-reduce call: its partial `input` (`rows × width` of `dtype`, row-major).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AllReduce {
    pub dtype: DType,
    pub rows: usize,
    pub width: usize,
    pub input: u64,
    pub epilogue: Epilogue,
}

/// Prepares the process for virtual ranks (unless the variables are set already):
/// `CUDA_DEVICE_MAX_CONNECTIONS=32`, so that up to 32 streams of one GPU get their own hardware
/// queues (virtual ranks on one GPU each spin in a kernel waiting for the others, and two ranks
/// whose streams shared a queue would serialise and deadlock until the timeout), and
/// `CUDA_MODULE_LOADING=EAGER`, so that no kernel is loaded on first use (CUDA's lazy loading
/// may synchronise the context to load a kernel, which waits for a rank spinning until the
/// rank whose launch triggered the load arrives — the deadlock the CUDA programming guide's
/// lazy-loading hazards describe). Takes effect only before the process's first CUDA context is
/// created.
pub fn prepare_virtual_ranks() {
    for (var, value) in [
        ("CUDA_DEVICE_MAX_CONNECTIONS", "32"),
        ("CUDA_MODULE_LOADING", "EAGER"),
    ] {
        if std::env::var_os(var).is_none() {
            // Edition 2021: set_var is safe; called before CUDA starts any thread.
            std::env::set_var(var, value);
        }
    }
}

struct Rank {
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    data: u64,
    flags: u64,
    k_bf16: CudaFunction,
    k_f32: CudaFunction,
}

/// Symmetric buffers of N ranks and the one-shot all-reduce over them (see the module docs).
pub struct SymmetricGroup {
    ranks: Vec<Rank>,
    slot_bytes: usize,
    /// Most ranks on one GPU (1 for real peers; N for N virtual ranks on one GPU).
    share: usize,
    /// Smallest SM count of the ranks' GPUs.
    sms: u32,
    timeout_ns: u64,
    /// (dtype, threads) → blocks per SM (the smallest over the ranks' GPUs).
    occupancy: Mutex<HashMap<(DType, u32), u32>>,
}

/// The launch shape of one all-reduce (equal on every rank).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Shape {
    pub grid: u32,
    pub threads: u32,
    /// Flat modes: elements per block.
    pub chunk: u32,
}

fn drv<T>(what: &str, r: Result<T, cudarc::driver::DriverError>) -> Result<T, CommError> {
    r.map_err(CommError::driver(what.to_string()))
}

impl SymmetricGroup {
    /// A group of `streams.len()` ranks (rank r on `streams[r]`, whose GPU may repeat), each with
    /// two slots of `slot_bytes` (the largest all-reduce, in bytes of the input dtype).
    pub fn new(streams: Vec<Arc<CudaStream>>, slot_bytes: usize) -> Result<Self, CommError> {
        let n = streams.len();
        if n == 0 || n > abi::COMM_MAX_RANKS as usize {
            return Err(CommError::Invalid(format!(
                "a symmetric group has 1..={} ranks, not {n}",
                abi::COMM_MAX_RANKS
            )));
        }
        if slot_bytes == 0 {
            return Err(CommError::Invalid("slot_bytes must be > 0".into()));
        }
        let slot_bytes = slot_bytes.div_ceil(256) * 256;
        let ordinals: Vec<usize> = streams.iter().map(|s| s.context().ordinal()).collect();
        let share = ordinals
            .iter()
            .map(|d| ordinals.iter().filter(|e| *e == d).count())
            .max()
            .unwrap_or(1);
        // Peer access between every pair of distinct GPUs.
        for (i, si) in streams.iter().enumerate() {
            for sj in &streams[..i] {
                let (a, b) = (si.context(), sj.context());
                if a.ordinal() == b.ordinal() {
                    continue;
                }
                for (x, y) in [(a, b), (b, a)] {
                    let mut can = 0;
                    // SAFETY: valid device handles; out-pointer to a live int.
                    drv("cuDeviceCanAccessPeer", unsafe {
                        sys::cuDeviceCanAccessPeer(&mut can, x.cu_device(), y.cu_device()).result()
                    })?;
                    if can == 0 {
                        return Err(CommError::NoPeerAccess {
                            from: x.ordinal(),
                            to: y.ordinal(),
                        });
                    }
                    drv("binding a context", x.bind_to_thread())?;
                    // SAFETY: both contexts are alive; flags must be 0.
                    let r = unsafe { sys::cuCtxEnablePeerAccess(y.cu_ctx(), 0) };
                    if r != sys::CUresult::CUDA_SUCCESS
                        && r != sys::CUresult::CUDA_ERROR_PEER_ACCESS_ALREADY_ENABLED
                    {
                        drv("cuCtxEnablePeerAccess", r.result())?;
                    }
                }
            }
        }
        let mut modules: Vec<(usize, CudaFunction, CudaFunction)> = Vec::new();
        let mut ranks: Vec<Rank> = Vec::with_capacity(n);
        let mut sms = u32::MAX;
        for stream in streams {
            let ctx = stream.context().clone();
            let ord = ctx.ordinal();
            let (k_bf16, k_f32) = match modules.iter().find(|m| m.0 == ord) {
                Some(m) => (m.1.clone(), m.2.clone()),
                None => {
                    let m = drv(
                        "loading kernels/comm.cu",
                        ultra_kernels::load(&ctx, &ultra_kernels::COMM),
                    )?;
                    let b = drv(
                        "loading comm_allreduce_bf16",
                        m.load_function("comm_allreduce_bf16"),
                    )?;
                    let f = drv(
                        "loading comm_allreduce_f32",
                        m.load_function("comm_allreduce_f32"),
                    )?;
                    modules.push((ord, b.clone(), f.clone()));
                    (b, f)
                }
            };
            let sm = drv(
                "reading the SM count",
                ctx.attribute(sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT),
            )?;
            sms = sms.min(sm.max(1) as u32);
            drv("binding a context", ctx.bind_to_thread())?;
            let flag_bytes = abi::COMM_FLAG_WORDS as usize * 4;
            // SAFETY: plain allocations in the bound context, zeroed before use; freed in Drop
            // (or below when a later step fails, through the Rank already pushed).
            let data = drv("allocating a symmetric buffer", unsafe {
                cudarc::driver::result::malloc_sync(2 * slot_bytes)
            })?;
            let flags = match drv("allocating a flag table", unsafe {
                cudarc::driver::result::malloc_sync(flag_bytes)
            }) {
                Ok(f) => f,
                Err(e) => {
                    // SAFETY: allocated just above, not shared yet.
                    let _ = unsafe { cudarc::driver::result::free_sync(data) };
                    return Err(e);
                }
            };
            ranks.push(Rank {
                ctx: ctx.clone(),
                stream,
                data,
                flags,
                k_bf16,
                k_f32,
            });
            // SAFETY: the allocations above have these sizes.
            drv("zeroing a symmetric buffer", unsafe {
                cudarc::driver::result::memset_d8_sync(data, 0, 2 * slot_bytes)
            })?;
            drv("zeroing a flag table", unsafe {
                cudarc::driver::result::memset_d8_sync(flags, 0, flag_bytes)
            })?;
        }
        Ok(Self {
            ranks,
            slot_bytes,
            share,
            sms,
            timeout_ns: default_timeout_ns()?,
            occupancy: Mutex::new(HashMap::new()),
        })
    }

    /// `ranks` virtual ranks on GPU `ctx`, each with a new stream of its own.
    pub fn virtual_ranks(
        ctx: &Arc<CudaContext>,
        ranks: usize,
        slot_bytes: usize,
    ) -> Result<Self, CommError> {
        let streams = (0..ranks)
            .map(|_| drv("creating a stream", ctx.new_stream()))
            .collect::<Result<Vec<_>, _>>()?;
        Self::new(streams, slot_bytes)
    }

    /// One rank per GPU of `devices`, each on a new stream; checks the devices exist.
    pub fn on_devices(devices: &[usize], slot_bytes: usize) -> Result<Self, CommError> {
        let available = crate::device_count()?;
        crate::check_devices(devices, available)?;
        let mut streams = Vec::new();
        for &d in devices {
            let ctx =
                ultra_kernels::open_device(d).map_err(|e| CommError::Invalid(e.to_string()))?;
            streams.push(drv("creating a stream", ctx.new_stream())?);
        }
        Self::new(streams, slot_bytes)
    }

    pub fn ranks(&self) -> usize {
        self.ranks.len()
    }

    /// Rank `r`'s stream, where its all-reduces are enqueued.
    pub fn stream(&self, r: usize) -> &Arc<CudaStream> {
        &self.ranks[r].stream
    }

    /// Bytes of one slot (the largest input an all-reduce may have).
    pub fn slot_bytes(&self) -> usize {
        self.slot_bytes
    }

    /// How long a rank waits for a peer before giving up (default 10 s, or
    /// `ULTRA_COMM_TIMEOUT_MS`; `None` waits forever). Applies to calls enqueued (or captured)
    /// afterwards. After a timeout the rank's later calls do not wait (its status holds the
    /// error until [`SymmetricGroup::reset`]), so a stuck pass costs one timeout.
    pub fn set_timeout(&mut self, timeout: Option<Duration>) {
        self.timeout_ns = timeout.map_or(0, |t| t.as_nanos().clamp(1, u64::MAX as u128) as u64);
    }

    fn blocks_per_sm(&self, dtype: DType, threads: u32) -> Result<u32, CommError> {
        let mut cache = self.occupancy.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(&b) = cache.get(&(dtype, threads)) {
            return Ok(b);
        }
        let mut best = u32::MAX;
        for r in &self.ranks {
            let f = match dtype {
                DType::Bf16 => &r.k_bf16,
                DType::F32 => &r.k_f32,
            };
            drv("binding a context", r.ctx.bind_to_thread())?;
            let mut nb = 0;
            // SAFETY: a loaded function; out-pointer to a live int.
            drv("cuOccupancyMaxActiveBlocksPerMultiprocessor", unsafe {
                sys::cuOccupancyMaxActiveBlocksPerMultiprocessor(
                    &mut nb,
                    f.cu_function(),
                    threads as i32,
                    0,
                )
                .result()
            })?;
            best = best.min(nb.max(0) as u32);
        }
        cache.insert((dtype, threads), best);
        Ok(best)
    }

    /// Most blocks one rank's launch of `threads` may have so that every rank's blocks are
    /// resident at once.
    pub fn max_blocks(&self, dtype: DType, threads: u32) -> Result<u32, CommError> {
        let per_device = self.blocks_per_sm(dtype, threads)? * self.sms;
        Ok((per_device / self.share as u32).min(abi::COMM_MAX_BLOCKS))
    }

    /// The launch shape of `op` (the same on every rank).
    pub fn shape(&self, op: &AllReduce) -> Result<Shape, CommError> {
        let norm = matches!(op.epilogue, Epilogue::ResidualNorm { .. });
        let threads = threads_for(op.dtype, op.width, norm);
        let cap = self.max_blocks(op.dtype, threads)?;
        plan_shape(op.dtype, op.rows, op.width, norm, cap).ok_or_else(|| {
            CommError::Invalid(format!(
                "fused all-reduce + RMSNorm of {} rows: at most {cap} rows fit co-resident with \
                 {} rank(s) per GPU",
                op.rows, self.share
            ))
        })
    }

    /// Rank `rank`'s kernel arguments for `op` (what a persistent engine passes to
    /// `comm_allreduce_block`), after checking shapes, capacity and alignment.
    pub fn args(&self, rank: usize, op: &AllReduce) -> Result<(AllReduceArgs, Shape), CommError> {
        if rank >= self.ranks.len() {
            return Err(CommError::Invalid(format!(
                "rank {rank} of a {}-rank group",
                self.ranks.len()
            )));
        }
        if op.rows == 0 || op.width == 0 {
            return Err(CommError::Invalid("all-reduce of zero elements".into()));
        }
        let n = op
            .rows
            .checked_mul(op.width)
            .filter(|&n| n <= u32::MAX as usize);
        let Some(n) = n else {
            return Err(CommError::Invalid(
                "all-reduce larger than 2^32 elements".into(),
            ));
        };
        if n * op.dtype.size() > self.slot_bytes {
            return Err(CommError::Invalid(format!(
                "all-reduce of {} bytes exceeds the group's slot of {} bytes",
                n * op.dtype.size(),
                self.slot_bytes
            )));
        }
        let mut a = AllReduceArgs {
            bufs: [0; abi::COMM_MAX_RANKS as usize],
            flags: [0; abi::COMM_MAX_RANKS as usize],
            input: op.input,
            out: 0,
            x: 0,
            h: 0,
            w: 0,
            slot_bytes: self.slot_bytes as u64,
            timeout_ns: self.timeout_ns,
            rank: rank as u32,
            ranks: self.ranks.len() as u32,
            rows: op.rows as u32,
            width: op.width as u32,
            chunk: 0,
            mode: 0,
            eps: 0.0,
            pad: 0,
        };
        for (q, r) in self.ranks.iter().enumerate() {
            a.bufs[q] = r.data;
            a.flags[q] = r.flags;
        }
        let mut ptrs = vec![("input", op.input)];
        match op.epilogue {
            Epilogue::Out { out } => {
                a.mode = abi::COMM_MODE_OUT;
                a.out = out;
                ptrs.push(("out", out));
            }
            Epilogue::Residual { x } => {
                a.mode = abi::COMM_MODE_RESIDUAL;
                a.x = x;
                ptrs.push(("x", x));
            }
            Epilogue::ResidualNorm { x, h, w, eps } => {
                if !(eps.is_finite() && eps >= 0.0) {
                    return Err(CommError::Invalid(format!("RMSNorm eps {eps}")));
                }
                a.mode = abi::COMM_MODE_RESIDUAL_NORM;
                (a.x, a.h, a.w, a.eps) = (x, h, w, eps);
                ptrs.extend([("x", x), ("h", h), ("w", w)]);
            }
        }
        for (name, p) in ptrs {
            if p == 0 || !p.is_multiple_of(16) {
                return Err(CommError::Invalid(format!(
                    "all-reduce `{name}` address {p:#x} is not a 16-byte-aligned device address"
                )));
            }
        }
        let shape = self.shape(op)?;
        a.chunk = shape.chunk;
        Ok((a, shape))
    }

    /// Enqueues rank `rank`'s side of the one-shot all-reduce `op` on its stream (capturable).
    ///
    /// # Safety
    /// The addresses of `op` must be live device allocations reachable from rank `rank`'s GPU,
    /// 16-byte aligned, holding `rows × width` elements (`w`: `width`), not freed before the
    /// stream has run the call; every other rank must enqueue the same all-reduce (same shape and
    /// epilogue kind) as its next one, or this rank waits until the timeout.
    pub unsafe fn all_reduce(&self, rank: usize, op: &AllReduce) -> Result<(), CommError> {
        let (args, shape) = self.args(rank, op)?;
        let r = &self.ranks[rank];
        let f = match op.dtype {
            DType::Bf16 => &r.k_bf16,
            DType::F32 => &r.k_f32,
        };
        let cfg = LaunchConfig {
            grid_dim: (shape.grid, 1, 1),
            block_dim: (shape.threads, 1, 1),
            shared_mem_bytes: 0,
        };
        let mut b = r.stream.launch_builder(f);
        b.arg(&args);
        // SAFETY: the arguments match the kernel's signature (AllReduceArgs by value, layout
        // checked against the header); the caller vouches for the addresses.
        drv("launching the one-shot all-reduce", unsafe {
            b.launch(cfg)
        })?;
        Ok(())
    }

    /// Waits for every rank's stream and reports the first rank whose kernel timed out.
    pub fn check(&self) -> Result<(), CommError> {
        for (rank, r) in self.ranks.iter().enumerate() {
            drv("synchronising a rank's stream", r.stream.synchronize())?;
            let mut status = [0u32; 2];
            drv("binding a context", r.ctx.bind_to_thread())?;
            // SAFETY: reads two words inside the rank's flag table (status, its call).
            drv("reading a status word", unsafe {
                cudarc::driver::result::memcpy_dtoh_sync(
                    &mut status,
                    r.flags + 4 * abi::COMM_STATUS_WORD as u64,
                )
            })?;
            let s = status[0];
            if s != 0 {
                return Err(CommError::Timeout {
                    rank,
                    peer: (s & 0xff) as usize,
                    block: ((s >> 8) & 0xff) as usize,
                    call: u64::from(status[1]),
                    timeout_ms: self.timeout_ns / 1_000_000,
                });
            }
        }
        Ok(())
    }

    /// Waits for every stream, then zeroes every flag table (epochs, flags, status): the group
    /// starts over, e.g. after a timeout. Graphs captured before stay valid.
    pub fn reset(&self) -> Result<(), CommError> {
        for r in &self.ranks {
            drv("synchronising a rank's stream", r.stream.synchronize())?;
        }
        for r in &self.ranks {
            drv("binding a context", r.ctx.bind_to_thread())?;
            // SAFETY: the flag table's own size.
            drv("zeroing a flag table", unsafe {
                cudarc::driver::result::memset_d8_sync(
                    r.flags,
                    0,
                    abi::COMM_FLAG_WORDS as usize * 4,
                )
            })?;
        }
        Ok(())
    }
}

/// The wait for a peer before a rank gives up: `ULTRA_COMM_TIMEOUT_MS` (milliseconds, ≥ 1) when
/// set, else 10 s.
fn default_timeout_ns() -> Result<u64, CommError> {
    match std::env::var("ULTRA_COMM_TIMEOUT_MS") {
        Err(_) => Ok(10_000_000_000),
        Ok(v) => match v.trim().parse::<u64>() {
            Ok(ms) if ms >= 1 => Ok(ms.saturating_mul(1_000_000)),
            _ => Err(CommError::Invalid(format!(
                "ULTRA_COMM_TIMEOUT_MS={v:?}: expected a whole number of milliseconds ≥ 1"
            ))),
        },
    }
}

/// Threads per block: the flat all-reduce uses `COMM_FLAT_THREADS`; the fused norm one block per
/// row with one thread per 16-byte vector of the row (whole warps, at most `COMM_MAX_THREADS`).
fn threads_for(dtype: DType, width: usize, norm: bool) -> u32 {
    if norm {
        (width.div_ceil(dtype.vec()).div_ceil(32) * 32).clamp(32, abi::COMM_MAX_THREADS as usize)
            as u32
    } else {
        abi::COMM_FLAT_THREADS
    }
}

/// The launch shape of a `rows × width` all-reduce whose grid may have at most `cap` blocks
/// (co-residency): the fused norm takes one block per row (None when the rows exceed `cap`);
/// the flat modes split the elements into chunks of a multiple of 8 elements, about two 16-byte
/// vectors per thread, at most `cap` blocks.
fn plan_shape(dtype: DType, rows: usize, width: usize, norm: bool, cap: u32) -> Option<Shape> {
    let threads = threads_for(dtype, width, norm);
    if norm {
        return (rows <= cap as usize).then_some(Shape {
            grid: rows as u32,
            threads,
            chunk: width as u32,
        });
    }
    let n = rows * width;
    let per_block = threads as usize * dtype.vec() * 2;
    let grid = n.div_ceil(per_block).clamp(1, cap.max(1) as usize);
    let chunk = n.div_ceil(grid).div_ceil(8) * 8;
    Some(Shape {
        grid: n.div_ceil(chunk).max(1) as u32,
        threads,
        chunk: chunk as u32,
    })
}

impl Drop for SymmetricGroup {
    fn drop(&mut self) {
        for r in &self.ranks {
            let _ = r.stream.synchronize();
        }
        for r in &self.ranks {
            if r.ctx.bind_to_thread().is_ok() {
                // SAFETY: allocated in new(), freed once, after every stream finished.
                unsafe {
                    let _ = cudarc::driver::result::free_sync(r.data);
                    let _ = cudarc::driver::result::free_sync(r.flags);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flat_shapes_cover_every_element_within_the_cap() {
        for dtype in [DType::Bf16, DType::F32] {
            for cap in [1u32, 16, 33, 128] {
                for n in [1usize, 7, 8, 9, 4096, 4097, 33_333, 262_144, 524_288] {
                    let s = plan_shape(dtype, 1, n, false, cap).unwrap();
                    let (g, c) = (s.grid as usize, s.chunk as usize);
                    assert!(
                        s.grid >= 1 && s.grid <= cap,
                        "{dtype:?} n={n} cap={cap}: {s:?}"
                    );
                    assert_eq!(c % 8, 0, "{s:?}");
                    assert!(g * c >= n && (g - 1) * c < n, "{dtype:?} n={n}: {s:?}");
                    assert_eq!(s.threads, abi::COMM_FLAT_THREADS);
                }
            }
        }
        // 8 KB of bf16 is one block; 1 MB spreads over the cap.
        assert_eq!(plan_shape(DType::Bf16, 1, 4096, false, 33).unwrap().grid, 1);
        assert_eq!(
            plan_shape(DType::Bf16, 1, 524_288, false, 33).unwrap().grid,
            33
        );
    }

    #[test]
    fn norm_shapes_are_one_block_per_row() {
        let s = plan_shape(DType::Bf16, 16, 2880, true, 16).unwrap();
        assert_eq!((s.grid, s.threads, s.chunk), (16, 384, 2880));
        assert_eq!(
            plan_shape(DType::F32, 1, 7168, true, 16).unwrap().threads,
            512
        );
        assert_eq!(plan_shape(DType::F32, 1, 37, true, 16).unwrap().threads, 32);
        assert!(plan_shape(DType::F32, 17, 2880, true, 16).is_none());
    }
}
