//! # model — Ultra's model core (the CPU reference path)
//!
//! Owns everything between a checkpoint directory and logits on the CPU:
//! * [`config`]: the config normalizer — transformers-5 and released (Hub) spellings of gpt-oss,
//!   Qwen3-MoE and MiMo-V2-Flash configs → one [`config::ModelConfig`];
//! * [`checkpoint`]: safetensors through mmap (single file or sharded index), dtype decoding
//!   (bf16 / f16 / f32 / MXFP4 blocks+scales / FP8 e4m3 with block scales), with errors that name
//!   the file and tensor;
//! * [`spec`]: the per-layer model spec and the expected tensor list (name, shape, dtypes) that
//!   every tensor is checked against before use;
//! * [`load`]: checkpoint directory → `(ModelConfig, Weights)` ([`load::load`],
//!   [`load::load_config`]), converting to the [`weights`] conventions;
//! * [`weights`]: the typed in-memory weights the executors consume;
//! * [`cpu`]: the CPU reference executor (prefill, decode, verify, truncate) — the embedded default
//!   and the oracle for every GPU path;
//! * [`gguf`]: GGUF (llama.cpp's format) writer and header reader, and the gpt-oss export used by
//!   the side-by-side benchmark against llama.cpp;
//! * [`sampling`]: greedy / temperature / top-k / top-p / min-p / repetition penalty / seeds / stops;
//! * [`tokenizer`]: `tokenizer.json` through the `tokenizers` crate and chat templates through
//!   minijinja.
//!
//! Routing math is not here: it lives in `moe` as pure functions shared by every executor.

pub mod checkpoint;
pub mod config;
pub mod cpu;
pub mod footprint;
pub mod gguf;
pub mod load;
pub mod quantize;
pub mod sampling;
pub mod spec;
pub mod tokenizer;
pub mod weights;
