// MXFP4 (OCP microscaling: E2M1 codes, one E8M0 scale per 32 values along K) kernels.
//
// Weights: stacked experts repacked at upload from the gpt-oss checkpoint layout
//   (blocks [E, N, K/32, 16], byte j: element 2j low nibble, 2j+1 high; scales [E, N, K/32],
//   value 2^(s-127), 0xFF = NaN) into the tiled layout of crates/fp4/src/tiled.rs: 16-row x
//   4-block tiles, each 1 KiB of codes in the GEMV's lane order plus 64 scale bytes.
//
// Kernels (all extern "C", launched from crates/fp4/src/cuda.rs):
//   mxfp4_dequant_f32 / _bf16   tiled -> natural [E, N, K]; one thread per 8 values; exact
//                               (values past the f32 range -> inf)
//   mxfp4_prep_act_f32 / _bf16  activations -> per-32-block power-of-two-scaled fp16, permuted for
//                               the GEMV's mma fragments (exact for bf16 inputs)
//   mxfp4_gemv                  y[s, n] = sum_k W[expert[s]][n][k] * x[s][k], batch 1, tensor cores
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>

#include "common/abi.cuh"    // MoeParams, GEMV_MAX_WARPS, MOE_MAX_*
#include "common/fill.cuh"   // splitmix64
#include "common/pdl.cuh"    // pdl_begin
#include "common/mxfp4.cuh"  // decode helpers, prep_eight, the routed-experts tile

// ---------------------------------------------------------------------------------------------
// Dequantize: one thread per 4 code bytes (8 values). Output index = row * K + k.
// ---------------------------------------------------------------------------------------------

// The product e2m1_raw * (scale * 2^126) is exact except where the true value is outside the f32
// range (|value| >= 2^128 -> inf). Note: 2^126 * scale itself may overflow for s >= 129 even though
// the product would fit, so multiply in the other order for large scales.
__device__ __forceinline__ float dequant_one(uint32_t n, uint32_t s) {
    const float raw = e2m1_raw_f32(n);
    const float sc = e8m0_to_f32(s);
    return (raw * 0x1p126f) * sc;  // raw * 2^126 is the exact E2M1 value
}

// Tiled weight layout (crates/fp4/src/tiled.rs): tiles of 16 rows x 4 blocks, [expert][row group]
// [K tile]; a tile is 1 KiB of codes in lane order (rows 0..7 then 8..15, each [g][t]) and 64 scale
// bytes [row][t]. Returns the u32-word index of word q (0..3) of block b of `row`, and the scale
// byte index.
struct TiledIndex {
    uint64_t word, scale;
};
__device__ __forceinline__ TiledIndex tiled_index(uint32_t e, uint32_t row, uint32_t b, uint32_t q,
                                                  uint32_t groups, uint32_t k_tiles) {
    const uint64_t tile = ((uint64_t)e * groups + row / 16) * k_tiles + b / 4;
    const uint32_t r16 = row % 16, t = b % 4;
    const uint32_t slot = (r16 / 8) * 32 + (r16 % 8) * 4 + t;
    return {tile * 256 + slot * 4 + q, tile * 64 + r16 * 4 + t};
}

// One thread per 8 output values (one u32 of codes); out is [E, N, K] in natural order.
template <typename Store>
__device__ __forceinline__ void dequant_tiled(const uint8_t* __restrict__ blocks,
                                              const uint8_t* __restrict__ scales, uint32_t E,
                                              uint32_t N, uint32_t K, Store store) {
    const uint32_t words_per_row = K / 8, nb = K / 32;
    const uint32_t groups = (N + 15) / 16, k_tiles = (nb + 3) / 4;
    const uint64_t n_words = (uint64_t)E * N * words_per_row;
    for (uint64_t w = blockIdx.x * (uint64_t)blockDim.x + threadIdx.x; w < n_words;
         w += (uint64_t)gridDim.x * blockDim.x) {
        const uint64_t row_all = w / words_per_row;
        const uint32_t in_row = (uint32_t)(w % words_per_row);
        const uint32_t e = (uint32_t)(row_all / N), row = (uint32_t)(row_all % N);
        const TiledIndex ix = tiled_index(e, row, in_row / 4, in_row % 4, groups, k_tiles);
        const uint32_t code = reinterpret_cast<const uint32_t*>(blocks)[ix.word];
        store(w * 8, code, (uint32_t)scales[ix.scale]);
    }
}

