//! The ops of one decoder step as small pure functions, f32 in, f32 out, f32 accumulation.
//!
//! Weights are read in their stored dtype ([`MatData`]: f32, bf16, f16, FP8 E4M3 with block
//! scales) and widened to f32 element by element inside the kernels; the widening is exact and
//! the f32 operations are the same whatever the dtype, so a bf16 matrix gives bit-for-bit the
//! result of the same values held as f32.
//!
//! [`matvec`] / [`matmul`] run the per-dtype kernels of [`super::kernels`] (one weight row
//! streamed per output row for decode; for `t > 1` rows each weight chunk is loaded once per
//! register tile of activation rows).
//!
//! Each op has exactly one definition here; the CPU executor calls these and every GPU kernel is
//! tested against them. None of them allocates except [`matmul`] for batches of more than one
//! row (a transposed temporary) and [`attention_head`] growing its caller-owned score buffer.
//!
//! Determinism: every output element is produced by the same sequence of f32 operations whatever
//! the batch size or the rayon split, so a token's results are bit-identical whether it runs
//! alone (decode) or inside a block (prefill / verify). The executor's tests rely on this.

use rayon::prelude::*;

use crate::config::{Activation, AttnKind, LayerSpec};
use half::{bf16, f16};

use super::kernels;
use crate::weights::{GateUpLayout, Linear, Mat, MatData};

/// Below this many multiply-adds a matrix op (or a layer's attention) runs on the calling thread:
/// waking the rayon pool costs more than such a call takes.
pub const PAR_MIN_WORK: usize = 1 << 17;

/// Tokens per tile in [`matmul`]: each weight row is used for this many activation rows while it
/// is in L1.
const MATMUL_TOKEN_TILE: usize = 32;

// ---------------------------------------------------------------------------------------------
// Reductions and matrix products
// ---------------------------------------------------------------------------------------------

/// `Σ a_i · b_i` in f32 with 32 interleaved partial sums (lane `i mod 32`), combined by a fixed
/// tree (lanes `i` and `i + 16`, then `i` and `i + 8`, then `i` and `i + 4`, then
/// `(l0 + l2) + (l1 + l3)`), then the `len mod 32` tail added sequentially. Multiply and add
/// are separate roundings (no FMA), so the order — and the result — depends only on the
/// length: the AVX2 kernel used on CPUs that have it is bit-identical to [`dot_portable`].
#[inline]
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len(), "dot: lengths differ");
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx2") {
            // SAFETY: AVX2 is available (checked just above); lengths are equal.
            return unsafe { dot_avx2(a, b) };
        }
    }
    dot_portable(a, b)
}

const DOT_LANES: usize = 32;

/// AVX-512F versions of [`dot`] and [`axpy`] for attention's inner loops (one query head
/// against every key): the same operations in the same order, so the same bits, without a
/// feature check and a call per key.
#[cfg(target_arch = "x86_64")]
mod attn_avx512 {
    use std::arch::x86_64::*;

    use super::{KvRows, DOT_LANES};

    /// [`super::dot`]: lanes `i mod 32` in two registers (0–15, 16–31), multiply then add
    /// (no FMA), the fixed tree, then the tail in order.
    #[inline]
    #[target_feature(enable = "avx512f")]
    fn dot(a: &[f32], b: &[f32]) -> f32 {
        let n = a.len().min(b.len());
        let chunks = n / DOT_LANES;
        let (pa, pb) = (a.as_ptr(), b.as_ptr());
        let mut acc = [_mm512_setzero_ps(); 2];
        for c in 0..chunks {
            let o = c * DOT_LANES;
            for (j, r) in acc.iter_mut().enumerate() {
                // SAFETY: o + 16j + 16 ≤ chunks · 32 ≤ n for both slices.
                let (x, y) = unsafe {
                    (
                        _mm512_loadu_ps(pa.add(o + 16 * j)),
                        _mm512_loadu_ps(pb.add(o + 16 * j)),
                    )
                };
                *r = _mm512_add_ps(*r, _mm512_mul_ps(x, y));
            }
        }
        let h16 = _mm512_add_ps(acc[0], acc[1]);
        let h8 = _mm256_add_ps(
            _mm512_castps512_ps256(h16),
            _mm256_castpd_ps(_mm512_extractf64x4_pd::<1>(_mm512_castps_pd(h16))),
        );
        let q = _mm_add_ps(_mm256_castps256_ps128(h8), _mm256_extractf128_ps::<1>(h8));
        let r = _mm_add_ps(q, _mm_movehl_ps(q, q));
        let mut s = _mm_cvtss_f32(_mm_add_ss(r, _mm_shuffle_ps::<1>(r, r)));
        for i in chunks * DOT_LANES..n {
            s += a[i] * b[i];
        }
        s
    }

    /// [`super::axpy`]: `y_i ← y_i + a · x_i`, each element rounded as the scalar loop does.
    #[inline]
    #[target_feature(enable = "avx512f")]
    fn axpy(y: &mut [f32], a: f32, x: &[f32]) {
        let n = y.len().min(x.len());
        let av = _mm512_set1_ps(a);
        let mut i = 0;
        while i + 16 <= n {
            // SAFETY: i + 16 ≤ n for both slices.
            unsafe {
                let p = y.as_mut_ptr().add(i);
                let v = _mm512_add_ps(
                    _mm512_loadu_ps(p),
                    _mm512_mul_ps(av, _mm512_loadu_ps(x.as_ptr().add(i))),
                );
                _mm512_storeu_ps(p, v);
            }
            i += 16;
        }
        for j in i..n {
            y[j] += a * x[j];
        }
    }

