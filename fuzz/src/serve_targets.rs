//! The `ultra serve` fuzz targets' logic, shared by the cargo-fuzz targets
//! (`fuzz_targets/http_request.rs`, `fuzz_targets/grpc_request.rs`) and the plain loop driver
//! (`src/bin/drive.rs`, for machines without nightly + cargo-fuzz), and their seed inputs.
//!
//! - `http_request`: the input is the whole client side of one HTTP/1.1 connection, served by
//!   Ultra's connection layer and router (no model loaded); every response must be HTTP/1.1,
//!   never a 500, and every error OpenAI JSON. Byte 0 also picks a route whose JSON checks run
//!   on the rest of the input directly.
//! - `grpc_request`: the input is a protobuf message decoded as each `ultra.v1` request; a
//!   `GenerateRequest` that decodes is converted as the service does and may only be refused
//!   with INVALID_ARGUMENT.

use prost::Message;
use serve::proto::v1 as pb;
use serve::server::fuzz::HttpHarness;

thread_local! {
    static HARNESS: HttpHarness = HttpHarness::new().expect("the HTTP harness starts");
}

pub fn http_request(data: &[u8]) -> Result<(), String> {
    if let Some((&route, body)) = data.split_first() {
        serve::server::fuzz::http_body(route, body)?;
    }
    HARNESS.with(|h| h.run(data))
}

pub fn grpc_request(data: &[u8]) -> Result<(), String> {
    serve::server::fuzz::grpc_request(data)
}

fn request(path: &str, extra: &str, body: &str) -> Vec<u8> {
    format!(
        "POST {path} HTTP/1.1\r\nHost: 127.0.0.1:8000\r\nContent-Type: application/json\r\nAuthorization: Bearer fuzz-key\r\n{extra}Content-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

/// Seed inputs of `http_request`.
pub fn http_seeds() -> Vec<Vec<u8>> {
    let mut v = vec![
        request("/v1/completions", "", r#"{"prompt": "hi", "max_tokens": 4, "stop": ["a"], "temperature": 0.5}"#),
        request("/v1/completions", "", r#"{"prompt": [[1, 2], [3]], "n": 2, "logprobs": 3, "echo": true}"#),
        request("/v1/chat/completions", "Origin: https://ok.example\r\n", r#"{"messages": [{"role": "user", "content": [{"type": "text", "text": "x"}]}], "stream": true, "stream_options": {"include_usage": true}}"#),
        request("/tokenize", "", r#"{"messages": [{"role": "user", "content": "x"}], "add_generation_prompt": true}"#),
        request("/detokenize", "", r#"{"tokens": [1, 2, 3]}"#),
        request("/v1/completions", "Transfer-Encoding: chunked\r\n", ""),
        b"OPTIONS /v1/completions HTTP/1.1\r\nHost: localhost\r\nOrigin: https://evil.example\r\nAccess-Control-Request-Method: POST\r\n\r\n".to_vec(),
        b"GET /health HTTP/1.1\r\nHost: localhost\r\n\r\nGET /metrics HTTP/1.1\r\nHost: [::1]:8000\r\n\r\n".to_vec(),
        b"GET /v1/models HTTP/1.1\r\nHost: attacker.example\r\nAuthorization: Bearer nope\r\n\r\n".to_vec(),
        b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 99999999\r\n\r\n{".to_vec(),
    ];
    // Route-selector-led JSON bodies for the direct checks.
    for (route, body) in [
        (
            0u8,
            r#"{"prompt": "a", "max_tokens": -1, "top_k": -5, "stop": "x"}"#,
        ),
        (
            1,
            r#"{"messages": [], "logprobs": true, "top_logprobs": 30}"#,
        ),
        (2, r#"{"prompt": "x", "return_token_strs": true}"#),
        (3, r#"{"tokens": [4294967295]}"#),
    ] {
        let mut s = vec![route];
        s.extend_from_slice(body.as_bytes());
        v.push(s);
    }
    v
}

/// Seed inputs of `grpc_request`.
pub fn grpc_seeds() -> Vec<Vec<u8>> {
    let sampling = pb::SamplingParams {
        temperature: Some(0.7),
        top_k: Some(5),
        top_p: Some(0.9),
        min_p: Some(0.1),
        repetition_penalty: Some(1.1),
        seed: Some(3),
        max_tokens: Some(16),
        stop_token_ids: vec![1, 2],
        stop: vec!["\n\n".into(), "END".into()],
        ignore_eos: Some(true),
        presence_penalty: Some(0.5),
        frequency_penalty: Some(-0.5),
    };
    let mut v = vec![
        pb::GenerateRequest {
            request_id: "r1".into(),
            input: Some(pb::generate_request::Input::Text("hello".into())),
            sampling: Some(sampling.clone()),
            logprobs: Some(3),
            model: "m".into(),
        }
        .encode_to_vec(),
        pb::GenerateRequest {
            input: Some(pb::generate_request::Input::TokenIds(pb::TokenIds {
                ids: vec![1, 2, 3, 70000],
            })),
            ..Default::default()
        }
        .encode_to_vec(),
        pb::GenerateRequest {
            input: Some(pb::generate_request::Input::Chat(pb::Chat {
                messages: vec![pb::ChatMessage {
                    role: "user".into(),
                    content: "hi".into(),
                }],
            })),
            sampling: Some(pb::SamplingParams {
                stop: (0..20).map(|i| i.to_string()).collect(),
                ..sampling
            }),
            ..Default::default()
        }
        .encode_to_vec(),
        pb::TokenizeRequest {
            input: Some(pb::tokenize_request::Input::Text("x".into())),
            add_special_tokens: Some(false),
        }
        .encode_to_vec(),
        pb::DetokenizeRequest {
            token_ids: vec![1, 2],
            skip_special_tokens: Some(true),
        }
        .encode_to_vec(),
    ];
    v.push(vec![0x12, 0x02, 0xc3, 0x28]);
    v
}
