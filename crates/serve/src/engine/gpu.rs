//! The GPU executor (`tilert::exec`) as a [`Backend`], with DFlash drafting on the device when
//! a drafter is loaded (`tilert::draft`'s drafter, `dflash::gpu`'s backend).
//!
//! * Sequences are [`GpuSession`]s of one fixed size (`max_seq` positions: the server's
//!   context): the attention kernels split keys by the session size, so every sequence of the
//!   server computes bit-identical logits to `ultra generate --device cuda` (whose sessions have
//!   the same default size) and a request's output for a seed is the same.
//! * A session's device memory (KV cache, activation buffers) and its captured CUDA graphs are
//!   reused: a finished sequence is emptied and kept for the next request (at most `pool`
//!   sessions are kept). When a new session cannot get device memory, the kept ones are freed
//!   and the allocation retried once; if it still fails, that request fails with the
//!   out-of-memory error and nothing else is touched.
//! * Decode: **one batched pass** for the running sequences ([`tilert::exec::GpuBatch`]): a step
//!   over `n` sequences is `ceil(n / 16)` graph replays in which every weight (and each distinct
//!   expert) is read once for up to 16 sequences, each row attending over its own KV cache. A
//!   row's logits are bit-identical to that sequence decoded alone, so outputs do not depend on
//!   what else is running (on every fixture model; at gpt-oss-20b size a kernel's summation
//!   order depends on the pass size, see `tilert::exec::GpuBatch`, so a near-tie token can
//!   differ). A single running sequence takes its own one-token graph. If a batched
//!   pass fails (it leaves its sequences untouched), its sequences are decoded one by one, so
//!   an error fails only the sequence it belongs to. Each next token is sampled **on the
//!   device** ([`Backend::decode_sample_batch`], `tilert::sample`: one launch for all rows, each
//!   with its own parameters, penalties and seeded uniform stream — the same token as the host
//!   sampler of `ultra generate`), so only token ids (4 bytes a row) come back; a step where a
//!   request asks for logprobs brings the logits back and samples on the host instead.
//! * Prefill runs in passes of `tilert::ops::MAX_TOKENS` tokens, so chunked prefill cuts prompts
//!   at multiples of that ([`Backend::prefill_granularity`]).
//! * Paged KV: the sequences' KV lives in one device pool of blocks
//!   ([`tilert::exec::GpuKvPool`], sized by the scheduler from the KV budget), each sequence
//!   reading and writing it through its block table; the scheduler's prefix cache shares full
//!   blocks between sequences (adopted prefixes, forked `n > 1` samples; copied on write). A
//!   paged sequence computes exactly what a contiguous one does, and a sequence offers only
//!   blocks computed by full aligned prefill passes (`tilert::exec::paged`), so outputs do not
//!   depend on prefix caching.
//! * Speculative requests (a drafter on the device): each is a `dflash::SpecStream` the
//!   scheduler advances over a [`GpuSpecState`] (target session + drafter state). Their verify
//!   blocks go through **one batched target pass** per step (`dflash::gpu`'s `verify_batch` over
//!   [`tilert::exec::GpuBatch::forward_device`]: every running request's block at its own length,
//!   passes of `MAX_TOKENS` rows), each row bit-identical to that request's own verify, so the
//!   output is `ultra generate --draft --device cuda`'s for a seed. Their targets live in the
//!   paged pool like plain sequences, and their full prompt blocks are cached with the drafter
//!   context features of their positions (recorded from the device), so a request whose prompt
//!   extends a cached one adopts the blocks and rebuilds its drafter context from the features
//!   without running the target. Drafts run one request after another (the device drafter has
//!   no batched pass), and the drafter states (their own context caches) are outside the KV
//!   budget, as the host drafter's. A round whose acceptance needs the target's logits
//!   (sampled, or greedy with a penalty) is accepted on the device
//!   ([`Backend::spec_accept_batch`]: `accept_rows` over the verify rows the batched pass left in
//!   each session and the drafter's rows), so only the accepted count and the bonus token come
//!   back.