    /// [`super::attention_head_rows`] with these kernels.
    ///
    /// # Safety
    /// AVX-512F present.
    #[allow(clippy::too_many_arguments)]
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn head_rows(
        q: &[f32],
        k: (&impl KvRows, usize),
        v: (&impl KvRows, usize),
        keys: std::ops::Range<usize>,
        scale: f32,
        sink: Option<f32>,
        scores: &mut Vec<f32>,
        out: &mut [f32],
    ) {
        super::attention_head_rows_with(
            q,
            k,
            v,
            keys,
            scale,
            sink,
            scores,
            out,
            |a, b| dot(a, b),
            |y, a, x| axpy(y, a, x),
        )
    }
}

/// The portable definition of [`dot`] (same result on every CPU).
pub fn dot_portable(a: &[f32], b: &[f32]) -> f32 {
    dot_widen(a, b, |x| x)
}

/// [`dot_portable`] of `a` widened to f32 by `widen` element by element (the same lanes, tree
/// and tail, so the result equals `dot_portable` of the widened vector bit for bit).
#[inline]
fn dot_widen<T: Copy>(a: &[T], b: &[f32], widen: impl Fn(T) -> f32) -> f32 {
    assert_eq!(a.len(), b.len(), "dot: lengths differ");
    let (ca, ta) = a.as_chunks::<DOT_LANES>();
    let (cb, tb) = b.as_chunks::<DOT_LANES>();
    let mut acc = [0f32; DOT_LANES];
    for (x, y) in ca.iter().zip(cb) {
        for i in 0..DOT_LANES {
            acc[i] += widen(x[i]) * y[i];
        }
    }
    let mut h16 = [0f32; 16];
    for i in 0..16 {
        h16[i] = acc[i] + acc[i + 16];
    }
    let mut h8 = [0f32; 8];
    for i in 0..8 {
        h8[i] = h16[i] + h16[i + 8];
    }
    let q = [h8[0] + h8[4], h8[1] + h8[5], h8[2] + h8[6], h8[3] + h8[7]];
    let mut s = (q[0] + q[2]) + (q[1] + q[3]);
    for (&x, y) in ta.iter().zip(tb) {
        s += widen(x) * y;
    }
    s
}

/// [`dot`] of a bf16 vector (widened per element) with an f32 vector: bit-identical to `dot`
/// of the widened vector.
#[inline]
pub fn dot_bf16(a: &[bf16], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len(), "dot: lengths differ");
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx2") {
            // SAFETY: AVX2 is available (checked just above); lengths are equal.
            return unsafe { dot_bf16_avx2(a, b) };
        }
    }
    dot_widen(a, b, bf16::to_f32)
}

/// [`dot`] of an f16 vector (widened per element) with an f32 vector: bit-identical to `dot`
/// of the widened vector.
#[inline]
pub fn dot_f16(a: &[f16], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len(), "dot: lengths differ");
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx2")
            && std::arch::is_x86_feature_detected!("f16c")
        {
            // SAFETY: AVX2 and F16C are available (checked just above); lengths are equal.
            return unsafe { dot_f16_avx2(a, b) };
        }
    }
    dot_widen(a, b, f16::to_f32)
}

/// `dot(row r of w, x)` with the row widened as it is read (`x.len()` = the matrix's columns).
/// FP8 rows are widened (and scaled) into `scratch` first. Bit-identical to [`dot`] of the
/// widened row for every dtype.
#[inline]
pub fn dot_row(w: MatData<'_>, r: usize, x: &[f32], scratch: &mut Vec<f32>) -> f32 {
    let k = x.len();
    match w {
        MatData::F32(v) => dot(&v[r * k..(r + 1) * k], x),
        MatData::Bf16(v) => dot_bf16(&v[r * k..(r + 1) * k], x),
        MatData::F16(v) => dot_f16(&v[r * k..(r + 1) * k], x),
        MatData::F8E4M3 { codes, scales } => kernels::dot_f8(
            &codes[r * k..(r + 1) * k],
            scales.as_ref().map(|s| (s.row(r), s.block[1])),
            x,
            scratch,
        ),
    }
}

/// [`dot_portable`] with AVX2: four 8-lane accumulators hold lanes 0–7, 8–15, 16–23, 24–31.
///
/// # Safety
/// The CPU must support AVX2 and `a.len() == b.len()`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn dot_avx2(a: &[f32], b: &[f32]) -> f32 {
    use std::arch::x86_64::*;
    let n = a.len();
    let chunks = n / DOT_LANES;
    let (pa, pb) = (a.as_ptr(), b.as_ptr());
    let mut acc = [_mm256_setzero_ps(); 4];
    for c in 0..chunks {
        let o = c * DOT_LANES;
        for (j, r) in acc.iter_mut().enumerate() {
            // SAFETY: o + 8j + 8 ≤ chunks · 32 ≤ n for both slices.
            let (x, y) = unsafe {
                (
                    _mm256_loadu_ps(pa.add(o + 8 * j)),
                    _mm256_loadu_ps(pb.add(o + 8 * j)),
                )
            };
            *r = _mm256_add_ps(*r, _mm256_mul_ps(x, y));
        }
    }
    let h16 = [_mm256_add_ps(acc[0], acc[2]), _mm256_add_ps(acc[1], acc[3])];
    let h8 = _mm256_add_ps(h16[0], h16[1]);
    let q = _mm_add_ps(_mm256_castps256_ps128(h8), _mm256_extractf128_ps(h8, 1));
    let r = _mm_add_ps(q, _mm_movehl_ps(q, q)); // [q0 + q2, q1 + q3, ..]
    let mut s = _mm_cvtss_f32(_mm_add_ss(r, _mm_shuffle_ps(r, r, 1)));
    for i in chunks * DOT_LANES..n {
        s += a[i] * b[i];
    }
    s
}

