//! DFlash drafters as model data: the drafter's configuration ([`config`]: `config.json` →
//! [`DrafterConfig`]), its weights ([`DrafterWeights`], checked against the config and a
//! target by [`DrafterWeights::check`] / [`DrafterWeights::check_target`]), their errors
//! ([`DrafterError`]) and the target hidden-state convention of the context features
//! ([`hidden_index`]).
//!
//! These live with the model, not with the speculative loop (`dflash`), so that every
//! executor of a drafter — the CPU one (`crate::cpu::draft`), the GPU one in `tilert` — builds
//! on the same types without depending on the loop. `dflash` re-exports them at their old paths
//! (`dflash::config`, `dflash::DrafterWeights`, `dflash::DrafterError`,
//! `dflash::target::hidden_index`).

use std::path::PathBuf;

use crate::checkpoint::CheckpointError;
use crate::config::{ConfigError, ModelConfig};
use crate::cpu::LAST_LAYER_PRE_NORM;
use crate::weights::{Layer, Linear, Mat, Mlp};

pub mod config;

pub use config::{
    build_target_layer_ids, DraftAttn, DrafterConfig, DEFAULT_BLOCK_SIZE, MAX_BLOCK_SIZE,
    MIN_BLOCK_SIZE,
};

/// Everything that can be wrong with a drafter or its use.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum DrafterError {
    /// `config.json` is unreadable or inconsistent (the field is named).
    #[error("{}: config: {source}", path.display())]
    Config { path: PathBuf, source: ConfigError },
    /// The safetensors files are missing, truncated, corrupt, or hold undecodable data.
    #[error("{}: checkpoint: {source}", path.display())]
    Checkpoint {
        path: PathBuf,
        source: CheckpointError,
    },
    /// A tensor is missing or has the wrong shape.
    #[error("tensor `{tensor}`: expected {expected}, found {found}")]
    Tensor {
        tensor: String,
        expected: String,
        found: String,
    },
    /// The checkpoint holds a tensor that changes the math and is not implemented (a
    /// drafter-owned LM head / embedding, a reduced-vocabulary `d2t` map).
    #[error("tensor `{tensor}`: unsupported: {reason}")]
    UnsupportedTensor { tensor: String, reason: String },
    /// `mask_embedding.pt` (read when no `mask_embedding.safetensors` is present) could not be
    /// read.
    #[error(
        "{}: {reason}; or convert it to safetensors: python -c \"import torch, safetensors.torch as st; \
         d = torch.load('mask_embedding.pt'); st.save_file({{'embedding': \
         d['embedding'].reshape(-1).contiguous()}}, 'mask_embedding.safetensors', \
         metadata={{'mask_token_id': str(d['mask_token_id'])}})\"",
        path.display()
    )]
    MaskEmbeddingPt { path: PathBuf, reason: String },
    /// The drafter does not fit the target (the drafter field is named).
    #[error("drafter `{field}` does not match the target: {reason}")]
    TargetMismatch { field: String, reason: String },
    /// The mask embedding file names another mask token (`mask_embedding.safetensors` metadata
    /// `mask_token_id`, or the `.pt` dict's) than the config.
    #[error("{}: metadata mask_token_id {found} ≠ the config's mask_token_id {config}", path.display())]
    MaskTokenMismatch {
        path: PathBuf,
        found: String,
        config: u32,
    },
    /// A draft call with bad arguments (block size, token, state).
    #[error("draft: {0}")]
    Input(String),
    /// The executor could not build or run a drafter pass (an inconsistent plan).
    #[error("draft: {0}")]
    Executor(#[from] crate::cpu::CpuError),
}

/// The drafter's own weights (it borrows the target's embedding and LM head). Matrices are
/// `[out, in]` in the checkpoint's dtype (a loaded drafter's are views of the mapped file; the
/// released drafters are BF16), norms and sinks f32, as in [`crate::weights`].
#[derive(Debug, Clone, PartialEq)]
pub struct DrafterWeights {
    /// `[H, K·H_t]`.
    pub fc: Mat,
    /// `[H]`, applied after `fc`.
    pub hidden_norm: Vec<f32>,
    /// Qwen3 layers: q/k/v/o, `q_norm`/`k_norm` `[head_dim]`, MiMo sinks `[n_heads]`,
    /// [`Mlp::Dense`] SwiGLU (`gate_up` in [`GateUpLayout::Halves`](crate::weights::GateUpLayout::Halves) order).
    pub layers: Vec<Layer>,
    /// `[H]`, the final norm before the target's LM head.
    pub norm: Vec<f32>,
    /// `[H]`: replaces the embedding of the mask token (MiMo), if present.
    pub mask_embedding: Option<Vec<f32>>,
}

/// [`DrafterError::Tensor`] for `tensor`.
pub fn tensor_err(
    tensor: &str,
    expected: impl Into<String>,
    found: impl Into<String>,
) -> DrafterError {
    DrafterError::Tensor {
        tensor: tensor.to_string(),
        expected: expected.into(),
        found: found.into(),
    }
}

fn check_len(name: &str, v: &[f32], n: usize) -> Result<(), DrafterError> {
    if v.len() == n {
        Ok(())
    } else {
        Err(tensor_err(name, format!("[{n}]"), format!("[{}]", v.len())))
    }
}

fn check_mat(name: &str, m: &Mat, rows: usize, cols: usize) -> Result<(), DrafterError> {
    if m.rows == rows && m.cols == cols {
        Ok(())
    } else {
        Err(tensor_err(
            name,
            format!("[{rows}, {cols}]"),
            format!("[{}, {}]", m.rows, m.cols),
        ))
    }
}

