//! `cargo xtask bench-cpu`: Ultra's CPU executor side by side with llama.cpp on the same
//! machine, on random-weight gpt-oss models of the same shapes and dtypes.
//!
//! 1. llama.cpp's `llama-bench` is built from source, once: the `llama-cpp-python` sdist of the
//!    pinned version (it vendors llama.cpp) is fetched with pip into `target/llama.cpp/`,
//!    unpacked, and only the `llama-bench` target is built with CMake (Release, CPU only,
//!    `GGML_NATIVE=ON`, static). A second run finds the binary and builds nothing.
//! 2. `ultra` is built in release and writes each case's random model as GGUF
//!    (`ultra bench-shapes --case C --gguf F`: F16 dense, F32 router/norms/biases, MXFP4
//!    experts), cached in `target/llama.cpp/models/` next to a stamp of the `ultra` binary that
//!    wrote it.
//! 3. For each case, alternating llama.cpp then Ultra: decode `tg128` at each thread count, then
//!    prompt processing `pp512` at the largest; a table of tokens/s and Ultra / llama.cpp.
//!    `--llama default,omp-passive` adds a llama.cpp column whose OpenMP threads sleep at
//!    barriers instead of spinning (`OMP_WAIT_POLICY=passive`): on cores shared with other work
//!    the spinning default can lose most of its speed at 2 threads, and the ratio is taken
//!    against the faster column.
//!
//! This is a separate task, never part of CI's test command.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};
use serde_json::Value;

/// The pinned llama-cpp-python release; its sdist vendors llama.cpp (ggml 0.25.3, commit
/// 0c1e570).
pub const LLAMA_CPP_PYTHON: &str = "0.3.36";
/// The benchmark's cases (`ultra bench-shapes --case`).
pub const CASES: &[&str] = &["synthetic-moe", "default-shape", "gpt-oss-layers"];

/// How llama-bench's worker threads wait at barriers (its OpenMP build's `OMP_WAIT_POLICY`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LlamaWait {
    /// As built: spin-waiting (fastest on an idle machine).
    Default,
    /// `OMP_WAIT_POLICY=passive`: threads sleep at barriers (much faster when the cores are
    /// shared with other work).
    Passive,
}

impl LlamaWait {
    pub fn parse(s: &str) -> Result<LlamaWait> {
        match s {
            "default" => Ok(LlamaWait::Default),
            "omp-passive" => Ok(LlamaWait::Passive),
            _ => bail!("unknown llama.cpp variant {s:?}: default or omp-passive"),
        }
    }
    fn label(self) -> &'static str {
        match self {
            LlamaWait::Default => "llama.cpp",
            LlamaWait::Passive => "llama.cpp OMP passive",
        }
    }
}

/// What to run.
#[derive(Debug, Clone)]
pub struct Options {
    pub cases: Vec<String>,
    pub threads: Vec<usize>,
    pub tg: usize,
    pub pp: usize,
    /// Runs inside each tool per measurement (llama-bench `-r`, Ultra `--repeats`).
    pub repeats: usize,
    /// Alternating llama.cpp / Ultra rounds per measurement.
    pub rounds: usize,
    /// llama.cpp runs per round, one column each.
    pub llama: Vec<LlamaWait>,
}

/// One measurement: per round, each llama.cpp variant's and Ultra's tokens/s.
struct Row {
    case: String,
    test: String,
    threads: usize,
    llama: Vec<Vec<f64>>,
    ultra: Vec<f64>,
    load: Vec<f64>,
}

/// The median (mean of the middle two for an even count).
fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

/// The 1-minute load average (NaN where /proc/loadavg is missing).
fn loadavg() -> f64 {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse().ok())
        .unwrap_or(f64::NAN)
}

