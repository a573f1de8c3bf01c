// The dense ops of a decoder step (see crates/tilert/src/ops.rs for the contract of each kernel;
// the one definition of each op is the CPU code named there).
//
// Everything is f32 except dense weights (bf16 or f32). No fast math: the kernels use IEEE
// division / sqrt and expf; where the CPU definition is a short chain of roundings (RoPE, the
// sampler's exp) the kernels use explicit _rn intrinsics so that the compiler cannot fuse
// multiply-adds and the results are bit-identical to the CPU.
#include <cuda_bf16.h>
#include <stdint.h>
#include <float.h>

#define MAX_TOKENS 16

// ------------------------------------------------------------------------------------------
// Reductions
// ------------------------------------------------------------------------------------------

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

__device__ float block_max(float v, float* red) {
    const int lane = threadIdx.x & 31, wid = threadIdx.x >> 5, nw = blockDim.x >> 5;
    v = warp_max(v);
    __syncthreads();
    if (lane == 0) red[wid] = v;
    __syncthreads();
    float r = lane < nw ? red[lane] : -INFINITY;
    return warp_max(r);
}

// Programmatic dependent launch: tilert launches the kernels of this file with PDL (see
// crates/tilert/src/launch.rs), so a kernel's blocks may start while its predecessor in the
// stream still runs. Every kernel calls pdl_begin() before its first access to memory that an
// earlier kernel writes or reads (only weights may be touched before, e.g. prefetched); it waits
// for the predecessor to complete and flush, then lets the successor's blocks start (they wait
// in their own pdl_begin()). Launched without PDL, both instructions are no-ops.
__device__ __forceinline__ void pdl_begin() {
    asm volatile("griddepcontrol.wait;" ::: "memory");
    asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
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

// ------------------------------------------------------------------------------------------
// Deterministic fills (splitmix64 of seed and index)
// ------------------------------------------------------------------------------------------

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

extern "C" __global__ void fill_uniform_bf16(__nv_bfloat16* out, uint64_t n, float scale,
                                             uint64_t seed) {
    pdl_begin();
    const uint64_t stride = (uint64_t)gridDim.x * blockDim.x;
    for (uint64_t i = blockIdx.x * (uint64_t)blockDim.x + threadIdx.x; i < n; i += stride)
        out[i] = __float2bfloat16_rz(hash_uniform(seed, i, scale));
}

extern "C" __global__ void fill_uniform_f32(float* out, uint64_t n, float scale, uint64_t seed) {
    pdl_begin();
    const uint64_t stride = (uint64_t)gridDim.x * blockDim.x;
    for (uint64_t i = blockIdx.x * (uint64_t)blockDim.x + threadIdx.x; i < n; i += stride) {
        float v = hash_uniform(seed, i, scale);
        out[i] = fabsf(v) < scale ? v : 0.f;  // guards [-scale, scale) against rounding up
    }
}

extern "C" __global__ void fill_bytes(uint8_t* out, uint64_t n, uint32_t lo, uint32_t span,
                                      uint64_t seed) {
    pdl_begin();
    const uint64_t stride = (uint64_t)gridDim.x * blockDim.x;
    for (uint64_t i = blockIdx.x * (uint64_t)blockDim.x + threadIdx.x; i < n; i += stride) {
        const uint64_t r = splitmix64(seed ^ (i * 0xD1B54A32D192ED03ull));
        out[i] = (uint8_t)(lo + (uint32_t)((r >> 32) % span));
    }
}

// ------------------------------------------------------------------------------------------
// Embedding, RMSNorm, GLU, combine, argmax
// ------------------------------------------------------------------------------------------

// x[t] = table[tokens[t]]; grid (T, ceil(H / blockDim)). An id outside the table yields NaNs
// (the host validates ids before they reach the device; NaN makes a miss visible).
extern "C" __global__ void embed_bf16(const __nv_bfloat16* table, const uint32_t* tokens,
                                      uint32_t vocab, uint32_t h, float* x) {
    pdl_begin();
    const uint32_t t = blockIdx.x, i = blockIdx.y * blockDim.x + threadIdx.x;
    if (i >= h) return;
    const uint32_t id = tokens[t];
    x[(size_t)t * h + i] = id < vocab ? __bfloat162float(table[(size_t)id * h + i]) : NAN;
}

extern "C" __global__ void embed_f32(const float* table, const uint32_t* tokens, uint32_t vocab,
                                     uint32_t h, float* x) {
    pdl_begin();
    const uint32_t t = blockIdx.x, i = blockIdx.y * blockDim.x + threadIdx.x;
    if (i >= h) return;
    const uint32_t id = tokens[t];
    x[(size_t)t * h + i] = id < vocab ? table[(size_t)id * h + i] : NAN;
}

// out[r] = w ⊙ (x[r] · 1/sqrt(mean(x[r]²) + eps)); one block per row.
extern "C" __global__ void rms_norm(const float* x, const float* w, uint32_t n, float eps,
                                   float* out) {
    pdl_begin();
    __shared__ float red[32];
    const float* xr = x + (size_t)blockIdx.x * n;
    float* orow = out + (size_t)blockIdx.x * n;
    float ss = 0.f;
    for (uint32_t i = threadIdx.x; i < n; i += blockDim.x) ss = fmaf(xr[i], xr[i], ss);
    ss = block_sum(ss, red);
    const float r = 1.0f / sqrtf(ss / (float)n + eps);
    for (uint32_t i = threadIdx.x; i < n; i += blockDim.x)
        orow[i] = __fmul_rn(w[i], __fmul_rn(xr[i], r));
}

__device__ __forceinline__ float sigmoidf_(float x) { return 1.0f / (1.0f + expf(-x)); }

// Halves layout: gate = gate_up[t][i], up = gate_up[t][I + i]. kind 0 = clamped SwiGLU
// (gpt-oss), 1 = SwiGLU.
extern "C" __global__ void glu_halves(const float* gate_up, uint32_t t_count, uint32_t inter,
                                      uint32_t kind, float alpha, float limit, float* out) {
    pdl_begin();
    const uint64_t n = (uint64_t)t_count * inter;
    for (uint64_t idx = blockIdx.x * (uint64_t)blockDim.x + threadIdx.x; idx < n;
         idx += (uint64_t)gridDim.x * blockDim.x) {
        const uint64_t t = idx / inter, i = idx % inter;
        const float g = gate_up[t * 2 * inter + i], u = gate_up[t * 2 * inter + inter + i];
        float r;
        if (kind == 0) {
            const float gc = fminf(g, limit);
            const float uc = fminf(fmaxf(u, -limit), limit);
            const float glu = __fmul_rn(gc, sigmoidf_(__fmul_rn(gc, alpha)));
            r = __fmul_rn(__fadd_rn(uc, 1.0f), glu);
        } else {
            r = __fmul_rn(__fmul_rn(g, sigmoidf_(g)), u);
        }
        out[idx] = r;
    }
}

// order[0..k) = the slots of ids[0..k) by ascending expert id (insertion sort, stable: equal
// ids keep slot order). One thread.
__device__ void sort_entries(const int32_t* ids, uint32_t k, int* order) {
    int id[MAX_TOKENS];
    for (uint32_t j = 0; j < k; ++j) {
        id[j] = ids[j];
        order[j] = j;
    }
    for (uint32_t a = 1; a < k; ++a) {
        int o = order[a], v = id[o];
        int b = a;
        while (b > 0 && id[order[b - 1]] > v) {
            order[b] = order[b - 1];
            --b;
        }
        order[b] = o;
    }
}

// x[t] += Σ_j y[t][j] with the k terms summed from 0 in ascending expert id; then, when `nw` is
// given, h[t] = rms_norm(x[t]) ⊙ nw (the next layer's input norm fused in: as `rms_norm`, but
// grid (T, 1) is required). grid (T, ...).
extern "C" __global__ void moe_combine(float* x, const float* y, const int32_t* ids, uint32_t k,
                                       uint32_t h, const float* nw, float eps, float* hout) {
    pdl_begin();
    const uint32_t t = blockIdx.x;
    __shared__ int order[MAX_TOKENS];
    __shared__ float red[32];
    if (threadIdx.x == 0) sort_entries(ids + t * k, k, order);
    __syncthreads();
    float* xr = x + (size_t)t * h;
    float ss = 0.f;
    for (uint32_t i = blockIdx.y * blockDim.x + threadIdx.x; i < h; i += gridDim.y * blockDim.x) {
        float acc = 0.f;
        for (uint32_t j = 0; j < k; ++j) acc += y[((size_t)t * k + order[j]) * h + i];
        const float v = xr[i] + acc;
        xr[i] = v;
        ss = fmaf(v, v, ss);
    }
    if (!nw) return;
    ss = block_sum(ss, red);
    const float r = 1.0f / sqrtf(ss / (float)h + eps);
    float* orow = hout + (size_t)t * h;
    for (uint32_t i = threadIdx.x; i < h; i += blockDim.x) orow[i] = __fmul_rn(nw[i], __fmul_rn(xr[i], r));
}

// moe_combine with the next RMSNorm fused, for h <= V * blockDim.x: a block per token holds its
// V values per thread in registers, and issues all loads of a group of JC expert rows (with x and
// the norm weight) before the first add, so the token costs about two memory round trips plus
// the block reduction instead of one round trip per strided element. Same sums in the same order
// as moe_combine. grid (T), block 1024.
template <int V, int JC>
__device__ void combine_norm_regs(float* __restrict__ x, const float* __restrict__ y,
                                  const int32_t* __restrict__ ids, uint32_t k, uint32_t h,
                                  const float* __restrict__ nw, float eps,
                                  float* __restrict__ hout) {
    pdl_begin();
    const uint32_t t = blockIdx.x, bd = blockDim.x;
    __shared__ int order[MAX_TOKENS];
    __shared__ float red[32];
    if (threadIdx.x == 0) sort_entries(ids + t * k, k, order);
    float xv[V], wv[V], acc[V];
#pragma unroll
    for (int u = 0; u < V; ++u) {
        const uint32_t i = threadIdx.x + u * bd;
        xv[u] = i < h ? x[(size_t)t * h + i] : 0.f;
        wv[u] = i < h ? nw[i] : 0.f;
        acc[u] = 0.f;
    }
    const float* yt = y + (size_t)t * k * h;
    // Rows j0 .. j0 + JC (those below k) of y: slot order, or expert order once sorted.
    auto load_rows = [&](float (&yv)[JC][V], uint32_t j0, bool sorted) {
#pragma unroll
        for (int jj = 0; jj < JC; ++jj)
#pragma unroll
            for (int u = 0; u < V; ++u) {
                const uint32_t i = threadIdx.x + u * bd, j = j0 + jj;
                yv[jj][u] = j < k && i < h ? yt[(size_t)(sorted ? order[j] : j) * h + i] : 0.f;
            }
    };
    if (k <= JC) {
        // All k rows at once, in slot order (not waiting for the sort), then summed in expert
        // order by selecting among the registers.
        float yv[JC][V];
        load_rows(yv, 0, false);
        __syncthreads();
#pragma unroll
        for (int jj = 0; jj < JC; ++jj) {
            if (jj >= k) break;
            const int src = order[jj];
#pragma unroll
            for (int u = 0; u < V; ++u) {
                float v = yv[0][u];
#pragma unroll
                for (int q = 1; q < JC; ++q) v = src == q ? yv[q][u] : v;
                acc[u] += v;
            }
        }
    } else {
        __syncthreads();
    }
    for (uint32_t j0 = 0; k > JC && j0 < k; j0 += JC) {
        float yv[JC][V];
        load_rows(yv, j0, true);
#pragma unroll
        for (int jj = 0; jj < JC; ++jj)
            if (j0 + jj < k)
#pragma unroll
                for (int u = 0; u < V; ++u) acc[u] += yv[jj][u];
    }
    float ss = 0.f;
#pragma unroll
    for (int u = 0; u < V; ++u) {
        const uint32_t i = threadIdx.x + u * bd;
        xv[u] += acc[u];
        if (i < h) {
            x[(size_t)t * h + i] = xv[u];
            ss = fmaf(xv[u], xv[u], ss);
        }
    }
    ss = block_sum(ss, red);
    const float r = 1.0f / sqrtf(ss / (float)h + eps);
#pragma unroll
    for (int u = 0; u < V; ++u) {
        const uint32_t i = threadIdx.x + u * bd;
        if (i < h) hout[(size_t)t * h + i] = __fmul_rn(wv[u], __fmul_rn(xv[u], r));
    }
}

#define COMBINE_NORM(V, JC)                                                                      \
    extern "C" __global__ void __launch_bounds__(1024) moe_combine_norm_v##V(                    \
        float* x, const float* y, const int32_t* ids, uint32_t k, uint32_t h, const float* nw,   \
        float eps, float* hout) {                                                                \
        combine_norm_regs<V, JC>(x, y, ids, k, h, nw, eps, hout);                                \
    }
