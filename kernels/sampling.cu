// Token selection: argmax_rows (greedy decoding), sample (one row: model::sampling's
// temperature, top-k, top-p, min-p, inverse CDF) and sample_rows (every row of a batched pass,
// each with its own parameters, penalties over its history and seeded uniform stream; the same
// row body).
//
// and accept_rows (dflash's exact rejection sampling of every verify block of a batched pass,
// returning only the accepted count and the bonus token).
//
// Launched by crates/tilert/src/ops.rs (`Ops::argmax`, `Ops::sample`, `Ops::sample_rows`,
// `Ops::accept_rows`).
//
// Everything is f32 except dense weights (bf16 or f32). No fast math: the kernels use IEEE
// division / sqrt and expf; where the CPU definition is a short chain of roundings the kernels use
// explicit _rn intrinsics so that the compiler cannot fuse multiply-adds and the results are
// bit-identical to the CPU.
#include <cuda_bf16.h>
#include <stdint.h>
#include <float.h>

#include "common/abi.cuh"
#include "common/chacha.cuh"
#include "common/pdl.cuh"
#include "common/reduce.cuh"
#include "common/argmax.cuh"

__device__ __forceinline__ void argmax_rows_body(const float* logits, uint32_t v, uint32_t* out,
                                                 uint32_t* scratch) {
    pdl_begin();
    argmax_rows_block(blockIdx.x, blockIdx.y, gridDim.x, logits, v, out, scratch);
}

extern "C" __global__ void argmax_rows(const float* logits, uint32_t v, uint32_t* out,
                                       uint32_t* scratch) {
    argmax_rows_body(logits, v, out, scratch);
}

// ------------------------------------------------------------------------------------------
// Sampling (model::sampling): temperature, top-k (ties kept), top-p (smallest most-likely set
// reaching p, ties by lower id, 1e-6 relative tolerance), min-p, then inverse CDF in id order.
// One block of SAMPLE_THREADS.
// ------------------------------------------------------------------------------------------



// model::sampling's exp_f32 (Cephes expf), every rounding explicit so it is bit-identical.
__device__ __forceinline__ float exp_f32(float x) {
    const float LOG2E = 1.44269504088896341f;
    const float C1 = 0.693359375f;
    const float C2 = -2.12194440e-4f;
    const float xc = fminf(fmaxf(x, -87.3f), 88.3f);
    const float n = __fsub_rn(__fadd_rn(__fmul_rn(xc, LOG2E), 12582912.0f), 12582912.0f);
    const float r = __fsub_rn(__fsub_rn(xc, __fmul_rn(n, C1)), __fmul_rn(n, C2));
    const float z = __fmul_rn(r, r);
    float poly = __fadd_rn(__fmul_rn(1.9875691e-4f, r), 1.3981999e-3f);
    poly = __fadd_rn(__fmul_rn(poly, r), 8.333452e-3f);
    poly = __fadd_rn(__fmul_rn(poly, r), 4.1665796e-2f);
    poly = __fadd_rn(__fmul_rn(poly, r), 1.6666665e-1f);
    poly = __fadd_rn(__fmul_rn(poly, r), 0.5f);
    const float e = __fadd_rn(__fadd_rn(__fmul_rn(poly, z), r), 1.0f);
    const float pow2 =
        __uint_as_float(__float_as_uint(__fadd_rn(__fadd_rn(n, 127.0f), 8388608.0f)) << 23);
    const float v = __fmul_rn(e, pow2);
    return x < -87.3f ? 0.f : v;
}

__device__ __forceinline__ uint32_t order_key(float x) {
    const uint32_t b = __float_as_uint(x);
    return (b & 0x80000000u) ? ~b : (b | 0x80000000u);
}
__device__ __forceinline__ float key_value(uint32_t k) {
    return __uint_as_float((k & 0x80000000u) ? (k & 0x7fffffffu) : ~k);
}

struct SampleState {
    float mx, inv_t, thr, minp;
    uint32_t tau;       // top-p crossing key (0 = no top-p cut)
    uint32_t tie_keep;  // how many of the tau-valued tokens (lowest ids first) are kept
    uint32_t tie_all;   // 1 when every tau-valued token is kept
};

__device__ __forceinline__ float sample_weight(const SampleState& st, float x) {
    return exp_f32(__fmul_rn(__fsub_rn(x, st.mx), st.inv_t));
}

// In the top-k set with a positive weight (before top-p / min-p).
__device__ __forceinline__ bool in_topk(const SampleState& st, float x, float w) {
    return x >= st.thr && w > 0.f;
}

