// Deterministic pseudo-random values (splitmix64 of seed and index): the on-device fills of
// synthetic weights and benchmark inputs.
#pragma once
#include <stdint.h>

__device__ __forceinline__ uint64_t splitmix64(uint64_t z) {
    z += 0x9E3779B97F4A7C15ull;
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

// Uniform in [-scale, scale): 24 random bits, rounded toward zero when narrowed to bf16.
__device__ __forceinline__ float hash_uniform(uint64_t seed, uint64_t i, float scale) {
    const uint64_t r = splitmix64(seed ^ (i * 0xD1B54A32D192ED03ull));
    const float u = (float)(r >> 40) * (1.0f / 16777216.0f);
    return (2.0f * u - 1.0f) * scale;
}
