//! The speculative loop as a **resumable state** ([`SpecStream`]): prefill → (draft → verify →
//! accept → commit → emit)*, each phase a call, so that a caller owning many sequences (the
//! server's scheduler) can advance all of them together — every running sequence's drafts in one
//! batched drafter pass, every verify block in one batched target pass
//! ([`crate::SpecBackend::draft_batch`], [`crate::SpecBackend::verify_batch`]) — instead of
//! running one loop per sequence. [`crate::run_speculative_rows`] drives one stream over one
//! backend with these same calls: there is one definition of the loop.
//!
//! A round:
//! 1. [`SpecStream::plan`]: the round's `x_last`, its verify width and, when it drafts, the
//!    draft block size (the width comes from the [`BlockPolicy`]: fixed, or [`Adaptive`]);
//! 2. the caller runs the draft forward (when planned) and hands the rows to
//!    [`SpecStream::drafted`], which picks the drafts and returns the verify block
//!    `[x_last, d…]`;
//! 3. the caller runs the verify forward and hands the rows to [`SpecStream::verified`], which
//!    runs the acceptance and returns how many tokens to keep;
//! 4. the caller commits that many ([`crate::SpecBackend::commit`]), reports the round's cost
//!    ([`SpecStream::observe_cost`], used by the adaptive policy) and calls
//!    [`SpecStream::emit`], which emits the accepted drafts and the bonus token.

use model::sampling::{SamplingParams, StopCause, UniformStream};
use rand::Rng;

use crate::adapt::{AdaptPrior, AdaptSummary, Adaptive, BlockPolicy};
use crate::decode::{
    argmax_suffices, check_request, check_rows, target_row, Emitter, OnTokenRow, Picker,
};
use crate::{
    accept_greedy, accept_sampled, Acceptance, AcceptanceStats, Round, Rows, SpecError,
    SpecOptions, SpecOutput, Want, DEFAULT_PROB_TOLERANCE,
};

/// What the caller runs for the next round ([`SpecStream::plan`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Plan {
    /// The block's first token (the last emitted one, not yet in the target's cache).
    pub x_last: u32,
    /// Tokens of the verify block (`1 + drafts`; 1: a plain step without drafts).
    pub width: usize,
    /// The draft forward's block size, when the round drafts (`width ≥ 2`; it can exceed
    /// `width` near `max_tokens`).
    pub draft_block: Option<usize>,
    /// What the draft rows must hold.
    pub want_draft: Want,
    /// What the verify rows must hold.
    pub want_verify: Want,
}

/// A round's acceptance as a device runs it ([`SpecStream::acceptance_input`]): the drafts,
/// the request's history before them (prompt, then generated tokens), and the position of the
/// request's uniform stream (`model::sampling::UniformStream`) the acceptance draws from.
#[derive(Debug, Clone, Copy)]
pub struct AcceptanceInput<'a> {
    pub drafts: &'a [u32],
    pub prompt: &'a [u32],
    pub generated: &'a [u32],
    pub stream: UniformStream,
}

/// Where a stream is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Waiting for the prompt's last row ([`SpecStream::start`]).
    Prefill,
    /// Between rounds.
    Ready,
    /// Planned, waiting for the draft rows.
    Planned(Plan),
    /// Drafted, waiting for the verify rows.
    Drafted(Plan),
    /// Verified, waiting for the commit and [`SpecStream::emit`].
    Verified(Plan),
    /// Generation ended.
    Done,
}

/// One sequence's speculative loop as a resumable state (module docs).
pub struct SpecStream {
    block: usize,
    v: usize,
    picker: Picker,
    stops: Emitter,
    stats: AcceptanceStats,
    want: Want,
    want_target: Want,
    target_logits: bool,
    adapt: Option<Adaptive>,
    /// Acceptance measured by earlier sequences ([`SpecStream::set_prior`]).
    prior_stats: Option<AcceptanceStats>,
    phase: Phase,
    index: usize,
    plain_steps: u64,
    stop: Option<Option<StopCause>>,
    q: Vec<f32>,
    p: Vec<f32>,
    drafts: Vec<u32>,
    targets: Vec<u32>,
    block_tokens: Vec<u32>,
    rows: Option<Rows>,
    acceptance: Option<Acceptance>,
}