extern "C" __global__ void mxfp4_dequant_f32(const uint8_t* __restrict__ blocks,
                                             const uint8_t* __restrict__ scales, uint32_t E,
                                             uint32_t N, uint32_t K, float* __restrict__ out) {
    dequant_tiled(blocks, scales, E, N, K, [&](uint64_t o, uint32_t w, uint32_t s) {
        float v[8];
#pragma unroll
        for (int i = 0; i < 8; ++i) v[i] = dequant_one(w >> (4 * i), s);
        float4* p = reinterpret_cast<float4*>(out + o);
        p[0] = make_float4(v[0], v[1], v[2], v[3]);
        p[1] = make_float4(v[4], v[5], v[6], v[7]);
    });
}

extern "C" __global__ void mxfp4_dequant_bf16(const uint8_t* __restrict__ blocks,
                                              const uint8_t* __restrict__ scales, uint32_t E,
                                              uint32_t N, uint32_t K,
                                              __nv_bfloat16* __restrict__ out) {
    dequant_tiled(blocks, scales, E, N, K, [&](uint64_t o, uint32_t w, uint32_t s) {
        uint32_t packed[4];
#pragma unroll
        for (int i = 0; i < 4; ++i) {
            // E2M1 values times a power of two have <= 2 significant bits: bf16 holds them exactly.
            __nv_bfloat162 p = __floats2bfloat162_rn(dequant_one(w >> (8 * i), s),
                                                     dequant_one(w >> (8 * i + 4), s));
            packed[i] = *reinterpret_cast<uint32_t*>(&p);
        }
        *reinterpret_cast<uint4*>(out + o) = make_uint4(packed[0], packed[1], packed[2], packed[3]);
    });
}

// ---------------------------------------------------------------------------------------------
// Activation prep for the GEMV.
//
// For each 32-value block b of each activation row: e = floor(log2(amax)) - 14 (0 for an all-zero
// block), xh = fp16(x * 2^-e) — |xh| < 2^15, so it fits fp16 with 11 significant bits (exact for
// bf16 inputs) — and xf[b] = 2^e * 2^14 (the 2^14 undoes the weight decode's 2^-14, see below).
// Each group of 8 values [x0..x7] is stored as [x0,x4,x1,x5,x2,x6,x3,x7]: the pairs the GEMV's
// weight decode produces from one 32-bit word of codes.
// One thread per 8 values; the 4 threads of a block are adjacent lanes.
// ---------------------------------------------------------------------------------------------

// Group `group` (8 values) of a [rows, K] activation; rows are written K_pad apart (K_pad = K
// rounded up to the GEMV's 128-value tile; the padding stays zero).
template <typename Load>
__device__ __forceinline__ void prep_group(uint64_t group, uint32_t K, uint32_t K_pad, Load load,
                                           __half* __restrict__ xh, float* __restrict__ xf,
                                           bool active) {
    float v[8];
#pragma unroll
    for (int i = 0; i < 8; ++i) v[i] = active ? load(group * 8 + i) : 0.f;
    float factor;
    const uint4 packed = prep_eight(v, factor);
    if (!active) return;
    const uint64_t row = group / (K / 8), in_row = group % (K / 8);
    const uint64_t out = row * K_pad + in_row * 8;
    *reinterpret_cast<uint4*>(xh + out) = packed;
    if ((in_row & 3) == 0) xf[out / 32] = factor;
}

// x is [rows, K]; xh is [rows, K_pad] halves, xf [rows, K_pad/32] (zero-initialised padding).
extern "C" __global__ void mxfp4_prep_act_f32(const float* __restrict__ x, uint32_t rows,
                                              uint32_t K, uint32_t K_pad, __half* __restrict__ xh,
                                              float* __restrict__ xf) {
    const uint64_t n_groups = (uint64_t)rows * K / 8;
    // Round the loop bound up to whole warps so the shuffles see every lane.
    const uint64_t stride = (uint64_t)gridDim.x * blockDim.x;
    for (uint64_t g = blockIdx.x * (uint64_t)blockDim.x + threadIdx.x; g < ((n_groups + 31) & ~31ull);
         g += stride) {
        prep_group(g, K, K_pad, [&](uint64_t i) { return x[i]; }, xh, xf, g < n_groups);
    }
}

