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
//! * [`weights`]: the typed weights the executors consume, in their checkpoint dtype (views of
//!   the mapped files);
//! * [`progress`]: the progress display of reading / uploading a large checkpoint;
//! * [`cpu`]: the CPU reference executor (prefill, decode, verify, truncate) — the embedded default
//!   and the oracle for every GPU path;
//! * [`drafter`]: DFlash drafters as data — config (`config.json` → [`drafter::DrafterConfig`]),
//!   weights and their checks — shared by the CPU drafter (`dflash`) and the GPU one (`tilert`);
//! * [`sampling`]: greedy / temperature / top-k / top-p / min-p / repetition penalty / seeds / stops;
//! * [`tokenizer`]: `tokenizer.json` through the `tokenizers` crate and chat templates through
//!   minijinja.
//!
//! Routing math is not here: it lives in `moe` as pure functions shared by every executor.

pub mod checkpoint;
pub mod config;
pub mod cpu;
pub mod drafter;
pub mod footprint;
pub mod load;
pub mod progress;
pub mod quantize;
pub mod sampling;
pub mod spec;
pub mod tokenizer;
pub mod weights;

// Model-level items that every executor shares (issue 15: they leave `model::cpu`). Re-exported
// at the crate root so that executors other than the CPU one (the GPU runtime `tilert`) do not
// reach into `model::cpu`; the definitions move here when the step plan lands.
pub use cpu::check::check as check_weights;
pub use cpu::rope::RopeTable;
pub use cpu::{VerifyOutput, DEFAULT_MAX_ROLLBACK, LAST_LAYER_PRE_NORM};
