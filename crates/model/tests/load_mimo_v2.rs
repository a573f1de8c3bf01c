//! `model_type: mimo_v2` (MiMo-V2.5 / V2.5-Pro / the FP4-DFlash checkpoint):
//! * the released MiMo-V2.5-Pro config (`fixtures/configs/mimo-v2.5-pro.json`, research/mimo-v2.md
//!   §1.2) and its FP4 `quantization_config` parse to the expected dimensions;
//! * every unsupported value and every absent field whose default the sources dispute is
//!   refused with an error naming the field;
//! * `fixtures/mimo-v2/fp4` (released layout, `scripts/fixtures/make_mimo_v2.py`) loads: the
//!   fused, per-group padded FP8 `qkv_proj` splits into q / k / v whose every value equals the
//!   checkpoint's code × its group-local block scale (bit for bit), packed MXFP4 experts are
//!   views of the mapped file (two row segments when gate and up are not adjacent — both give
//!   bit-identical logits), the FP8 dense MLP's `[gate; up]` is two mapped row segments (never a
//!   copy of the codes), the MTP file is skipped;
//! * mis-shaped, missing, NaN-scaled and truncated tensors give errors naming the tensor / file.
//!
//! (The logits / hidden states / greedy tokens against the float64 reference are checked by
//! `cpu_goldens.rs`, which runs every fixture directory holding a `golden_f32.json`.)

mod load_common;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use load_common::{mimo_v2_fixture_tensors, serialize, TempDir, Tensors};
use model::checkpoint::{f8_e4m3_to_f32, Checkpoint};
use model::config::{Arch, AttnKind, ConfigError, ModelConfig, Quantization, RouterSpec};
use model::load::{load, LoadError};
use model::spec::SpecError;
use model::weights::{ExpertMat, Mlp};

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures")
}

fn fp4_dir() -> PathBuf {
    root().join("mimo-v2/fp4")
}

fn pro_config() -> String {
    std::fs::read_to_string(root().join("configs/mimo-v2.5-pro.json")).unwrap()
}

fn patch(config: &str, f: impl FnOnce(&mut serde_json::Value)) -> String {
    let mut v: serde_json::Value = serde_json::from_str(config).unwrap();
    f(&mut v);
    v.to_string()
}