// exp_f32(y) > 0 exactly when y ≥ −87.3 (its cut-off; 2^-126 at the cut-off is normal), so
// the top-k test needs no exp.
__device__ __forceinline__ bool in_topk_y(const SampleState& st, float x) {
    return x >= st.thr && __fmul_rn(__fsub_rn(x, st.mx), st.inv_t) >= -87.3f;
}

// Exclusive block scan of doubles (SAMPLE_THREADS values), in place in `buf`.
__device__ double block_exclusive_scan(double v, double* buf) {
    const uint32_t tid = threadIdx.x;
    buf[tid] = v;
    __syncthreads();
    for (uint32_t off = 1; off < SAMPLE_THREADS; off <<= 1) {
        const double add = tid >= off ? buf[tid - off] : 0.0;
        __syncthreads();
        buf[tid] += add;
        __syncthreads();
    }
    const double incl = buf[tid];
    __syncthreads();
    return incl - v;
}

// Same for unsigned 64-bit integers (exact).
__device__ uint64_t block_exclusive_scan_u64(uint64_t v, uint64_t* buf) {
    const uint32_t tid = threadIdx.x;
    buf[tid] = v;
    __syncthreads();
    for (uint32_t off = 1; off < SAMPLE_THREADS; off <<= 1) {
        const uint64_t add = tid >= off ? buf[tid - off] : 0ull;
        __syncthreads();
        buf[tid] += add;
        __syncthreads();
    }
    const uint64_t incl = buf[tid];
    __syncthreads();
    return incl - v;
}

// Coarse bins of the scaled logit y = (x − max)/T ≤ 0 (as model::sampling's top-p histogram):
// round(−32·y), the last bin also taking everything below. Monotone: a lower bin holds only
// larger logits, so the coarse pass spreads the histogram atomics over many addresses and the
// exact radix select only runs over the few tokens of the crossing bin.
#define SAMPLE_BINS 1024
__device__ __forceinline__ uint32_t sample_bin(const SampleState& st, float x) {
    const float y = __fmul_rn(__fsub_rn(x, st.mx), st.inv_t);
    return (uint32_t)rintf(fminf(-y * 32.0f, (float)(SAMPLE_BINS - 1)));
}

struct Shared {
    uint64_t met[SAMPLE_BINS];   // per coarse bin: count (by count) or fixed-point mass (by mass)
    uint64_t scanbuf[SAMPLE_THREADS];
    uint32_t hist[256];
    uint64_t hmass[256];
    uint32_t bin, prefix, found;
    uint64_t before;
};

// Among the candidates (top-k set when `in_k`, else every token), in descending order, finds
// the crossing value: by count (`by_mass` false) the need-th largest logit x; by mass the first
// scaled logit y = (x − max)/T (top-p orders by y, then id, as model::sampling: two logits can
// round to one y) at which the fixed-point mass of everything larger plus its own reaches
// `target`. Leaves in sh: prefix = key of that value, before = count / mass strictly above it, and
// hist[prefix & 0xff] = how many tokens have that value. found = 0 when the whole mass is below
// target (rounding): then every candidate is kept.
__device__ void crossing_select(const float* logits, uint32_t v, const SampleState& st,
                                bool in_k, bool by_mass, double target, uint64_t need,
                                double fx_scale, Shared& sh) {
    const uint32_t tid = threadIdx.x;
    for (uint32_t i = tid; i < SAMPLE_BINS; i += SAMPLE_THREADS) sh.met[i] = 0;
    __syncthreads();
    for (uint32_t i = tid; i < v; i += SAMPLE_THREADS) {
        const float x = sane_logit(logits[i]);
        if (in_k && !in_topk_y(st, x)) continue;
        const uint64_t add =
            by_mass ? (uint64_t)((double)sample_weight(st, x) * fx_scale) : 1ull;
        if (add) atomicAdd((unsigned long long*)&sh.met[sample_bin(st, x)], (unsigned long long)add);
    }
    __syncthreads();
    // One bin per thread (SAMPLE_BINS == SAMPLE_THREADS).
    const uint64_t m = sh.met[tid];
    const uint64_t ex = block_exclusive_scan_u64(m, sh.scanbuf);
    if (tid == 0) sh.found = 0;
    __syncthreads();
    const bool cross = by_mass ? ((double)ex < target && (double)(ex + m) >= target)
                               : (ex < need && ex + m >= need);
    if (cross) {
        sh.bin = tid;
        sh.before = ex;
        sh.found = 1;
    }
    __syncthreads();
    if (!sh.found) return;
    const uint32_t bin = sh.bin;
    if (tid == 0) sh.prefix = 0;
    for (int shift = 24; shift >= 0; shift -= 8) {
        for (uint32_t i = tid; i < 256; i += SAMPLE_THREADS) {
            sh.hist[i] = 0;
            sh.hmass[i] = 0;
        }
        __syncthreads();
        const uint32_t hi_mask = shift == 24 ? 0u : (0xffffffffu << (shift + 8));
        const uint32_t prefix = sh.prefix;
        for (uint32_t i = tid; i < v; i += SAMPLE_THREADS) {
            const float x = sane_logit(logits[i]);
            if (sample_bin(st, x) != bin) continue;
            if (in_k && !in_topk_y(st, x)) continue;
            const uint32_t key = by_mass ? order_key(__fmul_rn(__fsub_rn(x, st.mx), st.inv_t))
                                         : order_key(x);
            if ((key & hi_mask) != prefix) continue;
            const uint32_t dg = (key >> shift) & 0xff;
            atomicAdd(&sh.hist[dg], 1u);
            if (by_mass) {
                const uint64_t add = (uint64_t)((double)sample_weight(st, x) * fx_scale);
                if (add) atomicAdd((unsigned long long*)&sh.hmass[dg], (unsigned long long)add);
            }
        }
        __syncthreads();
        if (tid == 0) {
            uint64_t before = sh.before;
            int d = 255, lowest = 0;
            for (; d >= 0; --d) {
                if (sh.hist[d] == 0) continue;
                lowest = d;
                const uint64_t mm = by_mass ? sh.hmass[d] : sh.hist[d];
                if (by_mass ? (double)(before + mm) >= target : before + mm >= need) break;
                before += mm;
            }
            if (d < 0) {  // rounding between the coarse and fine sums: the last non-empty digit
                d = lowest;
                before -= by_mass ? sh.hmass[d] : sh.hist[d];
            }
            sh.before = before;
            sh.prefix = prefix | ((uint32_t)d << shift);
        }
        __syncthreads();
    }
}

