//! DFlash drafting on the GPU: a drafter's weights on the device ([`GpuDrafter`], from the
//! model-level `model::drafter` types) and its per-sequence context cache and forward
//! ([`GpuDraftSession`]). The speculative loop's GPU backend that pairs them with a
//! [`GpuSession`] lives with the loop (`dflash::gpu`, feature `cuda`): this crate does not
//! depend on `dflash`.
//!
//! The math is `dflash::drafter`'s (research/dflash.md §2–3). Both passes are the drafter's
//! step plans (`model::plan::Plan::draft`, from [`DrafterConfig::draft_spec`]) lowered by the
//! target's lowering (`exec::lower`) onto the same fused kernels:
//!
//! ```text
//! context (n ≤ 16 committed tokens, features = the target's captured hidden states):
//!   draft_context: fc (K column blocks, accumulated) → rms_norm(hidden_norm)
//!   per layer: qkv_rope_kv (k/v only) at the tokens' positions (k, v into the draft cache)
//! draft (block [x_last, MASK × (B−1)] at positions start .. start+B):
//!   embed(x_last) ‖ mask rows → rms_norm → per layer: qkv_rope_kv → draft_attention
//!   (bidirectional / causal / sliding as the config says) → o_proj (+= residual) → rms_norm
//!   → mlp_gate_up (SwiGLU) → mlp_down (+= residual, next norm; the final `norm` on rows 1..B)
//!   → the TARGET's LM head → sample (argmax)
//! ```
//!
//! Both passes are captured as CUDA graphs (one per context length n and one per block size B)
//! and replayed: what changes between rounds (positions, `x_last`) lives in a small device
//! buffer written before each replay. The block's keys and values are written at their
//! positions in the draft cache and overwritten by the committed context of the next round, so
//! the cache holds committed context only where it is ever read as such.
//!
//! A non-causal sliding window `W` shorter than the block (query `p` sees keys up to
//! `p + W − 1`, not the block's end; only tiny test drafters have that) is handled exactly: the
//! rows whose upper bound falls inside the block are recomputed one by one.
//!
//! `input_embedding_scale ≠ 1` (for targets that scale their embeddings, z-lab's
//! `_raw_input_embeddings`) multiplies the block's input rows as the CPU drafter does: the mask
//! rows are scaled once on the host at upload; `x_last`'s row is scaled on the device by the
//! `linear` op with the gathered row as a `[H, 1]` weight and the scale as the one-element input
//! (`y[r] = row[r] · scale`, one rounded f32 product per element: the CPU's `v *= scale`).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use cudarc::driver::{CudaGraph, CudaStream};
use model::drafter::{hidden_index, DrafterConfig, DrafterWeights, MAX_BLOCK_SIZE, MIN_BLOCK_SIZE};
use model::plan::draft::{DraftPass, DraftSpec};
use model::plan::{LayerTables, Plan};
use model::weights::Mlp;

use crate::arena::{dtoh, htod, Arena, DPtr};
use crate::exec::lower::{
    layer_attention_args, Bindings, Captures, DeviceLayer, DeviceMlp, DeviceWeights, KvBinding,
    LayerKv, Lowering, Scratch, TokenBinding,
};
use crate::exec::{
    capture_graph, plan_error, upload_opt, upload_projection, upload_qkv, upload_ropes, GpuModel,
    GpuSession, Rope, DEVICE_STORAGE, SESSION_CHUNK_BYTES,
};
use crate::ops::proj::ProjData;
use crate::ops::MAX_TOKENS;
use crate::tensor::{patterned_vector, DenseData, DeviceMatrix};
use crate::RuntimeError;

