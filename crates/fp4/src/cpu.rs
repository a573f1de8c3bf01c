//! CPU kernels over MXFP4 weights: dequantize, GEMV, small-batch GEMM, and the f64 oracle.
//!
//! This module owns
//!
//! * [`dequantize`] / [`dequantize_into`] / [`dequantize_bf16`]: exact decode to f32 / bf16.
//! * [`gemv`] / [`gemm`] (and `_bf16` activation variants): `y[t, r] = Σ_k W[r, k] · x[t, k]`
//!   for a batch of 1..=[`MAX_BATCH`] activation rows, f32 accumulation. Each weight block is
//!   decoded once per call and used for every batch row; rows are split into chunks processed in
//!   parallel with rayon.
//! * Kernel selection ([`CpuKernel`]): a portable kernel (256-entry byte → two-f32 table,
//!   written so the compiler vectorizes the per-block dot products) and, on x86_64 CPUs that have
//!   them, AVX2+FMA and AVX-512 kernels (16-entry `pshufb`/`vpermps` decode) chosen at run time.
//! * The test oracle: [`gemv_f64_reference`] (compensated f64, essentially exact) and the
//!   rigorous f32 error bound [`gemv_error_bound`] / [`dot_error_bound`] that CPU and GPU results
//!   are checked against.
//!
//! # Arithmetic (what the error bound relies on)
//!
//! Every kernel computes, per output and per block, a partial sum of the 32 products
//! `code_i · x_i` (codes are exact small values; products and sums rounded to f32, FMA allowed),
//! multiplies it by the block's power-of-two scale (exact unless the result is subnormal) and
//! adds it to one of ≤ 16 lane accumulators; the lanes are summed by a tree of depth ≤ 4 at the
//! end of the row. NaN/inf in `x` propagate to `y`; weights are validated (no NaN scales) by
//! [`MxMatrixRef`]. Results are deterministic for a given kernel and shape (the split into rayon
//! chunks never changes the order of operations within a row).

use std::borrow::Cow;

use half::bf16;
use rayon::prelude::*;

use crate::format::{
    e8m0_to_f32, e8m0_to_f64, Fp4Error, MxMatrixRef, BLOCK, BLOCK_BYTES, E2M1_VALUES,
};

/// Largest batch accepted by [`gemm`] / [`gemm_bf16`].
pub const MAX_BATCH: usize = 16;

/// Byte → decoded (low nibble, high nibble) E2M1 values, i.e. (element 2j, element 2j+1).
static PAIRS: [[f32; 2]; 256] = {
    let mut t = [[0f32; 2]; 256];
    let mut i = 0;
    while i < 256 {
        t[i] = [E2M1_VALUES[i & 15], E2M1_VALUES[i >> 4]];
        i += 1;
    }
    t
};

/// E8M0 byte → `2^(s − 128)` (half the scale, exact, subnormal for s ≤ 1; 0xFF → NaN). Used by
/// the SIMD kernels, whose code tables hold `2 · E2M1` as integers.
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
static HALF_SCALES: [f32; 256] = {
    let mut t = [0f32; 256];
    let mut s = 0;
    while s < 255 {
        t[s] = match s {
            0 => f32::from_bits(0x0020_0000),
            1 => f32::from_bits(0x0040_0000),
            _ => f32::from_bits(((s - 1) as u32) << 23),
        };
        s += 1;
    }
    t[255] = f32::NAN;
    t
};

// ---------------------------------------------------------------------------------------------
// Kernel selection
// ---------------------------------------------------------------------------------------------

/// The CPU kernel implementations. [`CpuKernel::detect`] picks the fastest one this CPU runs;
/// the `*_with` functions let tests and benches pick one explicitly.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum CpuKernel {
    /// Plain Rust; runs everywhere (auto-vectorized for the compile target only).
    Portable,
    /// x86_64 AVX2 + FMA, 8 lanes (`pshufb` code decode).
    Avx2,
    /// x86_64 AVX-512F, 16 lanes (`vpermps` code decode).
    Avx512,
}

impl CpuKernel {
    /// All kernels, available here or not.
    pub const ALL: [CpuKernel; 3] = [CpuKernel::Portable, CpuKernel::Avx2, CpuKernel::Avx512];

