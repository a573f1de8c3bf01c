//! Tensor- and expert-parallel weight shards: each rank's decoder layers, sliced by a
//! [`TpLayout`] (the one definition of what a rank holds; see `crate::plan::tp`): heads and
//! intermediate slices, whole replicated blocks, or an expert-parallel rank's whole experts. The CPU's simulated ranks
//! (`crate::cpu`) and the GPU's rank sessions (`tilert::exec::tp`) hold these shards.
//!
//! The slicing goes through four small functions over the weight types — [`rows_of`],
//! [`cols_of`] for [`Mat`] (in its stored dtype) and their MXFP4 twins.

// Row selections are lists of ranges; a list of one range is the common case, not a mistake.
#![allow(clippy::single_range_in_vec_init)]

use std::ops::Range;

use crate::config::ModelConfig;
use crate::plan::tp::TpLayout;
use crate::plan::PlanError;
use crate::weights::{
    Attention, Bytes, DenseDtype, Expert, ExpertMat, GateUpLayout, Layer, Linear, Mat, Mlp, Moe,
    MxMat, Weights,
};

/// The element bytes of the rows `ranges` and columns `cols` of `m`, in its stored dtype
/// (bf16 / f16 / f32 stay as they are; FP8, whose block scales do not slice with the codes,
/// is widened to f32 — exact), as a new matrix.
fn slice(m: &Mat, ranges: &[Range<usize>], cols: Range<usize>) -> Mat {
    let n: usize = ranges.iter().map(|r| r.len()).sum();
    let dtype = m.dtype();
    if dtype == DenseDtype::F8E4M3 {
        let mut data = Vec::with_capacity(n * cols.len());
        let mut row = vec![0f32; m.cols];
        for r in ranges {
            for i in r.clone() {
                m.row_into(i, &mut row);
                data.extend_from_slice(&row[cols.clone()]);
            }
        }
        return Mat::from_f32(n, cols.len(), data);
    }
    let e = dtype.size();
    let mut out = Vec::with_capacity(n * cols.len() * e);
    for r in ranges {
        for i in r.clone() {
            out.extend_from_slice(&m.row_bytes(i)[cols.start * e..cols.end * e]);
        }
    }
    Mat::from_bytes(dtype, n, cols.len(), Bytes::from_vec(out), None)
        .expect("a slice of a valid matrix is a valid matrix")
}

/// The rows `ranges` of `m`, concatenated in order.
pub fn rows_of(m: &Mat, ranges: &[Range<usize>]) -> Mat {
    slice(m, ranges, 0..m.cols)
}

/// The columns `cols` of `m`.
pub fn cols_of(m: &Mat, cols: Range<usize>) -> Mat {
    slice(m, &[0..m.rows], cols)
}

/// The rows `ranges` of an MXFP4 matrix.
pub fn mx_rows_of(m: &MxMat, ranges: &[Range<usize>]) -> MxMat {
    let g = m.k / fp4::BLOCK;
    let n: usize = ranges.iter().map(|r| r.len()).sum();
    let (mut blocks, mut scales) = (Vec::with_capacity(n * g * 16), Vec::with_capacity(n * g));
    for r in ranges.iter().flat_map(|r| r.clone()) {
        blocks.extend_from_slice(m.row_blocks(r));
        scales.extend_from_slice(m.row_scales(r));
    }
    MxMat::from_bytes(n, m.k, Bytes::from_vec(blocks), Bytes::from_vec(scales))
}

/// The reduction columns `cols` (whole 32-element blocks) of an MXFP4 matrix.
pub fn mx_cols_of(m: &MxMat, cols: Range<usize>) -> Result<MxMat, PlanError> {
    let b = fp4::BLOCK;
    if !cols.start.is_multiple_of(b) || !cols.end.is_multiple_of(b) {
        return Err(PlanError::Invalid(format!(
            "MXFP4 columns {cols:?} do not fall on {b}-element blocks"
        )));
    }
    let (g0, g1) = (cols.start / b, cols.end / b);
    let (mut blocks, mut scales) = (Vec::new(), Vec::new());
    for r in 0..m.rows {
        blocks.extend_from_slice(&m.row_blocks(r)[g0 * 16..g1 * 16]);
        scales.extend_from_slice(&m.row_scales(r)[g0..g1]);
    }
    Ok(MxMat::from_bytes(
        m.rows,
        cols.len(),
        Bytes::from_vec(blocks),
        Bytes::from_vec(scales),
    ))
}

fn expert_rows(m: &ExpertMat, ranges: &[Range<usize>]) -> ExpertMat {
    match m {
        ExpertMat::Dense(d) => ExpertMat::Dense(rows_of(d, ranges)),
        ExpertMat::Mxfp4(x) => ExpertMat::Mxfp4(mx_rows_of(x, ranges)),
    }
}

fn expert_cols(m: &ExpertMat, cols: Range<usize>) -> Result<ExpertMat, PlanError> {
    Ok(match m {
        ExpertMat::Dense(d) => ExpertMat::Dense(cols_of(d, cols)),
        ExpertMat::Mxfp4(x) => ExpertMat::Mxfp4(mx_cols_of(x, cols)?),
    })
}