struct Inner {
    config: Arc<DrafterConfig>,
    target: GpuModel,
    /// The drafter's layers, `fc` (split by target layer: `K` matrices `[H, H_t]`, summed:
    /// `fc · [h₀ ‖ … ‖ h_K−1]`), `hidden_norm`, `norm` (as the final norm), the scale of
    /// `x_last`'s embedding row, and the target's embedding and LM head.
    weights: DeviceWeights,
    /// The device tables of the plans' `ropes`.
    ropes: Vec<Rope>,
    spec: DraftSpec,
    /// The plan of a block of `MAX_TOKENS` rows: the per-layer tables and attention geometry
    /// sessions size their caches by.
    layout: Plan,
    /// The plan of every pass run so far, built once each (at graph capture).
    plans: Mutex<HashMap<DraftPass, Arc<Plan>>>,
    /// `[MAX_TOKENS − 1, H]`: the block's mask row (the mask embedding, or the target's
    /// embedding of the mask token) repeated.
    mask_rows: DPtr<f32>,
    /// The target's hidden-state indices of `target_layer_ids` (as `GpuSession::set_capture`).
    hidden_indices: Vec<usize>,
    weight_bytes: usize,
    _arena: Arena,
}

/// A DFlash drafter resident on the GPU of its target (whose embedding and LM head it borrows).
/// Cheap to clone (shared).
#[derive(Clone)]
pub struct GpuDrafter {
    inner: Arc<Inner>,
}

fn invalid(e: impl std::fmt::Display) -> RuntimeError {
    RuntimeError::Invalid(e.to_string())
}

fn device_addr(m: &DeviceMatrix) -> u64 {
    match m.data {
        DenseData::Bf16(p) => p.addr(),
        DenseData::F32(p) => p.addr(),
        DenseData::Tiled(ProjData::Fp8 { tiles, .. }) => tiles.addr(),
        DenseData::Tiled(ProjData::Bf16 { tiles }) => tiles.addr(),
    }
}

/// Key-cache capacity of one draft layer for sequences of at most `max_seq` committed positions
/// (`LayerTables::kv_capacity` with the block on top): full attention keeps every position up
/// to the block's end; a window `W` keeps a ring of `W + MAX_TOKENS` (the oldest key a block
/// query sees is `W − 1` before the block start, the newest `MAX_TOKENS − 1` after it).
fn cache_capacity(tables: &LayerTables, max_seq: usize) -> usize {
    tables.kv_capacity(max_seq + MAX_TOKENS, MAX_TOKENS, 0)
}

/// Keys that size one draft layer's attention splits (`LayerTables::max_keys`, block on top).
fn max_keys(tables: &LayerTables, max_seq: usize) -> usize {
    tables.max_keys(max_seq + MAX_TOKENS, MAX_TOKENS)
}

