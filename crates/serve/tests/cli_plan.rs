//! `ultra inspect --plan` (the step plan of a pass: ops, weights, bytes, FLOPs, totals that
//! equal the footprint) and `--tensor-parallel N` on `ultra score` / `ultra generate` (simulated
//! ranks on the CPU: log-probs equal the unsharded model's within the model crate's TP
//! tolerance; clear errors where the head counts do not split or the device is a GPU).

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use serve::commands::inspect::{draft_plans, inspect, parse_pass, plan};

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures")
}

fn ultra(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_ultra"))
        .env("RUST_BACKTRACE", "0")
        .args(args)
        .output()
        .expect("running ultra")
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

#[test]
fn plan_totals_equal_the_footprint() {
    let mut paths = vec![
        root().join("configs/gpt-oss-20b.json"),
        root().join("configs/mimo-v2.5-pro.json"),
    ];
    for d in [
        "gpt-oss/bf16",
        "gpt-oss/mxfp4",
        "qwen3-moe/sharded",
        "mimo-v2-flash/hub",
        "mimo-v2/fp4",
    ] {
        paths.push(root().join(d));
    }
    for p in paths {
        let i = inspect(&p).unwrap();
        let pl = plan(&i, parse_pass("decode", 0).unwrap(), 1).unwrap();
        let t = pl.totals();
        assert!(
            (t.weight_bytes - i.footprint.bytes_per_token).abs() < 1e-6 * t.weight_bytes,
            "{}: plan {} vs footprint {}",
            p.display(),
            t.weight_bytes,
            i.footprint.bytes_per_token
        );
    }
}

#[test]
fn inspect_plan_prints_ops_and_totals() {
    let cfg = root().join("configs/gpt-oss-20b.json");
    let out = ultra(&[
        "inspect",
        "--config",
        cfg.to_str().unwrap(),
        "--plan",
        "--context",
        "4096",
    ]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let s = text(&out.stdout);
    assert!(s.contains("bytes per token     3.708 GB"), "{s}");
    assert!(s.contains("plan: decode(1) at context 4096"), "{s}");
    assert!(s.contains("experts_gate_up"), "{s}");
    assert!(s.contains("layers.0.experts.gate_up"), "{s}");
    assert!(
        s.contains("total: 147 ops, weights 3.708 GB (3708083328 bytes)"),
        "{s}"
    );
    // A sharded verify pass of a checkpoint, and a drafter's passes.
    let m = root().join("mimo-v2-flash/native");
    let out = ultra(&[
        "inspect",
        "--model",
        m.to_str().unwrap(),
        "--plan",
        "--pass",
        "verify:4",
        "--tensor-parallel",
        "2",
    ]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let s = text(&out.stdout);
    assert!(s.contains("verify(4)") && s.contains("2 ranks"), "{s}");
    assert!(
        s.contains("all_reduce") && s.contains("[kv heads 0..1]"),
        "{s}"
    );
    let i = inspect(&root().join("qwen3-moe/native")).unwrap();
    let (ctx, blk) = draft_plans(
        &i,
        &root().join("drafters/qwen3-moe-dflash"),
        3,
        Some(8),
        10,
    )
    .unwrap();
    assert_eq!(ctx.shape.rows, 3);
    assert_eq!(blk.ops.last().unwrap().kind.name(), "sample");
    let out = ultra(&[
        "inspect",
        "--config",
        cfg.to_str().unwrap(),
        "--plan",
        "--pass",
        "verify:0",
    ]);
    assert!(!out.status.success());
    assert!(text(&out.stderr).contains("row count must be at least 1"));
}

fn score_json(args: &[&str]) -> Vec<f64> {
    let out = ultra(args);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    v["logprobs"].as_array().unwrap()[1..]
        .iter()
        .map(|x| x.as_f64().unwrap())
        .collect()
}

#[test]
fn score_and_generate_with_tensor_parallel_ranks() {
    for d in ["gpt-oss/mxfp4", "mimo-v2-flash/hub"] {
        let m = root().join(d);
        let base = [
            "score",
            "--model",
            m.to_str().unwrap(),
            "--token-ids",
            "5,17,33,2,9,41,7,7,100,3",
            "--json",
        ];
        let one = score_json(&base);
        for n in ["2", "4"] {
            let tp = score_json(&[&base[..], &["--tensor-parallel", n]].concat());
            for (a, b) in one.iter().zip(&tp) {
                // log-softmax of logits equal within 1e-5 relative (model/tests/plan.rs).
                assert!((a - b).abs() < 1e-4, "{d} TP={n}: {a} vs {b}");
            }
        }
    }
    let m = root().join("qwen3-moe/native");
    let out = ultra(&[
        "generate",
        "--model",
        m.to_str().unwrap(),
        "--token-ids",
        "5,17,33",
        "--max-tokens",
        "4",
        "--tensor-parallel",
        "2",
    ]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(text(&out.stderr).contains("tensor parallel: 2 simulated ranks"));
    let out = ultra(&[
        "score",
        "--model",
        m.to_str().unwrap(),
        "--token-ids",
        "5,17,33",
        "--tensor-parallel",
        "3",
    ]);
    assert!(!out.status.success());
    let err = text(&out.stderr);
    assert!(
        err.contains("4 query heads and 2 KV heads") && err.contains("possible here: 1, 2, 4"),
        "{err}"
    );
    let out = ultra(&[
        "score",
        "--model",
        m.to_str().unwrap(),
        "--token-ids",
        "5,17",
        "--device",
        "cuda",
        "--tensor-parallel",
        "2",
        "--devices",
        "0,0",
    ]);
    // GPU ranks: contradictory placements are refused before anything loads (no GPU needed).
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("GPU 0 is listed twice"),
        "{}",
        text(&out.stderr)
    );
    for (args, want) in [
        (
            &["--tensor-parallel", "2", "--virtual-ranks"][..],
            "add --device cuda",
        ),
        (
            &[
                "--device",
                "cuda",
                "--tensor-parallel",
                "4",
                "--devices",
                "0,1",
            ][..],
            "--devices lists 2 GPU(s) for --tensor-parallel 4",
        ),
        (
            &[
                "--device",
                "cuda",
                "--tensor-parallel",
                "3",
                "--virtual-ranks",
            ][..],
            "possible here: 1, 2, 4",
        ),
    ] {
        let base = [
            "score",
            "--model",
            m.to_str().unwrap(),
            "--token-ids",
            "5,17",
        ];
        let out = ultra(&[&base[..], args].concat());
        assert!(!out.status.success(), "{args:?}");
        assert!(
            text(&out.stderr).contains(want),
            "{args:?}: {}",
            text(&out.stderr)
        );
    }
    // Two GPU ranks on GPUs 0 and 1: runs where the machine has them, else names the cause.
    let out = ultra(&[
        "score",
        "--model",
        m.to_str().unwrap(),
        "--token-ids",
        "5,17",
        "--device",
        "cuda",
        "--tensor-parallel",
        "2",
    ]);
    let err = text(&out.stderr);
    assert!(
        out.status.success()
            || err.contains("no CUDA driver")
            || err.contains("asked for GPU 1 but this machine has 1 GPU(s)")
            || err.contains("cannot access GPU"),
        "{err}"
    );
}

/// `--expert-parallel` on the CPU (simulated ranks): scores equal the unsharded ones within the
/// tensor-parallel tolerance, alone (`=N`) and with `--tensor-parallel N`; the plan prints each
/// rank's expert range; experts that do not divide and a missing rank count are named errors.
#[test]
fn expert_parallel_on_the_cpu() {
    let m = root().join("gpt-oss/mxfp4");
    let base = [
        "score",
        "--model",
        m.to_str().unwrap(),
        "--token-ids",
        "5,17,33,2,9,41,7,7,100,3",
        "--json",
    ];
    let one = score_json(&base);
    for extra in [
        &["--expert-parallel=2"][..],
        &["--expert-parallel=4"][..],
        &["--tensor-parallel", "2", "--expert-parallel"][..],
    ] {
        let ep = score_json(&[&base[..], extra].concat());
        for (a, b) in one.iter().zip(&ep) {
            assert!((a - b).abs() < 1e-4, "{extra:?}: {a} vs {b}");
        }
    }
    let out = ultra(&[
        "inspect",
        "--model",
        m.to_str().unwrap(),
        "--plan",
        "--tensor-parallel",
        "2",
        "--expert-parallel",
    ]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let plan = text(&out.stdout);
    assert!(
        plan.contains("(experts 0..4)") && plan.contains("(experts 4..8)"),
        "{plan}"
    );
    for (args, want) in [
        (&["--expert-parallel=3"][..], "routed experts on 3 ranks"),
        (&["--expert-parallel"][..], "needs a rank count"),
        (
            &["--tensor-parallel", "2", "--expert-parallel=4"][..],
            "give one count",
        ),
    ] {
        let out = ultra(&[&base[..], args].concat());
        assert!(!out.status.success(), "{args:?}");
        let err = text(&out.stderr);
        assert!(err.contains(want), "{args:?}: {err}");
    }
}
