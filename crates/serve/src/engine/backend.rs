//! What the scheduler needs from an executor beyond its sequences: new sequences, one decode
//! step over the running batch, release, KV-memory estimates, the prefill granularity and,
//! optionally, speculative decoding on the executor's own device. A sequence itself is a
//! [`model::Executor`] (prefill, forward, truncate, length go through that contract).
//! [`CpuBackend`] implements it over the CPU reference executor; `GpuBackend` (`engine::gpu`)
//! over the GPU executor.
//!
//! A backend is built by a factory run on the scheduler thread ([`super::EngineHandle::start`])
//! and never leaves it, so neither it nor its sequences need be `Send` (the GPU executor's
//! sessions hold CUDA graphs, which are not).

use std::sync::Arc;

use anyhow::{bail, Result};
use dflash::{Rows, SpecBackend, SpecError, SpecOptions, Want};
use model::config::{AttnKind, ModelConfig};
use model::cpu::{CpuModel, Session, SharedBlock, DEFAULT_MAX_ROLLBACK};
use model::executor::Executor;

/// KV-cache bytes a sequence of `n` positions reserves (callable from any thread: requests are
/// checked against the budget when they are submitted).
pub type KvBytes = Arc<dyn Fn(usize) -> u64 + Send + Sync>;

/// An executor the scheduler drives. One scheduler thread owns it; sequences never leave that
/// thread.
/// One request's next-token choice for [`Backend::decode_sample_batch`]: exactly what its host
/// sampler would draw (`crate::stream::TokenOutput::device_row`).
#[derive(Debug, Clone, Copy)]
pub struct DeviceRow<'a> {
    pub params: &'a model::sampling::SamplingParams,
    pub prompt: &'a [u32],
    pub generated: &'a [u32],
    pub stream: model::sampling::UniformStream,
}

/// One speculative request's round for [`Backend::spec_accept_batch`]: what its stream hands a
/// device acceptance (`dflash::SpecStream::acceptance_input`) and its sampling parameters.
#[derive(Debug, Clone, Copy)]
pub struct SpecAccept<'a> {
    pub input: dflash::AcceptanceInput<'a>,
    pub params: &'a model::sampling::SamplingParams,
}

