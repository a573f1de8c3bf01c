//! Checkpoint directory → ([`ModelConfig`], [`Weights`]).
//!
//! [`load`] reads `config.json` (+ `generation_config.json`), opens the safetensors files
//! (single or sharded, mmap), validates **every** expected tensor's name, shape and dtype
//! ([`spec::check`]) before converting anything, and then converts to the conventions of
//! [`crate::weights`]:
//! * every matrix `[out, in]` in its stored dtype, as a view of the mapped file (no copy; FP8
//!   keeps its codes and carries its block scales, widened to f32 — they are small);
//! * gpt-oss bf16 experts are stored by transformers as `[E, in, out]` and are transposed into
//!   owned buffers of the same dtype (the mapped source pages are released afterwards); their
//!   gate/up rows keep the checkpoint order ([`GateUpLayout::Interleaved`]: row 2j = gate j,
//!   row 2j+1 = up j);
//! * gpt-oss MXFP4 experts (`*_blocks`/`*_scales`, already `[E, out, in/32, 16]`) stay
//!   [`ExpertMat::Mxfp4`], one [`MxMat`] view per expert;
//! * Qwen3-MoE / MiMo experts and dense MLPs: `gate_proj` rows then `up_proj` rows
//!   ([`GateUpLayout::Halves`]) — a view when the two tensors are adjacent in one file (as
//!   transformers writes bf16 ones), else two row segments, a view of each tensor with its own
//!   FP8 block scales ([`Mat::from_segments`]) — never a copy of the values;
//! * norms, biases and sinks are small and decoded to f32;
//! * tied embeddings (`tie_word_embeddings`): `lm_head` is `embed` (shared storage).
//!
//! [`load_with_progress`] also reads every mapped page once and reports the bytes read, so a
//! multi-GB checkpoint shows its progress while it is read from disk.
//!
//! * `mimo_v2` ([`crate::mimo`]): a fused `qkv_proj` is split into q / k / v (exact FP8 codes
//!   and scales); packed MXFP4 experts stay [`ExpertMat::Mxfp4`] views of the mapped bytes.
//!
//! Extra tensors in the checkpoint (e.g. MiMo's `model.mtp.*`) are ignored.

use std::path::{Path, PathBuf};

use rayon::prelude::*;

use crate::checkpoint::{Checkpoint, CheckpointError, Dtype};
use crate::config::{ConfigError, ModelConfig, Quantization};
use crate::spec::{self, ExpertTensors, MlpTensors, Resolved, SpecError, TensorSpec};
use crate::weights::{
    Attention, Bytes, DenseDtype, Expert, ExpertMat, GateUpLayout, Layer, Linear, Mat, Mlp, Moe,
    MxMat, Weights,
};

/// A failure to load a checkpoint directory, with the directory's path.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LoadError {
    /// `config.json` / `generation_config.json` are unreadable or inconsistent.
    #[error("{}: config: {source}", path.display())]
    Config { path: PathBuf, source: ConfigError },
    /// The safetensors files are missing, truncated, corrupt, or hold undecodable data.
    #[error("{}: checkpoint: {source}", path.display())]
    Checkpoint {
        path: PathBuf,
        source: CheckpointError,
    },
    /// A tensor is missing or has the wrong shape or dtype for the config.
    #[error("{}: {source}", path.display())]
    Spec { path: PathBuf, source: SpecError },
}

impl LoadError {
    fn spec(path: &Path, e: SpecError) -> LoadError {
        match e {
            SpecError::Checkpoint(source) => LoadError::Checkpoint {
                path: path.to_path_buf(),
                source,
            },
            source => LoadError::Spec {
                path: path.to_path_buf(),
                source,
            },
        }
    }
}

/// Reads and normalizes the configuration of a checkpoint directory (`config.json`, plus
/// `generation_config.json`'s eos ids).
pub fn load_config(dir: &Path) -> Result<ModelConfig, LoadError> {
    ModelConfig::from_dir(dir).map_err(|source| LoadError::Config {
        path: dir.to_path_buf(),
        source,
    })
}

/// Reads the `quantization_config` of a checkpoint directory.
pub fn load_quantization(dir: &Path) -> Result<Quantization, LoadError> {
    let path = dir.join("config.json");
    let err = |source| LoadError::Config {
        path: dir.to_path_buf(),
        source,
    };
    let text = std::fs::read_to_string(&path).map_err(|e| {
        err(ConfigError::Io {
            path: path.display().to_string(),
            message: e.to_string(),
        })
    })?;
    Quantization::from_json_str(&text).map_err(err)
}

