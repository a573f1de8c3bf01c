// KV-cache slot addressing shared by the kernels that write (rope.cu) and read (attention.cu) a
// sequence's cache.
//
// A layer's cache is `capacity` logical slots (position p in logical slot p % capacity: a ring for
// sliding layers). Without a block table (`blocks` null) logical slot i is physical row i of
// k_cache / v_cache (the contiguous layout). With one, the logical slots are cut into blocks of
// `block_size` slots (capacity a multiple of block_size) and logical block j lives in physical
// block blocks[j] of a pool: physical row blocks[i / block_size] · block_size + i % block_size.
// The identity table gives the contiguous layout back, row for row; only addresses change, never
// which keys a query reads or in which order, so paged and contiguous results are bit-identical.
#pragma once
#include <stdint.h>

__device__ __forceinline__ uint64_t kv_slot(uint64_t pos, uint32_t capacity,
                                            const uint32_t* blocks, uint32_t block_size) {
    const uint64_t i = pos % capacity;
    if (blocks == nullptr) return i;
    return (uint64_t)__ldg(blocks + i / block_size) * block_size + i % block_size;
}
