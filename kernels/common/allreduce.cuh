// One-shot all-reduce over peer memory, as a block-level device function: kernels/comm.cu wraps
// it in kernels, and a persistent engine can run it as an instruction body (one CTA per block
// slot). The ABI (AllReduceArgs, limits, flag-table layout) is common/comm_abi.cuh.
//
// Protocol of one all-reduce of epoch e (the same on every rank: the all-reduces a rank has
// issued, counting from 1), per block slot b (every rank runs the same blocks over the same
// element ranges):
//   1. slot s = e & 1 of every rank's data region holds this all-reduce's partials.
//   2. The block copies its range of this rank's partial into slot s of its own data region.
//   3. __syncthreads; thread q < ranks stores e into rank q's flag table, word (b, rank), with
//      st.release.sys (orders the block's copy before the flag, across GPUs).
//   4. Thread q polls its own flag table's word (b, q) with ld.acquire.sys until it is ≥ e,
//      then __syncthreads: every peer's slot s for this range is ready.
//   5. Every thread loads its elements from every rank's slot s (L1 bypassed), sums them in
//      rank order in fp32, and applies the epilogue (out = Σ; or x += Σ; or x += Σ and the row's
//      RMSNorm h = rmsnorm(x)·w).
// Reuse without a second barrier: slots alternate by epoch parity. A rank writes slot s again at
// epoch e + 2, after all its blocks finished epoch e + 1, where each waited for the same block
// of every peer at e + 1; a peer starts epoch e + 1 only after all its blocks finished epoch e
// (stream order for the kernels; the engine's order for a persistent caller), so no peer still
// reads slot s. A peer is at most one epoch ahead (it cannot finish epoch e + 1 without our
// flags), so flags are compared with ≥ in wrapping arithmetic, and the data ranges of blocks may
// differ from one all-reduce to the next (the rows or the size may change).
// The kernels keep e in device memory (COMM_EPOCH_WORD, advanced by the last block to finish,
// COMM_ARRIVE_WORD counting them): no host involvement, so a CUDA graph replays correctly and
// buffers are reused without resets. A persistent engine passes its own e instead.
// Deadlock freedom needs every block of every rank resident at once (each block waits for the
// same block of every peer): the host caps the grid by the occupancy of the device divided by
// the ranks that share it (virtual ranks). A wait longer than timeout_ns records
// COMM_STATUS_TIMEOUT (which block waited for which peer) in the status word and the call's
// epoch in COMM_STATUS_CALL_WORD, and gives up (the results are then garbage and the group must
// be reset), so a broken setup fails instead of hanging; once a rank's status holds an error,
// its later calls do not wait at all (one timeout per stuck pass, not one per call).
#pragma once
#include <cuda_bf16.h>
#include <stdint.h>

#include "common/comm_abi.cuh"
#include "common/reduce.cuh"

__device__ __forceinline__ void comm_st_release_sys(uint32_t* p, uint32_t v) {
    asm volatile("st.release.sys.global.u32 [%0], %1;" ::"l"(p), "r"(v) : "memory");
}

__device__ __forceinline__ uint32_t comm_ld_acquire_sys(const uint32_t* p) {
    uint32_t v;
    asm volatile("ld.acquire.sys.global.u32 %0, [%1];" : "=r"(v) : "l"(p) : "memory");
    return v;
}

__device__ __forceinline__ uint64_t comm_globaltimer() {
    uint64_t t;
    asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
    return t;
}

