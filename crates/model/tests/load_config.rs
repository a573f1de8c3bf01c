//! Config normalizer: every spelling of the three architectures, and every bad config → the
//! right `ConfigError` naming the field.

mod load_common;

use load_common::*;
use model::config::{
    Activation, Arch, AttnKind, ConfigError, ModelConfig, Quantization, RouterSpec,
};

fn parse(s: &str) -> ModelConfig {
    match ModelConfig::from_json_str(s) {
        Ok(c) => c,
        Err(e) => panic!("config should parse: {e}\n{s}"),
    }
}

fn err(s: &str) -> ConfigError {
    match ModelConfig::from_json_str(s) {
        Ok(c) => panic!("config should fail, parsed {c:?}\n{s}"),
        Err(e) => e,
    }
}

/// Asserts an error about `field` (and that Display mentions it).
fn assert_field(e: &ConfigError, field: &str) {
    assert_eq!(e.field(), field, "error: {e}");
    assert!(
        e.to_string().contains(field),
        "message {e} should name {field}"
    );
}

// ------------------------------------------------------------------------------ gpt-oss

const GPT_OSS_HUB: &str = r#"{
  "architectures": ["GptOssForCausalLM"], "model_type": "gpt_oss",
  "attention_bias": true, "attention_dropout": 0.0, "eos_token_id": 1, "pad_token_id": 0,
  "experts_per_token": 2, "head_dim": 16, "hidden_act": "silu", "hidden_size": 64,
  "initial_context_length": 4096, "intermediate_size": 32,
  "layer_types": ["sliding_attention", "full_attention"], "max_position_embeddings": 4096,
  "num_attention_heads": 4, "num_experts_per_tok": 2, "num_hidden_layers": 2,
  "num_key_value_heads": 2, "num_local_experts": 4, "rms_norm_eps": 1e-05,
  "rope_scaling": {"rope_type": "yarn", "factor": 32.0, "beta_fast": 32.0, "beta_slow": 1.0,
                   "original_max_position_embeddings": 4096, "truncate": false},
  "rope_theta": 150000, "router_aux_loss_coef": 0.9, "sliding_window": 4, "swiglu_limit": 7.0,
  "tie_word_embeddings": false, "vocab_size": 40, "torch_dtype": "bfloat16",
  "quantization_config": {"quant_method": "mxfp4",
     "modules_to_not_convert": ["model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens", "lm_head"]}
}"#;

#[test]
fn gpt_oss_spellings_agree() {
    let native = parse(GPT_OSS_CONFIG);
    let hub = parse(GPT_OSS_HUB);
    assert_eq!(native, hub);
    assert_eq!(native.arch, Arch::GptOss);
    assert_eq!(native.n_experts, 4);
    assert_eq!(native.top_k, 2);
    assert_eq!(native.moe_intermediate_size, 32);
    assert_eq!(native.dense_intermediate_size, None);
    assert_eq!(native.router, RouterSpec::GptOss);
    assert_eq!(
        native.activation,
        Activation::ClampedSwiglu {
            alpha: 1.702,
            limit: 7.0
        }
    );
    assert_eq!(native.layers[0].attn, AttnKind::Sliding { window: 4 });
    assert_eq!(native.layers[1].attn, AttnKind::Full);
    for l in &native.layers {
        assert!(l.sinks && l.attn_bias && !l.qk_norm && l.moe);
        assert_eq!(
            (l.n_heads, l.n_kv_heads, l.head_dim, l.v_head_dim),
            (4, 2, 16, 16)
        );
        assert_eq!(l.rope.theta, 150000.0);
        assert_eq!(l.rope.rotary_dim, 16);
        let y = l.rope.yarn.unwrap();
        assert_eq!((y.factor, y.beta_fast, y.beta_slow), (32.0, 32.0, 1.0));
        assert_eq!(y.original_max_position_embeddings, 4096);
        assert!(!y.truncate);
        assert!((y.attention_factor - 1.3465735902799727).abs() < 1e-12);
    }
    assert_eq!(native.eos_token_ids, vec![1]);
    assert_eq!(native.pad_token_id, Some(0));
    assert_eq!(native.bos_token_id, None);
    assert_eq!(native.value_scale, 1.0);
    assert!((native.rms_norm_eps - 1e-5).abs() < 1e-12);
    // quantization
    assert!(matches!(
        Quantization::from_json_str(GPT_OSS_HUB).unwrap(),
        Quantization::Mxfp4 { .. }
    ));
    assert_eq!(
        Quantization::from_json_str(GPT_OSS_CONFIG).unwrap(),
        Quantization::None
    );
}

