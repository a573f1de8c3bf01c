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
        let target = &mut self.target;
        target
            .set_capture(self.draft.drafter().hidden_indices())
            .map_err(target_err)?;
        let mut last = 0;
        for pass in chunk.chunks(MAX_TOKENS) {
            target.forward_device(pass).map_err(target_err)?;
            self.draft
                .append_context(target.lead(), pass.len())
                .map_err(target_err)?;
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
            .map_err(target_err)
    }

    fn reset(&mut self) -> Result<(), SpecError> {
        GpuSpecOn::reset(self);
        Ok(())
    }
}
