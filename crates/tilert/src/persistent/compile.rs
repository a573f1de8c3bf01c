//! The host compiler: a step plan ([`Plan`]) → per-SM instruction streams ([`Program`]).
//!
//! 1. **Phases.** Every op of the plan becomes one or more *phases* (an `attention` with key
//!    splits is `attention` + `attn_combine`; `norm_router_topk` is a row norm, the router
//!    logits and the top-k; `experts_down` is the down projection + the combine with the next
//!    norm; `mlp_down` is the down projection + the next norm; a `sample` after the LM head fuses
//!    its per-chunk argmax into the head's tiles). A phase is split into *tiles*, the unit one SM
//!    runs: a chunk of output rows of a projection, one head (or a chunk of it) of the QKV
//!    projection, one KV head group × key split of attention, one row of a norm, one (expert
//!    slot, chunk) of the routed experts. Each tile declares what it reads and writes
//!    ([`Access`]: a box of rows × columns of a buffer, optionally one *part* of it).
//! 2. **Dependencies.** A tile depends on every earlier tile whose access conflicts with one of
//!    its own (read-after-write, write-after-read, write-after-write on overlapping boxes),
//!    less those implied transitively by a newer dependency. Routed experts: the router's top-k
//!    writes the pass's distinct expert list; expert tile `(slot, chunk)` works on the expert in
//!    `slot` of that list for every row routed to it, so each distinct expert's weights are read
//!    once for all rows of the pass. Distinct slots hold distinct experts, whose entries are
//!    disjoint: their accesses carry the slot as their part and do not conflict.
//! 3. **Counters.** Tiles of a producer phase are grouped into classes (tiles that the same
//!    consumer sets need); a class has one counter, which each of its tiles signals once per
//!    step, and a consumer waits until it has received the class's size. A consumer whose needs
//!    span too many classes waits on the phase's counter (every tile of the phase) instead.
//! 4. **Schedule.** Tiles are placed in plan order, each on the SM where it can start first
//!    (list scheduling with a bytes/bandwidth + fixed-cost model, waits included); an SM's
//!    stream is its tiles in that order. Consecutive tiles of one class with the same waits on
//!    one SM merge into one instruction. Every wait points to an earlier phase, so with all
//!    blocks resident the streams cannot deadlock ([`super::validate`] checks this and the
//!    absence of races by simulation).
//!
//! The program is compiled once per (model, pass shape); its argument table names operands
//! symbolically ([`Operand`]) and is bound to device pointers by the session.

use std::collections::HashMap;
use std::ops::Range;

use model::plan::{Buf, Logits, Op, OpKind, PassKind, Placement, Plan, Tensor, WeightId};

use super::abi::{Opcode, PkInstr, PK_MAX_SIGNALS, PK_MAX_WAITS, PK_NO_LAYER};
use crate::abi::{ATT_MAX_SPLITS, MAX_TOKENS};
use crate::RuntimeError;

/// A buffer tiles read or write: one of the plan's, or one of the engine's scratch buffers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Space {
    Plan(Buf),
    /// Attention key-split partials `[rows, kv_groups · splits]` (each entry a head group's
    /// partial outputs and softmax statistics).
    AttnPartials,
    /// Router logits `[rows, E]`.
    RouterLogits,
    /// The pass's distinct expert list (slot → expert, and each slot's entries).
    ExpertList,
    /// Weighted expert outputs `[rows · k, H]` before the combine.
    ExpertOut,
    /// Per-chunk argmax of the logits `[logit rows, chunks]`.
    ArgmaxPartials,
}

/// A box of a buffer: rows × columns, and (routed experts) the slot whose entries it touches.
/// Two regions with different parts never overlap.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Region {
    pub space: Space,
    pub rows: Range<u32>,
    pub cols: Range<u32>,
    pub part: Option<u32>,
}

fn overlap(a: &Range<u32>, b: &Range<u32>) -> bool {
    a.start < b.end && b.start < a.end
}

fn within(inner: &Range<u32>, outer: &Range<u32>) -> bool {
    outer.start <= inner.start && inner.end <= outer.end
}

impl Region {
    /// Whether the two boxes share an element.
    pub fn overlaps(&self, o: &Region) -> bool {
        self.space == o.space
            && overlap(&self.rows, &o.rows)
            && overlap(&self.cols, &o.cols)
            && match (self.part, o.part) {
                (Some(a), Some(b)) => a == b,
                _ => true,
            }
    }

    /// Whether `o` lies inside `self`.
    pub fn contains(&self, o: &Region) -> bool {
        self.space == o.space
            && within(&o.rows, &self.rows)
            && within(&o.cols, &self.cols)
            && (self.part.is_none() || self.part == o.part)
    }

    /// The common box of two overlapping regions.
    fn intersect(&self, o: &Region) -> Region {
        Region {
            space: self.space,
            rows: self.rows.start.max(o.rows.start)..self.rows.end.min(o.rows.end),
            cols: self.cols.start.max(o.cols.start)..self.cols.end.min(o.cols.end),
            part: self.part.or(o.part),
        }
    }

    /// `self` minus `w` as disjoint boxes (`w` of the same space and part, or of no part).
    fn subtract(&self, w: &Region) -> Vec<Region> {
        if !self.overlaps(w) || !(w.part.is_none() || w.part == self.part) {
            return vec![self.clone()];
        }
        let mut out = Vec::new();
        let piece = |rows: Range<u32>, cols: Range<u32>| Region {
            space: self.space,
            rows,
            cols,
            part: self.part,
        };
        let (r, c) = (&self.rows, &self.cols);
        if r.start < w.rows.start {
            out.push(piece(r.start..w.rows.start, c.clone()));
        }
        if w.rows.end < r.end {
            out.push(piece(w.rows.end..r.end, c.clone()));
        }
        let mid = r.start.max(w.rows.start)..r.end.min(w.rows.end);
        if c.start < w.cols.start {
            out.push(piece(mid.clone(), c.start..w.cols.start));
        }
        if w.cols.end < c.end {
            out.push(piece(mid, w.cols.end..c.end));
        }
        out
    }
}

/// One read or write of a tile.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Access {
    pub region: Region,
    pub write: bool,
}

/// What an argument slot of a phase binds to (resolved to a device pointer by the session).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Operand {
    /// An unused optional slot (a null pointer).
    None,
    Weight(WeightId),
    Buffer(Space),
    /// Layer `l`'s key / value cache.
    KvKeys(usize),
    KvValues(usize),
    /// The pass's first position (`u32`).
    Positions,
    /// The inverse frequencies of RoPE table `id` ([`Plan::ropes`]).
    Rope(usize),
    /// The routing weights `[rows, k]` (`Buf::Routing` binds the expert ids).
    RoutingWeights,
    /// The scale bytes of MXFP4 experts (the weight binds their codes).
    Scales(WeightId),
}

