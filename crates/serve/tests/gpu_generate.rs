//! `ultra generate` / `ultra score` with `--device cuda` against the CPU executor on a fixture:
//! the same greedy tokens and text, log-probabilities within the GPU executor's tolerance
//! (|Δ| ≤ 1e-3·(1 + |logprob|): same f32 math, different summation order); `ultra generate
//! --draft --device cuda` (the drafter on the GPU) against plain GPU decoding. Skips without a
//! GPU. Fixtures: `$ULTRA_FIXTURES` if set (a GPU bundle run elsewhere), else the repository's.

use std::path::PathBuf;

use model::sampling::SamplingParams;
use serve::commands::generate::{generate, generate_speculative, load, load_gpu, score};

fn fixture(rel: &str) -> PathBuf {
    std::env::var_os("ULTRA_FIXTURES")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../fixtures"))
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

/// `ultra generate --draft DIR --device cuda`: every fixture drafter on its target, greedy, at
/// B = 2, 4 and the drafter's own block size — the same tokens and text as plain GPU decoding,
/// with acceptance statistics over the rounds; a seeded sampled run gives the same tokens twice.
#[test]
fn gpu_generate_speculative_matches_plain() {
    let Some(_ctx) = ultra_kernels::gpu_for_test("gpu_generate_speculative_matches_plain") else {
        return;
    };
    for (drafter, target) in [
        ("drafters/qwen3-moe-dflash", "qwen3-moe/native"),
        ("drafters/gpt-oss-dflash", "gpt-oss/bf16"),
        ("drafters/mimo-dflash", "mimo-v2-flash/native"),
    ] {
        let mut gpu = load(&fixture(target)).unwrap();
        gpu.to_gpu(0).unwrap();
        let ids: Vec<u32> = (0..21).map(|i| (i * 11 + 5) % 200).collect();
        let params = SamplingParams {
            max_tokens: 32,
            ignore_eos: true,
            ..SamplingParams::default()
        };
        let plain = generate(&gpu, &ids, &params, &mut std::io::sink()).unwrap();
        for b in [Some(2), Some(4), None] {
            let mut text = Vec::new();
            let r =
                generate_speculative(&gpu, &fixture(drafter), b, &ids, &params, &mut text).unwrap();
            assert_eq!(r.generation.tokens, plain.tokens, "{drafter} B={b:?}");
            assert_eq!(r.generation.text, plain.text, "{drafter} B={b:?}");
            assert_eq!(String::from_utf8(text).unwrap(), plain.text);
            assert!(r.stats.rounds() > 0, "{drafter}");
            eprintln!(
                "{drafter} B={}: tau {:.2}",
                r.block_size,
                r.stats.tau().unwrap_or(0.0)
            );
        }
        let sampled = SamplingParams {
            temperature: 0.8,
            top_k: Some(8),
            seed: Some(42),
            ..params.clone()
        };
        let run = || {
            generate_speculative(
                &gpu,
                &fixture(drafter),
                Some(4),
                &ids,
                &sampled,
                &mut std::io::sink(),
            )
            .unwrap()
            .generation
            .tokens
        };
        let first = run();
        assert_eq!(first.len(), 32);
        assert_eq!(first, run(), "{drafter}: seeded sampling repeats");
    }
    // A bad block size is an error, not a panic.
    let mut gpu = load(&fixture("qwen3-moe/native")).unwrap();
    gpu.to_gpu(0).unwrap();
    let Err(e) = generate_speculative(
        &gpu,
        &fixture("drafters/qwen3-moe-dflash"),
        Some(17),
        &[1, 2, 3],
        &SamplingParams::default(),
        &mut std::io::sink(),
    ) else {
        panic!("block size 17 was accepted");
    };
    assert!(e.to_string().contains("block size 17"), "{e}");
}

/// `ultra generate --device cuda` loads straight onto the GPU (`load_gpu`: the checkpoint's
/// tensors uploaded from the mapped files, no CPU model kept): the same tokens and scores as the
/// model uploaded from a loaded CPU model, on every fixture.
#[test]
fn gpu_load_without_cpu_model_matches_upload_from_cpu() {
    let Some(_ctx) =
        ultra_kernels::gpu_for_test("gpu_load_without_cpu_model_matches_upload_from_cpu")
    else {
        return;
    };
    for rel in [
        "gpt-oss/bf16",
        "gpt-oss/mxfp4",
        "qwen3-moe/native",
        "mimo-v2-flash/native",
    ] {
        let direct = load_gpu(&fixture(rel), 0).unwrap();
        assert!(direct.cpu().is_err(), "{rel}: no CPU model on the GPU path");
        let mut via_cpu = load(&fixture(rel)).unwrap();
        via_cpu.to_gpu(0).unwrap();
        assert_eq!(
            direct.gpu.as_ref().unwrap().weight_bytes(),
            via_cpu.gpu.as_ref().unwrap().weight_bytes(),
            "{rel}: device bytes"
        );
        let ids: Vec<u32> = vec![5, 6, 7, 8, 9, 10];
        let params = SamplingParams {
            max_tokens: 16,
            ignore_eos: true,
            ..SamplingParams::default()
        };
        let a = generate(&direct, &ids, &params, &mut std::io::sink()).unwrap();
        let b = generate(&via_cpu, &ids, &params, &mut std::io::sink()).unwrap();
        assert_eq!(a.tokens, b.tokens, "{rel}: greedy tokens");
        let long: Vec<u32> = (0..24).map(|i| (i * 7 + 3) % 200).collect();
        assert_eq!(
            score(&direct, &long).unwrap(),
            score(&via_cpu, &long).unwrap(),
            "{rel}: scores"
        );
    }
}
