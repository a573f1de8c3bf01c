//! The normalized model configuration: one description of gpt-oss, Qwen3-MoE, MiMo-V2-Flash and
//! MiMo-V2.5 / V2.5-Pro (`mimo_v2`) whatever spelling their `config.json` uses (transformers-5 or
//! the released Hub files).
//!
//! The types here are the contract between the loader and every executor. The parsing
//! (`ModelConfig::from_json_str`, `ModelConfig::from_dir` and friends) lives below them.

/// Which architecture family (and therefore which tensor names and block math).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Arch {
    GptOss,
    Qwen3Moe,
    MiMoV2Flash,
    /// `model_type: mimo_v2` (MiMo-V2.5, V2.5-Pro, V2.6, the FP4-DFlash checkpoint): the
    /// MiMo-V2-Flash math with equal KV heads on full and sliding layers by default, a fused
    /// KV-head-grouped `qkv_proj` and per-expert MXFP4 experts (see [`crate::mimo`]).
    MiMoV2,
}

impl Arch {
    /// MiMo-V2-Flash or `mimo_v2`: the same block math.
    pub fn is_mimo(self) -> bool {
        matches!(self, Arch::MiMoV2Flash | Arch::MiMoV2)
    }
}

/// The attention pattern of one layer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AttnKind {
    Full,
    /// Key j is visible from query i iff `i − window < j ≤ i`: `window` keys including the query
    /// (transformers' convention; MiMo's Hub `sliding_window_size` s means window s + 1 there).
    Sliding {
        window: usize,
    },
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

impl Yarn {
    /// The YaRN of the released gpt-oss checkpoints (and transformers' `GptOssConfig` default):
    /// factor 32, β_fast 32, β_slow 1, original context 4096, no truncation, attention factor
    /// 0.1·ln(32) + 1.
    pub fn gpt_oss() -> Yarn {
        Yarn {
            factor: 32.0,
            beta_fast: 32.0,
            beta_slow: 1.0,
            original_max_position_embeddings: 4096,
            truncate: false,
            attention_factor: 0.1 * 32f64.ln() + 1.0,
        }
    }
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

// ---------------------------------------------------------------------------------------------
// Parsing
// ---------------------------------------------------------------------------------------------

use std::path::Path;

use serde_json::{Map, Value};

/// Sanity limit on `num_hidden_layers` (real models: ≤ 100). Guards allocations against
/// corrupt or hostile configs.
pub const MAX_LAYERS: usize = 4096;
/// Sanity limit on the number of routed experts (real models: ≤ 384).
pub const MAX_EXPERTS: usize = 1 << 16;
/// Sanity limit on every other dimension (vocab, hidden, intermediate, heads, head dims,
/// window, positions).
pub const MAX_DIM: usize = 1 << 26;

/// What is wrong with a configuration. Every variant names the offending field (dotted path for
/// nested keys, e.g. `rope_parameters.sliding_attention.rope_theta`) or file.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    /// A file could not be read.
    #[error("{path}: {message}")]
    Io { path: String, message: String },
    /// A file is not valid JSON (or not a JSON object).
    #[error("{file}: invalid JSON: {message}")]
    Json { file: String, message: String },
    /// A required field is absent (or null).
    #[error("missing field `{field}`")]
    Missing { field: String },
    /// A field has the wrong type, an out-of-range value, or disagrees with another field.
    #[error("field `{field}`: {reason}")]
    Invalid { field: String, reason: String },
    /// `model_type` (or `architectures`) names no supported architecture.
    #[error(
        "unknown model_type {model_type:?} (supported: gpt_oss, qwen3_moe, mimo_v2_flash, mimo_v2 \
         and their architectures GptOssForCausalLM, Qwen3MoeForCausalLM, MiMoV2FlashForCausalLM, \
         MiMoV2ForCausalLM)"
    )]
    UnknownModelType { model_type: String },
    /// A well-formed value this engine does not implement (e.g. `rope_type: llama3`).
    #[error("field `{field}`: unsupported: {reason}")]
    Unsupported { field: String, reason: String },
}

impl ConfigError {
    /// The field (or file) the error is about.
    pub fn field(&self) -> &str {
        match self {
            ConfigError::Io { path, .. } => path,
            ConfigError::Json { file, .. } => file,
            ConfigError::Missing { field }
            | ConfigError::Invalid { field, .. }
            | ConfigError::Unsupported { field, .. } => field,
            ConfigError::UnknownModelType { .. } => "model_type",
        }
    }
}

/// A config parsing result.
pub type CResult<T> = Result<T, ConfigError>;

/// How the checkpoint's weights are quantized (`quantization_config`).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum Quantization {
    /// No `quantization_config`: plain bf16 / f16 / f32 tensors.
    #[default]
    None,
    /// `quant_method: mxfp4` (gpt-oss release): experts as `*_blocks` / `*_scales` U8 pairs.
    Mxfp4 {
        /// `modules_to_not_convert` (informational; the loader decides per tensor by what the
        /// checkpoint holds).
        modules_to_not_convert: Vec<String>,
    },
    /// `quant_method: fp8` (block-scaled e4m3 with `weight_scale_inv`; `fmt` must be `e4m3` and
    /// `activation_scheme` `dynamic` when given — Ultra keeps activations in f32, i.e. runs the
    /// dequantized weights exactly, as the BF16 conversions of these checkpoints do).
    Fp8 {
        /// `weight_block_size` `[rows, cols]` of one scale block (default `[128, 128]`).
        weight_block_size: [usize; 2],
        /// `store_dtype: mxfp4` (+ `mxfp4_block_size: 32`): the routed experts are MXFP4
        /// (MiMo's FP4 checkpoints: per-expert U8 `weight` + E8M0 `weight_scale`).
        mxfp4_experts: bool,
        /// `ignored_layers`: modules kept in higher precision (informational: the loader
        /// decides per tensor by the dtype the checkpoint holds).
        ignored_layers: Vec<String>,
    },
}

impl Quantization {
    /// Parses the `quantization_config` of a `config.json` text ([`Quantization::None`] if absent).
    pub fn from_json_str(s: &str) -> Result<Quantization, ConfigError> {
        let v = parse_json(s, "config.json")?;
        let o = root_obj(&v, "config.json")?;
        Self::parse(&o)
    }

