//! `footprint` against the hand arithmetic of research/models.md §6.1 for gpt-oss-20b, built
//! from the config types directly (the JSON path is tested where the real config.json is loaded).

use model::config::{Activation, Arch, AttnKind, LayerSpec, ModelConfig, Rope, RouterSpec, Yarn};
use model::footprint::{Footprint, StoragePlan};

fn gpt_oss_20b() -> ModelConfig {
    let rope = Rope {
        theta: 150000.0,
        rotary_dim: 64,
        yarn: Some(Yarn::gpt_oss()),
    };
    let layers = (0..24)
        .map(|l| LayerSpec {
            attn: if l % 2 == 0 {
                AttnKind::Sliding { window: 128 }
            } else {
                AttnKind::Full
            },
            n_heads: 64,
            n_kv_heads: 8,
            head_dim: 64,
            v_head_dim: 64,
            rope,
            sinks: true,
            qk_norm: false,
            attn_bias: true,
            moe: true,
        })
        .collect();
    ModelConfig {
        arch: Arch::GptOss,
        vocab_size: 201088,
        hidden_size: 2880,
        layers,
        rms_norm_eps: 1e-5,
        n_experts: 32,
        top_k: 4,
        moe_intermediate_size: 2880,
        dense_intermediate_size: None,
        router: RouterSpec::GptOss,
        activation: Activation::ClampedSwiglu {
            alpha: 1.702,
            limit: 7.0,
        },
        value_scale: 1.0,
        tie_word_embeddings: false,
        max_position_embeddings: 131072,
        bos_token_id: None,
        eos_token_ids: vec![200002],
        pad_token_id: Some(199999),
    }
}

#[test]
fn gpt_oss_20b_matches_the_hand_count() {
    let f = Footprint::new(&gpt_oss_20b(), StoragePlan::MXFP4_EXPERTS);
    // research/models.md §6.1 (+ the final norm, 2880 parameters, which it leaves out).
    assert_eq!(f.active_params, 3_608_307_264);
    assert_eq!(f.total_params, 20_914_757_184);
    assert_eq!(f.embedding_params, 579_133_440);
    assert!(
        (f.bytes_per_token - 3_708_083_328.0).abs() < 1.0,
        "{}",
        f.bytes_per_token
    );
    // 1.271 GB of it is experts (24 layers × 4 × 13,219,200 B + bf16 biases).
    assert!((f.expert_bytes_per_token - 1_270_702_080.0).abs() < 1.0);
    // 809 tok/s at 3.0 TB/s.
    assert_eq!(f.roofline_tokens_per_s(3.0e12, 0.0).round(), 809.0);
}

#[test]
fn kv_bytes_respect_sliding_windows() {
    let cfg = gpt_oss_20b();
    // 12 full layers × 8192 + 12 sliding × 128 positions, 8 kv heads × (64 + 64) × 2 bytes.
    let want = (12 * 8192 + 12 * 128) as f64 * 8.0 * 128.0 * 2.0;
    assert_eq!(
        Footprint::kv_bytes(&cfg, StoragePlan::MXFP4_EXPERTS, 8192),
        want
    );
}

#[test]
fn storage_plan_from_config_json() {
    let mx: serde_json::Value =
        serde_json::json!({"quantization_config": {"quant_method": "mxfp4"}});
    assert_eq!(
        StoragePlan::from_config_json(&mx),
        StoragePlan::MXFP4_EXPERTS
    );
    let plain = serde_json::json!({"torch_dtype": "bfloat16"});
    assert_eq!(StoragePlan::from_config_json(&plain), StoragePlan::BF16);
    let fp8 = serde_json::json!({"quantization_config": {"quant_method": "fp8", "weight_block_size": [128, 128]}});
    let p = StoragePlan::from_config_json(&fp8);
    assert_eq!(p.expert_bytes_per_weight, 1.0 + 4.0 / 16384.0);
}
