//! `model::quantize` on a synthetic gpt-oss-shaped checkpoint: the MXFP4 tensors equal `fp4`'s
//! quantization of the transposed experts, everything else is copied byte for byte, and bad
//! inputs are refused with errors naming the file.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use fp4::ScaleRounding;
use model::quantize::{quantize_checkpoint, QuantizeError};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use safetensors::tensor::TensorView;
use safetensors::{Dtype, SafeTensors};

fn temp_dir(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!(
        "ultra-quantize-{tag}-{}-{}",
        std::process::id(),
        rand::random::<u32>()
    ));
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn bf16_bytes(v: &[f32]) -> Vec<u8> {
    v.iter()
        .flat_map(|x| half::bf16::from_f32(*x).to_le_bytes())
        .collect()
}

/// A 1-layer checkpoint: experts [E=3, H=64, 2I=64] and [E, I=32, H], a router, a norm.
fn write_checkpoint(dir: &Path, model_type: &str) -> HashMap<String, (Vec<usize>, Vec<f32>)> {
    let mut rng = ChaCha8Rng::seed_from_u64(9);
    let mut tensors = HashMap::new();
    for (name, shape) in [
        ("model.layers.0.mlp.experts.gate_up_proj", vec![3, 64, 64]),
        ("model.layers.0.mlp.experts.down_proj", vec![3, 32, 64]),
        ("model.layers.0.mlp.router.weight", vec![3, 64]),
        ("model.norm.weight", vec![64]),
    ] {
        let n: usize = shape.iter().product();
        let v: Vec<f32> = (0..n)
            .map(|_| half::bf16::from_f32(rng.random_range(-0.5..0.5)).to_f32())
            .collect();
        tensors.insert(name.to_string(), (shape, v));
    }
    let bytes: Vec<(String, Vec<usize>, Vec<u8>)> = tensors
        .iter()
        .map(|(k, (s, v))| (k.clone(), s.clone(), bf16_bytes(v)))
        .collect();
    let views: Vec<(String, TensorView<'_>)> = bytes
        .iter()
        .map(|(k, s, b)| {
            (
                k.clone(),
                TensorView::new(Dtype::BF16, s.clone(), b).unwrap(),
            )
        })
        .collect();
    safetensors::serialize_to_file(views, None, &dir.join("model.safetensors")).unwrap();
    std::fs::write(
        dir.join("config.json"),
        format!(r#"{{"model_type": "{model_type}", "hidden_size": 64}}"#),
    )
    .unwrap();
    std::fs::write(dir.join("tokenizer.json"), "{}").unwrap();
    tensors
}

#[test]
fn experts_become_mxfp4_and_the_rest_is_copied() {
    let input = temp_dir("in");
    let output = temp_dir("out").join("q");
    let tensors = write_checkpoint(&input, "gpt_oss");
    let report = quantize_checkpoint(&input, &output, ScaleRounding::Up).unwrap();
    assert_eq!(report.tensors_quantized, 2);
    assert_eq!(report.tensors_copied, 2);
    assert!(report.max_relative_error > 0.0 && report.max_relative_error < 0.25);

    let bytes = std::fs::read(output.join("model.safetensors")).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    for (name, (e, k, n)) in [
        ("model.layers.0.mlp.experts.gate_up_proj", (3, 64, 64)),
        ("model.layers.0.mlp.experts.down_proj", (3, 32, 64)),
    ] {
        let blocks = st.tensor(&format!("{name}_blocks")).unwrap();
        let scales = st.tensor(&format!("{name}_scales")).unwrap();
        assert_eq!(blocks.shape(), &[e, n, k / 32, 16]);
        assert_eq!(scales.shape(), &[e, n, k / 32]);
        assert_eq!(blocks.dtype(), Dtype::U8);
        let src = &tensors[name].1;
        for x in 0..e {
            let mut rows = vec![0f32; n * k];
            for i in 0..k {
                for o in 0..n {
                    rows[o * k + i] = src[x * k * n + i * n + o];
                }
            }
            let q = fp4::quantize_matrix(&rows, n, k, ScaleRounding::Up).unwrap();
            let per_b = n * k / 2;
            let per_s = n * k / 32;
            assert_eq!(&blocks.data()[x * per_b..(x + 1) * per_b], &q.blocks[..]);
            assert_eq!(&scales.data()[x * per_s..(x + 1) * per_s], &q.scales[..]);
        }
        assert!(st.tensor(name).is_err(), "{name} must be replaced");
    }
    for name in ["model.layers.0.mlp.router.weight", "model.norm.weight"] {
        let t = st.tensor(name).unwrap();
        assert_eq!(t.data(), &bf16_bytes(&tensors[name].1)[..]);
    }
    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(output.join("config.json")).unwrap())
            .unwrap();
    assert_eq!(config["quantization_config"]["quant_method"], "mxfp4");
    assert!(output.join("tokenizer.json").exists());
    // Quantizing the output again is refused.
    let again = quantize_checkpoint(&output, &temp_dir("again").join("q"), ScaleRounding::Up);
    assert!(matches!(again, Err(QuantizeError::Invalid { .. })));
}

#[test]
fn bad_inputs_are_refused_with_the_path() {
    let qwen = temp_dir("qwen");
    write_checkpoint(&qwen, "qwen3_moe");
    let err = quantize_checkpoint(&qwen, &temp_dir("o1").join("q"), ScaleRounding::Floor)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("config.json") && err.contains("qwen3_moe"),
        "{err}"
    );

    let empty = temp_dir("empty");
    let err = quantize_checkpoint(&empty, &temp_dir("o2").join("q"), ScaleRounding::Floor)
        .unwrap_err()
        .to_string();
    assert!(err.contains("config.json"), "{err}");

    let ok = temp_dir("ok");
    write_checkpoint(&ok, "gpt_oss");
    let busy = temp_dir("busy");
    std::fs::write(busy.join("x"), "x").unwrap();
    let err = quantize_checkpoint(&ok, &busy, ScaleRounding::Floor)
        .unwrap_err()
        .to_string();
    assert!(err.contains("not empty"), "{err}");

    let truncated = temp_dir("trunc");
    write_checkpoint(&truncated, "gpt_oss");
    let p = truncated.join("model.safetensors");
    let bytes = std::fs::read(&p).unwrap();
    std::fs::write(&p, &bytes[..bytes.len() / 2]).unwrap();
    let err = quantize_checkpoint(&truncated, &temp_dir("o3").join("q"), ScaleRounding::Floor)
        .unwrap_err()
        .to_string();
    assert!(err.contains("model.safetensors"), "{err}");
}

