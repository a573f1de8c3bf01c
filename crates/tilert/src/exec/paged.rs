//! Paged KV on the device: a [`GpuKvPool`] of fixed-size blocks (every layer's keys and values of
//! `block_size` positions per block, one block id naming the same block in every layer) and
//! sessions whose caches are read and written through a per-sequence block table
//! ([`GpuModel::session_paged`]; kernels: [`crate::ops::KvPaging`]).
//!
//! A paged session computes exactly what a contiguous session of the same size computes (the
//! attention kernels read the same keys in the same order, only from other addresses), so logits
//! are bit-identical. Its layers — sliding ones too — hold positions `0 .. max_seq` (no ring), so
//! truncation is always exact.
//!
//! Blocks are reference-counted ([`SharedKvBlock`]): a full block can be shared by several
//! sessions ([`GpuSession::full_block`], [`GpuSession::adopt_prefix`], [`GpuSession::fork`]),
//! the way a server's prefix cache shares a cached prompt prefix. Before each pass a session
//! makes sure it owns every block the pass writes: missing blocks come from the pool's free
//! list, and a shared block about to be written is copied first (copy-on-write, all layers), so
//! sharing never changes what any session reads. A block goes back to the free list when its
//! last holder drops it.
//!
//! What may be shared: the attention kernels cut keys into splits by the pass's size, so the keys
//! and values of a position depend (in their last bits) on the size of the pass that computed it.
//! A prefill of a token sequence from position 0 runs passes of [`MAX_TOKENS`] tokens starting at
//! multiples of [`MAX_TOKENS`] (the last one shorter). [`GpuSession::full_block`] therefore offers a
//! block only when every position in it was computed by such a full aligned pass: a session that
//! adopts it (at a multiple of [`MAX_TOKENS`], and prefills the rest from there) computes exactly
//! what it would have computed alone. Blocks holding decoded positions or a prompt's last partial
//! pass are not offered. Forks share everything: both sides then hold the same history.

use std::cell::RefCell;
use std::rc::Rc;
use std::sync::Arc;

use cudarc::driver::CudaStream;

use super::{GpuModel, GpuSession, DEFAULT_MAX_ROLLBACK};
use crate::arena::{dtod, htod, Arena, DPtr};
use crate::ops::{check_block_ids, KvPaging, MAX_TOKENS};
use crate::RuntimeError;

/// A pool of KV blocks on one model's device (see the module docs). Cheap to clone (shared).
#[derive(Clone)]
pub struct GpuKvPool {
    inner: Rc<PoolInner>,
}

struct PoolInner {
    stream: Arc<CudaStream>,
    _arena: Arena,
    /// Per layer: the key and value pools (`blocks · block_size` rows) and their row widths.
    layers: Vec<PoolLayer>,
    block_size: usize,
    blocks: usize,
    free: RefCell<Vec<u32>>,
}

#[derive(Clone, Copy)]
struct PoolLayer {
    k: DPtr<f32>,
    v: DPtr<f32>,
    k_width: usize,
    v_width: usize,
}

/// One block of a [`GpuKvPool`], back on the free list when dropped.
pub struct KvBlock {
    id: u32,
    pool: Rc<PoolInner>,
}

/// A block shared by reference (a session's block table entry, a prefix cache's payload).
pub type SharedKvBlock = Rc<KvBlock>;

impl KvBlock {
    /// The block's id in its pool.
    pub fn id(&self) -> u32 {
        self.id
    }
}

impl Drop for KvBlock {
    fn drop(&mut self) {
        self.pool.free.borrow_mut().push(self.id);
    }
}

impl std::fmt::Debug for KvBlock {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "KvBlock({})", self.id)
    }
}

impl GpuModel {
    /// Device bytes of one position of every layer's keys and values (a pool's block holds
    /// `block_size` of them).
    pub fn kv_position_bytes(&self) -> usize {
        self.inner
            .layout
            .layers
            .iter()
            .map(|t| (t.k_width + t.v_width) * std::mem::size_of::<f32>())
            .sum()
    }

