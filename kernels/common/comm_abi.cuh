// The ABI of the communication kernels (kernels/comm.cu, device code in common/allreduce.cuh),
// shared with Rust: crates/comm/src/abi.rs mirrors it, and its layout test reads this file (the
// size and field offsets asserted below must equal the Rust struct's `size_of` / `offset_of!`,
// each limit the Rust constant of the same name). nvcc checks the asserts on every
// `cargo xtask kernels`.
//
// Plain C++ only (no CUDA types or qualifiers): it must compile with g++ as well as nvcc.
#pragma once
#include <stddef.h>
#include <stdint.h>

#define COMM_ABI_SIZE(S, N) static_assert(sizeof(S) == N, "ABI: sizeof(" #S ") != " #N)
#define COMM_ABI_FIELD(S, F, N) \
    static_assert(offsetof(S, F) == N, "ABI: offsetof(" #S ", " #F ") != " #N)

// ---- Limits ------------------------------------------------------------------------------

// Most ranks of one symmetric group (one node: 8 GPUs, or 8 virtual ranks on one GPU).
constexpr uint32_t COMM_MAX_RANKS = 8;
// Most blocks of one all-reduce launch: each block slot has its own epoch counter and one flag
// per rank in every rank's flag table.
constexpr uint32_t COMM_MAX_BLOCKS = 128;
// Most threads of one all-reduce block (the kernels' launch bound).
constexpr uint32_t COMM_MAX_THREADS = 512;
// Threads of a block of the flat (no norm) all-reduce.
constexpr uint32_t COMM_FLAT_THREADS = 256;

// A rank's flag table (u32 words in its own device memory, zeroed at creation):
//   [COMM_EPOCH_WORD]                     epochs of the all-reduces this rank completed
//   [COMM_ARRIVE_WORD]                    blocks of the running all-reduce that have finished
//   [COMM_FLAG_WORD + b·MAX_RANKS + q]    epoch that rank q's block b has published (written by q)
//   [COMM_STATUS_WORD]                    0, or the first error of this rank's kernels
//   [COMM_STATUS_CALL_WORD]               the epoch (call number) of that error's all-reduce
// Words COMM_ARRIVE_WORD + 1 .. COMM_FLAG_WORD are reserved.
constexpr uint32_t COMM_EPOCH_WORD = 0;
constexpr uint32_t COMM_ARRIVE_WORD = 1;
constexpr uint32_t COMM_FLAG_WORD = 128;
constexpr uint32_t COMM_STATUS_WORD = 1152;
constexpr uint32_t COMM_STATUS_CALL_WORD = 1153;
constexpr uint32_t COMM_FLAG_WORDS = 1160;
static_assert(COMM_FLAG_WORD >= COMM_ARRIVE_WORD + 1, "flag table layout");
static_assert(COMM_STATUS_WORD == COMM_FLAG_WORD + COMM_MAX_BLOCKS * COMM_MAX_RANKS,
              "flag table layout");
static_assert(COMM_STATUS_CALL_WORD == COMM_STATUS_WORD + 1, "flag table layout");
static_assert(COMM_FLAG_WORDS >= COMM_STATUS_CALL_WORD + 1, "flag table layout");

// Status codes (the status word): COMM_STATUS_TIMEOUT | block << 8 | peer rank.
constexpr uint32_t COMM_STATUS_TIMEOUT = 2147483648;

// What the all-reduce does with Σ partial (AllReduceArgs::mode).
constexpr uint32_t COMM_MODE_OUT = 0;            // out = Σ (the input's dtype)
constexpr uint32_t COMM_MODE_RESIDUAL = 1;       // x += Σ (f32)
constexpr uint32_t COMM_MODE_RESIDUAL_NORM = 2;  // x += Σ; h = rmsnorm(x)·w per row (f32)

// ---- Structs -----------------------------------------------------------------------------

// One rank's side of one-shot all-reduce of `rows × width` elements (bf16 or f32 by kernel).
// Device addresses are u64 (as this rank addresses them: peers' through peer access).
struct AllReduceArgs {
    uint64_t bufs[COMM_MAX_RANKS];   // every rank's data region: 2 slots of slot_bytes each
    uint64_t flags[COMM_MAX_RANKS];  // every rank's flag table (COMM_FLAG_WORDS u32)
    uint64_t in;                     // this rank's partial [rows][width]
    uint64_t out;                    // COMM_MODE_OUT: Σ [rows][width], the input's dtype
    uint64_t x;                      // residual modes: f32 [rows][width], updated in place
    uint64_t h;                      // COMM_MODE_RESIDUAL_NORM: f32 [rows][width]
    uint64_t w;                      // COMM_MODE_RESIDUAL_NORM: f32 [width]
    uint64_t slot_bytes;             // bytes of one slot of a data region
    uint64_t timeout_ns;             // give up waiting for a peer after this long (0: never)
    uint32_t rank, ranks;
    uint32_t rows, width;
    uint32_t chunk;  // flat modes: elements per block (a multiple of 8); norm mode: unused
    uint32_t mode;
    float eps;
    uint32_t pad;
};
COMM_ABI_SIZE(AllReduceArgs, 216);
COMM_ABI_FIELD(AllReduceArgs, bufs, 0);
COMM_ABI_FIELD(AllReduceArgs, flags, 64);
COMM_ABI_FIELD(AllReduceArgs, in, 128);
COMM_ABI_FIELD(AllReduceArgs, out, 136);
COMM_ABI_FIELD(AllReduceArgs, x, 144);
COMM_ABI_FIELD(AllReduceArgs, h, 152);
COMM_ABI_FIELD(AllReduceArgs, w, 160);
COMM_ABI_FIELD(AllReduceArgs, slot_bytes, 168);
COMM_ABI_FIELD(AllReduceArgs, timeout_ns, 176);
COMM_ABI_FIELD(AllReduceArgs, rank, 184);
COMM_ABI_FIELD(AllReduceArgs, ranks, 188);
COMM_ABI_FIELD(AllReduceArgs, rows, 192);
COMM_ABI_FIELD(AllReduceArgs, width, 196);
COMM_ABI_FIELD(AllReduceArgs, chunk, 200);
COMM_ABI_FIELD(AllReduceArgs, mode, 204);
COMM_ABI_FIELD(AllReduceArgs, eps, 208);
