//! The GPU executor sharded over tensor-parallel ranks ([`tilert::exec::tp`]) as a [`Backend`]:
//! one [`TpSession`] per request (every rank's KV cache and buffers), decode steps one sequence
//! at a time (the ranks have no batched plan yet), plain decoding only (no drafter on the
//! device; `ultra generate --draft` and `ultra bench-spec` run DFlash under TP with the drafter
//! on the host).
//!
//! Like the single-GPU backend it is built on the scheduler thread and never leaves it.

use std::sync::Arc;

use anyhow::{bail, Context, Result};
use model::config::ModelConfig;
use tilert::exec::tp::{TpModel, TpSession};

use super::backend::{Backend, KvBytes, NoDeviceSpec};

/// [`TpModel`] sequences for the scheduler.
pub struct TpBackend {
    model: TpModel,
    max_seq: usize,
    /// Device bytes of one sequence, all ranks together (what a request reserves).
    seq_bytes: u64,
}

impl TpBackend {
    /// Sequences of `max_seq` positions; one is allocated here to measure a sequence's device
    /// memory (the KV budget counts it per request).
    pub fn new(model: TpModel, max_seq: usize) -> Result<TpBackend> {
        if max_seq == 0 || max_seq > model.config().max_position_embeddings {
            bail!(
                "GPU sequences of {max_seq} positions: the model holds 1..={}",
                model.config().max_position_embeddings
            );
        }
        let s = model
            .session(max_seq)
            .context("allocating the first tensor-parallel sequence")?;
        let seq_bytes = s.device_bytes() as u64;
        Ok(TpBackend {
            model,
            max_seq,
            seq_bytes,
        })
    }
}

impl Backend for TpBackend {
    type Sequence = TpSession;
    type Spec = NoDeviceSpec;
    type Block = super::NoBlock;

    fn config(&self) -> &ModelConfig {
        self.model.config()
    }

    fn device(&self) -> String {
        format!(
            "{} tensor-parallel ranks ({})",
            self.model.ranks(),
            self.model.rank(0).device().info
        )
    }

    fn max_context(&self) -> usize {
        self.max_seq
    }

    fn kv_bytes_fn(&self) -> KvBytes {
        let bytes = self.seq_bytes;
        Arc::new(move |_| bytes)
    }

    fn prefill_granularity(&self) -> usize {
        tilert::ops::MAX_TOKENS
    }

    fn new_sequence(&self, positions: usize) -> Result<TpSession> {
        if positions > self.max_seq {
            bail!(
                "a sequence of {positions} positions exceeds the GPU sequences' {} positions",
                self.max_seq
            );
        }
        Ok(self.model.session(self.max_seq)?)
    }

    fn decode_batch(&self, seqs: &mut [&mut TpSession], tokens: &[u32]) -> Vec<Result<Vec<f32>>> {
        if seqs.len() != tokens.len() {
            let msg = format!("{} sequences but {} tokens", seqs.len(), tokens.len());
            return seqs.iter().map(|_| Err(anyhow::anyhow!("{msg}"))).collect();
        }
        seqs.iter_mut()
            .zip(tokens)
            .map(|(s, &t)| Ok(s.decode(t)?))
            .collect()
    }
}
