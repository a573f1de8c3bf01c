//! # model — Ultra's model core (the CPU reference path)
//!
//! Owns everything between a checkpoint directory and logits on the CPU:
//! * [`config`]: the config normalizer — transformers-5 and released (Hub) spellings of gpt-oss,
//!   Qwen3-MoE, MiMo-V2-Flash and `mimo_v2` configs → one [`config::ModelConfig`];
//! * [`mimo`]: the `mimo_v2` specifics (config rules, fused KV-head-grouped `qkv_proj`, packed
//!   MXFP4 experts, MTP tensors);
//! * [`checkpoint`]: safetensors through mmap (single file or sharded index), dtype decoding
//!   (bf16 / f16 / f32 / MXFP4 blocks+scales / FP8 e4m3 with block scales), with errors that name
//!   the file and tensor;
//! * [`spec`]: the per-layer model spec and the expected tensor list (name, shape, dtypes) that
//!   every tensor is checked against before use;
//! * [`load`]: checkpoint directory → `(ModelConfig, Weights)` ([`load::load`],
//!   [`load::load_config`]), converting to the [`weights`] conventions;
//! * [`weights`]: the typed weights the executors consume, in their checkpoint dtype (views of
//!   the mapped files); [`check`]: their validation against the config;
//! * [`progress`]: the progress display of reading / uploading a large checkpoint;
//! * [`plan`]: step plans — the ops of one pass (prefill / decode / verify / batched / drafter)
//!   with one parameter struct per op, bytes and FLOPs, and the tensor-parallel transform;
//! * [`executor`]: the executor trait every sequence implements, [`executor::VerifyOutput`], the
//!   hidden-state indexing and rollback depth; [`rope`]: RoPE frequency tables;
//! * [`cpu`]: the CPU reference executor, an interpreter of the plan (prefill, decode, verify,
//!   truncate; tensor-parallel ranks simulated in one process) — the embedded default and the
//!   oracle for every GPU path;
//! * [`drafter`]: DFlash drafters as data — config (`config.json` → [`drafter::DrafterConfig`]),
//!   weights and their checks — shared by the CPU drafter (`dflash`) and the GPU one (`tilert`);
//! * [`gguf`]: GGUF (llama.cpp's format) writer and header reader, and the gpt-oss export used by
//!   the side-by-side benchmark against llama.cpp;
//! * [`sampling`]: greedy / temperature / top-k / top-p / min-p / repetition penalty / seeds / stops;
//! * [`shard`]: the weights of tensor-parallel ranks, sliced by `plan::tp::TpLayout` (CPU and GPU);
//! * [`tokenizer`]: `tokenizer.json` through the `tokenizers` crate and chat templates through
//!   minijinja.
//!
//! Routing math is not here: it lives in `moe` as pure functions shared by every executor.

pub mod check;
pub mod checkpoint;
pub mod config;
pub mod cpu;
pub mod drafter;
pub mod executor;
pub mod footprint;
pub mod gguf;
pub mod load;
pub mod mimo;
pub mod plan;
pub mod progress;
pub mod quantize;
pub mod rope;
pub mod sampling;
pub mod shard;
pub mod spec;
pub mod tokenizer;
pub mod weights;

// Model-level items that every executor shares, at the crate root so that executors other than
// the CPU one (the GPU runtime `tilert`) do not reach into `model::cpu`.
pub use check::check as check_weights;
pub use executor::{Executor, VerifyOutput, DEFAULT_MAX_ROLLBACK, LAST_LAYER_PRE_NORM};
pub use rope::RopeTable;
