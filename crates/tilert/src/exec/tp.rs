//! Tensor-parallel execution of the step plan: N rank sessions, one per GPU or N "virtual
//! ranks" on one GPU, driven as one [`model::Executor`] ([`TpSession`]).
//!
//! The plan is the one the CPU's simulated ranks interpret: [`model::plan::tp::shard_plan`]
//! (attention by KV-head group, dense and expert FFNs along the intermediate dimension, an
//! `all_reduce` after each `o_proj` and FFN down projection), over the weights
//! [`model::shard::shard_layers`] slices by the same [`TpLayout`]. Each rank is an ordinary
//! [`GpuModel`] holding its shards (embedding, norms, router and LM head replicated) whose plans
//! are [`rank_plan`] views of the sharded plan: the rank's own ops, its buffers renamed to rank
//! 0's, partial sums in a `[T, H]` buffer of its session. The lowering runs them with the same
//! kernels as one device; `o_proj` / `experts_down` / `mlp_down` write the partial sum and the
//! `all_reduce` op is `comm`'s one-shot all-reduce ([`comm::SymmetricGroup`], fp32 partials
//! summed in rank order, the residual add and the next RMSNorm fused: `x += Σ; h = norm(x)`),
//! enqueued on the rank's stream without host synchronisation, so each rank's pass is captured
//! as a CUDA graph and replayed like a single device's.
//!
//! A pass enqueues every rank's pass in rank order (graph launches are asynchronous; each rank's
//! all-reduce kernels spin on device flags until the peers arrive), then waits for every rank
//! and checks the group's status words: a timed-out all-reduce (a rank that never arrived)
//! becomes [`RuntimeError::Comm`], the flags are reset and the session keeps its length as
//! before the call. Logits, greedy ids and hidden states are read from rank 0 (every rank holds
//! the same replicated residual stream).
//!
//! Virtual ranks (`RankPlacement::Virtual`) put every rank on one GPU with its own weights,
//! buffers, stream and flag table: the protocol real peers run, which is how it is tested on one
//! GPU. The process must raise `CUDA_DEVICE_MAX_CONNECTIONS` before its first CUDA call
//! ([`comm::symmetric::prepare_virtual_ranks`]) so the ranks' streams do not share a hardware
//! queue.
//!
//! **Expert parallelism** ([`Parallelism`], `--expert-parallel`): the plan's expert-parallel
//! ranks hold whole experts (a contiguous id range, uploaded as the rank's expert stack); their
//! `experts_gate_up` first rewrites the (replicated) routing to local ids (`MoeKernels::localize`,
//! other ranks' entries −1), the grouped expert kernels run the rank's experts only, and
//! `experts_down` sums them into the rank's partial (`MoeKernels::combine_local`); the
//! `all_reduce` after it is the combine (see `model::plan::tp`).
//!
//! **NCCL** ([`AllReduceKind::Nccl`], `--all-reduce nccl`): the reference and the fallback where
//! GPUs have no peer access. Each `all_reduce` node is then `ncclAllReduce` in place on the
//! rank's partial followed by the residual add and next norm as a separate launch
//! (`Ops::combine` with one term: `x += partial; h = rmsnorm(x)`). NCCL collectives of one
//! process are issued from one thread per rank, so a pass enqueues every rank's ops from its own
//! thread, and launches eagerly (no CUDA graphs with NCCL in them). NCCL needs one GPU per rank:
//! virtual ranks always use the one-shot kernel.
//!
//! Dependency direction: `tilert` (this module) depends on `comm` (device collectives, no model
//! knowledge) and `model` (the plan and the weight sharding); `comm` depends on neither.

use std::sync::{Arc, Mutex};

use comm::symmetric::SymmetricGroup;
use comm::{AllReduce, DType, Epilogue, NcclRank};
use cudarc::driver::CudaStream;
use model::config::ModelConfig;
use model::plan::tp::{shard_plan, Parallelism, TpLayout};
use model::plan::{Buf, OpKind, PassShape, Placement, Plan};
use model::weights::{Bytes, Expert, ExpertMat, Mlp, MxMat, Weights};
use model::VerifyOutput;

use super::{
    open, plan_error, synthetic_target, upload_ropes, upload_target, GpuModel, GpuSession, Logits,
    DEFAULT_MAX_ROLLBACK, DEVICE_STORAGE,
};
use crate::arena::{dtoh, Arena, DPtr};
use crate::ops::MAX_TOKENS;
use crate::RuntimeError;

/// Where the ranks of a tensor-parallel model run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RankPlacement {
    /// Rank `r` on GPU `devices[r]` (one GPU per rank; peer access between every pair).
    Devices(Vec<usize>),
    /// Every rank on GPU `device` (virtual ranks: separate weights, buffers, streams and flags).
    Virtual { device: usize },
}

impl RankPlacement {
    /// The GPU of each of `ranks` ranks; checks the list without touching a device.
    pub fn ordinals(&self, ranks: usize) -> Result<Vec<usize>, RuntimeError> {
        match self {
            RankPlacement::Virtual { device } => Ok(vec![*device; ranks]),
            RankPlacement::Devices(d) => {
                if d.len() != ranks {
                    return Err(RuntimeError::Invalid(format!(
                        "{} GPU(s) listed for {ranks} tensor-parallel ranks: list one GPU per \
                         rank, or run every rank on one GPU as virtual ranks",
                        d.len()
                    )));
                }
                for (i, a) in d.iter().enumerate() {
                    if d[..i].contains(a) {
                        return Err(RuntimeError::Invalid(format!(
                            "GPU {a} is listed twice (one rank per GPU; virtual ranks put every \
                             rank on one GPU)"
                        )));
                    }
                }
                Ok(d.clone())
            }
        }
    }
}

/// Which all-reduce the `all_reduce` nodes run (`--all-reduce`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum AllReduceKind {
    /// The one-shot kernel where it can run (virtual ranks, or GPUs with peer access between
    /// every pair), else NCCL (with a note in [`TpModel::all_reduce_note`]).
    #[default]
    Auto,
    /// `comm`'s one-shot all-reduce over peer memory, residual add and next norm fused (needs
    /// peer access between the GPUs).
    OneShot,
    /// NCCL's all-reduce, then the residual add and next norm (one GPU per rank).
    Nccl,
}

impl std::fmt::Display for AllReduceKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            AllReduceKind::Auto => "auto",
            AllReduceKind::OneShot => "one-shot",
            AllReduceKind::Nccl => "NCCL",
        })
    }
}

/// How a [`TpModel`] splits the model and reduces between its ranks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TpOptions {
    pub parallelism: Parallelism,
    pub all_reduce: AllReduceKind,
}

impl TpOptions {
    /// Tensor parallelism over `ranks`, the default all-reduce.
    pub fn tensor(ranks: usize) -> TpOptions {
        TpOptions {
            parallelism: Parallelism::tensor(ranks),
            all_reduce: AllReduceKind::Auto,
        }
    }
}

/// Whether the routed experts are MXFP4 (their intermediate dimension splits at 32-element
/// blocks).
fn mxfp4_experts(w: &Weights) -> bool {
    w.layers.iter().any(|l| match &l.mlp {
        Mlp::Moe(m) => m
            .experts
            .iter()
            .any(|e| matches!(e.gate_up, ExpertMat::Mxfp4(_))),
        Mlp::Dense { .. } => false,
    })
}