#[test]
fn mimo_v25_pro_config() {
    let text = pro_config();
    let c = ModelConfig::from_json_str(&text).unwrap();
    assert_eq!(c.arch, Arch::MiMoV2);
    assert_eq!((c.vocab_size, c.hidden_size), (152576, 6144));
    assert_eq!(c.layers.len(), 70);
    let full: Vec<usize> = (0..70)
        .filter(|&l| c.layers[l].attn == AttnKind::Full)
        .collect();
    assert_eq!(full, vec![0, 7, 15, 23, 31, 39, 47, 55, 62, 69]);
    for (l, s) in c.layers.iter().enumerate() {
        let swa = !full.contains(&l);
        assert_eq!((s.n_heads, s.n_kv_heads), (128, 8), "layer {l}");
        assert_eq!((s.head_dim, s.v_head_dim), (192, 128), "layer {l}");
        assert_eq!(s.rope.rotary_dim, 64, "int(192 · 0.334)");
        assert_eq!(s.rope.theta, if swa { 1e4 } else { 1e7 }, "layer {l}");
        assert_eq!(s.sinks, swa, "sinks on sliding layers only");
        if swa {
            // Hub sliding_window_size 128 = 128 previous keys + the query.
            assert_eq!(s.attn, AttnKind::Sliding { window: 129 });
        }
        assert_eq!(s.moe, l != 0);
        assert!(!s.qk_norm && !s.attn_bias);
    }
    assert_eq!(
        (c.n_experts, c.top_k, c.moe_intermediate_size),
        (384, 8, 2048)
    );
    assert_eq!(c.dense_intermediate_size, Some(16384));
    assert_eq!(c.value_scale, 0.612);
    assert_eq!(
        c.router,
        RouterSpec::Sigmoid {
            n_group: 1,
            topk_group: 1,
            norm_topk_prob: true,
            routed_scaling_factor: 1.0
        }
    );
    // The fused qkv of V2.5-Pro: 8 groups of 16·192 + 192 + 128 = 3392 rows; 27 scale rows each.
    let t = model::spec::layer_tensors(&c, 1).unwrap();
    let f = t.qkv.unwrap().layout;
    assert_eq!((f.rows(), f.scale_rows(128)), (27136, 216));

    match Quantization::from_json_str(&text).unwrap() {
        Quantization::Fp8 {
            weight_block_size,
            mxfp4_experts,
            ignored_layers,
        } => {
            assert_eq!(weight_block_size, [128, 128]);
            assert!(!mxfp4_experts);
            assert_eq!(ignored_layers.len(), 71);
            assert_eq!(ignored_layers[69], "model.layers.69.self_attn.o_proj");
        }
        q => panic!("{q:?}"),
    }
    // The FP4-DFlash quantization_config (research/mimo-v2.md §1.3), and V2.6's bf16 router.
    let fp4 = patch(&text, |v| {
        v["quantization_config"]["store_dtype"] = "mxfp4".into();
        v["quantization_config"]["mxfp4_block_size"] = 32.into();
        v["rope_theta"] = 5_000_000.into();
        v["moe_router_dtype"] = "bfloat16".into();
    });
    let c4 = ModelConfig::from_json_str(&fp4).unwrap();
    assert_eq!(
        c4.layers[0].rope.theta, 5e6,
        "the loader takes what the config says"
    );
    assert!(matches!(
        Quantization::from_json_str(&fp4).unwrap(),
        Quantization::Fp8 {
            mxfp4_experts: true,
            ..
        }
    ));
    // The architectures spelling alone.
    let by_arch = patch(&text, |v| {
        v.as_object_mut().unwrap().remove("model_type");
    });
    assert_eq!(
        ModelConfig::from_json_str(&by_arch).unwrap().arch,
        Arch::MiMoV2
    );
}

fn err_of(config: &str) -> ConfigError {
    ModelConfig::from_json_str(config).expect_err("config must be refused")
}

#[test]
fn mimo_v2_config_refusals_name_the_field() {
    let text = pro_config();
    type Patch = fn(&mut serde_json::Value);
    let unsupported: Vec<(&str, Patch)> = vec![
        ("attention_projection_layout", |v| {
            v["attention_projection_layout"] = "packed_qkvo".into()
        }),
        ("swa_num_key_value_heads", |v| {
            v["swa_num_key_value_heads"] = 16.into()
        }),
        ("topk_method", |v| v["topk_method"] = "greedy".into()),
        ("moe_router_dtype", |v| {
            v["moe_router_dtype"] = "float16".into()
        }),
        ("quantization_config.fmt", |v| {
            v["quantization_config"]["fmt"] = "e5m2".into()
        }),
        ("quantization_config.activation_scheme", |v| {
            v["quantization_config"]["activation_scheme"] = "static".into()
        }),
        ("quantization_config.store_dtype", |v| {
            v["quantization_config"]["store_dtype"] = "nvfp4".into()
        }),
        ("quantization_config.mxfp4_block_size", |v| {
            v["quantization_config"]["store_dtype"] = "mxfp4".into();
            v["quantization_config"]["mxfp4_block_size"] = 16.into();
        }),
        ("scoring_func", |v| v["scoring_func"] = "softmax".into()),
        ("hidden_act", |v| v["hidden_act"] = "gelu".into()),
    ];
    for (field, f) in unsupported {
        let e = err_of(&patch(&text, f));
        assert!(
            matches!(e, ConfigError::Unsupported { .. }) && e.field() == field,
            "{field}: {e}"
        );
    }
    for field in [
        "rope_theta",
        "swa_rope_theta",
        "partial_rotary_factor",
        "attention_value_scale",
        "v_head_dim",
        "hybrid_layer_pattern",
        "moe_layer_freq",
    ] {
        let e = err_of(&patch(&text, |v| {
            v.as_object_mut().unwrap().remove(field);
        }));
        assert!(
            matches!(e, ConfigError::Missing { .. }) && e.field() == field,
            "{field}: {e}"
        );
    }
    let e = err_of(&patch(&text, |v| {
        let o = v.as_object_mut().unwrap();
        o.remove("sliding_window");
        o.remove("sliding_window_size");
    }));
    assert_eq!(e.field(), "sliding_window_size", "{e}");
    let e = err_of(&patch(&text, |v| {
        v["quantization_config"]["ignored_layers"] = serde_json::json!([3]);
    }));
    assert_eq!(e.field(), "quantization_config.ignored_layers[0]", "{e}");
    // model_type and architectures naming different architectures.
    let e = err_of(&patch(&text, |v| {
        v["architectures"] = serde_json::json!(["MiMoV2FlashForCausalLM"]);
    }));
    assert!(
        matches!(e, ConfigError::Invalid { .. }) && e.field() == "model_type",
        "{e}"
    );
    // MXFP4 experts in an fp8 checkpoint only for mimo_v2.
    let flash = std::fs::read_to_string(root().join("mimo-v2-flash/hub/config.json")).unwrap();
    let e = err_of(&patch(&flash, |v| {
        v["quantization_config"] =
            serde_json::json!({"quant_method": "fp8", "store_dtype": "mxfp4"});
    }));
    assert_eq!(e.field(), "quantization_config.store_dtype", "{e}");
}

