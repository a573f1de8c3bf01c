//! DFlash on the GPU (`tilert::draft`'s drafter, the loop's backend `dflash::gpu`) against the
//! CPU drafter (`dflash::Drafter`) and plain GPU
//! decoding, on the fixture drafters `fixtures/drafters/*` with their targets (z-lab full
//! attention on Qwen3-MoE, z-lab causal sliding window 6 on gpt-oss, MiMo all-SWA window 3
//! non-causal with sinks / value scale / partial RoPE / mask embedding on MiMo-V2-Flash; the
//! MiMo-V2.5 drafter in its released layout — `dflash_draft_model.safetensors` + index,
//! `mask_embedding.pt` — on the FP8 / MXFP4 `mimo_v2` target `fixtures/mimo-v2/fp4`) and
//! `dflash::toy` drafters of every shape.
//!
//! Tolerances: the target's hidden states already differ from the CPU's by the executor's
//! dense-path error (≤ 1e-3·(1 + max), observed ~1e-5, see tests/exec.rs); the drafter adds the
//! same kind of f32 summation-order differences, so draft logits must agree within
//! 2e-3·(1 + max|logit|). Greedy speculative output must equal plain GPU greedy decoding token
//! for token (the verify rows and the decode steps are the same GPU math; the drafter only
//! changes which rows are computed together).

use std::ops::ControlFlow;
use std::path::PathBuf;
use std::sync::Arc;

use dflash::gpu::GpuSpec;
use dflash::target::Executor;
use dflash::toy::{self, ToyKind};
use dflash::{Drafter, SpecOptions};
use model::cpu::CpuModel;
use model::sampling::SamplingParams;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha20Rng;
use tilert::arena::dtoh;
use tilert::draft::GpuDrafter;
use tilert::exec::{GpuModel, GpuSession};

/// `$ULTRA_FIXTURES` if set (a GPU bundle run elsewhere), else the repository's `fixtures/`.
fn fixtures() -> PathBuf {
    std::env::var_os("ULTRA_FIXTURES")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../fixtures"))
}

/// The fixture drafters (directories relative to `fixtures/`) and their targets
/// (`golden_draft.json`'s `target`): the z-lab-shaped ones of `drafters/`, and the MiMo-V2.5
/// drafter in its released layout next to the tiny `mimo_v2` target (`mimo-v2/dflash`).
fn pairs() -> Vec<(String, String)> {
    let mut out = Vec::new();
    for name in [
        "drafters/qwen3-moe-dflash",
        "drafters/gpt-oss-dflash",
        "drafters/mimo-dflash",
        "mimo-v2/dflash",
    ] {
        let golden = fixtures().join(name).join("golden_draft.json");
        let g: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&golden).unwrap()).unwrap();
        out.push((name.to_string(), g["target"].as_str().unwrap().to_string()));
    }
    out
}

struct Loaded {
    cpu: CpuModel,
    gpu: GpuModel,
}

fn load(rel: &str) -> Loaded {
    let (c, w) = model::load::load(&fixtures().join(rel)).unwrap();
    let (c, w) = (Arc::new(c), Arc::new(w));
    Loaded {
        gpu: GpuModel::new(0, c.clone(), &w).unwrap(),
        cpu: CpuModel::new(c, w).unwrap(),
    }
}

fn rng(test: &str) -> ChaCha20Rng {
    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64;
    eprintln!("{test}: seed {seed}");
    ChaCha20Rng::seed_from_u64(seed)
}

fn features(o: &model::cpu::VerifyOutput, rows: usize) -> Vec<f32> {
    (0..rows)
        .flat_map(|j| o.hidden.iter().flat_map(move |h| h[j].iter().copied()))
        .collect()
}

