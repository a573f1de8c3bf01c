//! Tiny random drafters for tests (here, in the CLI and in GPU executors): any target's hidden
//! size and vocabulary, in the z-lab and MiMo shapes. The configs are built as `config.json`
//! values and go through [`DrafterConfig::from_json_str`], so they exercise the parser too.
//!
//! Weights are uniform with standard deviation 0.1 (norm weights `1 + 0.1·u`, sinks `0.5·u`),
//! deterministic in the seed — the distribution of `model::cpu::toy`. An untrained drafter
//! proposes near-random tokens; speculative output must not depend on that.

use model::config::ModelConfig;
use model::cpu::toy::ToyGen;
use model::weights::{Attention, Layer, Mlp};
use serde_json::{json, Value};

use crate::config::DrafterConfig;
use crate::drafter::{Drafter, DrafterWeights};

/// Which checkpoint shape to imitate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ToyKind {
    /// z-lab DFlash-1: two full-attention (non-causal) layers, θ 1e6, full RoPE.
    ZLab,
    /// z-lab with `layer_types` `[sliding_attention, full_attention]`: a causal sliding layer
    /// (window 4) and a non-causal full layer; YaRN RoPE (factor 4).
    ZLabMixed,
    /// MiMo: every layer sliding (window 4) and non-causal (`use_swa`), attention sinks, value
    /// scale 0.612, partial RoPE (half the head, θ 1e4; `backbone_rotary_base` 5e6 recorded), a
    /// separate mask embedding.
    MiMo,
}

/// The sliding window of the toy drafters.
pub const TOY_DRAFT_WINDOW: usize = 4;

/// Target layers the toys read: the first, the middle and the last (the last one's state is
/// the executor's post-final-norm hidden index, as HF's `hidden_states[-1]`).
pub fn toy_target_layers(num_target_layers: usize) -> Vec<usize> {
    let mut ids = vec![
        0,
        num_target_layers / 2,
        num_target_layers.saturating_sub(1),
    ];
    ids.dedup();
    ids
}

/// A toy drafter `config.json` for `target`: 2 layers, 4 heads / 2 KV heads of 16,
/// intermediate 2·H, mask token `vocab − 1`.
pub fn config_json(target: &ModelConfig, kind: ToyKind, block_size: usize) -> Value {
    let h = target.hidden_size;
    let nl = target.layers.len();
    let ids = toy_target_layers(nl);
    let mask = target.vocab_size - 1;
    let mut v = json!({
        "architectures": ["DFlashDraftModel"],
        "model_type": "qwen3",
        "hidden_size": h,
        "intermediate_size": 2 * h,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 16,
        "hidden_act": "silu",
        "attention_bias": false,
        "tie_word_embeddings": false,
        "vocab_size": target.vocab_size,
        "num_target_layers": nl,
        "max_position_embeddings": 4096,
    });
    let o = v.as_object_mut().expect("object");
    match kind {
        ToyKind::ZLab | ToyKind::ZLabMixed => {
            o.insert("block_size".into(), json!(block_size));
            o.insert("rms_norm_eps".into(), json!(1e-6));
            o.insert("rope_theta".into(), json!(1e6));
            o.insert(
                "dflash_config".into(),
                json!({"mask_token_id": mask, "target_layer_ids": ids}),
            );
            if kind == ToyKind::ZLab {
                o.insert(
                    "layer_types".into(),
                    json!(["full_attention", "full_attention"]),
                );
                o.insert("rope_scaling".into(), Value::Null);
                o.insert("sliding_window".into(), Value::Null);
                o.insert("use_sliding_window".into(), json!(false));
            } else {
                o.insert(
                    "layer_types".into(),
                    json!(["sliding_attention", "full_attention"]),
                );
                o.insert("sliding_window".into(), json!(TOY_DRAFT_WINDOW));
                o.insert("use_sliding_window".into(), json!(true));
                o.insert(
                    "rope_scaling".into(),
                    json!({"rope_type": "yarn", "factor": 4.0,
                           "original_max_position_embeddings": 1024}),
                );
            }
        }
        ToyKind::MiMo => {
            o.insert("block_size".into(), json!(block_size));
            o.insert("v_head_dim".into(), json!(16));
            o.insert("partial_rotary_factor".into(), json!(0.5));
            o.insert("rope_theta".into(), json!(10000));
            o.insert("sliding_window".into(), json!(TOY_DRAFT_WINDOW));
            o.insert("rms_norm_eps".into(), json!(1e-5));
            o.insert(
                "dflash_config".into(),
                json!({
                    "target_layer_ids": ids,
                    "mask_token_id": mask,
                    "num_anchors": 64,
                    "block_size": block_size,
                    "loss_decay_gamma": 4.0,
                    "use_swa": true,
                    "swa_window_size": TOY_DRAFT_WINDOW,
                    "backbone_rotary_base": 5_000_000,
                    "attention_value_scale": 0.612,
                    "attention_sink_bias": true,
                }),
            );
        }
    }
    v
}

/// Random weights for a drafter config reading targets of hidden size `target_hidden`. A mask
/// embedding is drawn when `mask_embedding` is set.
pub fn random_weights(
    cfg: &DrafterConfig,
    target_hidden: usize,
    mask_embedding: bool,
    seed: u64,
) -> DrafterWeights {
    let mut g = ToyGen::new(seed);
    let (h, nh, nkv, d, i) = (
        cfg.hidden_size,
        cfg.n_heads,
        cfg.n_kv_heads,
        cfg.head_dim,
        cfg.intermediate_size,
    );
    let b = cfg.attention_bias;
    let fc = g.mat(h, cfg.num_features() * target_hidden);
    let hidden_norm = g.norm(h);
    let layers = (0..cfg.num_layers())
        .map(|_| Layer {
            input_norm: g.norm(h),
            attn: Attention {
                q: g.linear(nh * d, h, b.then_some(0.1)),
                k: g.linear(nkv * d, h, b.then_some(0.1)),
                v: g.linear(nkv * d, h, b.then_some(0.1)),
                o: g.linear(h, nh * d, b.then_some(0.1)),
                q_norm: Some(g.norm(d)),
                k_norm: Some(g.norm(d)),
                sinks: cfg.sinks.then(|| g.vec(nh, 0.5)),
            },
            post_attn_norm: g.norm(h),
            mlp: Mlp::Dense {
                gate_up: g.linear(2 * i, h, None),
                down: g.linear(h, i, None),
            },
        })
        .collect();
    let norm = g.norm(h);
    let mask_embedding = mask_embedding.then(|| g.vec(h, 0.1));
    DrafterWeights {
        fc,
        hidden_norm,
        layers,
        norm,
        mask_embedding,
    }
}

/// A toy drafter for `target` (see [`config_json`] and [`random_weights`]).
pub fn drafter(target: &ModelConfig, kind: ToyKind, block_size: usize, seed: u64) -> Drafter {
    let text = config_json(target, kind, block_size).to_string();
    let cfg = DrafterConfig::from_json_str(&text).expect("toy drafter config parses");
    let w = random_weights(&cfg, target.hidden_size, kind == ToyKind::MiMo, seed);
    let d = Drafter::new(cfg, w).expect("toy drafter weights match the config");
    d.check_target(target).expect("toy drafter fits its target");
    d
}
