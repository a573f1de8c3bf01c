//! The dense ops of a decoder step on the GPU (the op families `kernels/{fill,embed,norm,linear,
//! rope,attention,moe,router,sampling}.cu`, loaded as one `ultra_kernels::KernelSet`): one launch
//! wrapper per op. Structs passed by value and kernel limits: [`crate::abi`].
//!
//! Every op here has its one definition in the CPU reference executor (`model`'s `cpu::ops`,
//! or `moe` for routing); the kernels
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

use std::ffi::c_void;

use cudarc::driver::sys::CUfunction_attribute;
use cudarc::driver::{CudaContext, CudaFunction, CudaStream};
use ultra_kernels::KernelSet;

use crate::abi::{
    RopeOut, RopeOutRows, RouteSpec, ATT_MAX_SPLITS, ATT_MAX_WARPS, ATT_TILE, LINEAR_THREADS,
    MAX_EXPERTS, MAX_HEAD_DIM, MAX_TOPK, ROUTER_THREADS, SAMPLE_MAX_ROWS, SAMPLE_THREADS,
};
use crate::arena::DPtr;
use crate::tensor::{DenseData, DeviceMatrix};
use crate::RuntimeError;

pub mod proj;
pub mod rows;

pub use crate::abi::MAX_TOKENS;

/// One attention layer's geometry, tables, weights and KV cache as the kernels need them.
#[derive(Debug, Clone, Copy)]
pub struct AttnArgs {
    pub n_heads: usize,
    pub n_kv_heads: usize,
    pub head_dim: usize,
    pub v_head_dim: usize,
    /// Rotary dims (≤ head_dim; `0` = no RoPE). NeoX half split over the first `rotary_dim` dims,
    /// as the CPU's `cpu::ops::apply_rope`.
    pub rotary_dim: usize,
    /// `rotary_dim / 2` inverse frequencies (the CPU's `cpu::rope::RopeTable::inv_freq`).
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
    /// capacity ≥ the longest sequence). With `paging`, the caches are a pool of blocks and slot
    /// i is read and written through the block table (see [`KvPaging`]).
    pub k_cache: DPtr<f32>,
    pub v_cache: DPtr<f32>,
    pub capacity: usize,
    /// The block table of a paged cache; `None`: contiguous.
    pub paging: Option<KvPaging>,
    /// Keys visible from the query at position p: `(p − window, p]`; `None` = all of `[0, p]`.
    pub window: Option<usize>,
    /// `[n_heads]` sink logits (gpt-oss, MiMo sliding layers).
    pub sinks: Option<DPtr<f32>>,
    /// Score scale, `1/sqrt(head_dim)`.
    pub scale: f32,
}

/// A paged KV cache (`kernels/common/kv.cuh`): `k_cache` / `v_cache` of [`AttnArgs`] are a pool
/// of `pool_blocks` blocks of `block_size` slots each, and the cache's `capacity` logical slots
/// (a multiple of `block_size`) are cut into `capacity / block_size` logical blocks, logical
/// block j in pool block `blocks[j]`: slot i is pool row `blocks[i / block_size] · block_size +
/// i % block_size`. The identity table is the contiguous layout. Only addresses change (never
/// which keys a query reads, nor the order), so results equal the contiguous cache's bit for bit.
///
/// The table lives in device memory and the kernels do not range-check its entries: whoever
/// writes it checks them first ([`check_block_ids`]).
#[derive(Debug, Clone, Copy)]
pub struct KvPaging {
    /// `capacity / block_size` pool block ids (`u32`).
    pub blocks: DPtr<u32>,
    pub block_size: usize,
    pub pool_blocks: usize,
}

/// Checks a block table's entries against a pool of `pool_blocks` blocks before it is written to
/// the device (a [`KvPaging`] table).
pub fn check_block_ids(op: &str, ids: &[u32], pool_blocks: usize) -> Result<(), RuntimeError> {
    match ids.iter().position(|&b| b as usize >= pool_blocks) {
        Some(i) => Err(invalid(format!(
            "{op}: block table entry {i} is block {} of a pool of {pool_blocks}",
            ids[i]
        ))),
        None => Ok(()),
    }
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

impl RouteArgs {
    /// The routing of a plan's `norm_router_topk` op (`model::plan::RouterParams::kind`), with
    /// the layer's selection-only correction bias on the device (sigmoid routers).
    pub fn of(kind: model::config::RouterSpec, correction_bias: Option<DPtr<f32>>) -> Self {
        use model::config::RouterSpec;
        match kind {
            RouterSpec::GptOss => RouteArgs::GptOss,
            RouterSpec::Qwen3 { norm_topk_prob } => RouteArgs::Qwen3 { norm_topk_prob },
            RouterSpec::Sigmoid {
                n_group,
                topk_group,
                norm_topk_prob,
                routed_scaling_factor,
            } => RouteArgs::Sigmoid {
                correction_bias,
                n_group,
                topk_group,
                norm_topk_prob,
                routed_scaling_factor,
            },
        }
    }
}

/// The gated activation (mirrors `model::config::Activation`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum GluArgs {
    ClampedSwiglu { alpha: f32, limit: f32 },
    Swiglu,
}