fn max_err(a: &[f32], b: &[f32]) -> (f32, f32) {
    assert_eq!(a.len(), b.len());
    let mut err = 0f32;
    let mut mag = 0f32;
    for (x, y) in a.iter().zip(b) {
        assert!(x.is_finite(), "non-finite GPU value {x}");
        err = err.max((x - y).abs());
        mag = mag.max(y.abs());
    }
    (err, mag)
}

fn argmax(v: &[f32]) -> u32 {
    let max = v.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    v.iter().position(|&x| x == max).unwrap() as u32
}

/// Plain greedy decoding on the GPU: `n` tokens after `prompt`.
fn plain_greedy(gpu: &GpuModel, prompt: &[u32], n: usize) -> Vec<u32> {
    let mut s = gpu.session(256).unwrap();
    let mut out = vec![s.prefill_greedy(prompt).unwrap()];
    while out.len() < n {
        out.push(s.decode_greedy(*out.last().unwrap()).unwrap());
    }
    out
}

fn greedy(max_tokens: usize) -> SamplingParams {
    SamplingParams {
        max_tokens,
        ignore_eos: true,
        ..SamplingParams::greedy()
    }
}

/// Draft logits of the GPU drafter against the CPU drafter on the same committed context: after
/// a 20-token prompt (two context appends), for B = 2, 4, 8, 16 (rows beyond the MiMo fixture's
/// window 3 take the short-window path), then again after a verify block of which 3 tokens are
/// committed (context at positions after a truncation).
#[test]
fn draft_logits_match_cpu() {
    let Some(_ctx) = ultra_kernels::gpu_for_test("draft_logits_match_cpu") else {
        return;
    };
    let mut r = rng("draft_logits_match_cpu");
    for (name, rel) in pairs() {
        let m = load(&rel);
        let v = m.cpu.config().vocab_size;
        let d = Drafter::load(&fixtures().join(&name), m.cpu.config()).unwrap();
        let gd = GpuDrafter::new(&m.gpu, d.config(), d.weights()).unwrap();
        let layers = d.config().target_layer_ids.clone();
        let prompt: Vec<u32> = (0..20).map(|_| r.random_range(0..v as u32)).collect();

        let mut cs = m.cpu.session();
        let out = Executor::forward(&mut cs, &prompt, &layers).unwrap();
        let mut cache = d.new_cache();
        d.append_context(&mut cache, &features(&out, prompt.len()))
            .unwrap();
        let mut gs = m.gpu.session(256).unwrap();
        gs.set_capture(gd.hidden_indices()).unwrap();
        let mut ds = gd.session(256).unwrap();
        for chunk in prompt.chunks(16) {
            gs.forward_device(chunk).unwrap();
            ds.append_context(&gs, chunk.len()).unwrap();
        }
        let stream = m.gpu.stream().clone();
        let w = m.cpu.weights();
        let check = |ds: &mut tilert::draft::GpuDraftSession,
                     cache: &mut dflash::DraftCache,
                     x_last: u32,
                     b: usize,
                     when: &str| {
            let want = d.draft(cache, &w.embed, &w.lm_head, x_last, b).unwrap();
            ds.draft(x_last, b).unwrap();
            let got = dtoh(&stream, ds.logits_device(b - 1)).unwrap();
            let (err, mag) = max_err(&got, &want);
            eprintln!("{name} {when} B={b}: draft logits max |Δ| {err:.2e} (max {mag:.2})");
            assert!(err <= 2e-3 * (1.0 + mag), "{name} {when} B={b}: {err}");
            let ids = dtoh(&stream, ds.argmax_device(b - 1)).unwrap();
            let host: Vec<u32> = got.chunks_exact(v).map(argmax).collect();
            assert_eq!(ids, host, "{name} {when} B={b}: device argmax");
        };
        let x_last = r.random_range(0..v as u32);
        for b in [2, 4, 8, 16] {
            check(&mut ds, &mut cache, x_last, b, "after prompt");
        }
        // A verified block of 5, 3 committed.
        let block: Vec<u32> = (0..5).map(|_| r.random_range(0..v as u32)).collect();
        let out = Executor::forward(&mut cs, &block, &layers).unwrap();
        Executor::truncate(&mut cs, prompt.len() + 3).unwrap();
        d.append_context(&mut cache, &features(&out, 3)).unwrap();
        gs.forward_device(&block).unwrap();
        gs.truncate(prompt.len() + 3).unwrap();
        ds.append_context(&gs, 3).unwrap();
        assert_eq!(ds.len(), cache.len());
        for b in [3, 8, 16] {
            check(&mut ds, &mut cache, block[3], b, "after a commit");
        }
        // Op-by-op launches give the graphs' result.
        let graphs = dtoh(&stream, ds.logits_device(15)).unwrap();
        ds.set_use_graphs(false);
        ds.draft(block[3], 16).unwrap();
        let eager = dtoh(&stream, ds.logits_device(15)).unwrap();
        assert_eq!(graphs, eager, "{name}: graphs vs op-by-op");
    }
}

