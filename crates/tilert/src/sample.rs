//! Sampling on the device for every row of a pass: one `sample_rows` launch picks each row's
//! token with its own [`SamplingParams`] (greedy, temperature, top-k / top-p / min-p, the
//! repetition / presence / frequency penalties over the row's token history) and its own seeded
//! uniform stream ([`UniformStream`], the numbers the CPU [`model::sampling::Sampler`] draws),
//! and only the token ids come back to the host — 4 bytes a row instead of the `V` logits.
//!
//! The rule is `model::sampling`'s, computed by the kernel (see [`crate::ops::Ops::sample_rows`]
//! for what it guarantees); a [`RowSample`] is the host's description of one row, turned into
//! the ABI's [`SampleRow`] by [`DeviceSampler::sample`].

use std::sync::Arc;

use cudarc::driver::CudaStream;
use model::sampling::{SamplingParams, UniformStream};

use crate::abi::{SampleRow, SAMPLE_MAX_ROWS, SAMPLE_ROW_WORDS};
use crate::arena::{dtoh, htod, Arena, DPtr};
use crate::ops::{sample_scratch_len, Ops};
use crate::RuntimeError;

/// One row to sample: its logits on the device and the request's state.
#[derive(Debug, Clone, Copy)]
pub struct RowSample<'a> {
    /// The row's `V` logits (e.g. a slice of a pass's logits buffer).
    pub logits: DPtr<f32>,
    /// The request's sampling parameters (validated here).
    pub params: &'a SamplingParams,
    /// The prompt (the repetition penalty's history) ...
    pub prompt: &'a [u32],
    /// ... and the tokens generated so far in the request (every penalty's history).
    pub generated: &'a [u32],
    /// Where the request's uniform stream stands ([`model::sampling::Sampler::stream`]); read
    /// only by sampled (non-greedy) rows, which must have one.
    pub stream: Option<UniformStream>,
}

impl RowSample<'_> {
    /// The tokens the kernel reads for this row: the history when a penalty is on, else none.
    fn history(&self) -> (&[u32], &[u32]) {
        if self.params.penalizes() {
            (self.prompt, self.generated)
        } else {
            (&[], &[])
        }
    }

    /// The ABI row, its history (see [`RowSample::history`]) at `history` on the device.
    fn abi(&self, v: usize, history: DPtr<u32>) -> Result<SampleRow, RuntimeError> {
        let p = self.params;
        p.validate()
            .map_err(|e| RuntimeError::Invalid(format!("sampling parameters: {e}")))?;
        if self.logits.len() < v {
            return Err(RuntimeError::Invalid(format!(
                "sampled row: {} logits, vocabulary {v}",
                self.logits.len()
            )));
        }
        let greedy = p.is_greedy();
        let stream = match (greedy, self.stream) {
            (true, s) => s.unwrap_or(UniformStream {
                key: [0; 8],
                word_pos: 0,
            }),
            (false, Some(s)) => s,
            (false, None) => {
                return Err(RuntimeError::Invalid(
                    "a sampled (temperature > 0) row needs its uniform stream".into(),
                ))
            }
        };
        let len32 = |what: &str, n: usize| {
            u32::try_from(n).map_err(|_| RuntimeError::Invalid(format!("{what}: {n} tokens")))
        };
        Ok(SampleRow {
            logits: self.logits.addr(),
            history: history.addr(),
            prompt_len: len32("prompt", self.history().0.len())?,
            generated_len: len32("generated", self.history().1.len())?,
            greedy: greedy.into(),
            // `top_k ≥ V` keeps everything, as no top-k.
            top_k: p.top_k.map_or(0, |k| k.min(v) as u32),
            temperature: p.temperature,
            top_p: p.top_p.unwrap_or(1.0),
            min_p: p.min_p.unwrap_or(0.0),
            repetition_penalty: p.repetition_penalty.unwrap_or(1.0),
            presence_penalty: p.presence_penalty,
            frequency_penalty: p.frequency_penalty,
            key: stream.key,
            word_pos: stream.word_pos,
        })
    }
}

/// Samples rows on the device ([`DeviceSampler::sample`]); owns the row table, the histories,
/// the per-row scratch and the output ids (grown on demand, reused between calls).
pub struct DeviceSampler {
    stream: Arc<CudaStream>,
    v: usize,
    arena: Arena,
    rows: DPtr<u32>,
    scratch: DPtr<u32>,
    out: DPtr<u32>,
    history: DPtr<u32>,
    /// Rows the buffers hold.
    cap: usize,
}