/// Loads a checkpoint directory: config, then every tensor checked against the config, then
/// converted to [`Weights`].
///
/// The weights are views of the mapped files: nothing is read until a kernel (or an upload)
/// touches it.
pub fn load(dir: &Path) -> Result<(ModelConfig, Weights), LoadError> {
    let (cfg, ck) = open(dir)?;
    let weights = load_weights(&cfg, &ck).map_err(|e| LoadError::spec(dir, e))?;
    Ok((cfg, weights))
}

/// [`load`], then every mapped page read once (in file order) so the weights are in memory
/// before the first pass; `progress` is told the bytes read so far.
pub fn load_with_progress(
    dir: &Path,
    progress: &mut dyn FnMut(crate::progress::Progress),
) -> Result<(ModelConfig, Weights), LoadError> {
    let (cfg, ck) = open(dir)?;
    let weights = load_weights(&cfg, &ck).map_err(|e| LoadError::spec(dir, e))?;
    let total = ck.total_bytes();
    let mut done = 0;
    ck.prefetch(&mut |n| {
        done += n;
        progress(crate::progress::Progress { done, total });
    });
    Ok((cfg, weights))
}

/// The config and the opened checkpoint (FP8 block size from the quantization config).
fn open(dir: &Path) -> Result<(ModelConfig, Checkpoint), LoadError> {
    let cfg = load_config(dir)?;
    let quant = load_quantization(dir)?;
    let mut ck = Checkpoint::open(dir).map_err(|source| LoadError::Checkpoint {
        path: dir.to_path_buf(),
        source,
    })?;
    ck.set_fp8_block(quant.fp8_block());
    Ok((cfg, ck))
}

/// Converts an opened checkpoint for a config (validating every tensor first).
pub fn load_weights(cfg: &ModelConfig, ck: &Checkpoint) -> Result<Weights, SpecError> {
    spec::check(cfg, ck)?;
    let g = spec::global_tensors(cfg);
    let embed = mat(ck, &g.embed)?;
    let final_norm = vector(ck, &g.final_norm)?;
    let lm_head = match (&g.lm_head, cfg.tie_word_embeddings) {
        (Some(t), false) => mat(ck, t)?,
        _ => embed.clone(),
    };
    let layers = (0..cfg.layers.len())
        .into_par_iter()
        .map(|l| load_layer(cfg, ck, l))
        .collect::<Result<Vec<_>, _>>()?;
    Ok(Weights {
        embed,
        layers,
        final_norm,
        lm_head,
    })
}

/// The validated dense tensor behind a spec.
fn dense<'a>(
    ck: &'a Checkpoint,
    t: &TensorSpec,
) -> Result<crate::checkpoint::TensorView<'a>, SpecError> {
    match t.resolve(ck)? {
        Resolved::Dense(v) => Ok(v),
        _ => Err(SpecError::WrongDtype {
            tensor: t.name().to_string(),
            expected: "a dense tensor".into(),
            found: "MXFP4".into(),
        }),
    }
}

fn vector(ck: &Checkpoint, t: &TensorSpec) -> Result<Vec<f32>, SpecError> {
    let v = dense(ck, t)?;
    Ok(ck.read_f32(v.name)?)
}

fn ck_err(ck: &Checkpoint, tensor: &str, message: String) -> SpecError {
    SpecError::Checkpoint(CheckpointError::Tensor {
        file: ck.dir().to_path_buf(),
        tensor: tensor.to_string(),
        message,
    })
}

/// The dense dtype of a checkpoint dtype.
fn dense_dtype(ck: &Checkpoint, name: &str, d: Dtype) -> Result<DenseDtype, SpecError> {
    Ok(match d {
        Dtype::F32 => DenseDtype::F32,
        Dtype::BF16 => DenseDtype::Bf16,
        Dtype::F16 => DenseDtype::F16,
        Dtype::F8_E4M3 => DenseDtype::F8E4M3,
        other => {
            return Err(ck_err(
                ck,
                name,
                format!("dtype {other:?} is not a dense float dtype (BF16, F16, F32, F8_E4M3)"),
            ))
        }
    })
}

/// The block scales of an FP8 weight, widened to f32: `(block, scale columns, values)`.
type Fp8Scales = ([usize; 2], usize, Vec<f32>);

fn fp8_scales(
    ck: &Checkpoint,
    v: &crate::checkpoint::TensorView<'_>,
) -> Result<Option<Fp8Scales>, SpecError> {
    Ok(match ck.fp8_scale(v)? {
        Some(s) => Some((ck.fp8_block(), s.shape[1], s.to_f32()?)),
        None => None,
    })
}

