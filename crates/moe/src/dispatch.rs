//! Dispatch bookkeeping: per-token routings → per-expert token lists.

use crate::{Routing, RoutingError};

/// One routed `(token, slot)` pair as seen from its expert.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct DispatchEntry {
    /// Token index within the batch.
    pub token: usize,
    /// Position of the expert in that token's [`Routing`] (`0..k`).
    pub slot: usize,
    /// The gate weight, `routings[token].weights[slot]` (copied for the combine step).
    pub weight: f32,
}

/// Per-expert token lists for a batch of T tokens (a counting sort of all `(token, slot)` pairs
/// by expert).
///
/// * `counts()[e]` — how many tokens expert `e` serves (histogram);
/// * `offsets()` — exclusive prefix sums of the counts, `len = E + 1`;
///   `entries()[offsets[e]..offsets[e + 1]]` are expert `e`'s pairs, ordered by token;
/// * `active_experts()` — the distinct experts with at least one token, ascending: the experts
///   an expert GEMV has to read, each once.
///
/// Every `(token, slot)` of the input appears exactly once in `entries()`. [`Dispatch::build_into`]
/// reuses the buffers, so steady-state rebuilding performs no allocation.
#[derive(Debug, Clone, Default)]
pub struct Dispatch {
    num_experts: usize,
    counts: Vec<usize>,
    offsets: Vec<usize>,
    entries: Vec<DispatchEntry>,
    active: Vec<usize>,
    cursor: Vec<usize>,
}

impl Dispatch {
    /// Empty bookkeeping (zero experts, zero tokens); fill it with [`Dispatch::build_into`].
    pub fn new() -> Self {
        Self::default()
    }

    /// Builds the bookkeeping for `routings` (one per token) over `num_experts` experts.
    pub fn build(routings: &[Routing], num_experts: usize) -> Result<Self, RoutingError> {
        let mut d = Self::new();
        d.build_into(routings, num_experts)?;
        Ok(d)
    }

    /// Rebuilds in place, reusing the buffers. Validates every routing first (experts and
    /// weights of equal length, expert ids below `num_experts`, no expert twice in one token);
    /// on error the previous contents are cleared.
    pub fn build_into(
        &mut self,
        routings: &[Routing],
        num_experts: usize,
    ) -> Result<(), RoutingError> {
        self.num_experts = num_experts;
        self.counts.clear();
        self.counts.resize(num_experts, 0);
        self.offsets.clear();
        self.entries.clear();
        self.active.clear();
        self.cursor.clear();

        let mut total = 0usize;
        for (token, r) in routings.iter().enumerate() {
            if r.experts.len() != r.weights.len() {
                self.clear_after_error();
                return Err(RoutingError::RoutingLengthMismatch {
                    token,
                    experts: r.experts.len(),
                    weights: r.weights.len(),
                });
            }
            for (slot, &expert) in r.experts.iter().enumerate() {
                if expert >= num_experts {
                    self.clear_after_error();
                    return Err(RoutingError::ExpertOutOfRange {
                        token,
                        expert,
                        num_experts,
                    });
                }
                if r.experts[..slot].contains(&expert) {
                    self.clear_after_error();
                    return Err(RoutingError::DuplicateExpert { token, expert });
                }
                self.counts[expert] += 1;
            }
            total += r.experts.len();
        }

        self.offsets.reserve(num_experts + 1);
        let mut acc = 0usize;
        self.offsets.push(0);
        for (e, &c) in self.counts.iter().enumerate() {
            acc += c;
            self.offsets.push(acc);
            if c > 0 {
                self.active.push(e);
            }
        }
        debug_assert_eq!(acc, total);

        self.cursor.extend_from_slice(&self.offsets[..num_experts]);
        let placeholder = DispatchEntry {
            token: 0,
            slot: 0,
            weight: 0.0,
        };
        self.entries.resize(total, placeholder);
        // Tokens are visited in ascending order, so each expert's list is ordered by token.
        for (token, r) in routings.iter().enumerate() {
            for (slot, (&expert, &weight)) in r.experts.iter().zip(r.weights.iter()).enumerate() {
                let at = self.cursor[expert];
                self.entries[at] = DispatchEntry {
                    token,
                    slot,
                    weight,
                };
                self.cursor[expert] = at + 1;
            }
        }
        Ok(())
    }

    fn clear_after_error(&mut self) {
        self.counts.iter_mut().for_each(|c| *c = 0);
        self.offsets.clear();
        self.offsets.resize(self.num_experts + 1, 0);
    }

    /// Number of experts this bookkeeping covers.
    pub fn num_experts(&self) -> usize {
        self.num_experts
    }

    /// Tokens per expert (`len = E`).
    pub fn counts(&self) -> &[usize] {
        &self.counts
    }

    /// Exclusive prefix sums of [`Dispatch::counts`] (`len = E + 1`, last = total pairs).
    pub fn offsets(&self) -> &[usize] {
        &self.offsets
    }

    /// All `(token, slot)` pairs grouped by expert (ascending expert, then ascending token).
    pub fn entries(&self) -> &[DispatchEntry] {
        &self.entries
    }

    /// The pairs routed to `expert` (empty if `expert` is out of range or unused).
    pub fn expert_entries(&self, expert: usize) -> &[DispatchEntry] {
        if expert >= self.num_experts || self.offsets.len() != self.num_experts + 1 {
            return &[];
        }
        &self.entries[self.offsets[expert]..self.offsets[expert + 1]]
    }

    /// Distinct experts with at least one token, ascending.
    pub fn active_experts(&self) -> &[usize] {
        &self.active
    }
}