/// The layout of `config` over `ranks` ranks on the GPU, checked without a device: the head
/// counts must split (the plan's rule), and every rank must hold part of each dense FFN (an
/// MXFP4 expert slice may be empty: the rank then holds one zero block, see [`rank_weights`]).
pub fn gpu_layout(
    config: &ModelConfig,
    ranks: usize,
    mxfp4: bool,
) -> Result<TpLayout, RuntimeError> {
    gpu_layout_with(config, Parallelism::tensor(ranks), mxfp4)
}

/// [`gpu_layout`] split as `par` says (tensor and/or expert parallelism): experts that do not
/// divide over the ranks, and heads that do not split with tensor-parallel attention, are
/// errors naming the counts.
pub fn gpu_layout_with(
    config: &ModelConfig,
    par: Parallelism,
    mxfp4: bool,
) -> Result<TpLayout, RuntimeError> {
    let ranks = par.ranks;
    if ranks == 0 || ranks > comm::abi::COMM_MAX_RANKS as usize {
        return Err(RuntimeError::Invalid(format!(
            "{par}: 1..={} ranks are supported",
            comm::abi::COMM_MAX_RANKS
        )));
    }
    let layout = TpLayout::with(config, par, mxfp4).map_err(plan_error)?;
    for (l, (ls, spec)) in layout.layers.iter().zip(&config.layers).enumerate() {
        let empty_ok = spec.moe && mxfp4;
        if let Some(r) = ls.intermediate.iter().position(|i| i.is_empty()) {
            if !empty_ok {
                let i: usize = ls.intermediate.iter().map(|i| i.len()).sum();
                return Err(RuntimeError::Invalid(format!(
                    "tensor parallelism over {ranks} ranks: layer {l}'s {} intermediate size \
                     {i} leaves rank {r} no part of it",
                    if spec.moe { "expert" } else { "dense MLP" }
                )));
            }
        }
    }
    Ok(layout)
}

/// One zero MXFP4 block per row (scale 1): the intermediate slice of a rank that holds none of
/// an MXFP4 expert's (its gate/up output is zero, so its down projection adds only the bias —
/// exactly what the CPU's empty slice computes).
fn zero_mx(rows: usize, k: usize) -> MxMat {
    let g = k / fp4::BLOCK;
    MxMat::from_bytes(
        rows,
        k,
        Bytes::from_vec(vec![0u8; rows * g * 16]),
        Bytes::from_vec(vec![127u8; rows * g]),
    )
}

/// Rank `r`'s weights: its sharded layers (empty MXFP4 expert slices padded with one zero
/// block) and the replicated embedding, final norm and LM head.
fn rank_weights(weights: &Weights, layers: Vec<model::weights::Layer>) -> Weights {
    let layers = layers
        .into_iter()
        .map(|mut l| {
            if let Mlp::Moe(m) = &mut l.mlp {
                if m.experts.first().is_some_and(|e| e.gate_up.rows() == 0) {
                    let b = fp4::BLOCK;
                    m.experts = m
                        .experts
                        .iter()
                        .map(|e| {
                            let h = e.gate_up.cols();
                            Expert {
                                gate_up: ExpertMat::Mxfp4(zero_mx(2 * b, h)),
                                gate_up_bias: e.gate_up_bias.as_ref().map(|_| vec![0.0; 2 * b]),
                                down: ExpertMat::Mxfp4(zero_mx(e.down.rows(), b)),
                                down_bias: e.down_bias.clone(),
                            }
                        })
                        .collect();
                }
            }
            l
        })
        .collect();
    Weights {
        embed: weights.embed.clone(),
        layers,
        final_norm: weights.final_norm.clone(),
        lm_head: weights.lm_head.clone(),
    }
}

/// Rank `rank`'s part of the sharded `plan`: its own ops and the replicated ones (the LM head and
/// sampling on rank 0 only: only its logits are read), in order, its buffers renamed to rank 0's (`q@r` → `q`, `partial@r` → `partial@0`, ...), weight shards
/// resolved to the rank's own tensors, each `all_reduce` reading the rank's partial sum, and the
/// taps following the ops they followed. An unsharded plan is returned as it is.
pub fn rank_plan(plan: &Plan, rank: usize) -> Result<Plan, RuntimeError> {
    // An unsharded plan is its own rank 0; a plan sharded over one rank (TP1: its ops placed on
    // rank 0, its all-reduces of one) goes through the general path like any other.
    if plan
        .ops
        .iter()
        .all(|o| o.placement == Placement::Replicated)
    {
        return Ok(plan.clone());
    }
    if rank >= plan.ranks {
        return Err(RuntimeError::Invalid(format!(
            "rank {rank} of a plan over {} ranks",
            plan.ranks
        )));
    }
    let local = |b: Buf| match b {
        Buf::Q(r) if r == rank => Buf::Q(0),
        Buf::Attn(r) if r == rank => Buf::Attn(0),
        Buf::Act(r) if r == rank => Buf::Act(0),
        Buf::Partial(r) if r == rank => Buf::Partial(0),
        Buf::Kv { layer, rank: r } if r == rank => Buf::Kv { layer, rank: 0 },
        b => b,
    };
    // New index of each old op (None: another rank's).
    let mut index = Vec::with_capacity(plan.ops.len());
    let mut ops = Vec::new();
    for op in &plan.ops {
        // Another rank's op; and the LM head and sampling on ranks other than 0 (only rank 0's
        // logits are read: the other ranks would stream the whole replicated head for nothing).
        let skip = matches!(op.placement, Placement::Rank(r) if r != rank)
            || (rank != 0 && matches!(op.kind, OpKind::LmHead(_) | OpKind::Sample(_)));
        if skip {
            index.push(None);
            continue;
        }
        let mut op = op.clone();
        op.placement = Placement::Replicated;
        if let OpKind::AllReduce(_) = op.kind {
            op.inputs = vec![Buf::Partial(0), Buf::X];
        } else {
            op.inputs = op.inputs.iter().map(|&b| local(b)).collect();
        }
        op.outputs = op.outputs.iter().map(|&b| local(b)).collect();
        for w in &mut op.weights {
            w.shard = None;
        }
        index.push(Some(ops.len()));
        ops.push(op);
    }
    let taps = plan
        .taps
        .iter()
        .map(|t| {
            // The tapped op, or the last of this rank's ops before it.
            let after = index[..=t.after]
                .iter()
                .rev()
                .find_map(|i| *i)
                .ok_or_else(|| {
                    RuntimeError::Invalid(format!("tap of hidden {} precedes every op", t.hidden))
                })?;
            Ok(model::plan::Tap { after, ..*t })
        })
        .collect::<Result<Vec<_>, RuntimeError>>()?;
    Ok(Plan {
        ranks: 1,
        ops,
        taps,
        ..plan.clone()
    })
}

/// The collective a rank's all-reduces run through.
pub(crate) enum Collective {
    /// The one-shot kernel of the ranks' symmetric group (residual add and next norm fused).
    OneShot(Arc<SymmetricGroup>),
    /// The rank's NCCL communicator (its thread's; the epilogue is a separate launch).
    Nccl(Mutex<NcclRank>),
}

/// A rank's side of the all-reduces: its index in the group and the collective.
pub(crate) struct RankComm {
    rank: usize,
    collective: Collective,
}

