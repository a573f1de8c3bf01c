//! The integer MXFP4 path: activations quantized to int8 per block of 32 ([`Q8Rows`], as
//! llama.cpp's `q8_0`), multiplied with the MXFP4 codes by integer dot products ([`gemm_q8`]):
//! AVX-512-VNNI `vpdpbusd` (64 products per instruction), AVX2 `vpmaddubsw` + `vpmaddwd`, and a
//! portable kernel — all three computing **the same bits**.
//!
//! # Quantization (once per activation row, independent of everything else in the pass)
//! Per block of 32 values: `d = amax / 127` (f32), `q_i = round(x_i / d)` computed as
//! `round(x_i · (1/d))` (half away from zero, `|q_i| ≤ 127`; `d = 0` gives `q = 0`). A row's
//! codes depend only on the row, so a token quantizes the same in decode, verify and prefill.
//! Non-finite activations make the block's `d` non-finite and its outputs NaN/inf.
//!
//! # Arithmetic
//! Weights enter as the integers `2·E2M1 + 12 ∈ [0, 24]` (u8; the factor 2 is folded into the
//! half-scale `2^(s−128)`, the offset 12 removed exactly by `−12 · Σ q` of the block, computed at
//! quantization). Per group of 4 blocks and 16 i32 lanes (lane `l` = block `l / 4`, bytes
//! `4·(l mod 4) .. +4` of the block's even and odd elements) the integer sums are exact; each lane
//! is converted to f32 (exact: `|sum| < 2^24`) and accumulated as
//! `acc_l = fma(sum_l, half_scale_b · d_b, acc_l)`; the 16 lanes are added by a fixed tree. Every
//! kernel performs these operations, so the result depends only on the weight row and the
//! quantized activation row (not on the ISA, the batch or the thread split).
//!
//! # Error bound
//! Against the exact `y = Σ W·x`: quantization moves each `x_i` by at most `d_b / 2`, so
//! `|ŷ − y| ≤ Σ_b (d_b / 2) · Σ_{i∈b} |W_i| + ε_f32`, with `ε_f32 ≤ γ_{n_g + 4} · Σ_b |S_b|`,
//! `S_b` the block's dequantized partial sums, `n_g` the groups per row (the f32 accumulation);
//! [`q8_error_bound`] evaluates it and the tests check it. Scale bytes 0 and 1 (block values
//! below `2^-125`) are flushed to zero on this path.

use rayon::prelude::*;

use crate::format::{Fp4Error, MxMatrixRef, BLOCK, BLOCK_BYTES, E2M1_VALUES};

/// Blocks per kernel group (one 128-bit lane each).
const GROUP: usize = 4;
/// Activation bytes per group: 64 even elements, then 64 odd ones.
const GROUP_Q: usize = 2 * GROUP * BLOCK / 2;
/// Lanes per group.
const LANES: usize = 16;
/// The offset that makes the weight integers unsigned.
const W_OFFSET: i32 = 12;

/// `2 · E2M1(code) + 12` as u8, indexed by the 4-bit code.
const LUT_U8: [u8; 16] = [12, 13, 14, 15, 16, 18, 20, 24, 12, 11, 10, 9, 8, 6, 4, 0];

/// Activation rows quantized for [`gemm_q8`] (see the module docs), in the kernels' layout: per
/// row and group of 4 blocks, 128 int8 codes (each block's 16 even elements in 16-byte lane `b`,
/// then the odd ones), 16 f32 `d` (block `b`'s repeated in lanes `4b .. 4b + 4`) and 16 i32
/// corrections (`−12 · Σ q` of block `b` in lane `4b`). Rows are padded to whole groups with zeros.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Q8Rows {
    k: usize,
    groups: usize,
    rows: usize,
    q: Vec<i8>,
    d: Vec<f32>,
    corr: Vec<i32>,
}

impl Q8Rows {
    /// Empty, for rows of `k` values (`k` a multiple of 32).
    pub fn new(k: usize) -> Result<Q8Rows, Fp4Error> {
        let mut r = Q8Rows::default();
        r.reset(k)?;
        Ok(r)
    }

    /// Drops every row and sets the row length to `k` (keeps the buffers).
    pub fn reset(&mut self, k: usize) -> Result<(), Fp4Error> {
        if !k.is_multiple_of(BLOCK) {
            return Err(Fp4Error::LengthMismatch {
                what: "q8 row length (a multiple of 32)",
                expected: k.next_multiple_of(BLOCK),
                got: k,
            });
        }
        self.k = k;
        self.groups = (k / BLOCK).div_ceil(GROUP);
        self.rows = 0;
        self.q.clear();
        self.d.clear();
        self.corr.clear();
        Ok(())
    }

