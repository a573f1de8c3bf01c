//! Routed experts on the GPU (`kernels/mxfp4.cu` grouped kernels): upload of a MoE block's
//! experts into kernel layouts and the two expert launches of a step.
//!
//! A pass over `T ≤ MAX_TOKENS` tokens with top-k routing (`ids` / `weights` `[T, k]` from
//! [`crate::ops::Ops::route`]) runs each **distinct** selected expert once: its weights are read
//! once for all the tokens that chose it (the CPU's `cpu::ffn::moe_block` does the same).
//!
//! Layouts: MXFP4 experts are repacked at upload into `fp4::tiled` (16-row × 4-block tiles, 1 KiB
//! of codes each, coalesced 16-byte loads); dense experts (bf16 when lossless, else f32) are
//! `[E, rows, K]`. Gate/up rows are always **interleaved** on the device (row 2j = gate j,
//! row 2j+1 = up j): Qwen3-MoE / MiMo halves are permuted at upload (biases too), so one fused
//! gate_up + GLU kernel serves every architecture.
//!
//! Kernels: each launch has one CTA per (distinct-expert slot, row block); a CTA finds its expert
//! by scanning the tiny `ids` table on the device (slot a = the a-th distinct valid id in
//! ascending order; slots past the number of distinct experts exit at once), so no host work or
//! synchronisation sits between routing and the experts and the launches are graph-capturable.
//! Entries `(t, j)` whose id is outside `0..E` get NaN outputs.
//!
//! Numerics. MXFP4 experts run on the tensor cores as `fp4::cuda::Mxfp4Gpu::gemv` does: weights
//! exact, each 32-value block of the input scaled by a power of two and rounded to fp16 (exact for
//! bf16-valued inputs, relative ≤ 2^-11 per element for f32 ones; the prep is fused into the
//! kernels), products summed in f32 — per output row `|y − y_exact| ≤`
//! [`fp4::cuda::gemv_error_bound`] (its rounding count covers this kernel: 32 in-block additions,
//! K/32 block accumulations, 1 shuffle, ≤ 16 warp partials). Dense experts use f32 FMAs on exact
//! f32 products: [`dense_roundings`] roundings per term. The epilogues then add the bias (one
//! rounding), apply the GLU (`expf`, a few ulps) or multiply by the routing weight (one
//! rounding).

use std::sync::Arc;

use cudarc::driver::sys::{CUdevice_attribute, CUfunction_attribute};
use cudarc::driver::{CudaContext, CudaFunction, CudaStream, LaunchConfig, PushKernelArg};
use fp4::tiled::{self, TiledShape};
use model::weights::{ExpertMat, GateUpLayout, Moe};

use crate::abi::{self, MoeParams};
use crate::arena::{addr_or_null, Arena, DPtr};
use crate::ops::{GluArgs, MAX_TOKENS};
use crate::tensor::{DenseData, DeviceMatrix};
use crate::RuntimeError;

/// One stack of expert matrices `[E, rows, K]` on the device.
#[derive(Debug, Clone, Copy)]
pub enum DeviceExperts {
    /// `fp4::tiled` layout: `codes` = `TiledShape::code_bytes()`, `scales` = `scale_bytes()`.
    Mxfp4 {
        codes: DPtr<u8>,
        scales: DPtr<u8>,
        experts: usize,
        rows: usize,
        k: usize,
    },
    /// `[E·rows, K]` row-major.
    Dense { w: DeviceMatrix, experts: usize },
}

impl DeviceExperts {
    pub fn experts(&self) -> usize {
        match self {
            DeviceExperts::Mxfp4 { experts, .. } | DeviceExperts::Dense { experts, .. } => *experts,
        }
    }
    /// Rows of one expert.
    pub fn rows(&self) -> usize {
        match self {
            DeviceExperts::Mxfp4 { rows, .. } => *rows,
            DeviceExperts::Dense { w, experts } => w.rows / experts,
        }
    }
    pub fn k(&self) -> usize {
        match self {
            DeviceExperts::Mxfp4 { k, .. } => *k,
            DeviceExperts::Dense { w, .. } => w.cols,
        }
    }
    /// Bytes of one expert's weights as stored (codes + scales, or dense values).
    pub fn expert_bytes(&self) -> usize {
        match self {
            DeviceExperts::Mxfp4 { rows, k, .. } => rows * k / 2 + rows * k / fp4::BLOCK,
            DeviceExperts::Dense { w, experts } => w.bytes() / experts,
        }
    }
}