impl GpuDrafter {
    /// Uploads a drafter (`config` + `weights`, as `dflash::Drafter::config` / `weights`) next
    /// to its `target` (checked against the config, and against the target: hidden size,
    /// vocabulary, target layers, mask token).
    pub fn new(
        target: &GpuModel,
        config: &DrafterConfig,
        weights: &DrafterWeights,
    ) -> Result<Self, RuntimeError> {
        weights.check(config).map_err(invalid)?;
        weights
            .check_target(config, target.config())
            .map_err(invalid)?;
        let (c, w) = (config, weights);
        let mut arena = Arena::new(target.stream().clone());
        let k = c.num_features();
        let ht = w.fc.cols / k;
        let fc = (0..k)
            .map(|i| {
                // One target layer's columns in the stored dtype (bf16 goes up as it is).
                let block = w.fc.columns(i * ht, ht);
                DeviceMatrix::from_mat(&mut arena, &block, &format!("fc block {i}"))
            })
            .collect::<Result<Vec<_>, _>>()?;
        let mut layers = Vec::with_capacity(w.layers.len());
        for (l, lw) in w.layers.iter().enumerate() {
            let at = |what: &str| format!("draft layer {l} {what}");
            let a = &lw.attn;
            let (qkv, qkv_bias) = upload_qkv(&mut arena, a, None, &at("qkv"))?;
            let (o, o_bias) = upload_projection(&mut arena, &a.o, &at("o_proj"))?;
            let Mlp::Dense { gate_up, down } = &lw.mlp else {
                return Err(invalid(format!("draft layer {l}: not a dense MLP")));
            };
            layers.push(DeviceLayer {
                input_norm: arena.upload(&lw.input_norm, &at("input norm"))?,
                post_attn_norm: arena.upload(&lw.post_attn_norm, &at("post-attention norm"))?,
                qkv,
                qkv_bias,
                // Uploaded in checkpoint row order: draft layers carry q/k norms, which the fused
                // projection cannot apply.
                qkv_rope_fused: false,
                o,
                o_bias,
                q_norm: upload_opt(&mut arena, a.q_norm.as_ref(), &at("q norm"))?,
                k_norm: upload_opt(&mut arena, a.k_norm.as_ref(), &at("k norm"))?,
                sinks: upload_opt(&mut arena, a.sinks.as_ref(), &at("sinks"))?,
                mlp: DeviceMlp::Dense {
                    gate_up: upload_projection(&mut arena, gate_up, &at("gate_up"))?.0,
                    gate_up_bias: None,
                    down: upload_projection(&mut arena, down, &at("down"))?.0,
                    down_bias: None,
                },
            });
        }
        let hidden_norm = arena.upload(&w.hidden_norm, "hidden norm")?;
        let norm = arena.upload(&w.norm, "draft norm")?;
        Self::assemble(
            target,
            c.clone(),
            arena,
            fc,
            hidden_norm,
            norm,
            layers,
            w.mask_embedding.clone(),
        )
    }

    /// A drafter of `config`'s shape with random weights generated on the device (benchmarks:
    /// nothing large on the host), next to `target`. Every layer gets q/k norms; sinks when the
    /// config has them; no biases.
    pub fn synthetic(
        target: &GpuModel,
        config: DrafterConfig,
        seed: u64,
    ) -> Result<Self, RuntimeError> {
        let tc = target.config();
        config
            .check_target_dims(
                config.num_features() * tc.hidden_size,
                tc.vocab_size,
                tc.hidden_size,
                tc.layers.len(),
            )
            .map_err(invalid)?;
        let ops = target.ops();
        let mut arena = Arena::new(target.stream().clone());
        let (h, nh, nkv, d, inter) = (
            config.hidden_size,
            config.n_heads,
            config.n_kv_heads,
            config.head_dim,
            config.intermediate_size,
        );
        let mut seed = seed;
        let mut next = || {
            seed = seed
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            seed
        };
        let mut dense = |arena: &mut Arena, rows: usize, cols: usize, what: &str| {
            DeviceMatrix::synthetic(arena, ops, rows, cols, next(), what)
        };
        let fc = (0..config.num_features())
            .map(|i| dense(&mut arena, h, tc.hidden_size, &format!("fc block {i}")))
            .collect::<Result<Vec<_>, _>>()?;
        let mut layers = Vec::with_capacity(config.num_layers());
        for l in 0..config.num_layers() {
            let at = |what: &str| format!("draft layer {l} {what}");
            let v = |arena: &mut Arena, n: usize, c: f32, s: f32, what: &str| {
                patterned_vector(arena, n, c, s, &at(what))
            };
            layers.push(DeviceLayer {
                input_norm: v(&mut arena, h, 1.0, 0.1, "input norm")?,
                post_attn_norm: v(&mut arena, h, 1.0, 0.1, "post-attention norm")?,
                qkv: dense(&mut arena, nh * d + 2 * nkv * d, h, &at("qkv"))?,
                qkv_bias: None,
                qkv_rope_fused: false,
                o: dense(&mut arena, h, nh * d, &at("o_proj"))?,
                o_bias: None,
                q_norm: Some(v(&mut arena, d, 1.0, 0.1, "q norm")?),
                k_norm: Some(v(&mut arena, d, 1.0, 0.1, "k norm")?),
                sinks: if config.sinks {
                    Some(v(&mut arena, nh, 0.0, 0.5, "sinks")?)
                } else {
                    None
                },
                mlp: DeviceMlp::Dense {
                    gate_up: dense(&mut arena, 2 * inter, h, &at("gate_up"))?,
                    gate_up_bias: None,
                    down: dense(&mut arena, h, inter, &at("down"))?,
                    down_bias: None,
                },
            });
        }
        let hidden_norm = patterned_vector(&mut arena, h, 1.0, 0.1, "hidden norm")?;
        let norm = patterned_vector(&mut arena, h, 1.0, 0.1, "draft norm")?;
        Self::assemble(target, config, arena, fc, hidden_norm, norm, layers, None)
    }

