//! Drafter configuration and loading: the z-lab and MiMo shapes round-trip through files; the
//! per-layer attention resolution rules; every mismatch with the target and every unsupported
//! field is a typed error naming the field or tensor; the draft forward does not depend on how
//! the context arrived (one chunk or token by token, with sliding-window compaction).

mod common;

use common::{assert_bits, fixtures_root, load_target, scratch_dir, write_drafter};
use dflash::config::build_target_layer_ids;
use dflash::toy::{self, ToyKind};
use dflash::{DraftAttn, Drafter, DrafterConfig, DrafterError, SpecDecoder, SpecError};
use model::config::ConfigError;
use serde_json::{json, Value};

fn parse(v: &Value) -> Result<DrafterConfig, ConfigError> {
    DrafterConfig::from_json_str(&v.to_string())
}

/// A minimal z-lab config.
fn base() -> Value {
    json!({
        "architectures": ["DFlashDraftModel"],
        "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16,
        "block_size": 8,
        "dflash_config": {"mask_token_id": 5, "target_layer_ids": [0, 2]}
    })
}

fn with(mut v: Value, path: &[&str], x: Value) -> Value {
    let mut o = &mut v;
    for k in &path[..path.len() - 1] {
        o = o.get_mut(*k).unwrap();
    }
    o.as_object_mut()
        .unwrap()
        .insert(path[path.len() - 1].into(), x);
    v
}

#[test]
fn layer_attention_resolution() {
    let full = DraftAttn {
        window: None,
        causal: false,
    };
    let c = parse(&base()).unwrap();
    assert_eq!(c.layers, [full, full]);
    assert_eq!(c.block_size, 8);
    assert_eq!(c.rope.theta, 10_000.0);
    assert_eq!(c.rope.rotary_dim, 16);
    assert_eq!(c.value_scale, 1.0);
    assert!(!c.sinks);

    // layer_types: sliding causal (window sliding_window), full bidirectional.
    let v = with(
        with(
            base(),
            &["layer_types"],
            json!(["sliding_attention", "full_attention"]),
        ),
        &["sliding_window"],
        json!(7),
    );
    let c = parse(&v).unwrap();
    let swa = DraftAttn {
        window: Some(7),
        causal: true,
    };
    assert_eq!(c.layers, [swa, full]);
    // is_causal overrides every layer; dflash_config.causal too (is_causal wins).
    let c = parse(&with(v.clone(), &["is_causal"], json!(false))).unwrap();
    assert!(c.layers.iter().all(|l| !l.causal));
    let c = parse(&with(v.clone(), &["dflash_config", "causal"], json!(true))).unwrap();
    assert!(c.layers.iter().all(|l| l.causal));
    let both = with(
        with(v, &["dflash_config", "causal"], json!(true)),
        &["is_causal"],
        json!(false),
    );
    assert!(parse(&both).unwrap().layers.iter().all(|l| !l.causal));

    // MiMo shape: use_swa, no layer_types → every layer sliding and non-causal.
    let v = with(
        with(base(), &["dflash_config", "use_swa"], json!(true)),
        &["dflash_config", "swa_window_size"],
        json!(9),
    );
    let c = parse(&v).unwrap();
    let mimo = DraftAttn {
        window: Some(9),
        causal: false,
    };
    assert_eq!(c.layers, [mimo, mimo]);
    // …window from sliding_window when swa_window_size is absent; missing both is an error.
    let v = with(
        with(base(), &["dflash_config", "use_swa"], json!(true)),
        &["sliding_window"],
        json!(3),
    );
    assert_eq!(parse(&v).unwrap().layers[0].window, Some(3));
    let v = with(base(), &["dflash_config", "use_swa"], json!(true));
    assert_eq!(
        parse(&v).unwrap_err().field(),
        "dflash_config.swa_window_size"
    );

    // Qwen3Config rule: use_sliding_window + sliding_window, sliding from max_window_layers on.
    let v = with(
        with(
            with(base(), &["use_sliding_window"], json!(true)),
            &["sliding_window"],
            json!(5),
        ),
        &["max_window_layers"],
        json!(1),
    );
    let c = parse(&v).unwrap();
    assert_eq!(
        c.layers,
        [
            full,
            DraftAttn {
                window: Some(5),
                causal: true
            }
        ]
    );
}