    /// A pool of `blocks` KV blocks of `block_size` positions for this model's sessions
    /// ([`GpuModel::session_paged`]). Device memory: `blocks · block_size` positions of every
    /// layer's keys and values.
    pub fn kv_pool(&self, block_size: usize, blocks: usize) -> Result<GpuKvPool, RuntimeError> {
        if block_size == 0 || blocks == 0 {
            return Err(RuntimeError::Invalid(format!(
                "a KV block pool of {blocks} blocks of {block_size} positions"
            )));
        }
        if blocks
            .checked_mul(block_size)
            .is_none_or(|r| u32::try_from(r).is_err())
        {
            return Err(RuntimeError::Invalid(format!(
                "a KV block pool of {blocks} blocks of {block_size} positions is too large"
            )));
        }
        let m = &*self.inner;
        let mut arena = Arena::new(m.stream.clone());
        let rows = blocks * block_size;
        let mut layers = Vec::with_capacity(m.layout.layers.len());
        for (l, t) in m.layout.layers.iter().enumerate() {
            layers.push(PoolLayer {
                k: arena.alloc(rows * t.k_width, &format!("layer {l} key block pool"))?,
                v: arena.alloc(rows * t.v_width, &format!("layer {l} value block pool"))?,
                k_width: t.k_width,
                v_width: t.v_width,
            });
        }
        m.stream.synchronize()?;
        Ok(GpuKvPool {
            inner: Rc::new(PoolInner {
                stream: m.stream.clone(),
                _arena: arena,
                layers,
                block_size,
                blocks,
                free: RefCell::new((0..blocks as u32).rev().collect()),
            }),
        })
    }

    /// A new empty sequence of at most `max_seq` positions whose KV lives in `pool`'s blocks
    /// (taken as it grows, given back as it shrinks or drops). Computes exactly what
    /// [`GpuModel::session`]`(max_seq)` computes.
    pub fn session_paged(
        &self,
        pool: &GpuKvPool,
        max_seq: usize,
    ) -> Result<GpuSession, RuntimeError> {
        if pool.inner.layers.len() != self.inner.layout.layers.len()
            || pool
                .inner
                .layers
                .iter()
                .zip(&self.inner.layout.layers)
                .any(|(p, t)| p.k_width != t.k_width || p.v_width != t.v_width)
        {
            return Err(RuntimeError::Invalid(
                "the KV block pool was made for another model".into(),
            ));
        }
        GpuSession::with_pool(self.clone(), max_seq, DEFAULT_MAX_ROLLBACK, Some(pool))
    }
}

impl GpuKvPool {
    /// Positions per block.
    pub fn block_size(&self) -> usize {
        self.inner.block_size
    }

    /// Blocks in the pool.
    pub fn blocks(&self) -> usize {
        self.inner.blocks
    }

    /// Blocks no session or holder uses now.
    pub fn free_blocks(&self) -> usize {
        self.inner.free.borrow().len()
    }

    fn take(&self) -> Option<KvBlock> {
        let id = self.inner.free.borrow_mut().pop()?;
        Some(KvBlock {
            id,
            pool: self.inner.clone(),
        })
    }

    /// Copies block `src` into block `dst` in every layer.
    fn copy_block(&self, src: u32, dst: u32) -> Result<(), RuntimeError> {
        let bs = self.inner.block_size;
        for l in &self.inner.layers {
            for (p, w) in [(l.k, l.k_width), (l.v, l.v_width)] {
                let at = |b: u32| p.slice(b as usize * bs * w..(b as usize + 1) * bs * w);
                dtod(&self.inner.stream, at(src), at(dst))?;
            }
        }
        Ok(())
    }

    fn same(&self, other: &Rc<PoolInner>) -> bool {
        Rc::ptr_eq(&self.inner, other)
    }
}

/// A paged session's blocks and its block table (host mirror and device copy, one table for all
/// layers: block id j names block j of every layer's pool).
pub(crate) struct SessionBlocks {
    pool: GpuKvPool,
    blocks: Vec<SharedKvBlock>,
    /// Per block: every position in it was computed by a full pass of `MAX_TOKENS` tokens
    /// starting at a multiple of `MAX_TOKENS` (see the module docs).
    aligned: Vec<bool>,
    ids: Vec<u32>,
    table: DPtr<u32>,
    dirty: bool,
}

impl SessionBlocks {
    /// A session's table of `capacity / block_size` entries (in `arena`), and the layer caches
    /// that read through it.
    pub(crate) fn new(
        pool: &GpuKvPool,
        arena: &mut Arena,
        capacity: usize,
    ) -> Result<(Self, Vec<super::LayerKv>), RuntimeError> {
        let p = &*pool.inner;
        let n = capacity / p.block_size;
        let table = arena.alloc(n, "KV block table")?;
        let ids = vec![0u32; n];
        htod(&p.stream, &ids, table)?;
        let paging = KvPaging {
            blocks: table,
            block_size: p.block_size,
            pool_blocks: p.blocks,
        };
        let kv = p
            .layers
            .iter()
            .map(|l| super::LayerKv {
                k: l.k,
                v: l.v,
                capacity,
                paging: Some(paging),
            })
            .collect();
        Ok((
            SessionBlocks {
                pool: pool.clone(),
                blocks: Vec::new(),
                aligned: Vec::new(),
                ids,
                table,
                dirty: false,
            },
            kv,
        ))
    }

