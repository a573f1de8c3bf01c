// MXFP4 device helpers and the routed-experts tile body, shared by the standalone kernels
// (mxfp4.cu: moe_mx_*) and the persistent engine (persistent.cu: expert gate/up and down tiles).
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>

#include "common/abi.cuh"
#include "common/pdl.cuh"
#include "common/tile.cuh"

// ---------------------------------------------------------------------------------------------
// Decode helpers
// ---------------------------------------------------------------------------------------------

// E2M1 code (low 4 bits of `n`) placed into an f32 as value * 2^-126: sign -> bit 31,
// exponent/mantissa bits -> bits 24..22 (E=00 lands on an f32 subnormal, which is exact).
__device__ __forceinline__ float e2m1_raw_f32(uint32_t n) {
    return __uint_as_float(((n & 0x7u) << 22) | ((n & 0x8u) << 28));
}

// E8M0 byte -> f32 scale. s = 0 is 2^-127 (an f32 subnormal); 0xFF is NaN (the dequantize
// kernels keep that; the GEMV never sees 0xFF because uploads reject NaN scales).
__device__ __forceinline__ float e8m0_to_f32(uint32_t s) {
    if (s == 0xFFu) return __uint_as_float(0x7FC00000u);
    if (s == 0u) return __uint_as_float(0x00400000u);
    return __uint_as_float(s << 23);
}
__device__ __forceinline__ float e8m0_finite_to_f32(uint32_t s) {
    return s ? __uint_as_float(s << 23) : __uint_as_float(0x00400000u);
}

// Scales 8 consecutive values (one quarter of a 32-value block; the block's 4 quarters are held by
// 4 adjacent lanes, 4-aligned) as described above. Every lane of the warp must call it (the block
// maximum is reduced with shuffles). Returns the fp16 pairs [x0,x4],[x1,x5],[x2,x6],[x3,x7] of
// x·2^-e and sets `factor` = 2^(e+14).
__device__ __forceinline__ uint4 prep_eight(const float (&v)[8], float& factor) {
    float amax = 0.f;
#pragma unroll
    for (int i = 0; i < 8; ++i) amax = fmaxf(amax, fabsf(v[i]));
    amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, 1));
    amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, 2));
    int e = 0;
    if (amax > 0.f && amax <= 3.0e38f) {
        int ex;
        frexpf(amax, &ex);  // amax = m * 2^ex, m in [0.5, 1): floor(log2 amax) = ex - 1
        e = ex - 1 - 14;
    }
    uint32_t u[4];
#pragma unroll
    for (int i = 0; i < 4; ++i) {  // pair i = (x_i, x_{i+4})
        const uint32_t lo = __half_as_ushort(__float2half_rn(ldexpf(v[i], -e)));
        const uint32_t hi = __half_as_ushort(__float2half_rn(ldexpf(v[i + 4], -e)));
        u[i] = lo | (hi << 16);
    }
    factor = ldexpf(1.0f, e + 14);
    return make_uint4(u[0], u[1], u[2], u[3]);
}