fn check_linear(
    name: &str,
    l: &Linear,
    rows: usize,
    cols: usize,
    bias: bool,
) -> Result<(), DrafterError> {
    check_mat(&format!("{name}.weight"), &l.w, rows, cols)?;
    match (&l.bias, bias) {
        (Some(b), true) => check_len(&format!("{name}.bias"), b, rows),
        (None, false) => Ok(()),
        (Some(_), false) => Err(tensor_err(
            &format!("{name}.bias"),
            "no bias (attention_bias is false)",
            "a bias",
        )),
        (None, true) => Err(tensor_err(
            &format!("{name}.bias"),
            format!("[{rows}] (attention_bias is true)"),
            "nothing",
        )),
    }
}

impl DrafterWeights {
    /// Validates every shape against `config` (errors name the tensor).
    pub fn check(&self, config: &DrafterConfig) -> Result<(), DrafterError> {
        let (c, weights) = (config, self);
        let (h, nh, nkv, d, i) = (
            c.hidden_size,
            c.n_heads,
            c.n_kv_heads,
            c.head_dim,
            c.intermediate_size,
        );
        let k = c.num_features();
        if k == 0 || !weights.fc.cols.is_multiple_of(k) || weights.fc.cols == 0 {
            return Err(tensor_err(
                "fc.weight",
                format!("[{h}, K·H_t] with K = {k} target layers"),
                format!("[{}, {}]", weights.fc.rows, weights.fc.cols),
            ));
        }
        let fc_cols = c.target_hidden_size.map_or(weights.fc.cols, |th| k * th);
        check_mat("fc.weight", &weights.fc, h, fc_cols)?;
        check_len("hidden_norm.weight", &weights.hidden_norm, h)?;
        check_len("norm.weight", &weights.norm, h)?;
        if let Some(m) = &weights.mask_embedding {
            check_len("embedding (mask embedding)", m, h)?;
        }
        if weights.layers.len() != c.num_layers() {
            return Err(tensor_err(
                "layers",
                format!("{} layers (num_hidden_layers)", c.num_layers()),
                format!("{} layers", weights.layers.len()),
            ));
        }
        for (l, lw) in weights.layers.iter().enumerate() {
            let p = format!("layers.{l}");
            let a = &lw.attn;
            let b = c.attention_bias;
            check_len(&format!("{p}.input_layernorm.weight"), &lw.input_norm, h)?;
            check_len(
                &format!("{p}.post_attention_layernorm.weight"),
                &lw.post_attn_norm,
                h,
            )?;
            check_linear(&format!("{p}.self_attn.q_proj"), &a.q, nh * d, h, b)?;
            check_linear(&format!("{p}.self_attn.k_proj"), &a.k, nkv * d, h, b)?;
            check_linear(&format!("{p}.self_attn.v_proj"), &a.v, nkv * d, h, b)?;
            check_linear(&format!("{p}.self_attn.o_proj"), &a.o, h, nh * d, b)?;
            for (name, norm) in [("q_norm", &a.q_norm), ("k_norm", &a.k_norm)] {
                let name = format!("{p}.self_attn.{name}.weight");
                match norm {
                    Some(v) => check_len(&name, v, d)?,
                    None => return Err(tensor_err(&name, format!("[{d}]"), "nothing")),
                }
            }
            let sink_name = format!("{p}.self_attn.attention_sink_bias");
            match (&a.sinks, c.sinks) {
                (Some(s), true) => check_len(&sink_name, s, nh)?,
                (None, false) => {}
                (None, true) => {
                    return Err(tensor_err(
                        &sink_name,
                        format!("[{nh}] (attention_sink_bias is true)"),
                        "nothing",
                    ))
                }
                (Some(_), false) => {
                    return Err(tensor_err(
                        &sink_name,
                        "nothing (attention_sink_bias is false)",
                        "sinks",
                    ))
                }
            }
            match &lw.mlp {
                Mlp::Dense { gate_up, down } => {
                    check_linear(&format!("{p}.mlp.gate_up_proj"), gate_up, 2 * i, h, false)?;
                    check_linear(&format!("{p}.mlp.down_proj"), down, h, i, false)?;
                }
                Mlp::Moe(_) => {
                    return Err(tensor_err(
                        &format!("{p}.mlp"),
                        "a dense SwiGLU MLP",
                        "a mixture of experts",
                    ))
                }
            }
        }
        Ok(())
    }

    /// Checks a drafter of `config` with these weights against a target config (see
    /// [`DrafterConfig::check_target_dims`]; the `fc` input width is `K · H_t`).
    pub fn check_target(
        &self,
        config: &DrafterConfig,
        target: &ModelConfig,
    ) -> Result<(), DrafterError> {
        config.check_target_dims(
            self.fc.cols,
            target.vocab_size,
            target.hidden_size,
            target.layers.len(),
        )
    }
}

/// The executors' hidden-state index (as the CPU executor's `Session::verify`) of target layer
/// `layer`'s output in a model of `num_layers` layers: `layer + 1`, and [`LAST_LAYER_PRE_NORM`]
/// for the last layer (index `num_layers` is after the final norm). `None` beyond the model.
pub fn hidden_index(layer: usize, num_layers: usize) -> Option<usize> {
    match layer + 1 {
        i if i < num_layers => Some(i),
        i if i == num_layers => Some(LAST_LAYER_PRE_NORM),
        _ => None,
    }
}
