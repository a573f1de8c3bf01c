// The persistent engine's resident kernels (runtime: common/persistent.cuh; ABI:
// common/persistent_abi.cuh; host compiler and validator: crates/tilert/src/persistent/).
//
//   pk_replay   runs a compiled program's streams with the runtime's full synchronisation
//               (waits, signals, epochs, timeline) and tile bodies that only stream the bytes the
//               compiler's cost model assigns each tile (`PkInstr::bytes / tiles`) from a pool,
//               at a distinct offset per instruction: the schedule and the sync protocol measured
//               on the hardware without the math (what the per-layer fixed overhead of the design
//               is, before any body is tuned).
#include <stdint.h>

#include "common/persistent.cuh"

// Streams n16 16-byte words (evict-first, 8 loads in flight per thread, as the GEMV bodies keep
// U·R weight vectors in flight) from `p`.
__device__ __forceinline__ uint32_t pk_stream(const uint4* __restrict__ p, uint64_t n16) {
    uint32_t acc = 0;
    const uint32_t stride = blockDim.x;
    uint64_t i = threadIdx.x;
    for (; i + 7 * stride < n16; i += 8 * stride) {
        uint4 v[8];
#pragma unroll
        for (int u = 0; u < 8; ++u) v[u] = __ldcs(p + i + u * stride);
#pragma unroll
        for (int u = 0; u < 8; ++u) acc ^= v[u].x ^ v[u].y ^ v[u].z ^ v[u].w;
    }
    for (; i < n16; i += stride) {
        const uint4 a = __ldcs(p + i);
        acc ^= a.x ^ a.y ^ a.z ^ a.w;
    }
    return acc;
}

// pool_off[at]: byte offset (16-aligned) of instruction `at`'s reads in `pool`.
extern "C" __global__ void __launch_bounds__(PK_THREADS, 1)
    pk_replay(const PkInstr* __restrict__ instrs, const uint32_t* __restrict__ offsets,
              uint32_t* __restrict__ counters, PkState* state, PkTrace* __restrict__ trace,
              const uint8_t* __restrict__ pool, const uint64_t* __restrict__ pool_off,
              uint32_t* __restrict__ sink) {
    const PkInstr* base = instrs;
    pk_run(instrs, offsets, counters, state, trace, [&](const PkInstr& in, uint32_t tile) {
        const uint32_t tiles = in.tile_end - in.tile_begin;
        const uint64_t per = ((uint64_t)in.bytes / tiles) & ~15ull;
        const uint64_t off = pool_off[&in - base] + (uint64_t)(tile - in.tile_begin) * per;
        const uint32_t acc =
            pk_stream(reinterpret_cast<const uint4*>(pool + off), per / 16);
        if (acc == 0x9E3779B9u) sink[0] = acc;
    });
}