    /// The FP8 block size (`[128, 128]` unless `quantization_config` says otherwise).
    pub fn fp8_block(&self) -> [usize; 2] {
        match self {
            Quantization::Fp8 {
                weight_block_size, ..
            } => *weight_block_size,
            _ => [128, 128],
        }
    }

    fn parse(o: &Obj<'_>) -> CResult<Quantization> {
        let Some(q) = o.obj("quantization_config")? else {
            return Ok(Quantization::None);
        };
        let method = q
            .str("quant_method")?
            .ok_or_else(|| q.missing("quant_method"))?;
        match method {
            "mxfp4" => {
                let mut modules = Vec::new();
                if let Some(list) = q.arr("modules_to_not_convert")? {
                    for (i, m) in list.iter().enumerate() {
                        let s = m.as_str().ok_or_else(|| {
                            q.invalid(
                                &format!("modules_to_not_convert[{i}]"),
                                format!("expected a string, got {}", short(m)),
                            )
                        })?;
                        modules.push(s.to_string());
                    }
                }
                Ok(Quantization::Mxfp4 {
                    modules_to_not_convert: modules,
                })
            }
            "fp8" => {
                if let Some(fmt) = q.str("fmt")? {
                    if fmt != "e4m3" {
                        return Err(
                            q.unsupported("fmt", format!("FP8 format {fmt:?} (supported: e4m3)"))
                        );
                    }
                }
                if let Some(a) = q.str("activation_scheme")? {
                    if a != "dynamic" {
                        return Err(q.unsupported(
                            "activation_scheme",
                            format!("{a:?} (supported: dynamic)"),
                        ));
                    }
                }
                let mxfp4_experts = match q.str("store_dtype")? {
                    None => false,
                    Some("mxfp4") => true,
                    Some(other) => {
                        return Err(
                            q.unsupported("store_dtype", format!("{other:?} (supported: mxfp4)"))
                        )
                    }
                };
                if let Some(b) = q.usize("mxfp4_block_size")? {
                    if b != fp4::BLOCK {
                        return Err(q.unsupported(
                            "mxfp4_block_size",
                            format!("{b} (MXFP4 blocks are {} values)", fp4::BLOCK),
                        ));
                    }
                }
                let mut ignored_layers = Vec::new();
                if let Some(list) = q.arr("ignored_layers")? {
                    for (i, m) in list.iter().enumerate() {
                        let s = m.as_str().ok_or_else(|| {
                            q.invalid(
                                &format!("ignored_layers[{i}]"),
                                format!("expected a string, got {}", short(m)),
                            )
                        })?;
                        ignored_layers.push(s.to_string());
                    }
                }
                let mut block = [128usize, 128];
                if let Some(list) = q.arr("weight_block_size")? {
                    let f = q.name("weight_block_size");
                    if list.len() != 2 {
                        return Err(ConfigError::Invalid {
                            field: f,
                            reason: format!("expected [rows, cols], got {} entries", list.len()),
                        });
                    }
                    for (i, v) in list.iter().enumerate() {
                        block[i] =
                            as_usize(v)
                                .filter(|&b| b > 0 && b <= MAX_DIM)
                                .ok_or_else(|| ConfigError::Invalid {
                                    field: f.clone(),
                                    reason: format!("expected positive integers, got {}", short(v)),
                                })?;
                    }
                }
                Ok(Quantization::Fp8 {
                    weight_block_size: block,
                    mxfp4_experts,
                    ignored_layers,
                })
            }
            other => Err(ConfigError::Unsupported {
                field: q.name("quant_method"),
                reason: format!("quantization method {other:?} (supported: mxfp4, fp8)"),
            }),
        }
    }
}

impl ModelConfig {
    /// Parses a `config.json` text (either spelling: transformers-5 `save_pretrained` or the
    /// released Hub files). Never panics; every inconsistency is a [`ConfigError`] naming the
    /// field.
    ///
    /// Spellings accepted (first = transformers-5, then the Hub/legacy aliases):
    /// * arch: `model_type` ∈ {`gpt_oss`, `qwen3_moe`, `mimo_v2_flash`, `mimo_v2`}, else
    ///   `architectures` ∈ {`GptOssForCausalLM`, `Qwen3MoeForCausalLM`, `MiMoV2FlashForCausalLM`,
    ///   `MiMoV2ForCausalLM`};
    /// * experts: `num_local_experts` | `num_experts` | `n_routed_experts`; top-k:
    ///   `num_experts_per_tok` | `experts_per_token` (aliases present together must agree);
    /// * `rms_norm_eps` | `layernorm_epsilon`;
    /// * attention pattern: `layer_types` | `hybrid_layer_pattern` (1 = sliding);
    /// * MLP pattern: `mlp_layer_types` | `moe_layer_freq` (list of 0/1, or DeepSeek's integer
    ///   frequency) | `first_k_dense_replace` | `mlp_only_layers` + `decoder_sparse_step`;
    /// * RoPE: `rope_parameters` (flat, or keyed by layer type for MiMo) | `rope_theta` +
    ///   `rope_scaling` (+ MiMo `swa_rope_theta`, `partial_rotary_factor`; the Hub `rope_scaling`
    ///   applies to MiMo's full-attention layers only, as in transformers' converter);
    /// * window: `sliding_window`, or MiMo's Hub `sliding_window_size` s, which becomes
    ///   `AttnKind::Sliding { window: s + 1 }` (transformers' native MiMo attends to s previous
    ///   tokens plus the query; vLLM uses s — see research/models.md §2.1). `sliding_window_size`
    ///   wins over `sliding_window` when both are present.
    ///
    /// Defaults for absent optional fields are those of the transformers 5.x config classes
    /// (e.g. gpt-oss `head_dim` 64, `swiglu_alpha` 1.702, `swiglu_limit` 7, YaRN
    /// factor 32 / β 32, 1 / truncate false when no RoPE fields at all; Qwen3 `norm_topk_prob`
    /// false, θ 10000; MiMo θ 5e6 full / 1e4 sliding, partial rotary 0.334, value scale 0.707,
    /// SWA KV heads = 2 × full, sinks on sliding layers only). `mimo_v2` has no defaults for the
    /// fields its sources dispute and equal KV heads by default ([`crate::mimo`]).
    pub fn from_json_str(s: &str) -> Result<ModelConfig, ConfigError> {
        let v = parse_json(s, "config.json")?;
        let o = root_obj(&v, "config.json")?;
        parse_model(&o)
    }

