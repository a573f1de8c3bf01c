//! The embedded default model against Hugging Face transformers: `golden_hf.json` was written by
//! `train/check_hf.py --golden` (transformers `GptOssForCausalLM`, float32, eager attention, MXFP4
//! experts dequantized) on the same checkpoint. Ultra's CPU executor must give the same last-position
//! logits and the same greedy continuation, and the embedded drafter must load and reproduce it.

use std::ops::ControlFlow;
use std::path::PathBuf;
use std::sync::Arc;

use model::cpu::CpuModel;
use model::sampling::SamplingParams;
use model::tokenizer::Tokenizer;
use serde_json::Value;

/// |Δ logit| allowed: the goldens are rounded to 5 decimals; f32 vs f32 agree to ~1e-5.
const LOGIT_TOL: f32 = 2e-3;

fn scratch() -> PathBuf {
    std::env::temp_dir().join(format!("ultra-default-model-golden-{}", std::process::id()))
}

#[test]
fn matches_transformers_and_drafter_is_lossless() {
    let golden: Value = serde_json::from_str(include_str!("golden_hf.json")).unwrap();
    let base = scratch();
    let paths = default_model::materialize_in(&base).unwrap();
    let (cfg, weights) = model::load::load(&paths.target).unwrap();
    let model = CpuModel::new(Arc::new(cfg), Arc::new(weights)).unwrap();
    let tok = Tokenizer::from_dir(&paths.target).unwrap();
    assert_eq!(tok.eos_token_ids(), &[0]);

    let prompts = golden["prompts"].as_array().unwrap();
    assert!(prompts.len() >= 3);
    for p in prompts {
        let text = p["prompt"].as_str().unwrap();
        let ids: Vec<u32> = p["input_ids"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap() as u32)
            .collect();
        assert_eq!(tok.encode(text, true).unwrap(), ids, "{text:?}");
        let mut s = model.session();
        let logits = s.prefill(&ids).unwrap().to_vec();
        let want: Vec<f32> = p["last_logits"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_f64().unwrap() as f32)
            .collect();
        assert_eq!(logits.len(), want.len());
        let d = logits
            .iter()
            .zip(&want)
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        assert!(d < LOGIT_TOL, "{text:?}: max |Δ logit| {d}");

        // Greedy continuation: every step's argmax is transformers' token (its top-1 / top-2
        // gaps are all far above the f32 noise, see greedy_top2_gaps).
        let cont: Vec<u32> = p["greedy_continuation"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap() as u32)
            .collect();
        let gaps: Vec<f64> = p["greedy_top2_gaps"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_f64().unwrap())
            .collect();
        let mut cur = logits;
        for (i, (&t, &gap)) in cont.iter().zip(&gaps).enumerate() {
            if gap < 1e-3 {
                break;
            }
            let arg = cur
                .iter()
                .enumerate()
                .max_by(|a, b| a.1.total_cmp(b.1))
                .unwrap()
                .0 as u32;
            assert_eq!(arg, t, "{text:?}: step {i}");
            cur = s.decode(t).unwrap().to_vec();
        }

        // The embedded drafter: greedy DFlash decoding emits exactly the same tokens.
        let drafter = dflash::Drafter::load(&paths.drafter, model.config()).unwrap();
        let spec = dflash::SpecDecoder::new(&model, drafter, None).unwrap();
        assert_eq!(spec.block_size(), 8);
        let params = SamplingParams {
            max_tokens: cont.len(),
            ignore_eos: true,
            ..SamplingParams::greedy()
        };
        let out = spec
            .generate(&ids, &params, |_| ControlFlow::Continue(()))
            .unwrap();
        assert_eq!(
            out.tokens, cont,
            "{text:?}: speculative != transformers greedy"
        );
        assert!(out.stats.tau().unwrap() >= 1.0);
    }
    let _ = std::fs::remove_dir_all(&base);
}
