// Attention tile bodies (flash-decoding: partials per key split, then a merge), shared by the
// standalone kernels (attention.cu: one block per (split, KV group, query)) and the persistent
// engine (persistent.cu: one tile per (KV group, split), the merge a phase of its own).
#pragma once
#include <stdint.h>
#include <float.h>

#include "common/abi.cuh"
#include "common/kv.cuh"
#include "common/reduce.cuh"
#include "common/tile.cuh"

#define ATT_THREADS 128

// The visible key positions [first, last] of query t.
__device__ __forceinline__ void visible_keys(uint64_t step0, uint32_t t, uint32_t t_count,
                                             uint32_t causal, uint32_t window, uint64_t* first,
                                             uint64_t* last) {
    const uint64_t pos = step0 + t;
    *last = causal ? pos : step0 + t_count - 1;
    *first = (window != 0 && pos + 1 > window) ? pos + 1 - window : 0;
}

// Key / value vectors per thread in flight, and most value dims one lane accumulates (the tile
// size ATT_TILE, most warps and most splits are limits shared with the host: common/abi.cuh).
#define ATT_LOADS 4  // key / value vectors per thread loaded before they are stored
#define ATT_MAX_VC (MAX_HEAD_DIM / 32)

// Row stride (floats) of the key tile in shared memory: padded so that lanes reading their own
// key's row with float4 loads hit distinct banks.
__host__ __device__ __forceinline__ uint32_t att_k_stride(uint32_t d) {
    return (d & 3) == 0 ? d + 4 : d + 1;
}

// Merges a head's softmax state with its sink: out = acc / (l + e^(sink)) in the shifted form
// of the CPU definition (`sink` = -inf: none). Returns the factor acc is multiplied with.
__device__ __forceinline__ float att_finish(float m, float l, float sink) {
    const float mx = fmaxf(m, sink);
    const float den = (sink == -INFINITY ? 0.f : expf(sink - mx)) + (m == -INFINITY ? 0.f : l * expf(m - mx));
    return den > 0.f ? (m == -INFINITY ? 0.f : expf(m - mx)) / den : 0.f;
}

// The value part of a head's merge (one warp): out[c] = Σ_i part_i[c] · factor[i] / den over the
// A splits, lane l holding dims l, l + 32, ... (VC of them), L splits' loads issued per batch
// (the same fma order per dim as one split at a time).
template <int VC, int L>
__device__ __forceinline__ void att_merge_values(const float* part, const float* factor, uint32_t A,
                                                 uint32_t dv, float den, float* out) {
    const uint32_t lane = threadIdx.x & 31;
    float a[VC];
#pragma unroll
    for (int c = 0; c < VC; ++c) a[c] = 0.f;
    for (uint32_t i0 = 0; i0 < A; i0 += L) {
        float pv[L][VC];
#pragma unroll
        for (int u = 0; u < L; ++u)
#pragma unroll
            for (int c = 0; c < VC; ++c) {
                const uint32_t i = i0 + u, dim = lane + 32 * c;
                pv[u][c] = i < A && dim < dv ? __ldcg(part + i * (dv + 2) + 2 + dim) : 0.f;
            }
#pragma unroll
        for (int u = 0; u < L; ++u)
            if (i0 + u < A)
#pragma unroll
                for (int c = 0; c < VC; ++c) a[c] = fmaf(pv[u][c], factor[i0 + u], a[c]);
    }
#pragma unroll
    for (int c = 0; c < VC; ++c)
        if (lane + 32 * c < dv) out[lane + 32 * c] = den > 0.f ? a[c] / den : 0.f;
}

