//! The persistent engine as a [`model::Executor`]: [`PersistentSession`] runs every decode step
//! of a sequence as one launch of the resident kernel `pk_step` (`kernels/persistent.cu`, one
//! block per SM, captured in a CUDA graph), whose tiles run the ops' math through the same
//! device functions as the graph executor's kernels. The program is compiled once per (model,
//! pass shape) with the [`Tuning`] that makes its tiles the graph executor's launches (the
//! attention's key splits per layer, the MXFP4 experts' CTA shapes), so a step's logits are the
//! graph executor's bits.
//!
//! The session wraps a [`GpuSession`]: its KV caches and activation buffers are the ones the
//! step reads and writes, and passes the persistent engine does not run yet — prefill chunks,
//! verify blocks — run on the graph executor over the same caches ([`PersistentSession::prefill`]
//! says so in its name: `engine()` reports it). What the program cannot bind is an error naming
//! the op and the reason ([`PersistentSession::new`]): today gpt-oss-style models (fused
//! QKV + RoPE, the fused router, MXFP4 experts, bf16 or f32 dense weights), decode steps of one
//! token.

use std::borrow::Cow;
use std::sync::Arc;

use cudarc::driver::sys::CUfunction_attribute;
use cudarc::driver::{CudaFunction, CudaGraph, CudaStream, LaunchConfig, PushKernelArg};
use model::config::ModelConfig;
use model::executor::{Executor, VerifyOutput};
use model::plan::{Buf, Plan, Tensor, WeightId};

use super::abi::PK_THREADS;
use super::abi::{Opcode, PkInstr, PkOpArgs, PkState, PK_ARG_DIMS, PK_ARG_FLOATS, PK_ARG_PTRS};
use super::compile::{compile_tuned, CompileOptions, Operand, Phase, Program, Space, Tuning};
use super::validate::validate;
use crate::abi::MAX_TOKENS;
use crate::arena::{htod, zero, Arena, DPtr};
use crate::exec::{GpuModel, GpuSession, DEFAULT_MAX_ROLLBACK};
use crate::moe::DeviceExperts;
use crate::ops::{att_smem_bytes, attention_splits, route_spec, RouteArgs};
use crate::tensor::{DenseData, DeviceMatrix};
use crate::RuntimeError;

/// Threads of the persistent block in warps.
const PK_WARPS: usize = PK_THREADS as usize / 32;

fn unsupported(what: String) -> RuntimeError {
    RuntimeError::Unsupported(format!("persistent engine: {what}"))
}

/// A decode program bound to one session's buffers and uploaded.
struct Step {
    program: Program,
    func: CudaFunction,
    _arena: Arena,
    instrs: DPtr<PkInstr>,
    offsets: DPtr<u32>,
    counters: DPtr<u32>,
    state: DPtr<PkState>,
    args: DPtr<PkOpArgs>,
    smem: u32,
    graph: Option<CudaGraph>,
}

/// One sequence whose decode steps run on the persistent engine.
pub struct PersistentSession {
    gpu: GpuSession,
    step: Step,
    use_graph: bool,
}

/// The weight dtype flag of the bodies (1: f32, 0: bf16), or an error for a tiled matrix.
fn dense(m: &DeviceMatrix, what: &str) -> Result<(u64, u32), RuntimeError> {
    match m.data {
        DenseData::Bf16(p) => Ok((p.addr(), 0)),
        DenseData::F32(p) => Ok((p.addr(), 1)),
        DenseData::Tiled(_) => Err(unsupported(format!(
            "{what}: an FP8 / tiled projection weight (the projection kernels' layout)"
        ))),
    }
}

/// Whether the row-major GEMV bodies take `m` with input `x` (16-byte vectors along K), as the
/// graph executor's `linear` chooses its vectorised kernels.
fn vectorised(m: &DeviceMatrix, x: u64, what: &str) -> Result<(u64, u32), RuntimeError> {
    let (addr, f32) = dense(m, what)?;
    let per16 = if f32 == 1 { 4 } else { 8 };
    if !m.cols.is_multiple_of(per16) || !addr.is_multiple_of(16) || !x.is_multiple_of(16) {
        return Err(unsupported(format!(
            "{what}: {}x{} is not 16-byte vectorisable (the graph executor's generic linear)",
            m.rows, m.cols
        )));
    }
    Ok((addr, f32))
}