extern "C" __global__ void mxfp4_prep_act_bf16(const __nv_bfloat16* __restrict__ x, uint32_t rows,
                                               uint32_t K, uint32_t K_pad,
                                               __half* __restrict__ xh, float* __restrict__ xf) {
    const uint64_t n_groups = (uint64_t)rows * K / 8;
    const uint64_t stride = (uint64_t)gridDim.x * blockDim.x;
    for (uint64_t g = blockIdx.x * (uint64_t)blockDim.x + threadIdx.x; g < ((n_groups + 31) & ~31ull);
         g += stride) {
        prep_group(g, K, K_pad, [&](uint64_t i) { return __bfloat162float(x[i]); }, xh, xf,
                   g < n_groups);
    }
}

// ---------------------------------------------------------------------------------------------
// GEMV, batch 1, on the tensor cores (mma.sync m16n8k16, fp16 operands, f32 accumulation).
//
// Weight decode: an E2M1 code placed into an fp16 as value * 2^-14 (sign -> bit 15, EEM -> bits
// 11..9); one 32-bit word w of codes (elements e0..e7) gives four half2 with shifts and masks:
//   (e0,e4) = (w<<9 & 0x0E000E00) | (w<<12 & 0x80008000)
//   (e1,e5) = (w<<5 & 0x0E000E00) | (w<<8  & 0x80008000)
//   (e2,e6) = (w<<1 & 0x0E000E00) | (w<<4  & 0x80008000)
//   (e3,e7) = (w>>3 & 0x0E000E00) | (w     & 0x80008000)
// The activations were stored in that pair order by the prep kernel.
//
// Tile: a warp takes 16 rows x 4 blocks (128 values of K). Lane (g = lane/4, t = lane%4) loads
// block t of rows g and g+8 (16 bytes each). In each of the 8 mmas of the tile the A k-slots of
// lane t come from its own block t; B is block-diagonal: column c holds block c's activations, so
// D[row][c] is the partial dot product of `row` with block c alone, and the per-(row, block)
// scale is applied to D afterwards. Only lanes with g == t supply nonzero B values.
// Warps of a CTA split the K tiles of one 16-row group; the CTA reduces through shared memory.
// ---------------------------------------------------------------------------------------------


