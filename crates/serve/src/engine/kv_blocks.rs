//! The KV block manager: one pool of fixed-size blocks per model, each sequence's block table,
//! and the automatic prefix cache (vLLM's `BlockPool` / `KVCacheManager`).
//!
//! * **Pool.** `num_blocks` blocks of `block_size` positions (`--kv-cache-mib` divided by one
//!   block's bytes). A block is *free*, *in use* (referenced by one or more sequences), or
//!   *cached and unreferenced* (it holds a full block of some prefix that no running sequence
//!   uses; it stays reusable until it is evicted, least recently used first, when a fresh
//!   block is needed). Admission, growth and `kv_cache_usage_perc` count blocks: usage is the
//!   fraction of blocks in use (cached unreferenced blocks count as free, as vLLM's).
//! * **Block tables.** A sequence's [`SeqBlocks`] lists its blocks in position order and the
//!   tokens they hold. It grows one block at a time ([`BlockPool::grow`], all or nothing) and
//!   gives its blocks back on every kind of end ([`BlockPool::release_seq`]).
//! * **Prefix cache.** A full block is identified by `sha256(parent block's hash, its token ids)`
//!   — so by its whole prefix. Each block a sequence fills is registered under its hash with
//!   the executor's shared payload (the block's keys and values, shared by reference, see
//!   `model::cpu::SharedBlock`); a new sequence looks up its prompt's full blocks in order and
//!   adopts the longest cached run instead of prefilling it. Entries also store their parent
//!   hash and token ids, which a lookup compares, so a hash collision is a miss, never a wrong
//!   hit. The payload type is generic: a drafter's context features can ride in it keyed by
//!   the same hashes.

use std::collections::{BTreeMap, HashMap};

use sha2::{Digest, Sha256};

/// A full block's identity: `sha256(parent hash, token ids)`.
pub type BlockHash = [u8; 32];

/// The hash of a full block holding `tokens` after the block hashed `parent` (`None`: the
/// first block).
pub fn block_hash(parent: Option<&BlockHash>, tokens: &[u32]) -> BlockHash {
    let mut h = Sha256::new();
    h.update([u8::from(parent.is_some())]);
    h.update(parent.copied().unwrap_or_default());
    for t in tokens {
        h.update(t.to_le_bytes());
    }
    h.finalize().into()
}

/// A cached block's payload: the executor's shared KV block and, when a speculative request
/// filled it, the drafter's context features of its positions (`block_size` rows of the
/// drafter's feature width, as its target computed them).
#[derive(Debug, Clone)]
pub struct Cached<K> {
    pub kv: K,
    pub ctx: Option<std::sync::Arc<[f32]>>,
}

/// One sequence's block table.
#[derive(Debug, Default)]
pub struct SeqBlocks {
    /// Block ids in position order (block `i` holds positions `i·block_size ..`).
    ids: Vec<u32>,
    /// Hashes of the leading full blocks registered or adopted so far.
    hashes: Vec<BlockHash>,
    /// The tokens the sequence's KV holds, in order.
    tokens: Vec<u32>,
    /// A full block could not be registered (its payload was gone): later ones are not either.
    stopped: bool,
}

impl SeqBlocks {
    /// Blocks held.
    pub fn len(&self) -> usize {
        self.ids.len()
    }

    pub fn is_empty(&self) -> bool {
        self.ids.is_empty()
    }

    /// The tokens the sequence's KV holds.
    pub fn tokens(&self) -> &[u32] {
        &self.tokens
    }

    /// Records tokens the sequence's KV now holds (after a prefill chunk or a decode step).
    pub fn push_tokens(&mut self, tokens: &[u32]) {
        self.tokens.extend_from_slice(tokens);
    }
}

/// What a prefix lookup found.
pub struct PrefixHit<P> {
    /// The cached blocks' payloads, in order.
    pub payloads: Vec<P>,
    /// Positions they cover.
    pub tokens: usize,
}

