//! The typed in-memory weights that every executor consumes.
//!
//! Conventions (shared by the loader and the executors):
//! * every matrix is an `nn.Linear` weight in `[out, in]` orientation, row-major, so `y = W·x`;
//! * dense weights keep the dtype the checkpoint stores (BF16, F16, F32, or FP8 E4M3 with its
//!   block scales): a [`Mat`] is a view of the memory-mapped checkpoint file, or an owned buffer
//!   for synthetic / toy models and for matrices the loader has to rearrange. Kernels widen
//!   each element to f32 as they read it (exact for every supported dtype; FP8 values are
//!   multiplied by their block scale in f32, as a widening loader would have done);
//! * expert matrices stay MXFP4 when the checkpoint stores them so ([`MxMat`], K = `in`),
//!   again a view of the checkpoint's packed bytes;
//! * `gate_up` of an expert (and of a dense MLP) holds `2·I` rows. gpt-oss interleaves them
//!   (row 2j = gate j, row 2j+1 = up j) — [`GateUpLayout::Interleaved`]; Qwen3-MoE and MiMo store
//!   `gate_proj` and `up_proj` separately and the loader joins them (rows 0..I = gate,
//!   I..2I = up) — [`GateUpLayout::Halves`] — as one view when they lie back to back in the
//!   file, else as two row segments ([`Mat::from_segments`], [`MxMat::from_parts`]): never a
//!   copy of the checkpoint's values;
//! * with `tie_word_embeddings` the `lm_head` is the embedding itself (the same storage, no
//!   copy).

use std::borrow::Cow;
use std::fmt;
use std::sync::Arc;

use half::{bf16, f16};

#[cfg(target_endian = "big")]
compile_error!("Ultra reads little-endian checkpoint bytes in place and needs a little-endian CPU");

/// What owns the bytes of a [`Bytes`].
enum Backing {
    /// A memory-mapped checkpoint file.
    Map(Arc<memmap2::Mmap>),
    F32(Vec<f32>),
    U16(Vec<u16>),
    U8(Vec<u8>),
}

impl Backing {
    fn bytes(&self) -> &[u8] {
        fn raw<T>(v: &[T]) -> &[u8] {
            // SAFETY: any initialized memory may be viewed as bytes (u8 has alignment 1).
            unsafe { std::slice::from_raw_parts(v.as_ptr().cast::<u8>(), std::mem::size_of_val(v)) }
        }
        match self {
            Backing::Map(m) => m,
            Backing::F32(v) => raw(v),
            Backing::U16(v) => raw(v),
            Backing::U8(v) => v,
        }
    }
}

/// Immutable shared bytes: a region of a memory-mapped checkpoint file or an owned buffer.
/// Cloning is cheap (a reference count).
#[derive(Clone)]
pub struct Bytes {
    backing: Arc<Backing>,
    start: usize,
    len: usize,
}

impl fmt::Debug for Bytes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let kind = match *self.backing {
            Backing::Map(_) => "mmap",
            _ => "owned",
        };
        write!(f, "Bytes({kind}, {} bytes)", self.len)
    }
}

impl Bytes {
    /// `len` bytes of a mapped file from `start` (checked by the caller).
    pub(crate) fn from_map(map: Arc<memmap2::Mmap>, start: usize, len: usize) -> Bytes {
        assert!(
            start + len <= map.len(),
            "Bytes::from_map: range beyond the file"
        );
        Bytes {
            backing: Arc::new(Backing::Map(map)),
            start,
            len,
        }
    }

    /// A sub-range of a mapped region sharing its owner.
    pub(crate) fn slice(&self, start: usize, len: usize) -> Bytes {
        assert!(
            start + len <= self.len,
            "Bytes::slice: range beyond the region"
        );
        Bytes {
            backing: self.backing.clone(),
            start: self.start + start,
            len,
        }
    }

    fn owned(b: Backing) -> Bytes {
        let len = b.bytes().len();
        Bytes {
            backing: Arc::new(b),
            start: 0,
            len,
        }
    }

    /// Owned bytes.
    pub fn from_vec(v: Vec<u8>) -> Bytes {
        Bytes::owned(Backing::U8(v))
    }

    /// The bytes, mutable: an owned byte buffer is made unless the bytes already are one that
    /// nobody else shares.
    fn make_mut(&mut self) -> &mut [u8] {
        let unique = matches!(*self.backing, Backing::U8(ref v) if self.start == 0 && self.len == v.len())
            && Arc::strong_count(&self.backing) == 1;
        if !unique {
            *self = Bytes::from_vec(self.as_slice().to_vec());
        }
        match Arc::get_mut(&mut self.backing) {
            Some(Backing::U8(v)) => v,
            _ => unreachable!("a unique owned byte buffer"),
        }
    }

    /// The bytes.
    #[inline]
    pub fn as_slice(&self) -> &[u8] {
        &self.backing.bytes()[self.start..self.start + self.len]
    }

    /// Number of bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether there are no bytes.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Drops the resident pages of a mapped region (whole pages inside it only) once a caller has
    /// copied it elsewhere (e.g. to a GPU): the mapping is private and read-only, so a later
    /// read faults them in again from the file. No-op for owned bytes.
    pub fn release_pages(&self) {
        if let Backing::Map(m) = &*self.backing {
            const PAGE: usize = 4096;
            let (lo, hi) = (
                self.start.div_ceil(PAGE) * PAGE,
                (self.start + self.len) / PAGE * PAGE,
            );
            if hi > lo {
                // SAFETY: see above; dropping clean pages of a private read-only map loses nothing.
                let _ = unsafe {
                    m.unchecked_advise_range(memmap2::UncheckedAdvice::DontNeed, lo, hi - lo)
                };
            }
        }
    }