impl PersistentSession {
    /// A new empty sequence of at most `max_seq` positions whose decode steps run the persistent
    /// engine: compiles the model's decode program for this device, binds it to the session's
    /// buffers and uploads it. Models or ops it cannot run yet are an error naming them.
    pub fn new(model: &GpuModel, max_seq: usize) -> Result<PersistentSession, RuntimeError> {
        let gpu = model.session(max_seq)?;
        let step = Step::build(&gpu)?;
        Ok(PersistentSession {
            gpu,
            step,
            use_graph: std::env::var("ULTRA_NO_GRAPHS").map_or(true, |v| v != "1"),
        })
    }

    /// The graph executor's session underneath (its caches and buffers; prefill and verify).
    pub fn gpu(&self) -> &GpuSession {
        &self.gpu
    }

    /// The compiled decode program.
    pub fn program(&self) -> &Program {
        &self.step.program
    }

    /// What runs which pass (for the CLI's report).
    pub fn engine(&self) -> &'static str {
        "persistent (decode steps: one resident kernel per token; prefill on the graph executor)"
    }

    /// Positions held.
    pub fn len(&self) -> usize {
        self.gpu.len()
    }

    pub fn is_empty(&self) -> bool {
        self.gpu.is_empty()
    }

    /// Appends `tokens` on the graph executor (prefill passes) and returns the last logits.
    pub fn prefill(&mut self, tokens: &[u32]) -> Result<Vec<f32>, RuntimeError> {
        self.gpu.prefill(tokens)
    }

    /// Appends `tokens` on the graph executor and returns the greedy next token.
    pub fn prefill_greedy(&mut self, tokens: &[u32]) -> Result<u32, RuntimeError> {
        self.gpu.prefill_greedy(tokens)
    }

    /// One decode step on the persistent engine: appends `token`; the logits and their argmax
    /// stay on the device (the session's buffers).
    pub fn step(&mut self, token: u32) -> Result<(), RuntimeError> {
        self.gpu.check_tokens(&[token])?;
        let stream = self.gpu.stream().clone();
        let io = [self.gpu.len() as u32, token];
        htod(&stream, &io, self.gpu.io().slice(0..2))?;
        if self.use_graph {
            if self.step.graph.is_none() {
                let g = crate::exec::capture_graph(&stream, || self.step.launch(&stream))?;
                self.step.graph = Some(g);
            }
            if let Some(g) = &self.step.graph {
                g.launch()?;
            }
        } else {
            self.step.launch(&stream)?;
        }
        self.gpu.advance(1);
        Ok(())
    }

    /// One decode step; returns the logits.
    pub fn decode(&mut self, token: u32) -> Result<Vec<f32>, RuntimeError> {
        self.step(token)?;
        Ok(self.gpu.logits_rows(1)?.pop().expect("one row"))
    }

    /// One decode step; returns the greedy next token (argmax on the device).
    pub fn decode_greedy(&mut self, token: u32) -> Result<u32, RuntimeError> {
        self.step(token)?;
        let ids = crate::arena::dtoh(self.gpu.stream(), self.gpu.argmax_device(1))?;
        Ok(ids[0])
    }

    /// Drops every position ≥ `len` (the caches are the graph executor's: exact as
    /// [`GpuSession::truncate`]).
    pub fn truncate(&mut self, len: usize) -> Result<(), RuntimeError> {
        self.gpu.truncate(len)
    }

    /// Run steps launch by launch instead of replaying the captured graph.
    pub fn set_use_graph(&mut self, on: bool) {
        self.use_graph = on;
    }
}