impl SpecStream {
    /// A stream for `prompt` (not yet prefilled) over a vocabulary of `vocab`, with the loop
    /// settings `opts` and the width policy `policy`. `target_logits`: hand each emitted token
    /// the target's raw logits row ([`crate::run_speculative_rows`]).
    ///
    /// A sampled request with a seed keeps the fixed block whatever `policy` says: the adaptive
    /// choice follows measured time, and which forwards run decides which random numbers the
    /// seed's stream gives each token — a seed must reproduce its output.
    pub fn new(
        opts: &SpecOptions,
        policy: BlockPolicy,
        prompt: &[u32],
        params: &SamplingParams,
        vocab: usize,
        target_logits: bool,
    ) -> Result<SpecStream, SpecError> {
        check_request(opts, prompt)?;
        let want = if argmax_suffices(params) {
            Want::Argmax
        } else {
            Want::Logits
        };
        let seeded_sampling = !params.is_greedy() && params.seed.is_some();
        let adapt = if seeded_sampling {
            None
        } else {
            Adaptive::for_policy(policy, opts.block_size)
        };
        Ok(SpecStream {
            block: opts.block_size,
            v: vocab,
            picker: Picker::new(params, prompt.len())?,
            stops: Emitter {
                eos: if params.ignore_eos {
                    Vec::new()
                } else {
                    opts.eos_token_ids.clone()
                },
                stop_ids: params.stop_token_ids.clone(),
                max_tokens: params.max_tokens,
                history: prompt.to_vec(),
                tokens: Vec::new(),
            },
            stats: AcceptanceStats::new(),
            want,
            want_target: if target_logits { Want::Logits } else { want },
            target_logits,
            adapt,
            prior_stats: None,
            phase: Phase::Prefill,
            index: 0,
            plain_steps: 0,
            stop: None,
            q: Vec::new(),
            p: Vec::new(),
            drafts: Vec::with_capacity(opts.block_size),
            targets: Vec::with_capacity(opts.block_size),
            block_tokens: Vec::with_capacity(opts.block_size),
            rows: None,
            acceptance: None,
        })
    }

    /// Starts the adaptive policy from what earlier sequences measured (their costs and
    /// acceptance; no warm-up when they cover it). No effect with a fixed block.
    pub fn set_prior(&mut self, prior: &AdaptPrior) {
        if let Some(a) = &mut self.adapt {
            if prior.knows(self.block) {
                a.set_prior(prior);
                self.prior_stats = Some(prior.stats.clone());
            }
        }
    }

    /// What the prompt's last prefill row must hold.
    pub fn prefill_want(&self) -> Want {
        self.want_target
    }

    fn order(&self, what: &str) -> SpecError {
        SpecError::TargetOutput(format!("{what} called in phase {:?}", self.phase))
    }

    /// Picks and emits the first token from the prompt's last row (one row).
    pub fn start(&mut self, rows: &Rows, on_token: &mut OnTokenRow<'_>) -> Result<(), SpecError> {
        if self.phase != Phase::Prefill {
            return Err(self.order("start"));
        }
        let v = self.v;
        check_rows(rows, 1, v, "prefill")?;
        let mut probs = vec![0f32; if self.picker.greedy { 0 } else { v }];
        let first = self
            .picker
            .pick_row(rows, 0, v, &self.stops.history, &mut probs)?;
        let row = target_row(rows, 0, v, self.target_logits)?;
        self.phase = Phase::Ready;
        if let Some(cause) = self.stops.emit(first, row, on_token) {
            self.stop = Some(cause);
            self.phase = Phase::Done;
        }
        Ok(())
    }

    /// Whether generation ended.
    pub fn is_done(&self) -> bool {
        self.phase == Phase::Done
    }

    /// The next round, or `None` when generation ended.
    pub fn plan(&mut self) -> Result<Option<Plan>, SpecError> {
        match self.phase {
            Phase::Done => return Ok(None),
            Phase::Ready => {}
            _ => return Err(self.order("plan")),
        }
        let x_last = *self.stops.tokens.last().expect("a token was emitted");
        let chosen = match (&mut self.adapt, &self.prior_stats) {
            (Some(a), Some(prior)) => {
                let mut st = prior.clone();
                st.merge(&self.stats);
                a.next_width(&st)
            }
            (Some(a), None) => a.next_width(&self.stats),
            (None, _) => self.block,
        };
        let left = self.stops.max_tokens - self.stops.tokens.len();
        let width = chosen.min(left).max(1);
        let plan = Plan {
            x_last,
            width,
            draft_block: (width > 1).then_some(chosen),
            want_draft: self.want,
            want_verify: self.want_target,
        };
        self.phase = Phase::Planned(plan);
        Ok(Some(plan))
    }

