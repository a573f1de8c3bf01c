//! The GPU executor against the CPU executor (the reference): every fixture checkpoint and the
//! random toy models of all three architectures; prefill / decode / verify(2..=16) / truncate /
//! hidden states; graphs against op-by-op launches.
//!
//! Tolerances: the GPU computes the same f32 math with a different summation order (dense paths:
//! |Δ| ≤ 1e-3·(1 + max|logit|), observed ~1e-5); MXFP4 experts round each 32-value activation
//! block to fp16 (11 significant bits, `fp4::cuda` docs), a relative 2^-12 per product before the
//! f32 sum, so MXFP4 models get |Δ| ≤ 3e-2·(1 + max|logit|). Greedy outputs must match token for
//! token in both cases (the fixtures' logit gaps are far larger than these errors).

mod common;

use std::sync::Arc;

use common::{argmax, fixture, tolerance, FIXTURES};
use model::config::ModelConfig;
use model::cpu::toy::{self, ToyExperts};
use model::cpu::{CpuModel, LAST_LAYER_PRE_NORM};
use model::weights::Weights;
use tilert::exec::GpuModel;

/// max |a − b| and max |b| over rows.
fn max_err(a: &[Vec<f32>], b: &[Vec<f32>]) -> (f32, f32) {
    assert_eq!(a.len(), b.len(), "row counts differ");
    let mut err = 0f32;
    let mut mag = 0f32;
    for (ra, rb) in a.iter().zip(b) {
        assert_eq!(ra.len(), rb.len());
        for (x, y) in ra.iter().zip(rb) {
            assert!(x.is_finite(), "non-finite GPU value {x}");
            err = err.max((x - y).abs());
            mag = mag.max(y.abs());
        }
    }
    (err, mag)
}

