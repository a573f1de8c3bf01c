// Token embedding: x[t] = table[tokens[t]].
//
// Launched by crates/tilert/src/ops.rs (`Ops::embed`).
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
#include "common/embed.cuh"

// ------------------------------------------------------------------------------------------

// x[t] = table[tokens[t]]; grid (T, ceil(H / blockDim)) (common/embed.cuh).
__device__ __forceinline__ void embed_bf16_body(const __nv_bfloat16* table, const uint32_t* tokens,
                                                uint32_t vocab, uint32_t h, float* x) {
    pdl_begin();
    const uint32_t t = blockIdx.x, i = blockIdx.y * blockDim.x + threadIdx.x;
    if (i >= h) return;
    embed_elem(table, tokens, vocab, h, x, t, i);
}

extern "C" __global__ void embed_bf16(const __nv_bfloat16* table, const uint32_t* tokens,
                                      uint32_t vocab, uint32_t h, float* x) {
    embed_bf16_body(table, tokens, vocab, h, x);
}

__device__ __forceinline__ void embed_f32_body(const float* table, const uint32_t* tokens,
                                               uint32_t vocab, uint32_t h, float* x) {
    pdl_begin();
    const uint32_t t = blockIdx.x, i = blockIdx.y * blockDim.x + threadIdx.x;
    if (i >= h) return;
    embed_elem(table, tokens, vocab, h, x, t, i);
}

extern "C" __global__ void embed_f32(const float* table, const uint32_t* tokens, uint32_t vocab,
                                     uint32_t h, float* x) {
    embed_f32_body(table, tokens, vocab, h, x);
}