/// Runs the whole benchmark and prints the table.
pub fn run(root: &Path, opt: &Options) -> Result<()> {
    for c in &opt.cases {
        if !CASES.contains(&c.as_str()) {
            bail!("unknown case {c:?}: the cases are {}", CASES.join(", "));
        }
    }
    if opt.threads.is_empty() || opt.threads.contains(&0) {
        bail!("--threads needs one or more thread counts ≥ 1");
    }
    if opt.llama.is_empty() {
        bail!("--llama needs at least one variant");
    }
    let cache = root.join("target").join("llama.cpp");
    std::fs::create_dir_all(&cache).with_context(|| cache.display().to_string())?;
    let llama = llama_bench(&cache)?;
    let ultra = build_ultra(root)?;
    let max_t = *opt.threads.iter().max().expect("non-empty");
    let mut rows = Vec::new();
    for case in &opt.cases {
        let gguf = gguf_for(&cache, &ultra, case)?;
        let mut tests: Vec<(String, usize)> = Vec::new();
        if opt.tg > 0 {
            tests.extend(opt.threads.iter().map(|&t| (format!("tg{}", opt.tg), t)));
        }
        if opt.pp > 0 {
            tests.push((format!("pp{}", opt.pp), max_t));
        }
        for (test, t) in tests {
            let (tg, pp) = if test.starts_with("tg") {
                (opt.tg, 0)
            } else {
                (0, opt.pp)
            };
            let mut row = Row {
                case: case.clone(),
                test: test.clone(),
                threads: t,
                llama: vec![Vec::new(); opt.llama.len()],
                ultra: Vec::new(),
                load: Vec::new(),
            };
            for round in 0..opt.rounds.max(1) {
                row.load.push(loadavg());
                let mut line = format!("{case} {test} {t} threads, round {}:", round + 1);
                for (i, &v) in opt.llama.iter().enumerate() {
                    let l = llama_rate(&llama, v, &gguf, tg, pp, t, opt.repeats)?;
                    line += &format!(" {} {l:.1} tok/s,", v.label());
                    row.llama[i].push(l);
                }
                let u = ultra_rate(&ultra, case, tg, pp, t, opt.repeats)?;
                row.ultra.push(u);
                row.load.push(loadavg());
                eprintln!("{line} Ultra {u:.1} tok/s");
            }
            rows.push(row);
        }
    }
    print_table(&rows, opt);
    Ok(())
}

fn print_table(rows: &[Row], opt: &Options) {
    println!();
    println!(
        "CPU, {} round(s) of llama.cpp then Ultra per row; each tool's figure per round: \
         llama-bench's mean / Ultra's median of {} runs; the table: medians over rounds; the \
         ratio: Ultra over the fastest llama.cpp column, median (range) over rounds; load: the \
         1-minute load average seen during the row; llama.cpp = the llama.cpp vendored by \
         llama-cpp-python {LLAMA_CPP_PYTHON} (F16 dense, F32 router/1-D, MXFP4 experts)",
        opt.rounds.max(1),
        opt.repeats.max(1)
    );
    println!();
    let mut head = String::from("| case | test | threads |");
    let mut rule = String::from("|---|---|---:|");
    for v in &opt.llama {
        head += &format!(" {} tok/s |", v.label());
        rule += "---:|";
    }
    println!("{head} Ultra tok/s | Ultra / llama.cpp | load |");
    println!("{rule}---:|---:|---:|");
    for r in rows {
        let ratios: Vec<f64> = (0..r.ultra.len())
            .map(|k| {
                let best = r.llama.iter().map(|l| l[k]).fold(0f64, f64::max);
                r.ultra[k] / best
            })
            .collect();
        let (lo, hi) = ratios
            .iter()
            .fold((f64::INFINITY, 0f64), |(a, b), &x| (a.min(x), b.max(x)));
        let ratio = if ratios.len() > 1 {
            format!("{:.2}× ({lo:.2}–{hi:.2})", median(ratios.clone()))
        } else {
            format!("{:.2}×", ratios[0])
        };
        let (llo, lhi) = r
            .load
            .iter()
            .fold((f64::INFINITY, 0f64), |(a, b), &x| (a.min(x), b.max(x)));
        let mut line = format!("| {} | {} | {} |", r.case, r.test, r.threads);
        for l in &r.llama {
            line += &format!(" {:.1} |", median(l.clone()));
        }
        println!(
            "{line} {:.1} | {ratio} | {llo:.1}–{lhi:.1} |",
            median(r.ultra.clone())
        );
    }
}

