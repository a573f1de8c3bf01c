//! Acceptance rules: greedy and exact rejection sampling.

use crate::AcceptError;
use std::fmt;

/// Result of verifying one block.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Acceptance {
    /// Number of drafts accepted, `a ∈ 0..=drafts`; the round emits `drafts[..a]` then `bonus`.
    pub accepted: usize,
    /// The token taken from target row `a` (the correction on a rejection, the free extra token
    /// when every draft was accepted). It is not yet in the target's KV cache.
    pub bonus: u32,
}

impl Acceptance {
    /// Tokens this round emits: `accepted + 1` (the round's acceptance length, counting the
    /// bonus).
    pub fn emitted(&self) -> usize {
        self.accepted + 1
    }
}

/// Greedy acceptance.
///
/// `drafts` are `d[0..B-1)`, `target_argmax` is the target's argmax at each verified row
/// `t[0..B)` (so `target_argmax.len() == drafts.len() + 1`). Accepts the longest prefix with
/// `d[i] == t[i]` and takes the bonus `t[a]`. With no drafts (`B = 1`) it returns `a = 0`,
/// `bonus = t[0]`: ordinary decoding.
pub fn accept_greedy(drafts: &[u32], target_argmax: &[u32]) -> Result<Acceptance, AcceptError> {
    if target_argmax.len() != drafts.len() + 1 {
        return Err(AcceptError::LengthMismatch {
            what: "target argmax (drafts + 1)",
            expected: drafts.len() + 1,
            got: target_argmax.len(),
        });
    }
    let accepted = drafts
        .iter()
        .zip(target_argmax)
        .take_while(|(d, t)| d == t)
        .count();
    Ok(Acceptance {
        accepted,
        bonus: target_argmax[accepted],
    })
}

/// A source of independent uniform numbers in `[0, 1)`.
///
/// Implemented for every `FnMut() -> f64`, so a closure over a seeded generator works:
/// `let mut u = || rng.random::<f64>();`. Values outside `[0, 1)` are rejected with
/// [`AcceptError::UniformOutOfRange`].
pub trait UniformSource {
    /// Next uniform number in `[0, 1)`.
    fn uniform(&mut self) -> f64;
}

impl<F: FnMut() -> f64> UniformSource for F {
    fn uniform(&mut self) -> f64 {
        self()
    }
}

/// Which probability table an error refers to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dist {
    /// Target rows `p`.
    Target,
    /// Draft rows `q`.
    Draft,
}

impl fmt::Display for Dist {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Dist::Target => "target",
            Dist::Draft => "draft",
        })
    }
}

/// Default tolerance on `|Σ row − 1|` for [`accept_sampled`]: loose enough for an f32 softmax over
/// a 150k-token vocabulary, tight enough to catch logits passed as probabilities.
pub const DEFAULT_PROB_TOLERANCE: f64 = 1e-3;