impl RankComm {
    /// Enqueues the rank's side of `x += Σ_ranks partial` (`[rows, width]` f32), with the next
    /// RMSNorm `h = rmsnorm(x)·w` when `norm = Some((w, eps, h))`, on the rank's stream (which
    /// `stream` must be). Returns whether the residual add and the norm were done too (the
    /// one-shot kernel fuses them); `false` (NCCL): only `partial` holds the sum, and the caller
    /// adds it into `x` and applies the norm.
    pub(crate) fn all_reduce(
        &self,
        stream: &CudaStream,
        partial: DPtr<f32>,
        x: DPtr<f32>,
        rows: usize,
        norm: Option<(DPtr<f32>, f32, DPtr<f32>)>,
    ) -> Result<bool, RuntimeError> {
        if rows == 0 || partial.len() != x.len() || !x.len().is_multiple_of(rows) {
            return Err(RuntimeError::Invalid(format!(
                "all-reduce of {} partials into {} values over {rows} rows",
                partial.len(),
                x.len()
            )));
        }
        let group = match &self.collective {
            Collective::OneShot(g) => g,
            Collective::Nccl(n) => {
                let n = n.lock().unwrap_or_else(|p| p.into_inner());
                if n.stream().cu_stream() != stream.cu_stream() {
                    return Err(RuntimeError::Invalid(format!(
                        "rank {}'s NCCL all-reduce enqueued on another stream than the rank's",
                        self.rank
                    )));
                }
                // SAFETY: `partial` is a live buffer of the rank's session on the rank's GPU,
                // alive until the stream has run the pass; every rank's pass issues the same
                // all-reduces in the same order (the same sharded plan).
                unsafe { n.all_reduce_f32_in_place(partial.addr(), partial.len()) }?;
                return Ok(false);
            }
        };
        let own = group.stream(self.rank);
        if own.cu_stream() != stream.cu_stream() {
            return Err(RuntimeError::Invalid(format!(
                "rank {}'s all-reduce enqueued on another stream than the rank's",
                self.rank
            )));
        }
        let epilogue = match norm {
            Some((w, eps, h)) => Epilogue::ResidualNorm {
                x: x.addr(),
                h: h.addr(),
                w: w.addr(),
                eps,
            },
            None => Epilogue::Residual { x: x.addr() },
        };
        let op = AllReduce {
            dtype: DType::F32,
            rows,
            width: x.len() / rows,
            input: partial.addr(),
            epilogue,
        };
        // SAFETY: the addresses are live buffers of the rank's session and model on the rank's
        // GPU (sized as checked above), alive until the session's stream has run the pass; every
        // rank's pass enqueues the same all-reduces in the same order (the same sharded plan).
        unsafe { group.all_reduce(self.rank, &op) }?;
        Ok(true)
    }
}

/// What makes a [`GpuModel`] one rank of a tensor-parallel model.
pub(crate) struct RankPart {
    pub(crate) comm: RankComm,
    layout: Arc<TpLayout>,
    /// The rank of `layout` whose part of the plan this model runs (its index in the group,
    /// except for a lone rank measured on its own: [`TpModel::synthetic_rank`]).
    plan_rank: usize,
}

impl RankPart {
    /// The rank's view of the unsharded plan `plan` of `config`.
    pub(crate) fn view(&self, plan: &Plan, config: &ModelConfig) -> Result<Plan, RuntimeError> {
        let sharded = shard_plan(plan, config, &self.layout).map_err(plan_error)?;
        rank_plan(&sharded, self.plan_rank)
    }
}

/// The dimensions rank `r` of `layout` holds of `config` (its heads, its intermediate slice; an
/// empty MXFP4 slice is one zero block), for weights generated on the device.
fn rank_config(config: &ModelConfig, layout: &TpLayout, r: usize) -> ModelConfig {
    let mut c = config.clone();
    for (spec, ls) in c.layers.iter_mut().zip(&layout.layers) {
        spec.n_heads = ls.heads[r].len();
        spec.n_kv_heads = ls.kv_heads[r].len();
    }
    for (spec, ls) in config.layers.iter().zip(&layout.layers) {
        let i = ls.intermediate[r].len();
        if spec.moe {
            c.moe_intermediate_size = i.max(fp4::BLOCK);
        } else {
            c.dense_intermediate_size = Some(i);
        }
    }
    c
}

type Opened = (
    crate::Device,
    Arc<CudaStream>,
    crate::ops::Ops,
    crate::moe::MoeKernels,
);

/// The ranks' collective, before it is split among the rank models.
enum Group {
    OneShot(Arc<SymmetricGroup>),
    Nccl(Vec<NcclRank>),
}

impl Group {
    /// Rank `r`'s side (consumes the NCCL handles in rank order).
    fn rank_comm(&mut self, r: usize) -> Result<RankComm, RuntimeError> {
        let collective = match self {
            Group::OneShot(g) => Collective::OneShot(g.clone()),
            Group::Nccl(v) => {
                if v.is_empty() {
                    return Err(RuntimeError::Invalid(format!(
                        "no NCCL communicator left for rank {r}"
                    )));
                }
                Collective::Nccl(Mutex::new(v.remove(0)))
            }
        };
        Ok(RankComm {
            rank: r,
            collective,
        })
    }

    fn one_shot(&self) -> Option<Arc<SymmetricGroup>> {
        match self {
            Group::OneShot(g) => Some(g.clone()),
            Group::Nccl(_) => None,
        }
    }
}

/// The all-reduce `kind` resolves to for ranks on `ordinals`, and a note when `Auto` fell back
/// to NCCL: NCCL needs one GPU per rank (virtual ranks share one), the one-shot kernel peer
/// access between every pair.
fn resolve_all_reduce(
    kind: AllReduceKind,
    ordinals: &[usize],
) -> Result<(AllReduceKind, Option<String>), RuntimeError> {
    let shared = ordinals
        .iter()
        .enumerate()
        .any(|(i, d)| ordinals[..i].contains(d));
    if shared {
        return match kind {
            AllReduceKind::Nccl => Err(RuntimeError::Invalid(
                "the NCCL all-reduce needs one GPU per rank (NCCL refuses two ranks on one GPU): \
                 virtual ranks use the one-shot all-reduce (--all-reduce oneshot)"
                    .into(),
            )),
            _ => Ok((AllReduceKind::OneShot, None)),
        };
    }
    let distinct = ordinals.len() > 1;
    let peers = if distinct {
        comm::Topology::probe()?.check_peer_access(ordinals)
    } else {
        Ok(())
    };
    match (kind, peers) {
        (AllReduceKind::Nccl, _) => Ok((AllReduceKind::Nccl, None)),
        (_, Ok(())) => Ok((AllReduceKind::OneShot, None)),
        (AllReduceKind::OneShot, Err(e)) => Err(RuntimeError::Invalid(format!(
            "the one-shot all-reduce reads peer GPUs' memory: {e} (--all-reduce nccl runs \
             without peer access)"
        ))),
        (AllReduceKind::Auto, Err(e)) => Ok((
            AllReduceKind::Nccl,
            Some(format!(
                "{e}: the all-reduces run through NCCL instead of the one-shot kernel"
            )),
        )),
    }
}