use std::cell::RefCell;
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use dflash::gpu::GpuSpecOn;
use dflash::SpecOptions;
use model::config::ModelConfig;
use tilert::abi::SAMPLE_MAX_ROWS;
use tilert::draft::GpuDrafter;
use tilert::exec::{GpuKvPool, GpuModel, GpuSession, SharedBatch, SharedKvBlock};
use tilert::sample::{BlockAccept, DeviceSampler, RowSample};
use tilert::RuntimeError;

use super::backend::{Backend, DeviceRow, KvBytes, SpecAccept};

/// A speculative request's state on the device: its target session and drafter state.
pub type GpuSpecState = GpuSpecOn<GpuSession>;

/// The GPU executor as a [`Backend`] (see the module docs).
pub struct GpuBackend {
    model: GpuModel,
    drafter: Option<(GpuDrafter, SpecOptions)>,
    max_seq: usize,
    /// Device bytes of one request's sequence (and drafter state, with a drafter).
    seq_bytes: u64,
    pool_cap: usize,
    pool: RefCell<Vec<GpuSession>>,
    spec_pool: RefCell<Vec<GpuSpecState>>,
    /// The batched pass's buffers and graphs, shared with every sequence (their batched verify
    /// runs through it).
    batch: SharedBatch,
    /// Paged KV: the block size, then (once sized) the device pool of blocks.
    paged: Option<(usize, Option<GpuKvPool>)>,
    /// Sampling on the device: row tables, histories, scratch.
    sampler: RefCell<DeviceSampler>,
}

/// Device blocks a paged pool holds beyond the scheduler's count (a margin for the copies the
/// executor makes on write before the scheduler's accounting sees them).
const KV_POOL_SLACK_BLOCKS: usize = 16;

fn is_oom(e: &RuntimeError) -> bool {
    match e {
        RuntimeError::OutOfMemory { .. } => true,
        RuntimeError::Op { source, .. } => is_oom(source),
        _ => false,
    }
}

impl GpuBackend {
    /// Serves `model` with sequences of `max_seq` positions, keeping up to `pool` finished
    /// sequences for reuse; with `drafter`, every request decodes speculatively on the device.
    /// Call on the thread that will drive it (the scheduler's): the model's CUDA context is
    /// bound to it.
    pub fn new(
        model: GpuModel,
        max_seq: usize,
        drafter: Option<(GpuDrafter, SpecOptions)>,
        pool: usize,
    ) -> Result<GpuBackend> {
        if max_seq == 0 || max_seq > model.config().max_position_embeddings {
            bail!(
                "GPU sequences of {max_seq} positions: the model holds 1..={}",
                model.config().max_position_embeddings
            );
        }
        model.device().ctx.bind_to_thread()?;
        let batch = model
            .shared_batch()
            .context("allocating the batched decode buffers")?;
        let sampler = DeviceSampler::new(model.stream().clone(), model.config().vocab_size)?;
        let mut b = GpuBackend {
            batch,
            sampler: RefCell::new(sampler),
            model,
            drafter,
            max_seq,
            seq_bytes: 0,
            pool_cap: pool.max(1),
            pool: RefCell::new(Vec::new()),
            spec_pool: RefCell::new(Vec::new()),
            paged: None,
        };
        // One sequence up front: its size is the reservation of every request, and it is the
        // first one reused.
        if b.drafter.is_some() {
            let s = b
                .new_spec(max_seq)
                .context("allocating the first GPU sequence")?;
            b.seq_bytes = s.device_bytes() as u64;
            b.spec_pool.borrow_mut().push(s);
        } else {
            let s = b
                .new_sequence(max_seq)
                .context("allocating the first GPU sequence")?;
            b.seq_bytes = s.device_bytes() as u64;
            b.pool.borrow_mut().push(s);
        }
        Ok(b)
    }