impl Step {
    fn build(gpu: &GpuSession) -> Result<Step, RuntimeError> {
        let model = gpu.model();
        let stream = model.stream().clone();
        let ctx = stream.context().clone();
        let sms = ctx.attribute(
            cudarc::driver::sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT,
        )? as usize;
        let max_smem = ctx.attribute(
            cudarc::driver::sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN,
        )? as usize;
        let plan = model.plan_for(1, crate::exec::Logits::All, false)?;
        let (tuning, smem) = tuning(gpu, &plan)?;
        let opts = CompileOptions::h100().with_sms(sms);
        let program = compile_tuned(&plan, &opts, &tuning)?;
        validate(&program)
            .map_err(|e| RuntimeError::Invalid(format!("persistent schedule: {e}")))?;
        // Static shared memory of pk_step's bodies is below 24 KB (ptxas -v: 17 KB).
        if smem + (24 << 10) > max_smem {
            return Err(unsupported(format!(
                "{smem} bytes of dynamic shared memory needed, {max_smem} per block"
            )));
        }
        let mut table = Vec::with_capacity(program.phases.len());
        for (i, ph) in program.phases.iter().enumerate() {
            let a = bind(gpu, &plan, ph).map_err(|e| match e {
                RuntimeError::Unsupported(m) | RuntimeError::Invalid(m) => {
                    RuntimeError::Unsupported(format!(
                        "{m} (phase {i}: {}, op #{})",
                        ph.opcode.name(),
                        ph.op
                    ))
                }
                e => e,
            })?;
            table.push(a);
        }
        let module = ultra_kernels::load(&ctx, &ultra_kernels::PERSISTENT)?;
        let func = module.load_function("pk_step")?;
        func.set_attribute(
            CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
            smem as i32,
        )?;
        let mut arena = Arena::new(stream.clone());
        let mut flat: Vec<PkInstr> = Vec::with_capacity(program.instructions());
        let mut offsets: Vec<u32> = Vec::with_capacity(program.streams.len() + 1);
        for s in &program.streams {
            offsets.push(flat.len() as u32);
            flat.extend_from_slice(s);
        }
        offsets.push(flat.len() as u32);
        let instrs = arena.upload(&flat, "persistent instructions")?;
        let offsets_d = arena.upload(&offsets, "persistent stream offsets")?;
        let args = arena.upload(&table, "persistent argument blocks")?;
        let counters = arena.alloc::<u32>(program.counters.len().max(1), "persistent counters")?;
        let state = arena.alloc::<PkState>(1, "persistent state")?;
        zero(&stream, counters)?;
        zero(&stream, state)?;
        stream.synchronize()?;
        Ok(Step {
            program,
            func,
            _arena: arena,
            instrs,
            offsets: offsets_d,
            counters,
            state,
            args,
            smem: smem as u32,
            graph: None,
        })
    }

    /// Enqueues one step (graph-capturable: the step number lives on the device).
    fn launch(&self, stream: &Arc<CudaStream>) -> Result<(), RuntimeError> {
        let addrs = [
            self.instrs.addr(),
            self.offsets.addr(),
            self.counters.addr(),
            self.state.addr(),
            0u64,
            self.args.addr(),
        ];
        let mut b = stream.launch_builder(&self.func);
        for a in &addrs {
            b.arg(a);
        }
        let cfg = LaunchConfig {
            grid_dim: (self.program.options.sms as u32, 1, 1),
            block_dim: (PK_THREADS, 1, 1),
            shared_mem_bytes: self.smem,
        };
        // SAFETY: matches `pk_step(const PkInstr*, const u32*, u32*, PkState*, PkTrace*, const
        // PkOpArgs*)`; every pointer is a live allocation of this step (the trace is null) and
        // the argument blocks point into the session's buffers and the model's weights, which
        // outlive it.
        unsafe { b.launch(cfg) }?;
        Ok(())
    }
}

/// The tuning that makes the decode program's tiles the graph executor's launches, and the
/// dynamic shared memory its bodies need.
fn tuning(gpu: &GpuSession, plan: &Plan) -> Result<(Tuning, usize), RuntimeError> {
    let model = gpu.model();
    let w = model.weights();
    let mut t = Tuning::default();
    let mut smem = 0usize;
    for (l, kv) in gpu.caches().iter().enumerate() {
        let args = crate::exec::lower::layer_attention_args(plan, l, kv)?;
        t.attn_splits
            .push(attention_splits(&args, 1, gpu.layer_keys()[l]));
        smem = smem.max(att_smem_bytes(args.head_dim, args.v_head_dim, PK_WARPS));
    }
    let moe = w.layers.iter().find_map(|l| match &l.mlp {
        crate::exec::lower::DeviceMlp::Moe { experts, .. } => Some(experts),
        _ => None,
    });
    if let Some(m) = moe {
        let k = model.config().top_k;
        for (which, e) in [(0, &m.gate_up), (1, &m.down)] {
            if !matches!(e, DeviceExperts::Mxfp4 { .. }) {
                return Err(unsupported(
                    "dense (bf16 / f32) routed experts: the expert bodies are MXFP4".into(),
                ));
            }
            let s = model.moe_kernels().mx_shape(e, 1, k)?;
            if s.pairs != 1 {
                return Err(unsupported(format!(
                    "{} token pairs per expert pass (the bodies take one)",
                    s.pairs
                )));
            }
            smem = smem.max(s.smem);
            if which == 0 {
                t.gate_up = (s.row_groups, s.warps);
            } else {
                t.down = (s.row_groups, s.warps);
            }
        }
    }
    Ok((t, smem))
}

