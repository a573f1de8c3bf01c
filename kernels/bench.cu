// Measurement kernels: the bandwidth ceiling that every GPU result is reported against, and an
// on-device random fill (so multi-GB benchmark inputs need no host generation or upload).
#include <stdint.h>

#include "common/fill.cuh"  // splitmix64

// Reads n16 16-byte words with streaming (evict-first) loads, grid-stride, 4 loads in flight per
// thread. The XOR of everything read is written only if it equals an impossible value, so the
// compiler must keep every load while the kernel writes (almost) nothing.
extern "C" __global__ void stream_read(const uint4* __restrict__ p, uint64_t n16,
                                       uint32_t* __restrict__ sink) {
    uint32_t acc = 0;
    const uint64_t stride = (uint64_t)gridDim.x * blockDim.x;
    uint64_t i = blockIdx.x * (uint64_t)blockDim.x + threadIdx.x;
    for (; i + 3 * stride < n16; i += 4 * stride) {
        uint4 a = __ldcs(p + i), b = __ldcs(p + i + stride), c = __ldcs(p + i + 2 * stride),
              d = __ldcs(p + i + 3 * stride);
        acc ^= a.x ^ a.y ^ a.z ^ a.w ^ b.x ^ b.y ^ b.z ^ b.w ^ c.x ^ c.y ^ c.z ^ c.w ^ d.x ^ d.y ^
               d.z ^ d.w;
    }
    for (; i < n16; i += stride) {
        uint4 a = __ldcs(p + i);
        acc ^= a.x ^ a.y ^ a.z ^ a.w;
    }
    if (acc == 0x9E3779B9u) sink[0] = acc;
}

// p[i] = lo + (hash(seed, i) % span), bytes. span = 256, lo = 0 gives uniform random bytes.
extern "C" __global__ void fill_random_u8(uint8_t* __restrict__ p, uint64_t n, uint64_t seed,
                                          uint32_t lo, uint32_t span) {
    const uint64_t stride = (uint64_t)gridDim.x * blockDim.x;
    for (uint64_t i = blockIdx.x * (uint64_t)blockDim.x + threadIdx.x; i * 8 < n; i += stride) {
        const uint64_t r = splitmix64(seed ^ (i * 0xD1B54A32D192ED03ull));
#pragma unroll
        for (int j = 0; j < 8; ++j) {
            const uint64_t k = i * 8 + j;
            if (k < n) p[k] = (uint8_t)(lo + ((r >> (8 * j)) & 0xFF) % span);
        }
    }
}
