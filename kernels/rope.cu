// RoPE + KV-cache write: rope_kv_write (q/k norm, RoPE, k and v into the cache), the fused QKV
// projection with RoPE and the KV write (linear_qkv_rope_*), and their batched-decode variants
// that take each row's cache and position from a KvRow table (rope_kv_write_rows,
// linear_qkv_rope_rows_*).
//
// Launched by crates/tilert/src/ops.rs (`Ops::rope_kv_write`, `Ops::linear_qkv_rope`) and
// crates/tilert/src/ops/rows.rs (`RowOps`).
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
#include "common/reduce.cuh"
#include "common/rope.cuh"
#include "common/gemv.cuh"

// The QKV projection of rope-pair-ordered weights with RoPE and the KV write fused in
// (replaces linear + rope_kv_write for layers without q/k norm). Two rows per warp.
#define LINEAR_QKV_ROPE(NAME, BF, TT, U)                                                        \
    extern "C" __global__ void __launch_bounds__(LINEAR_THREADS) NAME(                           \
        const void* __restrict__ w, const float* __restrict__ bias, const float* __restrict__ x, \
        uint32_t n, uint32_t k, uint32_t t, RopeOut ro) {                                        \
        linear_vec<BF, TT, 2, U, true>(w, bias, x, nullptr, n, k, t, 0, 0, &ro);                 \
    }
LINEAR_QKV_ROPE(linear_qkv_rope_bf16_t1, true, 1, 4)
LINEAR_QKV_ROPE(linear_qkv_rope_bf16_t2, true, 2, 2)
LINEAR_QKV_ROPE(linear_qkv_rope_bf16_t4, true, 4, 2)
LINEAR_QKV_ROPE(linear_qkv_rope_bf16_t8, true, 8, 1)
LINEAR_QKV_ROPE(linear_qkv_rope_bf16_t16, true, 16, 1)
LINEAR_QKV_ROPE(linear_qkv_rope_f32_t1, false, 1, 4)
LINEAR_QKV_ROPE(linear_qkv_rope_f32_t2, false, 2, 2)
LINEAR_QKV_ROPE(linear_qkv_rope_f32_t4, false, 4, 2)
LINEAR_QKV_ROPE(linear_qkv_rope_f32_t8, false, 8, 1)
LINEAR_QKV_ROPE(linear_qkv_rope_f32_t16, false, 16, 1)

// The batched-decode variant: k and v of row t into rows[t]'s cache at rows[t].pos.
#define LINEAR_QKV_ROPE_ROWS(NAME, BF, TT, U)                                                   \
    extern "C" __global__ void __launch_bounds__(LINEAR_THREADS) NAME(                           \
        const void* __restrict__ w, const float* __restrict__ bias, const float* __restrict__ x, \
        uint32_t n, uint32_t k, uint32_t t, RopeOutRows rr) {                                    \
        linear_vec<BF, TT, 2, U, true, RopeOutRows>(w, bias, x, nullptr, n, k, t, 0, 0, &rr);    \
    }
LINEAR_QKV_ROPE_ROWS(linear_qkv_rope_rows_bf16_t1, true, 1, 4)
LINEAR_QKV_ROPE_ROWS(linear_qkv_rope_rows_bf16_t2, true, 2, 2)
LINEAR_QKV_ROPE_ROWS(linear_qkv_rope_rows_bf16_t4, true, 4, 2)
LINEAR_QKV_ROPE_ROWS(linear_qkv_rope_rows_bf16_t8, true, 8, 1)
LINEAR_QKV_ROPE_ROWS(linear_qkv_rope_rows_bf16_t16, true, 16, 1)
LINEAR_QKV_ROPE_ROWS(linear_qkv_rope_rows_f32_t1, false, 1, 4)
LINEAR_QKV_ROPE_ROWS(linear_qkv_rope_rows_f32_t2, false, 2, 2)
LINEAR_QKV_ROPE_ROWS(linear_qkv_rope_rows_f32_t4, false, 4, 2)
LINEAR_QKV_ROPE_ROWS(linear_qkv_rope_rows_f32_t8, false, 8, 1)
LINEAR_QKV_ROPE_ROWS(linear_qkv_rope_rows_f32_t16, false, 16, 1)

extern "C" __global__ void rope_kv_write(const float* qkv, const uint32_t* step, uint32_t nh,
                                         uint32_t nkv, uint32_t d, uint32_t dv, uint32_t rot,
                                         const float* inv_freq, float attn_factor,
                                         const float* q_norm, const float* k_norm, float eps,
                                         float value_scale, float* q_out, float* k_cache,
                                         float* v_cache, uint32_t capacity,
                                         const uint32_t* blocks, uint32_t block_size) {
    pdl_begin();
    const uint32_t t = blockIdx.y;
    rope_kv_write_row(blockIdx.x, qkv, (uint64_t)step[0] + t, t, nh, nkv, d, dv, rot, inv_freq, attn_factor,
                      q_norm, k_norm, eps, value_scale, q_out, k_cache, v_cache, capacity, blocks,
                      block_size);
}

// rope_kv_write with row t's position and cache from rows[t]. grid (n_heads + 2·n_kv, T).
extern "C" __global__ void rope_kv_write_rows(const float* qkv, const KvRow* rows, uint32_t nh,
                                              uint32_t nkv, uint32_t d, uint32_t dv, uint32_t rot,
                                              const float* inv_freq, float attn_factor,
                                              const float* q_norm, const float* k_norm,
                                              float eps, float value_scale, float* q_out) {
    pdl_begin();
    const uint32_t t = blockIdx.y;
    const KvRow r = rows[t];
    rope_kv_write_row(blockIdx.x, qkv, r.pos, t, nh, nkv, d, dv, rot, inv_freq, attn_factor, q_norm, k_norm,
                      eps, value_scale, q_out, r.k_cache, r.v_cache, r.capacity, r.blocks,
                      r.block_size);
}
