//! Acceptance statistics.

use crate::AcceptError;

/// Running acceptance statistics over verify rounds.
///
/// Each round is recorded as `(accepted, drafted)`: `a` drafts accepted out of `n` drafted. The
/// round emits `a + 1` tokens (the bonus included), so
/// * **τ** ([`AcceptanceStats::tau`]) = mean of `a + 1` over rounds = emitted tokens per target
///   forward (the number DFlash papers report; τ ≤ B);
/// * the **histogram** counts rounds by `a` (`histogram()[a]`);
/// * the **per-position acceptance rate** at draft position `i` is conditional: among rounds
///   that examined draft `i` (all earlier drafts accepted and `i < n`), the fraction that
///   accepted it.
///
/// Statistics from different sequences or workers combine with [`AcceptanceStats::merge`]; the
/// result equals recording all rounds into one.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AcceptanceStats {
    rounds: u64,
    drafted: u64,
    accepted: u64,
    histogram: Vec<u64>,
    examined: Vec<u64>,
    position_accepted: Vec<u64>,
}

fn grow(v: &mut Vec<u64>, len: usize) {
    if v.len() < len {
        v.resize(len, 0);
    }
}

impl AcceptanceStats {
    /// No rounds recorded.
    pub fn new() -> Self {
        Self::default()
    }

    /// Records one round: `accepted` of `drafted` drafts accepted.
    pub fn record(&mut self, accepted: usize, drafted: usize) -> Result<(), AcceptError> {
        if accepted > drafted {
            return Err(AcceptError::AcceptedExceedsDrafted { accepted, drafted });
        }
        self.rounds += 1;
        self.drafted += drafted as u64;
        self.accepted += accepted as u64;
        grow(&mut self.histogram, accepted + 1);
        self.histogram[accepted] += 1;
        // Drafts 0..=accepted were examined (the one at `accepted` rejected), capped by `drafted`.
        let examined = (accepted + 1).min(drafted);
        grow(&mut self.examined, examined);
        grow(&mut self.position_accepted, examined);
        for i in 0..examined {
            self.examined[i] += 1;
        }
        for i in 0..accepted {
            self.position_accepted[i] += 1;
        }
        Ok(())
    }

    /// Adds every round recorded in `other`.
    pub fn merge(&mut self, other: &AcceptanceStats) {
        self.rounds += other.rounds;
        self.drafted += other.drafted;
        self.accepted += other.accepted;
        let add = |a: &mut Vec<u64>, b: &[u64]| {
            grow(a, b.len());
            for (x, y) in a.iter_mut().zip(b) {
                *x += y;
            }
        };
        add(&mut self.histogram, &other.histogram);
        add(&mut self.examined, &other.examined);
        add(&mut self.position_accepted, &other.position_accepted);
    }

    /// Rounds (target verify forwards) recorded.
    pub fn rounds(&self) -> u64 {
        self.rounds
    }

    /// Total drafts proposed.
    pub fn drafted_tokens(&self) -> u64 {
        self.drafted
    }

    /// Total drafts accepted.
    pub fn accepted_tokens(&self) -> u64 {
        self.accepted
    }

    /// Total tokens emitted: accepted drafts plus one bonus per round.
    pub fn emitted_tokens(&self) -> u64 {
        self.accepted + self.rounds
    }

    /// τ: mean tokens emitted per round, counting the bonus. `None` before any round.
    pub fn tau(&self) -> Option<f64> {
        (self.rounds > 0).then(|| self.emitted_tokens() as f64 / self.rounds as f64)
    }

    /// Mean accepted drafts per round (τ − 1). `None` before any round.
    pub fn mean_accepted(&self) -> Option<f64> {
        (self.rounds > 0).then(|| self.accepted as f64 / self.rounds as f64)
    }

    /// Fraction of all drafted tokens that were accepted. `None` if nothing was drafted.
    pub fn acceptance_rate(&self) -> Option<f64> {
        (self.drafted > 0).then(|| self.accepted as f64 / self.drafted as f64)
    }

    /// Conditional acceptance rate of draft position `i`: accepted / examined at `i`. `None` if
    /// position `i` was never examined.
    pub fn position_acceptance_rate(&self, i: usize) -> Option<f64> {
        let examined = *self.examined.get(i)?;
        (examined > 0).then(|| self.position_accepted[i] as f64 / examined as f64)
    }

    /// How many rounds examined each draft position.
    pub fn position_examined(&self) -> &[u64] {
        &self.examined
    }

    /// How many rounds accepted each draft position.
    pub fn position_accepted(&self) -> &[u64] {
        &self.position_accepted
    }

    /// Rounds by accepted count: `histogram()[a]` rounds accepted exactly `a` drafts. Its length
    /// is one more than the largest `a` seen.
    pub fn histogram(&self) -> &[u64] {
        &self.histogram
    }
}
