// Dense projections from tiled weights: y[t] = W · x[t] (+ bias) (+ y[t] when accumulate) for up
// to MAX_TOKENS tokens, W either FP8 e4m3 with 128×128 block scales (`weight_scale_inv`, one f32
// per block, value = e4m3(code) · scale) or BF16. f32 activations, f32 accumulation.
//
// Launched by crates/tilert/src/ops/proj.rs (`ProjOps`); the weights are uploaded by
// crates/tilert/src/tensor.rs (`ProjMatrix`) in the "proj tile" layout (kernels/NOTES.md):
//   * rows are padded to a multiple of PROJ_TILE_ROWS (16) and grouped: group g = rows 16g..16g+15;
//   * columns are padded (with zero weights) to a multiple of the tile width KT (32 FP8 values or
//     16 BF16 values: 32 bytes of one row);
//   * tile (g, c) = rows of group g × columns [c·KT, (c+1)·KT) is 512 contiguous bytes in lane
//     order: lane l holds row 16g + (l & 15), the 16-byte half (l >> 4) of the row's 32 bytes;
//   * tiles are stored group-major: tile (g, c) at byte (g · CT + c) · 512, CT = padded cols / KT.
// One warp load of a tile is 512 contiguous bytes (full DRAM atoms), and all 16 lanes of a half
// need the same activations (broadcast L1 reads). FP8 tiles never straddle a 128-column scale
// block (128 % 32 == 0) and a CTA's row groups never straddle a 128-row block (16·R divides 128),
// so each tile has one warp-uniform scale.
//
// A CTA owns R row groups (16·R rows) over the whole K: its W warps take tiles c = w, w + W, ...
// (U tiles of each of the R groups in flight per lane), then sum their partials through shared
// memory in warp order (deterministic; no split-K across CTAs, no atomics, no scratch).
//
// No fast math: fp8 and bf16 decode exactly to f32, products and sums are IEEE f32 (fmaf).
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>

#include "common/abi.cuh"
#include "common/pdl.cuh"
#include "common/tile.cuh"

// Two e4m3 values (low byte first) → two f32 (exact: e4m3 ⊂ f16 ⊂ f32).
__device__ __forceinline__ float2 e4m3x2_to_float2(uint32_t v16) {
    uint32_t h;
    asm("{ .reg .b16 lo;\n\t cvt.u16.u32 lo, %1;\n\t cvt.rn.f16x2.e4m3x2 %0, lo; }"
        : "=r"(h)
        : "r"(v16));
    __half2 hh;
    memcpy(&hh, &h, 4);
    return __half22float2(hh);
}

// The activations of one lane's 16-byte weight vector (E values starting at column k0 of one
// token row xr): vector loads when the row is 16-byte aligned and the vector is inside K, else
// guarded scalar loads (columns ≥ K read as 0; their weights are padding zeros anyway).
template <int E>
__device__ __forceinline__ void load_x(const float* __restrict__ xr, uint32_t k0, uint32_t k,
                                       bool xvec, float (&xv)[E]) {
    if (xvec && k0 + E <= k) {
#pragma unroll
        for (int q = 0; q < E / 4; ++q) {
            const float4 a = __ldg(reinterpret_cast<const float4*>(xr + k0) + q);
            xv[4 * q] = a.x;
            xv[4 * q + 1] = a.y;
            xv[4 * q + 2] = a.z;
            xv[4 * q + 3] = a.w;
        }
    } else {
#pragma unroll
        for (int e = 0; e < E; ++e) xv[e] = k0 + e < k ? __ldg(xr + k0 + e) : 0.f;
    }
}

// One lane's 16-byte weight vector (16 e4m3 or 8 bf16) decoded to f32, once per tile (the token
// loop reuses it).
template <bool FP8>
__device__ __forceinline__ void decode_vec(const uint4& w, float (&wf)[FP8 ? 16 : 8]) {
    const uint32_t words[4] = {w.x, w.y, w.z, w.w};
#pragma unroll
    for (int q = 0; q < 4; ++q) {
        if constexpr (FP8) {
            const float2 lo = e4m3x2_to_float2(words[q] & 0xffffu);
            const float2 hi = e4m3x2_to_float2(words[q] >> 16);
            wf[4 * q] = lo.x;
            wf[4 * q + 1] = lo.y;
            wf[4 * q + 2] = hi.x;
            wf[4 * q + 3] = hi.y;
        } else {
            wf[2 * q] = bf_lo(words[q]);
            wf[2 * q + 1] = bf_hi(words[q]);
        }
    }
}

// Dot of E decoded weights with their E activations: two interleaved f32 FMA chains (even and
// odd values), then their sum.
template <int E>
__device__ __forceinline__ float dot_vec(const float (&wf)[E], const float (&xv)[E]) {
    float a0 = 0.f, a1 = 0.f;
#pragma unroll
    for (int e = 0; e < E; e += 2) {
        a0 = fmaf(wf[e], xv[e], a0);
        a1 = fmaf(wf[e + 1], xv[e + 1], a1);
    }
    return a0 + a1;
}

