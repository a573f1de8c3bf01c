//! The drafter configuration: a z-lab DFlash-1 `config.json` (Qwen3 fields + `dflash_config`),
//! including Xiaomi's MiMo variant, normalized into [`DrafterConfig`].
//!
//! Lookup rule (z-lab's `dflash_config.get(k, config.k)`): every DFlash key is read from
//! `dflash_config` first, then from the top level. Errors are [`ConfigError`]s naming the field
//! (dotted path for nested keys). Keys that change the math and are not implemented (DFlash 2's
//! conv / selector fields, `output_multiplier`, `final_logit_softcapping`, `v_head_dim ≠
//! head_dim`, RoPE types other than default / YaRN, activations other than SiLU) are refused
//! rather than ignored.
//!
//! The block size (`block_size`, DFlash lookup) must lie in `2..=16`; a config without one gets
//! [`DEFAULT_BLOCK_SIZE`] (8). It is the speculative decoder's default block size; a caller may
//! run any other size in `2..=16` (`ultra generate --block-size`).
//!
//! # Per-layer attention (research/dflash.md §2.4, vLLM's `_resolve_layer_attention`)
//! * layer types: `layer_types`, else transformers' `Qwen3Config` rule (`use_sliding_window` +
//!   `sliding_window`: sliding from `max_window_layers` on), else all full attention;
//! * `use_swa: true` and no sliding layer (the MiMo shape: no `layer_types`): **every** layer
//!   sliding, still typed full, hence non-causal;
//! * window: `swa_window_size` (DFlash lookup), else top-level `sliding_window`;
//! * causal: top-level `is_causal`, else `dflash_config.causal`, else "the layer is typed
//!   `sliding_attention`" (sliding layers causal, full layers bidirectional inside the block).
//!
//! This is also the rule of the PyTorch reference (`scripts/fixtures/dflash_reference.py`).
//! A window `W` means key `k` is visible from query `q` iff `q − k < W` (W keys up to and
//! including the query, transformers' convention), and for non-causal layers also `k − q < W`.
//!
//! # RoPE
//! The drafter's own RoPE (`rope_theta`, `rope_scaling` / `rope_parameters`, YaRN supported),
//! NeoX half-split on the first `head_dim · partial_rotary_factor` dims, for the queries and keys
//! of the block and the keys of the context alike. MiMo's `dflash_config.backbone_rotary_base`
//! is recorded ([`DrafterConfig::backbone_rotary_base`]) but, as in vLLM's `qwen3_dflash.py` and
//! the PyTorch reference (`scripts/fixtures/dflash_reference.py`), does not enter the math
//! (research/dflash.md §2.5 lists its meaning as open; [`DrafterConfig::rope`] is public, so a
//! caller can override the RoPE).

use crate::config::{as_usize, parse_yarn, ConfigError, Obj, Rope};

use super::DrafterError;
use serde_json::Value;

/// Smallest supported block size (one draft token).
pub const MIN_BLOCK_SIZE: usize = 2;
/// Largest supported block size.
pub const MAX_BLOCK_SIZE: usize = 16;
/// The block size of a drafter whose config gives none (`block_size` absent both in
/// `dflash_config` and at the top level): 8, MiMo's and vLLM's `num_speculative_tokens: 7`.
pub const DEFAULT_BLOCK_SIZE: usize = 8;

/// Sanity limit on dimensions (as the model crate's `MAX_DIM`).
const MAX_DIM: usize = crate::config::MAX_DIM;

/// Attention pattern of one draft layer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DraftAttn {
    /// Sliding window `W` (see the module docs); `None` = every cached context key and every
    /// block key.
    pub window: Option<usize>,
    /// Causal inside the block: block query `i` sees block keys `0..=i` only.
    pub causal: bool,
}