// The uniform and the parameters of one row's draw (after the penalties).
struct DrawArgs {
    float temperature, top_p, min_p;
    uint32_t top_k;
    double u;
};

// model::sampling's top-p bin of a candidate, which decides the walk order of the draw: the
// top-k list path (`top_p_filter`) truncates −32·y, the dense path (`top_p_dense`) rounds it
// (half to even, the 2^23 trick); both clamp to 1024. −y·32 is exact (a power of two).
__device__ __forceinline__ uint32_t cpu_bin(float y, bool list) {
    const float a = fminf(-y * 32.0f, 1024.0f);
    return list ? (uint32_t)a : (uint32_t)rintf(a);
}

// Ascending sort of keys[0..n) by one block (bitonic, in global memory; keys[n..pow2) padded).
// `keys` has room for the next power of two of n.
__device__ void block_sort_u64(uint64_t* keys, uint32_t n) {
    uint32_t m = 1;
    while (m < n) m <<= 1;
    for (uint32_t i = n + threadIdx.x; i < m; i += SAMPLE_THREADS) keys[i] = ~0ull;
    __syncthreads();
    for (uint32_t size = 2; size <= m; size <<= 1) {
        for (uint32_t stride = size >> 1; stride > 0; stride >>= 1) {
            for (uint32_t i = threadIdx.x; i < m / 2; i += SAMPLE_THREADS) {
                const uint32_t lo = 2 * stride * (i / stride) + (i % stride), hi = lo + stride;
                const bool asc = (lo & size) == 0;
                const uint64_t a = keys[lo], b = keys[hi];
                if ((a > b) == asc) {
                    keys[lo] = b;
                    keys[hi] = a;
                }
            }
            __syncthreads();
        }
    }
}

// Block-shared state of one row's kept set and draw (one allocation per kernel, whichever
// functions use it).
struct DrawShared {
    float redf[32];
    double scan[SAMPLE_THREADS];
    SampleState st;
    Shared sh;
    uint32_t found, ntail;
    double total_a, total;
    int last;
};
__device__ __forceinline__ DrawShared& draw_shared() {
    __shared__ DrawShared s;
    return s;
}