/// The fixture's tensors, all shards merged.
fn fixture_tensors() -> Tensors {
    mimo_v2_fixture_tensors(&fp4_dir())
}

/// The fixture's config and the given tensors as one `model.safetensors` in a temp dir.
fn write_variant(tag: &str, ts: &Tensors) -> TempDir {
    let d = TempDir::new(tag);
    d.write(
        "config.json",
        std::fs::read_to_string(fp4_dir().join("config.json")).unwrap(),
    );
    d.write("model.safetensors", serialize(ts));
    d
}

#[test]
fn fixture_loads_in_the_released_layout() {
    let dir = fp4_dir();
    let (cfg, w) = load(&dir).unwrap();
    assert_eq!(cfg.arch, Arch::MiMoV2);
    let mut ck = Checkpoint::open(&dir).unwrap();
    ck.set_fp8_block([128, 128]);
    // The MTP layer's tensors are in the index and skipped.
    let mtp = model::mimo::mtp_tensors(&ck);
    assert_eq!(mtp.len(), 4, "{mtp:?}");
    assert!(mtp.iter().all(|n| n.starts_with("model.mtp.layers.0.")));

    let h = cfg.hidden_size;
    for (l, (ls, layer)) in cfg.layers.iter().zip(&w.layers).enumerate() {
        // Fused qkv → q/k/v, every value = code × its group-local block scale (f32, bit for bit).
        let name = model::mimo::qkv_name(l);
        let wt = ck.get(&name).unwrap();
        let st = ck.get(&format!("{name}_scale_inv")).unwrap();
        let scales = st.to_f32().unwrap();
        let f = model::mimo::FusedQkv::of(ls);
        let (g_rows, sr, sc) = (
            f.group_rows(),
            f.group_rows().div_ceil(128),
            h.div_ceil(128),
        );
        assert_eq!(
            st.shape,
            [f.groups * sr, sc],
            "layer {l}: padded scale rows"
        );
        let a = &layer.attn;
        for (m, off, n) in [
            (&a.q.w, 0, f.q),
            (&a.k.w, f.q, f.k),
            (&a.v.w, f.q + f.k, f.v),
        ] {
            assert_eq!((m.rows, m.cols), (f.groups * n, h), "layer {l}");
            assert_eq!(m.dtype(), model::weights::DenseDtype::F8E4M3);
            let mut row = vec![0f32; h];
            for g in 0..f.groups {
                for r in 0..n {
                    m.row_into(g * n + r, &mut row);
                    let fr = g * g_rows + off + r;
                    let srow = g * sr + (off + r) / 128;
                    for (c, &x) in row.iter().enumerate() {
                        let want =
                            f8_e4m3_to_f32(wt.data[fr * h + c]) * scales[srow * sc + c / 128];
                        assert_eq!(x.to_bits(), want.to_bits(), "layer {l} row {fr} col {c}");
                    }
                }
            }
        }
        assert_eq!(a.o.w.dtype(), model::weights::DenseDtype::Bf16, "o_proj");
        assert_eq!(a.sinks.is_some(), ls.sinks);
        match &layer.mlp {
            Mlp::Dense { gate_up, down } => {
                let gu = &gate_up.w;
                assert_eq!(gu.dtype(), model::weights::DenseDtype::F8E4M3);
                assert_eq!((gu.rows, gu.cols), (2 * 160, h));
                assert_eq!((down.w.rows, down.w.cols), (h, 160));
                // FP8 `gate_proj.weight`, its `weight_scale_inv`, then `up_proj.weight` (name
                // order): a view of each half in the mapped file with its own block scales (160
                // rows: a scale block straddles the seam), never a copy of the codes.
                assert!(gu.is_mapped(), "layer {l}: dense gate_up is a view");
                assert_eq!(gu.num_segments(), 2, "layer {l}");
                let p = format!("model.layers.{l}.mlp.");
                let raw = |n: &str| ck.get(&format!("{p}{n}")).unwrap().data.to_vec();
                let want = [raw("gate_proj.weight"), raw("up_proj.weight")].concat();
                let got: Vec<u8> = (0..gu.rows)
                    .flat_map(|r| gu.row_bytes(r).to_vec())
                    .collect();
                assert_eq!(got, want, "layer {l}: gate_up codes");
                let mut row = vec![0f32; h];
                for (half, name) in ["gate_proj", "up_proj"].iter().enumerate() {
                    let sc = ck.read_f32(&format!("{p}{name}.weight_scale_inv")).unwrap();
                    let codes = raw(&format!("{name}.weight"));
                    for r in 0..160 {
                        gu.row_into(half * 160 + r, &mut row);
                        for (c, &x) in row.iter().enumerate() {
                            let s = sc[(r / 128) * h.div_ceil(128) + c / 128];
                            let want = f8_e4m3_to_f32(codes[r * h + c]) * s;
                            assert_eq!(x.to_bits(), want.to_bits(), "layer {l} {name} row {r}");
                        }
                    }
                }
            }
            Mlp::Moe(m) => {
                assert!(m.correction_bias.is_some());
                assert_eq!(m.router.w.dtype(), model::weights::DenseDtype::F32);
                for (e, x) in m.experts.iter().enumerate() {
                    let (ExpertMat::Mxfp4(gu), ExpertMat::Mxfp4(dn)) = (&x.gate_up, &x.down) else {
                        panic!("layer {l} expert {e}: not MXFP4");
                    };
                    assert_eq!((gu.rows, gu.k, dn.rows, dn.k), (64, h, h, 32));
                    // Even experts are written gate, up back to back: one view; odd ones in
                    // name order (`save_file`'s, the released files'): a view of each, never a
                    // copy of the packed bytes.
                    assert!(gu.is_mapped(), "layer {l} expert {e}");
                    assert_eq!(gu.num_parts(), 1 + e % 2, "layer {l} expert {e}");
                    assert!(dn.is_mapped());
                    let p = format!("model.layers.{l}.mlp.experts.{e}.");
                    let raw = |n: &str| ck.get(&format!("{p}{n}")).unwrap().data.to_vec();
                    let want: Vec<u8> = [raw("gate_proj.weight"), raw("up_proj.weight")].concat();
                    let rows = |f: &dyn Fn(usize) -> Vec<u8>| (0..gu.rows).flat_map(f).collect();
                    let got: Vec<u8> = rows(&|r| gu.row_blocks(r).to_vec());
                    assert_eq!(got, want);
                    let want_s: Vec<u8> =
                        [raw("gate_proj.weight_scale"), raw("up_proj.weight_scale")].concat();
                    let got_s: Vec<u8> = rows(&|r| gu.row_scales(r).to_vec());
                    assert_eq!(got_s, want_s);
                    assert_eq!(dn.blocks().unwrap(), &raw("down_proj.weight")[..]);
                }
            }
        }
    }

    // The same tensors in one name-ordered file (every [gate; up] in two segments) give identical
    // logits.
    let d = write_variant("mimo-v2-single", &fixture_tensors());
    let (c2, w2) = load(d.path()).unwrap();
    let ids: Vec<u32> = vec![5, 77, 200, 13, 42, 99];
    let run = |c: ModelConfig, w| {
        model::cpu::CpuModel::new(Arc::new(c), Arc::new(w))
            .unwrap()
            .forward_full(&ids)
            .unwrap()
            .0
    };
    let (a, b) = (run(cfg, w), run(c2, w2));
    for (x, y) in a.iter().flatten().zip(b.iter().flatten()) {
        assert_eq!(x.to_bits(), y.to_bits());
    }
}