    /// Reads `dir/config.json` and, if present, `dir/generation_config.json` (its
    /// `eos_token_id`s are appended to [`ModelConfig::eos_token_ids`]; its bos/pad ids fill
    /// absent ones).
    pub fn from_dir(dir: &Path) -> Result<ModelConfig, ConfigError> {
        let path = dir.join("config.json");
        let text = read_text(&path)?;
        let mut cfg = ModelConfig::from_json_str(&text).map_err(|e| match e {
            ConfigError::Json { message, .. } => ConfigError::Json {
                file: path.display().to_string(),
                message,
            },
            other => other,
        })?;
        let gen_path = dir.join("generation_config.json");
        if gen_path.is_file() {
            let text = read_text(&gen_path)?;
            cfg.merge_generation_config(&text).map_err(|e| match e {
                ConfigError::Json { message, .. } => ConfigError::Json {
                    file: gen_path.display().to_string(),
                    message,
                },
                ConfigError::Invalid { field, reason } => ConfigError::Invalid {
                    field: format!("generation_config.json: {field}"),
                    reason,
                },
                other => other,
            })?;
        }
        Ok(cfg)
    }

    /// Merges a `generation_config.json` text: its `eos_token_id` (int or list) is appended to
    /// the eos list (without duplicates); `bos_token_id` / `pad_token_id` fill absent ones.
    pub fn merge_generation_config(&mut self, s: &str) -> Result<(), ConfigError> {
        let v = parse_json(s, "generation_config.json")?;
        let o = root_obj(&v, "generation_config.json")?;
        for id in o.token_ids("eos_token_id")? {
            if !self.eos_token_ids.contains(&id) {
                self.eos_token_ids.push(id);
            }
        }
        if self.bos_token_id.is_none() {
            self.bos_token_id = o.token_id("bos_token_id")?;
        }
        if self.pad_token_id.is_none() {
            self.pad_token_id = o.token_id("pad_token_id")?;
        }
        Ok(())
    }

    /// Number of decoder layers.
    pub fn num_layers(&self) -> usize {
        self.layers.len()
    }

    /// Whether layer `l` is an MoE layer (false out of range).
    pub fn is_moe(&self, l: usize) -> bool {
        self.layers.get(l).is_some_and(|s| s.moe)
    }
}

fn read_text(path: &Path) -> CResult<String> {
    std::fs::read_to_string(path).map_err(|e| ConfigError::Io {
        path: path.display().to_string(),
        message: e.to_string(),
    })
}

fn parse_json(s: &str, file: &str) -> CResult<Value> {
    serde_json::from_str(s).map_err(|e| ConfigError::Json {
        file: file.to_string(),
        message: e.to_string(),
    })
}

fn root_obj<'a>(v: &'a Value, file: &str) -> CResult<Obj<'a>> {
    match v.as_object() {
        Some(map) => Ok(Obj {
            map,
            path: String::new(),
        }),
        None => Err(ConfigError::Json {
            file: file.to_string(),
            message: "top level is not a JSON object".into(),
        }),
    }
}

/// A short rendering of a JSON value for error messages.
fn short(v: &Value) -> String {
    let s = v.to_string();
    if s.chars().count() > 60 {
        let t: String = s.chars().take(57).collect();
        format!("{t}...")
    } else {
        s
    }
}

/// A JSON number as a non-negative integer (integral floats such as `4096.0` included).
pub fn as_usize(v: &Value) -> Option<usize> {
    if let Some(u) = v.as_u64() {
        return usize::try_from(u).ok();
    }
    // Integral floats (`4096.0`) are accepted.
    let f = v.as_f64()?;
    if f.is_finite() && f >= 0.0 && f.fract() == 0.0 && f < 9.0e15 {
        Some(f as usize)
    } else {
        None
    }
}

/// A JSON object with the dotted path it was reached by, and typed readers whose errors name
/// the field. Shared by every config parser of the workspace (model configs here, drafter
/// configs in `dflash`).
#[derive(Clone)]
pub struct Obj<'a> {
    map: &'a Map<String, Value>,
    path: String,
}

