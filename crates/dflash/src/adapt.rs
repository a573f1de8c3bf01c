//! Adaptive speculation: per sequence, choose the verify width (the block size `2..=B`, or 1 —
//! a plain step without drafts) from the measured acceptance and the measured cost of a step of
//! each width on this device and load.
//!
//! The expected tokens of a round of width `w` are `τ(w) = 1 + Σ_{i<w−1} Π_{j≤i} r_j`, `r_j` the
//! conditional acceptance rate of draft position `j` observed so far
//! ([`AcceptanceStats::position_acceptance_rate`]; an unobserved position repeats the last
//! observed one). A step of width `w` costs `c(w)` seconds: the fastest of the latest [`WINDOW`]
//! observed steps of that width, interpolated linearly between the nearest observed widths for
//! the others. On a loaded machine other processes only ever add to a step's time, and by how
//! much changes from one moment to the next (measured on a shared 2-core VM: plain steps of
//! the same sequence at 0.9 ms and at 16–76 ms); the fastest recent step is the step's own
//! cost, and comparing those compares what each width does, whatever the load did while each
//! was measured. A lasting change (a slower step of one width) shows within [`WINDOW`] steps. The controller picks the width of the most tokens per second, `τ(w) / c(w)`;
//! drafting (any `w ≥ 2`) must beat a plain step by [`MARGIN`] to be chosen, so noise does not
//! make a sequence slower than decoding without a drafter.
//!
//! Schedule: [`WARMUP`] rounds at the full block size (acceptance and the round's cost; one with
//! [`BlockPolicy::Recheck`]), then
//! [`PLAIN_WARMUP`] plain steps (the plain cost), then the best width. Every `interval` steps the
//! other mode is probed once (a full-block round while drafting is off, a plain step while it is
//! on) to follow changes in acceptance or load; the interval doubles (up to [`MAX_INTERVAL`])
//! while probes confirm the choice and falls back to [`MIN_INTERVAL`] when one changes it.
//!
//! The choice changes which forwards run, never what is emitted: greedy output is the same at
//! every width, sampled output has the target's distribution at every width.

use std::collections::VecDeque;

use crate::AcceptanceStats;

/// Rounds at the full block size before the first choice.
pub const WARMUP: u64 = 2;
/// Plain steps after them before the first choice (cheap: a plain step is what decoding
/// without a drafter does; more of them keep one slow first step from deciding).
pub const PLAIN_WARMUP: u64 = 4;
/// Observed steps per width whose fastest is its cost.
pub const WINDOW: usize = 9;
/// Steps between probes of the mode not chosen, at first and after a change.
pub const MIN_INTERVAL: u64 = 32;
/// Most steps between probes.
pub const MAX_INTERVAL: u64 = 256;
/// Drafting is chosen only when its tokens per second beat a plain step's by this factor.
pub const MARGIN: f64 = 1.03;
/// When the chosen mode beats the other by this factor (or more), probes wait [`MAX_INTERVAL`]
/// steps at once: a probe (a full-block round after a run of plain steps also catches the drafter
/// context up) costs more than it can find out.
pub const CLEAR: f64 = 1.4;

/// How a sequence's verify width is chosen.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum BlockPolicy {
    /// Always the configured block size (cut to the tokens still allowed).
    #[default]
    Fixed,
    /// [`Adaptive`]: the block size `2..=B` or no drafts, whichever pays (module docs).
    Adaptive,
    /// [`BlockPolicy::Adaptive`] re-checking a verdict on record (`ultra generate`'s memory of
    /// an earlier measuring run): one full-block warm-up round instead of [`WARMUP`], since a
    /// warm-up round where drafting does not pay costs several plain steps.
    Recheck,
}

impl BlockPolicy {
    /// Whether the rounds' width is chosen adaptively ([`BlockPolicy::Adaptive`] or
    /// [`BlockPolicy::Recheck`]).
    pub fn is_adaptive(self) -> bool {
        matches!(self, BlockPolicy::Adaptive | BlockPolicy::Recheck)
    }
}