#[derive(Debug)]
struct Entry<P> {
    parent: Option<BlockHash>,
    tokens: Vec<u32>,
    block: u32,
    payload: P,
}

/// The pool (see the module docs). `P`: the executor's shared payload of a full block.
#[derive(Debug)]
pub struct BlockPool<P> {
    block_size: usize,
    num_blocks: usize,
    caching: bool,
    refs: Vec<u32>,
    /// The hash a block is cached under.
    hash_of: Vec<Option<BlockHash>>,
    /// Blocks that hold nothing reusable.
    free: Vec<u32>,
    /// Cached unreferenced blocks by last use (oldest first).
    lru: BTreeMap<u64, u32>,
    last_use: Vec<u64>,
    tick: u64,
    cached: HashMap<BlockHash, Entry<P>>,
}

impl<P: Clone> BlockPool<P> {
    /// A pool of `num_blocks` blocks of `block_size` positions; `caching`: automatic prefix
    /// caching on.
    pub fn new(num_blocks: usize, block_size: usize, caching: bool) -> Self {
        BlockPool {
            block_size: block_size.max(1),
            num_blocks,
            caching,
            refs: vec![0; num_blocks],
            hash_of: vec![None; num_blocks],
            free: (0..num_blocks as u32).rev().collect(),
            lru: BTreeMap::new(),
            last_use: vec![0; num_blocks],
            tick: 0,
            cached: HashMap::new(),
        }
    }

    pub fn block_size(&self) -> usize {
        self.block_size
    }

    pub fn num_blocks(&self) -> usize {
        self.num_blocks
    }

    pub fn caching(&self) -> bool {
        self.caching
    }

    /// Blocks a new block can come from: free ones and cached unreferenced ones.
    pub fn available(&self) -> usize {
        self.free.len() + self.lru.len()
    }

    /// Blocks referenced by some sequence.
    pub fn in_use(&self) -> usize {
        self.num_blocks - self.available()
    }

    /// Cached blocks (referenced or not).
    #[cfg(test)]
    pub fn cached_blocks(&self) -> usize {
        self.cached.len()
    }

    /// Blocks for `positions` positions.
    pub fn blocks_for(&self, positions: usize) -> usize {
        positions.div_ceil(self.block_size)
    }

    /// The hashes of the full blocks of `tokens` that a lookup may reuse: at most
    /// `(len − 1) / block_size` blocks, so the last token is always computed (its logits are
    /// needed).
    fn lookup_hashes(&self, tokens: &[u32]) -> Vec<(Option<BlockHash>, BlockHash)> {
        let n = tokens.len().saturating_sub(1) / self.block_size;
        let mut out: Vec<(Option<BlockHash>, BlockHash)> = Vec::with_capacity(n);
        for b in 0..n {
            let parent = out.last().map(|&(_, h)| h);
            let h = block_hash(
                parent.as_ref(),
                &tokens[b * self.block_size..(b + 1) * self.block_size],
            );
            out.push((parent, h));
        }
        out
    }

    fn is_hit(&self, parent: &Option<BlockHash>, h: &BlockHash, tokens: &[u32]) -> bool {
        self.cached
            .get(h)
            .is_some_and(|e| e.parent == *parent && e.tokens == tokens)
    }

    /// Positions of `tokens` a lookup would find cached now (no side effects).
    pub fn peek(&self, tokens: &[u32]) -> usize {
        self.peek_where(tokens, |_| true)
    }

    /// [`BlockPool::peek`] counting only a run of blocks whose payload is `usable`.
    pub fn peek_where(&self, tokens: &[u32], usable: impl Fn(&P) -> bool) -> usize {
        if !self.caching {
            return 0;
        }
        let bs = self.block_size;
        self.lookup_hashes(tokens)
            .iter()
            .enumerate()
            .take_while(|(b, (p, h))| {
                self.is_hit(p, h, &tokens[b * bs..(b + 1) * bs])
                    && self.cached.get(h).is_some_and(|e| usable(&e.payload))
            })
            .count()
            * bs
    }