#[test]
fn dflash_fields_and_rope() {
    // dflash_config wins over the top level; top level is the fallback.
    let v = with(base(), &["dflash_config", "block_size"], json!(4));
    assert_eq!(parse(&v).unwrap().block_size, 4);
    let mut v = base();
    v["dflash_config"]
        .as_object_mut()
        .unwrap()
        .remove("mask_token_id");
    assert_eq!(parse(&v).unwrap_err().field(), "mask_token_id");
    let v = with(v, &["mask_token_id"], json!(9));
    assert_eq!(parse(&v).unwrap().mask_token_id, 9);
    // No block size anywhere: the default, 8.
    let mut v = with(base(), &["block_size"], json!(4));
    assert_eq!(parse(&v).unwrap().block_size, 4);
    v.as_object_mut().unwrap().remove("block_size");
    assert_eq!(parse(&v).unwrap().block_size, dflash::DEFAULT_BLOCK_SIZE);
    assert_eq!(dflash::DEFAULT_BLOCK_SIZE, 8);

    // Fallback target layers (z-lab's build_target_layer_ids).
    assert_eq!(build_target_layer_ids(36, 5), [1, 9, 17, 25, 33]);
    assert_eq!(build_target_layer_ids(64, 5), [1, 16, 31, 46, 61]);
    assert_eq!(build_target_layer_ids(10, 1), [5]);
    let mut v = with(base(), &["num_target_layers"], json!(36));
    v["dflash_config"]
        .as_object_mut()
        .unwrap()
        .remove("target_layer_ids");
    assert_eq!(parse(&v).unwrap().target_layer_ids, [1, 33]); // D = 2 draft layers

    // MiMo knobs.
    let v = json!({
        "architectures": ["DFlashDraftModel"], "hidden_size": 64, "intermediate_size": 128,
        "num_hidden_layers": 1, "num_attention_heads": 4, "num_key_value_heads": 2,
        "head_dim": 32, "v_head_dim": 32, "partial_rotary_factor": 0.5, "rope_theta": 10000,
        "block_size": 8, "sliding_window": 1024,
        "dflash_config": {"target_layer_ids": [0, 3], "mask_token_id": 7, "use_swa": true,
            "swa_window_size": 1024, "backbone_rotary_base": 5000000,
            "attention_value_scale": 0.612, "attention_sink_bias": true}
    });
    let c = parse(&v).unwrap();
    assert!(c.sinks);
    assert_eq!(c.value_scale, 0.612);
    assert_eq!(c.rope.rotary_dim, 16);
    // backbone_rotary_base is recorded, the RoPE is the drafter's own (as vLLM).
    assert_eq!(c.rope.theta, 1e4);
    assert_eq!(c.backbone_rotary_base, Some(5e6));

    // rope_parameters (flat) and YaRN.
    let v = with(
        base(),
        &["rope_parameters"],
        json!({"rope_type": "yarn", "rope_theta": 1e6, "factor": 4.0,
               "original_max_position_embeddings": 1024}),
    );
    let c = parse(&v).unwrap();
    assert_eq!(c.rope.theta, 1e6);
    let y = c.rope.yarn.unwrap();
    assert_eq!((y.factor, y.original_max_position_embeddings), (4.0, 1024));
    assert!((y.attention_factor - (0.1 * 4f64.ln() + 1.0)).abs() < 1e-12);
}

