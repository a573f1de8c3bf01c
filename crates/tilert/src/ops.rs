//! The dense ops of a decoder step on the GPU (`kernels/ops.cu`): one launch wrapper per op.
//!
//! Every op here has its one definition in `model::cpu::ops` (or `moe` for routing); the kernels
//! compute the same math in f32 (accumulation order may differ — the tests state tolerances) and
//! the tests in `tests/ops.rs` compare each with that CPU definition on random inputs.
//!
//! Conventions shared by every wrapper:
//! * activations are f32 row-major `[T, width]` with `T ≤ MAX_TOKENS` tokens;
//! * a wrapper only enqueues work on the given stream: no allocation, no host synchronisation,
//!   no host reads of device data — so a sequence of wrapper calls can be captured into a CUDA
//!   graph and replayed;
//! * values that change between replays of a graph (the position of the first token, token ids)
//!   are read by the kernels from device memory (`step`, `tokens`), never passed by value;
//! * `step` is a `DPtr<u32>` whose element 0 is the absolute position of token 0 of the pass;
//!   token `t` is at position `step[0] + t`.

use std::sync::Arc;

use cudarc::driver::{CudaContext, CudaStream};

use crate::arena::DPtr;
use crate::tensor::DeviceMatrix;
use crate::RuntimeError;

/// Most tokens one pass handles (verify blocks are 2..=16; prefill runs in chunks of this).
pub const MAX_TOKENS: usize = 16;

/// One attention layer's geometry, tables, weights and KV cache as the kernels need them.
#[derive(Debug, Clone, Copy)]
pub struct AttnArgs {
    pub n_heads: usize,
    pub n_kv_heads: usize,
    pub head_dim: usize,
    pub v_head_dim: usize,
    /// Rotary dims (≤ head_dim; `0` = no RoPE). NeoX half split over the first `rotary_dim` dims,
    /// as `model::cpu::ops::apply_rope`.
    pub rotary_dim: usize,
    /// `rotary_dim / 2` inverse frequencies (`model::cpu::rope::RopeTable::inv_freq`).
    pub inv_freq: DPtr<f32>,
    /// Multiplies cos and sin (YaRN attention factor; 1 otherwise).
    pub attention_factor: f32,
    /// Per-head RMSNorm weights `[head_dim]` applied to q / k before RoPE (Qwen3-MoE), with `eps`.
    pub q_norm: Option<DPtr<f32>>,
    pub k_norm: Option<DPtr<f32>>,
    pub eps: f32,
    /// v ← v · value_scale before it is cached (MiMo; 1 otherwise).
    pub value_scale: f32,
    /// Keys `[capacity, n_kv_heads, head_dim]` and values `[capacity, n_kv_heads, v_head_dim]`;
    /// position p lives in slot `p % capacity` (a ring for sliding layers; full layers have
    /// capacity ≥ the longest sequence).
    pub k_cache: DPtr<f32>,
    pub v_cache: DPtr<f32>,
    pub capacity: usize,
    /// Keys visible from the query at position p: `(p − window, p]`; `None` = all of `[0, p]`.
    pub window: Option<usize>,
    /// `[n_heads]` sink logits (gpt-oss, MiMo sliding layers).
    pub sinks: Option<DPtr<f32>>,
    /// Score scale, `1/sqrt(head_dim)`.
    pub scale: f32,
}

/// The routing variant of a MoE layer (mirrors `moe::RouterKind`; the gpt-oss router bias is
/// added by the router `linear`, as on the CPU).
#[derive(Debug, Clone, Copy)]
pub enum RouteArgs {
    GptOss,
    Qwen3 {
        norm_topk_prob: bool,
    },
    Sigmoid {
        correction_bias: Option<DPtr<f32>>,
        n_group: usize,
        topk_group: usize,
        norm_topk_prob: bool,
        routed_scaling_factor: f32,
    },
}

/// The gated activation (mirrors `model::config::Activation`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum GluArgs {
    ClampedSwiglu { alpha: f32, limit: f32 },
    Swiglu,
}