/// The AVX2 reduction of [`dot_avx2`] and its widening variants: lanes 0–31 in four registers →
/// the fixed tree of [`dot_portable`].
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
fn reduce_lanes(acc: [std::arch::x86_64::__m256; 4]) -> f32 {
    use std::arch::x86_64::*;
    let h16 = [_mm256_add_ps(acc[0], acc[2]), _mm256_add_ps(acc[1], acc[3])];
    let h8 = _mm256_add_ps(h16[0], h16[1]);
    let q = _mm_add_ps(_mm256_castps256_ps128(h8), _mm256_extractf128_ps(h8, 1));
    let r = _mm_add_ps(q, _mm_movehl_ps(q, q)); // [q0 + q2, q1 + q3, ..]
    _mm_cvtss_f32(_mm_add_ss(r, _mm_shuffle_ps(r, r, 1)))
}

/// [`dot_bf16`] with AVX2 (bf16 → f32 is a 16-bit shift).
///
/// # Safety
/// The CPU must support AVX2 and `a.len() == b.len()`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn dot_bf16_avx2(a: &[bf16], b: &[f32]) -> f32 {
    use std::arch::x86_64::*;
    let n = a.len();
    let chunks = n / DOT_LANES;
    let (pa, pb) = (a.as_ptr().cast::<u16>(), b.as_ptr());
    let mut acc = [_mm256_setzero_ps(); 4];
    for c in 0..chunks {
        let o = c * DOT_LANES;
        for (j, r) in acc.iter_mut().enumerate() {
            // SAFETY: o + 8j + 8 ≤ chunks · 32 ≤ n for both slices.
            let (x, y) = unsafe {
                let h = _mm_loadu_si128(pa.add(o + 8 * j).cast::<__m128i>());
                (
                    _mm256_castsi256_ps(_mm256_slli_epi32::<16>(_mm256_cvtepu16_epi32(h))),
                    _mm256_loadu_ps(pb.add(o + 8 * j)),
                )
            };
            *r = _mm256_add_ps(*r, _mm256_mul_ps(x, y));
        }
    }
    let mut s = reduce_lanes(acc);
    for i in chunks * DOT_LANES..n {
        s += a[i].to_f32() * b[i];
    }
    s
}

/// [`dot_f16`] with AVX2 and F16C.
///
/// # Safety
/// The CPU must support AVX2 and F16C, and `a.len() == b.len()`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,f16c")]
unsafe fn dot_f16_avx2(a: &[f16], b: &[f32]) -> f32 {
    use std::arch::x86_64::*;
    let n = a.len();
    let chunks = n / DOT_LANES;
    let (pa, pb) = (a.as_ptr().cast::<u16>(), b.as_ptr());
    let mut acc = [_mm256_setzero_ps(); 4];
    for c in 0..chunks {
        let o = c * DOT_LANES;
        for (j, r) in acc.iter_mut().enumerate() {
            // SAFETY: o + 8j + 8 ≤ chunks · 32 ≤ n for both slices.
            let (x, y) = unsafe {
                let h = _mm_loadu_si128(pa.add(o + 8 * j).cast::<__m128i>());
                (_mm256_cvtph_ps(h), _mm256_loadu_ps(pb.add(o + 8 * j)))
            };
            *r = _mm256_add_ps(*r, _mm256_mul_ps(x, y));
        }
    }
    let mut s = reduce_lanes(acc);
    for i in chunks * DOT_LANES..n {
        s += a[i].to_f32() * b[i];
    }
    s
}

/// `y += a · x`.
#[inline]
pub fn axpy(y: &mut [f32], a: f32, x: &[f32]) {
    debug_assert_eq!(y.len(), x.len());
    for (o, &v) in y.iter_mut().zip(x) {
        *o += a * v;
    }
}

/// `y += x` elementwise.
#[inline]
pub fn add_assign(y: &mut [f32], x: &[f32]) {
    debug_assert_eq!(y.len(), x.len());
    for (o, &v) in y.iter_mut().zip(x) {
        *o += v;
    }
}

/// Rows per rayon task: about 64 KiB of weights per task, at least 4 tasks per thread.
fn rows_per_task(rows: usize, cols: usize, elem_bytes: usize) -> usize {
    let threads = rayon::current_num_threads().max(1);
    let by_bytes = ((64 << 10) / (elem_bytes * cols.max(1))).max(1);
    let by_threads = rows.div_ceil(4 * threads).max(1);
    by_bytes.min(by_threads)
}

/// `y = W · x` for one activation vector (`W` is `[out, in]`, `x` has `in` values, `y` has
/// `out`), by the dtype's [`kernels::rows_dot`] kernel. Rows are split over rayon tasks when the
/// matrix has at least [`PAR_MIN_WORK`] entries.
///
/// Panics if the lengths disagree with the matrix (shapes are validated once when the model is
/// built, so a mismatch here is a bug).
pub fn matvec(w: &Mat, x: &[f32], y: &mut [f32]) {
    assert_eq!(
        x.len(),
        w.cols,
        "matvec: x has {} values, W is {}x{}",
        x.len(),
        w.rows,
        w.cols
    );
    assert_eq!(
        y.len(),
        w.rows,
        "matvec: y has {} values, W is {}x{}",
        y.len(),
        w.rows,
        w.cols
    );
    rows_par(w, x, 1, y);
}

