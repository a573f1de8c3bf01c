//! Entry points of the fuzz targets (`fuzz/`, cargo-fuzz or its plain loop driver): the HTTP
//! front door and router fed raw bytes over an in-memory connection ([`HttpHarness`]: request
//! parsing, the `Host` / CORS / API-key / size checks, JSON bodies, error shapes), the HTTP
//! bodies' checks alone ([`http_body`]), and the gRPC request decoding and conversion
//! ([`grpc_request`]). Each returns `Err` naming a broken invariant (a 500, an error that is
//! not OpenAI JSON, a decode error that is not INVALID_ARGUMENT); a panic is a bug as well.

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use prost::Message;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::conn::{self, Api};
use super::{AppState, Front, Limits, Security};
use crate::proto::v1 as pb;

/// A server front door without a model (requests that pass every check get 503 "Loading"),
/// with an API key (`fuzz-key`), one allowed origin (`https://ok.example`), the loopback
/// `Host` check and a 64 KiB body limit.
pub struct HttpHarness {
    rt: tokio::runtime::Runtime,
    front: Arc<Front>,
    svc: conn::Svc,
}

impl HttpHarness {
    pub fn new() -> anyhow::Result<HttpHarness> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let limits = Limits {
            header_read_timeout: Duration::from_secs(1),
            body_read_timeout: Duration::from_secs(1),
            idle_timeout: Duration::from_secs(1),
            max_connections: Some(16),
            max_request_bytes: 64 << 10,
            ..Limits::default()
        };
        let security = Security {
            api_key: Some("fuzz-key".into()),
            allowed_origins: vec!["https://ok.example".into()],
        };
        let front = Front::new(limits, security, Some(8000))?;
        let state = AppState {
            engine: Arc::new(OnceLock::new()),
            load_error: Arc::new(OnceLock::new()),
            max_token_bytes: Arc::new(OnceLock::new()),
            model_id: "fuzz".into(),
            front: front.clone(),
        };
        let svc = super::http_service(state);
        Ok(HttpHarness { rt, front, svc })
    }

    /// Sends `input` as the whole client side of one connection, reads what the server
    /// answers, and checks it: HTTP/1.x responses, never a 500, every error OpenAI JSON.
    pub fn run(&self, input: &[u8]) -> Result<(), String> {
        let (front, svc) = (self.front.clone(), self.svc.clone());
        let out = self.rt.block_on(async move {
            let (mut client, server) = tokio::io::duplex(1 << 20);
            let peer = "127.0.0.1:9".parse().expect("a socket address");
            let task = tokio::spawn(conn::serve_connection(server, peer, Api::Http, front, svc));
            let _ = client.write_all(input).await;
            let _ = client.shutdown().await;
            let mut out = Vec::new();
            let _ =
                tokio::time::timeout(Duration::from_secs(5), client.read_to_end(&mut out)).await;
            task.abort();
            out
        });
        check_responses(&out)
    }
}

/// Checks a byte stream of HTTP/1.1 responses (as many as the pipeline produced).
fn check_responses(mut out: &[u8]) -> Result<(), String> {
    while !out.is_empty() {
        let head_end = out
            .windows(4)
            .position(|w| w == b"\r\n\r\n")
            .ok_or_else(|| format!("an unterminated response head: {:?}", lossy(out)))?;
        let head = std::str::from_utf8(&out[..head_end]).map_err(|e| e.to_string())?;
        // An HTTP/1.0 request gets an HTTP/1.0 answer.
        if !head.starts_with("HTTP/1.1 ") && !head.starts_with("HTTP/1.0 ") {
            return Err(format!("not an HTTP/1.x response: {head:?}"));
        }
        let status: u16 = head
            .get(9..12)
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| format!("no status: {head:?}"))?;
        if status == 500 {
            return Err(format!("a 500: {:?}", lossy(out)));
        }
        let len: usize = head
            .lines()
            .find_map(|l| {
                let (k, v) = l.split_once(':')?;
                k.eq_ignore_ascii_case("content-length")
                    .then(|| v.trim().parse().ok())?
            })
            .unwrap_or(0);
        let body_start = head_end + 4;
        let body = out
            .get(body_start..body_start + len)
            .ok_or_else(|| format!("a short body: {:?}", lossy(out)))?;
        if status >= 400 {
            let v: serde_json::Value = serde_json::from_slice(body)
                .map_err(|e| format!("a {status} without JSON ({e}): {:?}", lossy(body)))?;
            if v["error"]["code"] != status || !v["error"]["message"].is_string() {
                return Err(format!("a {status} not in OpenAI's shape: {v}"));
            }
        }
        out = &out[body_start + len..];
    }
    Ok(())
}

fn lossy(b: &[u8]) -> String {
    String::from_utf8_lossy(&b[..b.len().min(300)]).into_owned()
}

/// The JSON body checks of each HTTP route without a model (parsing, chat messages, sampling
/// parameters, stop limits); `Ok` whether the body is accepted or refused with a 4xx.
pub fn http_body(route: u8, body: &[u8]) -> Result<(), String> {
    super::http::check_body(route, body)
}

/// Decodes `bytes` as each `ultra.v1` request message; a `GenerateRequest` that decodes is
/// converted as the service does ([`super::grpc::convert`]). Decoding may fail (the service
/// answers INVALID_ARGUMENT); conversion must give `Ok` or INVALID_ARGUMENT.
pub fn grpc_request(bytes: &[u8]) -> Result<(), String> {
    let _ = pb::TokenizeRequest::decode(bytes);
    let _ = pb::DetokenizeRequest::decode(bytes);
    let _ = pb::AbortRequest::decode(bytes);
    if let Ok(r) = pb::GenerateRequest::decode(bytes) {
        if let Err(s) = super::grpc::convert(r) {
            if s.code() != tonic::Code::InvalidArgument {
                return Err(format!(
                    "conversion answered {:?}: {}",
                    s.code(),
                    s.message()
                ));
            }
        }
    }
    Ok(())
}
