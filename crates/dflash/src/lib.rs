//! DFlash block speculative decoding (research/dflash.md).
//!
//! This crate owns the DFlash algorithm: drafter loading (z-lab DFlash-1 checkpoints and
//! Xiaomi's MiMo variant; the CPU forward is the drafter's step plan run by
//! `model::cpu::draft`), the speculative loop over a
//! [`SpecBackend`] and its backends (the CPU one; with feature `cuda`, the GPU one in `gpu`, over
//! `tilert`'s executors), the acceptance rules and the acceptance statistics.
//!
//! # Entry point
//!
//! ```no_run
//! # use std::{ops::ControlFlow, path::Path, sync::Arc};
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! use dflash::{Drafter, SpecDecoder};
//! use model::{cpu::CpuModel, sampling::SamplingParams};
//!
//! let (cfg, weights) = model::load::load(Path::new("target/"))?;
//! let target = CpuModel::new(Arc::new(cfg), Arc::new(weights))?;
//! // config.json + model.safetensors (+ mask_embedding.safetensors for MiMo); checked against
//! // the target: hidden size, fc width, vocabulary, mask id, target layer ids.
//! let drafter = Drafter::load(Path::new("drafter/"), target.config())?;
//! let spec = SpecDecoder::new(&target, drafter, None)?; // None: the drafter's block size
//! let out = spec.generate(&[1, 2, 3], &SamplingParams::greedy(), |tok| {
//!     print!("{tok} ");
//!     ControlFlow::Continue(()) // Break(()) stops (e.g. on a stop string)
//! })?;
//! eprintln!("τ = {:?}, finish = {}", out.stats.tau(), out.finish_reason());
//! # Ok(()) }
//! ```
//!
//! Greedy output is token-for-token identical to plain greedy decoding; sampled output has
//! exactly the target's sampling distribution (temperature / top-k / top-p / min-p /
//! repetition, presence and frequency penalties as `model::sampling`, the penalties counting
//! the drafts accepted before each position of a block).
//!
//! # Parts
//!
//! * [`DrafterConfig`] ([`config`]) — `config.json` → normalized config: dims, RoPE (incl.
//!   YaRN, partial rotary, MiMo's `backbone_rotary_base`), per-layer attention (window, causal)
//!   by the resolution rules of research/dflash.md §2.4, mask id, target layer ids, block size;
//!   refuses keys that would change the math and are not implemented. The config, the weights
//!   ([`DrafterWeights`]) and their checks are model data (`model::drafter`, shared with the GPU
//!   drafter), re-exported here at their old paths.
//! * [`Drafter`] ([`drafter`]) — loading + target checks over the CPU executor's drafter
//!   (`model::cpu::draft::CpuDrafter`, the plan interpreter):
//!   [`Drafter::append_context`] (target features → `fc` → `hidden_norm` → each layer's K/V at
//!   the true positions, into a [`DraftCache`] of committed context) and [`Drafter::draft`] (the
//!   block `[x_last, MASK×(B−1)]` → logits of rows `1..B` through the target's LM head).
//! * [`DraftTarget`] ([`target`]) — the target sequence of the host backend: a
//!   [`model::Executor`] (run tokens at the current position: logits + the outputs of selected
//!   layers; truncate; length) that also lends the drafter the target's embedding and LM head;
//!   implemented for `model::cpu::Session`.
//! * [`run_speculative`] ([`decode`]) — the loop: prefill, draft, verify, accept, truncate,
//!   append context, emit (stop tokens and `max_tokens` inside the emitted run), over a
//!   [`SpecBackend`] (a target + drafter pair of one sequence; rows as logits or, for plain
//!   greedy decoding, argmax ids); [`run_speculative_rows`] also hands each emitted token's
//!   target logits row to the caller (log-probabilities). [`CpuBackend`] pairs any [`DraftTarget`] with the CPU
//!   [`Drafter`]; `gpu::GpuSpec` (feature `cuda`) runs it on the device (a `tilert` target
//!   session + `tilert::draft`'s GPU drafter).
//!   [`speculative_generate`] / [`SpecDecoder`] run it on the CPU.
//! * [`SamplingDist`] ([`probs`]) — the sampling transform as a dense distribution (for `p`
//!   and `q` of rejection sampling).
//! * [`accept_greedy`], [`accept_sampled`] — the acceptance rules (greedy prefix match; exact
//!   rejection sampling, Leviathan et al. 2023, as z-lab's `_rejection_sample`);
//!   [`AcceptanceStats`] — τ (counting the bonus), per-position acceptance, histogram.
//! * [`toy`] — tiny random drafters for tests; [`controlled`] — controlled acceptance (a chosen
//!   τ) for benchmarks on random weights.
//!
//! # Indexing convention
//!
//! A verify round runs the target on `B` tokens `[x_last, d[0], …, d[B-2]]`. Target row `i`
//! (`0 ≤ i < B`) is the target's prediction for the position right after the `i`-th of those
//! tokens, so draft `d[i]` is checked against target row `i`. With `a` drafts accepted the round
//! emits `d[0..a]` followed by one bonus token taken from target row `a`; `a + 1` tokens in all
//! (`1 ≤ a + 1 ≤ B`). Draft probability row `i` (for sampled decoding) is the distribution `d[i]`
//! was drawn from; draft logits row `i` is the drafter's block row `i + 1`.
//!
//! Target layer `L` (`dflash_config.target_layer_ids`) means the residual stream right after
//! decoder layer `L`: HF `output_hidden_states[L + 1]` for every layer but the last, and for the
//! last layer the state **before** the final norm (as vLLM captures it and as the PyTorch
//! reference `scripts/fixtures/dflash_reference.py` does; HF's last `hidden_states` entry is
//! normed). On the CPU executor: hidden index `L + 1`, and `model::cpu::LAST_LAYER_PRE_NORM`
//! for the last layer.