/// Opens every rank's device and stream (in rank order) and their collective: the symmetric
/// group of the one-shot kernel (slots of a pass's `[MAX_TOKENS, H]` f32 partials, the launch
/// shapes computed once here — occupancy queries — not during a graph capture) or NCCL
/// communicators on the ranks' streams.
fn open_ranks(
    ordinals: &[usize],
    hidden: usize,
    kind: AllReduceKind,
) -> Result<(Vec<Opened>, Group), RuntimeError> {
    comm::check_devices(ordinals, comm::device_count()?)?;
    debug_assert!(kind != AllReduceKind::Auto, "resolved by the caller");
    let mut opened = Vec::with_capacity(ordinals.len());
    for &o in ordinals {
        opened.push(open(o)?);
    }
    let streams: Vec<Arc<CudaStream>> = opened.iter().map(|o| o.1.clone()).collect();
    if kind == AllReduceKind::Nccl {
        let comms = comm::NcclComms::new(streams)?;
        return Ok((opened, Group::Nccl(comms.into_ranks())));
    }
    let group = Arc::new(SymmetricGroup::new(streams, MAX_TOKENS * hidden * 4)?);
    for epilogue in [
        Epilogue::Residual { x: 0 },
        Epilogue::ResidualNorm {
            x: 0,
            h: 0,
            w: 0,
            eps: 0.0,
        },
    ] {
        group.shape(&AllReduce {
            dtype: DType::F32,
            rows: MAX_TOKENS,
            width: hidden,
            input: 0,
            epilogue,
        })?;
    }
    Ok((opened, Group::OneShot(group)))
}

/// A model sharded over N tensor-parallel ranks (see the module docs). Cheap to clone.
#[derive(Clone)]
pub struct TpModel {
    ranks: Vec<GpuModel>,
    /// The one-shot kernel's group (None: NCCL, whose communicators the rank models hold).
    group: Option<Arc<SymmetricGroup>>,
    layout: Arc<TpLayout>,
    config: Arc<ModelConfig>,
    /// The all-reduce in use (one-shot or NCCL) and why, when `Auto` fell back to NCCL.
    all_reduce: (AllReduceKind, Option<String>),
}

impl TpModel {
    /// Shards `weights` (checked against `config`) over `ranks` ranks placed by `placement` and
    /// uploads each rank's part; `progress` hears of the bytes uploaded. Every error (a model
    /// that does not split, fewer GPUs than asked, no peer access, out of memory) is returned
    /// before or instead of a half-built model: whatever was allocated is freed.
    pub fn new(
        config: Arc<ModelConfig>,
        weights: &Weights,
        ranks: usize,
        placement: &RankPlacement,
        progress: &mut dyn FnMut(model::progress::Progress),
    ) -> Result<TpModel, RuntimeError> {
        Self::build(
            config,
            weights,
            TpOptions::tensor(ranks),
            placement,
            progress,
        )
    }

    /// [`TpModel::new`] split and reduced as `opts` says (tensor and/or expert parallelism; the
    /// one-shot or the NCCL all-reduce).
    pub fn build(
        config: Arc<ModelConfig>,
        weights: &Weights,
        opts: TpOptions,
        placement: &RankPlacement,
        progress: &mut dyn FnMut(model::progress::Progress),
    ) -> Result<TpModel, RuntimeError> {
        let ranks = opts.parallelism.ranks;
        let ordinals = placement.ordinals(ranks)?;
        model::check_weights(&config, weights).map_err(|e| RuntimeError::Invalid(e.to_string()))?;
        let layout = Arc::new(gpu_layout_with(
            &config,
            opts.parallelism,
            mxfp4_experts(weights),
        )?);
        let decode =
            Plan::new(&config, DEVICE_STORAGE, PassShape::decode(0)).map_err(plan_error)?;
        comm::check_devices(&ordinals, comm::device_count()?)?;
        let all_reduce = resolve_all_reduce(opts.all_reduce, &ordinals)?;
        let (opened, mut group) = open_ranks(&ordinals, config.hidden_size, all_reduce.0)?;
        let one_shot = group.one_shot();
        let shards = model::shard::shard_layers(&config, weights, &layout).map_err(plan_error)?;
        let total: u64 = shards
            .iter()
            .flatten()
            .map(|l| l.stored_bytes() as u64)
            .sum::<u64>()
            + ranks as u64 * (weights.embed.stored_bytes() + weights.lm_head.stored_bytes()) as u64;
        let mut done = 0u64;
        let mut models = Vec::with_capacity(ranks);
        for (rank, ((device, stream, ops, moe), layers)) in
            opened.into_iter().zip(shards).enumerate()
        {
            let part = RankPart {
                comm: group.rank_comm(rank)?,
                layout: layout.clone(),
                plan_rank: rank,
            };
            let rank_layout = part.view(&decode, &config)?;
            let rw = rank_weights(weights, layers);
            device.ctx.bind_to_thread()?;
            let mut arena = Arena::new(stream.clone());
            let ropes = upload_ropes(&mut arena, &rank_layout.ropes)?;
            let dw = upload_target(&mut arena, &config, &rank_layout, &ropes, &rw, &mut |p| {
                progress(model::progress::Progress {
                    done: done + p.done,
                    total,
                })
            })?;
            done += rw.stored_bytes() as u64;
            stream.synchronize()?;
            models.push(GpuModel::assemble(
                device,
                stream,
                ops,
                moe,
                config.clone(),
                dw,
                ropes,
                rank_layout,
                arena,
                Some(part),
            ));
        }
        progress(model::progress::Progress { done: total, total });
        Ok(TpModel {
            ranks: models,
            group: one_shot,
            layout,
            config,
            all_reduce,
        })
    }

    /// A model of `config`'s shape sharded over `ranks` ranks with random weights generated on
    /// each rank's device (no checkpoint; the benchmarks' models: bf16 dense weights, MXFP4
    /// experts, MoE layers only, as [`GpuModel::synthetic`]). The replicated tensors (embedding,
    /// router, norms, LM head) are the same on every rank (same seeds, same shapes).
    pub fn synthetic(
        config: Arc<ModelConfig>,
        ranks: usize,
        placement: &RankPlacement,
        seed: u64,
    ) -> Result<TpModel, RuntimeError> {
        Self::synthetic_with(config, TpOptions::tensor(ranks), placement, seed)
    }

    /// [`TpModel::synthetic`] split and reduced as `opts` says.
    pub fn synthetic_with(
        config: Arc<ModelConfig>,
        opts: TpOptions,
        placement: &RankPlacement,
        seed: u64,
    ) -> Result<TpModel, RuntimeError> {
        let ranks = opts.parallelism.ranks;
        let ordinals = placement.ordinals(ranks)?;
        let layout = Arc::new(gpu_layout_with(&config, opts.parallelism, true)?);
        comm::check_devices(&ordinals, comm::device_count()?)?;
        let all_reduce = resolve_all_reduce(opts.all_reduce, &ordinals)?;
        let (opened, group) = open_ranks(&ordinals, config.hidden_size, all_reduce.0)?;
        Self::synthetic_ranks(
            config,
            layout,
            opened,
            group,
            (0..ranks).collect(),
            seed,
            all_reduce,
        )
    }

