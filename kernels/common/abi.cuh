// The kernel ABI shared with Rust: every struct a kernel takes by value (or reads from a table in
// device memory) and every limit the host checks arguments against. This file is THE definition
// on the CUDA side; the Rust side is crates/tilert/src/abi.rs, and its layout test
// (`abi::tests`) reads this file: the size and field offsets asserted below must equal the Rust
// structs' `size_of` / `offset_of!`, and each limit must equal the Rust constant of the same
// name. nvcc checks the asserts on every `cargo xtask kernels`; the test in crates/kernels checks
// them with the host C++ compiler (the ABI Rust's #[repr(C)] follows).
//
// Plain C++ only (no CUDA types or qualifiers): it must compile with g++ as well as nvcc.
// Padding fields are not part of the contract (the size and the neighbours' offsets cover them).
#pragma once
#include <stddef.h>
#include <stdint.h>

#define ULTRA_ABI_SIZE(S, N) static_assert(sizeof(S) == N, "ABI: sizeof(" #S ") != " #N)
#define ULTRA_ABI_FIELD(S, F, N) \
    static_assert(offsetof(S, F) == N, "ABI: offsetof(" #S ", " #F ") != " #N)

// ---- Limits ------------------------------------------------------------------------------

// Most tokens (rows) one pass handles: verify blocks, prefill chunks, batched decode rows.
#define MAX_TOKENS 16
// Threads per block of the vectorised linear kernels (4 warps).
#define LINEAR_THREADS 128
// Largest head dim (and value head dim) of the RoPE / attention kernels.
#define MAX_HEAD_DIM 256
// Attention: keys per shared-memory tile, most warps per block, most key splits.
#define ATT_TILE 32
#define ATT_MAX_WARPS 8
#define ATT_MAX_SPLITS 64
// Routing: most experts / selected experts of the router kernels; threads of the fused router.
#define MAX_EXPERTS 384
#define MAX_TOPK 16
#define ROUTER_THREADS 256
// Threads of the sampler (one block per row); most rows of one `sample_rows` launch.
#define SAMPLE_THREADS 1024
#define SAMPLE_MAX_ROWS 64

// Dense projections from tiled FP8 / BF16 weights (proj.cu): most threads per CTA, rows per tile
// (row group), FP8 scale block edge (rows and columns), threads per CTA of the stream-K kernels.
#define PROJ_MAX_THREADS 512
#define PROJ_SK_THREADS 128
#define PROJ_TILE_ROWS 16
#define FP8_BLOCK 128
// The bulk-copy (TMA) projection kernels: threads per CTA, tiles per shared-memory stage (16 KB),
// most stages per CTA.
#define PROJ_BULK_THREADS 256
#define PROJ_BULK_STAGE_TILES 32
#define PROJ_BULK_MAX_STAGES 16

// MXFP4 GEMV (mxfp4.cu): most warps per block.
constexpr int GEMV_MAX_WARPS = 16;
// Routed experts (mxfp4.cu): most (token, expert) entries per launch (MAX_TOKENS · top-k), bitmap
// words of the expert table (32 experts each), most warps per CTA.
constexpr uint32_t MOE_MAX_IDS = 256;
constexpr uint32_t MOE_MAX_EXPERT_WORDS = 64;
constexpr uint32_t MOE_MAX_WARPS = 16;

// ---- Structs -----------------------------------------------------------------------------

// Where a fused QKV projection's rows go (linear_qkv_rope, rope.cu): q to q_out [T][nh][d], k and
// v into the cache slots of positions step[0] + t, RoPE applied on the way as rope_kv_write does
// (no q/k norm). The weight rows are uploaded in "rope pair order": within each q and k head, rows
// (2i, 2i + 1) for 2i < rot are dims (i, i + rot/2), then dims rot.. d in order; v rows as is.
struct RopeOut {
    const uint32_t* step;
    const float* inv_freq;
    float* q_out;
    float* k_cache;
    float* v_cache;
    uint32_t nh, nkv, d, dv, rot, capacity;
    float attn_factor, value_scale;
    const uint32_t* blocks;
    uint32_t block_size;
    uint32_t pad;
};
ULTRA_ABI_SIZE(RopeOut, 88);
ULTRA_ABI_FIELD(RopeOut, step, 0);
ULTRA_ABI_FIELD(RopeOut, inv_freq, 8);
ULTRA_ABI_FIELD(RopeOut, q_out, 16);
ULTRA_ABI_FIELD(RopeOut, k_cache, 24);
ULTRA_ABI_FIELD(RopeOut, v_cache, 32);
ULTRA_ABI_FIELD(RopeOut, nh, 40);
ULTRA_ABI_FIELD(RopeOut, nkv, 44);
ULTRA_ABI_FIELD(RopeOut, d, 48);
ULTRA_ABI_FIELD(RopeOut, dv, 52);
ULTRA_ABI_FIELD(RopeOut, rot, 56);
ULTRA_ABI_FIELD(RopeOut, capacity, 60);
ULTRA_ABI_FIELD(RopeOut, attn_factor, 64);
ULTRA_ABI_FIELD(RopeOut, value_scale, 68);
ULTRA_ABI_FIELD(RopeOut, blocks, 72);
ULTRA_ABI_FIELD(RopeOut, block_size, 80);

// One row of one layer of a batched decode pass (`ops::rows::KvRow`): the row's sequence's cache
// of the layer (contiguous, or a block pool read through the block table `blocks` of
// `block_size` slots: common/kv.cuh), the position of the row's token and its attention key
// splits.
struct KvRow {
    float* k_cache;
    float* v_cache;
    uint32_t capacity;
    uint32_t pos;
    uint32_t splits;
    uint32_t block_size;
    const uint32_t* blocks;
};
ULTRA_ABI_SIZE(KvRow, 40);
ULTRA_ABI_FIELD(KvRow, k_cache, 0);
ULTRA_ABI_FIELD(KvRow, v_cache, 8);
ULTRA_ABI_FIELD(KvRow, capacity, 16);
ULTRA_ABI_FIELD(KvRow, pos, 20);
ULTRA_ABI_FIELD(KvRow, splits, 24);
ULTRA_ABI_FIELD(KvRow, block_size, 28);
ULTRA_ABI_FIELD(KvRow, blocks, 32);

// The fused QKV projection's destinations for a batched pass: q rows to ro.q_out, k and v into
// each row's own cache (ro's step / k_cache / v_cache / capacity are unused).
struct RopeOutRows {
    RopeOut ro;
    const KvRow* rows;
};
ULTRA_ABI_SIZE(RopeOutRows, 96);
ULTRA_ABI_FIELD(RopeOutRows, ro, 0);
ULTRA_ABI_FIELD(RopeOutRows, rows, 88);

// The routing parameters of one MoE layer (`RouteArgs` on the host).
struct RouteSpec {
    uint32_t n_exp, k, kind, norm_topk;  // kind 0 = gpt-oss, 1 = Qwen3-MoE, 2 = sigmoid
    const float* corr_bias;
    uint32_t n_group, topk_group;
    float scaling;
};
ULTRA_ABI_SIZE(RouteSpec, 40);
ULTRA_ABI_FIELD(RouteSpec, n_exp, 0);
ULTRA_ABI_FIELD(RouteSpec, k, 4);
ULTRA_ABI_FIELD(RouteSpec, kind, 8);
ULTRA_ABI_FIELD(RouteSpec, norm_topk, 12);
ULTRA_ABI_FIELD(RouteSpec, corr_bias, 16);
ULTRA_ABI_FIELD(RouteSpec, n_group, 24);
ULTRA_ABI_FIELD(RouteSpec, topk_group, 28);
ULTRA_ABI_FIELD(RouteSpec, scaling, 32);

// The routed-expert kernels' parameters (mxfp4.cu: moe_mx_*, moe_dense_*; tilert's `moe.rs`).
struct MoeParams {
    const uint8_t* w;        // MXFP4: tiled codes; dense: [E * rows, K] bf16 or f32
    const uint8_t* scales;   // MXFP4: tiled scale bytes
    const int32_t* ids;      // [n_ids]
    const float* x;          // input of entry e: row e / x_div, K values
    const float* bias;       // [E, rows] or null
    const float* route_w;    // [n_ids] (down) or null
    float* out;
    uint32_t n_experts, rows, k, n_ids;
    uint32_t x_div;          // gate_up: k (tokens' hidden states shared by their k entries); down: 1
    uint32_t row_groups;     // MXFP4: 16-row groups per CTA
    uint32_t glu;            // 0: clamped SwiGLU (alpha, limit); 1: SwiGLU
    uint32_t pad_;
    float alpha, limit;
};
ULTRA_ABI_SIZE(MoeParams, 96);
ULTRA_ABI_FIELD(MoeParams, w, 0);
ULTRA_ABI_FIELD(MoeParams, scales, 8);
ULTRA_ABI_FIELD(MoeParams, ids, 16);
ULTRA_ABI_FIELD(MoeParams, x, 24);
ULTRA_ABI_FIELD(MoeParams, bias, 32);
ULTRA_ABI_FIELD(MoeParams, route_w, 40);
ULTRA_ABI_FIELD(MoeParams, out, 48);
ULTRA_ABI_FIELD(MoeParams, n_experts, 56);
ULTRA_ABI_FIELD(MoeParams, rows, 60);
ULTRA_ABI_FIELD(MoeParams, k, 64);
ULTRA_ABI_FIELD(MoeParams, n_ids, 68);
ULTRA_ABI_FIELD(MoeParams, x_div, 72);
ULTRA_ABI_FIELD(MoeParams, row_groups, 76);
ULTRA_ABI_FIELD(MoeParams, glu, 80);
ULTRA_ABI_FIELD(MoeParams, alpha, 88);
ULTRA_ABI_FIELD(MoeParams, limit, 92);

// One row of a batched sampling launch (`sample_rows`, sampling.cu; tilert's `SampleRow`): where
// the row's logits are, the request's token history for the penalties, its sampling parameters
// (model::sampling's SamplingParams, with "off" spelled as the neutral value) and the position of
// its next uniform in its seeded ChaCha20 stream (model::sampling::UniformStream).
struct SampleRow {
    const float* logits;        // V values
    const uint32_t* history;    // prompt_len prompt ids, then generated_len generated ids
    uint32_t prompt_len, generated_len;
    uint32_t greedy;            // 1: the penalized argmax (SamplingParams::is_greedy)
    uint32_t top_k;             // 0: off
    float temperature;
    float top_p;                // 1: off
    float min_p;                // 0: off
    float repetition_penalty;   // 1: off
    float presence_penalty, frequency_penalty;
    uint32_t key[8];            // ChaCha20 key of the request's seed
    uint64_t word_pos;          // word offset of the row's uniform in that stream
};
ULTRA_ABI_SIZE(SampleRow, 96);
ULTRA_ABI_FIELD(SampleRow, logits, 0);
ULTRA_ABI_FIELD(SampleRow, history, 8);
ULTRA_ABI_FIELD(SampleRow, prompt_len, 16);
ULTRA_ABI_FIELD(SampleRow, generated_len, 20);
ULTRA_ABI_FIELD(SampleRow, greedy, 24);
ULTRA_ABI_FIELD(SampleRow, top_k, 28);
ULTRA_ABI_FIELD(SampleRow, temperature, 32);
ULTRA_ABI_FIELD(SampleRow, top_p, 36);
ULTRA_ABI_FIELD(SampleRow, min_p, 40);
ULTRA_ABI_FIELD(SampleRow, repetition_penalty, 44);
ULTRA_ABI_FIELD(SampleRow, presence_penalty, 48);
ULTRA_ABI_FIELD(SampleRow, frequency_penalty, 52);
ULTRA_ABI_FIELD(SampleRow, key, 56);
ULTRA_ABI_FIELD(SampleRow, word_pos, 88);

// One verify block of a batched exact-acceptance launch (`accept_rows`, sampling.cu; tilert's
// `AcceptRow`): dflash's rule over the block's n drafts. s.logits holds the n + 1 target rows
// [n + 1][V]; s.history the prompt, then the generated ids, then (at drafts) the n drafts, the
// penalties of row i reading generated_len + i generated ids; s.word_pos the first uniform.
struct AcceptRow {
    SampleRow s;
    const float* draft_logits;  // [n][V]: the drafter's rows, q = the request's distribution of them
    const uint32_t* drafts;     // [n]
    uint32_t n, pad;
};
ULTRA_ABI_SIZE(AcceptRow, 120);
ULTRA_ABI_FIELD(AcceptRow, s, 0);
ULTRA_ABI_FIELD(AcceptRow, draft_logits, 96);
ULTRA_ABI_FIELD(AcceptRow, drafts, 104);
ULTRA_ABI_FIELD(AcceptRow, n, 112);