#[test]
fn gpt_oss_defaults() {
    // Neither rope_parameters nor rope_scaling: the class default YaRN; no layer_types:
    // alternating sliding/full; no head_dim: 64; alpha/limit defaults.
    let c = parse(&remove_keys(
        GPT_OSS_CONFIG,
        &[
            "rope_parameters",
            "layer_types",
            "head_dim",
            "swiglu_alpha",
            "swiglu_limit",
            "attention_bias",
            "sliding_window",
        ],
    ));
    let kinds: Vec<_> = c.layers.iter().map(|l| l.attn).collect();
    assert_eq!(
        kinds,
        vec![AttnKind::Sliding { window: 128 }, AttnKind::Full]
    );
    assert_eq!(c.layers[0].head_dim, 64);
    let y = c.layers[0].rope.yarn.unwrap();
    assert!(!y.truncate);
    assert_eq!(y.factor, 32.0);
    assert_eq!(c.layers[0].rope.theta, 150000.0);
    assert!(c.layers[0].attn_bias);
    assert_eq!(
        c.activation,
        Activation::ClampedSwiglu {
            alpha: 1.702,
            limit: 7.0
        }
    );
}

#[test]
fn yarn_defaults_truncate_true_and_attention_factor() {
    let c = parse(&patch_config(
        GPT_OSS_CONFIG,
        r#"{"rope_parameters": {"rope_type": "yarn", "rope_theta": 150000.0, "factor": 8.0}}"#,
    ));
    let y = c.layers[0].rope.yarn.unwrap();
    assert!(y.truncate, "transformers' default truncate is true");
    assert!((y.attention_factor - (0.1 * 8f64.ln() + 1.0)).abs() < 1e-12);
    assert_eq!((y.beta_fast, y.beta_slow), (32.0, 1.0));
    assert_eq!(y.original_max_position_embeddings, 4096);
    // explicit attention_factor wins; legacy `type` key
    let c = parse(&patch_config(
        QWEN3_CONFIG,
        r#"{"rope_parameters": null, "rope_theta": 10000, "rope_scaling": {"type": "yarn", "factor": 4.0, "attention_factor": 1.5, "original_max_position_embeddings": 1024}}"#,
    ));
    let y = c.layers[0].rope.yarn.unwrap();
    assert_eq!(y.attention_factor, 1.5);
    assert_eq!(y.original_max_position_embeddings, 1024);
    assert!(y.truncate);
    // factor absent: max_position_embeddings / original
    let c = parse(&patch_config(
        QWEN3_CONFIG,
        r#"{"rope_parameters": {"rope_type": "yarn", "rope_theta": 10000, "original_max_position_embeddings": 1024}}"#,
    ));
    assert_eq!(c.layers[0].rope.yarn.unwrap().factor, 4.0);
}

// ------------------------------------------------------------------------------ Qwen3-MoE