/// One phase of the program: an op (or part of one), its tiles and its argument block.
#[derive(Debug, Clone)]
pub struct Phase {
    pub opcode: Opcode,
    /// The plan op it comes from.
    pub op: usize,
    pub layer: Option<usize>,
    /// Operands in argument-slot order (see the per-opcode list in [`phases_of`]).
    pub operands: Vec<Operand>,
    pub dims: Vec<u32>,
    pub floats: Vec<f32>,
    /// What each tile reads and writes.
    pub tiles: Vec<Vec<Access>>,
    /// Bytes one tile reads (weights, KV, activations): the cost model and the timeline.
    pub tile_bytes: f64,
}

impl Phase {
    pub fn n_tiles(&self) -> usize {
        self.tiles.len()
    }
}

/// The machine the program is compiled for and the cost model of the list scheduler.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct CompileOptions {
    /// SMs (resident blocks; one stream each).
    pub sms: usize,
    /// Sustained read bandwidth of the whole GPU (bytes/s).
    pub bandwidth: f64,
    /// Fixed cost of one tile (instruction fetch, waits, ramp-up, signal), seconds.
    pub tile_overhead_s: f64,
    /// Key splits of attention (1: each KV head group in one tile, no combine phase; 0: from
    /// the pass's keys, [`auto_splits`]).
    pub attn_splits: usize,
}

impl CompileOptions {
    /// An H100 SXM: 132 SMs, ~3.0 TB/s of measured copy bandwidth.
    pub fn h100() -> CompileOptions {
        CompileOptions {
            sms: 132,
            bandwidth: 3.0e12,
            tile_overhead_s: 1.0e-6,
            attn_splits: 0,
        }
    }
    /// `sms` SMs with the H100's per-SM share of bandwidth.
    pub fn with_sms(self, sms: usize) -> CompileOptions {
        CompileOptions {
            sms,
            bandwidth: self.bandwidth / self.sms as f64 * sms as f64,
            ..self
        }
    }
}

/// What makes a program's tiles the graph executor's launches, so that the persistent step
/// computes the graph executor's bits (the session derives it from the uploaded model,
/// `super::session`): per layer, the attention's key splits; the MXFP4 experts' CTA shapes.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Tuning {
    /// Key splits per layer (empty: [`CompileOptions::attn_splits`] for every layer).
    pub attn_splits: Vec<usize>,
    /// (16-row groups per CTA, warps per CTA) of the gate/up experts' launch (0: (1, 8)).
    pub gate_up: (usize, usize),
    /// The same for the down projection.
    pub down: (usize, usize),
}

impl Tuning {
    fn splits(&self, layer: Option<usize>) -> Option<usize> {
        layer.and_then(|l| self.attn_splits.get(l).copied())
    }
    fn shape(s: (usize, usize)) -> (usize, usize) {
        (s.0.max(1), if s.1 == 0 { 8 } else { s.1 })
    }
}

/// A compiled step: the phases, the per-SM streams and the counters.
#[derive(Debug, Clone)]
pub struct Program {
    pub shape_rows: usize,
    pub phases: Vec<Phase>,
    /// `streams[sm]`: the instructions block `sm` runs, in order.
    pub streams: Vec<Vec<PkInstr>>,
    /// Per counter, the signals it receives per step (every wait on it targets this).
    pub counters: Vec<u32>,
    /// The list scheduler's predicted step time (seconds) under the options' cost model.
    pub predicted_s: f64,
    pub options: CompileOptions,
}

impl Program {
    /// Instructions over all streams.
    pub fn instructions(&self) -> usize {
        self.streams.iter().map(Vec::len).sum()
    }
    /// Tiles over all phases.
    pub fn tiles(&self) -> usize {
        self.phases.iter().map(Phase::n_tiles).sum()
    }
}

fn unsupported(i: usize, op: &Op, why: &str) -> RuntimeError {
    RuntimeError::Unsupported(format!(
        "persistent engine: op #{i} `{}`{}: {why}",
        op.kind.name(),
        op.layer.map_or(String::new(), |l| format!(" of layer {l}"))
    ))
}

/// `n` items in chunks of a multiple of `align`, about `target` chunks: (chunk, count).
fn chunking(n: usize, align: usize, target: usize) -> (usize, usize) {
    let per = n.div_ceil(target.max(1)).div_ceil(align).max(1) * align;
    let per = per.min(n.max(1));
    (per, n.div_ceil(per).max(1))
}

fn u(x: usize) -> u32 {
    x as u32
}

fn reg(space: Space, rows: Range<usize>, cols: Range<usize>) -> Region {
    Region {
        space,
        rows: u(rows.start)..u(rows.end),
        cols: u(cols.start)..u(cols.end),
        part: None,
    }
}

fn rd(r: Region) -> Access {
    Access {
        region: r,
        write: false,
    }
}

fn wr(r: Region) -> Access {
    Access {
        region: r,
        write: true,
    }
}

fn pb(b: Buf) -> Space {
    Space::Plan(b)
}

fn opt(present: bool, id: WeightId) -> Operand {
    if present {
        Operand::Weight(id)
    } else {
        Operand::None
    }
}

/// The phases of one plan (no schedule yet). Argument slots per opcode:
///
/// Dims marked *session* are left 0 here and set when the session binds the program (they
/// depend on the uploaded weights and the KV cache: `super::session`).
///
/// * `embed`: [table, tokens, x]; dims [vocab, hidden, rows, *session*: f32 table];
///   floats [scale]
/// * `rms_norm`: [weight, x, h]; dims [dim, rows, style (1: the norm of `norm_router_topk`, as
///   the fused router computes it), *session*: 256-thread multiple (style 0) or values per
///   router weight vector (style 1)]; floats [eps]
/// * `qkv`: [qkv, qkv bias, q norm, k norm, rope, h, q, k cache, v cache, positions];
///   dims [hidden, heads, kv heads, head dim, v head dim, rotary dim, rows, chunk rows (0: one
///   head a tile, q heads then k heads then v heads), *session*: capacity, f32 weights];
///   floats [eps, value scale, *session*: attention factor]
/// * `attention`: [q, k cache, v cache, sinks, out (attn or partials), positions];
///   dims [heads, kv heads, head dim, v head dim, window (0: none), rows, splits,
///   *session*: capacity]; floats [scale]
/// * `attn_combine`: [partials, attn, sinks, positions]; dims [heads, kv heads, v head dim,
///   rows, splits, window]
/// * `linear_residual` (o_proj): [w, bias, in, x]; dims [out, in, rows, chunk rows,
///   *session*: f32 weights]
/// * `router_logits`: [router, router bias, h, logits]; dims [E, hidden, rows, chunk,
///   *session*: f32 weights]
/// * `router_topk`: [logits, correction bias, routing, expert list, routing weights];
///   dims [E, k, rows, kind, *session*: norm top-k, groups, top groups]; floats [*session*:
///   scaling]
/// * `expert_gate_up`: [experts, bias, h, routing, expert list, act, scales];
///   dims [E, k, hidden, I, rows, slots, chunk, layout, glu, row groups per CTA, warps per
///   CTA]; floats [alpha, limit]
/// * `expert_down`: [experts, bias, act, routing, expert list, y, scales, routing weights];
///   dims [E, k, I, hidden, rows, slots, chunk, row groups per CTA, warps per CTA]
/// * `combine_norm`: [y, routing, x, next norm, h]; dims [hidden, k, rows]; floats [eps]
/// * `mlp_gate_up`: [w, h, act]; dims [hidden, I, rows, chunk, glu]; floats [alpha, limit]
/// * `mlp_down`: [w, act, x]; dims [I, hidden, rows, chunk]
/// * `lm_head`: [w, h, logits, argmax partials]; dims [vocab, hidden, logit rows, first row,
///   chunk, *session*: f32 weights]
/// * `argmax`: [partials, logits, sampled]; dims [vocab, logit rows, chunks]
pub fn phases_of(plan: &Plan, opts: &CompileOptions) -> Result<Vec<Phase>, RuntimeError> {
    phases_tuned(plan, opts, &Tuning::default())
}