/// `out` (`[rows, t]`) = every row of `w` dotted with every row of `x` (`[t, cols]`), split over
/// rayon tasks by rows when the product has at least [`PAR_MIN_WORK`] multiply-adds.
/// A matrix in row segments ([`Mat::segments`]) runs segment by segment into its rows of `out`
/// (a row's result depends on its own weights only: the bits of the contiguous matrix).
fn rows_par(w: &Mat, x: &[f32], t: usize, out: &mut [f32]) {
    for (r0, n, d) in w.segments() {
        rows_par_data(
            d,
            n,
            w.cols,
            w.dtype().size(),
            x,
            t,
            &mut out[r0 * t..(r0 + n) * t],
        );
    }
}

/// [`rows_par`] over the `rows` rows of one segment's values `d` (`size` bytes an element).
fn rows_par_data(
    d: MatData<'_>,
    rows: usize,
    k: usize,
    size: usize,
    x: &[f32],
    t: usize,
    out: &mut [f32],
) {
    if rows * k * t < PAR_MIN_WORK || rayon::current_num_threads() == 1 {
        kernels::rows_dot(d, k, 0..rows, x, t, out, &mut Vec::new());
    } else {
        // Whole 2-row groups per task (the GEMM kernel's blocking).
        let rpt = rows_per_task(rows, k, size).next_multiple_of(2);
        out.par_chunks_mut(rpt * t)
            .enumerate()
            .for_each_init(Vec::new, |scratch, (ci, chunk)| {
                let r0 = ci * rpt;
                kernels::rows_dot(d, k, r0..r0 + chunk.len() / t, x, t, chunk, scratch)
            });
    }
}

/// `Y = X · Wᵀ` for `t` activation rows: `x` is `[t, in]`, `y` is `[t, out]`, both row-major.
/// Row `j` of `y` is bit-identical to [`matvec`] of row `j` of `x` (the kernels' arithmetic does
/// not depend on the number of rows). Each weight chunk is loaded once per register tile of
/// activation rows, within tiles of 32 tokens that stay in cache; rows are split over rayon
/// tasks for large products.
pub fn matmul(w: &Mat, x: &[f32], t: usize, y: &mut [f32]) {
    let (n, k) = (w.rows, w.cols);
    assert_eq!(
        x.len(),
        t * k,
        "matmul: x has {} values, want {t}x{k}",
        x.len()
    );
    assert_eq!(
        y.len(),
        t * n,
        "matmul: y has {} values, want {t}x{n}",
        y.len()
    );
    if t == 1 {
        return matvec(w, x, y);
    }
    if t == 0 || n == 0 {
        return;
    }
    let mut tmp = vec![0f32; n * MATMUL_TOKEN_TILE.min(t)];
    for t0 in (0..t).step_by(MATMUL_TOKEN_TILE) {
        let tt = MATMUL_TOKEN_TILE.min(t - t0);
        let xs = &x[t0 * k..(t0 + tt) * k];
        // tmp is [n, tt].
        let tmp = &mut tmp[..n * tt];
        rows_par(w, xs, tt, tmp);
        for (r, vals) in tmp.chunks_exact(tt).enumerate() {
            for (j, &v) in vals.iter().enumerate() {
                y[(t0 + j) * n + r] = v;
            }
        }
    }
}

/// Adds `bias` (length `out`) to each of the rows of `y` (`[t, out]`).
pub fn add_bias(y: &mut [f32], bias: &[f32]) {
    for row in y.chunks_exact_mut(bias.len()) {
        add_assign(row, bias);
    }
}

/// `nn.Linear` over `t` rows: `y = x · Wᵀ (+ b)`, `x` `[t, in]`, `y` `[t, out]`.
pub fn linear(l: &Linear, x: &[f32], t: usize, y: &mut [f32]) {
    matmul(&l.w, x, t, y);
    if let Some(b) = &l.bias {
        add_bias(y, b);
    }
}

// ---------------------------------------------------------------------------------------------
// Normalization
// ---------------------------------------------------------------------------------------------

/// RMSNorm in place: `x ← w ⊙ (x · 1/sqrt(mean(x²) + eps))` (transformers' order: normalize,
/// then multiply by the weight; in f32 the gpt-oss vs Qwen3/MiMo cast order makes no difference).
pub fn rms_norm_in_place(x: &mut [f32], w: &[f32], eps: f32) {
    debug_assert_eq!(x.len(), w.len());
    let mean = dot(x, x) / x.len() as f32;
    let r = 1.0 / (mean + eps).sqrt();
    for (v, &g) in x.iter_mut().zip(w) {
        *v = g * (*v * r);
    }
}

/// RMSNorm of `x` into `out` (same math as [`rms_norm_in_place`]).
pub fn rms_norm(x: &[f32], w: &[f32], eps: f32, out: &mut [f32]) {
    out.copy_from_slice(x);
    rms_norm_in_place(out, w, eps);
}

/// RMSNorm of each `w.len()`-wide row of `x` in place (one token's heads for q/k norm, or
/// several tokens' hidden states).
pub fn rms_norm_rows(x: &mut [f32], w: &[f32], eps: f32) {
    for row in x.chunks_exact_mut(w.len()) {
        rms_norm_in_place(row, w, eps);
    }
}

// ---------------------------------------------------------------------------------------------
// RoPE application (the tables live in `rope`)
// ---------------------------------------------------------------------------------------------

/// NeoX "half split" rotation of the first `2·cos.len()` dims of one head, in place:
/// with `h = cos.len()`, `x1 = x[i]`, `x2 = x[i + h]` (`i < h`):
/// `x[i] = x1·cos_i − x2·sin_i`, `x[i + h] = x2·cos_i + x1·sin_i`. Dims from `2h` on (partial
/// RoPE) are left alone. `cos`/`sin` already include the attention factor.
pub fn apply_rope(x: &mut [f32], cos: &[f32], sin: &[f32]) {
    let h = cos.len();
    debug_assert_eq!(sin.len(), h);
    debug_assert!(2 * h <= x.len());
    let (a, b) = x[..2 * h].split_at_mut(h);
    for i in 0..h {
        let (x1, x2) = (a[i], b[i]);
        a[i] = x1 * cos[i] - x2 * sin[i];
        b[i] = x2 * cos[i] + x1 * sin[i];
    }
}

