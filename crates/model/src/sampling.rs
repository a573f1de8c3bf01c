//! Token sampling and stop handling.
//!
//! * [`SamplingParams`]: the per-request knobs a vLLM / llama.cpp user expects (temperature,
//!   top-k, top-p, min-p, repetition / presence / frequency penalties, seed, max tokens, stop
//!   token ids, stop strings, `ignore_eos`), with [`SamplingParams::validate`].
//! * [`SamplingDist`]: **the one definition** of the sampling distribution — which tokens a row
//!   keeps and with which weight ([`SamplingDist::kept`]), or its dense form
//!   ([`SamplingDist::probs`]). Processors run in the vLLM order **repetition penalty →
//!   frequency penalty → presence penalty → temperature → top-k → top-p → min-p**
//!   ([`read_penalized`] applies the penalties). [`Sampler`], DFlash's exact rejection sampling
//!   (`dflash` re-exports it) and the GPU sampling kernel's test oracle all use it.
//! * [`Sampler`]: turns one row of logits into a token id, drawing from the [`SamplingDist`]
//!   with the sequence's RNG (sums in `f64`). A seeded sampler is deterministic: the same seed,
//!   parameters, logits and history always give the same tokens.
//! * [`log_softmax`], [`logprob_of`], [`logsumexp`], [`top_logprobs`]: `f64`-accumulated helpers
//!   used for scoring (`ultra score`) and for OpenAI-style `logprobs`.
//! * [`StopChecker`]: fed one token and its decoded text delta at a time, decides whether
//!   generation stops (EOS / stop token / stop string / length) and which text is safe to stream.
//!   Text that could be the beginning of a stop string is held back until it is known not to be.
//!
//! Non-finite logits never panic: `NaN` is treated as `-inf`, `+inf` as `f32::MAX`. When no logit
//! is finite, [`Sampler::try_sample`] returns [`SamplingError::NoFiniteLogits`] and
//! [`Sampler::sample`] falls back to token 0 (documented there).

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha20Rng;
use serde::{Deserialize, Serialize};
use std::cmp::{Ordering, Reverse};
use std::collections::BinaryHeap;

/// Default for [`SamplingParams::max_tokens`].
pub const DEFAULT_MAX_TOKENS: usize = 256;

/// Temperatures below this are treated as greedy (vLLM's `_SAMPLING_EPS`).
pub const GREEDY_TEMPERATURE_EPS: f32 = 1e-5;

/// Relative tolerance used by top-p: a nucleus whose mass is within this factor of `top_p` counts
/// as having reached it (so `top_p = 0.8` over probabilities `[0.5, 0.3, 0.2]` keeps two tokens
/// even though `0.8f32` is slightly above `0.8`).
const TOP_P_REL_TOL: f64 = 1e-6;

/// Errors from [`SamplingParams::validate`] and [`Sampler::try_sample`].
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum SamplingError {
    #[error("temperature must be a finite number >= 0, got {0}")]
    InvalidTemperature(f32),
    #[error("top_k must be >= 1 (leave it unset to disable it), got 0")]
    InvalidTopK,
    #[error("top_p must be in (0, 1], got {0}")]
    InvalidTopP(f32),
    #[error("min_p must be in [0, 1], got {0}")]
    InvalidMinP(f32),
    #[error("repetition_penalty must be a finite number > 0, got {0}")]
    InvalidRepetitionPenalty(f32),
    #[error("presence_penalty must be in [-2, 2], got {0}")]
    InvalidPresencePenalty(f32),
    #[error("frequency_penalty must be in [-2, 2], got {0}")]
    InvalidFrequencyPenalty(f32),
    #[error("max_tokens must be >= 1")]
    InvalidMaxTokens,
    #[error("stop strings must not be empty")]
    EmptyStopString,
    #[error("cannot sample from an empty logits row")]
    EmptyLogits,
    #[error("no finite logit to sample from (all logits are -inf or NaN)")]
    NoFiniteLogits,
}

impl SamplingError {
    /// The request parameter at fault, in OpenAI / vLLM spelling (`stop` for the stop
    /// strings); `None` for errors about the logits rather than the parameters.
    pub fn param(&self) -> Option<&'static str> {
        match self {
            SamplingError::InvalidTemperature(_) => Some("temperature"),
            SamplingError::InvalidTopK => Some("top_k"),
            SamplingError::InvalidTopP(_) => Some("top_p"),
            SamplingError::InvalidMinP(_) => Some("min_p"),
            SamplingError::InvalidRepetitionPenalty(_) => Some("repetition_penalty"),
            SamplingError::InvalidPresencePenalty(_) => Some("presence_penalty"),
            SamplingError::InvalidFrequencyPenalty(_) => Some("frequency_penalty"),
            SamplingError::InvalidMaxTokens => Some("max_tokens"),
            SamplingError::EmptyStopString => Some("stop"),
            SamplingError::EmptyLogits | SamplingError::NoFiniteLogits => None,
        }
    }
}

/// Per-id token counts reused across rows: [`TokenCounts::begin`] empties them in O(1) (a stamp
/// per id instead of clearing the counts).
#[derive(Debug, Clone, Default)]
pub struct TokenCounts {
    mark: Vec<u32>,
    count: Vec<u32>,
    stamp: u32,
}

impl TokenCounts {
    /// Starts with every id of `0..n` at count 0.
    pub fn begin(&mut self, n: usize) {
        if self.mark.len() != n {
            self.mark.clear();
            self.mark.resize(n, 0);
            self.count.clear();
            self.count.resize(n, 0);
            self.stamp = 0;
        }
        self.stamp = self.stamp.wrapping_add(1);
        if self.stamp == 0 {
            self.mark.fill(0);
            self.stamp = 1;
        }
    }

    /// Counts one more `t` (below the `n` of [`TokenCounts::begin`]); returns its count now
    /// (1 the first time).
    pub fn add(&mut self, t: usize) -> u32 {
        if self.mark[t] != self.stamp {
            self.mark[t] = self.stamp;
            self.count[t] = 0;
        }
        self.count[t] += 1;
        self.count[t]
    }

    /// The count of `t`, which is then forgotten (0 from now on): a walk over a token list
    /// that takes each id sees every distinct id's count exactly once.
    pub fn take(&mut self, t: usize) -> u32 {
        if self.mark[t] != self.stamp {
            return 0;
        }
        self.mark[t] = self.stamp.wrapping_sub(1);
        self.count[t]
    }
}

/// The first processors of [`SamplingDist`] (and so of [`Sampler`]), in vLLM's order:
/// `logits` read into `work` with NaN → −∞ and +∞ → `f32::MAX`; then the HF repetition penalty `r` on each distinct token of `prompt` and
/// `generated` once (the logit divided by `r` when positive, multiplied when negative); then,
/// over the `generated` tokens only (OpenAI / vLLM semantics), the frequency and presence
/// penalties: `x − frequency_penalty · count − presence_penalty` for every token generated
/// `count ≥ 1` times (in `f32`, in that order, as vLLM). Ids outside the row are ignored.
/// Returns the largest value of `work`, or [`SamplingError::NoFiniteLogits`] when it holds
/// none (all −∞).
pub fn read_penalized(
    logits: &[f32],
    prompt: &[u32],
    generated: &[u32],
    params: &SamplingParams,
    counts: &mut TokenCounts,
    work: &mut Vec<f32>,
) -> Result<f32, SamplingError> {
    let n = logits.len();
    work.clear();
    work.extend(logits.iter().map(|&x| {
        if x.is_nan() {
            f32::NEG_INFINITY
        } else {
            x.min(f32::MAX)
        }
    }));
    let rep = params.repetition_penalty.filter(|&r| r != 1.0);
    if let Some(r) = rep.filter(|_| !prompt.is_empty() || !generated.is_empty()) {
        counts.begin(n);
        for &t in prompt.iter().chain(generated) {
            let t = t as usize;
            if t < n && counts.add(t) == 1 {
                let v = &mut work[t];
                *v = if *v < 0.0 { *v * r } else { *v / r };
            }
        }
    }
    let (freq, pres) = (params.frequency_penalty, params.presence_penalty);
    if (freq != 0.0 || pres != 0.0) && !generated.is_empty() {
        counts.begin(n);
        for &t in generated {
            if (t as usize) < n {
                counts.add(t as usize);
            }
        }
        for &t in generated {
            let t = t as usize;
            if t < n {
                let c = counts.take(t);
                if c > 0 {
                    work[t] = (work[t] - freq * c as f32) - pres;
                }
            }
        }
    }
    let max = work.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    if max == f32::NEG_INFINITY {
        return Err(SamplingError::NoFiniteLogits);
    }
    Ok(max)
}