impl<'a> Obj<'a> {
    /// The top-level object of a config file.
    pub fn root(map: &'a Map<String, Value>) -> Obj<'a> {
        Obj {
            map,
            path: String::new(),
        }
    }
    pub fn name(&self, key: &str) -> String {
        if self.path.is_empty() {
            key.to_string()
        } else {
            format!("{}.{key}", self.path)
        }
    }
    pub fn missing(&self, key: &str) -> ConfigError {
        ConfigError::Missing {
            field: self.name(key),
        }
    }
    pub fn invalid(&self, key: &str, reason: impl Into<String>) -> ConfigError {
        ConfigError::Invalid {
            field: self.name(key),
            reason: reason.into(),
        }
    }
    pub fn unsupported(&self, key: &str, reason: impl Into<String>) -> ConfigError {
        ConfigError::Unsupported {
            field: self.name(key),
            reason: reason.into(),
        }
    }
    /// The value, treating JSON `null` as absent.
    pub fn raw(&self, key: &str) -> Option<&'a Value> {
        self.map.get(key).filter(|v| !v.is_null())
    }
    pub fn has(&self, key: &str) -> bool {
        self.raw(key).is_some()
    }
    pub fn usize(&self, key: &str) -> CResult<Option<usize>> {
        match self.raw(key) {
            None => Ok(None),
            Some(v) => as_usize(v).map(Some).ok_or_else(|| {
                self.invalid(
                    key,
                    format!("expected a non-negative integer, got {}", short(v)),
                )
            }),
        }
    }
    /// A dimension: positive and at most `max`.
    pub fn dim_opt(&self, key: &str, max: usize) -> CResult<Option<usize>> {
        match self.usize(key)? {
            None => Ok(None),
            Some(0) => Err(self.invalid(key, "must be positive")),
            Some(d) if d > max => Err(self.invalid(key, format!("{d} exceeds the limit {max}"))),
            Some(d) => Ok(Some(d)),
        }
    }
    pub fn dim(&self, key: &str, max: usize) -> CResult<usize> {
        self.dim_opt(key, max)?.ok_or_else(|| self.missing(key))
    }
    pub fn f64(&self, key: &str) -> CResult<Option<f64>> {
        match self.raw(key) {
            None => Ok(None),
            Some(v) => match v.as_f64() {
                Some(f) if f.is_finite() => Ok(Some(f)),
                _ => Err(self.invalid(key, format!("expected a finite number, got {}", short(v)))),
            },
        }
    }
    pub fn bool(&self, key: &str) -> CResult<Option<bool>> {
        match self.raw(key) {
            None => Ok(None),
            Some(Value::Bool(b)) => Ok(Some(*b)),
            Some(v) => Err(self.invalid(key, format!("expected true or false, got {}", short(v)))),
        }
    }
    pub fn str(&self, key: &str) -> CResult<Option<&'a str>> {
        match self.raw(key) {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(s)),
            Some(v) => Err(self.invalid(key, format!("expected a string, got {}", short(v)))),
        }
    }
    pub fn arr(&self, key: &str) -> CResult<Option<&'a Vec<Value>>> {
        match self.raw(key) {
            None => Ok(None),
            Some(Value::Array(a)) => Ok(Some(a)),
            Some(v) => Err(self.invalid(key, format!("expected a list, got {}", short(v)))),
        }
    }
    pub fn obj(&self, key: &str) -> CResult<Option<Obj<'a>>> {
        match self.raw(key) {
            None => Ok(None),
            Some(Value::Object(map)) => Ok(Some(Obj {
                map,
                path: self.name(key),
            })),
            Some(v) => Err(self.invalid(key, format!("expected an object, got {}", short(v)))),
        }
    }
    /// The first present of several alias keys; all present ones must agree.
    pub fn alias<T: PartialEq + Copy + std::fmt::Debug>(
        &self,
        keys: &[&str],
        get: impl Fn(&Self, &str) -> CResult<Option<T>>,
    ) -> CResult<Option<T>> {
        let mut found: Option<(T, &str)> = None;
        for &k in keys {
            if let Some(v) = get(self, k)? {
                match found {
                    None => found = Some((v, k)),
                    Some((w, wk)) if w != v => {
                        return Err(self.invalid(
                            k,
                            format!("{v:?} disagrees with `{}` = {w:?}", self.name(wk)),
                        ))
                    }
                    Some(_) => {}
                }
            }
        }
        Ok(found.map(|(v, _)| v))
    }
    pub fn token_id(&self, key: &str) -> CResult<Option<u32>> {
        match self.raw(key) {
            None => Ok(None),
            Some(v) => as_usize(v)
                .and_then(|u| u32::try_from(u).ok())
                .map(Some)
                .ok_or_else(|| self.invalid(key, format!("expected a token id, got {}", short(v)))),
        }
    }
    /// An id or a list of ids.
    pub fn token_ids(&self, key: &str) -> CResult<Vec<u32>> {
        match self.raw(key) {
            None => Ok(Vec::new()),
            Some(Value::Array(a)) => {
                let mut out = Vec::with_capacity(a.len());
                for (i, v) in a.iter().enumerate() {
                    let id = as_usize(v)
                        .and_then(|u| u32::try_from(u).ok())
                        .ok_or_else(|| {
                            self.invalid(
                                &format!("{key}[{i}]"),
                                format!("expected a token id, got {}", short(v)),
                            )
                        })?;
                    if !out.contains(&id) {
                        out.push(id);
                    }
                }
                Ok(out)
            }
            Some(_) => Ok(self.token_id(key)?.into_iter().collect()),
        }
    }
}

/// The architecture an `architectures` entry names, if supported.
fn arch_of_class(name: &str) -> Option<Arch> {
    match name {
        "GptOssForCausalLM" => Some(Arch::GptOss),
        "Qwen3MoeForCausalLM" => Some(Arch::Qwen3Moe),
        "MiMoV2FlashForCausalLM" => Some(Arch::MiMoV2Flash),
        "MiMoV2ForCausalLM" => Some(Arch::MiMoV2),
        _ => None,
    }
}

fn detect_arch(o: &Obj<'_>) -> CResult<Arch> {
    if let Some(mt) = o.str("model_type")? {
        let arch = match mt {
            "gpt_oss" => Arch::GptOss,
            "qwen3_moe" => Arch::Qwen3Moe,
            "mimo_v2_flash" => Arch::MiMoV2Flash,
            "mimo_v2" => Arch::MiMoV2,
            other => {
                return Err(ConfigError::UnknownModelType {
                    model_type: other.to_string(),
                })
            }
        };
        // A supported class in `architectures` that names another architecture (e.g. a
        // `mimo_v2` config with `MiMoV2FlashForCausalLM`: the two differ in their q/k/v
        // tensors and KV-head defaults) leaves the layout ambiguous.
        if let Some(archs) = o.arr("architectures")? {
            if let Some(other) = archs
                .iter()
                .filter_map(|a| a.as_str().and_then(arch_of_class))
                .find(|&a| a != arch)
            {
                return Err(o.invalid(
                    "model_type",
                    format!("{mt:?} disagrees with `architectures` naming {other:?}"),
                ));
            }
        }
        return Ok(arch);
    }
    if let Some(archs) = o.arr("architectures")? {
        let mut names = Vec::new();
        for a in archs {
            match a.as_str() {
                Some(s) => match arch_of_class(s) {
                    Some(arch) => return Ok(arch),
                    None => names.push(s.to_string()),
                },
                None => names.push(short(a)),
            }
        }
        return Err(ConfigError::UnknownModelType {
            model_type: format!("architectures {names:?}"),
        });
    }
    Err(o.missing("model_type"))
}

/// Per-layer attention pattern: `true` = sliding.
/// A per-layer list under `key` (one entry per decoder layer), each entry decoded to a flag by
/// `decode`; `expected` describes the accepted entries for the error message.
fn layer_flags(
    o: &Obj<'_>,
    key: &str,
    n: usize,
    expected: &str,
    decode: impl Fn(&Value) -> Option<bool>,
) -> CResult<Option<Vec<bool>>> {
    let Some(list) = o.arr(key)? else {
        return Ok(None);
    };
    if list.len() != n {
        return Err(o.invalid(
            key,
            format!("has {} entries but num_hidden_layers = {n}", list.len()),
        ));
    }
    list.iter()
        .enumerate()
        .map(|(i, t)| {
            decode(t).ok_or_else(|| {
                o.invalid(
                    &format!("{key}[{i}]"),
                    format!("expected {expected}, got {}", short(t)),
                )
            })
        })
        .collect::<CResult<Vec<bool>>>()
        .map(Some)
}

