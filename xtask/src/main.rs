//! # xtask — Ultra's build tasks (`cargo xtask ...`)
//!
//! Owns everything that is not plain `cargo build`:
//! * `cuda-setup`: a pinned CUDA 13.0 compiler from PyPI into the ignored folder `.cuda/`
//!   (or the existing `CUDA_HOME` / `nvcc` when it is release 13.0).
//! * `kernels [--check]`: `kernels/*.cu` → `kernels/artifacts/NAME.sm_90a.cubin` +
//!   `NAME.compute_90.ptx` (committed, embedded by `crates/kernels`); `--check` rebuilds into a
//!   temporary folder and fails if any committed artifact differs (stale).
//! * `gpu-bundle`: builds the GPU test and benchmark binaries (release) and stages them, with the
//!   kernel artifacts and `run.sh`, in the ignored folder `gpu-bundle/`, to be carried to a GPU
//!   machine and run there with `bash gpu-bundle/run.sh` (prints a pass/fail + numbers table).
//! * `bench-cpu`: Ultra's CPU executor side by side with llama.cpp (built from source) on
//!   random-weight gpt-oss models of the same shapes ([`bench_cpu`]).

mod bench_cpu;

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};
use sha2::{Digest, Sha256};

/// The pinned compiler: PTX from this nvcc is ISA 9.0, which the CUDA 13.0 driver accepts. Without
/// the nvvm pin pip resolves a newer NVVM whose PTX is ISA 9.5, which that driver rejects.
const PINNED_WHEELS: &[&str] = &[
    "nvidia-cuda-nvcc==13.0.88",
    "nvidia-cuda-runtime==13.0.*",
    "nvidia-cuda-crt==13.0.*",
    "nvidia-cuda-cccl==13.0.*",
    "nvidia-nvvm==13.0.*",
];
const REQUIRED_RELEASE: &str = "release 13.0, V13.0.88";
const CUBIN_FLAGS: &[&str] = &[
    "-cubin",
    "-gencode=arch=compute_90a,code=sm_90a",
    "-O3",
    "-std=c++17",
];
const PTX_FLAGS: &[&str] = &[
    "-ptx",
    "-gencode=arch=compute_90,code=compute_90",
    "-O3",
    "-std=c++17",
];

#[derive(Parser)]
#[command(name = "cargo xtask", about = "Ultra build tasks")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Install the pinned CUDA 13.0 compiler into .cuda/ (skipped when CUDA_HOME or PATH has
    /// nvcc release 13.0.88, unless --force).
    CudaSetup {
        #[arg(long)]
        force: bool,
    },
    /// Compile kernels/*.cu into kernels/artifacts (sm_90a cubin + compute_90 PTX).
    Kernels {
        /// Rebuild into a temporary folder and fail if the committed artifacts differ.
        #[arg(long)]
        check: bool,
    },
    /// Build the GPU bundle and run its benchmarks (gpu-decode: gpt-oss-20b-size decode, roofline,
    /// per-op breakdown, verify steps, fixtures; gpu-mxfp4) here when a GPU is present; else say
    /// how to run the bundle on a GPU machine.
    Bench {
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// CPU decode (tgN) and prompt (ppN) tokens/s of Ultra and of llama.cpp's llama-bench (built
    /// from the pinned llama-cpp-python sdist into target/llama.cpp/), alternating, on the same
    /// random gpt-oss models; prints a table with Ultra / llama.cpp.
    BenchCpu {
        /// Cases: synthetic-moe, default-shape, gpt-oss-layers.
        #[arg(
            long,
            value_delimiter = ',',
            default_value = "synthetic-moe,default-shape,gpt-oss-layers"
        )]
        cases: Vec<String>,
        /// Thread counts for decode; prompt processing runs at the largest.
        #[arg(long, value_delimiter = ',', default_value = "1,2")]
        threads: Vec<usize>,
        /// Decode steps (tgN; 0 skips decode).
        #[arg(long, default_value_t = 128)]
        tg: usize,
        /// Prompt tokens (ppN; 0 skips prompt processing).
        #[arg(long, default_value_t = 512)]
        pp: usize,
        /// Runs inside each tool per measurement.
        #[arg(long, default_value_t = 3)]
        repeats: usize,
        /// Alternating llama.cpp / Ultra rounds per measurement.
        #[arg(long, default_value_t = 2)]
        rounds: usize,
        /// llama.cpp variants, one column each: default (spin-waiting threads), omp-passive
        /// (OMP_WAIT_POLICY=passive; for cores shared with other work).
        #[arg(long, value_delimiter = ',', default_value = "default")]
        llama: Vec<String>,
    },
    /// Build the GPU test + bench binaries and stage them in gpu-bundle/ (or --out DIR) with run.sh.
    GpuBundle {
        /// Where to stage the bundle (default: gpu-bundle/ in the repository root).
        #[arg(long)]
        out: Option<PathBuf>,
    },
}

