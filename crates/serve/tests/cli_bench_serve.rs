//! `ultra bench-serve --synthetic-config CONFIG [--controlled-tau TAU]` (the GPU bar case of
//! issue #20: a model of a config's dimensions with random weights, a controlled-acceptance
//! drafter): bad arguments are clear errors, found before any GPU work.

use std::process::{Command, Output};

fn ultra(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_ultra"))
        .args(args)
        .output()
        .expect("running ultra")
}

fn config() -> String {
    concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../fixtures/configs/gpt-oss-20b.json"
    )
    .to_string()
}

fn fails_with(args: &[&str], what: &str) {
    let out = ultra(args);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{args:?} succeeded");
    assert!(err.contains(what), "{args:?}: {err}");
    assert!(!err.contains("panicked"), "{args:?}: {err}");
}

#[test]
fn synthetic_config_and_controlled_tau_errors() {
    let cfg = config();
    let base = ["bench-serve", "--streams", "1", "--synthetic-config", &cfg];
    // Not on the CPU.
    fails_with(
        &base,
        "--synthetic-config runs on one GPU: add --device cuda",
    );
    // τ beyond the block; a drafter of no layers.
    let cuda = [&base[..], &["--device", "cuda"]].concat();
    fails_with(
        &[&cuda[..], &["--controlled-tau", "9"]].concat(),
        "--controlled-tau 9 is outside 1..=8",
    );
    fails_with(
        &[&cuda[..], &["--controlled-tau", "3", "--block-size", "2"]].concat(),
        "--controlled-tau 3 is outside 1..=2",
    );
    fails_with(
        &[
            &cuda[..],
            &["--controlled-tau", "5.6", "--controlled-draft-layers", "0"],
        ]
        .concat(),
        "--controlled-draft-layers 0 is outside 1..=64",
    );
    // --controlled-tau needs --synthetic-config; --synthetic-config is not --model.
    fails_with(
        &["bench-serve", "--streams", "1", "--controlled-tau", "5.6"],
        "--synthetic-config",
    );
    fails_with(
        &[&base[..], &["--model", "fixtures/qwen3-moe/native"]].concat(),
        "cannot be used with",
    );
    // A config that is not there: named.
    fails_with(
        &[
            "bench-serve",
            "--streams",
            "1",
            "--device",
            "cuda",
            "--synthetic-config",
            "/no/such/config.json",
            "--controlled-tau",
            "5.6",
        ],
        "/no/such/config.json",
    );
}
