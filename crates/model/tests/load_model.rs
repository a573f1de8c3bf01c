//! Whole-model loads of synthetic checkpoints: the weights.rs conventions (orientation,
//! gate/up layouts, MXFP4 kept, tied embeddings, sinks, correction bias) and every tensor-level
//! error (missing tensor, wrong shape, wrong dtype, NaN MXFP4 scale) through `load`.

mod load_common;

use load_common::*;
use model::checkpoint::{CheckpointError, Dtype};
use model::config::{Arch, AttnKind};
use model::load::{load, load_config, LoadError};
use model::spec::{self, SpecError};
use model::weights::{ExpertMat, GateUpLayout, Mlp, Weights};

fn vals(ts: &Tensors, name: &str) -> Vec<f32> {
    bf16_vals(ts.get(name).unwrap_or_else(|| panic!("test tensor {name}")))
}

fn moe(w: &Weights, l: usize) -> &model::weights::Moe {
    match &w.layers[l].mlp {
        Mlp::Moe(m) => m,
        Mlp::Dense { .. } => panic!("layer {l} should be MoE"),
    }
}

fn dense(m: &ExpertMat) -> Vec<f32> {
    match m {
        ExpertMat::Dense(d) => d.to_f32(),
        ExpertMat::Mxfp4(x) => fp4::dequantize(x.view().unwrap()),
    }
}

#[test]
fn gpt_oss_bf16_and_mxfp4() {
    let (h, i, e) = (64usize, 32usize, 4usize);
    let tb = gpt_oss_tensors(7, false);
    let tm = gpt_oss_tensors(7, true);
    let db = TempDir::new("goss-bf16");
    let dm = TempDir::new("goss-mx");
    write_model(&db, GPT_OSS_CONFIG, &tb);
    let mx_cfg = patch_config(
        GPT_OSS_CONFIG,
        r#"{"quantization_config": {"quant_method": "mxfp4", "modules_to_not_convert": ["lm_head"]}}"#,
    );
    write_model(&dm, &mx_cfg, &tm);
    let (cb, wb) = load(db.path()).unwrap();
    let (cm, wm) = load(dm.path()).unwrap();
    assert_eq!(cb, cm);
    assert_eq!(cb.arch, Arch::GptOss);
    assert_eq!(wb.layers.len(), 2);
    // Attention and norms are loaded verbatim, [out, in].
    let a = &wb.layers[1].attn;
    assert_eq!((a.q.w.rows, a.q.w.cols), (64, 64));
    assert_eq!((a.k.w.rows, a.k.w.cols), (32, 64));
    assert_eq!(
        a.q.w.to_f32(),
        vals(&tb, "model.layers.1.self_attn.q_proj.weight")
    );
    assert_eq!(
        a.o.bias.as_deref().unwrap(),
        &vals(&tb, "model.layers.1.self_attn.o_proj.bias")[..]
    );
    assert_eq!(
        a.sinks.as_deref().unwrap(),
        &vals(&tb, "model.layers.1.self_attn.sinks")[..]
    );
    assert!(a.q_norm.is_none());
    assert_eq!(
        wb.layers[0].input_norm,
        vals(&tb, "model.layers.0.input_layernorm.weight")
    );
    assert_eq!(wb.final_norm, vals(&tb, "model.norm.weight"));
    assert_eq!(wb.lm_head.to_f32(), vals(&tb, "lm_head.weight"));
    assert_ne!(wb.lm_head, wb.embed);
    // Router with bias.
    let mb = moe(&wb, 0);
    assert_eq!(
        mb.router.w.to_f32(),
        vals(&tb, "model.layers.0.mlp.router.weight")
    );
    assert_eq!(
        mb.router.bias.as_deref().unwrap(),
        &vals(&tb, "model.layers.0.mlp.router.bias")[..]
    );
    assert!(mb.correction_bias.is_none());
    assert_eq!(mb.gate_up_layout, GateUpLayout::Interleaved);
    // bf16 experts: transposed from [E, in, out] to [out, in], checkpoint row order kept.
    let gu = vals(&tb, "model.layers.0.mlp.experts.gate_up_proj"); // [E, H, 2I]
    let dn = vals(&tb, "model.layers.0.mlp.experts.down_proj"); // [E, I, H]
    let gub = vals(&tb, "model.layers.0.mlp.experts.gate_up_proj_bias");
    for x in 0..e {
        let ex = &mb.experts[x];
        let ExpertMat::Dense(g) = &ex.gate_up else {
            panic!("bf16 experts are dense")
        };
        assert_eq!((g.rows, g.cols), (2 * i, h));
        for o in [0, 1, 2 * i - 1] {
            for j in [0, 5, h - 1] {
                assert_eq!(g.to_f32()[o * h + j], gu[x * h * 2 * i + j * 2 * i + o]);
            }
        }
        let ExpertMat::Dense(d) = &ex.down else {
            panic!("bf16 experts are dense")
        };
        assert_eq!((d.rows, d.cols), (h, i));
        assert_eq!(d.to_f32()[3 * i + 7], dn[x * i * h + 7 * h + 3]);
        assert_eq!(
            ex.gate_up_bias.as_deref().unwrap(),
            &gub[x * 2 * i..(x + 1) * 2 * i]
        );
        assert_eq!(ex.down_bias.as_ref().unwrap().len(), h);
    }
    // MXFP4 experts stay MXFP4 with the checkpoint bytes; dequantized == the bf16 dir.
    let mm = moe(&wm, 0);
    let blocks = &tm["model.layers.0.mlp.experts.gate_up_proj_blocks"].data;
    for x in 0..e {
        let ExpertMat::Mxfp4(q) = &mm.experts[x].gate_up else {
            panic!("MXFP4 experts stay MXFP4")
        };
        assert_eq!((q.rows, q.k), (2 * i, h));
        let per = 2 * i * h / 2;
        assert_eq!(q.blocks().unwrap(), &blocks[x * per..(x + 1) * per]);
        assert_eq!(mm.experts[x].down.rows(), h);
        assert_eq!(mm.experts[x].down.cols(), i);
    }
    for l in 0..2 {
        let (a, b) = (moe(&wb, l), moe(&wm, l));
        for (xa, xb) in a.experts.iter().zip(&b.experts) {
            assert_eq!(dense(&xa.gate_up), dense(&xb.gate_up));
            assert_eq!(dense(&xa.down), dense(&xb.down));
            assert_eq!(xa.gate_up_bias, xb.gate_up_bias);
        }
        assert_eq!(wb.layers[l].attn, wm.layers[l].attn);
    }
}