    /// Short name (used in errors and bench labels).
    pub fn name(self) -> &'static str {
        match self {
            CpuKernel::Portable => "portable",
            CpuKernel::Avx2 => "avx2",
            CpuKernel::Avx512 => "avx512",
        }
    }

    /// Whether this CPU can run the kernel (run-time detection, cached by std).
    pub fn is_available(self) -> bool {
        match self {
            CpuKernel::Portable => true,
            #[cfg(target_arch = "x86_64")]
            CpuKernel::Avx2 => {
                std::arch::is_x86_feature_detected!("avx2")
                    && std::arch::is_x86_feature_detected!("fma")
            }
            #[cfg(target_arch = "x86_64")]
            CpuKernel::Avx512 => {
                std::arch::is_x86_feature_detected!("avx512f")
            }
            #[cfg(not(target_arch = "x86_64"))]
            _ => false,
        }
    }

    /// The kernels this CPU can run.
    pub fn available() -> Vec<CpuKernel> {
        Self::ALL.into_iter().filter(|k| k.is_available()).collect()
    }

    /// The fastest available kernel (what [`gemv`] / [`gemm`] use).
    pub fn detect() -> CpuKernel {
        if CpuKernel::Avx512.is_available() {
            CpuKernel::Avx512
        } else if CpuKernel::Avx2.is_available() {
            CpuKernel::Avx2
        } else {
            CpuKernel::Portable
        }
    }

    /// Activation layout this kernel wants: the SIMD kernels read each 32-value block of `x`
    /// deinterleaved (16 even elements, then 16 odd ones) so that low and high nibbles need no
    /// shuffling.
    fn wants_deinterleaved_x(self) -> bool {
        !matches!(self, CpuKernel::Portable)
    }
}

// ---------------------------------------------------------------------------------------------
// Dequantization
// ---------------------------------------------------------------------------------------------

/// Below this much work (≈ bytes streamed) a call runs inline on the calling thread: waking the
/// rayon pool costs ~10–20 µs, more than such a call takes.
const INLINE_WORK: usize = 256 << 10;

/// Rows per rayon task: tasks of about `target` bytes of work and at least 4 per thread; all
/// rows (i.e. run inline) when the total work is under [`INLINE_WORK`] or the pool has one
/// thread.
pub(crate) fn rows_per_task(rows: usize, row_work: usize, target: usize) -> usize {
    let threads = rayon::current_num_threads();
    if threads == 1 || rows.saturating_mul(row_work) < INLINE_WORK {
        return rows.max(1);
    }
    let by_bytes = (target / row_work.max(1)).max(1);
    let by_threads = rows.div_ceil(4 * threads).max(1);
    by_bytes.min(by_threads)
}

/// Calls `f(chunk_index, chunk)` over `out` split into chunks of `chunk` elements: inline if one
/// chunk covers everything, else in parallel with rayon.
fn for_chunks<T: Send>(out: &mut [T], chunk: usize, f: impl Fn(usize, &mut [T]) + Sync) {
    if chunk >= out.len() {
        f(0, out);
    } else {
        out.par_chunks_mut(chunk)
            .enumerate()
            .for_each(|(ci, c)| f(ci, c));
    }
}

/// Decodes one row of codes/scales into f32 (exact; values ≥ 2^128 become ±inf).
#[inline]
fn dequantize_row(codes: &[u8], scales: &[u8], out: &mut [f32]) {
    for ((cb, &s), ob) in codes
        .chunks_exact(BLOCK_BYTES)
        .zip(scales)
        .zip(out.chunks_exact_mut(BLOCK))
    {
        let s = e8m0_to_f32(s);
        for (pair, &byte) in ob.chunks_exact_mut(2).zip(cb) {
            let p = PAIRS[byte as usize];
            pair[0] = p[0] * s;
            pair[1] = p[1] * s;
        }
    }
}

/// Decodes the whole matrix to row-major f32 (`rows × k`).
///
/// Exact: every MXFP4 value `code × 2^(s−127)` is an f32 (the smallest nonzero magnitude,
/// `0.5 × 2^-127 = 2^-128`, is an f32 subnormal), except that magnitudes ≥ 2^128 (codes with
/// |value| ≥ 2 under scale byte 254, ≥ 4 under 253) exceed the f32 range and decode to ±inf.
pub fn dequantize(m: MxMatrixRef<'_>) -> Vec<f32> {
    let mut out = vec![0f32; m.rows() * m.k()];
    dequantize_into(m, &mut out).expect("output sized from the matrix");
    out
}

/// [`dequantize`] into a caller buffer of exactly `rows · k` values
/// ([`Fp4Error::LengthMismatch`] otherwise). Parallel over row chunks.
pub fn dequantize_into(m: MxMatrixRef<'_>, out: &mut [f32]) -> Result<(), Fp4Error> {
    let (n, k) = (m.rows(), m.k());
    if out.len() != n * k {
        return Err(Fp4Error::LengthMismatch {
            what: "dequantize output",
            expected: n * k,
            got: out.len(),
        });
    }
    if n == 0 || k == 0 {
        return Ok(());
    }
    // Work ≈ bytes written.
    let rpt = rows_per_task(n, 4 * k, 256 << 10);
    for_chunks(out, rpt * k, |ci, chunk| {
        for (i, row) in chunk.chunks_exact_mut(k).enumerate() {
            let r = ci * rpt + i;
            dequantize_row(m.row_blocks(r), m.row_scales(r), row);
        }
    });
    Ok(())
}