// Steps 1–3 of a row's SamplingDist (temperature > 0) into draw_shared().st: the max, the top-k
// threshold (every logit ≥ the k-th largest, ties kept) and top-p's crossing scaled logit tau
// (the key of y) with how many tau-valued tokens (lowest ids first) it keeps (by exact
// fixed-point mass, the 1e-6 relative tolerance). False when no logit is finite.
__device__ bool kept_setup(const float* logits, uint32_t v, const DrawArgs& a) {
    DrawShared& S = draw_shared();
    SampleState& st = S.st;
    Shared& sh = S.sh;
    const uint32_t tid = threadIdx.x;
    float mx = -INFINITY;
    for (uint32_t i = tid; i < v; i += SAMPLE_THREADS) mx = fmaxf(mx, sane_logit(logits[i]));
    mx = block_max(mx, S.redf);
    if (mx == -INFINITY) return false;
    if (tid == 0) {
        st.mx = mx;
        st.inv_t = 1.0f / a.temperature;
        st.thr = -INFINITY;
        st.minp = a.min_p > 0.f ? a.min_p : 0.f;
        st.tau = 0;
        st.tie_keep = 0;
        st.tie_all = 1;
    }
    __syncthreads();
    // Fixed-point scale of the masses: v terms of at most 1 stay below 2^62.
    const double fx_scale = ldexp(1.0, 62 - (32 - __clz(v)));
    if (a.top_k > 0 && a.top_k < v) {
        crossing_select(logits, v, st, false, false, 0.0, a.top_k, fx_scale, sh);
        if (tid == 0) st.thr = key_value(sh.prefix);
        __syncthreads();
    }
    if (a.top_p < 1.0f) {
        uint64_t tot = 0;  // (per thread, then reduced exactly through the scan)
        for (uint32_t i = tid; i < v; i += SAMPLE_THREADS) {
            const float x = sane_logit(logits[i]);
            const float w = sample_weight(st, x);
            if (in_topk(st, x, w)) tot += (uint64_t)((double)w * fx_scale);
        }
        const uint64_t ex = block_exclusive_scan_u64(tot, sh.scanbuf);
        if (tid == SAMPLE_THREADS - 1) sh.before = ex + tot;
        __syncthreads();
        const double target = (double)a.top_p * (double)sh.before * (1.0 - 1e-6);
        __syncthreads();
        crossing_select(logits, v, st, true, true, target, 0, fx_scale, sh);
        if (tid == 0 && sh.found) {
            // hist[d] tokens share the value tau and the weight w_tau; the first is kept, the
            // j-th (j ≥ 1) while before + j·w_tau < target.
            const uint32_t cnt = sh.hist[sh.prefix & 0xff];
            const double before = (double)sh.before;
            const double w = (double)(uint64_t)((double)exp_f32(key_value(sh.prefix)) * fx_scale);
            uint32_t keep = cnt;
            if (w > 0.0) {
                double j = ceil((target - before) / w);
                if (j < 1.0) j = 1.0;
                if (j > (double)cnt) j = (double)cnt;
                uint32_t jj = (uint32_t)j;
                while (jj > 1 && before + (double)(jj - 1) * w >= target) --jj;
                while (jj < cnt && before + (double)jj * w < target) ++jj;
                keep = jj;
            }
            st.tau = sh.prefix;
            st.tie_keep = keep;
            st.tie_all = keep >= cnt;
        }
        __syncthreads();
    }
    return true;
}

// This thread's contiguous chunk [i0, i1) of the vocabulary (the walk's unit) and the rank of
// its first tau-valued token among all of them (only needed when top-p cuts some of them).
struct Chunk {
    uint32_t i0, i1, tie_before;
};
__device__ Chunk walk_chunk(const float* logits, uint32_t v, bool topp) {
    DrawShared& S = draw_shared();
    const SampleState& st = S.st;
    const uint32_t chunk = (v + SAMPLE_THREADS - 1) / SAMPLE_THREADS;
    Chunk c;
    c.i0 = min(v, threadIdx.x * chunk);
    c.i1 = min(v, c.i0 + chunk);
    c.tie_before = 0;
    if (topp && !st.tie_all) {
        uint32_t n = 0;
        for (uint32_t i = c.i0; i < c.i1; ++i) {
            const float x = sane_logit(logits[i]);
            if (in_topk_y(st, x) &&
                order_key(__fmul_rn(__fsub_rn(x, st.mx), st.inv_t)) == st.tau)
                ++n;
        }
        c.tie_before = (uint32_t)block_exclusive_scan((double)n, S.scan);
    }
    return c;
}

// Token i in the walk (ids in increasing order within the chunk, `tie` counting the tau-valued
// tokens seen): its scaled logit y and weight w; 0 when cut, 1 when kept in id order, 2 when
// kept in top-p's crossing bin `cbin` (walked last, sorted).
__device__ __forceinline__ int kept_class(const float* logits, uint32_t i, bool topp, bool topp_on,
                                          bool list, uint32_t cbin, uint32_t& tie, float& w,
                                          float& y) {
    const SampleState& st = draw_shared().st;
    const float x = sane_logit(logits[i]);
    y = __fmul_rn(__fsub_rn(x, st.mx), st.inv_t);
    w = exp_f32(y);
    bool kept = in_topk(st, x, w) && w >= st.minp;
    if (kept && topp) {
        const uint32_t key = order_key(y);
        if (key < st.tau) kept = false;
        else if (key == st.tau && !st.tie_all) kept = tie++ < st.tie_keep;
    }
    if (!kept) return 0;
    return topp_on && cpu_bin(y, list) == cbin ? 2 : 1;
}