fn spec_err(ts: &Tensors, tag: &str) -> (SpecError, String) {
    let d = write_variant(tag, ts);
    match load(d.path()) {
        Err(LoadError::Spec { source, .. }) => {
            let s = source.to_string();
            (source, s)
        }
        Err(e) => panic!("{tag}: expected a spec error, got {e}"),
        Ok(_) => panic!("{tag}: loaded"),
    }
}

#[test]
fn bad_tensors_are_refused_by_name() {
    let base = fixture_tensors();
    let qkv = "model.layers.0.self_attn.qkv_proj.weight";
    let qs = format!("{qkv}_scale_inv");

    // Scales of an unpadded layout (⌈352/128⌉ = 3 rows instead of 2 groups × 2).
    let mut ts = base.clone();
    let t = ts.get_mut(&qs).unwrap();
    t.shape = vec![3, 1];
    t.data.truncate(12);
    let (e, s) = spec_err(&ts, "mimo-unpadded");
    assert_eq!(e.tensor(), Some(qs.as_str()), "{s}");
    assert!(s.contains("padded"), "{s}");

    // A qkv with a row too few.
    let mut ts = base.clone();
    let t = ts.get_mut(qkv).unwrap();
    t.shape[0] -= 1;
    t.data.truncate(t.shape[0] * 64);
    let (e, s) = spec_err(&ts, "mimo-qkv-rows");
    assert_eq!(e.tensor(), Some(qkv), "{s}");

    // FP8 qkv without its scales.
    let mut ts = base.clone();
    ts.remove(&qs);
    let (e, s) = spec_err(&ts, "mimo-qkv-noscale");
    assert_eq!(e.tensor(), Some(qs.as_str()), "{s}");

    // Neither fused nor split q/k/v.
    let mut ts = base.clone();
    ts.remove(qkv);
    ts.remove(&qs);
    let (e, s) = spec_err(&ts, "mimo-noqkv");
    assert_eq!(
        e.tensor(),
        Some("model.layers.0.self_attn.q_proj.weight"),
        "{s}"
    );

    let ex = "model.layers.1.mlp.experts.3.up_proj.weight";
    let exs = format!("{ex}_scale");
    // An expert without its E8M0 scales.
    let mut ts = base.clone();
    ts.remove(&exs);
    let (e, s) = spec_err(&ts, "mimo-noscale");
    assert_eq!(e.tensor(), Some(exs.as_str()), "{s}");

    // An expert of the wrong shape.
    let mut ts = base.clone();
    let t = ts.get_mut(ex).unwrap();
    t.shape = vec![32, 31];
    t.data.truncate(32 * 31);
    let (e, s) = spec_err(&ts, "mimo-expert-shape");
    assert_eq!(e.tensor(), Some(ex), "{s}");

    // A NaN scale byte.
    let mut ts = base.clone();
    ts.get_mut(&exs).unwrap().data[5] = 0xFF;
    let d = write_variant("mimo-nan", &ts);
    let e = load(d.path()).unwrap_err().to_string();
    assert!(e.contains(&exs) && e.contains("NaN"), "{e}");

    // An MXFP4 gate with a BF16 up projection.
    let mut ts = base.clone();
    let g = "model.layers.1.mlp.experts.3.gate_proj.weight";
    ts.insert(
        ex.to_string(),
        load_common::bf16(&[32, 64], &vec![0.5; 32 * 64]),
    );
    ts.remove(&exs);
    let d = write_variant("mimo-mixed", &ts);
    let e = load(d.path()).unwrap_err().to_string();
    assert!(e.contains(g), "{e}");

    // A truncated shard of the sharded checkpoint.
    let d = TempDir::new("mimo-trunc");
    for f in std::fs::read_dir(fp4_dir()).unwrap() {
        let p = f.unwrap().path();
        let mut bytes = std::fs::read(&p).unwrap();
        let name = p.file_name().unwrap().to_string_lossy().into_owned();
        if name == "model-00002-of-00002.safetensors" {
            bytes.truncate(bytes.len() - 100);
        }
        d.write(&name, bytes);
    }
    let e = load(d.path()).unwrap_err();
    assert!(matches!(e, LoadError::Checkpoint { .. }), "{e}");
    assert!(e.to_string().contains("model-00002-of-00002"), "{e}");
}

