//! The speculative loop's GPU backend (feature `cuda`): [`GpuSpecOn`] pairs a target
//! [`GpuSession`] with a drafter state [`GpuDraftSession`] (both `tilert`) as a [`SpecBackend`],
//! so [`run_speculative`] runs on the device.
//!
//! It lives here, with the loop it implements a backend of, rather than in the GPU runtime:
//! `tilert` provides the executors (the target session and the GPU drafter, built from the
//! model-level `model::drafter` types) and depends on neither this crate nor the CPU executor;
//! this module is the only place that knows both the loop and the device.

use std::ops::ControlFlow;

use model::sampling::SamplingParams;
use tilert::arena::{dtoh, DPtr};
use tilert::draft::{GpuDraftSession, GpuDrafter};
use tilert::exec::tp::TpSession;
use tilert::exec::GpuSession;
use tilert::ops::MAX_TOKENS;
use tilert::RuntimeError;

use crate::decode::run_speculative;
use crate::{Round, Rows, SpecBackend, SpecError, SpecOptions, SpecOutput, Want};

fn target_err(e: RuntimeError) -> SpecError {
    SpecError::Target(Box::new(e))
}

/// A target whose passes leave their logits, greedy ids and captured hidden states on one GPU,
/// where the drafter runs: a [`GpuSession`], or a tensor-/expert-parallel [`TpSession`] whose
/// rank 0 holds them (the drafter on rank 0's GPU, reading rank 0's captured hidden states).
pub trait DeviceTarget {
    /// The session whose device buffers hold the latest pass's logits, argmax and captures.
    fn lead(&self) -> &GpuSession;
    /// The hidden indices every pass captures (on the lead session).
    fn set_capture(&mut self, indices: &[usize]) -> Result<(), RuntimeError>;
    /// One pass of at most `MAX_TOKENS` tokens, results left on the device.
    fn forward_device(&mut self, tokens: &[u32]) -> Result<(), RuntimeError>;
    fn truncate(&mut self, len: usize) -> Result<(), RuntimeError>;
    fn reset(&mut self);
    /// The target as one [`GpuSession`], when it is one (what a batched verify pass and a
    /// prefix cache's adoption work on); `None` for a tensor-parallel target.
    fn session_mut(&mut self) -> Option<&mut GpuSession> {
        None
    }
}

impl DeviceTarget for GpuSession {
    fn lead(&self) -> &GpuSession {
        self
    }
    fn set_capture(&mut self, indices: &[usize]) -> Result<(), RuntimeError> {
        GpuSession::set_capture(self, indices)
    }
    fn forward_device(&mut self, tokens: &[u32]) -> Result<(), RuntimeError> {
        GpuSession::forward_device(self, tokens)
    }
    fn truncate(&mut self, len: usize) -> Result<(), RuntimeError> {
        GpuSession::truncate(self, len)
    }
    fn reset(&mut self) {
        GpuSession::reset(self)
    }
    fn session_mut(&mut self) -> Option<&mut GpuSession> {
        Some(self)
    }
}

impl DeviceTarget for TpSession {
    fn lead(&self) -> &GpuSession {
        TpSession::lead(self)
    }
    fn set_capture(&mut self, indices: &[usize]) -> Result<(), RuntimeError> {
        TpSession::set_capture(self, indices)
    }
    fn forward_device(&mut self, tokens: &[u32]) -> Result<(), RuntimeError> {
        TpSession::forward_device(self, tokens)
    }
    fn truncate(&mut self, len: usize) -> Result<(), RuntimeError> {
        TpSession::truncate(self, len)
    }
    fn reset(&mut self) {
        TpSession::reset(self)
    }
}

impl<T: DeviceTarget + ?Sized> DeviceTarget for &mut T {
    fn lead(&self) -> &GpuSession {
        (**self).lead()
    }
    fn set_capture(&mut self, indices: &[usize]) -> Result<(), RuntimeError> {
        (**self).set_capture(indices)
    }
    fn forward_device(&mut self, tokens: &[u32]) -> Result<(), RuntimeError> {
        (**self).forward_device(tokens)
    }
    fn truncate(&mut self, len: usize) -> Result<(), RuntimeError> {
        (**self).truncate(len)
    }
    fn reset(&mut self) {
        (**self).reset()
    }
    fn session_mut(&mut self) -> Option<&mut GpuSession> {
        (**self).session_mut()
    }
}

