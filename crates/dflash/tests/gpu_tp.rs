//! DFlash under tensor parallelism on the GPU: the target as a `tilert::exec::tp::TpSession`
//! over 2 and 4 virtual ranks on one GPU (the drafter on the host, reading the target's hidden
//! states from rank 0 and the checkpoint's embedding and LM head: `dflash::WithTables`).
//! Speculative greedy must equal plain greedy under the same TP session token for token, and
//! plain greedy under TP must equal unsharded GPU greedy decoding (every fixture drafter with its
//! target, blocks 4 and 16). The drafter also runs on the device: on rank 0's GPU, reading rank
//! 0's captured hidden states, under tensor and expert parallelism.

use std::ops::ControlFlow;
use std::path::PathBuf;
use std::sync::Arc;

use dflash::{CpuBackend, Drafter, SpecOptions, WithTables};
use model::sampling::SamplingParams;
use tilert::exec::tp::{RankPlacement, TpModel};
use tilert::exec::GpuModel;

fn fixtures() -> PathBuf {
    std::env::var_os("ULTRA_FIXTURES")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../fixtures"))
}

/// Virtual ranks (hardware queues, eager kernel loading) and a 5 s all-reduce timeout (unless
/// `ULTRA_COMM_TIMEOUT_MS` is set): a stuck rank fails the pass with an error naming it and the
/// call instead of hanging the test.
fn prepare() {
    comm::symmetric::prepare_virtual_ranks();
    if std::env::var_os("ULTRA_COMM_TIMEOUT_MS").is_none() {
        std::env::set_var("ULTRA_COMM_TIMEOUT_MS", "5000");
    }
}

/// The fixture drafters and their targets (`golden_draft.json`'s `target`).
fn pairs() -> Vec<(String, String)> {
    ["qwen3-moe-dflash", "gpt-oss-dflash", "mimo-dflash"]
        .iter()
        .map(|name| {
            let golden = fixtures()
                .join("drafters")
                .join(name)
                .join("golden_draft.json");
            let g: serde_json::Value =
                serde_json::from_str(&std::fs::read_to_string(&golden).unwrap()).unwrap();
            (name.to_string(), g["target"].as_str().unwrap().to_string())
        })
        .collect()
}

#[test]
fn speculative_greedy_equals_plain_greedy_under_tp() {
    prepare();
    let Some(_ctx) = ultra_kernels::gpu_for_test("speculative_greedy_equals_plain_greedy_under_tp")
    else {
        return;
    };
    let t0 = std::time::Instant::now();
    let params = SamplingParams {
        max_tokens: 32,
        ignore_eos: true,
        ..SamplingParams::greedy()
    };
    for (name, rel) in pairs() {
        let (c, w) = model::load::load(&fixtures().join(&rel)).unwrap();
        let c = Arc::new(c);
        let v = c.vocab_size as u32;
        let prompt: Vec<u32> = (0..21).map(|i| (i * 29 + 3) % v).collect();
        let one = GpuModel::new(0, c.clone(), &w).unwrap();
        let mut s = one.session(256).unwrap();
        let mut unsharded = vec![s.prefill_greedy(&prompt).unwrap()];
        while unsharded.len() < 32 {
            unsharded.push(s.decode_greedy(*unsharded.last().unwrap()).unwrap());
        }
        let d = Drafter::load(&fixtures().join("drafters").join(&name), &c).unwrap();
        for ranks in [2, 4] {
            let tp = TpModel::new(
                c.clone(),
                &w,
                ranks,
                &RankPlacement::Virtual { device: 0 },
                &mut |_| {},
            )
            .unwrap();
            let mut s = tp.session(256).unwrap();
            let mut plain = vec![s.prefill_greedy(&prompt).unwrap()];
            while plain.len() < 32 {
                plain.push(s.decode_greedy(*plain.last().unwrap()).unwrap());
            }
            assert_eq!(
                plain, unsharded,
                "{rel} TP{ranks}: plain greedy vs unsharded"
            );
            for b in [4, 16] {
                let mut s = tp.session(256).unwrap();
                let mut target = WithTables::new(&mut s, &w.embed, &w.lm_head);
                let mut backend = CpuBackend::new(&mut target, &d).unwrap();
                let opts = SpecOptions {
                    block_size: b,
                    eos_token_ids: Vec::new(),
                    prefill_chunk: None,
                };
                let out = dflash::run_speculative(
                    &mut backend,
                    &opts,
                    &prompt,
                    &params,
                    &mut |_| ControlFlow::Continue(()),
                    &mut |_| {},
                )
                .unwrap();
                assert_eq!(out.tokens, plain, "{rel} TP{ranks} {name} B={b}");
                eprintln!(
                    "{rel} TP{ranks} {name} B={b}: tau {:.2} ({:.2?} since the test began)",
                    out.stats.tau().unwrap_or(0.0),
                    t0.elapsed()
                );
            }
        }
    }
}