    /// Whether these bytes are a view of a memory-mapped file (not an owned copy).
    pub fn is_mapped(&self) -> bool {
        matches!(*self.backing, Backing::Map(_))
    }

    /// The bytes as elements of `T` (a plain little-endian number type).
    ///
    /// # Safety
    /// `T` must be valid for every bit pattern, and the region must be aligned for `T` and a
    /// whole number of `T`s (checked by the constructors that create typed storage).
    #[inline]
    unsafe fn typed<T>(&self) -> &[T] {
        let b = self.as_slice();
        debug_assert!(b.as_ptr().cast::<T>().is_aligned());
        debug_assert!(b.len().is_multiple_of(std::mem::size_of::<T>()));
        // SAFETY: per the function contract.
        unsafe {
            std::slice::from_raw_parts(b.as_ptr().cast::<T>(), b.len() / std::mem::size_of::<T>())
        }
    }

    /// Whether the region can be viewed as `T`s.
    fn fits<T>(&self) -> bool {
        let b = self.as_slice();
        b.as_ptr().cast::<T>().is_aligned() && b.len().is_multiple_of(std::mem::size_of::<T>())
    }
}

/// The stored element type of a dense matrix.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DenseDtype {
    F32,
    Bf16,
    F16,
    /// FP8 E4M3FN (`torch.float8_e4m3fn`), optionally with block scales.
    F8E4M3,
}

impl DenseDtype {
    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            DenseDtype::F32 => 4,
            DenseDtype::Bf16 | DenseDtype::F16 => 2,
            DenseDtype::F8E4M3 => 1,
        }
    }
}

/// The block scales of an FP8 matrix: value `(r, c)` is `f8(code) · values[(r / block[0]) ·
/// cols + c / block[1]]` (f32 multiply).
#[derive(Clone, Copy, Debug)]
pub struct Fp8Scales<'a> {
    /// `[rows per block, cols per block]`.
    pub block: [usize; 2],
    /// Scale columns (`ceil(cols / block[1])`).
    pub cols: usize,
    /// `[ceil(rows / block[0]), cols]` scales, widened to f32.
    pub values: &'a [f32],
}

impl<'a> Fp8Scales<'a> {
    /// The scale of each column block of row `r`.
    #[inline]
    pub fn row(&self, r: usize) -> &'a [f32] {
        let b = r / self.block[0];
        &self.values[b * self.cols..(b + 1) * self.cols]
    }
}

/// The values of a dense matrix in their stored dtype (row-major `[rows, cols]`), as kernels
/// read them.
#[derive(Clone, Copy, Debug)]
pub enum MatData<'a> {
    F32(&'a [f32]),
    Bf16(&'a [bf16]),
    F16(&'a [f16]),
    F8E4M3 {
        codes: &'a [u8],
        scales: Option<Fp8Scales<'a>>,
    },
}

/// The f32 value of an FP8 E4M3FN byte (exact).
#[inline]
pub fn f8_e4m3(b: u8) -> f32 {
    crate::checkpoint::F8_TABLE[b as usize]
}

#[derive(Clone)]
struct OwnedScales {
    block: [usize; 2],
    cols: usize,
    values: Arc<Vec<f32>>,
}

#[derive(Clone)]
enum Store {
    F32(Bytes),
    Bf16(Bytes),
    F16(Bytes),
    F8 {
        codes: Bytes,
        scales: Option<OwnedScales>,
    },
}

impl Store {
    /// The values in their stored dtype.
    #[inline]
    fn data(&self) -> MatData<'_> {
        // SAFETY: the constructors checked alignment and length for the element type; f32,
        // bf16, f16 and u8 are valid for every bit pattern.
        unsafe {
            match self {
                Store::F32(b) => MatData::F32(b.typed()),
                Store::Bf16(b) => MatData::Bf16(b.typed()),
                Store::F16(b) => MatData::F16(b.typed()),
                Store::F8 { codes, scales } => MatData::F8E4M3 {
                    codes: codes.as_slice(),
                    scales: scales.as_ref().map(|s| Fp8Scales {
                        block: s.block,
                        cols: s.cols,
                        values: &s.values,
                    }),
                },
            }
        }
    }

    /// The raw value bytes (FP8: the codes).
    fn bytes(&self) -> &Bytes {
        match self {
            Store::F32(b) | Store::Bf16(b) | Store::F16(b) | Store::F8 { codes: b, .. } => b,
        }
    }

    fn dtype(&self) -> DenseDtype {
        match self {
            Store::F32(_) => DenseDtype::F32,
            Store::Bf16(_) => DenseDtype::Bf16,
            Store::F16(_) => DenseDtype::F16,
            Store::F8 { .. } => DenseDtype::F8E4M3,
        }
    }

    /// Bytes of values and FP8 scales.
    fn stored_bytes(&self) -> usize {
        let scales = match self {
            Store::F8 {
                scales: Some(s), ..
            } => 4 * s.values.len(),
            _ => 0,
        };
        self.bytes().len() + scales
    }
}

/// Where row `r` of a matrix stored in row segments of `lens` rows each (in row order) lies:
/// `(segment, row in the segment)`, or `None` past the last row. The one definition of row
/// segments, shared by [`Mat`] and [`MxMat`].
fn locate_row(lens: impl IntoIterator<Item = usize>, mut r: usize) -> Option<(usize, usize)> {
    for (i, n) in lens.into_iter().enumerate() {
        if r < n {
            return Some((i, r));
        }
        r -= n;
    }
    None
}

/// A row-major dense matrix `[rows, cols]` in its stored dtype (see the module docs). Cloning
/// shares the storage.
///
/// The rows may lie in several segments of memory, like [`MxMat`]'s: MiMo's FP8 dense MLP
/// stores `gate_proj.weight`, `gate_proj.weight_scale_inv`, `up_proj.weight` in that order, so
/// the loader keeps a view of each half ([`Mat::from_segments`]) instead of copying the codes
/// together. [`Mat::segments`] gives each segment's values with its first row,
/// [`Mat::row_data`] / [`Mat::row_bytes`] one row; [`Mat::data`] and [`Mat::bytes`] are the
/// one-segment case.
#[derive(Clone)]
pub struct Mat {
    pub rows: usize,
    pub cols: usize,
    /// `(rows, values)` per segment, in row order (at least one; one dtype).
    parts: Vec<(usize, Store)>,
}

impl fmt::Debug for Mat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Mat({}x{} {:?}", self.rows, self.cols, self.dtype())?;
        for (_, s) in &self.parts {
            write!(f, ", {:?}", s.bytes())?;
        }
        write!(f, ")")
    }
}

