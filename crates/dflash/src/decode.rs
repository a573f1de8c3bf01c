//! The speculative decoding loop (research/dflash.md §3.1) over a [`SpecBackend`] (on the host:
//! a [`DraftTarget`] executor and the CPU [`Drafter`]), and
//! [`SpecDecoder`], its entry point over the CPU executor.

use std::borrow::Borrow;
use std::ops::ControlFlow;
use std::sync::Arc;
use std::time::Instant;

use model::cpu::{CpuModel, VerifyOutput};
use model::sampling::{FinishReason, Sampler, SamplingError, SamplingParams, StopCause};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha20Rng;

use crate::accept::sample_index;
use crate::adapt::{AdaptSummary, BlockPolicy};
use crate::config::{MAX_BLOCK_SIZE, MIN_BLOCK_SIZE};
use crate::drafter::{DraftCache, Drafter, DrafterError};
use crate::probs::SamplingDist;
use crate::stream::SpecStream;
use crate::target::DraftTarget;
use crate::{AcceptError, Acceptance, AcceptanceStats};

/// Everything that can stop a speculative generation with an error.
#[derive(Debug, thiserror::Error)]
pub enum SpecError {
    /// The block size is outside `2..=16`.
    #[error("block size {0} is outside {MIN_BLOCK_SIZE}..={MAX_BLOCK_SIZE}")]
    BlockSize(usize),
    /// The prompt has no tokens.
    #[error("empty prompt")]
    EmptyPrompt,
    /// The target already holds positions (the drafter has no context for them).
    #[error("the target already holds {0} positions; speculative generation starts from an empty sequence")]
    TargetNotEmpty(usize),
    /// The target failed.
    #[error("target: {0}")]
    Target(#[source] Box<dyn std::error::Error + Send + Sync>),
    /// The target returned output of the wrong shape.
    #[error("target output: {0}")]
    TargetOutput(String),
    #[error(transparent)]
    Drafter(#[from] DrafterError),
    #[error(transparent)]
    Sampling(#[from] SamplingError),
    #[error(transparent)]
    Accept(#[from] AcceptError),
}

/// What a generation produced.
#[derive(Debug, Clone, PartialEq)]
pub struct SpecOutput {
    /// Generated tokens (a stop token, when one ended generation, is the last).
    pub tokens: Vec<u32>,
    /// Acceptance statistics over the verify rounds (τ counts the bonus token).
    pub stats: AcceptanceStats,
    /// What ended generation; `None` when the `on_token` callback asked to stop.
    pub stop_cause: Option<StopCause>,
    /// With the adaptive block policy: what it chose ([`crate::BlockPolicy::Adaptive`]).
    pub adaptive: Option<AdaptSummary>,
    /// Plain steps (no drafts) the adaptive policy chose; not counted in `stats`.
    pub plain_steps: u64,
}

impl SpecOutput {
    /// The OpenAI-level finish reason (`stop` for a callback-requested stop).
    pub fn finish_reason(&self) -> FinishReason {
        self.stop_cause
            .as_ref()
            .map_or(FinishReason::Stop, StopCause::finish_reason)
    }
}

/// One verify round, as reported to an observer.
#[derive(Debug, Clone, Copy)]
pub struct Round<'a> {
    /// 0 for the first round.
    pub index: usize,
    /// Position of `x_last` (= committed context length).
    pub start: usize,
    /// The block's first token: the last emitted token, not yet in the target's KV cache.
    pub x_last: u32,
    /// The draft logits: `(B − 1) · V` values, row `i` for position `start + 1 + i` (empty when
    /// the round verified no drafts, or when the backend returned argmax ids only).
    pub draft_logits: &'a [f32],
    /// The drafts verified (`B' − 1` of them, `B' = min(B, tokens still allowed)`).
    pub drafts: &'a [u32],
    /// Drafts accepted and the bonus token.
    pub acceptance: Acceptance,
}

/// Loop settings besides the sampling parameters.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SpecOptions {
    /// Block size B (`2..=16`): one draft forward proposes `B − 1` tokens.
    pub block_size: usize,
    /// The model's EOS ids (stop generation unless `SamplingParams::ignore_eos`).
    pub eos_token_ids: Vec<u32>,
    /// Most prompt tokens one [`SpecBackend::prefill`] call takes (chunked prefill, rounded down
    /// to [`SpecBackend::prefill_granularity`], at least one granule); `None`: the whole prompt
    /// in one call. The chunks compute what one call does ([`prefill_prompt`]).
    pub prefill_chunk: Option<usize>,
}

fn target_err<E: std::error::Error + Send + Sync + 'static>(e: E) -> SpecError {
    SpecError::Target(Box::new(e))
}

/// Checks a target output for `t` tokens and `k` hidden indices of width `h`.
fn check_output(o: &VerifyOutput, t: usize, v: usize, k: usize, h: usize) -> Result<(), SpecError> {
    let bad = |m: String| Err(SpecError::TargetOutput(m));
    if o.logits.len() != t || o.logits.iter().any(|r| r.len() != v) {
        return bad(format!("expected {t} logit rows of {v}"));
    }
    if o.hidden.len() != k
        || o.hidden
            .iter()
            .any(|x| x.len() != t || x.iter().any(|r| r.len() != h))
    {
        return bad(format!("expected {k} hidden states of {t} rows of {h}"));
    }
    Ok(())
}

/// Rows `0..rows` of the concatenated features `[rows, K·H]` (row j = hidden[0][j] ‖ … ‖
/// hidden[K−1][j]).
fn features(o: &VerifyOutput, rows: usize, h: usize) -> Vec<f32> {
    let k = o.hidden.len();
    let mut f = Vec::with_capacity(rows * k * h);
    for j in 0..rows {
        for hs in &o.hidden {
            f.extend_from_slice(&hs[j]);
        }
    }
    f
}

/// Draws from a probability row with one uniform.
fn draw(p: &[f32], u: f64) -> u32 {
    let total: f64 = p.iter().map(|&x| x as f64).sum();
    sample_index(p.len(), |j| p[j] as f64, u * total).unwrap_or(0) as u32
}

/// Token selection for one mode: greedy (the Sampler's argmax, penalties included) or sampled
/// (dense distributions + one RNG stream for drafts, acceptance and bonus tokens).
pub(crate) struct Picker {
    pub(crate) greedy: bool,
    /// Greedy without any penalty: a pick is the plain argmax.
    plain_argmax: bool,
    /// Tokens of the prompt at the start of every history (the rest was generated, which the
    /// presence / frequency penalties count).
    prompt_len: usize,
    sampler: Sampler,
    dist: SamplingDist,
    pub(crate) rng: ChaCha20Rng,
}

impl Picker {
    pub(crate) fn new(params: &SamplingParams, prompt_len: usize) -> Result<Picker, SamplingError> {
        let rng = match params.seed {
            Some(s) => ChaCha20Rng::seed_from_u64(s),
            None => ChaCha20Rng::from_os_rng(),
        };
        Ok(Picker {
            greedy: params.is_greedy(),
            plain_argmax: argmax_suffices(params),
            prompt_len,
            sampler: Sampler::new(params)?,
            dist: SamplingDist::new(params)?,
            rng,
        })
    }