    #[allow(clippy::too_many_arguments)]
    fn assemble(
        target: &GpuModel,
        config: DrafterConfig,
        mut arena: Arena,
        fc: Vec<DeviceMatrix>,
        hidden_norm: DPtr<f32>,
        norm: DPtr<f32>,
        layers: Vec<DeviceLayer>,
        mask_embedding: Option<Vec<f32>>,
    ) -> Result<Self, RuntimeError> {
        let h = config.hidden_size;
        let spec = config.draft_spec(target.config());
        let layout = Plan::draft(&spec, DEVICE_STORAGE, DraftPass::Block { b: MAX_TOKENS }, 0)
            .map_err(plan_error)?;
        let mask_row = match mask_embedding {
            Some(m) => m,
            None => {
                // The target's embedding row of the mask token, gathered on the device.
                let tok = arena.upload(&[config.mask_token_id], "mask token")?;
                let row = arena.alloc::<f32>(h, "mask row")?;
                let stream = target.stream();
                target
                    .ops()
                    .embed(stream, target.embed_matrix(), tok, 1, row)?;
                dtoh(stream, row)?
            }
        };
        let scale = config.input_embedding_scale;
        if !scale.is_finite() {
            return Err(invalid(format!("input_embedding_scale {scale}")));
        }
        // The CPU drafter multiplies the copied rows in place (`v *= scale`): the same f32
        // products here.
        let mask_row: Vec<f32> = if scale == 1.0 {
            mask_row
        } else {
            mask_row.iter().map(|&v| v * scale).collect()
        };
        let mask_rows = arena.upload(&mask_row.repeat(MAX_TOKENS - 1), "mask rows")?;
        let embed_scale = if scale == 1.0 {
            None
        } else {
            Some(arena.upload(&[scale], "input embedding scale")?)
        };
        let ropes = upload_ropes(&mut arena, &layout.ropes)?;
        let nl = target.config().layers.len();
        let hidden_indices = config
            .target_layer_ids
            .iter()
            .map(|&l| {
                hidden_index(l, nl)
                    .ok_or_else(|| invalid(format!("target layer {l} ≥ the target's {nl} layers")))
            })
            .collect::<Result<Vec<_>, _>>()?;
        target.stream().synchronize()?;
        Ok(Self {
            inner: Arc::new(Inner {
                config: Arc::new(config),
                target: target.clone(),
                weights: DeviceWeights {
                    embed: *target.embed_matrix(),
                    lm_head: *target.lm_head_matrix(),
                    final_norm: norm,
                    layers,
                    fc,
                    hidden_norm: Some(hidden_norm),
                    embed_scale,
                },
                ropes,
                spec,
                layout,
                plans: Mutex::new(HashMap::new()),
                mask_rows,
                hidden_indices,
                weight_bytes: arena.used_bytes(),
                _arena: arena,
            }),
        })
    }

    pub fn config(&self) -> &DrafterConfig {
        &self.inner.config
    }

    /// The target model this drafter runs with.
    pub fn target(&self) -> &GpuModel {
        &self.inner.target
    }