impl From<model::config::Activation> for GluArgs {
    /// The GLU of a plan's `experts_gate_up` / `mlp_gate_up` op.
    fn from(a: model::config::Activation) -> Self {
        match a {
            model::config::Activation::ClampedSwiglu { alpha, limit } => {
                GluArgs::ClampedSwiglu { alpha, limit }
            }
            model::config::Activation::Swiglu => GluArgs::Swiglu,
        }
    }
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

/// The kernels of one weight type of [`Ops::linear`]: `[token bucket][rows per warp]`.
type LinearTable = [[CudaFunction; LINEAR_ROWS.len()]; LINEAR_TOKENS.len()];

/// Token-count buckets of the vectorised linear kernels (a pass of `t` tokens uses the
/// smallest bucket ≥ t).
const LINEAR_TOKENS: [usize; 5] = [1, 2, 4, 8, 16];
/// Rows per warp of the vectorised linear kernels.
const LINEAR_ROWS: [usize; 3] = [1, 2, 4];
/// Attention split counters at the start of the scratch: `[MAX_TOKENS][n_kv_heads ≤ 64]`.
const ATT_COUNTERS: usize = MAX_TOKENS * ATT_MAX_KV_HEADS;
const ATT_MAX_KV_HEADS: usize = 64;
/// Attention blocks aimed for per launch (two per SM of an H100's 132).
const ATT_TARGET_BLOCKS: usize = 264;
/// Keys per split aimed for at `max_keys`.
const ATT_SPLIT_KEYS: usize = 256;
/// Most blocks of the fused router (each takes `ceil(E / blocks)` expert rows).
const ROUTER_MAX_BLOCKS: usize = 64;
/// Blocks of the argmax (each scans a chunk of the vocabulary; the last merges) and its
/// scratch: `MAX_TOKENS` counters, then `[T][blocks]` (value, index) pairs.
const ARGMAX_BLOCKS: usize = 128;
/// Elements of the scratch [`Ops::argmax`] needs.
pub const ARGMAX_SCRATCH: usize = MAX_TOKENS + MAX_TOKENS * ARGMAX_BLOCKS * 2;
/// Blocks of the grid-stride fill kernels.
const FILL_BLOCKS: usize = 1056;

/// One kernel argument (device addresses are `U64`).
#[derive(Clone, Copy)]
enum Arg {
    U64(u64),
    U32(u32),
    F32(f32),
    Route(RouteSpec),
    Rope(RopeOut),
    RopeRows(RopeOutRows),
}

impl From<RopeOut> for Arg {
    fn from(v: RopeOut) -> Self {
        Arg::Rope(v)
    }
}

impl From<RouteSpec> for Arg {
    fn from(v: RouteSpec) -> Self {
        Arg::Route(v)
    }
}
impl From<u64> for Arg {
    fn from(v: u64) -> Self {
        Arg::U64(v)
    }
}
impl From<u32> for Arg {
    fn from(v: u32) -> Self {
        Arg::U32(v)
    }
}
impl From<f32> for Arg {
    fn from(v: f32) -> Self {
        Arg::F32(v)
    }
}

/// Enqueues `f` with `args` (which must match the kernel's parameter list in kernels/*.cu).
/// One kernel per token bucket: `{name}_t{T}` for each `T` of [`LINEAR_TOKENS`].
fn load_bucketed(
    module: &KernelSet,
    name: &str,
) -> Result<[CudaFunction; LINEAR_TOKENS.len()], RuntimeError> {
    let fs = LINEAR_TOKENS
        .iter()
        .map(|tt| module.load_function(&format!("{name}_t{tt}")))
        .collect::<Result<Vec<_>, _>>()?;
    Ok(<[CudaFunction; LINEAR_TOKENS.len()]>::try_from(fs)
        .unwrap_or_else(|_| unreachable!("one kernel per bucket")))
}

/// An attention kernel, allowed the dynamic shared memory of the largest head and warp count.
fn load_attention(module: &KernelSet, name: &str) -> Result<CudaFunction, RuntimeError> {
    let attention = module.load_function(name)?;
    attention.set_attribute(
        CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
        att_smem_bytes(MAX_HEAD_DIM, MAX_HEAD_DIM, ATT_MAX_WARPS) as i32,
    )?;
    Ok(attention)
}

/// What `linear_qkv_rope` and its per-row variant share after their position checks: the layer
/// and weight checks (`op` names the op in errors), then the launch of the token bucket's kernel
/// of `kernels` (bf16, f32) over the projection's rows, whose last argument `epilogue` makes
/// from the layer's [`RopeOut`] (position source `step` 0: the caller sets it).
#[allow(clippy::too_many_arguments)]
fn launch_linear_qkv_rope(
    s: &CudaStream,
    op: &str,
    kernels: (
        &[CudaFunction; LINEAR_TOKENS.len()],
        &[CudaFunction; LINEAR_TOKENS.len()],
    ),
    w: &DeviceMatrix,
    bias: Option<DPtr<f32>>,
    x: DPtr<f32>,
    t: usize,
    a: &AttnArgs,
    q_out: DPtr<f32>,
    epilogue: impl FnOnce(RopeOut) -> Arg,
) -> Result<(), RuntimeError> {
    let (nh, nkv, d, dv) = (a.n_heads, a.n_kv_heads, a.head_dim, a.v_head_dim);
    if a.q_norm.is_some() || a.k_norm.is_some() {
        return Err(invalid(format!(
            "{op}: layers with q/k norm take linear + rope_kv_write"
        )));
    }
    if !rope_pairs_fit(d, a.rotary_dim) {
        return Err(invalid(format!(
            "{op}: rotary_dim {} with head_dim {d}",
            a.rotary_dim
        )));
    }
    let (addr, bf16) = matrix_data("qkv weight", w)?;
    let rows = nh * d + nkv * d + nkv * dv;
    if w.rows != rows || !w.cols.is_multiple_of(8) || !x.addr().is_multiple_of(16) {
        return Err(invalid(format!(
            "{op}: {}x{} weight for {rows} q/k/v rows (cols a multiple of 8, x 16-byte aligned)",
            w.rows, w.cols
        )));
    }
    check_len(&format!("{op}: x"), x, t * w.cols)?;
    if let Some(b) = bias {
        check_len(&format!("{op}: bias"), b, rows)?;
    }
    let bucket = token_bucket(t);
    let f = if bf16 {
        &kernels.0[bucket]
    } else {
        &kernels.1[bucket]
    };
    let ro = RopeOut {
        step: 0,
        inv_freq: a.inv_freq.addr(),
        q_out: q_out.addr(),
        k_cache: a.k_cache.addr(),
        v_cache: a.v_cache.addr(),
        nh: nh as u32,
        nkv: nkv as u32,
        d: d as u32,
        dv: dv as u32,
        rot: a.rotary_dim as u32,
        capacity: a.capacity as u32,
        attn_factor: a.attention_factor,
        value_scale: a.value_scale,
        blocks: paging_blocks(a),
        block_size: paging_block_size(a),
        _pad: 0,
    };
    let warps = rows.div_ceil(2);
    let blocks = u32_arg(
        "linear blocks",
        warps.div_ceil(LINEAR_THREADS as usize / 32),
    )?;
    launch(
        s,
        f,
        (blocks, 1, 1),
        LINEAR_THREADS,
        &[
            addr.into(),
            crate::arena::addr_or_null(bias).into(),
            x.addr().into(),
            u32_arg("qkv rows", rows)?.into(),
            u32_arg("qkv cols", w.cols)?.into(),
            (t as u32).into(),
            epilogue(ro),
        ],
    )
}

/// `rope_kv_write` / `rope_kv_write_rows`: the fused projection `qkv` holds `t` rows and the
/// q/k norm weights (if any) one head each.
fn check_rope_kv_input(
    name: &str,
    a: &AttnArgs,
    qkv: DPtr<f32>,
    t: usize,
) -> Result<(), RuntimeError> {
    let (nh, nkv, d, dv) = (a.n_heads, a.n_kv_heads, a.head_dim, a.v_head_dim);
    check_len(
        &format!("{name}: qkv"),
        qkv,
        t * (nh * d + nkv * d + nkv * dv),
    )?;
    for (what, p) in [("q_norm", a.q_norm), ("k_norm", a.k_norm)] {
        if let Some(p) = p {
            check_len(&format!("{name}: {what}"), p, d)?;
        }
    }
    Ok(())
}

/// The arguments `rope_kv_write` and `rope_kv_write_rows` share after the position source:
/// geometry, RoPE table and factor, q/k norms, eps, value scale and the query output.
/// The block table address of `a`'s cache (0: contiguous).
fn paging_blocks(a: &AttnArgs) -> u64 {
    a.paging.map_or(0, |p| p.blocks.addr())
}

/// The block size of `a`'s cache (its capacity when contiguous: one block, the identity).
fn paging_block_size(a: &AttnArgs) -> u32 {
    a.paging.map_or(a.capacity, |p| p.block_size) as u32
}

fn rope_kv_args(a: &AttnArgs, q_out: DPtr<f32>) -> [Arg; 12] {
    [
        (a.n_heads as u32).into(),
        (a.n_kv_heads as u32).into(),
        (a.head_dim as u32).into(),
        (a.v_head_dim as u32).into(),
        (a.rotary_dim as u32).into(),
        a.inv_freq.addr().into(),
        a.attention_factor.into(),
        crate::arena::addr_or_null(a.q_norm).into(),
        crate::arena::addr_or_null(a.k_norm).into(),
        a.eps.into(),
        a.value_scale.into(),
        q_out.addr().into(),
    ]
}

fn launch(
    s: &CudaStream,
    f: &CudaFunction,
    grid: (u32, u32, u32),
    block: u32,
    args: &[Arg],
) -> Result<(), RuntimeError> {
    launch_with_smem(s, f, grid, block, 0, args)
}

/// [`launch`] with `smem` bytes of dynamic shared memory.
fn launch_with_smem(
    s: &CudaStream,
    f: &CudaFunction,
    grid: (u32, u32, u32),
    block: u32,
    smem: u32,
    args: &[Arg],
) -> Result<(), RuntimeError> {
    let mut args = args.to_vec();
    let mut params: Vec<*mut c_void> = args
        .iter_mut()
        .map(|a| match a {
            Arg::U64(v) => v as *mut u64 as *mut c_void,
            Arg::U32(v) => v as *mut u32 as *mut c_void,
            Arg::F32(v) => v as *mut f32 as *mut c_void,
            Arg::Route(v) => v as *mut RouteSpec as *mut c_void,
            Arg::Rope(v) => v as *mut RopeOut as *mut c_void,
            Arg::RopeRows(v) => v as *mut RopeOutRows as *mut c_void,
        })
        .collect();
    // SAFETY: every caller passes the arguments of the kernel's C signature in order, with
    // device addresses of live arena buffers whose sizes the caller validated; every kernel of
    // kernels/*.cu begins with pdl_begin().
    unsafe { crate::launch::launch_raw(s, f, grid, block, smem, &mut params) }
}

fn invalid(msg: String) -> RuntimeError {
    RuntimeError::Invalid(msg)
}

/// `value` as a kernel's u32 argument, or an error naming it.
fn u32_arg(what: &str, value: usize) -> Result<u32, RuntimeError> {
    u32::try_from(value).map_err(|_| invalid(format!("{what} = {value} exceeds u32")))
}

/// Checks that `p` holds at least `need` elements.
fn check_len<T>(what: &str, p: DPtr<T>, need: usize) -> Result<(), RuntimeError> {
    if p.len() < need {
        return Err(invalid(format!(
            "{what}: buffer of {} elements, {need} needed",
            p.len()
        )));
    }
    Ok(())
}

fn check_tokens(op: &str, t: usize) -> Result<(), RuntimeError> {
    if t == 0 || t > MAX_TOKENS {
        return Err(invalid(format!(
            "{op}: {t} tokens (1..={MAX_TOKENS} per pass)"
        )));
    }
    Ok(())
}

/// `(address, is bf16)` of a dense matrix after checking its shape.
fn matrix_data(what: &str, w: &DeviceMatrix) -> Result<(u64, bool), RuntimeError> {
    let (addr, len, bf16) = match w.data {
        DenseData::Bf16(p) => (p.addr(), p.len(), true),
        DenseData::F32(p) => (p.addr(), p.len(), false),
        DenseData::Tiled(_) => {
            return Err(RuntimeError::Unsupported(format!(
                "{what}: a tiled FP8 / BF16 projection weight (only linear takes it)"
            )))
        }
    };
    if len != w.rows * w.cols {
        return Err(invalid(format!(
            "{what}: {len} elements for a {}x{} matrix",
            w.rows, w.cols
        )));
    }
    Ok((addr, bf16))
}

/// Key splits of one attention launch (shared by [`Ops::attention`] and its scratch size):
/// about [`ATT_SPLIT_KEYS`] keys per split at `max_keys`, at least enough splits for
/// [`ATT_TARGET_BLOCKS`] blocks, at most [`ATT_MAX_SPLITS`], never below
/// [`ATT_MIN_SPLIT_KEYS`] keys per split.
pub(crate) fn attention_splits(a: &AttnArgs, t: usize, max_keys: usize) -> usize {
    let blocks = (a.n_kv_heads * t).max(1);
    let by_keys = max_keys.div_ceil(ATT_SPLIT_KEYS);
    let want = ATT_TARGET_BLOCKS
        .div_ceil(blocks)
        .max(by_keys)
        .clamp(1, ATT_MAX_SPLITS);
    want.min(max_keys.div_ceil(ATT_TILE).max(1))
}

/// The kernels' `RouteSpec` of `kind` for `n_experts` experts, top-`k`, validated.
pub(crate) fn route_spec(
    kind: &RouteArgs,
    n_experts: usize,
    k: usize,
) -> Result<RouteSpec, RuntimeError> {
    if n_experts == 0 || n_experts > MAX_EXPERTS {
        return Err(invalid(format!(
            "route: {n_experts} experts (1..={MAX_EXPERTS})"
        )));
    }
    if k == 0 || k > MAX_TOPK || k > n_experts {
        return Err(invalid(format!(
            "route: top-{k} of {n_experts} experts (k in 1..={MAX_TOPK})"
        )));
    }
    // (kind, norm, bias, n_group, topk_group, scaling)
    let (code, norm, bias, n_group, topk_group, scaling) = match *kind {
        RouteArgs::GptOss => (0u32, false, 0u64, 1, 1, 1.0f32),
        RouteArgs::Qwen3 { norm_topk_prob } => (1, norm_topk_prob, 0, 1, 1, 1.0),
        RouteArgs::Sigmoid {
            correction_bias,
            n_group,
            topk_group,
            norm_topk_prob,
            routed_scaling_factor,
        } => {
            if n_group == 0 || !n_experts.is_multiple_of(n_group) {
                return Err(invalid(format!(
                    "route: {n_group} groups do not divide {n_experts} experts"
                )));
            }
            if topk_group == 0 || topk_group > n_group {
                return Err(invalid(format!(
                    "route: topk_group {topk_group} of {n_group} groups"
                )));
            }
            if k > topk_group * (n_experts / n_group) {
                return Err(invalid(format!(
                    "route: top-{k} exceeds the {} experts of the kept groups",
                    topk_group * (n_experts / n_group)
                )));
            }
            if !routed_scaling_factor.is_finite() {
                return Err(invalid(format!(
                    "route: routed_scaling_factor {routed_scaling_factor}"
                )));
            }
            if let Some(b) = correction_bias {
                check_len("route: correction bias", b, n_experts)?;
            }
            (
                2,
                norm_topk_prob,
                crate::arena::addr_or_null(correction_bias),
                n_group,
                topk_group,
                routed_scaling_factor,
            )
        }
    };
    Ok(RouteSpec {
        n_exp: n_experts as u32,
        k: k as u32,
        kind: code,
        norm_topk: u32::from(norm),
        corr_bias: bias,
        n_group: n_group as u32,
        topk_group: topk_group as u32,
        scaling,
        _pad: 0,
    })
}

/// Largest weight matrix (bytes) a linear kernel prefetches into L2 while its predecessor runs,
/// with PDL on (`ULTRA_PREFETCH_MB`, default 32 — within an H100's 50 MB L2; 0 turns
/// prefetching off). Without PDL a kernel starts after its predecessor: nothing to overlap.
fn prefetch_limit() -> usize {
    static LIMIT: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    *LIMIT.get_or_init(|| {
        if !crate::launch::pdl_enabled() {
            return 0;
        }
        std::env::var("ULTRA_PREFETCH_MB")
            .ok()
            .and_then(|v| v.parse::<usize>().ok())
            .unwrap_or(32)
            << 20
    })
}

/// The index of the smallest [`LINEAR_TOKENS`] bucket that holds `t` tokens.
fn token_bucket(t: usize) -> usize {
    LINEAR_TOKENS
        .iter()
        .position(|&b| b >= t)
        .unwrap_or(LINEAR_TOKENS.len() - 1)
}

/// The checks shared by the two ops that rotate q / k and write the KV cache
/// ([`Ops::rope_kv_write`], [`Ops::linear_qkv_rope`]) for `t` tokens.
fn check_rope_write(
    op: &str,
    a: &AttnArgs,
    t: usize,
    step: DPtr<u32>,
    q_out: DPtr<f32>,
) -> Result<(), RuntimeError> {
    check_tokens(op, t)?;
    check_attn(op, a)?;
    check_rope_geometry(op, a)?;
    if t > a.capacity {
        return Err(invalid(format!(
            "{op}: {t} tokens into a KV ring of {} slots",
            a.capacity
        )));
    }
    check_len(&format!("{op}: step"), step, 1)?;
    check_len(&format!("{op}: q_out"), q_out, t * a.n_heads * a.head_dim)
}

/// The RoPE checks of [`check_rope_write`] that involve neither a cache nor a step.
fn check_rope_geometry(op: &str, a: &AttnArgs) -> Result<(), RuntimeError> {
    if a.rotary_dim > a.head_dim || !a.rotary_dim.is_multiple_of(2) {
        return Err(invalid(format!(
            "{op}: rotary_dim {} with head_dim {}",
            a.rotary_dim, a.head_dim
        )));
    }
    check_len(&format!("{op}: inv_freq"), a.inv_freq, a.rotary_dim / 2)
}

/// Whether a head of `d` dims with `rot` rotary dims can be laid out in [`rope_pair_order`].
fn rope_pairs_fit(d: usize, rot: usize) -> bool {
    d.is_multiple_of(2) && rot.is_multiple_of(2) && rot <= d
}

/// The row order [`Ops::linear_qkv_rope`] reads a fused `[q; k; v]` weight in: entry `p` is the
/// original row of row `p`. Within each q and k head (`d` rows), rows `(2i, 2i + 1)` for
/// `2i < rot` are dims `(i, i + rot/2)` — a RoPE pair, so one warp holds both — then dims
/// `rot..d` in order; v rows keep their order. `None` when `d` or `rot` is odd.
pub fn rope_pair_order(
    nh: usize,
    nkv: usize,
    d: usize,
    dv: usize,
    rot: usize,
) -> Option<Vec<usize>> {
    if !rope_pairs_fit(d, rot) {
        return None;
    }
    let half = rot / 2;
    let mut order = Vec::with_capacity((nh + nkv) * d + nkv * dv);
    for head in 0..nh + nkv {
        for l in 0..d {
            let dim = if l < rot {
                if l % 2 == 0 {
                    l / 2
                } else {
                    l / 2 + half
                }
            } else {
                l
            };
            order.push(head * d + dim);
        }
    }
    order.extend((nh + nkv) * d..(nh + nkv) * d + nkv * dv);
    Some(order)
}

/// Warps of one attention block: one per query head of a KV group, at most [`ATT_MAX_WARPS`].
fn attention_warps(a: &AttnArgs) -> usize {
    (a.n_heads / a.n_kv_heads).clamp(1, ATT_MAX_WARPS)
}

/// Dynamic shared memory of one attention block (`attention_gqa`'s key and value tiles and its
/// warps' queries).
pub(crate) fn att_smem_bytes(d: usize, dv: usize, warps: usize) -> usize {
    let k_stride = if d.is_multiple_of(4) { d + 4 } else { d + 1 };
    4 * (ATT_TILE * k_stride + ATT_TILE * dv + warps * d)
}

fn check_attn(op: &str, a: &AttnArgs) -> Result<(), RuntimeError> {
    check_attn_geometry(op, a)?;
    if a.capacity == 0 {
        return Err(invalid(format!("{op}: KV cache capacity 0")));
    }
    u32_arg("KV cache capacity", a.capacity)?;
    let rows = match a.paging {
        None => a.capacity,
        Some(p) => check_paging(op, &p, a.capacity)?,
    };
    check_cache_rows(op, a, a.k_cache, a.v_cache, rows)
}

/// Checks that `k_cache` / `v_cache` hold `rows` rows of `a`'s geometry.
fn check_cache_rows(
    op: &str,
    a: &AttnArgs,
    k_cache: DPtr<f32>,
    v_cache: DPtr<f32>,
    rows: usize,
) -> Result<(), RuntimeError> {
    check_len(
        &format!("{op}: k_cache"),
        k_cache,
        rows * a.n_kv_heads * a.head_dim,
    )?;
    check_len(
        &format!("{op}: v_cache"),
        v_cache,
        rows * a.n_kv_heads * a.v_head_dim,
    )
}

/// Checks a paged cache of `capacity` logical slots; returns the pool's rows (what `k_cache` /
/// `v_cache` must hold).
fn check_paging(op: &str, p: &KvPaging, capacity: usize) -> Result<usize, RuntimeError> {
    if p.block_size == 0 || !capacity.is_multiple_of(p.block_size) {
        return Err(invalid(format!(
            "{op}: KV capacity {capacity} is not a whole number of blocks of {}",
            p.block_size
        )));
    }
    if p.pool_blocks == 0 {
        return Err(invalid(format!("{op}: a KV block pool of 0 blocks")));
    }
    check_len(
        &format!("{op}: block table"),
        p.blocks,
        capacity / p.block_size,
    )?;
    let rows = p
        .pool_blocks
        .checked_mul(p.block_size)
        .filter(|&r| u32::try_from(r).is_ok())
        .ok_or_else(|| {
            invalid(format!(
                "{op}: a pool of {} blocks of {} slots is too large",
                p.pool_blocks, p.block_size
            ))
        })?;
    Ok(rows)
}

/// The checks of [`check_attn`] that do not involve the KV cache (heads, dims, window).
fn check_attn_geometry(op: &str, a: &AttnArgs) -> Result<(), RuntimeError> {
    let bad = |m: String| Err(invalid(format!("{op}: {m}")));
    if a.n_heads == 0 || a.n_kv_heads == 0 || !a.n_heads.is_multiple_of(a.n_kv_heads) {
        return bad(format!(
            "{} query heads over {} kv heads",
            a.n_heads, a.n_kv_heads
        ));
    }
    if a.n_kv_heads > ATT_MAX_KV_HEADS {
        return bad(format!(
            "{} kv heads (at most {ATT_MAX_KV_HEADS})",
            a.n_kv_heads
        ));
    }
    if a.head_dim == 0 || a.head_dim > MAX_HEAD_DIM || a.v_head_dim == 0 {
        return bad(format!("head_dim {} (1..={MAX_HEAD_DIM})", a.head_dim));
    }
    if a.v_head_dim > MAX_HEAD_DIM {
        return bad(format!("v_head_dim {} (1..={MAX_HEAD_DIM})", a.v_head_dim));
    }
    if a.window == Some(0) {
        return bad("sliding window of 0 keys".into());
    }
    u32_arg("window", a.window.unwrap_or(0))?;
    Ok(())
}

/// The loaded `ops` kernels.
pub struct Ops {
    _module: Arc<KernelSet>,
    /// The tiled FP8 / BF16 projection kernels: [`Ops::linear`] runs them for
    /// `DenseData::Tiled` weights.
    pub proj: proj::ProjOps,
    fill_bf16: CudaFunction,
    fill_f32: CudaFunction,
    fill_u8: CudaFunction,
    embed_bf16: CudaFunction,
    embed_f32: CudaFunction,
    rms_norm: CudaFunction,
    glu: CudaFunction,
    combine: CudaFunction,
    /// `moe_combine_norm_v{1,2,4}`: the fused-norm combine with V values per thread in
    /// registers (hidden ≤ 1024·V).
    combine_norm: [CudaFunction; 3],
    argmax: CudaFunction,
    linear_bf16: LinearTable,
    linear_f32: LinearTable,
    linear_generic: CudaFunction,
    rope_kv_write: CudaFunction,
    attention: CudaFunction,
    route: CudaFunction,
    router_route_bf16: [CudaFunction; LINEAR_TOKENS.len()],
    qkv_rope_bf16: [CudaFunction; LINEAR_TOKENS.len()],
    qkv_rope_f32: [CudaFunction; LINEAR_TOKENS.len()],
    router_route_f32: [CudaFunction; LINEAR_TOKENS.len()],
    sample: CudaFunction,
    sample_rows: CudaFunction,
    accept_rows: CudaFunction,
}

/// `u32` words of scratch one sampled row needs over a vocabulary of `v`: the penalized logits
/// and the history marks (`v` each), then the sort keys of top-p's crossing bin (the next
/// power of two of `v` `u64`s). [`Ops::sample`] takes one row's, [`Ops::sample_rows`] one per
/// row.
pub fn sample_scratch_len(v: usize) -> usize {
    2 * v + 2 * v.next_power_of_two()
}

/// `u32` words of scratch one verify block of [`Ops::accept_rows`] needs over a vocabulary of
/// `v`: the penalized row and the history marks, then the block's `p` and `q` rows.
pub fn accept_scratch_len(v: usize) -> usize {
    4 * v
}

impl Ops {
    /// Loads the op families' images (`ultra_kernels::OPS`) into `ctx`.
    pub fn load(ctx: &Arc<CudaContext>) -> Result<Self, RuntimeError> {
        let module = ultra_kernels::load_set(ctx, ultra_kernels::OPS)?;
        let f = |name: &str| module.load_function(name);
        let table =
            |ty: &str| -> Result<LinearTable, RuntimeError> {
                let mut rows = Vec::new();
                for tt in LINEAR_TOKENS {
                    let mut fs = Vec::new();
                    for r in LINEAR_ROWS {
                        fs.push(f(&format!("linear_{ty}_t{tt}_r{r}"))?);
                    }
                    rows.push(
                        <[CudaFunction; LINEAR_ROWS.len()]>::try_from(fs)
                            .unwrap_or_else(|_| unreachable!("one kernel per row count")),
                    );
                }
                Ok(<LinearTable>::try_from(rows)
                    .unwrap_or_else(|_| unreachable!("one row per bucket")))
            };
        let bucketed = |name: &str| load_bucketed(&module, name);
        let attention = load_attention(&module, "attention_gqa")?;
        Ok(Self {
            fill_bf16: f("fill_uniform_bf16")?,
            fill_f32: f("fill_uniform_f32")?,
            fill_u8: f("fill_bytes")?,
            embed_bf16: f("embed_bf16")?,
            embed_f32: f("embed_f32")?,
            rms_norm: f("rms_norm")?,
            glu: f("glu_halves")?,
            combine: f("moe_combine")?,
            combine_norm: [
                f("moe_combine_norm_v1")?,
                f("moe_combine_norm_v2")?,
                f("moe_combine_norm_v4")?,
            ],
            argmax: f("argmax_rows")?,
            linear_bf16: table("bf16")?,
            linear_f32: table("f32")?,
            linear_generic: f("linear_generic")?,
            rope_kv_write: f("rope_kv_write")?,
            attention,
            route: f("route")?,
            router_route_bf16: bucketed("router_route_bf16")?,
            router_route_f32: bucketed("router_route_f32")?,
            qkv_rope_bf16: bucketed("linear_qkv_rope_bf16")?,
            qkv_rope_f32: bucketed("linear_qkv_rope_f32")?,
            sample: f("sample")?,
            sample_rows: f("sample_rows")?,
            accept_rows: f("accept_rows")?,
            proj: proj::ProjOps::load(ctx)?,
            _module: module,
        })
    }