/// What an adaptive sequence chose, for reports.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct AdaptSummary {
    /// Steps run at each width (index `w`; `steps[1]`: plain steps without drafts).
    pub steps: Vec<u64>,
    /// The width chosen last (1: drafting off).
    pub chosen: usize,
    /// Seconds of a step of each width: the fastest of the latest (`None`: never run).
    pub cost: Vec<Option<f64>>,
    /// At the last choice: the best drafting width's expected tokens per second over a plain
    /// step's (below 1: drafting does not pay here; `None` before both were measured).
    pub draft_speedup: Option<f64>,
}

impl AdaptSummary {
    /// `"off (plain steps)"` or `"block N"`, then the steps per width run.
    pub fn describe(&self) -> String {
        let choice = if self.chosen <= 1 {
            "drafting off (plain steps)".to_string()
        } else {
            format!("block {}", self.chosen)
        };
        let steps: Vec<String> = self
            .steps
            .iter()
            .enumerate()
            .filter(|(_, &n)| n > 0)
            .map(|(w, n)| {
                let what = if w == 1 {
                    "plain".to_string()
                } else {
                    format!("B={w}")
                };
                match self.cost.get(w).copied().flatten() {
                    Some(c) => format!("{what}: {n} × {:.2} ms", c * 1e3),
                    None => format!("{what}: {n}"),
                }
            })
            .collect();
        let speedup = match self.draft_speedup {
            Some(r) => format!("; best block at {r:.2}× plain speed"),
            None => String::new(),
        };
        format!("adaptive: {choice}{speedup}; steps {}", steps.join(", "))
    }
}

/// What earlier sequences measured (a server's finished requests): a new sequence starts from it
/// instead of warming up ([`Adaptive::set_prior`]), so a short request on a device where drafting
/// does not pay starts with plain steps.
#[derive(Debug, Clone, Default)]
pub struct AdaptPrior {
    /// Index `w`: the latest measured seconds of a step of width `w`.
    pub cost: Vec<Option<f64>>,
    /// Acceptance of recent rounds (at most about [`PRIOR_ROUNDS`]).
    pub stats: AcceptanceStats,
}

/// Rounds an [`AdaptPrior`] keeps before it starts over from the latest sequence's.
pub const PRIOR_ROUNDS: u64 = 512;

impl AdaptPrior {
    /// Takes in what a finished sequence measured.
    pub fn absorb(&mut self, s: &AdaptSummary, stats: &AcceptanceStats) {
        if self.cost.len() < s.cost.len() {
            self.cost.resize(s.cost.len(), None);
        }
        for (c, n) in self.cost.iter_mut().zip(&s.cost) {
            if n.is_some() {
                *c = *n;
            }
        }
        if self.stats.rounds() + stats.rounds() > PRIOR_ROUNDS {
            self.stats = AcceptanceStats::new();
        }
        self.stats.merge(stats);
    }

    /// Whether it holds a measured plain step and full-block round for blocks of `block`.
    pub fn knows(&self, block: usize) -> bool {
        let has = |w: usize| self.cost.get(w).copied().flatten().is_some();
        has(1) && has(block) && self.stats.rounds() > 0
    }
}

/// The adaptive width controller of one sequence (module docs).
#[derive(Debug, Clone)]
pub struct Adaptive {
    max_block: usize,
    /// Index `w`: the latest (at most [`WINDOW`]) seconds of steps of width `w`, oldest first.
    recent: Vec<VecDeque<f64>>,
    /// Index `w`: the fastest of `recent[w]`.
    cost: Vec<Option<f64>>,
    /// Costs measured by earlier sequences (used where this one has none; no warm-up when the
    /// plain and full-block costs are known).
    prior_cost: Vec<Option<f64>>,
    steps: Vec<u64>,
    chosen: usize,
    /// Steps since the last probe.
    since_probe: u64,
    interval: u64,
    /// The width of the step in flight is a probe.
    probing: bool,
    /// The drafting speed-up of the last choice (see [`AdaptSummary::draft_speedup`]).
    speedup: Option<f64>,
    /// Full-block rounds before the first choice ([`WARMUP`], 1 for [`BlockPolicy::Recheck`]).
    warmup: u64,
}