    /// The target's hidden-state indices the drafter reads (`GpuSession::set_capture`).
    pub fn hidden_indices(&self) -> &[usize] {
        &self.inner.hidden_indices
    }

    /// Device bytes of the drafter's own weights.
    pub fn weight_bytes(&self) -> usize {
        self.inner.weight_bytes
    }

    /// A new empty per-sequence draft state for sequences of at most `max_seq` positions.
    pub fn session(&self, max_seq: usize) -> Result<GpuDraftSession, RuntimeError> {
        GpuDraftSession::new(self.clone(), max_seq)
    }

    /// The plan of `pass`, built on first use and cached.
    fn plan(&self, pass: DraftPass) -> Result<Arc<Plan>, RuntimeError> {
        let mut plans = self
            .inner
            .plans
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if let Some(p) = plans.get(&pass) {
            return Ok(p.clone());
        }
        let plan = Plan::draft(&self.inner.spec, DEVICE_STORAGE, pass, 0).map_err(plan_error)?;
        crate::exec::lower::check_plan(&plan)?;
        crate::exec::lower::check_weights(&plan, &self.inner.weights)?;
        let plan = Arc::new(plan);
        plans.insert(pass, plan.clone());
        Ok(plan)
    }

    /// The kernels (the target's), weights and RoPE tables the drafter's plans lower onto.
    fn lowering(&self) -> Lowering<'_> {
        let m = &*self.inner;
        Lowering {
            ops: m.target.ops(),
            moe: m.target.moe_kernels(),
            stream: m.target.stream(),
            weights: &m.weights,
            ropes: &m.ropes,
            rank: None,
        }
    }
}

struct Buffers {
    /// `[context start, x_last, start, start + 1, …, start + MAX_TOKENS − 1]`.
    io: DPtr<u32>,
    ctx: DPtr<f32>,
    ctx_normed: DPtr<f32>,
    x: DPtr<f32>,
    h: DPtr<f32>,
    qkv: DPtr<f32>,
    q: DPtr<f32>,
    attn: DPtr<f32>,
    attn_row: DPtr<f32>,
    attn_scratch: DPtr<f32>,
    gu: DPtr<f32>,
    act: DPtr<f32>,
    logits: DPtr<f32>,
    argmax: DPtr<u32>,
    argmax_scratch: DPtr<u32>,
}

/// io slots.
const IO_CTX_STEP: usize = 0;
const IO_X_LAST: usize = 1;
const IO_BLOCK_STEP: usize = 2;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Pass {
    /// Context append of `n` tokens whose features are at these captured-hidden addresses
    /// (the first slot's; the slots are consecutive).
    Context { n: usize, hidden: u64 },
    /// A draft block of `block` tokens.
    Draft { block: usize },
}

/// One sequence's drafter state on the device: each layer's key/value cache of the committed
/// context (plus the transient block), activation buffers, captured graphs.
pub struct GpuDraftSession {
    drafter: GpuDrafter,
    arena: Arena,
    kv: Vec<LayerKv>,
    /// Per layer, the keys that size its attention splits.
    keys: Vec<usize>,
    b: Buffers,
    len: usize,
    max_seq: usize,
    graphs: HashMap<Pass, CudaGraph>,
    use_graphs: bool,
}