fn mat(ck: &Checkpoint, t: &TensorSpec) -> Result<Mat, SpecError> {
    let v = dense(ck, t)?;
    let [rows, cols] = *v.shape else {
        return Err(SpecError::WrongShape {
            tensor: v.name.to_string(),
            expected: "a 2-D matrix".into(),
            found: format!("{:?}", v.shape),
        });
    };
    let dtype = dense_dtype(ck, v.name, v.dtype)?;
    let scales = fp8_scales(ck, &v)?;
    Mat::from_bytes(dtype, rows, cols, ck.shared_bytes(v.name)?, scales)
        .map_err(|m| ck_err(ck, v.name, m))
}

fn linear(ck: &Checkpoint, w: &TensorSpec, b: Option<&TensorSpec>) -> Result<Linear, SpecError> {
    Ok(Linear {
        w: mat(ck, w)?,
        bias: b.map(|b| vector(ck, b)).transpose()?,
    })
}

/// The spec of a `[rows, cols]` weight stored in one of the dense dtypes ([`spec::WEIGHT`]).
fn weight_spec(name: &str, rows: usize, cols: usize) -> TensorSpec {
    TensorSpec {
        names: vec![name.to_string()],
        forms: vec![spec::Form::Dense {
            shape: vec![rows, cols],
            dtypes: spec::WEIGHT,
        }],
    }
}

/// The 2-D weight `name`, checked to be `[rows, cols]` in a dense dtype (BF16, F16, F32, or
/// F8_E4M3 with optional `_scale_inv` block scales), as a [`Mat`] in its stored dtype: a view of
/// the mapped file. For loaders of other checkpoint kinds (DFlash drafters) that keep the
/// conventions of [`crate::weights`].
pub fn weight_mat(ck: &Checkpoint, name: &str, rows: usize, cols: usize) -> Result<Mat, SpecError> {
    mat(ck, &weight_spec(name, rows, cols))
}

/// `gate` (`[inter, hidden]`) then `up` (`[inter, hidden]`) as one `[2·inter, hidden]` matrix in
/// [`GateUpLayout::Halves`] order and the stored dtype, each checked as [`weight_mat`]: a view
/// when the two tensors lie back to back in one file (as `save_file` writes `gate_proj` and
/// `up_proj` of one bf16 MLP), else two row segments, a view of each ([`Mat::from_segments`]):
/// the values are never copied.
pub fn gate_up_mat(
    ck: &Checkpoint,
    gate: &str,
    up: &str,
    inter: usize,
    hidden: usize,
) -> Result<Mat, SpecError> {
    let (g, u) = (
        weight_spec(gate, inter, hidden),
        weight_spec(up, inter, hidden),
    );
    dense(ck, &g)?;
    dense(ck, &u)?;
    gate_up_halves(ck, &g, &u)
}

/// `[gate; up]` as one `[2I, H]` matrix (Halves layout) in the stored dtype, never a copy of
/// the checkpoint's values: one view when the two tensors lie back to back in one file (and FP8
/// scale blocks do not straddle the seam), else two row segments — the gate view, then the up
/// view, each with its own FP8 block scales ([`Mat::from_segments`]; MiMo's FP8 dense MLP, whose
/// `gate_proj.weight_scale_inv` lies between the two).
fn gate_up_halves(ck: &Checkpoint, gate: &TensorSpec, up: &TensorSpec) -> Result<Mat, SpecError> {
    let (g, u) = (dense(ck, gate)?, dense(ck, up)?);
    let ([gr, gc], [ur, uc]) = (g.shape, u.shape) else {
        return Err(SpecError::WrongShape {
            tensor: g.name.to_string(),
            expected: "2-D gate and up matrices".into(),
            found: format!("{:?} and {:?}", g.shape, u.shape),
        });
    };
    if gc != uc {
        return Err(SpecError::WrongShape {
            tensor: u.name.to_string(),
            expected: format!("[_, {gc}] like `{}`", g.name),
            found: format!("{:?}", u.shape),
        });
    }
    if g.dtype != u.dtype {
        return Err(SpecError::WrongDtype {
            tensor: u.name.to_string(),
            expected: format!("{:?} like `{}`", g.dtype, g.name),
            found: format!("{:?}", u.dtype),
        });
    }
    let dtype = dense_dtype(ck, g.name, g.dtype)?;
    let (gs, us) = (fp8_scales(ck, &g)?, fp8_scales(ck, &u)?);
    if gs.is_some() != us.is_some() {
        return Err(ck_err(
            ck,
            u.name,
            format!(
                "FP8 block scales on only one of `{}` and `{}`",
                g.name, u.name
            ),
        ));
    }
    let whole_blocks = gs.as_ref().is_none_or(|(block, _, _)| gr % block[0] == 0);
    match ck.shared_bytes_adjacent(g.name, u.name)? {
        Some(bytes) if whole_blocks => {
            // Whole scale rows: the up scales follow the gate scales.
            let scales = gs.zip(us).map(|((block, sc, mut a), (_, _, b))| {
                a.extend_from_slice(&b);
                (block, sc, a)
            });
            Mat::from_bytes(dtype, gr + ur, *gc, bytes, scales).map_err(|m| ck_err(ck, g.name, m))
        }
        _ => {
            let seg = |name: &str, rows: usize, s: Option<Fp8Scales>| {
                Mat::from_bytes(dtype, rows, *gc, ck.shared_bytes(name)?, s)
                    .map_err(|m| ck_err(ck, name, m))
            };
            let parts = vec![seg(g.name, *gr, gs)?, seg(u.name, *ur, us)?];
            Mat::from_segments(parts).map_err(|m| ck_err(ck, g.name, m))
        }
    }
}

