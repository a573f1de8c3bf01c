//! The KV-cache ops of a **batched decode** pass (`kernels/rope.cu`, `kernels/attention.cu`): a pass of
//! `T ≤ MAX_TOKENS` rows where row `t` is the next token of its own sequence.
//!
//! Every other op of such a pass is the ordinary `T`-token op of [`super::Ops`] (embedding, norms,
//! projections, router, experts, LM head treat rows independently). Only the three ops that touch
//! a sequence's cache differ: [`RowOps::rope_kv_write`], [`RowOps::linear_qkv_rope`] and
//! [`RowOps::attention`] read, per row, the row's KV cache, its position and its attention key
//! splits from a **row table** in device memory — [`KvRow`]s, one per row, written before each
//! pass (so one captured graph per `T` serves any set of sequences). They share their device code
//! with the single-sequence kernels ([`super::Ops::rope_kv_write`], [`super::Ops::linear_qkv_rope`],
//! [`super::Ops::attention`]) and compute a row exactly as those compute a one-token pass of that
//! sequence with the same key splits: the results are bit-identical.
//!
//! Several rows may belong to one sequence: a **verify block** of `B` tokens of a sequence of
//! length `len` is `B` rows at positions `len .. len + B`, all naming the sequence's cache. The
//! KV write of the pass stores every row's key and value before attention runs, and a row's
//! attention sees the keys up to its own position, so the block is causal inside itself exactly
//! as a `B`-token pass of that sequence; with that pass's key splits ([`block_splits`]) each row
//! is bit-identical to it. One pass thus carries single-token rows of plain sequences and the
//! verify blocks of speculative ones (`exec::GpuBatch::forward_device`).
//!
//! A row's cache is contiguous or paged ([`KvRow::paged`]: a block pool read and written through
//! the row's block table), so one pass can mix sequences of both kinds.
//!
//! In these ops the cache fields of [`AttnArgs`] (`k_cache`, `v_cache`, `capacity`, `paging`) are unused:
//! only its geometry, tables and weights are read.

use std::sync::Arc;

use cudarc::driver::{CudaFunction, CudaStream};
use ultra_kernels::KernelSet;

use super::{
    att_smem_bytes, attention_splits, attention_warps, check_attn, check_attn_geometry, check_len,
    check_rope_geometry, check_rope_kv_input, check_tokens, invalid, launch,
    launch_linear_qkv_rope, launch_with_smem, load_attention, load_bucketed, paging_block_size,
    paging_blocks, rope_kv_args, u32_arg, AttnArgs, Ops, ATT_COUNTERS, ATT_MAX_SPLITS,
    LINEAR_TOKENS,
};
use crate::abi::{self, RopeOut, RopeOutRows};
use crate::arena::DPtr;
use crate::tensor::DeviceMatrix;
use crate::RuntimeError;

/// `u64` words of one [`KvRow`] in a row table (`struct KvRow` of `kernels/common/abi.cuh`).
pub const KV_ROW_WORDS: usize = abi::KV_ROW_WORDS;

/// One row of a batched pass for one layer: that row's sequence's cache of the layer, the
/// position of the row's token and the key splits its attention uses.
#[derive(Debug, Clone, Copy)]
pub struct KvRow {
    k_cache: DPtr<f32>,
    v_cache: DPtr<f32>,
    capacity: u32,
    pos: u32,
    splits: u32,
    /// The block table (0: contiguous) and its block size (the capacity when contiguous).
    blocks: u64,
    block_size: u32,
}

impl KvRow {
    /// The row of the token at `pos` over a cache of `capacity` slots (position p in slot
    /// `p % capacity`) laid out as `a`'s geometry, its attention cut into `splits` key splits
    /// (1..=[`max_splits`]; [`decode_splits`] gives the ones a one-token pass of the sequence
    /// uses). Checks the cache sizes, so a table of `KvRow`s never sends a kernel out of bounds.
    pub fn new(
        a: &AttnArgs,
        k_cache: DPtr<f32>,
        v_cache: DPtr<f32>,
        capacity: usize,
        pos: usize,
        splits: usize,
    ) -> Result<Self, RuntimeError> {
        Self::paged(a, k_cache, v_cache, capacity, None, pos, splits)
    }

