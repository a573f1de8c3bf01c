//! Batched decode: the next token of up to [`MAX_TOKENS`] sequences ([`GpuSession`]s of one
//! model, each at its own length) in **one pass** — the GPU counterpart of
//! the CPU's `cpu::Model::decode_batch`.
//!
//! The pass is the model's batched step plan (`PassShape::batched(N)`) lowered by the same
//! [`super::lower`] as every session pass, with `T = N` rows (one per sequence): embedding,
//! norms, QKV / O projections, router, experts (each distinct expert read once for all rows),
//! LM head and argmax are the same launches, so every weight is read once per step instead of
//! once per sequence. Only RoPE + the KV write and attention differ: the plan's `Buf::Kv` is
//! bound to a row table ([`super::lower::RowPass`], kernels [`crate::ops::rows`]), so each row
//! uses its own sequence's cache, position and attention key splits, read from device memory
//! written before each replay. One
//! CUDA graph per `(N, per-layer split bound)` therefore serves every step, whatever sequences
//! are in it (in a server every sequence has one size: one graph per N).
//!
//! Numerics: RoPE, the KV write and attention compute a row exactly as the sequence's own
//! one-token decode does (the key splits are the session's own), and every other kernel computes
//! each row independently of the others. Whether a row's bits are also independent of the pass
//! size is up to those kernels: on every fixture checkpoint and toy model they are (the tests
//! require logits bit-identical to [`GpuSession::decode`]); at gpt-oss-20b size some kernel's
//! summation order depends on the pass size (not located yet: likely the experts', whose launch
//! shape changes with it; a verify pass already differs from decode the same way), giving
//! relative logit differences of ~1e-3 on the synthetic model (`gpu-decode`, BENCHMARKS.md), so
//! near-tie greedy tokens can differ from decoding alone.
//!
//! A [`GpuBatch`] owns the pass's activation buffers (a `MAX_TOKENS`-row set, as one session
//! holds) and its graphs; the sessions keep only their KV caches and lengths. All-or-nothing: on
//! any error every session is left as it was (length and truncation bound unchanged).

use std::collections::HashMap;

use cudarc::driver::CudaGraph;

use super::lower::{layer_attention_args, LayerKv, RowPass};
use super::{capture_graph, GpuModel, GpuSession, Logits, DEFAULT_MAX_ROLLBACK};
use crate::arena::{dtoh, htod, DPtr};
use crate::ops::rows::{decode_splits, max_splits, KvRow, RowOps, KV_ROW_WORDS};
use crate::ops::{AttnArgs, MAX_TOKENS};
use crate::sample::{DeviceSampler, RowSample};
use crate::RuntimeError;

/// Batched decode over sessions of one model (see the module docs). Create with
/// [`GpuModel::batch`]; reuse it for every step (its graphs are captured once per batch size).
pub struct GpuBatch {
    /// Lends its activation buffers to the pass (its own one-position KV cache is never used).
    lender: GpuSession,
    ops: RowOps,
    /// `[layer][MAX_TOKENS][KV_ROW_WORDS]`, written before each pass.
    table: DPtr<u64>,
    /// The attention scratch of `MAX_TOKENS` rows at the most splits.
    scratch: DPtr<f32>,
    host: Vec<u64>,
    /// Per layer, the attention geometry and window of the plan (the row table's checks and
    /// key splits; each row brings its own cache).
    attn: Vec<AttnArgs>,
    graphs: HashMap<(usize, Vec<usize>), CudaGraph>,
}

impl GpuModel {
    /// A [`GpuBatch`] for decoding this model's sessions together.
    pub fn batch(&self) -> Result<GpuBatch, RuntimeError> {
        GpuBatch::new(self)
    }
}

