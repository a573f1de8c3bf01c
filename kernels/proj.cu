// Dense projections from tiled weights: y[t] = W · x[t] (+ bias) (+ y[t] when accumulate) for up
// to MAX_TOKENS tokens, W either FP8 e4m3 with block scales or BF16. f32 activations, f32
// accumulation. FP8 scales on the device are one f32 per (16-row group, 128-column block),
// `[ceil(n/16)][ceil(k/128)]`: the checkpoint's 128×128 `weight_scale_inv` expanded at upload (and
// any row blocking whose scale is constant over each 16-row group: MiMo's per-KV-group qkv blocks);
// value = e4m3(code) · scale.
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
// block (128 % 32 == 0), so each tile has one warp-uniform scale.
//
// Three kernel families over the same layout:
//   * proj_{fp8,bf16}_t{TT}_r{R} ("row groups"): a CTA owns R row groups (16·R rows) over the
//     whole K: its W warps take tiles c = w, w + W, ... (U tiles of each of the R groups in flight
//     per lane), then sum their partials through shared memory in warp order (no scratch).
//   * proj_sk_{fp8,bf16}_t{TT} ("stream-K"): a grid sized to the resident capacity; the tiles in
//     storage order (group-major) are cut into one contiguous range per warp (equal to within
//     one tile), so every SM streams the same bytes in one wave whatever the shape. A warp
//     writes the rows of a group its range covers whole; for a group it shares with other warps
//     it stores its partial (scratch slot 0 for its first group, 1 for its last) and counts in;
//     the last warp in sums the partials in warp order and writes the rows (deterministic).
//   * proj_bulk_{fp8,bf16}_t{TT}_r{R} ("bulk", below): a CTA owns blocks of R row groups over
//     the whole K; the weights stream into shared memory by cp.async.bulk.
// All are deterministic (no float atomics). The token loops run all TT tokens without a branch
// (tokens past t re-read token t − 1 and are never stored), and tiles past the last compute on
// in-bounds data and add nothing, so every load of an unrolled loop can issue before the first
// use (a load behind a data-dependent branch waits for it).
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
// token row xr), branch-free so that the loads of several tiles and tokens issue together (a
// load behind a data-dependent branch waits for it): vector loads when rows are 16-byte aligned,
// else scalar loads. A 4-column granule at or past K (vector path) reads granule 0 instead, a
// column past K (scalar path) reads column K − 1: their weights are the zero padding, so they add
// exactly 0 (activations are finite).
template <int E>
__device__ __forceinline__ void load_x(const float* __restrict__ xr, uint32_t k0, uint32_t k,
                                       bool xvec, float (&xv)[E]) {
    if (xvec) {
#pragma unroll
        for (int q = 0; q < E / 4; ++q) {
            const uint32_t c = k0 + 4 * q;
            const float4 a = __ldg(reinterpret_cast<const float4*>(xr + (c < k ? c : 0)));
            xv[4 * q] = a.x;
            xv[4 * q + 1] = a.y;
            xv[4 * q + 2] = a.z;
            xv[4 * q + 3] = a.w;
        }
    } else {
#pragma unroll
        for (int e = 0; e < E; ++e) xv[e] = __ldg(xr + min(k0 + e, k - 1));
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

// FP8: scales [ceil(n/16)][kb] f32 (one per 16-row group and 128 columns). BF16: scales unused.
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
    const float* srow = FP8 ? scales + (size_t)g0 * kb : nullptr;  // group g0 + r: + r·kb
    pdl_begin();

    float acc[R][TT];
#pragma unroll
    for (int r = 0; r < R; ++r)
#pragma unroll
        for (int j = 0; j < TT; ++j) acc[r][j] = 0.f;

    for (uint32_t c0 = warp; c0 < ct; c0 += nw * U) {
        uint4 wv[U][R];
        float s[U][R];
#pragma unroll
        for (int u = 0; u < U; ++u) {
            const uint32_t c = c0 + u * nw;
#pragma unroll
            for (int r = 0; r < R; ++r)
                wv[u][r] = c < ct ? ld_stream(wg[r] + (size_t)c * 32) : make_uint4(0, 0, 0, 0);
#pragma unroll
            for (int r = 0; r < R; ++r)
                s[u][r] = FP8 && c < ct ? __ldg(srow + (size_t)r * kb + (c * KT) / 128) : 0.f;
        }
#pragma unroll
        for (int u = 0; u < U; ++u) {
            // Past the last tile: zero weights and scales (loaded so above), activations of the
            // last tile (in bounds) — adds exactly 0, with no branch before the loads.
            const uint32_t c = min(c0 + u * nw, ct - 1);
            const uint32_t k0 = c * KT + half * E;
            float wf[R][E];
#pragma unroll
            for (int r = 0; r < R; ++r) decode_vec<FP8>(wv[u][r], wf[r]);
#pragma unroll
            for (int j = 0; j < TT; ++j) {
                // Tokens past t re-read token t − 1 (computed, never stored): no branch.
                const uint32_t jj = min((uint32_t)j, t - 1);
                float xv[E];
                load_x<E>(x + (size_t)jj * k, k0, k, xvec, xv);
#pragma unroll
                for (int r = 0; r < R; ++r) {
                    const float d = dot_vec<E>(wf[r], xv);
                    acc[r][j] = FP8 ? fmaf(d, s[u][r], acc[r][j]) : acc[r][j] + d;
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

// ---- stream-K ------------------------------------------------------------------------------

// The first tile of warp q's range when `tiles` tiles are cut into `warps` ranges.
__device__ __forceinline__ uint64_t sk_start(uint64_t q, uint64_t tiles, uint64_t warps) {
    return q * tiles / warps;
}

// The warp whose range holds tile i (requires warps ≤ tiles: every range is non-empty).
__device__ __forceinline__ uint32_t sk_owner(uint64_t i, uint64_t tiles, uint64_t warps) {
    return (uint32_t)(((i + 1) * warps - 1) / tiles);
}

// Row `row` of token j: v (+ bias) (+ y when accumulate), the row-group kernels' order.
__device__ __forceinline__ void proj_store(float* __restrict__ y, const float* __restrict__ bias,
                                           uint32_t n, uint32_t row, uint32_t j, float v,
                                           uint32_t accumulate) {
    if (bias) v += bias[row];
    float* yp = y + (size_t)j * n + row;
    if (accumulate) v = *yp + v;
    *yp = v;
}

// The last warp into row group g: sums the partials of warps qa..qb in warp order (slot 0 where
// g is that warp's first group, else 1), writes the rows and re-arms the counter. The (token,
// warp) pairs are walked token-major in batches of SK_BATCH independent L2 loads (a group can
// have tens of contributors: one dependent load each would be a tail of microseconds); the adds
// stay in warp order.
#define SK_BATCH 16
template <int TT>
__device__ __noinline__ void sk_reduce(const float* part, uint32_t* counters,
                                       const float* __restrict__ bias, float* __restrict__ y,
                                       uint32_t n, uint32_t t, uint32_t accumulate, uint32_t g,
                                       uint32_t ct, uint64_t tiles, uint64_t warps, uint32_t qa,
                                       uint32_t qb) {
    __threadfence();
    const int lane = threadIdx.x & 31;
    const uint32_t row = g * 16 + (lane & 15);
    const uint32_t nq = qb - qa + 1, items = nq * t;
    if (lane < 16 && row < n) {
        float v = 0.f;
        for (uint32_t m0 = 0; m0 < items; m0 += SK_BATCH) {
            float p[SK_BATCH];
#pragma unroll
            for (int e = 0; e < SK_BATCH; ++e) {
                const uint32_t m = m0 + e;
                p[e] = 0.f;
                if (m < items) {
                    const uint32_t j = m / nq, q = qa + m % nq;
                    const uint32_t slot = sk_start(q, tiles, warps) / ct == g ? 0 : 1;
                    p[e] = __ldcg(part + ((size_t)(2 * q + slot) * TT + j) * 16 + lane);
                }
            }
#pragma unroll
            for (int e = 0; e < SK_BATCH; ++e) {
                const uint32_t m = m0 + e;
                if (m >= items) break;
                v += p[e];
                if (m % nq == nq - 1) {  // token m / nq complete
                    proj_store(y, bias, n, row, m / nq, v, accumulate);
                    v = 0.f;
                }
            }
        }
    }
    if (lane == 0) counters[g] = 0;
}

// part: [warps][2][TT][16] f32 scratch; counters: [row groups] u32, zero between launches.
template <bool FP8, int TT, int U>
__device__ __forceinline__ void proj_sk_body(const uint4* __restrict__ w,
                                             const float* __restrict__ scales,
                                             const float* __restrict__ bias,
                                             const float* __restrict__ x, float* __restrict__ y,
                                             float* part, uint32_t* counters, uint32_t n,
                                             uint32_t k, uint32_t ct, uint32_t t,
                                             uint32_t accumulate, uint32_t xvec) {
    constexpr int E = FP8 ? 16 : 8;
    constexpr uint32_t KT = 2 * E;
    const int lane = threadIdx.x & 31;
    const uint32_t nw = blockDim.x >> 5;
    const uint32_t q = blockIdx.x * nw + (threadIdx.x >> 5);
    const uint64_t warps = (uint64_t)gridDim.x * nw;
    const uint64_t tiles = (uint64_t)((n + 15) / 16) * ct;
    const uint64_t a = sk_start(q, tiles, warps), b = sk_start(q + 1, tiles, warps);
    const uint32_t half = lane >> 4;
    const uint32_t kb = (k + 127) / 128;
    uint32_t g = (uint32_t)(a / ct), c = (uint32_t)(a - (uint64_t)g * ct);
    const uint32_t g_first = g;
    const uint4* wl = w + lane;

    float acc[TT];
#pragma unroll
    for (int j = 0; j < TT; ++j) acc[j] = 0.f;

    for (uint64_t i0 = a; i0 < b; i0 += U) {
        // U consecutive tiles (U·512 contiguous bytes per warp) and their scales in flight.
        uint4 wv[U];
        float s[U];
        {
            uint32_t gg = g, cc = c;
#pragma unroll
            for (int u = 0; u < U; ++u) {
                const bool in = i0 + u < b;
                wv[u] = in ? ld_stream(wl + (size_t)(i0 + u) * 32) : make_uint4(0, 0, 0, 0);
                if (FP8) s[u] = in ? __ldg(scales + (size_t)gg * kb + (cc * KT) / 128) : 0.f;
                if (++cc == ct) {
                    cc = 0;
                    ++gg;
                }
            }
        }
        // Weights only before this point (PDL: the predecessor may still run).
        pdl_begin();
#pragma unroll
        for (int u = 0; u < U; ++u) {
            if (i0 + u >= b) break;
            const uint32_t k0 = c * KT + half * E;
            float wf[E];
            decode_vec<FP8>(wv[u], wf);
#pragma unroll
            for (int j = 0; j < TT; ++j) {
                const uint32_t jj = min((uint32_t)j, t - 1);  // past t: computed, never stored
                float xv[E];
                load_x<E>(x + (size_t)jj * k, k0, k, xvec, xv);
                const float d = dot_vec<E>(wf, xv);
                acc[j] = FP8 ? fmaf(d, s[u], acc[j]) : acc[j] + d;
            }
            const bool end_group = c + 1 == ct;
            if (end_group || i0 + u + 1 == b) {
                // Row sums of group g: the two halves → lanes 0..15.
                float v[TT];
#pragma unroll
                for (int j = 0; j < TT; ++j) {
                    v[j] = acc[j] + __shfl_xor_sync(0xffffffffu, acc[j], 16);
                    acc[j] = 0.f;
                }
                const uint64_t gs = (uint64_t)g * ct;
                const uint32_t row = g * 16 + (lane & 15);
                if (a <= gs && gs + ct <= b) {
                    // The whole group is this warp's.
                    if (lane < 16 && row < n) {
#pragma unroll
                        for (int j = 0; j < TT; ++j)
                            if ((uint32_t)j < t) proj_store(y, bias, n, row, j, v[j], accumulate);
                    }
                } else {
                    const uint32_t slot = g == g_first ? 0 : 1;
                    float* p = part + (size_t)(2 * q + slot) * TT * 16;
                    if (lane < 16) {
#pragma unroll
                        for (int j = 0; j < TT; ++j)
                            if ((uint32_t)j < t) p[j * 16 + lane] = v[j];
                    }
                    __threadfence();
                    __syncwarp();
                    uint32_t old = 0;
                    if (lane == 0) old = atomicAdd(counters + g, 1u);
                    old = __shfl_sync(0xffffffffu, old, 0);
                    const uint32_t qa = sk_owner(gs, tiles, warps);
                    const uint32_t qb = sk_owner(gs + ct - 1, tiles, warps);
                    if (old == qb - qa)
                        sk_reduce<TT>(part, counters, bias, y, n, t, accumulate, g, ct, tiles,
                                      warps, qa, qb);
                }
            }
            if (end_group) {
                c = 0;
                ++g;
            } else {
                ++c;
            }
        }
    }
}

#define PROJ_SK(NAME, FP8, TT, U)                                                               \
    extern "C" __global__ void __launch_bounds__(PROJ_SK_THREADS) NAME(                          \
        const uint4* __restrict__ w, const float* __restrict__ scales,                           \
        const float* __restrict__ bias, const float* __restrict__ x, float* __restrict__ y,      \
        float* part, uint32_t* counters, uint32_t n, uint32_t k, uint32_t ct, uint32_t t,        \
        uint32_t accumulate, uint32_t xvec) {                                                    \
        proj_sk_body<FP8, TT, U>(w, scales, bias, x, y, part, counters, n, k, ct, t,            \
                                 accumulate, xvec);                                              \
    }

// proj_sk_{fp8,bf16}_t{TT}: U tiles in flight per lane (8 up to two tokens, then 4).
PROJ_SK(proj_sk_fp8_t1, true, 1, 8)
PROJ_SK(proj_sk_fp8_t2, true, 2, 8)
PROJ_SK(proj_sk_fp8_t4, true, 4, 4)
PROJ_SK(proj_sk_fp8_t8, true, 8, 4)
PROJ_SK(proj_sk_fp8_t16, true, 16, 4)
PROJ_SK(proj_sk_bf16_t1, false, 1, 8)
PROJ_SK(proj_sk_bf16_t2, false, 2, 8)
PROJ_SK(proj_sk_bf16_t4, false, 4, 4)
PROJ_SK(proj_sk_bf16_t8, false, 8, 4)
PROJ_SK(proj_sk_bf16_t16, false, 16, 4)

// ---- bulk copy (TMA) pipeline ----------------------------------------------------------------
//
// proj_bulk_{fp8,bf16}_t{TT}_r{R}: a CTA owns row blocks of R row groups (16·R rows) over the
// whole K — blocks blockIdx.x, blockIdx.x + gridDim.x, ... — so each output row is summed inside
// one CTA (deterministic, no scratch, no atomics). The weights reach shared memory by
// `cp.async.bulk` (the copy engine; no registers held by loads in flight): one item = the next
// CH = PROJ_BULK_STAGE_TILES / R column tiles of each of the block's R groups (R contiguous runs
// of CH·512 bytes, one 16 KB stage), `stages` items in flight per CTA, completing on one mbarrier
// per stage. Thread 0 issues; all 8 warps consume: warp w takes the stage's column tiles w, w + 8,
// ... (one 16-byte vector per lane and group, conflict-free `ld.shared.v4`), decodes each weight
// vector once and applies it to all t ≤ TT tokens (the activations of a tile are loaded once for
// the R groups). After each item a CTA barrier frees the stage and thread 0 refills it with the
// item `stages` later (the next block's first chunks follow the current block's last, so the
// stream never drains between blocks). At a block's end the warps' row partials are summed
// through shared memory in warp order. FP8 scales: thread 0 prefetches a block's scale rows into
// L2 when it issues the block's first item; each warp loads its tiles' scales before waiting on
// the item's barrier.

__device__ __forceinline__ uint32_t smem_u32(const void* p) {
    return (uint32_t)__cvta_generic_to_shared(p);
}

__device__ __forceinline__ void mbar_init(uint64_t* b, uint32_t count) {
    asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;" ::"r"(smem_u32(b)), "r"(count)
                 : "memory");
}

__device__ __forceinline__ void mbar_expect_tx(uint64_t* b, uint32_t bytes) {
    asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" ::"r"(smem_u32(b)),
                 "r"(bytes)
                 : "memory");
}

__device__ __forceinline__ void mbar_wait(uint64_t* b, uint32_t parity) {
    asm volatile(
        "{\n\t.reg .pred P1;\n\t"
        "WAIT:\n\t"
        "mbarrier.try_wait.parity.shared::cta.b64 P1, [%0], %1;\n\t"
        "@P1 bra DONE;\n\t"
        "bra WAIT;\n\t"
        "DONE:\n\t}" ::"r"(smem_u32(b)),
        "r"(parity)
        : "memory");
}

// `bytes` (a multiple of 16; both addresses 16-byte aligned) from global to this CTA's shared
// memory, completing on `bar`.
__device__ __forceinline__ void bulk_copy(void* dst, const void* src, uint32_t bytes,
                                          uint64_t* bar) {
    asm volatile(
        "cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];" ::
            "r"(smem_u32(dst)),
        "l"(src), "r"(bytes), "r"(smem_u32(bar))
        : "memory");
}

__device__ __forceinline__ void prefetch_l2(const void* p) {
    asm volatile("prefetch.global.L2 [%0];" ::"l"(p));
}

// Shared memory of a bulk CTA: the barriers, then the reduction buffer [8 warps][R][TT][16] f32,
// then `stages` stages of 16 KB (128-byte aligned).
__host__ __device__ constexpr uint32_t bulk_red_offset() { return 8 * PROJ_BULK_MAX_STAGES; }
__host__ __device__ constexpr uint32_t bulk_stage_offset(int r, int tt) {
    return (bulk_red_offset() + (PROJ_BULK_THREADS / 32) * r * tt * 16 * 4 + 127) / 128 * 128;
}

template <bool FP8, int TT, int R>
__device__ __forceinline__ void proj_bulk_body(const uint8_t* __restrict__ w,
                                               const float* __restrict__ scales,
                                               const float* __restrict__ bias,
                                               const float* __restrict__ x, float* __restrict__ y,
                                               uint32_t n, uint32_t k, uint32_t ct, uint32_t t,
                                               uint32_t accumulate, uint32_t xvec,
                                               uint32_t stages) {
    constexpr int E = FP8 ? 16 : 8;            // values per lane per tile
    constexpr uint32_t KT = 2 * E;             // columns per tile
    constexpr int W = PROJ_BULK_THREADS / 32;  // warps
    constexpr uint32_t CH = PROJ_BULK_STAGE_TILES / R;  // column tiles per group per item
    constexpr int TPW = (CH + W - 1) / W;      // tiles per warp per item
    constexpr uint32_t STAGE = PROJ_BULK_STAGE_TILES * 512;
    extern __shared__ __align__(128) uint8_t smem[];
    uint64_t* full = reinterpret_cast<uint64_t*>(smem);
    float* red = reinterpret_cast<float*>(smem + bulk_red_offset());
    uint8_t* stage0 = smem + bulk_stage_offset(R, TT);

    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const uint32_t half = lane >> 4;
    const uint32_t groups = (n + 15) / 16, nblocks = (groups + R - 1) / R;
    const uint32_t nch = (ct + CH - 1) / CH;
    const uint32_t kb = (k + 127) / 128;
    const uint32_t myblocks =
        blockIdx.x < nblocks ? (nblocks - 1 - blockIdx.x) / gridDim.x + 1 : 0;
    const uint32_t items = myblocks * nch;

    // Item j: block blockIdx.x + (j / nch)·gridDim.x, column tiles [(j % nch)·CH, +CH) ∩ [0, ct).
    auto issue = [&](uint32_t j) {
        const uint32_t s = j % stages;
        const uint32_t bi = blockIdx.x + (j / nch) * gridDim.x, q = j % nch;
        const uint32_t c0 = q * CH, nt = min(CH, ct - c0);
        const uint32_t ng = min((uint32_t)R, groups - bi * R);
        mbar_expect_tx(full + s, ng * nt * 512);
        for (uint32_t r = 0; r < ng; ++r) {
            const size_t g = (size_t)bi * R + r;
            bulk_copy(stage0 + s * STAGE + r * CH * 512, w + (g * ct + c0) * 512, nt * 512,
                      full + s);
        }
        if (FP8 && q == 0) {
            const char* a = reinterpret_cast<const char*>(scales + (size_t)bi * R * kb);
            const uint32_t bytes = ng * kb * 4;
            for (uint32_t o = 0; o < bytes + 127; o += 128) prefetch_l2(a + min(o, bytes - 1));
        }
    };

    if (threadIdx.x == 0) {
        for (uint32_t s = 0; s < stages; ++s) mbar_init(full + s, 1);
        asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
        asm volatile("fence.proxy.async.shared::cta;" ::: "memory");
    }
    __syncthreads();
    // Weights only before pdl_begin (they do not depend on the predecessor).
    if (threadIdx.x == 0)
        for (uint32_t j = 0; j < min(stages, items); ++j) issue(j);
    pdl_begin();

    float acc[R][TT];
#pragma unroll
    for (int r = 0; r < R; ++r)
#pragma unroll
        for (int j = 0; j < TT; ++j) acc[r][j] = 0.f;

    for (uint32_t it = 0; it < items; ++it) {
        const uint32_t s = it % stages;
        const uint32_t bi = blockIdx.x + (it / nch) * gridDim.x, q = it % nch;
        const uint32_t c0 = q * CH, nt = min(CH, ct - c0);
        const uint32_t ng = min((uint32_t)R, groups - bi * R);
        float sc[TPW][R];
#pragma unroll
        for (int u = 0; u < TPW; ++u)
#pragma unroll
            for (int r = 0; r < R; ++r) {
                const uint32_t tl = warp + u * W;
                sc[u][r] = FP8 && tl < nt && (uint32_t)r < ng
                               ? __ldg(scales + ((size_t)bi * R + r) * kb + ((c0 + tl) * KT) / 128)
                               : 0.f;
            }
        // A warp's tiles past the item's last (tl ≥ nt) compute on the last one's weights and
        // activations (in bounds, finite) and add nothing: no branch before the loads.
        // One token: its activations are loaded before the barrier wait (they do not depend on
        // the stage), so the wait and the activations' L2 round trip overlap.
        float xpre[TT == 1 ? TPW : 1][E];
        if constexpr (TT == 1) {
#pragma unroll
            for (int u = 0; u < TPW; ++u) {
                const uint32_t tl = min(warp + u * W, nt - 1);
                load_x<E>(x, (c0 + tl) * KT + half * E, k, xvec, xpre[u]);
            }
        }
        mbar_wait(full + s, (it / stages) & 1);
        const uint4* st = reinterpret_cast<const uint4*>(stage0 + s * STAGE);
#pragma unroll
        for (int u = 0; u < TPW; ++u) {
            const bool valid = warp + u * W < nt;
            const uint32_t tl = min(warp + u * W, nt - 1);
            const uint32_t k0 = (c0 + tl) * KT + half * E;
            float wf[R][E];
#pragma unroll
            for (int r = 0; r < R; ++r) decode_vec<FP8>(st[(r * CH + tl) * 32 + lane], wf[r]);
#pragma unroll
            for (int j = 0; j < TT; ++j) {
                const uint32_t jj = min((uint32_t)j, t - 1);  // past t: computed, never stored
                float xv[E];
                if constexpr (TT == 1) {
#pragma unroll
                    for (int e = 0; e < E; ++e) xv[e] = xpre[u][e];
                } else {
                    load_x<E>(x + (size_t)jj * k, k0, k, xvec, xv);
                }
#pragma unroll
                for (int r = 0; r < R; ++r) {
                    const float d = dot_vec<E>(wf[r], xv);
                    // FP8: sc is 0 for invalid tiles; BF16: select.
                    acc[r][j] = FP8 ? fmaf(d, sc[u][r], acc[r][j]) : acc[r][j] + (valid ? d : 0.f);
                }
            }
        }
        __syncthreads();  // stage s consumed by every warp
        if (threadIdx.x == 0 && it + stages < items) issue(it + stages);
        if (q == nch - 1) {
            // Block bi done: the two halves of a row → lanes 0..15, then the warps in order.
#pragma unroll
            for (int r = 0; r < R; ++r)
#pragma unroll
                for (int j = 0; j < TT; ++j) {
                    const float v = acc[r][j] + __shfl_xor_sync(0xffffffffu, acc[r][j], 16);
                    if (lane < 16) red[((warp * R + r) * TT + j) * 16 + lane] = v;
                    acc[r][j] = 0.f;
                }
            __syncthreads();
            for (uint32_t i = threadIdx.x; i < (uint32_t)(R * TT * 16); i += PROJ_BULK_THREADS) {
                const uint32_t rl = i & 15, j = (i >> 4) % TT, r = (i >> 4) / TT;
                const uint32_t row = (bi * R + r) * 16 + rl;
                if (row >= n || j >= t) continue;
                float v = 0.f;
#pragma unroll
                for (int qw = 0; qw < W; ++qw) v += red[((qw * R + r) * TT + j) * 16 + rl];
                proj_store(y, bias, n, row, j, v, accumulate);
            }
            // red is rewritten only after the next item's barrier.
        }
    }
}

#define PROJ_BULK(NAME, FP8, TT, R)                                                             \
    extern "C" __global__ void __launch_bounds__(PROJ_BULK_THREADS, 1) NAME(                     \
        const uint8_t* __restrict__ w, const float* __restrict__ scales,                         \
        const float* __restrict__ bias, const float* __restrict__ x, float* __restrict__ y,      \
        uint32_t n, uint32_t k, uint32_t ct, uint32_t t, uint32_t accumulate, uint32_t xvec,     \
        uint32_t stages) {                                                                       \
        proj_bulk_body<FP8, TT, R>(w, scales, bias, x, y, n, k, ct, t, accumulate, xvec, stages); \
    }

#define PROJ_BULK_T(TT)                                    \
    PROJ_BULK(proj_bulk_fp8_t##TT##_r1, true, TT, 1)       \
    PROJ_BULK(proj_bulk_fp8_t##TT##_r2, true, TT, 2)       \
    PROJ_BULK(proj_bulk_fp8_t##TT##_r4, true, TT, 4)       \
    PROJ_BULK(proj_bulk_bf16_t##TT##_r1, false, TT, 1)     \
    PROJ_BULK(proj_bulk_bf16_t##TT##_r2, false, TT, 2)     \
    PROJ_BULK(proj_bulk_bf16_t##TT##_r4, false, TT, 4)

PROJ_BULK_T(1)
PROJ_BULK_T(2)
PROJ_BULK_T(4)
PROJ_BULK_T(8)
PROJ_BULK_T(16)