/// Per-request sampling parameters. [`Default`] is greedy decoding of up to
/// [`DEFAULT_MAX_TOKENS`] tokens with no stops besides the model's EOS.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct SamplingParams {
    /// Softmax temperature; `0` (or anything below [`GREEDY_TEMPERATURE_EPS`]) means greedy.
    pub temperature: f32,
    /// Keep only the `k` most likely tokens (all tokens tied with the k-th are kept, as in HF).
    pub top_k: Option<usize>,
    /// Nucleus sampling: keep the smallest set of most likely tokens whose probability mass
    /// reaches `top_p`. `1.0` disables it.
    pub top_p: Option<f32>,
    /// Keep only tokens whose probability is at least `min_p` times the top probability.
    pub min_p: Option<f32>,
    /// HF repetition penalty: the logit of every token in the history (prompt and generated) is
    /// divided by the penalty when positive and multiplied by it when negative (each distinct
    /// token once).
    pub repetition_penalty: Option<f32>,
    /// OpenAI presence penalty in `[-2, 2]`: subtracted once from the logit of every token
    /// generated so far in this request (the prompt does not count). `0` disables it.
    pub presence_penalty: f32,
    /// OpenAI frequency penalty in `[-2, 2]`: subtracted from a token's logit once per time it
    /// was generated so far in this request (the prompt does not count). `0` disables it.
    pub frequency_penalty: f32,
    /// RNG seed; `None` seeds from the OS.
    pub seed: Option<u64>,
    /// Maximum number of generated tokens.
    pub max_tokens: usize,
    /// Extra token ids that stop generation (in addition to EOS). Their text is not emitted.
    pub stop_token_ids: Vec<u32>,
    /// Strings that stop generation. The stop string itself is not emitted.
    pub stop_strings: Vec<String>,
    /// Do not stop at the model's EOS token(s) (`stop_token_ids` still apply).
    pub ignore_eos: bool,
}

impl Default for SamplingParams {
    fn default() -> Self {
        SamplingParams {
            temperature: 0.0,
            top_k: None,
            top_p: None,
            min_p: None,
            repetition_penalty: None,
            presence_penalty: 0.0,
            frequency_penalty: 0.0,
            seed: None,
            max_tokens: DEFAULT_MAX_TOKENS,
            stop_token_ids: Vec::new(),
            stop_strings: Vec::new(),
            ignore_eos: false,
        }
    }
}

impl SamplingParams {
    /// Greedy decoding (the default).
    pub fn greedy() -> Self {
        Self::default()
    }

    /// Whether these parameters select greedy (argmax) decoding.
    pub fn is_greedy(&self) -> bool {
        self.temperature < GREEDY_TEMPERATURE_EPS
    }

    /// Whether any penalty changes the logits (repetition penalty other than 1, non-zero
    /// presence or frequency penalty): then even greedy decoding is more than an argmax of the
    /// raw logits.
    pub fn penalizes(&self) -> bool {
        self.repetition_penalty.is_some_and(|r| r != 1.0)
            || self.presence_penalty != 0.0
            || self.frequency_penalty != 0.0
    }

    /// Checks every field; NaN is rejected everywhere.
    pub fn validate(&self) -> Result<(), SamplingError> {
        let t = self.temperature;
        if !t.is_finite() || t < 0.0 {
            return Err(SamplingError::InvalidTemperature(t));
        }
        if self.top_k == Some(0) {
            return Err(SamplingError::InvalidTopK);
        }
        if let Some(p) = self.top_p {
            if !(p > 0.0 && p <= 1.0) {
                return Err(SamplingError::InvalidTopP(p));
            }
        }
        if let Some(p) = self.min_p {
            if !(0.0..=1.0).contains(&p) {
                return Err(SamplingError::InvalidMinP(p));
            }
        }
        if let Some(p) = self.repetition_penalty {
            if !(p.is_finite() && p > 0.0) {
                return Err(SamplingError::InvalidRepetitionPenalty(p));
            }
        }
        if !(-2.0..=2.0).contains(&self.presence_penalty) {
            return Err(SamplingError::InvalidPresencePenalty(self.presence_penalty));
        }
        if !(-2.0..=2.0).contains(&self.frequency_penalty) {
            return Err(SamplingError::InvalidFrequencyPenalty(
                self.frequency_penalty,
            ));
        }
        if self.max_tokens == 0 {
            return Err(SamplingError::InvalidMaxTokens);
        }
        if self.stop_strings.iter().any(|s| s.is_empty()) {
            return Err(SamplingError::EmptyStopString);
        }
        Ok(())
    }
}

/// Reads one logit as `f64`: `NaN → -inf`, `+inf → f32::MAX`.
#[inline]
fn sanitize(x: f32) -> f64 {
    if x.is_nan() {
        f64::NEG_INFINITY
    } else if x == f32::INFINITY {
        f32::MAX as f64
    } else {
        x as f64
    }
}

/// Descending by value, ties by ascending id (a total order: values are never NaN here).
#[inline]
fn desc(a: &(f64, u32), b: &(f64, u32)) -> Ordering {
    b.0.total_cmp(&a.0).then(a.1.cmp(&b.1))
}

/// A sampling candidate: scaled logit `y = (x − max) / T ≤ 0`, weight `w = exp(y)`, token id.
#[derive(Debug, Clone, Copy)]
struct Cand {
    y: f32,
    w: f32,
    id: u32,
}

/// Number of histogram bins top-p uses over `y ∈ [−TOP_P_RANGE, 0]` (plus one overflow bin).
const TOP_P_BINS: usize = 1024;
const TOP_P_RANGE: f32 = 32.0;

/// The sampling distribution of a [`SamplingParams`]: **the one definition** of which tokens a
/// row keeps and with which weight, shared by every consumer — [`Sampler`] draws from it,
/// DFlash's exact rejection sampling takes its dense form ([`SamplingDist::probs`]) as the `p`
/// and `q` rows, and the GPU sampling kernel's test oracle (tilert `tests/ops.rs`) compares the
/// device draws with it.
///
/// The processors, in vLLM's order: [`read_penalized`] (NaN → −∞, +∞ → `f32::MAX`; repetition
/// → frequency → presence penalties) → temperature on `y = (x − max) / T` → top-k (every token
/// whose penalized logit is ≥ the k-th largest, ties kept as in HF) → top-p (the smallest set of
/// most likely tokens — descending `y`, ties by lower id — whose mass reaches `p · total ·
/// (1 − 1e-6)`; the token that crosses it is kept) → min-p (`w ≥ min_p`, the top token having
/// `w = 1`). Weights are `w = exp_f32(y)`, a vectorised `f32` exp within 2 ulp of `exp` (the
/// GPU kernel's `exp_f32` is bit-identical), sums in `f64`. Greedy parameters keep only the
/// argmax (lowest id among ties) of the penalized row.
///
/// Cost is linear in the vocabulary (no full sort, also for top-p: a histogram of `y` finds the
/// bin where the mass crosses `p` and only that bin is sorted). Buffers are reused between
/// calls, so steady-state use does not allocate.
#[derive(Debug, Clone)]
pub struct SamplingDist {
    params: SamplingParams,
    work: Vec<f32>,
    weights: Vec<f32>,
    cand: Vec<Cand>,
    counts: TokenCounts,
    bins: Vec<u16>,
    bin_mass: Vec<f64>,
}

