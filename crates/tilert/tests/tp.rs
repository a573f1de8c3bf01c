//! Tensor parallelism on the GPU (`tilert::exec::tp`) with N = 2 and 4 virtual ranks on one GPU
//! (separate weights shards, buffers, streams and flag tables; `comm`'s one-shot all-reduce with
//! the residual add and the next RMSNorm fused) against the CPU's simulated ranks of the same
//! sharded plan (`CpuModel::tensor_parallel`, the reference) and against unsharded execution,
//! on every fixture checkpoint and the toy models of all three architectures.
//!
//! Tolerances: the same as the single-GPU executor against the CPU (tests/exec.rs): the GPU TP
//! run and the CPU TP run sum the same per-rank partials, so they differ by the kernels'
//! summation order inside each rank (dense: |Δ| ≤ 1e-3·(1 + max|logit|); MXFP4 experts, whose
//! activations the GPU rounds to fp16 per 32-block: 3e-2·(1 + max|logit|)). Greedy continuations
//! must be identical token for token to the unsharded GPU executor's and the CPU reference's;
//! graph replay equals op-by-op launches bit for bit. The flag protocol itself (thousands of
//! back-to-back calls, graph replay, odd sizes, NaN passthrough, timeouts) is tested in
//! `comm`'s tests/gpu_allreduce.rs; here a long decode (200 steps × 2 all-reduces per layer,
//! graphs) runs it through the executor.
//!
//! Expert parallelism (each rank holding whole experts, alone or with tensor-parallel attention)
//! runs the same checks against the CPU's expert-parallel ranks (`CpuModel::parallel`) with the
//! same tolerances: the GPU and CPU EP runs sum the same per-rank expert outputs in the same order.
//! The NCCL all-reduce is compared with the one-shot kernel on two GPUs (NCCL refuses two ranks on
//! one GPU; the test skips with a message on one): logits within the tolerance (NCCL's own
//! summation order), greedy tokens identical.

mod common;

use std::sync::Arc;

use common::{argmax, fixture, tolerance, FIXTURES};
use model::config::ModelConfig;
use model::cpu::toy::{self, ToyExperts};
use model::cpu::{CpuModel, LAST_LAYER_PRE_NORM};
use model::plan::tp::Parallelism;
use model::weights::Weights;
use tilert::exec::tp::{AllReduceKind, RankPlacement, TpModel, TpOptions};
use tilert::exec::GpuModel;

/// The GPU for a virtual-rank test (the streams' hardware queues are raised and eager kernel
/// loading set first), or a skip. A rank that waits more than 5 s for a peer fails the pass
/// with an error naming it and the call (`ULTRA_COMM_TIMEOUT_MS`, unless set): the toy passes
/// take milliseconds, so a stuck protocol shows as a failure, never as a hang.
fn gpu(test: &str) -> Option<Arc<cudarc::driver::CudaContext>> {
    comm::symmetric::prepare_virtual_ranks();
    if std::env::var_os("ULTRA_COMM_TIMEOUT_MS").is_none() {
        std::env::set_var("ULTRA_COMM_TIMEOUT_MS", "5000");
    }
    ultra_kernels::gpu_for_test(test)
}

fn tp_model(config: &Arc<ModelConfig>, weights: &Weights, ranks: usize) -> TpModel {
    TpModel::new(
        config.clone(),
        weights,
        ranks,
        &RankPlacement::Virtual { device: 0 },
        &mut |_| {},
    )
    .unwrap_or_else(|e| panic!("TP{ranks}: {e}"))
}

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

/// One model at `ranks` virtual ranks: prompt logits and every hidden state against the CPU TP
/// reference, greedy continuation equal to unsharded GPU and CPU decoding, verify blocks +
/// truncate, graphs vs op-by-op.
fn check_tp(name: &str, config: ModelConfig, weights: Weights, prompt: &[u32], ranks: usize) {
    check_split(
        &format!("{name} TP{ranks}"),
        config,
        weights,
        prompt,
        Parallelism::tensor(ranks),
    )
}

