//! The mixture of experts as the plan's three ops — `norm_router_topk`, `experts_gate_up`,
//! `experts_down` — over a block of `t` rows. Together they compute exactly what
//! [`super::ffn::moe_block`] computes (same f32 operations in the same order; a test asserts
//! bit-identity), split at the boundaries where a tensor-parallel plan shards the experts.
//!
//! Threads: a pass's expert jobs (each hit expert's rows, in chunks of [`fp4::MAX_BATCH`]) run
//! in parallel on the rayon pool when it has more than one thread and the jobs stream enough
//! weight bytes; each job computes the same f32 operations either way and the per-row combine is
//! serial, so results do not depend on the thread count.
//!
//! The router runs once per pass (replicated); each rank's `experts_gate_up` / `experts_down`
//! run over its slice of every expert's intermediate dimension, sharing the routing — or, under
//! expert parallelism, over its own whole experts (`ExpertRange`: the rank's `Moe` holds experts
//! `lo..hi` at local indices `0..hi − lo`), the down projection summing only those.

use crate::plan::{ExpertRange, ExpertsDownParams, ExpertsGateUpParams, RouterParams};
use crate::weights::{ExpertMat, Moe};

use super::ffn::expert_matmul;
use super::{ops, Activations, CpuError};

/// The routing of a pass and the per-expert bookkeeping (shared by every rank).
#[derive(Debug, Default, Clone)]
pub struct Routing {
    router_logits: Vec<f32>,
    routings: Vec<moe::Routing>,
    router_scratch: moe::RouterScratch,
    dispatch: moe::Dispatch,
    rows: usize,
}

/// Reusable buffers of the expert ops.
#[derive(Debug, Default, Clone)]
pub struct ExpertScratch {
    job: JobScratch,
    down: Vec<f32>,
    slots: Vec<f32>,
    order: Vec<usize>,
    jobs: Vec<Job>,
    /// The pass's normed rows quantized once ([`Activations::Q8`]).
    hq: fp4::Q8Rows,
}

/// One job's buffers: its rows' activations (f32, or quantized) and the gate_up output.
#[derive(Debug, Default, Clone)]
struct JobScratch {
    xe: Vec<f32>,
    xq: fp4::Q8Rows,
    gu: Vec<f32>,
}

/// Whether an expert matrix takes quantized activations in `acts` mode.
fn quantized(acts: Activations, w: &ExpertMat) -> bool {
    acts == Activations::Q8 && matches!(w, ExpertMat::Mxfp4(_))
}

/// The `moe` routing variant of `p` for the MoE block `m`.
pub fn router_kind<'a>(p: &RouterParams, m: &'a Moe) -> moe::RouterKind<'a> {
    spec_router_kind(p.kind, m)
}

/// The `moe` routing variant of a router `spec` for the MoE block `m` (the gpt-oss router bias
/// is part of `m.router`, added by [`ops::linear`] before routing, so it is not passed again).
pub fn spec_router_kind(spec: crate::config::RouterSpec, m: &Moe) -> moe::RouterKind<'_> {
    match spec {
        crate::config::RouterSpec::GptOss => moe::RouterKind::GptOss { bias: None },
        crate::config::RouterSpec::Qwen3 { norm_topk_prob } => {
            moe::RouterKind::Qwen3Moe { norm_topk_prob }
        }
        crate::config::RouterSpec::Sigmoid {
            n_group,
            topk_group,
            norm_topk_prob,
            routed_scaling_factor,
        } => moe::RouterKind::Sigmoid(moe::SigmoidRouter {
            correction_bias: m.correction_bias.as_deref(),
            n_group,
            topk_group,
            norm_topk_prob,
            routed_scaling_factor,
        }),
    }
}

/// Router logits of the normed rows `h` (`[t, H]`), top-k per row, and the dispatch.
pub fn route(
    p: &RouterParams,
    m: &Moe,
    h: &[f32],
    t: usize,
    r: &mut Routing,
) -> Result<(), CpuError> {
    let (ne, k) = (m.experts.len(), p.top_k);
    r.router_logits.resize(t * ne, 0.0);
    ops::linear(&m.router, h, t, &mut r.router_logits);
    let kind = router_kind(p, m);
    if r.routings.len() < t {
        r.routings.resize_with(t, || moe::Routing::with_capacity(k));
    }
    for (ro, z) in r.routings[..t]
        .iter_mut()
        .zip(r.router_logits.chunks_exact(ne))
    {
        moe::route_into(&kind, z, k, &mut r.router_scratch, ro)?;
    }
    r.dispatch.build_into(&r.routings[..t], ne)?;
    r.rows = t;
    Ok(())
}

/// Below this many weight bytes streamed by a pass's expert jobs they run on the calling thread.
const PAR_EXPERT_BYTES: usize = 96 << 10;