/// Decodes the whole matrix to row-major bf16. Exact for the same reason as [`dequantize`]
/// (E2M1 values need 2 significant bits; bf16 subnormals reach 2^-133), with the same ±inf for
/// magnitudes ≥ 2^128.
pub fn dequantize_bf16(m: MxMatrixRef<'_>) -> Vec<bf16> {
    let mut out = vec![bf16::ZERO; m.rows() * m.k()];
    dequantize_bf16_into(m, &mut out).expect("output sized from the matrix");
    out
}

/// [`dequantize_bf16`] into a caller buffer of exactly `rows · k` values.
pub fn dequantize_bf16_into(m: MxMatrixRef<'_>, out: &mut [bf16]) -> Result<(), Fp4Error> {
    let (n, k) = (m.rows(), m.k());
    if out.len() != n * k {
        return Err(Fp4Error::LengthMismatch {
            what: "dequantize output",
            expected: n * k,
            got: out.len(),
        });
    }
    if n == 0 || k == 0 {
        return Ok(());
    }
    let rpt = rows_per_task(n, 4 * k, 256 << 10);
    for_chunks(out, rpt * k, |ci, chunk| {
        let mut tmp = vec![0f32; k];
        for (i, row) in chunk.chunks_exact_mut(k).enumerate() {
            let r = ci * rpt + i;
            dequantize_row(m.row_blocks(r), m.row_scales(r), &mut tmp);
            for (o, &v) in row.iter_mut().zip(&tmp) {
                *o = bf16::from_f32(v);
            }
        }
    });
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// GEMV / GEMM
// ---------------------------------------------------------------------------------------------

/// Activation element types accepted by the GEMV/GEMM entry points.
trait Act: Copy + Sync {
    fn widen(self) -> f32;
    fn as_f32(s: &[Self]) -> Option<&[f32]>;
}

impl Act for f32 {
    #[inline(always)]
    fn widen(self) -> f32 {
        self
    }
    fn as_f32(s: &[Self]) -> Option<&[f32]> {
        Some(s)
    }
}

impl Act for bf16 {
    #[inline(always)]
    fn widen(self) -> f32 {
        self.to_f32()
    }
    fn as_f32(_: &[Self]) -> Option<&[f32]> {
        None
    }
}

/// `y = W · x` for one activation vector: `x` has K values, `y` has N (= `w.rows()`).
///
/// Errors: [`Fp4Error::LengthMismatch`] if `x.len() != K` or `y.len() != N`.
pub fn gemv(w: MxMatrixRef<'_>, x: &[f32], y: &mut [f32]) -> Result<(), Fp4Error> {
    gemm_impl(CpuKernel::detect(), w, x, 1, y)
}

/// [`gemv`] with bf16 activations (widened exactly to f32; f32 output and accumulation).
pub fn gemv_bf16(w: MxMatrixRef<'_>, x: &[bf16], y: &mut [f32]) -> Result<(), Fp4Error> {
    gemm_impl(CpuKernel::detect(), w, x, 1, y)
}

/// Small-batch GEMM: `x` is `[batch, K]` row-major, `y` is `[batch, N]` row-major,
/// `y[t, r] = Σ_k W[r, k] · x[t, k]`, for `batch` in `1..=16`. Each weight block is decoded once
/// and used for all batch rows. Row `t` of the result is bit-identical to [`gemv`] of `x[t]`
/// (same kernel): the batch size never changes the order of operations.
///
/// Errors: [`Fp4Error::BatchOutOfRange`] for batch 0 or > 16; [`Fp4Error::LengthMismatch`] if
/// `x.len() != batch · K` or `y.len() != batch · N`.
pub fn gemm(w: MxMatrixRef<'_>, x: &[f32], batch: usize, y: &mut [f32]) -> Result<(), Fp4Error> {
    gemm_impl(CpuKernel::detect(), w, x, batch, y)
}

/// [`gemm`] with bf16 activations.
pub fn gemm_bf16(
    w: MxMatrixRef<'_>,
    x: &[bf16],
    batch: usize,
    y: &mut [f32],
) -> Result<(), Fp4Error> {
    gemm_impl(CpuKernel::detect(), w, x, batch, y)
}

/// [`gemm`] on an explicitly chosen kernel ([`Fp4Error::KernelUnavailable`] if this CPU cannot
/// run it). For tests and benchmarks.
pub fn gemm_with(
    kernel: CpuKernel,
    w: MxMatrixRef<'_>,
    x: &[f32],
    batch: usize,
    y: &mut [f32],
) -> Result<(), Fp4Error> {
    gemm_impl(kernel, w, x, batch, y)
}

/// [`gemm_bf16`] on an explicitly chosen kernel.
pub fn gemm_bf16_with(
    kernel: CpuKernel,
    w: MxMatrixRef<'_>,
    x: &[bf16],
    batch: usize,
    y: &mut [f32],
) -> Result<(), Fp4Error> {
    gemm_impl(kernel, w, x, batch, y)
}

fn gemm_impl<A: Act>(
    kernel: CpuKernel,
    w: MxMatrixRef<'_>,
    x: &[A],
    batch: usize,
    y: &mut [f32],
) -> Result<(), Fp4Error> {
    if batch == 0 || batch > MAX_BATCH {
        return Err(Fp4Error::BatchOutOfRange {
            batch,
            max: MAX_BATCH,
        });
    }
    let (n, k) = (w.rows(), w.k());
    if x.len() != batch * k {
        return Err(Fp4Error::LengthMismatch {
            what: "activations x [batch, K]",
            expected: batch * k,
            got: x.len(),
        });
    }
    if y.len() != batch * n {
        return Err(Fp4Error::LengthMismatch {
            what: "output y [batch, N]",
            expected: batch * n,
            got: y.len(),
        });
    }
    if !kernel.is_available() {
        return Err(Fp4Error::KernelUnavailable {
            kernel: kernel.name(),
        });
    }
    if n == 0 {
        return Ok(());
    }
    if k == 0 {
        y.fill(0.0);
        return Ok(());
    }
    let xs = prepare_x(kernel, x, k);
    // Work per row ≈ weight bytes, times a batch factor (batch 16 costs ~10× batch 1).
    let rpt = rows_per_task(n, (k / 2 + k / BLOCK) * (batch + 1) / 2, 64 << 10);
    if batch == 1 {
        run_chunks(kernel, w, &xs, 1, y, rpt);
    } else {
        // Rows are computed as [N, batch]; transpose into y [batch, N].
        let mut tmp = vec![0f32; n * batch];
        run_chunks(kernel, w, &xs, batch, &mut tmp, rpt);
        for (r, vals) in tmp.chunks_exact(batch).enumerate() {
            for (t, &v) in vals.iter().enumerate() {
                y[t * n + r] = v;
            }
        }
    }
    Ok(())
}

/// Widens `x` to f32 and, for the SIMD kernels, deinterleaves each 32-value block into
/// `[x0, x2, .., x30, x1, x3, .., x31]`. `x.len()` is a multiple of `k`, itself a multiple of 32.
fn prepare_x<A: Act>(kernel: CpuKernel, x: &[A], k: usize) -> Cow<'_, [f32]> {
    debug_assert!(k.is_multiple_of(BLOCK) && x.len().is_multiple_of(k));
    if kernel.wants_deinterleaved_x() {
        let mut out = vec![0f32; x.len()];
        for (src, dst) in x.chunks_exact(BLOCK).zip(out.chunks_exact_mut(BLOCK)) {
            for j in 0..BLOCK / 2 {
                dst[j] = src[2 * j].widen();
                dst[BLOCK / 2 + j] = src[2 * j + 1].widen();
            }
        }
        Cow::Owned(out)
    } else {
        match A::as_f32(x) {
            Some(s) => Cow::Borrowed(s),
            None => Cow::Owned(x.iter().map(|v| v.widen()).collect()),
        }
    }
}

