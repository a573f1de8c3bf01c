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

use std::borrow::Cow;

use crate::config::ModelConfig;
use crate::sampling::{SamplingDist, SamplingParams};

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

/// The token greedy sampling picks from one row of `logits`: the [`SamplingDist`] of greedy
/// parameters (NaN never wins, the lowest id among ties), and `0` when no logit is finite (as
/// `Sampler::sample`).
pub fn greedy_token(logits: &[f32]) -> u32 {
    SamplingDist::new(&SamplingParams::greedy())
        .ok()
        .and_then(|mut d| d.kept(logits, &[], &[]).ok().and_then(|k| k.greedy()))
        .unwrap_or(0)
}

/// The hidden index [`Executor::forward`] reads for decoder layer `layer` of `num_layers`:
/// [`hidden_index`], and for a layer beyond the model `layer + 1` (above `num_layers`, so the
/// executor's `verify` refuses it and names it as such), or `num_layers + 1` should that collide
/// with [`LAST_LAYER_PRE_NORM`].
pub fn forward_index(layer: usize, num_layers: usize) -> usize {
    hidden_index(layer, num_layers).unwrap_or_else(|| {
        layer
            .checked_add(1)
            .filter(|&i| i != LAST_LAYER_PRE_NORM)
            .unwrap_or(num_layers + 1)
    })
}

/// One sequence on some executor: its KV cache and the passes that extend or shorten it. The
/// CPU `cpu::Session` and the GPU `tilert::exec::GpuSession` implement it; the speculative loop's
/// host backend (`dflash::CpuBackend`), the server's scheduler (`serve::engine::Backend::Sequence`)
/// and `ultra generate` / `score` / `bench-spec` are written against it.
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

    /// Appends `tokens`; returns the logits after the last one — borrowed where the executor
    /// keeps them on the host (the CPU), owned where they were copied back from a device.
    fn prefill(&mut self, tokens: &[u32]) -> Result<Cow<'_, [f32]>, Self::Error>;

    /// Appends one token; returns its logits (as [`Executor::prefill`]).
    fn decode(&mut self, token: u32) -> Result<Cow<'_, [f32]>, Self::Error>;

    /// [`Executor::prefill`] returning the greedy next token ([`greedy_token`] of the last
    /// logits). A device executor takes the argmax where the logits are and brings back only the
    /// id.
    fn prefill_greedy(&mut self, tokens: &[u32]) -> Result<u32, Self::Error> {
        Ok(greedy_token(&self.prefill(tokens)?))
    }

    /// [`Executor::decode`] returning the greedy next token (as [`Executor::prefill_greedy`]).
    fn decode_greedy(&mut self, token: u32) -> Result<u32, Self::Error> {
        Ok(greedy_token(&self.decode(token)?))
    }

    /// Appends a block in one pass (causal inside it); returns every token's logits and the
    /// hidden states of the requested indices (module docs).
    fn verify(&mut self, tokens: &[u32], hidden: &[usize]) -> Result<VerifyOutput, Self::Error>;

    /// Appends `tokens` (in [`Executor::verify`] calls of at most [`FORWARD_CHUNK`]) and returns
    /// every token's logits plus, for each decoder layer in `layers`, its output — the residual
    /// stream right after it, before the final norm also for the last layer (what a drafter
    /// reads: hidden index [`hidden_index`]). A layer beyond the model is refused by `verify`
    /// as an out-of-range hidden index. Results do not depend on the chunking.
    fn forward(&mut self, tokens: &[u32], layers: &[usize]) -> Result<VerifyOutput, Self::Error> {
        let nl = self.config().layers.len();
        let idx: Vec<usize> = layers.iter().map(|&l| forward_index(l, nl)).collect();
        if tokens.len() <= FORWARD_CHUNK {
            return self.verify(tokens, &idx);
        }
        let start = self.len();
        let mut out = VerifyOutput {
            logits: Vec::with_capacity(tokens.len()),
            hidden: vec![Vec::with_capacity(tokens.len()); idx.len()],
        };
        for chunk in tokens.chunks(FORWARD_CHUNK) {
            let o = match self.verify(chunk, &idx) {
                Ok(o) => o,
                Err(e) => {
                    // Undo the earlier chunks where the cache still allows it (the failing one
                    // was already undone); the original error is what matters.
                    let _ = self.truncate(start);
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

    /// Drops every position ≥ `len`.
    fn truncate(&mut self, len: usize) -> Result<(), Self::Error>;

    /// [`Executor::forward`] of `blocks[i]` on `seqs[i]` for every `i` (pairs beyond the shorter
    /// slice are not run): each result is what `seqs[i].forward(blocks[i], layers)` gives, and
    /// each pair succeeds or fails on its own. An executor that can runs them in ONE batched pass
    /// (every weight read once for all rows, each sequence's rows attending to its own cache at
    /// its own length — the speculative verify blocks of a server's running requests); the
    /// default runs one call after another.
    fn forward_batch(
        seqs: &mut [&mut Self],
        blocks: &[&[u32]],
        layers: &[usize],
    ) -> Vec<Result<VerifyOutput, Self::Error>>
    where
        Self: Sized,
    {
        seqs.iter_mut()
            .zip(blocks)
            .map(|(s, b)| s.forward(b, layers))
            .collect()
    }
}

/// A borrowed sequence is a sequence (callers lend theirs to a backend that owns its target).
impl<E: Executor> Executor for &mut E {
    type Error = E::Error;

    fn config(&self) -> &ModelConfig {
        (**self).config()
    }
    fn len(&self) -> usize {
        (**self).len()
    }
    fn max_rollback(&self) -> usize {
        (**self).max_rollback()
    }
    fn prefill(&mut self, tokens: &[u32]) -> Result<Cow<'_, [f32]>, Self::Error> {
        (**self).prefill(tokens)
    }
    fn decode(&mut self, token: u32) -> Result<Cow<'_, [f32]>, Self::Error> {
        (**self).decode(token)
    }
    fn prefill_greedy(&mut self, tokens: &[u32]) -> Result<u32, Self::Error> {
        (**self).prefill_greedy(tokens)
    }
    fn decode_greedy(&mut self, token: u32) -> Result<u32, Self::Error> {
        (**self).decode_greedy(token)
    }
    fn verify(&mut self, tokens: &[u32], hidden: &[usize]) -> Result<VerifyOutput, Self::Error> {
        (**self).verify(tokens, hidden)
    }
    fn forward(&mut self, tokens: &[u32], layers: &[usize]) -> Result<VerifyOutput, Self::Error> {
        (**self).forward(tokens, layers)
    }
    fn truncate(&mut self, len: usize) -> Result<(), Self::Error> {
        (**self).truncate(len)
    }
    fn forward_batch(
        seqs: &mut [&mut Self],
        blocks: &[&[u32]],
        layers: &[usize],
    ) -> Vec<Result<VerifyOutput, Self::Error>> {
        let mut inner: Vec<&mut E> = seqs.iter_mut().map(|s| &mut ***s).collect();
        E::forward_batch(&mut inner, blocks, layers)
    }
}
