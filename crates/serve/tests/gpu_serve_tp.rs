//! `ultra serve --device cuda --tensor-parallel 2 --draft DIR` over real loopback sockets
//! (gRPC), on 2 virtual ranks of one GPU: DFlash with the drafter on rank 0's GPU, the target on
//! both ranks (tensor parallelism, and expert parallelism alone). Greedy requests — two at once,
//! and a prompt prefilled in several chunks — give exactly the tokens of plain unsharded GPU
//! decoding (`ultra generate --device cuda`), with draft rounds; a reused speculative state
//! gives the same tokens again; plain TP serving (no drafter) gives them too. Model: the tiny
//! `qwen3-moe/native` fixture and its drafter. Skips with a `SKIPPED` line where there is no
//! GPU. A binary of its own: virtual ranks must set up CUDA's stream queues before the
//! process's first CUDA call.

mod common;

use std::path::PathBuf;
use std::time::Duration;

use common::{client, collect, fixture, loopback, text_request, wait_idle, MODEL_ID};
use model::plan::tp::Parallelism;
use model::sampling::SamplingParams;
use serve::commands::generate::{generate, load, prompt_ids};
use serve::engine::EngineConfig;
use serve::proto::v1 as pb;
use serve::server::{load_tp_engine, Server};
use tilert::exec::tp::{AllReduceKind, RankPlacement, TpOptions};

async fn start(par: Parallelism, draft: Option<PathBuf>) -> Server {
    let cfg = EngineConfig {
        model_id: MODEL_ID.into(),
        max_running: 4,
        max_waiting: 64,
        max_batched_tokens: 2048,
        ..EngineConfig::default()
    };
    let dir = fixture(MODEL_ID);
    let server = Server::start(loopback(), cfg.model_id.clone(), move || {
        load_tp_engine(
            &dir,
            draft.as_deref(),
            None,
            cfg,
            TpOptions {
                parallelism: par,
                all_reduce: AllReduceKind::Auto,
            },
            RankPlacement::Virtual { device: 0 },
        )
    })
    .await
    .unwrap();
    tokio::time::timeout(Duration::from_secs(120), server.ready())
        .await
        .unwrap()
        .unwrap();
    server
}

/// Plain unsharded GPU greedy decoding of `prompt` (`ultra generate --device cuda`).
fn reference(prompt: &str, max_tokens: usize) -> Vec<u32> {
    let mut loaded = load(&fixture(MODEL_ID)).unwrap();
    loaded.to_gpu(0).unwrap();
    let ids = prompt_ids(&loaded, Some(prompt), None, false).unwrap();
    let params = SamplingParams {
        max_tokens,
        ignore_eos: true,
        ..SamplingParams::greedy()
    };
    generate(&loaded, &ids, &params, &mut Vec::new())
        .unwrap()
        .tokens
}

fn greedy(max_tokens: u32) -> pb::SamplingParams {
    pb::SamplingParams {
        temperature: Some(0.0),
        max_tokens: Some(max_tokens),
        ignore_eos: Some(true),
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn speculative_serving_under_tp_equals_plain_greedy() {
    comm::symmetric::prepare_virtual_ranks();
    let Some(_ctx) =
        ultra_kernels::gpu_for_test("speculative_serving_under_tp_equals_plain_greedy")
    else {
        return;
    };
    let short = "The quick brown fox";
    // Longer than one prefill pass (16 tokens): chunked prefill on the ranks.
    let long = "Once upon a time there was a little model that split its layers over two ranks \
                and drafted blocks of tokens on the first one";
    let want_short = reference(short, 24);
    let want_long = reference(long, 24);
    for par in [Parallelism::tensor(2), Parallelism::expert(2)] {
        let t0 = std::time::Instant::now();
        let server = start(par, Some(fixture("drafters/qwen3-moe-dflash"))).await;
        let info = server.state().engine().unwrap().info().clone();
        assert!(
            info.spec_block_size.is_some(),
            "{par}: the server drafts ({info:?})"
        );
        let mut c = client(&server).await;
        let mut c2 = c.clone();
        let (a, b) = tokio::join!(
            c2.generate(text_request(short, greedy(24))),
            c.generate(text_request(long, greedy(24)))
        );
        for (stream, want) in [(a, &want_short), (b, &want_long)] {
            let got = collect(stream.unwrap().into_inner()).await;
            assert_eq!(
                &got.tokens, want,
                "{par}: speculative TP serving vs plain greedy"
            );
            let spec = got.complete.spec.expect("speculation stats");
            assert!(
                spec.drafts > 0 && spec.draft_tokens >= spec.drafts,
                "{par}: {spec:?}"
            );
        }
        // A reused (pooled) speculative state gives the same tokens again.
        let again = collect(
            c.generate(text_request(short, greedy(24)))
                .await
                .unwrap()
                .into_inner(),
        )
        .await;
        assert_eq!(again.tokens, want_short, "{par}: reused state");
        wait_idle(&server).await;
        server.shutdown().await.unwrap();
        eprintln!(
            "{par}: speculative TP serving checked in {:.1?}",
            t0.elapsed()
        );
    }
    // Plain TP serving (no drafter) gives the same tokens.
    let server = start(Parallelism::tensor(2), None).await;
    assert!(server
        .state()
        .engine()
        .unwrap()
        .info()
        .spec_block_size
        .is_none());
    let mut c = client(&server).await;
    let got = collect(
        c.generate(text_request(short, greedy(24)))
            .await
            .unwrap()
            .into_inner(),
    )
    .await;
    assert_eq!(got.tokens, want_short, "plain TP serving vs plain greedy");
    server.shutdown().await.unwrap();
}
