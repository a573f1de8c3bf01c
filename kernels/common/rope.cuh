// RoPE + KV-cache write tile bodies, shared by the standalone kernels (rope.cu) and the
// persistent engine (persistent.cu): the epilogue of the fused QKV projection (rope_at + rope_store, used
// by common/gemv.cuh's linear_vec with ROPE) and one head of one token (rope_kv_write_row).
#pragma once
#include <stdint.h>

#include "common/abi.cuh"
#include "common/kv.cuh"
#include "common/reduce.cuh"

// Where token t of a fused QKV projection goes: its position and its K / V rows in the cache
// (slot through the block table when there is one: common/kv.cuh). linear_vec_warp resolves it
// before the weight stream, so the step counter's and the block table's loads are off the tail
// of every warp (they cost the decode's qkv_rope_kv 0.5 µs a launch when made in the epilogue).
struct RopeAt {
    uint64_t pos;
    float* k;  // row of the position's slot: k_cache + slot · nkv · d
    float* v;  // v_cache + slot · nkv · dv
};

__device__ __forceinline__ RopeAt rope_at_kv(const RopeOut& ro, uint64_t pos, float* k_cache,
                                             float* v_cache, uint32_t capacity,
                                             const uint32_t* blocks, uint32_t block_size) {
    const uint64_t slot = kv_slot(pos, capacity, blocks, block_size);
    return RopeAt{pos, k_cache + slot * ro.nkv * ro.d, v_cache + slot * ro.nkv * ro.dv};
}

// Token t at position step[0] + t of the RopeOut's cache.
__device__ __forceinline__ RopeAt rope_at(const RopeOut& ro, uint32_t t) {
    return rope_at_kv(ro, (uint64_t)ro.step[0] + t, ro.k_cache, ro.v_cache, ro.capacity, ro.blocks,
                      ro.block_size);
}

// Row t at its own position in its own cache (batched decode: rr.rows[t]).
__device__ __forceinline__ RopeAt rope_at(const RopeOutRows& rr, uint32_t t) {
    const KvRow& r = rr.rows[t];
    return rope_at_kv(rr.ro, r.pos, r.k_cache, r.v_cache, r.capacity, r.blocks, r.block_size);
}

__device__ __forceinline__ const RopeOut& rope_out(const RopeOut& ro) { return ro; }
__device__ __forceinline__ const RopeOut& rope_out(const RopeOutRows& rr) { return rr.ro; }

// Stores rows (row0, row0 + 1) of token t of a rope-pair-ordered QKV projection (row0 even):
// q into q_out, k and v into the cache rows of `at` (rope_at).
__device__ __forceinline__ void rope_store(const RopeOut& ro, const RopeAt& at, uint32_t row0,
                                           uint32_t n, uint32_t t, float v0, float v1) {
    const uint64_t pos = at.pos;
    const uint32_t qrows = ro.nh * ro.d, krows = ro.nkv * ro.d;
    if (row0 < qrows + krows) {
        const bool is_q = row0 < qrows;
        const uint32_t base = is_q ? row0 : row0 - qrows;
        const uint32_t head = base / ro.d, l = base % ro.d;
        float* dst = is_q ? ro.q_out + ((size_t)t * ro.nh + head) * ro.d : at.k + (size_t)head * ro.d;
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
        at.v[(size_t)g * ro.dv + i] = __fmul_rn(vals[r], ro.value_scale);
    }
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

