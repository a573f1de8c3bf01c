//! The normalized model configuration: one description of gpt-oss, Qwen3-MoE and MiMo-V2-Flash
//! whatever spelling their `config.json` uses (transformers-5 or the released Hub files).
//!
//! The types here are the contract between the loader and every executor. The parsing
//! (`ModelConfig::from_json` and friends) lives below them.

/// Which architecture family (and therefore which tensor names and block math).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Arch {
    GptOss,
    Qwen3Moe,
    MiMoV2Flash,
}

/// The attention pattern of one layer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AttnKind {
    Full,
    /// Key j is visible from query i iff `i − window < j ≤ i`: `window` keys including the query
    /// (transformers' convention; MiMo's Hub `sliding_window_size` s means window s + 1 there).
    Sliding { window: usize },
}

/// YaRN parameters (transformers `_compute_yarn_parameters`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Yarn {
    pub factor: f64,
    pub beta_fast: f64,
    pub beta_slow: f64,
    pub original_max_position_embeddings: usize,
    /// Round the correction range to integers (transformers' default true; gpt-oss false).
    pub truncate: bool,
    /// Multiplies cos and sin; default `0.1·ln(factor) + 1`.
    pub attention_factor: f64,
}

/// Rotary embedding of one layer: NeoX "half split" rotation of the first `rotary_dim` dims of
/// each q/k head (partial RoPE when `rotary_dim < head_dim`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Rope {
    pub theta: f64,
    pub rotary_dim: usize,
    pub yarn: Option<Yarn>,
}

/// Everything the attention of one layer needs.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LayerSpec {
    pub attn: AttnKind,
    pub n_heads: usize,
    pub n_kv_heads: usize,
    /// q/k head dimension.
    pub head_dim: usize,
    /// v head dimension (MiMo: 128 with head_dim 192).
    pub v_head_dim: usize,
    pub rope: Rope,
    /// A learned sink logit per head.
    pub sinks: bool,
    /// RMSNorm over head_dim on q and k before RoPE (Qwen3-MoE).
    pub qk_norm: bool,
    /// Biases on q, k, v and o (gpt-oss).
    pub attn_bias: bool,
    /// MoE feed-forward (else the dense MLP of `dense_intermediate_size`).
    pub moe: bool,
}

/// The routing variant (implemented in the `moe` crate).
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum RouterSpec {
    /// Top-k on the (biased) logits, softmax over the k.
    GptOss,
    /// Softmax over all experts, top-k, optional renormalization.
    Qwen3 { norm_topk_prob: bool },
    /// Sigmoid scores; selection on score + correction bias (if any); optional groups; weights
    /// from the unbiased scores, renormalized if asked, times the scaling factor.
    Sigmoid {
        n_group: usize,
        topk_group: usize,
        norm_topk_prob: bool,
        routed_scaling_factor: f32,
    },
}

/// The expert (and dense MLP) activation.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Activation {
    /// gpt-oss: gate = min(gate, limit), up = clamp(up, −limit, limit),
    /// out = (up + 1) · gate · sigmoid(alpha · gate).
    ClampedSwiglu { alpha: f32, limit: f32 },
    /// SwiGLU: silu(gate) · up.
    Swiglu,
}

/// A normalized configuration.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelConfig {
    pub arch: Arch,
    pub vocab_size: usize,
    pub hidden_size: usize,
    /// One entry per decoder layer.
    pub layers: Vec<LayerSpec>,
    pub rms_norm_eps: f32,
    /// Routed experts per MoE layer.
    pub n_experts: usize,
    /// Experts per token.
    pub top_k: usize,
    /// Expert intermediate size I.
    pub moe_intermediate_size: usize,
    /// Intermediate size of dense MLP layers, if any layer is dense.
    pub dense_intermediate_size: Option<usize>,
    pub router: RouterSpec,
    pub activation: Activation,
    /// v ← v · value_scale before attention (MiMo `attention_value_scale`; 1 otherwise).
    pub value_scale: f32,
    pub tie_word_embeddings: bool,
    pub max_position_embeddings: usize,
    pub bos_token_id: Option<u32>,
    /// Tokens that end generation (config `eos_token_id`, merged with `generation_config.json`).
    pub eos_token_ids: Vec<u32>,
    pub pad_token_id: Option<u32>,
}