    /// Values per row.
    pub fn k(&self) -> usize {
        self.k
    }

    /// Quantized rows.
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// Quantizes `x` (`[n, k]` row-major) and appends its rows.
    pub fn push_rows(&mut self, x: &[f32]) -> Result<(), Fp4Error> {
        if self.k == 0 {
            return Ok(());
        }
        if !x.len().is_multiple_of(self.k) {
            return Err(Fp4Error::LengthMismatch {
                what: "q8 activations [n, K]",
                expected: x.len().next_multiple_of(self.k),
                got: x.len(),
            });
        }
        for row in x.chunks_exact(self.k) {
            self.push_row(row);
        }
        Ok(())
    }

    fn push_row(&mut self, x: &[f32]) {
        let g = self.groups;
        let (q0, d0, c0) = (self.q.len(), self.d.len(), self.corr.len());
        self.q.resize(q0 + g * GROUP_Q, 0);
        self.d.resize(d0 + g * LANES, 0.0);
        self.corr.resize(c0 + g * LANES, 0);
        #[cfg(target_arch = "x86_64")]
        let simd = std::arch::is_x86_feature_detected!("avx512f");
        for (b, xb) in x.chunks_exact(BLOCK).enumerate() {
            let (gi, lb) = (b / GROUP, b % GROUP);
            let qg = &mut self.q[q0 + gi * GROUP_Q..q0 + (gi + 1) * GROUP_Q];
            let xb: &[f32; BLOCK] = xb.try_into().expect("chunks of BLOCK");
            #[cfg(target_arch = "x86_64")]
            // SAFETY: AVX-512F is available (checked above).
            let done = simd
                .then(|| unsafe { quantize_block_avx512(xb, lb, qg) })
                .flatten();
            #[cfg(not(target_arch = "x86_64"))]
            let done = None;
            let (d, sum) = done.unwrap_or_else(|| quantize_block(xb, lb, qg));
            let dl = d0 + gi * LANES + lb * 4;
            self.d[dl..dl + 4].fill(d);
            self.corr[c0 + gi * LANES + lb * 4] = -W_OFFSET * sum;
        }
        self.rows += 1;
    }

    /// Appends a copy of row `row` of `other` (same `k`).
    pub fn push_from(&mut self, other: &Q8Rows, row: usize) -> Result<(), Fp4Error> {
        if other.k != self.k || row >= other.rows {
            return Err(Fp4Error::LengthMismatch {
                what: "q8 row copy (row length / row index)",
                expected: self.k,
                got: other.k,
            });
        }
        let g = self.groups;
        self.q
            .extend_from_slice(&other.q[row * g * GROUP_Q..(row + 1) * g * GROUP_Q]);
        self.d
            .extend_from_slice(&other.d[row * g * LANES..(row + 1) * g * LANES]);
        self.corr
            .extend_from_slice(&other.corr[row * g * LANES..(row + 1) * g * LANES]);
        self.rows += 1;
        Ok(())
    }

    /// Row `row` as the kernels see it: `d_b · q_i` per element, in the original order.
    pub fn dequantize_row(&self, row: usize) -> Vec<f32> {
        let g = self.groups;
        let mut out = vec![0f32; self.k];
        for (b, ob) in out.chunks_exact_mut(BLOCK).enumerate() {
            let (gi, lb) = (b / GROUP, b % GROUP);
            let qg = &self.q[(row * g + gi) * GROUP_Q..][..GROUP_Q];
            let d = self.d[(row * g + gi) * LANES + lb * 4];
            for (i, o) in ob.iter_mut().enumerate() {
                let at = (i % 2) * (GROUP * BLOCK / 2) + lb * (BLOCK / 2) + i / 2;
                *o = d * f32::from(qg[at]);
            }
        }
        out
    }

    /// The largest `d_b` of row `row`'s blocks (for error bounds): one per block.
    pub fn block_scales(&self, row: usize) -> Vec<f32> {
        let g = self.groups;
        (0..self.k / BLOCK)
            .map(|b| self.d[(row * g + b / GROUP) * LANES + (b % GROUP) * 4])
            .collect()
    }

    fn row(&self, r: usize) -> RowRef<'_> {
        let g = self.groups;
        RowRef {
            q: &self.q[r * g * GROUP_Q..(r + 1) * g * GROUP_Q],
            d: &self.d[r * g * LANES..(r + 1) * g * LANES],
            corr: &self.corr[r * g * LANES..(r + 1) * g * LANES],
        }
    }
}

