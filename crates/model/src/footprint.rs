//! What a model costs: parameters (total / active per token), weight bytes read per decoded token,
//! KV-cache bytes, and the batch-1 decode roofline at a given memory bandwidth (`ultra inspect`).
//!
//! Counting rules (the arithmetic of `research/models.md` §6):
//! * total = every parameter once (tied embeddings once);
//! * active = what one decoded token touches, *excluding* the input embedding (one row is read):
//!   attention, norms, routers, the top-k experts (with their biases), dense MLPs, the final norm
//!   and the LM head;
//! * bytes per token = active parameters × their storage size: experts as stored (MXFP4 = 17
//!   bytes per 32 weights; FP8 = 1 byte + one f32 scale per 128×128 block), everything else at the
//!   checkpoint's dense dtype (bf16 = 2 bytes), expert biases dense;
//! * KV bytes for a context of n tokens: full-attention layers hold n positions, sliding layers
//!   min(n, window); each position holds kv_heads × (head_dim + v_head_dim) values.

use serde_json::Value;

use crate::config::{AttnKind, ModelConfig, RouterSpec};

/// How the weights are stored, in bytes per weight.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StoragePlan {
    /// Expert matrices (not their biases).
    pub expert_bytes_per_weight: f64,
    /// Everything else, and the KV cache.
    pub dense_bytes_per_weight: f64,
    /// A short description ("MXFP4 experts, bf16 rest").
    pub label: &'static str,
}

impl StoragePlan {
    pub const BF16: StoragePlan = StoragePlan {
        expert_bytes_per_weight: 2.0,
        dense_bytes_per_weight: 2.0,
        label: "bf16",
    };
    pub const MXFP4_EXPERTS: StoragePlan = StoragePlan {
        expert_bytes_per_weight: 17.0 / 32.0,
        dense_bytes_per_weight: 2.0,
        label: "MXFP4 experts, bf16 rest",
    };

    /// Reads the plan from a raw `config.json`: `quantization_config.quant_method` `mxfp4` (or
    /// `fp8` with `store_dtype: mxfp4`) → MXFP4 experts; `fp8` → FP8 e4m3 experts with one f32 scale per
    /// `weight_block_size` block (128×128 by default); else the `torch_dtype` / `dtype` field
    /// (bf16 when absent).
    pub fn from_config_json(raw: &Value) -> StoragePlan {
        let dense = match raw
            .get("dtype")
            .or_else(|| raw.get("torch_dtype"))
            .and_then(Value::as_str)
        {
            Some("float32") => 4.0,
            _ => 2.0,
        };
        let q = raw.get("quantization_config");
        match q
            .and_then(|q| q.get("quant_method"))
            .and_then(Value::as_str)
        {
            Some("mxfp4") => StoragePlan {
                dense_bytes_per_weight: dense,
                ..StoragePlan::MXFP4_EXPERTS
            },
            // MiMo's FP4 checkpoints: fp8 with MXFP4 experts (the FP8 attention / dense MLP
            // and BF16 o_proj are counted at the dense dtype).
            Some("fp8")
                if q.and_then(|q| q.get("store_dtype")).and_then(Value::as_str)
                    == Some("mxfp4") =>
            {
                StoragePlan {
                    dense_bytes_per_weight: dense,
                    label: "MXFP4 experts (fp8 checkpoint, store_dtype mxfp4), dense rest",
                    ..StoragePlan::MXFP4_EXPERTS
                }
            }
            Some("fp8") => {
                let block: Vec<f64> = q
                    .and_then(|q| q.get("weight_block_size"))
                    .and_then(Value::as_array)
                    .map(|a| a.iter().filter_map(Value::as_f64).collect())
                    .unwrap_or_else(|| vec![128.0, 128.0]);
                let per_block: f64 = block.iter().product::<f64>().max(1.0);
                StoragePlan {
                    expert_bytes_per_weight: 1.0 + 4.0 / per_block,
                    dense_bytes_per_weight: dense,
                    label: "FP8 experts (block scales), dense rest",
                }
            }
            _ if dense == 4.0 => StoragePlan {
                expert_bytes_per_weight: 4.0,
                dense_bytes_per_weight: 4.0,
                label: "f32",
            },
            _ => StoragePlan::BF16,
        }
    }
}