/// Equal shapes and equal values (compared as f32, like the widened matrices of old).
impl PartialEq for Mat {
    fn eq(&self, other: &Mat) -> bool {
        if self.rows != other.rows || self.cols != other.cols {
            return false;
        }
        let (mut a, mut b) = (vec![0f32; self.cols], vec![0f32; self.cols]);
        (0..self.rows).all(|r| {
            self.row_into(r, &mut a);
            other.row_into(r, &mut b);
            a == b
        })
    }
}

fn check_len(what: &str, rows: usize, cols: usize, len: usize) {
    assert_eq!(
        Some(len),
        rows.checked_mul(cols),
        "Mat::{what}: {len} values for a {rows}x{cols} matrix"
    );
}

impl Mat {
    /// An owned f32 matrix. Panics if `data.len() != rows · cols`.
    pub fn from_f32(rows: usize, cols: usize, data: Vec<f32>) -> Mat {
        check_len("from_f32", rows, cols, data.len());
        Mat {
            rows,
            cols,
            parts: vec![(rows, Store::F32(Bytes::owned(Backing::F32(data))))],
        }
    }

    /// An owned bf16 matrix. Panics if `data.len() != rows · cols`.
    pub fn from_bf16(rows: usize, cols: usize, data: Vec<bf16>) -> Mat {
        check_len("from_bf16", rows, cols, data.len());
        let v = data.into_iter().map(bf16::to_bits).collect();
        Mat {
            rows,
            cols,
            parts: vec![(rows, Store::Bf16(Bytes::owned(Backing::U16(v))))],
        }
    }

    /// An owned f16 matrix. Panics if `data.len() != rows · cols`.
    pub fn from_f16(rows: usize, cols: usize, data: Vec<f16>) -> Mat {
        check_len("from_f16", rows, cols, data.len());
        let v = data.into_iter().map(f16::to_bits).collect();
        Mat {
            rows,
            cols,
            parts: vec![(rows, Store::F16(Bytes::owned(Backing::U16(v))))],
        }
    }

    /// A matrix over little-endian bytes of `dtype` (a checkpoint tensor, usually mapped). A
    /// region not aligned for its element type is copied (safetensors does not promise
    /// alignment). `fp8_scales` = `(block, scale columns, scales)` for FP8 only. Errors name
    /// what disagrees.
    pub fn from_bytes(
        dtype: DenseDtype,
        rows: usize,
        cols: usize,
        bytes: Bytes,
        fp8_scales: Option<([usize; 2], usize, Vec<f32>)>,
    ) -> Result<Mat, String> {
        let want = rows
            .checked_mul(cols)
            .and_then(|n| n.checked_mul(dtype.size()))
            .ok_or_else(|| format!("a {rows}x{cols} matrix overflows"))?;
        if bytes.len() != want {
            return Err(format!(
                "{} bytes for a {rows}x{cols} {dtype:?} matrix ({want} bytes)",
                bytes.len()
            ));
        }
        if fp8_scales.is_some() && dtype != DenseDtype::F8E4M3 {
            return Err(format!("block scales given for a {dtype:?} matrix"));
        }
        let u16s = |b: Bytes| {
            if b.fits::<u16>() {
                b
            } else {
                let v = b
                    .as_slice()
                    .chunks_exact(2)
                    .map(|c| u16::from_le_bytes([c[0], c[1]]))
                    .collect();
                Bytes::owned(Backing::U16(v))
            }
        };
        let store = match dtype {
            DenseDtype::F32 => Store::F32(if bytes.fits::<f32>() {
                bytes
            } else {
                let v = bytes
                    .as_slice()
                    .chunks_exact(4)
                    .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                    .collect();
                Bytes::owned(Backing::F32(v))
            }),
            DenseDtype::Bf16 => Store::Bf16(u16s(bytes)),
            DenseDtype::F16 => Store::F16(u16s(bytes)),
            DenseDtype::F8E4M3 => {
                let scales = match fp8_scales {
                    None => None,
                    Some((block, sc, values)) => {
                        let [b0, b1] = block;
                        if b0 == 0 || b1 == 0 {
                            return Err(format!("FP8 block {block:?} has a zero side"));
                        }
                        let want = [rows.div_ceil(b0), cols.div_ceil(b1)];
                        if sc != want[1] || values.len() != want[0] * want[1] {
                            return Err(format!(
                                "{} FP8 scales in {sc} columns for a {rows}x{cols} matrix in                                  {b0}x{b1} blocks (want {want:?})",
                                values.len()
                            ));
                        }
                        Some(OwnedScales {
                            block,
                            cols: sc,
                            values: Arc::new(values),
                        })
                    }
                };
                Store::F8 {
                    codes: bytes,
                    scales,
                }
            }
        };
        Ok(Mat {
            rows,
            cols,
            parts: vec![(rows, store)],
        })
    }