/// [`apply_rope`] on each `head_dim`-wide head of `x` (one token's q or k).
pub fn apply_rope_heads(x: &mut [f32], head_dim: usize, cos: &[f32], sin: &[f32]) {
    for head in x.chunks_exact_mut(head_dim) {
        apply_rope(head, cos, sin);
    }
}

// ---------------------------------------------------------------------------------------------
// Attention
// ---------------------------------------------------------------------------------------------

/// Rows of keys or values by absolute position: a contiguous buffer ([`ContiguousRows`]) or
/// the blocks of a paged cache (`kv::PagedRows`). Attention reads every key and value through
/// this, so the arithmetic (and its order) does not depend on where the rows live.
pub trait KvRows: Sync {
    /// Values per row (the distance between consecutive rows of a run).
    fn width(&self) -> usize;
    /// The rows stored back to back from absolute position `pos` on (within
    /// [`KvRows::span`]): their values, starting with row `pos` (the last row may end after
    /// the columns callers read), and how many rows (at least 1) they hold.
    fn run(&self, pos: usize) -> (&[f32], usize);
    /// The positions held (`first .. end`).
    fn span(&self) -> std::ops::Range<usize>;
}

/// Rows of `width` values stored back to back from absolute position `first_pos` on.
#[derive(Debug, Clone, Copy)]
pub struct ContiguousRows<'a> {
    pub rows: &'a [f32],
    pub width: usize,
    pub first_pos: usize,
}

impl KvRows for ContiguousRows<'_> {
    fn width(&self) -> usize {
        self.width
    }

    #[inline]
    fn run(&self, pos: usize) -> (&[f32], usize) {
        let r = pos - self.first_pos;
        (&self.rows[r * self.width..], self.span().end - pos)
    }

    /// A last row cut short after the columns a caller reads counts (strided heads).
    fn span(&self) -> std::ops::Range<usize> {
        self.first_pos..self.first_pos + self.rows.len().div_ceil(self.width.max(1))
    }
}

/// Attention of one query head over `n` consecutive keys/values.
///
/// Key `j` is `k[j·k_stride ..][..q.len()]`, value `j` is `v[j·v_stride ..][..out.len()]`.
/// `s_j = (q·k_j) · scale`; with `m = max(max_j s_j, sink)`,
/// `p_j = exp(s_j − m) / (Σ_i exp(s_i − m) + exp(sink − m))` — the sink logit (unscaled) joins
/// the denominator only (gpt-oss / MiMo attention sinks; no term without a sink) — and
/// `out = Σ_j p_j · v_j` (accumulated in ascending j). `scores` is scratch (resized to `n`).
#[allow(clippy::too_many_arguments)]
pub fn attention_head(
    q: &[f32],
    k: &[f32],
    k_stride: usize,
    v: &[f32],
    v_stride: usize,
    n: usize,
    scale: f32,
    sink: Option<f32>,
    scores: &mut Vec<f32>,
    out: &mut [f32],
) {
    let rows = |rows, width| ContiguousRows {
        rows,
        width,
        first_pos: 0,
    };
    attention_head_rows(
        q,
        (&rows(k, k_stride), 0),
        (&rows(v, v_stride), 0),
        0..n,
        scale,
        sink,
        scores,
        out,
    );
}

/// [`attention_head`] over the keys `keys` of `k` and their values in `v`, each read from
/// column `.1` of its rows on: the one definition of the per-head softmax attention (contiguous
/// and paged caches alike; rows are visited run by run, in ascending position).
#[allow(clippy::too_many_arguments)]
#[inline]
fn attention_head_rows(
    q: &[f32],
    k: (&impl KvRows, usize),
    v: (&impl KvRows, usize),
    keys: std::ops::Range<usize>,
    scale: f32,
    sink: Option<f32>,
    scores: &mut Vec<f32>,
    out: &mut [f32],
) {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx512f") {
        // SAFETY: AVX-512F is available.
        return unsafe { attn_avx512::head_rows(q, k, v, keys, scale, sink, scores, out) };
    }
    attention_head_rows_with(q, k, v, keys, scale, sink, scores, out, dot, axpy)
}

/// The body of [`attention_head_rows`] over a `dot` and an `axpy` (the portable / AVX2 ones, or
/// [`attn_avx512`]'s, which compute the same bits).
#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn attention_head_rows_with(
    q: &[f32],
    k: (&impl KvRows, usize),
    v: (&impl KvRows, usize),
    keys: std::ops::Range<usize>,
    scale: f32,
    sink: Option<f32>,
    scores: &mut Vec<f32>,
    out: &mut [f32],
    dot: impl Fn(&[f32], &[f32]) -> f32,
    axpy: impl Fn(&mut [f32], f32, &[f32]),
) {
    let (d, dv) = (q.len(), out.len());
    let ((k, koff), (v, voff)) = (k, v);
    scores.clear();
    let mut m = sink.unwrap_or(f32::NEG_INFINITY);
    let (kw, vw) = (k.width(), v.width());
    let mut p = keys.start;
    while p < keys.end {
        let (slab, avail) = k.run(p);
        let n = avail.min(keys.end - p).max(1);
        for j in 0..n {
            let s = dot(q, &slab[j * kw + koff..j * kw + koff + d]) * scale;
            m = m.max(s);
            scores.push(s);
        }
        p += n;
    }
    let mut denom = 0f32;
    for s in scores.iter_mut() {
        *s = (*s - m).exp();
        denom += *s;
    }
    if let Some(sk) = sink {
        denom += (sk - m).exp();
    }
    out.fill(0.0);
    let (mut p, mut i) = (keys.start, 0);
    while p < keys.end {
        let (slab, avail) = v.run(p);
        let n = avail.min(keys.end - p).max(1);
        for j in 0..n {
            axpy(
                out,
                scores[i + j] / denom,
                &slab[j * vw + voff..j * vw + voff + dv],
            );
        }
        p += n;
        i += n;
    }
}