/// A MoE block's experts on the device.
#[derive(Debug, Clone, Copy)]
pub struct DeviceMoe {
    /// `[E, 2I, H]`, interleaved gate/up rows.
    pub gate_up: DeviceExperts,
    /// `[E, 2I]` interleaved (gpt-oss), f32.
    pub gate_up_bias: Option<DPtr<f32>>,
    /// `[E, H, I]`.
    pub down: DeviceExperts,
    /// `[E, H]` (gpt-oss), f32.
    pub down_bias: Option<DPtr<f32>>,
    pub n_experts: usize,
    /// Intermediate size I.
    pub inter: usize,
    pub hidden: usize,
}

/// Most experts a MoE block may have (the kernels' expert bitmap).
pub const MAX_EXPERTS: usize = abi::MOE_MAX_EXPERT_WORDS * 32;
/// Most experts per token.
pub const MAX_TOP_K: usize = 16;
const MAX_WARPS: usize = abi::MOE_MAX_WARPS;

/// The MXFP4 launch shape `(warps per CTA, row groups per CTA, token pairs)` for `t` tokens and
/// `group_ctas` = slots × 16-row groups, as measured best at gpt-oss-20b shapes on an H100
/// (`kernels/NOTES.md`, MoE entry): decode with many groups per SM (gate_up) runs one CTA of 16
/// warps per SM, streaming all of its row groups; smaller grids (down) and 2–4 tokens use
/// 8-warp CTAs of 2 groups; 8–16 tokens (≈ 2–3 entries per expert) take 2 token pairs per pass
/// and 4 groups per CTA.
fn mx_launch_shape(t: usize, group_ctas: usize, sm_count: usize) -> (usize, usize, usize) {
    if t == 1 && group_ctas >= 8 * sm_count {
        (16, group_ctas.div_ceil(sm_count), 1)
    } else if t <= 4 {
        (8, 2, 1)
    } else {
        (8, 4, 2)
    }
}
const DENSE_WARPS: usize = 8;

/// f32 roundings on the longest path of one term through the dense expert kernels (for
/// `fp4::cpu::dot_error_bound`-style bounds `γ_n·Σ|w·x|`): ≤ K/32 FMAs in a lane (products are
/// exact in f32 before the first FMA rounding) and a 5-level butterfly over the warp, plus one
/// for the bias.
pub fn dense_roundings(k: usize) -> usize {
    k / 32 + 1 + 5 + 1
}

fn invalid(msg: String) -> RuntimeError {
    RuntimeError::Invalid(msg)
}

/// The device row order of gate/up: device row `r` holds source row `gate_up_source_row(..)`.
fn gate_up_source_row(layout: GateUpLayout, r: usize, inter: usize) -> usize {
    match layout {
        GateUpLayout::Interleaved => r,
        GateUpLayout::Halves if r.is_multiple_of(2) => r / 2,
        GateUpLayout::Halves => inter + r / 2,
    }
}

/// One stack (gate_up or down) of `m`'s experts, rows in device order (`order(r)` = source row).
fn upload_stack(
    arena: &mut Arena,
    mats: &[&ExpertMat],
    rows: usize,
    k: usize,
    order: impl Fn(usize) -> usize,
    what: &str,
) -> Result<DeviceExperts, RuntimeError> {
    let experts = mats.len();
    let all_mx = mats.iter().all(|m| matches!(m, ExpertMat::Mxfp4(_)));
    let all_dense = mats.iter().all(|m| matches!(m, ExpertMat::Dense(_)));
    for (e, m) in mats.iter().enumerate() {
        if m.rows() != rows || m.cols() != k {
            return Err(invalid(format!(
                "{what}: expert {e} is {}x{}, expert 0 is {rows}x{k}",
                m.rows(),
                m.cols()
            )));
        }
    }
    if all_mx {
        if !k.is_multiple_of(fp4::BLOCK) {
            return Err(invalid(format!(
                "{what}: MXFP4 K = {k} is not a multiple of 32"
            )));
        }
        let nb = k / fp4::BLOCK;
        let mut blocks = Vec::with_capacity(experts * rows * nb * fp4::BLOCK_BYTES);
        let mut scales = Vec::with_capacity(experts * rows * nb);
        for m in mats {
            let ExpertMat::Mxfp4(m) = m else {
                unreachable!()
            };
            // Validated segment by segment (MiMo's `[gate; up]` may be two views).
            m.parts().map_err(|e| invalid(format!("{what}: {e}")))?;
            for r in 0..rows {
                let src = order(r);
                blocks.extend_from_slice(m.row_blocks(src));
                scales.extend_from_slice(m.row_scales(src));
            }
        }
        let stack = fp4::MxExpertsRef::new(experts, rows, k, &blocks, &scales)
            .map_err(|e| invalid(format!("{what}: {e}")))?;
        let (_, codes, tiled_scales) = tiled::tile(stack);
        drop((blocks, scales));
        Ok(DeviceExperts::Mxfp4 {
            codes: arena.upload(&codes, what)?,
            scales: arena.upload(&tiled_scales, what)?,
            experts,
            rows,
            k,
        })
    } else if all_dense {
        if !k.is_multiple_of(8) {
            return Err(RuntimeError::Unsupported(format!(
                "{what}: dense expert K = {k} is not a multiple of 8"
            )));
        }
        let dense: Vec<&model::weights::Mat> = mats
            .iter()
            .map(|m| match m {
                ExpertMat::Dense(m) => m,
                ExpertMat::Mxfp4(_) => unreachable!("all dense"),
            })
            .collect();
        let pick = |p: usize| (p / rows, order(p % rows));
        Ok(DeviceExperts::Dense {
            w: DeviceMatrix::from_rows(arena, &dense, experts * rows, k, pick, what)?,
            experts,
        })
    } else {
        Err(RuntimeError::Unsupported(format!(
            "{what}: a mix of MXFP4 and dense experts"
        )))
    }
}