impl Adaptive {
    /// A controller for blocks of at most `max_block` (≥ 2).
    pub fn new(max_block: usize) -> Adaptive {
        let max_block = max_block.max(2);
        Adaptive {
            max_block,
            recent: vec![VecDeque::with_capacity(WINDOW); max_block + 1],
            cost: vec![None; max_block + 1],
            prior_cost: vec![None; max_block + 1],
            steps: vec![0; max_block + 1],
            chosen: max_block,
            since_probe: 0,
            interval: MIN_INTERVAL,
            probing: false,
            speedup: None,
            warmup: WARMUP,
        }
    }

    /// The controller `policy` asks for ([`BlockPolicy::Recheck`]: one warm-up round; `None` for
    /// [`BlockPolicy::Fixed`]).
    pub fn for_policy(policy: BlockPolicy, max_block: usize) -> Option<Adaptive> {
        match policy {
            BlockPolicy::Fixed => None,
            BlockPolicy::Adaptive => Some(Adaptive::new(max_block)),
            BlockPolicy::Recheck => Some(Adaptive {
                warmup: 1,
                ..Adaptive::new(max_block)
            }),
        }
    }

    /// Starts from what earlier sequences measured: their costs stand in for this one's until
    /// it measures its own, and the warm-up is skipped when they cover the plain step and the
    /// full block (the acceptance prior is the caller's to merge into `stats`).
    pub fn set_prior(&mut self, prior: &AdaptPrior) {
        for (c, p) in self.prior_cost.iter_mut().zip(&prior.cost) {
            *c = *p;
        }
    }

    /// The width of the next step (before the cut to the tokens still allowed).
    pub fn next_width(&mut self, stats: &AcceptanceStats) -> usize {
        let b = self.max_block;
        if self.steps[b] < self.warmup && self.prior_cost[b].is_none() {
            return b;
        }
        if self.steps[1] < PLAIN_WARMUP && self.prior_cost[1].is_none() {
            return 1;
        }
        let before = self.chosen;
        let (best, ratio) = self.best_ratio(stats);
        self.chosen = best;
        self.speedup = (ratio > 0.0).then_some(ratio);
        if self.probing {
            // The probe ran: a probe that confirms the mode lengthens the interval.
            self.probing = false;
            self.interval = if (before > 1) == (self.chosen > 1) {
                (self.interval * 2).min(MAX_INTERVAL)
            } else {
                MIN_INTERVAL
            };
            self.since_probe = 0;
        }
        // A clear choice is probed rarely.
        if ratio >= CLEAR || (ratio > 0.0 && ratio <= 1.0 / CLEAR) {
            self.interval = MAX_INTERVAL;
        }
        self.since_probe += 1;
        if self.since_probe >= self.interval {
            self.probing = true;
            self.since_probe = 0;
            return if self.chosen > 1 { 1 } else { b };
        }
        self.chosen
    }

    /// Records that a step of width `width` took `secs` seconds.
    pub fn observe(&mut self, width: usize, secs: f64) {
        if width == 0 || width > self.max_block || !secs.is_finite() || secs < 0.0 {
            return;
        }
        self.steps[width] += 1;
        let r = &mut self.recent[width];
        if r.len() == WINDOW {
            r.pop_front();
        }
        r.push_back(secs);
        self.cost[width] = r.iter().copied().min_by(f64::total_cmp);
    }

    /// The width chosen last (1: drafting off).
    pub fn chosen(&self) -> usize {
        self.chosen
    }

    pub fn summary(&self) -> AdaptSummary {
        AdaptSummary {
            steps: self.steps.clone(),
            chosen: self.chosen,
            cost: self.cost.clone(),
            draft_speedup: self.speedup,
        }
    }

    /// The cost of width `w`: observed, else interpolated between the nearest observed widths.
    fn cost_of(&self, w: usize) -> Option<f64> {
        let known = |x: usize| self.cost[x].or(self.prior_cost[x]);
        if let Some(c) = known(w) {
            return Some(c);
        }
        let lo = (1..w).rev().find_map(|x| known(x).map(|c| (x, c)));
        let hi = (w + 1..=self.max_block).find_map(|x| known(x).map(|c| (x, c)));
        match (lo, hi) {
            (Some((a, ca)), Some((b, cb))) => {
                Some(ca + (cb - ca) * (w - a) as f64 / (b - a) as f64)
            }
            _ => None,
        }
    }

