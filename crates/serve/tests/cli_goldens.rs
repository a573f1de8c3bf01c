//! `ultra generate` / `ultra score` (the library functions behind them) on every golden fixture:
//! greedy continuations equal transformers' token for token, and scores equal the log-softmax
//! of transformers' f32 logits.

use std::path::{Path, PathBuf};

use model::sampling::SamplingParams;
use serde_json::Value;
use serve::commands::generate::{generate, load, score};

fn fixture_dirs() -> Vec<PathBuf> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures");
    let mut dirs = Vec::new();
    for arch in ["gpt-oss", "qwen3-moe", "mimo-v2-flash", "mimo-v2"] {
        for e in std::fs::read_dir(root.join(arch)).unwrap() {
            let p = e.unwrap().path();
            if p.join("golden_f32.json").exists() {
                dirs.push(p);
            }
        }
    }
    dirs.sort();
    assert!(dirs.len() >= 8, "fixtures missing: {dirs:?}");
    dirs
}

fn golden(dir: &Path) -> Value {
    serde_json::from_str(&std::fs::read_to_string(dir.join("golden_f32.json")).unwrap()).unwrap()
}

fn ids(v: &Value) -> Vec<u32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect()
}

#[test]
fn greedy_generation_matches_transformers() {
    for dir in fixture_dirs() {
        let g = golden(&dir);
        let loaded = load(&dir).unwrap();
        let params = SamplingParams {
            max_tokens: 8,
            ignore_eos: true,
            ..SamplingParams::greedy()
        };
        let mut sink = Vec::new();
        let out = generate(&loaded, &ids(&g["input_ids"]), &params, &mut sink).unwrap();
        assert_eq!(
            out.tokens,
            ids(&g["greedy_continuation"]),
            "{}",
            dir.display()
        );
        assert_eq!(out.finish_reason, "length");
        // What was streamed is exactly the decoded continuation.
        let tok = loaded.tokenizer.as_ref().unwrap();
        assert_eq!(
            String::from_utf8_lossy(&sink),
            tok.decode(&out.tokens, true).unwrap()
        );
    }
}

#[test]
fn scores_match_transformers_log_softmax() {
    for dir in fixture_dirs() {
        let g = golden(&dir);
        let input = ids(&g["input_ids"]);
        let loaded = load(&dir).unwrap();
        let got = score(&loaded, &input).unwrap();
        assert_eq!(got.len(), input.len());
        assert!(got[0].is_none());
        let logits = g["logits"].as_array().unwrap();
        for i in 1..input.len() {
            let row: Vec<f64> = logits[i - 1]
                .as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_f64().unwrap())
                .collect();
            let m = row.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            let lse = m + row.iter().map(|x| (x - m).exp()).sum::<f64>().ln();
            let want = row[input[i] as usize] - lse;
            // Logit tolerance 1e-4 (see the CPU golden tests) bounds a log-prob error of 2e-4.
            assert!(
                (got[i].unwrap() - want).abs() < 2e-4,
                "{} position {i}: {} vs {want}",
                dir.display(),
                got[i].unwrap()
            );
        }
    }
}

/// `score` runs one `Executor::forward` (verify passes of `FORWARD_CHUNK`): bit for bit the
/// log-probabilities of the CPU session's `prefill_all` rows (what it ran before), for inputs
/// shorter and longer than a chunk.
#[test]
fn scores_are_the_prefill_rows_bit_for_bit() {
    for dir in fixture_dirs() {
        let loaded = load(&dir).unwrap();
        let v = loaded.config.vocab_size as u32;
        for n in [9u32, model::executor::FORWARD_CHUNK as u32 + 7] {
            let input: Vec<u32> = (0..n).map(|i| (i * 29 + 3) % v).collect();
            let rows = loaded.cpu().unwrap().session().prefill_all(&input).unwrap();
            let got = score(&loaded, &input).unwrap();
            for i in 1..input.len() {
                let want = model::sampling::logprob_of(&rows[i - 1], input[i]);
                assert_eq!(
                    got[i].map(f64::to_bits),
                    Some(want.to_bits()),
                    "{} ({n} tokens) position {i}",
                    dir.display()
                );
            }
        }
    }
}

/// `ultra generate --draft`: greedy speculative output (and streamed text) equals plain greedy
/// generation, for each fixture drafter and several block sizes.
#[test]
fn speculative_generation_equals_plain_generation() {
    use serve::commands::generate::generate_speculative;
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures");
    for (target, drafter) in [
        ("qwen3-moe/native", "qwen3-moe-dflash"),
        ("gpt-oss/bf16", "gpt-oss-dflash"),
        ("mimo-v2-flash/native", "mimo-dflash"),
    ] {
        let dir = root.join(target);
        let loaded = load(&dir).unwrap();
        let prompt = ids(&golden(&dir)["input_ids"]);
        let params = SamplingParams {
            max_tokens: 24,
            ignore_eos: true,
            ..SamplingParams::greedy()
        };
        let mut plain_text = Vec::new();
        let plain = generate(&loaded, &prompt, &params, &mut plain_text).unwrap();
        for block in [None, Some(2), Some(8)] {
            let mut text = Vec::new();
            let spec = generate_speculative(
                &loaded,
                &root.join("drafters").join(drafter),
                block,
                &prompt,
                &params,
                &mut text,
            )
            .unwrap();
            assert_eq!(
                spec.generation.tokens, plain.tokens,
                "{target} block {block:?}"
            );
            assert_eq!(text, plain_text, "{target} block {block:?}");
            let tau = spec.stats.tau().unwrap();
            assert!((1.0..=spec.block_size as f64).contains(&tau));
        }
    }
}