/// The DFlash drafter of MiMo-V2.5-Pro-FP4-DFlash (`dflash/config.json`). Its file is not
/// captured verbatim: this is the MiMo-V2.5-DFlash config quoted in research/mimo-v2.md §1.5
/// with the Pro values of the model card (§1.1: hidden 6144, 128 / 8 heads, head dim 128, 5
/// layers, window 1024, block 8, taps [0, 15, 31, 47, 69], backbone RoPE base 5e6).
/// `intermediate_size` is not published for the Pro drafter; 16384 is an assumption.
const PRO_DRAFTER: &str = r#"{
  "architectures": ["DFlashDraftModel"], "model_type": "qwen3",
  "hidden_size": 6144, "intermediate_size": 16384, "num_hidden_layers": 5,
  "num_attention_heads": 128, "num_key_value_heads": 8, "head_dim": 128,
  "hidden_act": "silu", "rms_norm_eps": 1e-05, "attention_bias": false,
  "partial_rotary_factor": 0.5, "rope_theta": 10000, "sliding_window": 1024,
  "is_causal": false, "vocab_size": 152576, "tie_word_embeddings": false,
  "dflash_config": {"target_layer_ids": [0, 15, 31, 47, 69], "mask_token_id": 151675,
    "block_size": 8, "use_swa": true, "swa_window_size": 1024,
    "backbone_rotary_base": 5000000, "attention_value_scale": 0.612,
    "attention_sink_bias": true}
}"#;

