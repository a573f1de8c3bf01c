//! Speculative sequences on the GPU advanced together, as the server's scheduler advances them:
//! several `dflash::gpu::GpuSpecOn` states (target sessions sharing one batched pass, contiguous
//! and paged mixed, different prompt lengths) driven round by round through `SpecStream`s, every
//! round's verify blocks in ONE `SpecBackend::verify_batch` (`GpuBatch::forward_device`), then
//! acceptance, commit (the drafter context reads each session's captured hidden states, copied
//! into it by the batched pass) and emission per sequence. Each sequence's tokens must equal its
//! lone run (`run_speculative` on `GpuSpec`, a session of the same size) — greedy and seeded
//! sampling — on the fixture drafters with their targets and a toy drafter.
//!
//! Skipped without a GPU (fails with `ULTRA_REQUIRE_GPU=1`).

use std::ops::ControlFlow;
use std::path::PathBuf;
use std::sync::Arc;

use dflash::gpu::{GpuSpec, GpuSpecOn};
use dflash::toy::{self, ToyKind};
use dflash::{BlockPolicy, Drafter, SpecBackend, SpecOptions, SpecStream};
use model::config::ModelConfig;
use model::sampling::SamplingParams;
use tilert::draft::GpuDrafter;
use tilert::exec::{GpuModel, GpuSession};

const MAX_SEQ: usize = 256;

fn fixtures() -> PathBuf {
    std::env::var_os("ULTRA_FIXTURES")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../fixtures"))
}

/// The fixture drafters and their targets (`golden_draft.json`'s `target`).
fn pairs() -> Vec<(String, String)> {
    [
        "drafters/qwen3-moe-dflash",
        "drafters/gpt-oss-dflash",
        "drafters/mimo-dflash",
    ]
    .into_iter()
    .map(|name| {
        let golden = fixtures().join(name).join("golden_draft.json");
        let g: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&golden).unwrap()).unwrap();
        (name.to_string(), g["target"].as_str().unwrap().to_string())
    })
    .collect()
}

fn params(i: usize, max_tokens: usize) -> SamplingParams {
    let p = if i.is_multiple_of(2) {
        SamplingParams::greedy()
    } else {
        SamplingParams {
            temperature: 0.8,
            top_p: Some(0.9),
            seed: Some(100 + i as u64),
            ..SamplingParams::default()
        }
    };
    SamplingParams {
        max_tokens,
        ignore_eos: true,
        ..p
    }
}

fn prompt(i: usize, vocab: usize) -> Vec<u32> {
    (0..5 + 6 * i)
        .map(|j| ((j * 37 + 11 * i + 3) % vocab) as u32)
        .collect()
}

/// The lone run of sequence `i`.
fn alone(gpu: &GpuModel, gd: &GpuDrafter, opts: &SpecOptions, i: usize, n: usize) -> Vec<u32> {
    let v = gpu.config().vocab_size;
    let mut s = gpu.session(MAX_SEQ).unwrap();
    let mut spec = GpuSpec::new(&mut s, gd).unwrap();
    dflash::run_speculative(
        &mut spec,
        opts,
        &prompt(i, v),
        &params(i, n),
        &mut |_| ControlFlow::Continue(()),
        &mut |_| {},
    )
    .unwrap()
    .tokens
}

