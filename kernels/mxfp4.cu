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
    float amax = 0.f;
#pragma unroll
    for (int i = 0; i < 8; ++i) {
        v[i] = active ? load(group * 8 + i) : 0.f;
        amax = fmaxf(amax, fabsf(v[i]));
    }
    amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, 1));
    amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, 2));
    if (!active) return;
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
    const uint64_t row = group / (K / 8), in_row = group % (K / 8);
    const uint64_t out = row * K_pad + in_row * 8;
    *reinterpret_cast<uint4*>(xh + out) = make_uint4(u[0], u[1], u[2], u[3]);
    if ((in_row & 3) == 0) xf[out / 32] = ldexpf(1.0f, e + 14);
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

constexpr int GEMV_MAX_WARPS = 16;

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