/// The device address an operand binds to in `gpu`.
fn operand(gpu: &GpuSession, o: Operand) -> Result<u64, RuntimeError> {
    let b = gpu.buffers();
    Ok(match o {
        Operand::None => 0,
        Operand::Weight(id) => weight(gpu, id)?,
        Operand::Scales(id) => match experts(gpu, id)? {
            DeviceExperts::Mxfp4 { scales, .. } => scales.addr(),
            DeviceExperts::Dense { .. } => {
                return Err(unsupported(format!(
                    "weight {id}: dense experts have no scales"
                )))
            }
        },
        Operand::Buffer(space) => match space {
            Space::Plan(Buf::Tokens) => b.io.slice(1..1 + MAX_TOKENS).addr(),
            Space::Plan(Buf::X) => b.x.addr(),
            Space::Plan(Buf::H) => b.h.addr(),
            Space::Plan(Buf::Q(0)) => b.q.addr(),
            Space::Plan(Buf::Attn(0)) => b.attn.addr(),
            Space::Plan(Buf::Act(0)) => b.act.addr(),
            Space::Plan(Buf::Routing) => b.ids.addr(),
            Space::Plan(Buf::Logits) => b.logits.addr(),
            Space::Plan(Buf::Sampled) => b.argmax.addr(),
            Space::AttnPartials => b.attn_scratch.addr(),
            Space::RouterLogits => b.router_logits.addr(),
            Space::ExpertOut => b.y.addr(),
            Space::ExpertList => b.expert_list.addr(),
            Space::ArgmaxPartials => b.argmax_partials.addr(),
            Space::Plan(other) => {
                return Err(unsupported(format!("buffer {other} is not bound")));
            }
        },
        Operand::KvKeys(l) | Operand::KvValues(l) => {
            let kv = gpu
                .caches()
                .get(l)
                .ok_or_else(|| RuntimeError::Invalid(format!("no KV cache of layer {l}")))?;
            if matches!(o, Operand::KvKeys(_)) {
                kv.k.addr()
            } else {
                kv.v.addr()
            }
        }
        Operand::Positions => b.io.addr(),
        Operand::Rope(id) => gpu
            .model()
            .ropes()
            .get(id)
            .ok_or_else(|| RuntimeError::Invalid(format!("RoPE table #{id} is not on the device")))?
            .inv_freq
            .addr(),
        Operand::RoutingWeights => b.weights.addr(),
    })
}

fn experts(gpu: &GpuSession, id: WeightId) -> Result<&DeviceExperts, RuntimeError> {
    let m = gpu.model().weights().experts(id)?;
    Ok(match id.tensor {
        Tensor::ExpertsGateUp | Tensor::ExpertsGateUpBias => &m.gate_up,
        _ => &m.down,
    })
}

/// A weight operand's address (matrices: their data; biases: the bias uploaded with their
/// matrix).
fn weight(gpu: &GpuSession, id: WeightId) -> Result<u64, RuntimeError> {
    let w = gpu.model().weights();
    let with = |tensor: Tensor| WeightId { tensor, ..id };
    Ok(match id.tensor {
        Tensor::Embed
        | Tensor::LmHead
        | Tensor::Q
        | Tensor::K
        | Tensor::V
        | Tensor::O
        | Tensor::Router => dense(w.linear(id)?.0, &id.to_string())?.0,
        Tensor::QBias | Tensor::KBias | Tensor::VBias => {
            crate::arena::addr_or_null(w.linear(with(Tensor::Q))?.1)
        }
        Tensor::OBias => crate::arena::addr_or_null(w.linear(with(Tensor::O))?.1),
        Tensor::RouterBias => crate::arena::addr_or_null(w.linear(with(Tensor::Router))?.1),
        Tensor::InputNorm | Tensor::PostAttnNorm | Tensor::FinalNorm | Tensor::HiddenNorm => {
            w.vector(id)?.addr()
        }
        Tensor::QNorm | Tensor::KNorm | Tensor::Sinks | Tensor::CorrectionBias => {
            crate::arena::addr_or_null(w.optional(id)?)
        }
        Tensor::ExpertsGateUp | Tensor::ExpertsDown => match experts(gpu, id)? {
            DeviceExperts::Mxfp4 { codes, .. } => codes.addr(),
            DeviceExperts::Dense { .. } => {
                return Err(unsupported(format!("weight {id}: dense routed experts")))
            }
        },
        Tensor::ExpertsGateUpBias => crate::arena::addr_or_null(w.experts(id)?.gate_up_bias),
        Tensor::ExpertsDownBias => crate::arena::addr_or_null(w.experts(id)?.down_bias),
        Tensor::MlpGateUp | Tensor::MlpDown | Tensor::Fc => {
            return Err(unsupported(format!(
                "weight {id}: dense MLP / drafter weights"
            )))
        }
    })
}