#[test]
fn qwen3_halves_and_tied_embeddings() {
    let (h, i) = (32usize, 16usize);
    let ts = qwen3_tensors(11);
    let d = TempDir::new("qwen3");
    write_model(&d, QWEN3_CONFIG, &ts);
    let (c, w) = load(d.path()).unwrap();
    assert_eq!(c.arch, Arch::Qwen3Moe);
    let a = &w.layers[0].attn;
    assert_eq!(
        a.q_norm.as_deref().unwrap(),
        &vals(&ts, "model.layers.0.self_attn.q_norm.weight")[..]
    );
    assert_eq!(a.k_norm.as_ref().unwrap().len(), 16);
    assert!(a.sinks.is_none() && a.q.bias.is_none());
    let m = moe(&w, 1);
    assert_eq!(m.gate_up_layout, GateUpLayout::Halves);
    assert!(m.router.bias.is_none());
    for x in 0..4 {
        let g = dense(&m.experts[x].gate_up);
        let gate = vals(
            &ts,
            &format!("model.layers.1.mlp.experts.{x}.gate_proj.weight"),
        );
        let up = vals(
            &ts,
            &format!("model.layers.1.mlp.experts.{x}.up_proj.weight"),
        );
        assert_eq!(g[..i * h], gate[..]);
        assert_eq!(g[i * h..], up[..]);
        assert_eq!(m.experts[x].gate_up.rows(), 2 * i);
        assert_eq!(
            dense(&m.experts[x].down),
            vals(
                &ts,
                &format!("model.layers.1.mlp.experts.{x}.down_proj.weight")
            )
        );
        assert!(m.experts[x].gate_up_bias.is_none());
    }
    // Tied: lm_head = embed; a stray lm_head.weight is ignored.
    let d2 = TempDir::new("qwen3-tied");
    let mut t2 = ts.clone();
    t2.remove("lm_head.weight");
    write_model(
        &d2,
        &patch_config(QWEN3_CONFIG, r#"{"tie_word_embeddings": true}"#),
        &t2,
    );
    let (_, w2) = load(d2.path()).unwrap();
    assert_eq!(w2.lm_head, w2.embed);
    assert_eq!(w2.embed, w.embed);
    // Dense layer through mlp_only_layers (Halves gate_up).
    let d3 = TempDir::new("qwen3-dense");
    let mut t3 = ts.clone();
    t3.retain(|k, _| !k.starts_with("model.layers.0.mlp."));
    let mut r = Rng(5);
    t3.insert(
        "model.layers.0.mlp.gate_proj.weight".into(),
        rand_bf16(&mut r, &[48, h]),
    );
    t3.insert(
        "model.layers.0.mlp.up_proj.weight".into(),
        rand_bf16(&mut r, &[48, h]),
    );
    t3.insert(
        "model.layers.0.mlp.down_proj.weight".into(),
        rand_bf16(&mut r, &[h, 48]),
    );
    write_model(
        &d3,
        &patch_config(QWEN3_CONFIG, r#"{"mlp_only_layers": [0]}"#),
        &t3,
    );
    let (_, w3) = load(d3.path()).unwrap();
    let Mlp::Dense { gate_up, down } = &w3.layers[0].mlp else {
        panic!("layer 0 is dense")
    };
    assert_eq!((gate_up.w.rows, gate_up.w.cols), (96, h));
    assert_eq!(
        gate_up.w.to_f32()[..48 * h],
        vals(&t3, "model.layers.0.mlp.gate_proj.weight")[..]
    );
    assert_eq!((down.w.rows, down.w.cols), (h, 48));
}

#[test]
fn mimo_native_and_hub_names() {
    let tn = mimo_tensors(3, "sinks");
    let th = mimo_tensors(3, "attention_sink_bias");
    let dn = TempDir::new("mimo-n");
    let dh = TempDir::new("mimo-h");
    write_model(&dn, MIMO_CONFIG, &tn);
    write_model(&dh, MIMO_CONFIG, &th);
    let (c, wn) = load(dn.path()).unwrap();
    let (_, wh) = load(dh.path()).unwrap();
    assert_eq!(wn, wh);
    assert_eq!(c.layers[1].attn, AttnKind::Sliding { window: 4 });
    // layer 0 dense, sinks on the sliding layer only, per-layer KV heads and v dims
    assert!(matches!(wn.layers[0].mlp, Mlp::Dense { .. }));
    assert!(wn.layers[0].attn.sinks.is_none() && wn.layers[2].attn.sinks.is_none());
    assert_eq!(
        wn.layers[1].attn.sinks.as_deref().unwrap(),
        &vals(&tn, "model.layers.1.self_attn.sinks")[..]
    );
    assert_eq!(wn.layers[0].attn.k.w.rows, 24);
    assert_eq!(wn.layers[1].attn.k.w.rows, 48);
    assert_eq!(wn.layers[1].attn.v.w.rows, 32);
    assert_eq!(wn.layers[1].attn.o.w.cols, 64);
    let m = moe(&wn, 1);
    assert_eq!(m.gate_up_layout, GateUpLayout::Halves);
    // F32 correction bias read exactly (not bf16-rounded)
    let want: Vec<f32> = (0..4).map(|x| 0.1 + x as f32 / 3.0).collect();
    assert_eq!(m.correction_bias.as_deref().unwrap(), &want[..]);
}

#[test]
fn sharded_model_equals_single_file() {
    let ts = qwen3_tensors(21);
    let single = TempDir::new("q-single");
    write_model(&single, QWEN3_CONFIG, &ts);
    let sharded = TempDir::new("q-sharded");
    sharded.write("config.json", QWEN3_CONFIG);
    let (mut a, mut b) = (Tensors::new(), Tensors::new());
    let mut wm = serde_json::Map::new();
    for (k, t) in &ts {
        let (dst, file) = if k.contains("layers.1") {
            (&mut b, "model-00002-of-00002.safetensors")
        } else {
            (&mut a, "model-00001-of-00002.safetensors")
        };
        dst.insert(k.clone(), t.clone());
        wm.insert(k.clone(), serde_json::Value::String(file.into()));
    }
    sharded.write("model-00001-of-00002.safetensors", serialize(&a));
    sharded.write("model-00002-of-00002.safetensors", serialize(&b));
    sharded.write(
        "model.safetensors.index.json",
        serde_json::json!({"metadata": {}, "weight_map": wm}).to_string(),
    );
    assert_eq!(load(single.path()).unwrap(), load(sharded.path()).unwrap());
}

#[test]
fn fp8_weights_with_block_scales() {
    // Qwen3 with q_proj stored FP8 + weight_scale_inv in 16×16 blocks.
    let mut ts = qwen3_tensors(9);
    let name = "model.layers.0.self_attn.q_proj.weight";
    let codes: Vec<u8> = (0..64 * 32).map(|k| (k % 0x70) as u8).collect();
    ts.insert(
        name.into(),
        T {
            dtype: Dtype::F8_E4M3,
            shape: vec![64, 32],
            data: codes.clone(),
        },
    );
    let scales: Vec<f32> = (0..8).map(|k| 0.5 + k as f32).collect(); // [4, 2]
    ts.insert(format!("{name}_scale_inv"), f32t(&[4, 2], &scales));
    let d = TempDir::new("fp8-model");
    let cfg = patch_config(
        QWEN3_CONFIG,
        r#"{"quantization_config": {"quant_method": "fp8", "weight_block_size": [16, 16], "activation_scheme": "dynamic"}}"#,
    );
    write_model(&d, &cfg, &ts);
    let (_, w) = load(d.path()).unwrap();
    let q = &w.layers[0].attn.q.w;
    for r in [0, 15, 16, 63] {
        for c in [0, 15, 16, 31] {
            let want = model::checkpoint::f8_e4m3_to_f32(codes[r * 32 + c])
                * scales[(r / 16) * 2 + c / 16];
            assert_eq!(q.to_f32()[r * 32 + c], want);
        }
    }
    // Without quantization_config the default 128×128 block expects scales [1, 1].
    write_model(&d, QWEN3_CONFIG, &ts);
    let e = load(d.path()).unwrap_err();
    assert!(
        matches!(e, LoadError::Checkpoint { source: CheckpointError::Tensor { ref tensor, .. }, .. }
            if tensor.ends_with("q_proj.weight_scale_inv")),
        "{e}"
    );
}

fn expect_spec_err(dir: &TempDir) -> SpecError {
    match load(dir.path()) {
        Err(LoadError::Spec { source, path }) => {
            assert_eq!(path, dir.path());
            source
        }
        Err(other) => panic!("expected a spec error, got {other}"),
        Ok(_) => panic!("expected a spec error, loaded fine"),
    }
}

#[test]
fn tensor_errors_name_the_tensor() {
    let d = TempDir::new("errs");
    // Missing tensor.
    let mut ts = gpt_oss_tensors(1, false);
    ts.remove("model.layers.1.self_attn.sinks");
    write_model(&d, GPT_OSS_CONFIG, &ts);
    let e = expect_spec_err(&d);
    assert!(
        matches!(e, SpecError::Missing { ref tensor, .. } if tensor == "model.layers.1.self_attn.sinks"),
        "{e}"
    );
    assert!(
        e.to_string().contains("[4]"),
        "names the expected shape: {e}"
    );
    // Wrong shape (the MXFP4 [E, out, in] orientation in a bf16 dense tensor).
    let mut ts = gpt_oss_tensors(1, false);
    let t = ts.get_mut("model.layers.0.mlp.experts.down_proj").unwrap();
    t.shape = vec![4, 64, 32]; // [E, H, I] instead of [E, I, H]
    write_model(&d, GPT_OSS_CONFIG, &ts);
    let e = expect_spec_err(&d);
    match &e {
        SpecError::WrongShape {
            tensor,
            expected,
            found,
        } => {
            assert_eq!(tensor, "model.layers.0.mlp.experts.down_proj");
            assert_eq!(expected, "[4, 32, 64]");
            assert_eq!(found, "[4, 64, 32]");
        }
        other => panic!("{other}"),
    }
    // Wrong shape in a plain matrix.
    let mut ts = qwen3_tensors(2);
    ts.insert(
        "model.layers.1.mlp.experts.2.down_proj.weight".into(),
        bf16(&[16, 32], &vec![0.0; 512]),
    );
    write_model(&d, QWEN3_CONFIG, &ts);
    let e = expect_spec_err(&d);
    assert!(
        matches!(e, SpecError::WrongShape { ref tensor, ref expected, ref found }
            if tensor == "model.layers.1.mlp.experts.2.down_proj.weight" && expected == "[32, 16]" && found == "[16, 32]"),
        "{e}"
    );
    // Wrong dtype.
    let mut ts = qwen3_tensors(2);
    ts.insert("model.norm.weight".into(), u8t(&[32], vec![0; 32]));
    write_model(&d, QWEN3_CONFIG, &ts);
    let e = expect_spec_err(&d);
    assert!(
        matches!(e, SpecError::WrongDtype { ref tensor, ref found, .. } if tensor == "model.norm.weight" && found == "U8"),
        "{e}"
    );
    // MXFP4 pair with a wrong dtype / missing half / wrong shape.
    let base = "model.layers.1.mlp.experts.down_proj";
    let mut ts = gpt_oss_tensors(1, true);
    let s = ts.get_mut(&format!("{base}_scales")).unwrap();
    s.dtype = Dtype::I8;
    write_model(&d, GPT_OSS_CONFIG, &ts);
    let e = expect_spec_err(&d);
    assert!(
        matches!(e, SpecError::WrongDtype { ref tensor, .. } if *tensor == format!("{base}_scales")),
        "{e}"
    );
    let mut ts = gpt_oss_tensors(1, true);
    ts.remove(&format!("{base}_blocks"));
    write_model(&d, GPT_OSS_CONFIG, &ts);
    let e = expect_spec_err(&d);
    assert!(
        matches!(e, SpecError::Missing { ref tensor, .. } if *tensor == format!("{base}_blocks")),
        "{e}"
    );
    let mut ts = gpt_oss_tensors(1, true);
    let b = ts.get_mut(&format!("{base}_blocks")).unwrap();
    b.shape = vec![4, 32, 2, 16];
    write_model(&d, GPT_OSS_CONFIG, &ts);
    let e = expect_spec_err(&d);
    assert!(
        matches!(e, SpecError::WrongShape { ref tensor, .. } if *tensor == format!("{base}_blocks")),
        "{e}"
    );
    // NaN MXFP4 scale → checkpoint error naming the scales tensor.
    let mut ts = gpt_oss_tensors(1, true);
    ts.get_mut(&format!("{base}_scales")).unwrap().data[5] = 0xFF;
    write_model(&d, GPT_OSS_CONFIG, &ts);
    match load(d.path()) {
        Err(LoadError::Checkpoint {
            source: CheckpointError::Tensor {
                tensor, message, ..
            },
            ..
        }) => {
            assert_eq!(tensor, format!("{base}_scales"));
            assert!(message.contains("NaN"), "{message}");
        }
        other => panic!("expected NaN-scale error, got {other:?}"),
    }
    // Missing lm_head on an untied model.
    let mut ts = qwen3_tensors(2);
    ts.remove("lm_head.weight");
    write_model(&d, QWEN3_CONFIG, &ts);
    let e = expect_spec_err(&d);
    assert!(
        matches!(e, SpecError::Missing { ref tensor, .. } if tensor == "lm_head.weight"),
        "{e}"
    );
    // MiMo without correction bias.
    let mut ts = mimo_tensors(2, "sinks");
    ts.remove("model.layers.2.mlp.gate.e_score_correction_bias");
    write_model(&d, MIMO_CONFIG, &ts);
    let e = expect_spec_err(&d);
    assert!(
        e.to_string()
            .contains("model.layers.2.mlp.gate.e_score_correction_bias"),
        "{e}"
    );
    // MXFP4 pair where the spec allows only dense tensors.
    let mut ts = qwen3_tensors(2);
    let w = ts.remove("model.layers.0.self_attn.o_proj.weight").unwrap();
    ts.insert(
        "model.layers.0.self_attn.o_proj.weight_blocks".into(),
        u8t(&[32, 2, 16], vec![0; 1024]),
    );
    ts.insert(
        "model.layers.0.self_attn.o_proj.weight_scales".into(),
        u8t(&[32, 2], vec![127; 64]),
    );
    drop(w);
    write_model(&d, QWEN3_CONFIG, &ts);
    let e = expect_spec_err(&d);
    assert_eq!(
        e.tensor(),
        Some("model.layers.0.self_attn.o_proj.weight"),
        "{e}"
    );
}

#[test]
fn config_and_checkpoint_errors_carry_the_path() {
    let d = TempDir::new("paths");
    // inconsistent config
    write_model(
        &d,
        &patch_config(QWEN3_CONFIG, r#"{"num_key_value_heads": 3}"#),
        &qwen3_tensors(1),
    );
    let e = load(d.path()).unwrap_err();
    assert!(
        matches!(e, LoadError::Config { ref path, .. } if path == d.path()),
        "{e}"
    );
    assert!(e.to_string().contains("num_key_value_heads"));
    assert!(load_config(d.path()).is_err());
    // unknown model type
    write_model(
        &d,
        &patch_config(QWEN3_CONFIG, r#"{"model_type": "bert"}"#),
        &qwen3_tensors(1),
    );
    let e = load(d.path()).unwrap_err();
    assert!(e.to_string().contains("bert"), "{e}");
    // truncated safetensors
    d.write("config.json", QWEN3_CONFIG);
    let bytes = serialize(&qwen3_tensors(1));
    d.write("model.safetensors", &bytes[..bytes.len() - 10]);
    let e = load(d.path()).unwrap_err();
    assert!(matches!(e, LoadError::Checkpoint { .. }), "{e}");
    assert!(e.to_string().contains("model.safetensors"), "{e}");
}

#[test]
fn expected_tensor_list() {
    let c = model::config::ModelConfig::from_json_str(MIMO_CONFIG).unwrap();
    let list = spec::expected_tensors(&c);
    let names: Vec<&str> = list.iter().map(|t| t.name()).collect();
    assert!(names.contains(&"model.layers.0.mlp.gate_proj.weight"));
    assert!(names.contains(&"model.layers.1.self_attn.sinks"));
    assert!(!names.contains(&"model.layers.0.self_attn.sinks"));
    assert!(names.contains(&"model.layers.2.mlp.experts.3.down_proj.weight"));
    // 3 global + 3 layers × (2 norms + 4 proj) + 1 sink + dense 3 + 2 MoE × (router + bias + 12)
    assert_eq!(list.len(), 3 + 18 + 1 + 3 + 2 * 14);
    // Every expected tensor exists in the synthetic checkpoint (and nothing else but mtp).
    let ts = mimo_tensors(1, "sinks");
    let extra: Vec<&String> = ts.keys().filter(|k| !names.contains(&k.as_str())).collect();
    assert_eq!(extra, vec!["model.mtp.0.extra.weight"]);
}
