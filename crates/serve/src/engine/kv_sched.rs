//! How the scheduler uses the KV block pool (`kv_blocks`) for plain requests on a paged
//! executor (vLLM's behaviour):
//!
//! * **Admission** by free blocks: a waiting request is admitted when the pool has the blocks
//!   of its prompt not found in the prefix cache, plus one for its first token (blocks are
//!   taken as the prompt is prefilled, not reserved for `max_tokens`).
//! * **Prefix reuse**: when a request's prefill starts, the longest cached run of its prompt's
//!   full blocks is adopted by its sequence (shared, no copy) and only the rest is prefilled;
//!   every block a sequence fills (prompt or generated tokens) is registered in the cache.
//!   Requests waiting with the same prompt as one that just finished its prefill (the `n`
//!   samples of one request) fork its sequence: they share all its blocks, the partial last
//!   one included, and sample their first token from the same logits; the first write to a
//!   shared block gives the writer a block of its own (copy-on-write, in the pool and in the
//!   executor).
//! * **Growth and preemption**: before each decode step every running sequence gets the block
//!   its next token needs; when none is free the newest request holding blocks is preempted —
//!   a decoding one loses its blocks and sequence and is re-admitted first once blocks free up,
//!   recomputing its prompt and generated tokens (mostly from the prefix cache, where its own
//!   blocks stay until evicted); a prefilling one restarts its prefill. A prefill never
//!   preempts: it waits for blocks. A request that fits the pool alone never fails for lack of
//!   blocks, and its output is unchanged by preemption (same KV, same sampler state).
//! * **Release** on every kind of end (finish, abort, disconnect, error, preemption).
//!
//! Speculative requests (host or device drafter) take their blocks from the same pool (see
//! `engine::spec`: all of them at admission, their cached prefix adopted with its drafter
//! features); every request of an executor whose KV is not paged reserves its whole KV in bytes
//! at admission (`kv_used`).

use std::time::Instant;

use model::executor::Executor;
use model::sampling::FinishReason;

use super::kv_blocks::Cached;
use super::scheduler::{Running, Sched};
use super::{Backend, Pending, PromptLogprob};
use crate::stream::TokenOutput;

/// A request preempted for lack of KV blocks: everything but its sequence and blocks.
pub(crate) struct Parked {
    pub p: Pending,
    out: TokenOutput,
    /// The tokens its KV held (prompt and generated tokens before `next`).
    tokens: Vec<u32>,
    next: u32,
    prompt_lps: Vec<PromptLogprob>,
    admitted: Instant,
    first: Option<Instant>,
    last: Instant,
}

impl<B: Backend> Sched<B> {
    /// Blocks held back for byte reservations (speculative requests).
    pub(super) fn reserved_blocks(&self) -> usize {
        self.kv_used.div_ceil(self.block_bytes.max(1)) as usize
    }

    /// Whether a byte reservation fits the budget beside the blocks in use.
    pub(super) fn reservation_fits(&self, reserve: u64) -> bool {
        let in_use = self
            .kv
            .as_ref()
            .map_or(0, |p| p.in_use() as u64 * self.block_bytes);
        self.kv_used + in_use + reserve <= self.cfg.kv_budget_bytes
    }

    /// Whether a waiting request reserves its whole KV in bytes at admission (not by blocks).
    pub(super) fn reserves_bytes(&self) -> bool {
        self.kv.is_none()
    }

    /// Whether the pool has the blocks of `tokens` not cached, plus one for the next token.
    pub(super) fn prompt_fits(&self, tokens: &[u32]) -> bool {
        let Some(pool) = &self.kv else {
            return true;
        };
        let cached = pool.peek(tokens) / pool.block_size();
        let need = pool.blocks_for(tokens.len() + 1).saturating_sub(cached);
        pool.available() >= need + self.reserved_blocks()
    }

    /// `kv_cache_usage_perc`: blocks in use (and held back for reservations) over all blocks;
    /// without a pool, the bytes reserved over the budget.
    pub(super) fn kv_usage(&self) -> f64 {
        match &self.kv {
            Some(pool) => {
                let used = (pool.in_use() + self.reserved_blocks()).min(pool.num_blocks());
                used as f64 / pool.num_blocks().max(1) as f64
            }
            None => self.kv_used as f64 / self.cfg.kv_budget_bytes.max(1) as f64,
        }
    }

    /// Positions `r` may still prefill with the blocks it holds and those available.
    pub(super) fn block_room(&self, r: &Running<B::Sequence>) -> usize {
        let Some(pool) = &self.kv else {
            return usize::MAX;
        };
        let avail = pool.available().saturating_sub(self.reserved_blocks());
        ((r.blocks.len() + avail) * pool.block_size()).saturating_sub(r.prefilled)
    }

