// Token embedding tile body (x[t] = table[tokens[t]]), shared by the standalone kernels (embed.cu:
// grid (T, ceil(H / blockDim))) and the persistent engine (persistent.cu: one tile per row).
#pragma once
#include <cuda_bf16.h>
#include <stdint.h>

__device__ __forceinline__ float embed_load(const __nv_bfloat16* table, size_t at) {
    return __bfloat162float(table[at]);
}
__device__ __forceinline__ float embed_load(const float* table, size_t at) { return table[at]; }

// Element i of row t (i < h). An id outside the table yields NaN (the host validates ids before
// they reach the device; NaN makes a miss visible).
template <typename W>
__device__ __forceinline__ void embed_elem(const W* table, const uint32_t* tokens, uint32_t vocab,
                                           uint32_t h, float* x, uint32_t t, uint32_t i) {
    const uint32_t id = tokens[t];
    x[(size_t)t * h + i] = id < vocab ? embed_load(table, (size_t)id * h + i) : NAN;
}