/// The stacked biases `[E, rows]` in device row order, or `None` when no expert has one.
fn upload_bias(
    arena: &mut Arena,
    biases: &[Option<&Vec<f32>>],
    rows: usize,
    order: impl Fn(usize) -> usize,
    what: &str,
) -> Result<Option<DPtr<f32>>, RuntimeError> {
    if biases.iter().all(|b| b.is_none()) {
        return Ok(None);
    }
    let mut data = Vec::with_capacity(biases.len() * rows);
    for (e, b) in biases.iter().enumerate() {
        let b = b.ok_or_else(|| invalid(format!("{what}: expert {e} has no bias, others do")))?;
        if b.len() != rows {
            return Err(invalid(format!(
                "{what}: expert {e} has {} bias values, want {rows}",
                b.len()
            )));
        }
        data.extend((0..rows).map(|r| b[order(r)]));
    }
    Ok(Some(arena.upload(&data, what)?))
}

/// Fills `n` bytes at `addr` with `lo + hash % span` / `n` f32 with uniform `[-scale, scale)`
/// (the synthetic-weight kernels of `kernels/mxfp4.cu`).
struct Filler {
    bytes: CudaFunction,
    floats: CudaFunction,
    grid: u32,
}

impl Filler {
    fn new(ctx: &Arc<CudaContext>) -> Result<Self, RuntimeError> {
        let module = ultra_kernels::load(ctx, &ultra_kernels::MXFP4)?;
        let sms = ctx.attribute(CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)?;
        Ok(Self {
            bytes: module.load_function("moe_fill_bytes")?,
            floats: module.load_function("moe_fill_f32")?,
            grid: sms as u32 * 8,
        })
    }
    fn cfg(&self) -> LaunchConfig {
        LaunchConfig {
            grid_dim: (self.grid, 1, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        }
    }
    fn bytes(
        &self,
        s: &CudaStream,
        p: DPtr<u8>,
        lo: u8,
        span: u32,
        seed: u64,
    ) -> Result<(), RuntimeError> {
        let (addr, n, lo) = (p.addr(), p.len() as u64, lo as u32);
        let mut b = s.launch_builder(&self.bytes);
        b.arg(&addr).arg(&n).arg(&seed).arg(&lo).arg(&span);
        // SAFETY: matches `moe_fill_bytes(u8*, u64, u64, u32, u32)`; p is a live allocation.
        unsafe { b.launch(self.cfg()) }?;
        Ok(())
    }
    fn floats(
        &self,
        s: &CudaStream,
        p: DPtr<f32>,
        scale: f32,
        seed: u64,
    ) -> Result<(), RuntimeError> {
        let (addr, n) = (p.addr(), p.len() as u64);
        let mut b = s.launch_builder(&self.floats);
        b.arg(&addr).arg(&n).arg(&seed).arg(&scale);
        // SAFETY: matches `moe_fill_f32(float*, u64, u64, float)`; p is a live allocation.
        unsafe { b.launch(self.cfg()) }?;
        Ok(())
    }
}

impl DeviceMoe {
    /// Uploads the experts of `m` (every expert MXFP4, or every expert dense — mixed stacks are a
    /// [`RuntimeError::Unsupported`]).
    pub fn upload(arena: &mut Arena, m: &Moe) -> Result<Self, RuntimeError> {
        let n = m.experts.len();
        if n == 0 || n > MAX_EXPERTS {
            return Err(RuntimeError::Unsupported(format!(
                "a MoE block of {n} experts (supported: 1..={MAX_EXPERTS})"
            )));
        }
        let i2 = m.experts[0].gate_up.rows();
        let hidden = m.experts[0].gate_up.cols();
        if !i2.is_multiple_of(2) || i2 == 0 {
            return Err(invalid(format!("gate_up has {i2} rows: want 2·I")));
        }
        let inter = i2 / 2;
        let layout = m.gate_up_layout;
        let order = move |r| gate_up_source_row(layout, r, inter);
        let gu: Vec<&ExpertMat> = m.experts.iter().map(|e| &e.gate_up).collect();
        let dn: Vec<&ExpertMat> = m.experts.iter().map(|e| &e.down).collect();
        let gate_up = upload_stack(arena, &gu, i2, hidden, order, "expert gate_up")?;
        let down = upload_stack(arena, &dn, hidden, inter, |r| r, "expert down")?;
        let gub: Vec<_> = m.experts.iter().map(|e| e.gate_up_bias.as_ref()).collect();
        let db: Vec<_> = m.experts.iter().map(|e| e.down_bias.as_ref()).collect();
        Ok(Self {
            gate_up,
            gate_up_bias: upload_bias(arena, &gub, i2, order, "expert gate_up bias")?,
            down,
            down_bias: upload_bias(arena, &db, hidden, |r| r, "expert down bias")?,
            n_experts: n,
            inter,
            hidden,
        })
    }