impl GpuBatch {
    /// Allocates the pass's buffers on `model`'s device.
    pub fn new(model: &GpuModel) -> Result<Self, RuntimeError> {
        let mut lender = GpuSession::new(model.clone(), 1, DEFAULT_MAX_ROLLBACK)?;
        let m = &*model.inner;
        let ops = RowOps::load(&m.ops)?;
        let nl = m.config.layers.len();
        let mut scratch = 0;
        let mut attn = Vec::with_capacity(nl);
        for l in 0..nl {
            let a = layer_attention_args(&m.layout, l, &LayerKv::NONE)?;
            scratch = scratch.max(RowOps::attention_scratch_len(&a, MAX_TOKENS, max_splits()));
            attn.push(a);
        }
        let table = lender
            .arena
            .alloc(nl.max(1) * MAX_TOKENS * KV_ROW_WORDS, "batch row table")?;
        let scratch = lender.arena.alloc(scratch, "batch attention scratch")?;
        m.stream.synchronize()?;
        Ok(Self {
            lender,
            ops,
            table,
            scratch,
            host: vec![0; nl.max(1) * MAX_TOKENS * KV_ROW_WORDS],
            attn,
            graphs: HashMap::new(),
        })
    }

    pub fn model(&self) -> &GpuModel {
        &self.lender.model
    }

    /// Device bytes of the batch's buffers.
    pub fn device_bytes(&self) -> usize {
        self.lender.device_bytes()
    }

    /// Run passes op by op instead of replaying captured graphs (for comparisons).
    pub fn set_use_graphs(&mut self, on: bool) {
        self.lender.set_use_graphs(on);
    }

    /// Appends `tokens[i]` to `sessions[i]` for every `i` in one pass and returns each one's
    /// logits (what `sessions[i].decode(tokens[i])` gives; see the module docs on numerics).
    /// 1..=[`MAX_TOKENS`] sessions of this batch's model; all-or-nothing.
    pub fn decode(
        &mut self,
        sessions: &mut [&mut GpuSession],
        tokens: &[u32],
    ) -> Result<Vec<Vec<f32>>, RuntimeError> {
        let n = self.pass(sessions, tokens)?;
        let v = self.lender.model.inner.config.vocab_size;
        let all = dtoh(
            &self.lender.model.inner.stream,
            self.lender.b.logits.slice(0..n * v),
        );
        self.finish(
            sessions,
            all.map(|a| a.chunks_exact(v).map(<[f32]>::to_vec).collect()),
        )
    }

    /// [`GpuBatch::decode`] returning the greedy next token of each session (argmax on the
    /// device; only the ids come back).
    pub fn decode_greedy(
        &mut self,
        sessions: &mut [&mut GpuSession],
        tokens: &[u32],
    ) -> Result<Vec<u32>, RuntimeError> {
        let n = self.pass(sessions, tokens)?;
        let ids = dtoh(
            &self.lender.model.inner.stream,
            self.lender.b.argmax.slice(0..n),
        );
        self.finish(sessions, ids)
    }

    /// [`GpuBatch::decode`] with each session's next token sampled on the device in one launch
    /// (`rows[i]` describes session `i`'s request: its parameters, history and uniform stream;
    /// its `logits` field is ignored: the pass's row `i` is used); only the ids come back.
    /// Sampled rows consumed one uniform of their stream (advance the request's
    /// `model::sampling::Sampler` with `skip_uniform`).
    pub fn decode_sampled(
        &mut self,
        sessions: &mut [&mut GpuSession],
        tokens: &[u32],
        sampler: &mut DeviceSampler,
        rows: &[RowSample],
    ) -> Result<Vec<u32>, RuntimeError> {
        if rows.len() != sessions.len() {
            return Err(RuntimeError::Invalid(format!(
                "decode_sampled: {} sessions but {} sampled rows",
                sessions.len(),
                rows.len()
            )));
        }
        let n = self.pass(sessions, tokens)?;
        let v = self.lender.model.inner.config.vocab_size;
        let logits = self.lender.b.logits;
        let rows: Vec<RowSample> = rows
            .iter()
            .enumerate()
            .map(|(i, r)| RowSample {
                logits: logits.slice(i * v..(i + 1) * v),
                ..*r
            })
            .collect();
        let ids = sampler.sample(&self.lender.model.inner.ops, &rows[..n]);
        self.finish(sessions, ids)
    }

