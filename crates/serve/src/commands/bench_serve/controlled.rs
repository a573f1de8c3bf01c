//! `ultra bench-serve --synthetic-config CONFIG --device cuda [--controlled-tau TAU]`: the GPU
//! server over a model of `CONFIG`'s dimensions with random device weights
//! (`tilert::exec::GpuModel::synthetic`; e.g. `fixtures/configs/gpt-oss-20b.json`) and, with
//! `--controlled-tau`, a **controlled-acceptance** drafter — the bar case (16 concurrent
//! speculative streams at gpt-oss-20b dimensions, τ = 5.6, against the same streams without
//! drafts).
//!
//! A drafter of random weights accepts nothing, so the speculative requests run the real work
//! of every round — the drafter's forward (a z-lab-shaped synthetic drafter of
//! `--controlled-draft-layers` layers, `dflash::controlled::synthetic_drafter_config`), the ONE
//! batched verify pass of every running request's block, the commit (target truncation, drafter
//! context append) — and only the verdict is controlled: after the verify, the target's argmax
//! ids of the block are overwritten so that the round accepts `a` drafts, `a` drawn per round
//! from the truncated geometric distribution of τ (`dflash::controlled`). The tokens emitted are
//! therefore not the target's greedy continuation (they are meaningless on random weights
//! anyway); the cost of each round is exactly a speculative round's. Requests must be greedy
//! without penalties (what `bench-serve` sends): rounds whose verify returns logits are not
//! controlled.

use std::cell::Cell;

use anyhow::{bail, Result};
use dflash::controlled::{accepted_for, alpha_for_tau, van_der_corput};
use dflash::{Rows, SpecBackend, SpecError, SpecOptions, Want};
use model::config::ModelConfig;
use tilert::exec::{GpuSession, SharedKvBlock};

use crate::engine::gpu::GpuSpecState;
use crate::engine::{Backend, DeviceRow, GpuBackend, KvBytes, SpecAccept};

/// The controlled-acceptance drafter's settings (`--controlled-tau`,
/// `--controlled-draft-layers`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ControlledDraft {
    /// The acceptance length τ the rounds follow (bonus counted), `1..=block`.
    pub tau: f64,
    /// Layers of the synthetic drafter.
    pub layers: usize,
}

impl ControlledDraft {
    /// Checks τ against the block size.
    pub fn check(&self, block: usize) -> Result<()> {
        if !(self.tau >= 1.0 && self.tau <= block as f64) {
            bail!(
                "--controlled-tau {} is outside 1..={block} (the block size)",
                self.tau
            );
        }
        if self.layers == 0 || self.layers > 64 {
            bail!(
                "--controlled-draft-layers {} is outside 1..=64",
                self.layers
            );
        }
        Ok(())
    }
}

/// [`GpuBackend`] whose speculative states' verdicts are controlled (module docs).
pub struct ControlledBackend {
    inner: GpuBackend,
    alpha: f64,
    /// Sequences started so far (each state's draws are rotated by its own offset).
    started: Cell<u64>,
}

impl ControlledBackend {
    /// Wraps `inner` (with its drafter) so that rounds of `block` tokens accept τ on average.
    pub fn new(inner: GpuBackend, tau: f64, block: usize) -> Result<Self> {
        ControlledDraft { tau, layers: 1 }.check(block)?;
        if inner.device_spec().is_none() {
            bail!("a controlled-acceptance backend needs the drafter on the GPU");
        }
        Ok(Self {
            inner,
            alpha: alpha_for_tau(tau, block),
            started: Cell::new(0),
        })
    }
}

/// One speculative request's state with its controlled verdicts.
pub struct ControlledState {
    inner: GpuSpecState,
    alpha: f64,
    round: u32,
    rotation: f64,
    vocab: u32,
}