/// Checks one model: full-prompt logits + every hidden state, greedy continuation, verify
/// blocks of several sizes after a prefix, truncate + re-run, graphs vs op-by-op.
fn check_model(name: &str, config: ModelConfig, weights: Weights, prompt: &[u32]) {
    let tol = tolerance(&weights);
    let config = Arc::new(config);
    let weights = Arc::new(weights);
    let cpu = CpuModel::new(config.clone(), weights.clone()).unwrap();
    let gpu = GpuModel::new(0, config.clone(), &weights).unwrap();
    let nl = config.layers.len();
    // FP8 projections stay FP8 on the device (MiMo-V2.5: every layer's qkv_proj and the dense
    // MLP of layer 0).
    let fp8_mats = weights
        .layers
        .iter()
        .filter(|l| l.attn.q.w.dtype() == model::weights::DenseDtype::F8E4M3)
        .count();
    eprintln!(
        "{name}: {} FP8 projections on the device",
        gpu.fp8_projections()
    );
    assert!(
        gpu.fp8_projections() >= fp8_mats,
        "{name}: {fp8_mats} FP8 qkv projections in the checkpoint, {} FP8 on the device",
        gpu.fp8_projections()
    );

    // 1. Full prompt through verify (chunks of 16), all hidden indices.
    let all: Vec<usize> = (0..=nl).chain([LAST_LAYER_PRE_NORM]).collect();
    let mut cs = cpu.session();
    let cpu_out = cs.verify(prompt, &all).unwrap();
    let mut gs = gpu.session(256).unwrap();
    // What a server budgets per sequence: the session's reserved device memory, in 16 MiB arena
    // chunks (a fixture's session needs a few MiB, not a 256 MiB weights-sized chunk).
    let reserved = gs.device_bytes();
    assert!(
        reserved > 0 && reserved <= 48 << 20,
        "{name}: session reserves {reserved} bytes"
    );
    let gpu_out = gs.verify(prompt, &all).unwrap();
    let (err, mag) = max_err(&gpu_out.logits, &cpu_out.logits);
    eprintln!("{name}: prompt logits max |Δ| {err:.3e} (max |logit| {mag:.3})");
    assert!(err <= tol * (1.0 + mag), "{name}: logits differ by {err}");
    for (i, (g, c)) in gpu_out.hidden.iter().zip(&cpu_out.hidden).enumerate() {
        let (err, mag) = max_err(g, c);
        assert!(
            err <= tol * (1.0 + mag),
            "{name}: hidden index {} differs by {err} (max {mag})",
            all[i]
        );
    }

    // 2. Greedy continuation, 8 tokens: CPU decode vs GPU decode_greedy (graphs).
    let mut next_cpu = argmax(cpu_out.logits.last().unwrap());
    let mut gs = gpu.session(256).unwrap();
    let mut next_gpu = gs.prefill_greedy(prompt).unwrap();
    assert_eq!(next_gpu, next_cpu, "{name}: first greedy token");
    let mut cpu_cont = vec![next_cpu];
    let mut gpu_cont = vec![next_gpu];
    for _ in 0..8 {
        next_cpu = argmax(cs.decode(next_cpu).unwrap());
        next_gpu = gs.decode_greedy(next_gpu).unwrap();
        cpu_cont.push(next_cpu);
        gpu_cont.push(next_gpu);
    }
    assert_eq!(gpu_cont, cpu_cont, "{name}: greedy continuation");

    // 3. Verify blocks of each size after the prompt, then truncate back and decode one token:
    //    must equal a fresh session's prefill of the kept prefix.
    let v = config.vocab_size as u32;
    for &bsize in &[2usize, 3, 8, 16] {
        let block: Vec<u32> = (0..bsize as u32).map(|i| (i * 37 + 11) % v).collect();
        let mut cs = cpu.session();
        cs.prefill(prompt).unwrap();
        let c = cs.verify(&block, &[]).unwrap();
        let mut gs = gpu.session(256).unwrap();
        gs.prefill(prompt).unwrap();
        let g = gs.verify(&block, &[]).unwrap();
        let (err, mag) = max_err(&g.logits, &c.logits);
        assert!(
            err <= tol * (1.0 + mag),
            "{name}: verify({bsize}) differs by {err}"
        );
        // Reject all but one token, then continue.
        gs.truncate(prompt.len() + 1).unwrap();
        let after = gs.decode(block[1 % bsize]).unwrap();
        let mut fresh = gpu.session(256).unwrap();
        let mut prefix = prompt.to_vec();
        prefix.push(block[0]);
        prefix.push(block[1 % bsize]);
        let want = fresh.prefill(&prefix).unwrap();
        let (err, mag) = max_err(&[after], &[want]);
        assert!(
            err <= tol * (1.0 + mag),
            "{name}: truncate({bsize}) then decode differs by {err}"
        );
    }

    // 4. Graph replay equals op-by-op launches exactly.
    let mut a = gpu.session(256).unwrap();
    let mut b = gpu.session(256).unwrap();
    b.set_use_graphs(false);
    let la = a.prefill(prompt).unwrap();
    let lb = b.prefill(prompt).unwrap();
    assert_eq!(la, lb, "{name}: graph vs op-by-op (prefill)");
    let la = a.decode(3).unwrap();
    let lb = b.decode(3).unwrap();
    assert_eq!(la, lb, "{name}: graph vs op-by-op (decode)");
}

fn golden_prompt(dir: &std::path::Path) -> Vec<u32> {
    let g: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("golden_f32.json")).unwrap())
            .unwrap();
    g["input_ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_u64().unwrap() as u32)
        .collect()
}

#[test]
fn fixtures_match_cpu() {
    let Some(_ctx) = ultra_kernels::gpu_for_test("fixtures_match_cpu") else {
        return;
    };
    for rel in FIXTURES {
        let dir = fixture(rel);
        let (config, weights) = model::load::load(&dir).unwrap();
        let prompt = golden_prompt(&dir);
        check_model(rel, config, weights, &prompt);
    }
}