// grid.x = n_slots * ceil(N / 16); blockDim.x = 32 * W (W <= 16).
// expert_ids[s] selects the expert of slot s; the prepared activation of slot s is xh + s*x_stride
// and its factors xf + s*x_stride/32 (x_stride = K_pad per slot, or 0: one activation shared by all
// slots). y is [n_slots, N].
extern "C" __global__ void __launch_bounds__(32 * GEMV_MAX_WARPS)
    mxfp4_gemv(const uint8_t* __restrict__ blocks, const uint8_t* __restrict__ scales,
               const int32_t* __restrict__ expert_ids, uint32_t n_experts, uint32_t N, uint32_t K,
               const __half* __restrict__ xh, const float* __restrict__ xf, uint32_t x_stride,
               float* __restrict__ y) {
    __shared__ float partial[GEMV_MAX_WARPS][16];
    const uint32_t groups = (N + 15) / 16;
    const uint32_t slot = blockIdx.x / groups;
    const uint32_t row0 = (blockIdx.x % groups) * 16;
    const int32_t expert = expert_ids[slot];
    const uint32_t nb = K / 32;
    const uint32_t warp = threadIdx.x / 32, n_warps = blockDim.x / 32;
    const uint32_t lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
    const bool expert_ok = expert >= 0 && (uint32_t)expert < n_experts;

    const uint32_t n_tiles = (nb + 3) / 4;
    // First tile of this CTA's 16-row group in the tiled layout (padding rows/blocks are zero).
    const uint64_t tile0 = ((uint64_t)(expert_ok ? expert : 0) * groups + row0 / 16) * n_tiles;
    // Prepared activations are padded to whole tiles (zeros), so no K bound checks below.
    const __half* xs = xh + (uint64_t)slot * x_stride;
    const float* xfs = xf + (uint64_t)slot * (x_stride / 32);

    // Everything one K tile needs, loaded one tile ahead of its use (software pipelining), so
    // the code bytes, scale bytes and activations of the next tile are in flight while the
    // tensor cores work on this one.
    struct Tile {
        uint4 wl, wh;   // codes of this lane's block, rows g and g+8
        uint4 xv[4];    // activations of this lane's block (lanes with g == t; others stay 0)
        uint32_t s[2];  // scale bytes (2t, 2t+1) of rows g and g+8, as u16 (lanes t < 2)
        float xf[2];    // activation block factors of blocks 2t, 2t+1 (lanes t < 2)
    };
    const uint4* code_lane = reinterpret_cast<const uint4*>(blocks) + tile0 * 64 + g * 4 + t;
    const uint16_t* scale_lane =
        reinterpret_cast<const uint16_t*>(scales + tile0 * 64 + 2 * t) + g * 2;
    auto load = [&](uint32_t tile, Tile& T) {
        const uint4* c = code_lane + (uint64_t)tile * 64;  // 1 KiB per tile
        T.wl = __ldcs(c);       // rows 0..7: 512 contiguous bytes per warp
        T.wh = __ldcs(c + 32);  // rows 8..15
        if (g == t) {
            const uint4* xp = reinterpret_cast<const uint4*>(xs + (uint64_t)(tile * 4 + t) * 32);
#pragma unroll
            for (int q = 0; q < 4; ++q) T.xv[q] = xp[q];
        }
        if (t < 2) {
            const uint16_t* sp = scale_lane + (uint64_t)tile * 32;
            T.s[0] = sp[0];       // row g
            T.s[1] = sp[8 * 2];   // row g + 8
            T.xf[0] = xfs[tile * 4 + 2 * t];
            T.xf[1] = xfs[tile * 4 + 2 * t + 1];
        }
    };

    float acc_lo = 0.f, acc_hi = 0.f;
    Tile cur, nxt;
#pragma unroll
    for (int q = 0; q < 4; ++q) cur.xv[q] = nxt.xv[q] = make_uint4(0, 0, 0, 0);
    cur.s[0] = cur.s[1] = nxt.s[0] = nxt.s[1] = 0;
    cur.xf[0] = cur.xf[1] = nxt.xf[0] = nxt.xf[1] = 0.f;
    if (warp < n_tiles && expert_ok) load(warp, cur);
    for (uint32_t tile = warp; expert_ok && tile < n_tiles; tile += n_warps) {
        if (tile + n_warps < n_tiles) load(tile + n_warps, nxt);
        float d[4] = {0.f, 0.f, 0.f, 0.f};
        const uint32_t wlo[4] = {cur.wl.x, cur.wl.y, cur.wl.z, cur.wl.w};
        const uint32_t whi[4] = {cur.wh.x, cur.wh.y, cur.wh.z, cur.wh.w};
#pragma unroll
        for (int q = 0; q < 4; ++q) {
            uint32_t pl[4], ph[4];
            decode_word(wlo[q], pl);
            decode_word(whi[q], ph);
            mma_16816(d, pl[0], ph[0], pl[1], ph[1], cur.xv[q].x, cur.xv[q].y);
            mma_16816(d, pl[2], ph[2], pl[3], ph[3], cur.xv[q].z, cur.xv[q].w);
        }
        // d[0], d[1]: row g, blocks tile*4 + 2t, +1; d[2], d[3]: row g+8. Lanes t >= 2 hold
        // zeros. Padding blocks have zero codes and zero activation factors.
        if (t < 2) {
#pragma unroll
            for (int j = 0; j < 2; ++j) {
                acc_lo += d[j] * (e8m0_finite_to_f32((cur.s[0] >> (8 * j)) & 0xFF) * cur.xf[j]);
                acc_hi += d[2 + j] * (e8m0_finite_to_f32((cur.s[1] >> (8 * j)) & 0xFF) * cur.xf[j]);
            }
        }
        cur = nxt;
    }
    acc_lo += __shfl_xor_sync(0xffffffffu, acc_lo, 1);
    acc_hi += __shfl_xor_sync(0xffffffffu, acc_hi, 1);
    if (t == 0) {
        partial[warp][g] = acc_lo;
        partial[warp][g + 8] = acc_hi;
    }
    __syncthreads();
    if (threadIdx.x < 16) {
        float s = 0.f;
        for (uint32_t w = 0; w < n_warps; ++w) s += partial[w][threadIdx.x];
        const uint32_t r = row0 + threadIdx.x;
        if (r < N) y[(uint64_t)slot * N + r] = expert_ok ? s : __uint_as_float(0x7FC00000u);
    }
}