    /// Tokens of the prompt at the start of every history.
    pub(crate) fn prompt_len(&self) -> usize {
        self.prompt_len
    }

    /// The distribution of the next token after `history` (prompt + generated tokens) under
    /// the request's sampling transform.
    pub(crate) fn probs(
        &mut self,
        logits: &[f32],
        history: &[u32],
        out: &mut [f32],
    ) -> Result<(), SamplingError> {
        let (prompt, generated) = history.split_at(self.prompt_len);
        self.dist.probs(logits, prompt, generated, out)
    }

    /// One token from row `i` of `rows` (`V = v` wide) after `history` (prompt + generated
    /// tokens); `probs` receives the distribution in sampled mode. Argmax rows are taken as
    /// they are (the loop asks for them only when a greedy pick is a plain argmax).
    pub(crate) fn pick_row(
        &mut self,
        rows: &Rows,
        i: usize,
        v: usize,
        history: &[u32],
        probs: &mut [f32],
    ) -> Result<u32, SpecError> {
        match rows {
            Rows::Logits(l) => Ok(self.pick(&l[i * v..(i + 1) * v], history, probs)?),
            Rows::Argmax(ids) if self.plain_argmax => Ok(ids[i]),
            Rows::Argmax(_) => Err(SpecError::TargetOutput(
                "these sampling parameters need logits, the backend returned argmax ids".into(),
            )),
        }
    }

    /// One token from `logits` given `history`; `probs` (V values) receives the distribution
    /// in sampled mode.
    fn pick(
        &mut self,
        logits: &[f32],
        history: &[u32],
        probs: &mut [f32],
    ) -> Result<u32, SamplingError> {
        if self.greedy {
            let (prompt, generated) = history.split_at(self.prompt_len);
            self.sampler.try_sample(logits, prompt, generated)
        } else {
            self.probs(logits, history, probs)?;
            Ok(draw(probs, self.rng.random::<f64>()))
        }
    }
}

/// What a forward returns for each of its rows.
#[derive(Debug, Clone, PartialEq)]
pub enum Rows {
    /// `rows · V` logits, row-major (usable by every sampling mode).
    Logits(Vec<f32>),
    /// The argmax of each row (lowest id on ties): all greedy decoding without penalties needs,
    /// and one id per row instead of `V` logits to bring back from a device.
    Argmax(Vec<u32>),
}

/// What the loop needs from a forward's rows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Want {
    /// Full logits ([`Rows::Logits`]).
    Logits,
    /// Either kind: [`Rows::Argmax`] suffices (greedy, no penalties).
    Argmax,
}

