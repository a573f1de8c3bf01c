//! Device memory: the [`Arena`] that owns every allocation of a model (weights, KV cache,
//! activations) and the raw typed pointers ([`DPtr`]) the kernels take.
//!
//! Kernels receive plain device addresses, never cudarc slices: a captured CUDA graph bakes its
//! arguments in, so every buffer a graph touches must live (at a fixed address) as long as the
//! graph, which the arena guarantees — nothing is freed before the arena is dropped. Allocation
//! is a bump pointer inside chunks (by default [`CHUNK_BYTES`]; larger requests get their own); every
//! allocation is zeroed and 256-byte aligned. Running out of device memory is a
//! [`RuntimeError::OutOfMemory`] naming what was being allocated.

use std::marker::PhantomData;
use std::sync::Arc;

use cudarc::driver::{result, CudaSlice, CudaStream, DevicePtr, DeviceRepr};

use crate::RuntimeError;

/// Default chunk size of the bump allocator (a model's weights).
pub const CHUNK_BYTES: usize = 256 << 20;
const ALIGN: usize = 256;

/// A typed device address of `len` elements (no ownership: the [`Arena`] owns the memory).
pub struct DPtr<T> {
    addr: u64,
    len: usize,
    _t: PhantomData<*const T>,
}

impl<T> Clone for DPtr<T> {
    fn clone(&self) -> Self {
        *self
    }
}
impl<T> Copy for DPtr<T> {}
// SAFETY: a DPtr is a plain number; the memory it names is only touched by device work ordered
// on streams.
unsafe impl<T> Send for DPtr<T> {}
unsafe impl<T> Sync for DPtr<T> {}

impl<T> std::fmt::Debug for DPtr<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "DPtr({:#x}, {})", self.addr, self.len)
    }
}

impl<T> DPtr<T> {
    /// The null pointer (an absent optional input; kernels test for 0).
    pub const fn null() -> Self {
        Self {
            addr: 0,
            len: 0,
            _t: PhantomData,
        }
    }
    /// The raw device address (what a kernel argument gets).
    pub fn addr(&self) -> u64 {
        self.addr
    }
    pub fn len(&self) -> usize {
        self.len
    }
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
    pub fn is_null(&self) -> bool {
        self.addr == 0
    }
    /// Elements `range` of this buffer. Panics when the range is outside it (a bug in the caller).
    pub fn slice(&self, range: std::ops::Range<usize>) -> Self {
        assert!(
            range.start <= range.end && range.end <= self.len,
            "DPtr::slice {range:?} of {} elements",
            self.len
        );
        Self {
            addr: self.addr + (range.start * std::mem::size_of::<T>()) as u64,
            len: range.end - range.start,
            _t: PhantomData,
        }
    }
    /// Reinterprets the same bytes as elements of `U` (the byte length must divide evenly).
    pub fn cast<U>(&self) -> DPtr<U> {
        let bytes = self.len * std::mem::size_of::<T>();
        assert!(bytes.is_multiple_of(std::mem::size_of::<U>()));
        DPtr {
            addr: self.addr,
            len: bytes / std::mem::size_of::<U>(),
            _t: PhantomData,
        }
    }
    /// Size in bytes.
    pub fn bytes(&self) -> usize {
        self.len * std::mem::size_of::<T>()
    }
}

/// `Option<DPtr<T>>` as a kernel argument: the address, or 0.
pub fn addr_or_null<T>(p: Option<DPtr<T>>) -> u64 {
    p.map_or(0, |p| p.addr())
}

/// Owner of device memory for one model on one stream.
pub struct Arena {
    stream: Arc<CudaStream>,
    chunks: Vec<CudaSlice<u8>>,
    /// Base address and bytes used of the current (last) bump chunk.
    cur: Option<(u64, usize, usize)>,
    allocated: usize,
    used: usize,
    chunk_bytes: usize,
}

impl Arena {
    pub fn new(stream: Arc<CudaStream>) -> Self {
        Self::with_chunk_bytes(stream, CHUNK_BYTES)
    }

    /// An arena whose bump chunks are `chunk_bytes` (requests of a quarter of that or more get
    /// their own chunk): small owners (a sequence's buffers) reserve little beyond what they use.
    pub fn with_chunk_bytes(stream: Arc<CudaStream>, chunk_bytes: usize) -> Self {
        Self {
            stream,
            chunks: Vec::new(),
            cur: None,
            allocated: 0,
            used: 0,
            chunk_bytes: chunk_bytes.max(ALIGN),
        }
    }