    /// The width of the most expected tokens per second, and the best drafting width's rate over
    /// a plain step's (0 when unknown).
    fn best_ratio(&self, stats: &AcceptanceStats) -> (usize, f64) {
        let Some(plain) = self.cost_of(1).filter(|&c| c > 0.0) else {
            return (self.max_block, 0.0);
        };
        let mut best = (1, 1.0 / plain * MARGIN);
        let mut best_draft = 0.0f64;
        let mut tau = 1.0;
        let mut run = 1.0;
        let mut last_rate = 0.0;
        for w in 2..=self.max_block {
            let rate = stats.position_acceptance_rate(w - 2).unwrap_or(last_rate);
            last_rate = rate;
            run *= rate;
            tau += run;
            if let Some(c) = self.cost_of(w).filter(|&c| c > 0.0) {
                best_draft = best_draft.max(tau / c);
                if tau / c > best.1 {
                    best = (w, tau / c);
                }
            }
        }
        (best.0, best_draft * plain)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stats(accepted: &[(usize, usize)]) -> AcceptanceStats {
        let mut s = AcceptanceStats::new();
        for &(a, n) in accepted {
            s.record(a, n).unwrap();
        }
        s
    }

    /// Runs the controller for `steps` steps with a cost per width and fixed acceptance.
    fn drive(steps: usize, cost: impl Fn(usize) -> f64, s: &AcceptanceStats) -> Adaptive {
        let mut a = Adaptive::new(8);
        for _ in 0..steps {
            let w = a.next_width(s);
            a.observe(w, cost(w));
        }
        a
    }

    #[test]
    fn turns_drafting_off_when_a_round_costs_more_than_it_gains() {
        // τ ≈ 2 per round, a round costs 3 plain steps: plain wins.
        let s = stats(&[(1, 7), (1, 7), (1, 7)]);
        let a = drive(100, |w| if w == 1 { 1.0 } else { 3.0 }, &s);
        assert_eq!(a.chosen(), 1);
        let sum = a.summary();
        // Probes still run the full block now and then; most steps are plain.
        assert!(sum.steps[1] > 80, "{sum:?}");
        assert!(
            sum.describe().contains("drafting off"),
            "{}",
            sum.describe()
        );
    }

    #[test]
    fn keeps_drafting_when_it_pays_and_picks_the_best_block() {
        // Every draft accepted, a round costs 1.5 plain steps: the full block.
        let s = stats(&[(7, 7), (7, 7), (7, 7)]);
        let a = drive(100, |w| if w == 1 { 1.0 } else { 1.5 }, &s);
        assert_eq!(a.chosen(), 8);
        // Only the first two positions accepted, cost growing with the width: block 3.
        let s = stats(&[(2, 7), (2, 7), (2, 7)]);
        let a = drive(100, |w| 1.0 + 0.25 * (w - 1) as f64, &s);
        assert_eq!(a.chosen(), 3, "{:?}", a.summary());
    }

    #[test]
    fn a_margin_keeps_plain_decoding_when_drafting_barely_pays() {
        // τ = 2 for twice the cost: equal speed, plain is kept.
        let s = stats(&[(1, 1), (1, 1), (1, 1)]);
        let mut a = Adaptive::new(2);
        for _ in 0..50 {
            let w = a.next_width(&s);
            a.observe(w, if w == 1 { 1.0 } else { 2.0 });
        }
        assert_eq!(a.chosen(), 1);
    }

    #[test]
    fn a_prior_skips_the_warm_up() {
        // Earlier sequences found drafting 3× the cost of a plain step for τ ≈ 2.
        let s = stats(&[(1, 7), (1, 7), (1, 7)]);
        let mut prior = AdaptPrior::default();
        let mut cost = vec![None; 9];
        cost[1] = Some(1.0);
        cost[8] = Some(3.0);
        let summary = AdaptSummary {
            steps: vec![0; 9],
            chosen: 1,
            cost,
            draft_speedup: None,
        };
        prior.absorb(&summary, &s);
        assert!(prior.knows(8));
        let mut a = Adaptive::new(8);
        a.set_prior(&prior);
        // No full-block warm-up round: the first step explores the block the prior's costs
        // suggest (width 2 interpolates cheaply between plain and the full block) and, measured
        // as expensive as the full block, drafting turns off.
        let w = a.next_width(&prior.stats);
        assert!(w < 8, "{w}");
        a.observe(w, 3.0);
        assert_eq!(a.next_width(&prior.stats), 1);
        // Without a prior the first step drafts the full block.
        assert_eq!(Adaptive::new(8).next_width(&s), 8);
    }

    #[test]
    fn load_spikes_do_not_flip_the_choice() {
        // τ ≈ 2, a round costs 3 plain steps; every 4th step (either kind) is delayed 8× by
        // another process. The fastest of the latest steps keeps plain decoding chosen; an
        // average of the latest would follow the spikes.
        let s = stats(&[(1, 7), (1, 7), (1, 7)]);
        let mut a = Adaptive::new(8);
        let mut plain = 0;
        for step in 0..400u64 {
            let w = a.next_width(&s);
            let base = if w == 1 { 1.0 } else { 3.0 };
            a.observe(w, if step % 4 == 3 { 8.0 * base } else { base });
            if step >= 20 && w == 1 {
                plain += 1;
            }
        }
        assert_eq!(a.chosen(), 1, "{:?}", a.summary());
        assert!(plain > 370, "{plain} plain steps: {:?}", a.summary());
        let sum = a.summary();
        assert_eq!(sum.cost[1], Some(1.0));
        assert!(sum.draft_speedup.unwrap() < 1.0, "{sum:?}");
        assert!(sum.describe().contains("plain speed"), "{}", sum.describe());
    }

    #[test]
    fn a_lasting_change_of_cost_is_followed() {
        // Drafting pays (every draft accepted, a round costs 2 plain steps) until the rounds
        // become 10× dearer: the probes see it and drafting turns off.
        let s = stats(&[(7, 7), (7, 7), (7, 7)]);
        let mut a = Adaptive::new(8);
        for step in 0..2000 {
            let w = a.next_width(&s);
            let round = if step < 200 { 2.0 } else { 20.0 };
            a.observe(w, if w == 1 { 1.0 } else { round });
            if step == 199 {
                assert_eq!(a.chosen(), 8, "{:?}", a.summary());
            }
        }
        assert_eq!(a.chosen(), 1, "{:?}", a.summary());
    }

    #[test]
    fn a_recheck_warms_up_with_one_round() {
        // No draft accepted: drafting cannot pay at any width.
        let s = stats(&[(0, 7)]);
        let mut a = Adaptive::for_policy(BlockPolicy::Recheck, 8).unwrap();
        assert_eq!(a.next_width(&s), 8);
        a.observe(8, 3.0);
        // Straight to the plain warm-up, then plain.
        for _ in 0..PLAIN_WARMUP {
            assert_eq!(a.next_width(&s), 1);
            a.observe(1, 1.0);
        }
        assert_eq!(a.next_width(&s), 1);
        assert_eq!(a.summary().steps[8], 1);
        // The full policy warms up with WARMUP rounds; a fixed block has no controller.
        let mut full = Adaptive::for_policy(BlockPolicy::Adaptive, 8).unwrap();
        for _ in 0..WARMUP {
            assert_eq!(full.next_width(&s), 8);
            full.observe(8, 3.0);
        }
        assert!(Adaptive::for_policy(BlockPolicy::Fixed, 8).is_none());
        assert!(BlockPolicy::Recheck.is_adaptive() && !BlockPolicy::Fixed.is_adaptive());
    }

    #[test]
    fn bad_observations_are_ignored() {
        let mut a = Adaptive::new(4);
        a.observe(0, 1.0);
        a.observe(9, 1.0);
        a.observe(2, f64::NAN);
        a.observe(2, -1.0);
        assert_eq!(a.summary().steps, vec![0; 5]);
    }
}