#[test]
fn config_errors_name_the_field() {
    let err = |v: Value| parse(&v).unwrap_err();
    // Block size outside 2..=16.
    for b in [0, 1, 17] {
        let e = err(with(base(), &["dflash_config", "block_size"], json!(b)));
        assert_eq!(e.field(), "dflash_config.block_size", "{b}: {e}");
    }
    let e = err(with(base(), &["block_size"], json!(32)));
    assert_eq!(e.field(), "block_size");
    // Unsupported math.
    let unsupported = [
        (
            with(base(), &["architectures"], json!(["DFlash2DraftModel"])),
            "architectures",
        ),
        (
            with(base(), &["dflash_config", "conv_kernel_size"], json!(2)),
            "dflash_config.conv_kernel_size",
        ),
        (
            with(base(), &["dflash_config", "output_multiplier"], json!(0.2)),
            "dflash_config.output_multiplier",
        ),
        (
            with(base(), &["final_logit_softcapping"], json!(20.0)),
            "final_logit_softcapping",
        ),
        (with(base(), &["v_head_dim"], json!(32)), "v_head_dim"),
        (with(base(), &["hidden_act"], json!("gelu")), "hidden_act"),
        (
            with(base(), &["rope_scaling"], json!({"rope_type": "llama3"})),
            "rope_scaling.rope_type",
        ),
    ];
    for (v, field) in unsupported {
        let e = err(v);
        assert_eq!(e.field(), field, "{e}");
    }
    assert!(parse(&with(
        base(),
        &["dflash_config", "output_multiplier"],
        json!(1.0)
    ))
    .is_ok());
    // Inconsistent dims.
    assert_eq!(
        err(with(base(), &["num_key_value_heads"], json!(3))).field(),
        "num_key_value_heads"
    );
    assert_eq!(
        err(with(base(), &["partial_rotary_factor"], json!(0.1))).field(),
        "partial_rotary_factor"
    );
    assert_eq!(
        err(with(base(), &["layer_types"], json!(["full_attention"]))).field(),
        "layer_types"
    );
    assert_eq!(
        err(with(
            base(),
            &["dflash_config", "target_layer_ids"],
            json!([])
        ))
        .field(),
        "dflash_config.target_layer_ids"
    );
    assert_eq!(
        err(with(
            base(),
            &["dflash_config", "target_layer_ids"],
            json!([0, -1])
        ))
        .field(),
        "dflash_config.target_layer_ids[1]"
    );
}