mod accept;
pub mod adapt;
pub mod controlled;
/// The drafter configuration (`model::drafter::config`, re-exported at its old path).
pub use model::drafter::config;
pub mod decode;
pub mod drafter;
#[cfg(feature = "cuda")]
pub mod gpu;
pub mod probs;
mod stats;
pub mod stream;
pub mod target;
pub mod torch_pt;
pub mod toy;

pub use accept::{
    accept_greedy, accept_sampled, Acceptance, Dist, UniformSource, DEFAULT_PROB_TOLERANCE,
};
pub use adapt::{AdaptPrior, AdaptSummary, Adaptive, BlockPolicy};
pub use config::{DraftAttn, DrafterConfig, DEFAULT_BLOCK_SIZE, MAX_BLOCK_SIZE, MIN_BLOCK_SIZE};
pub use decode::{
    prefill_prompt, run_speculative, run_speculative_rows, run_speculative_with,
    speculative_generate, CpuBackend, OnTokenRow, Round, Rows, SpecBackend, SpecDecoder, SpecError,
    SpecOptions, SpecOutput, Want,
};
pub use drafter::{DraftCache, Drafter, DrafterError, DrafterWeights};
pub use probs::SamplingDist;
pub use stats::AcceptanceStats;
pub use stream::{AcceptanceInput, Plan, SpecStream};
pub use target::{DraftTarget, WithTables};

/// Errors of the acceptance rules and statistics. Nothing in this crate panics on bad input.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum AcceptError {
    /// An input has the wrong length for the number of drafts.
    #[error("{what}: expected length {expected}, got {got}")]
    LengthMismatch {
        what: &'static str,
        expected: usize,
        got: usize,
    },
    /// The vocabulary size is zero.
    #[error("vocabulary size must be at least 1")]
    EmptyVocab,
    /// A draft token id is not below the vocabulary size.
    #[error("draft {position}: token {token} out of range (vocab = {vocab})")]
    TokenOutOfRange {
        position: usize,
        token: u32,
        vocab: usize,
    },
    /// A probability is negative, NaN or infinite.
    #[error("{dist} row {row}, token {index}: invalid probability {value}")]
    InvalidProbability {
        dist: Dist,
        row: usize,
        index: usize,
        value: f32,
    },
    /// A probability row does not sum to 1 within the tolerance.
    #[error("{dist} row {row} sums to {sum}, not 1 (tolerance {tolerance})")]
    NotNormalized {
        dist: Dist,
        row: usize,
        sum: f64,
        tolerance: f64,
    },
    /// The tolerance is negative, NaN, or not below 1.
    #[error("probability-sum tolerance must be in [0, 1), got {0}")]
    InvalidTolerance(f64),
    /// The uniform source returned a value outside `[0, 1)`.
    #[error("uniform source returned {0}, outside [0, 1)")]
    UniformOutOfRange(f64),
    /// Statistics: a round reports more accepted tokens than drafted ones.
    #[error("{accepted} accepted out of {drafted} drafted")]
    AcceptedExceedsDrafted { accepted: usize, drafted: usize },
}