    /// A matrix whose rows are the rows of `segments` in order (same dtype and columns; FP8
    /// segments each keep their own block scales), sharing their storage: no values are copied.
    /// Segmented segments are flattened; one segment is returned as it is. Errors name what
    /// disagrees.
    pub fn from_segments(segments: Vec<Mat>) -> Result<Mat, String> {
        let Some(first) = segments.first() else {
            return Err("a matrix needs at least one row segment".into());
        };
        let (cols, dtype) = (first.cols, first.dtype());
        for (i, m) in segments.iter().enumerate() {
            if m.cols != cols || m.dtype() != dtype {
                return Err(format!(
                    "row segment {i} is {}x{} {:?}, segment 0 has {cols} columns of {dtype:?}",
                    m.rows,
                    m.cols,
                    m.dtype()
                ));
            }
        }
        let scaled: Vec<bool> = segments
            .iter()
            .flat_map(|m| &m.parts)
            .map(|(_, s)| {
                matches!(
                    s,
                    Store::F8 {
                        scales: Some(_),
                        ..
                    }
                )
            })
            .collect();
        if scaled.contains(&true) && scaled.contains(&false) {
            return Err("FP8 block scales on only some row segments".into());
        }
        let parts: Vec<(usize, Store)> = segments.into_iter().flat_map(|m| m.parts).collect();
        Ok(Mat {
            rows: parts.iter().map(|p| p.0).sum(),
            cols,
            parts,
        })
    }

    /// The stored dtype.
    pub fn dtype(&self) -> DenseDtype {
        self.parts[0].1.dtype()
    }

    /// The one store of a matrix in one segment.
    fn single(&self, what: &str) -> &Store {
        match self.parts.as_slice() {
            [(_, s)] => s,
            p => panic!(
                "Mat::{what}: a matrix in {} row segments has no single view (Mat::segments, \
                 Mat::row_data)",
                p.len()
            ),
        }
    }