/// One job: expert `e` (its global id) over entries `a..b` of its dispatch list (at most
/// [`fp4::MAX_BATCH`]).
type Job = (usize, usize, usize);

/// Checks that `m` holds exactly the experts of `held` (all of them, or an expert-parallel
/// rank's range).
fn check_held(m: &Moe, held: ExpertRange) -> Result<(), CpuError> {
    if m.experts.len() != held.len() {
        return Err(CpuError::Mismatch(format!(
            "the op computes experts {}..{} but the weights hold {} experts",
            held.lo,
            held.hi,
            m.experts.len()
        )));
    }
    Ok(())
}

/// The jobs of a pass (every hit expert of `held` with its entries in chunks of
/// [`fp4::MAX_BATCH`], ascending expert id) and whether to run them on the rayon pool: with more
/// than one thread, more than one job and enough weight bytes that the fork/join costs less than
/// the jobs. A job's arithmetic is the same either way (results are deterministic and
/// bit-identical). `m` holds the experts of `held` (local index `e − held.lo`).
fn jobs(r: &Routing, m: &Moe, held: ExpertRange, down: bool, jobs: &mut Vec<Job>) -> bool {
    jobs.clear();
    let mut bytes = 0;
    for &e in r.dispatch.active_experts() {
        if !held.contains(e) {
            continue;
        }
        let n = r.dispatch.expert_entries(e).len();
        for a in (0..n).step_by(fp4::MAX_BATCH) {
            jobs.push((e, a, (a + fp4::MAX_BATCH).min(n)));
        }
        let ex = &m.experts[e - held.lo];
        bytes += if down { &ex.down } else { &ex.gate_up }.stored_bytes();
    }
    rayon::current_num_threads() > 1 && jobs.len() > 1 && bytes >= PAR_EXPERT_BYTES
}

/// Runs `f(job, scratch, out)` for every job, `out` being the job's `per_row` values per entry,
/// then `scatter(job, out)` in job order; on the pool when `par`.
fn run_jobs<F, G>(
    jobs: &[Job],
    r: &Routing,
    per_row: usize,
    par: bool,
    s: &mut ExpertScratch,
    f: F,
    mut scatter: G,
) -> Result<(), CpuError>
where
    F: Fn(&[moe::DispatchEntry], usize, &mut JobScratch, &mut [f32]) -> Result<(), CpuError> + Sync,
    G: FnMut(&[moe::DispatchEntry], &[f32]),
{
    use rayon::prelude::*;
    let entries = |&(e, a, b): &Job| &r.dispatch.expert_entries(e)[a..b];
    if par {
        let outs = jobs
            .par_iter()
            .map_init(JobScratch::default, |sc, job| {
                let en = entries(job);
                let mut out = vec![0f32; en.len() * per_row];
                f(en, job.0, sc, &mut out).map(|()| out)
            })
            .collect::<Vec<_>>();
        for (job, out) in jobs.iter().zip(outs) {
            scatter(entries(job), &out?);
        }
    } else {
        let mut sc = std::mem::take(&mut s.job);
        let mut out = std::mem::take(&mut s.down);
        let mut res = Ok(());
        for job in jobs {
            let en = entries(job);
            out.resize(en.len() * per_row, 0.0);
            res = f(en, job.0, &mut sc, &mut out);
            if res.is_err() {
                break;
            }
            scatter(en, &out);
        }
        (s.job, s.down) = (sc, out);
        res?;
    }
    Ok(())
}