    /// Random MXFP4 experts of the given shape, generated on the device (benchmarks at real
    /// model sizes without a checkpoint): codes uniform, scale bytes in a range that keeps
    /// activations O(1); biases uniform small when `bias`.
    ///
    /// Scales: uniform E2M1 codes have an RMS of ≈ 2.93, so a row of K weights with scales
    /// around `2^c`, `c = −log2(2.93·√K)`, maps O(1) inputs to O(1) outputs; the scale bytes are
    /// uniform over the four exponents `c − 2 ..= c + 1`. Biases are uniform in ±0.1. `_ops`
    /// is not used: this is [`DeviceMoe::synthetic_mxfp4`] (the fills are `kernels/mxfp4.cu`'s).
    pub fn synthetic(
        arena: &mut Arena,
        _ops: &crate::ops::Ops,
        n_experts: usize,
        hidden: usize,
        inter: usize,
        bias: bool,
        seed: u64,
    ) -> Result<Self, RuntimeError> {
        Self::synthetic_mxfp4(arena, n_experts, hidden, inter, bias, seed)
    }

    /// [`DeviceMoe::synthetic`] without the `Ops` handle.
    pub fn synthetic_mxfp4(
        arena: &mut Arena,
        n_experts: usize,
        hidden: usize,
        inter: usize,
        bias: bool,
        seed: u64,
    ) -> Result<Self, RuntimeError> {
        if n_experts == 0 || n_experts > MAX_EXPERTS {
            return Err(RuntimeError::Unsupported(format!(
                "a MoE block of {n_experts} experts (supported: 1..={MAX_EXPERTS})"
            )));
        }
        if hidden == 0
            || inter == 0
            || !hidden.is_multiple_of(fp4::BLOCK)
            || !inter.is_multiple_of(fp4::BLOCK)
        {
            return Err(invalid(format!(
                "synthetic MXFP4 experts need hidden ({hidden}) and inter ({inter}) to be positive multiples of 32"
            )));
        }
        let stream = arena.stream().clone();
        let fill = Filler::new(stream.context())?;
        let mut stack = |rows: usize, k: usize, seed: u64, what: &str| {
            let shape = TiledShape {
                experts: n_experts,
                rows,
                k,
            };
            let codes = arena.alloc::<u8>(shape.code_bytes(), what)?;
            let scales = arena.alloc::<u8>(shape.scale_bytes(), what)?;
            let c = -(2.93 * (k as f64).sqrt()).log2();
            let lo = (127.0 + c.round() - 2.0) as u8;
            fill.bytes(&stream, codes, 0, 256, seed)?;
            fill.bytes(&stream, scales, lo, 4, seed ^ 0x5CA1E)?;
            Ok::<_, RuntimeError>(DeviceExperts::Mxfp4 {
                codes,
                scales,
                experts: n_experts,
                rows,
                k,
            })
        };
        let gate_up = stack(2 * inter, hidden, seed, "synthetic gate_up")?;
        let down = stack(hidden, inter, seed ^ 0xD0_57, "synthetic down")?;
        let (gate_up_bias, down_bias) = if bias {
            let gb = arena.alloc::<f32>(n_experts * 2 * inter, "synthetic gate_up bias")?;
            let db = arena.alloc::<f32>(n_experts * hidden, "synthetic down bias")?;
            fill.floats(&stream, gb, 0.1, seed ^ 0xB1A5)?;
            fill.floats(&stream, db, 0.1, seed ^ 0xB1A6)?;
            (Some(gb), Some(db))
        } else {
            (None, None)
        };
        stream.synchronize()?;
        Ok(Self {
            gate_up,
            gate_up_bias,
            down,
            down_bias,
            n_experts,
            inter,
            hidden,
        })
    }
}

/// Launch-shape overrides of the MXFP4 expert kernels (for benchmarks; `None` = the built-in
/// choice).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct MoeTuning {
    /// Warps per CTA, 1..=16.
    pub warps: Option<usize>,
    /// Consecutive 16-row groups per CTA (≥ 1): the CTA's prologue (expert lookup, activation
    /// prep) is shared by them and its warps stream their tiles as one sequence.
    pub row_groups: Option<usize>,
    /// Token pairs per pass over the weights: 1, 2 or 4 (entries of one expert beyond
    /// `2·token_pairs` take another pass, mostly from L2).
    pub token_pairs: Option<usize>,
}