    /// `x[t] = table[tokens[t]]` for `t < T` (`table` `[V, H]`, `x` `[T, H]`).
    ///
    /// Token ids are device data, so they cannot be checked here: an id `≥ V` yields a row of
    /// NaN (callers validate ids on the host before uploading them).
    pub fn embed(
        &self,
        s: &CudaStream,
        table: &DeviceMatrix,
        tokens: DPtr<u32>,
        t: usize,
        x: DPtr<f32>,
    ) -> Result<(), RuntimeError> {
        check_tokens("embed", t)?;
        let (addr, bf16) = matrix_data("embed table", table)?;
        check_len("embed: tokens", tokens, t)?;
        check_len("embed: x", x, t * table.cols)?;
        let h = u32_arg("hidden size", table.cols)?;
        let f = if bf16 {
            &self.embed_bf16
        } else {
            &self.embed_f32
        };
        launch(
            s,
            f,
            (t as u32, h.div_ceil(256), 1),
            256,
            &[
                addr.into(),
                tokens.addr().into(),
                u32_arg("vocab", table.rows)?.into(),
                h.into(),
                x.addr().into(),
            ],
        )
    }

    /// `out[r] = rms_norm(x[r]) ⊙ w` for `rows` rows of width `n` (CPU: `cpu::ops::rms_norm`).
    #[allow(clippy::too_many_arguments)]
    pub fn rms_norm(
        &self,
        s: &CudaStream,
        x: DPtr<f32>,
        w: DPtr<f32>,
        rows: usize,
        n: usize,
        eps: f32,
        out: DPtr<f32>,
    ) -> Result<(), RuntimeError> {
        if rows == 0 || n == 0 {
            return Err(invalid(format!("rms_norm: {rows} rows of width {n}")));
        }
        check_len("rms_norm: x", x, rows * n)?;
        check_len("rms_norm: w", w, n)?;
        check_len("rms_norm: out", out, rows * n)?;
        launch(
            s,
            &self.rms_norm,
            (u32_arg("rms_norm rows", rows)?, 1, 1),
            if n >= 2048 { 512 } else { 256 },
            &[
                x.addr().into(),
                w.addr().into(),
                u32_arg("rms_norm width", n)?.into(),
                eps.into(),
                out.addr().into(),
            ],
        )
    }

