//! The executor contract: what every executor's sequence (the CPU [`crate::cpu::Session`], a GPU
//! session) offers the layers above it — the speculative loop, the scheduler, `generate` — and
//! the model-level types of that contract ([`VerifyOutput`], the hidden-state indexing, the
//! rollback depth).
//!
//! # Hidden-state indexing (as transformers' `output_hidden_states`)
//! For a model of L layers, hidden index `0` is the embedding output, index `i` in `1..L` is the
//! output (residual stream) of layer `i − 1`, and index `L` is the output of the last layer
//! **after the final RMSNorm** — exactly HF's `hidden_states[i]` (whose last entry is normed).
//! One more index, [`LAST_LAYER_PRE_NORM`], is the output of the last layer **before** the final
//! RMSNorm (no HF entry; the residual stream speculative drafters read as "the output of the
//! last layer"). Plans record where each index is read ([`crate::plan::Plan::taps`]).

use crate::config::ModelConfig;

/// Hidden index of the last layer's output before the final RMSNorm (see the module docs).
pub const LAST_LAYER_PRE_NORM: usize = usize::MAX;

/// Default truncation depth a sequence keeps exact (sliding layers keep
/// `window − 1 + max_rollback` positions of history).
pub const DEFAULT_MAX_ROLLBACK: usize = 64;

/// Tokens per verify pass when [`Executor::forward`] runs a long input (the prompt): bounds the
/// `t · V` logits buffer; results do not depend on it.
pub const FORWARD_CHUNK: usize = 64;

/// The result of a verify pass.
#[derive(Debug, Clone, PartialEq)]
pub struct VerifyOutput {
    /// `logits[j]`: the `vocab_size` logits after token `j` of the block (predicting token j+1).
    pub logits: Vec<Vec<f32>>,
    /// `hidden[i][j]`: the hidden state with the `i`-th requested index (see the module docs)
    /// of token `j`.
    pub hidden: Vec<Vec<Vec<f32>>>,
}

/// The hidden index (see the module docs) of decoder layer `layer`'s output in a model of
/// `num_layers` layers: `layer + 1`, and [`LAST_LAYER_PRE_NORM`] for the last layer (index
/// `num_layers` is after the final norm). `None` beyond the model.
pub fn hidden_index(layer: usize, num_layers: usize) -> Option<usize> {
    match layer + 1 {
        i if i < num_layers => Some(i),
        i if i == num_layers => Some(LAST_LAYER_PRE_NORM),
        _ => None,
    }
}

/// One sequence on some executor: its KV cache and the passes that extend or shorten it.
///
/// Every call is all-or-nothing (on error the sequence is as it was). Results are exact:
/// after [`Executor::truncate`] later calls behave as if only the kept prefix had ever run.
pub trait Executor {
    type Error: std::error::Error + Send + Sync + 'static;

    /// The model's configuration.
    fn config(&self) -> &ModelConfig;

    /// Positions held (the next token gets position `len()`).
    fn len(&self) -> usize;

    fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// How far below the start of the latest call [`Executor::truncate`] is guaranteed to reach.
    fn max_rollback(&self) -> usize;

    /// Appends `tokens`; returns the logits after the last one.
    fn prefill(&mut self, tokens: &[u32]) -> Result<&[f32], Self::Error>;

    /// Appends one token; returns its logits.
    fn decode(&mut self, token: u32) -> Result<&[f32], Self::Error>;

    /// Appends a block in one pass (causal inside it); returns every token's logits and the
    /// hidden states of the requested indices (module docs).
    fn verify(&mut self, tokens: &[u32], hidden: &[usize]) -> Result<VerifyOutput, Self::Error>;

    /// Appends `tokens` (in passes of at most [`FORWARD_CHUNK`]) and returns every token's
    /// logits plus, for each decoder layer in `layers`, its output — the residual stream right
    /// after it, before the final norm also for the last layer (what a drafter reads).
    fn forward(&mut self, tokens: &[u32], layers: &[usize]) -> Result<VerifyOutput, Self::Error>;

    /// Drops every position ≥ `len`.
    fn truncate(&mut self, len: usize) -> Result<(), Self::Error>;
}