    /// The values in their stored dtype, for kernels, of a matrix stored in one segment (every
    /// matrix but a loader's [`Mat::from_segments`]). Panics on a segmented matrix (see
    /// [`Mat::segments`]).
    #[inline]
    pub fn data(&self) -> MatData<'_> {
        self.single("data").data()
    }

    /// Number of row segments (1 unless built by [`Mat::from_segments`]).
    pub fn num_segments(&self) -> usize {
        self.parts.len()
    }

    /// Each row segment's values in their stored dtype with its first row and row count, in
    /// row order (one entry for a contiguous matrix; row `i` of a segment's values is row
    /// `first + i` of the matrix).
    pub fn segments(&self) -> Vec<(usize, usize, MatData<'_>)> {
        let mut r0 = 0;
        self.parts
            .iter()
            .map(|(n, s)| {
                r0 += n;
                (r0 - n, *n, s.data())
            })
            .collect()
    }

    /// The values of the segment holding row `r`, and the row's index in them. Panics if
    /// `r ≥ rows`.
    #[inline]
    pub fn row_data(&self, r: usize) -> (MatData<'_>, usize) {
        if let [(_, s)] = self.parts.as_slice() {
            return (s.data(), r);
        }
        let (i, r) = locate_row(self.parts.iter().map(|p| p.0), r)
            .unwrap_or_else(|| panic!("Mat: row {r} of {}", self.rows));
        (self.parts[i].1.data(), r)
    }

    /// The stored bytes of row `r`'s values (FP8: its codes). Panics if `r ≥ rows`.
    pub fn row_bytes(&self, r: usize) -> &[u8] {
        let (i, r) = locate_row(self.parts.iter().map(|p| p.0), r)
            .unwrap_or_else(|| panic!("Mat: row {r} of {}", self.rows));
        let w = self.cols * self.dtype().size();
        &self.parts[i].1.bytes().as_slice()[r * w..(r + 1) * w]
    }

    /// The raw stored bytes of the values (FP8: the codes; the scales are apart) of a matrix
    /// stored in one segment. Panics on a segmented matrix (see [`Mat::row_bytes`],
    /// [`Mat::is_mapped`], [`Mat::release_pages`]).
    pub fn bytes(&self) -> &Bytes {
        self.single("bytes").bytes()
    }

    /// Whether every segment's values are a view of a memory-mapped file (not an owned copy).
    pub fn is_mapped(&self) -> bool {
        self.parts.iter().all(|(_, s)| s.bytes().is_mapped())
    }

    /// Whether the storage (every segment) is the storage of `o` (the same bytes, not equal
    /// ones).
    pub fn shares_storage(&self, o: &Mat) -> bool {
        self.parts.len() == o.parts.len()
            && self.parts.iter().zip(&o.parts).all(|((_, a), (_, b))| {
                let (a, b) = (a.bytes(), b.bytes());
                Arc::ptr_eq(&a.backing, &b.backing) && a.start == b.start && a.len == b.len
            })
    }

    /// See [`Bytes::release_pages`] (every segment).
    pub fn release_pages(&self) {
        for (_, s) in &self.parts {
            s.bytes().release_pages();
        }
    }

    /// Parameter count.
    pub fn numel(&self) -> usize {
        self.rows * self.cols
    }

    /// Bytes the values occupy in their stored dtype (FP8 scales included).
    pub fn stored_bytes(&self) -> usize {
        self.parts.iter().map(|(_, s)| s.stored_bytes()).sum()
    }

    /// The f32 values when the matrix is stored as f32 in one segment.
    pub fn as_f32(&self) -> Option<&[f32]> {
        match self.parts.as_slice() {
            [(_, s)] => match s.data() {
                MatData::F32(v) => Some(v),
                _ => None,
            },
            _ => None,
        }
    }

    /// Row `r` widened to f32 into `out` (`cols` values; exact).
    #[inline]
    pub fn row_into(&self, r: usize, out: &mut [f32]) {
        let (d, r) = self.row_data(r);
        widen_row(d, r, self.cols, out);
    }

    /// Row `r` as f32: borrowed for f32 storage, widened otherwise.
    pub fn row(&self, r: usize) -> Cow<'_, [f32]> {
        match self.row_data(r) {
            (MatData::F32(v), r) => Cow::Borrowed(&v[r * self.cols..(r + 1) * self.cols]),
            _ => {
                let mut out = vec![0f32; self.cols];
                self.row_into(r, &mut out);
                Cow::Owned(out)
            }
        }
    }

    /// All values widened to f32 (row-major).
    pub fn to_f32(&self) -> Vec<f32> {
        let mut out = vec![0f32; self.numel()];
        if self.cols > 0 {
            for (r, row) in out.chunks_exact_mut(self.cols).enumerate() {
                self.row_into(r, row);
            }
        }
        out
    }

    /// Columns `c0 .. c0 + n` as an owned matrix in the same stored dtype (one copy of those
    /// values; e.g. a DFlash drafter's `fc`, split per target layer for the device). FP8 keeps
    /// its codes and the matching scale columns when `c0` starts a scale block, and is widened
    /// to f32 otherwise. Panics if the columns are outside the matrix.
    pub fn columns(&self, c0: usize, n: usize) -> Mat {
        assert!(
            c0.checked_add(n).is_some_and(|e| e <= self.cols),
            "Mat::columns: {c0}..+{n} outside {} columns",
            self.cols
        );
        if self.parts.len() > 1 {
            // Segment by segment (each keeps its own FP8 scales), as segments again.
            let segs = self
                .parts
                .iter()
                .map(|(rows, s)| {
                    Mat {
                        rows: *rows,
                        cols: self.cols,
                        parts: vec![(*rows, s.clone())],
                    }
                    .columns(c0, n)
                })
                .collect();
            return Mat::from_segments(segs).expect("column blocks of one matrix agree");
        }
        fn gather<T: Copy>(v: &[T], rows: usize, cols: usize, c0: usize, n: usize) -> Vec<T> {
            (0..rows)
                .flat_map(|r| v[r * cols + c0..r * cols + c0 + n].iter().copied())
                .collect()
        }
        let (rows, cols) = (self.rows, self.cols);
        let store = match self.data() {
            MatData::F32(v) => Store::F32(Bytes::owned(Backing::F32(gather(v, rows, cols, c0, n)))),
            MatData::Bf16(v) => Store::Bf16(Bytes::owned(Backing::U16(
                gather(v, rows, cols, c0, n)
                    .into_iter()
                    .map(bf16::to_bits)
                    .collect(),
            ))),
            MatData::F16(v) => Store::F16(Bytes::owned(Backing::U16(
                gather(v, rows, cols, c0, n)
                    .into_iter()
                    .map(f16::to_bits)
                    .collect(),
            ))),
            MatData::F8E4M3 { codes, scales } => match scales {
                None => Store::F8 {
                    codes: Bytes::from_vec(gather(codes, rows, cols, c0, n)),
                    scales: None,
                },
                Some(s) if c0.is_multiple_of(s.block[1]) => {
                    let (s0, sn) = (c0 / s.block[1], n.div_ceil(s.block[1]));
                    let srows = s.values.len() / s.cols;
                    Store::F8 {
                        codes: Bytes::from_vec(gather(codes, rows, cols, c0, n)),
                        scales: Some(OwnedScales {
                            block: s.block,
                            cols: sn,
                            values: Arc::new(gather(s.values, srows, s.cols, s0, sn)),
                        }),
                    }
                }
                Some(_) => {
                    let mut v = vec![0f32; rows * n];
                    let mut row = vec![0f32; cols];
                    for (r, out) in v.chunks_exact_mut(n.max(1)).enumerate().take(rows) {
                        self.row_into(r, &mut row);
                        out.copy_from_slice(&row[c0..c0 + n]);
                    }
                    Store::F32(Bytes::owned(Backing::F32(v)))
                }
            },
        };
        Mat {
            rows,
            cols: n,
            parts: vec![(rows, store)],
        }
    }

    /// The values as mutable f32, for tools and tests that edit weights: the storage becomes an
    /// owned f32 copy (widened when it was stored narrower) unless it already is one that
    /// nobody else shares.
    pub fn make_f32_mut(&mut self) -> &mut [f32] {
        let unique_f32 = matches!(self.parts.as_slice(), [(_, Store::F32(b))]
            if !b.is_mapped() && Arc::strong_count(&b.backing) == 1 && b.start == 0
                && b.len == b.backing.bytes().len());
        if !unique_f32 {
            let v = self.to_f32();
            self.parts = vec![(self.rows, Store::F32(Bytes::owned(Backing::F32(v))))];
        }
        let [(_, Store::F32(b))] = self.parts.as_mut_slice() else {
            unreachable!()
        };
        match Arc::get_mut(&mut b.backing) {
            Some(Backing::F32(v)) => v,
            _ => unreachable!("a unique owned f32 buffer"),
        }
    }
}