/// The speculative loop's backend on the GPU: a target [`DeviceTarget`] — a [`GpuSession`]
/// (borrowed, [`GpuSpec`], or owned, `GpuSpecOn<GpuSession>`: a whole speculative sequence to
/// keep between calls, as the server does) or a tensor-parallel [`TpSession`] ([`GpuTpSpec`];
/// the drafter on rank 0's GPU) — and a drafter state. Greedy rounds bring back one id per row
/// (draft and verify argmax on the device); sampled rounds bring back the logits.
pub struct GpuSpecOn<T> {
    target: T,
    draft: GpuDraftSession,
    /// Position and size of the latest verified block.
    verified: Option<(usize, usize)>,
    /// Context features of every position committed since the last
    /// [`GpuSpecOn::take_features`], when recording is on (a prefix cache keeps them with the
    /// target's KV blocks).
    recorded: Option<Vec<f32>>,
}

/// [`GpuSpecOn`] over a borrowed target session.
pub type GpuSpec<'a> = GpuSpecOn<&'a mut GpuSession>;

/// [`GpuSpecOn`] over a borrowed tensor-/expert-parallel session (the drafter built on
/// `TpModel::rank(0)`).
pub type GpuTpSpec<'a> = GpuSpecOn<&'a mut TpSession>;

impl<T: DeviceTarget> GpuSpecOn<T> {
    /// Pairs `target` (its model — rank 0's under tensor parallelism — must be the drafter's
    /// target) with a fresh draft state.
    pub fn new(target: T, drafter: &GpuDrafter) -> Result<Self, RuntimeError> {
        let draft = drafter.session(target.lead().max_seq())?;
        Self::with_draft_session(target, draft)
    }

    /// Pairs `target` with an existing draft state (reset by the prefill; its captured graphs
    /// are kept, so repeated generations do not capture again).
    pub fn with_draft_session(target: T, draft: GpuDraftSession) -> Result<Self, RuntimeError> {
        draft.check_target(target.lead())?;
        Ok(Self {
            target,
            draft,
            verified: None,
            recorded: None,
        })
    }

    /// The draft state back (to pair with the next sequence).
    pub fn into_draft_session(self) -> GpuDraftSession {
        self.draft
    }

    /// The target session and the draft state back.
    pub fn into_parts(self) -> (T, GpuDraftSession) {
        (self.target, self.draft)
    }

    /// The target session (rank 0's under tensor parallelism).
    pub fn target(&self) -> &GpuSession {
        self.target.lead()
    }

    /// Device bytes of the target session and the draft state.
    pub fn device_bytes(&self) -> usize {
        self.target().device_bytes() + self.draft.device_bytes()
    }

    /// Empties the target and the draft state, so the next [`GpuSpecOn::generate`] (or
    /// `SpecBackend::prefill`) starts a new sequence on the same device memory and graphs.
    pub fn reset(&mut self) {
        self.target.reset();
        self.draft.reset();
        self.verified = None;
        if let Some(r) = &mut self.recorded {
            r.clear();
        }
    }

    /// Context features per position: the drafter's captured states (`K`) times the hidden
    /// size.
    pub fn feature_dim(&self) -> usize {
        self.draft.drafter().hidden_indices().len() * self.target().model().config().hidden_size
    }

    /// Records the context features of every position committed from now on (prefill chunks,
    /// kept verify rows) for [`GpuSpecOn::take_features`]: they come back to the host (a prefix
    /// cache keeps them with the target's KV blocks), `feature_dim` values a position.
    pub fn record_features(&mut self) {
        self.recorded.get_or_insert_with(Vec::new);
    }

    /// The features recorded since the last call, in position order (empty when recording is
    /// off), laid out as `dflash::CpuBackend`'s: row `j` = the `K` captured states of position
    /// `j` one after another.
    pub fn take_features(&mut self) -> Vec<f32> {
        self.recorded
            .as_mut()
            .map(std::mem::take)
            .unwrap_or_default()
    }

    /// Appends rows `0..rows` of the latest pass's captured states to the recording (if on).
    fn record(&mut self, rows: usize) -> Result<(), RuntimeError> {
        if self.recorded.is_none() {
            return Ok(());
        }
        let lead = self.target.lead();
        let h = lead.model().config().hidden_size;
        let k = self.draft.drafter().hidden_indices().len();
        let slots = (0..k)
            .map(|slot| dtoh(lead.model().stream(), lead.captured_hidden(slot, rows)))
            .collect::<Result<Vec<_>, _>>()?;
        let r = self.recorded.as_mut().expect("checked: recording");
        for j in 0..rows {
            for slot in &slots {
                r.extend_from_slice(&slot[j * h..(j + 1) * h]);
            }
        }
        Ok(())
    }