    /// `y[t] = W · x[t] (+ bias)` for `t < T ≤ MAX_TOKENS`; with `accumulate`, `y[t] += ...`
    /// instead (the residual add of the O projection). `x` `[T, cols]`, `y` `[T, rows]`.
    #[allow(clippy::too_many_arguments)]
    pub fn linear(
        &self,
        s: &CudaStream,
        w: &DeviceMatrix,
        bias: Option<DPtr<f32>>,
        x: DPtr<f32>,
        t: usize,
        y: DPtr<f32>,
        accumulate: bool,
    ) -> Result<(), RuntimeError> {
        check_tokens("linear", t)?;
        if let Some(p) = w.tiled() {
            return self.proj.linear(s, &p, bias, x, t, y, accumulate);
        }
        let (addr, bf16) = matrix_data("linear weight", w)?;
        if w.rows == 0 || w.cols == 0 {
            return Err(invalid(format!("linear: {}x{} weight", w.rows, w.cols)));
        }
        check_len("linear: x", x, t * w.cols)?;
        check_len("linear: y", y, t * w.rows)?;
        if let Some(b) = bias {
            check_len("linear: bias", b, w.rows)?;
        }
        let (n, k) = (
            u32_arg("linear rows", w.rows)?,
            u32_arg("linear cols", w.cols)?,
        );
        let per16 = if bf16 { 8 } else { 4 };
        let vectorised =
            w.cols.is_multiple_of(per16) && addr.is_multiple_of(16) && x.addr().is_multiple_of(16);
        let common = [
            crate::arena::addr_or_null(bias).into(),
            x.addr().into(),
            y.addr().into(),
            n.into(),
            k.into(),
            (t as u32).into(),
            u32::from(accumulate).into(),
        ];
        if !vectorised {
            let mut args = vec![addr.into(), u32::from(bf16).into()];
            args.extend_from_slice(&common);
            let warps_per_block = LINEAR_THREADS / 32;
            return launch(
                s,
                &self.linear_generic,
                (n.div_ceil(warps_per_block), 1, 1),
                LINEAR_THREADS,
                &args,
            );
        }
        let bucket = token_bucket(t);
        // Rows per warp (index into LINEAR_ROWS). One or two tokens are bound by the weight
        // stream: as many rows as keep ≥ 32 warps per SM busy. From four tokens on, the
        // activation loads dominate (2·T loads per weight load and row group): four rows share
        // each activation load as soon as there are ≥ 4 warps per SM.
        let r = if LINEAR_TOKENS[bucket] <= 2 {
            match w.rows {
                16_896.. => 2,
                8_448.. => 1,
                _ => 0,
            }
        } else {
            match w.rows {
                2_112.. => 2,
                1_056.. => 1,
                _ => 0,
            }
        };
        let f = if bf16 {
            &self.linear_bf16[bucket][r]
        } else {
            &self.linear_f32[bucket][r]
        };
        let warps = w.rows.div_ceil(LINEAR_ROWS[r]);
        let blocks = u32_arg(
            "linear blocks",
            warps.div_ceil(LINEAR_THREADS as usize / 32),
        )?;
        let bytes = w.rows * w.cols * if bf16 { 2 } else { 4 };
        let prefetch = u32::from(bytes <= prefetch_limit());
        let mut args = vec![addr.into()];
        args.extend_from_slice(&common);
        args.push(prefetch.into());
        launch(s, f, (blocks, 1, 1), LINEAR_THREADS, &args)
    }