/// One projection's kernels: MXFP4 by token pairs (1, 2, 4), dense bf16 / f32 by entries per
/// pass (1, 4).
struct ProjKernels {
    mx: [CudaFunction; 3],
    bf16: [CudaFunction; 2],
    f32: [CudaFunction; 2],
}

impl ProjKernels {
    fn load(module: &Arc<cudarc::driver::CudaModule>, proj: &str) -> Result<Self, RuntimeError> {
        let f = |name: String| module.load_function(&name);
        Ok(Self {
            mx: [
                f(format!("moe_mx_{proj}_np1"))?,
                f(format!("moe_mx_{proj}_np2"))?,
                f(format!("moe_mx_{proj}_np4"))?,
            ],
            bf16: [
                f(format!("moe_dense_{proj}_bf16_c1"))?,
                f(format!("moe_dense_{proj}_bf16_c4"))?,
            ],
            f32: [
                f(format!("moe_dense_{proj}_f32_c1"))?,
                f(format!("moe_dense_{proj}_f32_c4"))?,
            ],
        })
    }
}

/// The loaded expert kernels.
pub struct MoeKernels {
    gate_up: ProjKernels,
    down: ProjKernels,
    /// Expert parallelism (`kernels/ep.cu`): `ep_localize`, `ep_combine`.
    ep_localize: CudaFunction,
    ep_combine: CudaFunction,
    sm_count: usize,
    max_smem: usize,
    tuning: MoeTuning,
}

/// The launch shape of one MXFP4 expert projection ([`MoeKernels::mx_shape`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct MxShape {
    /// Warps per CTA.
    pub(crate) warps: usize,
    /// 16-row groups per CTA.
    pub(crate) row_groups: usize,
    /// Token pairs per pass of the tile loop.
    pub(crate) pairs: usize,
    /// Dynamic shared memory bytes of one CTA.
    pub(crate) smem: usize,
}

/// Dynamic shared memory of the MXFP4 kernels: prepared activations of `2·pairs` entries
/// (`K_pad + 8` halves each), their block factors and the warps' partial sums of each row group.
fn mx_smem_bytes(k: usize, pairs: usize, warps: usize, row_groups: usize) -> usize {
    let k_pad = k.div_ceil(128) * 128;
    let ch = 2 * pairs;
    ch * (k_pad + 8) * 2 + ch * (k_pad / 32) * 4 + row_groups * warps * ch * 16 * 4
}

impl MoeKernels {
    pub fn load(ctx: &Arc<CudaContext>) -> Result<Self, RuntimeError> {
        let module = ultra_kernels::load(ctx, &ultra_kernels::MXFP4)?;
        let gate_up = ProjKernels::load(&module, "gate_up")?;
        let down = ProjKernels::load(&module, "down")?;
        let ep = ultra_kernels::load(ctx, &ultra_kernels::EP)?;
        let ep_localize = ep.load_function("ep_localize")?;
        let ep_combine = ep.load_function("ep_combine")?;
        let sm_count =
            ctx.attribute(CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)? as usize;
        let max_smem = ctx
            .attribute(CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN)?
            as usize;
        // The static MoeSlot table (≈ 2.3 KB) shares the opt-in limit with the dynamic part.
        let max_dynamic = max_smem.saturating_sub(4096);

        for f in gate_up.mx.iter().chain(&down.mx) {
            f.set_attribute(
                CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                max_dynamic as i32,
            )?;
        }
        Ok(Self {
            gate_up,
            down,
            ep_localize,
            ep_combine,
            sm_count,
            max_smem: max_dynamic,
            tuning: MoeTuning::default(),
        })
    }