// Register caps (64 K per SM): 1 token pair keeps 32 warps resident, 2 pairs 25, 4 pairs 21.
#define MOE_MX_KERNEL(NP, REGS)                                                                 \
    extern "C" __global__ void __maxnreg__(REGS)                                                \
        moe_mx_gate_up_np##NP(MoeParams p) {                                                    \
        moe_mx_body<NP, true>(p);                                                               \
    }                                                                                           \
    extern "C" __global__ void __maxnreg__(REGS)                                                \
        moe_mx_down_np##NP(MoeParams p) {                                                       \
        moe_mx_body<NP, false>(p);                                                              \
    }
MOE_MX_KERNEL(1, 64)
MOE_MX_KERNEL(2, 80)
MOE_MX_KERNEL(4, 96)

// ---- Dense experts (bf16 or f32 weights) on the CUDA cores ----------------------------------------
//
// Warp w of a CTA computes rows (2w', 2w'+1) of its expert (w' = CTA row block * warps + w) for C
// entries at a time: lane l multiplies elements l*8 .. l*8+7 of every 256-element chunk of K with
// f32 FMAs (weights and activations exact in f32), then a 5-level butterfly sums the lanes. K must
// be a multiple of 8. For gate_up the two rows are a (gate, up) pair.

__device__ __forceinline__ void moe_load8(const __nv_bfloat16* p, float (&v)[8]) {
    const uint4 u = __ldcs(reinterpret_cast<const uint4*>(p));
    const uint32_t w[4] = {u.x, u.y, u.z, u.w};
#pragma unroll
    for (int i = 0; i < 4; ++i) {
        v[2 * i] = __uint_as_float(w[i] << 16);
        v[2 * i + 1] = __uint_as_float(w[i] & 0xFFFF0000u);
    }
}
__device__ __forceinline__ void moe_load8(const float* p, float (&v)[8]) {
    const float4 a = __ldcs(reinterpret_cast<const float4*>(p)),
                 b = __ldcs(reinterpret_cast<const float4*>(p) + 1);
    v[0] = a.x; v[1] = a.y; v[2] = a.z; v[3] = a.w;
    v[4] = b.x; v[5] = b.y; v[6] = b.z; v[7] = b.w;
}