/// Sampling parameters applied on the device (same meaning as `model::sampling`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SampleArgs {
    /// > 0 (greedy decoding uses [`Ops::argmax`]).
    pub temperature: f32,
    /// 0 = off.
    pub top_k: usize,
    /// 1.0 = off.
    pub top_p: f32,
    /// 0.0 = off.
    pub min_p: f32,
}

/// The loaded `ops` kernels.
pub struct Ops {
    _private: (),
}

impl Ops {
    /// Loads `kernels/ops.cu`'s image into `ctx`.
    pub fn load(_ctx: &Arc<CudaContext>) -> Result<Self, RuntimeError> {
        unimplemented!("ops kernels")
    }

    /// `x[t] = table[tokens[t]]` for `t < T` (`table` `[V, H]`, `x` `[T, H]`).
    pub fn embed(
        &self,
        _s: &CudaStream,
        _table: &DeviceMatrix,
        _tokens: DPtr<u32>,
        _t: usize,
        _x: DPtr<f32>,
    ) -> Result<(), RuntimeError> {
        unimplemented!()
    }

    /// `out[r] = rms_norm(x[r]) ⊙ w` for `rows` rows of width `n` (`model::cpu::ops::rms_norm`).
    #[allow(clippy::too_many_arguments)]
    pub fn rms_norm(
        &self,
        _s: &CudaStream,
        _x: DPtr<f32>,
        _w: DPtr<f32>,
        _rows: usize,
        _n: usize,
        _eps: f32,
        _out: DPtr<f32>,
    ) -> Result<(), RuntimeError> {
        unimplemented!()
    }

    /// `y[t] = W · x[t] (+ bias)` for `t < T ≤ MAX_TOKENS`; with `accumulate`, `y[t] += ...`
    /// instead (the residual add of the O projection). `x` `[T, cols]`, `y` `[T, rows]`.
    #[allow(clippy::too_many_arguments)]
    pub fn linear(
        &self,
        _s: &CudaStream,
        _w: &DeviceMatrix,
        _bias: Option<DPtr<f32>>,
        _x: DPtr<f32>,
        _t: usize,
        _y: DPtr<f32>,
        _accumulate: bool,
    ) -> Result<(), RuntimeError> {
        unimplemented!()
    }

    /// From the fused projection `qkv` `[T, n_heads·d + n_kv·d + n_kv·dv]` (q | k | v): q/k
    /// norm, RoPE of q and k at positions `step[0] + t`, v·value_scale; writes q to `q_out`
    /// `[T, n_heads·d]` and k, v into the cache slots of those positions.
    pub fn rope_kv_write(
        &self,
        _s: &CudaStream,
        _a: &AttnArgs,
        _qkv: DPtr<f32>,
        _t: usize,
        _step: DPtr<u32>,
        _q_out: DPtr<f32>,
    ) -> Result<(), RuntimeError> {
        unimplemented!()
    }

    /// Scratch elements [`Ops::attention`] needs for `t` queries over at most `max_keys` keys.
    pub fn attention_scratch_len(_a: &AttnArgs, _t: usize, _max_keys: usize) -> usize {
        unimplemented!()
    }

    /// Attention of the `t` queries `q` `[T, n_heads·d]` (positions `step[0] + t`) over the
    /// cache (which already holds them): GQA, sinks, sliding window. `causal`: query t sees keys
    /// up to its own position; otherwise every query sees keys up to position `step[0] + T − 1`
    /// (a drafter's bidirectional block) — the window still counts back from the query's own
    /// position. `out` `[T, n_heads·dv]`.
    #[allow(clippy::too_many_arguments)]
    pub fn attention(
        &self,
        _s: &CudaStream,
        _a: &AttnArgs,
        _q: DPtr<f32>,
        _t: usize,
        _step: DPtr<u32>,
        _causal: bool,
        _max_keys: usize,
        _scratch: DPtr<f32>,
        _out: DPtr<f32>,
    ) -> Result<(), RuntimeError> {
        unimplemented!()
    }

