// RoPE + KV-cache write tile bodies, shared by the standalone kernels (rope.cu) and the
// persistent engine (persistent.cu): the epilogue of the fused QKV projection (rope_store*, used
// by common/gemv.cuh's linear_vec with ROPE) and one head of one token (rope_kv_write_row).
#pragma once
#include <stdint.h>

#include "common/abi.cuh"
#include "common/kv.cuh"
#include "common/reduce.cuh"

// Stores rows (row0, row0 + 1) of token t of a rope-pair-ordered QKV projection (row0 even),
// the token at position `pos`, its k and v into `k_cache` / `v_cache` of `capacity` slots
// (through the block table `blocks` when not null: common/kv.cuh).
__device__ __forceinline__ void rope_store_kv(const RopeOut& ro, uint64_t pos, float* k_cache,
                                              float* v_cache, uint32_t capacity,
                                              const uint32_t* blocks, uint32_t block_size,
                                              uint32_t row0, uint32_t n, uint32_t t, float v0,
                                              float v1) {
    const uint64_t slot = kv_slot(pos, capacity, blocks, block_size);
    const uint32_t qrows = ro.nh * ro.d, krows = ro.nkv * ro.d;
    if (row0 < qrows + krows) {
        const bool is_q = row0 < qrows;
        const uint32_t base = is_q ? row0 : row0 - qrows;
        const uint32_t head = base / ro.d, l = base % ro.d;
        float* dst = is_q ? ro.q_out + ((size_t)t * ro.nh + head) * ro.d
                          : k_cache + (slot * ro.nkv + head) * ro.d;
        if (l < ro.rot) {
            const uint32_t half = ro.rot / 2, f = l / 2;
            const double a = (double)__fmul_rn(ro.inv_freq[f], (float)pos);
            const float c = __fmul_rn((float)cos(a), ro.attn_factor);
            const float s = __fmul_rn((float)sin(a), ro.attn_factor);
            dst[f] = __fsub_rn(__fmul_rn(v0, c), __fmul_rn(v1, s));
            dst[f + half] = __fadd_rn(__fmul_rn(v1, c), __fmul_rn(v0, s));
        } else {
            dst[l] = v0;
            dst[l + 1] = v1;
        }
        return;
    }
    const float vals[2] = {v0, v1};
#pragma unroll
    for (int r = 0; r < 2; ++r) {
        const uint32_t row = row0 + r;
        if (row >= n) break;
        const uint32_t idx = row - qrows - krows, g = idx / ro.dv, i = idx % ro.dv;
        v_cache[(slot * ro.nkv + g) * ro.dv + i] = __fmul_rn(vals[r], ro.value_scale);
    }
}

// rope_store_kv at position step[0] + t into the RopeOut's cache.
__device__ __forceinline__ void rope_store(const RopeOut& ro, uint32_t row0, uint32_t n,
                                           uint32_t t, float v0, float v1) {
    rope_store_kv(ro, (uint64_t)ro.step[0] + t, ro.k_cache, ro.v_cache, ro.capacity, ro.blocks,
                  ro.block_size, row0, n, t,
                  v0, v1);
}

// rope_store_kv at row t's position into row t's own cache (batched decode: rr.rows[t]).
__device__ __forceinline__ void rope_store(const RopeOutRows& rr, uint32_t row0, uint32_t n,
                                           uint32_t t, float v0, float v1) {
    const KvRow& r = rr.rows[t];
    rope_store_kv(rr.ro, r.pos, r.k_cache, r.v_cache, r.capacity, r.blocks, r.block_size, row0, n,
                  t, v0, v1);
}

// grid (n_heads + 2·n_kv, T), block 128. Block (h, t): q head h, k head h − n_heads, or v head
// h − n_heads − n_kv of token t.
// Block (hh, t) of rope_kv_write for the token of row t at position `pos`.
__device__ __forceinline__ void rope_kv_write_row(uint32_t hh, const float* qkv, uint64_t pos, uint32_t t,
                                                  uint32_t nh, uint32_t nkv, uint32_t d,
                                                  uint32_t dv, uint32_t rot,
                                                  const float* inv_freq, float attn_factor,
                                                  const float* q_norm, const float* k_norm,
                                                  float eps, float value_scale, float* q_out,
                                                  float* k_cache, float* v_cache,
                                                  uint32_t capacity, const uint32_t* blocks,
                                                  uint32_t block_size) {
    __shared__ float xs[MAX_HEAD_DIM];
    __shared__ float red[32];
    const uint64_t slot = kv_slot(pos, capacity, blocks, block_size);
    const size_t row_w = (size_t)nh * d + (size_t)nkv * d + (size_t)nkv * dv;
    const float* row = qkv + t * row_w;
    if (hh >= nh + nkv) {  // value head
        const uint32_t g = hh - nh - nkv;
        const float* src = row + (size_t)nh * d + (size_t)nkv * d + (size_t)g * dv;
        float* dst = v_cache + (slot * nkv + g) * dv;
        for (uint32_t i = threadIdx.x; i < dv; i += blockDim.x) dst[i] = __fmul_rn(src[i], value_scale);
        return;
    }
    const bool is_q = hh < nh;
    const uint32_t head = is_q ? hh : hh - nh;
    const float* src = row + (is_q ? (size_t)head * d : (size_t)nh * d + (size_t)head * d);
    const float* nw = is_q ? q_norm : k_norm;
    for (uint32_t i = threadIdx.x; i < d; i += blockDim.x) xs[i] = src[i];
    __syncthreads();
    if (nw) {
        float ss = 0.f;
        for (uint32_t i = threadIdx.x; i < d; i += blockDim.x) ss = fmaf(xs[i], xs[i], ss);
        ss = block_sum(ss, red);
        const float r = 1.0f / sqrtf(ss / (float)d + eps);
        for (uint32_t i = threadIdx.x; i < d; i += blockDim.x) xs[i] = __fmul_rn(nw[i], __fmul_rn(xs[i], r));
        __syncthreads();
    }
    float* dst = is_q ? q_out + (size_t)t * nh * d + (size_t)head * d
                      : k_cache + (slot * nkv + head) * d;
    const uint32_t half = rot / 2;
    const float p = (float)pos;
    for (uint32_t i = threadIdx.x; i < d; i += blockDim.x) {
        float v;
        if (i < 2 * half) {
            const uint32_t f = i < half ? i : i - half;
            const double a = (double)__fmul_rn(inv_freq[f], p);
            const float c = __fmul_rn((float)cos(a), attn_factor);
            const float s = __fmul_rn((float)sin(a), attn_factor);
            const float x1 = xs[f], x2 = xs[f + half];
            v = i < half ? __fsub_rn(__fmul_rn(x1, c), __fmul_rn(x2, s))
                         : __fadd_rn(__fmul_rn(x2, c), __fmul_rn(x1, s));
        } else {
            v = xs[i];
        }
        dst[i] = v;
    }
}