/// [`check_tp`] for any split (tensor and/or expert parallelism) on virtual ranks, against the
/// CPU's ranks of the same split (`CpuModel::parallel`).
fn check_split(
    name: &str,
    config: ModelConfig,
    weights: Weights,
    prompt: &[u32],
    par: Parallelism,
) {
    let name = name.to_string();
    let t0 = std::time::Instant::now();
    let ranks = par.ranks;
    let tol = tolerance(&weights);
    let config = Arc::new(config);
    let weights = Arc::new(weights);
    let cpu = CpuModel::new(config.clone(), weights.clone()).unwrap();
    let cpu_tp = cpu.parallel(par).unwrap();
    let gpu = GpuModel::new(0, config.clone(), &weights).unwrap();
    let tp = TpModel::build(
        config.clone(),
        &weights,
        TpOptions {
            parallelism: par,
            all_reduce: AllReduceKind::Auto,
        },
        &RankPlacement::Virtual { device: 0 },
        &mut |_| {},
    )
    .unwrap_or_else(|e| panic!("{name}: {e}"));
    assert_eq!(tp.ranks(), ranks);
    assert_eq!(tp.all_reduce(), AllReduceKind::OneShot);
    let nl = config.layers.len();

    // 1. The prompt through verify (chunks of 16), every hidden index, against the CPU's ranks.
    let all: Vec<usize> = (0..=nl).chain([LAST_LAYER_PRE_NORM]).collect();
    let mut cs = cpu_tp.session();
    let want = cs.verify(prompt, &all).unwrap();
    let mut ts = tp.session(256).unwrap();
    let got = ts.verify(prompt, &all).unwrap();
    let (err, mag) = max_err(&got.logits, &want.logits);
    eprintln!("{name}: prompt logits max |Δ| vs CPU TP {err:.3e} (max |logit| {mag:.3})");
    assert!(err <= tol * (1.0 + mag), "{name}: logits differ by {err}");
    for (i, (g, c)) in got.hidden.iter().zip(&want.hidden).enumerate() {
        let (err, mag) = max_err(g, c);
        assert!(
            err <= tol * (1.0 + mag),
            "{name}: hidden index {} differs by {err} (max {mag})",
            all[i]
        );
    }

    // 2. Greedy continuation, 12 tokens: TP (graphs) = unsharded GPU = the CPU reference.
    let mut gs = gpu.session(256).unwrap();
    let mut ts = tp.session(256).unwrap();
    let mut cs = cpu_tp.session();
    let mut a = ts.prefill_greedy(prompt).unwrap();
    let mut b = gs.prefill_greedy(prompt).unwrap();
    let mut c = argmax(cs.prefill(prompt).unwrap());
    let (mut tp_out, mut one_out, mut cpu_out) = (vec![a], vec![b], vec![c]);
    for _ in 0..12 {
        a = ts.decode_greedy(a).unwrap();
        b = gs.decode_greedy(b).unwrap();
        c = argmax(cs.decode(c).unwrap());
        tp_out.push(a);
        one_out.push(b);
        cpu_out.push(c);
    }
    assert_eq!(tp_out, one_out, "{name}: greedy TP vs unsharded GPU");
    assert_eq!(tp_out, cpu_out, "{name}: greedy TP vs CPU TP");

    // 3. Verify blocks after the prompt, truncate back, decode: equals a fresh prefill.
    let v = config.vocab_size as u32;
    for &bsize in &[2usize, 5, 16] {
        let block: Vec<u32> = (0..bsize as u32).map(|i| (i * 37 + 11) % v).collect();
        let mut cs = cpu_tp.session();
        cs.prefill(prompt).unwrap();
        let c = cs.verify(&block, &[]).unwrap();
        let mut ts = tp.session(256).unwrap();
        ts.prefill(prompt).unwrap();
        let g = ts.verify(&block, &[]).unwrap();
        let (err, mag) = max_err(&g.logits, &c.logits);
        assert!(
            err <= tol * (1.0 + mag),
            "{name}: verify({bsize}) differs by {err}"
        );
        assert_eq!(
            ts.verify_greedy(&block[..1]).unwrap().len(),
            1,
            "{name}: verify_greedy"
        );
        ts.truncate(prompt.len() + 1).unwrap();
        let after = ts.decode(block[1 % bsize]).unwrap();
        let mut fresh = tp.session(256).unwrap();
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
    let mut a = tp.session(256).unwrap();
    let mut b = tp.session(256).unwrap();
    b.set_use_graphs(false);
    assert_eq!(
        a.prefill(prompt).unwrap(),
        b.prefill(prompt).unwrap(),
        "{name}: graph vs op-by-op (prefill)"
    );
    assert_eq!(
        a.decode(3).unwrap(),
        b.decode(3).unwrap(),
        "{name}: graph vs op-by-op (decode)"
    );
    eprintln!("{name}: checked in {:.2?}", t0.elapsed());
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
fn fixtures_match_cpu_tensor_parallel() {
    let Some(_ctx) = gpu("fixtures_match_cpu_tensor_parallel") else {
        return;
    };
    for rel in FIXTURES {
        let dir = fixture(rel);
        for ranks in [2, 4] {
            let (config, weights) = model::load::load(&dir).unwrap();
            check_tp(rel, config, weights, &golden_prompt(&dir), ranks);
        }
    }
}

#[test]
fn toy_models_match_cpu_tensor_parallel() {
    let Some(_ctx) = gpu("toy_models_match_cpu_tensor_parallel") else {
        return;
    };
    for experts in [ToyExperts::Dense, ToyExperts::Mxfp4] {
        for ranks in [2, 4] {
            for (name, (c, w)) in [
                ("toy gpt-oss", toy::gpt_oss(7, experts)),
                ("toy qwen3-moe", toy::qwen3_moe(8, experts)),
                ("toy mimo", toy::mimo_v2_flash(9, experts)),
            ] {
                let v = c.vocab_size as u32;
                let prompt: Vec<u32> = (0..21).map(|i| (i * 13 + 5) % v).collect();
                check_tp(&format!("{name} {experts:?}"), c, w, &prompt, ranks);
            }
        }
    }
}

/// 200 greedy decode steps at TP4 (graphs): 2 all-reduces per layer per step back to back on
/// four virtual ranks, identical to the unsharded executor's tokens, no timeout.
#[test]
fn long_decode_stresses_the_flags() {
    let Some(_ctx) = gpu("long_decode_stresses_the_flags") else {
        return;
    };
    let (c, w) = toy::mimo_v2_flash(11, ToyExperts::Mxfp4);
    let c = Arc::new(c);
    let gpu = GpuModel::new(0, c.clone(), &w).unwrap();
    let tp = tp_model(&c, &w, 4);
    let mut gs = gpu.session(512).unwrap();
    let mut ts = tp.session(512).unwrap();
    let (mut a, mut b) = (
        ts.prefill_greedy(&[1, 2, 3]).unwrap(),
        gs.prefill_greedy(&[1, 2, 3]).unwrap(),
    );
    for step in 0..200 {
        assert_eq!(a, b, "step {step}");
        a = ts.decode_greedy(a).unwrap();
        b = gs.decode_greedy(b).unwrap();
    }
    assert_eq!(ts.len(), 203);
}

/// Setups that cannot run fail with the cause named and leave nothing behind: more GPUs than the
/// machine has, a GPU listed twice, heads that do not split; the session refuses bad tokens
/// without advancing any rank.
#[test]
fn errors_name_the_cause() {
    let Some(_ctx) = gpu("errors_name_the_cause") else {
        return;
    };
    let (c, w) = toy::gpt_oss(1, ToyExperts::Mxfp4);
    let c = Arc::new(c);
    let n = tilert::Device::count();
    let e = TpModel::new(
        c.clone(),
        &w,
        2,
        &RankPlacement::Devices(vec![0, n]),
        &mut |_| {},
    )
    .err()
    .expect("a GPU beyond the machine")
    .to_string();
    assert!(
        e.contains(&format!(
            "asked for GPU {n} but this machine has {n} GPU(s)"
        )),
        "{e}"
    );
    let e = TpModel::new(
        c.clone(),
        &w,
        2,
        &RankPlacement::Devices(vec![0, 0]),
        &mut |_| {},
    )
    .err()
    .unwrap()
    .to_string();
    assert!(e.contains("GPU 0 is listed twice"), "{e}");
    let e = TpModel::new(
        c.clone(),
        &w,
        3,
        &RankPlacement::Virtual { device: 0 },
        &mut |_| {},
    )
    .err()
    .unwrap()
    .to_string();
    assert!(e.contains("query heads"), "{e}");
    let tp = tp_model(&c, &w, 2);
    let mut s = tp.session(32).unwrap();
    let vocab = c.vocab_size as u32;
    let e = s.prefill(&[1, vocab]).unwrap_err().to_string();
    assert!(e.contains("outside the vocabulary"), "{e}");
    assert_eq!(s.len(), 0);
    s.prefill(&[1, 2, 3]).unwrap();
    assert!(s.truncate(4).is_err());
    s.truncate(1).unwrap();
    assert_eq!(s.len(), 1);
    // The session still works after the refusals.
    s.decode(2).unwrap();
}

// ---- expert parallelism and the NCCL all-reduce ---------------------------------------------------

/// Expert parallelism on virtual ranks: each rank's whole experts (localized routing, local
/// combine) and the one-shot all-reduce as the combine, against the CPU's expert-parallel ranks
/// (same tolerances as tensor parallelism), alone (attention replicated) and with
/// tensor-parallel attention, on every fixture (8 experts: 2 and 4 ranks).
#[test]
fn fixtures_match_cpu_expert_parallel() {
    let Some(_ctx) = gpu("fixtures_match_cpu_expert_parallel") else {
        return;
    };
    for rel in FIXTURES {
        let dir = fixture(rel);
        for par in [
            Parallelism::expert(2),
            Parallelism::tensor_expert(2),
            Parallelism::expert(4),
            Parallelism::tensor_expert(4),
        ] {
            let (config, weights) = model::load::load(&dir).unwrap();
            check_split(
                &format!("{rel} {par}"),
                config,
                weights,
                &golden_prompt(&dir),
                par,
            );
        }
    }
}

#[test]
fn toy_models_match_cpu_expert_parallel() {
    let Some(_ctx) = gpu("toy_models_match_cpu_expert_parallel") else {
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
            for par in [Parallelism::expert(2), Parallelism::tensor_expert(4)] {
                check_split(
                    &format!("{name} {experts:?} {par}"),
                    c.clone(),
                    w.clone(),
                    &prompt,
                    par,
                );
            }
        }
    }
}

/// The NCCL all-reduce (each all-reduce node: `ncclAllReduce` in place, then the residual add and
/// next norm) against the one-shot kernel on two GPUs: logits within the tolerance of two
/// summation orders, greedy continuations identical; tensor and expert parallelism. NCCL needs
/// one GPU per rank, so this test needs two GPUs (skipped with a message otherwise) and libnccl.
#[test]
fn nccl_all_reduce_matches_one_shot() {
    let Some(_ctx) = gpu("nccl_all_reduce_matches_one_shot") else {
        return;
    };
    let n = tilert::Device::count();
    if n < 2 {
        eprintln!("SKIPPED nccl_all_reduce_matches_one_shot: NCCL needs one GPU per rank, this machine has {n}");
        return;
    }
    if let Err(e) = comm::nccl_version() {
        eprintln!("SKIPPED nccl_all_reduce_matches_one_shot: {e}");
        return;
    }
    for (name, (c, w)) in [
        ("toy gpt-oss", toy::gpt_oss(3, ToyExperts::Mxfp4)),
        ("toy mimo", toy::mimo_v2_flash(4, ToyExperts::Dense)),
    ] {
        let c = Arc::new(c);
        let tol = tolerance(&w);
        let v = c.vocab_size as u32;
        let prompt: Vec<u32> = (0..19).map(|i| (i * 17 + 2) % v).collect();
        for par in [
            Parallelism::tensor(2),
            Parallelism::tensor_expert(2),
            Parallelism::expert(2),
        ] {
            let build = |kind| {
                TpModel::build(
                    c.clone(),
                    &w,
                    TpOptions {
                        parallelism: par,
                        all_reduce: kind,
                    },
                    &RankPlacement::Devices(vec![0, 1]),
                    &mut |_| {},
                )
                .unwrap_or_else(|e| panic!("{name} {par} {kind}: {e}"))
            };
            let one = build(AllReduceKind::OneShot);
            let nccl = build(AllReduceKind::Nccl);
            assert_eq!(nccl.all_reduce(), AllReduceKind::Nccl);
            let mut a = one.session(128).unwrap();
            let mut b = nccl.session(128).unwrap();
            let la = a.verify(&prompt, &[]).unwrap().logits;
            let lb = b.verify(&prompt, &[]).unwrap().logits;
            let (err, mag) = max_err(&lb, &la);
            eprintln!("{name} {par}: NCCL vs one-shot logits max |Δ| {err:.3e} (max {mag:.3})");
            assert!(
                err <= tol * (1.0 + mag),
                "{name} {par}: NCCL logits differ by {err}"
            );
            let mut a = one.session(128).unwrap();
            let mut b = nccl.session(128).unwrap();
            let (mut x, mut y) = (
                a.prefill_greedy(&prompt).unwrap(),
                b.prefill_greedy(&prompt).unwrap(),
            );
            for step in 0..16 {
                assert_eq!(x, y, "{name} {par}: greedy step {step}");
                x = a.decode_greedy(x).unwrap();
                y = b.decode_greedy(y).unwrap();
            }
        }
    }
}

/// Setups of expert parallelism and the all-reduce that cannot run fail naming the cause.
#[test]
fn expert_parallel_and_all_reduce_errors_name_the_cause() {
    let Some(_ctx) = gpu("expert_parallel_and_all_reduce_errors_name_the_cause") else {
        return;
    };
    let (c, w) = toy::gpt_oss(1, ToyExperts::Mxfp4);
    let c = Arc::new(c);
    let build = |par: Parallelism, kind: AllReduceKind| {
        TpModel::build(
            c.clone(),
            &w,
            TpOptions {
                parallelism: par,
                all_reduce: kind,
            },
            &RankPlacement::Virtual { device: 0 },
            &mut |_| {},
        )
        .err()
        .map(|e| e.to_string())
    };
    // 8 experts over 3 ranks.
    let e = build(Parallelism::expert(3), AllReduceKind::Auto).expect("3 ranks");
    assert!(
        e.contains("routed experts on 3 ranks") && e.contains("possible here"),
        "{e}"
    );
    // NCCL cannot run two ranks on one GPU.
    let e = build(Parallelism::tensor(2), AllReduceKind::Nccl).expect("NCCL on virtual ranks");
    assert!(e.contains("NCCL all-reduce needs one GPU per rank"), "{e}");
    // The one-shot kernel runs virtual ranks whatever was asked.
    assert!(build(Parallelism::expert(2), AllReduceKind::OneShot).is_none());
}