__device__ __forceinline__ void mma_16816(float (&d)[4], uint32_t a0, uint32_t a1, uint32_t a2,
                                          uint32_t a3, uint32_t b0, uint32_t b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
        "{%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}

__device__ __forceinline__ void decode_word(uint32_t w, uint32_t (&p)[4]) {
    p[0] = ((w << 9) & 0x0E000E00u) | ((w << 12) & 0x80008000u);
    p[1] = ((w << 5) & 0x0E000E00u) | ((w << 8) & 0x80008000u);
    p[2] = ((w << 1) & 0x0E000E00u) | ((w << 4) & 0x80008000u);
    p[3] = ((w >> 3) & 0x0E000E00u) | (w & 0x80008000u);
}


// ---------------------------------------------------------------------------------------------
// Routed experts (crates/tilert/src/moe.rs): one launch per projection of a MoE block over T <= 16
// tokens with top-k routing. ids[T*k] (entry e = t*k + j: slot j of token t) names the expert of
// every entry. The grid is (distinct-expert slot, row block): slot a is the a-th distinct valid
// expert id in ascending order, found by each CTA from the ids table (no host involvement, so
// the launch is graph-capturable); CTAs whose slot has no expert exit at once. A CTA runs ALL
// the entries routed to its expert, so each distinct expert's weights are read once.
//
//   gate_up (GLU): out[e][j] = glu(W[ids[e]] row 2j . x[e / x_div] + b[2j],
//                                  W[ids[e]] row 2j+1 . x[e / x_div] + b[2j+1])   out [n_ids, rows/2]
//   down:          out[e][r] = route_w[e] * (W[ids[e]] row r . x[e / x_div] + b[r]) out [n_ids, rows]
//
// Entries whose id is outside 0..n_experts get NaN outputs (written by the slot-0 CTAs).
// ---------------------------------------------------------------------------------------------

// MoeParams and the limits MOE_MAX_IDS, MOE_MAX_EXPERT_WORDS, MOE_MAX_WARPS: common/abi.cuh.

// model::cpu::ops::{clamped_swiglu, swiglu}, same operation order.
__device__ __forceinline__ float moe_glu(const MoeParams& p, float gate, float up) {
    if (p.glu == 0) {
        const float g = fminf(gate, p.limit);
        const float u = fminf(fmaxf(up, -p.limit), p.limit);
        return (u + 1.0f) * (g * (1.0f / (1.0f + expf(-(g * p.alpha)))));
    }
    return (gate * (1.0f / (1.0f + expf(-gate)))) * up;
}

struct MoeSlot {
    uint32_t bitmap[MOE_MAX_EXPERT_WORDS];
    int32_t ids[MOE_MAX_IDS];
    int32_t entries[MOE_MAX_IDS];  // the entries routed to `expert`, ascending
    int32_t expert;                // -1: this slot has no expert
    uint32_t n_entries;
};

// Every thread calls; ends with __syncthreads.
__device__ void moe_find_slot(const MoeParams& p, uint32_t slot, MoeSlot& s) {
    const uint32_t words = (p.n_experts + 31) / 32;
    for (uint32_t i = threadIdx.x; i < words; i += blockDim.x) s.bitmap[i] = 0;
    __syncthreads();
    for (uint32_t i = threadIdx.x; i < p.n_ids; i += blockDim.x) {
        const int32_t e = p.ids[i];
        s.ids[i] = e;
        if (e >= 0 && (uint32_t)e < p.n_experts) atomicOr(&s.bitmap[e / 32], 1u << (e % 32));
    }
    __syncthreads();
    if (threadIdx.x < 32) {
        const uint32_t lane = threadIdx.x;
        if (lane == 0) {
            int32_t expert = -1;
            uint32_t left = slot;
            for (uint32_t w = 0; w < words; ++w) {
                uint32_t b = s.bitmap[w];
                const uint32_t c = __popc(b);
                if (left < c) {
                    for (uint32_t j = 0; j < left; ++j) b &= b - 1;  // drop the lowest `left` bits
                    expert = (int32_t)(w * 32 + __ffs(b) - 1);
                    break;
                }
                left -= c;
            }
            s.expert = expert;
        }
        __syncwarp();
        const int32_t expert = s.expert;
        uint32_t n = 0;
        for (uint32_t base = 0; base < p.n_ids; base += 32) {
            const uint32_t i = base + lane;
            const bool m = expert >= 0 && i < p.n_ids && s.ids[i] == expert;
            const uint32_t bal = __ballot_sync(0xffffffffu, m);
            if (m) s.entries[n + __popc(bal & ((1u << lane) - 1))] = (int32_t)i;
            n += __popc(bal);
        }
        if (lane == 0) s.n_entries = n;
    }
    __syncthreads();
}

// Slot-0 CTAs: NaN outputs of rows [r0, r1) for entries with an invalid expert id.
template <bool GLU>
__device__ void moe_nan_invalid(const MoeParams& p, const MoeSlot& s, uint32_t r0, uint32_t r1) {
    const float nan = __uint_as_float(0x7FC00000u);
    const uint32_t per = GLU ? (r1 - r0) / 2 : r1 - r0;
    const uint32_t width = GLU ? p.rows / 2 : p.rows;
    const uint32_t first = GLU ? r0 / 2 : r0;
    for (uint32_t i = threadIdx.x; i < p.n_ids * per; i += blockDim.x) {
        const uint32_t e = i / per;
        const int32_t id = s.ids[e];
        if (id < 0 || (uint32_t)id >= p.n_experts) p.out[(uint64_t)e * width + first + i % per] = nan;
    }
}

// The epilogue of one output row pair / row: bias, GLU or routing weight, store.
template <bool GLU>
__device__ __forceinline__ void moe_store(const MoeParams& p, int32_t expert, uint32_t entry,
                                          uint32_t row, float v0, float v1) {
    const float* b = p.bias ? p.bias + (uint64_t)expert * p.rows : nullptr;
    if (GLU) {  // row even: (gate, up) = rows (row, row + 1)
        const float gate = v0 + (b ? b[row] : 0.f), up = v1 + (b ? b[row + 1] : 0.f);
        p.out[(uint64_t)entry * (p.rows / 2) + row / 2] = moe_glu(p, gate, up);
    } else {
        p.out[(uint64_t)entry * p.rows + row] = p.route_w[entry] * (v0 + (b ? b[row] : 0.f));
    }
}

// ---- MXFP4 experts on the tensor cores ----------------------------------------------------------
//
// The tile loop of mxfp4_gemv extended to token pairs: B of an mma holds two tokens' activations,
// block-diagonally (column c < 4: token 2p, block c; column 4 + c: token 2p+1, block c), so D
// columns 0..3 (lanes t < 2) are token 2p's per-block partial sums and columns 4..7 (lanes t >= 2)
// token 2p+1's. A tile's weights are decoded once for all token pairs.
//
// A CTA covers `row_groups` consecutive 16-row groups of one expert. Their tiles are contiguous in
// the tiled layout (item i = group i / n_tiles, K tile i % n_tiles), and warp w streams items
// w, w + W, w + 2W, ... with the next item's codes and scales in flight while it computes one;
// when its next item is in another group it writes its partial sums of the finished group to
// shared memory. Entries run in chunks of 2*NP; each chunk's activations are prepared (prep_eight:
// per-32-block power-of-two scaling to fp16, pair order) into shared memory by the whole CTA, so
// no separate prep launch is needed, and serve all of the CTA's row groups.
// Dynamic shared memory: [2NP][K_pad + 8] halves, [2NP][K_pad/32] factors,
// [row_groups][warps][2NP][16] partial sums.

__host__ __device__ constexpr uint32_t moe_xs_stride(uint32_t k_pad) { return k_pad + 8; }

// moe_mx_tile is the CTA of distinct-expert slot `slot` whose row groups start at g0 (a multiple
// of p.row_groups); `s` holds moe_find_slot(p, slot). The CTA's items are dealt to `vw` warps
// (the standalone kernels: its real warps); a block of fewer real warps runs virtual warps
// w, w + real, ... one after another with the same items, partial sums and warp-order epilogue,
// so its results are the bits of a vw-warp CTA (the persistent engine's 8-warp blocks stand in
// for the 16-warp CTAs of the decode gate/up). Shared memory: partial sums for vw warps.
// VIRT false (the standalone kernels) compiles the one-pass form, vw = the real warps: the
// virtual-warp loop costs the standalone kernels registers and 3-4 % of a verify(8) pass.
template <int NP, bool GLU, bool VIRT>
__device__ void moe_mx_tile(const MoeParams& p, uint32_t slot, uint32_t g0, const MoeSlot& s,
                            uint32_t vw_arg) {
    extern __shared__ __align__(16) uint8_t moe_smem[];
    constexpr uint32_t CH = 2 * NP;
    const uint32_t groups = (p.rows + 15) / 16;
    const uint32_t n_groups = min(p.row_groups, groups - g0);
    const uint32_t r0 = g0 * 16, r1 = min(p.rows, (g0 + n_groups) * 16);
    if (slot == 0) moe_nan_invalid<GLU>(p, s, r0, r1);
    const int32_t expert = s.expert;
    if (expert < 0) return;

    const uint32_t warp = threadIdx.x / 32, n_warps = blockDim.x / 32;
    const uint32_t vw = VIRT ? vw_arg : n_warps;
    const uint32_t lane = threadIdx.x % 32, g = lane / 4, t = lane % 4, tb = t & 1;
    const uint32_t nb = p.k / 32, n_tiles = (nb + 3) / 4, k_pad = n_tiles * 128;
    const uint32_t n_items = n_groups * n_tiles;
    const uint32_t xs_stride = moe_xs_stride(k_pad), xf_stride = k_pad / 32;
    __half* xs = reinterpret_cast<__half*>(moe_smem);
    float* xfs = reinterpret_cast<float*>(moe_smem + (size_t)CH * xs_stride * 2);
    float* partial = xfs + CH * xf_stride;  // [n_groups][vw][CH][16]

    const uint64_t tile0 = ((uint64_t)expert * groups + g0) * n_tiles;
    const uint4* code_lane = reinterpret_cast<const uint4*>(p.w) + tile0 * 64 + g * 4 + t;
    const uint16_t* scale_lane =
        reinterpret_cast<const uint16_t*>(p.scales + tile0 * 64 + 2 * tb) + g * 2;
    struct Tile {
        uint4 wl, wh;   // codes of this lane's block, rows g and g+8
        uint32_t s[2];  // scale bytes of blocks 2tb, 2tb+1 of rows g and g+8
    };
    auto load = [&](uint32_t item, Tile& T) {
        const uint4* c = code_lane + (uint64_t)item * 64;
        T.wl = __ldcs(c);
        T.wh = __ldcs(c + 32);
        const uint16_t* sp = scale_lane + (uint64_t)item * 32;
        T.s[0] = sp[0];
        T.s[1] = sp[16];
    };

    for (uint32_t c0 = 0; c0 < s.n_entries; c0 += CH) {
        const uint32_t nt = min(CH, s.n_entries - c0);
        Tile cur, nxt;
        cur.s[0] = cur.s[1] = nxt.s[0] = nxt.s[1] = 0;
        if (warp < n_items) load(warp, cur);  // in flight during the activation prep

        // Activations of entries c0 .. c0+nt -> shared memory (K padding -> zeros). Each thread
        // issues the loads of up to 2 groups before converting them.
        const uint32_t gpr = k_pad / 8, total = nt * gpr;  // gpr is a multiple of 16
        const uint32_t total_up = (total + 31) & ~31u, bd = blockDim.x;
        for (uint32_t base = threadIdx.x; base < total_up; base += 2 * bd) {
            float v[2][8];
#pragma unroll
            for (int u = 0; u < 2; ++u) {
                const uint32_t i = base + u * bd;
                const uint32_t tok = i / gpr, gi = i % gpr;
#pragma unroll
                for (int j = 0; j < 8; ++j) v[u][j] = 0.f;
                if (i < total && gi * 8 < p.k) {
                    const uint32_t row = (uint32_t)s.entries[c0 + tok] / p.x_div;
                    const float4* xp =
                        reinterpret_cast<const float4*>(p.x + (uint64_t)row * p.k + gi * 8);
                    const float4 a = ld_act(xp), b = ld_act(xp + 1);
                    v[u][0] = a.x; v[u][1] = a.y; v[u][2] = a.z; v[u][3] = a.w;
                    v[u][4] = b.x; v[u][5] = b.y; v[u][6] = b.z; v[u][7] = b.w;
                }
            }
#pragma unroll
            for (int u = 0; u < 2; ++u) {
                const uint32_t i = base + u * bd;
                if (i >= total_up) break;  // warp-uniform
                float factor;
                const uint4 packed = prep_eight(v[u], factor);
                if (i < total) {
                    const uint32_t tok = i / gpr, gi = i % gpr;
                    *reinterpret_cast<uint4*>(xs + tok * xs_stride + gi * 8) = packed;
                    if ((gi & 3) == 0) xfs[tok * xf_stride + gi / 4] = factor;
                }
            }
        }
        for (uint32_t i = threadIdx.x; i < n_groups * vw * CH * 16; i += bd) partial[i] = 0.f;
        __syncthreads();

        const uint32_t passes = !VIRT ? 1 : warp < vw ? (vw - warp + n_warps - 1) / n_warps : 0;
        for (uint32_t pass = 0; pass < passes; ++pass) {
        const uint32_t vwarp = warp + pass * n_warps;
        if (pass > 0 && vwarp < n_items) load(vwarp, cur);
        float acc[NP][2];
#pragma unroll
        for (int pp = 0; pp < NP; ++pp) acc[pp][0] = acc[pp][1] = 0.f;
        for (uint32_t item = vwarp; item < n_items; item += vw) {
            const uint32_t next = item + vw;
            if (next < n_items) load(next, nxt);
            const uint32_t gl = item / n_tiles, tile = item - gl * n_tiles;
            uint32_t pl[4][4], ph[4][4];
            const uint32_t wlo[4] = {cur.wl.x, cur.wl.y, cur.wl.z, cur.wl.w};
            const uint32_t whi[4] = {cur.wh.x, cur.wh.y, cur.wh.z, cur.wh.w};
#pragma unroll
            for (int q = 0; q < 4; ++q) {
                decode_word(wlo[q], pl[q]);
                decode_word(whi[q], ph[q]);
            }
            float sc[2][2];
#pragma unroll
            for (int j = 0; j < 2; ++j) {
                sc[0][j] = e8m0_finite_to_f32((cur.s[0] >> (8 * j)) & 0xFF);
                sc[1][j] = e8m0_finite_to_f32((cur.s[1] >> (8 * j)) & 0xFF);
            }
#pragma unroll
            for (int pp = 0; pp < NP; ++pp) {
                if (2 * pp >= nt) break;  // CTA-uniform
                // This lane feeds B column g: token 2pp (g == t) or 2pp+1 (g == t+4), block t.
                const uint32_t tok = g == t ? 2 * pp : (g == t + 4 ? 2 * pp + 1 : CH);
                uint4 xv[4];
#pragma unroll
                for (int q = 0; q < 4; ++q) xv[q] = make_uint4(0, 0, 0, 0);
                if (tok < nt) {
                    const uint4* xp =
                        reinterpret_cast<const uint4*>(xs + tok * xs_stride + (tile * 4 + t) * 32);
#pragma unroll
                    for (int q = 0; q < 4; ++q) xv[q] = xp[q];
                }
                float d[4] = {0.f, 0.f, 0.f, 0.f};
#pragma unroll
                for (int q = 0; q < 4; ++q) {
                    mma_16816(d, pl[q][0], ph[q][0], pl[q][1], ph[q][1], xv[q].x, xv[q].y);
                    mma_16816(d, pl[q][2], ph[q][2], pl[q][3], ph[q][3], xv[q].z, xv[q].w);
                }
                // d[0], d[1]: row g, blocks 2tb, 2tb+1 of token mt; d[2], d[3]: row g+8.
                const uint32_t mt = 2 * pp + (t >> 1);
                if (mt < nt) {
                    const float2 f =
                        *reinterpret_cast<const float2*>(xfs + mt * xf_stride + tile * 4 + 2 * tb);
                    acc[pp][0] += d[0] * (sc[0][0] * f.x);
                    acc[pp][0] += d[1] * (sc[0][1] * f.y);
                    acc[pp][1] += d[2] * (sc[1][0] * f.x);
                    acc[pp][1] += d[3] * (sc[1][1] * f.y);
                }
            }
            if (next >= n_items || next / n_tiles != gl) {  // warp-uniform: flush group gl
#pragma unroll
                for (int pp = 0; pp < NP; ++pp) {
                    acc[pp][0] += __shfl_xor_sync(0xffffffffu, acc[pp][0], 1);
                    acc[pp][1] += __shfl_xor_sync(0xffffffffu, acc[pp][1], 1);
                    const uint32_t mt = 2 * pp + (t >> 1);
                    if (tb == 0 && mt < nt) {
                        float* dst = partial + ((gl * vw + vwarp) * CH + mt) * 16;
                        dst[g] = acc[pp][0];
                        dst[g + 8] = acc[pp][1];
                    }
                    acc[pp][0] = acc[pp][1] = 0.f;
                }
            }
            cur = nxt;
        }
        }  // virtual warps
        __syncthreads();

        // Epilogue: sum the warps of each row group (in warp order), bias, GLU / weight, store.
        constexpr uint32_t PER = GLU ? 8 : 16;  // outputs per (row group, entry)
        const uint32_t items = n_groups * PER * nt;
        for (uint32_t i = threadIdx.x; i < items; i += bd) {
            const uint32_t gl = i / (PER * nt), rem = i % (PER * nt);
            const uint32_t tok = rem / PER, o = rem % PER;
            const uint32_t lr = GLU ? 2 * o : o;  // row within the group
            const uint32_t row = (g0 + gl) * 16 + lr;
            if (row >= p.rows) continue;
            float v0 = 0.f, v1 = 0.f;
            for (uint32_t w = 0; w < vw; ++w) {
                const float* src = partial + ((gl * vw + w) * CH + tok) * 16;
                v0 += src[lr];
                if (GLU) v1 += src[lr + 1];
            }
            moe_store<GLU>(p, expert, (uint32_t)s.entries[c0 + tok], row, v0, v1);
        }
        __syncthreads();  // the next chunk reuses the shared buffers
    }
}

// The standalone kernels' CTA: grid.x = slots × ceil(groups / row_groups).
template <int NP, bool GLU>
__device__ void moe_mx_body(const MoeParams& p) {
    __shared__ MoeSlot s;
    pdl_begin();
    const uint32_t groups = (p.rows + 15) / 16;
    const uint32_t ctas_per_slot = (groups + p.row_groups - 1) / p.row_groups;
    const uint32_t slot = blockIdx.x / ctas_per_slot;
    moe_find_slot(p, slot, s);
    moe_mx_tile<NP, GLU, false>(p, slot, (blockIdx.x % ctas_per_slot) * p.row_groups, s, 0);
}