    /// The model on the device.
    pub fn model(&self) -> &GpuModel {
        &self.model
    }

    /// Sequences kept for reuse now (tests, metrics).
    pub fn pooled(&self) -> usize {
        self.pool.borrow().len() + self.spec_pool.borrow().len()
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

    /// The device block pool, when the KV cache is paged and sized.
    fn kv_pool(&self) -> Option<&GpuKvPool> {
        self.paged.as_ref().and_then(|(_, p)| p.as_ref())
    }

    /// A new empty sequence of `max_seq` positions (paged in the pool when there is one) that
    /// runs its batched calls through the backend's batched pass.
    fn fresh_session(&self) -> Result<GpuSession, RuntimeError> {
        let mut s = match self.kv_pool() {
            Some(kv) => self.model.session_paged(kv, self.max_seq)?,
            None => self.model.session(self.max_seq)?,
        };
        s.share_batch(self.batch.clone())?;
        Ok(s)
    }

    /// Runs `make`; on out-of-memory frees the kept sequences and tries once more.
    fn alloc<T>(&self, make: impl Fn() -> Result<T, RuntimeError>) -> Result<T> {
        self.model.device().ctx.bind_to_thread()?;
        match make() {
            Err(e) if is_oom(&e) && self.pooled() > 0 => {
                self.pool.borrow_mut().clear();
                self.spec_pool.borrow_mut().clear();
                Ok(make()?)
            }
            r => Ok(r?),
        }
    }
}

impl Backend for GpuBackend {
    type Sequence = GpuSession;
    type Spec = GpuSpecState;
    type Block = SharedKvBlock;

    fn config(&self) -> &ModelConfig {
        self.model.config()
    }

    fn device(&self) -> String {
        self.model.device().info.to_string()
    }

    fn max_context(&self) -> usize {
        self.max_seq
    }

    /// Every sequence has the same size: a request reserves one sequence's device bytes. Paged:
    /// the pool's bytes of `n` positions.
    fn kv_bytes_fn(&self) -> KvBytes {
        if self.paged.is_some() {
            let per = self.model.kv_position_bytes() as u64;
            return Arc::new(move |n| n as u64 * per);
        }
        let bytes = self.seq_bytes;
        Arc::new(move |_| bytes)
    }

    fn prefill_granularity(&self) -> usize {
        tilert::ops::MAX_TOKENS
    }

    fn new_sequence(&self, positions: usize) -> Result<GpuSession> {
        self.check_positions(positions)?;
        if let Some(s) = self.pool.borrow_mut().pop() {
            return Ok(s);
        }
        self.alloc(|| self.fresh_session())
    }

    fn use_paged_kv(&mut self, block_size: usize) -> bool {
        self.paged = Some((block_size.max(1), None));
        true
    }

    fn set_kv_blocks(&mut self, blocks: usize) -> Result<()> {
        let Some((bs, _)) = self.paged else {
            return Ok(());
        };
        self.model.device().ctx.bind_to_thread()?;
        // The contiguous sequence kept from start-up goes: sequences now come from the pool.
        self.pool.borrow_mut().clear();
        self.spec_pool.borrow_mut().clear();
        let kv = self
            .model
            .kv_pool(bs, blocks.max(1) + KV_POOL_SLACK_BLOCKS)?;
        self.paged = Some((bs, Some(kv)));
        Ok(())
    }

    fn share_block(&self, seq: &GpuSession, b: usize) -> Option<SharedKvBlock> {
        seq.full_block(b)
    }

    fn fork_sequence(&self, seq: &GpuSession) -> Option<GpuSession> {
        seq.fork().ok()
    }

    fn adopt_blocks(&self, seq: &mut GpuSession, blocks: &[SharedKvBlock]) -> Result<()> {
        Ok(seq.adopt_prefix(blocks)?)
    }

