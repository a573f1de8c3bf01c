//! `ultra serve --device cuda` over real loopback sockets (gRPC): the same output as `ultra
//! generate --device cuda` for the same seed — greedy and sampled, several streams at once, a
//! long prompt prefilled in chunks, a reused (pooled) sequence; cancellation (Abort and client
//! disconnect) freeing the slot; 20 concurrent greedy requests (batched decode passes) giving
//! each one's output alone; DFlash with the drafter on the GPU giving plain GPU decoding's
//! output, also with presence / frequency penalties and with logprobs (the default model, whose
//! trained drafter makes rounds of several tokens); and prompt logprobs (chunked `forward` on the
//! GPU) matching the CPU's log-softmax. Model: the tiny `qwen3-moe/native` fixture. Skips with a
//! `SKIPPED` line where there is no GPU. Fixtures: `$ULTRA_FIXTURES` if set (a GPU bundle run
//! elsewhere), else
//! the repository's.

mod common;

use std::path::PathBuf;
use std::time::Duration;

use common::{
    client, collect, fixture, long_request, loopback, stream_logprobs, text_request, wait_idle,
    MODEL_ID,
};
use model::sampling::SamplingParams;
use serve::commands::generate::{generate, load, prompt_ids, Generation};
use serve::engine::{EngineConfig, Event, GenerateRequest};
use serve::proto::v1 as pb;
use serve::proto::v1::engine_client::EngineClient;
use serve::server::{load_gpu_engine, Server};

fn engine_cfg(max_running: usize, max_batched_tokens: usize) -> EngineConfig {
    EngineConfig {
        model_id: MODEL_ID.into(),
        max_running,
        max_waiting: 64,
        max_batched_tokens,
        ..EngineConfig::default()
    }
}

async fn start(cfg: EngineConfig, draft: Option<PathBuf>) -> Server {
    start_model(fixture(MODEL_ID), cfg, draft).await
}

async fn start_model(dir: PathBuf, cfg: EngineConfig, draft: Option<PathBuf>) -> Server {
    let server = Server::start(loopback(), cfg.model_id.clone(), move || {
        load_gpu_engine(&dir, draft.as_deref(), None, cfg, 0)
    })
    .await
    .unwrap();
    tokio::time::timeout(Duration::from_secs(120), server.ready())
        .await
        .unwrap()
        .unwrap();
    server
}

/// `ultra generate --device cuda`'s output for `prompt`.
fn reference(prompt: &str, params: &SamplingParams) -> (Vec<u32>, Generation) {
    let mut loaded = load(&fixture(MODEL_ID)).unwrap();
    loaded.to_gpu(0).unwrap();
    let ids = prompt_ids(&loaded, Some(prompt), None, false).unwrap();
    let g = generate(&loaded, &ids, params, &mut Vec::new()).unwrap();
    (ids, g)
}

/// Sampling settings of one case: (temperature, top_k, seed, max_tokens).
type Case = (f32, Option<u32>, Option<u64>, u32);