    /// Picks the drafts from the draft rows (`None` when the plan has no draft forward) and
    /// returns the verify block `[x_last, d…]`.
    pub fn drafted(&mut self, rows: Option<Rows>) -> Result<&[u32], SpecError> {
        let Phase::Planned(plan) = self.phase else {
            return Err(self.order("drafted"));
        };
        let v = self.v;
        let n = plan.width - 1;
        let rows = match (plan.draft_block, rows) {
            (Some(b), Some(r)) => {
                check_rows(&r, b - 1, v, "draft")?;
                r
            }
            (None, _) => Rows::Logits(Vec::new()),
            (Some(_), None) => {
                return Err(SpecError::TargetOutput(
                    "the round drafts, no draft rows were given".into(),
                ))
            }
        };
        let committed = self.stops.history.len();
        self.drafts.clear();
        let sampled = !self.picker.greedy;
        self.q.resize(if sampled { n * v } else { 0 }, 0.0);
        for i in 0..n {
            let q = if sampled {
                &mut self.q[i * v..(i + 1) * v]
            } else {
                &mut []
            };
            let d = self.picker.pick_row(&rows, i, v, &self.stops.history, q)?;
            self.drafts.push(d);
            self.stops.history.push(d);
        }
        self.stops.history.truncate(committed);
        self.rows = Some(rows);
        self.block_tokens.clear();
        self.block_tokens.push(plan.x_last);
        self.block_tokens.extend_from_slice(&self.drafts);
        self.phase = Phase::Drafted(plan);
        Ok(&self.block_tokens)
    }

    /// Runs the acceptance on the verify rows (the block started at position `start`), reports
    /// the round to `on_round` (not a plain step the adaptive policy chose) and returns how many
    /// tokens of the block to keep (`accepted + 1`).
    pub fn verified(
        &mut self,
        start: usize,
        rows: Rows,
        on_round: &mut dyn FnMut(&Round<'_>),
    ) -> Result<usize, SpecError> {
        let Phase::Drafted(plan) = self.phase else {
            return Err(self.order("verified"));
        };
        let (v, width) = (self.v, plan.width);
        let n = width - 1;
        check_rows(&rows, width, v, "verify")?;
        let committed = self.stops.history.len();
        self.targets.clear();
        let greedy = self.picker.greedy;
        self.p.resize(if greedy { 0 } else { width * v }, 0.0);
        for i in 0..width {
            if greedy {
                let t = self
                    .picker
                    .pick_row(&rows, i, v, &self.stops.history, &mut [])?;
                self.targets.push(t);
            } else {
                let Rows::Logits(l) = &rows else {
                    return Err(SpecError::TargetOutput(
                        "sampled decoding needs logits, the backend returned argmax ids".into(),
                    ));
                };
                self.picker.probs(
                    &l[i * v..(i + 1) * v],
                    &self.stops.history,
                    &mut self.p[i * v..(i + 1) * v],
                )?;
            }
            if i < n {
                self.stops.history.push(self.drafts[i]);
            }
        }
        self.stops.history.truncate(committed);
        let acceptance = if greedy {
            accept_greedy(&self.drafts, &self.targets)?
        } else {
            let rng = &mut self.picker.rng;
            let mut uniform = || rng.random::<f64>();
            accept_sampled(
                &self.p,
                &self.q,
                &self.drafts,
                v,
                DEFAULT_PROB_TOLERANCE,
                &mut uniform,
            )?
        };
        self.record(plan, start, rows, acceptance, on_round)
    }

    /// What a device needs to run this round's acceptance where the verify rows are (the rule
    /// of [`SpecStream::verified`], e.g. `tilert::sample::DeviceSampler::accept`): the drafts,
    /// the history before them and where the uniform stream stands. `None` outside the phase
    /// between [`SpecStream::drafted`] and the verify, or when emitted tokens take the target's
    /// rows (logprobs: the rows must come back anyway).
    pub fn acceptance_input(&self) -> Option<AcceptanceInput<'_>> {
        if !matches!(self.phase, Phase::Drafted(_)) || self.target_logits {
            return None;
        }
        let (prompt, generated) = self.stops.history.split_at(self.picker.prompt_len());
        Some(AcceptanceInput {
            drafts: &self.drafts,
            prompt,
            generated,
            stream: UniformStream::of(&self.picker.rng),
        })
    }