// FP8: scales [ceil(n/128)][kb] f32. BF16: scales unused (null).
// n, k: the logical shape; ct: tiles per row group (padded k / KT); t ≤ TT real tokens.
template <bool FP8, int TT, int R, int U>
__device__ __forceinline__ void proj_body(const uint4* __restrict__ w,
                                          const float* __restrict__ scales,
                                          const float* __restrict__ bias,
                                          const float* __restrict__ x, float* __restrict__ y,
                                          uint32_t n, uint32_t k, uint32_t ct, uint32_t t,
                                          uint32_t accumulate, uint32_t xvec) {
    constexpr int E = FP8 ? 16 : 8;          // values per lane per tile
    constexpr uint32_t KT = 2 * E;           // columns per tile
    extern __shared__ float red[];           // [W][R][TT][16]
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = blockDim.x >> 5;
    const uint32_t g0 = blockIdx.x * R;      // first row group
    const uint32_t half = lane >> 4;
    // Tile (g, c) of this lane: w[(g·ct + c)·32 + lane].
    const uint4* wg[R];
#pragma unroll
    for (int r = 0; r < R; ++r) wg[r] = w + (size_t)(g0 + r) * ct * 32 + lane;
    const uint32_t kb = (k + 127) / 128;
    const float* srow = FP8 ? scales + (size_t)((g0 * 16) / 128) * kb : nullptr;
    pdl_begin();

    float acc[R][TT];
#pragma unroll
    for (int r = 0; r < R; ++r)
#pragma unroll
        for (int j = 0; j < TT; ++j) acc[r][j] = 0.f;

    for (uint32_t c0 = warp; c0 < ct; c0 += nw * U) {
        uint4 wv[U][R];
        float s[U];
#pragma unroll
        for (int u = 0; u < U; ++u) {
            const uint32_t c = c0 + u * nw;
#pragma unroll
            for (int r = 0; r < R; ++r)
                wv[u][r] = c < ct ? ld_stream(wg[r] + (size_t)c * 32) : make_uint4(0, 0, 0, 0);
            s[u] = FP8 && c < ct ? __ldg(srow + (c * KT) / 128) : 0.f;
        }
#pragma unroll
        for (int u = 0; u < U; ++u) {
            const uint32_t c = c0 + u * nw;
            if (c >= ct) break;
            const uint32_t k0 = c * KT + half * E;
            float wf[R][E];
#pragma unroll
            for (int r = 0; r < R; ++r) decode_vec<FP8>(wv[u][r], wf[r]);
#pragma unroll
            for (int j = 0; j < TT; ++j) {
                if ((uint32_t)j >= t) break;
                float xv[E];
                load_x<E>(x + (size_t)j * k, k0, k, xvec, xv);
#pragma unroll
                for (int r = 0; r < R; ++r) {
                    const float d = dot_vec<E>(wf[r], xv);
                    acc[r][j] = FP8 ? fmaf(d, s[u], acc[r][j]) : acc[r][j] + d;
                }
            }
        }
    }
    // The two halves of a row → lanes 0..15, then the warps in order.
#pragma unroll
    for (int r = 0; r < R; ++r)
#pragma unroll
        for (int j = 0; j < TT; ++j) {
            const float v = acc[r][j] + __shfl_xor_sync(0xffffffffu, acc[r][j], 16);
            if (lane < 16) red[((warp * R + r) * TT + j) * 16 + lane] = v;
        }
    __syncthreads();
    for (uint32_t i = threadIdx.x; i < (uint32_t)(R * TT * 16); i += blockDim.x) {
        const uint32_t rl = i & 15, j = (i >> 4) % TT, r = (i >> 4) / TT;
        const uint32_t row = (g0 + r) * 16 + rl;
        if (row >= n || j >= t) continue;
        float v = 0.f;
        for (int q = 0; q < nw; ++q) v += red[((q * R + r) * TT + j) * 16 + rl];
        if (bias) v += bias[row];
        float* yp = y + (size_t)j * n + row;
        if (accumulate) v = *yp + v;
        *yp = v;
    }
}

#define PROJ(NAME, FP8, TT, R, U)                                                               \
    extern "C" __global__ void __launch_bounds__(PROJ_MAX_THREADS) NAME(                         \
        const uint4* __restrict__ w, const float* __restrict__ scales,                           \
        const float* __restrict__ bias, const float* __restrict__ x, float* __restrict__ y,      \
        uint32_t n, uint32_t k, uint32_t ct, uint32_t t, uint32_t accumulate, uint32_t xvec) {   \
        proj_body<FP8, TT, R, U>(w, scales, bias, x, y, n, k, ct, t, accumulate, xvec);          \
    }

// proj_{fp8,bf16}_t{TT}_r{R}: R row groups per CTA, U = 4 tiles of each in flight per lane.
#define PROJ_T(TT)                                \
    PROJ(proj_fp8_t##TT##_r1, true, TT, 1, 4)     \
    PROJ(proj_fp8_t##TT##_r2, true, TT, 2, 4)     \
    PROJ(proj_bf16_t##TT##_r1, false, TT, 1, 4)   \
    PROJ(proj_bf16_t##TT##_r2, false, TT, 2, 4)

PROJ_T(1)
PROJ_T(2)
PROJ_T(4)
PROJ_T(8)
PROJ_T(16)
