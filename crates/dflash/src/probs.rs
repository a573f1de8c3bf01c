//! The sampling distribution as a dense probability vector.
//!
//! [`model::sampling::Sampler`] draws a token; exact rejection sampling needs the distribution it
//! draws from, for the target rows (`p`) and the draft rows (`q`). [`SamplingDist`] computes it
//! with the Sampler's processors in the Sampler's order and conventions — NaN logits → −∞,
//! +∞ → `f32::MAX`; repetition penalty (each distinct history token once) → frequency and
//! presence penalties (over the generated tokens only; both as
//! `model::sampling::read_penalized`) → temperature on `x − max` → top-k (ties with the k-th kept) → top-p (smallest most-likely prefix, ties by
//! lower id, relative tolerance 1e-6 on the mass) → min-p (relative to the top token) — with
//! `f64` weights `exp(y)` (the Sampler uses an `f32` exp within 2 ulp of it, so the two agree
//! to ~1e-7 relative; the supports agree except for tokens at a filter boundary within that
//! rounding). Greedy parameters give the one-hot vector of the Sampler's argmax (lowest id
//! among ties).

use model::sampling::{read_penalized, SamplingError, SamplingParams, TokenCounts};

/// Relative tolerance of top-p (as the Sampler's).
const TOP_P_REL_TOL: f64 = 1e-6;

/// Computes the sampling distribution of a [`SamplingParams`]; reuses its buffers.
#[derive(Debug, Clone)]
pub struct SamplingDist {
    params: SamplingParams,
    work: Vec<f32>,
    weights: Vec<f64>,
    counts: TokenCounts,
    order: Vec<u32>,
}

impl SamplingDist {
    /// Validates `params`.
    pub fn new(params: &SamplingParams) -> Result<SamplingDist, SamplingError> {
        params.validate()?;
        Ok(SamplingDist {
            params: params.clone(),
            work: Vec::new(),
            weights: Vec::new(),
            counts: TokenCounts::default(),
            order: Vec::new(),
        })
    }

    pub fn params(&self) -> &SamplingParams {
        &self.params
    }

    /// Writes the distribution of the next token given `logits` (one row, `V` values), the
    /// `prompt` and the tokens `generated` so far (the history the penalties look at, as
    /// `Sampler::sample`) into `out` (`V` values summing to 1).
    pub fn probs(
        &mut self,
        logits: &[f32],
        prompt: &[u32],
        generated: &[u32],
        out: &mut [f32],
    ) -> Result<(), SamplingError> {
        let n = logits.len();
        if n == 0 {
            return Err(SamplingError::EmptyLogits);
        }
        assert_eq!(out.len(), n, "probs: output length differs from the logits");
        let max = read_penalized(
            logits,
            prompt,
            generated,
            &self.params,
            &mut self.counts,
            &mut self.work,
        )?;
        out.fill(0.0);
        if self.params.is_greedy() {
            let id = self.work.iter().position(|&v| v == max).unwrap_or(0);
            out[id] = 1.0;
            return Ok(());
        }

        let inv_t = 1.0 / self.params.temperature;
        self.weights.clear();
        self.weights.extend(
            self.work
                .iter()
                .map(|&x| (((x - max) * inv_t) as f64).exp()),
        );
        // Top-k: keep every token whose (penalized) logit is ≥ the k-th largest.
        if let Some(k) = self.params.top_k.filter(|&k| k < n) {
            let mut sorted = self.work.clone();
            let (_, thr, _) = sorted.select_nth_unstable_by(k - 1, |a, b| b.total_cmp(a));
            let thr = *thr;
            for (w, &x) in self.weights.iter_mut().zip(&self.work) {
                if x < thr {
                    *w = 0.0;
                }
            }
        }
        // Top-p: the smallest prefix (by descending probability, then id) whose mass reaches p.
        if let Some(p) = self.params.top_p.filter(|&p| p < 1.0) {
            self.order.clear();
            self.order
                .extend((0..n as u32).filter(|&i| self.weights[i as usize] > 0.0));
            let w = &self.weights;
            self.order
                .sort_unstable_by(|&a, &b| w[b as usize].total_cmp(&w[a as usize]).then(a.cmp(&b)));
            let total: f64 = self.order.iter().map(|&i| w[i as usize]).sum();
            let target = p as f64 * total * (1.0 - TOP_P_REL_TOL);
            let mut acc = 0.0;
            let mut keep = 0;
            for &i in &self.order {
                if acc >= target && keep > 0 {
                    break;
                }
                acc += w[i as usize];
                keep += 1;
            }
            for &i in &self.order[keep..] {
                self.weights[i as usize] = 0.0;
            }
        }
        // Min-p: the top token has weight exactly 1.
        if let Some(mp) = self.params.min_p.filter(|&m| m > 0.0) {
            for w in self.weights.iter_mut() {
                if *w < mp as f64 {
                    *w = 0.0;
                }
            }
        }
        let total: f64 = self.weights.iter().sum();
        for (o, &w) in out.iter_mut().zip(&self.weights) {
            *o = (w / total) as f32;
        }
        Ok(())
    }
}
