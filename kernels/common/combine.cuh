// The combine of the k expert outputs into the residual, with the next layer's RMSNorm fused:
// tile bodies shared by the standalone kernels (moe.cu: moe_combine, moe_combine_norm_v*) and
// the persistent engine (persistent.cu: one tile per row).
#pragma once
#include <stdint.h>

#include "common/abi.cuh"
#include "common/reduce.cuh"

// order[0..k) = the slots of ids[0..k) by ascending expert id (insertion sort, stable: equal
// ids keep slot order). One thread.
__device__ void sort_entries(const int32_t* ids, uint32_t k, int* order) {
    int id[MAX_TOKENS];
    for (uint32_t j = 0; j < k; ++j) {
        id[j] = ids[j];
        order[j] = j;
    }
    for (uint32_t a = 1; a < k; ++a) {
        int o = order[a], v = id[o];
        int b = a;
        while (b > 0 && id[order[b - 1]] > v) {
            order[b] = order[b - 1];
            --b;
        }
        order[b] = o;
    }
}

// x[t] += Σ_j y[t][j] with the k terms summed from 0 in ascending expert id; then, when `nw` is
// given, h[t] = rms_norm(x[t]) ⊙ nw (the next layer's input norm fused in: as `rms_norm`, but
// grid (T, 1) is required). grid (T, ...).
// moe_combine_row is block (t, y) of that grid of `ny` blocks per row.
__device__ __forceinline__ void moe_combine_row(uint32_t t, uint32_t y_block, uint32_t ny,
                                                float* x, const float* y, const int32_t* ids,
                                                uint32_t k, uint32_t h, const float* nw, float eps,
                                                float* hout) {
    __shared__ int order[MAX_TOKENS];
    __shared__ float red[32];
    if (threadIdx.x == 0) sort_entries(ids + t * k, k, order);
    __syncthreads();
    float* xr = x + (size_t)t * h;
    float ss = 0.f;
    for (uint32_t i = y_block * blockDim.x + threadIdx.x; i < h; i += ny * blockDim.x) {
        float acc = 0.f;
        for (uint32_t j = 0; j < k; ++j) acc += y[((size_t)t * k + order[j]) * h + i];
        const float v = xr[i] + acc;
        xr[i] = v;
        ss = fmaf(v, v, ss);
    }
    if (!nw) return;
    ss = block_sum(ss, red);
    const float r = 1.0f / sqrtf(ss / (float)h + eps);
    float* orow = hout + (size_t)t * h;
    for (uint32_t i = threadIdx.x; i < h; i += blockDim.x) orow[i] = __fmul_rn(nw[i], __fmul_rn(xr[i], r));
}

// moe_combine with the next RMSNorm fused, for h <= V * blockDim.x: a block per token holds its
// V values per thread in registers, and issues all loads of a group of JC expert rows (with x and
// the norm weight) before the first add, so the token costs about two memory round trips plus
// the block reduction instead of one round trip per strided element. Same sums in the same order
// as moe_combine. grid (T), block 1024.
// combine_norm_regs is the block of row t. With VT > 1 a block of blockDim.x threads computes
// what a block of VT · blockDim.x threads would (thread j also runs virtual threads j + bd,
// j + 2·bd, ..., their sums of squares reduced as one VT·bd-thread block_sum): the persistent
// engine's 256-thread blocks give the bits of the standalone 1024-thread kernels.
template <int V, int JC, int VT = 1>
__device__ void combine_norm_regs(uint32_t t, float* __restrict__ x, const float* __restrict__ y,
                                  const int32_t* __restrict__ ids, uint32_t k, uint32_t h,
                                  const float* __restrict__ nw, float eps,
                                  float* __restrict__ hout) {
    constexpr int M = V * VT;
    const uint32_t bd = blockDim.x;
    // Element of register m: virtual thread threadIdx.x + (m / V)·bd, its value m % V.
    auto elem = [&](int m) -> uint32_t {
        return threadIdx.x + (uint32_t)(m / V) * bd + (uint32_t)(m % V) * bd * VT;
    };
    __shared__ int order[MAX_TOKENS];
    __shared__ float red[32];
    if (threadIdx.x == 0) sort_entries(ids + t * k, k, order);
    float xv[M], wv[M], acc[M];
#pragma unroll
    for (int u = 0; u < M; ++u) {
        const uint32_t i = elem(u);
        xv[u] = i < h ? x[(size_t)t * h + i] : 0.f;
        wv[u] = i < h ? nw[i] : 0.f;
        acc[u] = 0.f;
    }
    const float* yt = y + (size_t)t * k * h;
    // Rows j0 .. j0 + JC (those below k) of y: slot order, or expert order once sorted.
    auto load_rows = [&](float (&yv)[JC][M], uint32_t j0, bool sorted) {
#pragma unroll
        for (int jj = 0; jj < JC; ++jj)
#pragma unroll
            for (int u = 0; u < M; ++u) {
                const uint32_t i = elem(u), j = j0 + jj;
                yv[jj][u] = j < k && i < h ? yt[(size_t)(sorted ? order[j] : j) * h + i] : 0.f;
            }
    };
    if (k <= JC) {
        // All k rows at once, in slot order (not waiting for the sort), then summed in expert
        // order by selecting among the registers.
        float yv[JC][M];
        load_rows(yv, 0, false);
        __syncthreads();
#pragma unroll
        for (int jj = 0; jj < JC; ++jj) {
            if (jj >= k) break;
            const int src = order[jj];
#pragma unroll
            for (int u = 0; u < M; ++u) {
                float v = yv[0][u];
#pragma unroll
                for (int q = 1; q < JC; ++q) v = src == q ? yv[q][u] : v;
                acc[u] += v;
            }
        }
    } else {
        __syncthreads();
    }
    for (uint32_t j0 = 0; k > JC && j0 < k; j0 += JC) {
        float yv[JC][M];
        load_rows(yv, j0, true);
#pragma unroll
        for (int jj = 0; jj < JC; ++jj)
            if (j0 + jj < k)
#pragma unroll
                for (int u = 0; u < M; ++u) acc[u] += yv[jj][u];
    }
    float ss[VT];
#pragma unroll
    for (int q = 0; q < VT; ++q) ss[q] = 0.f;
#pragma unroll
    for (int u = 0; u < M; ++u) {
        const uint32_t i = elem(u);
        xv[u] += acc[u];
        if (i < h) {
            x[(size_t)t * h + i] = xv[u];
            ss[u / V] = fmaf(xv[u], xv[u], ss[u / V]);
        }
    }
    const float sum = block_sum_v<VT>(ss, red);
    const float r = 1.0f / sqrtf(sum / (float)h + eps);
#pragma unroll
    for (int u = 0; u < M; ++u) {
        const uint32_t i = elem(u);
        if (i < h) hout[(size_t)t * h + i] = __fmul_rn(wv[u], __fmul_rn(xv[u], r));
    }
}
