//! What the scheduler needs from an executor: sequences with a KV cache, prefill, one batched
//! decode step, truncation, release and KV-memory estimates. [`CpuBackend`] implements it over
//! the CPU reference executor; a GPU executor plugs in by implementing the same trait.

use anyhow::Result;
use model::config::{AttnKind, ModelConfig};
use model::cpu::{CpuModel, Session, VerifyOutput, DEFAULT_MAX_ROLLBACK};

/// An executor the scheduler drives. One scheduler thread owns it; sequences never leave that
/// thread.
pub trait Backend: Send + 'static {
    /// One sequence's state (its KV cache).
    type Sequence: Send;

    fn config(&self) -> &ModelConfig;

    /// Where it runs, in words (`"cpu"`, `"cuda:0"`).
    fn device(&self) -> String;

    /// A new empty sequence.
    fn new_sequence(&self) -> Self::Sequence;

    /// Appends `tokens` to `seq`; returns the logits after the last one.
    fn prefill(&self, seq: &mut Self::Sequence, tokens: &[u32]) -> Result<Vec<f32>>;

    /// Appends `tokens[i]` to `seqs[i]` for all `i` in one step; returns each one's logits.
    fn decode_batch(
        &self,
        seqs: &mut [&mut Self::Sequence],
        tokens: &[u32],
    ) -> Result<Vec<Vec<f32>>>;

    /// Appends a block (causal inside it) and returns every token's logits plus the outputs of
    /// decoder layers `layers` (as `dflash::Target::forward`) — what a speculative drafter reads.
    fn forward(
        &self,
        seq: &mut Self::Sequence,
        tokens: &[u32],
        layers: &[usize],
    ) -> Result<VerifyOutput>;

    /// Drops every position ≥ `len`.
    fn truncate(&self, seq: &mut Self::Sequence, len: usize) -> Result<()>;

    /// Positions held by `seq`.
    fn len(&self, seq: &Self::Sequence) -> usize;

    /// Gives a finished sequence's memory back.
    fn release(&self, seq: Self::Sequence) {
        drop(seq);
    }

    /// The most KV-cache bytes a sequence of `positions` positions holds.
    fn kv_bytes(&self, positions: usize) -> u64;
}

/// The CPU reference executor as a [`Backend`].
#[derive(Debug, Clone)]
pub struct CpuBackend {
    pub model: CpuModel,
}

impl Backend for CpuBackend {
    type Sequence = Session;

    fn config(&self) -> &ModelConfig {
        self.model.config()
    }

    fn device(&self) -> String {
        format!("cpu ({} threads)", rayon::current_num_threads())
    }

    fn new_sequence(&self) -> Session {
        self.model.session()
    }

    fn prefill(&self, seq: &mut Session, tokens: &[u32]) -> Result<Vec<f32>> {
        Ok(seq.prefill(tokens)?.to_vec())
    }

    fn decode_batch(&self, seqs: &mut [&mut Session], tokens: &[u32]) -> Result<Vec<Vec<f32>>> {
        Ok(self.model.decode_batch(seqs, tokens)?)
    }

    fn forward(&self, seq: &mut Session, tokens: &[u32], layers: &[usize]) -> Result<VerifyOutput> {
        Ok(dflash::Target::forward(seq, tokens, layers)?)
    }

    fn truncate(&self, seq: &mut Session, len: usize) -> Result<()> {
        Ok(seq.truncate(len)?)
    }

    fn len(&self, seq: &Session) -> usize {
        seq.len()
    }

    /// f32 keys and values; a sliding layer holds at most `2·max(W − 1 + R, 32)` rows plus the
    /// rows of the current call (see `model::cpu::kv`).
    fn kv_bytes(&self, positions: usize) -> u64 {
        self.model
            .config()
            .layers
            .iter()
            .map(|l| {
                let rows = match l.attn {
                    AttnKind::Full => positions,
                    AttnKind::Sliding { window } => positions
                        .min(2 * (window.saturating_sub(1) + DEFAULT_MAX_ROLLBACK).max(32) + 16),
                };
                (rows * l.n_kv_heads * (l.head_dim + l.v_head_dim) * 4) as u64
            })
            .sum()
    }
}