// One row's draw from logits [v] (read through sane_logit) under model::sampling's SamplingDist
// with temperature > 0 (greedy rows never get here): the kept set (kept_setup), walked in the
// CPU's order — kept tokens outside top-p's crossing bin in id order, then the crossing bin's
// kept tokens by descending y then id (`Kept::draw`) — to the first whose running f64 mass
// exceeds u · total. `keys` (next power of two of v u64) holds the crossing bin's tokens.
__device__ void sample_draw(const float* logits, uint32_t v, const DrawArgs& a, uint64_t* keys,
                            uint32_t* out) {
    DrawShared& S = draw_shared();
    const SampleState& st = S.st;
    const uint32_t tid = threadIdx.x;
    if (!kept_setup(logits, v, a)) {
        if (tid == 0) out[0] = 0;
        return;
    }
    const bool list = a.top_k > 0 && a.top_k < v;
    const bool topp_on = a.top_p < 1.0f;
    const bool topp = topp_on && st.tau != 0;
    // With top-p on, the kept tokens of the crossing bin (the bin of tau; the last bin when
    // rounding left the whole mass below the target) come last, sorted.
    const uint32_t cbin =
        topp ? cpu_bin(key_value(st.tau), list) : 1024u;
    const Chunk ck = walk_chunk(logits, v, topp);
    if (tid == 0) {
        S.ntail = 0;
        S.found = 0;
        S.last = -1;
    }
    __syncthreads();
    double mass = 0.0;
    int last_kept = -1;
    {
        uint32_t tie = ck.tie_before;
        for (uint32_t i = ck.i0; i < ck.i1; ++i) {
            float w, y;
            const int c = kept_class(logits, i, topp, topp_on, list, cbin, tie, w, y);
            if (c == 1) {
                mass += (double)w;
                last_kept = (int)i;
            } else if (c == 2) {
                const uint32_t at = atomicAdd(&S.ntail, 1u);
                keys[at] = ((uint64_t)~order_key(y) << 32) | i;
            }
        }
    }
    const double before = block_exclusive_scan(mass, S.scan);
    if (tid == SAMPLE_THREADS - 1) S.total_a = before + mass;
    __syncthreads();
    if (last_kept >= 0) atomicMax(&S.last, last_kept);
    const uint32_t ntail = S.ntail;
    if (ntail > 1) block_sort_u64(keys, ntail);
    // The total as the CPU sums it: the list path continues the id-order sum through the
    // crossing bin, the dense path adds the crossing bin's own sum.
    if (tid == 0) {
        double t = list ? S.total_a : 0.0;
        for (uint32_t j = 0; j < ntail; ++j)
            t += (double)sample_weight(st, sane_logit(logits[(uint32_t)keys[j]]));
        S.total = list ? t : S.total_a + t;
    }
    __syncthreads();
    const double u = a.u * S.total;
    if (u < S.total_a) {
        if (mass > 0.0 && u >= before && u < before + mass) {
            double acc = before;
            uint32_t tie = ck.tie_before;
            for (uint32_t i = ck.i0; i < ck.i1; ++i) {
                float w, y;
                if (kept_class(logits, i, topp, topp_on, list, cbin, tie, w, y) != 1) continue;
                acc += (double)w;
                if (u < acc) {
                    out[0] = i;
                    S.found = 1;
                    break;
                }
            }
            if (!S.found) {  // rounding inside the chunk: its last kept token
                out[0] = (uint32_t)last_kept;
                S.found = 1;
            }
        }
        __syncthreads();
        if (tid == 0 && !S.found) out[0] = S.last >= 0 ? (uint32_t)S.last : 0u;
        return;
    }
    if (tid == 0) {
        // The crossing bin in its sorted order; rounding past its end: its last token (or the
        // last kept token in id order when it is empty).
        double acc = S.total_a;
        int pick = ntail > 0 ? (int)(uint32_t)keys[ntail - 1] : S.last;
        for (uint32_t j = 0; j < ntail; ++j) {
            const uint32_t id = (uint32_t)keys[j];
            acc += (double)sample_weight(st, sane_logit(logits[id]));
            if (u < acc) {
                pick = (int)id;
                break;
            }
        }
        out[0] = pick >= 0 ? (uint32_t)pick : 0u;
    }
}