/// Runs the kernel over all rows, `rpt` rows per rayon task; `out` is `[N, batch]`.
fn run_chunks(
    kernel: CpuKernel,
    w: MxMatrixRef<'_>,
    xs: &[f32],
    batch: usize,
    out: &mut [f32],
    rpt: usize,
) {
    for_chunks(out, rpt * batch, |ci, chunk| {
        run_rows(kernel, w, ci * rpt, xs, batch, chunk)
    });
}

macro_rules! with_batch {
    ($batch:expr, $f:ident, $($arg:expr),*) => {
        match $batch {
            1 => $f::<1>($($arg),*),
            2 => $f::<2>($($arg),*),
            3 => $f::<3>($($arg),*),
            4 => $f::<4>($($arg),*),
            5 => $f::<5>($($arg),*),
            6 => $f::<6>($($arg),*),
            7 => $f::<7>($($arg),*),
            8 => $f::<8>($($arg),*),
            9 => $f::<9>($($arg),*),
            10 => $f::<10>($($arg),*),
            11 => $f::<11>($($arg),*),
            12 => $f::<12>($($arg),*),
            13 => $f::<13>($($arg),*),
            14 => $f::<14>($($arg),*),
            15 => $f::<15>($($arg),*),
            16 => $f::<16>($($arg),*),
            _ => unreachable!("batch checked by the caller"),
        }
    };
}

