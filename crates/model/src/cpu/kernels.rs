//! Dense matrix kernels of the CPU executor, one per stored weight dtype (f32, bf16, f16, FP8
//! E4M3 with block scales), chosen at run time per ISA: AVX-512F, AVX2 (+F16C), portable.
//!
//! One entry point, [`rows_dot`]: for a range of weight rows and `t` activation rows it writes
//! every `dot(row r of W widened to f32, x_j)`. `t = 1` is the decode GEMV; `t > 1` is the small
//! GEMM of verify / batched rows / prefill chunks, which loads each weight chunk once for a tile
//! of activation rows (register-blocked: 2 weight rows × 4 activation rows on AVX-512) and widens
//! it inside the kernel.
//!
//! # Determinism (what every kernel here computes)
//! Each output is [`super::ops::dot_portable`] of the widened weight row and the activation row:
//! 32 interleaved f32 lanes (lane `i mod 32`), multiply and add rounded separately (no FMA), the
//! fixed tree (`i` + `i + 16`, then + 8, then + 4, then `(l0 + l2) + (l1 + l3)`), then the
//! `K mod 32` tail added in order. The result of a row therefore depends neither on the ISA nor
//! on how many activation rows share the call or how the rows are split over threads: a token
//! decoded alone and the same token inside a prefill chunk or a verify block get the same bits
//! (the executor's bit-identity tests and speculative decoding's losslessness rely on it).
//! Against the exact (f64) dot product the error is within the usual recursive-summation bound
//! `|ŷ − y| ≤ γ_{⌊K/32⌋ + (K mod 32) + 6} · Σ|w·x|`, `γ_n = n·2⁻²⁴ / (1 − n·2⁻²⁴)` (tested).
//!
//! AVX-512-BF16 (`vdpbf16ps`) is not used: it needs bf16 activations and rounds differently, so
//! it would break the bit-identity with the f32 reference order.

use half::{bf16, f16};

use crate::weights::{f8_e4m3, MatData};

/// The instruction set the dense kernels run with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Isa {
    /// Plain Rust (auto-vectorized for the compile target only).
    Portable,
    /// x86_64 AVX2 (+F16C for f16 weights).
    Avx2,
    /// x86_64 AVX-512F.
    Avx512,
}

impl Isa {
    /// The fastest ISA this CPU runs (detection is cached by std).
    #[inline]
    pub fn detect() -> Isa {
        #[cfg(target_arch = "x86_64")]
        {
            if std::arch::is_x86_feature_detected!("avx512f") {
                return Isa::Avx512;
            }
            if std::arch::is_x86_feature_detected!("avx2")
                && std::arch::is_x86_feature_detected!("f16c")
            {
                return Isa::Avx2;
            }
        }
        Isa::Portable
    }

    /// Whether this CPU runs the ISA.
    pub fn is_available(self) -> bool {
        match self {
            Isa::Portable => true,
            Isa::Avx2 => matches!(Isa::detect(), Isa::Avx2 | Isa::Avx512),
            Isa::Avx512 => Isa::detect() == Isa::Avx512,
        }
    }
}

const LANES: usize = 32;

/// `out[(r − rows.start) · t + j] = dot(row r of w, x_j)` for every `r` in `rows` and `j < t`
/// (`x` is `[t, k]` row-major, `k` = the matrix's columns; `out` is `[rows.len(), t]`), on the
/// fastest ISA of this CPU. `scratch` holds one widened FP8 row (other dtypes are widened in
/// registers). See the module docs for the arithmetic.
pub fn rows_dot(
    w: MatData<'_>,
    k: usize,
    rows: std::ops::Range<usize>,
    x: &[f32],
    t: usize,
    out: &mut [f32],
    scratch: &mut Vec<f32>,
) {
    rows_dot_with(Isa::detect(), w, k, rows, x, t, out, scratch)
}