impl GpuDraftSession {
    fn new(drafter: GpuDrafter, max_seq: usize) -> Result<Self, RuntimeError> {
        if max_seq == 0 {
            return Err(invalid("max_seq must be positive"));
        }
        let m = &*drafter.inner;
        let c = &*m.config;
        let t = MAX_TOKENS;
        let mut arena = Arena::with_chunk_bytes(m.target.stream().clone(), SESSION_CHUNK_BYTES);
        let (h, nh, nkv, d, inter) = (
            c.hidden_size,
            c.n_heads,
            c.n_kv_heads,
            c.head_dim,
            c.intermediate_size,
        );
        let v = m.target.config().vocab_size;
        let layout = &m.layout;
        let mut kv = Vec::with_capacity(layout.layers.len());
        let mut keys = Vec::with_capacity(layout.layers.len());
        for (l, tables) in layout.layers.iter().enumerate() {
            let capacity = cache_capacity(tables, max_seq);
            kv.push(LayerKv {
                k: arena.alloc(
                    capacity * tables.k_width,
                    &format!("draft layer {l} key cache"),
                )?,
                v: arena.alloc(
                    capacity * tables.v_width,
                    &format!("draft layer {l} value cache"),
                )?,
                capacity,
                paging: None,
            });
            keys.push(max_keys(tables, max_seq));
        }
        let mut scratch = 1;
        for (l, kv) in kv.iter().enumerate() {
            let a = layer_attention_args(layout, l, kv)?;
            // Fewer queries get more key splits: the largest need is not always at T = 16.
            for rows in 1..=t {
                scratch = scratch.max(crate::ops::Ops::attention_scratch_len(
                    &a,
                    rows,
                    kv.capacity,
                ));
            }
        }
        let b = Buffers {
            io: arena.alloc(IO_BLOCK_STEP + t, "draft io")?,
            ctx: arena.alloc(t * h, "draft context")?,
            ctx_normed: arena.alloc(t * h, "draft context (normed)")?,
            x: arena.alloc(t * h, "draft residual")?,
            h: arena.alloc(t * h, "draft normed activations")?,
            qkv: arena.alloc(t * (nh + 2 * nkv) * d, "draft qkv")?,
            q: arena.alloc(t * nh * d, "draft queries")?,
            attn: arena.alloc(t * nh * d, "draft attention output")?,
            attn_row: arena.alloc(t * nh * d, "draft attention rows")?,
            attn_scratch: arena.alloc(scratch, "draft attention scratch")?,
            gu: arena.alloc(t * 2 * inter, "draft gate_up")?,
            act: arena.alloc(t * inter, "draft activations")?,
            logits: arena.alloc((t - 1) * v, "draft logits")?,
            argmax: arena.alloc(t - 1, "draft argmax")?,
            argmax_scratch: arena.alloc(crate::ops::ARGMAX_SCRATCH, "draft argmax scratch")?,
        };
        m.target.stream().synchronize()?;
        Ok(Self {
            drafter,
            arena,
            kv,
            keys,
            b,
            len: 0,
            max_seq,
            graphs: HashMap::new(),
            use_graphs: true,
        })
    }

    /// Committed context tokens (the next block's `x_last` sits at this position).
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The drafter this state belongs to.
    pub fn drafter(&self) -> &GpuDrafter {
        &self.drafter
    }

    /// Checks that `target` can feed this state: a session of the drafter's target model
    /// holding at most as many positions as this state.
    pub fn check_target(&self, target: &GpuSession) -> Result<(), RuntimeError> {
        let (a, b) = (target.model(), self.drafter.target());
        if device_addr(a.embed_matrix()) != device_addr(b.embed_matrix()) {
            return Err(invalid(
                "the session's model is not the drafter's target model",
            ));
        }
        if self.max_seq < target.max_seq() {
            return Err(invalid(format!(
                "the draft state holds {} positions, the target session {}",
                self.max_seq,
                target.max_seq()
            )));
        }
        Ok(())
    }

    /// Device bytes this state holds (caches + buffers, as reserved from the device).
    pub fn device_bytes(&self) -> usize {
        self.arena.reserved_bytes()
    }

    /// Launch op by op instead of replaying captured graphs.
    pub fn set_use_graphs(&mut self, on: bool) {
        self.use_graphs = on;
    }

    /// Forgets every committed token.
    pub fn reset(&mut self) {
        self.len = 0;
    }