const QWEN3_HUB: &str = r#"{
  "architectures": ["Qwen3MoeForCausalLM"], "model_type": "qwen3_moe",
  "attention_bias": false, "attention_dropout": 0.0, "bos_token_id": null,
  "decoder_sparse_step": 1, "eos_token_id": 1, "head_dim": 16, "hidden_act": "silu",
  "hidden_size": 32, "intermediate_size": 48, "max_position_embeddings": 4096,
  "max_window_layers": 2, "mlp_only_layers": [], "moe_intermediate_size": 16,
  "norm_topk_prob": true, "num_attention_heads": 4, "num_experts": 4,
  "num_experts_per_tok": 2, "num_hidden_layers": 2, "num_key_value_heads": 2,
  "pad_token_id": 0, "qkv_bias": false, "rms_norm_eps": 1e-06, "rope_scaling": null,
  "rope_theta": 1000000.0, "shared_expert_intermediate_size": 0, "sliding_window": null,
  "tie_word_embeddings": false, "torch_dtype": "bfloat16", "use_qk_norm": true,
  "use_sliding_window": false, "vocab_size": 40
}"#;

#[test]
fn qwen3_spellings_agree() {
    let native = parse(QWEN3_CONFIG);
    let hub = parse(QWEN3_HUB);
    assert_eq!(native, hub);
    assert_eq!(native.arch, Arch::Qwen3Moe);
    assert_eq!(
        native.router,
        RouterSpec::Qwen3 {
            norm_topk_prob: true
        }
    );
    assert_eq!(native.activation, Activation::Swiglu);
    assert_eq!(native.dense_intermediate_size, None);
    for l in &native.layers {
        assert!(l.qk_norm && !l.sinks && !l.attn_bias && l.moe);
        assert_eq!(l.attn, AttnKind::Full);
        assert_eq!(l.rope.theta, 1e6);
        assert_eq!(l.rope.rotary_dim, 16);
        assert!(l.rope.yarn.is_none());
    }
    assert!((native.rms_norm_eps - 1e-6).abs() < 1e-12);
    // architectures alone identifies the model; n_routed_experts is a third alias
    let arch_only = remove_keys(QWEN3_HUB, &["model_type"]);
    assert_eq!(parse(&arch_only), native);
    let alias = patch_config(
        &remove_keys(QWEN3_HUB, &["num_experts"]),
        r#"{"n_routed_experts": 4}"#,
    );
    assert_eq!(parse(&alias), native);
    // no head_dim → hidden / heads
    let c = parse(&remove_keys(QWEN3_CONFIG, &["head_dim"]));
    assert_eq!(c.layers[0].head_dim, 8);
}