fn attention_pattern(o: &Obj<'_>, arch: Arch, n: usize) -> CResult<Vec<bool>> {
    let from_types = layer_flags(
        o,
        "layer_types",
        n,
        "\"full_attention\" or \"sliding_attention\"",
        |t| match t.as_str() {
            Some("full_attention") => Some(false),
            Some("sliding_attention") => Some(true),
            _ => None,
        },
    )?;
    let from_pattern = layer_flags(
        o,
        "hybrid_layer_pattern",
        n,
        "0 (full) or 1 (sliding)",
        |t| match as_usize(t) {
            Some(0) => Some(false),
            Some(1) => Some(true),
            _ => None,
        },
    )?;
    match (from_types, from_pattern) {
        (Some(a), Some(b)) if a != b => Err(o.invalid(
            "hybrid_layer_pattern",
            "disagrees with `layer_types`".to_string(),
        )),
        (Some(a), _) | (None, Some(a)) => Ok(a),
        (None, None) => Ok(match arch {
            // transformers: sliding, full, sliding, full, ...
            Arch::GptOss => (0..n).map(|i| i.is_multiple_of(2)).collect(),
            Arch::Qwen3Moe => {
                if o.bool("use_sliding_window")? == Some(true) {
                    return Err(o.unsupported(
                        "use_sliding_window",
                        "Qwen3-MoE sliding-window attention without an explicit `layer_types`",
                    ));
                }
                vec![false; n]
            }
            // mimo_v2 releases always list their pattern (V2.5-Pro's is irregular).
            Arch::MiMoV2 => return Err(o.missing("hybrid_layer_pattern")),
            // Full at layer 0 and every 6th layer.
            Arch::MiMoV2Flash => (0..n)
                .map(|i| !(i == 0 || (i + 1).is_multiple_of(6)))
                .collect(),
        }),
    }
}

/// Per-layer MLP kind: `true` = MoE. Every spelling present is evaluated and they must agree.
fn mlp_pattern(o: &Obj<'_>, arch: Arch, n: usize) -> CResult<Vec<bool>> {
    let mut candidates: Vec<(String, Vec<bool>)> = Vec::new();
    if let Some(v) = layer_flags(
        o,
        "mlp_layer_types",
        n,
        "\"dense\" or \"sparse\"",
        |t| match t.as_str() {
            Some("sparse") | Some("moe") => Some(true),
            Some("dense") => Some(false),
            _ => None,
        },
    )? {
        candidates.push(("mlp_layer_types".into(), v));
    }
    let first_k = o.usize("first_k_dense_replace")?;
    match o.raw("moe_layer_freq") {
        None => {
            if let Some(k) = first_k {
                candidates.push((
                    "first_k_dense_replace".into(),
                    (0..n).map(|i| i >= k).collect(),
                ));
            }
        }
        Some(Value::Array(_)) => {
            if let Some(v) =
                layer_flags(
                    o,
                    "moe_layer_freq",
                    n,
                    "0 (dense) or 1 (MoE)",
                    |t| match as_usize(t) {
                        Some(0) => Some(false),
                        Some(1) => Some(true),
                        _ => None,
                    },
                )?
            {
                candidates.push(("moe_layer_freq".into(), v));
            }
            if let Some(k) = first_k {
                candidates.push((
                    "first_k_dense_replace".into(),
                    (0..n).map(|i| i >= k).collect(),
                ));
            }
        }
        Some(_) => {
            // DeepSeek style: an integer frequency, combined with first_k_dense_replace.
            let f = o.dim("moe_layer_freq", MAX_LAYERS)?;
            let k = first_k.unwrap_or(0);
            candidates.push((
                "moe_layer_freq".into(),
                (0..n).map(|i| i >= k && i.is_multiple_of(f)).collect(),
            ));
        }
    }
    if o.has("mlp_only_layers") || o.has("decoder_sparse_step") {
        let step = o.usize("decoder_sparse_step")?.unwrap_or(1);
        if step == 0 {
            return Err(o.invalid("decoder_sparse_step", "must be positive"));
        }
        let mut dense = vec![false; n];
        if let Some(list) = o.arr("mlp_only_layers")? {
            for (i, t) in list.iter().enumerate() {
                match as_usize(t) {
                    Some(l) if l < n => dense[l] = true,
                    _ => {
                        return Err(o.invalid(
                            &format!("mlp_only_layers[{i}]"),
                            format!("expected a layer index < {n}, got {}", short(t)),
                        ))
                    }
                }
            }
        }
        let v = (0..n)
            .map(|i| !dense[i] && (i + 1).is_multiple_of(step))
            .collect();
        candidates.push(("mlp_only_layers".into(), v));
    }
    if let Some((first_name, first)) = candidates.first() {
        for (name, v) in &candidates[1..] {
            if v != first {
                return Err(o.invalid(name, format!("disagrees with `{first_name}`")));
            }
        }
        return Ok(first.clone());
    }
    Ok(match arch {
        Arch::GptOss | Arch::Qwen3Moe => vec![true; n],
        Arch::MiMoV2Flash => (0..n).map(|i| i != 0).collect(),
        // vLLM's mimo_v2 reads an absent moe_layer_freq as all dense, the Flash class as
        // "layer 0 dense": the sources disagree, so the config must say.
        Arch::MiMoV2 => return Err(o.missing("moe_layer_freq")),
    })
}