/// The tokens one row keeps under a [`SamplingDist`] and their unnormalised weights
/// ([`SamplingDist::kept`]). Iteration order ([`Kept::iter`]) is the order in which
/// [`Sampler`] walks the cumulative mass.
#[derive(Debug, Clone, Copy)]
pub struct Kept<'a>(KeptRows<'a>);

#[derive(Debug, Clone, Copy)]
enum KeptRows<'a> {
    /// Greedy: the argmax alone.
    Greedy(u32),
    /// Top-k: the few survivors as a list (id order, then top-p's crossing-bin survivors).
    List(&'a [Cand]),
    /// The full vocabulary: dense weights by id (0 = cut), then top-p's crossing-bin survivors
    /// (whose dense weights are 0).
    Dense {
        weights: &'a [f32],
        tail: &'a [Cand],
    },
}

impl SamplingDist {
    /// Validates `params`.
    pub fn new(params: &SamplingParams) -> Result<SamplingDist, SamplingError> {
        params.validate()?;
        Ok(SamplingDist {
            params: params.clone(),
            work: Vec::new(),
            weights: Vec::new(),
            cand: Vec::new(),
            counts: TokenCounts::default(),
            bins: Vec::new(),
            bin_mass: Vec::new(),
        })
    }

    /// The parameters of this distribution.
    pub fn params(&self) -> &SamplingParams {
        &self.params
    }

    /// The kept set of the next token given `logits` (one row), the `prompt` and the tokens
    /// `generated` so far in this request (the history the penalties look at: the repetition
    /// penalty both, the presence and frequency penalties `generated` only; ids outside the
    /// row are ignored). Errors: [`SamplingError::EmptyLogits`], and
    /// [`SamplingError::NoFiniteLogits`] when no logit is finite.
    pub fn kept(
        &mut self,
        logits: &[f32],
        prompt: &[u32],
        generated: &[u32],
    ) -> Result<Kept<'_>, SamplingError> {
        if logits.is_empty() {
            return Err(SamplingError::EmptyLogits);
        }
        let n = logits.len();
        // 1. The logits read (NaN → -inf, +inf → f32::MAX) and the penalties.
        let max = read_penalized(
            logits,
            prompt,
            generated,
            &self.params,
            &mut self.counts,
            &mut self.work,
        )?;

        // Greedy: argmax, ties → lowest id.
        if self.params.is_greedy() {
            let id = self.work.iter().position(|&v| v == max).unwrap_or(0);
            return Ok(Kept(KeptRows::Greedy(id as u32)));
        }

        // 2. Temperature (applied to x − max, so nothing overflows), weights w = exp(y).
        let inv_t = 1.0 / self.params.temperature;
        let min_p = self.params.min_p.filter(|&m| m > 0.0);
        let top_p = self.params.top_p.filter(|&p| p < 1.0);
        match self.params.top_k {
            // 3. Top-k: keep every token whose logit is >= the k-th largest (HF keeps ties).
            // The survivors are few: materialise them and filter the list.
            Some(k) if k < n => {
                let thr = kth_largest(&self.work, k, &mut self.weights);
                self.cand.clear();
                for (i, &x) in self.work.iter().enumerate() {
                    if x >= thr {
                        let y = (x - max) * inv_t;
                        let w = exp_f32(y);
                        if w > 0.0 {
                            self.cand.push(Cand { y, w, id: i as u32 });
                        }
                    }
                }
                // 4. Top-p.
                if let Some(p) = top_p {
                    top_p_filter(&mut self.cand, p as f64, &mut self.bin_mass);
                }
                // 5. Min-p: p_i >= min_p · p_max  ⇔  w_i >= min_p · w_max (w_max = 1: the
                // argmax survives every filter and has y = 0).
                if let Some(mp) = min_p {
                    self.cand.retain(|c| c.w >= mp);
                }
                Ok(Kept(KeptRows::List(&self.cand)))
            }
            // Full vocabulary: work on dense arrays, no per-token list.
            _ => {
                self.weights.clear();
                self.weights
                    .extend(self.work.iter().map(|&x| exp_f32((x - max) * inv_t)));
                // 4. Top-p: dense histogram; `crossing` bins and above are cut, except the
                // sorted survivors of the crossing bin in `cand`.
                let mut crossing = u16::MAX;
                self.cand.clear();
                if let Some(p) = top_p {
                    crossing = top_p_dense(
                        &self.work,
                        &self.weights,
                        max,
                        inv_t,
                        p as f64,
                        &mut self.bins,
                        &mut self.bin_mass,
                        &mut self.cand,
                    );
                }
                // 5. Min-p (w_max = 1, see above). Excluded tokens get weight 0, which the draw
                // can never land on.
                let wmin = min_p.unwrap_or(0.0);
                if top_p.is_some() {
                    for (w, &b) in self.weights.iter_mut().zip(&self.bins) {
                        *w = if b < crossing && *w >= wmin { *w } else { 0.0 };
                    }
                } else if wmin > 0.0 {
                    for w in self.weights.iter_mut() {
                        *w = if *w >= wmin { *w } else { 0.0 };
                    }
                }
                self.cand.retain(|c| c.w >= wmin);
                Ok(Kept(KeptRows::Dense {
                    weights: &self.weights,
                    tail: &self.cand,
                }))
            }
        }
    }

    /// Writes the distribution of the next token (see [`SamplingDist::kept`]) into `out`
    /// (`V` values summing to 1: each kept weight divided by [`Kept::total`], 0 elsewhere;
    /// greedy parameters give the one-hot vector of the argmax).
    pub fn probs(
        &mut self,
        logits: &[f32],
        prompt: &[u32],
        generated: &[u32],
        out: &mut [f32],
    ) -> Result<(), SamplingError> {
        assert_eq!(
            out.len(),
            logits.len(),
            "probs: output length differs from the logits"
        );
        let kept = self.kept(logits, prompt, generated)?;
        out.fill(0.0);
        let total = kept.total();
        kept.for_each(|id, w| out[id as usize] = (w as f64 / total) as f32);
        Ok(())
    }
}