// Decode / verify attention, one block per (key split s, KV group g, query t): the group's keys
// and values of split s stream once through shared memory in tiles of ATT_TILE and serve all
// G = nh / nkv query heads of the group (warp w takes heads w, w + W, ...). Lane j scores key j
// of a tile; lane i accumulates value dims i, i + 32, ....
//
// With S = 1 the block writes the output. Otherwise it writes each head's (m, l, acc[dv]) to
// scratch[MAX_TOKENS · nkv + ((t·nh + h)·S + s)·(dv + 2)] and the last block of (t, g) to finish
// merges the S partials and the sink (counters: the first MAX_TOKENS · nkv words of scratch,
// zero before the first launch, reset by each merge).
// grid (S, nkv, T), block 32 · W, dynamic shared memory att_smem_floats(d, dv, W) floats.
//
// attention_gqa_tile (below) is one such block for query row t; `resolve()` (called once
// the row's first query is in flight) gives the row's cache, its visible keys [first, last] and
// its key splits S ≤ `stride` = gridDim.x (blocks s ≥ S return at once; scratch partials are
// laid out with `stride` in place of S).
// The merge of a KV group's key splits (defined below the tile).
__device__ __forceinline__ void att_merge_group(const float* parts, uint32_t g, uint32_t t,
                                                uint32_t nh, uint32_t nkv, uint32_t dv,
                                                uint32_t stride, uint32_t A, const float* sinks,
                                                float* out);

// Key position p is read from k_cache / v_cache row kv_slot(p, capacity, blocks, block_size)
// (common/kv.cuh: contiguous without a block table, else through it).
struct AttKeys {
    const float* k_cache;
    const float* v_cache;
    const uint32_t* blocks;  // block table (common/kv.cuh), null: contiguous
    uint64_t first, last;
    uint32_t capacity, splits, block_size;
};

