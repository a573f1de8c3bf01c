//! `ultra serve` over real loopback sockets (gRPC through tonic's client, HTTP through a raw
//! TCP client so that malformed bytes can be sent): stream order and completeness, the same
//! output as `ultra generate` for the same seed, cancellation (Abort and disconnect) freeing
//! the slot, malformed requests answered with the right status while the server keeps serving,
//! back-pressure, loading / draining, speculative decoding, and a bounded load test.
//! Model: the tiny `qwen3-moe/native` fixture (tokenizer and chat template included).

mod common;

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use common::{
    client, collect, fixture, long_request, loopback, stream_logprobs, text_request, wait_idle,
    MODEL_ID,
};
use model::sampling::SamplingParams;
use serde_json::{json, Value};
use serve::commands::generate::{generate, load, prompt_ids, Generation, Loaded};
use serve::engine::EngineConfig;
use serve::proto::v1 as pb;
use serve::proto::v1::engine_client::EngineClient;
use serve::server::{load_cpu_engine, Server};
use tonic::transport::Channel;

fn engine_cfg(max_running: usize, max_waiting: usize) -> EngineConfig {
    EngineConfig {
        model_id: MODEL_ID.into(),
        max_running,
        max_waiting,
        ..EngineConfig::default()
    }
}

async fn start_with(cfg: EngineConfig, draft: Option<PathBuf>) -> Server {
    start_model(fixture(MODEL_ID), cfg, draft).await
}

async fn start_model(dir: PathBuf, cfg: EngineConfig, draft: Option<PathBuf>) -> Server {
    let server = Server::start(loopback(), cfg.model_id.clone(), move || {
        load_cpu_engine(&dir, draft.as_deref(), None, cfg)
    })
    .await
    .unwrap();
    tokio::time::timeout(Duration::from_secs(60), server.ready())
        .await
        .unwrap()
        .unwrap();
    server
}

async fn start(max_running: usize, max_waiting: usize) -> Server {
    start_with(engine_cfg(max_running, max_waiting), None).await
}

async fn health_client(s: &Server) -> tonic_health::pb::health_client::HealthClient<Channel> {
    let ch = Channel::from_shared(format!("http://{}", s.grpc_addr))
        .unwrap()
        .connect()
        .await
        .unwrap();
    tonic_health::pb::health_client::HealthClient::new(ch)
}

fn reference(prompt: &str, params: &SamplingParams) -> (Loaded, Vec<u32>, Generation) {
    let loaded = load(&fixture(MODEL_ID)).unwrap();
    let ids = prompt_ids(&loaded, Some(prompt), None, false).unwrap();
    let g = generate(&loaded, &ids, params, &mut Vec::new()).unwrap();
    (loaded, ids, g)
}

// ---------------------------------------------------------------------------------------------
// A small HTTP/1.1 client over a raw socket.
// ---------------------------------------------------------------------------------------------

struct HttpResponse {
    status: u16,
    headers: HashMap<String, String>,
    body: Vec<u8>,
}

impl HttpResponse {
    fn json(&self) -> Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&self.body)))
    }

    /// The `data:` payloads of an SSE body.
    fn sse(&self) -> Vec<String> {
        String::from_utf8(self.body.clone())
            .unwrap()
            .lines()
            .filter_map(|l| l.strip_prefix("data: ").map(str::to_string))
            .collect()
    }
}

/// Streams a completion request, reads up to its first `data:` line and returns it; the
/// connection closes when this returns (a client that goes away mid-stream).
fn first_sse_line_then_disconnect(addr: SocketAddr, body: Value) -> String {
    let s = send_request(
        addr,
        "POST",
        "/v1/completions",
        body.to_string().as_bytes(),
        "",
    );
    let mut r = BufReader::new(s);
    let mut line = String::new();
    while !line.starts_with("data: ") {
        line.clear();
        r.read_line(&mut line).unwrap();
    }
    line
}

fn send_request(addr: SocketAddr, method: &str, path: &str, body: &[u8], extra: &str) -> TcpStream {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    let head = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n{extra}\r\n",
        body.len()
    );
    s.write_all(head.as_bytes()).unwrap();
    s.write_all(body).unwrap();
    s
}

fn http(addr: SocketAddr, method: &str, path: &str, body: &[u8]) -> HttpResponse {
    http_with(addr, method, path, body, "")
}

fn http_with(addr: SocketAddr, method: &str, path: &str, body: &[u8], extra: &str) -> HttpResponse {
    let s = send_request(addr, method, path, body, extra);
    let mut r = BufReader::new(s);
    let mut line = String::new();
    r.read_line(&mut line).unwrap();
    let status: u16 = line.split(' ').nth(1).unwrap().parse().unwrap();
    let mut headers = HashMap::new();
    loop {
        line.clear();
        r.read_line(&mut line).unwrap();
        let l = line.trim_end();
        if l.is_empty() {
            break;
        }
        let (k, v) = l.split_once(':').unwrap();
        headers.insert(k.to_ascii_lowercase(), v.trim().to_string());
    }
    let mut body = Vec::new();
    if headers
        .get("transfer-encoding")
        .is_some_and(|t| t == "chunked")
    {
        loop {
            line.clear();
            r.read_line(&mut line).unwrap();
            let n = usize::from_str_radix(line.trim(), 16).unwrap();
            let mut chunk = vec![0; n + 2];
            r.read_exact(&mut chunk).unwrap();
            if n == 0 {
                break;
            }
            body.extend_from_slice(&chunk[..n]);
        }
    } else {
        r.read_to_end(&mut body).unwrap();
    }
    HttpResponse {
        status,
        headers,
        body,
    }
}

/// Runs a blocking HTTP call off the async runtime.
async fn http_async(addr: SocketAddr, path: &'static str, body: Value) -> HttpResponse {
    tokio::task::spawn_blocking(move || http(addr, "POST", path, body.to_string().as_bytes()))
        .await
        .unwrap()
}

async fn get(addr: SocketAddr, path: &'static str) -> HttpResponse {
    tokio::task::spawn_blocking(move || http(addr, "GET", path, b""))
        .await
        .unwrap()
}