fn pick(v: &[f32], ranges: &[Range<usize>]) -> Vec<f32> {
    ranges
        .iter()
        .flat_map(|r| v[r.clone()].iter().copied())
        .collect()
}

/// Rows of a `[2I, ·]` gate/up projection holding intermediate units `i` (in `layout` order).
fn gate_up_rows(i: &Range<usize>, full: usize, layout: GateUpLayout) -> Vec<Range<usize>> {
    match layout {
        GateUpLayout::Interleaved => vec![2 * i.start..2 * i.end],
        GateUpLayout::Halves => vec![i.clone(), full + i.start..full + i.end],
    }
}

/// A linear layer's rows `ranges` (and bias entries).
fn linear_rows(l: &Linear, ranges: &[Range<usize>]) -> Linear {
    Linear {
        w: rows_of(&l.w, ranges),
        bias: l.bias.as_ref().map(|b| pick(b, ranges)),
    }
}

/// A linear layer's columns `cols`; the bias stays only where `keep_bias` (rank 0).
fn linear_cols(l: &Linear, cols: Range<usize>, keep_bias: bool) -> Linear {
    Linear {
        w: cols_of(&l.w, cols),
        bias: if keep_bias { l.bias.clone() } else { None },
    }
}

/// Every rank's decoder layers (`[rank][layer]`) of `weights` under `layout`.
pub fn shard_layers(
    cfg: &ModelConfig,
    weights: &Weights,
    layout: &TpLayout,
) -> Result<Vec<Vec<Layer>>, PlanError> {
    let n = layout.ranks;
    let mut ranks = vec![Vec::with_capacity(cfg.layers.len()); n];
    for (l, ((spec, lw), ls)) in cfg
        .layers
        .iter()
        .zip(&weights.layers)
        .zip(&layout.layers)
        .enumerate()
    {
        let (d, dv) = (spec.head_dim, spec.v_head_dim);
        let par = layout.parallelism;
        for (r, layers) in ranks.iter_mut().enumerate() {
            let (hq, hk) = (&ls.heads[r], &ls.kv_heads[r]);
            let attn = if !par.shard_attention {
                // Replicated: every rank holds the whole attention.
                lw.attn.clone()
            } else {
                Attention {
                    q: linear_rows(&lw.attn.q, &[hq.start * d..hq.end * d]),
                    k: linear_rows(&lw.attn.k, &[hk.start * d..hk.end * d]),
                    v: linear_rows(&lw.attn.v, &[hk.start * dv..hk.end * dv]),
                    o: linear_cols(&lw.attn.o, hq.start * dv..hq.end * dv, r == 0),
                    q_norm: lw.attn.q_norm.clone(),
                    k_norm: lw.attn.k_norm.clone(),
                    sinks: lw.attn.sinks.as_ref().map(|s| s[hq.clone()].to_vec()),
                }
            };
            let i = &ls.intermediate[r];
            let mlp = match &lw.mlp {
                Mlp::Dense { .. } if !par.shard_attention => lw.mlp.clone(),
                Mlp::Moe(m) if par.expert_parallel => {
                    // Placed whole: the rank's contiguous range of experts, biases included.
                    let held = &ls.experts[r];
                    let experts = m.experts.get(held.clone()).ok_or_else(|| {
                        PlanError::Invalid(format!(
                            "layer {l}: experts {held:?} of a block of {}",
                            m.experts.len()
                        ))
                    })?;
                    Mlp::Moe(Moe {
                        router: m.router.clone(),
                        correction_bias: m.correction_bias.clone(),
                        experts: experts.to_vec(),
                        gate_up_layout: m.gate_up_layout,
                    })
                }
                Mlp::Dense { gate_up, down } => {
                    let full = down.w.cols;
                    Mlp::Dense {
                        gate_up: linear_rows(gate_up, &gate_up_rows(i, full, GateUpLayout::Halves)),
                        down: linear_cols(down, i.clone(), r == 0),
                    }
                }
                Mlp::Moe(m) => {
                    let mut experts = Vec::with_capacity(m.experts.len());
                    for ex in &m.experts {
                        let full = ex.down.cols();
                        let rows = gate_up_rows(i, full, m.gate_up_layout);
                        experts.push(Expert {
                            gate_up: expert_rows(&ex.gate_up, &rows),
                            gate_up_bias: ex.gate_up_bias.as_ref().map(|b| pick(b, &rows)),
                            down: expert_cols(&ex.down, i.clone()).map_err(|e| {
                                PlanError::Invalid(format!("layer {l} experts: {e}"))
                            })?,
                            down_bias: if r == 0 { ex.down_bias.clone() } else { None },
                        });
                    }
                    Mlp::Moe(Moe {
                        router: m.router.clone(),
                        correction_bias: m.correction_bias.clone(),
                        experts,
                        gate_up_layout: m.gate_up_layout,
                    })
                }
            };
            layers.push(Layer {
                input_norm: lw.input_norm.clone(),
                attn,
                post_attn_norm: lw.post_attn_norm.clone(),
                mlp,
            });
        }
    }
    Ok(ranks)
}