/// A normalized drafter configuration.
#[derive(Debug, Clone, PartialEq)]
pub struct DrafterConfig {
    /// Drafter hidden size H (must equal the target's: the drafter borrows its embedding and
    /// LM head).
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub n_heads: usize,
    pub n_kv_heads: usize,
    /// q/k/v head dimension.
    pub head_dim: usize,
    pub rms_norm_eps: f32,
    pub rope: Rope,
    /// Biases on q/k/v/o (`attention_bias`, Qwen3 semantics).
    pub attention_bias: bool,
    /// One entry per draft layer.
    pub layers: Vec<DraftAttn>,
    /// A learned sink logit per head in every layer (`attention_sink_bias`, MiMo).
    pub sinks: bool,
    /// `v ← v · value_scale` for context and block values (`attention_value_scale`, MiMo; 1
    /// otherwise).
    pub value_scale: f32,
    /// Multiplies the block's input embeddings (`input_embedding_scale`; 1 if absent).
    pub input_embedding_scale: f32,
    /// Target decoder layers whose outputs are concatenated into the context features (layer
    /// `L`'s output is the executor's hidden index `L + 1`).
    pub target_layer_ids: Vec<usize>,
    /// The token id of the block's mask slots.
    pub mask_token_id: u32,
    /// The block size the drafter was trained with (the default block size of a speculative
    /// decoder); [`DEFAULT_BLOCK_SIZE`] when the config gives none.
    pub block_size: usize,
    /// `vocab_size`, if the config gives one (at most the target's: see `check_target_dims`).
    pub vocab_size: Option<usize>,
    /// `num_target_layers`, if given (must equal the target's layer count).
    pub num_target_layers: Option<usize>,
    /// `target_hidden_size`, if given (must equal the target's hidden size).
    pub target_hidden_size: Option<usize>,
    /// MiMo's `dflash_config.backbone_rotary_base`, if given (informational, see the module
    /// docs).
    pub backbone_rotary_base: Option<f64>,
}

impl DrafterConfig {
    /// The plan-level view of this drafter ([`crate::plan::draft::DraftSpec`]) for a target of
    /// `target` (whose embedding and LM head it borrows; its hidden states are the features).
    /// Draft layers are Qwen3 blocks: q/k norms, SwiGLU.
    pub fn draft_spec(&self, target: &crate::config::ModelConfig) -> crate::plan::draft::DraftSpec {
        self.draft_spec_dims(self.num_features() * target.hidden_size, target.vocab_size)
    }

    /// [`DrafterConfig::draft_spec`] from the target's dimensions alone: the feature width
    /// (`K · H_target`) and the vocabulary of the embedding and LM head the drafter borrows.
    pub fn draft_spec_dims(&self, features: usize, vocab: usize) -> crate::plan::draft::DraftSpec {
        use crate::plan::draft::{DraftLayer, DraftSpec};
        DraftSpec {
            hidden: self.hidden_size,
            intermediate: self.intermediate_size,
            n_heads: self.n_heads,
            n_kv_heads: self.n_kv_heads,
            head_dim: self.head_dim,
            eps: self.rms_norm_eps,
            rope: self.rope,
            bias: self.attention_bias,
            qk_norm: true,
            sinks: self.sinks,
            value_scale: self.value_scale,
            input_embedding_scale: self.input_embedding_scale,
            activation: crate::config::Activation::Swiglu,
            layers: self
                .layers
                .iter()
                .map(|l| DraftLayer {
                    window: l.window,
                    causal: l.causal,
                })
                .collect(),
            features,
            vocab,
        }
    }

    /// Number of draft layers.
    pub fn num_layers(&self) -> usize {
        self.layers.len()
    }

    /// Number of concatenated target features K.
    pub fn num_features(&self) -> usize {
        self.target_layer_ids.len()
    }

    /// Checks a drafter of this config whose `fc` takes `feature_width` inputs against a target
    /// of `vocab` tokens, hidden size `hidden` and `layers` decoder layers (see
    /// [`DrafterWeights::check_target`](super::DrafterWeights::check_target)).
    pub fn check_target_dims(
        &self,
        feature_width: usize,
        vocab: usize,
        hidden: usize,
        layers: usize,
    ) -> Result<(), DrafterError> {
        let c = self;
        let mismatch = |field: &str, reason: String| {
            Err(DrafterError::TargetMismatch {
                field: field.to_string(),
                reason,
            })
        };
        if c.hidden_size != hidden {
            return mismatch(
                "hidden_size",
                format!(
                    "drafter hidden size {} ≠ target hidden size {hidden} (the drafter runs on the \
                     target's embedding and LM head)",
                    c.hidden_size
                ),
            );
        }
        if let Some(th) = c.target_hidden_size {
            if th != hidden {
                return mismatch(
                    "target_hidden_size",
                    format!("{th} ≠ target hidden size {hidden}"),
                );
            }
        }
        let k = c.num_features();
        if feature_width != k * hidden {
            return mismatch(
                "fc.weight",
                format!(
                    "input width {} ≠ {k} target layers × target hidden size {hidden}",
                    feature_width
                ),
            );
        }
        // The drafter has no vocabulary-sized tensor (it borrows the target's embedding and LM
        // head), so its `vocab_size` only bounds the ids it was trained on: at most the target's.
        // A smaller one is the released pair MiMo-V2.5-Pro (152576 tokens) + its DFlash drafter
        // (`vocab_size` 152064): research/mimo-v2.md §1.2, research/dflash.md §6.3.
        if let Some(v) = c.vocab_size {
            if v > vocab {
                return mismatch(
                    "vocab_size",
                    format!("{v} > target vocabulary {vocab} (the drafter borrows the target's)"),
                );
            }
        }
        if c.mask_token_id as usize >= vocab {
            return mismatch(
                "mask_token_id",
                format!(
                    "{} is outside the target vocabulary (size {vocab})",
                    c.mask_token_id
                ),
            );
        }
        if let Some((i, &l)) = c
            .target_layer_ids
            .iter()
            .enumerate()
            .find(|(_, &l)| l >= layers)
        {
            return mismatch(
                &format!("target_layer_ids[{i}]"),
                format!("layer {l} ≥ the target's {layers} layers"),
            );
        }
        if let Some(n) = c.num_target_layers {
            if n != layers {
                return mismatch(
                    "num_target_layers",
                    format!("{n} ≠ the target's {layers} layers"),
                );
            }
        }
        Ok(())
    }