/// Quantizes one block of 32 activations (the module docs' rule) into its group's codes
/// `qg` (block `lb` of the group: even elements at `lb·16 ..`, odd ones 64 bytes on) and
/// returns `(d, Σ q)`. The definition; [`quantize_block_avx512`] gives the same bits.
fn quantize_block(xb: &[f32; BLOCK], lb: usize, qg: &mut [i8]) -> (f32, i32) {
    let amax = xb.iter().fold(0f32, |m, v| m.max(v.abs()));
    let amax = if xb.iter().any(|v| !v.is_finite()) {
        f32::NAN
    } else {
        amax
    };
    let d = amax / 127.0;
    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
    let mut sum = 0i32;
    for (i, &v) in xb.iter().enumerate() {
        let q = (v * id).round().clamp(-127.0, 127.0) as i8;
        sum += i32::from(q);
        qg[(i % 2) * (GROUP * BLOCK / 2) + lb * (BLOCK / 2) + i / 2] = q;
    }
    (d, sum)
}

/// [`quantize_block`] with AVX-512F, bit for bit: the same `amax` (max is exact in any order),
/// `d`, `1/d` and products, rounded half away from zero as `trunc(p) ± 1` when `|p − trunc(p)| ≥
/// 0.5` (exact: `p − trunc(p)` is exact for `|p| < 2²³`). Returns `None` — the caller then runs
/// [`quantize_block`] — for the rare blocks where the products are not all finite (a non-finite
/// activation, or `1/d` overflowing for a subnormal `amax`), whose NaN/∞ handling is the scalar
/// conversion's.
///
/// # Safety
/// AVX-512F present.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn quantize_block_avx512(xb: &[f32; BLOCK], lb: usize, qg: &mut [i8]) -> Option<(f32, i32)> {
    use std::arch::x86_64::*;
    debug_assert_eq!(qg.len(), GROUP_Q);
    // SAFETY: 32 floats in `xb`.
    let (x0, x1) = unsafe {
        (
            _mm512_loadu_ps(xb.as_ptr()),
            _mm512_loadu_ps(xb.as_ptr().add(16)),
        )
    };
    let abs = |v| {
        _mm512_castsi512_ps(_mm512_and_si512(
            _mm512_castps_si512(v),
            _mm512_set1_epi32(0x7fff_ffff),
        ))
    };
    let (a0, a1) = (abs(x0), abs(x1));
    let big = _mm512_set1_ps(f32::MAX);
    // Non-finite (NaN fails `<=`, ∞ exceeds MAX): the scalar path.
    if _mm512_cmp_ps_mask::<_CMP_LE_OQ>(a0, big) != 0xffff
        || _mm512_cmp_ps_mask::<_CMP_LE_OQ>(a1, big) != 0xffff
    {
        return None;
    }
    let amax = _mm512_reduce_max_ps(_mm512_max_ps(a0, a1));
    let d = amax / 127.0;
    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
    if !id.is_finite() {
        return None;
    }
    let idv = _mm512_set1_ps(id);
    // Even elements 0, 2, …, 30 and odd ones 1, 3, …, 31 of the block.
    let even = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
    let odd = _mm512_setr_epi32(1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31);
    let half = _mm512_set1_ps(0.5);
    let one = _mm512_set1_ps(1.0);
    let lim = _mm512_set1_ps(127.0);
    let quant = |idx| {
        let p = _mm512_mul_ps(_mm512_permutex2var_ps(x0, idx, x1), idv);
        let t = _mm512_roundscale_ps::<{ _MM_FROUND_TO_ZERO | _MM_FROUND_NO_EXC }>(p);
        let f = _mm512_sub_ps(p, t);
        let up = _mm512_cmp_ps_mask::<_CMP_GE_OQ>(f, half);
        let down = _mm512_cmp_ps_mask::<_CMP_LE_OQ>(f, _mm512_sub_ps(_mm512_setzero_ps(), half));
        let r = _mm512_mask_sub_ps(_mm512_mask_add_ps(t, up, t, one), down, t, one);
        let r = _mm512_min_ps(
            _mm512_max_ps(r, _mm512_sub_ps(_mm512_setzero_ps(), lim)),
            lim,
        );
        _mm512_cvtps_epi32(r)
    };
    let (qe, qo) = (quant(even), quant(odd));
    let sum = _mm512_reduce_add_epi32(_mm512_add_epi32(qe, qo));
    // SAFETY: 16 bytes at `lb·16` and at `64 + lb·16` inside the group's 128.
    unsafe {
        let p = qg.as_mut_ptr().add(lb * (BLOCK / 2));
        _mm_storeu_si128(p.cast(), _mm512_cvtepi32_epi8(qe));
        _mm_storeu_si128(p.add(GROUP * BLOCK / 2).cast(), _mm512_cvtepi32_epi8(qo));
    }
    Some((d, sum))
}