/// Speculative greedy on the GPU = plain greedy on the GPU, token for token: every fixture
/// drafter at B = 2, 4, 8, 16, and a random drafter of each shape (z-lab full, z-lab mixed
/// sliding/full with YaRN, MiMo) at B = 8; 40 tokens after a 21-token prompt (two prefill
/// chunks).
#[test]
fn greedy_identity_with_plain_gpu_decoding() {
    let Some(_ctx) = ultra_kernels::gpu_for_test("greedy_identity_with_plain_gpu_decoding") else {
        return;
    };
    let mut r = rng("greedy_identity_with_plain_gpu_decoding");
    for (name, rel) in pairs() {
        let m = load(&rel);
        let v = m.cpu.config().vocab_size;
        let prompt: Vec<u32> = (0..21).map(|_| r.random_range(0..v as u32)).collect();
        let want = plain_greedy(&m.gpu, &prompt, 40);
        let fixture = Drafter::load(&fixtures().join(&name), m.cpu.config()).unwrap();
        let mut runs: Vec<(String, Drafter, usize)> = [2, 4, 8, 16]
            .into_iter()
            .map(|b| (name.clone(), fixture.clone(), b))
            .collect();
        for kind in [ToyKind::ZLab, ToyKind::ZLabMixed, ToyKind::MiMo] {
            let d = toy::drafter(m.cpu.config(), kind, 8, r.random());
            runs.push((format!("toy {kind:?}"), d, 8));
        }
        for (dname, d, b) in runs {
            let gd = GpuDrafter::new(&m.gpu, d.config(), d.weights()).unwrap();
            let mut s: GpuSession = m.gpu.session(256).unwrap();
            let mut spec = GpuSpec::new(&mut s, &gd).unwrap();
            let opts = SpecOptions {
                block_size: b,
                eos_token_ids: Vec::new(),
                prefill_chunk: None,
            };
            let mut argmax_rounds = 0;
            let out = spec
                .generate(
                    &opts,
                    &prompt,
                    &greedy(40),
                    &mut |_| ControlFlow::Continue(()),
                    &mut |round| argmax_rounds += usize::from(round.draft_logits.is_empty()),
                )
                .unwrap();
            assert_eq!(out.tokens, want, "{rel}, drafter {dname}, B={b}");
            let rounds = out.stats.rounds() as usize;
            assert_eq!(argmax_rounds, rounds, "greedy rounds bring back ids only");
            eprintln!(
                "{rel} {dname} B={b}: {rounds} rounds, tau {:.2}",
                out.stats.tau().unwrap()
            );
        }
    }
}