// SamplingDist::probs of one row (temperature > 0) into probs [v]: each kept weight divided by
// the kept mass (f64, then rounded to f32), 0 elsewhere. No finite logit: the one-hot vector of
// token 0 (the CPU reports an error there; the host checks for it). Ends with a barrier.
__device__ void row_probs(const float* logits, uint32_t v, const DrawArgs& a, float* probs) {
    DrawShared& S = draw_shared();
    const uint32_t tid = threadIdx.x;
    if (!kept_setup(logits, v, a)) {
        for (uint32_t i = tid; i < v; i += SAMPLE_THREADS) probs[i] = i == 0 ? 1.f : 0.f;
        __syncthreads();
        return;
    }
    const bool list = a.top_k > 0 && a.top_k < v;
    const bool topp = a.top_p < 1.0f && S.st.tau != 0;
    const Chunk ck = walk_chunk(logits, v, topp);
    double mass = 0.0;
    {
        uint32_t tie = ck.tie_before;
        for (uint32_t i = ck.i0; i < ck.i1; ++i) {
            float w, y;
            if (kept_class(logits, i, topp, false, list, 0, tie, w, y)) mass += (double)w;
        }
    }
    const double before = block_exclusive_scan(mass, S.scan);
    if (tid == SAMPLE_THREADS - 1) S.total = before + mass;
    __syncthreads();
    const double total = S.total;
    uint32_t tie = ck.tie_before;
    for (uint32_t i = ck.i0; i < ck.i1; ++i) {
        float w, y;
        probs[i] = kept_class(logits, i, topp, false, list, 0, tie, w, y)
                       ? (float)((double)w / total)
                       : 0.f;
    }
    __syncthreads();
}

// The penalties of model::sampling's read_penalized on one row, into work [v]: the repetition
// penalty on every distinct id of the history (÷ r when positive, × r otherwise), then over the
// generated ids x − frequency · count − presence (f32, in that order). marks [v]: bit 31 = in
// the history, low bits = generated count. Ids ≥ v are ignored.
__device__ void penalize(const SampleRow& r, uint32_t v, bool rep, bool fp, float* work,
                         uint32_t* marks) {
    const uint32_t tid = threadIdx.x;
    for (uint32_t i = tid; i < v; i += SAMPLE_THREADS) {
        work[i] = sane_logit(r.logits[i]);
        marks[i] = 0;
    }
    __syncthreads();
    const uint32_t n = r.prompt_len + r.generated_len;
    for (uint32_t j = tid; j < n; j += SAMPLE_THREADS) {
        const uint32_t t = r.history[j];
        if (t >= v) continue;
        if (rep) atomicOr(&marks[t], 0x80000000u);
        if (fp && j >= r.prompt_len) atomicAdd(&marks[t], 1u);
    }
    __syncthreads();
    for (uint32_t i = tid; i < v; i += SAMPLE_THREADS) {
        const uint32_t m = marks[i];
        if (!m) continue;
        float x = work[i];
        if (m & 0x80000000u)
            x = x < 0.f ? __fmul_rn(x, r.repetition_penalty) : __fdiv_rn(x, r.repetition_penalty);
        const uint32_t c = m & 0x7fffffffu;
        if (c)
            x = __fsub_rn(__fsub_rn(x, __fmul_rn(r.frequency_penalty, (float)c)),
                          r.presence_penalty);
        work[i] = x;
    }
    __syncthreads();
}

// Scratch words of one row: work [v] f32, marks [v] u32, then the crossing-bin keys (next power
// of two of v u64). Keep in step with `ops::sample_scratch_len`.
__device__ __forceinline__ uint64_t sample_scratch_words(uint32_t v) {
    uint64_t m = 1;
    while (m < v) m <<= 1;
    return 2ull * v + 2ull * m;
}

// One row of sample_rows: penalties, then the greedy argmax or the draw at the row's uniform.
__device__ void sample_row(const SampleRow& r, uint32_t v, uint32_t* scratch, uint32_t* out) {
    float* work = (float*)scratch;
    uint32_t* marks = scratch + v;
    uint64_t* keys = (uint64_t*)(scratch + 2 * (size_t)v);
    const bool rep = r.repetition_penalty != 1.0f && r.prompt_len + r.generated_len > 0;
    const bool fp = (r.frequency_penalty != 0.0f || r.presence_penalty != 0.0f) && r.generated_len > 0;
    const float* src = r.logits;
    if (rep || fp) {
        penalize(r, v, rep, fp, work, marks);
        src = work;
    }
    if (r.greedy) {
        // The penalized argmax, lowest id on ties (0 when nothing is finite: Sampler::sample).
        float best = -INFINITY;
        uint32_t besti = 0xffffffffu;
        for (uint32_t i = threadIdx.x; i < v; i += SAMPLE_THREADS)
            argmax_fold(best, besti, sane_logit(src[i]), i);
        block_argmax(best, besti);
        if (threadIdx.x == 0) out[0] = (besti == 0xffffffffu || best == -INFINITY) ? 0u : besti;
        return;
    }
    DrawArgs a;
    a.temperature = r.temperature;
    a.top_k = r.top_k;
    a.top_p = r.top_p;
    a.min_p = r.min_p;
    a.u = stream_uniform(r.key, r.word_pos);
    sample_draw(src, v, a, keys, out);
}