fn params(c: Case) -> (SamplingParams, pb::SamplingParams) {
    let (temperature, top_k, seed, max_tokens) = c;
    (
        SamplingParams {
            temperature,
            top_k: top_k.map(|k| k as usize),
            seed,
            max_tokens: max_tokens as usize,
            ignore_eos: true,
            ..SamplingParams::greedy()
        },
        pb::SamplingParams {
            temperature: Some(temperature),
            top_k,
            seed,
            max_tokens: Some(max_tokens),
            ignore_eos: Some(true),
            ..Default::default()
        },
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gpu_server_matches_ultra_generate_cuda() {
    let Some(_ctx) = ultra_kernels::gpu_for_test("gpu_server_matches_ultra_generate_cuda") else {
        return;
    };
    // 16 tokens a step: the long prompt is prefilled over several steps, in 16-token chunks.
    let server = start(engine_cfg(4, 16), None).await;
    let info = server.state().engine().unwrap().info().clone();
    assert!(info.device.contains("GPU 0"), "{}", info.device);
    let long = "The quick brown fox jumps over the lazy dog. ".repeat(5);
    let cases: Vec<(String, Case)> = vec![
        ("The quick brown fox".into(), (0.0, None, None, 24)),
        ("Once upon a time".into(), (0.9, Some(40), Some(1234), 24)),
        (long.clone(), (0.7, None, Some(77), 20)),
        (long, (0.0, None, None, 12)),
    ];
    let mut want = Vec::new();
    for (prompt, c) in &cases {
        let (ids, g) = reference(prompt, &params(*c).0);
        want.push((ids, g));
    }
    assert!(want[2].0.len() > 32, "the long prompt spans 3+ chunks");
    // All at once (continuous batching), then each again alone (on reused sequences).
    let run = |prompt: String, c: Case, server_addr: std::net::SocketAddr| async move {
        let mut cl = EngineClient::connect(format!("http://{server_addr}"))
            .await
            .unwrap();
        collect(
            cl.generate(text_request(&prompt, params(c).1))
                .await
                .unwrap()
                .into_inner(),
        )
        .await
    };
    let together: Vec<_> = cases
        .iter()
        .map(|(p, c)| tokio::spawn(run(p.clone(), *c, server.grpc_addr)))
        .collect();
    let mut got = Vec::new();
    for t in together {
        got.push(t.await.unwrap());
    }
    for (p, c) in &cases {
        got.push(run(p.clone(), *c, server.grpc_addr).await);
    }
    for (i, got) in got.iter().enumerate() {
        let ((prompt, _), (ids, g)) = (&cases[i % cases.len()], &want[i % cases.len()]);
        assert_eq!(got.tokens, g.tokens, "run {i}: {prompt:?}");
        assert_eq!(got.text, g.text, "run {i}: {prompt:?}");
        assert_eq!(got.complete.finish_reason, "length");
        let u = got.complete.usage.as_ref().unwrap();
        assert_eq!(u.prompt_tokens as usize, ids.len());
    }
    server.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gpu_server_batched_decode_matches_alone() {
    let Some(_ctx) = ultra_kernels::gpu_for_test("gpu_server_batched_decode_matches_alone") else {
        return;
    };
    // 20 greedy requests of different prompt lengths: alone one after another, then all at once
    // (decode steps batch up to 16 sequences per pass: two passes per step while all 20 run).
    let server = start(engine_cfg(20, 4096), None).await;
    let prompts: Vec<String> = (0..20)
        .map(|i| format!("Request {i}: {}", "the quick brown fox ".repeat(1 + i % 7)))
        .collect();
    let (_, greedy) = params((0.0, None, None, 16));
    let run = |prompt: String, addr: std::net::SocketAddr, s: pb::SamplingParams| async move {
        let mut cl = EngineClient::connect(format!("http://{addr}"))
            .await
            .unwrap();
        collect(
            cl.generate(text_request(&prompt, s))
                .await
                .unwrap()
                .into_inner(),
        )
        .await
    };
    let mut alone = Vec::new();
    for p in &prompts {
        alone.push(
            run(p.clone(), server.grpc_addr, greedy.clone())
                .await
                .tokens,
        );
    }
    let together: Vec<_> = prompts
        .iter()
        .map(|p| tokio::spawn(run(p.clone(), server.grpc_addr, greedy.clone())))
        .collect();
    for (i, t) in together.into_iter().enumerate() {
        let got = t.await.unwrap();
        assert_eq!(got.tokens.len(), 16);
        assert_eq!(got.tokens, alone[i], "request {i}: concurrent vs alone");
    }
    // And alone is `ultra generate --device cuda`.
    let (_, want) = reference(&prompts[3], &params((0.0, None, None, 16)).0);
    assert_eq!(alone[3], want.tokens);
    server.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gpu_server_cancellation_frees_the_slot() {
    let Some(_ctx) = ultra_kernels::gpu_for_test("gpu_server_cancellation_frees_the_slot") else {
        return;
    };
    // One slot: the next request can only run once the cancelled one is gone.
    let server = start(engine_cfg(1, 2048), None).await;
    let mut c = client(&server).await;
    let mut stream = c
        .generate(long_request("long-1"))
        .await
        .unwrap()
        .into_inner();
    stream.message().await.unwrap().unwrap();
    let found = c
        .abort(pb::AbortRequest {
            request_id: "long-1".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .found;
    assert!(found);
    let rest = collect(stream).await;
    assert_eq!(rest.complete.finish_reason, "abort");
    assert!(rest.tokens.len() < 2999);
    wait_idle(&server).await;
    // Client disconnect.
    let mut stream = c
        .generate(long_request("long-2"))
        .await
        .unwrap()
        .into_inner();
    stream.message().await.unwrap().unwrap();
    drop(stream);
    wait_idle(&server).await;
    // The slot (and its reused sequence) serves the next request exactly.
    let (p, s) = params((0.8, Some(20), Some(5), 16));
    let (_, want) = reference("The quick brown fox", &p);
    let got = collect(
        c.generate(text_request("The quick brown fox", s))
            .await
            .unwrap()
            .into_inner(),
    )
    .await;
    assert_eq!(got.tokens, want.tokens);
    server.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gpu_speculative_server_matches_plain_decoding() {
    let Some(_ctx) = ultra_kernels::gpu_for_test("gpu_speculative_server_matches_plain_decoding")
    else {
        return;
    };
    let draft = fixture("drafters/qwen3-moe-dflash");
    let server = start(engine_cfg(4, 2048), Some(draft)).await;
    assert!(server
        .state()
        .engine()
        .unwrap()
        .info()
        .spec_block_size
        .is_some());
    let mut c = client(&server).await;
    let (p, s) = params((0.0, None, None, 20));
    let (_, want) = reference("The quick brown fox", &p);
    let mut c2 = c.clone();
    let (a, b) = tokio::join!(
        c2.generate(text_request("The quick brown fox", s.clone())),
        c.generate(text_request("The quick brown fox", s))
    );
    for stream in [a.unwrap().into_inner(), b.unwrap().into_inner()] {
        let got = collect(stream).await;
        assert_eq!(got.tokens, want.tokens);
        assert_eq!(got.text, want.text);
        let spec = got.complete.spec.unwrap();
        assert!(spec.drafts > 0 && spec.draft_tokens >= spec.drafts);
    }
    // A seeded sampled request gives the same tokens twice (reused device state), and an
    // aborted one frees its state.
    let (_, s) = params((0.9, Some(8), Some(11), 24));
    let one = collect(
        c.generate(text_request("Once upon a time", s.clone()))
            .await
            .unwrap()
            .into_inner(),
    )
    .await;
    let two = collect(
        c.generate(text_request("Once upon a time", s))
            .await
            .unwrap()
            .into_inner(),
    )
    .await;
    assert_eq!(one.tokens.len(), 24);
    assert_eq!(one.tokens, two.tokens);
    let mut stream = c
        .generate(long_request("spec-long"))
        .await
        .unwrap()
        .into_inner();
    stream.message().await.unwrap().unwrap();
    c.abort(pb::AbortRequest {
        request_id: "spec-long".into(),
    })
    .await
    .unwrap();
    assert_eq!(collect(stream).await.complete.finish_reason, "abort");
    wait_idle(&server).await;
    server.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gpu_prompt_logprobs_match_the_cpu() {
    let Some(_ctx) = ultra_kernels::gpu_for_test("gpu_prompt_logprobs_match_the_cpu") else {
        return;
    };
    // 16 tokens a step: the prompt's logits come from several 16-token `forward` calls.
    let server = start(engine_cfg(4, 16), None).await;
    let engine = server.state().engine().unwrap().clone();
    let loaded = load(&fixture(MODEL_ID)).unwrap();
    let prompt = "The quick brown fox jumps over the lazy dog. ".repeat(4);
    let ids = prompt_ids(&loaded, Some(&prompt), None, false).unwrap();
    assert!(ids.len() > 32, "the prompt spans 3+ chunks");
    let cpu_rows = loaded.cpu().unwrap().session().prefill_all(&ids).unwrap();
    let run = |prompt_logprobs: Option<usize>| {
        let sub = engine
            .submit(GenerateRequest {
                id: String::new(),
                prompt: ids.clone(),
                params: params((0.0, None, None, 8)).0,
                max_tokens: Some(8),
                logprobs: None,
                prompt_logprobs,
            })
            .unwrap();
        async move {
            let mut events = sub.events;
            let (mut tokens, mut plps) = (Vec::new(), Vec::new());
            while let Some(ev) = events.recv().await {
                match ev {
                    Event::Tokens(t) => {
                        tokens.extend(t.tokens);
                        plps.extend(t.prompt_logprobs);
                    }
                    Event::Finished(f) => assert_eq!(f.error, None),
                }
            }
            (tokens, plps)
        }
    };
    let (plain, none) = run(None).await;
    assert!(none.is_empty());
    let (tokens, plps) = run(Some(5)).await;
    assert_eq!(
        tokens, plain,
        "prompt logprobs change the greedy continuation"
    );
    assert_eq!(plps.len(), ids.len() - 1);
    // MXFP4's GPU-vs-CPU logit tolerance (relative to 1 + max |logit|), twice for a log-softmax.
    let mut worst = 0f64;
    for (j, p) in plps.iter().enumerate() {
        let row = &cpu_rows[j];
        let lsm = model::sampling::log_softmax(row);
        let scale = 1.0 + row.iter().fold(0f32, |m, x| m.max(x.abs())) as f64;
        let tol = 2.0 * 3e-2 * scale;
        assert_eq!(p.logprob.token, ids[j + 1]);
        assert_eq!(p.logprob.top.len(), 5);
        let mut check = |t: u32, lp: f64| {
            let err = (lp - lsm[t as usize]).abs();
            worst = worst.max(err / scale);
            assert!(
                err <= tol,
                "position {}: token {t}: {lp} vs CPU {}",
                j + 1,
                lsm[t as usize]
            );
        };
        check(p.logprob.token, p.logprob.logprob);
        for &(t, lp) in &p.logprob.top {
            check(t, lp);
        }
    }
    println!(
        "gpu prompt_logprobs: {} positions, max |GPU - CPU| / (1 + max|logit|) = {worst:.2e}",
        plps.len()
    );
    server.shutdown().await.unwrap();
}

/// The drafter on the GPU with presence / frequency penalties and logprobs: the same tokens as
/// plain GPU decoding and the same logprobs (the target's verify rows against its decode rows:
/// different passes, so within 2e-3), rounds of several tokens included.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gpu_speculative_penalties_and_logprobs_match_plain_decoding() {
    let Some(_ctx) =
        ultra_kernels::gpu_for_test("gpu_speculative_penalties_and_logprobs_match_plain_decoding")
    else {
        return;
    };
    let (target, drafter) = common::default_model_dirs();
    let request = |s: pb::SamplingParams| pb::GenerateRequest {
        logprobs: Some(4),
        ..text_request("def fibonacci(n):", s)
    };
    let cases = [
        pb::SamplingParams {
            max_tokens: Some(24),
            ignore_eos: Some(true),
            ..Default::default()
        },
        pb::SamplingParams {
            max_tokens: Some(24),
            ignore_eos: Some(true),
            presence_penalty: Some(-0.3),
            frequency_penalty: Some(1.5),
            ..Default::default()
        },
    ];
    let spec = start_model(target.clone(), engine_cfg(4, 2048), Some(drafter)).await;
    let mut c = client(&spec).await;
    let mut got = Vec::new();
    for s in &cases {
        got.push(stream_logprobs(&mut c, request(s.clone())).await);
    }
    spec.shutdown().await.unwrap();
    let plain = start_model(target, engine_cfg(4, 2048), None).await;
    let mut c = client(&plain).await;
    let mut worst = 0f64;
    let mut penalized = Vec::new();
    for (s, (ids, lps, multi)) in cases.iter().zip(&got) {
        let want = c.complete(request(s.clone())).await.unwrap().into_inner();
        assert_eq!(ids, &want.token_ids, "{s:?}");
        assert!(multi, "{s:?}: no round emitted more than one token");
        assert_eq!(lps.len(), 24);
        for (i, (x, y)) in want.logprobs.iter().zip(lps).enumerate() {
            assert_eq!(x.token_id, y.token_id);
            let top = |l: &pb::TokenLogprob| l.top.iter().map(|t| t.token_id).collect::<Vec<_>>();
            assert_eq!(top(x), top(y), "{s:?} token {i}");
            worst = worst.max((x.logprob - y.logprob).abs());
            for (p, q) in x.top.iter().zip(&y.top) {
                worst = worst.max((p.logprob - q.logprob).abs());
            }
        }
        penalized.push(want.token_ids);
    }
    // The penalties changed the output.
    assert_ne!(penalized[0], penalized[1]);
    eprintln!("largest |logprob difference| speculative vs plain on the GPU: {worst:.2e}");
    assert!(worst < 2e-3, "{worst}");
    plain.shutdown().await.unwrap();
}

/// Full sampling settings: (temperature, top_k, top_p, min_p, repetition, presence, frequency,
/// seed).
type FullCase = (
    f32,
    Option<u32>,
    Option<f32>,
    Option<f32>,
    Option<f32>,
    f32,
    f32,
    u64,
);

fn full_params(c: FullCase, max_tokens: u32) -> (SamplingParams, pb::SamplingParams) {
    let (temperature, top_k, top_p, min_p, rep, pres, freq, seed) = c;
    (
        SamplingParams {
            temperature,
            top_k: top_k.map(|k| k as usize),
            top_p,
            min_p,
            repetition_penalty: rep,
            presence_penalty: pres,
            frequency_penalty: freq,
            seed: Some(seed),
            max_tokens: max_tokens as usize,
            ignore_eos: true,
            ..SamplingParams::greedy()
        },
        pb::SamplingParams {
            temperature: Some(temperature),
            top_k,
            top_p,
            min_p,
            repetition_penalty: rep,
            presence_penalty: Some(pres),
            frequency_penalty: Some(freq),
            seed: Some(seed),
            max_tokens: Some(max_tokens),
            ignore_eos: Some(true),
            ..Default::default()
        },
    )
}

/// Plain decode steps on the GPU sample on the device (`tilert::sample`): six concurrent
/// requests with every processor (temperature, top-k / top-p / min-p, repetition / presence /
/// frequency penalties, seeds) give exactly `ultra generate --device cuda`'s output (which
/// samples on the host), and the decode steps bring back only token ids (4 bytes a row), never
/// logits.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gpu_server_samples_on_the_device_as_ultra_generate() {
    let Some(_ctx) =
        ultra_kernels::gpu_for_test("gpu_server_samples_on_the_device_as_ultra_generate")
    else {
        return;
    };
    let server = start(engine_cfg(8, 2048), None).await;
    let cases: Vec<(&str, FullCase)> = vec![
        (
            "The quick brown fox",
            (0.8, Some(20), Some(0.9), None, None, 0.0, 0.0, 1),
        ),
        (
            "Once upon a time",
            (1.1, None, Some(0.8), Some(0.05), None, 0.0, 0.0, 2),
        ),
        (
            "In the beginning",
            (0.7, None, None, None, Some(1.3), 0.5, 0.3, 3),
        ),
        (
            "def fibonacci(n):",
            (0.0, None, None, None, Some(1.5), 0.0, 0.8, 4),
        ),
        (
            "The weather today",
            (1.0, Some(5), None, None, None, -0.4, 0.0, 5),
        ),
        (
            "A long time ago",
            (0.9, None, None, Some(0.1), Some(0.9), 0.2, 0.2, 6),
        ),
    ];
    let max_tokens = 24;
    let want: Vec<Generation> = cases
        .iter()
        .map(|(p, c)| reference(p, &full_params(*c, max_tokens).0).1)
        .collect();
    let metrics = server.state().engine().unwrap().metrics().clone();
    let (bytes0, steps0) = (
        metrics.decode_result_bytes.get(),
        metrics.decode_steps.get(),
    );
    let tasks: Vec<_> = cases
        .iter()
        .map(|(p, c)| {
            let (prompt, s) = (p.to_string(), full_params(*c, max_tokens).1);
            let addr = server.grpc_addr;
            tokio::spawn(async move {
                let mut cl = EngineClient::connect(format!("http://{addr}"))
                    .await
                    .unwrap();
                collect(
                    cl.generate(text_request(&prompt, s))
                        .await
                        .unwrap()
                        .into_inner(),
                )
                .await
            })
        })
        .collect();
    for (i, t) in tasks.into_iter().enumerate() {
        let got = t.await.unwrap();
        assert_eq!(got.tokens, want[i].tokens, "case {i}: {:?}", cases[i]);
        assert_eq!(got.text, want[i].text, "case {i}");
    }
    let (bytes, steps) = (
        metrics.decode_result_bytes.get() - bytes0,
        metrics.decode_steps.get() - steps0,
    );
    assert!(steps > 0, "no decode steps counted");
    assert!(
        bytes <= 4 * 8 * steps,
        "{bytes} bytes over {steps} decode steps: logits came back to the host"
    );
    wait_idle(&server).await;
    server.shutdown().await.unwrap();
}