    fn decode_batch(&self, seqs: &mut [&mut GpuSession], tokens: &[u32]) -> Vec<Result<Vec<f32>>> {
        if let Err(e) = self.model.device().ctx.bind_to_thread() {
            let msg = e.to_string();
            return seqs.iter().map(|_| Err(anyhow::anyhow!("{msg}"))).collect();
        }
        if seqs.len() != tokens.len() {
            let msg = format!("{} sequences but {} tokens", seqs.len(), tokens.len());
            return seqs.iter().map(|_| Err(anyhow::anyhow!("{msg}"))).collect();
        }
        let mut out = Vec::with_capacity(seqs.len());
        let mut batch = self.batch.borrow_mut();
        for (rows, toks) in seqs
            .chunks_mut(tilert::ops::MAX_TOKENS)
            .zip(tokens.chunks(tilert::ops::MAX_TOKENS))
        {
            if rows.len() > 1 {
                if let Ok(logits) = batch.decode(rows, toks) {
                    out.extend(logits.into_iter().map(Ok));
                    continue;
                }
            }
            // One sequence, or a failed pass (nothing advanced): each alone, so an error is
            // reported for its own sequence only.
            out.extend(rows.iter_mut().zip(toks).map(|(s, &t)| Ok(s.decode(t)?)));
        }
        out
    }

