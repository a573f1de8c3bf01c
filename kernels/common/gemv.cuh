// The vectorised GEMV body shared by the linear kernels (linear.cu) and the fused QKV projection
// with RoPE (rope.cu): `linear_vec`, one warp per R rows for up to TT tokens.
#pragma once
#include <stdint.h>

#include "common/abi.cuh"
#include "common/pdl.cuh"
#include "common/reduce.cuh"
#include "common/rope.cuh"
#include "common/tile.cuh"

// One warp computes R consecutive rows for TT tokens (t ≤ TT of them are real; the others
// re-read token t−1 and are not stored). Lane l handles the 16-byte vectors l, l+32, ... of
// each row, U·R weight loads in flight. Requires K % (16 / sizeof(weight)) == 0 and 16-byte
// aligned W and x.
// With ROPE (R = 2), the rows go through rope_store instead of into y (RO: RopeOut, or
// RopeOutRows of the batched decode; common/rope.cuh defines rope_at for both), lane j holding
// token j's cache destination (rope_at), resolved before the weight stream when TT ≤ 2.
// `linear_vec_warp` is the body of warp `warp` (rows warp·R .. warp·R + R − 1): a row's sums do
// not depend on which warp or launch computes it (each lane's FMA chain and the butterfly are
// the same), so the persistent engine (persistent.cu) runs any range of rows with it and gets the
// standalone kernels' bits.
template <bool BF16, int TT, int R, int U, bool ROPE = false, typename RO = RopeOut>
__device__ __forceinline__ void linear_vec_warp(uint32_t warp, const void* __restrict__ wv,
                                                const float* __restrict__ bias,
                                                const float* __restrict__ x, float* __restrict__ y,
                                                uint32_t n, uint32_t k, uint32_t t,
                                                uint32_t accumulate, uint32_t prefetch,
                                                const RO* ro = nullptr) {
    constexpr int E = BF16 ? 8 : 4;
    const int lane = threadIdx.x & 31;
    const uint32_t row0 = warp * R;
    if (row0 >= n) return;
    const uint32_t nvec = k / E;
    const uint4* wrow[R];
#pragma unroll
    for (int r = 0; r < R; ++r) {
        const uint32_t row = min(row0 + r, n - 1);
        wrow[r] = reinterpret_cast<const uint4*>(wv) + (size_t)row * nvec;
    }
    // The weights do not depend on earlier kernels: with `prefetch`, pull this warp's rows into
    // L2 while the predecessor still runs.
    if (prefetch && lane < R && row0 + lane < n)
        asm volatile("cp.async.bulk.prefetch.L2.global [%0], %1;" ::"l"(
                         reinterpret_cast<const uint4*>(wv) + (size_t)(row0 + lane) * nvec),
                     "r"(nvec * 16u)
                     : "memory");
    pdl_begin();
    const float* xt[TT];
#pragma unroll
    for (int j = 0; j < TT; ++j) xt[j] = x + (size_t)min((uint32_t)j, t - 1) * k;
    // Up to 2 tokens the destinations ride in registers through the weight stream; more would
    // spill (t8 / t16 variants), and their longer streams hide the epilogue's loads anyway.
    constexpr bool EARLY = ROPE && TT <= 2;
    [[maybe_unused]] RopeAt at{};
    if constexpr (EARLY)
        if ((uint32_t)lane < min((uint32_t)TT, t)) at = rope_at(*ro, lane);
    float acc[R][TT];
#pragma unroll
    for (int r = 0; r < R; ++r)
#pragma unroll
        for (int j = 0; j < TT; ++j) acc[r][j] = 0.f;

    uint32_t v = lane;
    for (; v + 32 * (U - 1) < nvec; v += 32 * U) {
        uint4 w[U][R];
#pragma unroll
        for (int u = 0; u < U; ++u)
#pragma unroll
            for (int r = 0; r < R; ++r) w[u][r] = ld_stream(wrow[r] + v + 32 * u);
#pragma unroll
        for (int u = 0; u < U; ++u)
#pragma unroll
            for (int j = 0; j < TT; ++j) {
                const float* xp = xt[j] + (size_t)(v + 32 * u) * E;
#pragma unroll
                for (int r = 0; r < R; ++r) acc[r][j] = dot16<BF16>(w[u][r], xp, acc[r][j]);
            }
    }
    for (; v < nvec; v += 32) {
        uint4 w[R];
#pragma unroll
        for (int r = 0; r < R; ++r) w[r] = ld_stream(wrow[r] + v);
#pragma unroll
        for (int j = 0; j < TT; ++j) {
            const float* xp = xt[j] + (size_t)v * E;
#pragma unroll
            for (int r = 0; r < R; ++r) acc[r][j] = dot16<BF16>(w[r], xp, acc[r][j]);
        }
    }
    // Butterfly: every lane ends with every sum; lane (r·TT + j) stores value (r, j).
#pragma unroll
    for (int r = 0; r < R; ++r)
#pragma unroll
        for (int j = 0; j < TT; ++j) acc[r][j] = warp_sum(acc[r][j]);
    if constexpr (ROPE) {
        static_assert(R == 2, "rope pairs are two rows");
#pragma unroll
        for (int j = 0; j < TT; ++j)
            if (lane == j && (uint32_t)j < t) {
                const float b0 = bias ? bias[row0] : 0.f;
                const float b1 = bias && row0 + 1 < n ? bias[row0 + 1] : 0.f;
                if constexpr (!EARLY) at = rope_at(*ro, j);
                rope_store(rope_out(*ro), at, row0, n, j, acc[0][j] + b0, acc[1][j] + b1);
            }
        return;
    }
#pragma unroll
    for (int r = 0; r < R; ++r)
#pragma unroll
        for (int j = 0; j < TT; ++j) {
            if (lane == ((r * TT + j) & 31)) {
                const uint32_t row = row0 + r;
                if (row < n && (uint32_t)j < t) {
                    float val = acc[r][j];
                    if (bias) val += bias[row];
                    float* yp = y + (size_t)j * n + row;
                    if (accumulate) val = *yp + val;
                    *yp = val;
                }
            }
        }
}

// linear_vec_warp for this thread's warp of the grid (the standalone kernels).
template <bool BF16, int TT, int R, int U, bool ROPE = false, typename RO = RopeOut>
__device__ __forceinline__ void linear_vec(const void* __restrict__ wv, const float* __restrict__ bias,
                                           const float* __restrict__ x, float* __restrict__ y,
                                           uint32_t n, uint32_t k, uint32_t t, uint32_t accumulate,
                                           uint32_t prefetch, const RO* ro = nullptr) {
    linear_vec_warp<BF16, TT, R, U, ROPE, RO>((blockIdx.x * blockDim.x + threadIdx.x) >> 5, wv,
                                              bias, x, y, n, k, t, accumulate, prefetch, ro);
}