    /// Parses a drafter `config.json` text.
    pub fn from_json_str(s: &str) -> Result<DrafterConfig, ConfigError> {
        let v: Value = serde_json::from_str(s).map_err(|e| ConfigError::Json {
            file: "config.json".into(),
            message: e.to_string(),
        })?;
        let Some(map) = v.as_object() else {
            return Err(ConfigError::Json {
                file: "config.json".into(),
                message: "top level is not a JSON object".into(),
            });
        };
        let top = Obj::root(map);
        let dcfg = top.obj("dflash_config")?;
        parse(&top, dcfg.as_ref())
    }
}

fn parse(top: &Obj<'_>, dcfg: Option<&Obj<'_>>) -> Result<DrafterConfig, ConfigError> {
    // DFlash lookup: dflash_config first, then top level.
    let lookup = |key: &str| -> (Obj<'_>, bool) {
        match dcfg {
            Some(d) if d.has(key) => (d.clone(), true),
            _ => (top.clone(), top.has(key)),
        }
    };

    if let Some(archs) = top.arr("architectures")? {
        if archs
            .iter()
            .any(|a| a.as_str() == Some("DFlash2DraftModel"))
        {
            return Err(top.unsupported(
                "architectures",
                "DFlash2DraftModel (conv layers + candidate selector) is not implemented",
            ));
        }
    }
    if let Some(d) = dcfg {
        for key in [
            "conv_kernel_size",
            "conv_group_size",
            "selector_rank",
            "selector_top_k",
        ] {
            if d.has(key) {
                return Err(d.unsupported(key, "DFlash 2 fields are not implemented"));
            }
        }
    }
    for key in ["output_multiplier", "final_logit_softcapping"] {
        let (o, present) = lookup(key);
        // A multiplier of exactly 1 is the identity; any softcapping changes the logits.
        if present && (key != "output_multiplier" || o.f64(key)? != Some(1.0)) {
            return Err(o.unsupported(key, "logit transforms are not implemented"));
        }
    }
    if let Some(act) = top.str("hidden_act")? {
        if act != "silu" {
            return Err(top.unsupported("hidden_act", format!("{act:?} (only silu)")));
        }
    }

    let hidden_size = top.dim("hidden_size", MAX_DIM)?;
    let n_layers = top.dim("num_hidden_layers", MAX_DIM)?;
    if n_layers > crate::config::MAX_LAYERS {
        return Err(top.invalid("num_hidden_layers", "exceeds the layer limit"));
    }
    let n_heads = top.dim("num_attention_heads", MAX_DIM)?;
    let n_kv_heads = top
        .dim_opt("num_key_value_heads", MAX_DIM)?
        .unwrap_or(n_heads);
    if !n_heads.is_multiple_of(n_kv_heads) {
        return Err(top.invalid(
            "num_key_value_heads",
            format!("{n_heads} attention heads are not divisible by {n_kv_heads} KV heads"),
        ));
    }
    let head_dim = match top.dim_opt("head_dim", MAX_DIM)? {
        Some(d) => d,
        None if hidden_size.is_multiple_of(n_heads) => hidden_size / n_heads,
        None => {
            return Err(top.invalid(
                "head_dim",
                format!(
                    "absent, and hidden_size {hidden_size} is not divisible by \
                     num_attention_heads {n_heads}"
                ),
            ))
        }
    };
    if n_heads.checked_mul(head_dim).is_none_or(|d| d > MAX_DIM) {
        return Err(top.invalid("head_dim", "heads × head_dim is too large"));
    }
    if let Some(vd) = top.dim_opt("v_head_dim", MAX_DIM)? {
        if vd != head_dim {
            return Err(top.unsupported("v_head_dim", format!("{vd} ≠ head_dim {head_dim}")));
        }
    }
    let intermediate_size = top.dim("intermediate_size", MAX_DIM)?;
    let eps = top.f64("rms_norm_eps")?.unwrap_or(1e-6);
    if !(eps > 0.0 && eps < 1.0) {
        return Err(top.invalid("rms_norm_eps", format!("must be in (0, 1), got {eps}")));
    }
    let attention_bias = top.bool("attention_bias")?.unwrap_or(false);
    let max_pos = top
        .dim_opt("max_position_embeddings", MAX_DIM)?
        .unwrap_or(40960);

    // --- DFlash fields -------------------------------------------------------------------
    let (o, _) = lookup("mask_token_id");
    let mask_token_id = o
        .token_id("mask_token_id")?
        .ok_or_else(|| o.missing("mask_token_id"))?;
    let (o, present) = lookup("block_size");
    let block_size = if present {
        o.dim("block_size", MAX_DIM)?
    } else {
        DEFAULT_BLOCK_SIZE
    };
    if !(MIN_BLOCK_SIZE..=MAX_BLOCK_SIZE).contains(&block_size) {
        return Err(o.invalid(
            "block_size",
            format!("{block_size} is outside {MIN_BLOCK_SIZE}..={MAX_BLOCK_SIZE}"),
        ));
    }
    let num_target_layers = lookup("num_target_layers")
        .0
        .dim_opt("num_target_layers", MAX_DIM)?;
    let target_hidden_size = lookup("target_hidden_size")
        .0
        .dim_opt("target_hidden_size", MAX_DIM)?;
    let vocab_size = top.dim_opt("vocab_size", MAX_DIM)?;

    let (o, present) = lookup("target_layer_ids");
    let target_layer_ids = if present {
        let list = o.arr("target_layer_ids")?.map_or(&[][..], Vec::as_slice);
        if list.is_empty() {
            return Err(o.invalid("target_layer_ids", "must list at least one layer"));
        }
        let mut ids = Vec::with_capacity(list.len());
        for (i, v) in list.iter().enumerate() {
            let id = as_usize(v).filter(|&x| x <= crate::config::MAX_LAYERS);
            let Some(id) = id else {
                return Err(o.invalid(
                    &format!("target_layer_ids[{i}]"),
                    format!("expected a layer index, got {v}"),
                ));
            };
            ids.push(id);
        }
        ids
    } else {
        // z-lab's `build_target_layer_ids(num_target_layers, num_draft_layers)`.
        let Some(n) = num_target_layers else {
            return Err(ConfigError::Missing {
                field: "dflash_config.target_layer_ids".into(),
            });
        };
        build_target_layer_ids(n, n_layers)
    };

    // --- attention pattern ---------------------------------------------------------------
    let sliding = layer_types(top, n_layers)?;
    let use_swa = lookup("use_swa").0.bool("use_swa")? == Some(true);
    let all_swa = use_swa && !sliding.contains(&true);
    let window = if all_swa || sliding.contains(&true) {
        let (o, present) = lookup("swa_window_size");
        Some(if present {
            o.dim("swa_window_size", MAX_DIM)?
        } else {
            top.dim_opt("sliding_window", MAX_DIM)?
                .ok_or_else(|| ConfigError::Missing {
                    field: if all_swa {
                        "dflash_config.swa_window_size".into()
                    } else {
                        "sliding_window".into()
                    },
                })?
        })
    } else {
        None
    };
    let causal_override = match top.bool("is_causal")? {
        Some(c) => Some(c),
        None => match dcfg {
            Some(d) => d.bool("causal")?,
            None => None,
        },
    };
    let layers = sliding
        .iter()
        .map(|&sl| DraftAttn {
            window: if sl || all_swa { window } else { None },
            causal: causal_override.unwrap_or(sl),
        })
        .collect();

    let sinks = lookup("attention_sink_bias")
        .0
        .bool("attention_sink_bias")?
        .unwrap_or(false);
    let (o, _) = lookup("attention_value_scale");
    let value_scale = o.f64("attention_value_scale")?.unwrap_or(1.0);
    if value_scale <= 0.0 {
        return Err(o.invalid("attention_value_scale", "must be positive"));
    }
    let (o, _) = lookup("input_embedding_scale");
    let input_embedding_scale = o.f64("input_embedding_scale")?.unwrap_or(1.0);

    let rope = parse_rope(top, head_dim, max_pos)?;
    let backbone_rotary_base = match dcfg {
        Some(d) => d.f64("backbone_rotary_base")?,
        None => None,
    };

    Ok(DrafterConfig {
        hidden_size,
        intermediate_size,
        n_heads,
        n_kv_heads,
        head_dim,
        rms_norm_eps: eps as f32,
        rope,
        attention_bias,
        layers,
        sinks,
        value_scale: value_scale as f32,
        input_embedding_scale: input_embedding_scale as f32,
        target_layer_ids,
        mask_token_id,
        block_size,
        vocab_size,
        num_target_layers,
        target_hidden_size,
        backbone_rotary_base,
    })
}