/// YaRN from a rope parameter object (`rope_parameters` or legacy `rope_scaling`), with
/// transformers' defaults; `root` supplies a top-level `original_max_position_embeddings`.
pub fn parse_yarn(p: &Obj<'_>, root: &Obj<'_>, max_pos: usize) -> CResult<Yarn> {
    let orig = match p.dim_opt("original_max_position_embeddings", MAX_DIM)? {
        Some(v) => v,
        None => root
            .dim_opt("original_max_position_embeddings", MAX_DIM)?
            .unwrap_or(max_pos),
    };
    let factor = match p.f64("factor")? {
        Some(f) => f,
        None => max_pos as f64 / orig as f64,
    };
    if factor.partial_cmp(&0.0) != Some(std::cmp::Ordering::Greater) {
        return Err(p.invalid("factor", format!("must be positive, got {factor}")));
    }
    // transformers uses `x or default`, so 0 means the default too.
    let beta_fast = p.f64("beta_fast")?.filter(|&b| b != 0.0).unwrap_or(32.0);
    let beta_slow = p.f64("beta_slow")?.filter(|&b| b != 0.0).unwrap_or(1.0);
    if beta_fast <= 0.0 || beta_slow <= 0.0 {
        return Err(p.invalid("beta_fast", "beta_fast and beta_slow must be positive"));
    }
    let truncate = p.bool("truncate")?.unwrap_or(true);
    let mscale = |s: f64, m: f64| {
        if s <= 1.0 {
            1.0
        } else {
            0.1 * m * s.ln() + 1.0
        }
    };
    let attention_factor = match p.f64("attention_factor")? {
        Some(a) => a,
        None => match (p.f64("mscale")?, p.f64("mscale_all_dim")?) {
            (Some(m), Some(ma)) if m != 0.0 && ma != 0.0 => mscale(factor, m) / mscale(factor, ma),
            _ => mscale(factor, 1.0),
        },
    };
    if !attention_factor.is_finite() {
        return Err(p.invalid("attention_factor", "is not finite"));
    }
    Ok(Yarn {
        factor,
        beta_fast,
        beta_slow,
        original_max_position_embeddings: orig,
        truncate,
        attention_factor,
    })
}

/// Context shared by the RoPE resolution of every layer.
struct RopeCtx<'a, 'b> {
    root: &'b Obj<'a>,
    arch: Arch,
    max_pos: usize,
}