/// The target and the drafter of one sequence, as the speculative loop drives them
/// ([`run_speculative`]). [`CpuBackend`] implements it over any [`DraftTarget`] and the CPU
/// [`Drafter`]; `gpu::GpuSpecOn` (feature `cuda`) pairs a `tilert` target session with the
/// device drafter.
///
/// Call order: [`SpecBackend::prefill`] for each chunk of the prompt ([`prefill_prompt`]), then
/// rounds of [`SpecBackend::draft`] (skipped
/// when no draft can be verified), [`SpecBackend::verify`], [`SpecBackend::commit`]. With
/// [`Want::Logits`] a backend must return [`Rows::Logits`]; with [`Want::Argmax`] it may return
/// either kind.
pub trait SpecBackend {
    /// Vocabulary size V.
    fn vocab_size(&self) -> usize;
    /// Committed positions: the target's KV length, equal to the drafter's context length
    /// between rounds (the next block's `x_last` sits at this position).
    fn len(&self) -> usize;
    /// Whether nothing is committed.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Prompt chunks are cut at multiples of this many tokens (the last chunk takes the rest),
    /// so that a chunked prefill computes exactly what one call does.
    fn prefill_granularity(&self) -> usize {
        1
    }
    /// Appends the prompt tokens `chunk` (not empty) at positions `len() ..` — the first chunk
    /// (nothing committed) starts a new sequence: runs them through the target and appends
    /// their features to the drafter's context. With `want` (the prompt's last chunk) returns
    /// the row of the chunk's last token (one row); `None` without.
    fn prefill(&mut self, chunk: &[u32], want: Option<Want>) -> Result<Option<Rows>, SpecError>;
    /// One draft forward of `[x_last, MASK × (block_size − 1)]` at position `len()`: rows
    /// `0 .. block_size − 1`, row `i` for position `len() + 1 + i`. Changes no committed state.
    fn draft(&mut self, x_last: u32, block_size: usize, want: Want) -> Result<Rows, SpecError>;
    /// Runs `tokens` (`[x_last, drafts…]`) through the target at positions `len() ..`: one row
    /// per token, row `j` predicting the token after token `j`.
    fn verify(&mut self, tokens: &[u32], want: Want) -> Result<Rows, SpecError>;
    /// Keeps the first `keep` tokens of the latest [`SpecBackend::verify`]: the target is
    /// truncated to `len() + keep` and their features become drafter context.
    fn commit(&mut self, keep: usize) -> Result<(), SpecError>;
    /// Empties the sequence (target and drafter context) and keeps its memory, so that the next
    /// [`SpecBackend::prefill`] starts a new one (a benchmark reuses one state for every prompt).
    /// A backend that cannot be emptied in place (one request's proxy) refuses: the default.
    fn reset(&mut self) -> Result<(), SpecError> {
        Err(SpecError::TargetOutput(
            "this speculative backend cannot be emptied in place".into(),
        ))
    }
    /// [`SpecBackend::draft`] of `x_last[i]` with block size `block_size[i]` on `states[i]` for
    /// every `i` (the draft forwards of a server's running requests); each result is that
    /// call's, each pair succeeds or fails on its own. A backend that can runs them as one
    /// batched drafter pass; the default runs one call after another.
    fn draft_batch(
        states: &mut [&mut Self],
        x_last: &[u32],
        block_size: &[usize],
        want: &[Want],
    ) -> Vec<Result<Rows, SpecError>>
    where
        Self: Sized,
    {
        states
            .iter_mut()
            .zip(x_last.iter().zip(block_size).zip(want))
            .map(|(s, ((&x, &b), &w))| s.draft(x, b, w))
            .collect()
    }
    /// [`SpecBackend::verify`] of `tokens[i]` on `states[i]` for every `i`: every block through
    /// ONE batched target pass where the backend can (each row at its own sequence's position
    /// and cache); the default runs one call after another. Each result is that call's.
    fn verify_batch(
        states: &mut [&mut Self],
        tokens: &[&[u32]],
        want: &[Want],
    ) -> Vec<Result<Rows, SpecError>>
    where
        Self: Sized,
    {
        states
            .iter_mut()
            .zip(tokens.iter().zip(want))
            .map(|(s, (t, &w))| s.verify(t, w))
            .collect()
    }
}