    /// Rank `rank` of a `ranks`-rank synthetic model alone on GPU `device`: the rank's share of
    /// every step (its shards, the replicated ops) with all-reduces over a group of one (no peer
    /// to wait for) — what one GPU of an N-GPU tensor-parallel node computes per step, without
    /// the link. For benchmarks; its logits are not the model's.
    pub fn synthetic_rank(
        config: Arc<ModelConfig>,
        ranks: usize,
        rank: usize,
        device: usize,
        seed: u64,
    ) -> Result<TpModel, RuntimeError> {
        Self::synthetic_rank_with(config, Parallelism::tensor(ranks), rank, device, seed)
    }

    /// [`TpModel::synthetic_rank`] of a model split as `par` says (e.g. one expert-parallel
    /// rank: its attention share and its whole experts).
    pub fn synthetic_rank_with(
        config: Arc<ModelConfig>,
        par: Parallelism,
        rank: usize,
        device: usize,
        seed: u64,
    ) -> Result<TpModel, RuntimeError> {
        if rank >= par.ranks {
            return Err(RuntimeError::Invalid(format!(
                "rank {rank} of {} ranks",
                par.ranks
            )));
        }
        let layout = Arc::new(gpu_layout_with(&config, par, true)?);
        let (opened, group) = open_ranks(&[device], config.hidden_size, AllReduceKind::OneShot)?;
        Self::synthetic_ranks(
            config,
            layout,
            opened,
            group,
            vec![rank],
            seed,
            (AllReduceKind::OneShot, None),
        )
    }

    /// The synthetic rank models of `plan_ranks` (rank `plan_ranks[i]` of `layout` as member `i`
    /// of `group`, on `opened[i]`).
    fn synthetic_ranks(
        config: Arc<ModelConfig>,
        layout: Arc<TpLayout>,
        opened: Vec<Opened>,
        mut group: Group,
        plan_ranks: Vec<usize>,
        seed: u64,
        all_reduce: (AllReduceKind, Option<String>),
    ) -> Result<TpModel, RuntimeError> {
        let decode =
            Plan::new(&config, DEVICE_STORAGE, PassShape::decode(0)).map_err(plan_error)?;
        let one_shot = group.one_shot();
        let mut models = Vec::with_capacity(opened.len());
        for (i, ((device, stream, ops, moe), &r)) in opened.into_iter().zip(&plan_ranks).enumerate()
        {
            let part = RankPart {
                comm: group.rank_comm(i)?,
                layout: layout.clone(),
                plan_rank: r,
            };
            let rank_layout = part.view(&decode, &config)?;
            let dims = rank_config(&config, &layout, r);
            device.ctx.bind_to_thread()?;
            let mut arena = Arena::new(stream.clone());
            let ropes = upload_ropes(&mut arena, &rank_layout.ropes)?;
            let dw = synthetic_target(
                &mut arena,
                &ops,
                &dims,
                &rank_layout,
                &ropes,
                seed,
                super::SyntheticDtypes::Bf16,
            )?;
            stream.synchronize()?;
            models.push(GpuModel::assemble(
                device,
                stream,
                ops,
                moe,
                config.clone(),
                dw,
                ropes,
                rank_layout,
                arena,
                Some(part),
            ));
        }
        Ok(TpModel {
            ranks: models,
            group: one_shot,
            layout,
            config,
            all_reduce,
        })
    }

    /// The all-reduce the ranks use (one-shot or NCCL; never `Auto`).
    pub fn all_reduce(&self) -> AllReduceKind {
        self.all_reduce.0
    }

    /// Why the all-reduce is NCCL although the one-shot kernel was the default (no peer access
    /// between two of the GPUs), for the user to see.
    pub fn all_reduce_note(&self) -> Option<&str> {
        self.all_reduce.1.as_deref()
    }

    /// How the model is split.
    pub fn parallelism(&self) -> Parallelism {
        self.layout.parallelism
    }

    pub fn config(&self) -> &ModelConfig {
        &self.config
    }

    /// Tensor-parallel ranks.
    pub fn ranks(&self) -> usize {
        self.ranks.len()
    }

    /// What each rank holds.
    pub fn layout(&self) -> &TpLayout {
        &self.layout
    }

    /// Rank `r`'s model (its shards; rank 0's holds the replicated embedding and LM head every
    /// rank holds).
    pub fn rank(&self, r: usize) -> &GpuModel {
        &self.ranks[r]
    }

    /// Weight bytes resident on the devices, all ranks together.
    pub fn weight_bytes(&self) -> usize {
        self.ranks.iter().map(GpuModel::weight_bytes).sum()
    }

    /// A new empty sequence of at most `max_seq` positions (one session per rank).
    pub fn session(&self, max_seq: usize) -> Result<TpSession, RuntimeError> {
        let mut ranks = Vec::with_capacity(self.ranks.len());
        for m in &self.ranks {
            m.device().ctx.bind_to_thread()?;
            let mut s = GpuSession::new(m.clone(), max_seq, DEFAULT_MAX_ROLLBACK)?;
            if self.group.is_none() {
                // NCCL: eager launches (see the module docs).
                s.set_use_graphs(false);
            }
            ranks.push(s);
        }
        Ok(TpSession {
            model: self.clone(),
            ranks,
        })
    }
}

/// One sequence of a [`TpModel`]: a [`GpuSession`] per rank, advanced in lockstep.
pub struct TpSession {
    model: TpModel,
    ranks: Vec<GpuSession>,
}

impl TpSession {
    pub fn model(&self) -> &TpModel {
        &self.model
    }