COMBINE_NORM(1, 4)
COMBINE_NORM(2, 4)
COMBINE_NORM(4, 4)

// NaN reads as -inf (as model::sampling does).
__device__ __forceinline__ float sane_logit(float x) {
    return isnan(x) ? -INFINITY : fminf(x, FLT_MAX);
}

// Folds (ov, oi) into (best, besti): larger value wins, the lower index on ties; index
// 0xffffffff = nothing yet.
__device__ __forceinline__ void argmax_fold(float& best, uint32_t& besti, float ov, uint32_t oi) {
    if (oi != 0xffffffffu && (besti == 0xffffffffu || ov > best || (ov == best && oi < besti))) {
        best = ov;
        besti = oi;
    }
}

// Block-wide argmax fold; thread 0 gets the result.
__device__ void block_argmax(float& best, uint32_t& besti) {
    __shared__ float bv[32];
    __shared__ uint32_t bi[32];
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
        const float ov = __shfl_xor_sync(0xffffffffu, best, o);
        const uint32_t oi = __shfl_xor_sync(0xffffffffu, besti, o);
        argmax_fold(best, besti, ov, oi);
    }
    const int lane = threadIdx.x & 31, wid = threadIdx.x >> 5, nw = blockDim.x >> 5;
    __syncthreads();
    if (lane == 0) {
        bv[wid] = best;
        bi[wid] = besti;
    }
    __syncthreads();
    if (wid == 0) {
        best = lane < nw ? bv[lane] : -INFINITY;
        besti = lane < nw ? bi[lane] : 0xffffffffu;
#pragma unroll
        for (int o = 16; o > 0; o >>= 1) {
            const float ov = __shfl_xor_sync(0xffffffffu, best, o);
            const uint32_t oi = __shfl_xor_sync(0xffffffffu, besti, o);
            argmax_fold(best, besti, ov, oi);
        }
    }
}

// out[t] = argmax(logits[t]); lowest index on ties. grid (B, T): block b scans chunk b of the
// row; with B > 1 each writes its (value, index) to scratch ([MAX_TOKENS] counters, then
// [T][B] pairs; counters zero before the first launch) and the last block of each row merges.
extern "C" __global__ void argmax_rows(const float* logits, uint32_t v, uint32_t* out,
                                       uint32_t* scratch) {
    pdl_begin();
    const uint32_t t = blockIdx.y, B = gridDim.x;
    const float* row = logits + (size_t)t * v;
    const uint32_t chunk = (v + B - 1) / B;
    const uint32_t lo = blockIdx.x * chunk, hi = min(v, lo + chunk);
    float best = -INFINITY;
    uint32_t besti = 0xffffffffu;
    // Eight independent loads in flight per thread; each thread still visits its indices in
    // increasing order, so `>` keeps the lowest index of equal values.
    for (uint32_t i0 = lo + threadIdx.x; i0 < hi; i0 += 8 * blockDim.x) {
        float xs[8];
#pragma unroll
        for (int u = 0; u < 8; ++u) {
            const uint32_t i = i0 + u * blockDim.x;
            xs[u] = i < hi ? sane_logit(__ldcs(row + i)) : -INFINITY;
        }
#pragma unroll
        for (int u = 0; u < 8; ++u) {
            const uint32_t i = i0 + u * blockDim.x;
            if (i < hi && (xs[u] > best || besti == 0xffffffffu)) {
                best = xs[u];
                besti = i;
            }
        }
    }
    block_argmax(best, besti);
    if (B == 1) {
        if (threadIdx.x == 0) out[t] = besti == 0xffffffffu ? 0u : besti;
        return;
    }
    uint32_t* pairs = scratch + MAX_TOKENS + (size_t)t * B * 2;
    if (threadIdx.x == 0) {
        pairs[2 * blockIdx.x] = __float_as_uint(best);
        pairs[2 * blockIdx.x + 1] = besti;
    }
    if (!last_block_done(scratch + t, B)) return;
    best = -INFINITY;
    besti = 0xffffffffu;
    for (uint32_t b = threadIdx.x; b < B; b += blockDim.x)
        argmax_fold(best, besti, __uint_as_float(__ldcg(pairs + 2 * b)), __ldcg(pairs + 2 * b + 1));
    block_argmax(best, besti);
    if (threadIdx.x == 0) out[t] = besti == 0xffffffffu ? 0u : besti;
}

// ------------------------------------------------------------------------------------------
// Linear: y[t] = W · x[t] (+ bias) (+ y[t] when accumulate)
// ------------------------------------------------------------------------------------------

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
        const float4 a = __ldg(reinterpret_cast<const float4*>(xp));
        const float4 b = __ldg(reinterpret_cast<const float4*>(xp) + 1);
        acc = fmaf(bf_lo(w.x), a.x, acc);
        acc = fmaf(bf_hi(w.x), a.y, acc);
        acc = fmaf(bf_lo(w.y), a.z, acc);
        acc = fmaf(bf_hi(w.y), a.w, acc);
        acc = fmaf(bf_lo(w.z), b.x, acc);
        acc = fmaf(bf_hi(w.z), b.y, acc);
        acc = fmaf(bf_lo(w.w), b.z, acc);
        acc = fmaf(bf_hi(w.w), b.w, acc);
    } else {
        const float4 a = __ldg(reinterpret_cast<const float4*>(xp));
        acc = fmaf(__uint_as_float(w.x), a.x, acc);
        acc = fmaf(__uint_as_float(w.y), a.y, acc);
        acc = fmaf(__uint_as_float(w.z), a.z, acc);
        acc = fmaf(__uint_as_float(w.w), a.w, acc);
    }
    return acc;
}

// Where a fused QKV projection's rows go (linear_qkv_rope): q to q_out [T][nh][d], k and v into
// the cache slots of positions step[0] + t, RoPE applied on the way as rope_kv_write does (no
// q/k norm). The weight rows are uploaded in "rope pair order": within each q and k head, rows
// (2i, 2i + 1) for 2i < rot are dims (i, i + rot/2), then dims rot.. d in order; v rows as is.
struct RopeOut {
    const uint32_t* step;
    const float* inv_freq;
    float* q_out;
    float* k_cache;
    float* v_cache;
    uint32_t nh, nkv, d, dv, rot, capacity;
    float attn_factor, value_scale;
};

// Stores rows (row0, row0 + 1) of token t of a rope-pair-ordered QKV projection (row0 even),
// the token at position `pos`, its k and v into `k_cache` / `v_cache` of `capacity` slots.
__device__ __forceinline__ void rope_store_kv(const RopeOut& ro, uint64_t pos, float* k_cache,
                                              float* v_cache, uint32_t capacity, uint32_t row0,
                                              uint32_t n, uint32_t t, float v0, float v1) {
    const uint64_t slot = pos % capacity;
    const uint32_t qrows = ro.nh * ro.d, krows = ro.nkv * ro.d;
    if (row0 < qrows + krows) {
        const bool is_q = row0 < qrows;
        const uint32_t base = is_q ? row0 : row0 - qrows;
        const uint32_t head = base / ro.d, l = base % ro.d;
        float* dst = is_q ? ro.q_out + ((size_t)t * ro.nh + head) * ro.d
                          : k_cache + (slot * ro.nkv + head) * ro.d;
        if (l < ro.rot) {
            const uint32_t half = ro.rot / 2, f = l / 2;
            const double a = (double)__fmul_rn(ro.inv_freq[f], (float)pos);
            const float c = __fmul_rn((float)cos(a), ro.attn_factor);
            const float s = __fmul_rn((float)sin(a), ro.attn_factor);
            dst[f] = __fsub_rn(__fmul_rn(v0, c), __fmul_rn(v1, s));
            dst[f + half] = __fadd_rn(__fmul_rn(v1, c), __fmul_rn(v0, s));
        } else {
            dst[l] = v0;
            dst[l + 1] = v1;
        }
        return;
    }
    const float vals[2] = {v0, v1};
#pragma unroll
    for (int r = 0; r < 2; ++r) {
        const uint32_t row = row0 + r;
        if (row >= n) break;
        const uint32_t idx = row - qrows - krows, g = idx / ro.dv, i = idx % ro.dv;
        v_cache[(slot * ro.nkv + g) * ro.dv + i] = __fmul_rn(vals[r], ro.value_scale);
    }
}

// rope_store_kv at position step[0] + t into the RopeOut's cache.
__device__ __forceinline__ void rope_store(const RopeOut& ro, uint32_t row0, uint32_t n,
                                           uint32_t t, float v0, float v1) {
    rope_store_kv(ro, (uint64_t)ro.step[0] + t, ro.k_cache, ro.v_cache, ro.capacity, row0, n, t,
                  v0, v1);
}

