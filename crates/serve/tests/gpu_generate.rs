//! `ultra generate` / `ultra score` with `--device cuda` against the CPU executor on a fixture:
//! the same greedy tokens and text, log-probabilities within the GPU executor's tolerance
//! (|Δ| ≤ 1e-3·(1 + |logprob|): same f32 math, different summation order). Skips without a GPU.

use std::path::PathBuf;

use model::sampling::SamplingParams;
use serve::commands::generate::{generate, load, score};

fn fixture(rel: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../fixtures")
        .join(rel)
}

#[test]
fn gpu_generate_and_score_match_cpu() {
    let Some(_ctx) = ultra_kernels::gpu_for_test("gpu_generate_and_score_match_cpu") else {
        return;
    };
    for rel in ["gpt-oss/bf16", "qwen3-moe/native", "mimo-v2-flash/native"] {
        let cpu = load(&fixture(rel)).unwrap();
        let mut gpu = load(&fixture(rel)).unwrap();
        gpu.to_gpu(0).unwrap();
        let ids: Vec<u32> = vec![5, 6, 7, 8, 9, 10];
        let params = SamplingParams {
            max_tokens: 24,
            ignore_eos: true,
            ..SamplingParams::default()
        };
        let a = generate(&cpu, &ids, &params, &mut std::io::sink()).unwrap();
        let b = generate(&gpu, &ids, &params, &mut std::io::sink()).unwrap();
        assert_eq!(a.tokens, b.tokens, "{rel}: greedy tokens");
        assert_eq!(a.text, b.text, "{rel}: text");
        let long: Vec<u32> = (0..40).map(|i| (i * 7 + 3) % 200).collect();
        let sa = score(&cpu, &long).unwrap();
        let sb = score(&gpu, &long).unwrap();
        assert_eq!(sa.len(), sb.len());
        for (x, y) in sa.iter().zip(&sb) {
            match (x, y) {
                (None, None) => {}
                (Some(x), Some(y)) => {
                    assert!((x - y).abs() <= 1e-3 * (1.0 + x.abs()), "{rel}: {x} vs {y}")
                }
                _ => panic!("{rel}: null mismatch"),
            }
        }
    }
}