    /// Gives `r` the blocks of `positions` positions; `false` when they are not available.
    pub(super) fn grow_blocks(&mut self, r: &mut Running<B::Sequence>, positions: usize) -> bool {
        let reserved = self.reserved_blocks();
        match &mut self.kv {
            Some(pool) => pool.grow(&mut r.blocks, positions, reserved),
            None => true,
        }
    }

    /// At the start of `r`'s prefill: adopts the longest cached prefix of what it must hold
    /// (counted in the prefix-cache metrics, in tokens as vLLM).
    pub(super) fn adopt_cached_prefix(&mut self, r: &mut Running<B::Sequence>) {
        let g = self.backend.prefill_granularity().max(1);
        let Some(pool) = &mut self.kv else {
            return;
        };
        if !pool.caching() || !r.blocks.is_empty() || !r.seq.is_empty() {
            return;
        }
        let bs = pool.block_size();
        let mut k = pool.peek(&r.fill) / bs;
        while k > 0 && (k * bs) % g != 0 {
            k -= 1;
        }
        let hit = pool.adopt_prefix(&mut r.blocks, &r.fill, k);
        let m = &self.shared.metrics;
        m.prefix_cache_queries.inc_by(r.fill.len() as u64);
        if hit.tokens == 0 {
            return;
        }
        let kv: Vec<B::Block> = hit.payloads.into_iter().map(|c| c.kv).collect();
        match self.backend.adopt_blocks(&mut r.seq, &kv) {
            Ok(()) => {
                r.prefilled = hit.tokens;
                m.prefix_cache_hits.inc_by(hit.tokens as u64);
            }
            Err(e) => {
                // The sequence is as it was: prefill everything.
                eprintln!(
                    "ultra serve: request {}: cached prefix not adopted: {e:#}",
                    r.p.id
                );
                pool.forget_prefix(&mut r.blocks);
            }
        }
    }

    /// When `r` has just prefilled its prompt: the requests waiting to prefill the same prompt
    /// (the other samples of an `n > 1` request) fork its sequence instead — sharing all its
    /// blocks, the partial last one included (copied when one of them writes to it) — and are
    /// returned, prefilled, to sample their first token from the same logits.
    pub(super) fn fork_same_prompt(
        &mut self,
        r: &Running<B::Sequence>,
    ) -> Vec<Running<B::Sequence>> {
        let mut out = Vec::new();
        let Some(pool) = &mut self.kv else {
            return out;
        };
        if !pool.caching() || r.resumed {
            return out;
        }
        let mut j = 0;
        while j < self.prefilling.len() {
            let s = &self.prefilling[j];
            let same = !s.resumed
                && s.prefilled == 0
                && s.blocks.is_empty()
                && s.p.prompt_logprobs.is_none()
                && s.fill == r.fill;
            if !same {
                j += 1;
                continue;
            }
            let Some(seq) = self.backend.fork_sequence(&r.seq) else {
                return out;
            };
            let Some(mut s) = self.prefilling.remove(j) else {
                break;
            };
            let empty = std::mem::replace(&mut s.seq, seq);
            self.backend.release(empty);
            s.blocks = pool.fork(&r.blocks);
            s.prefilled = s.fill.len();
            let m = &self.shared.metrics;
            m.prefix_cache_queries.inc_by(s.fill.len() as u64);
            m.prefix_cache_hits.inc_by(s.fill.len() as u64);
            out.push(s);
        }
        out
    }

    /// Records that `r`'s sequence now holds `fill[start .. start + n]` and caches the blocks
    /// that became full.
    pub(super) fn commit_tokens(&mut self, r: &mut Running<B::Sequence>, start: usize, n: usize) {
        if let Some(pool) = &mut self.kv {
            r.blocks.push_tokens(&r.fill[start..start + n]);
            let (backend, seq) = (&self.backend, &r.seq);
            pool.register_full(&mut r.blocks, |b| {
                backend
                    .share_block(seq, b)
                    .map(|kv| Cached { kv, ctx: None })
            });
        }
    }

    /// Records that `r`'s sequence now holds its decoded token `r.next`.
    pub(super) fn commit_decoded(&mut self, r: &mut Running<B::Sequence>) {
        if let Some(pool) = &mut self.kv {
            r.blocks.push_tokens(&[r.next]);
            let (backend, seq) = (&self.backend, &r.seq);
            pool.register_full(&mut r.blocks, |b| {
                backend
                    .share_block(seq, b)
                    .map(|kv| Cached { kv, ctx: None })
            });
        }
    }

