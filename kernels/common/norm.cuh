// RMSNorm tile body (model::cpu::ops::rms_norm), shared by the standalone kernel (norm.cu: one
// block per row) and the persistent engine (persistent.cu: one tile per row).
#pragma once
#include <stdint.h>

#include "common/reduce.cuh"

// out[row] = w ⊙ (x[row] · 1/sqrt(mean(x[row]²) + eps)), by the calling block. With VT > 1 the
// block computes what a block of VT · blockDim.x threads would (the standalone kernel runs 512
// threads from n = 2048 on; the persistent engine's blocks have 256): thread j sums the squares
// of virtual threads j, j + bd, ... separately and block_sum_v reduces them as that block would.
template <int VT = 1>
__device__ __forceinline__ void rms_norm_row(const float* x, const float* w, uint32_t n, float eps,
                                             float* out, uint32_t row) {
    __shared__ float red[32];
    const float* xr = x + (size_t)row * n;
    float* orow = out + (size_t)row * n;
    const uint32_t vbd = blockDim.x * VT;
    float ss[VT];
#pragma unroll
    for (int q = 0; q < VT; ++q) {
        ss[q] = 0.f;
        for (uint32_t i = threadIdx.x + q * blockDim.x; i < n; i += vbd) ss[q] = fmaf(xr[i], xr[i], ss[q]);
    }
    const float sum = block_sum_v<VT>(ss, red);
    const float r = 1.0f / sqrtf(sum / (float)n + eps);
    for (uint32_t i = threadIdx.x; i < n; i += blockDim.x)
        orow[i] = __fmul_rn(w[i], __fmul_rn(xr[i], r));
}