impl Kept<'_> {
    /// The token greedy parameters keep (the penalized argmax); `None` when sampling.
    pub fn greedy(&self) -> Option<u32> {
        match self.0 {
            KeptRows::Greedy(id) => Some(id),
            _ => None,
        }
    }

    /// Calls `f(id, w)` for every kept token with its unnormalised weight `w > 0` (greedy: the
    /// argmax with `w = 1`), in the order [`Sampler`] walks the mass.
    pub fn for_each(&self, mut f: impl FnMut(u32, f32)) {
        match self.0 {
            KeptRows::Greedy(id) => f(id, 1.0),
            KeptRows::List(cand) => cand.iter().for_each(|c| f(c.id, c.w)),
            KeptRows::Dense { weights, tail } => {
                for (i, &w) in weights.iter().enumerate() {
                    if w > 0.0 {
                        f(i as u32, w);
                    }
                }
                tail.iter().for_each(|c| f(c.id, c.w));
            }
        }
    }

    /// The kept mass `Σ w` in `f64` (summed as the draw sums it).
    pub fn total(&self) -> f64 {
        match self.0 {
            KeptRows::Greedy(_) => 1.0,
            KeptRows::List(cand) => cand.iter().map(|c| c.w as f64).sum(),
            KeptRows::Dense { weights, tail } => {
                sum_f64(weights) + tail.iter().map(|c| c.w as f64).sum::<f64>()
            }
        }
    }

    /// The token at uniform `u ∈ [0, 1)` of the inverse CDF of the kept weights in
    /// [`Kept::for_each`] order. Rounding that leaves `u · total` at the very top of the mass
    /// gives the last kept token.
    fn draw(&self, u: f64) -> Result<u32, SamplingError> {
        match self.0 {
            KeptRows::Greedy(id) => Ok(id),
            KeptRows::List(cand) => {
                let total = self.total();
                let u = u * total;
                let mut acc = 0.0f64;
                for c in cand {
                    acc += c.w as f64;
                    if u < acc {
                        return Ok(c.id);
                    }
                }
                Ok(cand.last().map_or(0, |c| c.id))
            }
            KeptRows::Dense { weights, tail } => {
                // Dense part in id order, then the crossing-bin survivors.
                let dense_total = sum_f64(weights);
                let total = dense_total + tail.iter().map(|c| c.w as f64).sum::<f64>();
                let u = u * total;
                if u < dense_total {
                    // (`None` only when rounding puts `u` past the running sum: the last
                    // positive weight then.)
                    let i = find_cumulative(weights, u)
                        .or_else(|| weights.iter().rposition(|&w| w > 0.0));
                    if let Some(i) = i {
                        return Ok(i as u32);
                    }
                }
                let mut acc = dense_total;
                let mut last = None;
                for c in tail {
                    acc += c.w as f64;
                    last = Some(c.id);
                    if u < acc {
                        return Ok(c.id);
                    }
                }
                if last.is_none() {
                    last = weights.iter().rposition(|&w| w > 0.0).map(|i| i as u32);
                }
                last.ok_or(SamplingError::NoFiniteLogits)
            }
        }
    }
}

/// Turns logits into token ids according to a [`SamplingParams`]: draws from the
/// [`SamplingDist`] of the row.
///
/// One sampler per sequence: it owns the sequence's RNG stream (one `f64` uniform per sampled
/// token, none for greedy decoding). Buffers are reused between calls, so steady-state
/// sampling does not allocate; cost is linear in the vocabulary (see [`SamplingDist`]).
#[derive(Debug, Clone)]
pub struct Sampler {
    dist: SamplingDist,
    rng: ChaCha20Rng,
}

impl Sampler {
    /// Validates `params` and builds a sampler whose ChaCha20 RNG is seeded from `params.seed`
    /// (from the OS when `None`).
    pub fn new(params: &SamplingParams) -> Result<Self, SamplingError> {
        let dist = SamplingDist::new(params)?;
        let rng = match params.seed {
            Some(s) => ChaCha20Rng::seed_from_u64(s),
            None => ChaCha20Rng::from_os_rng(),
        };
        Ok(Sampler { dist, rng })
    }

    /// The parameters this sampler was built with.
    pub fn params(&self) -> &SamplingParams {
        self.dist.params()
    }

    /// Samples one token id. `prompt` and `generated` (the tokens generated so far in this
    /// request) are the history the penalties look at: the repetition penalty both (as HF /
    /// vLLM), the presence and frequency penalties `generated` only ([`read_penalized`]); ids
    /// outside the vocabulary are ignored.
    ///
    /// **Fallback:** when `logits` is empty or holds no finite value (all `-inf` / `NaN`) this
    /// returns token `0`; use [`Sampler::try_sample`] to get an error instead.
    pub fn sample(&mut self, logits: &[f32], prompt: &[u32], generated: &[u32]) -> u32 {
        self.try_sample(logits, prompt, generated).unwrap_or(0)
    }

    /// Like [`Sampler::sample`] but reports [`SamplingError::EmptyLogits`] /
    /// [`SamplingError::NoFiniteLogits`] instead of falling back.
    pub fn try_sample(
        &mut self,
        logits: &[f32],
        prompt: &[u32],
        generated: &[u32],
    ) -> Result<u32, SamplingError> {
        let kept = self.dist.kept(logits, prompt, generated)?;
        if let Some(id) = kept.greedy() {
            return Ok(id);
        }
        // 6. Draw.
        kept.draw(self.rng.random::<f64>())
    }

    /// The token [`Sampler::try_sample`] picks when its draw is the uniform `u ∈ [0, 1)`,
    /// without touching this sampler's RNG (the oracle of a device sampler given the same
    /// uniform; greedy parameters ignore `u`).
    pub fn try_sample_at(
        &mut self,
        logits: &[f32],
        prompt: &[u32],
        generated: &[u32],
        u: f64,
    ) -> Result<u32, SamplingError> {
        let kept = self.dist.kept(logits, prompt, generated)?;
        match kept.greedy() {
            Some(id) => Ok(id),
            None => kept.draw(u),
        }
    }

    /// Where this sampler's uniform stream stands: the next sampled (non-greedy) token draws
    /// [`UniformStream::uniform`] of it. A device sampler handed this position draws the same
    /// number; [`Sampler::skip_uniform`] then moves this sampler past it.
    pub fn stream(&self) -> UniformStream {
        UniformStream::of(&self.rng)
    }

    /// Consumes the uniform that [`Sampler::stream`] points at (what one sampled token drawn
    /// elsewhere, e.g. on the device, took from this stream).
    pub fn skip_uniform(&mut self) {
        UniformStream::skip(&mut self.rng, 1);
    }
}

/// A position in a [`Sampler`]'s uniform stream: the ChaCha20 key its seed expands to and the
/// offset in 32-bit words of the next draw. ChaCha20 is counter-based, so the uniform at any
/// position is a pure function of these two ([`UniformStream::uniform`]) — the definition a
/// device sampler implements (tilert's `sample_rows` kernel) to draw exactly the numbers the
/// CPU sampler draws.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UniformStream {
    /// The ChaCha20 key (the 32-byte seed of `ChaCha20Rng`, as little-endian words).
    pub key: [u32; 8],
    /// Offset in 32-bit words of the next draw (block `word_pos / 16`, word `word_pos % 16`).
    pub word_pos: u64,
}

impl UniformStream {
    /// Words one `f64` draw consumes (one `u64`, low word first).
    pub const WORDS_PER_DRAW: u64 = 2;

    /// Where `rng` stands: its next `rng.random::<f64>()` is this position's
    /// [`UniformStream::uniform`].
    pub fn of(rng: &ChaCha20Rng) -> UniformStream {
        let seed = rng.get_seed();
        let mut key = [0u32; 8];
        for (k, b) in key.iter_mut().zip(seed.chunks_exact(4)) {
            *k = u32::from_le_bytes([b[0], b[1], b[2], b[3]]);
        }
        UniformStream {
            key,
            // The stream is 2^68 words long; a sampler never gets past 2^64.
            word_pos: rng.get_word_pos() as u64,
        }
    }

    /// Moves `rng` past `draws` draws from where it stands.
    pub fn skip(rng: &mut ChaCha20Rng, draws: usize) {
        let pos = rng.get_word_pos();
        rng.set_word_pos(pos + draws as u128 * Self::WORDS_PER_DRAW as u128);
    }

