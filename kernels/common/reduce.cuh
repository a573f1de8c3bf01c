// Warp and block reductions, and the "last block of a group" handshake of split kernels.
#pragma once
#include <stdint.h>

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}

// Block-wide sum (every thread gets the result). `red` holds >= 32 floats. blockDim.x % 32 == 0.
__device__ float block_sum(float v, float* red) {
    const int lane = threadIdx.x & 31, wid = threadIdx.x >> 5, nw = blockDim.x >> 5;
    v = warp_sum(v);
    __syncthreads();
    if (lane == 0) red[wid] = v;
    __syncthreads();
    float r = lane < nw ? red[lane] : 0.f;
    return warp_sum(r);
}

// block_sum of a virtual block of VT · blockDim.x threads: v[q] is virtual thread
// threadIdx.x + q · blockDim.x's value (virtual warp q · W + warp). VT = 1 is block_sum.
// VT · W <= 32.
template <int VT>
__device__ __forceinline__ float block_sum_v(const float (&v)[VT], float* red) {
    if constexpr (VT == 1) {
        return block_sum(v[0], red);
    } else {
        const int lane = threadIdx.x & 31, wid = threadIdx.x >> 5, nw = blockDim.x >> 5;
        float s[VT];
#pragma unroll
        for (int q = 0; q < VT; ++q) s[q] = warp_sum(v[q]);
        __syncthreads();
        if (lane == 0)
#pragma unroll
            for (int q = 0; q < VT; ++q) red[q * nw + wid] = s[q];
        __syncthreads();
        float r = lane < nw * VT ? red[lane] : 0.f;
        return warp_sum(r);
    }
}

__device__ float block_max(float v, float* red) {
    const int lane = threadIdx.x & 31, wid = threadIdx.x >> 5, nw = blockDim.x >> 5;
    v = warp_max(v);
    __syncthreads();
    if (lane == 0) red[wid] = v;
    __syncthreads();
    float r = lane < nw ? red[lane] : -INFINITY;
    return warp_max(r);
}

// Block-wide "am I the last block of this group to finish?" after the caller's global writes:
// fences them, counts the block in `*counter`, and in the last block (which returns true) resets
// the counter for the next launch and fences so the other blocks' writes are visible. Every
// thread of the block must call it.
__device__ bool last_block_done(uint32_t* counter, uint32_t n_blocks) {
    __shared__ bool last;
    __threadfence();
    __syncthreads();
    if (threadIdx.x == 0) {
        last = atomicAdd(counter, 1u) == n_blocks - 1;
        if (last) *counter = 0;
    }
    __syncthreads();
    if (last) __threadfence();
    return last;
}
