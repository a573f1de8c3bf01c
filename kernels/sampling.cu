// Token selection: argmax_rows (greedy decoding) and sample (model::sampling: temperature,
// top-k, top-p, min-p, inverse CDF).
//
// Launched by crates/tilert/src/ops.rs (`Ops::argmax`, `Ops::sample`).
//
// Everything is f32 except dense weights (bf16 or f32). No fast math: the kernels use IEEE
// division / sqrt and expf; where the CPU definition is a short chain of roundings the kernels use
// explicit _rn intrinsics so that the compiler cannot fuse multiply-adds and the results are
// bit-identical to the CPU.
#include <cuda_bf16.h>
#include <stdint.h>
#include <float.h>

#include "common/abi.cuh"
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

// Among the candidates (top-k set when `in_k`, else every token), in descending logit order,
// finds the crossing value: by count (`by_mass` false) the need-th largest logit; by mass the
// first value at which the fixed-point mass of everything larger plus its own reaches `target`.
// Leaves in sh: prefix = key of that value, before = count / mass strictly above it, and
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
            const uint32_t key = order_key(x);
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

__device__ __forceinline__ void sample_body(const float* logits, uint32_t v, float temperature,
                                            uint32_t top_k, float top_p, float min_p,
                                            const float* uniform, uint32_t* out) {
    pdl_begin();
    __shared__ float redf[32];
    __shared__ double scan[SAMPLE_THREADS];
    __shared__ SampleState st;
    __shared__ Shared sh;
    __shared__ uint32_t sh_found;
    const uint32_t tid = threadIdx.x;

    // 1. Max.
    float mx = -INFINITY;
    for (uint32_t i = tid; i < v; i += SAMPLE_THREADS) mx = fmaxf(mx, sane_logit(logits[i]));
    mx = block_max(mx, redf);
    if (mx == -INFINITY) {
        if (tid == 0) out[0] = 0;
        return;
    }
    if (tid == 0) {
        st.mx = mx;
        st.inv_t = 1.0f / temperature;
        st.thr = -INFINITY;
        st.minp = min_p > 0.f ? min_p : 0.f;
        st.tau = 0;
        st.tie_keep = 0;
        st.tie_all = 1;
    }
    __syncthreads();
    // Fixed-point scale of the masses: v terms of at most 1 stay below 2^62.
    const double fx_scale = ldexp(1.0, 62 - (32 - __clz(v)));

    // 2. Top-k threshold: the k-th largest logit; every logit ≥ it is kept (ties kept).
    if (top_k > 0 && top_k < v) {
        crossing_select(logits, v, st, false, false, 0.0, top_k, fx_scale, sh);
        if (tid == 0) st.thr = key_value(sh.prefix);
        __syncthreads();
    }

    // 3. Top-p: the crossing value tau in descending order by mass, then how many of the
    // tau-valued tokens (lowest ids first) are kept.
    if (top_p < 1.0f) {
        uint64_t tot = 0;  // (per thread, then reduced exactly through the scan)
        for (uint32_t i = tid; i < v; i += SAMPLE_THREADS) {
            const float x = sane_logit(logits[i]);
            const float w = sample_weight(st, x);
            if (in_topk(st, x, w)) tot += (uint64_t)((double)w * fx_scale);
        }
        const uint64_t ex = block_exclusive_scan_u64(tot, sh.scanbuf);
        if (tid == SAMPLE_THREADS - 1) sh.before = ex + tot;
        __syncthreads();
        const double target = (double)top_p * (double)sh.before * (1.0 - 1e-6);
        __syncthreads();
        crossing_select(logits, v, st, true, true, target, 0, fx_scale, sh);
        if (tid == 0 && sh.found) {
            // hist[d] tokens share the value tau and the weight w_tau; the first is kept, the
            // j-th (j ≥ 1) while before + j·w_tau < target.
            const uint32_t cnt = sh.hist[sh.prefix & 0xff];
            const double before = (double)sh.before;
            const double w = (double)(uint64_t)((double)sample_weight(st, key_value(sh.prefix)) * fx_scale);
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

    // 4. Draw: contiguous chunks per thread, block scan of the kept mass, inverse CDF.
    const uint32_t chunk = (v + SAMPLE_THREADS - 1) / SAMPLE_THREADS;
    const uint32_t i0 = min(v, tid * chunk), i1 = min(v, i0 + chunk);
    const bool topp = top_p < 1.0f && st.tau != 0;
    // Ranks of the tau-valued tokens (needed only when some of them are cut).
    uint32_t tie_before = 0;
    if (topp && !st.tie_all) {
        uint32_t c = 0;
        for (uint32_t i = i0; i < i1; ++i) {
            const float x = sane_logit(logits[i]);
            if (in_topk_y(st, x) && order_key(x) == st.tau) ++c;
        }
        tie_before = (uint32_t)block_exclusive_scan((double)c, scan);
    }
    double mass = 0.0;
    int last_kept = -1;
    {
        uint32_t tie = tie_before;
        for (uint32_t i = i0; i < i1; ++i) {
            const float x = sane_logit(logits[i]);
            const float w = sample_weight(st, x);
            bool kept = in_topk(st, x, w) && w >= st.minp;
            if (kept && topp) {
                const uint32_t key = order_key(x);
                if (key < st.tau) kept = false;
                else if (key == st.tau && !st.tie_all) kept = tie++ < st.tie_keep;
            }
            if (kept) {
                mass += (double)w;
                last_kept = (int)i;
            }
        }
    }
    const double before = block_exclusive_scan(mass, scan);
    __shared__ double sh_total;
    __shared__ int sh_last;
    if (tid == SAMPLE_THREADS - 1) sh_total = before + mass;
    if (tid == 0) {
        sh_found = 0;
        sh_last = -1;
    }
    __syncthreads();
    if (last_kept >= 0) atomicMax(&sh_last, last_kept);
    const double u = (double)uniform[0] * sh_total;
    if (mass > 0.0 && u >= before && u < before + mass) {
        double acc = before;
        uint32_t tie = tie_before;
        for (uint32_t i = i0; i < i1; ++i) {
            const float x = sane_logit(logits[i]);
            const float w = sample_weight(st, x);
            bool kept = in_topk(st, x, w) && w >= st.minp;
            if (kept && topp) {
                const uint32_t key = order_key(x);
                if (key < st.tau) kept = false;
                else if (key == st.tau && !st.tie_all) kept = tie++ < st.tie_keep;
            }
            if (!kept) continue;
            acc += (double)w;
            if (u < acc) {
                out[0] = i;
                sh_found = 1;
                break;
            }
        }
        if (!sh_found) {  // rounding inside the chunk: its last kept token
            out[0] = (uint32_t)last_kept;
            sh_found = 1;
        }
    }
    __syncthreads();
    if (tid == 0 && !sh_found) out[0] = sh_last >= 0 ? (uint32_t)sh_last : 0u;
}

extern "C" __global__ void __launch_bounds__(SAMPLE_THREADS)
    sample(const float* logits, uint32_t v, float temperature, uint32_t top_k, float top_p,
           float min_p, const float* uniform, uint32_t* out) {
    sample_body(logits, v, temperature, top_k, top_p, min_p, uniform, out);
}