/// Every hit expert once over its rows (chunks of [`fp4::MAX_BATCH`]): `gate_up (+ b)` → GLU
/// into `act[(row·k + slot)·I ..]`, `I` = `p.intermediate` (this rank's slice). The experts run
/// in parallel on the rayon pool when that pays (see [`jobs`]).
pub fn experts_gate_up(
    p: &ExpertsGateUpParams,
    acts: Activations,
    m: &Moe,
    h: &[f32],
    r: &Routing,
    act: &mut Vec<f32>,
    s: &mut ExpertScratch,
) -> Result<(), CpuError> {
    let (hs, k, i) = (p.hidden, p.top_k, p.intermediate);
    check_held(m, p.experts)?;
    let lo = p.experts.lo;
    act.resize(r.rows * k * i, 0.0);
    if i == 0 {
        return Ok(());
    }
    // Quantized once per row for every expert that reads it.
    let mut hq = std::mem::take(&mut s.hq);
    if m.experts.iter().any(|e| quantized(acts, &e.gate_up)) {
        hq.reset(hs)?;
        hq.push_rows(&h[..r.rows * hs])?;
    }
    let mut js = std::mem::take(&mut s.jobs);
    let par = jobs(r, m, p.experts, false, &mut js);
    let res = run_jobs(
        &js,
        r,
        i,
        par,
        s,
        |chunk, e, JobScratch { xe, xq, gu }, out| {
            let ex = &m.experts[e - lo];
            let (n, i2) = (chunk.len(), ex.gate_up.rows());
            gu.resize(n * i2, 0.0);
            match &ex.gate_up {
                ExpertMat::Mxfp4(w) if quantized(acts, &ex.gate_up) => {
                    xq.reset(hs)?;
                    for en in chunk {
                        xq.push_from(&hq, en.token)?;
                    }
                    let xq = &*xq;
                    super::ffn::mx_segments(w, n, gu, |v, out| fp4::gemm_q8(v, xq, out))?;
                }
                _ => {
                    xe.resize(n * hs, 0.0);
                    for (dst, en) in xe.chunks_exact_mut(hs).zip(chunk) {
                        dst.copy_from_slice(&h[en.token * hs..(en.token + 1) * hs]);
                    }
                    expert_matmul(&ex.gate_up, xe, n, gu)?;
                }
            }
            if let Some(b) = &ex.gate_up_bias {
                ops::add_bias(gu, b);
            }
            for (g, o) in gu.chunks_exact(i2).zip(out.chunks_exact_mut(i)) {
                ops::glu(p.glu, p.layout, g, o);
            }
            Ok(())
        },
        |chunk, out| {
            for (o, en) in out.chunks_exact(i).zip(chunk) {
                let at = (en.token * k + en.slot) * i;
                act[at..at + i].copy_from_slice(o);
            }
        },
    );
    s.jobs = js;
    s.hq = hq;
    res
}

/// Every hit expert's `down (+ b)` over its rows' activations, times the gate weight, then each
/// row's sum of its k expert outputs in ascending expert id (those of `p.experts` only) → `out`
/// (`[t, H]`). The experts run
/// in parallel on the rayon pool when that pays (see [`jobs`]); the sums are serial.
pub fn experts_down(
    p: &ExpertsDownParams,
    acts: Activations,
    m: &Moe,
    act: &[f32],
    r: &Routing,
    out: &mut [f32],
    s: &mut ExpertScratch,
) -> Result<(), CpuError> {
    let (hs, k, i) = (p.hidden, p.top_k, p.intermediate);
    check_held(m, p.experts)?;
    let (held, lo) = (p.experts, p.experts.lo);
    let t = r.rows;
    let mut slots = std::mem::take(&mut s.slots);
    slots.resize(t * k * hs, 0.0);
    let mut js = std::mem::take(&mut s.jobs);
    let par = jobs(r, m, held, true, &mut js);
    let res = run_jobs(
        &js,
        r,
        hs,
        par,
        s,
        |chunk, e, JobScratch { xe, xq, .. }, down| {
            let ex = &m.experts[e - lo];
            let n = chunk.len();
            if i == 0 {
                down.fill(0.0);
            } else {
                xe.resize(n * i, 0.0);
                for (dst, en) in xe.chunks_exact_mut(i).zip(chunk) {
                    let at = (en.token * k + en.slot) * i;
                    dst.copy_from_slice(&act[at..at + i]);
                }
                match &ex.down {
                    // Each (token, slot) row feeds one expert: quantized here, once.
                    ExpertMat::Mxfp4(w) if quantized(acts, &ex.down) => {
                        xq.reset(i)?;
                        xq.push_rows(xe)?;
                        let xq = &*xq;
                        super::ffn::mx_segments(w, n, down, |v, out| fp4::gemm_q8(v, xq, out))?;
                    }
                    _ => down_matmul(&ex.down, xe, n, down)?,
                }
            }
            if let Some(b) = &ex.down_bias {
                ops::add_bias(down, b);
            }
            for (row, en) in down.chunks_exact_mut(hs).zip(chunk) {
                for v in row.iter_mut() {
                    *v *= en.weight;
                }
            }
            Ok(())
        },
        |chunk, down| {
            for (row, en) in down.chunks_exact(hs).zip(chunk) {
                let at = (en.token * k + en.slot) * hs;
                slots[at..at + hs].copy_from_slice(row);
            }
        },
    );
    s.jobs = js;
    res?;
    for (ti, (o, ro)) in out
        .chunks_exact_mut(hs)
        .zip(r.routings[..t].iter())
        .enumerate()
    {
        s.order.clear();
        s.order.extend(0..ro.experts.len());
        s.order.sort_unstable_by_key(|&slot| ro.experts[slot]);
        o.fill(0.0);
        for &slot in s.order.iter() {
            if !held.contains(ro.experts[slot]) {
                continue; // another rank's expert (expert parallelism)
            }
            let at = (ti * k + slot) * hs;
            ops::add_assign(o, &slots[at..at + hs]);
        }
    }
    s.slots = slots;
    Ok(())
}

fn down_matmul(w: &ExpertMat, x: &[f32], n: usize, y: &mut [f32]) -> Result<(), CpuError> {
    expert_matmul(w, x, n, y)?;
    Ok(())
}