pub trait Backend: 'static {
    /// One sequence (its KV cache): the scheduler prefills, forwards (prompt log-probabilities,
    /// a host drafter's target passes) and truncates it through the executor contract.
    type Sequence: Executor;
    /// One request's speculative state when the executor drafts on its own device (target
    /// sequence + drafter state; see [`Backend::device_spec`]).
    type Spec: SpecBackend;
    /// One full KV block of a sequence, shared by reference (the prefix cache's payload);
    /// [`NoBlock`] for executors whose KV is not paged.
    type Block: Clone + 'static;

    fn config(&self) -> &ModelConfig;

    /// Where it runs, in words (`"cpu"`, `"GPU 0: …"`).
    fn device(&self) -> String;

    /// The most positions (prompt + generated) one sequence can hold.
    fn max_context(&self) -> usize {
        self.config().max_position_embeddings
    }

    /// The KV-cache bytes of a sequence of `n` positions, as a function for the submitting
    /// threads.
    fn kv_bytes_fn(&self) -> KvBytes;

    /// Chunked prefill splits a prompt at multiples of this many tokens (the last chunk takes
    /// the rest), so that the chunks compute exactly what one prefill of the whole prompt does.
    fn prefill_granularity(&self) -> usize {
        1
    }

    /// A new empty sequence that will hold at most `positions` positions. An error (say, no
    /// device memory left) fails only the request that asked for it.
    fn new_sequence(&self, positions: usize) -> Result<Self::Sequence>;

    /// Appends `tokens[i]` to `seqs[i]` for all `i` in one step; returns each one's logits, or
    /// the error of that sequence.
    fn decode_batch(
        &self,
        seqs: &mut [&mut Self::Sequence],
        tokens: &[u32],
    ) -> Vec<Result<Vec<f32>>>;

    /// [`Backend::decode_batch`] with each next token sampled where the logits are (on the
    /// device): `rows[i]` is sequence `i`'s request ([`DeviceRow`]); only token ids come back.
    /// `None` (the default): this backend samples on the host, call `decode_batch` instead.
    fn decode_sample_batch(
        &self,
        seqs: &mut [&mut Self::Sequence],
        tokens: &[u32],
        rows: &[DeviceRow],
    ) -> Option<Vec<Result<u32>>> {
        let _ = (seqs, tokens, rows);
        None
    }

    /// Gives a finished sequence's memory back.
    fn release(&self, seq: Self::Sequence) {
        drop(seq);
    }

    /// Pages the KV cache of the sequences made from now on in blocks of `block_size`
    /// positions; `false` when this executor's KV is not paged (each sequence then reserves
    /// its whole KV at admission, and there is no prefix caching).
    fn use_paged_kv(&mut self, block_size: usize) -> bool {
        let _ = block_size;
        false
    }

    /// Sizes a paged executor's block pool (called once, after [`Backend::use_paged_kv`] said
    /// yes): `blocks` blocks, the number the scheduler's pool manages (from the KV budget and
    /// [`Backend::kv_bytes_fn`], asked again after paging was turned on). An error fails the
    /// server's start.
    fn set_kv_blocks(&mut self, blocks: usize) -> Result<()> {
        let _ = blocks;
        Ok(())
    }

    /// Full KV block `b` of `seq`, shared (not copied), when the sequence holds it whole.
    fn share_block(&self, seq: &Self::Sequence, b: usize) -> Option<Self::Block> {
        let _ = (seq, b);
        None
    }

    /// A new sequence holding what `seq` holds, sharing its KV blocks (copied on write), when
    /// this executor's KV is paged.
    fn fork_sequence(&self, seq: &Self::Sequence) -> Option<Self::Sequence> {
        let _ = seq;
        None
    }

    /// Makes the empty `seq` hold `blocks` (from [`Backend::share_block`]) as its first
    /// positions, as if it had prefilled them. All or nothing.
    fn adopt_blocks(&self, seq: &mut Self::Sequence, blocks: &[Self::Block]) -> Result<()> {
        let _ = (seq, blocks);
        bail!("this executor's KV cache is not paged")
    }

    /// The speculative loop's options when this executor has a drafter on its own device: every
    /// request is then a `dflash::SpecStream` over a [`Backend::Spec`] that the scheduler advances
    /// (its drafts and verify blocks through [`dflash::SpecBackend::draft_batch`] /
    /// [`dflash::SpecBackend::verify_batch`] with the other running requests').
    fn device_spec(&self) -> Option<&SpecOptions> {
        None
    }

    /// A new empty speculative state for a request of at most `positions` positions.
    fn new_spec(&self, positions: usize) -> Result<Self::Spec> {
        let _ = positions;
        bail!("this executor has no drafter on its device")
    }

    /// Gives a finished speculative state's memory back.
    fn release_spec(&self, spec: Self::Spec) {
        drop(spec);
    }

    /// Whether [`Backend::spec_accept_batch`] runs acceptances where the verify rows are (then
    /// a round whose acceptance needs the target's logits — sampled, or greedy with a penalty
    /// — brings back only its argmax ids from the verify pass).
    fn spec_accepts_on_device(&self) -> bool {
        false
    }

    /// The acceptance of each device speculative state's latest verify block (`specs[i]`, its
    /// drafts and history in `rounds[i]`), run where the target's and the drafter's rows are —
    /// the rule `dflash::SpecStream::verified` runs on the host — all in one launch; returns each
    /// one's acceptance and the uniforms it consumed (for `dflash::SpecStream::verified_with`).
    /// Only the accepted counts and bonus tokens cross to the host. `None` (the default): not
    /// supported here.
    #[allow(clippy::type_complexity)]
    fn spec_accept_batch(
        &self,
        specs: &mut [&mut Self::Spec],
        rounds: &[SpecAccept],
    ) -> Option<Vec<Result<(dflash::Acceptance, usize)>>> {
        let _ = (specs, rounds);
        None
    }

    /// A device speculative state on a paged executor records the drafter context features of
    /// every position it commits from now on, so that its full blocks can be cached with them
    /// (as the host drafter's `dflash::CpuBackend::record_features`). `false`: this executor's
    /// states cannot (they then take their blocks from the pool but cache none).
    fn spec_record_features(&self, spec: &mut Self::Spec) -> bool {
        let _ = spec;
        false
    }

    /// The features a device speculative state recorded since the last call, in position
    /// order, [`Backend::spec_feature_dim`] values a position.
    fn spec_take_features(&self, spec: &mut Self::Spec) -> Vec<f32> {
        let _ = spec;
        Vec::new()
    }

    /// Context features per position of a device speculative state.
    fn spec_feature_dim(&self, spec: &Self::Spec) -> usize {
        let _ = spec;
        0
    }

    /// Full KV block `b` of a device speculative state's target, shared (as
    /// [`Backend::share_block`]).
    fn spec_share_block(&self, spec: &Self::Spec, b: usize) -> Option<Self::Block> {
        let _ = (spec, b);
        None
    }

    /// Makes the empty device speculative state hold `blocks` as its target's first positions
    /// and `features` (their drafter context features, as recorded) as its drafter context, as
    /// if it had prefilled them. On error the state is empty.
    fn spec_adopt_prefix(
        &self,
        spec: &mut Self::Spec,
        blocks: &[Self::Block],
        features: &[f32],
    ) -> Result<()> {
        let _ = (spec, blocks, features);
        bail!("this executor's speculative states cannot adopt a cached prefix")
    }
}

