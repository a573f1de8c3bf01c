//! Sampling on the device for every row of a pass: one `sample_rows` launch picks each row's
//! token with its own [`SamplingParams`] (greedy, temperature, top-k / top-p / min-p, the
//! repetition / presence / frequency penalties over the row's token history) and its own seeded
//! uniform stream ([`UniformStream`], the numbers the CPU [`model::sampling::Sampler`] draws),
//! and only the token ids come back to the host — 4 bytes a row instead of the `V` logits.
//!
//! [`DeviceSampler::accept`] runs dflash's exact rejection sampling of every verify block of a
//! pass in one `accept_rows` launch (the target's and the drafter's rows stay on the device) and
//! brings back two words a block: the accepted count and the bonus token.
//!
//! The rule is `model::sampling`'s, computed by the kernel (see [`crate::ops::Ops::sample_rows`]
//! for what it guarantees); a [`RowSample`] is the host's description of one row, turned into
//! the ABI's [`SampleRow`] by [`DeviceSampler::sample`].

use std::sync::Arc;

use cudarc::driver::CudaStream;
use model::sampling::{SamplingParams, UniformStream};

use crate::abi::{AcceptRow, SampleRow, ACCEPT_ROW_WORDS, SAMPLE_MAX_ROWS, SAMPLE_ROW_WORDS};
use crate::arena::{dtoh, htod, Arena, DPtr};
use crate::ops::{accept_scratch_len, sample_scratch_len, Ops};
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

    /// Tokens of [`RowSample::history`].
    fn history_tokens(&self) -> usize {
        let (p, g) = self.history();
        p.len() + g.len()
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

/// One verify block to accept on the device ([`DeviceSampler::accept`]).
#[derive(Debug, Clone, Copy)]
pub struct BlockAccept<'a> {
    /// The `n + 1` target rows of the block (`[n + 1, V]`: row `i` predicts the token after
    /// block token `i`).
    pub target_logits: DPtr<f32>,
    /// The drafter's `n` rows the drafts were drawn from (`[n, V]`; unused when greedy).
    pub draft_logits: DPtr<f32>,
    /// The `n` drafts.
    pub drafts: &'a [u32],
    /// The request's parameters, prompt, generated tokens and uniform stream (as
    /// [`RowSample`]).
    pub params: &'a SamplingParams,
    pub prompt: &'a [u32],
    pub generated: &'a [u32],
    pub stream: Option<UniformStream>,
}

/// What the device's acceptance of one block returns.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DeviceAcceptance {
    /// Drafts accepted (`0..=n`).
    pub accepted: usize,
    /// The token taken from target row `accepted`.
    pub bonus: u32,
    /// Uniforms the block consumed from its stream (advance the request's sampler by as many:
    /// one per examined draft, then one for the residual or the bonus; 0 when greedy).
    pub uniforms: usize,
}

/// Buffers of one launch kind: the row table, the per-row scratch and the output words.
struct Bufs {
    arena: Arena,
    table: DPtr<u32>,
    scratch: DPtr<u32>,
    out: DPtr<u32>,
    history: DPtr<u32>,
    cap: usize,
}

impl Bufs {
    fn new(stream: &Arc<CudaStream>) -> Self {
        Bufs {
            arena: Arena::new(stream.clone()),
            table: DPtr::null(),
            scratch: DPtr::null(),
            out: DPtr::null(),
            history: DPtr::null(),
            cap: 0,
        }
    }

    /// Room for `n` rows of `words` table words, `scratch` scratch words and `out` output words
    /// each, and `hist` history tokens (a new arena when growing, freeing the old one's memory).
    fn reserve(
        &mut self,
        stream: &Arc<CudaStream>,
        n: usize,
        (words, scratch, out): (usize, usize, usize),
        hist: usize,
    ) -> Result<(), RuntimeError> {
        if n <= self.cap && hist <= self.history.len() {
            return Ok(());
        }
        let cap = n.max(self.cap).next_power_of_two().min(SAMPLE_MAX_ROWS);
        let hist = hist.max(self.history.len()).next_power_of_two();
        // The stream may still use the old buffers: wait before dropping them.
        stream.synchronize()?;
        self.arena = Arena::new(stream.clone());
        self.table = self.arena.alloc(cap * words, "sampling row table")?;
        self.scratch = self.arena.alloc(cap * scratch, "sampling scratch")?;
        self.out = self.arena.alloc(cap * out, "sampled tokens")?;
        self.history = self.arena.alloc(hist, "sampling histories")?;
        self.cap = cap;
        Ok(())
    }
}

/// Samples rows on the device ([`DeviceSampler::sample`]); owns the row table, the histories,
/// the per-row scratch and the output ids (grown on demand, reused between calls).
pub struct DeviceSampler {
    stream: Arc<CudaStream>,
    v: usize,
    rows: Bufs,
    blocks: Bufs,
}

impl DeviceSampler {
    /// A sampler for rows of `v` logits on `stream` (no device memory until the first call).
    pub fn new(stream: Arc<CudaStream>, v: usize) -> Result<Self, RuntimeError> {
        if v == 0 {
            return Err(RuntimeError::Invalid("sampler: empty vocabulary".into()));
        }
        Ok(Self {
            rows: Bufs::new(&stream),
            blocks: Bufs::new(&stream),
            stream,
            v,
        })
    }