/// One phase's argument block: its operands resolved in `gpu`, the compiler's dims and floats,
/// and the dims the bodies need from the uploaded weights and caches (`compile.rs`, *session*).
fn bind(gpu: &GpuSession, plan: &Plan, ph: &Phase) -> Result<PkOpArgs, RuntimeError> {
    if plan.shape.rows != 1 {
        return Err(unsupported(format!(
            "a pass of {} rows (decode steps of one token so far)",
            plan.shape.rows
        )));
    }
    if ph.operands.len() > PK_ARG_PTRS
        || ph.dims.len() > PK_ARG_DIMS
        || ph.floats.len() > PK_ARG_FLOATS
    {
        return Err(RuntimeError::Invalid(format!(
            "{} operands, {} dims, {} floats: more than an argument block holds",
            ph.operands.len(),
            ph.dims.len(),
            ph.floats.len()
        )));
    }
    let mut a = PkOpArgs {
        ptr: [0; PK_ARG_PTRS],
        dim: [0; PK_ARG_DIMS],
        f: [0.0; PK_ARG_FLOATS],
        opcode: ph.opcode as u32,
        tiles: ph.n_tiles() as u32,
    };
    for (i, o) in ph.operands.iter().enumerate() {
        a.ptr[i] = operand(gpu, *o)?;
    }
    a.dim[..ph.dims.len()].copy_from_slice(&ph.dims);
    a.f[..ph.floats.len()].copy_from_slice(&ph.floats);
    let w = gpu.model().weights();
    let layer = |t: Tensor| WeightId {
        tensor: t,
        layer: ph.layer,
        shard: None,
    };
    match ph.opcode {
        Opcode::Embed => {
            if ph.floats.first().is_some_and(|&s| s != 1.0) {
                return Err(unsupported("a scaled embedding (drafters)".into()));
            }
            a.dim[3] = dense(&w.embed, "embedding")?.1;
        }
        Opcode::RmsNorm => {
            if a.dim[2] == 1 {
                // The fused router's norm: only where the graph executor fuses it.
                let (router, _) = w.linear(layer(Tensor::Router))?;
                let (addr, f32) = dense(router, "router")?;
                let per16 = if f32 == 1 { 4 } else { 8 };
                let aligned = [addr, a.ptr[0], a.ptr[1]]
                    .iter()
                    .all(|p| p.is_multiple_of(16));
                if router.cols == 0 || !router.cols.is_multiple_of(per16) || !aligned {
                    return Err(unsupported(
                        "a router the graph executor does not fuse (unaligned)".into(),
                    ));
                }
                a.dim[3] = per16 as u32;
            } else {
                a.dim[3] = if a.dim[0] >= 2048 { 2 } else { 1 };
            }
        }
        Opcode::Qkv => {
            let l = ph
                .layer
                .ok_or_else(|| RuntimeError::Invalid("qkv without a layer".into()))?;
            let dl = &w.layers[l];
            if !dl.qkv_rope_fused || a.dim[7] == 0 || !a.dim[7].is_multiple_of(2) {
                return Err(unsupported(
                    "a QKV projection without the fused RoPE (q/k norms, or weights not in \
                     RoPE pair order)"
                        .into(),
                ));
            }
            let (_, f32) = vectorised(&dl.qkv, a.ptr[5], "qkv")?;
            a.dim[8] = gpu.caches()[l].capacity as u32;
            a.dim[9] = f32;
            let rope = match ph.operands[4] {
                Operand::Rope(id) => gpu.model().ropes()[id],
                _ => return Err(RuntimeError::Invalid("qkv without a RoPE table".into())),
            };
            a.f[2] = rope.attention_factor;
        }
        Opcode::Attention => {
            let l = ph
                .layer
                .ok_or_else(|| RuntimeError::Invalid("attention without a layer".into()))?;
            a.dim[7] = gpu.caches()[l].capacity as u32;
        }
        Opcode::AttnCombine => {}
        Opcode::LinearResidual => {
            let (o, _) = w.linear(layer(Tensor::O))?;
            a.dim[4] = vectorised(o, a.ptr[2], "o_proj")?.1;
        }
        Opcode::RouterLogits => {
            let (r, _) = w.linear(layer(Tensor::Router))?;
            a.dim[4] = dense(r, "router")?.1;
        }
        Opcode::RouterTopK => {
            let l = ph
                .layer
                .ok_or_else(|| RuntimeError::Invalid("routing without a layer".into()))?;
            let op = &plan.ops[ph.op];
            let model::plan::OpKind::NormRouterTopK(p) = op.kind else {
                return Err(RuntimeError::Invalid("router_topk of another op".into()));
            };
            let correction = if p.correction_bias {
                w.optional(WeightId::layer(Tensor::CorrectionBias, l))?
            } else {
                None
            };
            let spec = route_spec(&RouteArgs::of(p.kind, correction), p.n_experts, p.top_k)?;
            a.ptr[1] = spec.corr_bias;
            a.dim[3] = spec.kind;
            a.dim[4] = spec.norm_topk;
            a.dim[5] = spec.n_group;
            a.dim[6] = spec.topk_group;
            a.f[0] = spec.scaling;
        }
        Opcode::ExpertGateUp | Opcode::ExpertDown => {}
        Opcode::CombineNorm => {
            if a.ptr[3] != 0 && a.dim[0] > 4096 {
                return Err(unsupported(format!(
                    "a combine + norm of {} > 4096 values (the graph executor's strided kernel)",
                    a.dim[0]
                )));
            }
        }
        Opcode::LmHead => {
            a.dim[5] = vectorised(&w.lm_head, a.ptr[1], "lm_head")?.1;
            let chunks = a.dim[0].div_ceil(a.dim[4].max(1)) as usize;
            if a.ptr[3] != 0 && chunks > crate::exec::ARGMAX_CHUNKS {
                return Err(unsupported(format!(
                    "an LM head of {chunks} chunks (at most {})",
                    crate::exec::ARGMAX_CHUNKS
                )));
            }
        }
        Opcode::Argmax => {}
        Opcode::MlpGateUp | Opcode::MlpDown => {
            return Err(unsupported("dense MLP layers (no body yet)".into()))
        }
    }
    Ok(a)
}