    fn decode_sample_batch(
        &self,
        seqs: &mut [&mut GpuSession],
        tokens: &[u32],
        rows: &[DeviceRow],
    ) -> Option<Vec<Result<u32>>> {
        let fail = |msg: String| -> Vec<Result<u32>> {
            seqs.iter().map(|_| Err(anyhow::anyhow!("{msg}"))).collect()
        };
        if let Err(e) = self.model.device().ctx.bind_to_thread() {
            return Some(fail(e.to_string()));
        }
        if seqs.len() != tokens.len() || seqs.len() != rows.len() {
            return Some(fail(format!(
                "{} sequences, {} tokens, {} sampled rows",
                seqs.len(),
                tokens.len(),
                rows.len()
            )));
        }
        let v = self.model.config().vocab_size;
        fn row<'a>(r: &DeviceRow<'a>, logits: tilert::arena::DPtr<f32>) -> RowSample<'a> {
            RowSample {
                logits,
                params: r.params,
                prompt: r.prompt,
                generated: r.generated,
                stream: Some(r.stream),
            }
        }
        let mut out = Vec::with_capacity(seqs.len());
        let mut batch = self.batch.borrow_mut();
        let mut sampler = self.sampler.borrow_mut();
        let ops = self.model.ops();
        for ((chunk, toks), rs) in seqs
            .chunks_mut(tilert::ops::MAX_TOKENS)
            .zip(tokens.chunks(tilert::ops::MAX_TOKENS))
            .zip(rows.chunks(tilert::ops::MAX_TOKENS))
        {
            if chunk.len() > 1 {
                let rows: Vec<RowSample> = rs
                    .iter()
                    .map(|r| row(r, tilert::arena::DPtr::null()))
                    .collect();
                // A failed pass or sampling launch advanced nothing (all-or-nothing): each
                // alone then, so an error is reported for its own sequence only.
                if let Ok(ids) = batch.decode_sampled(chunk, toks, &mut sampler, &rows) {
                    out.extend(ids.into_iter().map(Ok));
                    continue;
                }
            }
            for ((s, &t), r) in chunk.iter_mut().zip(toks).zip(rs) {
                let id = s.forward_device(&[t]).and_then(|()| {
                    let logits = s.logits_device(1).slice(0..v);
                    sampler.sample(ops, &[row(r, logits)])
                });
                out.push(id.map(|ids| ids[0]).map_err(anyhow::Error::from));
            }
        }
        Some(out)
    }

    fn release(&self, mut seq: GpuSession) {
        let mut pool = self.pool.borrow_mut();
        if pool.len() < self.pool_cap {
            seq.reset();
            pool.push(seq);
        }
    }

    fn device_spec(&self) -> Option<&SpecOptions> {
        self.drafter.as_ref().map(|(_, o)| o)
    }

    fn new_spec(&self, positions: usize) -> Result<GpuSpecState> {
        let Some((drafter, _)) = &self.drafter else {
            bail!("no drafter is loaded on the GPU");
        };
        self.check_positions(positions)?;
        if let Some(s) = self.spec_pool.borrow_mut().pop() {
            return Ok(s);
        }
        self.alloc(|| GpuSpecOn::new(self.fresh_session()?, drafter))
    }

    fn spec_accepts_on_device(&self) -> bool {
        true
    }

    /// `tilert::sample::DeviceSampler::accept`: one `accept_rows` launch per
    /// `SAMPLE_MAX_ROWS` blocks over the target rows each session's verify left on the device
    /// and the drafter rows of its draft; two words a block come back.
    fn spec_accept_batch(
        &self,
        specs: &mut [&mut GpuSpecState],
        rounds: &[SpecAccept],
    ) -> Option<Vec<Result<(dflash::Acceptance, usize)>>> {
        let fail = |n: usize, msg: &str| -> Vec<Result<(dflash::Acceptance, usize)>> {
            (0..n).map(|_| Err(anyhow::anyhow!("{msg}"))).collect()
        };
        if let Err(e) = self.model.device().ctx.bind_to_thread() {
            return Some(fail(specs.len(), &e.to_string()));
        }
        if specs.len() != rounds.len() {
            let msg = format!("{} states but {} rounds", specs.len(), rounds.len());
            return Some(fail(specs.len(), &msg));
        }
        let blocks: Vec<BlockAccept> = specs
            .iter_mut()
            .zip(rounds)
            .map(|(s, r)| {
                let n = r.input.drafts.len();
                BlockAccept {
                    target_logits: s.target().logits_device(n + 1),
                    draft_logits: s.draft_session().logits_device(n),
                    drafts: r.input.drafts,
                    params: r.params,
                    prompt: r.input.prompt,
                    generated: r.input.generated,
                    stream: Some(r.input.stream),
                }
            })
            .collect();
        let mut sampler = self.sampler.borrow_mut();
        let mut out = Vec::with_capacity(blocks.len());
        for chunk in blocks.chunks(SAMPLE_MAX_ROWS) {
            match sampler.accept(self.model.ops(), chunk) {
                Ok(acc) => out.extend(acc.into_iter().map(|a| {
                    Ok((
                        dflash::Acceptance {
                            accepted: a.accepted,
                            bonus: a.bonus,
                        },
                        a.uniforms,
                    ))
                })),
                Err(e) => out.extend(fail(chunk.len(), &format!("device acceptance: {e}"))),
            }
        }
        Some(out)
    }

    fn spec_record_features(&self, spec: &mut GpuSpecState) -> bool {
        spec.record_features();
        true
    }

    fn spec_take_features(&self, spec: &mut GpuSpecState) -> Vec<f32> {
        spec.take_features()
    }

    fn spec_feature_dim(&self, spec: &GpuSpecState) -> usize {
        spec.feature_dim()
    }

    fn spec_share_block(&self, spec: &GpuSpecState, b: usize) -> Option<SharedKvBlock> {
        spec.target().full_block(b)
    }

    fn spec_adopt_prefix(
        &self,
        spec: &mut GpuSpecState,
        blocks: &[SharedKvBlock],
        features: &[f32],
    ) -> Result<()> {
        self.model.device().ctx.bind_to_thread()?;
        Ok(spec.adopt_prefix(features, |t| {
            t.adopt_prefix(blocks)
                .map_err(|e| dflash::SpecError::Target(Box::new(e)))
        })?)
    }

    fn release_spec(&self, mut spec: GpuSpecState) {
        let mut pool = self.spec_pool.borrow_mut();
        if pool.len() < self.pool_cap {
            spec.reset();
            pool.push(spec);
        }
    }
}