fn load_layer(cfg: &ModelConfig, ck: &Checkpoint, l: usize) -> Result<Layer, SpecError> {
    let Some(t) = spec::layer_tensors(cfg, l) else {
        return Err(SpecError::Missing {
            tensor: format!("model.layers.{l}"),
            expected: format!("a layer index < {}", cfg.layers.len()),
        });
    };
    let b = t.biases.as_ref();
    let (q, k, v) = match t.fused_qkv(ck) {
        Some(f) => {
            let [q, k, v] = crate::mimo::split_fused_qkv(ck, f)?;
            let l = |w| Linear { w, bias: None };
            (l(q), l(k), l(v))
        }
        None => (
            linear(ck, &t.q, b.map(|b| &b[0]))?,
            linear(ck, &t.k, b.map(|b| &b[1]))?,
            linear(ck, &t.v, b.map(|b| &b[2]))?,
        ),
    };
    let attn = Attention {
        q,
        k,
        v,
        o: linear(ck, &t.o, b.map(|b| &b[3]))?,
        q_norm: t.q_norm.as_ref().map(|x| vector(ck, x)).transpose()?,
        k_norm: t.k_norm.as_ref().map(|x| vector(ck, x)).transpose()?,
        sinks: t.sinks.as_ref().map(|x| vector(ck, x)).transpose()?,
    };
    let mlp = match &t.mlp {
        MlpTensors::Dense { gate, up, down } => Mlp::Dense {
            gate_up: Linear {
                w: gate_up_halves(ck, gate, up)?,
                bias: None,
            },
            down: linear(ck, down, None)?,
        },
        MlpTensors::Stacked {
            router,
            router_bias,
            gate_up,
            gate_up_bias,
            down,
            down_bias,
        } => {
            let e = cfg.n_experts;
            let gu = stacked_experts(ck, gate_up)?;
            let dn = stacked_experts(ck, down)?;
            let gub = vector(ck, gate_up_bias)?;
            let dnb = vector(ck, down_bias)?;
            let (gw, dw) = (gub.len() / e.max(1), dnb.len() / e.max(1));
            let experts = gu
                .into_iter()
                .zip(dn)
                .enumerate()
                .map(|(x, (gate_up, down))| Expert {
                    gate_up,
                    gate_up_bias: Some(gub[x * gw..(x + 1) * gw].to_vec()),
                    down,
                    down_bias: Some(dnb[x * dw..(x + 1) * dw].to_vec()),
                })
                .collect();
            Mlp::Moe(Moe {
                router: linear(ck, router, Some(router_bias))?,
                correction_bias: None,
                experts,
                gate_up_layout: GateUpLayout::Interleaved,
            })
        }
        MlpTensors::PerExpert {
            router,
            correction_bias,
            experts,
        } => {
            let experts = experts
                .par_iter()
                .map(|x: &ExpertTensors| {
                    if let Some(g) = crate::mimo::packed_name(ck, &x.gate)? {
                        let (u, d) = match (
                            crate::mimo::packed_name(ck, &x.up)?,
                            crate::mimo::packed_name(ck, &x.down)?,
                        ) {
                            (Some(u), Some(d)) => (u, d),
                            _ => {
                                return Err(ck_err(
                                    ck,
                                    &g,
                                    "an MXFP4 gate_proj needs MXFP4 up_proj and down_proj".into(),
                                ))
                            }
                        };
                        let (gate_up, down) = crate::mimo::mx_expert(ck, &g, &u, &d)?;
                        return Ok(Expert {
                            gate_up,
                            gate_up_bias: None,
                            down,
                            down_bias: None,
                        });
                    }
                    Ok(Expert {
                        gate_up: ExpertMat::Dense(gate_up_halves(ck, &x.gate, &x.up)?),
                        gate_up_bias: None,
                        down: ExpertMat::Dense(mat(ck, &x.down)?),
                        down_bias: None,
                    })
                })
                .collect::<Result<Vec<_>, SpecError>>()?;
            Mlp::Moe(Moe {
                router: linear(ck, router, None)?,
                correction_bias: correction_bias
                    .as_ref()
                    .map(|x| vector(ck, x))
                    .transpose()?,
                experts,
                gate_up_layout: GateUpLayout::Halves,
            })
        }
    };
    Ok(Layer {
        input_norm: vector(ck, &t.input_norm)?,
        attn,
        post_attn_norm: vector(ck, &t.post_attn_norm)?,
        mlp,
    })
}