/// Chunked speculative prefill on the device (`SpecOptions::prefill_chunk`, cut at the backend's
/// granularity of `MAX_TOKENS` = 16): a 40-token prompt in chunks of 16, 16, 8 (asked as 16 and
/// as 20) leaves exactly the state one call leaves — the prompt's last row, the next block's
/// draft logits and the target's next-token logits are bit-identical — and generates plain GPU
/// greedy decoding's tokens. Chunks of 5 at unaligned positions (called directly) agree within
/// the tolerance above (the differences are printed; 0 on every fixture on an H100).
#[test]
fn chunked_prefill_equals_one_call() {
    use dflash::{prefill_prompt, Rows, SpecBackend, Want};
    let Some(_ctx) = ultra_kernels::gpu_for_test("chunked_prefill_equals_one_call") else {
        return;
    };
    let mut r = rng("chunked_prefill_equals_one_call");
    let logits = |rows: Rows| match rows {
        Rows::Logits(l) => l,
        Rows::Argmax(_) => panic!("logits were asked for"),
    };
    for (name, rel) in pairs() {
        let m = load(&rel);
        let v = m.cpu.config().vocab_size;
        let stream = m.gpu.stream().clone();
        let prompt: Vec<u32> = (0..40).map(|_| r.random_range(0..v as u32)).collect();
        let d = Drafter::load(&fixtures().join(&name), m.cpu.config()).unwrap();
        let gd = GpuDrafter::new(&m.gpu, d.config(), d.weights()).unwrap();
        let x = prompt[3];
        // The state after a prefill: (last row, draft rows of the next block, target row of x).
        let state = |chunks: &[usize]| {
            let mut s = m.gpu.session(256).unwrap();
            let mut spec = GpuSpec::new(&mut s, &gd).unwrap();
            let mut at = 0;
            let mut row = None;
            for (i, &n) in chunks.iter().enumerate() {
                let last = i + 1 == chunks.len();
                row = spec
                    .prefill(&prompt[at..at + n], last.then_some(Want::Logits))
                    .unwrap();
                at += n;
            }
            assert_eq!((at, spec.len()), (prompt.len(), prompt.len()));
            let draft = logits(spec.draft(x, 4, Want::Logits).unwrap());
            drop(spec);
            s.forward_device(&[x]).unwrap();
            let target = dtoh(&stream, s.logits_device(1)).unwrap();
            (logits(row.unwrap()), draft, target)
        };
        let one = state(&[40]);
        for ask in [16, 20] {
            let mut s = m.gpu.session(256).unwrap();
            let mut spec = GpuSpec::new(&mut s, &gd).unwrap();
            let row = logits(prefill_prompt(&mut spec, &prompt, Some(ask), Want::Logits).unwrap());
            assert_eq!(row, one.0, "{name}: chunks of {ask}, last row");
        }
        let aligned = state(&[16, 16, 8]);
        assert_eq!(aligned.0, one.0, "{name}: last row");
        assert_eq!(aligned.1, one.1, "{name}: draft rows");
        assert_eq!(aligned.2, one.2, "{name}: target row");
        let unaligned = state(&[5; 8]);
        for (what, got, want) in [
            ("last row", &unaligned.0, &one.0),
            ("draft rows", &unaligned.1, &one.1),
            ("target row", &unaligned.2, &one.2),
        ] {
            let (e, mag) = max_err(got, want);
            eprintln!("{name}: chunks of 5, {what}: max |Δ| {e:.2e} (max |x| {mag:.2})");
            assert!(e <= 2e-3 * (1.0 + mag), "{name}: chunks of 5, {what}: {e}");
        }
        let want = plain_greedy(&m.gpu, &prompt, 30);
        let mut s = m.gpu.session(256).unwrap();
        let mut spec = GpuSpec::new(&mut s, &gd).unwrap();
        let opts = SpecOptions {
            block_size: 4,
            eos_token_ids: Vec::new(),
            prefill_chunk: Some(16),
        };
        let out = spec
            .generate(
                &opts,
                &prompt,
                &greedy(30),
                &mut |_| ControlFlow::Continue(()),
                &mut |_| {},
            )
            .unwrap();
        assert_eq!(out.tokens, want, "{name}: chunked prefill, greedy");
    }
}