/// [`phases_of`] with the session's [`Tuning`].
pub fn phases_tuned(
    plan: &Plan,
    opts: &CompileOptions,
    tuning: &Tuning,
) -> Result<Vec<Phase>, RuntimeError> {
    if plan.ranks != 1 {
        return Err(RuntimeError::Unsupported(format!(
            "persistent engine: a plan sharded over {} ranks (one GPU runs unsharded plans)",
            plan.ranks
        )));
    }
    let t = plan.shape.rows;
    if t == 0 || t > MAX_TOKENS {
        return Err(RuntimeError::Invalid(format!(
            "persistent engine: a pass of {t} rows (1..={MAX_TOKENS})"
        )));
    }
    if matches!(
        plan.shape.kind,
        PassKind::DraftContext | PassKind::DraftBlock
    ) {
        return Err(RuntimeError::Unsupported(format!(
            "persistent engine: drafter passes ({})",
            plan.shape
        )));
    }
    if opts.sms == 0
        || opts.attn_splits > ATT_MAX_SPLITS
        || opts.bandwidth.is_nan()
        || opts.bandwidth <= 0.0
    {
        return Err(RuntimeError::Invalid(format!(
            "persistent engine: options {opts:?} (SMs and bandwidth must be positive, at most \
             {ATT_MAX_SPLITS} attention splits)"
        )));
    }
    plan.validate()
        .map_err(|e| RuntimeError::Invalid(format!("step plan: {e}")))?;
    let sms = opts.sms;
    let all = 0..t;
    let d = plan.storage.dense_bytes;
    let x_bytes = plan.storage.expert_bytes;
    let mut out: Vec<Phase> = Vec::new();
    let samples = plan.ops.iter().any(|o| matches!(o.kind, OpKind::Sample(_)));
    for (i, op) in plan.ops.iter().enumerate() {
        if op.placement != Placement::Replicated {
            return Err(unsupported(i, op, "placed on a tensor-parallel rank"));
        }
        let layer = op.layer;
        // The last LM head's (logit rows, chunks): the argmax partials a `sample` reduces.
        let head = out
            .iter()
            .rev()
            .find(|ph| ph.opcode == Opcode::LmHead)
            .map(|ph| (ph.dims[2] as usize, ph.n_tiles()));
        let lw = |tensor: Tensor| WeightId {
            tensor,
            layer,
            shard: None,
        };
        let mut phase = |opcode: Opcode,
                         operands: Vec<Operand>,
                         dims: Vec<usize>,
                         floats: Vec<f32>,
                         tiles: Vec<Vec<Access>>,
                         tile_bytes: f64| {
            out.push(Phase {
                opcode,
                op: i,
                layer,
                operands,
                dims: dims.into_iter().map(u).collect(),
                floats,
                tiles,
                tile_bytes,
            })
        };
        let row_norm = |h: usize| -> Vec<Vec<Access>> {
            (0..t)
                .map(|r| {
                    vec![
                        rd(reg(pb(Buf::X), r..r + 1, 0..h)),
                        wr(reg(pb(Buf::H), r..r + 1, 0..h)),
                    ]
                })
                .collect()
        };
        match op.kind {
            OpKind::Embed(p) => {
                let tiles = (0..t)
                    .map(|r| {
                        vec![
                            rd(reg(pb(Buf::Tokens), r..r + 1, 0..1)),
                            wr(reg(pb(Buf::X), r..r + 1, 0..p.hidden)),
                        ]
                    })
                    .collect();
                phase(
                    Opcode::Embed,
                    vec![
                        Operand::Weight(op.weights[0]),
                        Operand::Buffer(pb(Buf::Tokens)),
                        Operand::Buffer(pb(Buf::X)),
                    ],
                    vec![p.vocab, p.hidden, t, 0],
                    vec![p.scale],
                    tiles,
                    p.hidden as f64 * (d + 4.0),
                );
            }
            OpKind::RmsNorm(p) => {
                phase(
                    Opcode::RmsNorm,
                    vec![
                        Operand::Weight(p.weight),
                        Operand::Buffer(pb(Buf::X)),
                        Operand::Buffer(pb(Buf::H)),
                    ],
                    vec![p.dim, t, 0, 0],
                    vec![p.eps],
                    row_norm(p.dim),
                    p.dim as f64 * (d + 8.0),
                );
            }
            OpKind::QkvRope(p) => {
                if p.kv_only {
                    return Err(unsupported(i, op, "a keys-and-values-only projection"));
                }
                let l = layer.ok_or_else(|| unsupported(i, op, "no layer"))?;
                let g = p.geom;
                let (hd, dv) = (g.head_dim, g.v_head_dim);
                let heads = g.n_heads + 2 * g.n_kv_heads;
                let (qw, kw, kv) = (g.q_width(), g.k_width(), Buf::Kv { layer: l, rank: 0 });
                let rows = qw + kw + g.v_width();
                // Tiles: whole heads with q/k norms (the norm spans the head), else chunks of
                // the fused [q; k; v] rows (whole RoPE pairs, 4-row groups), one per SM.
                let per = if p.qk_norm {
                    0
                } else {
                    chunking(rows, 4, sms).0
                };
                let spans: Vec<Range<usize>> = if per == 0 {
                    (0..heads)
                        .map(|h| {
                            if h < g.n_heads + g.n_kv_heads {
                                h * hd..(h + 1) * hd
                            } else {
                                let v = h - g.n_heads - g.n_kv_heads;
                                qw + kw + v * dv..qw + kw + (v + 1) * dv
                            }
                        })
                        .collect()
                } else {
                    (0..rows.div_ceil(per))
                        .map(|c| c * per..((c + 1) * per).min(rows))
                        .collect()
                };
                let mut tiles = Vec::with_capacity(spans.len());
                for span in &spans {
                    let mut v = vec![rd(reg(pb(Buf::H), all.clone(), 0..p.hidden))];
                    let q = span.start.min(qw)..span.end.min(qw);
                    if !q.is_empty() {
                        v.push(wr(reg(pb(Buf::Q(0)), all.clone(), q)));
                    }
                    // k and v rows are the cache row's columns in the same order.
                    let c = span.start.max(qw) - qw..span.end.max(qw) - qw;
                    if !c.is_empty() {
                        v.push(wr(reg(pb(kv), all.clone(), c)));
                    }
                    tiles.push(v);
                }
                let bytes = (rows * p.hidden) as f64 * d / spans.len() as f64;
                phase(
                    Opcode::Qkv,
                    vec![
                        Operand::Weight(lw(Tensor::Q)),
                        opt(p.bias, lw(Tensor::QBias)),
                        opt(p.qk_norm, lw(Tensor::QNorm)),
                        opt(p.qk_norm, lw(Tensor::KNorm)),
                        Operand::Rope(p.rope),
                        Operand::Buffer(pb(Buf::H)),
                        Operand::Buffer(pb(Buf::Q(0))),
                        Operand::KvKeys(l),
                        Operand::KvValues(l),
                        Operand::Positions,
                    ],
                    vec![
                        p.hidden,
                        g.n_heads,
                        g.n_kv_heads,
                        hd,
                        dv,
                        p.rotary_dim,
                        t,
                        per,
                        0,
                        0,
                    ],
                    vec![p.eps, p.value_scale, 0.0],
                    tiles,
                    bytes + p.hidden as f64 * 4.0 * t as f64,
                );
            }
            OpKind::Attention(p) => {
                let l = layer.ok_or_else(|| unsupported(i, op, "no layer"))?;
                let g = p.geom;
                let grp = g.n_heads / g.n_kv_heads;
                let s = match tuning.splits(layer).unwrap_or(opts.attn_splits) {
                    0 => {
                        let keys = plan.shape.context + t;
                        let keys = p.window.map_or(keys, |w| keys.min(w + t));
                        auto_splits(sms, g.n_kv_heads, keys)
                    }
                    s => s,
                };
                let kv = Buf::Kv { layer: l, rank: 0 };
                let kw = g.k_width();
                let out_space = if s == 1 {
                    pb(Buf::Attn(0))
                } else {
                    Space::AttnPartials
                };
                let mut tiles = Vec::with_capacity(g.n_kv_heads * s);
                for gi in 0..g.n_kv_heads {
                    for si in 0..s {
                        let q = gi * grp * g.head_dim..(gi + 1) * grp * g.head_dim;
                        let dst = if s == 1 {
                            reg(
                                out_space,
                                all.clone(),
                                gi * grp * g.v_head_dim..(gi + 1) * grp * g.v_head_dim,
                            )
                        } else {
                            reg(out_space, all.clone(), gi * s + si..gi * s + si + 1)
                        };
                        tiles.push(vec![
                            rd(reg(pb(Buf::Q(0)), all.clone(), q)),
                            rd(reg(
                                pb(kv),
                                all.clone(),
                                gi * g.head_dim..(gi + 1) * g.head_dim,
                            )),
                            rd(reg(
                                pb(kv),
                                all.clone(),
                                kw + gi * g.v_head_dim..kw + (gi + 1) * g.v_head_dim,
                            )),
                            wr(dst),
                        ]);
                    }
                }
                let bytes = op.kv_bytes / (g.n_kv_heads * s) as f64;
                phase(
                    Opcode::Attention,
                    vec![
                        Operand::Buffer(pb(Buf::Q(0))),
                        Operand::KvKeys(l),
                        Operand::KvValues(l),
                        opt(p.sinks, lw(Tensor::Sinks)),
                        Operand::Buffer(out_space),
                        Operand::Positions,
                    ],
                    vec![
                        g.n_heads,
                        g.n_kv_heads,
                        g.head_dim,
                        g.v_head_dim,
                        p.window.unwrap_or(0),
                        t,
                        s,
                        0,
                    ],
                    vec![p.scale],
                    tiles,
                    bytes,
                );
                if s > 1 {
                    let tiles = (0..g.n_kv_heads)
                        .map(|gi| {
                            vec![
                                rd(reg(Space::AttnPartials, all.clone(), gi * s..(gi + 1) * s)),
                                wr(reg(
                                    pb(Buf::Attn(0)),
                                    all.clone(),
                                    gi * grp * g.v_head_dim..(gi + 1) * grp * g.v_head_dim,
                                )),
                            ]
                        })
                        .collect();
                    phase(
                        Opcode::AttnCombine,
                        vec![
                            Operand::Buffer(Space::AttnPartials),
                            Operand::Buffer(pb(Buf::Attn(0))),
                            opt(p.sinks, lw(Tensor::Sinks)),
                            Operand::Positions,
                        ],
                        vec![
                            g.n_heads,
                            g.n_kv_heads,
                            g.v_head_dim,
                            t,
                            s,
                            p.window.unwrap_or(0),
                        ],
                        Vec::new(),
                        tiles,
                        (s * grp * g.v_head_dim * t) as f64 * 4.0,
                    );
                }
            }
            OpKind::OProj(p) => {
                if !p.residual {
                    return Err(unsupported(i, op, "writes a partial sum (no all-reduce)"));
                }
                let (per, n) = chunking(p.out_dim, 4, sms);
                let tiles = (0..n)
                    .map(|c| {
                        let rows = c * per..((c + 1) * per).min(p.out_dim);
                        vec![
                            rd(reg(pb(Buf::Attn(0)), all.clone(), 0..p.in_dim)),
                            rd(reg(pb(Buf::X), all.clone(), rows.clone())),
                            wr(reg(pb(Buf::X), all.clone(), rows)),
                        ]
                    })
                    .collect();
                phase(
                    Opcode::LinearResidual,
                    vec![
                        Operand::Weight(lw(Tensor::O)),
                        opt(p.bias, lw(Tensor::OBias)),
                        Operand::Buffer(pb(Buf::Attn(0))),
                        Operand::Buffer(pb(Buf::X)),
                    ],
                    vec![p.out_dim, p.in_dim, t, per, 0],
                    Vec::new(),
                    tiles,
                    (per * p.in_dim) as f64 * d + (p.in_dim * t * 4) as f64,
                );
            }
            OpKind::NormRouterTopK(p) => {
                let h = p.norm.dim;
                phase(
                    Opcode::RmsNorm,
                    vec![
                        Operand::Weight(p.norm.weight),
                        Operand::Buffer(pb(Buf::X)),
                        Operand::Buffer(pb(Buf::H)),
                    ],
                    vec![h, t, 1, 0],
                    vec![p.norm.eps],
                    row_norm(h),
                    h as f64 * (d + 8.0),
                );
                let e = p.n_experts;
                let (per, n) = chunking(e, 4, sms);
                let tiles = (0..n)
                    .map(|c| {
                        vec![
                            rd(reg(pb(Buf::H), all.clone(), 0..h)),
                            wr(reg(
                                Space::RouterLogits,
                                all.clone(),
                                c * per..((c + 1) * per).min(e),
                            )),
                        ]
                    })
                    .collect();
                phase(
                    Opcode::RouterLogits,
                    vec![
                        Operand::Weight(lw(Tensor::Router)),
                        opt(p.bias, lw(Tensor::RouterBias)),
                        Operand::Buffer(pb(Buf::H)),
                        Operand::Buffer(Space::RouterLogits),
                    ],
                    vec![e, h, t, per, 0],
                    Vec::new(),
                    tiles,
                    (per * h) as f64 * d + (h * t * 4) as f64,
                );
                let kind = match p.kind {
                    model::config::RouterSpec::GptOss => 0,
                    model::config::RouterSpec::Qwen3 { .. } => 1,
                    model::config::RouterSpec::Sigmoid { .. } => 2,
                };
                phase(
                    Opcode::RouterTopK,
                    vec![
                        Operand::Buffer(Space::RouterLogits),
                        opt(p.correction_bias, lw(Tensor::CorrectionBias)),
                        Operand::Buffer(pb(Buf::Routing)),
                        Operand::Buffer(Space::ExpertList),
                        Operand::RoutingWeights,
                    ],
                    vec![e, p.top_k, t, kind, 0, 0, 0],
                    vec![0.0],
                    vec![vec![
                        rd(reg(Space::RouterLogits, all.clone(), 0..e)),
                        wr(reg(pb(Buf::Routing), all.clone(), 0..p.top_k)),
                        wr(reg(Space::ExpertList, 0..1, 0..1)),
                    ]],
                    (e * t * 4) as f64,
                );
            }
            OpKind::ExpertsGateUp(p) => {
                let slots = (t * p.top_k).min(p.n_experts);
                let entries = t * p.top_k;
                // Whole CTAs of the graph executor's launch: `groups` 16-row groups of gate/up
                // rows are 8·groups act columns.
                let (groups, warps) = Tuning::shape(tuning.gate_up);
                let (per, n) = chunking(p.intermediate, 8 * groups, sms.div_ceil(slots));
                let mut tiles = Vec::with_capacity(slots * n);
                for s in 0..slots {
                    for c in 0..n {
                        let mut act = reg(
                            pb(Buf::Act(0)),
                            0..entries,
                            c * per..((c + 1) * per).min(p.intermediate),
                        );
                        act.part = Some(u(s));
                        tiles.push(vec![
                            rd(reg(pb(Buf::H), all.clone(), 0..p.hidden)),
                            rd(reg(pb(Buf::Routing), all.clone(), 0..p.top_k)),
                            rd(reg(Space::ExpertList, 0..1, 0..1)),
                            wr(act),
                        ]);
                    }
                }
                let (glu, alpha, limit) = glu_of(p.glu);
                let layout = match p.layout {
                    model::weights::GateUpLayout::Interleaved => 0,
                    model::weights::GateUpLayout::Halves => 1,
                };
                phase(
                    Opcode::ExpertGateUp,
                    vec![
                        Operand::Weight(op.weights[0]),
                        opt(p.bias, lw(Tensor::ExpertsGateUpBias)),
                        Operand::Buffer(pb(Buf::H)),
                        Operand::Buffer(pb(Buf::Routing)),
                        Operand::Buffer(Space::ExpertList),
                        Operand::Buffer(pb(Buf::Act(0))),
                        Operand::Scales(op.weights[0]),
                    ],
                    vec![
                        p.n_experts,
                        p.top_k,
                        p.hidden,
                        p.intermediate,
                        t,
                        slots,
                        per,
                        layout,
                        glu,
                        groups,
                        warps,
                    ],
                    vec![alpha, limit],
                    tiles,
                    (2 * per * p.hidden) as f64 * x_bytes + (p.hidden * t * 4) as f64,
                );
            }
            OpKind::ExpertsDown(p) => {
                if !p.residual {
                    return Err(unsupported(i, op, "writes a partial sum (no all-reduce)"));
                }
                let slots = (t * p.top_k).min(p.n_experts);
                let entries = t * p.top_k;
                let (groups, warps) = Tuning::shape(tuning.down);
                let (per, n) = chunking(p.hidden, 16 * groups, sms.div_ceil(slots));
                let mut tiles = Vec::with_capacity(slots * n);
                for s in 0..slots {
                    for c in 0..n {
                        let mut act = reg(pb(Buf::Act(0)), 0..entries, 0..p.intermediate);
                        act.part = Some(u(s));
                        let mut y = reg(
                            Space::ExpertOut,
                            0..entries,
                            c * per..((c + 1) * per).min(p.hidden),
                        );
                        y.part = Some(u(s));
                        tiles.push(vec![
                            rd(act),
                            rd(reg(pb(Buf::Routing), all.clone(), 0..p.top_k)),
                            rd(reg(Space::ExpertList, 0..1, 0..1)),
                            wr(y),
                        ]);
                    }
                }
                phase(
                    Opcode::ExpertDown,
                    vec![
                        Operand::Weight(op.weights[0]),
                        opt(p.bias, lw(Tensor::ExpertsDownBias)),
                        Operand::Buffer(pb(Buf::Act(0))),
                        Operand::Buffer(pb(Buf::Routing)),
                        Operand::Buffer(Space::ExpertList),
                        Operand::Buffer(Space::ExpertOut),
                        Operand::Scales(op.weights[0]),
                        Operand::RoutingWeights,
                    ],
                    vec![
                        p.n_experts,
                        p.top_k,
                        p.intermediate,
                        p.hidden,
                        t,
                        slots,
                        per,
                        groups,
                        warps,
                    ],
                    Vec::new(),
                    tiles,
                    (per * p.intermediate) as f64 * x_bytes + (p.intermediate * t * 4) as f64,
                );
                let k = p.top_k;
                let tiles = (0..t)
                    .map(|r| {
                        // The row's k entries, in whichever slots hold their experts: one
                        // access per slot (the slots' parts together are every entry).
                        let mut v: Vec<Access> = (0..slots)
                            .map(|s| {
                                let mut y = reg(Space::ExpertOut, r * k..(r + 1) * k, 0..p.hidden);
                                y.part = Some(u(s));
                                rd(y)
                            })
                            .collect();
                        v.extend([
                            rd(reg(pb(Buf::Routing), r..r + 1, 0..k)),
                            rd(reg(pb(Buf::X), r..r + 1, 0..p.hidden)),
                            wr(reg(pb(Buf::X), r..r + 1, 0..p.hidden)),
                        ]);
                        if p.next_norm.is_some() {
                            v.push(wr(reg(pb(Buf::H), r..r + 1, 0..p.hidden)));
                        }
                        v
                    })
                    .collect();
                phase(
                    Opcode::CombineNorm,
                    vec![
                        Operand::Buffer(Space::ExpertOut),
                        Operand::Buffer(pb(Buf::Routing)),
                        Operand::Buffer(pb(Buf::X)),
                        p.next_norm
                            .map_or(Operand::None, |n| Operand::Weight(n.weight)),
                        Operand::Buffer(pb(Buf::H)),
                    ],
                    vec![p.hidden, k, t],
                    vec![p.next_norm.map_or(0.0, |n| n.eps)],
                    tiles,
                    (p.hidden * (k + 3)) as f64 * 4.0,
                );
            }
            OpKind::MlpGateUp(p) => {
                let (per, n) = chunking(p.intermediate, 4, sms);
                let tiles = (0..n)
                    .map(|c| {
                        vec![
                            rd(reg(pb(Buf::H), all.clone(), 0..p.hidden)),
                            wr(reg(
                                pb(Buf::Act(0)),
                                all.clone(),
                                c * per..((c + 1) * per).min(p.intermediate),
                            )),
                        ]
                    })
                    .collect();
                let (glu, alpha, limit) = glu_of(p.glu);
                phase(
                    Opcode::MlpGateUp,
                    vec![
                        Operand::Weight(op.weights[0]),
                        Operand::Buffer(pb(Buf::H)),
                        Operand::Buffer(pb(Buf::Act(0))),
                    ],
                    vec![p.hidden, p.intermediate, t, per, glu],
                    vec![alpha, limit],
                    tiles,
                    (2 * per * p.hidden) as f64 * d + (p.hidden * t * 4) as f64,
                );
            }
            OpKind::MlpDown(p) => {
                if !p.residual {
                    return Err(unsupported(i, op, "writes a partial sum (no all-reduce)"));
                }
                let (per, n) = chunking(p.hidden, 4, sms);
                let tiles = (0..n)
                    .map(|c| {
                        let rows = c * per..((c + 1) * per).min(p.hidden);
                        vec![
                            rd(reg(pb(Buf::Act(0)), all.clone(), 0..p.intermediate)),
                            rd(reg(pb(Buf::X), all.clone(), rows.clone())),
                            wr(reg(pb(Buf::X), all.clone(), rows)),
                        ]
                    })
                    .collect();
                phase(
                    Opcode::MlpDown,
                    vec![
                        Operand::Weight(op.weights[0]),
                        Operand::Buffer(pb(Buf::Act(0))),
                        Operand::Buffer(pb(Buf::X)),
                    ],
                    vec![p.intermediate, p.hidden, t, per],
                    Vec::new(),
                    tiles,
                    (per * p.intermediate) as f64 * d + (p.intermediate * t * 4) as f64,
                );
                if let Some(nn) = p.next_norm {
                    phase(
                        Opcode::RmsNorm,
                        vec![
                            Operand::Weight(nn.weight),
                            Operand::Buffer(pb(Buf::X)),
                            Operand::Buffer(pb(Buf::H)),
                        ],
                        vec![nn.dim, t, 0, 0],
                        vec![nn.eps],
                        row_norm(nn.dim),
                        nn.dim as f64 * (d + 8.0),
                    );
                }
            }
            OpKind::LmHead(p) => {
                if p.skip_rows != 0 {
                    return Err(unsupported(i, op, "an LM head that skips rows (drafters)"));
                }
                let (rows, first) = match p.rows {
                    Logits::None => (0, 0),
                    Logits::Last => (1, t - 1),
                    Logits::All => (t, 0),
                };
                let (per, n) = chunking(p.vocab, 16, sms);
                let tiles = (0..n)
                    .map(|c| {
                        let cols = c * per..((c + 1) * per).min(p.vocab);
                        let mut v = vec![
                            rd(reg(pb(Buf::H), first..first + rows, 0..p.hidden)),
                            wr(reg(pb(Buf::Logits), 0..rows, cols)),
                        ];
                        if samples {
                            v.push(wr(reg(Space::ArgmaxPartials, 0..rows, c..c + 1)));
                        }
                        v
                    })
                    .collect();
                phase(
                    Opcode::LmHead,
                    vec![
                        Operand::Weight(op.weights[0]),
                        Operand::Buffer(pb(Buf::H)),
                        Operand::Buffer(pb(Buf::Logits)),
                        if samples {
                            Operand::Buffer(Space::ArgmaxPartials)
                        } else {
                            Operand::None
                        },
                    ],
                    vec![p.vocab, p.hidden, rows, first, per, 0],
                    Vec::new(),
                    tiles,
                    (per * p.hidden) as f64 * d + (p.hidden * rows * 4) as f64,
                );
            }
            OpKind::Sample(p) => {
                let Some((rows, chunks)) = head else {
                    return Err(unsupported(i, op, "sampling without an LM head before it"));
                };
                let tiles = (0..rows)
                    .map(|r| {
                        vec![
                            rd(reg(Space::ArgmaxPartials, r..r + 1, 0..chunks)),
                            wr(reg(pb(Buf::Sampled), r..r + 1, 0..1)),
                        ]
                    })
                    .collect();
                phase(
                    Opcode::Argmax,
                    vec![
                        Operand::Buffer(Space::ArgmaxPartials),
                        Operand::Buffer(pb(Buf::Logits)),
                        Operand::Buffer(pb(Buf::Sampled)),
                    ],
                    vec![p.vocab, rows, chunks],
                    Vec::new(),
                    tiles,
                    (chunks * 8) as f64,
                );
            }
            OpKind::AllReduce(_) => {
                return Err(unsupported(i, op, "all-reduce needs several GPUs"))
            }
            OpKind::DraftContext(_) | OpKind::DraftAttention(_) => {
                return Err(unsupported(i, op, "drafter ops"))
            }
        }
    }
    Ok(out)
}