#[test]
fn qwen3_mlp_pattern_spellings_agree() {
    // Layer 1 dense via mlp_only_layers, mlp_layer_types and first_k... (here: layer 0 dense).
    let a = parse(&patch_config(QWEN3_CONFIG, r#"{"mlp_only_layers": [0]}"#));
    let b = parse(&patch_config(
        &remove_keys(QWEN3_CONFIG, &["mlp_only_layers", "decoder_sparse_step"]),
        r#"{"mlp_layer_types": ["dense", "sparse"]}"#,
    ));
    let c = parse(&patch_config(
        &remove_keys(QWEN3_CONFIG, &["mlp_only_layers", "decoder_sparse_step"]),
        r#"{"first_k_dense_replace": 1}"#,
    ));
    let d = parse(&patch_config(
        &remove_keys(QWEN3_CONFIG, &["mlp_only_layers", "decoder_sparse_step"]),
        r#"{"moe_layer_freq": [0, 1]}"#,
    ));
    assert_eq!(a, b);
    assert_eq!(a, c);
    assert_eq!(a, d);
    assert_eq!(a.dense_intermediate_size, Some(48));
    assert!(!a.layers[0].moe && a.layers[1].moe);
    // decoder_sparse_step 2: layers 1, 3, ... are MoE ((l + 1) % 2 == 0)
    let e = parse(&patch_config(QWEN3_CONFIG, r#"{"decoder_sparse_step": 2}"#));
    assert!(!e.layers[0].moe && e.layers[1].moe);
    // DeepSeek-style integer moe_layer_freq with first_k_dense_replace
    let f = parse(&patch_config(
        &remove_keys(QWEN3_CONFIG, &["mlp_only_layers", "decoder_sparse_step"]),
        r#"{"moe_layer_freq": 1, "first_k_dense_replace": 1}"#,
    ));
    assert_eq!(f, a);
}

// ------------------------------------------------------------------------------ MiMo

const MIMO_HUB: &str = r#"{
  "architectures": ["MiMoV2FlashForCausalLM"], "model_type": "mimo_v2_flash",
  "add_full_attention_sink_bias": false, "add_swa_attention_sink_bias": true,
  "attention_bias": false, "attention_value_scale": 0.707, "eos_token_id": 1,
  "head_dim": 24, "hidden_act": "silu", "hidden_size": 32,
  "hybrid_layer_pattern": [0, 1, 0], "intermediate_size": 48, "layernorm_epsilon": 1e-05,
  "max_position_embeddings": 4096, "moe_intermediate_size": 16, "moe_layer_freq": [0, 1, 1],
  "n_group": 1, "n_routed_experts": 4, "n_shared_experts": null, "norm_topk_prob": true,
  "num_attention_heads": 4, "num_experts_per_tok": 2, "num_hidden_layers": 3,
  "num_key_value_heads": 1, "pad_token_id": 0, "partial_rotary_factor": 0.334,
  "rope_theta": 5000000.0, "routed_scaling_factor": null, "scoring_func": "sigmoid",
  "sliding_window": 3, "sliding_window_size": 3, "swa_head_dim": 24,
  "swa_num_attention_heads": 4, "swa_num_key_value_heads": 2, "swa_rope_theta": 10000.0,
  "swa_v_head_dim": 16, "tie_word_embeddings": false, "topk_group": 1,
  "topk_method": "noaux_tc", "torch_dtype": "bfloat16", "v_head_dim": 16, "vocab_size": 40
}"#;

#[test]
fn mimo_spellings_agree() {
    let native = parse(MIMO_CONFIG);
    let hub = parse(MIMO_HUB);
    assert_eq!(native, hub);
    assert_eq!(native.arch, Arch::MiMoV2Flash);
    assert_eq!(
        native.router,
        RouterSpec::Sigmoid {
            n_group: 1,
            topk_group: 1,
            norm_topk_prob: true,
            routed_scaling_factor: 1.0
        }
    );
    assert_eq!(native.value_scale, 0.707);
    assert_eq!(native.dense_intermediate_size, Some(48));
    let l = &native.layers;
    assert_eq!(l[0].attn, AttnKind::Full);
    assert_eq!(
        l[1].attn,
        AttnKind::Sliding { window: 4 },
        "Hub size 3 → window 4"
    );
    assert_eq!(
        l.iter().map(|x| x.n_kv_heads).collect::<Vec<_>>(),
        vec![1, 2, 1],
        "SWA KV heads = 2 × full"
    );
    assert_eq!(
        l.iter().map(|x| x.sinks).collect::<Vec<_>>(),
        vec![false, true, false]
    );
    assert_eq!(
        l.iter().map(|x| x.moe).collect::<Vec<_>>(),
        vec![false, true, true]
    );
    assert!(l
        .iter()
        .all(|x| x.head_dim == 24 && x.v_head_dim == 16 && x.n_heads == 4));
    assert!(l.iter().all(|x| x.rope.rotary_dim == 8)); // int(24 × 0.334) = 8
    assert_eq!((l[0].rope.theta, l[1].rope.theta), (5e6, 1e4));
    assert!(l
        .iter()
        .all(|x| !x.qk_norm && !x.attn_bias && x.rope.yarn.is_none()));
}

#[test]
fn mimo_defaults_and_variants() {
    // No layer_types/mlp_layer_types/rope: transformers' defaults (full at 0 and every 6th,
    // layer 0 dense, θ 5e6/1e4, partial 0.334).
    let c = parse(&remove_keys(
        MIMO_CONFIG,
        &[
            "layer_types",
            "mlp_layer_types",
            "rope_parameters",
            "attention_value_scale",
            "sliding_window",
        ],
    ));
    let kinds: Vec<bool> = c.layers.iter().map(|l| l.attn == AttnKind::Full).collect();
    assert_eq!(kinds, vec![true, false, false]);
    assert_eq!(c.layers[1].attn, AttnKind::Sliding { window: 128 });
    assert_eq!(c.layers[0].rope.theta, 5e6);
    assert_eq!(c.layers[1].rope.theta, 1e4);
    assert_eq!(c.value_scale, 0.707);
    // attention_value_scale: null → no scaling
    let c = parse(&patch_config(
        MIMO_CONFIG,
        r#"{"attention_value_scale": null}"#,
    ));
    assert_eq!(c.value_scale, 1.0);
    // Hub routed_scaling_factor value; explicit SWA KV heads; sinks on full layers too
    let c = parse(&patch_config(
        MIMO_HUB,
        r#"{"routed_scaling_factor": 2.5, "swa_num_key_value_heads": 4, "add_full_attention_sink_bias": true}"#,
    ));
    assert!(matches!(
        c.router,
        RouterSpec::Sigmoid { routed_scaling_factor, .. } if routed_scaling_factor == 2.5
    ));
    assert_eq!(c.layers[1].n_kv_heads, 4);
    assert!(c.layers.iter().all(|l| l.sinks));
    // Hub rope_scaling applies to full layers only
    let c = parse(&patch_config(
        MIMO_HUB,
        r#"{"rope_scaling": {"rope_type": "yarn", "factor": 2.0, "original_max_position_embeddings": 2048}}"#,
    ));
    assert!(c.layers[0].rope.yarn.is_some() && c.layers[1].rope.yarn.is_none());
    // Flat rope_parameters apply to every layer kind
    let c = parse(&patch_config(
        MIMO_CONFIG,
        r#"{"rope_parameters": {"rope_type": "default", "rope_theta": 20000.0, "partial_rotary_factor": 0.5}}"#,
    ));
    assert!(c
        .layers
        .iter()
        .all(|l| l.rope.theta == 20000.0 && l.rope.rotary_dim == 12));
    // sliding_window alone (no size) is taken as is
    let c = parse(&remove_keys(MIMO_HUB, &["sliding_window_size"]));
    assert_eq!(c.layers[1].attn, AttnKind::Sliding { window: 3 });
}

#[test]
fn generation_config_merges_eos() {
    let d = TempDir::new("gen");
    d.write("config.json", GPT_OSS_CONFIG);
    d.write(
        "generation_config.json",
        r#"{"eos_token_id": [200002, 1, 199999], "bos_token_id": 5, "pad_token_id": 7}"#,
    );
    let c = ModelConfig::from_dir(d.path()).unwrap();
    assert_eq!(c.eos_token_ids, vec![1, 200002, 199999]);
    assert_eq!(c.bos_token_id, Some(5));
    assert_eq!(c.pad_token_id, Some(0), "config.json's pad id is kept");
    // list-valued eos in config.json
    let c = parse(&patch_config(
        GPT_OSS_CONFIG,
        r#"{"eos_token_id": [3, 4, 3]}"#,
    ));
    assert_eq!(c.eos_token_ids, vec![3, 4]);
    // bad generation config
    d.write("generation_config.json", r#"{"eos_token_id": "x"}"#);
    let e = ModelConfig::from_dir(d.path()).unwrap_err();
    assert!(e.to_string().contains("eos_token_id"), "{e}");
    d.write("generation_config.json", "{oops");
    let e = ModelConfig::from_dir(d.path()).unwrap_err();
    assert!(
        matches!(e, ConfigError::Json { ref file, .. } if file.ends_with("generation_config.json")),
        "{e}"
    );
    // missing config.json
    let empty = TempDir::new("gen-empty");
    let e = ModelConfig::from_dir(empty.path()).unwrap_err();
    assert!(
        matches!(e, ConfigError::Io { ref path, .. } if path.ends_with("config.json")),
        "{e}"
    );
}

// ------------------------------------------------------------------------------ errors

#[test]
fn bad_configs_name_the_field() {
    let cases: &[(&str, String, &str)] = &[
        (
            "unknown model_type",
            patch_config(QWEN3_CONFIG, r#"{"model_type": "llama"}"#),
            "model_type",
        ),
        (
            "unknown architectures",
            remove_keys(
                &patch_config(QWEN3_CONFIG, r#"{"architectures": ["LlamaForCausalLM"]}"#),
                &["model_type"],
            ),
            "model_type",
        ),
        (
            "no arch at all",
            remove_keys(QWEN3_CONFIG, &["model_type", "architectures"]),
            "model_type",
        ),
        (
            "mimo_v2 fused",
            patch_config(MIMO_CONFIG, r#"{"model_type": "mimo_v2"}"#),
            "model_type",
        ),
        (
            "heads not divisible",
            patch_config(QWEN3_CONFIG, r#"{"num_key_value_heads": 3}"#),
            "num_key_value_heads",
        ),
        (
            "swa heads not divisible",
            patch_config(MIMO_HUB, r#"{"swa_num_key_value_heads": 3}"#),
            "swa_num_key_value_heads",
        ),
        (
            "top_k > experts",
            patch_config(QWEN3_CONFIG, r#"{"num_experts_per_tok": 5}"#),
            "num_experts_per_tok",
        ),
        (
            "layer_types length",
            patch_config(GPT_OSS_CONFIG, r#"{"layer_types": ["full_attention"]}"#),
            "layer_types",
        ),
        (
            "layer_types value",
            patch_config(
                GPT_OSS_CONFIG,
                r#"{"layer_types": ["full_attention", "local"]}"#,
            ),
            "layer_types[1]",
        ),
        (
            "hybrid pattern length",
            patch_config(MIMO_HUB, r#"{"hybrid_layer_pattern": [0, 1]}"#),
            "hybrid_layer_pattern",
        ),
        (
            "hybrid pattern value",
            patch_config(MIMO_HUB, r#"{"hybrid_layer_pattern": [0, 2, 0]}"#),
            "hybrid_layer_pattern[1]",
        ),
        (
            "pattern disagrees",
            patch_config(
                MIMO_HUB,
                r#"{"layer_types": ["full_attention", "full_attention", "full_attention"]}"#,
            ),
            "hybrid_layer_pattern",
        ),
        (
            "mlp types disagree",
            patch_config(
                MIMO_HUB,
                r#"{"mlp_layer_types": ["sparse", "sparse", "sparse"]}"#,
            ),
            "moe_layer_freq",
        ),
        (
            "mlp_layer_types value",
            patch_config(
                MIMO_CONFIG,
                r#"{"mlp_layer_types": ["dense", "x", "sparse"]}"#,
            ),
            "mlp_layer_types[1]",
        ),
        (
            "mlp_only_layers range",
            patch_config(QWEN3_CONFIG, r#"{"mlp_only_layers": [7]}"#),
            "mlp_only_layers[0]",
        ),
        (
            "decoder_sparse_step 0",
            patch_config(QWEN3_CONFIG, r#"{"decoder_sparse_step": 0}"#),
            "decoder_sparse_step",
        ),
        (
            "mxfp4 hidden % 32",
            patch_config(&patch_config(GPT_OSS_HUB, r#"{"hidden_size": 48}"#), "{}"),
            "hidden_size",
        ),
        (
            "mxfp4 intermediate % 32",
            patch_config(GPT_OSS_HUB, r#"{"intermediate_size": 40}"#),
            "intermediate_size",
        ),
        (
            "missing vocab",
            remove_keys(QWEN3_CONFIG, &["vocab_size"]),
            "vocab_size",
        ),
        (
            "missing hidden",
            remove_keys(QWEN3_CONFIG, &["hidden_size"]),
            "hidden_size",
        ),
        (
            "missing layers",
            remove_keys(QWEN3_CONFIG, &["num_hidden_layers"]),
            "num_hidden_layers",
        ),
        (
            "missing experts",
            remove_keys(QWEN3_CONFIG, &["num_local_experts"]),
            "num_local_experts",
        ),
        (
            "missing top_k",
            remove_keys(QWEN3_CONFIG, &["num_experts_per_tok"]),
            "num_experts_per_tok",
        ),
        (
            "missing moe intermediate",
            remove_keys(QWEN3_CONFIG, &["moe_intermediate_size"]),
            "moe_intermediate_size",
        ),
        (
            "dense layer needs intermediate_size",
            remove_keys(MIMO_CONFIG, &["intermediate_size"]),
            "intermediate_size",
        ),
        (
            "zero hidden",
            patch_config(QWEN3_CONFIG, r#"{"hidden_size": 0}"#),
            "hidden_size",
        ),
        (
            "negative vocab",
            patch_config(QWEN3_CONFIG, r#"{"vocab_size": -3}"#),
            "vocab_size",
        ),
        (
            "string layers",
            patch_config(QWEN3_CONFIG, r#"{"num_hidden_layers": "2"}"#),
            "num_hidden_layers",
        ),
        (
            "fractional heads",
            patch_config(QWEN3_CONFIG, r#"{"num_attention_heads": 2.5}"#),
            "num_attention_heads",
        ),
        (
            "huge layers",
            patch_config(QWEN3_CONFIG, r#"{"num_hidden_layers": 1000000000}"#),
            "num_hidden_layers",
        ),
        (
            "huge experts",
            patch_config(QWEN3_CONFIG, r#"{"num_local_experts": 100000000000}"#),
            "num_local_experts",
        ),
        (
            "aliases disagree",
            patch_config(GPT_OSS_HUB, r#"{"experts_per_token": 3}"#),
            "experts_per_token",
        ),
        (
            "expert aliases disagree",
            patch_config(QWEN3_CONFIG, r#"{"num_experts": 5}"#),
            "num_experts",
        ),
        (
            "eps aliases disagree",
            patch_config(MIMO_HUB, r#"{"rms_norm_eps": 1e-6}"#),
            "layernorm_epsilon",
        ),
        (
            "unsupported rope",
            patch_config(
                QWEN3_CONFIG,
                r#"{"rope_parameters": {"rope_type": "llama3", "rope_theta": 1e4}}"#,
            ),
            "rope_parameters.rope_type",
        ),
        (
            "keyed rope missing kind",
            patch_config(
                MIMO_CONFIG,
                r#"{"rope_parameters": {"full_attention": {"rope_theta": 1e6}}}"#,
            ),
            "rope_parameters.sliding_attention",
        ),
        (
            "yarn bad factor",
            patch_config(
                QWEN3_CONFIG,
                r#"{"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e4, "factor": -1}}"#,
            ),
            "rope_parameters.factor",
        ),
        (
            "rope_theta type",
            patch_config(
                QWEN3_CONFIG,
                r#"{"rope_parameters": {"rope_theta": "big"}}"#,
            ),
            "rope_parameters.rope_theta",
        ),
        (
            "rope_theta <= 1",
            patch_config(QWEN3_CONFIG, r#"{"rope_parameters": {"rope_theta": 0.5}}"#),
            "rope_theta",
        ),
        (
            "odd rotary dim",
            patch_config(
                MIMO_CONFIG,
                r#"{"rope_parameters": {"rope_theta": 1e4, "partial_rotary_factor": 0.3}}"#,
            ),
            "partial_rotary_factor",
        ),
        (
            "qwen3 sliding without layer_types",
            patch_config(
                QWEN3_CONFIG,
                r#"{"use_sliding_window": true, "sliding_window": 8}"#,
            ),
            "use_sliding_window",
        ),
        (
            "qwen3 sliding layer without window",
            patch_config(
                QWEN3_CONFIG,
                r#"{"layer_types": ["sliding_attention", "full_attention"]}"#,
            ),
            "sliding_window",
        ),
        (
            "zero window",
            patch_config(GPT_OSS_CONFIG, r#"{"sliding_window": 0}"#),
            "sliding_window",
        ),
        (
            "activation",
            patch_config(QWEN3_CONFIG, r#"{"hidden_act": "gelu"}"#),
            "hidden_act",
        ),
        (
            "shared experts",
            patch_config(MIMO_HUB, r#"{"n_shared_experts": 1}"#),
            "n_shared_experts",
        ),
        (
            "scoring func",
            patch_config(MIMO_HUB, r#"{"scoring_func": "softmax"}"#),
            "scoring_func",
        ),
        (
            "n_group",
            patch_config(MIMO_CONFIG, r#"{"n_group": 3}"#),
            "n_group",
        ),
        (
            "topk_group",
            patch_config(MIMO_CONFIG, r#"{"n_group": 2, "topk_group": 3}"#),
            "topk_group",
        ),
        (
            "gpt-oss dense layer",
            patch_config(
                GPT_OSS_CONFIG,
                r#"{"mlp_layer_types": ["dense", "sparse"], "intermediate_size": 32}"#,
            ),
            "mlp_layer_types",
        ),
        (
            "v_head_dim outside MiMo",
            patch_config(QWEN3_CONFIG, r#"{"v_head_dim": 8}"#),
            "v_head_dim",
        ),
        (
            "mimo attention bias",
            patch_config(MIMO_CONFIG, r#"{"attention_bias": true}"#),
            "attention_bias",
        ),
        (
            "quant method",
            patch_config(
                QWEN3_CONFIG,
                r#"{"quantization_config": {"quant_method": "awq"}}"#,
            ),
            "quantization_config.quant_method",
        ),
        (
            "fp8 block size",
            patch_config(
                QWEN3_CONFIG,
                r#"{"quantization_config": {"quant_method": "fp8", "weight_block_size": [128]}}"#,
            ),
            "quantization_config.weight_block_size",
        ),
        (
            "mxfp4 qwen3",
            patch_config(
                QWEN3_CONFIG,
                r#"{"quantization_config": {"quant_method": "mxfp4"}}"#,
            ),
            "quantization_config.quant_method",
        ),
        (
            "eps zero",
            patch_config(QWEN3_CONFIG, r#"{"rms_norm_eps": 0}"#),
            "rms_norm_eps",
        ),
        (
            "eos not an id",
            patch_config(QWEN3_CONFIG, r#"{"eos_token_id": [1, -2]}"#),
            "eos_token_id[1]",
        ),
        (
            "bos too large",
            patch_config(QWEN3_CONFIG, r#"{"bos_token_id": 99999999999}"#),
            "bos_token_id",
        ),
        (
            "tie not bool",
            patch_config(QWEN3_CONFIG, r#"{"tie_word_embeddings": 1}"#),
            "tie_word_embeddings",
        ),
        (
            "swiglu limit",
            patch_config(GPT_OSS_CONFIG, r#"{"swiglu_limit": -1}"#),
            "swiglu_limit",
        ),
        (
            "qwen3 head_dim absent, not divisible",
            remove_keys(
                &patch_config(QWEN3_CONFIG, r#"{"hidden_size": 30}"#),
                &["head_dim"],
            ),
            "head_dim",
        ),
    ];
    for (what, json, field) in cases {
        let e = err(json);
        assert_eq!(e.field(), *field, "{what}: {e}");
        assert!(
            e.to_string().contains(field),
            "{what}: message {e} should name {field}"
        );
    }
}

#[test]
fn malformed_json() {
    for s in ["", "{", "[1, 2]", "null", "\"x\"", "{\"model_type\": }"] {
        let e = err(s);
        assert!(matches!(e, ConfigError::Json { .. }), "{s:?}: {e}");
    }
    assert_field(&err(r#"{"model_type": 3}"#), "model_type");
    assert_field(
        &err(&patch_config(QWEN3_CONFIG, r#"{"rope_parameters": [1]}"#)),
        "rope_parameters",
    );
}