impl RopeCtx<'_, '_> {
    /// The RoPE of a layer of the given kind with the given q/k head dim.
    fn rope(&self, sliding: bool, head_dim: usize) -> CResult<Rope> {
        let root = self.root;
        let default_theta = match (self.arch, sliding) {
            (Arch::GptOss, _) => 150_000.0,
            (Arch::Qwen3Moe, _) => 10_000.0,
            (Arch::MiMoV2Flash | Arch::MiMoV2, false) => 5_000_000.0,
            (Arch::MiMoV2Flash | Arch::MiMoV2, true) => 10_000.0,
        };
        let default_prf = match self.arch {
            Arch::MiMoV2Flash | Arch::MiMoV2 => 0.334,
            _ => 1.0,
        };
        let top_prf = root.f64("partial_rotary_factor")?;
        // (parameter object if any, theta, partial factor)
        let (params, theta, prf): (Option<Obj<'_>>, f64, f64) =
            if let Some(rp) = root.obj("rope_parameters")? {
                let keyed = rp.has("full_attention") || rp.has("sliding_attention");
                let p = if keyed {
                    let key = if sliding {
                        "sliding_attention"
                    } else {
                        "full_attention"
                    };
                    rp.obj(key)?.ok_or_else(|| rp.missing(key))?
                } else {
                    rp
                };
                let theta = match p.f64("rope_theta")? {
                    Some(t) => t,
                    None => match (sliding, self.arch) {
                        (true, Arch::MiMoV2Flash | Arch::MiMoV2) => root.f64("swa_rope_theta")?,
                        _ => root.f64("rope_theta")?,
                    }
                    .unwrap_or(default_theta),
                };
                let prf = p
                    .f64("partial_rotary_factor")?
                    .or(top_prf)
                    .unwrap_or(default_prf);
                (Some(p), theta, prf)
            } else {
                let theta = if sliding && self.arch.is_mimo() {
                    root.f64("swa_rope_theta")?.unwrap_or(default_theta)
                } else {
                    root.f64("rope_theta")?.unwrap_or(default_theta)
                };
                // MiMo's Hub rope_scaling applies to full-attention layers only.
                let scaling = if sliding && self.arch.is_mimo() {
                    None
                } else {
                    root.obj("rope_scaling")?
                };
                (scaling, theta, top_prf.unwrap_or(default_prf))
            };
        if theta.partial_cmp(&1.0) != Some(std::cmp::Ordering::Greater) {
            return Err(root.invalid("rope_theta", format!("must be > 1, got {theta}")));
        }
        if !(prf > 0.0 && prf <= 1.0) {
            return Err(root.invalid(
                "partial_rotary_factor",
                format!("must be in (0, 1], got {prf}"),
            ));
        }
        let rotary_dim = (head_dim as f64 * prf) as usize;
        if rotary_dim == 0 || !rotary_dim.is_multiple_of(2) || rotary_dim > head_dim {
            return Err(root.invalid(
                "partial_rotary_factor",
                format!(
                    "int(head_dim {head_dim} × {prf}) = {rotary_dim} rotary dims; must be even and \
                     positive"
                ),
            ));
        }
        let yarn = match &params {
            None => {
                // gpt-oss without any RoPE fields: the transformers class default (YaRN).
                if self.arch == Arch::GptOss && !root.has("rope_scaling") {
                    Some(Yarn::gpt_oss())
                } else {
                    None
                }
            }
            Some(p) => {
                let ty = match p.str("rope_type")? {
                    Some(t) => t,
                    None => p.str("type")?.unwrap_or("default"),
                };
                match ty {
                    "default" => None,
                    "yarn" => Some(parse_yarn(p, root, self.max_pos)?),
                    other => {
                        return Err(p.unsupported(
                            "rope_type",
                            format!("{other:?} (supported: default, yarn)"),
                        ))
                    }
                }
            }
        };
        Ok(Rope {
            theta,
            rotary_dim,
            yarn,
        })
    }
}

fn parse_model(o: &Obj<'_>) -> CResult<ModelConfig> {
    let arch = detect_arch(o)?;
    let mimo = arch.is_mimo();
    if arch == Arch::MiMoV2 {
        crate::mimo::check_config(o)?;
    }

    let vocab_size = o.dim("vocab_size", MAX_DIM)?;
    let hidden_size = o.dim("hidden_size", MAX_DIM)?;
    let n = o.dim("num_hidden_layers", MAX_LAYERS)?;
    let n_heads = o.dim("num_attention_heads", MAX_DIM)?;
    let n_kv = o
        .dim_opt("num_key_value_heads", MAX_DIM)?
        .unwrap_or(n_heads);
    let head_dim = match o.dim_opt("head_dim", MAX_DIM)? {
        Some(d) => d,
        None => match arch {
            Arch::GptOss => 64,
            Arch::MiMoV2Flash | Arch::MiMoV2 => 192,
            Arch::Qwen3Moe => {
                if !hidden_size.is_multiple_of(n_heads) {
                    return Err(o.invalid(
                        "head_dim",
                        format!(
                            "absent, and hidden_size {hidden_size} is not divisible by \
                             num_attention_heads {n_heads}"
                        ),
                    ));
                }
                hidden_size / n_heads
            }
        },
    };
    let v_head_dim = match o.dim_opt("v_head_dim", MAX_DIM)? {
        Some(v) if mimo || v == head_dim => v,
        Some(v) => {
            return Err(o.unsupported(
                "v_head_dim",
                format!("{v} ≠ head_dim {head_dim} is only supported for MiMo"),
            ))
        }
        None if mimo => 128,
        None => head_dim,
    };
    let eps = o
        .alias(&["rms_norm_eps", "layernorm_epsilon"], Obj::f64)?
        .unwrap_or(match arch {
            Arch::Qwen3Moe => 1e-6,
            _ => 1e-5,
        });
    if !(eps > 0.0 && eps < 1.0) {
        return Err(o.invalid("rms_norm_eps", format!("must be in (0, 1), got {eps}")));
    }
    let max_position_embeddings =
        o.dim_opt("max_position_embeddings", MAX_DIM)?
            .unwrap_or(match arch {
                Arch::Qwen3Moe => 32768,
                _ => 131072,
            });

    let n_experts = o
        .alias(
            &["num_local_experts", "num_experts", "n_routed_experts"],
            |o, k| o.dim_opt(k, MAX_EXPERTS),
        )?
        .ok_or_else(|| o.missing("num_local_experts"))?;
    let top_k = o
        .alias(&["num_experts_per_tok", "experts_per_token"], |o, k| {
            o.dim_opt(k, MAX_EXPERTS)
        })?
        .ok_or_else(|| o.missing("num_experts_per_tok"))?;
    if top_k > n_experts {
        return Err(o.invalid(
            "num_experts_per_tok",
            format!("top-k {top_k} exceeds the number of experts {n_experts}"),
        ));
    }
    let moe_intermediate_size = match arch {
        Arch::GptOss => o.dim("intermediate_size", MAX_DIM)?,
        _ => o.dim("moe_intermediate_size", MAX_DIM)?,
    };

    if let Some(act) = o.str("hidden_act")? {
        if act != "silu" {
            return Err(o.unsupported("hidden_act", format!("{act:?} (only silu)")));
        }
    }
    if let Some(s) = o.str("scoring_func")? {
        if s != "sigmoid" || !mimo {
            return Err(o.unsupported("scoring_func", format!("{s:?}")));
        }
    }
    if o.usize("n_shared_experts")?.unwrap_or(0) != 0 {
        return Err(o.unsupported("n_shared_experts", "shared experts"));
    }

    let sliding = attention_pattern(o, arch, n)?;
    let moe = mlp_pattern(o, arch, n)?;
    if arch == Arch::GptOss && moe.iter().any(|&m| !m) {
        return Err(o.unsupported("mlp_layer_types", "dense layers in gpt-oss"));
    }
    let dense_intermediate_size = if moe.iter().all(|&m| m) {
        None
    } else {
        Some(o.dim("intermediate_size", MAX_DIM)?)
    };

    let window = if sliding.iter().any(|&s| s) {
        let w = if mimo && o.has("sliding_window_size") {
            let s = o.dim("sliding_window_size", MAX_DIM)?;
            s + 1
        } else {
            match arch {
                Arch::Qwen3Moe => o.dim("sliding_window", MAX_DIM)?,
                _ => o.dim_opt("sliding_window", MAX_DIM)?.unwrap_or(128),
            }
        };
        Some(w)
    } else {
        None
    };

    let router = match arch {
        Arch::GptOss => RouterSpec::GptOss,
        Arch::Qwen3Moe => RouterSpec::Qwen3 {
            norm_topk_prob: o.bool("norm_topk_prob")?.unwrap_or(false),
        },
        Arch::MiMoV2Flash | Arch::MiMoV2 => {
            let n_group = o.dim_opt("n_group", MAX_EXPERTS)?.unwrap_or(1);
            let topk_group = o.dim_opt("topk_group", MAX_EXPERTS)?.unwrap_or(1);
            if !n_experts.is_multiple_of(n_group) {
                return Err(o.invalid(
                    "n_group",
                    format!("{n_group} does not divide the {n_experts} experts"),
                ));
            }
            if topk_group > n_group {
                return Err(o.invalid(
                    "topk_group",
                    format!("{topk_group} exceeds n_group {n_group}"),
                ));
            }
            if n_group > 1 && n_experts / n_group < 2 {
                return Err(o.invalid("n_group", "groups need at least 2 experts"));
            }
            if top_k > topk_group * (n_experts / n_group) {
                return Err(o.invalid(
                    "num_experts_per_tok",
                    format!(
                        "top-k {top_k} exceeds the {} experts of the {topk_group} selected groups",
                        topk_group * (n_experts / n_group)
                    ),
                ));
            }
            let scale = o.f64("routed_scaling_factor")?.unwrap_or(1.0);
            RouterSpec::Sigmoid {
                n_group,
                topk_group,
                norm_topk_prob: o.bool("norm_topk_prob")?.unwrap_or(true),
                routed_scaling_factor: scale as f32,
            }
        }
    };

    let activation = match arch {
        Arch::GptOss => {
            let alpha = o.f64("swiglu_alpha")?.unwrap_or(1.702);
            let limit = o.f64("swiglu_limit")?.unwrap_or(7.0);
            if limit <= 0.0 {
                return Err(o.invalid("swiglu_limit", format!("must be positive, got {limit}")));
            }
            Activation::ClampedSwiglu {
                alpha: alpha as f32,
                limit: limit as f32,
            }
        }
        _ => Activation::Swiglu,
    };

    let value_scale = if mimo {
        match o.map.get("attention_value_scale") {
            None => 0.707,
            Some(Value::Null) => 1.0,
            Some(_) => o.f64("attention_value_scale")?.unwrap_or(1.0) as f32,
        }
    } else {
        1.0
    };

    let attn_bias = match arch {
        Arch::GptOss => o.bool("attention_bias")?.unwrap_or(true),
        Arch::Qwen3Moe => o.bool("attention_bias")?.unwrap_or(false),
        Arch::MiMoV2Flash | Arch::MiMoV2 => {
            if o.bool("attention_bias")? == Some(true) {
                return Err(
                    o.unsupported("attention_bias", "MiMo with q/k/v biases (o_proj has none)")
                );
            }
            false
        }
    };

    // Per layer-kind attention shapes (MiMo's SWA layers differ).
    let full_shape = (n_heads, n_kv, head_dim, v_head_dim);
    let swa_shape = if mimo {
        let h = o
            .dim_opt("swa_num_attention_heads", MAX_DIM)?
            .unwrap_or(n_heads);
        let kv = match o.dim_opt("swa_num_key_value_heads", MAX_DIM)? {
            Some(kv) => kv,
            // transformers' Flash class hard-codes 2 × full; mimo_v2 has equal counts.
            None if arch == Arch::MiMoV2 => n_kv,
            None => 2 * n_kv,
        };
        let hd = o
            .alias(&["swa_head_dim", "swa_qk_head_dim"], |o, k| {
                o.dim_opt(k, MAX_DIM)
            })?
            .unwrap_or(head_dim);
        let vd = o.dim_opt("swa_v_head_dim", MAX_DIM)?.unwrap_or(v_head_dim);
        (h, kv, hd, vd)
    } else {
        full_shape
    };
    for (is_swa, (h, kv, hd, _)) in [(false, full_shape), (true, swa_shape)] {
        if !sliding.contains(&is_swa) {
            continue;
        }
        let field = if is_swa && mimo {
            "swa_num_key_value_heads"
        } else {
            "num_key_value_heads"
        };
        if !h.is_multiple_of(kv) {
            return Err(o.invalid(
                field,
                format!("{h} attention heads are not divisible by {kv} KV heads"),
            ));
        }
        if h.checked_mul(hd).is_none_or(|d| d > MAX_DIM) {
            return Err(o.invalid("head_dim", "heads × head_dim is too large"));
        }
    }
    let (sinks_full, sinks_swa) = match arch {
        Arch::GptOss => (true, true),
        Arch::Qwen3Moe => (false, false),
        Arch::MiMoV2Flash | Arch::MiMoV2 => (
            o.bool("add_full_attention_sink_bias")?.unwrap_or(false),
            o.bool("add_swa_attention_sink_bias")?.unwrap_or(true),
        ),
    };

    let ctx = RopeCtx {
        root: o,
        arch,
        max_pos: max_position_embeddings,
    };
    let rope_full = if sliding.contains(&false) {
        Some(ctx.rope(false, full_shape.2)?)
    } else {
        None
    };
    let rope_swa = if sliding.contains(&true) {
        Some(ctx.rope(true, swa_shape.2)?)
    } else {
        None
    };

    let quant = Quantization::parse(o)?;
    match quant {
        Quantization::Mxfp4 { .. } => {
            if arch != Arch::GptOss {
                return Err(ConfigError::Unsupported {
                    field: "quantization_config.quant_method".into(),
                    reason: "mxfp4 checkpoints are only supported for gpt-oss".into(),
                });
            }
            if !hidden_size.is_multiple_of(32) {
                return Err(o.invalid(
                    "hidden_size",
                    format!("{hidden_size} is not a multiple of 32 (MXFP4 block size)"),
                ));
            }
            if !moe_intermediate_size.is_multiple_of(32) {
                return Err(o.invalid(
                    "intermediate_size",
                    format!("{moe_intermediate_size} is not a multiple of 32 (MXFP4 block size)"),
                ));
            }
        }
        Quantization::Fp8 {
            mxfp4_experts: true,
            ..
        } => {
            if arch != Arch::MiMoV2 {
                return Err(ConfigError::Unsupported {
                    field: "quantization_config.store_dtype".into(),
                    reason: "MXFP4 experts in an fp8 checkpoint are only supported for mimo_v2"
                        .into(),
                });
            }
            for (field, v) in [
                ("hidden_size", hidden_size),
                ("moe_intermediate_size", moe_intermediate_size),
            ] {
                if !v.is_multiple_of(fp4::BLOCK) {
                    return Err(o.invalid(
                        field,
                        format!("{v} is not a multiple of 32 (MXFP4 block size)"),
                    ));
                }
            }
        }
        Quantization::Fp8 { .. } | Quantization::None => {}
    }

    let mut layers = Vec::with_capacity(n);
    for l in 0..n {
        let swa = sliding[l];
        let (h, kv, hd, vd) = if swa { swa_shape } else { full_shape };
        let rope = if swa { rope_swa } else { rope_full };
        let Some(rope) = rope else {
            // Unreachable: both ropes are computed for every kind present.
            return Err(o.invalid("layer_types", "internal: missing RoPE"));
        };
        layers.push(LayerSpec {
            attn: match (swa, window) {
                (true, Some(window)) => AttnKind::Sliding { window },
                _ => AttnKind::Full,
            },
            n_heads: h,
            n_kv_heads: kv,
            head_dim: hd,
            v_head_dim: vd,
            rope,
            sinks: if swa { sinks_swa } else { sinks_full },
            qk_norm: arch == Arch::Qwen3Moe,
            attn_bias,
            moe: moe[l],
        });
    }

    Ok(ModelConfig {
        arch,
        vocab_size,
        hidden_size,
        layers,
        rms_norm_eps: eps as f32,
        n_experts,
        top_k,
        moe_intermediate_size,
        dense_intermediate_size,
        router,
        activation,
        value_scale,
        tie_word_embeddings: o.bool("tie_word_embeddings")?.unwrap_or(false),
        max_position_embeddings,
        bos_token_id: o.token_id("bos_token_id")?,
        eos_token_ids: o.token_ids("eos_token_id")?,
        pad_token_id: o.token_id("pad_token_id")?,
    })
}