    /// Drops committed context beyond `len` (the cache keeps the rest; later appends overwrite).
    pub fn truncate(&mut self, len: usize) -> Result<(), RuntimeError> {
        if len > self.len {
            return Err(invalid(format!(
                "cannot truncate the draft context to {len}: it holds {}",
                self.len
            )));
        }
        self.len = len;
        Ok(())
    }

    fn stream(&self) -> Arc<CudaStream> {
        self.drafter.inner.target.stream().clone()
    }

    /// Appends `n ≤ MAX_TOKENS` committed tokens at positions `len() ..`, their features read
    /// from `target`'s captured hidden states (rows `0..n` of the latest pass; the session must
    /// capture [`GpuDrafter::hidden_indices`], in that order).
    pub fn append_context(&mut self, target: &GpuSession, n: usize) -> Result<(), RuntimeError> {
        if n == 0 || n > MAX_TOKENS {
            return Err(invalid(format!(
                "context append of {n} tokens (1..={MAX_TOKENS})"
            )));
        }
        if self.len + n > self.max_seq {
            return Err(invalid(format!(
                "the draft context would hold {} positions; at most {}",
                self.len + n,
                self.max_seq
            )));
        }
        if target.capture() != self.drafter.hidden_indices() {
            return Err(invalid(format!(
                "the target session captures hidden states {:?}; the drafter reads {:?}",
                target.capture(),
                self.drafter.hidden_indices()
            )));
        }
        let k = self.drafter.inner.weights.fc.len();
        let hidden: Vec<DPtr<f32>> = (0..k).map(|s| target.captured_hidden(s, n)).collect();
        htod(
            &self.stream(),
            &[self.len as u32],
            self.b.io.slice(IO_CTX_STEP..IO_CTX_STEP + 1),
        )?;
        let key = Pass::Context {
            n,
            hidden: hidden[0].addr(),
        };
        self.run(key, &|me: &Self| {
            me.encode(DraftPass::Context { n }, &hidden)
        })?;
        self.len += n;
        Ok(())
    }

    /// One draft forward of `[x_last, MASK × (block − 1)]` at positions `len() ..`; the
    /// `block − 1` draft rows stay on the device ([`GpuDraftSession::logits_device`],
    /// [`GpuDraftSession::argmax_device`]).
    pub fn draft(&mut self, x_last: u32, block: usize) -> Result<(), RuntimeError> {
        let v = self.drafter.inner.target.config().vocab_size;
        if !(MIN_BLOCK_SIZE..=MAX_BLOCK_SIZE).contains(&block) {
            return Err(invalid(format!(
                "block size {block} is outside {}..={}",
                MIN_BLOCK_SIZE, MAX_BLOCK_SIZE
            )));
        }
        if x_last as usize >= v {
            return Err(invalid(format!(
                "token {x_last} is outside the vocabulary (size {v})"
            )));
        }
        if self.len + block > self.max_seq + MAX_TOKENS {
            return Err(invalid(format!(
                "a block of {block} at position {} exceeds the draft cache",
                self.len
            )));
        }
        let mut io = vec![x_last];
        io.extend((0..MAX_TOKENS).map(|i| (self.len + i) as u32));
        htod(
            &self.stream(),
            &io,
            self.b.io.slice(IO_X_LAST..IO_BLOCK_STEP + MAX_TOKENS),
        )?;
        self.run(Pass::Draft { block }, &|me: &Self| {
            me.encode(DraftPass::Block { b: block }, &[])
        })
    }

    /// The `[rows, V]` draft logits of the latest [`GpuDraftSession::draft`], on the device.
    pub fn logits_device(&self, rows: usize) -> DPtr<f32> {
        let v = self.drafter.inner.target.config().vocab_size;
        self.b.logits.slice(0..rows.min(MAX_TOKENS - 1) * v)
    }