    /// From the fused projection `qkv` `[T, n_heads·d + n_kv·d + n_kv·dv]` (q | k | v): q/k
    /// norm, RoPE of q and k at positions `step[0] + t`, v·value_scale; writes q to `q_out`
    /// `[T, n_heads·d]` and k, v into the cache slots of those positions (`t` must not exceed
    /// the cache capacity: two tokens of one pass never share a slot).
    pub fn rope_kv_write(
        &self,
        s: &CudaStream,
        a: &AttnArgs,
        qkv: DPtr<f32>,
        t: usize,
        step: DPtr<u32>,
        q_out: DPtr<f32>,
    ) -> Result<(), RuntimeError> {
        check_rope_write("rope_kv_write", a, t, step, q_out)?;
        check_rope_kv_input("rope_kv_write", a, qkv, t)?;
        let mut args = vec![qkv.addr().into(), step.addr().into()];
        args.extend(rope_kv_args(a, q_out));
        args.extend::<[Arg; 5]>([
            a.k_cache.addr().into(),
            a.v_cache.addr().into(),
            (a.capacity as u32).into(),
            paging_blocks(a).into(),
            paging_block_size(a).into(),
        ]);
        let heads = u32_arg("heads", a.n_heads + 2 * a.n_kv_heads)?;
        launch(s, &self.rope_kv_write, (heads, t as u32, 1), 128, &args)
    }