    /// Positions held.
    pub fn len(&self) -> usize {
        self.ranks[0].len
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn max_seq(&self) -> usize {
        self.ranks[0].max_seq
    }

    /// Device bytes the sessions hold, all ranks together.
    pub fn device_bytes(&self) -> usize {
        self.ranks.iter().map(GpuSession::device_bytes).sum()
    }

    /// Run passes op by op instead of replaying captured graphs (every rank). With NCCL the
    /// passes always launch op by op (`on` is ignored).
    pub fn set_use_graphs(&mut self, on: bool) {
        let on = on && self.model.group.is_some();
        for r in &mut self.ranks {
            r.set_use_graphs(on);
        }
    }

    /// Undoes a failed pass: waits for every rank, zeroes the group's flags (a rank may have
    /// given up waiting for a peer), and puts every rank back at `len`.
    fn recover(&mut self, len: usize) {
        match &self.model.group {
            Some(g) => {
                let _ = g.reset();
            }
            None => {
                for r in &self.ranks {
                    let _ = r.model.stream().synchronize();
                }
            }
        }
        for r in &mut self.ranks {
            r.len = len;
        }
    }

    /// One pass of `tokens` (≤ MAX_TOKENS) on every rank: enqueued in rank order from this
    /// thread when every rank replays a CUDA graph (one-shot: a graph launch is one
    /// asynchronous call, and each rank's all-reduce kernels wait on device flags), else from one
    /// thread per rank (NCCL, and op-by-op launches), then every rank waited for and its
    /// all-reduce status checked. On error the session is as before.
    ///
    /// Why op-by-op passes take one thread per rank with the one-shot kernel too: rank 0's
    /// first all-reduce spins until every peer's arrives, so nothing may block this thread
    /// between rank 0's launches and the peers' — yet an op-by-op pass of a deep model queues
    /// hundreds of launches behind that spinning kernel (the driver may block a launch once a
    /// stream's pending work is deep enough), and `ULTRA_TRACE_OPS=1` synchronises after every
    /// launch. From one thread either waits until the all-reduce timeout; with a thread per rank
    /// every rank keeps enqueueing.
    fn pass(&mut self, tokens: &[u32], logits: Logits) -> Result<(), RuntimeError> {
        let start = self.len();
        let graphs = self.ranks.iter().all(|r| r.use_graphs);
        let enqueued = if self.model.group.is_some() && graphs {
            self.enqueue_in_order(tokens, logits)
        } else {
            self.enqueue_threaded(tokens, logits)
        };
        if let Err((r, e)) = enqueued {
            self.recover(start);
            return Err(RuntimeError::Op {
                pass: format!("tensor-parallel rank {r}"),
                source: Box::new(e),
            });
        }
        let waited = match &self.model.group {
            Some(g) => g.check().map_err(RuntimeError::from),
            None => self
                .ranks
                .iter()
                .try_for_each(|r| r.model.stream().synchronize().map_err(RuntimeError::from)),
        };
        if let Err(e) = waited {
            self.recover(start);
            return Err(e);
        }
        self.ranks[0].model.device().ctx.bind_to_thread()?;
        Ok(())
    }

    /// Enqueues every rank's pass from this thread, in rank order.
    fn enqueue_in_order(
        &mut self,
        tokens: &[u32],
        logits: Logits,
    ) -> Result<(), (usize, RuntimeError)> {
        for (r, s) in self.ranks.iter_mut().enumerate() {
            s.model
                .device()
                .ctx
                .bind_to_thread()
                .map_err(RuntimeError::from)
                .and_then(|()| s.pass(tokens, logits))
                .map_err(|e| (r, e))?;
        }
        Ok(())
    }

    /// Enqueues every rank's pass from a thread of its own (NCCL's one thread per GPU: a rank's
    /// `ncclAllReduce` may wait on the host for its peers' calls; op-by-op passes: see
    /// [`TpSession::pass`]). Only passes that launch op by op come here.
    fn enqueue_threaded(
        &mut self,
        tokens: &[u32],
        logits: Logits,
    ) -> Result<(), (usize, RuntimeError)> {
        /// A rank's session lent to the thread that enqueues its pass.
        struct Lent<'a>(&'a mut GpuSession);
        // SAFETY: the session's CUDA handles (context, stream, module functions, device
        // buffers) are usable from any thread once its context is bound, which the thread does
        // first; its captured graphs (the only handles that are not) are neither launched nor
        // captured by an op-by-op pass, the only kind enqueued here; the session is used by
        // that thread alone until the scope joins it.
        unsafe impl Send for Lent<'_> {}
        impl<'a> Lent<'a> {
            fn get(self) -> &'a mut GpuSession {
                self.0
            }
        }
        let results: Vec<Result<(), RuntimeError>> = std::thread::scope(|scope| {
            let handles: Vec<_> = self
                .ranks
                .iter_mut()
                .map(|s| {
                    let lent = Lent(s);
                    scope.spawn(move || {
                        let s = lent.get();
                        s.model.device().ctx.bind_to_thread()?;
                        s.pass(tokens, logits)
                    })
                })
                .collect();
            handles
                .into_iter()
                .map(|h| {
                    h.join().unwrap_or_else(|_| {
                        Err(RuntimeError::Invalid(
                            "a rank's enqueueing thread panicked".into(),
                        ))
                    })
                })
                .collect()
        });
        for (r, res) in results.into_iter().enumerate() {
            res.map_err(|e| (r, e))?;
        }
        Ok(())
    }

    /// Runs `tokens` in passes of at most MAX_TOKENS (the last one with logits); returns the
    /// rows of the last pass. On error the session is as before the call.
    fn run(&mut self, tokens: &[u32]) -> Result<usize, RuntimeError> {
        self.ranks[0].check_tokens(tokens)?;
        let start = self.len();
        let n = tokens.chunks(MAX_TOKENS).len();
        for (i, c) in tokens.chunks(MAX_TOKENS).enumerate() {
            let logits = if i + 1 == n {
                Logits::All
            } else {
                Logits::None
            };
            if let Err(e) = self.pass(c, logits) {
                self.recover(start);
                return Err(e);
            }
        }
        Ok(tokens.len() - (n - 1) * MAX_TOKENS)
    }

    /// Appends `tokens` and returns the logits of the last one.
    pub fn prefill(&mut self, tokens: &[u32]) -> Result<Vec<f32>, RuntimeError> {
        let last = self.run(tokens)?;
        Ok(self.ranks[0].logits_rows(last)?.pop().expect("one row"))
    }

    /// Appends `tokens` and returns the greedy next token (argmax on rank 0's device).
    pub fn prefill_greedy(&mut self, tokens: &[u32]) -> Result<u32, RuntimeError> {
        let last = self.run(tokens)?;
        let r0 = &self.ranks[0];
        let ids = dtoh(&r0.model.inner.stream, r0.b.argmax.slice(0..last))?;
        Ok(ids[last - 1])
    }

    pub fn decode(&mut self, token: u32) -> Result<Vec<f32>, RuntimeError> {
        self.prefill(&[token])
    }

    pub fn decode_greedy(&mut self, token: u32) -> Result<u32, RuntimeError> {
        self.prefill_greedy(&[token])
    }

    /// Runs a block (passes of ≤ MAX_TOKENS) and returns every token's logits and the requested
    /// hidden states (captured on rank 0), as [`GpuSession::verify`].
    pub fn verify(
        &mut self,
        tokens: &[u32],
        hidden_layers: &[usize],
    ) -> Result<VerifyOutput, RuntimeError> {
        self.ranks[0].check_tokens(tokens)?;
        self.ranks[0].set_capture(hidden_layers)?;
        let h = self.model.config.hidden_size;
        let start = self.len();
        let mut out = VerifyOutput {
            logits: Vec::with_capacity(tokens.len()),
            hidden: vec![Vec::with_capacity(tokens.len()); hidden_layers.len()],
        };
        for c in tokens.chunks(MAX_TOKENS) {
            let read = self.pass(c, Logits::All).and_then(|()| {
                let r0 = &self.ranks[0];
                out.logits.extend(r0.logits_rows(c.len())?);
                if !hidden_layers.is_empty() {
                    let all = dtoh(
                        &r0.model.inner.stream,
                        r0.b.hidden.slice(0..hidden_layers.len() * MAX_TOKENS * h),
                    )?;
                    for (slot, dst) in out.hidden.iter_mut().enumerate() {
                        let at = slot * MAX_TOKENS * h;
                        dst.extend(
                            all[at..at + c.len() * h]
                                .chunks_exact(h)
                                .map(<[f32]>::to_vec),
                        );
                    }
                }
                Ok(())
            });
            if let Err(e) = read {
                self.recover(start);
                return Err(e);
            }
        }
        Ok(out)
    }

    /// Runs a block and returns the greedy choice after each token.
    pub fn verify_greedy(&mut self, tokens: &[u32]) -> Result<Vec<u32>, RuntimeError> {
        self.ranks[0].check_tokens(tokens)?;
        let start = self.len();
        let mut out = Vec::with_capacity(tokens.len());
        for c in tokens.chunks(MAX_TOKENS) {
            let read = self.pass(c, Logits::All).and_then(|()| {
                let r0 = &self.ranks[0];
                dtoh(&r0.model.inner.stream, r0.b.argmax.slice(0..c.len()))
            });
            match read {
                Ok(ids) => out.extend(ids),
                Err(e) => {
                    self.recover(start);
                    return Err(e);
                }
            }
        }
        Ok(out)
    }

    /// Rank 0's session: after every pass it holds the logits, greedy ids and captured hidden
    /// states (every rank holds the same replicated residual stream) — what a drafter on rank
    /// 0's GPU reads (`tilert::draft::GpuDrafter` built on `TpModel::rank(0)`).
    pub fn lead(&self) -> &GpuSession {
        &self.ranks[0]
    }

    /// The hidden indices every pass captures, on rank 0 (as [`GpuSession::set_capture`]).
    pub fn set_capture(&mut self, indices: &[usize]) -> Result<(), RuntimeError> {
        self.ranks[0].model.device().ctx.bind_to_thread()?;
        self.ranks[0].set_capture(indices)
    }

    /// One pass of `tokens` (≤ MAX_TOKENS) on every rank, the logits, greedy ids and captures
    /// left on rank 0's device (as [`GpuSession::forward_device`]). On error the session is as
    /// before.
    pub fn forward_device(&mut self, tokens: &[u32]) -> Result<(), RuntimeError> {
        self.ranks[0].check_tokens(tokens)?;
        if tokens.len() > MAX_TOKENS {
            return Err(RuntimeError::Invalid(format!(
                "forward_device takes at most {MAX_TOKENS} tokens"
            )));
        }
        self.pass(tokens, Logits::All)
    }

    /// Drops every position ≥ `len` on every rank (as [`GpuSession::truncate`]).
    pub fn truncate(&mut self, len: usize) -> Result<(), RuntimeError> {
        // Every rank holds the same positions and windows: rank 0 decides.
        self.ranks[0].truncate(len)?;
        for r in &mut self.ranks[1..] {
            r.truncate(len)?;
        }
        Ok(())
    }

    /// Empties the sequence.
    pub fn reset(&mut self) {
        for r in &mut self.ranks {
            r.reset();
        }
    }

    /// Runs one pass of `tokens` (≤ MAX_TOKENS) with logits and returns the wall time of the
    /// whole step in milliseconds (every rank enqueued, every rank finished): the per-rank step
    /// time of the benchmarks.
    pub fn timed_pass(&mut self, tokens: &[u32]) -> Result<f64, RuntimeError> {
        self.ranks[0].check_tokens(tokens)?;
        if tokens.len() > MAX_TOKENS {
            return Err(RuntimeError::Invalid(format!(
                "a timed pass takes at most {MAX_TOKENS} tokens"
            )));
        }
        let t0 = std::time::Instant::now();
        self.pass(tokens, Logits::All)?;
        Ok(t0.elapsed().as_secs_f64() * 1e3)
    }
}

