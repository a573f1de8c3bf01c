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