// 16-byte vectors of the element type: 8 bf16 or 4 f32.
template <typename T>
struct CommVec;
template <>
struct CommVec<float> {
    static constexpr uint32_t N = 4;
    __device__ static void unpack(uint4 v, float* f) {
        f[0] = __uint_as_float(v.x);
        f[1] = __uint_as_float(v.y);
        f[2] = __uint_as_float(v.z);
        f[3] = __uint_as_float(v.w);
    }
    __device__ static uint4 pack(const float* f) {
        return make_uint4(__float_as_uint(f[0]), __float_as_uint(f[1]), __float_as_uint(f[2]),
                          __float_as_uint(f[3]));
    }
    __device__ static float load1(const float* p) { return __ldcg(p); }
    __device__ static float to_f32(float v) { return v; }
    __device__ static float from_f32(float v) { return v; }
};
template <>
struct CommVec<__nv_bfloat16> {
    static constexpr uint32_t N = 8;
    __device__ static void unpack(uint4 v, float* f) {
        const uint32_t w[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
        for (int i = 0; i < 4; i++) {
            f[2 * i] = __uint_as_float(w[i] << 16);
            f[2 * i + 1] = __uint_as_float(w[i] & 0xffff0000u);
        }
    }
    __device__ static uint4 pack(const float* f) {
        uint32_t w[4];
#pragma unroll
        for (int i = 0; i < 4; i++) {
            const uint32_t lo = __bfloat16_as_ushort(__float2bfloat16_rn(f[2 * i]));
            const uint32_t hi = __bfloat16_as_ushort(__float2bfloat16_rn(f[2 * i + 1]));
            w[i] = lo | (hi << 16);
        }
        return make_uint4(w[0], w[1], w[2], w[3]);
    }
    __device__ static __nv_bfloat16 load1(const __nv_bfloat16* p) {
        return __ushort_as_bfloat16(__ldcg(reinterpret_cast<const unsigned short*>(p)));
    }
    __device__ static float to_f32(__nv_bfloat16 v) { return __bfloat162float(v); }
    __device__ static __nv_bfloat16 from_f32(float v) { return __float2bfloat16_rn(v); }
};

// Calls scalar(i) for the unaligned head and tail of [lo, hi) and vec(i) for every whole aligned
// vector [i, i + VN) in between, spreading both over the block's threads.
template <uint32_t VN, typename FV, typename FS>
__device__ __forceinline__ void comm_for_range(uint32_t lo, uint32_t hi, FV vec, FS scalar) {
    const uint32_t lo_al = min(hi, (lo + VN - 1) / VN * VN);
    const uint32_t hi_al = max(lo_al, hi / VN * VN);
    for (uint32_t i = lo + threadIdx.x; i < lo_al; i += blockDim.x) scalar(i);
    for (uint32_t v = lo_al / VN + threadIdx.x; v < hi_al / VN; v += blockDim.x) vec(v * VN);
    for (uint32_t i = hi_al + threadIdx.x; i < hi; i += blockDim.x) scalar(i);
}

// Block slot `b` of one rank's one-shot all-reduce of epoch `e` (see the protocol above).
// Every thread of the CTA must call it; `b` < COMM_MAX_BLOCKS; one block slot of one epoch runs
// in one CTA. Norm mode: block slot b reduces row b; flat modes: elements
// [b·chunk, min((b+1)·chunk, rows·width)).
template <typename T>
__device__ void comm_allreduce_block(const AllReduceArgs& a, uint32_t b, uint32_t e) {
    using V = CommVec<T>;
    constexpr uint32_t VN = V::N;
    __shared__ float red[32];
    uint32_t* const own_flags = reinterpret_cast<uint32_t*>(a.flags[a.rank]);
    const uint64_t slot_off = (uint64_t)(e & 1) * a.slot_bytes;
    const uint32_t n = a.rows * a.width;
    const bool norm = a.mode == COMM_MODE_RESIDUAL_NORM;
    const uint32_t lo = norm ? b * a.width : min(n, b * a.chunk);
    const uint32_t hi = norm ? lo + a.width : min(n, lo + a.chunk);

    // 2. This rank's partial into its own slot.
    {
        const T* in = reinterpret_cast<const T*>(a.in);
        T* mine = reinterpret_cast<T*>(a.bufs[a.rank] + slot_off);
        comm_for_range<VN>(
            lo, hi,
            [&](uint32_t i) {
                *reinterpret_cast<uint4*>(mine + i) = *reinterpret_cast<const uint4*>(in + i);
            },
            [&](uint32_t i) { mine[i] = in[i]; });
    }
    __syncthreads();
    // 3 + 4. Publish, then wait for every peer's publication of this epoch.
    if (threadIdx.x < a.ranks) {
        const uint32_t q = threadIdx.x;
        uint32_t* peer_flags = reinterpret_cast<uint32_t*>(a.flags[q]);
        comm_st_release_sys(peer_flags + COMM_FLAG_WORD + b * COMM_MAX_RANKS + a.rank, e);
        const uint32_t* mine = own_flags + COMM_FLAG_WORD + b * COMM_MAX_RANKS + q;
        if ((int32_t)(comm_ld_acquire_sys(mine) - e) < 0) {
            // Slow path only (the peer is not there yet): a rank whose status already holds an
            // error (an earlier call of this group timed out, results are garbage until the
            // reset) does not wait again, so a stuck pass costs one timeout, not one per call.
            if (a.timeout_ns == 0) {
                while ((int32_t)(comm_ld_acquire_sys(mine) - e) < 0) {
                }
            } else {
                volatile const uint32_t* status = own_flags + COMM_STATUS_WORD;
                const uint64_t t0 = comm_globaltimer();
                uint32_t polls = 0;
                bool give_up = *status != 0;
                while (!give_up && (int32_t)(comm_ld_acquire_sys(mine) - e) < 0) {
                    if ((++polls & 1023) == 0) {
                        if (*status != 0) break;
                        if (comm_globaltimer() - t0 > a.timeout_ns) {
                            if (atomicCAS(own_flags + COMM_STATUS_WORD, 0u,
                                          COMM_STATUS_TIMEOUT | (b << 8) | q) == 0u)
                                own_flags[COMM_STATUS_CALL_WORD] = e;
                            give_up = true;
                        }
                    }
                }
            }
        }
    }
    __syncthreads();

    // 5. Σ over ranks in rank order, fp32, then the epilogue.
    const uint32_t ranks = a.ranks;
    float ss = 0.f;
    float* x = reinterpret_cast<float*>(a.x);
    auto sum_vec = [&](uint32_t i, float* acc) {
        uint4 v[COMM_MAX_RANKS];
#pragma unroll
        for (uint32_t q = 0; q < COMM_MAX_RANKS; q++)
            if (q < ranks)
                v[q] = __ldcg(reinterpret_cast<const uint4*>(
                    reinterpret_cast<const T*>(a.bufs[q] + slot_off) + i));
        V::unpack(v[0], acc);
#pragma unroll
        for (uint32_t q = 1; q < COMM_MAX_RANKS; q++) {
            if (q < ranks) {
                float f[VN];
                V::unpack(v[q], f);
#pragma unroll
                for (uint32_t k = 0; k < VN; k++) acc[k] = __fadd_rn(acc[k], f[k]);
            }
        }
    };
    auto sum_one = [&](uint32_t i) {
        T v[COMM_MAX_RANKS];
#pragma unroll
        for (uint32_t q = 0; q < COMM_MAX_RANKS; q++)
            if (q < ranks) v[q] = V::load1(reinterpret_cast<const T*>(a.bufs[q] + slot_off) + i);
        float acc = V::to_f32(v[0]);
#pragma unroll
        for (uint32_t q = 1; q < COMM_MAX_RANKS; q++)
            if (q < ranks) acc = __fadd_rn(acc, V::to_f32(v[q]));
        return acc;
    };
    if (a.mode == COMM_MODE_OUT) {
        T* out = reinterpret_cast<T*>(a.out);
        comm_for_range<VN>(
            lo, hi,
            [&](uint32_t i) {
                float acc[VN];
                sum_vec(i, acc);
                *reinterpret_cast<uint4*>(out + i) = V::pack(acc);
            },
            [&](uint32_t i) { out[i] = V::from_f32(sum_one(i)); });
        return;
    }
    comm_for_range<VN>(
        lo, hi,
        [&](uint32_t i) {
            float acc[VN];
            sum_vec(i, acc);
#pragma unroll
            for (uint32_t k = 0; k < VN; k += 4) {
                float4 xv = *reinterpret_cast<const float4*>(x + i + k);
                xv.x = __fadd_rn(xv.x, acc[k]);
                xv.y = __fadd_rn(xv.y, acc[k + 1]);
                xv.z = __fadd_rn(xv.z, acc[k + 2]);
                xv.w = __fadd_rn(xv.w, acc[k + 3]);
                *reinterpret_cast<float4*>(x + i + k) = xv;
                ss = fmaf(xv.x, xv.x, ss);
                ss = fmaf(xv.y, xv.y, ss);
                ss = fmaf(xv.z, xv.z, ss);
                ss = fmaf(xv.w, xv.w, ss);
            }
        },
        [&](uint32_t i) {
            const float xv = __fadd_rn(x[i], sum_one(i));
            x[i] = xv;
            ss = fmaf(xv, xv, ss);
        });
    if (!norm) return;
    // The row's RMSNorm (model::cpu::ops::rms_norm): h = w ⊙ (x · 1/sqrt(mean(x²) + eps)).
    // block_sum's barriers also make this block's x writes visible to all its threads.
    ss = block_sum(ss, red);
    const float r = 1.0f / sqrtf(ss / (float)a.width + a.eps);
    const float* w = reinterpret_cast<const float*>(a.w) - lo;  // w is indexed by column
    float* h = reinterpret_cast<float*>(a.h);
    comm_for_range<4>(
        lo, hi,
        [&](uint32_t i) {
            const float4 xv = *reinterpret_cast<const float4*>(x + i);
            float4 o;
            o.x = __fmul_rn(w[i], __fmul_rn(xv.x, r));
            o.y = __fmul_rn(w[i + 1], __fmul_rn(xv.y, r));
            o.z = __fmul_rn(w[i + 2], __fmul_rn(xv.z, r));
            o.w = __fmul_rn(w[i + 3], __fmul_rn(xv.w, r));
            *reinterpret_cast<float4*>(h + i) = o;
        },
        [&](uint32_t i) { h[i] = __fmul_rn(w[i], __fmul_rn(x[i], r)); });
}

// The kernels' epoch bookkeeping around comm_allreduce_block: every block reads the epoch of the
// previous all-reduce (written by the previous launch, so stream-ordered), works on e = that + 1,
// and the last block to finish publishes e for the next launch.
__device__ __forceinline__ uint32_t comm_kernel_epoch(const AllReduceArgs& a) {
    __shared__ uint32_t s_epoch;
    if (threadIdx.x == 0)
        s_epoch = reinterpret_cast<const uint32_t*>(a.flags[a.rank])[COMM_EPOCH_WORD] + 1;
    __syncthreads();
    return s_epoch;
}

__device__ __forceinline__ void comm_kernel_done(const AllReduceArgs& a, uint32_t e) {
    uint32_t* const own_flags = reinterpret_cast<uint32_t*>(a.flags[a.rank]);
    __syncthreads();
    if (threadIdx.x == 0) {
        if (atomicAdd(own_flags + COMM_ARRIVE_WORD, 1u) == gridDim.x - 1) {
            own_flags[COMM_ARRIVE_WORD] = 0;
            own_flags[COMM_EPOCH_WORD] = e;
        }
    }
}
