//! The `ultra` binary with no `--model`: the embedded default model and its DFlash drafter
//! (written to a scratch `ULTRA_CACHE_DIR`), its plain / speculative equivalence, `bench-spec`, and
//! clear errors for bad arguments.

use std::path::PathBuf;
use std::process::{Command, Output};

fn scratch(tag: &str) -> PathBuf {
    std::env::temp_dir().join(format!("ultra-cli-default-{tag}-{}", std::process::id()))
}

fn ultra(cache: &PathBuf, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_ultra"))
        .env("ULTRA_CACHE_DIR", cache)
        .args(args)
        .output()
        .expect("running ultra")
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

#[test]
fn generate_uses_the_default_model_and_drafter() {
    let cache = scratch("generate");
    let spec = ultra(
        &cache,
        &[
            "generate",
            "--max-tokens",
            "24",
            "--threads",
            "2",
            "def fibonacci(n):",
        ],
    );
    let err = text(&spec.stderr);
    assert!(spec.status.success(), "{err}");
    assert!(err.contains("ultra-tiny-code"), "{err}");
    assert!(err.contains("speculative: block 8"), "{err}");
    assert!(err.contains("acceptance length tau"), "{err}");
    assert!(err.contains("tok/s"), "{err}");
    assert!(!text(&spec.stdout).trim().is_empty());

    let plain = ultra(
        &cache,
        &[
            "generate",
            "--max-tokens",
            "24",
            "--no-draft",
            "--threads",
            "2",
            "def fibonacci(n):",
        ],
    );
    let perr = text(&plain.stderr);
    assert!(plain.status.success(), "{perr}");
    assert!(!perr.contains("speculative"), "{perr}");
    // Greedy speculative decoding is lossless.
    assert_eq!(text(&plain.stdout), text(&spec.stdout));
    let _ = std::fs::remove_dir_all(&cache);
}

#[test]
fn bench_spec_and_bad_arguments() {
    let cache = scratch("bench");
    std::fs::create_dir_all(&cache).unwrap();
    let set = cache.join("tiny.jsonl");
    std::fs::write(
        &set,
        "{\"prompt\": \"import os\\n\"}\n{\"prompt\": \"Q: Compute 3 + 4 * 5.\\nA:\"}\n",
    )
    .unwrap();
    let out = ultra(
        &cache,
        &[
            "bench-spec",
            "--eval",
            set.to_str().unwrap(),
            "--max-tokens",
            "12",
        ],
    );
    let err = text(&out.stderr);
    assert!(out.status.success(), "{err}");
    let table = text(&out.stdout);
    assert!(table.contains("| tiny | 2 | 24 |"), "{table}");
    assert!(
        table.trim_end().ends_with("| 0 |"),
        "speculative != plain: {table}"
    );

    // On the GPU executor: the same table where a GPU is present, else a clear error.
    let gpu = ultra(
        &cache,
        &[
            "bench-spec",
            "--device",
            "cuda",
            "--eval",
            set.to_str().unwrap(),
            "--max-tokens",
            "12",
        ],
    );
    let (gout, gerr) = (text(&gpu.stdout), text(&gpu.stderr));
    assert!(!gerr.contains("panicked"), "{gerr}");
    if gpu.status.success() {
        assert!(gout.contains("GPU executor"), "{gout}");
        // (the last column may count a prompt whose greedy continuation differs: the GPU's T = 1
        // decode and T = 8 verify sum in different orders, so a near-tie can flip)
        assert!(gout.contains("| tiny | 2 | 24 |"), "{gout}");
    } else {
        assert!(!gerr.trim().is_empty());
    }

    // Bad input: clear errors, no panics.
    let bad = ultra(&cache, &["bench-spec", "--eval", "/no/such/set.jsonl"]);
    assert!(!bad.status.success());
    assert!(text(&bad.stderr).contains("/no/such/set.jsonl"));
    std::fs::write(&set, "{\"text\": 1}\n").unwrap();
    let bad = ultra(&cache, &["bench-spec", "--eval", set.to_str().unwrap()]);
    assert!(!bad.status.success());
    assert!(text(&bad.stderr).contains("no string field \"prompt\""));
    let bad = ultra(
        &cache,
        &["generate", "--no-draft", "--block-size", "4", "x"],
    );
    assert!(!bad.status.success());
    assert!(text(&bad.stderr).contains("--block-size needs a drafter"));
    let bad = ultra(&cache, &["generate", "--no-draft", "--draft", "/tmp", "x"]);
    assert!(!bad.status.success());
    assert!(text(&bad.stderr).contains("cannot be used with"));
    assert!(!text(&bad.stderr).contains("panicked"));
    let _ = std::fs::remove_dir_all(&cache);
}