    /// Starts the empty state from a cached prefix: `adopt` makes the target hold the prefix's
    /// KV (as if it had prefilled it; a [`GpuSession`] target: `GpuSession::adopt_prefix`) and
    /// `features` are that prefix's context features ([`GpuSpecOn::feature_dim`] a position, as
    /// [`GpuSpecOn::take_features`] recorded them). The drafter context is rebuilt from them in
    /// appends of at most `MAX_TOKENS` positions from position 0 — the appends of a prefill
    /// whose passes were cut at multiples of `MAX_TOKENS` — without running the target. On any
    /// error the state is empty again.
    pub fn adopt_prefix(
        &mut self,
        features: &[f32],
        adopt: impl FnOnce(&mut T) -> Result<(), SpecError>,
    ) -> Result<(), SpecError> {
        if !self.target().is_empty() || !self.draft.is_empty() {
            return Err(SpecError::TargetNotEmpty(self.target().len()));
        }
        let dim = self.feature_dim();
        let done = adopt(&mut self.target).and_then(|()| {
            let n = self.target().len();
            if features.len() != n * dim {
                return Err(SpecError::TargetOutput(format!(
                    "{} context features for {n} adopted positions of {dim}",
                    features.len()
                )));
            }
            self.verified = None;
            self.draft.reset();
            let indices = self.draft.drafter().hidden_indices().to_vec();
            let target = &mut self.target;
            target.set_capture(&indices).map_err(target_err)?;
            for (c, chunk) in features.chunks(MAX_TOKENS * dim.max(1)).enumerate() {
                let rows = chunk.len() / dim.max(1);
                let session = target.session_mut().ok_or_else(|| {
                    SpecError::TargetOutput("a cached prefix needs a one-GPU target session".into())
                })?;
                session.write_captured(chunk, rows).map_err(target_err)?;
                self.draft
                    .append_context(target.lead(), rows)
                    .map_err(target_err)?;
                debug_assert_eq!(self.draft.len(), c * MAX_TOKENS + rows);
            }
            if let Some(r) = &mut self.recorded {
                r.clear();
            }
            Ok(())
        });
        if done.is_err() {
            GpuSpecOn::reset(self);
        }
        done
    }

    /// The draft state (for inspection).
    pub fn draft_session(&mut self) -> &mut GpuDraftSession {
        &mut self.draft
    }

    fn rows(&self, logits: DPtr<f32>, argmax: DPtr<u32>, want: Want) -> Result<Rows, SpecError> {
        let s = self.target().model().stream();
        Ok(match want {
            Want::Argmax => Rows::Argmax(dtoh(s, argmax).map_err(target_err)?),
            Want::Logits => Rows::Logits(dtoh(s, logits).map_err(target_err)?),
        })
    }

    /// Runs [`run_speculative`] on this backend: speculative generation from `prompt` (the
    /// session must be empty).
    pub fn generate(
        &mut self,
        opts: &SpecOptions,
        prompt: &[u32],
        params: &SamplingParams,
        on_token: &mut dyn FnMut(u32) -> ControlFlow<()>,
        on_round: &mut dyn FnMut(&Round<'_>),
    ) -> Result<SpecOutput, SpecError> {
        run_speculative(self, opts, prompt, params, on_token, on_round)
    }
}

impl<T: DeviceTarget> SpecBackend for GpuSpecOn<T> {
    fn vocab_size(&self) -> usize {
        self.target().model().config().vocab_size
    }

    fn len(&self) -> usize {
        self.target().len()
    }

    /// Target passes take at most [`MAX_TOKENS`] tokens: chunks cut at multiples of that run
    /// the same passes as one call.
    fn prefill_granularity(&self) -> usize {
        MAX_TOKENS
    }

    fn prefill(&mut self, chunk: &[u32], want: Option<Want>) -> Result<Option<Rows>, SpecError> {
        if chunk.is_empty() {
            return Err(SpecError::EmptyPrompt);
        }
        if self.target().is_empty() {
            // A new sequence: the draft state may hold an earlier one's context.
            self.draft.reset();
        } else if self.target().len() != self.draft.len() {
            return Err(SpecError::TargetOutput(format!(
                "the target holds {} positions, the drafter context {}",
                self.target().len(),
                self.draft.len()
            )));
        }
        self.verified = None;
        self.target
            .set_capture(self.draft.drafter().hidden_indices())
            .map_err(target_err)?;
        let mut last = 0;
        for pass in chunk.chunks(MAX_TOKENS) {
            self.target.forward_device(pass).map_err(target_err)?;
            self.draft
                .append_context(self.target.lead(), pass.len())
                .map_err(target_err)?;
            self.record(pass.len()).map_err(target_err)?;
            last = pass.len();
        }
        let Some(want) = want else {
            return Ok(None);
        };
        let v = self.vocab_size();
        let logits = self.target().logits_device(last);
        let argmax = self.target().argmax_device(last);
        self.rows(
            logits.slice((last - 1) * v..last * v),
            argmax.slice(last - 1..last),
            want,
        )
        .map(Some)
    }

