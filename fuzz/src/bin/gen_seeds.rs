//! Writes a seed corpus for `load_checkpoint`: tiny valid checkpoints of every architecture and
//! spelling (built from `model::spec::expected_tensors`), in single-file and sharded form.
//!
//! Usage: `cargo run --bin gen_seeds -- corpus/load_checkpoint`

use std::borrow::Cow;

use model::config::ModelConfig;
use model::spec::{expected_tensors, Form};
use safetensors::{Dtype, View};

struct T {
    dtype: Dtype,
    shape: Vec<usize>,
    data: Vec<u8>,
}

impl View for &T {
    fn dtype(&self) -> Dtype {
        self.dtype
    }
    fn shape(&self) -> &[usize] {
        &self.shape
    }
    fn data(&self) -> Cow<'_, [u8]> {
        Cow::Borrowed(&self.data)
    }
    fn data_len(&self) -> usize {
        self.data.len()
    }
}

fn bf16(n: usize, seed: &mut u32) -> Vec<u8> {
    (0..n)
        .flat_map(|_| {
            *seed = seed.wrapping_mul(1664525).wrapping_add(1013904223);
            let x = ((*seed >> 8) as f32 / (1u32 << 24) as f32) - 0.5;
            half::bf16::from_f32(x).to_bits().to_le_bytes()
        })
        .collect()
}

fn build(config: &str, mxfp4: bool, sink_alias: bool) -> Vec<u8> {
    let cfg = ModelConfig::from_json_str(config).expect("seed config parses");
    let mut seed = 1u32;
    let mut ts: Vec<(String, T)> = Vec::new();
    for spec in expected_tensors(&cfg) {
        let name = if sink_alias && spec.names.len() > 1 {
            spec.names[1].clone()
        } else {
            spec.names[0].clone()
        };
        let form = if mxfp4 {
            spec.forms
                .iter()
                .find(|f| matches!(f, Form::Mxfp4 { .. }))
                .unwrap_or(&spec.forms[0])
        } else {
            &spec.forms[0]
        };
        match form {
            Form::Dense { shape, .. } => {
                let n: usize = shape.iter().product();
                let t = if name.ends_with("e_score_correction_bias") {
                    T {
                        dtype: Dtype::F32,
                        shape: shape.clone(),
                        data: (0..n)
                            .flat_map(|i| (i as f32 * 0.1).to_le_bytes())
                            .collect(),
                    }
                } else {
                    T {
                        dtype: Dtype::BF16,
                        shape: shape.clone(),
                        data: bf16(n, &mut seed),
                    }
                };
                ts.push((name, t));
            }
            Form::Mxfp4 { experts, rows, k } => {
                let lead: Vec<usize> = experts.iter().copied().collect();
                let e = experts.unwrap_or(1);
                let nb = e * rows * k / 32;
                let mut bs = lead.clone();
                bs.extend([*rows, k / 32, 16]);
                let mut ss = lead;
                ss.extend([*rows, k / 32]);
                let blocks = (0..nb * 16).map(|i| (i * 37 % 251) as u8).collect();
                let scales = (0..nb).map(|i| 120 + (i % 9) as u8).collect();
                ts.push((
                    format!("{name}_blocks"),
                    T {
                        dtype: Dtype::U8,
                        shape: bs,
                        data: blocks,
                    },
                ));
                ts.push((
                    format!("{name}_scales"),
                    T {
                        dtype: Dtype::U8,
                        shape: ss,
                        data: scales,
                    },
                ));
            }
        }
    }
    safetensors::serialize(ts.iter().map(|(k, v)| (k.clone(), v)), None).expect("serialize")
}