/// [`rows_dot`] on an explicitly chosen ISA (tests compare them). Panics if the CPU lacks it or
/// the lengths disagree.
#[allow(clippy::too_many_arguments)]
pub fn rows_dot_with(
    isa: Isa,
    w: MatData<'_>,
    k: usize,
    rows: std::ops::Range<usize>,
    x: &[f32],
    t: usize,
    out: &mut [f32],
    scratch: &mut Vec<f32>,
) {
    assert!(isa.is_available(), "rows_dot: {isa:?} is not available");
    assert_eq!(
        x.len(),
        t * k,
        "rows_dot: x has {} values, want {t}x{k}",
        x.len()
    );
    assert_eq!(
        out.len(),
        rows.len() * t,
        "rows_dot: out has {} values, want {}x{t}",
        out.len(),
        rows.len()
    );
    let len = |n: usize| n / k.max(1);
    let total = match w {
        MatData::F32(v) => len(v.len()),
        MatData::Bf16(v) => len(v.len()),
        MatData::F16(v) => len(v.len()),
        MatData::F8E4M3 { codes, .. } => len(codes.len()),
    };
    assert!(
        k == 0 || rows.end <= total,
        "rows_dot: rows {rows:?} beyond the matrix's {total}"
    );
    if t == 0 || rows.is_empty() {
        return;
    }
    match w {
        MatData::F32(v) => dense(isa, Dt::F32, v.as_ptr().cast(), k, rows, x, t, out),
        MatData::Bf16(v) => dense(isa, Dt::Bf16, v.as_ptr().cast(), k, rows, x, t, out),
        MatData::F16(v) => dense(isa, Dt::F16, v.as_ptr().cast(), k, rows, x, t, out),
        MatData::F8E4M3 { codes, scales } => {
            scratch.resize(k, 0.0);
            let r0 = rows.start;
            for r in rows {
                let row = &codes[r * k..(r + 1) * k];
                widen_f8_row(
                    row,
                    scales.as_ref().map(|s| (s.row(r), s.block[1])),
                    scratch,
                );
                let o = &mut out[(r - r0) * t..(r - r0 + 1) * t];
                dense(isa, Dt::F32, scratch.as_ptr().cast(), k, 0..1, x, t, o);
            }
        }
    }
}

/// `dot(FP8 E4M3 row widened and scaled, x)` for one row: `codes` is the row's `K` bytes,
/// `scales` = (the scale of each column block of the row, the block width) or `None` (unscaled).
/// Each value is `f8(code) · scale` rounded to f32, then the [`rows_dot`] arithmetic — the same
/// bits as the FP8 path of [`rows_dot`] and as [`super::ops::dot_row`]. Callable from anywhere
/// the row's bytes are at hand; `scratch` holds the widened row.
pub fn dot_f8(
    codes: &[u8],
    scales: Option<(&[f32], usize)>,
    x: &[f32],
    scratch: &mut Vec<f32>,
) -> f32 {
    let k = x.len();
    assert_eq!(
        codes.len(),
        k,
        "dot_f8: {} codes for {k} activations",
        codes.len()
    );
    scratch.resize(k, 0.0);
    widen_f8_row(codes, scales, scratch);
    let mut out = [0f32];
    dense(
        Isa::detect(),
        Dt::F32,
        scratch.as_ptr().cast(),
        k,
        0..1,
        x,
        1,
        &mut out,
    );
    out[0]
}

/// Widens one FP8 row (scaled per column block when `scales` = `(row scales, block width)`)
/// into `out`.
fn widen_f8_row(codes: &[u8], scales: Option<(&[f32], usize)>, out: &mut [f32]) {
    match scales {
        None => {
            for (o, &c) in out.iter_mut().zip(codes) {
                *o = f8_e4m3(c);
            }
        }
        Some((srow, b1)) => {
            for (blk, (os, cs)) in out.chunks_mut(b1).zip(codes.chunks(b1)).enumerate() {
                let sc = srow[blk];
                for (o, &c) in os.iter_mut().zip(cs) {
                    *o = f8_e4m3(c) * sc;
                }
            }
        }
    }
}

/// The dtypes the in-register kernels widen.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Dt {
    F32,
    Bf16,
    F16,
}

#[inline(always)]
fn widen_at(dt: Dt, w: *const u8, i: usize) -> f32 {
    // SAFETY (callers): `i` is an element index inside the matrix.
    unsafe {
        match dt {
            Dt::F32 => *w.cast::<f32>().add(i),
            Dt::Bf16 => bf16::from_bits(*w.cast::<u16>().add(i)).to_f32(),
            Dt::F16 => f16::from_bits(*w.cast::<u16>().add(i)).to_f32(),
        }
    }
}