/// [`Backend::Block`] of a backend whose KV is not paged: no value exists.
#[derive(Debug, Clone, Copy)]
pub enum NoBlock {}

/// [`Backend::Spec`] of a backend without a device drafter: no value exists.
pub enum NoDeviceSpec {}

impl SpecBackend for NoDeviceSpec {
    fn vocab_size(&self) -> usize {
        match *self {}
    }
    fn len(&self) -> usize {
        match *self {}
    }
    fn prefill(&mut self, _: &[u32], _: Option<Want>) -> Result<Option<Rows>, SpecError> {
        match *self {}
    }
    fn draft(&mut self, _: u32, _: usize, _: Want) -> Result<Rows, SpecError> {
        match *self {}
    }
    fn verify(&mut self, _: &[u32], _: Want) -> Result<Rows, SpecError> {
        match *self {}
    }
    fn commit(&mut self, _: usize) -> Result<(), SpecError> {
        match *self {}
    }
}

/// The CPU reference executor as a [`Backend`]; its sequences' KV is paged in blocks of
/// `block_size` positions (see `model::cpu::kv`).
#[derive(Debug, Clone)]
pub struct CpuBackend {
    pub model: CpuModel,
    pub block_size: usize,
}

impl CpuBackend {
    /// The executor with the default KV block size.
    pub fn new(model: CpuModel) -> Self {
        CpuBackend {
            model,
            block_size: model::cpu::kv::DEFAULT_BLOCK_SIZE,
        }
    }
}

/// f32 keys and values; a sliding layer holds at most `2·max(W − 1 + R, 32)` rows plus the rows
/// of the current call (see `model::cpu::kv`).
fn cpu_kv_bytes(config: &ModelConfig, positions: usize) -> u64 {
    config
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

impl Backend for CpuBackend {
    type Sequence = Session;
    type Spec = NoDeviceSpec;
    type Block = SharedBlock;

    fn config(&self) -> &ModelConfig {
        self.model.config()
    }

    fn device(&self) -> String {
        format!("cpu ({} threads)", rayon::current_num_threads())
    }

    fn kv_bytes_fn(&self) -> KvBytes {
        let config = Arc::new(self.model.config().clone());
        Arc::new(move |n| cpu_kv_bytes(&config, n))
    }

    fn new_sequence(&self, _positions: usize) -> Result<Session> {
        Ok(Session::with_block_size(
            &self.model,
            DEFAULT_MAX_ROLLBACK,
            self.block_size,
        ))
    }

    fn use_paged_kv(&mut self, block_size: usize) -> bool {
        self.block_size = block_size.max(1);
        true
    }

    fn fork_sequence(&self, seq: &Session) -> Option<Session> {
        Some(seq.clone())
    }

    fn share_block(&self, seq: &Session, b: usize) -> Option<SharedBlock> {
        seq.full_block(b)
    }

    fn adopt_blocks(&self, seq: &mut Session, blocks: &[SharedBlock]) -> Result<()> {
        Ok(seq.adopt_prefix(blocks)?)
    }

    fn decode_batch(&self, seqs: &mut [&mut Session], tokens: &[u32]) -> Vec<Result<Vec<f32>>> {
        match self.model.decode_batch(seqs, tokens) {
            Ok(logits) => logits.into_iter().map(Ok).collect(),
            Err(e) => {
                let msg = e.to_string();
                seqs.iter().map(|_| Err(anyhow::anyhow!("{msg}"))).collect()
            }
        }
    }
}