const GPT_OSS: &str = r#"{"model_type":"gpt_oss","vocab_size":8,"hidden_size":32,"intermediate_size":32,
"num_hidden_layers":2,"num_attention_heads":2,"num_key_value_heads":1,"head_dim":16,
"num_local_experts":2,"num_experts_per_tok":1,"sliding_window":4,"eos_token_id":1,
"rope_parameters":{"rope_type":"yarn","rope_theta":150000.0,"factor":32.0,"beta_fast":32.0,"beta_slow":1.0,"truncate":false,"original_max_position_embeddings":4096}}"#;
const GPT_OSS_HUB: &str = r#"{"architectures":["GptOssForCausalLM"],"vocab_size":8,"hidden_size":32,"intermediate_size":32,
"num_hidden_layers":2,"num_attention_heads":2,"num_key_value_heads":1,"head_dim":16,
"num_local_experts":2,"experts_per_token":1,"num_experts_per_tok":1,"sliding_window":4,"rope_theta":150000,
"rope_scaling":{"rope_type":"yarn","factor":32.0,"beta_fast":32.0,"beta_slow":1.0,"original_max_position_embeddings":4096,"truncate":false},
"swiglu_limit":7.0,"quantization_config":{"quant_method":"mxfp4","modules_to_not_convert":["lm_head"]}}"#;
const QWEN3: &str = r#"{"model_type":"qwen3_moe","vocab_size":8,"hidden_size":16,"intermediate_size":24,
"moe_intermediate_size":8,"num_hidden_layers":2,"num_attention_heads":2,"num_key_value_heads":1,"head_dim":8,
"num_local_experts":2,"num_experts_per_tok":1,"norm_topk_prob":true,"mlp_only_layers":[1],
"rope_parameters":{"rope_theta":1000000.0,"rope_type":"default"},"tie_word_embeddings":true}"#;
const QWEN3_HUB: &str = r#"{"architectures":["Qwen3MoeForCausalLM"],"model_type":"qwen3_moe","vocab_size":8,"hidden_size":16,
"moe_intermediate_size":8,"num_hidden_layers":1,"num_attention_heads":2,"num_key_value_heads":1,"head_dim":8,
"num_experts":2,"num_experts_per_tok":2,"rope_theta":1000000.0,"rope_scaling":null,"sliding_window":null,"use_sliding_window":false}"#;
const MIMO: &str = r#"{"model_type":"mimo_v2_flash","vocab_size":8,"hidden_size":16,"intermediate_size":24,
"moe_intermediate_size":8,"num_hidden_layers":2,"num_attention_heads":2,"num_key_value_heads":1,
"head_dim":12,"v_head_dim":8,"layer_types":["full_attention","sliding_attention"],
"mlp_layer_types":["dense","sparse"],"n_routed_experts":2,"num_experts_per_tok":1,"sliding_window":4,
"rope_parameters":{"full_attention":{"rope_type":"default","rope_theta":5000000.0,"partial_rotary_factor":0.334},
"sliding_attention":{"rope_type":"default","rope_theta":10000.0,"partial_rotary_factor":0.334}}}"#;
const MIMO_HUB: &str = r#"{"architectures":["MiMoV2FlashForCausalLM"],"model_type":"mimo_v2_flash","vocab_size":8,"hidden_size":16,
"intermediate_size":24,"moe_intermediate_size":8,"num_hidden_layers":2,"num_attention_heads":2,"num_key_value_heads":1,
"head_dim":12,"v_head_dim":8,"hybrid_layer_pattern":[0,1],"moe_layer_freq":[0,1],"n_routed_experts":2,
"num_experts_per_tok":1,"sliding_window_size":3,"layernorm_epsilon":1e-5,"rope_theta":5000000.0,"swa_rope_theta":10000.0,
"partial_rotary_factor":0.334,"routed_scaling_factor":null,"add_swa_attention_sink_bias":true,
"add_full_attention_sink_bias":false,"swa_num_key_value_heads":2,"scoring_func":"sigmoid","n_shared_experts":null}"#;

fn main() {
    let out = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "corpus/load_checkpoint".into());
    std::fs::create_dir_all(&out).expect("create corpus dir");
    let gen = br#"{"eos_token_id":[1,2],"pad_token_id":0}"#;
    let cases: Vec<(&str, &str, bool, bool)> = vec![
        ("gpt_oss_bf16", GPT_OSS, false, false),
        ("gpt_oss_mxfp4", GPT_OSS_HUB, true, false),
        ("qwen3", QWEN3, false, false),
        ("qwen3_hub", QWEN3_HUB, false, false),
        ("mimo", MIMO, false, false),
        ("mimo_hub", MIMO_HUB, false, true),
    ];
    let mut n = 0;
    for (name, cfg, mx, alias) in cases {
        let st = build(cfg, mx, alias);
        // Check that each seed really loads.
        for flags in [0u8, ultra_fuzz::GEN_CONFIG, ultra_fuzz::SHARDED] {
            let mut config = cfg.as_bytes().to_vec();
            if flags & ultra_fuzz::GEN_CONFIG != 0 {
                config.push(0);
                config.extend_from_slice(gen);
            }
            let input = ultra_fuzz::encode(flags, &config, &st);
            assert!(
                ultra_fuzz::run(&input),
                "seed {name} (flags {flags}) must load"
            );
            std::fs::write(format!("{out}/{name}_{flags}"), &input).expect("write seed");
            n += 1;
        }
    }
    println!("wrote {n} seeds to {out}");
}