    /// The argmax of each draft row of the latest [`GpuDraftSession::draft`], on the device.
    pub fn argmax_device(&self, rows: usize) -> DPtr<u32> {
        self.b.argmax.slice(0..rows.min(MAX_TOKENS - 1))
    }

    fn run(
        &mut self,
        key: Pass,
        encode: &dyn Fn(&Self) -> Result<(), RuntimeError>,
    ) -> Result<(), RuntimeError> {
        if !self.use_graphs {
            return encode(self);
        }
        if !self.graphs.contains_key(&key) {
            if let Pass::Context { hidden, .. } = key {
                // The target's capture buffer moved: graphs of the old one are stale.
                self.graphs
                    .retain(|k, _| !matches!(k, Pass::Context { hidden: h, .. } if *h != hidden));
            }
            let g = capture_graph(&self.stream(), || encode(self))?;
            self.graphs.insert(key, g);
        }
        self.graphs[&key].launch()?;
        Ok(())
    }

    /// Enqueues `pass` (io buffer already written): its plan lowered onto this state's
    /// buffers; `hidden` are the context features (the target's captured hidden states).
    fn encode(&self, pass: DraftPass, hidden: &[DPtr<f32>]) -> Result<(), RuntimeError> {
        let m = &*self.drafter.inner;
        let plan = self.drafter.plan(pass)?;
        let b = &self.b;
        let t = plan.shape.rows;
        let h = m.config.hidden_size;
        let (tokens, normed, positions) = match pass {
            DraftPass::Context { .. } => (
                TokenBinding::None,
                b.ctx_normed,
                b.io.slice(IO_CTX_STEP..IO_CTX_STEP + 1),
            ),
            DraftPass::Block { .. } => (
                TokenBinding::DraftBlock {
                    x_last: b.io.slice(IO_X_LAST..IO_X_LAST + 1),
                    mask_rows: m.mask_rows,
                },
                b.h,
                b.io.slice(IO_BLOCK_STEP..IO_BLOCK_STEP + MAX_TOKENS),
            ),
        };
        let bind = Bindings {
            tokens,
            features: hidden,
            x: b.x.slice(0..t * h),
            h: normed,
            q: b.q,
            attn: b.attn,
            act: b.act,
            ids: DPtr::null(),
            weights: DPtr::null(),
            logits: b.logits,
            sampled: b.argmax,
            kv: KvBinding::Sequence {
                caches: &self.kv,
                positions,
                keys: &self.keys,
            },
            scratch: Scratch {
                qkv: b.qkv,
                attn: b.attn_scratch,
                attn_row: b.attn_row,
                router_logits: DPtr::null(),
                route_counter: DPtr::null(),
                moe: DPtr::null(),
                y: DPtr::null(),
                gu: b.gu,
                dense_act: Some(b.act),
                argmax: b.argmax_scratch,
                ctx: b.ctx,
                partial: DPtr::null(),
            },
        };
        self.drafter
            .lowering()
            .encode(&plan, &bind, &Captures::NONE, &mut |_| Ok(()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use model::drafter::DraftAttn;

    /// The plan's tables of a draft layer of this attention pattern.
    fn tables(attn: DraftAttn) -> LayerTables {
        LayerTables {
            rope: 0,
            window: attn.window,
            k_width: 1,
            v_width: 1,
        }
    }

    #[test]
    fn cache_capacity_covers_window_and_block() {
        let full = DraftAttn {
            window: None,
            causal: false,
        };
        assert_eq!(cache_capacity(&tables(full), 100), 100 + MAX_TOKENS);
        let sliding = DraftAttn {
            window: Some(6),
            causal: true,
        };
        // A block query at `start` sees keys from start − 5; the block ends at start + 15.
        assert_eq!(cache_capacity(&tables(sliding), 1000), 6 + MAX_TOKENS);
        assert_eq!(cache_capacity(&tables(sliding), 2), 2 + MAX_TOKENS);
    }
}
