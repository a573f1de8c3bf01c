//! The target abstraction the speculative loop runs on, and its implementation over the CPU
//! executor's [`Session`].

use model::cpu::{CpuError, Session, VerifyOutput};
use model::weights::Mat;

/// A target model holding one sequence's KV cache.
///
/// The speculative loop needs exactly: run a few tokens at the current position (logits of
/// every token + the outputs of the drafter's target layers), drop rejected positions, and the
/// tables the drafter borrows (embedding, LM head).
pub trait Target {
    type Error: std::error::Error + Send + Sync + 'static;

    /// Vocabulary size V.
    fn vocab_size(&self) -> usize;
    /// Hidden size H.
    fn hidden_size(&self) -> usize;
    /// Number of decoder layers.
    fn num_layers(&self) -> usize;
    /// Token embedding table `[V, H]`.
    fn embedding(&self) -> &Mat;
    /// Output head `[V, H]`.
    fn lm_head(&self) -> &Mat;
    /// Positions held (the next token gets position `len()`).
    fn len(&self) -> usize;
    /// Whether no position is held.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Runs `tokens` at positions `len() .. len() + t` (causal), appending them to the KV
    /// cache. Returns the logits of every token (`logits[j]` predicts the token after token
    /// `j`) and, for each requested decoder layer `layers[i]`, its output — the residual stream
    /// right after that layer, before the final norm also for the last layer — for every token
    /// (`hidden[i][j]`, `H` values).
    fn forward(&mut self, tokens: &[u32], layers: &[usize]) -> Result<VerifyOutput, Self::Error>;
    /// Drops every position ≥ `len`. Must be exact: later calls behave as if only the kept
    /// prefix had ever been run.
    fn truncate(&mut self, len: usize) -> Result<(), Self::Error>;
}

/// The target hidden-state index of a drafter's target layer (model data, re-exported).
pub use model::drafter::hidden_index;

/// Tokens per [`Session::verify`] call when a long input (the prompt) is run: bounds the
/// `t · V` logits buffer; results do not depend on it (the executor is bit-identical across
/// splits).
pub const FORWARD_CHUNK: usize = 64;

impl Target for Session {
    type Error = CpuError;

    fn vocab_size(&self) -> usize {
        self.model().config().vocab_size
    }

    fn hidden_size(&self) -> usize {
        self.model().config().hidden_size
    }

    fn num_layers(&self) -> usize {
        self.model().config().layers.len()
    }

    fn embedding(&self) -> &Mat {
        &self.model().weights().embed
    }

    fn lm_head(&self) -> &Mat {
        &self.model().weights().lm_head
    }

    fn len(&self) -> usize {
        Session::len(self)
    }

    /// Layer `L` is the executor's hidden index `L + 1`, and [`model::cpu::LAST_LAYER_PRE_NORM`] for the
    /// last layer (index `L` is after the final norm there). A layer beyond the model is
    /// [`CpuError::HiddenIndex`].
    fn forward(&mut self, tokens: &[u32], layers: &[usize]) -> Result<VerifyOutput, CpuError> {
        let nl = Target::num_layers(self);
        let mut hidden_indices = Vec::with_capacity(layers.len());
        for &l in layers {
            hidden_indices.push(hidden_index(l, nl).ok_or(CpuError::HiddenIndex {
                index: l + 1,
                layers: nl,
            })?);
        }
        let hidden_indices = &hidden_indices[..];
        if tokens.len() <= FORWARD_CHUNK {
            return self.verify(tokens, hidden_indices);
        }
        let start = Session::len(self);
        let mut out = VerifyOutput {
            logits: Vec::with_capacity(tokens.len()),
            hidden: vec![Vec::with_capacity(tokens.len()); hidden_indices.len()],
        };
        for chunk in tokens.chunks(FORWARD_CHUNK) {
            let o = match self.verify(chunk, hidden_indices) {
                Ok(o) => o,
                Err(e) => {
                    // Undo the earlier chunks where the cache still allows it (the executor
                    // already undid the failing one); the original error is what matters.
                    let _ = Session::truncate(self, start);
                    return Err(e);
                }
            };
            out.logits.extend(o.logits);
            for (all, part) in out.hidden.iter_mut().zip(o.hidden) {
                all.extend(part);
            }
        }
        Ok(out)
    }

    fn truncate(&mut self, len: usize) -> Result<(), CpuError> {
        Session::truncate(self, len)
    }
}
