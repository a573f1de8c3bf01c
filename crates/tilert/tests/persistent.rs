//! GPU tests of the persistent runtime (`kernels/common/persistent.cuh`) on compiled programs,
//! run by the schedule-replay kernel (`tilert::persistent::Replay`): every architecture's toy
//! decode and verify schedule runs to completion for several steps on all SMs; afterwards every
//! counter holds exactly steps × its per-step target and the launch state has advanced; the
//! timeline shows every waiter starting its work no earlier than the end of every instruction
//! that signals what it waits on; and the epoch targets work across the `u32` wrap. Skips
//! without a GPU (fails with `ULTRA_REQUIRE_GPU=1`).

use std::path::Path;

use model::config::ModelConfig;
use model::cpu::toy::{self, ToyExperts};
use model::plan::{PassShape, Plan, WeightStorage};
use tilert::persistent::timeline;
use tilert::persistent::{compile, CompileOptions, Program, Replay};

const STORAGE: WeightStorage = WeightStorage {
    expert_bytes: 17.0 / 32.0,
    dense_bytes: 2.0,
    kv_bytes: 4.0,
    mxfp4_experts: true,
    label: "bf16 dense, MXFP4 experts, f32 KV (device)",
};

fn configs() -> Vec<(&'static str, ModelConfig)> {
    // `$ULTRA_FIXTURES` if set (a GPU bundle run elsewhere), else the repository's fixtures/.
    let root = std::env::var_os("ULTRA_FIXTURES").map_or_else(
        || Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures"),
        std::path::PathBuf::from,
    );
    let fixture = |rel: &str| ModelConfig::from_dir(&root.join(rel)).unwrap();
    vec![
        ("toy gpt-oss", toy::gpt_oss(1, ToyExperts::Mxfp4).0),
        ("toy qwen3-moe", toy::qwen3_moe(2, ToyExperts::Dense).0),
        (
            "toy mimo-v2-flash",
            toy::mimo_v2_flash(3, ToyExperts::Dense).0,
        ),
        ("mimo-v2 fixture", fixture("mimo-v2/fp4")),
    ]
}

/// Every waiter's work starts no earlier than the end of each instruction signalling a counter
/// it waits on (one step's trace, flattened stream order).
fn check_order(name: &str, p: &Program, trace: &[tilert::persistent::abi::PkTrace]) {
    let flat: Vec<_> = p.streams.iter().flatten().collect();
    let mut last_signal_end = vec![0u64; p.counters.len()];
    for (i, r) in flat.iter().zip(trace) {
        for &c in i.signals() {
            last_signal_end[c as usize] = last_signal_end[c as usize].max(r.t_end);
        }
    }
    for (at, (i, r)) in flat.iter().zip(trace).enumerate() {
        for (c, _) in i.waits() {
            assert!(
                r.t_ready >= last_signal_end[c as usize],
                "{name}: instruction {at} ready at {} before counter {c}'s last signal at {}",
                r.t_ready,
                last_signal_end[c as usize]
            );
        }
    }
}

#[test]
fn compiled_schedules_run_to_completion_with_exact_counters() {
    let Some(ctx) = ultra_kernels::gpu_for_test("persistent schedules") else {
        return;
    };
    let sms = ctx
        .attribute(
            cudarc::driver::sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT,
        )
        .unwrap() as usize;
    let stream = ctx.default_stream();
    for (name, cfg) in configs() {
        for shape in [
            PassShape::decode(100).with_sample(),
            PassShape::verify(8, 40).with_sample(),
        ] {
            let plan = Plan::new(&cfg, STORAGE, shape).unwrap();
            for opts in [
                CompileOptions::h100().with_sms(sms),
                CompileOptions::h100().with_sms(7),
            ] {
                let what = format!("{name} {shape} on {} SMs", opts.sms);
                let p = compile(&plan, &opts).unwrap();
                let r = Replay::new(stream.clone(), &p, true).unwrap();
                let steps = 3u32;
                for _ in 0..steps {
                    r.launch().unwrap();
                }
                stream.synchronize().unwrap();
                let st = r.state().unwrap();
                assert_eq!(st.step, steps, "{what}");
                assert_eq!(st.done, steps * opts.sms as u32, "{what}");
                let c = r.counters().unwrap();
                for (i, &t) in p.counters.iter().enumerate() {
                    assert_eq!(c[i], steps * t, "{what}: counter {i}");
                }
                let trace = r.trace().unwrap().unwrap();
                check_order(&what, &p, &trace);
                let tl = timeline::build(&p, &trace, 3e12).unwrap();
                assert!(tl.step_ns > 0.0, "{what}");
                // Across the u32 wrap of the epoch targets.
                let start = (1u32 << 31) + 5;
                r.skip_to(&p, start).unwrap();
                r.launch().unwrap();
                r.launch().unwrap();
                stream.synchronize().unwrap();
                assert_eq!(r.state().unwrap().step, start + 2, "{what}");
                let c = r.counters().unwrap();
                for (i, &t) in p.counters.iter().enumerate() {
                    assert_eq!(c[i], t.wrapping_mul(start + 2), "{what}: counter {i}");
                }
                eprintln!(
                    "{what}: {} instructions, {} counters, step {:.1} µs",
                    p.instructions(),
                    p.counters.len(),
                    tl.step_ns / 1e3
                );
            }
        }
    }
}

#[test]
fn a_program_for_more_sms_than_the_device_is_refused() {
    let Some(ctx) = ultra_kernels::gpu_for_test("persistent SM check") else {
        return;
    };
    let sms = ctx
        .attribute(
            cudarc::driver::sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT,
        )
        .unwrap() as usize;
    let cfg = toy::gpt_oss(1, ToyExperts::Mxfp4).0;
    let plan = Plan::new(&cfg, STORAGE, PassShape::decode(0)).unwrap();
    let p = compile(&plan, &CompileOptions::h100().with_sms(sms + 1)).unwrap();
    let e = Replay::new(ctx.default_stream(), &p, false)
        .err()
        .expect("more blocks than SMs");
    assert!(e.to_string().contains("resident"), "{e}");
}