    /// The logical capacity a paged session of `max_seq` positions has: whole blocks.
    pub(crate) fn capacity(pool: &GpuKvPool, max_seq: usize) -> usize {
        max_seq.div_ceil(pool.inner.block_size) * pool.inner.block_size
    }

    /// Makes the session own every block that positions `len .. end` are written to (new blocks
    /// from the pool, shared ones copied first) and uploads the table when it changed. All or
    /// nothing: when the pool has too few free blocks, nothing changes.
    pub(crate) fn prepare(&mut self, len: usize, end: usize) -> Result<(), RuntimeError> {
        let bs = self.pool.inner.block_size;
        let need = end.div_ceil(bs);
        if need > self.ids.len() {
            return Err(RuntimeError::Invalid(format!(
                "{end} positions exceed the session's {} KV blocks of {bs}",
                self.ids.len()
            )));
        }
        let first = len / bs;
        let shared = (first..need.min(self.blocks.len()))
            .filter(|&j| Rc::strong_count(&self.blocks[j]) > 1)
            .count();
        let wanted = shared + need.saturating_sub(self.blocks.len());
        let free = self.pool.free_blocks();
        if wanted > free {
            return Err(RuntimeError::Invalid(format!(
                "KV block pool exhausted: {wanted} blocks needed, {free} free of {}",
                self.pool.inner.blocks
            )));
        }
        for j in first..need.min(self.blocks.len()) {
            if Rc::strong_count(&self.blocks[j]) > 1 {
                let b = self.pool.take().expect("counted free block");
                self.pool.copy_block(self.blocks[j].id, b.id)?;
                self.ids[j] = b.id;
                self.blocks[j] = Rc::new(b);
                self.dirty = true;
            }
        }
        while self.blocks.len() < need {
            let b = self.pool.take().expect("counted free block");
            self.ids[self.blocks.len()] = b.id;
            self.blocks.push(Rc::new(b));
            self.aligned.push(true);
            self.dirty = true;
        }
        if !(len.is_multiple_of(MAX_TOKENS) && end - len == MAX_TOKENS) {
            for a in &mut self.aligned[first..need] {
                *a = false;
            }
        }
        self.upload()
    }

    fn upload(&mut self) -> Result<(), RuntimeError> {
        if self.dirty {
            check_block_ids("KV block table", &self.ids, self.pool.inner.blocks)?;
            htod(&self.pool.inner.stream, &self.ids, self.table)?;
            self.dirty = false;
        }
        Ok(())
    }

    /// Gives back the blocks past position `len`.
    pub(crate) fn truncate(&mut self, len: usize) {
        let keep = len.div_ceil(self.pool.inner.block_size);
        self.blocks.truncate(keep);
        self.aligned.truncate(keep);
    }

    /// Block `b`, shared, when it is held, full for a sequence of `len` positions and computed
    /// by full aligned passes only (see the module docs).
    pub(crate) fn full_block(&self, b: usize, len: usize) -> Option<SharedKvBlock> {
        if (b + 1) * self.pool.inner.block_size > len || !self.aligned.get(b).copied()? {
            return None;
        }
        self.blocks.get(b).cloned()
    }

    /// Makes an empty session hold `blocks` as its first blocks; returns the positions they hold.
    pub(crate) fn adopt(&mut self, blocks: &[SharedKvBlock]) -> Result<usize, RuntimeError> {
        if !self.blocks.is_empty() {
            return Err(RuntimeError::Invalid(
                "adopt_prefix: the session is not empty".into(),
            ));
        }
        if blocks.len() > self.ids.len() {
            return Err(RuntimeError::Invalid(format!(
                "adopt_prefix: {} blocks exceed the session's {}",
                blocks.len(),
                self.ids.len()
            )));
        }
        if let Some(i) = blocks.iter().position(|b| !self.pool.same(&b.pool)) {
            return Err(RuntimeError::Invalid(format!(
                "adopt_prefix: block {i} belongs to another pool"
            )));
        }
        for (j, b) in blocks.iter().enumerate() {
            self.ids[j] = b.id;
        }
        self.blocks = blocks.to_vec();
        self.aligned = vec![true; blocks.len()];
        self.dirty = true;
        self.upload()?;
        Ok(blocks.len() * self.pool.inner.block_size)
    }

    /// Shares every block of `self` with `other` (an empty session of the same pool).
    pub(crate) fn share_into(&self, other: &mut SessionBlocks) -> Result<(), RuntimeError> {
        other.blocks.clear();
        other.aligned.clear();
        other.adopt(&self.blocks)?;
        other.aligned = self.aligned.clone();
        Ok(())
    }

    pub(crate) fn pool(&self) -> &GpuKvPool {
        &self.pool
    }

    /// Blocks the session holds.
    pub(crate) fn held(&self) -> usize {
        self.blocks.len()
    }
}
