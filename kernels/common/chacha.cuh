// The uniform stream of a seeded sampler on the device: model::sampling::UniformStream (the
// ChaCha20 keystream of rand_chacha's ChaCha20Rng: stream 0, 64-bit block counter; one f64 draw
// = the u64 of two consecutive words, low first, top 53 bits times 2^-53). Integer arithmetic
// only, so the device draws exactly the CPU sampler's numbers.
#pragma once
#include <stdint.h>

__device__ __forceinline__ uint32_t chacha_rotl(uint32_t x, int r) {
    return (x << r) | (x >> (32 - r));
}

#define CHACHA_QR(a, b, c, d)                  \
    x[a] += x[b];                              \
    x[d] = chacha_rotl(x[d] ^ x[a], 16);       \
    x[c] += x[d];                              \
    x[b] = chacha_rotl(x[b] ^ x[c], 12);       \
    x[a] += x[b];                              \
    x[d] = chacha_rotl(x[d] ^ x[a], 8);        \
    x[c] += x[d];                              \
    x[b] = chacha_rotl(x[b] ^ x[c], 7);

// Word `j` (0..16) of block `counter` of the keystream of `key`.
__device__ __forceinline__ uint32_t chacha20_word(const uint32_t* key, uint64_t counter, uint32_t j) {
    uint32_t init[16] = {0x61707865u, 0x3320646eu, 0x79622d32u, 0x6b206574u,
                         key[0], key[1], key[2], key[3], key[4], key[5], key[6], key[7],
                         (uint32_t)counter, (uint32_t)(counter >> 32), 0u, 0u};
    uint32_t x[16];
#pragma unroll
    for (int i = 0; i < 16; ++i) x[i] = init[i];
#pragma unroll
    for (int r = 0; r < 10; ++r) {
        CHACHA_QR(0, 4, 8, 12)
        CHACHA_QR(1, 5, 9, 13)
        CHACHA_QR(2, 6, 10, 14)
        CHACHA_QR(3, 7, 11, 15)
        CHACHA_QR(0, 5, 10, 15)
        CHACHA_QR(1, 6, 11, 12)
        CHACHA_QR(2, 7, 8, 13)
        CHACHA_QR(3, 4, 9, 14)
    }
    uint32_t w = 0;
#pragma unroll
    for (int i = 0; i < 16; ++i) w = (uint32_t)i == j ? x[i] + init[i] : w;
    return w;
}
#undef CHACHA_QR

// The f64 uniform in [0, 1) at word offset `pos` (UniformStream::uniform).
__device__ __forceinline__ double stream_uniform(const uint32_t* key, uint64_t pos) {
    const uint32_t lo = chacha20_word(key, pos >> 4, (uint32_t)(pos & 15));
    const uint32_t hi = chacha20_word(key, (pos + 1) >> 4, (uint32_t)((pos + 1) & 15));
    const uint64_t bits = ((uint64_t)hi << 32) | lo;
    return (double)(bits >> 11) * 0x1p-53;
}