/// Widens row `r` of `d` (`cols` wide) into `out` (exact).
#[inline]
pub fn widen_row(d: MatData<'_>, r: usize, cols: usize, out: &mut [f32]) {
    assert_eq!(
        out.len(),
        cols,
        "widen_row: {} values for {cols} columns",
        out.len()
    );
    let span = r * cols..(r + 1) * cols;
    match d {
        MatData::F32(v) => out.copy_from_slice(&v[span]),
        MatData::Bf16(v) => {
            for (o, x) in out.iter_mut().zip(&v[span]) {
                *o = x.to_f32();
            }
        }
        MatData::F16(v) => {
            for (o, x) in out.iter_mut().zip(&v[span]) {
                *o = x.to_f32();
            }
        }
        MatData::F8E4M3 { codes, scales } => {
            let codes = &codes[span];
            match scales {
                None => {
                    for (o, &c) in out.iter_mut().zip(codes) {
                        *o = f8_e4m3(c);
                    }
                }
                Some(s) => {
                    let (srow, b1) = (s.row(r), s.block[1]);
                    for (c, (o, &code)) in out.iter_mut().zip(codes).enumerate() {
                        *o = f8_e4m3(code) * srow[c / b1];
                    }
                }
            }
        }
    }
}

/// An MXFP4 matrix `[rows, k]` (gpt-oss layout: `[rows, K/32, 16]` code bytes and `[rows,
/// K/32]` E8M0 scale bytes), a view of the checkpoint's packed bytes or an owned copy.
///
/// The rows may lie in several segments of memory: MiMo's `[gate; up]` halves are two
/// tensors of the checkpoint, and `save_file`'s name order puts `gate_proj.weight_scale`
/// between `gate_proj.weight` and `up_proj.weight`, so the loader keeps one view per tensor
/// ([`MxMat::from_parts`]) instead of copying the packed bytes together. [`MxMat::parts`] gives
/// each segment as an `fp4` view with its first row; [`MxMat::view`] is the one-segment case.
#[derive(Clone, Debug)]
pub struct MxMat {
    pub rows: usize,
    pub k: usize,
    /// `(rows, blocks, scales)` per segment, in row order (at least one).
    parts: Vec<(usize, Bytes, Bytes)>,
    /// Set once every segment's scale bytes passed the NaN check ([`MxMat::parts`] then skips
    /// the scan; the bytes never change behind it — [`MxMat::scales_mut`] clears it).
    scales_checked: std::sync::OnceLock<()>,
}

impl PartialEq for MxMat {
    /// Equal shapes and equal bytes row by row (however the rows are segmented).
    fn eq(&self, o: &MxMat) -> bool {
        self.rows == o.rows
            && self.k == o.k
            && (0..self.rows).all(|r| {
                self.row_blocks(r) == o.row_blocks(r) && self.row_scales(r) == o.row_scales(r)
            })
    }
}

impl From<fp4::MxMatrix> for MxMat {
    fn from(m: fp4::MxMatrix) -> MxMat {
        MxMat::from_bytes(
            m.rows,
            m.k,
            Bytes::from_vec(m.blocks),
            Bytes::from_vec(m.scales),
        )
    }
}

impl MxMat {
    /// A matrix over (usually mapped) code and scale bytes; validated by [`MxMat::view`].
    pub fn from_bytes(rows: usize, k: usize, blocks: Bytes, scales: Bytes) -> MxMat {
        MxMat {
            rows,
            k,
            parts: vec![(rows, blocks, scales)],
            scales_checked: std::sync::OnceLock::new(),
        }
    }

    /// A matrix whose rows are the segments' rows in order, each `(rows, blocks, scales)` over
    /// (usually mapped) bytes; validated by [`MxMat::parts`]. No bytes are copied.
    pub fn from_parts(k: usize, parts: Vec<(usize, Bytes, Bytes)>) -> MxMat {
        MxMat {
            rows: parts.iter().map(|p| p.0).sum(),
            k,
            parts,
            scales_checked: std::sync::OnceLock::new(),
        }
    }