impl DeviceSampler {
    /// A sampler for rows of `v` logits on `stream` (no device memory until the first call).
    pub fn new(stream: Arc<CudaStream>, v: usize) -> Result<Self, RuntimeError> {
        if v == 0 {
            return Err(RuntimeError::Invalid("sampler: empty vocabulary".into()));
        }
        Ok(Self {
            arena: Arena::new(stream.clone()),
            stream,
            v,
            rows: DPtr::null(),
            scratch: DPtr::null(),
            out: DPtr::null(),
            history: DPtr::null(),
            cap: 0,
        })
    }

    /// Device bytes the sampler holds.
    pub fn device_bytes(&self) -> usize {
        self.arena.reserved_bytes()
    }

    /// The token of each row, drawn on the device in one launch (1..=[`SAMPLE_MAX_ROWS`]
    /// rows); only the ids come back. Sampled rows read the uniform at their
    /// [`RowSample::stream`]: the caller then advances its own stream by one draw
    /// ([`model::sampling::Sampler::skip_uniform`]); greedy rows read none. Errors name the
    /// row at fault.
    pub fn sample(&mut self, ops: &Ops, rows: &[RowSample]) -> Result<Vec<u32>, RuntimeError> {
        let n = rows.len();
        if n == 0 || n > SAMPLE_MAX_ROWS {
            return Err(RuntimeError::Invalid(format!(
                "sample: {n} rows (1..={SAMPLE_MAX_ROWS} per launch)"
            )));
        }
        let hist_len = history_len(rows);
        self.reserve(n, hist_len.max(1))?;
        let mut host = Vec::with_capacity(n * SAMPLE_ROW_WORDS);
        let mut hist = Vec::with_capacity(hist_len.max(1));
        for (i, r) in rows.iter().enumerate() {
            let at = self.history.slice(hist.len()..self.history.len());
            let row = r
                .abi(self.v, at)
                .map_err(|e| RuntimeError::Invalid(format!("sample: row {i}: {e}")))?;
            host.extend_from_slice(&row.words());
            let (prompt, generated) = r.history();
            hist.extend_from_slice(prompt);
            hist.extend_from_slice(generated);
        }
        if hist.is_empty() {
            hist.push(0);
        }
        htod(&self.stream, &host, self.rows.slice(0..host.len()))?;
        htod(&self.stream, &hist, self.history.slice(0..hist.len()))?;
        ops.sample_rows(&self.stream, self.rows, n, self.v, self.scratch, self.out)?;
        dtoh(&self.stream, self.out.slice(0..n))
    }

    /// Makes room for `n` rows and `hist` history tokens (a new arena when growing, which
    /// frees the old one's memory).
    fn reserve(&mut self, n: usize, hist: usize) -> Result<(), RuntimeError> {
        if n <= self.cap && hist <= self.history.len() {
            return Ok(());
        }
        let cap = n.max(self.cap).next_power_of_two().min(SAMPLE_MAX_ROWS);
        let hist = hist.max(self.history.len()).next_power_of_two();
        // Drop the old buffers before allocating (the stream may still use them: wait).
        self.stream.synchronize()?;
        self.arena = Arena::new(self.stream.clone());
        self.rows = self
            .arena
            .alloc(cap * SAMPLE_ROW_WORDS, "sampling row table")?;
        self.scratch = self
            .arena
            .alloc(cap * sample_scratch_len(self.v), "sampling scratch")?;
        self.out = self.arena.alloc(cap, "sampled tokens")?;
        self.history = self.arena.alloc(hist, "sampling histories")?;
        self.cap = cap;
        Ok(())
    }
}

/// Host → device bytes of one [`DeviceSampler::sample`] call over `rows` (row table plus
/// histories) and device → host bytes (the ids): what crosses the bus per step.
pub fn bytes_per_call(rows: &[RowSample]) -> (usize, usize) {
    let hist = history_len(rows);
    (
        rows.len() * std::mem::size_of::<SampleRow>() + 4 * hist.max(1),
        4 * rows.len(),
    )
}

/// History tokens a call uploads (only rows with a penalty send theirs).
fn history_len(rows: &[RowSample]) -> usize {
    rows.iter()
        .map(|r| {
            let (p, g) = r.history();
            p.len() + g.len()
        })
        .sum()
}