    /// Overrides the launch shapes (benchmarks); checked for validity.
    pub fn set_tuning(&mut self, t: MoeTuning) -> Result<(), RuntimeError> {
        if !(1..=MAX_WARPS).contains(&t.warps.unwrap_or(1))
            || t.row_groups == Some(0)
            || !matches!(t.token_pairs, None | Some(1 | 2 | 4))
        {
            return Err(invalid(format!("MoE tuning {t:?}")));
        }
        self.tuning = t;
        Ok(())
    }

    /// The launch shape of the MXFP4 kernels for one projection of `t` tokens with top-`k`
    /// routing over `w` (the measured defaults of [`mx_launch_shape`], the tuning overrides, and
    /// fewer row groups per CTA where their partial sums would not fit shared memory). The
    /// persistent engine runs its expert tiles as CTAs of this shape (`tilert::persistent`).
    pub(crate) fn mx_shape(
        &self,
        w: &DeviceExperts,
        t: usize,
        k: usize,
    ) -> Result<MxShape, RuntimeError> {
        let groups = w.rows().div_ceil(16);
        let slots = (t * k).min(w.experts());
        let (warps, rg, pairs) = mx_launch_shape(t, slots * groups, self.sm_count);
        let pairs = self.tuning.token_pairs.unwrap_or(pairs);
        let warps = self.tuning.warps.unwrap_or(warps);
        let mut rg = self.tuning.row_groups.unwrap_or(rg).min(groups);
        while self.tuning.row_groups.is_none()
            && rg > 1
            && mx_smem_bytes(w.k(), pairs, warps, rg) > self.max_smem
        {
            rg /= 2; // fewer groups' partial sums when K is very large
        }
        let smem = mx_smem_bytes(w.k(), pairs, warps, rg);
        if smem > self.max_smem {
            return Err(RuntimeError::Unsupported(format!(
                "MXFP4 experts with K = {}: {smem} bytes of shared memory needed, {} available",
                w.k(),
                self.max_smem
            )));
        }
        Ok(MxShape {
            warps,
            row_groups: rg,
            pairs,
            smem,
        })
    }

    /// Scratch elements (f32) the two launches need for `t` tokens with top-`k` routing (none:
    /// the activation prep is fused into the kernels).
    pub fn scratch_len(_m: &DeviceMoe, _t: usize, _k: usize) -> usize {
        0
    }

    fn check_routing(
        m: &DeviceMoe,
        t: usize,
        k: usize,
        ids: DPtr<i32>,
    ) -> Result<(), RuntimeError> {
        if t == 0 || t > MAX_TOKENS {
            return Err(invalid(format!("{t} tokens (supported: 1..={MAX_TOKENS})")));
        }
        // k may exceed the stack's experts: an expert-parallel rank holds a few of the
        // router's experts (entries routed elsewhere carry id -1, see `MoeKernels::localize`).
        if k == 0 || k > MAX_TOP_K {
            return Err(invalid(format!(
                "top-{k} of {} experts (supported: 1..={MAX_TOP_K})",
                m.n_experts
            )));
        }
        if ids.len() < t * k {
            return Err(invalid(format!("ids hold {}, need {t}×{k}", ids.len())));
        }
        Ok(())
    }