#[test]
fn mimo_v25_pro_dflash_drafter_config() {
    use model::drafter::DrafterConfig;
    let d = DrafterConfig::from_json_str(PRO_DRAFTER).unwrap();
    assert_eq!(d.num_layers(), 5);
    assert_eq!(
        (d.hidden_size, d.n_heads, d.n_kv_heads, d.head_dim),
        (6144, 128, 8, 128)
    );
    for l in &d.layers {
        // use_swa without layer types: every layer a 1024-key window, bidirectional in the block.
        assert_eq!(l.window, Some(1024));
        assert!(!l.causal);
    }
    assert!(d.sinks);
    assert_eq!(d.value_scale, 0.612);
    assert_eq!((d.rope.rotary_dim, d.rope.theta), (64, 1e4));
    assert_eq!(d.target_layer_ids, vec![0, 15, 31, 47, 69]);
    assert_eq!((d.mask_token_id, d.block_size), (151675, 8));
    assert_eq!(d.backbone_rotary_base, Some(5e6));
    // It fits the V2.5-Pro target: fc takes 5 taps × 6144.
    let t = ModelConfig::from_json_str(&pro_config()).unwrap();
    d.check_target_dims(5 * 6144, t.vocab_size, t.hidden_size, t.layers.len())
        .unwrap();
}

#[test]
fn fp4_checkpoint_counts_mxfp4_experts() {
    use model::footprint::StoragePlan;
    let raw: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fp4_dir().join("config.json")).unwrap())
            .unwrap();
    let p = StoragePlan::from_config_json(&raw);
    assert_eq!(
        p.expert_bytes_per_weight,
        StoragePlan::MXFP4_EXPERTS.expert_bytes_per_weight
    );
}