impl model::executor::Executor for TpSession {
    type Error = RuntimeError;

    fn config(&self) -> &ModelConfig {
        &self.model.config
    }

    fn len(&self) -> usize {
        TpSession::len(self)
    }

    /// As a [`GpuSession`]'s (every rank is one).
    fn max_rollback(&self) -> usize {
        DEFAULT_MAX_ROLLBACK
    }

    fn prefill(&mut self, tokens: &[u32]) -> Result<std::borrow::Cow<'_, [f32]>, RuntimeError> {
        TpSession::prefill(self, tokens).map(std::borrow::Cow::Owned)
    }

    fn decode(&mut self, token: u32) -> Result<std::borrow::Cow<'_, [f32]>, RuntimeError> {
        TpSession::decode(self, token).map(std::borrow::Cow::Owned)
    }

    fn prefill_greedy(&mut self, tokens: &[u32]) -> Result<u32, RuntimeError> {
        TpSession::prefill_greedy(self, tokens)
    }

    fn decode_greedy(&mut self, token: u32) -> Result<u32, RuntimeError> {
        TpSession::decode_greedy(self, token)
    }

    fn verify(&mut self, tokens: &[u32], hidden: &[usize]) -> Result<VerifyOutput, RuntimeError> {
        TpSession::verify(self, tokens, hidden)
    }

    fn truncate(&mut self, len: usize) -> Result<(), RuntimeError> {
        TpSession::truncate(self, len)
    }
}

#[cfg(test)]
mod tests {
    use model::cpu::toy::{self, ToyExperts};
    use model::plan::tp::shard_plan;

    use super::*;
    use crate::exec::lower::check_plan_for;
    use crate::exec::pass_shape;

    fn fixture(rel: &str) -> std::path::PathBuf {
        std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../../fixtures")
            .join(rel)
    }

    fn configs() -> Vec<(String, ModelConfig, bool)> {
        let mut v = vec![
            (
                "toy gpt-oss".to_string(),
                toy::gpt_oss(1, ToyExperts::Mxfp4).0,
                true,
            ),
            (
                "toy qwen3-moe".into(),
                toy::qwen3_moe(2, ToyExperts::Dense).0,
                false,
            ),
            (
                "toy mimo".into(),
                toy::mimo_v2_flash(3, ToyExperts::Dense).0,
                false,
            ),
        ];
        for (rel, mx) in [
            ("gpt-oss/bf16", false),
            ("gpt-oss/mxfp4", true),
            ("qwen3-moe/native", false),
            ("mimo-v2-flash/native", false),
        ] {
            v.push((
                rel.into(),
                ModelConfig::from_dir(&fixture(rel)).unwrap(),
                mx,
            ));
        }
        v
    }

    /// Every rank's view of every pass of every fixture and toy model at 2 and 4 ranks is a plan
    /// the rank lowering accepts: one device's buffers, partial sums, one all-reduce per
    /// sharded block, taps on the rank's ops.
    #[test]
    fn every_rank_view_lowers() {
        for (name, cfg, mx) in configs() {
            let full = Plan::new(&cfg, DEVICE_STORAGE, pass_shape(3, Logits::All, false)).unwrap();
            for n in [1, 2, 4] {
                let layout = gpu_layout(&cfg, n, mx).unwrap_or_else(|e| panic!("{name} {n}: {e}"));
                let sharded = shard_plan(&full, &cfg, &layout).unwrap();
                let reduces = sharded
                    .ops
                    .iter()
                    .filter(|o| matches!(o.kind, OpKind::AllReduce(_)))
                    .count();
                assert_eq!(reduces, 2 * cfg.layers.len(), "{name}");
                for r in 0..n {
                    let v = rank_plan(&sharded, r).unwrap();
                    check_plan_for(&v, true).unwrap_or_else(|e| panic!("{name} {n}/{r}: {e}"));
                    // Every weight the rank's ops name is one the rank's upload holds (its
                    // heads and slices; the o_proj and down biases on rank 0 only).
                    let fake =
                        crate::exec::lower::tests::fake_target(&rank_config(&cfg, &layout, r));
                    crate::exec::lower::check_weights(&v, &fake)
                        .unwrap_or_else(|e| panic!("{name} {n}/{r}: {e}"));
                    // Not lowerable as a single device's plan.
                    assert!(check_plan_for(&v, false).is_err(), "{name}");
                    assert_eq!(v.ranks, 1);
                    let heads = v
                        .ops
                        .iter()
                        .filter(|o| matches!(o.kind, OpKind::LmHead(_) | OpKind::Sample(_)))
                        .count();
                    assert_eq!(heads, if r == 0 { 2 } else { 0 }, "{name} rank {r}");
                    assert_eq!(
                        v.ops
                            .iter()
                            .filter(|o| matches!(o.kind, OpKind::AllReduce(_)))
                            .count(),
                        reduces
                    );
                    assert!(v
                        .ops
                        .iter()
                        .all(|o| o.weights.iter().all(|w| w.shard.is_none())));
                    assert_eq!(v.taps.len(), full.taps.len(), "{name}");
                    for (t, u) in v.taps.iter().zip(&full.taps) {
                        assert_eq!((t.hidden, t.buf), (u.hidden, u.buf));
                        assert!(t.after < v.ops.len());
                    }
                }
                assert!(rank_plan(&sharded, n).is_err());
            }
        }
    }

