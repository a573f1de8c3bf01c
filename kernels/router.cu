// Routing (moe::route_into): `route` from router logits, and router_route_* (the post-attention
// RMSNorm, the router projection and the routing fused). One warp routes one token.
//
// Launched by crates/tilert/src/ops.rs (`Ops::route`, `Ops::router_route`).
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
#include "common/tile.cuh"
#include "common/router.cuh"

// grid T, block 32: route_token of each token's logits [T][n_exp].
__device__ __forceinline__ void route_body(const float* logits, RouteSpec rs, int32_t* ids_out,
                                           float* w_out) {
    pdl_begin();
    __shared__ RouteSmem sm;
    route_token(rs, logits + (size_t)blockIdx.x * rs.n_exp, blockIdx.x, sm, ids_out, w_out);
}

extern "C" __global__ void route(const float* logits, RouteSpec rs, int32_t* ids_out, float* w_out) {
    route_body(logits, rs, ids_out, w_out);
}

template <bool BF16, int TT>
__device__ void router_route_body(const void* __restrict__ wv, const float* __restrict__ bias,
                                  const float* __restrict__ x, const float* __restrict__ nw,
                                  float eps, uint32_t kdim, uint32_t t_count, float* hout,
                                  float* logits, RouteSpec rs, uint32_t* counter, int32_t* ids_out,
                                  float* w_out) {
    pdl_begin();
    router_route_block<BF16, TT>(blockIdx.x, gridDim.x, wv, bias, x, nw, eps, kdim, t_count, hout,
                                 logits, rs, counter, ids_out, w_out);
}

#define ROUTER_ROUTE(NAME, BF, TT)                                                               \
    extern "C" __global__ void __launch_bounds__(ROUTER_THREADS) NAME(                           \
        const void* __restrict__ w, const float* __restrict__ bias, const float* __restrict__ x, \
        const float* __restrict__ nw, float eps, uint32_t kdim, uint32_t t_count, float* hout,   \
        float* logits, RouteSpec rs, uint32_t* counter, int32_t* ids_out, float* w_out) {        \
        router_route_body<BF, TT>(w, bias, x, nw, eps, kdim, t_count, hout, logits, rs, counter, \
                                  ids_out, w_out);                                               \
    }
ROUTER_ROUTE(router_route_bf16_t1, true, 1)
ROUTER_ROUTE(router_route_bf16_t2, true, 2)
ROUTER_ROUTE(router_route_bf16_t4, true, 4)
ROUTER_ROUTE(router_route_bf16_t8, true, 8)
ROUTER_ROUTE(router_route_bf16_t16, true, 16)
ROUTER_ROUTE(router_route_f32_t1, false, 1)
ROUTER_ROUTE(router_route_f32_t2, false, 2)
ROUTER_ROUTE(router_route_f32_t4, false, 4)
ROUTER_ROUTE(router_route_f32_t8, false, 8)
ROUTER_ROUTE(router_route_f32_t16, false, 16)
