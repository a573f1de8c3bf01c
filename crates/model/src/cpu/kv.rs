//! The f32 KV cache of one sequence.
//!
//! Each layer stores keys and values of consecutive absolute positions `base .. end` as rows
//! (`[n_kv_heads · head_dim]` for k, `[n_kv_heads · v_head_dim]` for v), already RoPE'd and
//! value-scaled.
//!
//! * Full-attention layers keep everything (`base` stays 0).
//! * Sliding-window layers keep a bounded suffix. A query at position p reads `(p − W, p]`, so
//!   a call (prefill / decode / verify) starting at position s needs rows from `s − W + 1` on,
//!   and a later truncation back to `len ≥ s − R` needs rows from `len − W + 1 ≥ s − R − W + 1`
//!   on (`R` = the session's `max_rollback`). At the start of every call
//!   ([`LayerKv::begin_pass`]) a sliding layer holding at least `2·max(C, 32)` rows,
//!   `C = W − 1 + R`, drops its oldest rows so that exactly `C` remain — i.e. it keeps
//!   `s − W + 1 − R ..`, everything both needs can reach. Rows are never dropped anywhere else.
//!
//! This is a contiguous "sliding buffer" with amortized O(1) compaction rather than a ring: it
//! holds at most `2·max(C, 32)` rows plus the rows of the current call, attention reads one
//! contiguous slice, and no key is ever overwritten while a query of the same call or a
//! permitted truncation could still need it. Exactness is checked, not assumed:
//! [`LayerKv::can_truncate`] says whether the rows a truncated cache would need are present.

/// One layer's keys and values.
#[derive(Debug, Clone)]
pub struct LayerKv {
    k: Vec<f32>,
    v: Vec<f32>,
    k_row: usize,
    v_row: usize,
    /// Absolute position of row 0.
    base: usize,
    /// Absolute position after the last row.
    end: usize,
    /// `Some(W)` for sliding layers.
    window: Option<usize>,
    /// Rows a sliding layer keeps at compaction (`W − 1 + max_rollback`).
    keep: usize,
}

impl LayerKv {
    /// An empty layer cache. `window` is the layer's sliding window (None for full attention);
    /// `max_rollback` the truncation depth that must always stay exact.
    pub fn new(k_row: usize, v_row: usize, window: Option<usize>, max_rollback: usize) -> Self {
        LayerKv {
            k: Vec::new(),
            v: Vec::new(),
            k_row,
            v_row,
            base: 0,
            end: 0,
            window,
            keep: window.map_or(0, |w| w.saturating_sub(1) + max_rollback),
        }
    }

    /// Absolute position of the oldest stored row.
    pub fn first_pos(&self) -> usize {
        self.base
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
        self.end - self.base
    }

    /// All stored key rows (positions `first_pos() .. end_pos()`).
    pub fn keys(&self) -> &[f32] {
        &self.k
    }

    /// All stored value rows.
    pub fn values(&self) -> &[f32] {
        &self.v
    }

    /// Compacts a sliding layer at the start of a call, before it appends rows (see the module
    /// docs).
    pub fn begin_pass(&mut self) {
        if self.window.is_none() {
            return;
        }
        let rows = self.rows();
        if rows >= 2 * self.keep.max(32) {
            let drop = rows - self.keep;
            self.k.drain(..drop * self.k_row);
            self.v.drain(..drop * self.v_row);
            self.base += drop;
        }
    }

    /// Appends the rows of `t = k.len() / k_row` consecutive positions.
    pub fn append(&mut self, k: &[f32], v: &[f32]) {
        let t = k.len() / self.k_row;
        debug_assert_eq!(k.len(), t * self.k_row);
        debug_assert_eq!(v.len(), t * self.v_row);
        self.k.extend_from_slice(k);
        self.v.extend_from_slice(v);
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
            Some(w) => len == 0 || self.base <= (len + 1).saturating_sub(w),
        }
    }

    /// Drops every position ≥ `len` (the caller checked [`LayerKv::can_truncate`], or `len` is
    /// at least the start of the pass that appended the rows).
    pub fn truncate(&mut self, len: usize) {
        if len == 0 {
            self.k.clear();
            self.v.clear();
            self.base = 0;
            self.end = 0;
            return;
        }
        let len = len.clamp(self.base, self.end);
        let rows = len - self.base;
        self.k.truncate(rows * self.k_row);
        self.v.truncate(rows * self.v_row);
        self.end = len;
    }
}

/// The KV cache of all layers of one sequence.
#[derive(Debug, Clone)]
pub struct KvCache {
    pub layers: Vec<LayerKv>,
}
