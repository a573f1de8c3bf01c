//! The f32 KV cache of one sequence, in fixed-size blocks (paged).
//!
//! Each layer stores keys and values of consecutive absolute positions `first_pos .. end_pos`
//! as rows (`[n_kv_heads · head_dim]` for k, `[n_kv_heads · v_head_dim]` for v), already RoPE'd
//! and value-scaled, in blocks of `block_size` positions: block `b` holds positions
//! `b·block_size ..`. A sequence's block table is its list of blocks per layer; attention reads
//! every row through it ([`PagedRows`], the [`super::ops::KvRows`] of a layer), so results do
//! not depend on the block size.
//!
//! Blocks are reference-counted (`Arc`): a block can belong to several sequences at once —
//! the server's prefix cache hands the blocks of a cached prompt prefix to a new sequence
//! ([`LayerKv::adopt`], via `Session::adopt_prefix`), and cloning a `Session` shares all its
//! blocks. A write to a shared block copies it first (copy-on-write), so sharing never changes
//! what any sequence reads.
//!
//! * Full-attention layers keep everything (`first_pos` stays 0).
//! * Sliding-window layers keep a bounded suffix. A query at position p reads `(p − W, p]`, so
//!   a call (prefill / decode / verify) starting at position s needs rows from `s − W + 1` on,
//!   and a later truncation back to `len ≥ s − R` needs rows from `len − W + 1 ≥ s − R − W + 1`
//!   on (`R` = the session's `max_rollback`). At the start of every call
//!   ([`LayerKv::begin_pass`]) a sliding layer holding at least `2·max(C, 32)` rows,
//!   `C = W − 1 + R`, drops its oldest whole blocks while at least `C` rows remain — i.e. it
//!   keeps at least `s − W + 1 − R ..`, everything both needs can reach. Rows are never
//!   dropped anywhere else.
//!
//! A sliding layer thus holds at most `2·max(C, 32) + block_size` rows plus the rows of the
//! current call, and no key is ever overwritten while a query of the same call or a permitted
//! truncation could still need it. Exactness is checked, not assumed: [`LayerKv::can_truncate`]
//! says whether the rows a truncated cache would need are present.

use std::sync::Arc;

use super::ops::KvRows;

/// Default positions per KV block (vLLM's default block size).
pub const DEFAULT_BLOCK_SIZE: usize = 16;

/// One block of one layer: `block_size` rows of keys and of values (rows past the layer's end
/// are unused).
#[derive(Debug, Clone, PartialEq)]
pub struct KvBlockData {
    pub k: Vec<f32>,
    pub v: Vec<f32>,
}

/// One layer's keys and values.
#[derive(Debug, Clone)]
pub struct LayerKv {
    /// Blocks `first_block ..` (the block table of this layer).
    blocks: Vec<Arc<KvBlockData>>,
    first_block: usize,
    k_row: usize,
    v_row: usize,
    block_size: usize,
    /// Absolute position after the last row.
    end: usize,
    /// `Some(W)` for sliding layers.
    window: Option<usize>,
    /// Rows a sliding layer keeps at compaction (`W − 1 + max_rollback`).
    keep: usize,
}

/// One layer's keys (or values) read through its block table.
#[derive(Debug, Clone, Copy)]
pub struct PagedRows<'a> {
    blocks: &'a [Arc<KvBlockData>],
    first_block: usize,
    block_size: usize,
    width: usize,
    end: usize,
    values: bool,
}

impl KvRows for PagedRows<'_> {
    fn width(&self) -> usize {
        self.width
    }

    /// The rest of `pos`'s block (up to the layer's end).
    #[inline]
    fn run(&self, pos: usize) -> (&[f32], usize) {
        let b = &self.blocks[pos / self.block_size - self.first_block];
        let r = pos % self.block_size;
        let data = if self.values { &b.v } else { &b.k };
        let n = (self.block_size - r)
            .min(self.end.saturating_sub(pos))
            .max(1);
        (&data[r * self.width..], n)
    }

    fn span(&self) -> std::ops::Range<usize> {
        self.first_block * self.block_size..self.end
    }
}

impl LayerKv {
    /// An empty layer cache. `window` is the layer's sliding window (None for full attention);
    /// `max_rollback` the truncation depth that must always stay exact; `block_size` the
    /// positions per block (at least 1).
    pub fn new(
        k_row: usize,
        v_row: usize,
        window: Option<usize>,
        max_rollback: usize,
        block_size: usize,
    ) -> Self {
        LayerKv {
            blocks: Vec::new(),
            first_block: 0,
            k_row,
            v_row,
            block_size: block_size.max(1),
            end: 0,
            window,
            keep: window.map_or(0, |w| w.saturating_sub(1) + max_rollback),
        }
    }

    /// Positions per block.
    pub fn block_size(&self) -> usize {
        self.block_size
    }