    /// Validated borrowed view of a matrix stored in one segment; a segmented one is an error
    /// (use [`MxMat::parts`]).
    pub fn view(&self) -> Result<fp4::MxMatrixRef<'_>, fp4::Fp4Error> {
        match self.parts.as_slice() {
            [(rows, b, s)] => self.segment_view(*rows, b, s).inspect(|_| {
                let _ = self.scales_checked.set(());
            }),
            parts => Err(fp4::Fp4Error::ShapeMismatch(format!(
                "an MXFP4 matrix in {} row segments has no single view (MxMat::parts)",
                parts.len()
            ))),
        }
    }

    /// Validated views of the row segments, each with the index of its first row.
    pub fn parts(&self) -> Result<Vec<(usize, fp4::MxMatrixRef<'_>)>, fp4::Fp4Error> {
        let mut r0 = 0;
        let views = self
            .parts
            .iter()
            .map(|(rows, b, s)| {
                let v = self.segment_view(*rows, b, s)?;
                r0 += rows;
                Ok((r0 - rows, v))
            })
            .collect::<Result<Vec<_>, fp4::Fp4Error>>()?;
        let _ = self.scales_checked.set(());
        Ok(views)
    }

    /// One segment's view: the NaN-scale scan only until the matrix has passed it once.
    fn segment_view<'m>(
        &self,
        rows: usize,
        b: &'m Bytes,
        s: &'m Bytes,
    ) -> Result<fp4::MxMatrixRef<'m>, fp4::Fp4Error> {
        if self.scales_checked.get().is_some() {
            fp4::MxMatrixRef::new_scales_checked(rows, self.k, b.as_slice(), s.as_slice())
        } else {
            fp4::MxMatrixRef::new(rows, self.k, b.as_slice(), s.as_slice())
        }
    }

    /// Number of row segments (1 unless built by [`MxMat::from_parts`]).
    pub fn num_parts(&self) -> usize {
        self.parts.len()
    }

    /// The segment holding row `r` and the row's index in it. Panics if `r ≥ rows`.
    fn locate(&self, r: usize) -> (&(usize, Bytes, Bytes), usize) {
        let (i, r) =
            locate_row(self.parts.iter().map(|p| p.0), r).expect("MxMat: row out of range");
        (&self.parts[i], r)
    }

    /// The `K/2` code bytes of row `r`. Panics if `r ≥ rows`.
    pub fn row_blocks(&self, r: usize) -> &[u8] {
        let ((_, b, _), i) = self.locate(r);
        let w = self.k / 2;
        &b.as_slice()[i * w..(i + 1) * w]
    }

    /// The `K/32` scale bytes of row `r`. Panics if `r ≥ rows`.
    pub fn row_scales(&self, r: usize) -> &[u8] {
        let ((_, _, s), i) = self.locate(r);
        let w = self.k / fp4::BLOCK;
        &s.as_slice()[i * w..(i + 1) * w]
    }

    /// Whether the code and scale bytes are views of a memory-mapped file (not owned copies).
    pub fn is_mapped(&self) -> bool {
        self.parts
            .iter()
            .all(|(_, b, s)| b.is_mapped() && s.is_mapped())
    }

    /// Bytes of codes and scales.
    pub fn stored_bytes(&self) -> usize {
        self.parts.iter().map(|(_, b, s)| b.len() + s.len()).sum()
    }

    /// See [`Bytes::release_pages`].
    pub fn release_pages(&self) {
        for (_, b, s) in &self.parts {
            b.release_pages();
            s.release_pages();
        }
    }

    /// Makes the matrix one owned segment (tools and tests that edit bytes; a copy).
    fn make_contiguous(&mut self) {
        if self.parts.len() != 1 {
            *self = MxMat::from(self.to_owned_matrix());
        }
    }

    /// The `[rows, K/32, 16]` code bytes of a matrix stored in one segment; a segmented one
    /// has no contiguous bytes (`None`; see [`MxMat::row_blocks`]).
    pub fn blocks(&self) -> Option<&[u8]> {
        match self.parts.as_slice() {
            [(_, b, _)] => Some(b.as_slice()),
            _ => None,
        }
    }

    /// The `[rows, K/32]` scale bytes of a matrix stored in one segment (see
    /// [`MxMat::blocks`]).
    pub fn scales(&self) -> Option<&[u8]> {
        match self.parts.as_slice() {
            [(_, _, s)] => Some(s.as_slice()),
            _ => None,
        }
    }

    /// The code bytes, mutable (tools and tests that edit weights): an owned contiguous copy
    /// is made unless the bytes already are one that nobody else shares.
    pub fn blocks_mut(&mut self) -> &mut [u8] {
        self.make_contiguous();
        self.parts[0].1.make_mut()
    }

    /// The scale bytes, mutable (see [`MxMat::blocks_mut`]).
    pub fn scales_mut(&mut self) -> &mut [u8] {
        self.make_contiguous();
        self.scales_checked = std::sync::OnceLock::new();
        self.parts[0].2.make_mut()
    }

    /// An owned contiguous copy (for tools and tests that edit the bytes).
    pub fn to_owned_matrix(&self) -> fp4::MxMatrix {
        let (mut blocks, mut scales) = (
            Vec::with_capacity(self.rows * self.k / 2),
            Vec::with_capacity(self.rows * self.k / fp4::BLOCK),
        );
        for (_, b, s) in &self.parts {
            blocks.extend_from_slice(b.as_slice());
            scales.extend_from_slice(s.as_slice());
        }
        fp4::MxMatrix {
            rows: self.rows,
            k: self.k,
            blocks,
            scales,
        }
    }
}

/// A linear layer `y = W·x (+ b)`.
#[derive(Debug, Clone, PartialEq)]
pub struct Linear {
    /// `[out, in]`.
    pub w: Mat,
    /// `[out]`.
    pub bias: Option<Vec<f32>>,
}

/// An expert projection, dense or MXFP4 (`[out, in]` either way).
#[derive(Debug, Clone, PartialEq)]
pub enum ExpertMat {
    Dense(Mat),
    Mxfp4(MxMat),
}

impl ExpertMat {
    /// Bytes in the stored form.
    pub fn stored_bytes(&self) -> usize {
        match self {
            ExpertMat::Dense(m) => m.stored_bytes(),
            ExpertMat::Mxfp4(m) => m.stored_bytes(),
        }
    }
    /// See [`Bytes::release_pages`].
    pub fn release_pages(&self) {
        match self {
            ExpertMat::Dense(m) => m.release_pages(),
            ExpertMat::Mxfp4(m) => m.release_pages(),
        }
    }
    pub fn rows(&self) -> usize {
        match self {
            ExpertMat::Dense(m) => m.rows,
            ExpertMat::Mxfp4(m) => m.rows,
        }
    }
    pub fn cols(&self) -> usize {
        match self {
            ExpertMat::Dense(m) => m.cols,
            ExpertMat::Mxfp4(m) => m.k,
        }
    }
}

/// How the `2·I` rows of a gate/up projection are ordered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GateUpLayout {
    /// Row 2j = gate j, row 2j+1 = up j (gpt-oss).
    Interleaved,
    /// Rows 0..I = gate, I..2I = up (Qwen3-MoE, MiMo, dense MLPs).
    Halves,
}