// ---- The engine: pk_step against the graph executor ------------------------------------------

fn fixture_dir(rel: &str) -> std::path::PathBuf {
    std::env::var_os("ULTRA_FIXTURES")
        .map_or_else(
            || Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures"),
            std::path::PathBuf::from,
        )
        .join(rel)
}

fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

fn argmax(v: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &x) in v.iter().enumerate() {
        if x > v[best] {
            best = i;
        }
    }
    best as u32
}

/// A persistent session and a graph-executor session of one model, fed the same tokens: the
/// persistent decode step's logits are the graph executor's bits (every tile is one of the graph
/// executor's launches, through the same device functions: same products, same summation
/// order), over `steps` greedy steps after `prompt`; then truncation and rollback, and a
/// graph replay against launch-by-launch steps.
fn check_engine(name: &str, gpu: &tilert::exec::GpuModel, prompt: &[u32], steps: usize) {
    use tilert::persistent::PersistentSession;
    let mut g = gpu.session(512).unwrap();
    let mut p = PersistentSession::new(gpu, 512).unwrap();
    let lg = g.prefill(prompt).unwrap();
    let lp = p.prefill(prompt).unwrap();
    assert_eq!(
        bits(&lg),
        bits(&lp),
        "{name}: prefill (both on the graph executor)"
    );
    let mut tok = argmax(&lg);
    let mut seq = Vec::new();
    for i in 0..steps {
        let lg = g.decode(tok).unwrap();
        let lp = p.decode(tok).unwrap();
        assert!(
            lp.iter().all(|x| x.is_finite()),
            "{name}: step {i}: non-finite logits"
        );
        assert_eq!(
            bits(&lg),
            bits(&lp),
            "{name}: decode step {i} (token {tok})"
        );
        seq.push(tok);
        tok = argmax(&lg);
    }
    // The device argmax of the persistent step is the graph executor's greedy choice.
    let a = g.decode_greedy(tok).unwrap();
    let b = p.decode_greedy(tok).unwrap();
    assert_eq!(a, b, "{name}: greedy step");
    // Truncate (rollback of the last 5 positions) and re-run: the same bits as before.
    let keep = g.len() - 5;
    g.truncate(keep).unwrap();
    p.truncate(keep).unwrap();
    let replay = seq[seq.len() - 4];
    let lg = g.decode(replay).unwrap();
    let lp = p.decode(replay).unwrap();
    assert_eq!(bits(&lg), bits(&lp), "{name}: decode after truncate");
    // Launch by launch = the captured graph.
    p.set_use_graph(false);
    let lg = g.decode(3).unwrap();
    let lp = p.decode(3).unwrap();
    assert_eq!(bits(&lg), bits(&lp), "{name}: launch by launch");
    eprintln!(
        "{name}: {steps} persistent decode steps bit-identical to the graph executor \
         ({} instructions on {} SMs)",
        p.program().instructions(),
        p.program().options.sms
    );
}

#[test]
fn persistent_decode_equals_the_graph_executor() {
    let Some(_ctx) = ultra_kernels::gpu_for_test("persistent decode vs graph executor") else {
        return;
    };
    for seed in [1u64, 7, 11] {
        let (c, w) = toy::gpt_oss(seed, ToyExperts::Mxfp4);
        let gpu = tilert::exec::GpuModel::new(0, std::sync::Arc::new(c), &w).unwrap();
        check_engine(
            &format!("toy gpt-oss seed {seed}"),
            &gpu,
            &[1, 5, 9, 2, 7, 3, 8],
            32,
        );
    }
    let dir = fixture_dir("gpt-oss/mxfp4");
    let (c, w) = model::load::load(&dir).unwrap();
    let gpu = tilert::exec::GpuModel::new(0, std::sync::Arc::new(c), &w).unwrap();
    check_engine("gpt-oss/mxfp4 fixture", &gpu, &[1, 2, 3, 4, 5, 6], 32);
}

/// Models and passes the engine does not run are errors that name the engine and the reason;
/// verify blocks too (speculative decoding runs on the graph executor).
#[test]
fn persistent_unsupported_models_and_passes_are_clear_errors() {
    use model::executor::Executor;
    use tilert::persistent::PersistentSession;
    let Some(_ctx) = ultra_kernels::gpu_for_test("persistent unsupported") else {
        return;
    };
    for (name, (c, w)) in [
        ("toy qwen3-moe", toy::qwen3_moe(2, ToyExperts::Mxfp4)),
        (
            "toy gpt-oss, bf16 experts",
            toy::gpt_oss(2, ToyExperts::Dense),
        ),
    ] {
        let gpu = tilert::exec::GpuModel::new(0, std::sync::Arc::new(c), &w).unwrap();
        let e = PersistentSession::new(&gpu, 64)
            .err()
            .expect(name)
            .to_string();
        assert!(e.contains("persistent engine"), "{name}: {e}");
    }
    let (c, w) = toy::gpt_oss(3, ToyExperts::Mxfp4);
    let gpu = tilert::exec::GpuModel::new(0, std::sync::Arc::new(c), &w).unwrap();
    let mut p = PersistentSession::new(&gpu, 64).unwrap();
    p.prefill(&[1, 2, 3]).unwrap();
    let e = p.verify(&[4, 5], &[]).unwrap_err().to_string();
    assert!(e.contains("verify"), "{e}");
    assert_eq!(p.len(), 3);
}