    /// Launches one projection over the distinct experts of `ids`.
    #[allow(clippy::too_many_arguments)]
    fn launch(
        &self,
        s: &CudaStream,
        kernels: &ProjKernels,
        w: &DeviceExperts,
        t: usize,
        k: usize,
        mut p: MoeParams,
    ) -> Result<(), RuntimeError> {
        let rows = w.rows();
        let slots = (t * k).min(w.experts());
        p.n_experts = w.experts() as u32;
        p.rows = rows as u32;
        p.k = w.k() as u32;
        p.n_ids = (t * k) as u32;
        let (func, cfg) = match w {
            DeviceExperts::Mxfp4 { codes, scales, .. } => {
                p.w = codes.addr();
                p.scales = scales.addr();
                let groups = rows.div_ceil(16);
                let MxShape {
                    warps,
                    row_groups: rg,
                    pairs,
                    smem,
                } = self.mx_shape(w, t, k)?;
                p.row_groups = rg as u32;
                let f = &kernels.mx[pairs.trailing_zeros() as usize];
                let cfg = LaunchConfig {
                    grid_dim: ((slots * groups.div_ceil(rg)) as u32, 1, 1),
                    block_dim: (32 * warps as u32, 1, 1),
                    shared_mem_bytes: smem as u32,
                };
                (f, cfg)
            }
            DeviceExperts::Dense { w: dm, .. } => {
                let c = usize::from(t > 1);
                let f = match dm.data {
                    DenseData::Bf16(d) => {
                        p.w = d.addr();
                        &kernels.bf16[c]
                    }
                    DenseData::F32(d) => {
                        p.w = d.addr();
                        &kernels.f32[c]
                    }
                    DenseData::Tiled(_) => {
                        return Err(RuntimeError::Unsupported(
                            "dense experts are row-major, not tiled".into(),
                        ))
                    }
                };
                p.row_groups = 1;
                let cfg = LaunchConfig {
                    grid_dim: ((slots * rows.div_ceil(2 * DENSE_WARPS)) as u32, 1, 1),
                    block_dim: (32 * DENSE_WARPS as u32, 1, 1),
                    shared_mem_bytes: 0,
                };
                (f, cfg)
            }
        };
        let mut params = [&mut p as *mut MoeParams as *mut std::ffi::c_void];
        // SAFETY: every kernel of this family takes one `MoeParams` by value and begins with
        // pdl_begin(); the buffer lengths were checked by the callers and the shapes come from
        // the uploaded experts.
        unsafe {
            crate::launch::launch_raw(
                s,
                func,
                cfg.grid_dim,
                cfg.block_dim.0,
                cfg.shared_mem_bytes,
                &mut params,
            )
        }
    }

    /// `act[t][j] = glu(W_gu[ids[t][j]] · h[t] + b_gu)` for every `(t, j)`, `h` `[T, H]`,
    /// `act` `[T, k, I]`; each distinct expert read once.
    #[allow(clippy::too_many_arguments)]
    pub fn gate_up(
        &self,
        s: &CudaStream,
        m: &DeviceMoe,
        glu: GluArgs,
        h: DPtr<f32>,
        t: usize,
        k: usize,
        ids: DPtr<i32>,
        _scratch: DPtr<f32>,
        act: DPtr<f32>,
    ) -> Result<(), RuntimeError> {
        Self::check_routing(m, t, k, ids)?;
        if h.len() < t * m.hidden || act.len() < t * k * m.inter {
            return Err(invalid(format!(
                "gate_up: h holds {} (need {t}×{}), act {} (need {t}×{k}×{})",
                h.len(),
                m.hidden,
                act.len(),
                m.inter
            )));
        }
        let (glu, alpha, limit) = match glu {
            GluArgs::ClampedSwiglu { alpha, limit } => (0, alpha, limit),
            GluArgs::Swiglu => (1, 0.0, 0.0),
        };
        let p = MoeParams {
            w: 0,
            scales: 0,
            ids: ids.addr(),
            x: h.addr(),
            bias: addr_or_null(m.gate_up_bias),
            route_w: 0,
            out: act.addr(),
            n_experts: 0,
            rows: 0,
            k: 0,
            n_ids: 0,
            x_div: k as u32,
            row_groups: 1,
            glu,
            pad: 0,
            alpha,
            limit,
        };
        self.launch(s, &self.gate_up, &m.gate_up, t, k, p)
    }

    /// `y[t][j] = weights[t][j] · (W_d[ids[t][j]] · act[t][j] + b_d)`, `y` `[T, k, H]`; each
    /// distinct expert read once.
    #[allow(clippy::too_many_arguments)]
    pub fn down(
        &self,
        s: &CudaStream,
        m: &DeviceMoe,
        act: DPtr<f32>,
        t: usize,
        k: usize,
        ids: DPtr<i32>,
        weights: DPtr<f32>,
        _scratch: DPtr<f32>,
        y: DPtr<f32>,
    ) -> Result<(), RuntimeError> {
        Self::check_routing(m, t, k, ids)?;
        if act.len() < t * k * m.inter || weights.len() < t * k || y.len() < t * k * m.hidden {
            return Err(invalid(format!(
                "down: act holds {} (need {t}×{k}×{}), weights {} (need {t}×{k}), y {} (need {t}×{k}×{})",
                act.len(),
                m.inter,
                weights.len(),
                y.len(),
                m.hidden
            )));
        }
        let p = MoeParams {
            w: 0,
            scales: 0,
            ids: ids.addr(),
            x: act.addr(),
            bias: addr_or_null(m.down_bias),
            route_w: weights.addr(),
            out: y.addr(),
            n_experts: 0,
            rows: 0,
            k: 0,
            n_ids: 0,
            x_div: 1,
            row_groups: 1,
            glu: 0,
            pad: 0,
            alpha: 0.0,
            limit: 0.0,
        };
        self.launch(s, &self.down, &m.down, t, k, p)
    }