fn main() -> Result<()> {
    match Cli::parse().cmd {
        Cmd::CudaSetup { force } => {
            let nvcc = cuda_setup(force)?;
            println!("nvcc: {}", nvcc.display());
            println!("{}", nvcc_version(&nvcc)?.trim());
            Ok(())
        }
        Cmd::Kernels { check } => kernels(check),
        Cmd::GpuBundle { out } => gpu_bundle(out).map(|_| ()),
        Cmd::Bench { out } => bench(out),
        Cmd::BenchCpu {
            cases,
            threads,
            tg,
            pp,
            repeats,
            rounds,
            llama,
        } => bench_cpu::run(
            &root(),
            &bench_cpu::Options {
                cases,
                threads,
                tg,
                pp,
                repeats,
                rounds,
                llama: llama
                    .iter()
                    .map(|s| bench_cpu::LlamaWait::parse(s))
                    .collect::<Result<_>>()?,
            },
        ),
    }
}

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives one level below the workspace root")
        .to_path_buf()
}

fn local_nvcc() -> PathBuf {
    root().join(".cuda/site/nvidia/cu13/bin/nvcc")
}

fn nvcc_version(nvcc: &Path) -> Result<String> {
    let out = Command::new(nvcc)
        .arg("--version")
        .output()
        .with_context(|| format!("running {} --version", nvcc.display()))?;
    if !out.status.success() {
        bail!("{} --version failed", nvcc.display());
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// nvcc candidates in order of preference: CUDA_HOME, PATH, the pinned local install.
fn nvcc_candidates() -> Vec<PathBuf> {
    let mut c = Vec::new();
    if let Some(home) = std::env::var_os("CUDA_HOME") {
        c.push(PathBuf::from(home).join("bin/nvcc"));
    }
    if let Some(path) = std::env::var_os("PATH") {
        c.extend(std::env::split_paths(&path).map(|d| d.join("nvcc")));
    }
    c.push(local_nvcc());
    c
}

/// The first nvcc of the pinned release, if any.
fn find_nvcc() -> Option<PathBuf> {
    nvcc_candidates().into_iter().find(|p| {
        p.is_file()
            && nvcc_version(p)
                .map(|v| v.contains(REQUIRED_RELEASE))
                .unwrap_or(false)
    })
}

fn cuda_setup(force: bool) -> Result<PathBuf> {
    if !force {
        if let Some(nvcc) = find_nvcc() {
            return Ok(nvcc);
        }
    }
    let site = root().join(".cuda/site");
    let _ = fs::remove_dir_all(&site);
    fs::create_dir_all(&site)?;
    let python = std::env::var("PYTHON").unwrap_or_else(|_| "python3".into());
    eprintln!(
        "installing the pinned CUDA compiler into {}",
        site.display()
    );
    let status = Command::new(&python)
        .args([
            "-m",
            "pip",
            "install",
            "--quiet",
            "--disable-pip-version-check",
        ])
        .arg("--target")
        .arg(&site)
        .args(PINNED_WHEELS)
        .status()
        .with_context(|| format!("running {python} -m pip"))?;
    if !status.success() {
        bail!("pip install of {PINNED_WHEELS:?} failed");
    }
    let nvcc = local_nvcc();
    let v = nvcc_version(&nvcc)?;
    if !v.contains(REQUIRED_RELEASE) {
        bail!("installed nvcc is not {REQUIRED_RELEASE}: {v}");
    }
    Ok(nvcc)
}

fn kernel_sources(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut v: Vec<PathBuf> = fs::read_dir(dir)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "cu"))
        .collect();
    v.sort();
    Ok(v)
}