    /// The QKV projection with RoPE and the KV write fused in: `W · x[t] (+ bias)` of a weight
    /// uploaded in [`rope_pair_order`] (see there), then exactly what [`Ops::rope_kv_write`]
    /// does with the projected rows — q to `q_out`, k and v into the cache. Layers with q/k
    /// norm cannot use it (the norm needs a whole head). Needs 16-byte weight rows (`cols` a
    /// multiple of 8) and 16-byte aligned `x`.
    #[allow(clippy::too_many_arguments)]
    pub fn linear_qkv_rope(
        &self,
        s: &CudaStream,
        w: &DeviceMatrix,
        bias: Option<DPtr<f32>>,
        x: DPtr<f32>,
        t: usize,
        a: &AttnArgs,
        step: DPtr<u32>,
        q_out: DPtr<f32>,
    ) -> Result<(), RuntimeError> {
        check_rope_write("linear_qkv_rope", a, t, step, q_out)?;
        let kernels = (&self.qkv_rope_bf16, &self.qkv_rope_f32);
        launch_linear_qkv_rope(
            s,
            "linear_qkv_rope",
            kernels,
            w,
            bias,
            x,
            t,
            a,
            q_out,
            |ro| {
                RopeOut {
                    step: step.addr(),
                    ..ro
                }
                .into()
            },
        )
    }

    /// Scratch elements [`Ops::attention`] needs for `t` queries over at most `max_keys` keys.
    pub fn attention_scratch_len(a: &AttnArgs, t: usize, max_keys: usize) -> usize {
        ATT_COUNTERS + t * a.n_heads * attention_splits(a, t, max_keys) * (a.v_head_dim + 2)
    }

    /// Attention of the `t` queries `q` `[T, n_heads·d]` (positions `step[0] + t`) over the
    /// cache (which already holds them): GQA, sinks, sliding window. `causal`: query t sees keys
    /// up to its own position; otherwise every query sees keys up to position `step[0] + T − 1`
    /// (a drafter's bidirectional block) — the window still counts back from the query's own
    /// position. `out` `[T, n_heads·dv]`.
    ///
    /// `max_keys` only sizes the key splits (flash-decoding); any number of visible keys is
    /// handled, the splits just grow longer.
    #[allow(clippy::too_many_arguments)]
    pub fn attention(
        &self,
        s: &CudaStream,
        a: &AttnArgs,
        q: DPtr<f32>,
        t: usize,
        step: DPtr<u32>,
        causal: bool,
        max_keys: usize,
        scratch: DPtr<f32>,
        out: DPtr<f32>,
    ) -> Result<(), RuntimeError> {
        check_tokens("attention", t)?;
        check_attn("attention", a)?;
        let (nh, d, dv) = (a.n_heads, a.head_dim, a.v_head_dim);
        check_len("attention: q", q, t * nh * d)?;
        check_len("attention: step", step, 1)?;
        check_len("attention: out", out, t * nh * dv)?;
        check_len(
            "attention: scratch",
            scratch,
            Self::attention_scratch_len(a, t, max_keys),
        )?;
        if let Some(sk) = a.sinks {
            check_len("attention: sinks", sk, nh)?;
        }
        let splits = attention_splits(a, t, max_keys) as u32;
        let warps = attention_warps(a);
        launch_with_smem(
            s,
            &self.attention,
            (splits, a.n_kv_heads as u32, t as u32),
            32 * warps as u32,
            att_smem_bytes(d, dv, warps) as u32,
            &[
                q.addr().into(),
                a.k_cache.addr().into(),
                a.v_cache.addr().into(),
                paging_blocks(a).into(),
                paging_block_size(a).into(),
                step.addr().into(),
                (t as u32).into(),
                u32_arg("heads", nh)?.into(),
                (a.n_kv_heads as u32).into(),
                (d as u32).into(),
                (dv as u32).into(),
                (a.capacity as u32).into(),
                (a.window.unwrap_or(0) as u32).into(),
                u32::from(causal).into(),
                a.scale.into(),
                crate::arena::addr_or_null(a.sinks).into(),
                scratch.addr().into(),
                out.addr().into(),
            ],
        )
    }

    /// Routing of `t` tokens from router logits `[T, E]`: `ids` `[T, k]` (i32) and `weights`
    /// `[T, k]`, in the order and with the values of `moe::route_into`.
    #[allow(clippy::too_many_arguments)]
    pub fn route(
        &self,
        s: &CudaStream,
        kind: &RouteArgs,
        logits: DPtr<f32>,
        t: usize,
        n_experts: usize,
        k: usize,
        ids: DPtr<i32>,
        weights: DPtr<f32>,
    ) -> Result<(), RuntimeError> {
        check_tokens("route", t)?;
        let spec = route_spec(kind, n_experts, k)?;
        check_len("route: logits", logits, t * n_experts)?;
        check_len("route: ids", ids, t * k)?;
        check_len("route: weights", weights, t * k)?;
        launch(
            s,
            &self.route,
            (t as u32, 1, 1),
            32,
            &[
                logits.addr().into(),
                spec.into(),
                ids.addr().into(),
                weights.addr().into(),
            ],
        )
    }