    /// The uniform `f64 ∈ [0, 1)` drawn at this position: the `u64` of words `word_pos` (low)
    /// and `word_pos + 1` (high) of the keystream, its top 53 bits times `2^-53` (rand's
    /// `StandardUniform` for `f64`).
    pub fn uniform(&self) -> f64 {
        let word = |p: u64| chacha20_block(&self.key, p / 16)[(p % 16) as usize];
        let bits = u64::from(word(self.word_pos)) | (u64::from(word(self.word_pos + 1)) << 32);
        (bits >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }

    /// The position after this draw.
    pub fn next(&self) -> UniformStream {
        UniformStream {
            word_pos: self.word_pos + Self::WORDS_PER_DRAW,
            ..*self
        }
    }
}

/// Block `counter` of the ChaCha20 keystream of `key` (stream / nonce 0, 64-bit block counter:
/// the state `rand_chacha`'s `ChaCha20Rng` runs), 16 words.
pub fn chacha20_block(key: &[u32; 8], counter: u64) -> [u32; 16] {
    let mut init = [0u32; 16];
    init[..4].copy_from_slice(&[0x6170_7865, 0x3320_646e, 0x7962_2d32, 0x6b20_6574]);
    init[4..12].copy_from_slice(key);
    init[12] = counter as u32;
    init[13] = (counter >> 32) as u32;
    let mut x = init;
    fn qr(x: &mut [u32; 16], a: usize, b: usize, c: usize, d: usize) {
        x[a] = x[a].wrapping_add(x[b]);
        x[d] = (x[d] ^ x[a]).rotate_left(16);
        x[c] = x[c].wrapping_add(x[d]);
        x[b] = (x[b] ^ x[c]).rotate_left(12);
        x[a] = x[a].wrapping_add(x[b]);
        x[d] = (x[d] ^ x[a]).rotate_left(8);
        x[c] = x[c].wrapping_add(x[d]);
        x[b] = (x[b] ^ x[c]).rotate_left(7);
    }
    for _ in 0..10 {
        qr(&mut x, 0, 4, 8, 12);
        qr(&mut x, 1, 5, 9, 13);
        qr(&mut x, 2, 6, 10, 14);
        qr(&mut x, 3, 7, 11, 15);
        qr(&mut x, 0, 5, 10, 15);
        qr(&mut x, 1, 6, 11, 12);
        qr(&mut x, 2, 7, 8, 13);
        qr(&mut x, 3, 4, 9, 14);
    }
    for (o, i) in x.iter_mut().zip(init) {
        *o = o.wrapping_add(i);
    }
    x
}

/// Lane / block width of [`sum_f64`] and [`find_cumulative`].
const BLOCK: usize = 8;

/// Sum of `ws` in `f64` with `BLOCK` independent lane accumulators (so that it vectorises).
fn sum_f64(ws: &[f32]) -> f64 {
    let mut acc = [0.0f64; BLOCK];
    let chunks = ws.chunks_exact(BLOCK);
    let rest = chunks.remainder();
    for ch in chunks {
        for j in 0..BLOCK {
            acc[j] += ch[j] as f64;
        }
    }
    let mut total: f64 = acc.iter().sum();
    for &w in rest {
        total += w as f64;
    }
    total
}

/// First index whose cumulative weight exceeds `u` (block sums first, then inside the block);
/// `None` when rounding puts `u` beyond the last positive weight.
fn find_cumulative(ws: &[f32], u: f64) -> Option<usize> {
    let mut acc = 0.0f64;
    let mut last_positive = None;
    for (bi, ch) in ws.chunks(BLOCK).enumerate() {
        let s: f64 = ch.iter().map(|&w| w as f64).sum();
        if acc + s > u {
            for (j, &w) in ch.iter().enumerate() {
                acc += w as f64;
                if w > 0.0 {
                    last_positive = Some(bi * BLOCK + j);
                    if u < acc {
                        return last_positive;
                    }
                }
            }
            // Rounding inside the block: the block's last positive weight.
            return last_positive;
        }
        if s > 0.0 {
            last_positive = ch.iter().rposition(|&w| w > 0.0).map(|j| bi * BLOCK + j);
        }
        acc += s;
    }
    None
}

/// Dense top-p over the whole vocabulary: fills `bins` (per token) and returns the crossing bin;
/// tokens in lower bins are kept, the kept part of the crossing bin is pushed to `tail`, sorted by
/// descending probability then id.
#[allow(clippy::too_many_arguments)]
fn top_p_dense(
    work: &[f32],
    weights: &[f32],
    max: f32,
    inv_t: f32,
    p: f64,
    bins: &mut Vec<u16>,
    bin_mass: &mut Vec<f64>,
    tail: &mut Vec<Cand>,
) -> u16 {
    let scale = TOP_P_BINS as f32 / TOP_P_RANGE;
    bins.clear();
    bins.extend(work.iter().map(|&x| {
        // Bin of y = (x − max)/T: round(−y·scale) clamped to TOP_P_BINS, computed with the
        // 2^23 trick (no float→int conversion, so the loop vectorises).
        let v = (-(x - max) * inv_t * scale).min(TOP_P_BINS as f32);
        ((v + 8_388_608.0).to_bits() & 0x7ff) as u16
    }));
    bin_mass.clear();
    bin_mass.resize(TOP_P_BINS + 1, 0.0);
    let mut total = 0.0f64;
    for (&b, &w) in bins.iter().zip(weights) {
        bin_mass[b as usize] += w as f64;
        total += w as f64;
    }
    let target = p * total * (1.0 - TOP_P_REL_TOL);
    let mut before = 0.0f64;
    let mut crossing = TOP_P_BINS;
    for (b, &m) in bin_mass.iter().enumerate() {
        if before + m >= target {
            crossing = b;
            break;
        }
        before += m;
    }
    let crossing = crossing as u16;
    tail.clear();
    for (i, (&b, &w)) in bins.iter().zip(weights).enumerate() {
        if b == crossing && w > 0.0 {
            tail.push(Cand {
                y: (work[i] - max) * inv_t,
                w,
                id: i as u32,
            });
        }
    }
    keep_crossing_prefix(tail, before, target);
    crossing
}

/// Sorts the crossing bin's candidates (descending probability, then id) and keeps those whose
/// cumulative mass before them (starting at `before`) is below `target` (at least one).
fn keep_crossing_prefix(tail: &mut Vec<Cand>, before: f64, target: f64) {
    tail.sort_unstable_by(|a, b| b.y.total_cmp(&a.y).then(a.id.cmp(&b.id)));
    let mut acc = before;
    let mut keep = 0;
    for c in tail.iter() {
        if acc >= target && keep > 0 {
            break;
        }
        acc += c.w as f64;
        keep += 1;
    }
    tail.truncate(keep);
}

/// `f32` ordered by `total_cmp`.
#[derive(Debug, Clone, Copy, PartialEq)]
struct TotalF32(f32);
impl Eq for TotalF32 {}
impl PartialOrd for TotalF32 {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for TotalF32 {
    fn cmp(&self, other: &Self) -> Ordering {
        self.0.total_cmp(&other.0)
    }
}

/// The k-th largest value of `xs` (1-based `k`, `1 <= k < xs.len()`); `scratch` is reused.
fn kth_largest(xs: &[f32], k: usize, scratch: &mut Vec<f32>) -> f32 {
    if k <= 1024 {
        // Min-heap of the k largest so far; most values are rejected by one comparison.
        let mut heap: BinaryHeap<Reverse<TotalF32>> = BinaryHeap::with_capacity(k + 1);
        for &x in xs {
            if heap.len() < k {
                heap.push(Reverse(TotalF32(x)));
            } else if heap.peek().is_some_and(|m| x > m.0 .0) {
                heap.pop();
                heap.push(Reverse(TotalF32(x)));
            }
        }
        heap.peek().map_or(f32::NEG_INFINITY, |m| m.0 .0)
    } else {
        scratch.clear();
        scratch.extend_from_slice(xs);
        let (_, v, _) = scratch.select_nth_unstable_by(k - 1, |a, b| b.total_cmp(a));
        *v
    }
}

/// Keeps the smallest set of most likely candidates whose mass reaches `p` of the total (the
/// token that crosses `p` is kept; ties in probability are broken by lower id). Linear time: a
/// histogram of `y` finds the bin where the cumulative mass crosses `p`, and only that bin is
/// sorted. Candidates keep their id order, the crossing bin's survivors come last.
fn top_p_filter(cand: &mut Vec<Cand>, p: f64, bin_mass: &mut Vec<f64>) {
    let scale = TOP_P_BINS as f32 / TOP_P_RANGE;
    let bin = |y: f32| -> usize { ((-y * scale) as usize).min(TOP_P_BINS) };
    bin_mass.clear();
    bin_mass.resize(TOP_P_BINS + 1, 0.0);
    let mut total = 0.0f64;
    for c in cand.iter() {
        bin_mass[bin(c.y)] += c.w as f64;
        total += c.w as f64;
    }
    let target = p * total * (1.0 - TOP_P_REL_TOL);
    let mut before = 0.0f64;
    let mut crossing = TOP_P_BINS;
    for (b, &m) in bin_mass.iter().enumerate() {
        if before + m >= target {
            crossing = b;
            break;
        }
        before += m;
    }
    let mut tail: Vec<Cand> = cand
        .iter()
        .copied()
        .filter(|c| bin(c.y) == crossing)
        .collect();
    keep_crossing_prefix(&mut tail, before, target);
    cand.retain(|c| bin(c.y) < crossing);
    cand.extend_from_slice(&tail);
}

/// `exp(x)` in `f32` for the sampler: Cephes' `expf` polynomial, branch-free so that loops over
/// it vectorise; relative error ≤ 2 ulp, `0` below `−87.3` (and for `−inf`).
#[inline]
fn exp_f32(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const C1: f32 = 0.693_359_4;
    const C2: f32 = -2.121_944_4e-4;
    let xc = x.clamp(-87.3, 88.3);
    // Round to nearest with the 1.5·2^23 trick (no libm call).
    let n = (xc * LOG2E + 12_582_912.0) - 12_582_912.0;
    let r = xc - n * C1 - n * C2;
    let z = r * r;
    let poly = ((((1.987_569_1e-4 * r + 1.398_199_9e-3) * r + 8.333_452e-3) * r + 4.166_579_6e-2)
        * r
        + 1.666_666_5e-1)
        * r
        + 0.5;
    let e = poly * z + r + 1.0;
    // 2^n from the bits of n + 127 + 2^23 (an integer in 1..=254 in the low mantissa bits).
    let pow2 = f32::from_bits((n + 127.0 + 8_388_608.0).to_bits() << 23);
    let v = e * pow2;
    if x < -87.3 {
        0.0
    } else {
        v
    }
}

/// `log Σ exp(x)` accumulated in `f64` (`NaN → -inf`, `+inf → f32::MAX`). `-inf` when the row is
/// empty or holds no finite value.
pub fn logsumexp(logits: &[f32]) -> f64 {
    let max = logits
        .iter()
        .fold(f64::NEG_INFINITY, |m, &x| m.max(sanitize(x)));
    if max == f64::NEG_INFINITY {
        return f64::NEG_INFINITY;
    }
    let s: f64 = logits.iter().map(|&x| (sanitize(x) - max).exp()).sum();
    max + s.ln()
}

/// Log-probabilities of a logits row (`f64`). Entries that are `-inf` / `NaN` get `-inf`; a row
/// with no finite value gives all `-inf`.
pub fn log_softmax(logits: &[f32]) -> Vec<f64> {
    let lse = logsumexp(logits);
    if lse == f64::NEG_INFINITY {
        return vec![f64::NEG_INFINITY; logits.len()];
    }
    logits.iter().map(|&x| sanitize(x) - lse).collect()
}

/// Log-probability of `token` under `logits` (`f64`, no allocation). `-inf` when `token` is out of
/// range, its logit is `-inf` / `NaN`, or the row has no finite value.
pub fn logprob_of(logits: &[f32], token: u32) -> f64 {
    let Some(&x) = logits.get(token as usize) else {
        return f64::NEG_INFINITY;
    };
    let lse = logsumexp(logits);
    let x = sanitize(x);
    if lse == f64::NEG_INFINITY || x == f64::NEG_INFINITY {
        return f64::NEG_INFINITY;
    }
    x - lse
}

/// The `n` most likely tokens with their log-probabilities, most likely first (ties → lower id).
/// Tokens whose logit is `-inf` / `NaN` are never returned.
pub fn top_logprobs(logits: &[f32], n: usize) -> Vec<(u32, f64)> {
    let lse = logsumexp(logits);
    if n == 0 || lse == f64::NEG_INFINITY {
        return Vec::new();
    }
    let mut cand: Vec<(f64, u32)> = logits
        .iter()
        .enumerate()
        .map(|(i, &x)| (sanitize(x), i as u32))
        .filter(|c| c.0 > f64::NEG_INFINITY)
        .collect();
    if n < cand.len() {
        cand.select_nth_unstable_by(n - 1, desc);
        cand.truncate(n);
    }
    cand.sort_unstable_by(desc);
    cand.into_iter().map(|(v, i)| (i, v - lse)).collect()
}

// ------------------------------------------------------------------------------------------------
// Stop handling
// ------------------------------------------------------------------------------------------------

/// Why a sequence finished, in OpenAI / vLLM vocabulary.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FinishReason {
    /// EOS, a stop token or a stop string.
    Stop,
    /// `max_tokens` (or the context length) reached.
    Length,
    /// The client went away or the request was cancelled.
    Abort,
    /// The engine failed while generating.
    Error,
}

impl FinishReason {
    /// `"stop"`, `"length"`, `"abort"` or `"error"`.
    pub fn as_str(&self) -> &'static str {
        match self {
            FinishReason::Stop => "stop",
            FinishReason::Length => "length",
            FinishReason::Abort => "abort",
            FinishReason::Error => "error",
        }
    }
}

