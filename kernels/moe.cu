// The dense side of a MoE block around the expert GEMVs: the gated activation of a fused
// gate_up output (glu_halves) and the combine of the k expert outputs into the residual, with the
// next layer's RMSNorm fused (moe_combine, moe_combine_norm_v*). The expert GEMVs are mxfp4.cu.
//
// Launched by crates/tilert/src/ops.rs (`Ops::glu`, `Ops::combine`).
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
#include "common/math.cuh"
#include "common/reduce.cuh"
#include "common/combine.cuh"

// Halves layout: gate = gate_up[t][i], up = gate_up[t][I + i]. kind 0 = clamped SwiGLU
// (gpt-oss), 1 = SwiGLU.
__device__ __forceinline__ void glu_halves_body(const float* gate_up, uint32_t t_count,
                                                uint32_t inter, uint32_t kind, float alpha,
                                                float limit, float* out) {
    pdl_begin();
    const uint64_t n = (uint64_t)t_count * inter;
    for (uint64_t idx = blockIdx.x * (uint64_t)blockDim.x + threadIdx.x; idx < n;
         idx += (uint64_t)gridDim.x * blockDim.x) {
        const uint64_t t = idx / inter, i = idx % inter;
        const float g = gate_up[t * 2 * inter + i], u = gate_up[t * 2 * inter + inter + i];
        float r;
        if (kind == 0) {
            const float gc = fminf(g, limit);
            const float uc = fminf(fmaxf(u, -limit), limit);
            const float glu = __fmul_rn(gc, sigmoidf_(__fmul_rn(gc, alpha)));
            r = __fmul_rn(__fadd_rn(uc, 1.0f), glu);
        } else {
            r = __fmul_rn(__fmul_rn(g, sigmoidf_(g)), u);
        }
        out[idx] = r;
    }
}

extern "C" __global__ void glu_halves(const float* gate_up, uint32_t t_count, uint32_t inter,
                                      uint32_t kind, float alpha, float limit, float* out) {
    glu_halves_body(gate_up, t_count, inter, kind, alpha, limit, out);
}

// x[t] += Σ_j y[t][j] (+ the fused next norm): moe_combine_row (common/combine.cuh) of block
// (blockIdx.x, blockIdx.y).
__device__ __forceinline__ void moe_combine_body(float* x, const float* y, const int32_t* ids,
                                                 uint32_t k, uint32_t h, const float* nw, float eps,
                                                 float* hout) {
    pdl_begin();
    moe_combine_row(blockIdx.x, blockIdx.y, gridDim.y, x, y, ids, k, h, nw, eps, hout);
}

extern "C" __global__ void moe_combine(float* x, const float* y, const int32_t* ids, uint32_t k,
                                       uint32_t h, const float* nw, float eps, float* hout) {
    moe_combine_body(x, y, ids, k, h, nw, eps, hout);
}

#define COMBINE_NORM(V, JC)                                                                      \
    extern "C" __global__ void __launch_bounds__(1024) moe_combine_norm_v##V(                    \
        float* x, const float* y, const int32_t* ids, uint32_t k, uint32_t h, const float* nw,   \
        float eps, float* hout) {                                                                \
        pdl_begin();                                                                             \
        combine_norm_regs<V, JC>(blockIdx.x, x, y, ids, k, h, nw, eps, hout);                    \
    }
COMBINE_NORM(1, 4)
COMBINE_NORM(2, 4)
COMBINE_NORM(4, 4)