/// Key splits of an attention over `keys` keys with `groups` KV head groups on `sms` SMs: about
/// one tile per SM, at least 64 keys a split, at most [`ATT_MAX_SPLITS`].
pub fn auto_splits(sms: usize, groups: usize, keys: usize) -> usize {
    sms.div_ceil(groups.max(1))
        .min(keys / 64)
        .clamp(1, ATT_MAX_SPLITS)
}

/// (glu dim, alpha, limit) of an activation: 0 = clamped SwiGLU, 1 = SwiGLU.
fn glu_of(a: model::config::Activation) -> (usize, f32, f32) {
    match a {
        model::config::Activation::ClampedSwiglu { alpha, limit } => (0, alpha, limit),
        model::config::Activation::Swiglu => (1, 0.0, 0.0),
    }
}

/// One entry of a buffer's access history.
#[derive(Clone)]
struct Entry {
    tile: u32,
    phase: u32,
    region: Region,
    write: bool,
}

/// The tiles each tile must wait for (global tile ids, ascending), from the phases' accesses.
fn dependencies(phases: &[Phase], first: &[u32]) -> Vec<Vec<u32>> {
    let total = phases.iter().map(Phase::n_tiles).sum();
    let mut deps: Vec<Vec<u32>> = Vec::with_capacity(total);
    let mut hist: HashMap<Space, Vec<Entry>> = HashMap::new();
    for (p, ph) in phases.iter().enumerate() {
        for accesses in &ph.tiles {
            let mut mine: Vec<u32> = Vec::new();
            for a in accesses {
                let Some(h) = hist.get(&a.region.space) else {
                    continue;
                };
                // Newest first; an older conflicting entry is implied by a newer selected one
                // (of another phase) that covers the common box and conflicts with it.
                let mut chosen: Vec<&Entry> = Vec::new();
                for e in h.iter().rev() {
                    if !(e.write || a.write) || !e.region.overlaps(&a.region) {
                        continue;
                    }
                    let common = e.region.intersect(&a.region);
                    let implied = chosen.iter().any(|c| {
                        c.phase != e.phase && (c.write || e.write) && c.region.contains(&common)
                    });
                    if !implied {
                        chosen.push(e);
                    }
                }
                mine.extend(chosen.iter().map(|e| e.tile));
            }
            mine.sort_unstable();
            mine.dedup();
            deps.push(mine);
        }
        // Record this phase's accesses; drop older entries its writes cover completely (any
        // later conflict with them also conflicts with these writes, which followed them).
        let mut writes: HashMap<Space, Vec<&Region>> = HashMap::new();
        for accesses in &ph.tiles {
            for a in accesses.iter().filter(|a| a.write) {
                writes.entry(a.region.space).or_default().push(&a.region);
            }
        }
        for (space, ws) in &writes {
            if let Some(h) = hist.get_mut(space) {
                h.retain(|e| {
                    let mut rest = vec![e.region.clone()];
                    for w in ws {
                        rest = rest.iter().flat_map(|r| r.subtract(w)).collect();
                        if rest.is_empty() {
                            return false;
                        }
                    }
                    true
                });
            }
        }
        for (ti, accesses) in ph.tiles.iter().enumerate() {
            for a in accesses {
                hist.entry(a.region.space).or_default().push(Entry {
                    tile: first[p] + ti as u32,
                    phase: p as u32,
                    region: a.region.clone(),
                    write: a.write,
                });
            }
        }
    }
    deps
}