/// The attention geometry of one layer.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AttnShape {
    pub n_heads: usize,
    pub n_kv_heads: usize,
    pub head_dim: usize,
    pub v_head_dim: usize,
    /// Keys visible from the query at position p: `(p − window, p]`; `None` = all of `[0, p]`.
    pub window: Option<usize>,
    /// `1/sqrt(head_dim)`.
    pub scale: f32,
}

impl AttnShape {
    pub fn from_spec(s: &LayerSpec) -> Self {
        AttnShape {
            n_heads: s.n_heads,
            n_kv_heads: s.n_kv_heads,
            head_dim: s.head_dim,
            v_head_dim: s.v_head_dim,
            window: match s.attn {
                AttnKind::Full => None,
                AttnKind::Sliding { window } => Some(window),
            },
            scale: (1.0 / (s.head_dim as f64).sqrt()) as f32,
        }
    }

    /// First visible key position for the query at `pos` (the last one is `pos` itself).
    #[inline]
    pub fn first_visible(&self, pos: usize) -> usize {
        match self.window {
            None => 0,
            Some(w) => (pos + 1).saturating_sub(w),
        }
    }

    /// The KV head serving query head `h` (transformers' `repeat_kv`: kv head g serves query
    /// heads `g·G .. (g+1)·G`, `G = n_heads / n_kv_heads`).
    #[inline]
    pub fn kv_head(&self, h: usize) -> usize {
        h / (self.n_heads / self.n_kv_heads)
    }
}

/// Attention of query head `head` at absolute position `pos` (causal, windowed, GQA).
///
/// `q` is the query's `[n_heads · head_dim]`; `k_rows` / `v_rows` hold consecutive positions
/// starting at absolute position `first_pos`, one row of `[n_kv_heads · head_dim]` (resp.
/// `v_head_dim`) per position, and must cover `first_visible(pos) ..= pos` (rows after `pos` are
/// ignored). `sinks` has one logit per query head. Writes `v_head_dim` values to `out`.
#[allow(clippy::too_many_arguments)]
pub fn attention_query_head(
    shape: &AttnShape,
    q: &[f32],
    k_rows: &[f32],
    v_rows: &[f32],
    first_pos: usize,
    pos: usize,
    head: usize,
    sinks: Option<&[f32]>,
    scores: &mut Vec<f32>,
    out: &mut [f32],
) {
    let keys = shape.first_visible(pos)..pos + 1;
    attention_span(
        shape, q, k_rows, v_rows, first_pos, keys, head, sinks, scores, out,
    );
}

/// [`attention_query_head`] over keys and values read through [`KvRows`].
#[allow(clippy::too_many_arguments)]
pub fn attention_query_head_in(
    shape: &AttnShape,
    q: &[f32],
    k: &impl KvRows,
    v: &impl KvRows,
    pos: usize,
    head: usize,
    sinks: Option<&[f32]>,
    scores: &mut Vec<f32>,
    out: &mut [f32],
) {
    let keys = shape.first_visible(pos)..pos + 1;
    attention_span_in(shape, q, k, v, keys, head, sinks, scores, out);
}

/// Attention of query head `head` over the keys at the absolute positions `keys` (an explicit
/// range: `shape.window` is not consulted). This is the one definition behind
/// [`attention_query_head`] (causal: `first_visible(pos) ..= pos`) and the non-causal block
/// attention of speculative drafters (keys after the query).
///
/// `q` is the query's `[n_heads · head_dim]`; `k_rows` / `v_rows` hold consecutive positions
/// starting at absolute position `first_pos` and must cover `keys`. `sinks` has one logit per
/// query head. Writes `v_head_dim` values to `out`.
#[allow(clippy::too_many_arguments)]
pub fn attention_span(
    shape: &AttnShape,
    q: &[f32],
    k_rows: &[f32],
    v_rows: &[f32],
    first_pos: usize,
    keys: std::ops::Range<usize>,
    head: usize,
    sinks: Option<&[f32]>,
    scores: &mut Vec<f32>,
    out: &mut [f32],
) {
    let (kr, vr) = (
        shape.n_kv_heads * shape.head_dim,
        shape.n_kv_heads * shape.v_head_dim,
    );
    let (k, v) = contiguous(k_rows, v_rows, kr, vr, first_pos);
    attention_span_in(shape, q, &k, &v, keys, head, sinks, scores, out);
}

/// The [`ContiguousRows`] of one layer's `k_rows` / `v_rows` from `first_pos` on.
fn contiguous<'a>(
    k_rows: &'a [f32],
    v_rows: &'a [f32],
    kr: usize,
    vr: usize,
    first_pos: usize,
) -> (ContiguousRows<'a>, ContiguousRows<'a>) {
    (
        ContiguousRows {
            rows: k_rows,
            width: kr,
            first_pos,
        },
        ContiguousRows {
            rows: v_rows,
            width: vr,
            first_pos,
        },
    )
}

