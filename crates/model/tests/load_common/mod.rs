//! Shared helpers of the `load_*` tests: temp dirs, synthetic safetensors files and tiny
//! configs of the three architectures.
#![allow(dead_code)]

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};

use safetensors::{Dtype, View};

/// A temp directory removed on drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> TempDir {
        static N: AtomicUsize = AtomicUsize::new(0);
        let p = std::env::temp_dir().join(format!(
            "ultra-load-{tag}-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).expect("create temp dir");
        TempDir(p)
    }
    pub fn path(&self) -> &Path {
        &self.0
    }
    pub fn write(&self, name: &str, bytes: impl AsRef<[u8]>) {
        std::fs::write(self.0.join(name), bytes).expect("write temp file");
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// An owned tensor for `safetensors::serialize`.
#[derive(Debug, Clone, PartialEq)]
pub struct T {
    pub dtype: Dtype,
    pub shape: Vec<usize>,
    pub data: Vec<u8>,
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

pub type Tensors = BTreeMap<String, T>;

/// Serializes tensors to safetensors bytes.
pub fn serialize(ts: &Tensors) -> Vec<u8> {
    safetensors::serialize(ts.iter().map(|(k, v)| (k.clone(), v)), None).expect("serialize")
}

/// A deterministic xorshift generator.
pub struct Rng(pub u64);

impl Rng {
    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }
    /// Uniform in [-1, 1), rounded to bf16 (so bf16 storage is exact).
    pub fn val(&mut self) -> f32 {
        let u = (self.next_u64() >> 40) as f32 / (1u64 << 24) as f32;
        bf16_round(2.0 * u - 1.0)
    }
    pub fn vals(&mut self, n: usize) -> Vec<f32> {
        (0..n).map(|_| self.val()).collect()
    }
}

pub fn bf16_round(x: f32) -> f32 {
    half::bf16::from_f32(x).to_f32()
}

pub fn bf16(shape: &[usize], v: &[f32]) -> T {
    assert_eq!(shape.iter().product::<usize>(), v.len());
    T {
        dtype: Dtype::BF16,
        shape: shape.to_vec(),
        data: v
            .iter()
            .flat_map(|x| half::bf16::from_f32(*x).to_bits().to_le_bytes())
            .collect(),
    }
}

pub fn f16(shape: &[usize], v: &[f32]) -> T {
    T {
        dtype: Dtype::F16,
        shape: shape.to_vec(),
        data: v
            .iter()
            .flat_map(|x| half::f16::from_f32(*x).to_bits().to_le_bytes())
            .collect(),
    }
}

pub fn f32t(shape: &[usize], v: &[f32]) -> T {
    T {
        dtype: Dtype::F32,
        shape: shape.to_vec(),
        data: v.iter().flat_map(|x| x.to_le_bytes()).collect(),
    }
}

pub fn u8t(shape: &[usize], v: Vec<u8>) -> T {
    T {
        dtype: Dtype::U8,
        shape: shape.to_vec(),
        data: v,
    }
}

/// Random bf16 tensor.
pub fn rand_bf16(rng: &mut Rng, shape: &[usize]) -> T {
    let n = shape.iter().product();
    bf16(shape, &rng.vals(n))
}

/// Decodes a BF16 test tensor.
pub fn bf16_vals(t: &T) -> Vec<f32> {
    t.data
        .chunks_exact(2)
        .map(|b| half::bf16::from_bits(u16::from_le_bytes([b[0], b[1]])).to_f32())
        .collect()
}

// ---------------------------------------------------------------------------------------------
// Tiny configs (transformers-5 spelling) and matching random checkpoints, written independently
// of `model::spec` so the spec itself is tested.
// ---------------------------------------------------------------------------------------------

pub const GPT_OSS_CONFIG: &str = r#"{
  "architectures": ["GptOssForCausalLM"],
  "model_type": "gpt_oss",
  "vocab_size": 40, "hidden_size": 64, "intermediate_size": 32,
  "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16,
  "num_local_experts": 4, "num_experts_per_tok": 2,
  "layer_types": ["sliding_attention", "full_attention"], "sliding_window": 4,
  "max_position_embeddings": 4096, "rms_norm_eps": 1e-05,
  "rope_parameters": {"rope_type": "yarn", "rope_theta": 150000.0, "factor": 32.0,
     "beta_fast": 32.0, "beta_slow": 1.0, "truncate": false, "original_max_position_embeddings": 4096},
  "swiglu_alpha": 1.702, "swiglu_limit": 7.0, "attention_bias": true,
  "tie_word_embeddings": false, "eos_token_id": 1, "pad_token_id": 0
}"#;

pub const QWEN3_CONFIG: &str = r#"{
  "architectures": ["Qwen3MoeForCausalLM"], "model_type": "qwen3_moe",
  "vocab_size": 40, "hidden_size": 32, "intermediate_size": 48, "moe_intermediate_size": 16,
  "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16,
  "num_local_experts": 4, "num_experts_per_tok": 2, "norm_topk_prob": true,
  "decoder_sparse_step": 1, "mlp_only_layers": [], "rms_norm_eps": 1e-06,
  "rope_parameters": {"rope_theta": 1000000.0, "rope_type": "default"},
  "max_position_embeddings": 4096, "tie_word_embeddings": false,
  "use_sliding_window": false, "sliding_window": null, "eos_token_id": 1, "pad_token_id": 0
}"#;