fn metric(text: &str, name: &str) -> f64 {
    text.lines()
        .filter(|l| l.starts_with(name) && !l.starts_with('#'))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_matches_ultra_generate_greedy_and_seeded() {
    let server = start(4, 16).await;
    let mut c = client(&server).await;
    let prompt = "The quick brown fox";
    for (temperature, seed) in [(0.0f32, None), (0.9, Some(1234u64))] {
        let params = SamplingParams {
            temperature,
            seed,
            top_k: Some(40),
            max_tokens: 24,
            ignore_eos: true,
            ..SamplingParams::greedy()
        };
        let (_, ids, want) = reference(prompt, &params);
        let s = pb::SamplingParams {
            temperature: Some(temperature),
            seed,
            top_k: Some(40),
            max_tokens: Some(24),
            ignore_eos: Some(true),
            ..Default::default()
        };
        let got = collect(
            c.generate(text_request(prompt, s.clone()))
                .await
                .unwrap()
                .into_inner(),
        )
        .await;
        assert_eq!(got.tokens, want.tokens, "temperature {temperature}");
        assert_eq!(got.text, want.text);
        assert_eq!(got.chunks, 24, "one chunk per decode step");
        assert_eq!(got.complete.finish_reason, "length");
        assert_eq!(got.complete.stop_cause, "max_tokens");
        let u = got.complete.usage.unwrap();
        assert_eq!(
            (u.prompt_tokens as usize, u.completion_tokens),
            (ids.len(), 24)
        );
        assert!(got.complete.timing.unwrap().time_to_first_token_ns > 0);
        // The unary Complete gives the same, as do token ids in.
        let req = pb::GenerateRequest {
            input: Some(pb::generate_request::Input::TokenIds(pb::TokenIds {
                ids: ids.clone(),
            })),
            sampling: Some(s),
            logprobs: Some(2),
            ..Default::default()
        };
        let one = c.complete(req).await.unwrap().into_inner();
        assert_eq!(one.token_ids, want.tokens);
        assert_eq!(one.text, want.text);
        assert_eq!(one.logprobs.len(), 24);
        assert!(one
            .logprobs
            .iter()
            .all(|l| l.top.len() == 2 && l.logprob <= 0.0));
    }
    // Tokenize / Detokenize / GetModelInfo / health.
    let t = c
        .tokenize(pb::TokenizeRequest {
            input: Some(pb::tokenize_request::Input::Text(prompt.into())),
            add_special_tokens: None,
        })
        .await
        .unwrap()
        .into_inner();
    let d = c
        .detokenize(pb::DetokenizeRequest {
            token_ids: t.token_ids.clone(),
            skip_special_tokens: None,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(d.text, prompt);
    let info = c
        .get_model_info(pb::GetModelInfoRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(info.model_id, MODEL_ID);
    assert!(info.has_chat_template && !info.speculative);
    let mut h = health_client(&server).await;
    let st = h
        .check(tonic_health::pb::HealthCheckRequest {
            service: "ultra.v1.Engine".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        st.status,
        tonic_health::pb::health_check_response::ServingStatus::Serving as i32
    );
    server.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_openai_api() {
    let server = start(4, 16).await;
    let addr = server.http_addr;
    let prompt = "Once upon a time";
    let params = SamplingParams {
        temperature: 0.7,
        seed: Some(99),
        max_tokens: 12,
        ignore_eos: true,
        ..SamplingParams::greedy()
    };
    let (_, ids, want) = reference(prompt, &params);
    let body = json!({"model": MODEL_ID, "prompt": prompt, "max_tokens": 12, "temperature": 0.7,
        "seed": 99, "ignore_eos": true, "logprobs": 3});
    let r = http_async(addr, "/v1/completions", body.clone()).await;
    assert_eq!(r.status, 200);
    let v = r.json();
    assert_eq!(v["object"], "text_completion");
    assert_eq!(v["choices"][0]["text"], want.text.as_str());
    assert_eq!(v["choices"][0]["finish_reason"], "length");
    assert_eq!(v["usage"]["prompt_tokens"], ids.len());
    assert_eq!(v["usage"]["completion_tokens"], 12);
    assert_eq!(
        v["choices"][0]["logprobs"]["token_logprobs"]
            .as_array()
            .unwrap()
            .len(),
        12
    );
    // Keyed by token text (OpenAI's format), so byte tokens decoding alike may share a key.
    let top = v["choices"][0]["logprobs"]["top_logprobs"][0]
        .as_object()
        .unwrap()
        .len();
    assert!((1..=3).contains(&top), "{top} top logprobs");

    // Streaming with usage: content chunks, the finishing chunk, the usage chunk, [DONE].
    let mut sb = body.clone();
    sb["stream"] = json!(true);
    sb["stream_options"] = json!({"include_usage": true});
    let r = tokio::task::spawn_blocking(move || {
        http_with(
            addr,
            "POST",
            "/v1/completions",
            sb.to_string().as_bytes(),
            "x-request-id: my-req-1\r\n",
        )
    })
    .await
    .unwrap();
    assert_eq!(r.status, 200);
    assert!(r.headers["content-type"].starts_with("text/event-stream"));
    assert_eq!(r.headers["x-request-id"], "my-req-1");
    let frames = r.sse();
    assert_eq!(frames.last().unwrap(), "[DONE]");
    let chunks: Vec<Value> = frames[..frames.len() - 1]
        .iter()
        .map(|f| serde_json::from_str(f).unwrap())
        .collect();
    let (usage_chunk, content) = chunks.split_last().unwrap();
    assert_eq!(usage_chunk["choices"], json!([]));
    assert_eq!(usage_chunk["usage"]["completion_tokens"], 12);
    let text: String = content
        .iter()
        .map(|c| c["choices"][0]["text"].as_str().unwrap())
        .collect();
    assert_eq!(text, want.text);
    assert!(content
        .iter()
        .all(|c| c["id"] == content[0]["id"] && c["usage"].is_null()));
    assert_eq!(content[0]["id"], "cmpl-my-req-1");
    let (last, rest) = content.split_last().unwrap();
    assert_eq!(last["choices"][0]["finish_reason"], "length");
    assert!(rest
        .iter()
        .all(|c| c["choices"][0]["finish_reason"].is_null()));

    // Chat: the template is applied, as `ultra generate --chat`.
    let loaded = load(&fixture(MODEL_ID)).unwrap();
    let chat_ids = prompt_ids(&loaded, Some("Hi there"), None, true).unwrap();
    let greedy = SamplingParams {
        max_tokens: 10,
        ..SamplingParams::greedy()
    };
    let want_chat = generate(&loaded, &chat_ids, &greedy, &mut Vec::new()).unwrap();
    let chat = json!({"messages": [{"role": "user", "content": "Hi there"}], "max_tokens": 10,
        "temperature": 0, "stream": true, "logprobs": true, "top_logprobs": 1});
    let r = http_async(addr, "/v1/chat/completions", chat).await;
    assert_eq!(r.status, 200);
    let frames = r.sse();
    assert_eq!(frames.last().unwrap(), "[DONE]");
    let chunks: Vec<Value> = frames[..frames.len() - 1]
        .iter()
        .map(|f| serde_json::from_str(f).unwrap())
        .collect();
    assert_eq!(chunks[0]["object"], "chat.completion.chunk");
    assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
    let text: String = chunks
        .iter()
        .map(|c| c["choices"][0]["delta"]["content"].as_str().unwrap())
        .collect();
    assert_eq!(text, want_chat.text);
    let n_lp: usize = chunks
        .iter()
        .filter_map(|c| {
            c["choices"][0]["logprobs"]["content"]
                .as_array()
                .map(Vec::len)
        })
        .sum();
    assert_eq!(n_lp, want_chat.tokens.len());
    assert_eq!(
        chunks.last().unwrap()["choices"][0]["finish_reason"],
        want_chat.finish_reason.as_str()
    );

    // Models, health, metrics.
    let m = get(addr, "/v1/models").await.json();
    assert_eq!(m["data"][0]["id"], MODEL_ID);
    assert_eq!(get(addr, "/health").await.status, 200);
    let metrics = String::from_utf8(get(addr, "/metrics").await.body).unwrap();
    for name in [
        "vllm:time_to_first_token_seconds_count",
        "vllm:inter_token_latency_seconds_count",
        "vllm:e2e_request_latency_seconds_count",
        "vllm:num_requests_running",
        "vllm:num_requests_waiting",
        "vllm:spec_decode_num_drafts_total",
        "vllm:spec_decode_num_draft_tokens_total",
        "vllm:spec_decode_num_accepted_tokens_total",
    ] {
        assert!(metrics.contains(name), "{name} missing from /metrics");
    }
    assert_eq!(
        metric(&metrics, "vllm:e2e_request_latency_seconds_count"),
        3.0
    );
    assert_eq!(
        metric(&metrics, "vllm:generation_tokens_total"),
        (12 + 12 + want_chat.tokens.len()) as f64
    );
    server.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_requests_get_status_codes_and_the_server_keeps_serving() {
    let server = start(2, 8).await;
    let addr = server.http_addr;
    let cases: Vec<(&[u8], u16, &str)> = vec![
        (b"{not json", 400, "invalid JSON"),
        (
            b"{\"prompt\": \"a\xff\xfe\", \"max_tokens\": 2}",
            400,
            "UTF-8",
        ),
        (
            br#"{"model": "nope", "prompt": "a"}"#,
            404,
            "does not exist",
        ),
        (br#"{"prompt": "a", "max_tokens": -1}"#, 400, "at least 1"),
        (br#"{"prompt": "a", "max_tokens": 0}"#, 400, "at least 1"),
        (
            br#"{"prompt": "a", "max_tokens": 1000000000000}"#,
            400,
            "maximum context length",
        ),
        (
            br#"{"prompt": "a", "max_tokens": 1e400}"#,
            400,
            "invalid JSON",
        ),
        (br#"{"prompt": "a", "temperature": -1}"#, 400, "temperature"),
        (br#"{"prompt": [1, 2, 999999]}"#, 400, "vocabulary"),
        (br#"{"prompt": []}"#, 400, "no tokens"),
        (br#"{"max_tokens": 3}"#, 400, "invalid JSON"),
        (br#"{"prompt": "a", "n": 0}"#, 400, "n must be at least 1"),
        (br#"{"prompt": "a", "n": 9}"#, 400, "at most 8 per request"),
        (
            br#"{"prompt": ["a", "b", "c"], "n": 3}"#,
            400,
            "9 sequences",
        ),
        (
            br#"{"prompt": "a", "prompt_logprobs": 21}"#,
            400,
            "between 0 and 20",
        ),
        (
            br#"{"prompt": "a", "prompt_logprobs": -1}"#,
            400,
            "between 0 and 20",
        ),
        (
            br#"{"prompt": "a", "prompt_logprobs": 1, "stream": true}"#,
            400,
            "not available when stream",
        ),
        (br#"{"prompt": [[1, 2], [3, 999999]]}"#, 400, "vocabulary"),
    ];
    for (body, status, needle) in cases {
        let r = tokio::task::spawn_blocking(move || http(addr, "POST", "/v1/completions", body))
            .await
            .unwrap();
        let text = String::from_utf8_lossy(&r.body).to_string();
        assert_eq!(
            r.status,
            status,
            "{}: {text}",
            String::from_utf8_lossy(body)
        );
        assert!(text.contains(needle), "{text} lacks {needle}");
        assert_eq!(r.json()["error"]["code"], status);
    }
    // A prompt longer than the context.
    let long = "word ".repeat(5000);
    let r = http_async(
        addr,
        "/v1/completions",
        json!({"prompt": long, "max_tokens": 1}),
    )
    .await;
    assert_eq!(r.status, 400);
    assert!(String::from_utf8_lossy(&r.body).contains("maximum context length"));
    let r = http_async(addr, "/v1/chat/completions", json!({"messages": "hi"})).await;
    assert_eq!(r.status, 400);
    assert_eq!(get(addr, "/nope").await.status, 404);

    // gRPC: the same classes of error.
    let mut c = client(&server).await;
    let bad = |s: pb::SamplingParams, model: &str| pb::GenerateRequest {
        model: model.into(),
        ..text_request("hello", s)
    };
    let e = c
        .generate(bad(Default::default(), "nope"))
        .await
        .err()
        .unwrap();
    assert_eq!(e.code(), tonic::Code::NotFound);
    let e = c
        .generate(bad(
            pb::SamplingParams {
                top_p: Some(2.0),
                ..Default::default()
            },
            "",
        ))
        .await
        .err()
        .unwrap();
    assert_eq!(e.code(), tonic::Code::InvalidArgument);
    let e = c
        .generate(bad(
            pb::SamplingParams {
                max_tokens: Some(u32::MAX),
                ..Default::default()
            },
            "",
        ))
        .await
        .err()
        .unwrap();
    assert_eq!(e.code(), tonic::Code::InvalidArgument);
    let e = c
        .generate(pb::GenerateRequest::default())
        .await
        .err()
        .unwrap();
    assert_eq!(e.code(), tonic::Code::InvalidArgument);

    // Still serving.
    let r = http_async(
        addr,
        "/v1/completions",
        json!({"prompt": "hello", "max_tokens": 3, "temperature": 0}),
    )
    .await;
    assert_eq!(r.status, 200);
    assert_eq!(r.json()["usage"]["completion_tokens"], 3);
    server.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn abort_and_disconnect_free_the_slot() {
    // One slot: the next request can only run once the cancelled one is gone.
    let server = start(1, 8).await;
    let mut c = client(&server).await;

    // Abort by id.
    let mut stream = c
        .generate(long_request("long-1"))
        .await
        .unwrap()
        .into_inner();
    let first = stream.message().await.unwrap().unwrap();
    assert_eq!(first.request_id, "long-1");
    // The id is taken while it runs.
    let e = c.generate(long_request("long-1")).await.err().unwrap();
    assert_eq!(e.code(), tonic::Code::InvalidArgument);
    assert!(
        c.abort(pb::AbortRequest {
            request_id: "long-1".into()
        })
        .await
        .unwrap()
        .into_inner()
        .found
    );
    let rest = collect(stream).await;
    assert_eq!(rest.complete.finish_reason, "abort");
    assert!(rest.tokens.len() < 2999);
    assert!(
        !c.abort(pb::AbortRequest {
            request_id: "long-1".into()
        })
        .await
        .unwrap()
        .into_inner()
        .found
    );
    wait_idle(&server).await;

    // gRPC client disconnect.
    let mut stream = c
        .generate(long_request("long-2"))
        .await
        .unwrap()
        .into_inner();
    stream.message().await.unwrap().unwrap();
    drop(stream);
    wait_idle(&server).await;

    // HTTP client disconnect mid-stream.
    let addr = server.http_addr;
    tokio::task::spawn_blocking(move || {
        first_sse_line_then_disconnect(
            addr,
            json!({"prompt": "count", "max_tokens": 3000, "ignore_eos": true, "stream": true}),
        )
    })
    .await
    .unwrap();
    wait_idle(&server).await;

    // The slot is free: a short request completes.
    let got = collect(
        c.generate(text_request(
            "hi",
            pb::SamplingParams {
                max_tokens: Some(4),
                ignore_eos: Some(true),
                ..Default::default()
            },
        ))
        .await
        .unwrap()
        .into_inner(),
    )
    .await;
    assert_eq!(got.complete.finish_reason, "length");
    assert_eq!(got.tokens.len(), 4);
    let metrics = server.state().engine().unwrap().metrics().render();
    assert_eq!(
        metric(
            &metrics,
            "vllm:request_success_total{finished_reason=\"abort\""
        ),
        3.0
    );
    // The gauge drops when the scheduler retires the sequence, just after the final message.
    let mut running = metric(&metrics, "vllm:num_requests_running");
    for _ in 0..100 {
        if running == 0.0 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        running = metric(
            &server.state().engine().unwrap().metrics().render(),
            "vllm:num_requests_running",
        );
    }
    assert_eq!(running, 0.0);
    server.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_queue_is_refused_with_429_and_resource_exhausted() {
    let server = start(1, 1).await;
    let mut c = client(&server).await;
    let mut running = c.generate(long_request("a")).await.unwrap().into_inner();
    running.message().await.unwrap().unwrap();
    // `a` runs; `b` waits in the only queue slot.
    let waiting = c.generate(long_request("b")).await.unwrap().into_inner();
    let e = c.generate(long_request("c")).await.err().unwrap();
    assert_eq!(e.code(), tonic::Code::ResourceExhausted);
    let r = http_async(
        server.http_addr,
        "/v1/completions",
        json!({"prompt": "x", "max_tokens": 2}),
    )
    .await;
    assert_eq!(r.status, 429);
    assert_eq!(r.json()["error"]["code"], 429);
    // Abort of a waiting request ends its stream too.
    assert!(
        c.abort(pb::AbortRequest {
            request_id: "b".into()
        })
        .await
        .unwrap()
        .into_inner()
        .found
    );
    assert_eq!(collect(waiting).await.complete.finish_reason, "abort");
    assert!(
        c.abort(pb::AbortRequest {
            request_id: "a".into()
        })
        .await
        .unwrap()
        .into_inner()
        .found
    );
    assert_eq!(collect(running).await.complete.finish_reason, "abort");
    server.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_is_503_while_loading_and_shutdown_drains() {
    let (release_tx, release_rx) = std::sync::mpsc::channel::<()>();
    let cfg = engine_cfg(4, 8);
    let server = Server::start(loopback(), MODEL_ID.into(), move || {
        release_rx.recv()?;
        load_cpu_engine(&fixture(MODEL_ID), None, None, cfg)
    })
    .await
    .unwrap();
    let r = get(server.http_addr, "/health").await;
    assert_eq!(r.status, 503);
    assert_eq!(r.json()["error"]["message"], "Loading model");
    let r = http_async(server.http_addr, "/v1/completions", json!({"prompt": "x"})).await;
    assert_eq!(r.status, 503);
    let mut c = client(&server).await;
    assert_eq!(
        c.generate(long_request("x")).await.err().unwrap().code(),
        tonic::Code::Unavailable
    );
    let mut h = health_client(&server).await;
    let check = tonic_health::pb::HealthCheckRequest {
        service: "ultra.v1.Engine".into(),
    };
    let st = h.check(check.clone()).await.unwrap().into_inner().status;
    assert_eq!(
        st,
        tonic_health::pb::health_check_response::ServingStatus::NotServing as i32
    );
    release_tx.send(()).unwrap();
    server.ready().await.unwrap();
    assert_eq!(get(server.http_addr, "/health").await.status, 200);
    let st = h.check(check).await.unwrap().into_inner().status;
    assert_eq!(
        st,
        tonic_health::pb::health_check_response::ServingStatus::Serving as i32
    );

    // Shutdown while two requests run: both finish normally (drained, not aborted).
    let req = |id: &str| pb::GenerateRequest {
        request_id: id.into(),
        ..text_request(
            "drain",
            pb::SamplingParams {
                max_tokens: Some(40),
                ignore_eos: Some(true),
                ..Default::default()
            },
        )
    };
    let mut s1 = c.generate(req("d1")).await.unwrap().into_inner();
    let s2 = c.generate(req("d2")).await.unwrap().into_inner();
    s1.message().await.unwrap().unwrap();
    let engine = server.state().engine().unwrap().clone();
    let stopping = tokio::spawn(server.shutdown());
    let t0 = Instant::now();
    while !engine.is_draining() {
        assert!(t0.elapsed() < Duration::from_secs(10));
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert!(matches!(
        engine.submit(serve::engine::GenerateRequest {
            id: String::new(),
            prompt: vec![1, 2],
            params: SamplingParams::greedy(),
            max_tokens: Some(2),
            logprobs: None,
            prompt_logprobs: None,
        }),
        Err(serve::engine::SubmitError::ShuttingDown)
    ));
    let (a, b) = (collect(s1).await, collect(s2).await);
    for s in [&a, &b] {
        assert_eq!(s.complete.finish_reason, "length");
    }
    assert_eq!(
        a.tokens.len(),
        39,
        "the first chunk was read before collecting"
    );
    assert_eq!(b.tokens.len(), 40);
    stopping.await.unwrap().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn speculative_server_matches_ultra_generate_and_counts_drafts() {
    let draft = fixture("drafters/qwen3-moe-dflash");
    let server = start_with(engine_cfg(4, 8), Some(draft)).await;
    let mut c = client(&server).await;
    let params = SamplingParams {
        max_tokens: 20,
        ignore_eos: true,
        ..SamplingParams::greedy()
    };
    let (_, _, want) = reference("The quick brown fox", &params);
    let s = pb::SamplingParams {
        max_tokens: Some(20),
        ignore_eos: Some(true),
        ..Default::default()
    };
    // Two at once: the scheduler serves both workers' verify calls.
    let mut c2 = c.clone();
    let (a, b) = tokio::join!(
        c2.generate(text_request("The quick brown fox", s.clone())),
        c.generate(text_request("The quick brown fox", s))
    );
    for stream in [a.unwrap().into_inner(), b.unwrap().into_inner()] {
        let got = collect(stream).await;
        assert_eq!(got.tokens, want.tokens);
        assert_eq!(got.text, want.text);
        assert_eq!(got.complete.finish_reason, "length");
        let spec = got.complete.spec.unwrap();
        assert!(spec.drafts > 0 && spec.draft_tokens >= spec.drafts);
        assert!(spec.mean_acceptance_length >= 1.0);
    }
    // n = 2 over HTTP: two speculative sequences, both greedy, both `ultra generate`'s text.
    let r = http_async(
        server.http_addr,
        "/v1/completions",
        json!({"prompt": "The quick brown fox", "n": 2, "max_tokens": 20, "temperature": 0,
            "ignore_eos": true}),
    )
    .await;
    assert_eq!(r.status, 200);
    let v = r.json();
    for c in 0..2 {
        assert_eq!(v["choices"][c]["index"], c);
        assert_eq!(v["choices"][c]["text"], want.text.as_str());
    }
    // The drafter's path computes no prompt logprobs.
    let r = http_async(
        server.http_addr,
        "/v1/completions",
        json!({"prompt": "a", "max_tokens": 2, "prompt_logprobs": 1}),
    )
    .await;
    assert_eq!(r.status, 400);
    assert_eq!(r.json()["error"]["param"], "prompt_logprobs");
    let m = server.state().engine().unwrap().metrics().render();
    assert!(metric(&m, "vllm:spec_decode_num_drafts_total") > 0.0);
    assert!(metric(&m, "vllm:spec_decode_num_draft_tokens_total") > 0.0);
    server.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn load_test_nothing_lost_or_corrupted() {
    const REQUESTS: usize = 256;
    const CONCURRENCY: usize = 64;
    const PROMPTS: usize = 8;
    let server = start(16, 256).await;
    let loaded = load(&fixture(MODEL_ID)).unwrap();
    // Distinct prompts and seeds; references from `ultra generate`'s code path.
    let cases: Vec<(Vec<u32>, u64, Vec<u32>)> = (0..PROMPTS)
        .map(|i| {
            let ids: Vec<u32> = (0..(4 + i as u32))
                .map(|j| (10 + 37 * (i as u32) + j) % 256)
                .collect();
            let seed = 1000 + i as u64;
            let params = SamplingParams {
                temperature: 0.8,
                seed: Some(seed),
                max_tokens: 6,
                ignore_eos: true,
                ..SamplingParams::greedy()
            };
            let g = generate(&loaded, &ids, &params, &mut Vec::new()).unwrap();
            (ids, seed, g.tokens)
        })
        .collect();
    let channel = Channel::from_shared(format!("http://{}", server.grpc_addr))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let sem = std::sync::Arc::new(tokio::sync::Semaphore::new(CONCURRENCY));
    let mut tasks = Vec::new();
    for r in 0..REQUESTS {
        let (ids, seed, want) = cases[r % PROMPTS].clone();
        let mut c = EngineClient::new(channel.clone());
        let permit = sem.clone().acquire_owned().await.unwrap();
        tasks.push(tokio::spawn(async move {
            let _p = permit;
            let req = pb::GenerateRequest {
                request_id: format!("load-{r}"),
                input: Some(pb::generate_request::Input::TokenIds(pb::TokenIds { ids })),
                sampling: Some(pb::SamplingParams {
                    temperature: Some(0.8),
                    seed: Some(seed),
                    max_tokens: Some(6),
                    ignore_eos: Some(true),
                    ..Default::default()
                }),
                ..Default::default()
            };
            let got = collect(c.generate(req).await.unwrap().into_inner()).await;
            assert_eq!(got.tokens, want, "request {r}");
            assert_eq!(got.complete.finish_reason, "length");
            assert_eq!(got.complete.usage.unwrap().completion_tokens, 6);
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let m = server.state().engine().unwrap().metrics().render();
    assert_eq!(
        metric(&m, "vllm:request_success_total{finished_reason=\"length\""),
        REQUESTS as f64
    );
    assert_eq!(
        metric(&m, "vllm:generation_tokens_total"),
        (REQUESTS * 6) as f64
    );
    server.shutdown().await.unwrap();
}

/// Chunked prefill (`max_batched_tokens` 5 with a prompt of several dozen tokens: the prompt is
/// prefilled over many steps) gives exactly `ultra generate`'s output, greedy and seeded, while
/// another stream decodes beside it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chunked_prefill_matches_ultra_generate() {
    let mut cfg = engine_cfg(4, 16);
    cfg.max_batched_tokens = 5;
    let server = start_with(cfg, None).await;
    let mut c = client(&server).await;
    let prompt = "The quick brown fox jumps over the lazy dog. ".repeat(4);
    // A stream that is decoding while the long prompt is prefilled.
    let mut c2 = client(&server).await;
    let side = tokio::spawn(async move {
        let s = pb::SamplingParams {
            max_tokens: Some(40),
            ignore_eos: Some(true),
            ..Default::default()
        };
        collect(
            c2.generate(text_request("Hello", s))
                .await
                .unwrap()
                .into_inner(),
        )
        .await
    });
    for (temperature, seed) in [(0.0f32, None), (0.9, Some(4321u64))] {
        let params = SamplingParams {
            temperature,
            seed,
            max_tokens: 16,
            ignore_eos: true,
            ..SamplingParams::greedy()
        };
        let (_, ids, want) = reference(&prompt, &params);
        assert!(ids.len() > 20, "the prompt is long: {} tokens", ids.len());
        let s = pb::SamplingParams {
            temperature: Some(temperature),
            seed,
            max_tokens: Some(16),
            ignore_eos: Some(true),
            ..Default::default()
        };
        let got = collect(
            c.generate(text_request(&prompt, s))
                .await
                .unwrap()
                .into_inner(),
        )
        .await;
        assert_eq!(got.tokens, want.tokens, "temperature {temperature}");
        assert_eq!(got.text, want.text);
    }
    let side = side.await.unwrap();
    let (_, _, want) = reference(
        "Hello",
        &SamplingParams {
            max_tokens: 40,
            ignore_eos: true,
            ..SamplingParams::greedy()
        },
    );
    assert_eq!(side.tokens, want.tokens);
    server.shutdown().await.unwrap();
}

/// With the drafter, chunked prefill too (`max_batched_tokens` 5: the long prompt is prefilled
/// over many steps, a chunk per step, while another speculative stream runs its rounds) gives
/// exactly `ultra generate`'s greedy output (plain decoding, which the one-call speculative
/// prefill also matches), with drafts accepted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn speculative_chunked_prefill_matches_ultra_generate() {
    let mut cfg = engine_cfg(4, 16);
    cfg.max_batched_tokens = 5;
    let server = start_with(cfg, Some(fixture("drafters/qwen3-moe-dflash"))).await;
    let mut c = client(&server).await;
    let mut c2 = client(&server).await;
    let greedy = |n| SamplingParams {
        max_tokens: n,
        ignore_eos: true,
        ..SamplingParams::greedy()
    };
    let pb_greedy = |n| pb::SamplingParams {
        max_tokens: Some(n),
        ignore_eos: Some(true),
        ..Default::default()
    };
    let side = tokio::spawn(async move {
        collect(
            c2.generate(text_request("Hello", pb_greedy(40)))
                .await
                .unwrap()
                .into_inner(),
        )
        .await
    });
    let prompt = "The quick brown fox jumps over the lazy dog. ".repeat(4);
    let (_, ids, want) = reference(&prompt, &greedy(24));
    assert!(ids.len() > 20, "the prompt is long: {} tokens", ids.len());
    let got = collect(
        c.generate(text_request(&prompt, pb_greedy(24)))
            .await
            .unwrap()
            .into_inner(),
    )
    .await;
    assert_eq!(got.tokens, want.tokens);
    assert_eq!(got.text, want.text);
    assert_eq!(
        got.complete.usage.unwrap().prompt_tokens as usize,
        ids.len()
    );
    let spec = got.complete.spec.unwrap();
    assert!(spec.drafts > 0 && spec.draft_tokens >= spec.drafts);
    let side = side.await.unwrap();
    assert_eq!(side.tokens, reference("Hello", &greedy(40)).2.tokens);
    server.shutdown().await.unwrap();
}

/// vLLM's `/tokenize` (a prompt, or chat messages through the template; `return_token_strs`) and
/// `/detokenize`, with their errors.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_tokenize_and_detokenize() {
    let server = start(2, 8).await;
    let addr = server.http_addr;
    let loaded = load(&fixture(MODEL_ID)).unwrap();
    let tok = loaded.tokenizer.as_ref().unwrap();
    let prompt = "The quick brown fox";
    let want = tok.encode(prompt, true).unwrap();
    let r = http_async(
        addr,
        "/tokenize",
        json!({"model": MODEL_ID, "prompt": prompt}),
    )
    .await;
    assert_eq!(r.status, 200);
    let v = r.json();
    let ids: Vec<u32> = serde_json::from_value(v["tokens"].clone()).unwrap();
    assert_eq!(ids, want);
    assert_eq!(v["count"], want.len());
    assert_eq!(v["max_model_len"], 4096);
    assert!(v["token_strs"].is_null());
    let r = http_async(
        addr,
        "/tokenize",
        json!({"prompt": prompt, "add_special_tokens": false, "return_token_strs": true}),
    )
    .await;
    let v = r.json();
    let ids: Vec<u32> = serde_json::from_value(v["tokens"].clone()).unwrap();
    assert_eq!(ids, tok.encode(prompt, false).unwrap());
    let strs: Vec<String> = serde_json::from_value(v["token_strs"].clone()).unwrap();
    let expect: Vec<String> = ids.iter().map(|&t| tok.id_to_token(t).unwrap()).collect();
    assert_eq!(strs, expect);
    // Chat messages: the same ids as a chat completion's prompt.
    let msgs = [model::tokenizer::ChatMessage::user("Hi there")];
    let text = tok.apply_chat_template(&msgs, true).unwrap();
    let want_chat = tok.encode(&text, false).unwrap();
    let r = http_async(
        addr,
        "/tokenize",
        json!({"messages": [{"role": "user", "content": "Hi there"}]}),
    )
    .await;
    assert_eq!(r.status, 200);
    let ids: Vec<u32> = serde_json::from_value(r.json()["tokens"].clone()).unwrap();
    assert_eq!(ids, want_chat);
    let no_gen = tok
        .encode(&tok.apply_chat_template(&msgs, false).unwrap(), false)
        .unwrap();
    let r = http_async(
        addr,
        "/tokenize",
        json!({"messages": [{"role": "user", "content": "Hi there"}], "add_generation_prompt": false}),
    )
    .await;
    let ids: Vec<u32> = serde_json::from_value(r.json()["tokens"].clone()).unwrap();
    assert_eq!(ids, no_gen);
    // Detokenize round trip.
    let r = http_async(
        addr,
        "/detokenize",
        json!({"model": MODEL_ID, "tokens": want}),
    )
    .await;
    assert_eq!(r.status, 200);
    assert_eq!(
        r.json()["prompt"],
        tok.decode(&want, false).unwrap().as_str()
    );
    // Errors: unknown model 404; out-of-vocabulary ids, neither/both inputs, bad JSON 400.
    for (path, body, status) in [
        ("/tokenize", json!({"model": "nope", "prompt": "x"}), 404),
        ("/detokenize", json!({"model": "nope", "tokens": [1]}), 404),
        ("/detokenize", json!({"tokens": [1, 100000]}), 400),
        ("/detokenize", json!({"tokens": [-1]}), 400),
        ("/tokenize", json!({}), 400),
        ("/tokenize", json!({"prompt": "a", "messages": []}), 400),
        ("/tokenize", json!({"messages": []}), 400),
    ] {
        let r = http_async(addr, path, body.clone()).await;
        assert_eq!(r.status, status, "{path} {body}");
        assert!(r.json()["error"]["message"].is_string());
    }
    let r = tokio::task::spawn_blocking(move || http(addr, "POST", "/tokenize", b"{nope"))
        .await
        .unwrap();
    assert_eq!(r.status, 400);
    server.shutdown().await.unwrap();
}

// ---------------------------------------------------------------------------------------------
// n, prompt lists, echo, prompt_logprobs
// ---------------------------------------------------------------------------------------------

/// The `choices` of a response, checked to be indexed 0, 1, ….
fn choices(v: &Value) -> Vec<Value> {
    let c = v["choices"].as_array().unwrap().clone();
    for (i, ch) in c.iter().enumerate() {
        assert_eq!(ch["index"], i, "{v}");
    }
    c
}

fn texts(v: &Value) -> Vec<String> {
    choices(v)
        .iter()
        .map(|c| {
            c["text"]
                .as_str()
                .or(c["message"]["content"].as_str())
                .unwrap()
                .to_string()
        })
        .collect()
}

async fn completion(addr: SocketAddr, body: Value) -> Value {
    let r = http_async(addr, "/v1/completions", body.clone()).await;
    assert_eq!(
        r.status,
        200,
        "{body}: {}",
        String::from_utf8_lossy(&r.body)
    );
    r.json()
}

/// A streamed response's chunks (before `[DONE]`, which must end it).
fn stream_chunks(r: &HttpResponse) -> Vec<Value> {
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    let frames = r.sse();
    assert_eq!(frames.last().unwrap(), "[DONE]");
    assert_eq!(frames.iter().filter(|f| *f == "[DONE]").count(), 1);
    frames[..frames.len() - 1]
        .iter()
        .map(|f| serde_json::from_str(f).unwrap())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_n_samples_and_prompt_lists() {
    let server = start(4, 16).await;
    let addr = server.http_addr;
    let base = json!({"max_tokens": 8, "temperature": 0.9, "ignore_eos": true});
    let with = |extra: Value| {
        let mut b = base.clone();
        for (k, v) in extra.as_object().unwrap() {
            b[k] = v.clone();
        }
        b
    };

    // n = 3 with a seed: three choices, reproducible, choice i = the single request with seed
    // 7 + i; usage counts the prompt once and every choice's tokens.
    let v = completion(
        addr,
        with(json!({"prompt": "Once upon a time", "n": 3, "seed": 7})),
    )
    .await;
    let got = texts(&v);
    assert_eq!(got.len(), 3);
    assert!(
        got[0] != got[1] || got[1] != got[2],
        "the samples differ: {got:?}"
    );
    let again = completion(
        addr,
        with(json!({"prompt": "Once upon a time", "n": 3, "seed": 7})),
    )
    .await;
    assert_eq!(texts(&again), got);
    for (i, text) in got.iter().enumerate() {
        let one = completion(
            addr,
            with(json!({"prompt": "Once upon a time", "seed": 7 + i})),
        )
        .await;
        assert_eq!(&texts(&one)[0], text, "sample {i}");
        if i == 0 {
            assert_eq!(v["usage"]["prompt_tokens"], one["usage"]["prompt_tokens"]);
        }
    }
    assert_eq!(v["usage"]["completion_tokens"], 24);
    assert!(v["id"].as_str().unwrap().starts_with("cmpl-"));

    // A list of two prompts (text, then the same as token ids) = two single requests.
    let loaded = load(&fixture(MODEL_ID)).unwrap();
    let prompts = ["The quick brown fox", "Hello"];
    let ids: Vec<Vec<u32>> = prompts
        .iter()
        .map(|p| prompt_ids(&loaded, Some(p), None, false).unwrap())
        .collect();
    let singles: Vec<String> = {
        let mut out = Vec::new();
        for p in prompts {
            out.push(
                texts(&completion(addr, with(json!({"prompt": p, "seed": 5}))).await)[0].clone(),
            );
        }
        out
    };
    let listed = completion(addr, with(json!({"prompt": prompts, "seed": 5}))).await;
    assert_eq!(texts(&listed), singles);
    assert_eq!(
        listed["usage"]["prompt_tokens"],
        ids[0].len() + ids[1].len()
    );
    let as_ids = completion(addr, with(json!({"prompt": ids, "seed": 5}))).await;
    assert_eq!(texts(&as_ids), singles);
    // Two prompts × n = 2: choice 2·p + i is prompt p with seed 5 + i.
    let grid = completion(addr, with(json!({"prompt": prompts, "seed": 5, "n": 2}))).await;
    let grid = texts(&grid);
    assert_eq!(grid.len(), 4);
    assert_eq!(
        (grid[0].as_str(), grid[2].as_str()),
        (singles[0].as_str(), singles[1].as_str())
    );
    let p1_seed6 = completion(addr, with(json!({"prompt": prompts[1], "seed": 6}))).await;
    assert_eq!(grid[3], texts(&p1_seed6)[0]);

    // Chat: n = 2 with a seed.
    let chat = |seed: u64, n: u32| {
        json!({"messages": [{"role": "user", "content": "Hi there"}], "max_tokens": 6,
            "temperature": 0.9, "seed": seed, "n": n, "ignore_eos": true})
    };
    let r = http_async(addr, "/v1/chat/completions", chat(11, 2)).await;
    assert_eq!(r.status, 200);
    let v = r.json();
    assert_eq!(v["object"], "chat.completion");
    let got = texts(&v);
    for (i, text) in got.iter().enumerate() {
        let one = http_async(addr, "/v1/chat/completions", chat(11 + i as u64, 1)).await;
        assert_eq!(&texts(&one.json())[0], text);
    }
    assert_eq!(v["usage"]["completion_tokens"], 12);
    server.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_streaming_n_interleaves_choices() {
    let server = start(4, 16).await;
    let addr = server.http_addr;
    let body = json!({"prompt": ["Once upon a time", "Hi"], "n": 2, "seed": 3, "max_tokens": 10,
        "temperature": 0.8, "ignore_eos": true, "logprobs": 1});
    let want = completion(addr, body.clone()).await;
    let want_texts = texts(&want);
    let mut sb = body.clone();
    sb["stream"] = json!(true);
    sb["stream_options"] = json!({"include_usage": true});
    let r = http_async(addr, "/v1/completions", sb).await;
    let chunks = stream_chunks(&r);
    let (usage_chunk, content) = chunks.split_last().unwrap();
    assert_eq!(usage_chunk["choices"], json!([]));
    assert_eq!(usage_chunk["usage"], want["usage"]);
    assert_eq!(usage_chunk["usage"]["completion_tokens"], 40);
    assert!(content.iter().all(|c| c["usage"].is_null()));
    assert!(content.iter().all(|c| c["id"] == content[0]["id"]));
    let mut text = vec![String::new(); 4];
    let mut lps = vec![0usize; 4];
    let mut finished = vec![0usize; 4];
    for c in content {
        let ch = c["choices"].as_array().unwrap();
        assert_eq!(ch.len(), 1);
        let i = ch[0]["index"].as_u64().unwrap() as usize;
        assert_eq!(finished[i], 0, "a chunk of choice {i} after its finish");
        text[i].push_str(ch[0]["text"].as_str().unwrap());
        if let Some(t) = ch[0]["logprobs"]["token_logprobs"].as_array() {
            lps[i] += t.len();
        }
        if !ch[0]["finish_reason"].is_null() {
            assert_eq!(ch[0]["finish_reason"], "length");
            finished[i] += 1;
        }
    }
    assert_eq!(text, want_texts);
    assert_eq!(finished, vec![1; 4]);
    assert_eq!(lps, vec![10; 4]);

    // Chat streaming with n = 2: each choice's first chunk carries the role.
    let chat = json!({"messages": [{"role": "user", "content": "Hi there"}], "max_tokens": 5,
        "temperature": 0, "n": 2, "stream": true});
    let chunks = stream_chunks(&http_async(addr, "/v1/chat/completions", chat).await);
    for i in 0..2 {
        let mine: Vec<&Value> = chunks
            .iter()
            .filter(|c| c["choices"][0]["index"] == i)
            .collect();
        assert_eq!(mine[0]["choices"][0]["delta"]["role"], "assistant");
        assert!(mine[1..]
            .iter()
            .all(|c| c["choices"][0]["delta"]["role"].is_null()));
        assert!(!mine.last().unwrap()["choices"][0]["finish_reason"].is_null());
    }
    server.shutdown().await.unwrap();
}

/// Log-softmax rows of the CPU executor's own logits over `ids` (every position), computed here
/// independently of the server.
fn reference_log_softmax(loaded: &Loaded, ids: &[u32]) -> Vec<Vec<f64>> {
    let rows = loaded.cpu().unwrap().session().prefill_all(ids).unwrap();
    rows.iter()
        .map(|r| model::sampling::log_softmax(r))
        .collect()
}

/// Checks vLLM-format `prompt_logprobs` against the reference rows: `null` first, then each
/// token's logprob, rank and the `top` most likely.
fn check_prompt_logprobs(got: &Value, ids: &[u32], lsm: &[Vec<f64>], top: usize) {
    let got = got.as_array().unwrap();
    assert_eq!(got.len(), ids.len());
    assert!(got[0].is_null());
    for j in 1..ids.len() {
        let row = &lsm[j - 1];
        let m = got[j].as_object().unwrap();
        let t = ids[j];
        let e = &m[&t.to_string()];
        let lp = e["logprob"].as_f64().unwrap();
        assert!(
            (lp - row[t as usize]).abs() < 1e-4,
            "position {j}: {lp} vs {}",
            row[t as usize]
        );
        let rank = row.iter().filter(|&&x| x >= row[t as usize]).count();
        assert_eq!(e["rank"], rank, "position {j}");
        assert!(e["decoded_token"].is_string());
        let mut order: Vec<usize> = (0..row.len()).collect();
        order.sort_by(|&a, &b| row[b].total_cmp(&row[a]).then(a.cmp(&b)));
        for (r, &id) in order.iter().take(top).enumerate() {
            let e = &m[&id.to_string()];
            assert!((e["logprob"].as_f64().unwrap() - row[id]).abs() < 1e-4);
            if id as u32 != t {
                assert_eq!(e["rank"], r + 1);
            }
        }
        let want_len = top + usize::from(!order[..top].contains(&(t as usize)));
        assert_eq!(m.len(), want_len, "position {j}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_prompt_logprobs_and_echo() {
    // 5 tokens a step: a prompt's logprobs come from several chunked `forward` calls.
    let cfg = EngineConfig {
        max_batched_tokens: 5,
        ..engine_cfg(4, 16)
    };
    let server = start_with(cfg, None).await;
    let addr = server.http_addr;
    let loaded = load(&fixture(MODEL_ID)).unwrap();
    let prompt = "The quick brown fox jumps over the lazy dog";
    let ids = prompt_ids(&loaded, Some(prompt), None, false).unwrap();
    assert!(ids.len() > 5);
    let lsm = reference_log_softmax(&loaded, &ids);
    let plain = completion(
        addr,
        json!({"prompt": prompt, "max_tokens": 6, "temperature": 0}),
    )
    .await;
    let plain_text = texts(&plain)[0].clone();

    // prompt_logprobs: on the choice, vLLM's format; generation unchanged.
    let v = completion(
        addr,
        json!({"prompt": prompt, "max_tokens": 6, "temperature": 0, "prompt_logprobs": 3}),
    )
    .await;
    assert_eq!(texts(&v)[0], plain_text);
    check_prompt_logprobs(&v["choices"][0]["prompt_logprobs"], &ids, &lsm, 3);
    assert!(v["choices"][0]["logprobs"].is_null());
    // 0: each prompt token alone.
    let v = completion(
        addr,
        json!({"prompt": [ids.clone(), ids.clone()], "max_tokens": 2, "prompt_logprobs": 0}),
    )
    .await;
    for c in choices(&v) {
        check_prompt_logprobs(&c["prompt_logprobs"], &ids, &lsm, 0);
    }

    // Chat: on the response, for the templated prompt.
    let chat_ids = prompt_ids(&loaded, Some("Hi there"), None, true).unwrap();
    let chat_lsm = reference_log_softmax(&loaded, &chat_ids);
    let r = http_async(
        addr,
        "/v1/chat/completions",
        json!({"messages": [{"role": "user", "content": "Hi there"}], "max_tokens": 3,
            "prompt_logprobs": 2, "n": 2}),
    )
    .await;
    assert_eq!(r.status, 200);
    let v = r.json();
    assert_eq!(choices(&v).len(), 2);
    check_prompt_logprobs(&v["prompt_logprobs"], &chat_ids, &chat_lsm, 2);

    // echo: the prompt text leads the choice's text; with logprobs, the prompt tokens' logprobs
    // (the first `null`) lead the generated ones.
    let v = completion(
        addr,
        json!({"prompt": prompt, "max_tokens": 6, "temperature": 0, "echo": true, "logprobs": 2}),
    )
    .await;
    let c = &v["choices"][0];
    assert_eq!(c["text"].as_str().unwrap(), format!("{prompt}{plain_text}"));
    let lp = &c["logprobs"];
    assert_eq!(lp["tokens"].as_array().unwrap().len(), ids.len() + 6);
    assert_eq!(
        lp["token_logprobs"].as_array().unwrap().len(),
        ids.len() + 6
    );
    assert!(lp["token_logprobs"][0].is_null() && lp["top_logprobs"][0].is_null());
    for j in 1..ids.len() {
        let got = lp["token_logprobs"][j].as_f64().unwrap();
        assert!(
            (got - lsm[j - 1][ids[j] as usize]).abs() < 1e-4,
            "position {j}"
        );
        let n_top = lp["top_logprobs"][j].as_object().unwrap().len();
        assert!((1..=2).contains(&n_top));
    }
    assert!(lp["token_logprobs"][ids.len()].is_f64());
    assert!(c.get("prompt_logprobs").is_none());
    // Token prompts echo their decoded text.
    let v = completion(
        addr,
        json!({"prompt": ids, "max_tokens": 6, "temperature": 0, "echo": true}),
    )
    .await;
    let decoded = loaded
        .tokenizer
        .as_ref()
        .unwrap()
        .decode(&ids, false)
        .unwrap();
    assert_eq!(texts(&v)[0], format!("{decoded}{plain_text}"));
    assert!(v["choices"][0]["logprobs"].is_null());
    // Streaming echo with n = 2: each choice starts with the prompt (and its logprobs).
    let r = http_async(
        addr,
        "/v1/completions",
        json!({"prompt": prompt, "max_tokens": 4, "temperature": 0, "echo": true, "n": 2,
            "logprobs": 0, "stream": true}),
    )
    .await;
    let chunks = stream_chunks(&r);
    for i in 0..2 {
        let mine: Vec<&Value> = chunks
            .iter()
            .filter(|c| c["choices"][0]["index"] == i)
            .collect();
        assert_eq!(mine[0]["choices"][0]["text"], prompt);
        let first_lps = &mine[0]["choices"][0]["logprobs"]["token_logprobs"];
        assert_eq!(first_lps.as_array().unwrap().len(), ids.len());
        assert!(first_lps[0].is_null() && first_lps[1].is_f64());
        let text: String = mine
            .iter()
            .map(|c| c["choices"][0]["text"].as_str().unwrap())
            .collect();
        assert!(text.starts_with(prompt) && text.len() > prompt.len());
    }
    // Still serving plain requests.
    let v = completion(
        addr,
        json!({"prompt": prompt, "max_tokens": 6, "temperature": 0}),
    )
    .await;
    assert_eq!(texts(&v)[0], plain_text);
    server.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn n_sequences_are_queued_refused_and_cancelled_together() {
    // One running slot, four queue slots.
    let server = start(1, 4).await;
    let engine = server.state().engine().unwrap().clone();
    let mut c = client(&server).await;
    let mut running = c.generate(long_request("a")).await.unwrap().into_inner();
    running.message().await.unwrap().unwrap();
    let waiting = c.generate(long_request("b")).await.unwrap().into_inner();
    assert_eq!(engine.load(), (1, 2));
    // Four more sequences do not fit the three free slots: refused, none queued.
    let addr = server.http_addr;
    let r = http_async(
        addr,
        "/v1/completions",
        json!({"prompt": "x", "n": 4, "max_tokens": 2}),
    )
    .await;
    assert_eq!(r.status, 429, "{}", String::from_utf8_lossy(&r.body));
    assert_eq!(engine.load(), (1, 2));
    // Three fit; the client goes away once the first token arrives: all three end.
    let reader = tokio::task::spawn_blocking(move || {
        first_sse_line_then_disconnect(
            addr,
            json!({"prompt": "count", "n": 3, "max_tokens": 3000, "ignore_eos": true,
                "stream": true}),
        )
    });
    let t0 = Instant::now();
    while engine.load() != (4, 5) {
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "{:?}",
            engine.load()
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    for id in ["a", "b"] {
        let found = c
            .abort(pb::AbortRequest {
                request_id: id.into(),
            })
            .await
            .unwrap()
            .into_inner()
            .found;
        assert!(found);
    }
    assert_eq!(collect(running).await.complete.finish_reason, "abort");
    assert_eq!(collect(waiting).await.complete.finish_reason, "abort");
    let first: Value =
        serde_json::from_str(reader.await.unwrap().trim().strip_prefix("data: ").unwrap()).unwrap();
    assert_eq!(first["choices"][0]["index"], 0);
    wait_idle(&server).await;
    let m = engine.metrics().render();
    assert_eq!(
        metric(&m, "vllm:request_success_total{finished_reason=\"abort\""),
        5.0
    );
    server.shutdown().await.unwrap();
}

/// `ultra generate` (the binary) with `flags` on the fixture: its stdout, which is the text.
fn ultra_generate(prompt: &str, flags: &[&str]) -> std::process::Output {
    let model = fixture(MODEL_ID);
    std::process::Command::new(env!("CARGO_BIN_EXE_ultra"))
        .args([
            "generate",
            "--model",
            model.to_str().unwrap(),
            "--threads",
            "2",
        ])
        .args(flags)
        .arg(prompt)
        .output()
        .expect("running ultra")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn presence_and_frequency_penalties_match_ultra_generate() {
    let server = start(2, 8).await;
    let addr = server.http_addr;
    let prompt = "The quick brown fox";
    let base = SamplingParams {
        max_tokens: 24,
        ignore_eos: true,
        ..SamplingParams::greedy()
    };
    let penalized = SamplingParams {
        presence_penalty: 0.5,
        frequency_penalty: 2.0,
        ..base.clone()
    };
    let (_, _, plain) = reference(prompt, &base);
    let (loaded, _, want) = reference(prompt, &penalized);
    // A strong frequency penalty changes greedy output (the fixture repeats itself otherwise).
    assert_ne!(want.tokens, plain.tokens);
    let distinct = |t: &[u32]| t.iter().collect::<std::collections::HashSet<_>>().len();
    assert!(distinct(&want.tokens) > distinct(&plain.tokens));
    // The binary with the same flags streams the same text.
    let cli = tokio::task::spawn_blocking(move || {
        let flags = [
            "--max-tokens",
            "24",
            "--ignore-eos",
            "--presence-penalty",
            "0.5",
            "--frequency-penalty",
            "2",
        ];
        ultra_generate(prompt, &flags)
    })
    .await
    .unwrap();
    assert!(
        cli.status.success(),
        "{}",
        String::from_utf8_lossy(&cli.stderr)
    );
    assert_eq!(
        String::from_utf8(cli.stdout).unwrap(),
        format!("{}\n", want.text)
    );

    // HTTP, completions and chat.
    let body = json!({"prompt": prompt, "max_tokens": 24, "temperature": 0, "ignore_eos": true,
        "presence_penalty": 0.5, "frequency_penalty": 2.0});
    let r = http_async(addr, "/v1/completions", body).await;
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    assert_eq!(r.json()["choices"][0]["text"], want.text.as_str());
    let chat_ids = prompt_ids(&loaded, Some("Hi there"), None, true).unwrap();
    let want_chat = generate(&loaded, &chat_ids, &penalized, &mut Vec::new()).unwrap();
    let chat = json!({"messages": [{"role": "user", "content": "Hi there"}], "max_tokens": 24,
        "temperature": 0, "ignore_eos": true, "presence_penalty": 0.5, "frequency_penalty": 2.0});
    let r = http_async(addr, "/v1/chat/completions", chat).await;
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    assert_eq!(
        r.json()["choices"][0]["message"]["content"],
        want_chat.text.as_str()
    );

    // gRPC.
    let mut c = client(&server).await;
    let s = pb::SamplingParams {
        max_tokens: Some(24),
        ignore_eos: Some(true),
        presence_penalty: Some(0.5),
        frequency_penalty: Some(2.0),
        ..Default::default()
    };
    let got = collect(
        c.generate(text_request(prompt, s))
            .await
            .unwrap()
            .into_inner(),
    )
    .await;
    assert_eq!(got.tokens, want.tokens);
    assert_eq!(got.text, want.text);

    // Out of range: 400 naming the parameter, INVALID_ARGUMENT, a failing CLI naming the flag.
    for (field, v) in [
        ("presence_penalty", 2.5),
        ("frequency_penalty", -2.01),
        ("presence_penalty", -3.0),
    ] {
        let mut body = json!({"prompt": "a", "max_tokens": 2});
        body[field] = json!(v);
        let r = http_async(addr, "/v1/completions", body).await;
        assert_eq!(r.status, 400);
        let e = &r.json()["error"];
        assert_eq!(e["param"], field);
        assert!(e["message"].as_str().unwrap().contains(field), "{e}");
    }
    for s in [
        pb::SamplingParams {
            frequency_penalty: Some(5.0),
            ..Default::default()
        },
        pb::SamplingParams {
            presence_penalty: Some(f32::NAN),
            ..Default::default()
        },
    ] {
        let e = c.generate(text_request("hello", s)).await.err().unwrap();
        assert_eq!(e.code(), tonic::Code::InvalidArgument);
        assert!(e.message().contains("_penalty must be in [-2, 2]"), "{e}");
    }
    let cli = tokio::task::spawn_blocking(|| ultra_generate("a", &["--frequency-penalty", "-3"]))
        .await
        .unwrap();
    assert!(!cli.status.success());
    let err = String::from_utf8_lossy(&cli.stderr);
    assert!(
        err.contains("--frequency-penalty") && err.contains("[-2, 2]"),
        "{err}"
    );
    server.shutdown().await.unwrap();
}

/// Per-token logprobs with the drafter: the same tokens and numbers as plain decoding (the
/// target's raw distribution at each position, from the verify rows), over HTTP and gRPC, also
/// with penalties (which the speculative loop applies inside each block as plain decoding does).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn speculative_logprobs_equal_plain_logprobs() {
    let plain = start(2, 8).await;
    let spec = start_with(engine_cfg(2, 8), Some(fixture("drafters/qwen3-moe-dflash"))).await;
    let prompt = "Once upon a time";
    for extra in [
        json!({}),
        json!({"frequency_penalty": 1.5, "presence_penalty": -0.5}),
    ] {
        let mut body = json!({"prompt": prompt, "max_tokens": 20, "temperature": 0,
            "ignore_eos": true, "logprobs": 3});
        for (k, v) in extra.as_object().unwrap() {
            body[k] = v.clone();
        }
        let a = http_async(plain.http_addr, "/v1/completions", body.clone()).await;
        let b = http_async(spec.http_addr, "/v1/completions", body.clone()).await;
        assert_eq!(
            (a.status, b.status),
            (200, 200),
            "{}",
            String::from_utf8_lossy(&b.body)
        );
        let (a, b) = (a.json(), b.json());
        assert_eq!(b["choices"][0]["text"], a["choices"][0]["text"], "{extra}");
        let (la, lb) = (&a["choices"][0]["logprobs"], &b["choices"][0]["logprobs"]);
        assert_eq!(lb["tokens"], la["tokens"]);
        let nums = |v: &Value| -> Vec<f64> {
            v.as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_f64().unwrap())
                .collect()
        };
        let (na, nb) = (nums(&la["token_logprobs"]), nums(&lb["token_logprobs"]));
        assert_eq!(na.len(), 20);
        assert_eq!(nb.len(), 20);
        for (i, (x, y)) in na.iter().zip(&nb).enumerate() {
            assert!((x - y).abs() < 1e-4, "{extra} token {i}: {x} vs {y}");
        }
        let (ta, tb) = (
            la["top_logprobs"].as_array().unwrap(),
            lb["top_logprobs"].as_array().unwrap(),
        );
        assert_eq!(ta.len(), tb.len());
        for (i, (x, y)) in ta.iter().zip(tb).enumerate() {
            let (x, y) = (x.as_object().unwrap(), y.as_object().unwrap());
            assert_eq!(
                x.keys().collect::<Vec<_>>(),
                y.keys().collect::<Vec<_>>(),
                "token {i}"
            );
            for (k, v) in x {
                assert!((v.as_f64().unwrap() - y[k].as_f64().unwrap()).abs() < 1e-4);
            }
        }
        // Chat streaming: one logprob entry per token.
        let mut chat = json!({"messages": [{"role": "user", "content": "Hi there"}],
            "max_tokens": 12, "temperature": 0, "ignore_eos": true, "stream": true,
            "logprobs": true, "top_logprobs": 2});
        for (k, v) in extra.as_object().unwrap() {
            chat[k] = v.clone();
        }
        let r = http_async(spec.http_addr, "/v1/chat/completions", chat).await;
        assert_eq!(r.status, 200);
        let frames = r.sse();
        let entries: Vec<Value> = frames[..frames.len() - 1]
            .iter()
            .map(|f| serde_json::from_str::<Value>(f).unwrap())
            .filter_map(|c| c["choices"][0]["logprobs"]["content"].as_array().cloned())
            .flatten()
            .collect();
        assert_eq!(entries.len(), 12);
        assert!(entries
            .iter()
            .all(|e| e["top_logprobs"].as_array().unwrap().len() == 2));
    }
    plain.shutdown().await.unwrap();
    spec.shutdown().await.unwrap();

    // gRPC on the default model, whose drafter is trained (the fixture drafter above is
    // random and rarely accepted): rounds emit several tokens, each with the logprobs plain
    // decoding reports, with a frequency penalty.
    let (target, drafter) = common::default_model_dirs();
    let plain = start_model(target.clone(), engine_cfg(2, 8), None).await;
    let spec = start_model(target, engine_cfg(2, 8), Some(drafter)).await;
    let (mut cp, mut cs) = (client(&plain).await, client(&spec).await);
    let req = pb::GenerateRequest {
        logprobs: Some(4),
        ..text_request(
            "def fibonacci(n):",
            pb::SamplingParams {
                max_tokens: Some(16),
                ignore_eos: Some(true),
                frequency_penalty: Some(0.7),
                ..Default::default()
            },
        )
    };
    let want = cp.complete(req.clone()).await.unwrap().into_inner();
    assert_eq!(want.logprobs.len(), 16);
    let (ids, lps, multi) = stream_logprobs(&mut cs, req).await;
    assert_eq!(ids, want.token_ids);
    assert!(multi, "no round emitted more than one token");
    let top_ids = |l: &pb::TokenLogprob| l.top.iter().map(|t| t.token_id).collect::<Vec<_>>();
    for (i, (x, y)) in want.logprobs.iter().zip(&lps).enumerate() {
        assert_eq!(x.token_id, y.token_id);
        assert!((x.logprob - y.logprob).abs() < 1e-4, "token {i}");
        assert_eq!(top_ids(x), top_ids(y), "token {i}");
        assert_eq!(y.top.len(), 4);
        for (p, q) in x.top.iter().zip(&y.top) {
            assert!((p.logprob - q.logprob).abs() < 1e-4, "token {i}");
        }
    }
    plain.shutdown().await.unwrap();
    spec.shutdown().await.unwrap();
}