impl std::fmt::Display for FinishReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What exactly stopped a sequence (vLLM's `stop_reason`).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum StopCause {
    /// One of the model's EOS tokens.
    Eos(u32),
    /// One of the request's `stop_token_ids`.
    StopToken(u32),
    /// One of the request's stop strings.
    StopString(String),
    /// `max_tokens` reached.
    MaxTokens,
}

impl StopCause {
    /// The OpenAI-level finish reason for this cause.
    pub fn finish_reason(&self) -> FinishReason {
        match self {
            StopCause::MaxTokens => FinishReason::Length,
            _ => FinishReason::Stop,
        }
    }
}

/// Result of [`StopChecker::push`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StopStatus {
    /// Keep generating. `emit` is the text that is now safe to stream (possibly empty while text
    /// that could start a stop string is held back).
    Continue { emit: String },
    /// Stop. `trim` is the last text to stream: everything still held back up to, but excluding,
    /// the stop string (or the stop token's text). After it, the streamed text equals
    /// [`StopChecker::text`].
    Stop {
        reason: FinishReason,
        cause: StopCause,
        trim: String,
    },
}

/// Incremental stop detection for one sequence.
///
/// Feed every generated token with the text delta its detokenization produced (possibly empty)
/// through [`StopChecker::push`]. Checks, in order: EOS token (unless `ignore_eos`), stop token
/// ids, stop strings (the earliest match in the text wins; at equal positions, the first listed),
/// then `max_tokens`. The text of a stopping token and the stop string are never emitted. Text
/// that could be the start of a stop string is held back, so a streamed response never contains
/// text that later turns out to be part of a stop string.
#[derive(Debug, Clone)]
pub struct StopChecker {
    eos_ids: Vec<u32>,
    stop_ids: Vec<u32>,
    stop_strings: Vec<String>,
    /// All stop strings in one automaton (leftmost-first: the earliest match, at equal
    /// positions the first listed), so a search costs time linear in the text, not in the
    /// number of stop strings.
    matcher: Option<aho_corasick::AhoCorasick>,
    max_stop_len: usize,
    max_tokens: Option<usize>,
    pending: String,
    emitted: String,
    n_tokens: usize,
    finished: bool,
    cause: Option<StopCause>,
}