/// Computes rows `r0 .. r0 + out.len()/batch` into `out` (`[rows, batch]`).
fn run_rows(
    kernel: CpuKernel,
    w: MxMatrixRef<'_>,
    r0: usize,
    xs: &[f32],
    batch: usize,
    out: &mut [f32],
) {
    let nrows = out.len() / batch;
    let nb = w.blocks_per_row();
    let codes = &w.blocks()[r0 * nb * BLOCK_BYTES..(r0 + nrows) * nb * BLOCK_BYTES];
    let scales = &w.scales()[r0 * nb..(r0 + nrows) * nb];
    match kernel {
        CpuKernel::Portable => with_batch!(batch, portable_rows, codes, scales, nb, xs, out),
        #[cfg(target_arch = "x86_64")]
        CpuKernel::Avx2 => {
            // SAFETY: the caller (gemm_impl) checked `CpuKernel::Avx2.is_available()`, i.e.
            // AVX2 and FMA are present; the kernel asserts all slice lengths itself.
            unsafe { with_batch!(batch, avx2_rows, codes, scales, nb, xs, out) }
        }
        #[cfg(target_arch = "x86_64")]
        CpuKernel::Avx512 => {
            // SAFETY: as above, with AVX-512F checked.
            unsafe { with_batch!(batch, avx512_rows, codes, scales, nb, xs, out) }
        }
        #[cfg(not(target_arch = "x86_64"))]
        _ => unreachable!("unavailable kernels are rejected by gemm_impl"),
    }
}

/// Sums 8 lanes with a tree of depth 3.
#[inline(always)]
fn reduce8(a: &[f32; 8]) -> f32 {
    ((a[0] + a[4]) + (a[2] + a[6])) + ((a[1] + a[5]) + (a[3] + a[7]))
}

/// Portable kernel: per block, decode 16 bytes to 32 f32 with the pair table, then for each
/// batch row accumulate the 32 products into 8 lanes (4 terms each), scale the lanes once and
/// add them to the row's 8 lane accumulators.
fn portable_rows<const B: usize>(
    codes: &[u8],
    scales: &[u8],
    nb: usize,
    xs: &[f32],
    out: &mut [f32],
) {
    let k = nb * BLOCK;
    let nrows = out.len() / B;
    assert!(codes.len() == nrows * nb * BLOCK_BYTES && scales.len() == nrows * nb);
    assert!(xs.len() == B * k);
    for (i, o) in out.chunks_exact_mut(B).enumerate() {
        let row_codes = &codes[i * nb * BLOCK_BYTES..(i + 1) * nb * BLOCK_BYTES];
        let row_scales = &scales[i * nb..(i + 1) * nb];
        let mut acc = [[0f32; 8]; B];
        for (b, (cb, &s)) in row_codes
            .chunks_exact(BLOCK_BYTES)
            .zip(row_scales)
            .enumerate()
        {
            let mut wv = [0f32; BLOCK];
            for (j, &byte) in cb.iter().enumerate() {
                let p = PAIRS[byte as usize];
                wv[2 * j] = p[0];
                wv[2 * j + 1] = p[1];
            }
            let s = e8m0_to_f32(s);
            for (t, acc_t) in acc.iter_mut().enumerate() {
                let xb: &[f32; BLOCK] = xs[t * k + b * BLOCK..][..BLOCK]
                    .try_into()
                    .expect("32 values");
                let mut p = [0f32; 8];
                for g in 0..4 {
                    for l in 0..8 {
                        p[l] += wv[g * 8 + l] * xb[g * 8 + l];
                    }
                }
                for l in 0..8 {
                    acc_t[l] += p[l] * s;
                }
            }
        }
        for (y, acc_t) in o.iter_mut().zip(&acc) {
            *y = reduce8(acc_t);
        }
    }
}

/// `2 · E2M1(code)` as int8, indexed by the 4-bit code (the SIMD kernels' decode table; the
/// factor 2 is folded into [`HALF_SCALES`]).
#[cfg(target_arch = "x86_64")]
const LUT2_I8: [i8; 16] = [0, 1, 2, 3, 4, 6, 8, 12, 0, -1, -2, -3, -4, -6, -8, -12];

/// AVX2+FMA kernel driver: rows in groups of `R` (2 for batch 2, else 1) so that small
/// batches have independent accumulation chains to overlap; the arithmetic of each output is the
/// same for every grouping and batch size.
///
/// # Safety
/// The CPU must support AVX2 and FMA.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn avx2_rows<const B: usize>(
    codes: &[u8],
    scales: &[u8],
    nb: usize,
    xs: &[f32],
    out: &mut [f32],
) {
    let nrows = out.len() / B;
    assert!(codes.len() == nrows * nb * BLOCK_BYTES && scales.len() == nrows * nb);
    assert!(xs.len() == B * nb * BLOCK);
    let mut r = 0;
    // Batch 1 streams one row at a time: measured ~2x faster from DRAM than 2-row groups
    // (one prefetch stream per row; same arithmetic per output).
    if B == 2 {
        while r + 2 <= nrows {
            avx2_group::<B, 2>(codes, scales, nb, xs, &mut out[r * B..(r + 2) * B], r);
            r += 2;
        }
    }
    while r < nrows {
        avx2_group::<B, 1>(codes, scales, nb, xs, &mut out[r * B..(r + 1) * B], r);
        r += 1;
    }
}