pub const MIMO_CONFIG: &str = r#"{
  "architectures": ["MiMoV2FlashForCausalLM"], "model_type": "mimo_v2_flash",
  "vocab_size": 40, "hidden_size": 32, "intermediate_size": 48, "moe_intermediate_size": 16,
  "num_hidden_layers": 3, "num_attention_heads": 4, "num_key_value_heads": 1,
  "head_dim": 24, "v_head_dim": 16,
  "layer_types": ["full_attention", "sliding_attention", "full_attention"],
  "mlp_layer_types": ["dense", "sparse", "sparse"],
  "n_routed_experts": 4, "num_experts_per_tok": 2, "n_group": 1, "topk_group": 1,
  "norm_topk_prob": true, "routed_scaling_factor": 1.0, "attention_value_scale": 0.707,
  "rms_norm_eps": 1e-05, "sliding_window": 4, "max_position_embeddings": 4096,
  "rope_parameters": {
    "full_attention": {"rope_type": "default", "rope_theta": 5000000.0, "partial_rotary_factor": 0.334},
    "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.334}
  },
  "tie_word_embeddings": false, "eos_token_id": 1, "pad_token_id": 0
}"#;

/// gpt-oss tensors. `mxfp4`: experts as `_blocks`/`_scales` (the same values as the bf16 form,
/// which is built from the dequantized MXFP4 so both forms hold identical weights).
/// (V, H, I, L, E, heads, kv, hd) = (40, 64, 32, 2, 4, 4, 2, 16).
pub fn gpt_oss_tensors(seed: u64, mxfp4: bool) -> Tensors {
    let (v, h, i, l, e, nh, nkv, hd) = (40, 64, 32, 2, 4, 4, 2, 16);
    let mut r = Rng(seed);
    let mut m = Tensors::new();
    m.insert(
        "model.embed_tokens.weight".into(),
        rand_bf16(&mut r, &[v, h]),
    );
    m.insert("lm_head.weight".into(), rand_bf16(&mut r, &[v, h]));
    m.insert("model.norm.weight".into(), rand_bf16(&mut r, &[h]));
    for li in 0..l {
        let p = format!("model.layers.{li}.");
        let mut put = |n: &str, t: T| {
            m.insert(format!("{p}{n}"), t);
        };
        put("input_layernorm.weight", rand_bf16(&mut r, &[h]));
        put("post_attention_layernorm.weight", rand_bf16(&mut r, &[h]));
        put("self_attn.q_proj.weight", rand_bf16(&mut r, &[nh * hd, h]));
        put("self_attn.q_proj.bias", rand_bf16(&mut r, &[nh * hd]));
        put("self_attn.k_proj.weight", rand_bf16(&mut r, &[nkv * hd, h]));
        put("self_attn.k_proj.bias", rand_bf16(&mut r, &[nkv * hd]));
        put("self_attn.v_proj.weight", rand_bf16(&mut r, &[nkv * hd, h]));
        put("self_attn.v_proj.bias", rand_bf16(&mut r, &[nkv * hd]));
        put("self_attn.o_proj.weight", rand_bf16(&mut r, &[h, nh * hd]));
        put("self_attn.o_proj.bias", rand_bf16(&mut r, &[h]));
        put("self_attn.sinks", rand_bf16(&mut r, &[nh]));
        put("mlp.router.weight", rand_bf16(&mut r, &[e, h]));
        put("mlp.router.bias", rand_bf16(&mut r, &[e]));
        put(
            "mlp.experts.gate_up_proj_bias",
            rand_bf16(&mut r, &[e, 2 * i]),
        );
        put("mlp.experts.down_proj_bias", rand_bf16(&mut r, &[e, h]));
        // Experts in checkpoint orientation [E, out, in], quantized to MXFP4.
        for (name, out, fan_in) in [("gate_up_proj", 2 * i, h), ("down_proj", h, i)] {
            let mut blocks = Vec::new();
            let mut scales = Vec::new();
            let mut dense_in_out = vec![0f32; e * fan_in * out];
            for x in 0..e {
                let w = r.vals(out * fan_in);
                let q = fp4::quantize_matrix(&w, out, fan_in, fp4::ScaleRounding::Floor).unwrap();
                let dq = fp4::dequantize(q.view().unwrap());
                for o in 0..out {
                    for j in 0..fan_in {
                        // transformers' bf16 layout [E, in, out]
                        dense_in_out[x * fan_in * out + j * out + o] = dq[o * fan_in + j];
                    }
                }
                blocks.extend_from_slice(&q.blocks);
                scales.extend_from_slice(&q.scales);
            }
            if mxfp4 {
                put(
                    &format!("mlp.experts.{name}_blocks"),
                    u8t(&[e, out, fan_in / 32, 16], blocks),
                );
                put(
                    &format!("mlp.experts.{name}_scales"),
                    u8t(&[e, out, fan_in / 32], scales),
                );
            } else {
                put(
                    &format!("mlp.experts.{name}"),
                    bf16(&[e, fan_in, out], &dense_in_out),
                );
            }
        }
    }
    m
}