#[derive(Clone, Copy)]
struct RowRef<'a> {
    q: &'a [i8],
    d: &'a [f32],
    corr: &'a [i32],
}

/// The integer kernels. [`Q8Kernel::detect`] picks the fastest this CPU runs; all give the same
/// bits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Q8Kernel {
    Portable,
    /// AVX2 `vpmaddubsw` / `vpmaddwd` (+FMA).
    Avx2,
    /// AVX-512BW + VNNI `vpdpbusd`.
    Avx512Vnni,
}

impl Q8Kernel {
    pub const ALL: [Q8Kernel; 3] = [Q8Kernel::Portable, Q8Kernel::Avx2, Q8Kernel::Avx512Vnni];

    pub fn name(self) -> &'static str {
        match self {
            Q8Kernel::Portable => "portable",
            Q8Kernel::Avx2 => "avx2",
            Q8Kernel::Avx512Vnni => "avx512-vnni",
        }
    }

    pub fn is_available(self) -> bool {
        match self {
            Q8Kernel::Portable => true,
            #[cfg(target_arch = "x86_64")]
            Q8Kernel::Avx2 => {
                std::arch::is_x86_feature_detected!("avx2")
                    && std::arch::is_x86_feature_detected!("fma")
            }
            #[cfg(target_arch = "x86_64")]
            Q8Kernel::Avx512Vnni => {
                std::arch::is_x86_feature_detected!("avx512f")
                    && std::arch::is_x86_feature_detected!("avx512bw")
                    && std::arch::is_x86_feature_detected!("avx512vnni")
            }
            #[cfg(not(target_arch = "x86_64"))]
            _ => false,
        }
    }

    pub fn detect() -> Q8Kernel {
        if Q8Kernel::Avx512Vnni.is_available() {
            Q8Kernel::Avx512Vnni
        } else if Q8Kernel::Avx2.is_available() {
            Q8Kernel::Avx2
        } else {
            Q8Kernel::Portable
        }
    }
}

/// `y[t, r] = Σ_k W[r, k] · x̂[t, k]` for every quantized row `t` of `x` (`y` is
/// `[x.rows(), N]`), on the fastest kernel. Row `t` is bit-identical whatever else is in `x`.
pub fn gemm_q8(w: MxMatrixRef<'_>, x: &Q8Rows, y: &mut [f32]) -> Result<(), Fp4Error> {
    gemm_q8_with(Q8Kernel::detect(), w, x, y)
}

/// Rows of `x` one kernel call handles together (each weight group is decoded once for them).
const TILE: usize = 8;

/// [`gemm_q8`] on a chosen kernel ([`Fp4Error::KernelUnavailable`] if this CPU lacks it).
pub fn gemm_q8_with(
    kernel: Q8Kernel,
    w: MxMatrixRef<'_>,
    x: &Q8Rows,
    y: &mut [f32],
) -> Result<(), Fp4Error> {
    let (n, k, t) = (w.rows(), w.k(), x.rows());
    if x.k() != k {
        return Err(Fp4Error::LengthMismatch {
            what: "q8 activations K",
            expected: k,
            got: x.k(),
        });
    }
    if y.len() != t * n {
        return Err(Fp4Error::LengthMismatch {
            what: "output y [batch, N]",
            expected: t * n,
            got: y.len(),
        });
    }
    if !kernel.is_available() {
        return Err(Fp4Error::KernelUnavailable {
            kernel: kernel.name(),
        });
    }
    if n == 0 || t == 0 {
        return Ok(());
    }
    if k == 0 {
        y.fill(0.0);
        return Ok(());
    }
    let rpt = crate::cpu::rows_per_task(n, (k / 2 + k / BLOCK) * (t.min(TILE) + 1) / 2, 64 << 10);
    if t == 1 {
        // [N, 1] is y itself.
        let run = |ci: usize, chunk: &mut [f32]| {
            let r0 = ci * rpt;
            tile_kernel(kernel, w, r0..r0 + chunk.len(), x, 0, 1, chunk);
        };
        if rpt >= n {
            run(0, y);
        } else {
            y.par_chunks_mut(rpt)
                .enumerate()
                .for_each(|(ci, c)| run(ci, c));
        }
        return Ok(());
    }
    // Rows are computed as [N, t]; transpose into y [t, N].
    let mut tmp = vec![0f32; n * t];
    let run = |ci: usize, chunk: &mut [f32]| {
        let r0 = ci * rpt;
        let nrows = chunk.len() / t;
        let mut part = vec![0f32; nrows * TILE];
        for t0 in (0..t).step_by(TILE) {
            let tt = TILE.min(t - t0);
            let part = &mut part[..nrows * tt];
            tile_kernel(kernel, w, r0..r0 + nrows, x, t0, tt, part);
            for (i, p) in part.chunks_exact(tt).enumerate() {
                chunk[i * t + t0..i * t + t0 + tt].copy_from_slice(p);
            }
        }
    };
    if rpt >= n {
        run(0, &mut tmp);
    } else {
        tmp.par_chunks_mut(rpt * t)
            .enumerate()
            .for_each(|(ci, c)| run(ci, c));
    }
    for (r, vals) in tmp.chunks_exact(t).enumerate() {
        for (ti, &v) in vals.iter().enumerate() {
            y[ti * n + r] = v;
        }
    }
    Ok(())
}