/// AVX2 kernel body for rows `r0 .. r0 + R`. Per block: 16 code bytes → low/high nibbles →
/// `pshufb` into `2·E2M1` int8 → 4 × 8 f32 (even elements 0..15, 16..31, odd elements 1..15,
/// 17..31), matching the deinterleaved `xs`. Per batch row: 1 mul + 3 FMA into an 8-lane
/// partial, then one FMA with the broadcast half-scale into the lane accumulator; 8 lanes are
/// reduced by [`reduce8`].
///
/// # Safety
/// AVX2 and FMA; `codes`/`scales` hold whole rows including `r0 .. r0 + R`, `xs` holds `B·K`
/// values and `out` `R·B` (checked by [`avx2_rows`]).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
#[inline]
#[allow(clippy::needless_range_loop)] // t indexes both xs and acc[g]
unsafe fn avx2_group<const B: usize, const R: usize>(
    codes: &[u8],
    scales: &[u8],
    nb: usize,
    xs: &[f32],
    out: &mut [f32],
    r0: usize,
) {
    use std::arch::x86_64::*;
    let k = nb * BLOCK;
    debug_assert!((r0 + R) * nb <= scales.len() && out.len() == R * B);
    let lut = _mm_loadu_si128(LUT2_I8.as_ptr().cast());
    let m0f = _mm_set1_epi8(0x0F);
    let mut acc = [[_mm256_setzero_ps(); B]; R];
    for b in 0..nb {
        let mut w = [[_mm256_setzero_ps(); 4]; R];
        let mut sv = [_mm256_setzero_ps(); R];
        for g in 0..R {
            let i = (r0 + g) * nb + b;
            // In bounds: i < nrows·nb and codes.len() == nrows·nb·16 (asserted by the driver).
            let raw = _mm_loadu_si128(codes.as_ptr().add(i * BLOCK_BYTES).cast());
            let lo = _mm_shuffle_epi8(lut, _mm_and_si128(raw, m0f));
            let hi = _mm_shuffle_epi8(lut, _mm_and_si128(_mm_srli_epi16::<4>(raw), m0f));
            w[g][0] = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(lo));
            w[g][1] = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_unpackhi_epi64(lo, lo)));
            w[g][2] = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(hi));
            w[g][3] = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_unpackhi_epi64(hi, hi)));
            sv[g] = _mm256_set1_ps(HALF_SCALES[*scales.get_unchecked(i) as usize]);
        }
        for t in 0..B {
            // In bounds: t·k + b·32 + 32 ≤ B·k == xs.len() (asserted by the driver).
            let xb = xs.as_ptr().add(t * k + b * BLOCK);
            let x = [
                _mm256_loadu_ps(xb),
                _mm256_loadu_ps(xb.add(8)),
                _mm256_loadu_ps(xb.add(16)),
                _mm256_loadu_ps(xb.add(24)),
            ];
            for g in 0..R {
                let mut p = _mm256_mul_ps(w[g][0], x[0]);
                p = _mm256_fmadd_ps(w[g][1], x[1], p);
                p = _mm256_fmadd_ps(w[g][2], x[2], p);
                p = _mm256_fmadd_ps(w[g][3], x[3], p);
                acc[g][t] = _mm256_fmadd_ps(p, sv[g], acc[g][t]);
            }
        }
    }
    for g in 0..R {
        for t in 0..B {
            let mut lanes = [0f32; 8];
            _mm256_storeu_ps(lanes.as_mut_ptr(), acc[g][t]);
            out[g * B + t] = reduce8(&lanes);
        }
    }
}

/// AVX-512 kernel driver: rows in groups of `R` (4 for batch 2–4, 2 for batch 5–8, else 1), as
/// in [`avx2_rows`].
///
/// # Safety
/// The CPU must support AVX-512F.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn avx512_rows<const B: usize>(
    codes: &[u8],
    scales: &[u8],
    nb: usize,
    xs: &[f32],
    out: &mut [f32],
) {
    let nrows = out.len() / B;
    assert!(codes.len() == nrows * nb * BLOCK_BYTES && scales.len() == nrows * nb);
    assert!(xs.len() == B * nb * BLOCK);
    let mut r = 0;
    // Batch 1 streams one row at a time: measured 1.6x faster from DRAM than 4-row groups (one
    // prefetch stream per row; same arithmetic per output).
    if B > 1 && B <= 4 {
        while r + 4 <= nrows {
            avx512_group::<B, 4>(codes, scales, nb, xs, &mut out[r * B..(r + 4) * B], r);
            r += 4;
        }
    }
    if B > 1 && B <= 8 {
        while r + 2 <= nrows {
            avx512_group::<B, 2>(codes, scales, nb, xs, &mut out[r * B..(r + 2) * B], r);
            r += 2;
        }
    }
    while r < nrows {
        avx512_group::<B, 1>(codes, scales, nb, xs, &mut out[r * B..(r + 1) * B], r);
        r += 1;
    }
}