/// Sampled decoding (temperature 0.9, top-k 4) runs the exact rejection-sampling path on GPU
/// logits: the first round's draft logits equal the CPU drafter's on the same context, drafts
/// get rejected (the residual distribution is sampled), and every emitted token lies in the
/// CPU target's top-4 at its position (the target's filtered support; a ±1e-3 margin for the
/// GPU/CPU logit difference).
#[test]
fn rejection_sampling_on_gpu_logits() {
    let Some(_ctx) = ultra_kernels::gpu_for_test("rejection_sampling_on_gpu_logits") else {
        return;
    };
    let mut r = rng("rejection_sampling_on_gpu_logits");
    for (name, rel) in pairs() {
        let m = load(&rel);
        let v = m.cpu.config().vocab_size;
        let d = Drafter::load(&fixtures().join(&name), m.cpu.config()).unwrap();
        let gd = GpuDrafter::new(&m.gpu, d.config(), d.weights()).unwrap();
        let prompt: Vec<u32> = (0..12).map(|_| r.random_range(0..v as u32)).collect();
        let params = SamplingParams {
            temperature: 0.9,
            top_k: Some(4),
            max_tokens: 48,
            ignore_eos: true,
            seed: Some(r.random()),
            ..SamplingParams::default()
        };
        let mut s = m.gpu.session(256).unwrap();
        let mut spec = GpuSpec::new(&mut s, &gd).unwrap();
        let opts = SpecOptions {
            block_size: 4,
            eos_token_ids: Vec::new(),
            prefill_chunk: None,
        };
        let mut first: Option<(u32, Vec<f32>)> = None;
        let out = spec
            .generate(
                &opts,
                &prompt,
                &params,
                &mut |_| ControlFlow::Continue(()),
                &mut |round| {
                    if first.is_none() {
                        first = Some((round.x_last, round.draft_logits.to_vec()));
                    }
                },
            )
            .unwrap();
        assert_eq!(out.tokens.len(), 48, "{name}");
        let st = &out.stats;
        assert!(st.rounds() > 0);
        assert!(
            st.accepted_tokens() < st.drafted_tokens(),
            "{name}: no draft was ever rejected"
        );
        // Round 0's draft logits against the CPU drafter after the same prompt.
        let (x_last, got) = first.unwrap();
        let layers = d.config().target_layer_ids.clone();
        let mut cs = m.cpu.session();
        let o = Executor::forward(&mut cs, &prompt, &layers).unwrap();
        let mut cache = d.new_cache();
        d.append_context(&mut cache, &features(&o, prompt.len()))
            .unwrap();
        let w = m.cpu.weights();
        let want = d
            .draft(&mut cache, &w.embed, &w.lm_head, x_last, 4)
            .unwrap();
        let (err, mag) = max_err(&got, &want);
        assert!(
            err <= 2e-3 * (1.0 + mag),
            "{name}: round 0 draft logits {err}"
        );
        // Support: each token within the CPU target's top-4 at its position.
        let mut all = prompt.clone();
        all.extend_from_slice(&out.tokens);
        let mut cs = m.cpu.session();
        let o = Executor::forward(&mut cs, &all[..all.len() - 1], &[]).unwrap();
        for (i, &t) in out.tokens.iter().enumerate() {
            let row = &o.logits[prompt.len() - 1 + i];
            let mut sorted = row.clone();
            sorted.sort_by(|a, b| b.total_cmp(a));
            assert!(
                row[t as usize] >= sorted[3] - 1e-3,
                "{name}: token {i} ({t}) is outside the target's top-4"
            );
        }
        eprintln!(
            "{name}: sampled, {} rounds, tau {:.2}",
            st.rounds(),
            st.tau().unwrap()
        );
    }
}