/// Dispatch on ISA for rows `rows` of a dense `[_, k]` matrix at `w` (elements of `dt`).
#[allow(clippy::too_many_arguments)]
fn dense(
    isa: Isa,
    dt: Dt,
    w: *const u8,
    k: usize,
    rows: std::ops::Range<usize>,
    x: &[f32],
    t: usize,
    out: &mut [f32],
) {
    match isa {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: AVX-512F is available (asserted by the caller); rows and lengths checked.
        Isa::Avx512 => unsafe {
            match dt {
                Dt::F32 => avx512::run::<0>(w, k, rows, x, t, out),
                Dt::Bf16 => avx512::run::<1>(w, k, rows, x, t, out),
                Dt::F16 => avx512::run::<2>(w, k, rows, x, t, out),
            }
        },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: AVX2 and F16C are available (asserted by the caller).
        Isa::Avx2 => unsafe {
            match dt {
                Dt::F32 => avx2::run::<0>(w, k, rows, x, t, out),
                Dt::Bf16 => avx2::run::<1>(w, k, rows, x, t, out),
                Dt::F16 => avx2::run::<2>(w, k, rows, x, t, out),
            }
        },
        _ => {
            let r0 = rows.start;
            for r in rows {
                for j in 0..t {
                    out[(r - r0) * t + j] = portable_dot(dt, w, r * k, &x[j * k..(j + 1) * k]);
                }
            }
        }
    }
}

/// The portable definition (= [`super::ops::dot_portable`] of the widened row).
fn portable_dot(dt: Dt, w: *const u8, at: usize, x: &[f32]) -> f32 {
    let k = x.len();
    let chunks = k / LANES;
    let mut acc = [0f32; LANES];
    for c in 0..chunks {
        for (i, a) in acc.iter_mut().enumerate() {
            let e = c * LANES + i;
            *a += widen_at(dt, w, at + e) * x[e];
        }
    }
    let mut s = tree(&acc);
    for (e, &xv) in x.iter().enumerate().skip(chunks * LANES) {
        s += widen_at(dt, w, at + e) * xv;
    }
    s
}

