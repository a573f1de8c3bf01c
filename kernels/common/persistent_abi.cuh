// The persistent engine's ABI, shared with Rust: the instruction record of the per-SM streams, the
// per-phase argument block and the opcodes. The host compiler is crates/tilert/src/persistent/
// (`compile.rs` builds the streams from a step plan, `validate.rs` checks them); its `abi.rs`
// mirrors this file and its layout test reads it (the size and field offsets asserted below must
// equal the Rust structs' `size_of` / `offset_of!`, each constant the Rust constant of the same
// name).
//
// Execution model (one step = one launch of the resident kernel, grid = SM count, one block per
// SM): block `sm` runs `stream[sm]` in order. An instruction runs tiles [tile_begin, tile_end) of
// one phase (a phase is one op of the plan, or one part of it: `attention` + `attn_combine`).
// Before it starts it waits, for each i < n_waits, until counter wait_counter[i] has reached
// (step + 1) · wait_target[i] (counters are never reset: each step adds exactly wait_target[i]
// to the counters it waits on, so the targets of step s are s + 1 multiples; comparisons are
// wrap-safe); after its last store it adds signal_add to each of its n_signals counters with
// release semantics (gpu scope). A wait is an acquire load. No grid-wide barrier.
//
// Plain C++ only (no CUDA types or qualifiers): it must compile with g++ as well as nvcc.
#pragma once
#include <stddef.h>
#include <stdint.h>