extern "C" __global__ void __launch_bounds__(SAMPLE_THREADS)
    sample(const float* logits, uint32_t v, float temperature, uint32_t top_k, float top_p,
           float min_p, const float* uniform, uint64_t* keys, uint32_t* out) {
    pdl_begin();
    DrawArgs a;
    a.temperature = temperature;
    a.top_k = top_k;
    a.top_p = top_p;
    a.min_p = min_p;
    a.u = (double)uniform[0];
    sample_draw(logits, v, a, keys, out);
}

// out[r] = the token of row r of the table (n rows, one block each); scratch holds
// sample_scratch_words(v) words per row.
extern "C" __global__ void __launch_bounds__(SAMPLE_THREADS)
    sample_rows(const SampleRow* rows, uint32_t v, uint32_t* scratch, uint32_t* out) {
    pdl_begin();
    const SampleRow r = rows[blockIdx.x];
    sample_row(r, v, scratch + blockIdx.x * sample_scratch_words(v), out + blockIdx.x);
}

// ------------------------------------------------------------------------------------------
// Exact rejection sampling of a verify block (dflash::accept_sampled / accept_greedy).
// ------------------------------------------------------------------------------------------

// Σ x over the block (f64), broadcast to every thread.
__device__ double block_sum_f64(double x) {
    DrawShared& S = draw_shared();
    const double ex = block_exclusive_scan(x, S.scan);
    if (threadIdx.x == SAMPLE_THREADS - 1) S.total_a = ex + x;
    __syncthreads();
    const double t = S.total_a;
    __syncthreads();
    return t;
}

// dflash's sample_index over the weights w(j) ≥ 0, j < v, in id order: the first positive j
// whose running sum exceeds target; past the end by rounding, the last positive one; 0 when
// every weight is 0. Contiguous chunks per thread, a block scan, then the chunk holding it.
template <class W>
__device__ uint32_t block_inverse_cdf(uint32_t v, W w, double target) {
    DrawShared& S = draw_shared();
    const uint32_t tid = threadIdx.x;
    const uint32_t chunk = (v + SAMPLE_THREADS - 1) / SAMPLE_THREADS;
    const uint32_t i0 = min(v, tid * chunk), i1 = min(v, i0 + chunk);
    double mass = 0.0;
    int last = -1;
    for (uint32_t i = i0; i < i1; ++i) {
        const double x = w(i);
        if (x > 0.0) {
            mass += x;
            last = (int)i;
        }
    }
    const double before = block_exclusive_scan(mass, S.scan);
    if (tid == 0) {
        S.found = 0;
        S.last = -1;
    }
    __syncthreads();
    if (last >= 0) atomicMax(&S.last, last);
    if (mass > 0.0 && target >= before && target < before + mass) {
        double acc = before;
        int pick = last;
        for (uint32_t i = i0; i < i1; ++i) {
            const double x = w(i);
            if (x <= 0.0) continue;
            acc += x;
            if (target < acc) {
                pick = (int)i;
                break;
            }
        }
        S.ntail = (uint32_t)pick;
        S.found = 1;
    }
    __syncthreads();
    const uint32_t r = S.found ? S.ntail : (S.last >= 0 ? (uint32_t)S.last : 0u);
    __syncthreads();
    return r;
}

// The penalized row i of a block (target or draft logits `row`), into work when a penalty is
// on: the history is the prompt, the generated ids and the first i drafts.
__device__ const float* block_row(const AcceptRow& r, const float* row, uint32_t i, uint32_t v,
                                  float* work, uint32_t* marks) {
    const SampleRow& s = r.s;
    const bool fp_on = s.frequency_penalty != 0.0f || s.presence_penalty != 0.0f;
    const uint32_t gen = s.generated_len + i;
    const bool rep = s.repetition_penalty != 1.0f && s.prompt_len + gen > 0;
    const bool fp = fp_on && gen > 0;
    if (!rep && !fp) return row;
    SampleRow ri = s;
    ri.logits = row;
    ri.generated_len = gen;
    penalize(ri, v, rep, fp, work, marks);
    return work;
}