fn check(cmd: &mut Command, what: &str) -> Result<()> {
    let status = cmd
        .status()
        .with_context(|| format!("{what}: cannot start {cmd:?}"))?;
    if !status.success() {
        bail!("{what} failed ({status}): {cmd:?}");
    }
    Ok(())
}

fn on_path(tool: &str) -> bool {
    std::env::var_os("PATH")
        .is_some_and(|p| std::env::split_paths(&p).any(|d| d.join(tool).is_file()))
}

fn python() -> &'static str {
    if on_path("python3") {
        "python3"
    } else {
        "python"
    }
}

/// The cached `llama-bench`, built first if missing.
fn llama_bench(cache: &Path) -> Result<PathBuf> {
    let build = cache.join(format!("build-{LLAMA_CPP_PYTHON}"));
    let bin = build.join("bin").join("llama-bench");
    if bin.is_file() {
        eprintln!("llama-bench: cached {}", bin.display());
        return Ok(bin);
    }
    let sdist = cache.join(format!("llama_cpp_python-{LLAMA_CPP_PYTHON}.tar.gz"));
    if !sdist.is_file() {
        eprintln!("llama-bench: fetching the llama-cpp-python {LLAMA_CPP_PYTHON} sdist");
        // `--no-binary llama-cpp-python` (not `:all:`): the sdist itself, while pip's metadata
        // step may install its build requirements (cmake, ninja) as wheels instead of
        // compiling CMake from source.
        check(
            Command::new(python())
                .args(["-m", "pip", "download", "--no-deps", "--no-binary"])
                .arg("llama-cpp-python")
                .arg(format!("llama-cpp-python=={LLAMA_CPP_PYTHON}"))
                .arg("-d")
                .arg(cache),
            "pip download",
        )?;
    }
    let src_root = cache.join(format!("llama_cpp_python-{LLAMA_CPP_PYTHON}"));
    let src = src_root.join("vendor").join("llama.cpp");
    if !src.join("CMakeLists.txt").is_file() {
        check(
            Command::new("tar")
                .arg("xzf")
                .arg(&sdist)
                .arg("-C")
                .arg(cache),
            "unpacking the sdist",
        )?;
    }
    if !on_path("cmake") {
        eprintln!("llama-bench: no cmake on PATH, installing it with pip");
        check(
            Command::new(python()).args(["-m", "pip", "install", "cmake"]),
            "pip install cmake",
        )?;
    }
    let mut cfg = Command::new("cmake");
    cfg.arg("-S").arg(&src).arg("-B").arg(&build);
    if on_path("ninja") {
        cfg.args(["-G", "Ninja"]);
    }
    cfg.args([
        "-DCMAKE_BUILD_TYPE=Release",
        "-DGGML_NATIVE=ON",
        "-DBUILD_SHARED_LIBS=OFF",
        "-DLLAMA_BUILD_TESTS=OFF",
        "-DLLAMA_BUILD_EXAMPLES=OFF",
        "-DLLAMA_BUILD_SERVER=OFF",
        "-DLLAMA_BUILD_APP=OFF",
        "-DLLAMA_OPENSSL=OFF",
        "-DLLAMA_USE_PREBUILT_UI=OFF",
        "-DLLAMA_CURL=OFF",
    ]);
    check(&mut cfg, "cmake configure")?;
    let jobs = std::thread::available_parallelism().map_or(2, |n| n.get());
    check(
        Command::new("cmake")
            .arg("--build")
            .arg(&build)
            .args(["--target", "llama-bench", "-j"])
            .arg(jobs.to_string()),
        "building llama-bench",
    )?;
    if !bin.is_file() {
        bail!("the build did not produce {}", bin.display());
    }
    Ok(bin)
}