/// [`attention_span`] over keys and values read through [`KvRows`] (a contiguous or paged
/// cache): the one definition both use.
#[allow(clippy::too_many_arguments)]
pub fn attention_span_in(
    shape: &AttnShape,
    q: &[f32],
    k: &impl KvRows,
    v: &impl KvRows,
    keys: std::ops::Range<usize>,
    head: usize,
    sinks: Option<&[f32]>,
    scores: &mut Vec<f32>,
    out: &mut [f32],
) {
    let (d, dv) = (shape.head_dim, shape.v_head_dim);
    let (lo, hi) = (keys.start, keys.end.max(keys.start));
    let (ks, vs) = (k.span(), v.span());
    assert!(
        lo >= ks.start && lo >= vs.start,
        "attention: position {lo} is no longer cached (first {})",
        ks.start.max(vs.start)
    );
    assert!(
        hi <= ks.end && hi <= vs.end,
        "attention: position {} not cached",
        hi.saturating_sub(1)
    );
    let g = shape.kv_head(head);
    attention_head_rows(
        &q[head * d..(head + 1) * d],
        (k, g * d),
        (v, g * dv),
        lo..hi,
        shape.scale,
        sinks.map(|s| s[head]),
        scores,
        out,
    );
}

/// [`attention_query_head`] for every head of one query: `out` is `[n_heads · v_head_dim]`.
#[allow(clippy::too_many_arguments)]
pub fn attention_query(
    shape: &AttnShape,
    q: &[f32],
    k_rows: &[f32],
    v_rows: &[f32],
    first_pos: usize,
    pos: usize,
    sinks: Option<&[f32]>,
    scores: &mut Vec<f32>,
    out: &mut [f32],
) {
    for (h, o) in out.chunks_exact_mut(shape.v_head_dim).enumerate() {
        attention_query_head(
            shape, q, k_rows, v_rows, first_pos, pos, h, sinks, scores, o,
        );
    }
}

// ---------------------------------------------------------------------------------------------
// Activations
// ---------------------------------------------------------------------------------------------

/// `1 / (1 + e^(−x))`.
#[inline]
pub fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + (-x).exp())
}

/// `x · sigmoid(x)`.
#[inline]
pub fn silu(x: f32) -> f32 {
    x * sigmoid(x)
}

/// SwiGLU: `silu(gate) · up`.
#[inline]
pub fn swiglu(gate: f32, up: f32) -> f32 {
    silu(gate) * up
}

/// gpt-oss clamped SwiGLU: `g = min(gate, limit)`, `u = clamp(up, −limit, limit)`,
/// `(u + 1) · g · sigmoid(alpha · g)`.
#[inline]
pub fn clamped_swiglu(gate: f32, up: f32, alpha: f32, limit: f32) -> f32 {
    let g = gate.min(limit);
    let u = up.clamp(-limit, limit);
    let glu = g * sigmoid(g * alpha);
    (u + 1.0) * glu
}

/// The gated activation of one token: `gate_up` has `2I` values in `layout` order, `out` gets
/// `I` values.
pub fn glu(act: Activation, layout: GateUpLayout, gate_up: &[f32], out: &mut [f32]) {
    let i_size = out.len();
    debug_assert_eq!(gate_up.len(), 2 * i_size);
    let f = |g: f32, u: f32| match act {
        Activation::ClampedSwiglu { alpha, limit } => clamped_swiglu(g, u, alpha, limit),
        Activation::Swiglu => swiglu(g, u),
    };
    match layout {
        GateUpLayout::Interleaved => {
            for (o, gu) in out.iter_mut().zip(gate_up.chunks_exact(2)) {
                *o = f(gu[0], gu[1]);
            }
        }
        GateUpLayout::Halves => {
            let (g, u) = gate_up.split_at(i_size);
            for ((o, &g), &u) in out.iter_mut().zip(g).zip(u) {
                *o = f(g, u);
            }
        }
    }
}

/// [`glu`] over `t` rows: `gate_up` `[t, 2I]` → `out` `[t, I]`.
pub fn glu_rows(
    act: Activation,
    layout: GateUpLayout,
    gate_up: &[f32],
    out: &mut [f32],
    i_size: usize,
) {
    for (gu, o) in gate_up
        .chunks_exact(2 * i_size)
        .zip(out.chunks_exact_mut(i_size))
    {
        glu(act, layout, gu, o);
    }
}

/// Attention of `t` consecutive queries (absolute positions `start .. start + t`) over one
/// layer's cached rows: `q` is `[t, n_heads · head_dim]`, `out` `[t, n_heads · v_head_dim]`,
/// `k_rows`/`v_rows` start at absolute position `first_pos` and already include the `t` new
/// rows. Runs [`attention_query_head`] for every (query, head), in parallel over them when the
/// work is large; each output is computed the same way either way.
#[allow(clippy::too_many_arguments)]
pub fn attention_rows(
    shape: &AttnShape,
    q: &[f32],
    k_rows: &[f32],
    v_rows: &[f32],
    first_pos: usize,
    start: usize,
    t: usize,
    sinks: Option<&[f32]>,
    scores: &mut Vec<f32>,
    out: &mut [f32],
) {
    let (kr, vr) = (
        shape.n_kv_heads * shape.head_dim,
        shape.n_kv_heads * shape.v_head_dim,
    );
    let (k, v) = contiguous(k_rows, v_rows, kr, vr, first_pos);
    attention_rows_in(shape, q, &k, &v, start, t, sinks, scores, out);
}