/// Mismatches are typed errors: a drafter for another target, bad block sizes, appending
/// without features.
#[test]
fn errors_are_typed() {
    let Some(_ctx) = ultra_kernels::gpu_for_test("dflash_errors_are_typed") else {
        return;
    };
    let ps = pairs();
    let (name, rel) = &ps[0];
    let m = load(rel);
    let d = Drafter::load(&fixtures().join(name), m.cpu.config()).unwrap();
    // The other fixture drafters do not fit this target.
    for (other, _) in &ps[1..] {
        let od = Drafter::load_unchecked(&fixtures().join(other)).unwrap();
        if od.check_target(m.cpu.config()).is_err() {
            assert!(
                GpuDrafter::new(&m.gpu, od.config(), od.weights()).is_err(),
                "{other} on {rel}"
            );
        }
    }
    let gd = GpuDrafter::new(&m.gpu, d.config(), d.weights()).unwrap();
    let mut ds = gd.session(64).unwrap();
    let mut gs = m.gpu.session(64).unwrap();
    // Features must come from a session that captures the drafter's layers.
    gs.forward_device(&[1, 2, 3]).unwrap();
    assert!(ds.append_context(&gs, 3).is_err());
    gs.set_capture(gd.hidden_indices()).unwrap();
    assert!(ds.draft(1, 1).is_err());
    assert!(ds.draft(1, 17).is_err());
    assert!(ds.draft(m.cpu.config().vocab_size as u32, 4).is_err());
    assert!(ds.append_context(&gs, 0).is_err());
    assert!(ds.append_context(&gs, 17).is_err());
    // A session of another model.
    let other = load(&ps[1].1);
    let mut os = other.gpu.session(64).unwrap();
    assert!(GpuSpec::new(&mut os, &gd).is_err());
}

/// `input_embedding_scale ≠ 1` (z-lab's `_raw_input_embeddings` for targets that scale their
/// embeddings): the GPU drafter scales the block's input rows as the CPU drafter does (the
/// `x_last` row on the device, the mask rows at upload). Toy drafters of each shape with scale
/// 1.7 (MiMo: with a mask embedding; z-lab: the target's mask-token row): draft logits within
/// the tolerance of the CPU drafter's at B = 4 and 8 (which differ from the unscaled drafter's,
/// so the scale is really applied), and speculative greedy output equal to plain GPU greedy.
#[test]
fn input_embedding_scale_matches_cpu() {
    let Some(_ctx) = ultra_kernels::gpu_for_test("input_embedding_scale_matches_cpu") else {
        return;
    };
    let mut r = rng("input_embedding_scale_matches_cpu");
    for (rel, kind) in [
        ("qwen3-moe/native", ToyKind::ZLab),
        ("gpt-oss/bf16", ToyKind::ZLabMixed),
        ("mimo-v2-flash/native", ToyKind::MiMo),
    ] {
        let m = load(rel);
        let tc = m.cpu.config();
        let v = tc.vocab_size;
        let mut json = toy::config_json(tc, kind, 8);
        json["dflash_config"]["input_embedding_scale"] = serde_json::json!(1.7);
        let cfg = dflash::DrafterConfig::from_json_str(&json.to_string()).unwrap();
        assert_eq!(cfg.input_embedding_scale, 1.7);
        let weights = toy::random_weights(&cfg, tc.hidden_size, kind == ToyKind::MiMo, r.random());
        let d = Drafter::new(cfg.clone(), weights.clone()).unwrap();
        let mut plain_cfg = cfg;
        plain_cfg.input_embedding_scale = 1.0;
        let unscaled = Drafter::new(plain_cfg, weights).unwrap();
        let gd = GpuDrafter::new(&m.gpu, d.config(), d.weights()).unwrap();
        let layers = d.config().target_layer_ids.clone();
        let prompt: Vec<u32> = (0..20).map(|_| r.random_range(0..v as u32)).collect();
        let mut cs = m.cpu.session();
        let out = Executor::forward(&mut cs, &prompt, &layers).unwrap();
        let feats = features(&out, prompt.len());
        let mut gs = m.gpu.session(256).unwrap();
        gs.set_capture(gd.hidden_indices()).unwrap();
        let mut ds = gd.session(256).unwrap();
        for chunk in prompt.chunks(16) {
            gs.forward_device(chunk).unwrap();
            ds.append_context(&gs, chunk.len()).unwrap();
        }
        let w = m.cpu.weights();
        let x_last = r.random_range(0..v as u32);
        for b in [4, 8] {
            let run = |d: &Drafter| {
                let mut cache = d.new_cache();
                d.append_context(&mut cache, &feats).unwrap();
                d.draft(&mut cache, &w.embed, &w.lm_head, x_last, b)
                    .unwrap()
            };
            let want = run(&d);
            assert_ne!(
                want,
                run(&unscaled),
                "{rel} {kind:?}: the scale changes nothing"
            );
            ds.draft(x_last, b).unwrap();
            let got = dtoh(m.gpu.stream(), ds.logits_device(b - 1)).unwrap();
            let (err, mag) = max_err(&got, &want);
            eprintln!(
                "{rel} {kind:?} scale 1.7 B={b}: draft logits max |Δ| {err:.2e} (max {mag:.2})"
            );
            assert!(err <= 2e-3 * (1.0 + mag), "{rel} {kind:?} B={b}: {err}");
        }
        let want = plain_greedy(&m.gpu, &prompt, 24);
        let mut s = m.gpu.session(256).unwrap();
        let opts = SpecOptions {
            block_size: 8,
            eos_token_ids: Vec::new(),
            prefill_chunk: None,
        };
        let got = GpuSpec::new(&mut s, &gd)
            .unwrap()
            .generate(
                &opts,
                &prompt,
                &greedy(24),
                &mut |_| ControlFlow::Continue(()),
                &mut |_| {},
            )
            .unwrap();
        assert_eq!(got.tokens, want, "{rel} {kind:?}: speculative greedy");
    }
}