/// `n_seq` sequences advanced together (module docs); returns each one's tokens.
fn together(
    gpu: &GpuModel,
    gd: &GpuDrafter,
    opts: &SpecOptions,
    n_seq: usize,
    n: usize,
) -> Vec<Vec<u32>> {
    let v = gpu.config().vocab_size;
    let batch = gpu.shared_batch().unwrap();
    let pool = gpu.kv_pool(16, n_seq * MAX_SEQ.div_ceil(16) + 8).unwrap();
    let mut states: Vec<GpuSpecOn<GpuSession>> = (0..n_seq)
        .map(|i| {
            let mut s = if i % 2 == 1 {
                gpu.session_paged(&pool, MAX_SEQ).unwrap()
            } else {
                gpu.session(MAX_SEQ).unwrap()
            };
            s.share_batch(batch.clone()).unwrap();
            GpuSpecOn::new(s, gd).unwrap()
        })
        .collect();
    let mut streams: Vec<SpecStream> = (0..n_seq)
        .map(|i| {
            SpecStream::new(
                opts,
                BlockPolicy::Fixed,
                &prompt(i, v),
                &params(i, n),
                v,
                false,
            )
            .unwrap()
        })
        .collect();
    let mut out: Vec<Vec<u32>> = vec![Vec::new(); n_seq];
    for i in 0..n_seq {
        let rows = states[i]
            .prefill(&prompt(i, v), Some(streams[i].prefill_want()))
            .unwrap()
            .unwrap();
        let o = &mut out[i];
        streams[i]
            .start(&rows, &mut |t, _| {
                o.push(t);
                ControlFlow::Continue(())
            })
            .unwrap();
    }
    loop {
        let mut plans = Vec::new();
        for (i, s) in streams.iter_mut().enumerate() {
            if let Some(p) = s.plan().unwrap() {
                plans.push((i, p));
            }
        }
        if plans.is_empty() {
            break;
        }
        let mut blocks = Vec::new();
        for &(i, p) in &plans {
            let d = p
                .draft_block
                .map(|b| states[i].draft(p.x_last, b, p.want_draft).unwrap());
            blocks.push(streams[i].drafted(d).unwrap().to_vec());
        }
        let starts: Vec<usize> = plans.iter().map(|&(i, _)| states[i].len()).collect();
        let rows = {
            let who: Vec<usize> = plans.iter().map(|&(i, _)| i).collect();
            let mut refs: Vec<&mut GpuSpecOn<GpuSession>> = states
                .iter_mut()
                .enumerate()
                .filter(|(i, _)| who.contains(i))
                .map(|(_, s)| s)
                .collect();
            let toks: Vec<&[u32]> = blocks.iter().map(Vec::as_slice).collect();
            let wants: Vec<_> = plans.iter().map(|(_, p)| p.want_verify).collect();
            <GpuSpecOn<GpuSession> as SpecBackend>::verify_batch(&mut refs, &toks, &wants)
        };
        for ((&(i, _), r), start) in plans.iter().zip(rows).zip(starts) {
            let keep = streams[i].verified(start, r.unwrap(), &mut |_| {}).unwrap();
            states[i].commit(keep).unwrap();
            let o = &mut out[i];
            streams[i]
                .emit(&mut |t, _| {
                    o.push(t);
                    ControlFlow::Continue(())
                })
                .unwrap();
        }
    }
    out
}

fn check(name: &str, gpu: &GpuModel, d: &Drafter, block: usize) {
    let gd = GpuDrafter::new(gpu, d.config(), d.weights()).unwrap();
    let opts = SpecOptions {
        block_size: block,
        eos_token_ids: Vec::new(),
        prefill_chunk: None,
    };
    let n_seq = 5;
    let n = 30;
    let got = together(gpu, &gd, &opts, n_seq, n);
    for (i, g) in got.iter().enumerate() {
        assert_eq!(g.len(), n, "{name}: sequence {i}");
        let want = alone(gpu, &gd, &opts, i, n);
        assert_eq!(g, &want, "{name} B={block}: sequence {i} batched vs alone");
    }
}

fn gpu_model(c: ModelConfig, w: model::weights::Weights) -> GpuModel {
    GpuModel::new(0, Arc::new(c), &w).unwrap()
}

#[test]
fn speculative_sequences_verified_together_equal_their_lone_runs() {
    let Some(_ctx) = ultra_kernels::gpu_for_test(
        "speculative_sequences_verified_together_equal_their_lone_runs",
    ) else {
        return;
    };
    for (name, rel) in pairs() {
        let (c, w) = model::load::load(&fixtures().join(&rel)).unwrap();
        let d = Drafter::load(&fixtures().join(&name), &c).unwrap();
        let toy_d = toy::drafter(&c, ToyKind::ZLab, 8, 5);
        let gpu = gpu_model(c, w);
        for block in [4, 8] {
            check(&name, &gpu, &d, block);
        }
        check(&format!("{rel} toy drafter"), &gpu, &toy_d, 8);
    }
}