    /// Device bytes the sampler holds.
    pub fn device_bytes(&self) -> usize {
        self.rows.arena.reserved_bytes() + self.blocks.arena.reserved_bytes()
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
        let shape = (SAMPLE_ROW_WORDS, sample_scratch_len(self.v), 1);
        self.rows.reserve(&self.stream, n, shape, hist_len.max(1))?;
        let b = &self.rows;
        let mut host = Vec::with_capacity(n * SAMPLE_ROW_WORDS);
        let mut hist = Vec::with_capacity(hist_len.max(1));
        for (i, r) in rows.iter().enumerate() {
            let at = b.history.slice(hist.len()..b.history.len());
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
        htod(&self.stream, &host, b.table.slice(0..host.len()))?;
        htod(&self.stream, &hist, b.history.slice(0..hist.len()))?;
        ops.sample_rows(&self.stream, b.table, n, self.v, b.scratch, b.out)?;
        dtoh(&self.stream, b.out.slice(0..n))
    }

    /// dflash's acceptance of each verify block on the device, all blocks in one launch
    /// (1..=[`SAMPLE_MAX_ROWS`]); only the accepted counts and bonus tokens come back. Sampled
    /// blocks read their stream from [`BlockAccept::stream`] on; advance the request's sampler
    /// by [`DeviceAcceptance::uniforms`] afterwards. Errors name the block at fault.
    pub fn accept(
        &mut self,
        ops: &Ops,
        blocks: &[BlockAccept],
    ) -> Result<Vec<DeviceAcceptance>, RuntimeError> {
        let n = blocks.len();
        if n == 0 || n > SAMPLE_MAX_ROWS {
            return Err(RuntimeError::Invalid(format!(
                "accept: {n} blocks (1..={SAMPLE_MAX_ROWS} per launch)"
            )));
        }
        let v = self.v;
        let hist_len: usize = blocks
            .iter()
            .map(|b| b.row().history_tokens() + b.drafts.len())
            .sum();
        let shape = (ACCEPT_ROW_WORDS, accept_scratch_len(v), 2);
        self.blocks
            .reserve(&self.stream, n, shape, hist_len.max(1))?;
        let bufs = &self.blocks;
        let mut host = Vec::with_capacity(n * ACCEPT_ROW_WORDS);
        let mut hist = Vec::with_capacity(hist_len.max(1));
        for (i, b) in blocks.iter().enumerate() {
            let bad = |m: String| RuntimeError::Invalid(format!("accept: block {i}: {m}"));
            let d = b.drafts.len();
            if d + 1 > crate::ops::MAX_TOKENS {
                return Err(bad(format!(
                    "{d} drafts (a verify block is at most {} tokens)",
                    crate::ops::MAX_TOKENS
                )));
            }
            if let Some(t) = b.drafts.iter().find(|&&t| t as usize >= v) {
                return Err(bad(format!("draft {t} outside the vocabulary of {v}")));
            }
            if b.target_logits.len() < (d + 1) * v {
                return Err(bad(format!(
                    "{} target logits, {} rows of {v} needed",
                    b.target_logits.len(),
                    d + 1
                )));
            }
            if !b.params.is_greedy() && b.draft_logits.len() < d * v {
                return Err(bad(format!(
                    "{} draft logits, {d} rows of {v} needed",
                    b.draft_logits.len()
                )));
            }
            let row = b.row();
            let at = bufs.history.slice(hist.len()..bufs.history.len());
            let s = row.abi(v, at).map_err(|e| bad(e.to_string()))?;
            let (prompt, generated) = row.history();
            hist.extend_from_slice(prompt);
            hist.extend_from_slice(generated);
            let drafts_at = bufs.history.slice(hist.len()..bufs.history.len());
            hist.extend_from_slice(b.drafts);
            let a = AcceptRow {
                s,
                draft_logits: if b.params.is_greedy() {
                    0
                } else {
                    b.draft_logits.addr()
                },
                drafts: drafts_at.addr(),
                n: d as u32,
                _pad: 0,
            };
            host.extend_from_slice(&a.words());
        }
        if hist.is_empty() {
            hist.push(0);
        }
        htod(&self.stream, &host, bufs.table.slice(0..host.len()))?;
        htod(&self.stream, &hist, bufs.history.slice(0..hist.len()))?;
        ops.accept_rows(&self.stream, bufs.table, n, v, bufs.scratch, bufs.out)?;
        let out = dtoh(&self.stream, bufs.out.slice(0..2 * n))?;
        Ok(blocks
            .iter()
            .zip(out.chunks_exact(2))
            .map(|(b, w)| {
                let accepted = w[0] as usize;
                let d = b.drafts.len();
                let uniforms = if b.params.is_greedy() {
                    0
                } else if accepted < d {
                    accepted + 2
                } else {
                    d + 1
                };
                DeviceAcceptance {
                    accepted,
                    bonus: w[1],
                    uniforms,
                }
            })
            .collect())
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
    rows.iter().map(RowSample::history_tokens).sum()
}

impl<'a> BlockAccept<'a> {
    /// The block as a [`RowSample`] (its logits field: the target rows).
    fn row(&self) -> RowSample<'a> {
        RowSample {
            logits: self.target_logits,
            params: self.params,
            prompt: self.prompt,
            generated: self.generated,
            stream: self.stream,
        }
    }
}