    /// [`KvRow::new`] for a cache of `capacity` logical slots that is, with `paging`, a pool of
    /// blocks read and written through the block table ([`super::KvPaging`]; `k_cache` /
    /// `v_cache` then hold the pool), or else contiguous. The row computes exactly what the
    /// contiguous row of the same keys computes.
    pub fn paged(
        a: &AttnArgs,
        k_cache: DPtr<f32>,
        v_cache: DPtr<f32>,
        capacity: usize,
        paging: Option<super::KvPaging>,
        pos: usize,
        splits: usize,
    ) -> Result<Self, RuntimeError> {
        let kv = AttnArgs {
            k_cache,
            v_cache,
            capacity,
            paging,
            ..*a
        };
        check_attn("KvRow", &kv)?;
        if splits == 0 || splits > ATT_MAX_SPLITS {
            return Err(invalid(format!(
                "KvRow: {splits} key splits (1..={ATT_MAX_SPLITS})"
            )));
        }
        Ok(Self {
            k_cache,
            v_cache,
            capacity: u32_arg("KV cache capacity", capacity)?,
            pos: u32_arg("position", pos)?,
            splits: splits as u32,
            blocks: paging_blocks(&kv),
            block_size: paging_block_size(&kv),
        })
    }

    /// The row as the kernels read it.
    pub fn words(&self) -> [u64; KV_ROW_WORDS] {
        abi::KvRow {
            k_cache: self.k_cache.addr(),
            v_cache: self.v_cache.addr(),
            capacity: self.capacity,
            pos: self.pos,
            splits: self.splits,
            block_size: self.block_size,
            blocks: self.blocks,
        }
        .words()
    }

    pub fn splits(&self) -> usize {
        self.splits as usize
    }
}

/// The most key splits a row may use.
pub const fn max_splits() -> usize {
    ATT_MAX_SPLITS
}

/// The key splits [`Ops::attention`] uses for a one-token pass (a decode step) whose keys are
/// sized by `max_keys`: a row with these splits is computed exactly as that pass computes it.
pub fn decode_splits(a: &AttnArgs, max_keys: usize) -> usize {
    block_splits(a, 1, max_keys)
}

/// The key splits [`Ops::attention`] uses for a pass of `width` tokens of one sequence (a verify
/// block; 1: a decode step) whose keys are sized by `max_keys`: the rows of such a block, given
/// these splits and positions `len ..= len + width − 1`, are computed exactly as that pass
/// computes them (causal inside the block: row `j` sees the block's keys up to its own
/// position, written by the same batched pass before its attention).
pub fn block_splits(a: &AttnArgs, width: usize, max_keys: usize) -> usize {
    attention_splits(a, width.max(1), max_keys)
}

/// The loaded batched-decode kernels (from the same module image as [`Ops`]).
pub struct RowOps {
    _module: Arc<KernelSet>,
    rope_kv_write: CudaFunction,
    qkv_rope_bf16: [CudaFunction; LINEAR_TOKENS.len()],
    qkv_rope_f32: [CudaFunction; LINEAR_TOKENS.len()],
    attention: CudaFunction,
}

fn check_rows(op: &str, rows: DPtr<u64>, t: usize) -> Result<(), RuntimeError> {
    check_tokens(op, t)?;
    check_len(&format!("{op}: row table"), rows, t * KV_ROW_WORDS)
}

impl RowOps {
    /// The batched-decode kernels of `ops`' module.
    pub fn load(ops: &Ops) -> Result<Self, RuntimeError> {
        let module = ops._module.clone();
        let f = |name: &str| module.load_function(name);
        Ok(Self {
            rope_kv_write: f("rope_kv_write_rows")?,
            qkv_rope_bf16: load_bucketed(&module, "linear_qkv_rope_rows_bf16")?,
            qkv_rope_f32: load_bucketed(&module, "linear_qkv_rope_rows_f32")?,
            attention: load_attention(&module, "attention_gqa_rows")?,
            _module: module,
        })
    }

    /// [`Ops::rope_kv_write`] for `t` rows: row `t`'s q/k norm, RoPE at its position and k, v
    /// into its cache, all from `rows` (`t` [`KvRow`]s, as [`KvRow::words`]).
    pub fn rope_kv_write(
        &self,
        s: &CudaStream,
        a: &AttnArgs,
        qkv: DPtr<f32>,
        t: usize,
        rows: DPtr<u64>,
        q_out: DPtr<f32>,
    ) -> Result<(), RuntimeError> {
        check_rows("rope_kv_write_rows", rows, t)?;
        check_attn_geometry("rope_kv_write_rows", a)?;
        check_rope_geometry("rope_kv_write_rows", a)?;
        check_len(
            "rope_kv_write_rows: q_out",
            q_out,
            t * a.n_heads * a.head_dim,
        )?;
        check_rope_kv_input("rope_kv_write_rows", a, qkv, t)?;
        let mut args = vec![qkv.addr().into(), rows.addr().into()];
        args.extend(rope_kv_args(a, q_out));
        let heads = u32_arg("heads", a.n_heads + 2 * a.n_kv_heads)?;
        launch(s, &self.rope_kv_write, (heads, t as u32, 1), 128, &args)
    }

