//! The CPU executor against the HF transformers goldens in `fixtures/` (tiny random checkpoints
//! of gpt-oss — bf16 and MXFP4 experts, Hub and transformers-5 config spellings — Qwen3-MoE —
//! native, Hub, sharded — and MiMo-V2-Flash — native, Hub), loaded with `model::load::load`.
//!
//! For every directory holding `golden_f32.json` (HF `from_pretrained(dtype=float32)`, eager
//! attention):
//! * logits of one full forward: max |Δ| ≤ 1e-4 on logits of magnitude ≤ 3.4. Justification:
//!   both sides compute the same f32 math with different summation orders; an independent numpy
//!   forward agreed with these goldens to ≤ 2.2e-6 (research/models.md §5.1), HF's own
//!   incremental decode differs from its full forward by ≤ 2.9e-6 (fixtures/README.md), and the
//!   goldens are rounded to 9 significant digits. 1e-4 is ~30× the observed spread yet far
//!   below any real mistake (HF bf16 vs f32 alone is 2.4e-2..4.1e-2). The observed maximum is
//!   printed.
//! * every hidden state (`hidden_states[i]`: embeddings, each layer's output, the last after the
//!   final norm — the executor's indexing): max |Δ| ≤ 1e-4 · max(1, |h|);
//! * the 8-token greedy continuation (prefill, then argmax → decode through the KV cache,
//!   crossing the sliding window of 4): exactly equal;
//! * the same logits again through token-by-token decode (bit-identical to the full forward).

mod cpu_util;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use cpu_util::{argmax, assert_bits};
use model::cpu::CpuModel;

fn fixtures_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures")
}

fn golden_dirs(dir: &Path, out: &mut Vec<PathBuf>) {
    if dir.join("golden_f32.json").is_file() && dir.join("config.json").is_file() {
        out.push(dir.to_path_buf());
    }
    let mut subs: Vec<PathBuf> = std::fs::read_dir(dir)
        .map(|rd| {
            rd.filter_map(|e| e.ok())
                .map(|e| e.path())
                .filter(|p| p.is_dir())
                .collect()
        })
        .unwrap_or_default();
    subs.sort();
    for s in subs {
        golden_dirs(&s, out);
    }
}

fn f32s(v: &serde_json::Value) -> Vec<f32> {
    v.as_array()
        .expect("array")
        .iter()
        .map(|x| x.as_f64().expect("number") as f32)
        .collect()
}

fn rows(v: &serde_json::Value) -> Vec<Vec<f32>> {
    v.as_array().expect("array").iter().map(f32s).collect()
}

fn u32s(v: &serde_json::Value) -> Vec<u32> {
    v.as_array()
        .expect("array")
        .iter()
        .map(|x| x.as_u64().expect("integer") as u32)
        .collect()
}

#[test]
fn cpu_matches_hf_f32_goldens() {
    let mut dirs = Vec::new();
    golden_dirs(&fixtures_root(), &mut dirs);
    assert!(
        !dirs.is_empty(),
        "no fixture directories with golden_f32.json under {}",
        fixtures_root().display()
    );
    for dir in dirs {
        let name = dir
            .strip_prefix(fixtures_root())
            .unwrap_or(&dir)
            .display()
            .to_string();
        let text = std::fs::read_to_string(dir.join("golden_f32.json")).unwrap();
        let g: serde_json::Value = serde_json::from_str(&text).unwrap();
        let ids = u32s(&g["input_ids"]);
        let want_logits = rows(&g["logits"]);
        let want_hidden: Vec<Vec<Vec<f32>>> = g["hidden_states"]
            .as_array()
            .unwrap()
            .iter()
            .map(rows)
            .collect();
        let want_greedy = u32s(&g["greedy_continuation"]);

        let (cfg, w) = model::load::load(&dir).unwrap_or_else(|e| panic!("{name}: {e}"));
        let m = CpuModel::new(Arc::new(cfg), Arc::new(w)).unwrap_or_else(|e| panic!("{name}: {e}"));

        let (logits, hidden) = m.forward_full(&ids).unwrap();
        assert_eq!(logits.len(), want_logits.len(), "{name}");
        let mut worst = 0f32;
        for (i, (a, b)) in logits.iter().zip(&want_logits).enumerate() {
            assert_eq!(a.len(), b.len(), "{name}: vocab");
            for (j, (&x, &y)) in a.iter().zip(b).enumerate() {
                let d = (x - y).abs();
                worst = worst.max(d);
                assert!(d <= 1e-4, "{name}: logit [{i}][{j}] = {x}, HF {y} (Δ {d})");
            }
        }
        assert_eq!(
            hidden.len(),
            want_hidden.len(),
            "{name}: hidden-state count"
        );
        let mut worst_h = 0f32;
        for (l, (a, b)) in hidden.iter().zip(&want_hidden).enumerate() {
            for (i, (ra, rb)) in a.iter().zip(b).enumerate() {
                for (&x, &y) in ra.iter().zip(rb) {
                    let d = (x - y).abs();
                    worst_h = worst_h.max(d / y.abs().max(1.0));
                    assert!(
                        d <= 1e-4 * y.abs().max(1.0),
                        "{name}: hidden_states[{l}][{i}]: {x} vs HF {y} (Δ {d})"
                    );
                }
            }
        }

        // Greedy continuation through the KV cache.
        let mut s = m.session();
        let mut next = argmax(s.prefill(&ids).unwrap());
        let mut got = vec![next];
        while got.len() < want_greedy.len() {
            next = argmax(s.decode(next).unwrap());
            got.push(next);
        }
        assert_eq!(got, want_greedy, "{name}: greedy continuation");

        // Token-by-token decode reproduces the full forward bit for bit.
        let mut s = m.session();
        for (i, &t) in ids.iter().enumerate() {
            assert_bits(
                s.decode(t).unwrap(),
                &logits[i],
                &format!("{name}: decode {i}"),
            );
        }
        println!(
            "{name}: max |Δlogit| vs HF f32 = {worst:.2e}, hidden rel {worst_h:.2e}, greedy {got:?} ok"
        );
    }
}