    /// Expert parallelism: rewrites the routing ids `[n]` in place to the local ids of a rank
    /// holding experts `lo..hi` (`id − lo`; `-1` for every entry routed to another rank), so
    /// [`MoeKernels::gate_up`] / [`MoeKernels::down`] over the rank's stack of `hi − lo` experts
    /// run only its own (they write NaN rows for the `-1` entries, which
    /// [`MoeKernels::combine_local`] skips).
    pub fn localize(
        &self,
        s: &CudaStream,
        ids: DPtr<i32>,
        n: usize,
        lo: usize,
        hi: usize,
    ) -> Result<(), RuntimeError> {
        if n == 0 || n > abi::MOE_MAX_IDS || ids.len() < n {
            return Err(invalid(format!(
                "localize: {n} routing entries (1..={}, buffer of {})",
                abi::MOE_MAX_IDS,
                ids.len()
            )));
        }
        if lo >= hi || hi > MAX_EXPERTS {
            return Err(invalid(format!("localize: experts {lo}..{hi}")));
        }
        let (mut a, mut n32, mut lo32, mut hi32) = (ids.addr(), n as u32, lo as i32, hi as i32);
        let mut params = [
            &mut a as *mut u64 as *mut std::ffi::c_void,
            &mut n32 as *mut u32 as *mut std::ffi::c_void,
            &mut lo32 as *mut i32 as *mut std::ffi::c_void,
            &mut hi32 as *mut i32 as *mut std::ffi::c_void,
        ];
        // SAFETY: matches `ep_localize(int32_t*, uint32_t, int32_t, int32_t)`; `ids` holds `n`
        // entries (checked); the kernel begins with pdl_begin().
        unsafe { crate::launch::launch_raw(s, &self.ep_localize, (1, 1, 1), 256, 0, &mut params) }
    }

    /// Expert parallelism: a rank's partial sum `out[t] = Σ_j y[t][j]` over the entries with a
    /// local id (≥ 0, see [`MoeKernels::localize`]) in ascending id, from 0 (`y` `[T, k, H]`,
    /// `out` `[T, H]`): the CPU's `experts_down` over the rank's experts.
    #[allow(clippy::too_many_arguments)]
    pub fn combine_local(
        &self,
        s: &CudaStream,
        out: DPtr<f32>,
        y: DPtr<f32>,
        ids: DPtr<i32>,
        t: usize,
        k: usize,
        h: usize,
    ) -> Result<(), RuntimeError> {
        if t == 0 || t > MAX_TOKENS || k == 0 || k > MAX_TOP_K || h == 0 {
            return Err(invalid(format!(
                "combine_local: {t} tokens, top-{k}, hidden {h}"
            )));
        }
        if out.len() < t * h || y.len() < t * k * h || ids.len() < t * k {
            return Err(invalid(format!(
                "combine_local: out holds {} (need {t}×{h}), y {} (need {t}×{k}×{h}), ids {} (need {t}×{k})",
                out.len(),
                y.len(),
                ids.len()
            )));
        }
        let (mut o, mut ya, mut ia, mut k32, mut h32) =
            (out.addr(), y.addr(), ids.addr(), k as u32, h as u32);
        let mut params = [
            &mut o as *mut u64 as *mut std::ffi::c_void,
            &mut ya as *mut u64 as *mut std::ffi::c_void,
            &mut ia as *mut u64 as *mut std::ffi::c_void,
            &mut k32 as *mut u32 as *mut std::ffi::c_void,
            &mut h32 as *mut u32 as *mut std::ffi::c_void,
        ];
        let blocks = (h as u32).div_ceil(256).min(64);
        // SAFETY: matches `ep_combine(float*, const float*, const int32_t*, uint32_t, uint32_t)`;
        // the buffers hold what the grid (t, blocks) reads and writes (checked); the kernel
        // begins with pdl_begin().
        unsafe {
            crate::launch::launch_raw(
                s,
                &self.ep_combine,
                (t as u32, blocks, 1),
                256,
                0,
                &mut params,
            )
        }
    }
}
