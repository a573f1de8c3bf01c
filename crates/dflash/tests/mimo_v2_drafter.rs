//! The MiMo-V2.5(-Pro) DFlash drafter as the FP4-DFlash checkpoint ships it (`dflash/`:
//! `config.json` with `dflash_config`, `dflash_draft_model.safetensors` + its index,
//! `mask_embedding.pt`; `fixtures/mimo-v2/dflash`), on the tiny `mimo_v2` target `fixtures/mimo-v2/fp4` (written by
//! `scripts/fixtures/make_mimo_v2_dflash.py`):
//!
//! * the config resolves to MiMo's semantics (every layer sliding and non-causal, sinks, value
//!   scale, partial RoPE, the last target layer among the taps) and the weights load in their
//!   checkpoint dtype (BF16 views of the mapped file, gate/up one view);
//! * one block draft after the target's golden prompt equals the independent float64 numpy
//!   drafter of the script (features from the numpy target reference): context features, fused
//!   context and draft logits within 1e-4 (the tolerance of `drafter_golden.rs`), draft tokens
//!   exactly;
//! * speculative greedy decoding equals plain greedy decoding at every block size, and its first
//!   tokens equal the target's golden continuation;
//! * a mis-shaped tensor and a mask embedding of another token are errors naming them.
//!
//! Xiaomi's `dflash/dflash.py` is not public outside the model repository, so there is no
//! transformers golden for this drafter (fixtures/README.md).

mod common;

use std::ops::ControlFlow;
use std::path::PathBuf;

use common::{fixture_prompt, fixtures_root, load_target, max_abs_diff, plain_decode, scratch_dir};
use dflash::{Drafter, DrafterError, SpecDecoder};
use model::sampling::SamplingParams;
use model::weights::{DenseDtype, Mlp};
use serde_json::Value;

const TARGET: &str = "mimo-v2/fp4";
const TOL: f32 = 1e-4;

fn drafter_dir() -> PathBuf {
    fixtures_root().join("mimo-v2/dflash")
}

fn flat(v: &Value) -> Vec<f32> {
    match v {
        Value::Array(a) => a.iter().flat_map(flat).collect(),
        Value::Number(n) => vec![n.as_f64().expect("number") as f32],
        other => panic!("expected numbers, got {other}"),
    }
}

#[test]
fn released_layout_loads_with_mimo_semantics_in_the_stored_dtype() {
    let m = load_target(TARGET);
    let d = Drafter::load(&drafter_dir(), m.config()).unwrap();
    let c = d.config();
    assert_eq!(
        c.target_layer_ids,
        [0, 1, 2],
        "the last target layer is a tap"
    );
    assert_eq!(c.block_size, 8);
    assert_eq!(c.mask_token_id, 255);
    assert!(c.sinks);
    assert_eq!(c.value_scale, 0.612);
    assert_eq!(
        c.rope.rotary_dim, 16,
        "partial_rotary_factor 0.5 of head_dim 32"
    );
    assert_eq!(c.rope.theta, 10_000.0);
    assert_eq!(c.backbone_rotary_base, Some(5e6));
    assert_eq!(c.layers.len(), 2);
    for l in &c.layers {
        assert_eq!(l.window, Some(10), "use_swa: every layer sliding");
        assert!(!l.causal, "MiMo's drafter is non-causal");
    }
    let w = d.weights();
    assert_eq!(w.mask_embedding.as_ref().map(Vec::len), Some(64));
    assert_eq!(w.fc.dtype(), DenseDtype::Bf16);
    assert!(w.fc.bytes().is_mapped(), "fc is a view of the mapped file");
    for l in &w.layers {
        for lin in [&l.attn.q, &l.attn.k, &l.attn.v, &l.attn.o] {
            assert_eq!(lin.w.dtype(), DenseDtype::Bf16);
            assert!(lin.w.bytes().is_mapped());
        }
        let Mlp::Dense { gate_up, down } = &l.mlp else {
            panic!("dense MLP")
        };
        assert_eq!((gate_up.w.rows, gate_up.w.cols), (2 * 96, 64));
        assert_eq!(gate_up.w.dtype(), DenseDtype::Bf16);
        assert!(
            gate_up.w.is_mapped() && down.w.is_mapped(),
            "gate_proj and up_proj lie back to back: one view, no copy"
        );
    }
}

