// Attention (flash-decoding: partials per key split, then a combine): attention_gqa for a pass
// of T tokens of one sequence, attention_gqa_rows for a batched decode pass (each row its own
// cache, position and key splits from a KvRow table).
//
// Launched by crates/tilert/src/ops.rs (`Ops::attention`) and crates/tilert/src/ops/rows.rs
// (`RowOps::attention`).
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
#include "common/attention.cuh"

extern "C" __global__ void __launch_bounds__(32 * ATT_MAX_WARPS)
    attention_gqa(const float* q, const float* k_cache, const float* v_cache,
                  const uint32_t* blocks, uint32_t block_size, const uint32_t* step,
                  uint32_t t_count, uint32_t nh, uint32_t nkv, uint32_t d, uint32_t dv,
                  uint32_t capacity, uint32_t window, uint32_t causal, float scale,
                  const float* sinks, float* scratch, float* out) {
    pdl_begin();
    attention_gqa_tile<true>(blockIdx.x, blockIdx.y, blockIdx.z, q, gridDim.x, nh, nkv, d, dv, scale, sinks, scratch, out, [&]() {
        AttKeys k{k_cache, v_cache, blocks, 0, 0, capacity, gridDim.x, block_size};
        visible_keys(step[0], blockIdx.z, t_count, causal, window, &k.first, &k.last);
        return k;
    });
}

// Causal decode attention of row t's one query (position rows[t].pos) over its own cache, cut
// into rows[t].splits key splits (≤ gridDim.x): exactly the blocks attention_gqa runs for that
// sequence's one-token pass. grid (max splits, nkv, T); scratch as attention_gqa's.
extern "C" __global__ void __launch_bounds__(32 * ATT_MAX_WARPS)
    attention_gqa_rows(const float* q, const KvRow* rows, uint32_t nh, uint32_t nkv, uint32_t d,
                       uint32_t dv, uint32_t window, float scale, const float* sinks,
                       float* scratch, float* out) {
    pdl_begin();
    attention_gqa_tile<true>(blockIdx.x, blockIdx.y, blockIdx.z, q, gridDim.x, nh, nkv, d, dv, scale, sinks, scratch, out, [&]() {
        const KvRow r = rows[blockIdx.z];
        AttKeys k{r.k_cache, r.v_cache, r.blocks, 0, 0, r.capacity, r.splits, r.block_size};
        visible_keys(r.pos, 0, 1, 1, window, &k.first, &k.last);
        return k;
    });
}
