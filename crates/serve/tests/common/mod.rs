//! Helpers shared by the server test binaries (`serve_api.rs` on the CPU, `gpu_serve.rs` on the
//! GPU): the fixture, loopback addresses, a gRPC client, request builders, a stream collector
//! that checks message order, and waiting for the engine to go idle. Not every binary uses
//! every helper.
#![allow(dead_code)]

use std::path::PathBuf;
use std::time::{Duration, Instant};

use serve::proto::v1 as pb;
use serve::proto::v1::engine_client::EngineClient;
use serve::server::{ServeOptions, Server};
use tonic::transport::Channel;

/// The model both binaries serve: the tiny `qwen3-moe/native` fixture (tokenizer and chat
/// template included).
pub const MODEL_ID: &str = "qwen3-moe/native";

/// A fixture checkpoint folder: `$ULTRA_FIXTURES/<rel>` if set (a GPU bundle run elsewhere),
/// else the repository's `fixtures/<rel>`.
pub fn fixture(rel: &str) -> PathBuf {
    std::env::var_os("ULTRA_FIXTURES")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../fixtures"))
        .join(rel)
}

/// The embedded default model (`ultra-tiny-code`) as the repository holds it: its target
/// checkpoint and its trained DFlash drafter (`crates/default-model/assets/`, found beside the
/// fixtures, so a GPU bundle run elsewhere reads them from its checkout too).
pub fn default_model_dirs() -> (PathBuf, PathBuf) {
    let assets = fixture("../crates/default-model/assets");
    (assets.join("target"), assets.join("drafter"))
}

/// Both servers on loopback, on ports the OS picks.
pub fn loopback() -> ServeOptions {
    ServeOptions::new(
        "127.0.0.1:0".parse().unwrap(),
        "127.0.0.1:0".parse().unwrap(),
    )
}

pub async fn client(s: &Server) -> EngineClient<Channel> {
    EngineClient::connect(format!("http://{}", s.grpc_addr))
        .await
        .unwrap()
}

pub fn text_request(prompt: &str, s: pb::SamplingParams) -> pb::GenerateRequest {
    pb::GenerateRequest {
        input: Some(pb::generate_request::Input::Text(prompt.into())),
        sampling: Some(s),
        ..Default::default()
    }
}

/// A request that runs until cancelled (3000 tokens, EOS ignored).
pub fn long_request(id: &str) -> pb::GenerateRequest {
    pb::GenerateRequest {
        request_id: id.into(),
        ..text_request(
            "count",
            pb::SamplingParams {
                max_tokens: Some(3000),
                ignore_eos: Some(true),
                ..Default::default()
            },
        )
    }
}

/// Everything a Generate stream sent, checked for order: chunks, then exactly one Complete,
/// then the end.
pub struct Streamed {
    pub tokens: Vec<u32>,
    pub text: String,
    pub chunks: usize,
    pub complete: pb::Complete,
}

pub async fn collect(mut stream: tonic::Streaming<pb::GenerateResponse>) -> Streamed {
    let (mut tokens, mut text, mut chunks, mut complete) = (Vec::new(), String::new(), 0, None);
    while let Some(m) = stream.message().await.unwrap() {
        assert!(complete.is_none(), "a message after Complete");
        match m.event.unwrap() {
            pb::generate_response::Event::Chunk(c) => {
                tokens.extend(c.token_ids);
                text.push_str(&c.text);
                chunks += 1;
            }
            pb::generate_response::Event::Complete(c) => complete = Some(c),
        }
    }
    Streamed {
        tokens,
        text,
        chunks,
        complete: complete.expect("the stream ended without Complete"),
    }
}

/// Waits until the engine holds no live request (the slot of a cancelled one is free).
pub async fn wait_idle(s: &Server) {
    let engine = s.state().engine().unwrap().clone();
    let t0 = Instant::now();
    while engine.load().1 != 0 {
        assert!(
            t0.elapsed() < Duration::from_secs(20),
            "requests still live: {:?}",
            engine.load()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Tokens and logprobs of a streamed request, checking one logprob entry per token and noting
/// whether a chunk carried several tokens.
pub async fn stream_logprobs(
    c: &mut EngineClient<Channel>,
    req: pb::GenerateRequest,
) -> (Vec<u32>, Vec<pb::TokenLogprob>, bool) {
    let (mut ids, mut lps, mut multi) = (Vec::new(), Vec::new(), false);
    let mut stream = c.generate(req).await.unwrap().into_inner();
    while let Some(m) = stream.message().await.unwrap() {
        if let Some(pb::generate_response::Event::Chunk(c)) = m.event {
            assert_eq!(c.logprobs.len(), c.token_ids.len());
            multi |= c.token_ids.len() > 1;
            ids.extend(c.token_ids);
            lps.extend(c.logprobs);
        }
    }
    (ids, lps, multi)
}