#[test]
fn block_draft_matches_the_numpy_reference() {
    let g: Value = serde_json::from_str(
        &std::fs::read_to_string(drafter_dir().join("golden_draft.json"))
            .expect("golden_draft.json (scripts/fixtures/make_mimo_v2_dflash.py)"),
    )
    .unwrap();
    let m = load_target(TARGET);
    let d = Drafter::load(&drafter_dir(), m.config()).unwrap();
    let prompt: Vec<u32> = g["prompt_ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect();
    assert_eq!(prompt, fixture_prompt(TARGET));
    let b = g["block_size"].as_u64().unwrap() as usize;
    let v = m.config().vocab_size;

    // The target's features of the prompt (outputs of layers 0, 1 and the last before the
    // final norm), concatenated per token.
    let ids: Vec<usize> = d
        .config()
        .target_layer_ids
        .iter()
        .map(|&l| dflash::target::hidden_index(l, m.config().layers.len()).unwrap())
        .collect();
    let mut s = m.session();
    let out = s.verify(&prompt, &ids).unwrap();
    let ours: Vec<f32> = (0..prompt.len())
        .flat_map(|j| out.hidden.iter().flat_map(move |h| h[j].iter().copied()))
        .collect();
    let gf = flat(&g["context_features"]);
    let d_feat = max_abs_diff(&ours, &gf);

    let gfused = flat(&g["fused_context"]);
    let d_fused = max_abs_diff(&d.fuse(&gf).unwrap(), &gfused)
        .max(max_abs_diff(&d.fuse(&ours).unwrap(), &gfused));

    let x_last = g["x_last"].as_u64().unwrap() as u32;
    let row = &out.logits[prompt.len() - 1];
    let argmax = |r: &[f32]| {
        let mx = r.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        r.iter().position(|&x| x == mx).unwrap() as u32
    };
    assert_eq!(argmax(row), x_last, "the prefill's greedy token");
    let mut cache = d.new_cache();
    d.append_context(&mut cache, &ours).unwrap();
    let w = m.weights();
    let logits = d
        .draft(&mut cache, &w.embed, &w.lm_head, x_last, b)
        .unwrap();
    assert_eq!(logits.len(), (b - 1) * v);
    let d_logit = max_abs_diff(&logits, &flat(&g["draft_logits"]));
    let tokens: Vec<u64> = logits.chunks_exact(v).map(|r| argmax(r) as u64).collect();
    let want: Vec<u64> = g["draft_tokens"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap())
        .collect();
    eprintln!(
        "max |Δ| features {d_feat:.2e}, fused context {d_fused:.2e}, draft logits {d_logit:.2e}"
    );
    assert!(d_feat <= TOL, "target features differ by {d_feat}");
    assert!(d_fused <= TOL, "fused context differs by {d_fused}");
    assert!(d_logit <= TOL, "draft logits differ by {d_logit}");
    assert_eq!(tokens, want, "draft tokens");
}

#[test]
fn speculative_greedy_equals_plain_greedy() {
    let m = load_target(TARGET);
    let d = Drafter::load(&drafter_dir(), m.config()).unwrap();
    let prompt = fixture_prompt(TARGET);
    let params = SamplingParams {
        max_tokens: 24,
        ignore_eos: true,
        ..SamplingParams::greedy()
    };
    let want = plain_decode(&m, &prompt, &params);
    assert_eq!(want.len(), 24);
    let golden: Value = serde_json::from_str(
        &std::fs::read_to_string(fixtures_root().join(TARGET).join("golden_f32.json")).unwrap(),
    )
    .unwrap();
    let cont: Vec<u32> = golden["greedy_continuation"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect();
    assert_eq!(
        want[..cont.len()],
        cont[..],
        "plain greedy = the golden continuation"
    );
    for b in [2, 3, 4, 8, 16] {
        let spec = SpecDecoder::new(&m, d.clone(), Some(b)).unwrap();
        let out = spec
            .generate(&prompt, &params, |_| ControlFlow::Continue(()))
            .unwrap();
        assert_eq!(out.tokens, want, "block {b}");
        assert_eq!(out.stats.emitted_tokens(), 23, "block {b}");
    }
}

#[test]
fn bad_drafter_files_are_named() {
    let m = load_target(TARGET);
    let src = drafter_dir();
    let dir = scratch_dir("mimo-v2-dflash-errors");
    for f in std::fs::read_dir(&src).unwrap() {
        let f = f.unwrap().path();
        std::fs::copy(&f, dir.join(f.file_name().unwrap())).unwrap();
    }
    // A config whose intermediate size disagrees with the tensors: the tensor is named.
    let cfg_path = dir.join("config.json");
    let mut cfg: Value =
        serde_json::from_str(&std::fs::read_to_string(&cfg_path).unwrap()).unwrap();
    cfg["intermediate_size"] = 80.into();
    std::fs::write(&cfg_path, cfg.to_string()).unwrap();
    let e = Drafter::load(&dir, m.config()).unwrap_err();
    assert!(
        matches!(&e, DrafterError::Tensor { tensor, .. } if tensor.ends_with("mlp.gate_proj.weight")),
        "{e}"
    );
    // A mask embedding saved for another token than the config's.
    cfg["intermediate_size"] = 96.into();
    cfg["dflash_config"]["mask_token_id"] = 7.into();
    std::fs::write(&cfg_path, cfg.to_string()).unwrap();
    let e = Drafter::load(&dir, m.config()).unwrap_err();
    assert!(
        matches!(&e, DrafterError::MaskTokenMismatch { found, config: 7, .. } if found == "255"),
        "{e}"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}