impl Executor for PersistentSession {
    type Error = RuntimeError;

    fn config(&self) -> &ModelConfig {
        self.gpu.model().config()
    }

    fn len(&self) -> usize {
        self.gpu.len()
    }

    fn max_rollback(&self) -> usize {
        DEFAULT_MAX_ROLLBACK
    }

    /// On the graph executor (prefill passes), over the session's caches.
    fn prefill(&mut self, tokens: &[u32]) -> Result<Cow<'_, [f32]>, RuntimeError> {
        self.gpu.bind_context()?;
        PersistentSession::prefill(self, tokens).map(Cow::Owned)
    }

    fn decode(&mut self, token: u32) -> Result<Cow<'_, [f32]>, RuntimeError> {
        self.gpu.bind_context()?;
        PersistentSession::decode(self, token).map(Cow::Owned)
    }

    fn prefill_greedy(&mut self, tokens: &[u32]) -> Result<u32, RuntimeError> {
        self.gpu.bind_context()?;
        PersistentSession::prefill_greedy(self, tokens)
    }

    fn decode_greedy(&mut self, token: u32) -> Result<u32, RuntimeError> {
        self.gpu.bind_context()?;
        PersistentSession::decode_greedy(self, token)
    }

    /// Not on the persistent engine yet: an error (speculative decoding needs `--engine graph`).
    fn verify(&mut self, tokens: &[u32], _hidden: &[usize]) -> Result<VerifyOutput, RuntimeError> {
        Err(unsupported(format!(
            "verify blocks ({} tokens): speculative decoding runs on the graph executor \
             (--engine graph)",
            tokens.len()
        )))
    }

    fn truncate(&mut self, len: usize) -> Result<(), RuntimeError> {
        PersistentSession::truncate(self, len)
    }
}
