//! # xtask — Ultra's build tasks (`cargo xtask ...`)
//!
//! Owns everything that is not plain `cargo build`:
//! * `cuda-setup`: a pinned CUDA 13.0 compiler from PyPI into the ignored folder `.cuda/`
//!   (or the existing `CUDA_HOME` / `nvcc` when it is release 13.0).
//! * `kernels [--check]`: `kernels/*.cu` (one file per op family; shared headers in
//!   `kernels/common/`) → `kernels/artifacts/NAME.sm_90a.cubin` + `NAME.compute_90.ptx`
//!   (committed, embedded by `crates/kernels`); `--check` rebuilds into a temporary folder and
//!   fails if any committed artifact differs (stale).
//! * `gpu-bundle`: builds the GPU programs (release: the test binaries that hold GPU tests, the
//!   benchmark programs and `ultra`), strips them and packs them into one xz-compressed tar in the
//!   ignored folder `gpu-bundle/` with `run.sh` (`ci/gpu-run.sh`), small enough to travel with the
//!   checkout to a GPU machine (the device tool: `carry ["gpu-bundle"]`), where
//!   `bash gpu-bundle/run.sh` runs them and prints a pass/fail + numbers table.
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
    /// Build the GPU programs (GPU test binaries, benchmarks, `ultra`) and stage them in
    /// gpu-bundle/ (or --out DIR): bundle.tar.xz + run.sh, to carry to a GPU machine.
    GpuBundle {
        /// Where to stage the bundle (default: gpu-bundle/ in the repository root).
        #[arg(long)]
        out: Option<PathBuf>,
        /// Pack fixtures/ and the default model's assets too (for a GPU machine without a
        /// checkout; by default run.sh reads them from the checkout the bundle sits in).
        #[arg(long)]
        self_contained: bool,
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
        Cmd::GpuBundle {
            out,
            self_contained,
        } => gpu_bundle(out, self_contained).map(|_| ()),
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

/// Every file the artifacts are built from: the `.cu` sources and the shared headers
/// (`kernels/*.cuh`, `kernels/common/*.cuh`), sorted by path.
fn kernel_inputs(kdir: &Path) -> Result<Vec<PathBuf>> {
    let mut v = Vec::new();
    for dir in [kdir.to_path_buf(), kdir.join("common")] {
        v.extend(
            fs::read_dir(&dir)
                .with_context(|| format!("reading {}", dir.display()))?
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| p.extension().is_some_and(|x| x == "cu" || x == "cuh")),
        );
    }
    v.sort();
    Ok(v)
}