/// [`SpecBackend`] over a [`DraftTarget`] and the CPU [`Drafter`] (always returns logits):
/// borrowed (`CpuBackend::new(&mut session, &drafter)`, one generation) or owned (a server's
/// request: `CpuBackend::new(session, Arc<Drafter>)`). Its
/// [`SpecBackend::verify_batch`] runs every block through the target's
/// [`model::Executor::forward_batch`] (one pass on the CPU executor).
///
/// Committed tokens' features become drafter context lazily: [`SpecBackend::commit`] keeps them
/// and the next draft (or prefill) appends all kept rows in one call. A round that drafts sees
/// exactly the context it always did (the drafter's context rows do not depend on how many are
/// appended at once); a run of plain steps (adaptive speculation with drafting off) costs no
/// drafter work until it drafts again.
pub struct CpuBackend<T: DraftTarget, D: Borrow<Drafter> = Arc<Drafter>> {
    target: T,
    drafter: D,
    cache: DraftCache,
    /// Position and output of the latest verify (its hidden states feed [`SpecBackend::commit`]).
    verified: Option<(usize, VerifyOutput)>,
    /// Features of committed tokens not yet in `cache` (`pending_rows` rows).
    pending: Vec<f32>,
    pending_rows: usize,
    /// Features of every position committed since the last [`CpuBackend::take_features`], when
    /// recording is on (a prefix cache keeps them with the target's KV blocks).
    recorded: Option<Vec<f32>>,
}

impl<T: DraftTarget, D: Borrow<Drafter>> CpuBackend<T, D> {
    /// Checks `drafter` against the target's dimensions ([`Drafter::check_target`]).
    pub fn new(target: T, drafter: D) -> Result<Self, SpecError> {
        drafter.borrow().check_target(target.config())?;
        let cache = drafter.borrow().new_cache();
        Ok(CpuBackend {
            target,
            drafter,
            cache,
            verified: None,
            pending: Vec::new(),
            pending_rows: 0,
            recorded: None,
        })
    }

    /// Context features per position: `target_layer_ids.len() · hidden_size` floats.
    pub fn feature_dim(&self) -> usize {
        self.drafter.borrow().config().target_layer_ids.len() * self.hidden_size()
    }

    /// Records the features of every position committed from now on (prefill chunks, kept
    /// verify rows) for [`CpuBackend::take_features`].
    pub fn record_features(&mut self) {
        self.recorded.get_or_insert_with(Vec::new);
    }

    /// The features recorded since the last call, in position order (empty when recording is
    /// off).
    pub fn take_features(&mut self) -> Vec<f32> {
        self.recorded
            .as_mut()
            .map(std::mem::take)
            .unwrap_or_default()
    }

    /// Starts the empty state from a cached prefix: `adopt` makes the target hold the prefix's
    /// KV (as if it had prefilled it) and `features` are that prefix's context features, one
    /// row of [`CpuBackend::feature_dim`] per position, as a prefill computed them. The drafter
    /// context takes them without running the target. On any error the state is empty again.
    pub fn adopt_prefix(
        &mut self,
        features: &[f32],
        adopt: impl FnOnce(&mut T) -> Result<(), SpecError>,
    ) -> Result<(), SpecError> {
        if !self.target.is_empty() || self.context_len() != 0 {
            return Err(SpecError::TargetNotEmpty(self.target.len()));
        }
        let dim = self.feature_dim();
        let done = adopt(&mut self.target).and_then(|()| {
            let n = self.target.len();
            if features.len() != n * dim {
                return Err(SpecError::TargetOutput(format!(
                    "{} context features for {n} adopted positions of {dim}",
                    features.len()
                )));
            }
            if n > 0 {
                self.drafter
                    .borrow()
                    .append_context(&mut self.cache, features)?;
            }
            Ok(())
        });
        if done.is_err() {
            let _ = self.reset();
        }
        done
    }

    /// Committed positions of the drafter context (appended or kept for the next draft).
    fn context_len(&self) -> usize {
        self.cache.len() + self.pending_rows
    }

    /// Appends the kept features to the drafter context.
    fn flush_context(&mut self) -> Result<(), SpecError> {
        if self.pending_rows > 0 {
            self.drafter
                .borrow()
                .append_context(&mut self.cache, &self.pending)?;
            self.pending.clear();
            self.pending_rows = 0;
        }
        Ok(())
    }

    /// The target sequence.
    pub fn target(&self) -> &T {
        &self.target
    }

    /// The target sequence and the drafter back.
    pub fn into_parts(self) -> (T, D) {
        (self.target, self.drafter)
    }

    /// Runs `tokens` and checks the output's shape.
    fn forward(&mut self, tokens: &[u32]) -> Result<VerifyOutput, SpecError> {
        let layers = &self.drafter.borrow().config().target_layer_ids;
        let out = self.target.forward(tokens, layers).map_err(target_err)?;
        let (v, h) = (self.vocab_size(), self.hidden_size());
        check_output(&out, tokens.len(), v, layers.len(), h)?;
        Ok(out)
    }

    fn hidden_size(&self) -> usize {
        self.target.config().hidden_size
    }
}

impl<T: DraftTarget, D: Borrow<Drafter>> SpecBackend for CpuBackend<T, D> {
    fn vocab_size(&self) -> usize {
        self.target.config().vocab_size
    }

    fn len(&self) -> usize {
        self.target.len()
    }