/// The drafter on the device under tensor and expert parallelism: a `GpuDrafter` on rank 0's GPU
/// reading rank 0's captured hidden states (`dflash::gpu::GpuTpSpec`), 2 virtual ranks. Speculative
/// greedy must equal plain greedy under the same split token for token (every fixture drafter
/// with its target, blocks 4 and 16).
#[test]
fn device_drafter_speculative_greedy_equals_plain_greedy_under_tp() {
    use model::plan::tp::Parallelism;
    use tilert::exec::tp::{AllReduceKind, TpOptions};
    prepare();
    let Some(_ctx) = ultra_kernels::gpu_for_test(
        "device_drafter_speculative_greedy_equals_plain_greedy_under_tp",
    ) else {
        return;
    };
    let t0 = std::time::Instant::now();
    let params = SamplingParams {
        max_tokens: 32,
        ignore_eos: true,
        ..SamplingParams::greedy()
    };
    for (name, rel) in pairs() {
        let (c, w) = model::load::load(&fixtures().join(&rel)).unwrap();
        let c = Arc::new(c);
        let v = c.vocab_size as u32;
        let prompt: Vec<u32> = (0..21).map(|i| (i * 29 + 3) % v).collect();
        let d = Drafter::load(&fixtures().join("drafters").join(&name), &c).unwrap();
        for par in [Parallelism::tensor(2), Parallelism::expert(2)] {
            let tp = TpModel::build(
                c.clone(),
                &w,
                TpOptions {
                    parallelism: par,
                    all_reduce: AllReduceKind::Auto,
                },
                &RankPlacement::Virtual { device: 0 },
                &mut |_| {},
            )
            .unwrap();
            let mut s = tp.session(256).unwrap();
            let mut plain = vec![s.prefill_greedy(&prompt).unwrap()];
            while plain.len() < 32 {
                plain.push(s.decode_greedy(*plain.last().unwrap()).unwrap());
            }
            eprintln!("{rel} {par}: plain greedy ({:.2?})", t0.elapsed());
            let gd = tilert::draft::GpuDrafter::new(tp.rank(0), d.config(), d.weights()).unwrap();
            for b in [4, 16] {
                let mut s = tp.session(256).unwrap();
                let mut backend = dflash::gpu::GpuTpSpec::new(&mut s, &gd).unwrap();
                let opts = SpecOptions {
                    block_size: b,
                    eos_token_ids: Vec::new(),
                    prefill_chunk: None,
                };
                let out = backend
                    .generate(
                        &opts,
                        &prompt,
                        &params,
                        &mut |_| ControlFlow::Continue(()),
                        &mut |_| {},
                    )
                    .unwrap();
                assert_eq!(
                    out.tokens, plain,
                    "{rel} {par} {name} B={b} (device drafter)"
                );
                eprintln!(
                    "{rel} {par} {name} B={b} (device drafter): tau {:.2} ({:.2?} since the \
                     test began)",
                    out.stats.tau().unwrap_or(0.0),
                    t0.elapsed()
                );
            }
        }
    }
}