// attention_gqa_tile is that block's body at explicit coordinates (s, g, t); with MERGE false it
// stops after writing its partials (the persistent engine merges in a phase of its own,
// att_merge_group, with the same arithmetic).
template <bool MERGE, typename Resolve>
__device__ __forceinline__ void attention_gqa_tile(uint32_t s, uint32_t g, uint32_t t,
                                                   const float* q, uint32_t stride, uint32_t nh,
                                                   uint32_t nkv, uint32_t d, uint32_t dv,
                                                   float scale, const float* sinks,
                                                   float* scratch, float* out, Resolve resolve) {
    extern __shared__ float att_smem[];
    const uint32_t G = nh / nkv, W = blockDim.x / 32, w = threadIdx.x / 32, lane = threadIdx.x & 31;
    const uint32_t kst = att_k_stride(d);
    float* ks = att_smem;               // [ATT_TILE][kst]
    float* vs = ks + ATT_TILE * kst;    // [ATT_TILE][dv]
    float* qs = vs + ATT_TILE * dv;     // [W][d]
    // This warp's first query row goes into registers before the step is read: the two loads
    // are independent, so their round trips overlap (the row is stored to shared memory after
    // the first tile's loads are issued).
    float q_first[ATT_MAX_VC];
#pragma unroll
    for (int c = 0; c < ATT_MAX_VC; ++c) {
        const uint32_t i = lane + 32 * c;
        q_first[c] = w < G && i < d ? q[((size_t)t * nh + g * G + w) * d + i] : 0.f;
    }
    const AttKeys keys = resolve();
    const uint32_t S = keys.splits;
    if (s >= S) return;
    const float* k_cache = keys.k_cache;
    const float* v_cache = keys.v_cache;
    const uint32_t capacity = keys.capacity, block_size = keys.block_size;
    const uint32_t* blocks = keys.blocks;
    const uint64_t first = keys.first, last = keys.last;
    const uint64_t n = last + 1 - first;
    uint64_t chunk = (n + S - 1) / S;
    if (chunk < ATT_TILE) chunk = ATT_TILE;
    const uint64_t k0 = min(last + 1, first + (uint64_t)s * chunk);
    const uint64_t k1 = min(last + 1, k0 + chunk);
    const bool vec = (d & 3) == 0 && (dv & 3) == 0;
    const size_t kv_row = (size_t)nkv * d, vv_row = (size_t)nkv * dv;
    float* parts = scratch + (size_t)MAX_TOKENS * nkv;

    for (uint32_t hb = 0; hb < G; hb += W) {
        const uint32_t hl = hb + w;  // head of this warp within the group
        const bool active = hl < G;
        const uint32_t h = g * G + hl;
        __syncthreads();  // the previous pass is done with qs / the tiles
        if (active && hb > 0)
            for (uint32_t i = lane; i < d; i += 32) qs[w * d + i] = q[((size_t)t * nh + h) * d + i];
        float m = -INFINITY, l = 0.f, acc[ATT_MAX_VC];
#pragma unroll
        for (int c = 0; c < ATT_MAX_VC; ++c) acc[c] = 0.f;
        for (uint64_t kb = k0; kb < k1; kb += ATT_TILE) {
            const uint32_t nk = (uint32_t)min((uint64_t)ATT_TILE, k1 - kb);
            __syncthreads();  // the previous tile is consumed (and qs written)
            if (vec) {
                // ATT_LOADS key and value vectors per thread in flight before the first store.
                const uint32_t d4 = d / 4, v4 = dv / 4, nkd = nk * d4, nvd = nk * v4;
                for (uint32_t base = threadIdx.x; base < max(nkd, nvd); base += ATT_LOADS * blockDim.x) {
                    float4 kv[ATT_LOADS], vv[ATT_LOADS];
#pragma unroll
                    for (int u = 0; u < ATT_LOADS; ++u) {
                        const uint32_t idx = base + u * blockDim.x;
                        if (idx < nkd)
                            kv[u] = ld_act(reinterpret_cast<const float4*>(
                                              k_cache + kv_slot(kb + idx / d4, capacity, blocks, block_size) * kv_row + (size_t)g * d) +
                                          idx % d4);
                        if (idx < nvd)
                            vv[u] = ld_act(reinterpret_cast<const float4*>(
                                              v_cache + kv_slot(kb + idx / v4, capacity, blocks, block_size) * vv_row + (size_t)g * dv) +
                                          idx % v4);
                    }
#pragma unroll
                    for (int u = 0; u < ATT_LOADS; ++u) {
                        const uint32_t idx = base + u * blockDim.x;
                        if (idx < nkd) *reinterpret_cast<float4*>(ks + (idx / d4) * kst + 4 * (idx % d4)) = kv[u];
                        if (idx < nvd) *reinterpret_cast<float4*>(vs + (idx / v4) * dv + 4 * (idx % v4)) = vv[u];
                    }
                }
            } else {
                for (uint32_t idx = threadIdx.x; idx < nk * d; idx += blockDim.x) {
                    const uint32_t j = idx / d, i = idx % d;
                    ks[j * kst + i] = ld_act(k_cache + kv_slot(kb + j, capacity, blocks, block_size) * kv_row + (size_t)g * d + i);
                }
                for (uint32_t idx = threadIdx.x; idx < nk * dv; idx += blockDim.x) {
                    const uint32_t j = idx / dv, i = idx % dv;
                    vs[j * dv + i] = ld_act(v_cache + kv_slot(kb + j, capacity, blocks, block_size) * vv_row + (size_t)g * dv + i);
                }
            }
            if (hb == 0 && kb == k0 && active) {
#pragma unroll
                for (int c = 0; c < ATT_MAX_VC; ++c)
                    if (lane + 32 * c < d) qs[w * d + lane + 32 * c] = q_first[c];
            }
            __syncthreads();
            if (!active) continue;
            float sc = -INFINITY;
            if (lane < nk) {
                const float* kr = ks + lane * kst;
                const float* qr = qs + w * d;
                float d0 = 0.f, d1 = 0.f;
                if (vec) {
                    for (uint32_t i = 0; i < d; i += 4) {
                        const float4 a = *reinterpret_cast<const float4*>(kr + i);
                        const float4 b = *reinterpret_cast<const float4*>(qr + i);
                        d0 = fmaf(a.x, b.x, d0);
                        d1 = fmaf(a.y, b.y, d1);
                        d0 = fmaf(a.z, b.z, d0);
                        d1 = fmaf(a.w, b.w, d1);
                    }
                } else {
                    for (uint32_t i = 0; i < d; ++i) d0 = fmaf(kr[i], qr[i], d0);
                }
                sc = (d0 + d1) * scale;
            }
            const float m_new = fmaxf(m, warp_max(sc));
            const float alpha = m == -INFINITY ? 0.f : expf(m - m_new);
            const float p = lane < nk ? expf(sc - m_new) : 0.f;
            l = l * alpha + warp_sum(p);
#pragma unroll
            for (int c = 0; c < ATT_MAX_VC; ++c) acc[c] *= alpha;
            for (uint32_t jj = 0; jj < nk; ++jj) {
                const float pj = __shfl_sync(0xffffffffu, p, jj);
                const float* vr = vs + jj * dv;
#pragma unroll
                for (int c = 0; c < ATT_MAX_VC; ++c)
                    if (lane + 32 * c < dv) acc[c] = fmaf(pj, vr[lane + 32 * c], acc[c]);
            }
            m = m_new;
        }
        if (!active) continue;
        if (S == 1) {
            const float f = att_finish(m, l, sinks ? sinks[h] : -INFINITY);
            float* o = out + ((size_t)t * nh + h) * dv;
#pragma unroll
            for (int c = 0; c < ATT_MAX_VC; ++c)
                if (lane + 32 * c < dv) o[lane + 32 * c] = acc[c] * f;
        } else {
            float* part = parts + (((size_t)t * nh + h) * stride + s) * (dv + 2);
            if (lane == 0) {
                part[0] = m;
                part[1] = l;
            }
#pragma unroll
            for (int c = 0; c < ATT_MAX_VC; ++c)
                if (lane + 32 * c < dv) part[2 + lane + 32 * c] = acc[c];
        }
    }
    if (!MERGE || S == 1 || !last_block_done(reinterpret_cast<uint32_t*>(scratch) + t * nkv + g, S))
        return;
    att_merge_group(parts, g, t, nh, nkv, dv, stride, (uint32_t)min((uint64_t)S, (n + chunk - 1) / chunk),
                    sinks, out);
}

