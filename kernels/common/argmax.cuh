// Greedy token selection (argmax, lowest index on ties, NaN as -inf): tile bodies shared by the
// standalone kernel (sampling.cu: argmax_rows) and the persistent engine (persistent.cu: the LM
// head's per-chunk argmax and the per-row fold).
#pragma once
#include <stdint.h>
#include <float.h>

#include "common/abi.cuh"
#include "common/reduce.cuh"

// NaN reads as -inf (as model::sampling does).
__device__ __forceinline__ float sane_logit(float x) {
    return isnan(x) ? -INFINITY : fminf(x, FLT_MAX);
}

// Folds (ov, oi) into (best, besti): larger value wins, the lower index on ties; index
// 0xffffffff = nothing yet.
__device__ __forceinline__ void argmax_fold(float& best, uint32_t& besti, float ov, uint32_t oi) {
    if (oi != 0xffffffffu && (besti == 0xffffffffu || ov > best || (ov == best && oi < besti))) {
        best = ov;
        besti = oi;
    }
}

// Block-wide argmax fold; thread 0 gets the result.
__device__ void block_argmax(float& best, uint32_t& besti) {
    __shared__ float bv[32];
    __shared__ uint32_t bi[32];
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
        const float ov = __shfl_xor_sync(0xffffffffu, best, o);
        const uint32_t oi = __shfl_xor_sync(0xffffffffu, besti, o);
        argmax_fold(best, besti, ov, oi);
    }
    const int lane = threadIdx.x & 31, wid = threadIdx.x >> 5, nw = blockDim.x >> 5;
    __syncthreads();
    if (lane == 0) {
        bv[wid] = best;
        bi[wid] = besti;
    }
    __syncthreads();
    if (wid == 0) {
        best = lane < nw ? bv[lane] : -INFINITY;
        besti = lane < nw ? bi[lane] : 0xffffffffu;
#pragma unroll
        for (int o = 16; o > 0; o >>= 1) {
            const float ov = __shfl_xor_sync(0xffffffffu, best, o);
            const uint32_t oi = __shfl_xor_sync(0xffffffffu, besti, o);
            argmax_fold(best, besti, ov, oi);
        }
    }
}

// out[t] = argmax(logits[t]); lowest index on ties. grid (B, T): block b scans chunk b of the
// row; with B > 1 each writes its (value, index) to scratch ([MAX_TOKENS] counters, then
// [T][B] pairs; counters zero before the first launch) and the last block of each row merges.
//
// argmax_chunk is the scan of chunk [lo, hi) of row `row` by the calling block: (best, besti)
// for thread 0 (besti 0xffffffff: an empty chunk).
__device__ __forceinline__ void argmax_chunk(const float* row, uint32_t lo, uint32_t hi,
                                             float& best, uint32_t& besti) {
    best = -INFINITY;
    besti = 0xffffffffu;
    // Eight independent loads in flight per thread; each thread still visits its indices in
    // increasing order, so `>` keeps the lowest index of equal values.
    for (uint32_t i0 = lo + threadIdx.x; i0 < hi; i0 += 8 * blockDim.x) {
        float xs[8];
#pragma unroll
        for (int u = 0; u < 8; ++u) {
            const uint32_t i = i0 + u * blockDim.x;
            xs[u] = i < hi ? sane_logit(__ldcs(row + i)) : -INFINITY;
        }
#pragma unroll
        for (int u = 0; u < 8; ++u) {
            const uint32_t i = i0 + u * blockDim.x;
            if (i < hi && (xs[u] > best || besti == 0xffffffffu)) {
                best = xs[u];
                besti = i;
            }
        }
    }
    block_argmax(best, besti);
}

// argmax_rows_body is block (b, t) of that grid of B blocks per row.
__device__ __forceinline__ void argmax_rows_block(uint32_t b, uint32_t t, uint32_t B,
                                                  const float* logits, uint32_t v, uint32_t* out,
                                                  uint32_t* scratch) {
    const float* row = logits + (size_t)t * v;
    const uint32_t chunk = (v + B - 1) / B;
    const uint32_t lo = b * chunk, hi = min(v, lo + chunk);
    float best;
    uint32_t besti;
    argmax_chunk(row, lo, hi, best, besti);
    if (B == 1) {
        if (threadIdx.x == 0) out[t] = besti == 0xffffffffu ? 0u : besti;
        return;
    }
    uint32_t* pairs = scratch + MAX_TOKENS + (size_t)t * B * 2;
    if (threadIdx.x == 0) {
        pairs[2 * b] = __float_as_uint(best);
        pairs[2 * b + 1] = besti;
    }
    if (!last_block_done(scratch + t, B)) return;
    best = -INFINITY;
    besti = 0xffffffffu;
    for (uint32_t c = threadIdx.x; c < B; c += blockDim.x)
        argmax_fold(best, besti, __uint_as_float(__ldcg(pairs + 2 * c)), __ldcg(pairs + 2 * c + 1));
    block_argmax(best, besti);
    if (threadIdx.x == 0) out[t] = besti == 0xffffffffu ? 0u : besti;
}

