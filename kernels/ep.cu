// Expert parallelism: the two small kernels around an expert-parallel rank's expert GEMVs
// (model::plan::tp, "Expert parallelism"). The rank holds whole experts lo..hi; the routing
// (ids [T, k], from the replicated router) names global expert ids.
//   ep_localize: ids[e] = ids[e] - lo for the rank's experts, -1 for every other entry, in
//                place, so the grouped expert kernels (mxfp4.cu, indexing the rank's stack of
//                hi - lo experts) run only the rank's experts (entries with id -1 get NaN rows
//                there, never read).
//   ep_combine:  out[t] = Σ_j y[t][j] over the entries j with a local id (≥ 0), summed from 0 in
//                ascending expert id — the rank's partial sum that the all-reduce then adds
//                across ranks (and into the residual, with the next RMSNorm fused).
// The sum is the CPU's (model::cpu::moe_ops::experts_down over the rank's ExpertRange): same
// terms, same order, f32.
//
// Launched by crates/tilert/src/ops/ep.rs.
#include <stdint.h>

#include "common/abi.cuh"
#include "common/pdl.cuh"

extern "C" __global__ void ep_localize(int32_t* ids, uint32_t n, int32_t lo, int32_t hi) {
    pdl_begin();
    for (uint32_t i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += gridDim.x * blockDim.x) {
        const int32_t e = ids[i];
        ids[i] = (e >= lo && e < hi) ? e - lo : -1;
    }
}

// grid (T, blocks per token), block 256.
extern "C" __global__ void ep_combine(float* out, const float* y, const int32_t* ids, uint32_t k,
                                      uint32_t h) {
    pdl_begin();
    const uint32_t t = blockIdx.x;
    __shared__ int order[MAX_TOPK];
    __shared__ uint32_t n_local;
    if (threadIdx.x == 0) {
        // The local entries of token t by ascending id (insertion sort; ids are distinct).
        int id[MAX_TOPK];
        uint32_t n = 0;
        for (uint32_t j = 0; j < k && j < MAX_TOPK; ++j) {
            const int32_t e = ids[t * k + j];
            if (e < 0) continue;
            uint32_t b = n++;
            while (b > 0 && id[b - 1] > e) {
                id[b] = id[b - 1];
                order[b] = order[b - 1];
                --b;
            }
            id[b] = e;
            order[b] = (int)j;
        }
        n_local = n;
    }
    __syncthreads();
    const uint32_t n = n_local;
    float* o = out + (size_t)t * h;
    for (uint32_t i = blockIdx.y * blockDim.x + threadIdx.x; i < h; i += gridDim.y * blockDim.x) {
        float acc = 0.f;
        for (uint32_t j = 0; j < n; ++j) acc += y[((size_t)t * k + order[j]) * h + i];
        o[i] = acc;
    }
}