    fn draft(&mut self, x_last: u32, block_size: usize, want: Want) -> Result<Rows, SpecError> {
        if self.target().len() != self.draft.len() {
            return Err(SpecError::TargetOutput(format!(
                "the target holds {} positions, {} were committed",
                self.target().len(),
                self.draft.len()
            )));
        }
        self.draft.draft(x_last, block_size).map_err(target_err)?;
        let n = block_size - 1;
        self.rows(
            self.draft.logits_device(n),
            self.draft.argmax_device(n),
            want,
        )
    }

    fn verify(&mut self, tokens: &[u32], want: Want) -> Result<Rows, SpecError> {
        let target = &mut self.target;
        let start = target.lead().len();
        target
            .set_capture(self.draft.drafter().hidden_indices())
            .map_err(target_err)?;
        target.forward_device(tokens).map_err(target_err)?;
        self.verified = Some((start, tokens.len()));
        self.rows(
            self.target().logits_device(tokens.len()),
            self.target().argmax_device(tokens.len()),
            want,
        )
    }

    fn commit(&mut self, keep: usize) -> Result<(), SpecError> {
        let Some((start, n)) = self.verified.take() else {
            return Err(SpecError::TargetOutput("commit without a verify".into()));
        };
        if keep == 0 || keep > n {
            return Err(SpecError::TargetOutput(format!(
                "cannot keep {keep} of {n} verified tokens"
            )));
        }
        let target = &mut self.target;
        target.truncate(start + keep).map_err(target_err)?;
        self.draft
            .append_context(target.lead(), keep)
            .map_err(target_err)?;
        self.record(keep).map_err(target_err)
    }

    fn reset(&mut self) -> Result<(), SpecError> {
        GpuSpecOn::reset(self);
        Ok(())
    }

    /// Every block through ONE batched target pass (passes of at most `MAX_TOKENS` rows:
    /// `tilert::exec::GpuBatch::forward_device`) when the targets are [`GpuSession`]s sharing a
    /// batch (`GpuSession::share_batch`) and their drafters read the same hidden states; each
    /// state is then left as its own [`SpecBackend::verify`] leaves it (rows, captured states
    /// for the commit), so the rest of the round is unchanged. Otherwise, or should the batched
    /// pass fail (it changes nothing), one verify after another.
    fn verify_batch(
        states: &mut [&mut Self],
        tokens: &[&[u32]],
        want: &[Want],
    ) -> Vec<Result<Rows, SpecError>> {
        let n = states.len().min(tokens.len()).min(want.len());
        if n > 1 {
            if let Some(rows) = batched_verify(&mut states[..n], &tokens[..n], &want[..n]) {
                return rows;
            }
        }
        states[..n]
            .iter_mut()
            .zip(tokens.iter().zip(want))
            .map(|(s, (t, &w))| s.verify(t, w))
            .collect()
    }
}

/// [`SpecBackend::verify_batch`]'s batched pass; `None` when the states cannot share one or the
/// pass failed (nothing changed then).
fn batched_verify<T: DeviceTarget>(
    states: &mut [&mut GpuSpecOn<T>],
    tokens: &[&[u32]],
    want: &[Want],
) -> Option<Vec<Result<Rows, SpecError>>> {
    let indices = states[0].draft.drafter().hidden_indices().to_vec();
    if states
        .iter()
        .any(|s| s.draft.drafter().hidden_indices() != indices.as_slice())
    {
        return None;
    }
    let batch = states[0].target.session_mut()?.shared_batch()?.clone();
    // Every session keeps its rows' logits on the device, as its own verify does (an acceptance
    // run on the device reads them there).
    let logits = true;
    let starts: Vec<usize> = states.iter().map(|s| s.target().len()).collect();
    {
        let mut sessions = Vec::with_capacity(states.len());
        for s in states.iter_mut() {
            let session = s.target.session_mut()?;
            session.set_capture(&indices).ok()?;
            sessions.push(session);
        }
        session_bind(sessions[0]).ok()?;
        let mut b = batch.try_borrow_mut().ok()?;
        b.forward_device(&mut sessions, tokens, logits).ok()?;
    }
    Some(
        states
            .iter_mut()
            .zip(tokens.iter().zip(want).zip(starts))
            .map(|(s, ((t, &w), start))| {
                s.verified = Some((start, t.len()));
                s.rows(
                    s.target().logits_device(t.len()),
                    s.target().argmax_device(t.len()),
                    w,
                )
            })
            .collect(),
    )
}

/// Makes `s`'s CUDA context current on this thread.
fn session_bind(s: &GpuSession) -> Result<(), RuntimeError> {
    Ok(s.model().device().ctx.bind_to_thread()?)
}
