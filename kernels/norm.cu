// RMSNorm (model::cpu::ops::rms_norm).
//
// Launched by crates/tilert/src/ops.rs (`Ops::rms_norm`).
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

// out[r] = w ⊙ (x[r] · 1/sqrt(mean(x[r]²) + eps)); one block per row.
__device__ __forceinline__ void rms_norm_body(const float* x, const float* w, uint32_t n, float eps,
                                              float* out) {
    pdl_begin();
    __shared__ float red[32];
    const float* xr = x + (size_t)blockIdx.x * n;
    float* orow = out + (size_t)blockIdx.x * n;
    float ss = 0.f;
    for (uint32_t i = threadIdx.x; i < n; i += blockDim.x) ss = fmaf(xr[i], xr[i], ss);
    ss = block_sum(ss, red);
    const float r = 1.0f / sqrtf(ss / (float)n + eps);
    for (uint32_t i = threadIdx.x; i < n; i += blockDim.x)
        orow[i] = __fmul_rn(w[i], __fmul_rn(xr[i], r));
}

extern "C" __global__ void rms_norm(const float* x, const float* w, uint32_t n, float eps,
                                    float* out) {
    rms_norm_body(x, w, n, eps, out);
}