    /// Absolute position of the oldest stored row.
    pub fn first_pos(&self) -> usize {
        self.first_block * self.block_size
    }

    /// Absolute position after the newest stored row.
    pub fn end_pos(&self) -> usize {
        self.end
    }

    /// Key and value row widths.
    pub fn row_widths(&self) -> (usize, usize) {
        (self.k_row, self.v_row)
    }

    /// Stored rows.
    pub fn rows(&self) -> usize {
        self.end - self.first_pos()
    }

    /// The key rows, read through the block table.
    pub fn keys(&self) -> PagedRows<'_> {
        self.paged(false)
    }

    /// The value rows, read through the block table.
    pub fn values(&self) -> PagedRows<'_> {
        self.paged(true)
    }

    fn paged(&self, values: bool) -> PagedRows<'_> {
        PagedRows {
            blocks: &self.blocks,
            first_block: self.first_block,
            block_size: self.block_size,
            width: if values { self.v_row } else { self.k_row },
            end: self.end,
            values,
        }
    }

    /// Block `b` (positions `b·block_size ..`), when it is stored and full.
    pub fn full_block(&self, b: usize) -> Option<&Arc<KvBlockData>> {
        if (b + 1) * self.block_size > self.end {
            return None;
        }
        b.checked_sub(self.first_block)
            .and_then(|i| self.blocks.get(i))
    }

    /// Makes an empty layer hold `blocks` as its full blocks `0 .. blocks.len()` (shared, not
    /// copied). `None` (nothing changed) when the layer is not empty or a block's shape does
    /// not match this layer's.
    pub fn adopt(&mut self, blocks: &[Arc<KvBlockData>]) -> Option<()> {
        let (kn, vn) = (self.block_size * self.k_row, self.block_size * self.v_row);
        if self.end != 0 || blocks.iter().any(|b| b.k.len() != kn || b.v.len() != vn) {
            return None;
        }
        self.blocks = blocks.to_vec();
        self.first_block = 0;
        self.end = blocks.len() * self.block_size;
        Some(())
    }

    /// Compacts a sliding layer at the start of a call, before it appends rows (see the module
    /// docs).
    pub fn begin_pass(&mut self) {
        if self.window.is_none() {
            return;
        }
        let rows = self.rows();
        if rows >= 2 * self.keep.max(32) {
            let drop = (rows - self.keep) / self.block_size;
            self.blocks.drain(..drop);
            self.first_block += drop;
        }
    }

    /// Appends the rows of `t = k.len() / k_row` consecutive positions (a shared block is
    /// copied before it is written).
    pub fn append(&mut self, k: &[f32], v: &[f32]) {
        let t = k.len() / self.k_row;
        debug_assert_eq!(k.len(), t * self.k_row);
        debug_assert_eq!(v.len(), t * self.v_row);
        let (kr, vr, bs) = (self.k_row, self.v_row, self.block_size);
        for i in 0..t {
            let pos = self.end + i;
            let b = pos / bs - self.first_block;
            if b == self.blocks.len() {
                self.blocks.push(Arc::new(KvBlockData {
                    k: vec![0.0; bs * kr],
                    v: vec![0.0; bs * vr],
                }));
            }
            let r = pos % bs;
            let block = Arc::make_mut(&mut self.blocks[b]);
            block.k[r * kr..(r + 1) * kr].copy_from_slice(&k[i * kr..(i + 1) * kr]);
            block.v[r * vr..(r + 1) * vr].copy_from_slice(&v[i * vr..(i + 1) * vr]);
        }
        self.end += t;
    }

    /// Whether truncating to `len ≤ end_pos()` leaves every row a later query needs: the rows
    /// `(len − W, len)` of a sliding layer must still be stored (always true for full layers and
    /// for `len == 0`).
    pub fn can_truncate(&self, len: usize) -> bool {
        if len > self.end {
            return false;
        }
        match self.window {
            None => true,
            Some(w) => len == 0 || self.first_pos() <= (len + 1).saturating_sub(w),
        }
    }

    /// Drops every position ≥ `len` (the caller checked [`LayerKv::can_truncate`], or `len` is
    /// at least the start of the pass that appended the rows). Blocks past the new end are
    /// released; rows of the last kept block past it are stale and never read.
    pub fn truncate(&mut self, len: usize) {
        if len == 0 {
            self.blocks.clear();
            self.first_block = 0;
            self.end = 0;
            return;
        }
        let len = len.clamp(self.first_pos(), self.end);
        let keep = len.div_ceil(self.block_size) - self.first_block;
        self.blocks.truncate(keep);
        self.end = len;
    }
}

/// The KV cache of all layers of one sequence.
#[derive(Debug, Clone)]
pub struct KvCache {
    pub layers: Vec<LayerKv>,
}