/// Weight rows `rows` against activation rows `t0 .. t0 + tt` (`tt ≤ TILE`) into `out`
/// (`[rows, tt]`).
fn tile_kernel(
    kernel: Q8Kernel,
    w: MxMatrixRef<'_>,
    rows: std::ops::Range<usize>,
    x: &Q8Rows,
    t0: usize,
    tt: usize,
    out: &mut [f32],
) {
    let nb = w.blocks_per_row();
    let codes = &w.blocks()[rows.start * nb * BLOCK_BYTES..rows.end * nb * BLOCK_BYTES];
    let scales = &w.scales()[rows.start * nb..rows.end * nb];
    macro_rules! go {
        ($b:literal) => {{
            let xs: [RowRef<'_>; $b] = std::array::from_fn(|i| x.row(t0 + i));
            match kernel {
                Q8Kernel::Portable => portable(codes, scales, nb, &xs, out),
                #[cfg(target_arch = "x86_64")]
                // SAFETY: availability checked by gemm_q8_with; `codes` / `scales` hold whole
                // rows (nb·16 bytes and nb scales each) and every row of `xs` has the Q8Rows
                // layout for ceil(nb/4) groups (checked by the kernel's debug asserts).
                Q8Kernel::Avx2 => unsafe { avx2::<$b>(codes, scales, nb, &xs, out) },
                #[cfg(target_arch = "x86_64")]
                // SAFETY: as above.
                Q8Kernel::Avx512Vnni => unsafe { vnni::<$b>(codes, scales, nb, &xs, out) },
                #[cfg(not(target_arch = "x86_64"))]
                _ => unreachable!("unavailable kernels are rejected by gemm_q8_with"),
            }
        }};
    }
    match tt {
        1 => go!(1),
        2 => go!(2),
        3 => go!(3),
        4 => go!(4),
        5 => go!(5),
        6 => go!(6),
        7 => go!(7),
        8 => go!(8),
        _ => unreachable!("tiles have 1..=TILE rows"),
    }
}

/// `2^(s − 128)` for scale byte `s ≥ 2`, 0 for `s ≤ 1` (the kernels' half-scale).
#[inline(always)]
fn half_scale(s: u8) -> f32 {
    f32::from_bits(((s as u32).max(1) - 1) << 23)
}

/// The fixed 16-lane reduction.
#[inline(always)]
fn reduce16(a: &[f32; 16]) -> f32 {
    let mut h = [0f32; 8];
    for i in 0..8 {
        h[i] = a[i] + a[i + 8];
    }
    ((h[0] + h[4]) + (h[2] + h[6])) + ((h[1] + h[5]) + (h[3] + h[7]))
}

fn portable<const B: usize>(
    codes: &[u8],
    scales: &[u8],
    nb: usize,
    xs: &[RowRef<'_>; B],
    out: &mut [f32],
) {
    let groups = nb.div_ceil(GROUP);
    for (r, o) in out.chunks_exact_mut(B).enumerate() {
        let codes = &codes[r * nb * BLOCK_BYTES..(r + 1) * nb * BLOCK_BYTES];
        let scales = &scales[r * nb..(r + 1) * nb];
        for (xr, o) in xs.iter().zip(o.iter_mut()) {
            let mut acc = [0f32; LANES];
            for g in 0..groups {
                let qg = &xr.q[g * GROUP_Q..(g + 1) * GROUP_Q];
                for (l, a) in acc.iter_mut().enumerate() {
                    let (lb, j) = (l / 4, l % 4);
                    let b = g * GROUP + lb;
                    let hs = if b < nb { half_scale(scales[b]) } else { 0.0 };
                    let mut sum = xr.corr[g * LANES + l];
                    for m in 0..4 {
                        let byte = if b < nb {
                            codes[b * BLOCK_BYTES + 4 * j + m]
                        } else {
                            0
                        };
                        let at = lb * (BLOCK / 2) + 4 * j + m;
                        sum += i32::from(LUT_U8[(byte & 15) as usize]) * i32::from(qg[at]);
                        sum += i32::from(LUT_U8[(byte >> 4) as usize])
                            * i32::from(qg[GROUP_Q / 2 + at]);
                    }
                    *a = (sum as f32).mul_add(hs * xr.d[g * LANES + l], *a);
                }
            }
            *o = reduce16(&acc);
        }
    }
}

/// # Safety
/// AVX-512F/BW/VNNI present; `codes` = nb·16 bytes, `scales` = nb bytes, each row of `xs` in the
/// [`Q8Rows`] layout for `ceil(nb/4)` groups.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
#[allow(clippy::needless_range_loop)] // t indexes acc and out
unsafe fn vnni<const B: usize>(
    codes: &[u8],
    scales: &[u8],
    nb: usize,
    xs: &[RowRef<'_>; B],
    out: &mut [f32],
) {
    use std::arch::x86_64::*;
    let groups = nb.div_ceil(GROUP);
    let nrows = out.len() / B;
    debug_assert!(codes.len() == nrows * nb * BLOCK_BYTES && scales.len() == nrows * nb);
    debug_assert!(xs.iter().all(|x| x.q.len() == groups * GROUP_Q
        && x.d.len() == groups * LANES
        && x.corr.len() == groups * LANES));
    let lut = _mm512_broadcast_i32x4(_mm_loadu_si128(LUT_U8.as_ptr().cast()));
    let m0f = _mm512_set1_epi8(0x0F);
    let rep = _mm_setr_epi8(0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3);
    let one = _mm512_set1_epi32(1);
    let zero = _mm512_setzero_si512();
    for r in 0..nrows {
        let mut acc = [_mm512_setzero_ps(); B];
        for g in 0..groups {
            let nblk = GROUP.min(nb - g * GROUP);
            let cp = codes.as_ptr().add((r * nb + g * GROUP) * BLOCK_BYTES);
            let sp = scales.as_ptr().add(r * nb + g * GROUP);
            let (c, sb) = if nblk == GROUP {
                (
                    _mm512_loadu_si512(cp.cast()),
                    _mm_cvtsi32_si128(sp.cast::<i32>().read_unaligned()),
                )
            } else {
                (
                    _mm512_maskz_loadu_epi8((1u64 << (16 * nblk)) - 1, cp.cast()),
                    _mm_maskz_loadu_epi8((1u16 << nblk) - 1, sp.cast()),
                )
            };
            let wlo = _mm512_shuffle_epi8(lut, _mm512_and_si512(c, m0f));
            let whi = _mm512_shuffle_epi8(lut, _mm512_and_si512(_mm512_srli_epi16::<4>(c), m0f));
            let e = _mm512_cvtepu8_epi32(_mm_shuffle_epi8(sb, rep));
            let hs = _mm512_castsi512_ps(_mm512_slli_epi32::<23>(_mm512_max_epi32(
                _mm512_sub_epi32(e, one),
                zero,
            )));
            for (t, xr) in xs.iter().enumerate() {
                let q = xr.q.as_ptr().add(g * GROUP_Q);
                let mut ai = _mm512_loadu_si512(xr.corr.as_ptr().add(g * LANES).cast());
                ai = _mm512_dpbusd_epi32(ai, wlo, _mm512_loadu_si512(q.cast()));
                ai = _mm512_dpbusd_epi32(ai, whi, _mm512_loadu_si512(q.add(GROUP_Q / 2).cast()));
                let sc = _mm512_mul_ps(hs, _mm512_loadu_ps(xr.d.as_ptr().add(g * LANES)));
                acc[t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(ai), sc, acc[t]);
            }
        }
        for t in 0..B {
            // reduce16 in registers: (i + i+8), then (i + i+4), then (0 + 2, 1 + 3), then the pair.
            let h = _mm256_add_ps(
                _mm512_castps512_ps256(acc[t]),
                _mm256_castpd_ps(_mm512_extractf64x4_pd::<1>(_mm512_castps_pd(acc[t]))),
            );
            *out.get_unchecked_mut(r * B + t) = reduce8_reg(h);
        }
    }
}

/// [`reduce16`]'s last steps on 8 lanes in a register.
///
/// # Safety
/// AVX present.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx")]
#[inline]
unsafe fn reduce8_reg(h: std::arch::x86_64::__m256) -> f32 {
    use std::arch::x86_64::*;
    let q = _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps::<1>(h));
    let r = _mm_add_ps(q, _mm_movehl_ps(q, q));
    _mm_cvtss_f32(_mm_add_ss(r, _mm_shuffle_ps::<1>(r, r)))
}

/// # Safety
/// AVX2 and FMA present; lengths as [`vnni`].
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
#[allow(clippy::needless_range_loop)] // h indexes the codes, the scales and every row's acc
unsafe fn avx2<const B: usize>(
    codes: &[u8],
    scales: &[u8],
    nb: usize,
    xs: &[RowRef<'_>; B],
    out: &mut [f32],
) {
    use std::arch::x86_64::*;
    let groups = nb.div_ceil(GROUP);
    let nrows = out.len() / B;
    debug_assert!(codes.len() == nrows * nb * BLOCK_BYTES && scales.len() == nrows * nb);
    let lut = _mm256_broadcastsi128_si256(_mm_loadu_si128(LUT_U8.as_ptr().cast()));
    let m0f = _mm256_set1_epi8(0x0F);
    let ones = _mm256_set1_epi16(1);
    let mut cbuf;
    let mut hsb = [0f32; LANES];
    for r in 0..nrows {
        let codes = &codes[r * nb * BLOCK_BYTES..(r + 1) * nb * BLOCK_BYTES];
        let scales = &scales[r * nb..(r + 1) * nb];
        let mut acc = [[_mm256_setzero_ps(); 2]; B];
        for g in 0..groups {
            let nblk = GROUP.min(nb - g * GROUP);
            let cp = if nblk == GROUP {
                codes.as_ptr().add(g * GROUP * BLOCK_BYTES)
            } else {
                cbuf = [0u8; GROUP * BLOCK_BYTES];
                cbuf[..nblk * BLOCK_BYTES].copy_from_slice(&codes[g * GROUP * BLOCK_BYTES..]);
                cbuf.as_ptr()
            };
            for lb in 0..GROUP {
                let b = g * GROUP + lb;
                let hs = if b < nb { half_scale(scales[b]) } else { 0.0 };
                hsb[lb * 4..lb * 4 + 4].fill(hs);
            }
            for h in 0..2 {
                let c = _mm256_loadu_si256(cp.add(h * 32).cast());
                let wlo = _mm256_shuffle_epi8(lut, _mm256_and_si256(c, m0f));
                let whi =
                    _mm256_shuffle_epi8(lut, _mm256_and_si256(_mm256_srli_epi16::<4>(c), m0f));
                let hs = _mm256_loadu_ps(hsb.as_ptr().add(h * 8));
                for t in 0..B {
                    let xr = &xs[t];
                    let q = xr.q.as_ptr().add(g * GROUP_Q + h * 32);
                    let pe = _mm256_maddubs_epi16(wlo, _mm256_loadu_si256(q.cast()));
                    let po =
                        _mm256_maddubs_epi16(whi, _mm256_loadu_si256(q.add(GROUP_Q / 2).cast()));
                    let mut ai = _mm256_loadu_si256(xr.corr.as_ptr().add(g * LANES + h * 8).cast());
                    ai = _mm256_add_epi32(ai, _mm256_madd_epi16(pe, ones));
                    ai = _mm256_add_epi32(ai, _mm256_madd_epi16(po, ones));
                    let sc =
                        _mm256_mul_ps(hs, _mm256_loadu_ps(xr.d.as_ptr().add(g * LANES + h * 8)));
                    acc[t][h] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(ai), sc, acc[t][h]);
                }
            }
        }
        for t in 0..B {
            out[r * B + t] = reduce8_reg(_mm256_add_ps(acc[t][0], acc[t][1]));
        }
    }
}

/// The bound of the module docs for output `r` of `w · x̂[t]` against the exact product with the
/// unquantized `x` (`[K]`): quantization `Σ_b (d_b/2) Σ|W_i|` plus the f32 accumulation
/// `γ_{groups+4} · Σ|W_i · x̂_i|`.
pub fn q8_error_bound(w: MxMatrixRef<'_>, r: usize, x: &Q8Rows, t: usize) -> f64 {
    let k = w.k();
    let wrow = {
        let mut v = vec![0f32; k];
        let codes = w.row_blocks(r);
        let scales = w.row_scales(r);
        for (b, ob) in v.chunks_exact_mut(BLOCK).enumerate() {
            let s = crate::format::e8m0_to_f64(scales[b]);
            for (j, o) in ob.chunks_exact_mut(2).enumerate() {
                let byte = codes[b * BLOCK_BYTES + j];
                o[0] = (f64::from(E2M1_VALUES[(byte & 15) as usize]) * s) as f32;
                o[1] = (f64::from(E2M1_VALUES[(byte >> 4) as usize]) * s) as f32;
            }
        }
        v
    };
    let xq = x.dequantize_row(t);
    let ds = x.block_scales(t);
    let mut quant = 0f64;
    let mut mag = 0f64;
    for (b, (wb, xb)) in wrow
        .chunks_exact(BLOCK)
        .zip(xq.chunks_exact(BLOCK))
        .enumerate()
    {
        let aw: f64 = wb.iter().map(|v| f64::from(v.abs())).sum();
        quant += f64::from(ds[b]) / 2.0 * aw;
        mag += wb
            .iter()
            .zip(xb)
            .map(|(a, b)| (f64::from(*a) * f64::from(*b)).abs())
            .sum::<f64>();
    }
    let n = (k / BLOCK).div_ceil(GROUP) + 4;
    let u = f64::from(f32::EPSILON) / 2.0;
    let gamma = n as f64 * u / (1.0 - n as f64 * u);
    quant + gamma * mag * 1.01 + f64::from(f32::MIN_POSITIVE)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The AVX-512 block quantizer gives the scalar definition's bits on random blocks, on
    /// exact halves (the rounding rule), zeros, subnormals and non-finite values.
    #[test]
    fn simd_block_quantization_is_the_scalar_one() {
        #[cfg(target_arch = "x86_64")]
        {
            if !std::arch::is_x86_feature_detected!("avx512f") {
                eprintln!("SKIPPED simd_block_quantization_is_the_scalar_one: no AVX-512F");
                return;
            }
            let mut seed = 0x9e37_79b9_7f4a_7c15u64;
            let mut next = move || {
                seed ^= seed << 13;
                seed ^= seed >> 7;
                seed ^= seed << 17;
                seed
            };
            let mut blocks: Vec<[f32; BLOCK]> = Vec::new();
            for _ in 0..2000 {
                let scale = f32::powi(2.0, (next() % 40) as i32 - 20);
                blocks.push(std::array::from_fn(|_| {
                    ((next() % 2_000_001) as f32 / 1_000_000.0 - 1.0) * scale
                }));
            }
            // amax 127: every value k + 0.5 is an exact half after the scaling.
            blocks.push(std::array::from_fn(|i| {
                if i == 0 {
                    127.0
                } else {
                    (i as f32 - 16.0) + 0.5
                }
            }));
            blocks.push([0.0; BLOCK]);
            blocks.push(std::array::from_fn(|i| (i as f32) * 1e-41));
            blocks.push(std::array::from_fn(|i| if i == 3 { f32::NAN } else { 1.0 }));
            blocks.push(std::array::from_fn(|i| {
                if i == 9 {
                    f32::INFINITY
                } else {
                    -2.0
                }
            }));
            blocks.push(std::array::from_fn(|i| if i % 2 == 0 { -0.0 } else { 3.0 }));
            for (n, xb) in blocks.iter().enumerate() {
                for lb in 0..GROUP {
                    let (mut a, mut b) = ([0i8; GROUP_Q], [0i8; GROUP_Q]);
                    let want = quantize_block(xb, lb, &mut a);
                    // SAFETY: AVX-512F checked above.
                    let got = unsafe { quantize_block_avx512(xb, lb, &mut b) };
                    match got {
                        Some((d, sum)) => {
                            assert_eq!(d.to_bits(), want.0.to_bits(), "block {n}: d");
                            assert_eq!(sum, want.1, "block {n}: sum");
                            assert_eq!(a, b, "block {n}: codes");
                        }
                        None => assert!(
                            xb.iter().any(|v| !v.is_finite()) || !(1.0 / want.0).is_finite(),
                            "block {n}: the SIMD path declined a finite block"
                        ),
                    }
                }
            }
        }
    }
}
