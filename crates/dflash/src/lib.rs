//! DFlash block speculative decoding.
//!
//! This crate will own the whole DFlash path (drafter spec and loading, block drafting, the
//! speculative loop over a target abstraction). For now it holds the parts everything else
//! builds on, as pure functions:
//!
//! * [`accept_greedy`] — greedy acceptance: longest prefix of drafts that match the target's
//!   argmax, plus the bonus token;
//! * [`accept_sampled`] — exact rejection sampling (Leviathan et al. 2023, as in z-lab DFlash's
//!   `_rejection_sample`): the emitted tokens are distributed exactly as sampling from the target
//!   one token at a time;
//! * [`AcceptanceStats`] — acceptance length τ, per-position acceptance rates, histogram;
//!   mergeable across sequences and workers.
//!
//! # Indexing convention
//!
//! A verify round runs the target on `B` tokens `[x_last, d[0], …, d[B-2]]`. Target row `i`
//! (`0 ≤ i < B`) is the target's prediction for the position right after the `i`-th of those
//! tokens, so draft `d[i]` is checked against target row `i`. With `a` drafts accepted the round
//! emits `d[0..a]` followed by one bonus token taken from target row `a`; `a + 1` tokens in all
//! (`1 ≤ a + 1 ≤ B`). Draft probability row `i` (for sampled decoding) is the distribution `d[i]`
//! was drawn from.

mod accept;
mod stats;

pub use accept::{
    accept_greedy, accept_sampled, Acceptance, Dist, UniformSource, DEFAULT_PROB_TOLERANCE,
};
pub use stats::AcceptanceStats;

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