    /// Looks up the longest cached run of `tokens`' full blocks (at most `max_blocks`) and
    /// makes them the first blocks of the empty `seq` (referenced, recorded with their
    /// tokens). Returns their payloads, for the executor to adopt.
    pub fn adopt_prefix(
        &mut self,
        seq: &mut SeqBlocks,
        tokens: &[u32],
        max_blocks: usize,
    ) -> PrefixHit<P> {
        self.adopt_prefix_where(seq, tokens, max_blocks, |_| true)
    }

    /// Fresh blocks a sequence of `positions` positions needs beyond the cached run of
    /// `tokens`' usable blocks it would adopt, counting the adopted blocks that are unreferenced
    /// now (adopting them takes them out of [`BlockPool::available`]).
    pub fn need_where(
        &self,
        tokens: &[u32],
        positions: usize,
        usable: impl Fn(&P) -> bool,
    ) -> usize {
        let bs = self.block_size;
        let hits = self.peek_where(tokens, usable) / bs;
        let idle = self
            .lookup_hashes(tokens)
            .iter()
            .take(hits)
            .filter(|(_, h)| {
                self.cached
                    .get(h)
                    .is_some_and(|e| self.refs[e.block as usize] == 0)
            })
            .count();
        self.blocks_for(positions).saturating_sub(hits) + idle
    }

    /// [`BlockPool::adopt_prefix`] of a run of blocks whose payload is `usable` (a speculative
    /// request needs the drafter features with the KV).
    pub fn adopt_prefix_where(
        &mut self,
        seq: &mut SeqBlocks,
        tokens: &[u32],
        max_blocks: usize,
        usable: impl Fn(&P) -> bool,
    ) -> PrefixHit<P> {
        let mut hit = PrefixHit {
            payloads: Vec::new(),
            tokens: 0,
        };
        if !self.caching || !seq.ids.is_empty() {
            return hit;
        }
        let bs = self.block_size;
        for (b, (parent, h)) in self
            .lookup_hashes(tokens)
            .into_iter()
            .enumerate()
            .take(max_blocks)
        {
            let toks = &tokens[b * bs..(b + 1) * bs];
            if !self.is_hit(&parent, &h, toks) {
                break;
            }
            let Some(e) = self.cached.get(&h) else { break };
            if !usable(&e.payload) {
                break;
            }
            let (id, payload) = (e.block, e.payload.clone());
            self.take_ref(id);
            seq.ids.push(id);
            seq.hashes.push(h);
            seq.tokens.extend_from_slice(toks);
            hit.payloads.push(payload);
        }
        hit.tokens = hit.payloads.len() * bs;
        hit
    }

    /// Undoes [`BlockPool::adopt_prefix`] when the executor refused the blocks.
    pub fn forget_prefix(&mut self, seq: &mut SeqBlocks) {
        self.release_seq(seq);
    }

    fn take_ref(&mut self, id: u32) {
        let i = id as usize;
        if self.refs[i] == 0 {
            self.lru.remove(&self.last_use[i]);
        }
        self.refs[i] += 1;
    }

    /// A fresh block: a free one, else the least recently used cached unreferenced one
    /// (evicted from the cache).
    fn allocate(&mut self) -> Option<u32> {
        let id = match self.free.pop() {
            Some(id) => id,
            None => {
                let (_, id) = self.lru.pop_first()?;
                if let Some(h) = self.hash_of[id as usize].take() {
                    self.cached.remove(&h);
                }
                id
            }
        };
        self.refs[id as usize] = 1;
        Some(id)
    }

    /// Gives `seq` blocks for `positions` positions in all; `false` (nothing allocated) when
    /// not enough are available beyond `reserved`.
    pub fn grow(&mut self, seq: &mut SeqBlocks, positions: usize, reserved: usize) -> bool {
        let want = self.blocks_for(positions).saturating_sub(seq.ids.len());
        if want == 0 {
            return true;
        }
        if self.available() < want + reserved {
            return false;
        }
        for _ in 0..want {
            match self.allocate() {
                Some(id) => seq.ids.push(id),
                None => return false,
            }
        }
        true
    }