/// Per-layer `sliding_attention` flags: `layer_types` when given, else what transformers'
/// `Qwen3Config` derives (`use_sliding_window` with a `sliding_window`: layers from
/// `max_window_layers` on, default all full), else all full.
fn layer_types(top: &Obj<'_>, n_layers: usize) -> Result<Vec<bool>, ConfigError> {
    if let Some(types) = top.arr("layer_types")? {
        if types.len() != n_layers {
            return Err(top.invalid(
                "layer_types",
                format!(
                    "has {} entries but num_hidden_layers = {n_layers}",
                    types.len()
                ),
            ));
        }
        return types
            .iter()
            .enumerate()
            .map(|(i, t)| match t.as_str() {
                Some("full_attention") => Ok(false),
                Some("sliding_attention") => Ok(true),
                _ => Err(top.invalid(
                    &format!("layer_types[{i}]"),
                    format!("expected \"full_attention\" or \"sliding_attention\", got {t}"),
                )),
            })
            .collect();
    }
    if top.bool("use_sliding_window")? == Some(true) && top.has("sliding_window") {
        let first = top.usize("max_window_layers")?.unwrap_or(n_layers);
        return Ok((0..n_layers).map(|i| i >= first).collect());
    }
    Ok(vec![false; n_layers])
}