    /// [`Ops::linear_qkv_rope`] for `t` rows: the fused projection, then row `t`'s RoPE at its
    /// position and k, v into its cache, from `rows`. Same weight layout and requirements.
    #[allow(clippy::too_many_arguments)]
    pub fn linear_qkv_rope(
        &self,
        s: &CudaStream,
        w: &DeviceMatrix,
        bias: Option<DPtr<f32>>,
        x: DPtr<f32>,
        t: usize,
        a: &AttnArgs,
        rows: DPtr<u64>,
        q_out: DPtr<f32>,
    ) -> Result<(), RuntimeError> {
        let op = "linear_qkv_rope_rows";
        check_rows(op, rows, t)?;
        check_attn_geometry(op, a)?;
        check_rope_geometry(op, a)?;
        check_len(&format!("{op}: q_out"), q_out, t * a.n_heads * a.head_dim)?;
        let kernels = (&self.qkv_rope_bf16, &self.qkv_rope_f32);
        launch_linear_qkv_rope(s, op, kernels, w, bias, x, t, a, q_out, |ro| {
            // Each row's cache comes from the row table.
            let ro = RopeOut {
                k_cache: 0,
                v_cache: 0,
                capacity: 0,
                blocks: 0,
                block_size: 0,
                ..ro
            };
            super::Arg::RopeRows(RopeOutRows {
                ro,
                rows: rows.addr(),
            })
        })
    }

    /// Scratch elements [`RowOps::attention`] needs for `t` rows of at most `max_splits` splits.
    pub fn attention_scratch_len(a: &AttnArgs, t: usize, max_splits: usize) -> usize {
        ATT_COUNTERS + t * a.n_heads * max_splits * (a.v_head_dim + 2)
    }

    /// Causal decode attention of row `t`'s query `q[t]` (at the row's position) over the row's
    /// own cache, with the row's key splits (each ≤ `max_splits`, the launch's grid): exactly
    /// [`Ops::attention`] of a one-token pass of that sequence with those splits. `out`
    /// `[T, n_heads·dv]`; `scratch` as [`Ops::attention`]'s (counters zero between launches).
    #[allow(clippy::too_many_arguments)]
    pub fn attention(
        &self,
        s: &CudaStream,
        a: &AttnArgs,
        q: DPtr<f32>,
        t: usize,
        rows: DPtr<u64>,
        max_splits: usize,
        scratch: DPtr<f32>,
        out: DPtr<f32>,
    ) -> Result<(), RuntimeError> {
        let op = "attention_rows";
        check_rows(op, rows, t)?;
        check_attn_geometry(op, a)?;
        let (nh, d, dv) = (a.n_heads, a.head_dim, a.v_head_dim);
        if max_splits == 0 || max_splits > ATT_MAX_SPLITS {
            return Err(invalid(format!(
                "{op}: {max_splits} key splits (1..={ATT_MAX_SPLITS})"
            )));
        }
        check_len(&format!("{op}: q"), q, t * nh * d)?;
        check_len(&format!("{op}: out"), out, t * nh * dv)?;
        check_len(
            &format!("{op}: scratch"),
            scratch,
            Self::attention_scratch_len(a, t, max_splits),
        )?;
        if let Some(sk) = a.sinks {
            check_len(&format!("{op}: sinks"), sk, nh)?;
        }
        let warps = attention_warps(a);
        launch_with_smem(
            s,
            &self.attention,
            (max_splits as u32, a.n_kv_heads as u32, t as u32),
            32 * warps as u32,
            att_smem_bytes(d, dv, warps) as u32,
            &[
                q.addr().into(),
                rows.addr().into(),
                u32_arg("heads", nh)?.into(),
                (a.n_kv_heads as u32).into(),
                (d as u32).into(),
                (dv as u32).into(),
                (a.window.unwrap_or(0) as u32).into(),
                a.scale.into(),
                crate::arena::addr_or_null(a.sinks).into(),
                scratch.addr().into(),
                out.addr().into(),
            ],
        )
    }
}