    /// The router of a MoE layer with the post-attention norm fused in, then its routing, in
    /// one launch: `h[t] = rms_norm(x[t]) ⊙ norm_w` (written to `h`, which the experts read),
    /// `logits[t] = router · h[t] (+ bias)`, and `ids` / `weights` of `logits[t]` as
    /// [`Ops::route`]. Needs 16-byte weight rows (`cols` a multiple of 8 for bf16, 4 for f32)
    /// and 16-byte aligned `x` and `norm_w`;
    /// returns `Ok(false)` (nothing enqueued) when they are not, so the caller runs
    /// [`Ops::rms_norm`], [`Ops::linear`] and [`Ops::route`] instead. `counter` is one `u32`
    /// that is zero before the first launch (each launch leaves it zero).
    #[allow(clippy::too_many_arguments)]
    pub fn router_route(
        &self,
        s: &CudaStream,
        router: &DeviceMatrix,
        bias: Option<DPtr<f32>>,
        x: DPtr<f32>,
        norm_w: DPtr<f32>,
        eps: f32,
        t: usize,
        kind: &RouteArgs,
        k: usize,
        h: DPtr<f32>,
        logits: DPtr<f32>,
        counter: DPtr<u32>,
        ids: DPtr<i32>,
        weights: DPtr<f32>,
    ) -> Result<bool, RuntimeError> {
        check_tokens("router_route", t)?;
        let (addr, bf16) = matrix_data("router weight", router)?;
        let (n_experts, cols) = (router.rows, router.cols);
        let per16 = if bf16 { 8 } else { 4 };
        let aligned = [addr, x.addr(), norm_w.addr()]
            .iter()
            .all(|a| a.is_multiple_of(16));
        if cols == 0 || !cols.is_multiple_of(per16) || !aligned {
            return Ok(false);
        }
        let spec = route_spec(kind, n_experts, k)?;
        check_len("router_route: x", x, t * cols)?;
        check_len("router_route: norm weight", norm_w, cols)?;
        check_len("router_route: h", h, t * cols)?;
        check_len("router_route: logits", logits, t * n_experts)?;
        check_len("router_route: counter", counter, 1)?;
        check_len("router_route: ids", ids, t * k)?;
        check_len("router_route: weights", weights, t * k)?;
        if let Some(b) = bias {
            check_len("router_route: bias", b, n_experts)?;
        }
        let bucket = token_bucket(t);
        let f = if bf16 {
            &self.router_route_bf16[bucket]
        } else {
            &self.router_route_f32[bucket]
        };
        launch(
            s,
            f,
            (n_experts.min(ROUTER_MAX_BLOCKS) as u32, 1, 1),
            ROUTER_THREADS,
            &[
                addr.into(),
                crate::arena::addr_or_null(bias).into(),
                x.addr().into(),
                norm_w.addr().into(),
                eps.into(),
                u32_arg("router cols", cols)?.into(),
                (t as u32).into(),
                h.addr().into(),
                logits.addr().into(),
                spec.into(),
                counter.addr().into(),
                ids.addr().into(),
                weights.addr().into(),
            ],
        )?;
        Ok(true)
    }

    /// The MoE combine and residual add: `x[t] += Σ_j y[t][j]`, `y` `[T, k, H]` (already
    /// weighted), the k terms summed from 0 in ascending expert id (`ids` `[T, k]`), as
    /// the CPU's `cpu::ffn::moe_block`. With `norm = Some((w, eps, out))` the next RMSNorm is
    /// fused in: `out[t] = rms_norm(x[t]) ⊙ w` as [`Ops::rms_norm`].
    #[allow(clippy::too_many_arguments)]
    pub fn combine(
        &self,
        s: &CudaStream,
        x: DPtr<f32>,
        y: DPtr<f32>,
        ids: DPtr<i32>,
        t: usize,
        k: usize,
        h: usize,
        norm: Option<(DPtr<f32>, f32, DPtr<f32>)>,
    ) -> Result<(), RuntimeError> {
        check_tokens("combine", t)?;
        if k == 0 || k > MAX_TOPK || h == 0 {
            return Err(invalid(format!(
                "combine: top-{k} (1..={MAX_TOPK}), hidden {h}"
            )));
        }
        check_len("combine: x", x, t * h)?;
        check_len("combine: y", y, t * k * h)?;
        check_len("combine: ids", ids, t * k)?;
        let (nw, eps, out) = match norm {
            Some((w, eps, out)) => {
                check_len("combine: norm weight", w, h)?;
                check_len("combine: norm out", out, t * h)?;
                (w.addr(), eps, out.addr())
            }
            None => (0, 0.0, 0),
        };
        let h32 = u32_arg("hidden size", h)?;
        // The fused norm needs a token's whole row in one block: up to 4096 values of it held
        // in registers (a few memory round trips), beyond that the strided loop.
        let (f, blocks_per_token, threads) = match (norm, h) {
            (Some(_), ..=1024) => (&self.combine_norm[0], 1, 1024),
            (Some(_), ..=2048) => (&self.combine_norm[1], 1, 1024),
            (Some(_), ..=4096) => (&self.combine_norm[2], 1, 1024),
            (Some(_), _) => (&self.combine, 1, 1024),
            (None, _) => (&self.combine, h32.div_ceil(256).min(64), 256),
        };
        launch(
            s,
            f,
            (t as u32, blocks_per_token, 1),
            threads,
            &[
                x.addr().into(),
                y.addr().into(),
                ids.addr().into(),
                (k as u32).into(),
                h32.into(),
                nw.into(),
                eps.into(),
                out.into(),
            ],
        )
    }

    /// `out[t] = glu(gate_up[t])` for a dense MLP: `gate_up` `[T, 2I]` in halves order (rows
    /// 0..I gate, I..2I up), `out` `[T, I]` (the CPU's `cpu::ops::glu`).
    #[allow(clippy::too_many_arguments)]
    pub fn glu(
        &self,
        s: &CudaStream,
        act: GluArgs,
        gate_up: DPtr<f32>,
        t: usize,
        i: usize,
        out: DPtr<f32>,
    ) -> Result<(), RuntimeError> {
        check_tokens("glu", t)?;
        if i == 0 {
            return Err(invalid("glu: intermediate size 0".into()));
        }
        check_len("glu: gate_up", gate_up, t * 2 * i)?;
        check_len("glu: out", out, t * i)?;
        let (kind, alpha, limit) = match act {
            GluArgs::ClampedSwiglu { alpha, limit } => (0u32, alpha, limit),
            GluArgs::Swiglu => (1, 0.0, 0.0),
        };
        let blocks = (t * i).div_ceil(256).min(FILL_BLOCKS) as u32;
        launch(
            s,
            &self.glu,
            (blocks, 1, 1),
            256,
            &[
                gate_up.addr().into(),
                (t as u32).into(),
                u32_arg("intermediate size", i)?.into(),
                kind.into(),
                alpha.into(),
                limit.into(),
                out.addr().into(),
            ],
        )
    }

    /// `out[t] = argmax(logits[t])` over `v` values (lowest index on ties), `t < T`. `scratch`
    /// holds [`ARGMAX_SCRATCH`] words, zero before the first launch (each launch leaves its
    /// counters zero).
    pub fn argmax(
        &self,
        s: &CudaStream,
        logits: DPtr<f32>,
        t: usize,
        v: usize,
        scratch: DPtr<u32>,
        out: DPtr<u32>,
    ) -> Result<(), RuntimeError> {
        check_tokens("argmax", t)?;
        if v == 0 {
            return Err(invalid("argmax: empty vocabulary".into()));
        }
        check_len("argmax: logits", logits, t * v)?;
        check_len("argmax: scratch", scratch, ARGMAX_SCRATCH)?;
        check_len("argmax: out", out, t)?;
        // Chunks of at least two loads per thread.
        let blocks = v.div_ceil(2 * 1024).clamp(1, ARGMAX_BLOCKS) as u32;
        launch(
            s,
            &self.argmax,
            (blocks, t as u32, 1),
            1024,
            &[
                logits.addr().into(),
                u32_arg("vocabulary", v)?.into(),
                out.addr().into(),
                scratch.addr().into(),
            ],
        )
    }