/// AVX-512 kernel body for rows `r0 .. r0 + R`. Per block: 16 code bytes widened to 16 × i32;
/// `vpermps` over the 16-entry `2·E2M1` f32 table with the low nibbles gives the 16 even
/// elements, with the high nibbles the 16 odd ones (matching the deinterleaved `xs`). Per batch
/// row: 1 mul + 1 FMA into a 16-lane partial, one FMA with the half-scale into the lane
/// accumulator; the 16 lanes are folded to 8 (one add) and reduced by [`reduce8`] (depth 4).
///
/// # Safety
/// AVX-512F; bounds as for [`avx2_group`] (checked by [`avx512_rows`]).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
#[inline]
#[allow(clippy::needless_range_loop)] // t indexes both xs and acc[g]
unsafe fn avx512_group<const B: usize, const R: usize>(
    codes: &[u8],
    scales: &[u8],
    nb: usize,
    xs: &[f32],
    out: &mut [f32],
    r0: usize,
) {
    use std::arch::x86_64::*;
    let k = nb * BLOCK;
    debug_assert!((r0 + R) * nb <= scales.len() && out.len() == R * B);
    let lut = _mm512_loadu_ps(LUT2_F32.as_ptr());
    let mut acc = [[_mm512_setzero_ps(); B]; R];
    for b in 0..nb {
        let mut we = [_mm512_setzero_ps(); R];
        let mut wo = [_mm512_setzero_ps(); R];
        let mut sv = [_mm512_setzero_ps(); R];
        for g in 0..R {
            let i = (r0 + g) * nb + b;
            // In bounds: see avx2_group.
            let raw =
                _mm512_cvtepu8_epi32(_mm_loadu_si128(codes.as_ptr().add(i * BLOCK_BYTES).cast()));
            // vpermps reads only the low 4 bits of each index: the low nibble as is.
            we[g] = _mm512_permutexvar_ps(raw, lut);
            wo[g] = _mm512_permutexvar_ps(_mm512_srli_epi32::<4>(raw), lut);
            sv[g] = _mm512_set1_ps(HALF_SCALES[*scales.get_unchecked(i) as usize]);
        }
        for t in 0..B {
            let xb = xs.as_ptr().add(t * k + b * BLOCK);
            let (x0, x1) = (_mm512_loadu_ps(xb), _mm512_loadu_ps(xb.add(16)));
            for g in 0..R {
                let p = _mm512_fmadd_ps(wo[g], x1, _mm512_mul_ps(we[g], x0));
                acc[g][t] = _mm512_fmadd_ps(p, sv[g], acc[g][t]);
            }
        }
    }
    for g in 0..R {
        for t in 0..B {
            let mut lanes = [0f32; 16];
            _mm512_storeu_ps(lanes.as_mut_ptr(), acc[g][t]);
            let mut folded = [0f32; 8];
            for (l, f) in folded.iter_mut().enumerate() {
                *f = lanes[l] + lanes[l + 8];
            }
            out[g * B + t] = reduce8(&folded);
        }
    }
}

/// [`LUT2_I8`] as f32 (the AVX-512 `vpermps` table).
#[cfg(target_arch = "x86_64")]
static LUT2_F32: [f32; 16] = [
    0.0, 1.0, 2.0, 3.0, 4.0, 6.0, 8.0, 12.0, 0.0, -1.0, -2.0, -3.0, -4.0, -6.0, -8.0, -12.0,
];

// ---------------------------------------------------------------------------------------------
// Oracle and error bound
// ---------------------------------------------------------------------------------------------

/// Exact f64 value of every E2M1 code.
const E2M1_F64: [f64; 16] = [
    0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0,
];

/// Reference GEMV in f64: `y[r] = Σ_k W[r, k] · x[k]` with exactly decoded weights and the
/// compensated dot product Dot2 (Ogita, Rump, Oishi 2005: TwoProduct via FMA + TwoSum), i.e. as
/// if accumulated in ~106-bit precision and rounded once: `|ŷ − y| ≤ 2^-53·|y| + γ_{2K}²·Σ|w x|`
/// (γ in f64), far below any f32 tolerance. Parallel over rows.
///
/// # Panics
/// If `x.len() != w.k()` (this is a test oracle; the kernels return errors instead).
pub fn gemv_f64_reference(w: MxMatrixRef<'_>, x: &[f64]) -> Vec<f64> {
    assert_eq!(x.len(), w.k(), "gemv_f64_reference: x must have K values");
    (0..w.rows())
        .into_par_iter()
        .map(|r| {
            let (mut s, mut c) = (0f64, 0f64);
            for_each_weight(w, r, |kk, wv| {
                let xv = x[kk];
                let p = wv * xv;
                let pe = wv.mul_add(xv, -p); // exact product error
                let t = s + p;
                let z = t - s;
                let se = (s - (t - z)) + (p - z); // exact sum error
                s = t;
                c += pe + se;
            });
            s + c
        })
        .collect()
}

