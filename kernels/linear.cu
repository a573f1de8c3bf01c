// Linear: y[t] = W · x[t] (+ bias) (+ y[t] when accumulate), bf16 or f32 weights, for up to
// MAX_TOKENS tokens: the vectorised kernels linear_{bf16,f32}_t{TT}_r{R} (common/gemv.cuh) and
// linear_generic for any K and alignment.
//
// Launched by crates/tilert/src/ops.rs (`Ops::linear`).
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
#include "common/gemv.cuh"

#define LINEAR_VEC(NAME, BF, TT, R, U)                                                          \
    extern "C" __global__ void __launch_bounds__(LINEAR_THREADS) NAME(                           \
        const void* __restrict__ w, const float* __restrict__ bias, const float* __restrict__ x, \
        float* __restrict__ y, uint32_t n, uint32_t k, uint32_t t, uint32_t accumulate,          \
        uint32_t prefetch) {                                                                     \
        linear_vec<BF, TT, R, U>(w, bias, x, y, n, k, t, accumulate, prefetch);                  \
    }

#define LINEAR_VEC_R(BFNAME, BF, TT, U1, U2, U4)        \
    LINEAR_VEC(linear_##BFNAME##_t##TT##_r1, BF, TT, 1, U1) \
    LINEAR_VEC(linear_##BFNAME##_t##TT##_r2, BF, TT, 2, U2) \
    LINEAR_VEC(linear_##BFNAME##_t##TT##_r4, BF, TT, 4, U4)

LINEAR_VEC_R(bf16, true, 1, 8, 4, 2)
LINEAR_VEC_R(bf16, true, 2, 4, 2, 2)
LINEAR_VEC_R(bf16, true, 4, 4, 2, 1)
LINEAR_VEC_R(bf16, true, 8, 2, 1, 1)
LINEAR_VEC_R(bf16, true, 16, 2, 1, 1)
LINEAR_VEC_R(f32, false, 1, 8, 4, 2)
LINEAR_VEC_R(f32, false, 2, 4, 2, 2)
LINEAR_VEC_R(f32, false, 4, 4, 2, 1)
LINEAR_VEC_R(f32, false, 8, 2, 1, 1)
LINEAR_VEC_R(f32, false, 16, 2, 1, 1)

// Any K and alignment: one warp per row, lanes strided over single elements.
__device__ __forceinline__ void linear_generic_body(const void* __restrict__ wv, uint32_t is_bf16,
                                                    const float* __restrict__ bias,
                                                    const float* __restrict__ x,
                                                    float* __restrict__ y, uint32_t n, uint32_t k,
                                                    uint32_t t, uint32_t accumulate) {
    pdl_begin();
    const uint32_t row = (blockIdx.x * blockDim.x + threadIdx.x) >> 5;
    const int lane = threadIdx.x & 31;
    if (row >= n) return;
    float acc[MAX_TOKENS];
#pragma unroll
    for (int j = 0; j < MAX_TOKENS; ++j) acc[j] = 0.f;
    for (uint32_t c = lane; c < k; c += 32) {
        const float wval =
            is_bf16 ? __bfloat162float(reinterpret_cast<const __nv_bfloat16*>(wv)[(size_t)row * k + c])
                    : reinterpret_cast<const float*>(wv)[(size_t)row * k + c];
#pragma unroll
        for (int j = 0; j < MAX_TOKENS; ++j)
            if ((uint32_t)j < t) acc[j] = fmaf(wval, x[(size_t)j * k + c], acc[j]);
    }
#pragma unroll
    for (int j = 0; j < MAX_TOKENS; ++j) {
        if ((uint32_t)j >= t) break;
        const float s = warp_sum(acc[j]);
        if (lane == 0) {
            float val = s;
            if (bias) val += bias[row];
            float* yp = y + (size_t)j * n + row;
            if (accumulate) val = *yp + val;
            *yp = val;
        }
    }
}

extern "C" __global__ void linear_generic(const void* __restrict__ wv, uint32_t is_bf16,
                                          const float* __restrict__ bias,
                                          const float* __restrict__ x, float* __restrict__ y,
                                          uint32_t n, uint32_t k, uint32_t t, uint32_t accumulate) {
    linear_generic_body(wv, is_bf16, bias, x, y, n, k, t, accumulate);
}