impl StopChecker {
    /// A checker for the given stop token ids and stop strings (no EOS, no length limit).
    /// Empty stop strings are ignored.
    pub fn new(stop_token_ids: Vec<u32>, stop_strings: Vec<String>) -> Self {
        let stop_strings: Vec<String> =
            stop_strings.into_iter().filter(|s| !s.is_empty()).collect();
        let max_stop_len = stop_strings.iter().map(|s| s.len()).max().unwrap_or(0);
        let matcher = if stop_strings.is_empty() {
            None
        } else {
            aho_corasick::AhoCorasick::builder()
                .match_kind(aho_corasick::MatchKind::LeftmostFirst)
                .build(&stop_strings)
                .ok()
        };
        StopChecker {
            eos_ids: Vec::new(),
            stop_ids: stop_token_ids,
            stop_strings,
            matcher,
            max_stop_len,
            max_tokens: None,
            pending: String::new(),
            emitted: String::new(),
            n_tokens: 0,
            finished: false,
            cause: None,
        }
    }

    /// A checker for a request: the model's `eos_token_ids` (ignored when `params.ignore_eos`),
    /// `params.stop_token_ids`, `params.stop_strings` and `params.max_tokens`.
    pub fn from_params(params: &SamplingParams, eos_token_ids: &[u32]) -> Self {
        let mut c = StopChecker::new(params.stop_token_ids.clone(), params.stop_strings.clone());
        if !params.ignore_eos {
            c.eos_ids = eos_token_ids.to_vec();
        }
        c.max_tokens = Some(params.max_tokens);
        c
    }

    /// Sets the EOS token ids (reported as [`StopCause::Eos`]).
    pub fn with_eos(mut self, eos_token_ids: &[u32]) -> Self {
        self.eos_ids = eos_token_ids.to_vec();
        self
    }

    /// Sets a token limit (reported as [`StopCause::MaxTokens`] / [`FinishReason::Length`]).
    pub fn with_max_tokens(mut self, max_tokens: usize) -> Self {
        self.max_tokens = Some(max_tokens);
        self
    }

    /// Feeds one generated token and the text delta it decoded to.
    ///
    /// After a `Stop` was returned, further calls return the same `Stop` again with an empty
    /// `trim` and do not count tokens. Calling it after [`StopChecker::finish`] keeps working
    /// (the checker does not refuse text it was not told to stop on).
    pub fn push(&mut self, token: u32, text_delta: &str) -> StopStatus {
        if let Some(cause) = &self.cause {
            return StopStatus::Stop {
                reason: cause.finish_reason(),
                cause: cause.clone(),
                trim: String::new(),
            };
        }
        self.n_tokens += 1;
        if self.eos_ids.contains(&token) {
            return self.stop_releasing_all(StopCause::Eos(token));
        }
        if self.stop_ids.contains(&token) {
            return self.stop_releasing_all(StopCause::StopToken(token));
        }
        self.pending.push_str(text_delta);

        if let Some((pos, idx)) = self.find_stop_string() {
            let trim = self.pending[..pos].to_string();
            self.emitted.push_str(&trim);
            self.pending.clear();
            let cause = StopCause::StopString(self.stop_strings[idx].clone());
            self.cause = Some(cause.clone());
            self.finished = true;
            return StopStatus::Stop {
                reason: FinishReason::Stop,
                cause,
                trim,
            };
        }
        if self.max_tokens.is_some_and(|m| self.n_tokens >= m) {
            return self.stop_releasing_all(StopCause::MaxTokens);
        }

        let hold = self.held_back_len();
        let cut = self.pending.len() - hold;
        let emit: String = self.pending.drain(..cut).collect();
        self.emitted.push_str(&emit);
        StopStatus::Continue { emit }
    }

    /// Ends the sequence for a reason the checker does not see (abort, context length, …) and
    /// returns the held-back text, which is now known not to be a stop string.
    pub fn finish(&mut self) -> String {
        self.finished = true;
        let rest = std::mem::take(&mut self.pending);
        self.emitted.push_str(&rest);
        rest
    }

    /// All text emitted so far (the concatenation of every `emit` / `trim` / [`finish`] result).
    ///
    /// [`finish`]: StopChecker::finish
    pub fn text(&self) -> &str {
        &self.emitted
    }

    /// Text currently held back because it could be the start of a stop string.
    pub fn held_back(&self) -> &str {
        &self.pending
    }

    /// Number of tokens pushed so far (including a stopping token).
    pub fn num_tokens(&self) -> usize {
        self.n_tokens
    }

    /// Whether a `Stop` was returned or [`StopChecker::finish`] was called.
    pub fn is_finished(&self) -> bool {
        self.finished
    }

    /// The cause of the `Stop` that was returned, if any.
    pub fn stop_cause(&self) -> Option<&StopCause> {
        self.cause.as_ref()
    }

    fn stop_releasing_all(&mut self, cause: StopCause) -> StopStatus {
        let trim = std::mem::take(&mut self.pending);
        self.emitted.push_str(&trim);
        self.finished = true;
        self.cause = Some(cause.clone());
        StopStatus::Stop {
            reason: cause.finish_reason(),
            cause,
            trim,
        }
    }

    /// Earliest (position, stop-string index) in the pending text.
    fn find_stop_string(&self) -> Option<(usize, usize)> {
        match &self.matcher {
            Some(m) => m
                .find(self.pending.as_str())
                .map(|hit| (hit.start(), hit.pattern().as_usize())),
            // The automaton could not be built (beyond its size limits): search one by one.
            None => {
                let mut best: Option<(usize, usize)> = None;
                for (i, s) in self.stop_strings.iter().enumerate() {
                    if let Some(pos) = self.pending.find(s.as_str()) {
                        if best.is_none_or(|(bp, _)| pos < bp) {
                            best = Some((pos, i));
                        }
                    }
                }
                best
            }
        }
    }

    /// Length of the longest suffix of the pending text that is a proper prefix of a stop string.
    fn held_back_len(&self) -> usize {
        if self.max_stop_len == 0 || self.pending.is_empty() {
            return 0;
        }
        let len = self.pending.len();
        let lo = len.saturating_sub(self.max_stop_len - 1);
        for (b, _) in self.pending.char_indices() {
            if b < lo {
                continue;
            }
            let suffix = &self.pending[b..];
            if self
                .stop_strings
                .iter()
                .any(|s| s.len() > suffix.len() && s.starts_with(suffix))
            {
                return len - b;
            }
        }
        0
    }
}

#[cfg(test)]
mod tests {

    #[test]
    fn uniform_stream_is_the_samplers_rng() {
        for seed in [0u64, 1, 42, u64::MAX, 0x1234_5678_9abc_def0] {
            let p = SamplingParams {
                temperature: 1.0,
                seed: Some(seed),
                ..Default::default()
            };
            let mut s = Sampler::new(&p).unwrap();
            let mut rng = ChaCha20Rng::seed_from_u64(seed);
            // 37 draws cross several 16-word blocks and the 64-word buffer of the RNG.
            for d in 0..37u64 {
                let at = s.stream();
                assert_eq!(at.word_pos, 2 * d, "seed {seed} draw {d}");
                let want = rng.random::<f64>();
                assert_eq!(
                    at.uniform().to_bits(),
                    want.to_bits(),
                    "seed {seed} draw {d}"
                );
                assert_eq!(at.next().word_pos, at.word_pos + 2);
                s.skip_uniform();
            }
        }
        // An odd word position (a u64 spanning two blocks) reads as ChaCha20Rng does.
        let mut rng = ChaCha20Rng::seed_from_u64(7);
        rng.set_word_pos(15);
        let key = {
            let seed = rng.get_seed();
            std::array::from_fn(|i| u32::from_le_bytes(seed[4 * i..4 * i + 4].try_into().unwrap()))
        };
        let at = UniformStream { key, word_pos: 15 };
        assert_eq!(at.uniform().to_bits(), rng.random::<f64>().to_bits());
    }

