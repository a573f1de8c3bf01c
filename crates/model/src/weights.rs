//! The typed in-memory weights that every executor consumes.
//!
//! Conventions (shared by the loader and the executors):
//! * every matrix is an `nn.Linear` weight in `[out, in]` orientation, row-major, so `y = W·x`;
//! * dense weights are widened to f32 at load (bf16/f16/FP8 sources are exact in f32);
//! * expert matrices stay MXFP4 when the checkpoint stores them so (`fp4::MxMatrix`, K = `in`);
//! * `gate_up` of an expert (and of a dense MLP) holds `2·I` rows. gpt-oss interleaves them
//!   (row 2j = gate j, row 2j+1 = up j) — [`GateUpLayout::Interleaved`]; Qwen3-MoE and MiMo store
//!   `gate_proj` and `up_proj` separately and the loader concatenates them (rows 0..I = gate,
//!   I..2I = up) — [`GateUpLayout::Halves`].

/// A row-major f32 matrix `[rows, cols]`.
#[derive(Debug, Clone, PartialEq)]
pub struct Mat {
    pub rows: usize,
    pub cols: usize,
    pub data: Vec<f32>,
}

impl Mat {
    /// One row.
    #[inline]
    pub fn row(&self, r: usize) -> &[f32] {
        &self.data[r * self.cols..(r + 1) * self.cols]
    }
    /// Parameter count.
    pub fn numel(&self) -> usize {
        self.rows * self.cols
    }
}

/// A linear layer `y = W·x (+ b)`.
#[derive(Debug, Clone, PartialEq)]
pub struct Linear {
    /// `[out, in]`.
    pub w: Mat,
    /// `[out]`.
    pub bias: Option<Vec<f32>>,
}

/// An expert projection, dense or MXFP4 (`[out, in]` either way).
#[derive(Debug, Clone, PartialEq)]
pub enum ExpertMat {
    Dense(Mat),
    Mxfp4(fp4::MxMatrix),
}

impl ExpertMat {
    pub fn rows(&self) -> usize {
        match self {
            ExpertMat::Dense(m) => m.rows,
            ExpertMat::Mxfp4(m) => m.rows,
        }
    }
    pub fn cols(&self) -> usize {
        match self {
            ExpertMat::Dense(m) => m.cols,
            ExpertMat::Mxfp4(m) => m.k,
        }
    }
}

/// How the `2·I` rows of a gate/up projection are ordered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GateUpLayout {
    /// Row 2j = gate j, row 2j+1 = up j (gpt-oss).
    Interleaved,
    /// Rows 0..I = gate, I..2I = up (Qwen3-MoE, MiMo, dense MLPs).
    Halves,
}

/// One routed expert.
#[derive(Debug, Clone, PartialEq)]
pub struct Expert {
    /// `[2I, H]`, ordered per [`Moe::gate_up_layout`].
    pub gate_up: ExpertMat,
    /// `[2I]` (gpt-oss only).
    pub gate_up_bias: Option<Vec<f32>>,
    /// `[H, I]`.
    pub down: ExpertMat,
    /// `[H]` (gpt-oss only).
    pub down_bias: Option<Vec<f32>>,
}

/// A mixture-of-experts block.
#[derive(Debug, Clone, PartialEq)]
pub struct Moe {
    /// `[E, H]` (+ `[E]` bias for gpt-oss).
    pub router: Linear,
    /// `[E]`: the selection-only bias of sigmoid routers (MiMo `e_score_correction_bias`).
    pub correction_bias: Option<Vec<f32>>,
    pub experts: Vec<Expert>,
    pub gate_up_layout: GateUpLayout,
}

/// The feed-forward part of a layer.
#[derive(Debug, Clone, PartialEq)]
pub enum Mlp {
    /// A dense SwiGLU MLP (MiMo layer 0): `gate_up` `[2I, H]` in [`GateUpLayout::Halves`] order,
    /// `down` `[H, I]`.
    Dense {
        gate_up: Linear,
        down: Linear,
    },
    Moe(Moe),
}

/// One attention block.
#[derive(Debug, Clone, PartialEq)]
pub struct Attention {
    /// `[heads·head_dim, H]`.
    pub q: Linear,
    /// `[kv_heads·head_dim, H]`.
    pub k: Linear,
    /// `[kv_heads·v_head_dim, H]`.
    pub v: Linear,
    /// `[H, heads·v_head_dim]`.
    pub o: Linear,
    /// `[head_dim]` RMSNorm weights applied per head before RoPE (Qwen3-MoE).
    pub q_norm: Option<Vec<f32>>,
    pub k_norm: Option<Vec<f32>>,
    /// `[heads]` attention-sink logits (gpt-oss all layers, MiMo sliding layers).
    pub sinks: Option<Vec<f32>>,
}

/// One decoder layer (pre-norm: `x += attn(norm(x)); x += mlp(norm(x))`).
#[derive(Debug, Clone, PartialEq)]
pub struct Layer {
    pub input_norm: Vec<f32>,
    pub attn: Attention,
    pub post_attn_norm: Vec<f32>,
    pub mlp: Mlp,
}

/// A whole model's weights.
#[derive(Debug, Clone, PartialEq)]
pub struct Weights {
    /// `[V, H]`.
    pub embed: Mat,
    pub layers: Vec<Layer>,
    /// `[H]`.
    pub final_norm: Vec<f32>,
    /// `[V, H]` (a copy of `embed` when the embeddings are tied).
    pub lm_head: Mat,
}