/// Calls `f(k, W[r, k])` with each weight of row `r` decoded exactly in f64.
#[inline]
fn for_each_weight(w: MxMatrixRef<'_>, r: usize, mut f: impl FnMut(usize, f64)) {
    for (b, (cb, &s)) in w
        .row_blocks(r)
        .chunks_exact(BLOCK_BYTES)
        .zip(w.row_scales(r))
        .enumerate()
    {
        let s = e8m0_to_f64(s);
        for (j, &byte) in cb.iter().enumerate() {
            f(b * BLOCK + 2 * j, E2M1_F64[(byte & 0x0F) as usize] * s);
            f(b * BLOCK + 2 * j + 1, E2M1_F64[(byte >> 4) as usize] * s);
        }
    }
}

/// The longest chain of f32 roundings any term of a row goes through in this crate's kernels,
/// as used by [`gemv_error_bound`]: `32 + K/32 + 5`.
///
/// Accounting (valid for any kernel of this shape, CPU or GPU): ≤ 32 roundings to form a
/// block's partial sum of its 32 products in *any* order (one product + ≤ 31 additions; FMA only
/// removes roundings), 0 for the power-of-two scale multiply (exact barring underflow, covered
/// separately), ≤ K/32 additions to accumulate the block results into a lane accumulator, and
/// ≤ 5 levels of a reduction tree over ≤ 32 lanes (e.g. a warp). The CPU kernels here use at
/// most 4 + K/32 + 4.
pub fn gemv_roundings(k: usize) -> usize {
    BLOCK + k / BLOCK + 5
}

/// Per-row error tolerance of an f32 GEMV `ŷ = W·x` against the exact value, for the kernels of
/// this crate (and any kernel whose rounding chains are at most [`gemv_roundings`]`(K)` long):
///
/// `tol[r] = (γ_n + 2^-50) · Σ_k |W[r,k] · x[k]| · (1 + 2^-40) + η_r`, with
/// `η_r = (32 · Σ_b X_b + 32 · K/32 + 64) · 2^-149`,
///
/// `n = gemv_roundings(K)`, `γ_n = n·u / (1 − n·u)`, `u = 2^-24`, `X_b` the scale of block `b`
/// of row `r` (Higham, *Accuracy and Stability of Numerical Algorithms*, §3.1: every term's
/// relative perturbation is at most γ_n when it passes through ≤ n roundings).
///
/// * `2^-50 · Σ` covers the error of [`gemv_f64_reference`]; `(1 + 2^-40)` the f64 rounding of
///   `Σ|w x|` itself.
/// * `η_r` covers underflow (tiny scales or subnormal activations), where the relative model
///   fails: a rounding whose result is an f32 subnormal has an absolute error ≤ 2^-150 (sums of
///   subnormals are exact, so only products/FMAs count). Inside a block the ≤ 32 product roundings
///   happen *before* the scale is applied, so their error is multiplied by `X_b`
///   (`32 · X_b · 2^-150` per block); after scaling, ≤ 32 lanes × K/32 blocks of scale
///   multiplies/FMAs add ≤ 2^-150 each; the factor 2 of 2^-149 absorbs the (1 + γ_n)
///   propagation and the reduction.
///
/// Valid while nothing overflows (`Σ|w x|` and every `|partial| · X_b` well below f32::MAX);
/// bf16 activations are exact in f32, so pass them widened.
///
/// # Panics
/// If `x.len() != w.k()`.
pub fn gemv_error_bound(w: MxMatrixRef<'_>, x: &[f32]) -> Vec<f64> {
    dot_error_bound(w, x, gemv_roundings(w.k()))
}

/// [`gemv_error_bound`] for a kernel whose longest rounding chain is `roundings` long (e.g. a
/// GPU kernel with a deeper reduction tree).
///
/// # Panics
/// If `x.len() != w.k()`.
pub fn dot_error_bound(w: MxMatrixRef<'_>, x: &[f32], roundings: usize) -> Vec<f64> {
    assert_eq!(x.len(), w.k(), "dot_error_bound: x must have K values");
    let k = w.k();
    let u = 2f64.powi(-24);
    let nu = roundings as f64 * u;
    assert!(nu < 0.5, "too many roundings for a meaningful bound");
    let gamma = nu / (1.0 - nu);
    let tiny = 2f64.powi(-149);
    (0..w.rows())
        .into_par_iter()
        .map(|r| {
            let mut sum_abs = 0f64;
            for_each_weight(w, r, |kk, wv| sum_abs += (wv * x[kk] as f64).abs());
            let sum_scales: f64 = w.row_scales(r).iter().map(|&s| e8m0_to_f64(s)).sum();
            let underflow = (32.0 * sum_scales + (32 * (k / BLOCK) + 64) as f64) * tiny;
            (gamma + 2f64.powi(-50)) * sum_abs * (1.0 + 2f64.powi(-40)) + underflow
        })
        .collect()
}