// The key range of split s of S over n visible keys starts at first + s · chunk.
__device__ __forceinline__ uint64_t att_chunk(uint64_t n, uint32_t S) {
    uint64_t chunk = (n + S - 1) / S;
    if (chunk < ATT_TILE) chunk = ATT_TILE;
    return chunk;
}

// Splits that hold keys (the others are empty by construction; the tile computes the same).
__device__ __forceinline__ uint32_t att_active_splits(uint64_t n, uint32_t S) {
    const uint64_t chunk = att_chunk(n, S);
    return (uint32_t)min((uint64_t)S, (n + chunk - 1) / chunk);
}

// Merges the A splits' partials of KV group g of query t (`parts` laid out with `stride` splits
// per head) and the sinks into `out`: warp w takes the group's heads w, w + W, ...; lane s < A
// holds split s's and s + 32's (m, l), and the per-split factors go through shared memory to the
// value loop (lane i: dims i, i + 32, ...).
__device__ __forceinline__ void att_merge_group(const float* parts, uint32_t g, uint32_t t,
                                                uint32_t nh, uint32_t nkv, uint32_t dv,
                                                uint32_t stride, uint32_t A, const float* sinks,
                                                float* out) {
    const uint32_t G = nh / nkv, W = blockDim.x / 32, w = threadIdx.x / 32, lane = threadIdx.x & 31;
    __shared__ float factor[ATT_MAX_WARPS][ATT_MAX_SPLITS];
    for (uint32_t hl = w; hl < G; hl += W) {
        const uint32_t h = g * G + hl;
        const float* part = parts + ((size_t)t * nh + h) * stride * (dv + 2);
        const float sink = sinks ? sinks[h] : -INFINITY;
        float ms[2], ls[2];
#pragma unroll
        for (int u = 0; u < 2; ++u) {
            const uint32_t sp = lane + 32 * u;
            ms[u] = sp < A ? __ldcg(part + sp * (dv + 2)) : -INFINITY;
            ls[u] = sp < A ? __ldcg(part + sp * (dv + 2) + 1) : 0.f;
        }
        const float mx = fmaxf(warp_max(fmaxf(ms[0], ms[1])), sink);
        float den_part = 0.f;
#pragma unroll
        for (int u = 0; u < 2; ++u) {
            const float f = ms[u] == -INFINITY ? 0.f : expf(ms[u] - mx);
            if (lane + 32 * u < A) factor[w][lane + 32 * u] = f;
            den_part += ls[u] * f;
        }
        const float den = warp_sum(den_part) + (sink == -INFINITY ? 0.f : expf(sink - mx));
        __syncwarp();
        if (dv <= 64) {
            att_merge_values<2, 16>(part, factor[w], A, dv, den, out + ((size_t)t * nh + h) * dv);
        } else if (dv <= 128) {
            att_merge_values<4, 8>(part, factor[w], A, dv, den, out + ((size_t)t * nh + h) * dv);
        } else {
            att_merge_values<ATT_MAX_VC, 4>(part, factor[w], A, dv, den, out + ((size_t)t * nh + h) * dv);
        }
        __syncwarp();
    }
}