/// Compiles every kernel into `out`; returns artifact file name → bytes.
fn build_kernels(nvcc: &Path, out: &Path) -> Result<BTreeMap<String, Vec<u8>>> {
    let kdir = root().join("kernels");
    fs::create_dir_all(out)?;
    let mut built = BTreeMap::new();
    for src in kernel_sources(&kdir)? {
        let stem = src.file_stem().unwrap().to_string_lossy().into_owned();
        for (flags, name) in [
            (CUBIN_FLAGS, format!("{stem}.sm_90a.cubin")),
            (PTX_FLAGS, format!("{stem}.compute_90.ptx")),
        ] {
            let dst = out.join(&name);
            let status = Command::new(nvcc)
                .args(flags)
                .arg("-I")
                .arg(&kdir)
                .arg("-o")
                .arg(&dst)
                .arg(&src)
                .status()
                .with_context(|| format!("running {}", nvcc.display()))?;
            if !status.success() {
                bail!("nvcc failed on {}", src.display());
            }
            built.insert(name, fs::read(&dst)?);
        }
    }
    Ok(built)
}

fn sha256_hex(bytes: &[u8]) -> String {
    Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// MANIFEST: compiler, flags, and the hash of every source and artifact (for humans and review).
fn manifest(version: &str, built: &BTreeMap<String, Vec<u8>>) -> Result<String> {
    let kdir = root().join("kernels");
    let mut m = String::from(
        "# generated by `cargo xtask kernels`; checked by `cargo xtask kernels --check`\n",
    );
    let release = version
        .lines()
        .find(|l| l.contains("release"))
        .unwrap_or("unknown")
        .trim();
    m += &format!("compiler: nvcc {release}\n");
    m += &format!("cubin flags: {}\n", CUBIN_FLAGS.join(" "));
    m += &format!("ptx flags: {}\n", PTX_FLAGS.join(" "));
    let mut inputs: Vec<PathBuf> = fs::read_dir(&kdir)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "cu" || x == "cuh"))
        .collect();
    inputs.sort();
    for p in inputs {
        m += &format!(
            "source {} sha256 {}\n",
            p.file_name().unwrap().to_string_lossy(),
            sha256_hex(&fs::read(&p)?)
        );
    }
    for (name, bytes) in built {
        m += &format!("artifact {name} sha256 {}\n", sha256_hex(bytes));
    }
    Ok(m)
}

fn kernels(check: bool) -> Result<()> {
    let nvcc = find_nvcc().with_context(|| {
        format!("no nvcc {REQUIRED_RELEASE} found (CUDA_HOME, PATH, .cuda/): run `cargo xtask cuda-setup`")
    })?;
    let version = nvcc_version(&nvcc)?;
    let art = root().join("kernels/artifacts");
    if !check {
        let built = build_kernels(&nvcc, &art)?;
        fs::write(art.join("MANIFEST"), manifest(&version, &built)?)?;
        for (name, bytes) in &built {
            println!("{name:40} {:>8} bytes", bytes.len());
        }
        return Ok(());
    }
    let tmp = std::env::temp_dir().join(format!("ultra-kernels-check-{}", std::process::id()));
    let built = build_kernels(&nvcc, &tmp)?;
    let _ = fs::remove_dir_all(&tmp);
    let mut stale = Vec::new();
    for (name, bytes) in &built {
        match fs::read(art.join(name)) {
            Ok(committed) if &committed == bytes => {}
            Ok(_) => stale.push(format!("{name}: differs from a fresh build")),
            Err(_) => stale.push(format!("{name}: missing")),
        }
    }
    for e in fs::read_dir(&art)? {
        let name = e?.file_name().to_string_lossy().into_owned();
        if name != "MANIFEST" && !built.contains_key(&name) {
            stale.push(format!("{name}: no kernels/*.cu produces it"));
        }
    }
    match fs::read_to_string(art.join("MANIFEST")) {
        Ok(m) if m == manifest(&version, &built)? => {}
        _ => stale.push("MANIFEST: out of date".into()),
    }
    if !stale.is_empty() {
        bail!(
            "kernel artifacts are stale (run `cargo xtask kernels` and commit):\n  {}",
            stale.join("\n  ")
        );
    }
    println!("kernel artifacts up to date ({} files)", built.len());
    Ok(())
}