    /// Routing of `t` tokens from router logits `[T, E]`: `ids` `[T, k]` (i32) and `weights`
    /// `[T, k]`, in the order and with the values of `moe::route_into`.
    #[allow(clippy::too_many_arguments)]
    pub fn route(
        &self,
        _s: &CudaStream,
        _kind: &RouteArgs,
        _logits: DPtr<f32>,
        _t: usize,
        _n_experts: usize,
        _k: usize,
        _ids: DPtr<i32>,
        _weights: DPtr<f32>,
    ) -> Result<(), RuntimeError> {
        unimplemented!()
    }

    /// The MoE combine and residual add: `x[t] += Σ_j y[t][j]`, `y` `[T, k, H]` (already
    /// weighted), the k terms summed from 0 in ascending expert id (`ids` `[T, k]`), as
    /// `model::cpu::ffn::moe_block`.
    #[allow(clippy::too_many_arguments)]
    pub fn combine(
        &self,
        _s: &CudaStream,
        _x: DPtr<f32>,
        _y: DPtr<f32>,
        _ids: DPtr<i32>,
        _t: usize,
        _k: usize,
        _h: usize,
    ) -> Result<(), RuntimeError> {
        unimplemented!()
    }

    /// `out[t] = glu(gate_up[t])` for a dense MLP: `gate_up` `[T, 2I]` in halves order (rows
    /// 0..I gate, I..2I up), `out` `[T, I]` (`model::cpu::ops::glu`).
    #[allow(clippy::too_many_arguments)]
    pub fn glu(
        &self,
        _s: &CudaStream,
        _act: GluArgs,
        _gate_up: DPtr<f32>,
        _t: usize,
        _i: usize,
        _out: DPtr<f32>,
    ) -> Result<(), RuntimeError> {
        unimplemented!()
    }

    /// `out[t] = argmax(logits[t])` over `v` values (lowest index on ties), `t < T`.
    pub fn argmax(
        &self,
        _s: &CudaStream,
        _logits: DPtr<f32>,
        _t: usize,
        _v: usize,
        _out: DPtr<u32>,
    ) -> Result<(), RuntimeError> {
        unimplemented!()
    }

    /// Samples one token from `logits` `[v]` with temperature / top-k / top-p / min-p, driven by
    /// the uniform number `uniform[0]` in [0, 1) (device memory, so a graph can replay it);
    /// writes the token to `out[0]`.
    #[allow(clippy::too_many_arguments)]
    pub fn sample(
        &self,
        _s: &CudaStream,
        _logits: DPtr<f32>,
        _v: usize,
        _p: &SampleArgs,
        _uniform: DPtr<f32>,
        _out: DPtr<u32>,
    ) -> Result<(), RuntimeError> {
        unimplemented!()
    }

    /// Fills `out` with uniform values in `[-scale, scale)` from `seed` (synthetic weights,
    /// benchmark inputs). Deterministic for a given seed and length.
    pub fn fill_uniform_bf16(
        &self,
        _s: &CudaStream,
        _out: DPtr<half::bf16>,
        _scale: f32,
        _seed: u64,
    ) -> Result<(), RuntimeError> {
        unimplemented!()
    }

    /// [`Ops::fill_uniform_bf16`] for f32.
    pub fn fill_uniform_f32(
        &self,
        _s: &CudaStream,
        _out: DPtr<f32>,
        _scale: f32,
        _seed: u64,
    ) -> Result<(), RuntimeError> {
        unimplemented!()
    }

    /// Fills `out` with bytes uniform in `lo..=hi` (random MXFP4 codes: 0..=255; scales: a
    /// narrow exponent range).
    pub fn fill_bytes(
        &self,
        _s: &CudaStream,
        _out: DPtr<u8>,
        _lo: u8,
        _hi: u8,
        _seed: u64,
    ) -> Result<(), RuntimeError> {
        unimplemented!()
    }
}