template <typename W, int C, bool GLU>
__device__ void moe_dense_body(const MoeParams& p) {
    __shared__ MoeSlot s;
    pdl_begin();
    const uint32_t n_warps = blockDim.x / 32, warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const uint32_t rows_per_cta = 2 * n_warps;
    const uint32_t ctas_per_slot = (p.rows + rows_per_cta - 1) / rows_per_cta;
    const uint32_t slot = blockIdx.x / ctas_per_slot;
    const uint32_t r0 = (blockIdx.x % ctas_per_slot) * rows_per_cta;
    moe_find_slot(p, slot, s);
    if (slot == 0) moe_nan_invalid<GLU>(p, s, r0, min(p.rows, r0 + rows_per_cta));
    const int32_t expert = s.expert;
    const uint32_t row = r0 + 2 * warp;
    if (expert < 0 || row >= p.rows) return;
    const bool two = row + 1 < p.rows;
    const W* w0 = reinterpret_cast<const W*>(p.w) + ((uint64_t)expert * p.rows + row) * p.k;
    const W* w1 = two ? w0 + p.k : w0;
    for (uint32_t c0 = 0; c0 < s.n_entries; c0 += C) {
        const uint32_t nt = min((uint32_t)C, s.n_entries - c0);
        const float* xr[C];
#pragma unroll
        for (int c = 0; c < C; ++c)
            xr[c] = p.x + (uint64_t)((uint32_t)s.entries[c0 + min((uint32_t)c, nt - 1)] / p.x_div) * p.k;
        float acc[2][C];
#pragma unroll
        for (int c = 0; c < C; ++c) acc[0][c] = acc[1][c] = 0.f;
        for (uint32_t kk = lane * 8; kk < p.k; kk += 256) {
            float a[8], b[8];
            moe_load8(w0 + kk, a);
            moe_load8(w1 + kk, b);
#pragma unroll
            for (int c = 0; c < C; ++c) {
                if ((uint32_t)c >= nt) break;
                const float4 x0 = __ldg(reinterpret_cast<const float4*>(xr[c] + kk)),
                             x1 = __ldg(reinterpret_cast<const float4*>(xr[c] + kk) + 1);
                const float x[8] = {x0.x, x0.y, x0.z, x0.w, x1.x, x1.y, x1.z, x1.w};
#pragma unroll
                for (int i = 0; i < 8; ++i) {
                    acc[0][c] = fmaf(a[i], x[i], acc[0][c]);
                    acc[1][c] = fmaf(b[i], x[i], acc[1][c]);
                }
            }
        }
#pragma unroll
        for (int c = 0; c < C; ++c) {
#pragma unroll
            for (int m = 16; m >= 1; m /= 2) {
                acc[0][c] += __shfl_xor_sync(0xffffffffu, acc[0][c], m);
                acc[1][c] += __shfl_xor_sync(0xffffffffu, acc[1][c], m);
            }
        }
        if (lane == 0) {
#pragma unroll
            for (int c = 0; c < C; ++c) {
                if ((uint32_t)c >= nt) break;
                const uint32_t entry = (uint32_t)s.entries[c0 + c];
                if (GLU) {
                    moe_store<true>(p, expert, entry, row, acc[0][c], acc[1][c]);
                } else {
                    moe_store<false>(p, expert, entry, row, acc[0][c], 0.f);
                    if (two) moe_store<false>(p, expert, entry, row + 1, acc[1][c], 0.f);
                }
            }
        }
    }
}

#define MOE_DENSE_KERNEL(NAME, W, C)                                                            \
    extern "C" __global__ void __launch_bounds__(32 * MOE_MAX_WARPS)                            \
        moe_dense_gate_up_##NAME##_c##C(MoeParams p) {                                          \
        moe_dense_body<W, C, true>(p);                                                          \
    }                                                                                           \
    extern "C" __global__ void __launch_bounds__(32 * MOE_MAX_WARPS)                            \
        moe_dense_down_##NAME##_c##C(MoeParams p) {                                             \
        moe_dense_body<W, C, false>(p);                                                         \
    }
MOE_DENSE_KERNEL(bf16, __nv_bfloat16, 1)
MOE_DENSE_KERNEL(bf16, __nv_bfloat16, 4)
MOE_DENSE_KERNEL(f32, float, 1)
MOE_DENSE_KERNEL(f32, float, 4)

// ---- Synthetic weights ---------------------------------------------------------------------------

// p[i] = lo + hash(seed, i) % span (bytes), grid-stride, 8 bytes per hash.
extern "C" __global__ void moe_fill_bytes(uint8_t* __restrict__ p, uint64_t n, uint64_t seed,
                                          uint32_t lo, uint32_t span) {
    const uint64_t stride = (uint64_t)gridDim.x * blockDim.x;
    for (uint64_t i = blockIdx.x * (uint64_t)blockDim.x + threadIdx.x; i * 8 < n; i += stride) {
        const uint64_t r = splitmix64(seed ^ (i * 0xD1B54A32D192ED03ull));
#pragma unroll
        for (int j = 0; j < 8; ++j) {
            const uint64_t k = i * 8 + j;
            if (k < n) p[k] = (uint8_t)(lo + ((r >> (8 * j)) & 0xFF) % span);
        }
    }
}

// p[i] uniform in [-scale, scale), grid-stride.
extern "C" __global__ void moe_fill_f32(float* __restrict__ p, uint64_t n, uint64_t seed,
                                        float scale) {
    const uint64_t stride = (uint64_t)gridDim.x * blockDim.x;
    for (uint64_t i = blockIdx.x * (uint64_t)blockDim.x + threadIdx.x; i < n; i += stride) {
        const uint64_t r = splitmix64(seed ^ (i * 0xD1B54A32D192ED03ull));
        const float u = (float)(r >> 40) * 0x1p-24f;  // [0, 1)
        p[i] = (2.0f * u - 1.0f) * scale;
    }
}