/// The cost of one model.
#[derive(Debug, Clone, PartialEq)]
pub struct Footprint {
    pub total_params: u64,
    pub active_params: u64,
    /// Input embedding parameters (in `total_params`, not in `active_params`).
    pub embedding_params: u64,
    /// Weight bytes one decoded token reads (batch 1).
    pub bytes_per_token: f64,
    /// Of which routed experts (weights + biases).
    pub expert_bytes_per_token: f64,
    pub plan: StoragePlan,
}

/// Parameters of one layer's attention block.
fn attention_params(cfg: &ModelConfig, l: usize) -> u64 {
    let s = &cfg.layers[l];
    let h = cfg.hidden_size as u64;
    let (heads, kv, hd, vhd) = (
        s.n_heads as u64,
        s.n_kv_heads as u64,
        s.head_dim as u64,
        s.v_head_dim as u64,
    );
    let mut p = h * heads * hd + h * kv * hd + h * kv * vhd + heads * vhd * h;
    if s.attn_bias {
        p += heads * hd + kv * hd + kv * vhd + h;
    }
    if s.sinks {
        p += heads;
    }
    if s.qk_norm {
        p += 2 * hd;
    }
    p
}

/// (router parameters, one expert's matrix weights, one expert's bias parameters).
fn moe_params(cfg: &ModelConfig) -> (u64, u64, u64) {
    let (h, e, i) = (
        cfg.hidden_size as u64,
        cfg.n_experts as u64,
        cfg.moe_intermediate_size as u64,
    );
    let router = e * h
        + match cfg.router {
            // gpt-oss: router bias; sigmoid routers: the selection bias.
            RouterSpec::GptOss | RouterSpec::Sigmoid { .. } => e,
            RouterSpec::Qwen3 { .. } => 0,
        };
    let biases = if matches!(cfg.router, RouterSpec::GptOss) {
        2 * i + h
    } else {
        0
    };
    (router, 3 * h * i, biases)
}

impl Footprint {
    pub fn new(cfg: &ModelConfig, plan: StoragePlan) -> Footprint {
        let h = cfg.hidden_size as u64;
        let v = cfg.vocab_size as u64;
        let k = cfg.top_k as u64;
        let e = cfg.n_experts as u64;
        let (router, expert_w, expert_b) = moe_params(cfg);
        let dense_i = cfg.dense_intermediate_size.unwrap_or(0) as u64;
        let (d, x) = (plan.dense_bytes_per_weight, plan.expert_bytes_per_weight);
        let (mut total, mut active) = (0u64, 0u64);
        let (mut bytes, mut expert_bytes) = (0f64, 0f64);
        for (l, s) in cfg.layers.iter().enumerate() {
            let shared = attention_params(cfg, l) + 2 * h; // + the two norms
            total += shared;
            active += shared;
            bytes += shared as f64 * d;
            if s.moe {
                total += router + e * (expert_w + expert_b);
                active += router + k * (expert_w + expert_b);
                let eb = k as f64 * (expert_w as f64 * x + expert_b as f64 * d);
                bytes += router as f64 * d + eb;
                expert_bytes += eb;
            } else {
                let mlp = 3 * h * dense_i;
                total += mlp;
                active += mlp;
                bytes += mlp as f64 * d;
            }
        }
        let head = v * h;
        total += h + head + if cfg.tie_word_embeddings { 0 } else { head };
        active += h + head;
        bytes += (h + head) as f64 * d;
        Footprint {
            total_params: total,
            active_params: active,
            embedding_params: head,
            bytes_per_token: bytes,
            expert_bytes_per_token: expert_bytes,
            plan,
        }
    }

    /// KV-cache bytes for a context of `n` positions (at the plan's dense dtype).
    pub fn kv_bytes(cfg: &ModelConfig, plan: StoragePlan, n: usize) -> f64 {
        cfg.layers
            .iter()
            .map(|s| {
                let positions = match s.attn {
                    AttnKind::Full => n,
                    AttnKind::Sliding { window } => n.min(window),
                };
                (positions * s.n_kv_heads * (s.head_dim + s.v_head_dim)) as f64
                    * plan.dense_bytes_per_weight
            })
            .sum()
    }

    /// Batch-1 decode tokens per second if every token reads `bytes_per_token` (+ `extra` bytes,
    /// e.g. KV) at `bandwidth` bytes per second.
    pub fn roofline_tokens_per_s(&self, bandwidth: f64, extra: f64) -> f64 {
        bandwidth / (self.bytes_per_token + extra)
    }
}
