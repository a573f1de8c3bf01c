//! Batched passes: the next token of up to [`MAX_TOKENS`] sequences ([`GpuSession`]s of one
//! model, each at its own length) in **one pass** — the GPU counterpart of
//! the CPU's `cpu::Model::decode_batch` — and, generally, **rows of several tokens**: each
//! sequence's block (a speculative request's verify block `[x_last, drafts…]`, or a plain
//! sequence's one token) at its own length, all in one batched pass ([`GpuBatch::forward_device`],
//! [`GpuBatch::verify`]; the CPU's `Executor::forward_batch`).
//!
//! The pass is the model's batched step plan (`PassShape::batched(N)`) lowered by the same
//! [`super::lower`] as every session pass, with `T = N` rows (one per token): embedding,
//! norms, QKV / O projections, router, experts (each distinct expert read once for all rows),
//! LM head and argmax are the same launches, so every weight is read once per step instead of
//! once per sequence. Only RoPE + the KV write and attention differ: the plan's `Buf::Kv` is
//! bound to a row table ([`super::lower::RowPass`], kernels [`crate::ops::rows`]), so each row
//! uses its own sequence's cache, position and attention key splits, read from device memory
//! written before each replay. The `B` rows of one sequence's block sit at positions
//! `len .. len + B` of that sequence: the pass writes all their keys before attention, and each
//! row attends up to its own position — causal inside the block, as the sequence's own `B`-token
//! pass. One CUDA graph per `(N, per-layer split bound)` therefore serves every step, whatever
//! sequences are in it (in a server every sequence has one size: one graph per N and block mix).
//!
//! More than [`MAX_TOKENS`] rows run as consecutive passes of at most [`MAX_TOKENS`] rows
//! ([`row_passes`]); a block cut by a pass boundary has its first rows' keys written by the
//! earlier pass, which its later rows read: the same result.
//!
//! Numerics: RoPE, the KV write and attention compute a row exactly as the sequence's own
//! pass of its block does (the key splits are that pass's: [`crate::ops::rows::block_splits`]),
//! and every other kernel computes each row independently of the others. Whether a row's bits
//! are also independent of the pass size is up to those kernels: on every fixture checkpoint and
//! toy model they are (the tests require logits bit-identical to [`GpuSession::decode`] /
//! [`GpuSession::verify`]); at gpt-oss-20b size some kernel's summation order depends on the pass
//! size (not located yet: likely the experts', whose launch shape changes with it; a verify pass
//! already differs from decode the same way), giving relative logit differences of ~1e-3 on the
//! synthetic model (`gpu-decode`, BENCHMARKS.md), so near-tie greedy tokens can differ from
//! decoding alone.
//!
//! A [`GpuBatch`] owns the pass's activation buffers (a `MAX_TOKENS`-row set, as one session
//! holds) and its graphs; the sessions keep only their KV caches and lengths (and, after
//! [`GpuBatch::forward_device`], their rows' logits, argmax and captured hidden states, copied
//! into their own buffers). All-or-nothing: on any error every session is left as it was
//! (length and truncation bound unchanged). A server shares one batch between its sessions
//! ([`SharedBatch`], [`GpuSession::share_batch`]) so that `Executor::forward_batch` and the
//! speculative loop's `verify_batch` find it.

use std::cell::RefCell;
use std::collections::HashMap;
use std::rc::Rc;

use cudarc::driver::CudaGraph;

use super::lower::{layer_attention_args, LayerKv, RowPass};
use super::{capture_graph, GpuModel, GpuSession, Logits, VerifyOutput, DEFAULT_MAX_ROLLBACK};
use crate::arena::{dtod, dtoh, htod, DPtr};
use crate::ops::rows::{block_splits, max_splits, KvRow, RowOps, KV_ROW_WORDS};
use crate::ops::{AttnArgs, MAX_TOKENS};
use crate::sample::{DeviceSampler, RowSample};
use crate::RuntimeError;

/// A [`GpuBatch`] shared by the sessions of one server (or any owner of several sessions): what
/// [`GpuSession::share_batch`] attaches, so that `Executor::forward_batch` and the speculative
/// loop's batched verify run their rows through it.
pub type SharedBatch = Rc<RefCell<GpuBatch>>;

/// One row of a batched pass: token `off` of sequence `seq`'s block of `width` tokens (at
/// position `len + off` of that sequence; its attention uses the key splits of a `width`-token
/// pass of the sequence).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RowSlot {
    pub seq: usize,
    pub off: usize,
    pub width: usize,
}