/// Exact rejection sampling for sampled (temperature / top-k / top-p) decoding.
///
/// Inputs, dense and row-major over a vocabulary of `vocab` tokens, for `n = drafts.len()`
/// drafts (`B = n + 1`):
/// * `target` — `p[0..B)`, `B · vocab` values: the target's (already filtered) distribution at
///   each verified row;
/// * `draft` — `q[0..n)`, `n · vocab` values: the distribution each draft token was sampled from;
/// * `drafts` — `d[0..n)`;
/// * `tolerance` — how far each row's sum may be from 1 (see [`DEFAULT_PROB_TOLERANCE`]);
/// * `rng` — uniform numbers in `[0, 1)`.
///
/// Algorithm, with `p̂`, `q̂` each row divided by its sum:
/// ```text
/// for i in 0..n:
///     u ~ U[0,1);  accept d[i]  iff  u · q̂_i(d[i]) < p̂_i(d[i])      (probability min(1, p̂/q̂))
///     on the first rejection: a = i, bonus ~ normalize(max(0, p̂_i − q̂_i)); stop
/// if all accepted: a = n, bonus ~ p̂_n
/// ```
/// The emitted tokens then have exactly the target's distribution (each `d[i] ~ q_i` drawn
/// independently of the earlier drafts is a valid proposal for the sequential walk; see
/// research/dflash.md §3.2). The uniforms are consumed in a fixed order — one per examined
/// draft, then one for the bonus — so the result is a deterministic function of the inputs and
/// the uniform stream.
///
/// Edge cases:
/// * **`q(d) = 0`**: a correct drafter never proposes such a token (probability zero under
///   `q`); it arises from inconsistent inputs, e.g. `q` filtered after sampling. The acceptance
///   ratio `p/q` is then `+∞` when `p(d) > 0`, so the draft is accepted; when `p(d) = 0` too,
///   accepting would emit a token the target forbids, so it is rejected. `u·q < p` encodes
///   exactly this. Exactness is only guaranteed when the drafts really were drawn from `q`.
/// * **`p(d) = 0`**: always rejected (`u·q ≥ 0`); the residual then never contains `d`.
/// * **Zero residual mass** (`p̂_i ≤ q̂_i` everywhere, i.e. `p̂_i = q̂_i`; a rejection can then
///   only happen on a token with `p = q = 0`): the bonus is sampled from `p̂_i` instead.
/// * **Rows not summing to 1**: every row must be finite, non-negative and sum to within
///   `tolerance` of 1 (checked in f64 over the whole input up front, `O(B · vocab)`), else a
///   typed error. Within the tolerance rows are normalized by their sums, as above.
/// * A sampled token always has positive probability (a zero-probability token is never
///   returned, even under rounding).
pub fn accept_sampled<R: UniformSource + ?Sized>(
    target: &[f32],
    draft: &[f32],
    drafts: &[u32],
    vocab: usize,
    tolerance: f64,
    rng: &mut R,
) -> Result<Acceptance, AcceptError> {
    let n = drafts.len();
    if vocab == 0 {
        return Err(AcceptError::EmptyVocab);
    }
    if !(0.0..1.0).contains(&tolerance) {
        return Err(AcceptError::InvalidTolerance(tolerance));
    }
    let expect_len = |what, rows: usize, got: usize| {
        let expected = rows.saturating_mul(vocab);
        if got == expected {
            Ok(())
        } else {
            Err(AcceptError::LengthMismatch {
                what,
                expected,
                got,
            })
        }
    };
    expect_len(
        "target probabilities ((drafts + 1) · vocab)",
        n + 1,
        target.len(),
    )?;
    expect_len("draft probabilities (drafts · vocab)", n, draft.len())?;
    if let Some((position, &token)) = drafts
        .iter()
        .enumerate()
        .find(|(_, &t)| t as usize >= vocab)
    {
        return Err(AcceptError::TokenOutOfRange {
            position,
            token,
            vocab,
        });
    }
    // Validate every row up front so errors do not depend on the random stream.
    let mut p_sum = Vec::with_capacity(n + 1);
    for (row, r) in target.chunks_exact(vocab).enumerate() {
        p_sum.push(row_sum(r, Dist::Target, row, tolerance)?);
    }
    let mut q_sum = Vec::with_capacity(n);
    for (row, r) in draft.chunks_exact(vocab).enumerate() {
        q_sum.push(row_sum(r, Dist::Draft, row, tolerance)?);
    }

    for (i, &d) in drafts.iter().enumerate() {
        let p_row = &target[i * vocab..(i + 1) * vocab];
        let q_row = &draft[i * vocab..(i + 1) * vocab];
        let (ps, qs) = (p_sum[i], q_sum[i]);
        let u = next_uniform(rng)?;
        let p_d = p_row[d as usize] as f64 / ps;
        let q_d = q_row[d as usize] as f64 / qs;
        if u * q_d < p_d {
            continue;
        }
        // Rejected: sample the residual max(0, p̂ − q̂).
        let u = next_uniform(rng)?;
        let residual = |j: usize| (p_row[j] as f64 / ps - q_row[j] as f64 / qs).max(0.0);
        let mass: f64 = (0..vocab).map(residual).sum();
        let bonus = if mass > 0.0 {
            sample_index(vocab, residual, u * mass)
        } else {
            None
        };
        // Zero residual mass (or a rounding corner): fall back to p̂.
        let bonus = match bonus {
            Some(t) => t,
            None => sample_index(vocab, |j| p_row[j] as f64, u * ps).unwrap_or(0),
        };
        return Ok(Acceptance {
            accepted: i,
            bonus: bonus as u32,
        });
    }
    let p_row = &target[n * vocab..];
    let u = next_uniform(rng)?;
    // The row sum is ≥ 1 − tolerance > 0, so some entry is positive and this is Some.
    let bonus = sample_index(vocab, |j| p_row[j] as f64, u * p_sum[n]).unwrap_or(0);
    Ok(Acceptance {
        accepted: n,
        bonus: bonus as u32,
    })
}

fn next_uniform<R: UniformSource + ?Sized>(rng: &mut R) -> Result<f64, AcceptError> {
    let u = rng.uniform();
    if (0.0..1.0).contains(&u) {
        Ok(u)
    } else {
        Err(AcceptError::UniformOutOfRange(u))
    }
}

/// Validates one row and returns its sum (f64).
fn row_sum(row: &[f32], dist: Dist, index_row: usize, tolerance: f64) -> Result<f64, AcceptError> {
    let mut sum = 0.0f64;
    for (index, &v) in row.iter().enumerate() {
        if !(v.is_finite() && v >= 0.0) {
            return Err(AcceptError::InvalidProbability {
                dist,
                row: index_row,
                index,
                value: v,
            });
        }
        sum += v as f64;
    }
    if (sum - 1.0).abs() > tolerance {
        return Err(AcceptError::NotNormalized {
            dist,
            row: index_row,
            sum,
            tolerance,
        });
    }
    Ok(sum)
}

/// Inverse-CDF sampling over unnormalized non-negative weights `w(0..len)`: the first index whose
/// running sum exceeds `target`. If rounding leaves `target` at or beyond the total, the last
/// index with positive weight is returned; `None` only if every weight is zero. Never returns
/// an index of weight zero.
pub(crate) fn sample_index(len: usize, w: impl Fn(usize) -> f64, target: f64) -> Option<usize> {
    let mut cum = 0.0f64;
    let mut last = None;
    for j in 0..len {
        let x = w(j);
        if x > 0.0 {
            cum += x;
            last = Some(j);
            if target < cum {
                return Some(j);
            }
        }
    }
    last
}