/// Builds `ultra` (release) and returns its path.
fn build_ultra(root: &Path) -> Result<PathBuf> {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    check(
        Command::new(cargo).current_dir(root).args([
            "build",
            "--release",
            "-p",
            "serve",
            "--bin",
            "ultra",
        ]),
        "cargo build --release -p serve --bin ultra",
    )?;
    let target = std::env::var_os("CARGO_TARGET_DIR").map_or(root.join("target"), PathBuf::from);
    Ok(target.join("release").join("ultra"))
}

/// The case's GGUF, written by this `ultra` binary (rewritten when the binary changed).
fn gguf_for(cache: &Path, ultra: &Path, case: &str) -> Result<PathBuf> {
    let dir = cache.join("models");
    std::fs::create_dir_all(&dir)?;
    let path = dir.join(format!("{case}-seed7.gguf"));
    let stamp_path = dir.join(format!("{case}-seed7.stamp"));
    let meta = std::fs::metadata(ultra).with_context(|| ultra.display().to_string())?;
    let mtime = meta
        .modified()?
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    let stamp = format!("{} {} {mtime}", ultra.display(), meta.len());
    if path.is_file() && std::fs::read_to_string(&stamp_path).ok().as_deref() == Some(&stamp) {
        return Ok(path);
    }
    check(
        Command::new(ultra)
            .args(["bench-shapes", "--case", case, "--gguf"])
            .arg(&path),
        "writing the GGUF",
    )?;
    std::fs::write(&stamp_path, stamp)?;
    Ok(path)
}

/// llama-bench's mean tokens/s of one test.
fn llama_rate(
    bin: &Path,
    wait: LlamaWait,
    gguf: &Path,
    tg: usize,
    pp: usize,
    t: usize,
    r: usize,
) -> Result<f64> {
    let mut cmd = Command::new(bin);
    if wait == LlamaWait::Passive {
        cmd.env("OMP_WAIT_POLICY", "passive");
    }
    let out = cmd
        .arg("-m")
        .arg(gguf)
        .args(["-p", &pp.to_string(), "-n", &tg.to_string()])
        .args([
            "-t",
            &t.to_string(),
            "-r",
            &r.max(1).to_string(),
            "-o",
            "json",
        ])
        .output()
        .with_context(|| format!("running {}", bin.display()))?;
    if !out.status.success() {
        bail!(
            "llama-bench failed ({}) on {}:\n{}",
            out.status,
            gguf.display(),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let v: Value = serde_json::from_slice(&out.stdout).with_context(|| {
        format!(
            "llama-bench printed no JSON:\n{}",
            String::from_utf8_lossy(&out.stdout)
        )
    })?;
    let test = v
        .as_array()
        .and_then(|a| a.first())
        .context("llama-bench printed an empty result")?;
    test["avg_ts"]
        .as_f64()
        .context("llama-bench's result has no avg_ts")
}

/// Ultra's median tokens/s of one test.
fn ultra_rate(bin: &Path, case: &str, tg: usize, pp: usize, t: usize, r: usize) -> Result<f64> {
    let out = Command::new(bin)
        .args(["bench-shapes", "--case", case])
        .args(["--tg", &tg.to_string(), "--pp", &pp.to_string()])
        .args([
            "--threads",
            &t.to_string(),
            "--repeats",
            &r.max(1).to_string(),
        ])
        .output()
        .with_context(|| format!("running {}", bin.display()))?;
    if !out.status.success() {
        bail!(
            "ultra bench-shapes failed ({}):\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let text = String::from_utf8_lossy(&out.stdout);
    let line = text
        .lines()
        .find(|l| l.starts_with('{'))
        .with_context(|| format!("ultra bench-shapes printed no JSON line:\n{text}"))?;
    let v: Value = serde_json::from_str(line)?;
    v["tok_s"]
        .as_f64()
        .with_context(|| format!("no tok_s in {line}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_and_variants() {
        assert_eq!(median(vec![3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(vec![4.0, 1.0, 2.0, 3.0]), 2.5);
        assert_eq!(LlamaWait::parse("omp-passive").unwrap(), LlamaWait::Passive);
        let e = LlamaWait::parse("spin").unwrap_err().to_string();
        assert!(e.contains("default or omp-passive"), "{e}");
    }
}
