// Weight-tile helpers of the GEMV-shaped kernels (linear, QKV + RoPE, router): streaming 16-byte
// loads that bypass L1, bf16 unpacking, and the dot of one 16-byte weight vector with its
// activations.
#pragma once
#include <stdint.h>

// Loads of activations (and KV-cache rows): read-only for the lifetime of a standalone kernel, so
// through the non-coherent path (__ldg); during a persistent launch (persistent.cu defines
// ULTRA_PERSISTENT) other SMs write them, so from L2 (__ldcg), which the counters' acquire/release
// orders. The values are the same either way.
template <typename T>
__device__ __forceinline__ T ld_act(const T* p) {
#ifdef ULTRA_PERSISTENT
    return __ldcg(p);
#else
    return __ldg(p);
#endif
}

__device__ __forceinline__ uint4 ld_stream(const uint4* p) {
    uint4 r;
    asm volatile("ld.global.nc.L1::no_allocate.L2::256B.v4.u32 {%0,%1,%2,%3}, [%4];"
                 : "=r"(r.x), "=r"(r.y), "=r"(r.z), "=r"(r.w)
                 : "l"(p));
    return r;
}

__device__ __forceinline__ float bf_lo(uint32_t w) { return __uint_as_float(w << 16); }
__device__ __forceinline__ float bf_hi(uint32_t w) { return __uint_as_float(w & 0xffff0000u); }

// Dot of one 16-byte weight vector with the matching activations (8 bf16 or 4 f32) of one token.
template <bool BF16>
__device__ __forceinline__ float dot16(const uint4& w, const float* xp, float acc) {
    if (BF16) {
        const float4 a = ld_act(reinterpret_cast<const float4*>(xp));
        const float4 b = ld_act(reinterpret_cast<const float4*>(xp) + 1);
        acc = fmaf(bf_lo(w.x), a.x, acc);
        acc = fmaf(bf_hi(w.x), a.y, acc);
        acc = fmaf(bf_lo(w.y), a.z, acc);
        acc = fmaf(bf_hi(w.y), a.w, acc);
        acc = fmaf(bf_lo(w.z), b.x, acc);
        acc = fmaf(bf_hi(w.z), b.y, acc);
        acc = fmaf(bf_lo(w.w), b.z, acc);
        acc = fmaf(bf_hi(w.w), b.w, acc);
    } else {
        const float4 a = ld_act(reinterpret_cast<const float4*>(xp));
        acc = fmaf(__uint_as_float(w.x), a.x, acc);
        acc = fmaf(__uint_as_float(w.y), a.y, acc);
        acc = fmaf(__uint_as_float(w.z), a.z, acc);
        acc = fmaf(__uint_as_float(w.w), a.w, acc);
    }
    return acc;
}