#define PK_ABI_SIZE(S, N) static_assert(sizeof(S) == N, "ABI: sizeof(" #S ") != " #N)
#define PK_ABI_FIELD(S, F, N) \
    static_assert(offsetof(S, F) == N, "ABI: offsetof(" #S ", " #F ") != " #N)

// ---- Limits ------------------------------------------------------------------------------

// Most counters one instruction waits on / signals.
constexpr uint32_t PK_MAX_WAITS = 6;
constexpr uint32_t PK_MAX_SIGNALS = 2;
// Slots of a phase's argument block: device pointers, integer dims, float parameters.
constexpr uint32_t PK_ARG_PTRS = 12;
constexpr uint32_t PK_ARG_DIMS = 16;
constexpr uint32_t PK_ARG_FLOATS = 4;
// Threads of the resident kernel's block (fixed: every instruction body is written for it).
constexpr uint32_t PK_THREADS = 256;
// `layer` of a model-level instruction (embed, LM head, sampling).
constexpr uint32_t PK_NO_LAYER = 4294967295;

// ---- Opcodes (`PkInstr::opcode`, `PkOpArgs::opcode`) --------------------------------------
// Each names the tile of one phase; the argument slots each opcode reads are listed in
// crates/tilert/src/persistent/compile.rs (`Operand`, in slot order) next to its tiling.

// x[row] = embed[tokens[row]]: tile = one row.
constexpr uint32_t PK_OP_EMBED = 1;
// h[row] = rmsnorm(x[row]): tile = one row.
constexpr uint32_t PK_OP_RMS_NORM = 2;
// A chunk of the rows of one q/k/v head of the fused projection (+bias, q/k norm, RoPE, v scale,
// KV write): tile = (segment, head, chunk).
constexpr uint32_t PK_OP_QKV = 3;
// Attention of one KV head group over one key split: tile = (group, split).
constexpr uint32_t PK_OP_ATTENTION = 4;
// The key splits of one KV head group combined: tile = group.
constexpr uint32_t PK_OP_ATTN_COMBINE = 5;
// x[:, rows] += W[rows] · in (+bias): tile = a chunk of output rows (o_proj).
constexpr uint32_t PK_OP_LINEAR_RESIDUAL = 6;
// Router logits of a chunk of experts: tile = chunk.
constexpr uint32_t PK_OP_ROUTER_LOGITS = 7;
// Top-k of every row (ids and weights) and the pass's distinct expert count: one tile. Expert
// tiles find their slot's expert from the ids themselves (moe_find_slot: the slot-th distinct id).
constexpr uint32_t PK_OP_ROUTER_TOPK = 8;
// Gate/up + GLU of the expert in one slot of the distinct list, a chunk of act columns, for every
// entry routed to it: tile = (slot, chunk). A slot past the list's length is empty.
constexpr uint32_t PK_OP_EXPERT_GATE_UP = 9;
// Down projection of one slot's expert, a chunk of hidden rows, times the gate weight: tile =
// (slot, chunk).
constexpr uint32_t PK_OP_EXPERT_DOWN = 10;
// x[row] += Σ_k y[row, k] in ascending expert id, then h[row] = next_norm(x[row]): tile = row.
constexpr uint32_t PK_OP_COMBINE_NORM = 11;
// Dense MLP gate/up + GLU of a chunk of act columns: tile = chunk.
constexpr uint32_t PK_OP_MLP_GATE_UP = 12;
// Dense MLP down projection, x[:, rows] += W[rows] · act: tile = chunk of hidden rows.
constexpr uint32_t PK_OP_MLP_DOWN = 13;
// Logits of a chunk of the vocabulary (and that chunk's argmax per row when sampling): tile =
// chunk.
constexpr uint32_t PK_OP_LM_HEAD = 14;
// The argmax of one logits row from the LM head's per-chunk partials: tile = row.
constexpr uint32_t PK_OP_ARGMAX = 15;

// ---- Structs -----------------------------------------------------------------------------

// One instruction of an SM's stream (128 bytes: two per cache line pair, one 16-byte vector load
// per 8 lanes).
struct PkInstr {
    uint32_t opcode;
    uint32_t arg;         // index into the PkOpArgs table (one block per phase)
    uint32_t tile_begin;  // tiles [tile_begin, tile_end) of the phase, in order
    uint32_t tile_end;
    uint32_t n_waits;
    uint32_t n_signals;
    uint32_t phase;       // the phase (timeline records; equals `arg`)
    uint32_t layer;       // decoder layer or PK_NO_LAYER
    uint32_t wait_counter[PK_MAX_WAITS];
    uint32_t wait_target[PK_MAX_WAITS];  // signals the counter receives per step
    uint32_t signal_counter[PK_MAX_SIGNALS];
    uint32_t signal_add;      // tile_end − tile_begin
    uint32_t bytes;           // bytes the tiles read (saturating): the timeline's GB/s
    uint32_t pad[8];
};
PK_ABI_SIZE(PkInstr, 128);
PK_ABI_FIELD(PkInstr, opcode, 0);
PK_ABI_FIELD(PkInstr, arg, 4);
PK_ABI_FIELD(PkInstr, tile_begin, 8);
PK_ABI_FIELD(PkInstr, tile_end, 12);
PK_ABI_FIELD(PkInstr, n_waits, 16);
PK_ABI_FIELD(PkInstr, n_signals, 20);
PK_ABI_FIELD(PkInstr, phase, 24);
PK_ABI_FIELD(PkInstr, layer, 28);
PK_ABI_FIELD(PkInstr, wait_counter, 32);
PK_ABI_FIELD(PkInstr, wait_target, 56);
PK_ABI_FIELD(PkInstr, signal_counter, 80);
PK_ABI_FIELD(PkInstr, signal_add, 88);
PK_ABI_FIELD(PkInstr, bytes, 92);

// The arguments of one phase: its operands' device pointers in slot order, its dims and float
// parameters (their meaning per opcode: compile.rs), the opcode and the phase's tile count.
struct PkOpArgs {
    uint64_t ptr[PK_ARG_PTRS];
    uint32_t dim[PK_ARG_DIMS];
    float f[PK_ARG_FLOATS];
    uint32_t opcode;
    uint32_t tiles;
};
PK_ABI_SIZE(PkOpArgs, 184);
PK_ABI_FIELD(PkOpArgs, ptr, 0);
PK_ABI_FIELD(PkOpArgs, dim, 96);
PK_ABI_FIELD(PkOpArgs, f, 160);
PK_ABI_FIELD(PkOpArgs, opcode, 176);
PK_ABI_FIELD(PkOpArgs, tiles, 180);

// One timeline record per executed instruction (written when the launch is given a trace
// buffer; index = the instruction's position in the flattened streams): %globaltimer (ns) and
// clock64 (SM cycles) at its start, when its waits were satisfied, and at its end; the SM it ran
// on (%smid) and the block (stream).
struct PkTrace {
    uint64_t t_start, t_ready, t_end;
    uint64_t c_start, c_ready, c_end;
    uint32_t smid;
    uint32_t block;
};
PK_ABI_SIZE(PkTrace, 56);
PK_ABI_FIELD(PkTrace, t_start, 0);
PK_ABI_FIELD(PkTrace, t_ready, 8);
PK_ABI_FIELD(PkTrace, t_end, 16);
PK_ABI_FIELD(PkTrace, c_start, 24);
PK_ABI_FIELD(PkTrace, c_ready, 32);
PK_ABI_FIELD(PkTrace, c_end, 40);
PK_ABI_FIELD(PkTrace, smid, 48);
PK_ABI_FIELD(PkTrace, block, 52);

// The launch state in device memory: the step the next launch runs and the blocks of the running
// launch that have finished (the last one advances `step`). Zeroed with the counters at upload.
struct PkState {
    uint32_t step;
    uint32_t done;
};
PK_ABI_SIZE(PkState, 8);
PK_ABI_FIELD(PkState, step, 0);
PK_ABI_FIELD(PkState, done, 4);