// The penalized argmax of a row (lowest id on ties; 0 when nothing is finite).
__device__ uint32_t block_argmax_row(const float* src, uint32_t v) {
    __shared__ uint32_t res;
    float best = -INFINITY;
    uint32_t besti = 0xffffffffu;
    for (uint32_t i = threadIdx.x; i < v; i += SAMPLE_THREADS)
        argmax_fold(best, besti, sane_logit(src[i]), i);
    block_argmax(best, besti);
    if (threadIdx.x == 0) res = (besti == 0xffffffffu || best == -INFINITY) ? 0u : besti;
    __syncthreads();
    const uint32_t t = res;
    __syncthreads();
    return t;
}

// Scratch words of one block: work [v], marks [v], p [v], q [v]. Keep in step with
// `ops::accept_scratch_len`.
__device__ __forceinline__ uint64_t accept_scratch_words(uint32_t v) { return 4ull * v; }

// out[2b], out[2b + 1] = (accepted drafts, bonus token) of block b (one CUDA block each):
// greedy parameters accept the longest prefix equal to the penalized argmaxes (accept_greedy);
// sampled ones run accept_sampled on p_i = SamplingDist::probs(target row i), q_i = the same of
// draft row i, drawing the block's uniforms from its stream in the CPU's order (one per examined
// draft, then one for the residual or the bonus).
extern "C" __global__ void __launch_bounds__(SAMPLE_THREADS)
    accept_rows(const AcceptRow* rows, uint32_t v, uint32_t* scratch, uint32_t* out) {
    pdl_begin();
    const AcceptRow r = rows[blockIdx.x];
    uint32_t* sc = scratch + blockIdx.x * accept_scratch_words(v);
    float* work = (float*)sc;
    uint32_t* marks = sc + v;
    float* p = (float*)(sc + 2 * (size_t)v);
    float* q = (float*)(sc + 3 * (size_t)v);
    out += 2 * blockIdx.x;
    const uint32_t n = r.n;
    DrawArgs a;
    a.temperature = r.s.temperature;
    a.top_k = r.s.top_k;
    a.top_p = r.s.top_p;
    a.min_p = r.s.min_p;
    a.u = 0.0;
    uint64_t pos = r.s.word_pos;
    for (uint32_t i = 0; i <= n; ++i) {
        const float* tgt = block_row(r, r.s.logits + (size_t)i * v, i, v, work, marks);
        if (r.s.greedy) {
            const uint32_t t = block_argmax_row(tgt, v);
            if (i == n || t != r.drafts[i]) {
                if (threadIdx.x == 0) {
                    out[0] = i;
                    out[1] = t;
                }
                return;
            }
            continue;
        }
        row_probs(tgt, v, a, p);
        double ps = 0.0;
        for (uint32_t j = threadIdx.x; j < v; j += SAMPLE_THREADS) ps += (double)p[j];
        ps = block_sum_f64(ps);
        if (i == n) {
            const double u = stream_uniform(r.s.key, pos);
            const uint32_t bonus =
                block_inverse_cdf(v, [&](uint32_t j) { return (double)p[j]; }, u * ps);
            if (threadIdx.x == 0) {
                out[0] = n;
                out[1] = bonus;
            }
            return;
        }
        const float* dr = block_row(r, r.draft_logits + (size_t)i * v, i, v, work, marks);
        row_probs(dr, v, a, q);
        double qs = 0.0;
        for (uint32_t j = threadIdx.x; j < v; j += SAMPLE_THREADS) qs += (double)q[j];
        qs = block_sum_f64(qs);
        const double u = stream_uniform(r.s.key, pos);
        pos += 2;
        const uint32_t d = r.drafts[i];
        const double p_d = d < v ? (double)p[d] / ps : 0.0;
        const double q_d = d < v ? (double)q[d] / qs : 0.0;
        if (u * q_d < p_d) continue;
        // Rejected: the residual max(0, p̂ − q̂), or p̂ when it has no mass.
        const double u2 = stream_uniform(r.s.key, pos);
        auto res = [&](uint32_t j) { return fmax((double)p[j] / ps - (double)q[j] / qs, 0.0); };
        double m = 0.0;
        for (uint32_t j = threadIdx.x; j < v; j += SAMPLE_THREADS) m += res(j);
        m = block_sum_f64(m);
        const uint32_t bonus =
            m > 0.0 ? block_inverse_cdf(v, res, u2 * m)
                    : block_inverse_cdf(v, [&](uint32_t j) { return (double)p[j]; }, u2 * ps);
        if (threadIdx.x == 0) {
            out[0] = i;
            out[1] = bonus;
        }
        return;
    }
}