/// The passes that run a block of `widths[i]` tokens for every sequence `i`: the rows in
/// sequence order (each block's rows consecutive, in block order), cut into passes of at most
/// [`MAX_TOKENS`] rows. A block may straddle two passes (its earlier rows' keys are written by
/// the earlier pass, before its later rows attend to them). Zero-width blocks have no rows.
pub fn row_passes(widths: &[usize]) -> Vec<Vec<RowSlot>> {
    let rows: Vec<RowSlot> = widths
        .iter()
        .enumerate()
        .flat_map(|(seq, &width)| (0..width).map(move |off| RowSlot { seq, off, width }))
        .collect();
    rows.chunks(MAX_TOKENS).map(<[RowSlot]>::to_vec).collect()
}

/// Batched passes over sessions of one model (see the module docs). Create with
/// [`GpuModel::batch`]; reuse it for every step (its graphs are captured once per batch shape).
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

    /// [`GpuModel::batch`], shared ([`SharedBatch`]).
    pub fn shared_batch(&self) -> Result<SharedBatch, RuntimeError> {
        Ok(Rc::new(RefCell::new(self.batch()?)))
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
        let n = self.decode_pass(sessions, tokens)?;
        let v = self.lender.model.inner.config.vocab_size;
        let all = dtoh(
            &self.lender.model.inner.stream,
            self.lender.b.logits.slice(0..n * v),
        );
        finish(
            sessions,
            &vec![1; n],
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
        let n = self.decode_pass(sessions, tokens)?;
        let ids = dtoh(
            &self.lender.model.inner.stream,
            self.lender.b.argmax.slice(0..n),
        );
        finish(sessions, &vec![1; n], ids)
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
        let n = self.decode_pass(sessions, tokens)?;
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
        finish(sessions, &vec![1; n], ids)
    }

    /// Appends `blocks[i]` (1..=[`MAX_TOKENS`] tokens) to `sessions[i]` for every `i`, all
    /// rows in batched passes (one pass for up to [`MAX_TOKENS`] rows in all; see the module
    /// docs), and leaves each session as `sessions[i].forward_device(blocks[i])` would: its
    /// rows' argmax ([`GpuSession::argmax_device`]) and captured hidden states
    /// ([`GpuSession::captured_hidden`]; every session must capture the same indices) in its
    /// own buffers, and with `logits` its rows' logits ([`GpuSession::logits_device`]; without,
    /// those hold what they held). All-or-nothing.
    pub fn forward_device(
        &mut self,
        sessions: &mut [&mut GpuSession],
        blocks: &[&[u32]],
        logits: bool,
    ) -> Result<(), RuntimeError> {
        let op = "forward_batch";
        let widths = self.check(op, sessions, blocks)?;
        if let Some(i) = blocks.iter().position(|b| b.len() > MAX_TOKENS) {
            return Err(RuntimeError::Invalid(format!(
                "{op}: session {i}: a block of {} tokens (1..={MAX_TOKENS})",
                blocks[i].len()
            )));
        }
        let capture = sessions[0].capture.clone();
        if let Some(i) = sessions.iter().position(|s| s.capture != capture) {
            return Err(RuntimeError::Invalid(format!(
                "{op}: session {i} captures hidden states {:?}, session 0 {capture:?}",
                sessions[i].capture
            )));
        }
        if self.lender.capture != capture {
            // The captured graphs copy out the old set.
            self.lender.set_capture(&capture)?;
            self.graphs.clear();
        }
        // Paged sessions own the blocks their rows write to (a failure leaves every session's
        // positions as they were; blocks taken stay with their session for its next pass).
        for (s, &w) in sessions.iter_mut().zip(&widths) {
            s.prepare_blocks(w)?;
        }
        let m = &*self.lender.model.inner;
        let (v, h) = (m.config.vocab_size, m.config.hidden_size);
        let stream = m.stream.clone();
        for pass in row_passes(&widths) {
            let tokens: Vec<u32> = pass.iter().map(|r| blocks[r.seq][r.off]).collect();
            self.run_pass(sessions, &pass, &tokens)?;
            // Each session's rows of this pass into its own buffers, at their block offsets.
            let b = &self.lender.b;
            let mut i = 0;
            while i < pass.len() {
                let (seq, off) = (pass[i].seq, pass[i].off);
                let k = pass[i..].iter().take_while(|r| r.seq == seq).count();
                let dst = &sessions[seq].b;
                dtod(
                    &stream,
                    b.argmax.slice(i..i + k),
                    dst.argmax.slice(off..off + k),
                )?;
                if logits {
                    dtod(
                        &stream,
                        b.logits.slice(i * v..(i + k) * v),
                        dst.logits.slice(off * v..(off + k) * v),
                    )?;
                }
                for slot in 0..capture.len() {
                    let at = slot * MAX_TOKENS * h;
                    dtod(
                        &stream,
                        b.hidden.slice(at + i * h..at + (i + k) * h),
                        dst.hidden.slice(at + off * h..at + (off + k) * h),
                    )?;
                }
                i += k;
            }
        }
        finish(sessions, &widths, Ok(()))
    }

    /// [`GpuBatch::forward_device`] bringing back, for every session, what
    /// `sessions[i].verify(blocks[i], hidden)` returns (every token's logits and the requested
    /// hidden states); blocks of any length (cut into [`MAX_TOKENS`]-token pieces, piece `k` of
    /// every block in round `k`, as the session's own passes cut them). Sets every session's
    /// capture to `hidden`. All-or-nothing.
    pub fn verify(
        &mut self,
        sessions: &mut [&mut GpuSession],
        blocks: &[&[u32]],
        hidden: &[usize],
    ) -> Result<Vec<VerifyOutput>, RuntimeError> {
        self.check("verify_batch", sessions, blocks)?;
        for s in sessions.iter_mut() {
            s.set_capture(hidden)?;
        }
        let starts: Vec<usize> = sessions.iter().map(|s| s.len).collect();
        let mut outs: Vec<VerifyOutput> = blocks
            .iter()
            .map(|b| VerifyOutput {
                logits: Vec::with_capacity(b.len()),
                hidden: vec![Vec::with_capacity(b.len()); hidden.len()],
            })
            .collect();
        let run = (|| -> Result<(), RuntimeError> {
            let rounds = blocks.iter().map(|b| b.len().div_ceil(MAX_TOKENS)).max();
            for k in 0..rounds.unwrap_or(0) {
                let piece = |b: &[u32]| -> std::ops::Range<usize> {
                    (k * MAX_TOKENS).min(b.len())..((k + 1) * MAX_TOKENS).min(b.len())
                };
                let who: Vec<usize> = (0..blocks.len())
                    .filter(|&i| !piece(blocks[i]).is_empty())
                    .collect();
                let pieces: Vec<&[u32]> =
                    who.iter().map(|&i| &blocks[i][piece(blocks[i])]).collect();
                {
                    let mut part: Vec<&mut GpuSession> = sessions
                        .iter_mut()
                        .enumerate()
                        .filter(|(i, _)| who.contains(i))
                        .map(|(_, s)| &mut **s)
                        .collect();
                    self.forward_device(&mut part, &pieces, true)?;
                }
                for (&i, p) in who.iter().zip(&pieces) {
                    let s = &*sessions[i];
                    outs[i].logits.extend(s.logits_rows(p.len())?);
                    if !hidden.is_empty() {
                        let h = s.model.inner.config.hidden_size;
                        let all = dtoh(
                            &s.model.inner.stream,
                            s.b.hidden.slice(0..hidden.len() * MAX_TOKENS * h),
                        )?;
                        for (slot, dst) in outs[i].hidden.iter_mut().enumerate() {
                            let at = slot * MAX_TOKENS * h;
                            let rows = &all[at..at + p.len() * h];
                            dst.extend(rows.chunks_exact(h).map(<[f32]>::to_vec));
                        }
                    }
                }
            }
            Ok(())
        })();
        match run {
            Ok(()) => Ok(outs),
            Err(e) => {
                for (s, &start) in sessions.iter_mut().zip(&starts) {
                    s.restore_len(start);
                }
                Err(e)
            }
        }
    }

    /// Checks a call over `sessions` and `blocks` (as many, 1..; one model; tokens in the
    /// vocabulary; room in each session); returns the block widths.
    fn check(
        &self,
        op: &str,
        sessions: &[&mut GpuSession],
        blocks: &[&[u32]],
    ) -> Result<Vec<usize>, RuntimeError> {
        let n = sessions.len();
        if n != blocks.len() {
            return Err(RuntimeError::Invalid(format!(
                "{op}: {n} sessions but {} blocks",
                blocks.len()
            )));
        }
        if n == 0 {
            return Err(RuntimeError::Invalid(format!("{op}: no sessions")));
        }
        let model = &self.lender.model;
        if let Some(i) = sessions
            .iter()
            .position(|s| !std::sync::Arc::ptr_eq(&s.model.inner, &model.inner))
        {
            return Err(RuntimeError::Invalid(format!(
                "{op}: session {i} belongs to another model"
            )));
        }
        for (i, (s, b)) in sessions.iter().zip(blocks).enumerate() {
            s.check_tokens(b).map_err(|e| {
                let why = match e {
                    RuntimeError::Invalid(m) => m,
                    e => e.to_string(),
                };
                RuntimeError::Invalid(format!("{op}: session {i}: {why}"))
            })?;
        }
        Ok(blocks.iter().map(|b| b.len()).collect())
    }

    /// Checks a batched decode (one token per session, at most [`MAX_TOKENS`] sessions) and
    /// runs its pass; returns the number of rows.
    fn decode_pass(
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
        let blocks: Vec<&[u32]> = tokens.chunks(1).collect();
        self.check("decode_batch", sessions, &blocks)?;
        // Paged sessions own the block their row writes to (a failure leaves every session's
        // positions as they were; blocks taken stay with their session for its next pass).
        for s in sessions.iter_mut() {
            s.prepare_blocks(1)?;
        }
        let pass = row_passes(&vec![1; n]).remove(0);
        self.run_pass(sessions, &pass, tokens)?;
        Ok(n)
    }

    /// Writes the row table of `pass` (its rows' tokens `tokens`) and the tokens, and replays
    /// (capturing on first use) or launches the pass. The sessions' blocks are prepared; touches
    /// no session.
    fn run_pass(
        &mut self,
        sessions: &[&mut GpuSession],
        pass: &[RowSlot],
        tokens: &[u32],
    ) -> Result<(), RuntimeError> {
        let n = pass.len();
        debug_assert!(n == tokens.len() && (1..=MAX_TOKENS).contains(&n));
        let m = &*self.lender.model.inner;
        let mut splits = vec![1usize; self.attn.len()];
        for (l, a) in self.attn.iter().enumerate() {
            for (r, slot) in pass.iter().enumerate() {
                let s = &sessions[slot.seq];
                let kv = &s.kv[l];
                let row = KvRow::paged(
                    a,
                    kv.k,
                    kv.v,
                    kv.capacity,
                    kv.paging,
                    s.len + slot.off,
                    block_splits(a, slot.width, s.keys[l]),
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
        Ok(())
    }
}

/// Advances `sessions[i]` by `widths[i]` positions when the passes (and reading their result)
/// worked.
fn finish<T>(
    sessions: &mut [&mut GpuSession],
    widths: &[usize],
    out: Result<T, RuntimeError>,
) -> Result<T, RuntimeError> {
    let out = out?;
    for (s, &w) in sessions.iter_mut().zip(widths) {
        s.len += w;
        s.high_water = s.high_water.max(s.len);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn flat(passes: &[Vec<RowSlot>]) -> Vec<(usize, usize)> {
        passes.iter().flatten().map(|r| (r.seq, r.off)).collect()
    }

    #[test]
    fn row_passes_keep_blocks_in_order_and_cut_at_max_tokens() {
        // Plain rows only: one pass.
        let p = row_passes(&[1, 1, 1]);
        assert_eq!(p.len(), 1);
        assert_eq!(flat(&p), vec![(0, 0), (1, 0), (2, 0)]);
        assert!(p[0].iter().all(|r| r.width == 1));
        // Mixed: a verify block of 4, a plain row, a block of 3.
        let p = row_passes(&[4, 1, 3]);
        assert_eq!(p.len(), 1);
        assert_eq!(
            flat(&p),
            vec![
                (0, 0),
                (0, 1),
                (0, 2),
                (0, 3),
                (1, 0),
                (2, 0),
                (2, 1),
                (2, 2)
            ]
        );
        assert_eq!(p[0][5].width, 3);
        // 16 blocks of 8: 8 passes of 16 rows, two whole blocks each.
        let p = row_passes(&[8; 16]);
        assert_eq!(p.len(), 8);
        assert!(p.iter().all(|q| q.len() == MAX_TOKENS));
        for (k, q) in p.iter().enumerate() {
            assert_eq!(q[0].seq, 2 * k);
            assert_eq!(q[15].seq, 2 * k + 1);
        }
        // A block straddling a boundary: its rows continue in the next pass, in order.
        let p = row_passes(&[10, 10]);
        assert_eq!(p.len(), 2);
        assert_eq!(p[0].len(), 16);
        assert_eq!((p[0][15].seq, p[0][15].off), (1, 5));
        assert_eq!((p[1][0].seq, p[1][0].off), (1, 6));
        assert_eq!(p[1].len(), 4);
        // Every row once; zero-width blocks have none.
        let p = row_passes(&[0, 3, 0, 2]);
        assert_eq!(flat(&p), vec![(1, 0), (1, 1), (1, 2), (3, 0), (3, 1)]);
        assert!(row_passes(&[]).is_empty());
    }
}