    /// Before a decode step: every running sequence gets the block its next token needs,
    /// preempting the newest requests holding blocks while none is free.
    pub(super) fn make_room_for_decode(&mut self) {
        if self.kv.is_none() {
            return;
        }
        let mut i = 0;
        while i < self.running.len() {
            let need = self.running[i].blocks.tokens().len() + 1;
            let reserved = self.reserved_blocks();
            let ok = match &mut self.kv {
                Some(pool) => {
                    let blocks = &mut self.running[i].blocks;
                    pool.own_tail(blocks, reserved) && pool.grow(blocks, need, reserved)
                }
                None => true,
            };
            if ok {
                i += 1;
                continue;
            }
            // The newest request holding blocks: a running one (possibly this one) or a
            // prefilling one.
            let newest_run = (0..self.running.len()).max_by_key(|&j| self.running[j].admitted);
            let newest_pre = (0..self.prefilling.len())
                .filter(|&j| !self.prefilling[j].blocks.is_empty())
                .max_by_key(|&j| self.prefilling[j].admitted);
            match (newest_run, newest_pre) {
                (_, Some(j))
                    if newest_run
                        .is_none_or(|k| self.prefilling[j].admitted > self.running[k].admitted) =>
                {
                    self.restart_prefill(j);
                }
                (Some(j), _) => {
                    self.preempt_running(j);
                    if j < i {
                        i -= 1;
                    }
                }
                (None, _) => break,
            }
        }
    }

    /// Preempts `running[j]` (recompute): frees its blocks and sequence and parks it.
    fn preempt_running(&mut self, j: usize) {
        let mut r = self.running.remove(j);
        let tokens = r.blocks.tokens().to_vec();
        if let Some(pool) = &mut self.kv {
            pool.release_seq(&mut r.blocks);
        }
        self.kv_used -= r.kv_reserved;
        self.shared.metrics.num_preemptions.inc();
        let Running {
            p,
            seq,
            out,
            next,
            prompt_lps,
            admitted,
            first,
            last,
            ..
        } = r;
        self.backend.release(seq);
        let at = self.parked.partition_point(|q| q.admitted <= admitted);
        self.parked.insert(
            at,
            Parked {
                p,
                out,
                tokens,
                next,
                prompt_lps,
                admitted,
                first,
                last,
            },
        );
    }

    /// Preempts the prefilling `prefilling[j]`: frees its blocks, empties its sequence; its
    /// prefill starts over.
    fn restart_prefill(&mut self, j: usize) {
        self.shared.metrics.num_preemptions.inc();
        let r = &mut self.prefilling[j];
        if let Some(pool) = &mut self.kv {
            pool.release_seq(&mut r.blocks);
        }
        r.prefilled = 0;
        r.prompt_lps.clear();
        if let Err(e) = r.seq.truncate(0) {
            let msg = format!("preemption failed: {e}");
            if let Some(r) = self.prefilling.remove(j) {
                self.end_running(r, FinishReason::Error, "error", None, Some(msg));
            }
        }
    }

    /// Re-admits preempted requests, oldest first, while the batch and the pool have room.
    pub(super) fn readmit_parked(&mut self) {
        while self.active() < self.cfg.max_running {
            let Some(front) = self.parked.front() else {
                break;
            };
            if !self.prompt_fits(&front.tokens) {
                break;
            }
            let Some(pk) = self.parked.pop_front() else {
                break;
            };
            let positions = pk.p.prompt.len() + pk.p.params.max_tokens;
            match self.backend.new_sequence(positions) {
                Ok(seq) => self.prefilling.push_back(Running {
                    p: pk.p,
                    seq,
                    out: pk.out,
                    prefilled: 0,
                    prompt_lps: pk.prompt_lps,
                    next: pk.next,
                    admitted: pk.admitted,
                    first: pk.first,
                    last: pk.last,
                    fill: pk.tokens,
                    resumed: true,
                    blocks: Default::default(),
                    kv_reserved: 0,
                }),
                Err(e) => {
                    let msg = format!("cannot allocate the sequence: {e:#}");
                    self.end_parked(pk, FinishReason::Error, Some(msg));
                }
            }
        }
    }

    /// Ends a preempted request (abort, disconnect, error).
    pub(super) fn end_parked(
        &mut self,
        mut pk: Parked,
        reason: FinishReason,
        error: Option<String>,
    ) {
        let times = (pk.admitted, pk.first, pk.last);
        let cause = reason.as_str();
        self.finish_request(&pk.p, &mut pk.out, times, reason, cause, None, error);
        self.forget(&pk.p.id, reason);
    }
}