/// z-lab's fallback `build_target_layer_ids(N, D)`: `[N / 2]` for one feature, else
/// `round(1 + i·(N − 4)/(D − 1))` for `i < D` (Python's round: half to even).
pub fn build_target_layer_ids(num_target_layers: usize, num_features: usize) -> Vec<usize> {
    if num_features <= 1 {
        return vec![num_target_layers / 2];
    }
    let span = num_target_layers as f64 - 4.0;
    (0..num_features)
        .map(|i| (1.0 + i as f64 * span / (num_features - 1) as f64).round_ties_even() as usize)
        .collect()
}

fn parse_rope(top: &Obj<'_>, head_dim: usize, max_pos: usize) -> Result<Rope, ConfigError> {
    let params = top.obj("rope_parameters")?;
    let scaling = match &params {
        Some(p) => Some(p.clone()),
        None => top.obj("rope_scaling")?,
    };
    let theta = match params.as_ref().map(|p| p.f64("rope_theta")).transpose()? {
        Some(Some(t)) => t,
        _ => top.f64("rope_theta")?.unwrap_or(10_000.0),
    };
    if theta.partial_cmp(&1.0) != Some(std::cmp::Ordering::Greater) {
        return Err(top.invalid("rope_theta", format!("must be > 1, got {theta}")));
    }
    let prf = match params
        .as_ref()
        .map(|p| p.f64("partial_rotary_factor"))
        .transpose()?
    {
        Some(Some(f)) => f,
        _ => top.f64("partial_rotary_factor")?.unwrap_or(1.0),
    };
    if !(prf > 0.0 && prf <= 1.0) {
        return Err(top.invalid(
            "partial_rotary_factor",
            format!("must be in (0, 1], got {prf}"),
        ));
    }
    let rotary_dim = (head_dim as f64 * prf) as usize;
    if rotary_dim == 0 || !rotary_dim.is_multiple_of(2) {
        return Err(top.invalid(
            "partial_rotary_factor",
            format!("int(head_dim {head_dim} × {prf}) = {rotary_dim} rotary dims; must be even and positive"),
        ));
    }
    let yarn = match scaling {
        None => None,
        Some(p) => {
            let ty = match p.str("rope_type")? {
                Some(t) => t,
                None => p.str("type")?.unwrap_or("default"),
            };
            match ty {
                "default" => None,
                "yarn" => Some(parse_yarn(&p, top, max_pos)?),
                other => {
                    return Err(
                        p.unsupported("rope_type", format!("{other:?} (supported: default, yarn)"))
                    )
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
