//! DFlash round cost on the CPU: one draft forward + one target verify(B) against one target
//! decode step, for B = 2, 4, 8, 16, on the synthetic ~100M-parameter gpt-oss-style MoE
//! (`model::cpu::toy::synthetic_gpt_oss_100m`, MXFP4 experts) with a random 2-layer drafter.
//!
//! ```text
//! cargo run --release -p dflash --example round_cost
//! ```
//! The break-even acceptance length is round / decode: a drafter must average τ above it for
//! speculation to pay on this machine.
//!
//! ```text
//! cargo run --release -p dflash --example round_cost -- --model DIR --drafter DIR [--threads N] [--q8]
//! ```
//! measures a real checkpoint and its drafter instead (e.g. the embedded default model's cache
//! directories, `ultra generate` prints where it unpacked them), `--q8` with int8 expert
//! activations (the CLI's default).

use std::sync::Arc;
use std::time::Instant;

use dflash::target::Executor;
use dflash::toy::{drafter, ToyKind};
use model::cpu::toy::{random_weights, synthetic_gpt_oss_100m, ToyExperts};
use model::cpu::CpuModel;

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let arg = |name: &str| {
        args.iter()
            .position(|a| a == name)
            .and_then(|i| args.get(i + 1).cloned())
    };
    if let Some(t) = arg("--threads") {
        rayon::ThreadPoolBuilder::new()
            .num_threads(t.parse().expect("--threads N"))
            .build_global()
            .expect("thread pool");
    }
    let acts = if args.iter().any(|a| a == "--q8") {
        model::cpu::Activations::Q8
    } else {
        model::cpu::Activations::F32
    };
    let (cfg, model, d, what) = match (arg("--model"), arg("--drafter")) {
        (Some(m), Some(dd)) => {
            let (cfg, weights) = model::load::load(std::path::Path::new(&m)).expect("model");
            let model = CpuModel::new(Arc::new(cfg.clone()), Arc::new(weights)).expect("model");
            let d = dflash::Drafter::load(std::path::Path::new(&dd), &cfg).expect("drafter");
            (cfg, model, d, m)
        }
        _ => {
            let cfg = synthetic_gpt_oss_100m();
            let weights = random_weights(&cfg, 7, ToyExperts::Mxfp4);
            let model = CpuModel::new(Arc::new(cfg.clone()), Arc::new(weights)).expect("model");
            let d = drafter(&cfg, ToyKind::ZLab, 16, 3);
            (cfg, model, d, "synthetic gpt-oss-style MoE".to_string())
        }
    };
    let model = model.with_activations(acts);
    let layers = d.config().target_layer_ids.clone();
    let prompt: Vec<u32> = (2..66).collect();

    // Decode cost.
    let mut s = model.session();
    s.prefill(&prompt).expect("prefill");
    let mut t = Vec::new();
    for i in 0..64 {
        let t0 = Instant::now();
        s.decode(100 + i).expect("decode");
        t.push(t0.elapsed().as_secs_f64() * 1e3);
    }
    let decode_ms = median(t);

    // Context features of the prompt, then rounds at each block size.
    let mut s = model.session();
    let out = Executor::forward(&mut s, &prompt, &layers).expect("forward");
    let h = cfg.hidden_size;
    let mut features = Vec::with_capacity(prompt.len() * layers.len() * h);
    for row in 0..prompt.len() {
        for k in 0..layers.len() {
            features.extend_from_slice(&out.hidden[k][row]);
        }
    }
    let mut cache = d.new_cache();
    d.append_context(&mut cache, &features).expect("context");
    let w = model.weights();
    let base = s.len();
    println!(
        "CPU, {} threads, {acts:?} expert activations; {what}; decode step {decode_ms:.3} ms",
        rayon::current_num_threads()
    );
    println!("| B | draft ms | verify(B) ms | round ms | round / decode (break-even tau) |");
    println!("|---:|---:|---:|---:|---:|");
    let blocks: Vec<usize> = match arg("--block") {
        Some(b) => vec![b.parse().expect("--block N")],
        None => vec![2, 4, 8, 16],
    };
    let reps: usize = arg("--reps").map_or(15, |r| r.parse().expect("--reps N"));
    for b in blocks {
        let (mut td, mut tv) = (Vec::new(), Vec::new());
        for _ in 0..reps {
            let t0 = Instant::now();
            let logits = d
                .draft(&mut cache, &w.embed, &w.lm_head, 100, b)
                .expect("draft");
            td.push(t0.elapsed().as_secs_f64() * 1e3);
            let block: Vec<u32> = std::iter::once(100)
                .chain(logits.chunks(cfg.vocab_size).map(|r| {
                    r.iter()
                        .enumerate()
                        .max_by(|a, b| a.1.total_cmp(b.1))
                        .map_or(0, |(i, _)| i as u32)
                }))
                .collect();
            let t1 = Instant::now();
            Executor::forward(&mut s, &block, &layers).expect("verify");
            tv.push(t1.elapsed().as_secs_f64() * 1e3);
            Executor::truncate(&mut s, base).expect("truncate");
        }
        let (dm, vm) = (median(td), median(tv));
        println!(
            "| {b} | {dm:.3} | {vm:.3} | {:.3} | {:.2} |",
            dm + vm,
            (dm + vm) / decode_ms
        );
    }
}