// One warp computes R consecutive rows for TT tokens (t ≤ TT of them are real; the others
// re-read token t−1 and are not stored). Lane l handles the 16-byte vectors l, l+32, ... of
// each row, U·R weight loads in flight. Requires K % (16 / sizeof(weight)) == 0 and 16-byte
// aligned W and x.
// With ROPE (R = 2), the rows go through rope_store(*ro, ...) instead of into y (RO: RopeOut, or
// RopeOutRows of the batched decode at the end of this file).
template <bool BF16, int TT, int R, int U, bool ROPE = false, typename RO = RopeOut>
__device__ __forceinline__ void linear_vec(const void* __restrict__ wv, const float* __restrict__ bias,
                                           const float* __restrict__ x, float* __restrict__ y,
                                           uint32_t n, uint32_t k, uint32_t t, uint32_t accumulate,
                                           uint32_t prefetch, const RO* ro = nullptr) {
    constexpr int E = BF16 ? 8 : 4;
    const uint32_t warp = (blockIdx.x * blockDim.x + threadIdx.x) >> 5;
    const int lane = threadIdx.x & 31;
    const uint32_t row0 = warp * R;
    if (row0 >= n) return;
    const uint32_t nvec = k / E;
    const uint4* wrow[R];
#pragma unroll
    for (int r = 0; r < R; ++r) {
        const uint32_t row = min(row0 + r, n - 1);
        wrow[r] = reinterpret_cast<const uint4*>(wv) + (size_t)row * nvec;
    }
    // The weights do not depend on earlier kernels: with `prefetch`, pull this warp's rows into
    // L2 while the predecessor still runs.
    if (prefetch && lane < R && row0 + lane < n)
        asm volatile("cp.async.bulk.prefetch.L2.global [%0], %1;" ::"l"(
                         reinterpret_cast<const uint4*>(wv) + (size_t)(row0 + lane) * nvec),
                     "r"(nvec * 16u)
                     : "memory");
    pdl_begin();
    const float* xt[TT];
#pragma unroll
    for (int j = 0; j < TT; ++j) xt[j] = x + (size_t)min((uint32_t)j, t - 1) * k;
    float acc[R][TT];
#pragma unroll
    for (int r = 0; r < R; ++r)
#pragma unroll
        for (int j = 0; j < TT; ++j) acc[r][j] = 0.f;

    uint32_t v = lane;
    for (; v + 32 * (U - 1) < nvec; v += 32 * U) {
        uint4 w[U][R];
#pragma unroll
        for (int u = 0; u < U; ++u)
#pragma unroll
            for (int r = 0; r < R; ++r) w[u][r] = ld_stream(wrow[r] + v + 32 * u);
#pragma unroll
        for (int u = 0; u < U; ++u)
#pragma unroll
            for (int j = 0; j < TT; ++j) {
                const float* xp = xt[j] + (size_t)(v + 32 * u) * E;
#pragma unroll
                for (int r = 0; r < R; ++r) acc[r][j] = dot16<BF16>(w[u][r], xp, acc[r][j]);
            }
    }
    for (; v < nvec; v += 32) {
        uint4 w[R];
#pragma unroll
        for (int r = 0; r < R; ++r) w[r] = ld_stream(wrow[r] + v);
#pragma unroll
        for (int j = 0; j < TT; ++j) {
            const float* xp = xt[j] + (size_t)v * E;
#pragma unroll
            for (int r = 0; r < R; ++r) acc[r][j] = dot16<BF16>(w[r], xp, acc[r][j]);
        }
    }
    // Butterfly: every lane ends with every sum; lane (r·TT + j) stores value (r, j).
#pragma unroll
    for (int r = 0; r < R; ++r)
#pragma unroll
        for (int j = 0; j < TT; ++j) acc[r][j] = warp_sum(acc[r][j]);
    if constexpr (ROPE) {
        static_assert(R == 2, "rope pairs are two rows");
#pragma unroll
        for (int j = 0; j < TT; ++j)
            if (lane == j && (uint32_t)j < t) {
                const float b0 = bias ? bias[row0] : 0.f;
                const float b1 = bias && row0 + 1 < n ? bias[row0 + 1] : 0.f;
                rope_store(*ro, row0, n, j, acc[0][j] + b0, acc[1][j] + b1);
            }
        return;
    }
#pragma unroll
    for (int r = 0; r < R; ++r)
#pragma unroll
        for (int j = 0; j < TT; ++j) {
            if (lane == ((r * TT + j) & 31)) {
                const uint32_t row = row0 + r;
                if (row < n && (uint32_t)j < t) {
                    float val = acc[r][j];
                    if (bias) val += bias[row];
                    float* yp = y + (size_t)j * n + row;
                    if (accumulate) val = *yp + val;
                    *yp = val;
                }
            }
        }
}

#define LINEAR_VEC(NAME, BF, TT, R, U)                                                          \
    extern "C" __global__ void __launch_bounds__(128) NAME(                                      \
        const void* __restrict__ w, const float* __restrict__ bias, const float* __restrict__ x, \
        float* __restrict__ y, uint32_t n, uint32_t k, uint32_t t, uint32_t accumulate,          \
        uint32_t prefetch) {                                                                     \
        linear_vec<BF, TT, R, U>(w, bias, x, y, n, k, t, accumulate, prefetch);                  \
    }

