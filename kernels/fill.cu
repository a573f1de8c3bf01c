// Deterministic random fills of device buffers (splitmix64 of seed and index): synthetic
// weights and inputs for tests and benchmarks.
//
// Launched by crates/tilert/src/ops.rs (`Ops::fill_*`).
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
#include "common/fill.cuh"

__device__ __forceinline__ void fill_uniform_bf16_body(__nv_bfloat16* out, uint64_t n, float scale,
                                                       uint64_t seed) {
    pdl_begin();
    const uint64_t stride = (uint64_t)gridDim.x * blockDim.x;
    for (uint64_t i = blockIdx.x * (uint64_t)blockDim.x + threadIdx.x; i < n; i += stride)
        out[i] = __float2bfloat16_rz(hash_uniform(seed, i, scale));
}

extern "C" __global__ void fill_uniform_bf16(__nv_bfloat16* out, uint64_t n, float scale,
                                             uint64_t seed) {
    fill_uniform_bf16_body(out, n, scale, seed);
}

__device__ __forceinline__ void fill_uniform_f32_body(float* out, uint64_t n, float scale,
                                                      uint64_t seed) {
    pdl_begin();
    const uint64_t stride = (uint64_t)gridDim.x * blockDim.x;
    for (uint64_t i = blockIdx.x * (uint64_t)blockDim.x + threadIdx.x; i < n; i += stride) {
        float v = hash_uniform(seed, i, scale);
        out[i] = fabsf(v) < scale ? v : 0.f;  // guards [-scale, scale) against rounding up
    }
}

extern "C" __global__ void fill_uniform_f32(float* out, uint64_t n, float scale, uint64_t seed) {
    fill_uniform_f32_body(out, n, scale, seed);
}

__device__ __forceinline__ void fill_bytes_body(uint8_t* out, uint64_t n, uint32_t lo,
                                                uint32_t span, uint64_t seed) {
    pdl_begin();
    const uint64_t stride = (uint64_t)gridDim.x * blockDim.x;
    for (uint64_t i = blockIdx.x * (uint64_t)blockDim.x + threadIdx.x; i < n; i += stride) {
        const uint64_t r = splitmix64(seed ^ (i * 0xD1B54A32D192ED03ull));
        out[i] = (uint8_t)(lo + (uint32_t)((r >> 32) % span));
    }
}

extern "C" __global__ void fill_bytes(uint8_t* out, uint64_t n, uint32_t lo, uint32_t span,
                                      uint64_t seed) {
    fill_bytes_body(out, n, lo, span, seed);
}