    /// Advances every session by one position when the pass (and reading its result) worked.
    fn finish<T>(
        &self,
        sessions: &mut [&mut GpuSession],
        out: Result<T, RuntimeError>,
    ) -> Result<T, RuntimeError> {
        let out = out?;
        for s in sessions.iter_mut() {
            s.len += 1;
            s.high_water = s.high_water.max(s.len);
        }
        Ok(out)
    }

    /// Checks the call, writes the row table and the tokens, and replays (capturing on first
    /// use) or launches the pass. Touches no session; returns the number of rows.
    fn pass(
        &mut self,
        sessions: &mut [&mut GpuSession],
        tokens: &[u32],
    ) -> Result<usize, RuntimeError> {
        let n = sessions.len();
        if n != tokens.len() {
            return Err(RuntimeError::Invalid(format!(
                "decode_batch: {n} sessions but {} tokens",
                tokens.len()
            )));
        }
        if n == 0 || n > MAX_TOKENS {
            return Err(RuntimeError::Invalid(format!(
                "decode_batch: {n} sessions (1..={MAX_TOKENS} per pass)"
            )));
        }
        let model = &self.lender.model;
        if let Some(i) = sessions
            .iter()
            .position(|s| !std::sync::Arc::ptr_eq(&s.model.inner, &model.inner))
        {
            return Err(RuntimeError::Invalid(format!(
                "decode_batch: session {i} belongs to another model"
            )));
        }
        for (i, (s, &t)) in sessions.iter().zip(tokens).enumerate() {
            s.check_tokens(&[t]).map_err(|e| {
                let why = match e {
                    RuntimeError::Invalid(m) => m,
                    e => e.to_string(),
                };
                RuntimeError::Invalid(format!("decode_batch: session {i}: {why}"))
            })?;
        }
        let m = &*model.inner;
        // Paged sessions own the block their row writes to (a failure leaves every session's
        // positions as they were; blocks taken stay with their session for its next pass).
        for s in sessions.iter_mut() {
            s.prepare_blocks(1)?;
        }
        let mut splits = vec![1usize; self.attn.len()];
        for (l, a) in self.attn.iter().enumerate() {
            for (r, s) in sessions.iter().enumerate() {
                let kv = &s.kv[l];
                let row = KvRow::paged(
                    a,
                    kv.k,
                    kv.v,
                    kv.capacity,
                    kv.paging,
                    s.len,
                    decode_splits(a, s.keys[l]),
                )?;
                splits[l] = splits[l].max(row.splits());
                let at = (l * MAX_TOKENS + r) * KV_ROW_WORDS;
                self.host[at..at + KV_ROW_WORDS].copy_from_slice(&row.words());
            }
        }
        let stream = m.stream.clone();
        let mut io = Vec::with_capacity(1 + n);
        io.push(0);
        io.extend_from_slice(tokens);
        htod(&stream, &io, self.lender.b.io.slice(0..1 + n))?;
        htod(&stream, &self.host, self.table)?;
        let rows = RowPass {
            ops: &self.ops,
            table: self.table,
            splits: &splits,
            scratch: self.scratch,
        };
        if self.lender.use_graphs {
            let key = (n, splits.clone());
            if !self.graphs.contains_key(&key) {
                let lender = &self.lender;
                let g = capture_graph(&stream, || {
                    lender.encode(n, Logits::All, Some(&rows), &mut |_| Ok(()))
                })?;
                self.graphs.insert(key.clone(), g);
            }
            self.graphs[&key].launch()?;
        } else {
            self.lender
                .encode(n, Logits::All, Some(&rows), &mut |_| Ok(()))?;
        }
        Ok(n)
    }
}