    /// Registers `seq`'s full blocks not registered yet under their hashes; `payload(b)` is the
    /// executor's shared block `b` (`None` when it no longer holds it whole: registration
    /// stops there). A block whose hash is already cached (another sequence computed the same
    /// prefix meanwhile) stays private and is freed with its sequence.
    pub fn register_full(
        &mut self,
        seq: &mut SeqBlocks,
        mut payload: impl FnMut(usize) -> Option<P>,
    ) {
        if !self.caching || seq.stopped {
            return;
        }
        let bs = self.block_size;
        let full = (seq.tokens.len() / bs).min(seq.ids.len());
        for b in seq.hashes.len()..full {
            let parent = seq.hashes.last().copied();
            let toks = &seq.tokens[b * bs..(b + 1) * bs];
            let h = block_hash(parent.as_ref(), toks);
            let id = seq.ids[b];
            if let std::collections::hash_map::Entry::Vacant(slot) = self.cached.entry(h) {
                let Some(p) = payload(b) else {
                    seq.stopped = true;
                    return;
                };
                slot.insert(Entry {
                    parent,
                    tokens: toks.to_vec(),
                    block: id,
                    payload: p,
                });
                self.hash_of[id as usize] = Some(h);
            }
            seq.hashes.push(h);
        }
    }

    /// A second block table sharing every block of `seq`, the partial last one included (for a
    /// sequence forked from `seq`'s: the `n` samples of one prompt).
    pub fn fork(&mut self, seq: &SeqBlocks) -> SeqBlocks {
        for &id in &seq.ids {
            self.take_ref(id);
        }
        SeqBlocks {
            ids: seq.ids.clone(),
            hashes: seq.hashes.clone(),
            tokens: seq.tokens.clone(),
            stopped: seq.stopped,
        }
    }

    /// Copy-on-write before `seq` appends its next token: when the block that token goes to is
    /// shared with another sequence, `seq` gets a block of its own in its place (the executor
    /// copies the shared block's rows when it writes). `false` (nothing changed) when no block
    /// is available beyond `reserved`.
    pub fn own_tail(&mut self, seq: &mut SeqBlocks, reserved: usize) -> bool {
        let b = seq.tokens.len() / self.block_size;
        let Some(&old) = seq.ids.get(b) else {
            return true;
        };
        if self.refs[old as usize] <= 1 {
            return true;
        }
        if self.available() < 1 + reserved {
            return false;
        }
        let Some(new) = self.allocate() else {
            return false;
        };
        self.refs[old as usize] -= 1;
        seq.ids[b] = new;
        true
    }