    /// [`SpecStream::verified`] with the acceptance computed elsewhere by the same rule over the
    /// same rows (on the device, from [`SpecStream::acceptance_input`]): `acceptance` and the
    /// `uniforms` it consumed from the stream (0 when greedy). The round then goes on exactly as
    /// after [`SpecStream::verified`]; only the verify rows never came to the host.
    pub fn verified_with(
        &mut self,
        start: usize,
        acceptance: Acceptance,
        uniforms: usize,
        on_round: &mut dyn FnMut(&Round<'_>),
    ) -> Result<usize, SpecError> {
        let Phase::Drafted(plan) = self.phase else {
            return Err(self.order("verified_with"));
        };
        if self.target_logits {
            return Err(SpecError::TargetOutput(
                "emitted tokens take the target's rows: the verify rows must come back".into(),
            ));
        }
        let n = plan.width - 1;
        if acceptance.accepted > n || acceptance.bonus as usize >= self.v {
            return Err(SpecError::TargetOutput(format!(
                "acceptance of {} drafts of {n} with bonus token {} (vocabulary {})",
                acceptance.accepted, acceptance.bonus, self.v
            )));
        }
        let most = if self.picker.greedy { 0 } else { n + 1 };
        if uniforms > most {
            return Err(SpecError::TargetOutput(format!(
                "{uniforms} uniforms for a block of {n} drafts"
            )));
        }
        UniformStream::skip(&mut self.picker.rng, uniforms);
        self.record(plan, start, Rows::Argmax(Vec::new()), acceptance, on_round)
    }

    /// The round's bookkeeping once its acceptance is known: statistics, `on_round`, what
    /// [`SpecStream::emit`] emits; returns the tokens to keep.
    fn record(
        &mut self,
        plan: Plan,
        start: usize,
        rows: Rows,
        acceptance: Acceptance,
        on_round: &mut dyn FnMut(&Round<'_>),
    ) -> Result<usize, SpecError> {
        let n = plan.width - 1;
        // A plain step the policy chose is no speculative round (τ counts drafting rounds); a
        // round cut to one token by `max_tokens` is one, as it always was.
        if plan.draft_block.is_none() && self.adapt.is_some() && self.block.min(self.left()) > 1 {
            self.plain_steps += 1;
        } else {
            self.stats.record(acceptance.accepted, n)?;
            let draft_logits: &[f32] = match &self.rows {
                Some(Rows::Logits(l)) => l,
                _ => &[],
            };
            on_round(&Round {
                index: self.index,
                start,
                x_last: plan.x_last,
                draft_logits,
                drafts: &self.drafts,
                acceptance,
            });
            self.index += 1;
        }
        self.rows = Some(rows);
        self.acceptance = Some(acceptance);
        self.phase = Phase::Verified(plan);
        Ok(acceptance.accepted + 1)
    }

    fn left(&self) -> usize {
        self.stops.max_tokens - self.stops.tokens.len()
    }

    /// Reports the seconds the round took (draft, verify and commit), for the adaptive policy.
    /// Call after [`SpecStream::verified`] and before [`SpecStream::emit`].
    pub fn observe_cost(&mut self, secs: f64) {
        if let (Phase::Verified(plan), Some(a)) = (self.phase, &mut self.adapt) {
            // A round cut short by `max_tokens` measures another width than the one chosen.
            let width = plan.draft_block.unwrap_or(1);
            if plan.width == width {
                a.observe(width, secs);
            }
        }
    }

    /// Emits the round's accepted drafts and its bonus token (after the commit); `true` when
    /// generation ended.
    pub fn emit(&mut self, on_token: &mut OnTokenRow<'_>) -> Result<bool, SpecError> {
        if !matches!(self.phase, Phase::Verified(_)) {
            return Err(self.order("emit"));
        }
        let (Some(rows), Some(acc)) = (self.rows.take(), self.acceptance.take()) else {
            return Err(self.order("emit"));
        };
        self.phase = Phase::Ready;
        let v = self.v;
        let a = acc.accepted;
        for j in 0..=a {
            let t = if j < a { self.drafts[j] } else { acc.bonus };
            let row = target_row(&rows, j, v, self.target_logits)?;
            if let Some(cause) = self.stops.emit(t, row, on_token) {
                self.stop = Some(cause);
                self.phase = Phase::Done;
                return Ok(true);
            }
        }
        Ok(false)
    }

    /// Tokens emitted so far.
    pub fn tokens(&self) -> &[u32] {
        &self.stops.tokens
    }

    /// The acceptance statistics so far.
    pub fn stats(&self) -> &AcceptanceStats {
        &self.stats
    }

    /// Plain steps the adaptive policy chose (not counted as rounds).
    pub fn plain_steps(&self) -> u64 {
        self.plain_steps
    }

    /// What the adaptive policy chose (`None` with a fixed block).
    pub fn adapt_summary(&self) -> Option<AdaptSummary> {
        self.adapt.as_ref().map(Adaptive::summary)
    }

    /// What ended generation (`None` while running, `Some(None)` when `on_token` stopped it).
    pub fn stop_cause(&self) -> Option<&Option<StopCause>> {
        self.stop.as_ref()
    }

    /// The generation's output (the tokens so far when it has not ended).
    pub fn finish(self) -> SpecOutput {
        let adaptive = self.adapt_summary();
        let plain_steps = self.plain_steps;
        let cause = self.stop.clone().flatten();
        let mut out = self.stops.finish(self.stats, cause);
        out.adaptive = adaptive;
        out.plain_steps = plain_steps;
        out
    }
}