/// Compiles every kernel into `out`, the nvcc runs spread over the machine's cores; returns
/// artifact file name → bytes.
fn build_kernels(nvcc: &Path, out: &Path) -> Result<BTreeMap<String, Vec<u8>>> {
    let kdir = root().join("kernels");
    fs::create_dir_all(out)?;
    let mut jobs = Vec::new();
    for src in kernel_sources(&kdir)? {
        let stem = src.file_stem().unwrap().to_string_lossy().into_owned();
        jobs.push((src.clone(), CUBIN_FLAGS, format!("{stem}.sm_90a.cubin")));
        jobs.push((src, PTX_FLAGS, format!("{stem}.compute_90.ptx")));
    }
    let next = std::sync::atomic::AtomicUsize::new(0);
    let workers = std::thread::available_parallelism().map_or(1, |n| n.get());
    let results = std::sync::Mutex::new(Vec::new());
    std::thread::scope(|scope| {
        for _ in 0..workers.min(jobs.len()) {
            scope.spawn(|| loop {
                let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let Some((src, flags, name)) = jobs.get(i) else {
                    break;
                };
                let dst = out.join(name);
                let r = Command::new(nvcc)
                    .args(*flags)
                    .arg("-I")
                    .arg(&kdir)
                    .arg("-o")
                    .arg(&dst)
                    .arg(src)
                    .status()
                    .with_context(|| format!("running {}", nvcc.display()))
                    .and_then(|status| {
                        if !status.success() {
                            bail!("nvcc failed on {} ({name})", src.display());
                        }
                        Ok(fs::read(&dst)?)
                    });
                results.lock().unwrap().push((name.clone(), r));
            });
        }
    });
    let mut built = BTreeMap::new();
    for (name, r) in results.into_inner().unwrap() {
        built.insert(name, r?);
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
    for p in kernel_inputs(&kdir)? {
        m += &format!(
            "source {} sha256 {}\n",
            p.strip_prefix(&kdir)?.to_string_lossy(),
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
        // Artifacts of sources that no longer exist (a renamed or split family).
        for e in fs::read_dir(&art)? {
            let e = e?;
            let name = e.file_name().to_string_lossy().into_owned();
            if name != "MANIFEST" && !built.contains_key(&name) {
                println!("removing {name}: no kernels/*.cu produces it");
                fs::remove_file(e.path())?;
            }
        }
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

/// The test binaries that hold GPU tests (package, test target): what the bundle runs. A test
/// file that calls `gpu_for_test` must be listed here (checked by this crate's tests).
const GPU_TESTS: &[(&str, &str)] = &[
    ("fp4", "gpu"),
    ("tilert", "ops"),
    ("tilert", "moe"),
    ("tilert", "exec"),
    ("tilert", "batch"),
    ("tilert", "batch_verify"),
    ("tilert", "executor"),
    ("tilert", "fp8"),
    ("tilert", "tp"),
    ("tilert", "persistent"),
    ("tilert", "paged_kv"),
    ("tilert", "paged_session"),
    ("tilert", "sample"),
    ("dflash", "gpu_spec"),
    ("dflash", "gpu_tp"),
    ("dflash", "gpu_accept"),
    ("dflash", "gpu_spec_batch"),
    ("serve", "gpu_generate"),
    ("serve", "gpu_serve"),
    ("serve", "gpu_serve_tp"),
    ("serve", "gpu_paged"),
    ("serve", "gpu_spec_sched"),
    ("comm", "gpu_allreduce"),
];

/// The device tool's limit on what one call carries: the checkout's files plus the bundle.
const CARRY_LIMIT: u64 = 64 << 20;

/// Runs cargo with JSON messages and returns (target name, executable) of the executables it
/// built for targets of `kind` ("test", "bin"): `cargo test` also builds the packages' binaries.
fn cargo_executables(args: &[&str], kind: &str) -> Result<Vec<(String, PathBuf)>> {
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
            let of_kind = msg["target"]["kind"]
                .as_array()
                .is_some_and(|k| k.iter().any(|k| k == kind));
            if let (true, Some(exe), Some(name)) = (
                of_kind,
                msg["executable"].as_str(),
                msg["target"]["name"].as_str(),
            ) {
                exes.push((name.to_string(), PathBuf::from(exe)));
            }
        }
    }
    Ok(exes)
}

fn bench(out: Option<PathBuf>) -> Result<()> {
    let bundle = gpu_bundle(out, false)?;
    let has_gpu = Command::new("nvidia-smi")
        .arg("-L")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !has_gpu {
        println!(
            "no GPU on this machine: run the benchmarks where there is one with `bash {}/run.sh \
             --bench-only` (see the command printed above)",
            rel_to_root(&bundle)
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

/// `p` relative to the repository root when it is inside it (as the device tool's `carry` wants).
fn rel_to_root(p: &Path) -> String {
    p.strip_prefix(root())
        .unwrap_or(p)
        .to_string_lossy()
        .into_owned()
}

/// Bytes of the files the device tool carries besides the bundle: the checkout's tracked and
/// untracked-but-not-ignored files. `None` when git cannot tell.
fn checkout_bytes() -> Option<u64> {
    let out = Command::new("git")
        .current_dir(root())
        .args([
            "ls-files",
            "-z",
            "--cached",
            "--others",
            "--exclude-standard",
        ])
        .output()
        .ok()?;
    if !out.status.success() {
        return None;
    }
    let mut total = 0;
    for f in out.stdout.split(|&b| b == 0).filter(|f| !f.is_empty()) {
        let path = root().join(String::from_utf8_lossy(f).as_ref());
        total += fs::symlink_metadata(path).map(|m| m.len()).unwrap_or(0);
    }
    Some(total)
}

fn mib(bytes: u64) -> f64 {
    bytes as f64 / (1u64 << 20) as f64
}

/// Builds the GPU programs (release) and stages them in `out` (default `gpu-bundle/`): one
/// xz-compressed tar of the GPU test binaries (`tests/`), the benchmark programs (`bin/`) and the
/// `ultra` binary, stripped, plus `run.sh`. The fixtures are read from the checkout the bundle
/// sits in (the device tool always carries it), or from the bundle with `self_contained`.
fn gpu_bundle(out: Option<PathBuf>, self_contained: bool) -> Result<PathBuf> {
    let bundle = out.unwrap_or_else(|| root().join("gpu-bundle"));
    let _ = fs::remove_dir_all(&bundle);
    let stage = bundle.join("stage");
    fs::create_dir_all(stage.join("tests"))?;
    fs::create_dir_all(stage.join("bin"))?;
    let mut args = vec![
        "test",
        "--release",
        "--no-run",
        "--features",
        "fp4/cuda,dflash/cuda",
    ];
    let mut packages: Vec<&str> = GPU_TESTS.iter().map(|(p, _)| *p).collect();
    packages.dedup();
    for p in &packages {
        args.extend(["-p", p]);
    }
    for (_, t) in GPU_TESTS {
        args.extend(["--test", t]);
    }
    let tests = cargo_executables(&args, "test")?;
    let bins = cargo_executables(
        &[
            "build",
            "--release",
            "-p",
            "ultra-benches",
            "-p",
            "serve",
            "--bins",
        ],
        "bin",
    )?;
    let mut staged = Vec::new();
    for (name, exe) in &tests {
        staged.push((exe.clone(), stage.join("tests").join(name)));
    }
    for (name, exe) in &bins {
        let dst = if name == "ultra" {
            stage.join("ultra")
        } else {
            stage.join("bin").join(name)
        };
        staged.push((exe.clone(), dst));
    }
    let strip = Command::new("strip")
        .arg("--version")
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    let mut raw = 0u64;
    for (src, dst) in &staged {
        fs::copy(src, dst).with_context(|| format!("copying {}", src.display()))?;
        if strip {
            let ok = Command::new("strip")
                .arg("--strip-all")
                .arg(dst)
                .status()
                .is_ok_and(|s| s.success());
            if !ok {
                bail!("strip --strip-all {} failed", dst.display());
            }
        }
        raw += fs::metadata(dst)?.len();
    }
    // `ultra` embeds the default model's assets (~24 MB of weights that xz cannot shrink) and every
    // binary embeds the kernel images (~18 MB); the checkout the bundle travels with holds the same
    // files, so the bundle ships the binaries with those bytes zeroed and run.sh copies them back
    // from the checkout (each binary checked by SHA-256).
    let embedded = embedded_files()?;
    let mut holes = String::new();
    for (_, dst) in &staged {
        holes += &punch_holes(&stage, &rel_to(&stage, dst)?, &embedded)?;
    }
    fs::write(stage.join("holes.txt"), &holes)?;
    if self_contained {
        for (from, to) in [
            ("fixtures", "fixtures"),
            ("crates/default-model/assets", "crates/default-model/assets"),
            ("kernels/artifacts", "kernels/artifacts"),
        ] {
            let status = Command::new("cp")
                .arg("-a")
                .arg(root().join(from))
                .arg(stage.join(to))
                .status()?;
            if !status.success() {
                bail!("copying {from} into the bundle failed");
            }
        }
    }
    // One solid archive: the binaries share their embedded kernel images (and the serve ones the
    // default model), which xz's 64 MiB window stores once. Binaries linking the same crates sit
    // next to each other.
    let mut members: Vec<String> = staged
        .iter()
        .map(|(_, d)| rel_to(&stage, d))
        .collect::<Result<_>>()?;
    members.sort_by_key(|m| (!m.contains("gpu_") && m != "ultra", m.clone()));
    members.push("holes.txt".into());
    if self_contained {
        members.extend(["fixtures".into(), "crates".into()]);
    }
    let archive = bundle.join("bundle.tar.xz");
    let tar = Command::new("tar")
        .arg("-cf")
        .arg("-")
        .arg("-C")
        .arg(&stage)
        .args(&members)
        .stdout(Stdio::piped())
        .spawn()
        .context("running tar")?;
    let status = Command::new("xz")
        // A window over the whole input, so every binary's copy of the kernel images and of the
        // shared crates is matched against the first one (≈ 6 MB instead of ≈ 40 MB).
        .args(["-9", "-T1", "--lzma2=preset=9,dict=192MiB", "-c"])
        .stdin(tar.stdout.context("tar's stdout")?)
        .stdout(fs::File::create(&archive)?)
        .status()
        .context("running xz (install xz-utils)")?;
    if !status.success() {
        bail!("xz failed");
    }
    fs::remove_dir_all(&stage)?;
    fs::copy(root().join("ci/gpu-run.sh"), bundle.join("run.sh"))?;
    // The checkout's PTX (≈ 15 MB raw, ≈ 1.4 MB xz; unused on sm_90 GPUs, where the cubins load)
    // need not travel raw: ptx.tar.xz carries them and run.sh puts them back before restoring the
    // binaries' holes.
    let ptx: Vec<PathBuf> = fs::read_dir(root().join("kernels/artifacts"))?
        .map(|e| e.map(|e| e.path()))
        .collect::<std::io::Result<Vec<_>>>()?
        .into_iter()
        .filter(|p| p.extension().is_some_and(|x| x == "ptx"))
        .collect();
    let ptx_raw: u64 = ptx
        .iter()
        .map(|p| fs::metadata(p).map(|m| m.len()))
        .sum::<std::io::Result<u64>>()?;
    let status = Command::new("tar")
        .arg("-cJf")
        .arg(bundle.join("ptx.tar.xz"))
        .arg("-C")
        .arg(root())
        .args(ptx.iter().map(|p| rel_to_root(p)))
        .status()
        .context("running tar")?;
    if !status.success() {
        bail!("packing kernels/artifacts/*.ptx failed");
    }
    let size = fs::metadata(&archive)?.len()
        + fs::metadata(bundle.join("run.sh"))?.len()
        + fs::metadata(bundle.join("ptx.tar.xz"))?.len();
    let rel = rel_to_root(&bundle);
    println!(
        "{}: {} test binaries, {} programs ({}), {:.1} MiB stripped -> {:.1} MiB xz{}",
        bundle.display(),
        tests.len(),
        bins.len(),
        bins.iter()
            .map(|(n, _)| n.as_str())
            .collect::<Vec<_>>()
            .join(", "),
        mib(raw),
        mib(size),
        if self_contained {
            ", with fixtures/ and the default model's assets"
        } else {
            "; fixtures are read from the checkout it is carried in"
        }
    );
    match checkout_bytes() {
        Some(tree) => {
            let carried = tree.saturating_sub(ptx_raw) + size;
            println!(
                "the device tool carries the checkout without its PTX ({:.1} MiB) + the bundle = {:.1} MiB of its {} MiB",
                mib(tree.saturating_sub(ptx_raw)),
                mib(carried),
                CARRY_LIMIT >> 20
            );
            if carried > CARRY_LIMIT {
                bail!(
                    "checkout + bundle = {:.1} MiB: over the device tool's {} MiB carry limit",
                    mib(carried),
                    CARRY_LIMIT >> 20
                );
            }
            println!(
                "before each device call move the PTX out of the checkout ({:.1} MiB; run.sh restores them from ptx.tar.xz), after it move them back:",
                mib(ptx_raw)
            );
            println!(
                "  mkdir -p /tmp/ultra-ptx && mv kernels/artifacts/*.ptx /tmp/ultra-ptx/    # after: mv /tmp/ultra-ptx/*.ptx kernels/artifacts/"
            );
        }
        None => println!("(not a git checkout: the carry size of the checkout is unknown)"),
    }
    println!("run on the GPU machine, from the repository root (device tool: carry [\"{rel}\"]):");
    println!("  bash {rel}/run.sh            # GPU tests, the ultra smoke run, benchmarks: pass/fail table");
    println!("  bash {rel}/run.sh --tests-only | --bench-only    ONLY=regex bash {rel}/run.sh");
    Ok(bundle)
}

/// The files a bundled binary may embed byte for byte and the checkout also holds: the default
/// model's assets (`crates/default-model/assets/**`) and the kernel images (`kernels/artifacts/*`),
/// as (path relative to the checkout, bytes). Files under 64 KiB are left out (not worth a hole).
fn embedded_files() -> Result<Vec<(String, Vec<u8>)>> {
    let mut files = Vec::new();
    let mut dirs = vec![
        root().join("crates/default-model/assets"),
        root().join("kernels/artifacts"),
    ];
    while let Some(d) = dirs.pop() {
        for e in fs::read_dir(&d).with_context(|| format!("reading {}", d.display()))? {
            let p = e?.path();
            if p.is_dir() {
                dirs.push(p);
            } else if fs::metadata(&p)?.len() >= 64 << 10 {
                let rel = p.strip_prefix(root())?.to_string_lossy().into_owned();
                files.push((rel, fs::read(&p)?));
            }
        }
    }
    files.sort();
    Ok(files)
}

/// Zeroes, in the staged binary `stage/name`, every file of `embedded` it holds byte for byte and
/// returns its lines of `holes.txt`: `sha256 <hex of the original binary> <name>`, then
/// `hole <name> <offset> <length> <path relative to the checkout>` per file (nothing when the
/// binary embeds none of them).
fn punch_holes(stage: &Path, name: &str, embedded: &[(String, Vec<u8>)]) -> Result<String> {
    let bin_path = stage.join(name);
    let mut bin = fs::read(&bin_path).with_context(|| format!("reading {}", bin_path.display()))?;
    let mut out = format!("sha256 {} {name}\n", sha256_hex(&bin));
    let mut punched = false;
    for (rel, bytes) in embedded {
        let Some(off) = memchr::memmem::find(&bin, bytes) else {
            continue;
        };
        bin[off..off + bytes.len()].fill(0);
        out += &format!("hole {name} {off} {} {rel}\n", bytes.len());
        punched = true;
    }
    if !punched {
        return Ok(String::new());
    }
    fs::write(&bin_path, &bin)?;
    Ok(out)
}

/// `p` relative to `base`, as a string (paths inside the staging folder).
fn rel_to(base: &Path, p: &Path) -> Result<String> {
    Ok(p.strip_prefix(base)?.to_string_lossy().into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every test file that uses a GPU is in the bundle, and every bundled test exists.
    #[test]
    fn bundle_lists_every_gpu_test() {
        for (pkg, test) in GPU_TESTS {
            let dir = root().join("crates").join(pkg);
            assert!(
                dir.join("tests").join(format!("{test}.rs")).is_file(),
                "{pkg}/tests/{test}.rs"
            );
        }
        for krate in fs::read_dir(root().join("crates")).unwrap() {
            let krate = krate.unwrap().path();
            let Ok(files) = fs::read_dir(krate.join("tests")) else {
                continue;
            };
            for f in files {
                let f = f.unwrap().path();
                if f.extension().is_none_or(|x| x != "rs") {
                    continue;
                }
                let text = fs::read_to_string(&f).unwrap();
                if text.contains("gpu_for_test(") {
                    let pkg = krate.file_name().unwrap().to_string_lossy().into_owned();
                    let test = f.file_stem().unwrap().to_string_lossy().into_owned();
                    assert!(
                        GPU_TESTS.contains(&(pkg.as_str(), test.as_str())),
                        "{} runs GPU tests but is not in GPU_TESTS (the GPU bundle)",
                        f.display()
                    );
                }
            }
        }
    }
}