    /// Samples one token from `logits` `[v]` with temperature / top-k / top-p / min-p, driven by
    /// the uniform number `uniform[0]` in [0, 1) (device memory, so a graph can replay it);
    /// writes the token to `out[0]`.
    ///
    /// The token is the one `model::sampling::Sampler` draws at that uniform (its kept set,
    /// walked in its order: see [`Ops::sample_rows`]); when every logit is `-inf`/NaN it writes
    /// 0, as `Sampler::sample` does. `scratch` holds [`sample_scratch_len`]`(v)` words.
    #[allow(clippy::too_many_arguments)]
    pub fn sample(
        &self,
        s: &CudaStream,
        logits: DPtr<f32>,
        v: usize,
        p: &SampleArgs,
        uniform: DPtr<f32>,
        scratch: DPtr<u32>,
        out: DPtr<u32>,
    ) -> Result<(), RuntimeError> {
        if v == 0 {
            return Err(invalid("sample: empty vocabulary".into()));
        }
        if !(p.temperature.is_finite() && p.temperature > 0.0) {
            return Err(invalid(format!(
                "sample: temperature {} (> 0; greedy decoding uses argmax)",
                p.temperature
            )));
        }
        if !(p.top_p > 0.0 && p.top_p <= 1.0) {
            return Err(invalid(format!("sample: top_p {} not in (0, 1]", p.top_p)));
        }
        if !(0.0..=1.0).contains(&p.min_p) {
            return Err(invalid(format!("sample: min_p {} not in [0, 1]", p.min_p)));
        }
        check_len("sample: logits", logits, v)?;
        check_len("sample: uniform", uniform, 1)?;
        check_len("sample: out", out, 1)?;
        check_len("sample: scratch", scratch, sample_scratch_len(v))?;
        launch(
            s,
            &self.sample,
            (1, 1, 1),
            SAMPLE_THREADS,
            &[
                logits.addr().into(),
                u32_arg("vocabulary", v)?.into(),
                p.temperature.into(),
                u32_arg("top_k", p.top_k.min(v))?.into(),
                p.top_p.into(),
                p.min_p.into(),
                uniform.addr().into(),
                // The crossing-bin keys sit after the row's work and marks (2·v words).
                (scratch.addr() + 8 * v as u64).into(),
                out.addr().into(),
            ],
        )
    }

    /// Samples every row of a table in one launch: `out[r]` = the token of row `r` of `rows`
    /// (`n` [`crate::sample::SampleRow`]s in device memory, written by
    /// [`crate::sample::DeviceSampler`]), each with its own logits (`v` values), parameters,
    /// token history and uniform.
    ///
    /// Each row computes exactly `model::sampling::Sampler`'s choice: the penalties of
    /// `read_penalized` (repetition over prompt + generated, then frequency and presence over
    /// the generated ids, every rounding as the CPU's), then the greedy argmax (lowest id on
    /// ties), or the kept set of `SamplingDist` (top-k with ties, top-p, min-p) walked in
    /// `Kept::draw`'s order to the first token whose running mass exceeds `u · total`, where `u`
    /// is the row's `UniformStream::uniform` (the same ChaCha20 words the CPU sampler reads).
    /// The masses are summed in f64 in another association than the CPU's, so a uniform
    /// within f64 rounding (~1e-16 relative) of a boundary between two tokens may pick the
    /// neighbour. `scratch` holds [`sample_scratch_len`]`(v)` words per row.
    pub fn sample_rows(
        &self,
        s: &CudaStream,
        rows: DPtr<u32>,
        n: usize,
        v: usize,
        scratch: DPtr<u32>,
        out: DPtr<u32>,
    ) -> Result<(), RuntimeError> {
        if v == 0 {
            return Err(invalid("sample_rows: empty vocabulary".into()));
        }
        if n == 0 || n > SAMPLE_MAX_ROWS {
            return Err(invalid(format!(
                "sample_rows: {n} rows (1..={SAMPLE_MAX_ROWS} per launch)"
            )));
        }
        check_len(
            "sample_rows: row table",
            rows,
            n * crate::abi::SAMPLE_ROW_WORDS,
        )?;
        check_len("sample_rows: scratch", scratch, n * sample_scratch_len(v))?;
        check_len("sample_rows: out", out, n)?;
        launch(
            s,
            &self.sample_rows,
            (n as u32, 1, 1),
            SAMPLE_THREADS,
            &[
                rows.addr().into(),
                u32_arg("vocabulary", v)?.into(),
                scratch.addr().into(),
                out.addr().into(),
            ],
        )
    }

    /// dflash's exact acceptance of `n` verify blocks in one launch (`rows`: `n`
    /// [`crate::sample::AcceptRow`]s in device memory, written by
    /// [`crate::sample::DeviceSampler::accept`]): `out[2b]` = the drafts block `b` accepts,
    /// `out[2b + 1]` its bonus token. Greedy parameters: the longest prefix of drafts equal to
    /// the penalized argmax of their target rows (`accept_greedy`). Sampled: `accept_sampled` on
    /// `p_i` = `SamplingDist::probs` of target row `i`, `q_i` = the same of draft row `i` (the
    /// history of row `i` ends with the first `i` drafts), uniforms from the block's stream in
    /// the CPU's order (one per examined draft, then one for the residual or the bonus); the
    /// masses are f64 sums in another association than the CPU's (see [`Ops::sample_rows`]).
    /// `scratch` holds [`accept_scratch_len`]`(v)` words per block.
    pub fn accept_rows(
        &self,
        s: &CudaStream,
        rows: DPtr<u32>,
        n: usize,
        v: usize,
        scratch: DPtr<u32>,
        out: DPtr<u32>,
    ) -> Result<(), RuntimeError> {
        if v == 0 {
            return Err(invalid("accept_rows: empty vocabulary".into()));
        }
        if n == 0 || n > SAMPLE_MAX_ROWS {
            return Err(invalid(format!(
                "accept_rows: {n} blocks (1..={SAMPLE_MAX_ROWS} per launch)"
            )));
        }
        check_len(
            "accept_rows: block table",
            rows,
            n * crate::abi::ACCEPT_ROW_WORDS,
        )?;
        check_len("accept_rows: scratch", scratch, n * accept_scratch_len(v))?;
        check_len("accept_rows: out", out, 2 * n)?;
        launch(
            s,
            &self.accept_rows,
            (n as u32, 1, 1),
            SAMPLE_THREADS,
            &[
                rows.addr().into(),
                u32_arg("vocabulary", v)?.into(),
                scratch.addr().into(),
                out.addr().into(),
            ],
        )
    }

    /// Fills `out` with uniform values in `[-scale, scale)` from `seed` (synthetic weights,
    /// benchmark inputs). Deterministic for a given seed and length.
    pub fn fill_uniform_bf16(
        &self,
        s: &CudaStream,
        out: DPtr<half::bf16>,
        scale: f32,
        seed: u64,
    ) -> Result<(), RuntimeError> {
        self.fill(s, &self.fill_bf16, out.addr(), out.len(), scale, seed)
    }

    /// [`Ops::fill_uniform_bf16`] for f32.
    pub fn fill_uniform_f32(
        &self,
        s: &CudaStream,
        out: DPtr<f32>,
        scale: f32,
        seed: u64,
    ) -> Result<(), RuntimeError> {
        self.fill(s, &self.fill_f32, out.addr(), out.len(), scale, seed)
    }

    fn fill(
        &self,
        s: &CudaStream,
        f: &CudaFunction,
        addr: u64,
        n: usize,
        scale: f32,
        seed: u64,
    ) -> Result<(), RuntimeError> {
        if !(scale.is_finite() && scale > 0.0) {
            return Err(invalid(format!("fill: scale {scale} (finite, > 0)")));
        }
        if n == 0 {
            return Ok(());
        }
        launch(
            s,
            f,
            (n.div_ceil(256).min(FILL_BLOCKS) as u32, 1, 1),
            256,
            &[addr.into(), (n as u64).into(), scale.into(), seed.into()],
        )
    }

    /// Fills `out` with bytes uniform in `lo..=hi` (random MXFP4 codes: 0..=255; scales: a
    /// narrow exponent range).
    pub fn fill_bytes(
        &self,
        s: &CudaStream,
        out: DPtr<u8>,
        lo: u8,
        hi: u8,
        seed: u64,
    ) -> Result<(), RuntimeError> {
        if lo > hi {
            return Err(invalid(format!("fill_bytes: empty range {lo}..={hi}")));
        }
        if out.is_empty() {
            return Ok(());
        }
        let n = out.len();
        launch(
            s,
            &self.fill_u8,
            (n.div_ceil(256).min(FILL_BLOCKS) as u32, 1, 1),
            256,
            &[
                out.addr().into(),
                (n as u64).into(),
                u32::from(lo).into(),
                (u32::from(hi) - u32::from(lo) + 1).into(),
                seed.into(),
            ],
        )
    }
}