/// The waits of each tile: `(counter, target)`, and per counter its signalling tiles.
struct Sync {
    waits: Vec<Vec<(u32, u32)>>,
    /// Per counter, its signalling tiles (global ids).
    signallers: Vec<Vec<u32>>,
    /// Per tile, the counters it signals.
    signals: Vec<Vec<u32>>,
}

fn synchronise(phases: &[Phase], first: &[u32], deps: &[Vec<u32>]) -> Result<Sync, RuntimeError> {
    let total = deps.len();
    let phase_of = |g: u32| first.partition_point(|&f| f <= g) - 1;
    // Per producer phase, the distinct needed sets (local tile ids) and each consumer's.
    let mut sets: Vec<Vec<Vec<u32>>> = vec![Vec::new(); phases.len()];
    let mut needs: Vec<Vec<(usize, usize)>> = Vec::with_capacity(total); // (phase, set id)
    for d in deps {
        let mut by: Vec<(usize, Vec<u32>)> = Vec::new();
        for &g in d {
            let p = phase_of(g);
            let local = g - first[p];
            match by.last_mut() {
                Some((q, v)) if *q == p => v.push(local),
                _ => by.push((p, vec![local])),
            }
        }
        let mut mine = Vec::new();
        for (p, v) in by {
            let id = match sets[p].iter().position(|s| *s == v) {
                Some(id) => id,
                None => {
                    sets[p].push(v);
                    sets[p].len() - 1
                }
            };
            mine.push((p, id));
        }
        needs.push(mine);
    }
    // Classes: tiles of a phase with the same membership in its needed sets.
    let mut class_of: Vec<Vec<Option<usize>>> = Vec::with_capacity(phases.len());
    let mut class_sizes: Vec<Vec<u32>> = Vec::with_capacity(phases.len());
    for (p, ph) in phases.iter().enumerate() {
        let mut sig: Vec<Vec<u32>> = vec![Vec::new(); ph.n_tiles()];
        for (id, s) in sets[p].iter().enumerate() {
            for &t in s {
                sig[t as usize].push(id as u32);
            }
        }
        let mut keys: HashMap<&Vec<u32>, usize> = HashMap::new();
        let mut cls = vec![None; ph.n_tiles()];
        let mut sizes = Vec::new();
        for (t, s) in sig.iter().enumerate() {
            if s.is_empty() {
                continue;
            }
            let n = keys.len();
            let c = *keys.entry(s).or_insert(n);
            if c == sizes.len() {
                sizes.push(0);
            }
            sizes[c] += 1;
            cls[t] = Some(c);
        }
        class_of.push(cls);
        class_sizes.push(sizes);
    }
    // Each consumer's waits: the classes of its sets, or a phase counter where they are many.
    let mut set_classes: Vec<Vec<Vec<usize>>> = Vec::with_capacity(phases.len());
    for p in 0..phases.len() {
        set_classes.push(
            sets[p]
                .iter()
                .map(|s| {
                    let mut c: Vec<usize> =
                        s.iter().filter_map(|&t| class_of[p][t as usize]).collect();
                    c.sort_unstable();
                    c.dedup();
                    c
                })
                .collect(),
        );
    }
    #[derive(Clone, Copy, PartialEq, Eq, Hash)]
    enum Key {
        Class(usize, usize),
        Phase(usize),
    }
    let mut chosen: Vec<Vec<Key>> = Vec::with_capacity(total);
    for (g, mine) in needs.iter().enumerate() {
        let mut per: Vec<(usize, Vec<usize>, bool)> = mine
            .iter()
            .map(|&(p, id)| (p, set_classes[p][id].clone(), false))
            .collect();
        loop {
            let n: usize = per
                .iter()
                .map(|(_, c, ph)| if *ph { 1 } else { c.len() })
                .sum();
            if n <= PK_MAX_WAITS {
                break;
            }
            match per
                .iter_mut()
                .filter(|(_, c, ph)| !ph && c.len() > 1)
                .max_by_key(|(_, c, _)| c.len())
            {
                Some(e) => e.2 = true,
                None => {
                    let p = phase_of(g as u32);
                    return Err(RuntimeError::Unsupported(format!(
                        "persistent engine: tile {} of phase {p} ({}, op #{}) depends on {} \
                         phases (most {PK_MAX_WAITS} waits)",
                        g as u32 - first[p],
                        phases[p].opcode.name(),
                        phases[p].op,
                        per.len()
                    )));
                }
            }
        }
        let mut keys = Vec::new();
        for (p, c, whole) in per {
            if whole
                || c.len() == class_sizes[p].len()
                    && sets_cover_phase(&class_sizes[p], phases[p].n_tiles())
            {
                keys.push(Key::Phase(p));
            } else {
                keys.extend(c.into_iter().map(|c| Key::Class(p, c)));
            }
        }
        chosen.push(keys);
    }
    // Counters for the keys in use.
    let mut ids: HashMap<Key, u32> = HashMap::new();
    let mut signallers: Vec<Vec<u32>> = Vec::new();
    let mut signals: Vec<Vec<u32>> = vec![Vec::new(); total];
    let mut waits: Vec<Vec<(u32, u32)>> = Vec::with_capacity(total);
    for keys in &chosen {
        let mut w = Vec::with_capacity(keys.len());
        for &k in keys {
            let id = match ids.get(&k) {
                Some(&id) => id,
                None => {
                    let id = signallers.len() as u32;
                    let tiles: Vec<u32> = match k {
                        Key::Phase(p) => (0..phases[p].n_tiles() as u32)
                            .map(|t| first[p] + t)
                            .collect(),
                        Key::Class(p, c) => (0..phases[p].n_tiles())
                            .filter(|&t| class_of[p][t] == Some(c))
                            .map(|t| first[p] + t as u32)
                            .collect(),
                    };
                    for &t in &tiles {
                        signals[t as usize].push(id);
                    }
                    signallers.push(tiles);
                    ids.insert(k, id);
                    id
                }
            };
            w.push((id, signallers[id as usize].len() as u32));
        }
        waits.push(w);
    }
    if let Some((g, s)) = signals
        .iter()
        .enumerate()
        .find(|(_, s)| s.len() > PK_MAX_SIGNALS)
    {
        return Err(RuntimeError::Unsupported(format!(
            "persistent engine: tile {g} signals {} counters (most {PK_MAX_SIGNALS})",
            s.len()
        )));
    }
    Ok(Sync {
        waits,
        signallers,
        signals,
    })
}