    fn prefill(&mut self, chunk: &[u32], want: Option<Want>) -> Result<Option<Rows>, SpecError> {
        if chunk.is_empty() {
            return Err(SpecError::EmptyPrompt);
        }
        if self.target.len() != self.context_len() {
            return Err(SpecError::TargetOutput(format!(
                "the target holds {} positions, the drafter context {}",
                self.target.len(),
                self.context_len()
            )));
        }
        self.verified = None;
        self.flush_context()?;
        let mut out = self.forward(chunk)?;
        let h = self.hidden_size();
        let f = features(&out, chunk.len(), h);
        self.drafter.borrow().append_context(&mut self.cache, &f)?;
        if let Some(r) = &mut self.recorded {
            r.extend_from_slice(&f);
        }
        Ok(want.map(|_| Rows::Logits(out.logits.pop().expect("checked: one row per token"))))
    }

    fn draft(&mut self, x_last: u32, block_size: usize, _want: Want) -> Result<Rows, SpecError> {
        if self.target.len() != self.context_len() {
            return Err(SpecError::TargetOutput(format!(
                "the target holds {} positions, {} were committed",
                self.target.len(),
                self.context_len()
            )));
        }
        self.flush_context()?;
        Ok(Rows::Logits(self.drafter.borrow().draft(
            &mut self.cache,
            self.target.embedding(),
            self.target.lm_head(),
            x_last,
            block_size,
        )?))
    }

    fn verify(&mut self, tokens: &[u32], _want: Want) -> Result<Rows, SpecError> {
        let start = self.target.len();
        let mut out = self.forward(tokens)?;
        let logits = std::mem::take(&mut out.logits).concat();
        self.verified = Some((start, out));
        Ok(Rows::Logits(logits))
    }

    fn commit(&mut self, keep: usize) -> Result<(), SpecError> {
        let Some((start, out)) = self.verified.take() else {
            return Err(SpecError::TargetOutput("commit without a verify".into()));
        };
        if keep == 0 || keep > out.hidden.first().map_or(0, Vec::len) {
            return Err(SpecError::TargetOutput(format!(
                "cannot keep {keep} tokens of the verified block"
            )));
        }
        self.target.truncate(start + keep).map_err(target_err)?;
        let h = self.hidden_size();
        let f = features(&out, keep, h);
        if let Some(r) = &mut self.recorded {
            r.extend_from_slice(&f);
        }
        self.pending.extend(f);
        self.pending_rows += keep;
        Ok(())
    }

    fn reset(&mut self) -> Result<(), SpecError> {
        self.target.truncate(0).map_err(target_err)?;
        self.cache = self.drafter.borrow().new_cache();
        self.verified = None;
        self.pending.clear();
        self.pending_rows = 0;
        if let Some(r) = &mut self.recorded {
            r.clear();
        }
        Ok(())
    }

    /// Every block through the target's [`model::Executor::forward_batch`] (ONE pass on the CPU
    /// executor, rows bit-identical to separate verifies).
    fn verify_batch(
        states: &mut [&mut Self],
        tokens: &[&[u32]],
        want: &[Want],
    ) -> Vec<Result<Rows, SpecError>> {
        let n = states.len().min(tokens.len()).min(want.len());
        if n == 0 {
            return Vec::new();
        }
        let layers = states[0].drafter.borrow().config().target_layer_ids.clone();
        if states[..n]
            .iter()
            .any(|s| s.drafter.borrow().config().target_layer_ids != layers)
        {
            // Drafters reading other layers cannot share a pass.
            return states[..n]
                .iter_mut()
                .zip(tokens)
                .zip(want)
                .map(|((s, t), &w)| s.verify(t, w))
                .collect();
        }
        let starts: Vec<usize> = states[..n].iter().map(|s| s.target.len()).collect();
        let outs = {
            let mut targets: Vec<&mut T> = states[..n].iter_mut().map(|s| &mut s.target).collect();
            T::forward_batch(&mut targets, &tokens[..n], &layers)
        };
        states[..n]
            .iter_mut()
            .zip(outs)
            .zip(tokens.iter().zip(starts))
            .map(|((s, out), (t, start))| {
                let mut out = out.map_err(target_err)?;
                let (v, h) = (s.vocab_size(), s.hidden_size());
                if let Err(e) = check_output(&out, t.len(), v, layers.len(), h) {
                    let _ = s.target.truncate(start);
                    return Err(e);
                }
                let logits = std::mem::take(&mut out.logits).concat();
                s.verified = Some((start, out));
                Ok(Rows::Logits(logits))
            })
            .collect()
    }
}