/// gpt-oss stacked experts → one `[out, in]` matrix per expert: MXFP4 stays MXFP4 (views of
/// the packed bytes); the dense form `[E, in, out]` is transposed expert by expert into owned
/// buffers of its own dtype, after which the mapped source pages are released.
fn stacked_experts(ck: &Checkpoint, t: &TensorSpec) -> Result<Vec<ExpertMat>, SpecError> {
    match t.resolve(ck)? {
        Resolved::Mxfp4Experts(x) => {
            let base = t
                .names
                .iter()
                .find(|n| ck.contains(&format!("{n}_blocks")))
                .map(String::as_str)
                .unwrap_or(t.name());
            let blocks = ck.shared_bytes(&format!("{base}_blocks"))?;
            let scales = ck.shared_bytes(&format!("{base}_scales"))?;
            let (rows, k) = (x.rows(), x.k());
            let (wb, ws) = (rows * k / 2, rows * k / fp4::BLOCK);
            if blocks.len() != x.experts() * wb || scales.len() != x.experts() * ws {
                return Err(ck_err(
                    ck,
                    base,
                    format!(
                        "MXFP4 stack of {} bytes for {} experts",
                        blocks.len(),
                        x.experts()
                    ),
                ));
            }
            Ok((0..x.experts())
                .map(|e| {
                    ExpertMat::Mxfp4(MxMat::from_bytes(
                        rows,
                        k,
                        blocks.slice(e * wb, wb),
                        scales.slice(e * ws, ws),
                    ))
                })
                .collect())
        }
        Resolved::Dense(v) => {
            let [e, fan_in, fan_out] = *v.shape else {
                return Err(SpecError::WrongShape {
                    tensor: v.name.to_string(),
                    expected: "[E, in, out]".into(),
                    found: format!("{:?}", v.shape),
                });
            };
            let dtype = dense_dtype(ck, v.name, v.dtype)?;
            if dtype == DenseDtype::F8E4M3 && ck.fp8_scale(&v)?.is_some() {
                return Err(ck_err(
                    ck,
                    v.name,
                    "block-scaled FP8 stacked experts are not supported".into(),
                ));
            }
            let eb = dtype.size();
            let per = fan_in * fan_out;
            let out = (0..e)
                .into_par_iter()
                .map(|x| {
                    let src = &v.data[x * per * eb..(x + 1) * per * eb];
                    // [in, out] → [out, in], element by element in the stored dtype.
                    let mut data = vec![0u8; per * eb];
                    for (o, row) in data.chunks_exact_mut((fan_in * eb).max(1)).enumerate() {
                        for (j, d) in row.chunks_exact_mut(eb).enumerate() {
                            let at = (j * fan_out + o) * eb;
                            d.copy_from_slice(&src[at..at + eb]);
                        }
                    }
                    Mat::from_bytes(dtype, fan_out, fan_in, Bytes::from_vec(data), None)
                        .map(ExpertMat::Dense)
                        .map_err(|m| ck_err(ck, v.name, m))
                })
                .collect::<Result<Vec<_>, _>>()?;
            ck.release(v.name);
            Ok(out)
        }
        Resolved::Mxfp4Matrix(_) => Err(SpecError::WrongShape {
            tensor: t.name().to_string(),
            expected: "stacked experts [E, ...]".into(),
            found: "a single MXFP4 matrix".into(),
        }),
    }
}