/// Qwen3-MoE tensors for `QWEN3_CONFIG`: (V, H, I, L, E, heads, kv, hd) = (40, 32, 16, 2, 4, 4, 2, 16).
pub fn qwen3_tensors(seed: u64) -> Tensors {
    let (v, h, i, l, e, nh, nkv, hd) = (40, 32, 16, 2, 4, 4, 2, 16);
    let mut r = Rng(seed);
    let mut m = Tensors::new();
    m.insert(
        "model.embed_tokens.weight".into(),
        rand_bf16(&mut r, &[v, h]),
    );
    m.insert("lm_head.weight".into(), rand_bf16(&mut r, &[v, h]));
    m.insert("model.norm.weight".into(), rand_bf16(&mut r, &[h]));
    for li in 0..l {
        let p = format!("model.layers.{li}.");
        let mut put = |n: &str, t: T| {
            m.insert(format!("{p}{n}"), t);
        };
        put("input_layernorm.weight", rand_bf16(&mut r, &[h]));
        put("post_attention_layernorm.weight", rand_bf16(&mut r, &[h]));
        put("self_attn.q_proj.weight", rand_bf16(&mut r, &[nh * hd, h]));
        put("self_attn.k_proj.weight", rand_bf16(&mut r, &[nkv * hd, h]));
        put("self_attn.v_proj.weight", rand_bf16(&mut r, &[nkv * hd, h]));
        put("self_attn.o_proj.weight", rand_bf16(&mut r, &[h, nh * hd]));
        put("self_attn.q_norm.weight", rand_bf16(&mut r, &[hd]));
        put("self_attn.k_norm.weight", rand_bf16(&mut r, &[hd]));
        put("mlp.gate.weight", rand_bf16(&mut r, &[e, h]));
        for x in 0..e {
            put(
                &format!("mlp.experts.{x}.gate_proj.weight"),
                rand_bf16(&mut r, &[i, h]),
            );
            put(
                &format!("mlp.experts.{x}.up_proj.weight"),
                rand_bf16(&mut r, &[i, h]),
            );
            put(
                &format!("mlp.experts.{x}.down_proj.weight"),
                rand_bf16(&mut r, &[h, i]),
            );
        }
    }
    m
}

