// The dense side of a MoE block around the expert GEMVs: the gated activation of a fused
// gate_up output (glu_halves) and the combine of the k expert outputs into the residual, with the
// next layer's RMSNorm fused (moe_combine, moe_combine_norm_v*). The expert GEMVs are mxfp4.cu.
//
// Launched by crates/tilert/src/ops.rs (`Ops::glu`, `Ops::combine`).
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
#include "common/math.cuh"
#include "common/reduce.cuh"

// Halves layout: gate = gate_up[t][i], up = gate_up[t][I + i]. kind 0 = clamped SwiGLU
// (gpt-oss), 1 = SwiGLU.
__device__ __forceinline__ void glu_halves_body(const float* gate_up, uint32_t t_count,
                                                uint32_t inter, uint32_t kind, float alpha,
                                                float limit, float* out) {
    pdl_begin();
    const uint64_t n = (uint64_t)t_count * inter;
    for (uint64_t idx = blockIdx.x * (uint64_t)blockDim.x + threadIdx.x; idx < n;
         idx += (uint64_t)gridDim.x * blockDim.x) {
        const uint64_t t = idx / inter, i = idx % inter;
        const float g = gate_up[t * 2 * inter + i], u = gate_up[t * 2 * inter + inter + i];
        float r;
        if (kind == 0) {
            const float gc = fminf(g, limit);
            const float uc = fminf(fmaxf(u, -limit), limit);
            const float glu = __fmul_rn(gc, sigmoidf_(__fmul_rn(gc, alpha)));
            r = __fmul_rn(__fadd_rn(uc, 1.0f), glu);
        } else {
            r = __fmul_rn(__fmul_rn(g, sigmoidf_(g)), u);
        }
        out[idx] = r;
    }
}

extern "C" __global__ void glu_halves(const float* gate_up, uint32_t t_count, uint32_t inter,
                                      uint32_t kind, float alpha, float limit, float* out) {
    glu_halves_body(gate_up, t_count, inter, kind, alpha, limit, out);
}

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
__device__ __forceinline__ void moe_combine_body(float* x, const float* y, const int32_t* ids,
                                                 uint32_t k, uint32_t h, const float* nw, float eps,
                                                 float* hout) {
    pdl_begin();
    const uint32_t t = blockIdx.x;
    __shared__ int order[MAX_TOKENS];
    __shared__ float red[32];
    if (threadIdx.x == 0) sort_entries(ids + t * k, k, order);
    __syncthreads();
    float* xr = x + (size_t)t * h;
    float ss = 0.f;
    for (uint32_t i = blockIdx.y * blockDim.x + threadIdx.x; i < h; i += gridDim.y * blockDim.x) {
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

extern "C" __global__ void moe_combine(float* x, const float* y, const int32_t* ids, uint32_t k,
                                       uint32_t h, const float* nw, float eps, float* hout) {
    moe_combine_body(x, y, ids, k, h, nw, eps, hout);
}

// moe_combine with the next RMSNorm fused, for h <= V * blockDim.x: a block per token holds its
// V values per thread in registers, and issues all loads of a group of JC expert rows (with x and
// the norm weight) before the first add, so the token costs about two memory round trips plus
// the block reduction instead of one round trip per strided element. Same sums in the same order
// as moe_combine. grid (T), block 1024.
template <int V, int JC>
__device__ void combine_norm_regs(float* __restrict__ x, const float* __restrict__ y,
                                  const int32_t* __restrict__ ids, uint32_t k, uint32_t h,
                                  const float* __restrict__ nw, float eps,
                                  float* __restrict__ hout) {
    pdl_begin();
    const uint32_t t = blockIdx.x, bd = blockDim.x;
    __shared__ int order[MAX_TOKENS];
    __shared__ float red[32];
    if (threadIdx.x == 0) sort_entries(ids + t * k, k, order);
    float xv[V], wv[V], acc[V];
#pragma unroll
    for (int u = 0; u < V; ++u) {
        const uint32_t i = threadIdx.x + u * bd;
        xv[u] = i < h ? x[(size_t)t * h + i] : 0.f;
        wv[u] = i < h ? nw[i] : 0.f;
        acc[u] = 0.f;
    }
    const float* yt = y + (size_t)t * k * h;
    // Rows j0 .. j0 + JC (those below k) of y: slot order, or expert order once sorted.
    auto load_rows = [&](float (&yv)[JC][V], uint32_t j0, bool sorted) {
#pragma unroll
        for (int jj = 0; jj < JC; ++jj)
#pragma unroll
            for (int u = 0; u < V; ++u) {
                const uint32_t i = threadIdx.x + u * bd, j = j0 + jj;
                yv[jj][u] = j < k && i < h ? yt[(size_t)(sorted ? order[j] : j) * h + i] : 0.f;
            }
    };
    if (k <= JC) {
        // All k rows at once, in slot order (not waiting for the sort), then summed in expert
        // order by selecting among the registers.
        float yv[JC][V];
        load_rows(yv, 0, false);
        __syncthreads();
#pragma unroll
        for (int jj = 0; jj < JC; ++jj) {
            if (jj >= k) break;
            const int src = order[jj];
#pragma unroll
            for (int u = 0; u < V; ++u) {
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
        float yv[JC][V];
        load_rows(yv, j0, true);
#pragma unroll
        for (int jj = 0; jj < JC; ++jj)
            if (j0 + jj < k)
#pragma unroll
                for (int u = 0; u < V; ++u) acc[u] += yv[jj][u];
    }
    float ss = 0.f;
#pragma unroll
    for (int u = 0; u < V; ++u) {
        const uint32_t i = threadIdx.x + u * bd;
        xv[u] += acc[u];
        if (i < h) {
            x[(size_t)t * h + i] = xv[u];
            ss = fmaf(xv[u], xv[u], ss);
        }
    }
    ss = block_sum(ss, red);
    const float r = 1.0f / sqrtf(ss / (float)h + eps);
#pragma unroll
    for (int u = 0; u < V; ++u) {
        const uint32_t i = threadIdx.x + u * bd;
        if (i < h) hout[(size_t)t * h + i] = __fmul_rn(wv[u], __fmul_rn(xv[u], r));
    }
}

#define COMBINE_NORM(V, JC)                                                                      \
    extern "C" __global__ void __launch_bounds__(1024) moe_combine_norm_v##V(                    \
        float* x, const float* y, const int32_t* ids, uint32_t k, uint32_t h, const float* nw,   \
        float eps, float* hout) {                                                                \
        combine_norm_regs<V, JC>(x, y, ids, k, h, nw, eps, hout);                                \
    }
COMBINE_NORM(1, 4)
COMBINE_NORM(2, 4)
COMBINE_NORM(4, 4)
