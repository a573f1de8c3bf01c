//! The GPU executor sharded over tensor-parallel ranks ([`tilert::exec::tp`]) as a [`Backend`]:
//! one [`TpSession`] per request (every rank's KV cache and buffers), decode steps one sequence
//! at a time (the ranks have no batched plan yet). With a drafter, every request decodes
//! speculatively with DFlash: the drafter runs on rank 0's GPU (`tilert::draft::GpuDrafter`
//! built on `TpModel::rank(0)`, reading rank 0's captured hidden states; `dflash::gpu`'s
//! [`GpuSpecOn`] over the [`TpSession`]), the target's verify blocks on every rank — the same
//! loop as `ultra generate --device cuda --tensor-parallel N --draft`, so a greedy request's
//! tokens equal plain decoding's.
//!
//! Like the single-GPU backend it is built on the scheduler thread and never leaves it.

use std::cell::RefCell;
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use dflash::gpu::GpuSpecOn;
use dflash::SpecOptions;
use model::config::ModelConfig;
use tilert::draft::GpuDrafter;
use tilert::exec::tp::{TpModel, TpSession};

use super::backend::{Backend, KvBytes};

/// A speculative request's state under tensor parallelism: its target session (every rank)
/// and the drafter state on rank 0's GPU.
pub type TpSpecState = GpuSpecOn<TpSession>;

/// [`TpModel`] sequences for the scheduler.
pub struct TpBackend {
    model: TpModel,
    drafter: Option<(GpuDrafter, SpecOptions)>,
    max_seq: usize,
    /// Device bytes of one sequence, all ranks together (and the drafter state, with a
    /// drafter): what a request reserves.
    seq_bytes: u64,
    pool_cap: usize,
    /// Finished speculative states kept for reuse (their captured graphs with them).
    spec_pool: RefCell<Vec<TpSpecState>>,
}

impl TpBackend {
    /// Sequences of `max_seq` positions, plain decoding; one is allocated here to measure a
    /// sequence's device memory (the KV budget counts it per request).
    pub fn new(model: TpModel, max_seq: usize) -> Result<TpBackend> {
        Self::with_drafter(model, max_seq, None, 1)
    }

    /// [`TpBackend::new`] with, when `drafter` is given (built on `model.rank(0)`), every request
    /// decoding speculatively; up to `pool` finished speculative states are kept for reuse.
    pub fn with_drafter(
        model: TpModel,
        max_seq: usize,
        drafter: Option<(GpuDrafter, SpecOptions)>,
        pool: usize,
    ) -> Result<TpBackend> {
        if max_seq == 0 || max_seq > model.config().max_position_embeddings {
            bail!(
                "GPU sequences of {max_seq} positions: the model holds 1..={}",
                model.config().max_position_embeddings
            );
        }
        let mut b = TpBackend {
            model,
            drafter,
            max_seq,
            seq_bytes: 0,
            pool_cap: pool.max(1),
            spec_pool: RefCell::new(Vec::new()),
        };
        let s = b
            .model
            .session(max_seq)
            .context("allocating the first tensor-parallel sequence")?;
        b.seq_bytes = s.device_bytes() as u64;
        if let Some((drafter, _)) = &b.drafter {
            // The drafter state on rank 0's GPU counts too.
            b.model.rank(0).device().ctx.bind_to_thread()?;
            let spec = GpuSpecOn::new(s, drafter)
                .context("allocating the first drafter state on rank 0's GPU")?;
            b.seq_bytes += (spec.device_bytes() - spec.target().device_bytes()) as u64;
            b.spec_pool.borrow_mut().push(spec);
        }
        Ok(b)
    }

    fn check_positions(&self, positions: usize) -> Result<()> {
        if positions > self.max_seq {
            bail!(
                "a sequence of {positions} positions exceeds the GPU sequences' {} positions",
                self.max_seq
            );
        }
        Ok(())
    }
}

impl Backend for TpBackend {
    type Sequence = TpSession;
    type Spec = TpSpecState;
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
        self.check_positions(positions)?;
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

    fn device_spec(&self) -> Option<&SpecOptions> {
        self.drafter.as_ref().map(|(_, o)| o)
    }

    fn new_spec(&self, positions: usize) -> Result<TpSpecState> {
        let Some((drafter, _)) = &self.drafter else {
            bail!("no drafter is loaded on the tensor-parallel ranks");
        };
        self.check_positions(positions)?;
        if let Some(s) = self.spec_pool.borrow_mut().pop() {
            return Ok(s);
        }
        let session = self.model.session(self.max_seq)?;
        // The drafter state lives on rank 0's GPU (the sessions bound every rank's in turn).
        self.model.rank(0).device().ctx.bind_to_thread()?;
        Ok(GpuSpecOn::new(session, drafter)?)
    }

    fn release_spec(&self, mut spec: TpSpecState) {
        let mut pool = self.spec_pool.borrow_mut();
        if pool.len() < self.pool_cap {
            spec.reset();
            pool.push(spec);
        }
    }
}