    #[test]
    fn sample_at_is_the_draw_of_that_uniform() {
        let logits: Vec<f32> = (0..300).map(|i| ((i * 37 % 101) as f32) / 13.0).collect();
        for (k, tp, mp) in [
            (None, None, None),
            (Some(20), Some(0.9), None),
            (None, Some(0.7), Some(0.05)),
        ] {
            let p = SamplingParams {
                temperature: 0.8,
                top_k: k,
                top_p: tp,
                min_p: mp,
                repetition_penalty: Some(1.3),
                frequency_penalty: 0.4,
                seed: Some(9),
                ..Default::default()
            };
            let mut s = Sampler::new(&p).unwrap();
            let mut oracle = Sampler::new(&p).unwrap();
            let (prompt, generated) = ([3u32, 5, 5, 290], [7u32, 7, 100]);
            for _ in 0..50 {
                let u = s.stream().uniform();
                let want = oracle
                    .try_sample_at(&logits, &prompt, &generated, u)
                    .unwrap();
                assert_eq!(s.try_sample(&logits, &prompt, &generated).unwrap(), want);
            }
        }
    }
    use super::*;

    fn pen(rep: Option<f32>, presence: f32, frequency: f32) -> SamplingParams {
        SamplingParams {
            repetition_penalty: rep,
            presence_penalty: presence,
            frequency_penalty: frequency,
            ..SamplingParams::default()
        }
    }

    #[test]
    fn read_penalized_reads_and_penalizes_each_distinct_token_once() {
        let logits = [2.0, -2.0, f32::NAN, f32::INFINITY, 1.0];
        let (mut counts, mut work) = (TokenCounts::default(), Vec::new());
        let rep = pen(Some(2.0), 0.0, 0.0);
        // Token 0 three times, token 1 once, token 9 outside the row (ignored); the prompt and
        // the generated tokens alike.
        let max = read_penalized(&logits, &[0, 1], &[0, 9, 0], &rep, &mut counts, &mut work);
        assert_eq!(max, Ok(f32::MAX));
        assert_eq!(work, [1.0, -4.0, f32::NEG_INFINITY, f32::MAX, 1.0]);
        // The same counts reused for the next row start empty.
        read_penalized(&logits, &[], &[4], &rep, &mut counts, &mut work).unwrap();
        assert_eq!(work, [2.0, -2.0, f32::NEG_INFINITY, f32::MAX, 0.5]);
        // No penalty, or a penalty of 1: the row as read.
        for p in [None, Some(1.0)] {
            read_penalized(
                &logits,
                &[0],
                &[1],
                &pen(p, 0.0, 0.0),
                &mut counts,
                &mut work,
            )
            .unwrap();
            assert_eq!(work, [2.0, -2.0, f32::NEG_INFINITY, f32::MAX, 1.0]);
        }
        // Nothing finite to sample from.
        let none = [f32::NAN, f32::NEG_INFINITY];
        assert_eq!(
            read_penalized(&none, &[], &[], &rep, &mut counts, &mut work),
            Err(SamplingError::NoFiniteLogits)
        );
    }

    #[test]
    fn read_penalized_presence_and_frequency_over_generated_tokens() {
        let logits = [1.0, 0.5, -1.0, 3.0, f32::NEG_INFINITY];
        let (mut counts, mut work) = (TokenCounts::default(), Vec::new());
        // Prompt [3, 3] does not count; generated: token 0 three times, token 1 once, token 4
        // (−∞ stays −∞) once, 7 outside the row.
        let (prompt, generated) = ([3u32, 3], [0u32, 1, 0, 7, 4, 0]);
        let p = pen(None, 0.25, 0.5);
        let max = read_penalized(&logits, &prompt, &generated, &p, &mut counts, &mut work);
        assert_eq!(max, Ok(3.0));
        // x − 0.5 · count − 0.25.
        assert_eq!(work, [-0.75, -0.25, -1.0, 3.0, f32::NEG_INFINITY]);
        // After the repetition penalty (prompt and generated): 1/2 − 1.5 − 0.25, 0.5/2 − 0.5 −
        // 0.25; token 3 divided (prompt), not otherwise penalized.
        let p = pen(Some(2.0), 0.25, 0.5);
        read_penalized(&logits, &prompt, &generated, &p, &mut counts, &mut work).unwrap();
        assert_eq!(work, [-1.25, -0.5, -1.0, 1.5, f32::NEG_INFINITY]);
        // Negative penalties favour generated tokens: 0.5 + 1 · 1 + 0.5.
        let p = pen(None, -0.5, -1.0);
        read_penalized(&logits, &[], &[1], &p, &mut counts, &mut work).unwrap();
        assert_eq!(work, [1.0, 2.0, -1.0, 3.0, f32::NEG_INFINITY]);
        // Nothing generated: nothing changes, whatever the prompt.
        let p = pen(None, 2.0, 2.0);
        read_penalized(&logits, &[0, 1, 2], &[], &p, &mut counts, &mut work).unwrap();
        assert_eq!(work, [1.0, 0.5, -1.0, 3.0, f32::NEG_INFINITY]);
    }

    #[test]
    fn token_counts_add_take_and_reset() {
        let mut c = TokenCounts::default();
        c.begin(4);
        assert_eq!((c.add(2), c.add(2), c.add(0)), (1, 2, 1));
        assert_eq!((c.take(2), c.take(2), c.take(1)), (2, 0, 0));
        assert_eq!(c.add(2), 1);
        c.begin(4);
        assert_eq!((c.take(0), c.add(0)), (0, 1));
    }

    #[test]
    fn exp_f32_is_accurate() {
        let mut worst = 0.0f64;
        let mut x = -87.0f32;
        while x <= 10.0 {
            let got = exp_f32(x) as f64;
            let want = (x as f64).exp();
            worst = worst.max(((got - want) / want).abs());
            x += 0.001_37;
        }
        assert!(worst < 3.0e-7, "max relative error {worst:e}");
        assert_eq!(exp_f32(0.0), 1.0);
        assert_eq!(exp_f32(-88.0), 0.0);
        assert_eq!(exp_f32(f32::NEG_INFINITY), 0.0);
    }

    #[test]
    fn kth_largest_matches_sort() {
        let xs: Vec<f32> = (0..3000)
            .map(|i| ((i * 7919) % 1013) as f32 * 0.5)
            .collect();
        let mut sorted = xs.clone();
        sorted.sort_by(|a, b| b.total_cmp(a));
        let mut scratch = Vec::new();
        for k in [1, 2, 7, 100, 1024, 1025, 2999] {
            assert_eq!(kth_largest(&xs, k, &mut scratch), sorted[k - 1], "k = {k}");
        }
        // Ascending input (every value enters the heap) and -inf values.
        let asc: Vec<f32> = (0..5000).map(|i| i as f32).collect();
        assert_eq!(kth_largest(&asc, 10, &mut scratch), 4990.0);
        let few = [f32::NEG_INFINITY, 1.0, f32::NEG_INFINITY];
        assert_eq!(kth_largest(&few, 2, &mut scratch), f32::NEG_INFINITY);
    }
}