/// [`attention_rows`] over keys and values read through [`KvRows`] (a contiguous or paged
/// cache): the one definition both use.
#[allow(clippy::too_many_arguments)]
pub fn attention_rows_in(
    shape: &AttnShape,
    q: &[f32],
    k: &impl KvRows,
    v: &impl KvRows,
    start: usize,
    t: usize,
    sinks: Option<&[f32]>,
    scores: &mut Vec<f32>,
    out: &mut [f32],
) {
    let (nh, d, dv) = (shape.n_heads, shape.head_dim, shape.v_head_dim);
    let (qr, or) = (nh * d, nh * dv);
    assert_eq!(
        q.len(),
        t * qr,
        "attention: q has {} values, want {t}x{qr}",
        q.len()
    );
    assert_eq!(
        out.len(),
        t * or,
        "attention: out has {} values, want {t}x{or}",
        out.len()
    );
    let visible = shape.window.map_or(start + t, |w| w.min(start + t));
    if t * nh * visible * (d + dv) < PAR_MIN_WORK || rayon::current_num_threads() == 1 {
        for ti in 0..t {
            let qi = &q[ti * qr..(ti + 1) * qr];
            for (h, o) in out[ti * or..(ti + 1) * or].chunks_exact_mut(dv).enumerate() {
                attention_query_head_in(shape, qi, k, v, start + ti, h, sinks, scores, o);
            }
        }
    } else {
        out.par_chunks_mut(dv)
            .enumerate()
            .for_each_init(Vec::new, |sc, (idx, o)| {
                let (ti, h) = (idx / nh, idx % nh);
                attention_query_head_in(
                    shape,
                    &q[ti * qr..(ti + 1) * qr],
                    k,
                    v,
                    start + ti,
                    h,
                    sinks,
                    sc,
                    o,
                );
            });
    }
}

/// Block attention of one drafter layer (the CPU body of `draft_attention`): `b` queries at
/// positions `start ..` over the keys and values of `k` / `v` (context then block, read through
/// [`KvRows`]: the drafter's paged context cache).
/// Query `i` (position `p`) sees the keys `lo .. hi` with `lo = p + 1 − W` (0 without a window)
/// and `hi = p + 1` when `causal`, else `min(start + b, p + W)` (all block keys without a
/// window). Parallel over (query, head) when the work is large; each output is computed the same
/// way either way.
#[allow(clippy::too_many_arguments)]
pub fn block_attention(
    shape: &AttnShape,
    window: Option<usize>,
    causal: bool,
    q: &[f32],
    k: &impl KvRows,
    v: &impl KvRows,
    start: usize,
    b: usize,
    sinks: Option<&[f32]>,
    scores: &mut Vec<f32>,
    out: &mut [f32],
) {
    let (nh, d, dv) = (shape.n_heads, shape.head_dim, shape.v_head_dim);
    let end = start + b;
    let range = |i: usize| {
        let p = start + i;
        let lo = window.map_or(0, |w| (p + 1).saturating_sub(w));
        let hi = match (causal, window) {
            (true, _) => p + 1,
            (false, None) => end,
            (false, Some(w)) => (p + w).min(end),
        };
        lo..hi
    };
    let one = |idx: usize, sc: &mut Vec<f32>, o: &mut [f32]| {
        let (i, head) = (idx / nh, idx % nh);
        attention_span_in(
            shape,
            &q[i * nh * d..(i + 1) * nh * d],
            k,
            v,
            range(i),
            head,
            sinks,
            sc,
            o,
        );
    };
    let visible = end - k.span().start.min(end);
    if b * nh * visible * 2 * d < PAR_MIN_WORK || rayon::current_num_threads() == 1 {
        for (idx, o) in out.chunks_exact_mut(dv).enumerate() {
            one(idx, scores, o);
        }
    } else {
        out.par_chunks_mut(dv)
            .enumerate()
            .for_each_init(Vec::new, |sc, (idx, o)| one(idx, sc, o));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The AVX-512 attention kernels give the bits of the portable `dot` / `axpy` order, for
    /// head sizes with and without a tail, with and without a sink.
    #[test]
    fn avx512_attention_is_bit_identical_to_the_portable_order() {
        #[cfg(target_arch = "x86_64")]
        {
            if !std::arch::is_x86_feature_detected!("avx512f") {
                eprintln!("SKIPPED avx512_attention_is_bit_identical_to_the_portable_order");
                return;
            }
            let mut seed = 12345u64;
            let mut rnd = move || {
                seed = seed
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((seed >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
            };
            for (d, n_keys, sink) in [
                (64, 1, None),
                (64, 300, Some(0.3)),
                (45, 17, None),
                (128, 129, Some(-1.0)),
            ] {
                let width = 2 * d;
                let kr: Vec<f32> = (0..n_keys * width).map(|_| rnd()).collect();
                let vr: Vec<f32> = (0..n_keys * width).map(|_| rnd()).collect();
                let q: Vec<f32> = (0..d).map(|_| rnd()).collect();
                let k = ContiguousRows {
                    rows: &kr,
                    width,
                    first_pos: 3,
                };
                let v = ContiguousRows {
                    rows: &vr,
                    width,
                    first_pos: 3,
                };
                let (mut s1, mut s2) = (Vec::new(), Vec::new());
                let (mut o1, mut o2) = (vec![0f32; d], vec![0f32; d]);
                let keys = 3..3 + n_keys;
                attention_head_rows_with(
                    &q,
                    (&k, d),
                    (&v, d),
                    keys.clone(),
                    0.125,
                    sink,
                    &mut s1,
                    &mut o1,
                    dot_portable,
                    |y, a, x| {
                        for (o, &v) in y.iter_mut().zip(x) {
                            *o += a * v;
                        }
                    },
                );
                // SAFETY: AVX-512F checked above.
                unsafe {
                    attn_avx512::head_rows(
                        &q,
                        (&k, d),
                        (&v, d),
                        keys,
                        0.125,
                        sink,
                        &mut s2,
                        &mut o2,
                    )
                };
                let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
                assert_eq!(bits(&s1), bits(&s2), "scores, d {d}");
                assert_eq!(bits(&o1), bits(&o2), "output, d {d}");
            }
        }
    }
}