#define LINEAR_VEC_R(BFNAME, BF, TT, U1, U2, U4)        \
    LINEAR_VEC(linear_##BFNAME##_t##TT##_r1, BF, TT, 1, U1) \
    LINEAR_VEC(linear_##BFNAME##_t##TT##_r2, BF, TT, 2, U2) \
    LINEAR_VEC(linear_##BFNAME##_t##TT##_r4, BF, TT, 4, U4)

LINEAR_VEC_R(bf16, true, 1, 8, 4, 2)
LINEAR_VEC_R(bf16, true, 2, 4, 2, 2)
LINEAR_VEC_R(bf16, true, 4, 4, 2, 1)
LINEAR_VEC_R(bf16, true, 8, 2, 1, 1)
LINEAR_VEC_R(bf16, true, 16, 2, 1, 1)
LINEAR_VEC_R(f32, false, 1, 8, 4, 2)
LINEAR_VEC_R(f32, false, 2, 4, 2, 2)
LINEAR_VEC_R(f32, false, 4, 4, 2, 1)
LINEAR_VEC_R(f32, false, 8, 2, 1, 1)
LINEAR_VEC_R(f32, false, 16, 2, 1, 1)

// The QKV projection of rope-pair-ordered weights with RoPE and the KV write fused in
// (replaces linear + rope_kv_write for layers without q/k norm). Two rows per warp.
#define LINEAR_QKV_ROPE(NAME, BF, TT, U)                                                        \
    extern "C" __global__ void __launch_bounds__(128) NAME(                                      \
        const void* __restrict__ w, const float* __restrict__ bias, const float* __restrict__ x, \
        uint32_t n, uint32_t k, uint32_t t, RopeOut ro) {                                        \
        linear_vec<BF, TT, 2, U, true>(w, bias, x, nullptr, n, k, t, 0, 0, &ro);                 \
    }
LINEAR_QKV_ROPE(linear_qkv_rope_bf16_t1, true, 1, 4)
LINEAR_QKV_ROPE(linear_qkv_rope_bf16_t2, true, 2, 2)
LINEAR_QKV_ROPE(linear_qkv_rope_bf16_t4, true, 4, 2)
LINEAR_QKV_ROPE(linear_qkv_rope_bf16_t8, true, 8, 1)
LINEAR_QKV_ROPE(linear_qkv_rope_bf16_t16, true, 16, 1)
LINEAR_QKV_ROPE(linear_qkv_rope_f32_t1, false, 1, 4)
LINEAR_QKV_ROPE(linear_qkv_rope_f32_t2, false, 2, 2)
LINEAR_QKV_ROPE(linear_qkv_rope_f32_t4, false, 4, 2)
LINEAR_QKV_ROPE(linear_qkv_rope_f32_t8, false, 8, 1)
LINEAR_QKV_ROPE(linear_qkv_rope_f32_t16, false, 16, 1)

// Any K and alignment: one warp per row, lanes strided over single elements.
extern "C" __global__ void linear_generic(const void* __restrict__ wv, uint32_t is_bf16,
                                          const float* __restrict__ bias,
                                          const float* __restrict__ x, float* __restrict__ y,
                                          uint32_t n, uint32_t k, uint32_t t,
                                          uint32_t accumulate) {
    pdl_begin();
    const uint32_t row = (blockIdx.x * blockDim.x + threadIdx.x) >> 5;
    const int lane = threadIdx.x & 31;
    if (row >= n) return;
    float acc[MAX_TOKENS];
#pragma unroll
    for (int j = 0; j < MAX_TOKENS; ++j) acc[j] = 0.f;
    for (uint32_t c = lane; c < k; c += 32) {
        const float wval =
            is_bf16 ? __bfloat162float(reinterpret_cast<const __nv_bfloat16*>(wv)[(size_t)row * k + c])
                    : reinterpret_cast<const float*>(wv)[(size_t)row * k + c];
#pragma unroll
        for (int j = 0; j < MAX_TOKENS; ++j)
            if ((uint32_t)j < t) acc[j] = fmaf(wval, x[(size_t)j * k + c], acc[j]);
    }
#pragma unroll
    for (int j = 0; j < MAX_TOKENS; ++j) {
        if ((uint32_t)j >= t) break;
        const float s = warp_sum(acc[j]);
        if (lane == 0) {
            float val = s;
            if (bias) val += bias[row];
            float* yp = y + (size_t)j * n + row;
            if (accumulate) val = *yp + val;
            *yp = val;
        }
    }
}

// ------------------------------------------------------------------------------------------
// RoPE + KV cache write
// ------------------------------------------------------------------------------------------

#define MAX_HEAD_DIM 256

// grid (n_heads + 2·n_kv, T), block 128. Block (h, t): q head h, k head h − n_heads, or v head
// h − n_heads − n_kv of token t.
// Block (blockIdx.x, t) of rope_kv_write for the token of row t at position `pos`.
__device__ __forceinline__ void rope_kv_write_row(const float* qkv, uint64_t pos, uint32_t t,
                                                  uint32_t nh, uint32_t nkv, uint32_t d,
                                                  uint32_t dv, uint32_t rot,
                                                  const float* inv_freq, float attn_factor,
                                                  const float* q_norm, const float* k_norm,
                                                  float eps, float value_scale, float* q_out,
                                                  float* k_cache, float* v_cache,
                                                  uint32_t capacity) {
    __shared__ float xs[MAX_HEAD_DIM];
    __shared__ float red[32];
    const uint32_t hh = blockIdx.x;
    const uint64_t slot = pos % capacity;
    const size_t row_w = (size_t)nh * d + (size_t)nkv * d + (size_t)nkv * dv;
    const float* row = qkv + t * row_w;
    if (hh >= nh + nkv) {  // value head
        const uint32_t g = hh - nh - nkv;
        const float* src = row + (size_t)nh * d + (size_t)nkv * d + (size_t)g * dv;
        float* dst = v_cache + (slot * nkv + g) * dv;
        for (uint32_t i = threadIdx.x; i < dv; i += blockDim.x) dst[i] = __fmul_rn(src[i], value_scale);
        return;
    }
    const bool is_q = hh < nh;
    const uint32_t head = is_q ? hh : hh - nh;
    const float* src = row + (is_q ? (size_t)head * d : (size_t)nh * d + (size_t)head * d);
    const float* nw = is_q ? q_norm : k_norm;
    for (uint32_t i = threadIdx.x; i < d; i += blockDim.x) xs[i] = src[i];
    __syncthreads();
    if (nw) {
        float ss = 0.f;
        for (uint32_t i = threadIdx.x; i < d; i += blockDim.x) ss = fmaf(xs[i], xs[i], ss);
        ss = block_sum(ss, red);
        const float r = 1.0f / sqrtf(ss / (float)d + eps);
        for (uint32_t i = threadIdx.x; i < d; i += blockDim.x) xs[i] = __fmul_rn(nw[i], __fmul_rn(xs[i], r));
        __syncthreads();
    }
    float* dst = is_q ? q_out + (size_t)t * nh * d + (size_t)head * d
                      : k_cache + (slot * nkv + head) * d;
    const uint32_t half = rot / 2;
    const float p = (float)pos;
    for (uint32_t i = threadIdx.x; i < d; i += blockDim.x) {
        float v;
        if (i < 2 * half) {
            const uint32_t f = i < half ? i : i - half;
            const double a = (double)__fmul_rn(inv_freq[f], p);
            const float c = __fmul_rn((float)cos(a), attn_factor);
            const float s = __fmul_rn((float)sin(a), attn_factor);
            const float x1 = xs[f], x2 = xs[f + half];
            v = i < half ? __fsub_rn(__fmul_rn(x1, c), __fmul_rn(x2, s))
                         : __fadd_rn(__fmul_rn(x2, c), __fmul_rn(x1, s));
        } else {
            v = xs[i];
        }
        dst[i] = v;
    }
}

extern "C" __global__ void rope_kv_write(const float* qkv, const uint32_t* step, uint32_t nh,
                                         uint32_t nkv, uint32_t d, uint32_t dv, uint32_t rot,
                                         const float* inv_freq, float attn_factor,
                                         const float* q_norm, const float* k_norm, float eps,
                                         float value_scale, float* q_out, float* k_cache,
                                         float* v_cache, uint32_t capacity) {
    pdl_begin();
    const uint32_t t = blockIdx.y;
    rope_kv_write_row(qkv, (uint64_t)step[0] + t, t, nh, nkv, d, dv, rot, inv_freq, attn_factor,
                      q_norm, k_norm, eps, value_scale, q_out, k_cache, v_cache, capacity);
}

// ------------------------------------------------------------------------------------------
// Attention (flash-decoding: partials per key split, then a combine)
// ------------------------------------------------------------------------------------------

#define ATT_THREADS 128

// The visible key positions [first, last] of query t.
__device__ __forceinline__ void visible_keys(uint64_t step0, uint32_t t, uint32_t t_count,
                                             uint32_t causal, uint32_t window, uint64_t* first,
                                             uint64_t* last) {
    const uint64_t pos = step0 + t;
    *last = causal ? pos : step0 + t_count - 1;
    *first = (window != 0 && pos + 1 > window) ? pos + 1 - window : 0;
}

// Keys per shared-memory tile of attention_gqa and most value dims one lane accumulates.
#define ATT_TILE 32
#define ATT_LOADS 4  // key / value vectors per thread loaded before they are stored
#define ATT_MAX_VC (MAX_HEAD_DIM / 32)
#define ATT_MAX_WARPS 8
#define ATT_MAX_SPLITS 64

// Row stride (floats) of the key tile in shared memory: padded so that lanes reading their own
// key's row with float4 loads hit distinct banks.
__host__ __device__ __forceinline__ uint32_t att_k_stride(uint32_t d) {
    return (d & 3) == 0 ? d + 4 : d + 1;
}

// Merges a head's softmax state with its sink: out = acc / (l + e^(sink)) in the shifted form
// of the CPU definition (`sink` = -inf: none). Returns the factor acc is multiplied with.
__device__ __forceinline__ float att_finish(float m, float l, float sink) {
    const float mx = fmaxf(m, sink);
    const float den = (sink == -INFINITY ? 0.f : expf(sink - mx)) + (m == -INFINITY ? 0.f : l * expf(m - mx));
    return den > 0.f ? (m == -INFINITY ? 0.f : expf(m - mx)) / den : 0.f;
}

// The value part of a head's merge (one warp): out[c] = Σ_i part_i[c] · factor[i] / den over the
// A splits, lane l holding dims l, l + 32, ... (VC of them), L splits' loads issued per batch
// (the same fma order per dim as one split at a time).
template <int VC, int L>
__device__ __forceinline__ void att_merge_values(const float* part, const float* factor, uint32_t A,
                                                 uint32_t dv, float den, float* out) {
    const uint32_t lane = threadIdx.x & 31;
    float a[VC];
#pragma unroll
    for (int c = 0; c < VC; ++c) a[c] = 0.f;
    for (uint32_t i0 = 0; i0 < A; i0 += L) {
        float pv[L][VC];
#pragma unroll
        for (int u = 0; u < L; ++u)
#pragma unroll
            for (int c = 0; c < VC; ++c) {
                const uint32_t i = i0 + u, dim = lane + 32 * c;
                pv[u][c] = i < A && dim < dv ? __ldcg(part + i * (dv + 2) + 2 + dim) : 0.f;
            }
#pragma unroll
        for (int u = 0; u < L; ++u)
            if (i0 + u < A)
#pragma unroll
                for (int c = 0; c < VC; ++c) a[c] = fmaf(pv[u][c], factor[i0 + u], a[c]);
    }
#pragma unroll
    for (int c = 0; c < VC; ++c)
        if (lane + 32 * c < dv) out[lane + 32 * c] = den > 0.f ? a[c] / den : 0.f;
}

// Decode / verify attention, one block per (key split s, KV group g, query t): the group's keys
// and values of split s stream once through shared memory in tiles of ATT_TILE and serve all
// G = nh / nkv query heads of the group (warp w takes heads w, w + W, ...). Lane j scores key j
// of a tile; lane i accumulates value dims i, i + 32, ....
//
// With S = 1 the block writes the output. Otherwise it writes each head's (m, l, acc[dv]) to
// scratch[MAX_TOKENS · nkv + ((t·nh + h)·S + s)·(dv + 2)] and the last block of (t, g) to finish
// merges the S partials and the sink (counters: the first MAX_TOKENS · nkv words of scratch,
// zero before the first launch, reset by each merge).
// grid (S, nkv, T), block 32 · W, dynamic shared memory att_smem_floats(d, dv, W) floats.
//
// attention_gqa_block is one such block for query row t = blockIdx.z; `resolve()` (called once
// the row's first query is in flight) gives the row's cache, its visible keys [first, last] and
// its key splits S ≤ `stride` = gridDim.x (blocks s ≥ S return at once; scratch partials are
// laid out with `stride` in place of S).
struct AttKeys {
    const float* k_cache;
    const float* v_cache;
    uint64_t first, last;
    uint32_t capacity, splits;
};

template <typename Resolve>
__device__ __forceinline__ void attention_gqa_block(const float* q, uint32_t stride, uint32_t nh,
                                                    uint32_t nkv, uint32_t d, uint32_t dv,
                                                    float scale, const float* sinks,
                                                    float* scratch, float* out, Resolve resolve) {
    extern __shared__ float att_smem[];
    const uint32_t s = blockIdx.x, g = blockIdx.y, t = blockIdx.z;
    const uint32_t G = nh / nkv, W = blockDim.x / 32, w = threadIdx.x / 32, lane = threadIdx.x & 31;
    const uint32_t kst = att_k_stride(d);
    float* ks = att_smem;               // [ATT_TILE][kst]
    float* vs = ks + ATT_TILE * kst;    // [ATT_TILE][dv]
    float* qs = vs + ATT_TILE * dv;     // [W][d]
    // This warp's first query row goes into registers before the step is read: the two loads
    // are independent, so their round trips overlap (the row is stored to shared memory after
    // the first tile's loads are issued).
    float q_first[ATT_MAX_VC];
#pragma unroll
    for (int c = 0; c < ATT_MAX_VC; ++c) {
        const uint32_t i = lane + 32 * c;
        q_first[c] = w < G && i < d ? q[((size_t)t * nh + g * G + w) * d + i] : 0.f;
    }
    const AttKeys keys = resolve();
    const uint32_t S = keys.splits;
    if (s >= S) return;
    const float* k_cache = keys.k_cache;
    const float* v_cache = keys.v_cache;
    const uint32_t capacity = keys.capacity;
    const uint64_t first = keys.first, last = keys.last;
    const uint64_t n = last + 1 - first;
    uint64_t chunk = (n + S - 1) / S;
    if (chunk < ATT_TILE) chunk = ATT_TILE;
    const uint64_t k0 = min(last + 1, first + (uint64_t)s * chunk);
    const uint64_t k1 = min(last + 1, k0 + chunk);
    const bool vec = (d & 3) == 0 && (dv & 3) == 0;
    const size_t kv_row = (size_t)nkv * d, vv_row = (size_t)nkv * dv;
    float* parts = scratch + (size_t)MAX_TOKENS * nkv;

    for (uint32_t hb = 0; hb < G; hb += W) {
        const uint32_t hl = hb + w;  // head of this warp within the group
        const bool active = hl < G;
        const uint32_t h = g * G + hl;
        __syncthreads();  // the previous pass is done with qs / the tiles
        if (active && hb > 0)
            for (uint32_t i = lane; i < d; i += 32) qs[w * d + i] = q[((size_t)t * nh + h) * d + i];
        float m = -INFINITY, l = 0.f, acc[ATT_MAX_VC];
#pragma unroll
        for (int c = 0; c < ATT_MAX_VC; ++c) acc[c] = 0.f;
        for (uint64_t kb = k0; kb < k1; kb += ATT_TILE) {
            const uint32_t nk = (uint32_t)min((uint64_t)ATT_TILE, k1 - kb);
            __syncthreads();  // the previous tile is consumed (and qs written)
            if (vec) {
                // ATT_LOADS key and value vectors per thread in flight before the first store.
                const uint32_t d4 = d / 4, v4 = dv / 4, nkd = nk * d4, nvd = nk * v4;
                for (uint32_t base = threadIdx.x; base < max(nkd, nvd); base += ATT_LOADS * blockDim.x) {
                    float4 kv[ATT_LOADS], vv[ATT_LOADS];
#pragma unroll
                    for (int u = 0; u < ATT_LOADS; ++u) {
                        const uint32_t idx = base + u * blockDim.x;
                        if (idx < nkd)
                            kv[u] = __ldg(reinterpret_cast<const float4*>(
                                              k_cache + ((kb + idx / d4) % capacity) * kv_row + (size_t)g * d) +
                                          idx % d4);
                        if (idx < nvd)
                            vv[u] = __ldg(reinterpret_cast<const float4*>(
                                              v_cache + ((kb + idx / v4) % capacity) * vv_row + (size_t)g * dv) +
                                          idx % v4);
                    }
#pragma unroll
                    for (int u = 0; u < ATT_LOADS; ++u) {
                        const uint32_t idx = base + u * blockDim.x;
                        if (idx < nkd) *reinterpret_cast<float4*>(ks + (idx / d4) * kst + 4 * (idx % d4)) = kv[u];
                        if (idx < nvd) *reinterpret_cast<float4*>(vs + (idx / v4) * dv + 4 * (idx % v4)) = vv[u];
                    }
                }
            } else {
                for (uint32_t idx = threadIdx.x; idx < nk * d; idx += blockDim.x) {
                    const uint32_t j = idx / d, i = idx % d;
                    ks[j * kst + i] = __ldg(k_cache + ((kb + j) % capacity) * kv_row + (size_t)g * d + i);
                }
                for (uint32_t idx = threadIdx.x; idx < nk * dv; idx += blockDim.x) {
                    const uint32_t j = idx / dv, i = idx % dv;
                    vs[j * dv + i] = __ldg(v_cache + ((kb + j) % capacity) * vv_row + (size_t)g * dv + i);
                }
            }
            if (hb == 0 && kb == k0 && active) {
#pragma unroll
                for (int c = 0; c < ATT_MAX_VC; ++c)
                    if (lane + 32 * c < d) qs[w * d + lane + 32 * c] = q_first[c];
            }
            __syncthreads();
            if (!active) continue;
            float sc = -INFINITY;
            if (lane < nk) {
                const float* kr = ks + lane * kst;
                const float* qr = qs + w * d;
                float d0 = 0.f, d1 = 0.f;
                if (vec) {
                    for (uint32_t i = 0; i < d; i += 4) {
                        const float4 a = *reinterpret_cast<const float4*>(kr + i);
                        const float4 b = *reinterpret_cast<const float4*>(qr + i);
                        d0 = fmaf(a.x, b.x, d0);
                        d1 = fmaf(a.y, b.y, d1);
                        d0 = fmaf(a.z, b.z, d0);
                        d1 = fmaf(a.w, b.w, d1);
                    }
                } else {
                    for (uint32_t i = 0; i < d; ++i) d0 = fmaf(kr[i], qr[i], d0);
                }
                sc = (d0 + d1) * scale;
            }
            const float m_new = fmaxf(m, warp_max(sc));
            const float alpha = m == -INFINITY ? 0.f : expf(m - m_new);
            const float p = lane < nk ? expf(sc - m_new) : 0.f;
            l = l * alpha + warp_sum(p);
#pragma unroll
            for (int c = 0; c < ATT_MAX_VC; ++c) acc[c] *= alpha;
            for (uint32_t jj = 0; jj < nk; ++jj) {
                const float pj = __shfl_sync(0xffffffffu, p, jj);
                const float* vr = vs + jj * dv;
#pragma unroll
                for (int c = 0; c < ATT_MAX_VC; ++c)
                    if (lane + 32 * c < dv) acc[c] = fmaf(pj, vr[lane + 32 * c], acc[c]);
            }
            m = m_new;
        }
        if (!active) continue;
        if (S == 1) {
            const float f = att_finish(m, l, sinks ? sinks[h] : -INFINITY);
            float* o = out + ((size_t)t * nh + h) * dv;
#pragma unroll
            for (int c = 0; c < ATT_MAX_VC; ++c)
                if (lane + 32 * c < dv) o[lane + 32 * c] = acc[c] * f;
        } else {
            float* part = parts + (((size_t)t * nh + h) * stride + s) * (dv + 2);
            if (lane == 0) {
                part[0] = m;
                part[1] = l;
            }
#pragma unroll
            for (int c = 0; c < ATT_MAX_VC; ++c)
                if (lane + 32 * c < dv) part[2 + lane + 32 * c] = acc[c];
        }
    }
    if (S == 1 || !last_block_done(reinterpret_cast<uint32_t*>(scratch) + t * nkv + g, S)) return;
    // Merge over the splits that hold keys (the others are empty by construction): warp w takes
    // the group's heads w, w + W, ...; lane s < A holds split s's and s + 32's (m, l), and the
    // per-split factors go through shared memory to the value loop (lane i: dims i, i + 32, ...).
    __shared__ float factor[ATT_MAX_WARPS][ATT_MAX_SPLITS];
    const uint32_t A = (uint32_t)min((uint64_t)S, (n + chunk - 1) / chunk);
    for (uint32_t hl = w; hl < G; hl += W) {
        const uint32_t h = g * G + hl;
        const float* part = parts + ((size_t)t * nh + h) * stride * (dv + 2);
        const float sink = sinks ? sinks[h] : -INFINITY;
        float ms[2], ls[2];
#pragma unroll
        for (int u = 0; u < 2; ++u) {
            const uint32_t sp = lane + 32 * u;
            ms[u] = sp < A ? __ldcg(part + sp * (dv + 2)) : -INFINITY;
            ls[u] = sp < A ? __ldcg(part + sp * (dv + 2) + 1) : 0.f;
        }
        const float mx = fmaxf(warp_max(fmaxf(ms[0], ms[1])), sink);
        float den_part = 0.f;
#pragma unroll
        for (int u = 0; u < 2; ++u) {
            const float f = ms[u] == -INFINITY ? 0.f : expf(ms[u] - mx);
            if (lane + 32 * u < A) factor[w][lane + 32 * u] = f;
            den_part += ls[u] * f;
        }
        const float den = warp_sum(den_part) + (sink == -INFINITY ? 0.f : expf(sink - mx));
        __syncwarp();
        if (dv <= 64) {
            att_merge_values<2, 16>(part, factor[w], A, dv, den, out + ((size_t)t * nh + h) * dv);
        } else if (dv <= 128) {
            att_merge_values<4, 8>(part, factor[w], A, dv, den, out + ((size_t)t * nh + h) * dv);
        } else {
            att_merge_values<ATT_MAX_VC, 4>(part, factor[w], A, dv, den, out + ((size_t)t * nh + h) * dv);
        }
        __syncwarp();
    }
}

extern "C" __global__ void __launch_bounds__(256)
    attention_gqa(const float* q, const float* k_cache, const float* v_cache,
                  const uint32_t* step, uint32_t t_count, uint32_t nh, uint32_t nkv, uint32_t d,
                  uint32_t dv, uint32_t capacity, uint32_t window, uint32_t causal, float scale,
                  const float* sinks, float* scratch, float* out) {
    pdl_begin();
    attention_gqa_block(q, gridDim.x, nh, nkv, d, dv, scale, sinks, scratch, out, [&]() {
        AttKeys k{k_cache, v_cache, 0, 0, capacity, gridDim.x};
        visible_keys(step[0], blockIdx.z, t_count, causal, window, &k.first, &k.last);
        return k;
    });
}

// ------------------------------------------------------------------------------------------
// Routing (moe::route_into); one warp per token
// ------------------------------------------------------------------------------------------

#define MAX_EXPERTS 384
#define MAX_TOPK 16

// Selects the k best of vals[0..n) (descending value, ties by lower index) among those with
// keep[i] (keep = nullptr: all); writes ids / values in selection order. One warp.
__device__ void warp_topk(const float* vals, const uint8_t* keep, uint32_t n, uint32_t k,
                          int* ids, float* out_vals, uint8_t* taken) {
    const int lane = threadIdx.x & 31;
    for (uint32_t i = lane; i < n; i += 32) taken[i] = keep ? !keep[i] : 0;
    __syncwarp();
    for (uint32_t r = 0; r < k; ++r) {
        float best = -INFINITY;
        uint32_t bi = 0xffffffffu;
        for (uint32_t i = lane; i < n; i += 32) {
            if (!taken[i] && (bi == 0xffffffffu || vals[i] > best)) {
                best = vals[i];
                bi = i;
            }
        }
#pragma unroll
        for (int o = 16; o > 0; o >>= 1) {
            const float ov = __shfl_xor_sync(0xffffffffu, best, o);
            const uint32_t oi = __shfl_xor_sync(0xffffffffu, bi, o);
            if (oi != 0xffffffffu &&
                (bi == 0xffffffffu || ov > best || (ov == best && oi < bi))) {
                best = ov;
                bi = oi;
            }
        }
        if (lane == 0) {
            ids[r] = (int)bi;
            out_vals[r] = best;
            taken[bi] = 1;
        }
        __syncwarp();
    }
}

// The routing parameters of one MoE layer (`RouteArgs` on the host).
struct RouteSpec {
    uint32_t n_exp, k, kind, norm_topk;  // kind 0 = gpt-oss, 1 = Qwen3-MoE, 2 = sigmoid
    const float* corr_bias;
    uint32_t n_group, topk_group;
    float scaling;
};

// One warp's shared memory for routing one token.
struct RouteSmem {
    float vals[MAX_EXPERTS];
    uint8_t taken[MAX_EXPERTS];
    uint8_t keep[MAX_EXPERTS];
    float gscore[MAX_EXPERTS];
    uint8_t gtaken[MAX_EXPERTS];
    int gids[MAX_EXPERTS];
    float gsel[MAX_EXPERTS];
    int sel[MAX_TOPK];
    float selv[MAX_TOPK];
};

// Routes token t from its router logits z[n_exp] (one warp; z may be shared memory): ids and
// weights of its k experts to ids_out / w_out [t·k ..].
__device__ void route_token(const RouteSpec& rs, const float* z, uint32_t t, RouteSmem& sm,
                            int32_t* ids_out, float* w_out) {
    const uint32_t n_exp = rs.n_exp, k = rs.k, kind = rs.kind, norm_topk = rs.norm_topk;
    const uint32_t n_group = rs.n_group, topk_group = rs.topk_group;
    const float* corr_bias = rs.corr_bias;
    const float scaling = rs.scaling;
    float* vals = sm.vals;
    uint8_t* taken = sm.taken;
    uint8_t* keep = sm.keep;
    float* gscore = sm.gscore;
    uint8_t* gtaken = sm.gtaken;
    int* gids = sm.gids;
    float* gsel = sm.gsel;
    int* sel = sm.sel;
    float* selv = sm.selv;
    const int lane = threadIdx.x & 31;
    const uint8_t* keep_ptr = nullptr;
    if (kind == 0) {
        for (uint32_t i = lane; i < n_exp; i += 32) vals[i] = z[i];
    } else if (kind == 1) {
        float mx = -INFINITY;
        for (uint32_t i = lane; i < n_exp; i += 32) mx = fmaxf(mx, z[i]);
        mx = warp_max(mx);
        __syncwarp();
        if (lane == 0) {  // the CPU's sequential sum, so the probabilities compare the same
            float sum = 0.f;
            for (uint32_t i = 0; i < n_exp; ++i) sum += expf(z[i] - mx);
            gscore[0] = sum;
        }
        __syncwarp();
        const float sum = gscore[0];
        for (uint32_t i = lane; i < n_exp; i += 32) vals[i] = expf(z[i] - mx) / sum;
    } else {
        for (uint32_t i = lane; i < n_exp; i += 32) {
            const float sg = sigmoidf_(z[i]);
            vals[i] = corr_bias ? sg + corr_bias[i] : sg;
        }
        if (topk_group < n_group) {
            __syncwarp();
            const uint32_t gs = n_exp / n_group;
            for (uint32_t g = lane; g < n_group; g += 32) {
                float score;
                if (corr_bias) {
                    float f = -INFINITY, s2 = -INFINITY;
                    for (uint32_t e = g * gs; e < (g + 1) * gs; ++e) {
                        const float c = vals[e];
                        if (c > f) {
                            s2 = f;
                            f = c;
                        } else if (c > s2) {
                            s2 = c;
                        }
                    }
                    score = gs >= 2 ? f + s2 : f;
                } else {
                    score = -INFINITY;
                    for (uint32_t e = g * gs; e < (g + 1) * gs; ++e) score = fmaxf(score, vals[e]);
                }
                gscore[g] = score;
            }
            __syncwarp();
            warp_topk(gscore, nullptr, n_group, topk_group, gids, gsel, gtaken);
            __syncwarp();
            for (uint32_t e = lane; e < n_exp; e += 32) keep[e] = gtaken[e / gs];
            keep_ptr = keep;
        }
    }
    __syncwarp();
    warp_topk(vals, keep_ptr, n_exp, k, sel, selv, taken);
    __syncwarp();
    if (lane == 0) {
        float w[MAX_TOPK];
        if (kind == 0) {
            const float mx = selv[0];
            float sum = 0.f;
            for (uint32_t j = 0; j < k; ++j) {
                w[j] = expf(selv[j] - mx);
                sum += w[j];
            }
            for (uint32_t j = 0; j < k; ++j) w[j] /= sum;
        } else if (kind == 1) {
            for (uint32_t j = 0; j < k; ++j) w[j] = selv[j];
            if (norm_topk) {
                float s = 0.f;
                for (uint32_t j = 0; j < k; ++j) s += w[j];
                for (uint32_t j = 0; j < k; ++j) w[j] /= s;
            }
        } else {
            for (uint32_t j = 0; j < k; ++j) w[j] = sigmoidf_(z[sel[j]]);
            if (norm_topk) {
                float s = 0.f;
                for (uint32_t j = 0; j < k; ++j) s += w[j];
                s += 1e-20f;
                for (uint32_t j = 0; j < k; ++j) w[j] /= s;
            }
            for (uint32_t j = 0; j < k; ++j) w[j] *= scaling;
        }
        for (uint32_t j = 0; j < k; ++j) {
            ids_out[t * k + j] = sel[j];
            w_out[t * k + j] = w[j];
        }
    }
}

// grid T, block 32: route_token of each token's logits [T][n_exp].
extern "C" __global__ void route(const float* logits, RouteSpec rs, int32_t* ids_out, float* w_out) {
    pdl_begin();
    __shared__ RouteSmem sm;
    route_token(rs, logits + (size_t)blockIdx.x * rs.n_exp, blockIdx.x, sm, ids_out, w_out);
}

// Router + routing with the post-attention norm fused in, for T ≤ TT tokens:
//   h[t] = rms_norm(x[t]) ⊙ nw          (written to `hout`, each block a slice)
//   logits[t][e] = W[e] · h[t] (+ bias)  (h normalised on the fly)
//   ids / weights = route_token(logits[t])  (by the last block to finish; ROUTE_WARPS at a time)
// Block b takes rows [b·rpb, (b+1)·rpb) with rpb = ceil(n_exp / gridDim.x); for each row its
// ROUTER_THREADS threads stride over the row's 16-byte vectors and reduce through shared memory.
// W is [n_exp, K] bf16 or f32 (16-byte rows: K % 8 or K % 4 == 0, 16-byte aligned x);
// `counter` is zero before the first launch. grid ≤ n_exp, block ROUTER_THREADS.
#define ROUTE_WARPS 4
#define ROUTER_THREADS 256
#define ROUTER_CACHED 2  // 16-byte vectors per thread the one-token path holds in registers

// The one-token path of router_route_body for bf16 weights when a block has one row and the row
// fits in ROUTER_CACHED vectors per thread: the block's loads (its weight row, x and the norm
// weight) are all issued at once, before the norm's reduction, instead of one round trip after
// another. The same products and sums, in the same order, as the general path.
__device__ void router_row_cached(const void* __restrict__ wv, const float* __restrict__ bias,
                                  const float* __restrict__ x, const float* __restrict__ nw,
                                  float eps, uint32_t kdim, uint32_t row, float* hout,
                                  float* logits) {
    __shared__ float red[32];
    __shared__ float wsum[ROUTER_THREADS / 32];
    const uint32_t nvec = kdim / 8, bd = blockDim.x, lane = threadIdx.x & 31, w = threadIdx.x >> 5;
    const uint4* wr = reinterpret_cast<const uint4*>(wv) + (size_t)row * nvec;
    const float4* x4 = reinterpret_cast<const float4*>(x);
    const float4* n4 = reinterpret_cast<const float4*>(nw);
    uint4 wq[ROUTER_CACHED];
    float4 xa[ROUTER_CACHED][2], na[ROUTER_CACHED][2];
#pragma unroll
    for (int m = 0; m < ROUTER_CACHED; ++m) {
        const uint32_t v = threadIdx.x + m * bd;
        const bool in = v < nvec;
        wq[m] = in ? __ldg(wr + v) : make_uint4(0, 0, 0, 0);
#pragma unroll
        for (int q = 0; q < 2; ++q) {
            xa[m][q] = in ? __ldg(x4 + 2 * v + q) : make_float4(0.f, 0.f, 0.f, 0.f);
            na[m][q] = in ? __ldg(n4 + 2 * v + q) : make_float4(0.f, 0.f, 0.f, 0.f);
        }
    }
    float ss = 0.f;
#pragma unroll
    for (int m = 0; m < ROUTER_CACHED; ++m)
#pragma unroll
        for (int q = 0; q < 2; ++q) {
            const float4 a = xa[m][q];
            ss = fmaf(a.x, a.x, ss);
            ss = fmaf(a.y, a.y, ss);
            ss = fmaf(a.z, a.z, ss);
            ss = fmaf(a.w, a.w, ss);
        }
    ss = block_sum(ss, red);
    const float rinv = 1.0f / sqrtf(ss / (float)kdim + eps);
    {  // this block's slice of h
        const uint32_t per = (kdim + gridDim.x - 1) / gridDim.x, lo = blockIdx.x * per;
        const uint32_t hi = min(kdim, lo + per);
        for (uint32_t i = lo + threadIdx.x; i < hi; i += bd)
            hout[i] = __fmul_rn(nw[i], __fmul_rn(x[i], rinv));
    }
    float acc = 0.f;
#pragma unroll
    for (int m = 0; m < ROUTER_CACHED; ++m) {
        if (threadIdx.x + m * bd >= nvec) break;
        const float wf[8] = {bf_lo(wq[m].x), bf_hi(wq[m].x), bf_lo(wq[m].y), bf_hi(wq[m].y),
                             bf_lo(wq[m].z), bf_hi(wq[m].z), bf_lo(wq[m].w), bf_hi(wq[m].w)};
#pragma unroll
        for (int q = 0; q < 2; ++q) {
            const float xs[4] = {xa[m][q].x, xa[m][q].y, xa[m][q].z, xa[m][q].w};
            const float ns[4] = {na[m][q].x, na[m][q].y, na[m][q].z, na[m][q].w};
#pragma unroll
            for (int e = 0; e < 4; ++e)
                acc = fmaf(wf[4 * q + e], __fmul_rn(ns[e], __fmul_rn(xs[e], rinv)), acc);
        }
    }
    const float sum = warp_sum(acc);
    if (lane == 0) wsum[w] = sum;
    __syncthreads();
    if (threadIdx.x == 0) {
        float total = 0.f;
        for (uint32_t q = 0; q < bd / 32; ++q) total += wsum[q];
        logits[row] = total + (bias ? bias[row] : 0.f);
    }
}

template <bool BF16, int TT>
__device__ void router_route_body(const void* __restrict__ wv, const float* __restrict__ bias,
                                  const float* __restrict__ x, const float* __restrict__ nw,
                                  float eps, uint32_t kdim, uint32_t t_count, float* hout,
                                  float* logits, RouteSpec rs, uint32_t* counter, int32_t* ids_out,
                                  float* w_out) {
    __shared__ float red[32];
    __shared__ float rinv[TT];
    __shared__ float wsum[ROUTER_THREADS / 32][TT];
    __shared__ RouteSmem rsm[ROUTE_WARPS];
    __shared__ float zs[ROUTE_WARPS][MAX_EXPERTS];
    constexpr int E = BF16 ? 8 : 4;
    pdl_begin();
    const uint32_t lane = threadIdx.x & 31, w = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
    const uint32_t rpb = (rs.n_exp + gridDim.x - 1) / gridDim.x;
    const uint32_t r0 = blockIdx.x * rpb, r1 = min(rs.n_exp, r0 + rpb);
    const uint32_t nvec = kdim / E;
    if (BF16 && TT == 1 && r1 == r0 + 1 && nvec <= ROUTER_CACHED * blockDim.x) {  // block-uniform
        router_row_cached(wv, bias, x, nw, eps, kdim, r0, hout, logits);
        if (last_block_done(counter, gridDim.x) && w == 0) {
            for (uint32_t i = lane; i < rs.n_exp; i += 32) zs[0][i] = __ldcg(logits + i);
            __syncwarp();
            route_token(rs, zs[0], 0, rsm[0], ids_out, w_out);
        }
        return;
    }
    for (uint32_t t = 0; t < t_count; ++t) {
        const float4* xr = reinterpret_cast<const float4*>(x + (size_t)t * kdim);
        // Thread i sums the weight vectors' spans v = i, i + blockDim.x, ... (E values each),
        // as router_row_cached does: a token's norm, and so its row of h and its logits, are
        // the same bits whichever path and pass size computes it (batched decode relies on it).
        float ss = 0.f;
        for (uint32_t v = threadIdx.x; v < kdim / E; v += blockDim.x) {
#pragma unroll
            for (int q = 0; q < E / 4; ++q) {
                const float4 a = __ldg(xr + v * (E / 4) + q);
                ss = fmaf(a.x, a.x, ss);
                ss = fmaf(a.y, a.y, ss);
                ss = fmaf(a.z, a.z, ss);
                ss = fmaf(a.w, a.w, ss);
            }
        }
        ss = block_sum(ss, red);
        if (threadIdx.x == 0) rinv[t] = 1.0f / sqrtf(ss / (float)kdim + eps);
    }
    __syncthreads();
    {  // this block's slice of h
        const uint32_t per = (kdim + gridDim.x - 1) / gridDim.x, lo = blockIdx.x * per;
        const uint32_t hi = min(kdim, lo + per);
        for (uint32_t t = 0; t < t_count; ++t)
            for (uint32_t i = lo + threadIdx.x; i < hi; i += blockDim.x)
                hout[(size_t)t * kdim + i] = __fmul_rn(nw[i], __fmul_rn(x[(size_t)t * kdim + i], rinv[t]));
    }
    for (uint32_t row = r0; row < r1; ++row) {
        const uint4* wr = reinterpret_cast<const uint4*>(wv) + (size_t)row * nvec;
        float acc[TT];
#pragma unroll
        for (int j = 0; j < TT; ++j) acc[j] = 0.f;
        for (uint32_t v = threadIdx.x; v < nvec; v += blockDim.x) {
            const uint4 wq = __ldg(wr + v);
            float wf[8];
            if (BF16) {
                wf[0] = bf_lo(wq.x); wf[1] = bf_hi(wq.x); wf[2] = bf_lo(wq.y); wf[3] = bf_hi(wq.y);
                wf[4] = bf_lo(wq.z); wf[5] = bf_hi(wq.z); wf[6] = bf_lo(wq.w); wf[7] = bf_hi(wq.w);
            } else {
                wf[0] = __uint_as_float(wq.x); wf[1] = __uint_as_float(wq.y);
                wf[2] = __uint_as_float(wq.z); wf[3] = __uint_as_float(wq.w);
            }
            float nwv[E];
#pragma unroll
            for (int q = 0; q < E / 4; ++q) {
                const float4 a = __ldg(reinterpret_cast<const float4*>(nw + v * E) + q);
                nwv[4 * q] = a.x; nwv[4 * q + 1] = a.y; nwv[4 * q + 2] = a.z; nwv[4 * q + 3] = a.w;
            }
#pragma unroll
            for (int j = 0; j < TT; ++j) {
                if ((uint32_t)j >= t_count) break;
                const float4* xp = reinterpret_cast<const float4*>(x + (size_t)j * kdim + v * E);
#pragma unroll
                for (int q = 0; q < E / 4; ++q) {
                    const float4 a = __ldg(xp + q);
                    const float xs[4] = {a.x, a.y, a.z, a.w};
#pragma unroll
                    for (int e = 0; e < 4; ++e)
                        acc[j] = fmaf(wf[4 * q + e],
                                      __fmul_rn(nwv[4 * q + e], __fmul_rn(xs[e], rinv[j])), acc[j]);
                }
            }
        }
#pragma unroll
        for (int j = 0; j < TT; ++j) {
            const float sum = warp_sum(acc[j]);
            if (lane == 0) wsum[w][j] = sum;
        }
        __syncthreads();
        if (threadIdx.x < t_count) {
            float sum = 0.f;
            for (uint32_t q = 0; q < nwarps; ++q) sum += wsum[q][threadIdx.x];
            logits[(size_t)threadIdx.x * rs.n_exp + row] = sum + (bias ? bias[row] : 0.f);
        }
        __syncthreads();
    }
    if (!last_block_done(counter, gridDim.x)) return;
    for (uint32_t t = w; t < t_count; t += ROUTE_WARPS) {
        if (w >= ROUTE_WARPS) break;
        for (uint32_t i = lane; i < rs.n_exp; i += 32) zs[w][i] = __ldcg(logits + (size_t)t * rs.n_exp + i);
        __syncwarp();
        route_token(rs, zs[w], t, rsm[w], ids_out, w_out);
        __syncwarp();
    }
}

#define ROUTER_ROUTE(NAME, BF, TT)                                                               \
    extern "C" __global__ void __launch_bounds__(ROUTER_THREADS) NAME(                           \
        const void* __restrict__ w, const float* __restrict__ bias, const float* __restrict__ x, \
        const float* __restrict__ nw, float eps, uint32_t kdim, uint32_t t_count, float* hout,   \
        float* logits, RouteSpec rs, uint32_t* counter, int32_t* ids_out, float* w_out) {        \
        router_route_body<BF, TT>(w, bias, x, nw, eps, kdim, t_count, hout, logits, rs, counter, \
                                  ids_out, w_out);                                               \
    }
ROUTER_ROUTE(router_route_bf16_t1, true, 1)
ROUTER_ROUTE(router_route_bf16_t2, true, 2)
ROUTER_ROUTE(router_route_bf16_t4, true, 4)
ROUTER_ROUTE(router_route_bf16_t8, true, 8)
ROUTER_ROUTE(router_route_bf16_t16, true, 16)
ROUTER_ROUTE(router_route_f32_t1, false, 1)
ROUTER_ROUTE(router_route_f32_t2, false, 2)
ROUTER_ROUTE(router_route_f32_t4, false, 4)
ROUTER_ROUTE(router_route_f32_t8, false, 8)
ROUTER_ROUTE(router_route_f32_t16, false, 16)

// ------------------------------------------------------------------------------------------
// Sampling (model::sampling): temperature, top-k (ties kept), top-p (smallest most-likely set
// reaching p, ties by lower id, 1e-6 relative tolerance), min-p, then inverse CDF in id order.
// One block of SAMPLE_THREADS.
// ------------------------------------------------------------------------------------------

#define SAMPLE_THREADS 1024

// model::sampling's exp_f32 (Cephes expf), every rounding explicit so it is bit-identical.
__device__ __forceinline__ float exp_f32(float x) {
    const float LOG2E = 1.44269504088896341f;
    const float C1 = 0.693359375f;
    const float C2 = -2.12194440e-4f;
    const float xc = fminf(fmaxf(x, -87.3f), 88.3f);
    const float n = __fsub_rn(__fadd_rn(__fmul_rn(xc, LOG2E), 12582912.0f), 12582912.0f);
    const float r = __fsub_rn(__fsub_rn(xc, __fmul_rn(n, C1)), __fmul_rn(n, C2));
    const float z = __fmul_rn(r, r);
    float poly = __fadd_rn(__fmul_rn(1.9875691e-4f, r), 1.3981999e-3f);
    poly = __fadd_rn(__fmul_rn(poly, r), 8.333452e-3f);
    poly = __fadd_rn(__fmul_rn(poly, r), 4.1665796e-2f);
    poly = __fadd_rn(__fmul_rn(poly, r), 1.6666665e-1f);
    poly = __fadd_rn(__fmul_rn(poly, r), 0.5f);
    const float e = __fadd_rn(__fadd_rn(__fmul_rn(poly, z), r), 1.0f);
    const float pow2 =
        __uint_as_float(__float_as_uint(__fadd_rn(__fadd_rn(n, 127.0f), 8388608.0f)) << 23);
    const float v = __fmul_rn(e, pow2);
    return x < -87.3f ? 0.f : v;
}

__device__ __forceinline__ uint32_t order_key(float x) {
    const uint32_t b = __float_as_uint(x);
    return (b & 0x80000000u) ? ~b : (b | 0x80000000u);
}
__device__ __forceinline__ float key_value(uint32_t k) {
    return __uint_as_float((k & 0x80000000u) ? (k & 0x7fffffffu) : ~k);
}

struct SampleState {
    float mx, inv_t, thr, minp;
    uint32_t tau;       // top-p crossing key (0 = no top-p cut)
    uint32_t tie_keep;  // how many of the tau-valued tokens (lowest ids first) are kept
    uint32_t tie_all;   // 1 when every tau-valued token is kept
};

__device__ __forceinline__ float sample_weight(const SampleState& st, float x) {
    return exp_f32(__fmul_rn(__fsub_rn(x, st.mx), st.inv_t));
}

// In the top-k set with a positive weight (before top-p / min-p).
__device__ __forceinline__ bool in_topk(const SampleState& st, float x, float w) {
    return x >= st.thr && w > 0.f;
}

// exp_f32(y) > 0 exactly when y ≥ −87.3 (its cut-off; 2^-126 at the cut-off is normal), so
// the top-k test needs no exp.
__device__ __forceinline__ bool in_topk_y(const SampleState& st, float x) {
    return x >= st.thr && __fmul_rn(__fsub_rn(x, st.mx), st.inv_t) >= -87.3f;
}

// Exclusive block scan of doubles (SAMPLE_THREADS values), in place in `buf`.
__device__ double block_exclusive_scan(double v, double* buf) {
    const uint32_t tid = threadIdx.x;
    buf[tid] = v;
    __syncthreads();
    for (uint32_t off = 1; off < SAMPLE_THREADS; off <<= 1) {
        const double add = tid >= off ? buf[tid - off] : 0.0;
        __syncthreads();
        buf[tid] += add;
        __syncthreads();
    }
    const double incl = buf[tid];
    __syncthreads();
    return incl - v;
}

// Same for unsigned 64-bit integers (exact).
__device__ uint64_t block_exclusive_scan_u64(uint64_t v, uint64_t* buf) {
    const uint32_t tid = threadIdx.x;
    buf[tid] = v;
    __syncthreads();
    for (uint32_t off = 1; off < SAMPLE_THREADS; off <<= 1) {
        const uint64_t add = tid >= off ? buf[tid - off] : 0ull;
        __syncthreads();
        buf[tid] += add;
        __syncthreads();
    }
    const uint64_t incl = buf[tid];
    __syncthreads();
    return incl - v;
}

// Coarse bins of the scaled logit y = (x − max)/T ≤ 0 (as model::sampling's top-p histogram):
// round(−32·y), the last bin also taking everything below. Monotone: a lower bin holds only
// larger logits, so the coarse pass spreads the histogram atomics over many addresses and the
// exact radix select only runs over the few tokens of the crossing bin.
#define SAMPLE_BINS 1024
__device__ __forceinline__ uint32_t sample_bin(const SampleState& st, float x) {
    const float y = __fmul_rn(__fsub_rn(x, st.mx), st.inv_t);
    return (uint32_t)rintf(fminf(-y * 32.0f, (float)(SAMPLE_BINS - 1)));
}

struct Shared {
    uint64_t met[SAMPLE_BINS];   // per coarse bin: count (by count) or fixed-point mass (by mass)
    uint64_t scanbuf[SAMPLE_THREADS];
    uint32_t hist[256];
    uint64_t hmass[256];
    uint32_t bin, prefix, found;
    uint64_t before;
};

// Among the candidates (top-k set when `in_k`, else every token), in descending logit order,
// finds the crossing value: by count (`by_mass` false) the need-th largest logit; by mass the
// first value at which the fixed-point mass of everything larger plus its own reaches `target`.
// Leaves in sh: prefix = key of that value, before = count / mass strictly above it, and
// hist[prefix & 0xff] = how many tokens have that value. found = 0 when the whole mass is below
// target (rounding): then every candidate is kept.
__device__ void crossing_select(const float* logits, uint32_t v, const SampleState& st,
                                bool in_k, bool by_mass, double target, uint64_t need,
                                double fx_scale, Shared& sh) {
    const uint32_t tid = threadIdx.x;
    for (uint32_t i = tid; i < SAMPLE_BINS; i += SAMPLE_THREADS) sh.met[i] = 0;
    __syncthreads();
    for (uint32_t i = tid; i < v; i += SAMPLE_THREADS) {
        const float x = sane_logit(logits[i]);
        if (in_k && !in_topk_y(st, x)) continue;
        const uint64_t add =
            by_mass ? (uint64_t)((double)sample_weight(st, x) * fx_scale) : 1ull;
        if (add) atomicAdd((unsigned long long*)&sh.met[sample_bin(st, x)], (unsigned long long)add);
    }
    __syncthreads();
    // One bin per thread (SAMPLE_BINS == SAMPLE_THREADS).
    const uint64_t m = sh.met[tid];
    const uint64_t ex = block_exclusive_scan_u64(m, sh.scanbuf);
    if (tid == 0) sh.found = 0;
    __syncthreads();
    const bool cross = by_mass ? ((double)ex < target && (double)(ex + m) >= target)
                               : (ex < need && ex + m >= need);
    if (cross) {
        sh.bin = tid;
        sh.before = ex;
        sh.found = 1;
    }
    __syncthreads();
    if (!sh.found) return;
    const uint32_t bin = sh.bin;
    if (tid == 0) sh.prefix = 0;
    for (int shift = 24; shift >= 0; shift -= 8) {
        for (uint32_t i = tid; i < 256; i += SAMPLE_THREADS) {
            sh.hist[i] = 0;
            sh.hmass[i] = 0;
        }
        __syncthreads();
        const uint32_t hi_mask = shift == 24 ? 0u : (0xffffffffu << (shift + 8));
        const uint32_t prefix = sh.prefix;
        for (uint32_t i = tid; i < v; i += SAMPLE_THREADS) {
            const float x = sane_logit(logits[i]);
            if (sample_bin(st, x) != bin) continue;
            if (in_k && !in_topk_y(st, x)) continue;
            const uint32_t key = order_key(x);
            if ((key & hi_mask) != prefix) continue;
            const uint32_t dg = (key >> shift) & 0xff;
            atomicAdd(&sh.hist[dg], 1u);
            if (by_mass) {
                const uint64_t add = (uint64_t)((double)sample_weight(st, x) * fx_scale);
                if (add) atomicAdd((unsigned long long*)&sh.hmass[dg], (unsigned long long)add);
            }
        }
        __syncthreads();
        if (tid == 0) {
            uint64_t before = sh.before;
            int d = 255, lowest = 0;
            for (; d >= 0; --d) {
                if (sh.hist[d] == 0) continue;
                lowest = d;
                const uint64_t mm = by_mass ? sh.hmass[d] : sh.hist[d];
                if (by_mass ? (double)(before + mm) >= target : before + mm >= need) break;
                before += mm;
            }
            if (d < 0) {  // rounding between the coarse and fine sums: the last non-empty digit
                d = lowest;
                before -= by_mass ? sh.hmass[d] : sh.hist[d];
            }
            sh.before = before;
            sh.prefix = prefix | ((uint32_t)d << shift);
        }
        __syncthreads();
    }
}

extern "C" __global__ void __launch_bounds__(SAMPLE_THREADS)
    sample(const float* logits, uint32_t v, float temperature, uint32_t top_k, float top_p,
           float min_p, const float* uniform, uint32_t* out) {
    pdl_begin();
    __shared__ float redf[32];
    __shared__ double scan[SAMPLE_THREADS];
    __shared__ SampleState st;
    __shared__ Shared sh;
    __shared__ uint32_t sh_found;
    const uint32_t tid = threadIdx.x;

    // 1. Max.
    float mx = -INFINITY;
    for (uint32_t i = tid; i < v; i += SAMPLE_THREADS) mx = fmaxf(mx, sane_logit(logits[i]));
    mx = block_max(mx, redf);
    if (mx == -INFINITY) {
        if (tid == 0) out[0] = 0;
        return;
    }
    if (tid == 0) {
        st.mx = mx;
        st.inv_t = 1.0f / temperature;
        st.thr = -INFINITY;
        st.minp = min_p > 0.f ? min_p : 0.f;
        st.tau = 0;
        st.tie_keep = 0;
        st.tie_all = 1;
    }
    __syncthreads();
    // Fixed-point scale of the masses: v terms of at most 1 stay below 2^62.
    const double fx_scale = ldexp(1.0, 62 - (32 - __clz(v)));

    // 2. Top-k threshold: the k-th largest logit; every logit ≥ it is kept (ties kept).
    if (top_k > 0 && top_k < v) {
        crossing_select(logits, v, st, false, false, 0.0, top_k, fx_scale, sh);
        if (tid == 0) st.thr = key_value(sh.prefix);
        __syncthreads();
    }

    // 3. Top-p: the crossing value tau in descending order by mass, then how many of the
    // tau-valued tokens (lowest ids first) are kept.
    if (top_p < 1.0f) {
        uint64_t tot = 0;  // (per thread, then reduced exactly through the scan)
        for (uint32_t i = tid; i < v; i += SAMPLE_THREADS) {
            const float x = sane_logit(logits[i]);
            const float w = sample_weight(st, x);
            if (in_topk(st, x, w)) tot += (uint64_t)((double)w * fx_scale);
        }
        const uint64_t ex = block_exclusive_scan_u64(tot, sh.scanbuf);
        if (tid == SAMPLE_THREADS - 1) sh.before = ex + tot;
        __syncthreads();
        const double target = (double)top_p * (double)sh.before * (1.0 - 1e-6);
        __syncthreads();
        crossing_select(logits, v, st, true, true, target, 0, fx_scale, sh);
        if (tid == 0 && sh.found) {
            // hist[d] tokens share the value tau and the weight w_tau; the first is kept, the
            // j-th (j ≥ 1) while before + j·w_tau < target.
            const uint32_t cnt = sh.hist[sh.prefix & 0xff];
            const double before = (double)sh.before;
            const double w = (double)(uint64_t)((double)sample_weight(st, key_value(sh.prefix)) * fx_scale);
            uint32_t keep = cnt;
            if (w > 0.0) {
                double j = ceil((target - before) / w);
                if (j < 1.0) j = 1.0;
                if (j > (double)cnt) j = (double)cnt;
                uint32_t jj = (uint32_t)j;
                while (jj > 1 && before + (double)(jj - 1) * w >= target) --jj;
                while (jj < cnt && before + (double)jj * w < target) ++jj;
                keep = jj;
            }
            st.tau = sh.prefix;
            st.tie_keep = keep;
            st.tie_all = keep >= cnt;
        }
        __syncthreads();
    }

    // 4. Draw: contiguous chunks per thread, block scan of the kept mass, inverse CDF.
    const uint32_t chunk = (v + SAMPLE_THREADS - 1) / SAMPLE_THREADS;
    const uint32_t i0 = min(v, tid * chunk), i1 = min(v, i0 + chunk);
    const bool topp = top_p < 1.0f && st.tau != 0;
    // Ranks of the tau-valued tokens (needed only when some of them are cut).
    uint32_t tie_before = 0;
    if (topp && !st.tie_all) {
        uint32_t c = 0;
        for (uint32_t i = i0; i < i1; ++i) {
            const float x = sane_logit(logits[i]);
            if (in_topk_y(st, x) && order_key(x) == st.tau) ++c;
        }
        tie_before = (uint32_t)block_exclusive_scan((double)c, scan);
    }
    double mass = 0.0;
    int last_kept = -1;
    {
        uint32_t tie = tie_before;
        for (uint32_t i = i0; i < i1; ++i) {
            const float x = sane_logit(logits[i]);
            const float w = sample_weight(st, x);
            bool kept = in_topk(st, x, w) && w >= st.minp;
            if (kept && topp) {
                const uint32_t key = order_key(x);
                if (key < st.tau) kept = false;
                else if (key == st.tau && !st.tie_all) kept = tie++ < st.tie_keep;
            }
            if (kept) {
                mass += (double)w;
                last_kept = (int)i;
            }
        }
    }
    const double before = block_exclusive_scan(mass, scan);
    __shared__ double sh_total;
    __shared__ int sh_last;
    if (tid == SAMPLE_THREADS - 1) sh_total = before + mass;
    if (tid == 0) {
        sh_found = 0;
        sh_last = -1;
    }
    __syncthreads();
    if (last_kept >= 0) atomicMax(&sh_last, last_kept);
    const double u = (double)uniform[0] * sh_total;
    if (mass > 0.0 && u >= before && u < before + mass) {
        double acc = before;
        uint32_t tie = tie_before;
        for (uint32_t i = i0; i < i1; ++i) {
            const float x = sane_logit(logits[i]);
            const float w = sample_weight(st, x);
            bool kept = in_topk(st, x, w) && w >= st.minp;
            if (kept && topp) {
                const uint32_t key = order_key(x);
                if (key < st.tau) kept = false;
                else if (key == st.tau && !st.tie_all) kept = tie++ < st.tie_keep;
            }
            if (!kept) continue;
            acc += (double)w;
            if (u < acc) {
                out[0] = i;
                sh_found = 1;
                break;
            }
        }
        if (!sh_found) {  // rounding inside the chunk: its last kept token
            out[0] = (uint32_t)last_kept;
            sh_found = 1;
        }
    }
    __syncthreads();
    if (tid == 0 && !sh_found) out[0] = sh_last >= 0 ? (uint32_t)sh_last : 0u;
}

// ------------------------------------------------------------------------------------------
// Batched decode (crates/tilert/src/ops/rows.rs): one pass over T rows, each row the next token
// of its own sequence — its own KV cache, position and key splits, read from a per-row table in
// device memory (written before each graph replay). Everything else in the pass is the same
// kernels as a T-token pass; these variants only replace the ops that touch the KV cache.
// ------------------------------------------------------------------------------------------

// One row of one layer (`ops::rows::KvRow`): the row's sequence's cache of the layer, the
// position of the row's token and its attention key splits. 32 bytes.
struct KvRow {
    float* k_cache;
    float* v_cache;
    uint32_t capacity;
    uint32_t pos;
    uint32_t splits;
    uint32_t pad;
};

// The fused QKV projection's destinations for a batched pass: q rows to ro.q_out, k and v into
// each row's own cache (ro's step / k_cache / v_cache / capacity are unused).
struct RopeOutRows {
    RopeOut ro;
    const KvRow* rows;
};

__device__ __forceinline__ void rope_store(const RopeOutRows& rr, uint32_t row0, uint32_t n,
                                           uint32_t t, float v0, float v1) {
    const KvRow& r = rr.rows[t];
    rope_store_kv(rr.ro, r.pos, r.k_cache, r.v_cache, r.capacity, row0, n, t, v0, v1);
}

#define LINEAR_QKV_ROPE_ROWS(NAME, BF, TT, U)                                                   \
    extern "C" __global__ void __launch_bounds__(128) NAME(                                      \
        const void* __restrict__ w, const float* __restrict__ bias, const float* __restrict__ x, \
        uint32_t n, uint32_t k, uint32_t t, RopeOutRows rr) {                                    \
        linear_vec<BF, TT, 2, U, true, RopeOutRows>(w, bias, x, nullptr, n, k, t, 0, 0, &rr);    \
    }
LINEAR_QKV_ROPE_ROWS(linear_qkv_rope_rows_bf16_t1, true, 1, 4)
LINEAR_QKV_ROPE_ROWS(linear_qkv_rope_rows_bf16_t2, true, 2, 2)
LINEAR_QKV_ROPE_ROWS(linear_qkv_rope_rows_bf16_t4, true, 4, 2)
LINEAR_QKV_ROPE_ROWS(linear_qkv_rope_rows_bf16_t8, true, 8, 1)
LINEAR_QKV_ROPE_ROWS(linear_qkv_rope_rows_bf16_t16, true, 16, 1)
LINEAR_QKV_ROPE_ROWS(linear_qkv_rope_rows_f32_t1, false, 1, 4)
LINEAR_QKV_ROPE_ROWS(linear_qkv_rope_rows_f32_t2, false, 2, 2)
LINEAR_QKV_ROPE_ROWS(linear_qkv_rope_rows_f32_t4, false, 4, 2)
LINEAR_QKV_ROPE_ROWS(linear_qkv_rope_rows_f32_t8, false, 8, 1)
LINEAR_QKV_ROPE_ROWS(linear_qkv_rope_rows_f32_t16, false, 16, 1)

// rope_kv_write with row t's position and cache from rows[t]. grid (n_heads + 2·n_kv, T).
extern "C" __global__ void rope_kv_write_rows(const float* qkv, const KvRow* rows, uint32_t nh,
                                              uint32_t nkv, uint32_t d, uint32_t dv, uint32_t rot,
                                              const float* inv_freq, float attn_factor,
                                              const float* q_norm, const float* k_norm,
                                              float eps, float value_scale, float* q_out) {
    pdl_begin();
    const uint32_t t = blockIdx.y;
    const KvRow r = rows[t];
    rope_kv_write_row(qkv, r.pos, t, nh, nkv, d, dv, rot, inv_freq, attn_factor, q_norm, k_norm,
                      eps, value_scale, q_out, r.k_cache, r.v_cache, r.capacity);
}

// Causal decode attention of row t's one query (position rows[t].pos) over its own cache, cut
// into rows[t].splits key splits (≤ gridDim.x): exactly the blocks attention_gqa runs for that
// sequence's one-token pass. grid (max splits, nkv, T); scratch as attention_gqa's.
extern "C" __global__ void __launch_bounds__(256)
    attention_gqa_rows(const float* q, const KvRow* rows, uint32_t nh, uint32_t nkv, uint32_t d,
                       uint32_t dv, uint32_t window, float scale, const float* sinks,
                       float* scratch, float* out) {
    pdl_begin();
    attention_gqa_block(q, gridDim.x, nh, nkv, d, dv, scale, sinks, scratch, out, [&]() {
        const KvRow r = rows[blockIdx.z];
        AttKeys k{r.k_cache, r.v_cache, 0, 0, r.capacity, r.splits};
        visible_keys(r.pos, 0, 1, 1, window, &k.first, &k.last);
        return k;
    });
}