#[test]
fn files_round_trip_in_both_formats() {
    let m = load_target("mimo-v2-flash/native");
    let prompt_features = vec![0.25f32; 5 * 3 * m.config().hidden_size];
    for (kind, prefix, file) in [
        (ToyKind::ZLab, "", "model.safetensors"),
        (ToyKind::ZLabMixed, "model.", "model.safetensors"),
        (ToyKind::MiMo, "", "dflash_draft_model.safetensors"),
    ] {
        let d = toy::drafter(m.config(), kind, 8, 9);
        let dir = scratch_dir(&format!("roundtrip-{kind:?}"));
        let cfg = toy::config_json(m.config(), kind, 8);
        write_drafter(&dir, &cfg, d.weights(), prefix, file);
        let back = Drafter::load(&dir, m.config()).unwrap();
        assert_eq!(back.config(), d.config(), "{kind:?}");
        assert_eq!(back.weights(), d.weights(), "{kind:?}");
        // Same draft logits.
        let run = |d: &Drafter| {
            let mut c = d.new_cache();
            d.append_context(&mut c, &prompt_features).unwrap();
            d.draft(&mut c, &m.weights().embed, &m.weights().lm_head, 7, 8)
                .unwrap()
        };
        assert_bits(&run(&back), &run(&d), &format!("{kind:?} draft logits"));

        if kind == ToyKind::MiMo {
            // The mask embedding's metadata names the mask token: it must be the config's.
            let emb = d.weights().mask_embedding.clone().unwrap();
            let file = dir.join("mask_embedding.safetensors");
            let tensors = [("embedding".to_string(), vec![emb.len()], emb)];
            let meta = |id: u32| Some([("mask_token_id".to_string(), id.to_string())].into());
            let mask = d.config().mask_token_id;
            common::save_with_metadata(&file, &tensors, meta(mask));
            assert_eq!(
                Drafter::load(&dir, m.config()).unwrap().weights(),
                d.weights()
            );
            common::save_with_metadata(&file, &tensors, meta(mask - 1));
            let e = Drafter::load(&dir, m.config()).unwrap_err();
            assert!(matches!(e, DrafterError::MaskTokenMismatch { .. }), "{e}");

            // Only a torch file that is not a zip archive: a clear error (what is wrong, and
            // how to convert the file instead).
            std::fs::remove_file(dir.join("mask_embedding.safetensors")).unwrap();
            std::fs::write(dir.join("mask_embedding.pt"), b"PK\x03\x04").unwrap();
            let e = Drafter::load(&dir, m.config()).unwrap_err();
            assert!(matches!(e, DrafterError::MaskEmbeddingPt { .. }), "{e}");
            let msg = e.to_string();
            assert!(msg.contains("not a zip archive"), "{msg}");
            assert!(msg.contains("convert it to safetensors"), "{msg}");
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }
}

#[test]
fn checkpoint_errors_name_the_tensor() {
    let m = load_target("qwen3-moe/native");
    let d = toy::drafter(m.config(), ToyKind::ZLab, 8, 9);
    let cfg = toy::config_json(m.config(), ToyKind::ZLab, 8);
    let dir = scratch_dir("tensor-errors");
    // A wrong shape.
    let mut w = d.weights().clone();
    w.norm.push(1.0);
    write_drafter(&dir, &cfg, &w, "", "model.safetensors");
    let e = Drafter::load(&dir, m.config()).unwrap_err();
    assert!(
        matches!(&e, DrafterError::Tensor { tensor, .. } if tensor == "norm.weight"),
        "{e}"
    );
    // A missing tensor (config says sinks, the weights have none).
    let mut cfg2 = cfg.clone();
    cfg2["dflash_config"]["attention_sink_bias"] = json!(true);
    write_drafter(&dir, &cfg2, d.weights(), "", "model.safetensors");
    let e = Drafter::load(&dir, m.config()).unwrap_err();
    assert!(
        matches!(&e, DrafterError::Tensor { tensor, .. }
            if tensor == "layers.0.self_attn.attention_sink_bias" || tensor == "layers.1.self_attn.attention_sink_bias"),
        "{e}"
    );
    // A drafter-owned LM head is refused, not ignored.
    write_drafter(&dir, &cfg, d.weights(), "", "model.safetensors");
    let mut extra = vec![("lm_head.weight".to_string(), vec![2, 2], vec![0.0f32; 4])];
    extra.push(("fc.weight".into(), vec![2, 2], vec![0.0; 4]));
    common::save(&dir.join("model.safetensors"), &extra);
    let e = Drafter::load(&dir, m.config()).unwrap_err();
    assert!(
        matches!(&e, DrafterError::UnsupportedTensor { tensor, .. } if tensor == "lm_head.weight"),
        "{e}"
    );
    // No weights at all.
    std::fs::remove_file(dir.join("model.safetensors")).unwrap();
    let e = Drafter::load(&dir, m.config()).unwrap_err();
    assert!(matches!(e, DrafterError::Checkpoint { .. }), "{e}");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn target_mismatches_name_the_field() {
    let m = load_target("qwen3-moe/native"); // vocab 256, hidden 64, 3 layers
    let tc = m.config();
    let good = toy::config_json(tc, ToyKind::ZLab, 8);
    let check = |v: Value, hidden_t: usize| {
        let c = parse(&v).unwrap();
        let w = toy::random_weights(&c, hidden_t, false, 1);
        let d = Drafter::new(c, w).unwrap();
        match d.check_target(tc) {
            Err(DrafterError::TargetMismatch { field, .. }) => field,
            other => panic!("expected a mismatch, got {other:?}"),
        }
    };
    assert_eq!(
        check(with(good.clone(), &["hidden_size"], json!(96)), 64),
        "hidden_size"
    );
    assert_eq!(check(good.clone(), 48), "fc.weight");
    assert_eq!(
        check(with(good.clone(), &["target_hidden_size"], json!(48)), 48),
        "target_hidden_size"
    );
    assert_eq!(
        check(with(good.clone(), &["vocab_size"], json!(300)), 64),
        "vocab_size"
    );
    assert_eq!(
        check(
            with(
                good.clone(),
                &["dflash_config", "mask_token_id"],
                json!(256)
            ),
            64
        ),
        "mask_token_id"
    );
    assert_eq!(
        check(
            with(
                good.clone(),
                &["dflash_config", "target_layer_ids"],
                json!([0, 3])
            ),
            64
        ),
        "target_layer_ids[1]"
    );
    assert_eq!(
        check(with(good.clone(), &["num_target_layers"], json!(4)), 64),
        "num_target_layers"
    );

    // The decoder's block size.
    let d = toy::drafter(tc, ToyKind::ZLab, 8, 1);
    for b in [0, 1, 17] {
        let e = SpecDecoder::new(&m, d.clone(), Some(b)).unwrap_err();
        assert!(matches!(e, SpecError::BlockSize(x) if x == b), "{e}");
    }
    assert_eq!(
        SpecDecoder::new(&m, d.clone(), None).unwrap().block_size(),
        8
    );
    // A drafter for another target is refused by the decoder too.
    let other = load_target("gpt-oss/bf16");
    let e = SpecDecoder::new(&other, d, None).unwrap_err();
    assert!(
        matches!(e, SpecError::Drafter(DrafterError::TargetMismatch { .. })),
        "{e}"
    );
}

#[test]
fn fixture_drafters_load_and_fit_their_targets() {
    let root = fixtures_root().join("drafters");
    for (name, target) in [
        ("qwen3-moe-dflash", "qwen3-moe/native"),
        ("gpt-oss-dflash", "gpt-oss/bf16"),
        ("mimo-dflash", "mimo-v2-flash/native"),
    ] {
        let dir = root.join(name);
        let m = load_target(target);
        let d = Drafter::load(&dir, m.config()).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(d.config().hidden_size, m.config().hidden_size);
        if name == "mimo-dflash" {
            assert!(d.weights().mask_embedding.is_some() && d.config().sinks);
        }
    }
}

#[test]
fn draft_does_not_depend_on_how_context_arrived() {
    // 150 context tokens: the MiMo toy's sliding window of 4 compacts its cache several times.
    for rel in ["gpt-oss/bf16", "mimo-v2-flash/native"] {
        let m = load_target(rel);
        for kind in [ToyKind::ZLab, ToyKind::ZLabMixed, ToyKind::MiMo] {
            let d = toy::drafter(m.config(), kind, 8, 13);
            let w = d.feature_width();
            let n = 150;
            let feats: Vec<f32> = (0..n * w)
                .map(|i| ((i * 7919) % 1000) as f32 / 1000.0 - 0.5)
                .collect();
            let (emb, head) = (&m.weights().embed, &m.weights().lm_head);
            let mut one = d.new_cache();
            d.append_context(&mut one, &feats).unwrap();
            let mut many = d.new_cache();
            let mut at = 0;
            for step in [1, 3, 2, 7, 1, 16].iter().cycle() {
                if at == n {
                    break;
                }
                let k = (*step).min(n - at);
                d.append_context(&mut many, &feats[at * w..(at + k) * w])
                    .unwrap();
                at += k;
            }
            assert_eq!((one.len(), many.len()), (n, n));
            for b in [2, 8, 16] {
                let a = d.draft(&mut one, emb, head, 5, b).unwrap();
                let c = d.draft(&mut many, emb, head, 5, b).unwrap();
                assert_eq!(a.len(), (b - 1) * m.config().vocab_size);
                assert_bits(&a, &c, &format!("{rel} {kind:?} block {b}"));
            }
            // Drafting leaves the context as it was.
            let again = d.draft(&mut one, emb, head, 5, 8).unwrap();
            assert_bits(
                &again,
                &d.draft(&mut many, emb, head, 5, 8).unwrap(),
                "repeat",
            );
            assert_eq!(one.len(), n);
        }
    }
}

#[test]
fn draft_does_not_depend_on_the_cache_block_size() {
    // The drafter's context caches are paged like the target's: the block size (1, a size that
    // does not divide the sliding window, the default, larger than the context) and sharing a
    // cloned cache's blocks change where rows are stored, never a draft.
    for rel in ["gpt-oss/bf16", "mimo-v2-flash/native"] {
        let m = load_target(rel);
        for kind in [ToyKind::ZLab, ToyKind::MiMo] {
            let d = toy::drafter(m.config(), kind, 8, 13);
            let w = d.feature_width();
            let n = 100;
            let feats: Vec<f32> = (0..n * w)
                .map(|i| ((i * 6007) % 1000) as f32 / 1000.0 - 0.5)
                .collect();
            let (emb, head) = (&m.weights().embed, &m.weights().lm_head);
            let mut base = d.new_cache();
            d.append_context(&mut base, &feats).unwrap();
            let want = d.draft(&mut base, emb, head, 3, 8).unwrap();
            for bs in [1, 3, 16, 256] {
                let mut c = d.new_cache_with_block_size(bs);
                d.append_context(&mut c, &feats[..(n - 7) * w]).unwrap();
                // A clone shares the blocks; appending to one copy leaves the other unchanged.
                let mut fork = c.clone();
                d.append_context(&mut fork, &feats[..w]).unwrap();
                d.append_context(&mut c, &feats[(n - 7) * w..]).unwrap();
                let got = d.draft(&mut c, emb, head, 3, 8).unwrap();
                assert_bits(&want, &got, &format!("{rel} {kind:?} block size {bs}"));
                let mut fork_feats = feats[..(n - 7) * w].to_vec();
                fork_feats.extend_from_slice(&feats[..w]);
                let mut fork_ref = d.new_cache();
                d.append_context(&mut fork_ref, &fork_feats).unwrap();
                assert_bits(
                    &d.draft(&mut fork_ref, emb, head, 3, 8).unwrap(),
                    &d.draft(&mut fork, emb, head, 3, 8).unwrap(),
                    &format!("{rel} {kind:?} block size {bs}: forked cache"),
                );
            }
        }
    }
}

/// MiMo drafters ship the mask embedding as `mask_embedding.pt` (`torch.save` of
/// `{mask_token_id, embedding: bf16[H]}`): read without Python, it gives the very drafter the
/// safetensors copy gives (fixtures written by torch: `scripts/fixtures/make_mask_embedding_pt.py`);
/// a view at a storage offset saved with pickle protocol 4 reads the same values; a file naming
/// another mask id, or a non-tensor embedding, is a typed error.
#[test]
fn mask_embedding_pt_is_read() {
    let m = load_target("mimo-v2-flash/native");
    let src = fixtures_root().join("drafters/mimo-dflash");
    let want = Drafter::load(&src, m.config()).unwrap();
    assert!(want.weights().mask_embedding.is_some());
    let dir = scratch_dir("mask-embedding-pt");
    for f in ["config.json", "model.safetensors"] {
        std::fs::copy(src.join(f), dir.join(f)).unwrap();
    }
    let pts = fixtures_root().join("drafters/torch-pt");
    for file in ["mask_embedding.pt", "f32_view_protocol4.pt"] {
        std::fs::copy(pts.join(file), dir.join("mask_embedding.pt")).unwrap();
        let got = Drafter::load(&dir, m.config()).unwrap();
        assert_eq!(got.weights(), want.weights(), "{file}");
    }
    std::fs::copy(pts.join("wrong_id.pt"), dir.join("mask_embedding.pt")).unwrap();
    let e = Drafter::load(&dir, m.config()).unwrap_err();
    assert!(
        matches!(&e, DrafterError::MaskTokenMismatch { found, config: 0, .. } if found == "7"),
        "{e}"
    );
    // A truncated archive: an error naming the file, never a panic.
    let bytes = std::fs::read(pts.join("mask_embedding.pt")).unwrap();
    for cut in [10, bytes.len() / 2, bytes.len() - 30] {
        std::fs::write(dir.join("mask_embedding.pt"), &bytes[..cut]).unwrap();
        let e = Drafter::load(&dir, m.config()).unwrap_err();
        assert!(matches!(e, DrafterError::MaskEmbeddingPt { .. }), "{e}");
        assert!(e.to_string().contains("mask_embedding.pt"), "{e}");
    }
    // The safetensors copy wins when both are present.
    std::fs::write(dir.join("mask_embedding.pt"), b"not read").unwrap();
    std::fs::copy(
        src.join("mask_embedding.safetensors"),
        dir.join("mask_embedding.safetensors"),
    )
    .unwrap();
    assert_eq!(
        Drafter::load(&dir, m.config()).unwrap().weights(),
        want.weights()
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

/// The `config.json` of `XiaomiMiMo/MiMo-V2.5-Pro-FP4-DFlash` (`dflash/config.json`), field for
/// field as research/dflash.md §6.3 lists it.
fn mimo_v25_pro_config() -> Value {
    json!({
        "architectures": ["DFlashDraftModel"], "model_type": "qwen3",
        "auto_map": {"AutoModel": "dflash.DFlashDraftModel"},
        "hidden_size": 6144, "intermediate_size": 16384, "num_hidden_layers": 5,
        "num_attention_heads": 128, "num_key_value_heads": 8, "head_dim": 128, "v_head_dim": 128,
        "partial_rotary_factor": 0.5, "rope_theta": 10000, "max_position_embeddings": 262144,
        "block_size": 8, "sliding_window": 1024,
        "dflash_config": {
            "target_layer_ids": [0, 15, 31, 47, 69], "mask_token_id": 151669,
            "num_anchors": 4096, "block_size": 8, "loss_decay_gamma": 7.0, "use_swa": true,
            "swa_window_size": 1024, "backbone_rotary_base": 5000000,
            "attention_value_scale": 0.612, "attention_sink_bias": true
        },
        "num_target_layers": 70, "vocab_size": 152064, "rms_norm_eps": 1e-5,
        "hidden_act": "silu", "attention_bias": false, "tie_word_embeddings": false,
        "bos_token_id": 151643, "eos_token_id": 151645
    })
}

/// The `config.json` of z-lab's Qwen3-8B drafter (`z-lab/Qwen3-8B-DFlash-b16`, as SpecForge's
/// `configs/qwen3-8b-dflash.json`), field for field as research/dflash.md §6.1 lists it.
fn zlab_qwen3_8b_config() -> Value {
    json!({
        "architectures": ["DFlashDraftModel"], "model_type": "qwen3",
        "auto_map": {"AutoModel": "dflash.DFlashDraftModel"},
        "block_size": 16,
        "dflash_config": {"mask_token_id": 151669, "target_layer_ids": [1, 9, 17, 25, 33]},
        "num_target_layers": 36,
        "hidden_size": 4096, "intermediate_size": 12288, "num_hidden_layers": 5,
        "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 128,
        "rope_theta": 1000000, "rope_scaling": null, "max_position_embeddings": 40960,
        "rms_norm_eps": 1e-6, "hidden_act": "silu", "attention_bias": false,
        "attention_dropout": 0.0,
        "layer_types": ["full_attention", "full_attention", "full_attention", "full_attention",
                        "full_attention"],
        "sliding_window": null, "use_sliding_window": false, "max_window_layers": 36,
        "tie_word_embeddings": false, "vocab_size": 151936, "torch_dtype": "bfloat16"
    })
}

/// The published configs normalize to what their models mean (MiMo: every layer sliding 1024
/// and non-causal, sinks, value scale 0.612, 64 of 128 dims rotary with θ 10⁴, block 8; z-lab:
/// full bidirectional layers, block 16), fit targets of the published dimensions, and each
/// dimension the drafter borrows or reads from the target is refused with its field named when
/// the target differs.
#[test]
fn published_configs_parse_and_check_against_their_targets() {
    let c = parse(&mimo_v25_pro_config()).unwrap();
    let swa = DraftAttn {
        window: Some(1024),
        causal: false,
    };
    assert_eq!(c.layers, [swa; 5]);
    assert!(c.sinks);
    assert_eq!(c.value_scale, 0.612);
    assert_eq!((c.rope.theta, c.rope.rotary_dim), (1e4, 64));
    assert!(c.rope.yarn.is_none());
    assert_eq!(c.backbone_rotary_base, Some(5e6));
    assert_eq!(
        (
            c.hidden_size,
            c.intermediate_size,
            c.n_heads,
            c.n_kv_heads,
            c.head_dim
        ),
        (6144, 16384, 128, 8, 128)
    );
    assert_eq!(c.rms_norm_eps, 1e-5);
    assert_eq!(c.target_layer_ids, [0, 15, 31, 47, 69]);
    assert_eq!((c.mask_token_id, c.block_size), (151669, 8));
    assert_eq!(
        (c.vocab_size, c.num_target_layers),
        (Some(152064), Some(70))
    );
    // MiMo-V2.5-Pro: hidden 6144, 70 layers, vocabulary 152576 (fixtures/configs/
    // mimo-v2.5-pro.json; the drafter's config says 152064, fewer than the target's, which it
    // borrows); fc takes 5 × 6144 features.
    let fc = 5 * 6144;
    assert_eq!(c.check_target_dims(fc, 152576, 6144, 70), Ok(()));
    assert_eq!(c.check_target_dims(fc, 152064, 6144, 70), Ok(()));
    let field = |r: Result<(), DrafterError>| match r {
        Err(DrafterError::TargetMismatch { field, reason }) => {
            assert!(!reason.is_empty());
            field
        }
        other => panic!("expected a mismatch, got {other:?}"),
    };
    // The non-Pro MiMo-V2.5 (hidden 4096, 48 layers, vocabulary 152576).
    assert_eq!(
        field(c.check_target_dims(fc, 152064, 4096, 70)),
        "hidden_size"
    );
    // A target vocabulary smaller than the drafter's.
    assert_eq!(
        field(c.check_target_dims(fc, 152000, 6144, 70)),
        "vocab_size"
    );
    assert_eq!(
        field(c.check_target_dims(fc, 152064, 6144, 48)),
        "target_layer_ids[4]"
    );
    assert_eq!(
        field(c.check_target_dims(fc, 152064, 6144, 72)),
        "num_target_layers"
    );
    assert_eq!(
        field(c.check_target_dims(4 * 6144, 152064, 6144, 70)),
        "fc.weight"
    );

    let c = parse(&zlab_qwen3_8b_config()).unwrap();
    let full = DraftAttn {
        window: None,
        causal: false,
    };
    assert_eq!(c.layers, [full; 5]);
    assert!(!c.sinks);
    assert_eq!(c.value_scale, 1.0);
    assert_eq!((c.rope.theta, c.rope.rotary_dim), (1e6, 128));
    assert_eq!(c.target_layer_ids, [1, 9, 17, 25, 33]);
    assert_eq!(
        c.target_layer_ids,
        build_target_layer_ids(36, 5),
        "z-lab's fallback formula gives the same layers"
    );
    assert_eq!((c.mask_token_id, c.block_size), (151669, 16));
    // Qwen3-8B: hidden 4096, 36 layers, vocabulary 151936.
    assert_eq!(c.check_target_dims(5 * 4096, 151936, 4096, 36), Ok(()));
    assert_eq!(
        field(c.check_target_dims(5 * 4096, 151936, 4096, 28)),
        "target_layer_ids[4]"
    );
    // A smaller vocabulary than the drafter's.
    assert_eq!(
        field(c.check_target_dims(5 * 4096, 151000, 4096, 36)),
        "vocab_size"
    );
}

/// A drafter directory laid out as Xiaomi ships it (`dflash/`: `config.json`, `dflash.py`,
/// `dflash_draft_model.safetensors`, `model.safetensors.index.json` pointing at it,
/// `mask_embedding.pt`) loads as the same drafter as the fixture's safetensors copy.
#[test]
fn mimo_checkpoint_layout_loads() {
    let m = load_target("mimo-v2-flash/native");
    let src = fixtures_root().join("drafters/mimo-dflash");
    let want = Drafter::load(&src, m.config()).unwrap();
    let dir = scratch_dir("mimo-layout");
    let cfg: Value =
        serde_json::from_str(&std::fs::read_to_string(src.join("config.json")).unwrap()).unwrap();
    let mut w = want.weights().clone();
    w.mask_embedding = None; // the mask embedding comes from the .pt file only
    write_drafter(&dir, &cfg, &w, "", "dflash_draft_model.safetensors");
    let names = safetensors::SafeTensors::deserialize(
        &std::fs::read(dir.join("dflash_draft_model.safetensors")).unwrap(),
    )
    .unwrap()
    .names()
    .into_iter()
    .map(|n| (n.to_string(), json!("dflash_draft_model.safetensors")))
    .collect::<serde_json::Map<_, _>>();
    assert!(names.contains_key("layers.1.self_attn.attention_sink_bias"));
    std::fs::write(
        dir.join("model.safetensors.index.json"),
        json!({"metadata": {"total_size": 0}, "weight_map": names}).to_string(),
    )
    .unwrap();
    std::fs::write(dir.join("dflash.py"), "# reference code, not read\n").unwrap();
    std::fs::copy(
        fixtures_root().join("drafters/torch-pt/mask_embedding.pt"),
        dir.join("mask_embedding.pt"),
    )
    .unwrap();
    let got = Drafter::load(&dir, m.config()).unwrap();
    assert_eq!(got.config(), want.config());
    assert_eq!(got.weights(), want.weights());
    // Without the mask embedding the mask slots would use the vocabulary row: a different
    // drafter.
    std::fs::remove_file(dir.join("mask_embedding.pt")).unwrap();
    let plain = Drafter::load(&dir, m.config()).unwrap();
    assert!(plain.weights().mask_embedding.is_none());
    assert_ne!(plain.weights(), want.weights());
    std::fs::remove_dir_all(&dir).unwrap();
}
