//! Checkpoint directory → ([`ModelConfig`], [`Weights`]).
//!
//! [`load`] reads `config.json` (+ `generation_config.json`), opens the safetensors files
//! (single or sharded, mmap), validates **every** expected tensor's name, shape and dtype
//! ([`spec::check`]) before converting anything, and then converts to the conventions of
//! [`crate::weights`] (in parallel with rayon):
//! * every matrix `[out, in]`, widened to f32 (FP8 multiplied by its block scales);
//! * gpt-oss bf16 experts are stored by transformers as `[E, in, out]` and are transposed;
//!   their gate/up rows keep the checkpoint order ([`GateUpLayout::Interleaved`]: row 2j = gate
//!   j, row 2j+1 = up j);
//! * gpt-oss MXFP4 experts (`*_blocks`/`*_scales`, already `[E, out, in/32, 16]`) stay
//!   [`ExpertMat::Mxfp4`], one [`fp4::MxMatrix`] per expert;
//! * Qwen3-MoE / MiMo experts and dense MLPs: `gate_proj` rows then `up_proj` rows
//!   ([`GateUpLayout::Halves`]);
//! * tied embeddings: `lm_head` is a copy of `embed`.
//!
//! Extra tensors in the checkpoint (e.g. MiMo's `model.mtp.*`) are ignored.

use std::path::{Path, PathBuf};

use rayon::prelude::*;

use crate::checkpoint::{Checkpoint, CheckpointError, Dtype};
use crate::config::{ConfigError, ModelConfig, Quantization};
use crate::spec::{self, ExpertTensors, MlpTensors, Resolved, SpecError, TensorSpec};
use crate::weights::{
    Attention, Expert, ExpertMat, GateUpLayout, Layer, Linear, Mat, Mlp, Moe, Weights,
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
pub fn load(dir: &Path) -> Result<(ModelConfig, Weights), LoadError> {
    let cfg = load_config(dir)?;
    let quant = load_quantization(dir)?;
    let mut ck = Checkpoint::open(dir).map_err(|source| LoadError::Checkpoint {
        path: dir.to_path_buf(),
        source,
    })?;
    ck.set_fp8_block(quant.fp8_block());
    let weights = load_weights(&cfg, &ck).map_err(|e| LoadError::spec(dir, e))?;
    Ok((cfg, weights))
}

/// Converts an opened checkpoint for a config (validating every tensor first).
pub fn load_weights(cfg: &ModelConfig, ck: &Checkpoint) -> Result<Weights, SpecError> {
    spec::check(cfg, ck)?;
    let g = spec::global_tensors(cfg);
    let embed = mat(ck, &g.embed)?;
    let final_norm = vector(ck, &g.final_norm)?;
    let lm_head = match &g.lm_head {
        Some(t) => mat(ck, t)?,
        None => embed.clone(),
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

fn mat(ck: &Checkpoint, t: &TensorSpec) -> Result<Mat, SpecError> {
    let v = dense(ck, t)?;
    let [rows, cols] = *v.shape else {
        return Err(SpecError::WrongShape {
            tensor: v.name.to_string(),
            expected: "a 2-D matrix".into(),
            found: format!("{:?}", v.shape),
        });
    };
    Ok(Mat {
        rows,
        cols,
        data: ck.read_f32(v.name)?,
    })
}

fn linear(ck: &Checkpoint, w: &TensorSpec, b: Option<&TensorSpec>) -> Result<Linear, SpecError> {
    Ok(Linear {
        w: mat(ck, w)?,
        bias: b.map(|b| vector(ck, b)).transpose()?,
    })
}

/// `[gate; up]` as one `[2I, H]` matrix (Halves layout), decoded straight into place.
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
    let mut data = vec![0f32; (gr + ur) * gc];
    let (top, bottom) = data.split_at_mut(gr * gc);
    ck.read_f32_into(g.name, top)?;
    ck.read_f32_into(u.name, bottom)?;
    Ok(Mat {
        rows: gr + ur,
        cols: *gc,
        data,
    })
}

fn load_layer(cfg: &ModelConfig, ck: &Checkpoint, l: usize) -> Result<Layer, SpecError> {
    let Some(t) = spec::layer_tensors(cfg, l) else {
        return Err(SpecError::Missing {
            tensor: format!("model.layers.{l}"),
            expected: format!("a layer index < {}", cfg.layers.len()),
        });
    };
    let b = t.biases.as_ref();
    let attn = Attention {
        q: linear(ck, &t.q, b.map(|b| &b[0]))?,
        k: linear(ck, &t.k, b.map(|b| &b[1]))?,
        v: linear(ck, &t.v, b.map(|b| &b[2]))?,
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

/// gpt-oss stacked experts → one `[out, in]` matrix per expert: MXFP4 stays MXFP4; the bf16
/// form `[E, in, out]` is decoded expert by expert and transposed.
fn stacked_experts(ck: &Checkpoint, t: &TensorSpec) -> Result<Vec<ExpertMat>, SpecError> {
    match t.resolve(ck)? {
        Resolved::Mxfp4Experts(x) => (0..x.experts())
            .into_par_iter()
            .map(|e| {
                let m = x.expert(e).map_err(|err| {
                    SpecError::Checkpoint(CheckpointError::Tensor {
                        file: ck.dir().to_path_buf(),
                        tensor: format!("{}_blocks", t.name()),
                        message: err.to_string(),
                    })
                })?;
                Ok(ExpertMat::Mxfp4(fp4::MxMatrix {
                    rows: m.rows(),
                    k: m.k(),
                    blocks: m.blocks().to_vec(),
                    scales: m.scales().to_vec(),
                }))
            })
            .collect(),
        Resolved::Dense(v) => {
            let [e, fan_in, fan_out] = *v.shape else {
                return Err(SpecError::WrongShape {
                    tensor: v.name.to_string(),
                    expected: "[E, in, out]".into(),
                    found: format!("{:?}", v.shape),
                });
            };
            let eb = match v.dtype {
                Dtype::F32 => 4,
                Dtype::F8_E4M3 => 1,
                _ => 2,
            };
            let per = fan_in * fan_out;
            (0..e)
                .into_par_iter()
                .map(|x| {
                    let bytes = &v.data[x * per * eb..(x + 1) * per * eb];
                    let mut src = vec![0f32; per];
                    crate::checkpoint::decode_into(v.dtype, bytes, &mut src).map_err(|m| {
                        SpecError::Checkpoint(CheckpointError::Tensor {
                            file: v.file.to_path_buf(),
                            tensor: v.name.to_string(),
                            message: m,
                        })
                    })?;
                    // [in, out] → [out, in]
                    let mut data = vec![0f32; per];
                    for (o, row) in data.chunks_exact_mut(fan_in.max(1)).enumerate() {
                        for (j, d) in row.iter_mut().enumerate() {
                            *d = src[j * fan_out + o];
                        }
                    }
                    Ok(ExpertMat::Dense(Mat {
                        rows: fan_out,
                        cols: fan_in,
                        data,
                    }))
                })
                .collect()
        }
        Resolved::Mxfp4Matrix(_) => Err(SpecError::WrongShape {
            tensor: t.name().to_string(),
            expected: "stacked experts [E, ...]".into(),
            found: "a single MXFP4 matrix".into(),
        }),
    }
}