/// Dequantized expert values of every `*_blocks`/`*_scales` pair in a checkpoint file.
fn dequantized_experts(path: &Path) -> Vec<(String, Vec<f32>)> {
    let bytes = std::fs::read(path).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let mut names: Vec<String> = st
        .names()
        .into_iter()
        .filter(|n| n.ends_with("_blocks"))
        .map(str::to_owned)
        .collect();
    names.sort();
    names
        .into_iter()
        .map(|b| {
            let s = b.replace("_blocks", "_scales");
            let (bt, stt) = (st.tensor(&b).unwrap(), st.tensor(&s).unwrap());
            let w = fp4::MxExpertsRef::from_shapes(bt.shape(), bt.data(), stt.shape(), stt.data())
                .unwrap();
            let vals = (0..w.experts())
                .flat_map(|e| fp4::dequantize(w.expert(e).unwrap()))
                .collect();
            (b, vals)
        })
        .collect()
}

/// The bf16 gpt-oss fixture's experts lie on the MXFP4 grid (the generator snapped them), so
/// quantizing it must reproduce the released-layout fixture's values exactly. (transformers,
/// loading this output with `Mxfp4Config(dequantize=True)`, reproduces the golden logits with
/// max |Δ| = 0.0 — checked with the fixtures' venv, see fixtures/README.md.)
#[test]
fn quantizing_the_bf16_fixture_reproduces_the_mxfp4_fixture() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/gpt-oss");
    let out = temp_dir("fixture").join("q");
    quantize_checkpoint(&root.join("bf16"), &out, ScaleRounding::Up).unwrap();
    let ours = dequantized_experts(&out.join("model.safetensors"));
    let theirs = dequantized_experts(&root.join("mxfp4/model.safetensors"));
    assert_eq!(ours.len(), 8);
    assert_eq!(ours.len(), theirs.len());
    for ((na, va), (nb, vb)) in ours.iter().zip(&theirs) {
        assert_eq!(na, nb);
        assert_eq!(va.len(), vb.len());
        for (x, y) in va.iter().zip(vb) {
            assert_eq!(x, y, "{na}"); // -0.0 == 0.0: the encodings of zero may differ in sign
        }
    }
}

/// Ultra loads its own quantizer's output and computes the same logits as from the released-
/// layout fixture (both are exactly the golden model, whose experts lie on the MXFP4 grid).
#[test]
fn the_quantized_fixture_loads_and_runs() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/gpt-oss");
    let out = temp_dir("load").join("q");
    quantize_checkpoint(&root.join("bf16"), &out, ScaleRounding::Up).unwrap();
    let ids: Vec<u32> = (2..14).collect();
    let logits = |dir: &Path| {
        let (cfg, w) = model::load::load(dir).unwrap();
        let m =
            model::cpu::CpuModel::new(std::sync::Arc::new(cfg), std::sync::Arc::new(w)).unwrap();
        m.forward_full(&ids).unwrap().0
    };
    assert_eq!(logits(&out), logits(&root.join("mxfp4")));
}
