// The persistent engine's runtime (kernels/persistent.cu): one resident block per SM runs its
// instruction stream; cross-SM dependencies are monotonic counters with epoch targets (ABI and
// protocol: common/persistent_abi.cuh). `pk_run` is the loop every resident kernel shares; the
// instruction bodies are passed in as a functor `body(const PkInstr&, uint32_t tile)`.
#pragma once
#include <stdint.h>

#include "common/persistent_abi.cuh"

__device__ __forceinline__ uint32_t pk_ld_acquire(const uint32_t* p) {
    uint32_t v;
    asm volatile("ld.acquire.gpu.global.u32 %0, [%1];" : "=r"(v) : "l"(p) : "memory");
    return v;
}

__device__ __forceinline__ void pk_red_release(uint32_t* p, uint32_t v) {
    asm volatile("red.release.gpu.global.add.u32 [%0], %1;" ::"l"(p), "r"(v) : "memory");
}

__device__ __forceinline__ uint64_t pk_globaltimer() {
    uint64_t t;
    asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
    return t;
}

__device__ __forceinline__ uint32_t pk_smid() {
    uint32_t s;
    asm volatile("mov.u32 %0, %%smid;" : "=r"(s));
    return s;
}

// Block `blockIdx.x` runs instructions [offsets[b], offsets[b + 1]) of `instrs`. Thread 0 waits
// (acquire loads, wrap-safe compare against (step + 1) · target) and signals (after every
// thread's stores are fenced and the block has met: release adds); the block meets before and
// after each instruction. The last block to finish advances state->step.
template <class Body>
__device__ __forceinline__ void pk_run(const PkInstr* __restrict__ instrs,
                                       const uint32_t* __restrict__ offsets,
                                       uint32_t* __restrict__ counters, PkState* state,
                                       PkTrace* __restrict__ trace, Body body) {
    __shared__ uint32_t s_step;
    if (threadIdx.x == 0) s_step = *reinterpret_cast<volatile uint32_t*>(&state->step);
    __syncthreads();
    const uint32_t step = s_step;
    const uint32_t begin = offsets[blockIdx.x], end = offsets[blockIdx.x + 1];
    for (uint32_t at = begin; at < end; ++at) {
        const PkInstr& in = instrs[at];
        uint64_t t0 = 0, c0 = 0;
        if (threadIdx.x == 0) {
            if (trace) {
                t0 = pk_globaltimer();
                c0 = clock64();
            }
            for (uint32_t w = 0; w < in.n_waits; ++w) {
                const uint32_t goal = (step + 1u) * in.wait_target[w];
                const uint32_t* c = counters + in.wait_counter[w];
                while ((int32_t)(pk_ld_acquire(c) - goal) < 0) __nanosleep(20);
            }
            __threadfence();
            if (trace) {
                trace[at].t_start = t0;
                trace[at].c_start = c0;
                trace[at].t_ready = pk_globaltimer();
                trace[at].c_ready = clock64();
            }
        }
        __syncthreads();
        for (uint32_t tile = in.tile_begin; tile < in.tile_end; ++tile) {
            body(in, tile);
            __syncthreads();
        }
        __threadfence();
        __syncthreads();
        if (threadIdx.x == 0) {
            // The end is taken before the signals: a waiter never sees a signal from the future.
            if (trace) {
                trace[at].t_end = pk_globaltimer();
                trace[at].c_end = clock64();
                trace[at].smid = pk_smid();
                trace[at].block = blockIdx.x;
            }
            for (uint32_t s = 0; s < in.n_signals; ++s)
                pk_red_release(counters + in.signal_counter[s], in.signal_add);
        }
    }
    if (threadIdx.x == 0) {
        const uint32_t old = atomicAdd(&state->done, 1u);
        if (old + 1u == (step + 1u) * gridDim.x) state->step = step + 1u;
    }
}