/// MiMo tensors for `MIMO_CONFIG`: layers full(dense) / sliding(MoE) / full(MoE); full layers 1
/// KV head, sliding 2; qk 24, v 16; sinks on the sliding layer under `sink_name`
/// (`sinks` or `attention_sink_bias`); plus an `model.mtp.*` tensor to be ignored.
pub fn mimo_tensors(seed: u64, sink_name: &str) -> Tensors {
    let (v, h, i, id, e, nh, hd, vd) = (40, 32, 16, 48, 4, 4, 24, 16);
    let mut r = Rng(seed);
    let mut m = Tensors::new();
    m.insert(
        "model.embed_tokens.weight".into(),
        rand_bf16(&mut r, &[v, h]),
    );
    m.insert("lm_head.weight".into(), rand_bf16(&mut r, &[v, h]));
    m.insert("model.norm.weight".into(), rand_bf16(&mut r, &[h]));
    m.insert(
        "model.mtp.0.extra.weight".into(),
        rand_bf16(&mut r, &[3, 5]),
    );
    for li in 0..3 {
        let sliding = li == 1;
        let nkv = if sliding { 2 } else { 1 };
        let p = format!("model.layers.{li}.");
        let mut put = |n: &str, t: T| {
            m.insert(format!("{p}{n}"), t);
        };
        put("input_layernorm.weight", rand_bf16(&mut r, &[h]));
        put("post_attention_layernorm.weight", rand_bf16(&mut r, &[h]));
        put("self_attn.q_proj.weight", rand_bf16(&mut r, &[nh * hd, h]));
        put("self_attn.k_proj.weight", rand_bf16(&mut r, &[nkv * hd, h]));
        put("self_attn.v_proj.weight", rand_bf16(&mut r, &[nkv * vd, h]));
        put("self_attn.o_proj.weight", rand_bf16(&mut r, &[h, nh * vd]));
        if sliding {
            put(&format!("self_attn.{sink_name}"), rand_bf16(&mut r, &[nh]));
        }
        if li == 0 {
            put("mlp.gate_proj.weight", rand_bf16(&mut r, &[id, h]));
            put("mlp.up_proj.weight", rand_bf16(&mut r, &[id, h]));
            put("mlp.down_proj.weight", rand_bf16(&mut r, &[h, id]));
        } else {
            put("mlp.gate.weight", rand_bf16(&mut r, &[e, h]));
            let bias: Vec<f32> = (0..e).map(|x| 0.1 + x as f32 / 3.0).collect();
            put("mlp.gate.e_score_correction_bias", f32t(&[e], &bias));
            for x in 0..e {
                put(
                    &format!("mlp.experts.{x}.gate_proj.weight"),
                    rand_bf16(&mut r, &[i, h]),
                );
                put(
                    &format!("mlp.experts.{x}.up_proj.weight"),
                    rand_bf16(&mut r, &[i, h]),
                );
                put(
                    &format!("mlp.experts.{x}.down_proj.weight"),
                    rand_bf16(&mut r, &[h, i]),
                );
            }
        }
    }
    m
}

/// Writes `config.json` + `model.safetensors`.
pub fn write_model(dir: &TempDir, config: &str, ts: &Tensors) {
    dir.write("config.json", config);
    dir.write("model.safetensors", serialize(ts));
}

/// Adds/replaces top-level keys of a JSON config.
pub fn patch_config(config: &str, patch: &str) -> String {
    let mut v: serde_json::Value = serde_json::from_str(config).unwrap();
    let p: serde_json::Value = serde_json::from_str(patch).unwrap();
    for (k, x) in p.as_object().unwrap() {
        v[k] = x.clone();
    }
    v.to_string()
}

/// Removes top-level keys of a JSON config.
pub fn remove_keys(config: &str, keys: &[&str]) -> String {
    let mut v: serde_json::Value = serde_json::from_str(config).unwrap();
    for k in keys {
        v.as_object_mut().unwrap().remove(*k);
    }
    v.to_string()
}

/// Every tensor of the tiny released-layout `mimo_v2` fixture in `dir` (`fixtures/mimo-v2/fp4`:
/// both shards and the MTP file), by name.
pub fn mimo_v2_fixture_tensors(dir: &Path) -> Tensors {
    let mut out = Tensors::new();
    for f in [
        "model-00001-of-00002.safetensors",
        "model-00002-of-00002.safetensors",
        "model_mtp.safetensors",
    ] {
        let bytes = std::fs::read(dir.join(f)).unwrap();
        let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
        for (name, v) in st.tensors() {
            out.insert(
                name,
                T {
                    dtype: v.dtype(),
                    shape: v.shape().to_vec(),
                    data: v.data().to_vec(),
                },
            );
        }
    }
    out
}
