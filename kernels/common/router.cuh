// Routing (moe::route_into) and the router projection with the post-attention norm fused in:
// tile bodies shared by the standalone kernels (router.cu) and the persistent engine
// (persistent.cu).
#pragma once
#include <stdint.h>
#include <float.h>

#include "common/abi.cuh"
#include "common/math.cuh"
#include "common/reduce.cuh"
#include "common/tile.cuh"

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


// The routing parameters of one MoE layer are RouteSpec (common/abi.cuh).

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

// Router + routing with the post-attention norm fused in, for T ≤ TT tokens:
//   h[t] = rms_norm(x[t]) ⊙ nw          (written to `hout`, each block a slice)
//   logits[t][e] = W[e] · h[t] (+ bias)  (h normalised on the fly)
//   ids / weights = route_token(logits[t])  (by the last block to finish; ROUTE_WARPS at a time)
// Block b takes rows [b·rpb, (b+1)·rpb) with rpb = ceil(n_exp / nblk) (grid: nblk = gridDim.x, b = blockIdx.x); for each row its
// ROUTER_THREADS threads stride over the row's 16-byte vectors and reduce through shared memory.
// W is [n_exp, K] bf16 or f32 (16-byte rows: K % 8 or K % 4 == 0, 16-byte aligned x);
// `counter` is zero before the first launch. grid ≤ n_exp, block ROUTER_THREADS.
#define ROUTE_WARPS 4
#define ROUTER_CACHED 2  // 16-byte vectors per thread the one-token path holds in registers

// The one-token path of router_route_body for bf16 weights when a block has one row and the row
// fits in ROUTER_CACHED vectors per thread: the block's loads (its weight row, x and the norm
// weight) are all issued at once, before the norm's reduction, instead of one round trip after
// another. The same products and sums, in the same order, as the general path.
__device__ void router_row_cached(uint32_t blk, uint32_t nblk, const void* __restrict__ wv,
                                  const float* __restrict__ bias,
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
        const uint32_t per = (kdim + nblk - 1) / nblk, lo = blk * per;
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

// This thread's part of the sum of squares of the router's norm of one row: thread i sums the
// weight vectors' spans v = i, i + blockDim.x, ... (E values each), as router_row_cached does:
// a token's norm, and so its row of h and its logits, are the same bits whichever path and pass
// size computes it (batched decode and the persistent engine rely on it).
template <int E>
__device__ __forceinline__ float router_sq_sum(const float* xrow, uint32_t kdim) {
    const float4* xr = reinterpret_cast<const float4*>(xrow);
    float ss = 0.f;
    for (uint32_t v = threadIdx.x; v < kdim / E; v += blockDim.x) {
#pragma unroll
        for (int q = 0; q < E / 4; ++q) {
            const float4 a = ld_act(xr + v * (E / 4) + q);
            ss = fmaf(a.x, a.x, ss);
            ss = fmaf(a.y, a.y, ss);
            ss = fmaf(a.z, a.z, ss);
            ss = fmaf(a.w, a.w, ss);
        }
    }
    return ss;
}

// The router's norm of one row by the calling block of ROUTER_THREADS threads (the persistent
// engine's norm phase before its router tiles): hout = nw ⊙ (x · rinv), rinv as
// router_route_block computes it, so h is the fused router's h.
template <int E>
__device__ __forceinline__ void router_norm_row(const float* x, const float* nw, uint32_t kdim,
                                                float eps, float* hout) {
    __shared__ float red[32];
    const float ss = block_sum(router_sq_sum<E>(x, kdim), red);
    const float rinv = 1.0f / sqrtf(ss / (float)kdim + eps);
    for (uint32_t i = threadIdx.x; i < kdim; i += blockDim.x)
        hout[i] = __fmul_rn(nw[i], __fmul_rn(x[i], rinv));
}

// Router logit `row` of one token from its normed row h (= nw ⊙ (x · rinv), as the fused router
// forms each product on the fly) by the calling block of ROUTER_THREADS threads: the products,
// the per-thread FMA chains over vectors v = tid, tid + blockDim.x, ..., the warp butterflies and
// the warp-order sum of router_route_block, so the logit is the fused router's bits.
template <bool BF16>
__device__ __forceinline__ void router_logit_h(const void* __restrict__ wv,
                                               const float* __restrict__ bias,
                                               const float* __restrict__ h, uint32_t kdim,
                                               uint32_t row, float* logits) {
    constexpr int E = BF16 ? 8 : 4;
    __shared__ float wsum[ROUTER_THREADS / 32];
    const uint32_t nvec = kdim / E, lane = threadIdx.x & 31, w = threadIdx.x >> 5;
    const uint4* wr = reinterpret_cast<const uint4*>(wv) + (size_t)row * nvec;
    float acc = 0.f;
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
#pragma unroll
        for (int q = 0; q < E / 4; ++q) {
            const float4 a = *reinterpret_cast<const float4*>(h + v * E + 4 * q);
            const float hs[4] = {a.x, a.y, a.z, a.w};
#pragma unroll
            for (int e = 0; e < 4; ++e) acc = fmaf(wf[4 * q + e], hs[e], acc);
        }
    }
    const float sum = warp_sum(acc);
    __syncthreads();  // wsum of the previous row is consumed
    if (lane == 0) wsum[w] = sum;
    __syncthreads();
    if (threadIdx.x == 0) {
        float total = 0.f;
        for (uint32_t q = 0; q < blockDim.x / 32; ++q) total += wsum[q];
        logits[row] = total + (bias ? bias[row] : 0.f);
    }
}

// router_route_block is block `blk` of a grid of `nblk`.
template <bool BF16, int TT>
__device__ void router_route_block(uint32_t blk, uint32_t nblk, const void* __restrict__ wv,
                                   const float* __restrict__ bias,
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
    const uint32_t lane = threadIdx.x & 31, w = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
    const uint32_t rpb = (rs.n_exp + nblk - 1) / nblk;
    const uint32_t r0 = blk * rpb, r1 = min(rs.n_exp, r0 + rpb);
    const uint32_t nvec = kdim / E;
    if (BF16 && TT == 1 && r1 == r0 + 1 && nvec <= ROUTER_CACHED * blockDim.x) {  // block-uniform
        router_row_cached(blk, nblk, wv, bias, x, nw, eps, kdim, r0, hout, logits);
        if (last_block_done(counter, nblk) && w == 0) {
            for (uint32_t i = lane; i < rs.n_exp; i += 32) zs[0][i] = __ldcg(logits + i);
            __syncwarp();
            route_token(rs, zs[0], 0, rsm[0], ids_out, w_out);
        }
        return;
    }
    for (uint32_t t = 0; t < t_count; ++t) {
        float ss = router_sq_sum<E>(x + (size_t)t * kdim, kdim);
        ss = block_sum(ss, red);
        if (threadIdx.x == 0) rinv[t] = 1.0f / sqrtf(ss / (float)kdim + eps);
    }
    __syncthreads();
    {  // this block's slice of h
        const uint32_t per = (kdim + nblk - 1) / nblk, lo = blk * per;
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
    if (!last_block_done(counter, nblk)) return;
    for (uint32_t t = w; t < t_count; t += ROUTE_WARPS) {
        if (w >= ROUTE_WARPS) break;
        for (uint32_t i = lane; i < rs.n_exp; i += 32) zs[w][i] = __ldcg(logits + (size_t)t * rs.n_exp + i);
        __syncwarp();
        route_token(rs, zs[w], t, rsm[w], ids_out, w_out);
        __syncwarp();
    }
}