/// Runs speculative generation on `target` (which must be empty) with `drafter`: checks the
/// drafter against the target ([`Drafter::check_target`]) and runs [`run_speculative`] on a
/// [`CpuBackend`].
///
/// Greedy output is token-for-token identical to plain greedy decoding with the same
/// `SamplingParams` (the CPU executor's verify rows are bit-identical to decode steps);
/// sampled output has exactly the target's sampling distribution.
pub fn speculative_generate<T: DraftTarget>(
    target: &mut T,
    drafter: &Drafter,
    opts: &SpecOptions,
    prompt: &[u32],
    params: &SamplingParams,
    on_token: &mut dyn FnMut(u32) -> ControlFlow<()>,
    on_round: &mut dyn FnMut(&Round<'_>),
) -> Result<SpecOutput, SpecError> {
    check_request(opts, prompt)?;
    if !target.is_empty() {
        return Err(SpecError::TargetNotEmpty(target.len()));
    }
    let mut backend = CpuBackend::new(target, drafter)?;
    run_speculative(&mut backend, opts, prompt, params, on_token, on_round)
}

pub(crate) fn check_request(opts: &SpecOptions, prompt: &[u32]) -> Result<(), SpecError> {
    if !(MIN_BLOCK_SIZE..=MAX_BLOCK_SIZE).contains(&opts.block_size) {
        return Err(SpecError::BlockSize(opts.block_size));
    }
    if prompt.is_empty() {
        return Err(SpecError::EmptyPrompt);
    }
    Ok(())
}

/// Whether greedy picks are plain argmaxes (no penalty to apply to the logits).
pub(crate) fn argmax_suffices(params: &SamplingParams) -> bool {
    params.is_greedy() && !params.penalizes()
}

/// Row `i` (of `V = v` logits) of target rows, for a `target_logits` caller of
/// [`run_speculative_rows`]: `Ok(None)` when not asked for.
pub(crate) fn target_row(
    rows: &Rows,
    i: usize,
    v: usize,
    asked: bool,
) -> Result<Option<&[f32]>, SpecError> {
    match rows {
        _ if !asked => Ok(None),
        Rows::Logits(l) => Ok(Some(&l[i * v..(i + 1) * v])),
        Rows::Argmax(_) => Err(SpecError::TargetOutput(
            "the target's logits were asked for, the backend returned argmax ids".into(),
        )),
    }
}

/// Checks `rows` holds `n` rows of a vocabulary of `v` (ids in range).
pub(crate) fn check_rows(rows: &Rows, n: usize, v: usize, what: &str) -> Result<(), SpecError> {
    let ok = match rows {
        Rows::Logits(l) => l.len() == n * v,
        Rows::Argmax(ids) => ids.len() == n && ids.iter().all(|&t| (t as usize) < v),
    };
    if ok {
        Ok(())
    } else {
        Err(SpecError::TargetOutput(format!(
            "{what}: expected {n} rows over a vocabulary of {v}"
        )))
    }
}

/// Prefills `prompt` into an empty `backend` in chunks of at most `chunk` tokens (`None`: one
/// call), cut at multiples of [`SpecBackend::prefill_granularity`] (at least one granule per
/// chunk, the last chunk takes the rest), and returns the row of the prompt's last token (one
/// row, asked for with `want` on the last chunk only). One call is the same as one chunk, and
/// chunks cut at the granularity compute exactly what one call does.
pub fn prefill_prompt<B: SpecBackend + ?Sized>(
    backend: &mut B,
    prompt: &[u32],
    chunk: Option<usize>,
    want: Want,
) -> Result<Rows, SpecError> {
    if prompt.is_empty() {
        return Err(SpecError::EmptyPrompt);
    }
    if !backend.is_empty() {
        return Err(SpecError::TargetNotEmpty(backend.len()));
    }
    let g = backend.prefill_granularity().max(1);
    let size = chunk.map_or(prompt.len(), |c| (c / g).max(1) * g);
    let mut rest = prompt;
    loop {
        let (now, next) = rest.split_at(size.min(rest.len()));
        let last = next.is_empty();
        let rows = backend.prefill(now, last.then_some(want))?;
        if last {
            return rows
                .ok_or_else(|| SpecError::TargetOutput("the prefill returned no row".into()));
        }
        rest = next;
    }
}

/// The speculative loop (research/dflash.md §3.1) on any [`SpecBackend`] (which must hold no
/// positions).
///
/// Prefill: the prompt runs through the target (logits + the drafter's target layers) in
/// chunks of [`SpecOptions::prefill_chunk`] ([`prefill_prompt`]), its features become the
/// drafter's context, and the first token is chosen from the last row once the last chunk is
/// in. Then each round: one draft forward of `[x_last, MASK × (B−1)]`, drafts chosen from
/// the draft rows (greedy: the same argmax as the target's, penalties included;
/// sampled: `d_i ~ q_i`, `q_i` = the draft row under the request's sampling transform), one
/// target forward of `[x_last, d…]`, acceptance ([`accept_greedy`] / [`accept_sampled`] with
/// the target rows `p_i` under the same transform), the target truncated to `start + a + 1`
/// and the `a + 1` committed tokens' features appended to the drafter context
/// ([`SpecBackend::commit`]), and `d[..a]` + bonus emitted. Near `max_tokens` the verify block
/// shrinks to the tokens still allowed (the draft forward keeps the full block size). Stop
/// tokens (EOS unless `ignore_eos`, `stop_token_ids`) and `max_tokens` end generation inside an
/// emitted run (the run is cut after the stop token); `on_token` sees every emitted token in
/// order and may stop generation (e.g. on a stop string). `on_round` observes each round.
///
/// The penalties (repetition over prompt + history; presence / frequency over the generated
/// tokens) see, for every row of a block, the tokens before that row's position: a draft or
/// target row `i` counts the block's drafts `d[..i]` as generated, exactly as plain decoding
/// would have after emitting them.
///
/// Greedy decoding without penalties asks the backend for argmax rows only ([`Want::Argmax`]);
/// everything else needs logits.
pub fn run_speculative<B: SpecBackend + ?Sized>(
    backend: &mut B,
    opts: &SpecOptions,
    prompt: &[u32],
    params: &SamplingParams,
    on_token: &mut dyn FnMut(u32) -> ControlFlow<()>,
    on_round: &mut dyn FnMut(&Round<'_>),
) -> Result<SpecOutput, SpecError> {
    run_speculative_rows(
        backend,
        opts,
        prompt,
        params,
        false,
        &mut |t, _| on_token(t),
        on_round,
    )
}

/// The token callback of [`run_speculative_rows`]: an emitted token and, when asked for, the
/// target's raw logits row it was chosen from.
pub type OnTokenRow<'a> = dyn FnMut(u32, Option<&[f32]>) -> ControlFlow<()> + 'a;

/// [`run_speculative`] that can also hand `on_token` the **target's raw logits row** of each
/// emitted token (`target_logits`): the row plain decoding would have chosen that token from
/// (the prefill's last row for the first token; verify row `j` for the `j`-th token a round
/// emits), e.g. for log-probabilities. The prefill and verify rows are then fetched as logits
/// ([`Want::Logits`]) even where argmax ids would do; draft rows are not affected. Without
/// `target_logits` the row is `None`.
pub fn run_speculative_rows<B: SpecBackend + ?Sized>(
    backend: &mut B,
    opts: &SpecOptions,
    prompt: &[u32],
    params: &SamplingParams,
    target_logits: bool,
    on_token: &mut OnTokenRow<'_>,
    on_round: &mut dyn FnMut(&Round<'_>),
) -> Result<SpecOutput, SpecError> {
    run_speculative_with(
        backend,
        opts,
        BlockPolicy::Fixed,
        prompt,
        params,
        target_logits,
        on_token,
        on_round,
    )
}

/// [`run_speculative_rows`] with a block policy: [`BlockPolicy::Adaptive`] lets each round's
/// width follow the measured acceptance and cost ([`crate::adapt`]; the output is the same,
/// [`SpecOutput::adaptive`] says what was chosen). The loop is a [`SpecStream`] driven over one
/// backend.
#[allow(clippy::too_many_arguments)]
pub fn run_speculative_with<B: SpecBackend + ?Sized>(
    backend: &mut B,
    opts: &SpecOptions,
    policy: BlockPolicy,
    prompt: &[u32],
    params: &SamplingParams,
    target_logits: bool,
    on_token: &mut OnTokenRow<'_>,
    on_round: &mut dyn FnMut(&Round<'_>),
) -> Result<SpecOutput, SpecError> {
    check_request(opts, prompt)?;
    if !backend.is_empty() {
        return Err(SpecError::TargetNotEmpty(backend.len()));
    }
    let mut stream = SpecStream::new(
        opts,
        policy,
        prompt,
        params,
        backend.vocab_size(),
        target_logits,
    )?;
    let rows = prefill_prompt(backend, prompt, opts.prefill_chunk, stream.prefill_want())?;
    stream.start(&rows, on_token)?;
    while let Some(plan) = stream.plan()? {
        let t0 = Instant::now();
        let start = backend.len();
        let drafts = match plan.draft_block {
            Some(b) => Some(backend.draft(plan.x_last, b, plan.want_draft)?),
            None => None,
        };
        let block = stream.drafted(drafts)?.to_vec();
        let rows = backend.verify(&block, plan.want_verify)?;
        let keep = stream.verified(start, rows, on_round)?;
        // Commit x_last and the accepted drafts; the bonus rides in the next block.
        backend.commit(keep)?;
        stream.observe_cost(t0.elapsed().as_secs_f64());
        stream.emit(on_token)?;
    }
    Ok(stream.finish())
}

/// Emitted tokens, history and the stop rules.
pub(crate) struct Emitter {
    pub(crate) eos: Vec<u32>,
    pub(crate) stop_ids: Vec<u32>,
    pub(crate) max_tokens: usize,
    /// Prompt + emitted tokens (what the penalties see).
    pub(crate) history: Vec<u32>,
    pub(crate) tokens: Vec<u32>,
}

impl Emitter {
    /// Emits one token; `Some(cause)` when generation ends with it (`Some(None)`: the callback
    /// asked to stop). Order of the checks as `StopChecker`: EOS, stop token, callback (stop
    /// strings), `max_tokens`.
    pub(crate) fn emit(
        &mut self,
        t: u32,
        row: Option<&[f32]>,
        on_token: &mut OnTokenRow<'_>,
    ) -> Option<Option<StopCause>> {
        self.tokens.push(t);
        self.history.push(t);
        let flow = on_token(t, row);
        if self.eos.contains(&t) {
            Some(Some(StopCause::Eos(t)))
        } else if self.stop_ids.contains(&t) {
            Some(Some(StopCause::StopToken(t)))
        } else if flow.is_break() {
            Some(None)
        } else if self.tokens.len() >= self.max_tokens {
            Some(Some(StopCause::MaxTokens))
        } else {
            None
        }
    }

    pub(crate) fn finish(
        self,
        stats: AcceptanceStats,
        stop_cause: Option<StopCause>,
    ) -> SpecOutput {
        SpecOutput {
            tokens: self.tokens,
            stats,
            stop_cause,
            adaptive: None,
            plain_steps: 0,
        }
    }
}

/// DFlash speculative decoding on the CPU executor: a target [`CpuModel`], a [`Drafter`]
/// checked against it, a block size.
#[derive(Debug, Clone)]
pub struct SpecDecoder {
    model: CpuModel,
    drafter: Arc<Drafter>,
    opts: SpecOptions,
    policy: BlockPolicy,
}

impl SpecDecoder {
    /// Checks `drafter` against `model` ([`Drafter::check_target`]) and the block size
    /// (`None`: the drafter's trained block size; else `2..=16`). EOS ids default to the
    /// model config's.
    pub fn new(
        model: &CpuModel,
        drafter: Drafter,
        block_size: Option<usize>,
    ) -> Result<SpecDecoder, SpecError> {
        drafter.check_target(model.config())?;
        let block_size = block_size.unwrap_or(drafter.config().block_size);
        if !(MIN_BLOCK_SIZE..=MAX_BLOCK_SIZE).contains(&block_size) {
            return Err(SpecError::BlockSize(block_size));
        }
        Ok(SpecDecoder {
            opts: SpecOptions {
                block_size,
                eos_token_ids: model.config().eos_token_ids.clone(),
                prefill_chunk: None,
            },
            model: model.clone(),
            drafter: Arc::new(drafter),
            policy: BlockPolicy::Fixed,
        })
    }

    /// Sets how each round's width is chosen (default [`BlockPolicy::Fixed`]).
    pub fn with_policy(mut self, policy: BlockPolicy) -> SpecDecoder {
        self.policy = policy;
        self
    }

    pub fn policy(&self) -> BlockPolicy {
        self.policy
    }

    /// The drafter, shared (an owned [`CpuBackend`] per server request holds one).
    pub fn drafter_arc(&self) -> &Arc<Drafter> {
        &self.drafter
    }

    /// Replaces the EOS ids (e.g. with the tokenizer's).
    pub fn with_eos_token_ids(mut self, ids: Vec<u32>) -> SpecDecoder {
        self.opts.eos_token_ids = ids;
        self
    }

    pub fn block_size(&self) -> usize {
        self.opts.block_size
    }

    pub fn drafter(&self) -> &Drafter {
        &self.drafter
    }

    pub fn model(&self) -> &CpuModel {
        &self.model
    }

    pub fn options(&self) -> &SpecOptions {
        &self.opts
    }

    /// Generates from `prompt` in a fresh session; `on_token` sees every generated token as soon
    /// as its round is verified and may stop generation ([`ControlFlow::Break`]).
    pub fn generate(
        &self,
        prompt: &[u32],
        params: &SamplingParams,
        mut on_token: impl FnMut(u32) -> ControlFlow<()>,
    ) -> Result<SpecOutput, SpecError> {
        self.generate_observed(prompt, params, &mut on_token, &mut |_| {})
    }

    /// [`SpecDecoder::generate`] with an observer of every verify round.
    pub fn generate_observed(
        &self,
        prompt: &[u32],
        params: &SamplingParams,
        on_token: &mut dyn FnMut(u32) -> ControlFlow<()>,
        on_round: &mut dyn FnMut(&Round<'_>),
    ) -> Result<SpecOutput, SpecError> {
        let mut session = self.model.session();
        let mut backend = CpuBackend::new(&mut session, &*self.drafter)?;
        run_speculative_with(
            &mut backend,
            &self.opts,
            self.policy,
            prompt,
            params,
            false,
            &mut |t, _| on_token(t),
            on_round,
        )
    }
}
