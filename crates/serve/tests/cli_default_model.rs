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

/// The statistics `ultra generate` prints after a speculative run, parsed from its stderr.
#[derive(Debug)]
struct SpecLine {
    generated: u64,
    block: usize,
    rounds: u64,
    tau: f64,
    /// Per draft position: the conditional acceptance rate, `None` where never examined.
    per_position: Vec<Option<f64>>,
    /// Rounds by accepted drafts.
    histogram: Vec<u64>,
    /// Plain steps adaptive speculation chose (0 with --fixed-block).
    plain_steps: u64,
    /// The `speculation:` line: what the block policy chose.
    choice: String,
}

fn between<'a>(s: &'a str, before: &str, after: &str) -> &'a str {
    let i = s
        .find(before)
        .unwrap_or_else(|| panic!("{before:?} not in {s:?}"))
        + before.len();
    let n = s[i..]
        .find(after)
        .unwrap_or_else(|| panic!("{after:?} not in {s:?}"));
    &s[i..i + n]
}

fn spec_line(err: &str) -> SpecLine {
    let line = err
        .lines()
        .find(|l| l.starts_with("speculative: "))
        .unwrap_or_else(|| panic!("no statistics line in {err}"));
    let list = |inner: &str| -> Vec<String> {
        inner
            .split(',')
            .map(|x| x.trim().to_string())
            .filter(|x| !x.is_empty())
            .collect()
    };
    SpecLine {
        generated: between(err, "generated ", " tokens").parse().unwrap(),
        block: between(line, "block ", ",").parse().unwrap(),
        rounds: between(line, ", ", " rounds").parse().unwrap(),
        tau: between(line, "tau ", " (counting the bonus)")
            .parse()
            .unwrap(),
        per_position: list(between(line, "per-position acceptance [", "]"))
            .iter()
            .map(|x| (x != "-").then(|| x.parse().unwrap()))
            .collect(),
        histogram: list(between(line, "histogram [", "]"))
            .iter()
            .map(|x| x.parse().unwrap())
            .collect(),
        plain_steps: err
            .lines()
            .find_map(|l| l.strip_prefix("speculation: "))
            .and_then(|l| l.split(" plain steps").next())
            .and_then(|n| n.parse().ok())
            .unwrap_or(0),
        choice: err
            .lines()
            .find_map(|l| l.strip_prefix("speculation: "))
            .unwrap_or_else(|| panic!("no speculation line in {err}"))
            .to_string(),
    }
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
            "--ignore-eos",
            "--threads",
            "2",
            "def fibonacci(n):",
        ],
    );
    let err = text(&spec.stderr);
    assert!(spec.status.success(), "{err}");
    assert!(err.contains("ultra-tiny-code"), "{err}");
    assert!(err.contains("tok/s"), "{err}");
    assert!(!text(&spec.stdout).trim().is_empty());
    // The statistics describe this run: every round is in the histogram, τ is the mean of
    // (accepted + 1) over the rounds, and the tokens of all rounds, of the plain steps adaptive
    // speculation chose and the prefill's first one are the generated tokens (EOS ignored, so
    // the last block shrinks to end at max_tokens).
    let st = spec_line(&err);
    assert_eq!(st.block, 8, "{err}");
    assert_eq!(st.generated, 24, "{err}");
    // The default model uses its drafter, adaptively: it drafts its warm-up rounds at the full
    // block, then keeps drafting only where a round is measured to pay on this machine (on the
    // CPU the default model usually decodes plain steps after the warm-up: never slower than
    // --no-draft), and says what it chose.
    assert!(st.choice.contains("adaptive: "), "{err}");
    assert!(st.rounds > 0 && st.histogram.len() <= st.block, "{st:?}");
    assert_eq!(st.histogram.iter().sum::<u64>(), st.rounds, "{st:?}");
    let emitted: u64 = st
        .histogram
        .iter()
        .enumerate()
        .map(|(a, &n)| (a as u64 + 1) * n)
        .sum();
    assert_eq!(1 + emitted + st.plain_steps, st.generated, "{st:?}");
    let tau = emitted as f64 / st.rounds as f64;
    assert!((st.tau - tau).abs() <= 0.005, "{st:?}: tau {tau}");
    assert!((1.0..=st.block as f64).contains(&st.tau), "{st:?}");
    // Per position: B − 1 entries, rates in [0, 1]; position 0 accepted in the rounds with
    // a ≥ 1 out of those that drafted at all (all rounds, or all but a last one-token round).
    assert_eq!(st.per_position.len(), st.block - 1, "{st:?}");
    assert!(st
        .per_position
        .iter()
        .flatten()
        .all(|r| (0.0..=1.0).contains(r)));
    let first = st.per_position[0].expect("position 0 examined");
    let with_accept = (st.rounds - st.histogram[0]) as f64;
    assert!(
        [st.rounds, st.rounds - 1]
            .iter()
            .any(|&n| n > 0 && (first - with_accept / n as f64).abs() <= 0.005),
        "{st:?}"
    );

    let plain = ultra(
        &cache,
        &[
            "generate",
            "--max-tokens",
            "24",
            "--ignore-eos",
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

    // --fixed-block: every round drafts the full block, no plain steps; the same text.
    let fixed = ultra(
        &cache,
        &[
            "generate",
            "--max-tokens",
            "24",
            "--ignore-eos",
            "--fixed-block",
            "--threads",
            "2",
            "def fibonacci(n):",
        ],
    );
    let ferr = text(&fixed.stderr);
    assert!(fixed.status.success(), "{ferr}");
    let fst = spec_line(&ferr);
    assert_eq!(fst.choice, "fixed block 8", "{ferr}");
    assert_eq!(fst.plain_steps, 0, "{ferr}");
    let emitted: u64 = fst
        .histogram
        .iter()
        .enumerate()
        .map(|(a, &n)| (a as u64 + 1) * n)
        .sum();
    assert_eq!(1 + emitted, fst.generated, "{fst:?}");
    assert_eq!(text(&fixed.stdout), text(&spec.stdout));

    // The next default run uses what the first measured (kept in the cache directory): where
    // drafting did not pay it decodes plainly without loading the drafter, else it measures
    // again. The text is the same either way.
    let again = ultra(
        &cache,
        &[
            "generate",
            "--max-tokens",
            "24",
            "--ignore-eos",
            "--threads",
            "2",
            "def fibonacci(n):",
        ],
    );
    let aerr = text(&again.stderr);
    assert!(again.status.success(), "{aerr}");
    assert_eq!(text(&again.stdout), text(&spec.stdout));
    let remembered = std::fs::read_dir(cache.join("adaptive"))
        .map(|d| d.count())
        .unwrap_or(0);
    assert_eq!(remembered, 1, "{err}");
    if st.choice.contains("drafting off") {
        assert!(aerr.contains("the drafter not loaded"), "{aerr}");
        assert!(!aerr.contains("speculative:"), "{aerr}");
    } else {
        assert!(spec_line(&aerr).choice.contains("adaptive: "), "{aerr}");
    }

    // A "drafting off" record that has been reused up is measured again (same text); when the
    // new measurement confirms it, the record backs off (`confirmed` counts it), else it starts
    // over.
    let record = std::fs::read_dir(cache.join("adaptive"))
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .path();
    std::fs::write(
        &record,
        r#"{"chosen":1,"draft_speedup":0.5,"measured_unix":1,"reused":0,"confirmed":0}"#,
    )
    .unwrap();
    let re = ultra(
        &cache,
        &[
            "generate",
            "--max-tokens",
            "24",
            "--ignore-eos",
            "--threads",
            "2",
            "def fibonacci(n):",
        ],
    );
    let rerr = text(&re.stderr);
    assert!(re.status.success(), "{rerr}");
    assert_eq!(text(&re.stdout), text(&spec.stdout));
    let rst = spec_line(&rerr);
    assert!(rst.choice.contains("adaptive: "), "{rerr}");
    let stored: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&record).unwrap()).unwrap();
    let want = u64::from(rst.choice.contains("drafting off"));
    assert_eq!(stored["confirmed"], want, "{stored} after {rerr}");
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
    // What adaptive speculation chose for each prompt (drafting off or a block size).
    assert!(table.contains("adaptive chose"), "{table}");
    assert!(
        table
            .lines()
            .any(|l| l.contains("off ×") || l.contains("B=")),
        "{table}"
    );
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
    // Block sizes outside 2..=16.
    for b in ["1", "17"] {
        let bad = ultra(&cache, &["generate", "--block-size", b, "x"]);
        let err = text(&bad.stderr);
        assert!(!bad.status.success());
        assert!(
            err.contains(&format!("block size {b} is outside 2..=16")),
            "{err}"
        );
        assert!(!err.contains("panicked"), "{err}");
    }
    // A drafter for another target: refused at load, naming the drafter and the field.
    let fixtures = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../fixtures");
    let other = fixtures.join("drafters/qwen3-moe-dflash");
    let bad = ultra(
        &cache,
        &[
            "generate",
            "--model",
            fixtures.join("gpt-oss/bf16").to_str().unwrap(),
            "--draft",
            other.to_str().unwrap(),
            "--token-ids",
            "5,6,7",
        ],
    );
    let err = text(&bad.stderr);
    assert!(!bad.status.success());
    assert!(err.contains("loading drafter"), "{err}");
    assert!(
        err.contains("drafter `hidden_size` does not match the target"),
        "{err}"
    );
    assert!(!err.contains("panicked"), "{err}");
    // A drafter directory without a drafter.
    let bad = ultra(
        &cache,
        &["generate", "--draft", cache.to_str().unwrap(), "x"],
    );
    let err = text(&bad.stderr);
    assert!(!bad.status.success());
    assert!(err.contains("config.json"), "{err}");
    assert!(!err.contains("panicked"), "{err}");
    let _ = std::fs::remove_dir_all(&cache);
}