/// A drafter that proposes `token` at every position: `d` with its attention and MLP outputs
/// zeroed (each block row keeps its embedding) and the mask embedding set to the target's
/// LM-head row of `token`. Against a target that repeats `token`, runs of drafts are accepted.
fn copycat(d: &Drafter, lm_head: &model::weights::Mat, token: u32) -> Drafter {
    let mut w = d.weights().clone();
    for l in &mut w.layers {
        l.attn.o.w.make_f32_mut().fill(0.0);
        if let model::weights::Mlp::Dense { down, .. } = &mut l.mlp {
            down.w.make_f32_mut().fill(0.0);
        }
    }
    w.norm.fill(1.0);
    w.mask_embedding = Some(lm_head.row(token as usize).to_vec());
    Drafter::new(d.config().clone(), w).unwrap()
}

/// After a speculative generation with rejections, the device state is a fresh prefill's: the
/// draft state's logits for the next block and the target session's logits for the next token
/// equal those of a new draft state / target session fed the committed tokens in prefill chunks
/// (within the tolerance above; the differences are printed, 0 when measured on an H100). Every
/// fixture drafter at B = 4 and 16 over 60 tokens — rejected drafts (target KV truncated, block
/// keys and values in the draft cache overwritten by committed context; gpt-oss: causal window
/// 6, MiMo: window 3, sliding-window draft-cache rings that wrap) — and a drafter proposing the
/// most frequent token of the target's greedy continuation (rejections after accepted drafts).
#[test]
fn state_after_rejections_equals_a_fresh_prefill() {
    let Some(_ctx) = ultra_kernels::gpu_for_test("state_after_rejections_equals_a_fresh_prefill")
    else {
        return;
    };
    let mut r = rng("state_after_rejections_equals_a_fresh_prefill");
    let mut partial = 0;
    for (name, rel) in pairs() {
        let m = load(&rel);
        let v = m.cpu.config().vocab_size;
        let fixture = Drafter::load(&fixtures().join(&name), m.cpu.config()).unwrap();
        let stream = m.gpu.stream().clone();
        let prompt: Vec<u32> = (0..13).map(|_| r.random_range(0..v as u32)).collect();
        let plain = plain_greedy(&m.gpu, &prompt, 60);
        let mut counts = std::collections::HashMap::new();
        for &t in &plain {
            *counts.entry(t).or_insert(0) += 1;
        }
        let frequent = *counts
            .iter()
            .max_by_key(|(t, c)| (**c, u32::MAX - **t))
            .unwrap()
            .0;
        let drafters = [
            (name.clone(), fixture.clone()),
            (
                format!("copycat({frequent})"),
                copycat(&fixture, &m.cpu.weights().lm_head, frequent),
            ),
        ];
        for (dname, d) in &drafters {
            let gd = GpuDrafter::new(&m.gpu, d.config(), d.weights()).unwrap();
            for b in [4, 16] {
                let mut s = m.gpu.session(256).unwrap();
                let mut spec = GpuSpec::new(&mut s, &gd).unwrap();
                let opts = SpecOptions {
                    block_size: b,
                    eos_token_ids: Vec::new(),
                    prefill_chunk: None,
                };
                let out = spec
                    .generate(
                        &opts,
                        &prompt,
                        &greedy(60),
                        &mut |_| ControlFlow::Continue(()),
                        &mut |round| {
                            let a = round.acceptance.accepted;
                            partial += usize::from(0 < a && a < round.drafts.len());
                        },
                    )
                    .unwrap();
                assert_eq!(out.tokens, plain, "{name} {dname} B={b}");
                let st = &out.stats;
                assert!(
                    st.accepted_tokens() < st.drafted_tokens(),
                    "{name} {dname} B={b}: no rejection"
                );
                let (_, mut ds) = spec.into_parts();
                // Committed: the prompt and every emitted token but the last (the next x_last).
                let mut committed = prompt.clone();
                committed.extend_from_slice(&out.tokens[..out.tokens.len() - 1]);
                assert_eq!((s.len(), ds.len()), (committed.len(), committed.len()));

                let mut fs = m.gpu.session(256).unwrap();
                fs.set_capture(gd.hidden_indices()).unwrap();
                let mut fd = gd.session(256).unwrap();
                for chunk in committed.chunks(16) {
                    fs.forward_device(chunk).unwrap();
                    fd.append_context(&fs, chunk.len()).unwrap();
                }
                let x_last = *out.tokens.last().unwrap();
                ds.draft(x_last, b).unwrap();
                fd.draft(x_last, b).unwrap();
                let got = dtoh(&stream, ds.logits_device(b - 1)).unwrap();
                let want = dtoh(&stream, fd.logits_device(b - 1)).unwrap();
                let (de, dm) = max_err(&got, &want);
                s.forward_device(&[x_last]).unwrap();
                fs.forward_device(&[x_last]).unwrap();
                let got = dtoh(&stream, s.logits_device(1)).unwrap();
                let want = dtoh(&stream, fs.logits_device(1)).unwrap();
                let (te, tm) = max_err(&got, &want);
                eprintln!(
                    "{name} {dname} B={b}: {} rounds, tau {:.2}, histogram {:?}; vs a fresh \
                     prefill of {} tokens: draft logits max |Δ| {de:.2e}, target logits max \
                     |Δ| {te:.2e}",
                    st.rounds(),
                    st.tau().unwrap(),
                    st.histogram(),
                    committed.len()
                );
                assert!(
                    de <= 2e-3 * (1.0 + dm),
                    "{name} {dname} B={b}: draft state {de}"
                );
                assert!(
                    te <= 2e-3 * (1.0 + tm),
                    "{name} {dname} B={b}: target state {te}"
                );
            }
        }
    }
    assert!(partial > 0, "no rejection after an accepted draft");
}
