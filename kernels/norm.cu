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
#include "common/norm.cuh"

// out[r] = w ⊙ (x[r] · 1/sqrt(mean(x[r]²) + eps)); one block per row (common/norm.cuh).
__device__ __forceinline__ void rms_norm_body(const float* x, const float* w, uint32_t n, float eps,
                                              float* out) {
    pdl_begin();
    rms_norm_row(x, w, n, eps, out, blockIdx.x);
}

extern "C" __global__ void rms_norm(const float* x, const float* w, uint32_t n, float eps,
                                    float* out) {
    rms_norm_body(x, w, n, eps, out);
}