impl ControlledState {
    /// The verify rows of `tokens` (`[x_last, drafts…]`) with the verdict forced: the argmax ids
    /// of rows `0..a` equal the drafts, row `a`'s differs from draft `a` (the target's own
    /// argmax, or the next id when that happened to be the draft).
    fn force(&mut self, tokens: &[u32], rows: Rows) -> Rows {
        let Rows::Argmax(mut ids) = rows else {
            return rows;
        };
        let n = tokens.len().saturating_sub(1);
        if n == 0 || ids.len() != tokens.len() {
            return Rows::Argmax(ids);
        }
        let u = (van_der_corput(self.round) + self.rotation).fract();
        self.round = self.round.wrapping_add(1);
        force_verdict(&mut ids, tokens, accepted_for(u, self.alpha, n), self.vocab);
        Rows::Argmax(ids)
    }
}

/// Makes the argmax ids `ids` of the verify block `tokens` (`[x_last, drafts…]`, as many) accept
/// exactly `a` drafts under greedy acceptance: rows `0..a` predict the drafts, row `a` (when a
/// draft is left) predicts anything but draft `a` — its own id, or the next one when that was
/// the draft.
fn force_verdict(ids: &mut [u32], tokens: &[u32], a: usize, vocab: u32) {
    let n = tokens.len() - 1;
    ids[..a].copy_from_slice(&tokens[1..=a]);
    if a < n && ids[a] == tokens[a + 1] {
        ids[a] = (tokens[a + 1] + 1) % vocab.max(1);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn forced_verdicts_accept_exactly_a_drafts() {
        let tokens = [9, 4, 5, 6, 7];
        for a in 0..=4 {
            for base in [[1, 2, 3, 4, 5], [4, 5, 6, 7, 8]] {
                let mut ids = base;
                force_verdict(&mut ids, &tokens, a, 10);
                let got = dflash::accept_greedy(&tokens[1..], &ids).unwrap();
                assert_eq!(got.accepted, a, "{base:?}");
                assert_eq!(got.bonus, ids[a]);
                // Rows after the verdict keep the target's ids.
                assert_eq!(ids[a + 1..], base[a + 1..]);
            }
        }
        // The next id wraps within the vocabulary.
        let mut ids = [9, 5];
        force_verdict(&mut ids, &[1, 9], 0, 10);
        assert_eq!(ids, [0, 5]);
    }

    #[test]
    fn controlled_settings_are_checked() {
        let ok = ControlledDraft {
            tau: 5.6,
            layers: 5,
        };
        assert!(ok.check(8).is_ok());
        let e = ControlledDraft { tau: 9.0, ..ok }.check(8).unwrap_err();
        assert!(e.to_string().contains("outside 1..=8"), "{e}");
        let e = ControlledDraft { tau: 0.5, ..ok }.check(8).unwrap_err();
        assert!(e.to_string().contains("--controlled-tau 0.5"), "{e}");
        let e = ControlledDraft { layers: 0, ..ok }.check(8).unwrap_err();
        assert!(e.to_string().contains("--controlled-draft-layers 0"), "{e}");
        assert!(ControlledDraft {
            tau: f64::NAN,
            ..ok
        }
        .check(8)
        .is_err());
    }
}

impl SpecBackend for ControlledState {
    fn vocab_size(&self) -> usize {
        self.inner.vocab_size()
    }
    fn len(&self) -> usize {
        self.inner.len()
    }
    fn prefill_granularity(&self) -> usize {
        self.inner.prefill_granularity()
    }
    fn prefill(&mut self, chunk: &[u32], want: Option<Want>) -> Result<Option<Rows>, SpecError> {
        self.inner.prefill(chunk, want)
    }
    fn draft(&mut self, x_last: u32, block_size: usize, want: Want) -> Result<Rows, SpecError> {
        self.inner.draft(x_last, block_size, want)
    }
    fn verify(&mut self, tokens: &[u32], want: Want) -> Result<Rows, SpecError> {
        let rows = self.inner.verify(tokens, want)?;
        Ok(self.force(tokens, rows))
    }
    fn commit(&mut self, keep: usize) -> Result<(), SpecError> {
        self.inner.commit(keep)
    }
    fn reset(&mut self) -> Result<(), SpecError> {
        self.inner.reset();
        Ok(())
    }
    /// The inner states' ONE batched verify pass, then each verdict forced.
    fn verify_batch(
        states: &mut [&mut Self],
        tokens: &[&[u32]],
        want: &[Want],
    ) -> Vec<Result<Rows, SpecError>> {
        let rows = {
            let mut inner: Vec<&mut GpuSpecState> =
                states.iter_mut().map(|s| &mut s.inner).collect();
            <GpuSpecState as SpecBackend>::verify_batch(&mut inner, tokens, want)
        };
        states
            .iter_mut()
            .zip(tokens)
            .zip(rows)
            .map(|((s, t), r)| r.map(|r| s.force(t, r)))
            .collect()
    }
}

impl Backend for ControlledBackend {
    type Sequence = GpuSession;
    type Spec = ControlledState;
    type Block = SharedKvBlock;

    fn config(&self) -> &ModelConfig {
        self.inner.config()
    }
    fn device(&self) -> String {
        format!("{} (controlled acceptance)", self.inner.device())
    }
    fn max_context(&self) -> usize {
        self.inner.max_context()
    }
    fn kv_bytes_fn(&self) -> KvBytes {
        self.inner.kv_bytes_fn()
    }
    fn prefill_granularity(&self) -> usize {
        self.inner.prefill_granularity()
    }
    fn new_sequence(&self, positions: usize) -> Result<GpuSession> {
        self.inner.new_sequence(positions)
    }
    fn decode_batch(&self, seqs: &mut [&mut GpuSession], tokens: &[u32]) -> Vec<Result<Vec<f32>>> {
        self.inner.decode_batch(seqs, tokens)
    }
    fn decode_sample_batch(
        &self,
        seqs: &mut [&mut GpuSession],
        tokens: &[u32],
        rows: &[DeviceRow],
    ) -> Option<Vec<Result<u32>>> {
        self.inner.decode_sample_batch(seqs, tokens, rows)
    }
    fn release(&self, seq: GpuSession) {
        self.inner.release(seq)
    }
    fn use_paged_kv(&mut self, block_size: usize) -> bool {
        self.inner.use_paged_kv(block_size)
    }
    fn set_kv_blocks(&mut self, blocks: usize) -> Result<()> {
        self.inner.set_kv_blocks(blocks)
    }
    fn share_block(&self, seq: &GpuSession, b: usize) -> Option<SharedKvBlock> {
        self.inner.share_block(seq, b)
    }
    fn fork_sequence(&self, seq: &GpuSession) -> Option<GpuSession> {
        self.inner.fork_sequence(seq)
    }
    fn adopt_blocks(&self, seq: &mut GpuSession, blocks: &[SharedKvBlock]) -> Result<()> {
        self.inner.adopt_blocks(seq, blocks)
    }
    fn device_spec(&self) -> Option<&SpecOptions> {
        self.inner.device_spec()
    }
    fn new_spec(&self, positions: usize) -> Result<ControlledState> {
        let inner = self.inner.new_spec(positions)?;
        let k = self.started.get();
        self.started.set(k + 1);
        Ok(ControlledState {
            vocab: self.config().vocab_size as u32,
            inner,
            alpha: self.alpha,
            round: 0,
            // A golden-ratio rotation per sequence: sequences do not draw in lockstep.
            rotation: (k as f64 * 0.618_033_988_749_895).fract(),
        })
    }
    fn release_spec(&self, spec: ControlledState) {
        self.inner.release_spec(spec.inner)
    }
    fn spec_record_features(&self, spec: &mut ControlledState) -> bool {
        self.inner.spec_record_features(&mut spec.inner)
    }
    fn spec_take_features(&self, spec: &mut ControlledState) -> Vec<f32> {
        self.inner.spec_take_features(&mut spec.inner)
    }
    fn spec_feature_dim(&self, spec: &ControlledState) -> usize {
        self.inner.spec_feature_dim(&spec.inner)
    }
    fn spec_share_block(&self, spec: &ControlledState, b: usize) -> Option<SharedKvBlock> {
        self.inner.spec_share_block(&spec.inner, b)
    }
    fn spec_adopt_prefix(
        &self,
        spec: &mut ControlledState,
        blocks: &[SharedKvBlock],
        features: &[f32],
    ) -> Result<()> {
        self.inner
            .spec_adopt_prefix(&mut spec.inner, blocks, features)
    }
    fn spec_accepts_on_device(&self) -> bool {
        false
    }
    fn spec_accept_batch(
        &self,
        _specs: &mut [&mut ControlledState],
        _rounds: &[SpecAccept],
    ) -> Option<Vec<Result<(dflash::Acceptance, usize)>>> {
        None
    }
}

/// `--synthetic-config` (and `--controlled-tau`): what to serve.
#[derive(Debug, Clone)]
pub struct SyntheticGpu {
    /// A `config.json` giving the model's dimensions (e.g. `fixtures/configs/gpt-oss-20b.json`).
    pub config: std::path::PathBuf,
    /// The controlled-acceptance drafter, when requests decode speculatively.
    pub controlled: Option<ControlledDraft>,
}

/// Seed of the synthetic target's weights (gpt-oss-20b: the `gpu-decode` / `gpu-dflash` one).
const TARGET_SEED: u64 = 20261121;

/// Starts the engine of `syn` on GPU `ordinal`: plain, or speculative with the controlled
/// drafter (block size `block_size`, default 8). The weights are generated by the scheduler
/// thread, which owns the GPU objects. EOS ids are cleared (requests decode as long as asked).
pub fn start_engine(
    syn: &SyntheticGpu,
    ordinal: usize,
    block_size: Option<usize>,
    cfg: crate::engine::EngineConfig,
) -> Result<crate::engine::EngineHandle> {
    use anyhow::Context;
    use std::sync::Arc;
    let text = std::fs::read_to_string(&syn.config)
        .with_context(|| format!("reading {}", syn.config.display()))?;
    let mut config = ModelConfig::from_json_str(&text)
        .with_context(|| format!("parsing {}", syn.config.display()))?;
    config.eos_token_ids.clear();
    let config = Arc::new(config);
    let (max_context, pool) = (cfg.max_context, cfg.max_running);
    let max_seq = move |gpu: &tilert::exec::GpuModel| {
        max_context.unwrap_or(crate::commands::generate::gpu_max_seq(gpu))
    };
    let Some(c) = syn.controlled else {
        return crate::engine::EngineHandle::start(
            move || {
                let gpu = tilert::exec::GpuModel::synthetic(ordinal, config, TARGET_SEED)?;
                let n = max_seq(&gpu);
                GpuBackend::new(gpu, n, None, pool)
            },
            None,
            Vec::new(),
            cfg,
            None,
        );
    };
    let block = block_size.unwrap_or(dflash::DEFAULT_BLOCK_SIZE);
    if !(dflash::MIN_BLOCK_SIZE..=dflash::MAX_BLOCK_SIZE).contains(&block) {
        return Err(SpecError::BlockSize(block).into());
    }
    c.check(block)?;
    let dc = dflash::controlled::synthetic_drafter_config(
        config.hidden_size,
        config.vocab_size,
        config.layers.len(),
        c.layers,
        block,
    )?;
    crate::engine::EngineHandle::start(
        move || {
            let gpu = tilert::exec::GpuModel::synthetic(ordinal, config, TARGET_SEED)?;
            let gd = tilert::draft::GpuDrafter::synthetic(&gpu, dc, 99 + c.layers as u64)?;
            let opts = SpecOptions {
                block_size: block,
                eos_token_ids: Vec::new(),
                prefill_chunk: None,
            };
            let n = max_seq(&gpu);
            ControlledBackend::new(
                GpuBackend::new(gpu, n, Some((gd, opts)), pool)?,
                c.tau,
                block,
            )
        },
        None,
        Vec::new(),
        cfg,
        None,
    )
}