    pub fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }

    /// Bytes handed out (including alignment padding).
    pub fn used_bytes(&self) -> usize {
        self.used
    }

    /// Bytes reserved from the device.
    pub fn reserved_bytes(&self) -> usize {
        self.allocated
    }

    fn new_chunk(&mut self, bytes: usize, what: &str) -> Result<u64, RuntimeError> {
        let ctx = self.stream.context();
        let free = ctx.mem_get_info().map(|(f, _)| f).unwrap_or(usize::MAX);
        if bytes > free {
            return Err(RuntimeError::OutOfMemory {
                what: what.to_string(),
                bytes,
                free,
            });
        }
        let chunk =
            self.stream
                .alloc_zeros::<u8>(bytes)
                .map_err(|e| RuntimeError::OutOfMemory {
                    what: format!("{what} ({e})"),
                    bytes,
                    free,
                })?;
        let addr = {
            let (addr, _sync) = chunk.device_ptr(&self.stream);
            addr
        };
        self.chunks.push(chunk);
        self.allocated += bytes;
        Ok(addr)
    }

    /// `len` zeroed elements of `T`; `what` names the buffer in an out-of-memory error.
    pub fn alloc<T: DeviceRepr>(
        &mut self,
        len: usize,
        what: &str,
    ) -> Result<DPtr<T>, RuntimeError> {
        let bytes = (len * std::mem::size_of::<T>())
            .max(1)
            .next_multiple_of(ALIGN);
        let addr = match self.cur {
            Some((base, used, cap)) if used + bytes <= cap => {
                self.cur = Some((base, used + bytes, cap));
                base + used as u64
            }
            _ if bytes >= self.chunk_bytes / 4 => self.new_chunk(bytes, what)?,
            _ => {
                let base = self.new_chunk(self.chunk_bytes, what)?;
                self.cur = Some((base, bytes, self.chunk_bytes));
                base
            }
        };
        self.used += bytes;
        Ok(DPtr {
            addr,
            len,
            _t: PhantomData,
        })
    }

    /// A new buffer holding a copy of `data` (synchronous: `data` may be dropped on return).
    pub fn upload<T: DeviceRepr>(
        &mut self,
        data: &[T],
        what: &str,
    ) -> Result<DPtr<T>, RuntimeError> {
        let p = self.alloc::<T>(data.len(), what)?;
        htod(&self.stream, data, p)?;
        self.stream.synchronize()?;
        Ok(p)
    }
}

/// Asynchronous copy host → device (`src.len()` must equal `dst.len()`). The host memory must stay
/// valid until the stream reaches the copy (pageable memory: the driver stages it before return).
pub fn htod<T: DeviceRepr>(
    stream: &CudaStream,
    src: &[T],
    dst: DPtr<T>,
) -> Result<(), RuntimeError> {
    assert_eq!(src.len(), dst.len(), "htod: length mismatch");
    if src.is_empty() {
        return Ok(());
    }
    // SAFETY: dst is a live arena allocation of exactly src.len() elements.
    unsafe { result::memcpy_htod_async(dst.addr(), src, stream.cu_stream()) }?;
    Ok(())
}

/// Copy device → host, then waits for the stream (the data is ready on return).
pub fn dtoh<T: DeviceRepr + Default + Clone>(
    stream: &CudaStream,
    src: DPtr<T>,
) -> Result<Vec<T>, RuntimeError> {
    let mut out = vec![T::default(); src.len()];
    if !out.is_empty() {
        // SAFETY: src is a live arena allocation of out.len() elements; we synchronize before
        // `out` is read or dropped.
        unsafe { result::memcpy_dtoh_async(&mut out, src.addr(), stream.cu_stream()) }?;
    }
    stream.synchronize()?;
    Ok(out)
}

/// Asynchronous copy device → device of `src.len()` elements.
pub fn dtod<T>(stream: &CudaStream, src: DPtr<T>, dst: DPtr<T>) -> Result<(), RuntimeError> {
    assert!(src.len() <= dst.len(), "dtod: destination too small");
    if src.is_empty() {
        return Ok(());
    }
    // SAFETY: both are live arena allocations of at least src.bytes() bytes.
    unsafe { result::memcpy_dtod_async(dst.addr(), src.addr(), src.bytes(), stream.cu_stream()) }?;
    Ok(())
}

/// Asynchronously zeroes a buffer.
pub fn zero<T>(stream: &CudaStream, dst: DPtr<T>) -> Result<(), RuntimeError> {
    if dst.is_empty() {
        return Ok(());
    }
    // SAFETY: dst is a live arena allocation of dst.bytes() bytes.
    unsafe { result::memset_d8_async(dst.addr(), 0, dst.bytes(), stream.cu_stream()) }?;
    Ok(())
}