/// Whether the classes of a phase cover all of its tiles (then waiting on all classes is
/// waiting on the phase).
fn sets_cover_phase(sizes: &[u32], tiles: usize) -> bool {
    sizes.iter().sum::<u32>() as usize == tiles && sizes.len() > 1
}

/// Compiles `plan` into per-SM instruction streams for `opts`.
pub fn compile(plan: &Plan, opts: &CompileOptions) -> Result<Program, RuntimeError> {
    compile_tuned(plan, opts, &Tuning::default())
}

/// [`compile`] with the session's [`Tuning`] (tiles that are the graph executor's launches).
pub fn compile_tuned(
    plan: &Plan,
    opts: &CompileOptions,
    tuning: &Tuning,
) -> Result<Program, RuntimeError> {
    let phases = phases_tuned(plan, opts, tuning)?;
    let mut first = Vec::with_capacity(phases.len());
    let mut n = 0u32;
    for ph in &phases {
        first.push(n);
        n += ph.n_tiles() as u32;
    }
    let deps = dependencies(&phases, &first);
    let sync = synchronise(&phases, &first, &deps)?;
    // List scheduling in plan order: each tile on the SM where it starts first.
    let per_sm_bw = opts.bandwidth / opts.sms as f64;
    let mut free = vec![0.0f64; opts.sms];
    let mut finish = vec![0.0f64; n as usize];
    let mut counter_done = vec![0.0f64; sync.signallers.len()];
    let mut placed: Vec<Vec<u32>> = vec![Vec::new(); opts.sms];
    for (p, ph) in phases.iter().enumerate() {
        let cost = opts.tile_overhead_s + ph.tile_bytes / per_sm_bw;
        for t in 0..ph.n_tiles() {
            let g = first[p] as usize + t;
            let ready = sync.waits[g]
                .iter()
                .map(|&(c, _)| counter_done[c as usize])
                .fold(0.0, f64::max);
            let (sm, start) = free
                .iter()
                .enumerate()
                .map(|(s, &f)| (s, f.max(ready)))
                .fold(
                    (0, f64::INFINITY),
                    |best, x| if x.1 < best.1 { x } else { best },
                );
            finish[g] = start + cost;
            free[sm] = finish[g];
            placed[sm].push(g as u32);
        }
        // Counters of this phase are complete once all their signallers are placed.
        for (c, tiles) in sync.signallers.iter().enumerate() {
            if tiles
                .first()
                .is_some_and(|&t| t >= first[p] && (t as usize) < first[p] as usize + ph.n_tiles())
            {
                counter_done[c] = tiles
                    .iter()
                    .map(|&t| finish[t as usize])
                    .fold(0.0, f64::max);
            }
        }
    }
    let predicted_s = free.iter().copied().fold(0.0, f64::max);
    // Streams: consecutive tiles of one phase with equal waits and signals merge.
    let phase_of = |g: u32| first.partition_point(|&f| f <= g) - 1;
    let mut streams = Vec::with_capacity(opts.sms);
    for tiles in &placed {
        let mut s: Vec<PkInstr> = Vec::new();
        for &g in tiles {
            let p = phase_of(g);
            let local = g - first[p];
            let gi = g as usize;
            if let Some(last) = s.last_mut() {
                let prev = first[p] + last.tile_end - 1;
                if last.phase == p as u32
                    && last.tile_end == local
                    && sync.waits[prev as usize] == sync.waits[gi]
                    && sync.signals[prev as usize] == sync.signals[gi]
                {
                    last.tile_end += 1;
                    last.signal_add += 1;
                    last.bytes = last.bytes.saturating_add(phases[p].tile_bytes as u32);
                    continue;
                }
            }
            s.push(instr(
                &phases[p],
                p,
                local,
                &sync.waits[gi],
                &sync.signals[gi],
            ));
        }
        streams.push(s);
    }
    Ok(Program {
        shape_rows: plan.shape.rows,
        counters: sync.signallers.iter().map(|t| t.len() as u32).collect(),
        phases,
        streams,
        predicted_s,
        options: *opts,
    })
}

fn instr(ph: &Phase, p: usize, tile: u32, waits: &[(u32, u32)], signals: &[u32]) -> PkInstr {
    let mut i = PkInstr {
        opcode: ph.opcode as u32,
        arg: p as u32,
        tile_begin: tile,
        tile_end: tile + 1,
        n_waits: waits.len() as u32,
        n_signals: signals.len() as u32,
        phase: p as u32,
        layer: ph.layer.map_or(PK_NO_LAYER, |l| l as u32),
        wait_counter: [0; PK_MAX_WAITS],
        wait_target: [0; PK_MAX_WAITS],
        signal_counter: [0; PK_MAX_SIGNALS],
        signal_add: 1,
        bytes: ph.tile_bytes.min(u32::MAX as f64) as u32,
        pad: [0; 8],
    };
    for (k, &(c, target)) in waits.iter().enumerate() {
        i.wait_counter[k] = c;
        i.wait_target[k] = target;
    }
    for (k, &c) in signals.iter().enumerate() {
        i.signal_counter[k] = c;
    }
    i
}