/// One routed expert.
#[derive(Debug, Clone, PartialEq)]
pub struct Expert {
    /// `[2I, H]`, ordered per [`Moe::gate_up_layout`].
    pub gate_up: ExpertMat,
    /// `[2I]` (gpt-oss only).
    pub gate_up_bias: Option<Vec<f32>>,
    /// `[H, I]`.
    pub down: ExpertMat,
    /// `[H]` (gpt-oss only).
    pub down_bias: Option<Vec<f32>>,
}

/// A mixture-of-experts block.
#[derive(Debug, Clone, PartialEq)]
pub struct Moe {
    /// `[E, H]` (+ `[E]` bias for gpt-oss).
    pub router: Linear,
    /// `[E]`: the selection-only bias of sigmoid routers (MiMo `e_score_correction_bias`).
    pub correction_bias: Option<Vec<f32>>,
    pub experts: Vec<Expert>,
    pub gate_up_layout: GateUpLayout,
}

/// The feed-forward part of a layer.
#[derive(Debug, Clone, PartialEq)]
pub enum Mlp {
    /// A dense SwiGLU MLP (MiMo layer 0): `gate_up` `[2I, H]` in [`GateUpLayout::Halves`] order,
    /// `down` `[H, I]`.
    Dense {
        gate_up: Linear,
        down: Linear,
    },
    Moe(Moe),
}

/// One attention block.
#[derive(Debug, Clone, PartialEq)]
pub struct Attention {
    /// `[heads·head_dim, H]`.
    pub q: Linear,
    /// `[kv_heads·head_dim, H]`.
    pub k: Linear,
    /// `[kv_heads·v_head_dim, H]`.
    pub v: Linear,
    /// `[H, heads·v_head_dim]`.
    pub o: Linear,
    /// `[head_dim]` RMSNorm weights applied per head before RoPE (Qwen3-MoE).
    pub q_norm: Option<Vec<f32>>,
    pub k_norm: Option<Vec<f32>>,
    /// `[heads]` attention-sink logits (gpt-oss all layers, MiMo sliding layers).
    pub sinks: Option<Vec<f32>>,
}

/// One decoder layer (pre-norm: `x += attn(norm(x)); x += mlp(norm(x))`).
#[derive(Debug, Clone, PartialEq)]
pub struct Layer {
    pub input_norm: Vec<f32>,
    pub attn: Attention,
    pub post_attn_norm: Vec<f32>,
    pub mlp: Mlp,
}

/// A whole model's weights.
#[derive(Debug, Clone, PartialEq)]
pub struct Weights {
    /// `[V, H]`.
    pub embed: Mat,
    pub layers: Vec<Layer>,
    /// `[H]`.
    pub final_norm: Vec<f32>,
    /// `[V, H]`: with `tie_word_embeddings`, `embed` itself (shared storage, no copy).
    pub lm_head: Mat,
}

impl Linear {
    fn stored_bytes(&self) -> usize {
        self.w.stored_bytes() + 4 * self.bias.as_ref().map_or(0, Vec::len)
    }
}

impl Layer {
    /// The matrices of the layer (experts included, in their stored form).
    fn matrices(&self) -> Vec<ExpertMat> {
        let a = &self.attn;
        let mut v: Vec<ExpertMat> = [&a.q, &a.k, &a.v, &a.o]
            .iter()
            .map(|l| ExpertMat::Dense(l.w.clone()))
            .collect();
        match &self.mlp {
            Mlp::Dense { gate_up, down } => {
                v.push(ExpertMat::Dense(gate_up.w.clone()));
                v.push(ExpertMat::Dense(down.w.clone()));
            }
            Mlp::Moe(m) => {
                v.push(ExpertMat::Dense(m.router.w.clone()));
                for e in &m.experts {
                    v.push(e.gate_up.clone());
                    v.push(e.down.clone());
                }
            }
        }
        v
    }

    /// Bytes of the layer's weights in their stored form.
    pub fn stored_bytes(&self) -> usize {
        let a = &self.attn;
        let vecs = [&a.q_norm, &a.k_norm, &a.sinks]
            .iter()
            .map(|v| v.as_ref().map_or(0, Vec::len))
            .sum::<usize>()
            + self.input_norm.len()
            + self.post_attn_norm.len();
        let lin = [&a.q, &a.k, &a.v, &a.o]
            .iter()
            .map(|l| l.stored_bytes())
            .sum::<usize>();
        let mlp = match &self.mlp {
            Mlp::Dense { gate_up, down } => gate_up.stored_bytes() + down.stored_bytes(),
            Mlp::Moe(m) => {
                m.router.stored_bytes()
                    + 4 * m.correction_bias.as_ref().map_or(0, Vec::len)
                    + m.experts
                        .iter()
                        .map(|e| {
                            e.gate_up.stored_bytes()
                                + e.down.stored_bytes()
                                + 4 * e.gate_up_bias.as_ref().map_or(0, Vec::len)
                                + 4 * e.down_bias.as_ref().map_or(0, Vec::len)
                        })
                        .sum::<usize>()
            }
        };
        4 * vecs + lin + mlp
    }

    /// Releases the resident mapped pages of every matrix of the layer (after a copy to a
    /// device; see [`Bytes::release_pages`]).
    pub fn release_pages(&self) {
        for m in self.matrices() {
            m.release_pages();
        }
    }
}

impl Weights {
    /// Bytes of all weights in their stored form (a tied `lm_head` counted once).
    pub fn stored_bytes(&self) -> usize {
        let head = if self.lm_head.shares_storage(&self.embed) {
            0
        } else {
            self.lm_head.stored_bytes()
        };
        self.embed.stored_bytes()
            + head
            + 4 * self.final_norm.len()
            + self.layers.iter().map(Layer::stored_bytes).sum::<usize>()
    }
}