/// The fixed reduction tree of the 32 lanes.
#[inline(always)]
fn tree(acc: &[f32; LANES]) -> f32 {
    let mut h16 = [0f32; 16];
    for i in 0..16 {
        h16[i] = acc[i] + acc[i + 16];
    }
    let mut h8 = [0f32; 8];
    for i in 0..8 {
        h8[i] = h16[i] + h16[i + 8];
    }
    let q = [h8[0] + h8[4], h8[1] + h8[5], h8[2] + h8[6], h8[3] + h8[7]];
    (q[0] + q[2]) + (q[1] + q[3])
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    //! AVX-512F: a 32-lane chunk is two `__m512` (lanes 0–15, 16–31).
    use std::arch::x86_64::*;

    use super::{widen_at, Dt};

    /// 16 weights from element `i`, widened (`DT`: 0 f32, 1 bf16, 2 f16).
    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn load16<const DT: u8>(w: *const u8, i: usize) -> __m512 {
        // SAFETY: the caller keeps `i + 16` inside the matrix.
        unsafe {
            match DT {
                0 => _mm512_loadu_ps(w.cast::<f32>().add(i)),
                1 => _mm512_castsi512_ps(_mm512_slli_epi32::<16>(_mm512_cvtepu16_epi32(
                    _mm256_loadu_si256(w.cast::<u16>().add(i).cast()),
                ))),
                _ => _mm512_cvtph_ps(_mm256_loadu_si256(w.cast::<u16>().add(i).cast())),
            }
        }
    }

    fn dt<const DT: u8>() -> Dt {
        match DT {
            0 => Dt::F32,
            1 => Dt::Bf16,
            _ => Dt::F16,
        }
    }

    /// The lane tree of `acc[0] + acc[1]` (see the module docs).
    #[inline]
    #[target_feature(enable = "avx512f")]
    fn reduce(acc: [__m512; 2]) -> f32 {
        let h16 = _mm512_add_ps(acc[0], acc[1]);
        let h8 = _mm256_add_ps(
            _mm512_castps512_ps256(h16),
            _mm256_castpd_ps(_mm512_extractf64x4_pd::<1>(_mm512_castps_pd(h16))),
        );
        let q = _mm_add_ps(_mm256_castps256_ps128(h8), _mm256_extractf128_ps::<1>(h8));
        let r = _mm_add_ps(q, _mm_movehl_ps(q, q));
        _mm_cvtss_f32(_mm_add_ss(r, _mm_shuffle_ps::<1>(r, r)))
    }

    /// Rows `r0 .. r0 + R` × activation rows `j0 .. j0 + T`; `out` is `[rows, t]` from `r0 − base`.
    #[inline]
    #[target_feature(enable = "avx512f")]
    #[allow(clippy::too_many_arguments, clippy::needless_range_loop)]
    unsafe fn tile<const DT: u8, const R: usize, const T: usize>(
        w: *const u8,
        k: usize,
        r0: usize,
        x: *const f32,
        j0: usize,
        out: *mut f32,
        base: usize,
        t: usize,
    ) {
        let chunks = k / super::LANES;
        let mut acc = [[[_mm512_setzero_ps(); 2]; T]; R];
        for c in 0..chunks {
            let o = c * super::LANES;
            let mut wv = [[_mm512_setzero_ps(); 2]; R];
            for g in 0..R {
                // SAFETY: row r0 + g exists and o + 32 ≤ k.
                unsafe {
                    wv[g][0] = load16::<DT>(w, (r0 + g) * k + o);
                    wv[g][1] = load16::<DT>(w, (r0 + g) * k + o + 16);
                }
            }
            for j in 0..T {
                // SAFETY: activation row j0 + j exists and o + 32 ≤ k.
                let (x0, x1) = unsafe {
                    let p = x.add((j0 + j) * k + o);
                    (_mm512_loadu_ps(p), _mm512_loadu_ps(p.add(16)))
                };
                for g in 0..R {
                    acc[g][j][0] = _mm512_add_ps(acc[g][j][0], _mm512_mul_ps(wv[g][0], x0));
                    acc[g][j][1] = _mm512_add_ps(acc[g][j][1], _mm512_mul_ps(wv[g][1], x1));
                }
            }
        }
        for g in 0..R {
            for j in 0..T {
                let mut s = reduce(acc[g][j]);
                for e in chunks * super::LANES..k {
                    // SAFETY: in bounds as above.
                    s += widen_at(dt::<DT>(), w, (r0 + g) * k + e)
                        * unsafe { *x.add((j0 + j) * k + e) };
                }
                // SAFETY: out covers rows base.. and t columns.
                unsafe { *out.add((r0 + g - base) * t + j0 + j) = s };
            }
        }
    }

    /// Rows × all `t` activation rows, one row at a time for the GEMV (memory-bound: one
    /// stream per row measured faster than 2- or 4-row blocks), blocked 2 rows × 4 activation
    /// rows for the GEMM.
    ///
    /// # Safety
    /// AVX-512F; `rows` inside the matrix at `w` (`k` columns), `x` `[t, k]`, `out`
    /// `[rows.len(), t]`.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn run<const DT: u8>(
        w: *const u8,
        k: usize,
        rows: std::ops::Range<usize>,
        x: &[f32],
        t: usize,
        out: &mut [f32],
    ) {
        let (base, xp, op) = (rows.start, x.as_ptr(), out.as_mut_ptr());
        // SAFETY (all calls): bounds per the function contract.
        unsafe {
            if t == 1 {
                for r in rows {
                    tile::<DT, 1, 1>(w, k, r, xp, 0, op, base, t);
                }
                return;
            }
            let mut r = rows.start;
            while r < rows.end {
                let two = r + 2 <= rows.end;
                let mut j = 0;
                while j + 4 <= t {
                    if two {
                        tile::<DT, 2, 4>(w, k, r, xp, j, op, base, t);
                    } else {
                        tile::<DT, 1, 4>(w, k, r, xp, j, op, base, t);
                    }
                    j += 4;
                }
                match (t - j, two) {
                    (1, true) => tile::<DT, 2, 1>(w, k, r, xp, j, op, base, t),
                    (2, true) => tile::<DT, 2, 2>(w, k, r, xp, j, op, base, t),
                    (3, true) => tile::<DT, 2, 3>(w, k, r, xp, j, op, base, t),
                    (1, false) => tile::<DT, 1, 1>(w, k, r, xp, j, op, base, t),
                    (2, false) => tile::<DT, 1, 2>(w, k, r, xp, j, op, base, t),
                    (3, false) => tile::<DT, 1, 3>(w, k, r, xp, j, op, base, t),
                    _ => {}
                }
                r += if two { 2 } else { 1 };
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    //! AVX2 (+F16C): a 32-lane chunk is four `__m256` (lanes 0–7, 8–15, 16–23, 24–31).
    use std::arch::x86_64::*;

    use super::{widen_at, Dt};

    /// 8 weights from element `i`, widened (`DT`: 0 f32, 1 bf16, 2 f16).
    #[inline]
    #[target_feature(enable = "avx2,f16c")]
    unsafe fn load8<const DT: u8>(w: *const u8, i: usize) -> __m256 {
        // SAFETY: the caller keeps `i + 8` inside the matrix.
        unsafe {
            match DT {
                0 => _mm256_loadu_ps(w.cast::<f32>().add(i)),
                1 => _mm256_castsi256_ps(_mm256_slli_epi32::<16>(_mm256_cvtepu16_epi32(
                    _mm_loadu_si128(w.cast::<u16>().add(i).cast()),
                ))),
                _ => _mm256_cvtph_ps(_mm_loadu_si128(w.cast::<u16>().add(i).cast())),
            }
        }
    }

    fn dt<const DT: u8>() -> Dt {
        match DT {
            0 => Dt::F32,
            1 => Dt::Bf16,
            _ => Dt::F16,
        }
    }

    #[inline]
    #[target_feature(enable = "avx2")]
    fn reduce(acc: [__m256; 4]) -> f32 {
        let h16 = [_mm256_add_ps(acc[0], acc[2]), _mm256_add_ps(acc[1], acc[3])];
        let h8 = _mm256_add_ps(h16[0], h16[1]);
        let q = _mm_add_ps(_mm256_castps256_ps128(h8), _mm256_extractf128_ps::<1>(h8));
        let r = _mm_add_ps(q, _mm_movehl_ps(q, q));
        _mm_cvtss_f32(_mm_add_ss(r, _mm_shuffle_ps::<1>(r, r)))
    }

    #[inline]
    #[target_feature(enable = "avx2,f16c")]
    #[allow(clippy::too_many_arguments, clippy::needless_range_loop)]
    unsafe fn tile<const DT: u8, const R: usize, const T: usize>(
        w: *const u8,
        k: usize,
        r0: usize,
        x: *const f32,
        j0: usize,
        out: *mut f32,
        base: usize,
        t: usize,
    ) {
        let chunks = k / super::LANES;
        let mut acc = [[[_mm256_setzero_ps(); 4]; T]; R];
        for c in 0..chunks {
            let o = c * super::LANES;
            for q in 0..4 {
                let mut wv = [_mm256_setzero_ps(); R];
                for g in 0..R {
                    // SAFETY: row r0 + g exists and o + 32 ≤ k.
                    wv[g] = unsafe { load8::<DT>(w, (r0 + g) * k + o + 8 * q) };
                }
                for j in 0..T {
                    // SAFETY: activation row j0 + j exists and o + 32 ≤ k.
                    let xv = unsafe { _mm256_loadu_ps(x.add((j0 + j) * k + o + 8 * q)) };
                    for g in 0..R {
                        acc[g][j][q] = _mm256_add_ps(acc[g][j][q], _mm256_mul_ps(wv[g], xv));
                    }
                }
            }
        }
        for g in 0..R {
            for j in 0..T {
                let mut s = reduce(acc[g][j]);
                for e in chunks * super::LANES..k {
                    // SAFETY: in bounds as above.
                    s += widen_at(dt::<DT>(), w, (r0 + g) * k + e)
                        * unsafe { *x.add((j0 + j) * k + e) };
                }
                // SAFETY: out covers rows base.. and t columns.
                unsafe { *out.add((r0 + g - base) * t + j0 + j) = s };
            }
        }
    }

    /// Rows × all `t` activation rows: one row at a time for the GEMV, 1 row × 2 activation rows
    /// for the GEMM (16 registers).
    ///
    /// # Safety
    /// AVX2 and F16C; bounds as for the AVX-512 `run`.
    #[target_feature(enable = "avx2,f16c")]
    pub(super) unsafe fn run<const DT: u8>(
        w: *const u8,
        k: usize,
        rows: std::ops::Range<usize>,
        x: &[f32],
        t: usize,
        out: &mut [f32],
    ) {
        let (base, xp, op) = (rows.start, x.as_ptr(), out.as_mut_ptr());
        // SAFETY (all calls): bounds per the function contract.
        unsafe {
            if t == 1 {
                for r in rows {
                    tile::<DT, 1, 1>(w, k, r, xp, 0, op, base, t);
                }
                return;
            }
            for r in rows {
                let mut j = 0;
                while j + 2 <= t {
                    tile::<DT, 1, 2>(w, k, r, xp, j, op, base, t);
                    j += 2;
                }
                if j < t {
                    tile::<DT, 1, 1>(w, k, r, xp, j, op, base, t);
                }
            }
        }
    }
}