#[test]
fn toy_models_match_cpu() {
    let Some(_ctx) = ultra_kernels::gpu_for_test("toy_models_match_cpu") else {
        return;
    };
    for experts in [ToyExperts::Dense, ToyExperts::Mxfp4] {
        for (name, (c, w)) in [
            ("toy gpt-oss", toy::gpt_oss(7, experts)),
            ("toy qwen3-moe", toy::qwen3_moe(8, experts)),
            ("toy mimo", toy::mimo_v2_flash(9, experts)),
        ] {
            let v = c.vocab_size as u32;
            let prompt: Vec<u32> = (0..21).map(|i| (i * 13 + 5) % v).collect();
            check_model(&format!("{name} {experts:?}"), c, w, &prompt);
        }
    }
}

#[test]
fn errors_are_typed() {
    let Some(_ctx) = ultra_kernels::gpu_for_test("errors_are_typed") else {
        return;
    };
    let (c, w) = toy::gpt_oss(1, ToyExperts::Mxfp4);
    let vocab = c.vocab_size as u32;
    let gpu = GpuModel::new(0, Arc::new(c), &w).unwrap();
    let mut s = gpu.session(32).unwrap();
    assert!(s.prefill(&[]).is_err());
    let e = s.prefill(&[1, vocab]).unwrap_err().to_string();
    assert!(e.contains("outside the vocabulary"), "{e}");
    assert_eq!(s.len(), 0, "failed call left the session unchanged");
    let long: Vec<u32> = vec![1; 33];
    let e = s.prefill(&long).unwrap_err().to_string();
    assert!(e.contains("at most 32"), "{e}");
    s.prefill(&[1, 2, 3]).unwrap();
    assert!(s.truncate(4).is_err());
    s.truncate(1).unwrap();
    assert_eq!(s.len(), 1);
    assert!(s.set_capture(&[99]).is_err());
}

/// A profiled decode step is the decode plan's ops, lowered: every launch is labelled with its
/// op's name (`name` for the op's first launch, `name:part` for its further launches), and each
/// op of the plan has exactly one launch labelled `name` — on the toy models of all three architectures (a
/// dense first layer, q/k norms, sliding layers, fused and unfused QKV projections).
#[test]
fn profiled_launches_are_the_plans_ops() {
    let Some(_ctx) = ultra_kernels::gpu_for_test("profiled_launches_are_the_plans_ops") else {
        return;
    };
    use model::plan::{PassShape, Plan, WeightStorage};
    for (name, (c, w)) in [
        ("toy gpt-oss", toy::gpt_oss(3, ToyExperts::Mxfp4)),
        ("toy qwen3-moe", toy::qwen3_moe(4, ToyExperts::Dense)),
        ("toy mimo", toy::mimo_v2_flash(5, ToyExperts::Dense)),
    ] {
        let plan = Plan::new(
            &c,
            WeightStorage::cpu(false),
            PassShape::decode(0).with_sample(),
        )
        .unwrap();
        let gpu = GpuModel::new(0, Arc::new(c), &w).unwrap();
        let mut s = gpu.session(64).unwrap();
        let tok = s.prefill_greedy(&[1, 2, 3]).unwrap();
        for graphs in [true, false] {
            s.set_use_graphs(graphs);
            let times = s.profile_pass(&[tok]).unwrap();
            for (label, ms) in &times {
                let op = label.split(':').next().unwrap();
                assert!(
                    plan.ops.iter().any(|o| o.kind.name() == op),
                    "{name}: launch `{label}` is no op of the plan"
                );
                assert!(
                    ms.is_finite() && *ms >= 0.0,
                    "{name}: `{label}` took {ms} ms"
                );
            }
            for op in &plan.ops {
                let n = op.kind.name();
                let main = times.iter().filter(|(l, _)| *l == n).count();
                let ops = plan.ops.iter().filter(|o| o.kind.name() == n).count();
                assert_eq!(main, ops, "{name}: `{n}` main launches (graphs {graphs})");
            }
        }
        assert_eq!(s.len(), 5, "{name}: profiled passes advance the session");
    }
}