    /// Gives back every block of `seq` (its last blocks first, so a cached prefix outlives its
    /// tails under LRU eviction) and empties it.
    pub fn release_seq(&mut self, seq: &mut SeqBlocks) {
        for id in seq.ids.drain(..).rev() {
            let i = id as usize;
            self.refs[i] = self.refs[i].saturating_sub(1);
            if self.refs[i] == 0 {
                if self.hash_of[i].is_some() {
                    self.tick += 1;
                    self.last_use[i] = self.tick;
                    self.lru.insert(self.tick, id);
                } else {
                    self.free.push(id);
                }
            }
        }
        seq.hashes.clear();
        seq.tokens.clear();
        seq.stopped = false;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn toks(n: usize, salt: u32) -> Vec<u32> {
        (0..n as u32).map(|i| i * 7 + salt).collect()
    }

    /// Fills a fresh sequence with `tokens` as the scheduler does (grow, record, register).
    fn fill(pool: &mut BlockPool<usize>, tokens: &[u32]) -> SeqBlocks {
        let mut s = SeqBlocks::default();
        assert!(pool.grow(&mut s, tokens.len(), 0));
        s.push_tokens(tokens);
        pool.register_full(&mut s, Some);
        s
    }

    /// A speculative request adopts only the run of blocks whose payload it can use (those
    /// carrying drafter features: here odd payloads), and its need counts the unreferenced
    /// blocks it would adopt.
    #[test]
    fn adoption_stops_at_the_first_unusable_payload() {
        let mut pool = BlockPool::new(16, 4, true);
        let t = toks(17, 3);
        let mut s = SeqBlocks::default();
        assert!(pool.grow(&mut s, t.len(), 0));
        s.push_tokens(&t);
        // Blocks 0, 1 usable (payloads 1, 3), block 2 not (4), block 3 usable (7).
        pool.register_full(&mut s, |b| Some([1usize, 3, 4, 7][b]));
        let odd = |p: &usize| p % 2 == 1;
        assert_eq!(pool.peek(&t), 16);
        assert_eq!(pool.peek_where(&t, odd), 8);
        // Referenced by `s`: 25 positions need 7 blocks, 2 of them found.
        assert_eq!(pool.need_where(&t, 25, odd), 5);
        pool.release_seq(&mut s);
        // Unreferenced now: adopting them takes them out of `available` too.
        assert_eq!(pool.need_where(&t, 25, odd), 7);
        let mut b = SeqBlocks::default();
        let hit = pool.adopt_prefix_where(&mut b, &t, usize::MAX, odd);
        assert_eq!((hit.tokens, hit.payloads), (8, vec![1, 3]));
        let avail = pool.available();
        assert!(pool.grow(&mut b, 25, 0));
        assert_eq!(avail - pool.available(), 5);
        pool.release_seq(&mut b);
        assert_eq!(pool.in_use(), 0);
    }

    #[test]
    fn hashes_chain_the_prefix() {
        let a = block_hash(None, &[1, 2]);
        assert_eq!(a, block_hash(None, &[1, 2]));
        assert_ne!(a, block_hash(None, &[2, 1]));
        assert_ne!(block_hash(Some(&a), &[3, 4]), block_hash(None, &[3, 4]));
    }

    #[test]
    fn prefix_is_reused_and_the_last_token_is_always_computed() {
        let mut pool = BlockPool::new(64, 4, true);
        let t = toks(10, 1);
        let mut a = fill(&mut pool, &t);
        assert_eq!(a.len(), 3);
        assert_eq!(pool.cached_blocks(), 2);
        // Same prompt: the 2 full blocks (8 ≤ 9 positions); a prompt of exactly 8 tokens gets
        // only 1 block so its last token runs.
        assert_eq!(pool.peek(&t), 8);
        assert_eq!(pool.peek(&t[..8]), 4);
        let mut b = SeqBlocks::default();
        let hit = pool.adopt_prefix(&mut b, &t, usize::MAX);
        assert_eq!((hit.tokens, hit.payloads.clone()), (8, vec![0, 1]));
        assert_eq!(b.tokens(), &t[..8]);
        // The shared blocks count once.
        assert_eq!(pool.in_use(), 3);
        assert!(pool.grow(&mut b, 10, 0));
        assert_eq!(pool.in_use(), 4);
        // A different second block: only the first is shared.
        let mut u = t.clone();
        u[5] = 999;
        assert_eq!(pool.peek(&u), 4);
        pool.release_seq(&mut a);
        pool.release_seq(&mut b);
        assert_eq!(pool.in_use(), 0);
        assert_eq!(pool.available(), 64);
        // Still cached after release.
        assert_eq!(pool.peek(&t), 8);
    }

    #[test]
    fn caching_off_never_hits() {
        let mut pool = BlockPool::new(16, 4, false);
        let t = toks(12, 2);
        let mut a = fill(&mut pool, &t);
        assert_eq!(pool.peek(&t), 0);
        let mut b = SeqBlocks::default();
        assert_eq!(pool.adopt_prefix(&mut b, &t, usize::MAX).tokens, 0);
        pool.release_seq(&mut a);
        assert_eq!(pool.available(), 16);
        assert_eq!(pool.cached_blocks(), 0);
    }

    #[test]
    fn lru_eviction_of_unreferenced_cached_blocks() {
        let mut pool = BlockPool::new(4, 2, true);
        let (x, y) = (toks(5, 3), toks(5, 4));
        let mut a = fill(&mut pool, &x);
        assert!(
            !pool.grow(&mut SeqBlocks::default(), 4, 0),
            "only 1 block left"
        );
        pool.release_seq(&mut a);
        // x's 2 full blocks stay cached but count as available.
        assert_eq!((pool.available(), pool.cached_blocks()), (4, 2));
        let mut b = fill(&mut pool, &y);
        // y took the free block and evicted x's least recently used one: its tail (released
        // first), so x's first block is still a hit.
        assert_eq!(pool.peek(&x), 2);
        pool.release_seq(&mut b);
        let mut c = SeqBlocks::default();
        assert!(pool.grow(&mut c, 8, 0));
        assert_eq!((pool.peek(&x), pool.peek(&y)), (0, 0));
        assert!(!pool.grow(&mut c, 9, 0));
        assert_eq!(c.len(), 4);
        // Referenced cached blocks are never evicted.
        pool.release_seq(&mut c);
        let mut d = fill(&mut pool, &x);
        let mut e = SeqBlocks::default();
        assert_eq!(pool.adopt_prefix(&mut e, &x, usize::MAX).tokens, 4);
        pool.release_seq(&mut d);
        assert!(!pool.grow(&mut SeqBlocks::default(), 6, 0));
        assert_eq!(pool.peek(&x), 4);
        pool.release_seq(&mut e);
    }

    #[test]
    fn reservations_and_duplicates() {
        let mut pool = BlockPool::new(8, 2, true);
        let t = toks(4, 5);
        let mut a = fill(&mut pool, &t);
        // Computed again privately (e.g. two requests at once): one cache entry, both freed.
        let mut b = fill(&mut pool, &t);
        assert_eq!(pool.cached_blocks(), 2);
        pool.release_seq(&mut b);
        assert_eq!(pool.available(), 6);
        // `reserved` blocks are not handed out.
        let mut c = SeqBlocks::default();
        assert!(!pool.grow(&mut c, 8, 3));
        assert!(c.is_empty());
        assert!(pool.grow(&mut c, 6, 3));
        pool.release_seq(&mut a);
        pool.release_seq(&mut c);
        assert_eq!(pool.in_use(), 0);
    }

    #[test]
    fn forks_share_blocks_and_copy_the_tail_on_write() {
        let mut pool = BlockPool::new(8, 4, true);
        let t = toks(6, 7);
        let mut a = fill(&mut pool, &t);
        let mut b = pool.fork(&a);
        assert_eq!((pool.in_use(), b.tokens()), (2, &t[..]));
        // b's next token goes to the shared partial block: b gets its own.
        assert!(pool.own_tail(&mut b, 0));
        assert_eq!(pool.in_use(), 3);
        assert!(pool.own_tail(&mut b, 0));
        assert_eq!(pool.in_use(), 3);
        // a's tail is now its own: nothing to copy.
        assert!(pool.own_tail(&mut a, 0));
        assert_eq!(pool.in_use(), 3);
        let mut c = pool.fork(&a);
        assert!(!pool.own_tail(&mut c, 5), "no block beyond the reservation");
        pool.release_seq(&mut a);
        pool.release_seq(&mut b);
        pool.release_seq(&mut c);
        assert_eq!(pool.in_use(), 0);
    }

    #[test]
    fn a_missing_payload_stops_registration() {
        let mut pool = BlockPool::new(8, 2, true);
        let t = toks(7, 6);
        let mut s = SeqBlocks::default();
        assert!(pool.grow(&mut s, 7, 0));
        s.push_tokens(&t);
        pool.register_full(&mut s, |b| (b != 1).then_some(b));
        assert_eq!(pool.cached_blocks(), 1);
        pool.register_full(&mut s, Some);
        assert_eq!(pool.cached_blocks(), 1);
        assert_eq!(pool.peek(&t), 2);
        pool.release_seq(&mut s);
    }
}