/// Runs cargo with JSON messages and returns the executables it built.
fn cargo_executables(args: &[&str]) -> Result<Vec<PathBuf>> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let out = Command::new(cargo)
        .current_dir(root())
        .args(args)
        .arg("--message-format=json-render-diagnostics")
        .stderr(Stdio::inherit())
        .output()?;
    if !out.status.success() {
        bail!("cargo {} failed", args.join(" "));
    }
    let mut exes = Vec::new();
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let Ok(msg) = serde_json::from_str::<serde_json::Value>(line) else {
            continue;
        };
        if msg["reason"] == "compiler-artifact" {
            if let Some(exe) = msg["executable"].as_str() {
                exes.push(PathBuf::from(exe));
            }
        }
    }
    Ok(exes)
}

fn bench(out: Option<PathBuf>) -> Result<()> {
    let bundle = gpu_bundle(out)?;
    let has_gpu = Command::new("nvidia-smi")
        .arg("-L")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !has_gpu {
        println!(
            "no GPU on this machine: carry {} to a GPU machine and run `bash {}/run.sh --bench-only` \
             from the repository root (the table is printed last; results go to $OUT or gpu-results/)",
            bundle.display(),
            bundle.file_name().unwrap().to_string_lossy()
        );
        return Ok(());
    }
    let status = Command::new("bash")
        .arg(bundle.join("run.sh"))
        .arg("--bench-only")
        .current_dir(root())
        .status()?;
    if !status.success() {
        bail!("benchmarks failed");
    }
    Ok(())
}

fn gpu_bundle(out: Option<PathBuf>) -> Result<PathBuf> {
    let bundle = out.unwrap_or_else(|| root().join("gpu-bundle"));
    let _ = fs::remove_dir_all(&bundle);
    fs::create_dir_all(bundle.join("tests"))?;
    fs::create_dir_all(bundle.join("bin"))?;
    let tests = cargo_executables(&[
        "test",
        "--release",
        "--no-run",
        "-p",
        "fp4",
        "--features",
        "cuda",
        "--test",
        "gpu",
        "-p",
        "ultra-kernels",
        "--lib",
        "-p",
        "tilert",
        "--tests",
        "-p",
        "serve",
        "--test",
        "gpu_generate",
        "--test",
        "gpu_serve",
    ])?;
    let bins = cargo_executables(&["build", "--release", "-p", "ultra-benches", "--bins"])?;
    let mut total = 0u64;
    for (exes, sub) in [(&tests, "tests"), (&bins, "bin")] {
        for exe in exes {
            let name = exe.file_name().unwrap().to_string_lossy();
            // test executables are named NAME-HASH; keep NAME for the table.
            let short = match (sub, name.rsplit_once('-')) {
                ("tests", Some((n, _))) => n.to_string(),
                _ => name.to_string(),
            };
            let dst = bundle.join(sub).join(&short);
            fs::copy(exe, &dst)?;
            total += fs::metadata(&dst)?.len();
        }
    }
    let art = bundle.join("kernels");
    fs::create_dir_all(&art)?;
    for e in fs::read_dir(root().join("kernels/artifacts"))? {
        let p = e?.path();
        fs::copy(&p, art.join(p.file_name().unwrap()))?;
        total += fs::metadata(&p)?.len();
    }
    fs::copy(root().join("ci/gpu-run.sh"), bundle.join("run.sh"))?;
    println!(
        "{}: {} test binaries, {} bench binaries, {:.1} MiB; run there with `bash gpu-bundle/run.sh`",
        bundle.display(),
        tests.len(),
        bins.len(),
        total as f64 / (1 << 20) as f64
    );
    if total > 60 << 20 {
        bail!("bundle is {total} bytes: over the 64 MiB carry limit");
    }
    Ok(bundle)
}