    /// Every rank's view of expert-parallel plans (alone: attention replicated; with TP
    /// attention) lowers: the rank's expert ops hold a contiguous range of whole experts (the
    /// ranges partition the experts), one all-reduce per MoE layer after the experts.
    #[test]
    fn expert_parallel_rank_views_lower() {
        use model::plan::OpKind as K;
        for (name, cfg, mx) in configs() {
            let full = Plan::new(&cfg, DEVICE_STORAGE, pass_shape(3, Logits::All, false)).unwrap();
            for par in [
                Parallelism::expert(2),
                Parallelism::tensor_expert(2),
                Parallelism::expert(4),
                Parallelism::tensor_expert(4),
            ] {
                let layout =
                    gpu_layout_with(&cfg, par, mx).unwrap_or_else(|e| panic!("{name}: {e}"));
                let sharded = shard_plan(&full, &cfg, &layout).unwrap();
                sharded.validate().unwrap();
                let moe_layers = cfg.layers.iter().filter(|l| l.moe).count();
                let reduces = sharded
                    .ops
                    .iter()
                    .filter(|o| matches!(o.kind, K::AllReduce(_)))
                    .count();
                let per_layer = if par.shard_attention {
                    2 * cfg.layers.len()
                } else {
                    moe_layers
                };
                assert_eq!(reduces, per_layer, "{name} {par}");
                let mut held = Vec::new();
                let mut first = None;
                for r in 0..par.ranks {
                    let v = rank_plan(&sharded, r).unwrap();
                    check_plan_for(&v, true).unwrap_or_else(|e| panic!("{name} {par} {r}: {e}"));
                    // Every rank issues every all-reduce of the pass (a rank that skipped one
                    // would leave its peers waiting), in the same order with the same width and
                    // fused norm.
                    let mine: Vec<_> = v
                        .ops
                        .iter()
                        .filter_map(|o| match o.kind {
                            K::AllReduce(p) => Some((p.width, p.next_norm.map(|n| n.weight))),
                            _ => None,
                        })
                        .collect();
                    assert_eq!(mine.len(), reduces, "{name} {par} rank {r}: all-reduces");
                    match &first {
                        None => first = Some(mine),
                        Some(f) => assert_eq!(&mine, f, "{name} {par} rank {r} vs rank 0"),
                    }
                    let fake =
                        crate::exec::lower::tests::fake_target(&rank_config(&cfg, &layout, r));
                    crate::exec::lower::check_weights(&v, &fake)
                        .unwrap_or_else(|e| panic!("{name} {par} {r}: {e}"));
                    if let Some(p) = v.ops.iter().find_map(|o| match o.kind {
                        K::ExpertsDown(p) => Some(p),
                        _ => None,
                    }) {
                        assert!(!p.residual);
                        held.push((p.experts.lo, p.experts.hi));
                    }
                }
                let e = cfg.n_experts;
                let n = par.ranks;
                let want: Vec<_> = (0..n).map(|r| (r * e / n, (r + 1) * e / n)).collect();
                assert_eq!(held, want, "{name} {par}");
            }
        }
        // 8 experts do not divide over 3 ranks.
        let cfg = ModelConfig::from_dir(&fixture("gpt-oss/mxfp4")).unwrap();
        let e = gpu_layout_with(&cfg, Parallelism::expert(3), true)
            .unwrap_err()
            .to_string();
        assert!(e.contains("routed experts on 3 ranks"), "{e}");
    }

    #[test]
    fn setups_that_cannot_run_are_named_errors() {
        let cfg = ModelConfig::from_dir(&fixture("gpt-oss/mxfp4")).unwrap();
        // 4 query heads do not split over 3 ranks.
        let e = gpu_layout(&cfg, 3, true).unwrap_err().to_string();
        assert!(
            e.contains("query heads") && e.contains("possible here: 1, 2, 4"),
            "{e}"
        );
        assert!(gpu_layout(&cfg, 0, true).is_err());
        assert!(gpu_layout(&cfg, 9, true).is_err());
        // An MXFP4 expert slice may be empty (padded); a dense MLP's may not.
        let l = gpu_layout(&cfg, 4, true).unwrap();
        assert!(l.layers[0].intermediate.iter().any(|i| i.is_empty()));
        let mut small = toy::qwen3_moe(2, ToyExperts::Dense).0;
        small.moe_intermediate_size = 3;
        let e = gpu_layout(&small, 4, false).unwrap_err().to_string();
        assert!(
            e.contains("leaves rank") && e.contains("intermediate size 3"),
            "{e}"
        );
        // Device lists.
        let p = RankPlacement::Devices(vec![0, 1]);
        assert_eq!(p.ordinals(2).unwrap(), vec![0, 1]);
        let e = p.ordinals(4).unwrap_err().to_string();
        assert!(
            e.contains("2 GPU(s) listed for 4 tensor-parallel ranks"),
            "{e}"
        );
        let e = RankPlacement::Devices(vec![1, 1])
            .ordinals(2)
            .unwrap_err()
            .to_string();
        assert!(e.contains("GPU 1 is listed twice"), "{e}");
        assert_eq!(
            RankPlacement::Virtual { device: 2 }.ordinals(3).unwrap(),
            vec![2, 2, 2]
        );
    }

    /// A padded empty MXFP4 slice has one zero block per row and keeps the bias shapes.
    #[test]
    fn empty_mxfp4_slices_are_one_zero_block() {
        let (cfg, w) = toy::gpt_oss(1, ToyExperts::Mxfp4);
        let layout = gpu_layout(&cfg, 4, true).unwrap();
        let shards = model::shard::shard_layers(&cfg, &w, &layout).unwrap();
        for (r, layers) in shards.into_iter().enumerate() {
            let empty = layout.layers[0].intermediate[r].is_empty();
            let rw = rank_weights(&w, layers);
            let Mlp::Moe(m) = &rw.layers[0].mlp else {
                panic!("moe")
            };
            let e = &m.experts[0];
            let inter = if empty {
                fp4::BLOCK
            } else {
                layout.layers[0].intermediate[r].len()
            };
            assert_eq!(e.gate_up.rows(), 2 * inter, "rank {r}");
            assert_eq!(e.down.cols(), inter, "rank {r}");
            if empty {
                let ExpertMat::Mxfp4(g) = &e.gate_up else {
                    panic!("mxfp4")
                };
                assert!(g.blocks().expect("one segment").iter().all(|&b| b == 0));
                if let Some(b) = &e.gate_up_bias {
                    assert_eq!(b.len(), 2 * fp4::BLOCK);
                    assert!(b.iter().all(|&v| v == 0.0));
                }
            }
        }
    }
}
