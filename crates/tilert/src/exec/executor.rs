//! [`GpuSession`] as a [`model::Executor`]: the executor contract the speculative loop, the
//! server's scheduler and `ultra generate` are written against, over the session's own passes
//! (no other state: every method is one of the session's public calls).
//!
//! Each pass first makes the model's CUDA context current on the calling thread, so a caller
//! generic over executors need not know about contexts. Logits come back to the host (owned);
//! the greedy calls take the argmax on the device and bring back only the id.
//!
//! [`Executor::forward_batch`] runs every block through ONE batched pass (passes of at most
//! `MAX_TOKENS` rows: [`super::GpuBatch::verify`]) when the sessions share a batch
//! ([`GpuSession::share_batch`]); should that pass fail (it leaves every session as it was), or
//! without a shared batch, each session runs its own block, so an error is reported for the
//! session it belongs to.

use std::borrow::Cow;

use model::config::ModelConfig;
use model::executor::{forward_index, Executor};

use super::{GpuSession, VerifyOutput, DEFAULT_MAX_ROLLBACK};
use crate::RuntimeError;

/// Makes the session's CUDA context current on this thread.
fn bind(s: &GpuSession) -> Result<(), RuntimeError> {
    Ok(s.model().device().ctx.bind_to_thread()?)
}

impl Executor for GpuSession {
    type Error = RuntimeError;

    fn config(&self) -> &ModelConfig {
        self.model().config()
    }

    fn len(&self) -> usize {
        GpuSession::len(self)
    }

    /// Sessions are built with [`DEFAULT_MAX_ROLLBACK`] (`GpuModel::session`). Sliding layers
    /// keep a ring of `window + MAX_TOKENS + max_rollback` positions, so the guarantee holds
    /// below the start of the latest pass of at most `MAX_TOKENS` tokens — a decode step or a
    /// verify block; after a longer prefill, below the start of its last pass.
    fn max_rollback(&self) -> usize {
        DEFAULT_MAX_ROLLBACK
    }

    fn prefill(&mut self, tokens: &[u32]) -> Result<Cow<'_, [f32]>, RuntimeError> {
        bind(self)?;
        GpuSession::prefill(self, tokens).map(Cow::Owned)
    }

    fn decode(&mut self, token: u32) -> Result<Cow<'_, [f32]>, RuntimeError> {
        bind(self)?;
        GpuSession::decode(self, token).map(Cow::Owned)
    }

    fn prefill_greedy(&mut self, tokens: &[u32]) -> Result<u32, RuntimeError> {
        bind(self)?;
        GpuSession::prefill_greedy(self, tokens)
    }

    fn decode_greedy(&mut self, token: u32) -> Result<u32, RuntimeError> {
        bind(self)?;
        GpuSession::decode_greedy(self, token)
    }

    /// Passes of at most `MAX_TOKENS` tokens; the requested indices become the session's capture
    /// set ([`GpuSession::set_capture`]).
    fn verify(&mut self, tokens: &[u32], hidden: &[usize]) -> Result<VerifyOutput, RuntimeError> {
        bind(self)?;
        GpuSession::verify(self, tokens, hidden)
    }

    fn truncate(&mut self, len: usize) -> Result<(), RuntimeError> {
        GpuSession::truncate(self, len)
    }

    fn forward_batch(
        seqs: &mut [&mut Self],
        blocks: &[&[u32]],
        layers: &[usize],
    ) -> Vec<Result<VerifyOutput, RuntimeError>> {
        let n = seqs.len().min(blocks.len());
        let batch = seqs.first().and_then(|s| s.shared_batch().cloned());
        if let (true, Some(batch)) = (n > 1, batch) {
            let nl = seqs[0].model().config().layers.len();
            let idx: Vec<usize> = layers.iter().map(|&l| forward_index(l, nl)).collect();
            let done = bind(seqs[0]).and_then(|()| match batch.try_borrow_mut() {
                Ok(mut b) => b.verify(&mut seqs[..n], &blocks[..n], &idx),
                Err(_) => Err(RuntimeError::Invalid("the batch is in use".into())),
            });
            if let Ok(outs) = done {
                return outs.into_iter().map(Ok).collect();
            }
        }
        seqs[..n]
            .iter_mut()
            .zip(blocks)
            .map(|(s, b)| Executor::forward(&mut **s, b, layers))
            .collect()
    }
}
